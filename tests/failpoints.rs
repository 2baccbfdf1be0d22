//! Failure injection on the paths luck does not reach (`tandem_cluster::failpoint`), each with
//! the invariant it protects. Its own binary, built with the `failpoints` feature:
//! `cargo test --features failpoints --test failpoints`. The points are process-wide, so each
//! test holds a `fail::FailScenario` (one at a time; every point cleared at its end).

mod sandbox;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sandbox::*;
use tandem_cluster::failpoint::hits;
use tandem_proto::v1 as pb;

const C: &str = "docs";
const CONVERGE: Duration = Duration::from_secs(90);

async fn create(c: &mut Client, dim: u32, shards: u32) {
    c.create_collection(pb::CreateCollectionRequest { schema: Some(schema(C, dim, pb::Metric::L2, None, shards, vec![])) })
        .await
        .expect("create the collection");
}

async fn insert(c: &mut Client, ids: std::ops::Range<i64>, dim: usize) -> Result<pb::MutationResponse, tonic::Status> {
    let n = (ids.end - ids.start) as usize;
    let vectors = vectors(n, dim, ids.start as u64 + 1);
    let mut req = tonic::Request::new(pb::InsertRequest { ack: 0, collection: C.into(), ids: ids.collect(), vectors, payloads: vec![] });
    req.set_timeout(Duration::from_secs(20));
    c.insert(req).await.map(|r| r.into_inner())
}

/// Waits until `alt` holds exactly what `lead` holds.
async fn converge(lead: &mut Client, alt: &mut Client) {
    sandbox::converge(lead, alt, C, CONVERGE).await
}

/// Leader `a` and alternatives `b` and `c` under the sandbox's arbiter, over Kafka, with the
/// collection (`shards` shards) created and both alternatives serving; with `c_promotable`
/// false, `b` is the only candidate.
async fn three_on_kafka(broker: &tandem_harness::Tansu, shards: u32, c_promotable: bool) -> (Sandbox, Client) {
    let sb = Sandbox::builder()
        .transport(Backend::Kafka { brokers: broker.brokers() })
        .ha()
        .leading("a")
        .alternative("b", "a")
        .alternative_with("c", "a", move |c| c.ha.promotable = c_promotable)
        .build()
        .await;
    let limit = Duration::from_secs(60);
    sb.wait_role("a", pb::Role::Leading, limit).await;
    let mut a = sb.client("a").await;
    create(&mut a, 8, shards).await;
    for n in ["b", "c"] {
        sb.wait_role(n, pb::Role::Alternative, limit).await;
    }
    (sb, a)
}

/// A failed fsync: the write it was for is not acknowledged, the log takes nothing more (after
/// a failed fsync the kernel may have dropped the pages, so a retry could "succeed" without
/// the data on disk), the error says what happened, and after a restart every write
/// acknowledged before is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_acknowledges_nothing_and_loses_nothing_acknowledged() {
    let scenario = fail::FailScenario::setup();
    let sb = Sandbox::builder().cluster_with("a", |c| c.wal.sync = tandem_cluster::config::WalSync::Always).build().await;
    let mut c = sb.client("a").await;
    create(&mut c, 8, 2).await;
    insert(&mut c, 0..100, 8).await.expect("writes before the fault");

    let before = hits("wal::fsync");
    fail::cfg("wal::fsync", "return").unwrap();
    let e = insert(&mut c, 100..110, 8).await.expect_err("a write whose fsync failed was acknowledged");
    assert!(hits("wal::fsync") > before, "the fault never happened");
    assert!(e.message().contains("fsync"), "the error does not say what failed: {e:?}");
    fail::remove("wal::fsync");
    let e = insert(&mut c, 110..120, 8).await.expect_err("a log that failed an fsync took another write");
    assert!(!e.message().is_empty(), "{e:?}");

    sb.restart("a").await;
    let mut c = sb.client("a").await;
    assert_eq!(missing(&mut c, C, &(0..100).collect::<Vec<_>>()).await, 0, "acknowledged writes were lost");
    assert_eq!(missing(&mut c, C, &(110..120).collect::<Vec<_>>()).await, 10, "a refused write appeared");
    insert(&mut c, 200..210, 8).await.expect("writes again after the restart");
    scenario.teardown();
}

