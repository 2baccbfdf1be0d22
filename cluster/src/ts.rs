//! Hybrid timestamps and session tokens.
//!
//! A timestamp is `(physical_ms << 18) | logical`: ordered like wall-clock time, yet strictly
//! increasing even when many writes land in one millisecond or the wall clock steps back. A node
//! that restarts (and later, a new leader) first `observe`s the highest timestamp it holds, so
//! the sequence keeps increasing across restarts and epochs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

// The layout and the session token are part of the wire contract: defined once in tandem-proto.
pub use tandem_proto::session::{LOGICAL_BITS, SessionToken, Ts, compose, physical_ms};

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

    /// Issues `n` consecutive timestamps at once and returns the first. They serve as ids
    /// the server assigns (auto_id): unique for the same reasons timestamps are, across
    /// restarts and leaders, because the write that carries them gets a later timestamp still.
    pub fn reserve(&self, n: u64) -> Ts {
        let physical = compose(wall_ms(), 0);
        let mut prev = self.last.load(Ordering::Acquire);
        loop {
            let first = physical.max(prev + 1);
            match self.last.compare_exchange_weak(prev, first + n.max(1) - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return first,
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
    fn reserved_ranges_do_not_overlap_issued_timestamps() {
        let clock = HybridClock::new();
        let a = clock.now();
        let first = clock.reserve(1000);
        let b = clock.now();
        assert!(first > a);
        assert!(b >= first + 1000, "{b} was inside the reserved range starting at {first}");
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
}
