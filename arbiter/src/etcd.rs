//! The etcd arbiter. Each session holds one lease (kept alive by [`Lease::keep_alive_with`],
//! which also yields the `until` a leader fences on) and one watch on the prefix that keeps its
//! [`View`] current. Every decision is a single etcd transaction; the view is only a hint for
//! the caller's next transaction (a stale view makes a campaign fail, never win twice).
//!
//! ```text
//!  session ── grant lease ── put members/<me> (if reported) ── keep alive (ttl/3) ─┐
//!     ▲ Lost: new lease, member key again          ▲ etcd unreachable: same lease │
//!     └────────────────────────────────────────────┴──────────────────────────────┘
//!  view ── get <prefix> (revision R) ── watch <prefix> from R+1 ── broken/compacted: get again
//! ```

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use parking_lot::Mutex;
use tandem_discovery::DiscoveryError;
use tandem_discovery::etcd::{Backoff, Lease, call, connect, etcd_error};
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    Arbiter, ArbiterError, Candidate, HANDOVER_TTL, Leadership, LeaseState, MemberStatus, Result, Session, View, check_candidate,
    check_hand_over, check_report, check_state_name, lease_seconds,
};

/// The arbiter in etcd, under `prefix` (see [`crate::default_prefix`]). Cheap to clone; the
/// client connects lazily on the first `join`.
#[derive(Clone)]
pub struct EtcdArbiter {
    endpoints: Vec<String>,
    keys: Keys,
    client: Arc<OnceCell<Client>>,
    handover_ttl: Duration,
    /// Live sessions, for the test hooks.
    sessions: Arc<Mutex<Vec<Weak<Inner>>>>,
}

impl std::fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArbiter").field("endpoints", &self.endpoints).field("prefix", &self.keys.prefix).finish()
    }
}

/// The key layout under the prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }
    fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }
    fn handover(&self) -> String {
        format!("{}handover", self.prefix)
    }
    fn members(&self) -> String {
        format!("{}members/", self.prefix)
    }
    fn member(&self, cluster: &str) -> String {
        format!("{}members/{cluster}", self.prefix)
    }

    /// A member's coordinator state: outside `members/`, and no lease.
    fn state(&self, cluster: &str, name: &str) -> String {
        format!("{}state/{cluster}/{name}", self.prefix)
    }
}

