//! The gRPC services: `tandem.v1.Tandem` (every RPC forwarded to a cluster) and
//! `tandem.v1.Gateway` (Topology).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tandem_client::Channel;
use tandem_proto::session::SessionToken;
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;
use tandem_proto::wire;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};
use tower::retry::budget::{Budget, TpsBudget};

use crate::buffer::{HoldError, WriteBuffer};
use crate::config::GatewayConfig;
use crate::error::{GatewayError, Replay, WriteFailure, classify_write_failure, is_connection_error, is_transient, passthrough};
use crate::router::{Guarantee, Reason, Router, expected_wait, explain, wall_ms};
use crate::session::Sessions;
use crate::topology::{Cluster, Health, Topology};

type Reply<T> = Result<Response<T>, Status>;
type Client = TandemClient<Channel>;

/// A request the gateway routes as a read.
pub trait ReadRequest: Clone + Send + Sync + 'static {
    fn collection(&self) -> Option<&str>;
    /// None: the RPC has no read options (List, Describe, GetClusterInfo): served like EVENTUALLY.
    fn read_options(&mut self) -> Option<&mut Option<pb::ReadOptions>>;
}

/// A reply that may carry a session token.
pub trait Tokened {
    fn token(&self) -> &str;
}

macro_rules! read_request {
    ($t:ty, $coll:ident) => {
        impl ReadRequest for $t {
            fn collection(&self) -> Option<&str> {
                Some(&self.$coll)
            }
            fn read_options(&mut self) -> Option<&mut Option<pb::ReadOptions>> {
                Some(&mut self.read)
            }
        }
    };
}
read_request!(pb::SearchRequest, collection);
read_request!(pb::GetRequest, collection);
read_request!(pb::QueryRequest, collection);
read_request!(pb::CountRequest, collection);

impl ReadRequest for pb::DescribeCollectionRequest {
    fn collection(&self) -> Option<&str> {
        Some(&self.name)
    }
    fn read_options(&mut self) -> Option<&mut Option<pb::ReadOptions>> {
        None
    }
}

macro_rules! no_read_options {
    ($t:ty) => {
        impl ReadRequest for $t {
            fn collection(&self) -> Option<&str> {
                None
            }
            fn read_options(&mut self) -> Option<&mut Option<pb::ReadOptions>> {
                None
            }
        }
    };
}
no_read_options!(pb::ListCollectionsRequest);
no_read_options!(pb::GetClusterInfoRequest);

macro_rules! tokened {
    ($($t:ty),*) => {$(
        impl Tokened for $t {
            fn token(&self) -> &str {
                &self.session_token
            }
        }
    )*};
}
tokened!(
    pb::SearchResponse,
    pb::GetResponse,
    pb::QueryResponse,
    pb::CountResponse,
    pb::MutationResponse,
    pb::FlushResponse,
    pb::CreateCollectionResponse,
    pb::DropCollectionResponse,
    pb::CreateIndexResponse,
    pb::DropIndexResponse
);
macro_rules! untokened {
    ($($t:ty),*) => {$(
        impl Tokened for $t {
            fn token(&self) -> &str {
                ""
            }
        }
    )*};
}
untokened!(pb::ListCollectionsResponse, pb::DescribeCollectionResponse, pb::GetClusterInfoResponse, pb::LoadCollectionResponse);

struct Inner {
    cfg: Arc<GatewayConfig>,
    topo: Arc<Topology>,
    router: Router,
    sessions: Sessions,
    budget: TpsBudget,
    buffer: Arc<WriteBuffer>,
}

/// The gateway's request handling, shared by both gRPC services.
#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

/// What happened to one attempt at one cluster.
type Attempt<R> = (Arc<Cluster>, Result<Response<R>, Status>);

impl Gateway {
    pub fn new(cfg: Arc<GatewayConfig>, topo: Arc<Topology>) -> Gateway {
        let r = &cfg.routing;
        Gateway(Arc::new(Inner {
            router: Router::new(r.policy, cfg.datacenter.clone()),
            sessions: Sessions::new(cfg.session.capacity, Duration::from_secs(cfg.session.ttl_s)),
            budget: TpsBudget::new(Duration::from_secs(r.retry.ttl_s), r.retry.min_per_s, r.retry.percent),
            buffer: WriteBuffer::start(cfg.buffer.clone(), &topo),
            cfg: cfg.clone(),
            topo,
        }))
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.0.topo
    }

