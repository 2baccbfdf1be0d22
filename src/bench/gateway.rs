//! `tandem bench gateway`: what the gateway's hop costs, and how reads scale with readable
//! clusters.
//!
//! One process, one run: a leading cluster and two alternatives (direct transport) on loopback
//! ports with the same data, and gateways over them. Then
//!
//! ```text
//!   direct:  clients ─► leader                         (same queries, same load)
//!   gateway: clients ─► gateway (leader only) ─► leader
//!   scaling: clients ─► gateway over 1, 2, 3 readable clusters
//! ```
//!
//! Latency is measured with one request in flight (the added p50 is the hop itself), QPS with
//! `--concurrency` requests in flight. Direct and gateway runs alternate in short rounds so that
//! background load on a shared machine hits both alike. Every process here shares the machine's
//! cores (with `--split-cores`, the clusters get one half and the clients and gateways the
//! other): the cluster-count scaling shows the gateway spreading reads, not extra hardware.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tandem_client::Channel;
use tandem_cluster::{ClusterConfig, Role};
use tandem_node::Member;
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;
use tokio::runtime::Handle;

use super::{WalSyncArg, process_cpu_secs};

const COLLECTION: &str = "bench";
const ROUNDS: usize = 5;
const TARGET_ADDED_P50_US: f64 = 100.0;
const TARGET_QPS_RATIO: f64 = 0.9;
/// Query vectors generated; searches cycle through them.
const QUERIES: usize = 1000;

