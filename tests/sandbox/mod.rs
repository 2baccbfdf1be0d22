//! The in-process test sandbox: clusters on `127.0.0.1:0` with temp data dirs, each a
//! `tandem_node::Member` started as `tandem cluster` starts one, and ways to restart, stop,
//! pause or partition a member. Every integration test builds on it.
//!
//! ```ignore
//! let sb = Sandbox::builder().cluster("a").build().await;
//! let mut c = sb.client("a").await;
//! sb.restart("a").await;            // graceful stop + start on the same data dir
//! let p = ProcessCluster::start(dir); // a real `tandem cluster` process, for kill -9
//!
//! // Failover: an arbiter of the sandbox's own, a broker transport, members behind links.
//! let sb = Sandbox::builder().transport(Backend::Kafka { brokers }).ha()
//!     .leading("a").alternative("b", "a").build().await;
//! sb.pause("a").await;              // SIGSTOP-like; `partition` cuts it off instead
//! sb.wait_role("b", pb::Role::Leading, limit).await;
//! ```
#![allow(dead_code)]

pub mod faults;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faults::{Fault, FaultyArbiter, Link};
use tandem_client::Channel;
use tandem_cluster::ClusterConfig;
use tandem_node::{Member as NodeMember, MemberOptions};
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;
use tokio::sync::Mutex;

pub type Client = TandemClient<Channel>;

/// How long a member may take to stop.
const DRAIN: Duration = Duration::from_secs(30);

/// The replication transport a sandbox's alternatives use.
#[derive(Debug, Clone)]
pub enum Backend {
    Direct,
    Kafka {
        brokers: String,
    },
    /// A Pulsar service URL (`pulsar://host:port`).
    Pulsar {
        url: String,
    },
}

type Adjust = Box<dyn Fn(&mut ClusterConfig) + Send>;

/// How a cluster joins the sandbox.
enum Joins {
    Leading,
    /// Follows the named cluster (without an arbiter, that cluster's address is configured).
    Following(String),
    Standby,
}

pub struct SandboxBuilder {
    /// Clusters start in order, so a leader precedes its alternatives.
    clusters: Vec<(String, Joins, Adjust)>,
    backend: Backend,
    ha: bool,
    links: bool,
}

impl SandboxBuilder {
    pub fn cluster(self, name: &str) -> Self {
        self.cluster_with(name, |_| {})
    }

    /// A cluster whose config the closure adjusts (e.g. a small `segment.seal_rows`).
    pub fn cluster_with(mut self, name: &str, f: impl Fn(&mut ClusterConfig) + Send + 'static) -> Self {
        self.clusters.push((name.to_string(), Joins::Leading, Box::new(f)));
        self
    }

    /// A leading cluster (same as `cluster`).
    pub fn leading(self, name: &str) -> Self {
        self.cluster(name)
    }

    /// An alternative cluster following `leader` through the sandbox's transport.
    pub fn alternative(self, name: &str, leader: &str) -> Self {
        self.alternative_with(name, leader, |_| {})
    }

    pub fn alternative_with(mut self, name: &str, leader: &str, f: impl Fn(&mut ClusterConfig) + Send + 'static) -> Self {
        self.clusters.push((name.to_string(), Joins::Following(leader.to_string()), Box::new(f)));
        self
    }

    /// A standby (needs [`SandboxBuilder::ha`]): follows whoever leads, serves nothing.
    pub fn standby(mut self, name: &str) -> Self {
        self.clusters.push((name.to_string(), Joins::Standby, Box::new(|_| {})));
        self
    }

