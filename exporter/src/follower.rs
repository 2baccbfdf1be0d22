//! The alternative side: subscribes to the leader's streams through a `Transport` and applies
//! every change to the local node, idempotently and in order per stream.
//!
//! ```text
//!  DDL task:    subscribe(Ddl) ─► create / drop / set index ─► start / stop shard tasks
//!  shard task:  position = shard.source_lsn() + 1
//!               subscribe(shard stream, position) ─► apply (logged with its position: apply
//!               and checkpoint are one atomic step) ─► tick: serviceable ts advances
//!               Truncated (the log no longer holds the position) ─► bootstrap from a snapshot
//!  poison:      an event that cannot be decoded or applied is quarantined (file + count +
//!               loud log), then the shard halts (default) or skips it — never a crash loop
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use tandem_cluster::collection::Collection;
use tandem_cluster::node::{LeaderClock, Node};
use tandem_cluster::replication::SegmentReceiver;
use tandem_cluster::shard::{ShardOp, op_from_record};
use tandem_cluster::{ClusterError, ReplicationState, feed};
use tandem_proto::replication::v1 as rp;
use tandem_proto::replication::v1::replication_client::ReplicationClient;
use tandem_proto::storage::v1 as st;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::error::{ExportError, Result};
use crate::transport::{StreamId, Transport};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPoison {
    Halt,
    Skip,
}

#[derive(Debug, Clone)]
pub struct FollowerConfig {
    /// Names this alternative to the leader (retention leases).
    pub subscriber: String,
    pub on_poison: OnPoison,
    pub quarantine_dir: PathBuf,
}

pub struct Follower {
    node: Arc<Node>,
    transport: Arc<dyn Transport>,
    leader: ReplicationClient<Channel>,
    cfg: FollowerConfig,
    cancel: CancellationToken,
    shards: Mutex<HashMap<u64, CancellationToken>>,
    /// Per stream, the highest leader epoch seen: a later event of an older epoch comes from a
    /// fenced leader (published late) and is dropped. Per stream, not global: after a
    /// failover a lagging stream still holds the old leader's valid events before the new
    /// leader's first one.
    epochs: Mutex<HashMap<StreamId, u64>>,
    /// Events dropped for an older epoch.
    pub stale: AtomicU64,
    pub poisoned: AtomicU64,
    pub applied: AtomicU64,
    pub bootstraps: AtomicU64,
    /// Sealed segments loaded from snapshots with their index (no rebuild here).
    pub segments_loaded: AtomicU64,
    /// Per (collection id, shard): the newest leader ts the stream has shown (event ts, ticks'
    /// leader clock), for the ts lag.
    leader_seen: Mutex<HashMap<(u64, usize), u64>>,
    /// Bootstraps in progress, per (collection id, shard).
    progress: Mutex<HashMap<(u64, usize), Progress>>,
}

/// A bootstrap in progress: bytes loaded so far against the leader's estimate.
#[derive(Debug, Clone)]
struct Progress {
    collection: String,
    bytes: u64,
    total: u64,
    /// Bytes and time at the previous report (the rate is per report interval).
    reported: (u64, std::time::Instant),
}

/// How often lag gauges are refreshed and bootstrap progress is logged.
const REPORT_EVERY: Duration = Duration::from_secs(1);

struct DirectClock(ReplicationClient<Channel>);

impl LeaderClock for DirectClock {
    fn leader_ts(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = tandem_cluster::Result<u64>> + Send + '_>> {
        Box::pin(async move {
            let r = self
                .0
                .clone()
                .leader_ts(rp::LeaderTsRequest {})
                .await
                .map_err(|s| ClusterError::Unavailable(format!("cannot ask the leader for its clock: {}", s.message())))?;
            Ok(r.into_inner().ts)
        })
    }
}

const BACKOFF: Duration = Duration::from_millis(200);

/// A broker subscriber that has applied nothing starts from the leader's snapshot when the
/// leader's shard holds at least this many rows, or when the stream to replay is at least
/// [`SNAPSHOT_FIRST_MIN_POSITIONS`] long; below both, replaying the broker's log is as quick.
const SNAPSHOT_FIRST_MIN_ROWS: u64 = 20_000;

/// The replay's length counts apart from the rows: a topic holds every change ever made (and a
/// tick every few ms between them), so a shard of a few hundred rows updated for hours has a
/// topic of many thousand events, which an old leader rejoining after a failover replayed at
/// ~1 500 events/s with tansu (its rejoin time grew round after round), while the snapshot of
/// those rows takes milliseconds.
const SNAPSHOT_FIRST_MIN_POSITIONS: u64 = 100;

