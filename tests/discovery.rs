//! etcd discovery against a real etcd (Debian's etcd-server): clusters register under a prefix
//! with a lease, watchers see them come and go, through revokes, expiries, bad values and etcd
//! restarts.

mod sandbox;

use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use tandem_discovery::etcd::{Lease, connect, register, watch};
use tandem_discovery::{Change, DiscoveryError, Registration};
use tandem_harness::Etcd;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "/tandem/clusters/";
/// How long a test waits for the next change before failing (a liveness bound, not a timing
/// assertion).
const PATIENCE: Duration = Duration::from_secs(30);

fn reg(id: &str, port: u16) -> Registration {
    Registration { id: id.into(), datacenter: format!("dc-{id}"), endpoint: format!("http://10.0.0.1:{port}") }
}

async fn next(w: &mut BoxStream<'static, Change>) -> Change {
    tokio::time::timeout(PATIENCE, w.next())
        .await
        .unwrap_or_else(|_| panic!("no discovery change within {PATIENCE:?}"))
        .expect("the watch stream never ends")
}

struct Registrant {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(etcd: &Etcd, r: Registration, ttl_s: u64) -> Registrant {
    let cancel = CancellationToken::new();
    let task = register(etcd.endpoints(), PREFIX.into(), ttl_s, r, cancel.clone()).await.expect("register");
    Registrant { cancel, task }
}

impl Registrant {
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.expect("registration task");
    }
}

async fn raw_client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect(etcd.endpoints(), None).await.expect("etcd client")
}

#[tokio::test]
async fn watch_sees_a_registration_with_its_content() {
    let etcd = Etcd::start().await;
    let a = reg("a", 1);
    let r = start(&etcd, a.clone(), 30).await;
    let mut w = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    assert_eq!(next(&mut w).await, Change::Up(a.clone()));

    // The stored value is the documented JSON, under <prefix><id>, attached to a lease.
    let mut c = raw_client(&etcd).await;
    let got = c.get(format!("{PREFIX}a"), None).await.unwrap();
    let kv = &got.kvs()[0];
    let json: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
    assert_eq!(json, serde_json::json!({"id": "a", "datacenter": "dc-a", "endpoint": "http://10.0.0.1:1"}));
    assert_ne!(kv.lease(), 0, "the registration must hold a lease");
    r.stop().await;
}

#[tokio::test]
async fn cancel_revokes_so_watchers_see_down_before_the_ttl() {
    let etcd = Etcd::start().await;
    let mut w = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    // A TTL far beyond PATIENCE: a Down can only come from the revoke, not from expiry.
    let r = start(&etcd, reg("a", 1), 600).await;
    assert_eq!(next(&mut w).await, Change::Up(reg("a", 1)));
    r.stop().await;
    assert_eq!(next(&mut w).await, Change::Down { id: "a".into() });
    let mut c = raw_client(&etcd).await;
    assert!(c.get(format!("{PREFIX}a"), None).await.unwrap().kvs().is_empty());
}

#[tokio::test]
async fn a_registrant_that_dies_without_revoking_goes_down_after_its_ttl() {
    let etcd = Etcd::start().await;
    let mut w = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    let r = start(&etcd, reg("a", 1), 2).await;
    assert_eq!(next(&mut w).await, Change::Up(reg("a", 1)));
    // Longer than the TTL passes (the passage of time is what is tested here): the registration
    // stays, on the same lease, because it is renewed.
    let mut c = raw_client(&etcd).await;
    let lease = c.get(format!("{PREFIX}a"), None).await.unwrap().kvs()[0].lease();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let kvs = c.get(format!("{PREFIX}a"), None).await.unwrap();
    assert_eq!(kvs.kvs().len(), 1, "renewals keep the registration past its ttl");
    assert_eq!(kvs.kvs()[0].lease(), lease);
    // Dies: the task is dropped mid-flight, nothing revokes the lease.
    r.task.abort();
    let _ = r.task.await;
    assert_eq!(next(&mut w).await, Change::Down { id: "a".into() });
    let ttl = c.lease_time_to_live(lease, None).await.unwrap().ttl();
    assert!(ttl <= 0, "the lease expired (ttl {ttl})");
}

