//! The crate's one error type: what can stop a member from starting, or end it.

use tandem_arbiter::ArbiterError;
use tandem_cluster::ClusterError;
use tandem_discovery::DiscoveryError;
use tandem_exporter::ExportError;
use tandem_telemetry::TelemetryError;

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is unusable; one message per bad setting, each naming it.
    #[error("invalid configuration: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),
    /// A part this build does not contain (a transport left out by a cargo feature).
    #[error("{0} is not available in this build")]
    NotBuilt(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Transport(#[from] ExportError),
    #[error(transparent)]
    Arbiter(#[from] ArbiterError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// A blocking task (faiss, fsync) panicked or was cancelled.
    #[error("{what}: {message}")]
    Task { what: &'static str, message: String },
    /// The orderly stop did not finish within the drain time; what was left was cancelled.
    #[error("shutdown did not finish within {secs} s; the rest was cancelled")]
    DrainTimeout { secs: u64 },
}

impl NodeError {
    /// Worth trying again (a broker, an arbiter or a port that may come back), as opposed to a
    /// mistake that trying again repeats.
    pub fn is_transient(&self) -> bool {
        match self {
            NodeError::InvalidConfig(_) | NodeError::NotBuilt(_) | NodeError::Task { .. } | NodeError::DrainTimeout { .. } => false,
            NodeError::Cluster(e) => e.is_transient(),
            NodeError::Transport(e) => e.is_transient(),
            NodeError::Arbiter(e) => e.is_transient(),
            NodeError::Discovery(e) => e.is_transient(),
            NodeError::Telemetry(e) => e.is_transient(),
        }
    }

    /// A configuration mistake (the CLI exits 64 on one), as opposed to an outage or a bug.
    pub fn is_config(&self) -> bool {
        match self {
            NodeError::InvalidConfig(_) | NodeError::NotBuilt(_) => true,
            NodeError::Transport(ExportError::Config(_)) => true,
            NodeError::Arbiter(ArbiterError::InvalidConfig(_)) => true,
            NodeError::Discovery(DiscoveryError::InvalidConfig(_)) => true,
            NodeError::Cluster(_)
            | NodeError::Transport(_)
            | NodeError::Arbiter(_)
            | NodeError::Discovery(_)
            | NodeError::Telemetry(_)
            | NodeError::Task { .. }
            | NodeError::DrainTimeout { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whether_retrying_helps_and_whether_the_config_is_at_fault() {
        let bad = NodeError::InvalidConfig(vec!["ha.lease_ttl_s = 0 is out of range 1..=300".into()]);
        assert!(!bad.is_transient() && bad.is_config());
        assert!(bad.to_string().contains("ha.lease_ttl_s = 0"), "{bad}");
        let down = NodeError::Arbiter(ArbiterError::Etcd { endpoints: "http://e:2379".into(), message: "refused".into() });
        assert!(down.is_transient() && !down.is_config());
        let typo = NodeError::Discovery(DiscoveryError::InvalidConfig("endpoint \"htp://x\"".into()));
        assert!(!typo.is_transient() && typo.is_config());
        assert!(!NodeError::DrainTimeout { secs: 30 }.is_transient());
    }
}
