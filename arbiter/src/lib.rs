//! The arbiter decides which cluster leads. Every cluster joins with a [`Session`]: a lease it
//! keeps alive, a member key reporting how caught up it is, and a live [`View`] of who leads at
//! which epoch. Leadership is one key, `leader`, written only by a transaction that checks the
//! epoch it replaces, and held under the leader's lease: a leader that dies, pauses or is cut
//! off loses it when the lease runs out, and fences itself before then (see [`LeaseState`]).
//!
//! ```text
//!  <prefix> = /tandem/<group>/ha/
//!    epoch             "7"              no lease: the highest epoch ever granted outlives everyone
//!    leader            {cluster,epoch,…} under the leader's lease
//!    handover          "c2"             under a short lease of its own (switchover target)
//!    members/<cluster> MemberStatus     under each member's lease
//!
//!  member ── join(me, ttl) ── grant lease ── renew every ttl/3 ──► lease(): Valid{until} … Lost
//!     │                           ▲ Lost: grant a new lease, put members/<me> again
//!     │                           │       (never the leader key: leadership lost stays lost)
//!     ├─ report(status) ── put members/<me> under the lease
//!     ├─ view() ◄── get <prefix> at revision R, then watch <prefix> from R+1 (no gap)
//!     │
//!     └─ campaign(E) ── txn: epoch == E ∧ no leader ∧ (no handover ∨ handover == me)
//!                        ├ then: epoch := E+1, leader := {me, E+1} (my lease), delete handover
//!                        └ else: nothing  (someone else won, or the view was stale)
//!
//!  leader ── resign(E): delete leader if it is mine at E (clean shutdown)
//!         ── hand_over(E, to): handover := to (short lease), delete leader, in one txn
//!         ── dies: its lease expires, `leader` disappears, every view sees None
//! ```
//!
//! Two backends with the same semantics: [`EtcdArbiter`] for real deployments, and
//! [`EmbeddedArbiter`] (in-process state, leases on tokio time) for the all-in-one mode where
//! several clusters share one process. What the arbiter does *not* decide: which member should
//! campaign (the most caught-up promotable one, by [`MemberStatus::position`]) is the
//! controller's choice; the transaction only guarantees that at most one wins each epoch.
//!
//! A controller's use, in short (the embedded backend here; `EtcdArbiter::new(endpoints,
//! default_prefix(group))?` in a deployment):
//!
//! ```
//! # use std::time::{Duration, Instant};
//! # use tandem_arbiter::*;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let arbiter = EmbeddedArbiter::new();
//! let me = Candidate { cluster: "c1".into(), datacenter: "dc1".into(), endpoint: "http://10.0.0.7:19530".into() };
//! let session = arbiter.join(me, Duration::from_secs(2)).await?;
//! session.report(MemberStatus { cluster: "c1".into(), datacenter: "dc1".into(), endpoint: "http://10.0.0.7:19530".into(),
//!     role: Role::Alternative, epoch: 0, position: 42, promotable: true }).await?;
//! let view = session.view().borrow().clone();
//! // Nobody leads, no switchover names someone else, and (the controller's call) I am the most
//! // caught-up promotable member of members(): campaign at the epoch the view shows.
//! if view.leader.is_none() && view.handover.as_ref().is_none_or(|h| h == "c1") {
//!     let won = session.campaign(view.epoch).await?.expect("alone, so I win");
//!     assert_eq!(won.epoch, 1);
//! }
//! // Take writes only while the lease certainly holds (fencing); watch `lease()` for changes.
//! assert!(session.lease().borrow().holds_at(Instant::now()));
//! session.resign(1).await?;
//! session.close().await;
//! # Ok::<(), ArbiterError>(()) }).unwrap();
//! ```
//!
//! Lease TTLs are whole seconds (etcd's unit): a [`Duration`] is rounded up, minimum 1 s.
//! etcd also raises any TTL below its own minimum, 1.5 × its election timeout (the default
//! 1000 ms election timeout gives 2 s); the test etcd runs with `--election-timeout 500` so that
//! 1 s holds.

