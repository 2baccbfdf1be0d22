//! The `tandem.v1.Tandem` gRPC service of a cluster node: turns requests into validated engine
//! calls and engine results into replies. Validation happens here, before anything changes, and
//! every rejection names the bad value.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_proto::wire;
use tonic::{Request, Response, Status};

use crate::ann::Knobs;
use crate::batch::{Answer, Search};
use crate::collection::{Collection, Write};
use crate::config::{AckPolicy, ClusterConfig};
use crate::error::{ClusterError, Result};
use crate::filter::Filter;
use crate::node::Node;
use crate::role::Role;
use crate::schema::{Metric, Outputs, Schema};
use crate::segment::Row;
use crate::ts::{SessionToken, Ts, compose, wall_ms};

#[derive(Clone)]
pub struct ClusterService {
    node: Arc<Node>,
    cfg: Arc<ClusterConfig>,
    /// The `cluster` label of this node's metrics (several clusters may share a process).
    cluster: Arc<str>,
}

type Reply<T> = std::result::Result<Response<T>, Status>;

/// How long a request may wait here: its `grpc-timeout` less a margin, capped by the node's
/// longest wait. The margin makes the server give up first, so the client receives the
/// server's explanation (e.g. how far behind the replica is) instead of its own bare timeout.
pub(crate) fn deadline<T>(req: &Request<T>, max_wait: Duration) -> Instant {
    let parsed = req.metadata().get(wire::GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(wire::parse_grpc_timeout);
    let wait = parsed.map_or(max_wait, |d| d.saturating_sub((d / 10).min(Duration::from_millis(50))).min(max_wait));
    Instant::now() + wait
}

/// How often a STRONG or SESSION read waiting on an alternative asks the leader's clock again.
const ASK_LEADER_EVERY: Duration = Duration::from_secs(1);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ClusterError::Internal(format!("blocking task: {e}")))?
}

