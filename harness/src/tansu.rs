//! A tansu broker (Kafka-compatible, one process) on a free loopback port.
//!
//! Storage is sqlite (`sqlite://tansu.db` in a temp dir) in both modes: tansu 0.6's `memory://`
//! engine mishandles batches of several records (the high watermark counts one per batch, and a
//! fetch from an offset inside a batch returns nothing), and a producer batches whatever is
//! queued. A non-durable broker starts from an empty database on every `restart`.
//!
//! Self-contained (std and `tempfile`, no Kafka client): readiness is a hand-written Kafka
//! Metadata request. `start` and `restart` block for up to 30 s while the broker comes up: fine in
//! `#[tokio::test]`, whose runtime has nothing else to do then; async code uses `spawn_blocking`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::Process;
use crate::{HarnessError, find_tool, free_port, with_retries};

const VERSION: &str = "0.6.0";

pub struct Tansu {
    /// Runs in its temp dir, with its logs and `tansu.db`.
    process: Process,
    port: u16,
    durable: bool,
}

impl Tansu {
    /// Starts a broker; a `durable` one keeps its log across `restart`. Panics (saying what to
    /// install) when it cannot.
    pub fn start(durable: bool) -> Tansu {
        Self::try_start(durable).unwrap_or_else(|e| panic!("tansu did not start: {e}"))
    }

    /// [`Tansu::start`], with the binary [`Tansu::find`] finds.
    pub fn try_start(durable: bool) -> Result<Tansu, HarnessError> {
        let bin = Self::find().ok_or_else(|| {
            HarnessError::NotInstalled(
                "the tansu broker is not installed (looked on PATH and in ~/.cache/tandem/tools/bin): \
                 run scripts/install-tansu (about 10 minutes) and try again"
                    .into(),
            )
        })?;
        Self::try_start_with(&bin, durable)
    }

    /// Starts `bin` as the broker.
    pub fn try_start_with(bin: &Path, durable: bool) -> Result<Tansu, HarnessError> {
        with_retries(|| {
            let dir = tempfile::Builder::new().prefix("tansu-").tempdir().map_err(|e| HarnessError::Start(format!("temp dir: {e}")))?;
            let port = free_port().map_err(|e| HarnessError::Start(format!("free port: {e}")))?;
            let mut t = Tansu { process: Process::new("tansu", bin, dir), port, durable };
            t.launch().map_err(HarnessError::Start)?;
            Ok(t)
        })
    }

    /// The tansu binary: the first of version 0.6.0 (the tests were written against it), else
    /// the first found, with a warning.
    pub fn find() -> Option<PathBuf> {
        let found = find_tool("tansu");
        if let Some(p) = found.iter().find(|p| version_of(p).as_deref() == Some(VERSION)) {
            return Some(p.clone());
        }
        let p = found.into_iter().next()?;
        eprintln!("warning: {} is not tansu {VERSION}; tests were written against {VERSION}", p.display());
        Some(p)
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Kills the broker (SIGKILL: no clean shutdown) and waits for it to exit.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Kills the broker and starts it again on the same port, with the same storage when
    /// durable and an empty one otherwise. Panics when it does not come back.
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    pub fn try_restart(&mut self) -> Result<(), HarnessError> {
        self.process.kill();
        self.launch().map_err(|e| HarnessError::Start(format!("tansu did not restart on port {}: {e}", self.port)))
    }

    /// The broker's output so far (all runs), for failure messages.
    pub fn log(&self) -> String {
        self.process.log()
    }

    fn launch(&mut self) -> Result<(), String> {
        let dir = self.process.dir.path();
        if !self.durable {
            for f in ["tansu.db", "tansu.db-wal", "tansu.db-shm"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // sqlite paths must be relative (an absolute one is mangled): the cwd is the temp dir.
        let storage = "sqlite://tansu.db";
        let mut cmd = Command::new(&self.process.bin);
        cmd.arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", storage])
            // tansu 0.6 opens no other port; these would turn on schema validation or tracing
            // export if the environment happened to set them.
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()));
        self.process.spawn(cmd)?;
        let port = self.port;
        self.process.wait_ready(port, || metadata_probe(port))
    }
}

fn version_of(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().last().map(str::to_string)
}

/// Whether the broker answers a Kafka Metadata request naming itself (not only accepts
/// connections): ApiVersions to pick a Metadata version we can encode, then Metadata.
fn metadata_probe(port: u16) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;

