//! One running cluster member, assembled in one place: the engine served over gRPC, its part
//! in replication (publisher or follower on the configured transport), the arbiter and the
//! failover controller, the discovery registration and the metrics endpoint.
//!
//! `tandem cluster`, the demo, every bench and the test sandbox start members through
//! [`Member::start_with`], so a change to how a member starts or stops is made here once.
//!
//! ```text
//! start:  validate ─► open data, serve gRPC (Recovering under an arbiter: nothing served until
//!         the controller decides) ─► metrics ─► replication, or join the arbiter and start the
//!         controller ─► register in etcd
//! stop:   0 stop placing segments on query nodes ─► 1 stop taking writes (under an arbiter:
//!         fence and resign) ─► 2 flush the exporter (at most half the drain time) ─► 3 deregister
//!         ─► 4 drain gRPC ─► 5 cancel index builds ─► 6 stop metrics.  Past the drain time the
//!         root token cancels what is left.
//! ```
#![forbid(unsafe_code)]

pub mod error;
pub mod ha;
mod registration;
pub mod replication;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_arbiter::{Arbiter, Session};
use tandem_cluster::placement::{FileState, Placement, StateStore};
use tandem_cluster::server::{self, Running};
use tandem_cluster::{ClusterConfig, Node};
use tandem_exporter::follower::Follower;
use tandem_telemetry::metrics::MetricsServer;
use tokio_util::sync::CancellationToken;

pub use error::{NodeError, Result};
use registration::Registration;
use replication::ReplicationHandle;

/// How a member is started, beyond its configuration.
#[derive(Clone, Default)]
pub struct MemberOptions {
    /// The arbiter to join instead of the one `ha.arbiter` names: an in-process sandbox gives
    /// each group its own embedded arbiter (the configured `embedded` one is the process's).
    pub arbiter: Option<Arc<dyn Arbiter>>,
    /// The root of every task the member starts; cancelling it stops them all at once. A new
    /// token when not given.
    pub root: Option<CancellationToken>,
    /// Serve /metrics on `telemetry.metrics_listen`. The recorder is the process's, so only a
    /// process that runs one member (`tandem cluster`) serves it.
    pub metrics: bool,
}

/// A running member; [`Member::stop`] ends it in the stated order.
pub struct Member {
    cfg: ClusterConfig,
    running: Running,
    replication: ReplicationHandle,
    ha: Option<ha::HaHandle>,
    registration: Registration,
    metrics: Option<(CancellationToken, MetricsServer)>,
    /// The proxy's placement of sealed segments on query nodes (`query_nodes.groups`), and its
    /// loop's stop and task.
    placement: Option<(Arc<Placement>, CancellationToken, tokio::task::JoinHandle<()>)>,
    root: CancellationToken,
}

impl Member {
    /// [`Member::start_with`] with the default options.
    pub async fn start(cfg: ClusterConfig) -> Result<Member> {
        Member::start_with(cfg, MemberOptions::default()).await
    }

    /// Validates `cfg`, then starts every part. A part that fails stops the ones already
    /// started, and nothing is left running.
    pub async fn start_with(cfg: ClusterConfig, opts: MemberOptions) -> Result<Member> {
        cfg.validate().map_err(NodeError::InvalidConfig)?;
        let root = opts.root.unwrap_or_default();
        // With an arbiter the node serves nothing until the controller has decided its role.
        let mut serving = cfg.clone();
        if cfg.ha.enabled() {
            serving.role = ha::STARTING_ROLE;
        }
        let running = server::start_with(serving, root.child_token()).await?;
        let mut member = Member {
            cfg,
            running,
            replication: ReplicationHandle::default(),
            ha: None,
            registration: Registration::none(),
            metrics: None,
            placement: None,
            root,
        };
        match member.start_parts(opts.arbiter, opts.metrics).await {
            Ok(()) => Ok(member),
            Err(e) => {
                let _ = member.stop(Duration::from_secs(5)).await;
                Err(e)
            }
        }
    }