/// The publisher's publish fails (`before`: nothing sent; `after`: the broker took the batch
/// and the publisher does not know it): writes wait for their export and are acknowledged
/// once it succeeds, and the alternative ends with exactly the leader's rows (no batch lost,
/// none applied twice).
async fn publish_failure(mode: &str) {
    let scenario = fail::FailScenario::setup();
    let broker = tandem_harness::Tansu::start(false);
    let sb = Sandbox::builder().transport(Backend::Kafka { brokers: broker.brokers() }).leading("a").alternative("b", "a").build().await;
    let mut a = sb.client("a").await;
    create(&mut a, 8, 2).await;
    insert(&mut a, 0..50, 8).await.unwrap();

    let before = hits("publisher::publish");
    fail::cfg("publisher::publish", &format!("4*return({mode})")).unwrap();
    for b in 1..10 {
        insert(&mut a, b * 50..(b + 1) * 50, 8).await.expect("a write is acknowledged once its export succeeds");
    }
    assert_eq!(hits("publisher::publish") - before, 4, "the fault did not happen as configured");
    fail::remove("publisher::publish");
    let mut b = sb.client("b").await;
    converge(&mut a, &mut b).await;
    assert_eq!(count(&mut b, C).await, 500);
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_fails_before_sending_loses_nothing() {
    publish_failure("before").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_fails_after_the_broker_took_it_duplicates_nothing() {
    publish_failure("after").await;
}

/// A snapshot cut off with part of its rows loaded: the alternative starts the shard over and
/// ends with exactly the leader's rows, nothing left from the broken attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_snapshot_leaves_no_divergence() {
    let scenario = fail::FailScenario::setup();
    // Small WAL files and segments: once flushed, the log no longer starts at 1, so a new
    // alternative must bootstrap from a snapshot.
    let mut sb = Sandbox::builder()
        .cluster_with("lead", |c| {
            c.wal.file_mib = 1;
            c.segment.seal_rows = 1000;
        })
        .build()
        .await;
    let mut l = sb.client("lead").await;
    create(&mut l, 64, 2).await;
    for b in 0..24 {
        insert(&mut l, b * 500..(b + 1) * 500, 64).await.unwrap();
    }
    l.flush(pb::FlushRequest { collection: C.into() }).await.unwrap();
    l.delete(pb::DeleteRequest { ack: 0, collection: C.into(), ids: (0..12_000).step_by(7).collect(), filter: String::new() })
        .await
        .unwrap();
    let coll = sb.node("lead").await.collection(C).unwrap();
    assert!(coll.shards().iter().all(|s| s.first_lsn() > 1), "precondition: the leader's WAL was truncated");

    // The first segment (with its index, in the manifest) or rows chunk of the first shard is
    // loaded, then the stream breaks.
    fail::cfg("follower::snapshot_chunk", "1*return").unwrap();
    sb.add_alternative("alt", "lead").await;
    let mut a = sb.client("alt").await;
    converge(&mut l, &mut a).await;
    assert_eq!(hits("follower::snapshot_chunk"), 1, "the snapshot was never interrupted");
    let f = sb.follower("alt").await;
    assert!(f.bootstraps.load(Ordering::Relaxed) >= 2, "both shards came from a snapshot in the end");
    assert!(f.segments_loaded.load(Ordering::Relaxed) >= 2, "the flushed segments came with their index");
    scenario.teardown();
}

/// Applying fails on the alternative. Retryable: it retries and converges. Not retryable: the
/// shard halts with the reason shown, and reads that need what it lacks fail rather than
/// answer from diverged data; nothing is skipped behind the operator's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_apply_retries_or_halts_but_never_diverges() {
    let scenario = fail::FailScenario::setup();
    let broker = tandem_harness::Tansu::start(false);
    let sb = Sandbox::builder()
        .transport(Backend::Kafka { brokers: broker.brokers() })
        .leading("a")
        .alternative_with("b", "a", |c| c.read.max_wait_ms = 2_000)
        .build()
        .await;
    let mut a = sb.client("a").await;
    create(&mut a, 8, 1).await;
    insert(&mut a, 0..50, 8).await.unwrap();
    let mut b = sb.client("b").await;
    converge(&mut a, &mut b).await;

    let before = hits("follower::apply");
    fail::cfg("follower::apply", "3*return(transient)").unwrap();
    insert(&mut a, 50..100, 8).await.unwrap();
    converge(&mut a, &mut b).await;
    assert_eq!(hits("follower::apply") - before, 3, "the transient fault did not happen");

    fail::cfg("follower::apply", "1*return").unwrap();
    let written = insert(&mut a, 100..150, 8).await.unwrap();
    // The shard halts: the reason is shown, and a read that needs the write fails.
    eventually(Duration::from_secs(30), || {
        let mut b = b.clone();
        async move {
            let info = b.get_cluster_info(pb::GetClusterInfoRequest {}).await.unwrap().into_inner();
            info.collections.iter().any(|c| c.name == C && c.replication.starts_with("halted") && c.replication.contains("apply failure"))
        }
    })
    .await;
    let r = b
        .count(pb::CountRequest {
            collection: C.into(),
            filter: String::new(),
            read: read(pb::ConsistencyLevel::Session, &written.session_token),
        })
        .await;
    assert!(r.is_err(), "a halted shard answered a read that needs what it lacks: {r:?}");
    let got = b
        .count(pb::CountRequest { collection: C.into(), filter: String::new(), read: read(pb::ConsistencyLevel::Eventually, "") })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(got, 100, "the halted shard skipped or applied part of the failed batch");
    scenario.teardown();
}

