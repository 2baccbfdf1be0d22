//! What the gateway knows about each cluster: health (active checks plus passive errors),
//! role, epoch, per-collection freshness, and a peak-EWMA latency meter.
//!
//! One task per cluster polls `GetClusterInfo` every `health.interval_ms` (every
//! `health.no_leader_interval_ms` while no leader is known, so a promotion is seen quickly);
//! membership changes (static list or etcd) add and remove clusters. The leader (id and epoch)
//! is published on a `watch` channel: held writes wait on it instead of polling.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use parking_lot::RwLock;
use tandem_client::Channel;
use tandem_discovery::{Change, Registration};
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::config::HealthConfig;
use crate::h2channel::H2Channel;

/// A cluster's health as routing sees it. It flips only after `healthy_after` /
/// `unhealthy_after` consecutive results, so one slow check does not take a cluster out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No check has finished yet: gets no traffic.
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn to_proto(self) -> pb::Health {
        match self {
            Health::Unknown => pb::Health::Unknown,
            Health::Healthy => pb::Health::Healthy,
            Health::Unhealthy => pb::Health::Unhealthy,
        }
    }
}

pub use tandem_proto::Role;

/// A reported role as the wire names it: UNSPECIFIED for one this build does not know.
pub fn role_to_proto(role: Option<Role>) -> pb::Role {
    role.map_or(pb::Role::Unspecified, Role::to_proto)
}

/// What the last successful check said.
#[derive(Debug, Clone)]
pub struct Info {
    /// `None`: a value this build does not know (a newer cluster), which serves nothing here.
    pub role: Option<Role>,
    pub epoch: u64,
    pub datacenter: String,
    /// Per collection: (serviceable ts, lag ms) as reported.
    pub collections: HashMap<String, (u64, u64)>,
    pub raw: Vec<pb::CollectionStatus>,
    /// Its query nodes as reported, for Topology to show.
    pub query_nodes: Vec<pb::QueryNodeStatus>,
    pub at: Instant,
}

#[derive(Debug)]
pub struct Status {
    pub health: Health,
    ok_streak: u32,
    err_streak: u32,
    pub info: Option<Info>,
    pub last_error: String,
    pub last_ok: Option<Instant>,
    /// A forwarded write could not reach the cluster at this instant: it gets no traffic (and is
    /// not the leader) until a check that started later succeeds. Unlike `health`, one failure
    /// is enough: a write to a dead leader must not wait for `unhealthy_after` checks.
    pub suspect_since: Option<Instant>,
}

impl Status {
    /// Healthy and not suspect: may get traffic.
    pub fn usable(&self) -> bool {
        self.health == Health::Healthy && self.suspect_since.is_none()
    }
}

/// PING interval on every connection to a cluster (a silent one is closed after twice that).
const KEEPALIVE: Duration = Duration::from_secs(10);

pub struct Cluster {
    pub id: String,
    pub endpoint: String,
    /// From the registration; empty means "as the cluster reports".
    registered_dc: String,
    /// Several HTTP/2 connections: one connection is served by one task, which would
    /// serialise every request the gateway sends this cluster.
    /// Writes, DDL and health checks (tonic's channel: see [`crate::h2channel`] for why).
    clients: Vec<TandemClient<Channel>>,
    /// Reads, as many connections again.
    readers: Vec<TandemClient<H2Channel>>,
    next_client: std::sync::atomic::AtomicUsize,
    latency: Arc<crate::latency::Latency>,
    pub status: RwLock<Status>,
    pub reads_routed: AtomicU64,
    pub writes_routed: AtomicU64,
    /// Searches waiting for this cluster, merged when it is busy.
    pub coalescer: crate::coalesce::Coalescer,
    stop: CancellationToken,
}

