//! The crate's one error type.

use std::net::SocketAddr;

pub type Result<T> = std::result::Result<T, TelemetryError>;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The metrics endpoint's address is taken or invalid.
    #[error("cannot serve /metrics on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    /// Another `metrics` recorder was installed in this process before ours.
    #[error("another metrics recorder is already installed in this process: {0}")]
    RecorderTaken(String),
    /// The Prometheus recorder's settings were refused (a bug: they are constants).
    #[error("prometheus recorder: {0}")]
    Recorder(String),
    /// The OTLP exporter could not be built (bad endpoint, no tokio runtime).
    #[error("otlp exporter for {endpoint}: {reason}")]
    Otlp { endpoint: String, reason: String },
    /// The metrics server stopped with an I/O error.
    #[error("metrics server on {addr}: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
}

impl TelemetryError {
    /// Whether trying again later may succeed (a port still held by a previous process may be
    /// released); everything else is configuration or a programming error.
    pub fn is_transient(&self) -> bool {
        match self {
            TelemetryError::Listen { source, .. } | TelemetryError::Serve { source, .. } => {
                matches!(source.kind(), std::io::ErrorKind::AddrInUse | std::io::ErrorKind::Interrupted)
            }
            TelemetryError::RecorderTaken(_) | TelemetryError::Recorder(_) | TelemetryError::Otlp { .. } => false,
        }
    }
}
