//! The Rust SDK of tandem: connect to a cluster or a gateway (they serve the same API), make
//! typed calls, read your own writes by default, and have idempotent reads retried.
//!
//! ```no_run
//! use tandem_client::{Client, CollectionSpec, FieldType, Row};
//! # async fn demo() -> tandem_client::Result<()> {
//! let client = Client::connect("http://127.0.0.1:19530").await?;
//! client.create_collection(CollectionSpec::new("docs", 3).field("tag", FieldType::String)).await?;
//! client.insert("docs", vec![Row::new(1, [0.1, 0.2, 0.3]).with("tag", "a")]).await?;
//! // SESSION by default: this read waits, wherever it lands, until it can see the insert.
//! let hits = client.search("docs").vector([0.1, 0.2, 0.3]).top_k(5).output_fields(["tag"]).await?;
//! assert_eq!(hits[0][0].id, 1);
//! # Ok(()) }
//! ```
//!
//! * **Session**: every reply carries a session token; the client keeps the newest
//!   ([`Client::session_token`]) and sends it with every read, so a SESSION read sees every
//!   write this client made or saw, also on an alternative cluster behind a gateway.
//! * **Retries**: reads (search, get, query, count, describe, list, info, topology) are resent
//!   on UNAVAILABLE with exponential backoff and jitter ([`RetryPolicy`]); writes never are.
//! * **Errors**: one [`ClientError`], keeping the server's gRPC code and message.
//!
//! docs/client.md is the guide.
#![forbid(unsafe_code)]

mod channel;
mod client;
mod error;
mod retry;
mod session;
mod types;

pub use channel::Channel;
pub use client::{Client, ClientBuilder, Count, DEFAULT_MAX_MESSAGE_BYTES, Get, Query, Search, Write};
pub use error::{ClientError, Refusal, Result, is_connection_cancel};
pub use retry::{RetryEvent, RetryPolicy};
pub use types::{
    Ack, ClusterInfo, ClusterView, CollectionInfo, CollectionSpec, CollectionStatus, Consistency, Entity, Field, FieldType, Health, Hit,
    Index, Metric, Payload, QueryNodeStatus, Role, Row, Rows, SegmentInfo, SegmentState, Topology, Value, WriteResult,
};

/// The generated protobuf types, for [`Client::raw`] and conversions.
pub use tandem_proto::v1 as proto;
