//! The in-process arbiter, for the all-in-one mode (several clusters in one process: the demo,
//! tests). Same semantics as etcd: the keys are fields of one state behind a mutex, each
//! transaction is one critical section, and leases expire on tokio time unless the session's
//! task renews them. A lease's expiry is enforced by its own task, not by the session, so a
//! member whose session stops renewing ([`EmbeddedArbiter::pause`]) loses its keys exactly as a
//! paused process loses them in etcd.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{
    Arbiter, ArbiterError, Candidate, HANDOVER_TTL, Leadership, LeaseState, MemberStatus, Result, Session, View, check_candidate,
    check_hand_over, check_report, check_state_name, lease_seconds,
};

type LeaseId = u64;
type SessionId = u64;

/// An arbiter in this process. Clones share the state: every `join` on any clone sees the same
/// leader, epoch and members.
#[derive(Clone)]
pub struct EmbeddedArbiter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EmbeddedArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedArbiter").field("view", &*self.shared.view.borrow()).finish()
    }
}

struct Shared {
    state: Mutex<State>,
    view: watch::Sender<View>,
    handover_ttl: Duration,
}

#[derive(Default)]
struct State {
    /// The `epoch` key: no lease.
    epoch: u64,
    leader: Option<(Leadership, LeaseId)>,
    handover: Option<Handover>,
    members: BTreeMap<String, (MemberStatus, LeaseId)>,
    leases: HashMap<LeaseId, LeaseEntry>,
    sessions: HashMap<SessionId, SessionRec>,
    /// Coordinator state per (cluster, name): no lease.
    states: HashMap<(String, String), Vec<u8>>,
    /// Clusters whose sessions stopped renewing (test hook).
    paused: HashSet<String>,
    next_id: u64,
}

struct Handover {
    to: String,
    /// Tells this handover from a later one when its expiry task wakes.
    id: u64,
}

struct LeaseEntry {
    session: SessionId,
    deadline: Instant,
}

struct SessionRec {
    cluster: String,
    ttl: Duration,
    lease: Option<LeaseId>,
    status: Option<MemberStatus>,
    lease_tx: Arc<watch::Sender<LeaseState>>,
    /// Wakes the renewal task: the lease was lost, or renewals resumed.
    wake: Arc<Notify>,
}

impl Default for EmbeddedArbiter {
    fn default() -> Self {
        EmbeddedArbiter::new()
    }
}

impl EmbeddedArbiter {
    pub fn new() -> EmbeddedArbiter {
        EmbeddedArbiter::with_handover_ttl(HANDOVER_TTL)
    }

    /// With a switchover's handover key living `ttl` instead of [`HANDOVER_TTL`].
    pub fn with_handover_ttl(ttl: Duration) -> EmbeddedArbiter {
        let (view, _) = watch::channel(View::default());
        EmbeddedArbiter { shared: Arc::new(Shared { state: Mutex::new(State::default()), view, handover_ttl: ttl }) }
    }

    /// The view, without joining.
    pub fn view(&self) -> watch::Receiver<View> {
        self.shared.view.subscribe()
    }

    /// Test hook: `cluster`'s sessions stop renewing and re-granting leases (as a paused or
    /// partitioned process): their leases expire after their ttl, taking their keys along, and
    /// the sessions see [`LeaseState::Lost`].
    pub fn pause(&self, cluster: &str) {
        self.shared.state.lock().paused.insert(cluster.to_string());
        info!(cluster, "embedded arbiter: renewals paused");
    }

    /// Undoes [`EmbeddedArbiter::pause`]: a lost lease is replaced at once (member key put again).
    pub fn resume(&self, cluster: &str) {
        let st = &mut *self.shared.state.lock();
        st.paused.remove(cluster);
        for s in st.sessions.values().filter(|s| s.cluster == cluster) {
            s.wake.notify_one();
        }
        info!(cluster, "embedded arbiter: renewals resumed");
    }

