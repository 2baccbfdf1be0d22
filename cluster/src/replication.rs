//! The `tandem.replication.v1.Replication` service a cluster serves: its change feeds as
//! server-streaming RPCs (the direct transport: an alternative pulls the leader's log, as
//! Elasticsearch CCR pulls from its leader), shard snapshots for bootstrapping, and the leader's
//! clock for STRONG reads on alternatives.

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::replication::v1 as rp;
use tandem_proto::storage::v1 as st;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::ClusterError;
use crate::feed::{DdlFeed, Feed, ShardFeed};
use crate::node::Node;
use crate::role::Role;
use crate::schema::row_to_payload;

pub const SNAPSHOT_CHUNK_ROWS: usize = 1024;

/// How often the leader records its replication metrics (leases).
const REPORT_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct ReplicationService {
    node: Arc<Node>,
    group: String,
    tick: Duration,
    reporting: Arc<std::sync::atomic::AtomicBool>,
}

impl ReplicationService {
    pub fn new(node: Arc<Node>, group: String, tick: Duration) -> Self {
        ReplicationService { node, group, tick, reporting: Default::default() }
    }

    /// Records the leader's replication metrics every second from the first subscription on
    /// (leases only exist once someone subscribes); ends with the node.
    fn start_reporter(&self) {
        if self.reporting.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let node = Arc::downgrade(&self.node);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REPORT_EVERY);
            loop {
                every.tick().await;
                let Some(node) = node.upgrade() else { return };
                record_leader_metrics(&node);
            }
        });
    }

    fn leading(&self) -> Result<(), Status> {
        let role = self.node.role();
        if role == Role::Leading {
            Ok(())
        } else {
            Err(ClusterError::NotLeader { cluster: self.node.opts.cluster_id.clone(), role, leader: self.node.leader() }.into())
        }
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// Streams a feed into a channel until the receiver goes away or the feed fails (the error is
/// the stream's last item). `before` runs before each wait with the next position; `sent`
/// after each batch with the highest ts in it.
fn pump(
    mut feed: impl Feed,
    mut before: impl FnMut(u64) + Send + 'static,
    mut sent: impl FnMut(u64) + Send + 'static,
) -> tokio::sync::mpsc::Receiver<Result<rp::ChangeEvent, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            before(feed.next_lsn());
            let batch = feed.next_batch().await;
            let stop = batch.is_err();
            let top_ts = batch.as_ref().map_or(0, |evs| evs.iter().map(|e| e.ts).max().unwrap_or(0));
            for item in batch.map_or_else(|e| vec![Err(Status::from(e))], |evs| evs.into_iter().map(Ok).collect()) {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            if stop {
                return;
            }
            sent(top_ts);
        }
    });
    rx
}

/// Leader-side replication metrics of every shard: live retention leases, lease expiries.
/// (`tandem_replication_exported_ts` is recorded where events leave: the direct stream, the
/// broker publisher.)
pub fn record_leader_metrics(node: &Node) {
    let cluster = node.opts.cluster_id.clone();
    for c in node.collections() {
        let name = c.schema().name.clone();
        for (i, sh) in c.shards().iter().enumerate() {
            let labels = [("cluster", cluster.clone()), ("collection", name.clone()), ("shard", i.to_string())];
            metrics::gauge!("tandem_replication_leases", &labels).set(sh.leases().len() as f64);
            metrics::counter!("tandem_replication_lease_expiries_total", &labels).absolute(sh.lease_expiries());
        }
    }
}

/// Sets `tandem_replication_exported_ts` of one shard stream: every change with ts <= it has
/// left the leader (sent to a direct subscriber, or acknowledged by the broker).
pub fn record_exported_ts(cluster: &str, collection: &str, shard: usize, ts: u64) {
    let labels = [("cluster", cluster.to_string()), ("collection", collection.to_string()), ("shard", shard.to_string())];
    metrics::gauge!("tandem_replication_exported_ts", &labels).set(ts as f64);
}

#[tonic::async_trait]
impl rp::replication_server::Replication for ReplicationService {
    type SubscribeStream = Stream<rp::ChangeEvent>;
    type SnapshotStream = Stream<rp::SnapshotChunk>;

