//! Searches that queue for a busy cluster travel together.
//!
//! Each cluster takes at most `max_in_flight` searches from this gateway at once. A search that
//! finds them all taken waits here; when one returns, every waiting search with the same
//! parameters (collection, top_k, filter, output fields, search params, consistency) goes out
//! as **one** request whose query vectors are theirs laid end to end, and the reply's
//! per-query results are dealt back in order. Below the limit a search goes out alone at once,
//! so a lightly loaded gateway adds no wait; above it the searches would have queued at the
//! cluster anyway, and merged they cost it one message, one snapshot and one pass over the
//! segments instead of one each (dynamic batching, as inference servers do it).
//!
//! Merging never changes an answer:
//! * only searches whose query vectors have the same length merge, so the reply splits into
//!   equal shares; when the result count does not divide by the number of searches, one of them
//!   was malformed (vectors not a multiple of the dimension) and every search is sent again
//!   alone, to get its own answer or error;
//! * any error of the merged request (a limit it exceeds, a transient failure) also sends each
//!   search again alone: no caller sees an error that its own request would not have had;
//! * SESSION searches merge across sessions: the merged request carries the newest of their
//!   tokens, and a read at a later point still sees each session's writes; a token that does
//!   not decode merges only with the very same read options (the cluster refuses the merged
//!   request, and each is sent again alone).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tandem_proto::session::SessionToken;
use tandem_proto::v1 as pb;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

pub type Reply = Result<Response<pb::SearchResponse>, Status>;

pub struct Coalescer {
    /// 0: every search goes out alone.
    max_in_flight: usize,
    /// Searches in one merged request at most.
    max_batch: usize,
    state: Mutex<State>,
    /// Merged requests sent, and the searches they carried (Topology reports both).
    pub merged_requests: AtomicU64,
    pub merged_searches: AtomicU64,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    queue: VecDeque<Waiting>,
}

struct Waiting {
    metadata: MetadataMap,
    search: pb::SearchRequest,
    /// The SESSION token's decoded value, when the search may merge across sessions.
    token: Option<SessionToken>,
    deadline: Option<Instant>,
    reply: tokio::sync::oneshot::Sender<Reply>,
}

impl Coalescer {
    pub fn new(max_in_flight: usize, max_batch: usize) -> Coalescer {
        Coalescer {
            max_in_flight,
            max_batch: max_batch.max(1),
            state: Mutex::new(State::default()),
            merged_requests: AtomicU64::new(0),
            merged_searches: AtomicU64::new(0),
        }
    }
}

/// Where merged searches go: a cluster of the topology, which owns its [`Coalescer`]. A trait
/// so this module needs nothing of the topology (which needs the coalescer).
pub trait Target: Send + Sync + 'static {
    fn id(&self) -> &str;
    fn coalescer(&self) -> &Coalescer;
    /// Sends one search request to the cluster, on its read connections.
    fn send(&self, req: Request<pb::SearchRequest>) -> impl std::future::Future<Output = Reply> + Send;
}

/// Sends `req` to `cluster`, alone or merged with others waiting for it.
pub async fn search<T: Target>(cluster: &Arc<T>, req: Request<pb::SearchRequest>) -> Reply {
    let co = cluster.coalescer();
    if co.max_in_flight == 0 {
        return cluster.send(req).await;
    }
    let queued = {
        let mut s = co.state.lock();
        if s.in_flight < co.max_in_flight {
            s.in_flight += 1;
            Err(req)
        } else {
            let (metadata, _, search) = req.into_parts();
            let deadline = metadata
                .get(tandem_proto::wire::GRPC_TIMEOUT)
                .and_then(|v| v.to_str().ok())
                .and_then(tandem_proto::wire::parse_grpc_timeout)
                .map(|d| Instant::now() + d);
            let token = session_token(&search);
            let (tx, rx) = tokio::sync::oneshot::channel();
            s.queue.push_back(Waiting { metadata, search, token, deadline, reply: tx });
            Ok(rx)
        }
    };
    let rx = match queued {
        Ok(rx) => rx,
        Err(req) => {
            // Released when the reply is in, or when the caller goes away.
            let _slot = Slot(cluster.clone());
            return cluster.send(req).await;
        }
    };
    rx.await.unwrap_or_else(|_| Err(Status::unavailable(format!("the gateway stopped sending searches to {}", cluster.id()))))
}

/// One of a cluster's `max_in_flight` places. Dropping it hands the place to the searches
/// waiting, if any.
struct Slot<T: Target>(Arc<T>);

impl<T: Target> Drop for Slot<T> {
    fn drop(&mut self) {
        if let Some(batch) = next_batch(self.0.coalescer()) {
            // Outside a runtime (it is shutting down) the batch is dropped: its callers are told
            // the gateway stopped.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(send_batches(self.0.clone(), batch));
            }
        }
    }
}

