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
        Code::Unknown | Code::Internal => is_connection_error(s),
        _ => false,
    }
}

/// The cluster could not be reached (counts against its health).
pub fn is_connection_error(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal => {
            let m = s.message();
            m.contains("transport error") || m.contains("connection") || m.contains("h2 protocol error")
        }
        _ => false,
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
    }
}
