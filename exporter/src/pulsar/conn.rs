//! One connection to a Pulsar broker, speaking the binary protocol
//! (<https://pulsar.apache.org/docs/next/developing-binary-protocol/>).
//!
//! ```text
//!  simple command:  [total size u32][command size u32][BaseCommand]
//!  payload command: [total size u32][command size u32][BaseCommand]
//!                   [0x0e01][CRC32C u32]                    optional checksum (we always write it)
//!                   [metadata size u32][MessageMetadata][payload]
//! ```
//!
//! A reader task decodes frames and routes them: replies by request id, send receipts by
//! (producer, sequence id), messages by consumer id; it answers the broker's pings. A writer
//! task owns the write half. When either ends, every waiter is told why, and the connection is
//! dead for good (`is_closed`): callers open a new one.
//!
//! Received payload frames are accepted with and without the optional magic number + CRC32C
//! (pulsar-lite sends them without; the `pulsar` crate's decoder insists on it, which is why
//! tandem has its own client), and with a broker-entry-metadata prefix (0x0e02), which is skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::pb;
use super::pb::base_command::Type;

const MAGIC_CRC32C: u16 = 0x0e01;
const MAGIC_BROKER_ENTRY_METADATA: u16 = 0x0e02;
/// Protocol version we speak (that of the Pulsar 2.x / 3.x clients).
const PROTOCOL_VERSION: i32 = 19;
/// Frames above this are refused before allocating (the broker's limit plus headroom for the
/// command and metadata is far below).
const MAX_FRAME: usize = 1 << 30;
/// Brokers ping every 30 s or so: silence this long means the connection is dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(90);

/// What went wrong on a connection.
#[derive(Debug, Clone)]
pub enum ConnError {
    /// The connection failed or closed (broker down, restarted, network): retry on a new one.
    Io(String),
    /// The broker refused the request.
    Server { code: pb::ServerError, message: String },
    /// No answer in time.
    Timeout(String),
    /// The broker said something we cannot make sense of.
    Protocol(String),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Io(m) => write!(f, "connection: {m}"),
            ConnError::Server { code, message } => write!(f, "broker error {}: {message}", code.as_str_name()),
            ConnError::Timeout(m) => write!(f, "timed out: {m}"),
            ConnError::Protocol(m) => write!(f, "protocol: {m}"),
        }
    }
}

pub type CResult<T> = std::result::Result<T, ConnError>;

/// What a consumer receives.
#[derive(Debug)]
pub enum Delivery {
    /// A message: its id, and its metadata and payload (still to be parsed: a bad one must not
    /// take the connection down).
    Message { id: pb::MessageIdData, body: Bytes },
    /// The consumer is gone (the connection died or the broker closed it).
    Closed(String),
}

type Receipt = std::result::Result<pb::MessageIdData, ConnError>;

#[derive(Default)]
struct Routes {
    requests: HashMap<u64, oneshot::Sender<pb::BaseCommand>>,
    receipts: HashMap<(u64, u64), oneshot::Sender<Receipt>>,
    consumers: HashMap<u64, mpsc::UnboundedSender<Delivery>>,
    /// Producers the broker closed (e.g. a topic moving to another broker).
    closed_producers: std::collections::HashSet<u64>,
    /// Why the connection is closed, once it is.
    closed: Option<String>,
}

struct Shared {
    routes: parking_lot::Mutex<Routes>,
    next_id: AtomicU64,
}

impl Shared {
    /// Tells every waiter that the connection is gone.
    fn close(&self, why: String) {
        let mut r = self.routes.lock();
        if r.closed.is_some() {
            return;
        }
        debug!(reason = %why, "pulsar connection closed");
        r.closed = Some(why.clone());
        r.requests.clear();
        for (_, tx) in r.receipts.drain() {
            let _ = tx.send(Err(ConnError::Io(why.clone())));
        }
        for (_, tx) in r.consumers.drain() {
            let _ = tx.send(Delivery::Closed(why.clone()));
        }
    }
}

