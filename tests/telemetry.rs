//! Observability of a cluster, end to end: request counters and latency histograms by op,
//! consistency level and outcome, scraped from `/metrics` over real HTTP; the node's gauges;
//! shutdown answering a request in flight; and a cluster's request span joining the caller's
//! trace through `traceparent` metadata.
//!
//! The recorder is process-wide, so every test uses its own cluster ids and asserts only the
//! series carrying them.

mod sandbox;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sandbox::{Sandbox, eventually, read, schema, vectors};
use tandem_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').unwrap_or_else(|| panic!("bad labels in {line:?}"))),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        // Our label values hold no quotes or commas, so a plain split is enough.
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        out.push(Sample { name: name.to_string(), labels: map, value });
    }
    out
}

/// The value of the one series named `name` whose labels are exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples.iter().find(|s| s.name == name && s.labels == want).map(|s| s.value)
}

/// `GET /metrics` over a plain TCP connection; returns the body, after checking the status.
async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

fn requests(samples: &[Sample], cluster: &str, op: &str, consistency: &str, outcome: &str) -> f64 {
    value(samples, "tandem_requests_total", &[("cluster", cluster), ("op", op), ("consistency", consistency), ("outcome", outcome)])
        .unwrap_or(0.0)
}

async fn create(c: &mut sandbox::Client, name: &str) {
    c.create_collection(pb::CreateCollectionRequest { schema: Some(schema(name, 4, pb::Metric::L2, None, 2, vec![])) })
        .await
        .expect("create collection");
}

fn insert(collection: &str, ids: std::ops::Range<i64>, dim: usize) -> pb::InsertRequest {
    let n = ids.end - ids.start;
    pb::InsertRequest {
        collection: collection.into(),
        ids: ids.collect(),
        vectors: vectors(n as usize, dim, 7),
        payloads: vec![],
        ack: pb::AckPolicy::Local as i32,
    }
}

