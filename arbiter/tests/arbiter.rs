//! One body per behaviour, run on both backends: a real etcd (started on free loopback ports by
//! tandem-harness) and the embedded arbiter. Waits are "eventually within 10 s" on
//! the view and lease channels, never sleeps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_arbiter::{
    Arbiter, ArbiterError, Candidate, EmbeddedArbiter, EtcdArbiter, Leadership, LeaseState, MemberStatus, Role, Session, View,
    default_prefix,
};
use tandem_harness::Etcd;

const TTL: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(10);

enum Backend {
    Etcd { etcd: Etcd, arbiter: EtcdArbiter },
    Embedded(EmbeddedArbiter),
}

impl Backend {
    async fn etcd(handover_ttl: Duration) -> Backend {
        init_logs();
        let etcd = Etcd::start().await;
        let arbiter = EtcdArbiter::new(etcd.endpoints(), default_prefix("test")).unwrap().with_handover_ttl(handover_ttl);
        Backend::Etcd { etcd, arbiter }
    }

    fn embedded(handover_ttl: Duration) -> Backend {
        init_logs();
        Backend::Embedded(EmbeddedArbiter::with_handover_ttl(handover_ttl))
    }

    fn arbiter(&self) -> &dyn Arbiter {
        match self {
            Backend::Etcd { arbiter, .. } => arbiter,
            Backend::Embedded(a) => a,
        }
    }

    async fn join(&self, cluster: &str) -> Arc<dyn Session> {
        self.arbiter().join(candidate(cluster), TTL).await.unwrap_or_else(|e| panic!("join {cluster}: {e}"))
    }

    fn pause(&self, cluster: &str) {
        match self {
            Backend::Etcd { arbiter, .. } => arbiter.pause(cluster),
            Backend::Embedded(a) => a.pause(cluster),
        }
    }

    fn resume(&self, cluster: &str) {
        match self {
            Backend::Etcd { arbiter, .. } => arbiter.resume(cluster),
            Backend::Embedded(a) => a.resume(cluster),
        }
    }

