//! A query node (`tandem query-node`): in-memory replicas of a cluster's sealed segments (seeds:
//! in-memory replica, MEP 23).
//!
//! The cluster's proxy (`placement.rs`) assigns sealed segments to query nodes. A node loads
//! each from the writer as a snapshot of exactly those segments: their rows and their built
//! index file (CRC-checked, loaded without a rebuild), with their deletes up to the snapshot.
//! Then it follows the shard's log in that cluster from the snapshot's position (by the log's own
//! positions, `local`: a leader and an alternative alike, unchanged when an alternative is
//! promoted; see `feed::Positions::Local`) and applies to its segments every later change that ends
//! one of their rows: a delete, or an insert or upsert of the same id, which replaces the older
//! version. A sealed segment changes in nothing else, so
//! once the stream is applied up to ts T a node's copy answers at T exactly as the writer's
//! would; a search waits for that (its `snapshot`), as a read on an alternative waits for its
//! stream.
//!
//! A segment can arrive with a snapshot older than where the shard's stream already is (the
//! stream ran on while the segment travelled). The stream is then read again from the
//! snapshot's position: applying a change twice changes nothing (a row keeps its first delete
//! ts), and until the stream is back the shard's applied ts is the snapshot's, so no search
//! sees the new segment without its deletes.
//!
//! **Shard leaders** (seeds: the streaming replica). The proxy makes one node per replica group
//! lead each shard (`LoadRequest.lead_from`). The leader keeps the shard's growing rows: every row
//! the stream inserts from the position where the writer's growing segment begins, with the
//! stream's later deletes and upserts ending them as on the writer. A search then sends the
//! growing rows to the leader (`SegmentSearchRequest.growing_from`) instead of searching them in
//! the writer. Positions count rows, not records, because a seal can split one record's rows
//! between the sealed segment and the next growing one. Rows before a newer start are dropped when
//! the proxy next says where the growing rows begin; a node that is no longer asked to lead lets
//! them go after `LEAD_EXPIRES`.
//!
//! Nothing is kept on disk: a restarted node holds nothing, and the proxy loads it again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;
use tandem_proto::cluster::v1 as qn;
use tandem_proto::replication::v1 as rp;
use tandem_proto::replication::v1::replication_client::ReplicationClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::ann::Knobs;
use crate::error::{ClusterError, Result};
use crate::filter::Filter;
use crate::replication::SegmentReceiver;
use crate::schema::{Metric, Schema};
use crate::segment::{Growing, LIVE, Sealed, SearchPlan, SegmentId, TopK, brute_force, merge_topk, passes};
use crate::shard::{ShardOp, op_from_record, received_segment};
use crate::ts::Ts;
use crate::wal::Lsn;

/// Pause before a shard's stream is subscribed again after it failed.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(200);

/// How long a search waits for the shard's stream before it asks the writer for a tick.
const ASK_FOR_TICK_AFTER: Duration = Duration::from_millis(20);

/// The most hits a sub-search may ask for per query (as the public API's limit).
const MAX_K: u32 = 16_384;

/// How long a shard leader keeps its growing rows without being asked to lead again. The proxy
/// asks every placement round (`PLACE_EVERY`, 300 ms), so a node it stopped asking (another
/// node leads the shard now) lets them go.
const LEAD_EXPIRES: Duration = Duration::from_secs(10);

/// A row's place in the shard's log: its record's position, and its index in the record.
pub type RowPos = (Lsn, u32);

#[derive(Debug, Clone)]
pub struct QueryNodeOptions {
    /// Names the node in the writer's retention leases and in errors.
    pub name: String,
    /// Where index files are put while they arrive (removed once loaded).
    pub scratch_dir: PathBuf,
    pub search_threads: usize,
    /// The replica group the node enters itself (`--join`); `None`: a cluster's
    /// `query_nodes.groups` lists it.
    pub join: Option<JoinOptions>,
}

/// A replica group a query node enters itself (`Coordinator.Join`), beside the nodes a cluster's
/// `query_nodes.groups` lists.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The cluster's endpoint (its proxy), e.g. http://10.0.0.2:19530.
    pub cluster: String,
    /// The replica group: an index in the cluster's `query_nodes.groups`.
    pub group: u32,
    /// How the cluster reaches this node; http:// + the bound address when empty.
    pub advertise: String,
}

/// How often a joined node tells the cluster it is in its group: a proxy that restarted
/// without its state (or lost it) learns it again within this.
const JOIN_EVERY: Duration = Duration::from_secs(2);

/// The segments one node holds of one shard, and the shard's stream it follows for them.
struct HeldShard {
    collection_id: u64,
    shard: u32,
    schema: Schema,
    /// The writer's endpoint, and a client of its Replication service.
    endpoint: String,
    source: ReplicationClient<Channel>,
    state: Mutex<Held>,
    /// The ts up to which every change of the stream is applied (`Held::applied_ts`), for
    /// searches to wait on.
    applied: tokio::sync::watch::Sender<Ts>,
    /// Wakes the stream's task when a load asks it to read again from an earlier position.
    rewind: tokio::sync::Notify,
    /// One load at a time per shard: they share the scratch directory and the stream.
    loading: tokio::sync::Mutex<()>,
    /// Ends the stream's task when the shard is released.
    stop: CancellationToken,
}

