//! The faiss binding: the only module of tandem with `unsafe` code.
//!
//! Index construction, training and persistence go through the safe `faiss` crate. Searching
//! calls `faiss_Index_search_with_params` directly, for two reasons the safe crate does not
//! cover: it takes `&mut self` for searches that faiss itself treats as const (we want many
//! concurrent readers), and filtered search needs an `IDSelectorBitmap` passed through
//! `SearchParameters` so that faiss skips rows *during* the search — the result is the true
//! filtered top-k, not a top-k that a filter then thins out.
//!
//! Labels are row offsets inside the segment (no IDMap): the segment maps them to primary keys.
//! Every call here is CPU-bound and must run on the search or index-building pool, never on an
//! async worker.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::path::Path;
use std::ptr;

use faiss::index::IndexImpl;
use faiss::index::autotune::ParameterSpace;
use faiss::{Index, MetricType};
use parking_lot::{RwLock, RwLockWriteGuard};

use crate::error::{ClusterError, Result};
use crate::schema::{IndexKind, Metric};

unsafe extern "C" {
    // libgomp's (faiss is built with OpenMP and links it).
    fn omp_set_num_threads(n: std::ffi::c_int);
    fn omp_get_max_threads() -> std::ffi::c_int;
}

/// Makes faiss calls from the current thread single-threaded. faiss runs a search of several
/// queries as an OpenMP parallel loop, with a team of one thread per core started from whichever
/// thread calls it. The search pool already has a thread per core and splits a large batch
/// itself ([`crate::fanout`]), so every batch would add a core's worth of threads, which
/// spin-wait at the end of each loop, on cores that are busy: in a profile of searches of about
/// two queries each (docs/gateway.md), those threads took 17 % of the machine. Call it once per
/// thread.
pub fn single_threaded_on_this_thread() {
    // SAFETY: sets an OpenMP setting of the calling thread; no memory is involved.
    unsafe { omp_set_num_threads(1) }
}

/// Sets, once per process, how faiss and its BLAS compute the distances of an exhaustive search
/// (FLAT, and IVF's coarse quantizer). Both settings are process-wide.
///
/// **OpenBLAS single-threaded.** faiss computes a search of many queries as one matrix product
/// (`sgemm`), and OpenBLAS runs that on a thread per core that then spin for about 0.1 s waiting
/// for the next product. The search pool already has a thread per core, so those threads only
/// take the cores other searches (and, on a shared machine, the gateway) need: with merged
/// searches of up to 64 queries, the gateway bench's loaded p99 was 81 ms with them, 22 ms
/// without. Index builds lose OpenBLAS's threads too; they keep OpenMP's. Looked up at run
/// time: faiss links plain `-lblas`, which Debian's alternatives resolve to OpenBLAS, BLIS or the
/// reference BLAS, and only OpenBLAS has the call (it reads `OPENBLAS_NUM_THREADS` before `main`,
/// too early to set from here).
///
/// **The product from [`BLAS_FROM_QUERIES`] queries** (faiss's default is 20).
pub fn blas_for_search() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Some(set) = openblas::<unsafe extern "C" fn(std::ffi::c_int)>(c"openblas_set_num_threads") {
            // SAFETY: OpenBLAS's own setter, with the signature of its cblas.h.
            unsafe { set(1) }
        }
        // SAFETY: sets a plain int global of faiss, once, before this process's first search.
        unsafe { faiss_sys::faiss_set_distance_compute_blas_threshold(BLAS_FROM_QUERIES as std::ffi::c_int) }
    });
}

/// Queries from which an exhaustive search computes its distances as one matrix product instead
/// of scanning the rows once per query. faiss is built here without AVX (`FAISS_OPT_LEVEL`
/// generic) while the BLAS picks its kernels for the CPU at run time. Per query, timed
/// single-threaded over `IndexFlat` (2 000 to 200 000 rows, d 8 to 768, L2 and IP, on an
/// AVX-512 EPYC), the product costs 0.5–1.05x the scan at 4 queries, 0.4–0.67x at 8 and
/// 0.26–0.46x at 16, but 1.0–1.55x at 3 and 1.1–1.9x at 2 (d >= 64). A few queries per search
/// is what a client's small batches and a gateway's merged searches are. A product computes L2 as |x|² + |y|² - 2x·y, so a
/// distance can differ from a scan's in the last bits (as faiss's did from 20 queries).
pub const BLAS_FROM_QUERIES: usize = 4;

