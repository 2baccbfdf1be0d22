//! A cluster's role in its replication group, and how far each collection follows its leader.
//!
//! The role is one type for clusters, the gateway and the SDK, defined with the wire contract
//! (`tandem_proto::wire::Role`, where the transition diagram is).

pub use tandem_proto::wire::Role;

/// How an alternative's collection follows the leader, as `GetClusterInfo` reports it
/// (`CollectionStatus.replication`, the `Display` text). A leader's collections have none.
///
/// ```text
///  (created) ──► Bootstrapping{percent, MB/s} ──► Following ──poison event──► Halted{reason}
///                      │ failed                     ▲
///                      ▼                            │ replayed from the broker's log instead
///                BootstrapRetrying ─────────────────┘
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicationState {
    /// Loading the leader's snapshot; `percent` of the estimated size, at `bytes_per_s`.
    Bootstrapping { percent: u64, bytes_per_s: f64 },
    /// A snapshot-first attempt failed; the next attempt is under way.
    BootstrapRetrying,
    /// Applying the leader's stream.
    Following,
    /// A poison event stopped a shard (`replication.on_poison = "halt"`): reads needing newer
    /// data fail instead of silently diverging.
    Halted { reason: String },
}

impl std::fmt::Display for ReplicationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicationState::Bootstrapping { percent, bytes_per_s } => {
                write!(f, "bootstrapping {percent}% {:.0} MB/s", bytes_per_s / 1e6)
            }
            ReplicationState::BootstrapRetrying => f.write_str("bootstrap failed; retrying"),
            ReplicationState::Following => f.write_str("following"),
            ReplicationState::Halted { reason } => write!(f, "halted: {reason}"),
        }
    }
}