/// Whether loading a snapshot of `rows` rows at stream position `position` is cheaper than
/// replaying the stream from its start (`position` 0: not known, an older leader).
fn snapshot_is_cheaper(rows: u64, position: u64) -> bool {
    rows >= SNAPSHOT_FIRST_MIN_ROWS || position >= SNAPSHOT_FIRST_MIN_POSITIONS
}

/// What a snapshot segment part led to.
enum SegmentStep {
    /// The segment is not complete yet.
    More(SegmentReceiver),
    /// It is in the shard: with the index it came with, or (the collection's index changed)
    /// as rows to index here.
    Installed { with_index: bool },
}

/// Bytes a snapshot segment part carries, as counted for progress: vectors, ids and ts, and the
/// index file's piece.
fn segment_part_bytes(part: &rp::SnapshotSegment) -> u64 {
    part.index_bytes.len() as u64 + part.rows.as_ref().map_or(0, |r| r.vectors.len() as u64 * 4 + r.ids.len() as u64 * 16)
}

/// Why a shard loads the leader's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bootstrap {
    /// The stream cannot bring the shard up to date: its position is gone from the log, or an
    /// earlier bootstrap was interrupted.
    Needed,
    /// The shard has applied nothing and the broker holds the whole stream: loaded only when
    /// [`snapshot_is_cheaper`], declined (changing nothing) otherwise.
    IfCheaper,
}

/// The longest a snapshot may go without a message (its start included) before the attempt is
/// given up: a leader that stops answering mid-snapshot (paused, cut off: no reset arrives)
/// must not hold the shard for ever, since a candidate cannot finish catching up, and so
/// cannot be promoted, while a shard waits on it. Chunks come every few ms while a snapshot
/// streams.
const SNAPSHOT_IDLE: Duration = Duration::from_secs(10);

/// At most this many received events are applied together (one fsync).
const MAX_BATCH_EVENTS: usize = 1024;

/// What a shard task does after applying what it received.
enum Flow {
    Continue,
    /// Subscribe again from the applied position (transient failure, or after a bootstrap).
    Resubscribe,
    /// A poison event halted this shard.
    Halt,
}

impl Follower {
    /// Starts following: the DDL stream, then every collection's shards.
    pub fn start(node: Arc<Node>, transport: Arc<dyn Transport>, leader: ReplicationClient<Channel>, cfg: FollowerConfig) -> Arc<Follower> {
        node.set_leader_clock(Arc::new(DirectClock(leader.clone())));
        let f = Arc::new(Follower {
            node,
            transport,
            leader,
            cfg,
            cancel: CancellationToken::new(),
            shards: Mutex::new(HashMap::new()),
            epochs: Mutex::new(HashMap::new()),
            stale: AtomicU64::new(0),
            poisoned: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            bootstraps: AtomicU64::new(0),
            segments_loaded: AtomicU64::new(0),
            leader_seen: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
        });
        for c in f.node.collections() {
            f.start_collection(&c);
        }
        let me = f.clone();
        tokio::spawn(async move { me.run_ddl().await });
        let me = f.clone();
        tokio::spawn(async move { me.run_reporter().await });
        f
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }

    fn start_collection(self: &Arc<Self>, c: &Arc<Collection>) {
        let token = self.cancel.child_token();
        if let Some(old) = self.shards.lock().insert(c.id, token.clone()) {
            old.cancel();
        }
        self.node.set_replication_state(c.id, ReplicationState::Following);
        for shard in 0..c.shards().len() {
            let me = self.clone();
            let c = c.clone();
            let token = token.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = me.run_shard(c, shard) => {}
                }
            });
        }
    }

    fn check_epoch(&self, stream: &StreamId, ev: &rp::ChangeEvent) -> Result<()> {
        let mut epochs = self.epochs.lock();
        let seen = epochs.entry(*stream).or_default();
        if ev.epoch < *seen {
            return Err(ExportError::StaleEpoch { stream: stream.to_string(), got: ev.epoch, seen: *seen });
        }
        *seen = ev.epoch;
        Ok(())
    }

    /// Counts and logs an event dropped by [`Self::check_epoch`].
    fn dropped_stale(&self, e: &ExportError) {
        self.stale.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tandem_replication_stale_events_total", "cluster" => self.cluster()).increment(1);
        tracing::warn!(error = %e, "dropped an event of a fenced leader");
    }

    async fn run_ddl(self: Arc<Self>) {
        let stream_id = StreamId::Ddl;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let from = self.node.ddl_source_lsn() + 1;
            let mut stream = match self.transport.subscribe(&stream_id, from).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "ddl subscribe failed; retrying");
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            };
            loop {
                let item = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    item = stream.next() => item,
                };
                let Some(item) = item else { break };
                let ev = match item.and_then(|ev| self.check_epoch(&stream_id, &ev).map(|_| ev)) {
                    Ok(ev) => ev,
                    Err(e @ ExportError::StaleEpoch { .. }) => {
                        self.dropped_stale(&e);
                        continue;
                    }
                    Err(e) if e.is_transient() => break,
                    Err(e) => {
                        self.quarantine(&stream_id, 0, &e, None);
                        tracing::error!(error = %e, "ddl replication halted");
                        return;
                    }
                };
                if matches!(ev.body, Some(rp::change_event::Body::Tick(_)) | None) {
                    continue;
                }
                let rec = match feed::ddl_record(&ev) {
                    Ok(r) => r,
                    Err(e) => {
                        self.quarantine(&stream_id, ev.lsn, &e.into(), Some(&ev));
                        return;
                    }
                };
                let node = self.node.clone();
                let lsn = ev.lsn;
                let res = tokio::task::spawn_blocking(move || node.apply_replicated_ddl(lsn, rec)).await;
                match res {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, lsn, "applying a ddl change failed; retrying");
                        tokio::time::sleep(BACKOFF).await;
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "ddl apply task failed");
                        break;
                    }
                }
                match &ev.body {
                    Some(rp::change_event::Body::CreateCollection(_)) => {
                        if let Some(c) = self.node.collection_by_id(ev.collection_id) {
                            self.start_collection(&c);
                        }
                    }
                    Some(rp::change_event::Body::DropCollection(_)) => {
                        if let Some(t) = self.shards.lock().remove(&ev.collection_id) {
                            t.cancel();
                        }
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(BACKOFF).await;
        }
    }

    async fn run_shard(self: Arc<Self>, c: Arc<Collection>, shard: usize) {
        let stream_id = StreamId::Shard { collection_id: c.id, shard: shard as u32 };
        let sh = c.shards()[shard].clone();
        // A broker keeps a collection's whole history, and replaying it event by event is slow
        // (~15 MB/s with tansu): a shard that has applied nothing loads the leader's snapshot
        // (~150 MB/s) when it is big enough for that to pay off, and continues from the broker
        // at the matching position. Tried once per task: if the leader cannot be reached, or
        // the shard is small, the broker's log is replayed instead.
        let mut snapshot_first = self.transport.needs_publisher();
        loop {
            if c.is_dropped() {
                return;
            }
            if std::mem::take(&mut snapshot_first) && sh.source_lsn() == 0 && sh.stats().live_rows == 0 {
                if let Err(e) = self.bootstrap(&c, shard, Bootstrap::IfCheaper).await {
                    tracing::warn!(error = %e, %stream_id, "could not load the leader's snapshot; replaying the broker's log instead");
                }
                continue;
            }
            // An interrupted bootstrap leaves rows but no position: start it over.
            if sh.source_lsn() == 0 && sh.stats().live_rows > 0 {
                if let Err(e) = self.bootstrap(&c, shard, Bootstrap::Needed).await {
                    tracing::warn!(error = %e, %stream_id, "bootstrap failed; retrying");
                    tokio::time::sleep(BACKOFF).await;
                }
                continue;
            }
            let from = sh.source_lsn() + 1;
            let mut stream = match self.transport.subscribe(&stream_id, from).await {
                Ok(s) => s,
                Err(ExportError::Truncated { .. }) => {
                    tracing::info!(%stream_id, from, "the log no longer holds our position: bootstrapping from a snapshot");
                    if let Err(e) = self.bootstrap(&c, shard, Bootstrap::Needed).await {
                        tracing::warn!(error = %e, %stream_id, "bootstrap failed; retrying");
                        tokio::time::sleep(BACKOFF).await;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, %stream_id, "subscribe failed; retrying");
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            };
            while let Some(first) = stream.next().await {
                // Whatever else has already arrived is applied with it: one blocking hop and one
                // WAL fsync for the lot, which is what bounds the lag under a steady write rate.
                let mut items = vec![first];
                while items.len() < MAX_BATCH_EVENTS {
                    match stream.next().now_or_never() {
                        Some(Some(item)) => items.push(item),
                        _ => break,
                    }
                }
                match self.apply_items(&c, shard, &stream_id, items).await {
                    Flow::Continue => {}
                    Flow::Resubscribe => break,
                    Flow::Halt => return,
                }
            }
            tokio::time::sleep(BACKOFF).await;
        }
    }

    /// Applies received items of one shard stream in order: consecutive data events in one
    /// batch (one fsync), ticks once the data before them is in, errors where they occur.
    async fn apply_items(&self, c: &Arc<Collection>, shard: usize, stream_id: &StreamId, items: Vec<Result<rp::ChangeEvent>>) -> Flow {
        use rp::change_event::Body;
        let sh = c.shards()[shard].clone();
        let mut batch: Vec<rp::ChangeEvent> = Vec::new();
        let mut tick_ts = 0;
        let mut leader_seen = 0;
        for item in items {
            let ev = match item.and_then(|ev| self.check_epoch(stream_id, &ev).map(|_| ev)) {
                Ok(ev) => ev,
                Err(e @ ExportError::StaleEpoch { .. }) => {
                    self.dropped_stale(&e);
                    continue;
                }
                Err(e) => {
                    if let Some(flow) = self.flush(c, shard, stream_id, &mut batch).await {
                        return flow;
                    }
                    match e {
                        ExportError::Truncated { .. } => {
                            if let Err(e) = self.bootstrap(c, shard, Bootstrap::Needed).await {
                                tracing::warn!(error = %e, %stream_id, "bootstrap failed; retrying");
                            }
                            return Flow::Resubscribe;
                        }
                        e if e.is_transient() => return Flow::Resubscribe,
                        e => {
                            let position = match &e {
                                ExportError::Malformed { position, .. } => *position,
                                _ => sh.source_lsn() + 1,
                            };
                            if !self.poison(c, shard, stream_id, position, &e, None).await {
                                return Flow::Halt;
                            }
                            // Skipped: the rest of what arrived is still in order.
                            continue;
                        }
                    }
                }
            };
            if let Some(base) = ev.epoch_base {
                // What this shard holds (or is about to apply) past the position this epoch's
                // leader started from must be this epoch's. A change of an older epoch there
                // is one the leader never had: a fenced leader's export that reached the broker
                // after the next leader caught up, but before its first event. Skipping the
                // new leader's change at that position would lose an acknowledged write; the
                // shard is reloaded instead.
                let (applied, epoch) = match batch.last() {
                    Some(b) => (b.lsn, b.epoch),
                    None => (sh.source_lsn(), sh.applied_epoch()),
                };
                if epoch > 0 && epoch < ev.epoch && applied > base {
                    metrics::counter!("tandem_replication_diverged_total", "cluster" => self.cluster()).increment(1);
                    tracing::error!(
                        %stream_id, applied, applied_epoch = epoch, epoch = ev.epoch, epoch_base = base,
                        "this shard applied changes of an older epoch past where the leader's epoch began (a fenced leader's late export): reloading it"
                    );
                    self.node.diverged_reloads.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.bootstrap(c, shard, Bootstrap::Needed).await {
                        tracing::warn!(error = %e, %stream_id, "bootstrap failed; retrying");
                        tokio::time::sleep(BACKOFF).await;
                    }
                    return Flow::Resubscribe;
                }
            }
            let seen = match &ev.body {
                Some(Body::Tick(t)) => t.leader_ts.max(ev.ts),
                _ => ev.ts,
            };
            leader_seen = leader_seen.max(seen);
            match &ev.body {
                // The stream is ordered: every change up to the tick's position has been applied
                // once the batch before it is.
                Some(Body::Tick(_)) => tick_ts = tick_ts.max(ev.ts),
                Some(Body::Insert(_) | Body::Upsert(_) | Body::Delete(_)) => batch.push(ev),
                other => {
                    let e = ExportError::Malformed {
                        stream: stream_id.to_string(),
                        position: ev.lsn,
                        message: format!("not a data event: {other:?}"),
                    };
                    if let Some(flow) = self.flush(c, shard, stream_id, &mut batch).await {
                        return flow;
                    }
                    if !self.poison(c, shard, stream_id, ev.lsn, &e, Some(&ev)).await {
                        return Flow::Halt;
                    }
                }
            }
        }
        if let Some(flow) = self.flush(c, shard, stream_id, &mut batch).await {
            return flow;
        }
        if tick_ts > 0 {
            sh.follow_to(tick_ts);
        }
        if leader_seen > 0 {
            let mut m = self.leader_seen.lock();
            let v = m.entry((c.id, shard)).or_default();
            *v = (*v).max(leader_seen);
        }
        Flow::Continue
    }

    /// Applies the data events gathered in `batch` (emptied). `None` when all were applied or
    /// stepped over as poison (skip policy); otherwise what the shard task does next.
    async fn flush(&self, c: &Arc<Collection>, shard: usize, stream_id: &StreamId, batch: &mut Vec<rp::ChangeEvent>) -> Option<Flow> {
        use rp::change_event::Body;
        let mut events = std::mem::take(batch);
        while !events.is_empty() {
            // Decode up to the first event that does not decode: it is poison, the rest waits.
            let schema = c.schema();
            let mut changes = Vec::with_capacity(events.len());
            let mut bad = None;
            for (i, ev) in events.iter().enumerate() {
                let op = match &ev.body {
                    Some(Body::Insert(b)) => st::wal_record::Op::Insert(b.clone()),
                    Some(Body::Upsert(b)) => st::wal_record::Op::Upsert(b.clone()),
                    Some(Body::Delete(d)) => st::wal_record::Op::Delete(d.clone()),
                    _ => unreachable!("only data events are batched"),
                };
                match op_from_record(&schema, op) {
                    Ok(Some(op)) => changes.push((ev.lsn, ev.ts, op)),
                    Ok(None) => unreachable!("data events decode to an operation"),
                    Err(e) => {
                        bad = Some((i, ExportError::Malformed { stream: stream_id.to_string(), position: ev.lsn, message: e.to_string() }));
                        break;
                    }
                }
            }
            let n = changes.len();
            let before = c.shards()[shard].source_lsn();
            let (node, c2) = (self.node.clone(), c.clone());
            // Failpoint: applying the batch fails before anything is applied (`transient`: a
            // failure worth retrying; otherwise one that is not).
            let injected = tandem_cluster::failpoint::fired("follower::apply").map(|arg| match arg.as_str() {
                "transient" => ClusterError::Unavailable("injected apply failure (failpoint follower::apply)".into()),
                _ => ClusterError::Internal("injected apply failure (failpoint follower::apply)".into()),
            });
            let (handled, result) = match tokio::task::spawn_blocking(move || {
                if let Some(e) = injected {
                    return (0, Err(e));
                }
                let mut jobs = Vec::new();
                let r = c2.apply_replicated_batch(&node.clock, shard, changes, &mut jobs);
                node.enqueue(&c2, jobs);
                r
            })
            .await
            {
                Ok(r) => r,
                Err(e) => (0, Err(ClusterError::Internal(e.to_string()))),
            };
            self.applied.fetch_add(handled as u64, Ordering::Relaxed);
            // The epoch of the last change applied (not one stepped over as already applied).
            if let Some(ev) = events[..handled.min(events.len())].iter().rev().find(|ev| ev.lsn > before) {
                c.shards()[shard].set_applied_epoch(ev.epoch);
            }
            metrics::counter!("tandem_replication_events_applied_total", "cluster" => self.cluster(), "collection" => c.schema().name.clone(), "shard" => shard.to_string())
                .increment(handled as u64);
            let failed = match (result, bad) {
                (Ok(()), None) => return None,
                (Ok(()), Some((i, e))) => (i, e),
                (Err(e), _) if e.is_transient() => {
                    tracing::warn!(error = %e, %stream_id, "apply failed; retrying");
                    return Some(Flow::Resubscribe);
                }
                (Err(e), _) => (handled, ExportError::Cluster(e)),
            };
            debug_assert!(failed.0 < events.len() && (failed.0 >= n || failed.0 == handled));
            let ev = &events[failed.0];
            if !self.poison(c, shard, stream_id, ev.lsn, &failed.1, Some(ev)).await {
                return Some(Flow::Halt);
            }
            events.drain(..=failed.0);
        }
        None
    }

    /// Loads a snapshot of one shard from the leader (see `load_snapshot`); with
    /// [`Bootstrap::IfCheaper`], declines (changing nothing) when replaying is as quick.
    async fn bootstrap(&self, c: &Arc<Collection>, shard: usize, why: Bootstrap) -> Result<()> {
        let name = c.schema().name.clone();
        self.progress
            .lock()
            .insert((c.id, shard), Progress { collection: name, bytes: 0, total: 0, reported: (0, std::time::Instant::now()) });
        self.node.set_replication_state(c.id, bootstrap_state(0, 0, 0.0));
        let r = self.load_snapshot(c, shard, why).await;
        let mut progress = self.progress.lock();
        progress.remove(&(c.id, shard));
        if !progress.keys().any(|&(cid, _)| cid == c.id) {
            // A failed snapshot-first attempt (`IfCheaper`) is not retried: the shard replays
            // the broker's log instead (or, if it was already wiped, starts a full bootstrap,
            // which sets its own state), so it is following.
            let state =
                if r.is_ok() || why == Bootstrap::IfCheaper { ReplicationState::Following } else { ReplicationState::BootstrapRetrying };
            self.node.set_replication_state(c.id, state);
        }
        r
    }

    async fn load_snapshot(&self, c: &Arc<Collection>, shard: usize, why: Bootstrap) -> Result<()> {
        let req = rp::SnapshotRequest {
            collection_id: c.id,
            shard: shard as u32,
            subscriber: self.cfg.subscriber.clone(),
            segments: true,
            only_segments: Vec::new(),
            local: false,
        };
        let idle = || ExportError::Unavailable { backend: "snapshot", message: format!("the leader sent nothing for {SNAPSHOT_IDLE:?}") };
        let mut stream = tokio::time::timeout(SNAPSHOT_IDLE, self.leader.clone().snapshot(req))
            .await
            .map_err(|_| idle())?
            .map_err(|s| ExportError::Unavailable { backend: "snapshot", message: s.message().to_string() })?
            .into_inner();
        let mut bytes = 0u64;
        let started = std::time::Instant::now();
        let row_bytes = c.schema().dim as u64 * 4 + 16;
        let labels = [("cluster", self.cluster()), ("collection", c.schema().name.clone()), ("shard", shard.to_string())];
        let bytes_total = metrics::counter!("tandem_replication_bootstrap_bytes_total", &labels);
        let mut wiped = false;
        // A sealed segment arriving with its index, part by part.
        let mut incoming: Option<SegmentReceiver> = None;
        // Counts `n` more bytes loaded (progress and metrics).
        let account = |bytes: &mut u64, n: u64, total_rows: u64| {
            *bytes += n;
            bytes_total.increment(n);
            if let Some(p) = self.progress.lock().get_mut(&(c.id, shard)) {
                p.bytes = *bytes;
                p.total = p.total.max(total_rows * row_bytes);
            }
        };
        while let Some(chunk) = tokio::time::timeout(SNAPSHOT_IDLE, stream.next()).await.map_err(|_| idle())? {
            let chunk = chunk.map_err(|s| ExportError::Unavailable { backend: "snapshot", message: s.message().to_string() })?;
            if !wiped {
                if why == Bootstrap::IfCheaper && !snapshot_is_cheaper(chunk.total_rows, chunk.lsn) {
                    return Ok(());
                }
                // The snapshot is taken on the leader already; what this shard holds goes now.
                let sh = c.shards()[shard].clone();
                tokio::task::spawn_blocking(move || sh.wipe())
                    .await
                    .map_err(|e| ExportError::Cluster(ClusterError::Internal(e.to_string())))??;
                wiped = true;
            }
            if let Some(part) = chunk.segment {
                account(&mut bytes, segment_part_bytes(&part), chunk.total_rows);
                let (node, c2, ts, dir) = (self.node.clone(), c.clone(), chunk.snapshot_ts, c.shards()[shard].dir().to_path_buf());
                let receiver = incoming.take();
                let step = tokio::task::spawn_blocking(move || -> Result<SegmentStep> {
                    let mut receiver = match receiver {
                        Some(r) => r,
                        None => SegmentReceiver::new(&dir, &part)?,
                    };
                    let Some(seg) = receiver.take(part)? else { return Ok(SegmentStep::More(receiver)) };
                    let mut jobs = Vec::new();
                    let r = c2.install_snapshot_segment(&node.clock, shard, ts, seg, &mut jobs);
                    node.enqueue(&c2, jobs);
                    Ok(SegmentStep::Installed { with_index: r? })
                })
                .await
                .map_err(|e| ExportError::Cluster(ClusterError::Internal(e.to_string())))??;
                match step {
                    SegmentStep::More(receiver) => incoming = Some(receiver),
                    SegmentStep::Installed { with_index: true } => {
                        self.segments_loaded.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("tandem_replication_bootstrap_segments_total", &labels).increment(1);
                    }
                    SegmentStep::Installed { with_index: false } => {}
                }
                // Failpoint: the snapshot is cut off with a segment installed.
                if incoming.is_none() && tandem_cluster::failpoint::fired("follower::snapshot_chunk").is_some() {
                    return Err(ExportError::Unavailable { backend: "snapshot", message: "snapshot interrupted (failpoint)".into() });
                }
                continue;
            }
            if let Some(r) = &incoming {
                return Err(ExportError::Unavailable {
                    backend: "snapshot",
                    message: format!("the snapshot went on before segment {} was complete", r.id()),
                });
            }
            if chunk.done {
                if chunk.lsn == 0 {
                    // The leader's shard has never logged a change: nothing to load, and no
                    // position to record (the stream starts at 1).
                    if bytes > 0 {
                        return Err(ExportError::Unavailable {
                            backend: "snapshot",
                            message: "a snapshot with rows but no position".into(),
                        });
                    }
                    return Ok(());
                }
                // The marker: an empty delete at the snapshot's position and ts.
                let (node, c2) = (self.node.clone(), c.clone());
                let (lsn, ts) = (chunk.lsn, chunk.snapshot_ts);
                tokio::task::spawn_blocking(move || node_apply(&node, &c2, shard, lsn, ts, ShardOp::Delete { ids: vec![] }))
                    .await
                    .map_err(|e| ExportError::Cluster(ClusterError::Internal(e.to_string())))??;
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                let rate = bytes as f64 / secs;
                metrics::gauge!("tandem_replication_bootstrap_bytes_per_second", &labels).set(rate);
                tracing::info!(collection = %c.schema().name, shard, rows_mb = bytes as f64 / 1e6, mb_per_s = rate / 1e6, "bootstrapped from a snapshot");
                self.bootstraps.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            let Some(mut rows) = chunk.rows else { continue };
            account(&mut bytes, rows.vectors.len() as u64 * 4 + rows.ids.len() as u64 * 16, chunk.total_rows);
            rows.insert_ts = chunk.insert_ts;
            let schema = c.schema();
            let op = op_from_record(&schema, st::wal_record::Op::Upsert(rows))?.expect("data op");
            let (node, c2, ts) = (self.node.clone(), c.clone(), chunk.snapshot_ts);
            tokio::task::spawn_blocking(move || {
                let mut jobs = Vec::new();
                let r = c2.load_snapshot_rows(&node.clock, shard, ts, op, &mut jobs);
                node.enqueue(&c2, jobs);
                r
            })
            .await
            .map_err(|e| ExportError::Cluster(ClusterError::Internal(e.to_string())))??;
            // Failpoint: the snapshot is cut off with part of its rows loaded.
            if tandem_cluster::failpoint::fired("follower::snapshot_chunk").is_some() {
                return Err(ExportError::Unavailable { backend: "snapshot", message: "snapshot interrupted (failpoint)".into() });
            }
        }
        Err(ExportError::Unavailable { backend: "snapshot", message: "the snapshot stream ended early".into() })
    }

    /// Quarantines a poison event; returns whether the shard goes on (skip) or halts.
    async fn poison(
        &self,
        c: &Arc<Collection>,
        shard: usize,
        stream: &StreamId,
        position: u64,
        e: &ExportError,
        ev: Option<&rp::ChangeEvent>,
    ) -> bool {
        self.quarantine(stream, position, e, ev);
        match self.cfg.on_poison {
            OnPoison::Halt => {
                self.node.set_replication_state(c.id, ReplicationState::Halted { reason: e.to_string() });
                tracing::error!(%stream, position, error = %e, "replication of this shard is halted on a poison event (quarantined)");
                false
            }
            OnPoison::Skip => {
                // Step over it durably, so a restart does not meet it again.
                let (node, c2) = (self.node.clone(), c.clone());
                let ts = c.shards()[shard].serviceable_ts(&self.node.clock);
                let _ =
                    tokio::task::spawn_blocking(move || node_apply(&node, &c2, shard, position, ts, ShardOp::Delete { ids: vec![] })).await;
                tracing::error!(%stream, position, error = %e, "skipped a poison event (quarantined)");
                true
            }
        }
    }

    fn cluster(&self) -> String {
        self.node.opts.cluster_id.clone()
    }

    /// Every `REPORT_EVERY`: lag gauges of every shard, and bootstrap progress (log line,
    /// bytes/s gauge, the collection's replication state shown by GetClusterInfo).
    async fn run_reporter(self: Arc<Self>) {
        let mut every = tokio::time::interval(REPORT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            self.report_lag();
            self.report_progress();
        }
    }

    fn report_lag(&self) {
        let now = tandem_cluster::ts::wall_ms();
        for c in self.node.collections() {
            let name = c.schema().name.clone();
            for (i, sh) in c.shards().iter().enumerate() {
                let s = sh.serviceable_ts(&self.node.clock);
                let lag_ms = now.saturating_sub(tandem_cluster::ts::physical_ms(s));
                let seen = self.leader_seen.lock().get(&(c.id, i)).copied().unwrap_or(0);
                let labels = [("cluster", self.cluster()), ("collection", name.clone()), ("shard", i.to_string())];
                metrics::gauge!("tandem_replication_lag_ms", &labels).set(lag_ms as f64);
                metrics::gauge!("tandem_replication_lag_ts", &labels).set(seen.saturating_sub(s) as f64);
            }
        }
    }

    fn report_progress(&self) {
        let now = std::time::Instant::now();
        let mut by_collection: HashMap<u64, (String, u64, u64, f64)> = HashMap::new();
        for (&(cid, shard), p) in self.progress.lock().iter_mut() {
            let secs = now.duration_since(p.reported.1).as_secs_f64().max(1e-3);
            let rate = (p.bytes - p.reported.0) as f64 / secs;
            p.reported = (p.bytes, now);
            let labels = [("cluster", self.cluster()), ("collection", p.collection.clone()), ("shard", shard.to_string())];
            metrics::gauge!("tandem_replication_bootstrap_bytes_per_second", &labels).set(rate);
            tracing::info!(collection = %p.collection, shard, percent = percent(p.bytes, p.total), mb = p.bytes as f64 / 1e6, mb_per_s = rate / 1e6, "bootstrapping");
            let e = by_collection.entry(cid).or_insert_with(|| (p.collection.clone(), 0, 0, 0.0));
            e.1 += p.bytes;
            e.2 += p.total;
            e.3 += rate;
        }
        for (cid, (_, bytes, total, rate)) in by_collection {
            self.node.set_replication_state(cid, bootstrap_state(bytes, total, rate));
        }
    }

    fn quarantine(&self, stream: &StreamId, position: u64, e: &ExportError, ev: Option<&rp::ChangeEvent>) {
        self.poisoned.fetch_add(1, Ordering::Relaxed);
        let (collection, shard) = match stream {
            StreamId::Ddl => (String::new(), "ddl".to_string()),
            StreamId::Shard { collection_id, shard } => (
                self.node
                    .collection_by_id(*collection_id)
                    .map(|c| c.schema().name.clone())
                    .unwrap_or_else(|| format!("id {collection_id}")),
                shard.to_string(),
            ),
        };
        metrics::counter!("tandem_replication_poisoned_total", "cluster" => self.cluster(), "collection" => collection, "shard" => shard)
            .increment(1);
        let _ = std::fs::create_dir_all(&self.cfg.quarantine_dir);
        let name = format!("{}-{position}.txt", stream.to_string().replace('/', "-"));
        let body = format!("stream: {stream}\nposition: {position}\nerror: {e}\nevent: {ev:?}\n");
        if let Err(err) = std::fs::write(self.cfg.quarantine_dir.join(name), body) {
            tracing::error!(error = %err, "could not write the quarantine file");
        }
    }
}

fn percent(bytes: u64, total: u64) -> u64 {
    // The total is the leader's live row count when the snapshot began: an estimate.
    (bytes * 100).checked_div(total).map_or(0, |p| p.min(99))
}

/// The replication state GetClusterInfo shows while bootstrapping, e.g.
/// "bootstrapping 45% 120 MB/s".
fn bootstrap_state(bytes: u64, total: u64, rate: f64) -> ReplicationState {
    ReplicationState::Bootstrapping { percent: percent(bytes, total), bytes_per_s: rate }
}

fn node_apply(node: &Node, c: &Arc<Collection>, shard: usize, lsn: u64, ts: u64, op: ShardOp) -> Result<bool> {
    let mut jobs = Vec::new();
    let r = c.apply_replicated(&node.clock, shard, lsn, ts, op, &mut jobs)?;
    node.enqueue(c, jobs);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_state_shows_percent_and_rate() {
        assert_eq!(bootstrap_state(45, 100, 120e6).to_string(), "bootstrapping 45% 120 MB/s");
        assert_eq!(bootstrap_state(0, 0, 0.0).to_string(), "bootstrapping 0% 0 MB/s");
        // The total is an estimate: never claim 100% before the end.
        assert_eq!(bootstrap_state(150, 100, 1e6).to_string(), "bootstrapping 99% 1 MB/s");
    }
}