#[derive(Debug, Clone, clap::Args)]
pub struct GatewayBenchArgs {
    /// Rows in the collection
    #[arg(long, default_value_t = 20_000)]
    pub n: usize,
    #[arg(long, default_value_t = 64)]
    pub dim: usize,
    /// Neighbours per search
    #[arg(long, default_value_t = 10)]
    pub k: u32,
    /// Query vectors per search request (QPS counts requests)
    #[arg(long, default_value_t = 1)]
    pub nq: usize,
    /// Requests in flight for the QPS measurements
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Length of each measurement (split into rounds)
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Search threads per cluster
    #[arg(long, default_value_t = 2)]
    pub search_threads: usize,
    /// Routing policy of the gateway
    #[arg(long, value_enum, default_value_t = PolicyArg::P2c)]
    pub policy: PolicyArg,
    /// The gateway's `routing.coalesce.max_in_flight`: searches sent to a cluster at once before
    /// later ones wait and go merged; 0 = never merge
    #[arg(long, default_value_t = tandem_gateway::config::CoalesceConfig::default().max_in_flight)]
    pub coalesce_max_in_flight: usize,
    /// The gateway's `routing.coalesce.max_batch`: searches in one merged request at most
    #[arg(long, default_value_t = tandem_gateway::config::CoalesceConfig::default().max_batch)]
    pub coalesce_max_batch: usize,
    #[arg(long, value_enum, default_value_t = WalSyncArg::Never)]
    pub wal_sync: WalSyncArg,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Run the clusters on one half of the CPUs and the clients and the gateway on the other,
    /// as when the gateway has a machine of its own: then the QPS ratio says whether the
    /// gateway limits throughput, rather than what its CPU takes from the clusters
    #[arg(long)]
    pub split_cores: bool,
    /// Write every figure and parameter here as JSON
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyArg {
    P2c,
    RoundRobin,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub samples: usize,
}

#[derive(Debug, Serialize)]
pub struct Side {
    /// One request in flight.
    pub latency: Latency,
    /// `concurrency` requests in flight.
    pub qps: f64,
    pub loaded_latency: Latency,
    /// CPU time of the whole process (clients, gateway, clusters) per request during the QPS
    /// runs: what one request costs the machine on this path.
    pub cpu_us_per_request: f64,
}

#[derive(Debug, Serialize)]
pub struct Scaling {
    pub readable_clusters: usize,
    pub reads_per_sec: f64,
    /// Reads each cluster served (from the gateway's Topology).
    pub per_cluster: Vec<(String, u64)>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub n: usize,
    pub dim: usize,
    pub k: u32,
    pub nq: usize,
    pub concurrency: usize,
    pub duration_secs: f64,
    pub policy: PolicyArg,
    pub coalesce_max_in_flight: usize,
    pub coalesce_max_batch: usize,
    /// Searches per request the gateway sent the cluster during the gateway QPS runs (1.0: none
    /// merged).
    pub searches_per_cluster_request: f64,
    pub cores: usize,
    /// `--split-cores`: the CPUs the clusters ran on and the ones the clients and the gateway
    /// ran on (empty when everything shared every CPU).
    pub cluster_cpus: Vec<usize>,
    pub front_cpus: Vec<usize>,
    pub direct: Side,
    pub gateway: Side,
    pub added_p50_us: f64,
    pub added_p99_us: f64,
    /// The gateway's hop in CPU per request (gateway minus direct `cpu_us_per_request`). On a
    /// machine the clusters and the gateway share, the QPS ratio is about
    /// direct cost / (direct cost + this).
    pub added_cpu_us_per_request: f64,
    pub qps_ratio: f64,
    pub target_added_p50_us: f64,
    pub target_qps_ratio: f64,
    pub added_p50_met: bool,
    pub qps_ratio_met: bool,
    pub scaling: Vec<Scaling>,
}

/// Starts a cluster on `rt` (the clusters' own runtime with `--split-cores`): its tasks, and
/// the threads it starts (search pool, index builders), run where that runtime runs.
async fn start_member_on(rt: &Option<Handle>, cfg: ClusterConfig) -> anyhow::Result<Member> {
    let id = cfg.cluster_id.clone();
    on(rt, async move { Member::start(cfg).await.with_context(|| format!("cannot start bench cluster {id}")) }).await
}

pub async fn run(a: GatewayBenchArgs) -> anyhow::Result<()> {
    ensure!(a.n >= 1 && a.dim >= 1 && a.k >= 1, "--n, --dim and --k must be at least 1");
    ensure!((1..=QUERIES).contains(&a.nq), "--nq must be between 1 and {QUERIES}");
    ensure!(a.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(a.duration_secs.is_finite() && a.duration_secs > 0.0, "--duration-secs must be positive");
    let report = if a.split_cores {
        let cpus = allowed_cpus()?;
        ensure!(cpus.len() >= 2, "--split-cores needs at least 2 CPUs, this process may use {}", cpus.len());
        let (back, front) = cpus.split_at(cpus.len() / 2);
        let clusters = pinned_runtime("bench-cluster", back)?;
        let front_rt = pinned_runtime("bench-front", front)?;
        let (a, rt, placement) = (a.clone(), Some(clusters.handle().clone()), (back.to_vec(), front.to_vec()));
        let r = front_rt.spawn(async move { bench(&a, rt, placement).await }).await;
        // Not dropped here: dropping a runtime blocks, which an async context may not.
        front_rt.shutdown_background();
        clusters.shutdown_background();
        r.context("the bench task failed")??
    } else {
        bench(&a, None, (Vec::new(), Vec::new())).await?
    };
    print(&report);
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    Ok(())
}

/// `rt`: the clusters' runtime (`--split-cores`), else the current one; `cpus`: (cluster CPUs,
/// front CPUs) as reported.
async fn bench(a: &GatewayBenchArgs, rt: Option<Handle>, cpus: (Vec<usize>, Vec<usize>)) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let base = |id: &str| {
        let mut cfg = ClusterConfig {
            cluster_id: id.into(),
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().join(id),
            ..ClusterConfig::default()
        };
        cfg.search.threads = a.search_threads;
        cfg.wal.sync = a.wal_sync.into();
        cfg.replication.transport = tandem_cluster::config::TransportKind::Direct;
        cfg
    };
    eprintln!("starting a leading cluster and two alternatives ...");
    let leader = start_member_on(&rt, base("a")).await?;
    let mut members = vec![("a".to_string(), leader)];
    for id in ["b", "c"] {
        let mut cfg = base(id);
        cfg.role = Role::Alternative;
        cfg.replication.leader = members[0].1.endpoint();
        members.push((id.to_string(), start_member_on(&rt, cfg).await?));
    }

    // Data, through the leader.
    let mut direct = crate::cli::connect(&members[0].1.endpoint()).await?;
    let schema =
        pb::CollectionSchema { name: COLLECTION.into(), dim: a.dim as u32, metric: pb::Metric::L2 as i32, shards: 1, ..Default::default() };
    direct.create_collection(pb::CreateCollectionRequest { schema: Some(schema) }).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut token = String::new();
    eprintln!("inserting {} x {} vectors ...", a.n, a.dim);
    for start in (0..a.n).step_by(2000) {
        let end = (start + 2000).min(a.n);
        let vectors: Vec<f32> = (0..(end - start) * a.dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let r = direct
            .insert(pb::InsertRequest {
                collection: COLLECTION.into(),
                ids: (start as i64..end as i64).collect(),
                vectors,
                ..Default::default()
            })
            .await?
            .into_inner();
        token = r.session_token;
    }
    direct.flush(pb::FlushRequest { collection: COLLECTION.into() }).await?;
    // Every alternative holds every row before anything is measured.
    for (id, m) in &members[1..] {
        let mut c = crate::cli::connect(&m.endpoint()).await?;
        let started = Instant::now();
        let n = loop {
            let read =
                Some(pb::ReadOptions { consistency: pb::ConsistencyLevel::Session as i32, session_token: token.clone(), staleness_ms: 0 });
            let mut req = tonic::Request::new(pb::CountRequest { collection: COLLECTION.into(), filter: String::new(), read });
            req.set_timeout(Duration::from_secs(120));
            match c.count(req).await {
                Ok(r) => break r.into_inner().count,
                // The collection itself is still being replicated.
                Err(s) if s.code() == tonic::Code::NotFound && started.elapsed() < Duration::from_secs(120) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(s) => return Err(crate::cli::status_error(s).context(format!("alternative {id} did not catch up"))),
            }
        };
        ensure!(n == a.n as u64, "alternative {id} holds {n} rows, expected {}", a.n);
    }
    let queries: Arc<Vec<f32>> = Arc::new((0..QUERIES * a.dim).map(|_| rng.random_range(-1.0..1.0)).collect());

    let policy = match a.policy {
        PolicyArg::P2c => tandem_gateway::config::Policy::P2c,
        PolicyArg::RoundRobin => tandem_gateway::config::Policy::RoundRobin,
    };
    let start_gateway = |n: usize| {
        let mut cfg = tandem_gateway::GatewayConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
        cfg.routing.policy = policy;
        cfg.routing.coalesce.max_in_flight = a.coalesce_max_in_flight;
        cfg.routing.coalesce.max_batch = a.coalesce_max_batch;
        cfg.health.interval_ms = 200;
        let regs = members[..n]
            .iter()
            .map(|(id, m)| tandem_discovery::Registration { id: id.clone(), datacenter: String::new(), endpoint: m.endpoint() })
            .collect();
        tandem_gateway::start(cfg, tandem_discovery::static_list(regs))
    };

    // Direct vs gateway (over the leader alone: the same cluster does the same work).
    let gw1 = start_gateway(1).await?;
    wait_readable(&gw1, 1).await?;
    let gw_addr = format!("http://{}", gw1.addr);
    let direct_clients = connect_many(&members[0].1.endpoint(), a.concurrency).await?;
    let gw_clients = connect_many(&gw_addr, a.concurrency).await?;
    let round = Duration::from_secs_f64(a.duration_secs / ROUNDS as f64);
    eprintln!("direct vs gateway: {} rounds of {:.1}s per side and load ...", ROUNDS, round.as_secs_f64());
    // Warm-up: connections, caches, the gateway's first latency samples.
    load(&direct_clients, &queries, a, Duration::from_millis(300)).await?;
    load(&gw_clients, &queries, a, Duration::from_millis(300)).await?;
    let (mut d1, mut g1, mut dn, mut gn) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut d_secs, mut g_secs, mut d_cpu, mut g_cpu) = (0.0, 0.0, 0.0, 0.0);
    let cpu = || process_cpu_secs().unwrap_or(f64::NAN);
    let (mut searches, mut cluster_requests) = (0u64, 0u64);
    for _ in 0..ROUNDS {
        d1.extend(load(&direct_clients[..1], &queries, a, round).await?.0);
        g1.extend(load(&gw_clients[..1], &queries, a, round).await?.0);
        let c = cpu();
        let (l, s) = load(&direct_clients, &queries, a, round).await?;
        d_cpu += cpu() - c;
        dn.extend(l);
        d_secs += s;
        let before = merge_counts(&gw1);
        let c = cpu();
        let (l, s) = load(&gw_clients, &queries, a, round).await?;
        g_cpu += cpu() - c;
        let after = merge_counts(&gw1);
        (searches, cluster_requests) = (searches + after.0 - before.0, cluster_requests + after.1 - before.1);
        gn.extend(l);
        g_secs += s;
    }
    let side = |one: &mut Vec<Duration>, many: &mut Vec<Duration>, secs: f64, cpu_secs: f64| Side {
        latency: latency(one),
        qps: many.len() as f64 / secs,
        cpu_us_per_request: cpu_secs * 1e6 / many.len().max(1) as f64,
        loaded_latency: latency(many),
    };
    let direct_side = side(&mut d1, &mut dn, d_secs, d_cpu);
    let gateway_side = side(&mut g1, &mut gn, g_secs, g_cpu);
    let searches_per_cluster_request = searches as f64 / cluster_requests.max(1) as f64;
    gw1.stop().await?;

    // Reads/s with 1, 2 and 3 readable clusters.
    let mut scaling = Vec::new();
    for n in 1..=3 {
        let gw = start_gateway(n).await?;
        wait_readable(&gw, n).await?;
        let clients = connect_many(&format!("http://{}", gw.addr), a.concurrency).await?;
        load(&clients, &queries, a, Duration::from_millis(300)).await?;
        let before = gw.topology().view();
        let (lat, secs) = load(&clients, &queries, a, Duration::from_secs_f64(a.duration_secs / 2.0)).await?;
        let after = gw.topology().view();
        let per_cluster = after
            .clusters
            .iter()
            .map(|c| {
                let b = before.clusters.iter().find(|x| x.id == c.id).map_or(0, |x| x.reads_routed);
                (c.id.clone(), c.reads_routed - b)
            })
            .collect();
        eprintln!("  {n} readable: {:.0} reads/s", lat.len() as f64 / secs);
        scaling.push(Scaling { readable_clusters: n, reads_per_sec: lat.len() as f64 / secs, per_cluster });
        gw.stop().await?;
    }

    drop((direct, direct_clients, gw_clients));
    // Alternatives first: their replication streams would keep the leader draining.
    for (_, m) in members.into_iter().rev() {
        on(&rt, async move { Ok(m.stop(crate::config::MEMBER_DRAIN).await?) }).await?;
    }
    let added_p50_us = gateway_side.latency.p50_us - direct_side.latency.p50_us;
    let qps_ratio = gateway_side.qps / direct_side.qps;
    Ok(Report {
        n: a.n,
        dim: a.dim,
        k: a.k,
        nq: a.nq,
        concurrency: a.concurrency,
        duration_secs: a.duration_secs,
        policy: a.policy,
        coalesce_max_in_flight: a.coalesce_max_in_flight,
        coalesce_max_batch: a.coalesce_max_batch,
        searches_per_cluster_request,
        // Inside a pinned runtime available_parallelism() sees only that runtime's CPUs.
        cores: if cpus.0.is_empty() { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { cpus.0.len() + cpus.1.len() },
        cluster_cpus: cpus.0,
        front_cpus: cpus.1,
        added_p99_us: gateway_side.latency.p99_us - direct_side.latency.p99_us,
        added_cpu_us_per_request: gateway_side.cpu_us_per_request - direct_side.cpu_us_per_request,
        added_p50_us,
        qps_ratio,
        target_added_p50_us: TARGET_ADDED_P50_US,
        target_qps_ratio: TARGET_QPS_RATIO,
        added_p50_met: added_p50_us <= TARGET_ADDED_P50_US,
        qps_ratio_met: qps_ratio >= TARGET_QPS_RATIO,
        direct: direct_side,
        gateway: gateway_side,
        scaling,
    })
}

/// Runs `fut` on `rt` when given (the clusters' own runtime), else here.
async fn on<T: Send + 'static>(rt: &Option<Handle>, fut: impl Future<Output = anyhow::Result<T>> + Send + 'static) -> anyhow::Result<T> {
    match rt {
        Some(h) => h.spawn(fut).await.context("a cluster task failed")?,
        None => fut.await,
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None).context("sched_getaffinity")?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect())
}

