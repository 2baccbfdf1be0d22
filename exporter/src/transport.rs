//! The one trait every replication backend implements.
//!
//! A *stream* is an ordered log: the DDL stream of a replication group, or one shard of one
//! collection incarnation. Events carry their position (`lsn`, the leader's log sequence
//! number, contiguous per stream; time ticks repeat the last position). Subscribers store the
//! last position they applied together with the data, and resume from the next one.

use std::pin::Pin;

use futures::Stream;
use prost::Message as _;
use tandem_proto::replication::v1::{ChangeEvent, change_event};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamId {
    /// Collection DDL of the whole group: create, drop, set index.
    Ddl,
    /// One shard of one collection incarnation.
    Shard { collection_id: u64, shard: u32 },
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamId::Ddl => write!(f, "ddl"),
            StreamId::Shard { collection_id, shard } => write!(f, "c{collection_id}/s{shard}"),
        }
    }
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<ChangeEvent>> + Send>>;

#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Short backend name for logs and metrics ("kafka", "direct", ...).
    fn name(&self) -> &'static str;

    /// Whether the leader must `publish` its changes (false when the leader's own log is what
    /// subscribers read, as with the direct backend).
    fn needs_publisher(&self) -> bool;

    /// Makes sure `stream` exists with `partitions` partitions where the backend needs that
    /// (e.g. a Kafka topic per collection incarnation, partition = shard). Idempotent.
    async fn ensure_stream(&self, stream: &StreamId, shards: u32) -> Result<()>;

    /// Publishes `events` of one stream in order. Returns once the transport has durably
    /// acknowledged every one of them (the `exported` ack policy waits for this). Not
    /// cancel-safe: a cancelled call may have published a prefix, which is harmless because
    /// subscribers skip positions they already applied.
    async fn publish(&self, stream: &StreamId, events: Vec<ChangeEvent>) -> Result<()>;

    /// Events of `stream` whose position is >= `from_lsn`, in order, followed by new events as
    /// they arrive. `ExportError::Truncated` when the log no longer holds `from_lsn`.
    async fn subscribe(&self, stream: &StreamId, from_lsn: u64) -> Result<EventStream>;

    /// `subscribe`, for a subscriber that knows the ts of the change at `from_lsn` (an old
    /// leader checking its last record): a broker that indexes its log by time can start
    /// looking for the position there instead of searching the whole log. The stream is the
    /// same; a wrong `ts` only costs the search its shortcut.
    async fn subscribe_at(&self, stream: &StreamId, from_lsn: u64, ts: u64) -> Result<EventStream> {
        let _ = ts;
        self.subscribe(stream, from_lsn).await
    }

    /// The position of the last change event in `stream` (0 when it holds none).
    async fn end_lsn(&self, stream: &StreamId) -> Result<u64>;
}

/// Whether `ev` is a time tick (it repeats the last position instead of having its own).
pub fn is_tick(ev: &ChangeEvent) -> bool {
    matches!(ev.body, Some(change_event::Body::Tick(_)))
}

/// What a stream may carry, checked on both sides of a broker: a wrong event must not reach
/// a subscriber.
pub fn check_event(stream: &StreamId, ev: &ChangeEvent) -> std::result::Result<(), String> {
    if ev.format_version == 0 {
        // Also what an empty or truncated value decodes to.
        return Err("format_version is 0 (unset)".into());
    }
    match stream {
        StreamId::Ddl => Ok(()),
        StreamId::Shard { collection_id, shard } => {
            if ev.collection_id != *collection_id || ev.shard != *shard {
                Err(format!("event of collection {} shard {} on stream {stream}", ev.collection_id, ev.shard))
            } else {
                Ok(())
            }
        }
    }
}

/// A broker message's payload as an event of `stream`, or why it is not one.
pub fn decode_event(stream: &StreamId, payload: &[u8]) -> std::result::Result<ChangeEvent, String> {
    let ev = ChangeEvent::decode(payload).map_err(|e| format!("value is not a ChangeEvent: {e}"))?;
    check_event(stream, &ev)?;
    Ok(ev)
}
