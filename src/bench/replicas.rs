//! `tandem bench replicas`: a cluster whose sealed segments are searched on query nodes
//! (docs/scaling.md), each query node a `tandem query-node` process capped to the same CPU share
//! (a cgroup: v2 `cpu.max` or v1 `cpu.cfs_quota_us`), so that scale-out means something on a
//! machine of 2 cores.
//!
//! Phases, on one data set loaded once:
//! 1. **Scale-out**: R = 1..=--max-groups (at least 2) replica groups of one node each; closed-loop QPS at
//!    --concurrency, recall against exact neighbours. Goal: QPS(R) >= 0.9 x R x QPS(1).
//! 2. **Proxy overhead**: p50 at one search in flight, one group (its node uncapped for this)
//!    vs every segment searched in the cluster's own process.
//! 3. **A slow node**: two groups, one node each, the second capped at --slow-factor times less
//!    CPU: closed-loop QPS against one (fast) group's, and the sub-searches the fast node stole
//!    (long-tail stealing); then the same with `query_nodes.steal` off (strict turns, where the
//!    slow node sets the pace of its turns). Goal, with stealing: >= 0.9 x one group's QPS.
//! 4. **Node loss**: group 0 of two nodes, group 1 of one; kill -9 of a group-0 node under load:
//!    failed searches (goal 0), p99 after the kill, time until group 0 has every copy again.
//! 5. **Growing rows**: --growing-rows rows inserted and left unsealed; one group of one node
//!    (uncapped, as the writer is), one search in flight, with the shard's leader on the node
//!    searching them (`query_nodes.shard_leaders`) and with the writer searching them: p50, and
//!    the CPU the writer's search threads spend per search. The answers must be the same.
//! 6. **A node joins**: group 0 of one listed node; under load, a new node started with
//!    `--join` enters the group: failed searches (goal 0), the time until the group's copies
//!    are evened out over both nodes, and QPS before and after (two capped nodes share each
//!    search's segments). Goal: QPS after >= 0.9 x 2 x before.
//!
//! The writer's memory is reported too (phase 1, R = 1): its segments' bytes and this process's
//! RSS once every group holds every segment and the writer released their indexes
//! (`query_nodes.release_indexes`), and again after phase 2's in-process searches read them back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use parking_lot::Mutex;
use serde::Serialize;
use tandem_cluster::fanout::LocalFanout;
use tandem_cluster::schema::Metric;
use tandem_node::Member;
use tandem_proto::v1 as pb;

use super::replication::{Latency, summarize};
use crate::dataset::{self, Dataset};

const COLLECTION: &str = "bench_replicas";

/// Scale-out goal: QPS with R groups over R x the QPS of one.
const TARGET_SCALE: f64 = 0.9;

/// Slow-node goal: QPS of a fast and a slow group over one fast group's.
const TARGET_SLOW_NODE: f64 = 0.9;

/// Join goal: QPS of a group of two nodes (one joined) over the QPS of its first node alone.
const TARGET_JOIN: f64 = 0.9 * 2.0;

#[derive(Debug, clap::Args)]
pub struct ReplicasBenchArgs {
    /// Base vectors (synthetic gaussian mixture)
    #[arg(long, default_value_t = 50_000)]
    pub n: usize,
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Query vectors (recall is measured on them; the load cycles through them)
    #[arg(long, default_value_t = 200)]
    pub queries: usize,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Sealed segments the data is cut into (segment.seal_rows = n / segments)
    #[arg(long, default_value_t = 8)]
    pub segments: usize,
    /// Scale-out is measured for 1..=this many replica groups
    #[arg(long, default_value_t = 3)]
    pub max_groups: usize,
    /// Searches in flight
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 8.0)]
    pub duration_secs: f64,
    /// CPU share of each query node (0.25: a quarter of one core)
    #[arg(long, default_value_t = 0.25)]
    pub node_cpus: f64,
    /// The slow-node phase caps one node at --node-cpus / this (at least 0.1 CPU)
    #[arg(long, default_value_t = 4.0)]
    pub slow_factor: f64,
    #[arg(long, default_value_t = 64)]
    pub ef_search: u32,
    /// Rows left growing (unsealed) for the growing-rows phase; fewer than a segment's rows
    #[arg(long, default_value_t = 4000)]
    pub growing_rows: usize,
    /// Write the report as JSON here
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    params: Params,
    scale_out: Vec<ScalePoint>,
    proxy_overhead: ProxyOverhead,
    slow_node: SlowNode,
    node_loss: NodeLoss,
    writer_memory: WriterMemory,
    growing: GrowingRows,
    join: NodeJoin,
    targets: Vec<Target>,
}

/// Phase 6: a node joins a group of one under load (`tandem query-node --join`).
#[derive(Debug, Serialize)]
struct NodeJoin {
    /// The group's one listed node alone, and the group once the joined node holds its share.
    qps_before: f64,
    qps_after: f64,
    ratio: f64,
    recall_after: f64,
    /// While the node joins: searches, failures, and the latencies of those sent after the
    /// node was started.
    searches: u64,
    failed: u64,
    first_error: Option<String>,
    after_start: Latency,
    /// From the node's start until the group's copies differ by one at most between its nodes.
    balanced_ms: f64,
    /// The copies each node holds then.
    copies: Vec<u64>,
}

