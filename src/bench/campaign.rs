//! `tandem bench campaign`: a fault campaign against the two-datacenter deployment of
//! `docker/compose.yml` (docs/deploy.md), in the manner of Jepsen: clients work while a nemesis
//! breaks things, and a checker then looks for anything the system promised and did not keep.
//!
//! ```text
//!  sessions (per datacenter, through that datacenter's gateway):
//!      upsert one new id ──► acknowledged: remember id and token
//!      get(own acknowledged ids + ids seen before + ids others had acknowledged), SESSION token
//!          ──► every own acknowledged id there (read-your-writes), every id seen before there
//!              (monotonic reads), the reply's token not older than the one sent, rows intact
//!  nemesis (random order, each fault healed before the next):
//!      partition dc1 | dc2 · leader cut off from etcd · kill -9 leader · pause leader ·
//!      broker restart · alternative restarted
//!  at the end: faults healed, clients stopped ──► every cluster converges to one checksum
//!      ──► no acknowledged id missing on any cluster
//! ```
//!
//! The faults are made with the engine's own means (`docker network disconnect`, `docker kill`,
//! `docker pause`, `docker restart`) and, for "cut off from etcd but not from its clients",
//! an iptables rule in the leader container's network namespace (`nsenter`), which drops only
//! its traffic to etcd's client port. The driver reaches every container at its address on its
//! datacenter's network, which a WAN partition leaves alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tandem_client::Channel;
use tandem_proto::session::SessionToken;
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;
use tokio::process::Command;

use super::failover::{checksum_of, connect, missing_in, timed, vector};

const COLLECTION: &str = "campaign";
const DIM: usize = 8;
/// The deployment's datacenters and what runs in each (docker/compose.yml's services).
const DATACENTERS: [Datacenter; 2] = [
    Datacenter { name: "dc1", cluster: "c1", gateway: "gw1", others: &["etcd-1", "etcd-2", "broker", "prometheus"] },
    Datacenter { name: "dc2", cluster: "c2", gateway: "gw2", others: &["etcd-3"] },
];
const CLUSTER_PORT: u16 = 19530;
const GATEWAY_PORT: u16 = 19540;
const ETCD_CLIENT_PORT: u16 = 2379;

struct Datacenter {
    name: &'static str,
    cluster: &'static str,
    gateway: &'static str,
    others: &'static [&'static str],
}

impl Datacenter {
    fn services(&self) -> impl Iterator<Item = &'static str> + '_ {
        [self.cluster, self.gateway].into_iter().chain(self.others.iter().copied())
    }
}

/// Every service the campaign reaches or faults, with its datacenter: docker/compose.yml must
/// name them so (tests/deploy.rs checks it).
pub fn services() -> Vec<(&'static str, &'static str)> {
    DATACENTERS.iter().flat_map(|dc| dc.services().map(move |s| (dc.name, s))).collect()
}

#[derive(Debug, Clone, clap::Args)]
pub struct CampaignArgs {
    /// Operations (writes + reads, failed ones included) to run at least.
    #[arg(long, default_value_t = 10_000)]
    pub ops: u64,
    /// Faults to inject at least.
    #[arg(long, default_value_t = 20)]
    pub faults: usize,
    /// Stop injecting after this long even if the targets above are not met (the run then fails).
    #[arg(long, default_value_t = 600)]
    pub max_duration_s: u64,
    /// Client sessions per datacenter, each through its datacenter's gateway.
    #[arg(long, default_value_t = 2)]
    pub sessions_per_dc: usize,
    /// Each fault lasts a random time up to this long (at least 1 s).
    #[arg(long, default_value_t = 4.0)]
    pub max_hold_s: f64,
    /// Seed of the nemesis's and the clients' choices [default: from the clock].
    #[arg(long)]
    pub seed: Option<u64>,
    /// The compose project (container names `<project>-<service>`, networks `<project>_<name>`).
    #[arg(long, default_value = "tandem")]
    pub project: String,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The datacenter's containers lose the WAN (both sides keep their own network).
    PartitionDc1,
    PartitionDc2,
    /// The leader's packets to etcd's client port are dropped; clients still reach it.
    LeaderCutFromEtcd,
    /// SIGKILL of the leader's container; started again on its volume when healed.
    KillLeader,
    /// `docker pause` of the leader (a stalled process); unpaused when healed.
    PauseLeader,
    /// SIGKILL of the broker; started again on its volume when healed.
    RestartBroker,
    /// An alternative stopped (SIGTERM, then SIGKILL after 10 s) and started on its volume.
    RestartAlternative,
}

