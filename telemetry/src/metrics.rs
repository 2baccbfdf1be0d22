//! The process-wide Prometheus recorder and the `GET /metrics` endpoint.
//!
//! ```ignore
//! tandem_telemetry::metrics::install()?;                      // once; later calls reuse it
//! let srv = tandem_telemetry::metrics::serve("127.0.0.1:0", token.clone()).await?;
//! println!("metrics on http://{}/metrics", srv.addr);
//! ```
//!
//! Code records through the `metrics` facade macros; nothing is kept before [`install`] ran (the
//! facade drops samples while no recorder is installed), so every process installs it at start
//! (`tandem_cluster::server::start` does it for clusters).
//!
//! Histograms whose name ends in `_seconds` are rendered as Prometheus histograms with
//! [`LATENCY_BUCKETS`]; other histograms as summaries.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::error::{Result, TelemetryError};

/// Upper bounds (seconds) of the latency histogram buckets: 100 µs (a cached search on a small
/// collection) to 30 s (a read waiting for a lagging replica up to its deadline).
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The Prometheus text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often recorded histogram samples are folded into their buckets when nobody scrapes
/// (a scrape folds them too); bounds the memory held by unscraped samples.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<std::result::Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder, once; later calls
/// (several clusters in one test process) return the same handle. Fails if some other recorder
/// was installed first, since nothing recorded would then reach `/metrics`.
pub fn install() -> Result<&'static PrometheusHandle> {
    let installed = HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .map_err(|e| format!("buckets: {e}"))?;
        let handle = builder.install_recorder().map_err(|e| e.to_string())?;
        // install_recorder leaves upkeep to the caller; a std thread, because the first caller
        // need not be inside a tokio runtime.
        let h = handle.clone();
        let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                h.run_upkeep();
            }
        });
        if let Err(e) = spawned {
            ::tracing::warn!(error = %e, "no metrics upkeep thread: histogram samples are folded only when scraped");
        }
        Ok(handle)
    });
    installed
        .as_ref()
        .map_err(|e| if e.starts_with("buckets") { TelemetryError::Recorder(e.clone()) } else { TelemetryError::RecorderTaken(e.clone()) })
}

/// The current metrics in the Prometheus text format (what `GET /metrics` returns); empty when
/// [`install`] never succeeded.
pub fn render() -> String {
    match HANDLE.get() {
        Some(Ok(h)) => h.render(),
        _ => String::new(),
    }
}

/// A running `/metrics` endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    /// The bound address (the real port when asked for port 0).
    pub addr: SocketAddr,
    /// Ends after the shutdown token fires and open connections have finished.
    pub task: tokio::task::JoinHandle<Result<()>>,
}

/// Installs the recorder (see [`install`]) and serves `GET /metrics` on `listen` (`host:port`;
/// port 0 picks a free one) until `shutdown` fires. Must be called inside a tokio runtime.
pub async fn serve(listen: &str, shutdown: CancellationToken) -> Result<MetricsServer> {
    let handle = install()?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|source| TelemetryError::Listen { addr: listen.to_string(), source })?;
    let addr = listener.local_addr().map_err(|source| TelemetryError::Listen { addr: listen.to_string(), source })?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(move || async move { ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], handle.render()) }));
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|source| TelemetryError::Serve { addr, source })
    });
    ::tracing::info!(%addr, "serving prometheus metrics on /metrics");
    Ok(MetricsServer { addr, task })
}

/// The canonical name of a gRPC status code (`OK`, `INVALID_ARGUMENT`, ...), as the gRPC spec
/// spells it: the `outcome` label of request counters, the same in every tandem process.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_what_was_recorded_and_stops_on_cancel() {
        let token = CancellationToken::new();
        let srv = serve("127.0.0.1:0", token.clone()).await.unwrap();
        // A second install (another cluster in the same process) shares the recorder.
        assert!(std::ptr::eq(install().unwrap(), install().unwrap()));
        metrics::counter!("telemetry_test_total", "cluster" => "t1", "op" => "x").increment(3);
        metrics::histogram!("telemetry_test_duration_seconds", "cluster" => "t1").record(0.002);
        let text = get(srv.addr, "/metrics").await;
        assert!(text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("text/plain; version=0.0.4"), "{text}");
        assert!(text.contains(r#"telemetry_test_total{cluster="t1",op="x"} 3"#), "{text}");
        // A true histogram (buckets), not a summary, because of the `_seconds` suffix.
        assert!(text.contains(r#"telemetry_test_duration_seconds_bucket{cluster="t1",le="0.0025"} 1"#), "{text}");
        assert!(text.contains(r#"telemetry_test_duration_seconds_bucket{cluster="t1",le="0.001"} 0"#), "{text}");
        assert!(render().contains("telemetry_test_total"));
        assert!(get(srv.addr, "/other").await.contains(" 404 "));
        token.cancel();
        srv.task.await.unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(srv.addr).await.is_err(), "still listening after shutdown");
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap().to_string();
        let err = serve(&addr, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains(&addr), "{err}");
        assert!(err.is_transient());
    }

    #[test]
    fn code_names_follow_the_grpc_spec() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }
}
