//! A cluster's role in its replication group: one type for clusters, the gateway and the SDK,
//! defined with the wire contract (`tandem_proto::wire::Role`, where the transition diagram is).

pub use tandem_proto::wire::Role;
