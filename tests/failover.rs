//! Automatic failover with real processes: an etcd arbiter, a Kafka-protocol broker (tansu),
//! three `tandem cluster` processes and a gateway. The leader is killed with SIGKILL under
//! write and read load through the gateway, twice in a row (the second time the cluster
//! promoted the first time): no acknowledged write is lost, no read fails, writes resume, and
//! each killed leader, restarted on its data, rejoins as an alternative and converges.
//!
//! This runs `tandem bench failover` itself (`tandem::bench::failover::measure`), so the
//! assertions hold for exactly what the bench reports.

use std::time::Duration;

use tandem::bench::failover::{FailoverBenchArgs, measure};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_twice_under_load_loses_nothing_and_old_leaders_rejoin() {
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

use tandem::bench::failover::{
    COLLECTION, Harness, Spec, checksum, cluster_info, converged, create_collection, missing, vector, wait_role,
};
use tandem_proto::v1 as pb;

fn args() -> FailoverBenchArgs {
    FailoverBenchArgs { lease_ttl_s: 2, tandem_bin: Some(env!("CARGO_BIN_EXE_tandem").into()), ..Default::default() }
}

async fn client(endpoint: &str) -> pb::tandem_client::TandemClient<tandem_client::Channel> {
    tandem::cli::connect(endpoint).await.expect("connect")
}

async fn upsert(c: &mut pb::tandem_client::TandemClient<tandem_client::Channel>, id: i64) -> Result<(), tonic::Status> {
    c.upsert(pb::UpsertRequest { collection: COLLECTION.into(), ids: vec![id], vectors: vector(id), ..Default::default() })
        .await
        .map(|_| ())
}

async fn count(endpoint: &str) -> u64 {
    let mut c = client(endpoint).await;
    let read = Some(pb::ReadOptions { consistency: pb::ConsistencyLevel::Strong as i32, ..Default::default() });
    c.count(pb::CountRequest { collection: COLLECTION.into(), filter: String::new(), read }).await.expect("count").into_inner().count
}

/// Leader `a` and alternative `b` (caught up), with rows 1..=40 acknowledged by `a`.
async fn leader_and_alternative_with_rows() -> (Harness, Vec<i64>) {
    let h = Harness::start(&args(), &[Spec::new("a", "leading"), Spec::new("b", "alternative")]).await.expect("harness");
    let (a, b) = (h.endpoint("a"), h.endpoint("b"));
    create_collection(&mut client(&a).await).await.unwrap();
    wait_role(&b, pb::Role::Alternative, Duration::from_secs(60)).await.unwrap();
    let mut ca = client(&a).await;
    let acked: Vec<i64> = (1..=40).collect();
    for &id in &acked {
        upsert(&mut ca, id).await.expect("the leader takes writes");
    }
    (h, acked)
}

/// SIGSTOP of the leader past its lease: an alternative is promoted; the paused leader, once
/// resumed, refuses every write (it never acknowledges one while another cluster leads),
/// rejoins as an alternative of the new epoch and converges. Nothing it acknowledged before
/// the pause is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_and_rejoins() {
    let (h, acked) = leader_and_alternative_with_rows().await;
    let (a, b) = (h.endpoint("a"), h.endpoint("b"));

    let ia = h.group.index("a");
    h.group.clusters[ia].signal("STOP").unwrap();
    if let Err(e) = wait_role(&b, pb::Role::Leading, Duration::from_secs(30)).await {
        panic!("b was not promoted while a is paused: {e:#}\n{}", h.logs(40));
    }
    let epoch = cluster_info(&b).await.unwrap().epoch;
    assert!(epoch >= 2, "the promotion raised the epoch: {epoch}");
    h.group.clusters[ia].signal("CONT").unwrap();

    // Right after resuming, before anything else could run on it, a refuses writes.
    let mut ca = client(&a).await;
    let refused: Vec<i64> = (1000..1010).collect();
    for &id in &refused {
        let r = upsert(&mut ca, id).await;
        let s = r.expect_err("a fenced leader acknowledged a write while another cluster leads");
        assert!(matches!(s.code(), tonic::Code::Unavailable | tonic::Code::FailedPrecondition), "unexpected refusal: {s:?}");
    }
    if let Err(e) = wait_role(&a, pb::Role::Alternative, Duration::from_secs(60)).await {
        panic!("a did not rejoin as an alternative: {e:#}\n{}", h.logs(40));
    }
    assert_eq!(cluster_info(&a).await.unwrap().epoch, epoch);

    let mut cb = client(&b).await;
    for id in 2000..2010 {
        upsert(&mut cb, id).await.expect("the new leader takes writes");
    }
    assert_eq!(missing(&b, &acked).await.unwrap(), 0, "writes a acknowledged before the pause were lost");
    assert_eq!(missing(&b, &refused).await.unwrap(), refused.len() as u64, "a refused write appeared");
    assert_eq!(count(&b).await, 50);
    assert!(converged(&h.group, Duration::from_secs(60)).await, "a did not converge with b");
}

