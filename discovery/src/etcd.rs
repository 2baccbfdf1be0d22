//! etcd as the registry: a cluster [`register`]s itself under `<prefix><id>` with a lease it keeps
//! alive; a gateway [`watch`]es the prefix and gets a [`Change`] whenever a cluster appears,
//! changes or leaves (revoked on shutdown, or its lease expired because it died).
//!
//! ```text
//!  cluster ── grant lease (ttl) ── put <prefix><id> = JSON ── renew every ttl/3 ─┐
//!     ▲             ▲ lease lost / etcd restarted: register again (backoff)      │
//!     └─────────────┴────────────────────────────────────────────────────────────┘
//!     cancel: revoke the lease (the key goes with it: watchers see Down at once)
//!
//!  gateway ── get <prefix>* (revision R): Up per cluster, Down for clusters gone since the last list
//!          └─ watch <prefix>* from R+1 (no gap): put -> Up, delete or expiry -> Down
//!             stream broken / compacted: list again (emit the difference) and watch again
//! ```
//!
//! The pieces below the two entry points ([`connect`], [`Lease`], [`Backoff`]) carry no discovery
//! logic, so the arbiter (leadership under a lease) builds on them too.
//!
//! While etcd is unreachable nothing is emitted: the gateway keeps the clusters it knows (their
//! own health checks decide whether they serve), and gets the difference when etcd is back.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{Change, DiscoveryError, Registration, Result};

/// How long one etcd call (not a stream) may take before it counts as failed: etcd down,
/// partitioned, or without a leader.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

// ---- plumbing shared with the arbiter ---------------------------------------------------------

/// A client for `endpoints` ("http://host:port" or "host:port"). The connection is lazy: this
/// succeeds while etcd is down (calls fail until it is up), and fails only on bad endpoints.
/// HTTP/2 keep-alives make a dead or partitioned etcd break streams (watch, lease keep-alive)
/// within seconds instead of hanging them.
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    if endpoints.is_empty() {
        return Err(DiscoveryError::InvalidConfig("no etcd endpoints configured".into()));
    }
    let opts = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    Client::connect(endpoints, Some(opts)).await.map_err(|e| etcd_error(endpoints, e))
}

/// The one conversion from the client's errors: bad endpoints are configuration mistakes, a
/// missing lease is [`DiscoveryError::LeaseLost`], everything else is etcd being unavailable.
pub fn etcd_error(endpoints: &[String], e: etcd_client::Error) -> DiscoveryError {
    let endpoints = endpoints.join(",");
    match e {
        etcd_client::Error::InvalidArgs(m) | etcd_client::Error::EndpointError(m) => {
            DiscoveryError::InvalidConfig(format!("etcd endpoints {endpoints}: {m}"))
        }
        etcd_client::Error::InvalidUri(u) => DiscoveryError::InvalidConfig(format!("etcd endpoints {endpoints}: {u}")),
        other => {
            let message = other.to_string();
            // etcd says "etcdserver: requested lease not found" (put, keep-alive) and the client
            // "lease not found" when a keep-alive stream opens on an expired lease.
            if message.contains("lease not found") {
                DiscoveryError::LeaseLost { message }
            } else {
                DiscoveryError::Etcd { endpoints, message }
            }
        }
    }
}

/// Runs one etcd call with [`CALL_TIMEOUT`].
pub async fn call<T>(endpoints: &[String], what: &str, f: impl Future<Output = std::result::Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| etcd_error(endpoints, e)),
        Err(_) => Err(DiscoveryError::Etcd { endpoints: endpoints.join(","), message: format!("{what} timed out after {CALL_TIMEOUT:?}") }),
    }
}

/// Exponential backoff with jitter for retrying transient etcd failures.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), next: min }
    }

    /// The next delay: doubles up to `max`, each drawn from [d/2, d] so that many clients
    /// failing together do not retry together.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        d.mul_f64(rand::random_range(0.5..=1.0))
    }

    /// After a success: the next failure is retried quickly again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Sleeps for the next delay; false when `cancel` fired first.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = cancel.cancelled() => false,
        }
    }
}

/// A granted etcd lease. Keys put with [`Lease::id`] disappear when it expires or is revoked.
#[derive(Clone)]
pub struct Lease {
    client: Client,
    endpoints: Vec<String>,
    id: i64,
    ttl: Duration,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).field("ttl", &self.ttl).finish()
    }
}

