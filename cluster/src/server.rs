//! Serving a node over gRPC: the tandem API, Milvus's API (`tandem-milvus`, over the same service),
//! the standard health service and server reflection,
//! with graceful shutdown (stop accepting, drain requests in flight, stop index builders).
//!
//! Every request runs in a span joined to the caller's trace (`traceparent` metadata, see
//! `tandem_telemetry::tracing`), and a task refreshes the node's gauges every second while it
//! serves. The Prometheus endpoint itself is the process's (one per process, not per node):
//! `tandem cluster` starts it from `telemetry.metrics_listen`.

use std::net::SocketAddr;
use std::sync::Arc;

use tandem_proto::v1::tandem_server::TandemServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;

use crate::config::ClusterConfig;
use crate::error::{ClusterError, Result};
use crate::node::Node;
use crate::service::ClusterService;

/// A node being served; `shutdown` stops it gracefully.
pub struct Running {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    /// What `GET /global-cluster/topology` answers (pymilvus's global-cluster mode): this node's
    /// own view until a member running under an arbiter replaces it with the arbiter's.
    pub topology: Arc<tandem_milvus::TopologySlot>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    /// Stops serving after requests in flight, then stops the index builders.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let r = self.task.await.map_err(|e| ClusterError::Internal(format!("server task: {e}")))?;
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || node.shutdown()).await.map_err(|e| ClusterError::Internal(e.to_string()))?;
        r
    }
}

/// How often the node's gauges (rows, lag, memory, role, epoch) are refreshed.
const GAUGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens the node's data and starts serving on `cfg.listen` (port 0 picks one).
pub async fn start(cfg: ClusterConfig) -> Result<Running> {
    start_with(cfg, CancellationToken::new()).await
}

/// [`start`], stopping when `shutdown` fires: a child of the process's root token, so that
/// cancelling the root stops every part at once.
pub async fn start_with(cfg: ClusterConfig, shutdown: CancellationToken) -> Result<Running> {
    // Metrics recorded before a recorder exists are lost, so install it before serving anything.
    if let Err(e) = tandem_telemetry::metrics::install() {
        tracing::warn!(error = %e, "request metrics are not recorded");
    }
    let listener =
        TcpListener::bind(&cfg.listen).await.map_err(|e| ClusterError::Unavailable(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener.local_addr().map_err(|e| ClusterError::Internal(e.to_string()))?;
    let opts = cfg.node_options();
    let node = tokio::task::spawn_blocking(move || Node::open(opts)).await.map_err(|e| ClusterError::Internal(e.to_string()))??;
    // With a broker transport, writes under ack policy `exported` wait for the publisher from
    // the first one on, even before it has started (or while a new leader starts it).
    node.set_exporting(cfg.replication.transport.is_broker());
    if cfg.role != crate::role::Role::Leading && !cfg.replication.leader.is_empty() {
        node.set_leader(Some(cfg.replication.leader.clone()));
    }
    let topology = Arc::new(tandem_milvus::TopologySlot::default());
    let endpoint = if cfg.advertise.is_empty() { format!("http://{addr}") } else { cfg.advertise.clone() };
    topology.set(Arc::new(OwnTopology { node: node.clone(), endpoint }));
    let task = tokio::spawn(serve(node.clone(), Arc::new(cfg), listener, topology.clone(), shutdown.clone()));
    tracing::info!(%addr, cluster = %node.opts.cluster_id, role = %node.role(), "serving");
    Ok(Running { addr, node, topology, shutdown, task })
}

/// The global topology as a node without an arbiter knows it: itself, and the leader it follows.
struct OwnTopology {
    node: Arc<Node>,
    endpoint: String,
}

#[tonic::async_trait]
impl tandem_milvus::TopologySource for OwnTopology {
    async fn global_topology(&self) -> std::result::Result<tandem_milvus::GlobalTopology, String> {
        use tandem_milvus::GlobalCluster;
        let role = self.node.role();
        let mut clusters = vec![GlobalCluster {
            id: self.node.opts.cluster_id.clone(),
            endpoint: self.endpoint.clone(),
            readable: role.is_readable(),
            writable: role.accepts_writes(),
        }];
        if let Some(leader) = self.node.leader().filter(|_| !role.accepts_writes()) {
            // Its id is not known here (the endpoint is): the endpoint stands in for it.
            clusters.push(GlobalCluster { id: leader.clone(), endpoint: leader, readable: true, writable: true });
        }
        Ok(tandem_milvus::GlobalTopology { version: self.node.epoch(), clusters })
    }
}

pub async fn serve(
    node: Arc<Node>,
    cfg: Arc<ClusterConfig>,
    listener: TcpListener,
    topology: Arc<tandem_milvus::TopologySlot>,
    shutdown: CancellationToken,
) -> Result<()> {
    let max = cfg.limits.max_message_bytes;
    let service = Arc::new(ClusterService::new(node.clone(), cfg.clone()));
    // Milvus's API on the same port, translated into calls on the same service.
    let milvus = tandem_milvus::MilvusApi::server(service.clone(), max);
    let api = TandemServer::from_arc(service)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let replication =
        tandem_proto::replication::v1::replication_server::ReplicationServer::new(crate::replication::ReplicationService::new(
            node.clone(),
            cfg.replication.group.clone(),
            std::time::Duration::from_millis(cfg.replication.tick_ms),
            shutdown.clone(),
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    // Query nodes that join a replica group themselves (`tandem query-node --join`).
    let coordinator =
        tandem_proto::cluster::v1::coordinator_server::CoordinatorServer::new(crate::placement::CoordinatorService(node.clone()));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TandemServer<ClusterService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ClusterError::Internal(format!("reflection: {e}")))?;
    // Small request/response messages: Nagle's algorithm would only add latency.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let stop_gauges = shutdown.child_token();
    let gauges = tokio::spawn(refresh_gauges(node.clone(), stop_gauges.clone()));
    // Returns once the token fired and every request in flight has been answered (drain).
    // HTTP/1.1 as well as gRPC on the one port: the global topology is a plain GET.
    let served = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(tandem_telemetry::tracing::GrpcTraceLayer::for_cluster(&node.opts.cluster_id))
        .add_routes(tonic::service::Routes::from(tandem_milvus::topology::router(topology)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(api)
        .add_service(milvus)
        .add_service(replication)
        .add_service(coordinator)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(|e| ClusterError::Internal(format!("grpc server: {e}")));
    // The server can also end on an error, without the token: stop the gauges either way.
    stop_gauges.cancel();
    let _ = gauges.await;
    served
}

/// Sets the node's gauges every [`GAUGE_EVERY`] until `stop` fires. The sampling reads shard
/// state and directory sizes, so it runs on a blocking thread.
async fn refresh_gauges(node: Arc<Node>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                let n = node.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || crate::service::record_gauges(&n)).await {
                    tracing::warn!(error = %e, "refreshing gauges");
                }
            }
        }
    }
}
