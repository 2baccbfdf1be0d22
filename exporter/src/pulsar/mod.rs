//! Pulsar backend of the replication [`Transport`], on tandem's own binary-protocol client.
//!
//! ```text
//!  stream                      topic (non-partitioned, one per shard)                  key   value
//!  DDL of group G              persistent://{tenant}/{namespace}/{prefix}.G.ddl        "0"   ChangeEvent (protobuf)
//!  shard S of collection C     persistent://{tenant}/{namespace}/{prefix}.G.c{C}.s{S}  "S"   ChangeEvent (protobuf)
//! ```
//!
//! Every message carries the property `tandem-lsn` (the event's position, decimal) and the event
//! time of the event's physical clock (`ts >> 18`, ms). docs/pulsar.md is the reference.
//!
//! Why a client of our own: the `pulsar` crate's consumer cannot read from pulsar-lite (the
//! broker the tests run): its decoder requires the optional magic number + CRC32C in message
//! frames, which pulsar-lite leaves out. What tandem needs is a small part of the protocol
//! (connect, lookup, produce with receipts, non-durable readers from a message id, last message
//! id), so `conn.rs` speaks it directly, on `frames.proto`: tandem's own declaration of just
//! those commands, with the protocol's field numbers and types.
//!
//! Guarantees and how they are kept:
//! - no acknowledged event is lost: `publish` returns once the broker sent a receipt for every
//!   event of the call (a receipt means the entry is persisted);
//! - order per shard: one topic per shard, one producer per topic, sends of one call pipelined
//!   on one connection (the broker persists a producer's messages in order);
//! - fencing: every event carries the leader's epoch and subscribers reject older epochs;
//! - positions are tandem's own (`lsn`), not message ids: `subscribe` finds the first message
//!   holding `lsn >= from_lsn` by binary search over the topic's entries (lsns never decrease
//!   along the topic), and readers are non-durable: nothing is acknowledged to the broker.

mod conn;

#[allow(clippy::all, clippy::pedantic, missing_docs, dead_code)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/pulsar.proto.rs"));
}

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures::StreamExt;
use prost::Message as _;
use serde::Deserialize;
use tandem_proto::replication::v1::ChangeEvent;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::error::{ExportError, Result};
use crate::transport::{EventStream, StreamId, Transport, check_event, decode_event, is_tick};
use conn::{Conn, ConnError, Delivery};
use pb::base_command::Type;

const BACKEND: &str = "pulsar";

/// Name of the message property that holds the event's position (decimal string).
pub const LSN_PROPERTY: &str = "tandem-lsn";

/// Room for an event's fields around its rows.
const EVENT_OVERHEAD: usize = 1 << 20;

/// Messages a live subscription lets the broker push ahead (each up to a chunk's size).
const TAIL_PERMITS: u32 = 256;

/// The broker's message size limit when it does not say (Pulsar's default `maxMessageSize`;
/// pulsar-lite 0.2 does not send it, and refuses frames above it whatever its configuration).
const DEFAULT_MAX_MESSAGE_SIZE: usize = 5 << 20;
/// Room for a chunk's command and metadata within the broker's limit.
const CHUNK_HEADROOM: usize = 64 << 10;

/// `[replication.pulsar]` of the configuration, as the transport uses it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PulsarConfig {
    /// `pulsar://host:port` or `pulsar+ssl://host:port`.
    pub service_url: String,
    /// Replication group id; part of every topic name.
    pub group: String,
    pub tenant: String,
    pub namespace: String,
    /// First part of every topic name.
    pub topic_prefix: String,
    /// Token authentication (the `token` auth method); empty: none.
    pub auth_token: String,
    /// PEM file of the CAs that sign the brokers' certificates (pulsar+ssl://); empty: the
    /// system's roots.
    pub tls_trust_certs_file: String,
    /// Bound on one lookup, subscription or search round trip, in milliseconds.
    pub timeout_ms: u64,
    /// How long `publish` waits for the broker's receipts before failing, in milliseconds.
    pub send_timeout_ms: u64,
    /// The largest event, in bytes (one shard's part of the largest accepted write plus its
    /// framing). An event above the broker's `maxMessageSize` is refused with a clear error.
    pub max_event_bytes: u32,
}

