//! Serving the gateway: the tandem API, Milvus's API (`tandem-milvus`, over the gateway's own
//! routing), Topology, gRPC health and reflection, and a graceful
//! stop that drains requests in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use tandem_discovery::Change;
use tandem_proto::v1::gateway_server::GatewayServer;
use tandem_proto::v1::tandem_server::TandemServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;

use crate::config::GatewayConfig;
use crate::error::{GatewayError, Result};
use crate::service::Gateway;
use crate::topology::{ClusterOptions, Topology};

/// A gateway being served.
pub struct Running {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
    membership: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, waits for requests in flight, then stops the health checks.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let r = self.task.await.map_err(|e| GatewayError::Internal(format!("server task: {e}")))?;
        let _ = self.membership.await;
        r
    }

    pub fn topology(&self) -> &Arc<Topology> {
        self.gateway.topology()
    }
}

/// Validates `cfg`, binds `cfg.listen` (port 0 picks one) and serves until stopped. Clusters come
/// and go as `membership` says (`tandem_discovery::static_list` or an etcd watch).
pub async fn start(cfg: GatewayConfig, membership: BoxStream<'static, Change>) -> Result<Running> {
    // Metrics recorded before a recorder exists are lost, so install it before serving anything.
    if let Err(e) = tandem_telemetry::metrics::install() {
        tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
    }
    let problems = cfg.validate();
    // An empty static list is fine here: membership may come from elsewhere (etcd, tests).
    let problems: Vec<_> = problems.into_iter().filter(|p| !p.starts_with("clusters = []")).collect();
    if !problems.is_empty() {
        return Err(GatewayError::Config(problems));
    }
    let listener =
        TcpListener::bind(&cfg.listen).await.map_err(|e| GatewayError::Listen { addr: cfg.listen.clone(), message: e.to_string() })?;
    let addr = listener.local_addr().map_err(|e| GatewayError::Internal(e.to_string()))?;
    let shutdown = CancellationToken::new();
    let cfg = Arc::new(cfg);
    let options = ClusterOptions {
        max_message_bytes: cfg.max_message_bytes,
        connect_timeout: Duration::from_millis(cfg.health.timeout_ms),
        ewma_decay: Duration::from_millis(cfg.routing.ewma_decay_ms),
        connections: cfg.routing.connections_per_cluster,
        coalesce: cfg.routing.coalesce.clone(),
    };
    let topo = Topology::new(cfg.health.clone(), options, shutdown.child_token());
    let membership = topo.follow(membership);
    let gateway = Gateway::new(cfg.clone(), topo);
    let task = tokio::spawn(serve(gateway.clone(), cfg, listener, shutdown.clone()));
    tracing::info!(%addr, "gateway serving");
    Ok(Running { addr, gateway, shutdown, task, membership })
}

async fn serve(gateway: Gateway, cfg: Arc<GatewayConfig>, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let max = cfg.max_message_bytes;
    let milvus = tandem_milvus::MilvusApi::server(Arc::new(gateway.clone()), max);
    let global = tandem_milvus::topology::router(Arc::new(GatewayTopology(gateway.topology().clone())));
    let api = TandemServer::new(gateway.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let topology = GatewayServer::new(gateway);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TandemServer<Gateway>>().await;
    health.set_serving::<GatewayServer<Gateway>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| GatewayError::Internal(format!("reflection: {e}")))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    // HTTP/1.1 as well as gRPC on the one port: the global topology is a plain GET.
    let result = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(tandem_telemetry::tracing::GrpcTraceLayer::default())
        .add_routes(tonic::service::Routes::from(global))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(api)
        .add_service(milvus)
        .add_service(topology)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await
        .map_err(|e| GatewayError::Internal(format!("grpc server: {e}")));
    shutdown.cancel();
    result
}

/// pymilvus's global topology (`tandem_milvus::topology`) as this gateway's health checks see
/// the clusters: the leader is the writable one; `version` is the highest epoch seen.
struct GatewayTopology(Arc<Topology>);

#[tonic::async_trait]
impl tandem_milvus::TopologySource for GatewayTopology {
    async fn global_topology(&self) -> std::result::Result<tandem_milvus::GlobalTopology, String> {
        let view = self.0.view();
        if view.leader.is_empty() {
            return Err("no leading cluster is known to this gateway".into());
        }
        let clusters = view
            .clusters
            .iter()
            .filter_map(|c| {
                let endpoint = c.endpoints.first()?.clone();
                let writable = c.id == view.leader;
                Some(tandem_milvus::GlobalCluster { id: c.id.clone(), endpoint, readable: c.readable || writable, writable })
            })
            .collect();
        Ok(tandem_milvus::GlobalTopology { version: view.epoch, clusters })
    }
}