    pub fn transport(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Automatic failover: every cluster joins the sandbox's own embedded arbiter (2 s leases),
    /// and sits behind a link so it can be paused or partitioned. Needs a broker transport.
    pub fn ha(mut self) -> Self {
        self.ha = true;
        self.links = true;
        self
    }

    /// Members behind links (pause, partition) without an arbiter.
    pub fn links(mut self) -> Self {
        self.links = true;
        self
    }

    pub async fn build(self) -> Sandbox {
        init_logs();
        let root = tempfile::tempdir().expect("temp dir");
        let mut sb = Sandbox {
            _root: root,
            members: BTreeMap::new(),
            backend: self.backend,
            // One replication group per sandbox (its own topics), shared by all its clusters.
            group: format!("g{}x{}", std::process::id(), rand_suffix()),
            arbiter: self.ha.then(FaultyArbiter::new),
            links: self.links,
        };
        for (name, joins, adjust) in self.clusters {
            let mut cfg = sb.base_config(&name);
            match joins {
                Joins::Leading => {}
                Joins::Following(leader) => {
                    cfg.role = tandem_cluster::Role::Alternative;
                    if !self.ha {
                        cfg.replication.leader = format!("http://{}", sb.addr(&leader).await);
                    }
                }
                Joins::Standby => cfg.role = tandem_cluster::Role::Standby,
            }
            adjust(&mut cfg);
            sb.start_member(name, cfg).await;
        }
        sb
    }
}

/// Logs of the members on the test's output when `TANDEM_TEST_LOG` is set (a filter such as
/// `info,tandem_node=debug`); shown for failed tests only.
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TANDEM_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_test_writer().try_init();
        }
    });
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

struct Member {
    cfg: ClusterConfig,
    running: Option<NodeMember>,
    link: Option<Link>,
}

pub struct Sandbox {
    _root: tempfile::TempDir,
    members: BTreeMap<String, Mutex<Member>>,
    backend: Backend,
    group: String,
    arbiter: Option<FaultyArbiter>,
    links: bool,
}

