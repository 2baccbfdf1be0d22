//! A shard: one ordered change log (its WAL) and the segments it fills.
//!
//! Write path (driven by `Collection`, which locks every shard a request touches in index order
//! so a multi-shard write is validated as a whole and gets one timestamp):
//!
//! ```text
//!  lock state ─► validate ─► lock pending ─► ts = clock.now() ─► WAL append (to the OS)
//!     ─► pending.push(lsn, ts) ─► apply to segments ─► unlock ─► fsync (group commit)
//!     ─► pop pending up to the durable LSN ─► serviceable ts advances ─► ack
//! ```
//!
//! The *serviceable ts* is "every change with ts <= it is applied and durable": just below the
//! oldest pending write, or the clock's current time when nothing is pending. Reads take it as
//! their snapshot, so a read never sees a write that a crash could still lose, and a Strong read
//! (guarantee = the clock's time when it arrives) waits only for writes already in flight.
//!
//! Checkpoint: once a sealed segment's index is built, its data and index files are written and
//! the manifest (segments, tombstones, `replay_from_lsn`) replaces the old one atomically; WAL
//! files wholly below `replay_from_lsn` are deleted. Recovery loads the manifest's segments and
//! replays the WAL from there; replay is idempotent (an insert of a live id replaces it, a delete
//! of a deleted row does nothing), so records that the manifest already reflects are harmless.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use prost::Message;
use rayon::prelude::*;
use tandem_proto::storage::v1 as st;
use tandem_proto::v1 as pb;

use crate::ann::AnnIndex;
use crate::error::{ClusterError, Result};
use crate::filter::Filter;
use crate::fsio;
use crate::schema::{IndexKind, Metric, Schema, rows_to_payloads};
use crate::segment::{Growing, LIVE, Row, Rows, Sealed, SearchPlan, SegmentId, TopK, merge_topk};
use crate::term::StreamTerm;
use crate::ts::{HybridClock, Ts};
use crate::wal::{Lsn, SyncPolicy, Wal, WalOptions};

#[derive(Debug, Clone)]
pub struct ShardOptions {
    pub wal: WalOptions,
    /// A growing segment is sealed when it holds this many rows.
    pub seal_rows: usize,
}

/// One shard's part of a write.
#[derive(Debug, Clone)]
pub enum ShardOp {
    /// `row_ts` is empty (rows take the write's ts) or one insert ts per row (snapshot loads).
    Insert {
        ids: Vec<i64>,
        vectors: Vec<f32>,
        rows: Vec<Row>,
        row_ts: Vec<Ts>,
    },
    Upsert {
        ids: Vec<i64>,
        vectors: Vec<f32>,
        rows: Vec<Row>,
        row_ts: Vec<Ts>,
    },
    Delete {
        ids: Vec<i64>,
    },
}

/// How a record is logged: its ts, the shards of its write, and (on an alternative) the leader
/// position it applies.
#[derive(Debug, Clone, Copy)]
pub struct LogMeta<'a> {
    pub ts: Ts,
    pub participants: &'a [u32],
    pub source_lsn: Lsn,
}

/// Recently acknowledged (lsn, ts) pairs kept for `lsn_at`: a snapshot at ts S must name the
/// last record with ts <= S.
const RECENT_ACKED: usize = 4096;

/// A subscriber that has not renewed its retention lease for this long loses it, so a vanished
/// alternative cannot make the leader keep its WAL forever.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
struct Loc {
    seg: SegmentId,
    off: u32,
}

pub struct ShardState {
    growing: Growing,
    sealed: BTreeMap<SegmentId, Arc<Sealed>>,
    /// Where the newest live version of each id is.
    locs: HashMap<i64, Loc>,
    next_segment_id: SegmentId,
    /// Highest ts applied; when a read's snapshot is at or above it, `locs` describes the
    /// snapshot exactly and point lookups need no scan.
    last_applied_ts: Ts,
}

#[derive(Debug, Default)]
pub struct Pending {
    queue: VecDeque<(Lsn, Ts)>,
    /// The newest (lsn, ts) known durable and popped from the queue.
    durable: (Lsn, Ts),
    recent: VecDeque<(Lsn, Ts)>,
}

pub struct Shard {
    pub index: u32,
    dir: PathBuf,
    wal: Wal,
    sync: SyncPolicy,
    seal_rows: usize,
    state: RwLock<ShardState>,
    pending: Mutex<Pending>,
    /// Woken whenever the serviceable ts advances.
    pub advanced: tokio::sync::Notify,
    /// Per persisted segment, the index (kind and metric) its file holds.
    checkpoint_lock: Mutex<HashMap<SegmentId, (IndexKind, Metric)>>,
    /// The acknowledged-durable LSN, for change streams to wait on.
    acked: tokio::sync::watch::Sender<Lsn>,
    /// Writes aborted by recovery: their records stay in the WAL until truncated and must not
    /// be streamed.
    aborted: HashSet<Ts>,
    /// On an alternative: the last leader position applied, and the ts up to which every
    /// change is applied (advanced by applies and time ticks).
    source_lsn: std::sync::atomic::AtomicU64,
    follow_ts: std::sync::atomic::AtomicU64,
    following: std::sync::atomic::AtomicBool,
    /// Retention leases of subscribers: the WAL is kept from the lowest leased position.
    leases: Mutex<HashMap<String, (Lsn, std::time::Instant)>>,
    /// Leases dropped because their subscriber stopped renewing them.
    lease_expiries: std::sync::atomic::AtomicU64,
    /// Leader with a broker transport: the highest position the transport has acknowledged
    /// (the `exported` ack policy waits on it).
    exported: tokio::sync::watch::Sender<Lsn>,
    /// Where this node's leadership term starts in the shard's stream (see `term.rs`).
    term: parking_lot::RwLock<StreamTerm>,
    /// Leading: the stream position this leadership started from (the term's base after a
    /// promotion, the log's end when it resumed its own streams). Events carry it as
    /// `epoch_base`. Not durable: every leadership sets it before its feeds start (`u64::MAX`
    /// until then: unknown).
    lead_base: std::sync::atomic::AtomicU64,
    /// The epoch of the leader whose change this shard applied last (0: unknown, as after a
    /// restart or a reload; this node's own epoch while it leads and after). Not durable: it
    /// only serves to notice, within this process's life, a change applied from a fenced
    /// leader at a position the next leader reused (see `ChangeEvent.epoch_base`).
    applied_epoch: std::sync::atomic::AtomicU64,
    /// The newest snapshot ts whose segments `install_segment` added since the last wipe: their
    /// tombstones, the leader's, are durable up to it (see `write_manifest`).
    installed_upto: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shard({}, {})", self.index, self.dir.display())
    }
}

/// Segments that were sealed and now need an index.
pub type NeedsIndex = Vec<Arc<Sealed>>;

fn seg_data_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(format!("seg-{id}.data"))
}

fn seg_index_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(format!("seg-{id}.index"))
}

