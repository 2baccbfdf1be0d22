//! The `tandem.replication.v1.Replication` service a cluster serves: its change feeds as
//! server-streaming RPCs (the direct transport: an alternative pulls the leader's log, as
//! Elasticsearch CCR pulls from its leader), shard snapshots for bootstrapping, and the leader's
//! clock for STRONG reads on alternatives.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::replication::v1 as rp;
use tandem_proto::storage::v1 as st;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::ClusterError;
use crate::feed::{DdlFeed, Feed, Positions, ShardFeed};
use crate::node::Node;
use crate::role::Role;
use crate::schema::{Schema, rows_to_payloads};
use crate::segment::{LIVE, Sealed};
use crate::shard::Shard;
use crate::ts::Ts;

pub const SNAPSHOT_CHUNK_ROWS: usize = 1024;

/// Bytes of an index file per snapshot message.
const SNAPSHOT_INDEX_PIECE: usize = 1 << 20;

/// How often the leader records its replication metrics (leases).
const REPORT_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct ReplicationService {
    node: Arc<Node>,
    group: String,
    tick: Duration,
    reporting: Arc<std::sync::atomic::AtomicBool>,
    /// The server's shutdown: change streams end then, so a graceful stop does not wait on
    /// subscribers that never hang up (alternatives, query nodes).
    stop: CancellationToken,
}

impl ReplicationService {
    pub fn new(node: Arc<Node>, group: String, tick: Duration, stop: CancellationToken) -> Self {
        ReplicationService { node, group, tick, reporting: Default::default(), stop }
    }

    /// Records the leader's replication metrics every second from the first subscription on
    /// (leases only exist once someone subscribes); ends with the node.
    fn start_reporter(&self) {
        if self.reporting.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let node = Arc::downgrade(&self.node);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REPORT_EVERY);
            loop {
                every.tick().await;
                let Some(node) = node.upgrade() else { return };
                record_leader_metrics(&node);
            }
        });
    }

    /// Local feeds and snapshots (query nodes) are served by a cluster that serves reads: not
    /// while it recovers (its log may still be replaced) or stands by.
    fn readable(&self) -> Result<(), Status> {
        let role = self.node.role();
        if role.is_readable() {
            Ok(())
        } else {
            Err(ClusterError::Unavailable(format!(
                "cluster {} is {role}: it feeds its query nodes once it serves reads",
                self.node.opts.cluster_id
            ))
            .into())
        }
    }

    fn leading(&self) -> Result<(), Status> {
        let role = self.node.role();
        if role == Role::Leading {
            Ok(())
        } else {
            Err(ClusterError::NotLeader { cluster: self.node.opts.cluster_id.clone(), role, leader: self.node.leader() }.into())
        }
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// Streams a feed into a channel until the receiver goes away, the feed fails or `stop` fires
/// (the error is the stream's last item). `before` runs before each wait with the next
/// position; `sent` after each batch with the highest ts in it.
fn pump(
    mut feed: impl Feed,
    stop: CancellationToken,
    mut before: impl FnMut(u64) + Send + 'static,
    mut sent: impl FnMut(u64) + Send + 'static,
) -> tokio::sync::mpsc::Receiver<Result<rp::ChangeEvent, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            before(feed.next_lsn());
            let batch = tokio::select! {
                batch = feed.next_batch() => batch,
                () = stop.cancelled() => Err(ClusterError::Unavailable("the cluster is shutting down; subscribe again later".into())),
            };
            let stop = batch.is_err();
            let top_ts = batch.as_ref().map_or(0, |evs| evs.iter().map(|e| e.ts).max().unwrap_or(0));
            for item in batch.map_or_else(|e| vec![Err(Status::from(e))], |evs| evs.into_iter().map(Ok).collect()) {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            if stop {
                return;
            }
            sent(top_ts);
        }
    });
    rx
}

/// Leader-side replication metrics of every shard: live retention leases, lease expiries.
/// (`tandem_replication_exported_ts` is recorded where events leave: the direct stream, the
/// broker publisher.)
pub fn record_leader_metrics(node: &Node) {
    let cluster = node.opts.cluster_id.clone();
    for c in node.collections() {
        let name = c.schema().name.clone();
        for (i, sh) in c.shards().iter().enumerate() {
            let labels = [("cluster", cluster.clone()), ("collection", name.clone()), ("shard", i.to_string())];
            metrics::gauge!("tandem_replication_leases", &labels).set(sh.leases().len() as f64);
            metrics::counter!("tandem_replication_lease_expiries_total", &labels).absolute(sh.lease_expiries());
        }
    }
}

