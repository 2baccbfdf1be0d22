//! What the three servers share: a child process started in its temp dir, with a log file per
//! run, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer its probe after starting.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Process {
    /// Names the log files (`NAME-RUN.log`) and the errors.
    name: &'static str,
    pub(crate) bin: PathBuf,
    /// The server's cwd: its data and logs.
    pub(crate) dir: tempfile::TempDir,
    child: Option<Child>,
    /// How many times the server was started, to name the log files.
    runs: u32,
}

impl Process {
    pub(crate) fn new(name: &'static str, bin: &Path, dir: tempfile::TempDir) -> Process {
        Process { name, bin: bin.to_path_buf(), dir, child: None, runs: 0 }
    }

    /// Starts `cmd` (a command of `bin`) in the temp dir, its output to a new log file.
    pub(crate) fn spawn(&mut self, mut cmd: Command) -> Result<(), String> {
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).map_err(|e| format!("{} log: {e}", self.name))?;
        let err_log = log.try_clone().map_err(|e| format!("{} log: {e}", self.name))?;
        let child = cmd
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .map_err(|e| format!("running {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// How the process ended, once it has (it is forgotten then).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())?;
        self.child = None;
        Some(status)
    }

    /// Blocking: polls `probe` every 50 ms until it answers, the process exits, or
    /// [`READY_TIMEOUT`] passes (the process is killed then).
    pub(crate) fn wait_ready(&mut self, port: u16, probe: impl FnMut() -> Result<(), String>) -> Result<(), String> {
        self.wait_ready_within(port, READY_TIMEOUT, probe)
    }

    fn wait_ready_within(&mut self, port: u16, timeout: Duration, mut probe: impl FnMut() -> Result<(), String>) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Err(format!("{} exited with {status}; its output:\n{}", self.name, self.log()));
            }
            match probe() {
                // The answer may come from another server of the same kind that took the port
                // first (another test's, started at the same moment), while this one is still
                // failing to bind it: then it is not ready, it is about to exit.
                Ok(()) if !self.owns_listener(port) => last = format!("port {port} answers, but from another process"),
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(format!("{} on port {port} not ready after {timeout:?} (last: {last}); its output:\n{}", self.name, self.log()))
    }

    /// Whether the process holds the socket listening on `port` (Linux's `/proc`: the
    /// listening socket's inode among its file descriptors). True where `/proc` cannot tell.
    fn owns_listener(&self, port: u16) -> bool {
        let Some(pid) = self.child.as_ref().map(Child::id) else { return false };
        let inodes = listening_inodes(port);
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return inodes.is_none() };
        let Some(inodes) = inodes else { return true };
        fds.flatten().filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|link| {
            let link = link.to_string_lossy();
            link.strip_prefix("socket:[").and_then(|l| l.strip_suffix(']')).is_some_and(|i| inodes.iter().any(|n| n == i))
        })
    }

    /// SIGKILL (no clean shutdown), then waits for the process to exit.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's output so far (all runs), for failure messages.
    pub(crate) fn log(&self) -> String {
        let mut out = String::new();
        for run in 1..=self.runs {
            if let Ok(s) = std::fs::read_to_string(self.log_path(run)) {
                out.push_str(&s);
            }
        }
        out
    }

    /// The last `n` lines of the current run's output.
    pub(crate) fn tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(self.log_path(self.runs)).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("{}-{run}.log", self.name))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The inodes of the TCP sockets listening on `port` (IPv4 and IPv6), from `/proc/net`; `None`
/// where it cannot be read.
fn listening_inodes(port: u16) -> Option<Vec<String>> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        read_any = true;
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            if f.len() > 9 && f[3] == LISTEN && local_port == Some(port) {
                out.push(f[9].to_string());
            }
        }
    }
    read_any.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers on a port another process listens on is not taken for ready.
    #[test]
    fn a_listener_is_owned_only_by_the_process_that_holds_it() {
        let mine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = mine.local_addr().unwrap().port();
        let inodes = listening_inodes(port).expect("/proc/net/tcp is readable here");
        assert_eq!(inodes.len(), 1, "one listener on {port}");
        // A child that listens on nothing does not own this process's listener.
        let mut p = Process::new("sleep", Path::new("sleep"), tempfile::tempdir().unwrap());
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        p.spawn(cmd).unwrap();
        assert!(!p.owns_listener(port));
        let e = p.wait_ready_within(port, Duration::from_millis(300), || Ok(())).unwrap_err();
        assert!(e.contains("answers, but from another process"), "{e}");
        drop(mine);
        p.kill();

        // A child listening itself owns its listener.
        let mut p = Process::new("listener", Path::new("python3"), tempfile::tempdir().unwrap());
        let mut cmd = Command::new("python3");
        cmd.args(["-c", "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\nprint(s.getsockname()[1],flush=True)\ntime.sleep(30)"]);
        p.spawn(cmd).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let port: u16 = loop {
            if let Ok(port) = p.tail(1).trim().parse() {
                break port;
            }
            assert!(Instant::now() < deadline, "the listener printed no port: {}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(p.owns_listener(port));
        p.wait_ready_within(port, Duration::from_secs(5), || Ok(())).unwrap();
    }
}