    /// Test hook: `cluster`'s leases expire now (as if their ttl had run out).
    pub fn expire(&self, cluster: &str) {
        let st = &mut *self.shared.state.lock();
        let leases: Vec<LeaseId> = st.sessions.values().filter(|s| s.cluster == cluster).filter_map(|s| s.lease).collect();
        for id in leases {
            self.shared.drop_lease(st, id);
        }
        self.shared.publish(st);
    }
}

impl Shared {
    /// Publishes the view if it changed (member reports alone wake nobody).
    fn publish(&self, st: &State) {
        let view = View {
            leader: st.leader.as_ref().map(|(l, _)| l.clone()),
            epoch: st.epoch,
            handover: st.handover.as_ref().map(|h| h.to.clone()),
        };
        self.view.send_if_modified(|v| {
            if *v == view {
                return false;
            }
            *v = view;
            true
        });
    }

    /// Grants a lease to `session` and starts its expiry task. The caller publishes.
    fn grant(self: &Arc<Self>, st: &mut State, session: SessionId) -> Option<LeaseId> {
        st.next_id += 1;
        let id = st.next_id;
        let s = st.sessions.get_mut(&session)?;
        let deadline = Instant::now() + s.ttl;
        s.lease = Some(id);
        // `until` is the expiry deadline itself, on tokio's clock (virtual in paused-time tests).
        s.lease_tx.send_replace(LeaseState::Valid { until: deadline.into_std(), lease: id });
        let status = s.status.clone();
        if let Some(status) = status {
            st.members.insert(status.cluster.clone(), (status, id));
        }
        st.leases.insert(id, LeaseEntry { session, deadline });
        tokio::spawn(expire_when_due(self.clone(), id));
        Some(id)
    }

    /// The lease is gone (expired, revoked): its keys with it; its session hears `Lost`.
    fn drop_lease(&self, st: &mut State, id: LeaseId) {
        let Some(entry) = st.leases.remove(&id) else { return };
        if st.leader.as_ref().is_some_and(|(_, l)| *l == id) {
            let (l, _) = st.leader.take().expect("checked");
            info!(cluster = l.cluster, epoch = l.epoch, "embedded arbiter: leader lease gone");
        }
        st.members.retain(|_, (_, l)| *l != id);
        if let Some(s) = st.sessions.get_mut(&entry.session)
            && s.lease == Some(id)
        {
            s.lease = None;
            s.lease_tx.send_replace(LeaseState::Lost);
            s.wake.notify_one();
        }
    }
}

async fn expire_when_due(shared: Arc<Shared>, id: LeaseId) {
    loop {
        let Some(deadline) = shared.state.lock().leases.get(&id).map(|l| l.deadline) else { return };
        tokio::time::sleep_until(deadline).await;
        let st = &mut *shared.state.lock();
        match st.leases.get(&id) {
            None => return,
            // Renewed meanwhile: sleep until the new deadline.
            Some(l) if l.deadline > Instant::now() => continue,
            Some(_) => {
                debug!(lease = id, "embedded arbiter: lease expired");
                shared.drop_lease(st, id);
                shared.publish(st);
                return;
            }
        }
    }
}

async fn expire_handover(shared: Arc<Shared>, id: u64, after: Duration) {
    tokio::time::sleep(after).await;
    let st = &mut *shared.state.lock();
    if st.handover.as_ref().is_some_and(|h| h.id == id) {
        st.handover = None;
        shared.publish(st);
    }
}

