//! A one-member etcd (Debian's `etcd-server`, /usr/bin/etcd 3.4) on free loopback ports in a
//! temp data dir, for discovery and arbiter tests and the failover bench.
//!
//! ```no_run
//! # async fn demo() {
//! let mut etcd = tandem_harness::Etcd::start().await;
//! let endpoints = vec![etcd.endpoint()]; // "http://127.0.0.1:PORT"
//! etcd.restart().await;                  // SIGKILL + start on the same ports and data dir
//! drop(etcd);                            // kills it
//! # }
//! ```
//!
//! Heartbeat 50 ms and election timeout 500 ms: a quick election after a restart, and etcd
//! raises a lease below 1.5 x its election timeout, so a 1 s lease holds (docs/operations.md).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Process, READY_TIMEOUT};
use crate::{HarnessError, free_port};

pub struct Etcd {
    /// Runs in its temp dir: data (`data/`) and logs (`etcd-N.log`).
    process: Process,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts a one-member etcd (`ETCD_BIN` or /usr/bin/etcd) and waits until it serves
    /// requests. Panics (saying what to install) when it cannot.
    pub async fn start() -> Etcd {
        let bin = PathBuf::from(std::env::var("ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".into()));
        Self::try_start_with(&bin).await.unwrap_or_else(|e| panic!("etcd did not start: {e}"))
    }

    /// Starts `bin` as a one-member etcd.
    pub async fn try_start_with(bin: &std::path::Path) -> Result<Etcd, HarnessError> {
        if !bin.is_file() {
            return Err(HarnessError::NotInstalled(format!(
                "{} not found: install Debian's etcd-server (./scripts/test does)",
                bin.display()
            )));
        }
        // A free port can be taken between our probe and etcd's bind: retry with other ones.
        let mut last = String::new();
        for _ in 0..3 {
            let setup = |e: std::io::Error| HarnessError::Start(format!("etcd setup: {e}"));
            let dir = tempfile::Builder::new().prefix("etcd-").tempdir().map_err(setup)?;
            let (client_port, peer_port) = (free_port().map_err(setup)?, free_port().map_err(setup)?);
            let mut e = Etcd { process: Process::new("etcd", bin, dir), client_port, peer_port };
            match e.launch().await {
                Ok(()) => return Ok(e),
                Err(err) => last = err,
            }
        }
        Err(HarnessError::Start(last))
    }

    /// The client URL, for `discovery.etcd`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// SIGKILL (no clean shutdown), then waits for the process to exit.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Kills etcd and starts it again on the same ports and data dir (its keys and leases
    /// survive, as after a crash).
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch().await {
            panic!("etcd did not restart: {e}");
        }
    }

    /// Kills etcd and starts an empty one on the same ports: as if etcd lost its data (every
    /// key and lease gone, revisions start over).
    pub async fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.process.dir.path().join("data"));
        if let Err(e) = self.launch().await {
            panic!("etcd did not restart: {e}");
        }
    }

    async fn launch(&mut self) -> Result<(), String> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.process.bin);
        cmd.arg("--name")
            .arg("sandbox")
            .arg("--data-dir")
            .arg(self.process.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("sandbox={peer}")])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", "tandem-sandbox"])
            // A quick election after a restart; no metrics or debug listeners.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn"])
            .env_clear();
        self.process.spawn(cmd)?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.process.exited() {
                return Err(format!("etcd exited with {status}: {}", self.process.tail(20)));
            }
            if self.answers().await {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.process.kill();
                return Err(format!("etcd not ready within {READY_TIMEOUT:?}: {}", self.process.tail(20)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True once a linearizable read succeeds (a leader is elected and the member serves).
    async fn answers(&self) -> bool {
        let opts = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_millis(500)).with_timeout(Duration::from_secs(1));
        let Ok(mut c) = etcd_client::Client::connect([self.endpoint()], Some(opts)).await else { return false };
        c.get("/sandbox-probe", None).await.is_ok()
    }
}
