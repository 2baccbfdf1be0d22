//! How a search reaches a collection's segments (Mishards-style scatter/gather).
//!
//! Today every shard of a cluster lives in this process and `LocalFanout` searches them on the
//! search pool. When a cluster is split into a proxy and query nodes holding in-memory replicas of
//! segments, a remote implementation of `Fanout` scatters the same `SearchPlan` to the nodes that
//! hold each shard's segments and merges their top-k lists with the same `merge_topk`; nothing
//! above this trait changes.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::collection::Collection;
use crate::error::{ClusterError, Result};
use crate::segment::{SearchPlan, TopK, merge_topk};

/// Queries per part when a batch is split over the search pool: below this, splitting costs
/// more (each part filters and scans every segment again) than it saves.
const MIN_QUERIES_PER_PART: usize = 4;

pub trait Fanout: Send + Sync + 'static {
    /// Runs on the search pool (blocking, CPU-bound).
    fn search(&self, collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK>;

    /// The query nodes searches also go to, for GetClusterInfo (none for this process alone).
    fn query_nodes(&self) -> Vec<tandem_proto::v1::QueryNodeStatus> {
        Vec::new()
    }

    /// Refuses a number of replicas the cluster cannot hold, naming it. A process alone is one
    /// replica: it takes 0 and 1.
    fn check_replicas(&self, replicas: u32) -> Result<()> {
        if replicas > 1 {
            return Err(ClusterError::invalid(format!(
                "replicas {replicas} is more than this cluster has: it has no query nodes, and is one replica itself (query_nodes.groups; docs/scaling.md)"
            )));
        }
        Ok(())
    }

    /// Sets how many replica groups hold copies of the collection's sealed segments (`None`:
    /// every group), and returns the groups that now do; a number [`Fanout::check_replicas`]
    /// refuses changes nothing.
    fn set_replicas(&self, collection_id: u64, replicas: Option<u32>) -> Result<Vec<u32>> {
        let _ = collection_id;
        replicas.map_or(Ok(()), |n| self.check_replicas(n))?;
        Ok(Vec::new())
    }

    /// The replica groups holding copies of the collection's sealed segments (none for this
    /// process alone).
    fn replica_groups(&self, collection_id: u64) -> Vec<u32> {
        let _ = collection_id;
        Vec::new()
    }

    /// A query node at `endpoint` enters replica group `group` (`Coordinator.Join`): true when
    /// it was not in it yet. A process alone has no groups to join.
    fn join(&self, endpoint: &str, group: u32) -> Result<bool> {
        Err(ClusterError::FailedPrecondition(format!(
            "query node {endpoint:?} cannot join group {group}: this cluster has no replica groups (query_nodes.groups; docs/scaling.md)"
        )))
    }
}

#[derive(Debug, Default)]
pub struct LocalFanout {
    /// Searches running on the pool now (this one included while it runs).
    running: AtomicUsize,
}

impl Fanout for LocalFanout {
    /// A request of many query vectors is split into parts searched in parallel: faiss runs
    /// single-threaded on the pool ([`crate::ann::single_threaded_on_this_thread`]), so the pool
    /// is what spreads a batch over the cores.
    fn search(&self, collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK> {
        let running = self.running.fetch_add(1, Ordering::Relaxed) + 1;
        let _done = Running(&self.running);
        let n_parts = parts(rayon::current_num_threads(), running, plan.nq());
        if n_parts > 1 {
            let per = plan.nq().div_ceil(n_parts) * plan.dim;
            let parts = plan
                .queries
                .par_chunks(per)
                .map(|queries| search_shards(collection, &SearchPlan { queries, ..*plan }))
                .collect::<Result<Vec<_>>>()?;
            return Ok(parts.into_iter().flatten().collect());
        }
        search_shards(collection, plan)
    }
}

/// Counts a search out of [`LocalFanout::running`] when it ends, however it ends.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Parts to split a search of `nq` queries into, with `running` searches (it included) on a pool
/// of `threads`. Only threads no other search is using can take a part: when every thread is
/// busy the parts would run one after the other on this one, each scanning every segment again
/// and, below [`crate::ann::BLAS_FROM_QUERIES`], losing the matrix product a whole batch gets
/// (as with a gateway's merged searches under load, the case where batches are largest).
fn parts(threads: usize, running: usize, nq: usize) -> usize {
    let free = (threads + 1).saturating_sub(running).max(1);
    free.min(nq / MIN_QUERIES_PER_PART).max(1)
}

fn search_shards(collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK> {
    let parts = collection.shards().par_iter().map(|s| s.search(plan)).collect::<Result<Vec<_>>>()?;
    Ok(merge_topk(plan.metric, plan.k, plan.nq(), parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ann::Knobs;
    use crate::collection::Write;
    use crate::schema::{IndexKind, Metric, Schema};
    use crate::shard::ShardOptions;
    use crate::ts::HybridClock;
    use crate::wal::{SyncPolicy, WalOptions};

    /// A batch gets the same answer split or whole, and every search is counted out when it
    /// ends (a count that only grew would stop all splitting).
    #[test]
    fn split_and_whole_batches_agree_and_searches_are_counted_out() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Schema::new("c".into(), 2, Metric::L2, IndexKind::Flat, 2, vec![]).unwrap();
        let opts = ShardOptions { wal: WalOptions { sync: SyncPolicy::Never, segment_bytes: 1 << 20 }, seal_rows: 1000 };
        let clock = HybridClock::new();
        let c = Collection::open(1, 1, schema, dir.path(), &opts, &clock).unwrap().0;
        let vectors: Vec<f32> = (0..200).flat_map(|i| [i as f32, (i * 7 % 13) as f32]).collect();
        c.write(&clock, Write::Insert { ids: (0..100).collect(), vectors, rows: vec![vec![]; 100] }, &mut Vec::new()).unwrap();
        let queries: Vec<f32> = (0..16).flat_map(|i| [i as f32 * 6.0, (i % 5) as f32]).collect();
        let plan = SearchPlan {
            queries: &queries,
            dim: 2,
            k: 3,
            metric: Metric::L2,
            filter: None,
            knobs: Knobs { nprobe: 1, ef_search: 16 },
            snapshot: clock.now(),
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let fanout = LocalFanout::default();
        let split = pool.install(|| fanout.search(&c, &plan)).unwrap();
        assert_eq!(fanout.running.load(Ordering::Relaxed), 0);
        let whole = pool.install(|| search_shards(&c, &plan)).unwrap();
        assert_eq!(split, whole);
        assert_eq!(split.len(), 16);
        // Another search running: the batch goes whole, with the same answer.
        fanout.running.store(1, Ordering::Relaxed);
        assert_eq!(pool.install(|| fanout.search(&c, &plan)).unwrap(), whole);
        assert_eq!(fanout.running.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_batch_is_split_only_over_threads_no_other_search_uses() {
        // Alone on two threads: two parts, if each gets at least 4 queries.
        assert_eq!(parts(2, 1, 8), 2);
        assert_eq!(parts(2, 1, 7), 1);
        assert_eq!(parts(2, 1, 1), 1);
        // Another search holds the other thread: one part.
        assert_eq!(parts(2, 2, 64), 1);
        assert_eq!(parts(2, 5, 64), 1);
        // Four threads, two other searches: this one and the one free thread.
        assert_eq!(parts(4, 3, 64), 2);
        assert_eq!(parts(4, 1, 64), 4);
    }
}
