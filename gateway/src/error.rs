//! Errors the gateway makes itself. Errors a cluster returned are not wrapped: they reach the
//! client unchanged (see [`passthrough`]), so bad input gets the cluster's own clear message.
//!
//! What the gateway does with a failed call (retry a read elsewhere, hold and redirect a write,
//! or answer the client) is decided from the status code, the typed refusal a cluster attached
//! (`tandem_proto::wire`), and, for failures on the way to a cluster, the transport error the
//! gateway's own client attached as the status's source. Never from message text.

use tandem_proto::wire::{self, Reason};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No cluster can serve a read now; the message names why for each cluster.
    #[error("{0}")]
    NoCluster(String),
    /// Reads were retried as often as the retry budget allows.
    #[error("retry budget exhausted")]
    RetryBudget,
    /// A write found no leader within the buffer's bounds; nothing was applied. Trying again
    /// after `retry_after_ms` makes sense (the `retry-after` metadata).
    #[error("{message}")]
    NoLeader { message: String, retry_after_ms: u64 },
    /// The connection to the leader failed after a write that must not be applied twice was
    /// sent: it may or may not have been applied.
    #[error("{0}")]
    OutcomeUnknown(String),
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
            GatewayError::NoCluster(_) | GatewayError::RetryBudget | GatewayError::NoLeader { .. } => true,
            // Sending it again may apply it twice: the caller decides.
            GatewayError::OutcomeUnknown(_) => false,
            GatewayError::Listen { .. } | GatewayError::Config(_) | GatewayError::Internal(_) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, GatewayError>;

/// The one place the gateway's own errors become statuses.
impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        match e {
            GatewayError::NoCluster(_) | GatewayError::RetryBudget | GatewayError::OutcomeUnknown(_) => Status::unavailable(e.to_string()),
            GatewayError::NoLeader { message, retry_after_ms } => {
                let mut s = Status::unavailable(message);
                s.metadata_mut().insert(wire::RETRY_AFTER, retry_after_ms.into());
                s
            }
            GatewayError::Listen { .. } | GatewayError::Config(_) | GatewayError::Internal(_) => Status::internal(e.to_string()),
        }
    }
}

