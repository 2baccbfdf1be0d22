//! tandem's protobuf types: the public gRPC API (`tandem.v1`, served by clusters and the gateway
//! alike) and the records a cluster node keeps on disk (`tandem.storage.v1`).
//!
//! Generated code only, plus the few conversions every user of the API needs.
#![forbid(unsafe_code)]

pub mod json;
pub mod session;
pub mod wire;

pub use wire::Role;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tandem.v1");
}

pub mod storage {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("tandem.storage.v1");
    }
}

pub mod replication {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("tandem.replication.v1");
    }
}

pub mod cluster {
    /// Inside one cluster: the query nodes' service (`tandem query-node`).
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("tandem.cluster.v1");
    }
}

/// Encoded `FileDescriptorSet` of every tandem .proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tandem_descriptor.bin"));
