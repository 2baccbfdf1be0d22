//! The leader side of broker transports: publishes the leader's change feeds (the DDL log and
//! every shard's WAL) in order, and records what the transport acknowledged so the `exported`
//! ack policy can wait on it. Not used with the direct transport, whose log is the leader's WAL.
//!
//! Restart-safe without a stored position: each stream resumes after the transport's end
//! (`end_lsn`); a crash between publish and that check can only re-publish, and subscribers
//! skip positions they already applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tandem_cluster::collection::Collection;
use tandem_cluster::feed::{DdlFeed, Feed, Positions, ShardFeed};
use tandem_cluster::node::Node;
use tandem_proto::replication::v1 as rp;
use tokio_util::sync::CancellationToken;

use crate::error::ExportError;
use crate::transport::{StreamId, Transport};

const BACKOFF: Duration = Duration::from_millis(200);

pub struct Publisher {
    node: Arc<Node>,
    transport: Arc<dyn Transport>,
    group: String,
    tick: Duration,
    cancel: CancellationToken,
    running: Mutex<HashMap<u64, CancellationToken>>,
}

impl Publisher {
    pub fn start(node: Arc<Node>, transport: Arc<dyn Transport>, group: &str, tick: Duration) -> Arc<Publisher> {
        node.set_exporting(true);
        let p = Arc::new(Publisher {
            node,
            transport,
            group: group.to_string(),
            tick,
            cancel: CancellationToken::new(),
            running: Mutex::new(HashMap::new()),
        });
        let me = p.clone();
        tokio::spawn(async move { me.run_ddl().await });
        p
    }