impl Lease {
    /// Grants a lease of `ttl_s` seconds (etcd may round it up to its minimum).
    pub async fn grant(client: &Client, endpoints: &[String], ttl_s: i64) -> Result<Lease> {
        let mut c = client.clone();
        let resp = call(endpoints, "lease grant", c.lease_grant(ttl_s, None)).await?;
        Ok(Lease {
            client: client.clone(),
            endpoints: endpoints.to_vec(),
            id: resp.id(),
            ttl: Duration::from_secs(resp.ttl().max(1) as u64),
        })
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Keeps the lease alive, renewing every ttl/3, until `cancel` fires (`Ok`) or a renewal
    /// fails: [`DiscoveryError::LeaseLost`] when etcd no longer knows the lease (it expired,
    /// or was revoked), another error when etcd could not be reached (the lease may still be
    /// alive: try again with the same lease before its ttl runs out). Cancel-safe.
    pub async fn keep_alive(&self, cancel: &CancellationToken) -> Result<()> {
        self.keep_alive_with(cancel, |_| {}).await
    }

    /// [`Lease::keep_alive`], calling `renewed(valid_until)` after each confirmed renewal:
    /// `valid_until` is the send time of that renewal + the ttl etcd granted, a bound the lease
    /// cannot outlive without a newer renewal (what a leader fences itself on).
    pub async fn keep_alive_with(&self, cancel: &CancellationToken, mut renewed: impl FnMut(Instant)) -> Result<()> {
        let every = (self.ttl / 3).max(Duration::from_millis(100));
        let mut lc = self.client.lease_client();
        // Opening the stream sends (and awaits) a first renewal.
        let sent = Instant::now();
        let (mut keeper, mut replies) = tokio::select! {
            r = call(&self.endpoints, "lease keep-alive", lc.keep_alive(self.id)) => r?,
            () = cancel.cancelled() => return Ok(()),
        };
        renewed(sent + self.ttl);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let sent = Instant::now();
            keeper.keep_alive().await.map_err(|e| etcd_error(&self.endpoints, e))?;
            // No reply within CALL_TIMEOUT: etcd counts as unreachable (the caller retries).
            let reply = tokio::select! {
                r = call(&self.endpoints, "lease keep-alive reply", replies.message()) => r?,
                () = cancel.cancelled() => return Ok(()),
            };
            match reply {
                None => {
                    return Err(DiscoveryError::Etcd {
                        endpoints: self.endpoints.join(","),
                        message: "lease keep-alive stream closed".into(),
                    });
                }
                Some(r) if r.ttl() <= 0 => {
                    return Err(DiscoveryError::LeaseLost { message: format!("lease {:x} expired", self.id) });
                }
                Some(r) => renewed(sent + Duration::from_secs(r.ttl() as u64)),
            }
        }
    }

    /// Revokes the lease: every key attached to it is deleted at once.
    pub async fn revoke(&self) -> Result<()> {
        let mut c = self.client.clone();
        call(&self.endpoints, "lease revoke", c.lease_revoke(self.id)).await.map(|_| ())
    }
}

// ---- registration (cluster side) -----------------------------------------------------------

/// Registers `reg` under `<prefix><id>` until `cancel` fires, then revokes the lease so that
/// watchers see the cluster leave at once. Returns once the task is started (etcd being down is
/// not an error: the task retries with backoff, logging each failure); fails only on bad
/// arguments. The task re-registers after the lease is lost (paused process, long etcd outage)
/// and after etcd restarts. Await the handle after cancelling to be sure the revoke was sent.
pub async fn register(
    endpoints: Vec<String>,
    prefix: String,
    ttl_s: u64,
    reg: Registration,
    cancel: CancellationToken,
) -> Result<JoinHandle<()>> {
    if !(1..=i64::MAX as u64).contains(&ttl_s) {
        return Err(DiscoveryError::InvalidConfig(format!("lease ttl {ttl_s}s must be at least 1s")));
    }
    if reg.id.is_empty() || reg.id.contains('/') {
        return Err(DiscoveryError::InvalidConfig(format!("cluster id {:?} cannot be an etcd key suffix", reg.id)));
    }
    let client = connect(&endpoints).await?;
    let key = format!("{prefix}{}", reg.id);
    let value = serde_json::to_string(&reg).expect("a registration serialises");
    Ok(tokio::spawn(run_registration(client, endpoints, key, value, ttl_s as i64, cancel)))
}

