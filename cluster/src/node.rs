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
use crate::collection::{Collection, IndexJobs, Write};
use crate::error::{ClusterError, Result};
use crate::fanout::{Fanout, LocalFanout};
use crate::fsio;
use crate::role::Role;
use crate::schema::{IndexKind, Schema};
use crate::segment::Sealed;
use crate::shard::ShardOptions;
use crate::ts::{HybridClock, SessionToken, Ts};

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub cluster_id: String,
    pub data_dir: PathBuf,
    pub role: Role,
    pub shard: ShardOptions,
    pub search_threads: usize,
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
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    /// Serialises DDL and catalog rewrites; holds the next collection id.
    catalog: Mutex<u64>,
    search_pool: rayon::ThreadPool,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    builders: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub fanout: Arc<dyn Fanout>,
    pub index_failures: AtomicU64,
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
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| ClusterError::io(&lock_path, e))?;
        lock.try_lock().map_err(|_| ClusterError::Unavailable(format!("data directory {} is in use by another tandem process", dir.display())))?;

        let catalog = match fsio::read_checked(&dir.join("catalog"))? {
            Some(b) => st::Catalog::decode(b.as_slice()).map_err(|e| ClusterError::Corrupt(format!("catalog: {e}")))?,
            None => st::Catalog { next_collection_id: 1, ..Default::default() },
        };
        let clock = HybridClock::new();
        clock.observe(catalog.max_ts);
        let mut collections = BTreeMap::new();
        let mut jobs: Vec<(Arc<Collection>, IndexJobs)> = Vec::new();
        for meta in &catalog.collections {
            let schema = Schema::from_proto(meta.schema.as_ref().ok_or_else(|| ClusterError::Corrupt("catalog entry without schema".into()))?)?;
            let (c, j) = Collection::open(meta.id, meta.created_ts, schema, &collection_dir(dir, meta.id), &opts.shard, &clock)?;
            let c = Arc::new(c);
            jobs.push((c.clone(), j));
            collections.insert(c.schema().name.clone(), c);
        }
        remove_orphans(dir, &catalog)?;

        let search_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.search_threads.max(1))
            .thread_name(|i| format!("tandem-search-{i}"))
            .panic_handler(|_| tracing::error!("a search task panicked"))
            .build()
            .map_err(|e| ClusterError::Internal(format!("search pool: {e}")))?;
        let node = Arc::new(Node {
            clock,
            role: RwLock::new(opts.role),
            epoch: AtomicU64::new(1),
            collections: RwLock::new(collections),
            catalog: Mutex::new(catalog.next_collection_id.max(1)),
            search_pool,
            jobs: Mutex::new(None),
            builders: Mutex::new(Vec::new()),
            fanout: Arc::new(LocalFanout),
            index_failures: AtomicU64::new(0),
            opts,
            _lock: lock,
        });
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
            let h = std::thread::Builder::new()
                .name(format!("tandem-index-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().recv();
                        let Ok(job) = job else { return };
                        if let Err(e) = build_index(job) {
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

    fn enqueue(&self, c: &Arc<Collection>, jobs: IndexJobs) {
        let tx = self.jobs.lock();
        let Some(tx) = tx.as_ref() else { return };
        for (shard, segment) in jobs {
            let _ = tx.send(Job { collection: Arc::downgrade(c), shard, segment });
        }
    }

    /// Stops the index builders after the jobs in flight (queued ones are dropped: they are
    /// rebuilt from the manifest at the next start). Blocking.
    pub fn shutdown(&self) {
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
        if role.accepts_writes() {
            Ok(())
        } else {
            Err(ClusterError::Unavailable(format!("cluster {} is {role} and does not accept writes", self.opts.cluster_id)))
        }
    }

    fn write_catalog(&self, collections: &BTreeMap<String, Arc<Collection>>, next_id: u64) -> Result<()> {
        let catalog = st::Catalog {
            collections: collections
                .values()
                .map(|c| st::CollectionMeta { id: c.id, schema: Some(c.schema().to_proto()), created_ts: c.created_ts })
                .collect(),
            next_collection_id: next_id,
            max_ts: self.clock.peek(),
        };
        fsio::write_atomic(&self.opts.data_dir.join("catalog"), &catalog.encode_to_vec())
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
        let (c, _) = Collection::open(id, ts, schema, &collection_dir(&self.opts.data_dir, id), &self.opts.shard, &self.clock)?;
        let c = Arc::new(c);
        let mut all = self.collections.read().clone();
        all.insert(c.schema().name.clone(), c.clone());
        *next_id = id + 1;
        if let Err(e) = self.write_catalog(&all, id + 1) {
            let _ = std::fs::remove_dir_all(c.dir());
            return Err(e);
        }
        *self.collections.write() = all;
        tracing::info!(collection = %c.schema().name, id, "collection created");
        Ok((c, ts))
    }

    /// Blocking (fsync, directory removal).
    pub fn drop_collection(&self, name: &str) -> Result<Ts> {
        self.check_writable()?;
        let next_id = self.catalog.lock();
        let c = self.collection(name)?;
        let ts = self.clock.now();
        let mut all = self.collections.read().clone();
        all.remove(name);
        self.write_catalog(&all, *next_id)?;
        *self.collections.write() = all;
        c.mark_dropped();
        // The catalog no longer lists it, so a crash here leaves an orphan that the next start
        // removes.
        if let Err(e) = std::fs::remove_dir_all(c.dir()) {
            tracing::warn!(error = %e, dir = %c.dir().display(), "could not remove a dropped collection's files");
        }
        tracing::info!(collection = name, "collection dropped");
        Ok(ts)
    }

    /// Replaces the index of a collection; sealed segments are rebuilt in the background.
    pub fn create_index(&self, name: &str, spec: Option<&pb::IndexSpec>) -> Result<Ts> {
        self.check_writable()?;
        if spec.and_then(|s| s.kind.as_ref()).is_none() {
            return Err(ClusterError::invalid("create index needs an index: flat, ivf_flat or hnsw"));
        }
        let kind = IndexKind::from_proto(spec)?;
        self.set_index(name, kind)
    }

    pub fn drop_index(&self, name: &str) -> Result<Ts> {
        self.check_writable()?;
        self.set_index(name, IndexKind::Flat)
    }

    fn set_index(&self, name: &str, kind: IndexKind) -> Result<Ts> {
        let next_id = self.catalog.lock();
        let c = self.collection(name)?;
        let old = c.schema();
        let mut schema = (*old).clone();
        schema.index = kind;
        c.set_schema(schema);
        // Issued before the catalog is written, so the catalog's max_ts covers it.
        let ts = self.clock.now();
        if let Err(e) = self.write_catalog(&self.collections.read(), *next_id) {
            c.set_schema((*old).clone());
            return Err(e);
        }
        let jobs: IndexJobs = c.shards().iter().enumerate().flat_map(|(i, s)| s.sealed_segments().into_iter().map(move |seg| (i, seg))).collect();
        self.enqueue(&c, jobs);
        Ok(ts)
    }

    /// Applies a write. Blocking (fsync): call from a blocking thread.
    pub fn write(&self, c: &Arc<Collection>, write: Write) -> Result<(Ts, u64)> {
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
            let kind = c.schema().index;
            let done = c.shards().iter().all(|s| {
                s.sealed_segments().iter().all(|seg| seg.is_persisted() && seg.index().is_some_and(|i| i.kind() == kind))
            });
            if done {
                return Ok((n, ts));
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::DeadlineExceeded(format!("flush of collection {:?}: segments are still being indexed", c.schema().name)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs CPU-bound work on the search pool.
    pub async fn on_search_pool<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.search_pool.spawn(move || {
            let _ = tx.send(f());
        });
        rx.await.map_err(|_| ClusterError::Internal("a search task failed unexpectedly".into()))?
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

fn build_index(job: Job) -> Result<()> {
    let Some(c) = job.collection.upgrade() else { return Ok(()) };
    if c.is_dropped() {
        return Ok(());
    }
    let schema = c.schema();
    let seg = &job.segment;
    if seg.index().is_none_or(|i| i.kind() != schema.index) {
        let started = Instant::now();
        let index = AnnIndex::build(schema.index, schema.metric, schema.dim, &seg.rows.vectors)?;
        seg.set_index(Arc::new(index));
        tracing::debug!(collection = %schema.name, segment = seg.id, rows = seg.len(), index = %schema.index, ms = started.elapsed().as_millis() as u64, "segment indexed");
    }
    if c.is_dropped() {
        return Ok(());
    }
    c.shards()[job.shard].checkpoint(&schema)
}