pub mod embedded;
pub mod etcd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tandem_discovery::DiscoveryError;

pub use embedded::EmbeddedArbiter;
pub use etcd::EtcdArbiter;
/// A member's role as it reports it: the one role type of cluster, gateway and SDK.
pub use tandem_proto::Role;

/// How long a switchover's `handover` key lives unless the target wins first: long enough for
/// the target to see the leader key go and campaign, short enough that a dead target does not
/// block elections for long.
pub const HANDOVER_TTL: Duration = Duration::from_secs(5);

/// The key prefix for a group of clusters: `/tandem/<group>/ha/`.
pub fn default_prefix(group: &str) -> String {
    format!("/tandem/{group}/ha/")
}

/// Who a member is (what it joins with).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub cluster: String,
    #[serde(default)]
    pub datacenter: String,
    /// gRPC endpoint, e.g. "http://10.0.0.7:19530".
    pub endpoint: String,
}

/// The `leader` key: who leads, at which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leadership {
    pub cluster: String,
    pub epoch: u64,
    pub endpoint: String,
    #[serde(default)]
    pub datacenter: String,
}

/// A `members/<cluster>` key: what a member last reported about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub cluster: String,
    #[serde(default)]
    pub datacenter: String,
    pub endpoint: String,
    /// Stored as "leading" | "alternative" | "standby" | "recovering" (the words of the untyped
    /// versions); a report with a word this build does not know is skipped and logged with its key.
    pub role: Role,
    /// The highest epoch this member has seen.
    pub epoch: u64,
    /// How far it has applied the log (bigger = more caught up).
    pub position: u64,
    pub promotable: bool,
}

/// What the arbiter says now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub leader: Option<Leadership>,
    /// The highest epoch ever granted; 0 = never.
    pub epoch: u64,
    /// The cluster a switchover designated, while its handover key lives: only it can win.
    pub handover: Option<String>,
}

/// The state of a session's lease, as far as this member can know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The lease cannot expire before `until` (send time of the last confirmed renewal + ttl).
    /// `until` in the past means renewals are not getting through: a leader must stop taking
    /// writes by then, whether or not the arbiter has said anything.
    ///
    /// `lease` tells leases apart: one granted after a loss has another id. Leadership is held
    /// under the lease it was won with and ends with it, so a controller must not let a new
    /// lease extend a leadership (a watcher may never see the `Lost` in between).
    Valid { until: Instant, lease: u64 },
    /// The arbiter said the lease is gone (with the leader key, if it was held). The session
    /// grants a new lease and puts its member key again; leadership is not restored.
    Lost,
}

impl LeaseState {
    /// True while the lease is certainly alive at `now`.
    pub fn holds_at(&self, now: Instant) -> bool {
        match self {
            LeaseState::Valid { until, .. } => now < *until,
            LeaseState::Lost => false,
        }
    }
}

#[async_trait]
pub trait Arbiter: Send + Sync + 'static {
    /// Starts this member's session: grants a lease of `ttl` (rounded up to whole seconds, at
    /// least 1 s), keeps it alive in a task, keeps `view()` current. Fails when the arbiter is
    /// unreachable (transient) or `me` is not a valid member (not transient). Cancel-safe (a
    /// lease granted by a cancelled join expires with its ttl).
    async fn join(&self, me: Candidate, ttl: Duration) -> Result<Arc<dyn Session>>;
}

#[async_trait]
pub trait Session: Send + Sync {
    /// Who leads now; changes are seen within milliseconds (a leader's lease expiring included).
    fn view(&self) -> tokio::sync::watch::Receiver<View>;

    /// `Valid{until}`: the lease cannot expire before `until`. `Lost` once the arbiter said the
    /// lease is gone; the session then grants a new lease and re-puts its member key (never the
    /// leader key: leadership lost is lost).
    fn lease(&self) -> tokio::sync::watch::Receiver<LeaseState>;