/// The settings [`blas_for_search`] made: (OpenBLAS threads, or None when the BLAS is not
/// OpenBLAS; queries from which faiss uses the product).
pub fn blas_settings() -> (Option<usize>, usize) {
    let threads = openblas::<unsafe extern "C" fn() -> std::ffi::c_int>(c"openblas_get_num_threads")
        // SAFETY: OpenBLAS's own getter, with the signature of its cblas.h.
        .map(|get| unsafe { get() }.max(1) as usize);
    // SAFETY: reads a plain int global of faiss.
    (threads, unsafe { faiss_sys::faiss_get_distance_compute_blas_threshold() }.max(0) as usize)
}

/// An OpenBLAS function of the loaded BLAS, if there is one. `F` must be its C signature.
fn openblas<F: Copy>(name: &std::ffi::CStr) -> Option<F> {
    // SAFETY: dlsym only reads the loaded objects' symbol tables; the name is NUL-terminated.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    // SAFETY: a non-null result is that function's address, and `F` is a function pointer type
    // of the same size (callers name its C signature).
    (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut libc::c_void, F>(&p) })
}

/// Threads a faiss call from the current thread may use.
pub fn faiss_threads_on_this_thread() -> usize {
    // SAFETY: reads an OpenMP setting of the calling thread.
    unsafe { omp_get_max_threads() }.max(1) as usize
}

/// Per-request search knobs (already defaulted and bounded by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Knobs {
    pub nprobe: usize,
    pub ef_search: usize,
}

/// One bit per row offset, bit `i` = byte `i >> 3`, bit `i & 7` (faiss's `IDSelectorBitmap`).
#[derive(Debug, Clone)]
pub struct Bitmap {
    bytes: Vec<u8>,
    ones: usize,
}

impl Bitmap {
    pub fn from_fn(n: usize, mut f: impl FnMut(usize) -> bool) -> Bitmap {
        let mut bytes = vec![0u8; n.div_ceil(8)];
        let mut ones = 0;
        for i in 0..n {
            if f(i) {
                bytes[i >> 3] |= 1 << (i & 7);
                ones += 1;
            }
        }
        Bitmap { bytes, ones }
    }

    pub fn get(&self, i: usize) -> bool {
        self.bytes.get(i >> 3).is_some_and(|b| (b >> (i & 7)) & 1 == 1)
    }

    /// Rows that pass.
    pub fn count(&self) -> usize {
        self.ones
    }
}

pub struct AnnIndex {
    index: IndexImpl,
    kind: IndexKind,
    /// What it compares by. A COSINE index holds normalised copies of the vectors (stored rows
    /// keep them as inserted), so it is faiss's inner product over unit vectors.
    metric: Metric,
    /// faiss's C API exposes no `SearchParametersHNSW`, so efSearch is a property of the index.
    /// Searches that want the current value share the read side; one that needs another value
    /// takes the write side just long enough to change it.
    ef_search: RwLock<usize>,
}

impl std::fmt::Debug for AnnIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnnIndex({})", self.kind)
    }
}

fn faiss_err(what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Faiss(format!("{what}: {e}"))
}

fn last_error(what: &str, code: i32) -> ClusterError {
    // SAFETY: faiss_get_last_error returns null or a NUL-terminated string owned by faiss's
    // thread-local error slot, valid until the next faiss call on this thread; we copy it now.
    let msg = unsafe {
        let p = faiss_sys::faiss_get_last_error();
        if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
    };
    ClusterError::Faiss(format!("{what} failed with code {code}: {msg}"))
}

