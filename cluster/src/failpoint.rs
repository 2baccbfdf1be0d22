//! Named failure-injection points on the paths luck does not reach (a failed fsync, a publish
//! that fails after the broker took the batch, an interrupted snapshot, a lease lost while
//! promoting, a failed apply). Built on the `fail` crate's registry: a test configures a point
//! with `fail::cfg(name, action)` and the code here asks whether it fires. Without the
//! `failpoints` feature every point is a constant `None`, compiled away.
//!
//! Points: `wal::fsync`, `publisher::publish` (arg `before` | `after`: fail before the batch is
//! sent, or after the broker took it), `follower::snapshot_chunk`, `follower::apply` (arg
//! `transient` for a retryable failure), `ha::won` (between winning an election and promoting),
//! `ha::promoted` (between promoting and the new leader's first event),
//! `replication::local_subscribe` (a query node's subscription finds its position gone from the
//! cluster's log), `placement::stolen_call` (a copy asked for a straggler's segments
//! mid-search fails), `placement::routed` (arg: ms; a search waits with its view taken).
//! `tests/failpoints.rs` has one test per point.

/// `Some(arg)` when the point `name` fires (`arg` is the action's argument, "" without one);
/// `None` otherwise, and always without the `failpoints` feature. A `callback` action runs its
/// callback and gives `None`.
#[inline]
pub fn fired(name: &str) -> Option<String> {
    #[cfg(feature = "failpoints")]
    {
        let r = fail::eval(name, |arg| arg.unwrap_or_default());
        if r.is_some() {
            *HITS.lock().entry(name.to_string()).or_default() += 1;
        }
        r
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        None
    }
}

#[cfg(feature = "failpoints")]
static HITS: std::sync::LazyLock<parking_lot::Mutex<std::collections::HashMap<String, u64>>> = std::sync::LazyLock::new(Default::default);

/// How often `name` has fired in this process (so a test can tell that its fault happened).
#[cfg(feature = "failpoints")]
pub fn hits(name: &str) -> u64 {
    HITS.lock().get(name).copied().unwrap_or(0)
}
