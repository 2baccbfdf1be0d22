//! `tandem bench failover`: kill -9 of the leader under write and read load through the
//! gateway, several rounds in a row, with real processes: an etcd arbiter, a Kafka-protocol
//! broker (tansu), `tandem cluster` processes and a gateway.
//!
//! ```text
//!  round:  load ──► kill -9 the leader ──► first write acknowledged through the gateway
//!          (failover time) ──► more load ──► restart the killed cluster: it rejoins as an
//!          alternative ──► writes paused: every cluster has the same rows (checksum) ──►
//!          every acknowledged write is there (writes lost) ──► next round kills the new leader
//! ```
//!
//! Writers upsert rows with unique ids (one id per write; a write whose outcome is unknown is
//! sent again until acknowledged: upsert makes that safe). Readers search with BOUNDED
//! consistency; every failed read counts. Targets (issue 6): failover <= 3 s, 0 failed reads, 0
//! lost writes. The integration test `tests/failover.rs` runs this with two rounds and asserts
//! them, so the bench and the test measure the same thing.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use parking_lot::Mutex;
use serde::Serialize;
use tandem_client::Channel;
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;

pub const COLLECTION: &str = "failover";
const DIM: usize = 8;
/// Rows the convergence checksum reads per page (a query's largest limit).
const MAX_ROWS: u64 = 16_384;

#[derive(Debug, Clone, clap::Args)]
pub struct FailoverBenchArgs {
    /// Failovers to measure; each kills the current leader, whose restart then rejoins.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Clusters in the group (at least 2).
    #[arg(long, default_value_t = 3)]
    pub clusters: usize,
    /// The arbiter lease (ha.lease_ttl_s): failover takes about this long plus the election.
    #[arg(long, default_value_t = 2)]
    pub lease_ttl_s: u64,
    /// Concurrent writers through the gateway (one row per write).
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Concurrent readers through the gateway (BOUNDED searches).
    #[arg(long, default_value_t = 2)]
    pub readers: usize,
    /// Pause of each writer between writes, in ms (sets the write rate).
    #[arg(long, default_value_t = 20)]
    pub write_pause_ms: u64,
    /// Seconds of load before each kill, and again after the new leader took writes.
    #[arg(long, default_value_t = 2.0)]
    pub load_s: f64,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// The `tandem` binary the clusters run [default: this one].
    #[arg(long, value_name = "FILE")]
    pub tandem_bin: Option<PathBuf>,
    /// Datacenters in order of preference for promotion (ha.prefer_datacenters), repeatable.
    #[arg(long = "prefer-datacenter", value_name = "DC")]
    pub prefer_datacenters: Vec<String>,
    /// Keep the clusters' data and logs (`<name>.log`) here instead of a temp dir removed at
    /// the end.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// etcd binary [default: /usr/bin/etcd].
    #[arg(long, value_name = "FILE", default_value = "/usr/bin/etcd")]
    pub etcd_bin: PathBuf,
}