async fn run_registration(client: Client, endpoints: Vec<String>, key: String, value: String, ttl_s: i64, cancel: CancellationToken) {
    let max_backoff = Duration::from_secs(ttl_s as u64).div_f64(3.0).clamp(Duration::from_millis(200), Duration::from_secs(2));
    let mut backoff = Backoff::new(Duration::from_millis(100), max_backoff);
    let mut lease: Option<Lease> = None;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let l = match &lease {
            Some(l) => l.clone(),
            None => match tokio::select! { r = Lease::grant(&client, &endpoints, ttl_s) => r, () = cancel.cancelled() => break } {
                Ok(l) => {
                    lease = Some(l.clone());
                    l
                }
                Err(e) => {
                    warn!(key, error = %e, "etcd registration: lease grant failed; retrying");
                    if !backoff.wait(&cancel).await {
                        break;
                    }
                    continue;
                }
            },
        };
        // Put again on every (re)start of the keep-alive: after an etcd restart or someone
        // deleting the key, the lease alone does not bring the key back.
        let mut kv = client.clone();
        let put = call(&endpoints, "put", kv.put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(l.id()))));
        match tokio::select! { r = put => r, () = cancel.cancelled() => break } {
            Ok(_) => info!(key, lease = format_args!("{:x}", l.id()), "registered in etcd"),
            Err(e) => {
                if matches!(e, DiscoveryError::LeaseLost { .. }) {
                    lease = None;
                }
                warn!(key, error = %e, "etcd registration: put failed; retrying");
                if !backoff.wait(&cancel).await {
                    break;
                }
                continue;
            }
        }
        backoff.reset();
        match l.keep_alive(&cancel).await {
            Ok(()) => break,
            Err(e) => {
                if matches!(e, DiscoveryError::LeaseLost { .. }) {
                    lease = None;
                }
                warn!(key, error = %e, "etcd registration: keep-alive interrupted; registering again");
                if !backoff.wait(&cancel).await {
                    break;
                }
            }
        }
    }
    if let Some(l) = lease {
        match l.revoke().await {
            Ok(()) => info!(key, "deregistered from etcd"),
            Err(e) => warn!(key, error = %e, ttl = ?l.ttl(), "etcd deregistration failed; the registration expires with its lease"),
        }
    }
}

// ---- watching (gateway side) ---------------------------------------------------------------

/// The clusters registered under `prefix`, as a never-ending stream of changes: first an
/// [`Change::Up`] for each registered cluster, then every change. Etcd outages and restarts are
/// survived (list again, emit the difference, watch again); malformed values are logged and
/// skipped (a malformed value replacing a good one counts as that cluster leaving). Fails only
/// on bad endpoints; the background task stops when the stream is dropped.
pub async fn watch(endpoints: Vec<String>, prefix: String) -> Result<BoxStream<'static, Change>> {
    let client = connect(&endpoints).await?;
    let (tx, rx) = mpsc::channel(256);
    let w = Watcher { client, endpoints, prefix, known: BTreeMap::new(), tx };
    tokio::spawn(w.run());
    Ok(ReceiverStream::new(rx).boxed())
}

struct Watcher {
    client: Client,
    endpoints: Vec<String>,
    prefix: String,
    /// What the consumer has been told: id -> registration.
    known: BTreeMap<String, Registration>,
    tx: mpsc::Sender<Change>,
}

/// Why a watch session ended without an error.
enum Stop {
    ConsumerGone,
}

