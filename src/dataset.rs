//! Deterministic synthetic data sets and exact ground truth, shared by the benchmarks, the demo
//! and the integration tests.
//!
//! `gaussian_mixture` is a function of its arguments only: the same arguments give the same
//! bytes on any machine and with any number of threads, because rows are generated in fixed-size
//! chunks, each from its own seeded `StdRng`, and the chunking never depends on the thread pool.
//! Uniformly random vectors make every neighbour almost equally far (nothing for an ANN index to
//! find); a clustered mixture is closer to real embeddings and gives recall figures that mean
//! something.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use tandem_cluster::schema::Metric;
// The engine's own distance kernels: ground truth must score exactly as the engine does.
use tandem_cluster::segment::distance;

/// Rows generated from one RNG stream. Fixed, so the output does not depend on the thread count;
/// changing it changes every data set.
const ROWS_PER_CHUNK: usize = 1024;

/// Domain tags that keep the streams of centres, base rows and queries apart.
const STREAM_CENTRES: u64 = 0;
const STREAM_BASE: u64 = 1;
const STREAM_QUERIES: u64 = 2;

/// Base vectors and query vectors, both flattened row after row.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub dim: usize,
    pub base: Vec<f32>,
    pub queries: Vec<f32>,
}

impl Dataset {
    /// Number of base vectors.
    pub fn n(&self) -> usize {
        self.base.len().checked_div(self.dim).unwrap_or(0)
    }

    /// Number of query vectors.
    pub fn nq(&self) -> usize {
        self.queries.len().checked_div(self.dim).unwrap_or(0)
    }

    pub fn vector(&self, i: usize) -> &[f32] {
        &self.base[i * self.dim..(i + 1) * self.dim]
    }

    pub fn query(&self, i: usize) -> &[f32] {
        &self.queries[i * self.dim..(i + 1) * self.dim]
    }
}