impl Sandbox {
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder { clusters: Vec::new(), backend: Backend::Direct, ha: false, links: false }
    }

    /// A cluster's configuration before its role: its data dir, the transport, and under an
    /// arbiter the HA settings.
    fn base_config(&self, name: &str) -> ClusterConfig {
        let mut cfg = ClusterConfig {
            cluster_id: name.into(),
            listen: "127.0.0.1:0".into(),
            data_dir: self._root.path().join(name),
            ..Default::default()
        };
        cfg.search.threads = 2;
        // Headroom for a broker on a loaded 2-core machine: bounds waits for the serviceable
        // ts and for exports (a failure guard, not a timing assertion).
        cfg.read.max_wait_ms = 30_000;
        match &self.backend {
            Backend::Direct => cfg.replication.transport = tandem_cluster::config::TransportKind::Direct,
            Backend::Kafka { brokers } => {
                cfg.replication.transport = tandem_cluster::config::TransportKind::Kafka;
                cfg.replication.kafka.brokers = brokers.clone();
                cfg.replication.group = self.group.clone();
            }
            Backend::Pulsar { url } => {
                cfg.replication.transport = tandem_cluster::config::TransportKind::Pulsar;
                cfg.replication.pulsar.service_url = url.clone();
                cfg.replication.group = self.group.clone();
            }
        }
        if self.arbiter.is_some() {
            cfg.ha.arbiter = tandem_cluster::config::ArbiterKind::Embedded;
            cfg.ha.lease_ttl_s = 2;
        }
        cfg
    }

    fn options(&self) -> MemberOptions {
        MemberOptions { arbiter: self.arbiter.clone().map(|a| Arc::new(a) as Arc<dyn tandem_arbiter::Arbiter>), ..Default::default() }
    }

    /// Starts `name` (behind a link when the sandbox has them: the link's address is the one
    /// it advertises, so the arbiter sends the others there).
    async fn start_member(&mut self, name: String, mut cfg: ClusterConfig) {
        let link = if self.links {
            let fault = match &self.arbiter {
                Some(a) => a.switch(&name),
                None => tokio::sync::watch::channel(Fault::None).0,
            };
            // Upstream set once the member has bound its port.
            let link = Link::start("127.0.0.1:9".parse().unwrap(), fault).await;
            cfg.advertise = format!("http://{}", link.addr);
            Some(link)
        } else {
            None
        };
        let running = NodeMember::start_with(cfg.clone(), self.options()).await.unwrap_or_else(|e| panic!("start cluster {name}: {e}"));
        if let Some(l) = &link {
            l.set_upstream(running.addr());
        }
        self.members.insert(name, Mutex::new(Member { cfg, running: Some(running), link }));
    }

    /// Starts another alternative following `leader` (e.g. a new replica joining late).
    pub async fn add_alternative(&mut self, name: &str, leader: &str) {
        let mut cfg = self.base_config(name);
        cfg.role = tandem_cluster::Role::Alternative;
        if self.arbiter.is_none() {
            cfg.replication.leader = format!("http://{}", self.addr(leader).await);
        }
        self.start_member(name.into(), cfg).await;
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub async fn node(&self, name: &str) -> Arc<tandem_cluster::Node> {
        self.member(name).lock().await.running.as_ref().expect("cluster is running").node().clone()
    }

    /// The proxy's placement of sealed segments on query nodes, when `name` has query nodes.
    pub async fn placement(&self, name: &str) -> Option<Arc<tandem_cluster::placement::Placement>> {
        self.member(name).lock().await.running.as_ref().and_then(|r| r.placement().cloned())
    }

    /// The answer to `req` from cluster `name` (`c` is its client) with every segment searched in
    /// its own process, not on its query nodes: what their answers must equal.
    pub async fn answer_in_process(&self, name: &str, c: &mut Client, req: pb::SearchRequest) -> Vec<pb::Hits> {
        let node = self.node(name).await;
        let placement = self.placement(name).await.expect("the cluster has query nodes");
        node.set_fanout(Arc::new(tandem_cluster::fanout::LocalFanout::default()));
        let r = c.search(req).await.map(|r| r.into_inner().results);
        node.set_fanout(placement);
        r.unwrap()
    }

    pub async fn follower(&self, name: &str) -> Arc<tandem_exporter::follower::Follower> {
        self.member(name).lock().await.running.as_ref().and_then(|r| r.follower().cloned()).expect("an alternative")
    }

    fn member(&self, name: &str) -> &Mutex<Member> {
        self.members.get(name).unwrap_or_else(|| panic!("no cluster {name} in the sandbox"))
    }

    /// Where everyone else reaches `name`: its link's address when it has one.
    pub async fn addr(&self, name: &str) -> SocketAddr {
        let m = self.member(name).lock().await;
        match &m.link {
            Some(l) => l.addr,
            None => m.running.as_ref().expect("cluster is running").addr(),
        }
    }

    /// The member's own bound address, past its link: what its own process would still reach
    /// while it is partitioned from everyone else.
    pub async fn inner_addr(&self, name: &str) -> SocketAddr {
        self.member(name).lock().await.running.as_ref().expect("cluster is running").addr()
    }

    pub async fn client(&self, name: &str) -> Client {
        connect(self.addr(name).await).await
    }

    pub async fn config(&self, name: &str) -> ClusterConfig {
        self.member(name).lock().await.cfg.clone()
    }

    pub async fn data_dir(&self, name: &str) -> PathBuf {
        self.member(name).lock().await.cfg.data_dir.clone()
    }

    /// Graceful stop, then start again on the same data directory (a new port; behind a link,
    /// the same address for everyone else).
    pub async fn restart(&self, name: &str) {
        self.stop(name).await;
        let mut m = self.member(name).lock().await;
        let cfg = m.cfg.clone();
        self.start_stopped(&mut m, cfg).await;
    }

    /// Starts a stopped cluster again on its data directory and on `addr` (the address it had),
    /// so clients holding that address reconnect to it.
    pub async fn start_again_at(&self, name: &str, addr: SocketAddr) {
        let mut m = self.member(name).lock().await;
        let mut cfg = m.cfg.clone();
        cfg.listen = addr.to_string();
        self.start_stopped(&mut m, cfg).await;
    }

    /// Starts a stopped member with `cfg`, its link (if it has one) pointed at the new address.
    async fn start_stopped(&self, m: &mut Member, cfg: ClusterConfig) {
        let running = NodeMember::start_with(cfg, self.options()).await.unwrap_or_else(|e| panic!("start {} again: {e}", m.cfg.cluster_id));
        if let Some(l) = &m.link {
            l.set_upstream(running.addr());
        }
        m.running = Some(running);
    }

    /// Stops `name` in the member's order (writes, exporter flush, gRPC drain).
    pub async fn stop(&self, name: &str) {
        let mut m = self.member(name).lock().await;
        if let Some(r) = m.running.take() {
            r.stop(DRAIN).await.expect("stop");
        }
    }

    /// The sandbox's embedded arbiter itself (its test hooks: `pause`, `resume`, `expire`).
    pub fn arbiter(&self) -> tandem_arbiter::EmbeddedArbiter {
        self.arbiter.as_ref().expect("an arbiter: Sandbox::builder().ha()").inner.clone()
    }

    /// Sets `name`'s fault: on its link, and under an arbiter on its arbiter session too.
    async fn set_fault(&self, name: &str, fault: Fault) {
        match &self.arbiter {
            Some(a) => a.set(name, fault),
            None => {
                let m = self.member(name).lock().await;
                m.link.as_ref().expect("pause and partition need links: Sandbox::builder().links() or .ha()").set_fault(fault);
            }
        }
    }

    /// SIGSTOP-like: nothing reaches `name` or comes out of it (its link stalls); under an
    /// arbiter its calls hang and its lease stops being renewed. The process does not exit.
    pub async fn pause(&self, name: &str) {
        self.set_fault(name, Fault::Paused).await;
    }

    /// Cuts `name` off: nothing reaches it, and under an arbiter it cannot reach it (calls
    /// fail, the lease is not renewed); inside, it runs on.
    pub async fn partition(&self, name: &str) {
        self.set_fault(name, Fault::Partitioned).await;
    }

    /// Ends a pause or a partition.
    pub async fn resume(&self, name: &str) {
        self.set_fault(name, Fault::None).await;
    }

    /// The role `name` reports (asked past its link).
    pub async fn role(&self, name: &str) -> Option<pb::Role> {
        let mut c = connect(self.inner_addr(name).await).await;
        let info = c.get_cluster_info(pb::GetClusterInfoRequest {}).await.ok()?.into_inner();
        pb::Role::try_from(info.role).ok()
    }

    /// Waits until `name` reports `role`, failing after `limit`.
    pub async fn wait_role(&self, name: &str, role: pb::Role, limit: Duration) {
        let start = Instant::now();
        loop {
            let now = self.role(name).await;
            if now == Some(role) {
                return;
            }
            assert!(start.elapsed() < limit, "cluster {name} is {now:?}, not {role:?}, after {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The epoch `name` has seen (asked past its link).
    pub async fn epoch(&self, name: &str) -> u64 {
        let mut c = connect(self.inner_addr(name).await).await;
        c.get_cluster_info(pb::GetClusterInfoRequest {}).await.expect("cluster info").into_inner().epoch
    }
}

pub async fn connect(addr: SocketAddr) -> Client {
    let ch: Channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect").into();
    // The client may send more than a server accepts, so tests exercise the server's limit.
    TandemClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(256 << 20)
}

/// A real `tandem cluster` process (for kill -9). Killed when dropped.
pub struct ProcessCluster {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ProcessCluster {
    /// Starts `tandem cluster` on a free port with `data_dir`; extra `TANDEM__` env overrides.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> ProcessCluster {
        Self::start_with_args(data_dir, env, &[])
    }

    /// [`ProcessCluster::start`] with more `tandem cluster` arguments (e.g. `--follow URL`).
    pub fn start_with_args(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> ProcessCluster {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.args(["cluster", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, addr) = tandem::cli::cluster::spawn_listening(&mut cmd).expect("tandem cluster");
        ProcessCluster { child, addr }
    }

    /// SIGTERM, then waits for the process to exit: how long it took, and whether it exited 0.
    pub fn sigterm(&mut self) -> (Duration, bool) {
        let started = Instant::now();
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {} failed", self.child.id());
        let status = self.child.wait().expect("wait for tandem cluster");
        (started.elapsed(), status.success())
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---- data helpers -------------------------------------------------------------------------

/// Deterministic pseudo-random vectors in [-1, 1) (xorshift; no dependency on the generator
/// under test).
pub fn vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n * dim)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

pub fn field(name: &str, ty: pb::ScalarType) -> pb::FieldSchema {
    pb::FieldSchema { name: name.into(), r#type: ty as i32, ..Default::default() }
}

pub fn schema(
    name: &str,
    dim: u32,
    metric: pb::Metric,
    index: Option<pb::IndexSpec>,
    shards: u32,
    fields: Vec<pb::FieldSchema>,
) -> pb::CollectionSchema {
    pb::CollectionSchema { name: name.into(), dim, metric: metric as i32, index, shards, fields, ..Default::default() }
}

pub fn hnsw(m: u32, ef_construction: u32) -> Option<pb::IndexSpec> {
    Some(pb::IndexSpec { kind: Some(pb::index_spec::Kind::Hnsw(pb::HnswIndex { m, ef_construction })), metric: 0 })
}

pub fn ivf(nlist: u32) -> Option<pb::IndexSpec> {
    Some(pb::IndexSpec { kind: Some(pb::index_spec::Kind::IvfFlat(pb::IvfFlatIndex { nlist })), metric: 0 })
}

pub fn int(v: i64) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::Int64Value(v)) }
}

pub fn dbl(v: f64) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::DoubleValue(v)) }
}

pub fn string(v: &str) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::StringValue(v.into())) }
}

