//! The cluster crate's one error type, and the one place it is converted to and from
//! `tonic::Status`.
//!
//! The gateway and the SDK decide whether to retry elsewhere from `is_transient()` (or, on the
//! wire, from the status code that `From<ClusterError> for Status` chose), so every variant makes
//! that decision explicitly.

use tandem_proto::v1;
use tandem_proto::wire::{self, Reason};

use crate::Role;
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
    NotLeader { cluster: String, role: Role, leader: Option<String> },
    /// A leader whose lease may have run out refused a write before changing anything.
    #[error("cluster {cluster} is fenced: its leadership lease may have run out; nothing was changed")]
    Fenced { cluster: String },
    /// A leader shutting down refused a write before changing anything.
    #[error("cluster {cluster} is shutting down and takes no more writes; nothing was changed")]
    Stopping { cluster: String },
    /// A write tagged for another epoch's leader (gateways tag what they forward).
    #[error("stale epoch: the write was sent for epoch {sent} but cluster {cluster} is at epoch {own}")]
    StaleEpoch { cluster: String, sent: u64, own: u64 },
    /// A read whose guarantee this replica did not reach before the read's deadline.
    #[error("{message}")]
    Lagging { message: String, lag_ms: u64 },
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
            ClusterError::Unavailable(_)
            | ClusterError::DeadlineExceeded(_)
            | ClusterError::ResourceExhausted(_)
            | ClusterError::Lagging { .. } => true,
            // Retried after the caller refreshed its view of who leads, not as is.
            ClusterError::NotLeader { .. }
            | ClusterError::Fenced { .. }
            | ClusterError::StaleEpoch { .. }
            | ClusterError::Stopping { .. }
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
            ClusterError::NotLeader { .. }
            | ClusterError::Fenced { .. }
            | ClusterError::StaleEpoch { .. }
            | ClusterError::FailedPrecondition(_) => Code::FailedPrecondition,
            ClusterError::Truncated { .. } => Code::OutOfRange,
            ClusterError::CollectionExists(_) | ClusterError::AlreadyExists(_) => Code::AlreadyExists,
            ClusterError::Unavailable(_) | ClusterError::Stopping { .. } => Code::Unavailable,
            ClusterError::DeadlineExceeded(_) | ClusterError::Lagging { .. } => Code::DeadlineExceeded,
            ClusterError::ResourceExhausted(_) => Code::ResourceExhausted,
            ClusterError::Wal(_)
            | ClusterError::Io { .. }
            | ClusterError::Corrupt(_)
            | ClusterError::Faiss(_)
            | ClusterError::Internal(_) => Code::Internal,
            ClusterError::Remote { code, .. } => *code,
        }
    }

    /// The typed reason a peer acts on (`tandem_proto::wire`), for the errors that have one.
    pub fn refusal(&self) -> Option<Reason> {
        match self {
            ClusterError::NotLeader { cluster, role, leader } => Some(Reason::NotLeader(v1::NotLeader {
                cluster: cluster.clone(),
                role: role.to_proto() as i32,
                leader: leader.clone().unwrap_or_default(),
            })),
            ClusterError::Fenced { cluster } => Some(Reason::Fenced(v1::Fenced { cluster: cluster.clone() })),
            ClusterError::Stopping { cluster } => Some(Reason::Stopping(v1::Stopping { cluster: cluster.clone() })),
            ClusterError::StaleEpoch { cluster, sent, own } => {
                Some(Reason::StaleEpoch(v1::StaleEpoch { cluster: cluster.clone(), sent: *sent, own: *own }))
            }
            ClusterError::Lagging { lag_ms, .. } => Some(Reason::Lagging(v1::Lagging { lag_ms: *lag_ms })),
            ClusterError::InvalidArgument(_)
            | ClusterError::CollectionNotFound(_)
            | ClusterError::CollectionExists(_)
            | ClusterError::FailedPrecondition(_)
            | ClusterError::Truncated { .. }
            | ClusterError::AlreadyExists(_)
            | ClusterError::Filter(_)
            | ClusterError::Unavailable(_)
            | ClusterError::DeadlineExceeded(_)
            | ClusterError::ResourceExhausted(_)
            | ClusterError::Wal(_)
            | ClusterError::Io { .. }
            | ClusterError::Corrupt(_)
            | ClusterError::Faiss(_)
            | ClusterError::Internal(_)
            | ClusterError::Remote { .. } => None,
        }
    }
}

impl From<ClusterError> for tonic::Status {
    fn from(e: ClusterError) -> Self {
        let mut status = match e.refusal() {
            Some(reason) => wire::refused(e.code(), e.to_string(), reason),
            None => tonic::Status::new(e.code(), e.to_string()),
        };
        if let ClusterError::NotLeader { leader: Some(l), .. } = &e
            && let Ok(v) = l.parse()
        {
            status.metadata_mut().insert(wire::LEADER, v);
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
            ClusterError::NotLeader { cluster: "b".into(), role: Role::Alternative, leader: Some("http://10.0.0.1:19530".into()) }.into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.metadata().get(wire::LEADER).unwrap(), "http://10.0.0.1:19530");
        assert!(s.message().contains("the leader is http://10.0.0.1:19530"), "{}", s.message());
        match wire::refusal(&s) {
            Some(Reason::NotLeader(n)) => {
                assert_eq!((n.cluster.as_str(), n.leader.as_str()), ("b", "http://10.0.0.1:19530"));
                assert_eq!(Role::from_proto(n.role), Some(Role::Alternative));
            }
            other => panic!("expected a NotLeader refusal, got {other:?}"),
        }

        let s: tonic::Status = ClusterError::CollectionNotFound("x".into()).into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(wire::refusal(&s), None);
        assert!(!ClusterError::from(s).is_transient());
    }

    #[test]
    fn refusals_a_gateway_acts_on_are_typed() {
        let s: tonic::Status = ClusterError::Fenced { cluster: "a".into() }.into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(wire::refusal(&s), Some(Reason::Fenced(v1::Fenced { cluster: "a".into() })));
        let s: tonic::Status = ClusterError::StaleEpoch { cluster: "a".into(), sent: 3, own: 4 }.into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("epoch 3") && s.message().contains("epoch 4"), "{}", s.message());
        assert_eq!(wire::refusal(&s), Some(Reason::StaleEpoch(v1::StaleEpoch { cluster: "a".into(), sent: 3, own: 4 })));
        let s: tonic::Status = ClusterError::Lagging { message: "shard 0 is 120 ms behind".into(), lag_ms: 120 }.into();
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(wire::refusal(&s), Some(Reason::Lagging(v1::Lagging { lag_ms: 120 })));
        // A plain precondition failure is no refusal: nothing for a gateway to redirect.
        assert_eq!(wire::refusal(&ClusterError::FailedPrecondition("promote: not caught up".into()).into()), None);
    }
}