impl Cluster {
    fn new(reg: &Registration, o: &ClusterOptions) -> Result<Cluster, String> {
        let (max_message_bytes, connections) = (o.max_message_bytes, o.connections);
        let ep = Endpoint::from_shared(reg.endpoint.clone())
            .map_err(|e| format!("invalid endpoint {:?}: {e}", reg.endpoint))?
            .connect_timeout(o.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_while_idle(true);
        let clients = (0..connections.max(1))
            .map(|_| {
                TandemClient::new(ep.connect_lazy().into())
                    .max_decoding_message_size(max_message_bytes)
                    .max_encoding_message_size(max_message_bytes)
            })
            .collect();
        let readers = (0..connections.max(1))
            .map(|_| {
                H2Channel::new(&reg.endpoint, o.connect_timeout, KEEPALIVE)
                    .map(|c| TandemClient::new(c).max_decoding_message_size(max_message_bytes).max_encoding_message_size(max_message_bytes))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // 1 ms RTT before any sample: a new cluster is tried soon, and its real latency takes over.
        let latency = crate::latency::Latency::new(Duration::from_millis(1), o.ewma_decay);
        Ok(Cluster {
            id: reg.id.clone(),
            endpoint: reg.endpoint.clone(),
            registered_dc: reg.datacenter.clone(),
            clients,
            readers,
            next_client: std::sync::atomic::AtomicUsize::new(0),
            latency,
            status: RwLock::new(Status {
                health: Health::Unknown,
                ok_streak: 0,
                err_streak: 0,
                info: None,
                last_error: String::new(),
                last_ok: None,
                suspect_since: None,
            }),
            reads_routed: AtomicU64::new(0),
            writes_routed: AtomicU64::new(0),
            coalescer: crate::coalesce::Coalescer::new(o.coalesce.max_in_flight, o.coalesce.max_batch),
            stop: CancellationToken::new(),
        })
    }

    /// A client for one call (connections taken in turn).
    pub fn client(&self) -> TandemClient<Channel> {
        let i = self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    /// A client for one read (connections taken in turn).
    pub fn reader(&self) -> TandemClient<H2Channel> {
        let i = self.next_client.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        self.readers[i].clone()
    }

    pub fn datacenter(&self) -> String {
        if !self.registered_dc.is_empty() {
            return self.registered_dc.clone();
        }
        self.status.read().info.as_ref().map(|i| i.datacenter.clone()).unwrap_or_default()
    }

    /// Starts tracking one read's latency: call `answered` on what this returns when the
    /// cluster answered, and drop it when the read ends either way.
    pub fn track(&self) -> crate::latency::Pending {
        self.latency.start()
    }

    /// The p2c cost: peak-EWMA latency x (reads in flight + 1).
    pub fn load(&self) -> f64 {
        self.latency.cost()
    }

    /// One result (an active check started at `started`, or a forwarded call's connection error).
    fn record(&self, ok: Result<Option<Info>, String>, h: &HealthConfig, started: Instant) {
        let mut s = self.status.write();
        let before = s.health;
        match ok {
            Ok(info) => {
                if s.suspect_since.is_some_and(|t| started >= t) {
                    tracing::info!(cluster = %self.id, "reachable again: no longer suspect");
                    s.suspect_since = None;
                }
                s.ok_streak += 1;
                s.err_streak = 0;
                s.last_ok = Some(Instant::now());
                if let Some(info) = info {
                    s.info = Some(info);
                }
                // The first result decides an unknown cluster: waiting for N at start-up would
                // only delay serving; N applies to flips between known states.
                if s.health == Health::Unknown || (s.health == Health::Unhealthy && s.ok_streak >= h.healthy_after) {
                    s.health = Health::Healthy;
                }
            }
            Err(e) => {
                s.err_streak += 1;
                s.ok_streak = 0;
                s.last_error = e;
                if s.health == Health::Unknown || (s.health == Health::Healthy && s.err_streak >= h.unhealthy_after) {
                    s.health = Health::Unhealthy;
                }
            }
        }
        if s.health != before {
            tracing::info!(cluster = %self.id, from = ?before, to = ?s.health, reason = %s.last_error, "cluster health changed");
        }
    }

    /// A forwarded call could not reach the cluster.
    pub fn passive_error(&self, message: &str, h: &HealthConfig) {
        self.record(Err(message.to_string()), h, Instant::now());
    }

    /// A forwarded write could not reach the cluster: no traffic until a later check succeeds
    /// (see [`Status::suspect_since`]). Call through [`Topology::suspect`], which republishes the leader.
    fn mark_suspect(&self, message: &str, h: &HealthConfig) {
        self.record(Err(message.to_string()), h, Instant::now());
        let mut s = self.status.write();
        if s.suspect_since.is_none() {
            tracing::warn!(cluster = %self.id, reason = %message, "a write could not reach the cluster: suspect until a check succeeds");
        }
        s.suspect_since = Some(Instant::now());
    }

    /// Polls the cluster once.
    pub async fn check(&self, h: &HealthConfig) {
        let started = Instant::now();
        let mut req = tonic::Request::new(pb::GetClusterInfoRequest {});
        req.set_timeout(Duration::from_millis(h.timeout_ms));
        let mut client = self.client();
        let result = tokio::time::timeout(Duration::from_millis(h.timeout_ms), client.get_cluster_info(req)).await;
        let outcome = match result {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                let collections = r.collections.iter().map(|c| (c.name.clone(), (c.serviceable_ts, c.lag_ms))).collect();
                let max_lag = r.collections.iter().map(|c| c.lag_ms).max().unwrap_or(0);
                metrics::gauge!("tandem_gateway_cluster_lag_ms", "cluster" => self.id.clone()).set(max_lag as f64);
                Ok(Some(Info {
                    role: Role::from_proto(r.role),
                    epoch: r.epoch,
                    datacenter: r.datacenter,
                    collections,
                    raw: r.collections,
                    query_nodes: r.query_nodes,
                    at: Instant::now(),
                }))
            }
            Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
            Err(_) => Err(format!("health check timed out after {} ms", h.timeout_ms)),
        };
        self.record(outcome, h, started);
    }

    pub fn health(&self) -> Health {
        self.status.read().health
    }
}

/// How the gateway talks to each cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub max_message_bytes: usize,
    pub connect_timeout: Duration,
    pub ewma_decay: Duration,
    pub connections: usize,
    pub coalesce: crate::config::CoalesceConfig,
}

/// The leader as published to waiters: which cluster, at which epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderRef {
    pub id: String,
    pub epoch: u64,
}

/// Every cluster the gateway knows, by id.
pub struct Topology {
    clusters: RwLock<Arc<BTreeMap<String, Arc<Cluster>>>>,
    health: HealthConfig,
    options: ClusterOptions,
    shutdown: CancellationToken,
    /// The current leader; changes (and only changes) wake the waiters.
    leader_tx: watch::Sender<Option<LeaderRef>>,
    /// When the last [`Topology::refresh`] started: concurrent refreshes coalesce.
    refreshed: tokio::sync::Mutex<Option<Instant>>,
}

impl Topology {
    pub fn new(health: HealthConfig, options: ClusterOptions, shutdown: CancellationToken) -> Arc<Topology> {
        Arc::new(Topology {
            clusters: RwLock::new(Arc::new(BTreeMap::new())),
            health,
            options,
            shutdown,
            leader_tx: watch::Sender::new(None),
            refreshed: tokio::sync::Mutex::new(None),
        })
    }