pub fn payload(kv: &[(&str, pb::Value)]) -> pb::Payload {
    pb::Payload { fields: kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect() }
}

pub fn read(level: pb::ConsistencyLevel, token: &str) -> Option<pb::ReadOptions> {
    Some(pb::ReadOptions { consistency: level as i32, session_token: token.into(), staleness_ms: 0 })
}

/// A checksum of a collection's whole content (ids, vectors, payloads) as a read at
/// `level` sees it: equal checksums mean equal content.
pub async fn checksum(c: &mut Client, collection: &str, level: pb::ConsistencyLevel) -> (u64, u64) {
    try_checksum(c, collection, level).await.expect("query")
}

/// `checksum`, or the error of the read (e.g. the collection is not there yet).
pub async fn try_checksum(c: &mut Client, collection: &str, level: pb::ConsistencyLevel) -> Result<(u64, u64), tonic::Status> {
    use std::hash::{Hash, Hasher};
    let r = c
        .query(pb::QueryRequest {
            collection: collection.into(),
            filter: String::new(),
            limit: 16_384,
            output_fields: vec!["*".into()],
            include_vectors: true,
            read: read(level, ""),
        })
        .await?
        .into_inner();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for e in &r.entities {
        e.id.hash(&mut h);
        for x in &e.vector {
            x.to_bits().hash(&mut h);
        }
        let mut fields: Vec<_> = e.payload.iter().flat_map(|p| p.fields.iter()).map(|(k, v)| format!("{k}={v:?}")).collect();
        fields.sort();
        fields.hash(&mut h);
    }
    Ok((r.entities.len() as u64, h.finish()))
}

