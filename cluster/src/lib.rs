//! tandem-cluster: a vector-search cluster node.
//!
//! ```text
//!  gRPC (service) ──► Node ──► Collection ──► Shard ──► WAL (per shard)
//!                      │                        └─────► segments: Growing (exact) / Sealed (faiss)
//!                      ├─ search pool (rayon): Fanout scatters a SearchPlan over shards/segments
//!                      └─ index builders: build faiss indexes off the request path, checkpoint
//! ```
//!
//! See `docs/architecture.md` for the write path, the read path and the on-disk format.
// `unsafe` is denied workspace-wide; only `ann` (the faiss binding) allows it.
#![deny(unsafe_code)]

pub mod ann;
pub mod batch;
pub mod collection;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod fanout;
pub mod feed;
pub mod filter;
pub mod fsio;
pub mod node;
pub mod placement;
pub mod query_node;
pub mod replication;
pub mod role;
pub mod schema;
pub mod segment;
pub mod server;
pub mod service;
pub mod shard;
pub mod term;
pub mod ts;
pub mod wal;

pub use config::ClusterConfig;
pub use error::{ClusterError, Result};
pub use node::Node;
pub use role::{ReplicationState, Role};
