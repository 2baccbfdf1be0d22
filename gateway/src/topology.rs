//! What the gateway knows about each cluster: health (active checks plus passive errors),
//! role, epoch, per-collection freshness, and a peak-EWMA latency meter.
//!
//! One task per cluster polls `GetClusterInfo` every `health.interval_ms`; membership changes
//! (static list or etcd) add and remove clusters.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::stream::{BoxStream, StreamExt};
use parking_lot::{Mutex, RwLock};
use tandem_discovery::{Change, Registration};
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tower::load::completion::TrackCompletion;
use tower::load::peak_ewma::{Cost, Handle};
use tower::load::{Load, PeakEwma};
use tower::{Service, ServiceExt};

use crate::config::HealthConfig;

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

/// A cluster's role as last reported (exhaustive over the wire enum, unknown values included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leading,
    Alternative,
    Standby,
    Recovering,
    Unknown,
}

impl Role {
    fn from_proto(v: i32) -> Role {
        match pb::Role::try_from(v) {
            Ok(pb::Role::Leading) => Role::Leading,
            Ok(pb::Role::Alternative) => Role::Alternative,
            Ok(pb::Role::Standby) => Role::Standby,
            Ok(pb::Role::Recovering) => Role::Recovering,
            Ok(pb::Role::Unspecified) | Err(_) => Role::Unknown,
        }
    }

    pub fn to_proto(self) -> pb::Role {
        match self {
            Role::Leading => pb::Role::Leading,
            Role::Alternative => pb::Role::Alternative,
            Role::Standby => pb::Role::Standby,
            Role::Recovering => pb::Role::Recovering,
            Role::Unknown => pb::Role::Unspecified,
        }
    }

    /// Whether the cluster serves reads at all (STANDBY and RECOVERING do not).
    pub fn serves_reads(self) -> bool {
        match self {
            Role::Leading | Role::Alternative => true,
            Role::Standby | Role::Recovering | Role::Unknown => false,
        }
    }
}

/// What the last successful check said.
#[derive(Debug, Clone)]
pub struct Info {
    pub role: Role,
    pub epoch: u64,
    pub datacenter: String,
    /// Per collection: (serviceable ts, lag ms) as reported.
    pub collections: HashMap<String, (u64, u64)>,
    pub raw: Vec<pb::CollectionStatus>,
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
}

/// tower's [`PeakEwma`] measures a cluster's latency. It needs `&mut self` to start a request
/// and is not `Clone`, so wrapping the shared `Channel` in it would serialise every call to a
/// cluster behind one lock while its future is polled. Instead it wraps this no-op service:
/// "calling" it only hands out the RTT-tracking [`Handle`], which the forwarded call holds
/// until its reply arrives. `Load::load()` is tower's own peak-EWMA cost (RTT x in-flight).
#[derive(Debug, Clone, Copy)]
pub struct Meter;

impl Service<()> for Meter {
    type Response = ();
    type Error = Infallible;
    type Future = std::future::Ready<Result<(), Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: ()) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

/// Keeps the handle instead of dropping it when the (instant) meter call completes.
#[derive(Debug, Clone, Copy)]
pub struct KeepHandle;

impl TrackCompletion<Handle, ()> for KeepHandle {
    type Output = Handle;
    fn track_completion(&self, handle: Handle, _value: ()) -> Handle {
        handle
    }
}

pub struct Cluster {
    pub id: String,
    pub endpoint: String,
    /// From the registration; empty means "as the cluster reports".
    registered_dc: String,
    /// Several HTTP/2 connections: one connection is served by one task, which would
    /// serialise every request the gateway sends this cluster.
    clients: Vec<TandemClient<Channel>>,
    next_client: std::sync::atomic::AtomicUsize,
    ewma: Mutex<PeakEwma<Meter, KeepHandle>>,
    pub status: RwLock<Status>,
    pub reads_routed: AtomicU64,
    pub writes_routed: AtomicU64,
    stop: CancellationToken,
}

