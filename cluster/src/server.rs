//! Serving a node over gRPC: the tandem API, the standard health service and server reflection,
//! with graceful shutdown (stop accepting, drain requests in flight, stop index builders).

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

/// Opens the node's data and starts serving on `cfg.listen` (port 0 picks one).
pub async fn start(cfg: ClusterConfig) -> Result<Running> {
    let listener =
        TcpListener::bind(&cfg.listen).await.map_err(|e| ClusterError::Unavailable(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener.local_addr().map_err(|e| ClusterError::Internal(e.to_string()))?;
    let opts = cfg.node_options();
    let node = tokio::task::spawn_blocking(move || Node::open(opts)).await.map_err(|e| ClusterError::Internal(e.to_string()))??;
    if cfg.role != crate::role::Role::Leading {
        node.set_leader(Some(cfg.replication.leader.clone()));
    }
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(node.clone(), Arc::new(cfg), listener, shutdown.clone()));
    tracing::info!(%addr, cluster = %node.opts.cluster_id, role = %node.role(), "serving");
    Ok(Running { addr, node, shutdown, task })
}

pub async fn serve(node: Arc<Node>, cfg: Arc<ClusterConfig>, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let max = cfg.limits.max_message_bytes;
    let api = TandemServer::new(ClusterService::new(node.clone(), cfg.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let replication =
        tandem_proto::replication::v1::replication_server::ReplicationServer::new(crate::replication::ReplicationService::new(
            node.clone(),
            cfg.replication.group.clone(),
            std::time::Duration::from_millis(cfg.replication.tick_ms),
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TandemServer<ClusterService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ClusterError::Internal(format!("reflection: {e}")))?;
    // Small request/response messages: Nagle's algorithm would only add latency.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(api)
        .add_service(replication)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(|e| ClusterError::Internal(format!("grpc server: {e}")))
}