/// The oldest waiting search and every other one that merges with it, or None after releasing
/// the caller's place when nothing waits.
fn next_batch(co: &Coalescer) -> Option<Vec<Waiting>> {
    let mut s = co.state.lock();
    let Some(first) = s.queue.pop_front() else {
        s.in_flight -= 1;
        return None;
    };
    let mut batch = vec![first];
    let mut i = 0;
    while i < s.queue.len() && batch.len() < co.max_batch {
        if mergeable(&batch[0], &s.queue[i]) {
            batch.push(s.queue.remove(i).expect("index in range"));
        } else {
            i += 1;
        }
    }
    Some(batch)
}

/// Keeps the place while searches wait: sends one batch after another.
async fn send_batches<T: Target>(cluster: Arc<T>, mut batch: Vec<Waiting>) {
    loop {
        send_batch(&cluster, batch).await;
        match next_batch(cluster.coalescer()) {
            Some(b) => batch = b,
            None => return,
        }
    }
}

async fn send_batch<T: Target>(cluster: &Arc<T>, mut batch: Vec<Waiting>) {
    // Callers that went away need no answer.
    batch.retain(|w| !w.reply.is_closed());
    if batch.len() <= 1 {
        if let Some(w) = batch.pop() {
            send_alone(cluster.as_ref(), w).await;
        }
        return;
    }
    let n = batch.len();
    cluster.coalescer().merged_requests.fetch_add(1, Ordering::Relaxed);
    cluster.coalescer().merged_searches.fetch_add(n as u64, Ordering::Relaxed);
    metrics::counter!("tandem_gateway_merged_requests_total", "cluster" => cluster.id().to_string()).increment(1);
    metrics::counter!("tandem_gateway_merged_searches_total", "cluster" => cluster.id().to_string()).increment(n as u64);
    match cluster.send(merged(&batch)).await {
        Ok(resp) if !resp.get_ref().results.is_empty() && resp.get_ref().results.len() % n == 0 => {
            let resp = resp.into_inner();
            let per = resp.results.len() / n;
            let mut results = resp.results.into_iter();
            for w in batch {
                let share = pb::SearchResponse { results: results.by_ref().take(per).collect(), session_token: resp.session_token.clone() };
                let _ = w.reply.send(Ok(Response::new(share)));
            }
        }
        // Merged, the request failed or its reply does not split: each goes alone, and gets
        // the answer it would have had without merging.
        other => {
            let why = match &other {
                Ok(r) => format!("{} results for {n} searches", r.get_ref().results.len()),
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            };
            tracing::debug!(cluster = %cluster.id(), searches = n, why, "a merged search failed: sending each alone");
            metrics::counter!("tandem_gateway_merge_fallbacks_total", "cluster" => cluster.id().to_string()).increment(1);
            futures::future::join_all(batch.into_iter().map(|w| send_alone(cluster.as_ref(), w))).await;
        }
    }
}

/// The SESSION token a search may merge with, or None when it merges only with the same read
/// options (any other level, or a token that does not decode).
fn session_token(s: &pb::SearchRequest) -> Option<SessionToken> {
    if tandem_proto::wire::consistency(s.read.as_ref()) != pb::ConsistencyLevel::Session {
        return None;
    }
    let given = s.read.as_ref().map_or("", |r| r.session_token.as_str());
    match SessionToken::decode(given) {
        Ok(t) => Some(t.unwrap_or(SessionToken { epoch: 0, ts: 0 })),
        Err(_) => None,
    }
}

fn mergeable(a: &Waiting, b: &Waiting) -> bool {
    let (x, y) = (&a.search, &b.search);
    let read_same = match (a.token, b.token) {
        // Both SESSION with valid tokens: the merged request takes the newest.
        (Some(_), Some(_)) => x.read.as_ref().map(|r| r.staleness_ms) == y.read.as_ref().map(|r| r.staleness_ms),
        _ => x.read == y.read,
    };
    read_same
        && x.vectors.len() == y.vectors.len()
        && x.collection == y.collection
        && x.top_k == y.top_k
        && x.filter == y.filter
        && x.output_fields == y.output_fields
        && x.params == y.params
}

/// Sends a waiting search by itself, with what is left of its deadline, and answers its caller.
async fn send_alone<T: Target>(cluster: &T, w: Waiting) {
    let mut r = Request::from_parts(w.metadata, Default::default(), w.search);
    if let Some(d) = w.deadline {
        r.set_timeout(d.saturating_duration_since(Instant::now()));
    }
    let _ = w.reply.send(cluster.send(r).await);
}

