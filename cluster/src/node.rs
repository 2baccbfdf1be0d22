//! A cluster node: the catalog of collections, DDL, the search pool and the index builders.
//!
//! The node owns three kinds of threads: tokio's (requests; never blocked by faiss or fsync),
//! the search pool (rayon; every scan, brute-force and faiss search), and the index builders
//! (std threads; faiss training and graph building, which can take seconds per segment).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use prost::Message;
use tandem_proto::storage::v1 as st;
use tandem_proto::v1 as pb;

use crate::ann::AnnIndex;
use crate::batch::{Answer, Batch, Batcher, Search};
use crate::collection::{Collection, IndexJobs, Write, WriteOutcome};
use crate::error::{ClusterError, Result};
use crate::fanout::{Fanout, LocalFanout};
use crate::fsio;
use crate::role::Role;
use crate::schema::{IndexKind, Metric, Schema};
use crate::segment::Sealed;
use crate::shard::ShardOptions;
use crate::term::{self, StreamTerm};
use crate::ts::{HybridClock, SessionToken, Ts};
use crate::wal::{Lsn, SyncPolicy, Wal, WalOptions};

/// A manual switchover asked of a leader (see `Node::switchover`): handled by whatever drives
/// the node's role (the failover controller), which answers on `reply`.
pub struct Switchover {
    pub to: String,
    pub deadline: Instant,
    /// The new leader's (id, endpoint, epoch).
    pub reply: tokio::sync::oneshot::Sender<Result<(String, String, u64)>>,
}

/// The end of a shard's log as its last leadership left it (`Node::led_tail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedTail {
    /// Nothing logged as leader: the shard holds only what it applied from the stream.
    Nothing,
    /// Its last record, a change at this stream position with this ts.
    Record { position: Lsn, ts: Ts },
    /// Its last record is not a change (an abort marker): cannot be checked.
    Unknown,
}

/// How an alternative learns the leader's current time, which a STRONG read must reach.
pub trait LeaderClock: Send + Sync {
    fn leader_ts(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Ts>> + Send + '_>>;
}

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub cluster_id: String,
    pub data_dir: PathBuf,
    pub role: Role,
    pub shard: ShardOptions,
    pub search_threads: usize,
    pub max_batch_queries: usize,
    pub index_threads: usize,
}

struct Job {
    collection: Weak<Collection>,
    shard: usize,
    segment: Arc<Sealed>,
}

pub struct Node {
    pub opts: NodeOptions,
    pub clock: HybridClock,
    role: RwLock<Role>,
    epoch: AtomicU64,
    /// The last epoch this node led (0: none since it last rejoined); see `term::Epochs`.
    led_epoch: AtomicU64,
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    /// Serialises DDL and catalog rewrites; holds the next collection id.
    catalog: Mutex<u64>,
    search_pool: rayon::ThreadPool,
    /// Admits searches to the pool, merging those that wait (`batch.rs`).
    pub batcher: Arc<Batcher>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    builders: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Set by [`Node::shutdown`]: index builds in progress give up (their segments are indexed
    /// again at the next start, from the manifest).
    stop_builds: Arc<std::sync::atomic::AtomicBool>,
    /// Set by [`Node::stop_writes`]: a leader shutting down refuses new writes.
    stop_writes: std::sync::atomic::AtomicBool,
    /// How searches reach segments: this process's shards, or a proxy's query nodes too
    /// (`placement.rs`), set once a member has its query nodes.
    fanout: RwLock<Arc<dyn Fanout>>,
    pub index_failures: AtomicU64,
    /// Shards a follower reloaded because they held a change the leader's epoch never had (a
    /// fenced leader's late export; `ChangeEvent.epoch_base`).
    pub diverged_reloads: AtomicU64,
    /// The DDL log: creates, drops and index changes in order. The catalog is its checkpoint.
    ddl: Wal,
    /// Alternative: the last leader DDL position applied.
    ddl_source_lsn: AtomicU64,
    /// Leading: the DDL stream position this leadership started from (`u64::MAX` until this
    /// process leads); the publisher never resumes past it and what it exported itself.
    ddl_lead_base: AtomicU64,
    /// The last DDL record whose effect is in `collections`. Feeds read only up to it: a record
    /// is logged before it is applied, and a feed that saw it earlier would export a collection
    /// the node does not list yet.
    ddl_applied: AtomicU64,
    leader: RwLock<Option<String>>,
    leader_clock: RwLock<Option<Arc<dyn LeaderClock>>>,
    /// Alternative: replication state per collection id, for GetClusterInfo.
    replication: RwLock<std::collections::HashMap<u64, crate::role::ReplicationState>>,
    exporting: std::sync::atomic::AtomicBool,
    /// The highest DDL position the transport has acknowledged.
    ddl_exported: tokio::sync::watch::Sender<Lsn>,
    /// Bumped when someone needs every shard feed to send a time tick now (an alternative asked
    /// for the leader's clock for a STRONG read and waits for its stream to reach it).
    tick_requests: tokio::sync::watch::Sender<u64>,
    /// Where this node's leadership term starts in the DDL stream (see `term.rs`).
    ddl_term: RwLock<StreamTerm>,
    /// With an arbiter: the instant a leader must stop acknowledging writes (its lease could
    /// expire soon after). Checked on every write itself, so a paused process that resumes
    /// refuses writes before any task had a chance to fence it.
    write_deadline: Mutex<Option<Instant>>,
    /// Where switchover requests go (the failover controller), when one runs.
    switchover: Mutex<Option<tokio::sync::mpsc::Sender<Switchover>>>,
    _lock: File,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.opts.cluster_id)
    }
}

impl Node {
    /// Opens the node's data directory (creating it), loads every collection and starts the
    /// index builders. Fails if another process holds the directory.
    pub fn open(opts: NodeOptions) -> Result<Arc<Node>> {
        let dir = &opts.data_dir;
        fsio::create_dir(&dir.join("collections"))?;
        let lock_path = dir.join("LOCK");
        let lock =
            File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| ClusterError::io(&lock_path, e))?;
        lock.try_lock()
            .map_err(|_| ClusterError::Unavailable(format!("data directory {} is in use by another tandem process", dir.display())))?;

