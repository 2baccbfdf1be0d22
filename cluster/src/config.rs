//! Cluster node configuration: defaults, then a TOML file, then `TANDEM__`-prefixed environment
//! variables (loading lives in the binary); `validate()` rejects nonsense with messages that name
//! the setting and the value. `docs/tandem.example.toml` is the commented reference.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::node::NodeOptions;
use crate::role::Role;
use crate::shard::ShardOptions;
use crate::wal::{SyncPolicy, WalOptions};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Names this cluster in its replication group.
    pub cluster_id: String,
    /// Where this cluster runs; the gateway can prefer reads in its own datacenter.
    pub datacenter: String,
    /// gRPC listen address; port 0 picks a free port.
    pub listen: String,
    /// The endpoint others use to reach this cluster (published to discovery); empty means
    /// `http://` + the bound listen address.
    pub advertise: String,
    pub data_dir: PathBuf,
    pub role: Role,
    pub wal: WalConfig,
    pub segment: SegmentConfig,
    pub search: SearchConfig,
    pub index: IndexConfig,
    pub limits: Limits,
    pub read: ReadConfig,
    pub replication: ReplicationConfig,
    pub discovery: DiscoveryConfig,
    pub telemetry: TelemetryConfig,
    pub ha: HaConfig,
    pub query_nodes: QueryNodesConfig,
}

/// Query nodes holding in-memory replicas of this cluster's sealed segments (`placement.rs`,
/// docs/scaling.md). Empty: every search runs in this process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryNodesConfig {
    /// One list of query node endpoints per replica group: every group holds a copy of every
    /// sealed segment, spread over its nodes, and searches take turns over the groups. A list
    /// may be empty: nodes started with `--join` enter a group themselves.
    pub groups: Vec<Vec<String>>,
    /// How long a query node may wait for the shard's stream to reach a read's snapshot before
    /// the proxy searches the part itself.
    pub wait_ms: u64,
    /// Long-tail stealing: an idle node holding a copy of a segment in another group takes the
    /// turn of a node still busy with an earlier search. Off: every search stays with the group
    /// whose turn it is (a slow node then sets the pace of its turns).
    pub steal: bool,
    /// This process drops from memory the index of a sealed segment that every replica group
    /// holds on a live query node (its file stays, and a search that has to run here after all
    /// reads it back). Off: it keeps every index in memory, as without query nodes.
    pub release_indexes: bool,
    /// Shard leaders: one node per replica group keeps each shard's growing rows, following the
    /// shard's stream, and searches them, so this process searches no row a query node can.
    /// Off: the growing rows are searched here.
    pub shard_leaders: bool,
}

impl Default for QueryNodesConfig {
    fn default() -> Self {
        QueryNodesConfig { groups: Vec::new(), wait_ms: 1000, steal: true, release_indexes: true, shard_leaders: true }
    }
}

/// Automatic failover (docs/operations.md): an arbiter decides who leads; `role` is then only
/// where a cluster starts (`leading` leads a group that has never had a leader).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaConfig {
    /// `none` (roles are fixed), `etcd` (the arbiter for real deployments) or `embedded` (every
    /// cluster in one process: the demo, tests).
    pub arbiter: ArbiterKind,
    /// etcd endpoints; empty: those of `discovery.etcd`.
    pub etcd: Vec<String>,
    /// Key prefix of the group's arbiter state; empty: "/tandem/<replication.group>/ha/".
    pub prefix: String,
    /// Lease of each cluster in the arbiter: a leader that stops renewing it (dead, paused,
    /// partitioned) loses leadership after this long. etcd counts whole seconds.
    pub lease_ttl_s: u64,
    /// A leader stops accepting writes this long before its lease could expire, so it never
    /// writes while another cluster may already lead.
    pub fence_margin_ms: u64,
    /// Whether this cluster may be promoted (an alternative or a standby).
    pub promotable: bool,
    /// Datacenters in order of preference for promotion; unlisted ones come last.
    pub prefer_datacenters: Vec<String>,
    /// The longest a candidate spends consuming the log to its end before it gives up this
    /// election round (it is not a clear winner without every acknowledged write).
    pub catch_up_timeout_ms: u64,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            arbiter: ArbiterKind::None,
            etcd: Vec::new(),
            prefix: String::new(),
            lease_ttl_s: 2,
            fence_margin_ms: 500,
            promotable: true,
            prefer_datacenters: Vec::new(),
            catch_up_timeout_ms: 10_000,
        }
    }
}

