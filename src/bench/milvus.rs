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
    /// HNSW search breadth.
    #[arg(long, default_value_t = 64)]
    pub ef: usize,
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

pub fn run(a: MilvusBenchArgs) -> anyhow::Result<()> {
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
        .args(["--queries", &a.queries.to_string(), "--ef", &a.ef.to_string(), "--clients", &a.clients.to_string()])
        .env("TANDEM_BIN", std::env::current_exe()?)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the bench script")?;
    ensure!(out.status.success(), "the bench script failed ({})", out.status);
    let text = String::from_utf8(out.stdout)?;
    let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default()).context("the bench script's JSON")?;
    println!("tandem bench milvus: {} x {} ({}), ef {}", report["n"], report["dim"], report["index"], report["ef"]);
    println!(
        "{:<8} {:>12} {:>16} {:>8} {:>8} {:>9} {:>8} {:>9}",
        "server", "ingest r/s", "indexed+loaded s", "p50 ms", "p99 ms", "qps", "recall", "peak MB"
    );
    for r in report["results"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].to_string();
        println!(
            "{:<8} {:>12} {:>16} {:>8} {:>8} {:>9} {:>8} {:>9}",
            r["server"].as_str().unwrap_or("?"),
            f("ingest_rows_per_s"),
            f("indexed_and_loaded_s"),
            f("p50_ms"),
            f("p99_ms"),
            f("qps"),
            f("recall_at_10"),
            r["peak_rss_mb"].as_f64().map_or("?".into(), |m| format!("{m:.0}"))
        );
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
