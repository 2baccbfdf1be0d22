//! The gateway over in-process clusters (a leading cluster and alternatives over the direct
//! transport): reads spread over every readable cluster, sessions, consistency levels, lag
//! avoidance, failures mid-load, NotLeader redirects and errors passed through unchanged.

mod sandbox;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sandbox::*;
use tandem_gateway::config::Policy;
use tandem_proto::v1 as pb;
use tonic::{Code, Request};

const DIM: usize = 8;

async fn create(c: &mut Client, name: &str) {
    c.create_collection(pb::CreateCollectionRequest {
        schema: Some(schema(name, DIM as u32, pb::Metric::L2, None, 2, vec![field("tag", pb::ScalarType::Int64)])),
    })
    .await
    .expect("create collection");
}

fn insert_req(name: &str, ids: std::ops::Range<i64>) -> pb::InsertRequest {
    let n = ids.end - ids.start;
    pb::InsertRequest {
        collection: name.into(),
        vectors: vectors(n as usize, DIM, ids.start as u64),
        payloads: ids.clone().map(|i| payload(&[("tag", int(i % 7))])).collect(),
        ids: ids.collect(),
        ack: 0,
    }
}

async fn insert(c: &mut Client, name: &str, ids: std::ops::Range<i64>) -> pb::MutationResponse {
    c.insert(insert_req(name, ids)).await.expect("insert").into_inner()
}

fn search_req(name: &str, read: Option<pb::ReadOptions>) -> pb::SearchRequest {
    pb::SearchRequest { collection: name.into(), vectors: vectors(1, DIM, 999), top_k: 5, read, ..Default::default() }
}

fn get_req(name: &str, ids: Vec<i64>, read: Option<pb::ReadOptions>) -> pb::GetRequest {
    pb::GetRequest { collection: name.into(), ids, read, ..Default::default() }
}

fn with_session<T>(body: T, session: &str) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut().insert("session-id", session.parse().unwrap());
    r
}

fn with_timeout<T>(body: T, t: Duration) -> Request<T> {
    let mut r = Request::new(body);
    r.set_timeout(t);
    r
}

/// reads_routed per cluster, from the gateway's Topology.
async fn routed(gw: &tandem_gateway::Running) -> BTreeMap<String, u64> {
    topology(gw).await.clusters.into_iter().map(|c| (c.id, c.reads_routed)).collect()
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).collect()
}

/// A client of the gateway, once it sees its `clusters` and they all report `collection`,
/// created through it with rows `0..rows` (the insert's reply is returned too).
async fn serving(gw: &tandem_gateway::Running, clusters: usize, collection: &str, rows: i64) -> (Client, pb::MutationResponse) {
    let mut g = connect(gw.addr).await;
    gateway_ready(gw, clusters, None).await;
    create(&mut g, collection).await;
    let w = insert(&mut g, collection, 0..rows).await;
    gateway_ready(gw, clusters, Some(collection)).await;
    (g, w)
}