fn check_vectors(what: &str, schema: &Schema, ids: Option<&[i64]>, vectors: &mut [f32]) -> Result<usize> {
    let dim = schema.dim;
    if vectors.is_empty() {
        return Err(ClusterError::invalid(format!("{what}: empty batch, no vectors")));
    }
    if !vectors.len().is_multiple_of(dim) || ids.is_some_and(|ids| ids.len() * dim != vectors.len()) {
        let rows = ids.map_or(String::new(), |ids| format!(" for {} ids", ids.len()));
        return Err(ClusterError::invalid(format!(
            "{what}: wrong vector dimension: collection {:?} has dim {dim}, got {} floats{rows}",
            schema.name,
            vectors.len()
        )));
    }
    let n = vectors.len() / dim;
    for (i, v) in vectors.chunks_exact_mut(dim).enumerate() {
        // Only a refusal names the vector: formatting it for every row would cost an insert
        // of thousands of rows as many allocations.
        let label = || ids.map_or(format!("query {i}"), |ids| format!("the vector of id {}", ids[i]));
        if let Some(p) = v.iter().position(|x| !x.is_finite()) {
            return Err(ClusterError::invalid(format!("{what}: {} has a non-finite value ({}) at position {p}", label(), v[p])));
        }
        if schema.metric == Metric::Cosine {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm == 0.0 || !norm.is_finite() {
                return Err(ClusterError::invalid(format!("{what}: {} has zero length; COSINE needs a non-zero vector", label())));
            }
            // Queries are normalised here; stored rows keep their vectors as inserted (the
            // distance and the index builds normalise them: see segment::distance).
            if ids.is_none() {
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
    }
    Ok(n)
}

/// A write tagged for another epoch's leader is refused before anything changes: either this
/// cluster was fenced (a newer leader exists) or the sender has not yet seen this cluster's
/// promotion. Untagged writes (clients talking to the cluster directly) are not checked.
fn check_epoch<T>(req: &Request<T>, node: &Node) -> Result<()> {
    let Some(v) = req.metadata().get(wire::EPOCH) else { return Ok(()) };
    let Some(sent) = v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) else {
        return Err(ClusterError::invalid(format!("{} metadata {v:?}: expected an epoch number", wire::EPOCH)));
    };
    let own = node.epoch();
    if sent == own {
        return Ok(());
    }
    Err(ClusterError::StaleEpoch { cluster: node.opts.cluster_id.clone(), sent, own })
}

fn compile_filter(schema: &Schema, filter: &str) -> Result<Option<Filter>> {
    if filter.trim().is_empty() { Ok(None) } else { Ok(Some(Filter::compile_in(filter, schema.filter_scope())?)) }
}

impl ClusterService {
    pub fn new(node: Arc<Node>, cfg: Arc<ClusterConfig>) -> Self {
        describe_metrics();
        let cluster = node.opts.cluster_id.as_str().into();
        ClusterService { node, cfg, cluster }
    }

    fn max_wait(&self) -> Duration {
        Duration::from_millis(self.cfg.read.max_wait_ms)
    }

    fn rows(
        &self,
        what: &str,
        schema: &Schema,
        ids: &[i64],
        mut vectors: Vec<f32>,
        payloads: &[pb::Payload],
    ) -> Result<(Vec<f32>, Vec<Row>)> {
        if ids.is_empty() {
            return Err(ClusterError::invalid(format!("{what}: empty batch, no ids")));
        }
        if ids.len() > self.cfg.limits.max_write_rows {
            return Err(ClusterError::invalid(format!(
                "{what}: {} rows exceed the limit of {} per request",
                ids.len(),
                self.cfg.limits.max_write_rows
            )));
        }
        check_vectors(what, schema, Some(ids), &mut vectors)?;
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        if let Some(dup) = ids.iter().find(|id| !seen.insert(**id)) {
            return Err(ClusterError::invalid(format!("{what}: id {dup} appears more than once in the batch")));
        }
        if !payloads.is_empty() && payloads.len() != ids.len() {
            return Err(ClusterError::invalid(format!(
                "{what}: {} payloads for {} ids: send none or one per id",
                payloads.len(),
                ids.len()
            )));
        }
        let rows = if payloads.is_empty() {
            vec![vec![None; schema.fields.len()]; ids.len()]
        } else {
            payloads.iter().map(|p| schema.row_from_payload(Some(p))).collect::<Result<_>>()?
        };
        Ok((vectors, rows))
    }

    /// Asks the leader's clock, which makes its feeds tick at once. Best effort, for at most one
    /// tick: the caller's wait bounds the read either way.
    async fn poke_leader(&self) {
        let tick = Duration::from_millis(self.cfg.replication.tick_ms);
        let _ = tokio::time::timeout(tick, self.node.strong_ts()).await;
    }

    /// On an alternative: waits until every shard serves `guarantee`, asking the leader's clock
    /// again every [`ASK_LEADER_EVERY`] while some shard lags. One ask can be lost for a shard:
    /// the tick it causes may be published before that shard's broker subscription is live,
    /// and the next natural tick is up to `replication.tick_ms` away (a minute by default).
    async fn wait_asking_the_leader(&self, c: &Collection, guarantee: Ts, deadline: Instant) -> Result<Ts> {
        loop {
            let round = deadline.min(Instant::now() + ASK_LEADER_EVERY);
            match c.wait_serviceable(&self.node.clock, guarantee, round).await {
                Err(ClusterError::Lagging { .. }) if Instant::now() < deadline => self.poke_leader().await,
                r => return r,
            }
        }
    }

    /// Waits until the collection can serve the requested consistency and returns the snapshot
    /// to read at, and the token to hand back.
    async fn snapshot(&self, c: &Collection, read: Option<&pb::ReadOptions>, deadline: Instant) -> Result<(Ts, SessionToken)> {
        let role = self.node.role();
        if !role.is_readable() {
            return Err(ClusterError::Unavailable(format!("cluster {} is {role} and serves no reads", self.node.opts.cluster_id)));
        }
        let default = pb::ReadOptions::default();
        let read = read.unwrap_or(&default);
        let token = SessionToken::decode(&read.session_token)?;
        let level = pb::ConsistencyLevel::try_from(read.consistency).map_err(|_| {
            ClusterError::invalid(format!("unknown consistency level {}: use STRONG, BOUNDED, SESSION or EVENTUALLY", read.consistency))
        })?;
        use pb::ConsistencyLevel as L;
        let guarantee = match level {
            L::Strong => self.node.strong_ts().await?,
            L::Bounded => {
                let staleness = if read.staleness_ms == 0 { self.cfg.read.default_staleness_ms } else { read.staleness_ms };
                compose(wall_ms().saturating_sub(staleness), 0)
            }
            L::Session | L::Unspecified => {
                if let Some(t) = token {
                    self.wait_epoch(t.epoch, deadline).await?;
                }
                let ts = token.map_or(0, |t| t.ts);
                if ts > 0 && !role.accepts_writes() && c.serviceable_ts(&self.node.clock) < ts {
                    // On an alternative, the shards a write did not touch reach its ts only at
                    // the leader's next tick (`replication.tick_ms`), which would be most of
                    // the read's latency. Asking the leader's clock makes its feeds tick at
                    // once, as a STRONG read does.
                    self.poke_leader().await;
                }
                ts
            }
            L::Eventually => 0,
        };
        let leader_ticks = !role.accepts_writes() && matches!(level, L::Strong | L::Session | L::Unspecified);
        let snap = if leader_ticks {
            self.wait_asking_the_leader(c, guarantee, deadline).await?
        } else {
            c.wait_serviceable(&self.node.clock, guarantee, deadline).await?
        };
        let reply = self.node.token(c.newest_change_visible_at(snap));
        Ok((snap, token.map_or(reply, |t| reply.max(t))))
    }

    /// A session token from epoch `epoch` may name writes of that epoch's leader, which a
    /// cluster still at an older epoch cannot have, whatever its clock or its stream's ticks
    /// say (a deposed leader that has not noticed yet, or an alternative still applying the
    /// old leader's ticks). A leader at an older epoch has been replaced: it refuses at once, so
    /// the gateway reads elsewhere. Any other cluster waits, within the read's deadline, until
    /// the arbiter tells it of that epoch.
    async fn wait_epoch(&self, epoch: u64, deadline: Instant) -> Result<()> {
        loop {
            let leads = self.node.role().accepts_writes();
            let own = self.node.epoch();
            if own >= epoch {
                return Ok(());
            }
            let cluster = &self.node.opts.cluster_id;
            if leads {
                return Err(ClusterError::Unavailable(format!(
                    "cluster {cluster} leads epoch {own} but the session token is from epoch {epoch}: a newer leader exists, \
                     whose writes this cluster may lack; nothing was read"
                )));
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Lagging {
                    message: format!(
                        "cluster {cluster} is at epoch {own} and the session token is from epoch {epoch}, which it has not seen yet"
                    ),
                    lag_ms: 0,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn ddl_exported(&self, deadline: Instant) -> Result<()> {
        if self.cfg.replication.ack == AckPolicy::Exported {
            self.node.wait_ddl_exported(deadline).await?;
        }
        self.node.check_lease()
    }

    fn mutation(&self, ts: Ts, count: u64) -> pb::MutationResponse {
        pb::MutationResponse { count, ts, session_token: self.node.token(ts).encode(), ids: Vec::new() }
    }

    /// Applies a write and, under ack policy `exported` with a broker publisher running, waits
    /// until the transport holds it, so no acknowledged write is lost if this leader dies.
    async fn write(&self, c: Arc<Collection>, w: Write, ack: i32, deadline: Instant) -> Result<(Ts, u64)> {
        let exported = match pb::AckPolicy::try_from(ack) {
            Ok(pb::AckPolicy::Unspecified) => self.cfg.replication.ack == AckPolicy::Exported,
            Ok(pb::AckPolicy::Exported) => true,
            Ok(pb::AckPolicy::Local) => false,
            Err(_) => return Err(ClusterError::invalid(format!("unknown ack policy {ack}: use EXPORTED or LOCAL"))),
        };
        let node = self.node.clone();
        let c2 = c.clone();
        let out = blocking(move || node.write(&c2, w)).await?;
        if self.node.exporting() && exported {
            c.wait_exported(&out.lsns, deadline).await?;
        }
        // Still the leader's lease: a write exported after it may be missing at the next leader.
        self.node.check_lease()?;
        Ok((out.ts, out.count))
    }

    fn collection_info(&self, c: &Collection) -> pb::CollectionInfo {
        let mut rows = 0;
        let mut segments = Vec::new();
        let schema = c.schema();
        for shard in c.shards() {
            let s = shard.stats();
            rows += s.live_rows;
            for seg in &s.sealed {
                // Indexed: with the collection's current index (a segment still searched by its
                // previous one while the new one builds counts as sealed).
                let current = seg.is_indexed_as(schema.index, schema.metric);
                let state = if current { pb::segment_info::State::Indexed } else { pb::segment_info::State::Sealed };
                segments.push(pb::SegmentInfo {
                    id: seg.id,
                    shard: shard.index,
                    state: state as i32,
                    rows: seg.len() as u64,
                    deleted: seg.deleted() as u64,
                });
            }
            if s.growing.1 > 0 {
                segments.push(pb::SegmentInfo {
                    id: s.growing.0,
                    shard: shard.index,
                    state: pb::segment_info::State::Growing as i32,
                    rows: s.growing.1,
                    deleted: s.growing.2,
                });
            }
        }
        pb::CollectionInfo {
            schema: Some(c.schema().to_proto()),
            collection_id: c.id,
            created_ts: c.created_ts,
            rows,
            segments,
            serviceable_ts: c.serviceable_ts(&self.node.clock),
        }
    }

    fn entities(schema: &Schema, found: Vec<(i64, Vec<f32>, Row)>, outputs: &Outputs, include_vectors: bool) -> Vec<pb::Entity> {
        found
            .into_iter()
            .map(|(id, v, row)| pb::Entity {
                id,
                vector: if include_vectors { v } else { Vec::new() },
                payload: schema.payload_of(&row, outputs),
            })
            .collect()
    }
}

/// The RPC handlers; the `Tandem` impl below runs each inside [`ClusterService::observed`].
impl ClusterService {
    async fn handle_create_collection(&self, req: Request<pb::CreateCollectionRequest>) -> Reply<pb::CreateCollectionResponse> {
        check_epoch(&req, &self.node)?;
        let deadline = deadline(&req, self.max_wait());
        let schema = req.into_inner().schema.ok_or_else(|| ClusterError::invalid("create collection needs a schema"))?;
        let node = self.node.clone();
        let (c, ts) = blocking(move || node.create_collection(&schema)).await?;
        self.ddl_exported(deadline).await?;
        Ok(Response::new(pb::CreateCollectionResponse {
            collection: Some(self.collection_info(&c)),
            session_token: self.node.token(ts).encode(),
        }))
    }

    async fn handle_drop_collection(&self, req: Request<pb::DropCollectionRequest>) -> Reply<pb::DropCollectionResponse> {
        check_epoch(&req, &self.node)?;
        let deadline = deadline(&req, self.max_wait());
        let name = req.into_inner().name;
        let node = self.node.clone();
        let ts = blocking(move || node.drop_collection(&name)).await?;
        self.ddl_exported(deadline).await?;
        Ok(Response::new(pb::DropCollectionResponse { session_token: self.node.token(ts).encode() }))
    }

    async fn handle_list_collections(&self, _req: Request<pb::ListCollectionsRequest>) -> Reply<pb::ListCollectionsResponse> {
        Ok(Response::new(pb::ListCollectionsResponse { names: self.node.collection_names() }))
    }

    async fn handle_describe_collection(&self, req: Request<pb::DescribeCollectionRequest>) -> Reply<pb::DescribeCollectionResponse> {
        let c = self.node.collection(&req.into_inner().name)?;
        Ok(Response::new(pb::DescribeCollectionResponse { collection: Some(self.collection_info(&c)) }))
    }

    /// Not a write: the replicas are this cluster's placement (coordinator state), so any
    /// cluster that serves reads takes it, alternatives included, and no epoch applies.
    async fn handle_load_collection(&self, req: Request<pb::LoadCollectionRequest>) -> Reply<pb::LoadCollectionResponse> {
        let r = req.into_inner();
        let c = self.node.collection(&r.name)?;
        let groups = self.node.fanout().set_replicas(c.id, r.replicas)?;
        Ok(Response::new(pb::LoadCollectionResponse { groups }))
    }

    async fn handle_create_index(&self, req: Request<pb::CreateIndexRequest>) -> Reply<pb::CreateIndexResponse> {
        check_epoch(&req, &self.node)?;
        let deadline = deadline(&req, self.max_wait());
        let r = req.into_inner();
        let node = self.node.clone();
        let ts = blocking(move || node.create_index(&r.collection, r.index.as_ref())).await?;
        self.ddl_exported(deadline).await?;
        Ok(Response::new(pb::CreateIndexResponse { session_token: self.node.token(ts).encode() }))
    }

    async fn handle_drop_index(&self, req: Request<pb::DropIndexRequest>) -> Reply<pb::DropIndexResponse> {
        check_epoch(&req, &self.node)?;
        let deadline = deadline(&req, self.max_wait());
        let name = req.into_inner().collection;
        let node = self.node.clone();
        let ts = blocking(move || node.drop_index(&name)).await?;
        self.ddl_exported(deadline).await?;
        Ok(Response::new(pb::DropIndexResponse { session_token: self.node.token(ts).encode() }))
    }

    async fn handle_insert(&self, req: Request<pb::InsertRequest>) -> Reply<pb::MutationResponse> {
        check_epoch(&req, &self.node)?;
        let deadline = deadline(&req, self.max_wait());
        let mut r = req.into_inner();
        let c = self.node.collection(&r.collection)?;
        let schema = c.schema();
        let auto_id = schema.options.auto_id;
        if auto_id {
            if !r.ids.is_empty() {
                return Err(ClusterError::invalid(format!(
                    "insert: collection {:?} assigns ids itself (auto_id); send {} rows without ids",
                    r.collection,
                    r.ids.len()
                ))
                .into());
            }
            // Rows are counted by vectors; `rows` below checks the rest (payload count, limits).
            let n = (r.vectors.len() / schema.dim.max(1)).min(self.cfg.limits.max_write_rows + 1) as u64;
            if n > 0 {
                let first = self.node.clock.reserve(n);
                r.ids = (first..first + n).map(|ts| ts as i64).collect();
            }
        }
        let (vectors, rows) = self.rows("insert", &schema, &r.ids, r.vectors, &r.payloads)?;
        let ids = if auto_id { r.ids.clone() } else { Vec::new() };
        let (ts, n) = self.write(c, Write::Insert { ids: r.ids, vectors, rows }, r.ack, deadline).await?;
        Ok(Response::new(pb::MutationResponse { ids, ..self.mutation(ts, n) }))
    }

    async fn handle_upsert(&self, req: Request<pb::UpsertRequest>) -> Reply<pb::MutationResponse> {
        check_epoch(&req, &self.node)?;
        let deadline = deadline(&req, self.max_wait());
        let r = req.into_inner();
        let c = self.node.collection(&r.collection)?;
        let (vectors, rows) = self.rows("upsert", &c.schema(), &r.ids, r.vectors, &r.payloads)?;
        let (ts, n) = self.write(c, Write::Upsert { ids: r.ids, vectors, rows }, r.ack, deadline).await?;
        Ok(Response::new(self.mutation(ts, n)))
    }

    async fn handle_delete(&self, req: Request<pb::DeleteRequest>) -> Reply<pb::MutationResponse> {
        check_epoch(&req, &self.node)?;
        let deadline = deadline(&req, self.max_wait());
        let r = req.into_inner();
        let c = self.node.collection(&r.collection)?;
        let w = match (r.ids.is_empty(), r.filter.trim().is_empty()) {
            (false, true) => {
                if r.ids.len() > self.cfg.limits.max_write_rows {
                    return Err(ClusterError::invalid(format!(
                        "delete: {} ids exceed the limit of {}",
                        r.ids.len(),
                        self.cfg.limits.max_write_rows
                    ))
                    .into());
                }
                Write::DeleteIds(r.ids)
            }
            (true, false) => Write::DeleteFilter(compile_filter(&c.schema(), &r.filter)?.expect("non-empty")),
            (true, true) => return Err(ClusterError::invalid("delete needs ids or a filter").into()),
            (false, false) => return Err(ClusterError::invalid("delete takes ids or a filter, not both").into()),
        };
        let (ts, n) = self.write(c, w, r.ack, deadline).await?;
        Ok(Response::new(self.mutation(ts, n)))
    }

    async fn handle_flush(&self, req: Request<pb::FlushRequest>) -> Reply<pb::FlushResponse> {
        check_epoch(&req, &self.node)?;
        // Index builds can take minutes: a flush waits as long as the client allows.
        let deadline = Instant::now()
            + req
                .metadata()
                .get(wire::GRPC_TIMEOUT)
                .and_then(|v| v.to_str().ok())
                .and_then(wire::parse_grpc_timeout)
                .unwrap_or(Duration::from_secs(3600));
        let c = self.node.collection(&req.into_inner().collection)?;
        let (n, ts) = self.node.flush(&c, deadline).await?;
        Ok(Response::new(pb::FlushResponse { sealed_segments: n, session_token: self.node.token(ts).encode() }))
    }

    async fn handle_search(&self, req: Request<pb::SearchRequest>) -> Reply<pb::SearchResponse> {
        let deadline = deadline(&req, self.max_wait());
        let mut r = req.into_inner();
        let c = self.node.collection(&r.collection)?;
        let schema = c.schema();
        let max_k = self.cfg.limits.max_top_k;
        if r.top_k == 0 || r.top_k > max_k {
            return Err(ClusterError::invalid(format!("top_k {} is out of range 1..={max_k}", r.top_k)).into());
        }
        let nq = check_vectors("search", &schema, None, &mut r.vectors)?;
        if nq > self.cfg.limits.max_nq {
            return Err(ClusterError::invalid(format!("search: {nq} query vectors exceed the limit of {}", self.cfg.limits.max_nq)).into());
        }
        let filter = compile_filter(&schema, &r.filter)?;
        let outputs = schema.output_fields(&r.output_fields)?;
        let params = r.params.unwrap_or_default();
        let knobs = Knobs {
            nprobe: if params.nprobe == 0 { self.cfg.search.default_nprobe } else { params.nprobe.min(65_536) } as usize,
            ef_search: if params.ef_search == 0 { self.cfg.search.default_ef_search } else { params.ef_search.min(32_768) } as usize,
        };
        let (snap, mut token) = self.snapshot(&c, r.read.as_ref(), deadline).await?;
        let search = Search {
            collection: c.clone(),
            queries: r.vectors,
            dim: schema.dim,
            metric: schema.metric,
            k: r.top_k as usize,
            knobs,
            filter,
            filter_text: r.filter,
            snapshot: snap,
            payloads: !outputs.is_empty(),
        };
        let Answer { topk, payloads, snapshot } = self.node.search(search).await?;
        if snapshot > snap {
            // Merged with a search at a newer snapshot (batch.rs): the token covers what was read.
            token = token.max(self.node.token(c.newest_change_visible_at(snapshot)));
        }
        let results = topk
            .into_iter()
            .map(|hits| pb::Hits {
                hits: hits
                    .into_iter()
                    .map(|(distance, id)| pb::Hit {
                        id,
                        distance,
                        payload: payloads.get(&id).and_then(|row| schema.payload_of(row, &outputs)),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::SearchResponse { results, session_token: token.encode() }))
    }

    async fn handle_get(&self, req: Request<pb::GetRequest>) -> Reply<pb::GetResponse> {
        let deadline = deadline(&req, self.max_wait());
        let r = req.into_inner();
        let c = self.node.collection(&r.collection)?;
        let schema = c.schema();
        if r.ids.is_empty() {
            return Err(ClusterError::invalid("get needs at least one id").into());
        }
        if r.ids.len() > self.cfg.limits.max_get_ids {
            return Err(
                ClusterError::invalid(format!("get: {} ids exceed the limit of {}", r.ids.len(), self.cfg.limits.max_get_ids)).into()
            );
        }
        let outputs = schema.output_fields(&r.output_fields)?;
        let (snap, token) = self.snapshot(&c, r.read.as_ref(), deadline).await?;
        let c2 = c.clone();
        let found = self.node.on_search_pool(move || Ok(c2.get(&r.ids, snap))).await?;
        Ok(Response::new(pb::GetResponse {
            entities: Self::entities(&schema, found, &outputs, r.include_vectors),
            session_token: token.encode(),
        }))
    }

    async fn handle_query(&self, req: Request<pb::QueryRequest>) -> Reply<pb::QueryResponse> {
        let deadline = deadline(&req, self.max_wait());
        let r = req.into_inner();
        let c = self.node.collection(&r.collection)?;
        let schema = c.schema();
        let max = self.cfg.limits.max_query_limit;
        if r.limit > max {
            return Err(ClusterError::invalid(format!("query limit {} exceeds the maximum {max}", r.limit)).into());
        }
        let limit = if r.limit == 0 { 1000.min(max) } else { r.limit } as usize;
        let filter = compile_filter(&schema, &r.filter)?;
        let outputs = schema.output_fields(&r.output_fields)?;
        let (snap, token) = self.snapshot(&c, r.read.as_ref(), deadline).await?;
        let c2 = c.clone();
        let found = self
            .node
            .on_search_pool(move || {
                let mut ids = Vec::new();
                for shard in c2.shards() {
                    shard.scan(snap, filter.as_ref(), |rows, off| ids.push(rows.ids[off]));
                }
                ids.sort_unstable();
                ids.truncate(limit);
                Ok(c2.get(&ids, snap))
            })
            .await?;
        Ok(Response::new(pb::QueryResponse {
            entities: Self::entities(&schema, found, &outputs, r.include_vectors),
            session_token: token.encode(),
        }))
    }

    async fn handle_count(&self, req: Request<pb::CountRequest>) -> Reply<pb::CountResponse> {
        let deadline = deadline(&req, self.max_wait());
        let r = req.into_inner();
        let c = self.node.collection(&r.collection)?;
        let filter = compile_filter(&c.schema(), &r.filter)?;
        let (snap, token) = self.snapshot(&c, r.read.as_ref(), deadline).await?;
        let c2 = c.clone();
        let count = self
            .node
            .on_search_pool(move || {
                let mut n = 0u64;
                for shard in c2.shards() {
                    shard.scan(snap, filter.as_ref(), |_, _| n += 1);
                }
                Ok(n)
            })
            .await?;
        Ok(Response::new(pb::CountResponse { count, session_token: token.encode() }))
    }

    async fn handle_get_cluster_info(&self, _req: Request<pb::GetClusterInfoRequest>) -> Reply<pb::GetClusterInfoResponse> {
        let node = self.node.clone();
        let collections = blocking(move || Ok(collection_statuses(&node))).await?;
        Ok(Response::new(pb::GetClusterInfoResponse {
            cluster_id: self.node.opts.cluster_id.clone(),
            role: self.node.role().to_proto() as i32,
            epoch: self.node.epoch(),
            current_ts: self.node.clock.peek(),
            collections,
            version: env!("CARGO_PKG_VERSION").to_string(),
            leader: self.node.leader().unwrap_or_default(),
            datacenter: self.cfg.datacenter.clone(),
            query_nodes: self.node.fanout().query_nodes(),
        }))
    }
}

#[tonic::async_trait]
impl pb::tandem_server::Tandem for ClusterService {
    async fn create_collection(&self, req: Request<pb::CreateCollectionRequest>) -> Reply<pb::CreateCollectionResponse> {
        self.observed("create_collection", NO_CONSISTENCY, self.handle_create_collection(req)).await
    }

    async fn drop_collection(&self, req: Request<pb::DropCollectionRequest>) -> Reply<pb::DropCollectionResponse> {
        self.observed("drop_collection", NO_CONSISTENCY, self.handle_drop_collection(req)).await
    }

    async fn list_collections(&self, req: Request<pb::ListCollectionsRequest>) -> Reply<pb::ListCollectionsResponse> {
        self.observed("list_collections", NO_CONSISTENCY, self.handle_list_collections(req)).await
    }

    async fn describe_collection(&self, req: Request<pb::DescribeCollectionRequest>) -> Reply<pb::DescribeCollectionResponse> {
        self.observed("describe_collection", NO_CONSISTENCY, self.handle_describe_collection(req)).await
    }

    async fn create_index(&self, req: Request<pb::CreateIndexRequest>) -> Reply<pb::CreateIndexResponse> {
        self.observed("create_index", NO_CONSISTENCY, self.handle_create_index(req)).await
    }

    async fn drop_index(&self, req: Request<pb::DropIndexRequest>) -> Reply<pb::DropIndexResponse> {
        self.observed("drop_index", NO_CONSISTENCY, self.handle_drop_index(req)).await
    }

    async fn insert(&self, req: Request<pb::InsertRequest>) -> Reply<pb::MutationResponse> {
        self.observed("insert", NO_CONSISTENCY, self.handle_insert(req)).await
    }

    async fn upsert(&self, req: Request<pb::UpsertRequest>) -> Reply<pb::MutationResponse> {
        self.observed("upsert", NO_CONSISTENCY, self.handle_upsert(req)).await
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Reply<pb::MutationResponse> {
        self.observed("delete", NO_CONSISTENCY, self.handle_delete(req)).await
    }

    async fn flush(&self, req: Request<pb::FlushRequest>) -> Reply<pb::FlushResponse> {
        self.observed("flush", NO_CONSISTENCY, self.handle_flush(req)).await
    }

    async fn search(&self, req: Request<pb::SearchRequest>) -> Reply<pb::SearchResponse> {
        self.observed("search", consistency_label(req.get_ref().read.as_ref()), self.handle_search(req)).await
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Reply<pb::GetResponse> {
        self.observed("get", consistency_label(req.get_ref().read.as_ref()), self.handle_get(req)).await
    }

    async fn query(&self, req: Request<pb::QueryRequest>) -> Reply<pb::QueryResponse> {
        self.observed("query", consistency_label(req.get_ref().read.as_ref()), self.handle_query(req)).await
    }

    async fn count(&self, req: Request<pb::CountRequest>) -> Reply<pb::CountResponse> {
        self.observed("count", consistency_label(req.get_ref().read.as_ref()), self.handle_count(req)).await
    }

    async fn get_cluster_info(&self, req: Request<pb::GetClusterInfoRequest>) -> Reply<pb::GetClusterInfoResponse> {
        self.observed("get_cluster_info", NO_CONSISTENCY, self.handle_get_cluster_info(req)).await
    }

    async fn load_collection(&self, req: Request<pb::LoadCollectionRequest>) -> Reply<pb::LoadCollectionResponse> {
        self.observed("load_collection", NO_CONSISTENCY, self.handle_load_collection(req)).await
    }
}

/// What GetClusterInfo reports per collection, also the source of the collection gauges.
/// Reads directory sizes: call it off the async runtime.
pub fn collection_statuses(node: &Node) -> Vec<pb::CollectionStatus> {
    let mut collections = Vec::new();
    for name in node.collection_names() {
        let Ok(c) = node.collection(&name) else { continue };
        let serviceable_ts = c.serviceable_ts(&node.clock);
        let lag_ms = if node.role() == Role::Leading { 0 } else { wall_ms().saturating_sub(crate::ts::physical_ms(serviceable_ts)) };
        let mut status = pb::CollectionStatus {
            name,
            serviceable_ts,
            lag_ms,
            replication: node.replication_state(c.id).map(|s| s.to_string()).unwrap_or_default(),
            replica_groups: node.fanout().replica_groups(c.id),
            ..Default::default()
        };
        for shard in c.shards() {
            let s = shard.stats();
            status.rows += s.live_rows;
            status.growing_segments += u64::from(s.growing.1 > 0);
            status.sealed_segments += s.sealed.len() as u64;
            status.memory_bytes += s.memory_bytes;
            status.disk_bytes += shard.wal_disk_bytes() + dir_bytes(shard.dir());
        }
        collections.push(status);
    }
    collections
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| it.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

// ---- metrics ------------------------------------------------------------------------------
// Names, labels and meaning are listed in docs/observability.md; keep both in step.

/// The `consistency` label of requests that are not reads.
const NO_CONSISTENCY: &str = "none";

/// The `consistency` label of a read: the level it is served at (UNSPECIFIED and no read
/// options are served as SESSION, see `snapshot`).
fn consistency_label(read: Option<&pb::ReadOptions>) -> &'static str {
    use pb::ConsistencyLevel as L;
    match read.map_or(Ok(L::Unspecified), |r| L::try_from(r.consistency)) {
        Ok(L::Strong) => "strong",
        Ok(L::Bounded) => "bounded",
        Ok(L::Session | L::Unspecified) => "session",
        Ok(L::Eventually) => "eventually",
        Err(_) => "invalid",
    }
}

fn role_label(role: Role) -> &'static str {
    match role {
        Role::Leading => "leading",
        Role::Alternative => "alternative",
        Role::Standby => "standby",
        Role::Recovering => "recovering",
    }
}

/// Every role, for the one-series-per-role `tandem_cluster_role` gauge.
const ROLES: [Role; 4] = [Role::Leading, Role::Alternative, Role::Standby, Role::Recovering];

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("tandem_requests_total", "requests a cluster served, by op, read consistency and outcome (grpc code)");
    describe_gauge!("tandem_requests_in_flight", "requests a cluster is working on, by op");
    describe_histogram!("tandem_request_duration_seconds", Unit::Seconds, "time a cluster spent on a request, by op");
    describe_gauge!("tandem_collection_rows", "live rows of a collection on this cluster");
    describe_gauge!(
        "tandem_collection_serviceable_lag_ms",
        Unit::Milliseconds,
        "wall-clock time minus the collection's serviceable ts (0 on the leader)"
    );
    describe_gauge!("tandem_collection_memory_bytes", Unit::Bytes, "memory held by a collection's segments");
    describe_gauge!("tandem_collection_disk_bytes", Unit::Bytes, "disk used by a collection (WAL, segments, indexes)");
    describe_counter!(
        "tandem_segment_index_releases_total",
        "indexes of sealed segments this process dropped from memory because every replica group's query nodes hold the segment"
    );
    describe_counter!(
        "tandem_segment_index_reloads_total",
        "released indexes this process read back from their files (a group lost its copy, or a search had to run here)"
    );
    describe_gauge!("tandem_cluster_role", "1 for the cluster's current role, 0 for the others");
    describe_gauge!("tandem_cluster_epoch", "the cluster's leadership epoch");
    describe_counter!(
        "tandem_search_batches_total",
        "batches of searches the search pool ran (batch.rs: searches that waited for a busy pool go together)"
    );
    describe_counter!(
        "tandem_search_batch_members_total",
        "searches those batches held: divided by tandem_search_batches_total, the mean batch"
    );
}

impl ClusterService {
    /// Runs one RPC handler and records it: `tandem_requests_total` and
    /// `tandem_request_duration_seconds`, and the outcome on the request's span. Every RPC goes
    /// through here (the `Tandem` impl), so no handler repeats it.
    async fn observed<T>(
        &self,
        op: &'static str,
        consistency: &'static str,
        handler: impl std::future::Future<Output = Reply<T>>,
    ) -> Reply<T> {
        metrics::gauge!("tandem_requests_in_flight", "cluster" => self.cluster.clone(), "op" => op).increment(1);
        let mut rec = RequestRecord { cluster: &self.cluster, op, consistency, start: Instant::now(), outcome: tonic::Code::Cancelled };
        let reply = handler.await;
        rec.outcome = match &reply {
            Ok(_) => tonic::Code::Ok,
            Err(s) => {
                if matches!(s.code(), tonic::Code::Internal | tonic::Code::DataLoss | tonic::Code::Unknown) {
                    tracing::warn!(cluster = %self.cluster, op, code = ?s.code(), message = s.message(), "request failed");
                } else {
                    tracing::debug!(cluster = %self.cluster, op, code = ?s.code(), message = s.message(), "request refused");
                }
                s.code()
            }
        };
        reply
    }
}

/// Records a request when dropped: a handler dropped before it finished (client gone, its
/// deadline passed) is counted as CANCELLED rather than not at all.
struct RequestRecord<'a> {
    cluster: &'a Arc<str>,
    op: &'static str,
    consistency: &'static str,
    start: Instant,
    outcome: tonic::Code,
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        tandem_telemetry::tracing::record_status(self.outcome);
        let outcome = tandem_telemetry::metrics::code_name(self.outcome);
        metrics::counter!("tandem_requests_total", "cluster" => self.cluster.clone(), "op" => self.op, "consistency" => self.consistency, "outcome" => outcome)
            .increment(1);
        metrics::histogram!("tandem_request_duration_seconds", "cluster" => self.cluster.clone(), "op" => self.op)
            .record(self.start.elapsed().as_secs_f64());
        metrics::gauge!("tandem_requests_in_flight", "cluster" => self.cluster.clone(), "op" => self.op).decrement(1);
    }
}

/// Sets the node's gauges from what GetClusterInfo reports. Reads directory sizes: call it off
/// the async runtime (server.rs runs it every second on a blocking thread).
///
/// A dropped collection's series keep their last value (the `metrics` facade cannot remove a
/// series); they disappear when the process restarts.
pub fn record_gauges(node: &Node) {
    let cluster: Arc<str> = node.opts.cluster_id.as_str().into();
    for st in collection_statuses(node) {
        let labels = [("cluster", cluster.to_string()), ("collection", st.name)];
        metrics::gauge!("tandem_collection_rows", &labels).set(st.rows as f64);
        metrics::gauge!("tandem_collection_serviceable_lag_ms", &labels).set(st.lag_ms as f64);
        metrics::gauge!("tandem_collection_memory_bytes", &labels).set(st.memory_bytes as f64);
        metrics::gauge!("tandem_collection_disk_bytes", &labels).set(st.disk_bytes as f64);
    }
    let role = node.role();
    for r in ROLES {
        metrics::gauge!("tandem_cluster_role", "cluster" => cluster.clone(), "role" => role_label(r)).set(f64::from(u8::from(r == role)));
    }
    metrics::gauge!("tandem_cluster_epoch", "cluster" => cluster.clone()).set(node.epoch() as f64);
    let (batches, members) = node.batcher.stats();
    metrics::counter!("tandem_search_batches_total", "cluster" => cluster.clone()).absolute(batches);
    metrics::counter!("tandem_search_batch_members_total", "cluster" => cluster).absolute(members);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_labelled_with_the_level_they_are_served_at() {
        let at = |c: i32| consistency_label(Some(&pb::ReadOptions { consistency: c, ..Default::default() }));
        assert_eq!(at(pb::ConsistencyLevel::Strong as i32), "strong");
        assert_eq!(at(pb::ConsistencyLevel::Bounded as i32), "bounded");
        assert_eq!(at(pb::ConsistencyLevel::Eventually as i32), "eventually");
        assert_eq!(at(pb::ConsistencyLevel::Unspecified as i32), "session");
        assert_eq!(consistency_label(None), "session");
        assert_eq!(at(99), "invalid");
    }
}
