//! Automatic failover: drives one cluster node from its arbiter's view (docs/operations.md).
//!
//! ```text
//!            start (serves nothing: Recovering)
//!                 │
//!     ┌───────────┼──────────────────────────────────────────────────────────┐
//!     │ a leader exists                          │ nobody leads                  │
//!     ▼                                          ▼                               │
//!  follow it (re-point when it changes);      candidate: consume every stream  │
//!  a node that led an older epoch first       to its end, wait its rank (DC    │
//!  drops its data (rejoin); caught up ──►     preference, position), then one  │
//!  Alternative / Standby                      transaction: epoch E -> E+1      │
//!                                                │ won                           │
//!                                                ▼                               │
//!                                   promote: each stream continues after the     │
//!                                   position applied; publisher starts           │
//!                                                │                               │
//!                                   Leading ── lease renewals stop getting through,
//!                                              or another leader/epoch shows ──► fence ┘
//! ```
//!
//! Safety rests on three things. The arbiter's transaction makes one winner per epoch. A
//! candidate only campaigns once it has applied every stream to the end the broker holds, and
//! with ack policy `exported` every acknowledged write is in the broker, so the winner holds
//! every acknowledged write. A leader stops accepting writes `fence_margin_ms` before its lease
//! can have expired, measured from the send time of its last confirmed renewal, so it never
//! acknowledges a write once another cluster may lead; and every event carries the epoch, so
//! subscribers drop what a fenced leader still publishes after the new leader's first event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_arbiter::{Arbiter, Candidate, LeaseState, MemberStatus, Session, View};
use tandem_cluster::config::ArbiterKind;
use tandem_cluster::node::Switchover;
use tandem_cluster::{ClusterConfig, Node, Role};
use tandem_exporter::transport::{StreamId, Transport};
use tokio_util::sync::CancellationToken;

use crate::error::{NodeError, Result};
use crate::replication::{self, ReplicationHandle};

/// How often a member reports its role and position to the arbiter.
const REPORT_EVERY: Duration = Duration::from_millis(500);
/// How often a candidate checks whether it has consumed every stream to its end.
const CATCH_UP_POLL: Duration = Duration::from_millis(20);
/// How long each rank waits behind the one before it in an election.
const RANK_DELAY: Duration = Duration::from_millis(300);
/// After a failed step (arbiter or broker unreachable), the next try.
const RETRY: Duration = Duration::from_millis(200);

/// The arbiter a configuration names: etcd, or the process's embedded one.
pub fn arbiter(cfg: &ClusterConfig) -> Result<Arc<dyn Arbiter>> {
    let ha = &cfg.ha;
    let prefix = if ha.prefix.is_empty() { tandem_arbiter::default_prefix(&cfg.replication.group) } else { ha.prefix.clone() };
    match ha.arbiter {
        ArbiterKind::Etcd => {
            let endpoints = if ha.etcd.is_empty() { cfg.discovery.etcd.clone() } else { ha.etcd.clone() };
            Ok(Arc::new(tandem_arbiter::EtcdArbiter::new(endpoints, prefix)?))
        }
        ArbiterKind::Embedded => Ok(Arc::new(embedded())),
        ArbiterKind::None => Err(NodeError::InvalidConfig(vec!["ha.arbiter = \"none\" has no arbiter".into()])),
    }
}

/// The one embedded arbiter of this process: every cluster of an all-in-one process (the demo,
/// tests) joins the same one.
pub fn embedded() -> tandem_arbiter::EmbeddedArbiter {
    static ONE: std::sync::OnceLock<tandem_arbiter::EmbeddedArbiter> = std::sync::OnceLock::new();
    ONE.get_or_init(tandem_arbiter::EmbeddedArbiter::new).clone()
}

/// The role a node serves with until the controller has decided: nothing (the configured role
/// is only where it goes from there).
pub const STARTING_ROLE: Role = Role::Recovering;

/// A running controller; [`HaHandle::stop`] ends it.
pub struct HaHandle {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    session: Arc<dyn Session>,
}

impl HaHandle {
    /// Stops the controller. A leader fences itself and resigns first, so another cluster is
    /// promoted at once instead of after the lease; then the session's lease is revoked.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        self.session.close().await;
    }

    pub fn session(&self) -> &Arc<dyn Session> {
        &self.session
    }
}

