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

    /// What a session must keep of two tokens to stay monotonic: the newer epoch and the later
    /// ts, each on its own. Taking the whole token of the newer epoch instead could move the
    /// ts back (a token of epoch 5 may carry an older ts than one of epoch 4: a read's token is
    /// the newest change its snapshot holds), and a session's token never goes back in time.
    pub fn max(self, other: SessionToken) -> SessionToken {
        SessionToken { epoch: self.epoch.max(other.epoch), ts: self.ts.max(other.ts) }
    }

    /// [`SessionToken::max`] of two encoded tokens; a malformed or empty one is ignored.
    pub fn max_encoded(a: &str, b: &str) -> String {
        match (Self::decode(a).ok().flatten(), Self::decode(b).ok().flatten()) {
            (Some(x), Some(y)) => x.max(y).encode(),
            (Some(_), None) => a.to_string(),
            (None, _) => b.to_string(),
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
        // The newer epoch does not take the ts back with it.
        assert_eq!(t.max(next_epoch), SessionToken { epoch: 4, ts: t.ts });
        assert_eq!(next_epoch.max(t), SessionToken { epoch: 4, ts: t.ts });
        let (a, b) = (t.encode(), newer.encode());
        assert_eq!(SessionToken::max_encoded(&a, &b), b);
        assert_eq!(SessionToken::max_encoded(&b, &a), b);
        assert_eq!(SessionToken::max_encoded("", &a), a);
        assert_eq!(SessionToken::max_encoded(&a, "junk"), a);
    }
}
