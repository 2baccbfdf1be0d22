//! Errors as Milvus reports them: a `common.Status` inside the reply, with Milvus's current code
//! (`code`, the merr numbering pymilvus raises by) and its legacy one (`error_code`), and the
//! message naming the bad value.
//!
//! Which code a tandem error gets is decided from its gRPC code and typed refusal, never from
//! its message text. Errors a client should retry later (the server is unavailable, overloaded,
//! out of time) stay gRPC statuses, so pymilvus's retry and its global-cluster failover act on
//! them as they do on Milvus's. A write sent to a cluster that does not lead is answered at
//! once, naming the leader: pymilvus would retry a gRPC UNAVAILABLE for minutes against a
//! cluster that will never take the write.

use tandem_proto::wire::{self, Reason};

use crate::pb::common::{ErrorCode, Status};

/// Milvus's current error codes (its `merr` package) that tandem answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum MilvusCode {
    Success = 0,
    /// merr ServiceUnavailable: here, a write sent to a cluster that does not lead.
    Unavailable = 2,
    /// merr ServiceInternal.
    Internal = 5,
    /// merr ServiceUnimplemented.
    Unimplemented = 10,
    /// merr CollectionNotFound: pymilvus's `has_collection` reads "no" from exactly this.
    CollectionNotFound = 100,
    /// merr IndexNotFound.
    IndexNotFound = 700,
    /// merr DatabaseNotFound.
    DatabaseNotFound = 800,
    /// merr ParameterInvalid: bad input, nothing changed.
    ParameterInvalid = 1100,
}

impl MilvusCode {
    /// The legacy `error_code` Milvus 2.3 sends with it.
    fn legacy(self) -> ErrorCode {
        match self {
            MilvusCode::Success => ErrorCode::Success,
            MilvusCode::CollectionNotFound => ErrorCode::CollectionNotExists,
            MilvusCode::IndexNotFound => ErrorCode::IndexNotExist,
            MilvusCode::ParameterInvalid => ErrorCode::IllegalArgument,
            MilvusCode::Unavailable => ErrorCode::NotReadyServe,
            MilvusCode::Internal | MilvusCode::Unimplemented | MilvusCode::DatabaseNotFound => ErrorCode::UnexpectedError,
        }
    }
}

/// A refusal to answer: either a Milvus status in the reply body, or a gRPC status.
#[derive(Debug, Clone)]
pub enum MilvusError {
    /// Reported in the reply's `common.Status`.
    Status { code: MilvusCode, reason: String },
    /// Left to the transport: retried or failed over by the client.
    Grpc(tonic::Status),
}

impl MilvusError {
    pub fn invalid(reason: impl Into<String>) -> MilvusError {
        MilvusError::Status { code: MilvusCode::ParameterInvalid, reason: reason.into() }
    }

    pub fn collection_not_found(name: &str) -> MilvusError {
        MilvusError::Status { code: MilvusCode::CollectionNotFound, reason: format!("collection not found[collection={name}]") }
    }

    pub fn unsupported(what: impl std::fmt::Display) -> MilvusError {
        MilvusError::Status { code: MilvusCode::Unimplemented, reason: format!("{what} is not supported by tandem") }
    }

    pub fn status(&self) -> Option<Status> {
        match self {
            MilvusError::Status { code, reason } => Some(status(*code, reason)),
            MilvusError::Grpc(_) => None,
        }
    }
}

pub fn ok() -> Status {
    Status::default()
}

pub fn status(code: MilvusCode, reason: &str) -> Status {
    Status { error_code: code.legacy() as i32, reason: reason.to_string(), code: code as i32, ..Default::default() }
}

impl From<tonic::Status> for MilvusError {
    /// Maps an error of tandem's API.
    fn from(s: tonic::Status) -> MilvusError {
        use tonic::Code as C;
        if let Some(Reason::NotLeader(n)) = wire::refusal(&s) {
            let leader = if n.leader.is_empty() { "unknown".to_string() } else { n.leader };
            let reason = format!("cluster {} does not lead and takes no writes; the leader is {leader}", n.cluster);
            return MilvusError::Status { code: MilvusCode::Unavailable, reason };
        }
        let code = match s.code() {
            C::InvalidArgument | C::AlreadyExists | C::OutOfRange => MilvusCode::ParameterInvalid,
            C::NotFound => MilvusCode::CollectionNotFound,
            C::Unimplemented => MilvusCode::Unimplemented,
            C::Internal | C::DataLoss | C::Unknown => MilvusCode::Internal,
            // Unavailable, DeadlineExceeded, ResourceExhausted, Aborted, Cancelled,
            // FailedPrecondition (fenced, stopping, lagging), PermissionDenied, Unauthenticated:
            // the client's retry or failover decides.
            _ => return MilvusError::Grpc(s),
        };
        MilvusError::Status { code, reason: s.message().to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_milvus_and_transient_errors_stay_grpc() {
        let e = MilvusError::from(tonic::Status::not_found("collection \"x\" not found"));
        let st = e.status().unwrap();
        assert_eq!((st.code, st.error_code), (100, ErrorCode::CollectionNotExists as i32));
        let e = MilvusError::from(tonic::Status::invalid_argument("dim 0 is out of range"));
        let st = e.status().unwrap();
        assert_eq!((st.code, st.error_code), (1100, ErrorCode::IllegalArgument as i32));
        assert_eq!(st.reason, "dim 0 is out of range");
        let e = MilvusError::from(tonic::Status::unavailable("down"));
        assert!(matches!(e, MilvusError::Grpc(s) if s.code() == tonic::Code::Unavailable));
        let refused = wire::refused(
            tonic::Code::FailedPrecondition,
            "not the leader",
            Reason::NotLeader(tandem_proto::v1::NotLeader { cluster: "b".into(), role: 2, leader: "10.0.0.1:7000".into() }),
        );
        let st = MilvusError::from(refused).status().unwrap();
        assert_eq!(st.code, 2);
        assert!(st.reason.contains("10.0.0.1:7000"), "{}", st.reason);
    }
}
