//! Tokens kept for clients that cannot carry them: a client sends a `session-id` metadata
//! header and the gateway remembers the newest token of that session, from every write and read
//! reply, and puts it into the session's reads. Monotonic per session even when consecutive
//! reads land on different clusters.

use std::time::Duration;

use moka::future::Cache;
use tandem_proto::session::SessionToken;

/// The metadata key naming a session (defined with the rest of the wire contract).
pub use tandem_proto::wire::SESSION_ID;

#[derive(Clone)]
pub struct Sessions {
    cache: Cache<String, SessionToken>,
}

impl Sessions {
    pub fn new(capacity: u64, ttl: Duration) -> Sessions {
        Sessions { cache: Cache::builder().max_capacity(capacity).time_to_idle(ttl).build() }
    }

    pub async fn get(&self, session: &str) -> Option<SessionToken> {
        let t = self.cache.get(session).await;
        metrics::counter!("tandem_gateway_session_cache_total", "result" => if t.is_some() { "hit" } else { "miss" }).increment(1);
        t
    }

    /// Keeps the later of the stored token and `token` (concurrent replies may arrive out of
    /// order; the entry lock serialises them).
    pub async fn observe(&self, session: &str, token: &str) {
        let Ok(Some(t)) = SessionToken::decode(token) else { return };
        self.cache.entry(session.to_string()).and_upsert_with(|old| async move { old.map_or(t, |o| o.into_value().max(t)) }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_newest_token_per_session() {
        let s = Sessions::new(10, Duration::from_secs(60));
        let old = SessionToken { epoch: 1, ts: 100 };
        let new = SessionToken { epoch: 1, ts: 200 };
        assert_eq!(s.get("a").await, None);
        s.observe("a", &new.encode()).await;
        s.observe("a", &old.encode()).await;
        s.observe("a", "garbage").await;
        assert_eq!(s.get("a").await, Some(new));
        assert_eq!(s.get("b").await, None);
    }
}