/// Renews the session's lease every ttl/3 (unless paused), grants a new one when it was lost,
/// and revokes it when the session ends.
async fn renew(shared: Arc<Shared>, session: SessionId, cancel: CancellationToken, wake: Arc<Notify>) {
    let every = {
        let st = shared.state.lock();
        st.sessions.get(&session).map(|s| (s.ttl / 3).max(Duration::from_millis(100)))
    };
    let Some(every) = every else { return };
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(every) => {}
            () = wake.notified() => {}
        }
        let st = &mut *shared.state.lock();
        let Some(s) = st.sessions.get(&session) else { return };
        if st.paused.contains(&s.cluster) {
            continue;
        }
        match s.lease {
            Some(id) => {
                let (ttl, tx) = (s.ttl, s.lease_tx.clone());
                if let Some(l) = st.leases.get_mut(&id) {
                    l.deadline = Instant::now() + ttl;
                    tx.send_replace(LeaseState::Valid { until: l.deadline.into_std(), lease: id });
                }
            }
            None => {
                let cluster = s.cluster.clone();
                if let Some(id) = shared.grant(st, session) {
                    info!(cluster, lease = id, "embedded arbiter: new lease after the last was lost");
                }
                shared.publish(st);
            }
        }
    }
    let st = &mut *shared.state.lock();
    if let Some(id) = st.sessions.get(&session).and_then(|s| s.lease) {
        shared.drop_lease(st, id);
    }
    st.sessions.remove(&session);
    shared.publish(st);
}

#[async_trait]
impl Arbiter for EmbeddedArbiter {
    async fn join(&self, me: Candidate, ttl: Duration) -> Result<Arc<dyn Session>> {
        check_candidate(&me)?;
        let ttl = Duration::from_secs(lease_seconds(ttl) as u64);
        let (lease_tx, lease_rx) = watch::channel(LeaseState::Lost);
        let lease_tx = Arc::new(lease_tx);
        let wake = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let id = {
            let st = &mut *self.shared.state.lock();
            st.next_id += 1;
            let id = st.next_id;
            let rec = SessionRec { cluster: me.cluster.clone(), ttl, lease: None, status: None, lease_tx, wake: wake.clone() };
            st.sessions.insert(id, rec);
            self.shared.grant(st, id);
            id
        };
        let task = tokio::spawn(renew(self.shared.clone(), id, cancel.clone(), wake));
        info!(cluster = me.cluster, ?ttl, "joined the embedded arbiter");
        Ok(Arc::new(EmbeddedSession { shared: self.shared.clone(), id, me, lease_rx, cancel, task: Mutex::new(Some(task)) }))
    }
}

struct EmbeddedSession {
    shared: Arc<Shared>,
    id: SessionId,
    me: Candidate,
    lease_rx: watch::Receiver<LeaseState>,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for EmbeddedSession {
    fn drop(&mut self) {
        // The renewal task revokes the lease on its way out.
        self.cancel.cancel();
    }
}

impl EmbeddedSession {
    /// This session's live lease, or why there is none.
    fn lease_of(&self, st: &State) -> Result<LeaseId> {
        if self.cancel.is_cancelled() {
            return Err(ArbiterError::Closed);
        }
        match st.sessions.get(&self.id) {
            None => Err(ArbiterError::Closed),
            Some(s) => s.lease.ok_or_else(|| ArbiterError::LeaseLost { message: format!("lease of {} expired", self.me.cluster) }),
        }
    }

    fn is_mine(&self, st: &State, epoch: u64) -> bool {
        st.leader.as_ref().is_some_and(|(l, _)| l.cluster == self.me.cluster && l.epoch == epoch)
    }
}

#[async_trait]
impl Session for EmbeddedSession {
    fn view(&self) -> watch::Receiver<View> {
        self.shared.view.subscribe()
    }

    fn lease(&self) -> watch::Receiver<LeaseState> {
        self.lease_rx.clone()
    }

    async fn report(&self, status: MemberStatus) -> Result<()> {
        check_report(&self.me, &status)?;
        let st = &mut *self.shared.state.lock();
        // Kept even while the lease is lost: the next lease puts it.
        if let Some(s) = st.sessions.get_mut(&self.id) {
            s.status = Some(status.clone());
        }
        let lease = self.lease_of(st)?;
        st.members.insert(status.cluster.clone(), (status, lease));
        Ok(())
    }

    async fn members(&self) -> Result<Vec<MemberStatus>> {
        if self.cancel.is_cancelled() {
            return Err(ArbiterError::Closed);
        }
        Ok(self.shared.state.lock().members.values().map(|(m, _)| m.clone()).collect())
    }