#[derive(Default)]
struct Held {
    segments: BTreeMap<SegmentId, Arc<Sealed>>,
    /// Where each id has a row live in a held segment (usually one place; two while a newer
    /// segment's snapshot is ahead of the stream that will end the older row).
    live: HashMap<i64, Vec<(SegmentId, u32)>>,
    /// The stream position to read next; 0 until the first segment arrives.
    next: u64,
    /// A position to read the stream again from (a segment arrived with an older snapshot).
    rewind_to: Option<u64>,
    applied_ts: Ts,
    /// The shard's growing rows, while this node leads the shard in its group.
    tail: Option<Tail>,
}

/// A shard leader's growing rows (see the module's comment): every row the shard's stream
/// inserted at `from` or later, ended by the stream's later writes of the same ids, as the
/// writer's growing segment's rows are.
struct Tail {
    from: RowPos,
    /// The stream position to take rows from next: reading positions again (a rewind) adds
    /// nothing twice.
    next: Lsn,
    rows: Growing,
    /// Each row's place in the log, ascending.
    pos: Vec<RowPos>,
    /// Where each id has its live row.
    live: HashMap<i64, u32>,
    /// When the proxy last asked this node to lead the shard.
    renewed: Instant,
}

impl Tail {
    fn new(from: RowPos) -> Tail {
        Tail { from, next: from.0, rows: Growing::new(0), pos: Vec::new(), live: HashMap::new(), renewed: Instant::now() }
    }

    /// A write at `ts` ended the live row of `id` inserted before it.
    fn supersede(&mut self, id: i64, ts: Ts) {
        if let Some(&off) = self.live.get(&id)
            && self.rows.rows.insert_ts[off as usize] < ts
        {
            self.rows.delete_ts[off as usize] = ts;
            self.live.remove(&id);
        }
    }

    /// Adds the rows of the record at `lsn` (`ts`: the record's; a row may carry its own).
    fn add(&mut self, lsn: Lsn, ts: Ts, dim: usize, op: ShardOp) {
        let (ShardOp::Insert { ids, vectors, rows, row_ts } | ShardOp::Upsert { ids, vectors, rows, row_ts }) = op else {
            return;
        };
        for (i, (id, row)) in ids.into_iter().zip(rows).enumerate() {
            let ts = row_ts.get(i).copied().unwrap_or(ts);
            // An id twice in one record: the later row replaces the earlier, as on the writer.
            if let Some(&off) = self.live.get(&id)
                && self.rows.rows.insert_ts[off as usize] <= ts
            {
                self.rows.delete_ts[off as usize] = ts;
            }
            let off = self.rows.push(lsn, i as u32, id, ts, &vectors[i * dim..(i + 1) * dim], row);
            self.pos.push((lsn, i as u32));
            self.live.insert(id, off);
        }
        self.next = lsn + 1;
    }

    /// Drops the rows before `from` (the writer sealed them); an earlier `from` changes nothing.
    fn trim(&mut self, from: RowPos, dim: usize) {
        if from <= self.from {
            return;
        }
        self.from = from;
        let keep = self.pos.partition_point(|&p| p < from);
        if keep == 0 {
            return;
        }
        let old = std::mem::replace(&mut self.rows, Growing::new(0));
        let r = old.rows;
        // The kept rows' norms are kept too, not computed again.
        let rows = crate::segment::Rows {
            ids: r.ids[keep..].to_vec(),
            insert_ts: r.insert_ts[keep..].to_vec(),
            vectors: r.vectors[keep * dim..].to_vec(),
            norms: r.norms[keep..].to_vec(),
            payloads: r.payloads[keep..].to_vec(),
        };
        self.rows = Growing { id: 0, first_lsn: 0, first_row: 0, rows, delete_ts: old.delete_ts[keep..].to_vec() };
        self.pos.drain(..keep);
        self.live = (0..self.rows.rows.len())
            .filter(|&off| self.rows.delete_ts[off] == LIVE)
            .map(|off| (self.rows.rows.ids[off], off as u32))
            .collect();
    }

    /// The rows at `from` or later searched at the plan's snapshot; `None` when rows before
    /// `from` this node no longer holds are asked for.
    fn search(&self, plan: &SearchPlan<'_>, from: RowPos) -> Option<TopK> {
        if from < self.from {
            return None;
        }
        let start = self.pos.partition_point(|&p| p < from);
        let candidates: Vec<usize> = (start..self.rows.rows.len())
            .filter(|&off| self.rows.visible(off, plan.snapshot) && passes(plan.filter, &self.rows.rows, off))
            .collect();
        Some(brute_force(plan, &self.rows.rows, &candidates))
    }
}

impl Held {
    /// A change at `ts` wrote `id`: every held row of `id` inserted before it is ended at `ts`.
    fn supersede(&mut self, id: i64, ts: Ts) {
        let Some(places) = self.live.get_mut(&id) else { return };
        let segments = &self.segments;
        places.retain(|&(seg, off)| match segments.get(&seg) {
            Some(s) if s.rows.insert_ts[off as usize] < ts => {
                s.delete(off as usize, ts);
                false
            }
            Some(_) => true,
            None => false,
        });
        if places.is_empty() {
            self.live.remove(&id);
        }
    }

