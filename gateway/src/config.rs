//! The gateway's settings. `docs/gateway.example.toml` is the commented reference; a test loads
//! it so it cannot drift from this file.

use serde::{Deserialize, Serialize};
use tandem_discovery::Registration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// gRPC listen address (port 0 picks a free port).
    pub listen: String,
    /// Where this gateway runs: `prefer_local` sends reads to clusters of this datacenter first.
    pub datacenter: String,
    /// Clusters known statically (used when `discovery.etcd` is empty).
    pub clusters: Vec<StaticCluster>,
    pub discovery: DiscoveryConfig,
    pub routing: RoutingConfig,
    pub health: HealthConfig,
    pub buffer: BufferConfig,
    pub session: SessionConfig,
    pub telemetry: TelemetryConfig,
    /// Largest gRPC message accepted or sent (same default as a cluster's).
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticCluster {
    pub id: String,
    /// gRPC endpoint, e.g. "http://10.0.0.7:19530".
    pub endpoint: String,
    /// Empty: learned from the cluster (GetClusterInfo).
    #[serde(default)]
    pub datacenter: String,
}

impl From<&StaticCluster> for Registration {
    fn from(c: &StaticCluster) -> Registration {
        Registration { id: c.id.clone(), datacenter: c.datacenter.clone(), endpoint: c.endpoint.clone() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// etcd endpoints; empty means the static `clusters` list.
    pub etcd: Vec<String>,
    /// Key prefix clusters register under.
    pub prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Power of two choices over peak-EWMA latency.
    P2c,
    RoundRobin,
    /// Clusters of the gateway's datacenter first, the others when none of them can serve.
    PreferLocal,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::P2c => "p2c",
            Policy::RoundRobin => "round_robin",
            Policy::PreferLocal => "prefer_local",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub policy: Policy,
    /// Send a second copy of a read to another cluster when the first has not answered after
    /// this long; 0 = off.
    pub hedge_after_ms: u64,
    /// Decay of the peak-EWMA latency estimate (p2c): a spike of up to 1000x the normal latency
    /// is forgotten within this long.
    pub ewma_decay_ms: u64,
    /// HTTP/2 connections to each cluster, used in turn: as many for reads (`h2channel`) as for
    /// writes, DDL and health checks.
    pub connections_per_cluster: usize,
    /// Deadline of a request that carries none (grpc-timeout), and the cap of one that does.
    pub default_timeout_ms: u64,
    /// BOUNDED staleness assumed when a request gives none (a cluster's `read.default_staleness_ms`).
    pub default_staleness_ms: u64,
    pub retry: RetryConfig,
    pub coalesce: CoalesceConfig,
}

/// Searches merged while a cluster is busy (`gateway/src/coalesce.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoalesceConfig {
    /// Searches sent to one cluster at once; more wait, and those with the same parameters go
    /// together as one request when a place frees. 0 = never merge.
    pub max_in_flight: usize,
    /// Searches in one merged request at most.
    pub max_batch: usize,
}

/// tower's `TpsBudget`: retries may add `percent` of the recent request rate, plus a floor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// How long a request counts towards the budget.
    pub ttl_s: u64,
    /// Retries per second always allowed, however few requests there are.
    pub min_per_s: u32,
    /// Retries allowed as a fraction of requests (0.2 = 20 %).
    pub percent: f32,
    /// Attempts of one read at most (first try included).
    pub max_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often each cluster is asked for GetClusterInfo (role, epoch, freshness).
    pub interval_ms: u64,
    /// Deadline of one check.
    pub timeout_ms: u64,
    /// Consecutive successes that turn an unhealthy cluster healthy.
    pub healthy_after: u32,
    /// Consecutive failures (checks or forwarded calls) that turn a healthy cluster unhealthy.
    pub unhealthy_after: u32,
    /// How often every cluster is checked while no leader is known (an election): a promotion
    /// is seen within about this long, and held writes go to the new leader. `interval_ms`
    /// when that is shorter.
    pub no_leader_interval_ms: u64,
}

