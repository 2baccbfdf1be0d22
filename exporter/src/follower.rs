//! The alternative side: subscribes to the leader's streams through a `Transport` and applies
//! every change to the local node, idempotently and in order per stream.
//!
//! ```text
//!  DDL task:    subscribe(Ddl) ─► create / drop / set index ─► start / stop shard tasks
//!  shard task:  position = shard.source_lsn() + 1
//!               subscribe(shard stream, position) ─► apply (logged with its position: apply
//!               and checkpoint are one atomic step) ─► tick: serviceable ts advances
//!               Truncated (the log no longer holds the position) ─► bootstrap from a snapshot
//!  poison:      an event that cannot be decoded or applied is quarantined (file + count +
//!               loud log), then the shard halts (default) or skips it — never a crash loop
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use tandem_cluster::collection::Collection;
use tandem_cluster::node::{LeaderClock, Node};
use tandem_cluster::shard::{ShardOp, op_from_record};
use tandem_cluster::{ClusterError, feed};
use tandem_proto::replication::v1 as rp;
use tandem_proto::replication::v1::replication_client::ReplicationClient;
use tandem_proto::storage::v1 as st;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::error::{ExportError, Result};
use crate::transport::{StreamId, Transport};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPoison {
    Halt,
    Skip,
}

#[derive(Debug, Clone)]
pub struct FollowerConfig {
    /// Names this alternative to the leader (retention leases).
    pub subscriber: String,
    pub on_poison: OnPoison,
    pub quarantine_dir: PathBuf,
}

pub struct Follower {
    node: Arc<Node>,
    transport: Arc<dyn Transport>,
    leader: ReplicationClient<Channel>,
    cfg: FollowerConfig,
    cancel: CancellationToken,
    shards: Mutex<HashMap<u64, CancellationToken>>,
    /// Highest leader epoch seen; events from older epochs are rejected (fencing).
    epoch: AtomicU64,
    pub poisoned: AtomicU64,
    pub applied: AtomicU64,
    pub bootstraps: AtomicU64,
}

struct DirectClock(ReplicationClient<Channel>);

impl LeaderClock for DirectClock {
    fn leader_ts(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = tandem_cluster::Result<u64>> + Send + '_>> {
        Box::pin(async move {
            let r = self
                .0
                .clone()
                .leader_ts(rp::LeaderTsRequest {})
                .await
                .map_err(|s| ClusterError::Unavailable(format!("cannot ask the leader for its clock: {}", s.message())))?;
            Ok(r.into_inner().ts)
        })
    }
}

const BACKOFF: Duration = Duration::from_millis(200);

impl Follower {
    /// Starts following: the DDL stream, then every collection's shards.
    pub fn start(node: Arc<Node>, transport: Arc<dyn Transport>, leader: ReplicationClient<Channel>, cfg: FollowerConfig) -> Arc<Follower> {
        node.set_leader_clock(Arc::new(DirectClock(leader.clone())));
        let f = Arc::new(Follower {
            node,
            transport,
            leader,
            cfg,
            cancel: CancellationToken::new(),
            shards: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            poisoned: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            bootstraps: AtomicU64::new(0),
        });
        for c in f.node.collections() {
            f.start_collection(&c);
        }
        let me = f.clone();
        tokio::spawn(async move { me.run_ddl().await });
        f
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }

