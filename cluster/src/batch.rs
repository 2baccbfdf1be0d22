//! Searches merged while the search pool is busy.
//!
//! Most clients ask one query per request, and each search pays fixed costs besides faiss's
//! own work: a hop to the search pool and the wake-up of the request's task, a faiss call (HNSW
//! clears a visited table per call; IVF's coarse quantizer uses a matrix product only from
//! [`crate::ann::BLAS_FROM_QUERIES`] queries), a fan-out over shards and segments and a merge.
//! When every pool thread is already searching, a new search would wait anyway. Searches that
//! wait for the same collection with the same `k`, knobs and filter then go to the pool as one
//! batch, and each gets its own answer back. A search never waits for a batch to fill: while a
//! thread is free, it goes at once, alone.
//!
//! A batch reads at the newest snapshot of its members. Every consistency level names the
//! oldest snapshot a read may use (STRONG: the time it arrived; SESSION: its token; BOUNDED: now
//! less the staleness), never the newest, and a snapshot another member waited for is
//! serviceable (serviceable timestamps only grow), so the newer one serves each. The answer says
//! which snapshot was read, and the session token it returns covers it (monotonic reads).
//!
//! Other work for the pool (the scans of Get, Query and Count) is admitted by the same queue, in
//! arrival order, and never merged: a thread that takes batch after batch would otherwise keep
//! it from the pool for as long as searches arrive.
//!
//! The gateway merges searches on its side too (`routing.coalesce`), for the hop to a cluster;
//! this is the cluster's own, for everyone who connects to it directly.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::ann::Knobs;
use crate::collection::Collection;
use crate::error::Result;
use crate::fanout::Fanout;
use crate::filter::Filter;
use crate::schema::Metric;
use crate::segment::{Row, SearchPlan, TopK};
use crate::ts::Ts;

/// Most queries in one batch by default (`search.max_batch_queries`): a batch answers all its
/// members at once, so a larger one would hold its first member's answer longer than it saves.
pub const MAX_BATCH_QUERIES: usize = 64;

/// One search request, validated, with its snapshot chosen.
pub struct Search {
    pub collection: Arc<Collection>,
    /// `nq * dim` values.
    pub queries: Vec<f32>,
    pub dim: usize,
    pub metric: Metric,
    pub k: usize,
    pub knobs: Knobs,
    pub filter: Option<Filter>,
    /// The filter as the client wrote it: searches merge only with the same text.
    pub filter_text: String,
    pub snapshot: Ts,
    /// Whether the answer carries the hits' payload rows.
    pub payloads: bool,
}

impl Search {
    fn nq(&self) -> usize {
        self.queries.len() / self.dim.max(1)
    }

    /// The plan of `queries` (this search's, or a batch's laid end to end) at `snapshot`, with
    /// this search's parameters.
    fn plan<'a>(&'a self, queries: &'a [f32], snapshot: Ts) -> SearchPlan<'a> {
        SearchPlan { queries, dim: self.dim, k: self.k, metric: self.metric, filter: self.filter.as_ref(), knobs: self.knobs, snapshot }
    }

    fn merges_with(&self, other: &Search) -> bool {
        Arc::ptr_eq(&self.collection, &other.collection)
            && self.k == other.k
            && self.knobs == other.knobs
            && self.filter_text == other.filter_text
            && self.dim == other.dim
            && self.metric == other.metric
    }
}

#[derive(Debug)]
pub struct Answer {
    /// One hit list per query of the search.
    pub topk: TopK,
    /// The hits' payload rows, when asked for.
    pub payloads: HashMap<i64, Row>,
    /// The snapshot read: the search's own, or a newer one of the batch it went in.
    pub snapshot: Ts,
}

struct Waiting {
    search: Search,
    reply: oneshot::Sender<Result<Answer>>,
}

/// Work for the pool that is not a search: run alone, in its turn.
pub type Job = Box<dyn FnOnce() + Send>;

