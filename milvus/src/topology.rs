//! The global-cluster topology pymilvus (3.x) reads when its URI contains `global-cluster`:
//! `GET {uri}/global-cluster/topology` answers which clusters exist, where, and which one takes
//! writes; the client connects to that one, refreshes the topology periodically and whenever a
//! call fails with UNAVAILABLE, and so follows a failover with no code of its own.
//!
//! tandem serves it over HTTP/1.1 on the same port as its gRPC APIs, from every cluster (built
//! from the arbiter's view when it runs under one) and from the gateway (built from its health
//! view). `version` is the leadership epoch, which grows with every change of leader.

use std::sync::Arc;

use parking_lot::RwLock;

/// Capability bits of the topology document.
pub const READABLE: u32 = 0b01;
pub const WRITABLE: u32 = 0b10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalCluster {
    pub id: String,
    /// The gRPC endpoint clients connect to, e.g. `http://10.0.0.7:19530`.
    pub endpoint: String,
    pub readable: bool,
    pub writable: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobalTopology {
    pub version: u64,
    pub clusters: Vec<GlobalCluster>,
}

impl GlobalTopology {
    /// The document pymilvus parses.
    pub fn to_json(&self) -> serde_json::Value {
        let clusters: Vec<serde_json::Value> = self
            .clusters
            .iter()
            .map(|c| {
                let capability = if c.readable { READABLE } else { 0 } | if c.writable { WRITABLE } else { 0 };
                serde_json::json!({"clusterId": c.id, "endpoint": c.endpoint, "capability": capability})
            })
            .collect();
        serde_json::json!({"code": 0, "data": {"version": self.version, "clusters": clusters}})
    }
}

/// Where a process gets the topology it serves.
#[tonic::async_trait]
pub trait TopologySource: Send + Sync + 'static {
    /// `Err` (a reason): answered 503, which pymilvus retries.
    async fn global_topology(&self) -> Result<GlobalTopology, String>;
}

/// A source that can be replaced while serving: a cluster starts with what it knows alone and
/// switches to the arbiter's view once it has joined one.
#[derive(Default)]
pub struct TopologySlot(RwLock<Option<Arc<dyn TopologySource>>>);

impl TopologySlot {
    pub fn set(&self, source: Arc<dyn TopologySource>) {
        *self.0.write() = Some(source);
    }
}

#[tonic::async_trait]
impl TopologySource for TopologySlot {
    async fn global_topology(&self) -> Result<GlobalTopology, String> {
        let source = self.0.read().clone();
        match source {
            Some(s) => s.global_topology().await,
            None => Err("this process has no topology yet".into()),
        }
    }
}

/// The HTTP routes: `/global-cluster/topology`, and the same under `/global-cluster/` (a URI
/// `http://host:port/global-cluster` makes pymilvus ask for `.../global-cluster/global-cluster/topology`).
pub fn router(source: Arc<dyn TopologySource>) -> axum::Router {
    let handler = move || {
        let source = source.clone();
        async move {
            let (status, body) = match source.global_topology().await {
                Ok(t) => (http::StatusCode::OK, t.to_json()),
                Err(reason) => (http::StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"code": 503, "message": reason})),
            };
            (status, [(http::header::CONTENT_TYPE, "application/json")], body.to_string())
        }
    };
    axum::Router::new()
        .route("/global-cluster/topology", axum::routing::get(handler.clone()))
        .route("/global-cluster/global-cluster/topology", axum::routing::get(handler))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_pymilvus_parses() {
        let t = GlobalTopology {
            version: 7,
            clusters: vec![
                GlobalCluster { id: "dc1".into(), endpoint: "http://a:1".into(), readable: true, writable: true },
                GlobalCluster { id: "dc2".into(), endpoint: "http://b:1".into(), readable: true, writable: false },
            ],
        };
        let j = t.to_json();
        assert_eq!(j["code"], 0);
        assert_eq!(j["data"]["version"], 7);
        assert_eq!(j["data"]["clusters"][0]["capability"], 3);
        assert_eq!(j["data"]["clusters"][1]["capability"], 1);
        assert_eq!(j["data"]["clusters"][1]["clusterId"], "dc2");
    }
}