/// A shard whose segments are loaded but whose WAL tail is not replayed yet: the collection
/// first checks, across shards, that every multi-shard write in the tails is complete.
pub struct Recovering {
    shard: Shard,
    manifest_max_ts: Ts,
    manifest_source_lsn: Lsn,
    replay_from: Lsn,
    needs_index: NeedsIndex,
}

/// What a WAL tail holds of multi-shard writes.
#[derive(Debug, Default)]
pub struct TailSummary {
    /// (ts, participants) of every multi-shard record.
    pub multi: Vec<(Ts, Vec<u32>)>,
    pub present: HashSet<Ts>,
    pub aborted: HashSet<Ts>,
}

impl Recovering {
    pub fn summarize(&self) -> Result<TailSummary> {
        let mut out = TailSummary::default();
        let mut failure = None;
        self.shard.wal.read_from(self.replay_from, |lsn, payload| match st::WalRecord::decode(payload) {
            Ok(rec) => {
                if let Some(st::wal_record::Op::Abort(a)) = &rec.op {
                    out.aborted.insert(a.ts);
                } else if !rec.participants.is_empty() {
                    out.present.insert(rec.ts);
                    out.multi.push((rec.ts, rec.participants));
                }
                true
            }
            Err(e) => {
                failure = Some(ClusterError::Corrupt(format!("wal record {lsn} of {}: {e}", self.shard.dir.display())));
                false
            }
        })?;
        failure.map_or(Ok(out), Err)
    }

    /// Whether this shard's checkpoint covers `ts`: its part of any write at or below it was
    /// durable (and so is in the segments or still in the WAL).
    pub fn covers(&self, ts: Ts) -> bool {
        ts <= self.manifest_max_ts
    }

    /// Durably records that the write at `ts` is aborted.
    pub fn abort(&self, ts: Ts) -> Result<()> {
        let rec = st::WalRecord { ts, op: Some(st::wal_record::Op::Abort(st::AbortWrite { ts })), participants: vec![], source_lsn: 0 };
        let lsn = self.shard.wal.append_nosync(&rec.encode_to_vec())?;
        self.shard.wal.sync_to(lsn)?;
        Ok(())
    }

    /// Replays the WAL tail, skipping aborted writes.
    pub fn replay(self, schema: &Schema, aborted: &HashSet<Ts>, clock: &HybridClock) -> Result<(Shard, NeedsIndex)> {
        let Recovering { mut shard, manifest_max_ts, manifest_source_lsn, replay_from, mut needs_index } = self;
        let mut max_ts = manifest_max_ts;
        let mut source_lsn = manifest_source_lsn;
        let mut failure = None;
        {
            let mut state = shard.state.write();
            shard.wal.read_from(replay_from, |lsn, payload| {
                let rec = match decode_record(schema, payload) {
                    Ok(r) => r,
                    Err(e) => {
                        failure = Some(ClusterError::Corrupt(format!("wal record {lsn} of {}: {e}", shard.dir.display())));
                        return false;
                    }
                };
                max_ts = max_ts.max(rec.0);
                source_lsn = source_lsn.max(rec.2);
                if let Some(op) = rec.1
                    && !aborted.contains(&rec.0)
                {
                    shard.apply(&mut state, schema.dim, lsn, rec.0, op, &mut needs_index);
                }
                true
            })?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        clock.observe(max_ts);
        shard.pending.lock().durable = (shard.wal.last_lsn(), max_ts);
        shard.acked.send_replace(shard.wal.last_lsn());
        shard.aborted = aborted.clone();
        shard.source_lsn.store(source_lsn, Ordering::Release);
        shard.follow_ts.store(max_ts, Ordering::Release);
        Ok((shard, needs_index))
    }
}

impl Shard {
    /// Opens (or creates) the shard in `dir` and loads the manifest's segments; the WAL tail is
    /// replayed by `Recovering::replay`.
    pub fn load(index: u32, dir: &Path, schema: &Schema, opts: &ShardOptions) -> Result<Recovering> {
        fsio::create_dir(dir)?;
        // Files a crash left half-written (an index being saved or received): no manifest
        // names them.
        for e in std::fs::read_dir(dir).map_err(|e| ClusterError::io(dir, e))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("seg-") && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let manifest = match fsio::read_checked(&dir.join("manifest"))? {
            Some(b) => st::ShardManifest::decode(b.as_slice())
                .map_err(|e| ClusterError::Corrupt(format!("manifest of shard {}: {e}", dir.display())))?,
            None => st::ShardManifest::default(),
        };
        let mut needs_index = Vec::new();
        let mut sealed = BTreeMap::new();
        let mut manifest_index = HashMap::new();
        let mut locs = HashMap::new();
        for r in &manifest.segments {
            let seg = load_segment(dir, schema, r)?;
            let stored_kind = r.index.as_ref().map(|i| IndexKind::from_proto(Some(i))).transpose()?;
            // Files from before metrics could change name none: they were built for the
            // schema's metric, which could not change then.
            let stored_metric = match r.index.as_ref().map_or(0, |i| i.metric) {
                0 => schema.metric,
                m => Metric::from_proto(m)?,
            };
            let index_file = seg_index_path(dir, r.id);
            if stored_kind == Some(schema.index) && stored_metric == schema.metric && index_file.exists() {
                seg.set_index(Arc::new(AnnIndex::load(&index_file, schema.index, schema.metric)?));
                manifest_index.insert(r.id, (schema.index, schema.metric));
            } else {
                needs_index.push(seg.clone());
            }
            for off in 0..seg.len() {
                if seg.delete_ts(off) == LIVE {
                    locs.insert(seg.rows.ids[off], Loc { seg: seg.id, off: off as u32 });
                }
            }
            sealed.insert(seg.id, seg);
        }
        let next_segment_id = manifest.next_segment_id.max(1);
        let state = ShardState {
            growing: Growing::new(next_segment_id),
            sealed,
            locs,
            next_segment_id: next_segment_id + 1,
            last_applied_ts: manifest.max_ts,
        };
        let wal = Wal::open(&dir.join("wal"), opts.wal.clone())?;
        let replay_from = manifest.replay_from_lsn.max(wal.first_lsn());
        let shard = Shard {
            index,
            dir: dir.to_path_buf(),
            sync: opts.wal.sync,
            wal,
            seal_rows: opts.seal_rows.max(1),
            state: RwLock::new(state),
            pending: Mutex::new(Pending::default()),
            advanced: tokio::sync::Notify::new(),
            checkpoint_lock: Mutex::new(manifest_index),
            acked: tokio::sync::watch::Sender::new(0),
            aborted: HashSet::new(),
            source_lsn: Default::default(),
            follow_ts: Default::default(),
            following: Default::default(),
            lead_base: std::sync::atomic::AtomicU64::new(u64::MAX),
            applied_epoch: Default::default(),
            installed_upto: Default::default(),
            leases: Mutex::new(HashMap::new()),
            lease_expiries: Default::default(),
            exported: tokio::sync::watch::Sender::new(0),
            term: parking_lot::RwLock::new(StreamTerm::load(&dir.join("term"))?),
        };
        Ok(Recovering { shard, manifest_max_ts: manifest.max_ts, manifest_source_lsn: manifest.source_lsn, replay_from, needs_index })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn lock_state(&self) -> RwLockWriteGuard<'_, ShardState> {
        self.state.write()
    }