/// Joins the arbiter as `endpoint` and starts driving `node` (which serves with
/// [`STARTING_ROLE`] until then). `cfg.role` is where the node goes: `leading` leads a group
/// that never had a leader; otherwise it follows, as an alternative or a standby.
pub async fn start(node: Arc<Node>, cfg: &ClusterConfig, endpoint: String, arbiter: Arc<dyn Arbiter>) -> Result<HaHandle> {
    let me = Candidate { cluster: cfg.cluster_id.clone(), datacenter: cfg.datacenter.clone(), endpoint: endpoint.clone() };
    let session = arbiter.join(me, Duration::from_secs(cfg.ha.lease_ttl_s)).await?;
    let transport = replication::transport(cfg)?;
    let cancel = CancellationToken::new();
    let (switch_tx, switch_rx) = tokio::sync::mpsc::channel(4);
    node.set_switchover_handler(Some(switch_tx));
    let c = Controller {
        node,
        cfg: cfg.clone(),
        endpoint,
        session: session.clone(),
        transport,
        repl: ReplicationHandle::default(),
        following: None,
        target: None,
        led_lease: None,
        cancel: cancel.clone(),
    };
    let task = tokio::spawn(c.run(switch_rx));
    Ok(HaHandle { cancel, task, session })
}

struct Controller {
    node: Arc<Node>,
    cfg: ClusterConfig,
    endpoint: String,
    session: Arc<dyn Session>,
    /// For the streams' ends (catching up); the follower and publisher have their own.
    transport: Arc<dyn Transport>,
    repl: ReplicationHandle,
    /// The leader endpoint the running follower follows.
    following: Option<String>,
    /// Recovering: the streams' ends to reach before serving.
    target: Option<Vec<(StreamId, u64)>>,
    /// The lease this leadership was won under: it ends with that lease, and a lease granted
    /// after it was lost never extends it.
    led_lease: Option<u64>,
    cancel: CancellationToken,
}