/// The arbiter lease of an election's winner lapses while it promotes (renewals stop right
/// after the win). It may lead only while that lease certainly holds; then another election
/// picks a leader, and every write any cluster acknowledged is on the final leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_while_promoting_loses_no_acknowledged_write() {
    let scenario = fail::FailScenario::setup();
    let broker = tandem_harness::Tansu::start(false);
    let (sb, mut a) = three_on_kafka(&broker, 2, true).await;
    insert(&mut a, 0..40, 8).await.unwrap();

    // At the first win: the candidates' renewals stop for 4 s (past the 2 s lease).
    let arbiter = sb.arbiter();
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    fail::cfg_callback("ha::won", move || {
        if !f.swap(true, Ordering::SeqCst) {
            for n in ["b", "c"] {
                arbiter.pause(n);
            }
            let arbiter = arbiter.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(4));
                for n in ["b", "c"] {
                    arbiter.resume(n);
                }
            });
        }
    })
    .unwrap();

    // Writers to b and c (past their links), as clients that follow whoever leads.
    let (b_addr, c_addr) = (sb.inner_addr("b").await, sb.inner_addr("c").await);
    let acked = Arc::new(Mutex::new(Vec::<i64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicI64::new(1000));
    let mut writers = Vec::new();
    for addr in [b_addr, c_addr] {
        let (acked, stop, next) = (acked.clone(), stop.clone(), next.clone());
        writers.push(tokio::spawn(async move {
            let mut c = connect(addr).await;
            while !stop.load(Ordering::Relaxed) {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if insert(&mut c, id..id + 1, 8).await.is_ok() {
                    acked.lock().push(id);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    sb.pause("a").await;
    // A leader of a later epoch than the one whose lease lapsed.
    let start = Instant::now();
    let leader = loop {
        let mut found = None;
        for n in ["b", "c"] {
            if sb.role(n).await == Some(pb::Role::Leading) && sb.epoch(n).await >= 3 {
                found = Some(n);
            }
        }
        if let Some(n) = found {
            break n;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "no leader after the lease lost while promoting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(fired.load(Ordering::SeqCst), "the lease was never lost while promoting");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().clone();
    assert!(!acked.is_empty(), "no write was acknowledged: the test proves nothing");
    let mut l = sb.client(leader).await;
    let mut all: Vec<i64> = (0..40).collect();
    all.extend(&acked);
    assert_eq!(missing(&mut l, C, &all).await, 0, "acknowledged writes are missing from the final leader");
    scenario.teardown();
}

/// A fenced leader's export reaches the broker late: after the next leader caught up and
/// promoted, but before that leader's first event (the docker fault campaign saw it: a paused
/// leader sent its last batch on resume). An alternative that applied it holds a change the
/// new leader never had, at a position the new leader reuses for an acknowledged write. It must
/// notice (the new leader's events say where its epoch began) and reload the shard, ending
/// with exactly the new leader's rows: the acknowledged write there, the late change gone. The
/// old leader, resumed, rejoins and ends the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_leaders_late_export_is_not_kept_by_an_alternative() {
    use tandem_exporter::Transport;
    use tandem_proto::replication::v1 as rp;
    let scenario = fail::FailScenario::setup();
    let broker = tandem_harness::Tansu::start(false);
    // c cannot be promoted: b is the next leader, c the alternative that meets the late change.
    let (sb, mut a) = three_on_kafka(&broker, 1, false).await;
    insert(&mut a, 0..40, 8).await.unwrap();
    let (mut b, mut c) = (sb.client("b").await, sb.client("c").await);
    converge(&mut a, &mut b).await;
    converge(&mut a, &mut c).await;

    // The late change: what the old leader (epoch 1) would export next, id 9999.
    let node = sb.node("a").await;
    let collection = node.collection(C).unwrap();
    let stream = tandem_exporter::StreamId::Shard { collection_id: collection.id, shard: 0 };
    let cfg = tandem_exporter::kafka::KafkaConfig {
        brokers: broker.brokers(),
        group: sb.config("a").await.replication.group,
        ..Default::default()
    };
    let kafka = Arc::new(tandem_exporter::kafka::KafkaTransport::new(cfg).unwrap());
    let end = kafka.end_lsn(&stream).await.unwrap();
    let late = rp::ChangeEvent {
        format_version: 1,
        group_id: sb.config("a").await.replication.group,
        epoch: node.led_epoch(),
        ts: node.clock.now(),
        collection: C.into(),
        collection_id: collection.id,
        shard: 0,
        lsn: end + 1,
        epoch_base: Some(0),
        body: Some(rp::change_event::Body::Insert(tandem_proto::storage::v1::RowBatch {
            ids: vec![9999],
            vectors: vectors(1, 8, 9999),
            ..Default::default()
        })),
    };
    // Published where it lands between the new leader's promotion and its first event.
    let published = Arc::new(AtomicBool::new(false));
    let (p, k, s) = (published.clone(), kafka.clone(), stream);
    fail::cfg_callback("ha::promoted", move || {
        if p.swap(true, Ordering::SeqCst) {
            return;
        }
        let (k, ev) = (k.clone(), late.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(k.publish(&s, vec![ev])).expect("publish the late change");
        })
        .join()
        .unwrap();
    })
    .unwrap();

    sb.pause("a").await;
    sb.wait_role("b", pb::Role::Leading, Duration::from_secs(90)).await;
    assert!(published.load(Ordering::SeqCst), "the late change was never published");
    let mut b = sb.client("b").await;
    // Acknowledged by the new leader, at the position the late change took on the broker.
    insert(&mut b, 100..110, 8).await.expect("write to the new leader");
    let mut want: Vec<i64> = (0..40).collect();
    want.extend(100..110);

    converge(&mut b, &mut c).await;
    assert_eq!(missing(&mut c, C, &want).await, 0, "the alternative lacks writes the new leader acknowledged");
    assert_eq!(missing(&mut c, C, &[9999]).await, 1, "the alternative kept the fenced leader's late change");
    assert!(sb.node("c").await.diverged_reloads.load(Ordering::Relaxed) > 0, "the alternative never noticed the late change");

    sb.resume("a").await;
    sb.wait_role("a", pb::Role::Alternative, Duration::from_secs(90)).await;
    let mut a = sb.client("a").await;
    converge(&mut b, &mut a).await;
    assert_eq!(missing(&mut a, C, &want).await, 0, "the old leader lacks writes the new leader acknowledged");
    assert_eq!(missing(&mut a, C, &[9999]).await, 1, "the old leader holds the late change");
    scenario.teardown();
}

/// A query node whose position the cluster's log no longer holds (the cluster bootstrapped
/// again past it, or the node's lease expired while it was away) drops that shard's copies: its
/// searches answer `missing`, the cluster searches them itself at the read's snapshot and
/// forgets the copies, and the next placement round loads them again from a new snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_node_whose_position_left_the_log_drops_its_copies_and_gets_them_again() {
    let scenario = fail::FailScenario::setup();
    // The refused subscription must be the copies' own: a shard leader's would be refused first
    // (the next test).
    let (qn, sb, mut a, before) = cluster_whose_node_is_refused_once(false).await;
    insert(&mut a, 0..900, 8).await.unwrap();
    a.flush(pb::FlushRequest { collection: C.into() }).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while hits("replication::local_subscribe") == before || qn.held() != 0 {
        assert!(
            Instant::now() < deadline,
            "the node did not drop its copies: holds {}, refusals {}",
            qn.held(),
            hits("replication::local_subscribe") - before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let placement = sb.placement("a").await.unwrap();
    let segments = placement.copies_per_group()[0];
    assert!(segments >= 3, "the proxy placed {segments} copies");
    // The proxy still thinks the node holds them: the search finds them missing, searches them
    // here, and answers as the cluster alone does.
    let req = strong_search();
    let answer = a.search(req.clone()).await.unwrap().into_inner().results;
    assert!(placement.rerouted.load(Ordering::Relaxed) > 0, "the dropped copies were not reported missing");
    assert_eq!(answer, sb.answer_in_process("a", &mut a, req.clone()).await);

    // Placed again, from a new snapshot, and followed this time.
    let deadline = Instant::now() + Duration::from_secs(30);
    while qn.held() != segments || placement.copies_per_group() != [segments] {
        assert!(
            Instant::now() < deadline,
            "copies not placed again: the node holds {}, the proxy counts {:?}",
            qn.held(),
            placement.copies_per_group()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rerouted, searched) = (placement.rerouted.load(Ordering::Relaxed), qn.searches());
    assert_eq!(a.search(req.clone()).await.unwrap().into_inner().results, answer);
    assert!(qn.searches() > searched, "the node does not answer again");
    assert_eq!(placement.rerouted.load(Ordering::Relaxed), rerouted, "the node's answers are refused again");
    assert_eq!(hits("replication::local_subscribe"), before + 1);
    drop(sb);
    qn.stop().await;
    scenario.teardown();
}

/// A shard leader whose position the cluster's log no longer holds (the cluster bootstrapped
/// again past it) stops leading: the cluster searches the growing rows itself until the next
/// placement round says where they begin, and the node leads again from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_leader_whose_position_left_the_log_stops_leading_until_told_again() {
    let scenario = fail::FailScenario::setup();
    let (qn, sb, mut a, before) = cluster_whose_node_is_refused_once(true).await;
    // No segment exists yet, so the only subscription is the leader's: refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    while hits("replication::local_subscribe") == before {
        assert!(Instant::now() < deadline, "the shard leader never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let placement = sb.placement("a").await.unwrap();
    let led = || placement.groups()[0][0].led.load(Ordering::Relaxed);
    let growing_rows = || qn.running.node.status().shards.iter().map(|s| s.growing_rows).sum::<u64>();
    // Rows that stay growing: the next round makes the node lead again, and it holds them.
    insert(&mut a, 0..100, 8).await.unwrap();
    let req = strong_search();
    let deadline = Instant::now() + Duration::from_secs(30);
    while led() == 0 {
        assert!(Instant::now() < deadline, "the node does not lead again: it holds {} growing rows", growing_rows());
        let answer = a.search(req.clone()).await.unwrap().into_inner().results;
        assert_eq!(answer, sb.answer_in_process("a", &mut a, req.clone()).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(growing_rows(), 100);
    assert_eq!(a.search(req.clone()).await.unwrap().into_inner().results, sb.answer_in_process("a", &mut a, req).await);
    assert_eq!(hits("replication::local_subscribe"), before + 1);
    drop(sb);
    qn.stop().await;
    scenario.teardown();
}

/// Mid-search stealing whose copies fail (`placement::stolen_call`): group 1's only node answers
/// 40 ms late, so its sub-searches straggle and group 0's idle copies are asked for the same
/// segments, and those calls fail. The straggler's own answer is taken: every search answers as
/// the cluster alone does, nothing is searched in the cluster, and no takeover is counted. With
/// the point off, the same stragglers are taken over (so the searches above did straggle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fails_mid_search_leaves_the_straggler_to_answer() {
    let scenario = fail::FailScenario::setup();
    let (fast, slow) = (QueryNode::start("qa1").await, QueryNode::start("qb1").await);
    let groups = vec![vec![fast.endpoint()], vec![slow_relay(slow.running.addr, Duration::from_millis(40)).await]];
    let (sb, mut a) = cluster_over(groups, true).await;
    create(&mut a, 8, 2).await;
    insert(&mut a, 0..1800, 8).await.unwrap();
    a.flush(pb::FlushRequest { collection: C.into() }).await.unwrap();
    let placement = sb.placement("a").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let per_group = placement.copies_per_group();
        if per_group[0] >= 4 && per_group[0] == per_group[1] && fast.held() == per_group[0] && slow.held() == per_group[1] {
            break;
        }
        assert!(Instant::now() < deadline, "copies not placed: {per_group:?}, held {} and {}", fast.held(), slow.held());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let searches = |seeds: std::ops::Range<u64>| {
        let (sb, mut a) = (&sb, a.clone());
        async move {
            for seed in seeds {
                let req = pb::SearchRequest { vectors: vectors(4, 8, 300 + seed), ..strong_search() };
                let got = a.search(req.clone()).await.unwrap().into_inner().results;
                assert_eq!(got, sb.answer_in_process("a", &mut a, req).await, "search {seed}");
            }
        }
    };

    let before = hits("placement::stolen_call");
    fail::cfg("placement::stolen_call", "return").unwrap();
    searches(0..12).await;
    assert!(hits("placement::stolen_call") > before, "no straggler's segments were asked of a copy");
    assert_eq!(placement.stolen_mid_search.load(Ordering::Relaxed), 0, "a failed copy was taken as the straggler's answer");
    assert_eq!(placement.rerouted.load(Ordering::Relaxed), 0, "the straggler's own answer was not taken");

    fail::remove("placement::stolen_call");
    searches(12..24).await;
    assert!(placement.stolen_mid_search.load(Ordering::Relaxed) > 0, "with the point off, no straggler was taken over");
    drop(sb);
    fast.stop().await;
    slow.stop().await;
    scenario.teardown();
}

/// A search whose view predates a seal (`placement::routed` holds it after routing): its shard
/// leader was asked for the growing rows from a position that the seal and the next placement
/// round trimmed away meanwhile. The leader says it did not search them, the cluster searches
/// them itself at the read's snapshot, and the answer is the cluster's own, with those rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_routed_before_its_growing_rows_were_trimmed_finds_them() {
    let scenario = fail::FailScenario::setup();
    let qn = QueryNode::start("q1").await;
    let (sb, mut a) = cluster_over(vec![vec![qn.endpoint()]], true).await;
    create(&mut a, 8, 1).await;
    insert(&mut a, 0..100, 8).await.unwrap();
    let placement = sb.placement("a").await.unwrap();
    let led = || placement.groups()[0][0].led.load(Ordering::Relaxed);
    let growing =
        || qn.running.node.status().shards.iter().map(|s| (s.growing_from.as_ref().map(|p| p.lsn), s.growing_rows)).collect::<Vec<_>>();
    // The rows' own vectors: a search that missed them would answer otherwise.
    let req = pb::SearchRequest { vectors: vectors(100, 8, 1)[8 * 40..8 * 44].to_vec(), ..strong_search() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while led() == 0 {
        assert!(Instant::now() < deadline, "the node never searched the growing rows as their leader: {:?}", growing());
        a.search(req.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = sb.answer_in_process("a", &mut a, req.clone()).await;
    assert_eq!(answer[0].hits[0].id, 40);
    let (before, here) = (hits("placement::routed"), placement.growing_here.load(Ordering::Relaxed));

    fail::cfg("placement::routed", "1*return(5000)").unwrap();
    let search = tokio::spawn({
        let mut a = a.clone();
        let req = req.clone();
        async move { a.search(req).await.map(|r| r.into_inner().results) }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits("placement::routed") == before {
        assert!(Instant::now() < deadline, "the search never reached the point");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Sealed, and trimmed from the leader's growing rows by the next round, while it waits.
    a.flush(pb::FlushRequest { collection: C.into() }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while growing().iter().any(|&(_, rows)| rows > 0) {
        assert!(Instant::now() < deadline, "the leader kept the sealed rows: {:?}", growing());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!search.is_finished(), "the search went on before the trim: the race was not made");
    let got = search.await.unwrap().unwrap();
    // The rows were found in the segment sealed since the view (faiss's distances there differ
    // from the growing rows' exact ones in the last bits).
    let ids = |h: &[pb::Hits]| h.iter().map(|l| l.hits.iter().map(|x| x.id).collect::<Vec<_>>()).collect::<Vec<_>>();
    assert_eq!(ids(&got), ids(&answer), "the search routed before the trim answers as the cluster does");
    let close =
        got.iter().flat_map(|l| &l.hits).zip(answer.iter().flat_map(|l| &l.hits)).all(|(a, b)| (a.distance - b.distance).abs() < 1e-3);
    assert!(close, "distances differ: {got:?} against {answer:?}");
    assert_eq!(placement.growing_here.load(Ordering::Relaxed), here + 1, "the growing rows were not searched in the cluster");
    drop(sb);
    qn.stop().await;
    scenario.teardown();
}

/// A cluster `a` with one query node (`q1`) whose first subscription is refused as out of range,
/// and collection `C` created (1 shard, 300 rows a segment); with the refusals counted before
/// (the count is the process's: other tests refuse too).
async fn cluster_whose_node_is_refused_once(shard_leaders: bool) -> (QueryNode, Sandbox, Client, u64) {
    let qn = QueryNode::start("q1").await;
    let before = hits("replication::local_subscribe");
    fail::cfg("replication::local_subscribe", "1*return").unwrap();
    let (sb, mut a) = cluster_over(vec![vec![qn.endpoint()]], shard_leaders).await;
    a.create_collection(pb::CreateCollectionRequest { schema: Some(schema(C, 8, pb::Metric::L2, hnsw(16, 64), 1, vec![])) }).await.unwrap();
    (qn, sb, a, before)
}

/// A cluster `a` (300 rows a segment) whose query nodes are `groups`, with shard leaders on them
/// or not; no collection yet.
async fn cluster_over(groups: Vec<Vec<String>>, shard_leaders: bool) -> (Sandbox, Client) {
    let sb = Sandbox::builder()
        .cluster_with("a", move |c| {
            c.segment.seal_rows = 300;
            c.query_nodes.groups = groups.clone();
            c.query_nodes.shard_leaders = shard_leaders;
        })
        .build()
        .await;
    let a = sb.client("a").await;
    (sb, a)
}

/// A STRONG search of 4 queries, k 10.
fn strong_search() -> pb::SearchRequest {
    pb::SearchRequest {
        collection: C.into(),
        vectors: vectors(4, 8, 77),
        top_k: 10,
        params: Some(pb::SearchParams { nprobe: 0, ef_search: 64 }),
        read: read(pb::ConsistencyLevel::Strong, ""),
        ..Default::default()
    }
}
