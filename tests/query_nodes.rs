//! A cluster with query nodes (issue 19's first part; cluster/src/placement.rs,
//! cluster/src/query_node.rs): sealed segments are copied to query nodes in every replica group
//! and searched there, with the writer's deletes and upserts applied at the read's snapshot, and
//! a lost query node costs no search.

mod sandbox;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sandbox::*;
use tandem_cluster::fanout::LocalFanout;
use tandem_cluster::query_node::{QueryNodeOptions, RunningQueryNode, serve};
use tandem_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

const COLL: &str = "docs";
const DIM: usize = 16;

struct QueryNode {
    running: RunningQueryNode,
    stop: CancellationToken,
    _scratch: tempfile::TempDir,
}

impl QueryNode {
    async fn start(name: &str) -> QueryNode {
        QueryNode::start_at("127.0.0.1:0", name).await
    }

    async fn start_at(listen: &str, name: &str) -> QueryNode {
        let scratch = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let opts = QueryNodeOptions { name: name.into(), scratch_dir: scratch.path().to_path_buf(), search_threads: 1 };
        let running = serve(listen, opts, stop.clone()).await.unwrap();
        QueryNode { running, stop, _scratch: scratch }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.running.addr)
    }

    fn searches(&self) -> u64 {
        self.running.node.searches()
    }

    /// Segments held, over every shard.
    fn held(&self) -> usize {
        self.running.node.held().values().map(Vec::len).sum()
    }
}

/// A cluster `a` (300 rows per sealed segment, HNSW, 2 shards) whose query nodes are two groups:
/// `nodes[0]` and `nodes[1]` make group 0, `nodes[2]` group 1. 1800 rows inserted and flushed.
async fn cluster_with_query_nodes() -> (Sandbox, Vec<QueryNode>, Client) {
    let nodes = vec![QueryNode::start("qa1").await, QueryNode::start("qa2").await, QueryNode::start("qb1").await];
    let groups = vec![vec![nodes[0].endpoint(), nodes[1].endpoint()], vec![nodes[2].endpoint()]];
    let sb = Sandbox::builder()
        .cluster_with("a", move |c| {
            c.segment.seal_rows = 300;
            c.query_nodes.groups = groups.clone();
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
    (sb, nodes, c)
}

/// Sealed segments of the collection with their index built, as DescribeCollection lists them.
async fn indexed_segments(c: &mut Client) -> usize {
    let info = c.describe_collection(pb::DescribeCollectionRequest { name: COLL.into() }).await.unwrap().into_inner().collection.unwrap();
    info.segments.iter().filter(|s| s.state == pb::segment_info::State::Indexed as i32).count()
}

/// Waits until every indexed segment has a copy in every group.
async fn wait_placed(sb: &Sandbox, c: &mut Client, groups: usize) -> usize {
    let placement = sb.placement("a").await.expect("a has query nodes");
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
    let node = sb.node("a").await;
    let placement = sb.placement("a").await.unwrap();
    node.set_fanout(Arc::new(LocalFanout::default()));
    let r = c.search(req).await.map(|r| r.into_inner().results);
    node.set_fanout(placement);
    r.unwrap()
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
    let v = vectors(1800, DIM, 5);
    let deleted: Vec<i64> = (0..600).step_by(7).collect();
    c.delete(pb::DeleteRequest { ack: 0, collection: COLL.into(), ids: deleted.clone(), filter: String::new() }).await.unwrap();
    let moved: Vec<i64> = (1..600).step_by(11).collect();
    let far: Vec<f32> = moved.iter().flat_map(|_| vec![50.0f32; DIM]).collect();
    c.upsert(pb::UpsertRequest { ack: 0, collection: COLL.into(), ids: moved.clone(), vectors: far, payloads: vec![] }).await.unwrap();
    let before = nodes.iter().map(QueryNode::searches).sum::<u64>();
    for id in deleted.iter().chain(&moved).take(40) {
        let own = v[*id as usize * DIM..(*id as usize + 1) * DIM].to_vec();
        let got = c.search(search(own, 3)).await.unwrap().into_inner().results;
        let ids: Vec<i64> = got[0].hits.iter().map(|h| h.id).collect();
        assert!(!ids.contains(id), "row {id} was deleted or moved away but a search for its old vector found it: {ids:?}");
    }
    assert!(nodes.iter().map(QueryNode::searches).sum::<u64>() > before, "the reads did not go to the query nodes");
    let req = search(vectors(8, DIM, 7), 20);
    assert_eq!(c.search(req.clone()).await.unwrap().into_inner().results, answer_without_query_nodes(&sb, &mut c, req).await);
    assert_eq!(placement.rerouted.load(Ordering::Relaxed), 0);
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
    let lost = nodes.remove(0);
    lost.stop.cancel();
    let _ = lost.running.task.await;

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

/// A restarted cluster (a new address) stops without waiting on the query nodes' streams, and
/// its query nodes drop what they held of the old one and load from the new one: answers come
/// from them again, none is answered by the cluster itself for want of a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cluster_loads_its_query_nodes_again() {
    let (sb, nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    sb.restart("a").await;
    let mut c = sb.client("a").await;
    assert_eq!(wait_placed(&sb, &mut c, 2).await, segments);
    let before = nodes.iter().map(QueryNode::searches).sum::<u64>();
    let req = search(vectors(8, DIM, 11), 10);
    for _ in 0..4 {
        let got = c.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(got, answer_without_query_nodes(&sb, &mut c, req.clone()).await);
    }
    assert!(nodes.iter().map(QueryNode::searches).sum::<u64>() >= before + 4);
    assert_eq!(sb.placement("a").await.unwrap().rerouted.load(Ordering::Relaxed), 0);
}

/// A query node that comes back at its address, empty (a restart): the cluster marked it down
/// when its calls failed, probes it, finds it answering and loads it again; its group's copies
/// are on it once more and it answers searches as the writer would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_node_back_at_its_address_is_probed_and_loaded_again() {
    let (sb, mut nodes, mut c) = cluster_with_query_nodes().await;
    let segments = wait_placed(&sb, &mut c, 2).await;
    let placement = sb.placement("a").await.unwrap();
    let addr = nodes[2].running.addr;
    let gone = nodes.remove(2);
    gone.stop.cancel();
    let _ = gone.running.task.await;
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