/// A runtime whose threads (workers and blocking ones, and the threads they start) run only
/// on `cpus`.
fn pinned_runtime(name: &str, cpus: &[usize]) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus {
        set.set(c);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus.len())
        .thread_name(name)
        .enable_all()
        .on_thread_start(move || {
            // `None`: the calling thread; threads it starts inherit the mask.
            if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
                tracing::warn!(error = %e, "cannot pin a bench thread to its CPUs");
            }
        })
        .build()
        .with_context(|| format!("cannot start the {name} runtime"))
}

/// (searches routed, requests that carried them), summed over the gateway's clusters.
fn merge_counts(gw: &tandem_gateway::Running) -> (u64, u64) {
    gw.topology()
        .view()
        .clusters
        .iter()
        .fold((0, 0), |(s, r), c| (s + c.reads_routed, r + c.reads_routed - c.merged_searches + c.merged_requests))
}

async fn wait_readable(gw: &tandem_gateway::Running, n: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let v = gw.topology().view();
        if v.clusters.len() == n && v.clusters.iter().all(|c| c.readable && c.collections.iter().any(|s| s.name == COLLECTION)) {
            return Ok(());
        }
        ensure!(started.elapsed() < Duration::from_secs(60), "the gateway did not see {n} readable clusters within 60s: {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One connection per client, as separate applications would have.
async fn connect_many(endpoint: &str, n: usize) -> anyhow::Result<Vec<TandemClient<Channel>>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(crate::cli::connect(endpoint).await?);
    }
    Ok(v)
}

