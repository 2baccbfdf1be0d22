//! How a search reaches a collection's segments (Mishards-style scatter/gather).
//!
//! Today every shard of a cluster lives in this process and `LocalFanout` searches them on the
//! search pool. When a cluster is split into a proxy and query nodes holding in-memory replicas of
//! segments, a remote implementation of `Fanout` scatters the same `SearchPlan` to the nodes that
//! hold each shard's segments and merges their top-k lists with the same `merge_topk`; nothing
//! above this trait changes.

use rayon::prelude::*;

use crate::collection::Collection;
use crate::error::Result;
use crate::segment::{SearchPlan, TopK, merge_topk};

/// Queries per part when a batch is split over the search pool: below this, splitting costs
/// more (each part filters and scans every segment again) than it saves.
const MIN_QUERIES_PER_PART: usize = 4;

pub trait Fanout: Send + Sync + 'static {
    /// Runs on the search pool (blocking, CPU-bound).
    fn search(&self, collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK>;
}

#[derive(Debug, Default)]
pub struct LocalFanout;

impl Fanout for LocalFanout {
    /// A request of many query vectors is split into parts searched in parallel: faiss runs
    /// single-threaded on the pool ([`crate::ann::single_threaded_on_this_thread`]), so the pool
    /// is what spreads a batch over the cores.
    fn search(&self, collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK> {
        let n_parts = rayon::current_num_threads().min(plan.nq() / MIN_QUERIES_PER_PART);
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

fn search_shards(collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK> {
    let parts = collection.shards().par_iter().map(|s| s.search(plan)).collect::<Result<Vec<_>>>()?;
    Ok(merge_topk(plan.metric, plan.k, plan.nq(), parts))
}
