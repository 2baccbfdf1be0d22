//! `tandem`: run a cluster node, talk to one, benchmark one, or take the demo tour.
//!
//! Only argument parsing and dispatch live here; the commands are in the library (`tandem::cli`,
//! `tandem::demo`, `tandem::bench`). Exit codes: 0 success, 1 failure (`error: ...` on stderr),
//! 64 invalid configuration (every problem listed), 2 bad command-line usage (clap).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tandem::bench::search::SearchBenchArgs;
use tandem::cli::cluster::ClusterArgs;
use tandem::cli::collection::CollectionCmd;
use tandem::cli::info::InfoArgs;
use tandem::cli::insert::InsertArgs;
use tandem::cli::search::SearchArgs;
use tandem::config::InvalidConfig;
use tandem::demo::DemoArgs;

/// EX_USAGE from sysexits.h: the configuration given is unusable.
const EXIT_INVALID_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "tandem", version, about = "cross-cluster leading/alternative replication for vector search")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a cluster node until SIGTERM or Ctrl-C.
    Cluster(ClusterArgs),
    /// Run a query node: in-memory replicas of a cluster's sealed segments (docs/scaling.md).
    QueryNode(tandem::cli::query_node::QueryNodeArgs),
    /// Run the client-aware gateway in front of the clusters until SIGTERM or Ctrl-C.
    Gateway(tandem::cli::gateway::GatewayArgs),
    /// Create, list, describe or drop collections.
    #[command(subcommand)]
    Collection(CollectionCmd),
    /// Insert (or upsert) vectors from a .npy, .fvecs or JSON lines file.
    Insert(InsertArgs),
    /// Search a collection with one or more query vectors.
    Search(SearchArgs),
    /// Show the cluster's identity, role and collections.
    Info(InfoArgs),
    /// Hands leadership to another cluster with no data loss (needs an arbiter).
    Failover(tandem::cli::failover::FailoverArgs),
    /// Start a cluster in this process and walk through the API with sample data.
    Demo(DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Search throughput and latency.
    Search(SearchBenchArgs),
    /// Replication lag, consistent reads on an alternative, and bootstrap throughput.
    Replication(tandem::bench::replication::ReplicationBenchArgs),
    /// Search latency and QPS through the gateway vs directly, and reads/s over 1-3 clusters.
    Gateway(tandem::bench::gateway::GatewayBenchArgs),
    /// kill -9 of the leader under load: failover time, failed reads, lost writes.
    Failover(tandem::bench::failover::FailoverBenchArgs),
    /// Fault campaign against the two-datacenter docker deployment (docker/, docs/deploy.md):
    /// partitions, kills, pauses; checks lost writes, session guarantees and convergence.
    Campaign(tandem::bench::campaign::CampaignArgs),
    /// Query nodes (docs/scaling.md): QPS over 1-3 replica groups of CPU-capped nodes, the
    /// proxy's overhead, and kill -9 of a query node under load.
    Replicas(tandem::bench::replicas::ReplicasBenchArgs),
    /// The same pymilvus workload on the real Milvus 2.3.5 and on tandem, side by side.
    Milvus(tandem::bench::milvus::MilvusBenchArgs),
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Cluster(a) => tandem::cli::cluster::run(a).await,
        Command::Gateway(a) => tandem::cli::gateway::run(a).await,
        Command::QueryNode(a) => tandem::cli::query_node::run(a).await,
        Command::Collection(c) => tandem::cli::collection::run(c).await,
        Command::Insert(a) => tandem::cli::insert::run(a).await,
        Command::Search(a) => tandem::cli::search::run(a).await,
        Command::Info(a) => tandem::cli::info::run(a).await,
        Command::Failover(a) => tandem::cli::failover::run(a).await,
        Command::Demo(a) => tandem::demo::run(a).await,
        // The bench sets up its own logging, if any.
        Command::Bench(BenchCmd::Search(a)) => tandem::bench::search::run(a).await,
        Command::Bench(BenchCmd::Replication(a)) => tandem::bench::replication::run(a).await,
        Command::Bench(BenchCmd::Gateway(a)) => tandem::bench::gateway::run(a).await,
        Command::Bench(BenchCmd::Failover(a)) => tandem::bench::failover::run(a).await,
        Command::Bench(BenchCmd::Campaign(a)) => tandem::bench::campaign::run(a).await,
        Command::Bench(BenchCmd::Replicas(a)) => tandem::bench::replicas::run(a).await,
        // Blocking: it waits for the Python driver, which starts and stops both servers.
        Command::Bench(BenchCmd::Milvus(a)) => tokio::task::spawn_blocking(move || tandem::bench::milvus::run(a)).await?,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    // After a timed-out drain, server tasks may still be running: don't wait on them for long.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<InvalidConfig>() {
            Some(invalid) => {
                eprintln!("error: {invalid}");
                ExitCode::from(EXIT_INVALID_CONFIG)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