    /// Puts `members/<cluster>` = `status` under the lease (and again under each new lease).
    /// `status.cluster` must be this member's. Cancel-safe.
    async fn report(&self, status: MemberStatus) -> Result<()>;

    /// Every member's last report (members whose lease lives).
    async fn members(&self) -> Result<Vec<MemberStatus>>;

    /// One transaction: if the stored epoch == `expected_epoch` AND no leader key exists AND
    /// (no handover key or it names me) then epoch := expected+1, leader := {me, expected+1}
    /// under my lease, handover deleted. `Ok(Some(_))` when won, `Ok(None)` when the condition
    /// failed (someone else won, or the view was stale). Cancel-safe in the sense that a
    /// cancelled campaign may have won: the view shows it.
    async fn campaign(&self, expected_epoch: u64) -> Result<Option<Leadership>>;

    /// Deletes the leader key if it is mine at `epoch` (nothing to do otherwise). Used on clean
    /// shutdown so that a successor need not wait for the lease to expire.
    async fn resign(&self, epoch: u64) -> Result<()>;

    /// Switchover, in one transaction: if the leader key is mine at `epoch`, put `handover` =
    /// `to` (under a lease of [`HANDOVER_TTL`], so a dead target does not block elections
    /// forever) and delete the leader key. [`ArbiterError::NotLeader`] when the key is not mine
    /// at `epoch`.
    async fn hand_over(&self, epoch: u64, to: &str) -> Result<()>;

    /// Puts this member's coordinator state `name` (`state/<cluster>/<name>`): not under the
    /// lease, so it outlives the session and a restarted member reads it back. Used for a
    /// proxy's placement of segment copies on its query nodes. Cancel-safe.
    async fn put_state(&self, name: &str, value: Vec<u8>) -> Result<()>;

    /// This member's coordinator state `name`, if it was ever put.
    async fn get_state(&self, name: &str) -> Result<Option<Vec<u8>>>;

    /// Revokes the lease: the member key and, if held, the leader key disappear at once. The
    /// session stops (later calls fail with [`ArbiterError::Closed`]). With etcd unreachable the
    /// revoke gives up after a few seconds and the keys expire with the lease. Dropping the
    /// session does the same in the background.
    async fn close(&self);
}

#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    #[error("arbiter etcd at {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },
    /// The session's lease is gone; the session is granting a new one.
    #[error("arbiter lease lost: {message}")]
    LeaseLost { message: String },
    #[error("invalid arbiter configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid arbiter argument: {0}")]
    InvalidArgument(String),
    /// A value in the arbiter's keys that this version cannot read.
    #[error("bad value under {key}: {message}")]
    BadValue { key: String, message: String },
    /// A leader-only operation by a member that does not hold the leader key at that epoch.
    #[error("{cluster} does not lead at epoch {epoch}")]
    NotLeader { cluster: String, epoch: u64 },
    #[error("arbiter session closed")]
    Closed,
}

impl ArbiterError {
    /// Worth retrying (the arbiter may come back, the lease is being replaced), as opposed to a
    /// mistake that retrying repeats.
    pub fn is_transient(&self) -> bool {
        match self {
            ArbiterError::Etcd { .. } | ArbiterError::LeaseLost { .. } => true,
            ArbiterError::InvalidConfig(_)
            | ArbiterError::InvalidArgument(_)
            | ArbiterError::BadValue { .. }
            | ArbiterError::NotLeader { .. }
            | ArbiterError::Closed => false,
        }
    }
}

impl From<DiscoveryError> for ArbiterError {
    fn from(e: DiscoveryError) -> ArbiterError {
        match e {
            DiscoveryError::Etcd { endpoints, message } => ArbiterError::Etcd { endpoints, message },
            DiscoveryError::LeaseLost { message } => ArbiterError::LeaseLost { message },
            DiscoveryError::InvalidConfig(m) => ArbiterError::InvalidConfig(m),
            DiscoveryError::BadRegistration { key, message } => ArbiterError::BadValue { key, message },
        }
    }
}