#[tokio::test]
async fn malformed_values_are_skipped_and_later_good_ones_arrive() {
    let etcd = Etcd::start().await;
    let mut c = raw_client(&etcd).await;
    // Present before the watch starts (initial list) ...
    c.put(format!("{PREFIX}junk"), "not json", None).await.unwrap();
    let mut w = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    // ... and arriving through the watch: bad JSON, an id that differs from the key.
    c.put(format!("{PREFIX}junk2"), "{\"id\":", None).await.unwrap();
    c.put(format!("{PREFIX}x"), serde_json::to_string(&reg("y", 9)).unwrap(), None).await.unwrap();
    let r = start(&etcd, reg("a", 1), 600).await;
    assert_eq!(next(&mut w).await, Change::Up(reg("a", 1)));
    // A good registration overwritten with garbage: that cluster is no longer known.
    c.put(format!("{PREFIX}b"), serde_json::to_string(&reg("b", 2)).unwrap(), None).await.unwrap();
    assert_eq!(next(&mut w).await, Change::Up(reg("b", 2)));
    c.put(format!("{PREFIX}b"), "garbage", None).await.unwrap();
    assert_eq!(next(&mut w).await, Change::Down { id: "b".into() });
    // A watcher started now lists past the junk too.
    let mut w2 = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    assert_eq!(next(&mut w2).await, Change::Up(reg("a", 1)));
    r.stop().await;
    assert_eq!(next(&mut w).await, Change::Down { id: "a".into() });
    assert_eq!(next(&mut w2).await, Change::Down { id: "a".into() });
}

#[tokio::test]
async fn a_later_watcher_sees_the_current_set() {
    let etcd = Etcd::start().await;
    let a = start(&etcd, reg("a", 1), 600).await;
    let b = start(&etcd, reg("b", 2), 600).await;
    let mut w1 = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    let mut first = vec![next(&mut w1).await, next(&mut w1).await];
    first.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(first, vec![Change::Up(reg("a", 1)), Change::Up(reg("b", 2))]);
    a.stop().await;
    assert_eq!(next(&mut w1).await, Change::Down { id: "a".into() });

    // Only b is registered now; nothing about a reaches the new watcher.
    let mut w2 = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    assert_eq!(next(&mut w2).await, Change::Up(reg("b", 2)));
    let c = start(&etcd, reg("c", 3), 600).await;
    assert_eq!(next(&mut w2).await, Change::Up(reg("c", 3)));
    assert_eq!(next(&mut w1).await, Change::Up(reg("c", 3)));
    // A changed registration (same id, new endpoint) is an Up with the new content.
    b.stop().await;
    assert_eq!(next(&mut w2).await, Change::Down { id: "b".into() });
    let b2 = start(&etcd, reg("b", 20), 600).await;
    assert_eq!(next(&mut w2).await, Change::Up(reg("b", 20)));
    c.stop().await;
    b2.stop().await;
}

#[tokio::test]
async fn registrations_and_watches_survive_an_etcd_restart() {
    let mut etcd = Etcd::start().await;
    let a = start(&etcd, reg("a", 1), 2).await;
    let mut w = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    assert_eq!(next(&mut w).await, Change::Up(reg("a", 1)));

    etcd.restart().await;
    // Well past the TTL (the passage of time is what is tested): the registrant resumed its
    // renewals on the restarted etcd, or its key would have expired.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut c = raw_client(&etcd).await;
    assert_eq!(c.get(format!("{PREFIX}a"), None).await.unwrap().kvs().len(), 1, "registration kept across the restart");
    // The watcher still works: a cluster registering after the restart shows up ...
    let b = start(&etcd, reg("b", 2), 2).await;
    assert_eq!(next(&mut w).await, Change::Up(reg("b", 2)));
    // ... and the first registrant still holds a live lease it can revoke.
    a.stop().await;
    assert_eq!(next(&mut w).await, Change::Down { id: "a".into() });
    b.stop().await;
    assert_eq!(next(&mut w).await, Change::Down { id: "b".into() });
}

#[tokio::test]
async fn registrant_and_watcher_wait_for_an_etcd_that_is_down_at_start() {
    let mut etcd = Etcd::start().await;
    etcd.kill();
    // Neither fails: both retry in the background until etcd answers.
    let mut w = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    let a = start(&etcd, reg("a", 1), 600).await;
    etcd.restart().await;
    assert_eq!(next(&mut w).await, Change::Up(reg("a", 1)));
    a.stop().await;
    assert_eq!(next(&mut w).await, Change::Down { id: "a".into() });
}