impl Default for FailoverBenchArgs {
    fn default() -> Self {
        FailoverBenchArgs {
            rounds: 3,
            clusters: 3,
            lease_ttl_s: 2,
            writers: 2,
            readers: 2,
            write_pause_ms: 20,
            load_s: 2.0,
            json: None,
            tandem_bin: None,
            prefer_datacenters: Vec::new(),
            work_dir: None,
            etcd_bin: "/usr/bin/etcd".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub killed: String,
    pub new_leader: String,
    pub epoch: u64,
    /// From kill -9 to the first write sent after it and acknowledged through the gateway.
    pub failover_ms: f64,
    /// From the killed cluster's restart until it served as an alternative.
    pub rejoin_ms: f64,
    /// Every cluster held the same rows once writes paused.
    pub converged: bool,
    pub writes_acked: u64,
    pub writes_lost: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub clusters: usize,
    pub lease_ttl_s: u64,
    pub rounds: Vec<Round>,
    pub failover_ms_max: f64,
    pub failover_ms_mean: f64,
    pub writes_acked: u64,
    pub writes_lost: u64,
    pub reads_failed: u64,
    /// The first few read errors, for diagnosis.
    pub read_errors: Vec<String>,
}

pub async fn run(a: FailoverBenchArgs) -> anyhow::Result<()> {
    super::log_if_asked();
    let report = measure(&a).await?;
    println!("round  killed  new leader  epoch  failover ms  rejoin ms  converged  acked  lost  reads ok  reads failed");
    for (i, r) in report.rounds.iter().enumerate() {
        println!(
            "{:>5}  {:>6}  {:>10}  {:>5}  {:>11.0}  {:>9.0}  {:>9}  {:>5}  {:>4}  {:>8}  {:>12}",
            i + 1,
            r.killed,
            r.new_leader,
            r.epoch,
            r.failover_ms,
            r.rejoin_ms,
            r.converged,
            r.writes_acked,
            r.writes_lost,
            r.reads_ok,
            r.reads_failed
        );
    }
    println!(
        "failover max {:.0} ms, mean {:.0} ms (target <= 3000); writes lost {} of {}; reads failed {}",
        report.failover_ms_max, report.failover_ms_mean, report.writes_lost, report.writes_acked, report.reads_failed
    );
    for e in &report.read_errors {
        println!("read error: {e}");
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One cluster of a [`Harness`]: its name, role at start ("leading", "alternative" or
/// "standby") and datacenter.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub role: &'static str,
    pub datacenter: String,
}

impl Spec {
    pub fn new(name: &str, role: &'static str) -> Spec {
        Spec { name: name.into(), role, datacenter: "dc1".into() }
    }
}

/// Real processes for failover: an etcd arbiter, a tansu broker and `tandem cluster`
/// processes (the first spec leads), each torn down on drop. Shared by the bench and the
/// integration tests.
pub struct Harness {
    pub group: Group,
    _broker: tandem_harness::Tansu,
    _etcd: tandem_harness::Etcd,
    _tmp: tempfile::TempDir,
}

impl Harness {
    /// Starts etcd, tansu and the clusters; returns once the first leads and the others run.
    pub async fn start(a: &FailoverBenchArgs, specs: &[Spec]) -> anyhow::Result<Harness> {
        ensure!(specs.first().is_some_and(|s| s.role == "leading"), "the first cluster must be the leading one");
        let tandem = match &a.tandem_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("the tandem binary")?,
        };
        let etcd = tandem_harness::Etcd::try_start_with(&a.etcd_bin).await?;
        let broker = tokio::task::spawn_blocking(|| tandem_harness::Tansu::try_start(true)).await??;
        let tmp = tempfile::Builder::new().prefix("tandem-bench-failover-").tempdir()?;
        let dir = match &a.work_dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                d.clone()
            }
            None => tmp.path().to_path_buf(),
        };
        static GROUPS: AtomicU64 = AtomicU64::new(0);
        let group = format!("fo{}n{}", std::process::id(), GROUPS.fetch_add(1, Ordering::Relaxed));
        let mut group = Group {
            dir,
            tandem,
            etcd: etcd.endpoint(),
            broker: broker.brokers(),
            group,
            lease_ttl_s: a.lease_ttl_s,
            prefer: a.prefer_datacenters.clone(),
            clusters: Vec::new(),
        };
        group.start(&specs[0])?;
        wait_role(&group.clusters[0].endpoint(), pb::Role::Leading, Duration::from_secs(60)).await.context("the first leader")?;
        for spec in &specs[1..] {
            group.start(spec)?;
        }
        Ok(Harness { group, _broker: broker, _etcd: etcd, _tmp: tmp })
    }

    pub fn endpoint(&self, name: &str) -> String {
        self.group.clusters[self.group.index(name)].endpoint()
    }

    /// A gateway over the group (etcd discovery), on a free port.
    pub async fn gateway(&self) -> anyhow::Result<tandem_gateway::Running> {
        start_gateway(&self.group).await
    }

    /// The last `lines` log lines of every cluster (for a test that failed).
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for c in &self.group.clusters {
            let text = std::fs::read_to_string(self.group.dir.join(&c.name).with_extension("log")).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("---- {} ----\n{}\n", c.name, all[all.len().saturating_sub(lines)..].join("\n")));
        }
        out
    }

    /// The etcd client URL.
    pub fn etcd(&self) -> String {
        self.group.etcd.clone()
    }

    /// The replication group id (the arbiter's keys are under /tandem/<group>/ha/).
    pub fn group_id(&self) -> String {
        self.group.group.clone()
    }
}

