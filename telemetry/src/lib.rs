//! Observability shared by every tandem process (cluster node, gateway, tools).
//!
//! * [`metrics`]: one process-wide Prometheus recorder behind the `metrics` facade, so any crate
//!   records with `metrics::counter!`/`histogram!`/`gauge!` and one `GET /metrics` endpoint
//!   shows it all. Several clusters may share a process (tests, the demo): every series they
//!   record carries a `cluster` label, never a process-wide one.
//! * [`tracing`]: logs (text or JSON, `RUST_LOG` filter), OpenTelemetry spans exported over
//!   OTLP/gRPC when an endpoint is configured, and W3C trace context carried in gRPC metadata so
//!   a cluster's request span is a child of the gateway's.
//!
//! The crate knows nothing of clusters or faiss: the cluster and the gateway both depend on it.
#![forbid(unsafe_code)]

pub mod error;
pub mod metrics;
pub mod tracing;

pub use error::{Result, TelemetryError};
