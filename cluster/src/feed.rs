//! Change feeds: a leader's changes as ordered `ChangeEvent`s, one feed per stream (a shard of
//! a collection, or the DDL log), with time ticks when idle. The direct transport streams a
//! feed over gRPC; broker publishers (Kafka, Pulsar) publish it.
//!
//! A shard feed only emits records whose ts is at or below the *collection's* serviceable ts
//! at the moment it reads: then every part of a multi-shard write it emits is durable on every
//! shard, so recovery can never abort a write a subscriber already applied. A tick says "every
//! change of this stream with ts <= tick.ts has been sent"; its ts is taken *before* reading,
//! so records that became durable meanwhile cannot be skipped over by it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::replication::v1 as rp;
use tandem_proto::storage::v1 as st;

use crate::collection::Collection;
use crate::error::{ClusterError, Result};
use crate::node::Node;
use crate::ts::Ts;
use crate::wal::Lsn;

pub const FORMAT_VERSION: u32 = 1;

/// A source of ordered change events (a shard's or the DDL log's).
pub trait Feed: Send + 'static {
    /// Waits for the next events (changes, or a tick when idle) and returns them in order.
    /// Cancel-safe.
    fn next_batch(&mut self) -> impl std::future::Future<Output = Result<Vec<rp::ChangeEvent>>> + Send;
    /// The local log position read next (what a subscriber's retention lease holds).
    fn next_lsn(&self) -> Lsn;
}
const BATCH: usize = 512;

fn base_event(node: &Node, group: &str, c_name: &str, c_id: u64, shard: u32, ts: Ts, lsn: Lsn) -> rp::ChangeEvent {
    rp::ChangeEvent {
        format_version: FORMAT_VERSION,
        group_id: group.to_string(),
        // The epoch this node leads (not the newest it has heard of: a leader fenced by a newer
        // epoch may still export a last batch, and it must read as the old epoch's).
        epoch: match node.led_epoch() {
            0 => node.epoch(),
            led => led,
        },
        ts,
        collection: c_name.to_string(),
        collection_id: c_id,
        shard,
        lsn,
        epoch_base: None,
        body: None,
    }
}

/// Whose positions a shard feed counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// The replication stream's (alternatives, broker publishers): a term maps this node's log
    /// onto them, and only this node's own term can be served.
    Stream,
    /// This node's own log's, whatever its role (`SubscribeRequest.local`: query nodes). They go
    /// on unchanged when a term begins (an alternative promoted), and ticks never pass what the
    /// local log holds acknowledged (`Shard::logged_ts`), which on an alternative can trail the
    /// serviceable ts by a local fsync.
    Local,
}

pub struct ShardFeed {
    node: Arc<Node>,
    collection: Arc<Collection>,
    shard: usize,
    group: String,
    /// The local WAL position to read next.
    next: Lsn,
    /// Maps local positions to the stream's (fixed for the feed's life: a term only starts
    /// on a node that is not leading, whose feeds are stopped).
    term: crate::term::StreamTerm,
    /// Where this leadership started in the stream (`ChangeEvent.epoch_base`).
    epoch_base: Option<Lsn>,
    tick_every: Duration,
    last_tick: Option<Instant>,
    acked: tokio::sync::watch::Receiver<Lsn>,
    /// `Node::request_ticks`: tick now (a STRONG read on an alternative waits for it).
    tick_requests: tokio::sync::watch::Receiver<u64>,
    /// A tick request seen while waiting.
    tick_wanted: bool,
    /// Whose positions it counts in, and so how far it ticks (see [`Positions`]).
    positions: Positions,
}

