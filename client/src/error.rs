//! The SDK's one error type, and the one place a `tonic::Status` becomes a [`ClientError`].

use tandem_proto::session::BadToken;
pub use tandem_proto::wire::Reason as Refusal;

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint string is not a usable URL.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// Nothing answered at connect time (`Client::connect` connects eagerly). The cause is the
    /// error's `source()` (anyhow's `{:#}` prints both).
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// Refused by the SDK before anything was sent; the message names the bad value.
    #[error("{0}")]
    InvalidInput(String),
    /// A token that no reply returned, given to `with_session_token`.
    #[error(transparent)]
    BadToken(#[from] BadToken),
    /// The server (or the transport under the call) answered with an error status. `message`
    /// is the server's own, which names the bad value; `refusal` is the typed reason a cluster
    /// or gateway attaches where code can act on it (not leader, stale epoch, fenced, lagging,
    /// ...; `tandem_proto::wire`).
    #[error("{}", status_text(*code, message))]
    Status { code: tonic::Code, message: String, refusal: Option<Refusal> },
    /// `topology()` against an endpoint that does not serve `tandem.v1.Gateway`.
    #[error(
        "{endpoint} is not a tandem gateway (it does not serve tandem.v1.Gateway/Topology): topology is a gateway call; a cluster describes itself with cluster_info()"
    )]
    NotAGateway { endpoint: String },
}

fn status_text(code: tonic::Code, message: &str) -> String {
    if message.is_empty() { format!("{} (grpc status {code:?})", code.description()) } else { message.to_string() }
}

impl ClientError {
    /// Whether the very same call may succeed if sent again soon: the endpoint was unreachable or
    /// said it cannot serve right now (UNAVAILABLE). Reads are retried on exactly these.
    ///
    /// DEADLINE_EXCEEDED is not transient here: the call already used the caller's whole time
    /// budget (a read waits up to its deadline for a lagging replica to catch up), so resending
    /// it would double the wait the caller asked for. Everything else (bad input, not found,
    /// not leader, internal errors) would fail the same way again.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            ClientError::Status { code, .. } => *code == tonic::Code::Unavailable,
            ClientError::InvalidEndpoint { .. }
            | ClientError::InvalidInput(_)
            | ClientError::BadToken(_)
            | ClientError::NotAGateway { .. } => false,
        }
    }

    /// The gRPC code of the failure; errors raised by the SDK itself get the code a server would
    /// have used for them.
    pub fn code(&self) -> tonic::Code {
        match self {
            ClientError::InvalidEndpoint { .. } | ClientError::InvalidInput(_) | ClientError::BadToken(_) => tonic::Code::InvalidArgument,
            ClientError::Connect { .. } => tonic::Code::Unavailable,
            ClientError::Status { code, .. } => *code,
            ClientError::NotAGateway { .. } => tonic::Code::Unimplemented,
        }
    }

    /// The server's message for a status; the error's text otherwise.
    pub fn message(&self) -> String {
        match self {
            ClientError::Status { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// On a write refused by a cluster that does not lead: where the leader is, when known.
    pub fn leader_hint(&self) -> Option<&str> {
        match self.refusal() {
            Some(Refusal::NotLeader(n)) if !n.leader.is_empty() => Some(&n.leader),
            _ => None,
        }
    }

    /// The typed reason the server gave for refusing the call, if it gave one.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            ClientError::Status { refusal, .. } => refusal.as_ref(),
            _ => None,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        ClientError::InvalidInput(msg.into())
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let refusal = tandem_proto::wire::refusal(&s);
        // The connection closed before the call went out: the server was unavailable, whatever
        // tonic calls it (so reads are retried on it).
        let code = if is_connection_cancel(&s) { tonic::Code::Unavailable } else { s.code() };
        ClientError::Status { code, message: s.message().to_string(), refusal }
    }
}

/// A CANCELLED that the client side of a channel made itself (it carries the transport error as
/// its cause), other than for the call's own deadline: hyper's "operation was canceled", the
/// connection closed before the request was written, e.g. because the server was killed. A
/// server's own CANCELLED carries no cause; tonic reports an expired deadline as CANCELLED too,
/// with `TimeoutExpired` as its cause.
pub fn is_connection_cancel(s: &tonic::Status) -> bool {
    if s.code() != tonic::Code::Cancelled {
        return false;
    }
    let mut cause = std::error::Error::source(s);
    let local = cause.is_some();
    while let Some(e) = cause {
        if e.is::<tonic::TimeoutExpired>() {
            return false;
        }
        cause = e.source();
    }
    local
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_keep_code_message_and_leader() {
        let not_leader = tandem_proto::v1::NotLeader {
            cluster: "b".into(),
            role: tandem_proto::v1::Role::Alternative as i32,
            leader: "http://x:1".into(),
        };
        let s = tandem_proto::wire::refused(
            tonic::Code::FailedPrecondition,
            "cluster b is alternative and does not accept writes; the leader is http://x:1",
            Refusal::NotLeader(not_leader),
        );
        let e = ClientError::from(s);
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(e.leader_hint(), Some("http://x:1"));
        assert!(matches!(e.refusal(), Some(Refusal::NotLeader(_))));
        // The words alone name no leader: the hint comes from the typed refusal.
        let words = ClientError::from(tonic::Status::failed_precondition("does not accept writes; the leader is http://x:1"));
        assert_eq!((words.leader_hint(), words.refusal()), (None, None));
        assert!(e.to_string().starts_with("cluster b is alternative"), "{e}");
        assert!(!e.is_transient());

        assert!(ClientError::from(tonic::Status::unavailable("replica lags")).is_transient());
        assert!(!ClientError::from(tonic::Status::deadline_exceeded("lag 3s")).is_transient());
        assert!(!ClientError::from(tonic::Status::invalid_argument("bad dim")).is_transient());
        let bare = ClientError::from(tonic::Status::new(tonic::Code::Internal, ""));
        assert!(bare.to_string().contains("grpc status Internal"), "{bare}");
    }

    /// A status as tonic makes it from a transport error: `cause` is its source.
    fn made_locally(cause: impl std::error::Error + Send + Sync + 'static) -> tonic::Status {
        tonic::Status::from_error(Box::new(cause))
    }

    #[derive(Debug)]
    struct Transport(tonic::Status);
    impl std::fmt::Display for Transport {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }
    impl std::error::Error for Transport {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_call_cancelled_because_the_connection_closed_is_unavailable_and_retried() {
        // tonic's status for hyper's canceled dispatch: CANCELLED, the transport error its cause.
        let canceled = made_locally(Transport(tonic::Status::cancelled("operation was canceled")));
        assert_eq!(canceled.code(), tonic::Code::Cancelled);
        assert!(is_connection_cancel(&canceled));
        let e = ClientError::from(canceled);
        assert_eq!((e.code(), e.message()), (tonic::Code::Unavailable, "operation was canceled".to_string()));
        assert!(e.is_transient());
        // The call's own deadline and a server's CANCELLED stay what they are.
        let expired = made_locally(tonic::TimeoutExpired(()));
        assert_eq!(expired.code(), tonic::Code::Cancelled);
        assert!(!is_connection_cancel(&expired));
        assert!(!ClientError::from(expired).is_transient());
        assert!(!is_connection_cancel(&tonic::Status::cancelled("operation was canceled")));
    }
}