    /// Stops publishing. Writes still wait for the transport (they time out unacknowledged
    /// rather than being acknowledged without being exported).
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    async fn run_ddl(self: Arc<Self>) {
        // Existing collections first: their streams may be behind.
        for c in self.node.collections() {
            self.start_collection(c).await;
        }
        let from = loop {
            let end = match self.transport.ensure_stream(&StreamId::Ddl, 1).await {
                Ok(()) => self.transport.end_lsn(&StreamId::Ddl).await,
                Err(e) => Err(e),
            };
            match end {
                Ok(l) => {
                    let l = self.node.ddl_resume_end(l);
                    self.node.set_ddl_exported(l);
                    break l + 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ddl stream end unknown; retrying");
                    if self.sleep_or_stop(BACKOFF).await {
                        return;
                    }
                }
            }
        };
        let mut feed = loop {
            match DdlFeed::new(self.node.clone(), from, &self.group, Duration::from_millis(50)) {
                Ok(f) => break f,
                Err(e) => {
                    // The stream ends inside an earlier leader's term this node cannot serve:
                    // it was promoted without having applied the whole DDL stream.
                    tracing::error!(error = %e, "cannot publish the ddl log from the stream's end");
                    if self.sleep_or_stop(BACKOFF * 10).await {
                        return;
                    }
                }
            }
        };
        loop {
            let batch = tokio::select! {
                _ = self.cancel.cancelled() => return,
                b = feed.next_batch() => b,
            };
            let events = match batch {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "reading the ddl log failed");
                    if self.sleep_or_stop(BACKOFF).await {
                        return;
                    }
                    continue;
                }
            };
            for ev in &events {
                if let Some(rp::change_event::Body::CreateCollection(_)) = ev.body
                    && let Some(c) = self.node.collection_by_id(ev.collection_id)
                {
                    // The shard stream must exist before subscribers learn of the collection.
                    self.start_collection(c).await;
                }
                if let Some(rp::change_event::Body::DropCollection(_)) = ev.body
                    && let Some(t) = self.running.lock().remove(&ev.collection_id)
                {
                    t.cancel();
                }
            }
            let last = events.iter().map(|e| e.lsn).max().unwrap_or(0);
            while let Err(e) = self.transport.publish(&StreamId::Ddl, events.clone()).await {
                tracing::warn!(error = %e, "publishing ddl failed; retrying");
                if self.sleep_or_stop(BACKOFF).await {
                    return;
                }
            }
            self.node.set_ddl_exported(last);
        }
    }

    async fn start_collection(self: &Arc<Self>, c: Arc<Collection>) {
        if self.running.lock().contains_key(&c.id) {
            return;
        }
        let shards = c.shards().len() as u32;
        while let Err(e) = self.transport.ensure_stream(&StreamId::Shard { collection_id: c.id, shard: 0 }, shards).await {
            tracing::warn!(error = %e, collection = c.id, "creating the collection's stream failed; retrying");
            if self.sleep_or_stop(BACKOFF).await {
                return;
            }
        }
        // Learn where every shard's stream ends before the collection's DDL event is published
        // (and so before CreateCollection is acknowledged): its first writes then only wait
        // for their own publish.
        let mut ends = Vec::with_capacity(c.shards().len());
        for shard in 0..c.shards().len() {
            ends.push(self.stream_end(&StreamId::Shard { collection_id: c.id, shard: shard as u32 }).await);
        }
        let token = self.cancel.child_token();
        self.running.lock().insert(c.id, token.clone());
        tracing::debug!(collection = %c.schema().name, "publishing the collection's shards");
        for (shard, end) in ends.into_iter().enumerate() {
            let me = self.clone();
            let (c, token) = (c.clone(), token.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = me.run_shard(c, shard, end) => {}
                }
            });
        }
    }

    /// The stream's end position, retried until known (or 0 when stopping).
    async fn stream_end(&self, stream: &StreamId) -> u64 {
        loop {
            match self.transport.end_lsn(stream).await {
                Ok(l) => return l,
                Err(e) => {
                    tracing::warn!(error = %e, %stream, "stream end unknown; retrying");
                    if self.sleep_or_stop(BACKOFF).await {
                        return 0;
                    }
                }
            }
        }
    }

    async fn run_shard(self: Arc<Self>, c: Arc<Collection>, shard: usize, first_end: u64) {
        let stream = StreamId::Shard { collection_id: c.id, shard: shard as u32 };
        let sh = c.shards()[shard].clone();
        let mut known_end = Some(first_end);
        loop {
            let end = match known_end.take() {
                Some(e) => e,
                None => self.stream_end(&stream).await,
            };
            let end = sh.resume_end(end);
            // `end` and the events' positions are the stream's; the WAL's are local (they
            // differ on a promoted leader, see tandem_cluster::term).
            let term = sh.term();
            sh.set_exported(end);
            // Keep the WAL for ourselves like any subscriber.
            sh.hold("publisher", term.to_local(end) + 1);
            // A log that no longer holds what the topic lacks (export turned on late, or a
            // publisher away past retention): publish from what is there; subscribers that need
            // older changes bootstrap from a snapshot.
            let from = (end + 1).max(term.to_stream(sh.first_lsn()).min(term.to_stream(sh.last_lsn()) + 1));
            let mut feed = match ShardFeed::new(self.node.clone(), c.clone(), shard, from, &self.group, self.tick, Positions::Stream) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, %stream, "cannot read the shard's changes");
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            };
            loop {
                let events = match feed.next_batch().await {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, %stream, "reading changes failed");
                        break;
                    }
                };
                let last = events.iter().filter(|e| !matches!(e.body, Some(rp::change_event::Body::Tick(_)))).map(|e| e.lsn).max();
                let top_ts = events.iter().map(|e| e.ts).max().unwrap_or(0);
                // Failpoint: the publish fails before the batch is sent, or after the broker
                // took it (the resume from the stream's end must not publish it twice).
                let injected = tandem_cluster::failpoint::fired("publisher::publish");
                let failed = |message: &str| ExportError::Unavailable { backend: "failpoint", message: message.into() };
                let sent = match injected.as_deref() {
                    Some("before") => Err(failed("publish failed before sending")),
                    Some("after") => {
                        self.transport.publish(&stream, events).await.and(Err(failed("publish failed after the broker took it")))
                    }
                    _ => self.transport.publish(&stream, events).await,
                };
                if let Err(e) = sent {
                    tracing::warn!(error = %e, %stream, "publish failed; resuming from the stream's end");
                    tokio::time::sleep(BACKOFF).await;
                    break;
                }
                if let Some(l) = last {
                    sh.set_exported(l);
                    sh.hold("publisher", term.to_local(l) + 1);
                }
                tandem_cluster::replication::record_exported_ts(&self.node.opts.cluster_id, &c.schema().name, shard, top_ts);
            }
            if c.is_dropped() {
                return;
            }
        }
    }

    /// Sleeps; true when stopped meanwhile.
    async fn sleep_or_stop(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}