/// A connected, handshaken broker connection. Cheap to share (`Arc`).
pub struct Conn {
    tx: mpsc::UnboundedSender<Bytes>,
    shared: Arc<Shared>,
    /// The broker's largest accepted message (CONNECTED.max_message_size), when it says
    /// (Apache Pulsar does; pulsar-lite does not, and then the broker alone enforces it).
    pub max_message_size: Option<usize>,
    pub server_version: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.close("connection dropped".into());
    }
}

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Encodes a command without payload.
pub fn simple_frame(cmd: &pb::BaseCommand) -> Bytes {
    let size = cmd.encoded_len();
    let mut b = BytesMut::with_capacity(8 + size);
    b.put_u32((4 + size) as u32);
    b.put_u32(size as u32);
    cmd.encode(&mut b).expect("BytesMut grows");
    b.freeze()
}

/// Encodes a payload command (SEND) with the magic number and CRC32C of metadata + payload.
pub fn payload_frame(cmd: &pb::BaseCommand, meta: &pb::MessageMetadata, payload: &[u8]) -> Bytes {
    let (cmd_size, meta_size) = (cmd.encoded_len(), meta.encoded_len());
    let checked = 4 + meta_size + payload.len();
    let total = 4 + cmd_size + 2 + 4 + checked;
    let mut b = BytesMut::with_capacity(4 + total);
    b.put_u32(total as u32);
    b.put_u32(cmd_size as u32);
    cmd.encode(&mut b).expect("BytesMut grows");
    b.put_u16(MAGIC_CRC32C);
    let crc_at = b.len();
    b.put_u32(0);
    let start = b.len();
    b.put_u32(meta_size as u32);
    meta.encode(&mut b).expect("BytesMut grows");
    b.put_slice(payload);
    let crc = crc32c(&b[start..]);
    b[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
    b.freeze()
}

/// Size of the frame `payload_frame` would build.
#[cfg(test)]
fn payload_frame_len(cmd: &pb::BaseCommand, meta: &pb::MessageMetadata, payload_len: usize) -> usize {
    4 + 4 + cmd.encoded_len() + 6 + 4 + meta.encoded_len() + payload_len
}

/// Splits the part of a MESSAGE frame after the command into metadata and payload, checking the
/// CRC32C when present.
pub fn parse_body(mut body: Bytes) -> std::result::Result<(pb::MessageMetadata, Bytes), String> {
    if body.len() >= 6 && u16::from_be_bytes([body[0], body[1]]) == MAGIC_BROKER_ENTRY_METADATA {
        body.advance(2);
        let n = body.get_u32() as usize;
        if body.len() < n {
            return Err("truncated broker entry metadata".into());
        }
        body.advance(n);
    }
    if body.len() >= 6 && u16::from_be_bytes([body[0], body[1]]) == MAGIC_CRC32C {
        body.advance(2);
        let want = body.get_u32();
        let got = crc32c(&body);
        if want != got {
            return Err(format!("checksum mismatch (frame says {want:#010x}, content has {got:#010x})"));
        }
    }
    if body.len() < 4 {
        return Err("no message metadata".into());
    }
    let n = body.get_u32() as usize;
    if body.len() < n {
        return Err(format!("metadata of {n} bytes but only {} left", body.len()));
    }
    let meta = pb::MessageMetadata::decode(body.split_to(n)).map_err(|e| format!("bad message metadata: {e}"))?;
    Ok((meta, body))
}

/// CRC-32C (Castagnoli), as the Pulsar protocol's checksum.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[[u32; 256]; 8]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [[0u32; 256]; 8];
        for i in 0..256u32 {
            let mut c = i;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            t[0][i as usize] = c;
        }
        for i in 0..256 {
            for k in 1..8 {
                t[k][i] = (t[k - 1][i] >> 8) ^ t[0][(t[k - 1][i] & 0xff) as usize];
            }
        }
        t
    });
    // Slicing-by-8: events are up to tens of MiB.
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ u32::from(b)) & 0xff) as usize];
    }
    !crc
}

