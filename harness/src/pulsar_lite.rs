//! A pulsar-lite broker (Pulsar binary protocol, RocksDB storage, one process) on a free loopback
//! port.
//!
//! The broker runs in a temp dir with a config file that turns its Prometheus endpoint off (it
//! would listen on 0.0.0.0:8080 and collide between parallel tests) and raises its message size
//! limit to 80 MiB (the default, 5 MiB, is below the events of tandem's largest writes).
//!
//! Self-contained (std and `tempfile`, no Pulsar client): readiness is a hand-written Pulsar
//! handshake. `start` and `restart` block for up to 30 s while the broker comes up.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::Process;
use crate::{HarnessError, find_tool, free_port, with_retries};

pub struct PulsarLite {
    /// Runs in its temp dir, with its config, logs and `pl.db`.
    process: Process,
    port: u16,
}

impl PulsarLite {
    /// The broker's largest message: tandem's events go up to `limits.max_message_bytes` + 1 MiB.
    pub const MAX_MESSAGE_BYTES: usize = 80 << 20;

    /// Starts a broker with its own storage. Panics (saying what to install) when it cannot.
    pub fn start() -> PulsarLite {
        Self::start_with(Self::MAX_MESSAGE_BYTES)
    }

    /// Starts a broker whose message size limit is `max_message_bytes`. Panics when it cannot.
    pub fn start_with(max_message_bytes: usize) -> PulsarLite {
        let bin = Self::find().unwrap_or_else(|| panic!("{}", not_installed()));
        Self::try_start_with(&bin, max_message_bytes).unwrap_or_else(|e| panic!("pulsar-lite did not start: {e}"))
    }

    /// Starts `bin` as a broker whose message size limit is `max_message_bytes`.
    pub fn try_start_with(bin: &Path, max_message_bytes: usize) -> Result<PulsarLite, HarnessError> {
        with_retries(|| {
            let start = |e: std::io::Error| HarnessError::Start(format!("pulsar-lite setup: {e}"));
            let dir = tempfile::Builder::new().prefix("pulsar-lite-").tempdir().map_err(start)?;
            let config = format!("max_message_size_bytes = {max_message_bytes}\n\n[metrics]\nenabled = false\n");
            std::fs::write(dir.path().join("pulsar-lite.toml"), config).map_err(start)?;
            let mut b = PulsarLite { port: free_port().map_err(start)?, process: Process::new("pulsar-lite", bin, dir) };
            b.launch().map_err(HarnessError::Start)?;
            Ok(b)
        })
    }

    /// The pulsar-lite binary, if installed.
    pub fn find() -> Option<PathBuf> {
        find_tool("pulsar-lite").into_iter().next()
    }

    /// The service URL, `pulsar://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("pulsar://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the broker (SIGKILL: no clean shutdown) and waits for it to exit.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Kills the broker and starts it again on the same port with the same storage. Panics
    /// when it does not come back.
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    pub fn try_restart(&mut self) -> Result<(), HarnessError> {
        self.process.kill();
        self.launch().map_err(|e| HarnessError::Start(format!("pulsar-lite did not restart on port {}: {e}", self.port)))
    }

    /// The broker's output so far (all runs), for failure messages.
    pub fn log(&self) -> String {
        self.process.log()
    }

    fn launch(&mut self) -> Result<(), String> {
        let dir = self.process.dir.path();
        let mut cmd = Command::new(&self.process.bin);
        cmd.arg("--config")
            .arg(dir.join("pulsar-lite.toml"))
            .args(["--addr", &format!("127.0.0.1:{}", self.port)])
            .arg("--db-path")
            .arg(dir.join("pl.db"))
            .args(["--log-level", &std::env::var("PULSAR_LITE_LOG").unwrap_or_else(|_| "warn".into())]);
        self.process.spawn(cmd)?;
        let port = self.port;
        self.process.wait_ready(port, || handshake_probe(port))
    }
}

impl Drop for PulsarLite {
    fn drop(&mut self) {
        self.process.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- pulsar-lite on port {} (last lines of its log) ---", self.port);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// What to do when the binary is missing.
fn not_installed() -> HarnessError {
    HarnessError::NotInstalled(
        "the pulsar-lite broker is not installed (looked on PATH and in ~/.cache/tandem/tools/bin): \
         run scripts/install-pulsar-lite and try again"
            .into(),
    )
}

/// Whether the broker completes a Pulsar handshake (not only accepts connections): CONNECT,
/// then a CONNECTED reply. The protobuf is written by hand to keep this file dependency-free.
fn handshake_probe(port: u16) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    // CommandConnect { client_version (1) = "tandem-probe", protocol_version (4) = 19 }
    let version = b"tandem-probe";
    let mut connect = vec![0x0a, version.len() as u8];
    connect.extend(version);
    connect.extend([0x20, 19]);
    // BaseCommand { type (1) = CONNECT (2), connect (2) = ... }
    let mut cmd = vec![0x08, 2, 0x12, connect.len() as u8];
    cmd.extend(connect);
    let mut frame = ((cmd.len() + 4) as u32).to_be_bytes().to_vec();
    frame.extend((cmd.len() as u32).to_be_bytes());
    frame.extend(cmd);
    s.write_all(&frame).map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 8];
    s.read_exact(&mut head).map_err(|e| format!("receive: {e}"))?;
    let total = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if !(4..=1 << 20).contains(&total) {
        return Err(format!("implausible frame size {total}"));
    }
    let mut rest = vec![0u8; total - 4];
    s.read_exact(&mut rest).map_err(|e| format!("receive: {e}"))?;
    // The command starts with its type: field 1, varint.
    match rest.get(..2) {
        Some([0x08, 3]) => Ok(()),
        other => Err(format!("expected CONNECTED, got a command starting with {other:?}")),
    }
}