    pub fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock()
    }

    /// Logs and applies one shard's part of a write. The caller holds this shard's state and
    /// pending locks (in that order) and issued `ts` under them. Returns the record's LSN and
    /// the number of rows changed. Nothing is changed when the WAL append fails.
    pub fn append_and_apply(
        &self,
        st: &mut ShardState,
        pending: &mut Pending,
        schema: &Schema,
        meta: LogMeta<'_>,
        op: ShardOp,
        needs_index: &mut NeedsIndex,
    ) -> Result<(Lsn, u64)> {
        let rec = encode_record(schema, &meta, &op);
        let lsn = self.wal.append_nosync(&rec)?;
        pending.queue.push_back((lsn, meta.ts));
        let n = self.apply(st, schema.dim, lsn, meta.ts, op, needs_index);
        if meta.source_lsn > 0 {
            self.source_lsn.fetch_max(meta.source_lsn, Ordering::AcqRel);
        }
        Ok((lsn, n))
    }

    /// Forgets everything this shard holds (an alternative about to load a snapshot into a
    /// shard whose earlier bootstrap was interrupted, or whose log position the leader no
    /// longer has). Blocking.
    pub fn wipe(&self) -> Result<()> {
        let mut manifest_index = self.checkpoint_lock.lock();
        let mut st = self.state.write();
        let next = st.next_segment_id + 1;
        *st = ShardState {
            growing: Growing::new(next),
            sealed: BTreeMap::new(),
            locs: HashMap::new(),
            next_segment_id: next + 1,
            last_applied_ts: 0,
        };
        let empty = st::ShardManifest { next_segment_id: next, replay_from_lsn: self.wal.last_lsn() + 1, ..Default::default() };
        fsio::write_atomic(&self.dir.join("manifest"), &empty.encode_to_vec())?;
        for e in std::fs::read_dir(&self.dir).map_err(|e| ClusterError::io(&self.dir, e))?.flatten() {
            if e.file_name().to_string_lossy().starts_with("seg-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        manifest_index.clear();
        self.wal.truncate_before(self.wal.last_lsn() + 1)?;
        self.source_lsn.store(0, Ordering::Release);
        self.follow_ts.store(0, Ordering::Release);
        self.applied_epoch.store(0, Ordering::Release);
        self.installed_upto.store(0, Ordering::Release);
        Ok(())
    }

    /// Whether this shard applies a leader's stream (an alternative's); replicated applies
    /// check it under the state lock, so none lands once a term began.
    pub fn is_following(&self) -> bool {
        self.following.load(Ordering::Acquire)
    }

    /// Alternative: the last leader position applied.
    pub fn source_lsn(&self) -> Lsn {
        self.source_lsn.load(Ordering::Acquire)
    }

    /// Alternative: every change with ts <= `ts` has been applied (from an apply or a tick).
    pub fn follow_to(&self, ts: Ts) {
        self.follow_ts.fetch_max(ts, Ordering::AcqRel);
        self.advanced.notify_waiters();
    }

    /// Switches how the serviceable ts is computed: from the local clock (leading) or from the
    /// leader's stream (following).
    pub fn set_following(&self, following: bool) {
        self.following.store(following, Ordering::Release);
    }

    /// This node's term in the shard's stream: maps local WAL positions to stream positions.
    pub fn term(&self) -> StreamTerm {
        *self.term.read()
    }

    /// Starts a leadership term: the next local record follows the last stream position this
    /// shard applied. Durable before it returns. Blocking.
    pub fn begin_term(&self) -> Result<StreamTerm> {
        // Under the state lock, which replicated applies hold: none lands after the base, and
        // the base is the position of the last one that did.
        let _st = self.state.write();
        self.set_following(false);
        let term = StreamTerm::new(self.wal.last_lsn(), self.source_lsn());
        term.save(&self.dir.join("term"))?;
        *self.term.write() = term;
        self.lead_base.store(term.stream_base, Ordering::Release);
        Ok(term)
    }

    /// Leads on from where its own log ends (it led the newest epoch and nobody led since):
    /// everything up to there is this node's and the stream's alike.
    pub fn resume_term(&self) {
        let _st = self.state.write();
        self.lead_base.store(self.term().to_stream(self.wal.last_lsn()), Ordering::Release);
    }

    /// A collection created by this leader: its streams begin with this leadership.
    pub fn begin_new_stream(&self) {
        self.lead_base.store(0, Ordering::Release);
    }

    /// Leading: the stream position this leadership started from (`ChangeEvent.epoch_base`);
    /// `None` before this process led.
    pub fn lead_base(&self) -> Option<Lsn> {
        Some(self.lead_base.load(Ordering::Acquire)).filter(|&b| b != u64::MAX)
    }

    /// The epoch of the leader whose change this shard applied last (0: unknown).
    pub fn applied_epoch(&self) -> u64 {
        self.applied_epoch.load(Ordering::Acquire)
    }

    /// Records the epoch of the leader whose change was applied last, or of this node's own
    /// leadership once it leads.
    pub fn set_applied_epoch(&self, epoch: u64) {
        self.applied_epoch.store(epoch, Ordering::Release);
    }

    /// The stream position of the newest acknowledged record (the stream's end as this node
    /// serves it).
    pub fn acked_stream_lsn(&self) -> Lsn {
        self.term().to_stream(*self.acked.borrow())
    }

    /// A watch of the acknowledged-durable LSN (change streams wait on it).
    pub fn acked_watch(&self) -> tokio::sync::watch::Receiver<Lsn> {
        self.acked.subscribe()
    }

    pub fn first_lsn(&self) -> Lsn {
        self.wal.first_lsn()
    }

    pub fn last_lsn(&self) -> Lsn {
        self.wal.last_lsn()
    }

    /// Reads acknowledged records with lsn >= `from` and ts <= `upto_ts`, in order, calling
    /// `f(lsn, record)`; stops at the first record past either bound or when `f` returns false.
    /// Records of aborted writes and abort markers are skipped. Returns the last LSN examined
    /// (passed to `f` or skipped), or `from - 1` if none.
    pub fn read_changes(&self, from: Lsn, upto_ts: Ts, max: usize, mut f: impl FnMut(Lsn, st::WalRecord) -> bool) -> Result<Lsn> {
        // The pending queue's durable position, not only the watch: `advance` pops the queue
        // (moving the serviceable ts a feed reads as its bound) before it sends the watch, and a
        // feed reading in between must still see every record its bound covers.
        let watched = *self.acked.borrow();
        let acked = watched.max(self.pending.lock().durable.0);
        let mut last = from.saturating_sub(1);
        let mut sent = 0;
        let mut failure = None;
        if from > acked {
            return Ok(last);
        }
        self.wal.read_from(from, |lsn, payload| {
            if lsn > acked || sent >= max {
                return false;
            }
            let rec = match st::WalRecord::decode(payload) {
                Ok(r) => r,
                Err(e) => {
                    failure = Some(ClusterError::Corrupt(format!("wal record {lsn} of {}: {e}", self.dir.display())));
                    return false;
                }
            };
            if matches!(rec.op, Some(st::wal_record::Op::Abort(_))) || self.aborted.contains(&rec.ts) {
                last = lsn;
                return true;
            }
            if rec.ts > upto_ts {
                return false;
            }
            last = lsn;
            sent += 1;
            f(lsn, rec)
        })?;
        failure.map_or(Ok(last), Err)
    }

    /// The LSN of the last acknowledged record with ts <= `ts` (for snapshots), if known.
    pub fn lsn_at(&self, ts: Ts) -> Option<Lsn> {
        let p = self.pending.lock();
        if ts >= p.durable.1 {
            return Some(p.durable.0);
        }
        // The newest record at or below ts; the one after it must exist (durable is above ts).
        let pos = p.recent.iter().rposition(|&(_, t)| t <= ts)?;
        Some(p.recent[pos].0)
    }

    /// Streams the rows visible at `snapshot`, except those of the sealed segments in `skip`
    /// (sent whole), in chunks of up to `chunk` rows: `f(ids, vectors, rows, insert_ts)`.
    pub fn snapshot_rows(
        &self,
        snapshot: Ts,
        skip: &HashSet<SegmentId>,
        chunk: usize,
        mut f: impl FnMut(Vec<i64>, Vec<f32>, Vec<Row>, Vec<Ts>),
    ) {
        let (mut ids, mut vectors, mut rows, mut tss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        self.scan_except(snapshot, None, skip, |r, off| {
            let dim = r.vectors.len() / r.len();
            ids.push(r.ids[off]);
            vectors.extend_from_slice(r.vector(dim, off));
            rows.push(r.payloads[off].clone());
            tss.push(r.insert_ts[off]);
            if ids.len() >= chunk {
                f(std::mem::take(&mut ids), std::mem::take(&mut vectors), std::mem::take(&mut rows), std::mem::take(&mut tss));
            }
        });
        if !ids.is_empty() {
            f(ids, vectors, rows, tss);
        }
    }

    /// The transport has acknowledged every change up to stream position `lsn`.
    pub fn set_exported(&self, lsn: Lsn) {
        let lsn = self.term().to_local(lsn);
        self.exported.send_if_modified(|v| {
            let changed = *v < lsn;
            *v = (*v).max(lsn);
            changed
        });
    }

    /// Leading: where the publisher may resume, given the stream's `end` on the transport.
    /// Past this leadership's base, the stream holds only what this node exported, and what a
    /// fenced leader exported late (its queued messages, sent on resume: the docker fault
    /// campaign saw one land before this leader's first event). Taking such a position as ours
    /// would mark our own record there exported without publishing it: an acknowledged write
    /// no subscriber ever gets. So the end is never taken past this leadership's base and what
    /// the transport acknowledged to us; at worst the broker gets again what it has, and
    /// subscribers skip positions they applied.
    pub fn resume_end(&self, end: Lsn) -> Lsn {
        match self.lead_base() {
            Some(base) => end.min(base.max(self.term().to_stream(*self.exported.borrow()))),
            None => end,
        }
    }

    pub fn exported_watch(&self) -> tokio::sync::watch::Receiver<Lsn> {
        self.exported.subscribe()
    }

    /// How many leases expired so far.
    pub fn lease_expiries(&self) -> u64 {
        self.lease_expiries.load(Ordering::Relaxed)
    }

    /// Holds the WAL from local position `lsn` for `subscriber` (renewed by every call).
    pub fn hold(&self, subscriber: &str, lsn: Lsn) {
        self.leases.lock().insert(subscriber.to_string(), (lsn, std::time::Instant::now()));
    }

    /// Live leases as (subscriber, lsn); expired ones are dropped.
    pub fn leases(&self) -> Vec<(String, Lsn)> {
        let mut l = self.leases.lock();
        let before = l.len();
        l.retain(|_, (_, at)| at.elapsed() < LEASE_TTL);
        let expired = before - l.len();
        if expired > 0 {
            // A direct subscriber that comes back later bootstraps from a snapshot; a broker
            // subscriber's lease (taken by its snapshot) was only a grace period.
            tracing::info!(shard = %self.dir.display(), expired, "retention leases expired");
            self.lease_expiries.fetch_add(expired as u64, Ordering::Relaxed);
        }
        l.iter().map(|(k, (lsn, _))| (k.clone(), *lsn)).collect()
    }

    /// Waits until the record at `lsn` is durable (per the sync policy), then advances the
    /// serviceable ts. Call without holding the shard's locks: concurrent writers share fsyncs.
    pub fn finish(&self, lsn: Lsn) -> Result<()> {
        if self.sync == SyncPolicy::Always {
            self.wal.sync_to(lsn)?;
        }
        self.advance();
        Ok(())
    }

    fn acked_lsn(&self) -> Lsn {
        match self.sync {
            SyncPolicy::Always => self.wal.durable_lsn(),
            // Under Interval/Never an ack means "written to the OS", and so does visibility.
            SyncPolicy::Interval(_) | SyncPolicy::Never => self.wal.last_lsn(),
        }
    }

    fn advance(&self) {
        let acked = self.acked_lsn();
        let mut p = self.pending.lock();
        let mut moved = false;
        while let Some(&(lsn, ts)) = p.queue.front() {
            if lsn > acked {
                break;
            }
            p.durable = (lsn, ts);
            p.queue.pop_front();
            p.recent.push_back((lsn, ts));
            if p.recent.len() > RECENT_ACKED {
                p.recent.pop_front();
            }
            moved = true;
        }
        let durable = p.durable.0;
        drop(p);
        if moved {
            self.acked.send_if_modified(|v| {
                let changed = *v < durable;
                *v = (*v).max(durable);
                changed
            });
            self.advanced.notify_waiters();
        }
    }

    /// The highest ts of a change applied to this shard (0: none yet).
    pub fn last_applied_ts(&self) -> Ts {
        self.state.read().last_applied_ts
    }

    /// Every change with ts <= the returned value is applied and durable: on a leader, in this
    /// shard's WAL; on a following shard, in the replication log it follows.
    pub fn serviceable_ts(&self, clock: &HybridClock) -> Ts {
        let p = self.pending.lock();
        if self.following.load(Ordering::Acquire) {
            // Following a leader: its stream says how far every change has been applied, and
            // the local fsync is not waited for. What makes a replicated change durable is the
            // log it came from (the leader exports only durable records; Kafka holds them with
            // acks=all): after a crash the follower resumes from its last durable position and
            // applies them again, and a SESSION reader that saw one carries a token that makes
            // it wait for that. So visibility need not pay for a local fsync (the lag would).
            return self.follow_ts.load(Ordering::Acquire);
        }
        match p.queue.front() {
            Some(&(_, ts)) => ts - 1,
            // Holding the pending lock: no writer of this shard sits between `clock.now()` and
            // its push, so every ts this shard will still apply is above `peek()`.
            None => clock.peek(),
        }
    }

    /// Every change with ts <= the returned value is in this shard's own log and acknowledged
    /// there: how far a feed of the local log (`SubscribeRequest.local`) may tick. On a leader
    /// that is the serviceable ts. A following shard's serviceable ts runs ahead of its local
    /// fsync (see `serviceable_ts`), so its local log covers only the changes before the first
    /// one still waiting for it.
    pub fn logged_ts(&self, clock: &HybridClock) -> Ts {
        let p = self.pending.lock();
        let waiting = p.queue.front().map(|&(_, ts)| ts - 1);
        if self.following.load(Ordering::Acquire) {
            let follow = self.follow_ts.load(Ordering::Acquire);
            return waiting.map_or(follow, |w| w.min(follow));
        }
        waiting.unwrap_or_else(|| clock.peek())
    }

    fn apply(&self, st: &mut ShardState, dim: usize, lsn: Lsn, ts: Ts, op: ShardOp, needs_index: &mut NeedsIndex) -> u64 {
        st.last_applied_ts = st.last_applied_ts.max(ts);
        match op {
            ShardOp::Insert { ids, vectors, rows, row_ts } | ShardOp::Upsert { ids, vectors, rows, row_ts } => {
                let n = ids.len() as u64;
                for (i, (id, row)) in ids.into_iter().zip(rows).enumerate() {
                    let ts = row_ts.get(i).copied().unwrap_or(ts);
                    // Insert was validated to hit no live id; on replay an insert may meet the
                    // version a manifest already holds, and replaces it like an upsert.
                    st.tombstone(id, ts);
                    let off = st.growing.push(lsn, i as u32, id, ts, &vectors[i * dim..(i + 1) * dim], row);
                    st.locs.insert(id, Loc { seg: st.growing.id, off });
                    if st.growing.rows.len() >= self.seal_rows {
                        needs_index.push(st.seal());
                    }
                }
                n
            }
            ShardOp::Delete { ids } => ids.into_iter().filter(|&id| st.tombstone(id, ts)).count() as u64,
        }
    }

    /// Seals the growing segment if it holds rows.
    pub fn seal_growing(&self) -> Option<Arc<Sealed>> {
        let mut st = self.state.write();
        if st.growing.rows.is_empty() { None } else { Some(st.seal()) }
    }

    pub fn sealed_segments(&self) -> Vec<Arc<Sealed>> {
        self.state.read().sealed.values().cloned().collect()
    }

    /// The sealed segments, and where the growing rows begin in the log (`None`: there are
    /// none), from one view. A proxy that sends the growing rows to a shard leader on a query
    /// node (`placement.rs`) searches exactly these sealed segments elsewhere: every row after
    /// them, in a segment sealed since or still growing, is at that position or later.
    pub fn view(&self) -> (Vec<Arc<Sealed>>, Option<(Lsn, u32)>) {
        let st = self.state.read();
        (st.sealed.values().cloned().collect(), st.growing.start())
    }

    /// Where a shard leader's growing rows must begin to cover every later search's growing
    /// rows: where they begin now, or without any, the next record's position. A record is
    /// logged and applied under the state lock held here, so every record up to the log's last
    /// is in a sealed segment then. Never a position a checkpoint may have cut from the log
    /// (the one before the growing rows would be).
    pub fn growing_start(&self) -> (Lsn, u32) {
        let st = self.state.read();
        st.growing.start().unwrap_or_else(|| (self.wal.last_lsn() + 1, 0))
    }

    pub fn search(&self, plan: &SearchPlan<'_>) -> Result<TopK> {
        self.search_part(plan, true, |_| true)
    }

    /// Searches the growing segment (when `growing`) and the sealed segments `sealed` picks,
    /// from one view of the shard: a proxy leaves out the sealed segments query nodes search
    /// (`placement.rs`), and a segment sealed meanwhile is then searched here, not missed.
    pub fn search_part(&self, plan: &SearchPlan<'_>, growing: bool, sealed: impl Fn(SegmentId) -> bool) -> Result<TopK> {
        let (growing, sealed) = {
            let st = self.state.read();
            let g = if growing { st.growing.search(plan) } else { vec![Vec::new(); plan.nq()] };
            (g, st.sealed.values().filter(|s| sealed(s.id)).cloned().collect::<Vec<_>>())
        };
        let mut parts: Vec<TopK> = sealed.par_iter().map(|s| s.search(plan)).collect::<Result<_>>()?;
        parts.push(growing);
        Ok(merge_topk(plan.metric, plan.k, plan.nq(), parts))
    }

    /// Calls `f(rows, off)` for every row visible at `snapshot` that passes `filter`.
    pub fn scan(&self, snapshot: Ts, filter: Option<&Filter>, f: impl FnMut(&Rows, usize)) {
        self.scan_except(snapshot, filter, &HashSet::new(), f)
    }

    fn scan_except(&self, snapshot: Ts, filter: Option<&Filter>, skip: &HashSet<SegmentId>, mut f: impl FnMut(&Rows, usize)) {
        let st = self.state.read();
        for seg in st.sealed.values().filter(|s| !skip.contains(&s.id)) {
            for off in 0..seg.len() {
                if seg.visible(off, snapshot) && filter.is_none_or(|fl| fl.matches(seg.rows.ids[off], &seg.rows.payloads[off])) {
                    f(&seg.rows, off);
                }
            }
        }
        let g = &st.growing;
        for off in 0..g.rows.len() {
            if g.visible(off, snapshot) && filter.is_none_or(|fl| fl.matches(g.rows.ids[off], &g.rows.payloads[off])) {
                f(&g.rows, off);
            }
        }
    }

    /// The version of `id` visible at `snapshot`, as (vector, payload row).
    pub fn get(&self, id: i64, snapshot: Ts) -> Option<(Vec<f32>, Row)> {
        let st = self.state.read();
        let dim = |rows: &Rows| if rows.is_empty() { 0 } else { rows.vectors.len() / rows.len() };
        let take = |rows: &Rows, off: usize| {
            let d = dim(rows);
            (rows.vector(d, off).to_vec(), rows.payloads[off].clone())
        };
        if snapshot >= st.last_applied_ts {
            let loc = st.locs.get(&id)?;
            return if loc.seg == st.growing.id {
                st.growing.visible(loc.off as usize, snapshot).then(|| take(&st.growing.rows, loc.off as usize))
            } else {
                let seg = st.sealed.get(&loc.seg)?;
                seg.visible(loc.off as usize, snapshot).then(|| take(&seg.rows, loc.off as usize))
            };
        }
        // Writes newer than the snapshot were applied: the version it sees may be an older one.
        for seg in st.sealed.values() {
            for off in 0..seg.len() {
                if seg.rows.ids[off] == id && seg.visible(off, snapshot) {
                    return Some(take(&seg.rows, off));
                }
            }
        }
        (0..st.growing.rows.len())
            .find(|&off| st.growing.rows.ids[off] == id && st.growing.visible(off, snapshot))
            .map(|off| take(&st.growing.rows, off))
    }

    /// Writes the files of newly indexed segments and a new manifest, then drops WAL files the
    /// manifest makes unnecessary. Serialised per shard.
    pub fn checkpoint(&self, schema: &Schema) -> Result<()> {
        let mut manifest_index = self.checkpoint_lock.lock();
        // Read before the sync: every record it covers is then durable.
        let source_lsn = self.source_lsn();
        // Make everything written so far durable, so the watermark below covers it.
        self.wal.sync_to(self.wal.last_lsn())?;
        self.advance();
        let sealed = self.sealed_segments();
        let mut written = Vec::new();
        for seg in &sealed {
            let Some(index) = seg.index() else { continue };
            if manifest_index.get(&seg.id) == Some(&(index.kind(), index.metric())) {
                continue;
            }
            if !seg.is_persisted() {
                write_segment(&self.dir, schema, seg)?;
            }
            let path = seg_index_path(&self.dir, seg.id);
            let tmp = path.with_extension("index.tmp");
            index.save(&tmp)?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| ClusterError::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| ClusterError::io(&path, e))?;
            written.push((seg.clone(), (index.kind(), index.metric())));
        }
        if written.is_empty() && !sealed.iter().any(|s| !s.is_persisted()) {
            return Ok(());
        }
        fsio::sync_dir(&self.dir)?;
        let kinds = |id: SegmentId| written.iter().find(|(s, _)| s.id == id).map(|(_, k)| *k).or_else(|| manifest_index.get(&id).copied());
        let manifest = self.write_manifest(kinds, source_lsn)?;
        for (seg, kind) in written {
            seg.set_persisted(true);
            manifest_index.insert(seg.id, kind);
        }
        // Subscribers still reading older positions keep the files they need.
        let keep_from = self.leases().into_iter().map(|(_, lsn)| lsn).fold(manifest.replay_from_lsn, Lsn::min);
        self.wal.truncate_before(keep_from)?;
        Ok(())
    }

    /// Writes a new manifest: every sealed segment `kinds` names an index file for (with its
    /// tombstones that are durable), and the WAL position replay starts from. The caller holds
    /// the checkpoint lock.
    fn write_manifest(&self, kinds: impl Fn(SegmentId) -> Option<(IndexKind, Metric)>, source_lsn: Lsn) -> Result<st::ShardManifest> {
        let (durable_lsn, durable_ts) = self.pending.lock().durable;
        // Tombstones a snapshot brought with its segments are the leader's, at or below the
        // snapshot: durable there, and the bootstrap starts over if this one is interrupted.
        let tombstones_upto = durable_ts.max(self.installed_upto.load(Ordering::Acquire));
        let manifest = {
            let st = self.state.read();
            let mut replay_from = durable_lsn + 1;
            if !st.growing.rows.is_empty() {
                replay_from = replay_from.min(st.growing.first_lsn);
            }
            let mut segments = Vec::new();
            for seg in st.sealed.values() {
                let Some((kind, metric)) = kinds(seg.id) else {
                    replay_from = replay_from.min(seg.first_lsn);
                    continue;
                };
                let tombstones = (0..seg.len())
                    .filter_map(|off| {
                        let ts = seg.delete_ts(off);
                        // Deletes not yet durable are left to WAL replay: a crash must not
                        // persist a delete that was never acknowledged.
                        (ts != LIVE && ts <= tombstones_upto).then_some(st::Tombstone { offset: off as u32, ts })
                    })
                    .collect();
                let index = pb::IndexSpec { metric: metric.to_proto() as i32, ..kind.to_proto() };
                segments.push(st::SegmentRef { id: seg.id, rows: seg.len() as u64, index: Some(index), tombstones });
            }
            st::ShardManifest {
                segments,
                replay_from_lsn: replay_from,
                max_ts: durable_ts,
                next_segment_id: st.next_segment_id,
                source_lsn,
            }
        };
        fsio::write_atomic(&self.dir.join("manifest"), &manifest.encode_to_vec())?;
        Ok(manifest)
    }

    /// Sealed segments a snapshot at `snapshot` can send with their index: indexed as the schema
    /// asks, every row inserted at or below `snapshot`, and some row live at it.
    pub fn shippable_segments(&self, schema: &Schema, snapshot: Ts) -> Vec<Arc<Sealed>> {
        self.sealed_segments()
            .into_iter()
            .filter(|seg| {
                seg.is_indexed_as(schema.index, schema.metric)
                    && seg.max_insert_ts() <= snapshot
                    && (0..seg.len()).any(|off| seg.visible(off, snapshot))
            })
            .collect()
    }

    /// An open handle on the index file of `seg` (a sealed segment with an index), for a
    /// snapshot to send, and the index it holds: the checkpointed file when it holds the
    /// segment's index, else a temporary copy written now (unlinked once open, so nothing is
    /// left behind).
    pub fn index_file(&self, seg: &Sealed) -> Result<(std::fs::File, IndexKind, Metric)> {
        let no_index = || ClusterError::Internal(format!("segment {} has no index to send", seg.id));
        let (kind, metric) = seg.indexed_as().ok_or_else(no_index)?;
        {
            // Under the checkpoint lock: the file cannot be replaced between the check and the
            // open, and once open the handle keeps what it read.
            let manifest_index = self.checkpoint_lock.lock();
            let path = seg_index_path(&self.dir, seg.id);
            if manifest_index.get(&seg.id) == Some(&(kind, metric)) {
                let file = std::fs::File::open(&path).map_err(|e| ClusterError::io(&path, e))?;
                return Ok((file, kind, metric));
            }
        }
        // Not checkpointed yet, so in memory (an index is released only once its file is).
        let index = seg.searchable_index().ok_or_else(no_index)?;
        let (kind, metric) = (index.kind(), index.metric());
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = self.dir.join(format!("seg-{}.snapshot-{}.tmp", seg.id, NEXT.fetch_add(1, Ordering::Relaxed)));
        let saved = index.save(&tmp).and_then(|()| std::fs::File::open(&tmp).map_err(|e| ClusterError::io(&tmp, e)));
        let _ = std::fs::remove_file(&tmp);
        Ok((saved?, kind, metric))
    }

    /// Drops the index of sealed segment `id` from memory when the checkpointed file holds it
    /// (`Sealed::release_index`; query nodes hold copies of the segment). Returns whether it
    /// did.
    pub fn release_index(&self, id: SegmentId) -> bool {
        let Some(seg) = self.state.read().sealed.get(&id).cloned() else { return false };
        // Under the checkpoint lock: the file cannot be replaced between the check and the
        // release, and a checkpoint never rewrites a released index's file (it writes only
        // indexes in memory that its manifest does not list).
        let manifest_index = self.checkpoint_lock.lock();
        let Some(&on_disk) = manifest_index.get(&id) else { return false };
        seg.is_persisted() && seg.release_index(seg_index_path(&self.dir, id), on_disk)
    }

    /// Alternative bootstrap: adds a sealed segment a snapshot at `snapshot` brought with its
    /// index, which it takes from `index_file` (renamed into place, loaded without a rebuild).
    /// `rows` are in offset order, `delete_ts` one per row (`LIVE` when live at the snapshot).
    /// Its data and index files are written and listed in the manifest at once: nothing of it
    /// depends on the WAL. Blocking.
    pub fn install_segment(&self, schema: &Schema, snapshot: Ts, rows: st::RowBatch, delete_ts: Vec<Ts>, index_file: &Path) -> Result<()> {
        let mut manifest_index = self.checkpoint_lock.lock();
        let id = {
            let mut st = self.state.write();
            st.next_segment_id += 1;
            st.next_segment_id - 1
        };
        let seg = received_segment(schema, id, rows, delete_ts, index_file)?;
        write_segment(&self.dir, schema, &seg)?;
        let path = seg_index_path(&self.dir, id);
        std::fs::rename(index_file, &path).map_err(|e| ClusterError::io(&path, e))?;
        fsio::sync_dir(&self.dir)?;
        {
            let mut st = self.state.write();
            for off in 0..seg.len() {
                if seg.delete_ts(off) == LIVE {
                    st.locs.insert(seg.rows.ids[off], Loc { seg: id, off: off as u32 });
                }
            }
            st.last_applied_ts = st.last_applied_ts.max(snapshot);
            st.sealed.insert(id, seg.clone());
        }
        self.installed_upto.fetch_max(snapshot, Ordering::AcqRel);
        manifest_index.insert(id, (schema.index, schema.metric));
        self.write_manifest(|id| manifest_index.get(&id).copied(), self.source_lsn())?;
        seg.set_persisted(true);
        Ok(())
    }

    pub fn wal_disk_bytes(&self) -> u64 {
        self.wal.disk_bytes()
    }

    pub fn stats(&self) -> ShardStats {
        let st = self.state.read();
        ShardStats {
            live_rows: st.locs.len() as u64,
            growing: (st.growing.id, st.growing.rows.len() as u64, (st.growing.rows.len() - st.growing.live_rows()) as u64),
            memory_bytes: (st.growing.rows.memory_bytes() + st.sealed.values().map(|s| s.memory_bytes()).sum::<usize>()) as u64,
            sealed: st.sealed.values().cloned().collect(),
        }
    }
}

pub struct ShardStats {
    pub live_rows: u64,
    /// (segment id, rows, deleted)
    pub growing: (SegmentId, u64, u64),
    pub sealed: Vec<Arc<Sealed>>,
    pub memory_bytes: u64,
}

impl ShardState {
    /// Marks the live version of `id` deleted at `ts`. Returns whether there was one.
    fn tombstone(&mut self, id: i64, ts: Ts) -> bool {
        let Some(loc) = self.locs.remove(&id) else { return false };
        if loc.seg == self.growing.id {
            self.growing.delete_ts[loc.off as usize] = ts;
        } else if let Some(seg) = self.sealed.get(&loc.seg) {
            seg.delete(loc.off as usize, ts);
        }
        true
    }

    fn seal(&mut self) -> Arc<Sealed> {
        let next = Growing::new(self.next_segment_id);
        self.next_segment_id += 1;
        let g = std::mem::replace(&mut self.growing, next);
        let seg = Arc::new(Sealed::from_growing(g));
        self.sealed.insert(seg.id, seg.clone());
        seg
    }

    /// The ids among `ids` that are live now (for insert validation).
    pub fn existing(&self, ids: &[i64]) -> Vec<i64> {
        ids.iter().copied().filter(|id| self.locs.contains_key(id)).collect()
    }

    /// Ids of live rows that pass `filter` (delete by filter resolves ids before logging).
    pub fn matching_live(&self, filter: &Filter) -> Vec<i64> {
        let mut out = Vec::new();
        for (&id, loc) in &self.locs {
            let row = if loc.seg == self.growing.id {
                &self.growing.rows.payloads[loc.off as usize]
            } else {
                match self.sealed.get(&loc.seg) {
                    Some(s) => &s.rows.payloads[loc.off as usize],
                    None => continue,
                }
            };
            if filter.matches(id, row) {
                out.push(id);
            }
        }
        out.sort_unstable();
        out
    }
}

fn encode_record(schema: &Schema, meta: &LogMeta<'_>, op: &ShardOp) -> Vec<u8> {
    let batch = |ids: &[i64], vectors: &[f32], rows: &[Row], row_ts: &[Ts]| st::RowBatch {
        ids: ids.to_vec(),
        vectors: vectors.to_vec(),
        payloads: rows_to_payloads(schema, rows),
        insert_ts: row_ts.to_vec(),
    };
    let op = match op {
        ShardOp::Insert { ids, vectors, rows, row_ts } => st::wal_record::Op::Insert(batch(ids, vectors, rows, row_ts)),
        ShardOp::Upsert { ids, vectors, rows, row_ts } => st::wal_record::Op::Upsert(batch(ids, vectors, rows, row_ts)),
        ShardOp::Delete { ids } => st::wal_record::Op::Delete(st::DeleteIds { ids: ids.clone() }),
    };
    st::WalRecord { ts: meta.ts, op: Some(op), participants: meta.participants.to_vec(), source_lsn: meta.source_lsn }.encode_to_vec()
}

/// A logged or replicated operation as a `ShardOp` (`None` for records that change nothing).
pub fn op_from_record(schema: &Schema, op: st::wal_record::Op) -> Result<Option<ShardOp>> {
    Ok(Some(match op {
        st::wal_record::Op::Insert(b) => {
            let (ids, vectors, rows, row_ts) = decode_batch(schema, b)?;
            ShardOp::Insert { ids, vectors, rows, row_ts }
        }
        st::wal_record::Op::Upsert(b) => {
            let (ids, vectors, rows, row_ts) = decode_batch(schema, b)?;
            ShardOp::Upsert { ids, vectors, rows, row_ts }
        }
        st::wal_record::Op::Delete(d) => ShardOp::Delete { ids: d.ids },
        st::wal_record::Op::Abort(_) => return Ok(None),
    }))
}

/// A logged batch decoded: ids, vectors, payload rows, insert timestamps (empty: not logged).
type DecodedBatch = (Vec<i64>, Vec<f32>, Vec<Row>, Vec<Ts>);

fn decode_batch(schema: &Schema, b: st::RowBatch) -> Result<DecodedBatch> {
    if b.vectors.len() != b.ids.len() * schema.dim {
        return Err(ClusterError::Corrupt(format!("{} vectors floats for {} ids of dim {}", b.vectors.len(), b.ids.len(), schema.dim)));
    }
    if !b.insert_ts.is_empty() && b.insert_ts.len() != b.ids.len() {
        return Err(ClusterError::Corrupt(format!("{} insert timestamps for {} ids", b.insert_ts.len(), b.ids.len())));
    }
    if !b.payloads.is_empty() && b.payloads.len() != b.ids.len() {
        return Err(ClusterError::Corrupt(format!("{} payloads for {} ids", b.payloads.len(), b.ids.len())));
    }
    let rows = if b.payloads.is_empty() {
        vec![vec![None; schema.fields.len()]; b.ids.len()]
    } else {
        b.payloads.iter().map(|p| schema.row_from_payload(Some(p))).collect::<Result<_>>()?
    };
    Ok((b.ids, b.vectors, rows, b.insert_ts))
}

/// The rows of a segment sent whole that are live at its snapshot (`delete_ts` is `LIVE`), as
/// one batch with their insert ts: what is loaded as rows when its index cannot be used.
pub fn live_segment_rows(schema: &Schema, rows: st::RowBatch, delete_ts: &[Ts]) -> Result<st::RowBatch> {
    check_segment_rows(schema, &rows, delete_ts)?;
    let live: Vec<usize> = (0..rows.ids.len()).filter(|&i| delete_ts[i] == LIVE).collect();
    let dim = schema.dim;
    Ok(st::RowBatch {
        ids: live.iter().map(|&i| rows.ids[i]).collect(),
        vectors: live.iter().flat_map(|&i| rows.vectors[i * dim..(i + 1) * dim].iter().copied()).collect(),
        payloads: if rows.payloads.is_empty() { Vec::new() } else { live.iter().map(|&i| rows.payloads[i].clone()).collect() },
        insert_ts: live.iter().map(|&i| rows.insert_ts[i]).collect(),
    })
}

/// Checks that a segment sent whole has one vector, insert ts, delete ts (and payload, if any)
/// per id.
fn check_segment_rows(schema: &Schema, rows: &st::RowBatch, delete_ts: &[Ts]) -> Result<()> {
    let n = rows.ids.len();
    let lens = [
        ("vector floats", rows.vectors.len(), n * schema.dim),
        ("insert timestamps", rows.insert_ts.len(), n),
        ("delete timestamps", delete_ts.len(), n),
    ];
    if let Some((what, got, want)) = lens.into_iter().find(|&(_, got, want)| got != want) {
        return Err(ClusterError::invalid(format!("a segment of {n} rows came with {got} {what}, not {want}")));
    }
    if !rows.payloads.is_empty() && rows.payloads.len() != n {
        return Err(ClusterError::invalid(format!("a segment of {n} rows came with {} payloads", rows.payloads.len())));
    }
    Ok(())
}

/// (ts, operation, source lsn); `None` for an abort marker.
fn decode_record(schema: &Schema, payload: &[u8]) -> Result<(Ts, Option<ShardOp>, Lsn)> {
    let rec = st::WalRecord::decode(payload).map_err(|e| ClusterError::Corrupt(e.to_string()))?;
    let op = rec.op.ok_or_else(|| ClusterError::Corrupt("record without an operation".into()))?;
    Ok((rec.ts, op_from_record(schema, op)?, rec.source_lsn))
}

/// A sealed segment `id` put together from a snapshot's parts (see `replication::send_segment`):
/// `rows` in offset order, one delete ts per row (`LIVE`: live), and its index loaded from
/// `index_file` without a rebuild. Refused, changing nothing, when the columns or the index
/// disagree with the rows. Blocking.
pub fn received_segment(schema: &Schema, id: SegmentId, rows: st::RowBatch, delete_ts: Vec<Ts>, index_file: &Path) -> Result<Arc<Sealed>> {
    check_segment_rows(schema, &rows, &delete_ts)?;
    let (ids, vectors, payloads, insert_ts) = decode_batch(schema, rows)?;
    let index = AnnIndex::load(index_file, schema.index, schema.metric)?;
    if index.len() != ids.len() {
        return Err(ClusterError::invalid(format!("an index of {} vectors for a segment of {} rows", index.len(), ids.len())));
    }
    let growing = Growing { id, first_lsn: 0, first_row: 0, rows: Rows::new(ids, insert_ts, vectors, payloads, schema.dim), delete_ts };
    let seg = Arc::new(Sealed::from_growing(growing));
    seg.set_index(Arc::new(index));
    Ok(seg)
}

fn write_segment(dir: &Path, schema: &Schema, seg: &Sealed) -> Result<()> {
    let data = st::SegmentData {
        id: seg.id,
        dim: schema.dim as u32,
        ids: seg.rows.ids.clone(),
        insert_ts: seg.rows.insert_ts.clone(),
        vectors: seg.rows.vectors.clone(),
        payloads: rows_to_payloads(schema, &seg.rows.payloads),
    };
    fsio::write_atomic(&seg_data_path(dir, seg.id), &data.encode_to_vec())
}

fn load_segment(dir: &Path, schema: &Schema, r: &st::SegmentRef) -> Result<Arc<Sealed>> {
    let path = seg_data_path(dir, r.id);
    let bytes = fsio::read_checked(&path)?
        .ok_or_else(|| ClusterError::Corrupt(format!("{} is listed in the manifest but missing", path.display())))?;
    let d = st::SegmentData::decode(bytes.as_slice()).map_err(|e| ClusterError::Corrupt(format!("{}: {e}", path.display())))?;
    let n = d.ids.len();
    if d.insert_ts.len() != n || d.vectors.len() != n * schema.dim || (!d.payloads.is_empty() && d.payloads.len() != n) {
        return Err(ClusterError::Corrupt(format!("{}: column lengths disagree", path.display())));
    }
    let payloads = if d.payloads.is_empty() {
        vec![vec![None; schema.fields.len()]; n]
    } else {
        d.payloads.iter().map(|p| schema.row_from_payload(Some(p))).collect::<Result<_>>()?
    };
    let g = Growing {
        id: d.id,
        first_lsn: 0,
        first_row: 0,
        rows: Rows::new(d.ids, d.insert_ts, d.vectors, payloads, schema.dim),
        delete_ts: vec![LIVE; n],
    };
    let seg = Arc::new(Sealed::from_growing(g));
    for t in &r.tombstones {
        if (t.offset as usize) < n {
            seg.delete(t.offset as usize, t.ts);
        }
    }
    seg.set_persisted(true);
    Ok(seg)
}
