//! The command-line commands: `tandem cluster` (serve a node) and the client commands that talk
//! to a node or gateway over the public gRPC API (`collection`, `insert`, `search`, `info`).
//!
//! The client commands use the SDK (`tandem-client`) through [`client`]; the demo and the
//! benchmarks get the generated gRPC client on the same kind of connection from [`connect`].
//! Server errors reach the user as `error: <status message>`: the server's messages already
//! name the bad value, so nothing is added to them.

pub mod cluster;
pub mod collection;
pub mod failover;
pub mod gateway;
pub mod info;
pub mod insert;
pub mod query_node;
pub mod search;

use std::time::Duration;

use tandem_client::{Client, ClientError};
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;
use tonic::transport::Channel;

/// Where the client commands connect unless told otherwise (the cluster's default `listen`).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:19530";

/// Largest gRPC message sent or received: the server's default `limits.max_message_bytes`.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The `--endpoint` flag every client command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// gRPC address of a tandem cluster or gateway.
    #[arg(long, env = "TANDEM_ENDPOINT", default_value = DEFAULT_ENDPOINT, value_name = "URL")]
    pub endpoint: String,
}

/// Connects the SDK to a cluster or gateway. `endpoint` is a URL (`http://host:port`); a bare
/// `host:port` means plain-text `http://`. Fails fast (5 s) when nothing answers, rather than
/// on the first request. `session_token` (may be empty) starts the client's session, so reads
/// see the writes that token covers.
pub async fn client_with_session(endpoint: &str, session_token: &str) -> anyhow::Result<Client> {
    Ok(Client::builder(endpoint)
        .connect_timeout(Duration::from_secs(5))
        .max_message_bytes(MAX_MESSAGE_BYTES)
        .session_token(session_token)
        .connect()
        .await?)
}

/// [`client_with_session`] with a fresh session.
pub async fn client(endpoint: &str) -> anyhow::Result<Client> {
    client_with_session(endpoint, "").await
}

/// The generated gRPC client on a connection made as [`client`] makes it, for code that speaks
/// protobuf directly (the demo, the benchmarks).
pub async fn connect(endpoint: &str) -> anyhow::Result<TandemClient<tandem_client::Channel>> {
    Ok(client(endpoint).await?.raw())
}

/// A plain gRPC channel to a cluster (for its internal services, e.g. the switchover), made
/// as [`client`] connects: a bare `host:port` means `http://`, and nothing answering within
/// 5 s is an error naming the endpoint.
pub async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let ep = Channel::from_shared(url.clone()).map_err(|e| anyhow::anyhow!("{endpoint:?} is not a valid endpoint URL: {e}"))?;
    ep.connect_timeout(Duration::from_secs(5)).connect().await.map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e}"))
}

/// A server error as the user should see it: its message alone, which names the bad value.
/// (`tandem_client::ClientError` displays the same way.)
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    ClientError::from(s).into()
}

/// `client.call(..).await.rpc()?`: unwraps a reply, turning a status into [`status_error`].
pub trait RpcResult<T> {
    fn rpc(self) -> anyhow::Result<T>;
}

impl<T> RpcResult<T> for Result<tonic::Response<T>, tonic::Status> {
    fn rpc(self) -> anyhow::Result<T> {
        self.map(tonic::Response::into_inner).map_err(status_error)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for tandem_telemetry::tracing::LogFormat {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Text => tandem_telemetry::tracing::LogFormat::Text,
            LogFormat::Json => tandem_telemetry::tracing::LogFormat::Json,
        }
    }
}

/// Logs go to stderr (stdout carries command output); `RUST_LOG` overrides `default_filter`.
/// A second call is a no-op, so in-process callers (tests, the demo) may call it freely.
/// Commands that export traces use [`tandem_telemetry::tracing::init`] directly.
pub fn init_tracing(default_filter: &str, format: LogFormat) {
    // Without an OTLP endpoint nothing can fail, and the guard holds nothing.
    let _ = tandem_telemetry::tracing::init(default_filter, format.into(), "", "tandem");
}

/// Read consistency flags, shared by the read commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    /// What the read must see: strong (every acknowledged write), bounded (writes older than
    /// --staleness-ms), session (writes of --session-token) or eventually (whatever the replica has).
    #[arg(long, value_enum, default_value = "bounded")]
    pub consistency: Consistency,
    /// For bounded: how stale the data may be, in ms (0 = the server's default).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub staleness_ms: u64,
    /// A session token a write returned, to read your own writes.
    #[arg(long, value_name = "TOKEN", default_value = "", hide_default_value = true)]
    pub session_token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Consistency {
    Strong,
    Bounded,
    Session,
    Eventually,
}

impl Consistency {
    pub fn to_proto(self) -> pb::ConsistencyLevel {
        match self {
            Consistency::Strong => pb::ConsistencyLevel::Strong,
            Consistency::Bounded => pb::ConsistencyLevel::Bounded,
            Consistency::Session => pb::ConsistencyLevel::Session,
            Consistency::Eventually => pb::ConsistencyLevel::Eventually,
        }
    }
}