/// Phase 5: growing rows searched by the shard's leader on a query node, and by the writer.
#[derive(Debug, Serialize)]
struct GrowingRows {
    rows: usize,
    on_leader: GrowingRun,
    in_writer: GrowingRun,
}

#[derive(Debug, Serialize)]
struct GrowingRun {
    qps: f64,
    latency: Latency,
    recall: f64,
    /// CPU of the writer's search threads (`tandem-search-*`) per search, microseconds.
    writer_search_cpu_us: f64,
    /// Sub-searches in which the node searched the growing rows as the shard's leader.
    growing_searched_on_node: u64,
    /// Searches whose growing rows the writer searched after all.
    growing_here: u64,
    /// The first answer to each query, to compare the two runs.
    #[serde(skip)]
    answers: Vec<Option<Vec<i64>>>,
}

/// The writer's memory with one replica group holding every segment.
#[derive(Debug, Serialize)]
struct WriterMemory {
    segments: usize,
    /// Indexes the writer released (`query_nodes.release_indexes`).
    indexes_released: usize,
    /// The writer's own accounting of its segments (`memory_bytes` of GetCollection: rows,
    /// tombstones, and the vectors an index in memory holds; not HNSW's links).
    segments_mb_released: f64,
    segments_mb_all_in_memory: f64,
    /// RSS of this process (the writer and the bench's clients and data set).
    rss_mb_released: f64,
    rss_mb_all_in_memory: f64,
}

#[derive(Debug, Serialize)]
struct Params {
    n: usize,
    dim: usize,
    k: usize,
    segments: usize,
    concurrency: usize,
    duration_secs: f64,
    node_cpus: f64,
    ef_search: u32,
    cgroup: String,
}

#[derive(Debug, Serialize)]
struct ScalePoint {
    groups: usize,
    qps: f64,
    /// QPS over groups x the QPS of one group.
    scale: f64,
    recall: f64,
    latency: Latency,
    /// Sub-searches each node answered, and of those, how many it stole from a busy node.
    node_searches: Vec<u64>,
    node_stolen: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct SlowNode {
    fast_cpus: f64,
    slow_cpus: f64,
    /// `query_nodes.steal` on (the default), and off: every search with the group whose turn
    /// it is.
    stealing: SlowRun,
    strict_turns: SlowRun,
}

#[derive(Debug, Serialize)]
struct SlowRun {
    qps: f64,
    /// QPS over one fast group's (the scale-out phase's R = 1).
    ratio: f64,
    recall: f64,
    latency: Latency,
    /// [fast, slow]: sub-searches answered, and stolen.
    node_searches: Vec<u64>,
    node_stolen: Vec<u64>,
    /// Straggling sub-searches whose segments the other group's copy answered first.
    stolen_mid_search: u64,
}

#[derive(Debug, Serialize)]
struct ProxyOverhead {
    p50_one_group_ms: f64,
    p50_in_process_ms: f64,
    added_p50_ms: f64,
    recall_one_group: f64,
    recall_in_process: f64,
}

#[derive(Debug, Serialize)]
struct NodeLoss {
    searches: u64,
    failed: u64,
    first_error: Option<String>,
    /// Searches sent after the kill.
    after_kill: Latency,
    /// From the kill until group 0 holds a copy of every segment again.
    restored_ms: f64,
    rerouted: u64,
}

#[derive(Debug, Serialize)]
struct Target {
    name: String,
    value: f64,
    goal: String,
    met: bool,
}

/// Per group, its first node's (answered, stolen) sub-searches so far.
fn node_counts(member: &Member) -> Vec<(u64, u64)> {
    let groups = member.placement().map(|p| p.groups()).unwrap_or_default();
    groups.iter().map(|g| (g[0].searches.load(Ordering::Relaxed), g[0].stolen.load(Ordering::Relaxed))).collect()
}

/// `after - before` of [`node_counts`], as (answered, stolen) lists.
fn counts_since(before: &[(u64, u64)], after: &[(u64, u64)]) -> (Vec<u64>, Vec<u64>) {
    after.iter().zip(before).map(|(a, b)| (a.0 - b.0, a.1 - b.1)).unzip()
}

/// Query node processes, killed when dropped; their cgroups removed.
struct Nodes {
    children: Vec<std::process::Child>,
    endpoints: Vec<String>,
    cgroups: Vec<PathBuf>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for g in &self.cgroups {
            let _ = std::fs::remove_dir(g);
        }
    }
}

/// A short CFS period (10 ms): with the default 100 ms a node that spends its quota early waits
/// up to 75 ms, and that throttling, not the search, would set the percentiles.
const CFS_PERIOD_US: u64 = 10_000;

/// Puts `pid` in a new cgroup limited to `cpus` cores; returns the cgroup's directory.
fn cap_cpu(pid: u32, cpus: f64, name: &str) -> anyhow::Result<(PathBuf, &'static str)> {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
    let (dir, kind) = if std::fs::read_to_string(v2).is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu")) {
        (Path::new("/sys/fs/cgroup").join(name), "v2 cpu.max")
    } else if Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() {
        (Path::new("/sys/fs/cgroup/cpu").join(name), "v1 cpu.cfs_quota_us")
    } else {
        bail!("no cgroup cpu controller at /sys/fs/cgroup (v2) or /sys/fs/cgroup/cpu (v1): the query nodes cannot be capped")
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create cgroup {}", dir.display()))?;
    set_cap(&dir, Some(cpus))?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string()).context("cgroup.procs")?;
    Ok((dir, kind))
}