    /// Every call to a cluster is built here: the one place that sets outbound metadata: the
    /// remaining deadline, and the W3C trace context of the current span (a child of the
    /// caller's, which the server's trace layer extracted from `incoming`), so the cluster's
    /// request span joins the client's trace.
    pub fn outbound<T>(&self, body: T, deadline: Instant, _incoming: &MetadataMap) -> Request<T> {
        let mut r = Request::new(body);
        r.set_timeout(deadline.saturating_duration_since(Instant::now()));
        tandem_telemetry::tracing::inject(r.metadata_mut());
        r
    }

    /// The request's deadline: its own grpc-timeout, capped by `routing.default_timeout_ms`.
    fn deadline(&self, md: &MetadataMap) -> (Instant, Duration) {
        let cap = Duration::from_millis(self.0.cfg.routing.default_timeout_ms);
        let given = md.get(wire::GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(wire::parse_grpc_timeout);
        let d = given.map_or(cap, |g| g.min(cap));
        (Instant::now() + d, d)
    }

    fn guarantee(&self, read: Option<&pb::ReadOptions>, token: Option<SessionToken>) -> Guarantee {
        match Guarantee::level(read) {
            pb::ConsistencyLevel::Strong => Guarantee::Strong,
            pb::ConsistencyLevel::Bounded => {
                let s = read.map(|r| r.staleness_ms).unwrap_or(0);
                Guarantee::Bounded(if s == 0 { self.0.cfg.routing.default_staleness_ms } else { s })
            }
            pb::ConsistencyLevel::Eventually => Guarantee::Eventually,
            pb::ConsistencyLevel::Session | pb::ConsistencyLevel::Unspecified => Guarantee::Session(token.map_or(0, |t| t.ts)),
        }
    }

    /// A read: any cluster that can reach the guarantee within the deadline; transient failures
    /// retry elsewhere (within the retry budget); optionally hedged.
    async fn read<Q, R, F, Fut>(&self, op: &'static str, req: Request<Q>, call: F) -> Reply<R>
    where
        Q: ReadRequest,
        R: Tokened + Send + 'static,
        F: Fn(Arc<Cluster>, Request<Q>) -> Fut,
        Fut: Future<Output = Reply<R>> + Send,
    {
        let started = Instant::now();
        let (deadline, budget_time) = self.deadline(req.metadata());
        let session = session_id(req.metadata());
        let (md, _, mut body) = req.into_parts();
        let mut guarantee = Guarantee::Eventually;
        if body.read_options().is_some() {
            let read = body.read_options().and_then(|r| r.as_ref()).cloned();
            let level = Guarantee::level(read.as_ref());
            let mut token = None;
            if level == pb::ConsistencyLevel::Session {
                let given = read.as_ref().map(|r| r.session_token.as_str()).unwrap_or("");
                match SessionToken::decode(given) {
                    Ok(t) => {
                        token = t;
                        if let Some(sid) = &session
                            && let Some(cached) = self.0.sessions.get(sid).await
                        {
                            let merged = token.map_or(cached, |t| t.max(cached));
                            if Some(merged) != token {
                                token = Some(merged);
                                let ro = body.read_options().expect("has read options");
                                let r = ro.get_or_insert_with(Default::default);
                                r.session_token = merged.encode();
                            }
                        }
                    }
                    // A malformed token goes to the cluster unchanged: its error names it.
                    Err(_) => token = None,
                }
            }
            guarantee = self.guarantee(read.as_ref(), token);
        }
        let collection = body.collection().map(str::to_string);
        let hedge = self.0.cfg.routing.hedge_after_ms;
        let max_attempts = self.0.cfg.routing.retry.max_attempts as usize;
        self.0.budget.deposit();

        let mut tried: Vec<Arc<Cluster>> = Vec::new();
        let mut inflight = FuturesUnordered::new();
        let mut last_err: Option<(Arc<Cluster>, Status)> = None;
        let mut hedged = hedge == 0;
        let hedge_timer = tokio::time::sleep(Duration::from_millis(hedge));
        tokio::pin!(hedge_timer);

        // Launches one attempt at the best untried cluster; Err: why none could be picked.
        let launch = |tried: &mut Vec<Arc<Cluster>>, retry: bool| -> Result<_, Status> {
            let now_ms = wall_ms();
            let remaining = deadline.saturating_duration_since(Instant::now());
            let mut eligible = Vec::new();
            let mut why = Vec::new();
            for c in self.0.topo.clusters().values() {
                if tried.iter().any(|t| Arc::ptr_eq(t, c)) {
                    why.push((c.id.clone(), "already tried".to_string()));
                    continue;
                }
                match expected_wait(c, collection.as_deref(), guarantee, now_ms) {
                    Ok(w) if w < remaining => eligible.push(c.clone()),
                    Ok(w) => why.push((c.id.clone(), format!("needs ~{} ms to catch up", w.as_millis()))),
                    Err(e) => why.push((c.id.clone(), e)),
                }
            }
            if eligible.is_empty() {
                return Err(
                    GatewayError::NoCluster(explain(&format!("a {op}"), guarantee, collection.as_deref(), budget_time, &why)).into()
                );
            }
            if retry && !self.0.budget.withdraw() {
                return Err(GatewayError::RetryBudget.into());
            }
            let (cluster, reason) = self.0.router.choose(&eligible);
            tried.push(cluster.clone());
            cluster.reads_routed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tandem_gateway_routed_total", "cluster" => cluster.id.clone(), "reason" => reason.as_str()).increment(1);
            let req = self.outbound(body.clone(), deadline, &md);
            let handle = cluster.track();
            let fut = call(cluster.clone(), req);
            Ok(async move {
                let r = fut.await;
                // An answer of the cluster's is a latency sample; a read that ended on the
                // caller's deadline, was cancelled or never reached the cluster is not (the
                // health checks judge an unreachable or stalled cluster).
                let answered = match &r {
                    Ok(_) => true,
                    Err(s) => !matches!(s.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) && !is_connection_error(s),
                };
                if answered {
                    handle.answered();
                }
                (cluster, r)
            })
        };

        match launch(&mut tried, false) {
            Ok(f) => inflight.push(f),
            Err(s) => {
                self.finish(op, guarantee.label(), "none", &s, started);
                return Err(s);
            }
        }
        loop {
            let next: Option<Attempt<R>> = tokio::select! {
                r = inflight.next() => r,
                () = &mut hedge_timer, if !hedged => {
                    hedged = true;
                    if tried.len() < max_attempts && let Ok(f) = launch(&mut tried, true) {
                        metrics::counter!("tandem_gateway_retries_total", "kind" => "hedge").increment(1);
                        inflight.push(f);
                    }
                    continue;
                }
            };
            let Some((cluster, result)) = next else { break };
            match result {
                Ok(resp) => {
                    if let Some(sid) = &session {
                        self.0.sessions.observe(sid, resp.get_ref().token()).await;
                    }
                    self.finish(op, guarantee.label(), &cluster.id, &Status::ok(""), started);
                    return Ok(Response::new(resp.into_inner()));
                }
                Err(s) => {
                    if is_connection_error(&s) {
                        cluster.passive_error(s.message(), self.0.topo.health_config());
                    }
                    let retryable = is_transient(&s) && Instant::now() < deadline;
                    last_err = Some((cluster, s));
                    if !retryable {
                        break;
                    }
                    if !inflight.is_empty() {
                        // A hedge is still running: let it answer.
                        continue;
                    }
                    if tried.len() < max_attempts
                        && let Ok(f) = launch(&mut tried, true)
                    {
                        metrics::counter!("tandem_gateway_retries_total", "kind" => "retry").increment(1);
                        inflight.push(f);
                        continue;
                    }
                    break;
                }
            }
        }
        let (cluster, s) = last_err.expect("an attempt failed");
        self.finish(op, guarantee.label(), &cluster.id, &s, started);
        Err(passthrough(s))
    }

    /// A write or DDL goes to the leader, tagged with its epoch ([`wire::EPOCH`]). With no
    /// usable leader it is held ([`WriteBuffer`]) until one appears. A failed attempt is sent
    /// again only when that cannot apply it twice ([`classify_write_failure`]):
    /// * not sent (connection refused, not ready): the cluster is suspect, hold, resend;
    /// * refused (NotLeader, fenced, stale epoch): refresh the topology, hold until a leader
    ///   other than the one that refused at that epoch, resend;
    /// * sent but the reply lost: resend only an idempotent write (upsert, delete); any other
    ///   fails with UNAVAILABLE saying its outcome is unknown;
    /// * anything else is the cluster's answer and goes back unchanged.
    async fn write<Q, R, F, Fut>(&self, op: &'static str, replay: Replay, req: Request<Q>, call: F) -> Reply<R>
    where
        Q: Clone + Send + Sync + 'static,
        R: Tokened + Send + 'static,
        F: Fn(Client, Request<Q>) -> Fut,
        Fut: Future<Output = Reply<R>> + Send,
    {
        let started = Instant::now();
        let (deadline, _) = self.deadline(req.metadata());
        let session = session_id(req.metadata());
        let (md, _, body) = req.into_parts();
        // The leader (and its epoch) that refused this write: not tried again until it changes.
        let mut refused: Option<(Arc<Cluster>, u64, String)> = None;
        // Set when the write first has to wait: bounds every hold of this write together.
        let mut hold_until: Option<Instant> = None;
        let mut reason = Reason::Leader;
        let topo = &self.0.topo;
        loop {
            let usable = |(c, e): &(Arc<Cluster>, u64)| refused.as_ref().is_none_or(|(rc, re, _)| !(Arc::ptr_eq(rc, c) && re == e));
            let (leader, epoch) = match topo.leader_and_epoch().filter(usable) {
                Some(l) => l,
                None => {
                    let until = *hold_until.get_or_insert_with(|| self.hold_limit(deadline));
                    match self.0.buffer.hold(until, || topo.leader_and_epoch().filter(usable)).await {
                        Ok(l) => {
                            reason = Reason::Held;
                            l
                        }
                        Err(e) => {
                            let s = self.not_placed(e, refused.as_ref());
                            self.finish(op, "none", refused.as_ref().map_or("none", |r| r.0.id.as_str()), &s, started);
                            return Err(s);
                        }
                    }
                }
            };
            leader.writes_routed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tandem_gateway_routed_total", "cluster" => leader.id.clone(), "reason" => reason.as_str()).increment(1);
            let mut r = self.outbound(body.clone(), deadline, &md);
            r.metadata_mut().insert(wire::EPOCH, MetadataValue::from(epoch));
            // Not metered: the latency meter ranks clusters for reads, and a write's fsync and
            // export wait would make the leader look slow for reads.
            let s = match call(leader.client(), r).await {
                Ok(resp) => {
                    if let Some(sid) = &session {
                        self.0.sessions.observe(sid, resp.get_ref().token()).await;
                    }
                    self.finish(op, "none", &leader.id, &Status::ok(""), started);
                    return Ok(Response::new(resp.into_inner()));
                }
                Err(s) => s,
            };
            let failure = classify_write_failure(&s);
            match failure {
                WriteFailure::Final => {
                    self.finish(op, "none", &leader.id, &s, started);
                    return Err(passthrough(s));
                }
                WriteFailure::NotSent | WriteFailure::Unknown => {
                    topo.suspect(&leader, s.message());
                    if failure == WriteFailure::Unknown && replay == Replay::AtMostOnce {
                        let s = Status::from(GatewayError::OutcomeUnknown(format!(
                            "the outcome of this {op} is unknown: the connection to the leader {} failed after the request was sent \
                             ({}); it may or may not have been applied. Read to check, or send it again as an upsert",
                            leader.id,
                            s.message()
                        )));
                        self.finish(op, "none", &leader.id, &s, started);
                        return Err(s);
                    }
                    tracing::info!(cluster = %leader.id, op, error = %s.message(), ?failure, "write to the leader failed: holding it for a leader");
                    metrics::counter!("tandem_gateway_retries_total", "kind" => "resend").increment(1);
                }
                WriteFailure::Refused => {
                    tracing::info!(cluster = %leader.id, epoch, op, error = %s.message(), "the leader refused the write: refreshing the topology");
                    refused = Some((leader.clone(), epoch, s.message().to_string()));
                    topo.refresh().await;
                    metrics::counter!("tandem_gateway_retries_total", "kind" => "redirect").increment(1);
                }
            }
            reason = Reason::Redirect;
            let until = *hold_until.get_or_insert_with(|| self.hold_limit(deadline));
            if Instant::now() >= until {
                let s = self.not_placed(HoldError::Timeout { held: self.0.buffer.held(), waited: started.elapsed() }, refused.as_ref());
                self.finish(op, "none", &leader.id, &s, started);
                return Err(s);
            }
        }
    }

    /// How long a write may be held from now: `buffer.max_wait_ms`, and a little less than its
    /// deadline, so the client gets the gateway's explanation rather than its own timeout.
    fn hold_limit(&self, deadline: Instant) -> Instant {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        let before_deadline = deadline - (left / 10).min(Duration::from_millis(50));
        (now + Duration::from_millis(self.0.cfg.buffer.max_wait_ms)).min(before_deadline)
    }

    /// Writes held now (waiting for a leader).
    pub fn writes_held(&self) -> usize {
        self.0.buffer.held()
    }

    /// UNAVAILABLE for a write no leader could take within the buffer's bounds, with
    /// `retry-after` (ms) metadata.
    fn not_placed(&self, e: HoldError, refused: Option<&(Arc<Cluster>, u64, String)>) -> Status {
        let b = &self.0.cfg.buffer;
        let mut why = self.no_leader();
        if let Some((c, epoch, m)) = refused {
            why.push_str(&format!("; {} (epoch {epoch}) refused the write: {m}", c.id));
        }
        let m = match e {
            HoldError::Off => format!(
                "no leader: election in progress, 0 writes held (buffering is off: buffer.max_writes = {}, buffer.max_wait_ms = {}): {why}",
                b.max_writes, b.max_wait_ms
            ),
            HoldError::Full { held } => {
                format!(
                    "no leader: election in progress, {held} writes held (buffer.max_writes = {}): refused at once: {why}",
                    b.max_writes
                )
            }
            HoldError::Timeout { held, waited } => format!(
                "no leader: election in progress, {held} writes held: this write waited {} ms for a leader (buffer.max_wait_ms = {}, or its deadline): {why}",
                waited.as_millis(),
                b.max_wait_ms
            ),
            HoldError::Stopped => format!("the gateway is stopping: {why}"),
        };
        GatewayError::NoLeader { message: m, retry_after_ms: b.retry_after_ms }.into()
    }

    fn no_leader(&self) -> String {
        let clusters = self.0.topo.clusters();
        if clusters.is_empty() {
            return "no leading cluster is known: the gateway knows no cluster".into();
        }
        let why: Vec<String> = clusters
            .values()
            .map(|c| {
                let s = c.status.read();
                match (&s.health, &s.info) {
                    (Health::Unhealthy, _) => format!("{} unhealthy: {}", c.id, s.last_error),
                    (Health::Healthy, _) if s.suspect_since.is_some() => format!("{} suspect: {}", c.id, s.last_error),
                    (Health::Healthy, Some(i)) => format!("{} is {:?} at epoch {}", c.id, crate::topology::role_to_proto(i.role), i.epoch),
                    (Health::Unknown | Health::Healthy, _) => format!("{} not checked yet", c.id),
                }
            })
            .collect();
        format!("no leading cluster is known: {}", why.join(", "))
    }

    fn finish(&self, op: &'static str, consistency: &'static str, cluster: &str, s: &Status, started: Instant) {
        // The same outcome names as the clusters' `tandem_requests_total` (`OK`, `UNAVAILABLE`, ...).
        let outcome = tandem_telemetry::metrics::code_name(s.code());
        metrics::counter!("tandem_gateway_requests_total", "op" => op, "consistency" => consistency, "cluster" => cluster.to_string(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("tandem_gateway_request_duration_seconds", "op" => op).record(started.elapsed().as_secs_f64());
    }
}

fn session_id(md: &MetadataMap) -> Option<String> {
    md.get(wire::SESSION_ID).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()).map(str::to_string)
}

#[tonic::async_trait]
impl pb::tandem_server::Tandem for Gateway {
    async fn create_collection(&self, r: Request<pb::CreateCollectionRequest>) -> Reply<pb::CreateCollectionResponse> {
        self.write("CreateCollection", Replay::AtMostOnce, r, |mut c, r| async move { c.create_collection(r).await }).await
    }
    async fn drop_collection(&self, r: Request<pb::DropCollectionRequest>) -> Reply<pb::DropCollectionResponse> {
        self.write("DropCollection", Replay::AtMostOnce, r, |mut c, r| async move { c.drop_collection(r).await }).await
    }
    async fn list_collections(&self, r: Request<pb::ListCollectionsRequest>) -> Reply<pb::ListCollectionsResponse> {
        self.read("ListCollections", r, |c, r| async move { c.reader().list_collections(r).await }).await
    }
    async fn describe_collection(&self, r: Request<pb::DescribeCollectionRequest>) -> Reply<pb::DescribeCollectionResponse> {
        self.read("DescribeCollection", r, |c, r| async move { c.reader().describe_collection(r).await }).await
    }
    async fn create_index(&self, r: Request<pb::CreateIndexRequest>) -> Reply<pb::CreateIndexResponse> {
        self.write("CreateIndex", Replay::AtMostOnce, r, |mut c, r| async move { c.create_index(r).await }).await
    }
    async fn drop_index(&self, r: Request<pb::DropIndexRequest>) -> Reply<pb::DropIndexResponse> {
        self.write("DropIndex", Replay::AtMostOnce, r, |mut c, r| async move { c.drop_index(r).await }).await
    }
    async fn insert(&self, r: Request<pb::InsertRequest>) -> Reply<pb::MutationResponse> {
        self.write("Insert", Replay::AtMostOnce, r, |mut c, r| async move { c.insert(r).await }).await
    }
    async fn upsert(&self, r: Request<pb::UpsertRequest>) -> Reply<pb::MutationResponse> {
        self.write("Upsert", Replay::Idempotent, r, |mut c, r| async move { c.upsert(r).await }).await
    }
    async fn delete(&self, r: Request<pb::DeleteRequest>) -> Reply<pb::MutationResponse> {
        self.write("Delete", Replay::Idempotent, r, |mut c, r| async move { c.delete(r).await }).await
    }
    async fn flush(&self, r: Request<pb::FlushRequest>) -> Reply<pb::FlushResponse> {
        self.write("Flush", Replay::AtMostOnce, r, |mut c, r| async move { c.flush(r).await }).await
    }
    async fn search(&self, r: Request<pb::SearchRequest>) -> Reply<pb::SearchResponse> {
        self.read("Search", r, |c, r| async move { crate::coalesce::search(&c, r).await }).await
    }
    async fn get(&self, r: Request<pb::GetRequest>) -> Reply<pb::GetResponse> {
        self.read("Get", r, |c, r| async move { c.reader().get(r).await }).await
    }
    async fn query(&self, r: Request<pb::QueryRequest>) -> Reply<pb::QueryResponse> {
        self.read("Query", r, |c, r| async move { c.reader().query(r).await }).await
    }
    async fn count(&self, r: Request<pb::CountRequest>) -> Reply<pb::CountResponse> {
        self.read("Count", r, |c, r| async move { c.reader().count(r).await }).await
    }
    async fn get_cluster_info(&self, r: Request<pb::GetClusterInfoRequest>) -> Reply<pb::GetClusterInfoResponse> {
        self.read("GetClusterInfo", r, |c, r| async move { c.reader().get_cluster_info(r).await }).await
    }
    /// To the leader, as writes go: the setting is each cluster's own (docs/scaling.md), and the
    /// leader is the one cluster a gateway always has. Setting it twice sets the same groups.
    async fn load_collection(&self, r: Request<pb::LoadCollectionRequest>) -> Reply<pb::LoadCollectionResponse> {
        self.write("LoadCollection", Replay::Idempotent, r, |mut c, r| async move { c.load_collection(r).await }).await
    }
}

#[tonic::async_trait]
impl pb::gateway_server::Gateway for Gateway {
    async fn topology(&self, _r: Request<pb::TopologyRequest>) -> Reply<pb::TopologyResponse> {
        Ok(Response::new(self.0.topo.view()))
    }
}
