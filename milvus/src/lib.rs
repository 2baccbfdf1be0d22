//! Milvus's gRPC API over tandem: `milvus.proto.milvus.MilvusService`, the subset pymilvus's
//! `MilvusClient` calls, served on the same port as tandem's own API (gRPC routes by service
//! path, so one listener carries both).
//!
//! [`MilvusApi`] translates every call into tandem API calls on an inner
//! [`Tandem`](tandem_proto::v1::tandem_server::Tandem) implementation, in process: a cluster's
//! own service, or the gateway's (which sends writes to the leader and spreads reads). So the
//! semantics are tandem's, whichever protocol a client speaks: Milvus timestamps are tandem's
//! hybrid timestamps, a `MutationResult.timestamp` passed back as `guarantee_timestamp` is a
//! session read, and the consistency levels map one to one (see `docs/milvus.md`).
//!
//! The protos under `proto/milvus/` are tandem's own definitions, wire-compatible with
//! milvus-io/milvus-proto (same packages, messages, field numbers and types) and holding only
//! what is served.
#![forbid(unsafe_code)]

mod convert;
mod service;
mod status;
pub mod topology;
mod unsupported;

pub use service::MilvusApi;
pub use status::{MilvusCode, MilvusError};
pub use topology::{GlobalCluster, GlobalTopology, TopologySlot, TopologySource};

pub mod pb {
    //! Generated from `proto/milvus/*.proto`.
    pub mod common {
        #![allow(clippy::all, missing_docs, non_camel_case_types)]
        tonic::include_proto!("milvus.proto.common");
    }
    pub mod schema {
        #![allow(clippy::all, missing_docs, non_camel_case_types)]
        tonic::include_proto!("milvus.proto.schema");
    }
    pub mod milvus {
        #![allow(clippy::all, missing_docs, non_camel_case_types)]
        tonic::include_proto!("milvus.proto.milvus");
    }
}

/// The Milvus version tandem's answers follow (distances, codes, defaults); `GetVersion` reports
/// it, as clients gate features on it.
pub const MILVUS_VERSION: &str = "v2.3.5";

/// The gRPC service path every Milvus RPC is under.
pub const SERVICE_PATH: &str = "/milvus.proto.milvus.MilvusService/";