impl EtcdArbiter {
    /// Fails only on configuration mistakes (no endpoints, empty prefix); etcd being down is
    /// noticed by `join`. A prefix without a trailing `/` gets one, so that one group's prefix
    /// never covers another's keys.
    pub fn new(endpoints: Vec<String>, prefix: String) -> Result<EtcdArbiter> {
        if endpoints.is_empty() || endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(ArbiterError::InvalidConfig(format!("etcd endpoints {endpoints:?}: none, or an empty one")));
        }
        if prefix.is_empty() || prefix == "/" {
            return Err(ArbiterError::InvalidConfig(format!("arbiter key prefix {prefix:?} would cover the whole etcd keyspace")));
        }
        let prefix = if prefix.ends_with('/') { prefix } else { format!("{prefix}/") };
        Ok(EtcdArbiter {
            endpoints,
            keys: Keys { prefix },
            client: Arc::new(OnceCell::new()),
            handover_ttl: HANDOVER_TTL,
            sessions: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// With a switchover's handover key living `ttl` (whole seconds, at least 1) instead of
    /// [`HANDOVER_TTL`].
    pub fn with_handover_ttl(mut self, ttl: Duration) -> EtcdArbiter {
        self.handover_ttl = ttl;
        self
    }

    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    async fn client(&self) -> Result<Client> {
        let c = self.client.get_or_try_init(|| connect(&self.endpoints)).await?;
        Ok(c.clone())
    }

    fn live_sessions(&self, cluster: &str) -> Vec<Arc<Inner>> {
        let mut s = self.sessions.lock();
        s.retain(|w| w.strong_count() > 0);
        s.iter().filter_map(Weak::upgrade).filter(|i| i.me.cluster == cluster).collect()
    }

    /// Test hook: `cluster`'s sessions stop renewing their leases (as a paused or partitioned
    /// process): etcd expires them after their ttl, taking their keys along. The sessions still
    /// ask etcd (read-only) once their lease should be gone, and then say [`LeaseState::Lost`];
    /// they grant no new lease until [`EtcdArbiter::resume`].
    pub fn pause(&self, cluster: &str) {
        for s in self.live_sessions(cluster) {
            s.paused.send_replace(true);
        }
        info!(cluster, "etcd arbiter: renewals paused");
    }

    pub fn resume(&self, cluster: &str) {
        for s in self.live_sessions(cluster) {
            s.paused.send_replace(false);
        }
        info!(cluster, "etcd arbiter: renewals resumed");
    }

    /// Test hook: revokes `cluster`'s leases behind their sessions' backs (as if their ttl had
    /// run out); the sessions find out at their next renewal.
    pub async fn expire(&self, cluster: &str) -> Result<()> {
        for s in self.live_sessions(cluster) {
            let lease = s.lease.lock().clone();
            if let Some(l) = lease {
                l.revoke().await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Arbiter for EtcdArbiter {
    async fn join(&self, me: Candidate, ttl: Duration) -> Result<Arc<dyn Session>> {
        check_candidate(&me)?;
        let client = self.client().await?;
        let ttl_s = lease_seconds(ttl);
        let sent = Instant::now();
        let lease = Lease::grant(&client, &self.endpoints, ttl_s).await?;
        let (lease_tx, lease_rx) = watch::channel(LeaseState::Valid { until: sent + lease.ttl(), lease: lease.id() as u64 });
        let (view_tx, view_rx) = watch::channel(View::default());
        let inner = Arc::new(Inner {
            client,
            endpoints: self.endpoints.clone(),
            keys: self.keys.clone(),
            me,
            ttl_s,
            handover_ttl_s: lease_seconds(self.handover_ttl),
            lease: Mutex::new(Some(lease.clone())),
            status: tokio::sync::Mutex::new(None),
            lease_tx,
            view_tx,
            paused: watch::channel(false).0,
        });
        // The view is current when join returns: callers decide on it straight away.
        let revision = match inner.list().await {
            Ok(revision) => revision,
            Err(e) => {
                let _ = lease.revoke().await;
                return Err(e);
            }
        };
        let cancel = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(keep_leased(inner.clone(), cancel.clone())),
            tokio::spawn(keep_viewing(inner.clone(), revision, cancel.clone())),
        ];
        self.sessions.lock().push(Arc::downgrade(&inner));
        info!(cluster = inner.me.cluster, prefix = inner.keys.prefix, lease = format_args!("{:x}", lease.id()), ttl = ?lease.ttl(), "joined the etcd arbiter");
        Ok(Arc::new(EtcdSession { inner, view_rx, lease_rx, cancel, tasks: Mutex::new(tasks) }))
    }
}

struct Inner {
    client: Client,
    endpoints: Vec<String>,
    keys: Keys,
    me: Candidate,
    ttl_s: i64,
    handover_ttl_s: i64,
    /// The current lease; None between a loss and the next grant.
    lease: Mutex<Option<Lease>>,
    /// The last report, put again under every new lease. Held across its put so that a re-put
    /// never overwrites a newer report.
    status: tokio::sync::Mutex<Option<MemberStatus>>,
    lease_tx: watch::Sender<LeaseState>,
    view_tx: watch::Sender<View>,
    paused: watch::Sender<bool>,
}

impl Inner {
    fn err(&self, e: etcd_client::Error) -> ArbiterError {
        etcd_error(&self.endpoints, e).into()
    }

    async fn call<T>(&self, what: &str, f: impl Future<Output = std::result::Result<T, etcd_client::Error>>) -> Result<T> {
        Ok(call(&self.endpoints, what, f).await?)
    }

    fn current_lease(&self) -> Result<Lease> {
        self.lease
            .lock()
            .clone()
            .ok_or_else(|| ArbiterError::LeaseLost { message: format!("lease of {} lost; granting a new one", self.me.cluster) })
    }

    fn lost(&self, why: &DiscoveryError) {
        let old = self.lease.lock().take();
        self.lease_tx.send_replace(LeaseState::Lost);
        warn!(cluster = self.me.cluster, lease = ?old.map(|l| l.id()), error = %why, "arbiter lease lost");
    }

    async fn put_member(&self, lease: &Lease) -> Result<()> {
        let status = self.status.lock().await;
        let Some(s) = status.as_ref() else { return Ok(()) };
        let value = serde_json::to_string(s).expect("a member status serialises");
        let mut kv = self.client.clone();
        let opts = PutOptions::new().with_lease(lease.id());
        self.call("put member", kv.put(self.keys.member(&self.me.cluster), value, Some(opts))).await.map(|_| ())
    }

    /// Lists the prefix into the view; returns the revision the list reflects.
    async fn list(&self) -> Result<i64> {
        let mut kv = self.client.clone();
        let resp = self.call("get", kv.get(self.keys.prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let mut view = View::default();
        for kv in resp.kvs() {
            self.apply(&mut view, kv.key(), Some(kv.value()));
        }
        self.publish(view);
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    fn publish(&self, view: View) {
        self.view_tx.send_if_modified(|v| {
            if *v == view {
                return false;
            }
            debug!(cluster = self.me.cluster, ?view, "arbiter view changed");
            *v = view;
            true
        });
    }

    /// Applies one key's value (None: deleted) to `view`. Malformed values are logged and read
    /// as absent: one bad writer must not take every member down with it.
    fn apply(&self, view: &mut View, key: &[u8], value: Option<&[u8]>) {
        let Some(name) = std::str::from_utf8(key).ok().and_then(|k| k.strip_prefix(&self.keys.prefix)) else { return };
        match name {
            "epoch" => {
                view.epoch = match value.map(|v| std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()).ok_or(v)) {
                    None => 0,
                    Some(Ok(e)) => e,
                    Some(Err(v)) => {
                        error!(key = name, value = %String::from_utf8_lossy(v), "arbiter epoch is not a number");
                        0
                    }
                }
            }
            "leader" => {
                view.leader = value.and_then(|v| match serde_json::from_slice::<Leadership>(v) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        error!(key = name, error = %e, "arbiter leader key is not a leadership");
                        None
                    }
                })
            }
            "handover" => view.handover = value.map(|v| String::from_utf8_lossy(v).into_owned()),
            _ => {}
        }
    }

    /// Watches from `revision + 1` until the stream breaks (always an error).
    async fn watch_from(&self, revision: i64, backoff: &mut Backoff) -> ArbiterError {
        let mut w = self.client.watch_client();
        let opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = match self.call("watch", w.watch(self.keys.prefix.clone(), Some(opts))).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return self.broken("watch stream closed by etcd".into()),
                Err(e) => return self.err(e),
            };
            if resp.created() {
                backoff.reset();
            }
            if resp.canceled() {
                return self.broken(format!("watch canceled (compact revision {}): {}", resp.compact_revision(), resp.cancel_reason()));
            }
            // One response holds a whole transaction's events: apply them all, then publish
            // once, so that nobody sees a new epoch without its leader.
            let mut view = self.view_tx.borrow().clone();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                match ev.event_type() {
                    EventType::Put => self.apply(&mut view, kv.key(), Some(kv.value())),
                    EventType::Delete => self.apply(&mut view, kv.key(), None),
                }
            }
            self.publish(view);
        }
    }

    fn broken(&self, message: String) -> ArbiterError {
        ArbiterError::Etcd { endpoints: self.endpoints.join(","), message }
    }

    /// The leader key if it is mine at `epoch`, with its mod revision.
    async fn my_leadership(&self, epoch: u64) -> Result<Option<i64>> {
        let mut kv = self.client.clone();
        let resp = self.call("get leader", kv.get(self.keys.leader(), None)).await?;
        let Some(kv) = resp.kvs().first() else { return Ok(None) };
        let l: Leadership = serde_json::from_slice(kv.value())
            .map_err(|e| ArbiterError::BadValue { key: self.keys.leader(), message: format!("not a leadership: {e}") })?;
        Ok((l.cluster == self.me.cluster && l.epoch == epoch).then(|| kv.mod_revision()))
    }
}

/// Keeps the session leased until `cancel`, then revokes: renews the lease; after a loss grants
/// a new one and puts the member key again; while etcd is unreachable retries with the same
/// lease (it may outlive the outage).
async fn keep_leased(inner: Arc<Inner>, cancel: CancellationToken) {
    let max_backoff = Duration::from_secs(inner.ttl_s as u64).div_f64(3.0).clamp(Duration::from_millis(200), Duration::from_secs(2));
    let mut backoff = Backoff::new(Duration::from_millis(100), max_backoff);
    let mut paused = inner.paused.subscribe();
    let cluster = inner.me.cluster.clone();
    loop {
        if cancel.is_cancelled() {
            break;
        }
        if *paused.borrow_and_update() {
            while_paused(&inner, &mut paused, &cancel).await;
            continue;
        }
        let current = inner.lease.lock().clone();
        let lease = match current {
            Some(l) => l,
            None => {
                let sent = Instant::now();
                let granted = tokio::select! {
                    r = Lease::grant(&inner.client, &inner.endpoints, inner.ttl_s) => r,
                    () = cancel.cancelled() => break,
                };
                match granted {
                    Ok(l) => {
                        *inner.lease.lock() = Some(l.clone());
                        inner.lease_tx.send_replace(LeaseState::Valid { until: sent + l.ttl(), lease: l.id() as u64 });
                        info!(cluster, lease = format_args!("{:x}", l.id()), "arbiter: new lease after the last was lost");
                        l
                    }
                    Err(e) => {
                        warn!(cluster, error = %e, "arbiter: lease grant failed; retrying");
                        if !backoff.wait(&cancel).await {
                            break;
                        }
                        continue;
                    }
                }
            }
        };
        // Put the member key on every (re)start: a new lease does not bring it back by itself.
        let put = tokio::select! {
            r = inner.put_member(&lease) => r,
            () = cancel.cancelled() => break,
        };
        if let Err(e) = put {
            if let ArbiterError::LeaseLost { message } = &e {
                inner.lost(&DiscoveryError::LeaseLost { message: message.clone() });
            }
            warn!(cluster, error = %e, "arbiter: member put failed; retrying");
            if !backoff.wait(&cancel).await {
                break;
            }
            continue;
        }
        backoff.reset();
        let kept = tokio::select! {
            r = lease.keep_alive_with(&cancel, |until| {
                inner.lease_tx.send_replace(LeaseState::Valid { until, lease: lease.id() as u64 });
            }) => r,
            () = until_paused(&mut paused) => continue,
        };
        match kept {
            Ok(()) => break,
            Err(e @ DiscoveryError::LeaseLost { .. }) => inner.lost(&e),
            Err(e) => {
                warn!(cluster, error = %e, "arbiter: lease keep-alive interrupted; retrying with the same lease");
                if !backoff.wait(&cancel).await {
                    break;
                }
            }
        }
    }
    let lease = inner.lease.lock().take();
    inner.lease_tx.send_replace(LeaseState::Lost);
    if let Some(l) = lease {
        match l.revoke().await {
            Ok(()) => info!(cluster, "arbiter: lease revoked"),
            Err(e) => warn!(cluster, error = %e, ttl = ?l.ttl(), "arbiter: lease revoke failed; its keys expire with it"),
        }
    }
}

async fn until_paused(paused: &mut watch::Receiver<bool>) {
    if paused.wait_for(|p| *p).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Paused: no renewal, no grant. Once the lease should have run out, asks etcd (a read, which
/// does not renew) whether it is gone, so that the member learns it like a resumed process does.
async fn while_paused(inner: &Inner, paused: &mut watch::Receiver<bool>, cancel: &CancellationToken) {
    let mut next_check = match *inner.lease_tx.borrow() {
        LeaseState::Valid { until, .. } => until + Duration::from_millis(100),
        LeaseState::Lost => Instant::now(),
    };
    loop {
        let lease = inner.lease.lock().clone();
        let sleep = match &lease {
            Some(_) => tokio::time::sleep_until(next_check.max(Instant::now()).into()),
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            r = paused.wait_for(|p| !*p) => {
                if r.is_ok() {
                    return;
                }
            }
            () = sleep => {}
        }
        next_check = Instant::now() + Duration::from_millis(200);
        let Some(l) = lease else { continue };
        let mut c = inner.client.clone();
        match call(&inner.endpoints, "lease time-to-live", c.lease_time_to_live(l.id(), None)).await {
            Ok(r) if r.ttl() <= 0 => inner.lost(&DiscoveryError::LeaseLost { message: format!("lease {:x} expired", l.id()) }),
            Ok(_) => {}
            Err(e) => debug!(cluster = inner.me.cluster, error = %e, "arbiter: lease time-to-live failed while paused"),
        }
    }
}

/// Keeps the view current from `revision` until `cancel`: watch, and after a broken watch list
/// again (the difference is published) and watch from the new revision.
async fn keep_viewing(inner: Arc<Inner>, revision: i64, cancel: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    // None: the view must be listed again before watching.
    let mut from = Some(revision);
    loop {
        let revision = match from {
            Some(r) => r,
            None => match tokio::select! { r = inner.list() => r, () = cancel.cancelled() => return } {
                Ok(r) => r,
                Err(e) => {
                    debug!(cluster = inner.me.cluster, error = %e, "arbiter: listing the view failed; retrying");
                    if !backoff.wait(&cancel).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let e = tokio::select! {
            e = inner.watch_from(revision, &mut backoff) => e,
            () = cancel.cancelled() => return,
        };
        warn!(cluster = inner.me.cluster, error = %e, "arbiter: view watch interrupted; listing again");
        from = None;
        if !backoff.wait(&cancel).await {
            return;
        }
    }
}

struct EtcdSession {
    inner: Arc<Inner>,
    view_rx: watch::Receiver<View>,
    lease_rx: watch::Receiver<LeaseState>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for EtcdSession {
    fn drop(&mut self) {
        // The lease task revokes on its way out.
        self.cancel.cancel();
    }
}

impl EtcdSession {
    fn open(&self) -> Result<&Inner> {
        if self.cancel.is_cancelled() { Err(ArbiterError::Closed) } else { Ok(&self.inner) }
    }
}

#[async_trait]
impl Session for EtcdSession {
    fn view(&self) -> watch::Receiver<View> {
        self.view_rx.clone()
    }

    fn lease(&self) -> watch::Receiver<LeaseState> {
        self.lease_rx.clone()
    }

    async fn report(&self, status: MemberStatus) -> Result<()> {
        let inner = self.open()?;
        check_report(&inner.me, &status)?;
        let mut last = inner.status.lock().await;
        // Kept even while the lease is lost: the next lease puts it.
        *last = Some(status);
        let lease = inner.current_lease()?;
        let value = serde_json::to_string(last.as_ref().expect("just set")).expect("a member status serialises");
        let mut kv = inner.client.clone();
        let opts = PutOptions::new().with_lease(lease.id());
        inner.call("put member", kv.put(inner.keys.member(&inner.me.cluster), value, Some(opts))).await.map(|_| ())
    }

    async fn members(&self) -> Result<Vec<MemberStatus>> {
        let inner = self.open()?;
        let mut kv = inner.client.clone();
        let resp = inner.call("get members", kv.get(inner.keys.members(), Some(GetOptions::new().with_prefix()))).await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            match serde_json::from_slice::<MemberStatus>(kv.value()) {
                Ok(m) => out.push(m),
                Err(e) => error!(key = %String::from_utf8_lossy(kv.key()), error = %e, "skipping a malformed member status"),
            }
        }
        Ok(out)
    }

    async fn put_state(&self, name: &str, value: Vec<u8>) -> Result<()> {
        check_state_name(name)?;
        let inner = self.open()?;
        let mut kv = inner.client.clone();
        inner.call("put state", kv.put(inner.keys.state(&inner.me.cluster, name), value, None)).await.map(|_| ())
    }

    async fn get_state(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_state_name(name)?;
        let inner = self.open()?;
        let mut kv = inner.client.clone();
        let resp = inner.call("get state", kv.get(inner.keys.state(&inner.me.cluster, name), None)).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn campaign(&self, expected_epoch: u64) -> Result<Option<Leadership>> {
        let inner = self.open()?;
        let lease = inner.current_lease()?;
        let keys = &inner.keys;
        let mut kv = inner.client.clone();
        // Transactions only AND their compares, so "no handover, or one naming me" is decided
        // on a read, then pinned in the compare (it changed meanwhile: the campaign fails).
        let handover = inner.call("get handover", kv.get(keys.handover(), None)).await?;
        let handover_cmp = match handover.kvs().first() {
            None => Compare::version(keys.handover(), CompareOp::Equal, 0),
            Some(h) if h.value() == inner.me.cluster.as_bytes() => {
                Compare::mod_revision(keys.handover(), CompareOp::Equal, h.mod_revision())
            }
            Some(h) => {
                debug!(cluster = inner.me.cluster, to = %String::from_utf8_lossy(h.value()), "campaign: a switchover names another cluster");
                return Ok(None);
            }
        };
        // Epoch 0 is "never granted": the key does not exist yet.
        let epoch_cmp = match expected_epoch {
            0 => Compare::version(keys.epoch(), CompareOp::Equal, 0),
            e => Compare::value(keys.epoch(), CompareOp::Equal, e.to_string()),
        };
        let epoch = expected_epoch + 1;
        let won = Leadership {
            cluster: inner.me.cluster.clone(),
            epoch,
            endpoint: inner.me.endpoint.clone(),
            datacenter: inner.me.datacenter.clone(),
        };
        let value = serde_json::to_string(&won).expect("a leadership serialises");
        let txn = Txn::new().when([epoch_cmp, Compare::version(keys.leader(), CompareOp::Equal, 0), handover_cmp]).and_then([
            TxnOp::put(keys.epoch(), epoch.to_string(), None),
            TxnOp::put(keys.leader(), value, Some(PutOptions::new().with_lease(lease.id()))),
            TxnOp::delete(keys.handover(), None),
        ]);
        let resp = inner.call("campaign txn", kv.txn(txn)).await?;
        if resp.succeeded() {
            info!(cluster = won.cluster, epoch, "arbiter: leadership won");
            Ok(Some(won))
        } else {
            debug!(cluster = inner.me.cluster, expected_epoch, "campaign lost");
            Ok(None)
        }
    }

    async fn resign(&self, epoch: u64) -> Result<()> {
        let inner = self.open()?;
        let Some(rev) = inner.my_leadership(epoch).await? else { return Ok(()) };
        let mut kv = inner.client.clone();
        let txn = Txn::new()
            .when([Compare::mod_revision(inner.keys.leader(), CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(inner.keys.leader(), None)]);
        let resp = inner.call("resign txn", kv.txn(txn)).await?;
        if resp.succeeded() {
            info!(cluster = inner.me.cluster, epoch, "arbiter: resigned");
        }
        Ok(())
    }

    async fn hand_over(&self, epoch: u64, to: &str) -> Result<()> {
        let inner = self.open()?;
        check_hand_over(&inner.me, to)?;
        let not_leader = || ArbiterError::NotLeader { cluster: inner.me.cluster.clone(), epoch };
        let Some(rev) = inner.my_leadership(epoch).await? else { return Err(not_leader()) };
        let short = Lease::grant(&inner.client, &inner.endpoints, inner.handover_ttl_s).await?;
        let mut kv = inner.client.clone();
        let txn = Txn::new().when([Compare::mod_revision(inner.keys.leader(), CompareOp::Equal, rev)]).and_then([
            TxnOp::put(inner.keys.handover(), to, Some(PutOptions::new().with_lease(short.id()))),
            TxnOp::delete(inner.keys.leader(), None),
        ]);
        let resp = match inner.call("hand-over txn", kv.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                let _ = short.revoke().await;
                return Err(e);
            }
        };
        if !resp.succeeded() {
            let _ = short.revoke().await;
            return Err(not_leader());
        }
        info!(cluster = inner.me.cluster, epoch, to, "arbiter: handed over");
        Ok(())
    }

    async fn close(&self) {
        self.cancel.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_mistakes_are_not_transient() {
        let e = EtcdArbiter::new(vec![], "/tandem/g/ha/".into()).unwrap_err();
        assert!(!e.is_transient() && e.to_string().contains("endpoints"), "{e}");
        let e = EtcdArbiter::new(vec!["http://127.0.0.1:1".into()], "/".into()).unwrap_err();
        assert!(!e.is_transient() && e.to_string().contains("prefix"), "{e}");
        let a = EtcdArbiter::new(vec!["http://127.0.0.1:1".into()], "/tandem/g/ha".into()).unwrap();
        assert_eq!(a.prefix(), "/tandem/g/ha/");
    }

    #[tokio::test]
    async fn joining_an_unreachable_etcd_is_transient() {
        // Port 1 on loopback: nothing listens.
        let a = EtcdArbiter::new(vec!["http://127.0.0.1:1".into()], "/tandem/g/ha/".into()).unwrap();
        let me = Candidate { cluster: "a".into(), datacenter: String::new(), endpoint: "http://h:1".into() };
        let e = a.join(me, Duration::from_secs(1)).await.err().expect("nothing listens on port 1");
        assert!(e.is_transient(), "{e}");
    }

    #[tokio::test]
    async fn a_malformed_endpoint_is_a_configuration_error() {
        let a = EtcdArbiter::new(vec!["http://[::1".into()], "/tandem/g/ha/".into()).unwrap();
        let me = Candidate { cluster: "a".into(), datacenter: String::new(), endpoint: "http://h:1".into() };
        let e = a.join(me, Duration::from_secs(1)).await.err().expect("not a uri");
        assert!(matches!(e, ArbiterError::InvalidConfig(_)) && e.to_string().contains("[::1"), "{e}");
    }
}