enum Queued {
    Search(Waiting),
    Job(Job),
}

impl Queued {
    fn search(&self) -> Option<&Search> {
        match self {
            Queued::Search(w) => Some(&w.search),
            Queued::Job(_) => None,
        }
    }
}

/// Admits work to the pool: at most `threads` batches or jobs running, the rest waiting.
pub struct Batcher {
    threads: usize,
    max_queries: usize,
    state: Mutex<State>,
    batches: AtomicU64,
    searches: AtomicU64,
}

#[derive(Default)]
struct State {
    running: usize,
    waiting: VecDeque<Queued>,
}

/// What a pool thread runs next (run by [`Batcher::drain`]).
pub struct Batch(Next);

enum Next {
    /// Searches that go together.
    Searches(Vec<Waiting>),
    Job(Job),
}

impl Batcher {
    /// `max_queries`: most queries in a batch; 1 never merges.
    pub fn new(threads: usize, max_queries: usize) -> Batcher {
        Batcher { threads: threads.max(1), max_queries, state: Mutex::default(), batches: AtomicU64::new(0), searches: AtomicU64::new(0) }
    }

    /// Takes a search: a batch of it alone to run now when a thread is free (the caller runs
    /// it on the pool through [`Batcher::drain`]), else `None` and it waits.
    pub fn admit(&self, search: Search) -> (Option<Batch>, oneshot::Receiver<Result<Answer>>) {
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting { search, reply };
        (self.enqueue(Queued::Search(waiting)), answer)
    }

    /// Takes a job, likewise.
    pub fn admit_job(&self, job: Job) -> Option<Batch> {
        self.enqueue(Queued::Job(job))
    }

    fn enqueue(&self, work: Queued) -> Option<Batch> {
        let mut st = self.state.lock();
        if st.running < self.threads {
            st.running += 1;
            return Some(Batch(match work {
                Queued::Search(w) => Next::Searches(vec![w]),
                Queued::Job(j) => Next::Job(j),
            }));
        }
        st.waiting.push_back(work);
        None
    }

    /// Runs `first`, then whatever waits, batch by batch, until nothing does. Blocking: on the
    /// search pool.
    pub fn drain(&self, first: Batch, fanout: &dyn Fanout) {
        let mut batch = first;
        loop {
            match batch.0 {
                Next::Searches(searches) => {
                    self.batches.fetch_add(1, Ordering::Relaxed);
                    self.searches.fetch_add(searches.len() as u64, Ordering::Relaxed);
                    run(searches, fanout);
                }
                Next::Job(job) => job(),
            }
            match self.next() {
                Some(b) => batch = b,
                None => return,
            }
        }
    }

    /// (batches run, searches they held) since start: searches / batches is the mean batch.
    pub fn stats(&self) -> (u64, u64) {
        (self.batches.load(Ordering::Relaxed), self.searches.load(Ordering::Relaxed))
    }

    /// The next batch for a thread that finished one, or `None` (the thread is released): the
    /// oldest waiting search with those that merge with it, up to this thread's share of what
    /// waits (the other running threads take the rest as they finish) and `max_queries`. A
    /// search whose caller is gone is dropped.
    fn next(&self) -> Option<Batch> {
        let mut st = self.state.lock();
        st.waiting.retain(|q| !matches!(q, Queued::Search(w) if w.reply.is_closed()));
        let head = match st.waiting.pop_front() {
            None => {
                st.running -= 1;
                return None;
            }
            Some(Queued::Job(job)) => return Some(Batch(Next::Job(job))),
            Some(Queued::Search(w)) => w,
        };
        let share = (st.waiting.len() + 1).div_ceil(st.running.max(1));
        let mut queries = head.search.nq();
        let mut batch = vec![head];
        let mut i = 0;
        while i < st.waiting.len() && batch.len() < share {
            let merges = st.waiting[i].search().is_some_and(|w| w.merges_with(&batch[0].search) && queries + w.nq() <= self.max_queries);
            if !merges {
                i += 1;
            } else if let Some(Queued::Search(w)) = st.waiting.remove(i) {
                queries += w.search.nq();
                batch.push(w);
            }
        }
        Some(Batch(Next::Searches(batch)))
    }
}

