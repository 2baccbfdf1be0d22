//! Segments: the unit of storage and search inside a shard.
//!
//! ```text
//!   insert ──► Growing ──(size threshold or Flush)──► Sealed ──(index built off the
//!              exact search                           exact search   request path)──► Indexed
//!                                                                                 faiss search
//! ```
//!
//! Visibility is by timestamp (MVCC): a row is visible at snapshot `S` when
//! `insert_ts <= S < delete_ts`. Upsert writes a tombstone on the old version and a new row at
//! the same ts, so a read at any snapshot sees exactly one version. Snapshots only ever cover
//! durable writes (see `shard.rs`), so no read can observe a write that a crash could still lose.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::ann::{AnnIndex, Bitmap, Knobs};
use crate::error::Result;
use crate::filter::{Filter, Scalar};
use crate::schema::{IndexKind, Metric};
use crate::ts::Ts;
use crate::wal::Lsn;

pub type SegmentId = u64;
pub type Row = Vec<Option<Scalar>>;

/// `delete_ts` of a row that is not deleted.
pub const LIVE: Ts = Ts::MAX;

/// How long an index read back from its file stays in memory at least (see
/// [`Sealed::release_index`]).
pub const KEEP_READ_BACK: Duration = Duration::from_secs(30);

/// Below this many passing rows (or 1/32 of the segment), a filtered search over a sealed
/// segment computes exact distances for the passing rows instead of asking faiss: it is faster
/// there, and exact, where a graph search restricted to few rows would lose recall.
const BRUTE_FORCE_ROWS: usize = 2048;

/// Columns of a segment's rows.
#[derive(Debug, Default, Clone)]
pub struct Rows {
    pub ids: Vec<i64>,
    pub insert_ts: Vec<Ts>,
    /// As inserted, whatever the metric (see [`distance`]).
    pub vectors: Vec<f32>,
    /// |vector| per row, computed once on the way in: COSINE's exact search divides by it.
    pub norms: Vec<f32>,
    pub payloads: Vec<Row>,
}

impl Rows {
    /// Rows from stored columns (`vectors` rows of `dim`), their norms computed.
    pub fn new(ids: Vec<i64>, insert_ts: Vec<Ts>, vectors: Vec<f32>, payloads: Vec<Row>, dim: usize) -> Rows {
        let norms = vectors.chunks_exact(dim.max(1)).map(norm).collect();
        Rows { ids, insert_ts, vectors, norms, payloads }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn vector(&self, dim: usize, off: usize) -> &[f32] {
        &self.vectors[off * dim..(off + 1) * dim]
    }

    pub fn memory_bytes(&self) -> usize {
        self.ids.len() * 20 + self.vectors.len() * 4 + self.payloads.iter().map(|r| r.len() * 24).sum::<usize>()
    }
}

/// Everything a segment needs to answer one search.
pub struct SearchPlan<'a> {
    pub queries: &'a [f32],
    pub dim: usize,
    pub k: usize,
    pub metric: Metric,
    pub filter: Option<&'a Filter>,
    pub knobs: Knobs,
    pub snapshot: Ts,
}

impl SearchPlan<'_> {
    pub fn nq(&self) -> usize {
        self.queries.len() / self.dim
    }

    pub fn query(&self, q: usize) -> &[f32] {
        &self.queries[q * self.dim..(q + 1) * self.dim]
    }
}

/// Per query, the best hits as (distance, id), closest first.
pub type TopK = Vec<Vec<(f32, i64)>>;

/// Sort key: smaller is better for every metric; ties go to the smaller id so results are
/// deterministic across segments, shards and replicas.
fn badness(metric: Metric, d: f32) -> f32 {
    if metric.smaller_is_closer() { d } else { -d }
}

pub fn sort_hits(metric: Metric, hits: &mut [(f32, i64)]) {
    hits.sort_by(|a, b| badness(metric, a.0).total_cmp(&badness(metric, b.0)).then(a.1.cmp(&b.1)));
}

/// Merges per-part top-k lists into one top-k list per query.
pub fn merge_topk(metric: Metric, k: usize, nq: usize, parts: Vec<TopK>) -> TopK {
    let mut out: TopK = vec![Vec::new(); nq];
    for part in parts {
        for (q, hits) in part.into_iter().enumerate() {
            out[q].extend(hits);
        }
    }
    for hits in &mut out {
        sort_hits(metric, hits);
        hits.truncate(k);
    }
    out
}

