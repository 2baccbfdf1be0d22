//! `tandem bench search`: what the gRPC serving path costs compared with faiss itself.
//!
//! One process, one run: generate (or read) a data set and its exact top-k, start an in-process
//! cluster on a loopback port, ingest every vector through gRPC with the WAL on, then for each
//! index kind measure
//!
//! ```text
//!   grpc: client tasks ─► tonic ─► ClusterService::search ─► search pool ─► faiss  (one segment)
//!   raw:  threads ─────────────────────────────────────────────────────────► faiss  (same kind,
//!                                                                                  same vectors)
//! ```
//!
//! one query per call on both sides, and report QPS, latency, CPU per query and recall@k for
//! each, and the QPS ratio. The cluster's segment is sized to hold every row, so the cluster
//! searches exactly one faiss index built like the raw one: the ratio is the cost of the serving
//! path, not of a different index layout.
//!
//! Concurrency. Raw faiss peaks with one thread per core (`--concurrency`). A server peaks only
//! with more requests in flight than it has cores, because each request also spends time in the
//! network and in thread hand-offs during which its core could serve another: `--grpc-concurrency`
//! (4x by default) is that load, and the QPS ratio compares the two peaks. The gRPC path is also
//! measured at `--concurrency`, which compares latencies at equal load.
//!
//! The measurements alternate in short rounds, so that background load on a shared machine hits
//! every path alike instead of whichever ran last.

