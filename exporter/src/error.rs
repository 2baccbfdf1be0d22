//! The exporter's error type.

pub type Result<T, E = ExportError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The broker or the leader could not be reached or refused for now.
    #[error("transport {backend} unavailable: {message}")]
    Unavailable { backend: &'static str, message: String },
    /// The position asked for is no longer in the log (retention); bootstrap from a snapshot.
    #[error("position {lsn} of stream {stream} is no longer in the log (it starts at {first})")]
    Truncated { stream: String, lsn: u64, first: u64 },
    /// An event that cannot be decoded or applied.
    #[error("malformed event at {stream} position {position}: {message}")]
    Malformed { stream: String, position: u64, message: String },
    /// An event from an older leadership term.
    #[error("stale epoch {got} on {stream}: already saw epoch {seen}")]
    StaleEpoch { stream: String, got: u64, seen: u64 },
    #[error("invalid transport configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Cluster(#[from] tandem_cluster::ClusterError),
}

impl ExportError {
    pub fn is_transient(&self) -> bool {
        match self {
            ExportError::Unavailable { .. } => true,
            ExportError::Truncated { .. } | ExportError::Malformed { .. } | ExportError::StaleEpoch { .. } | ExportError::Config(_) => {
                false
            }
            ExportError::Cluster(e) => e.is_transient(),
        }
    }
}
