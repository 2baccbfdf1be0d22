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

#[derive(Clone)]
pub struct ReplicationService {
    node: Arc<Node>,
    group: String,
    tick: Duration,
}

impl ReplicationService {
    pub fn new(node: Arc<Node>, group: String, tick: Duration) -> Self {
        ReplicationService { node, group, tick }
    }

    fn leading(&self) -> Result<(), Status> {
        let role = self.node.role();
        if role == Role::Leading {
            Ok(())
        } else {
            Err(ClusterError::NotLeader { cluster: self.node.opts.cluster_id.clone(), role: role.to_string(), leader: self.node.leader() }
                .into())
        }
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// Streams a feed into a channel until the receiver goes away or the feed fails (the error is
/// the stream's last item). `before` runs before each wait with the next position.
fn pump(mut feed: impl Feed, mut before: impl FnMut(u64) + Send + 'static) -> tokio::sync::mpsc::Receiver<Result<rp::ChangeEvent, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            before(feed.next_lsn());
            let batch = feed.next_batch().await;
            let stop = batch.is_err();
            for item in batch.map_or_else(|e| vec![Err(Status::from(e))], |evs| evs.into_iter().map(Ok).collect()) {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            if stop {
                return;
            }
        }
    });
    rx
}

#[tonic::async_trait]
impl rp::replication_server::Replication for ReplicationService {
    type SubscribeStream = Stream<rp::ChangeEvent>;
    type SnapshotStream = Stream<rp::SnapshotChunk>;

    async fn subscribe(&self, req: Request<rp::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = req.into_inner();
        let rx = if r.ddl {
            pump(DdlFeed::new(self.node.clone(), r.from_lsn, &self.group, Duration::from_millis(50)), |_| {})
        } else {
            let c = self
                .node
                .collection_by_id(r.collection_id)
                .ok_or_else(|| ClusterError::CollectionNotFound(format!("id {}", r.collection_id)))?;
            let feed = ShardFeed::new(self.node.clone(), c.clone(), r.shard as usize, r.from_lsn, &self.group, self.tick)?;
            let subscriber = if r.subscriber.is_empty() { "anonymous".to_string() } else { r.subscriber.clone() };
            let shard = c.shards()[r.shard as usize].clone();
            // The lease keeps the WAL from where this subscriber is.
            pump(feed, move |next| shard.hold(&subscriber, next))
        };
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn end_lsn(&self, req: Request<rp::SubscribeRequest>) -> Result<Response<rp::EndLsnResponse>, Status> {
        let r = req.into_inner();
        let lsn = if r.ddl {
            self.node.ddl_last_lsn()
        } else {
            let c = self
                .node
                .collection_by_id(r.collection_id)
                .ok_or_else(|| ClusterError::CollectionNotFound(format!("id {}", r.collection_id)))?;
            let sh = c.shards().get(r.shard as usize).ok_or_else(|| ClusterError::invalid(format!("no shard {}", r.shard)))?;
            *sh.acked_watch().borrow()
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
        let schema = c.schema();
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
                    lsn: 0,
                };
                let _ = tx.blocking_send(Ok(chunk));
            });
            let _ = tx.blocking_send(Ok(rp::SnapshotChunk { snapshot_ts: snap, rows: None, insert_ts: Vec::new(), done: true, lsn }));
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn leader_ts(&self, _req: Request<rp::LeaderTsRequest>) -> Result<Response<rp::LeaderTsResponse>, Status> {
        self.leading()?;
        Ok(Response::new(rp::LeaderTsResponse { ts: self.node.clock.peek(), epoch: self.node.epoch() }))
    }
}