    /// Ends the older rows of `id` in the held segments and in the growing rows.
    fn supersede_everywhere(&mut self, id: i64, ts: Ts) {
        self.supersede(id, ts);
        if let Some(t) = self.tail.as_mut() {
            t.supersede(id, ts);
        }
    }

    fn add(&mut self, seg: Arc<Sealed>) {
        for off in 0..seg.len() {
            if seg.delete_ts(off) == LIVE {
                self.live.entry(seg.rows.ids[off]).or_default().push((seg.id, off as u32));
            }
        }
        self.segments.insert(seg.id, seg);
    }

    fn remove(&mut self, ids: &HashSet<SegmentId>) {
        self.segments.retain(|id, _| !ids.contains(id));
        self.live.retain(|_, places| {
            places.retain(|(seg, _)| !ids.contains(seg));
            !places.is_empty()
        });
    }
}

pub struct QueryNode {
    opts: QueryNodeOptions,
    shards: RwLock<HashMap<(u64, u32), Arc<HeldShard>>>,
    pool: rayon::ThreadPool,
    searches: AtomicU64,
    /// Segments loaded so far (fetched from a cluster).
    loaded: AtomicU64,
    /// Load requests answered or refused so far.
    load_requests: AtomicU64,
    root: CancellationToken,
}

impl QueryNode {
    pub fn new(opts: QueryNodeOptions, root: CancellationToken) -> Result<Arc<QueryNode>> {
        crate::fsio::create_dir(&opts.scratch_dir)?;
        let pool = crate::node::search_pool(opts.search_threads)?;
        Ok(Arc::new(QueryNode {
            opts,
            shards: RwLock::new(HashMap::new()),
            pool,
            searches: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            load_requests: AtomicU64::new(0),
            root,
        }))
    }

    /// Segment searches answered so far.
    pub fn searches(&self) -> u64 {
        self.searches.load(Ordering::Relaxed)
    }

    /// Segments loaded so far: a Load of a segment already held loads nothing.
    pub fn loaded(&self) -> u64 {
        self.loaded.load(Ordering::Relaxed)
    }

    /// Load requests of segments so far, those that loaded nothing (all held) included.
    pub fn load_requests(&self) -> u64 {
        self.load_requests.load(Ordering::Relaxed)
    }

    /// (collection id, shard) -> held segment ids.
    pub fn held(&self) -> BTreeMap<(u64, u32), Vec<SegmentId>> {
        self.shards.read().iter().map(|(k, h)| (*k, h.state.lock().segments.keys().copied().collect())).collect()
    }

    fn held_shard(&self, req: &qn::LoadRequest) -> Result<Arc<HeldShard>> {
        let key = (req.collection_id, req.shard);
        if let Some(h) = self.shards.read().get(&key)
            && h.endpoint == req.source
        {
            return Ok(h.clone());
        }
        let schema = Schema::from_proto(req.schema.as_ref().ok_or_else(|| ClusterError::invalid("a load names no schema"))?)?;
        if req.shard >= schema.shards {
            return Err(ClusterError::invalid(format!(
                "collection {:?} has {} shards, not a shard {}",
                schema.name, schema.shards, req.shard
            )));
        }
        let channel = Channel::from_shared(req.source.clone())
            .map_err(|e| ClusterError::invalid(format!("source {:?} is not an endpoint: {e}", req.source)))?
            .connect_lazy();
        let source = ReplicationClient::new(channel).max_decoding_message_size(usize::MAX >> 1);
        let held = Arc::new(HeldShard {
            collection_id: req.collection_id,
            shard: req.shard,
            schema,
            endpoint: req.source.clone(),
            source,
            state: Mutex::new(Held::default()),
            applied: tokio::sync::watch::Sender::new(0),
            rewind: tokio::sync::Notify::new(),
            loading: tokio::sync::Mutex::new(()),
            stop: self.root.child_token(),
        });
        // Another writer (the cluster restarted elsewhere, or another cluster): what this node
        // holds of the shard follows a stream that is gone, so it starts over. Only now, with
        // the request checked: a bad one changes nothing.
        self.release(req.collection_id, req.shard, &[]);
        Ok(self.shards.write().entry(key).or_insert(held).clone())
    }

    /// Loads the segments of `req` not held yet; returns those held afterwards.
    pub async fn load(self: &Arc<Self>, req: qn::LoadRequest) -> Result<Vec<SegmentId>> {
        // A Load that only says where the growing rows begin (every round, to each leader) is
        // not a load of segments.
        if !req.segments.is_empty() || req.lead_from.is_none() {
            self.load_requests.fetch_add(1, Ordering::Relaxed);
        }
        if req.source.trim().is_empty() {
            return Err(ClusterError::invalid("a load names no source (the writer's endpoint)"));
        }
        let held = self.held_shard(&req)?;
        let _one = held.loading.lock().await;
        let want: Vec<SegmentId> = {
            let h = held.state.lock();
            req.segments.iter().copied().filter(|id| !h.segments.contains_key(id)).collect()
        };
        if !want.is_empty() {
            self.fetch(&held, want).await?;
        }
        if let Some(p) = &req.lead_from {
            self.lead(&held, (p.lsn, p.row));
        }
        let h = held.state.lock();
        Ok(req.segments.iter().copied().filter(|id| h.segments.contains_key(id)).collect())
    }