use super::{WalSyncArg, process_cpu_secs, threads_cpu_secs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Serialize;
use tandem_client::Channel;
use tandem_cluster::ann::{AnnIndex, Knobs};
use tandem_cluster::schema::{IndexKind, Metric};
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;

use crate::dataset::{self, Dataset};
use crate::readers;

/// Large enough for an ingest batch of 2000 x 4096-d vectors.
const MAX_MESSAGE_BYTES: usize = 64 << 20;
const COLLECTION: &str = "bench";

/// Requests in flight through gRPC per raw thread, unless `--grpc-concurrency` says otherwise.
const GRPC_INFLIGHT_PER_THREAD: usize = 4;

/// The name of the client runtime's threads: the gRPC path's CPU is split into theirs and the
/// cluster's (everything else in the process) by it.
const CLIENT_THREADS: &str = "bench-client";

/// Each measurement is split into this many rounds; every round runs each path once.
const ROUNDS: usize = 5;

/// The figures the project publishes; the report says whether each is met.
const TARGET_HNSW_RECALL: f64 = 0.95;
const TARGET_QPS_RATIO: f64 = 0.7;
const TARGET_INGEST_VPS: f64 = 50_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexArg {
    Flat,
    #[value(name = "ivf_flat", alias = "ivf-flat", alias = "ivf")]
    IvfFlat,
    Hnsw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricArg {
    L2,
    Ip,
    Cosine,
}

/// The index defaults give recall@10 >= 0.95 on the default 100k x 128 set (measured: IVF 1.00,
/// HNSW 0.99): nlist ~ 3 * sqrt(n) with nprobe 32, HNSW M=16 with efConstruction 200 and
/// efSearch 64.
#[derive(Debug, Clone, clap::Args)]
pub struct SearchBenchArgs {
    /// Base vectors (synthetic), or the most to take from --file
    #[arg(long, default_value_t = 100_000)]
    pub n: usize,
    /// Dimension of synthetic vectors (a --file gives its own)
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Query vectors (with --file: the last ones of the rows read, held out of the base)
    #[arg(long, default_value_t = 1000)]
    pub queries: usize,
    /// Neighbours per query (recall@k)
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Gaussian clusters of the synthetic data
    #[arg(long, default_value_t = 100)]
    pub clusters: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Read vectors from this file (.npy, .fvecs or JSON lines) instead of generating them
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Index kinds to measure, in order
    #[arg(long, value_enum, value_delimiter = ',', default_value = "flat,ivf_flat,hnsw")]
    pub indexes: Vec<IndexArg>,
    #[arg(long, value_enum, ignore_case = true, default_value_t = MetricArg::L2)]
    pub metric: MetricArg,
    /// Raw faiss search threads, and the gRPC load at which latencies are compared [default:
    /// number of cores]
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// gRPC requests in flight for the QPS comparison [default: 4 x --concurrency]
    #[arg(long)]
    pub grpc_concurrency: Option<usize>,
    /// Length of each measurement (the first round always asks every query once)
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Stop each measurement after this many searches instead of after --duration-secs
    #[arg(long)]
    pub queries_per_run: Option<usize>,
    #[arg(long, default_value_t = 1024)]
    pub ivf_nlist: u32,
    #[arg(long, default_value_t = 32)]
    pub nprobe: u32,
    #[arg(long, default_value_t = 16)]
    pub hnsw_m: u32,
    #[arg(long, default_value_t = 200)]
    pub ef_construction: u32,
    #[arg(long, default_value_t = 64)]
    pub ef_search: u32,
    /// HNSW efSearch values to measure after the main run: recall and QPS at each, on both
    /// paths (a recall/QPS curve)
    #[arg(long, value_delimiter = ',')]
    pub ef_sweep: Vec<u32>,
    /// IVF_FLAT nprobe values to measure after the main run, likewise
    #[arg(long, value_delimiter = ',')]
    pub nprobe_sweep: Vec<u32>,
    /// The cluster's search.max_batch_queries: most queries of searches merged while its search
    /// pool is busy (1: never merge)
    #[arg(long, default_value_t = tandem_cluster::batch::MAX_BATCH_QUERIES)]
    pub max_batch_queries: usize,
    /// Rows per Insert request during ingest
    #[arg(long, default_value_t = 2000)]
    pub batch: usize,
    /// Concurrent Insert streams during ingest (they share WAL fsyncs)
    #[arg(long, default_value_t = 4)]
    pub ingest_streams: usize,
    #[arg(long, value_enum, default_value_t = WalSyncArg::Always)]
    pub wal_sync: WalSyncArg,
    /// Parent of the cluster's temporary data directory, whose WAL is fsynced [default: the
    /// system temp dir]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write every figure and parameter here as JSON
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl IndexArg {
    fn kind(self, a: &SearchBenchArgs) -> IndexKind {
        match self {
            IndexArg::Flat => IndexKind::Flat,
            IndexArg::IvfFlat => IndexKind::IvfFlat { nlist: a.ivf_nlist },
            IndexArg::Hnsw => IndexKind::Hnsw { m: a.hnsw_m, ef_construction: a.ef_construction },
        }
    }

    fn name(self) -> &'static str {
        match self {
            IndexArg::Flat => "flat",
            IndexArg::IvfFlat => "ivf_flat",
            IndexArg::Hnsw => "hnsw",
        }
    }
}

impl MetricArg {
    fn engine(self) -> Metric {
        match self {
            MetricArg::L2 => Metric::L2,
            MetricArg::Ip => Metric::Ip,
            MetricArg::Cosine => Metric::Cosine,
        }
    }

    fn proto(self) -> pb::Metric {
        match self {
            MetricArg::L2 => pb::Metric::L2,
            MetricArg::Ip => pb::Metric::Ip,
            MetricArg::Cosine => pb::Metric::Cosine,
        }
    }
}

impl SearchBenchArgs {
    fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.n >= 1, "--n {} must be at least 1", self.n);
        ensure!(self.file.is_some() || (1..=32_768).contains(&self.dim), "--dim {} is out of range 1..=32768", self.dim);
        ensure!(self.queries >= 1, "--queries {} must be at least 1", self.queries);
        ensure!((1..=16_384).contains(&self.k), "--k {} is out of range 1..=16384", self.k);
        ensure!(self.clusters >= 1, "--clusters {} must be at least 1", self.clusters);
        ensure!(!self.indexes.is_empty(), "--indexes is empty: name at least one of flat, ivf_flat, hnsw");
        ensure!(self.concurrency != Some(0), "--concurrency 0 must be at least 1");
        ensure!(self.grpc_concurrency != Some(0), "--grpc-concurrency 0 must be at least 1");
        ensure!(self.duration_secs.is_finite() && self.duration_secs > 0.0, "--duration-secs {} must be positive", self.duration_secs);
        ensure!(self.queries_per_run != Some(0), "--queries-per-run 0 must be at least 1");
        ensure!(
            (1..=4096).contains(&self.max_batch_queries),
            "--max-batch-queries {} is out of range 1..=4096 (1: never merge)",
            self.max_batch_queries
        );
        ensure!((1..=65_536).contains(&self.ivf_nlist), "--ivf-nlist {} is out of range 1..=65536", self.ivf_nlist);
        ensure!((1..=65_536).contains(&self.nprobe), "--nprobe {} is out of range 1..=65536", self.nprobe);
        ensure!((2..=128).contains(&self.hnsw_m), "--hnsw-m {} is out of range 2..=128", self.hnsw_m);
        ensure!((8..=4096).contains(&self.ef_construction), "--ef-construction {} is out of range 8..=4096", self.ef_construction);
        ensure!((1..=32_768).contains(&self.ef_search), "--ef-search {} is out of range 1..=32768", self.ef_search);
        if let Some(v) = self.ef_sweep.iter().find(|v| !(1..=32_768).contains(*v)) {
            bail!("--ef-sweep value {v} is out of range 1..=32768");
        }
        if let Some(v) = self.nprobe_sweep.iter().find(|v| !(1..=65_536).contains(*v)) {
            bail!("--nprobe-sweep value {v} is out of range 1..=65536");
        }
        ensure!((1..=100_000).contains(&self.batch), "--batch {} is out of range 1..=100000", self.batch);
        ensure!(self.ingest_streams >= 1, "--ingest-streams 0 must be at least 1");
        let mut seen = Vec::new();
        for i in &self.indexes {
            ensure!(!seen.contains(i), "--indexes names {} twice", i.name());
            seen.push(*i);
        }
        Ok(())
    }

    fn knobs(&self) -> Knobs {
        Knobs { nprobe: self.nprobe as usize, ef_search: self.ef_search as usize }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    version: &'static str,
    machine: Machine,
    params: Params,
    ground_truth_secs: f64,
    ingest: IngestReport,
    indexes: Vec<IndexReport>,
    targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    os: &'static str,
    arch: &'static str,
    debug_build: bool,
}

#[derive(Debug, Serialize)]
struct Params {
    source: String,
    n: usize,
    queries: usize,
    dim: usize,
    k: usize,
    clusters: Option<usize>,
    seed: Option<u64>,
    metric: MetricArg,
    concurrency: usize,
    grpc_concurrency: usize,
    duration_secs: f64,
    rounds: usize,
    queries_per_run: Option<usize>,
    ivf_nlist: u32,
    nprobe: u32,
    hnsw_m: u32,
    ef_construction: u32,
    ef_search: u32,
    batch: usize,
    ingest_streams: usize,
    wal_sync: WalSyncArg,
    max_batch_queries: usize,
    consistency: &'static str,
}

#[derive(Debug, Serialize)]
struct IngestReport {
    vectors: usize,
    /// Vector data only (n * dim * 4 bytes), in 10^6 bytes.
    megabytes: f64,
    secs: f64,
    vectors_per_sec: f64,
    mb_per_sec: f64,
    requests: usize,
}

#[derive(Debug, Serialize)]
struct IndexReport {
    index: IndexArg,
    spec: String,
    /// Cluster: from the end of ingest (first index) or CreateIndex (later ones) until Flush
    /// reports the segment indexed and persisted.
    build_secs: f64,
    /// `AnnIndex::build` of the same kind over the same vectors, in this process.
    raw_build_secs: f64,
    /// Through gRPC at `grpc_concurrency` requests in flight.
    grpc: RunReport,
    /// Through gRPC at `concurrency`, the raw side's load; absent when the two are equal.
    grpc_matched: Option<RunReport>,
    raw: RunReport,
    /// grpc.qps / raw.qps
    qps_ratio: f64,
    /// grpc_matched.qps / raw.qps
    matched_qps_ratio: Option<f64>,
    /// raw.cpu_us_per_query / grpc.cpu_us_per_query: the QPS ratio to expect where both paths
    /// saturate every core. On a machine shared with other work the QPS ratio drifts from it,
    /// because the gRPC path runs more threads and so wins a larger share of the CPU.
    cpu_ratio: Option<f64>,
    /// raw.cpu_us_per_query / grpc.cluster_cpu_us_per_query: the same without the clients' cost,
    /// which a deployment pays on other machines: what serving a search costs the cluster.
    cluster_cpu_ratio: Option<f64>,
    /// `--ef-sweep` (HNSW) or `--nprobe-sweep` (IVF_FLAT), in the order given.
    sweep: Vec<SweepPoint>,
}

/// One setting of a sweep: every query asked at least once on each path.
#[derive(Debug, Serialize)]
struct SweepPoint {
    /// "ef_search" or "nprobe"
    knob: &'static str,
    value: u32,
    grpc: RunReport,
    raw: RunReport,
}

#[derive(Debug, Clone, Serialize)]
struct RunReport {
    concurrency: usize,
    requests: usize,
    secs: f64,
    qps: f64,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    recall: f64,
    /// Distinct queries the recall is computed over.
    recall_queries: usize,
    /// Process CPU time during the run / (wall time * cores): near 1 means CPU-bound, well
    /// below 1 means the searches wait on something else (wake-ups, the network, other
    /// processes). Linux only.
    cpu_util: Option<f64>,
    /// Process CPU time per search, in microseconds (client, server and faiss together).
    cpu_us_per_query: Option<f64>,
    /// gRPC path: the part of `cpu_us_per_query` spent on the clients' threads (encoding,
    /// HTTP/2, decoding the answer), and the rest, the cluster's. Linux only.
    client_cpu_us_per_query: Option<f64>,
    cluster_cpu_us_per_query: Option<f64>,
    /// gRPC path: searches per batch the cluster's search pool ran (1.0: none merged).
    mean_batch: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Target {
    name: String,
    value: f64,
    min: f64,
    met: bool,
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// When a measured run stops: after `requests` searches, or once `duration` has passed, but
/// never before `min_requests` (the first round sets it to the query count, so that recall
/// covers every query).
#[derive(Debug, Clone, Copy)]
struct StopRule {
    duration: Duration,
    requests: Option<usize>,
    min_requests: usize,
}

impl StopRule {
    /// `i` is the number of searches started before this one.
    fn stop(&self, i: usize, started: Instant) -> bool {
        i >= self.min_requests && self.requests.map_or_else(|| started.elapsed() >= self.duration, |r| i >= r)
    }

    fn warmup(nq: usize, concurrency: usize) -> StopRule {
        let r = nq.min(200).max(concurrency * 4);
        StopRule { duration: Duration::ZERO, requests: Some(r), min_requests: 0 }
    }

    /// Round `round` of `ROUNDS` of a measurement.
    fn round(a: &SearchBenchArgs, round: usize, nq: usize) -> StopRule {
        StopRule {
            duration: Duration::from_secs_f64(a.duration_secs / ROUNDS as f64),
            requests: a.queries_per_run.map(|q| q.div_ceil(ROUNDS)),
            min_requests: if round == 0 { nq } else { 0 },
        }
    }
}

/// What one worker (task or thread) of a run observed.
#[derive(Debug, Default)]
struct WorkerLog {
    latencies_ns: Vec<u64>,
    /// (query number, ids) the first time each query was asked.
    results: Vec<(usize, Vec<i64>)>,
}

/// One run of one path: what its workers saw, its wall time, the process's CPU time and (gRPC)
/// its clients' part of it.
#[derive(Debug)]
struct Run {
    logs: Vec<WorkerLog>,
    secs: f64,
    cpu_secs: Option<f64>,
    client_cpu_secs: Option<f64>,
    /// gRPC: (batches, searches in them) the cluster's search pool ran.
    batches: Option<(u64, u64)>,
}

/// Every run of one path, summed over the rounds.
#[derive(Debug, Default)]
struct Sample {
    logs: Vec<WorkerLog>,
    secs: f64,
    cpu_secs: Option<f64>,
    client_cpu_secs: Option<f64>,
    batches: Option<(u64, u64)>,
    runs: usize,
}

impl Sample {
    fn add(&mut self, run: Run) {
        self.logs.extend(run.logs);
        self.secs += run.secs;
        let sum = |total: Option<f64>, x: Option<f64>| if self.runs == 0 { x } else { total.zip(x).map(|(a, b)| a + b) };
        self.cpu_secs = sum(self.cpu_secs, run.cpu_secs);
        self.client_cpu_secs = sum(self.client_cpu_secs, run.client_cpu_secs);
        self.batches = if self.runs == 0 { run.batches } else { self.batches.zip(run.batches).map(|(a, b)| (a.0 + b.0, a.1 + b.1)) };
        self.runs += 1;
    }

    fn summarize(self, concurrency: usize, cores: usize, truth: &[Vec<i64>], k: usize) -> RunReport {
        let Sample { logs, secs, cpu_secs, client_cpu_secs, batches, .. } = self;
        let mut lat: Vec<u64> = Vec::new();
        let mut answers: Vec<Option<Vec<i64>>> = vec![None; truth.len()];
        for log in logs {
            lat.extend(log.latencies_ns);
            for (q, ids) in log.results {
                answers[q].get_or_insert(ids);
            }
        }
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            // Nearest rank.
            let rank = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
            lat[rank - 1] as f64 / 1e6
        };
        let (results, truths): (Vec<Vec<i64>>, Vec<Vec<i64>>) =
            answers.into_iter().zip(truth).filter_map(|(a, t)| a.map(|a| (a, t.clone()))).unzip();
        let requests = lat.len();
        let per_query = |secs: Option<f64>| secs.filter(|_| requests > 0).map(|c| c * 1e6 / requests as f64);
        RunReport {
            concurrency,
            requests,
            secs,
            qps: if secs > 0.0 { requests as f64 / secs } else { 0.0 },
            mean_ms: if requests == 0 { 0.0 } else { lat.iter().sum::<u64>() as f64 / requests as f64 / 1e6 },
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: lat.last().map_or(0.0, |&x| x as f64 / 1e6),
            recall: dataset::recall_at_k(&results, &truths, k),
            recall_queries: results.len(),
            cpu_util: cpu_secs.filter(|_| secs > 0.0).map(|c| c / (secs * cores as f64)),
            cpu_us_per_query: per_query(cpu_secs),
            client_cpu_us_per_query: per_query(client_cpu_secs),
            cluster_cpu_us_per_query: per_query(cpu_secs.zip(client_cpu_secs).map(|(all, client)| all - client)),
            mean_batch: batches.filter(|b| b.0 > 0).map(|(batches, searches)| searches as f64 / batches as f64),
        }
    }
}

/// Searches through gRPC, one task per client on the clients' runtime, one query per request,
/// until `stop`.
async fn grpc_run(clients: &Clients<'_>, ds: &Arc<Dataset>, k: usize, knobs: Knobs, stop: StopRule) -> anyhow::Result<Run> {
    let next = Arc::new(AtomicUsize::new(0));
    let (cpu, client_cpu) = (process_cpu_secs(), threads_cpu_secs(CLIENT_THREADS));
    let batches = clients.node.batcher.stats();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients.clients.len());
    for client in clients.clients {
        let mut client = client.clone();
        let (ds, next) = (ds.clone(), next.clone());
        tasks.push(clients.rt.spawn(async move {
            let mut log = WorkerLog::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if stop.stop(i, started) {
                    return anyhow::Ok(log);
                }
                let q = i % ds.nq();
                let req = pb::SearchRequest {
                    collection: COLLECTION.into(),
                    vectors: ds.query(q).to_vec(),
                    top_k: k as u32,
                    params: Some(pb::SearchParams { nprobe: knobs.nprobe as u32, ef_search: knobs.ef_search as u32 }),
                    // The data is flushed and nothing writes during the run: EVENTUALLY skips the
                    // wait for the serviceable timestamp, which is not what is measured here.
                    read: Some(pb::ReadOptions { consistency: pb::ConsistencyLevel::Eventually as i32, ..Default::default() }),
                    ..Default::default()
                };
                let t = Instant::now();
                let resp = client.search(req).await.with_context(|| format!("search of query {q}"))?.into_inner();
                log.latencies_ns.push(t.elapsed().as_nanos() as u64);
                if i < ds.nq() {
                    let ids = resp.results.into_iter().next().map(|h| h.hits.into_iter().map(|h| h.id).collect()).unwrap_or_default();
                    log.results.push((q, ids));
                }
            }
        }));
    }
    let mut logs = Vec::with_capacity(tasks.len());
    for t in tasks {
        logs.push(t.await.context("search task")??);
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Run {
        logs,
        secs,
        cpu_secs: cpu_used(cpu, process_cpu_secs()),
        client_cpu_secs: cpu_used(client_cpu, threads_cpu_secs(CLIENT_THREADS)),
        batches: Some(sub(clients.node.batcher.stats(), batches)),
    })
}