/// The distance between query `a` and stored vector `b`. For COSINE the query is normalised
/// already and the stored vector is as inserted (rows keep vectors as inserted, so a
/// collection's metric can change under them): dividing by |b| gives cosine similarity.
pub fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    distance_to(metric, a, b, if metric == Metric::Cosine { norm(b) } else { 0.0 })
}

/// [`distance`] to a stored row whose length is known (`Rows::norms`), as exact search has it.
fn distance_to(metric: Metric, a: &[f32], b: &[f32], b_norm: f32) -> f32 {
    match metric {
        Metric::L2 => l2_sq(a, b),
        Metric::Ip => dot(a, b),
        Metric::Cosine => {
            if b_norm > 0.0 {
                dot(a, b) / b_norm
            } else {
                0.0
            }
        }
    }
}

/// A vector's euclidean length.
pub fn norm(v: &[f32]) -> f32 {
    dot(v, v).sqrt()
}

/// `vectors` (rows of `dim`) scaled to unit length; zero vectors stay zero.
pub fn normalised(vectors: &[f32], dim: usize) -> Vec<f32> {
    let mut out = vectors.to_vec();
    for v in out.chunks_exact_mut(dim.max(1)) {
        let n = norm(v);
        if n > 0.0 {
            v.iter_mut().for_each(|x| *x /= n);
        }
    }
    out
}

// Eight independent accumulators let the compiler vectorise the loop (a single float sum
// cannot be reordered).
fn l2_sq(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += (x - y) * (x - y);
    }
    s
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Exact top-k over the given row offsets.
pub fn brute_force(plan: &SearchPlan<'_>, rows: &Rows, candidates: &[usize]) -> TopK {
    let mut out = Vec::with_capacity(plan.nq());
    for q in 0..plan.nq() {
        let query = plan.query(q);
        let mut heap: std::collections::BinaryHeap<Ranked> = std::collections::BinaryHeap::with_capacity(plan.k + 1);
        for &off in candidates {
            let d = distance_to(plan.metric, query, rows.vector(plan.dim, off), rows.norms[off]);
            let r = Ranked { key: badness(plan.metric, d), id: rows.ids[off], d };
            if heap.len() < plan.k {
                heap.push(r);
            } else if heap.peek().is_some_and(|worst| r < *worst) {
                heap.pop();
                heap.push(r);
            }
        }
        let mut hits: Vec<(f32, i64)> = heap.into_iter().map(|r| (r.d, r.id)).collect();
        sort_hits(plan.metric, &mut hits);
        out.push(hits);
    }
    out
}

#[derive(Debug, Clone, Copy)]
struct Ranked {
    key: f32,
    id: i64,
    d: f32,
}
impl PartialEq for Ranked {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.key.total_cmp(&o.key).then(self.id.cmp(&o.id))
    }
}

/// The segment that takes inserts. Owned by its shard's state and mutated under its lock.
#[derive(Debug)]
pub struct Growing {
    pub id: SegmentId,
    /// LSN of the first record that put a row here (0 while empty): the WAL must be kept from
    /// here until the segment is persisted.
    pub first_lsn: Lsn,
    /// The index of the first row in its record: a seal can split a record's rows between two
    /// segments, so (`first_lsn`, `first_row`) is where this segment's rows begin in the log
    /// (a shard leader on a query node searches the growing rows from there; `placement.rs`).
    pub first_row: u32,
    pub rows: Rows,
    pub delete_ts: Vec<Ts>,
}

impl Growing {
    pub fn new(id: SegmentId) -> Growing {
        Growing { id, first_lsn: 0, first_row: 0, rows: Rows::default(), delete_ts: Vec::new() }
    }

    /// Where its rows begin in the log (`None` while empty).
    pub fn start(&self) -> Option<(Lsn, u32)> {
        (!self.rows.is_empty()).then_some((self.first_lsn, self.first_row))
    }

