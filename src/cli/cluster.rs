//! `tandem cluster`: runs one member (`tandem_node::Member`) until SIGTERM or SIGINT, then stops
//! it in the member's order: stop taking writes, flush the exporter, deregister, drain gRPC,
//! cancel index builds, stop metrics. Every part runs under one root token: a second signal or
//! `--drain-timeout` cancels it, and with it whatever is still running.

use std::path::PathBuf;

use anyhow::{Context, bail};

use tandem_node::{Member, MemberOptions, NodeError};

use super::LogFormat;
use crate::config::{ConfigOverrides, load_cluster_config_with};

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// TOML configuration file (see docs/tandem.example.toml); built-in defaults without one.
    /// TANDEM__SECTION__KEY environment variables override it.
    #[arg(long, short, value_name = "FILE", env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address, overriding the configuration (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Data directory, overriding the configuration.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// This cluster's id, overriding the configuration.
    #[arg(long, value_name = "ID")]
    pub cluster_id: Option<String>,
    /// Follow the leader at URL as an alternative (sets role = alternative and
    /// replication.leader).
    #[arg(long, value_name = "URL")]
    pub follow: Option<String>,
    /// The cluster's role, overriding the configuration.
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,
    /// Log line format (logs go to stderr; RUST_LOG sets the filter, default info).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// On shutdown, how long to wait for requests in flight before exiting anyway.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub drain_timeout: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    Leading,
    Alternative,
    Standby,
}

pub async fn run(a: ClusterArgs) -> anyhow::Result<()> {
    let role = a.role.map(|r| match r {
        RoleArg::Leading => tandem_cluster::Role::Leading,
        RoleArg::Alternative => tandem_cluster::Role::Alternative,
        RoleArg::Standby => tandem_cluster::Role::Standby,
    });
    let overrides = ConfigOverrides {
        listen: a.listen.clone(),
        data_dir: a.data_dir.clone(),
        cluster_id: a.cluster_id.clone(),
        role,
        follow: a.follow.clone(),
    };
    let cfg = load_cluster_config_with(a.config.as_deref(), std::env::vars(), &overrides)?;
    // Held until the end of `run`: dropping it flushes the spans still buffered.
    let _traces = tandem_telemetry::tracing::init("info", a.log_format.into(), &cfg.telemetry.otlp_endpoint, "tandem-cluster")?;
    let id = cfg.cluster_id.clone();
    // A configuration mistake found while starting exits 64, like one found while loading.
    let member =
        Member::start_with(cfg, MemberOptions { metrics: true, ..Default::default() }).await.map_err(crate::config::member_error)?;
    if let Some(addr) = member.metrics_addr() {
        println!("tandem cluster {id} metrics on http://{addr}/metrics");
    }
    // Scripts and tests wait for this exact line to learn the address (port 0 picks one):
    // `spawn_listening` below.
    println!("tandem cluster {id} listening on {}", member.addr());

    let signal = shutdown_signal().await?;
    tracing::info!(signal, "shutting down");
    let root = member.root();
    let drain = std::time::Duration::from_secs(a.drain_timeout);
    tokio::select! {
        r = member.stop(drain) => match r {
            Err(NodeError::DrainTimeout { .. }) => bail!("shutdown did not finish within --drain-timeout {}s; exiting anyway", a.drain_timeout),
            r => r?,
        },
        s = shutdown_signal() => {
            root.cancel();
            bail!("{} during shutdown; exiting without waiting for requests in flight", s?)
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Starts `cmd`, a `tandem cluster` command, with its stdout piped, and waits (up to 60 s) for
/// the address it prints ("... listening on ADDR": with port 0 that is how one learns it). On
/// a timeout the process is killed.
pub fn spawn_listening(cmd: &mut std::process::Command) -> anyhow::Result<(std::process::Child, std::net::SocketAddr)> {
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if let Some(addr) = line.split(" listening on ").nth(1) {
                let _ = tx.send(addr.trim().parse::<std::net::SocketAddr>());
            }
        }
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(addr) => Ok((child, addr.context("the address tandem cluster printed")?)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("printed no address within 60 s")
        }
    }
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM and returns its name.
pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("Ctrl-C")
    }
}
