//! A member's part in replication, from its configuration: an alternative follows its leader
//! through the configured transport; a leader whose transport is a broker runs a publisher.

use std::sync::Arc;

use tandem_cluster::config::{PoisonPolicy, TransportKind};
use tandem_cluster::server::Running;
use tandem_cluster::{ClusterConfig, Node, Role};
use tandem_exporter::direct::DirectTransport;
use tandem_exporter::follower::{Follower, FollowerConfig, OnPoison};
use tandem_exporter::publisher::Publisher;
use tandem_exporter::transport::Transport;

use crate::error::{NodeError, Result};

/// What runs for replication; `stop` ends it.
#[derive(Default)]
pub struct ReplicationHandle {
    follower: Option<Arc<Follower>>,
    publisher: Option<Arc<Publisher>>,
}

impl ReplicationHandle {
    pub fn stop(&self) {
        if let Some(f) = &self.follower {
            f.stop();
        }
        if let Some(p) = &self.publisher {
            p.stop();
        }
    }

    /// A leader's publisher first exports every change already in the logs (bounded by
    /// `deadline`: writes were stopped before, so the end does not move), then stops; a follower
    /// stops at once. Returns whether everything was exported.
    pub async fn flush_and_stop(&self, node: &Node, deadline: std::time::Instant) -> bool {
        let flushed = self.publisher.is_none() || node.wait_fully_exported(deadline).await;
        self.stop();
        flushed
    }

    pub fn is_idle(&self) -> bool {
        self.follower.is_none() && self.publisher.is_none()
    }

    pub fn follower(&self) -> Option<&Arc<Follower>> {
        self.follower.as_ref()
    }
}

/// The transport `replication.transport` names (a broker client, or the leader's own log).
pub fn transport(cfg: &ClusterConfig) -> Result<Arc<dyn Transport>> {
    let r = &cfg.replication;
    match r.transport {
        TransportKind::Direct => Ok(Arc::new(DirectTransport::new(&r.leader, &cfg.cluster_id)?)),
        #[cfg(feature = "kafka")]
        TransportKind::Kafka => {
            let k = tandem_exporter::kafka::KafkaConfig::from_settings(&r.group, &cfg.cluster_id, &r.kafka, cfg.limits.max_message_bytes);
            Ok(Arc::new(tandem_exporter::kafka::KafkaTransport::new(k)?))
        }
        #[cfg(feature = "pulsar")]
        TransportKind::Pulsar => {
            let p = tandem_exporter::pulsar::PulsarConfig::from_settings(&r.group, &r.pulsar, cfg.limits.max_message_bytes)?;
            Ok(Arc::new(tandem_exporter::pulsar::PulsarTransport::new(p)?))
        }
        #[allow(unreachable_patterns)] // with every transport feature on
        other => Err(NodeError::NotBuilt(format!("replication.transport = \"{other}\""))),
    }
}

pub async fn start(running: &Running, cfg: &ClusterConfig) -> Result<ReplicationHandle> {
    match cfg.role {
        Role::Leading => start_publisher(&running.node, cfg),
        Role::Alternative | Role::Standby | Role::Recovering => start_follower(&running.node, cfg, &cfg.replication.leader),
    }
}

/// A leader's part: publish its changes when the transport is a broker (with the direct
/// transport alternatives read the leader's WAL: nothing runs).
pub fn start_publisher(node: &Arc<Node>, cfg: &ClusterConfig) -> Result<ReplicationHandle> {
    if !cfg.replication.transport.is_broker() {
        return Ok(ReplicationHandle::default());
    }
    Ok(start_publisher_with(node, cfg, transport(cfg)?))
}

/// [`start_publisher`] on a transport that already exists (a promoted cluster's, already
/// connected to the broker: a new client would first spend a round of connections and
/// metadata while the first writes wait for it).
pub fn start_publisher_with(node: &Arc<Node>, cfg: &ClusterConfig, transport: Arc<dyn Transport>) -> ReplicationHandle {
    let tick = std::time::Duration::from_millis(cfg.replication.tick_ms);
    let publisher = Publisher::start(node.clone(), transport, &cfg.replication.group, tick);
    ReplicationHandle { publisher: Some(publisher), ..Default::default() }
}

/// An alternative's part: follow the leader at `leader` (snapshots, the leader's clock, and the
/// log itself with the direct transport) through the configured transport.
pub fn start_follower(node: &Arc<Node>, cfg: &ClusterConfig, leader: &str) -> Result<ReplicationHandle> {
    start_follower_on(node, cfg, leader, None)
}

/// [`start_follower`] on a broker transport that already exists (the failover controller's:
/// besides the connections, it knows where the positions it just read sit in the broker's log,
/// which spares the follower's subscriptions their searches). `None`, or the direct transport
/// (one per leader), makes a new one.
pub fn start_follower_on(
    node: &Arc<Node>,
    cfg: &ClusterConfig,
    leader: &str,
    broker: Option<Arc<dyn Transport>>,
) -> Result<ReplicationHandle> {
    let mut cfg = cfg.clone();
    cfg.replication.leader = leader.to_string();
    let transport = match broker {
        Some(t) if t.needs_publisher() => t,
        _ => transport(&cfg)?,
    };
    let client = DirectTransport::new(leader, &cfg.cluster_id)?.client();
    let fcfg = FollowerConfig {
        subscriber: cfg.cluster_id.clone(),
        on_poison: match cfg.replication.on_poison {
            PoisonPolicy::Halt => OnPoison::Halt,
            PoisonPolicy::Skip => OnPoison::Skip,
        },
        quarantine_dir: cfg.data_dir.join("quarantine"),
    };
    node.set_leader(Some(leader.to_string()));
    let follower = Follower::start(node.clone(), transport, client, fcfg);
    Ok(ReplicationHandle { follower: Some(follower), ..Default::default() })
}