    /// Fetches `want` from the writer as one snapshot and adds them.
    async fn fetch(self: &Arc<Self>, held: &Arc<HeldShard>, want: Vec<SegmentId>) -> Result<()> {
        let unavailable = |s: Status| ClusterError::Unavailable(format!("loading segments from {}: {}", self.opts.name, s.message()));
        let req = rp::SnapshotRequest {
            collection_id: held.collection_id,
            shard: held.shard,
            subscriber: self.opts.name.clone(),
            segments: true,
            only_segments: want,
            // The writer's own log positions: they go on unchanged when an alternative
            // cluster is promoted, where stream positions start a new term.
            local: true,
        };
        let mut stream = held.source.clone().snapshot(req).await.map_err(unavailable)?.into_inner();
        let dir = self.opts.scratch_dir.join(format!("c{}-s{}", held.collection_id, held.shard));
        crate::fsio::create_dir(&dir)?;
        let mut receiver: Option<SegmentReceiver> = None;
        let mut got = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(unavailable)? {
            if let Some(part) = chunk.segment {
                let (dir, schema, r) = (dir.clone(), held.schema.clone(), receiver.take());
                let step = tokio::task::spawn_blocking(move || -> Result<(Option<SegmentReceiver>, Option<Arc<Sealed>>)> {
                    let mut r = match r {
                        Some(r) => r,
                        None => SegmentReceiver::new(&dir, &part)?,
                    };
                    let id = r.id();
                    let Some(seg) = r.take(part)? else { return Ok((Some(r), None)) };
                    let sealed = received_segment(&schema, id, seg.rows, seg.delete_ts, &seg.index_file);
                    let _ = std::fs::remove_file(&seg.index_file);
                    Ok((None, Some(sealed?)))
                })
                .await
                .map_err(|e| ClusterError::Internal(e.to_string()))??;
                receiver = step.0;
                got.extend(step.1);
                continue;
            }
            if chunk.done {
                if receiver.is_some() {
                    return Err(ClusterError::Unavailable("the writer ended a load with a segment incomplete".into()));
                }
                self.loaded.fetch_add(got.len() as u64, Ordering::Relaxed);
                self.install(held, got, chunk.snapshot_ts, chunk.lsn);
                return Ok(());
            }
        }
        Err(ClusterError::Unavailable("the writer ended a load before it was done".into()))
    }

    /// Adds segments a snapshot at (`ts`, stream position `pos`) brought, and makes the stream
    /// cover them from `pos + 1` (see the module's comment).
    fn install(self: &Arc<Self>, held: &Arc<HeldShard>, segments: Vec<Arc<Sealed>>, ts: Ts, pos: u64) {
        let mut h = held.state.lock();
        let first = h.next == 0;
        for seg in segments {
            if !h.segments.contains_key(&seg.id) {
                h.add(seg);
            }
        }
        if first {
            h.next = pos + 1;
            h.applied_ts = ts;
            held.applied.send_replace(ts);
            drop(h);
            tokio::spawn(follow(held.clone(), self.opts.name.clone()));
        } else if pos + 1 < h.next {
            h.rewind_to = Some(h.rewind_to.map_or(pos + 1, |r| r.min(pos + 1)));
            h.applied_ts = h.applied_ts.min(ts);
            held.applied.send_replace(h.applied_ts);
            held.rewind.notify_one();
        }
    }

    /// Leads `held`'s shard: keeps its growing rows from `from` (see the module's comment).
    fn lead(self: &Arc<Self>, held: &Arc<HeldShard>, from: RowPos) {
        let mut h = held.state.lock();
        if let Some(t) = h.tail.as_mut() {
            t.renewed = Instant::now();
            t.trim(from, held.schema.dim);
            return;
        }
        h.tail = Some(Tail::new(from));
        tracing::info!(collection = held.collection_id, shard = held.shard, from = ?from, "query node: leading the shard");
        // The stream must be read from `from`. Until it is back where it was, no change is known
        // to be in the growing rows, so the shard's applied ts starts over.
        if h.next == 0 {
            h.next = from.0.max(1);
            h.applied_ts = 0;
            held.applied.send_replace(0);
            drop(h);
            tokio::spawn(follow(held.clone(), self.opts.name.clone()));
        } else if from.0 < h.next {
            h.rewind_to = Some(h.rewind_to.map_or(from.0, |r| r.min(from.0)));
            h.applied_ts = 0;
            held.applied.send_replace(0);
            held.rewind.notify_one();
        }
    }

    pub fn release(&self, collection_id: u64, shard: u32, segments: &[SegmentId]) {
        let key = (collection_id, shard);
        if segments.is_empty() {
            if let Some(h) = self.shards.write().remove(&key) {
                h.stop.cancel();
            }
            return;
        }
        if let Some(h) = self.shards.read().get(&key) {
            h.state.lock().remove(&segments.iter().copied().collect());
        }
    }

