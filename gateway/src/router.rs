//! Which cluster serves a request: the read guarantee, each cluster's last known freshness and
//! health, and the routing policy.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::Rng;
use tandem_proto::session::{Ts, physical_ms};
use tandem_proto::v1 as pb;

use crate::config::Policy;
use crate::topology::{Cluster, Health, Role};

/// What a read must see, as the gateway estimates it (the cluster enforces it exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    Strong,
    /// Staleness in ms.
    Bounded(u64),
    /// The session token's ts (0: no token).
    Session(Ts),
    Eventually,
}

impl Guarantee {
    pub fn label(self) -> &'static str {
        match self {
            Guarantee::Strong => "strong",
            Guarantee::Bounded(_) => "bounded",
            Guarantee::Session(_) => "session",
            Guarantee::Eventually => "eventually",
        }
    }

    /// The level a read asks for (`tandem_proto::wire::consistency`: unspecified is SESSION).
    pub fn level(read: Option<&pb::ReadOptions>) -> pb::ConsistencyLevel {
        tandem_proto::wire::consistency(read)
    }
}

pub fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How long `c` is expected to wait before it can serve the read, or why it cannot serve it.
pub fn expected_wait(c: &Cluster, collection: Option<&str>, g: Guarantee, now_ms: u64) -> Result<Duration, String> {
    let s = c.status.read();
    match s.health {
        Health::Healthy => {}
        Health::Unknown => return Err("not checked yet".into()),
        Health::Unhealthy => return Err(format!("unhealthy: {}", s.last_error)),
    }
    if s.suspect_since.is_some() {
        return Err(format!("suspect: {}", s.last_error));
    }
    let Some(info) = &s.info else { return Err("not checked yet".into()) };
    match info.role {
        // The leader is the source of every ts: it never waits for replication.
        Some(Role::Leading) => return Ok(Duration::ZERO),
        Some(Role::Alternative) => {}
        r @ (Some(Role::Standby | Role::Recovering) | None) => {
            return Err(format!("is {:?}, serves no reads", crate::topology::role_to_proto(r)));
        }
    }
    let Some(name) = collection else { return Ok(Duration::ZERO) };
    // Unknown freshness is not readable: the collection may not have been replicated yet.
    let Some(&(serviceable, lag)) = info.collections.get(name) else { return Err(format!("has no `{name}` yet")) };
    let wait_ms = match g {
        Guarantee::Eventually => 0,
        Guarantee::Strong => lag,
        Guarantee::Bounded(staleness) => lag.saturating_sub(staleness),
        Guarantee::Session(ts) if serviceable >= ts => 0,
        // The alternative's position advances with the leader's clock, `lag` behind it.
        Guarantee::Session(ts) => physical_ms(ts).saturating_sub(now_ms.saturating_sub(lag)),
    };
    Ok(Duration::from_millis(wait_ms))
}

pub struct Router {
    pub policy: Policy,
    pub datacenter: String,
    rr: AtomicUsize,
}

/// Why a cluster was picked (the `reason` label of `tandem_gateway_routed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    P2c,
    RoundRobin,
    Local,
    Fallback,
    Only,
    Leader,
    Redirect,
    /// A write sent after being held (no usable leader when it arrived or last tried).
    Held,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::P2c => "p2c",
            Reason::RoundRobin => "round_robin",
            Reason::Local => "local",
            Reason::Fallback => "fallback",
            Reason::Only => "only",
            Reason::Leader => "leader",
            Reason::Redirect => "redirect",
            Reason::Held => "held",
        }
    }
}

impl Router {
    pub fn new(policy: Policy, datacenter: String) -> Router {
        Router { policy, datacenter, rr: AtomicUsize::new(0) }
    }

    /// Picks one of `eligible` (never empty).
    pub fn choose(&self, eligible: &[Arc<Cluster>]) -> (Arc<Cluster>, Reason) {
        debug_assert!(!eligible.is_empty());
        if eligible.len() == 1 {
            return (eligible[0].clone(), Reason::Only);
        }
        match self.policy {
            Policy::P2c => (p2c(eligible), Reason::P2c),
            Policy::RoundRobin => {
                let i = self.rr.fetch_add(1, Ordering::Relaxed) % eligible.len();
                (eligible[i].clone(), Reason::RoundRobin)
            }
            Policy::PreferLocal => {
                let local: Vec<_> = eligible.iter().filter(|c| c.datacenter() == self.datacenter).cloned().collect();
                if local.is_empty() { (p2c(eligible), Reason::Fallback) } else { (p2c(&local), Reason::Local) }
            }
        }
    }
}

/// Power of two choices: the less loaded (peak-EWMA cost) of two random candidates.
fn p2c(c: &[Arc<Cluster>]) -> Arc<Cluster> {
    if c.len() == 1 {
        return c[0].clone();
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..c.len());
    let mut b = rng.random_range(0..c.len() - 1);
    if b >= a {
        b += 1;
    }
    let (la, lb) = (c[a].load(), c[b].load());
    if lb < la { c[b].clone() } else { c[a].clone() }
}

/// "no cluster can serve a SESSION read of `c` within 2s: a lag 5000 ms, b unhealthy: ..."
pub fn explain(what: &str, g: Guarantee, collection: Option<&str>, within: Duration, why: &[(String, String)]) -> String {
    let mut m = format!("no cluster can serve {what}");
    if let Some(c) = collection {
        let _ = write!(m, " of `{c}`");
    }
    let _ = write!(m, " ({}) within {:.1}s", g.label().to_uppercase(), within.as_secs_f64());
    if why.is_empty() {
        m.push_str(": the gateway knows no cluster");
    } else {
        m.push_str(": ");
        m.push_str(&why.iter().map(|(id, r)| format!("{id} {r}")).collect::<Vec<_>>().join(", "));
    }
    m
}
