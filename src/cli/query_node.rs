//! `tandem query-node`: serves a query node (`tandem_cluster::query_node`) until SIGTERM or
//! SIGINT. It holds in-memory replicas of the sealed segments a cluster's proxy assigns to it
//! (the cluster's `query_nodes.groups` lists it, or it joins a group with `--join`) and keeps
//! nothing on disk but index files in
//! transit: a restarted node starts empty and the proxy loads it again.

use std::path::PathBuf;

use anyhow::Context;
use tandem_cluster::query_node::{JoinOptions, QueryNodeOptions, serve};
use tokio_util::sync::CancellationToken;

use super::LogFormat;
use super::cluster::shutdown_signal;

#[derive(Debug, clap::Args)]
pub struct QueryNodeArgs {
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:19540", value_name = "ADDR")]
    pub listen: String,
    /// Where index files are put while they arrive (removed once loaded).
    #[arg(long, default_value = "./tandem-query-node", value_name = "DIR")]
    pub scratch_dir: PathBuf,
    /// Names the node in the writer's retention leases; the listen address by default.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Search threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub search_threads: usize,
    /// Enter a replica group of the cluster at this endpoint (its proxy, e.g.
    /// http://10.0.0.2:19530) instead of being listed in its `query_nodes.groups`; told again
    /// every 2 s. The cluster then places copies on the node and evens its group out.
    #[arg(long, value_name = "URL")]
    pub join: Option<String>,
    /// With --join: the replica group (an index in the cluster's `query_nodes.groups`).
    #[arg(long, default_value_t = 0, requires = "join", value_name = "N")]
    pub group: u32,
    /// With --join: how the cluster reaches this node (http:// + the listen address by default).
    #[arg(long, requires = "join", value_name = "URL")]
    pub advertise: Option<String>,
    /// Log line format (logs go to stderr; RUST_LOG sets the filter, default info).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

pub async fn run(a: QueryNodeArgs) -> anyhow::Result<()> {
    let _traces = tandem_telemetry::tracing::init("info", a.log_format.into(), "", "tandem-query-node")?;
    let threads = if a.search_threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { a.search_threads };
    let opts = QueryNodeOptions {
        name: a.name.clone().unwrap_or_else(|| format!("query-node-{}", a.listen)),
        scratch_dir: a.scratch_dir.clone(),
        search_threads: threads,
        join: a.join.clone().map(|cluster| JoinOptions { cluster, group: a.group, advertise: a.advertise.clone().unwrap_or_default() }),
    };
    let root = CancellationToken::new();
    let running = serve(&a.listen, opts, root.clone()).await?;
    // Scripts and tests wait for this line to learn the address (`spawn_listening`).
    println!("tandem query-node listening on {}", running.addr);
    let signal = shutdown_signal().await?;
    tracing::info!(signal, "shutting down");
    root.cancel();
    running.task.await.context("query node server task")??;
    Ok(())
}
