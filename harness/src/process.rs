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
    pub(crate) fn wait_ready(&mut self, port: u16, mut probe: impl FnMut() -> Result<(), String>) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Err(format!("{} exited with {status}; its output:\n{}", self.name, self.log()));
            }
            match probe() {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(format!("{} on port {port} not ready after {READY_TIMEOUT:?} (last: {last}); its output:\n{}", self.name, self.log()))
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