impl HaConfig {
    pub fn enabled(&self) -> bool {
        match self.arbiter {
            ArbiterKind::None => false,
            ArbiterKind::Etcd | ArbiterKind::Embedded => true,
        }
    }
}

/// Who decides which cluster leads (`ha.arbiter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArbiterKind {
    /// Roles are fixed by configuration.
    None,
    Etcd,
    /// In-process: every cluster of the group runs in this process.
    Embedded,
}

impl std::fmt::Display for ArbiterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ArbiterKind::None => "none",
            ArbiterKind::Etcd => "etcd",
            ArbiterKind::Embedded => "embedded",
        })
    }
}

/// How the leader's changes reach alternatives (`replication.transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// Alternatives pull the leader's log over gRPC; no broker.
    Direct,
    Kafka,
    Pulsar,
}

impl TransportKind {
    /// Whether a broker holds the log (a leader then runs a publisher; failover is possible).
    pub fn is_broker(self) -> bool {
        match self {
            TransportKind::Direct => false,
            TransportKind::Kafka | TransportKind::Pulsar => true,
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Direct => "direct",
            TransportKind::Kafka => "kafka",
            TransportKind::Pulsar => "pulsar",
        })
    }
}

/// When a leader acknowledges a write (`replication.ack`; a request may name its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckPolicy {
    /// Once the transport holds it: no acknowledged write is lost when the leader dies.
    Exported,
    /// Once it is in the local WAL: lower latency, asynchronous replication.
    Local,
}

/// What an alternative does with an event it cannot decode or apply (`replication.on_poison`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoisonPolicy {
    /// Stop that shard's replication: reads needing newer data fail instead of diverging.
    Halt,
    /// Step over the event durably.
    Skip,
}

/// Registration in etcd, so gateways find this cluster by themselves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// etcd endpoints, e.g. ["http://127.0.0.1:2379"]; empty: do not register.
    pub etcd: Vec<String>,
    /// Key prefix clusters register under (one key per cluster id).
    pub prefix: String,
    /// Lease TTL: a cluster that stops renewing disappears after this long.
    pub ttl_s: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig { etcd: Vec::new(), prefix: "/tandem/clusters/".into(), ttl_s: 5 }
    }
}

/// Metrics and traces.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address of the Prometheus `/metrics` HTTP endpoint, e.g. "127.0.0.1:9184"; empty: off.
    pub metrics_listen: String,
    /// OTLP (gRPC) collector for traces, e.g. "http://127.0.0.1:4317"; empty: no traces exported.
    pub otlp_endpoint: String,
}

/// How this cluster takes part in its replication group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// The replication group's id (in every event; part of broker topic names).
    pub group: String,
    /// `direct` (alternatives pull the leader's log over gRPC; no broker), `kafka` or `pulsar`.
    pub transport: TransportKind,
    /// Alternatives: the leader's endpoint (snapshots, STRONG reads, the direct transport,
    /// and the hint in NotLeader replies).
    pub leader: String,
    /// Time ticks per shard when idle, so idle shards still advance alternatives.
    pub tick_ms: u64,
    /// What an alternative does with an event it cannot decode or apply: `halt` that shard's
    /// replication (default) or `skip` it. Either way it is quarantined and reported.
    pub on_poison: PoisonPolicy,
    /// When a leader acknowledges a write that does not name a policy.
    pub ack: AckPolicy,
    pub kafka: KafkaSettings,
    pub pulsar: PulsarSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic_prefix: String,
    /// Replication factor of the topics the leader creates (1 only fits a single broker).
    pub replication_factor: u16,
    /// Topic-level settings of the topics the leader creates (retention.ms, ...).
    pub topic_config: std::collections::BTreeMap<String, String>,
    /// Passed to librdkafka as is (security.protocol, sasl.*, ssl.*, ...).
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: String::new(),
            topic_prefix: "tandem".into(),
            replication_factor: 1,
            topic_config: Default::default(),
            properties: Default::default(),
        }
    }
}

