//! Errors the gateway makes itself. Errors a cluster returned are not wrapped: they reach the
//! client unchanged (see [`passthrough`]), so bad input gets the cluster's own clear message.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No cluster can serve a request now; the message names why for each cluster.
    #[error("{0}")]
    NoCluster(String),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("invalid configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    /// May succeed if tried again later or elsewhere.
    pub fn is_transient(&self) -> bool {
        match self {
            GatewayError::NoCluster(_) => true,
            GatewayError::Listen { .. } | GatewayError::Config(_) | GatewayError::Internal(_) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, GatewayError>;

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        match e {
            GatewayError::NoCluster(m) => Status::unavailable(m),
            GatewayError::Listen { .. } | GatewayError::Config(_) | GatewayError::Internal(_) => Status::internal(e.to_string()),
        }
    }
}

/// Worth trying on another cluster: the cluster (or the way to it) failed, not the request.
/// RESOURCE_EXHAUSTED is overload only when the message says so: a message-size limit is the
/// request's fault and fails everywhere.
pub fn is_transient(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::Aborted => true,
        Code::ResourceExhausted => !s.message().contains("message length") && !s.message().contains("too large"),
        // A stream reset by a cluster going away surfaces as INTERNAL "h2 protocol error" (seen
        // when an alternative stops mid-load): the way to the cluster failed, not the request.
        Code::Unknown | Code::Internal | Code::Cancelled => is_connection_error(s),
        _ => false,
    }
}

/// The cluster could not be reached (counts against its health).
pub fn is_connection_error(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        // The gateway's own client lost the connection to the cluster before the request was
        // written (seen when a cluster is killed under load); not a cluster's CANCELLED, nor
        // the request's deadline.
        Code::Cancelled => tandem_client::is_connection_cancel(s),
        Code::Unknown | Code::Internal => {
            let m = s.message();
            m.contains("transport error") || m.contains("connection") || m.contains("h2 protocol error")
        }
        _ => false,
    }
}

/// Metadata key a cluster puts the leader's endpoint in on a NotLeader reply.
pub const LEADER_METADATA: &str = "tandem-leader";

/// Metadata key of every forwarded write: the epoch of the leader the gateway chose. A cluster
/// at another epoch refuses the write (FAILED_PRECONDITION "stale epoch ..."), so a fenced old
/// leader never applies a write meant for its successor, nor the new one a write meant for the
/// old one.
pub const EPOCH_METADATA: &str = "tandem-epoch";

/// Metadata key of the gateway's UNAVAILABLE replies to writes it could not place (no leader
/// within the buffer's bounds): milliseconds after which trying again makes sense.
pub const RETRY_AFTER_METADATA: &str = "retry-after";

/// Whether a write may be sent again after its outcome was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Applying it twice leaves the same state as once (upsert, delete): re-sent even when the
    /// first attempt may have been applied.
    Idempotent,
    /// Insert, DDL, flush: re-sent only when it certainly was not applied.
    AtMostOnce,
}

/// What a failed write attempt at the leader means for sending it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// It never reached the cluster (connection refused, connect timeout, the connection was
    /// not ready or closed before the request went out, a stream refused before processing):
    /// any write may be held and sent again.
    NotSent,
    /// The cluster refused it before applying anything because it does not lead (NotLeader),
    /// is fenced, or is at another epoch: hold, refresh the topology, send to the leader.
    Refused,
    /// It was sent and the reply was lost (the stream or connection was reset): it may or may
    /// not have been applied. Only an idempotent write is sent again.
    Unknown,
    /// The cluster's own answer about this write (bad input, exists, deadline, ...): to the client.
    Final,
}

/// Classifies a failed write. A status the gateway's client made itself (a transport error)
/// carries its cause as `source()`; one a cluster sent does not, and is judged by its code and
/// message.
pub fn classify_write_failure(s: &Status) -> WriteFailure {
    if std::error::Error::source(s).is_some() {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
        while let Some(e) = cause {
            if e.is::<tonic::ConnectError>() {
                return WriteFailure::NotSent;
            }
            if e.is::<tonic::TimeoutExpired>() {
                // The request's own deadline passed: nothing left to retry in.
                return WriteFailure::Final;
            }
            cause = e.source();
        }
        let m = s.message();
        // hyper's "canceled": the connection closed or was not ready before the request was
        // written. REFUSED_STREAM: the server refused the stream before any processing (gRPC
        // spec: safe to retry).
        if m.contains("operation was canceled") || m.contains("refused stream") || m.contains("REFUSED_STREAM") {
            return WriteFailure::NotSent;
        }
        return if is_connection_error(s) || s.code() == Code::Cancelled { WriteFailure::Unknown } else { WriteFailure::Final };
    }
    let m = s.message();
    match s.code() {
        Code::FailedPrecondition
            if s.metadata().get(LEADER_METADATA).is_some() || m.contains("does not accept writes") || m.contains("stale epoch") =>
        {
            WriteFailure::Refused
        }
        // A fenced leader refuses writes before applying them (it may have lost its lease).
        Code::Unavailable | Code::FailedPrecondition if m.contains("fenced") => WriteFailure::Refused,
        _ => WriteFailure::Final,
    }
}