pub type Result<T> = std::result::Result<T, ArbiterError>;

/// A lease ttl in etcd's unit: whole seconds, rounded up, at least 1.
pub fn lease_seconds(ttl: Duration) -> i64 {
    let s = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    s.clamp(1, i64::MAX as u64) as i64
}

/// A member name must be usable as the last segment of an etcd key.
fn check_candidate(me: &Candidate) -> Result<()> {
    check_cluster(&me.cluster)?;
    if me.endpoint.is_empty() {
        return Err(ArbiterError::InvalidArgument(format!("cluster {:?} has an empty endpoint", me.cluster)));
    }
    Ok(())
}

fn check_cluster(cluster: &str) -> Result<()> {
    if cluster.is_empty() || cluster.contains('/') {
        return Err(ArbiterError::InvalidArgument(format!("cluster id {cluster:?} cannot be an arbiter key suffix")));
    }
    Ok(())
}

/// A state name is one key segment of letters, digits, `-` and `_`.
fn check_state_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ArbiterError::InvalidArgument(format!("state name {name:?}: use letters, digits, - and _")));
    }
    Ok(())
}

fn check_report(me: &Candidate, status: &MemberStatus) -> Result<()> {
    if status.cluster != me.cluster {
        return Err(ArbiterError::InvalidArgument(format!("session of {:?} cannot report for cluster {:?}", me.cluster, status.cluster)));
    }
    Ok(())
}

fn check_hand_over(me: &Candidate, to: &str) -> Result<()> {
    check_cluster(to)?;
    if to == me.cluster {
        return Err(ArbiterError::InvalidArgument(format!("{to:?} cannot hand leadership over to itself")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_seconds_round_up_with_a_floor_of_one() {
        assert_eq!(lease_seconds(Duration::ZERO), 1);
        assert_eq!(lease_seconds(Duration::from_millis(300)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(1)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(lease_seconds(Duration::from_secs(5)), 5);
    }

    #[test]
    fn errors_say_whether_retrying_helps() {
        let e: ArbiterError = DiscoveryError::Etcd { endpoints: "x".into(), message: "down".into() }.into();
        assert!(e.is_transient());
        let e: ArbiterError = DiscoveryError::InvalidConfig("no endpoints".into()).into();
        assert!(!e.is_transient());
        assert!(e.to_string().contains("no endpoints"), "{e}");
        assert!(!ArbiterError::NotLeader { cluster: "a".into(), epoch: 3 }.is_transient());
    }

    #[test]
    fn reports_and_names_are_checked() {
        let me = Candidate { cluster: "a".into(), datacenter: "dc1".into(), endpoint: "http://h:1".into() };
        assert!(check_candidate(&me).is_ok());
        assert!(check_candidate(&Candidate { cluster: "a/b".into(), ..me.clone() }).is_err());
        assert!(check_candidate(&Candidate { endpoint: String::new(), ..me.clone() }).is_err());
        let mut s = MemberStatus {
            cluster: "a".into(),
            datacenter: "dc1".into(),
            endpoint: "http://h:1".into(),
            role: Role::Alternative,
            epoch: 0,
            position: 0,
            promotable: true,
        };
        assert!(check_report(&me, &s).is_ok());
        // Stored as the same words as before the role was typed, so members of both versions
        // read each other's reports; an unknown word is refused, naming it.
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""role":"alternative""#), "{json}");
        let e = serde_json::from_str::<MemberStatus>(&json.replace("alternative", "boss")).unwrap_err();
        assert!(e.to_string().contains("boss"), "{e}");
        s.role = Role::Leading;
        s.cluster = "b".into();
        assert!(check_report(&me, &s).is_err());
        assert!(check_hand_over(&me, "a").is_err());
        assert!(check_hand_over(&me, "b").is_ok());
    }
}