/// `[replication.pulsar]`: the Pulsar transport (docs/pulsar.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PulsarSettings {
    /// `pulsar://host:6650`, or `pulsar+ssl://host:6651` for TLS.
    pub service_url: String,
    pub tenant: String,
    pub namespace: String,
    pub topic_prefix: String,
    /// Token authentication; prefer `auth_token_file` (a file holding the token).
    pub auth_token: String,
    pub auth_token_file: String,
    /// PEM file of the CAs that sign the brokers' certificates (pulsar+ssl://); empty: the
    /// system's roots.
    pub tls_trust_certs_file: String,
}

impl PulsarSettings {
    /// What is wrong with these settings, each naming the setting; `in_use`: the transport is
    /// "pulsar" (an unused section may stay empty).
    pub fn problems(&self, in_use: bool) -> Vec<String> {
        let mut errs = Vec::new();
        let url = self.service_url.trim();
        if url.is_empty() {
            if in_use {
                errs.push("replication.pulsar.service_url is empty but replication.transport = \"pulsar\"".into());
            }
            return errs;
        }
        let tls = url.starts_with("pulsar+ssl://");
        if !tls && !url.starts_with("pulsar://") {
            errs.push(format!("replication.pulsar.service_url = {url:?} does not start with pulsar:// or pulsar+ssl://"));
        }
        if !tls && !self.tls_trust_certs_file.is_empty() {
            errs.push("replication.pulsar.tls_trust_certs_file is set but service_url is not pulsar+ssl://".into());
        }
        if !self.auth_token.is_empty() && !self.auth_token_file.is_empty() {
            errs.push("replication.pulsar.auth_token and auth_token_file are both set: keep one".into());
        }
        for (name, v) in [("tenant", &self.tenant), ("namespace", &self.namespace), ("topic_prefix", &self.topic_prefix)] {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
                errs.push(format!("replication.pulsar.{name} = {v:?}: use ASCII letters, digits, '.', '_' and '-'"));
            }
        }
        errs
    }
}

impl Default for PulsarSettings {
    fn default() -> Self {
        PulsarSettings {
            service_url: String::new(),
            tenant: "public".into(),
            namespace: "default".into(),
            topic_prefix: "tandem".into(),
            auth_token: String::new(),
            auth_token_file: String::new(),
            tls_trust_certs_file: String::new(),
        }
    }
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            group: "default".into(),
            transport: TransportKind::Direct,
            leader: String::new(),
            tick_ms: 50,
            on_poison: PoisonPolicy::Halt,
            ack: AckPolicy::Exported,
            kafka: KafkaSettings::default(),
            pulsar: PulsarSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalSync {
    Always,
    Interval,
    Never,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    pub sync: WalSync,
    pub interval_ms: u64,
    pub file_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegmentConfig {
    pub seal_rows: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// 0 = one per core.
    pub threads: usize,
    pub default_nprobe: u32,
    pub default_ef_search: u32,
    /// Most queries searches merged while the pool is busy may hold together (batch.rs); 1 =
    /// never merge.
    pub max_batch_queries: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexConfig {
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_write_rows: usize,
    pub max_top_k: u32,
    pub max_nq: usize,
    pub max_query_limit: u32,
    pub max_get_ids: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadConfig {
    /// BOUNDED staleness when a request gives none.
    pub default_staleness_ms: u64,
    /// The longest a read waits for the serviceable ts when the request sets no deadline.
    pub max_wait_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            cluster_id: "local".into(),
            datacenter: "local".into(),
            listen: "127.0.0.1:19530".into(),
            advertise: String::new(),
            data_dir: PathBuf::from("./tandem-data"),
            role: Role::Leading,
            wal: WalConfig::default(),
            segment: SegmentConfig::default(),
            search: SearchConfig::default(),
            index: IndexConfig::default(),
            limits: Limits::default(),
            read: ReadConfig::default(),
            replication: ReplicationConfig::default(),
            discovery: DiscoveryConfig::default(),
            telemetry: TelemetryConfig::default(),
            ha: HaConfig::default(),
            query_nodes: QueryNodesConfig::default(),
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig { sync: WalSync::Always, interval_ms: 10, file_mib: 64 }
    }
}

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig { seal_rows: 65_536 }
    }
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig { threads: 0, default_nprobe: 16, default_ef_search: 64, max_batch_queries: crate::batch::MAX_BATCH_QUERIES }
    }
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig { threads: 1 }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 << 20,
            max_write_rows: 100_000,
            max_top_k: 16_384,
            max_nq: 1_024,
            max_query_limit: 16_384,
            max_get_ids: 16_384,
        }
    }
}