impl ShardFeed {
    /// A feed of `shard` from position `from`, in `positions`. `ClusterError::InvalidArgument`
    /// naming the retained range when the WAL no longer holds `from` (the subscriber must
    /// bootstrap).
    pub fn new(
        node: Arc<Node>,
        collection: Arc<Collection>,
        shard: usize,
        from: Lsn,
        group: &str,
        tick_every: Duration,
        positions: Positions,
    ) -> Result<ShardFeed> {
        let sh = collection
            .shards()
            .get(shard)
            .ok_or_else(|| ClusterError::invalid(format!("collection {:?} has no shard {shard}", collection.schema().name)))?;
        // `from` is a stream position; this node's log serves only its own term of the stream.
        // A local feed's positions are the log's own: the identity term.
        let term = match positions {
            Positions::Stream => sh.term(),
            Positions::Local => crate::term::StreamTerm::default(),
        };
        term.check_servable(from).map_err(|first| ClusterError::Truncated { from, first })?;
        let (from, first) = (term.to_local(from.max(1)), sh.first_lsn());
        if from < first && from <= sh.last_lsn() {
            return Err(ClusterError::Truncated { from: term.to_stream(from), first: term.to_stream(first) });
        }
        let acked = sh.acked_watch();
        let tick_requests = node.tick_requests();
        let epoch_base = sh.lead_base().filter(|_| positions == Positions::Stream && node.led_epoch() > 0);
        Ok(ShardFeed {
            node,
            collection,
            shard,
            group: group.to_string(),
            next: from.max(1),
            term,
            epoch_base,
            tick_every,
            last_tick: None,
            acked,
            tick_requests,
            tick_wanted: false,
            positions,
        })
    }
}

impl Feed for ShardFeed {
    fn next_lsn(&self) -> Lsn {
        self.next
    }

    async fn next_batch(&mut self) -> Result<Vec<rp::ChangeEvent>> {
        loop {
            if self.collection.is_dropped() {
                return Err(ClusterError::CollectionNotFound(self.collection.schema().name.clone()));
            }
            // Taken before `upto`: a request made after this is seen on the next round.
            let requested = std::mem::take(&mut self.tick_wanted) || self.tick_requests.has_changed().unwrap_or(false);
            self.tick_requests.borrow_and_update();
            let upto = match self.positions {
                Positions::Stream => self.collection.serviceable_ts(&self.node.clock),
                Positions::Local => self.collection.logged_ts(&self.node.clock),
            };
            let (events, last, full) = {
                let node = self.node.clone();
                let c = self.collection.clone();
                let (shard, next, group, term, base) = (self.shard, self.next, self.group.clone(), self.term, self.epoch_base);
                tokio::task::spawn_blocking(move || -> Result<_> {
                    let name = c.schema().name.clone();
                    let mut events = Vec::new();
                    let last = c.shards()[shard].read_changes(next, upto, BATCH, |lsn, rec| {
                        let mut ev = base_event(&node, &group, &name, c.id, shard as u32, rec.ts, term.to_stream(lsn));
                        ev.epoch_base = base;
                        ev.body = match rec.op {
                            Some(st::wal_record::Op::Insert(b)) => Some(rp::change_event::Body::Insert(b)),
                            Some(st::wal_record::Op::Upsert(b)) => Some(rp::change_event::Body::Upsert(b)),
                            Some(st::wal_record::Op::Delete(d)) => Some(rp::change_event::Body::Delete(d)),
                            Some(st::wal_record::Op::Abort(_)) | None => None,
                        };
                        if ev.body.is_some() {
                            events.push(ev);
                        }
                        true
                    })?;
                    let full = events.len() >= BATCH;
                    Ok((events, last, full))
                })
                .await
                .map_err(|e| ClusterError::Internal(e.to_string()))??
            };
            self.next = last + 1;
            if full {
                return Ok(events);
            }
            // Caught up: everything with ts <= upto has been read.
            let tick_due = requested || self.last_tick.is_none_or(|t| t.elapsed() >= self.tick_every);
            if !events.is_empty() || tick_due {
                let mut out = events;
                if tick_due || !out.is_empty() {
                    let mut tick = base_event(
                        &self.node,
                        &self.group,
                        &self.collection.schema().name,
                        self.collection.id,
                        self.shard as u32,
                        upto,
                        self.term.to_stream(last),
                    );
                    tick.body = Some(rp::change_event::Body::Tick(rp::TimeTick { leader_ts: self.node.clock.peek() }));
                    tick.epoch_base = self.epoch_base;
                    out.push(tick);
                    self.last_tick = Some(Instant::now());
                }
                return Ok(out);
            }
            let wait = self.tick_every.saturating_sub(self.last_tick.map_or(Duration::ZERO, |t| t.elapsed())).max(Duration::from_millis(1));
            if self.next <= *self.acked.borrow_and_update() {
                // This shard has durable records the collection-wide bound held back: another
                // shard's part of a multi-shard write is still being fsynced, and this shard's
                // own watch will not fire for it. Wait for the collection instead.
                let now = self.node.clock.peek();
                // A local feed of a following shard waits for another shard's local fsync,
                // which its serviceable ts (the leader's stream) does not wait for: look again
                // shortly instead.
                let short = self.positions == Positions::Local && self.collection.shards()[self.shard].is_following();
                tokio::select! {
                    _ = self.collection.wait_serviceable(&self.node.clock, now, Instant::now() + wait), if !short => {}
                    _ = tokio::time::sleep(wait.min(Duration::from_millis(2))), if short => {}
                    r = self.tick_requests.changed() => self.tick_wanted = r.is_ok(),
                }
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.acked.changed() => {}
                    r = self.tick_requests.changed() => self.tick_wanted = r.is_ok(),
                }
            }
        }
    }
}

