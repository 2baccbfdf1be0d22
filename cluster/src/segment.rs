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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::RwLock;

use crate::ann::{AnnIndex, Bitmap, Knobs};
use crate::error::Result;
use crate::filter::{Filter, Scalar};
use crate::schema::Metric;
use crate::ts::Ts;
use crate::wal::Lsn;

pub type SegmentId = u64;
pub type Row = Vec<Option<Scalar>>;

/// `delete_ts` of a row that is not deleted.
pub const LIVE: Ts = Ts::MAX;

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
    pub rows: Rows,
    pub delete_ts: Vec<Ts>,
}

impl Growing {
    pub fn new(id: SegmentId) -> Growing {
        Growing { id, first_lsn: 0, rows: Rows::default(), delete_ts: Vec::new() }
    }

    pub fn push(&mut self, lsn: Lsn, id: i64, ts: Ts, vector: &[f32], row: Row) -> u32 {
        if self.rows.is_empty() {
            self.first_lsn = lsn;
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

fn passes(filter: Option<&Filter>, rows: &Rows, off: usize) -> bool {
    filter.is_none_or(|f| f.matches(rows.ids[off], &rows.payloads[off]))
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
    index: RwLock<Option<Arc<AnnIndex>>>,
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
            index: RwLock::new(None),
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

    pub fn index(&self) -> Option<Arc<AnnIndex>> {
        self.index.read().clone()
    }

    pub fn set_index(&self, index: Arc<AnnIndex>) {
        *self.index.write() = Some(index);
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
        let index = self.index().filter(|i| i.metric() == plan.metric);
        let exact = match (&allow, &index) {
            (_, None) => true,
            (Some(bm), Some(_)) => bm.count() <= BRUTE_FORCE_ROWS.max(n / 32),
            (None, Some(_)) => false,
        };
        if exact {
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
            g.push(1 + i as u64, i as i64, 10 + i as u64, &v, vec![]);
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