    pub async fn search(&self, req: qn::SegmentSearchRequest) -> Result<qn::SegmentSearchResponse> {
        let (dim, k) = (req.dim as usize, req.k as usize);
        if dim == 0 || req.queries.is_empty() || !req.queries.len().is_multiple_of(dim) {
            return Err(ClusterError::invalid(format!("{} query values do not make vectors of dim {}", req.queries.len(), req.dim)));
        }
        if req.k == 0 || req.k > MAX_K {
            return Err(ClusterError::invalid(format!("k {} is out of range 1..={MAX_K}", req.k)));
        }
        let metric = Metric::from_proto(req.metric)?;
        let growing_from: Option<RowPos> = req.growing_from.as_ref().map(|p| (p.lsn, p.row));
        let held = self.shards.read().get(&(req.collection_id, req.shard)).cloned();
        let Some(held) = held else {
            return Ok(all_missing(req, dim));
        };
        if dim != held.schema.dim {
            return Err(ClusterError::invalid(format!(
                "queries of dim {dim} for collection {:?} of dim {}",
                held.schema.name, held.schema.dim
            )));
        }
        // Holding none of them (released, or dropped with a position the cluster's log no longer
        // has): `missing` at once, so the proxy places them again instead of waiting for a
        // stream that may never come.
        let holds_any = {
            let h = held.state.lock();
            req.segments.iter().any(|id| h.segments.contains_key(id))
                || growing_from.is_some_and(|f| h.tail.as_ref().is_some_and(|t| t.from <= f))
        };
        if !holds_any {
            return Ok(all_missing(req, dim));
        }
        wait_applied(&held, req.snapshot, Duration::from_millis(req.wait_ms.into()), &self.opts.name).await?;
        let filter = if req.filter.is_empty() { None } else { Some(Filter::compile_in(&req.filter, held.schema.filter_scope())?) };
        let (segments, missing) = {
            let h = held.state.lock();
            let mut missing = Vec::new();
            let segments: Vec<Arc<Sealed>> = req
                .segments
                .iter()
                .filter_map(|id| {
                    let s = h.segments.get(id).cloned();
                    if s.is_none() {
                        missing.push(*id);
                    }
                    s
                })
                .collect();
            (segments, missing)
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (queries, snapshot, knobs) =
            (req.queries, req.snapshot, Knobs { nprobe: req.nprobe as usize, ef_search: req.ef_search as usize });
        // faiss runs on the node's search pool, off the async runtime.
        self.pool.spawn(move || {
            let plan = SearchPlan { queries: &queries, dim, k, metric, filter: filter.as_ref(), knobs, snapshot };
            let parts = segments.par_iter().map(|s| s.search(&plan)).collect::<Result<Vec<TopK>>>();
            // The growing rows under the shard's lock: the stream appends to them meanwhile.
            let growing = growing_from.and_then(|f| held.state.lock().tail.as_ref().and_then(|t| t.search(&plan, f)));
            let searched = growing.is_some();
            let _ = tx.send(parts.map(|mut p| {
                p.extend(growing);
                (merge_topk(metric, k, plan.nq(), p), searched)
            }));
        });
        let (topk, growing_searched) = rx.await.map_err(|_| ClusterError::Internal("a segment search was dropped".into()))??;
        self.searches.fetch_add(1, Ordering::Relaxed);
        let mut resp = qn::SegmentSearchResponse { missing, growing_searched, ..Default::default() };
        for hits in topk {
            resp.counts.push(hits.len() as u32);
            for (d, id) in hits {
                resp.distances.push(d);
                resp.ids.push(id);
            }
        }
        Ok(resp)
    }

    pub fn status(&self) -> qn::StatusResponse {
        let shards = self
            .shards
            .read()
            .values()
            .map(|h| {
                let st = h.state.lock();
                qn::HeldShard {
                    collection_id: h.collection_id,
                    shard: h.shard,
                    segments: st.segments.keys().copied().collect(),
                    applied_ts: st.applied_ts,
                    growing_from: st.tail.as_ref().map(|t| qn::RowPosition { lsn: t.from.0, row: t.from.1 }),
                    growing_rows: st.tail.as_ref().map_or(0, |t| t.rows.rows.len() as u64),
                }
            })
            .collect();
        qn::StatusResponse { shards, searches: self.searches() }
    }
}

/// The answer to `req` from a node that holds none of its segments: every one `missing`, and an
/// empty list per query (the proxy parses one list per query).
fn all_missing(req: qn::SegmentSearchRequest, dim: usize) -> qn::SegmentSearchResponse {
    qn::SegmentSearchResponse { counts: vec![0; req.queries.len() / dim], missing: req.segments, ..Default::default() }
}

/// Waits until `held`'s stream is applied up to `snapshot`, at most `wait`.
async fn wait_applied(held: &HeldShard, snapshot: Ts, wait: Duration, name: &str) -> Result<()> {
    let mut rx = held.applied.subscribe();
    if *rx.borrow_and_update() >= snapshot {
        return Ok(());
    }
    // The proxy made the writer's streams tick as it sent the search (`Placement`): the tick
    // usually arrives within a millisecond.
    let first = wait.min(ASK_FOR_TICK_AFTER);
    if tokio::time::timeout(first, rx.wait_for(|&t| t >= snapshot)).await.is_ok_and(|r| r.is_ok()) {
        return Ok(());
    }
    // Else asking the writer for its clock makes its idle streams send a time tick now instead
    // of at their next interval (see `Replication.LeaderTs`), as a STRONG read on an
    // alternative does.
    let mut source = held.source.clone();
    tokio::spawn(async move {
        let _ = source.leader_ts(rp::LeaderTsRequest {}).await;
    });
    match tokio::time::timeout(wait.saturating_sub(first), rx.wait_for(|&t| t >= snapshot)).await {
        Ok(Ok(_)) => Ok(()),
        _ => {
            let applied = *held.applied.borrow();
            Err(ClusterError::Lagging {
                message: format!(
                    "query node {name}: shard {} of collection {:?} has its changes applied up to ts {applied}, not yet the read's {snapshot}",
                    held.shard, held.schema.name
                ),
                lag_ms: crate::ts::physical_ms(snapshot).saturating_sub(crate::ts::physical_ms(applied)),
            })
        }
    }
}

/// Follows `held`'s shard stream until the shard is released, reading it again from an earlier
/// position when a load asks (see the module's comment).
async fn follow(held: Arc<HeldShard>, subscriber: String) {
    loop {
        let from = {
            let mut h = held.state.lock();
            if let Some(r) = h.rewind_to.take() {
                h.next = r;
            }
            h.next
        };
        let req = rp::SubscribeRequest {
            collection_id: held.collection_id,
            shard: held.shard,
            ddl: false,
            from_lsn: from,
            subscriber: subscriber.clone(),
            local: true,
        };
        let mut source = held.source.clone();
        let subscribed = tokio::select! {
            _ = held.stop.cancelled() => return,
            r = source.subscribe(req) => r,
        };
        match subscribed {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    tokio::select! {
                        _ = held.stop.cancelled() => return,
                        _ = held.rewind.notified() => break,
                        m = stream.message() => match m {
                            Ok(Some(ev)) => if !apply(&held, ev) { break },
                            Ok(None) => break,
                            Err(s) => {
                                tracing::warn!(collection = held.collection_id, shard = held.shard, error = %s.message(), "query node: the shard's stream failed; subscribing again");
                                break;
                            }
                        },
                    }
                }
            }
            // The collection was dropped (NotFound): nothing of the shard is wanted any more.
            // Or the writer's log no longer holds the position (OutOfRange: it bootstrapped
            // again, or the lease expired): the copies cannot be kept current. Either way they
            // go. Their searches answer `missing`, and the proxy places them again from a new
            // snapshot. Growing rows go too: the next round makes the node lead from where they
            // begin now. (The writer keeps the records of its growing rows, and a start past its
            // last record is not cut, so a leader's start leaves the log only in a race: the
            // rows it was told of sealed, persisted and their log file deleted before it
            // subscribed. Its copies are then loaded again, a cost, never a wrong answer.)
            Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::OutOfRange) => {
                let why =
                    if s.code() == tonic::Code::NotFound { "the shard is gone" } else { "the shard's log moved past this node's position" };
                tracing::warn!(collection = held.collection_id, shard = held.shard, error = %s.message(), "query node: {why}; dropping what it held of the shard");
                *held.state.lock() = Held::default();
                held.applied.send_replace(0);
                return;
            }
            Err(s) => {
                tracing::warn!(collection = held.collection_id, shard = held.shard, error = %s.message(), "query node: cannot subscribe to the shard's stream")
            }
        }
        if held.state.lock().rewind_to.is_some() {
            continue;
        }
        tokio::select! {
            _ = held.stop.cancelled() => return,
            _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
        }
    }
}