    /// The leader as last published; `changed()` fires when it changes (cluster or epoch), e.g.
    /// to None when it dies and to the new one when it is promoted.
    pub fn leader_watch(&self) -> watch::Receiver<Option<LeaderRef>> {
        self.leader_tx.subscribe()
    }

    /// Recomputes the leader and wakes the waiters if it changed. Called after every change of a
    /// cluster's status.
    pub fn publish(&self) {
        let now = self.leader_and_epoch().map(|(c, epoch)| LeaderRef { id: c.id.clone(), epoch });
        self.leader_tx.send_if_modified(|cur| {
            if *cur == now {
                return false;
            }
            tracing::info!(from = ?cur, to = ?now, "leader changed");
            *cur = now;
            true
        });
    }

    /// A forwarded write could not reach `c` (or its outcome was lost): it is not the leader
    /// until a check started after now succeeds.
    pub fn suspect(&self, c: &Cluster, message: &str) {
        c.mark_suspect(message, &self.health);
        self.publish();
    }

    /// Cancelled when the gateway stops.
    pub fn stopped(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn health_config(&self) -> &HealthConfig {
        &self.health
    }

    /// A snapshot of the membership (cheap: one Arc clone).
    pub fn clusters(&self) -> Arc<BTreeMap<String, Arc<Cluster>>> {
        self.clusters.read().clone()
    }

    /// Applies membership changes until the stream ends or the gateway stops.
    pub fn follow(self: &Arc<Self>, mut membership: BoxStream<'static, Change>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    c = membership.next() => c,
                    () = me.shutdown.cancelled() => break,
                };
                match change {
                    Some(Change::Up(reg)) => me.up(reg),
                    Some(Change::Down { id }) => me.down(&id),
                    None => {
                        tracing::warn!("membership source ended; keeping the clusters known so far");
                        break;
                    }
                }
            }
            for c in me.clusters().values() {
                c.stop.cancel();
            }
        })
    }

    fn up(self: &Arc<Self>, reg: Registration) {
        self.up_with(reg, true);
    }

    /// Adds (or replaces) a cluster; `poll`: start its health checks (tests add clusters
    /// whose status they set themselves).
    fn up_with(self: &Arc<Self>, reg: Registration, poll: bool) -> Option<Arc<Cluster>> {
        let current = self.clusters();
        if let Some(c) = current.get(&reg.id)
            && c.endpoint == reg.endpoint
            && c.registered_dc == reg.datacenter
        {
            return None;
        }
        let cluster = match Cluster::new(&reg, &self.options) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(cluster = %reg.id, "ignoring registration: {e}");
                return None;
            }
        };
        tracing::info!(cluster = %reg.id, endpoint = %reg.endpoint, datacenter = %reg.datacenter, "cluster added");
        let mut map = (*current).clone();
        if let Some(old) = map.insert(reg.id.clone(), cluster.clone()) {
            old.stop.cancel();
        }
        *self.clusters.write() = Arc::new(map);
        self.publish();
        if !poll {
            return Some(cluster);
        }
        let h = self.health.clone();
        let stop = cluster.stop.clone();
        let shutdown = self.shutdown.clone();
        let topo = Arc::downgrade(self);
        let mut leader = self.leader_watch();
        let polled = cluster.clone();
        tokio::spawn(async move {
            loop {
                polled.check(&h).await;
                let Some(t) = topo.upgrade() else { break };
                t.publish();
                drop(t);
                let known = leader.borrow_and_update().is_some();
                tokio::select! {
                    () = tokio::time::sleep(h.interval(known)) => {}
                    // The leader was lost: check at once, then at the faster pace.
                    _ = leader.wait_for(Option::is_none), if known => {}
                    () = stop.cancelled() => break,
                    () = shutdown.cancelled() => break,
                }
            }
        });
        Some(cluster)
    }

    fn down(&self, id: &str) {
        let current = self.clusters();
        if !current.contains_key(id) {
            return;
        }
        let mut map = (*current).clone();
        if let Some(old) = map.remove(id) {
            old.stop.cancel();
            tracing::info!(cluster = %id, "cluster removed");
        }
        *self.clusters.write() = Arc::new(map);
        self.publish();
    }

    /// Checks every cluster now (after a NotLeader reply), waiting for the results. Callers
    /// that ask while a refresh is running share the next one instead of each starting their
    /// own (a burst of refused writes costs one round of checks, not one per write).
    pub async fn refresh(&self) {
        let asked = Instant::now();
        let mut last = self.refreshed.lock().await;
        if last.is_some_and(|t| t >= asked) {
            return;
        }
        let started = Instant::now();
        let clusters = self.clusters();
        futures::future::join_all(clusters.values().map(|c| c.check(&self.health))).await;
        *last = Some(started);
        self.publish();
    }

    /// The usable (healthy, not suspect) LEADING cluster with the highest epoch: two may claim
    /// to lead for a moment during a promotion, and the older epoch is the fenced one.
    pub fn leader(&self) -> Option<Arc<Cluster>> {
        self.leader_and_epoch().map(|(c, _)| c)
    }

    /// [`Topology::leader`] and its epoch, read together.
    pub fn leader_and_epoch(&self) -> Option<(Arc<Cluster>, u64)> {
        let clusters = self.clusters();
        let mut best: Option<(u64, Arc<Cluster>)> = None;
        for c in clusters.values() {
            let s = c.status.read();
            if !s.usable() {
                continue;
            }
            let Some(info) = &s.info else { continue };
            if info.role != Some(Role::Leading) {
                continue;
            }
            if best.as_ref().is_none_or(|(e, _)| info.epoch > *e) {
                best = Some((info.epoch, c.clone()));
            }
        }
        best.map(|(e, c)| (c, e))
    }

    /// Topology RPC view.
    pub fn view(&self) -> pb::TopologyResponse {
        let leader = self.leader();
        let mut out = pb::TopologyResponse { leader: leader.map(|c| c.id.clone()).unwrap_or_default(), ..Default::default() };
        for c in self.clusters().values() {
            let dc = c.datacenter();
            let s = c.status.read();
            let (role, epoch, collections, query_nodes) =
                s.info.as_ref().map(|i| (i.role, i.epoch, i.raw.clone(), i.query_nodes.clone())).unwrap_or_default();
            out.epoch = out.epoch.max(epoch);
            let serviceable_ts = collections.iter().map(|c| c.serviceable_ts).min().unwrap_or(0);
            let lag_ms = collections.iter().map(|c| c.lag_ms).max().unwrap_or(0);
            out.clusters.push(pb::ClusterView {
                id: c.id.clone(),
                datacenter: dc,
                role: role_to_proto(role) as i32,
                epoch,
                endpoints: vec![c.endpoint.clone()],
                health: s.health.to_proto() as i32,
                readable: s.usable() && role.is_some_and(Role::is_readable),
                serviceable_ts,
                lag_ms,
                collections,
                last_error: if s.usable() { String::new() } else { s.last_error.clone() },
                checked_ms_ago: s.last_ok.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0),
                reads_routed: c.reads_routed.load(Ordering::Relaxed),
                writes_routed: c.writes_routed.load(Ordering::Relaxed),
                merged_searches: c.coalescer.merged_searches.load(Ordering::Relaxed),
                merged_requests: c.coalescer.merged_requests.load(Ordering::Relaxed),
                latency_us: (c.latency.estimate_ns() / 1e3) as u64,
                query_nodes,
            });
        }
        out
    }
}

