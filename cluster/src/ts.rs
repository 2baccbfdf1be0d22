//! Hybrid timestamps and session tokens.
//!
//! A timestamp is `(physical_ms << 18) | logical`: ordered like wall-clock time, yet strictly
//! increasing even when many writes land in one millisecond or the wall clock steps back. A node
//! that restarts (and later, a new leader) first `observe`s the highest timestamp it holds, so
//! the sequence keeps increasing across restarts and epochs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{ClusterError, Result};

pub type Ts = u64;

pub const LOGICAL_BITS: u32 = 18;

pub fn compose(physical_ms: u64, logical: u64) -> Ts {
    (physical_ms << LOGICAL_BITS) | (logical & ((1 << LOGICAL_BITS) - 1))
}

pub fn physical_ms(ts: Ts) -> u64 {
    ts >> LOGICAL_BITS
}

pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug, Default)]
pub struct HybridClock {
    last: AtomicU64,
}

impl HybridClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Issues a new timestamp, greater than every one issued or observed before.
    pub fn now(&self) -> Ts {
        let physical = compose(wall_ms(), 0);
        let mut prev = self.last.load(Ordering::Acquire);
        loop {
            let next = physical.max(prev + 1);
            match self.last.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    /// The current time without issuing one: >= every timestamp issued so far, and every later
    /// `now()` is greater than it.
    pub fn peek(&self) -> Ts {
        let physical = compose(wall_ms(), 0);
        // `now()` returns max(physical', last+1) with physical' >= physical, so anything below
        // this bound can no longer be issued.
        physical.saturating_sub(1).max(self.last.load(Ordering::Acquire))
    }

    /// Makes every later timestamp greater than `ts` (recovery, timestamps seen from a leader).
    pub fn observe(&self, ts: Ts) {
        self.last.fetch_max(ts, Ordering::AcqRel);
    }
}

/// Carried by every reply; passing it back makes reads at least as fresh as what the client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionToken {
    pub epoch: u64,
    pub ts: Ts,
}

impl SessionToken {
    const PREFIX: &'static str = "t1-";

    /// Opaque to clients; printable so it can travel in HTTP headers and logs.
    pub fn encode(&self) -> String {
        format!("{}{:x}-{:x}", Self::PREFIX, self.epoch, self.ts)
    }

    /// An empty string is "no token".
    pub fn decode(s: &str) -> Result<Option<SessionToken>> {
        if s.is_empty() {
            return Ok(None);
        }
        let bad = || ClusterError::invalid(format!("invalid session token {s:?}: pass back a token a reply returned"));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_strictly_increasing_across_threads() {
        let clock = std::sync::Arc::new(HybridClock::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = clock.clone();
                std::thread::spawn(move || (0..10_000).map(|_| c.now()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<Ts> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "duplicate timestamps issued");
    }

    #[test]
    fn observe_moves_the_clock_past_future_timestamps() {
        let clock = HybridClock::new();
        let future = compose(wall_ms() + 60_000, 5);
        clock.observe(future);
        assert!(clock.peek() >= future);
        assert!(clock.now() > future);
    }

    #[test]
    fn peek_bounds_every_issued_and_later_timestamp() {
        let clock = HybridClock::new();
        for _ in 0..1000 {
            let issued = clock.now();
            let p = clock.peek();
            assert!(p >= issued);
            assert!(clock.now() > p);
        }
    }

    #[test]
    fn session_token_round_trip_and_errors() {
        let t = SessionToken { epoch: 3, ts: compose(1_700_000_000_000, 7) };
        assert_eq!(SessionToken::decode(&t.encode()).unwrap(), Some(t));
        assert_eq!(SessionToken::decode("").unwrap(), None);
        for bad in ["x", "t1-", "t1-zz-1", "t1-1", "t2-1-1"] {
            let e = SessionToken::decode(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        let newer = SessionToken { epoch: 3, ts: t.ts + 1 };
        assert_eq!(t.max(newer), newer);
        assert_eq!(newer.max(t), newer);
    }
}
