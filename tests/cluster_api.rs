//! The cluster node through its gRPC API: exact search, recall, visibility of writes, bad input,
//! restart. Uses the in-process sandbox.

mod sandbox;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sandbox::*;
use tandem_proto::v1 as pb;
use tonic::Code;

const COLL: &str = "items";

#[derive(Clone)]
struct Row {
    vector: Vec<f32>,
    cat: i64,
    price: f64,
}

fn dist(metric: pb::Metric, a: &[f32], b: &[f32]) -> f64 {
    match metric {
        pb::Metric::L2 => a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum(),
        pb::Metric::Ip => a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum(),
        pb::Metric::Cosine => {
            let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum::<f64>() / (n(a) * n(b))
        }
        pb::Metric::Unspecified => unreachable!(),
    }
}

fn closer_first(metric: pb::Metric) -> impl Fn(&f64, &f64) -> std::cmp::Ordering {
    move |a, b| if metric == pb::Metric::L2 { a.total_cmp(b) } else { b.total_cmp(a) }
}

async fn insert_rows(c: &mut Client, rows: &BTreeMap<i64, Row>, ids: &[i64], upsert: bool) {
    let vectors = ids.iter().flat_map(|id| rows[id].vector.clone()).collect();
    let payloads = ids.iter().map(|id| payload(&[("cat", int(rows[id].cat)), ("price", dbl(rows[id].price))])).collect();
    if upsert {
        c.upsert(pb::UpsertRequest { ack: 0, collection: COLL.into(), ids: ids.to_vec(), vectors, payloads }).await.expect("upsert");
    } else {
        c.insert(pb::InsertRequest { ack: 0, collection: COLL.into(), ids: ids.to_vec(), vectors, payloads }).await.expect("insert");
    }
}