/// Writes and DDL held while no leader is known (an election), like vtgate's buffering:
/// sent to the new leader when it appears, refused with UNAVAILABLE and `retry-after` when a
/// bound is hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Writes held at once; more are refused at once. 0 = no buffering.
    pub max_writes: usize,
    /// Longest a write is held (never beyond its own deadline). 0 = no buffering.
    pub max_wait_ms: u64,
    /// What the `retry-after` metadata of a refused write suggests, in ms.
    pub retry_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Sessions (`session-id` headers) whose newest token the gateway keeps.
    pub capacity: u64,
    /// A session idle this long is forgotten.
    pub ttl_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the Prometheus `/metrics` endpoint; empty = none.
    pub metrics_listen: String,
    /// OTLP gRPC endpoint traces go to; empty = no tracing export.
    pub otlp_endpoint: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "0.0.0.0:19540".into(),
            datacenter: "local".into(),
            clusters: Vec::new(),
            discovery: DiscoveryConfig::default(),
            routing: RoutingConfig::default(),
            health: HealthConfig::default(),
            buffer: BufferConfig::default(),
            session: SessionConfig::default(),
            telemetry: TelemetryConfig::default(),
            max_message_bytes: 64 << 20,
        }
    }
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig { etcd: Vec::new(), prefix: "/tandem/clusters/".into() }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: Policy::P2c,
            hedge_after_ms: 0,
            ewma_decay_ms: 5_000,
            connections_per_cluster: 4,
            default_timeout_ms: 10_000,
            default_staleness_ms: 1_000,
            retry: RetryConfig::default(),
            coalesce: CoalesceConfig::default(),
        }
    }
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        CoalesceConfig { max_in_flight: 4, max_batch: 16 }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { ttl_s: 10, min_per_s: 10, percent: 0.2, max_attempts: 3 }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { interval_ms: 500, timeout_ms: 1_000, healthy_after: 2, unhealthy_after: 3, no_leader_interval_ms: 100 }
    }
}

impl HealthConfig {
    /// The check interval: shorter while no leader is known.
    pub fn interval(&self, leader_known: bool) -> std::time::Duration {
        let ms = if leader_known { self.interval_ms } else { self.no_leader_interval_ms.min(self.interval_ms) };
        std::time::Duration::from_millis(ms.max(1))
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig { max_writes: 1_000, max_wait_ms: 5_000, retry_after_ms: 1_000 }
    }
}

impl BufferConfig {
    /// Whether writes are held at all while no leader is known.
    pub fn enabled(&self) -> bool {
        self.max_writes > 0 && self.max_wait_ms > 0
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { capacity: 100_000, ttl_s: 600 }
    }
}

impl GatewayConfig {
    /// Every problem at once, each naming the setting and its value.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!("listen = {:?}: expected HOST:PORT with an IP address, e.g. 0.0.0.0:19540", self.listen));
        }
        if self.clusters.is_empty() && self.discovery.etcd.is_empty() {
            p.push("clusters = []: name at least one cluster (or discovery.etcd endpoints)".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            if c.id.is_empty() {
                p.push(format!("clusters[{i}].id is empty: every cluster needs an id"));
            } else if !seen.insert(c.id.as_str()) {
                p.push(format!("clusters[{i}].id = {:?} is given twice", c.id));
            }
            if let Err(e) = parse_endpoint(&c.endpoint) {
                p.push(format!(
                    "clusters[{i}].endpoint = {:?}: {e}; expected a URL like http://10.0.0.7:19530 (TLS to clusters is not supported)",
                    c.endpoint
                ));
            }
        }
        if !self.discovery.etcd.is_empty() && self.discovery.prefix.is_empty() {
            p.push("discovery.prefix is empty: clusters register under a key prefix, e.g. \"/tandem/clusters/\"".into());
        }
        let r = &self.routing;
        if r.default_timeout_ms == 0 {
            p.push("routing.default_timeout_ms = 0: must be at least 1".into());
        }
        if r.hedge_after_ms > 0 && r.hedge_after_ms >= r.default_timeout_ms {
            p.push(format!(
                "routing.hedge_after_ms = {} is not below routing.default_timeout_ms = {}: the hedge could never be sent",
                r.hedge_after_ms, r.default_timeout_ms
            ));
        }
        if !(1..=64).contains(&r.connections_per_cluster) {
            p.push(format!("routing.connections_per_cluster = {}: must be between 1 and 64", r.connections_per_cluster));
        }
        if r.ewma_decay_ms == 0 {
            p.push("routing.ewma_decay_ms = 0: must be at least 1".into());
        }
        if r.retry.ttl_s == 0 || r.retry.ttl_s > 60 {
            p.push(format!("routing.retry.ttl_s = {}: must be between 1 and 60", r.retry.ttl_s));
        }
        if !(0.0..=1000.0).contains(&r.retry.percent) || r.retry.percent.is_nan() {
            p.push(format!("routing.retry.percent = {}: must be between 0 and 1000", r.retry.percent));
        }
        if r.retry.max_attempts == 0 {
            p.push("routing.retry.max_attempts = 0: must be at least 1 (the first try)".into());
        }
        if r.coalesce.max_in_flight > 100_000 {
            p.push(format!("routing.coalesce.max_in_flight = {}: must be at most 100000 (0 = never merge)", r.coalesce.max_in_flight));
        }
        if !(1..=1024).contains(&r.coalesce.max_batch) {
            p.push(format!("routing.coalesce.max_batch = {}: must be between 1 and 1024", r.coalesce.max_batch));
        }
        let h = &self.health;
        if h.interval_ms == 0 {
            p.push("health.interval_ms = 0: must be at least 1".into());
        }
        if h.timeout_ms == 0 {
            p.push("health.timeout_ms = 0: must be at least 1".into());
        }
        if h.healthy_after == 0 {
            p.push("health.healthy_after = 0: must be at least 1".into());
        }
        if h.unhealthy_after == 0 {
            p.push("health.unhealthy_after = 0: must be at least 1".into());
        }
        if h.no_leader_interval_ms == 0 {
            p.push("health.no_leader_interval_ms = 0: must be at least 1".into());
        }
        let b = &self.buffer;
        if b.max_writes > 1_000_000 {
            p.push(format!("buffer.max_writes = {}: must be at most 1000000 (0 = no buffering)", b.max_writes));
        }
        if b.max_wait_ms > 600_000 {
            p.push(format!("buffer.max_wait_ms = {}: must be at most 600000 (0 = no buffering)", b.max_wait_ms));
        }
        if b.retry_after_ms == 0 {
            p.push("buffer.retry_after_ms = 0: must be at least 1".into());
        }
        if self.session.capacity == 0 {
            p.push("session.capacity = 0: must be at least 1".into());
        }
        if self.session.ttl_s == 0 {
            p.push("session.ttl_s = 0: must be at least 1".into());
        }
        if !self.telemetry.metrics_listen.is_empty() && self.telemetry.metrics_listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!("telemetry.metrics_listen = {:?}: expected HOST:PORT, e.g. 0.0.0.0:9464", self.telemetry.metrics_listen));
        }
        if self.max_message_bytes < 1024 {
            p.push(format!("max_message_bytes = {}: must be at least 1024", self.max_message_bytes));
        }
        p
    }

    /// The static membership as registrations.
    pub fn registrations(&self) -> Vec<Registration> {
        self.clusters.iter().map(Registration::from).collect()
    }
}

