//! A collection: its schema and its shards. Writes that span shards are validated as a whole and
//! carry one timestamp; reads take a snapshot at the collection's serviceable ts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use parking_lot::RwLock;
use tandem_proto::storage::v1 as st;

use crate::error::{ClusterError, Result};
use crate::filter::Filter;
use crate::replication::ReceivedSegment;
use crate::schema::{IndexKind, Metric, Schema};
use crate::segment::{Row, Sealed};
use crate::shard::{LogMeta, Recovering, Shard, ShardOp, ShardOptions, live_segment_rows, op_from_record};
use crate::ts::{HybridClock, Ts, physical_ms};
use crate::wal::Lsn;

/// A validated write, ready to be split over shards.
#[derive(Debug)]
pub enum Write {
    Insert { ids: Vec<i64>, vectors: Vec<f32>, rows: Vec<Row> },
    Upsert { ids: Vec<i64>, vectors: Vec<f32>, rows: Vec<Row> },
    DeleteIds(Vec<i64>),
    DeleteFilter(Filter),
}

pub struct Collection {
    pub id: u64,
    pub created_ts: Ts,
    schema: RwLock<Arc<Schema>>,
    shards: Vec<Arc<Shard>>,
    dir: PathBuf,
    dropped: AtomicBool,
}

impl std::fmt::Debug for Collection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Collection({}, {})", self.id, self.schema.read().name)
    }
}

/// What a write did: its ts, rows changed, and the WAL position of each shard's part.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub ts: Ts,
    pub count: u64,
    pub lsns: Vec<(usize, Lsn)>,
}

/// Segments that need an index built, by shard.
pub type IndexJobs = Vec<(usize, Arc<Sealed>)>;

