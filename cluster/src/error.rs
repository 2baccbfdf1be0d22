//! The cluster crate's one error type, and the one place it is converted to and from
//! `tonic::Status`.
//!
//! The gateway and the SDK decide whether to retry elsewhere from `is_transient()` (or, on the
//! wire, from the status code that `From<ClusterError> for Status` chose), so every variant makes
//! that decision explicitly.

use crate::filter::FilterError;
use crate::wal::WalError;

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The request is malformed; the message names the bad value.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("collection {0:?} not found")]
    CollectionNotFound(String),
    #[error("collection {0:?} already exists")]
    CollectionExists(String),
    /// A write sent to a cluster that does not lead; names the leader when known.
    #[error("cluster {cluster} is {role} and does not accept writes{}", leader.as_ref().map(|l| format!("; the leader is {l}")).unwrap_or_default())]
    NotLeader { cluster: String, role: String, leader: Option<String> },
    /// The cluster is not in a state that allows the operation (e.g. promoting a leader, or
    /// an epoch that is not newer); the message says which state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A change stream position the log no longer holds (a subscriber must bootstrap).
    #[error("position {from} is no longer in the log, which starts at {first}")]
    Truncated { from: u64, first: u64 },
    /// Insert of ids that already exist (upsert replaces them).
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// The replica cannot serve the request yet (lag, recovery, shutdown); another may.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed while waiting, e.g. for the serviceable ts.
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("storage error at {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("faiss: {0}")]
    Faiss(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A failure reported by a remote peer (client side of the API), kept with its code.
    #[error("{message}")]
    Remote { code: tonic::Code, message: String },
}

impl ClusterError {
    /// Whether the same request may succeed if retried (here later, or on another replica).
    pub fn is_transient(&self) -> bool {
        match self {
            ClusterError::Unavailable(_) | ClusterError::DeadlineExceeded(_) | ClusterError::ResourceExhausted(_) => true,
            // Retried after the caller refreshed its view of who leads, not as is.
            ClusterError::NotLeader { .. }
            | ClusterError::FailedPrecondition(_)
            | ClusterError::Truncated { .. }
            | ClusterError::InvalidArgument(_)
            | ClusterError::CollectionNotFound(_)
            | ClusterError::CollectionExists(_)
            | ClusterError::AlreadyExists(_)
            | ClusterError::Filter(_)
            | ClusterError::Wal(_)
            | ClusterError::Io { .. }
            | ClusterError::Corrupt(_)
            | ClusterError::Faiss(_)
            | ClusterError::Internal(_) => false,
            ClusterError::Remote { code, .. } => {
                matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::ResourceExhausted)
            }
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        ClusterError::InvalidArgument(msg.into())
    }

    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        ClusterError::Io { path: path.into(), source }
    }

    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ClusterError::InvalidArgument(_) | ClusterError::Filter(_) => Code::InvalidArgument,
            ClusterError::CollectionNotFound(_) => Code::NotFound,
            ClusterError::NotLeader { .. } | ClusterError::FailedPrecondition(_) => Code::FailedPrecondition,
            ClusterError::Truncated { .. } => Code::OutOfRange,
            ClusterError::CollectionExists(_) | ClusterError::AlreadyExists(_) => Code::AlreadyExists,
            ClusterError::Unavailable(_) => Code::Unavailable,
            ClusterError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ClusterError::ResourceExhausted(_) => Code::ResourceExhausted,
            ClusterError::Wal(_)
            | ClusterError::Io { .. }
            | ClusterError::Corrupt(_)
            | ClusterError::Faiss(_)
            | ClusterError::Internal(_) => Code::Internal,
            ClusterError::Remote { code, .. } => *code,
        }
    }
}

/// Metadata key naming the leader on a NotLeader status, so gateways can redirect.
pub const LEADER_METADATA: &str = "tandem-leader";

impl From<ClusterError> for tonic::Status {
    fn from(e: ClusterError) -> Self {
        let mut status = tonic::Status::new(e.code(), e.to_string());
        if let ClusterError::NotLeader { leader: Some(l), .. } = &e
            && let Ok(v) = l.parse()
        {
            status.metadata_mut().insert(LEADER_METADATA, v);
        }
        status
    }
}

impl From<tonic::Status> for ClusterError {
    fn from(s: tonic::Status) -> Self {
        ClusterError::Remote { code: s.code(), message: s.message().to_string() }
    }
}

impl From<tandem_proto::session::BadToken> for ClusterError {
    fn from(e: tandem_proto::session::BadToken) -> Self {
        ClusterError::invalid(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_code_and_transience() {
        let e = ClusterError::Unavailable("replica lags by 3s".into());
        assert!(e.is_transient());
        let s: tonic::Status = e.into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let back: ClusterError = s.into();
        assert!(back.is_transient());
        assert_eq!(back.to_string(), "replica lags by 3s");

        let s: tonic::Status =
            ClusterError::NotLeader { cluster: "b".into(), role: "alternative".into(), leader: Some("http://10.0.0.1:19530".into()) }
                .into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.metadata().get(LEADER_METADATA).unwrap(), "http://10.0.0.1:19530");
        assert!(s.message().contains("the leader is http://10.0.0.1:19530"), "{}", s.message());

        let s: tonic::Status = ClusterError::CollectionNotFound("x".into()).into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(!ClusterError::from(s).is_transient());
    }
}