/// A leader `a` and alternatives `b` and `c`, with collection `c1` holding 100 rows that every
/// cluster serves, and a gateway (policy as given) that sees all three.
async fn three_clusters(
    policy: Policy,
    adjust: impl FnOnce(&mut tandem_gateway::GatewayConfig),
) -> (Sandbox, tandem_gateway::Running, Client) {
    let sb = Sandbox::builder().leading("a").alternative("b", "a").alternative("c", "a").build().await;
    let gw = sb
        .gateway(&["a", "b", "c"], |cfg| {
            cfg.routing.policy = policy;
            adjust(cfg);
        })
        .await;
    let (g, w) = serving(&gw, 3, "c1", 100).await;
    // Every alternative has applied the rows before the test measures anything.
    for name in ["b", "c"] {
        let mut d = sb.client(name).await;
        let n = d.count(pb::CountRequest {
            collection: "c1".into(),
            filter: String::new(),
            read: read(pb::ConsistencyLevel::Session, &w.session_token),
        });
        assert_eq!(n.await.expect("count on alternative").into_inner().count, 100);
    }
    (sb, gw, g)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_reach_every_readable_cluster() {
    for policy in [Policy::P2c, Policy::RoundRobin] {
        let (_sb, gw, g) = three_clusters(policy, |cfg| {
            // p2c follows latency: on a shared test machine one slow reply would keep a cluster
            // out for seconds with the default decay.
            cfg.routing.ewma_decay_ms = 200;
        })
        .await;
        let before = routed(&gw).await;
        let (readers, per_reader) = (4, 75);
        let mut tasks = Vec::new();
        for r in 0..readers {
            let mut g = g.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_reader {
                    let level =
                        [pb::ConsistencyLevel::Bounded, pb::ConsistencyLevel::Eventually, pb::ConsistencyLevel::Session][(r + i) % 3];
                    let res = g.search(search_req("c1", read(level, ""))).await.expect("search via gateway").into_inner();
                    assert_eq!(res.results[0].hits.len(), 5);
                }
            }));
        }
        for t in tasks {
            t.await.expect("reader");
        }
        let n = (readers * per_reader) as u64;
        let d = delta(&routed(&gw).await, &before);
        assert_eq!(d.values().sum::<u64>(), n, "{policy:?}: one attempt per read: {d:?}");
        for (cluster, count) in &d {
            // An even spread is 100 each; p2c prefers the faster, so allow a wide tolerance.
            assert!(*count >= n / 20, "{policy:?}: cluster {cluster} got {count} of {n} reads: {d:?}");
        }
        if policy == Policy::RoundRobin {
            assert!(d.values().all(|c| (90..=110).contains(c)), "round robin is even: {d:?}");
        }
        gw.stop().await.expect("stop gateway");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_reads_see_own_writes_on_the_alternative() {
    let sb = Sandbox::builder().leading("a").alternative_with("b", "a", |cfg| cfg.datacenter = "dc-b".into()).build().await;
    // The gateway is in b's datacenter, so every read it can route to b goes there.
    let gw = sb
        .gateway(&["a", "b"], |cfg| {
            cfg.routing.policy = Policy::PreferLocal;
            cfg.datacenter = "dc-b".into();
            // b is eligible while its health checks succeed and its reported lag lets it
            // serve within the deadline. On a loaded machine (a clean-container run beside
            // builds) a check timed out or the lag grew, and the gateway rightly read from a
            // (14 of 40 reads); generous bounds keep b eligible, so this checks the policy.
            cfg.health.timeout_ms = 10_000;
            cfg.routing.default_timeout_ms = 60_000;
        })
        .await;
    let (mut g, _) = serving(&gw, 2, "s", 1).await;
    let t = topology(&gw).await;
    assert_eq!(t.clusters.iter().find(|c| c.id == "b").unwrap().datacenter, "dc-b", "datacenter learned from the cluster");

    let before = routed(&gw).await;
    for i in 1..=20i64 {
        // Session kept by the gateway (`session-id`): the read carries no token itself.
        g.insert(with_session(insert_req("s", i * 10..i * 10 + 1), "client-1")).await.expect("insert");
        let r = g.get(with_session(get_req("s", vec![i * 10], read(pb::ConsistencyLevel::Session, "")), "client-1")).await;
        let found: Vec<i64> = r.expect("get").into_inner().entities.iter().map(|e| e.id).collect();
        assert_eq!(found, vec![i * 10], "session-id read {i} misses its own write");
        // Token passed by the client.
        let w = insert(&mut g, "s", i * 10 + 1..i * 10 + 2).await;
        let r = g.get(get_req("s", vec![i * 10 + 1], read(pb::ConsistencyLevel::Session, &w.session_token))).await;
        assert_eq!(r.expect("get").into_inner().entities.len(), 1, "token read {i} misses its own write");
    }
    let d = delta(&routed(&gw).await, &before);
    assert_eq!(d["b"], 40, "every read went to the local alternative: {d:?}; topology: {:?}", topology(&gw).await);
    assert_eq!(d["a"], 0, "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strong_reads_are_never_stale_and_bounded_reads_stay_within_their_bound() {
    let (_sb, gw, mut g) = three_clusters(Policy::RoundRobin, |_| {}).await;
    let before = routed(&gw).await;
    let staleness = 300u64;
    let mut acked: Vec<(Instant, u64)> = Vec::new();
    let mut total = 100u64;
    for i in 0..40i64 {
        insert(&mut g, "c1", 1000 + i * 5..1000 + i * 5 + 5).await;
        total += 5;
        acked.push((Instant::now(), total));
        let strong = g
            .count(pb::CountRequest { collection: "c1".into(), filter: String::new(), read: read(pb::ConsistencyLevel::Strong, "") })
            .await;
        assert_eq!(strong.expect("strong count").into_inner().count, total, "strong read {i} is stale");
        let started = Instant::now();
        let bounded = g
            .count(pb::CountRequest {
                collection: "c1".into(),
                filter: String::new(),
                read: Some(pb::ReadOptions {
                    consistency: pb::ConsistencyLevel::Bounded as i32,
                    session_token: String::new(),
                    staleness_ms: staleness,
                }),
            })
            .await
            .expect("bounded count")
            .into_inner()
            .count;
        // Every write acknowledged more than `staleness` before the read started is in it.
        let must_see =
            acked.iter().filter(|(t, _)| *t + Duration::from_millis(staleness + 5) < started).map(|(_, n)| *n).max().unwrap_or(100);
        assert!(bounded >= must_see, "bounded read {i} saw {bounded} rows, older than its bound ({must_see} acknowledged)");
        assert!(bounded <= total);
    }
    let d = delta(&routed(&gw).await, &before);
    assert!(d["b"] > 0 && d["c"] > 0, "consistent reads were served by alternatives too: {d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_cluster_is_avoided() {
    let (sb, gw, mut g) = three_clusters(Policy::RoundRobin, |_| {}).await;
    // b stops applying the leader's stream: its serviceable ts stays, its lag grows.
    sb.follower("b").await.stop();
    eventually(Duration::from_secs(30), || async {
        topology(&gw).await.clusters.iter().any(|c| c.id == "b" && c.collections.iter().any(|s| s.name == "c1" && s.lag_ms > 3_000))
    })
    .await;
    let w = insert(&mut g, "c1", 100..101).await;
    let before = routed(&gw).await;
    for i in 0..30 {
        let strong = with_timeout(
            pb::CountRequest { collection: "c1".into(), filter: String::new(), read: read(pb::ConsistencyLevel::Strong, "") },
            Duration::from_secs(2),
        );
        assert_eq!(g.count(strong).await.expect("strong read").into_inner().count, 101, "read {i}");
        let bounded =
            pb::ReadOptions { consistency: pb::ConsistencyLevel::Bounded as i32, session_token: String::new(), staleness_ms: 1000 };
        let r = g.search(with_timeout(search_req("c1", Some(bounded)), Duration::from_secs(2))).await;
        assert_eq!(r.expect("bounded read").into_inner().results[0].hits.len(), 5);
        let session = with_timeout(get_req("c1", vec![100], read(pb::ConsistencyLevel::Session, &w.session_token)), Duration::from_secs(2));
        assert_eq!(g.get(session).await.expect("session read").into_inner().entities.len(), 1);
    }
    let d = delta(&routed(&gw).await, &before);
    assert_eq!(d["b"], 0, "the lagging cluster got reads: {d:?}");
    assert!(d["a"] > 0 && d["c"] > 0, "{d:?}");
    // EVENTUALLY reads may still use it: it is healthy, only behind.
    let before = routed(&gw).await;
    for _ in 0..30 {
        g.search(search_req("c1", read(pb::ConsistencyLevel::Eventually, ""))).await.expect("eventually read");
    }
    assert!(delta(&routed(&gw).await, &before)["b"] > 0);
    // A read nobody can serve in time fails at the gateway, naming why per cluster.
    sb.follower("c").await.stop();
    sb.node("a").await.set_role(tandem_cluster::Role::Standby);
    eventually(Duration::from_secs(30), || async {
        let t = topology(&gw).await;
        t.leader.is_empty() && t.clusters.iter().filter(|c| c.id != "a").all(|c| c.lag_ms > 3_000)
    })
    .await;
    let e = g
        .count(with_timeout(
            pb::CountRequest { collection: "c1".into(), filter: String::new(), read: read(pb::ConsistencyLevel::Strong, "") },
            Duration::from_secs(2),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    for part in ["no cluster can serve a Count of `c1` (STRONG)", "a is Standby, serves no reads", "b needs ~", "c needs ~"] {
        assert!(e.message().contains(part), "{:?} lacks {part:?}", e.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_an_alternative_mid_load_fails_no_read() {
    let (sb, gw, g) = three_clusters(Policy::P2c, |_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, after_stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stopped = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..4 {
        let (mut g, stop, ok, after_stop, stopped) = (g.clone(), stop.clone(), ok.clone(), after_stop.clone(), stopped.clone());
        readers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let level = if i.is_multiple_of(2) { pb::ConsistencyLevel::Bounded } else { pb::ConsistencyLevel::Eventually };
                let res = g.search(search_req("c1", read(level, ""))).await;
                if let Err(e) = res {
                    panic!("reader {r}: read {i} failed: {e:?}");
                }
                ok.fetch_add(1, Ordering::Relaxed);
                if stopped.load(Ordering::Relaxed) {
                    after_stop.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    eventually(Duration::from_secs(30), || async { ok.load(Ordering::Relaxed) >= 200 }).await;
    sb.stop("b").await;
    stopped.store(true, Ordering::Relaxed);
    eventually(Duration::from_secs(30), || async { after_stop.load(Ordering::Relaxed) >= 300 }).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.expect("no reader failed");
    }
    eventually(Duration::from_secs(30), || async {
        topology(&gw).await.clusters.iter().any(|c| c.id == "b" && c.health == pb::Health::Unhealthy as i32 && !c.readable)
    })
    .await;
    let before = routed(&gw).await;
    let mut g = g;
    for _ in 0..20 {
        g.search(search_req("c1", read(pb::ConsistencyLevel::Eventually, ""))).await.expect("read");
    }
    assert_eq!(delta(&routed(&gw).await, &before)["b"], 0, "a stopped cluster gets no reads once unhealthy");
}

/// A cluster stalled (paused: silent, not refusing) while reads go to it: the reads that were
/// waiting on it end at their own deadline, and that is no latency sample. Once it is back
/// and healthy, its p2c estimate is what it was before the stall and it gets reads again
/// (before, a read abandoned at a 300 ms deadline counted as a 300 ms answer and kept the
/// cluster out of p2c for several decay periods).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healed_cluster_gets_reads_again_and_abandoned_reads_do_not_count() {
    let sb = Sandbox::builder().links().leading("a").alternative("b", "a").build().await;
    let gw = sb
        .gateway(&["a", "b"], |cfg| {
            cfg.routing.policy = Policy::P2c;
            cfg.routing.ewma_decay_ms = 1_000;
            // A stalled cluster is noticed by its health checks within about a second.
            cfg.health.timeout_ms = 300;
            cfg.health.unhealthy_after = 2;
        })
        .await;
    let (g, _) = serving(&gw, 2, "c1", 100).await;
    let read_once = |mut g: Client| async move {
        g.search(with_timeout(search_req("c1", read(pb::ConsistencyLevel::Eventually, "")), Duration::from_millis(300))).await
    };
    let start = routed(&gw).await;
    for _ in 0..50 {
        read_once(g.clone()).await.expect("read before the stall");
    }
    let shares = delta(&routed(&gw).await, &start);
    assert!(shares["a"] > 0 && shares["b"] > 0, "both clusters serve reads before the stall: {shares:?}");
    let latency = |t: &pb::TopologyResponse, id: &str| t.clusters.iter().find(|c| c.id == id).map(|c| c.latency_us).unwrap();

    sb.pause("b").await;
    // Reads sent now may wait on b until their deadline (p2c tries it while its estimate is
    // low); four at a time, so that a's reads in flight make b the cheaper choice. They end
    // in DEADLINE_EXCEEDED.
    let mut abandoned = 0;
    let paused = std::time::Instant::now();
    while abandoned == 0 && paused.elapsed() < Duration::from_secs(3) {
        let batch = futures::future::join_all((0..4).map(|_| read_once(g.clone()))).await;
        for r in batch {
            if let Err(s) = r {
                // The gateway's DEADLINE_EXCEEDED, or the client's own timer firing first.
                assert!(matches!(s.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{s:?}");
                abandoned += 1;
            }
        }
    }
    assert!(abandoned > 0, "no read waited on the stalled cluster: the test proves nothing ({:?})", delta(&routed(&gw).await, &start));
    // Right after a read was abandoned at its 300 ms deadline (the estimate decays within
    // `ewma_decay_ms`, so only now would a sample still show).
    let during = latency(&topology(&gw).await, "b");
    assert!(during < 250_000, "reads abandoned at their 300 ms deadline counted as answers: b's estimate is {during} us");
    eventually(Duration::from_secs(30), || async {
        topology(&gw).await.clusters.iter().any(|c| c.id == "b" && c.health == pb::Health::Unhealthy as i32)
    })
    .await;

    sb.resume("b").await;
    let healed = std::time::Instant::now();
    gateway_ready(&gw, 2, Some("c1")).await;
    let before = routed(&gw).await;
    let mut reads = 0;
    while delta(&routed(&gw).await, &before)["b"] == 0 {
        read_once(g.clone()).await.expect("read after the stall");
        reads += 1;
        assert!(healed.elapsed() < Duration::from_secs(60), "the healed cluster got no read in {reads} reads");
    }
    eprintln!("b served reads again {:?} after it was resumed ({reads} reads)", healed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_leader_redirects_the_write_once() {
    // Two separate clusters; the gateway first sees `a` leading, then they swap roles behind its
    // back (health checks are too slow to notice): the write goes to `a`, which answers
    // NotLeader naming `b`; the gateway refreshes and writes to `b`.
    let sb = Sandbox::builder().leading("a").leading("b").build().await;
    let mut direct_b = sb.client("b").await;
    create(&mut direct_b, "w").await;
    // `a` has it too: a cluster checks the collection before its role.
    create(&mut sb.client("a").await, "w").await;
    let (node_a, node_b) = (sb.node("a").await, sb.node("b").await);
    node_b.set_role(tandem_cluster::Role::Alternative);
    let gw = sb
        .gateway(&["a", "b"], |cfg| {
            cfg.health.interval_ms = 3_600_000;
            // A held write waits for the promotion below however loaded the machine is.
            cfg.buffer.max_wait_ms = 120_000;
            cfg.routing.default_timeout_ms = 120_000;
        })
        .await;
    eventually(Duration::from_secs(30), || async { topology(&gw).await.leader == "a" }).await;
    node_a.set_role(tandem_cluster::Role::Alternative);
    node_a.set_leader(Some(format!("http://{}", sb.addr("b").await)));
    node_b.set_role(tandem_cluster::Role::Leading);

    let mut g = connect(gw.addr).await;
    let w = insert(&mut g, "w", 0..3).await;
    assert_eq!(w.count, 3);
    assert_eq!(count(&mut direct_b, "w").await, 3, "the write landed on the new leader");
    let t = topology(&gw).await;
    assert_eq!(t.leader, "b", "topology refreshed");
    let writes: BTreeMap<_, _> = t.clusters.iter().map(|c| (c.id.as_str(), c.writes_routed)).collect();
    assert_eq!(writes, BTreeMap::from([("a", 1), ("b", 1)]));

    // With no leader at all, a write is held until its deadline (here 1 s, well below
    // buffer.max_wait_ms), then fails at the gateway naming each cluster's state and the refusal.
    node_b.set_role(tandem_cluster::Role::Alternative);
    let e = g.insert(with_timeout(insert_req("w", 10..11), Duration::from_secs(1))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    for part in ["no leader: election in progress, 1 writes held", "b (epoch 1) refused the write", "does not accept writes"] {
        assert!(e.message().contains(part), "{:?} lacks {part:?}", e.message());
    }
    assert_eq!(e.metadata().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("1000".into()), "{e:?}");
    let e = g.insert(with_timeout(insert_req("w", 10..11), Duration::from_secs(1))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("no leading cluster is known: a is Alternative at epoch 1, b is Alternative at epoch 1"), "{e:?}");

    // An election: a write arrives with no leader, is held, and goes to the cluster promoted
    // meanwhile (seen by the faster checks while no leader is known).
    let held = tokio::spawn({
        let mut g = g.clone();
        async move { g.insert(insert_req("w", 20..22)).await }
    });
    eventually(Duration::from_secs(30), || async { gw.gateway.writes_held() == 1 }).await;
    node_a.set_leader(None);
    node_a.set_role(tandem_cluster::Role::Leading);
    let w = held.await.unwrap().expect("the held write reached the new leader");
    assert_eq!(w.into_inner().count, 2);
    assert_eq!(count(&mut sb.client("a").await, "w").await, 2, "on a, which leads now");
    assert_eq!(gw.gateway.writes_held(), 0);
    assert_eq!(topology(&gw).await.leader, "a");
}

/// The leader `a` (and, if `alternative`, `b` following it), with `c1` holding 100 rows that
/// every cluster has applied, behind a gateway whose buffer holds `max_writes` for up to
/// `max_wait_ms`.
async fn buffered_gateway(alternative: bool, max_writes: usize, max_wait_ms: u64) -> (Sandbox, tandem_gateway::Running, Client) {
    let mut b = Sandbox::builder().leading("a");
    if alternative {
        b = b.alternative("b", "a");
    }
    let sb = b.build().await;
    let names: &[&str] = if alternative { &["a", "b"] } else { &["a"] };
    let gw = sb
        .gateway(names, |cfg| {
            cfg.buffer.max_writes = max_writes;
            cfg.buffer.max_wait_ms = max_wait_ms;
            cfg.buffer.retry_after_ms = 750;
            // Room for a loaded machine inside one request's deadline.
            cfg.routing.default_timeout_ms = 120_000;
        })
        .await;
    let mut g = connect(gw.addr).await;
    gateway_ready(&gw, names.len(), None).await;
    create(&mut g, "c1").await;
    let w = insert(&mut g, "c1", 0..100).await;
    gateway_ready(&gw, names.len(), Some("c1")).await;
    if alternative {
        let mut d = sb.client("b").await;
        let n = d.count(pb::CountRequest {
            collection: "c1".into(),
            filter: String::new(),
            read: read(pb::ConsistencyLevel::Session, &w.session_token),
        });
        assert_eq!(n.await.expect("count on b").into_inner().count, 100);
    }
    (sb, gw, g)
}

/// Stops the leader `a`. A graceful stop waits for the streams it serves, so `b` (if any) stops
/// following first and keeps serving what it has; kill -9 under load is the failover tests' business.
async fn stop_leader(sb: &Sandbox, alternative: bool) -> std::net::SocketAddr {
    let addr = sb.addr("a").await;
    if alternative {
        sb.follower("b").await.stop();
    }
    sb.stop("a").await;
    addr
}

fn eventually_count(c: &str) -> pb::CountRequest {
    pb::CountRequest { collection: c.into(), filter: String::new(), read: read(pb::ConsistencyLevel::Eventually, "") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_are_held_during_an_election_and_reads_keep_being_served() {
    let (sb, gw, g) = buffered_gateway(true, 4, 120_000).await;
    // Readers through the whole outage: every read must be served (by the alternative).
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (mut g, stop, reads, failed) = (g.clone(), stop.clone(), reads.clone(), failed.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match g.count(eventually_count("c1")).await {
                    Ok(r) => assert!(r.into_inner().count >= 100),
                    Err(e) => failed.lock().unwrap().push(e),
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    stop_leader(&sb, true).await;
    let reads_at_stop = reads.load(Ordering::Relaxed);
    // Four writes arrive while the leader is down: held, not failed. The first finds `a` still
    // leading in the gateway's view, cannot connect, and marks it suspect.
    let mut held = Vec::new();
    for i in 0..4i64 {
        let mut g = g.clone();
        if i % 2 == 0 {
            held.push(tokio::spawn(async move { g.insert(insert_req("c1", 1000 + i * 10..1010 + i * 10)).await.map(|r| r.into_inner()) }));
        } else {
            let r = pb::UpsertRequest {
                collection: "c1".into(),
                ids: (1000 + i * 10..1010 + i * 10).collect(),
                vectors: vectors(10, DIM, i as u64),
                payloads: vec![],
                ack: 0,
            };
            held.push(tokio::spawn(async move { g.upsert(r).await.map(|r| r.into_inner()) }));
        }
    }
    eventually(Duration::from_secs(60), || async { gw.gateway.writes_held() == 4 }).await;
    let t = topology(&gw).await;
    assert_eq!(t.leader, "", "no leader while `a` is down: {t:?}");

    // The buffer is full: the next write is refused at once, naming the situation.
    let e = g.clone().insert(insert_req("c1", 5000..5001)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("no leader: election in progress, 4 writes held (buffer.max_writes = 4)"), "{e:?}");
    assert_eq!(e.metadata().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("750".into()));
    // Reads were served by the alternative meanwhile.
    eventually(Duration::from_secs(60), || async { reads.load(Ordering::Relaxed) >= reads_at_stop + 20 }).await;

    // An election: `b`, which holds every acknowledged write, is promoted; the held writes go to it.
    let node_b = sb.node("b").await;
    node_b.set_leader(None);
    node_b.set_role(tandem_cluster::Role::Leading);
    for (i, h) in held.into_iter().enumerate() {
        let r = h.await.unwrap().unwrap_or_else(|e| panic!("held write {i} failed: {e:?}"));
        assert_eq!(r.count, 10, "write {i}");
    }
    assert_eq!(gw.gateway.writes_held(), 0);
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.expect("reader");
    }
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    assert!(
        failed.is_empty(),
        "{} of {} reads failed during the outage, e.g. {:?}",
        failed.len(),
        reads.load(Ordering::Relaxed),
        failed[0]
    );
    let mut g = g;
    assert_eq!(count(&mut g, "c1").await, 140, "every held write is there, once");
    let refused = g.get(get_req("c1", vec![5000], read(pb::ConsistencyLevel::Strong, ""))).await.expect("get").into_inner();
    assert!(refused.entities.is_empty(), "the refused write changed nothing");
    let t = topology(&gw).await;
    assert_eq!(t.leader, "b");
    assert_eq!(t.clusters.iter().find(|c| c.id == "b").unwrap().writes_routed, 4, "each held write was sent once, to the new leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_held_past_max_wait_fails_with_retry_after_and_changes_nothing() {
    let (sb, gw, mut g) = buffered_gateway(false, 100, 300).await;
    let addr_a = stop_leader(&sb, false).await;
    let upsert = pb::UpsertRequest { collection: "c1".into(), ids: vec![7], vectors: vectors(1, DIM, 7), payloads: vec![], ack: 0 };
    let errors = vec![
        ("insert", g.insert(insert_req("c1", 100..110)).await.map(|_| ()).unwrap_err()),
        ("upsert", g.upsert(upsert).await.map(|_| ()).unwrap_err()),
        (
            "create",
            g.create_collection(pb::CreateCollectionRequest { schema: Some(schema("c2", 4, pb::Metric::L2, None, 1, vec![])) })
                .await
                .map(|_| ())
                .unwrap_err(),
        ),
    ];
    for (what, e) in errors {
        assert_eq!(e.code(), Code::Unavailable, "{what}: {e:?}");
        for part in ["no leader: election in progress", "waited", "buffer.max_wait_ms = 300", "no leading cluster is known: a "] {
            assert!(e.message().contains(part), "{what}: {:?} lacks {part:?}", e.message());
        }
        assert_eq!(e.metadata().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("750".into()), "{what}");
    }
    assert_eq!(gw.gateway.writes_held(), 0);
    sb.start_again_at("a", addr_a).await;
    eventually(Duration::from_secs(60), || async { topology(&gw).await.leader == "a" }).await;
    assert_eq!(count(&mut g, "c1").await, 100, "nothing changed");
    let names = g.list_collections(pb::ListCollectionsRequest {}).await.unwrap().into_inner().names;
    assert_eq!(names, ["c1"]);
    insert(&mut g, "c1", 100..110).await;
    assert_eq!(count(&mut g, "c1").await, 110);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clusters_refuse_writes_tagged_with_another_epoch() {
    let sb = Sandbox::builder().leading("a").build().await;
    let mut c = sb.client("a").await;
    create(&mut c, "e").await;
    let tagged = |epoch: &str, ids: std::ops::Range<i64>| {
        let mut r = Request::new(insert_req("e", ids));
        r.metadata_mut().insert("tandem-epoch", epoch.parse().unwrap());
        r
    };
    let e = c.insert(tagged("7", 0..5)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("stale epoch: the write was sent for epoch 7 but cluster a is at epoch 1"), "{e:?}");
    let e = c.insert(tagged("seven", 0..5)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut drop = Request::new(pb::DropCollectionRequest { name: "e".into() });
    drop.metadata_mut().insert("tandem-epoch", "2".parse().unwrap());
    assert_eq!(c.drop_collection(drop).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(count(&mut c, "e").await, 0, "nothing was written");
    assert_eq!(c.insert(tagged("1", 0..5)).await.expect("own epoch").into_inner().count, 5);
    assert_eq!(c.insert(insert_req("e", 5..6)).await.expect("untagged").into_inner().count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_the_same_errors_through_the_gateway() {
    let (sb, _gw, mut g) = three_clusters(Policy::RoundRobin, |_| {}).await;
    let mut direct = sb.client("a").await;
    let bad_read = |token: &str| read(pb::ConsistencyLevel::Session, token);
    let searches = vec![
        ("wrong dim", pb::SearchRequest { vectors: vec![0.0; DIM + 1], ..search_req("c1", None) }),
        ("unknown collection", search_req("nope", None)),
        ("bad filter", pb::SearchRequest { filter: "tag <".into(), ..search_req("c1", None) }),
        ("unknown field", pb::SearchRequest { filter: "colour == 3".into(), ..search_req("c1", None) }),
        ("top_k 0", pb::SearchRequest { top_k: 0, ..search_req("c1", None) }),
        ("bad token", search_req("c1", bad_read("t9-zz"))),
    ];
    for (what, req) in searches {
        // Several times: round robin puts some on alternatives, which must answer the same.
        for _ in 0..3 {
            let via = g.search(req.clone()).await.unwrap_err();
            let direct = direct.search(req.clone()).await.unwrap_err();
            assert_eq!((via.code(), via.message()), (direct.code(), direct.message()), "{what}");
            assert_ne!(via.code(), Code::Unavailable, "{what}: {via:?}");
        }
    }
    let writes = vec![
        ("duplicate ids", insert_req("c1", 5..6)),
        ("bad dim", pb::InsertRequest { vectors: vec![1.0; DIM - 1], ..insert_req("c1", 500..501) }),
        ("unknown collection", insert_req("nope", 0..1)),
    ];
    for (what, req) in writes {
        let via = g.insert(req.clone()).await.unwrap_err();
        let d = direct.insert(req).await.unwrap_err();
        assert_eq!((via.code(), via.message()), (d.code(), d.message()), "{what}");
    }
    let bad_schema = pb::CreateCollectionRequest { schema: Some(schema("bad name!", 0, pb::Metric::L2, None, 1, vec![])) };
    let via = g.create_collection(bad_schema.clone()).await.unwrap_err();
    let d = direct.create_collection(bad_schema).await.unwrap_err();
    assert_eq!((via.code(), via.message()), (d.code(), d.message()));
    let via = g.describe_collection(pb::DescribeCollectionRequest { name: "nope".into() }).await.unwrap_err();
    let d = direct.describe_collection(pb::DescribeCollectionRequest { name: "nope".into() }).await.unwrap_err();
    assert_eq!((via.code(), via.message()), (d.code(), d.message()));
    // Nothing changed.
    assert_eq!(count(&mut g, "c1").await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topology_lists_every_cluster_and_the_leader() {
    let (_sb, gw, mut g) = three_clusters(Policy::P2c, |_| {}).await;
    // The gateway's view is as of its last poll, which can predate an alternative's first
    // applied change on a loaded machine.
    let reported =
        || async { topology(&gw).await.clusters.iter().all(|c| c.collections.iter().any(|s| s.name == "c1" && s.serviceable_ts > 0)) };
    eventually(Duration::from_secs(30), reported).await;
    let t = topology(&gw).await;
    assert_eq!(t.leader, "a");
    let ids: Vec<_> = t.clusters.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    for c in &t.clusters {
        let role = if c.id == "a" { pb::Role::Leading } else { pb::Role::Alternative };
        assert_eq!(c.role, role as i32, "{c:?}");
        assert_eq!(c.health, pb::Health::Healthy as i32);
        assert!(c.readable && c.endpoints[0].starts_with("http://127.0.0.1:"));
        assert_eq!(c.datacenter, "local");
        let s = c.collections.iter().find(|s| s.name == "c1").expect("c1 reported");
        assert!(s.serviceable_ts > 0);
    }
    // The rest of the API passes through too.
    let names = g.list_collections(pb::ListCollectionsRequest {}).await.expect("list").into_inner().names;
    assert_eq!(names, ["c1"]);
    let info = g.get_cluster_info(pb::GetClusterInfoRequest {}).await.expect("info").into_inner();
    assert!(["a", "b", "c"].contains(&info.cluster_id.as_str()));
    let d = g.describe_collection(pb::DescribeCollectionRequest { name: "c1".into() }).await.expect("describe").into_inner();
    assert_eq!(d.collection.unwrap().schema.unwrap().dim, DIM as u32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tandem_gateway_command_serves_and_rejects_bad_config() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["gateway", "--listen", "127.0.0.1:0", "--cluster", "nope", "--cluster", "b=10.0.0.1:5"])
        .output()
        .expect("run tandem gateway");
    assert_eq!(out.status.code(), Some(64), "bad config exits 64");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cluster \"nope\"") && err.contains("clusters[0].endpoint = \"10.0.0.1:5\""), "{err}");

    let sb = Sandbox::builder().leading("a").alternative("b", "a").build().await;
    let (a, b) = (sb.addr("a").await, sb.addr("b").await);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["gateway", "--listen", "127.0.0.1:0", "--cluster", &format!("a=http://{a}"), "--cluster", &format!("b=http://{b}@dc2")])
        .env("RUST_LOG", "warn")
        .env("TANDEM_GATEWAY__HEALTH__INTERVAL_MS", "100")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn tandem gateway");
    let line = BufReader::new(child.stdout.take().unwrap()).lines().next().expect("a line").expect("stdout");
    let addr: std::net::SocketAddr = line.split(" listening on ").nth(1).expect("address line").trim().parse().unwrap();
    let mut g = connect(addr).await;
    // The gateway learns the leader with its first health check.
    eventually(Duration::from_secs(30), || {
        let mut g = g.clone();
        async move {
            let schema = schema("p", DIM as u32, pb::Metric::L2, None, 1, vec![field("tag", pb::ScalarType::Int64)]);
            g.create_collection(pb::CreateCollectionRequest { schema: Some(schema) }).await.is_ok()
        }
    })
    .await;
    insert(&mut g, "p", 0..10).await;
    assert_eq!(count(&mut g, "p").await, 10);
    sigterm(&mut child);
    let status = child.wait().expect("wait");
    assert!(status.success(), "graceful stop on SIGTERM: {status:?}");
}

/// SIGTERM via the `kill` command (no libc call needed).
fn sigterm(child: &mut std::process::Child) {
    let ok = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill").success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hedged_reads_answer_from_the_second_cluster() {
    let sb = Sandbox::builder().leading("a").alternative("b", "a").build().await;
    let gw = sb
        .gateway(&["a", "b"], |cfg| {
            cfg.routing.policy = Policy::RoundRobin;
            cfg.routing.hedge_after_ms = 100;
        })
        .await;
    let (mut g, _) = serving(&gw, 2, "h", 10).await;
    // b stops applying: a SESSION read of a newer write waits there until its deadline and
    // then fails (DEADLINE_EXCEEDED is not retried). Until b's lag exceeds the deadline the
    // gateway still considers it, so only the hedge to `a` can answer those reads.
    sb.follower("b").await.stop();
    let w = insert(&mut g, "h", 10..11).await;
    let before = routed(&gw).await;
    let n = 6;
    for i in 0..n {
        let req = with_timeout(get_req("h", vec![10], read(pb::ConsistencyLevel::Session, &w.session_token)), Duration::from_secs(20));
        let r = g.get(req).await;
        assert_eq!(r.expect("hedged read").into_inner().entities.len(), 1, "read {i}");
    }
    let d = delta(&routed(&gw).await, &before);
    assert!(d["b"] > 0, "round robin sent some reads to b first: {d:?}");
    assert_eq!(d["a"], n, "every read was answered by a, directly or as a hedge: {d:?}");
}

/// Clusters registered in etcd appear in the gateway and take reads; a cluster whose
/// registration goes (clean shutdown revokes its lease) disappears, live, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_discovery_adds_and_removes_clusters_live() {
    let etcd = tandem_harness::Etcd::start().await;
    let sb = Sandbox::builder().leading("lead").alternative("alt", "lead").build().await;
    let prefix = "/gw-test/clusters/".to_string();
    let register = |name: &'static str| {
        let (etcd, prefix) = (etcd.endpoints(), prefix.clone());
        let sb = &sb;
        async move {
            let reg = tandem_discovery::Registration {
                id: name.into(),
                datacenter: String::new(),
                endpoint: format!("http://{}", sb.addr(name).await),
            };
            let cancel = tokio_util::sync::CancellationToken::new();
            let task = tandem_discovery::etcd::register(etcd, prefix, 600, reg, cancel.clone()).await.expect("register");
            (cancel, task)
        }
    };
    let lead_reg = register("lead").await;
    let watch = tandem_discovery::etcd::watch(etcd.endpoints(), prefix.clone()).await.expect("watch");
    let mut cfg = tandem_gateway::GatewayConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    cfg.health.interval_ms = 100;
    cfg.health.healthy_after = 1;
    cfg.discovery.etcd = etcd.endpoints();
    cfg.discovery.prefix = prefix.clone();
    let gw = tandem_gateway::start(cfg, watch).await.expect("gateway");
    let ids = |t: pb::TopologyResponse| t.clusters.into_iter().map(|c| c.id).collect::<Vec<_>>();
    eventually(Duration::from_secs(30), || async { ids(topology(&gw).await) == ["lead"] }).await;

    // A cluster that registers later is added, and serves reads through the gateway.
    let (alt_cancel, alt_task) = register("alt").await;
    let (mut g, _) = serving(&gw, 2, "e", 10).await;
    let before = topology_reads(&gw, "alt").await;
    let gwr = &gw;
    eventually(Duration::from_secs(30), || {
        let mut g = g.clone();
        async move {
            let r = g.count(pb::CountRequest {
                collection: "e".into(),
                read: read(pb::ConsistencyLevel::Eventually, ""),
                ..Default::default()
            });
            r.await.is_ok() && topology_reads(gwr, "alt").await > before
        }
    })
    .await;

    // Its registration is revoked: it leaves the topology and gets no more reads.
    alt_cancel.cancel();
    alt_task.await.unwrap();
    eventually(Duration::from_secs(30), || async { ids(topology(&gw).await) == ["lead"] }).await;
    for _ in 0..20 {
        let r =
            g.count(pb::CountRequest { collection: "e".into(), read: read(pb::ConsistencyLevel::Eventually, ""), ..Default::default() });
        assert_eq!(r.await.expect("reads keep working on the remaining cluster").into_inner().count, 10);
    }
    lead_reg.0.cancel();
    gw.stop().await.unwrap();
}

async fn topology_reads(gw: &tandem_gateway::Running, id: &str) -> u64 {
    topology(gw).await.clusters.iter().find(|c| c.id == id).map_or(0, |c| c.reads_routed)
}

/// A TCP proxy in front of a cluster that, once armed, loses the next reply: the first bytes the
/// cluster sends back are dropped and the client's connection is reset. The request itself
/// went through, so the gateway cannot know whether it was applied.
struct LossyProxy {
    addr: std::net::SocketAddr,
    armed: Arc<AtomicBool>,
    resets: Arc<AtomicU64>,
}

impl LossyProxy {
    async fn start(target: std::net::SocketAddr) -> LossyProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (armed, resets) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let p = LossyProxy { addr: listener.local_addr().unwrap(), armed: armed.clone(), resets: resets.clone() };
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else { continue };
                let (armed, resets) = (armed.clone(), resets.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    // Closing with linger 0 sends RST: the connection is reset, not closed.
                    let _ = client.set_zero_linger();
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = sr.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if armed.swap(false, Ordering::SeqCst) {
                                resets.fetch_add(1, Ordering::SeqCst);
                                return Ok(());
                            }
                            cw.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        p
    }

    fn lose_next_reply(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_whose_reply_is_lost_is_sent_again_only_if_idempotent() {
    let sb = Sandbox::builder().leading("a").build().await;
    let proxy = LossyProxy::start(sb.addr("a").await).await;
    let mut cfg = tandem_gateway::GatewayConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    // One connection and no periodic checks while the leader is known: after arming, the
    // proxy's next reply is the write's.
    cfg.routing.connections_per_cluster = 1;
    cfg.health.interval_ms = 3_600_000;
    cfg.health.healthy_after = 1;
    cfg.routing.default_timeout_ms = 120_000;
    cfg.buffer.max_wait_ms = 120_000;
    let reg = tandem_discovery::Registration { id: "a".into(), datacenter: String::new(), endpoint: format!("http://{}", proxy.addr) };
    let gw = tandem_gateway::start(cfg, tandem_discovery::static_list(vec![reg])).await.expect("gateway");
    eventually(Duration::from_secs(30), || async { topology(&gw).await.leader == "a" }).await;
    let mut g = connect(gw.addr).await;
    create(&mut g, "u").await;
    insert(&mut g, "u", 0..10).await;

    // An insert whose reply is lost: its outcome is unknown, so it is not sent again.
    proxy.lose_next_reply();
    let e = g.insert(insert_req("u", 10..20)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("the outcome of this Insert is unknown"), "{e:?}");
    assert!(e.message().contains("send it again as an upsert"), "{e:?}");
    assert_eq!(proxy.resets.load(Ordering::SeqCst), 1);

    // The leader was suspect, then checked again (fast, as no leader was known).
    eventually(Duration::from_secs(30), || async { topology(&gw).await.leader == "a" }).await;
    // An upsert whose reply is lost is held and sent again: applying it twice changes nothing.
    proxy.lose_next_reply();
    let upsert =
        pb::UpsertRequest { collection: "u".into(), ids: (20..25).collect(), vectors: vectors(5, DIM, 20), payloads: vec![], ack: 0 };
    let r = g.upsert(upsert).await.expect("the upsert was sent again after its reply was lost");
    assert_eq!(r.into_inner().count, 5);
    assert_eq!(proxy.resets.load(Ordering::SeqCst), 2, "the upsert's first reply was lost");
    let t = topology(&gw).await;
    assert_eq!(t.clusters[0].writes_routed, 5, "create, insert, the lost insert, the upsert twice: {t:?}");
    let mut direct = sb.client("a").await;
    let found = direct.get(get_req("u", (20..25).collect(), read(pb::ConsistencyLevel::Strong, ""))).await.unwrap().into_inner();
    assert_eq!(found.entities.len(), 5, "each upserted id once");
    let n = count(&mut direct, "u").await;
    assert!(n == 15 || n == 25, "the lost insert was applied entirely or not at all: {n}");
}

/// Searches that wait for a busy cluster go out merged (`routing.coalesce`): each caller gets
/// exactly the answer a search of its own gets, and a malformed search merged with others gets
/// its own error, not someone else's results.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merged_searches_answer_each_caller_as_if_sent_alone() {
    let sb = Sandbox::builder().leading("a").build().await;
    // One search out at a time: every search that arrives meanwhile waits and merges.
    let gw = sb.gateway(&["a"], |cfg| cfg.routing.coalesce.max_in_flight = 1).await;
    let (g, _) = serving(&gw, 1, "c1", 200).await;
    let mut direct = sb.client("a").await;
    let strong = || read(pb::ConsistencyLevel::Strong, "");
    // Query i: its own vector, top 5; every 4th is malformed (half a vector, so two of them
    // laid end to end would make one valid query).
    let request = |i: u64| {
        let vectors = if i % 4 == 3 { vectors(1, DIM, 5000 + i)[..DIM / 2].to_vec() } else { vectors(1, DIM, 5000 + i) };
        pb::SearchRequest { collection: "c1".into(), vectors, top_k: 5, read: strong(), ..Default::default() }
    };
    let mut expected = Vec::new();
    for i in 0..32 {
        expected.push(direct.search(request(i)).await.map(|r| r.into_inner().results).map_err(|s| (s.code(), s.message().to_string())));
    }
    assert!(expected.iter().filter(|e| e.is_err()).all(|e| e.as_ref().unwrap_err().0 == Code::InvalidArgument));
    let merged = || async { topology(&gw).await.clusters[0].merged_searches };
    let mut rounds = 0;
    // Merging depends on searches arriving while one is out; on a loaded machine a round may
    // not merge, so rounds repeat (each checked) until some did.
    while rounds < 3 || (merged().await == 0 && rounds < 40) {
        rounds += 1;
        let calls = (0..32u64).map(|i| {
            let mut g = g.clone();
            async move { g.search(request(i)).await.map(|r| r.into_inner().results).map_err(|s| (s.code(), s.message().to_string())) }
        });
        let got = futures::future::join_all(calls).await;
        for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
            match (got, want) {
                (Ok(got), Ok(want)) => assert_same_hits(got, want, &format!("search {i}, round {rounds}")),
                _ => assert_eq!(got, want, "search {i}, round {rounds}"),
            }
        }
    }
    let c = &topology(&gw).await.clusters[0];
    assert!(c.merged_searches > 0 && c.merged_requests > 0, "no search was merged in {rounds} rounds: {c:?}");
    assert!(c.merged_searches >= 2 * c.merged_requests, "a merged request carries at least two searches: {c:?}");
    gw.stop().await.expect("stop gateway");
}

/// The same ids in the same order, and the same distances up to float rounding (a batch of
/// many queries may take faiss's matrix-multiply path, which rounds differently).
fn assert_same_hits(got: &[pb::Hits], want: &[pb::Hits], what: &str) {
    let ids = |r: &[pb::Hits]| r.iter().map(|h| h.hits.iter().map(|h| h.id).collect::<Vec<_>>()).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(want), "{what}");
    for (g, w) in got.iter().flat_map(|h| &h.hits).zip(want.iter().flat_map(|h| &h.hits)) {
        assert!((g.distance - w.distance).abs() <= 1e-4 * w.distance.abs().max(1.0), "{what}: {g:?} vs {w:?}");
    }
}
