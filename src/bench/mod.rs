//! `tandem bench ...`: benchmarks that print a human table and write JSON.
pub mod failover;
pub mod gateway;
pub mod replication;
pub mod search;

use serde::Serialize;
use tandem_cluster::config::WalSync;

/// `--wal-sync` of the benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WalSyncArg {
    /// fsync before every acknowledgement (concurrent writes share one fsync), on a leader and
    /// when an alternative applies
    Always,
    /// no explicit fsync: measures without the disk's flush latency
    Never,
}

impl From<WalSyncArg> for WalSync {
    fn from(a: WalSyncArg) -> WalSync {
        match a {
            WalSyncArg::Always => WalSync::Always,
            WalSyncArg::Never => WalSync::Never,
        }
    }
}