    fn start_collection(self: &Arc<Self>, c: &Arc<Collection>) {
        let token = self.cancel.child_token();
        if let Some(old) = self.shards.lock().insert(c.id, token.clone()) {
            old.cancel();
        }
        self.node.set_replication_state(c.id, "following");
        for shard in 0..c.shards().len() {
            let me = self.clone();
            let c = c.clone();
            let token = token.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = me.run_shard(c, shard) => {}
                }
            });
        }
    }

    fn check_epoch(&self, stream: &StreamId, ev: &rp::ChangeEvent) -> Result<()> {
        let seen = self.epoch.fetch_max(ev.epoch, Ordering::AcqRel);
        if ev.epoch < seen {
            return Err(ExportError::StaleEpoch { stream: stream.to_string(), got: ev.epoch, seen });
        }
        Ok(())
    }

    async fn run_ddl(self: Arc<Self>) {
        let stream_id = StreamId::Ddl;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let from = self.node.ddl_source_lsn() + 1;
            let mut stream = match self.transport.subscribe(&stream_id, from).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "ddl subscribe failed; retrying");
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            };
            loop {
                let item = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    item = stream.next() => item,
                };
                let Some(item) = item else { break };
                let ev = match item.and_then(|ev| self.check_epoch(&stream_id, &ev).map(|_| ev)) {
                    Ok(ev) => ev,
                    Err(e) if e.is_transient() => break,
                    Err(e) => {
                        self.quarantine(&stream_id, 0, &e, None);
                        tracing::error!(error = %e, "ddl replication halted");
                        return;
                    }
                };
                if matches!(ev.body, Some(rp::change_event::Body::Tick(_)) | None) {
                    continue;
                }
                let rec = match feed::ddl_record(&ev) {
                    Ok(r) => r,
                    Err(e) => {
                        self.quarantine(&stream_id, ev.lsn, &e.into(), Some(&ev));
                        return;
                    }
                };
                let node = self.node.clone();
                let lsn = ev.lsn;
                let res = tokio::task::spawn_blocking(move || node.apply_replicated_ddl(lsn, rec)).await;
                match res {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, lsn, "applying a ddl change failed; retrying");
                        tokio::time::sleep(BACKOFF).await;
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "ddl apply task failed");
                        break;
                    }
                }
                match &ev.body {
                    Some(rp::change_event::Body::CreateCollection(_)) => {
                        if let Some(c) = self.node.collection_by_id(ev.collection_id) {
                            self.start_collection(&c);
                        }
                    }
                    Some(rp::change_event::Body::DropCollection(_)) => {
                        if let Some(t) = self.shards.lock().remove(&ev.collection_id) {
                            t.cancel();
                        }
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(BACKOFF).await;
        }
    }

    async fn run_shard(self: Arc<Self>, c: Arc<Collection>, shard: usize) {
        let stream_id = StreamId::Shard { collection_id: c.id, shard: shard as u32 };
        let sh = c.shards()[shard].clone();
        loop {
            if c.is_dropped() {
                return;
            }
            // An interrupted bootstrap leaves rows but no position: start it over.
            if sh.source_lsn() == 0 && sh.stats().live_rows > 0 {
                if let Err(e) = self.bootstrap(&c, shard).await {
                    tracing::warn!(error = %e, %stream_id, "bootstrap failed; retrying");
                    tokio::time::sleep(BACKOFF).await;
                }
                continue;
            }
            let from = sh.source_lsn() + 1;
            let mut stream = match self.transport.subscribe(&stream_id, from).await {
                Ok(s) => s,
                Err(ExportError::Truncated { .. }) => {
                    tracing::info!(%stream_id, from, "the log no longer holds our position: bootstrapping from a snapshot");
                    if let Err(e) = self.bootstrap(&c, shard).await {
                        tracing::warn!(error = %e, %stream_id, "bootstrap failed; retrying");
                        tokio::time::sleep(BACKOFF).await;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, %stream_id, "subscribe failed; retrying");
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            };
            while let Some(item) = stream.next().await {
                let ev = match item.and_then(|ev| self.check_epoch(&stream_id, &ev).map(|_| ev)) {
                    Ok(ev) => ev,
                    Err(ExportError::Truncated { .. }) => {
                        if let Err(e) = self.bootstrap(&c, shard).await {
                            tracing::warn!(error = %e, %stream_id, "bootstrap failed; retrying");
                        }
                        break;
                    }
                    Err(e) if e.is_transient() => break,
                    Err(e) => {
                        let position = match &e {
                            ExportError::Malformed { position, .. } => *position,
                            _ => sh.source_lsn() + 1,
                        };
                        if !self.poison(&c, shard, &stream_id, position, &e, None).await {
                            return;
                        }
                        continue;
                    }
                };
                match self.apply(&c, shard, &ev).await {
                    Ok(()) => {}
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, %stream_id, "apply failed; retrying");
                        break;
                    }
                    Err(e) => {
                        if !self.poison(&c, shard, &stream_id, ev.lsn, &e, Some(&ev)).await {
                            return;
                        }
                    }
                }
            }
            tokio::time::sleep(BACKOFF).await;
        }
    }

    async fn apply(&self, c: &Arc<Collection>, shard: usize, ev: &rp::ChangeEvent) -> Result<()> {
        use rp::change_event::Body;
        let sh = &c.shards()[shard];
        let op = match &ev.body {
            Some(Body::Tick(_)) => {
                // The stream is ordered: every change up to the tick's position has been applied.
                sh.follow_to(ev.ts);
                return Ok(());
            }
            Some(Body::Insert(b)) => st::wal_record::Op::Insert(b.clone()),
            Some(Body::Upsert(b)) => st::wal_record::Op::Upsert(b.clone()),
            Some(Body::Delete(d)) => st::wal_record::Op::Delete(d.clone()),
            other => {
                return Err(ExportError::Malformed {
                    stream: format!("c{}/s{shard}", c.id),
                    position: ev.lsn,
                    message: format!("not a data event: {other:?}"),
                });
            }
        };
        let schema = c.schema();
        let op = op_from_record(&schema, op)
            .map_err(|e| ExportError::Malformed { stream: format!("c{}/s{shard}", c.id), position: ev.lsn, message: e.to_string() })?
            .expect("data op");
        let (node, c2, lsn, ts) = (self.node.clone(), c.clone(), ev.lsn, ev.ts);
        let applied = tokio::task::spawn_blocking(move || node_apply(&node, &c2, shard, lsn, ts, op))
            .await
            .map_err(|e| ExportError::Cluster(ClusterError::Internal(e.to_string())))??;
        if applied {
            self.applied.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Loads a snapshot of one shard from the leader into a wiped local shard, then records the
    /// matching position, so the stream continues with no gap and no duplicate.
    async fn bootstrap(&self, c: &Arc<Collection>, shard: usize) -> Result<()> {
        self.node.set_replication_state(c.id, "bootstrapping");
        let sh = c.shards()[shard].clone();
        tokio::task::spawn_blocking(move || sh.wipe()).await.map_err(|e| ExportError::Cluster(ClusterError::Internal(e.to_string())))??;
        let req = rp::SnapshotRequest { collection_id: c.id, shard: shard as u32, subscriber: self.cfg.subscriber.clone() };
        let mut stream = self
            .leader
            .clone()
            .snapshot(req)
            .await
            .map_err(|s| ExportError::Unavailable { backend: "snapshot", message: s.message().to_string() })?
            .into_inner();
        let mut bytes = 0usize;
        let started = std::time::Instant::now();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| ExportError::Unavailable { backend: "snapshot", message: s.message().to_string() })?;
            if chunk.done {
                // The marker: an empty delete at the snapshot's position and ts.
                let (node, c2) = (self.node.clone(), c.clone());
                let (lsn, ts) = (chunk.lsn.max(1), chunk.snapshot_ts);
                tokio::task::spawn_blocking(move || node_apply(&node, &c2, shard, lsn, ts, ShardOp::Delete { ids: vec![] }))
                    .await
                    .map_err(|e| ExportError::Cluster(ClusterError::Internal(e.to_string())))??;
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                tracing::info!(collection = %c.schema().name, shard, rows_mb = bytes as f64 / 1e6, mb_per_s = bytes as f64 / 1e6 / secs, "bootstrapped from a snapshot");
                self.node.set_replication_state(c.id, "following");
                self.bootstraps.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            let Some(mut rows) = chunk.rows else { continue };
            bytes += rows.vectors.len() * 4 + rows.ids.len() * 16;
            rows.insert_ts = chunk.insert_ts;
            let schema = c.schema();
            let op = op_from_record(&schema, st::wal_record::Op::Upsert(rows))?.expect("data op");
            let (node, c2, ts) = (self.node.clone(), c.clone(), chunk.snapshot_ts);
            tokio::task::spawn_blocking(move || {
                let mut jobs = Vec::new();
                let r = c2.load_snapshot_rows(&node.clock, shard, ts, op, &mut jobs);
                node.enqueue(&c2, jobs);
                r
            })
            .await
            .map_err(|e| ExportError::Cluster(ClusterError::Internal(e.to_string())))??;
        }
        Err(ExportError::Unavailable { backend: "snapshot", message: "the snapshot stream ended early".into() })
    }

    /// Quarantines a poison event; returns whether the shard goes on (skip) or halts.
    async fn poison(
        &self,
        c: &Arc<Collection>,
        shard: usize,
        stream: &StreamId,
        position: u64,
        e: &ExportError,
        ev: Option<&rp::ChangeEvent>,
    ) -> bool {
        self.quarantine(stream, position, e, ev);
        match self.cfg.on_poison {
            OnPoison::Halt => {
                self.node.set_replication_state(c.id, format!("halted: {e}"));
                tracing::error!(%stream, position, error = %e, "replication of this shard is halted on a poison event (quarantined)");
                false
            }
            OnPoison::Skip => {
                // Step over it durably, so a restart does not meet it again.
                let (node, c2) = (self.node.clone(), c.clone());
                let ts = c.shards()[shard].serviceable_ts(&self.node.clock);
                let _ =
                    tokio::task::spawn_blocking(move || node_apply(&node, &c2, shard, position, ts, ShardOp::Delete { ids: vec![] })).await;
                tracing::error!(%stream, position, error = %e, "skipped a poison event (quarantined)");
                true
            }
        }
    }

    fn quarantine(&self, stream: &StreamId, position: u64, e: &ExportError, ev: Option<&rp::ChangeEvent>) {
        self.poisoned.fetch_add(1, Ordering::Relaxed);
        let _ = std::fs::create_dir_all(&self.cfg.quarantine_dir);
        let name = format!("{}-{position}.txt", stream.to_string().replace('/', "-"));
        let body = format!("stream: {stream}\nposition: {position}\nerror: {e}\nevent: {ev:?}\n");
        if let Err(err) = std::fs::write(self.cfg.quarantine_dir.join(name), body) {
            tracing::error!(error = %err, "could not write the quarantine file");
        }
    }
}

fn node_apply(node: &Node, c: &Arc<Collection>, shard: usize, lsn: u64, ts: u64, op: ShardOp) -> Result<bool> {
    let mut jobs = Vec::new();
    let r = c.apply_replicated(&node.clock, shard, lsn, ts, op, &mut jobs)?;
    node.enqueue(c, jobs);
    Ok(r)
}