impl ReadArgs {
    /// The SDK's consistency for these flags (the session token starts the client's session).
    pub fn consistency(&self) -> tandem_client::Consistency {
        use tandem_client::Consistency as C;
        match self.consistency {
            Consistency::Strong => C::Strong,
            Consistency::Bounded => C::Bounded { staleness: Duration::from_millis(self.staleness_ms) },
            Consistency::Session => C::Session,
            Consistency::Eventually => C::Eventually,
        }
    }

    pub fn to_proto(&self) -> pb::ReadOptions {
        pb::ReadOptions {
            consistency: self.consistency.to_proto() as i32,
            session_token: self.session_token.clone(),
            staleness_ms: self.staleness_ms,
        }
    }
}

/// A payload value as a user would write it in a filter: strings quoted, numbers bare.
pub fn fmt_value(v: &pb::Value) -> String {
    use pb::value::Kind;
    match &v.kind {
        None => "null".into(),
        Some(Kind::Int64Value(x)) => x.to_string(),
        Some(Kind::DoubleValue(x)) => x.to_string(),
        Some(Kind::BoolValue(x)) => x.to_string(),
        Some(Kind::StringValue(x)) => format!("{x:?}"),
        Some(Kind::JsonValue(x)) => x.clone(),
    }
}

/// `a=1 b="x"`, fields sorted by name so output is stable.
pub fn fmt_payload(p: Option<&pb::Payload>) -> String {
    let Some(p) = p else { return String::new() };
    let mut fields: Vec<_> = p.fields.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    fields.iter().map(|(k, v)| format!("{k}={}", fmt_value(v))).collect::<Vec<_>>().join(" ")
}

pub fn payload_json(p: Option<&pb::Payload>) -> serde_json::Value {
    let map = p.map(|p| p.fields.iter().map(|(k, v)| (k.clone(), tandem_proto::json::value_to_json(v))).collect()).unwrap_or_default();
    serde_json::Value::Object(map)
}

/// A hybrid timestamp as UTC wall-clock time, e.g. `2025-03-01 12:00:00.250 UTC`.
pub fn fmt_ts(ts: u64) -> String {
    if ts == 0 {
        return "never".into();
    }
    let ms = tandem_cluster::ts::physical_ms(ts);
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Left-aligned columns, two spaces apart, headers first.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The optional Prometheus endpoint of a long-running command (`telemetry.metrics_listen`).
pub struct MetricsEndpoint(Option<(tokio_util::sync::CancellationToken, tandem_telemetry::metrics::MetricsServer)>);

impl MetricsEndpoint {
    /// Serves /metrics on `listen` (empty: none) and prints where, as `tandem <what> metrics on
    /// http://ADDR/metrics` (scripts and tests read that line; port 0 picks a free port).
    pub async fn start(listen: &str, what: &str) -> anyhow::Result<MetricsEndpoint> {
        if listen.is_empty() {
            return Ok(MetricsEndpoint(None));
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let m = tandem_telemetry::metrics::serve(listen, stop.clone()).await?;
        println!("tandem {what} metrics on http://{}/metrics", m.addr);
        Ok(MetricsEndpoint(Some((stop, m))))
    }

    /// Stops serving; called last at shutdown so metrics stay scrapeable while requests drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some((stop, m)) = self.0 {
            stop.cancel();
            m.task.await??;
        }
        Ok(())
    }
}

/// Waits for `stop` (a server draining its requests in flight), giving up after
/// `--drain-timeout` seconds or at a second signal. `tandem gateway` uses it (a cluster member bounds its own stop: `Member::stop`).
pub async fn drain<E>(stop: impl std::future::Future<Output = Result<(), E>>, drain_timeout: u64) -> anyhow::Result<()>
where
    anyhow::Error: From<E>,
{
    tokio::select! {
        r = stop => Ok(r?),
        () = tokio::time::sleep(std::time::Duration::from_secs(drain_timeout)) => {
            anyhow::bail!("shutdown did not finish within --drain-timeout {drain_timeout}s; exiting anyway")
        }
        s = cluster::shutdown_signal() => {
            anyhow::bail!("{} during shutdown; exiting without waiting for requests in flight", s?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_utc() {
        let ts = tandem_cluster::ts::compose(1_700_000_000_250, 3);
        assert_eq!(fmt_ts(ts), "2023-11-14 22:13:20.250 UTC");
        assert_eq!(fmt_ts(tandem_cluster::ts::compose(951_782_400_000, 0)), "2000-02-29 00:00:00.000 UTC");
        assert_eq!(fmt_ts(0), "never");
    }

    #[test]
    fn tables_align() {
        let t = table(&["id", "name"], &[vec!["1".into(), "x".into()], vec!["100".into(), "yy".into()]]);
        assert_eq!(t, "id   name\n1    x\n100  yy");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(3 << 20), "3.0 MiB");
    }
}
