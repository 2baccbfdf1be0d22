//! The Rust SDK (tandem-client) against real clusters in the in-process sandbox: typed round
//! trip, read-your-writes on an alternative with a session carried over from the leader's
//! client, a read retried through a cluster restart, errors that keep the server's code and
//! message, and `topology()` against a cluster.

mod sandbox;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sandbox::*;
use tandem_client::{
    Ack, Client, ClientError, CollectionSpec, Consistency, FieldType, Index, Metric, Payload, RetryPolicy, Row, SegmentState, Value,
};
use tandem_proto::session::SessionToken;
use tandem_proto::v1 as pb;
use tonic::Code;

const C: &str = "docs";
const DIM: usize = 4;

fn spec() -> CollectionSpec {
    CollectionSpec::new(C, DIM as u32)
        .metric(Metric::L2)
        .shards(2)
        .field("tag", FieldType::String)
        .field("n", FieldType::Int64)
        .field("price", FieldType::Double)
        .field("hot", FieldType::Bool)
}

/// Row `i`: a deterministic vector, tag even/odd, n = i, price = i / 2, hot only for i % 3 == 0.
fn row(i: i64) -> Row {
    let r = Row::new(i, vectors(1, DIM, i as u64 + 1))
        .with("tag", if i % 2 == 0 { "even" } else { "odd" })
        .with("n", i)
        .with("price", i as f64 / 2.0);
    if i % 3 == 0 { r.with("hot", true) } else { r }
}

fn rows(ids: std::ops::Range<i64>) -> Vec<Row> {
    ids.map(row).collect()
}

fn token(s: &str) -> SessionToken {
    SessionToken::decode(s).expect("a valid token").expect("a token")
}

async fn connect(sb: &Sandbox, name: &str) -> Client {
    Client::connect(format!("http://{}", sb.addr(name).await)).await.expect("connect")
}

#[tokio::test]
async fn typed_round_trip() {
    let sb = Sandbox::builder().leading("lead").build().await;
    let c = connect(&sb, "lead").await;

    let info = c.create_collection(spec()).await.unwrap();
    assert_eq!(info.spec, spec());
    assert_eq!(info.rows, 0);
    assert_eq!(c.list_collections().await.unwrap(), vec![C.to_string()]);
    let created = token(&c.session_token().expect("DDL replies carry a token"));

    let w = c.insert(C, rows(0..20)).await.unwrap();
    assert_eq!(w.count, 20);
    assert_eq!(token(&w.session_token).ts, w.ts);
    assert!(w.ts > created.ts, "the write's ts follows the create's");
    assert_eq!(c.session_token().unwrap(), w.session_token, "the client's session moved to the write");

    // Search: the exact vector of row 3 is its own nearest neighbour, payload typed.
    let q = row(3).vector;
    let hits = c.search(C).vector(q.clone()).top_k(3).output_fields(["*"]).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].len(), 3);
    assert_eq!(hits[0][0].id, 3);
    assert!(hits[0][0].distance.abs() < 1e-5, "{:?}", hits[0][0]);
    assert_eq!(hits[0][0].payload, row(3).payload);
    assert!(hits[0].windows(2).all(|w| w[0].distance <= w[1].distance), "closest first");

    // Two queries, a filter, chosen output fields.
    let hits = c.search(C).vectors([q.clone(), row(8).vector]).top_k(4).filter("tag == \"even\"").output_fields(["n"]).await.unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[1][0].id, 8);
    for h in hits.iter().flatten() {
        assert_eq!(h.id % 2, 0, "{h:?} fails the filter");
        assert_eq!(h.payload, Payload::from([("n".to_string(), Value::Int64(h.id))]));
    }

    // Get keeps the requested order and skips missing ids; vectors on request.
    let got = c.get(C, [5, 999, 3]).output_fields(["*"]).include_vectors(true).await.unwrap();
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), [5, 3]);
    assert_eq!(got[0].vector, row(5).vector);
    assert_eq!(got[1].payload, row(3).payload);
    assert_eq!(got[1].payload["hot"], Value::Bool(true));
    assert!(!got[0].payload.contains_key("hot"), "an unset field is absent");

    let found = c.query(C).filter("n >= 15").limit(100).output_fields(["price"]).await.unwrap();
    assert_eq!(found.iter().map(|e| e.id).collect::<Vec<_>>(), (15..20).collect::<Vec<_>>());
    assert_eq!(found[0].payload["price"].as_f64(), Some(7.5));
    assert!(found[0].vector.is_empty());
    assert_eq!(c.count(C).await.unwrap(), 20);
    assert_eq!(c.count(C).filter("hot == true").await.unwrap(), 7);

    // Upsert replaces; deletes by id and by filter.
    let up = c.upsert(C, Row::new(3, [9.0, 9.0, 9.0, 9.0]).with("tag", "new")).ack(Ack::Local).await.unwrap();
    assert_eq!(up.count, 1);
    let got = c.get(C, [3]).output_fields(["*"]).include_vectors(true).await.unwrap();
    assert_eq!(got[0].vector, [9.0; 4]);
    assert_eq!(got[0].payload, Payload::from([("tag".to_string(), Value::from("new"))]));
    assert_eq!(c.delete_ids(C, [0, 1, 999]).await.unwrap().count, 2);
    assert_eq!(c.delete_where(C, "n >= 18").await.unwrap().count, 2);
    assert_eq!(c.count(C).consistency(Consistency::Strong).await.unwrap(), 16);
    assert!(c.get(C, [0, 1, 18, 19]).await.unwrap().is_empty());

    // Index and flush; describe shows it.
    c.create_index(C, Index::Hnsw { m: 8, ef_construction: 40 }).await.unwrap();
    assert!(c.flush(C).await.unwrap() >= 1);
    let info = c.describe_collection(C).await.unwrap();
    assert_eq!(info.spec.index, Index::Hnsw { m: 8, ef_construction: 40 });
    assert_eq!(info.rows, 16);
    assert!(info.segments.iter().all(|s| s.state != SegmentState::Growing || s.rows == 0), "{:?}", info.segments);
    let hits = c.search(C).vector(row(7).vector).top_k(1).ef(32).await.unwrap();
    assert_eq!(hits[0][0].id, 7);
    c.drop_index(C).await.unwrap();
    assert_eq!(c.describe_collection(C).await.unwrap().spec.index, Index::Flat);

    let ci = c.cluster_info().await.unwrap();
    assert_eq!(ci.cluster_id, "lead");
    assert_eq!(ci.role, Some(tandem_client::Role::Leading));
    assert_eq!(ci.collections.iter().map(|s| (s.name.as_str(), s.rows)).collect::<Vec<_>>(), [(C, 16)]);

    c.drop_collection(C).await.unwrap();
    assert!(c.list_collections().await.unwrap().is_empty());
    let e = c.describe_collection(C).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
}

