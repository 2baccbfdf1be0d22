//! tandem-exporter: replication between clusters.
//!
//! ```text
//!  leader node ── change log (per-shard WAL + DDL log) ──► Publisher ──► Transport ──► Subscriber ──► alternative node
//!                                                          (Kafka: produce;            (apply idempotently, checkpoint
//!                                                           direct: nothing to do,      atomically with the data,
//!                                                           the WAL is the log)         report serviceable ts)
//! ```
//!
//! `Transport` is one trait with several backends, each behind a cargo feature; this crate's
//! core does not depend on any broker client.
#![forbid(unsafe_code)]

pub mod direct;
pub mod error;
pub mod follower;
pub mod publisher;
pub mod transport;

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "pulsar")]
pub mod pulsar;

pub use error::{ExportError, Result};
pub use transport::{EventStream, StreamId, Transport};
