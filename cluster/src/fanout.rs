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

pub trait Fanout: Send + Sync + 'static {
    /// Runs on the search pool (blocking, CPU-bound).
    fn search(&self, collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK>;
}

#[derive(Debug, Default)]
pub struct LocalFanout;

impl Fanout for LocalFanout {
    fn search(&self, collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK> {
        let parts = collection.shards().par_iter().map(|s| s.search(plan)).collect::<Result<Vec<_>>>()?;
        Ok(merge_topk(plan.metric, plan.k, plan.nq(), parts))
    }
}
