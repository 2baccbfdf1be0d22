//! Spans really leave the process over OTLP/gRPC, and a server span made by `GrpcTraceLayer` from
//! an injected `traceparent` is exported as the child of the caller's span. A fake collector
//! (the OTLP TraceService on a free port) stands in for a real one.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use tandem_telemetry::tracing::{GrpcTraceLayer, inject, otel_layer, otlp_provider};
use tonic::metadata::MetadataMap;
use tower::{Layer, Service, ServiceExt};
use tracing_subscriber::layer::SubscriberExt;

#[derive(Clone, Default)]
struct Collector {
    /// (service.name of the resource, span)
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A fake OTLP collector on a free port: (collector, its address, stop, server task).
async fn start_collector()
-> (Collector, std::net::SocketAddr, tokio_util::sync::CancellationToken, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), stop.clone().cancelled_owned()),
    );
    (collector, addr, stop, server)
}

/// `init` with an endpoint installs the process's subscriber with an exporting layer; dropping
/// the guard flushes what is buffered (here: on a runtime worker, the CLI's case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_exports_spans_and_dropping_the_guard_flushes_them() {
    let (collector, addr, stop, server) = start_collector().await;
    let guard = tandem_telemetry::tracing::init("info", tandem_telemetry::tracing::LogFormat::Json, &format!("http://{addr}"), "init-test")
        .expect("init");
    assert!(guard.exporting());
    tracing::info_span!("exported by init").in_scope(|| tracing::info!("inside"));
    drop(guard);
    let spans = collector.spans.lock().unwrap().clone();
    let span = spans.iter().find(|(_, s)| s.name == "exported by init").unwrap_or_else(|| panic!("not flushed: {spans:?}"));
    assert!(span.0.contains("init-test"), "service.name: {}", span.0);
    // A second init (another component in the same process) changes nothing.
    let again = tandem_telemetry::tracing::init("info", tandem_telemetry::tracing::LogFormat::Text, "", "x").unwrap();
    assert!(!again.exporting());
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_with_the_callers_span_as_parent() {
    let (collector, addr, stop, server) = start_collector().await;

    let provider = otlp_provider(&format!("http://{addr}"), "telemetry-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(otel_layer(&provider));
    let (client_trace, client_span) = {
        let _sub = tracing::subscriber::set_default(subscriber);
        let client = tracing::info_span!("gateway route");
        let mut md = MetadataMap::new();
        client.in_scope(|| inject(&mut md));
        let mut req = http::Request::builder().uri("http://x/tandem.v1.Tandem/Search").body(()).unwrap();
        *req.headers_mut() = md.into_headers();
        let handler = tower::service_fn(|_req: http::Request<()>| async { Ok::<_, std::convert::Infallible>(()) });
        let mut svc = GrpcTraceLayer::for_cluster("c9").layer(handler);
        svc.ready().await.unwrap().call(req).await.unwrap();
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let sc = client.context().span().span_context().clone();
        drop(client);
        (sc.trace_id().to_bytes().to_vec(), sc.span_id().to_bytes().to_vec())
    };
    // force_flush blocks until the batch is exported; the exporter's channel runs on this runtime.
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush()).await.unwrap().unwrap();

    let spans = collector.spans.lock().unwrap().clone();
    let server_span =
        spans.iter().find(|(_, s)| s.name == "tandem.v1.Tandem/Search").unwrap_or_else(|| panic!("no server span in {spans:?}"));
    let gateway_span = spans.iter().find(|(_, s)| s.name == "gateway route").unwrap_or_else(|| panic!("no client span in {spans:?}"));
    assert!(server_span.0.contains("telemetry-test"), "service.name: {}", server_span.0);
    assert_eq!(gateway_span.1.span_id, client_span);
    assert_eq!(server_span.1.kind, opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32);
    assert_eq!(server_span.1.trace_id, client_trace, "server span is in another trace");
    assert_eq!(server_span.1.parent_span_id, client_span, "server span's parent is not the caller's span");
    let cluster = server_span.1.attributes.iter().find(|kv| kv.key == "cluster").map(|kv| format!("{:?}", kv.value));
    assert!(cluster.is_some_and(|c| c.contains("c9")), "{:?}", server_span.1.attributes);

    provider.shutdown().unwrap();
    stop.cancel();
    server.await.unwrap().unwrap();
}