impl Cluster {
    fn new(reg: &Registration, o: &ClusterOptions) -> Result<Cluster, String> {
        let (max_message_bytes, connections) = (o.max_message_bytes, o.connections);
        let ep = Endpoint::from_shared(reg.endpoint.clone())
            .map_err(|e| format!("invalid endpoint {:?}: {e}", reg.endpoint))?
            .connect_timeout(o.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let clients = (0..connections.max(1))
            .map(|_| {
                TandemClient::new(ep.connect_lazy())
                    .max_decoding_message_size(max_message_bytes)
                    .max_encoding_message_size(max_message_bytes)
            })
            .collect();
        // 1 ms RTT before any sample: a new cluster is tried soon, and its real latency takes over.
        let ewma = PeakEwma::new(Meter, Duration::from_millis(1), o.ewma_decay.as_nanos() as f64, KeepHandle);
        Ok(Cluster {
            id: reg.id.clone(),
            endpoint: reg.endpoint.clone(),
            registered_dc: reg.datacenter.clone(),
            clients,
            next_client: std::sync::atomic::AtomicUsize::new(0),
            ewma: Mutex::new(ewma),
            status: RwLock::new(Status {
                health: Health::Unknown,
                ok_streak: 0,
                err_streak: 0,
                info: None,
                last_error: String::new(),
                last_ok: None,
            }),
            reads_routed: AtomicU64::new(0),
            writes_routed: AtomicU64::new(0),
            stop: CancellationToken::new(),
        })
    }

    /// A client for one call (connections taken in turn).
    pub fn client(&self) -> TandemClient<Channel> {
        let i = self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    pub fn datacenter(&self) -> String {
        if !self.registered_dc.is_empty() {
            return self.registered_dc.clone();
        }
        self.status.read().info.as_ref().map(|i| i.datacenter.clone()).unwrap_or_default()
    }

    /// Starts tracking one request's latency; drop the handle when its reply arrived.
    pub fn track(&self) -> Handle {
        let mut m = self.ewma.lock();
        // `Meter` is always ready and its future completes at once.
        let _ = (*m).ready().now_or_never();
        m.call(()).now_or_never().expect("meter call is immediate").expect("infallible")
    }

    pub fn load(&self) -> Cost {
        self.ewma.lock().load()
    }

    /// One result (an active check, or a forwarded call's connection error).
    fn record(&self, ok: Result<Option<Info>, String>, h: &HealthConfig) {
        let mut s = self.status.write();
        let before = s.health;
        match ok {
            Ok(info) => {
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
        self.record(Err(message.to_string()), h);
    }

    /// Polls the cluster once.
    pub async fn check(&self, h: &HealthConfig) {
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
                    at: Instant::now(),
                }))
            }
            Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
            Err(_) => Err(format!("health check timed out after {} ms", h.timeout_ms)),
        };
        self.record(outcome, h);
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
}

/// Every cluster the gateway knows, by id.
pub struct Topology {
    clusters: RwLock<Arc<BTreeMap<String, Arc<Cluster>>>>,
    health: HealthConfig,
    options: ClusterOptions,
    shutdown: CancellationToken,
}

impl Topology {
    pub fn new(health: HealthConfig, options: ClusterOptions, shutdown: CancellationToken) -> Arc<Topology> {
        Arc::new(Topology { clusters: RwLock::new(Arc::new(BTreeMap::new())), health, options, shutdown })
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
        let current = self.clusters();
        if let Some(c) = current.get(&reg.id)
            && c.endpoint == reg.endpoint
            && c.registered_dc == reg.datacenter
        {
            return;
        }
        let cluster = match Cluster::new(&reg, &self.options) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(cluster = %reg.id, "ignoring registration: {e}");
                return;
            }
        };
        tracing::info!(cluster = %reg.id, endpoint = %reg.endpoint, datacenter = %reg.datacenter, "cluster added");
        let mut map = (*current).clone();
        if let Some(old) = map.insert(reg.id.clone(), cluster.clone()) {
            old.stop.cancel();
        }
        *self.clusters.write() = Arc::new(map);
        let h = self.health.clone();
        let stop = cluster.stop.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let interval = Duration::from_millis(h.interval_ms);
            loop {
                cluster.check(&h).await;
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = stop.cancelled() => break,
                    () = shutdown.cancelled() => break,
                }
            }
        });
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
    }

    /// Checks every cluster now (after a NotLeader reply), waiting for the results.
    pub async fn refresh(&self) {
        let clusters = self.clusters();
        futures::future::join_all(clusters.values().map(|c| c.check(&self.health))).await;
    }

    /// Healthy LEADING cluster with the highest epoch.
    pub fn leader(&self) -> Option<Arc<Cluster>> {
        let clusters = self.clusters();
        let mut best: Option<(u64, Arc<Cluster>)> = None;
        for c in clusters.values() {
            let s = c.status.read();
            if s.health != Health::Healthy {
                continue;
            }
            let Some(info) = &s.info else { continue };
            if info.role != Role::Leading {
                continue;
            }
            if best.as_ref().is_none_or(|(e, _)| info.epoch > *e) {
                best = Some((info.epoch, c.clone()));
            }
        }
        best.map(|(_, c)| c)
    }

    /// Topology RPC view.
    pub fn view(&self) -> pb::TopologyResponse {
        let leader = self.leader();
        let mut out = pb::TopologyResponse { leader: leader.map(|c| c.id.clone()).unwrap_or_default(), ..Default::default() };
        for c in self.clusters().values() {
            let dc = c.datacenter();
            let s = c.status.read();
            let (role, epoch, collections) =
                s.info.as_ref().map(|i| (i.role, i.epoch, i.raw.clone())).unwrap_or((Role::Unknown, 0, Vec::new()));
            out.epoch = out.epoch.max(epoch);
            let serviceable_ts = collections.iter().map(|c| c.serviceable_ts).min().unwrap_or(0);
            let lag_ms = collections.iter().map(|c| c.lag_ms).max().unwrap_or(0);
            out.clusters.push(pb::ClusterView {
                id: c.id.clone(),
                datacenter: dc,
                role: role.to_proto() as i32,
                epoch,
                endpoints: vec![c.endpoint.clone()],
                health: s.health.to_proto() as i32,
                readable: s.health == Health::Healthy && role.serves_reads(),
                serviceable_ts,
                lag_ms,
                collections,
                last_error: if s.health == Health::Healthy { String::new() } else { s.last_error.clone() },
                checked_ms_ago: s.last_ok.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0),
                reads_routed: c.reads_routed.load(Ordering::Relaxed),
                writes_routed: c.writes_routed.load(Ordering::Relaxed),
            });
        }
        out
    }
}