/// FLAT search equals brute force exactly, for every metric, with and without filters, across
/// sealed (faiss) and growing (exact) segments on several shards, with tombstones and upserts.
/// The 20 queries go as one batch, which the two search threads split between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_search_equals_brute_force() {
    let sb = Sandbox::builder().cluster_with("a", |c| c.segment.seal_rows = 3000).build().await;
    let mut c = sb.client("a").await;
    let dim = 8;
    for metric in [pb::Metric::L2, pb::Metric::Ip, pb::Metric::Cosine] {
        let fields = vec![field("cat", pb::ScalarType::Int64), field("price", pb::ScalarType::Double)];
        c.create_collection(pb::CreateCollectionRequest { schema: Some(schema(COLL, dim, metric, None, 2, fields)) }).await.unwrap();
        let v = vectors(9000, dim as usize, metric as u64);
        let mut rows: BTreeMap<i64, Row> = (0..8500)
            .map(|i| (i, Row { vector: v[i as usize * 8..(i as usize + 1) * 8].to_vec(), cat: i % 10, price: (i % 100) as f64 }))
            .collect();
        let ids: Vec<i64> = rows.keys().copied().collect();
        for chunk in ids[..8000].chunks(1000) {
            insert_rows(&mut c, &rows, chunk, false).await;
        }
        // Everything so far becomes sealed, faiss-indexed segments; the rest stays growing.
        c.flush(pb::FlushRequest { collection: COLL.into() }).await.unwrap();
        insert_rows(&mut c, &rows, &ids[8000..], false).await;
        let deleted: Vec<i64> = (0..8500).step_by(41).collect();
        c.delete(pb::DeleteRequest { ack: 0, collection: COLL.into(), ids: deleted.clone(), filter: String::new() }).await.unwrap();
        for id in &deleted {
            rows.remove(id);
        }
        let upserted: Vec<i64> = (1..8000).step_by(97).filter(|id| rows.contains_key(id)).collect();
        for (j, id) in upserted.iter().enumerate() {
            rows.get_mut(id).unwrap().vector = v[(8500 + j) * 8..(8501 + j) * 8].to_vec();
        }
        insert_rows(&mut c, &rows, &upserted, true).await;

        let queries = vectors(20, dim as usize, 99);
        type Pred = fn(&Row) -> bool;
        let filters: [(&str, Pred); 3] =
            [("", |_| true), ("price < 90.0", |r| r.price < 90.0), ("cat == 3 or cat == 7", |r| r.cat == 3 || r.cat == 7)];
        for (filter, pred) in filters {
            for k in [10u32, 50] {
                let resp = c
                    .search(pb::SearchRequest {
                        collection: COLL.into(),
                        vectors: queries.clone(),
                        top_k: k,
                        filter: filter.into(),
                        read: read(pb::ConsistencyLevel::Strong, ""),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(resp.results.len(), 20);
                for (q, hits) in resp.results.iter().enumerate() {
                    let query = &queries[q * 8..(q + 1) * 8];
                    let mut want: Vec<f64> = rows.values().filter(|r| pred(r)).map(|r| dist(metric, query, &r.vector)).collect();
                    want.sort_by(closer_first(metric));
                    want.truncate(k as usize);
                    assert_eq!(hits.hits.len(), want.len(), "{metric:?} filter {filter:?} k {k}");
                    let mut seen = HashSet::new();
                    for (i, h) in hits.hits.iter().enumerate() {
                        let row = rows.get(&h.id).unwrap_or_else(|| panic!("{metric:?}: deleted or unknown id {} returned", h.id));
                        assert!(pred(row), "{metric:?}: id {} fails filter {filter:?}", h.id);
                        assert!(seen.insert(h.id), "duplicate id {}", h.id);
                        let truth = dist(metric, query, &row.vector);
                        let tol = 1e-4 * truth.abs().max(1.0);
                        // The reported distance is the id's true distance, and the i-th hit is
                        // as close as the i-th closest row: exact top-k, robust to exact ties.
                        assert!((h.distance as f64 - truth).abs() < tol, "{metric:?} id {} distance {} vs {truth}", h.id, h.distance);
                        assert!(
                            (truth - want[i]).abs() < tol,
                            "{metric:?} filter {filter:?} rank {i}: got {truth}, brute force {}",
                            want[i]
                        );
                    }
                }
            }
        }
        c.drop_collection(pb::DropCollectionRequest { name: COLL.into() }).await.unwrap();
    }
}

/// HNSW recall@10 >= 0.95 on a generated clustered data set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hnsw_recall_at_10() {
    let sb = Sandbox::builder().cluster("a").build().await;
    let mut c = sb.client("a").await;
    let (n, nq, dim) = (20_000usize, 200usize, 64usize);
    let ds = tandem::dataset::gaussian_mixture(n, nq, dim, 50, 7);
    c.create_collection(pb::CreateCollectionRequest { schema: Some(schema(COLL, dim as u32, pb::Metric::L2, hnsw(16, 200), 1, vec![])) })
        .await
        .unwrap();
    for (b, chunk) in ds.base.chunks(5000 * dim).enumerate() {
        let ids = (b * 5000..b * 5000 + chunk.len() / dim).map(|i| i as i64).collect();
        c.insert(pb::InsertRequest { ack: 0, collection: COLL.into(), ids, vectors: chunk.to_vec(), payloads: vec![] }).await.unwrap();
    }
    c.flush(pb::FlushRequest { collection: COLL.into() }).await.unwrap();
    let info = c.describe_collection(pb::DescribeCollectionRequest { name: COLL.into() }).await.unwrap().into_inner().collection.unwrap();
    assert!(info.segments.iter().all(|s| s.state == pb::segment_info::State::Indexed as i32), "{:?}", info.segments);
    let resp = c
        .search(pb::SearchRequest {
            collection: COLL.into(),
            vectors: ds.queries.clone(),
            top_k: 10,
            params: Some(pb::SearchParams { nprobe: 0, ef_search: 128 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut found = 0;
    for (q, hits) in resp.results.iter().enumerate() {
        let query = &ds.queries[q * dim..(q + 1) * dim];
        let mut all: Vec<(f64, i64)> = (0..n).map(|i| (dist(pb::Metric::L2, query, &ds.base[i * dim..(i + 1) * dim]), i as i64)).collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        let truth: HashSet<i64> = all[..10].iter().map(|x| x.1).collect();
        found += hits.hits.iter().filter(|h| truth.contains(&h.id)).count();
    }
    let recall = found as f64 / (nq * 10) as f64;
    assert!(recall >= 0.95, "hnsw recall@10 = {recall}");
}

/// An upsert or delete is visible to the very next read on the same node, with no token, in
/// growing and in sealed segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_and_delete_visible_immediately() {
    let sb = Sandbox::builder().cluster("a").build().await;
    let mut c = sb.client("a").await;
    let dim = 16;
    c.create_collection(pb::CreateCollectionRequest {
        schema: Some(schema(COLL, dim, pb::Metric::L2, hnsw(8, 40), 3, vec![field("tag", pb::ScalarType::String)])),
    })
    .await
    .unwrap();
    let v = vectors(400, dim as usize, 5);
    let d = dim as usize;
    for round in 0..2 {
        let base = round * 200;
        let ids: Vec<i64> = (base..base + 100).map(|i| i as i64).collect();
        let payloads = ids.iter().map(|_| payload(&[("tag", string("old"))])).collect();
        c.insert(pb::InsertRequest {
            ack: 0,
            collection: COLL.into(),
            ids: ids.clone(),
            vectors: v[base * d..(base + 100) * d].to_vec(),
            payloads,
        })
        .await
        .unwrap();
        if round == 1 {
            // the rows now live in sealed, indexed segments
            c.flush(pb::FlushRequest { collection: COLL.into() }).await.unwrap();
        }
        let target = ids[5];
        let new_vec = v[(base + 150) * d..(base + 151) * d].to_vec();
        c.upsert(pb::UpsertRequest {
            ack: 0,
            collection: COLL.into(),
            ids: vec![target],
            vectors: new_vec.clone(),
            payloads: vec![payload(&[("tag", string("new"))])],
        })
        .await
        .unwrap();
        let got = c
            .get(pb::GetRequest {
                collection: COLL.into(),
                ids: vec![target],
                output_fields: vec!["*".into()],
                include_vectors: true,
                read: read(pb::ConsistencyLevel::Eventually, ""),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.entities.len(), 1);
        assert_eq!(got.entities[0].vector, new_vec, "round {round}: upserted vector not visible");
        assert_eq!(got.entities[0].payload.as_ref().unwrap().fields["tag"], string("new"));
        let hits = c
            .search(pb::SearchRequest {
                collection: COLL.into(),
                vectors: new_vec.clone(),
                top_k: 3,
                output_fields: vec!["tag".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hits.results[0].hits[0].id, target);
        assert!(hits.results[0].hits[0].distance.abs() < 1e-6);
        assert_eq!(hits.results[0].hits[0].payload.as_ref().unwrap().fields["tag"], string("new"));
        // the old version is gone: exactly one row with that id
        let n = c
            .count(pb::CountRequest { collection: COLL.into(), filter: format!("id == {target}"), read: None })
            .await
            .unwrap()
            .into_inner()
            .count;
        assert_eq!(n, 1);

        let victim = ids[7];
        let r = c
            .delete(pb::DeleteRequest { ack: 0, collection: COLL.into(), ids: vec![victim, 999_999], filter: String::new() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.count, 1, "one of the two ids existed");
        let got = c.get(pb::GetRequest { collection: COLL.into(), ids: vec![victim], ..Default::default() }).await.unwrap().into_inner();
        assert!(got.entities.is_empty(), "round {round}: deleted row still returned by get");
        let victim_vec = v[(base + 7) * d..(base + 8) * d].to_vec();
        let hits = c
            .search(pb::SearchRequest { collection: COLL.into(), vectors: victim_vec, top_k: 100, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(hits.results[0].hits.iter().all(|h| h.id != victim), "round {round}: deleted row still found by search");
    }
    // delete by filter
    let r = c
        .delete(pb::DeleteRequest { ack: 0, collection: COLL.into(), ids: vec![], filter: "tag == \"new\"".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.count, 2);
    assert_eq!(count(&mut c, COLL).await, 200 - 2 - 2);
    let q = c
        .query(pb::QueryRequest {
            collection: COLL.into(),
            filter: "id < 3".into(),
            limit: 10,
            output_fields: vec!["tag".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.entities.iter().map(|e| e.id).collect::<Vec<_>>(), vec![0, 1, 2]);
}

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let e = r.expect_err(&format!("expected {code:?} containing {needle:?}"));
    assert_eq!(e.code(), code, "{needle}: {}", e.message());
    assert!(e.message().contains(needle), "message {:?} should contain {needle:?}", e.message());
}

/// Bad input gets a clear gRPC error naming the problem, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_changes_nothing() {
    let sb = Sandbox::builder().cluster("a").build().await;
    let mut c = sb.client("a").await;
    let fields = vec![field("price", pb::ScalarType::Double)];
    c.create_collection(pb::CreateCollectionRequest { schema: Some(schema(COLL, 4, pb::Metric::Cosine, None, 4, fields.clone())) })
        .await
        .unwrap();
    let ids: Vec<i64> = (0..10).collect();
    c.insert(pb::InsertRequest { ack: 0, collection: COLL.into(), ids: ids.clone(), vectors: vectors(10, 4, 1), payloads: vec![] })
        .await
        .unwrap();
    let ins = |ids: Vec<i64>, vectors: Vec<f32>, payloads: Vec<pb::Payload>| pb::InsertRequest {
        collection: COLL.into(),
        ids,
        vectors,
        payloads,
        ack: 0,
    };

    // DDL
    assert_status(
        c.create_collection(pb::CreateCollectionRequest { schema: Some(schema(COLL, 4, pb::Metric::L2, None, 1, vec![])) }).await,
        Code::AlreadyExists,
        "\"items\" already exists",
    );
    assert_status(
        c.create_collection(pb::CreateCollectionRequest { schema: Some(schema("x", 0, pb::Metric::L2, None, 1, vec![])) }).await,
        Code::InvalidArgument,
        "dim 0",
    );
    assert_status(
        c.create_collection(pb::CreateCollectionRequest { schema: Some(schema("bad name", 4, pb::Metric::L2, None, 1, vec![])) }).await,
        Code::InvalidArgument,
        "\"bad name\"",
    );
    assert_status(c.create_collection(pb::CreateCollectionRequest { schema: None }).await, Code::InvalidArgument, "needs a schema");
    assert_status(c.drop_collection(pb::DropCollectionRequest { name: "nope".into() }).await, Code::NotFound, "\"nope\" not found");
    // DML
    assert_status(
        c.insert(ins(vec![100], vec![1.0; 5], vec![])).await,
        Code::InvalidArgument,
        "wrong vector dimension: collection \"items\" has dim 4, got 5 floats for 1 ids",
    );
    assert_status(
        c.insert(ins(vec![100], vec![1.0, f32::NAN, 0.0, 0.0], vec![])).await,
        Code::InvalidArgument,
        "the vector of id 100 has a non-finite value (NaN) at position 1",
    );
    assert_status(
        c.insert(ins(vec![100], vec![1.0, 0.0, f32::INFINITY, 0.0], vec![])).await,
        Code::InvalidArgument,
        "non-finite value (inf) at position 2",
    );
    assert_status(c.insert(ins(vec![], vec![], vec![])).await, Code::InvalidArgument, "empty batch");
    assert_status(
        c.insert(ins(vec![100], vec![0.0; 4], vec![])).await,
        Code::InvalidArgument,
        "zero length; COSINE needs a non-zero vector",
    );
    assert_status(c.insert(ins(vec![100, 100], vec![1.0; 8], vec![])).await, Code::InvalidArgument, "id 100 appears more than once");
    assert_status(
        c.insert(ins(vec![100], vec![1.0; 4], vec![payload(&[("colour", string("red"))])])).await,
        Code::InvalidArgument,
        "unknown payload field \"colour\": collection \"items\" declares price",
    );
    assert_status(
        c.insert(ins(vec![100], vec![1.0; 4], vec![payload(&[("price", string("cheap"))])])).await,
        Code::InvalidArgument,
        "\"price\" is declared DOUBLE but got a string",
    );
    // a multi-shard batch where one id exists: rejected as a whole
    assert_status(c.insert(ins((5..25).collect(), vectors(20, 4, 2), vec![])).await, Code::AlreadyExists, "5 id(s) already exist");
    let mut unknown = ins(vec![1], vec![1.0; 4], vec![]);
    unknown.collection = "nope".into();
    assert_status(c.insert(unknown).await, Code::NotFound, "collection \"nope\" not found");
    let mut bad_ack = ins(vec![100], vec![1.0; 4], vec![]);
    bad_ack.ack = 7;
    assert_status(c.insert(bad_ack).await, Code::InvalidArgument, "unknown ack policy 7");
    assert_status(
        c.delete(pb::DeleteRequest { collection: COLL.into(), ids: vec![], filter: String::new(), ack: 0 }).await,
        Code::InvalidArgument,
        "needs ids or a filter",
    );
    assert_status(
        c.delete(pb::DeleteRequest { collection: COLL.into(), ids: vec![1], filter: "price > 1".into(), ack: 0 }).await,
        Code::InvalidArgument,
        "not both",
    );
    assert_status(
        c.delete(pb::DeleteRequest { collection: COLL.into(), ids: vec![], filter: "price >".into(), ack: 0 }).await,
        Code::InvalidArgument,
        "filter syntax error at column",
    );
    // DQL
    let search = |top_k: u32, vectors: Vec<f32>, filter: &str| pb::SearchRequest {
        collection: COLL.into(),
        vectors,
        top_k,
        filter: filter.into(),
        ..Default::default()
    };
    assert_status(c.search(search(0, vec![1.0; 4], "")).await, Code::InvalidArgument, "top_k 0 is out of range 1..=16384");
    assert_status(c.search(search(1_000_000, vec![1.0; 4], "")).await, Code::InvalidArgument, "top_k 1000000 is out of range");
    assert_status(c.search(search(5, vec![1.0; 3], "")).await, Code::InvalidArgument, "has dim 4, got 3 floats");
    assert_status(c.search(search(5, vec![], "")).await, Code::InvalidArgument, "empty batch");
    assert_status(
        c.search(search(5, vec![1.0, f32::NEG_INFINITY, 0.0, 0.0], "")).await,
        Code::InvalidArgument,
        "query 0 has a non-finite value (-inf)",
    );
    assert_status(c.search(search(5, vec![1.0; 4], "price >> 3")).await, Code::InvalidArgument, "filter syntax error at column");
    assert_status(c.search(search(5, vec![1.0; 4], "nope == 3")).await, Code::InvalidArgument, "unknown payload field \"nope\" in filter");
    assert_status(c.search(search(5, vec![1.0; 4], "price == \"x\"")).await, Code::InvalidArgument, "type mismatch");
    let mut bad_token = search(5, vec![1.0; 4], "");
    bad_token.read = read(pb::ConsistencyLevel::Session, "garbage");
    assert_status(c.search(bad_token).await, Code::InvalidArgument, "invalid session token \"garbage\"");
    let mut bad_level = search(5, vec![1.0; 4], "");
    bad_level.read = Some(pb::ReadOptions { consistency: 42, ..Default::default() });
    assert_status(c.search(bad_level).await, Code::InvalidArgument, "unknown consistency level 42");
    let mut bad_out = search(5, vec![1.0; 4], "");
    bad_out.output_fields = vec!["colour".into()];
    assert_status(c.search(bad_out).await, Code::InvalidArgument, "unknown output field \"colour\"");
    assert_status(c.get(pb::GetRequest { collection: COLL.into(), ..Default::default() }).await, Code::InvalidArgument, "at least one id");
    assert_status(
        c.query(pb::QueryRequest { collection: COLL.into(), limit: 1_000_000, ..Default::default() }).await,
        Code::InvalidArgument,
        "query limit 1000000",
    );
    // an oversized message (over the 64 MiB limit) is refused by the transport
    let n = (65 << 20) / 16;
    let big = c.insert(ins((1000..1000 + n as i64).collect(), vec![0.5; n * 4], vec![])).await;
    let e = big.expect_err("oversized message accepted");
    assert!(matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted), "{e:?}");
    assert!(e.message().contains("too large") || e.message().contains("larger than max"), "{}", e.message());
    assert_status(
        c.create_index(pb::CreateIndexRequest { collection: COLL.into(), index: None }).await,
        Code::InvalidArgument,
        "needs an index",
    );
    assert_status(
        c.create_index(pb::CreateIndexRequest { collection: COLL.into(), index: hnsw(500, 40) }).await,
        Code::InvalidArgument,
        "hnsw m 500",
    );

    // nothing changed
    assert_eq!(count(&mut c, COLL).await, 10);
    let names = c.list_collections(pb::ListCollectionsRequest {}).await.unwrap().into_inner().names;
    assert_eq!(names, vec![COLL.to_string()]);
    let info = c.describe_collection(pb::DescribeCollectionRequest { name: COLL.into() }).await.unwrap().into_inner().collection.unwrap();
    assert_eq!(info.schema.unwrap().index.unwrap().kind, Some(pb::index_spec::Kind::Flat(pb::FlatIndex {})));
}

/// Restart keeps sealed segments (loaded from their files, not rebuilt), growing rows (WAL
/// replay) and tombstones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_sealed_segments_growing_rows_and_deletes() {
    let sb = Sandbox::builder().cluster_with("a", |c| c.segment.seal_rows = 500).build().await;
    let mut c = sb.client("a").await;
    let dim = 16usize;
    c.create_collection(pb::CreateCollectionRequest {
        schema: Some(schema(COLL, dim as u32, pb::Metric::L2, ivf(8), 1, vec![field("n", pb::ScalarType::Int64)])),
    })
    .await
    .unwrap();
    let v = vectors(1300, dim, 3);
    let payloads = (0..1200).map(|i| payload(&[("n", int(i))])).collect();
    c.insert(pb::InsertRequest { ack: 0, collection: COLL.into(), ids: (0..1200).collect(), vectors: v[..1200 * dim].to_vec(), payloads })
        .await
        .unwrap();
    c.flush(pb::FlushRequest { collection: COLL.into() }).await.unwrap();
    c.insert(pb::InsertRequest {
        ack: 0,
        collection: COLL.into(),
        ids: (1200..1300).collect(),
        vectors: v[1200 * dim..].to_vec(),
        payloads: vec![],
    })
    .await
    .unwrap();
    c.delete(pb::DeleteRequest { ack: 0, collection: COLL.into(), ids: (0..1300).step_by(13).collect(), filter: String::new() })
        .await
        .unwrap();

    let search = pb::SearchRequest {
        collection: COLL.into(),
        vectors: vectors(10, dim, 77),
        top_k: 20,
        output_fields: vec!["n".into()],
        params: Some(pb::SearchParams { nprobe: 8, ef_search: 0 }),
        read: read(pb::ConsistencyLevel::Strong, ""),
        ..Default::default()
    };
    let before = c.search(search.clone()).await.unwrap().into_inner().results;
    let before_count = count(&mut c, COLL).await;
    assert_eq!(before_count, 1300 - 100);
    let segs_before =
        c.describe_collection(pb::DescribeCollectionRequest { name: COLL.into() }).await.unwrap().into_inner().collection.unwrap().segments;

    sb.restart("a").await;
    let mut c = sb.client("a").await;
    let info = c.describe_collection(pb::DescribeCollectionRequest { name: COLL.into() }).await.unwrap().into_inner().collection.unwrap();
    let sealed: Vec<_> = info.segments.iter().filter(|s| s.state != pb::segment_info::State::Growing as i32).collect();
    assert_eq!(sealed.len(), 3, "{:?}", info.segments);
    assert!(sealed.iter().all(|s| s.state == pb::segment_info::State::Indexed as i32), "index files were not loaded: {:?}", info.segments);
    assert_eq!(sealed.iter().map(|s| s.rows).sum::<u64>(), 1200);
    let sealed_before: Vec<_> =
        segs_before.iter().filter(|s| s.state != pb::segment_info::State::Growing as i32).map(|s| (s.id, s.rows, s.deleted)).collect();
    assert_eq!(sealed.iter().map(|s| (s.id, s.rows, s.deleted)).collect::<Vec<_>>(), sealed_before);
    assert_eq!(count(&mut c, COLL).await, before_count);
    let after = c.search(search).await.unwrap().into_inner().results;
    assert_eq!(after, before, "search results changed across restart");
    let got =
        c.get(pb::GetRequest { collection: COLL.into(), ids: vec![13, 14, 1209, 1210], ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(got.entities.iter().map(|e| e.id).collect::<Vec<_>>(), vec![14, 1210]);
    let _ = Duration::from_secs(1);
}

/// Concurrent one-query searches that find the search pool busy go to faiss together
/// (cluster/src/batch.rs): each still gets exactly the hits and payloads it gets alone, at every
/// consistency level, and its reply's session token covers its own read. One search thread and
/// eight clients, so searches wait and merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_searches_merge_and_each_gets_its_own_answer() {
    let sb = Sandbox::builder().cluster_with("a", |c| c.search.threads = 1).build().await;
    let mut c = sb.client("a").await;
    let dim = 32;
    let fields = vec![field("n", pb::ScalarType::Int64)];
    c.create_collection(pb::CreateCollectionRequest { schema: Some(schema(COLL, dim, pb::Metric::L2, None, 1, fields)) }).await.unwrap();
    let n = 20_000;
    let v = vectors(n, dim as usize, 7);
    let mut token = String::new();
    for lo in (0..n).step_by(5000) {
        let ids: Vec<i64> = (lo as i64..(lo + 5000) as i64).collect();
        let payloads = ids.iter().map(|&i| payload(&[("n", int(i * 3))])).collect();
        let vectors = v[lo * dim as usize..(lo + 5000) * dim as usize].to_vec();
        let r = c.insert(pb::InsertRequest { collection: COLL.into(), ids, vectors, payloads, ..Default::default() }).await.unwrap();
        token = r.into_inner().session_token;
    }
    let queries = vectors(64, dim as usize, 99);
    let levels = [pb::ConsistencyLevel::Eventually, pb::ConsistencyLevel::Strong, pb::ConsistencyLevel::Session];
    let request = {
        let token = token.clone();
        move |q: usize| pb::SearchRequest {
            collection: COLL.into(),
            vectors: queries[q * dim as usize..(q + 1) * dim as usize].to_vec(),
            top_k: 5,
            output_fields: if q.is_multiple_of(2) { vec!["n".into()] } else { vec![] },
            read: read(levels[q % 3], &token),
            ..Default::default()
        }
    };
    // Alone: one search in flight at a time.
    let mut alone = Vec::new();
    for q in 0..64 {
        alone.push(c.search(request(q)).await.unwrap().into_inner().results);
    }
    let node = sb.node("a").await;
    let (batches, members) = node.batcher.stats();
    assert_eq!(members - batches, 0, "searches one at a time never wait");

    let written = tandem_proto::session::SessionToken::decode(&token).unwrap().unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = sb.client("a").await;
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for round in 0..4 {
                for q in (t..64).step_by(8) {
                    let r = c.search(request(q)).await.unwrap().into_inner();
                    let got = tandem_proto::session::SessionToken::decode(&r.session_token).unwrap().unwrap();
                    assert!(got.ts >= written.ts, "round {round} query {q}: token {got:?} below the write's {written:?}");
                    answers.push((q, r.results));
                }
            }
            answers
        }));
    }
    for t in tasks {
        for (q, results) in t.await.unwrap() {
            assert_eq!(results, alone[q], "query {q}");
        }
    }
    let (b, m) = node.batcher.stats();
    assert_eq!(m - members, 8 * 4 * 8, "every search went through the batcher");
    assert!(m - members > b - batches, "no search merged: {} batches for {} searches", b - batches, m - members);
}
