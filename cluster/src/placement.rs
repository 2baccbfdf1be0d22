//! The proxy's side of a cluster with query nodes: which query node holds a copy of which sealed
//! segment, keeping every segment copied once in each replica group, and a [`Fanout`] that
//! scatters a search over those copies and gathers the top-k (seeds: in-memory replica, MEP 23,
//! Mishards).
//!
//! ```text
//!  search ─► Placement::search ─┬─ per shard: sealed segments no query node holds yet (and the
//!                               │  growing rows when no shard leader is live), searched here
//!                               ├─ per (query node, shard): the segments one replica group's
//!                               │  copies hold, and the growing rows when the node leads the
//!                               │  shard, sent as one sub-search at the read's snapshot
//!                               └─ merge_topk
//! ```
//!
//! **Shard leaders** (seeds: the streaming replica). In every group holding a collection, one
//! live node leads each shard ([`Placement::leader`]): each round tells it where the writer's
//! growing rows begin (`LoadRequest.lead_from`), and it keeps every row the shard's stream
//! inserts from there (query_node.rs). A search reads, in one view of the shard, the sealed
//! segments and where the growing rows begin (`Shard::view`), and asks the leader of its turn's
//! group for the rows from there; this process searches only the sealed segments of that view
//! that no copy took. A segment sealed after the view holds rows past that position, so the
//! leader answers for it. A leader that cannot (new, or restarted: it answers
//! `growing_searched = false`) or fails leaves those rows to be searched here, with every
//! segment sealed since the view.
//!
//! Groups take turns per search, so R groups share the load, and a node still busy with an
//! earlier search (a slow machine, a long search) has its turn taken by an idle copy in another
//! group (long-tail stealing, decided when a sub-search is sent). A sub-search that straggles
//! once sent (well past the fastest node's usual answer time) is asked of idle copies too, and
//! the first full answer is taken (mid-search, [`Placement::gather`]). A sub-search that fails, or names
//! segments its node no longer holds (a restarted node), is searched here instead, at the same
//! snapshot: the writer still holds every segment, so a lost query node costs no search. The
//! node's copies are forgotten and the placement loop gives them to the group's other nodes.
//!
//! The placement loop runs every [`PLACE_EVERY`]: every sealed segment with its index built is
//! loaded on the least-loaded live node of each group; copies of segments that are gone
//! (dropped collections) are released; a node that failed is probed and, once it answers, given
//! segments again after it released what it still held; a group whose nodes hold uneven numbers
//! of copies is evened out (a node back from a failure gets its share). A round that changed the
//! placement puts it in its [`StateStore`] (coordinator state), which a restarted proxy starts
//! from.
//!
//! Once every group holds a segment on a live node, the writer drops that segment's index from
//! memory ([`Placement::release_covered`]) and reads it back when a group loses its copy.
//!
//! A collection is held by every group unless LoadCollection set how many
//! ([`Fanout::set_replicas`], Milvus's `replica_number`): then only by the groups chosen, which
//! are kept in the coordinator state beside the copies. "Every group" above means every group
//! holding the collection; a collection held by none is served by this process alone.
//!
//! What this does not do yet (issue 19): the writer keeps the rows of every sealed segment in
//! memory (gets, queries and snapshots read them), and its growing rows too (writes, gets and
//! queries).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use prost::Message;
use rayon::prelude::*;
use tandem_proto::cluster::v1 as qn;
use tandem_proto::cluster::v1::query_node_client::QueryNodeClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::collection::Collection;
use crate::config::QueryNodesConfig;
use crate::error::{ClusterError, Result};
use crate::fanout::{Fanout, LocalFanout};
use crate::node::Node;
use crate::query_node::RowPos;
use crate::segment::{SearchPlan, SegmentId, TopK, merge_topk};

/// How often segments are placed and failed nodes probed.
pub const PLACE_EVERY: Duration = Duration::from_millis(300);

/// How long a stopping placement loop may take to keep its state once more.
const FINAL_SAVE: Duration = Duration::from_secs(2);

/// A joined query node that is down and has not joined again for this long has left its group
/// (it tells the cluster every 2 s while it runs): it is no longer probed, listed or kept.
pub const JOIN_EXPIRES: Duration = Duration::from_secs(30);

/// A sealed segment of a shard of a collection (by collection id).
type SegKey = (u64, u32, SegmentId);

/// Per (collection id, shard): the collection, and the sealed segments that should have copies.
type Wanted = HashMap<(u64, u32), (Arc<Collection>, Vec<SegmentId>)>;

/// Where the proxy keeps its placement (coordinator state), so a restarted proxy starts from it:
/// the arbiter's store under an arbiter (the member assembles that one, `tandem-node`), else
/// [`FileState`] in the data directory.
#[tonic::async_trait]
pub trait StateStore: Send + Sync {
    async fn get(&self) -> Result<Option<Vec<u8>>>;
    async fn put(&self, value: Vec<u8>) -> Result<()>;
    /// Where, for logs and errors.
    fn describe(&self) -> String;
}

/// A file, CRC-checked and replaced atomically. On one machine without etcd: the embedded
/// arbiter keeps its keys in the process's memory, which the restart this state is for empties.
pub struct FileState(pub std::path::PathBuf);

#[tonic::async_trait]
impl StateStore for FileState {
    async fn get(&self) -> Result<Option<Vec<u8>>> {
        let path = self.0.clone();
        tokio::task::spawn_blocking(move || crate::fsio::read_checked(&path)).await.map_err(|e| ClusterError::Internal(e.to_string()))?
    }

