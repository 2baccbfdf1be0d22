//! Writes held while no leader is known, like vtgate's buffering during a reparent: a write or
//! DDL that finds no usable leader (none known, the leader unreachable, or it refused the write
//! as not leading, fenced or at another epoch) waits here until the topology publishes a leader,
//! then goes to it. Bounded: `buffer.max_writes` held at once (more are refused at once) and
//! `buffer.max_wait_ms` per write (never beyond its deadline).
//!
//! Release is first come, first served: one task watches the leader and, when one appears, wakes
//! the held writes in the order they arrived. Concurrent writes have no order among themselves
//! on the wire (as without the gateway); a client that needs order waits for each reply.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::BufferConfig;
use crate::topology::Topology;

/// Why a write was not held until a leader appeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldError {
    /// Buffering is off (`max_writes` or `max_wait_ms` is 0).
    Off,
    /// `max_writes` writes are already held.
    Full { held: usize },
    /// Held until its limit (`max_wait_ms` or its deadline) and no usable leader appeared.
    Timeout { held: usize, waited: Duration },
    /// The gateway is stopping.
    Stopped,
}

pub struct WriteBuffer {
    pub cfg: BufferConfig,
    held: AtomicUsize,
    /// Held writes in arrival order, each woken through its sender.
    queue: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    next: AtomicU64,
    stop: CancellationToken,
}

/// Counts one held write while alive.
struct Held<'a>(&'a WriteBuffer);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let n = self.0.held.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("tandem_gateway_writes_buffered").set(n as f64);
    }
}

impl WriteBuffer {
    /// A buffer released by `topo`'s leader changes (its releaser task runs until the gateway stops).
    pub fn start(cfg: BufferConfig, topo: &Topology) -> Arc<WriteBuffer> {
        let stop = topo.stopped();
        let buffer = Arc::new(WriteBuffer {
            cfg,
            held: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
            stop: stop.clone(),
        });
        let mut leader = topo.leader_watch();
        let me = Arc::downgrade(&buffer);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = leader.changed() => if changed.is_err() { break },
                    () = stop.cancelled() => break,
                }
                let Some(b) = me.upgrade() else { break };
                if leader.borrow_and_update().is_some() {
                    b.release_all();
                }
            }
        });
        buffer
    }

    /// Writes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Wakes every held write, first arrived first.
    fn release_all(&self) {
        let woken: Vec<_> = self.queue.lock().drain(..).collect();
        for (_, tx) in woken {
            let _ = tx.send(());
        }
    }

    fn forget(&self, ticket: u64) {
        self.queue.lock().retain(|(t, _)| *t != ticket);
    }

    /// Holds the calling write until `ready` returns a leader it may use (checked at once, then
    /// each time the published leader changes to one), or until `until`.
    pub async fn hold<T>(&self, until: Instant, mut ready: impl FnMut() -> Option<T>) -> Result<T, HoldError> {
        if !self.cfg.enabled() {
            return Err(HoldError::Off);
        }
        let n = self.held.fetch_add(1, Ordering::AcqRel);
        let _held = Held(self);
        if n >= self.cfg.max_writes {
            metrics::counter!("tandem_gateway_writes_buffer_full_total").increment(1);
            return Err(HoldError::Full { held: n });
        }
        metrics::gauge!("tandem_gateway_writes_buffered").set((n + 1) as f64);
        let started = Instant::now();
        let waited = || {
            let w = started.elapsed();
            metrics::histogram!("tandem_gateway_writes_buffer_wait_seconds").record(w.as_secs_f64());
            w
        };
        loop {
            // Queued before looking, so a leader published in between still wakes this write.
            let (tx, rx) = oneshot::channel();
            let ticket = self.next.fetch_add(1, Ordering::Relaxed);
            self.queue.lock().push_back((ticket, tx));
            if let Some(leader) = ready() {
                self.forget(ticket);
                waited();
                return Ok(leader);
            }
            tokio::select! {
                _ = rx => {}
                () = tokio::time::sleep_until(until.into()) => {
                    self.forget(ticket);
                    metrics::counter!("tandem_gateway_writes_buffer_timeouts_total").increment(1);
                    return Err(HoldError::Timeout { held: self.held(), waited: waited() });
                }
                () = self.stop.cancelled() => {
                    self.forget(ticket);
                    waited();
                    return Err(HoldError::Stopped);
                }
            }
        }
    }
}