    /// Appends row `row_in_record` of the record at `lsn`.
    pub fn push(&mut self, lsn: Lsn, row_in_record: u32, id: i64, ts: Ts, vector: &[f32], row: Row) -> u32 {
        if self.rows.is_empty() {
            self.first_lsn = lsn;
            self.first_row = row_in_record;
        }
        self.rows.ids.push(id);
        self.rows.insert_ts.push(ts);
        self.rows.vectors.extend_from_slice(vector);
        self.rows.norms.push(norm(vector));
        self.rows.payloads.push(row);
        self.delete_ts.push(LIVE);
        (self.rows.len() - 1) as u32
    }

    pub fn visible(&self, off: usize, snapshot: Ts) -> bool {
        self.rows.insert_ts[off] <= snapshot && snapshot < self.delete_ts[off]
    }

    pub fn search(&self, plan: &SearchPlan<'_>) -> TopK {
        let candidates: Vec<usize> =
            (0..self.rows.len()).filter(|&off| self.visible(off, plan.snapshot) && passes(plan.filter, &self.rows, off)).collect();
        brute_force(plan, &self.rows, &candidates)
    }

    pub fn live_rows(&self) -> usize {
        self.delete_ts.iter().filter(|&&d| d == LIVE).count()
    }
}

pub(crate) fn passes(filter: Option<&Filter>, rows: &Rows, off: usize) -> bool {
    filter.is_none_or(|f| f.matches(rows.ids[off], &rows.payloads[off]))
}

/// Where a sealed segment's index is.
#[derive(Debug)]
enum IndexSlot {
    /// Not built yet: searches are exact.
    Unbuilt,
    Loaded(Arc<AnnIndex>),
    /// Dropped from memory while every replica group's query nodes hold a copy of the segment
    /// (`placement.rs`): the checkpointed file at `path` holds it, and a search that has to run
    /// here after all (a node failed) loads it back.
    Released {
        kind: IndexKind,
        metric: Metric,
        path: PathBuf,
    },
}

/// An immutable segment. Only its tombstones and its index change, both safely shared: searches
/// run without the shard lock.
#[derive(Debug)]
pub struct Sealed {
    pub id: SegmentId,
    pub first_lsn: Lsn,
    pub rows: Rows,
    max_insert_ts: Ts,
    delete_ts: Vec<AtomicU64>,
    min_delete_ts: AtomicU64,
    deleted: AtomicUsize,
    index: RwLock<IndexSlot>,
    /// When a released index was last read back. Held while one is, so concurrent searches
    /// read it once.
    read_back: Mutex<Option<Instant>>,
    /// Data and index files written and listed in the shard manifest.
    persisted: AtomicBool,
}

