//! Pausing and partitioning an in-process member, from the outside as a real process looks
//! when it is SIGSTOPped or cut off.
//!
//! * [`Link`]: a TCP relay in front of a member; everyone else (clients, gateways, the other
//!   members through the arbiter's endpoints) reaches the member through it. Stalled, it moves
//!   no byte either way and opens no new connection upstream (connections are still accepted
//!   and queue, as the kernel of a stopped process accepts them): callers see silence, not a
//!   refusal. Why not a crate: the proxies on crates.io are programs, not libraries, and what
//!   is needed is forty lines of `tokio::io`.
//! * [`FaultyArbiter`]: the sandbox's embedded arbiter, seen through a fault. Paused, a
//!   member's calls wait and its view and lease stay as they were (nothing runs in a stopped
//!   process); partitioned, its calls fail at once as an unreachable etcd's do. Either way its
//!   renewals stop ([`EmbeddedArbiter::pause`]), so its lease and keys expire for the others.
//!
//! Not modelled: the member's own outgoing calls (its follower's to the leader, its broker
//! client) share the loopback and keep working; inside, its tasks keep running.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tandem_arbiter::{Arbiter, ArbiterError, Candidate, EmbeddedArbiter, Leadership, LeaseState, MemberStatus, Result, Session, View};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a member's surroundings let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// SIGSTOP-like: nothing gets in or out, the member's calls hang.
    Paused,
    /// Cut off from everyone: nothing gets in, the arbiter cannot be reached.
    Partitioned,
}

/// A TCP relay in front of a member (module docs).
pub struct Link {
    pub addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    pub async fn start(upstream: SocketAddr, fault: watch::Sender<Fault>) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a link");
        let addr = listener.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(upstream));
        let (up, rx) = (upstream.clone(), fault.subscribe());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(relay(inbound, up.clone(), rx.clone()));
            }
        });
        Link { addr, upstream, fault, task }
    }

    /// Points the link at the member's new address (after a restart on another port).
    pub fn set_upstream(&self, addr: SocketAddr) {
        *self.upstream.lock() = addr;
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    pub fn set_fault(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits while the fault lets nothing through.
async fn passable(fault: &mut watch::Receiver<Fault>) -> bool {
    fault.wait_for(|f| *f == Fault::None).await.is_ok()
}

async fn relay(inbound: TcpStream, upstream: Arc<Mutex<SocketAddr>>, mut fault: watch::Receiver<Fault>) {
    if !passable(&mut fault).await {
        return;
    }
    let to = *upstream.lock();
    let Ok(outbound) = TcpStream::connect(to).await else { return };
    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    // Either direction ending (or failing) ends the connection, as a proxy would.
    tokio::select! {
        () = pump(ri, wo, fault.clone()) => {}
        () = pump(ro, wi, fault) => {}
    }
}

/// Copies `from` to `to`, holding each chunk while the link is stalled.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mut fault: watch::Receiver<Fault>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !passable(&mut fault).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The sandbox's arbiter, with a fault per member (module docs).
#[derive(Clone)]
pub struct FaultyArbiter {
    pub inner: EmbeddedArbiter,
    faults: Arc<Mutex<std::collections::HashMap<String, watch::Sender<Fault>>>>,
}

impl FaultyArbiter {
    pub fn new() -> FaultyArbiter {
        FaultyArbiter { inner: EmbeddedArbiter::new(), faults: Default::default() }
    }

    /// The fault switch of `cluster` (one per cluster name, kept across restarts).
    pub fn switch(&self, cluster: &str) -> watch::Sender<Fault> {
        self.faults.lock().entry(cluster.to_string()).or_insert_with(|| watch::channel(Fault::None).0).clone()
    }

    /// Sets `cluster`'s fault, for its arbiter session and (through the same switch) its link.
    pub fn set(&self, cluster: &str, fault: Fault) {
        match fault {
            Fault::None => self.inner.resume(cluster),
            Fault::Paused | Fault::Partitioned => self.inner.pause(cluster),
        }
        self.switch(cluster).send_replace(fault);
    }
}

#[async_trait]
impl Arbiter for FaultyArbiter {
    async fn join(&self, me: Candidate, ttl: Duration) -> Result<Arc<dyn Session>> {
        let fault = self.switch(&me.cluster).subscribe();
        let inner = self.inner.join(me, ttl).await?;
        // What the member sees of the view and of its lease: frozen while it is cut off.
        let (view_tx, view) = watch::channel(inner.view().borrow().clone());
        let (lease_tx, lease) = watch::channel(*inner.lease().borrow());
        let (mut v, mut l, mut f) = (inner.view(), inner.lease(), fault.clone());
        tokio::spawn(async move {
            loop {
                if *f.borrow_and_update() == Fault::None {
                    view_tx.send_if_modified(|cur| replace(cur, v.borrow_and_update().clone()));
                    lease_tx.send_if_modified(|cur| replace(cur, *l.borrow_and_update()));
                }
                tokio::select! {
                    r = v.changed() => if r.is_err() { return },
                    r = l.changed() => if r.is_err() { return },
                    r = f.changed() => if r.is_err() { return },
                }
            }
        });
        Ok(Arc::new(FaultySession { inner, fault, view, lease }))
    }
}

fn replace<T: PartialEq>(cur: &mut T, new: T) -> bool {
    if *cur == new {
        return false;
    }
    *cur = new;
    true
}

struct FaultySession {
    inner: Arc<dyn Session>,
    fault: watch::Receiver<Fault>,
    view: watch::Receiver<View>,
    lease: watch::Receiver<LeaseState>,
}

impl FaultySession {
    /// Lets a call through: at once when there is no fault, after the pause when paused, never
    /// when partitioned (the error an unreachable etcd gives).
    async fn reach(&self) -> Result<()> {
        let mut f = self.fault.clone();
        loop {
            let now = *f.borrow_and_update();
            match now {
                Fault::None => return Ok(()),
                Fault::Partitioned => {
                    return Err(ArbiterError::Etcd { endpoints: "sandbox".into(), message: "partitioned from the arbiter".into() });
                }
                Fault::Paused => {
                    if f.changed().await.is_err() {
                        return Err(ArbiterError::Closed);
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Session for FaultySession {
    fn view(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    fn lease(&self) -> watch::Receiver<LeaseState> {
        self.lease.clone()
    }

    async fn report(&self, status: MemberStatus) -> Result<()> {
        self.reach().await?;
        self.inner.report(status).await
    }

    async fn members(&self) -> Result<Vec<MemberStatus>> {
        self.reach().await?;
        self.inner.members().await
    }

    async fn campaign(&self, expected_epoch: u64) -> Result<Option<Leadership>> {
        self.reach().await?;
        self.inner.campaign(expected_epoch).await
    }

    async fn resign(&self, epoch: u64) -> Result<()> {
        self.reach().await?;
        self.inner.resign(epoch).await
    }

    async fn put_state(&self, name: &str, value: Vec<u8>) -> Result<()> {
        self.reach().await?;
        self.inner.put_state(name, value).await
    }

    async fn get_state(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.reach().await?;
        self.inner.get_state(name).await
    }

    async fn hand_over(&self, epoch: u64, to: &str) -> Result<()> {
        self.reach().await?;
        self.inner.hand_over(epoch, to).await
    }

    async fn close(&self) {
        // A stopped or cut-off member's close never arrives: its lease expires instead.
        if *self.fault.borrow() == Fault::None {
            self.inner.close().await;
        }
    }
}
