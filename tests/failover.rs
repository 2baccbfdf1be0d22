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
    let report = tokio::time::timeout(Duration::from_secs(600), measure(&args)).await.expect("the failover run hung").expect("failover run");
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