impl Watcher {
    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let tx = self.tx.clone();
        loop {
            let r = tokio::select! {
                r = self.session(&mut backoff) => r,
                () = tx.closed() => Ok(Stop::ConsumerGone),
            };
            match r {
                Ok(Stop::ConsumerGone) => {
                    debug!(prefix = self.prefix, "etcd watch: consumer gone");
                    return;
                }
                Err(e) => {
                    warn!(prefix = self.prefix, error = %e, "etcd watch interrupted; listing again");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = tx.closed() => return,
                    }
                }
            }
        }
    }

    /// One list + watch, until the watch breaks (Err) or the consumer goes away.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<Stop> {
        let mut kv = self.client.clone();
        let listed = call(&self.endpoints, "get", kv.get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = listed.header().map(|h| h.revision()).unwrap_or(0);
        let mut current = BTreeMap::new();
        for kv in listed.kvs() {
            if let Some(reg) = self.parse(kv.key(), kv.value()) {
                current.insert(reg.id.clone(), reg);
            }
        }
        let mut changes = Vec::new();
        for (id, reg) in &current {
            if self.known.get(id) != Some(reg) {
                changes.push(Change::Up(reg.clone()));
            }
        }
        for id in self.known.keys() {
            if !current.contains_key(id) {
                changes.push(Change::Down { id: id.clone() });
            }
        }
        self.known = current;
        for c in changes {
            if self.tx.send(c).await.is_err() {
                return Ok(Stop::ConsumerGone);
            }
        }

        let mut w = self.client.watch_client();
        let opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = call(&self.endpoints, "watch", w.watch(self.prefix.clone(), Some(opts))).await?;
        debug!(prefix = self.prefix, revision, "etcd watch started");
        loop {
            let resp = match stream.message().await.map_err(|e| etcd_error(&self.endpoints, e))? {
                Some(r) => r,
                None => return Err(self.broken("watch stream closed by etcd".into())),
            };
            if resp.created() {
                // The watch is really established: the next failure is retried quickly again.
                backoff.reset();
            }
            if resp.canceled() {
                return Err(self.broken(format!(
                    "watch canceled (compact revision {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                )));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let change = match ev.event_type() {
                    EventType::Put => match self.parse(kv.key(), kv.value()) {
                        Some(reg) if self.known.get(&reg.id) == Some(&reg) => None,
                        Some(reg) => {
                            self.known.insert(reg.id.clone(), reg.clone());
                            Some(Change::Up(reg))
                        }
                        // A garbage value replaced a good one: the registry no longer says
                        // where that cluster is.
                        None => self.id_of(kv.key()).and_then(|id| self.known.remove(&id).map(|_| Change::Down { id })),
                    },
                    EventType::Delete => self.id_of(kv.key()).and_then(|id| self.known.remove(&id).map(|_| Change::Down { id })),
                };
                if let Some(c) = change
                    && self.tx.send(c).await.is_err()
                {
                    return Ok(Stop::ConsumerGone);
                }
            }
        }
    }

    fn broken(&self, message: String) -> DiscoveryError {
        DiscoveryError::Etcd { endpoints: self.endpoints.join(","), message }
    }

    /// The cluster id a key names (the part after the prefix).
    fn id_of(&self, key: &[u8]) -> Option<String> {
        let key = std::str::from_utf8(key).ok()?;
        key.strip_prefix(&self.prefix).filter(|id| !id.is_empty()).map(str::to_string)
    }

    /// A valid registration, or None after logging why not (never fatal: one bad writer must
    /// not hide the other clusters).
    fn parse(&self, key: &[u8], value: &[u8]) -> Option<Registration> {
        match parse_registration(&self.prefix, key, value) {
            Ok(reg) => Some(reg),
            Err(e) => {
                error!(error = %e, "skipping a malformed cluster registration in etcd");
                None
            }
        }
    }
}

/// Decodes `<prefix><id>` = JSON [`Registration`]; the id in the key and the value must agree.
pub fn parse_registration(prefix: &str, key: &[u8], value: &[u8]) -> Result<Registration> {
    let key_str = String::from_utf8_lossy(key);
    let bad = |message: String| DiscoveryError::BadRegistration { key: key_str.to_string(), message };
    let id = key_str.strip_prefix(prefix).ok_or_else(|| bad(format!("key is not under prefix {prefix:?}")))?;
    let reg: Registration = serde_json::from_slice(value).map_err(|e| bad(format!("value is not a registration: {e}")))?;
    if reg.id != id {
        return Err(bad(format!("id {:?} in the value differs from the key's {id:?}", reg.id)));
    }
    if reg.endpoint.is_empty() {
        return Err(bad("empty endpoint".into()));
    }
    Ok(reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_a_registration_and_rejects_mismatches() {
        let p = "/t/c/";
        let ok = br#"{"id":"a","datacenter":"dc1","endpoint":"http://h:1"}"#;
        let reg = parse_registration(p, b"/t/c/a", ok).unwrap();
        assert_eq!(reg, Registration { id: "a".into(), datacenter: "dc1".into(), endpoint: "http://h:1".into() });
        let e = parse_registration(p, b"/t/c/b", ok).unwrap_err();
        assert!(e.to_string().contains("differs from the key"), "{e}");
        assert!(!e.is_transient());
        let e = parse_registration(p, b"/t/c/a", b"not json").unwrap_err();
        assert!(e.to_string().contains("not a registration"), "{e}");
        let e = parse_registration(p, b"/t/c/a", br#"{"id":"a","endpoint":""}"#).unwrap_err();
        assert!(e.to_string().contains("empty endpoint"), "{e}");
        // datacenter is optional.
        assert_eq!(parse_registration(p, b"/t/c/a", br#"{"id":"a","endpoint":"x"}"#).unwrap().datacenter, "");
    }

    #[test]
    fn backoff_doubles_up_to_its_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<Duration> = (0..4).map(|_| b.next_delay()).collect();
        for (d, cap) in d.iter().zip([100, 200, 400, 400]) {
            assert!(*d <= Duration::from_millis(cap) && *d >= Duration::from_millis(cap / 2), "{d:?} vs {cap}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn bad_arguments_are_configuration_errors() {
        let reg = Registration { id: "a".into(), datacenter: String::new(), endpoint: "http://h:1".into() };
        let e = register(vec![], "/p/".into(), 5, reg.clone(), CancellationToken::new()).await.unwrap_err();
        assert!(!e.is_transient(), "{e}");
        let e = register(vec!["127.0.0.1:1".into()], "/p/".into(), 0, reg, CancellationToken::new()).await.unwrap_err();
        assert!(e.to_string().contains("ttl"), "{e}");
        assert!(watch(vec![], "/p/".into()).await.is_err());
    }
}