/// splitmix64 finaliser: turns (seed, stream, chunk) into well-spread, independent RNG seeds.
fn mix(seed: u64, stream: u64, chunk: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ chunk.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Mixture {
    dim: usize,
    centres: Vec<f32>,
    sigmas: Vec<Normal<f32>>,
}

impl Mixture {
    fn new(dim: usize, clusters: usize, seed: u64) -> Mixture {
        let clusters = clusters.max(1);
        let mut rng = StdRng::seed_from_u64(mix(seed, STREAM_CENTRES, 0));
        let centres = (0..clusters * dim).map(|_| rng.random_range(-1.0f32..=1.0)).collect();
        // Clusters of different spread, so that some are dense and some diffuse, as in real data.
        let sigmas =
            (0..clusters).map(|_| Normal::new(0.0f32, rng.random_range(0.1f32..=0.3)).expect("sigma is finite and positive")).collect();
        Mixture { dim, centres, sigmas }
    }

    /// Fills `out` (whole rows) from the stream `stream`, chunk by chunk, in parallel.
    fn fill(&self, out: &mut [f32], seed: u64, stream: u64) {
        let dim = self.dim;
        if dim == 0 {
            return;
        }
        out.par_chunks_mut(ROWS_PER_CHUNK * dim).enumerate().for_each(|(chunk, rows)| {
            let mut rng = StdRng::seed_from_u64(mix(seed, stream, chunk as u64));
            for row in rows.chunks_exact_mut(dim) {
                let c = rng.random_range(0..self.sigmas.len());
                let centre = &self.centres[c * dim..(c + 1) * dim];
                for (x, m) in row.iter_mut().zip(centre) {
                    *x = m + self.sigmas[c].sample(&mut rng);
                }
            }
        });
    }
}

/// `n` base and `nq` query vectors of dimension `dim`, drawn from a mixture of `clusters`
/// Gaussians (centres uniform in [-1, 1]^dim, per-cluster sigma in [0.1, 0.3]). Queries come from
/// the same mixture through an independent stream, so they are near the data but not copies of
/// base rows. Bit-identical for the same arguments.
pub fn gaussian_mixture(n: usize, nq: usize, dim: usize, clusters: usize, seed: u64) -> Dataset {
    let mixture = Mixture::new(dim, clusters, seed);
    let mut base = vec![0f32; n * dim];
    mixture.fill(&mut base, seed, STREAM_BASE);
    let mut queries = vec![0f32; nq * dim];
    mixture.fill(&mut queries, seed, STREAM_QUERIES);
    Dataset { dim, base, queries }
}

/// Scales every row of `vectors` to unit length, the way a cluster stores COSINE vectors (zero
/// rows are left as they are; a cluster rejects them).
pub fn normalize_rows(vectors: &mut [f32], dim: usize) {
    if dim == 0 {
        return;
    }
    vectors.par_chunks_mut(dim).for_each(|v| {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 && norm.is_finite() {
            v.iter_mut().for_each(|x| *x /= norm);
        }
    });
}

/// (badness, id): smaller is closer for every metric, ties go to the smaller id.
#[derive(Clone, Copy, PartialEq)]
struct Ranked(f32, i64);

impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

/// Exact top-`k` base ids (row numbers) for every query, closest first, by brute force in
/// parallel. L2 is squared euclidean distance, IP the inner product, COSINE the inner product of
/// normalised vectors. Ties are broken by the smaller id.
pub fn ground_truth(ds: &Dataset, k: usize, metric: Metric) -> Vec<Vec<i64>> {
    let dim = ds.dim;
    let normalised;
    let (base, queries): (&[f32], &[f32]) = match metric {
        Metric::Cosine => {
            let mut b = ds.base.clone();
            let mut q = ds.queries.clone();
            normalize_rows(&mut b, dim);
            normalize_rows(&mut q, dim);
            normalised = (b, q);
            (&normalised.0, &normalised.1)
        }
        Metric::L2 | Metric::Ip => (&ds.base, &ds.queries),
    };
    let k = k.min(ds.n());
    (0..ds.nq())
        .into_par_iter()
        .map(|qi| {
            let q = &queries[qi * dim..(qi + 1) * dim];
            // Max-heap of the best k so far: the root is the worst kept hit.
            let mut heap = std::collections::BinaryHeap::with_capacity(k + 1);
            for (i, v) in base.chunks_exact(dim).enumerate() {
                let bad = match metric {
                    Metric::L2 => distance(Metric::L2, q, v),
                    Metric::Ip | Metric::Cosine => -distance(Metric::Ip, q, v),
                };
                let r = Ranked(bad, i as i64);
                if heap.len() < k {
                    heap.push(r);
                } else if heap.peek().is_some_and(|worst| r < *worst) {
                    heap.pop();
                    heap.push(r);
                }
            }
            heap.into_sorted_vec().into_iter().map(|r| r.1).collect()
        })
        .collect()
}

/// Mean over queries of |results ∩ truth| / k, both cut to their first `k` ids. A query whose
/// truth holds fewer than `k` ids (fewer base rows than k) is scored against what exists.
/// Queries without a result count as 0; an empty truth gives 0.
pub fn recall_at_k(results: &[Vec<i64>], truth: &[Vec<i64>], k: usize) -> f64 {
    if truth.is_empty() || k == 0 {
        return 0.0;
    }
    let empty = Vec::new();
    let total: f64 = truth
        .iter()
        .enumerate()
        .map(|(q, t)| {
            let t = &t[..t.len().min(k)];
            if t.is_empty() {
                return 1.0;
            }
            let r = results.get(q).unwrap_or(&empty);
            let r = &r[..r.len().min(k)];
            let found = t.iter().filter(|id| r.contains(id)).count();
            found as f64 / t.len() as f64
        })
        .sum();
    total / truth.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn same_seed_same_bytes_different_seed_different() {
        let a = gaussian_mixture(3000, 50, 24, 7, 42);
        let b = gaussian_mixture(3000, 50, 24, 7, 42);
        assert_eq!(bytes(&a.base), bytes(&b.base));
        assert_eq!(bytes(&a.queries), bytes(&b.queries));
        let c = gaussian_mixture(3000, 50, 24, 7, 43);
        assert_ne!(bytes(&a.base), bytes(&c.base));
        assert_ne!(bytes(&a.queries), bytes(&c.queries));
        assert_eq!((a.n(), a.nq(), a.vector(2).len(), a.query(1).len()), (3000, 50, 24, 24));
        assert!(a.base.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn independent_of_the_thread_count() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let one = pool.install(|| gaussian_mixture(5000, 10, 8, 3, 9));
        let many = gaussian_mixture(5000, 10, 8, 3, 9);
        assert_eq!(bytes(&one.base), bytes(&many.base));
        // A prefix of a larger set is the smaller set: chunks do not depend on n.
        let smaller = gaussian_mixture(2000, 10, 8, 3, 9);
        assert_eq!(bytes(&smaller.base), bytes(&many.base[..2000 * 8]));
    }

    #[test]
    fn queries_are_not_base_rows_and_points_cluster() {
        let ds = gaussian_mixture(2000, 20, 16, 4, 1);
        for q in 0..ds.nq() {
            assert!((0..ds.n()).all(|i| ds.vector(i) != ds.query(q)));
        }
        // With 4 clusters of sigma <= 0.3 in 16 dims, the nearest neighbour is far closer than
        // a typical pair: the data is clustered, not uniform.
        let truth = ground_truth(&ds, 1, Metric::L2);
        let nn = distance(Metric::L2, ds.query(0), ds.vector(truth[0][0] as usize));
        let mean: f32 = (0..ds.n()).map(|i| distance(Metric::L2, ds.query(0), ds.vector(i))).sum::<f32>() / ds.n() as f32;
        assert!(nn < mean / 2.0, "nn {nn} vs mean {mean}");
    }

    #[test]
    fn ground_truth_on_a_hand_checked_set() {
        // Points on a line: 0, 1, 3, 6, 1 (a duplicate of id 1), as 2-d vectors (x, 0).
        let ds = Dataset { dim: 2, base: vec![0., 0., 1., 0., 3., 0., 6., 0., 1., 0.], queries: vec![2.9, 0., -1., 0.] };
        let l2 = ground_truth(&ds, 3, Metric::L2);
        // Query 2.9: 3 (d 0.01), then 1 and its duplicate at equal distance: smaller id first.
        assert_eq!(l2[0], vec![2, 1, 4]);
        assert_eq!(l2[1], vec![0, 1, 4]);
        // Inner product with (2.9, 0): largest x wins; with (-1, 0): smallest x.
        let ip = ground_truth(&ds, 2, Metric::Ip);
        assert_eq!(ip, vec![vec![3, 2], vec![0, 1]]);
        // Cosine ignores length: (1, 0)-direction rows all have similarity 1 with (2.9, 0),
        // so the tie is broken by id; the zero row scores 0.
        let cos = ground_truth(&ds, 5, Metric::Cosine);
        assert_eq!(cos[0], vec![1, 2, 3, 4, 0]);
        // k beyond n is cut to n.
        assert_eq!(ground_truth(&ds, 10, Metric::L2)[0].len(), 5);
    }

    #[test]
    fn recall_counts_overlap_of_the_first_k() {
        let truth = vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]];
        assert_eq!(recall_at_k(&truth, &truth, 4), 1.0);
        // Order inside the top-k does not matter; ids past k do not count.
        let results = vec![vec![4, 3, 9, 1, 2], vec![5, 0, 0, 0]];
        assert_eq!(recall_at_k(&results, &truth, 4), (3.0 / 4.0 + 1.0 / 4.0) / 2.0);
        // A missing result counts as 0.
        assert_eq!(recall_at_k(&truth[..1], &truth, 4), 0.5);
        assert_eq!(recall_at_k(&results, &truth, 2), (0.0 + 0.5) / 2.0);
        assert_eq!(recall_at_k(&[], &[], 10), 0.0);
    }
}