/// Applies one change event; false when a rewind is pending (the event is left for the read
/// from the earlier position).
fn apply(held: &HeldShard, ev: rp::ChangeEvent) -> bool {
    use rp::change_event::Body;
    use tandem_proto::storage::v1::wal_record::Op;
    let mut h = held.state.lock();
    if h.rewind_to.is_some() {
        return false;
    }
    if h.tail.as_ref().is_some_and(|t| t.renewed.elapsed() > LEAD_EXPIRES) {
        tracing::info!(
            collection = held.collection_id,
            shard = held.shard,
            "query node: no longer asked to lead the shard; its growing rows go"
        );
        h.tail = None;
    }
    let (lsn, ts) = (ev.lsn, ev.ts);
    match ev.body {
        Some(Body::Insert(b)) | Some(Body::Upsert(b)) => {
            for (i, &id) in b.ids.iter().enumerate() {
                h.supersede_everywhere(id, b.insert_ts.get(i).copied().unwrap_or(ts));
            }
            if h.tail.as_ref().is_some_and(|t| lsn >= t.next) {
                match op_from_record(&held.schema, Op::Insert(b)) {
                    Ok(Some(op)) => {
                        if let Some(t) = h.tail.as_mut() {
                            t.add(lsn, ts, held.schema.dim, op);
                        }
                    }
                    Ok(None) => {}
                    // Its rows cannot be kept, so the growing rows would be incomplete: they go,
                    // and the proxy searches them in the writer.
                    Err(e) => {
                        tracing::warn!(collection = held.collection_id, shard = held.shard, error = %e, "query node: a change does not decode; no longer leading the shard");
                        h.tail = None;
                    }
                }
            }
        }
        Some(Body::Delete(d)) => {
            for &id in &d.ids {
                h.supersede_everywhere(id, ts);
            }
        }
        _ => {}
    }
    h.next = h.next.max(lsn + 1);
    if ts > h.applied_ts {
        h.applied_ts = ts;
        held.applied.send_replace(ts);
    }
    true
}