impl Default for ReadConfig {
    fn default() -> Self {
        ReadConfig { default_staleness_ms: 1_000, max_wait_ms: 10_000 }
    }
}

impl ClusterConfig {
    /// Every problem found, each naming the setting and its value.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if let Err(e) = crate::schema::validate_name("cluster_id", &self.cluster_id) {
            errs.push(e.to_string());
        }
        if self.role == Role::Recovering {
            // Recovering is entered by a node that finds itself behind, never configured.
            errs.push("role = \"recovering\" cannot be configured: use leading, alternative or standby".into());
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            errs.push(format!("listen = {:?} is not an address like 127.0.0.1:19530", self.listen));
        }
        if self.data_dir.as_os_str().is_empty() {
            errs.push("data_dir is empty".into());
        }
        if self.wal.sync == WalSync::Interval && !(1..=10_000).contains(&self.wal.interval_ms) {
            errs.push(format!("wal.interval_ms = {} is out of range 1..=10000", self.wal.interval_ms));
        }
        if !(1..=4096).contains(&self.wal.file_mib) {
            errs.push(format!("wal.file_mib = {} is out of range 1..=4096", self.wal.file_mib));
        }
        if !(1..=10_000_000).contains(&self.segment.seal_rows) {
            errs.push(format!("segment.seal_rows = {} is out of range 1..=10000000", self.segment.seal_rows));
        }
        if self.search.threads > 1024 {
            errs.push(format!("search.threads = {} is more than 1024", self.search.threads));
        }
        if !(1..=65_536).contains(&self.search.default_nprobe) {
            errs.push(format!("search.default_nprobe = {} is out of range 1..=65536", self.search.default_nprobe));
        }
        if !(1..=4096).contains(&self.search.max_batch_queries) {
            errs.push(format!("search.max_batch_queries = {} is out of range 1..=4096 (1: never merge)", self.search.max_batch_queries));
        }
        if !(1..=32_768).contains(&self.search.default_ef_search) {
            errs.push(format!("search.default_ef_search = {} is out of range 1..=32768", self.search.default_ef_search));
        }
        if !(1..=64).contains(&self.index.threads) {
            errs.push(format!("index.threads = {} is out of range 1..=64", self.index.threads));
        }
        if !(1 << 16..=1 << 30).contains(&self.limits.max_message_bytes) {
            errs.push(format!("limits.max_message_bytes = {} is out of range 65536..=1073741824", self.limits.max_message_bytes));
        }
        for (name, v) in [
            ("limits.max_write_rows", self.limits.max_write_rows),
            ("limits.max_top_k", self.limits.max_top_k as usize),
            ("limits.max_nq", self.limits.max_nq),
            ("limits.max_query_limit", self.limits.max_query_limit as usize),
            ("limits.max_get_ids", self.limits.max_get_ids),
        ] {
            if v == 0 {
                errs.push(format!("{name} = 0 must be at least 1"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (g, group) in self.query_nodes.groups.iter().enumerate() {
            // An empty group is filled by nodes that join it (`tandem query-node --join`).
            for ep in group {
                if !(ep.starts_with("http://") || ep.starts_with("https://"))
                    || tonic::transport::Endpoint::from_shared(ep.clone()).is_err()
                {
                    errs.push(format!("query_nodes.groups[{g}]: {ep:?} is not an endpoint like http://10.0.0.5:19540"));
                } else if !seen.insert(ep.as_str()) {
                    errs.push(format!("query_nodes.groups[{g}]: {ep:?} is listed twice (a node holds one group's copies)"));
                }
            }
        }
        if !(1..=60_000).contains(&self.query_nodes.wait_ms) {
            errs.push(format!("query_nodes.wait_ms = {} is out of range 1..=60000", self.query_nodes.wait_ms));
        }
        let r = &self.replication;
        if crate::schema::validate_name("replication.group", &r.group).is_err() {
            errs.push(format!("replication.group = {:?}: use letters, digits and _", r.group));
        }
        if r.kafka.replication_factor == 0 {
            errs.push("replication.kafka.replication_factor = 0: it must be at least 1".into());
        }
        if r.transport == TransportKind::Kafka && r.kafka.brokers.trim().is_empty() {
            errs.push("replication.kafka.brokers is empty but replication.transport = \"kafka\"".into());
        }
        errs.extend(r.pulsar.problems(r.transport == TransportKind::Pulsar));
        if self.role != Role::Leading && r.leader.trim().is_empty() && !self.ha.enabled() {
            errs.push(format!(
                "replication.leader is empty: a cluster with role = {:?} needs its leader's endpoint",
                self.role.to_string()
            ));
        }
        if !(1..=60_000).contains(&r.tick_ms) {
            errs.push(format!("replication.tick_ms = {} is out of range 1..=60000", r.tick_ms));
        }
        if !self.discovery.etcd.is_empty() && !(1..=3600).contains(&self.discovery.ttl_s) {
            errs.push(format!("discovery.ttl_s = {} is out of range 1..=3600", self.discovery.ttl_s));
        }
        if !self.telemetry.metrics_listen.is_empty() && self.telemetry.metrics_listen.parse::<std::net::SocketAddr>().is_err() {
            errs.push(format!("telemetry.metrics_listen = {:?} is not an address like 127.0.0.1:9184", self.telemetry.metrics_listen));
        }
        let ha = &self.ha;
        if ha.arbiter == ArbiterKind::Etcd && ha.etcd.is_empty() && self.discovery.etcd.is_empty() {
            errs.push("ha.arbiter = \"etcd\" but neither ha.etcd nor discovery.etcd lists an endpoint".into());
        }
        if ha.enabled() && !r.transport.is_broker() {
            errs.push(format!(
                "ha.arbiter = {:?} needs a broker transport (replication.transport = \"kafka\" or \"pulsar\"): with \"direct\" the log dies with the leader",
                ha.arbiter.to_string()
            ));
        }
        if ha.enabled() && !(1..=300).contains(&ha.lease_ttl_s) {
            errs.push(format!("ha.lease_ttl_s = {} is out of range 1..=300", ha.lease_ttl_s));
        }
        if ha.enabled() && ha.fence_margin_ms >= ha.lease_ttl_s * 1000 {
            errs.push(format!(
                "ha.fence_margin_ms = {} must be below the lease (ha.lease_ttl_s = {} s)",
                ha.fence_margin_ms, ha.lease_ttl_s
            ));
        }
        if ha.enabled() && ha.catch_up_timeout_ms == 0 {
            errs.push("ha.catch_up_timeout_ms = 0 must be at least 1".into());
        }
        if self.read.max_wait_ms == 0 {
            errs.push("read.max_wait_ms = 0 must be at least 1".into());
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    pub fn node_options(&self) -> NodeOptions {
        let sync = match self.wal.sync {
            WalSync::Always => SyncPolicy::Always,
            WalSync::Interval => SyncPolicy::Interval(Duration::from_millis(self.wal.interval_ms)),
            WalSync::Never => SyncPolicy::Never,
        };
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        NodeOptions {
            cluster_id: self.cluster_id.clone(),
            data_dir: self.data_dir.clone(),
            role: self.role,
            shard: ShardOptions { wal: WalOptions { sync, segment_bytes: self.wal.file_mib << 20 }, seal_rows: self.segment.seal_rows },
            search_threads: if self.search.threads == 0 { cores } else { self.search.threads },
            max_batch_queries: self.search.max_batch_queries,
            index_threads: self.index.threads,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        ClusterConfig::default().validate().unwrap();
        let mut c = ClusterConfig { listen: "nowhere".into(), cluster_id: "a b".into(), ..ClusterConfig::default() };
        c.segment.seal_rows = 0;
        c.search.max_batch_queries = 0;
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("search.max_batch_queries = 0")));
        assert!(errs.iter().any(|e| e.contains("\"nowhere\"")));
        assert!(errs.iter().any(|e| e.contains("segment.seal_rows = 0")));
        assert!(errs.iter().any(|e| e.contains("\"a b\"")));
    }

    #[test]
    fn query_node_groups_are_checked_by_name() {
        let mut c = ClusterConfig::default();
        c.query_nodes.groups = vec![vec!["http://10.0.0.5:19540".into()], vec!["http://10.0.0.6:19540".into()]];
        c.validate().unwrap();
        // An alternative has query nodes as a leader does (they follow its own log).
        c.role = Role::Alternative;
        c.replication.leader = "http://10.0.0.1:19530".into();
        c.validate().unwrap();
        // Groups the nodes join themselves (`tandem query-node --join`) start empty.
        c.query_nodes.groups = vec![vec![], vec![]];
        c.validate().unwrap();
        c.query_nodes.groups =
            vec![vec!["10.0.0.5:19540".into(), "http://10.0.0.6:19540".into()], vec![], vec!["http://10.0.0.6:19540".into()]];
        c.query_nodes.wait_ms = 0;
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("groups[0]: \"10.0.0.5:19540\" is not an endpoint")));
        assert!(errs.iter().any(|e| e.contains("groups[2]: \"http://10.0.0.6:19540\" is listed twice")));
        assert!(errs.iter().any(|e| e.contains("query_nodes.wait_ms = 0")));
    }

    #[test]
    fn pulsar_settings_are_checked_by_name() {
        let mut c = ClusterConfig::default();
        c.replication.transport = TransportKind::Pulsar;
        let errs = c.validate().unwrap_err();
        assert!(errs.iter().any(|e| e.contains("replication.pulsar.service_url is empty")), "{errs:?}");
        c.replication.pulsar.service_url = "pulsar://127.0.0.1:6650".into();
        c.validate().unwrap();
        c.replication.pulsar.service_url = "http://x:1".into();
        c.replication.pulsar.tls_trust_certs_file = "ca.pem".into();
        c.replication.pulsar.auth_token = "t".into();
        c.replication.pulsar.auth_token_file = "f".into();
        c.replication.pulsar.namespace = "a/b".into();
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        for needle in ["service_url = \"http://x:1\"", "tls_trust_certs_file", "auth_token_file", "replication.pulsar.namespace"] {
            assert!(errs.iter().any(|e| e.contains(needle)), "{needle}: {errs:?}");
        }
        c.replication.pulsar.service_url = "pulsar+ssl://h:6651".into();
        c.replication.pulsar.auth_token_file = String::new();
        c.replication.pulsar.namespace = "default".into();
        c.validate().unwrap();
    }
}
