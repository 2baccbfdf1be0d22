//! Session tokens and the hybrid-timestamp layout they carry: part of the wire contract, so
//! clients, the gateway and clusters share one definition (and the SDK needs no cluster code).

use std::fmt;

/// A hybrid timestamp: `(physical_ms << 18) | logical`.
pub type Ts = u64;

pub const LOGICAL_BITS: u32 = 18;

pub fn compose(physical_ms: u64, logical: u64) -> Ts {
    (physical_ms << LOGICAL_BITS) | (logical & ((1 << LOGICAL_BITS) - 1))
}

pub fn physical_ms(ts: Ts) -> u64 {
    ts >> LOGICAL_BITS
}

/// Carried by every reply; passing it back makes reads at least as fresh as what the client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionToken {
    pub epoch: u64,
    pub ts: Ts,
}

/// A string that is not a token some reply returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadToken(pub String);

impl fmt::Display for BadToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid session token {:?}: pass back a token a reply returned", self.0)
    }
}

impl std::error::Error for BadToken {}

impl SessionToken {
    const PREFIX: &'static str = "t1-";

    /// Opaque to clients; printable so it can travel in HTTP headers and logs.
    pub fn encode(&self) -> String {
        format!("{}{:x}-{:x}", Self::PREFIX, self.epoch, self.ts)
    }

    /// An empty string is "no token".
    pub fn decode(s: &str) -> Result<Option<SessionToken>, BadToken> {
        if s.is_empty() {
            return Ok(None);
        }
        let bad = || BadToken(s.to_string());
        let rest = s.strip_prefix(Self::PREFIX).ok_or_else(bad)?;
        let (epoch, ts) = rest.split_once('-').ok_or_else(bad)?;
        let epoch = u64::from_str_radix(epoch, 16).map_err(|_| bad())?;
        let ts = u64::from_str_radix(ts, 16).map_err(|_| bad())?;
        Ok(Some(SessionToken { epoch, ts }))
    }

    /// The later of two tokens (what a session must keep to stay monotonic).
    pub fn max(self, other: SessionToken) -> SessionToken {
        if (other.epoch, other.ts) > (self.epoch, self.ts) { other } else { self }
    }

    /// The later of two encoded tokens; a malformed or empty one loses.
    pub fn max_encoded<'a>(a: &'a str, b: &'a str) -> &'a str {
        match (Self::decode(a).ok().flatten(), Self::decode(b).ok().flatten()) {
            (Some(x), Some(y)) if x.max(y) == y && x != y => b,
            (Some(_), _) => a,
            (None, _) => b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_order() {
        let t = SessionToken { epoch: 3, ts: compose(1_700_000_000_000, 7) };
        assert_eq!(SessionToken::decode(&t.encode()).unwrap(), Some(t));
        assert_eq!(SessionToken::decode("").unwrap(), None);
        for bad in ["x", "t1-", "t1-zz-1", "t1-1", "t2-1-1"] {
            let e = SessionToken::decode(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        let newer = SessionToken { epoch: 3, ts: t.ts + 1 };
        let next_epoch = SessionToken { epoch: 4, ts: 1 };
        assert_eq!(t.max(newer), newer);
        assert_eq!(newer.max(t), newer);
        assert_eq!(t.max(next_epoch), next_epoch);
        let (a, b) = (t.encode(), newer.encode());
        assert_eq!(SessionToken::max_encoded(&a, &b), b);
        assert_eq!(SessionToken::max_encoded(&b, &a), b);
        assert_eq!(SessionToken::max_encoded("", &a), a);
        assert_eq!(SessionToken::max_encoded(&a, "junk"), a);
    }
}
