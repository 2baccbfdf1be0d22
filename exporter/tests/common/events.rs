//! Events and stream helpers shared by the transport tests (every backend is tested with the
//! same kinds of events).
#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt;
use tandem_exporter::{EventStream, ExportError, StreamId};
use tandem_proto::replication::v1::{ChangeEvent, TimeTick, change_event::Body};
use tandem_proto::storage::v1::RowBatch;

/// Failure guard only: nothing is asserted about how fast things are.
pub const GUARD: Duration = Duration::from_secs(60);
pub const GROUP: &str = "g1";
pub const COLLECTION: u64 = 7;

pub use tandem_exporter::transport::is_tick;

pub fn shard(shard: u32) -> StreamId {
    StreamId::Shard { collection_id: COLLECTION, shard }
}

/// Hybrid timestamp for position `lsn` (and its `k`-th tick), increasing with both.
pub fn ts(lsn: u64, k: u64) -> u64 {
    ((1_700_000_000_000 + lsn * 10 + k) << 18) | k
}

pub fn change(stream: &StreamId, lsn: u64) -> ChangeEvent {
    let (collection_id, shard) = match stream {
        StreamId::Ddl => (0, 0),
        StreamId::Shard { collection_id, shard } => (*collection_id, *shard),
    };
    ChangeEvent {
        format_version: 1,
        group_id: GROUP.into(),
        epoch: 1,
        ts: ts(lsn, 0),
        collection: "docs".into(),
        collection_id,
        shard,
        lsn,
        epoch_base: None,
        body: Some(Body::Insert(RowBatch { ids: vec![lsn as i64], vectors: vec![lsn as f32, 0.5], ..Default::default() })),
    }
}

/// A time tick after change `lsn` (ticks repeat the position of the last change).
pub fn tick(stream: &StreamId, lsn: u64, k: u64) -> ChangeEvent {
    let mut ev = change(stream, lsn);
    ev.ts = ts(lsn, k);
    ev.body = Some(Body::Tick(TimeTick { leader_ts: ev.ts }));
    ev
}

/// Changes `1..=last`, each followed by `ticks(lsn)` ticks, so that offsets (or entry ids) and
/// positions drift apart irregularly.
pub fn log_with_ticks(stream: &StreamId, last: u64, ticks: impl Fn(u64) -> u64) -> Vec<ChangeEvent> {
    let mut log = Vec::new();
    for lsn in 1..=last {
        log.push(change(stream, lsn));
        log.extend((1..=ticks(lsn)).map(|k| tick(stream, lsn, k)));
    }
    log
}

pub async fn next(s: &mut EventStream) -> Result<ChangeEvent, ExportError> {
    tokio::time::timeout(GUARD, s.next()).await.expect("no event within the guard time").expect("stream ended")
}

pub async fn take(s: &mut EventStream, n: usize) -> Vec<ChangeEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(next(s).await.unwrap());
    }
    out
}