fn search(collection: &str, top_k: u32, level: pb::ConsistencyLevel) -> pb::SearchRequest {
    pb::SearchRequest { collection: collection.into(), vectors: vectors(1, 4, 99), top_k, read: read(level, ""), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_by_op_consistency_and_outcome() {
    let (lead, alt) = ("obs_lead", "obs_alt");
    let sb = Sandbox::builder().leading(lead).alternative(alt, lead).build().await;
    let stop = CancellationToken::new();
    let srv = tandem_telemetry::metrics::serve("127.0.0.1:0", stop.clone()).await.expect("serve /metrics");
    let mut c = sb.client(lead).await;
    create(&mut c, "docs").await;
    c.insert(insert("docs", 0..10, 4)).await.expect("insert");
    c.insert(insert("docs", 10..20, 4)).await.expect("insert");
    let bad = c.insert(insert("docs", 20..21, 3)).await.expect_err("3 floats for dim 4");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    use pb::ConsistencyLevel as L;
    for (level, n) in [(L::Strong, 3), (L::Bounded, 2), (L::Eventually, 1), (L::Session, 1)] {
        for _ in 0..n {
            let r = c.search(search("docs", 5, level)).await.expect("search").into_inner();
            assert_eq!(r.results[0].hits.len(), 5);
        }
    }
    let bad = c.search(search("docs", 0, L::Strong)).await.expect_err("top_k 0");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let missing = c.search(search("nope", 5, L::Strong)).await.expect_err("no such collection");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let m = parse(&scrape(srv.addr).await);
    assert_eq!(requests(&m, lead, "create_collection", "none", "OK"), 1.0);
    assert_eq!(requests(&m, lead, "insert", "none", "OK"), 2.0);
    assert_eq!(requests(&m, lead, "insert", "none", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(requests(&m, lead, "search", "strong", "OK"), 3.0);
    assert_eq!(requests(&m, lead, "search", "bounded", "OK"), 2.0);
    assert_eq!(requests(&m, lead, "search", "eventually", "OK"), 1.0);
    assert_eq!(requests(&m, lead, "search", "session", "OK"), 1.0);
    assert_eq!(requests(&m, lead, "search", "strong", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(requests(&m, lead, "search", "strong", "NOT_FOUND"), 1.0);
    // Nothing searched the alternative yet: its series are its own.
    assert_eq!(requests(&m, alt, "search", "strong", "OK"), 0.0);

    // The latency histogram: one observation per search, in real buckets.
    let h = [("cluster", lead), ("op", "search")];
    assert_eq!(value(&m, "tandem_request_duration_seconds_count", &h), Some(9.0));
    let inf = [("cluster", lead), ("op", "search"), ("le", "+Inf")];
    assert_eq!(value(&m, "tandem_request_duration_seconds_bucket", &inf), Some(9.0));
    let buckets =
        m.iter().filter(|s| s.name == "tandem_request_duration_seconds_bucket" && s.labels.get("cluster").is_some_and(|c| c == lead));
    assert!(buckets.count() > 10, "too few histogram buckets");
    assert!(value(&m, "tandem_request_duration_seconds_sum", &h).is_some_and(|s| s > 0.0));
    assert_eq!(value(&m, "tandem_requests_in_flight", &h), Some(0.0));

    // Gauges, refreshed every second from what GetClusterInfo reports, per cluster.
    let last = Mutex::new(String::new());
    eventually(Duration::from_secs(60), || async {
        let text = scrape(srv.addr).await;
        let m = parse(&text);
        *last.lock().unwrap() = text;
        value(&m, "tandem_collection_rows", &[("cluster", lead), ("collection", "docs")]) == Some(20.0)
            && value(&m, "tandem_collection_rows", &[("cluster", alt), ("collection", "docs")]) == Some(20.0)
    })
    .await;
    let last = last.into_inner().unwrap();
    let m = parse(&last);
    let docs = |cluster| [("cluster", cluster), ("collection", "docs")];
    assert_eq!(value(&m, "tandem_collection_serviceable_lag_ms", &docs(lead)), Some(0.0));
    assert!(value(&m, "tandem_collection_serviceable_lag_ms", &docs(alt)).is_some());
    assert!(value(&m, "tandem_collection_memory_bytes", &docs(lead)).is_some_and(|b| b > 0.0));
    assert!(value(&m, "tandem_collection_disk_bytes", &docs(lead)).is_some_and(|b| b > 0.0));
    assert_eq!(value(&m, "tandem_cluster_role", &[("cluster", lead), ("role", "leading")]), Some(1.0));
    assert_eq!(value(&m, "tandem_cluster_role", &[("cluster", lead), ("role", "alternative")]), Some(0.0));
    assert_eq!(value(&m, "tandem_cluster_role", &[("cluster", alt), ("role", "alternative")]), Some(1.0));
    assert_eq!(value(&m, "tandem_cluster_role", &[("cluster", alt), ("role", "leading")]), Some(0.0));
    let epoch = value(&m, "tandem_cluster_epoch", &[("cluster", lead)]).expect("epoch gauge");
    assert_eq!(epoch, sb.node(lead).await.epoch() as f64);
    assert!(last.contains("# TYPE tandem_request_duration_seconds histogram"), "{last}");
    assert!(last.contains("# HELP tandem_requests_total"), "{last}");

    // A read on the alternative is counted under the alternative's id only.
    let mut a = sb.client(alt).await;
    a.search(search("docs", 3, L::Eventually)).await.expect("search the alternative");
    let m = parse(&scrape(srv.addr).await);
    assert_eq!(requests(&m, alt, "search", "eventually", "OK"), 1.0);
    assert_eq!(requests(&m, lead, "search", "eventually", "OK"), 1.0);

    stop.cancel();
    srv.task.await.unwrap().unwrap();
}

/// Graceful shutdown answers a request in flight instead of cutting it: a SESSION read whose
/// token is ahead of the node waits (here up to `read.max_wait_ms`) and gets the server's own
/// DEADLINE_EXCEEDED explanation, although the node is stopped while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_requests_in_flight() {
    let id = "obs_drain";
    let sb = Sandbox::builder().cluster_with(id, |cfg| cfg.read.max_wait_ms = 5_000).build().await;
    let mut c = sb.client(id).await;
    create(&mut c, "docs").await;
    c.insert(insert("docs", 0..4, 4)).await.expect("insert");
    let node = sb.node(id).await;
    let ahead = node.token(tandem_cluster::ts::compose(tandem_cluster::ts::wall_ms() + 600_000, 0)).encode();
    let mut req = search("docs", 2, pb::ConsistencyLevel::Session);
    req.read = read(pb::ConsistencyLevel::Session, &ahead);
    let call = tokio::spawn(async move { c.search(req).await });

    let in_flight = || async {
        value(&parse(&tandem_telemetry::metrics::render()), "tandem_requests_in_flight", &[("cluster", id), ("op", "search")]) == Some(1.0)
    };
    eventually(Duration::from_secs(30), in_flight).await;
    sb.stop(id).await;
    let err = call.await.unwrap().expect_err("the read waits for a ts the node never reaches");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("behind the requested ts"), "not the server's answer: {err:?}");

    let m = parse(&tandem_telemetry::metrics::render());
    assert_eq!(requests(&m, id, "search", "session", "DEADLINE_EXCEEDED"), 1.0);
    assert_eq!(value(&m, "tandem_requests_in_flight", &[("cluster", id), ("op", "search")]), Some(0.0));
}

// ---- traces ----------------------------------------------------------------------------------

/// Keeps every finished span (a test exporter; no collector needed).
#[derive(Debug, Clone, Default)]
struct Captured(Arc<Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

impl opentelemetry_sdk::trace::SpanExporter for Captured {
    async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// The process's subscriber for this test binary: OpenTelemetry spans for tandem's own targets,
/// exported to [`Captured`] as they end.
fn captured_spans() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        let captured = Captured::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_simple_exporter(captured.clone()).build();
        let targets = tracing_subscriber::filter::Targets::new()
            .with_target("tandem_telemetry", tracing::Level::INFO)
            .with_target("telemetry", tracing::Level::INFO);
        let subscriber = tracing_subscriber::registry().with(tandem_telemetry::tracing::otel_layer(&provider)).with(targets);
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber in this test binary");
        // The provider must outlive every span: this test binary never shuts it down.
        std::mem::forget(provider);
        captured
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_request_span_is_a_child_of_the_callers_span() {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let captured = captured_spans();
    let id = "obs_trace";
    let sb = Sandbox::builder().cluster(id).build().await;
    let mut c = sb.client(id).await;
    create(&mut c, "docs").await;

    let caller = tracing::info_span!("application request");
    let mut req = tonic::Request::new(pb::CountRequest {
        collection: "docs".into(),
        filter: String::new(),
        read: read(pb::ConsistencyLevel::Strong, ""),
    });
    caller.in_scope(|| tandem_telemetry::tracing::inject(req.metadata_mut()));
    assert!(req.metadata().get("traceparent").is_some(), "nothing injected");
    c.count(req).await.expect("count");
    let want = caller.context().span().span_context().clone();

    let is_count = |s: &opentelemetry_sdk::trace::SpanData| {
        s.name == "tandem.v1.Tandem/Count" && s.attributes.iter().any(|kv| kv.key.as_str() == "cluster" && kv.value.as_str() == id)
    };
    // The server span ends when the server finishes the call, which may be just after the reply.
    eventually(Duration::from_secs(30), || async { captured.0.lock().unwrap().iter().any(is_count) }).await;
    let spans = captured.0.lock().unwrap();
    let server = spans.iter().find(|s| is_count(s)).unwrap();
    assert_eq!(server.span_context.trace_id(), want.trace_id(), "the cluster's span is in another trace");
    assert_eq!(server.parent_span_id, want.span_id(), "the cluster's span is not the caller's child");
    assert_eq!(server.span_kind, opentelemetry::trace::SpanKind::Server);
    let status = server.attributes.iter().find(|kv| kv.key.as_str() == "rpc.grpc.status_code").map(|kv| kv.value.to_string());
    assert_eq!(status.as_deref(), Some("0"), "{:?}", server.attributes);
}

// ---- the binary -----------------------------------------------------------------------------

/// Kills the child when the test ends, whatever happens.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tandem cluster` with `telemetry.metrics_listen` set serves `/metrics` (port 0: it prints the
/// address), counts requests under its cluster id, and exits cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tandem_cluster_serves_metrics_when_configured() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let id = "obs_proc";
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["cluster", "--listen", "127.0.0.1:0", "--cluster-id", id, "--data-dir"])
            .arg(dir.path())
            .env("TANDEM__TELEMETRY__METRICS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn tandem cluster"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut grpc, mut metrics) = (None, None);
    while grpc.is_none() || metrics.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("tandem cluster printed its addresses");
        if let Some(a) = line.split(" listening on ").nth(1) {
            grpc = Some(a.trim().parse::<SocketAddr>().unwrap());
        }
        if let Some(a) = line.split(" metrics on http://").nth(1) {
            metrics = Some(a.trim().trim_end_matches("/metrics").parse::<SocketAddr>().unwrap());
        }
    }
    let (grpc, metrics) = (grpc.unwrap(), metrics.unwrap());
    let mut c = sandbox::connect(grpc).await;
    c.get_cluster_info(pb::GetClusterInfoRequest {}).await.expect("cluster info");
    let m = parse(&scrape(metrics).await);
    assert_eq!(requests(&m, id, "get_cluster_info", "none", "OK"), 1.0);
    eventually(Duration::from_secs(30), || async {
        value(&parse(&scrape(metrics).await), "tandem_cluster_role", &[("cluster", id), ("role", "leading")]) == Some(1.0)
    })
    .await;

    #[allow(unsafe_code)] // SIGTERM to our own child: the graceful path a supervisor takes
    let sent = unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = tokio::task::spawn_blocking(move || child.0.wait()).await.unwrap().unwrap();
    assert!(status.success(), "tandem cluster exited with {status}");
    assert!(tokio::net::TcpStream::connect(metrics).await.is_err(), "/metrics still served after exit");
}