    async fn put_state(&self, name: &str, value: Vec<u8>) -> Result<()> {
        check_state_name(name)?;
        if self.cancel.is_cancelled() {
            return Err(ArbiterError::Closed);
        }
        self.shared.state.lock().states.insert((self.me.cluster.clone(), name.to_string()), value);
        Ok(())
    }

    async fn get_state(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_state_name(name)?;
        if self.cancel.is_cancelled() {
            return Err(ArbiterError::Closed);
        }
        Ok(self.shared.state.lock().states.get(&(self.me.cluster.clone(), name.to_string())).cloned())
    }

    async fn campaign(&self, expected_epoch: u64) -> Result<Option<Leadership>> {
        let st = &mut *self.shared.state.lock();
        let lease = self.lease_of(st)?;
        let handover_allows = st.handover.as_ref().is_none_or(|h| h.to == self.me.cluster);
        if st.epoch != expected_epoch || st.leader.is_some() || !handover_allows {
            debug!(cluster = self.me.cluster, expected_epoch, epoch = st.epoch, "campaign lost");
            return Ok(None);
        }
        let epoch = expected_epoch + 1;
        let l = Leadership {
            cluster: self.me.cluster.clone(),
            epoch,
            endpoint: self.me.endpoint.clone(),
            datacenter: self.me.datacenter.clone(),
        };
        st.epoch = epoch;
        st.leader = Some((l.clone(), lease));
        st.handover = None;
        self.shared.publish(st);
        info!(cluster = l.cluster, epoch, "embedded arbiter: leadership won");
        Ok(Some(l))
    }

    async fn resign(&self, epoch: u64) -> Result<()> {
        let st = &mut *self.shared.state.lock();
        if self.cancel.is_cancelled() {
            return Err(ArbiterError::Closed);
        }
        if self.is_mine(st, epoch) {
            st.leader = None;
            self.shared.publish(st);
            info!(cluster = self.me.cluster, epoch, "embedded arbiter: resigned");
        }
        Ok(())
    }

    async fn hand_over(&self, epoch: u64, to: &str) -> Result<()> {
        check_hand_over(&self.me, to)?;
        let st = &mut *self.shared.state.lock();
        if self.cancel.is_cancelled() {
            return Err(ArbiterError::Closed);
        }
        if !self.is_mine(st, epoch) {
            return Err(ArbiterError::NotLeader { cluster: self.me.cluster.clone(), epoch });
        }
        st.next_id += 1;
        let id = st.next_id;
        st.handover = Some(Handover { to: to.to_string(), id });
        st.leader = None;
        self.shared.publish(st);
        tokio::spawn(expire_handover(self.shared.clone(), id, self.shared.handover_ttl));
        info!(cluster = self.me.cluster, epoch, to, "embedded arbiter: handed over");
        Ok(())
    }

    async fn close(&self) {
        self.cancel.cancel();
        let task = self.task.lock().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(cluster: &str) -> Candidate {
        Candidate { cluster: cluster.into(), datacenter: String::new(), endpoint: format!("http://{cluster}:1") }
    }

    #[tokio::test]
    async fn clones_share_one_state_and_dropped_sessions_leave() {
        let arb = EmbeddedArbiter::new();
        let other = arb.clone();
        let a = arb.join(me("a"), Duration::from_secs(2)).await.unwrap();
        let b = other.join(me("b"), Duration::from_secs(2)).await.unwrap();
        assert!(a.campaign(0).await.unwrap().is_some());
        assert_eq!(b.campaign(0).await.unwrap(), None);
        assert_eq!(b.view().borrow().leader.as_ref().map(|l| l.cluster.as_str()), Some("a"));
        drop(a);
        // Dropping a session revokes its lease at once (not after the ttl).
        let mut rx = b.view();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.leader.is_none())).await.unwrap().unwrap();
        assert_eq!(b.campaign(1).await.unwrap().map(|l| l.epoch), Some(2));
    }
}