/// CPU seconds between two readings (None where /proc could not be read).
fn cpu_used(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    after.zip(before).map(|(b, a)| b - a)
}

/// `after - before` of two (batches, searches) counts.
fn sub(after: (u64, u64), before: (u64, u64)) -> (u64, u64) {
    (after.0 - before.0, after.1 - before.1)
}

/// Search clients and the runtime they run on, apart from the cluster's, so that the CPU of the
/// gRPC path splits into theirs and the cluster's (`CLIENT_THREADS`). Their connections were
/// made on that runtime too: a connection's task runs where it was made.
#[derive(Clone, Copy)]
struct Clients<'a> {
    clients: &'a [TandemClient<Channel>],
    rt: &'a tokio::runtime::Handle,
    /// The cluster they search, for its batch counts.
    node: &'a tandem_cluster::Node,
}

/// Searches `index` directly from `threads` threads, one query per call, until `stop`.
/// Blocking: run it off the async runtime.
fn raw_run(index: &AnnIndex, queries: &[f32], dim: usize, k: usize, knobs: Knobs, threads: usize, stop: StopRule) -> anyhow::Result<Run> {
    let nq = queries.len() / dim;
    let next = AtomicUsize::new(0);
    let cpu = process_cpu_secs();
    let started = Instant::now();
    let logs = std::thread::scope(|s| {
        let workers = (0..threads)
            .map(|w| {
                // Named, so that a profile tells them from tokio's threads.
                std::thread::Builder::new().name(format!("raw-search-{w}")).spawn_scoped(s, || {
                    let mut log = WorkerLog::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if stop.stop(i, started) {
                            return anyhow::Ok(log);
                        }
                        let q = i % nq;
                        let t = Instant::now();
                        let (_, labels) = index.search(&queries[q * dim..(q + 1) * dim], dim, k, None, knobs)?;
                        log.latencies_ns.push(t.elapsed().as_nanos() as u64);
                        if i < nq {
                            log.results.push((q, labels.into_iter().filter(|&l| l >= 0).collect()));
                        }
                    }
                })
            })
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot start a raw search thread")?;
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow::anyhow!("a raw search thread panicked"))?)
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let secs = started.elapsed().as_secs_f64();
    Ok(Run { logs, secs, cpu_secs: cpu_used(cpu, process_cpu_secs()), client_cpu_secs: None, batches: None })
}