    async fn start_parts(&mut self, arbiter: Option<Arc<dyn Arbiter>>, metrics: bool) -> Result<()> {
        let cfg = &self.cfg;
        if metrics && !cfg.telemetry.metrics_listen.is_empty() {
            let stop = self.root.child_token();
            let m = tandem_telemetry::metrics::serve(&cfg.telemetry.metrics_listen, stop.clone()).await?;
            self.metrics = Some((stop, m));
        }
        if cfg.ha.enabled() {
            let arbiter = match arbiter {
                Some(a) => a,
                None => ha::arbiter(cfg)?,
            };
            let ha = ha::start(self.running.node.clone(), cfg, self.endpoint(), arbiter).await?;
            // pymilvus's global topology, from here on the arbiter's: who leads, who is readable.
            self.running.topology.set(Arc::new(ha::ArbiterTopology::new(ha.session().clone())));
            self.ha = Some(ha);
        } else {
            self.replication = replication::start(&self.running, cfg).await?;
        }
        if !cfg.query_nodes.groups.is_empty() {
            // Searches go through the proxy from here on; the loop places sealed segments.
            let placement = Placement::new(self.endpoint(), &cfg.query_nodes)?;
            // Coordinator state: the arbiter's store under an arbiter, else the data directory.
            let store: Arc<dyn StateStore> = match &self.ha {
                Some(ha) => Arc::new(state::ArbiterState { session: ha.session().clone(), name: "placement" }),
                None => Arc::new(FileState(cfg.data_dir.join("placement"))),
            };
            let what = store.describe();
            match placement.restore(store).await {
                Ok(copies) => tracing::info!(from = %what, copies, "placement of segment copies restored"),
                // A cache: the loop places every segment again.
                Err(e) => tracing::warn!(from = %what, error = %e, "placement of segment copies not restored; placing anew"),
            }
            self.running.node.set_fanout(placement.clone());
            let stop = self.root.child_token();
            let task = tokio::spawn(placement.clone().run(Arc::downgrade(&self.running.node), stop.clone()));
            self.placement = Some((placement, stop, task));
        }
        self.registration = registration::register(cfg, self.running.addr, &self.endpoint(), self.root.child_token()).await?;
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.cfg.cluster_id
    }

    /// The bound gRPC address (the real port when `listen` asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    /// How others reach this member: `advertise`, or http:// + the bound address.
    pub fn endpoint(&self) -> String {
        if self.cfg.advertise.is_empty() { format!("http://{}", self.running.addr) } else { self.cfg.advertise.clone() }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.running.node
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// The /metrics address, when this member serves it.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, m)| m.addr)
    }

    /// The follower, while this member follows a leader without an arbiter.
    pub fn follower(&self) -> Option<&Arc<Follower>> {
        self.replication.follower()
    }

    /// The arbiter session, under an arbiter.
    pub fn session(&self) -> Option<&Arc<dyn Session>> {
        self.ha.as_ref().map(ha::HaHandle::session)
    }

    /// Where sealed segments have copies on query nodes, when the member has any.
    pub fn placement(&self) -> Option<&Arc<Placement>> {
        self.placement.as_ref().map(|(p, _, _)| p)
    }

    /// The root token: cancelling it stops every part at once (a second signal does).
    pub fn root(&self) -> CancellationToken {
        self.root.clone()
    }

    /// Stops in the stated order (module docs), within `drain`: the exporter flush may take
    /// half of it, so an unreachable broker leaves time for the requests in flight. Past
    /// `drain` the root token cancels what is still running and [`NodeError::DrainTimeout`]
    /// says so; the metrics endpoint stops last either way.
    pub async fn stop(self, drain: Duration) -> Result<()> {
        let Member { cfg, running, replication, ha, registration, metrics, placement, root } = self;
        let flush_deadline = std::time::Instant::now() + drain / 2;
        let orderly = async move {
            // 0. No more segment placement (the loop holds the node while a round runs).
            if let Some((_, stop, task)) = placement {
                stop.cancel();
                let _ = task.await;
            }
            // 1. Stop taking writes. Under an arbiter a leader fences itself and resigns, so
            // another cluster is promoted at once; without one, new writes are refused
            // (`Stopping`: a gateway holds them) while writes in flight finish and export.
            match ha {
                Some(ha) => ha.stop().await,
                None => running.node.stop_writes(),
            }
            // 2. Flush the exporter: what was written reaches the broker before the publisher
            // stops.
            if !replication.flush_and_stop(&running.node, flush_deadline).await {
                tracing::warn!(cluster = %cfg.cluster_id, "stopping with changes the transport has not acknowledged (no write waiting for them was acknowledged)");
            }
            // 3. Deregister, so gateways stop routing here while requests drain.
            registration.stop().await;
            // 4. Drain gRPC, 5. cancel index builds (their segments are indexed again at start).
            running.stop().await
        };
        let drained = match tokio::time::timeout(drain, orderly).await {
            Ok(r) => r.map_err(NodeError::from),
            Err(_) => Err(NodeError::DrainTimeout { secs: drain.as_secs() }),
        };
        // Whatever the drain left running stops now.
        root.cancel();
        // 6. Metrics last: they stay scrapeable while the member drains.
        if let Some((stop, m)) = metrics {
            stop.cancel();
            match m.task.await {
                Ok(r) => r?,
                Err(e) => return Err(NodeError::Task { what: "metrics server", message: e.to_string() }),
            }
        }
        drained
    }
}
