//! A cluster with query nodes (issue 19's first part; cluster/src/placement.rs,
//! cluster/src/query_node.rs): sealed segments are copied to query nodes in every replica group
//! and searched there, with the writer's deletes and upserts applied at the read's snapshot, and
//! a lost query node costs no search.

mod sandbox;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sandbox::*;
use tandem_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

const COLL: &str = "docs";
const DIM: usize = 16;

/// A cluster `a` (300 rows per sealed segment, HNSW, 2 shards) whose query nodes are two groups:
/// `nodes[0]` and `nodes[1]` make group 0, `nodes[2]` group 1. 1800 rows inserted and flushed.
/// Stealing is off: these tests check which node answers (or reports a copy missing), and on a
/// loaded machine a sub-search that hiccups past the steal timer would be answered by another
/// group's copy. The stealing tests use [`cluster_with_a_slow_node`].
async fn cluster_with_query_nodes() -> (Sandbox, Vec<QueryNode>, Client) {
    let nodes = vec![QueryNode::start("qa1").await, QueryNode::start("qa2").await, QueryNode::start("qb1").await];
    let (sb, c) = cluster_over(nodes.iter().map(QueryNode::endpoint).collect(), false).await;
    (sb, nodes, c)
}

/// [`cluster_with_query_nodes`]'s cluster, reaching its query nodes at `endpoints`, with
/// long-tail stealing on or off.
async fn cluster_over(endpoints: Vec<String>, steal: bool) -> (Sandbox, Client) {
    let groups = vec![endpoints[..2].to_vec(), endpoints[2..].to_vec()];
    cluster_of_groups(groups, move |c| c.query_nodes.steal = steal).await
}

/// [`cluster_with_query_nodes`]'s cluster and data, with query node groups `groups` and its
/// configuration adjusted by `adjust`.
async fn cluster_of_groups(
    groups: Vec<Vec<String>>,
    adjust: impl Fn(&mut tandem_cluster::ClusterConfig) + Send + 'static,
) -> (Sandbox, Client) {
    let sb = Sandbox::builder()
        .cluster_with("a", move |c| {
            c.segment.seal_rows = 300;
            c.query_nodes.groups = groups.clone();
            adjust(c);
        })
        .build()
        .await;
    let mut c = sb.client("a").await;
    c.create_collection(pb::CreateCollectionRequest {
        schema: Some(schema(COLL, DIM as u32, pb::Metric::L2, hnsw(16, 64), 2, vec![field("n", pb::ScalarType::Int64)])),
    })
    .await
    .unwrap();
    let v = vectors(1800, DIM, 5);
    let payloads = (0..1800).map(|i| payload(&[("n", int(i))])).collect();
    c.insert(pb::InsertRequest { ack: 0, collection: COLL.into(), ids: (0..1800).collect(), vectors: v, payloads }).await.unwrap();
    c.flush(pb::FlushRequest { collection: COLL.into() }).await.unwrap();
    (sb, c)
}

/// [`cluster_of_groups`] over two groups of one query node each (`qa1`, `qb1`), once every
/// indexed segment has a copy in both; the segments placed.
async fn two_groups_of_one(
    adjust: impl Fn(&mut tandem_cluster::ClusterConfig) + Send + 'static,
) -> (Sandbox, [QueryNode; 2], Client, usize) {
    let nodes = [QueryNode::start("qa1").await, QueryNode::start("qb1").await];
    let groups = vec![vec![nodes[0].endpoint()], vec![nodes[1].endpoint()]];
    let (sb, mut c) = cluster_of_groups(groups, adjust).await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    (sb, nodes, c, segments)
}

/// Sealed segments of the collection with their index built, as DescribeCollection lists them.
async fn indexed_segments(c: &mut Client) -> usize {
    let info = c.describe_collection(pb::DescribeCollectionRequest { name: COLL.into() }).await.unwrap().into_inner().collection.unwrap();
    info.segments.iter().filter(|s| s.state == pb::segment_info::State::Indexed as i32).count()
}

/// Waits until every indexed segment of `a` has a copy in every group.
async fn wait_placed(sb: &Sandbox, c: &mut Client, groups: usize) -> usize {
    wait_placed_on(sb, "a", c, groups).await
}

