//! Starts a cluster's part in replication from its configuration: an alternative follows its
//! leader through the configured transport; a leader whose transport is a broker runs a
//! publisher. Shared by `tandem cluster`, the demo, the benchmarks and the tests.

use std::sync::Arc;

use anyhow::Context;
use tandem_cluster::server::Running;
use tandem_cluster::{ClusterConfig, Role};
use tandem_exporter::direct::DirectTransport;
use tandem_exporter::follower::{Follower, FollowerConfig, OnPoison};
use tandem_exporter::publisher::Publisher;
use tandem_exporter::transport::Transport;

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

    pub fn follower(&self) -> Option<&Arc<Follower>> {
        self.follower.as_ref()
    }
}

pub fn transport(cfg: &ClusterConfig) -> anyhow::Result<Arc<dyn Transport>> {
    let r = &cfg.replication;
    match r.transport.as_str() {
        "direct" => Ok(Arc::new(DirectTransport::new(&r.leader, &cfg.cluster_id)?)),
        #[cfg(feature = "kafka")]
        "kafka" => {
            let k = tandem_exporter::kafka::KafkaConfig::from_settings(&r.group, &cfg.cluster_id, &r.kafka, cfg.limits.max_message_bytes);
            Ok(Arc::new(tandem_exporter::kafka::KafkaTransport::new(k)?))
        }
        #[cfg(feature = "pulsar")]
        "pulsar" => {
            let p = tandem_exporter::pulsar::PulsarConfig::from_settings(&r.group, &r.pulsar, cfg.limits.max_message_bytes)?;
            Ok(Arc::new(tandem_exporter::pulsar::PulsarTransport::new(p)?))
        }
        other => anyhow::bail!("replication.transport = {other:?} is not available in this build"),
    }
}

pub async fn start(running: &Running, cfg: &ClusterConfig) -> anyhow::Result<ReplicationHandle> {
    match cfg.role {
        Role::Leading => {
            if cfg.replication.transport == "direct" {
                // Alternatives read this leader's WAL directly: nothing to publish.
                return Ok(ReplicationHandle::default());
            }
            let transport = transport(cfg)?;
            let tick = std::time::Duration::from_millis(cfg.replication.tick_ms);
            let publisher = Publisher::start(running.node.clone(), transport, &cfg.replication.group, tick);
            Ok(ReplicationHandle { publisher: Some(publisher), ..Default::default() })
        }
        Role::Alternative | Role::Standby | Role::Recovering => {
            let transport = transport(cfg)?;
            let leader = DirectTransport::new(&cfg.replication.leader, &cfg.cluster_id).context("leader endpoint")?.client();
            let fcfg = FollowerConfig {
                subscriber: cfg.cluster_id.clone(),
                on_poison: if cfg.replication.on_poison == "skip" { OnPoison::Skip } else { OnPoison::Halt },
                quarantine_dir: cfg.data_dir.join("quarantine"),
            };
            let follower = Follower::start(running.node.clone(), transport, leader, fcfg);
            Ok(ReplicationHandle { follower: Some(follower), ..Default::default() })
        }
    }
}