/// Searches a batch as one plan at its newest snapshot and deals the answers back. A batch of
/// several that fails is searched again one by one, so that each member gets its own answer or
/// error.
fn run(batch: Vec<Waiting>, fanout: &dyn Fanout) {
    if batch.len() == 1 {
        let Waiting { search, reply } = batch.into_iter().next().expect("one");
        let _ = reply.send(search_one(&search, fanout));
        return;
    }
    let head = &batch[0].search;
    let snapshot = batch.iter().map(|w| w.search.snapshot).max().expect("non-empty");
    let queries: Vec<f32> = batch.iter().flat_map(|w| w.search.queries.iter().copied()).collect();
    let plan = head.plan(&queries, snapshot);
    match fanout.search(&head.collection, &plan) {
        Ok(topk) => {
            // One hit list per query, in the order the queries were laid end to end.
            let mut topk = topk.into_iter();
            for Waiting { search, reply } in batch {
                let topk: TopK = topk.by_ref().take(search.nq()).collect();
                let _ = reply.send(Ok(answer(&search, topk, snapshot)));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, searches = batch.len(), "a merged search failed; searching its members one by one");
            for Waiting { search, reply } in batch {
                let _ = reply.send(search_one(&search, fanout));
            }
        }
    }
}

fn search_one(search: &Search, fanout: &dyn Fanout) -> Result<Answer> {
    let topk = fanout.search(&search.collection, &search.plan(&search.queries, search.snapshot))?;
    Ok(answer(search, topk, search.snapshot))
}

