//! `tandem bench ...`: benchmarks that print a human table and write JSON.
pub mod campaign;
pub mod failover;
pub mod gateway;
pub mod milvus;
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

/// TANDEM_BENCH_LOG (a RUST_LOG filter) logs a bench's own steps to stderr, beside the
/// clusters' logs.
pub(crate) fn log_if_asked() {
    if let Ok(filter) = std::env::var("TANDEM_BENCH_LOG") {
        let _ =
            tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_writer(std::io::stderr).try_init();
    }
}

/// CPU time (user + system) this process has used so far, from /proc; None elsewhere.
pub(crate) fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis
    // start at field 3, so utime (14) and stime (15) are the 12th and 13th of them.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // /proc counts in USER_HZ, which the kernel ABI fixes at 100.
    Some((utime + stime) as f64 / 100.0)
}