/// Waits until every indexed segment of cluster `name` (`c` is its client) has a copy in every
/// group.
async fn wait_placed_on(sb: &Sandbox, name: &str, c: &mut Client, groups: usize) -> usize {
    let placement = sb.placement(name).await.expect("the cluster has query nodes");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let indexed = indexed_segments(c).await;
        let copies = placement.copies_per_group();
        if indexed > 0 && copies.len() == groups && copies.iter().all(|&n| n == indexed) {
            return indexed;
        }
        assert!(Instant::now() < deadline, "segments not placed in 60 s: {indexed} indexed, copies per group {copies:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn search(queries: Vec<f32>, k: u32) -> pb::SearchRequest {
    pb::SearchRequest {
        collection: COLL.into(),
        vectors: queries,
        top_k: k,
        output_fields: vec!["n".into()],
        params: Some(pb::SearchParams { nprobe: 0, ef_search: 64 }),
        read: read(pb::ConsistencyLevel::Strong, ""),
        ..Default::default()
    }
}

/// The answer to `req` with every segment searched in the writer's own process, for comparison
/// (the query nodes loaded the writer's index files, so the answers must be identical).
async fn answer_without_query_nodes(sb: &Sandbox, c: &mut Client, req: pb::SearchRequest) -> Vec<pb::Hits> {
    sb.answer_in_process("a", c, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_segments_are_searched_on_query_nodes_with_the_writers_deletes_and_upserts() {
    let (sb, nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    assert!(segments >= 4, "expected sealed segments on both shards, got {segments}");
    // Group 0 spreads its copies over its two nodes; group 1's one node holds them all.
    assert_eq!(nodes[0].held() + nodes[1].held(), segments);
    assert!(nodes[0].held() > 0 && nodes[1].held() > 0, "group 0's copies are not spread: {} and {}", nodes[0].held(), nodes[1].held());
    assert_eq!(nodes[2].held(), segments);
    // A load that names another writer but is bad (no schema) is refused and drops nothing.
    let (&(cid, shard), _) = nodes[2].running.node.held().iter().next().unwrap();
    let bad = tandem_proto::cluster::v1::LoadRequest {
        source: "http://127.0.0.1:9".into(),
        collection_id: cid,
        schema: None,
        shard,
        segments: vec![1],
        lead_from: None,
    };
    let e = nodes[2].running.node.load(bad).await.unwrap_err().to_string();
    assert!(e.contains("names no schema"), "{e}");
    assert_eq!(nodes[2].held(), segments);

    let req = search(vectors(8, DIM, 99), 10);
    for _ in 0..4 {
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got, answer_without_query_nodes(&sb, &mut c, req.clone()).await);
    }
    // Groups take turns.
    assert!(nodes.iter().all(|n| n.searches() > 0), "searches per node: {:?}", nodes.iter().map(QueryNode::searches).collect::<Vec<_>>());
    let placement = sb.placement("a").await.unwrap();
    assert_eq!(placement.rerouted.load(Ordering::Relaxed), 0);

    // Deletes and upserts of rows in sealed segments: the query nodes learn them from the stream
    // and a STRONG read sees them at once.
    let mut lead = sb.client("a").await;
    leaders_changes_reach_the_copies(&sb, &nodes, &mut lead, ("a", &mut c), 0).await;

    // A gateway in front lists the cluster's query nodes in its Topology.
    let gw = sb.gateway(&["a"], |_| {}).await;
    gateway_ready(&gw, 1, Some(COLL)).await;
    let listed: Vec<(u32, u64)> = topology(&gw).await.clusters[0].query_nodes.iter().map(|q| (q.group, q.segments)).collect();
    assert_eq!(listed, [(0, nodes[0].held() as u64), (0, nodes[1].held() as u64), (1, segments as u64)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_node_lost_under_load_fails_no_search_and_its_copies_move_to_its_group() {
    let (sb, mut nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    let placement = sb.placement("a").await.unwrap();

    // Searches run throughout; each must succeed.
    let stop = CancellationToken::new();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed, mut c) = (stop.clone(), ok.clone(), failed.clone(), sb.client("a").await);
        tokio::spawn(async move {
            let mut seed = 1000;
            while !stop.is_cancelled() {
                seed += 1;
                match c.search(search(vectors(1, DIM, seed), 10)).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("search failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // qa1 goes away: its server and its streams stop, and its address refuses connections.
    nodes.remove(0).stop().await;

    // Group 0's copies are restored on qa2, without anyone asking.
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes[0].held() != segments || placement.copies_per_group() != vec![segments, segments] {
        assert!(
            Instant::now() < deadline,
            "copies not restored: qa2 holds {} of {segments}, per group {:?}",
            nodes[0].held(),
            placement.copies_per_group()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let searches_then = nodes[0].searches();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "searches failed while a query node was lost");
    assert!(ok.load(Ordering::Relaxed) > 20, "too few searches ran to show anything: {}", ok.load(Ordering::Relaxed));
    assert!(nodes[0].searches() > searches_then, "qa2 answers group 0's searches after the loss");
    assert!(!placement.groups()[0][0].is_up());
    // GetClusterInfo (`tandem info`) shows it: the lost node down with nothing, qa2 with group
    // 0's copies, qb1 with group 1's.
    let info = c.get_cluster_info(pb::GetClusterInfoRequest {}).await.unwrap().into_inner();
    let seen: Vec<(u32, bool, u64)> = info.query_nodes.iter().map(|q| (q.group, q.up, q.segments)).collect();
    assert_eq!(seen, vec![(0, false, 0), (0, true, segments as u64), (1, true, segments as u64)]);
    assert!(info.query_nodes[1].searches > 0);
    let req = search(vectors(8, DIM, 3), 10);
    assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, answer_without_query_nodes(&sb, &mut c, req).await);
}

/// Per sealed segment of `a`'s collection, by (shard, segment id): whether the writer released
/// its index (it holds it on disk only).
async fn released(sb: &Sandbox) -> std::collections::BTreeMap<(u32, u64), bool> {
    let node = sb.node("a").await;
    let c = node.collections().into_iter().find(|c| c.schema().name == COLL).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for (i, sh) in c.shards().iter().enumerate() {
        for seg in sh.sealed_segments() {
            assert!(seg.indexed_as().is_some(), "segment {} lost its index", seg.id);
            out.insert((i as u32, seg.id), seg.is_released());
        }
    }
    out
}

/// The collection's memory as GetClusterInfo (`tandem info`) reports it.
async fn memory_bytes(c: &mut Client) -> u64 {
    let info = c.get_cluster_info(pb::GetClusterInfoRequest {}).await.unwrap().into_inner();
    info.collections.iter().find(|s| s.name == COLL).unwrap().memory_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_releases_the_indexes_every_group_holds_and_reads_back_those_a_lost_node_held() {
    let (sb, mut nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while released(&sb).await.values().any(|r| !r) {
        assert!(Instant::now() < deadline, "indexes not released: {:?}", released(&sb).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(released(&sb).await.len(), segments);
    let lean = memory_bytes(&mut c).await;
    // Searches run on the copies, so nothing is read back.
    let req = search(vectors(8, DIM, 31), 10);
    let answer = c.search(req.clone()).await.unwrap().into_inner().results;
    assert!(released(&sb).await.values().all(|&r| r), "a search answered by the copies read an index back");

    // qa1 goes away: the segments it held are no longer in every group, so their indexes are
    // read back; the others stay released.
    let lost: Vec<(u32, u64)> =
        nodes[0].running.node.held().iter().flat_map(|(&(_, shard), segs)| segs.iter().map(move |&s| (shard, s))).collect();
    assert!(!lost.is_empty());
    nodes.remove(0).stop().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for seed in 100.. {
        // A search finds the node gone (its sub-search fails, and is answered here).
        c.search(search(vectors(1, DIM, seed), 10)).await.unwrap();
        let now = released(&sb).await;
        let read_back: Vec<(u32, u64)> = now.iter().filter(|&(_, &r)| !r).map(|(&k, _)| k).collect();
        if read_back == lost {
            break;
        }
        assert!(Instant::now() < deadline, "read back {read_back:?}, the lost node held {lost:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Read back, they stay in memory for a while even once group 0 holds them again on qa2.
    wait_placed(&sb, &mut c, 2).await;
    tokio::time::sleep(tandem_cluster::placement::PLACE_EVERY * 3).await;
    assert_eq!(released(&sb).await.values().filter(|&&r| !r).count(), lost.len());
    assert!(memory_bytes(&mut c).await > lean, "read-back indexes count in the collection's memory again");
    assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, answer);
    // The writer alone (every segment searched here, released ones read back first) answers
    // the same.
    assert_eq!(answer_without_query_nodes(&sb, &mut c, req).await, answer);
    assert!(released(&sb).await.values().all(|&r| !r));
}

/// `query_nodes.release_indexes = false`: the writer keeps every index in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_release_off_the_writer_keeps_its_indexes() {
    let (sb, _nodes, _c, segments) = two_groups_of_one(|c| c.query_nodes.release_indexes = false).await;
    tokio::time::sleep(tandem_cluster::placement::PLACE_EVERY * 3).await;
    let kept = released(&sb).await;
    assert_eq!(kept.len(), segments);
    assert!(kept.values().all(|&r| !r), "released with release_indexes off: {kept:?}");
}

/// The replica groups GetClusterInfo (`tandem info`) lists as holding the collection.
async fn replica_groups(c: &mut Client) -> Vec<u32> {
    let info = c.get_cluster_info(pb::GetClusterInfoRequest {}).await.unwrap().into_inner();
    info.collections.iter().find(|s| s.name == COLL).unwrap().replica_groups.clone()
}

/// Waits until the query nodes hold `want` copies each (the placement loop loaded or released
/// them) and the placement's cache says the same per group.
async fn wait_held(sb: &Sandbox, nodes: &[QueryNode], want: &[usize]) {
    let placement = sb.placement("a").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held: Vec<usize> = nodes.iter().map(QueryNode::held).collect();
        if held == want && placement.copies_per_group() == want {
            return;
        }
        assert!(Instant::now() < deadline, "copies held {held:?}, cached {:?}, want {want:?}", placement.copies_per_group());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Searches that reach only `to` of `nodes` (by index), and answer as the writer alone does.
async fn searches_reach_only(sb: &Sandbox, nodes: &[QueryNode], c: &mut Client, to: &[usize]) {
    let before: Vec<u64> = nodes.iter().map(QueryNode::searches).collect();
    let req = search(vectors(8, DIM, 41), 10);
    for _ in 0..4 {
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got, answer_without_query_nodes(sb, c, req.clone()).await);
    }
    for (i, n) in nodes.iter().enumerate() {
        let sent = n.searches() - before[i];
        assert_eq!(sent > 0, to.contains(&i), "node {i} answered {sent} sub-searches; expected only nodes {to:?} to answer");
    }
}

/// LoadCollection with fewer replicas than the cluster has groups (Milvus's
/// `load_collection(replica_number=R)` maps onto it): only the groups chosen hold copies, only
/// they are searched, the writer releases the indexes they cover, and the setting outlives a
/// restart. With 0 the writer serves the collection alone, and with none every group again.
/// A number over the groups is refused, naming it, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_loaded_with_fewer_replicas_is_held_and_searched_by_those_groups_only() {
    // Stealing off: the test checks which groups answer.
    let (sb, nodes, mut c, segments) = two_groups_of_one(|c| c.query_nodes.steal = false).await;
    assert_eq!(replica_groups(&mut c).await, [0, 1], "a collection never loaded is held by every group");
    let load = |replicas: Option<u32>| pb::LoadCollectionRequest { name: COLL.into(), replicas };
    let deadline = Instant::now() + Duration::from_secs(30);
    while released(&sb).await.values().any(|r| !r) {
        assert!(Instant::now() < deadline, "indexes not released: {:?}", released(&sb).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One replica: the groups hold as many copies, so the lower one keeps it; group 1 lets go.
    let got = c.load_collection(load(Some(1))).await.unwrap().into_inner().groups;
    assert_eq!(got, [0]);
    wait_held(&sb, &nodes, &[segments, 0]).await;
    assert_eq!(replica_groups(&mut c).await, [0]);
    // Group 0 is every group holding it now, so no index is read back for group 1's loss.
    tokio::time::sleep(tandem_cluster::placement::PLACE_EVERY * 3).await;
    let now = released(&sb).await;
    assert!(now.values().all(|&r| r), "indexes read back though the one group holding the collection holds them: {now:?}");
    searches_reach_only(&sb, &nodes, &mut c, &[0]).await;

    // Bad input changes nothing: more replicas than groups, an unknown collection.
    let e = c.load_collection(load(Some(3))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("replicas 3") && e.message().contains("2 replica group(s)"), "{}", e.message());
    let e = c.load_collection(pb::LoadCollectionRequest { name: "nope".into(), replicas: Some(1) }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("nope"), "{}", e.message());
    assert_eq!(replica_groups(&mut c).await, [0]);

    // A restart keeps the setting (coordinator state): group 1 is not loaded again.
    let addr = sb.addr("a").await;
    sb.stop("a").await;
    sb.start_again_at("a", addr).await;
    let mut c = sb.client("a").await;
    assert_eq!(replica_groups(&mut c).await, [0], "the setting did not outlive a restart");
    tokio::time::sleep(tandem_cluster::placement::PLACE_EVERY * 3).await;
    wait_held(&sb, &nodes, &[segments, 0]).await;

    // None: the writer alone, with every index read back; then every group again.
    assert!(c.load_collection(load(Some(0))).await.unwrap().into_inner().groups.is_empty());
    wait_held(&sb, &nodes, &[0, 0]).await;
    assert!(replica_groups(&mut c).await.is_empty());
    searches_reach_only(&sb, &nodes, &mut c, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while released(&sb).await.values().any(|&r| r) {
        assert!(Instant::now() < deadline, "indexes not read back with no replica: {:?}", released(&sb).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.load_collection(load(None)).await.unwrap().into_inner().groups, [0, 1]);
    wait_held(&sb, &nodes, &[segments, segments]).await;
    assert_eq!(replica_groups(&mut c).await, [0, 1]);
    searches_reach_only(&sb, &nodes, &mut c, &[0, 1]).await;
}

/// A cluster without query nodes is one replica, itself: LoadCollection takes 0 and 1 (and
/// unset), lists no group, and refuses more, naming the number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_query_nodes_is_one_replica() {
    let sb = Sandbox::builder().cluster("a").build().await;
    let mut c = sb.client("a").await;
    c.create_collection(pb::CreateCollectionRequest { schema: Some(schema(COLL, DIM as u32, pb::Metric::L2, hnsw(16, 64), 1, vec![])) })
        .await
        .unwrap();
    for replicas in [None, Some(0), Some(1)] {
        let groups = c.load_collection(pb::LoadCollectionRequest { name: COLL.into(), replicas }).await.unwrap().into_inner().groups;
        assert!(groups.is_empty(), "{replicas:?}: {groups:?}");
    }
    let e = c.load_collection(pb::LoadCollectionRequest { name: COLL.into(), replicas: Some(2) }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("replicas 2"), "{}", e.message());
    assert!(replica_groups(&mut c).await.is_empty());
}

/// Four searches of `a`, each answered as the writer alone answers it, and each sent to the
/// query nodes.
async fn four_searches_answered_by_the_nodes_as_by_the_writer(sb: &Sandbox, nodes: &[QueryNode], c: &mut Client) {
    let before = nodes.iter().map(QueryNode::searches).sum::<u64>();
    let req = search(vectors(8, DIM, 11), 10);
    for _ in 0..4 {
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got, answer_without_query_nodes(sb, c, req.clone()).await);
    }
    assert!(nodes.iter().map(QueryNode::searches).sum::<u64>() >= before + 4, "the searches did not go to the query nodes");
}

/// A cluster restarted at another address: its query nodes follow the old one, so the placement
/// it kept is not used, and every copy is loaded again from the new address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cluster_loads_its_query_nodes_again() {
    let (sb, nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    let loaded = nodes.iter().map(|n| n.running.node.loaded()).sum::<u64>();
    sb.restart("a").await;
    let mut c = sb.client("a").await;
    assert_eq!(wait_placed(&sb, &mut c, 2).await, segments);
    assert!(nodes.iter().map(|n| n.running.node.loaded()).sum::<u64>() >= loaded + 2 * segments as u64, "the copies were not loaded again");
    four_searches_answered_by_the_nodes_as_by_the_writer(&sb, &nodes, &mut c).await;
}

/// A restarted cluster starts from the placement it kept (coordinator state, in its data
/// directory without an arbiter): it knows its copies at once, loads none again, and its first
/// searches go to the query nodes. A copy dropped behind its back meanwhile (a node that
/// restarted too) comes back `missing`, is searched in the cluster and placed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cluster_starts_from_the_placement_it_kept() {
    let (sb, nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    let loaded: Vec<u64> = nodes.iter().map(|n| n.running.node.loaded()).collect();
    assert_eq!(loaded.iter().sum::<u64>(), 2 * segments as u64);
    let asked: Vec<u64> = nodes.iter().map(|n| n.running.node.load_requests()).collect();
    let addr = sb.addr("a").await;
    sb.stop("a").await;
    sb.start_again_at("a", addr).await;
    assert_eq!(sb.placement("a").await.unwrap().copies_per_group(), vec![segments, segments], "the placement was not restored");
    let mut c = sb.client("a").await;
    assert_eq!(wait_placed(&sb, &mut c, 2).await, segments);
    // Drop one copy behind the cluster's back.
    let held = nodes[2].running.node.held();
    let (&(cid, shard), segs) = held.iter().next().unwrap();
    nodes[2].running.node.release(cid, shard, &segs[..1]);
    four_searches_answered_by_the_nodes_as_by_the_writer(&sb, &nodes, &mut c).await;
    // Not even asked: a Load of a copy a node holds is a no-op, but a proxy that knew nothing
    // would have sent one for every copy.
    let now: Vec<u64> = nodes.iter().map(|n| n.running.node.load_requests()).collect();
    assert_eq!(now[..2], asked[..2], "the restarted cluster asked group 0's nodes to load copies they hold");
    assert_eq!(nodes.iter().map(|n| n.running.node.loaded()).collect::<Vec<_>>()[..2], loaded[..2], "copies were loaded again");
    // The dropped copy was searched in the cluster once and is placed again.
    let placement = sb.placement("a").await.unwrap();
    assert!(placement.rerouted.load(Ordering::Relaxed) >= 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes[2].held() != segments {
        assert!(Instant::now() < deadline, "the dropped copy was not placed again: qb1 holds {} of {segments}", nodes[2].held());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(nodes[2].running.node.loaded(), loaded[2] + 1);
}

/// A query node that comes back at its address, empty (a restart): the cluster marked it down
/// when its calls failed, probes it, finds it answering and loads it again; its group's copies
/// are on it once more and it answers searches as the writer would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_node_back_at_its_address_is_probed_and_loaded_again() {
    let (sb, mut nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    let placement = sb.placement("a").await.unwrap();
    let addr = nodes.remove(2).stop().await;
    // Searches go on; group 1's calls fail and its only node is marked down.
    let req = search(vectors(8, DIM, 5), 10);
    let deadline = Instant::now() + Duration::from_secs(30);
    while placement.groups()[1][0].is_up() {
        c.search(req.clone()).await.unwrap();
        assert!(Instant::now() < deadline, "qb1 was never marked down");
    }
    assert_eq!(placement.copies_per_group()[1], 0);
    let back = QueryNode::start_at(&addr.to_string(), "qb1-again").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while back.held() != segments || placement.copies_per_group() != vec![segments, segments] || !placement.groups()[1][0].is_up() {
        assert!(Instant::now() < deadline, "qb1 not loaded again: holds {}, per group {:?}", back.held(), placement.copies_per_group());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = back.searches();
    for _ in 0..4 {
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got, answer_without_query_nodes(&sb, &mut c, req.clone()).await);
    }
    assert!(back.searches() > before, "the node back at its address answers group 1's searches");
}

/// [`cluster_with_query_nodes`], with group 1's only node reached through a [`slow_relay`] of
/// 40 ms; every segment placed.
async fn cluster_with_a_slow_node(steal: bool) -> (Sandbox, [QueryNode; 3], Client) {
    let nodes = [QueryNode::start("qa1").await, QueryNode::start("qa2").await, QueryNode::start("qb1").await];
    let slow = slow_relay(nodes[2].running.addr, Duration::from_millis(40)).await;
    let (sb, mut c) = cluster_over(vec![nodes[0].endpoint(), nodes[1].endpoint(), slow], steal).await;
    wait_placed(&sb, &mut c, 2).await;
    (sb, nodes, c)
}

/// `clients` clients searching one after another for `length`, all at once; the searches done.
async fn search_at_once(sb: &Sandbox, clients: u64, length: Duration) -> u64 {
    let deadline = Instant::now() + length;
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut c = sb.client("a").await;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                c.search(search(vectors(1, DIM, 2000 + i * 1000 + n), 10)).await.expect("a search failed");
                n += 1;
            }
            n
        }));
    }
    let mut searches = 0;
    for t in tasks {
        searches += t.await.unwrap();
    }
    searches
}

/// Long-tail stealing: group 1's only node answers 40 ms late, so a queue forms behind it; the
/// idle copies in group 0 take its turns (counted per node as `stolen`), and every answer is
/// still the writer's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_query_nodes_turns_are_stolen_by_idle_copies_in_another_group() {
    let (sb, nodes, mut c) = cluster_with_a_slow_node(true).await;
    let placement = sb.placement("a").await.unwrap();
    let stolen = |g: usize| placement.groups()[g].iter().map(|n| n.stolen.load(Ordering::Relaxed)).sum::<u64>();
    assert_eq!(stolen(0) + stolen(1), 0, "nothing is stolen before searches run");
    let searches = search_at_once(&sb, 4, Duration::from_secs(2)).await;
    let (took, gave) = (stolen(0), stolen(1));
    eprintln!("{searches} searches; sub-searches stolen by group 0: {took}, by group 1: {gave}; qb1 answered {}", nodes[2].searches());
    assert!(took > 0, "no sub-search of the slow node's turns went to group 0 ({searches} searches)");
    assert!(took > gave, "the slow node stole more ({gave}) than the fast group ({took})");
    // Stolen or not, every answer is the writer's own.
    let req = search(vectors(8, DIM, 11), 10);
    assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, answer_without_query_nodes(&sb, &mut c, req).await);
    assert_eq!(placement.rerouted.load(Ordering::Relaxed), 0, "a slow node is not a failed one");
    // Read again: the search just above may have had its straggler taken over mid-search.
    let now = stolen(0) + stolen(1);
    let info = c.get_cluster_info(pb::GetClusterInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.query_nodes.iter().map(|q| q.stolen).sum::<u64>(), now, "GetClusterInfo reports the per-node counts");
}

/// The reliable segment list: the proxy routes from each shard's own list of segments at the
/// read, so a stale cache of copies is corrected both ways. Copies a node dropped behind the
/// proxy's back come back `missing`: they are searched in the cluster at the same snapshot,
/// forgotten, and placed again. Segments sealed since the last placement round (not in the
/// cache yet) are searched in the cluster. Every answer is the writer's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cache_of_copies_is_corrected_from_the_shards_own_segment_list() {
    let (sb, nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    let placement = sb.placement("a").await.unwrap();
    // qb1, group 1's only node, drops its copies without telling the proxy: one shard as a
    // whole (as a node that restarted), the other's segments one by one (the shard stays).
    let held = nodes[2].running.node.held();
    assert_eq!(held.len(), 2, "qb1 holds copies of both shards");
    for (i, (&(cid, shard), segs)) in held.iter().enumerate() {
        nodes[2].running.node.release(cid, shard, if i == 0 { &[] } else { segs });
    }
    assert_eq!(nodes[2].held(), 0);
    let req = search(vectors(8, DIM, 21), 10);
    for _ in 0..4 {
        // Two searches are enough for group 1 to have had a turn.
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got, answer_without_query_nodes(&sb, &mut c, req.clone()).await);
    }
    assert!(placement.rerouted.load(Ordering::Relaxed) > 0, "the copies qb1 dropped were not reported missing");
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes[2].held() != segments || placement.copies_per_group() != vec![segments, segments] {
        assert!(Instant::now() < deadline, "qb1's dropped copies not placed again: holds {} of {segments}", nodes[2].held());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // New rows, sealed by the flush, searched before any placement round could copy them.
    let rerouted = placement.rerouted.load(Ordering::Relaxed);
    let v = vectors(600, DIM, 6);
    let payloads = (0..600).map(|i| payload(&[("n", int(1800 + i))])).collect();
    c.insert(pb::InsertRequest { ack: 0, collection: COLL.into(), ids: (1800..2400).collect(), vectors: v.clone(), payloads })
        .await
        .unwrap();
    c.flush(pb::FlushRequest { collection: COLL.into() }).await.unwrap();
    for id in [1800i64, 2000, 2399] {
        let own = v[(id as usize - 1800) * DIM..(id as usize - 1799) * DIM].to_vec();
        let got = c.search(search(own, 1)).await.unwrap().into_inner().results;
        assert_eq!(got[0].hits.iter().map(|h| h.id).collect::<Vec<_>>(), [id], "a row sealed since the last placement round was missed");
    }
    let req = search(vectors(8, DIM, 22), 20);
    assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, answer_without_query_nodes(&sb, &mut c, req).await);
    // Unplaced segments are not a node's failure: nothing was rerouted for them.
    assert_eq!(placement.rerouted.load(Ordering::Relaxed), rerouted);
}

/// Long-tail stealing mid-search (MEP 23): searches come one at a time, so group 1's slow node
/// is idle whenever its turn comes and keeps it when the sub-search is sent. Its sub-searches then
/// straggle behind the fast nodes' usual answer time, and the idle copies in group 0 are asked
/// for the same segments at the same snapshot and answer first. Every answer is still the
/// writer's own, and nothing is counted as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_straggling_sub_search_is_answered_by_idle_copies_in_another_group() {
    let (sb, nodes, mut c) = cluster_with_a_slow_node(true).await;
    let placement = sb.placement("a").await.unwrap();
    let stolen = |g: usize| placement.groups()[g].iter().map(|n| n.stolen.load(Ordering::Relaxed)).sum::<u64>();
    for seed in 0..12 {
        let req = search(vectors(4, DIM, 300 + seed), 10);
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got, answer_without_query_nodes(&sb, &mut c, req).await, "search {seed}");
    }
    let mid = placement.stolen_mid_search.load(Ordering::Relaxed);
    eprintln!(
        "straggling sub-searches taken over: {mid}; stolen by group 0: {}, by group 1: {}; qb1 answered {}",
        stolen(0),
        stolen(1),
        nodes[2].searches()
    );
    assert!(mid > 0, "no straggling sub-search of the slow node was taken over");
    assert!(stolen(0) >= mid, "group 0's copies took them ({} counted)", stolen(0));
    assert_eq!(placement.rerouted.load(Ordering::Relaxed), 0, "a straggler is not a failed node");
}

/// `query_nodes.steal = false`: the slow node keeps every one of its turns, and nothing is stolen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_stealing_off_a_slow_node_keeps_its_turns() {
    let (sb, nodes, _c) = cluster_with_a_slow_node(false).await;
    let placement = sb.placement("a").await.unwrap();
    let searches = search_at_once(&sb, 4, Duration::from_secs(1)).await;
    let stolen: u64 = placement.groups().iter().flatten().map(|n| n.stolen.load(Ordering::Relaxed)).sum();
    assert_eq!(stolen, 0, "{searches} searches with stealing off");
    assert_eq!(placement.stolen_mid_search.load(Ordering::Relaxed), 0, "a straggler was taken over with stealing off");
    // Group 1's turns (a sub-search per shard each) all went to the slow node.
    assert!(nodes[2].searches() > 0, "the slow node lost its turns with stealing off");
}

/// Rebalancing: a node that was lost comes back at its address, empty, while its group's other
/// node holds every copy; the placement loop moves copies to it until the two differ by one at
/// most, and searches keep the writer's answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_in_its_group_gets_its_share_of_copies_again() {
    let (sb, mut nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    let placement = sb.placement("a").await.unwrap();
    let addr = nodes.remove(0).stop().await;
    // Searches mark qa1 down; qa2 then gets all of group 0's copies.
    let req = search(vectors(8, DIM, 31), 10);
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes[0].held() != segments || placement.copies_per_group() != vec![segments, segments] {
        c.search(req.clone()).await.unwrap();
        assert!(Instant::now() < deadline, "qa2 did not take group 0's copies: holds {} of {segments}", nodes[0].held());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = QueryNode::start_at(&addr.to_string(), "qa1-again").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (a, b) = (back.held(), nodes[0].held());
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got, answer_without_query_nodes(&sb, &mut c, req.clone()).await, "an answer changed while copies moved");
        if a + b == segments && a.abs_diff(b) <= 1 && placement.copies_per_group() == vec![segments, segments] {
            break;
        }
        assert!(Instant::now() < deadline, "group 0 not rebalanced: qa1 holds {a}, qa2 {b} of {segments}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let info = c.get_cluster_info(pb::GetClusterInfoRequest {}).await.unwrap().into_inner();
    let group0: Vec<u64> = info.query_nodes.iter().filter(|q| q.group == 0).map(|q| q.segments).collect();
    assert_eq!(group0.iter().sum::<u64>(), segments as u64);
    assert!(group0.iter().all(|&n| n > 0), "copies per node of group 0: {group0:?}");
}

/// `a` leads (no query nodes); `b` follows it through `builder`'s transport with two query nodes,
/// one per group. 1800 rows are inserted on `a` and flushed; returns once `b` has them and its
/// own sealed segments (b seals and indexes what it applies) have a copy in both groups.
async fn alternative_with_query_nodes(builder: SandboxBuilder) -> (Sandbox, Vec<QueryNode>, Client, Client, usize) {
    let nodes = vec![QueryNode::start("qalt1").await, QueryNode::start("qalt2").await];
    let groups = vec![vec![nodes[0].endpoint()], vec![nodes[1].endpoint()]];
    let sb = builder
        .cluster_with("a", |c| c.segment.seal_rows = 300)
        .alternative_with("b", "a", move |c| {
            c.segment.seal_rows = 300;
            c.query_nodes.groups = groups.clone();
            // Every node must answer (checked below); see cluster_with_query_nodes.
            c.query_nodes.steal = false;
        })
        .build()
        .await;
    sb.wait_role("a", pb::Role::Leading, Duration::from_secs(60)).await;
    sb.wait_role("b", pb::Role::Alternative, Duration::from_secs(60)).await;
    let mut ca = sb.client("a").await;
    ca.create_collection(pb::CreateCollectionRequest {
        schema: Some(schema(COLL, DIM as u32, pb::Metric::L2, hnsw(16, 64), 2, vec![field("n", pb::ScalarType::Int64)])),
    })
    .await
    .unwrap();
    let payloads = (0..1800).map(|i| payload(&[("n", int(i))])).collect();
    let insert = pb::InsertRequest { ack: 0, collection: COLL.into(), ids: (0..1800).collect(), vectors: vectors(1800, DIM, 5), payloads };
    ca.insert(insert).await.unwrap();
    ca.flush(pb::FlushRequest { collection: COLL.into() }).await.unwrap();
    let mut cb = sb.client("b").await;
    converge(&mut ca, &mut cb, COLL, Duration::from_secs(60)).await;
    let segments = wait_placed_on(&sb, "b", &mut cb, 2).await;
    assert!(segments >= 4, "expected b to seal segments on both shards, got {segments}");
    assert_eq!((nodes[0].held(), nodes[1].held()), (segments, segments));
    (sb, nodes, ca, cb, segments)
}

/// Deletes and upserts on `lead` of rows the query nodes hold copies of: a STRONG read on
/// `read` (the cluster with the query nodes) sees them at once, through the query nodes, and
/// answers as its own process would.
async fn leaders_changes_reach_the_copies(sb: &Sandbox, nodes: &[QueryNode], lead: &mut Client, read: (&str, &mut Client), salt: i64) {
    let (name, c) = read;
    let placement = sb.placement(name).await.unwrap();
    let v = vectors(1800, DIM, 5);
    let deleted: Vec<i64> = (salt..900).step_by(13).collect();
    lead.delete(pb::DeleteRequest { ack: 0, collection: COLL.into(), ids: deleted.clone(), filter: String::new() }).await.unwrap();
    let moved: Vec<i64> = (salt + 1..900).step_by(17).collect();
    let far: Vec<f32> = moved.iter().flat_map(|_| vec![50.0f32; DIM]).collect();
    lead.upsert(pb::UpsertRequest { ack: 0, collection: COLL.into(), ids: moved.clone(), vectors: far, payloads: vec![] }).await.unwrap();
    let before = nodes.iter().map(QueryNode::searches).sum::<u64>();
    for id in deleted.iter().chain(&moved).take(40) {
        let own = v[*id as usize * DIM..(*id as usize + 1) * DIM].to_vec();
        let got = c.search(search(own, 3)).await.unwrap().into_inner().results;
        let ids: Vec<i64> = got[0].hits.iter().map(|h| h.id).collect();
        assert!(!ids.contains(id), "row {id} was deleted or moved away on the leader but a STRONG search on {name} found it: {ids:?}");
    }
    assert!(nodes.iter().map(QueryNode::searches).sum::<u64>() >= before + 40, "the reads did not go to {name}'s query nodes");
    let req = search(vectors(8, DIM, 7), 20);
    assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, sb.answer_in_process(name, c, req).await);
    assert_eq!(placement.rerouted.load(Ordering::Relaxed), 0, "{name} searched parts of its query nodes' share itself");
}

/// An alternative cluster that is itself multi-node (issue 19): its query nodes load its own
/// sealed segments and follow its own log, so a read on the alternative at any level is served
/// from the copies with every change of the leader's it covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alternative_serves_from_its_own_query_nodes_with_the_leaders_changes() {
    let (sb, nodes, mut ca, mut cb, _) = alternative_with_query_nodes(Sandbox::builder()).await;
    let req = search(vectors(8, DIM, 99), 10);
    for _ in 0..4 {
        let got = cb.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got, sb.answer_in_process("b", &mut cb, req.clone()).await);
    }
    assert!(nodes.iter().all(|n| n.searches() > 0), "searches per node: {:?}", nodes.iter().map(QueryNode::searches).collect::<Vec<_>>());
    leaders_changes_reach_the_copies(&sb, &nodes, &mut ca, ("b", &mut cb), 0).await;
    // A SESSION read with the token of a write on the leader, as the gateway sends it.
    let token = ca
        .delete(pb::DeleteRequest { ack: 0, collection: COLL.into(), ids: vec![1001], filter: String::new() })
        .await
        .unwrap()
        .into_inner()
        .session_token;
    let own = vectors(1800, DIM, 5)[1001 * DIM..1002 * DIM].to_vec();
    let got = cb.search(pb::SearchRequest { read: read(pb::ConsistencyLevel::Session, &token), ..search(own, 3) }).await.unwrap();
    assert!(got.into_inner().results[0].hits.iter().all(|h| h.id != 1001), "a SESSION read on b missed the write its token names");
}

/// A promoted alternative keeps its query nodes: they follow its log by the log's own
/// positions, which go on unchanged when it starts to lead (stream positions start a new term),
/// so no copy is loaded again and the new leader's own writes reach them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_alternative_keeps_its_query_nodes_and_their_copies() {
    let broker = tandem_harness::Tansu::start(false);
    let builder = Sandbox::builder().transport(Backend::Kafka { brokers: broker.brokers() }).ha();
    let (sb, nodes, mut ca, mut cb, _) = alternative_with_query_nodes(builder).await;
    leaders_changes_reach_the_copies(&sb, &nodes, &mut ca, ("b", &mut cb), 0).await;
    let held: Vec<_> = nodes.iter().map(|n| n.running.node.held()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    sb.node("a").await.switchover("b", deadline).await.unwrap();
    sb.wait_role("b", pb::Role::Leading, Duration::from_secs(60)).await;
    let mut cb2 = sb.client("b").await;
    leaders_changes_reach_the_copies(&sb, &nodes, &mut cb, ("b", &mut cb2), 2).await;
    assert_eq!(nodes.iter().map(|n| n.running.node.held()).collect::<Vec<_>>(), held, "copies were loaded again after the promotion");
}

/// Per node: (shard, where its growing rows begin, how many) for each shard it leads.
fn led_shards(node: &QueryNode) -> Vec<(u32, u64, u64)> {
    let mut led: Vec<_> =
        (node.running.node.status().shards.into_iter()).filter_map(|s| s.growing_from.map(|p| (s.shard, p.lsn, s.growing_rows))).collect();
    led.sort_unstable();
    led
}

/// Waits until every node of `nodes` leads both shards holding at least `rows` growing rows in
/// all (one node per group leads every shard of its group).
async fn wait_led(nodes: &[QueryNode], rows: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let led: Vec<_> = nodes.iter().map(led_shards).collect();
        if led.iter().all(|l| l.len() == 2 && l.iter().map(|s| s.2).sum::<u64>() >= rows) {
            return;
        }
        assert!(Instant::now() < deadline, "the nodes do not lead both shards with {rows} growing rows: {led:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shard leaders (issue 19, seeds: the streaming replica): in each group one node leads each
/// shard. It follows the shard's stream and keeps the rows the writer has not sealed, and
/// searches them, so the writer searches no row. Deletes and upserts of growing rows reach the
/// leaders before they answer at a read's ts. A seal moves rows from the leaders' growing rows
/// to sealed copies, and the leaders drop them. A leader that fails leaves its rows to be
/// searched in the writer, and no search fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_rows_are_searched_on_the_shard_leaders_of_each_group() {
    let (sb, nodes, mut c, segments) = two_groups_of_one(|c| c.query_nodes.steal = false).await;
    let placement = sb.placement("a").await.unwrap();
    // 200 rows that stay growing (300 seal a segment; the 2 shards take about 100 each).
    let fresh = vectors(200, DIM, 77);
    let ids: Vec<i64> = (5000..5200).collect();
    let payloads = ids.iter().map(|&i| payload(&[("n", int(i))])).collect();
    c.insert(pb::InsertRequest { ack: 0, collection: COLL.into(), ids: ids.clone(), vectors: fresh.clone(), payloads }).await.unwrap();
    wait_led(&nodes, 200).await;
    let led = |n: usize| placement.groups()[n][0].led.load(Ordering::Relaxed);

    // Each growing row is found by its own vector, as the writer alone finds it; the groups'
    // leaders take turns, and the writer searched no growing row.
    for (i, id) in ids.iter().enumerate().step_by(20) {
        let req = search(fresh[i * DIM..(i + 1) * DIM].to_vec(), 3);
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got[0].hits[0].id, *id, "growing row {id} not found first");
        assert_eq!(got, answer_without_query_nodes(&sb, &mut c, req).await);
    }
    assert!(led(0) > 0 && led(1) > 0, "both groups' leaders search growing rows: {} and {}", led(0), led(1));
    assert_eq!(placement.growing_here.load(Ordering::Relaxed), 0, "growing rows were searched in the writer");
    let info = c.get_cluster_info(pb::GetClusterInfoRequest {}).await.unwrap().into_inner();
    let listed: Vec<(u32, u64)> = info.query_nodes.iter().map(|q| (q.shards_led, q.growing_searches)).collect();
    assert_eq!(listed, [(2, led(0)), (2, led(1))], "GetClusterInfo lists the shards each node leads");
    let named: Vec<Vec<(&str, u32)>> =
        info.query_nodes.iter().map(|q| q.led_shards.iter().map(|l| (l.collection.as_str(), l.shard)).collect()).collect();
    assert_eq!(named, [[(COLL, 0), (COLL, 1)], [(COLL, 0), (COLL, 1)]], "GetClusterInfo names the shards each node leads");

    // Deletes and upserts of growing rows: a STRONG read right after finds neither.
    let deleted: Vec<i64> = ids.iter().copied().step_by(7).collect();
    c.delete(pb::DeleteRequest { ack: 0, collection: COLL.into(), ids: deleted.clone(), filter: String::new() }).await.unwrap();
    let moved: Vec<i64> = ids.iter().copied().skip(3).step_by(11).collect();
    let far: Vec<f32> = moved.iter().flat_map(|_| vec![50.0f32; DIM]).collect();
    c.upsert(pb::UpsertRequest { ack: 0, collection: COLL.into(), ids: moved.clone(), vectors: far, payloads: vec![] }).await.unwrap();
    for id in deleted.iter().chain(&moved) {
        let i = (*id - 5000) as usize;
        let got = c.search(search(fresh[i * DIM..(i + 1) * DIM].to_vec(), 3)).await.unwrap().into_inner().results;
        let found: Vec<i64> = got[0].hits.iter().map(|h| h.id).collect();
        assert!(!found.contains(id), "growing row {id} was deleted or moved away but a STRONG search found it: {found:?}");
    }
    let req = search(vectors(8, DIM, 7), 20);
    assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, answer_without_query_nodes(&sb, &mut c, req.clone()).await);
    assert_eq!(placement.growing_here.load(Ordering::Relaxed), 0, "growing rows were searched in the writer");

    // A flush seals the growing rows: the copies take them over and the leaders let them go.
    c.flush(pb::FlushRequest { collection: COLL.into() }).await.unwrap();
    let sealed = wait_placed(&sb, &mut c, 2).await;
    assert!(sealed > segments, "the flush sealed no segment: {sealed} against {segments}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.iter().flat_map(led_shards).map(|s| s.2).sum::<u64>() > 0 {
        assert!(Instant::now() < deadline, "the leaders kept sealed rows: {:?}", nodes.iter().map(led_shards).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, answer_without_query_nodes(&sb, &mut c, req.clone()).await);

    // New growing rows, then group 1's node stops: the searches whose turn is group 1's find
    // its leader gone, and the writer searches those rows, at the same snapshot.
    let more = vectors(40, DIM, 78);
    let more_ids: Vec<i64> = (6000..6040).collect();
    c.insert(pb::InsertRequest { ack: 0, collection: COLL.into(), ids: more_ids.clone(), vectors: more.clone(), payloads: vec![] })
        .await
        .unwrap();
    wait_led(&nodes, 40).await;
    let [_qa1, qb1] = nodes;
    qb1.stop().await;
    for (i, id) in more_ids.iter().enumerate().step_by(5) {
        let req = search(more[i * DIM..(i + 1) * DIM].to_vec(), 3);
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got[0].hits[0].id, *id, "growing row {id} not found first with a leader gone");
        assert_eq!(got, answer_without_query_nodes(&sb, &mut c, req).await);
    }
    assert!(placement.growing_here.load(Ordering::Relaxed) > 0, "the lost leader's growing rows were not searched in the writer");
    assert!(!placement.groups()[1][0].is_up(), "the lost leader is marked down");
}

/// Query nodes that enter a replica group themselves (`tandem query-node --join`): a node
/// joining a group whose one listed node holds every copy gets its share (a rebalance), answers
/// that group's searches, and is listed by GetClusterInfo. A join naming a group the cluster
/// lacks, a node of another group, or no URL is refused naming the value, and changes nothing;
/// a node started to join a group the cluster lacks stops. The joined node is kept in the
/// coordinator state: a restarted cluster knows it and its copies at once, and loads none again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_node_that_joins_a_group_gets_its_share_and_is_kept_across_a_restart() {
    use tandem_proto::cluster::v1 as qn;
    let listed = [QueryNode::start("qa1").await, QueryNode::start("qb1").await];
    let groups = vec![vec![listed[0].endpoint()], vec![listed[1].endpoint()]];
    let (sb, mut c) = cluster_of_groups(groups, |c| c.query_nodes.steal = false).await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    assert!(segments >= 4, "{segments} segments");
    let cluster = format!("http://{}", sb.addr("a").await);
    let joined = QueryNode::start_joining("qa2", &cluster, 0, "").await.unwrap();
    let placement = sb.placement("a").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (a, b) = (listed[0].held(), joined.held());
        if placement.groups()[0].len() == 2
            && a + b == segments
            && a.abs_diff(b) <= 1
            && placement.copies_per_group() == [segments, segments]
        {
            break;
        }
        assert!(Instant::now() < deadline, "group 0 not evened out: qa1 holds {a}, qa2 {b} of {segments}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for seed in 0..4 {
        let req = search(vectors(8, DIM, 500 + seed), 10);
        assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, answer_without_query_nodes(&sb, &mut c, req).await);
    }
    assert!(joined.searches() > 0, "the joined node answers none of its group's searches");
    let info = c.get_cluster_info(pb::GetClusterInfoRequest {}).await.unwrap().into_inner();
    let nodes: Vec<(u32, String, bool)> = info.query_nodes.iter().map(|q| (q.group, q.endpoint.clone(), q.joined)).collect();
    assert_eq!(nodes, [(0, listed[0].endpoint(), false), (0, joined.endpoint(), true), (1, listed[1].endpoint(), false)]);

    // Refused, naming the value; nothing changes.
    let mut coordinator = qn::coordinator_client::CoordinatorClient::connect(cluster.clone()).await.unwrap();
    for (endpoint, group, why) in [
        (joined.endpoint(), 5, "group 5 is not a replica group of this cluster: it has 2"),
        (listed[1].endpoint(), 0, "is in group 1 already and cannot join group 0"),
        ("10.0.0.9:19540".to_string(), 0, "\"10.0.0.9:19540\" is not a URL"),
    ] {
        let e = coordinator.join(qn::JoinRequest { endpoint, group }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(why), "{}", e.message());
    }
    let again = coordinator.join(qn::JoinRequest { endpoint: joined.endpoint(), group: 0 }).await.unwrap().into_inner();
    assert!(!again.added, "a node in its group already is added again");
    let e = QueryNode::start_joining("qx", &cluster, 7, "").await.err().expect("a node joining group 7 of 2 started");
    assert!(e.to_string().contains("group 7"), "{e}");
    // The command the same way: it exits 1 naming the group (and 2 for --group without --join).
    let scratch = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        let scratch = scratch.path().to_path_buf();
        async move {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
            cmd.args(["query-node", "--listen", "127.0.0.1:0", "--scratch-dir"]).arg(scratch).args(args);
            cmd.output().await.unwrap()
        }
    };
    let out = run(vec!["--join".into(), cluster.clone(), "--group".into(), "7".into()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("group 7 is not a replica group of this cluster"), "{stderr}");
    let out = run(vec!["--group".into(), "1".into()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(placement.groups().iter().map(Vec::len).collect::<Vec<_>>(), [2, 1], "a refused join changed the groups");

    // Restarted at its address: the joined node and its copies are known at once.
    let asked = joined.running.node.load_requests();
    let addr = sb.addr("a").await;
    sb.stop("a").await;
    sb.start_again_at("a", addr).await;
    let placement = sb.placement("a").await.unwrap();
    assert_eq!(placement.copies_per_group(), vec![segments, segments], "the joined node's copies were not restored");
    let mut c = sb.client("a").await;
    for seed in 0..4 {
        let req = search(vectors(8, DIM, 600 + seed), 10);
        assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, answer_without_query_nodes(&sb, &mut c, req).await);
    }
    assert_eq!(joined.running.node.load_requests(), asked, "the restarted cluster asked the joined node to load copies it holds");
}