    async fn subscribe(&self, req: Request<rp::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = req.into_inner();
        let rx = if r.ddl {
            pump(DdlFeed::new(self.node.clone(), r.from_lsn, &self.group, Duration::from_millis(50))?, |_| {}, |_| {})
        } else {
            let c = self
                .node
                .collection_by_id(r.collection_id)
                .ok_or_else(|| ClusterError::CollectionNotFound(format!("id {}", r.collection_id)))?;
            let feed = ShardFeed::new(self.node.clone(), c.clone(), r.shard as usize, r.from_lsn, &self.group, self.tick)?;
            let subscriber = if r.subscriber.is_empty() { "anonymous".to_string() } else { r.subscriber.clone() };
            let shard = c.shards()[r.shard as usize].clone();
            self.start_reporter();
            let (cluster, name, index) = (self.node.opts.cluster_id.clone(), c.schema().name.clone(), r.shard as usize);
            // The lease keeps the WAL from where this subscriber is.
            pump(feed, move |next| shard.hold(&subscriber, next), move |ts| record_exported_ts(&cluster, &name, index, ts))
        };
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn end_lsn(&self, req: Request<rp::SubscribeRequest>) -> Result<Response<rp::EndLsnResponse>, Status> {
        let r = req.into_inner();
        let lsn = if r.ddl {
            self.node.ddl_stream_end()
        } else {
            let c = self
                .node
                .collection_by_id(r.collection_id)
                .ok_or_else(|| ClusterError::CollectionNotFound(format!("id {}", r.collection_id)))?;
            let sh = c.shards().get(r.shard as usize).ok_or_else(|| ClusterError::invalid(format!("no shard {}", r.shard)))?;
            sh.acked_stream_lsn()
        };
        Ok(Response::new(rp::EndLsnResponse { lsn }))
    }

    async fn snapshot(&self, req: Request<rp::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        self.leading()?;
        let r = req.into_inner();
        let c = self
            .node
            .collection_by_id(r.collection_id)
            .ok_or_else(|| ClusterError::CollectionNotFound(format!("id {}", r.collection_id)))?;
        let shard = c
            .shards()
            .get(r.shard as usize)
            .cloned()
            .ok_or_else(|| ClusterError::invalid(format!("collection {:?} has no shard {}", c.schema().name, r.shard)))?;
        // The collection-wide serviceable ts: every part of every write at or below it is durable
        // on every shard (see feed.rs), and the position matching it is known.
        let snap = c.serviceable_ts(&self.node.clock);
        let lsn = shard
            .lsn_at(snap)
            .ok_or_else(|| ClusterError::Unavailable("the shard is too busy to pick a snapshot position; retry".into()))?;
        let subscriber = if r.subscriber.is_empty() { "anonymous".to_string() } else { r.subscriber };
        shard.hold(&subscriber, lsn + 1);
        self.start_reporter();
        let schema = c.schema();
        let total_rows = shard.stats().live_rows;
        let position = shard.term().to_stream(lsn);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let with_payloads = !schema.fields.is_empty();
            shard.snapshot_rows(snap, SNAPSHOT_CHUNK_ROWS, |ids, vectors, rows, insert_ts| {
                let payloads = if with_payloads { rows.iter().map(|r| row_to_payload(&schema, r)).collect() } else { Vec::new() };
                let chunk = rp::SnapshotChunk {
                    snapshot_ts: snap,
                    rows: Some(st::RowBatch { ids, vectors, payloads, insert_ts: Vec::new() }),
                    insert_ts,
                    done: false,
                    lsn: position,
                    total_rows,
                };
                let _ = tx.blocking_send(Ok(chunk));
            });
            let _ = tx.blocking_send(Ok(rp::SnapshotChunk {
                snapshot_ts: snap,
                rows: None,
                insert_ts: Vec::new(),
                done: true,
                lsn: position,
                total_rows,
            }));
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn switchover(&self, req: Request<rp::SwitchoverRequest>) -> Result<Response<rp::SwitchoverResponse>, Status> {
        self.leading()?;
        let deadline = crate::service::deadline(&req, Duration::from_secs(60));
        let to = req.into_inner().to;
        if to.trim().is_empty() {
            return Err(ClusterError::invalid("switchover needs `to`: the id of the cluster to hand leadership to").into());
        }
        let (leader, endpoint, epoch) = self.node.switchover(&to, deadline).await?;
        Ok(Response::new(rp::SwitchoverResponse { leader, endpoint, epoch }))
    }

    async fn leader_ts(&self, _req: Request<rp::LeaderTsRequest>) -> Result<Response<rp::LeaderTsResponse>, Status> {
        self.leading()?;
        let ts = self.node.clock.peek();
        // The caller waits for its stream to reach `ts`: on an idle shard that takes a tick, so
        // make the feeds tick now instead of at their next interval. After `peek`, so every
        // tick sent for this request covers `ts`.
        self.node.request_ticks();
        self.start_reporter();
        Ok(Response::new(rp::LeaderTsResponse { ts, epoch: self.node.epoch() }))
    }
}
