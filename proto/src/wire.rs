//! The contract between tandem's processes beyond the messages themselves: the metadata keys,
//! the `grpc-timeout` header, and the typed [`Refusal`] a status carries in its details.
//!
//! Clusters produce refusals (`tandem-cluster`'s error conversion), the gateway and the SDK read
//! them. A decision to redirect, hold or retry is taken from the refusal and the status code,
//! never from a status's message, which is for people and may change.

use std::time::Duration;

use prost::Message;

pub use crate::v1::Refusal;
pub use crate::v1::refusal::Reason;

/// On a NotLeader refusal: the leader's endpoint (also in the refusal; kept as a header for
/// tools that only see headers, e.g. grpcurl -v).
pub const LEADER: &str = "tandem-leader";
/// On every write the gateway forwards: the epoch of the leader it chose. A cluster at another
/// epoch refuses the write ([`Reason::StaleEpoch`]), so a fenced old leader never applies a
/// write meant for its successor, nor the new one a write meant for the old one.
pub const EPOCH: &str = "tandem-epoch";
/// On the gateway's UNAVAILABLE replies to writes it could not place: milliseconds after which
/// trying again makes sense.
pub const RETRY_AFTER: &str = "retry-after";
/// A client's session for the gateway's token cache (clients that cannot carry tokens).
pub const SESSION_ID: &str = "session-id";
/// gRPC's deadline header (the gRPC over HTTP/2 spec).
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The type URL a [`Refusal`] is packed under in a status's details.
pub const REFUSAL_TYPE_URL: &str = "type.googleapis.com/tandem.v1.Refusal";

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.len() < 2 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The consistency level a read asks for: UNSPECIFIED (or a value this build does not know) is
/// SESSION, as clusters serve it. An unknown value still reaches the cluster unchanged and gets
/// its error there.
pub fn consistency(read: Option<&crate::v1::ReadOptions>) -> crate::v1::ConsistencyLevel {
    use crate::v1::ConsistencyLevel as L;
    match read.map(|r| L::try_from(r.consistency)) {
        Some(Ok(l)) if l != L::Unspecified => l,
        _ => L::Session,
    }
}

/// A status with `code`, `message` and `reason` in its details.
pub fn refused(code: tonic::Code, message: impl Into<String>, reason: Reason) -> tonic::Status {
    let message = message.into();
    let details = crate::v1::RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any { type_url: REFUSAL_TYPE_URL.into(), value: Refusal { reason: Some(reason) }.encode_to_vec() }],
    };
    tonic::Status::with_details(code, message, details.encode_to_vec().into())
}

/// The refusal a status carries, if any. Details that are not tandem's (another server's, or
/// undecodable) are no refusal.
pub fn refusal(s: &tonic::Status) -> Option<Reason> {
    if s.details().is_empty() {
        return None;
    }
    let envelope = crate::v1::RpcStatus::decode(s.details()).ok()?;
    envelope
        .details
        .iter()
        .find(|a| a.type_url == REFUSAL_TYPE_URL)
        .and_then(|a| Refusal::decode(a.value.as_slice()).ok())
        .and_then(|r| r.reason)
}

/// The leader's endpoint a NotLeader refusal names, if it names one.
pub fn leader_hint(s: &tonic::Status) -> Option<String> {
    match refusal(s)? {
        Reason::NotLeader(n) if !n.leader.is_empty() => Some(n.leader),
        _ => None,
    }
}

/// A cluster's role in its replication group, shared by clusters, the gateway and the SDK.
///
/// ```text
///               promote (arbiter)                      new epoch seen
///  Alternative ──────────────────► Leading ────────────────────────────► Recovering
///      ▲  ▲                                                                  │
///      │  └──────────────────────── caught up ──────────────────────────────┘
///      │ promote (manual)
///   Standby  (serves nothing until promoted)
/// ```
///
/// Each capability is an exhaustive match: a new role must decide every one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leading,
    Alternative,
    Standby,
    Recovering,
}

impl Role {
    pub fn accepts_writes(self) -> bool {
        match self {
            Role::Leading => true,
            Role::Alternative | Role::Standby | Role::Recovering => false,
        }
    }

    pub fn is_readable(self) -> bool {
        match self {
            Role::Leading | Role::Alternative => true,
            // A recovering replica serves nothing until it has caught up (invariant 7).
            Role::Standby | Role::Recovering => false,
        }
    }

    pub fn can_be_promoted(self) -> bool {
        match self {
            Role::Alternative | Role::Standby => true,
            Role::Leading | Role::Recovering => false,
        }
    }

    pub fn to_proto(self) -> crate::v1::Role {
        use crate::v1::Role as P;
        match self {
            Role::Leading => P::Leading,
            Role::Alternative => P::Alternative,
            Role::Standby => P::Standby,
            Role::Recovering => P::Recovering,
        }
    }

    /// The role a wire value names; `None` for UNSPECIFIED and values this build does not know
    /// (a newer peer).
    pub fn from_proto(v: i32) -> Option<Role> {
        use crate::v1::Role as P;
        match P::try_from(v) {
            Ok(P::Leading) => Some(Role::Leading),
            Ok(P::Alternative) => Some(Role::Alternative),
            Ok(P::Standby) => Some(Role::Standby),
            Ok(P::Recovering) => Some(Role::Recovering),
            Ok(P::Unspecified) | Err(_) => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Leading => "leading",
            Role::Alternative => "alternative",
            Role::Standby => "standby",
            Role::Recovering => "recovering",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1;

    #[test]
    fn a_refusal_survives_the_status_details() {
        let reason =
            Reason::NotLeader(v1::NotLeader { cluster: "b".into(), role: v1::Role::Alternative as i32, leader: "http://a:1".into() });
        let s = refused(tonic::Code::FailedPrecondition, "cluster b does not lead", reason.clone());
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(refusal(&s), Some(reason));
        // Through the headers, as a peer receives it.
        let http: http::Response<()> = s.into_http();
        let back = tonic::Status::from_header_map(http.headers()).unwrap();
        assert_eq!(back.message(), "cluster b does not lead");
        assert!(matches!(refusal(&back), Some(Reason::NotLeader(n)) if n.leader == "http://a:1"));
    }

    #[test]
    fn statuses_without_tandem_details_carry_no_refusal() {
        assert_eq!(refusal(&tonic::Status::failed_precondition("stale epoch: fenced, does not accept writes")), None);
        assert_eq!(refusal(&tonic::Status::with_details(tonic::Code::Internal, "x", vec![1, 2, 3].into())), None);
        let other = v1::RpcStatus {
            code: 9,
            message: "x".into(),
            details: vec![prost_types::Any { type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(), value: vec![] }],
        };
        assert_eq!(refusal(&tonic::Status::with_details(tonic::Code::FailedPrecondition, "x", other.encode_to_vec().into())), None);
    }

    #[test]
    fn grpc_timeouts_parse_by_unit() {
        assert_eq!(parse_grpc_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
    }

    #[test]
    fn roles_map_to_the_wire_and_back() {
        for r in [Role::Leading, Role::Alternative, Role::Standby, Role::Recovering] {
            assert_eq!(Role::from_proto(r.to_proto() as i32), Some(r));
        }
        assert_eq!(Role::from_proto(0), None);
        assert_eq!(Role::from_proto(99), None);
    }
}