        let catalog = match fsio::read_checked(&dir.join("catalog"))? {
            Some(b) => st::Catalog::decode(b.as_slice()).map_err(|e| ClusterError::Corrupt(format!("catalog: {e}")))?,
            None => st::Catalog { next_collection_id: 1, ..Default::default() },
        };
        let ddl = Wal::open(&dir.join("ddl"), WalOptions { sync: SyncPolicy::Always, segment_bytes: 16 << 20 })?;
        let mut catalog = catalog;
        let mut ddl_source_lsn = 0;
        let mut behind = false;
        let mut failure = None;
        ddl.read_from(1, |lsn, payload| {
            match st::DdlRecord::decode(payload) {
                Ok(rec) => {
                    ddl_source_lsn = ddl_source_lsn.max(rec.source_lsn);
                    catalog.max_ts = catalog.max_ts.max(rec.ts);
                    if lsn > catalog.ddl_lsn {
                        // Logged but not yet in the catalog: a crash came in between.
                        apply_to_catalog(&mut catalog, rec);
                        behind = true;
                    }
                    true
                }
                Err(e) => {
                    failure = Some(ClusterError::Corrupt(format!("ddl record {lsn}: {e}")));
                    false
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        // Recovery has just put every logged DDL record into the catalog.
        let ddl_last = ddl.last_lsn();
        let clock = HybridClock::new();
        clock.observe(catalog.max_ts);
        let mut collections = BTreeMap::new();
        let mut jobs: Vec<(Arc<Collection>, IndexJobs)> = Vec::new();
        for meta in &catalog.collections {
            let schema =
                Schema::from_proto(meta.schema.as_ref().ok_or_else(|| ClusterError::Corrupt("catalog entry without schema".into()))?)?;
            let (c, j) = Collection::open(meta.id, meta.created_ts, schema, &collection_dir(dir, meta.id), &opts.shard, &clock)?;
            let c = Arc::new(c);
            for s in c.shards() {
                s.set_following(opts.role != Role::Leading);
            }
            jobs.push((c.clone(), j));
            collections.insert(c.schema().name.clone(), c);
        }
        remove_orphans(dir, &catalog)?;

        let epochs = term::Epochs::load(&dir.join("epoch"))?;
        let search_pool = search_pool(opts.search_threads)?;
        let node = Arc::new(Node {
            clock,
            role: RwLock::new(opts.role),
            epoch: AtomicU64::new(epochs.seen),
            led_epoch: AtomicU64::new(epochs.led),
            ddl_term: RwLock::new(StreamTerm::load(&dir.join("ddl-term"))?),
            write_deadline: Mutex::new(None),
            switchover: Mutex::new(None),
            collections: RwLock::new(collections),
            catalog: Mutex::new(catalog.next_collection_id.max(1)),
            batcher: Arc::new(Batcher::new(search_pool.current_num_threads(), opts.max_batch_queries)),
            search_pool,
            jobs: Mutex::new(None),
            builders: Mutex::new(Vec::new()),
            stop_builds: Default::default(),
            stop_writes: Default::default(),
            fanout: RwLock::new(Arc::new(LocalFanout::default())),
            index_failures: AtomicU64::new(0),
            diverged_reloads: AtomicU64::new(0),
            ddl,
            ddl_applied: AtomicU64::new(ddl_last),
            ddl_source_lsn: AtomicU64::new(ddl_source_lsn),
            ddl_lead_base: AtomicU64::new(u64::MAX),
            leader: RwLock::new(None),
            tick_requests: tokio::sync::watch::Sender::new(0),
            leader_clock: RwLock::new(None),
            replication: RwLock::new(Default::default()),
            exporting: Default::default(),
            ddl_exported: tokio::sync::watch::Sender::new(0),
            opts,
            _lock: lock,
        });
        if behind {
            node.write_catalog(&node.collections.read(), *node.catalog.lock())?;
        }
        node.start_builders();
        for (c, j) in jobs {
            node.enqueue(&c, j);
        }
        Ok(node)
    }

    fn start_builders(self: &Arc<Self>) {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = self.builders.lock();
        for i in 0..self.opts.index_threads.max(1) {
            let rx = rx.clone();
            let node = Arc::downgrade(self);
            let stop = self.stop_builds.clone();
            let h = std::thread::Builder::new()
                .name(format!("tandem-index-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().recv();
                        let Ok(job) = job else { return };
                        if let Err(e) = build_index(job, &stop) {
                            tracing::error!(error = %e, "index build failed");
                            if let Some(n) = node.upgrade() {
                                n.index_failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
                .expect("spawn index builder");
            handles.push(h);
        }
        *self.jobs.lock() = Some(tx);
    }

    /// Queues index builds for sealed segments (also those sealed by a write applied outside
    /// `Node::write`, e.g. by replication).
    pub fn enqueue(&self, c: &Arc<Collection>, jobs: IndexJobs) {
        let tx = self.jobs.lock();
        let Some(tx) = tx.as_ref() else { return };
        for (shard, segment) in jobs {
            let _ = tx.send(Job { collection: Arc::downgrade(c), shard, segment });
        }
    }

    /// The first step of a shutdown: new writes are refused (`Stopping`: nothing changed, a
    /// gateway holds them for the next leader) while writes in flight finish and export. Reads
    /// go on until the server drains.
    pub fn stop_writes(&self) {
        self.stop_writes.store(true, Ordering::Release);
    }

    /// Stops the index builders: a build in progress gives up within a chunk of rows
    /// ([`crate::ann::BUILD_CHUNK_ROWS`]) and queued ones are skipped; their segments are
    /// indexed again at the next start (recovery rebuilds what the manifest does not hold).
    /// Blocking.
    pub fn shutdown(&self) {
        self.stop_builds.store(true, Ordering::Relaxed);
        self.jobs.lock().take();
        let handles: Vec<_> = self.builders.lock().drain(..).collect();
        for h in handles {
            let _ = h.join();
        }
    }

    pub fn role(&self) -> Role {
        *self.role.read()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn token(&self, ts: Ts) -> SessionToken {
        SessionToken { epoch: self.epoch(), ts }
    }

    pub fn collection(&self, name: &str) -> Result<Arc<Collection>> {
        self.collections.read().get(name).cloned().ok_or_else(|| ClusterError::CollectionNotFound(name.to_string()))
    }

    pub fn collection_names(&self) -> Vec<String> {
        self.collections.read().keys().cloned().collect()
    }

    fn check_writable(&self) -> Result<()> {
        let role = self.role();
        if self.stop_writes.load(Ordering::Acquire) && role.accepts_writes() {
            return Err(ClusterError::Stopping { cluster: self.opts.cluster_id.clone() });
        }
        if role.accepts_writes() {
            self.lease_error(|| ClusterError::Fenced { cluster: self.opts.cluster_id.clone() })
        } else {
            Err(ClusterError::NotLeader { cluster: self.opts.cluster_id.clone(), role, leader: self.leader() })
        }
    }

    /// Sets (or clears) the instant this leader stops acknowledging writes.
    pub fn set_write_deadline(&self, deadline: Option<Instant>) {
        *self.write_deadline.lock() = deadline;
    }

    /// Whether this leader's lease still covers acknowledging a write now: checked before a
    /// write (a refusal then changed nothing: the typed `Fenced` refusal, which a gateway
    /// holds and sends to the next leader) and again before it is acknowledged (then the
    /// write is durable here but may never reach the next leader: UNAVAILABLE, outcome unknown).
    pub fn check_lease(&self) -> Result<()> {
        // Not `Fenced`: a gateway re-sends a fenced refusal, and this write may have been applied.
        self.lease_error(|| {
            ClusterError::Unavailable(format!(
                "cluster {} may have lost its leadership lease before acknowledging: the write's outcome is unknown (an upsert may be sent again)",
                self.opts.cluster_id
            ))
        })
    }

    fn lease_error(&self, error: impl FnOnce() -> ClusterError) -> Result<()> {
        match *self.write_deadline.lock() {
            Some(d) if Instant::now() >= d => Err(error()),
            _ => Ok(()),
        }
    }

    pub fn set_role(&self, role: Role) {
        *self.role.write() = role;
        for c in self.collections.read().values() {
            for s in c.shards() {
                s.set_following(role != Role::Leading);
            }
        }
    }

    /// Becomes the leader of `epoch` (the arbiter granted it). Every stream continues right
    /// after the position this node has applied, so the caller must have consumed each stream
    /// to its end first (then this node holds every acknowledged change). The terms and the
    /// epoch are durable before the role changes, and the clock is moved past `floor_ts` (the
    /// newest ts seen anywhere), so the new leader's writes sort after the old leader's.
    /// Blocking (fsync).
    pub fn promote(&self, epoch: u64, floor_ts: Ts) -> Result<()> {
        let _catalog = self.catalog.lock();
        let role = self.role();
        if !role.can_be_promoted() {
            return Err(ClusterError::FailedPrecondition(format!("cluster {} is {role}: it cannot be promoted", self.opts.cluster_id)));
        }
        if epoch < self.epoch() {
            return Err(ClusterError::FailedPrecondition(format!(
                "cannot lead epoch {epoch}: cluster {} has already seen epoch {}",
                self.opts.cluster_id,
                self.epoch()
            )));
        }
        // The catalog lock (held) keeps replicated DDL out; each shard's state lock keeps
        // replicated changes out while its term begins.
        let ddl = StreamTerm::new(self.ddl.last_lsn(), self.ddl_source_lsn());
        ddl.save(&self.opts.data_dir.join("ddl-term"))?;
        *self.ddl_term.write() = ddl;
        self.ddl_lead_base.store(ddl.stream_base, Ordering::Release);
        for c in self.collections.read().values() {
            for sh in c.shards() {
                sh.begin_term()?;
            }
        }
        self.lead(epoch, floor_ts)?;
        tracing::info!(cluster = %self.opts.cluster_id, epoch, "promoted: leading");
        Ok(())
    }

    /// Leads again as the source of the streams it led before (it led the newest epoch, and
    /// nobody led since): its log continues them as is. Blocking (fsync).
    pub fn resume_leading(&self, epoch: u64) -> Result<()> {
        let _catalog = self.catalog.lock();
        let led = self.led_epoch();
        if led == 0 && self.epoch() > 1 {
            return Err(ClusterError::FailedPrecondition(format!(
                "cluster {} has not led since it rejoined: it must be promoted, not resume",
                self.opts.cluster_id
            )));
        }
        for c in self.collections.read().values() {
            for sh in c.shards() {
                sh.resume_term();
            }
        }
        self.ddl_lead_base.store(self.ddl_stream_end(), Ordering::Release);
        self.lead(epoch, self.clock.peek())?;
        tracing::info!(cluster = %self.opts.cluster_id, epoch, "leading");
        Ok(())
    }

    fn lead(&self, epoch: u64, floor_ts: Ts) -> Result<()> {
        if epoch < self.epoch() {
            return Err(ClusterError::FailedPrecondition(format!(
                "cannot lead epoch {epoch}: cluster {} has already seen epoch {}",
                self.opts.cluster_id,
                self.epoch()
            )));
        }
        self.save_epochs(term::Epochs { seen: epoch.max(self.epoch()), led: epoch })?;
        for c in self.collections.read().values() {
            for sh in c.shards() {
                sh.set_applied_epoch(epoch);
            }
        }
        self.clock.observe(floor_ts);
        self.set_leader(None);
        self.set_role(Role::Leading);
        Ok(())
    }

    /// Stops accepting writes at once (the lease ran out, or a newer epoch exists): the node
    /// serves nothing until it has rejoined as an alternative.
    pub fn fence(&self) {
        if self.role() == Role::Leading {
            tracing::warn!(cluster = %self.opts.cluster_id, epoch = self.epoch(), "fenced: no longer accepting writes");
        }
        self.set_role(Role::Recovering);
    }

    /// An old leader coming back as an alternative of a newer epoch. Its log may end with
    /// changes the stream never got (ack policy `local`, or in flight when it stopped), at
    /// positions the new leader has since reused. Shards in `keep` (the caller checked that the
    /// stream holds their last record as this node wrote it) go on from where their log ends,
    /// like a clean step-down; every other shard forgets what it holds and is loaded again from
    /// the new leader (snapshot, or the broker's log). The node stays `Recovering` until the
    /// caller sees it caught up. Blocking.
    pub fn rejoin(&self, keep: &std::collections::HashSet<(u64, usize)>) -> Result<()> {
        let _catalog = self.catalog.lock();
        self.set_role(Role::Recovering);
        let (mut kept, mut wiped) = (0, 0);
        for c in self.collections.read().values() {
            for (i, sh) in c.shards().iter().enumerate() {
                if keep.contains(&(c.id, i)) {
                    self.mark_stream_position(c, i)?;
                    kept += 1;
                } else {
                    sh.wipe()?;
                    wiped += 1;
                }
            }
        }
        self.ddl_source_lsn.fetch_max(self.ddl_stream_end(), Ordering::AcqRel);
        self.save_epochs(term::Epochs { seen: self.epoch(), led: 0 })?;
        tracing::info!(cluster = %self.opts.cluster_id, epoch = self.epoch(), kept, reloaded = wiped, "rejoining as an alternative");
        Ok(())
    }

    /// A leader that handed over cleanly (the transport holds every change it made) goes on
    /// as a follower of the same streams from where its log ends, nothing reloaded. Blocking.
    pub fn step_down(&self) -> Result<()> {
        let _catalog = self.catalog.lock();
        // Recovering: no writes, and shards follow again (replicated applies are accepted).
        self.set_role(Role::Recovering);
        for c in self.collections.read().values() {
            for i in 0..c.shards().len() {
                self.mark_stream_position(c, i)?;
            }
        }
        self.ddl_source_lsn.fetch_max(self.ddl_stream_end(), Ordering::AcqRel);
        self.save_epochs(term::Epochs { seen: self.epoch(), led: 0 })?;
        tracing::info!(cluster = %self.opts.cluster_id, epoch = self.epoch(), "stepped down: following from where its log ends");
        Ok(())
    }

    /// Records, in shard `i`'s log, the stream position its log ends at (an empty marker
    /// change, like a bootstrap's), so following resumes right after it. The shard follows.
    fn mark_stream_position(&self, c: &Arc<Collection>, i: usize) -> Result<()> {
        let sh = &c.shards()[i];
        let position = sh.term().to_stream(sh.last_lsn());
        if position > sh.source_lsn() {
            let mut jobs = Vec::new();
            let op = crate::shard::ShardOp::Delete { ids: Vec::new() };
            c.apply_replicated(&self.clock, i, position, sh.last_applied_ts(), op, &mut jobs)?;
            self.enqueue(c, jobs);
        }
        Ok(())
    }

    /// What shard `i` logged as leader after the last position it applied from a stream: what
    /// a rejoin looks for in the stream.
    pub fn led_tail(&self, c: &Collection, i: usize) -> Result<LedTail> {
        let sh = &c.shards()[i];
        let last = sh.last_lsn();
        let position = sh.term().to_stream(last);
        if last == 0 || position <= sh.source_lsn() {
            return Ok(LedTail::Nothing);
        }
        let mut out = LedTail::Unknown;
        sh.read_changes(last, Ts::MAX, 1, |lsn, rec| {
            if lsn == last {
                out = LedTail::Record { position, ts: rec.ts };
            }
            false
        })?;
        Ok(out)
    }

    /// Whether the transport has acknowledged every change this leader logged (shards and
    /// DDL): then a handover loses nothing.
    /// Waits until [`Node::fully_exported`] holds, or `deadline` passes (then false). Polls: the
    /// exported positions are per shard, and a drain waits on all of them. Cancel-safe.
    pub async fn wait_fully_exported(&self, deadline: Instant) -> bool {
        while !self.fully_exported() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    pub fn fully_exported(&self) -> bool {
        let ddl = *self.ddl_exported.borrow() >= self.ddl_last_lsn();
        ddl && self.collections.read().values().all(|c| c.shards().iter().all(|sh| *sh.exported_watch().borrow() >= sh.last_lsn()))
    }

    /// Routes switchover requests to `handler` (the failover controller), or nowhere.
    pub fn set_switchover_handler(&self, handler: Option<tokio::sync::mpsc::Sender<Switchover>>) {
        *self.switchover.lock() = handler;
    }

    /// Hands leadership to cluster `to` (see `Switchover`); the new leader's (id, endpoint,
    /// epoch).
    pub async fn switchover(&self, to: &str, deadline: Instant) -> Result<(String, String, u64)> {
        let handler = self.switchover.lock().clone().ok_or_else(|| {
            ClusterError::FailedPrecondition(format!(
                "cluster {} runs without an arbiter (ha.arbiter = \"none\"): a switchover needs one",
                self.opts.cluster_id
            ))
        })?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        handler
            .send(Switchover { to: to.to_string(), deadline, reply })
            .await
            .map_err(|_| ClusterError::Unavailable("the failover controller stopped".into()))?;
        answer.await.map_err(|_| ClusterError::Unavailable("the failover controller stopped".into()))?
    }

    /// Records that `epoch` exists (durably, when it is newer than the node's). Blocking.
    pub fn observe_epoch(&self, epoch: u64) -> Result<()> {
        if epoch > self.epoch() {
            self.save_epochs(term::Epochs { seen: epoch, led: self.led_epoch() })?;
        }
        Ok(())
    }

    /// The last epoch this node led; 0 when it has not led since it last rejoined.
    pub fn led_epoch(&self) -> u64 {
        self.led_epoch.load(Ordering::Acquire)
    }

    fn save_epochs(&self, e: term::Epochs) -> Result<()> {
        e.save(&self.opts.data_dir.join("epoch"))?;
        self.epoch.fetch_max(e.seen, Ordering::AcqRel);
        self.led_epoch.store(e.led, Ordering::Release);
        Ok(())
    }

    /// Where the leader is (an endpoint), for NotLeader replies and GetClusterInfo.
    pub fn set_leader(&self, leader: Option<String>) {
        *self.leader.write() = leader;
    }

    pub fn leader(&self) -> Option<String> {
        self.leader.read().clone()
    }

    pub fn set_leader_clock(&self, clock: Arc<dyn LeaderClock>) {
        *self.leader_clock.write() = Some(clock);
    }

    /// The guarantee ts of a STRONG read: the leader's current time.
    pub async fn strong_ts(&self) -> Result<Ts> {
        if self.role() == Role::Leading {
            return Ok(self.clock.peek());
        }
        let clock = self.leader_clock.read().clone();
        match clock {
            Some(c) => c.leader_ts().await,
            None => Err(ClusterError::Unavailable(format!(
                "cluster {} does not know its leader's clock: strong reads go to the leader",
                self.opts.cluster_id
            ))),
        }
    }

    /// A broker publisher runs: with ack policy `exported`, writes wait for it.
    pub fn set_exporting(&self, on: bool) {
        self.exporting.store(on, Ordering::Release);
    }

    pub fn exporting(&self) -> bool {
        self.exporting.load(Ordering::Acquire)
    }

    /// The transport has acknowledged the DDL stream up to stream position `lsn`.
    /// Leading: where the publisher may resume the DDL stream, given the transport's `end`:
    /// never past this leadership's base and what the transport acknowledged to it (past
    /// them, the stream can hold a fenced leader's late message; see `Shard::resume_end`).
    pub fn ddl_resume_end(&self, end: Lsn) -> Lsn {
        match self.ddl_lead_base.load(Ordering::Acquire) {
            u64::MAX => end,
            base => end.min(base.max(self.ddl_term().to_stream(*self.ddl_exported.borrow()))),
        }
    }

    pub fn set_ddl_exported(&self, lsn: Lsn) {
        let lsn = self.ddl_term().to_local(lsn);
        self.ddl_exported.send_if_modified(|v| {
            let changed = *v < lsn;
            *v = (*v).max(lsn);
            changed
        });
    }

    /// With a broker publisher running, waits until every DDL change so far is exported
    /// (ack policy `exported` for DDL: a collection's stream exists before its data). Cancel-safe.
    pub async fn wait_ddl_exported(&self, deadline: Instant) -> Result<()> {
        if !self.exporting() {
            return Ok(());
        }
        let lsn = self.ddl.last_lsn();
        let mut w = self.ddl_exported.subscribe();
        match tokio::time::timeout_at(deadline.into(), w.wait_for(|&e| e >= lsn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ClusterError::Unavailable("the exporter stopped".into())),
            Err(_) => Err(ClusterError::Unavailable(format!(
                "the change is durable on the leader but the transport has not acknowledged it yet (ddl position {lsn})"
            ))),
        }
    }

    pub fn fanout(&self) -> Arc<dyn Fanout> {
        self.fanout.read().clone()
    }

    /// Searches from now on go through `fanout` (a member with query nodes sets its proxy's).
    pub fn set_fanout(&self, fanout: Arc<dyn Fanout>) {
        *self.fanout.write() = fanout;
    }

    /// Asks every shard feed for a time tick now rather than at its next interval.
    pub fn request_ticks(&self) {
        self.tick_requests.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// What feeds watch for tick requests.
    pub fn tick_requests(&self) -> tokio::sync::watch::Receiver<u64> {
        self.tick_requests.subscribe()
    }

    pub fn set_replication_state(&self, collection_id: u64, state: crate::role::ReplicationState) {
        self.replication.write().insert(collection_id, state);
    }

    /// `None` for a collection that follows nothing (on a leader, or not yet subscribed).
    pub fn replication_state(&self, collection_id: u64) -> Option<crate::role::ReplicationState> {
        self.replication.read().get(&collection_id).cloned()
    }

    pub fn collection_by_id(&self, id: u64) -> Option<Arc<Collection>> {
        self.collections.read().values().find(|c| c.id == id).cloned()
    }

    pub fn collections(&self) -> Vec<Arc<Collection>> {
        self.collections.read().values().cloned().collect()
    }

    fn write_catalog(&self, collections: &BTreeMap<String, Arc<Collection>>, next_id: u64) -> Result<()> {
        let catalog = st::Catalog {
            collections: collections
                .values()
                .map(|c| st::CollectionMeta { id: c.id, schema: Some(c.schema().to_proto()), created_ts: c.created_ts })
                .collect(),
            next_collection_id: next_id,
            max_ts: self.clock.peek(),
            ddl_lsn: self.ddl.last_lsn(),
        };
        fsio::write_atomic(&self.opts.data_dir.join("catalog"), &catalog.encode_to_vec())
    }

    /// Logs a DDL record, applies it, and checkpoints the catalog. The caller holds the catalog
    /// lock (`next_id`). A crash after the log append is repaired at the next start.
    fn ddl_apply(&self, next_id: &mut u64, rec: st::DdlRecord) -> Result<Option<Arc<Collection>>> {
        let lsn = self.ddl.append(&rec.encode_to_vec())?;
        let mut all = self.collections.read().clone();
        let mut created = None;
        let mut dropped = None;
        match rec.op {
            Some(st::ddl_record::Op::Create(schema)) => {
                let schema = Schema::from_proto(&schema)?;
                let id = rec.collection_id;
                let (c, _) = Collection::open(id, rec.ts, schema, &collection_dir(&self.opts.data_dir, id), &self.opts.shard, &self.clock)?;
                let c = Arc::new(c);
                for s in c.shards() {
                    s.set_following(self.role() != Role::Leading);
                }
                *next_id = (*next_id).max(id + 1);
                all.insert(c.schema().name.clone(), c.clone());
                created = Some(c);
            }
            Some(st::ddl_record::Op::Drop(_)) => {
                dropped = all.remove(&rec.collection);
            }
            Some(st::ddl_record::Op::SetIndex(spec)) => {
                let c = all.get(&rec.collection).cloned().ok_or_else(|| ClusterError::CollectionNotFound(rec.collection.clone()))?;
                let mut schema = (*c.schema()).clone();
                schema.index = IndexKind::from_proto(Some(&spec))?;
                if spec.metric != 0 {
                    schema.metric = Metric::from_proto(spec.metric)?;
                }
                c.set_schema(schema);
                let jobs: IndexJobs =
                    c.shards().iter().enumerate().flat_map(|(i, s)| s.sealed_segments().into_iter().map(move |seg| (i, seg))).collect();
                self.enqueue(&c, jobs);
            }
            None => return Err(ClusterError::Corrupt("ddl record without an operation".into())),
        }
        self.write_catalog(&all, *next_id)?;
        *self.collections.write() = all;
        // Only now: a failover candidate that sees the position applied must also see the
        // collection it creates, or it counts that collection's streams as caught up without
        // looking at them (and is promoted without their rows).
        self.ddl_source_lsn.fetch_max(rec.source_lsn, Ordering::AcqRel);
        self.ddl_applied.fetch_max(lsn, Ordering::AcqRel);
        if let Some(c) = dropped {
            c.mark_dropped();
            // The catalog no longer lists it: a crash here leaves an orphan the next start removes.
            if let Err(e) = std::fs::remove_dir_all(c.dir()) {
                tracing::warn!(error = %e, dir = %c.dir().display(), "could not remove a dropped collection's files");
            }
            tracing::info!(collection = %rec.collection, "collection dropped");
        }
        if let Some(c) = &created {
            tracing::info!(collection = %rec.collection, id = c.id, "collection created");
        }
        Ok(created)
    }

    /// Blocking (fsync).
    pub fn create_collection(&self, schema: &pb::CollectionSchema) -> Result<(Arc<Collection>, Ts)> {
        self.check_writable()?;
        let schema = Schema::from_proto(schema)?;
        let mut next_id = self.catalog.lock();
        if self.collections.read().contains_key(&schema.name) {
            return Err(ClusterError::CollectionExists(schema.name));
        }
        let id = *next_id;
        let ts = self.clock.now();
        let rec = st::DdlRecord {
            ts,
            collection: schema.name.clone(),
            collection_id: id,
            op: Some(st::ddl_record::Op::Create(schema.to_proto())),
            source_lsn: 0,
        };
        let c = self.ddl_apply(&mut next_id, rec)?.expect("create returns the collection");
        for sh in c.shards() {
            sh.begin_new_stream();
            sh.set_applied_epoch(self.led_epoch());
        }
        Ok((c, ts))
    }

    /// Blocking (fsync, directory removal).
    pub fn drop_collection(&self, name: &str) -> Result<Ts> {
        self.check_writable()?;
        let mut next_id = self.catalog.lock();
        let c = self.collection(name)?;
        let ts = self.clock.now();
        let rec = st::DdlRecord {
            ts,
            collection: name.into(),
            collection_id: c.id,
            op: Some(st::ddl_record::Op::Drop(st::DropOp {})),
            source_lsn: 0,
        };
        self.ddl_apply(&mut next_id, rec)?;
        Ok(ts)
    }

    /// Alternative: applies a DDL change from the leader's DDL stream at position `lsn`.
    /// Idempotent: positions already applied are skipped. Blocking.
    pub fn apply_replicated_ddl(&self, lsn: Lsn, mut rec: st::DdlRecord) -> Result<bool> {
        let mut next_id = self.catalog.lock();
        if self.role() == Role::Leading {
            return Err(ClusterError::Unavailable(format!("cluster {} leads now: it applies no replicated DDL", self.opts.cluster_id)));
        }
        if lsn <= self.ddl_source_lsn.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.clock.observe(rec.ts);
        rec.source_lsn = lsn;
        // The id is read into a local first: a read guard taken in the `if let` would live
        // through its body, and the drop there takes the write lock (a deadlock the docker fault
        // campaign found: a restarted alternative hung for good on a recreated collection).
        let existing = match &rec.op {
            Some(st::ddl_record::Op::Create(_)) => self.collections.read().get(&rec.collection).map(|c| c.id),
            _ => None,
        };
        if let Some(existing) = existing.filter(|&id| id != rec.collection_id) {
            // The leader dropped and recreated it while we were away and its drop is not in
            // the stream any more: drop our copy first.
            let drop = st::DdlRecord {
                ts: rec.ts,
                collection: rec.collection.clone(),
                collection_id: existing,
                op: Some(st::ddl_record::Op::Drop(st::DropOp {})),
                source_lsn: 0,
            };
            self.ddl_apply(&mut next_id, drop)?;
        }
        let known = self.collections.read().get(&rec.collection).map(|c| c.id);
        let skip = match &rec.op {
            Some(st::ddl_record::Op::Create(_)) => known == Some(rec.collection_id),
            Some(st::ddl_record::Op::Drop(_)) | Some(st::ddl_record::Op::SetIndex(_)) => known != Some(rec.collection_id),
            None => true,
        };
        if skip {
            // Nothing to change, but remember the position.
            self.ddl_source_lsn.fetch_max(lsn, Ordering::AcqRel);
            return Ok(false);
        }
        self.ddl_apply(&mut next_id, rec)?;
        Ok(true)
    }

    /// Alternative: the last leader DDL position applied.
    pub fn ddl_source_lsn(&self) -> Lsn {
        self.ddl_source_lsn.load(Ordering::Acquire)
    }

    pub fn ddl_last_lsn(&self) -> Lsn {
        self.ddl_applied.load(Ordering::Acquire)
    }

    /// The DDL stream's end as this node serves it (a stream position).
    pub fn ddl_stream_end(&self) -> Lsn {
        self.ddl_term().to_stream(self.ddl_last_lsn())
    }

    pub fn ddl_term(&self) -> StreamTerm {
        *self.ddl_term.read()
    }

    /// DDL records with lsn >= `from` whose effect is applied, in order (the leader's DDL stream).
    pub fn read_ddl(&self, from: Lsn, mut f: impl FnMut(Lsn, st::DdlRecord) -> bool) -> Result<()> {
        let mut failure = None;
        let applied = self.ddl_applied.load(Ordering::Acquire);
        self.ddl.read_from(from.max(1), |lsn, payload| match st::DdlRecord::decode(payload) {
            _ if lsn > applied => false,
            Ok(rec) => f(lsn, rec),
            Err(e) => {
                failure = Some(ClusterError::Corrupt(format!("ddl record {lsn}: {e}")));
                false
            }
        })?;
        failure.map_or(Ok(()), Err)
    }

    /// Replaces the index of a collection; sealed segments are rebuilt in the background.
    pub fn create_index(&self, name: &str, spec: Option<&pb::IndexSpec>) -> Result<Ts> {
        self.check_writable()?;
        if spec.and_then(|s| s.kind.as_ref()).is_none() {
            return Err(ClusterError::invalid("create index needs an index: flat, ivf_flat or hnsw"));
        }
        let kind = IndexKind::from_proto(spec)?;
        let metric = spec.map_or(0, |s| s.metric);
        self.set_index(name, kind, metric)
    }

    pub fn drop_index(&self, name: &str) -> Result<Ts> {
        self.check_writable()?;
        self.set_index(name, IndexKind::Flat, 0)
    }

    /// `metric` (a `pb::Metric`, 0 = keep) changes what the collection compares by: rows keep
    /// their vectors as inserted, so only the indexes change. Sealed segments are re-indexed in
    /// the background and searched exactly until then (an index of the old metric is not used).
    fn set_index(&self, name: &str, kind: IndexKind, metric: i32) -> Result<Ts> {
        let mut next_id = self.catalog.lock();
        let c = self.collection(name)?;
        let mut spec = kind.to_proto();
        if metric != 0 && Metric::from_proto(metric)? != c.schema().metric {
            spec.metric = metric;
        }
        let ts = self.clock.now();
        let rec =
            st::DdlRecord { ts, collection: name.into(), collection_id: c.id, op: Some(st::ddl_record::Op::SetIndex(spec)), source_lsn: 0 };
        self.ddl_apply(&mut next_id, rec)?;
        Ok(ts)
    }

    /// Applies a write. Blocking (fsync): call from a blocking thread.
    pub fn write(&self, c: &Arc<Collection>, write: Write) -> Result<WriteOutcome> {
        self.check_writable()?;
        let mut jobs = Vec::new();
        let r = c.write(&self.clock, write, &mut jobs);
        self.enqueue(c, jobs);
        r
    }

    /// Seals every growing segment and waits until every sealed segment of the collection is
    /// indexed with the current index and persisted.
    pub async fn flush(&self, c: &Arc<Collection>, deadline: Instant) -> Result<(u64, Ts)> {
        self.check_writable()?;
        let sealed: IndexJobs = c.shards().iter().enumerate().filter_map(|(i, s)| s.seal_growing().map(|seg| (i, seg))).collect();
        let n = sealed.len() as u64;
        self.enqueue(c, sealed);
        let ts = self.clock.now();
        loop {
            let schema = c.schema();
            let done = c
                .shards()
                .iter()
                .all(|s| s.sealed_segments().iter().all(|seg| seg.is_persisted() && seg.is_indexed_as(schema.index, schema.metric)));
            if done {
                return Ok((n, ts));
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::DeadlineExceeded(format!(
                    "flush of collection {:?}: segments are still being indexed",
                    c.schema().name
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Searches on the pool, merged with others that wait for it (`batch.rs`).
    pub async fn search(&self, search: Search) -> Result<Answer> {
        let (batch, answer) = self.batcher.admit(search);
        self.start_batches(batch);
        answer.await.map_err(|_| ClusterError::Internal("a search task failed unexpectedly".into()))?
    }

    /// Runs CPU-bound work on the search pool, in its turn with the searches (`batch.rs`).
    pub async fn on_search_pool<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let batch = self.batcher.admit_job(Box::new(move || {
            let _ = tx.send(f());
        }));
        self.start_batches(batch);
        rx.await.map_err(|_| ClusterError::Internal("a search task failed unexpectedly".into()))?
    }

    /// A pool thread for work the batcher admitted at once: it goes on with what waits. It holds
    /// the batcher and the fanout, not the node: a node stopped while the thread finishes is
    /// dropped at once, and with it the data directory's lock (a restart takes it at once).
    fn start_batches(&self, batch: Option<Batch>) {
        if let Some(batch) = batch {
            let (batcher, fanout) = (self.batcher.clone(), self.fanout());
            self.search_pool.spawn(move || batcher.drain(batch, &*fanout));
        }
    }
}

/// The threads searches run on: one per core by default, each running faiss (and BLAS)
/// single-threaded.
pub(crate) fn search_pool(threads: usize) -> Result<rayon::ThreadPool> {
    crate::ann::blas_for_search();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("tandem-search-{i}"))
        .start_handler(|_| crate::ann::single_threaded_on_this_thread())
        .panic_handler(|_| tracing::error!("a search task panicked"))
        .build()
        .map_err(|e| ClusterError::Internal(format!("search pool: {e}")))
}

/// Applies a DDL record to a catalog (recovery of records logged after the last catalog write).
fn apply_to_catalog(catalog: &mut st::Catalog, rec: st::DdlRecord) {
    let id = rec.collection_id;
    match rec.op {
        Some(st::ddl_record::Op::Create(schema)) => {
            catalog.collections.retain(|c| c.id != id);
            catalog.collections.push(st::CollectionMeta { id, schema: Some(schema), created_ts: rec.ts });
            catalog.next_collection_id = catalog.next_collection_id.max(id + 1);
        }
        Some(st::ddl_record::Op::Drop(_)) => catalog.collections.retain(|c| c.id != id),
        Some(st::ddl_record::Op::SetIndex(spec)) => {
            for c in catalog.collections.iter_mut().filter(|c| c.id == id) {
                if let Some(s) = c.schema.as_mut() {
                    if spec.metric != 0 {
                        s.metric = spec.metric;
                    }
                    s.index = Some(pb::IndexSpec { metric: 0, ..spec });
                }
            }
        }
        None => {}
    }
}

fn collection_dir(data_dir: &Path, id: u64) -> PathBuf {
    data_dir.join("collections").join(id.to_string())
}

/// Directories of collections the catalog no longer lists (a drop interrupted by a crash, or a
/// create whose catalog write failed).
fn remove_orphans(data_dir: &Path, catalog: &st::Catalog) -> Result<()> {
    let root = data_dir.join("collections");
    let entries = std::fs::read_dir(&root).map_err(|e| ClusterError::io(&root, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let listed = name.parse::<u64>().is_ok_and(|id| catalog.collections.iter().any(|c| c.id == id));
        if !listed {
            tracing::warn!(dir = %entry.path().display(), "removing files of a collection the catalog does not list");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

fn build_index(job: Job, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
    let Some(c) = job.collection.upgrade() else { return Ok(()) };
    if c.is_dropped() {
        return Ok(());
    }
    let schema = c.schema();
    let seg = &job.segment;
    if !seg.is_indexed_as(schema.index, schema.metric) {
        let started = Instant::now();
        let Some(index) = AnnIndex::build_until(schema.index, schema.metric, schema.dim, &seg.rows.vectors, stop)? else {
            tracing::debug!(collection = %schema.name, segment = seg.id, "index build stopped: the node is shutting down");
            return Ok(());
        };
        seg.set_index(Arc::new(index));
        tracing::debug!(collection = %schema.name, segment = seg.id, rows = seg.len(), index = %schema.index, ms = started.elapsed().as_millis() as u64, "segment indexed");
    }
    if c.is_dropped() {
        return Ok(());
    }
    c.shards()[job.shard].checkpoint(&schema)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::Write;
    use crate::segment::SearchPlan;
    use crate::shard::ShardOptions;

    fn leader(dir: &Path) -> Arc<Node> {
        let opts = NodeOptions {
            cluster_id: "a".into(),
            data_dir: dir.to_path_buf(),
            role: Role::Leading,
            shard: ShardOptions { wal: WalOptions { sync: SyncPolicy::Never, segment_bytes: 1 << 20 }, seal_rows: 1000 },
            search_threads: 1,
            max_batch_queries: crate::batch::MAX_BATCH_QUERIES,
            index_threads: 1,
        };
        Node::open(opts).unwrap()
    }

    /// A failover candidate compares the DDL position applied with the stream's end, then counts
    /// the streams of the collections it knows: the position of a create must never be applied
    /// before its collection is visible (else the candidate skips that collection's streams).
    #[test]
    fn a_replicated_create_is_visible_before_its_position_counts_as_applied() {
        let dir = tempfile::tempdir().unwrap();
        let node = leader(dir.path());
        node.set_role(Role::Alternative);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (node, stop) = (node.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut checks = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let applied = node.ddl_source_lsn();
                    let known = node.collections().len() as u64;
                    assert!(known >= applied, "DDL position {applied} applied with {known} collections visible");
                    checks += 1;
                }
                checks
            })
        };
        for i in 1..=20u64 {
            let schema =
                pb::CollectionSchema { name: format!("c{i}"), dim: 2, metric: pb::Metric::L2 as i32, shards: 2, ..Default::default() };
            let rec = st::DdlRecord {
                ts: crate::ts::compose(1_700_000_000_000 + i, 0),
                collection: schema.name.clone(),
                collection_id: i,
                op: Some(st::ddl_record::Op::Create(schema)),
                source_lsn: 0,
            };
            assert!(node.apply_replicated_ddl(i, rec).unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        let checks = watcher.join().expect("the watcher saw a position applied before its collection");
        assert!(checks > 0);
        assert_eq!(node.ddl_source_lsn(), 20);
    }

    /// A create of a name the alternative holds under another id (the leader dropped and
    /// recreated it, and the drop is not in the stream any more) replaces the old collection.
    /// It once hung for good: the read guard of the lookup lived on while the drop took the
    /// write lock. Run on a thread, so a hang fails the test instead of stalling it.
    #[test]
    fn a_replicated_create_replaces_a_collection_of_the_same_name_and_another_id() {
        let dir = tempfile::tempdir().unwrap();
        let node = leader(dir.path());
        node.set_role(Role::Alternative);
        let create = |id: u64, dim: u32| st::DdlRecord {
            ts: crate::ts::compose(1_700_000_000_000 + id, 0),
            collection: "c".into(),
            collection_id: id,
            op: Some(st::ddl_record::Op::Create(pb::CollectionSchema {
                name: "c".into(),
                dim,
                metric: pb::Metric::L2 as i32,
                shards: 1,
                ..Default::default()
            })),
            source_lsn: 0,
        };
        assert!(node.apply_replicated_ddl(1, create(1, 2)).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let n = node.clone();
        std::thread::spawn(move || tx.send(n.apply_replicated_ddl(3, create(3, 4)).map_err(|e| e.to_string())));
        let applied = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the create hung");
        assert_eq!(applied, Ok(true));
        let c = node.collection("c").unwrap();
        assert_eq!((c.id, c.schema().dim), (3, 4), "the new incarnation replaced the old one");
        assert_eq!(node.collections().len(), 1);
    }

    /// A rejoining old leader keeps the shards it was told to keep (the stream holds their last
    /// record as written) with their rows and goes on from where their logs end, and reloads
    /// the others from empty.
    #[test]
    fn rejoin_keeps_the_shards_it_is_told_to_and_wipes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let node = leader(dir.path());
        let schema = pb::CollectionSchema { name: "c".into(), dim: 2, metric: pb::Metric::L2 as i32, shards: 2, ..Default::default() };
        let (c, _) = node.create_collection(&schema).unwrap();
        let ids: Vec<i64> = (0..20).collect();
        let vectors = ids.iter().flat_map(|&i| [i as f32, 0.0]).collect();
        node.write(&c, Write::Insert { ids: ids.clone(), vectors, rows: vec![Vec::new(); ids.len()] }).unwrap();
        let rows = |i: usize| c.shards()[i].stats().live_rows;
        let per_shard = [rows(0), rows(1)];
        assert!(per_shard.iter().all(|&n| n > 0), "both shards hold rows: {per_shard:?}");
        let tails: Vec<LedTail> = (0..2).map(|i| node.led_tail(&c, i).unwrap()).collect();
        for (i, t) in tails.iter().enumerate() {
            let position = c.shards()[i].term().to_stream(c.shards()[i].last_lsn());
            assert!(matches!(t, LedTail::Record { position: p, .. } if *p == position), "shard {i}: {t:?}");
        }
        let (last0, position0) = (c.shards()[0].last_lsn(), c.shards()[0].term().to_stream(c.shards()[0].last_lsn()));

        node.observe_epoch(2).unwrap();
        node.rejoin(&[(c.id, 0)].into_iter().collect()).unwrap();
        assert_eq!(node.role(), Role::Recovering);
        assert_eq!(rows(0), per_shard[0], "the kept shard keeps its rows");
        assert!(c.shards()[0].last_lsn() >= last0, "and its log");
        assert_eq!(c.shards()[0].source_lsn(), position0, "it follows the stream on from its last record");
        assert_eq!(rows(1), 0, "the other shard is reloaded from empty");
    }

    /// Milvus sets the metric with the index, often after inserting: rows keep their vectors as
    /// inserted, so the metric changes under data, indexes of the old metric are not used, and
    /// the new ones are rebuilt, persisted, and loaded again after a restart.
    #[tokio::test]
    async fn the_metric_changes_under_data_and_indexes_follow() {
        let dir = tempfile::tempdir().unwrap();
        let schema = pb::CollectionSchema { name: "c".into(), dim: 2, metric: pb::Metric::L2 as i32, shards: 1, ..Default::default() };
        // Direction and length differ: [10, 0] is far from [1, 0.1] by L2 and closest by cosine.
        let vectors = vec![10.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.9, 0.5];
        let search = |node: &Arc<Node>, c: &Arc<Collection>| {
            let metric = c.schema().metric;
            let norm = (1.0f32 + 0.01).sqrt();
            let query = if metric == crate::schema::Metric::Cosine { vec![1.0 / norm, 0.1 / norm] } else { vec![1.0, 0.1] };
            let plan = SearchPlan {
                queries: &query,
                dim: 2,
                k: 4,
                metric,
                filter: None,
                knobs: crate::ann::Knobs { nprobe: 1, ef_search: 16 },
                snapshot: node.clock.peek(),
            };
            node.fanout().search(c, &plan).unwrap().remove(0)
        };
        let deadline = || Instant::now() + Duration::from_secs(30);
        {
            let node = leader(dir.path());
            let (c, _) = node.create_collection(&schema).unwrap();
            node.write(&c, Write::Insert { ids: vec![1, 2, 3, 4], vectors: vectors.clone(), rows: vec![Vec::new(); 4] }).unwrap();
            node.flush(&c, deadline()).await.unwrap();
            assert_eq!(search(&node, &c)[0].1, 4, "by L2, [0.9, 0.5] is nearest to [1, 0.1]");

            node.create_index("c", Some(&pb::IndexSpec { metric: pb::Metric::Cosine as i32, ..IndexKind::Flat.to_proto() })).unwrap();
            let c = node.collection("c").unwrap();
            assert_eq!(c.schema().metric, crate::schema::Metric::Cosine);
            // Before the rebuild and after it, the same answer: cosine similarity.
            let hits = search(&node, &c);
            assert_eq!(hits[0].1, 1, "by cosine, [10, 0] is closest: {hits:?}");
            assert!((hits[0].0 - 1.0 / (1.01f32).sqrt()).abs() < 1e-5, "{hits:?}");
            node.flush(&c, deadline()).await.unwrap();
            // The same ids in the same order; scores to float precision: the first search may
            // run exactly (dividing by the stored norm) or on the rebuilt faiss index (over
            // normalised copies), depending on whether the rebuild finished, and the two round
            // differently in the last bit (seen in a clean container: 0.99503714 and 0.9950372).
            let after = search(&node, &c);
            assert_eq!(after.iter().map(|h| h.1).collect::<Vec<_>>(), hits.iter().map(|h| h.1).collect::<Vec<_>>());
            assert!(after.iter().zip(&hits).all(|(a, b)| (a.0 - b.0).abs() < 1e-5), "{after:?} against {hits:?}");
            assert_eq!(c.get(&[1], node.clock.peek())[0].1, vec![10.0, 0.0], "rows keep the vector as inserted");
            node.shutdown();
        }
        let node = leader(dir.path());
        let c = node.collection("c").unwrap();
        assert_eq!(c.schema().metric, crate::schema::Metric::Cosine, "the metric change is durable");
        let seg = c.shards()[0].sealed_segments();
        assert!(
            seg.iter().all(|s| s.index().is_some_and(|i| i.serves(IndexKind::Flat, crate::schema::Metric::Cosine))),
            "the cosine index file is loaded"
        );
        assert_eq!(search(&node, &c)[0].1, 1);
    }

    #[test]
    fn the_search_pool_runs_faiss_single_threaded() {
        let pool = search_pool(2).unwrap();
        let on_pool: Vec<usize> = pool.broadcast(|_| crate::ann::faiss_threads_on_this_thread());
        assert_eq!(on_pool, [1, 1], "every pool thread");
        let (blas_threads, blas_from) = crate::ann::blas_settings();
        assert!(blas_threads.is_none_or(|n| n == 1), "OpenBLAS: {blas_threads:?} threads");
        assert_eq!(blas_from, crate::ann::BLAS_FROM_QUERIES);
        // Elsewhere faiss keeps OpenMP's default (a thread per core): index builds use them.
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let elsewhere = std::thread::spawn(crate::ann::faiss_threads_on_this_thread).join().unwrap();
            assert_eq!(elsewhere, cores);
        }
    }
}