impl Controller {
    async fn run(mut self, mut switchovers: tokio::sync::mpsc::Receiver<Switchover>) {
        // Both counters exist from the start, at zero: a series that appears only at its first
        // increment is missing from every process that has not failed over since it started
        // (a dashboard shows "no data", and `increase()` misses the first one).
        for name in ["tandem_ha_promotions_total", "tandem_ha_fenced_total"] {
            metrics::counter!(name, "cluster" => self.cfg.cluster_id.clone()).increment(0);
        }
        let mut view = self.session.view();
        let mut lease = self.session.lease();
        let mut report = tokio::time::interval(REPORT_EVERY);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let v = view.borrow_and_update().clone();
            if let Err(e) = self.step(&v).await {
                tracing::warn!(error = %e, "failover controller step failed; retrying");
                tokio::select! {
                    () = self.cancel.cancelled() => break,
                    () = tokio::time::sleep(RETRY) => {}
                }
                continue;
            }
            let fence_at = self.fence_deadline(*lease.borrow_and_update());
            self.node.set_write_deadline(fence_at);
            tokio::select! {
                () = self.cancel.cancelled() => break,
                r = view.changed() => if r.is_err() { break },
                r = lease.changed() => if r.is_err() { break },
                () = sleep_until(fence_at) => self.fence("its lease may have run out"),
                _ = report.tick() => self.report().await,
                Some(cmd) = switchovers.recv() => {
                    let r = self.switchover(&cmd.to, cmd.deadline).await;
                    let _ = cmd.reply.send(r);
                }
            }
        }
        self.node.set_switchover_handler(None);
        // Shutting down: a leader hands the group over at once rather than after its lease.
        if self.node.role() == Role::Leading {
            self.fence("shutting down");
            if let Err(e) = self.session.resign(self.node.epoch()).await {
                tracing::warn!(error = %e, "could not resign: another cluster leads once the lease expires");
            }
        }
        self.repl.stop();
    }

    /// Manual switchover to `to`: stop taking writes, wait until the transport holds every
    /// change, step down (following from where the log ends, nothing reloaded), hand over, and
    /// wait until `to` leads. Nothing changes when `to` cannot be promoted; a drain that does
    /// not finish by `deadline` leaves this cluster leading.
    async fn switchover(&mut self, to: &str, deadline: Instant) -> tandem_cluster::Result<(String, String, u64)> {
        use tandem_cluster::ClusterError;
        let me = self.cfg.cluster_id.clone();
        if self.node.role() != Role::Leading {
            return Err(ClusterError::FailedPrecondition(format!("cluster {me} does not lead: send the switchover to the leader")));
        }
        if to == me {
            return Err(ClusterError::invalid(format!("cluster {me} already leads")));
        }
        let remote = |e: tandem_arbiter::ArbiterError| ClusterError::Unavailable(format!("arbiter: {e}"));
        // Members report every REPORT_EVERY, so the view can list a target that has just caught
        // up as still recovering: give it two more reports before refusing.
        let patience = (Instant::now() + 2 * REPORT_EVERY + Duration::from_millis(200)).min(deadline);
        loop {
            let members = self.session.members().await.map_err(remote)?;
            let Some(target) = members.iter().find(|m| m.cluster == to) else {
                let known: Vec<_> = members.iter().map(|m| m.cluster.as_str()).filter(|c| *c != me).collect();
                return Err(ClusterError::invalid(format!("no cluster {to:?} in this group (members: {})", known.join(", "))));
            };
            let caught_up = matches!(target.role, Role::Alternative | Role::Standby);
            if target.promotable && caught_up {
                break;
            }
            if !target.promotable || Instant::now() >= patience {
                return Err(ClusterError::FailedPrecondition(format!(
                    "cluster {to:?} is {} and {}promotable: only a caught-up alternative or standby can take over",
                    target.role,
                    if target.promotable { "" } else { "not " }
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let epoch = self.node.epoch();
        tracing::info!(cluster = %me, to, epoch, "switchover: draining");
        // No new writes (NotLeader: a gateway holds them); writes in flight finish exporting.
        self.node.set_role(Role::Recovering);
        if !self.node.wait_fully_exported(deadline).await {
            self.node.set_role(Role::Leading);
            return Err(ClusterError::Unavailable(format!(
                "switchover to {to:?} abandoned: the transport has not acknowledged every change yet; {me} still leads"
            )));
        }
        self.repl.stop();
        self.repl = ReplicationHandle::default();
        let node = self.node.clone();
        blocking(move || node.step_down()).await.map_err(|e| match e {
            NodeError::Cluster(e) => e,
            other => ClusterError::Internal(other.to_string()),
        })?;
        self.led_lease = None;
        self.session.hand_over(epoch, to).await.map_err(remote)?;
        let mut view = self.session.view();
        let wait = tokio::time::timeout_at(deadline.into(), view.wait_for(|v| v.leader.as_ref().is_some_and(|l| l.cluster == to)))
            .await
            .map(|r| r.map(|v| v.leader.clone()));
        let late = || {
            ClusterError::DeadlineExceeded(format!(
                "handed over to {to:?}, which has not taken leadership yet (the handover expires after a few seconds, then any caught-up cluster may)"
            ))
        };
        let l = match wait {
            Ok(Ok(Some(l))) => l,
            _ => return Err(late()),
        };
        // Won is not yet serving: answer once the new leader reports it leads (promoted,
        // publishing), so the caller's next write finds it.
        loop {
            let members = self.session.members().await.map_err(remote)?;
            if members.iter().any(|m| m.cluster == to && m.role == Role::Leading && m.epoch >= l.epoch) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(late());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(cluster = %me, to, epoch = l.epoch, "switchover done");
        Ok((l.cluster, l.endpoint, l.epoch))
    }

    /// When a leader must stop accepting writes: `fence_margin_ms` before the lease it won
    /// under could expire; now once the arbiter said that lease is lost, or the session holds
    /// another one (a controller that was not running, as in a paused process, may see the new
    /// lease without ever seeing the loss). `None` when not leading.
    fn fence_deadline(&self, lease: LeaseState) -> Option<Instant> {
        if self.node.role() != Role::Leading {
            return None;
        }
        Some(match lease {
            LeaseState::Valid { until, lease } if Some(lease) == self.led_lease => self.fence_time(until),
            LeaseState::Valid { .. } | LeaseState::Lost => Instant::now(),
        })
    }

    /// `fence_margin_ms` before a lease that holds `until`.
    fn fence_time(&self, until: Instant) -> Instant {
        until.checked_sub(Duration::from_millis(self.cfg.ha.fence_margin_ms)).unwrap_or_else(Instant::now)
    }

    fn fence(&mut self, why: &str) {
        if self.node.role() == Role::Leading {
            tracing::warn!(cluster = %self.cfg.cluster_id, epoch = self.node.epoch(), why, "fencing this leader");
            metrics::counter!("tandem_ha_fenced_total", "cluster" => self.cfg.cluster_id.clone()).increment(1);
        }
        self.node.fence();
        self.led_lease = None;
        self.repl.stop();
        self.repl = ReplicationHandle::default();
        self.following = None;
    }

    /// One decision from the arbiter's current view.
    async fn step(&mut self, v: &View) -> Result<()> {
        let node = self.node.clone();
        let epoch = v.epoch;
        blocking(move || node.observe_epoch(epoch)).await?;
        let me = self.cfg.cluster_id.clone();
        let role = self.node.role();
        match &v.leader {
            Some(l) if l.cluster == me && role == Role::Leading && l.epoch == self.node.epoch() => {
                // Steady state: leading, publishing.
                if self.repl.is_idle() {
                    self.repl = replication::start_publisher_with(&self.node, &self.cfg, self.transport.clone());
                }
                Ok(())
            }
            _ if role == Role::Leading => {
                // Another cluster or epoch leads, or nobody: this leadership is over.
                self.fence("the arbiter no longer names it leader");
                Ok(())
            }
            // The key names this cluster, but this process does not lead under it: a key from
            // before a restart, or this process fenced itself (its lease renewals were confirmed
            // too late) while its lease lives on. Nobody leads while the key stands, and a live
            // lease would keep it forever: remove it (only if it is still that key: the resign
            // transaction compares its revision), and the next view holds an election.
            Some(l) if l.cluster == me => {
                tracing::info!(cluster = %me, epoch = l.epoch, "the arbiter names this cluster leader, but it does not lead: resigning");
                self.session.resign(l.epoch).await?;
                Ok(())
            }
            Some(l) => self.follow(&l.endpoint, l.epoch).await,
            None => self.elect(v).await,
        }
    }

    /// Follows the leader at `endpoint` (of `epoch`); a node that led an older epoch drops its
    /// data first. Leaves `Recovering` once it has consumed every stream to its end.
    async fn follow(&mut self, endpoint: &str, epoch: u64) -> Result<()> {
        let led = self.node.led_epoch();
        if led > 0 && led < epoch {
            self.repl.stop();
            self.repl = ReplicationHandle::default();
            self.following = None;
            let keep = self.kept_shards(led).await;
            let node = self.node.clone();
            blocking(move || node.rejoin(&keep)).await?;
        }
        if self.following.as_deref() != Some(endpoint) {
            self.repl.stop();
            tracing::info!(cluster = %self.cfg.cluster_id, leader = endpoint, epoch, "following");
            self.repl = replication::start_follower_on(&self.node, &self.cfg, endpoint, Some(self.transport.clone()))?;
            self.following = Some(endpoint.to_string());
        }
        if self.node.role() == Role::Recovering {
            // Caught up = applied what the log held when we looked (under load the end moves on).
            let target = match self.target.take() {
                Some(t) => t,
                None => self.ends().await?,
            };
            if self.reached(&target) {
                let serve = if self.cfg.role == Role::Standby { Role::Standby } else { Role::Alternative };
                tracing::info!(cluster = %self.cfg.cluster_id, role = %serve, "caught up with the leader");
                self.node.set_role(serve);
            } else {
                self.target = Some(target);
            }
        }
        Ok(())
    }

    /// Shards an old leader (of epoch `led`) may keep on rejoining: those whose last record,
    /// written as leader, is in the stream exactly as written (its position, epoch and ts), at
    /// that position alone. Everything before it is then the stream's too. The others (a
    /// suffix that never reached the stream, whose positions the new leader has reused) are
    /// reloaded.
    ///
    /// Every shard is looked up at once: each lookup is a search of the broker's log, a few
    /// round trips, and the rejoin waits for all of them.
    async fn kept_shards(&self, led: u64) -> std::collections::HashSet<(u64, usize)> {
        use tandem_cluster::node::LedTail;
        let mut lookups = Vec::new();
        for c in self.node.collections() {
            for i in 0..c.shards().len() {
                let stream = StreamId::Shard { collection_id: c.id, shard: i as u32 };
                let (tail, id) = (self.node.led_tail(&c, i), c.id);
                let transport = &*self.transport;
                lookups.push(async move {
                    let held = match tail {
                        Ok(LedTail::Nothing) => true,
                        Ok(LedTail::Record { position, ts }) => stream_holds(transport, &stream, position, led, ts).await,
                        Ok(LedTail::Unknown) | Err(_) => false,
                    };
                    held.then_some((id, i))
                });
            }
        }
        futures::future::join_all(lookups).await.into_iter().flatten().collect()
    }

    /// The broker's end of every stream this node knows (asked all at once: each is a read).
    async fn ends(&self) -> Result<Vec<(StreamId, u64)>> {
        let mut streams = vec![StreamId::Ddl];
        for c in self.node.collections() {
            streams.extend((0..c.shards().len()).map(|i| StreamId::Shard { collection_id: c.id, shard: i as u32 }));
        }
        let ends = futures::future::try_join_all(streams.iter().map(|s| self.transport.end_lsn(s))).await?;
        Ok(streams.into_iter().zip(ends).collect())
    }

    /// Whether this node has applied every stream up to `ends`.
    fn reached(&self, ends: &[(StreamId, u64)]) -> bool {
        self.behind(ends) == 0
    }

    /// How many positions this node still has to apply to reach `ends` (a stream it does not
    /// know yet counts as its whole end).
    fn behind(&self, ends: &[(StreamId, u64)]) -> u64 {
        ends.iter()
            .map(|&(s, end)| {
                let applied = match s {
                    StreamId::Ddl => self.node.ddl_source_lsn(),
                    StreamId::Shard { collection_id, shard } => self
                        .node
                        .collection_by_id(collection_id)
                        .and_then(|c| c.shards().get(shard as usize).map(|sh| sh.source_lsn()))
                        .unwrap_or(0),
                };
                end.saturating_sub(applied)
            })
            .sum()
    }

    /// Nobody leads: campaign if this node may, once it holds every acknowledged write.
    async fn elect(&mut self, v: &View) -> Result<()> {
        if !self.cfg.ha.promotable {
            return Ok(());
        }
        if v.handover.as_ref().is_some_and(|h| *h != self.cfg.cluster_id) {
            return Ok(());
        }
        let led = self.node.led_epoch();
        if v.epoch < led || v.epoch + 1 < self.node.epoch() {
            // The arbiter's epoch went back (etcd lost its data?): granting it again could make
            // two leaders of one epoch. Never campaign on it; an operator must look.
            tracing::error!(cluster = %self.cfg.cluster_id, arbiter_epoch = v.epoch, seen = self.node.epoch(), "the arbiter's epoch is behind one this cluster has seen: not campaigning");
            return Ok(());
        }
        // This node led the newest epoch and nobody led since: its log is the streams' source
        // (it holds everything it acknowledged), so it may lead on without catching up.
        let resume = led > 0 && led == v.epoch;
        // A group that has never had a leader: the configured leader starts it.
        let first = v.epoch == 0 && self.cfg.role == Role::Leading;
        let role = self.node.role();
        if !resume && !first {
            if !role.can_be_promoted() || self.repl.follower().is_none() {
                // Recovering (not caught up since it rejoined), or never followed anyone: it
                // cannot know it holds every acknowledged write.
                return Ok(());
            }
            let started = Instant::now();
            if !self.catch_up().await? {
                return Ok(());
            }
            tracing::info!(cluster = %self.cfg.cluster_id, ms = started.elapsed().as_millis() as u64, "no leader: applied the log to its end, a candidate");
            // A switchover's target does not wait behind better-ranked candidates.
            let designated = v.handover.as_deref() == Some(self.cfg.cluster_id.as_str());
            let (rank, better) = if designated { (Duration::ZERO, Vec::new()) } else { self.rank().await? };
            if !rank.is_zero() && !self.still_leaderless(rank).await {
                return Ok(());
            }
            if !better.is_empty() && !self.better_ones_gone(&better).await? {
                return Ok(());
            }
        }
        // The lease the leader key will be put under (a later one cannot hold it).
        let LeaseState::Valid { lease, until } = *self.session.lease().borrow() else { return Ok(()) };
        // A lease whose renewals are late would fence a win at once; and since a fenced
        // leader gives its key up (see `step`), campaigning on it would only burn epochs, win
        // after win. Wait for a renewal instead (the lease's next update wakes the loop).
        if self.fence_time(until) <= Instant::now() {
            tracing::debug!(cluster = %self.cfg.cluster_id, "lease renewals are late: not campaigning");
            return Ok(());
        }
        let Some(won) = self.session.campaign(v.epoch).await? else { return Ok(()) };
        // Writes are bounded by that lease from the moment the node may lead, before the loop
        // next looks at the lease: a lease lost while promoting must not leave a window with
        // no deadline at all.
        self.node.set_write_deadline(Some(self.fence_time(until)));
        tracing::info!(cluster = %self.cfg.cluster_id, epoch = won.epoch, "won the election");
        // Failpoint: whatever the test's callback does here (expire this lease) happens between
        // winning and promoting.
        let _ = tandem_cluster::failpoint::fired("ha::won");
        let node = self.node.clone();
        let epoch = won.epoch;
        let led = if resume || first {
            blocking(move || node.resume_leading(epoch)).await
        } else {
            // Whatever the broker still delivers from the old leader until now is applied;
            // `promote` starts each stream's term after the last position applied.
            let floor = self.node.clock.peek();
            blocking(move || node.promote(epoch, floor)).await
        };
        if let Err(e) = led {
            // Give the epoch back so another candidate can take it.
            let _ = self.session.resign(epoch).await;
            return Err(e);
        }
        self.led_lease = Some(lease);
        // Failpoint: between the promotion (each stream's term begun, no replicated change
        // lands any more) and this leader's first event (the test publishes a fenced leader's
        // late export there).
        let _ = tandem_cluster::failpoint::fired("ha::promoted");
        self.repl.stop();
        self.following = None;
        self.repl = replication::start_publisher_with(&self.node, &self.cfg, self.transport.clone());
        metrics::counter!("tandem_ha_promotions_total", "cluster" => self.cfg.cluster_id.clone()).increment(1);
        self.report().await;
        Ok(())
    }

    /// Consumes every stream to the end the broker holds now (the follower does the work);
    /// false when a leader appeared meanwhile or `catch_up_timeout_ms` passed.
    async fn catch_up(&self) -> Result<bool> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.ha.catch_up_timeout_ms);
        let view = self.session.view();
        let mut rounds = 0u32;
        loop {
            let asked = Instant::now();
            let ends = self.ends().await?;
            let behind = self.behind(&ends);
            tracing::debug!(cluster = %self.cfg.cluster_id, rounds, behind, ends = ?ends, ends_ms = asked.elapsed().as_millis() as u64, "catching up with the log");
            rounds += 1;
            if behind == 0 && ends.len() == self.ends_count() {
                return Ok(true);
            }
            if view.borrow().leader.is_some() || Instant::now() >= deadline || self.cancel.is_cancelled() {
                tracing::info!(cluster = %self.cfg.cluster_id, "not caught up with the log: not a candidate this round");
                return Ok(false);
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }

    fn ends_count(&self) -> usize {
        1 + self.node.collections().iter().map(|c| c.shards().len()).sum::<usize>()
    }

    /// How long this candidate waits for better ones: by datacenter preference, then by how
    /// far each has applied the log (all will catch up; the most advanced one is quickest).
    /// Also the better-ranked members in a preferred datacenter (see [`Self::better_ones_gone`]).
    async fn rank(&self) -> Result<(Duration, Vec<String>)> {
        let prefs = &self.cfg.ha.prefer_datacenters;
        let pref = |dc: &str| prefs.iter().position(|p| p == dc).unwrap_or(prefs.len());
        let mut members: Vec<MemberStatus> = self
            .session
            .members()
            .await?
            .into_iter()
            .filter(|m| m.promotable && m.role.can_be_promoted() && m.cluster != self.cfg.cluster_id)
            .collect();
        members.push(self.status());
        members.sort_by(|a, b| {
            (pref(&a.datacenter), std::cmp::Reverse(a.position), &a.cluster).cmp(&(
                pref(&b.datacenter),
                std::cmp::Reverse(b.position),
                &b.cluster,
            ))
        });
        let rank = members.iter().position(|m| m.cluster == self.cfg.cluster_id).unwrap_or(0);
        let mine = pref(&self.cfg.datacenter);
        let preferred = members[..rank].iter().filter(|m| pref(&m.datacenter) < mine).map(|m| m.cluster.clone()).collect();
        Ok((RANK_DELAY * rank as u32, preferred))
    }

    /// A candidate outside the preferred datacenters does not take over from live candidates in
    /// one: the rank delay alone would let it win whenever their catch-up takes longer than
    /// the delay (a loaded machine, a longer log). It waits while any of `better` is still a
    /// member (its lease alive) and nobody leads, for at most `catch_up_timeout_ms`; true
    /// when it may campaign.
    async fn better_ones_gone(&self, better: &[String]) -> Result<bool> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.ha.catch_up_timeout_ms);
        loop {
            let v = self.session.view().borrow().clone();
            if v.leader.is_some() || v.handover.as_ref().is_some_and(|h| *h != self.cfg.cluster_id) || self.cancel.is_cancelled() {
                return Ok(false);
            }
            let members = self.session.members().await?;
            let alive = members.iter().any(|m| better.contains(&m.cluster) && m.promotable && m.role.can_be_promoted());
            if !alive || Instant::now() >= deadline {
                return Ok(true);
            }
            tokio::time::sleep(RANK_DELAY / 3).await;
        }
    }

    /// Waits `d`; false when a leader (or a handover to another cluster) appeared meanwhile.
    async fn still_leaderless(&self, d: Duration) -> bool {
        let mut view = self.session.view();
        let until = tokio::time::Instant::now() + d;
        loop {
            {
                let v = view.borrow_and_update();
                if v.leader.is_some() || v.handover.as_ref().is_some_and(|h| *h != self.cfg.cluster_id) {
                    return false;
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                r = view.changed() => if r.is_err() { return false },
                () = self.cancel.cancelled() => return false,
            }
        }
    }

    /// This member as the arbiter shows it to the others.
    fn status(&self) -> MemberStatus {
        let position = self.node.ddl_source_lsn()
            + self.node.collections().iter().flat_map(|c| c.shards().iter().map(|s| s.source_lsn()).collect::<Vec<_>>()).sum::<u64>();
        MemberStatus {
            cluster: self.cfg.cluster_id.clone(),
            datacenter: self.cfg.datacenter.clone(),
            endpoint: self.endpoint.clone(),
            role: self.node.role(),
            epoch: self.node.epoch(),
            position,
            promotable: self.cfg.ha.promotable,
        }
    }

    async fn report(&self) {
        let labels = [("cluster", self.cfg.cluster_id.clone())];
        metrics::gauge!("tandem_ha_epoch", &labels).set(self.node.epoch() as f64);
        if self.node.role() != Role::Leading {
            // How far behind the broker's end this follower is, in positions. Asking every
            // report also keeps the broker connections this controller needs in an election
            // warm: asked only then, after seconds idle, the first answer took ~1 s (measured).
            match self.ends().await {
                Ok(ends) => metrics::gauge!("tandem_ha_behind_positions", &labels).set(self.behind(&ends) as f64),
                Err(e) => tracing::debug!(error = %e, "the streams' ends are unknown"),
            }
        }
        if let Err(e) = self.session.report(self.status()).await {
            tracing::debug!(error = %e, "could not report to the arbiter");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs `f` (fsync, file rewrites) off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> tandem_cluster::Result<T> + Send + 'static) -> Result<T> {
    let r = tokio::task::spawn_blocking(f).await.map_err(|e| NodeError::Task { what: "failover controller", message: e.to_string() })?;
    Ok(r?)
}

/// Whether `stream` holds, at `position`, the change of epoch `epoch` and ts `ts`, and no
/// other change at that position (a newer leader that reused it).
async fn stream_holds(transport: &dyn Transport, stream: &StreamId, position: u64, epoch: u64, ts: u64) -> bool {
    use futures::StreamExt;
    // The record's ts lets a broker with a time index find it without searching the stream.
    let Ok(Ok(mut events)) = tokio::time::timeout(Duration::from_secs(5), transport.subscribe_at(stream, position, ts)).await else {
        return false;
    };
    let is_data = |ev: &tandem_proto::replication::v1::ChangeEvent| ev.body.is_some() && !tandem_exporter::transport::is_tick(ev);
    match tokio::time::timeout(Duration::from_secs(3), events.next()).await {
        Ok(Some(Ok(ev))) if ev.lsn == position && ev.epoch == epoch && ev.ts == ts && is_data(&ev) => {}
        _ => return false,
    }
    // What follows: this node's own ticks, then the next leader's first event, which tells
    // where that leader started. It had our record only if it started at or after it: its
    // `epoch_base`, or else a tick at our position or later, or a change past it. A newer
    // epoch's tick at an earlier position means our record landed late, after the next leader
    // caught up (seen in the docker fault campaign: a paused leader's export, sent on resume).
    // Bounded: an idle new leader ticks at its position for ever.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(until, events.next()).await {
            Ok(Some(Ok(ev))) if ev.epoch <= epoch => {}
            Ok(Some(Ok(ev))) => {
                return match ev.epoch_base {
                    Some(base) => base >= position,
                    None if is_data(&ev) => ev.lsn > position,
                    None => ev.lsn >= position,
                };
            }
            Ok(Some(Err(_))) => return false,
            Err(_) | Ok(None) => return true,
        }
    }
}

/// `stream_holds` against a real broker (tansu): what a rejoining old leader keeps.
#[cfg(all(test, feature = "kafka"))]
mod tests {
    use tandem_exporter::kafka::{KafkaConfig, KafkaTransport};
    use tandem_proto::replication::v1::{ChangeEvent, TimeTick, change_event::Body};
    use tandem_proto::storage::v1::RowBatch;

    use super::*;

    fn change(s: &StreamId, lsn: u64, epoch: u64, ts: u64) -> ChangeEvent {
        let StreamId::Shard { collection_id, shard } = *s else { unreachable!("shard streams only") };
        ChangeEvent {
            format_version: 1,
            group_id: "g".into(),
            epoch,
            ts,
            collection: "docs".into(),
            collection_id,
            shard,
            lsn,
            epoch_base: None,
            body: Some(Body::Insert(RowBatch { ids: vec![lsn as i64], vectors: vec![1.0, 2.0], ..Default::default() })),
        }
    }

    /// A tick repeats the position of the last change.
    fn tick(s: &StreamId, lsn: u64, epoch: u64, ts: u64) -> ChangeEvent {
        ChangeEvent { body: Some(Body::Tick(TimeTick { leader_ts: ts })), ..change(s, lsn, epoch, ts) }
    }

    #[tokio::test]
    async fn a_shard_is_kept_only_when_the_stream_holds_its_last_record_as_written() {
        let broker = tandem_harness::Tansu::start(false);
        let t = KafkaTransport::new(KafkaConfig { brokers: broker.brokers(), group: "g".into(), ..KafkaConfig::default() }).unwrap();
        let stream = |shard| StreamId::Shard { collection_id: 1, shard };
        let (ours, other_ts) = (300, 301);
        let mut streams = Vec::new();
        for (shard, after) in [
            // The old leader's last record (3, epoch 1) and its own tick, nothing after.
            (0, vec![tick(&stream(0), 3, 1, ours + 1)]),
            // The next leader ticks at that position, then writes its first change at 4.
            (1, vec![tick(&stream(1), 3, 2, 400), change(&stream(1), 4, 2, 401)]),
            // The next leader reused position 3: the old leader's record never reached it.
            (2, vec![change(&stream(2), 3, 2, 400)]),
            // The old leader's record landed late, after the next leader had reused the position
            // (subscribers of the new epoch drop it): lost all the same.
            (3, vec![change(&stream(3), 3, 2, 400)]),
            // The old leader's record landed late, after the next leader had caught up to 2 but
            // before its first event: a tick at 2 (a change at 3 would follow).
            (4, vec![tick(&stream(4), 2, 2, 400)]),
            // The same, as a leader that says where its epoch began.
            (5, vec![ChangeEvent { epoch_base: Some(2), ..tick(&stream(5), 3, 2, 400) }]),
            // An idle next leader that had the record: it began at 3.
            (6, vec![ChangeEvent { epoch_base: Some(3), ..tick(&stream(6), 3, 2, 400) }]),
        ] {
            let s = stream(shard);
            t.ensure_stream(&s, 7).await.unwrap();
            let mut events = vec![change(&s, 1, 1, 100), change(&s, 2, 1, 200)];
            // Stream 2 got the next leader's 3 instead of the old leader's.
            if shard != 2 {
                events.push(change(&s, 3, 1, ours));
            }
            events.extend(after);
            t.publish(&s, events).await.unwrap();
            streams.push(s);
        }
        assert!(stream_holds(&t, &streams[0], 3, 1, ours).await, "the record as written, then only its own tick");
        assert!(stream_holds(&t, &streams[1], 3, 1, ours).await, "the next leader went on after it");
        assert!(!stream_holds(&t, &streams[2], 3, 1, ours).await, "the position holds another leader's change");
        assert!(!stream_holds(&t, &streams[3], 3, 1, ours).await, "another leader's change follows at the same position");
        assert!(!stream_holds(&t, &streams[4], 3, 1, ours).await, "the next leader began before the record");
        assert!(!stream_holds(&t, &streams[5], 3, 1, ours).await, "the next leader says it began before the record");
        assert!(stream_holds(&t, &streams[6], 3, 1, ours).await, "the next leader says it began at the record");
        assert!(!stream_holds(&t, &streams[0], 3, 1, other_ts).await, "another ts at that position is another change");
        assert!(!stream_holds(&t, &streams[0], 3, 2, ours).await, "another epoch at that position is another change");
        assert!(!stream_holds(&t, &streams[0], 2, 1, ours).await, "the record at 2 is not the one written last");
    }
}

/// The global-cluster topology (pymilvus's global mode, see `tandem_milvus::topology`) as the
/// arbiter sees it: the cluster holding the leader key is the writable one, every member with a
/// readable role is readable, and the version is the leadership epoch.
pub struct ArbiterTopology {
    session: Arc<dyn Session>,
}

impl ArbiterTopology {
    pub fn new(session: Arc<dyn Session>) -> ArbiterTopology {
        ArbiterTopology { session }
    }
}

#[tonic::async_trait]
impl tandem_milvus::TopologySource for ArbiterTopology {
    async fn global_topology(&self) -> std::result::Result<tandem_milvus::GlobalTopology, String> {
        use tandem_milvus::GlobalCluster;
        let view = self.session.view().borrow().clone();
        let members = self.session.members().await.map_err(|e| format!("the arbiter cannot list members: {e}"))?;
        let leader = view.leader.as_ref();
        let mut clusters: Vec<GlobalCluster> = members
            .into_iter()
            .map(|m| {
                let writable = leader.is_some_and(|l| l.cluster == m.cluster);
                GlobalCluster { readable: writable || m.role.is_readable(), writable, id: m.cluster, endpoint: m.endpoint }
            })
            .collect();
        if let Some(l) = leader.filter(|l| !clusters.iter().any(|c| c.id == l.cluster)) {
            clusters.push(GlobalCluster { id: l.cluster.clone(), endpoint: l.endpoint.clone(), readable: true, writable: true });
        }
        clusters.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(tandem_milvus::GlobalTopology { version: view.epoch, clusters })
    }
}