async fn raw_run_blocking(
    index: &Arc<AnnIndex>,
    vectors: &Arc<Dataset>,
    k: usize,
    knobs: Knobs,
    threads: usize,
    stop: StopRule,
) -> anyhow::Result<Run> {
    let (index, vectors) = (index.clone(), vectors.clone());
    tokio::task::spawn_blocking(move || raw_run(&index, &vectors.queries, vectors.dim, k, knobs, threads, stop)).await?
}

// ---------------------------------------------------------------------------------------------
// Setup

/// The data set: synthetic, or rows of `--file` with the queries held out of their tail.
fn load(a: &SearchBenchArgs) -> anyhow::Result<(Dataset, String)> {
    let Some(path) = &a.file else {
        let ds = dataset::gaussian_mixture(a.n, a.queries, a.dim, a.clusters, a.seed);
        return Ok((ds, format!("gaussian_mixture(clusters={}, seed={})", a.clusters, a.seed)));
    };
    let want = a.n.saturating_add(a.queries);
    let mut file = readers::VectorFile::open(path, readers::Format::Auto, 0)?;
    let mut v = Vec::new();
    let mut rows = 0;
    while rows < want {
        let Some(batch) = file.next_batch((want - rows).min(65_536))? else { break };
        rows += batch.len();
        v.extend_from_slice(&batch.vectors);
    }
    let dim = file.dim().with_context(|| format!("--file {} holds no vectors", path.display()))?;
    let rows = v.len() / dim;
    ensure!(rows > a.queries, "--file {} has {rows} vectors: it needs more than --queries {}", path.display(), a.queries);
    let (base, queries) = v.split_at((rows - a.queries) * dim);
    let ds = Dataset { dim, base: base.to_vec(), queries: queries.to_vec() };
    if a.metric == MetricArg::Cosine {
        let zero = ds.base.chunks_exact(dim).chain(ds.queries.chunks_exact(dim)).position(|v| v.iter().all(|&x| x == 0.0));
        ensure!(zero.is_none(), "--file {}: row {} is all zeros, which COSINE cannot compare", path.display(), zero.unwrap_or(0));
    }
    Ok((ds, format!("file:{}", path.display())))
}

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<TandemClient<Channel>> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to the bench cluster at {addr}"))?;
    let client =
        TandemClient::new(Channel::from(channel)).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(client)
}