/// Which shard holds an id. A fixed mix of the id's bits (Fibonacci hashing): stable across
/// versions and processes, because replication partitions follow shards.
pub fn shard_of(id: i64, shards: usize) -> usize {
    (((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % shards as u64) as usize
}

impl Collection {
    pub fn open(
        id: u64,
        created_ts: Ts,
        schema: Schema,
        dir: &Path,
        opts: &ShardOptions,
        clock: &HybridClock,
    ) -> Result<(Collection, IndexJobs)> {
        let loaded =
            (0..schema.shards).map(|i| Shard::load(i, &dir.join(format!("shard-{i}")), &schema, opts)).collect::<Result<Vec<_>>>()?;
        let aborted = abort_incomplete_writes(&schema.name, &loaded)?;
        let mut shards = Vec::new();
        let mut jobs = Vec::new();
        for (i, (rec, aborted)) in loaded.into_iter().zip(aborted).enumerate() {
            let (shard, needs) = rec.replay(&schema, &aborted, clock)?;
            jobs.extend(needs.into_iter().map(|s| (i, s)));
            shards.push(Arc::new(shard));
        }
        let c = Collection {
            id,
            created_ts,
            schema: RwLock::new(Arc::new(schema)),
            shards,
            dir: dir.to_path_buf(),
            dropped: AtomicBool::new(false),
        };
        Ok((c, jobs))
    }

    pub fn schema(&self) -> Arc<Schema> {
        self.schema.read().clone()
    }

    pub fn set_schema(&self, schema: Schema) {
        *self.schema.write() = Arc::new(schema);
    }

    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn mark_dropped(&self) {
        self.dropped.store(true, Ordering::Release);
    }

    pub fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }

    /// Logs and applies a write; blocking (fsync). Returns (ts, rows changed). Either every
    /// shard's part is validated and logged or, on a validation error, nothing changes.
    pub fn write(&self, clock: &HybridClock, write: Write, jobs: &mut IndexJobs) -> Result<WriteOutcome> {
        let schema = self.schema();
        let n = self.shards.len();
        let mut guards: Vec<_> = match &write {
            Write::DeleteFilter(_) => (0..n).collect::<Vec<_>>(),
            Write::Insert { ids, .. } | Write::Upsert { ids, .. } | Write::DeleteIds(ids) => {
                let mut touched: Vec<usize> = ids.iter().map(|&id| shard_of(id, n)).collect();
                touched.sort_unstable();
                touched.dedup();
                touched
            }
        }
        .into_iter()
        // Always in shard order, so two multi-shard writes cannot deadlock.
        .map(|i| (i, self.shards[i].lock_state()))
        .collect();

        let mut parts: BTreeMap<usize, ShardOp> = BTreeMap::new();
        match write {
            Write::Insert { ids, vectors, rows } => {
                let mut existing = Vec::new();
                for (_, g) in &guards {
                    existing.extend(g.existing(&ids));
                }
                if !existing.is_empty() {
                    existing.sort_unstable();
                    let shown: Vec<String> = existing.iter().take(10).map(|i| i.to_string()).collect();
                    return Err(ClusterError::AlreadyExists(format!(
                        "{} id(s) already exist in collection {:?}: {}{} (use upsert to replace rows)",
                        existing.len(),
                        schema.name,
                        shown.join(", "),
                        if existing.len() > 10 { ", ..." } else { "" }
                    )));
                }
                split_rows(&schema, n, ids, vectors, rows, &mut parts, false);
            }
            Write::Upsert { ids, vectors, rows } => split_rows(&schema, n, ids, vectors, rows, &mut parts, true),
            Write::DeleteIds(ids) => {
                for id in ids {
                    if let ShardOp::Delete { ids } = parts.entry(shard_of(id, n)).or_insert(ShardOp::Delete { ids: vec![] }) {
                        ids.push(id);
                    }
                }
            }
            Write::DeleteFilter(filter) => {
                for (i, g) in &guards {
                    let ids = g.matching_live(&filter);
                    if !ids.is_empty() {
                        parts.insert(*i, ShardOp::Delete { ids });
                    }
                }
            }
        }
        if parts.is_empty() {
            return Ok(WriteOutcome { ts: clock.now(), count: 0, lsns: Vec::new() });
        }
        let participants: Vec<u32> = if parts.len() > 1 { parts.keys().map(|&i| i as u32).collect() } else { Vec::new() };
        let mut pendings: Vec<_> = parts.keys().map(|&i| (i, self.shards[i].lock_pending())).collect();
        let ts = clock.now();
        let mut total = 0;
        let mut lsns = Vec::with_capacity(parts.len());
        let mut sealed = Vec::new();
        for ((i, op), (_, pending)) in parts.into_iter().zip(pendings.iter_mut()) {
            let st = &mut guards.iter_mut().find(|(g, _)| *g == i).expect("locked above").1;
            let (lsn, count) = self.shards[i].append_and_apply(
                st,
                pending,
                &schema,
                LogMeta { ts, participants: &participants, source_lsn: 0 },
                op,
                &mut sealed,
            )?;
            jobs.extend(sealed.drain(..).map(|s| (i, s)));
            lsns.push((i, lsn));
            total += count;
        }
        drop(pendings);
        drop(guards);
        for &(i, lsn) in &lsns {
            self.shards[i].finish(lsn)?;
        }
        Ok(WriteOutcome { ts, count: total, lsns })
    }

    /// Waits until the transport has acknowledged every record of a write (ack policy
    /// `exported`). Cancel-safe.
    pub async fn wait_exported(&self, lsns: &[(usize, Lsn)], deadline: Instant) -> Result<()> {
        for &(i, lsn) in lsns {
            let mut w = self.shards[i].exported_watch();
            let wait = w.wait_for(|&e| e >= lsn);
            match tokio::time::timeout_at(deadline.into(), wait).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(ClusterError::Unavailable("the exporter stopped".into())),
                Err(_) => {
                    return Err(ClusterError::Unavailable(format!(
                        "the write is durable on the leader but the transport has not acknowledged it yet (shard {i}, position {lsn}); it will be exported, retry reads with its token"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Alternative: applies one change from the leader's stream of `shard`, logged with its
    /// position (so apply and checkpoint are one atomic step) and the leader's ts. Returns
    /// false for a position already applied (redelivery). Blocking.
    pub fn apply_replicated(&self, clock: &HybridClock, shard: usize, lsn: Lsn, ts: Ts, op: ShardOp, jobs: &mut IndexJobs) -> Result<bool> {
        let applied = self.append_replicated(clock, shard, Some(lsn), ts, op, jobs)?;
        if applied {
            self.shards[shard].follow_to(ts);
        }
        Ok(applied)
    }

    /// Alternative: applies consecutive changes of `shard`'s stream, `(position, ts, op)` in
    /// order, with one WAL fsync for all of them (the cost of applying one at a time). Positions
    /// already applied are skipped. Returns how many leading changes were handled (applied or
    /// skipped) and the error that stopped the rest, if any: the changes before it are durable
    /// and applied either way. Blocking.
    pub fn apply_replicated_batch(
        &self,
        clock: &HybridClock,
        shard: usize,
        changes: Vec<(Lsn, Ts, ShardOp)>,
        jobs: &mut IndexJobs,
    ) -> (usize, Result<()>) {
        let schema = self.schema();
        let Some(sh) = self.shards.get(shard) else {
            return (0, Err(ClusterError::invalid(format!("shard {shard} of collection {:?} does not exist", schema.name))));
        };
        let mut handled = 0;
        let mut last_wal = None;
        let mut max_ts = 0;
        let mut failure = None;
        {
            let mut st = sh.lock_state();
            if !sh.is_following() {
                return (0, Err(not_following(&schema.name, shard)));
            }
            let mut pending = sh.lock_pending();
            let mut sealed = Vec::new();
            for (lsn, ts, op) in changes {
                if lsn <= sh.source_lsn() {
                    handled += 1;
                    continue;
                }
                clock.observe(ts);
                let meta = LogMeta { ts, participants: &[], source_lsn: lsn };
                match sh.append_and_apply(&mut st, &mut pending, &schema, meta, op, &mut sealed) {
                    Ok((wal_lsn, _)) => {
                        last_wal = Some(wal_lsn);
                        max_ts = max_ts.max(ts);
                        handled += 1;
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            jobs.extend(sealed.into_iter().map(|s| (shard, s)));
        }
        if let Some(wal_lsn) = last_wal {
            // Visible first, durable second: the log this came from already holds it (see
            // `Shard::serviceable_ts`), so readers need not wait for the local fsync.
            sh.follow_to(max_ts);
            if let Err(e) = sh.finish(wal_lsn) {
                // Nothing of the batch is locally durable: report it at its first change.
                return (0, Err(e));
            }
        }
        (handled, failure.map_or(Ok(()), Err))
    }

    /// Alternative bootstrap: loads snapshot rows (with their own insert ts) into `shard`
    /// without moving its stream position; the bootstrap records the position once the whole
    /// snapshot is in. Blocking.
    pub fn load_snapshot_rows(&self, clock: &HybridClock, shard: usize, ts: Ts, op: ShardOp, jobs: &mut IndexJobs) -> Result<()> {
        self.append_replicated(clock, shard, None, ts, op, jobs).map(|_| ())
    }

    /// Alternative bootstrap: adds a sealed segment that a snapshot at `snapshot` brought with
    /// its index file, without rebuilding the index (see `Shard::install_segment`). If this
    /// collection's index is not the segment's (it changed on the leader since), the segment's
    /// live rows are loaded as snapshot rows instead and indexed here. Returns whether the
    /// index was loaded. Blocking.
    pub fn install_snapshot_segment(
        &self,
        clock: &HybridClock,
        shard: usize,
        snapshot: Ts,
        seg: ReceivedSegment,
        jobs: &mut IndexJobs,
    ) -> Result<bool> {
        let ReceivedSegment { rows, delete_ts, index_file: index, spec } = seg;
        let schema = self.schema();
        let sh = self
            .shards
            .get(shard)
            .ok_or_else(|| ClusterError::invalid(format!("shard {shard} of collection {:?} does not exist", schema.name)))?;
        if !sh.is_following() {
            return Err(not_following(&schema.name, shard));
        }
        clock.observe(snapshot);
        if IndexKind::from_proto(Some(&spec))? == schema.index && Metric::from_proto(spec.metric)? == schema.metric {
            return sh.install_segment(&schema, snapshot, rows, delete_ts, &index).map(|()| true);
        }
        let _ = std::fs::remove_file(&index);
        let batch = live_segment_rows(&schema, rows, &delete_ts)?;
        let op = op_from_record(&schema, st::wal_record::Op::Upsert(batch))?.expect("data op");
        self.load_snapshot_rows(clock, shard, snapshot, op, jobs).map(|()| false)
    }

    /// Logs and applies a change from the leader with the leader's ts. With `source` (a stream
    /// position) it is skipped when already applied and the position is recorded with it;
    /// without, the shard's position is left alone. Returns whether it was applied.
    fn append_replicated(
        &self,
        clock: &HybridClock,
        shard: usize,
        source: Option<Lsn>,
        ts: Ts,
        op: ShardOp,
        jobs: &mut IndexJobs,
    ) -> Result<bool> {
        let schema = self.schema();
        let sh = self
            .shards
            .get(shard)
            .ok_or_else(|| ClusterError::invalid(format!("shard {shard} of collection {:?} does not exist", schema.name)))?;
        let mut st = sh.lock_state();
        if !sh.is_following() {
            return Err(not_following(&schema.name, shard));
        }
        if source.is_some_and(|lsn| lsn <= sh.source_lsn()) {
            return Ok(false);
        }
        let mut pending = sh.lock_pending();
        clock.observe(ts);
        let mut sealed = Vec::new();
        let meta = LogMeta { ts, participants: &[], source_lsn: source.unwrap_or(0) };
        let (wal_lsn, _) = sh.append_and_apply(&mut st, &mut pending, &schema, meta, op, &mut sealed)?;
        drop(pending);
        drop(st);
        jobs.extend(sealed.into_iter().map(|s| (shard, s)));
        sh.finish(wal_lsn)?;
        Ok(true)
    }

    /// The ts of the newest change a read at `snapshot` sees (the collection's creation at
    /// least), or `snapshot` itself when newer changes are already applied. A read reply's
    /// session token carries this rather than the snapshot: a later read at any ts >= it sees
    /// exactly the same data, so the token keeps read-your-writes and monotonic reads, yet an
    /// alternative can serve it as soon as it has applied that change instead of waiting for its
    /// clock to reach the leader's newest snapshot (a whole tick on an idle leader).
    pub fn newest_change_visible_at(&self, snapshot: Ts) -> Ts {
        let newest = self.shards.iter().map(|s| s.last_applied_ts()).max().unwrap_or(0).max(self.created_ts);
        if newest <= snapshot { newest } else { snapshot }
    }

    /// Every change with ts <= this is applied on every shard.
    pub fn serviceable_ts(&self, clock: &HybridClock) -> Ts {
        self.shards.iter().map(|s| s.serviceable_ts(clock)).min().unwrap_or_else(|| clock.peek())
    }

    /// Every change with ts <= the returned value is in every shard's own log (see
    /// `Shard::logged_ts`): the bound of local feeds and of query nodes' loads.
    pub fn logged_ts(&self, clock: &HybridClock) -> Ts {
        self.shards.iter().map(|s| s.logged_ts(clock)).min().unwrap_or_else(|| clock.peek())
    }

    /// Waits until the collection can serve a read at `guarantee`, then returns the snapshot to
    /// read at (>= guarantee). Cancel-safe: it only waits.
    pub async fn wait_serviceable(&self, clock: &HybridClock, guarantee: Ts, deadline: Instant) -> Result<Ts> {
        for shard in &self.shards {
            loop {
                let notified = shard.advanced.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let s = shard.serviceable_ts(clock);
                if s >= guarantee {
                    break;
                }
                if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                    let lag_ms = physical_ms(guarantee).saturating_sub(physical_ms(s));
                    return Err(ClusterError::Lagging {
                        message: format!(
                            "collection {:?} shard {} is serviceable up to ts {s}, {lag_ms} ms behind the requested ts {guarantee}",
                            self.schema.read().name,
                            shard.index,
                        ),
                        lag_ms,
                    });
                }
            }
        }
        Ok(self.serviceable_ts(clock).max(guarantee))
    }

    /// Rows visible at `snapshot` for the given ids, in request order (missing ids skipped).
    pub fn get(&self, ids: &[i64], snapshot: Ts) -> Vec<(i64, Vec<f32>, Row)> {
        let n = self.shards.len();
        ids.iter().filter_map(|&id| self.shards[shard_of(id, n)].get(id, snapshot).map(|(v, r)| (id, v, r))).collect()
    }

    pub fn payloads(&self, ids: &[i64], snapshot: Ts) -> HashMap<i64, Row> {
        self.get(ids, snapshot).into_iter().map(|(id, _, r)| (id, r)).collect()
    }
}

/// A write that touched several shards is logged as one record per shard, fsynced separately;
/// a crash between those fsyncs leaves some parts on disk and not others. Such a write was
/// never acknowledged, and applying only its surviving parts would expose a partial write, so
/// recovery aborts it (durably, before anything new is written) on every shard that holds a
/// part. Returns the aborted timestamps per shard.
fn abort_incomplete_writes(collection: &str, loaded: &[Recovering]) -> Result<Vec<HashSet<Ts>>> {
    let tails = loaded.iter().map(|r| r.summarize()).collect::<Result<Vec<_>>>()?;
    let mut aborted: Vec<HashSet<Ts>> = tails.iter().map(|t| t.aborted.clone()).collect();
    for tail in &tails {
        for (ts, participants) in &tail.multi {
            let complete = participants.iter().all(|&p| {
                let p = p as usize;
                p < loaded.len() && (tails[p].present.contains(ts) || loaded[p].covers(*ts))
            });
            if complete {
                continue;
            }
            for &p in participants {
                let p = p as usize;
                if p < loaded.len() && tails[p].present.contains(ts) && aborted[p].insert(*ts) {
                    loaded[p].abort(*ts)?;
                }
            }
            tracing::warn!(collection, ts, ?participants, "aborted a multi-shard write that did not reach every shard before a crash");
        }
    }
    Ok(aborted)
}

fn split_rows(
    schema: &Schema,
    n: usize,
    ids: Vec<i64>,
    vectors: Vec<f32>,
    rows: Vec<Row>,
    parts: &mut BTreeMap<usize, ShardOp>,
    upsert: bool,
) {
    let dim = schema.dim;
    for (i, (id, row)) in ids.into_iter().zip(rows).enumerate() {
        let part = parts.entry(shard_of(id, n)).or_insert_with(|| {
            if upsert {
                ShardOp::Upsert { ids: vec![], vectors: vec![], rows: vec![], row_ts: vec![] }
            } else {
                ShardOp::Insert { ids: vec![], vectors: vec![], rows: vec![], row_ts: vec![] }
            }
        });
        if let ShardOp::Insert { ids, vectors: v, rows, .. } | ShardOp::Upsert { ids, vectors: v, rows, .. } = part {
            ids.push(id);
            v.extend_from_slice(&vectors[i * dim..(i + 1) * dim]);
            rows.push(row);
        }
    }
}

/// A replicated change reached a shard that leads now (promoted while the change was on its way).
fn not_following(collection: &str, shard: usize) -> ClusterError {
    ClusterError::Unavailable(format!("shard {shard} of collection {collection:?} leads now: it applies no replicated change"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{IndexKind, Metric};
    use crate::wal::{SyncPolicy, Wal, WalOptions};

    fn opts() -> ShardOptions {
        ShardOptions { wal: WalOptions { sync: SyncPolicy::Always, segment_bytes: 1 << 20 }, seal_rows: 1000 }
    }

    fn open(dir: &Path) -> Collection {
        let schema = Schema::new("c".into(), 2, Metric::L2, IndexKind::Flat, 2, vec![]).unwrap();
        Collection::open(1, 1, schema, dir, &opts(), &HybridClock::new()).unwrap().0
    }

    fn ids(c: &Collection) -> Vec<i64> {
        let mut out = Vec::new();
        for s in c.shards() {
            s.scan(Ts::MAX - 1, None, |rows, off| out.push(rows.ids[off]));
        }
        out.sort_unstable();
        out
    }

    fn insert(c: &Collection, clock: &HybridClock, ids: Vec<i64>) {
        let n = ids.len();
        c.write(clock, Write::Insert { ids, vectors: vec![0.5; n * 2], rows: vec![vec![]; n] }, &mut Vec::new()).unwrap();
    }

    /// A crash between the fsyncs of a multi-shard write's parts must not leave the surviving
    /// part applied: recovery aborts the whole write, durably, and keeps later writes.
    #[test]
    fn recovery_aborts_a_multi_shard_write_missing_a_part() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            // two ids on different shards
            let a = (0..).find(|&i| shard_of(i, 2) == 0).unwrap();
            let b = (0..).find(|&i| shard_of(i, 2) == 1).unwrap();
            (a, b)
        };
        let a2 = (a + 1..).find(|&i| shard_of(i, 2) == 0).unwrap();
        {
            let c = open(dir.path());
            let clock = HybridClock::new();
            insert(&c, &clock, vec![a, b]);
            insert(&c, &clock, vec![a2]);
            assert_eq!(ids(&c), {
                let mut v = vec![a, b, a2];
                v.sort();
                v
            });
        }
        // Simulate the crash: shard 1's part of the first write never reached its disk.
        {
            let wal = Wal::open(&dir.path().join("shard-1").join("wal"), opts().wal).unwrap();
            assert_eq!(wal.last_lsn(), 1);
            wal.truncate_after(1).unwrap();
        }
        for _ in 0..2 {
            let c = open(dir.path());
            assert_eq!(ids(&c), vec![a2], "the partial write must vanish, the later one stay");
        }
    }

    /// An alternative's batch: applied in order with the leader's ts and positions (one fsync),
    /// positions already applied are skipped, and a reopen resumes after the last one.
    #[test]
    fn replicated_batch_applies_in_order_and_skips_applied_positions() {
        let dir = tempfile::tempdir().unwrap();
        let ids0: Vec<i64> = (0..).filter(|&i| shard_of(i, 2) == 0).take(3).collect();
        let ins = |id: i64| ShardOp::Insert { ids: vec![id], vectors: vec![0.5; 2], rows: vec![vec![]], row_ts: vec![] };
        {
            let c = open(dir.path());
            c.shards()[0].set_following(true);
            let clock = HybridClock::new();
            let base = clock.now() + 1000;
            let (n, r) = c.apply_replicated_batch(&clock, 0, vec![(5, base, ins(ids0[0])), (6, base + 1, ins(ids0[1]))], &mut Vec::new());
            r.unwrap();
            assert_eq!(n, 2);
            assert_eq!(c.shards()[0].source_lsn(), 6);
            assert_eq!(c.shards()[0].serviceable_ts(&clock), base + 1, "serviceable up to the batch's last ts");
            // A redelivery of 6 is skipped; 7 deletes the first row.
            let batch = vec![(6, base + 1, ins(ids0[2])), (7, base + 2, ShardOp::Delete { ids: vec![ids0[0]] })];
            let (n, r) = c.apply_replicated_batch(&clock, 0, batch, &mut Vec::new());
            r.unwrap();
            assert_eq!(n, 2);
            assert_eq!(ids(&c), vec![ids0[1]]);
            assert!(c.apply_replicated_batch(&clock, 5, vec![], &mut Vec::new()).1.is_err(), "no shard 5");
        }
        let c = open(dir.path());
        assert_eq!(c.shards()[0].source_lsn(), 7);
        assert_eq!(ids(&c), vec![ids0[1]]);
    }

    /// A following shard's local log covers only what its own fsync acknowledged: a change
    /// applied and visible (the serviceable ts moves with the leader's stream) but not yet
    /// durable here holds the local bound (what query nodes are fed up to) just below it.
    #[test]
    fn a_following_shards_local_log_bound_waits_for_its_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path());
        let (sh, clock, schema) = (&c.shards()[0], HybridClock::new(), c.schema());
        sh.set_following(true);
        let base = clock.now() + 1000;
        sh.follow_to(base);
        assert_eq!((sh.serviceable_ts(&clock), sh.logged_ts(&clock)), (base, base));
        let op = ShardOp::Insert { ids: vec![0], vectors: vec![0.5; 2], rows: vec![vec![]], row_ts: vec![] };
        let lsn = {
            let (mut st, mut pending) = (sh.lock_state(), sh.lock_pending());
            let meta = LogMeta { ts: base + 10, participants: &[], source_lsn: 1 };
            sh.append_and_apply(&mut st, &mut pending, &schema, meta, op, &mut Vec::new()).unwrap().0
        };
        sh.follow_to(base + 20);
        assert_eq!(sh.serviceable_ts(&clock), base + 20, "visible before the local fsync");
        assert_eq!(sh.logged_ts(&clock), base + 9, "the local log does not hold the change at base + 10 yet");
        sh.finish(lsn).unwrap();
        assert_eq!(sh.logged_ts(&clock), base + 20);
    }

    #[test]
    fn shard_of_spreads_sequential_ids() {
        let mut counts = [0usize; 4];
        for id in 0..40_000 {
            counts[shard_of(id, 4)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        assert_eq!(shard_of(-5, 1), 0);
    }
}