fn answer(search: &Search, topk: TopK, snapshot: Ts) -> Answer {
    let payloads = if search.payloads {
        let ids: Vec<i64> = topk.iter().flatten().map(|h| h.1).collect();
        search.collection.payloads(&ids, snapshot)
    } else {
        HashMap::new()
    };
    Answer { topk, payloads, snapshot }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::Write;
    use crate::fanout::LocalFanout;
    use crate::schema::{IndexKind, Schema};
    use crate::shard::ShardOptions;
    use crate::ts::HybridClock;
    use crate::wal::{SyncPolicy, WalOptions};

    const DIM: usize = 2;

    /// A 2-shard FLAT collection in a temp dir (kept while the returned dir lives), and its clock.
    fn collection() -> (tempfile::TempDir, HybridClock, Arc<Collection>) {
        let dir = tempfile::tempdir().unwrap();
        let clock = HybridClock::new();
        let schema = Schema::new("c".into(), DIM, Metric::L2, IndexKind::Flat, 2, vec![]).unwrap();
        let opts = ShardOptions { wal: WalOptions { sync: SyncPolicy::Never, segment_bytes: 1 << 20 }, seal_rows: 1000 };
        let c = Arc::new(Collection::open(1, 1, schema, dir.path(), &opts, &clock).unwrap().0);
        (dir, clock, c)
    }

    fn insert(c: &Collection, clock: &HybridClock, ids: std::ops::Range<i64>) {
        let vectors = ids.clone().flat_map(|i| [i as f32, 0.0]).collect();
        let n = ids.end - ids.start;
        c.write(clock, Write::Insert { ids: ids.collect(), vectors, rows: vec![vec![]; n as usize] }, &mut Vec::new()).unwrap();
    }

    fn search(c: &Arc<Collection>, queries: &[f32], k: usize, snapshot: Ts) -> Search {
        Search {
            collection: c.clone(),
            queries: queries.to_vec(),
            dim: DIM,
            metric: Metric::L2,
            k,
            knobs: Knobs { nprobe: 1, ef_search: 16 },
            filter: None,
            filter_text: String::new(),
            snapshot,
            payloads: false,
        }
    }

    /// The first query value of each search in a batch (tests number their searches by it).
    fn ids(b: &Batch) -> Vec<f32> {
        match &b.0 {
            Next::Searches(s) => s.iter().map(|w| w.search.queries[0]).collect(),
            Next::Job(_) => panic!("a job, not searches"),
        }
    }

    /// A search goes at once while a thread is free; the others wait, and a finished thread
    /// takes the oldest with those that merge with it (same collection, k, knobs, filter),
    /// skipping searches whose caller is gone, and is released when nothing waits.
    #[test]
    fn searches_wait_only_while_every_thread_is_busy_and_merge_by_parameters() {
        let (_dir, _, c) = collection();
        let b = Batcher::new(1, MAX_BATCH_QUERIES);
        let (first, _a1) = b.admit(search(&c, &[1.0, 0.0], 3, 1));
        assert_eq!(ids(&first.unwrap()), [1.0]);
        let (none, _a2) = b.admit(search(&c, &[2.0, 0.0], 3, 1));
        assert!(none.is_none());
        let (_, _a3) = b.admit(search(&c, &[3.0, 0.0], 4, 1)); // another k
        let (_, a4) = b.admit(search(&c, &[4.0, 0.0], 3, 1));
        drop(a4); // its caller is gone
        let mut filtered = search(&c, &[5.0, 0.0], 3, 1);
        filtered.filter_text = "id > 3".into();
        let (_, _a5) = b.admit(filtered);
        let (_, _a6) = b.admit(search(&c, &[6.0, 0.0], 3, 9));
        assert_eq!(ids(&b.next().unwrap()), [2.0, 6.0], "snapshots differ, parameters do not");
        assert_eq!(ids(&b.next().unwrap()), [3.0]);
        assert_eq!(ids(&b.next().unwrap()), [5.0]);
        assert!(b.next().is_none());
        assert_eq!(b.state.lock().running, 0, "the thread is released");
        assert!(b.admit(search(&c, &[7.0, 0.0], 3, 1)).0.is_some(), "and the next search goes at once");
    }

    /// Jobs wait their turn with the searches and are never merged: a thread taking batch after
    /// batch does not keep the pool from other work.
    #[test]
    fn jobs_wait_their_turn_and_run_alone() {
        let (_dir, _, c) = collection();
        let b = Batcher::new(1, MAX_BATCH_QUERIES);
        let ran = Arc::new(AtomicU64::new(0));
        let job = |n: u64| -> Job {
            let ran = ran.clone();
            Box::new(move || ran.store(n, Ordering::Relaxed))
        };
        let first = b.admit_job(job(1)).expect("a free thread");
        assert!(matches!(first.0, Next::Job(_)));
        let (_, _a) = b.admit(search(&c, &[2.0, 0.0], 3, 1));
        assert!(b.admit_job(job(3)).is_none(), "every thread is busy");
        let (_, _b) = b.admit(search(&c, &[4.0, 0.0], 4, 1));
        assert_eq!(ids(&b.next().unwrap()), [2.0]);
        match b.next().unwrap().0 {
            Next::Job(j) => j(),
            Next::Searches(_) => panic!("the job's turn"),
        }
        assert_eq!(ran.load(Ordering::Relaxed), 3);
        assert_eq!(ids(&b.next().unwrap()), [4.0]);
        assert!(b.next().is_none());
        assert_eq!(b.stats(), (0, 0), "nothing was run through drain");
    }

    /// With two threads busy, a thread takes its half of what waits; the rest stays for the other.
    #[test]
    fn a_thread_takes_its_share_of_the_waiting_searches() {
        let (_dir, _, c) = collection();
        let b = Batcher::new(2, MAX_BATCH_QUERIES);
        let mut answers = Vec::new();
        for q in 0..8 {
            let (batch, a) = b.admit(search(&c, &[q as f32, 0.0], 3, 1));
            assert_eq!(batch.is_some(), q < 2);
            answers.push(a);
        }
        assert_eq!(ids(&b.next().unwrap()), [2.0, 3.0, 4.0]);
        assert_eq!(ids(&b.next().unwrap()), [5.0, 6.0]);
        assert_eq!(ids(&b.next().unwrap()), [7.0]);
        assert!(b.next().is_none());
        assert!(b.next().is_none());
        assert_eq!(b.state.lock().running, 0);
    }

    /// A batch is searched once, at its newest snapshot, and each member gets the hits of its
    /// own queries and the snapshot read; a search alone keeps its own snapshot.
    #[test]
    fn a_batch_reads_at_its_newest_snapshot_and_answers_each_member() {
        let (_dir, clock, c) = collection();
        insert(&c, &clock, 0..50);
        let before = clock.now();
        insert(&c, &clock, 100..150);
        let after = clock.now();
        let fanout = LocalFanout::default();
        let b = Batcher::new(1, MAX_BATCH_QUERIES);
        let (first, alone) = b.admit(search(&c, &[99.0, 0.0], 1, before));
        let (_, old) = b.admit(search(&c, &[120.0, 0.0, 10.0, 0.0], 1, before));
        let (_, new) = b.admit(search(&c, &[30.0, 0.0], 2, after));
        let (_, newest) = b.admit(search(&c, &[140.0, 0.0], 1, after));
        b.drain(first.unwrap(), &fanout);
        let alone = alone.blocking_recv().unwrap().unwrap();
        assert_eq!((alone.topk, alone.snapshot), (vec![vec![(2500.0, 49)]], before), "searched alone: its own snapshot, without row 100");
        let old = old.blocking_recv().unwrap().unwrap();
        assert_eq!(old.snapshot, after, "merged with a search at a newer snapshot");
        assert_eq!(old.topk, vec![vec![(0.0, 120)], vec![(0.0, 10)]], "row 120 is visible at the batch's snapshot");
        let newest = newest.blocking_recv().unwrap().unwrap();
        assert_eq!((newest.topk, newest.snapshot), (vec![vec![(0.0, 140)]], after));
        // Another k: its own batch, after.
        let new = new.blocking_recv().unwrap().unwrap();
        assert_eq!(new.topk, vec![vec![(0.0, 30), (1.0, 29)]]);
        assert_eq!(b.stats(), (3, 4));
    }

    /// A merged search that fails is searched again member by member: each gets its own answer.
    #[test]
    fn a_failed_batch_is_searched_member_by_member() {
        struct OneQueryAtATime(LocalFanout);
        impl Fanout for OneQueryAtATime {
            fn search(&self, collection: &Collection, plan: &SearchPlan<'_>) -> Result<TopK> {
                if plan.nq() > 1 {
                    return Err(crate::error::ClusterError::invalid("one query at a time"));
                }
                self.0.search(collection, plan)
            }
        }
        let (_dir, clock, c) = collection();
        insert(&c, &clock, 0..10);
        let now = clock.now();
        let fanout = OneQueryAtATime(LocalFanout::default());
        let b = Batcher::new(1, MAX_BATCH_QUERIES);
        let (first, _) = b.admit(search(&c, &[0.0, 0.0], 1, now));
        let (_, a) = b.admit(search(&c, &[3.0, 0.0], 1, now));
        let (_, two) = b.admit(search(&c, &[5.0, 0.0, 6.0, 0.0], 1, now));
        b.drain(first.unwrap(), &fanout);
        assert_eq!(a.blocking_recv().unwrap().unwrap().topk, vec![vec![(0.0, 3)]]);
        let e = two.blocking_recv().unwrap().unwrap_err();
        assert!(e.to_string().contains("one query at a time"), "{e}");
    }
}