/// Worth trying on another cluster: the cluster (or the way to it) failed, not the request.
/// RESOURCE_EXHAUSTED is overload only when a cluster says so with a typed refusal: tonic's
/// message-size limit is RESOURCE_EXHAUSTED too, and that request fails everywhere.
pub fn is_transient(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::Aborted => true,
        Code::ResourceExhausted => matches!(wire::refusal(s), Some(Reason::Overloaded(_))),
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
        // Made by the gateway's own client from a transport failure (a reset stream, a lost
        // connection): tonic keeps that failure as the status's source. A status a cluster
        // sent is decoded from trailers and has none.
        Code::Unknown | Code::Internal => std::error::Error::source(s).is_some(),
        _ => false,
    }
}

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
/// carries its cause as `source()`, judged by the cause's type; one a cluster sent does not,
/// and is judged by its typed refusal.
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
            // hyper's "canceled": the connection closed or was not ready before the request
            // was written.
            if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
                return WriteFailure::NotSent;
            }
            // REFUSED_STREAM: the server refused the stream before any processing (gRPC spec:
            // safe to retry). Any other reset may have come after the write was applied.
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return if h2.reason() == Some(h2::Reason::REFUSED_STREAM) { WriteFailure::NotSent } else { WriteFailure::Unknown };
            }
            cause = e.source();
        }
        return if is_connection_error(s) || s.code() == Code::Cancelled { WriteFailure::Unknown } else { WriteFailure::Final };
    }
    match wire::refusal(s) {
        // Refused before anything changed: by a cluster that does not lead, one at another
        // epoch, or a leader whose lease may have run out.
        Some(Reason::NotLeader(_) | Reason::StaleEpoch(_) | Reason::Fenced(_) | Reason::Stopping(_)) => WriteFailure::Refused,
        Some(Reason::TooLarge(_) | Reason::Lagging(_) | Reason::Overloaded(_)) | None => WriteFailure::Final,
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
        // A stream reset on the way, as tonic's client reports it: INTERNAL with the h2 error
        // as its source.
        let reset = local(h2::Error::from(h2::Reason::INTERNAL_ERROR));
        assert_eq!(reset.code(), Code::Internal);
        assert!(is_transient(&reset) && is_connection_error(&reset));
        assert!(is_transient(&local(Msg("connection reset"))));
        // The same codes and words from a cluster (decoded from trailers: no source) are its answer.
        assert!(!is_transient(&Status::internal("h2 protocol error: http2 error")));
        assert!(!is_transient(&Status::unknown("transport error")));
        assert!(!is_transient(&Status::internal("index build failed")));
        assert!(!is_transient(&Status::invalid_argument("dimension 3, expected 8")));
        // RESOURCE_EXHAUSTED: overload only when a cluster says so; a size limit fails everywhere.
        assert!(!is_transient(&Status::resource_exhausted("decoded message length too large")));
        assert!(!is_transient(&Status::resource_exhausted("busy")));
        let overloaded = wire::refused(Code::ResourceExhausted, "busy", Reason::Overloaded(Default::default()));
        assert!(is_transient(&overloaded));
        let too_large = wire::refused(Code::ResourceExhausted, "64 MiB", Reason::TooLarge(Default::default()));
        assert!(!is_transient(&too_large));
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
        // The server refused the stream before processing it (gRPC spec: safe to send again).
        assert_eq!(classify_write_failure(&local(h2::Error::from(h2::Reason::REFUSED_STREAM))), NotSent);
        // The same words from a cluster (no local cause) are the cluster's answer.
        assert_eq!(classify_write_failure(&Status::unavailable("tcp connect error: connection refused")), Final);
        assert_eq!(classify_write_failure(&Status::cancelled("operation was canceled")), Final);
        // Sent, then the connection went away: unknown.
        let reset = Status::from_error(Box::new(Msg("connection reset")));
        assert_eq!(reset.code(), Code::Unknown);
        assert_eq!(classify_write_failure(&reset), Unknown);
        assert_eq!(classify_write_failure(&Status::new(Code::Internal, "x")), Final);
        let h2 = Status::from_error(Box::new(h2_wrapped(local(h2::Error::from(h2::Reason::INTERNAL_ERROR)))));
        assert_eq!(classify_write_failure(&h2), Unknown);
        assert_eq!(classify_write_failure(&local(h2::Error::from(h2::Reason::CANCEL))), Unknown);
        assert_eq!(classify_write_failure(&local(tonic::TimeoutExpired(()))), Final);
        // Refusals by a cluster that does not lead, is fenced, or is at another epoch: typed.
        use tandem_proto::v1;
        for reason in [
            Reason::NotLeader(v1::NotLeader { cluster: "a".into(), role: v1::Role::Alternative as i32, leader: "http://b".into() }),
            Reason::StaleEpoch(v1::StaleEpoch { cluster: "a".into(), sent: 1, own: 2 }),
            Reason::Fenced(v1::Fenced { cluster: "a".into() }),
            Reason::Stopping(v1::Stopping { cluster: "a".into() }),
        ] {
            let s = wire::refused(Code::FailedPrecondition, "refused", reason);
            assert_eq!(classify_write_failure(&s), Refused, "{s:?}");
        }
        // The words alone, without the typed refusal, are the cluster's final answer.
        assert_eq!(
            classify_write_failure(&Status::failed_precondition(
                "cluster a is alternative and does not accept writes; stale epoch; fenced"
            )),
            Final
        );
        let lagging = wire::refused(Code::DeadlineExceeded, "lags", Reason::Lagging(v1::Lagging { lag_ms: 5 }));
        assert_eq!(classify_write_failure(&lagging), Final);
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

    #[test]
    fn the_gateways_own_errors_become_statuses_in_one_place() {
        let s = Status::from(GatewayError::NoLeader { message: "no leader: election in progress".into(), retry_after_ms: 750 });
        assert_eq!((s.code(), s.message()), (Code::Unavailable, "no leader: election in progress"));
        assert_eq!(s.metadata().get(wire::RETRY_AFTER).unwrap(), "750");
        for (e, transient) in [
            (GatewayError::NoCluster("a: suspect".into()), true),
            (GatewayError::RetryBudget, true),
            (GatewayError::OutcomeUnknown("the outcome of this Insert is unknown".into()), false),
        ] {
            assert_eq!(e.is_transient(), transient, "{e}");
            let text = e.to_string();
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (Code::Unavailable, text.as_str()));
            assert!(s.metadata().get(wire::RETRY_AFTER).is_none());
        }
        assert_eq!(Status::from(GatewayError::Internal("x".into())).code(), Code::Internal);
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
