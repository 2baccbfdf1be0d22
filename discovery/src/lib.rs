//! How gateways find clusters. A cluster is announced as a [`Registration`]; a source of
//! [`Change`]s tells the gateway when clusters appear and disappear. Two sources: a static list
//! (config), and etcd (clusters register under a prefix with a lease; the gateway watches the
//! prefix).

pub mod etcd;

use futures::stream::{self, BoxStream, StreamExt};
use serde::{Deserialize, Serialize};

/// What a cluster publishes about itself (JSON in etcd). Role, epoch and freshness are not
/// here: the gateway learns them from the cluster itself (GetClusterInfo), so they are never
/// stale in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub id: String,
    #[serde(default)]
    pub datacenter: String,
    /// gRPC endpoint, e.g. "http://10.0.0.7:19530".
    pub endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A cluster appeared, or its registration changed.
    Up(Registration),
    /// A cluster left (deregistered, or its lease expired).
    Down { id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd at {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },
    #[error("bad registration under {key}: {message}")]
    BadRegistration { key: String, message: String },
    /// The lease is gone (expired or revoked): register again with a new one.
    #[error("etcd lease lost: {message}")]
    LeaseLost { message: String },
    #[error("invalid discovery configuration: {0}")]
    InvalidConfig(String),
}

impl DiscoveryError {
    /// Worth retrying (the registry may come back), as opposed to a configuration mistake.
    pub fn is_transient(&self) -> bool {
        match self {
            DiscoveryError::Etcd { .. } => true,
            DiscoveryError::LeaseLost { .. } => true,
            DiscoveryError::BadRegistration { .. } | DiscoveryError::InvalidConfig(_) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, DiscoveryError>;

/// A fixed list: every cluster comes up once, and the stream then stays open (never ends, so a
/// consumer does not mistake the end of the list for the loss of every cluster).
pub fn static_list(clusters: Vec<Registration>) -> BoxStream<'static, Change> {
    stream::iter(clusters.into_iter().map(Change::Up)).chain(stream::pending()).boxed()
}