/// How many of `ids` the cluster lacks (STRONG Gets, 1000 ids at a time).
pub async fn missing(c: &mut Client, collection: &str, ids: &[i64]) -> usize {
    let mut lacking = 0;
    for chunk in ids.chunks(1000) {
        let req = pb::GetRequest {
            collection: collection.into(),
            ids: chunk.to_vec(),
            read: read(pb::ConsistencyLevel::Strong, ""),
            ..Default::default()
        };
        let got = c.get(req).await.expect("get").into_inner();
        let found: std::collections::HashSet<i64> = got.entities.iter().map(|e| e.id).collect();
        lacking += chunk.iter().filter(|id| !found.contains(id)).count();
    }
    lacking
}

/// Waits until `alt` holds exactly what `lead` holds (the same checksum; `alt` read
/// EVENTUALLY), failing after `limit`.
pub async fn converge(lead: &mut Client, alt: &mut Client, collection: &str, limit: Duration) {
    let want = checksum(lead, collection, pb::ConsistencyLevel::Strong).await;
    let start = Instant::now();
    loop {
        let got = try_checksum(alt, collection, pb::ConsistencyLevel::Eventually).await;
        if got.as_ref().ok() == Some(&want) {
            return;
        }
        assert!(start.elapsed() < limit, "the alternative did not converge: leader {want:?}, alternative {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn count(c: &mut Client, collection: &str) -> u64 {
    c.count(pb::CountRequest { collection: collection.into(), filter: String::new(), read: read(pb::ConsistencyLevel::Strong, "") })
        .await
        .expect("count")
        .into_inner()
        .count
}

/// Waits until `f` returns true (polling), failing after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "condition not reached within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- gateway ------------------------------------------------------------------------------

impl Sandbox {
    /// A gateway over the named clusters (static membership; datacenters learned from the
    /// clusters), on a free port, with fast health checks. `adjust` changes its config.
    pub async fn gateway(&self, names: &[&str], adjust: impl FnOnce(&mut tandem_gateway::GatewayConfig)) -> tandem_gateway::Running {
        let mut regs = Vec::new();
        for name in names {
            let addr = self.addr(name).await;
            regs.push(tandem_discovery::Registration {
                id: name.to_string(),
                datacenter: String::new(),
                endpoint: format!("http://{addr}"),
            });
        }
        let mut cfg = tandem_gateway::GatewayConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
        cfg.health.interval_ms = 100;
        cfg.health.healthy_after = 1;
        cfg.health.unhealthy_after = 2;
        // Failures (refused connections) are seen at once; a slow answer only means a loaded
        // test machine, and must not take a cluster out of routing.
        cfg.health.timeout_ms = 5_000;
        adjust(&mut cfg);
        tandem_gateway::start(cfg, tandem_discovery::static_list(regs)).await.expect("start gateway")
    }
}

/// The gateway's view of the clusters.
pub async fn topology(gw: &tandem_gateway::Running) -> pb::TopologyResponse {
    let ch: Channel =
        tonic::transport::Channel::from_shared(format!("http://{}", gw.addr)).unwrap().connect().await.expect("connect gateway").into();
    pb::gateway_client::GatewayClient::new(ch).topology(pb::TopologyRequest {}).await.expect("topology").into_inner()
}

/// Waits until the gateway sees every one of its clusters healthy and readable and, if given,
/// reporting `collection` (so reads of it can go to every cluster).
pub async fn gateway_ready(gw: &tandem_gateway::Running, clusters: usize, collection: Option<&str>) {
    eventually(Duration::from_secs(30), || async {
        let t = topology(gw).await;
        t.clusters.len() == clusters
            && !t.leader.is_empty()
            && t.clusters.iter().all(|c| c.readable && collection.is_none_or(|n| c.collections.iter().any(|s| s.name == n)))
    })
    .await;
}

/// A TCP relay to `to` that holds every chunk the server sends back for `delay`: to the proxy,
/// a query node on a slow machine or link.
pub async fn slow_relay(to: std::net::SocketAddr, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(to).await else { continue };
            let ((mut from_client, mut to_client), (mut from_node, mut to_node)) = (inbound.into_split(), outbound.into_split());
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_client, &mut to_node).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n @ 1..) = from_node.read(&mut buf).await {
                    tokio::time::sleep(delay).await;
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// A query node (`tandem query-node`) served in the test's process, with a scratch directory of
/// its own.
pub struct QueryNode {
    pub running: tandem_cluster::query_node::RunningQueryNode,
    stop: tokio_util::sync::CancellationToken,
    _scratch: tempfile::TempDir,
}

impl QueryNode {
    pub async fn start(name: &str) -> QueryNode {
        QueryNode::start_at("127.0.0.1:0", name).await
    }

    pub async fn start_at(listen: &str, name: &str) -> QueryNode {
        QueryNode::try_start(listen, name, None).await.unwrap()
    }

    /// A node that joins replica group `group` of the cluster at `cluster` itself
    /// (`tandem query-node --join`), advertising `advertise` (its own address when empty).
    pub async fn start_joining(name: &str, cluster: &str, group: u32, advertise: &str) -> tandem_cluster::error::Result<QueryNode> {
        let join = tandem_cluster::query_node::JoinOptions { cluster: cluster.into(), group, advertise: advertise.into() };
        QueryNode::try_start("127.0.0.1:0", name, Some(join)).await
    }

    async fn try_start(
        listen: &str,
        name: &str,
        join: Option<tandem_cluster::query_node::JoinOptions>,
    ) -> tandem_cluster::error::Result<QueryNode> {
        use tandem_cluster::query_node::{QueryNodeOptions, serve};
        let scratch = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let opts = QueryNodeOptions { name: name.into(), scratch_dir: scratch.path().to_path_buf(), search_threads: 1, join };
        let running = serve(listen, opts, stop.clone()).await?;
        Ok(QueryNode { running, stop, _scratch: scratch })
    }

    /// Stops the node: its server and its streams end, and its address refuses connections.
    /// Returns that address, for a node started again at it.
    pub async fn stop(self) -> SocketAddr {
        self.stop.cancel();
        let _ = self.running.task.await;
        self.running.addr
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.running.addr)
    }

    pub fn searches(&self) -> u64 {
        self.running.node.searches()
    }

    /// Segments held, over every shard.
    pub fn held(&self) -> usize {
        self.running.node.held().values().map(Vec::len).sum()
    }
}