/// Limits the cgroup at `dir` to `cpus` cores, or lifts the limit.
fn set_cap(dir: &Path, cpus: Option<f64>) -> anyhow::Result<()> {
    let quota = cpus.map(|c| ((c * CFS_PERIOD_US as f64).round() as u64).max(1000));
    if dir.join("cpu.max").exists() {
        let q = quota.map_or("max".to_string(), |q| q.to_string());
        return std::fs::write(dir.join("cpu.max"), format!("{q} {CFS_PERIOD_US}")).context("cpu.max");
    }
    std::fs::write(dir.join("cpu.cfs_period_us"), CFS_PERIOD_US.to_string()).context("cpu.cfs_period_us")?;
    std::fs::write(dir.join("cpu.cfs_quota_us"), quota.map_or("-1".to_string(), |q| q.to_string())).context("cpu.cfs_quota_us")
}

fn start_nodes(count: usize, cpus: f64, scratch: &Path) -> anyhow::Result<(Nodes, String)> {
    let mut nodes = Nodes { children: Vec::new(), endpoints: Vec::new(), cgroups: Vec::new() };
    let mut kind = "";
    for _ in 0..count {
        kind = nodes.start(cpus, scratch, &[])?;
    }
    Ok((nodes, kind.to_string()))
}

impl Nodes {
    /// Starts one more query node (with `extra` arguments), capped at `cpus`; returns the
    /// cgroup kind.
    fn start(&mut self, cpus: f64, scratch: &Path, extra: &[&str]) -> anyhow::Result<&'static str> {
        let exe = std::env::current_exe().context("the tandem binary")?;
        let i = self.children.len();
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["query-node", "--listen", "127.0.0.1:0", "--search-threads", "1", "--name", &format!("bench-qn{i}")])
            .arg("--scratch-dir")
            .arg(scratch.join(format!("qn{i}")))
            .args(extra)
            .env("RUST_LOG", "warn");
        let (child, addr) = crate::cli::cluster::spawn_listening(&mut cmd).context("starting a query node")?;
        let pid = child.id();
        self.children.push(child);
        self.endpoints.push(format!("http://{addr}"));
        let (dir, kind) = cap_cpu(pid, cpus, &format!("tandem-bench-qn{i}-{}", std::process::id()))?;
        self.cgroups.push(dir);
        Ok(kind)
    }
}