/// Runs the rounds and measures them (see the module docs).
pub async fn measure(a: &FailoverBenchArgs) -> anyhow::Result<Report> {
    ensure!(a.clusters >= 2, "--clusters {} must be at least 2: a failover needs a cluster to promote", a.clusters);
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    ensure!(a.writers >= 1, "--writers must be at least 1");
    ensure!((1..=300).contains(&a.lease_ttl_s), "--lease-ttl-s {} is out of range 1..=300", a.lease_ttl_s);
    let specs: Vec<Spec> = (0..a.clusters).map(|i| Spec::new(&format!("c{i}"), if i == 0 { "leading" } else { "alternative" })).collect();
    let mut h = Harness::start(a, &specs).await?;
    let gateway = h.gateway().await?;
    let gw = format!("http://{}", gateway.addr);
    let mut client = connect(&gw).await?;
    create_collection(&mut client).await?;
    for c in &h.group.clusters[1..] {
        wait_role(&c.endpoint(), pb::Role::Alternative, Duration::from_secs(60)).await?;
    }

    let load = Load::start(&gw, a).await?;
    let mut rounds = Vec::new();
    for _ in 0..a.rounds {
        rounds.push(round(&mut h.group, &load, a).await?);
    }
    load.stop().await;
    let _ = gateway.stop().await;
    drop(h);

    let failovers: Vec<f64> = rounds.iter().map(|r| r.failover_ms).collect();
    Ok(Report {
        clusters: a.clusters,
        lease_ttl_s: a.lease_ttl_s,
        failover_ms_max: failovers.iter().copied().fold(0.0, f64::max),
        failover_ms_mean: failovers.iter().sum::<f64>() / failovers.len() as f64,
        writes_acked: load.acked.lock().len() as u64,
        writes_lost: rounds.last().map_or(0, |r| r.writes_lost),
        reads_failed: load.reads_failed.load(Ordering::Relaxed),
        read_errors: load.read_errors.lock().clone(),
        rounds,
    })
}

async fn round(group: &mut Group, load: &Load, a: &FailoverBenchArgs) -> anyhow::Result<Round> {
    let reads_failed_before = load.reads_failed.load(Ordering::Relaxed);
    let reads_ok_before = load.reads_ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(a.load_s)).await;
    let (leader, _) = group.leader().await?;
    let killed = group.clusters[leader].name.clone();
    let killed_at = Instant::now();
    group.clusters[leader].kill9();
    tracing::info!(cluster = %killed, "killed the leader");
    // The first write sent after the kill and acknowledged.
    let failover = load.first_ack_after(killed_at, Duration::from_secs(60)).await.context("no write was acknowledged after the kill")?;
    tracing::info!(ms = failover.as_millis() as u64, "first write acknowledged after the kill");
    tokio::time::sleep(Duration::from_secs_f64(a.load_s)).await;
    let (new_leader, epoch) = group.leader().await?;
    let new_leader = group.clusters[new_leader].name.clone();

    // The killed cluster comes back on its data and rejoins as an alternative.
    let restarted = Instant::now();
    group.restart(&killed)?;
    let idx = group.index(&killed);
    wait_role(&group.clusters[idx].endpoint(), pb::Role::Alternative, Duration::from_secs(120)).await.context("rejoining")?;
    let rejoin = restarted.elapsed();

    // Writes paused: every cluster converges on the same rows, and every acknowledged one is there.
    load.pause(true);
    let converged = converged(group, Duration::from_secs(60)).await;
    let acked: Vec<i64> = load.acked.lock().clone();
    let lost = missing(&group.clusters[group.index(&new_leader)].endpoint(), &acked).await?;
    load.pause(false);
    Ok(Round {
        killed,
        new_leader,
        epoch,
        failover_ms: failover.as_secs_f64() * 1e3,
        rejoin_ms: rejoin.as_secs_f64() * 1e3,
        converged,
        writes_acked: acked.len() as u64,
        writes_lost: lost,
        reads_ok: load.reads_ok.load(Ordering::Relaxed) - reads_ok_before,
        reads_failed: load.reads_failed.load(Ordering::Relaxed) - reads_failed_before,
    })
}

