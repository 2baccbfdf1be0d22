//! tandem's client-aware gateway. It serves the whole public API (`tandem.v1.Tandem`), so any
//! client of a cluster is a client of the gateway, plus `tandem.v1.Gateway/Topology`:
//!
//! * writes and DDL go to the leading cluster, tagged with its epoch; while no leader is known
//!   (an election) they are held, bounded, and sent to the new leader (see [`buffer`]);
//! * reads go to any readable cluster (leader included) whose last known freshness can reach
//!   the read's guarantee within its deadline, chosen by a policy (power of two choices over
//!   peak-EWMA latency, round robin, prefer the local datacenter); transient failures retry on
//!   another cluster within a retry budget, optionally hedged;
//! * sessions: the newest token per `session-id` header, so clients that cannot carry tokens
//!   still get read-your-writes and monotonic reads.
//!
//! Membership is a stream of [`tandem_discovery::Change`]s: a static list or etcd.
#![forbid(unsafe_code)]

pub mod buffer;
pub mod coalesce;
pub mod config;
pub mod error;
pub mod h2channel;
pub mod latency;
pub mod router;
pub mod server;
pub mod service;
pub mod session;
pub mod topology;

pub use config::GatewayConfig;
pub use error::{GatewayError, Result};
pub use server::{Running, start};
