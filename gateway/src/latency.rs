//! A cluster's peak-EWMA latency, which p2c ranks clusters by: the estimate jumps to a slower
//! answer at once and decays towards faster ones; the cost is the estimate x (requests in
//! flight + 1).
//!
//! Ours rather than tower's `PeakEwma`, for two reasons found by measuring a stalled and healed
//! cluster (it got no read for 20-27 s with a 5 s setting):
//! * tower's handle records its elapsed time whenever it is dropped, so a read abandoned at the
//!   caller's deadline, or dropped because a hedge answered elsewhere first, counts as a 3 s
//!   answer. Here only an answer the cluster gave is a sample ([`Pending::answered`]); what a
//!   stalled cluster costs meanwhile is its requests in flight, and the health checks take it
//!   out of routing.
//! * tower's decay is a time constant: a 3 s spike needs about eight of them to fall back to
//!   1 ms. Here `forget_within` is the time over which any spike of up to 1000x the normal
//!   latency is forgotten (the time constant is `forget_within / ln 1000`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How much a spike shrinks over `forget_within`.
const FORGET_FACTOR: f64 = 1000.0;

#[derive(Debug)]
pub struct Latency {
    /// (estimate in ns, when it was last updated).
    estimate: Mutex<(f64, Instant)>,
    in_flight: AtomicU32,
    tau_ns: f64,
}

impl Latency {
    /// Starts at `initial` (small: a new cluster is tried soon, and its real latency takes over).
    pub fn new(initial: Duration, forget_within: Duration) -> Arc<Latency> {
        let tau_ns = (forget_within.as_nanos() as f64 / FORGET_FACTOR.ln()).max(1.0);
        Arc::new(Latency { estimate: Mutex::new((initial.as_nanos() as f64, Instant::now())), in_flight: AtomicU32::new(0), tau_ns })
    }

    /// One request sent now; drop what this returns when it ends, and call
    /// [`Pending::answered`] first if the cluster answered it.
    pub fn start(self: &Arc<Self>) -> Pending {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Pending { meter: self.clone(), sent: Instant::now() }
    }

    /// The estimate now (decayed to this instant), in ns.
    pub fn estimate_ns(&self) -> f64 {
        let now = Instant::now();
        let (est, at) = *self.estimate.lock();
        est * self.weight(now.saturating_duration_since(at))
    }

    /// What p2c compares: the estimate x (requests in flight + 1).
    pub fn cost(&self) -> f64 {
        self.estimate_ns() * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    /// How much of the old estimate remains after `elapsed`.
    fn weight(&self, elapsed: Duration) -> f64 {
        (-(elapsed.as_nanos() as f64) / self.tau_ns).exp()
    }

    fn sample(&self, rtt: Duration) {
        let now = Instant::now();
        let rtt = rtt.as_nanos() as f64;
        let mut e = self.estimate.lock();
        let w = self.weight(now.saturating_duration_since(e.1));
        // Peak: a slower answer counts fully at once; a faster one pulls the estimate towards
        // itself by as much as the time since the last update allows.
        e.0 = if rtt > e.0 * w { rtt } else { e.0 * w + rtt * (1.0 - w) };
        e.1 = now;
    }
}

/// One request in flight (see [`Latency::start`]).
#[derive(Debug)]
pub struct Pending {
    meter: Arc<Latency>,
    sent: Instant,
}

impl Pending {
    /// The cluster answered (a reply or an error of its own): its round trip is a sample.
    pub fn answered(self) {
        self.meter.sample(self.sent.elapsed());
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.meter.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn a_spike_counts_at_once_and_is_forgotten_within_the_setting() {
        let m = Latency::new(ms(1), ms(300));
        m.sample(Duration::from_secs(3));
        assert!(m.estimate_ns() > 2.9e9, "a slow answer counts fully at once: {}", m.estimate_ns());
        std::thread::sleep(ms(300));
        // 3 s / 1000 = 3 ms: back to the order of a normal answer.
        assert!(m.estimate_ns() < 3.1e6, "forgotten within the setting: {} ns", m.estimate_ns());
    }

    #[test]
    fn requests_in_flight_raise_the_cost_and_abandoned_ones_are_no_sample() {
        let m = Latency::new(ms(1), Duration::from_secs(5));
        let base = m.cost();
        let p = m.start();
        let q = m.start();
        assert!(m.cost() > 2.5 * base, "two in flight: {} vs {base}", m.cost());
        std::thread::sleep(ms(20));
        // Abandoned (the caller's deadline, a hedge won elsewhere): no sample.
        drop(p);
        assert!(m.estimate_ns() <= 1.0e6, "an abandoned request changed the estimate: {}", m.estimate_ns());
        // Answered: a 20 ms sample, counted at once.
        q.answered();
        assert!(m.estimate_ns() >= 2.0e7, "an answer is a sample: {}", m.estimate_ns());
        assert_eq!(m.in_flight.load(Ordering::Relaxed), 0);
    }
}