const KINDS: [FaultKind; 7] = [
    FaultKind::PartitionDc1,
    FaultKind::PartitionDc2,
    FaultKind::LeaderCutFromEtcd,
    FaultKind::KillLeader,
    FaultKind::PauseLeader,
    FaultKind::RestartBroker,
    FaultKind::RestartAlternative,
];

#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    /// The container the fault hit (a partition: the datacenter).
    pub target: String,
    /// Seconds since the campaign started.
    pub at_s: f64,
    pub held_ms: u64,
    pub leader_before: Option<String>,
    /// The leader once the deployment settled after the heal (None: none within the limit).
    pub leader_after: Option<String>,
    /// From the moment the fault took hold to the acknowledgement of the first write sent
    /// after it (None: none within 5 s of the deployment settling).
    pub writes_resumed_ms: Option<u64>,
    /// From the heal until a leader led and every cluster served again.
    pub settled_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub kind: &'static str,
    pub session: String,
    pub at_s: f64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Counts {
    pub ops: u64,
    pub writes_acked: u64,
    /// Writes that failed or whose outcome is unknown (either is allowed; neither is counted lost).
    pub writes_failed: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_s: f64,
    pub counts: Counts,
    /// Failed operations by gRPC code.
    pub errors: BTreeMap<String, u64>,
    pub faults: Vec<FaultRecord>,
    /// Times writes took to resume after the faults that hit the leader.
    pub failover_ms: Vec<u64>,
    pub converged: bool,
    pub convergence_ms: u64,
    /// Per cluster: (rows, checksum) once converged (or the last seen).
    pub checksums: BTreeMap<String, (u64, u64)>,
    /// Acknowledged ids missing, per cluster (absent: the cluster never answered; a violation).
    pub lost: BTreeMap<String, u64>,
    pub violations: Vec<Violation>,
    pub passed: bool,
}

