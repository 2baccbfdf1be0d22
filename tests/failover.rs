//! Automatic failover.
//!
//! * With real processes: an etcd arbiter, a Kafka-protocol broker (tansu), three `tandem
//!   cluster` processes and a gateway. The leader is killed with SIGKILL under write and read
//!   load through the gateway, twice in a row (the second time the cluster promoted the first
//!   time): no acknowledged write is lost, no read fails, writes resume, and each killed leader,
//!   restarted on its data, rejoins as an alternative and converges. This runs `tandem bench
//!   failover` itself (`tandem::bench::failover::measure`), so the assertions hold for exactly
//!   what the bench reports.
//! * In the sandbox (members in this process, each behind a link, one embedded arbiter per
//!   sandbox, tansu as the broker): a paused leader, a partitioned leader that clients on its
//!   side keep writing to, a standby, a switchover, and datacenter preference.

mod sandbox;

use std::time::Duration;

use tandem::bench::failover::{FailoverBenchArgs, measure};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_twice_under_load_loses_nothing_and_old_leaders_rejoin() {
    let _serial = SERIAL.lock().await;
    let args = FailoverBenchArgs {
        rounds: 2,
        clusters: 3,
        lease_ttl_s: 2,
        load_s: 1.5,
        tandem_bin: Some(env!("CARGO_BIN_EXE_tandem").into()),
        ..Default::default()
    };
    let report =
        tokio::time::timeout(Duration::from_secs(600), measure(&args)).await.expect("the failover run hung").expect("failover run");
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report.rounds.len(), 2);
    let mut killed = Vec::new();
    for (i, r) in report.rounds.iter().enumerate() {
        assert_ne!(r.killed, r.new_leader, "round {i}: the killed cluster cannot lead");
        assert!(r.converged, "round {i}: the clusters did not converge after {} rejoined", r.killed);
        assert_eq!(r.writes_lost, 0, "round {i}: acknowledged writes were lost");
        assert_eq!(r.reads_failed, 0, "round {i}: reads failed during the failover: {:?}", report.read_errors);
        assert!(r.writes_acked > 0);
        killed.push(r.killed.clone());
    }
    // Two failures in a row: the second round killed the leader the first one promoted.
    assert_eq!(report.rounds[1].killed, report.rounds[0].new_leader);
    assert!(report.rounds[1].epoch > report.rounds[0].epoch, "each promotion raises the epoch");
}

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use sandbox::*;
use tandem_proto::v1 as pb;

const COLL: &str = "failover";
const DIM: usize = 8;
const ROLE_WAIT: Duration = Duration::from_secs(60);

/// One failover at a time in this binary: elections are decided by timing (lease expiry, rank
/// delays of 300 ms), and five groups electing at once on a 2-core machine measure the machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn vector(id: i64) -> Vec<f32> {
    (0..DIM).map(|j| ((id * 31 + j as i64 * 17).rem_euclid(1000)) as f32 / 1000.0).collect()
}

/// An HA sandbox on `broker`: `f` adds its clusters (the first one leading).
async fn ha(broker: &tandem_harness::Tansu, f: impl FnOnce(SandboxBuilder) -> SandboxBuilder) -> Sandbox {
    f(Sandbox::builder().transport(Backend::Kafka { brokers: broker.brokers() }).ha()).build().await
}

async fn upsert(c: &mut Client, id: i64) -> Result<(), tonic::Status> {
    let mut req =
        tonic::Request::new(pb::UpsertRequest { collection: COLL.into(), ids: vec![id], vectors: vector(id), ..Default::default() });
    req.set_timeout(Duration::from_secs(10));
    c.upsert(req).await.map(|_| ())
}

