//! pymilvus in global-cluster mode follows a kill -9 failover by itself.
//!
//! Real processes: an etcd arbiter, tansu, two `tandem cluster` processes under the arbiter and
//! a gateway. A pymilvus application (`tests/milvus/global_writer.py`, no failover code) uses
//! the URI `http://<gateway>/global-cluster`: it reads the topology from the gateway and writes
//! to the leader directly. The leader is killed with SIGKILL while it writes; the application
//! must keep writing on the promoted cluster, and every write it saw acknowledged must be there.
//!
//! The rest of the Milvus API is covered by the Python suite `tests/milvus/test_pymilvus.py`,
//! which `scripts/test` runs with every pymilvus version it installs.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem::bench::failover::{COLLECTION, FailoverBenchArgs, Harness, Spec, missing};

/// The venv `scripts/install-pymilvus` makes (the test fails, naming it, when it is missing).
fn pymilvus_python() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("TANDEM_PYMILVUS_PYTHON") {
        return p.into();
    }
    let home = std::env::var("HOME").expect("HOME");
    let p = std::path::Path::new(&home).join(".cache/tandem/tools/pymilvus-3.0.2/bin/python");
    assert!(p.exists(), "{} is missing: run ./scripts/install-pymilvus (./scripts/test does)", p.display());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_uri_follows_a_kill9_failover_and_loses_no_acknowledged_write() {
    let args = FailoverBenchArgs { lease_ttl_s: 2, tandem_bin: Some(env!("CARGO_BIN_EXE_tandem").into()), ..Default::default() };
    let mut h = Harness::start(&args, &[Spec::new("a", "leading"), Spec::new("b", "alternative")]).await.expect("harness");
    let gateway = h.gateway().await.expect("gateway");
    let uri = format!("http://{}/global-cluster", gateway.addr);

    // The gateway's topology must name the leader before the application starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gateway.topology().leader().is_none() {
        assert!(Instant::now() < deadline, "the gateway never saw a leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/milvus/global_writer.py");
    let mut app = Command::new(pymilvus_python())
        .args([script, &uri, COLLECTION, "150"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = app.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let (mut acked, mut errors) = (Vec::new(), Vec::new());
    let record = |line: &str, acked: &mut Vec<i64>, errors: &mut Vec<String>| {
        if let Some(id) = line.strip_prefix("ACK ") {
            acked.push(id.parse::<i64>().expect("an id"));
        } else if line.starts_with("ERR ") {
            errors.push(line.to_string());
        }
    };
    // Writes flow, then the leader dies mid-stream.
    let wait = |limit: u64| Instant::now() + Duration::from_secs(limit);
    let until = wait(120);
    while acked.len() < 50 {
        let line =
            tokio::time::timeout_at(until.into(), rx.recv()).await.expect("the application stalled before the kill").expect("it exited");
        record(&line, &mut acked, &mut errors);
    }
    let before_kill = acked.len();
    let leader = h.group.index("a");
    h.group.clusters[leader].kill9();
    let killed_at = Instant::now();

    // It keeps writing on the promoted cluster: 100 more acknowledged writes.
    let until = wait(180);
    while acked.len() < before_kill + 100 {
        let line = tokio::time::timeout_at(until.into(), rx.recv())
            .await
            .expect("the application stopped writing after the kill")
            .expect("it exited");
        record(&line, &mut acked, &mut errors);
    }
    let resumed_after = killed_at.elapsed();
    drop(app.stdin.take());
    while let Some(line) = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.expect("the application did not finish") {
        record(&line, &mut acked, &mut errors);
    }
    assert!(app.wait().expect("python").success(), "the application failed");

    let (new_leader, epoch) = h.group.leader().await.expect("a new leader");
    assert_eq!(h.group.clusters[new_leader].name, "b");
    assert!(epoch >= 2);
    let lost = missing(&h.group.clusters[new_leader].endpoint(), &acked).await.expect("reading back");
    eprintln!(
        "global URI: {} writes acknowledged ({before_kill} before the kill), {} raised, {lost} lost; 100 more acknowledged {resumed_after:?} after the kill",
        acked.len(),
        errors.len()
    );
    assert_eq!(lost, 0, "acknowledged writes are missing on the promoted cluster");
    // The application has no failover code: pymilvus's own retry and topology refresh carried it.
    assert!(errors.is_empty(), "writes raised in the application: {errors:?}");
    gateway.stop().await.expect("gateway stop");
}