pub async fn run(a: CampaignArgs) -> anyhow::Result<()> {
    super::log_if_asked();
    let report = campaign(&a).await?;
    println!("fault                   target      at s   held ms  leader before -> after  writes resumed ms  settled ms");
    for f in &report.faults {
        println!(
            "{:<22}  {:<10}  {:>5.1}  {:>7}  {:>6} -> {:<6}  {:>17}  {:>10}",
            format!("{:?}", f.kind),
            f.target,
            f.at_s,
            f.held_ms,
            f.leader_before.as_deref().unwrap_or("-"),
            f.leader_after.as_deref().unwrap_or("-"),
            f.writes_resumed_ms.map(|m| m.to_string()).unwrap_or("-".into()),
            f.settled_ms.map(|m| m.to_string()).unwrap_or("-".into()),
        );
    }
    let c = &report.counts;
    println!(
        "ops {} in {:.0} s: writes acked {} failed {}, reads ok {} failed {}; faults {}; converged {} ({} ms); lost {:?}; violations {}",
        c.ops,
        report.duration_s,
        c.writes_acked,
        c.writes_failed,
        c.reads_ok,
        c.reads_failed,
        report.faults.len(),
        report.converged,
        report.convergence_ms,
        report.lost,
        report.violations.len()
    );
    for v in report.violations.iter().take(20) {
        println!("VIOLATION {} ({} at {:.1} s): {}", v.kind, v.session, v.at_s, v.detail);
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    ensure!(report.faults.len() >= a.faults, "only {} faults injected (--faults {})", report.faults.len(), a.faults);
    ensure!(report.counts.ops >= a.ops, "only {} operations (--ops {})", report.counts.ops, a.ops);
    ensure!(report.passed, "the campaign found violations, lost writes or no convergence (report above)");
    Ok(())
}

pub async fn campaign(a: &CampaignArgs) -> anyhow::Result<Report> {
    ensure!(a.sessions_per_dc >= 1, "--sessions-per-dc {}: at least 1", a.sessions_per_dc);
    ensure!(a.max_hold_s >= 1.0, "--max-hold-s {}: at least 1", a.max_hold_s);
    let seed = a
        .seed
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    let d = Deployment::find(&a.project).await?;
    tracing::info!(?d.clusters, ?d.gateways, seed, "deployment found");
    // A campaign stopped halfway may have left a fault in place.
    d.heal_all().await;
    d.settle(Duration::from_secs(60)).await.context("the deployment has no leader serving with every cluster up: is it up (docker/up)?")?;
    prepare_collection(&d).await?;

    let started = Instant::now();
    let shared = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (di, dc) in DATACENTERS.iter().enumerate() {
        for s in 0..a.sessions_per_dc {
            let session = format!("{}/{}", dc.name, s);
            let client = connect(&d.gateways[di]).await?;
            let (shared, stop) = (shared.clone(), stop.clone());
            let rng = StdRng::seed_from_u64(seed ^ ((di * 100 + s) as u64 + 1));
            tasks.push(tokio::spawn(client_session(session, client, shared, stop, rng, started)));
        }
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = Vec::new();
    let nemesis = async {
        let mut deck: Vec<FaultKind> = Vec::new();
        let limit = Duration::from_secs(a.max_duration_s);
        while (faults.len() < a.faults || shared.counts.lock().ops < a.ops) && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
            if deck.is_empty() {
                // Every kind once per round, in a new order each round.
                deck = KINDS.to_vec();
                deck.shuffle(&mut rng);
            }
            let kind = deck.pop().expect("refilled above");
            let hold = Duration::from_millis(rng.random_range(1000..=(a.max_hold_s * 1000.0) as u64));
            match d.inject(kind, hold, &shared, started, &mut rng).await? {
                Some(record) => {
                    tracing::info!(?record, "fault");
                    faults.push(record);
                }
                None => tracing::warn!(?kind, "no cluster leads, so no leader to fault; next fault"),
            }
        }
        anyhow::Ok(())
    };
    let outcome = nemesis.await;
    // Whatever happened, nothing stays broken: a docker command that failed halfway through a
    // fault left it in place.
    d.heal_all().await;
    if let Err(e) = outcome {
        stop.store(true, Ordering::Relaxed);
        return Err(e.context("injecting a fault"));
    }

    // Faults over: let the deployment settle, then stop the clients and check.
    let _ = d.settle(Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let acked: Vec<i64> = shared.acked.lock().iter().copied().collect();
    let check_started = Instant::now();
    let (converged, checksums) = d.converge(Duration::from_secs(120)).await;
    let convergence_ms = check_started.elapsed().as_millis() as u64;
    let mut lost = BTreeMap::new();
    for (name, endpoint) in &d.clusters {
        // A cluster may be between roles (a late fencing, a rejoin): ask again until it answers.
        let deadline = Instant::now() + Duration::from_secs(60);
        let n = loop {
            match missing_in(endpoint, COLLECTION, &acked).await {
                Ok(n) => break Some(n),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(cluster = %name, error = %e, "reading back the acknowledged ids: retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    shared.violation(
                        "unreadable",
                        "checker",
                        started,
                        format!("{name}: reading back the acknowledged ids failed for 60 s: {e:#}"),
                    );
                    break None;
                }
            }
        };
        if let Some(n) = n {
            if n > 0 {
                shared.violation("lost_write", "checker", started, format!("{name}: {n} of {} acknowledged ids missing", acked.len()));
            }
            lost.insert(name.clone(), n);
        }
    }
    if !converged {
        shared.violation("no_convergence", "checker", started, format!("checksums still differ after 120 s: {checksums:?}"));
    }
    let failover_ms = faults
        .iter()
        .filter(|f: &&FaultRecord| matches!(f.kind, FaultKind::KillLeader | FaultKind::PauseLeader | FaultKind::LeaderCutFromEtcd))
        .filter_map(|f| f.writes_resumed_ms)
        .collect();
    let violations = shared.violations.lock().clone();
    Ok(Report {
        seed,
        duration_s: started.elapsed().as_secs_f64(),
        counts: shared.counts.lock().clone(),
        errors: shared.errors.lock().clone(),
        faults,
        failover_ms,
        converged,
        convergence_ms,
        checksums,
        lost,
        passed: violations.is_empty(),
        violations,
    })
}

// ---- clients -------------------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    next_id: AtomicU64,
    counts: Mutex<Counts>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Every acknowledged id.
    acked: Mutex<BTreeSet<i64>>,
    /// (sent, acknowledged) of every acknowledged write (for "writes resumed").
    acks: Mutex<Vec<(Instant, Instant)>>,
    violations: Mutex<Vec<Violation>>,
}