/// Headers that describe the HTTP/2 response itself, not the error: the gateway's own response
/// sets them, so copying them would duplicate them.
const HOP_HEADERS: &[&str] =
    &["content-type", "content-length", "date", "te", "trailer", "transfer-encoding", "grpc-encoding", "grpc-accept-encoding"];

/// A cluster's status as the gateway returns it: same code, message, details and metadata.
pub fn passthrough(s: Status) -> Status {
    let mut md = s.metadata().clone();
    for h in HOP_HEADERS {
        md.remove(*h);
    }
    Status::with_details_and_metadata(s.code(), s.message().to_string(), s.details().to_vec().into(), md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_transient_and_request_errors_are_not() {
        assert!(is_transient(&Status::unavailable("connection refused")));
        assert!(is_transient(&Status::internal("h2 protocol error: http2 error")));
        assert!(is_transient(&Status::unknown("transport error")));
        assert!(!is_transient(&Status::internal("index build failed")));
        assert!(!is_transient(&Status::invalid_argument("dimension 3, expected 8")));
        assert!(!is_transient(&Status::resource_exhausted("decoded message length too large")));
        // The connection closed before the request was written: tonic's status for hyper's
        // canceled dispatch, CANCELLED with the transport error as its cause.
        let canceled = Status::from_error(Box::new(h2_wrapped(Status::cancelled("operation was canceled"))));
        assert_eq!(canceled.code(), Code::Cancelled);
        assert!(is_transient(&canceled) && is_connection_error(&canceled));
        // The request's own deadline (also CANCELLED with a cause) and a cluster's CANCELLED are not.
        let expired = local(tonic::TimeoutExpired(()));
        assert_eq!(expired.code(), Code::Cancelled);
        assert!(!is_transient(&expired));
        assert!(!is_transient(&Status::cancelled("operation was canceled")));
    }

    /// A status as the client side of a channel makes it from a transport error.
    fn local(e: impl std::error::Error + Send + Sync + 'static) -> Status {
        Status::from_error(Box::new(e))
    }

    #[derive(Debug)]
    struct Msg(&'static str);
    impl std::fmt::Display for Msg {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Msg {}

    #[test]
    fn write_failures_are_classified_by_whether_the_write_can_have_been_applied() {
        use WriteFailure::*;
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(classify_write_failure(&local(tonic::ConnectError(Box::new(refused)))), NotSent);
        assert_eq!(classify_write_failure(&local(Msg("operation was canceled: connection closed"))), NotSent);
        // The same words from a cluster (no local cause) are the cluster's answer.
        assert_eq!(classify_write_failure(&Status::unavailable("tcp connect error: connection refused")), Final);
        // Sent, then the connection went away: unknown.
        let reset = Status::from_error(Box::new(Msg("connection reset")));
        assert_eq!(reset.code(), Code::Unknown);
        assert_eq!(classify_write_failure(&reset), Unknown);
        assert_eq!(classify_write_failure(&Status::new(Code::Internal, "x")), Final);
        let mut h2 = Status::internal("h2 protocol error: stream error received: unexpected internal error");
        h2 = Status::from_error(Box::new(h2_wrapped(h2)));
        assert_eq!(classify_write_failure(&h2), Unknown);
        assert_eq!(classify_write_failure(&local(tonic::TimeoutExpired(()))), Final);
        // Refusals by a cluster that does not lead, is fenced, or is at another epoch.
        let mut nl = Status::failed_precondition("cluster a is alternative and does not accept writes; the leader is http://b");
        assert_eq!(classify_write_failure(&nl), Refused);
        nl.metadata_mut().insert(LEADER_METADATA, "http://b".parse().unwrap());
        assert_eq!(classify_write_failure(&nl), Refused);
        assert_eq!(classify_write_failure(&Status::failed_precondition("stale epoch: sent for epoch 1, cluster a is at epoch 2")), Refused);
        assert_eq!(classify_write_failure(&Status::unavailable("cluster a is fenced: its lease expired")), Refused);
        // The cluster's own answers, including "applied but not exported yet".
        for s in [
            Status::unavailable("the write is durable on the leader but the transport has not acknowledged it yet"),
            Status::already_exists("id 5 exists"),
            Status::invalid_argument("wrong dim"),
            Status::failed_precondition("index build pending"),
            Status::deadline_exceeded("timed out"),
        ] {
            assert_eq!(classify_write_failure(&s), Final, "{s:?}");
        }
    }

    /// Wraps a status the way a transport error arrives: as the source of another error.
    fn h2_wrapped(s: Status) -> impl std::error::Error + Send + Sync + 'static {
        #[derive(Debug)]
        struct Wrap(Status);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "transport error")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        Wrap(s)
    }

    #[tokio::test]
    async fn a_real_refused_connection_is_not_sent() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
        let mut c = tandem_proto::v1::tandem_client::TandemClient::new(ch);
        let e = c.insert(tandem_proto::v1::InsertRequest::default()).await.unwrap_err();
        assert_eq!(classify_write_failure(&e), WriteFailure::NotSent, "{e:?}");
    }
}
