//! `tandem bench ...`: benchmarks that print a human table and write JSON.
pub mod campaign;
pub mod failover;
pub mod gateway;
pub mod milvus;
pub mod replicas;
pub mod replication;
pub mod search;

use serde::Serialize;
use tandem_cluster::config::WalSync;
use tandem_proto::v1 as pb;

use crate::dataset::Dataset;

/// An insert of base rows `lo..hi` of `ds` into `collection`, each row's id its row number.
pub(crate) fn insert_rows(collection: &str, ds: &Dataset, lo: usize, hi: usize) -> pb::InsertRequest {
    pb::InsertRequest {
        ack: 0,
        collection: collection.into(),
        ids: (lo as i64..hi as i64).collect(),
        vectors: ds.base[lo * ds.dim..hi * ds.dim].to_vec(),
        payloads: Vec::new(),
    }
}

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
    stat_cpu_secs(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// CPU time of this process's live threads whose name starts with `prefix` (a runtime's
/// `thread_name`; Linux keeps the first 15 bytes), from /proc; None elsewhere. A thread that
/// has exited is no longer counted: measure threads that outlive the measurement.
pub(crate) fn threads_cpu_secs(prefix: &str) -> Option<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) {
            // A thread that exits between the listing and this read used nothing more.
            total += std::fs::read_to_string(task.path().join("stat")).ok().and_then(|s| stat_cpu_secs(&s)).unwrap_or(0.0);
        }
    }
    Some(total)
}

/// utime + stime of a /proc `stat` line, in seconds.
fn stat_cpu_secs(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis
    // start at field 3, so utime (14) and stime (15) are the 12th and 13th of them.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // /proc counts in USER_HZ, which the kernel ABI fixes at 100.
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A busy thread's CPU is counted under its name's prefix, and only there.
    #[test]
    fn threads_cpu_is_counted_by_name() {
        let busy = std::thread::Builder::new()
            .name("cpu-probe-busy".into())
            .spawn(|| {
                let started = std::time::Instant::now();
                // Busy until /proc shows 50 ms of it (ticks are 10 ms), or give up.
                while threads_cpu_secs("cpu-probe").unwrap() < 0.05 {
                    std::hint::black_box((0..10_000u64).sum::<u64>());
                    if started.elapsed() > std::time::Duration::from_secs(20) {
                        return false;
                    }
                }
                true
            })
            .unwrap();
        assert!(busy.join().unwrap(), "a busy thread's CPU never reached 50 ms under its name");
        // Exited threads are no longer counted; a name no thread has counts nothing.
        assert_eq!(threads_cpu_secs("cpu-probe"), Some(0.0));
        assert_eq!(threads_cpu_secs("no-such-thread"), Some(0.0));
        assert!(process_cpu_secs().unwrap() >= 0.05);
    }
}