/// One request for the whole batch: the first search's parameters and trace context, every
/// search's query vectors in order, the newest SESSION token, and the latest deadline (a
/// caller whose own deadline passes first stops waiting by itself).
fn merged(batch: &[Waiting]) -> Request<pb::SearchRequest> {
    let first = &batch[0];
    let mut search = first.search.clone();
    search.vectors.reserve(first.search.vectors.len() * (batch.len() - 1));
    for w in &batch[1..] {
        search.vectors.extend_from_slice(&w.search.vectors);
    }
    if let Some(newest) = batch.iter().filter_map(|w| w.token).reduce(SessionToken::max)
        && newest.ts > 0
    {
        search.read.get_or_insert_with(Default::default).session_token = newest.encode();
    }
    let mut r = Request::from_parts(first.metadata.clone(), Default::default(), search);
    let latest = batch.iter().map(|w| w.deadline).try_fold(Instant::now(), |acc, d| d.map(|d| acc.max(d)));
    if let Some(d) = latest {
        r.set_timeout(d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(search: pb::SearchRequest, deadline_ms: u64) -> Waiting {
        let (tx, _) = tokio::sync::oneshot::channel();
        let token = session_token(&search);
        Waiting {
            metadata: MetadataMap::new(),
            search,
            token,
            deadline: Some(Instant::now() + Duration::from_millis(deadline_ms)),
            reply: tx,
        }
    }

    fn search(vectors: Vec<f32>, level: pb::ConsistencyLevel, token: &str) -> pb::SearchRequest {
        pb::SearchRequest {
            collection: "c".into(),
            vectors,
            top_k: 5,
            read: Some(pb::ReadOptions { consistency: level as i32, session_token: token.into(), staleness_ms: 0 }),
            ..Default::default()
        }
    }

    #[test]
    fn only_searches_with_the_same_parameters_and_vector_length_merge() {
        use pb::ConsistencyLevel::*;
        let base = waiting(search(vec![1.0; 4], Bounded, ""), 100);
        assert!(mergeable(&base, &waiting(search(vec![2.0; 4], Bounded, ""), 5)), "other vectors, other deadline");
        let differ = [
            ("vector length", search(vec![1.0; 8], Bounded, "")),
            ("level", search(vec![1.0; 4], Strong, "")),
            ("top_k", pb::SearchRequest { top_k: 6, ..search(vec![1.0; 4], Bounded, "") }),
            ("filter", pb::SearchRequest { filter: "x > 1".into(), ..search(vec![1.0; 4], Bounded, "") }),
            ("collection", pb::SearchRequest { collection: "d".into(), ..search(vec![1.0; 4], Bounded, "") }),
            ("outputs", pb::SearchRequest { output_fields: vec!["*".into()], ..search(vec![1.0; 4], Bounded, "") }),
            (
                "params",
                pb::SearchRequest { params: Some(pb::SearchParams { nprobe: 3, ef_search: 0 }), ..search(vec![1.0; 4], Bounded, "") },
            ),
        ];
        for (what, s) in differ {
            assert!(!mergeable(&base, &waiting(s, 100)), "{what}");
        }
        // SESSION merges across tokens; a token that does not decode merges with nothing else.
        let t1 = SessionToken { epoch: 1, ts: 10 }.encode();
        let t2 = SessionToken { epoch: 1, ts: 20 }.encode();
        let s1 = waiting(search(vec![1.0; 4], Session, &t1), 100);
        assert!(mergeable(&s1, &waiting(search(vec![1.0; 4], Session, &t2), 100)));
        assert!(mergeable(&s1, &waiting(search(vec![1.0; 4], Unspecified, ""), 100)), "unspecified is SESSION");
        assert!(!mergeable(&s1, &waiting(search(vec![1.0; 4], Session, "t9-zz"), 100)));
    }

    #[test]
    fn a_merged_request_lays_the_vectors_end_to_end_with_the_newest_token_and_latest_deadline() {
        use pb::ConsistencyLevel::Session;
        let newest_epoch = SessionToken { epoch: 2, ts: 5 };
        let batch = [
            waiting(search(vec![1.0, 2.0], Session, &SessionToken { epoch: 1, ts: 99 }.encode()), 50),
            waiting(search(vec![3.0, 4.0], Session, ""), 5_000),
            waiting(search(vec![5.0, 6.0], Session, &newest_epoch.encode()), 10),
        ];
        let r = merged(&batch);
        let timeout = r
            .metadata()
            .get(tandem_proto::wire::GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(tandem_proto::wire::parse_grpc_timeout);
        assert!(timeout.is_some_and(|t| t > Duration::from_millis(4_000) && t <= Duration::from_millis(5_000)), "{timeout:?}");
        let s = r.into_inner();
        assert_eq!(s.vectors, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // Every member's guarantee: the newest epoch and the latest ts, each on its own (the
        // epoch-1 member needs ts 99, which the epoch-2 token alone would not ask for).
        assert_eq!(s.read.unwrap().session_token, SessionToken { epoch: 2, ts: 99 }.encode());
        assert_eq!((s.collection.as_str(), s.top_k), ("c", 5));
    }
}
