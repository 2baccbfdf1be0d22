//! A session: the newest token this client has seen. Every reply's token is folded in (the
//! later one wins, by epoch then ts), so the session only moves forward, and reads send it.

use std::sync::{Arc, Mutex};

use tandem_proto::session::SessionToken;

/// Shared by clones of a client: they are one session.
#[derive(Debug, Clone, Default)]
pub(crate) struct Session(Arc<Mutex<Option<SessionToken>>>);

impl Session {
    pub(crate) fn starting_at(token: Option<SessionToken>) -> Session {
        Session(Arc::new(Mutex::new(token)))
    }

    pub(crate) fn get(&self) -> Option<SessionToken> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn encoded(&self) -> String {
        self.get().map(|t| t.encode()).unwrap_or_default()
    }

    pub(crate) fn observe(&self, token: Option<SessionToken>) {
        let Some(t) = token else { return };
        let mut cur = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *cur = Some(cur.map_or(t, |c| c.max(t)));
    }

    /// A reply's token. A malformed one is a server bug; the session keeps what it has rather
    /// than failing a call that succeeded.
    pub(crate) fn observe_encoded(&self, token: &str) {
        match SessionToken::decode(token) {
            Ok(t) => self.observe(t),
            Err(e) => tracing::warn!(error = %e, "ignoring a malformed session token in a reply"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_only_moves_forward() {
        let s = Session::default();
        assert_eq!(s.encoded(), "");
        s.observe_encoded(&SessionToken { epoch: 1, ts: 10 }.encode());
        s.observe_encoded(&SessionToken { epoch: 1, ts: 5 }.encode());
        s.observe_encoded("");
        s.observe_encoded("garbage");
        assert_eq!(s.get(), Some(SessionToken { epoch: 1, ts: 10 }));
        s.clone().observe(Some(SessionToken { epoch: 2, ts: 1 }));
        // A newer epoch is taken, but its older ts does not take the session back in time.
        assert_eq!(s.get(), Some(SessionToken { epoch: 2, ts: 10 }), "clones share the session");
    }
}