fn base(t: Type) -> pb::BaseCommand {
    pb::BaseCommand { r#type: t as i32, ..Default::default() }
}

/// A PONG, with its (empty) command: pulsar-lite closes the connection over a bare one.
fn pong() -> pb::BaseCommand {
    pb::BaseCommand { pong: Some(pb::CommandPong {}), ..base(Type::Pong) }
}

fn server_error(code: i32, message: String) -> ConnError {
    ConnError::Server { code: pb::ServerError::try_from(code).unwrap_or(pb::ServerError::UnknownError), message }
}

impl Conn {
    /// Handshakes over `io` (TCP or TLS, already connected): CONNECT with the token if any,
    /// then waits for CONNECTED.
    pub async fn handshake(io: Box<dyn Io>, token: Option<&str>, timeout: Duration) -> CResult<Conn> {
        let (mut rd, mut wr) = tokio::io::split(io);
        let connect = pb::CommandConnect {
            client_version: concat!("tandem-", env!("CARGO_PKG_VERSION")).to_string(),
            auth_method_name: token.map(|_| "token".to_string()),
            auth_data: token.map(|t| t.as_bytes().to_vec()),
            protocol_version: Some(PROTOCOL_VERSION),
        };
        let cmd = pb::BaseCommand { connect: Some(connect), ..base(Type::Connect) };
        let handshake = async {
            wr.write_all(&simple_frame(&cmd)).await.map_err(|e| ConnError::Io(format!("sending CONNECT: {e}")))?;
            loop {
                let (cmd, _) = read_frame(&mut rd).await?;
                match cmd.r#type() {
                    Type::Connected => return Ok(cmd.connected.unwrap_or_default()),
                    Type::Error => {
                        let e = cmd.error.unwrap_or_default();
                        return Err(server_error(e.error, e.message));
                    }
                    Type::Ping => {
                        wr.write_all(&simple_frame(&pong())).await.map_err(|e| ConnError::Io(e.to_string()))?;
                    }
                    other => return Err(ConnError::Protocol(format!("expected CONNECTED, got {}", other.as_str_name()))),
                }
            }
        };
        let connected = tokio::time::timeout(timeout, handshake).await.map_err(|_| ConnError::Timeout("handshake".into()))??;
        let max_message_size = connected.max_message_size.and_then(|n| usize::try_from(n).ok()).filter(|&n| n > 0);
        let shared = Arc::new(Shared { routes: Default::default(), next_id: AtomicU64::new(1) });
        let (tx, mut out) = mpsc::unbounded_channel::<Bytes>();
        let s = shared.clone();
        let writer = tokio::spawn(async move {
            while let Some(frame) = out.recv().await {
                if let Err(e) = wr.write_all(&frame).await {
                    s.close(format!("write failed: {e}"));
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        let (s, ping_tx, token) = (shared.clone(), tx.clone(), token.map(str::to_string));
        let reader = tokio::spawn(async move {
            let why = loop {
                let (cmd, body) = match tokio::time::timeout(SILENCE_LIMIT, read_frame(&mut rd)).await {
                    Err(_) => break format!("no frame from the broker for {SILENCE_LIMIT:?}"),
                    Ok(Err(e)) => break e.to_string(),
                    Ok(Ok(f)) => f,
                };
                if let Err(e) = dispatch(&s, &ping_tx, token.as_deref(), cmd, body) {
                    break e;
                }
            };
            s.close(why);
        });
        Ok(Conn { tx, shared, max_message_size, server_version: connected.server_version, tasks: vec![writer, reader] })
    }

    pub fn is_closed(&self) -> bool {
        self.shared.routes.lock().closed.is_some() || self.tx.is_closed()
    }

    pub fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn closed_error(&self) -> ConnError {
        ConnError::Io(self.shared.routes.lock().closed.clone().unwrap_or_else(|| "connection closed".into()))
    }

    pub fn send_frame(&self, frame: Bytes) -> CResult<()> {
        self.tx.send(frame).map_err(|_| self.closed_error())
    }

    /// Sends a command carrying `request_id` and waits for the reply with that id. A CommandError
    /// reply becomes `ConnError::Server`.
    pub async fn request(&self, request_id: u64, cmd: pb::BaseCommand, timeout: Duration) -> CResult<pb::BaseCommand> {
        let (tx, rx) = oneshot::channel();
        {
            let mut r = self.shared.routes.lock();
            if let Some(why) = &r.closed {
                return Err(ConnError::Io(why.clone()));
            }
            r.requests.insert(request_id, tx);
        }
        let what = cmd.r#type().as_str_name();
        if let Err(e) = self.send_frame(simple_frame(&cmd)) {
            self.shared.routes.lock().requests.remove(&request_id);
            return Err(e);
        }
        let reply = match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                self.shared.routes.lock().requests.remove(&request_id);
                return Err(ConnError::Timeout(format!("{what} request {request_id}")));
            }
            Ok(Err(_)) => return Err(self.closed_error()),
            Ok(Ok(reply)) => reply,
        };
        if reply.r#type() == Type::Error {
            let e = reply.error.unwrap_or_default();
            return Err(server_error(e.error, e.message));
        }
        Ok(reply)
    }

    /// Registers the wait for the receipt of (`producer_id`, `sequence_id`); call before sending.
    pub fn expect_receipt(&self, producer_id: u64, sequence_id: u64) -> CResult<oneshot::Receiver<Receipt>> {
        let (tx, rx) = oneshot::channel();
        let mut r = self.shared.routes.lock();
        if let Some(why) = &r.closed {
            return Err(ConnError::Io(why.clone()));
        }
        r.receipts.insert((producer_id, sequence_id), tx);
        Ok(rx)
    }

    /// Where messages of `consumer_id` go; call before subscribing.
    pub fn register_consumer(&self, consumer_id: u64) -> CResult<mpsc::UnboundedReceiver<Delivery>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut r = self.shared.routes.lock();
        if let Some(why) = &r.closed {
            return Err(ConnError::Io(why.clone()));
        }
        r.consumers.insert(consumer_id, tx);
        Ok(rx)
    }

    pub fn forget_consumer(&self, consumer_id: u64) {
        self.shared.routes.lock().consumers.remove(&consumer_id);
    }

    /// Whether the broker closed `producer_id` (it must be created again, after a new lookup).
    pub fn producer_closed(&self, producer_id: u64) -> bool {
        self.shared.routes.lock().closed_producers.contains(&producer_id)
    }

    /// Fails the receipts `producer_id` still waits for (its producer is being dropped).
    pub fn forget_producer(&self, producer_id: u64, why: &str) {
        let mut r = self.shared.routes.lock();
        let keys: Vec<_> = r.receipts.keys().filter(|(p, _)| *p == producer_id).copied().collect();
        for k in keys {
            if let Some(tx) = r.receipts.remove(&k) {
                let _ = tx.send(Err(ConnError::Io(why.to_string())));
            }
        }
    }
}