/// The gRPC face of a [`QueryNode`].
#[derive(Clone)]
pub struct QueryNodeService(pub Arc<QueryNode>);

#[tonic::async_trait]
impl qn::query_node_server::QueryNode for QueryNodeService {
    async fn load(&self, req: Request<qn::LoadRequest>) -> std::result::Result<Response<qn::LoadResponse>, Status> {
        let held = self.0.load(req.into_inner()).await?;
        Ok(Response::new(qn::LoadResponse { held }))
    }

    async fn release(&self, req: Request<qn::ReleaseRequest>) -> std::result::Result<Response<qn::ReleaseResponse>, Status> {
        let r = req.into_inner();
        self.0.release(r.collection_id, r.shard, &r.segments);
        Ok(Response::new(qn::ReleaseResponse {}))
    }

    async fn search(&self, req: Request<qn::SegmentSearchRequest>) -> std::result::Result<Response<qn::SegmentSearchResponse>, Status> {
        Ok(Response::new(self.0.search(req.into_inner()).await?))
    }

    async fn status(&self, _req: Request<qn::StatusRequest>) -> std::result::Result<Response<qn::StatusResponse>, Status> {
        Ok(Response::new(self.0.status()))
    }
}

/// A query node being served.
pub struct RunningQueryNode {
    pub addr: SocketAddr,
    pub node: Arc<QueryNode>,
    pub task: tokio::task::JoinHandle<Result<()>>,
}

/// Serves a query node on `listen` (port 0 picks one) until `shutdown` fires.
pub async fn serve(listen: &str, opts: QueryNodeOptions, shutdown: CancellationToken) -> Result<RunningQueryNode> {
    let listener = TcpListener::bind(listen).await.map_err(|e| ClusterError::Unavailable(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| ClusterError::Internal(e.to_string()))?;
    let node = QueryNode::new(opts, shutdown.clone())?;
    let service = qn::query_node_server::QueryNodeServer::new(QueryNodeService(node.clone()))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let join = match &node.opts.join {
        Some(j) => Some(join_request(j, addr)?),
        None => None,
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    // Its own token: a join the cluster refuses stops this server alone.
    let stop = shutdown.child_token();
    let server_stop = stop.clone();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, server_stop.cancelled_owned())
            .await
            .map_err(|e| ClusterError::Internal(format!("query node server: {e}")))
    });
    tracing::info!(%addr, name = %node.opts.name, "query node serving");
    if let Some((mut cluster, req)) = join {
        // Served first: the cluster loads copies on the node as soon as it joined.
        match join_once(&mut cluster, &req).await {
            // A refusal names the bad value (a group the cluster lacks, an endpoint in another
            // group): starting anyway would serve nothing.
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                stop.cancel();
                return Err(ClusterError::invalid(format!("the cluster refused the join: {}", s.message())));
            }
            Err(s) => tracing::warn!(error = %s.message(), "cannot join the cluster yet; trying again every {JOIN_EVERY:?}"),
            Ok(r) => tracing::info!(group = req.group, added = r.into_inner().added, "joined the cluster's replica group"),
        }
        tokio::spawn(keep_joined(cluster, req, stop));
    }
    Ok(RunningQueryNode { addr, node, task })
}

/// The join `j` asks of its cluster, for a node bound at `addr`, and the client asking it.
fn join_request(j: &JoinOptions, addr: SocketAddr) -> Result<(qn::coordinator_client::CoordinatorClient<Channel>, qn::JoinRequest)> {
    let endpoint = if !j.advertise.is_empty() {
        j.advertise.clone()
    } else if addr.ip().is_unspecified() {
        return Err(ClusterError::invalid(format!(
            "joining needs an advertised endpoint: the node listens on {addr}, which the cluster cannot reach (--advertise)"
        )));
    } else {
        format!("http://{addr}")
    };
    let channel = Channel::from_shared(j.cluster.clone())
        .map_err(|e| ClusterError::invalid(format!("cluster endpoint {:?} to join: {e}", j.cluster)))?
        .connect_lazy();
    Ok((qn::coordinator_client::CoordinatorClient::new(channel), qn::JoinRequest { endpoint, group: j.group }))
}

/// One join, given [`JOIN_EVERY`] at most (a cluster whose address does not answer would hold
/// a connect for minutes).
async fn join_once(
    cluster: &mut qn::coordinator_client::CoordinatorClient<Channel>,
    req: &qn::JoinRequest,
) -> std::result::Result<Response<qn::JoinResponse>, Status> {
    let mut call = Request::new(req.clone());
    call.set_timeout(JOIN_EVERY);
    tokio::time::timeout(JOIN_EVERY, cluster.join(call))
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("the cluster did not answer the join")))
}