    async fn expire(&self, cluster: &str) {
        match self {
            Backend::Etcd { arbiter, .. } => arbiter.expire(cluster).await.unwrap(),
            Backend::Embedded(a) => a.expire(cluster),
        }
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
}

fn candidate(cluster: &str) -> Candidate {
    Candidate { cluster: cluster.into(), datacenter: format!("dc-{cluster}"), endpoint: format!("http://{cluster}.invalid:19530") }
}

fn status(cluster: &str, role: Role, epoch: u64, position: u64) -> MemberStatus {
    MemberStatus {
        cluster: cluster.into(),
        datacenter: format!("dc-{cluster}"),
        endpoint: format!("http://{cluster}.invalid:19530"),
        role,
        epoch,
        position,
        promotable: true,
    }
}

/// Waits until `s`'s view satisfies `f`; panics with the last view after [`WAIT`].
async fn view_until(s: &Arc<dyn Session>, what: &str, f: impl Fn(&View) -> bool) -> View {
    let mut rx = s.view();
    let r = tokio::time::timeout(WAIT, rx.wait_for(|v| f(v))).await.map(|r| r.map(|v| v.clone()));
    match r {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("view channel closed while waiting for {what}"),
        Err(_) => panic!("view never showed {what} within {WAIT:?}; last view {:?}", *rx.borrow()),
    }
}

async fn lease_until(s: &Arc<dyn Session>, what: &str, f: impl Fn(&LeaseState) -> bool) -> LeaseState {
    let mut rx = s.lease();
    let r = tokio::time::timeout(WAIT, rx.wait_for(|l| f(l))).await.map(|r| r.map(|l| *l));
    match r {
        Ok(Ok(l)) => l,
        Ok(Err(_)) => panic!("lease channel closed while waiting for {what}"),
        Err(_) => panic!("lease never became {what} within {WAIT:?}; last {:?}", *rx.borrow()),
    }
}

/// Polls `members()` until `f` holds (members are not in the view, so there is nothing to watch).
async fn members_until(s: &Arc<dyn Session>, what: &str, f: impl Fn(&[MemberStatus]) -> bool) -> Vec<MemberStatus> {
    let start = Instant::now();
    loop {
        let m = s.members().await.unwrap();
        if f(&m) {
            return m;
        }
        assert!(start.elapsed() < WAIT, "members never showed {what} within {WAIT:?}; last {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn leader_is(v: &View, cluster: &str, epoch: u64) -> bool {
    v.leader.as_ref().is_some_and(|l| l.cluster == cluster && l.epoch == epoch) && v.epoch == epoch
}

// ---- behaviours ------------------------------------------------------------------------------

async fn one_of_two_campaigns_wins(b: Backend) {
    let a = b.join("a").await;
    let c = b.join("b").await;
    assert_eq!(*a.view().borrow(), View::default(), "a fresh arbiter has no leader and epoch 0");
    let (ra, rb) = tokio::join!(a.campaign(0), c.campaign(0));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let won: Leadership = match (ra, rb) {
        (Some(l), None) | (None, Some(l)) => l,
        other => panic!("exactly one campaign must win, got {other:?}"),
    };
    assert_eq!(won.epoch, 1);
    let expected = candidate(&won.cluster);
    assert_eq!((won.endpoint.as_str(), won.datacenter.as_str()), (expected.endpoint.as_str(), expected.datacenter.as_str()));
    for s in [&a, &c] {
        let v = view_until(s, "the winner at epoch 1", |v| leader_is(v, &won.cluster, 1)).await;
        assert_eq!(v.leader.as_ref(), Some(&won));
        assert_eq!(v.handover, None);
    }
    // Both campaigning again at the same epoch: the leader key exists, nobody wins.
    assert_eq!(a.campaign(0).await.unwrap(), None);
    assert_eq!(c.campaign(1).await.unwrap(), None, "no campaign while a leader holds the key");
}

async fn a_closed_leaders_successor_wins_the_next_epoch(b: Backend) {
    let a = b.join("a").await;
    let c = b.join("b").await;
    assert_eq!(a.campaign(0).await.unwrap().map(|l| l.epoch), Some(1));
    view_until(&c, "a leading", |v| leader_is(v, "a", 1)).await;
    a.close().await;
    let v = view_until(&c, "no leader after a closed", |v| v.leader.is_none()).await;
    assert_eq!(v.epoch, 1, "the epoch outlives its leader");
    let won = c.campaign(1).await.unwrap().expect("b wins epoch 2");
    assert_eq!((won.cluster.as_str(), won.epoch), ("b", 2));
    view_until(&c, "b at epoch 2", |v| leader_is(v, "b", 2)).await;
    assert!(matches!(a.campaign(2).await, Err(ArbiterError::Closed)), "a closed session does nothing");
    assert_eq!(*a.lease().borrow(), LeaseState::Lost);
}

async fn a_leader_that_stops_renewing_loses_its_lease_and_leadership(b: Backend) {
    let a = b.join("a").await;
    let c = b.join("b").await;
    a.report(status("a", Role::Leading, 1, 10)).await.unwrap();
    assert!(a.campaign(0).await.unwrap().is_some());
    view_until(&c, "a leading", |v| leader_is(v, "a", 1)).await;
    let LeaseState::Valid { until, lease: led_under } = *a.lease().borrow() else { panic!("a fresh session holds its lease") };

    b.pause("a");
    view_until(&c, "a's leadership gone with its lease", |v| v.leader.is_none() && v.epoch == 1).await;
    lease_until(&a, "Lost", |l| *l == LeaseState::Lost).await;
    assert!(Instant::now() >= until, "the lease cannot be gone before the `until` it promised");
    members_until(&c, "a's member key gone", |m| m.iter().all(|m| m.cluster != "a")).await;
    assert!(matches!(a.campaign(1).await, Err(ArbiterError::LeaseLost { .. })), "no campaign without a lease");
    assert_eq!(c.campaign(1).await.unwrap().map(|l| l.epoch), Some(2));

    b.resume("a");
    let again = lease_until(&a, "valid again", |l| matches!(l, LeaseState::Valid { .. })).await;
    // A controller tells the new lease from the one it led under by its id alone (it may
    // never see the `Lost` between them).
    assert!(matches!(again, LeaseState::Valid { lease, .. } if lease != led_under), "a new lease has a new id: {again:?}");
    let m = members_until(&c, "a's member key back", |m| m.iter().any(|m| m.cluster == "a")).await;
    assert_eq!(m.iter().find(|m| m.cluster == "a"), Some(&status("a", Role::Leading, 1, 10)), "the last report, put again");
    let v = view_until(&a, "b leading", |v| leader_is(v, "b", 2)).await;
    assert_eq!(v.leader.map(|l| l.cluster), Some("b".into()), "a's new lease did not bring its leadership back");
}

async fn an_expired_lease_is_replaced_without_the_leader_key(b: Backend) {
    let a = b.join("a").await;
    let c = b.join("b").await;
    a.report(status("a", Role::Leading, 1, 3)).await.unwrap();
    assert!(a.campaign(0).await.unwrap().is_some());
    b.expire("a").await;
    view_until(&c, "a's leadership gone", |v| v.leader.is_none()).await;
    // The session grants a new lease and puts its member key again, never the leader key: the
    // key is absent, so a campaign at epoch 1 can win.
    members_until(&c, "a's member key back", |m| m.iter().any(|m| m.cluster == "a" && m.position == 3)).await;
    lease_until(&a, "valid", |l| matches!(l, LeaseState::Valid { .. })).await;
    assert_eq!(a.campaign(1).await.unwrap().map(|l| l.epoch), Some(2));
    view_until(&c, "a at epoch 2", |v| leader_is(v, "a", 2)).await;
}

async fn a_stale_expected_epoch_loses(b: Backend) {
    let a = b.join("a").await;
    let c = b.join("b").await;
    assert!(a.campaign(0).await.unwrap().is_some());
    a.resign(1).await.unwrap();
    view_until(&c, "no leader after a resigned", |v| v.leader.is_none() && v.epoch == 1).await;
    assert_eq!(c.campaign(0).await.unwrap(), None, "epoch 0 is stale");
    assert_eq!(c.campaign(2).await.unwrap(), None, "epoch 2 was never granted");
    assert_eq!(c.campaign(1).await.unwrap().map(|l| (l.cluster, l.epoch)), Some(("b".into(), 2)));
}

async fn resign_deletes_only_my_leadership(b: Backend) {
    let a = b.join("a").await;
    let c = b.join("b").await;
    assert!(a.campaign(0).await.unwrap().is_some());
    c.resign(1).await.unwrap();
    a.resign(7).await.unwrap();
    // A session joining now lists the keys as they are after both resigns.
    let d = b.join("d").await;
    assert!(leader_is(&d.view().borrow(), "a", 1), "others' and wrong-epoch resigns changed nothing: {:?}", *d.view().borrow());
    a.resign(1).await.unwrap();
    let v = view_until(&d, "no leader", |v| v.leader.is_none()).await;
    assert_eq!(v.epoch, 1);
}

async fn only_the_designated_cluster_wins_a_handover(b: Backend) {
    let a = b.join("a").await;
    let c = b.join("b").await;
    let d = b.join("c").await;
    assert!(a.campaign(0).await.unwrap().is_some());
    let e = c.hand_over(1, "c").await.unwrap_err();
    assert!(matches!(e, ArbiterError::NotLeader { .. }), "{e}");
    let e = a.hand_over(2, "c").await.unwrap_err();
    assert!(matches!(e, ArbiterError::NotLeader { .. }), "wrong epoch: {e}");
    assert!(matches!(a.hand_over(1, "a").await, Err(ArbiterError::InvalidArgument(_))));

    a.hand_over(1, "c").await.unwrap();
    view_until(&c, "the handover to c", |v| v.leader.is_none() && v.handover.as_deref() == Some("c") && v.epoch == 1).await;
    assert_eq!(c.campaign(1).await.unwrap(), None, "b is not the designated cluster");
    assert_eq!(a.campaign(1).await.unwrap(), None, "nor is the old leader");
    let won = d.campaign(1).await.unwrap().expect("c is designated");
    assert_eq!((won.cluster.as_str(), won.epoch), ("c", 2));
    let v = view_until(&a, "c leading, handover cleared", |v| leader_is(v, "c", 2) && v.handover.is_none()).await;
    assert_eq!(v.leader, Some(won));
}

async fn a_handover_to_a_dead_target_expires(b: Backend) {
    let a = b.join("a").await;
    let c = b.join("b").await;
    assert!(a.campaign(0).await.unwrap().is_some());
    a.hand_over(1, "ghost").await.unwrap();
    view_until(&c, "the handover to ghost", |v| v.handover.as_deref() == Some("ghost")).await;
    assert_eq!(c.campaign(1).await.unwrap(), None, "blocked while the handover lives");
    view_until(&c, "the handover gone with its lease", |v| v.handover.is_none() && v.leader.is_none()).await;
    assert_eq!(c.campaign(1).await.unwrap().map(|l| l.epoch), Some(2));
}

async fn members_lists_reports(b: Backend) {
    let a = b.join("a").await;
    let c = b.join("b").await;
    assert!(a.members().await.unwrap().is_empty(), "nobody reported yet");
    a.report(status("a", Role::Leading, 1, 5)).await.unwrap();
    c.report(status("b", Role::Alternative, 1, 4)).await.unwrap();
    c.report(status("b", Role::Alternative, 1, 5)).await.unwrap();
    for s in [&a, &c] {
        let mut m = s.members().await.unwrap();
        m.sort_by(|x, y| x.cluster.cmp(&y.cluster));
        assert_eq!(m, vec![status("a", Role::Leading, 1, 5), status("b", Role::Alternative, 1, 5)]);
    }
    let e = a.report(status("b", Role::Leading, 1, 9)).await.unwrap_err();
    assert!(matches!(e, ArbiterError::InvalidArgument(_)) && e.to_string().contains("\"b\""), "{e}");
    c.close().await;
    assert_eq!(a.members().await.unwrap(), vec![status("a", Role::Leading, 1, 5)], "a closed member's key goes with its lease");
}

async fn leases_are_renewed(b: Backend) {
    let a = b.join("a").await;
    let LeaseState::Valid { until: first, .. } = *a.lease().borrow() else { panic!("a fresh session holds its lease") };
    let renewed = lease_until(&a, "renewed", |l| matches!(l, LeaseState::Valid { until, .. } if *until > first)).await;
    let LeaseState::Valid { until, .. } = renewed else { unreachable!() };
    assert!(until <= Instant::now() + TTL, "until is at most a ttl ahead");
}

async fn bad_members_cannot_join(b: Backend) {
    let e = b.arbiter().join(candidate("a/b"), TTL).await.err().expect("a slash in a cluster id");
    assert!(matches!(e, ArbiterError::InvalidArgument(_)) && !e.is_transient(), "{e}");
    let e = b.arbiter().join(Candidate { endpoint: String::new(), ..candidate("a") }, TTL).await.err().expect("no endpoint");
    assert!(e.to_string().contains("endpoint"), "{e}");
}

/// Coordinator state is per member and outlives its session: a member that joins again reads
/// back what it put; another member's state is its own. A bad name is refused by name.
async fn state_outlives_the_session(b: Backend) {
    let a = b.join("a").await;
    assert_eq!(a.get_state("placement").await.unwrap(), None);
    a.put_state("placement", b"one".to_vec()).await.unwrap();
    a.put_state("placement", b"two".to_vec()).await.unwrap();
    let c = b.join("b").await;
    assert_eq!(c.get_state("placement").await.unwrap(), None, "b reads its own state, not a's");
    a.close().await;
    let again = b.join("a").await;
    assert_eq!(again.get_state("placement").await.unwrap(), Some(b"two".to_vec()));
    let e = again.put_state("a/b", vec![]).await.unwrap_err();
    assert!(matches!(e, ArbiterError::InvalidArgument(_)) && e.to_string().contains("\"a/b\""), "{e}");
    // The view ignores state keys: nobody leads because of one.
    assert_eq!(again.view().borrow().leader, None);
}

macro_rules! on_both_backends {
    ($($name:ident $(($handover:expr))?),* $(,)?) => {
        $(
            mod $name {
                #[allow(unused_variables)]
                fn handover_ttl() -> std::time::Duration {
                    let ttl = tandem_arbiter::HANDOVER_TTL;
                    $(let ttl = $handover;)?
                    ttl
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn etcd() {
                    super::$name(super::Backend::etcd(handover_ttl()).await).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$name(super::Backend::embedded(handover_ttl())).await
                }
            }
        )*
    };
}

on_both_backends!(
    one_of_two_campaigns_wins,
    a_closed_leaders_successor_wins_the_next_epoch,
    a_leader_that_stops_renewing_loses_its_lease_and_leadership,
    an_expired_lease_is_replaced_without_the_leader_key,
    a_stale_expected_epoch_loses,
    resign_deletes_only_my_leadership,
    only_the_designated_cluster_wins_a_handover,
    a_handover_to_a_dead_target_expires(std::time::Duration::from_secs(1)),
    members_lists_reports,
    leases_are_renewed,
    bad_members_cannot_join,
    state_outlives_the_session,
);

// ---- etcd only -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_survives_an_etcd_restart() {
    let Backend::Etcd { mut etcd, arbiter } = Backend::etcd(tandem_arbiter::HANDOVER_TTL).await else { unreachable!() };
    let a = arbiter.join(candidate("a"), Duration::from_secs(3)).await.unwrap();
    let c = arbiter.join(candidate("b"), Duration::from_secs(3)).await.unwrap();
    assert!(a.campaign(0).await.unwrap().is_some());
    view_until(&c, "a leading", |v| leader_is(v, "a", 1)).await;

    etcd.restart().await;
    let restarted = Instant::now();
    // Leases survive a restart (etcd extends them): a keeps its lease and renews it again.
    lease_until(&a, "renewed after the restart", |l| matches!(l, LeaseState::Valid { until, .. } if *until > restarted)).await;
    a.resign(1).await.unwrap();
    view_until(&c, "the resign, seen by a watch resumed after the restart", |v| v.leader.is_none() && v.epoch == 1).await;
    assert!(c.campaign(1).await.unwrap().is_some());
    view_until(&a, "b leading", |v| leader_is(v, "b", 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_while_etcd_is_down_gets_a_transient_error() {
    let Backend::Etcd { mut etcd, arbiter } = Backend::etcd(tandem_arbiter::HANDOVER_TTL).await else { unreachable!() };
    etcd.kill();
    let e = arbiter.join(candidate("a"), TTL).await.err().expect("etcd is down");
    assert!(e.is_transient(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_rejoin_after_etcd_lost_its_data() {
    let Backend::Etcd { mut etcd, arbiter } = Backend::etcd(tandem_arbiter::HANDOVER_TTL).await else { unreachable!() };
    let a = arbiter.join(candidate("a"), TTL).await.unwrap();
    let c = arbiter.join(candidate("b"), TTL).await.unwrap();
    a.report(status("a", Role::Leading, 1, 8)).await.unwrap();
    assert!(a.campaign(0).await.unwrap().is_some());
    view_until(&c, "a leading", |v| leader_is(v, "a", 1)).await;

    etcd.restart_empty().await;
    // Every key and lease is gone: the views list again and show it, and each session grants a
    // new lease and puts its last report back (not its leadership).
    view_until(&c, "the empty keyspace", |v| *v == View::default()).await;
    members_until(&c, "a's report back under a new lease", |m| m == [status("a", Role::Leading, 1, 8)]).await;
    lease_until(&a, "valid", |l| matches!(l, LeaseState::Valid { until, .. } if *until > Instant::now())).await;
    // A session joining now lists the keys as they are: no leader key came back with a's lease.
    let d = arbiter.join(candidate("d"), TTL).await.unwrap();
    assert_eq!(*d.view().borrow(), View::default(), "a did not put its leader key back");
    view_until(&a, "the empty keyspace", |v| *v == View::default()).await;
}