impl Shared {
    fn violation(&self, kind: &'static str, session: &str, started: Instant, detail: String) {
        tracing::error!(kind, session, %detail, "violation");
        self.violations.lock().push(Violation { kind, session: session.into(), at_s: started.elapsed().as_secs_f64(), detail });
    }

    fn succeeded(&self, write: bool) {
        let mut c = self.counts.lock();
        c.ops += 1;
        if write { c.writes_acked += 1 } else { c.reads_ok += 1 }
    }

    fn failed(&self, write: bool, s: &tonic::Status) {
        let mut c = self.counts.lock();
        c.ops += 1;
        if write {
            c.writes_failed += 1
        } else {
            c.reads_failed += 1
        }
        *self.errors.lock().entry(format!("{}:{:?}", if write { "write" } else { "read" }, s.code())).or_default() += 1;
    }

    /// When the first write sent at or after `t` to be acknowledged was.
    fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        self.acks.lock().iter().filter(|(sent, _)| *sent >= t).map(|(_, acked)| *acked).min()
    }
}

fn token_ts(token: &str) -> Option<u64> {
    SessionToken::decode(token).ok().flatten().map(|t| t.ts)
}

/// One client session: writes new ids and reads back with its token, checking what it reads.
async fn client_session(
    name: String,
    mut client: TandemClient<Channel>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    mut rng: StdRng,
    started: Instant,
) {
    let mut token = String::new();
    let mut own: Vec<i64> = Vec::new();
    let mut seen: BTreeSet<i64> = BTreeSet::new();
    let timeout = Duration::from_secs(5);
    while !stop.load(Ordering::Relaxed) {
        if rng.random_bool(0.4) {
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed) as i64 + 1;
            let sent = Instant::now();
            let req = pb::UpsertRequest { collection: COLLECTION.into(), ids: vec![id], vectors: vector(id), ..Default::default() };
            match client.upsert(timed(req, timeout)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    own.push(id);
                    shared.acked.lock().insert(id);
                    shared.acks.lock().push((sent, Instant::now()));
                    shared.succeeded(true);
                    if token_ts(&r.session_token) > token_ts(&token) {
                        token = r.session_token;
                    }
                }
                Err(s) => shared.failed(true, &s),
            }
        } else if rng.random_bool(0.25) {
            // A BOUNDED search: what the dashboard's search panels show. Its hits must be rows
            // that were written, at the distance their vectors have.
            let q: Vec<f32> = (0..DIM).map(|_| rng.random_range(0.0..1.0)).collect();
            let req = pb::SearchRequest {
                collection: COLLECTION.into(),
                vectors: q.clone(),
                top_k: 5,
                read: Some(pb::ReadOptions { consistency: pb::ConsistencyLevel::Bounded as i32, ..Default::default() }),
                ..Default::default()
            };
            match client.search(timed(req, timeout)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    shared.succeeded(false);
                    for h in r.results.iter().flat_map(|hits| &hits.hits) {
                        let want: f32 = q.iter().zip(vector(h.id)).map(|(a, b)| (a - b) * (a - b)).sum();
                        if (h.distance - want).abs() > 1e-4 {
                            shared.violation(
                                "wrong_distance",
                                &name,
                                started,
                                format!("hit {} at distance {}, its vector is at {want}", h.id, h.distance),
                            );
                        }
                    }
                }
                Err(s) => shared.failed(false, &s),
            }
        } else {
            // Own latest writes, ids seen before, and a few ids others had acknowledged.
            let mut ids: BTreeSet<i64> = own.iter().rev().take(8).copied().collect();
            let seen_v: Vec<i64> = seen.iter().copied().collect();
            ids.extend(seen_v.choose_multiple(&mut rng, 8).copied());
            let others: Vec<i64> = {
                let acked = shared.acked.lock();
                let recent: Vec<i64> = acked.iter().rev().take(64).copied().collect();
                recent.choose_multiple(&mut rng, 8).copied().collect()
            };
            ids.extend(others);
            if ids.is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let must: BTreeSet<i64> = own.iter().rev().take(8).chain(seen.iter()).filter(|i| ids.contains(i)).copied().collect();
            let sent_token = token.clone();
            let req = pb::GetRequest {
                collection: COLLECTION.into(),
                ids: ids.iter().copied().collect(),
                include_vectors: true,
                read: Some(pb::ReadOptions {
                    consistency: pb::ConsistencyLevel::Session as i32,
                    session_token: sent_token.clone(),
                    staleness_ms: 0,
                }),
                ..Default::default()
            };
            match client.get(timed(req, timeout)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    shared.succeeded(false);
                    let found: BTreeSet<i64> = r.entities.iter().map(|e| e.id).collect();
                    for e in &r.entities {
                        if e.vector != vector(e.id) {
                            shared.violation("corrupt_row", &name, started, format!("id {} came back with vector {:?}", e.id, e.vector));
                        }
                        if !ids.contains(&e.id) {
                            shared.violation("unasked_row", &name, started, format!("id {} was not asked for", e.id));
                        }
                    }
                    let gone: Vec<i64> = must.difference(&found).copied().collect();
                    if !gone.is_empty() {
                        let (own_gone, seen_gone): (Vec<i64>, Vec<i64>) = gone.iter().partition(|i| own.contains(i));
                        let kind = if own_gone.is_empty() { "monotonic_reads" } else { "read_your_writes" };
                        shared.violation(
                            kind,
                            &name,
                            started,
                            format!(
                                "read with token {sent_token:?} (reply token {:?}) lacks own acknowledged ids {own_gone:?} and ids seen before {seen_gone:?}",
                                r.session_token
                            ),
                        );
                    }
                    if token_ts(&r.session_token) < token_ts(&sent_token) {
                        shared.violation(
                            "token_went_back",
                            &name,
                            started,
                            format!("sent {sent_token:?}, the reply carried the older {:?}", r.session_token),
                        );
                    }
                    seen.extend(found);
                    if token_ts(&r.session_token) > token_ts(&token) {
                        token = r.session_token;
                    }
                }
                Err(s) => shared.failed(false, &s),
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..15))).await;
    }
}

