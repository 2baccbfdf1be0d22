//! Logs, OpenTelemetry traces, and W3C trace context over gRPC.
//!
//! ```text
//!  gateway                                      cluster
//!  GrpcTraceLayer span "Tandem/Search" ──┐       GrpcTraceLayer: extract(traceparent) ──► span
//!    inject(req.metadata_mut()) ──traceparent──►   "Tandem/Search", child of the gateway's
//! ```
//!
//! * [`init`]: once per process. Logs go to stderr (text or JSON, `RUST_LOG` overrides the
//!   default filter); with an OTLP endpoint, spans are also exported over OTLP/gRPC in batches.
//! * [`inject`] puts the current span's context into outbound gRPC metadata (`traceparent`,
//!   `tracestate`); [`GrpcTraceLayer`] (a tower layer for `tonic::transport::Server::layer`)
//!   opens one span per inbound request, parented on the caller's context when one came.
//!
//! Without an OpenTelemetry layer in the subscriber (no OTLP endpoint), spans have no trace ids:
//! `inject` then adds nothing and the layer's spans are plain log spans.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use ::tracing::Instrument;
use ::tracing::field::Empty;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::error::{Result, TelemetryError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the OTLP pipeline alive; dropping it flushes spans still buffered and stops the
/// exporter. Hold it until the process ends.
#[must_use = "dropping the guard stops exporting spans"]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Whether spans are exported (an OTLP endpoint was configured and this call installed it).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        let Some(p) = self.provider.take() else { return };
        // Shutdown blocks until the last batch is exported, and the exporter's channel runs on
        // the tokio runtime: on a runtime worker, hand the worker's other tasks over first.
        let multi_thread =
            tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let r = if multi_thread { tokio::task::block_in_place(|| p.shutdown()) } else { p.shutdown() };
        if let Err(e) = r {
            eprintln!("warning: flushing traces at exit: {e}");
        }
    }
}

/// Installs the process's `tracing` subscriber: logs to stderr in `format`, filtered by
/// `RUST_LOG` or else `default_filter`; and when `otlp_endpoint` is not empty (e.g.
/// `http://127.0.0.1:4317`), an OpenTelemetry layer exporting spans over OTLP/gRPC with
/// `service.name = service_name`. Needs a tokio runtime when exporting.
///
/// A second call changes nothing and returns a guard that exports nothing (in-process callers:
/// tests, the demo, may call it freely).
pub fn init(default_filter: &str, format: LogFormat, otlp_endpoint: &str, service_name: &str) -> Result<TracingGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = if otlp_endpoint.is_empty() { None } else { Some(otlp_provider(otlp_endpoint, service_name)?) };
    // Colour codes only for a person watching, not for log files and collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let otel = provider.as_ref().map(otel_layer);
    match tracing_subscriber::registry().with(otel).with(fmt).with(filter).try_init() {
        Ok(()) => {
            if provider.is_some() {
                ::tracing::info!(endpoint = otlp_endpoint, service = service_name, "exporting traces over otlp");
            }
            Ok(TracingGuard { provider })
        }
        Err(_) => {
            if let Some(p) = provider {
                let _ = p.shutdown();
                ::tracing::warn!(endpoint = otlp_endpoint, "tracing was already initialised in this process: traces are not exported");
            }
            Ok(TracingGuard { provider: None })
        }
    }
}

/// A tracer provider exporting spans in batches to the OTLP/gRPC collector at `endpoint`.
/// Must be called inside a tokio runtime (the exporter's channel lives on it); the runtime must
/// outlive the provider.
pub fn otlp_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let err = |reason: String| TelemetryError::Otlp { endpoint: endpoint.to_string(), reason };
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(err("the otlp exporter needs a tokio runtime".into()));
    }
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(err("expected a URL like http://127.0.0.1:4317".into()));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| err(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name.to_string()).build())
        .build())
}

/// The `tracing` layer turning spans into OpenTelemetry spans of `provider`.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: ::tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("tandem"))
}

// ---- W3C trace context over gRPC ----------------------------------------------------------

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str())) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Puts the current `tracing` span's trace context into outbound gRPC metadata (`traceparent`,
/// and `tracestate` when set), so the callee's spans join the caller's trace. Call it on every
/// request a gateway forwards: `inject(req.metadata_mut())`.
pub fn inject(metadata: &mut MetadataMap) {
    inject_context(&::tracing::Span::current().context(), metadata);
}