/// Reads one frame: the command and what follows it (the payload part, empty for simple
/// commands).
async fn read_frame(rd: &mut (impl AsyncRead + Unpin)) -> CResult<(pb::BaseCommand, Bytes)> {
    let total = rd.read_u32().await.map_err(|e| ConnError::Io(format!("reading: {e}")))? as usize;
    if !(4..=MAX_FRAME).contains(&total) {
        return Err(ConnError::Protocol(format!("frame size {total}")));
    }
    let mut buf = BytesMut::zeroed(total);
    rd.read_exact(&mut buf).await.map_err(|e| ConnError::Io(format!("reading: {e}")))?;
    let mut buf = buf.freeze();
    let cmd_size = buf.get_u32() as usize;
    if cmd_size > buf.len() {
        return Err(ConnError::Protocol(format!("command size {cmd_size} in a frame of {total}")));
    }
    let cmd = pb::BaseCommand::decode(buf.split_to(cmd_size)).map_err(|e| ConnError::Protocol(format!("bad command: {e}")))?;
    Ok((cmd, buf))
}

/// Routes one incoming frame. An error ends the connection.
fn dispatch(s: &Shared, tx: &mpsc::UnboundedSender<Bytes>, token: Option<&str>, cmd: pb::BaseCommand, body: Bytes) -> Result<(), String> {
    let reply = |c: pb::BaseCommand| tx.send(simple_frame(&c)).map_err(|_| "writer gone".to_string());
    let t = cmd.r#type();
    let request_id = match t {
        Type::Ping => return reply(pong()),
        Type::Pong => return Ok(()),
        Type::Message => {
            let m = cmd.message.ok_or("MESSAGE without its command")?;
            let r = s.routes.lock();
            if let Some(c) = r.consumers.get(&m.consumer_id) {
                let _ = c.send(Delivery::Message { id: m.message_id, body });
            }
            return Ok(());
        }
        Type::SendReceipt => {
            let m = cmd.send_receipt.ok_or("SEND_RECEIPT without its command")?;
            if let Some(w) = s.routes.lock().receipts.remove(&(m.producer_id, m.sequence_id)) {
                let _ = w.send(m.message_id.ok_or_else(|| ConnError::Protocol("receipt without message id".into())));
            }
            return Ok(());
        }
        Type::SendError => {
            let m = cmd.send_error.ok_or("SEND_ERROR without its command")?;
            if let Some(w) = s.routes.lock().receipts.remove(&(m.producer_id, m.sequence_id)) {
                let _ = w.send(Err(server_error(m.error, m.message)));
            }
            return Ok(());
        }
        Type::CloseProducer => {
            let m = cmd.close_producer.ok_or("CLOSE_PRODUCER without its command")?;
            let mut r = s.routes.lock();
            r.closed_producers.insert(m.producer_id);
            let keys: Vec<_> = r.receipts.keys().filter(|(p, _)| *p == m.producer_id).copied().collect();
            for k in keys {
                if let Some(w) = r.receipts.remove(&k) {
                    let _ = w.send(Err(ConnError::Io("the broker closed the producer".into())));
                }
            }
            return Ok(());
        }
        Type::CloseConsumer => {
            let m = cmd.close_consumer.ok_or("CLOSE_CONSUMER without its command")?;
            if let Some(c) = s.routes.lock().consumers.remove(&m.consumer_id) {
                let _ = c.send(Delivery::Closed("the broker closed the consumer".into()));
            }
            return Ok(());
        }
        Type::AuthChallenge => {
            let response = pb::CommandAuthResponse {
                client_version: Some(concat!("tandem-", env!("CARGO_PKG_VERSION")).to_string()),
                response: Some(pb::AuthData {
                    auth_method_name: Some("token".into()),
                    auth_data: Some(token.unwrap_or_default().as_bytes().to_vec()),
                }),
                protocol_version: Some(PROTOCOL_VERSION),
            };
            return reply(pb::BaseCommand { auth_response: Some(response), ..base(Type::AuthResponse) });
        }
        Type::ActiveConsumerChange | Type::ReachedEndOfTopic => return Ok(()),
        Type::Success => cmd.success.as_ref().map(|c| c.request_id),
        Type::Error => cmd.error.as_ref().map(|c| c.request_id),
        Type::ProducerSuccess => {
            // A producer waiting in the broker's queue gets a first reply with
            // producer_ready = false, then the real one.
            match &cmd.producer_success {
                Some(p) if p.producer_ready == Some(false) => return Ok(()),
                p => p.as_ref().map(|c| c.request_id),
            }
        }
        Type::LookupResponse => cmd.lookup_topic_response.as_ref().map(|c| c.request_id),
        Type::GetLastMessageIdResponse => cmd.get_last_message_id_response.as_ref().map(|c| c.request_id),
        other => {
            warn!(command = other.as_str_name(), "unexpected pulsar command; ignored");
            return Ok(());
        }
    };
    if let Some(id) = request_id
        && let Some(w) = s.routes.lock().requests.remove(&id)
    {
        let _ = w.send(cmd);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        // Slicing-by-8 agrees with the byte-wise definition.
        let mut bytewise = !0u32;
        for &b in &long {
            bytewise ^= u32::from(b);
            for _ in 0..8 {
                bytewise = if bytewise & 1 != 0 { (bytewise >> 1) ^ 0x82F6_3B78 } else { bytewise >> 1 };
            }
        }
        assert_eq!(crc32c(&long), !bytewise);
    }

    #[test]
    fn payload_frames_round_trip_with_and_without_checksum() {
        let cmd = base(Type::Send);
        let meta = pb::MessageMetadata { producer_name: "p".into(), sequence_id: 3, publish_time: 9, ..Default::default() };
        let frame = payload_frame(&cmd, &meta, b"hello");
        assert_eq!(frame.len(), payload_frame_len(&cmd, &meta, 5));
        let mut f = frame.clone();
        let total = f.get_u32() as usize;
        assert_eq!(total, f.len());
        let n = f.get_u32() as usize;
        let body = f.slice(n..);
        let (m, p) = parse_body(body.clone()).unwrap();
        assert_eq!((m, p.as_ref()), (meta.clone(), &b"hello"[..]));
        // Without the optional magic + checksum (as pulsar-lite sends them).
        let (m, p) = parse_body(body.slice(6..)).unwrap();
        assert_eq!((m.sequence_id, p.as_ref()), (3, &b"hello"[..]));
        // A corrupted payload is caught by the checksum.
        let mut bad = BytesMut::from(body.as_ref());
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(parse_body(bad.freeze()).unwrap_err().contains("checksum"));
        assert!(parse_body(Bytes::from_static(&[0, 0])).is_err());
    }
}