/// The search clients' runtime (`CLIENT_THREADS`), shut down without blocking when dropped (an
/// async context may not block).
struct ClientRuntime(Option<tokio::runtime::Runtime>);

impl ClientRuntime {
    fn start(threads: usize) -> anyhow::Result<ClientRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(CLIENT_THREADS)
            .enable_all()
            .build()
            .context("cannot start the search clients' runtime")?;
        Ok(ClientRuntime(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One connection each, as separate clients would have. (Sharing one HTTP/2 connection was
/// measured too: no cheaper per request, and slower, since every request then goes through
/// one connection task.)
async fn connect_many(addr: std::net::SocketAddr, n: usize) -> anyhow::Result<Vec<TandemClient<Channel>>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(connect(addr).await?);
    }
    Ok(clients)
}

/// Inserts every base row through gRPC, one stream per client.
async fn ingest(clients: &[TandemClient<Channel>], ds: &Arc<Dataset>, batch: usize) -> anyhow::Result<(f64, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let batches = ds.n().div_ceil(batch);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in clients {
        let mut client = client.clone();
        let (ds, next) = (ds.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    return anyhow::Ok(());
                }
                let (lo, hi) = (b * batch, ((b + 1) * batch).min(ds.n()));
                client.insert(super::insert_rows(COLLECTION, &ds, lo, hi)).await.with_context(|| format!("insert of rows {lo}..{hi}"))?;
            }
        }));
    }
    for t in tasks {
        t.await.context("ingest task")??;
    }
    Ok((started.elapsed().as_secs_f64(), batches))
}

