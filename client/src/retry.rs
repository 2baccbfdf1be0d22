//! When a read is sent again: transient failures only (see [`ClientError::is_transient`]),
//! exponential backoff with full jitter, bounded in attempts and in total time.
//!
//! Writes are never resent by the SDK: a write whose reply was lost may have been applied.

use std::time::Duration;

use crate::error::ClientError;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// The backoff ceiling before the first retry; it doubles (`multiplier`) each retry.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    /// No retry starts once this much time has passed since the first attempt.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    /// 6 attempts, 50 ms doubling to at most 2 s, within 10 s: rides out a cluster restart or a
    /// connection reset, and gives up before a person would.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            multiplier: 2.0,
            max_elapsed: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Every failure is returned at once.
    pub fn none() -> Self {
        RetryPolicy { max_attempts: 1, ..RetryPolicy::default() }
    }

    /// The backoff ceiling after `attempt` failed attempts (1-based).
    fn ceiling(&self, attempt: u32) -> Duration {
        let exp = self.multiplier.max(1.0).powi(attempt.saturating_sub(1).min(64) as i32);
        self.initial_backoff.mul_f64(exp.min(1e9)).min(self.max_backoff)
    }

    /// How long to wait before attempt `attempt + 1`, or `None` to give up. Full jitter (a
    /// uniform draw below the ceiling) keeps many clients that failed together from retrying
    /// together.
    pub(crate) fn next_delay(&self, attempt: u32, elapsed: Duration, err: &ClientError) -> Option<Duration> {
        if !err.is_transient() || attempt >= self.max_attempts {
            return None;
        }
        let ceiling = self.ceiling(attempt);
        let delay = if ceiling.is_zero() { ceiling } else { ceiling.mul_f64(rand::random::<f64>()) };
        (elapsed + delay < self.max_elapsed).then_some(delay)
    }
}

/// Passed to the `on_retry` hook before each retry's wait.
#[derive(Debug)]
pub struct RetryEvent<'a> {
    /// The RPC, e.g. `"Search"`.
    pub op: &'static str,
    /// Attempts made so far (1 after the first failure).
    pub attempt: u32,
    pub delay: Duration,
    pub error: &'a ClientError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_only_for_transient_errors() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(1), Duration::from_millis(50));
        assert_eq!(p.ceiling(3), Duration::from_millis(200));
        assert_eq!(p.ceiling(30), Duration::from_secs(2));
        let unavailable = ClientError::from(tonic::Status::unavailable("down"));
        for attempt in 1..p.max_attempts {
            let d = p.next_delay(attempt, Duration::ZERO, &unavailable).expect("retried");
            assert!(d <= p.ceiling(attempt));
        }
        assert_eq!(p.next_delay(p.max_attempts, Duration::ZERO, &unavailable), None, "attempts are bounded");
        assert_eq!(p.next_delay(1, p.max_elapsed, &unavailable), None, "total time is bounded");
        assert_eq!(p.next_delay(1, Duration::ZERO, &ClientError::from(tonic::Status::invalid_argument("x"))), None);
        assert_eq!(p.next_delay(1, Duration::ZERO, &ClientError::from(tonic::Status::deadline_exceeded("x"))), None);
        assert_eq!(RetryPolicy::none().next_delay(1, Duration::ZERO, &unavailable), None);
    }
}