/// One task per client, searching back to back for `d`: (latencies, seconds).
async fn load(
    clients: &[TandemClient<Channel>],
    queries: &Arc<Vec<f32>>,
    a: &GatewayBenchArgs,
    d: Duration,
) -> anyhow::Result<(Vec<Duration>, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        let (mut c, stop, next, queries) = (c.clone(), stop.clone(), next.clone(), queries.clone());
        let (dim, k, nq) = (a.dim, a.k, a.nq);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // nq consecutive queries of the QUERIES, wrapping round.
                let i = next.fetch_add(1, Ordering::Relaxed) % (queries.len() / dim - nq + 1);
                let req = pb::SearchRequest {
                    collection: COLLECTION.into(),
                    vectors: queries[i * dim..(i + nq) * dim].to_vec(),
                    top_k: k,
                    read: Some(pb::ReadOptions { consistency: pb::ConsistencyLevel::Bounded as i32, ..Default::default() }),
                    ..Default::default()
                };
                let t = Instant::now();
                c.search(req).await.map_err(crate::cli::status_error)?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, started.elapsed().as_secs_f64()))
}

fn latency(v: &mut [Duration]) -> Latency {
    v.sort_unstable();
    let pct = |p: f64| if v.is_empty() { 0.0 } else { v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e6 };
    Latency { p50_us: pct(0.50), p99_us: pct(0.99), samples: v.len() }
}