/// Whether every named cluster shows the same rows (STRONG reads), within `limit`.
async fn converged(sb: &Sandbox, names: &[&str], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut sums = std::collections::BTreeSet::new();
        let mut all = true;
        for n in names {
            match try_checksum(&mut sb.client(n).await, COLL, pb::ConsistencyLevel::Strong).await {
                Ok(s) => {
                    sums.insert(s);
                }
                Err(_) => all = false,
            }
        }
        if all && sums.len() == 1 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Leader `a` and alternative `b` (caught up, each config adjusted by `adjust`) with the
/// collection created; a client of `a`.
async fn leader_and_alternative(
    broker: &tandem_harness::Tansu,
    adjust: fn(&mut tandem_cluster::config::ClusterConfig),
) -> (Sandbox, Client) {
    let sb = ha(broker, |b| b.cluster_with("a", adjust).alternative_with("b", "a", adjust)).await;
    sb.wait_role("a", pb::Role::Leading, ROLE_WAIT).await;
    let mut ca = sb.client("a").await;
    ca.create_collection(pb::CreateCollectionRequest { schema: Some(schema(COLL, DIM as u32, pb::Metric::L2, None, 2, vec![])) })
        .await
        .expect("create the collection");
    sb.wait_role("b", pb::Role::Alternative, ROLE_WAIT).await;
    (sb, ca)
}

/// Leader `a` and alternative `b` (caught up) with the collection and rows 1..=40 acknowledged
/// by `a`.
async fn leader_and_alternative_with_rows(broker: &tandem_harness::Tansu) -> (Sandbox, Vec<i64>) {
    let (sb, mut ca) = leader_and_alternative(broker, |_| {}).await;
    let acked: Vec<i64> = (1..=40).collect();
    for &id in &acked {
        upsert(&mut ca, id).await.expect("the leader takes writes");
    }
    (sb, acked)
}

/// A leader whose lease renewals stop long enough for it to fence itself, but not long enough
/// for the lease to run out, still holds the leader key once renewals resume, under a lease that
/// now lives on: it must give the key up, or nobody leads again. Found by the docker fault
/// campaign (docs/deploy.md): a leader fenced 3 ms after its promotion, and the group stayed
/// without a leader. Lease 4 s, fence margin 2.5 s: fenced 1.5 s after its last renewal, the
/// lease ends 4 s after it; renewals stop for 2.1 s, so it is fenced and its lease survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_fenced_while_its_lease_lives_gives_up_the_leader_key() {
    let _serial = SERIAL.lock().await;
    let broker = tandem_harness::Tansu::start(false);
    let (sb, mut ca) = leader_and_alternative(&broker, |c| {
        c.ha.lease_ttl_s = 4;
        c.ha.fence_margin_ms = 2500;
    })
    .await;
    upsert(&mut ca, 1).await.expect("the leader takes writes");

    sb.arbiter().pause("a");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    sb.arbiter().resume("a");

    // Some cluster leads again and takes writes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut id = 100;
    loop {
        for name in ["a", "b"] {
            if sb.role(name).await == Some(pb::Role::Leading) {
                id += 1;
                if upsert(&mut sb.client(name).await, id).await.is_ok() {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no cluster took a write within 20 s of the pause (roles: a {:?}, b {:?}): a fenced leader kept the leader key",
            sb.role("a").await,
            sb.role("b").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A leader paused past its lease (SIGSTOP-like: the sandbox's link lets nothing through, its
/// arbiter calls hang): an alternative is promoted; the paused leader, once resumed, refuses
/// every write (it never acknowledges one while another cluster leads), rejoins as an
/// alternative of the new epoch and converges. Nothing it acknowledged before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_and_rejoins() {
    let _serial = SERIAL.lock().await;
    let broker = tandem_harness::Tansu::start(false);
    let (sb, acked) = leader_and_alternative_with_rows(&broker).await;
    sb.pause("a").await;
    sb.wait_role("b", pb::Role::Leading, ROLE_WAIT).await;
    let epoch = sb.epoch("b").await;
    assert!(epoch >= 2, "the promotion raised the epoch: {epoch}");
    sb.resume("a").await;

    let mut ca = sb.client("a").await;
    let refused: Vec<i64> = (1000..1010).collect();
    for &id in &refused {
        let s = upsert(&mut ca, id).await.expect_err("a fenced leader acknowledged a write while another cluster leads");
        use tandem_proto::wire::Reason;
        let why = tandem_proto::wire::refusal(&s);
        assert!(matches!(why, Some(Reason::NotLeader(_) | Reason::Fenced(_))), "unexpected refusal: {s:?} ({why:?})");
    }
    sb.wait_role("a", pb::Role::Alternative, ROLE_WAIT).await;
    assert_eq!(sb.epoch("a").await, epoch);

    let mut cb = sb.client("b").await;
    for id in 2000..2010 {
        upsert(&mut cb, id).await.expect("the new leader takes writes");
    }
    assert_eq!(missing(&mut sb.client("b").await, COLL, &acked).await, 0, "writes a acknowledged before the pause were lost");
    assert_eq!(missing(&mut sb.client("b").await, COLL, &refused).await, refused.len(), "a refused write appeared");
    assert_eq!(count(&mut cb, COLL).await, 50);
    assert!(converged(&sb, &["a", "b"], ROLE_WAIT).await, "a did not converge with b");
}

/// Split brain, the case fencing exists for: the leader is cut off from the arbiter and from
/// the other side, but clients on its own side keep writing to it. Before its lease can have
/// expired it stops acknowledging; the other side promotes `b`; every write `a` acknowledged
/// is in `b` (none was acknowledged after `b` led), and once healed `a` rejoins and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_acknowledges_nothing_the_new_leader_lacks() {
    let _serial = SERIAL.lock().await;
    let broker = tandem_harness::Tansu::start(false);
    let (sb, acked) = leader_and_alternative_with_rows(&broker).await;
    // The writer reaches a past the partition (its own side of it).
    let inner = sb.inner_addr("a").await;
    let acked_by_a = Arc::new(Mutex::new(Vec::<(i64, Instant)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked_by_a, stop) = (acked_by_a.clone(), stop.clone());
        tokio::spawn(async move {
            let mut c = connect(inner).await;
            let mut id = 10_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if upsert(&mut c, id).await.is_ok() {
                    acked_by_a.lock().push((id, Instant::now()));
                }
                id += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    sb.partition("a").await;
    sb.wait_role("b", pb::Role::Leading, ROLE_WAIT).await;
    let b_leads = Instant::now();
    // Clients on a's side go on writing for a while after b leads.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let acked_by_a = acked_by_a.lock().clone();
    assert!(!acked_by_a.is_empty(), "a acknowledged nothing before the partition: the test proves nothing");
    let late = acked_by_a.iter().filter(|(_, at)| *at > b_leads).count();
    assert_eq!(late, 0, "a acknowledged {late} writes after b led");
    let ids: Vec<i64> = acked_by_a.iter().map(|(id, _)| *id).chain(acked.iter().copied()).collect();
    assert_eq!(missing(&mut sb.client("b").await, COLL, &ids).await, 0, "writes a acknowledged are missing from the new leader");

    sb.resume("a").await;
    sb.wait_role("a", pb::Role::Alternative, ROLE_WAIT).await;
    let mut cb = sb.client("b").await;
    upsert(&mut cb, 99_999).await.expect("the new leader takes writes");
    assert!(converged(&sb, &["a", "b"], ROLE_WAIT).await, "a did not converge with b");
}

/// Active/standby: a standby follows but serves nothing, reads included, until it is promoted
/// when the active cluster stops answering; then it has every acknowledged write and takes
/// writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_serves_nothing_until_promoted() {
    let _serial = SERIAL.lock().await;
    let broker = tandem_harness::Tansu::start(false);
    let sb = ha(&broker, |b| b.leading("a").standby("s")).await;
    sb.wait_role("a", pb::Role::Leading, ROLE_WAIT).await;
    let mut ca = sb.client("a").await;
    ca.create_collection(pb::CreateCollectionRequest { schema: Some(schema(COLL, DIM as u32, pb::Metric::L2, None, 2, vec![])) })
        .await
        .unwrap();
    sb.wait_role("s", pb::Role::Standby, ROLE_WAIT).await;
    for id in 1..=30 {
        upsert(&mut ca, id).await.unwrap();
    }
    let mut cs = sb.client("s").await;
    let r = cs
        .count(pb::CountRequest { collection: COLL.into(), filter: String::new(), read: read(pb::ConsistencyLevel::Eventually, "") })
        .await;
    assert!(r.is_err(), "a standby served a read: {r:?}");
    assert!(upsert(&mut cs, 99).await.is_err(), "a standby took a write");

    sb.pause("a").await;
    sb.wait_role("s", pb::Role::Leading, ROLE_WAIT).await;
    assert_eq!(count(&mut cs, COLL).await, 30);
    upsert(&mut cs, 31).await.expect("the promoted standby takes writes");
    assert_eq!(count(&mut cs, COLL).await, 31);
}

fn tandem_failover(to: &str, endpoint: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["failover", "--to", to, "--endpoint", endpoint, "--timeout", "30"])
        .output()
        .expect("run tandem failover")
}

/// `tandem failover --to`: leadership moves with no acknowledged write lost; the old leader
/// goes on as an alternative of the new epoch without reloading its data, and converges. A
/// target that is not in the group is refused with a message naming it, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_hands_over_without_losing_a_write() {
    let _serial = SERIAL.lock().await;
    let broker = tandem_harness::Tansu::start(false);
    let (sb, acked) = leader_and_alternative_with_rows(&broker).await;
    let (a, b) = (format!("http://{}", sb.addr("a").await), format!("http://{}", sb.addr("b").await));
    let mut ca = sb.client("a").await;

    let out = tandem_failover("nosuch", &a);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"nosuch\"") && err.contains("members: b"), "unclear refusal: {err}");
    assert_eq!(sb.role("a").await, Some(pb::Role::Leading), "a refused switchover changed the leader");
    upsert(&mut ca, 41).await.expect("a still takes writes");

    // Sent to b (not the leader): the command follows the reply's leader hint to a.
    let out = tandem_failover("b", &b);
    assert!(out.status.success(), "switchover failed: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("cluster b leads now (epoch 2)"), "{said}");
    assert_eq!(sb.role("b").await, Some(pb::Role::Leading));
    assert!(upsert(&mut ca, 42).await.is_err(), "the old leader took a write after the switchover");
    sb.wait_role("a", pb::Role::Alternative, ROLE_WAIT).await;

    let mut cb = sb.client("b").await;
    for id in 43..=50 {
        upsert(&mut cb, id).await.unwrap();
    }
    let mut all = acked.clone();
    all.push(41);
    assert_eq!(missing(&mut sb.client("b").await, COLL, &all).await, 0, "acknowledged writes were lost in the switchover");
    assert_eq!(missing(&mut sb.client("b").await, COLL, &[42]).await, 1, "a refused write appeared");
    assert!(converged(&sb, &["a", "b"], ROLE_WAIT).await, "a did not converge with b");
    assert_eq!(checksum(&mut sb.client("a").await, COLL, pb::ConsistencyLevel::Strong).await.0, 49);
}

/// Datacenter preference: of two caught-up alternatives, the one in the preferred datacenter
/// is promoted, although the other would win a tie on its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preferred_datacenter_is_promoted() {
    let _serial = SERIAL.lock().await;
    let broker = tandem_harness::Tansu::start(false);
    let dc = |name: &'static str| {
        move |c: &mut tandem_cluster::ClusterConfig| {
            c.datacenter = name.into();
            c.ha.prefer_datacenters = vec!["dc3".into()];
        }
    };
    let sb =
        ha(&broker, |b| b.cluster_with("a", dc("dc1")).alternative_with("b", "a", dc("dc2")).alternative_with("c", "a", dc("dc3"))).await;
    sb.wait_role("a", pb::Role::Leading, ROLE_WAIT).await;
    let mut ca = sb.client("a").await;
    ca.create_collection(pb::CreateCollectionRequest { schema: Some(schema(COLL, DIM as u32, pb::Metric::L2, None, 2, vec![])) })
        .await
        .unwrap();
    for n in ["b", "c"] {
        sb.wait_role(n, pb::Role::Alternative, ROLE_WAIT).await;
    }
    for id in 1..=10 {
        upsert(&mut ca, id).await.unwrap();
    }
    sb.pause("a").await;
    sb.wait_role("c", pb::Role::Leading, ROLE_WAIT).await;
    assert_eq!(sb.role("b").await, Some(pb::Role::Alternative));
    assert_eq!(count(&mut sb.client("c").await, COLL).await, 10);
}
