//! Where a leadership term starts in a replication stream.
//!
//! A stream's positions (`lsn` of its events) are the group's, not one node's: after a
//! failover the new leader must continue the stream where the old one stopped, while its own
//! log (a shard's WAL, the DDL log) numbers records locally and also holds the changes it
//! applied as an alternative, plus snapshot loads that were never stream events.
//!
//! ```text
//!  local log:   1 .. 40 (replicated, snapshot rows) | 41 (first write as leader) 42 43 ...
//!  stream:      ...  1000 (old leader's last event) | 1001                       1002 1003 ...
//!                    term: local_base = 40, stream_base = 1000
//! ```
//!
//! A record past `local_base` is at `stream_base + (local - local_base)`. Positions at or below
//! the base belong to earlier terms: this node cannot serve them from its log (a subscriber
//! that needs them reads the broker, or bootstraps). The default term (0, 0) is the identity: a
//! node that has led since its first write. The term is written durably before the node
//! accepts its first write as leader, so a restart maps every record the same way.

use std::path::Path;

use crate::error::{ClusterError, Result};
use crate::fsio;
use crate::wal::Lsn;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamTerm {
    pub local_base: Lsn,
    pub stream_base: Lsn,
}

impl StreamTerm {
    /// A term whose first record follows local record `local_base` and stream position
    /// `stream_base`.
    pub fn new(local_base: Lsn, stream_base: Lsn) -> StreamTerm {
        StreamTerm { local_base, stream_base }
    }

    /// The stream position of local record `local`; positions at or below the base map to the
    /// base (everything before the term is at or below it).
    pub fn to_stream(self, local: Lsn) -> Lsn {
        if local <= self.local_base { self.stream_base } else { self.stream_base + (local - self.local_base) }
    }

    /// The local record at stream position `stream` (the base for positions of earlier terms).
    pub fn to_local(self, stream: Lsn) -> Lsn {
        if stream <= self.stream_base { self.local_base } else { self.local_base + (stream - self.stream_base) }
    }

    /// Whether this node's log can serve the stream from position `from` on: not when `from`
    /// belongs to an earlier term (then `Err(first servable position)`).
    pub fn check_servable(self, from: Lsn) -> std::result::Result<(), Lsn> {
        if self.stream_base > 0 && from <= self.stream_base { Err(self.stream_base + 1) } else { Ok(()) }
    }

    pub fn load(path: &Path) -> Result<StreamTerm> {
        let Some(b) = fsio::read_checked(path)? else { return Ok(StreamTerm::default()) };
        if b.len() != 16 {
            return Err(ClusterError::Corrupt(format!("{} holds {} bytes, not a stream term", path.display(), b.len())));
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(StreamTerm { local_base: word(0), stream_base: word(8) })
    }

    pub fn save(self, path: &Path) -> Result<()> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&self.local_base.to_le_bytes());
        b.extend_from_slice(&self.stream_base.to_le_bytes());
        fsio::write_atomic(path, &b)
    }
}

/// The node's epochs, kept in `<data dir>/epoch` so a restarted node knows which term it
/// belongs to: an old leader coming back must see that a newer epoch exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epochs {
    /// The highest epoch this node has seen (1 before any election).
    pub seen: u64,
    /// The last epoch this node led, 0 when it has not led since it last rejoined as an
    /// alternative: its log is the stream's source only while no newer epoch exists.
    pub led: u64,
}

impl Default for Epochs {
    fn default() -> Self {
        Epochs { seen: 1, led: 0 }
    }
}

impl Epochs {
    pub fn load(path: &Path) -> Result<Epochs> {
        match fsio::read_checked(path)? {
            None => Ok(Epochs::default()),
            Some(b) if b.len() == 16 => {
                let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
                Ok(Epochs { seen: word(0), led: word(8) })
            }
            Some(b) => Err(ClusterError::Corrupt(format!("{} holds {} bytes, not epochs", path.display(), b.len()))),
        }
    }

    pub fn save(self, path: &Path) -> Result<()> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&self.seen.to_le_bytes());
        b.extend_from_slice(&self.led.to_le_bytes());
        fsio::write_atomic(path, &b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_by_default() {
        let t = StreamTerm::default();
        for l in [0, 1, 7, 1000] {
            assert_eq!(t.to_stream(l), l);
            assert_eq!(t.to_local(l), l);
        }
        assert!(t.check_servable(1).is_ok());
    }

    #[test]
    fn a_term_continues_the_stream() {
        let t = StreamTerm::new(40, 1000);
        assert_eq!(t.to_stream(41), 1001);
        assert_eq!(t.to_stream(43), 1003);
        assert_eq!(t.to_local(1001), 41);
        assert_eq!(t.to_local(1003), 43);
        // Before the term: clamped to the base, and not servable from this log.
        assert_eq!(t.to_stream(12), 1000);
        assert_eq!(t.to_local(500), 40);
        assert_eq!(t.check_servable(1000), Err(1001));
        assert_eq!(t.check_servable(3), Err(1001));
        assert!(t.check_servable(1001).is_ok());
    }

    #[test]
    fn persists() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("term");
        assert_eq!(StreamTerm::load(&p).unwrap(), StreamTerm::default());
        StreamTerm::new(5, 9).save(&p).unwrap();
        assert_eq!(StreamTerm::load(&p).unwrap(), StreamTerm::new(5, 9));
        let e = dir.path().join("epoch");
        assert_eq!(Epochs::load(&e).unwrap(), Epochs { seen: 1, led: 0 });
        Epochs { seen: 4, led: 3 }.save(&e).unwrap();
        assert_eq!(Epochs::load(&e).unwrap(), Epochs { seen: 4, led: 3 });
    }
}