async fn prepare_collection(d: &Deployment) -> anyhow::Result<()> {
    let mut c = connect(&d.gateways[0]).await?;
    // A fresh collection per run: the checks count on every id being written once.
    match c.drop_collection(timed(pb::DropCollectionRequest { name: COLLECTION.into() }, Duration::from_secs(10))).await {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => bail!("dropping the previous run's collection: {}", s.message()),
    }
    let schema =
        pb::CollectionSchema { name: COLLECTION.into(), dim: DIM as u32, metric: pb::Metric::L2 as i32, shards: 2, ..Default::default() };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.create_collection(timed(pb::CreateCollectionRequest { schema: Some(schema.clone()) }, Duration::from_secs(10))).await {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                ensure!(Instant::now() < deadline, "the dropped collection {COLLECTION} still exists after 60 s");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) if Instant::now() < deadline => {
                tracing::debug!(error = %s.message(), "create collection: retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => bail!("creating the collection: {}", s.message()),
        }
    }
    // Every cluster has it before the clients start (a read of an unknown collection is an error).
    for (name, endpoint) in &d.clusters {
        let deadline = Instant::now() + Duration::from_secs(30);
        while checksum_of(endpoint, COLLECTION).await.is_err() {
            ensure!(Instant::now() < deadline, "cluster {name} did not get collection {COLLECTION} within 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

// ---- the deployment and the nemesis --------------------------------------------------------

#[derive(Debug)]
struct Deployment {
    project: String,
    /// (cluster service, endpoint at its datacenter network address).
    clusters: Vec<(String, String)>,
    /// Per datacenter, its gateway's endpoint.
    gateways: Vec<String>,
}

impl Deployment {
    async fn find(project: &str) -> anyhow::Result<Deployment> {
        let mut d = Deployment { project: project.into(), clusters: Vec::new(), gateways: Vec::new() };
        for dc in &DATACENTERS {
            let ip = d.address(dc.cluster, dc.name).await?;
            d.clusters.push((dc.cluster.into(), format!("http://{ip}:{CLUSTER_PORT}")));
            let ip = d.address(dc.gateway, dc.name).await?;
            d.gateways.push(format!("http://{ip}:{GATEWAY_PORT}"));
        }
        Ok(d)
    }

    fn container(&self, service: &str) -> String {
        format!("{}-{service}", self.project)
    }

    fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }

    /// The service's address on `network` (fixed in compose.yml, so restarts keep it).
    async fn address(&self, service: &str, network: &str) -> anyhow::Result<String> {
        let format = format!("{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}", self.network(network));
        let ip = docker(&["inspect", "-f", &format, &self.container(service)]).await?;
        ensure!(!ip.is_empty() && ip != "<no value>", "container {} has no address on {}", self.container(service), self.network(network));
        Ok(ip)
    }

    /// Undoes every fault the nemesis makes, whatever state it finds: a stopped container is
    /// started, a paused one unpaused, one off the WAN reconnected (at its address there, which
    /// compose.yml fixes to the same last byte as on its datacenter's network), and a cluster's
    /// etcd rule removed. Errors are logged: this runs when something already went wrong.
    async fn heal_all(&self) {
        for (dc, svc) in services() {
            let c = self.container(svc);
            let step = async {
                match docker(&["inspect", "-f", "{{.State.Status}}", &c]).await?.as_str() {
                    "paused" => drop(docker(&["unpause", &c]).await?),
                    "exited" | "created" => drop(docker(&["start", &c]).await?),
                    _ => {}
                }
                if self.address(svc, "wan").await.is_err() {
                    let local = self.address(svc, dc).await?;
                    let last = local.rsplit('.').next().context("an IPv4 address")?;
                    let ip = format!("172.28.0.{last}");
                    docker(&["network", "connect", "--ip", &ip, "--alias", svc, &self.network("wan"), &c]).await?;
                }
                anyhow::Ok(())
            };
            if let Err(e) = step.await {
                tracing::error!(container = %c, error = %e, "healing");
            }
        }
        for (name, _) in &self.clusters {
            while self.etcd_rule(name, "-D").await.is_ok() {}
        }
    }

    /// Inserts (`-I`) or deletes (`-D`) the rule that drops `service`'s packets to etcd's
    /// client port, in its container's network namespace.
    async fn etcd_rule(&self, service: &str, op: &str) -> anyhow::Result<()> {
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &self.container(service)]).await?;
        let port = ETCD_CLIENT_PORT.to_string();
        output(Command::new("nsenter").args(["-t", &pid, "-n", "iptables", op, "OUTPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"]))
            .await?;
        Ok(())
    }

    async fn leader(&self) -> Option<String> {
        for (name, endpoint) in &self.clusters {
            if let Ok(info) = super::failover::cluster_info(endpoint).await
                && info.role == pb::Role::Leading as i32
            {
                return Some(name.clone());
            }
        }
        None
    }

    /// Waits until one cluster leads and every other one serves as an alternative.
    async fn settle(&self, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let mut leader = None;
            let mut all = true;
            for (name, endpoint) in &self.clusters {
                match super::failover::cluster_info(endpoint).await.map(|i| i.role) {
                    Ok(r) if r == pb::Role::Leading as i32 => leader = Some(name.clone()),
                    Ok(r) if r == pb::Role::Alternative as i32 => {}
                    _ => all = false,
                }
            }
            if let (Some(l), true) = (&leader, all) {
                return Ok(l.clone());
            }
            ensure!(Instant::now() < deadline, "no settled deployment within {limit:?} (leader {leader:?}, all serving: {all})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn converge(&self, limit: Duration) -> (bool, BTreeMap<String, (u64, u64)>) {
        let deadline = Instant::now() + limit;
        let mut last = BTreeMap::new();
        while Instant::now() < deadline {
            let mut all = true;
            for (name, endpoint) in &self.clusters {
                match checksum_of(endpoint, COLLECTION).await {
                    Ok(s) => {
                        last.insert(name.clone(), s);
                    }
                    Err(e) => {
                        tracing::debug!(cluster = %name, error = %e, "checksum not available yet");
                        all = false;
                    }
                }
            }
            if all && last.values().collect::<BTreeSet<_>>().len() == 1 {
                return (true, last);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        (false, last)
    }

    /// Injects `kind` for `hold`, heals it and waits for the deployment to settle; None when
    /// the fault needs a leader and none leads.
    async fn inject(
        &self,
        kind: FaultKind,
        hold: Duration,
        shared: &Shared,
        started: Instant,
        rng: &mut StdRng,
    ) -> anyhow::Result<Option<FaultRecord>> {
        let leader_before = self.leader().await;
        // A fault on "the leader" when none leads (an election still running) waits a little for one.
        let leader = match (&leader_before, kind) {
            (Some(l), _) => Some(l.clone()),
            (None, FaultKind::KillLeader | FaultKind::PauseLeader | FaultKind::LeaderCutFromEtcd) => {
                self.settle(Duration::from_secs(30)).await.ok()
            }
            (None, _) => None,
        };
        let target = match kind {
            FaultKind::PartitionDc1 => "dc1".to_string(),
            FaultKind::PartitionDc2 => "dc2".to_string(),
            FaultKind::LeaderCutFromEtcd | FaultKind::KillLeader | FaultKind::PauseLeader => match &leader {
                Some(l) => l.clone(),
                None => return Ok(None),
            },
            FaultKind::RestartBroker => "broker".to_string(),
            FaultKind::RestartAlternative => {
                let alts: Vec<&String> = self.clusters.iter().map(|(n, _)| n).filter(|n| Some(*n) != leader.as_ref()).collect();
                (*alts.choose(rng).context("no alternative")?).clone()
            }
        };
        let at = Instant::now();
        let at_s = started.elapsed().as_secs_f64();
        // When the fault took hold (the docker command returned): writes sent before it may
        // still be acknowledged the usual way, and would not say when writes resumed.
        let mut in_effect = at;
        match kind {
            FaultKind::PartitionDc1 | FaultKind::PartitionDc2 => {
                let dc = DATACENTERS.iter().find(|d| d.name == target).expect("a datacenter");
                let wan = self.network("wan");
                let mut cut = Vec::new();
                for svc in dc.services() {
                    let ip = self.address(svc, "wan").await?;
                    docker(&["network", "disconnect", "--force", &wan, &self.container(svc)]).await?;
                    cut.push((svc, ip));
                }
                in_effect = Instant::now();
                tokio::time::sleep(hold).await;
                for (svc, ip) in cut {
                    docker(&["network", "connect", "--ip", &ip, "--alias", svc, &wan, &self.container(svc)]).await?;
                }
            }
            FaultKind::LeaderCutFromEtcd => {
                self.etcd_rule(&target, "-I").await?;
                in_effect = Instant::now();
                tokio::time::sleep(hold).await;
                // A container restarted meanwhile has a new namespace without the rule.
                if let Err(e) = self.etcd_rule(&target, "-D").await {
                    tracing::debug!(error = %e, "removing the etcd rule");
                }
            }
            FaultKind::KillLeader => {
                docker(&["kill", "--signal", "KILL", &self.container(&target)]).await?;
                in_effect = Instant::now();
                tokio::time::sleep(hold).await;
                docker(&["start", &self.container(&target)]).await?;
            }
            FaultKind::PauseLeader => {
                docker(&["pause", &self.container(&target)]).await?;
                in_effect = Instant::now();
                tokio::time::sleep(hold).await;
                docker(&["unpause", &self.container(&target)]).await?;
            }
            FaultKind::RestartBroker => {
                docker(&["kill", "--signal", "KILL", &self.container("broker")]).await?;
                in_effect = Instant::now();
                tokio::time::sleep(hold).await;
                docker(&["start", &self.container("broker")]).await?;
            }
            FaultKind::RestartAlternative => {
                docker(&["restart", "--time", "10", &self.container(&target)]).await?;
            }
        }
        let held_ms = at.elapsed().as_millis() as u64;
        let healed = Instant::now();
        let leader_after = self.settle(Duration::from_secs(60)).await.ok();
        let settled_ms = leader_after.as_ref().map(|_| healed.elapsed().as_millis() as u64);
        // Writes resumed: the acknowledgement of the first write sent after the fault began;
        // the clients get a moment after the deployment settled to send one.
        let deadline = Instant::now() + Duration::from_secs(5);
        let writes_resumed_ms = loop {
            if let Some(acked) = shared.first_ack_after(in_effect) {
                break Some((acked - in_effect).as_millis() as u64);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Ok(Some(FaultRecord { kind, target, at_s, held_ms, leader_before, leader_after, writes_resumed_ms, settled_ms }))
    }
}

async fn docker(args: &[&str]) -> anyhow::Result<String> {
    output(Command::new("docker").args(args)).await
}

/// Runs `cmd` to its end (off the runtime's threads: tokio's process support) and returns its
/// output, or an error with its stderr.
async fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().await.with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