/// [`inject`] for an explicit OpenTelemetry context.
pub fn inject_context(cx: &Context, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// The caller's trace context from inbound gRPC metadata (empty when none came).
pub fn extract(metadata: &MetadataMap) -> Context {
    extract_headers(metadata.as_ref())
}

/// [`extract`] from raw HTTP/2 headers (what a tower layer sees).
pub fn extract_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// A tonic client interceptor doing [`inject`]:
/// `TandemClient::with_interceptor(channel, tandem_telemetry::tracing::inject_interceptor)`.
pub fn inject_interceptor(mut req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
    inject(req.metadata_mut());
    Ok(req)
}

/// Records a request's gRPC outcome on the current span (the one [`GrpcTraceLayer`] opened):
/// `rpc.grpc.status_code`, and `otel.status_code = ERROR` unless OK.
pub fn record_status(code: tonic::Code) {
    let span = ::tracing::Span::current();
    span.record("rpc.grpc.status_code", code as i32);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
}

/// A tower layer for `tonic::transport::Server::builder().layer(..)`: one server span per
/// request, named after the RPC (`otel.name = "tandem.v1.Tandem/Search"`), a child of the
/// caller's span when the request carries `traceparent`.
#[derive(Debug, Clone, Default)]
pub struct GrpcTraceLayer {
    cluster: Option<Arc<str>>,
}

impl GrpcTraceLayer {
    /// Spans of a cluster node carry its id (field `cluster`): several clusters may share a
    /// process and a collector.
    pub fn for_cluster(cluster_id: &str) -> Self {
        GrpcTraceLayer { cluster: Some(cluster_id.into()) }
    }
}

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTraceService { inner, cluster: self.cluster.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcTraceService<S> {
    inner: S,
    cluster: Option<Arc<str>>,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcTraceService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ::tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // gRPC paths are "/package.Service/Method".
        let path = req.uri().path();
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        let span = ::tracing::info_span!(
            "grpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
            cluster = Empty,
        );
        if let Some(c) = &self.cluster {
            span.record("cluster", &**c);
        }
        let parent = extract_headers(req.headers());
        // Fails only when no OpenTelemetry layer is installed: then there is no trace to join.
        let _ = span.set_parent(parent);
        let fut = span.in_scope(|| self.inner.call(req));
        fut.instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{TraceContextExt, TraceId};
    use tower::{Layer as _, Service, ServiceExt};

    use super::*;

    fn trace_id(cx: &Context) -> TraceId {
        cx.span().span_context().trace_id()
    }

    /// A subscriber with an OpenTelemetry layer and no exporter: spans get real ids.
    fn subscriber(provider: &SdkTracerProvider) -> impl ::tracing::Subscriber + Send + Sync {
        tracing_subscriber::registry().with(otel_layer(provider))
    }

    #[test]
    fn injected_context_extracts_to_the_same_trace() {
        let provider = SdkTracerProvider::builder().build();
        ::tracing::subscriber::with_default(subscriber(&provider), || {
            let span = ::tracing::info_span!("gateway request");
            let _in = span.enter();
            let mut md = MetadataMap::new();
            inject(&mut md);
            let tp = md.get("traceparent").expect("traceparent injected").to_str().unwrap().to_string();
            let want = span.context().span().span_context().clone();
            assert!(want.is_valid());
            assert_eq!(tp, format!("00-{}-{}-01", want.trace_id(), want.span_id()));
            let got = extract(&md);
            assert_eq!(trace_id(&got), want.trace_id());
            assert_eq!(got.span().span_context().span_id(), want.span_id());
            assert!(got.span().span_context().is_remote());
        });
    }

    #[test]
    fn nothing_is_injected_outside_a_trace() {
        let mut md = MetadataMap::new();
        inject(&mut md);
        assert!(md.get("traceparent").is_none());
        assert!(!extract(&md).span().span_context().is_valid());
    }

    /// The server layer's span is a child of the span that injected the context: same trace,
    /// and its parent is the caller's span.
    #[tokio::test]
    async fn server_layer_joins_the_callers_trace() {
        let provider = SdkTracerProvider::builder().build();
        let _sub = ::tracing::subscriber::set_default(subscriber(&provider));
        let client = ::tracing::info_span!("client call");
        let mut md = MetadataMap::new();
        client.in_scope(|| inject(&mut md));
        let client_cx = client.context().span().span_context().clone();

        let mut req = http::Request::builder().uri("http://x/tandem.v1.Tandem/Search").body(()).unwrap();
        *req.headers_mut() = md.into_headers();
        // The handler reports the span it runs in.
        let handler = tower::service_fn(|_req: http::Request<()>| async {
            let cx = ::tracing::Span::current().context();
            Ok::<_, std::convert::Infallible>(cx)
        });
        let mut svc = GrpcTraceLayer::for_cluster("c1").layer(handler);
        let server_cx = svc.ready().await.unwrap().call(req).await.unwrap();
        let server = server_cx.span().span_context().clone();
        assert_eq!(server.trace_id(), client_cx.trace_id(), "server span joined another trace");
        assert_ne!(server.span_id(), client_cx.span_id(), "the server span is its own span");
        assert!(!server.is_remote());
    }

    #[test]
    fn an_endpoint_without_a_runtime_or_scheme_is_a_clear_error() {
        let e = otlp_provider("http://127.0.0.1:4317", "t").expect_err("no runtime");
        assert!(e.to_string().contains("tokio runtime"), "{e}");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(async { otlp_provider("127.0.0.1:4317", "t").expect_err("no scheme") });
        assert!(e.to_string().contains("127.0.0.1:4317"), "{e}");
    }
}
