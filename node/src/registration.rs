//! The member's registration in etcd (`[discovery] etcd`), kept alive until [`Registration::stop`].

use std::net::SocketAddr;

use tandem_cluster::ClusterConfig;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

pub(crate) struct Registration(Option<(CancellationToken, tokio::task::JoinHandle<()>)>);

impl Registration {
    pub(crate) fn none() -> Registration {
        Registration(None)
    }

    /// Revokes the registration: gateways watching etcd see this cluster leave at once.
    pub(crate) async fn stop(self) {
        if let Some((cancel, task)) = self.0 {
            cancel.cancel();
            let _ = tokio::time::timeout(tandem_discovery::etcd::CALL_TIMEOUT * 2, task).await;
        }
    }
}

/// Registers under `<prefix><cluster_id>` with `endpoint` when etcd endpoints are configured.
/// etcd being down is not fatal: the registration retries in the background. A malformed
/// endpoint is a configuration error (`NodeError::is_config`).
pub(crate) async fn register(cfg: &ClusterConfig, bound: SocketAddr, endpoint: &str, cancel: CancellationToken) -> Result<Registration> {
    let d = &cfg.discovery;
    if d.etcd.is_empty() {
        return Ok(Registration::none());
    }
    if bound.ip().is_unspecified() && cfg.advertise.is_empty() {
        tracing::warn!(endpoint, "registering an unspecified address: set `advertise` so gateways can reach this cluster");
    }
    let reg = tandem_discovery::Registration { id: cfg.cluster_id.clone(), datacenter: cfg.datacenter.clone(), endpoint: endpoint.into() };
    let task = tandem_discovery::etcd::register(d.etcd.clone(), d.prefix.clone(), d.ttl_s, reg, cancel.clone()).await?;
    Ok(Registration(Some((cancel, task))))
}