#[tokio::test]
async fn read_your_writes_on_the_alternative_with_the_leaders_session() {
    let sb = Sandbox::builder().leading("lead").alternative("alt", "lead").build().await;
    let leader = connect(&sb, "lead").await;
    leader.create_collection(spec()).await.unwrap();
    // DDL reaches the alternative asynchronously; data reads need the collection there.
    let alt_plain = connect(&sb, "alt").await;
    eventually(Duration::from_secs(60), || async { alt_plain.describe_collection(C).await.is_ok() }).await;

    let writer = leader.clone();
    let mut last = token(&leader.session_token().unwrap());
    let mut total = 0;
    for round in 0..3i64 {
        let w = writer.insert(C, rows(round * 100..round * 100 + 100)).await.unwrap();
        total += 100;
        // Clones share the session: the write through `writer` moved `leader`'s session.
        let now = token(&leader.session_token().unwrap());
        assert_eq!(now, token(&w.session_token));
        assert!(now.ts > last.ts, "the token advances with every write: {last:?} -> {now:?}");
        last = now;

        // The session moves to a client of the alternative (as it would to another process);
        // its SESSION read (the default) sees every write so far.
        let alt = alt_plain.with_session_token(&now.encode()).unwrap();
        assert_eq!(alt.count(C).await.unwrap(), total, "round {round}");
        let got = alt.get(C, [round * 100 + 99]).output_fields(["n"]).await.unwrap();
        assert_eq!(got.len(), 1, "round {round}: the newest row is visible");
        assert_eq!(got[0].payload["n"], Value::Int64(round * 100 + 99));
        assert!(token(&alt.session_token().unwrap()).ts >= now.ts, "a read never moves the session back");
    }
    // The builder takes a token too.
    let alt = Client::builder(format!("http://{}", sb.addr("alt").await)).session_token(last.encode()).connect().await.unwrap();
    let hits = alt.search(C).vector(row(299).vector).top_k(1).await.unwrap();
    assert_eq!(hits[0][0].id, 299);
    // `with_session_token` left the original client's (empty) session alone.
    assert_eq!(alt_plain.session_token(), None);

    // A write sent to the alternative is refused with the leader's address.
    let e = alt.insert(C, row(1000)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert_eq!(e.leader_hint(), Some(format!("http://{}", sb.addr("lead").await).as_str()), "{e}");
    assert!(!e.is_transient());

    // The token is what holds a stale replica back: with replication stopped, the alternative
    // has the 300 rows and not the next write. An EVENTUALLY read returns its stale count; a
    // SESSION read carrying the write's token refuses to (it waits, then says how far behind).
    sb.follower("alt").await.stop();
    let w = leader.insert(C, rows(300..310)).await.unwrap();
    let alt = alt_plain.with_session_token(&w.session_token).unwrap();
    assert_eq!(alt.count(C).consistency(Consistency::Eventually).await.unwrap(), 300);
    let e = alt.count(C).timeout(Duration::from_millis(500)).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert_eq!(leader.count(C).await.unwrap(), 310);
}

#[tokio::test]
async fn a_read_is_retried_through_a_restart_and_a_write_is_not() {
    let sb = Sandbox::builder().leading("a").build().await;
    let addr = sb.addr("a").await;
    let retries = Arc::new(AtomicU32::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let policy = RetryPolicy {
        max_attempts: 100_000,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        multiplier: 2.0,
        max_elapsed: Duration::from_secs(300),
    };
    let counter = retries.clone();
    let c = Client::builder(format!("http://{addr}"))
        .retry(policy)
        .on_retry(move |ev| {
            assert_eq!(ev.error.code(), Code::Unavailable, "only transient errors are retried: {}", ev.error);
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(ev.op);
        })
        .connect()
        .await
        .unwrap();
    c.create_collection(spec()).await.unwrap();
    c.insert(C, rows(0..5)).await.unwrap();

    sb.stop("a").await;
    // A write is sent once: its error is transient, but the SDK leaves the decision to the caller.
    let e = c.insert(C, rows(5..6)).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(retries.load(Ordering::SeqCst), 0, "writes are not retried");

    let reader = c.clone();
    let read = tokio::spawn(async move { reader.count(C).await });
    // The read has failed at least once (nothing listens) and is waiting to try again...
    assert_eq!(rx.recv().await, Some("Count"));
    // ...when the cluster comes back on the same address.
    sb.start_again_at("a", addr).await;
    assert_eq!(read.await.unwrap().unwrap(), 5, "the retried read sees the data");
    assert!(retries.load(Ordering::SeqCst) >= 1);
    assert_eq!(c.count(C).await.unwrap(), 5);
}

#[tokio::test]
async fn bad_input_keeps_the_servers_code_and_message() {
    let sb = Sandbox::builder().leading("lead").build().await;
    let retries = Arc::new(AtomicU32::new(0));
    let counter = retries.clone();
    let c = Client::builder(format!("http://{}", sb.addr("lead").await))
        .on_retry(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .connect()
        .await
        .unwrap();
    c.create_collection(spec()).await.unwrap();
    c.insert(C, rows(0..3)).await.unwrap();
    let mut raw = c.raw();

    // The same bad request through the SDK and through the generated client: same status.
    let bad_dim = c.insert(C, Row::new(10, [1.0, 2.0])).await.unwrap_err();
    let want = raw
        .insert(pb::InsertRequest { collection: C.into(), ids: vec![10], vectors: vec![1.0, 2.0], payloads: vec![], ack: 0 })
        .await
        .unwrap_err();
    assert_eq!((bad_dim.code(), bad_dim.message()), (want.code(), want.message().to_string()));
    assert_eq!(bad_dim.code(), Code::InvalidArgument);
    assert_eq!(bad_dim.to_string(), want.message(), "the error reads as the server's message");

    let bad_filter = c.search(C).vector(row(1).vector).filter("price <<< 3").await.unwrap_err();
    let want = raw
        .search(pb::SearchRequest {
            collection: C.into(),
            vectors: row(1).vector,
            top_k: 10,
            filter: "price <<< 3".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!((bad_filter.code(), bad_filter.message()), (Code::InvalidArgument, want.message().to_string()));
    assert!(bad_filter.message().contains("filter syntax error"), "{bad_filter}");

    let dup = c.insert(C, row(1)).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup}");
    assert!(dup.message().contains('1'), "{dup}");
    let missing = c.count("nope").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("\"nope\""), "{missing}");
    let bad_field = c.insert(C, Row::new(50, vectors(1, DIM, 50)).with("color", "red")).await.unwrap_err();
    assert_eq!(bad_field.code(), Code::InvalidArgument);
    assert!(bad_field.message().contains("color"), "{bad_field}");

    // Refused by the SDK before sending: a ragged batch would otherwise be re-cut by the server.
    let ragged = c.insert(C, vec![Row::new(20, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), Row::new(21, [1.0, 2.0])]).await.unwrap_err();
    assert!(matches!(ragged, ClientError::InvalidInput(_)), "{ragged:?}");
    assert_eq!(ragged.code(), Code::InvalidArgument);
    assert!(ragged.message().contains("row with id 21"), "{ragged}");
    let ragged = c.search(C).vectors([vec![1.0; 4], vec![1.0; 3]]).await.unwrap_err();
    assert!(ragged.message().contains("query vector 1 has 3 elements"), "{ragged}");
    assert!(c.search(C).await.unwrap_err().message().contains("at least one query vector"));
    assert_eq!(c.count(C).consistency(Consistency::Strong).await.unwrap(), 3, "no bad write changed anything");
    assert!(c.with_session_token("t9-x").unwrap_err().to_string().contains("invalid session token \"t9-x\""));

    // A SESSION read for a future the cluster has not reached waits out its deadline: the
    // server says why, and the SDK does not resend it (that would double the caller's wait).
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let future = SessionToken { epoch: 1, ts: tandem_proto::session::compose(now_ms + 3_600_000, 0) };
    let ahead = c.with_session_token(&future.encode()).unwrap();
    let e = ahead.count(C).timeout(Duration::from_millis(300)).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(!e.is_transient());
    assert_eq!(retries.load(Ordering::SeqCst), 0, "none of these was retried");
}

#[tokio::test]
async fn topology_against_a_cluster_says_it_is_not_a_gateway() {
    let sb = Sandbox::builder().leading("lead").build().await;
    let c = connect(&sb, "lead").await;
    let e = c.topology().await.unwrap_err();
    assert!(matches!(e, ClientError::NotAGateway { .. }), "{e:?}");
    assert_eq!(e.code(), Code::Unimplemented);
    let msg = e.to_string();
    assert!(msg.contains("is not a tandem gateway") && msg.contains(&sb.addr("lead").await.to_string()), "{msg}");
    assert!(msg.contains("cluster_info()"), "{msg}");
    assert!(!e.is_transient());
    // The connection is still good for the cluster's own API.
    assert_eq!(c.cluster_info().await.unwrap().cluster_id, "lead");
}

/// `tandem collection|insert|search|info` run on the SDK: same output, server errors as before.
#[tokio::test]
async fn cli_commands_run_on_the_sdk() {
    let sb = Sandbox::builder().leading("lead").build().await;
    let endpoint = format!("http://{}", sb.addr("lead").await);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rows.jsonl");
    std::fs::write(&file, "{\"id\": 1, \"vector\": [1, 0, 0], \"payload\": {\"tag\": \"a\"}}\n{\"id\": 2, \"vector\": [0, 1, 0]}\n")
        .unwrap();
    let tandem = |args: Vec<String>| {
        let endpoint = endpoint.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
                .args(&args)
                .args(["--endpoint", &endpoint])
                .output()
                .await
                .expect("run tandem");
            (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let args = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();

    let (code, out, err) = tandem(args("collection create docs --dim 3 --field tag:string")).await;
    assert_eq!((code, out.trim()), (Some(0), "created collection \"docs\": dim 3, L2, FLAT, 1 shard"), "{err}");
    let mut insert = args("insert --collection docs --file");
    insert.push(file.display().to_string());
    let (code, out, err) = tandem(insert.clone()).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("inserted 2 rows from"), "{out}");
    let (code, _, err) = tandem(insert).await;
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: 2 id(s) already exist in collection \"docs\""), "{err}");

    let (code, out, err) = tandem(args("search --collection docs --vector 1,0,0 --top-k 1 --consistency session --json")).await;
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["results"][0][0]["id"], 1);
    assert_eq!(v["results"][0][0]["payload"]["tag"], "a");
    assert!(v["session_token"].as_str().unwrap().starts_with("t1-"), "{out}");
    let (code, out, _) = tandem(args("search --collection docs --vector 0,1,0 --top-k 2")).await;
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().next(), Some("query 0: 2 hits"), "{out}");
    assert!(out.lines().nth(2).unwrap().split_whitespace().take(3).eq(["1", "2", "0.000000"]), "{out}");

    let (code, _, err) = tandem(args("search --collection docs --vector 1,0")).await;
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: search: wrong vector dimension"), "{err}");
    let (code, _, err) = tandem(args("search --collection docs --vector 1,0,0 --session-token junk")).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid session token \"junk\""), "{err}");

    let (code, out, _) = tandem(args("info --json")).await;
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["cluster_id"].as_str(), v["collections"][0]["rows"].as_u64()), (Some("lead"), Some(2)));
    let (code, out, _) = tandem(args("collection describe docs --json")).await;
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["dim"].as_u64(), v["fields"][0]["type"].as_str()), (Some(3), Some("string")));
    let (code, out, _) = tandem(args("collection drop docs")).await;
    assert_eq!((code, out.trim()), (Some(0), "dropped collection \"docs\""));
    let (code, out, _) = tandem(args("collection list --json")).await;
    assert_eq!((code, out.trim()), (Some(0), "[]"));
}