/// Sets `tandem_replication_exported_ts` of one shard stream: every change with ts <= it has
/// left the leader (sent to a direct subscriber, or acknowledged by the broker).
pub fn record_exported_ts(cluster: &str, collection: &str, shard: usize, ts: u64) {
    let labels = [("cluster", cluster.to_string()), ("collection", collection.to_string()), ("shard", shard.to_string())];
    metrics::gauge!("tandem_replication_exported_ts", &labels).set(ts as f64);
}

#[tonic::async_trait]
impl rp::replication_server::Replication for ReplicationService {
    type SubscribeStream = Stream<rp::ChangeEvent>;
    type SnapshotStream = Stream<rp::SnapshotChunk>;

    async fn subscribe(&self, req: Request<rp::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = req.into_inner();
        let rx = if r.ddl {
            pump(DdlFeed::new(self.node.clone(), r.from_lsn, &self.group, Duration::from_millis(50))?, self.stop.clone(), |_| {}, |_| {})
        } else {
            let c = self
                .node
                .collection_by_id(r.collection_id)
                .ok_or_else(|| ClusterError::CollectionNotFound(format!("id {}", r.collection_id)))?;
            let positions = if r.local {
                self.readable()?;
                // As if the log no longer held the query node's position (this cluster
                // bootstrapped again past it, or its lease expired while it was away).
                if crate::failpoint::fired("replication::local_subscribe").is_some() {
                    return Err(ClusterError::Truncated { from: r.from_lsn, first: r.from_lsn + 1 }.into());
                }
                Positions::Local
            } else {
                Positions::Stream
            };
            let feed = ShardFeed::new(self.node.clone(), c.clone(), r.shard as usize, r.from_lsn, &self.group, self.tick, positions)?;
            let subscriber = if r.subscriber.is_empty() { "anonymous".to_string() } else { r.subscriber.clone() };
            let shard = c.shards()[r.shard as usize].clone();
            self.start_reporter();
            let (cluster, name, index) = (self.node.opts.cluster_id.clone(), c.schema().name.clone(), r.shard as usize);
            // What a query node reads is not exported: the figure is the replication stream's.
            let exported = !r.local;
            // The lease keeps the WAL from where this subscriber is.
            pump(
                feed,
                self.stop.clone(),
                move |next| shard.hold(&subscriber, next),
                move |ts| {
                    if exported {
                        record_exported_ts(&cluster, &name, index, ts)
                    }
                },
            )
        };
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn end_lsn(&self, req: Request<rp::SubscribeRequest>) -> Result<Response<rp::EndLsnResponse>, Status> {
        let r = req.into_inner();
        let lsn = if r.ddl {
            self.node.ddl_stream_end()
        } else {
            let c = self
                .node
                .collection_by_id(r.collection_id)
                .ok_or_else(|| ClusterError::CollectionNotFound(format!("id {}", r.collection_id)))?;
            let sh = c.shards().get(r.shard as usize).ok_or_else(|| ClusterError::invalid(format!("no shard {}", r.shard)))?;
            sh.acked_stream_lsn()
        };
        Ok(Response::new(rp::EndLsnResponse { lsn }))
    }

    async fn snapshot(&self, req: Request<rp::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let r = req.into_inner();
        if r.local {
            self.readable()?;
        } else {
            self.leading()?;
        }
        let c = self
            .node
            .collection_by_id(r.collection_id)
            .ok_or_else(|| ClusterError::CollectionNotFound(format!("id {}", r.collection_id)))?;
        let shard = c
            .shards()
            .get(r.shard as usize)
            .cloned()
            .ok_or_else(|| ClusterError::invalid(format!("collection {:?} has no shard {}", c.schema().name, r.shard)))?;
        // The collection-wide serviceable ts: every part of every write at or below it is durable
        // on every shard (see feed.rs), and the position matching it is known.
        // A local snapshot (a query node's load) stops where the local log does: its stream
        // goes on from there (see `Shard::logged_ts`).
        let snap = if r.local { c.logged_ts(&self.node.clock) } else { c.serviceable_ts(&self.node.clock) };
        if r.local && snap == 0 {
            return Err(ClusterError::Unavailable(format!(
                "collection {:?} has applied nothing yet (still bootstrapping); retry",
                c.schema().name
            ))
            .into());
        }
        let lsn = shard
            .lsn_at(snap)
            .ok_or_else(|| ClusterError::Unavailable("the shard is too busy to pick a snapshot position; retry".into()))?;
        let subscriber = if r.subscriber.is_empty() { "anonymous".to_string() } else { r.subscriber };
        shard.hold(&subscriber, lsn + 1);
        self.start_reporter();
        let schema = c.schema();
        let total_rows = shard.stats().live_rows;
        let position = if r.local { lsn } else { shard.term().to_stream(lsn) };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let want_segments = r.segments;
        let only: std::collections::HashSet<u64> = r.only_segments.into_iter().collect();
        tokio::task::spawn_blocking(move || {
            let chunk = |rows, insert_ts, segment, done| rp::SnapshotChunk {
                snapshot_ts: snap,
                rows,
                insert_ts,
                done,
                lsn: position,
                total_rows,
                segment,
            };
            let mut segments = if want_segments { shard.shippable_segments(&schema, snap) } else { Vec::new() };
            if !only.is_empty() {
                segments.retain(|s| only.contains(&s.id));
            }
            for seg in &segments {
                let sent = send_segment(&shard, &schema, seg, snap, |part| {
                    tx.blocking_send(Ok(chunk(None, Vec::new(), Some(part), false))).is_ok()
                });
                match sent {
                    Ok(true) => {}
                    // The subscriber went away.
                    Ok(false) => return,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e.into()));
                        return;
                    }
                }
            }
            if !only.is_empty() {
                // A query node's load: the segments it asked for, no rows.
                let _ = tx.blocking_send(Ok(chunk(None, Vec::new(), None, true)));
                return;
            }
            let skip = segments.iter().map(|s| s.id).collect();
            shard.snapshot_rows(snap, &skip, SNAPSHOT_CHUNK_ROWS, |ids, vectors, rows, insert_ts| {
                let rows = st::RowBatch { ids, vectors, payloads: rows_to_payloads(&schema, &rows), insert_ts: Vec::new() };
                let _ = tx.blocking_send(Ok(chunk(Some(rows), insert_ts, None, false)));
            });
            let _ = tx.blocking_send(Ok(chunk(None, Vec::new(), None, true)));
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn switchover(&self, req: Request<rp::SwitchoverRequest>) -> Result<Response<rp::SwitchoverResponse>, Status> {
        self.leading()?;
        let deadline = crate::service::deadline(&req, Duration::from_secs(60));
        let to = req.into_inner().to;
        if to.trim().is_empty() {
            return Err(ClusterError::invalid("switchover needs `to`: the id of the cluster to hand leadership to").into());
        }
        let (leader, endpoint, epoch) = self.node.switchover(&to, deadline).await?;
        Ok(Response::new(rp::SwitchoverResponse { leader, endpoint, epoch }))
    }

    async fn leader_ts(&self, _req: Request<rp::LeaderTsRequest>) -> Result<Response<rp::LeaderTsResponse>, Status> {
        if let Err(refused) = self.leading() {
            // A query node of an alternative asks through this for its local feeds' ticks:
            // they tick, and it is answered NotLeader.
            self.node.request_ticks();
            return Err(refused);
        }
        let ts = self.node.clock.peek();
        // The caller waits for its stream to reach `ts`: on an idle shard that takes a tick, so
        // make the feeds tick now instead of at their next interval. After `peek`, so every
        // tick sent for this request covers `ts`.
        self.node.request_ticks();
        self.start_reporter();
        Ok(Response::new(rp::LeaderTsResponse { ts, epoch: self.node.epoch() }))
    }
}

/// Sends one sealed segment of a snapshot at `snap` as `SnapshotSegment` parts: its rows in
/// offset order with their deletes at or below `snap`, then its index file in pieces, the last
/// with the file's length and CRC-32. Returns false when `send` reports the subscriber gone.
/// Blocking.
fn send_segment(
    shard: &Shard,
    schema: &Schema,
    seg: &Sealed,
    snap: Ts,
    mut send: impl FnMut(rp::SnapshotSegment) -> bool,
) -> Result<bool, ClusterError> {
    let part = |rows, delete_ts, index_bytes| rp::SnapshotSegment {
        id: seg.id,
        rows,
        delete_ts,
        index_bytes,
        row_count: seg.len() as u64,
        ..Default::default()
    };
    for lo in (0..seg.len()).step_by(SNAPSHOT_CHUNK_ROWS) {
        let hi = (lo + SNAPSHOT_CHUNK_ROWS).min(seg.len());
        let r = &seg.rows;
        let rows = st::RowBatch {
            ids: r.ids[lo..hi].to_vec(),
            vectors: r.vectors[lo * schema.dim..hi * schema.dim].to_vec(),
            payloads: rows_to_payloads(schema, &r.payloads[lo..hi]),
            insert_ts: r.insert_ts[lo..hi].to_vec(),
        };
        // A delete after the snapshot comes on the stream, after it.
        let delete_ts = (lo..hi).map(|off| seg.delete_ts(off)).map(|ts| if ts <= snap { ts } else { 0 }).collect();
        if !send(part(Some(rows), delete_ts, Vec::new())) {
            return Ok(false);
        }
    }
    let (mut file, kind, metric) = shard.index_file(seg)?;
    let (mut len, mut crc) = (0u64, crc32fast::Hasher::new());
    loop {
        let mut piece = Vec::with_capacity(SNAPSHOT_INDEX_PIECE);
        let n = (&mut file)
            .take(SNAPSHOT_INDEX_PIECE as u64)
            .read_to_end(&mut piece)
            .map_err(|e| ClusterError::Internal(format!("reading segment {}'s index: {e}", seg.id)))?;
        len += n as u64;
        crc.update(&piece);
        if n < SNAPSHOT_INDEX_PIECE {
            let spec = tandem_proto::v1::IndexSpec { metric: metric.to_proto() as i32, ..kind.to_proto() };
            let last = rp::SnapshotSegment {
                index: Some(spec),
                index_len: len,
                index_crc32: crc.finalize(),
                last: true,
                ..part(None, Vec::new(), piece)
            };
            return Ok(send(last));
        }
        if !send(part(None, Vec::new(), piece)) {
            return Ok(false);
        }
    }
}

/// A sealed segment received whole in a snapshot (see `send_segment`): its rows, one delete ts
/// per row (`LIVE`: live at the snapshot; the wire's 0), and its index file, checked, in the
/// shard's directory.
#[derive(Debug)]
pub struct ReceivedSegment {
    pub rows: st::RowBatch,
    pub delete_ts: Vec<Ts>,
    pub index_file: PathBuf,
    pub spec: tandem_proto::v1::IndexSpec,
}

/// Puts a segment's `SnapshotSegment` parts back together: rows in memory, the index file
/// written to `seg-incoming-*.tmp` in the shard's directory as it comes (a wipe removes what an
/// interrupted snapshot left). Blocking.
pub struct SegmentReceiver {
    id: u64,
    row_count: u64,
    rows: st::RowBatch,
    delete_ts: Vec<u64>,
    path: PathBuf,
    file: std::fs::File,
    len: u64,
    crc: crc32fast::Hasher,
}

impl SegmentReceiver {
    pub fn new(dir: &Path, first: &rp::SnapshotSegment) -> Result<SegmentReceiver, ClusterError> {
        let path = dir.join(format!("seg-incoming-{}.tmp", first.id));
        let file = std::fs::File::create(&path).map_err(|e| ClusterError::io(&path, e))?;
        Ok(SegmentReceiver {
            id: first.id,
            row_count: first.row_count,
            rows: st::RowBatch::default(),
            delete_ts: Vec::new(),
            path,
            file,
            len: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Takes the next part; the whole segment once its last part is in.
    pub fn take(&mut self, part: rp::SnapshotSegment) -> Result<Option<ReceivedSegment>, ClusterError> {
        use std::io::Write;
        let bad = |what: String| ClusterError::invalid(format!("segment {} of the snapshot: {what}", part.id));
        if part.id != self.id {
            return Err(bad(format!("a part came while segment {} was incomplete", self.id)));
        }
        if let Some(r) = part.rows {
            if r.insert_ts.len() != r.ids.len() || part.delete_ts.len() != r.ids.len() {
                return Err(bad(format!(
                    "{} ids, {} insert ts, {} delete ts in one part",
                    r.ids.len(),
                    r.insert_ts.len(),
                    part.delete_ts.len()
                )));
            }
            self.rows.ids.extend(r.ids);
            self.rows.vectors.extend(r.vectors);
            self.rows.payloads.extend(r.payloads);
            self.rows.insert_ts.extend(r.insert_ts);
            self.delete_ts.extend(part.delete_ts.into_iter().map(|ts| if ts == 0 { LIVE } else { ts }));
        }
        self.file.write_all(&part.index_bytes).map_err(|e| ClusterError::io(&self.path, e))?;
        self.len += part.index_bytes.len() as u64;
        self.crc.update(&part.index_bytes);
        if !part.last {
            return Ok(None);
        }
        if self.rows.ids.len() as u64 != self.row_count {
            return Err(bad(format!("{} rows came, {} were announced", self.rows.ids.len(), self.row_count)));
        }
        let crc = std::mem::take(&mut self.crc).finalize();
        if self.len != part.index_len || crc != part.index_crc32 {
            return Err(bad(format!(
                "its index file arrived as {} bytes with CRC-32 {crc:08x}, not {} bytes with {:08x}",
                self.len, part.index_len, part.index_crc32
            )));
        }
        self.file.sync_all().map_err(|e| ClusterError::io(&self.path, e))?;
        let spec = part.index.ok_or_else(|| bad("its last part names no index".into()))?;
        Ok(Some(ReceivedSegment {
            rows: std::mem::take(&mut self.rows),
            delete_ts: std::mem::take(&mut self.delete_ts),
            index_file: self.path.clone(),
            spec,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ann::AnnIndex;
    use crate::collection::{Collection, Write};
    use crate::schema::{IndexKind, Metric};
    use crate::shard::ShardOptions;
    use crate::ts::HybridClock;
    use crate::wal::{SyncPolicy, WalOptions};

    const DIM: usize = 4;
    const HNSW: IndexKind = IndexKind::Hnsw { m: 8, ef_construction: 40 };

    fn open(dir: &Path, index: IndexKind, clock: &HybridClock) -> Collection {
        let opts = ShardOptions { wal: WalOptions { sync: SyncPolicy::Always, segment_bytes: 1 << 20 }, seal_rows: 1_000_000 };
        let schema = Schema::new("c".into(), DIM, Metric::L2, index, 1, vec![]).unwrap();
        Collection::open(1, 1, schema, dir, &opts, clock).unwrap().0
    }

    fn live_ids(c: &Collection) -> Vec<i64> {
        let mut out = Vec::new();
        c.shards()[0].scan(Ts::MAX - 1, None, |rows, off| out.push(rows.ids[off]));
        out.sort_unstable();
        out
    }

    fn delete(c: &Collection, clock: &HybridClock, id: i64) {
        c.write(clock, Write::DeleteIds(vec![id]), &mut Vec::new()).unwrap();
    }

    /// A leader's shard with one indexed sealed segment of ids 0..50 (3 deleted before the
    /// snapshot, 4 after it), and the segment's parts as a snapshot at that point sends them.
    fn leader_parts(dir: &Path) -> (Ts, Vec<rp::SnapshotSegment>) {
        let clock = HybridClock::new();
        let c = open(dir, HNSW, &clock);
        let vectors: Vec<f32> = (0..50 * DIM).map(|i| (i as f32 * 0.37).sin()).collect();
        c.write(&clock, Write::Insert { ids: (0..50).collect(), vectors, rows: vec![vec![]; 50] }, &mut Vec::new()).unwrap();
        let shard = &c.shards()[0];
        let seg = shard.seal_growing().unwrap();
        seg.set_index(Arc::new(AnnIndex::build(HNSW, Metric::L2, DIM, &seg.rows.vectors).unwrap()));
        delete(&c, &clock, 3);
        let snap = c.serviceable_ts(&clock);
        delete(&c, &clock, 4);
        let schema = c.schema();
        let segments = shard.shippable_segments(&schema, snap);
        assert_eq!(segments.len(), 1);
        let mut parts = Vec::new();
        assert!(
            send_segment(shard, &schema, &segments[0], snap, |p| {
                parts.push(p);
                true
            })
            .unwrap()
        );
        (snap, parts)
    }

    fn receive(dir: &Path, parts: Vec<rp::SnapshotSegment>) -> Result<ReceivedSegment, ClusterError> {
        let mut receiver = SegmentReceiver::new(dir, &parts[0])?;
        let n = parts.len();
        for (i, p) in parts.into_iter().enumerate() {
            if let Some(seg) = receiver.take(p)? {
                assert_eq!(i, n - 1, "complete only at the last part");
                return Ok(seg);
            }
        }
        panic!("the segment never completed")
    }

    #[test]
    fn a_sealed_segment_travels_with_its_index_and_its_deletes_survive_a_restart() {
        let (lead, alt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (snap, parts) = leader_parts(lead.path());
        assert!(parts.last().unwrap().index_len > 0);
        let want: Vec<i64> = (0..50).filter(|&i| i != 3).collect();
        {
            let clock = HybridClock::new();
            let c = open(alt.path(), HNSW, &clock);
            let shard = &c.shards()[0];
            shard.set_following(true);
            let seg = receive(shard.dir(), parts).unwrap();
            let mut jobs = Vec::new();
            assert!(c.install_snapshot_segment(&clock, 0, snap, seg, &mut jobs).unwrap());
            assert!(jobs.is_empty(), "the index came with the segment: nothing to build");
            assert_eq!(live_ids(&c), want, "3 was deleted at the snapshot; 4's delete comes later, on the stream");
            let segs = shard.sealed_segments();
            assert!(segs.len() == 1 && segs[0].index().is_some());
            let plan = crate::segment::SearchPlan {
                queries: segs[0].rows.vector(DIM, 7),
                dim: DIM,
                k: 1,
                metric: Metric::L2,
                filter: None,
                knobs: crate::ann::Knobs { nprobe: 8, ef_search: 16 },
                snapshot: snap,
            };
            assert_eq!(shard.search(&plan).unwrap()[0][0].1, 7, "the shipped index answers");
        }
        // Nothing but the manifest and the segment's files hold it: the alternative's durable ts
        // is still 0, yet the leader's delete of 3 must be kept across a restart. A file an
        // interrupted snapshot left behind goes at the start.
        let leftover = alt.path().join("shard-0").join("seg-incoming-9.tmp");
        std::fs::write(&leftover, b"half an index").unwrap();
        let clock = HybridClock::new();
        let c = open(alt.path(), HNSW, &clock);
        assert!(!leftover.exists(), "a leftover of an interrupted snapshot is removed");
        assert_eq!(live_ids(&c), want);
        assert!(c.shards()[0].sealed_segments()[0].index().is_some(), "the index file was loaded, not rebuilt");
    }

    #[test]
    fn a_damaged_or_mismatched_segment_is_refused_or_indexed_here() {
        let (lead, alt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (snap, parts) = leader_parts(lead.path());
        let mut bad = parts.clone();
        bad.last_mut().unwrap().index_crc32 ^= 1;
        let e = receive(alt.path(), bad).unwrap_err().to_string();
        assert!(e.contains("CRC-32"), "{e}");
        let mut short = parts.clone();
        short[0].row_count += 1;
        let e = receive(alt.path(), short).unwrap_err().to_string();
        assert!(e.contains("51 were announced"), "{e}");

        // An alternative whose collection has another index (changed on the leader since):
        // the rows load, and the segment is queued for an index build here.
        let clock = HybridClock::new();
        let c = open(alt.path(), IndexKind::Flat, &clock);
        c.shards()[0].set_following(true);
        let seg = receive(c.shards()[0].dir(), parts).unwrap();
        let file = seg.index_file.clone();
        let mut jobs = Vec::new();
        assert!(!c.install_snapshot_segment(&clock, 0, snap, seg, &mut jobs).unwrap());
        assert_eq!(jobs.len(), 0, "rows go to the growing segment (seal_rows is large here)");
        assert_eq!(live_ids(&c), (0..50).filter(|&i| i != 3).collect::<Vec<_>>());
        assert!(!file.exists(), "the unusable index file is removed");
    }

    #[test]
    fn a_segment_whose_columns_disagree_changes_nothing() {
        let (lead, alt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (snap, parts) = leader_parts(lead.path());
        // Its own index (installed whole) and another one (loaded as rows): both check.
        for index in [HNSW, IndexKind::Flat] {
            let clock = HybridClock::new();
            let c = open(&alt.path().join(index.to_string()), index, &clock);
            c.shards()[0].set_following(true);
            let mut seg = receive(c.shards()[0].dir(), parts.clone()).unwrap();
            seg.delete_ts.pop();
            let e = c.install_snapshot_segment(&clock, 0, snap, seg, &mut Vec::new()).unwrap_err().to_string();
            assert!(e.contains("a segment of 50 rows came with 49 delete timestamps, not 50"), "{index}: {e}");
            assert!(live_ids(&c).is_empty() && c.shards()[0].sealed_segments().is_empty(), "{index}: nothing was loaded");
        }
    }
}