// ---- the load --------------------------------------------------------------------------------

struct Load {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    /// Ids acknowledged, in order; and (sent, acknowledged) times of every acknowledged write.
    acked: Arc<Mutex<Vec<i64>>>,
    acks: Arc<Mutex<Vec<(Instant, Instant)>>>,
    reads_ok: Arc<AtomicU64>,
    reads_failed: Arc<AtomicU64>,
    read_errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(gw: &str, a: &FailoverBenchArgs) -> anyhow::Result<Load> {
        let mut load = Load {
            stop: Default::default(),
            paused: Default::default(),
            acked: Default::default(),
            acks: Default::default(),
            reads_ok: Default::default(),
            reads_failed: Default::default(),
            read_errors: Default::default(),
            tasks: Vec::new(),
        };
        let next_id = Arc::new(AtomicU64::new(1));
        for _ in 0..a.writers {
            let mut c = connect(gw).await?;
            let (stop, paused, acked, acks, next_id) =
                (load.stop.clone(), load.paused.clone(), load.acked.clone(), load.acks.clone(), next_id.clone());
            let pause = Duration::from_millis(a.write_pause_ms);
            load.tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if paused.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let id = next_id.fetch_add(1, Ordering::Relaxed) as i64;
                    // Until acknowledged: an unknown outcome is sent again (upsert is idempotent).
                    loop {
                        let sent = Instant::now();
                        let req =
                            pb::UpsertRequest { collection: COLLECTION.into(), ids: vec![id], vectors: vector(id), ..Default::default() };
                        match c.upsert(timed(req, Duration::from_secs(10))).await {
                            Ok(_) => {
                                acked.lock().push(id);
                                acks.lock().push((sent, Instant::now()));
                                break;
                            }
                            Err(_) if stop.load(Ordering::Relaxed) => return,
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                    tokio::time::sleep(pause).await;
                }
            }));
        }
        for r in 0..a.readers {
            let mut c = connect(gw).await?;
            let (stop, ok, failed, errors) =
                (load.stop.clone(), load.reads_ok.clone(), load.reads_failed.clone(), load.read_errors.clone());
            load.tasks.push(tokio::spawn(async move {
                let mut i = r as i64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let req = pb::SearchRequest {
                        collection: COLLECTION.into(),
                        vectors: vector(i),
                        top_k: 5,
                        read: Some(pb::ReadOptions {
                            consistency: pb::ConsistencyLevel::Bounded as i32,
                            session_token: String::new(),
                            staleness_ms: 1000,
                        }),
                        ..Default::default()
                    };
                    match c.search(timed(req, Duration::from_secs(10))).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(s) => {
                            let mut e = errors.lock();
                            if e.len() < 10 {
                                e.push(format!("{:?}: {}", s.code(), s.message()));
                            }
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        Ok(load)
    }

    fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::Relaxed);
    }

    /// Time from `t` to the acknowledgement of the first write sent after it.
    async fn first_ack_after(&self, t: Instant, limit: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(&(_, acked)) = self.acks.lock().iter().filter(|(sent, _)| *sent > t).min_by_key(|(_, acked)| *acked) {
                return Ok(acked - t);
            }
            ensure!(Instant::now() < deadline, "no write sent after the kill was acknowledged within {limit:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            while !t.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

pub fn vector(id: i64) -> Vec<f32> {
    (0..DIM).map(|j| ((id * 31 + j as i64 * 17).rem_euclid(1000)) as f32 / 1000.0).collect()
}

pub fn timed<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

pub async fn connect(endpoint: &str) -> anyhow::Result<TandemClient<Channel>> {
    crate::cli::connect(endpoint).await
}

pub async fn create_collection(c: &mut TandemClient<Channel>) -> anyhow::Result<()> {
    let schema = pb::CollectionSchema {
        name: COLLECTION.into(),
        dim: DIM as u32,
        metric: pb::Metric::L2 as i32,
        index: None,
        shards: 2,
        fields: Vec::new(),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.create_collection(timed(pb::CreateCollectionRequest { schema: Some(schema.clone()) }, Duration::from_secs(10))).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(s) if Instant::now() < deadline => {
                tracing::debug!(error = %s.message(), "create collection: retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => bail!("creating the collection: {}", s.message()),
        }
    }
}

// ---- checks ----------------------------------------------------------------------------------

/// How many of `ids` the cluster at `endpoint` does not have (STRONG reads).
pub async fn missing(endpoint: &str, ids: &[i64]) -> anyhow::Result<u64> {
    missing_in(endpoint, COLLECTION, ids).await
}

/// How many of `ids` `collection` on the cluster at `endpoint` does not have (STRONG reads).
pub async fn missing_in(endpoint: &str, collection: &str, ids: &[i64]) -> anyhow::Result<u64> {
    let mut c = connect(endpoint).await?;
    let mut lost = 0;
    for chunk in ids.chunks(1000) {
        let req = pb::GetRequest {
            collection: collection.into(),
            ids: chunk.to_vec(),
            read: Some(pb::ReadOptions { consistency: pb::ConsistencyLevel::Strong as i32, ..Default::default() }),
            ..Default::default()
        };
        let got = c.get(timed(req, Duration::from_secs(30))).await.map_err(crate::cli::status_error)?.into_inner();
        let found: BTreeSet<i64> = got.entities.iter().map(|e| e.id).collect();
        lost += chunk.iter().filter(|id| !found.contains(id)).count() as u64;
    }
    Ok(lost)
}

/// Whether every cluster shows the same rows (STRONG reads, so alternatives wait until they
/// hold everything the leader had), within `limit`.
pub async fn converged(group: &Group, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut sums = BTreeSet::new();
        let mut all = true;
        for c in &group.clusters {
            match checksum(&c.endpoint()).await {
                Ok(s) => {
                    sums.insert(s);
                }
                Err(e) => {
                    tracing::debug!(cluster = %c.name, error = %e, "checksum not available yet");
                    all = false;
                }
            }
        }
        if all && sums.len() == 1 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

pub async fn checksum(endpoint: &str) -> anyhow::Result<(u64, u64)> {
    checksum_of(endpoint, COLLECTION).await
}

/// (rows, hash of every (id, vector)) of `collection` at the cluster at `endpoint`, read STRONG
/// in pages of ids above the last one read (call it while nothing writes: each page is its own
/// snapshot).
pub async fn checksum_of(endpoint: &str, collection: &str) -> anyhow::Result<(u64, u64)> {
    use std::hash::{Hash, Hasher};
    let mut c = connect(endpoint).await?;
    let mut rows: Vec<(i64, Vec<u32>)> = Vec::new();
    loop {
        let filter = rows.last().map(|(id, _)| format!("id > {id}")).unwrap_or_default();
        let req = pb::QueryRequest {
            collection: collection.into(),
            filter,
            limit: MAX_ROWS as u32,
            include_vectors: true,
            read: Some(pb::ReadOptions { consistency: pb::ConsistencyLevel::Strong as i32, ..Default::default() }),
            ..Default::default()
        };
        let r = c.query(timed(req, Duration::from_secs(10))).await.map_err(crate::cli::status_error)?.into_inner();
        let full = r.entities.len() as u64 == MAX_ROWS;
        // Sorted by id (the API's promise), so the next page starts above the last id.
        rows.extend(r.entities.iter().map(|e| (e.id, e.vector.iter().map(|x| x.to_bits()).collect::<Vec<_>>())));
        if !full {
            break;
        }
    }
    ensure!(rows.windows(2).all(|w| w[0].0 < w[1].0), "{collection}: the query's rows were not sorted by id");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rows.hash(&mut h);
    Ok((rows.len() as u64, h.finish()))
}

pub async fn cluster_info(endpoint: &str) -> anyhow::Result<pb::GetClusterInfoResponse> {
    let mut c = connect(endpoint).await?;
    Ok(c.get_cluster_info(timed(pb::GetClusterInfoRequest {}, Duration::from_secs(2)))
        .await
        .map_err(crate::cli::status_error)?
        .into_inner())
}

pub async fn wait_role(endpoint: &str, role: pb::Role, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let info = cluster_info(endpoint).await;
        if info.as_ref().is_ok_and(|i| i.role == role as i32) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{endpoint} did not become {role:?} within {limit:?} (last: {info:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- processes -------------------------------------------------------------------------------

/// The group's clusters, each a `tandem cluster` process with its own config and data.
pub struct Group {
    dir: PathBuf,
    tandem: PathBuf,
    etcd: String,
    broker: String,
    group: String,
    lease_ttl_s: u64,
    prefer: Vec<String>,
    pub clusters: Vec<ClusterProcess>,
}

impl Group {
    fn config(&self, spec: &Spec) -> String {
        let (etcd, group, broker, ttl) = (&self.etcd, &self.group, &self.broker, self.lease_ttl_s);
        let (name, role, dc) = (&spec.name, spec.role, &spec.datacenter);
        let prefer = serde_json::to_string(&self.prefer).expect("strings");
        format!(
            "cluster_id = \"{name}\"\ndatacenter = \"{dc}\"\nrole = \"{role}\"\n\
             [replication]\ngroup = \"{group}\"\ntransport = \"kafka\"\ntick_ms = 20\n\
             [replication.kafka]\nbrokers = \"{broker}\"\n\
             [discovery]\netcd = [\"{etcd}\"]\nprefix = \"/{group}/clusters/\"\nttl_s = {ttl}\n\
             [ha]\narbiter = \"etcd\"\nlease_ttl_s = {ttl}\nprefer_datacenters = {prefer}\n"
        )
    }

    fn start(&mut self, spec: &Spec) -> anyhow::Result<()> {
        let config = self.dir.join(format!("{}.toml", spec.name));
        std::fs::write(&config, self.config(spec))?;
        let p = ClusterProcess::start(&self.tandem, &spec.name, &config, &self.dir.join(&spec.name))?;
        self.clusters.push(p);
        Ok(())
    }

    /// Starts `name` again on its data and configuration (as it was first configured: an
    /// arbiter decides what it becomes).
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.index(name);
        let config = self.dir.join(format!("{name}.toml"));
        self.clusters[i] = ClusterProcess::start(&self.tandem, name, &config, &self.dir.join(name))?;
        Ok(())
    }

    pub fn index(&self, name: &str) -> usize {
        self.clusters.iter().position(|c| c.name == name).expect("a cluster of the group")
    }

    /// The cluster that leads now (the highest epoch among those that say so), and its epoch.
    pub async fn leader(&self) -> anyhow::Result<(usize, u64)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut best = None;
            for (i, c) in self.clusters.iter().enumerate() {
                if c.child.is_none() {
                    continue;
                }
                if let Ok(info) = cluster_info(&c.endpoint()).await
                    && info.role == pb::Role::Leading as i32
                    && best.is_none_or(|(_, e)| info.epoch > e)
                {
                    best = Some((i, info.epoch));
                }
            }
            if let Some(b) = best {
                return Ok(b);
            }
            ensure!(Instant::now() < deadline, "no cluster leads");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub struct ClusterProcess {
    pub name: String,
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl ClusterProcess {
    fn start(tandem: &Path, name: &str, config: &Path, data: &Path) -> anyhow::Result<ClusterProcess> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.with_extension("log"))?;
        let mut cmd = Command::new(tandem);
        cmd.args(["cluster", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .env(
                "RUST_LOG",
                std::env::var("TANDEM_BENCH_LOG").unwrap_or_else(|_| "warn,tandem_node::ha=info,tandem_cluster::node=info".into()),
            )
            .stderr(log);
        let (child, addr) = crate::cli::cluster::spawn_listening(&mut cmd)
            .with_context(|| format!("tandem cluster {name} (log: {})", data.with_extension("log").display()))?;
        Ok(ClusterProcess { name: name.to_string(), child: Some(child), addr })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends `signal` (e.g. "STOP", "CONT", "TERM") to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("the process is not running")?.id();
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?.success();
        ensure!(ok, "kill -{signal} {pid} failed");
        Ok(())
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ClusterProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn start_gateway(group: &Group) -> anyhow::Result<tandem_gateway::Running> {
    let prefix = format!("/{}/clusters/", group.group);
    let membership = tandem_discovery::etcd::watch(vec![group.etcd.clone()], prefix).await?;
    let mut cfg = tandem_gateway::GatewayConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    cfg.health.interval_ms = 100;
    cfg.health.healthy_after = 1;
    cfg.health.unhealthy_after = 2;
    Ok(tandem_gateway::start(cfg, membership).await?)
}