/// A cluster endpoint, `http://host[:port]`, as (host:port to connect to, scheme://authority of requests).
pub fn parse_endpoint(endpoint: &str) -> Result<(String, String), String> {
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("not a URL ({e})"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("scheme {:?}, expected http", uri.scheme_str().unwrap_or("")));
    }
    let auth = uri.authority().ok_or("no host")?;
    Ok((format!("{}:{}", auth.host(), auth.port_u16().unwrap_or(80)), format!("http://{auth}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_is_valid_and_covers_every_section() {
        let text = include_str!("../../docs/gateway.example.toml");
        let cfg: GatewayConfig = toml::from_str(text).expect("docs/gateway.example.toml parses");
        assert_eq!(cfg.validate(), Vec::<String>::new());
        assert_eq!(cfg.clusters.len(), 2);
        assert_eq!(cfg.routing.policy, Policy::P2c);
        assert_eq!(cfg.buffer, BufferConfig::default(), "the example lists the buffer defaults");
        assert_eq!(cfg.health, HealthConfig::default(), "the example lists the health defaults");
    }

    #[test]
    fn bad_settings_are_all_named() {
        let mut cfg = GatewayConfig {
            listen: "nowhere".into(),
            clusters: vec![
                StaticCluster { id: "a".into(), endpoint: "10.0.0.1:1".into(), datacenter: String::new() },
                StaticCluster { id: "a".into(), endpoint: "http://10.0.0.2:1".into(), datacenter: String::new() },
            ],
            ..GatewayConfig::default()
        };
        cfg.health.unhealthy_after = 0;
        cfg.buffer.retry_after_ms = 0;
        cfg.health.no_leader_interval_ms = 0;
        let p = cfg.validate();
        assert_eq!(p.len(), 6, "{p:?}");
        assert!(p.iter().any(|m| m.contains("buffer.retry_after_ms = 0")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("health.no_leader_interval_ms = 0")), "{p:?}");
        assert!(p[0].contains("listen = \"nowhere\""), "{p:?}");
        assert!(p.iter().any(|m| m.contains("clusters[0].endpoint = \"10.0.0.1:1\"")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("clusters[1].id = \"a\" is given twice")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("health.unhealthy_after = 0")), "{p:?}");
        let e = toml::from_str::<GatewayConfig>("[routing]\npolicy = \"random\"\n").unwrap_err();
        assert!(e.to_string().contains("random"), "{e}");
        let e = toml::from_str::<GatewayConfig>("[health]\nintervall_ms = 5\n").unwrap_err();
        assert!(e.to_string().contains("intervall_ms"), "{e}");
    }
}