    // ApiVersions v0: empty body; the answer lists (api key, min version, max version).
    let body = call(&mut s, 18, 0, 1, &[])?;
    let mut r = Reader(&body);
    let error = r.i16()?;
    if error != 0 {
        return Err(format!("api versions error {error}"));
    }
    let mut metadata = None;
    for _ in 0..r.i32()? {
        let (key, min, max) = (r.i16()?, r.i16()?, r.i16()?);
        if key == 3 {
            metadata = Some((min, max));
        }
    }
    // v1..=v8 share the classic (non-flexible) encoding.
    let (min, max) = metadata.ok_or("broker lists no Metadata api")?;
    let version = max.min(8);
    if version < min.max(1) {
        return Err(format!("broker supports Metadata v{min}..v{max}, the probe speaks v1..v8"));
    }
    let mut req = (-1i32).to_be_bytes().to_vec(); // all topics
    if version >= 4 {
        req.push(0); // allow_auto_topic_creation
    }
    if version >= 8 {
        req.extend([0, 0]); // include cluster / topic authorized operations
    }
    let body = call(&mut s, 3, version, 2, &req)?;
    let mut r = Reader(&body);
    if version >= 3 {
        r.i32()?; // throttle_time_ms
    }
    for _ in 0..r.i32()? {
        let (_node, _host, broker_port) = (r.i32()?, r.string()?, r.i32()?);
        r.string()?; // rack (nullable)
        if broker_port == i32::from(port) {
            return Ok(());
        }
    }
    Err("metadata does not list the broker yet".into())
}

/// Sends one request (header v1) and returns the response body after its correlation id.
fn call(s: &mut TcpStream, api_key: i16, version: i16, correlation: i32, body: &[u8]) -> Result<Vec<u8>, String> {
    let client_id = b"tandem-test-probe";
    let mut msg = Vec::new();
    msg.extend(api_key.to_be_bytes());
    msg.extend(version.to_be_bytes());
    msg.extend(correlation.to_be_bytes());
    msg.extend((client_id.len() as i16).to_be_bytes());
    msg.extend(client_id);
    msg.extend(body);
    let mut framed = (msg.len() as i32).to_be_bytes().to_vec();
    framed.extend(msg);
    s.write_all(&framed).map_err(|e| format!("send: {e}"))?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| format!("receive: {e}"))?;
    let len = usize::try_from(i32::from_be_bytes(len)).map_err(|_| "negative response length")?;
    if !(4..=(64 << 20)).contains(&len) {
        return Err(format!("implausible response length {len}"));
    }
    let mut resp = vec![0u8; len];
    s.read_exact(&mut resp).map_err(|e| format!("receive: {e}"))?;
    let got = i32::from_be_bytes([resp[0], resp[1], resp[2], resp[3]]);
    if got != correlation {
        return Err(format!("correlation id {got}, expected {correlation}"));
    }
    Ok(resp.split_off(4))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        if self.0.len() < N {
            return Err("short response".into());
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().unwrap())
    }
    fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(self.take()?))
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(self.take()?))
    }
    /// A (nullable) string; its content is not needed.
    fn string(&mut self) -> Result<(), String> {
        let len = self.i16()?;
        let len = usize::try_from(len).unwrap_or(0);
        if self.0.len() < len {
            return Err("short response".into());
        }
        self.0 = &self.0[len..];
        Ok(())
    }
}
