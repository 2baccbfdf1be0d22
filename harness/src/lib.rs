//! The real servers tandem runs against, started for tests and benches: a tansu broker (Kafka
//! protocol), a pulsar-lite broker (Pulsar protocol) and a one-member etcd, each on free loopback
//! ports in a temp dir, ready (answering its protocol, not only accepting connections) when
//! `start` returns, killed on drop.
//!
//! ```no_run
//! let mut broker = tandem_harness::Tansu::start(true); // durable: keeps its log across restart()
//! let brokers = broker.brokers();                      // "127.0.0.1:PORT"
//! broker.restart();                                    // SIGKILL, then the same port and storage
//! ```
//!
//! `start` panics with what to install when a binary is missing (tests must not skip);
//! `try_start` returns a [`HarnessError`] instead, for `tandem bench`. Binaries come from `PATH` or
//! `$HOME/.cache/tandem/tools/bin`, where `scripts/install-tansu` and `scripts/install-pulsar-lite`
//! put them; etcd is Debian's `/usr/bin/etcd` (`ETCD_BIN` overrides).

mod etcd;
mod process;
mod pulsar_lite;
mod tansu;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

pub use etcd::Etcd;
pub use pulsar_lite::PulsarLite;
pub use tansu::Tansu;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The server's binary is not there; the message says how to install it.
    #[error("{0}")]
    NotInstalled(String),
    /// It did not start or did not become ready (with its log's tail).
    #[error("{0}")]
    Start(String),
}

impl HarnessError {
    /// A start can fail because another process took the free port first: trying again helps.
    /// A missing binary stays missing.
    pub fn is_transient(&self) -> bool {
        matches!(self, HarnessError::Start(_))
    }
}

/// A port free on 127.0.0.1 now (another process may take it before the server binds it, which
/// is why every `start` tries up to three ports).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// `name` on `PATH`, then in `$HOME/.cache/tandem/tools/bin`: every match, in that order.
fn find_tool(name: &str) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cache/tandem/tools/bin").join(name));
    }
    candidates.into_iter().filter(|p| p.is_file()).collect()
}

/// Up to three attempts of `launch`, each on fresh ports (see [`free_port`]).
fn with_retries<T>(mut launch: impl FnMut() -> Result<T, HarnessError>) -> Result<T, HarnessError> {
    let mut last = launch();
    for _ in 1..3 {
        match &last {
            Err(e) if e.is_transient() => last = launch(),
            _ => break,
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_start_is_tried_three_times_and_a_missing_binary_once() {
        let mut calls = 0;
        let r: Result<(), _> = with_retries(|| {
            calls += 1;
            Err(HarnessError::Start(format!("port taken ({calls})")))
        });
        assert_eq!((calls, r.unwrap_err().to_string()), (3, "port taken (3)".to_string()));

        let mut calls = 0;
        let r: Result<(), _> = with_retries(|| {
            calls += 1;
            Err(HarnessError::NotInstalled("run scripts/install-tansu".into()))
        });
        assert_eq!((calls, r.unwrap_err().to_string()), (1, "run scripts/install-tansu".to_string()));

        let mut calls = 0;
        let r = with_retries(|| {
            calls += 1;
            if calls < 2 { Err(HarnessError::Start("port taken".into())) } else { Ok(calls) }
        });
        assert_eq!(r.unwrap(), 2);
    }

    #[test]
    fn a_missing_etcd_binary_is_named() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(Etcd::try_start_with(Path::new("/nonexistent/etcd"))).err().unwrap();
        assert!(!e.is_transient());
        assert_eq!(e.to_string(), "/nonexistent/etcd not found: install Debian's etcd-server (./scripts/test does)");
    }
}