impl crate::coalesce::Target for Cluster {
    fn id(&self) -> &str {
        &self.id
    }

    fn coalescer(&self) -> &crate::coalesce::Coalescer {
        &self.coalescer
    }

    fn send(&self, req: tonic::Request<pb::SearchRequest>) -> impl std::future::Future<Output = crate::coalesce::Reply> + Send {
        let mut reader = self.reader();
        async move { reader.search(req).await }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Arc<Topology> {
        let options = ClusterOptions {
            max_message_bytes: 1 << 20,
            connect_timeout: Duration::from_millis(100),
            ewma_decay: Duration::from_secs(1),
            connections: 1,
            coalesce: Default::default(),
        };
        Topology::new(HealthConfig::default(), options, CancellationToken::new())
    }

    /// A cluster whose last check reported `role` at `epoch` (no health checks run).
    fn add(t: &Arc<Topology>, id: &str, role: Role, epoch: u64) -> Arc<Cluster> {
        let reg = Registration { id: id.into(), datacenter: String::new(), endpoint: format!("http://127.0.0.1:1/{id}") };
        let c = t.up_with(reg, false).unwrap_or_else(|| t.clusters()[id].clone());
        let info = Info {
            role: Some(role),
            epoch,
            datacenter: "dc".into(),
            collections: HashMap::new(),
            raw: Vec::new(),
            query_nodes: Vec::new(),
            at: Instant::now(),
        };
        c.record(Ok(Some(info)), &t.health, Instant::now());
        t.publish();
        c
    }

    fn leader(t: &Topology) -> Option<(String, u64)> {
        t.leader_and_epoch().map(|(c, e)| (c.id.clone(), e))
    }

    #[tokio::test]
    async fn the_leader_is_the_usable_leading_cluster_with_the_highest_epoch() {
        let t = topology();
        let mut w = t.leader_watch();
        assert_eq!(leader(&t), None);
        add(&t, "a", Role::Leading, 3);
        add(&t, "b", Role::Alternative, 9);
        assert_eq!(leader(&t), Some(("a".into(), 3)));
        assert!(w.has_changed().unwrap());
        assert_eq!(*w.borrow_and_update(), Some(LeaderRef { id: "a".into(), epoch: 3 }));
        // b is promoted (epoch 4) while a, fenced, still claims to lead for a moment.
        let b = add(&t, "b", Role::Leading, 4);
        assert_eq!(leader(&t), Some(("b".into(), 4)));
        assert_eq!(*w.borrow_and_update(), Some(LeaderRef { id: "b".into(), epoch: 4 }));
        // A cluster whose write failed is not the leader until a later check succeeds.
        t.suspect(&b, "connection refused");
        assert_eq!(leader(&t), Some(("a".into(), 3)));
        assert!(t.view().clusters.iter().any(|c| c.id == "b" && !c.readable && c.last_error == "connection refused"));
        let before_suspicion = Instant::now() - Duration::from_secs(1);
        let info = b.status.read().info.clone();
        b.record(Ok(info.clone()), &t.health, before_suspicion);
        t.publish();
        assert_eq!(leader(&t), Some(("a".into(), 3)), "a check that started before the failure proves nothing");
        b.record(Ok(info), &t.health, Instant::now());
        t.publish();
        assert_eq!(leader(&t), Some(("b".into(), 4)));
        // An unhealthy leader is no leader; with none left the watch says so.
        for c in ["a", "b"] {
            let c = t.clusters()[c].clone();
            for _ in 0..t.health.unhealthy_after {
                c.record(Err("down".into()), &t.health, Instant::now());
            }
        }
        t.publish();
        assert_eq!(leader(&t), None);
        assert_eq!(*w.borrow_and_update(), None);
        // Republishing the same state wakes nobody.
        t.publish();
        assert!(!w.has_changed().unwrap());
    }
}