impl Sealed {
    pub fn from_growing(g: Growing) -> Sealed {
        let deleted = g.delete_ts.iter().filter(|&&d| d != LIVE).count();
        let min_delete = g.delete_ts.iter().copied().min().unwrap_or(LIVE);
        Sealed {
            id: g.id,
            first_lsn: g.first_lsn,
            max_insert_ts: g.rows.insert_ts.iter().copied().max().unwrap_or(0),
            delete_ts: g.delete_ts.into_iter().map(AtomicU64::new).collect(),
            rows: g.rows,
            min_delete_ts: AtomicU64::new(min_delete),
            deleted: AtomicUsize::new(deleted),
            index: RwLock::new(IndexSlot::Unbuilt),
            read_back: Mutex::new(None),
            persisted: AtomicBool::new(false),
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn deleted(&self) -> usize {
        self.deleted.load(Ordering::Acquire)
    }

    pub fn max_insert_ts(&self) -> Ts {
        self.max_insert_ts
    }

    pub fn delete_ts(&self, off: usize) -> Ts {
        self.delete_ts[off].load(Ordering::Acquire)
    }

    /// Tombstones row `off` at `ts` unless it already is (replay is idempotent).
    pub fn delete(&self, off: usize, ts: Ts) -> bool {
        if self.delete_ts[off].compare_exchange(LIVE, ts, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.min_delete_ts.fetch_min(ts, Ordering::AcqRel);
            self.deleted.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    pub fn visible(&self, off: usize, snapshot: Ts) -> bool {
        self.rows.insert_ts[off] <= snapshot && snapshot < self.delete_ts(off)
    }

    /// The index, when it is in memory (not when it is released: see [`Sealed::indexed_as`]).
    pub fn index(&self) -> Option<Arc<AnnIndex>> {
        match &*self.index.read() {
            IndexSlot::Loaded(i) => Some(i.clone()),
            IndexSlot::Unbuilt | IndexSlot::Released { .. } => None,
        }
    }

    /// What the segment is indexed with, in memory or released to its file.
    pub fn indexed_as(&self) -> Option<(IndexKind, Metric)> {
        match &*self.index.read() {
            IndexSlot::Unbuilt => None,
            IndexSlot::Loaded(i) => Some((i.kind(), i.metric())),
            IndexSlot::Released { kind, metric, .. } => Some((*kind, *metric)),
        }
    }

    /// Whether the segment has the index a schema with `kind` and `metric` asks for, in memory
    /// or released.
    pub fn is_indexed_as(&self, kind: IndexKind, metric: Metric) -> bool {
        self.indexed_as() == Some((kind, metric))
    }

    pub fn is_released(&self) -> bool {
        matches!(&*self.index.read(), IndexSlot::Released { .. })
    }

    pub fn set_index(&self, index: Arc<AnnIndex>) {
        *self.index.write() = IndexSlot::Loaded(index);
    }

    /// Drops the index from memory when it is `on_disk`, the index the file at `path` holds
    /// (the shard checks its manifest). A search already running with it keeps it until it
    /// ends. False when it was not in memory, was another one (rebuilt meanwhile), or was read
    /// back less than [`KEEP_READ_BACK`] ago: searches that keep coming here (a query node
    /// that lags) would otherwise read it back every placement round.
    pub fn release_index(&self, path: PathBuf, on_disk: (IndexKind, Metric)) -> bool {
        if self.read_back.lock().is_some_and(|at| at.elapsed() < KEEP_READ_BACK) {
            return false;
        }
        let mut slot = self.index.write();
        let (kind, metric) = match &*slot {
            IndexSlot::Loaded(i) if (i.kind(), i.metric()) == on_disk => on_disk,
            IndexSlot::Unbuilt | IndexSlot::Loaded(_) | IndexSlot::Released { .. } => return false,
        };
        *slot = IndexSlot::Released { kind, metric, path };
        metrics::counter!("tandem_segment_index_releases_total").increment(1);
        true
    }

    /// The index to search with: the one in memory, or a released one read back from its file
    /// (blocking: call off the async runtime). A file that cannot be read leaves the index
    /// released, and the search exact: slower, never wrong.
    pub fn searchable_index(&self) -> Option<Arc<AnnIndex>> {
        if let Some(i) = self.index() {
            return Some(i);
        }
        let mut read_back = self.read_back.lock();
        let (kind, metric, path) = match &*self.index.read() {
            IndexSlot::Unbuilt => return None,
            IndexSlot::Loaded(i) => return Some(i.clone()),
            IndexSlot::Released { kind, metric, path } => (*kind, *metric, path.clone()),
        };
        let started = Instant::now();
        match AnnIndex::load(&path, kind, metric) {
            Ok(index) => {
                let index = Arc::new(index);
                let mut slot = self.index.write();
                match &*slot {
                    // Released still: nothing built a new index meanwhile, so the file held the
                    // released one (a checkpoint writes a new index only after it is set here).
                    IndexSlot::Released { .. } => *slot = IndexSlot::Loaded(index.clone()),
                    // A new index was set meanwhile, and its file may be what was just read:
                    // search with the one set.
                    IndexSlot::Loaded(set) => return Some(set.clone()),
                    IndexSlot::Unbuilt => return None,
                }
                *read_back = Some(Instant::now());
                metrics::counter!("tandem_segment_index_reloads_total").increment(1);
                tracing::debug!(segment = self.id, ms = started.elapsed().as_millis() as u64, "released index read back");
                Some(index)
            }
            Err(e) => {
                tracing::warn!(segment = self.id, error = %e, "a released index could not be read back: searching the segment exactly");
                None
            }
        }
    }

    pub fn is_persisted(&self) -> bool {
        self.persisted.load(Ordering::Acquire)
    }

    pub fn set_persisted(&self, v: bool) {
        self.persisted.store(v, Ordering::Release)
    }

    pub fn memory_bytes(&self) -> usize {
        // An index keeps its own copy of the vectors (plus graph links for HNSW).
        let index = self.index().map(|i| i.len() * self.vectors_per_row_bytes()).unwrap_or(0);
        self.rows.memory_bytes() + self.delete_ts.len() * 8 + index
    }

    fn vectors_per_row_bytes(&self) -> usize {
        if self.rows.is_empty() { 0 } else { self.rows.vectors.len() * 4 / self.rows.len() }
    }

    pub fn search(&self, plan: &SearchPlan<'_>) -> Result<TopK> {
        let n = self.len();
        let everything_visible = plan.snapshot >= self.max_insert_ts && plan.snapshot < self.min_delete_ts.load(Ordering::Acquire);
        let allow = if everything_visible && plan.filter.is_none() {
            None
        } else {
            Some(Bitmap::from_fn(n, |off| self.visible(off, plan.snapshot) && passes(plan.filter, &self.rows, off)))
        };
        // An index built for another metric (the collection's changed; its rebuild is queued)
        // answers nothing right: search exactly until the new one is swapped in.
        let indexed = self.indexed_as().is_some_and(|(_, m)| m == plan.metric);
        let exact = match (&allow, indexed) {
            (_, false) => true,
            (Some(bm), true) => bm.count() <= BRUTE_FORCE_ROWS.max(n / 32),
            (None, true) => false,
        };
        // Only now, where faiss answers: a released index is read back for it.
        let index = if exact { None } else { self.searchable_index().filter(|i| i.metric() == plan.metric) };
        if exact || index.is_none() {
            let candidates: Vec<usize> = match &allow {
                Some(bm) => (0..n).filter(|&i| bm.get(i)).collect(),
                None => (0..n).collect(),
            };
            return Ok(brute_force(plan, &self.rows, &candidates));
        }
        let index = index.expect("checked above");
        let (distances, labels) = index.search(plan.queries, plan.dim, plan.k, allow.as_ref(), plan.knobs)?;
        let mut out = Vec::with_capacity(plan.nq());
        for q in 0..plan.nq() {
            let mut hits = Vec::with_capacity(plan.k);
            for j in q * plan.k..(q + 1) * plan.k {
                let label = labels[j];
                // faiss pads with -1 when fewer than k rows qualify; and an index built before a
                // delete still holds the row, which the bitmap (when present) already excluded.
                if label < 0 || label as usize >= n {
                    continue;
                }
                hits.push((distances[j], self.rows.ids[label as usize]));
            }
            out.push(hits);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::IndexKind;

    fn growing(n: usize, dim: usize) -> Growing {
        let mut g = Growing::new(1);
        for i in 0..n {
            let v: Vec<f32> = (0..dim).map(|j| ((i * 31 + j * 7) % 97) as f32).collect();
            g.push(1 + i as u64, 0, i as i64, 10 + i as u64, &v, vec![]);
        }
        g
    }

    fn plan<'a>(q: &'a [f32], dim: usize, k: usize, snapshot: Ts) -> SearchPlan<'a> {
        SearchPlan { queries: q, dim, k, metric: Metric::L2, filter: None, knobs: Knobs { nprobe: 8, ef_search: 64 }, snapshot }
    }

    #[test]
    fn mvcc_visibility_in_growing_and_sealed() {
        let dim = 4;
        let mut g = growing(100, dim);
        let q = g.rows.vector(dim, 50).to_vec();
        // row 50 inserted at ts 60; deleted at ts 500
        g.delete_ts[50] = 500;
        assert_ne!(g.search(&plan(&q, dim, 1, 59))[0][0].1, 50, "not yet inserted at 59");
        assert_eq!(g.search(&plan(&q, dim, 1, 60))[0][0].1, 50);
        assert_eq!(g.search(&plan(&q, dim, 1, 499))[0][0].1, 50);
        assert_ne!(g.search(&plan(&q, dim, 1, 500))[0][0].1, 50);

        let s = Sealed::from_growing(g);
        s.set_index(Arc::new(AnnIndex::build(IndexKind::Flat, Metric::L2, dim, &s.rows.vectors).unwrap()));
        assert_eq!(s.search(&plan(&q, dim, 1, 499)).unwrap()[0][0].1, 50);
        assert_ne!(s.search(&plan(&q, dim, 1, 500)).unwrap()[0][0].1, 50);
        assert!(s.delete(10, 700));
        assert!(!s.delete(10, 800), "second tombstone must not move the first");
        assert_eq!(s.delete_ts(10), 700);
        assert_eq!(s.deleted(), 2);
    }

    #[test]
    fn a_released_index_is_read_back_for_a_search_and_answers_the_same() {
        let dim = 8;
        // Distinct rows (`growing`'s repeat every 97), so each query row is its own nearest.
        let mut g = Growing::new(1);
        let mut x = 12345u64;
        for i in 0..3000u64 {
            let v: Vec<f32> = (0..dim)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (x >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect();
            g.push(1 + i, 0, i as i64, 10 + i, &v, vec![]);
        }
        let s = Sealed::from_growing(g);
        let hnsw = IndexKind::Hnsw { m: 8, ef_construction: 40 };
        s.set_index(Arc::new(AnnIndex::build(hnsw, Metric::L2, dim, &s.rows.vectors).unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg.index");
        s.index().unwrap().save(&path).unwrap();
        let q: Vec<f32> = (0..3).flat_map(|i| s.rows.vector(dim, i * 700).to_vec()).collect();
        let before = s.search(&plan(&q, dim, 10, Ts::MAX - 1)).unwrap();

        assert!(!s.release_index(path.clone(), (IndexKind::Flat, Metric::L2)), "the file holds another index: kept");
        assert!(s.release_index(path.clone(), (hnsw, Metric::L2)));
        assert!(s.is_released() && s.index().is_none());
        assert_eq!(s.indexed_as(), Some((hnsw, Metric::L2)), "still indexed, on disk");
        assert_eq!(s.memory_bytes(), s.rows.memory_bytes() + s.len() * 8, "the index no longer counts");

        // A filter that leaves few rows is answered exactly: nothing is read back for it.
        let few = Filter::compile("id < 5", &[]).unwrap();
        let exact = s.search(&SearchPlan { filter: Some(&few), ..plan(&q, dim, 3, Ts::MAX - 1) }).unwrap();
        assert!(exact.iter().flatten().all(|&(_, id)| id < 5));
        assert!(s.is_released());

        assert_eq!(s.search(&plan(&q, dim, 10, Ts::MAX - 1)).unwrap(), before, "read back, it answers as before");
        assert!(!s.is_released() && s.index().is_some());
        assert!(!s.release_index(path.clone(), (hnsw, Metric::L2)), "read back a moment ago: kept for a while");
        *s.read_back.lock() = None;
        assert!(s.release_index(path.clone(), (hnsw, Metric::L2)));

        // A file gone (a dropped collection's, under a search already running) leaves the
        // segment exact, not failed.
        std::fs::remove_file(&path).unwrap();
        let exact = s.search(&plan(&q, dim, 10, Ts::MAX - 1)).unwrap();
        assert!(s.is_released());
        for (q, hits) in exact.iter().enumerate() {
            assert_eq!(hits[0].1, (q * 700) as i64, "a stored row is its own nearest neighbour");
        }
    }

    #[test]
    fn merge_keeps_best_k_with_deterministic_ties() {
        let a = vec![vec![(1.0, 5), (3.0, 1)]];
        let b = vec![vec![(1.0, 2), (2.0, 9)]];
        let m = merge_topk(Metric::L2, 3, 1, vec![a.clone(), b.clone()]);
        assert_eq!(m[0], vec![(1.0, 2), (1.0, 5), (2.0, 9)]);
        let m = merge_topk(Metric::Ip, 2, 1, vec![a, b]);
        assert_eq!(m[0], vec![(3.0, 1), (2.0, 9)]);
    }

    #[test]
    fn distances_match_naive() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| (19 - i) as f32 * 0.25).collect();
        let l2: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        let ip: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((distance(Metric::L2, &a, &b) - l2).abs() < 1e-3);
        assert!((distance(Metric::Ip, &a, &b) - ip).abs() < 1e-3);
        // COSINE: the query normalised, the stored vector as it is; exact search divides by
        // the norm the row was stored with.
        let unit: Vec<f32> = a.iter().map(|x| x / norm(&a)).collect();
        let cos = ip / (norm(&a) * norm(&b));
        assert!((distance(Metric::Cosine, &unit, &b) - cos).abs() < 1e-5);
        let rows = Rows::new(vec![1], vec![1], b.clone(), vec![vec![]], b.len());
        assert_eq!(rows.norms, [norm(&b)]);
        assert_eq!(distance_to(Metric::Cosine, &unit, rows.vector(b.len(), 0), rows.norms[0]), distance(Metric::Cosine, &unit, &b));
    }
}