    async fn put(&self, value: Vec<u8>) -> Result<()> {
        let path = self.0.clone();
        tokio::task::spawn_blocking(move || crate::fsio::write_atomic(&path, &value))
            .await
            .map_err(|e| ClusterError::Internal(e.to_string()))?
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

/// One query node as the proxy sees it.
pub struct QueryNodeHandle {
    pub endpoint: String,
    client: QueryNodeClient<Channel>,
    up: AtomicBool,
    /// Sub-searches it answered.
    pub searches: AtomicU64,
    /// Searches with a sub-search sent to it and not answered yet: how long its queue is, as
    /// the proxy sees it (per search, not per shard: a node holding every shard's copies is
    /// not busier for it).
    in_flight: AtomicUsize,
    /// Sub-searches it took, while idle, from a busy node whose turn it was (long-tail stealing).
    pub stolen: AtomicU64,
    /// Sub-searches in which it searched a shard's growing rows, as the shard's leader.
    pub led: AtomicU64,
    /// How long its sub-searches usually take to answer, in microseconds (a moving average;
    /// 0 until it answered one): what tells a straggler (mid-search stealing).
    usual_us: AtomicU64,
    /// A node that joined (`Coordinator.Join`): when it last said so. `None`: a listed node.
    last_join: Mutex<Option<Instant>>,
    /// A joined node that stayed down and silent for [`JOIN_EXPIRES`]: it has left its group.
    /// It keeps its place in the list (indexes stay valid), counts as down, is no longer probed,
    /// listed or kept in the state, and a join brings it back.
    left: AtomicBool,
}

impl QueryNodeHandle {
    /// A node at `endpoint`, up until a call fails; connected on its first call.
    fn new(endpoint: &str) -> Result<Arc<QueryNodeHandle>> {
        let channel = Channel::from_shared(endpoint.to_string())
            .map_err(|e| ClusterError::invalid(format!("query node endpoint {endpoint:?}: {e}")))?
            .connect_lazy();
        Ok(Arc::new(QueryNodeHandle {
            endpoint: endpoint.to_string(),
            client: QueryNodeClient::new(channel).max_decoding_message_size(64 << 20),
            up: AtomicBool::new(true),
            searches: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            stolen: AtomicU64::new(0),
            led: AtomicU64::new(0),
            usual_us: AtomicU64::new(0),
            last_join: Mutex::new(None),
            left: AtomicBool::new(false),
        }))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire) && !self.has_left()
    }

    /// It joined its group (`Coordinator.Join`) rather than being listed in `query_nodes.groups`.
    pub fn joined(&self) -> bool {
        self.last_join.lock().is_some()
    }

    /// A joined node gone for good (see `left`).
    pub fn has_left(&self) -> bool {
        self.left.load(Ordering::Acquire)
    }

    /// Counts an answer that took `took` in its usual answer time (a fifth of the weight goes to
    /// the newest, so a node that turns slow or fast shows it within a few answers).
    fn answered_in(&self, took: Duration) {
        let now = (took.as_micros() as u64).max(1);
        let was = self.usual_us.load(Ordering::Relaxed);
        self.usual_us.store(if was == 0 { now } else { (was * 4 + now) / 5 }, Ordering::Relaxed);
    }

    fn usual_answer(&self) -> Option<Duration> {
        Some(self.usual_us.load(Ordering::Relaxed)).filter(|&us| us > 0).map(Duration::from_micros)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts one search in its node's queue while it is alive: shared by the search's sub-searches
/// on that node, and dropped when the last of their calls ends, however it ends.
struct InFlight(Arc<QueryNodeHandle>);

impl InFlight {
    fn new(node: &Arc<QueryNodeHandle>) -> InFlight {
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(node.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The query nodes of each replica group.
pub type Groups = Vec<Vec<Arc<QueryNodeHandle>>>;

pub struct Placement {
    /// The writer's own endpoint, where query nodes load segments and follow streams from.
    source: String,
    /// Per replica group, its nodes: those `query_nodes.groups` lists, then those that joined
    /// (`Coordinator.Join`). Nodes are only ever added, so a node's index in its group, which
    /// `copies` and a search's routes hold, stays valid in every later list.
    groups: RwLock<Arc<Groups>>,
    /// Per segment, per group: the node (index in the group) holding its copy.
    copies: RwLock<HashMap<SegKey, Vec<Option<usize>>>>,
    /// Per collection id, the groups holding its copies, sorted, when `LoadCollection` set
    /// them; a collection not here is held by every group.
    replicas: RwLock<HashMap<u64, Vec<usize>>>,
    next_group: AtomicUsize,
    runtime: tokio::runtime::Handle,
    /// How long a query node may wait for its stream to reach a read's snapshot.
    wait: Duration,
    /// Long-tail stealing on (`query_nodes.steal`).
    steal: bool,
    /// `query_nodes.release_indexes`: see [`Placement::release_covered`].
    release_indexes: bool,
    /// `query_nodes.shard_leaders`: growing rows searched on a shard leader per group.
    shard_leaders: bool,
    local: LocalFanout,
    /// The writer's node, once the loop runs: a search makes its streams tick, so the query
    /// nodes reach the read's snapshot without waiting for the tick interval.
    node: std::sync::OnceLock<Weak<Node>>,
    /// Sub-searches answered here instead (their node failed or no longer held the segments).
    pub rerouted: AtomicU64,
    /// Straggling sub-searches whose segments idle copies answered first (mid-search stealing).
    pub stolen_mid_search: AtomicU64,
    /// Growing rows searched here after all: their leader could not (not leading yet, its rows
    /// begin later) or failed.
    pub growing_here: AtomicU64,
    /// Where the placement is kept (`restore`), and what was last put there.
    store: std::sync::OnceLock<Arc<dyn StateStore>>,
    saved: Mutex<Vec<u8>>,
}

impl Placement {
    /// The query nodes of `cfg` (one list of endpoints per replica group), loading from
    /// `source`. Call from within a tokio runtime: sub-searches run on it.
    pub fn new(source: String, cfg: &QueryNodesConfig) -> Result<Arc<Placement>> {
        let groups = (cfg.groups.iter())
            .map(|g| g.iter().map(|ep| QueryNodeHandle::new(ep)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(Placement {
            source,
            groups: RwLock::new(Arc::new(groups)),
            copies: RwLock::new(HashMap::new()),
            replicas: RwLock::new(HashMap::new()),
            next_group: AtomicUsize::new(0),
            runtime: tokio::runtime::Handle::current(),
            wait: Duration::from_millis(cfg.wait_ms),
            steal: cfg.steal,
            release_indexes: cfg.release_indexes,
            shard_leaders: cfg.shard_leaders,
            local: LocalFanout::default(),
            node: std::sync::OnceLock::new(),
            rerouted: AtomicU64::new(0),
            stolen_mid_search: AtomicU64::new(0),
            growing_here: AtomicU64::new(0),
            store: std::sync::OnceLock::new(),
            saved: Mutex::new(Vec::new()),
        }))
    }

    /// Starts from the placement `store` holds (what this proxy saved before a restart) and keeps
    /// it there from now on, after every round that changed it. Returns how many copies were
    /// restored. A copy on an endpoint no longer configured is dropped, and so is the whole state
    /// when the cluster's own endpoint (`source`) changed. The state is a cache:
    /// a copy its node no longer holds (the node restarted meanwhile) comes back `missing`
    /// from the first search that sends it there, is searched here and placed again (the
    /// reliable segment list), so a stale state costs reroutes, never an answer. Unreadable
    /// state is an error, and the placement starts empty.
    pub async fn restore(&self, store: Arc<dyn StateStore>) -> Result<usize> {
        let _ = self.store.set(store.clone());
        let Some(bytes) = store.get().await? else { return Ok(0) };
        let state = qn::PlacementState::decode(&bytes[..])
            .map_err(|e| ClusterError::Corrupt(format!("the placement state in {} does not parse: {e}", store.describe())))?;
        // The user's setting, whatever became of the copies. A group no longer configured is
        // left out (the collection has fewer replicas until it is loaded again).
        let total = self.groups.read().len();
        *self.replicas.write() = state
            .replicas
            .iter()
            .map(|r| (r.collection_id, r.groups.iter().map(|&g| g as usize).filter(|&g| g < total).collect()))
            .collect();
        // The nodes that joined, before the copies they hold are mapped.
        for j in &state.joined {
            if let Err(e) = self.add_node(&j.endpoint, j.group) {
                tracing::warn!(endpoint = %j.endpoint, group = j.group, error = %e, "a query node that joined is not restored");
            }
        }
        let groups = self.groups();
        if state.source != self.source {
            // The nodes follow the cluster at its old endpoint: every copy is loaded anew from
            // this one (a Load naming another source makes a node start that shard over).
            tracing::info!(was = %state.source, now = %self.source, "the cluster's endpoint changed; placing its segments anew");
            return Ok(0);
        }
        let at: HashMap<&str, (usize, usize)> = (groups.iter().enumerate())
            .flat_map(|(g, group)| group.iter().enumerate().map(move |(n, node)| (node.endpoint.as_str(), (g, n))))
            .collect();
        let restored = {
            let mut copies = self.copies.write();
            for p in state.copies {
                let mut c = vec![None; groups.len()];
                for &(g, n) in p.nodes.iter().filter_map(|ep| at.get(ep.as_str())) {
                    c[g] = Some(n);
                }
                if c.iter().any(Option::is_some) {
                    copies.insert((p.collection_id, p.shard, p.segment), c);
                }
            }
            copies.len()
        };
        *self.saved.lock() = self.encode();
        Ok(restored)
    }

    /// The copies as coordinator state, in a stable order (so an unchanged placement encodes
    /// the same and is not put again).
    fn encode(&self) -> Vec<u8> {
        let copies = self.copies.read();
        // After the copies, so it has every node they name (see `route`).
        let groups = self.groups();
        let mut list: Vec<qn::PlacedCopy> = copies
            .iter()
            .filter(|(_, c)| c.iter().any(Option::is_some))
            .map(|(&(collection_id, shard, segment), c)| qn::PlacedCopy {
                collection_id,
                shard,
                segment,
                nodes: c.iter().enumerate().filter_map(|(g, n)| n.map(|n| groups[g][n].endpoint.clone())).collect(),
            })
            .collect();
        list.sort_unstable_by_key(|c| (c.collection_id, c.shard, c.segment));
        let mut replicas: Vec<qn::CollectionGroups> = (self.replicas.read().iter())
            .map(|(&collection_id, groups)| qn::CollectionGroups { collection_id, groups: groups.iter().map(|&g| g as u32).collect() })
            .collect();
        replicas.sort_unstable_by_key(|r| r.collection_id);
        let joined = (groups.iter().enumerate())
            .flat_map(|(g, nodes)| nodes.iter().map(move |n| (g, n)))
            .filter(|(_, n)| n.joined() && !n.has_left())
            .map(|(g, n)| qn::JoinedNode { endpoint: n.endpoint.clone(), group: g as u32 })
            .collect();
        qn::PlacementState { copies: list, source: self.source.clone(), replicas, joined }.encode_to_vec()
    }

    /// Puts the placement in its store when it changed since it was last put there.
    async fn save(&self) {
        let Some(store) = self.store.get() else { return };
        let bytes = self.encode();
        if *self.saved.lock() == bytes {
            return;
        }
        match store.put(bytes.clone()).await {
            Ok(()) => *self.saved.lock() = bytes,
            // Retried after the next round; meanwhile a restart starts from an older state,
            // which costs reroutes only (see `restore`).
            Err(e) => tracing::warn!(store = %store.describe(), error = %e, "cannot keep the placement of segment copies"),
        }
    }

    /// The groups' nodes now (a node that joins later is in the next list, not this one).
    pub fn groups(&self) -> Arc<Groups> {
        self.groups.read().clone()
    }

    /// Adds `endpoint` to `group` unless it is there already; an endpoint in another group, or
    /// a group the cluster does not have, is refused naming it, and changes nothing.
    fn add_node(&self, endpoint: &str, group: u32) -> Result<bool> {
        let mut groups = self.groups.write();
        let g = group as usize;
        if g >= groups.len() {
            return Err(ClusterError::invalid(format!(
                "group {group} is not a replica group of this cluster: it has {} (query_nodes.groups; docs/scaling.md)",
                groups.len()
            )));
        }
        let uri = endpoint.parse::<tonic::codegen::http::Uri>().ok();
        if !matches!(uri.as_ref().and_then(|u| u.scheme_str()), Some("http" | "https"))
            || uri.and_then(|u| u.authority().cloned()).is_none()
        {
            return Err(ClusterError::invalid(format!("query node endpoint {endpoint:?} is not a URL like http://10.0.0.5:19540")));
        }
        let renew = |node: &QueryNodeHandle| {
            let mut last = node.last_join.lock();
            if last.is_some() {
                *last = Some(Instant::now());
            }
        };
        let live = (groups.iter().enumerate())
            .find_map(|(at, nodes)| nodes.iter().find(|n| n.endpoint == endpoint && !n.has_left()).map(|n| (at, n)));
        if let Some((other, node)) = live {
            if other != g {
                return Err(ClusterError::invalid(format!(
                    "query node {endpoint:?} is in group {other} already and cannot join group {group}: a node holds one group's copies"
                )));
            }
            renew(node);
            return Ok(false);
        }
        // Back in the group it left: its old place, down until a probe finds it (its copies were
        // forgotten when it failed). Back in another group: a new place there.
        if let Some(node) = groups[g].iter().find(|n| n.endpoint == endpoint) {
            renew(node);
            node.left.store(false, Ordering::Release);
            return Ok(true);
        }
        let node = QueryNodeHandle::new(endpoint)?;
        *node.last_join.lock() = Some(Instant::now());
        let mut next = (**groups).clone();
        next[g].push(node);
        *groups = Arc::new(next);
        Ok(true)
    }

    /// Per group, whether it holds copies of collection `cid`'s segments.
    fn holding(&self, cid: u64) -> Vec<bool> {
        let total = self.groups.read().len();
        match self.replicas.read().get(&cid) {
            None => vec![true; total],
            Some(groups) => (0..total).map(|g| groups.contains(&g)).collect(),
        }
    }

    /// Per group, how many segments have a copy there.
    pub fn copies_per_group(&self) -> Vec<usize> {
        let groups = self.groups();
        let copies = self.copies.read();
        (0..groups.len()).map(|g| copies.values().filter(|c| c[g].is_some()).count()).collect()
    }

    /// Forgets every copy on node `n` of group `g` and marks it down (the loop probes it).
    fn node_failed(&self, g: usize, n: usize, why: &str) {
        let groups = self.groups();
        let node = &groups[g][n];
        if node.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(endpoint = %node.endpoint, error = why, "query node failed; its segments go to the other nodes of its group");
        }
        for c in self.copies.write().values_mut() {
            if c[g] == Some(n) {
                c[g] = None;
            }
        }
    }

    /// Forgets the copies `keys` on node `n` of group `g` (a copy that moved to another node
    /// meanwhile, by a rebalance, is kept).
    fn forget(&self, g: usize, n: usize, keys: impl IntoIterator<Item = SegKey>) {
        let mut copies = self.copies.write();
        for k in keys {
            if let Some(c) = copies.get_mut(&k).filter(|c| c[g] == Some(n)) {
                c[g] = None;
            }
        }
    }

    /// Places segments until `stop` fires or the node is gone. Holds the node only during a
    /// round, and a round ends at once when `stop` fires: a stopped node's data directory is
    /// free for the next start as soon as the member has stopped. The placement is kept once
    /// more on the way out: a round cut short, or one whose copies were loaded but which had not
    /// reached its save (index releases and leaders come first), would otherwise leave the next
    /// start an older state and make it load those copies again.
    pub async fn run(self: Arc<Self>, node: Weak<Node>, stop: CancellationToken) {
        let _ = self.node.set(node.clone());
        let mut every = tokio::time::interval(PLACE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = every.tick() => {}
            }
            let Some(node) = node.upgrade() else { return };
            tokio::select! {
                _ = stop.cancelled() => break,
                () = self.place(&node) => {}
            }
        }
        // Bounded: a store that does not answer must not hold the member's stop.
        if tokio::time::timeout(FINAL_SAVE, self.save()).await.is_err() {
            tracing::warn!("the placement of segment copies was not kept on the way out: its store did not answer");
        }
    }

    /// One round of the placement loop (see the module's comment).
    pub async fn place(&self, node: &Node) {
        let groups = self.groups();
        // A cluster that serves no reads (recovering, standing by) feeds no query node: their
        // loads would be refused until it does.
        if !node.role().is_readable() {
            return;
        }
        // What should have copies: every sealed segment a snapshot could ship now.
        let mut wanted: Wanted = HashMap::new();
        for c in node.collections() {
            let schema = c.schema();
            // What a load's snapshot (at the local log's bound) can ship.
            let snap = c.logged_ts(&node.clock);
            for (i, sh) in c.shards().iter().enumerate() {
                let ids: Vec<SegmentId> = sh.shippable_segments(&schema, snap).iter().map(|s| s.id).collect();
                if !ids.is_empty() {
                    wanted.insert((c.id, i as u32), (c.clone(), ids));
                }
            }
        }
        {
            // The setting of a dropped collection goes with it. The list is read under the lock:
            // a LoadCollection right after a create then finds its collection in it.
            let mut replicas = self.replicas.write();
            if !replicas.is_empty() {
                let ids: HashSet<u64> = node.collections().iter().map(|c| c.id).collect();
                replicas.retain(|cid, _| ids.contains(cid));
            }
        }
        let holding: HashMap<u64, Vec<bool>> = wanted.keys().map(|&(cid, _)| (cid, self.holding(cid))).collect();
        let is_wanted = |k: &SegKey| wanted.get(&(k.0, k.1)).is_some_and(|(_, ids)| ids.contains(&k.2));
        // Copies of segments that are gone, and copies in groups that no longer hold their
        // collection (it was loaded with fewer replicas): released per node and shard.
        let mut gone: HashMap<(usize, usize, u64, u32), Vec<SegmentId>> = HashMap::new();
        self.copies.write().retain(|&(cid, shard, seg), c| {
            let held = if is_wanted(&(cid, shard, seg)) { holding.get(&cid) } else { None };
            for (g, n) in c.iter_mut().enumerate() {
                if held.is_none_or(|h| !h[g])
                    && let Some(n) = n.take()
                {
                    gone.entry((g, n, cid, shard)).or_default().push(seg);
                }
            }
            held.is_some()
        });
        for ((g, n, collection_id, shard), segments) in gone {
            let req = qn::ReleaseRequest { collection_id, shard, segments };
            let _ = groups[g][n].client.clone().release(req).await;
        }
        self.probe_down_nodes().await;
        // Loads: per group, each segment without a copy there goes to its least-loaded live node.
        for g in 0..groups.len() {
            let mut load: HashMap<(usize, u64, u32), Vec<SegmentId>> = HashMap::new();
            {
                let mut copies = self.copies.write();
                let mut held = vec![0usize; groups[g].len()];
                for c in copies.values() {
                    if let Some(h) = c[g].and_then(|n| held.get_mut(n)) {
                        *h += 1;
                    }
                }
                for (&(cid, shard), (_, ids)) in wanted.iter().filter(|((cid, _), _)| holding[cid][g]) {
                    for &seg in ids {
                        let c = copies.entry((cid, shard, seg)).or_insert_with(|| vec![None; groups.len()]);
                        if c[g].is_some() {
                            continue;
                        }
                        let Some(n) = (0..held.len()).filter(|&n| groups[g][n].is_up()).min_by_key(|&n| held[n]) else { break };
                        held[n] += 1;
                        load.entry((n, cid, shard)).or_default().push(seg);
                    }
                }
            }
            for ((n, cid, shard), segs) in load {
                let (c, _) = &wanted[&(cid, shard)];
                let Some(held) = self.load_on(g, n, c, shard, segs, None).await else { continue };
                let mut copies = self.copies.write();
                for seg in held {
                    if let Some(c) = copies.get_mut(&(cid, shard, seg)) {
                        c[g] = Some(n);
                    }
                }
            }
            self.rebalance(g, &wanted).await;
        }
        if self.shard_leaders {
            self.lead(node).await;
        }
        if self.release_indexes {
            self.release_covered(node).await;
        }
        self.save().await;
    }

    /// The writer's memory (seed: in-memory replica; query nodes hold the segments): the index
    /// of a sealed segment that every replica group holds on a live node is dropped from memory
    /// here, while its file stays (`Shard::release_index`). Once a group has lost its copy, the
    /// index is read back, so the searches this process takes over until the copy is placed
    /// again run on faiss; a search that reaches a released index before that reads it back
    /// itself. Every group, not one: the loss of one node then costs no read-back, as
    /// searches go to another group's copy.
    async fn release_covered(&self, node: &Node) {
        let groups = self.groups();
        let mut release = Vec::new();
        let mut read_back = Vec::new();
        {
            for c in node.collections() {
                // The groups that hold the collection; none: this process alone serves it.
                let holding = self.holding(c.id);
                let copies = self.copies.read();
                for (i, sh) in c.shards().iter().enumerate() {
                    for seg in sh.sealed_segments() {
                        let covered = holding.contains(&true)
                            && copies.get(&(c.id, i as u32, seg.id)).is_some_and(|c| {
                                (c.iter().enumerate()).all(|(g, n)| !holding[g] || n.is_some_and(|n| groups[g][n].is_up()))
                            });
                        if covered && seg.index().is_some() {
                            release.push((sh.clone(), seg.id));
                        } else if !covered && seg.is_released() {
                            read_back.push(seg);
                        }
                    }
                }
            }
        }
        if release.is_empty() && read_back.is_empty() {
            return;
        }
        // Off the runtime: a release waits for a checkpoint writing index files, and a read-back
        // reads one.
        let released = tokio::task::spawn_blocking(move || {
            for seg in &read_back {
                seg.searchable_index();
            }
            release.iter().filter(|(sh, id)| sh.release_index(*id)).count()
        })
        .await
        .unwrap_or(0);
        if released > 0 {
            tracing::debug!(segments = released, "indexes released: every replica group holds the segments");
        }
    }

    /// Evens out group `g`: while its live node with the most copies holds two or more more than
    /// the one with the fewest, copies move from the one to the other (a node that came back, or
    /// was added, gets its share). A move loads the copy on the new node first and releases the
    /// old one only once the cache points at the new one, so searches always find a copy.
    async fn rebalance(&self, g: usize, wanted: &Wanted) {
        let groups = self.groups();
        let moves = {
            let copies = self.copies.read();
            let live: Vec<usize> = (0..groups[g].len()).filter(|&n| groups[g][n].is_up()).collect();
            let mut held: HashMap<usize, Vec<SegKey>> = live.iter().map(|&n| (n, Vec::new())).collect();
            for (k, c) in copies.iter() {
                if let Some(keys) = c[g].and_then(|n| held.get_mut(&n)) {
                    keys.push(*k);
                }
            }
            held.values_mut().for_each(|keys| keys.sort_unstable());
            let mut moves: HashMap<(usize, usize, u64, u32), Vec<SegmentId>> = HashMap::new();
            while let (Some(&from), Some(&to)) = (live.iter().max_by_key(|n| held[n].len()), live.iter().min_by_key(|n| held[n].len())) {
                if held[&from].len() <= held[&to].len() + 1 {
                    break;
                }
                let Some(k) = held.get_mut(&from).and_then(Vec::pop) else { break };
                if let Some(keys) = held.get_mut(&to) {
                    keys.push(k);
                }
                moves.entry((from, to, k.0, k.1)).or_default().push(k.2);
            }
            moves
        };
        for ((from, to, cid, shard), segs) in moves {
            let Some((c, _)) = wanted.get(&(cid, shard)) else { continue };
            let Some(loaded) = self.load_on(g, to, c, shard, segs, None).await else { continue };
            let moved: Vec<SegmentId> = {
                let mut copies = self.copies.write();
                let mut moved = Vec::new();
                for seg in loaded {
                    if let Some(c) = copies.get_mut(&(cid, shard, seg)).filter(|c| c[g] == Some(from)) {
                        c[g] = Some(to);
                        moved.push(seg);
                    }
                }
                moved
            };
            if !moved.is_empty() {
                tracing::info!(from = %groups[g][from].endpoint, to = %groups[g][to].endpoint, segments = moved.len(), "copies rebalanced");
                let req = qn::ReleaseRequest { collection_id: cid, shard, segments: moved };
                let _ = groups[g][from].client.clone().release(req).await;
            }
        }
    }

    /// Every (group, node, collection, shard) where the node leads the shard of the collection
    /// in a group holding it.
    fn leaders(&self, node: &Node) -> Vec<(usize, usize, Arc<Collection>, u32)> {
        let groups = self.groups();
        let mut out = Vec::new();
        for c in node.collections() {
            let holding = self.holding(c.id);
            for shard in 0..c.shards().len() as u32 {
                for g in (0..groups.len()).filter(|&g| holding[g]) {
                    if let Some(n) = leader(&groups[g], c.id, shard) {
                        out.push((g, n, c.clone(), shard));
                    }
                }
            }
        }
        out
    }

    /// Tells each shard's leader, in every group holding its collection, where the writer's
    /// growing rows begin: a new leader starts keeping them, the others drop the rows sealed
    /// since. Every collection, not only those with sealed segments: the growing rows of a
    /// young collection are all it has.
    async fn lead(&self, node: &Node) {
        for (g, n, c, shard) in self.leaders(node) {
            let from = c.shards()[shard as usize].growing_start();
            self.load_on(g, n, &c, shard, Vec::new(), Some(from)).await;
        }
    }

    /// Loads `segments` of `c`'s `shard` on node `n` of group `g` (and makes it lead the shard
    /// from `lead_from`): the segments it now holds, or `None` when it failed (a transport
    /// failure marks the node down).
    async fn load_on(
        &self,
        g: usize,
        n: usize,
        c: &Collection,
        shard: u32,
        segments: Vec<SegmentId>,
        lead_from: Option<RowPos>,
    ) -> Option<Vec<SegmentId>> {
        let groups = self.groups();
        let req = qn::LoadRequest {
            source: self.source.clone(),
            collection_id: c.id,
            schema: Some(c.schema().to_proto()),
            shard,
            segments,
            lead_from: lead_from.map(|(lsn, row)| qn::RowPosition { lsn, row }),
        };
        match groups[g][n].client.clone().load(req).await {
            Ok(resp) => Some(resp.into_inner().held),
            Err(s) if is_node_failure(&s) => {
                self.node_failed(g, n, s.message());
                None
            }
            Err(s) => {
                tracing::warn!(endpoint = %groups[g][n].endpoint, error = %s.message(), "query node refused a load");
                None
            }
        }
    }

    /// A node marked down that answers again releases what it still holds (its copies were
    /// forgotten when it failed) and is live again.
    async fn probe_down_nodes(&self) {
        let groups = self.groups();
        for group in groups.iter() {
            for node in group.iter().filter(|n| !n.is_up() && !n.has_left()) {
                let silent = node.last_join.lock().is_some_and(|at| at.elapsed() >= JOIN_EXPIRES);
                if silent {
                    node.left.store(true, Ordering::Release);
                    tracing::info!(endpoint = %node.endpoint, "a joined query node stayed down and silent; it has left its group");
                    continue;
                }
                let Ok(status) = node.client.clone().status(qn::StatusRequest {}).await else { continue };
                for s in status.into_inner().shards {
                    let req = qn::ReleaseRequest { collection_id: s.collection_id, shard: s.shard, segments: Vec::new() };
                    let _ = node.client.clone().release(req).await;
                }
                node.up.store(true, Ordering::Release);
                tracing::info!(endpoint = %node.endpoint, "query node is back");
            }
        }
    }

    /// Where each sealed segment of `collection` is searched: per (group, node, shard), the
    /// segments of one sub-search. Groups take turns: a segment goes to the copy in this
    /// search's group, else to the next group's, among live nodes; a segment without a live
    /// copy stays here. Long-tail stealing (MEP 23): when the turn's node is busy (a search of
    /// ours outstanding there) and another copy's node is idle (none), the idle one takes the
    /// segment. Busy against busy keeps the turn: turns already share a steady load evenly, and
    /// stealing is for the node a queue forms behind. A shard's growing rows go to its leader
    /// in the first group, in turn order, that has a live one.
    fn route(&self, collection: &Collection) -> Routed {
        let first = self.next_group.fetch_add(1, Ordering::Relaxed);
        // A group that no longer holds the collection keeps its copies until the next round
        // releases them: not sent there meanwhile, so a search does not race the release.
        let holding = self.holding(collection.id);
        let copies = self.copies.read();
        // Read after the copies: a node is in the list before any copy is placed on it, so
        // every node the copies name is in this one.
        let groups = self.groups();
        let queue = |(g, n): (usize, usize)| groups[g][n].in_flight();
        let count = groups.len();
        let mut remote: HashMap<(usize, usize, u32), Route> = HashMap::new();
        let mut known = Vec::with_capacity(collection.shards().len());
        let mut led = vec![false; collection.shards().len()];
        for (si, sh) in collection.shards().iter().enumerate() {
            let (sealed, growing) = sh.view();
            known.push(sealed.iter().map(|s| s.id).collect::<HashSet<_>>());
            if self.shard_leaders
                && let Some(from) = growing
                && let Some((g, n)) = (0..count)
                    .map(|i| (first + i) % count)
                    .filter(|&g| holding[g])
                    .find_map(|g| leader(&groups[g], collection.id, si as u32).map(|n| (g, n)))
            {
                remote.entry((g, n, si as u32)).or_default().growing = Some(from);
                led[si] = true;
            }
            for seg in sealed {
                let Some(c) = copies.get(&(collection.id, si as u32, seg.id)) else { continue };
                let mut holders = (0..c.len())
                    .map(|i| (first + i) % c.len())
                    .filter(|&g| holding[g])
                    .filter_map(|g| c[g].map(|n| (g, n)))
                    .filter(|&(g, n)| groups[g][n].is_up());
                let Some(turn) = holders.next() else { continue };
                let idle = if self.steal && queue(turn) > 0 { holders.find(|&h| queue(h) == 0) } else { None };
                let (g, n) = idle.unwrap_or(turn);
                let route = remote.entry((g, n, si as u32)).or_default();
                route.segments.push(seg.id);
                route.stolen |= idle.is_some();
            }
        }
        Routed { remote, known, led }
    }
}

/// Where a search goes ([`Placement::route`]).
struct Routed {
    /// Per (group, node, shard): one sub-search.
    remote: HashMap<(usize, usize, u32), Route>,
    /// Per shard, the sealed segments of the view the search was routed from.
    known: Vec<HashSet<SegmentId>>,
    /// Per shard: its growing rows were sent to a leader.
    led: Vec<bool>,
}

/// One sub-search: the segments a node searches for one shard, and the growing rows from a
/// position when it leads the shard.
#[derive(Default)]
struct Route {
    segments: Vec<SegmentId>,
    growing: Option<RowPos>,
    /// Some of the segments were the turn of a busy node.
    stolen: bool,
}

/// The node of `group` that leads `shard` of collection `cid`: its live nodes take the shards in
/// turn, so a group's leaders spread over its nodes, and a node's death moves its shards to the
/// others at once (their first searches are answered here until the next round makes them
/// lead).
fn leader(group: &[Arc<QueryNodeHandle>], cid: u64, shard: u32) -> Option<usize> {
    // On every search's path: counted, not collected.
    let live = || (0..group.len()).filter(|&n| group[n].is_up());
    let count = live().count();
    (count > 0).then(|| live().nth((cid as usize).wrapping_add(shard as usize) % count)).flatten()
}

/// `Coordinator`, served by a cluster beside its API: query nodes that enter a replica group
/// themselves (`tandem query-node --join`), beside those `query_nodes.groups` lists. A cluster
/// without query nodes refuses (its fanout has no groups).
pub struct CoordinatorService(pub Arc<Node>);

#[tonic::async_trait]
impl qn::coordinator_server::Coordinator for CoordinatorService {
    async fn join(&self, req: tonic::Request<qn::JoinRequest>) -> std::result::Result<tonic::Response<qn::JoinResponse>, tonic::Status> {
        let r = req.into_inner();
        let added = self.0.fanout().join(&r.endpoint, r.group)?;
        Ok(tonic::Response::new(qn::JoinResponse { added }))
    }
}

/// A failure that says the node (or the way to it) is gone, not a refusal it answered: the
/// client's own transport error (it carries its cause), or a connection cut mid-call.
fn is_node_failure(s: &tonic::Status) -> bool {
    std::error::Error::source(s).is_some() || matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
}

impl Fanout for Placement {
    fn query_nodes(&self) -> Vec<tandem_proto::v1::QueryNodeStatus> {
        let groups = self.groups();
        // Per (group, node): the shards it leads, by collection name and shard number.
        let mut leads: HashMap<(usize, usize), Vec<tandem_proto::v1::LedShard>> = HashMap::new();
        if self.shard_leaders
            && let Some(node) = self.node.get().and_then(Weak::upgrade)
        {
            for (g, n, c, shard) in self.leaders(&node) {
                let collection = c.schema().name.clone();
                leads.entry((g, n)).or_default().push(tandem_proto::v1::LedShard { collection, shard });
            }
        }
        let copies = self.copies.read();
        let mut out = Vec::new();
        for (g, group) in groups.iter().enumerate() {
            for (n, node) in group.iter().enumerate().filter(|(_, node)| !node.has_left()) {
                let mut led_shards = leads.remove(&(g, n)).unwrap_or_default();
                led_shards.sort_unstable_by(|a, b| (&a.collection, a.shard).cmp(&(&b.collection, b.shard)));
                out.push(tandem_proto::v1::QueryNodeStatus {
                    group: g as u32,
                    endpoint: node.endpoint.clone(),
                    up: node.is_up(),
                    segments: copies.values().filter(|c| c[g] == Some(n)).count() as u64,
                    searches: node.searches.load(Ordering::Relaxed),
                    stolen: node.stolen.load(Ordering::Relaxed),
                    shards_led: led_shards.len() as u32,
                    growing_searches: node.led.load(Ordering::Relaxed),
                    led_shards,
                    joined: node.joined(),
                });
            }
        }
        out
    }

    fn check_replicas(&self, replicas: u32) -> Result<()> {
        let groups = self.groups();
        if replicas as usize > groups.len() {
            return Err(ClusterError::invalid(format!(
                "replicas {replicas} is more than the {} replica group(s) this cluster has (query_nodes.groups; docs/scaling.md)",
                groups.len()
            )));
        }
        Ok(())
    }

    fn set_replicas(&self, collection_id: u64, replicas: Option<u32>) -> Result<Vec<u32>> {
        let groups = self.groups();
        let total = groups.len();
        let chosen = match replicas {
            None => None,
            Some(n) => {
                self.check_replicas(n)?;
                // The groups that hold it now stay when the number allows (no copy moves for
                // nothing); the rest, to keep or to add, go by fewest copies, so collections
                // loaded with fewer replicas spread over the groups. A group with no live node
                // comes last: it holds few copies because it cannot hold any.
                let load = self.copies_per_group();
                let dead = |g: usize| !groups[g].iter().any(|n| n.is_up());
                let by_load = |gs: &mut Vec<usize>| gs.sort_unstable_by_key(|&g| (dead(g), load[g], g));
                let holding = self.holding(collection_id);
                let mut kept: Vec<usize> = (0..total).filter(|&g| holding[g]).collect();
                by_load(&mut kept);
                kept.truncate(n as usize);
                let mut others: Vec<usize> = (0..total).filter(|g| !kept.contains(g)).collect();
                by_load(&mut others);
                kept.extend(others.into_iter().take(n as usize - kept.len()));
                kept.sort_unstable();
                Some(kept)
            }
        };
        let mut map = self.replicas.write();
        let groups = match chosen {
            None => {
                map.remove(&collection_id);
                (0..total).collect()
            }
            Some(groups) => {
                map.insert(collection_id, groups.clone());
                groups
            }
        };
        tracing::info!(collection_id, groups = ?groups, "replica groups set");
        Ok(groups.into_iter().map(|g| g as u32).collect())
    }

    fn join(&self, endpoint: &str, group: u32) -> Result<bool> {
        let added = self.add_node(endpoint, group)?;
        if added {
            // The next round places copies on it (a rebalance evens its group out) and keeps
            // it in the coordinator state.
            tracing::info!(endpoint, group, "query node joined its replica group");
        }
        Ok(added)
    }

    fn replica_groups(&self, collection_id: u64) -> Vec<u32> {
        (self.holding(collection_id).into_iter().enumerate()).filter(|&(_, h)| h).map(|(g, _)| g as u32).collect()
    }

    fn search(&self, collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK> {
        let Routed { remote, known, led } = self.route(collection);
        // After routing: it has every node the routes name. The search's sub-searches, and the
        // copies asked mid-search, all use this one list.
        let groups = self.groups();
        // Failpoint: the search waits here (the argument, in ms) with its view taken, while the
        // cluster may seal rows and its leaders trim them. On the search pool, so a plain sleep.
        if let Some(ms) = crate::failpoint::fired("placement::routed") {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
        }
        if remote.is_empty() {
            return self.local.search(collection, plan);
        }
        let started = std::time::Instant::now();
        // The query nodes answer once their streams reach the snapshot: on an idle shard that
        // is the next time tick, so ask for one now.
        if let Some(node) = self.node.get().and_then(Weak::upgrade) {
            node.request_ticks();
        }
        // Every sub-search asks this, of its own shard and segments.
        let template = qn::SegmentSearchRequest {
            collection_id: collection.id,
            shard: 0,
            segments: Vec::new(),
            queries: plan.queries.to_vec(),
            dim: plan.dim as u32,
            k: plan.k as u32,
            metric: plan.metric.to_proto() as i32,
            nprobe: plan.knobs.nprobe as u32,
            ef_search: plan.knobs.ef_search as u32,
            filter: plan.filter.map(|f| f.to_string()).unwrap_or_default(),
            snapshot: plan.snapshot,
            wait_ms: self.wait.as_millis() as u32,
            growing_from: None,
        };
        let mut queued: HashMap<(usize, usize), Arc<InFlight>> = HashMap::new();
        let mut calls = tokio::task::JoinSet::new();
        let mut sent = Vec::with_capacity(remote.len());
        for (&(g, n, shard), route) in &remote {
            let node = &groups[g][n];
            if route.stolen {
                node.stolen.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("tandem_proxy_stolen_total").increment(1);
            }
            let part = Sent { g, n, shard, segments: route.segments.clone(), growing: route.growing };
            let queued = queued.entry((g, n)).or_insert_with(|| Arc::new(InFlight::new(node))).clone();
            let abort = self.send(&groups, &mut calls, &template, &part, queued, Done::Own(sent.len()));
            sent.push((part, abort));
        }
        // From here on only the calls hold their node's count.
        drop(queued);
        // Meanwhile, what stays here: the sealed segments no copy took, and the growing rows no
        // leader took. Where a leader took them, only the sealed segments of the routed view: a
        // segment sealed since holds rows the leader searches.
        let mut away: Vec<HashSet<SegmentId>> = vec![HashSet::new(); collection.shards().len()];
        for (&(_, _, shard), route) in &remote {
            away[shard as usize].extend(&route.segments);
        }
        // The shards in parallel on the pool, as LocalFanout searches them.
        let mut parts = (collection.shards().par_iter().enumerate())
            .map(|(si, sh)| {
                let (away, known) = (&away[si], &known[si]);
                match led[si] {
                    true => sh.search_part(plan, false, |id| known.contains(&id) && !away.contains(&id)),
                    false => sh.search_part(plan, true, |id| !away.contains(&id)),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let answers = self.runtime.block_on(self.gather(&groups, &template, sent, calls, started));
        for (sent, answered) in answers {
            let (g, n, shard) = (sent.g, sent.n, sent.shard);
            let segs = &sent.segments;
            let asked_growing = sent.growing.is_some();
            // The segments to search here after all, and whether the growing rows are too.
            let (again, growing_again): (HashSet<SegmentId>, bool) = match answered {
                Ok(resp) => match decode(&resp, plan.nq()) {
                    Ok(hits) => {
                        let node = &groups[g][n];
                        node.searches.fetch_add(1, Ordering::Relaxed);
                        if asked_growing && resp.growing_searched {
                            node.led.fetch_add(1, Ordering::Relaxed);
                        }
                        parts.push(hits);
                        if !resp.missing.is_empty() {
                            self.forget(g, n, resp.missing.iter().map(|&s| (collection.id, shard, s)));
                        }
                        (resp.missing.into_iter().collect(), asked_growing && !resp.growing_searched)
                    }
                    // A malformed answer (a node of another version?): its part is searched here.
                    Err(e) => {
                        tracing::warn!(endpoint = %groups[g][n].endpoint, error = %e, "a query node's answer does not parse; searching its part here");
                        (segs.iter().copied().collect(), asked_growing)
                    }
                },
                Err(s) => {
                    if is_node_failure(&s) {
                        self.node_failed(g, n, s.message());
                    } else {
                        tracing::debug!(endpoint = %groups[g][n].endpoint, error = %s.message(), "a sub-search was refused; searching here");
                    }
                    (segs.iter().copied().collect(), asked_growing)
                }
            };
            if !again.is_empty() {
                self.rerouted.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("tandem_proxy_rerouted_total").increment(1);
            }
            if growing_again {
                self.growing_here.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("tandem_proxy_growing_here_total").increment(1);
            }
            if !again.is_empty() || growing_again {
                // The growing rows from the routed view on: those still growing, and those in
                // segments sealed since (not in the view).
                let known = &known[shard as usize];
                let sh = &collection.shards()[shard as usize];
                parts.push(sh.search_part(plan, growing_again, |id| again.contains(&id) || (growing_again && !known.contains(&id)))?);
            }
        }
        Ok(merge_topk(plan.metric, plan.k, plan.nq(), parts))
    }
}

/// A sub-search: the node (group, index), and the shard and segments it asks for (the rest of
/// the request is the search's, the same for every sub-search).
#[derive(Clone)]
struct Sent {
    g: usize,
    n: usize,
    shard: u32,
    segments: Vec<SegmentId>,
    /// The shard's growing rows from here on, asked of its leader.
    growing: Option<RowPos>,
}

type Answer = std::result::Result<qn::SegmentSearchResponse, tonic::Status>;

/// Which sub-search a finished call was: a search's own (by its index), or one of the copies
/// that took a straggler's segments over (the straggler's index, the copy's index).
#[derive(Clone, Copy)]
enum Done {
    Own(usize),
    Stolen(usize, usize),
}

/// How long a sub-search the search no longer waits for may still hold its node's place in the
/// queue (a node that never answers must not look busy for ever).
const ABANDONED_LIMIT: Duration = Duration::from_secs(10);

/// Mid-search stealing waits this long past twice the fastest node's usual answer: a sub-search
/// of a few milliseconds that hiccups (a scheduler's slice on a busy machine) is not worth asking
/// twice for.
const STEAL_SLACK: Duration = Duration::from_millis(5);

impl Placement {
    /// Sends `sent` (`template` of its shard and segments) on the runtime, counted in its node's
    /// queue while `queued` lives; the call ends in `calls`, tagged `done`.
    fn send(
        &self,
        groups: &Groups,
        calls: &mut tokio::task::JoinSet<(Done, Answer)>,
        template: &qn::SegmentSearchRequest,
        sent: &Sent,
        queued: Arc<InFlight>,
        done: Done,
    ) -> tokio::task::AbortHandle {
        let node = groups[sent.g][sent.n].clone();
        let req = qn::SegmentSearchRequest {
            shard: sent.shard,
            segments: sent.segments.clone(),
            growing_from: sent.growing.map(|(lsn, row)| qn::RowPosition { lsn, row }),
            ..template.clone()
        };
        // Failpoint: a copy asked mid-search fails as a node that went away does.
        let refused = matches!(done, Done::Stolen(..)) && crate::failpoint::fired("placement::stolen_call").is_some();
        let began = std::time::Instant::now();
        // The call runs on its own, and goes on when the search stops waiting for it (the other
        // side of a steal won): the node is still working on it, so it stays counted in the
        // node's queue (send-time stealing then passes it over) until it answers, and its answer
        // time still counts in its usual one. Abandoned, it is given ABANDONED_LIMIT at most.
        let (mut tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(async move {
            let mut client = node.client.clone();
            let call = async move {
                if refused {
                    return Err(tonic::Status::unavailable("failpoint placement::stolen_call"));
                }
                client.search(req).await
            };
            let abandoned = async {
                tx.closed().await;
                tokio::time::sleep(ABANDONED_LIMIT).await;
            };
            let answer = tokio::select! {
                answer = call => Some(answer.map(|r| r.into_inner())),
                () = abandoned => None,
            };
            drop(queued);
            if let Some(answer) = answer {
                if answer.is_ok() {
                    node.answered_in(began.elapsed());
                }
                let _ = tx.send(answer);
            }
        });
        let lost = || tonic::Status::internal("a sub-search ended without an answer");
        calls.spawn_on(async move { (done, rx.await.unwrap_or_else(|_| Err(lost()))) }, &self.runtime)
    }

    /// Waits for every sub-search of a search begun at `started`, and returns each answer with
    /// what was asked. Long-tail stealing, mid-search (MEP 23): a sub-search still out when
    /// twice the fastest live node's usual answer time has passed is a straggler, and when
    /// every segment it holds has a copy on an idle node in another group holding the
    /// collection, those copies are asked too, at the same snapshot. Whichever side answers in
    /// full first is taken and the other's calls are no longer waited for; copies answer
    /// exactly as the straggler would (the same index files, the same deletes at the
    /// snapshot), so the search's answer does not depend on who won. A copy that fails leaves
    /// the straggler to answer.
    async fn gather(
        &self,
        groups: &Groups,
        template: &qn::SegmentSearchRequest,
        sent: Vec<(Sent, tokio::task::AbortHandle)>,
        mut calls: tokio::task::JoinSet<(Done, Answer)>,
        started: std::time::Instant,
    ) -> Vec<(Sent, Answer)> {
        let mut resolved = vec![false; sent.len()];
        // Per sub-search: None until stealing was tried; then the copies asked, with their
        // answers as they come (empty: none was asked, or one failed).
        type Copies = Vec<(Sent, tokio::task::AbortHandle, Option<Answer>)>;
        let mut stolen: Vec<Option<Copies>> = (0..sent.len()).map(|_| None).collect();
        let mut out = Vec::with_capacity(sent.len());
        while resolved.contains(&false) {
            let usual = fastest_answer(groups);
            let steal = self.steal && usual.is_some() && (0..sent.len()).any(|i| !resolved[i] && stolen[i].is_none());
            let at = started + usual.unwrap_or_default() * 2 + STEAL_SLACK;
            let next = tokio::select! {
                next = calls.join_next() => next,
                () = tokio::time::sleep_until(at.into()), if steal => {
                    // Idle as the stragglers are found: a node asked for one straggler's
                    // segments may take another's too (a slow node's shards straggle together).
                    let idle: HashSet<(usize, usize)> = (groups.iter().enumerate())
                        .flat_map(|(g, group)| group.iter().enumerate().map(move |(n, node)| ((g, n), node)))
                        .filter(|(_, node)| node.is_up() && node.in_flight() == 0)
                        .map(|(at, _)| at)
                        .collect();
                    for i in 0..sent.len() {
                        if !resolved[i] && stolen[i].is_none() {
                            stolen[i] = Some(self.steal_from(groups, template, i, &sent[i].0, &idle, &mut calls));
                        }
                    }
                    continue;
                }
            };
            // Empty once every call ended; a call that ended without its answer is caught below.
            let Some(next) = next else { break };
            // A dropped call (the other side won) ends as cancelled: nothing to do.
            let Ok((done, answer)) = next else { continue };
            match done {
                Done::Own(i) if !resolved[i] => {
                    resolved[i] = true;
                    for (_, abort, _) in stolen[i].take().unwrap_or_default() {
                        abort.abort();
                    }
                    out.push((sent[i].0.clone(), answer));
                }
                Done::Stolen(i, j) if !resolved[i] => {
                    let Some(copies) = stolen[i].as_mut() else { continue };
                    if answer.is_err() {
                        for (_, abort, _) in copies.drain(..) {
                            abort.abort();
                        }
                        continue;
                    }
                    let Some(slot) = copies.get_mut(j) else { continue };
                    slot.2 = Some(answer);
                    if copies.iter().all(|(_, _, a)| a.is_some()) {
                        resolved[i] = true;
                        sent[i].1.abort();
                        self.stolen_mid_search.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("tandem_proxy_stolen_mid_search_total").increment(1);
                        for (s, _, a) in stolen[i].take().unwrap_or_default() {
                            out.extend(a.map(|a| (s, a)));
                        }
                    }
                }
                _ => {}
            }
        }
        // Only a call that panicked ends without an answer: its part is searched here.
        for (i, _) in resolved.iter().enumerate().filter(|(_, r)| !**r) {
            out.push((sent[i].0.clone(), Err(tonic::Status::internal("a sub-search ended without an answer"))));
        }
        out
    }

    /// Asks copies on `idle` nodes of other groups for the segments of sub-search `i`,
    /// `straggler`: one call per node, tagged as its copies. Nothing is asked unless every
    /// segment has one, and, when the straggler leads the shard, an idle leader of another group
    /// takes the growing rows.
    fn steal_from(
        &self,
        groups: &Groups,
        template: &qn::SegmentSearchRequest,
        i: usize,
        straggler: &Sent,
        idle: &HashSet<(usize, usize)>,
        calls: &mut tokio::task::JoinSet<(Done, Answer)>,
    ) -> Vec<(Sent, tokio::task::AbortHandle, Option<Answer>)> {
        let (collection_id, shard) = (template.collection_id, straggler.shard);
        let holding = self.holding(collection_id);
        let mut by_node: HashMap<(usize, usize), Vec<SegmentId>> = HashMap::new();
        {
            let copies = self.copies.read();
            for &seg in &straggler.segments {
                let copy = copies.get(&(collection_id, shard, seg)).and_then(|c| {
                    (0..c.len())
                        .filter(|&g| g != straggler.g && holding[g])
                        .filter_map(|g| c[g].map(|n| (g, n)))
                        .find(|at| idle.contains(at))
                });
                let Some(at) = copy else { return Vec::new() };
                by_node.entry(at).or_default().push(seg);
            }
        }
        let mut growing = None;
        if let Some(from) = straggler.growing {
            let idle_leader = (0..groups.len())
                .filter(|&g| g != straggler.g && holding[g])
                .filter_map(|g| leader(&groups[g], collection_id, shard).map(|n| (g, n)))
                .find(|at| idle.contains(at));
            let Some(at) = idle_leader else { return Vec::new() };
            by_node.entry(at).or_default();
            growing = Some((at, from));
        }
        let mut asked = Vec::new();
        for ((g, n), segments) in by_node {
            let node = &groups[g][n];
            node.stolen.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tandem_proxy_stolen_total").increment(1);
            let growing = growing.filter(|&(at, _)| at == (g, n)).map(|(_, from)| from);
            let sent = Sent { g, n, shard, segments, growing };
            let abort = self.send(groups, calls, template, &sent, Arc::new(InFlight::new(node)), Done::Stolen(i, asked.len()));
            asked.push((sent, abort, None));
        }
        tracing::debug!(endpoint = %groups[straggler.g][straggler.n].endpoint, copies = asked.len(), "a straggling sub-search's segments asked of idle copies");
        asked
    }
}

/// The usual answer time of the fastest live node of `groups` that has answered.
fn fastest_answer(groups: &Groups) -> Option<Duration> {
    (groups.iter().flatten()).filter(|n| n.is_up()).filter_map(|n| n.usual_answer()).min()
}

/// A sub-search's answer as a `TopK` of `nq` lists.
fn decode(resp: &qn::SegmentSearchResponse, nq: usize) -> Result<TopK> {
    let total: usize = resp.counts.iter().map(|&c| c as usize).sum();
    if resp.counts.len() != nq || resp.ids.len() != total || resp.distances.len() != total {
        return Err(ClusterError::Internal(format!(
            "a query node answered {} lists of {total} hits ({} ids, {} distances) for {nq} queries",
            resp.counts.len(),
            resp.ids.len(),
            resp.distances.len()
        )));
    }
    let mut out = Vec::with_capacity(nq);
    let mut at = 0;
    for &c in &resp.counts {
        let c = c as usize;
        out.push(resp.distances[at..at + c].iter().copied().zip(resp.ids[at..at + c].iter().copied()).collect());
        at += c;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sub_search_answer_splits_into_lists_or_is_refused_when_its_lengths_disagree() {
        let resp = qn::SegmentSearchResponse {
            counts: vec![2, 0, 1],
            distances: vec![0.5, 1.0, 2.0],
            ids: vec![7, 3, 9],
            missing: vec![],
            growing_searched: false,
        };
        assert_eq!(decode(&resp, 3).unwrap(), vec![vec![(0.5, 7), (1.0, 3)], vec![], vec![(2.0, 9)]]);
        // One list short, or a count that runs past the hits: refused, naming the lengths.
        let e = decode(&resp, 4).unwrap_err().to_string();
        assert!(e.contains("answered 3 lists of 3 hits (3 ids, 3 distances) for 4 queries"), "{e}");
        let bad = qn::SegmentSearchResponse { counts: vec![4], ..resp };
        assert!(decode(&bad, 1).is_err());
    }

    /// Nodes join a group once (again: no change), and a join that names a group the cluster
    /// lacks, a node of another group or no URL is refused naming it. Joined nodes, and not the
    /// listed ones, are kept in the state, and a placement restored from it has them again.
    #[tokio::test]
    async fn joined_nodes_are_checked_counted_once_and_kept_in_the_state() {
        let cfg = QueryNodesConfig { groups: vec![vec!["http://10.0.0.1:19540".into()], vec![]], ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileState(dir.path().join("placement")));
        let p = Placement::new("http://10.0.0.9:19530".into(), &cfg).unwrap();
        assert_eq!(p.restore(store.clone()).await.unwrap(), 0);
        assert!(p.join("http://10.0.0.2:19540", 1).unwrap());
        assert!(!p.join("http://10.0.0.2:19540", 1).unwrap(), "joined twice");
        assert!(!p.join("http://10.0.0.1:19540", 0).unwrap(), "a listed node is in its group already");
        for (endpoint, group, why) in [
            ("http://10.0.0.3:19540", 2, "group 2 is not a replica group of this cluster: it has 2"),
            ("http://10.0.0.1:19540", 1, "\"http://10.0.0.1:19540\" is in group 0 already and cannot join group 1"),
            ("10.0.0.3:19540", 0, "\"10.0.0.3:19540\" is not a URL"),
            ("http://", 0, "is not a URL"),
        ] {
            let e = p.join(endpoint, group).unwrap_err();
            assert!(matches!(e, ClusterError::InvalidArgument(_)) && e.to_string().contains(why), "{endpoint} {group}: {e}");
        }
        let endpoints =
            |p: &Placement| -> Vec<Vec<String>> { p.groups().iter().map(|g| g.iter().map(|n| n.endpoint.clone()).collect()).collect() };
        assert_eq!(endpoints(&p), [vec!["http://10.0.0.1:19540"], vec!["http://10.0.0.2:19540"]]);
        let state = qn::PlacementState::decode(&p.encode()[..]).unwrap();
        assert_eq!(state.joined, [qn::JoinedNode { endpoint: "http://10.0.0.2:19540".into(), group: 1 }]);
        p.save().await;
        let again = Placement::new("http://10.0.0.9:19530".into(), &cfg).unwrap();
        again.restore(store).await.unwrap();
        assert_eq!(endpoints(&again), endpoints(&p));

        // Down and silent for JOIN_EXPIRES: it has left (not listed, not kept); a join brings it
        // back to its place.
        let listed = |p: &Placement| p.query_nodes().into_iter().map(|q| (q.group, q.endpoint, q.up)).collect::<Vec<_>>();
        // (No probe before it expires: the node's address is not reachable from a test.)
        p.node_failed(1, 0, "gone");
        *p.groups()[1][0].last_join.lock() = Instant::now().checked_sub(JOIN_EXPIRES);
        p.probe_down_nodes().await;
        assert_eq!(listed(&p), [(0, "http://10.0.0.1:19540".to_string(), true)]);
        assert!(qn::PlacementState::decode(&p.encode()[..]).unwrap().joined.is_empty(), "a node that left is kept");
        assert!(p.join("http://10.0.0.2:19540", 1).unwrap(), "back after it left");
        assert_eq!(p.groups()[1].len(), 1, "back in its old place");
        assert_eq!(listed(&p)[1], (1, "http://10.0.0.2:19540".to_string(), false), "down until a probe finds it");
    }
}
