//! `tandem cluster`: runs a cluster node until SIGTERM or SIGINT, then shuts it down in this
//! order: stop taking writes, flush the exporter, deregister, drain gRPC, cancel index builds,
//! stop telemetry. Every part runs under one root token: a second signal or `--drain-timeout`
//! cancels it, and with it whatever is still running.

use std::path::PathBuf;

use anyhow::{Context, bail};

use tandem_cluster::server;

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
    // With an arbiter the node serves nothing until the controller has decided its role.
    let mut serving = cfg.clone();
    if cfg.ha.enabled() {
        serving.role = crate::ha::STARTING_ROLE;
    }
    let root = tokio_util::sync::CancellationToken::new();
    let running = server::start_with(serving, root.child_token()).await?;
    let metrics = super::MetricsEndpoint::start(&cfg.telemetry.metrics_listen, &format!("cluster {id}")).await?;
    let (replication, ha) = if cfg.ha.enabled() {
        let arbiter = crate::ha::arbiter(&cfg)?;
        let ha = crate::ha::start(running.node.clone(), &cfg, endpoint(&cfg, running.addr), arbiter).await?;
        (crate::replication::ReplicationHandle::default(), Some(ha))
    } else {
        (crate::replication::start(&running, &cfg).await?, None)
    };
    // Scripts and tests wait for this exact line to learn the address (port 0 picks one):
    // `spawn_listening` below.
    println!("tandem cluster {id} listening on {}", running.addr);
    let discovery = register_in_etcd(&cfg, running.addr, root.child_token()).await?;

    let signal = shutdown_signal().await?;
    tracing::info!(signal, "shutting down");
    // The flush may take at most half the drain time: an unreachable broker must not leave
    // nothing for the requests in flight.
    let flush_deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.drain_timeout) / 2;
    let orderly = async move {
        // 1. Stop taking writes. Under an arbiter a leader fences itself and resigns, so another
        // cluster is promoted at once; without one, new writes are refused (`Stopping`: a
        // gateway holds them) while writes in flight finish and export.
        if let Some(ha) = ha {
            ha.stop().await;
        } else {
            running.node.stop_writes();
        }
        // 2. Flush the exporter: what was written reaches the broker before the publisher stops.
        if !replication.flush_and_stop(&running.node, flush_deadline).await {
            tracing::warn!("stopping with changes the transport has not acknowledged (no write waiting for them was acknowledged)");
        }
        // 3. Deregister, so gateways stop routing here while requests drain.
        discovery.stop().await;
        // 4. Drain gRPC, 5. cancel index builds (their segments are indexed again at start).
        running.stop().await
    };
    let drained = super::drain(orderly, a.drain_timeout).await;
    // Whatever the drain left running stops now.
    root.cancel();
    // 6. Telemetry last: metrics stay scrapeable while the node drains.
    metrics.stop().await?;
    drained?;
    tracing::info!("stopped");
    Ok(())
}

/// The cluster's registration in etcd (`[discovery] etcd`), kept alive until [`Self::stop`].
struct Discovery(Option<(tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>)>);

impl Discovery {
    /// Revokes the registration: gateways watching etcd see this cluster leave at once.
    async fn stop(self) {
        if let Some((cancel, task)) = self.0 {
            cancel.cancel();
            let _ = tokio::time::timeout(tandem_discovery::etcd::CALL_TIMEOUT * 2, task).await;
        }
    }
}

/// Registers under `<prefix><cluster_id>` with the advertised endpoint (or http:// + the bound
/// address) when etcd endpoints are configured. etcd being down is not fatal: the registration
/// retries in the background.
async fn register_in_etcd(
    cfg: &tandem_cluster::ClusterConfig,
    bound: std::net::SocketAddr,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Discovery> {
    let d = &cfg.discovery;
    if d.etcd.is_empty() {
        return Ok(Discovery(None));
    }
    let endpoint = endpoint(cfg, bound);
    if bound.ip().is_unspecified() && cfg.advertise.is_empty() {
        tracing::warn!(endpoint, "registering an unspecified address: set `advertise` so gateways can reach this cluster");
    }
    let reg = tandem_discovery::Registration { id: cfg.cluster_id.clone(), datacenter: cfg.datacenter.clone(), endpoint };
    let task = match tandem_discovery::etcd::register(d.etcd.clone(), d.prefix.clone(), d.ttl_s, reg, cancel.clone()).await {
        Ok(t) => t,
        // A bad endpoint is a configuration mistake (exit 64), not an outage.
        Err(e) if !e.is_transient() => return Err(crate::config::InvalidConfig { problems: vec![e.to_string()] }.into()),
        Err(e) => return Err(e.into()),
    };
    Ok(Discovery(Some((cancel, task))))
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

/// How others reach this cluster: `advertise`, or http:// + the bound address.
fn endpoint(cfg: &tandem_cluster::ClusterConfig, bound: std::net::SocketAddr) -> String {
    if cfg.advertise.is_empty() { format!("http://{bound}") } else { cfg.advertise.clone() }
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