impl Default for PulsarConfig {
    fn default() -> Self {
        PulsarConfig {
            service_url: String::new(),
            group: String::new(),
            tenant: "public".into(),
            namespace: "default".into(),
            topic_prefix: "tandem".into(),
            auth_token: String::new(),
            tls_trust_certs_file: String::new(),
            timeout_ms: 10_000,
            send_timeout_ms: 30_000,
            max_event_bytes: (64 << 20) + EVENT_OVERHEAD as u32,
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A parsed service URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    host: String,
    port: u16,
    tls: bool,
}

fn parse_url(url: &str) -> std::result::Result<Endpoint, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("pulsar+ssl://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("pulsar://") {
        (false, r)
    } else {
        return Err(format!("{url:?} does not start with pulsar:// or pulsar+ssl://"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains(',') {
        return Err(format!("{url:?} lists several hosts: give one service URL (a load balancer or one broker)"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => (h, p.parse::<u16>().map_err(|_| format!("{url:?} has a bad port {p:?}"))?),
        _ if !rest.is_empty() && !rest.contains(':') => (rest, if tls { 6651 } else { 6650 }),
        _ => return Err(format!("{url:?} has no host")),
    };
    Ok(Endpoint { host: host.trim_start_matches('[').trim_end_matches(']').to_string(), port, tls })
}

impl PulsarConfig {
    /// The transport of a cluster from its `[replication]` settings and its largest accepted
    /// message (`limits.max_message_bytes`). Empty values keep their defaults. Reads the token
    /// file if one is configured.
    pub fn from_settings(group: &str, s: &tandem_cluster::config::PulsarSettings, max_message_bytes: usize) -> Result<PulsarConfig> {
        let d = PulsarConfig::default();
        let or = |v: &String, d: &String| if v.is_empty() { d.clone() } else { v.clone() };
        let auth_token = if !s.auth_token_file.is_empty() {
            std::fs::read_to_string(&s.auth_token_file)
                .map_err(|e| ExportError::Config(format!("replication.pulsar.auth_token_file {:?}: {e}", s.auth_token_file)))?
                .trim()
                .to_string()
        } else {
            s.auth_token.clone()
        };
        Ok(PulsarConfig {
            service_url: s.service_url.clone(),
            group: group.to_string(),
            tenant: or(&s.tenant, &d.tenant),
            namespace: or(&s.namespace, &d.namespace),
            topic_prefix: or(&s.topic_prefix, &d.topic_prefix),
            auth_token,
            tls_trust_certs_file: s.tls_trust_certs_file.clone(),
            max_event_bytes: max_message_bytes.saturating_add(EVENT_OVERHEAD).min(u32::MAX as usize) as u32,
            ..d
        })
    }

    /// Rejects configurations that could not work, naming the bad value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ExportError::Config(m));
        if self.service_url.trim().is_empty() {
            return bad("pulsar service_url is empty: set it to pulsar://host:6650 or pulsar+ssl://host:6651".into());
        }
        let ep = parse_url(self.service_url.trim()).map_err(|e| ExportError::Config(format!("pulsar service_url {e}")))?;
        if !ep.tls && !self.tls_trust_certs_file.is_empty() {
            return bad(format!("pulsar tls_trust_certs_file is set but service_url {:?} is not TLS: use pulsar+ssl://", self.service_url));
        }
        if !self.tls_trust_certs_file.is_empty() && !std::path::Path::new(&self.tls_trust_certs_file).is_file() {
            return bad(format!("pulsar tls_trust_certs_file {:?} is not a readable file", self.tls_trust_certs_file));
        }
        for (what, value) in
            [("group", &self.group), ("topic_prefix", &self.topic_prefix), ("tenant", &self.tenant), ("namespace", &self.namespace)]
        {
            if value.is_empty() {
                return bad(format!("pulsar {what} is empty: it is part of every topic name"));
            }
            if let Some(c) = value.chars().find(|&c| !is_name_char(c)) {
                return bad(format!("pulsar {what} {value:?} contains {c:?}: use only ASCII letters, digits, '.', '_' and '-'"));
            }
        }
        if self.auth_token.chars().any(char::is_whitespace) {
            return bad("pulsar auth_token contains whitespace".into());
        }
        if self.timeout_ms == 0 {
            return bad("pulsar timeout_ms is 0".into());
        }
        if self.send_timeout_ms == 0 {
            return bad("pulsar send_timeout_ms is 0".into());
        }
        if self.max_event_bytes < 1 << 16 {
            return bad(format!("pulsar max_event_bytes {} is below 65536", self.max_event_bytes));
        }
        Ok(())
    }

    /// The topic that holds `stream`.
    pub fn topic(&self, stream: &StreamId) -> String {
        let base = format!("persistent://{}/{}/{}.{}", self.tenant, self.namespace, self.topic_prefix, self.group);
        match stream {
            StreamId::Ddl => format!("{base}.ddl"),
            StreamId::Shard { collection_id, shard } => format!("{base}.c{collection_id}.s{shard}"),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn unavailable(message: impl std::fmt::Display) -> ExportError {
    ExportError::Unavailable { backend: BACKEND, message: message.to_string() }
}

/// A connection-level error in context. Broker refusals that no retry can fix (authentication,
/// authorization, a topic that cannot exist) are configuration errors; everything else
/// (broker down, restarting, overloaded, timeouts) is `Unavailable`, which is transient.
fn conn_error(context: impl std::fmt::Display, e: ConnError) -> ExportError {
    use pb::ServerError as S;
    match &e {
        ConnError::Server { code: S::AuthenticationError | S::AuthorizationError, .. } => {
            ExportError::Config(format!("{context}: {e} (check replication.pulsar.auth_token)"))
        }
        ConnError::Server { code: S::InvalidTopicName | S::TopicNotFound | S::IncompatibleSchema, .. } => {
            ExportError::Config(format!("{context}: {e}"))
        }
        _ => unavailable(format!("{context}: {e}")),
    }
}

/// A message id: (ledger, entry), -1 meaning "before the first" as in Pulsar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Id {
    ledger: i64,
    entry: i64,
}

impl Id {
    const EARLIEST: Id = Id { ledger: -1, entry: -1 };

    fn of(m: &pb::MessageIdData) -> Id {
        Id { ledger: m.ledger_id as i64, entry: m.entry_id as i64 }
    }

    fn data(self) -> pb::MessageIdData {
        pb::MessageIdData { ledger_id: self.ledger as u64, entry_id: self.entry as u64, ..Default::default() }
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.ledger, self.entry)
    }
}

/// One entry read from a topic: its id and what it holds (several events for a batch written by
/// another producer; tandem writes one event per entry).
struct Entry {
    id: Id,
    events: Vec<std::result::Result<ChangeEvent, (String, Option<String>)>>,
}

fn lsn_of(props: &[pb::KeyValue]) -> Option<String> {
    props.iter().find(|p| p.key == LSN_PROPERTY).map(|p| p.value.clone())
}

/// One chunk of a message split with Pulsar's chunking (an event above the broker's message
/// size).
struct Chunk {
    id: Id,
    uuid: String,
    chunk_id: i32,
    chunks: i32,
    total: i32,
    data: Bytes,
    lsn: Option<String>,
}

/// What one entry of a topic holds.
enum Piece {
    Whole(Entry),
    Chunk(Chunk),
}

fn decode_piece(stream: &StreamId, id: Id, body: Bytes) -> Piece {
    match conn::parse_body(body.clone()) {
        Ok((meta, data)) if meta.num_chunks_from_msg.is_some_and(|n| n > 1) => Piece::Chunk(Chunk {
            id,
            uuid: meta.uuid.clone().unwrap_or_default(),
            chunk_id: meta.chunk_id.unwrap_or(0),
            chunks: meta.num_chunks_from_msg.unwrap_or(1),
            total: meta.total_chunk_msg_size.unwrap_or(0),
            data,
            lsn: lsn_of(&meta.properties),
        }),
        _ => Piece::Whole(decode_entry(stream, id, body)),
    }
}

/// Puts chunked messages back together. Chunks of one message are consecutive (one producer
/// per topic, and tandem's producer sends a message's chunks back to back). A message whose
/// chunks stop before the last one is dropped with a warning: that is what a publish retried
/// after a lost connection leaves behind, and the retry wrote the whole message again after
/// it. Chunks of a message that started before the reader's start are ignored (they belong to
/// an earlier position).
#[derive(Default)]
struct Assembler {
    partial: Option<(Chunk, bytes::BytesMut)>,
}

impl Assembler {
    /// Feeds one entry; returns the complete entries it ends (malformed ones included).
    fn feed(&mut self, stream: &StreamId, piece: Piece) -> Vec<Entry> {
        let mut out = Vec::new();
        let abandon = |partial: Option<(Chunk, bytes::BytesMut)>, _: &mut Vec<Entry>| {
            if let Some((first, _)) = partial {
                warn!(%stream, uuid = %first.uuid, id = %first.id, "dropping an incomplete chunked pulsar message (a retried publish)");
            }
        };
        match piece {
            Piece::Whole(e) => {
                abandon(self.partial.take(), &mut out);
                out.push(e);
            }
            Piece::Chunk(c) if c.chunk_id == 0 => {
                abandon(self.partial.take(), &mut out);
                let mut buf = bytes::BytesMut::with_capacity(usize::try_from(c.total).unwrap_or(0).min(1 << 30));
                buf.extend_from_slice(&c.data);
                self.partial = Some((c, buf));
            }
            Piece::Chunk(c) => match self.partial.take() {
                Some((first, mut buf)) if first.uuid == c.uuid => {
                    buf.extend_from_slice(&c.data);
                    if c.chunk_id + 1 == first.chunks {
                        let e = match decode_event(stream, &buf) {
                            Ok(ev) if i32::try_from(buf.len()).ok() == Some(first.total) => Entry { id: first.id, events: vec![Ok(ev)] },
                            Ok(_) => Entry {
                                id: first.id,
                                events: vec![Err((
                                    format!("chunked message {} has {} bytes, not {}", first.uuid, buf.len(), first.total),
                                    first.lsn,
                                ))],
                            },
                            Err(problem) => Entry { id: first.id, events: vec![Err((problem, first.lsn))] },
                        };
                        out.push(e);
                    } else {
                        self.partial = Some((first, buf));
                    }
                }
                Some(other) => {
                    abandon(Some(other), &mut out);
                }
                // The rest of a message that started before this reader's start.
                None => {}
            },
        }
        out
    }
}

/// Decodes a message body into the events it holds; a problem is reported with the
/// `tandem-lsn` property if there is one.
fn decode_entry(stream: &StreamId, id: Id, body: Bytes) -> Entry {
    let events = match conn::parse_body(body) {
        Err(e) => vec![Err((e, None))],
        Ok((meta, _)) if meta.compression() != pb::CompressionType::None => {
            vec![Err((format!("compressed ({}) messages are not supported", meta.compression().as_str_name()), lsn_of(&meta.properties)))]
        }
        Ok((meta, payload)) if meta.num_messages_in_batch.is_none() => {
            vec![decode_event(stream, &payload).map_err(|e| (e, lsn_of(&meta.properties)))]
        }
        Ok((meta, mut payload)) => {
            // A batch (written by another producer): [size][SingleMessageMetadata][payload]...
            let mut out = Vec::new();
            for _ in 0..meta.num_messages_in_batch.unwrap_or(1).max(0) {
                if payload.len() < 4 {
                    out.push(Err(("truncated batch".to_string(), None)));
                    break;
                }
                let n = payload.get_u32() as usize;
                let Some(single) = (payload.len() >= n).then(|| payload.split_to(n)) else {
                    out.push(Err(("truncated batch".to_string(), None)));
                    break;
                };
                let Ok(single) = pb::SingleMessageMetadata::decode(single) else {
                    out.push(Err(("bad batch entry metadata".to_string(), None)));
                    break;
                };
                let size = usize::try_from(single.payload_size).unwrap_or(usize::MAX);
                if payload.len() < size {
                    out.push(Err(("truncated batch".to_string(), lsn_of(&single.properties))));
                    break;
                }
                let p = payload.split_to(size);
                out.push(decode_event(stream, &p).map_err(|e| (e, lsn_of(&single.properties))));
            }
            out
        }
    };
    Entry { id, events }
}

/// A producer on one topic, on the connection of the broker that owns the topic.
struct Producer {
    conn: Arc<Conn>,
    id: u64,
    name: String,
    next_seq: u64,
}

impl Producer {
    /// Its connection died or the broker closed it: a new one is needed.
    fn is_gone(&self) -> bool {
        self.conn.is_closed() || self.conn.producer_closed(self.id)
    }
}

struct Inner {
    cfg: PulsarConfig,
    tls: Option<tokio_rustls::TlsConnector>,
    /// Connections by broker URL (the service URL's, and those lookups point to).
    conns: tokio::sync::Mutex<HashMap<String, Arc<Conn>>>,
    /// One producer per topic; publishing to a topic holds its lock (order, sequence ids).
    producers: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Producer>>>>>,
}

/// The Pulsar [`Transport`].
pub struct PulsarTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PulsarTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut cfg = self.inner.cfg.clone();
        if !cfg.auth_token.is_empty() {
            cfg.auth_token = "<redacted>".into();
        }
        f.debug_struct("PulsarTransport").field("cfg", &cfg).finish_non_exhaustive()
    }
}

fn tls_connector(cfg: &PulsarConfig) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if cfg.tls_trust_certs_file.is_empty() {
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(ExportError::Config(
                "pulsar+ssl: the system has no CA certificates: set replication.pulsar.tls_trust_certs_file".into(),
            ));
        }
    } else {
        let certs = CertificateDer::pem_file_iter(&cfg.tls_trust_certs_file)
            .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| ExportError::Config(format!("pulsar tls_trust_certs_file {:?}: {e}", cfg.tls_trust_certs_file)))?;
        if certs.is_empty() {
            return Err(ExportError::Config(format!("pulsar tls_trust_certs_file {:?} holds no certificate", cfg.tls_trust_certs_file)));
        }
        for c in certs {
            roots.add(c).map_err(|e| ExportError::Config(format!("pulsar tls_trust_certs_file {:?}: {e}", cfg.tls_trust_certs_file)))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ExportError::Config(format!("pulsar TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

impl PulsarTransport {
    /// Validates `cfg` and prepares the client. Connecting is lazy: a broker that is down makes
    /// the calls fail with `Unavailable`, not this constructor.
    pub fn new(cfg: PulsarConfig) -> Result<Self> {
        cfg.validate()?;
        let ep = parse_url(cfg.service_url.trim()).map_err(ExportError::Config)?;
        let tls = if ep.tls { Some(tls_connector(&cfg)?) } else { None };
        info!(service_url = %cfg.service_url, group = %cfg.group, prefix = %cfg.topic_prefix, "pulsar transport ready");
        Ok(PulsarTransport { inner: Arc::new(Inner { cfg, tls, conns: Default::default(), producers: Default::default() }) })
    }

    pub fn config(&self) -> &PulsarConfig {
        &self.inner.cfg
    }

    /// Publishes raw payloads to `stream`'s topic as they are, with `tandem-lsn` properties when
    /// given: for tests and tools that need what a foreign producer could write (garbage,
    /// events of another stream).
    pub async fn publish_raw(&self, stream: &StreamId, payloads: Vec<(Vec<u8>, Option<u64>)>) -> Result<()> {
        let out = payloads
            .into_iter()
            .enumerate()
            .map(|(i, (payload, lsn))| Outgoing { payload, lsn, key: "raw".into(), event_time: None, what: format!("raw message {i}") })
            .collect();
        self.inner.send(&self.inner.cfg.topic(stream), out).await
    }
}

impl Inner {
    async fn connect(&self, url: &str) -> Result<Conn> {
        let ep = parse_url(url).map_err(|e| unavailable(format!("broker url {e}")))?;
        let timeout = self.cfg.timeout();
        let what = || format!("connecting to {url}");
        let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)))
            .await
            .map_err(|_| unavailable(format!("{}: timed out", what())))?
            .map_err(|e| unavailable(format!("{}: {e}", what())))?;
        // Sends are small and latency-bound: Nagle would hold them behind delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn conn::Io> = if ep.tls {
            let Some(tls) = &self.tls else {
                return Err(ExportError::Config(format!("broker {url} needs TLS but service_url is not pulsar+ssl://")));
            };
            let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                .map_err(|e| ExportError::Config(format!("broker host {:?}: {e}", ep.host)))?;
            let s = tokio::time::timeout(timeout, tls.connect(name, tcp))
                .await
                .map_err(|_| unavailable(format!("{}: TLS handshake timed out", what())))?
                .map_err(|e| unavailable(format!("{}: TLS: {e}", what())))?;
            Box::new(s)
        } else {
            Box::new(tcp)
        };
        let token = (!self.cfg.auth_token.is_empty()).then_some(self.cfg.auth_token.as_str());
        let c = Conn::handshake(io, token, timeout).await.map_err(|e| conn_error(what(), e))?;
        debug!(url, server = %c.server_version, max_message_size = ?c.max_message_size, "connected to pulsar broker");
        Ok(c)
    }

    /// The live connection to `url`, opened if need be.
    async fn conn(&self, url: &str) -> Result<Arc<Conn>> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(url)
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let c = Arc::new(self.connect(url).await?);
        conns.insert(url.to_string(), c.clone());
        Ok(c)
    }

    /// The connection to the broker that serves `topic` (LOOKUP, following redirects).
    async fn topic_conn(&self, topic: &str) -> Result<Arc<Conn>> {
        let service = self.cfg.service_url.trim().to_string();
        let tls = self.tls.is_some();
        let (mut url, mut authoritative) = (service.clone(), false);
        for _ in 0..8 {
            let c = self.conn(&url).await?;
            let request_id = c.next_id();
            let lookup = pb::CommandLookupTopic { topic: topic.to_string(), request_id, authoritative: Some(authoritative) };
            let cmd = pb::BaseCommand { lookup_topic: Some(lookup), ..base(Type::Lookup) };
            let reply = c.request(request_id, cmd, self.cfg.timeout()).await.map_err(|e| conn_error(format!("looking up {topic}"), e))?;
            let r = reply.lookup_topic_response.unwrap_or_default();
            let target = if tls { r.broker_service_url_tls.clone() } else { r.broker_service_url.clone() };
            use pb::command_lookup_topic_response::LookupType as L;
            match r.response() {
                L::Failed => {
                    let code = r.error.unwrap_or(pb::ServerError::UnknownError as i32);
                    let message = r.message.unwrap_or_default();
                    let e = ConnError::Server { code: pb::ServerError::try_from(code).unwrap_or(pb::ServerError::UnknownError), message };
                    return Err(conn_error(format!("looking up {topic}"), e));
                }
                // Through a proxy, everything goes over the service URL's connection.
                L::Connect if r.proxy_through_service_url() => return Ok(c),
                L::Connect => match target {
                    Some(t) if !t.is_empty() && t != url => return self.conn(&t).await,
                    _ => return Ok(c),
                },
                L::Redirect => {
                    url = target.filter(|t| !t.is_empty()).ok_or_else(|| unavailable(format!("lookup of {topic} redirects nowhere")))?;
                    authoritative = r.authoritative();
                }
            }
        }
        Err(unavailable(format!("lookup of {topic} redirected too many times")))
    }

    fn producer_slot(&self, topic: &str) -> Arc<tokio::sync::Mutex<Option<Producer>>> {
        self.producers.lock().entry(topic.to_string()).or_default().clone()
    }

    async fn create_producer(&self, topic: &str) -> Result<Producer> {
        let c = self.topic_conn(topic).await?;
        let (producer_id, request_id) = (c.next_id(), c.next_id());
        let p = pb::CommandProducer { topic: topic.to_string(), producer_id, request_id, ..Default::default() };
        let cmd = pb::BaseCommand { producer: Some(p), ..base(Type::Producer) };
        let reply =
            c.request(request_id, cmd, self.cfg.timeout()).await.map_err(|e| conn_error(format!("creating a producer on {topic}"), e))?;
        let ok = reply.producer_success.ok_or_else(|| unavailable(format!("creating a producer on {topic}: no PRODUCER_SUCCESS")))?;
        // Continue the broker's sequence for this producer name (it deduplicates by it when
        // deduplication is on).
        let next_seq = u64::try_from(ok.last_sequence_id.unwrap_or(-1).saturating_add(1)).unwrap_or(0);
        debug!(topic, name = %ok.producer_name, next_seq, "pulsar producer ready");
        Ok(Producer { conn: c, id: producer_id, name: ok.producer_name, next_seq })
    }

    fn close_producer(p: &Producer) {
        p.conn.forget_producer(p.id, "producer closed");
        let request_id = p.conn.next_id();
        let cmd = pb::BaseCommand {
            close_producer: Some(pb::CommandCloseProducer { producer_id: p.id, request_id }),
            ..base(Type::CloseProducer)
        };
        let _ = p.conn.send_frame(conn::simple_frame(&cmd));
    }

    /// A non-durable reader of `topic` positioned after `after` (`Id::EARLIEST`: from the
    /// first message), with `permits` messages allowed ahead.
    async fn open_reader(&self, topic: &str, after: Id, permits: u32) -> Result<Reader> {
        // "Before entry 0 of the first ledger" is the earliest position; pulsar-lite refuses
        // an entry of -1 with a real ledger id (and closes the connection).
        let after = if after.entry < 0 && after.ledger <= 0 { Id::EARLIEST } else { after };
        let c = self.topic_conn(topic).await?;
        let (consumer_id, request_id) = (c.next_id(), c.next_id());
        let rx = c.register_consumer(consumer_id).map_err(|e| conn_error(format!("subscribing to {topic}"), e))?;
        // Unique in the process, not per transport: clusters of one process (the demo, tests)
        // each have a transport, and two readers of one topic under one name collide
        // ("Exclusive subscription already has a consumer").
        static READERS: AtomicU64 = AtomicU64::new(0);
        let n = READERS.fetch_add(1, Ordering::Relaxed);
        let sub = pb::CommandSubscribe {
            topic: topic.to_string(),
            subscription: format!("tandem-reader-{}-{n}", std::process::id()),
            sub_type: pb::command_subscribe::SubType::Exclusive as i32,
            consumer_id,
            request_id,
            durable: Some(false),
            start_message_id: Some(after.data()),
            initial_position: Some(pb::command_subscribe::InitialPosition::Earliest as i32),
            read_compacted: Some(false),
            ..Default::default()
        };
        let cmd = pb::BaseCommand { subscribe: Some(sub), ..base(Type::Subscribe) };
        let reader = Reader { conn: c.clone(), id: consumer_id, rx, unflowed: 0, permits, after };
        if let Err(e) = c.request(request_id, cmd, self.cfg.timeout()).await {
            drop(reader);
            return Err(conn_error(format!("subscribing to {topic} after {after}"), e));
        }
        if permits > 0 {
            reader.flow(permits)?;
        }
        Ok(reader)
    }

    /// The id of the last message of `topic`, `None` when it has none.
    async fn last_id(&self, topic: &str) -> Result<Option<Id>> {
        let r = self.open_reader(topic, Id::EARLIEST, 0).await?;
        let request_id = r.conn.next_id();
        let cmd = pb::BaseCommand {
            get_last_message_id: Some(pb::CommandGetLastMessageId { consumer_id: r.id, request_id }),
            ..base(Type::GetLastMessageId)
        };
        let reply = match r.conn.request(request_id, cmd, self.cfg.timeout()).await {
            // pulsar-lite answers an empty topic with an error rather than an entry id of -1.
            Err(ConnError::Server { message, .. }) if message.contains("no messages") => return Ok(None),
            r => r.map_err(|e| conn_error(format!("last message of {topic}"), e))?,
        };
        let last =
            reply.get_last_message_id_response.ok_or_else(|| unavailable(format!("last message of {topic}: empty reply")))?.last_message_id;
        let id = Id::of(&last);
        Ok((id.entry >= 0 && id.ledger >= 0).then_some(id))
    }

    /// The first well-formed event that starts after `after` and ends at or before `end`, with
    /// the id of its (first) entry. Reads with one short-lived reader: `end` exists, so the
    /// broker has messages to send.
    async fn event_after(&self, stream: &StreamId, topic: &str, after: Id, end: Id) -> Result<Option<(Id, ChangeEvent)>> {
        if after >= end {
            return Ok(None);
        }
        let mut r = self.open_reader(topic, after, 4).await?;
        let mut asm = Assembler::default();
        loop {
            let (id, body) = match r.probe(self.cfg.timeout()).await {
                None => return Err(unavailable(format!("timed out reading {topic} after {after}"))),
                Some(Delivery::Closed(why)) => return Err(unavailable(format!("reading {topic} after {after}: {why}"))),
                Some(Delivery::Message { id, body }) => (Id::of(&id), body),
            };
            if id > end {
                return Ok(None);
            }
            for e in asm.feed(stream, decode_piece(stream, id, body)) {
                if let Some(ev) = e.events.into_iter().find_map(|r| r.ok()) {
                    return Ok(Some((e.id, ev)));
                }
            }
            if id == end {
                return Ok(None);
            }
        }
    }

    /// What the entry `id` is: `Some(true)` when a message starts there (a whole message or a
    /// first chunk), `Some(false)` for a later chunk, `None` when it does not exist.
    async fn starts_message(&self, stream: &StreamId, topic: &str, id: Id) -> Result<Option<bool>> {
        let mut r = self.open_reader(topic, Id { ledger: id.ledger, entry: id.entry - 1 }, PROBE_PERMITS).await?;
        match r.probe(self.cfg.timeout()).await {
            None => Err(unavailable(format!("timed out reading {topic} at {id}"))),
            Some(Delivery::Closed(why)) => Err(unavailable(format!("reading {topic} at {id}: {why}"))),
            Some(Delivery::Message { id: got, body }) if Id::of(&got) == id => match decode_piece(stream, id, body) {
                Piece::Chunk(c) => Ok(Some(c.chunk_id == 0)),
                Piece::Whole(_) => Ok(Some(true)),
            },
            Some(Delivery::Message { .. }) => Ok(None),
        }
    }

    /// Where to start reading `stream` (after which id) for events with `lsn >= from_lsn`, or
    /// `Truncated` when the topic no longer holds `from_lsn`.
    ///
    /// `pred(e)` = "the first well-formed event at or after entry `e` has `lsn >= from_lsn`" is
    /// monotonic because lsns never decrease along the topic, so the start is a binary search
    /// over the entries of a ledger, one short-lived reader per probe. A topic that spans several
    /// ledgers (a real Pulsar cluster rolls them over) is searched within its last ledger when
    /// the position is there, and read from its start otherwise (the subscription skips what
    /// precedes the position). pulsar-lite keeps one ledger per topic.
    async fn locate(&self, stream: &StreamId, topic: &str, from_lsn: u64) -> Result<(Id, bool)> {
        let Some(last) = self.last_id(topic).await? else {
            // Empty: whether a gap hides here shows with the first event, which the stream checks.
            return Ok((Id::EARLIEST, true));
        };
        let Some((first_id, first)) = self.event_after(stream, topic, Id::EARLIEST, last).await? else {
            // Nothing but malformed messages: deliver them; the stream checks the first event.
            return Ok((Id::EARLIEST, true));
        };
        // A tick repeats the position of the change before it: if the topic starts with a tick
        // at position p, change p is gone.
        let available = if is_tick(&first) { first.lsn + 1 } else { first.lsn };
        if from_lsn.max(1) < available {
            return Err(ExportError::Truncated { stream: stream.to_string(), lsn: from_lsn, first: available });
        }
        if first.lsn >= from_lsn {
            return Ok((Id::EARLIEST, true));
        }
        let ledger = last.ledger;
        let mut lo = if first_id.ledger == ledger {
            first_id.entry + 1
        } else {
            match self.event_after(stream, topic, Id { ledger, entry: -1 }, last).await? {
                Some((id, ev)) if ev.lsn < from_lsn => id.entry + 1,
                _ => {
                    debug!(%stream, from_lsn, "position before the topic's last ledger: reading from the start");
                    return Ok((Id::EARLIEST, false));
                }
            }
        };
        let mut hi = last.entry + 1;
        // Where the position would be if every entry since the first held a distinct change
        // (exact on a shard without ticks): try it first.
        let guess = first_id.entry.saturating_add(i64::try_from(from_lsn - first.lsn).unwrap_or(i64::MAX));
        let mut hints = vec![guess.saturating_sub(1), guess];
        let mut probes = 0;
        while lo < hi {
            let mid = match hints.pop() {
                Some(h) if (lo..hi).contains(&h) => h,
                _ => lo + (hi - lo) / 2,
            };
            probes += 1;
            match self.event_after(stream, topic, Id { ledger, entry: mid - 1 }, last).await? {
                Some((id, ev)) if ev.lsn < from_lsn => lo = id.entry + 1,
                _ => hi = mid,
            }
        }
        debug!(%stream, from_lsn, start = lo, probes, "located start entry");
        Ok((Id { ledger, entry: lo - 1 }, true))
    }

    /// Position of the last well-formed event of `stream`.
    async fn last_lsn(&self, stream: &StreamId, topic: &str) -> Result<u64> {
        let Some(last) = self.last_id(topic).await? else { return Ok(0) };
        // Backwards to the last message that starts in the last ledger and holds a well-formed
        // event (malformed messages are rare: one or two reads each).
        let mut entry = last.entry;
        while entry >= 0 {
            let id = Id { ledger: last.ledger, entry };
            if self.starts_message(stream, topic, id).await? == Some(true)
                && let Some((at, ev)) = self.event_after(stream, topic, Id { ledger: last.ledger, entry: entry - 1 }, last).await?
                && at == id
            {
                // A batch (foreign producers) holds several events: the last one counts.
                return Ok(self.last_in_entry(stream, topic, id).await?.unwrap_or(ev.lsn));
            }
            entry -= 1;
        }
        // Nothing usable in the last ledger: read the earlier ones from the start.
        let mut after = Id::EARLIEST;
        let mut found = 0;
        let before_last = Id { ledger: last.ledger, entry: -1 };
        while let Some((id, ev)) = self.event_after(stream, topic, after, before_last).await? {
            found = ev.lsn;
            after = id;
        }
        Ok(found)
    }

    /// The last well-formed event of a batch entry, when `id` is a batch.
    async fn last_in_entry(&self, stream: &StreamId, topic: &str, id: Id) -> Result<Option<u64>> {
        let mut r = self.open_reader(topic, Id { ledger: id.ledger, entry: id.entry - 1 }, PROBE_PERMITS).await?;
        match r.probe(self.cfg.timeout()).await {
            Some(Delivery::Message { id: got, body }) if Id::of(&got) == id => match decode_piece(stream, id, body) {
                Piece::Whole(e) => Ok(e.events.iter().rev().find_map(|r| r.as_ref().ok()).map(|ev| ev.lsn)),
                Piece::Chunk(_) => Ok(None),
            },
            _ => Ok(None),
        }
    }
}

fn base(t: Type) -> pb::BaseCommand {
    pb::BaseCommand { r#type: t as i32, ..Default::default() }
}

/// One message to send.
struct Outgoing {
    payload: Vec<u8>,
    /// Becomes the `tandem-lsn` property.
    lsn: Option<u64>,
    key: String,
    event_time: Option<u64>,
    /// What it is, for errors.
    what: String,
}

impl Inner {
    /// Sends `msgs` in order on the topic's producer, pipelined, and waits for every receipt.
    /// A lost connection (broker restart, failover) is retried on a new producer from the
    /// first message without a receipt, until `send_timeout_ms`: messages may be written twice,
    /// which subscribers skip by position, never out of order or with a hole (the broker
    /// persists one producer's messages in order).
    async fn send(&self, topic: &str, msgs: Vec<Outgoing>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.send_timeout_ms);
        let mut done = 0;
        let mut attempt = 0u32;
        loop {
            match self.send_once(topic, &msgs[done..], &mut done, deadline).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    attempt += 1;
                    debug!(topic, attempt, error = %e, "pulsar publish: retrying");
                    tokio::time::sleep(Duration::from_millis((25u64 << attempt.min(5)).min(1000))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt of `send`; `done` counts the messages with a receipt.
    async fn send_once(&self, topic: &str, msgs: &[Outgoing], done: &mut usize, deadline: Instant) -> Result<()> {
        if msgs.is_empty() {
            return Ok(());
        }
        let slot = self.producer_slot(topic);
        let mut guard = slot.lock().await;
        if guard.as_ref().is_none_or(Producer::is_gone) {
            *guard = Some(self.create_producer(topic).await?);
        }
        let Some(p) = guard.as_mut() else { unreachable!("set above") };
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut pending = VecDeque::with_capacity(msgs.len());
        let result: Result<()> = async {
            for m in msgs {
                if m.payload.len() > self.cfg.max_event_bytes as usize {
                    return Err(ExportError::Config(format!(
                        "{} is {} bytes, above max_event_bytes ({})",
                        m.what,
                        m.payload.len(),
                        self.cfg.max_event_bytes
                    )));
                }
                // Above the broker's limit, the message goes in chunks (Pulsar's chunking: the
                // same metadata on every chunk plus uuid, chunk id, count and total size).
                let limit = p.conn.max_message_size.unwrap_or(DEFAULT_MAX_MESSAGE_SIZE).saturating_sub(CHUNK_HEADROOM).max(1024);
                let chunks = m.payload.len().div_ceil(limit).max(1);
                let uuid = format!("{}-{}", p.name, p.next_seq);
                for (i, part) in m.payload.chunks(limit).chain(m.payload.is_empty().then_some(&[][..])).enumerate() {
                    let seq = p.next_seq;
                    let mut meta = pb::MessageMetadata {
                        producer_name: p.name.clone(),
                        sequence_id: seq,
                        publish_time: now_ms,
                        properties: m.lsn.map(|l| pb::KeyValue { key: LSN_PROPERTY.into(), value: l.to_string() }).into_iter().collect(),
                        partition_key: Some(m.key.clone()),
                        event_time: m.event_time,
                        ..Default::default()
                    };
                    if chunks > 1 {
                        meta.uuid = Some(uuid.clone());
                        meta.chunk_id = Some(i as i32);
                        meta.num_chunks_from_msg = Some(chunks as i32);
                        meta.total_chunk_msg_size = Some(m.payload.len() as i32);
                    }
                    let cmd = pb::BaseCommand {
                        send: Some(pb::CommandSend {
                            producer_id: p.id,
                            sequence_id: seq,
                            num_messages: Some(1),
                            is_chunk: Some(chunks > 1),
                            ..Default::default()
                        }),
                        ..base(Type::Send)
                    };
                    let receipt = p.conn.expect_receipt(p.id, seq).map_err(|e| conn_error(format!("publishing {}", m.what), e))?;
                    p.conn
                        .send_frame(conn::payload_frame(&cmd, &meta, part))
                        .map_err(|e| conn_error(format!("publishing {}", m.what), e))?;
                    p.next_seq += 1;
                    // A message is done once its last chunk has its receipt.
                    pending.push_back((&m.what, i + 1 == chunks, receipt));
                }
            }
            while let Some((what, last_chunk, receipt)) = pending.pop_front() {
                match tokio::time::timeout_at(deadline.into(), receipt).await {
                    Err(_) => return Err(unavailable(format!("publishing {what}: no receipt within {} ms", self.cfg.send_timeout_ms))),
                    Ok(Err(_)) => return Err(unavailable(format!("publishing {what}: connection closed"))),
                    Ok(Ok(Err(e))) => return Err(conn_error(format!("publishing {what}"), e)),
                    Ok(Ok(Ok(_id))) => *done += usize::from(last_chunk),
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = &result {
            warn!(topic, error = %e, "pulsar publish failed");
            // The next call starts on a fresh producer: this one may have a failed send in its
            // pipeline, and the broker may have closed it.
            if let Some(p) = guard.take() {
                Inner::close_producer(&p);
            }
        }
        result
    }
}

/// Permits of a reader that wants the one entry after its start: two, because pulsar-lite
/// delivers the start entry itself first (dropped by [`Reader::next`]), so with one permit the
/// wanted entry would wait on a second FLOW.
const PROBE_PERMITS: u32 = 2;

/// How long a probe waits in silence before it sends the broker another permit.
const PROBE_NUDGE: Duration = Duration::from_millis(500);

/// A non-durable subscription (Pulsar's reader); closed on drop.
struct Reader {
    conn: Arc<Conn>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Delivery>,
    /// Messages received since the last FLOW.
    unflowed: u32,
    permits: u32,
    /// The last message delivered (at first: the position it was opened after). Anything at or
    /// before it is dropped: Apache Pulsar starts a non-durable subscription after its start
    /// message id but pulsar-lite *at* it (Pulsar's own clients drop it the same way), and
    /// pulsar-lite 0.2 sometimes dispatches a few entries twice.
    after: Id,
}

impl Reader {
    fn flow(&self, permits: u32) -> Result<()> {
        let cmd = pb::BaseCommand { flow: Some(pb::CommandFlow { consumer_id: self.id, message_permits: permits }), ..base(Type::Flow) };
        self.conn.send_frame(conn::simple_frame(&cmd)).map_err(|e| unavailable(format!("flow: {e}")))
    }

    /// The next delivery, topping the broker's permits up once half are used.
    async fn next(&mut self) -> Delivery {
        let d = loop {
            match self.rx.recv().await {
                None => break Delivery::Closed("connection closed".into()),
                Some(Delivery::Message { id, .. }) if Id::of(&id) <= self.after => {
                    // Its permit is spent: give it back.
                    if let Err(e) = self.flow(1) {
                        break Delivery::Closed(e.to_string());
                    }
                }
                Some(Delivery::Message { id, body }) => {
                    self.after = Id::of(&id);
                    break Delivery::Message { id, body };
                }
                Some(d) => break d,
            }
        };
        if matches!(d, Delivery::Message { .. }) {
            self.unflowed += 1;
            if self.unflowed >= self.permits / 2 {
                if let Err(e) = self.flow(self.unflowed) {
                    return Delivery::Closed(e.to_string());
                }
                self.unflowed = 0;
            }
        }
        d
    }
}

impl Reader {
    /// The next delivery of a short-lived reader of entries known to exist, `None` after
    /// `within` of silence. Every [`PROBE_NUDGE`] of silence sends one more permit: CI once saw
    /// a probe wait out its whole timeout (10 s) for an entry the topic held, under load, and a
    /// FLOW is what makes pulsar-lite 0.2 dispatch again; a permit too many costs a reader that
    /// is dropped after a few entries nothing. (A live subscription needs no nudge: every
    /// publish on its topic starts a dispatch.)
    async fn probe(&mut self, within: Duration) -> Option<Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let wait = PROBE_NUDGE.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            // Cancel-safe: `next` changes state only after a delivery arrived.
            match tokio::time::timeout(wait, self.next()).await {
                Ok(d) => return Some(d),
                Err(_) if tokio::time::Instant::now() >= deadline => return None,
                Err(_) => {
                    debug!(consumer = self.id, after = %self.after, "pulsar probe silent: one more permit");
                    if let Err(e) = self.flow(1) {
                        return Some(Delivery::Closed(e.to_string()));
                    }
                }
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.conn.forget_consumer(self.id);
        let request_id = self.conn.next_id();
        let cmd = pb::BaseCommand {
            close_consumer: Some(pb::CommandCloseConsumer { consumer_id: self.id, request_id }),
            ..base(Type::CloseConsumer)
        };
        let _ = self.conn.send_frame(conn::simple_frame(&cmd));
    }
}

#[async_trait::async_trait]
impl Transport for PulsarTransport {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn needs_publisher(&self) -> bool {
        true
    }

    /// Creates the stream's topics (one per shard) by attaching their producers: the broker
    /// creates a topic when a producer attaches (namespace auto-creation, Pulsar's default;
    /// otherwise create the topics beforehand). Idempotent and cancel-safe.
    async fn ensure_stream(&self, stream: &StreamId, shards: u32) -> Result<()> {
        let streams: Vec<StreamId> = match stream {
            StreamId::Ddl => vec![StreamId::Ddl],
            StreamId::Shard { collection_id, .. } => {
                if shards == 0 {
                    return Err(ExportError::Config(format!("stream {stream} needs at least one shard")));
                }
                (0..shards).map(|shard| StreamId::Shard { collection_id: *collection_id, shard }).collect()
            }
        };
        for s in streams {
            let topic = self.inner.cfg.topic(&s);
            let slot = self.inner.producer_slot(&topic);
            let mut p = slot.lock().await;
            if p.as_ref().is_none_or(Producer::is_gone) {
                *p = Some(self.inner.create_producer(&topic).await?);
                info!(%topic, "pulsar topic ready");
            }
        }
        Ok(())
    }

    /// Sends the events in order on the topic's producer, pipelined, and waits for every
    /// receipt. Not cancel-safe (see the trait): a cancelled call may have published a prefix.
    async fn publish(&self, stream: &StreamId, events: Vec<ChangeEvent>) -> Result<()> {
        for ev in &events {
            check_event(stream, ev).map_err(|message| ExportError::Malformed { stream: stream.to_string(), position: ev.lsn, message })?;
        }
        let key = match stream {
            StreamId::Ddl => "0".to_string(),
            StreamId::Shard { shard, .. } => shard.to_string(),
        };
        let out = events
            .iter()
            .map(|ev| Outgoing {
                payload: ev.encode_to_vec(),
                lsn: Some(ev.lsn),
                key: key.clone(),
                event_time: Some(ev.ts >> 18),
                what: format!("position {} of stream {stream}", ev.lsn),
            })
            .collect();
        self.inner.send(&self.inner.cfg.topic(stream), out).await
    }

    /// Finds the start entry (a few short reads), then streams from it. Cancel-safe.
    ///
    /// The stream yields `Malformed` for a message that is not a valid event of this stream and
    /// goes on with the next one; its `position` is that of the last event before it and its
    /// message names the Pulsar message id. `Truncated` ends the stream when the first event is
    /// past `from_lsn` (a gap). Connection losses (broker restarts) are retried by the stream
    /// itself, from the message after the last one received, and only logged.
    async fn subscribe(&self, stream: &StreamId, from_lsn: u64) -> Result<EventStream> {
        let topic = self.inner.cfg.topic(stream);
        let (start, exact) = self.inner.locate(stream, &topic, from_lsn).await?;
        debug!(%stream, from_lsn, %start, "pulsar subscription starts");
        let reader = self.inner.open_reader(&topic, start, TAIL_PERMITS).await?;
        let tail = Tail {
            inner: self.inner.clone(),
            stream: *stream,
            topic,
            reader: Some(reader),
            after: start,
            asm: Assembler::default(),
            skip_before: !exact,
            want: from_lsn.max(1),
            checking: true,
            last_lsn: from_lsn.max(1) - 1,
            held: Vec::new(),
            ready: VecDeque::new(),
            failures: 0,
            done: false,
        };
        Ok(futures::stream::unfold(tail, Tail::next).boxed())
    }

    async fn end_lsn(&self, stream: &StreamId) -> Result<u64> {
        let topic = self.inner.cfg.topic(stream);
        self.inner.last_lsn(stream, &topic).await
    }
}

/// State of a live subscription.
struct Tail {
    inner: Arc<Inner>,
    stream: StreamId,
    topic: String,
    reader: Option<Reader>,
    /// Id of the last entry received: where to resume after a reconnection.
    after: Id,
    asm: Assembler,
    /// The first position the subscriber needs.
    want: u64,
    /// Until the change at `want` arrives: events before it are skipped, anything past it
    /// means the topic has a gap there.
    checking: bool,
    /// Position of the last event delivered (`want - 1` before the first).
    last_lsn: u64,
    /// The search could not find the exact start (a topic spanning ledgers): events before
    /// `want` are skipped. Otherwise everything after the start is delivered, ticks repeating
    /// `want - 1` included, as with the other backends.
    skip_before: bool,
    /// Malformed messages met while skipping, delivered if no skipped event follows them (a
    /// malformed message just before the start is reported, not skipped unseen).
    held: Vec<ExportError>,
    ready: VecDeque<Result<ChangeEvent>>,
    /// Consecutive failed reconnections (backoff).
    failures: u32,
    done: bool,
}

impl Tail {
    fn malformed(&self, id: Id, problem: String, lsn: Option<String>) -> ExportError {
        let prop = lsn.map(|l| format!(", {LSN_PROPERTY} property {l:?}")).unwrap_or_default();
        let message = format!("pulsar message {}@{id}{prop}: {problem}", self.topic);
        warn!(stream = %self.stream, after = self.last_lsn, %message, "malformed pulsar message");
        ExportError::Malformed { stream: self.stream.to_string(), position: self.last_lsn, message }
    }

    /// Takes in one entry's events; false when the stream must end (`ready` holds the error).
    fn take_in(&mut self, entry: Entry) -> bool {
        for r in entry.events {
            match r {
                Err((problem, lsn)) => {
                    let e = self.malformed(entry.id, problem, lsn);
                    if self.checking {
                        self.held.push(e);
                    } else {
                        self.ready.push_back(Err(e));
                    }
                }
                Ok(ev) => {
                    if self.checking {
                        if ev.lsn < self.want && self.skip_before {
                            // Before the start (the search stopped short, across ledgers).
                            self.held.clear();
                            continue;
                        }
                        let gap = if is_tick(&ev) { ev.lsn >= self.want } else { ev.lsn > self.want };
                        if gap {
                            let first = if is_tick(&ev) { ev.lsn + 1 } else { ev.lsn };
                            warn!(stream = %self.stream, want = self.want, id = %entry.id, lsn = ev.lsn, "pulsar topic has a gap before the wanted position");
                            self.ready.extend(self.held.drain(..).map(Err));
                            self.ready.push_back(Err(ExportError::Truncated { stream: self.stream.to_string(), lsn: self.want, first }));
                            return false;
                        }
                        if !is_tick(&ev) && ev.lsn == self.want {
                            self.checking = false;
                        }
                        self.ready.extend(self.held.drain(..).map(Err));
                    }
                    self.last_lsn = self.last_lsn.max(ev.lsn);
                    self.ready.push_back(Ok(ev));
                }
            }
        }
        true
    }

    async fn next(mut self) -> Option<(Result<ChangeEvent>, Tail)> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some((r, self));
            }
            if self.done {
                return None;
            }
            let Some(reader) = self.reader.as_mut() else {
                // Reconnect after the last entry received, with a backoff of up to 2 s.
                if self.failures > 0 {
                    tokio::time::sleep(Duration::from_millis((50u64 << self.failures.min(5)).min(2000))).await;
                }
                match self.inner.open_reader(&self.topic, self.after, TAIL_PERMITS).await {
                    Ok(r) => {
                        info!(stream = %self.stream, after = %self.after, "pulsar subscription resumed");
                        self.reader = Some(r);
                        self.failures = 0;
                    }
                    Err(e) if e.is_transient() => {
                        self.failures += 1;
                        debug!(stream = %self.stream, error = %e, "pulsar subscription: reconnecting");
                    }
                    Err(e) => {
                        self.done = true;
                        return Some((Err(e), self));
                    }
                }
                continue;
            };
            match reader.next().await {
                Delivery::Closed(why) => {
                    warn!(stream = %self.stream, reason = %why, "pulsar subscription lost its connection; resuming");
                    self.reader = None;
                    self.failures = 1;
                }
                Delivery::Message { id, body } => {
                    let id = Id::of(&id);
                    self.after = id;
                    let piece = decode_piece(&self.stream, id, body);
                    for entry in self.asm.feed(&self.stream, piece) {
                        if !self.take_in(entry) {
                            self.done = true;
                            self.reader = None;
                            break;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PulsarConfig {
        PulsarConfig { service_url: "pulsar://127.0.0.1:6650".into(), group: "g1".into(), ..PulsarConfig::default() }
    }

    #[test]
    fn topic_names() {
        let c = cfg();
        assert_eq!(c.topic(&StreamId::Ddl), "persistent://public/default/tandem.g1.ddl");
        assert_eq!(c.topic(&StreamId::Shard { collection_id: 42, shard: 3 }), "persistent://public/default/tandem.g1.c42.s3");
    }

    #[test]
    fn service_urls() {
        assert_eq!(parse_url("pulsar://h:1").unwrap(), Endpoint { host: "h".into(), port: 1, tls: false });
        assert_eq!(parse_url("pulsar+ssl://h").unwrap(), Endpoint { host: "h".into(), port: 6651, tls: true });
        assert_eq!(parse_url("pulsar://h/").unwrap().port, 6650);
        assert!(parse_url("http://h:1").unwrap_err().contains("pulsar://"));
        assert!(parse_url("pulsar://a:1,b:2").unwrap_err().contains("several hosts"));
        assert!(parse_url("pulsar://h:x").unwrap_err().contains("port"));
        assert!(parse_url("pulsar://").is_err());
    }

    #[test]
    fn validation_names_the_bad_value() {
        cfg().validate().unwrap();
        let msg = |c: PulsarConfig| c.validate().unwrap_err().to_string();
        assert!(msg(PulsarConfig { service_url: " ".into(), ..cfg() }).contains("service_url is empty"));
        assert!(msg(PulsarConfig { service_url: "kafka://x:1".into(), ..cfg() }).contains("service_url"));
        assert!(msg(PulsarConfig { group: "".into(), ..cfg() }).contains("group is empty"));
        assert!(msg(PulsarConfig { namespace: "a/b".into(), ..cfg() }).contains("namespace \"a/b\" contains '/'"));
        assert!(msg(PulsarConfig { tls_trust_certs_file: "/x.pem".into(), ..cfg() }).contains("not TLS"));
        let tls = PulsarConfig { service_url: "pulsar+ssl://h:6651".into(), tls_trust_certs_file: "/nonexistent.pem".into(), ..cfg() };
        assert!(msg(tls).contains("tls_trust_certs_file"));
        assert!(msg(PulsarConfig { auth_token: "a b".into(), ..cfg() }).contains("auth_token"));
        assert!(msg(PulsarConfig { timeout_ms: 0, ..cfg() }).contains("timeout_ms"));
    }

    #[test]
    fn config_from_cluster_settings() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "secret-token\n").unwrap();
        let s = tandem_cluster::config::PulsarSettings {
            service_url: "pulsar://p:6650".into(),
            auth_token_file: token_file.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let c = PulsarConfig::from_settings("eu", &s, 8 << 20).unwrap();
        assert_eq!(
            (c.service_url.as_str(), c.group.as_str(), c.tenant.as_str(), c.namespace.as_str(), c.topic_prefix.as_str()),
            ("pulsar://p:6650", "eu", "public", "default", "tandem")
        );
        assert_eq!(c.auth_token, "secret-token");
        assert_eq!(c.max_event_bytes, (8 << 20) + (1 << 20));
        c.validate().unwrap();
        let missing = tandem_cluster::config::PulsarSettings { auth_token_file: "/nonexistent/token".into(), ..s };
        assert!(PulsarConfig::from_settings("eu", &missing, 1 << 20).unwrap_err().to_string().contains("auth_token_file"));
    }

    #[test]
    fn entries_decode_single_messages_and_batches() {
        let s = StreamId::Shard { collection_id: 7, shard: 1 };
        let ev = ChangeEvent { format_version: 1, collection_id: 7, shard: 1, lsn: 3, ..Default::default() };
        let meta = pb::MessageMetadata { producer_name: "p".into(), ..Default::default() };
        let frame = conn::payload_frame(&base(Type::Send), &meta, &ev.encode_to_vec());
        let body = frame.slice(8 + base(Type::Send).encoded_len()..);
        let e = decode_entry(&s, Id { ledger: 0, entry: 5 }, body);
        assert_eq!(e.events.len(), 1);
        assert_eq!(e.events[0].as_ref().unwrap(), &ev);
        // A batch of two: the event, then garbage with its lsn property.
        let mut batch = Vec::new();
        for (payload, lsn) in [(ev.encode_to_vec(), "3"), (vec![0xff, 0xff], "4")] {
            let single = pb::SingleMessageMetadata {
                payload_size: payload.len() as i32,
                properties: vec![pb::KeyValue { key: LSN_PROPERTY.into(), value: lsn.into() }],
                ..Default::default()
            };
            batch.extend((single.encoded_len() as u32).to_be_bytes());
            batch.extend(single.encode_to_vec());
            batch.extend(payload);
        }
        let meta = pb::MessageMetadata { num_messages_in_batch: Some(2), ..meta };
        let frame = conn::payload_frame(&base(Type::Send), &meta, &batch);
        let e = decode_entry(&s, Id { ledger: 0, entry: 6 }, frame.slice(8 + base(Type::Send).encoded_len()..));
        assert_eq!(e.events.len(), 2);
        assert_eq!(e.events[0].as_ref().unwrap().lsn, 3);
        assert_eq!(e.events[1].as_ref().unwrap_err().1.as_deref(), Some("4"));
        // An event of another shard is refused.
        let other = ChangeEvent { shard: 2, ..ev };
        let frame = conn::payload_frame(&base(Type::Send), &pb::MessageMetadata::default(), &other.encode_to_vec());
        let e = decode_entry(&s, Id { ledger: 0, entry: 7 }, frame.slice(8 + base(Type::Send).encoded_len()..));
        assert!(e.events[0].as_ref().unwrap_err().0.contains("shard 2"));
    }

    #[test]
    fn chunks_are_put_back_together_and_incomplete_ones_dropped() {
        let s = StreamId::Shard { collection_id: 7, shard: 1 };
        let ev = ChangeEvent { format_version: 1, collection_id: 7, shard: 1, lsn: 3, ..Default::default() };
        let bytes = Bytes::from(ev.encode_to_vec());
        let chunk = |uuid: &str, i: i32, n: i32, part: Bytes, entry: i64| {
            Piece::Chunk(Chunk {
                id: Id { ledger: 0, entry },
                uuid: uuid.into(),
                chunk_id: i,
                chunks: n,
                total: bytes.len() as i32,
                data: part,
                lsn: Some("3".into()),
            })
        };
        let (a, b) = (bytes.slice(..4), bytes.slice(4..));
        let mut asm = Assembler::default();
        // The tail of a message that started before the reader: ignored.
        assert!(asm.feed(&s, chunk("x", 1, 2, b.clone(), 0)).is_empty());
        // A retried publish: chunk 0 of "p-1", then the whole message again as "p-3".
        assert!(asm.feed(&s, chunk("p-1", 0, 2, a.clone(), 1)).is_empty());
        assert!(asm.feed(&s, chunk("p-3", 0, 2, a.clone(), 2)).is_empty());
        let done = asm.feed(&s, chunk("p-3", 1, 2, b.clone(), 3));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].id, Id { ledger: 0, entry: 2 });
        assert_eq!(done[0].events[0].as_ref().unwrap(), &ev);
        // A chunked message whose bytes do not add up is malformed, with its lsn property.
        let short =
            asm.feed(&s, chunk("q", 0, 2, a.clone(), 4)).into_iter().chain(asm.feed(&s, chunk("q", 1, 2, a, 5))).collect::<Vec<_>>();
        assert_eq!(short.len(), 1);
        let (problem, lsn) = short[0].events[0].as_ref().unwrap_err();
        assert_eq!(lsn.as_deref(), Some("3"));
        assert!(!problem.is_empty());
    }
}