fn print(r: &Report) {
    println!(
        "gateway bench: {} x {}-d, top {}, {} query vector(s) per search, {} in flight for QPS, {} cores, policy {:?}",
        r.n, r.dim, r.k, r.nq, r.concurrency, r.cores, r.policy
    );
    if !r.cluster_cpus.is_empty() {
        println!("split cores: clusters on CPUs {:?}, clients and gateway on CPUs {:?}", r.cluster_cpus, r.front_cpus);
    }
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>14} {:>14} {:>12}",
        "path", "p50 us", "p99 us", "QPS", "loaded p50 us", "loaded p99 us", "CPU us/req"
    );
    for (name, s) in [("direct", &r.direct), ("gateway", &r.gateway)] {
        println!(
            "{:<10} {:>10.0} {:>10.0} {:>10.0} {:>14.0} {:>14.0} {:>12.0}",
            name, s.latency.p50_us, s.latency.p99_us, s.qps, s.loaded_latency.p50_us, s.loaded_latency.p99_us, s.cpu_us_per_request
        );
    }
    let met = |b: bool| if b { "met" } else { "NOT met" };
    println!("added p50: {:.0} us (target <= {:.0} us: {})", r.added_p50_us, r.target_added_p50_us, met(r.added_p50_met));
    println!("QPS ratio: {:.2} (target >= {:.2}: {})", r.qps_ratio, r.target_qps_ratio, met(r.qps_ratio_met));
    println!("the gateway's hop costs {:.0} us of CPU per request", r.added_cpu_us_per_request);
    println!(
        "searches per request to the cluster: {:.2} (coalesce max_in_flight {})",
        r.searches_per_cluster_request, r.coalesce_max_in_flight
    );
    for s in &r.scaling {
        let spread: Vec<String> = s.per_cluster.iter().map(|(id, n)| format!("{id} {n}")).collect();
        println!("{} readable cluster(s): {:.0} reads/s ({})", s.readable_clusters, s.reads_per_sec, spread.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run small enough for a test; each test changes what it is about.
    fn tiny() -> GatewayBenchArgs {
        GatewayBenchArgs {
            n: 300,
            dim: 4,
            k: 3,
            nq: 1,
            concurrency: 2,
            duration_secs: 0.3,
            search_threads: 1,
            policy: PolicyArg::P2c,
            coalesce_max_in_flight: 4,
            coalesce_max_batch: 16,
            wal_sync: WalSyncArg::Never,
            seed: 2,
            split_cores: false,
            json: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whole_bench_on_a_tiny_set() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("gw.json");
        let a = GatewayBenchArgs {
            n: 500,
            dim: 8,
            k: 5,
            nq: 3,
            duration_secs: 0.5,
            policy: PolicyArg::RoundRobin,
            seed: 1,
            json: Some(json.clone()),
            ..tiny()
        };
        run(a).await.expect("bench");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert!(v["direct"]["qps"].as_f64().unwrap() > 0.0);
        assert_eq!(v["nq"], 3);
        assert!(v["gateway"]["latency"]["samples"].as_u64().unwrap() > 0);
        // CPU per request comes from /proc: a loaded run costs something on either path.
        for side in ["direct", "gateway"] {
            assert!(v[side]["cpu_us_per_request"].as_f64().unwrap() > 0.0, "{side}: {}", v[side]);
        }
        let scaling = v["scaling"].as_array().unwrap();
        assert_eq!(scaling.len(), 3);
        // With round robin over 3 clusters, every cluster served reads.
        let per: Vec<u64> = scaling[2]["per_cluster"].as_array().unwrap().iter().map(|p| p[1].as_u64().unwrap()).collect();
        assert!(per.len() == 3 && per.iter().all(|&n| n > 0), "{per:?}");
    }

    #[tokio::test]
    async fn an_nq_outside_the_generated_queries_is_refused() {
        for nq in [0, QUERIES + 1] {
            let e = run(GatewayBenchArgs { nq, ..tiny() }).await.expect_err("refused before anything starts");
            assert_eq!(e.to_string(), format!("--nq must be between 1 and {QUERIES}"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn split_cores_puts_clusters_and_clients_apart() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("gw.json");
        let a = GatewayBenchArgs { split_cores: true, json: Some(json.clone()), ..tiny() };
        let cpus = allowed_cpus().unwrap();
        if cpus.len() < 2 {
            let e = run(a).await.expect_err("one CPU cannot be split");
            assert!(e.to_string().contains("--split-cores needs at least 2 CPUs"), "{e}");
            return;
        }
        run(a).await.expect("bench");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let list = |k: &str| -> Vec<u64> { v[k].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect() };
        let (back, front) = (list("cluster_cpus"), list("front_cpus"));
        assert!(!back.is_empty() && !front.is_empty() && back.iter().all(|c| !front.contains(c)), "{back:?} {front:?}");
        assert_eq!(back.len() + front.len(), cpus.len());
        assert!(v["gateway"]["qps"].as_f64().unwrap() > 0.0 && v["direct"]["qps"].as_f64().unwrap() > 0.0, "{v}");
    }
}
