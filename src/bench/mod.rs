//! `tandem bench ...`: benchmarks that print a human table and write JSON.
pub mod replication;
pub mod search;
