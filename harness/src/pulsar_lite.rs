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
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{HarnessError, find_tool, free_port, with_retries};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct PulsarLite {
    bin: PathBuf,
    port: u16,
    /// The broker's cwd: its config, logs and `pl.db`.
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// How many times the broker was started, to name the log files.
    runs: u32,
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
            let mut b = PulsarLite { bin: bin.to_path_buf(), port: free_port().map_err(start)?, dir, child: None, runs: 0 };
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the broker and starts it again on the same port with the same storage. Panics
    /// when it does not come back.
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    pub fn try_restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.launch().map_err(|e| HarnessError::Start(format!("pulsar-lite did not restart on port {}: {e}", self.port)))
    }

    /// The broker's output so far (all runs), for failure messages.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for run in 1..=self.runs {
            if let Ok(s) = std::fs::read_to_string(self.log_path(run)) {
                out.push_str(&s);
            }
        }
        out
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("pulsar-lite-{run}.log"))
    }

    fn launch(&mut self) -> Result<(), String> {
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).map_err(|e| format!("pulsar-lite log: {e}"))?;
        let err_log = log.try_clone().map_err(|e| format!("pulsar-lite log: {e}"))?;
        let addr = format!("127.0.0.1:{}", self.port);
        let db = self.dir.path().join("pl.db");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(self.dir.path().join("pulsar-lite.toml"))
            .args(["--addr", &addr])
            .arg("--db-path")
            .arg(&db)
            .args(["--log-level", &std::env::var("PULSAR_LITE_LOG").unwrap_or_else(|_| "warn".into())])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        let child = cmd.spawn().map_err(|e| format!("running {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!("pulsar-lite exited with {status}; its output:\n{}", self.log()));
            }
            match handshake_probe(self.port) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(format!("pulsar-lite on port {} not ready after {READY_TIMEOUT:?} (last: {last}); its output:\n{}", self.port, self.log()))
    }
}

impl Drop for PulsarLite {
    fn drop(&mut self) {
        self.kill();
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