/// Active/standby: a standby follows but serves nothing, reads included, until it is promoted
/// when the active cluster dies; then it has every acknowledged write and takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_serves_nothing_until_promoted() {
    let mut h = Harness::start(&args(), &[Spec::new("a", "leading"), Spec::new("s", "standby")]).await.expect("harness");
    let (a, s) = (h.endpoint("a"), h.endpoint("s"));
    create_collection(&mut client(&a).await).await.unwrap();
    wait_role(&s, pb::Role::Standby, Duration::from_secs(60)).await.unwrap();
    let mut ca = client(&a).await;
    for id in 1..=30 {
        upsert(&mut ca, id).await.unwrap();
    }
    let mut cs = client(&s).await;
    let read = Some(pb::ReadOptions { consistency: pb::ConsistencyLevel::Eventually as i32, ..Default::default() });
    let r = cs.count(pb::CountRequest { collection: COLLECTION.into(), filter: String::new(), read }).await;
    assert!(r.is_err(), "a standby served a read: {r:?}");
    assert!(upsert(&mut cs, 99).await.is_err(), "a standby took a write");

    let ia = h.group.index("a");
    h.group.clusters[ia].kill9();
    wait_role(&s, pb::Role::Leading, Duration::from_secs(30)).await.expect("the standby is promoted");
    assert_eq!(count(&s).await, 30);
    upsert(&mut cs, 31).await.expect("the promoted standby takes writes");
    assert_eq!(count(&s).await, 31);
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
    let (h, acked) = leader_and_alternative_with_rows().await;
    let (a, b) = (h.endpoint("a"), h.endpoint("b"));
    let mut ca = client(&a).await;

    let out = tandem_failover("nosuch", &a);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"nosuch\"") && err.contains("members: b"), "unclear refusal: {err}");
    assert_eq!(cluster_info(&a).await.unwrap().role, pb::Role::Leading as i32, "a refused switchover changed the leader");
    upsert(&mut ca, 41).await.expect("a still takes writes");

    // Sent to b (not the leader): the command follows the reply's leader hint to a.
    let out = tandem_failover("b", &b);
    assert!(out.status.success(), "switchover failed: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("cluster b leads now (epoch 2)"), "{said}");
    assert_eq!(cluster_info(&b).await.unwrap().role, pb::Role::Leading as i32);
    assert!(upsert(&mut ca, 42).await.is_err(), "the old leader took a write after the switchover");
    wait_role(&a, pb::Role::Alternative, Duration::from_secs(60)).await.expect("a follows b");

    let mut cb = client(&b).await;
    for id in 43..=50 {
        upsert(&mut cb, id).await.unwrap();
    }
    let mut all = acked.clone();
    all.push(41);
    assert_eq!(missing(&b, &all).await.unwrap(), 0, "acknowledged writes were lost in the switchover");
    assert_eq!(missing(&b, &[42]).await.unwrap(), 1, "a refused write appeared");
    assert!(converged(&h.group, Duration::from_secs(60)).await, "a did not converge with b");
    assert_eq!(checksum(&a).await.unwrap().0, 49);
}

/// Datacenter preference: of two caught-up alternatives, the one in the preferred datacenter
/// is promoted, although the other would win a tie on its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preferred_datacenter_is_promoted() {
    let mut a = args();
    a.prefer_datacenters = vec!["dc3".into()];
    let spec = |name: &str, role, dc: &str| Spec { name: name.into(), role, datacenter: dc.into() };
    let mut h = Harness::start(&a, &[spec("a", "leading", "dc1"), spec("b", "alternative", "dc2"), spec("c", "alternative", "dc3")])
        .await
        .expect("harness");
    create_collection(&mut client(&h.endpoint("a")).await).await.unwrap();
    for n in ["b", "c"] {
        wait_role(&h.endpoint(n), pb::Role::Alternative, Duration::from_secs(60)).await.unwrap();
    }
    let mut ca = client(&h.endpoint("a")).await;
    for id in 1..=10 {
        upsert(&mut ca, id).await.unwrap();
    }
    let ia = h.group.index("a");
    h.group.clusters[ia].kill9();
    let c = h.endpoint("c");
    if let Err(e) = wait_role(&c, pb::Role::Leading, Duration::from_secs(30)).await {
        panic!("the alternative in the preferred datacenter was not promoted: {e:#}\n{}", h.logs(20));
    }
    assert_eq!(cluster_info(&h.endpoint("b")).await.unwrap().role, pb::Role::Alternative as i32);
    assert_eq!(count(&c).await, 10);
}