/// The DDL log as a feed (no ticks: DDL carries no serviceable ts).
pub struct DdlFeed {
    node: Arc<Node>,
    group: String,
    next: Lsn,
    term: crate::term::StreamTerm,
    poll: Duration,
}

impl DdlFeed {
    /// A feed from stream position `from`: `ClusterError::Truncated` when it belongs to an
    /// earlier leader's term (this node's DDL log cannot serve it).
    pub fn new(node: Arc<Node>, from: Lsn, group: &str, poll: Duration) -> Result<DdlFeed> {
        let term = node.ddl_term();
        term.check_servable(from).map_err(|first| ClusterError::Truncated { from, first })?;
        Ok(DdlFeed { group: group.to_string(), next: term.to_local(from.max(1)).max(1), term, node, poll })
    }
}

impl Feed for DdlFeed {
    fn next_lsn(&self) -> Lsn {
        self.next
    }

    async fn next_batch(&mut self) -> Result<Vec<rp::ChangeEvent>> {
        loop {
            let mut out = Vec::new();
            let node = self.node.clone();
            let group = self.group.clone();
            let (next, term) = (self.next, self.term);
            let (events, last) = tokio::task::spawn_blocking(move || -> Result<_> {
                let mut last = next.saturating_sub(1);
                node.read_ddl(next, |lsn, rec| {
                    last = lsn;
                    out.push(ddl_event(&node, &group, term.to_stream(lsn), rec));
                    true
                })?;
                Ok((out, last))
            })
            .await
            .map_err(|e| ClusterError::Internal(e.to_string()))??;
            self.next = last + 1;
            if !events.is_empty() {
                return Ok(events);
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

pub fn ddl_event(node: &Node, group: &str, lsn: Lsn, rec: st::DdlRecord) -> rp::ChangeEvent {
    let mut ev = base_event(node, group, &rec.collection, rec.collection_id, 0, rec.ts, lsn);
    ev.body = match rec.op {
        Some(st::ddl_record::Op::Create(schema)) => {
            Some(rp::change_event::Body::CreateCollection(rp::CreateCollection { schema: Some(schema) }))
        }
        Some(st::ddl_record::Op::Drop(_)) => Some(rp::change_event::Body::DropCollection(rp::DropCollection {})),
        Some(st::ddl_record::Op::SetIndex(spec)) => Some(rp::change_event::Body::SetIndex(rp::SetIndex { index: Some(spec) })),
        None => None,
    };
    ev
}

/// A DDL event back into the record an alternative logs.
pub fn ddl_record(ev: &rp::ChangeEvent) -> Result<st::DdlRecord> {
    use rp::change_event::Body;
    let op = match &ev.body {
        Some(Body::CreateCollection(c)) => {
            st::ddl_record::Op::Create(c.schema.clone().ok_or_else(|| ClusterError::invalid("create_collection event without a schema"))?)
        }
        Some(Body::DropCollection(_)) => st::ddl_record::Op::Drop(st::DropOp {}),
        Some(Body::SetIndex(s)) => {
            st::ddl_record::Op::SetIndex(s.index.ok_or_else(|| ClusterError::invalid("set_index event without an index"))?)
        }
        other => return Err(ClusterError::invalid(format!("not a DDL event: {other:?}"))),
    };
    Ok(st::DdlRecord { ts: ev.ts, collection: ev.collection.clone(), collection_id: ev.collection_id, op: Some(op), source_lsn: ev.lsn })
}