/// Tells the cluster every [`JOIN_EVERY`] that the node is in its group, until `stop` fires.
/// Failures are logged when they begin and end, not every time.
async fn keep_joined(mut cluster: qn::coordinator_client::CoordinatorClient<Channel>, req: qn::JoinRequest, stop: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(JOIN_EVERY) => {}
        }
        match join_once(&mut cluster, &req).await {
            Ok(r) => {
                if failing || r.get_ref().added {
                    tracing::info!(group = req.group, added = r.get_ref().added, "in the cluster's replica group again");
                }
                failing = false;
            }
            Err(s) => {
                if !failing {
                    tracing::warn!(error = %s.message(), "cannot tell the cluster this node is in its group");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::{Growing, Rows};

    /// A sealed segment `id` of rows `ids`, inserted at ts 10 + offset.
    fn segment(id: SegmentId, ids: &[i64]) -> Arc<Sealed> {
        let n = ids.len();
        let rows = Rows::new(ids.to_vec(), (0..n as u64).map(|o| 10 + o).collect(), vec![0.0; n * 2], vec![vec![]; n], 2);
        Arc::new(Sealed::from_growing(Growing { id, first_lsn: 0, first_row: 0, rows, delete_ts: vec![LIVE; n] }))
    }

    /// A change ends the held rows of its ids written before it, once (a replay keeps the
    /// first ts), and never a row written at or after it.
    #[test]
    fn a_change_ends_only_older_rows_of_its_ids_and_replays_change_nothing() {
        let mut h = Held::default();
        let (a, b) = (segment(1, &[7, 8, 9]), segment(2, &[7, 20]));
        h.add(a.clone());
        // Segment 2 holds a newer row of id 7 (inserted at 10, after segment 1's at 10: equal
        // ts here), as when a segment's snapshot is ahead of the stream.
        h.add(b.clone());
        assert_eq!(h.live[&7].len(), 2);
        // A delete of 8 at ts 100 ends it; replayed at 100 or seen again later, nothing moves.
        h.supersede(8, 100);
        h.supersede(8, 100);
        h.supersede(8, 200);
        assert_eq!(a.delete_ts(1), 100);
        assert_eq!(a.deleted(), 1);
        // A write of 9 at ts 11 (segment 1 inserted it at 12): the row is newer, so it stays.
        h.supersede(9, 11);
        assert_eq!(a.delete_ts(2), LIVE);
        // A write of 7 at ts 50 ends both older rows.
        h.supersede(7, 50);
        assert_eq!((a.delete_ts(0), b.delete_ts(0)), (50, 50));
        assert!(!h.live.contains_key(&7));
        // Releasing a segment forgets its rows.
        h.remove(&HashSet::from([2]));
        assert!(!h.live.contains_key(&20));
        assert_eq!(h.segments.keys().copied().collect::<Vec<_>>(), vec![1]);
    }

    /// A shard leader's growing rows: a record a seal split is searched from the row where the
    /// growing segment begins; a write ends only older rows of its id; a later start drops the
    /// rows before it (and a search from before it is refused), an earlier start changes nothing.
    #[test]
    fn growing_rows_begin_at_a_row_and_a_later_start_drops_those_before() {
        let dim = 2;
        let insert = |ids: &[i64]| ShardOp::Insert {
            ids: ids.to_vec(),
            vectors: ids.iter().flat_map(|&i| [i as f32, 0.0]).collect(),
            rows: vec![vec![]; ids.len()],
            row_ts: vec![],
        };
        let q = [2.0f32, 0.0];
        let plan = |snapshot| SearchPlan {
            queries: &q,
            dim,
            k: 10,
            metric: Metric::L2,
            filter: None,
            knobs: Knobs { nprobe: 1, ef_search: 16 },
            snapshot,
        };
        let found = |t: &Tail, from: RowPos, snapshot: Ts| {
            t.search(&plan(snapshot), from).map(|hits| {
                let mut ids: Vec<i64> = hits[0].iter().map(|h| h.1).collect();
                ids.sort_unstable();
                ids
            })
        };
        let mut t = Tail::new((5, 0));
        t.add(5, 100, dim, insert(&[1, 2, 3]));
        t.add(6, 110, dim, insert(&[4]));
        // The seal kept rows 0 and 1 of record 5 (ids 1 and 2): the growing rows begin at row 2.
        assert_eq!(found(&t, (5, 2), 200), Some(vec![3, 4]));
        assert_eq!(found(&t, (5, 0), 105), Some(vec![1, 2, 3]), "a snapshot before record 6");
        // A write of 3 at 120 ends its row; a write of 4 at its own ts (a record read again)
        // does not.
        t.supersede(3, 120);
        t.supersede(4, 110);
        assert_eq!(found(&t, (5, 0), 200), Some(vec![1, 2, 4]));
        assert_eq!(found(&t, (5, 0), 115), Some(vec![1, 2, 3, 4]), "before the write of 3");
        // The writer sealed up to (5, 2): the rows before go; a search from before is refused.
        t.trim((5, 2), dim);
        assert_eq!(t.rows.rows.len(), 2);
        assert_eq!(found(&t, (5, 0), 200), None);
        assert_eq!(found(&t, (5, 2), 115), Some(vec![3, 4]));
        t.trim((4, 0), dim);
        assert_eq!(t.from, (5, 2), "an earlier start changes nothing");
        // The live rows are still known after the trim: a delete of 4 ends it.
        t.supersede(4, 300);
        assert_eq!(found(&t, (5, 2), 400), Some(vec![]));
        assert_eq!(found(&t, (5, 2), 299), Some(vec![4]));
    }
}