#[tokio::test]
async fn a_registrant_registers_again_when_etcd_lost_everything() {
    let mut etcd = Etcd::start().await;
    let a = start(&etcd, reg("a", 1), 3).await;
    let mut w = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    assert_eq!(next(&mut w).await, Change::Up(reg("a", 1)));

    // A fresh etcd at the same address: the key and the lease are gone. The registrant finds
    // its lease unknown, grants a new one and puts its key again.
    etcd.restart_empty().await;
    let mut c = raw_client(&etcd).await;
    sandbox::eventually(PATIENCE, || {
        let mut c = c.clone();
        async move { c.get(format!("{PREFIX}a"), None).await.map(|r| r.kvs().len() == 1).unwrap_or(false) }
    })
    .await;
    // Whether the watcher listed the empty store (Down, then Up when the key came back) or
    // only the store with the key back (nothing changed) depends on who reconnected first.
    // Everything up to a marker registration that follows the revoke tells.
    a.stop().await;
    let m = start(&etcd, reg("marker", 9), 600).await;
    let mut seen = Vec::new();
    loop {
        match next(&mut w).await {
            Change::Up(r) if r.id == "marker" => break,
            other => seen.push(other),
        }
    }
    let down = Change::Down { id: "a".into() };
    assert!(
        seen == vec![down.clone()] || seen == vec![down.clone(), Change::Up(reg("a", 1)), down.clone()],
        "unexpected changes across the etcd loss: {seen:?}"
    );
    eprintln!("changes across the etcd loss: {seen:?}");
    assert!(c.get(format!("{PREFIX}a"), None).await.unwrap().kvs().is_empty());
    m.stop().await;
}

/// A real `tandem cluster` process registers itself (advertised endpoint, datacenter) and
/// deregisters on SIGTERM.
#[tokio::test]
async fn tandem_cluster_registers_and_leaves_on_shutdown() {
    let etcd = Etcd::start().await;
    let mut w = watch(etcd.endpoints(), PREFIX.into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tandem.toml");
    std::fs::write(
        &config,
        format!(
            "cluster_id = \"east\"\ndatacenter = \"dc-east\"\n[discovery]\netcd = [\"{}\"]\nprefix = \"{PREFIX}\"\nttl_s = 600\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let p = sandbox::ProcessCluster::start(&data, &[("TANDEM_CONFIG", config.to_str().unwrap())]);
    let expected = Registration { id: "east".into(), datacenter: "dc-east".into(), endpoint: format!("http://{}", p.addr) };
    assert_eq!(next(&mut w).await, Change::Up(expected));
    // SIGTERM: a graceful shutdown revokes the lease (a 600 s TTL could not expire in time).
    let status = std::process::Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(next(&mut w).await, Change::Down { id: "east".into() });
    drop(p);
}

/// The lease plumbing the arbiter builds on: renewals report how long the lease is certainly
/// valid, and a revoked lease ends the keep-alive with LeaseLost.
#[tokio::test]
async fn lease_renewals_report_validity_and_a_revoke_is_lease_lost() {
    let etcd = Etcd::start().await;
    let client = connect(&etcd.endpoints()).await.unwrap();
    let lease = Lease::grant(&client, &etcd.endpoints(), 2).await.unwrap();
    assert_eq!(lease.ttl(), Duration::from_secs(2));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let keeper = {
        let (lease, cancel) = (lease.clone(), cancel.clone());
        tokio::spawn(async move { lease.keep_alive_with(&cancel, |until| tx.send(until).unwrap()).await })
    };
    let mut last = None;
    for _ in 0..3 {
        let until: Instant = tokio::time::timeout(PATIENCE, rx.recv()).await.unwrap().unwrap();
        assert!(until > Instant::now(), "a renewal just confirmed is valid for a while");
        assert!(last.is_none_or(|l| until > l), "each renewal extends the validity");
        last = Some(until);
    }
    lease.revoke().await.unwrap();
    let r = tokio::time::timeout(PATIENCE, keeper).await.unwrap().unwrap();
    assert!(matches!(r, Err(DiscoveryError::LeaseLost { .. })), "{r:?}");
    assert!(r.unwrap_err().is_transient());
    // Granting again works; cancelling the keep-alive is a clean stop.
    let lease = Lease::grant(&client, &etcd.endpoints(), 2).await.unwrap();
    let cancel = CancellationToken::new();
    cancel.cancel();
    lease.keep_alive(&cancel).await.unwrap();
}
