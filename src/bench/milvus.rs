//! `tandem bench milvus`: tandem side by side with the real Milvus 2.3.5 through the same
//! pymilvus workload (the script `milvus.py` beside this file, carried in the binary): ingest,
//! time until indexed and loaded, sequential p50/p99, QPS with concurrent clients, recall@10,
//! server peak RSS. The tandem side is a `tandem cluster` run from this binary; build it in
//! release mode for figures that mean something.
//!
//! It needs the venv `./scripts/differential` installs (milvus 2.3.5 and pymilvus 2.3.7).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, ensure};

use super::search::MetricArg;

const SCRIPT: &str = include_str!("milvus.py");

#[derive(Debug, Clone, clap::Args)]
pub struct MilvusBenchArgs {
    /// Rows (Gaussian mixture: 100 centres).
    #[arg(long, default_value_t = 100_000)]
    pub n: usize,
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Search queries (recall and latency are measured over them).
    #[arg(long, default_value_t = 1000)]
    pub queries: usize,
    /// HNSW search breadth, or a comma-separated sweep (e.g. 16,32,64,128,256): latency, QPS
    /// and recall at each.
    #[arg(long, default_value = "64")]
    pub ef: String,
    /// Vectors from this .npy file instead of the Gaussian mixture (e.g. `./scripts/dataset`'s
    /// real embeddings): its first --n + --queries rows, the last --queries of them the queries.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The metric both servers index and search with (cosine for sentence embeddings).
    #[arg(long, value_enum, default_value = "l2")]
    pub metric: MetricArg,
    /// Concurrent search clients for the QPS figure.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Which servers, in order.
    #[arg(long, default_value = "milvus,tandem")]
    pub servers: String,
    /// The Python with milvus 2.3.5 and pymilvus 2.3.7 [default: the venv scripts/differential makes].
    #[arg(long, value_name = "FILE")]
    pub python: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl MilvusBenchArgs {
    /// The --ef sweep, checked: a refusal names the bad value.
    fn efs(&self) -> anyhow::Result<Vec<usize>> {
        let efs = self
            .ef
            .split(',')
            .map(|e| match e.trim().parse::<usize>() {
                Ok(v) if (1..=32_768).contains(&v) => Ok(v),
                _ => anyhow::bail!("--ef {e:?} is not a whole number in 1..=32768"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        ensure!(efs.len() <= 16, "--ef {:?} lists {} values: at most 16", self.ef, efs.len());
        Ok(efs)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.efs()?;
        ensure!(self.n >= 1, "--n 0: at least one row is needed");
        ensure!((1..=100_000).contains(&self.queries), "--queries {} is out of range 1..=100000", self.queries);
        ensure!((1..=256).contains(&self.clients), "--clients {} is out of range 1..=256", self.clients);
        if let Some(f) = &self.file {
            ensure!(f.extension().is_some_and(|e| e == "npy"), "--file {}: only .npy files are read here", f.display());
            ensure!(f.is_file(), "--file {} does not exist", f.display());
        }
        Ok(())
    }
}

pub fn run(a: MilvusBenchArgs) -> anyhow::Result<()> {
    a.validate()?;
    let python = match &a.python {
        Some(p) => p.clone(),
        None => PathBuf::from(std::env::var("HOME").context("HOME")?).join(".cache/tandem/tools/milvus-2.3.5/bin/python"),
    };
    ensure!(
        python.exists(),
        "{} is missing: run ./scripts/differential once (it installs milvus 2.3.5 and pymilvus 2.3.7)",
        python.display()
    );
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("milvus_bench.py");
    std::fs::write(&script, SCRIPT)?;
    let out = Command::new(&python)
        .arg(&script)
        .args(["--servers", &a.servers, "--n", &a.n.to_string(), "--dim", &a.dim.to_string()])
        .args(["--queries", &a.queries.to_string(), "--ef", &a.ef.replace(' ', ""), "--clients", &a.clients.to_string()])
        .args(["--metric", metric_name(a.metric)])
        .args(a.file.iter().flat_map(|f| [std::ffi::OsStr::new("--file"), f.as_os_str()]))
        .env("TANDEM_BIN", std::env::current_exe()?)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the bench script")?;
    ensure!(out.status.success(), "the bench script failed ({})", out.status);
    let text = String::from_utf8(out.stdout)?;
    let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default()).context("the bench script's JSON")?;
    println!(
        "tandem bench milvus: {} x {} of {}, {} ({})",
        report["n"],
        report["dim"],
        report["source"].as_str().unwrap_or("?"),
        report["metric"].as_str().unwrap_or("?"),
        report["index"].as_str().unwrap_or("?")
    );
    println!(
        "{:<8} {:>12} {:>16} {:>9} {:>6} {:>8} {:>8} {:>9} {:>8}",
        "server", "ingest r/s", "indexed+loaded s", "peak MB", "ef", "p50 ms", "p99 ms", "qps", "recall"
    );
    for r in report["results"].as_array().into_iter().flatten() {
        for (i, at) in r["sweep"].as_array().into_iter().flatten().enumerate() {
            let f = |k: &str| at[k].to_string();
            // The server's own figures once, on its first row.
            let (server, ingest, ready, peak) = if i == 0 {
                (
                    r["server"].as_str().unwrap_or("?").to_string(),
                    r["ingest_rows_per_s"].to_string(),
                    r["indexed_and_loaded_s"].to_string(),
                    r["peak_rss_mb"].as_f64().map_or("?".into(), |m| format!("{m:.0}")),
                )
            } else {
                Default::default()
            };
            println!(
                "{server:<8} {ingest:>12} {ready:>16} {peak:>9} {:>6} {:>8} {:>8} {:>9} {:>8}",
                f("ef"),
                f("p50_ms"),
                f("p99_ms"),
                f("qps"),
                f("recall_at_10")
            );
        }
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The metric as Milvus names it.
fn metric_name(m: MetricArg) -> &'static str {
    match m {
        MetricArg::L2 => "L2",
        MetricArg::Ip => "IP",
        MetricArg::Cosine => "COSINE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: MilvusBenchArgs,
    }

    fn args(extra: &[&str]) -> MilvusBenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(extra.iter().copied())).unwrap().a
    }

    /// Bad arguments are refused before anything starts, naming the bad value.
    #[test]
    fn arguments_are_checked_by_name() {
        assert_eq!(args(&["--ef", "16, 64,256"]).efs().unwrap(), vec![16, 64, 256]);
        let e = args(&["--ef", "16,x"]).validate().unwrap_err().to_string();
        assert!(e.contains("--ef \"x\""), "{e}");
        let e = args(&["--ef", "0"]).validate().unwrap_err().to_string();
        assert!(e.contains("--ef \"0\""), "{e}");
        let e = args(&["--file", "/nonexistent/vectors.npy"]).validate().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vectors.npy does not exist"), "{e}");
        let e = args(&["--file", "vectors.fvecs"]).validate().unwrap_err().to_string();
        assert!(e.contains("only .npy"), "{e}");
        let e = args(&["--clients", "0"]).validate().unwrap_err().to_string();
        assert!(e.contains("--clients 0"), "{e}");
        assert_eq!(metric_name(args(&["--metric", "cosine"]).metric), "COSINE");
        args(&[]).validate().unwrap();
    }
}