fn metric_type(metric: Metric) -> MetricType {
    match metric {
        Metric::L2 => MetricType::L2,
        // A COSINE index is built over normalised copies and searched with normalised queries,
        // so inner product is cosine similarity.
        Metric::Ip | Metric::Cosine => MetricType::InnerProduct,
    }
}

/// Rows added to an index at a time while building: how often a build checks whether to stop.
/// An HNSW add of 2048 rows (d 128, efConstruction 200) takes about 0.1-0.3 s here.
pub const BUILD_CHUNK_ROWS: usize = 2048;

impl AnnIndex {
    /// Builds an index over `vectors` (n * dim floats). Slow for HNSW and IVF: run it on the
    /// index-building pool.
    pub fn build(kind: IndexKind, metric: Metric, dim: usize, vectors: &[f32]) -> Result<AnnIndex> {
        let never = std::sync::atomic::AtomicBool::new(false);
        Ok(Self::build_until(kind, metric, dim, vectors, &never)?.expect("a build nobody stops finishes"))
    }

    /// [`AnnIndex::build`] that gives up (`Ok(None)`) soon after `stop` is set: vectors go in
    /// by [`BUILD_CHUNK_ROWS`] and `stop` is checked between chunks, so a node shutting down
    /// does not wait for a whole HNSW segment (minutes for a large one on 2 cores). Adding in
    /// chunks builds the same structure as one add: faiss inserts one vector after another
    /// either way. Training (IVF's k-means on a sample) is not interrupted.
    pub fn build_until(
        kind: IndexKind,
        metric: Metric,
        dim: usize,
        vectors: &[f32],
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<AnnIndex>> {
        use std::sync::atomic::Ordering;
        let n = vectors.len() / dim;
        let description = match kind {
            IndexKind::Flat => "Flat".to_string(),
            // faiss wants ~39 training points per list; a small segment trains fewer lists
            // rather than failing or producing empty lists.
            IndexKind::IvfFlat { nlist } => format!("IVF{},Flat", (n / 39).clamp(1, nlist as usize)),
            IndexKind::Hnsw { m, .. } => format!("HNSW{m},Flat"),
        };
        let mut index = faiss::index_factory(dim as u32, &description, metric_type(metric))
            .map_err(|e| faiss_err(&format!("index_factory({description})"), e))?;
        if let IndexKind::Hnsw { ef_construction, .. } = kind {
            let ps = ParameterSpace::new().map_err(|e| faiss_err("parameter space", e))?;
            ps.set_index_parameter(&index, "efConstruction", ef_construction as f64).map_err(|e| faiss_err("set efConstruction", e))?;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let normalised;
        let vectors = if metric == Metric::Cosine {
            normalised = crate::segment::normalised(vectors, dim);
            &normalised[..]
        } else {
            vectors
        };
        if !index.is_trained() {
            index.train(vectors).map_err(|e| faiss_err("train", e))?;
        }
        for chunk in vectors.chunks(BUILD_CHUNK_ROWS * dim.max(1)) {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            index.add(chunk).map_err(|e| faiss_err("add", e))?;
        }
        Ok(Some(AnnIndex { index, kind, metric, ef_search: RwLock::new(0) }))
    }

    pub fn kind(&self) -> IndexKind {
        self.kind
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// Whether this index is what a schema with `kind` and `metric` asks for.
    pub fn serves(&self, kind: IndexKind, metric: Metric) -> bool {
        self.kind == kind && self.metric == metric
    }

    pub fn len(&self) -> usize {
        self.index.ntotal() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let p = path.to_str().ok_or_else(|| ClusterError::Internal(format!("non-utf8 path {}", path.display())))?;
        faiss::write_index(&self.index, p).map_err(|e| faiss_err(&format!("write {p}"), e))
    }

    pub fn load(path: &Path, kind: IndexKind, metric: Metric) -> Result<AnnIndex> {
        let p = path.to_str().ok_or_else(|| ClusterError::Internal(format!("non-utf8 path {}", path.display())))?;
        let index = faiss::read_index(p).map_err(|e| faiss_err(&format!("read {p}"), e))?;
        Ok(AnnIndex { index, kind, metric, ef_search: RwLock::new(0) })
    }

    /// Top-`k` rows for each query (`queries` holds nq * dim floats), restricted to `allow` when
    /// given. Returns (distances, labels), nq * k each, closest first; missing results have
    /// label -1.
    pub fn search(&self, queries: &[f32], dim: usize, k: usize, allow: Option<&Bitmap>, knobs: Knobs) -> Result<(Vec<f32>, Vec<i64>)> {
        let nq = queries.len() / dim;
        let mut distances = vec![0f32; nq * k];
        let mut labels = vec![-1i64; nq * k];
        if nq == 0 || k == 0 {
            return Ok((distances, labels));
        }
        match self.kind {
            IndexKind::Hnsw { .. } => {
                let want = knobs.ef_search.max(k);
                let guard = self.ef_search.read();
                if *guard == want {
                    self.search_raw(queries, k, allow, None, &mut distances, &mut labels)?;
                } else {
                    drop(guard);
                    let mut w = self.ef_search.write();
                    if *w != want {
                        let ps = ParameterSpace::new().map_err(|e| faiss_err("parameter space", e))?;
                        ps.set_index_parameter(&self.index, "efSearch", want as f64).map_err(|e| faiss_err("set efSearch", e))?;
                        *w = want;
                    }
                    let _r = RwLockWriteGuard::downgrade(w);
                    self.search_raw(queries, k, allow, None, &mut distances, &mut labels)?;
                }
            }
            IndexKind::IvfFlat { .. } => {
                self.search_raw(queries, k, allow, Some(knobs.nprobe.max(1)), &mut distances, &mut labels)?;
            }
            IndexKind::Flat => self.search_raw(queries, k, allow, None, &mut distances, &mut labels)?,
        }
        Ok((distances, labels))
    }

    fn search_raw(
        &self,
        queries: &[f32],
        k: usize,
        allow: Option<&Bitmap>,
        nprobe: Option<usize>,
        distances: &mut [f32],
        labels: &mut [i64],
    ) -> Result<()> {
        let nq = distances.len() / k;
        let index = self.index.inner_ptr();
        // SAFETY: `index` is a live faiss index owned by self; faiss CPU indexes support
        // concurrent const searches (efSearch changes are excluded by the RwLock above). The
        // selector borrows `allow`'s bytes, which outlive this call; params and selector are
        // freed below on every path. Output buffers hold nq * k elements, as faiss writes.
        unsafe {
            let mut sel: *mut faiss_sys::FaissIDSelectorBitmap = ptr::null_mut();
            if let Some(bm) = allow {
                let rc = faiss_sys::faiss_IDSelectorBitmap_new(&mut sel, bm.bytes.len(), bm.bytes.as_ptr());
                if rc != 0 {
                    return Err(last_error("IDSelectorBitmap_new", rc));
                }
            }
            let sel_base = sel as *mut faiss_sys::FaissIDSelector;
            let mut params: *mut faiss_sys::FaissSearchParameters = ptr::null_mut();
            let rc = match nprobe {
                Some(nprobe) => {
                    let mut ivf: *mut faiss_sys::FaissSearchParametersIVF = ptr::null_mut();
                    let rc = faiss_sys::faiss_SearchParametersIVF_new_with(&mut ivf, sel_base, nprobe, 0);
                    params = ivf as *mut faiss_sys::FaissSearchParameters;
                    rc
                }
                None if !sel.is_null() => faiss_sys::faiss_SearchParameters_new(&mut params, sel_base),
                None => 0,
            };
            let result = if rc != 0 {
                Err(last_error("SearchParameters_new", rc))
            } else {
                let rc = if params.is_null() {
                    faiss_sys::faiss_Index_search(index, nq as i64, queries.as_ptr(), k as i64, distances.as_mut_ptr(), labels.as_mut_ptr())
                } else {
                    faiss_sys::faiss_Index_search_with_params(
                        index,
                        nq as i64,
                        queries.as_ptr(),
                        k as i64,
                        params,
                        distances.as_mut_ptr(),
                        labels.as_mut_ptr(),
                    )
                };
                if rc != 0 { Err(last_error("search", rc)) } else { Ok(()) }
            };
            if !params.is_null() {
                faiss_sys::faiss_SearchParameters_free(params);
            }
            if !sel.is_null() {
                faiss_sys::faiss_IDSelector_free(sel_base);
            }
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        // xorshift: deterministic and dependency-free
        let mut s = seed | 1;
        (0..n * dim)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 10_000) as f32 / 10_000.0
            })
            .collect()
    }

    #[test]
    fn flat_with_bitmap_returns_only_allowed_rows() {
        let dim = 8;
        let v = data(500, dim, 7);
        let idx = AnnIndex::build(IndexKind::Flat, Metric::L2, dim, &v).unwrap();
        let allow = Bitmap::from_fn(500, |i| i % 3 == 0);
        let (d, l) = idx.search(&v[..dim * 2], dim, 10, Some(&allow), Knobs { nprobe: 1, ef_search: 16 }).unwrap();
        assert!(l.iter().all(|&x| x >= 0 && x % 3 == 0), "{l:?}");
        assert_eq!(l[0], 0);
        assert!(d[0].abs() < 1e-6);
        // unfiltered, query 1 finds itself
        let (_, l) = idx.search(&v[dim..dim * 2], dim, 1, None, Knobs { nprobe: 1, ef_search: 16 }).unwrap();
        assert_eq!(l[0], 1);
    }

    #[test]
    fn hnsw_and_ivf_build_search_save_load() {
        let dim = 16;
        let v = data(2000, dim, 11);
        for kind in [IndexKind::Hnsw { m: 16, ef_construction: 100 }, IndexKind::IvfFlat { nlist: 16 }] {
            let idx = AnnIndex::build(kind, Metric::L2, dim, &v).unwrap();
            let (_, l) = idx.search(&v[dim * 5..dim * 6], dim, 3, None, Knobs { nprobe: 16, ef_search: 64 }).unwrap();
            assert_eq!(l[0], 5, "{kind}");
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("x.index");
            idx.save(&p).unwrap();
            let back = AnnIndex::load(&p, kind, Metric::L2).unwrap();
            assert_eq!(back.len(), 2000);
            let allow = Bitmap::from_fn(2000, |i| i != 5);
            let (_, l) = back.search(&v[dim * 5..dim * 6], dim, 3, Some(&allow), Knobs { nprobe: 16, ef_search: 32 }).unwrap();
            assert!(!l.contains(&5), "{kind}: filtered row came back");
        }
    }

    #[test]
    fn a_build_added_in_chunks_holds_every_row() {
        let dim = 8;
        let n = BUILD_CHUNK_ROWS * 2 + 100;
        let v = data(n, dim, 13);
        let idx = AnnIndex::build(IndexKind::Hnsw { m: 8, ef_construction: 40 }, Metric::L2, dim, &v).unwrap();
        assert_eq!(idx.len(), n);
        let last = n - 1;
        let (_, l) = idx.search(&v[dim * last..dim * n], dim, 1, None, Knobs { nprobe: 1, ef_search: 64 }).unwrap();
        assert_eq!(l[0], last as i64, "a row of the last chunk finds itself");
    }

    #[test]
    fn a_build_told_to_stop_gives_up() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dim = 16;
        let kind = IndexKind::Hnsw { m: 16, ef_construction: 200 };
        let stopped = AtomicBool::new(true);
        assert!(AnnIndex::build_until(kind, Metric::L2, dim, &data(100, dim, 3), &stopped).unwrap().is_none());
        // Mid-build: 60k rows take seconds; the stop lands within a chunk.
        let v = data(60_000, dim, 5);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            s.store(true, Ordering::Relaxed);
        });
        let built = AnnIndex::build_until(kind, Metric::L2, dim, &v, &stop).unwrap();
        setter.join().unwrap();
        assert!(built.is_none(), "the build went on to the end after it was told to stop");
    }
}