pub async fn run(a: ReplicasBenchArgs) -> anyhow::Result<()> {
    validate(&a)?;
    super::log_if_asked();
    let report = bench(&a).await?;
    print(&report);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn validate(a: &ReplicasBenchArgs) -> anyhow::Result<()> {
    ensure!(a.n >= 1000, "--n {} is too small: at least 1000 base vectors", a.n);
    ensure!((1..=4096).contains(&a.dim), "--dim {} is out of range 1..=4096", a.dim);
    ensure!(a.queries >= 1, "--queries 0: at least one query");
    ensure!((1..=1024).contains(&a.k), "--k {} is out of range 1..=1024", a.k);
    ensure!((1..=a.n / 100).contains(&a.segments), "--segments {} is out of range 1..={} (100 rows each at least)", a.segments, a.n / 100);
    ensure!((2..=8).contains(&a.max_groups), "--max-groups {} is out of range 2..=8", a.max_groups);
    ensure!((1..=1024).contains(&a.concurrency), "--concurrency {} is out of range 1..=1024", a.concurrency);
    ensure!(a.duration_secs > 0.0 && a.duration_secs <= 3600.0, "--duration-secs {} is out of range (0, 3600]", a.duration_secs);
    ensure!(a.node_cpus >= 0.01 && a.node_cpus <= 64.0, "--node-cpus {} is out of range 0.01..=64", a.node_cpus);
    ensure!(a.slow_factor >= 1.0 && a.slow_factor <= 100.0, "--slow-factor {} is out of range 1..=100", a.slow_factor);
    let seal = a.n.div_ceil(a.segments);
    ensure!((1..seal).contains(&a.growing_rows), "--growing-rows {} is out of range 1..{seal} (they must stay unsealed)", a.growing_rows);
    Ok(())
}

/// The writer's configuration for query nodes in `groups`.
fn writer_config(dir: &Path, a: &ReplicasBenchArgs, groups: Vec<Vec<String>>) -> tandem_cluster::ClusterConfig {
    let mut cfg = tandem_cluster::ClusterConfig {
        cluster_id: "bench".into(),
        listen: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    cfg.segment.seal_rows = a.n.div_ceil(a.segments);
    cfg.limits.max_message_bytes = crate::cli::MAX_MESSAGE_BYTES;
    cfg.query_nodes.groups = groups;
    cfg
}

async fn bench(a: &ReplicasBenchArgs) -> anyhow::Result<Report> {
    let ds = Arc::new(dataset::gaussian_mixture(a.n, a.queries, a.dim, 100, 42));
    let truth = {
        let (ds, k) = (ds.clone(), a.k);
        Arc::new(tokio::task::spawn_blocking(move || dataset::ground_truth(&ds, k, Metric::L2)).await?)
    };
    let scratch = tempfile::Builder::new().prefix("tandem-bench-replicas-").tempdir()?;
    let data = scratch.path().join("data");
    // max_groups nodes for scale-out, one more: group 0's second node in the node-loss phase.
    let (mut nodes, cgroup) = start_nodes(a.max_groups + 1, a.node_cpus, scratch.path())?;
    let ep = nodes.endpoints.clone();

    let mut scale_out = Vec::new();
    let mut proxy_overhead = None;
    let mut writer_memory = None;
    for r in 1..=a.max_groups {
        let member = Member::start(writer_config(&data, a, (0..r).map(|g| vec![ep[g].clone()]).collect())).await?;
        let endpoint = member.endpoint();
        if r == 1 {
            load(&endpoint, &ds).await?;
        }
        let segments = wait_placed(&member, r).await?;
        ensure!(segments >= a.segments, "only {segments} sealed segments are indexed, expected {}", a.segments);
        let (lean, released) = if r == 1 { (wait_released(&member, segments).await?, rss_mb()?) } else { ((0, 0), 0.0) };
        let before = node_counts(&member);
        let run = closed_loop(&endpoint, &ds, &truth, a, a.concurrency, Duration::from_secs_f64(a.duration_secs), None).await?;
        let (node_searches, node_stolen) = counts_since(&before, &node_counts(&member));
        let qps1 = scale_out.first().map_or(run.qps, |p: &ScalePoint| p.qps);
        scale_out.push(ScalePoint {
            groups: r,
            qps: run.qps,
            scale: run.qps / (r as f64 * qps1),
            recall: run.recall,
            latency: run.latency,
            node_searches,
            node_stolen,
        });
        if r == 1 {
            // The proxy's own cost: the query node uncapped, as the in-process path is.
            let half = Duration::from_secs_f64(a.duration_secs / 2.0);
            set_cap(&nodes.cgroups[0], None)?;
            let one = closed_loop(&endpoint, &ds, &truth, a, 1, half, None).await;
            set_cap(&nodes.cgroups[0], Some(a.node_cpus))?;
            let one = one?;
            let placement = member.placement().unwrap().clone();
            member.node().set_fanout(Arc::new(LocalFanout::default()));
            let local = closed_loop(&endpoint, &ds, &truth, a, 1, half, None).await;
            member.node().set_fanout(placement);
            let local = local?;
            // The in-process searches read every released index back.
            let (all, _) = writer_segments(&member);
            writer_memory = Some(WriterMemory {
                segments,
                indexes_released: lean.1,
                segments_mb_released: lean.0 as f64 / 1048576.0,
                segments_mb_all_in_memory: all as f64 / 1048576.0,
                rss_mb_released: released,
                rss_mb_all_in_memory: rss_mb()?,
            });
            proxy_overhead = Some(ProxyOverhead {
                p50_one_group_ms: one.latency.p50_ms,
                p50_in_process_ms: local.latency.p50_ms,
                added_p50_ms: one.latency.p50_ms - local.latency.p50_ms,
                recall_one_group: one.recall,
                recall_in_process: local.recall,
            });
        }
        member.stop(crate::config::MEMBER_DRAIN).await?;
    }

    // A slow node: group 1's node gets a fraction of group 0's CPU; with stealing, and without.
    let slow_cpus = (a.node_cpus / a.slow_factor).max(0.1);
    let mut slow_runs = Vec::new();
    for steal in [true, false] {
        let mut cfg = writer_config(&data, a, vec![vec![ep[0].clone()], vec![ep[1].clone()]]);
        cfg.query_nodes.steal = steal;
        let member = Member::start(cfg).await?;
        wait_placed(&member, 2).await?;
        set_cap(&nodes.cgroups[1], Some(slow_cpus))?;
        let before = node_counts(&member);
        let mid = || member.placement().map_or(0, |p| p.stolen_mid_search.load(Ordering::Relaxed));
        let mid_before = mid();
        let run = closed_loop(&member.endpoint(), &ds, &truth, a, a.concurrency, Duration::from_secs_f64(a.duration_secs), None).await;
        let (node_searches, node_stolen) = counts_since(&before, &node_counts(&member));
        let stolen_mid_search = mid() - mid_before;
        set_cap(&nodes.cgroups[1], Some(a.node_cpus))?;
        member.stop(crate::config::MEMBER_DRAIN).await?;
        let run = run?;
        slow_runs.push(SlowRun {
            qps: run.qps,
            ratio: run.qps / scale_out[0].qps,
            recall: run.recall,
            latency: run.latency,
            node_searches,
            node_stolen,
            stolen_mid_search,
        });
    }
    let (strict_turns, stealing) = (slow_runs.pop().context("no slow-node run")?, slow_runs.pop().context("no slow-node run")?);
    let slow_node = SlowNode { fast_cpus: a.node_cpus, slow_cpus, stealing, strict_turns };

    // Node loss: group 0 = the first node and the spare, group 1 = the second node.
    let groups = vec![vec![ep[0].clone(), ep[a.max_groups].clone()], vec![ep[1].clone()]];
    let member = Member::start(writer_config(&data, a, groups)).await?;
    let segments = wait_placed(&member, 2).await?;
    let placement = member.placement().unwrap().clone();
    let killed = Arc::new(Mutex::new(None::<Instant>));
    let run = {
        let endpoint = member.endpoint();
        let killed = killed.clone();
        let load =
            closed_loop(&endpoint, &ds, &truth, a, a.concurrency, Duration::from_secs_f64(a.duration_secs + 2.0), Some(killed.clone()));
        let kill = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            // kill -9: no goodbye, its connections just die.
            nodes.children[0].kill().context("kill -9 of a query node")?;
            let at = Instant::now();
            *killed.lock() = Some(at);
            loop {
                let copies = placement.copies_per_group();
                if copies == [segments, segments] && !placement.groups()[0][0].is_up() {
                    return anyhow::Ok(at.elapsed());
                }
                ensure!(at.elapsed() < Duration::from_secs(120), "group 0's copies were not restored in 120 s: {copies:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (run, restored) = tokio::join!(load, kill);
        (run?, restored?)
    };
    let rerouted = placement.rerouted.load(Ordering::Relaxed);
    member.stop(crate::config::MEMBER_DRAIN).await?;
    let (run, restored) = run;
    // The killed node was ep[0]: ep[1] serves the growing-rows phase.
    let growing = growing_rows(&data, a, &ds, &truth, &ep[1], &nodes.cgroups[1]).await?;
    // ep[1] again, capped again, as the group's listed node.
    set_cap(&nodes.cgroups[1], Some(a.node_cpus))?;
    let join = node_joins(&data, a, &ds, &truth, &ep[1], &mut nodes, scratch.path()).await?;
    let node_loss = NodeLoss {
        searches: run.searches,
        failed: run.failed,
        first_error: run.first_error,
        after_kill: run.after_since,
        restored_ms: restored.as_secs_f64() * 1e3,
        rerouted,
    };

    let mut targets = Vec::new();
    for p in scale_out.iter().skip(1) {
        targets.push(Target {
            name: format!("scale_out_{}_groups", p.groups),
            value: p.scale,
            goal: format!(">= {TARGET_SCALE} (QPS >= {TARGET_SCALE} x {} x one group's)", p.groups),
            met: p.scale >= TARGET_SCALE,
        });
    }
    targets.push(Target {
        name: "slow_node_qps_vs_one_group".into(),
        value: slow_node.stealing.ratio,
        goal: format!(">= {TARGET_SLOW_NODE} (a fast and a slow group vs one fast group)"),
        met: slow_node.stealing.ratio >= TARGET_SLOW_NODE,
    });
    targets.push(Target {
        name: "failed_searches_on_node_loss".into(),
        value: node_loss.failed as f64,
        goal: "0".into(),
        met: node_loss.failed == 0,
    });
    // Queries both runs asked: every answer the same.
    let both: Vec<bool> =
        (growing.on_leader.answers.iter().zip(&growing.in_writer.answers)).filter_map(|(x, y)| Some(x.as_ref()? == y.as_ref()?)).collect();
    let differ = both.iter().filter(|&&same| !same).count();
    targets.push(Target {
        name: "growing_rows_answers_differing".into(),
        value: differ as f64,
        goal: format!("0 of the {} queries both runs asked (growing rows on the shard's leader vs in the writer)", both.len()),
        met: differ == 0 && !both.is_empty(),
    });
    targets.push(Target {
        name: "failed_searches_on_node_join".into(),
        value: join.failed as f64,
        goal: "0".into(),
        met: join.failed == 0,
    });
    targets.push(Target {
        name: "join_qps_gain".into(),
        value: join.ratio,
        goal: format!(">= {TARGET_JOIN} (a group of two nodes, one joined, vs its first node alone)"),
        met: join.ratio >= TARGET_JOIN,
    });
    let po = proxy_overhead.context("no proxy overhead measured")?;
    targets.push(Target {
        name: "recall_unchanged".into(),
        value: po.recall_one_group - po.recall_in_process,
        goal: "0 (the query nodes load the cluster's own index files)".into(),
        met: po.recall_one_group == po.recall_in_process,
    });
    drop(nodes);
    Ok(Report {
        params: Params {
            n: a.n,
            dim: a.dim,
            k: a.k,
            segments: a.segments,
            concurrency: a.concurrency,
            duration_secs: a.duration_secs,
            node_cpus: a.node_cpus,
            ef_search: a.ef_search,
            cgroup,
        },
        scale_out,
        proxy_overhead: po,
        slow_node,
        node_loss,
        writer_memory: writer_memory.context("no writer memory measured")?,
        growing,
        join,
        targets,
    })
}

/// Phase 6 (see the module's comment): group 0 is `listed` alone; under load a new node joins
/// it, and the placement evens the group's copies out over both.
async fn node_joins(
    data: &Path,
    a: &ReplicasBenchArgs,
    ds: &Arc<Dataset>,
    truth: &Arc<Vec<Vec<i64>>>,
    listed: &str,
    nodes: &mut Nodes,
    scratch: &Path,
) -> anyhow::Result<NodeJoin> {
    use tandem_cluster::fanout::Fanout;
    let member = Member::start(writer_config(data, a, vec![vec![listed.to_string()]])).await?;
    let segments = wait_placed(&member, 1).await?;
    let placement = member.placement().context("no placement")?.clone();
    let endpoint = member.endpoint();
    let length = Duration::from_secs_f64(a.duration_secs);
    let before = closed_loop(&endpoint, ds, truth, a, a.concurrency, length, None).await?;
    let started = Arc::new(Mutex::new(None::<Instant>));
    let load = closed_loop(&endpoint, ds, truth, a, a.concurrency, length + Duration::from_secs(1), Some(started.clone()));
    let join = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at = Instant::now();
        *started.lock() = Some(at);
        nodes.start(a.node_cpus, scratch, &["--join", &endpoint, "--group", "0"])?;
        loop {
            let held: Vec<u64> = placement.query_nodes().iter().map(|q| q.segments).collect();
            if held.len() == 2 && held.iter().sum::<u64>() == segments as u64 && held[0].abs_diff(held[1]) <= 1 {
                return anyhow::Ok((at.elapsed(), held));
            }
            ensure!(at.elapsed() < Duration::from_secs(120), "the group was not evened out in 120 s: copies {held:?} of {segments}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (during, balanced) = tokio::join!(load, join);
    let (during, (balanced, copies)) = (during?, balanced?);
    let after = closed_loop(&endpoint, ds, truth, a, a.concurrency, length, None).await;
    member.stop(crate::config::MEMBER_DRAIN).await?;
    let after = after?;
    Ok(NodeJoin {
        qps_before: before.qps,
        qps_after: after.qps,
        ratio: after.qps / before.qps,
        recall_after: after.recall,
        searches: during.searches,
        failed: during.failed,
        first_error: during.first_error,
        after_start: during.after_since,
        balanced_ms: balanced.as_secs_f64() * 1e3,
        copies,
    })
}

/// Phase 5 (see the module's comment): `--growing-rows` rows inserted after the base rows and
/// left unsealed, searched at one in flight with the shard's leader on `endpoint`'s node (its
/// cgroup at `cgroup` uncapped for it) and without.
async fn growing_rows(
    data: &Path,
    a: &ReplicasBenchArgs,
    ds: &Arc<Dataset>,
    truth: &Arc<Vec<Vec<i64>>>,
    endpoint: &str,
    cgroup: &Path,
) -> anyhow::Result<GrowingRows> {
    set_cap(cgroup, None)?;
    let extra = dataset::gaussian_mixture(a.growing_rows, 0, a.dim, 100, 43);
    let mut runs = Vec::new();
    for leaders in [true, false] {
        let mut cfg = writer_config(data, a, vec![vec![endpoint.to_string()]]);
        cfg.query_nodes.shard_leaders = leaders;
        let member = Member::start(cfg).await?;
        if leaders {
            let mut c = crate::cli::connect(&member.endpoint()).await?;
            let n = ds.n() as i64;
            let req = pb::InsertRequest {
                ack: 0,
                collection: COLLECTION.into(),
                ids: (n..n + a.growing_rows as i64).collect(),
                vectors: extra.base.clone(),
                payloads: Vec::new(),
            };
            c.insert(req).await.context("insert of the growing rows")?;
        }
        wait_placed(&member, 1).await?;
        let placement = member.placement().context("no placement")?.clone();
        let node = placement.groups()[0][0].clone();
        if leaders {
            // Until the node leads the shard, the writer searches the growing rows.
            let deadline = Instant::now() + Duration::from_secs(30);
            while node.led.load(Ordering::Relaxed) == 0 {
                ensure!(Instant::now() < deadline, "the query node did not lead the shard in 30 s");
                closed_loop(&member.endpoint(), ds, truth, a, 1, Duration::from_millis(100), None).await?;
            }
        }
        let (led, here) = (node.led.load(Ordering::Relaxed), placement.growing_here.load(Ordering::Relaxed));
        let cpu = super::threads_cpu_secs("tandem-search");
        let run = closed_loop(&member.endpoint(), ds, truth, a, 1, Duration::from_secs_f64(a.duration_secs / 2.0), None).await;
        let cpu = super::threads_cpu_secs("tandem-search").zip(cpu).map_or(0.0, |(after, before)| after - before);
        let growing_searched_on_node = node.led.load(Ordering::Relaxed) - led;
        let growing_here = placement.growing_here.load(Ordering::Relaxed) - here;
        member.stop(crate::config::MEMBER_DRAIN).await?;
        let run = run?;
        runs.push(GrowingRun {
            qps: run.qps,
            writer_search_cpu_us: cpu * 1e6 / run.searches.max(1) as f64,
            recall: run.recall,
            latency: run.latency,
            growing_searched_on_node,
            growing_here,
            answers: run.answers,
        });
    }
    set_cap(cgroup, Some(a.node_cpus))?;
    let (in_writer, on_leader) = (runs.pop().context("no growing-rows run")?, runs.pop().context("no growing-rows run")?);
    Ok(GrowingRows { rows: a.growing_rows, on_leader, in_writer })
}

/// The writer's segment bytes (its own accounting) and how many indexes it has released.
fn writer_segments(member: &Member) -> (u64, usize) {
    let (mut bytes, mut released) = (0, 0);
    for c in member.node().collections() {
        for sh in c.shards() {
            bytes += sh.stats().memory_bytes;
            released += sh.sealed_segments().iter().filter(|s| s.is_released()).count();
        }
    }
    (bytes, released)
}

/// Waits (up to 10 s) until the writer released the index of each of `segments` segments;
/// returns [`writer_segments`] then, whether or not it did.
async fn wait_released(member: &Member, segments: usize) -> anyhow::Result<(u64, usize)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = writer_segments(member);
        if now.1 >= segments || Instant::now() >= deadline {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This process's resident set, MB.
fn rss_mb() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kb / 1024.0)
}

/// Creates the collection, inserts every base row and flushes (which seals and indexes).
async fn load(endpoint: &str, ds: &Dataset) -> anyhow::Result<()> {
    let mut c = crate::cli::connect(endpoint).await?;
    let index = pb::IndexSpec { kind: Some(pb::index_spec::Kind::Hnsw(pb::HnswIndex { m: 16, ef_construction: 100 })), metric: 0 };
    let schema = pb::CollectionSchema {
        name: COLLECTION.into(),
        dim: ds.dim as u32,
        metric: pb::Metric::L2 as i32,
        index: Some(index),
        shards: 1,
        ..Default::default()
    };
    c.create_collection(pb::CreateCollectionRequest { schema: Some(schema) }).await.context("create collection")?;
    for lo in (0..ds.n()).step_by(5000) {
        let hi = (lo + 5000).min(ds.n());
        c.insert(super::insert_rows(COLLECTION, ds, lo, hi)).await.with_context(|| format!("insert of rows {lo}..{hi}"))?;
    }
    c.flush(pb::FlushRequest { collection: COLLECTION.into() }).await.context("flush")?;
    Ok(())
}

/// Waits until every indexed sealed segment has a copy in each of `groups` groups; returns
/// their number.
async fn wait_placed(member: &Member, groups: usize) -> anyhow::Result<usize> {
    let placement = member.placement().context("the bench cluster has no query nodes")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let indexed: usize = member
            .node()
            .collections()
            .iter()
            .flat_map(|c| {
                c.shards().iter().map(|s| s.sealed_segments().iter().filter(|g| g.indexed_as().is_some()).count()).collect::<Vec<_>>()
            })
            .sum();
        let copies = placement.copies_per_group();
        if indexed > 0 && copies.len() == groups && copies.iter().all(|&c| c == indexed) {
            return Ok(indexed);
        }
        ensure!(Instant::now() < deadline, "segments not placed in 600 s: {indexed} indexed, copies per group {copies:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct LoopRun {
    qps: f64,
    recall: f64,
    latency: Latency,
    searches: u64,
    failed: u64,
    first_error: Option<String>,
    /// Searches sent after the instant `since` held (the kill, or the joining node's start).
    after_since: Latency,
    /// The first answer to each query (`None`: never asked).
    answers: Vec<Option<Vec<i64>>>,
}

/// `concurrency` clients, each searching one query after another for `length`. Recall is over
/// the first answer to each query. With `since`, latencies of searches sent after the instant
/// it holds are also reported apart.
async fn closed_loop(
    endpoint: &str,
    ds: &Arc<Dataset>,
    truth: &Arc<Vec<Vec<i64>>>,
    a: &ReplicasBenchArgs,
    concurrency: usize,
    length: Duration,
    since: Option<Arc<Mutex<Option<Instant>>>>,
) -> anyhow::Result<LoopRun> {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let answers = Arc::new(Mutex::new(vec![None::<Vec<i64>>; ds.nq()]));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut c = crate::cli::connect(endpoint).await?;
        let (ds, next, failed, first_error, answers, stop, since) =
            (ds.clone(), next.clone(), failed.clone(), first_error.clone(), answers.clone(), stop.clone(), since.clone());
        let (k, ef) = (a.k as u32, a.ef_search);
        tasks.push(tokio::spawn(async move {
            let (mut ns, mut after) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % ds.nq();
                let req = pb::SearchRequest {
                    collection: COLLECTION.into(),
                    vectors: ds.queries[i * ds.dim..(i + 1) * ds.dim].to_vec(),
                    top_k: k,
                    params: Some(pb::SearchParams { nprobe: 0, ef_search: ef }),
                    read: Some(pb::ReadOptions { consistency: pb::ConsistencyLevel::Eventually as i32, ..Default::default() }),
                    ..Default::default()
                };
                let t = Instant::now();
                let late = since.as_ref().and_then(|s| *s.lock()).is_some_and(|k| t >= k);
                match c.search(req).await {
                    Ok(r) => {
                        let d = t.elapsed().as_nanos() as u64;
                        ns.push(d);
                        if late {
                            after.push(d);
                        }
                        let ids = r.into_inner().results.first().map(|h| h.hits.iter().map(|x| x.id).collect()).unwrap_or_default();
                        answers.lock()[i].get_or_insert(ids);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().get_or_insert_with(|| e.message().to_string());
                    }
                }
            }
            (ns, after)
        }));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ns, mut after) = (Vec::new(), Vec::new());
    for t in tasks {
        let (n, a) = t.await?;
        ns.extend(n);
        after.extend(a);
    }
    let secs = started.elapsed().as_secs_f64();
    let answers = std::mem::take(&mut *answers.lock());
    let answers_kept = answers.clone();
    let (found, asked): (Vec<Vec<i64>>, Vec<Vec<i64>>) =
        answers.into_iter().zip(truth.iter()).filter_map(|(a, t)| a.map(|a| (a, t.clone()))).unzip();
    let searches = ns.len() as u64;
    Ok(LoopRun {
        qps: searches as f64 / secs,
        recall: dataset::recall_at_k(&found, &asked, a.k),
        latency: summarize(ns),
        searches: searches + failed.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        first_error: first_error.lock().take(),
        after_since: summarize(after),
        answers: answers_kept,
    })
}

fn print(r: &Report) {
    println!(
        "tandem bench replicas: {} x {}, {} segments, {} in flight, query nodes capped at {} CPU ({})",
        r.params.n, r.params.dim, r.params.segments, r.params.concurrency, r.params.node_cpus, r.params.cgroup
    );
    println!("groups      qps   scale  recall  p50 ms  p99 ms  sub-searches per node (stolen)");
    for p in &r.scale_out {
        println!(
            "{:>6} {:>8.0} {:>7.2} {:>7.4} {:>7.2} {:>7.2}  {:?} ({:?})",
            p.groups, p.qps, p.scale, p.recall, p.latency.p50_ms, p.latency.p99_ms, p.node_searches, p.node_stolen
        );
    }
    let sn = &r.slow_node;
    for (how, run) in [("stealing", &sn.stealing), ("strict turns", &sn.strict_turns)] {
        println!(
            "slow node ({} CPU beside {}), {how}: {:.0} qps = {:.2} x one group's; p50 {:.2} ms p99 {:.2} ms; sub-searches [fast, slow] {:?}, stolen {:?} ({} mid-search)",
            sn.slow_cpus,
            sn.fast_cpus,
            run.qps,
            run.ratio,
            run.latency.p50_ms,
            run.latency.p99_ms,
            run.node_searches,
            run.node_stolen,
            run.stolen_mid_search
        );
    }
    let po = &r.proxy_overhead;
    println!(
        "proxy overhead at 1 in flight: p50 {:.3} ms with one query node vs {:.3} ms in process (+{:.3} ms); recall {:.4} vs {:.4}",
        po.p50_one_group_ms, po.p50_in_process_ms, po.added_p50_ms, po.recall_one_group, po.recall_in_process
    );
    let nl = &r.node_loss;
    println!(
        "node loss (kill -9): {} searches, {} failed; after the kill p50 {:.2} ms p99 {:.2} ms max {:.2} ms; copies restored in {:.0} ms; {} sub-searches answered by the cluster itself",
        nl.searches, nl.failed, nl.after_kill.p50_ms, nl.after_kill.p99_ms, nl.after_kill.max_ms, nl.restored_ms, nl.rerouted
    );
    let wm = &r.writer_memory;
    println!(
        "writer memory, one group holding every segment: {} of {} indexes released; segments {:.1} MB released vs {:.1} MB all in memory; process RSS {:.0} MB vs {:.0} MB",
        wm.indexes_released,
        wm.segments,
        wm.segments_mb_released,
        wm.segments_mb_all_in_memory,
        wm.rss_mb_released,
        wm.rss_mb_all_in_memory
    );
    let g = &r.growing;
    for (how, run) in [("on the shard's leader", &g.on_leader), ("in the writer", &g.in_writer)] {
        println!(
            "{} growing rows searched {how}, 1 in flight: {:.0} qps, p50 {:.3} ms p99 {:.3} ms, recall {:.4}; writer search CPU {:.0} us/search; sub-searches with growing rows on the node {}, fallen back to the writer {}",
            g.rows,
            run.qps,
            run.latency.p50_ms,
            run.latency.p99_ms,
            run.recall,
            run.writer_search_cpu_us,
            run.growing_searched_on_node,
            run.growing_here
        );
    }
    let j = &r.join;
    println!(
        "node joins (--join) under load: {} searches, {} failed; after its start p50 {:.2} ms p99 {:.2} ms; group evened out in {:.0} ms (copies {:?}); {:.0} qps before, {:.0} after = {:.2} x, recall {:.4}",
        j.searches,
        j.failed,
        j.after_start.p50_ms,
        j.after_start.p99_ms,
        j.balanced_ms,
        j.copies,
        j.qps_before,
        j.qps_after,
        j.ratio,
        j.recall_after
    );
    for t in &r.targets {
        println!("target {:<32} {:>8.3}  goal {:<50} {}", t.name, t.value, t.goal, if t.met { "met" } else { "MISSED" });
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: super::ReplicasBenchArgs,
    }

    fn check(args: &[&str]) -> Result<(), String> {
        let cli = Cli::parse_from(std::iter::once("replicas").chain(args.iter().copied()));
        super::validate(&cli.a).map_err(|e| e.to_string())
    }

    #[test]
    fn arguments_out_of_range_are_refused_naming_the_value() {
        assert_eq!(check(&[]), Ok(()));
        for (args, says) in [
            (&["--slow-factor", "0.5"][..], "--slow-factor 0.5 is out of range"),
            (&["--max-groups", "1"], "--max-groups 1 is out of range"),
            (&["--node-cpus", "0"], "--node-cpus 0 is out of range"),
            (&["--n", "10", "--segments", "1"], "--n 10 is too small"),
            (&["--growing-rows", "6250"], "--growing-rows 6250 is out of range 1..6250"),
        ] {
            let e = check(args).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }
}