/// Flushes, then checks that the collection is what the comparison assumes: one segment with
/// every row, indexed with `kind`.
async fn flush_and_check(client: &mut TandemClient<Channel>, n: usize, kind: IndexKind) -> anyhow::Result<()> {
    client.flush(pb::FlushRequest { collection: COLLECTION.into() }).await.context("flush")?;
    let info = client
        .describe_collection(pb::DescribeCollectionRequest { name: COLLECTION.into() })
        .await
        .context("describe collection")?
        .into_inner()
        .collection
        .context("describe collection returned no collection")?;
    let indexed = pb::segment_info::State::Indexed as i32;
    let segments: Vec<(u64, i32)> = info.segments.iter().map(|s| (s.rows, s.state)).collect();
    ensure!(
        segments == [(n as u64, indexed)],
        "after flush the bench collection should be one indexed segment of {n} rows, found {segments:?}"
    );
    let index = info.schema.and_then(|s| s.index);
    ensure!(index == Some(kind.to_proto()), "the bench collection's index is {index:?}, expected {kind}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run

pub async fn run(args: SearchBenchArgs) -> anyhow::Result<()> {
    let report = bench(&args).await?;
    print_table(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("cannot write --json {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// What `measure` needs besides the arguments.
struct Setup {
    ds: Arc<Dataset>,
    /// What the cluster stores: for COSINE, unit-length copies; else the data set itself.
    raw_vectors: Arc<Dataset>,
    truth: Vec<Vec<i64>>,
    k: usize,
    cores: usize,
    concurrency: usize,
    grpc_concurrency: usize,
}

async fn bench(a: &SearchBenchArgs) -> anyhow::Result<Report> {
    a.validate()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let concurrency = a.concurrency.unwrap_or(cores);
    let grpc_concurrency = a.grpc_concurrency.unwrap_or(concurrency * GRPC_INFLIGHT_PER_THREAD);
    let metric = a.metric.engine();

    let a2 = a.clone();
    let (ds, source) = tokio::task::spawn_blocking(move || load(&a2)).await??;
    let ds = Arc::new(ds);
    let (n, nq, dim) = (ds.n(), ds.nq(), ds.dim);
    let k = a.k.min(n);
    eprintln!("data: {n} base + {nq} query vectors of dim {dim} ({source}); computing the exact top-{k}...");
    let t = Instant::now();
    let ds2 = ds.clone();
    let truth = tokio::task::spawn_blocking(move || dataset::ground_truth(&ds2, k, metric)).await?;
    let ground_truth_secs = t.elapsed().as_secs_f64();

    let raw_vectors = if metric == Metric::Cosine {
        let ds2 = ds.clone();
        let v = tokio::task::spawn_blocking(move || {
            let mut v = (*ds2).clone();
            dataset::normalize_rows(&mut v.base, dim);
            dataset::normalize_rows(&mut v.queries, dim);
            v
        });
        Arc::new(v.await?)
    } else {
        ds.clone()
    };

    // Removed on drop, so a failed run leaves nothing behind.
    let scratch = match &a.data_dir {
        Some(parent) => tempfile::Builder::new().prefix("tandem-bench-").tempdir_in(parent),
        None => tempfile::Builder::new().prefix("tandem-bench-").tempdir(),
    }
    .context("cannot create the bench cluster's data directory")?;
    let mut cfg = tandem_cluster::ClusterConfig {
        cluster_id: "bench".into(),
        listen: "127.0.0.1:0".into(),
        data_dir: scratch.path().join("data"),
        ..Default::default()
    };
    // One segment holding every row: the cluster then searches a single faiss index built over
    // the same vectors as the raw one.
    cfg.segment.seal_rows = n.max(1);
    cfg.wal.sync = a.wal_sync.into();
    cfg.limits.max_message_bytes = MAX_MESSAGE_BYTES;
    cfg.limits.max_write_rows = cfg.limits.max_write_rows.max(a.batch);
    cfg.search.max_batch_queries = a.max_batch_queries;
    // A member as `tandem cluster` runs one (it validates the configuration first).
    let member = tandem_node::Member::start(cfg).await.context("cannot start the bench cluster")?;
    let setup = Setup { ds, raw_vectors, truth, k, cores, concurrency, grpc_concurrency };
    let result = measure(a, member.addr(), member.node(), &setup).await;
    let stopped = member.stop(crate::config::MEMBER_DRAIN).await;
    let (ingest, indexes) = result?;
    stopped.context("the bench cluster did not stop cleanly")?;
    // Hundreds of MB of segment and index files: removed off the async workers.
    tokio::task::spawn_blocking(move || scratch.close()).await?.context("cannot remove the bench cluster's data directory")?;

    let mut targets = vec![Target {
        name: "ingest_vectors_per_sec".into(),
        value: ingest.vectors_per_sec,
        min: TARGET_INGEST_VPS,
        met: ingest.vectors_per_sec >= TARGET_INGEST_VPS,
    }];
    for r in &indexes {
        if r.index == IndexArg::Hnsw {
            let recall = r.grpc.recall;
            targets.push(Target {
                name: format!("hnsw_grpc_recall_at_{k}"),
                value: recall,
                min: TARGET_HNSW_RECALL,
                met: recall >= TARGET_HNSW_RECALL,
            });
        }
        targets.push(Target {
            name: format!("{}_qps_ratio", r.index.name()),
            value: r.qps_ratio,
            min: TARGET_QPS_RATIO,
            met: r.qps_ratio >= TARGET_QPS_RATIO,
        });
    }

    Ok(Report {
        benchmark: "tandem bench search",
        version: env!("CARGO_PKG_VERSION"),
        machine: Machine { cores, os: std::env::consts::OS, arch: std::env::consts::ARCH, debug_build: cfg!(debug_assertions) },
        params: Params {
            source,
            n,
            queries: nq,
            dim,
            k,
            clusters: a.file.is_none().then_some(a.clusters),
            seed: a.file.is_none().then_some(a.seed),
            metric: a.metric,
            concurrency,
            grpc_concurrency,
            duration_secs: a.duration_secs,
            rounds: ROUNDS,
            queries_per_run: a.queries_per_run,
            ivf_nlist: a.ivf_nlist,
            nprobe: a.nprobe,
            hnsw_m: a.hnsw_m,
            ef_construction: a.ef_construction,
            ef_search: a.ef_search,
            batch: a.batch,
            ingest_streams: a.ingest_streams,
            wal_sync: a.wal_sync,
            max_batch_queries: a.max_batch_queries,
            consistency: "EVENTUALLY",
        },
        ground_truth_secs,
        ingest,
        indexes,
        targets,
    })
}

async fn measure(
    a: &SearchBenchArgs,
    addr: std::net::SocketAddr,
    node: &Arc<tandem_cluster::Node>,
    s: &Setup,
) -> anyhow::Result<(IngestReport, Vec<IndexReport>)> {
    let Setup { ds, raw_vectors, truth, k, cores, concurrency, grpc_concurrency } = s;
    let (k, cores, concurrency, grpc_concurrency) = (*k, *cores, *concurrency, *grpc_concurrency);
    let (n, nq, dim) = (ds.n(), ds.nq(), ds.dim);
    let metric = a.metric.engine();
    let knobs = a.knobs();
    let mut admin = connect(addr).await?;
    let client_rt = ClientRuntime::start(cores)?;
    let rt = client_rt.handle();
    let search_clients = rt.spawn(connect_many(addr, grpc_concurrency.max(concurrency))).await??;

    let schema = pb::CollectionSchema {
        name: COLLECTION.into(),
        dim: dim as u32,
        metric: a.metric.proto() as i32,
        index: Some(a.indexes[0].kind(a).to_proto()),
        shards: 1,
        fields: Vec::new(),
        ..Default::default()
    };
    admin.create_collection(pb::CreateCollectionRequest { schema: Some(schema) }).await.context("create collection")?;

    eprintln!("ingest: {n} vectors in batches of {} from {} streams (wal sync {:?})...", a.batch, a.ingest_streams, a.wal_sync);
    let ingest_clients = connect_many(addr, a.ingest_streams).await?;
    let (ingest_secs, requests) = ingest(&ingest_clients, ds, a.batch).await?;
    drop(ingest_clients);
    let megabytes = (n * dim * 4) as f64 / 1e6;
    let ingest = IngestReport {
        vectors: n,
        megabytes,
        secs: ingest_secs,
        vectors_per_sec: n as f64 / ingest_secs,
        mb_per_sec: megabytes / ingest_secs,
        requests,
    };

    let mut reports = Vec::new();
    for (i, &which) in a.indexes.iter().enumerate() {
        let kind = which.kind(a);
        eprintln!("{kind}: building in the cluster...");
        let t = Instant::now();
        if i > 0 {
            let req = pb::CreateIndexRequest { collection: COLLECTION.into(), index: Some(kind.to_proto()) };
            admin.create_index(req).await.context("create index")?;
        }
        flush_and_check(&mut admin, n, kind).await?;
        let build_secs = t.elapsed().as_secs_f64();

        eprintln!("{kind}: building raw faiss...");
        let rv = raw_vectors.clone();
        let t = Instant::now();
        let index = Arc::new(tokio::task::spawn_blocking(move || AnnIndex::build(kind, metric, dim, &rv.base)).await??);
        let raw_build_secs = t.elapsed().as_secs_f64();

        let matched = grpc_concurrency != concurrency;
        eprintln!(
            "{kind}: searching in {ROUNDS} rounds: gRPC at {grpc_concurrency} in flight{}, raw faiss on {concurrency} threads...",
            if matched { format!(" and at {concurrency}") } else { String::new() }
        );
        let grpc_clients = &Clients { clients: &search_clients[..grpc_concurrency], rt, node };
        let matched_clients = &Clients { clients: &search_clients[..concurrency], rt, node };
        grpc_run(grpc_clients, ds, k, knobs, StopRule::warmup(nq, grpc_concurrency)).await?;
        raw_run_blocking(&index, raw_vectors, k, knobs, concurrency, StopRule::warmup(nq, concurrency)).await?;
        let (mut grpc, mut grpc_matched, mut raw) = (Sample::default(), Sample::default(), Sample::default());
        for round in 0..ROUNDS {
            let stop = StopRule::round(a, round, nq);
            grpc.add(grpc_run(grpc_clients, ds, k, knobs, stop).await?);
            if matched {
                grpc_matched.add(grpc_run(matched_clients, ds, k, knobs, stop).await?);
            }
            raw.add(raw_run_blocking(&index, raw_vectors, k, knobs, concurrency, stop).await?);
        }
        let grpc = grpc.summarize(grpc_concurrency, cores, truth, k);
        let grpc_matched = matched.then(|| grpc_matched.summarize(concurrency, cores, truth, k));
        let raw = raw.summarize(concurrency, cores, truth, k);

        let (knob, values) = match which {
            IndexArg::Hnsw => ("ef_search", &a.ef_sweep[..]),
            IndexArg::IvfFlat => ("nprobe", &a.nprobe_sweep[..]),
            IndexArg::Flat => ("", &[][..]),
        };
        let mut sweep = Vec::with_capacity(values.len());
        for &value in values {
            eprintln!("{kind}: {knob} {value}...");
            let knobs = match which {
                IndexArg::Hnsw => Knobs { ef_search: value as usize, ..knobs },
                _ => Knobs { nprobe: value as usize, ..knobs },
            };
            // One round's length, and never before every query was asked (the recall).
            let stop = StopRule { min_requests: nq, ..StopRule::round(a, 1, nq) };
            let summarize = |run: Run, concurrency| {
                let mut s = Sample::default();
                s.add(run);
                s.summarize(concurrency, cores, truth, k)
            };
            let g = summarize(grpc_run(grpc_clients, ds, k, knobs, stop).await?, grpc_concurrency);
            let r = summarize(raw_run_blocking(&index, raw_vectors, k, knobs, concurrency, stop).await?, concurrency);
            sweep.push(SweepPoint { knob, value, grpc: g, raw: r });
        }
        let ratio = |g: &RunReport| if raw.qps > 0.0 { g.qps / raw.qps } else { 0.0 };
        reports.push(IndexReport {
            index: which,
            spec: kind.to_string(),
            build_secs,
            raw_build_secs,
            qps_ratio: ratio(&grpc),
            matched_qps_ratio: grpc_matched.as_ref().map(ratio),
            cpu_ratio: raw.cpu_us_per_query.zip(grpc.cpu_us_per_query).filter(|(_, g)| *g > 0.0).map(|(r, g)| r / g),
            cluster_cpu_ratio: raw.cpu_us_per_query.zip(grpc.cluster_cpu_us_per_query).filter(|(_, g)| *g > 0.0).map(|(r, g)| r / g),
            grpc,
            grpc_matched,
            raw,
            sweep,
        });
    }
    Ok((ingest, reports))
}

fn print_table(r: &Report) {
    let p = &r.params;
    println!(
        "tandem bench search {}{}: {} x {} ({}), {} queries, k={}, metric {:?}, {} cores",
        r.version,
        if r.machine.debug_build { " (DEBUG build)" } else { "" },
        p.n,
        p.dim,
        p.source,
        p.queries,
        p.k,
        p.metric,
        r.machine.cores
    );
    let i = &r.ingest;
    println!(
        "ingest (wal sync {:?}, {} streams x {} rows): {} vectors in {:.2} s = {:.0} vectors/s, {:.1} MB/s",
        p.wal_sync, p.ingest_streams, p.batch, i.vectors, i.secs, i.vectors_per_sec, i.mb_per_sec
    );
    println!();
    println!(
        "{:<9} {:<10} {:>5} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6}",
        "index", "path", "conc", "build s", "recall", "qps", "p50 ms", "p99 ms", "cpu us/q", "clu us/q", "ratio", "cpu r", "clu r", "batch"
    );
    let us = |x: Option<f64>| x.map_or_else(|| "-".into(), |c| format!("{c:.0}"));
    let fraction = |x: Option<f64>| x.map_or_else(String::new, |r| format!("{r:.2}"));
    let row = |index: &str, path: &str, build: Option<f64>, x: &RunReport, ratios: [Option<f64>; 3]| {
        println!(
            "{:<9} {:<10} {:>5} {:>8} {:>7.4} {:>8.0} {:>8.3} {:>8.3} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6}",
            index,
            path,
            x.concurrency,
            build.map_or_else(String::new, |b| format!("{b:.2}")),
            x.recall,
            x.qps,
            x.p50_ms,
            x.p99_ms,
            us(x.cpu_us_per_query),
            us(x.cluster_cpu_us_per_query),
            fraction(ratios[0]),
            fraction(ratios[1]),
            fraction(ratios[2]),
            fraction(x.mean_batch),
        );
    };
    for x in &r.indexes {
        row(x.index.name(), "grpc", Some(x.build_secs), &x.grpc, [Some(x.qps_ratio), x.cpu_ratio, x.cluster_cpu_ratio]);
        if let Some(m) = &x.grpc_matched {
            row("", "grpc", None, m, [x.matched_qps_ratio, None, None]);
        }
        row("", "raw faiss", Some(x.raw_build_secs), &x.raw, [None; 3]);
    }
    println!("ratio = grpc qps / raw qps; cpu r = raw cpu per query / grpc cpu per query (the ratio to expect where both saturate");
    println!("every core); clu us/q = the gRPC path's CPU less its clients' threads (the cluster's share); clu r = raw cpu / that;");
    println!("batch = searches per batch the cluster's search pool ran (searches that wait for a busy pool go together)");
    if r.indexes.iter().any(|x| !x.sweep.is_empty()) {
        println!();
        println!(
            "{:<9} {:<10} {:>6} {:>7} {:>9} {:>8}   {:>7} {:>9} {:>8}",
            "sweep", "knob", "value", "recall", "grpc qps", "p50 ms", "recall", "raw qps", "p50 ms"
        );
        for x in &r.indexes {
            for pt in &x.sweep {
                println!(
                    "{:<9} {:<10} {:>6} {:>7.4} {:>9.0} {:>8.3}   {:>7.4} {:>9.0} {:>8.3}",
                    x.index.name(),
                    pt.knob,
                    pt.value,
                    pt.grpc.recall,
                    pt.grpc.qps,
                    pt.grpc.p50_ms,
                    pt.raw.recall,
                    pt.raw.qps,
                    pt.raw.p50_ms
                );
            }
        }
    }
    println!();
    for t in &r.targets {
        println!("target {:<28} {:>12.3} >= {:<10} {}", t.name, t.value, t.min, if t.met { "met" } else { "MISSED" });
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: SearchBenchArgs,
    }

    #[test]
    fn defaults_parse_and_validate() {
        let a = Cli::try_parse_from(["bench"]).unwrap().args;
        a.validate().unwrap();
        assert_eq!(a.indexes, vec![IndexArg::Flat, IndexArg::IvfFlat, IndexArg::Hnsw]);
        let a = Cli::try_parse_from(["bench", "--indexes", "hnsw,ivf-flat", "--metric", "COSINE"]).unwrap().args;
        assert_eq!(a.indexes, vec![IndexArg::Hnsw, IndexArg::IvfFlat]);
        assert_eq!(a.metric, MetricArg::Cosine);
        let a = Cli::try_parse_from(["bench", "--indexes", "hnsw,hnsw"]).unwrap().args;
        assert!(a.validate().unwrap_err().to_string().contains("names hnsw twice"));
        let a = Cli::try_parse_from(["bench", "--concurrency", "0"]).unwrap().args;
        assert!(a.validate().unwrap_err().to_string().contains("--concurrency 0"));
    }

    #[test]
    fn file_queries_are_held_out_of_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.fvecs");
        let mut bytes = Vec::new();
        for i in 0..5 {
            bytes.extend(2i32.to_le_bytes());
            [i as f32, 1.0].iter().for_each(|x| bytes.extend(x.to_le_bytes()));
        }
        std::fs::write(&path, &bytes).unwrap();
        let mut a = Cli::try_parse_from(["bench", "--queries", "2", "--n", "2"]).unwrap().args;
        a.file = Some(path);
        // n + queries rows are read; the last `queries` of them are the queries.
        let (ds, source) = load(&a).unwrap();
        assert_eq!((ds.dim, ds.base, ds.queries), (2, vec![0., 1., 1., 1.], vec![2., 1., 3., 1.]));
        assert!(source.starts_with("file:"));
        a.queries = 5;
        a.n = 100;
        assert!(load(&a).unwrap_err().to_string().contains("has 5 vectors"));
    }

    #[test]
    fn stop_rule_covers_every_query_first() {
        let started = Instant::now() - Duration::from_secs(5);
        let first = StopRule { duration: Duration::from_secs(1), requests: None, min_requests: 10 };
        assert!(!first.stop(9, started), "time is up but not every query was asked");
        assert!(first.stop(10, started));
        let counted = StopRule { duration: Duration::ZERO, requests: Some(3), min_requests: 0 };
        assert!(!counted.stop(2, Instant::now()));
        assert!(counted.stop(3, Instant::now()));
    }

    /// The whole harness on a tiny set: proves the wiring (ingest, index switches, every search
    /// path, recall against the ground truth, JSON), not the speed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whole_bench_on_a_tiny_set() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("report.json");
        let args = ["bench", "--n", "2000", "--dim", "16", "--queries", "50", "--clusters", "10", "--duration-secs", "0.3"];
        let mut a = Cli::try_parse_from(args).unwrap().args;
        a.ivf_nlist = 16;
        a.concurrency = Some(2);
        a.grpc_concurrency = Some(3);
        a.data_dir = Some(dir.path().to_path_buf());
        a.json = Some(json.clone());
        a.ef_sweep = vec![16, 64];
        a.nprobe_sweep = vec![1, 16];
        run(a).await.unwrap();

        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(v["ingest"]["vectors"], 2000);
        assert_eq!(v["params"]["grpc_concurrency"], 3);
        let indexes = v["indexes"].as_array().unwrap();
        let names: Vec<&str> = indexes.iter().map(|x| x["index"].as_str().unwrap()).collect();
        assert_eq!(names, ["flat", "ivf_flat", "hnsw"]);
        for x in indexes {
            for path in ["grpc", "grpc_matched", "raw"] {
                let recall = x[path]["recall"].as_f64().unwrap();
                assert!((0.5..=1.0).contains(&recall), "{path} {x}");
                assert_eq!(x[path]["recall_queries"], 50, "{path} {x}");
                assert!(x[path]["requests"].as_u64().unwrap() >= 50, "{path} {x}");
            }
            assert!(x["qps_ratio"].as_f64().unwrap() > 0.0, "{x}");
            // The gRPC path's CPU splits into the clients' and the cluster's; raw faiss has no client.
            for path in ["grpc", "grpc_matched"] {
                let us = |field: &str| x[path][field].as_f64().unwrap_or_else(|| panic!("{path}.{field}: {x}"));
                assert!(us("client_cpu_us_per_query") >= 0.0 && us("cluster_cpu_us_per_query") >= 0.0, "{path} {x}");
                let parts = us("client_cpu_us_per_query") + us("cluster_cpu_us_per_query");
                assert!((parts - us("cpu_us_per_query")).abs() < 1e-6 * parts.max(1.0), "{path} {x}");
            }
            assert!(x["raw"]["client_cpu_us_per_query"].is_null(), "{x}");
            assert!(x["grpc"]["mean_batch"].as_f64().unwrap() >= 1.0, "{x}");
            assert!(x["raw"]["mean_batch"].is_null(), "{x}");
        }
        for path in ["grpc", "grpc_matched", "raw"] {
            assert_eq!(indexes[0][path]["recall"].as_f64(), Some(1.0), "flat {path}: {}", indexes[0]);
        }
        // Each sweep point asked every query on both paths with its own setting: nprobe 16 of
        // 16 lists is exhaustive, one list is not.
        let sweep = |i: usize| indexes[i]["sweep"].as_array().unwrap().clone();
        assert!(sweep(0).is_empty());
        let knobs =
            |i| sweep(i).iter().map(|p| (p["knob"].as_str().unwrap().to_string(), p["value"].as_u64().unwrap())).collect::<Vec<_>>();
        assert_eq!(knobs(1), [("nprobe".to_string(), 1), ("nprobe".to_string(), 16)]);
        assert_eq!(knobs(2), [("ef_search".to_string(), 16), ("ef_search".to_string(), 64)]);
        for path in ["grpc", "raw"] {
            let recall = |i: usize| sweep(1)[i][path]["recall"].as_f64().unwrap();
            assert_eq!(recall(1), 1.0, "nprobe 16 on {path}");
            assert!(recall(0) < 1.0, "nprobe 1 on {path} searched every list: {}", recall(0));
            for p in sweep(1).iter().chain(&sweep(2)) {
                assert_eq!(p[path]["recall_queries"], 50, "{p}");
            }
        }
    }

    #[test]
    fn sweep_values_out_of_range_are_named() {
        let err = |args: &[&str]| Cli::try_parse_from(args).unwrap().args.validate().unwrap_err().to_string();
        assert!(err(&["bench", "--ef-sweep", "16,0"]).contains("--ef-sweep value 0"));
        assert!(err(&["bench", "--nprobe-sweep", "8,70000"]).contains("--nprobe-sweep value 70000"));
        assert!(err(&["bench", "--max-batch-queries", "0"]).contains("--max-batch-queries 0"));
    }
}
