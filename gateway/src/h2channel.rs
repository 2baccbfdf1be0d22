//! The channel the gateway's reads go to a cluster on: gRPC straight on the `h2` crate, one
//! HTTP/2 connection, opened when first needed and again after it is lost.
//!
//! Why not tonic's `Channel` (which writes and DDL still use): a unary call there passes through
//! three tasks before it reaches the socket: tonic's buffer worker, hyper's connection
//! dispatcher, and a task hyper spawns per request to pipe the body, which sends DATA after
//! HEADERS has gone out in a write of its own. Here the calling task itself puts HEADERS and the
//! whole DATA frame on the connection (h2 queues data beyond the stream's window until the
//! peer grants more), so the connection task writes both at once and wakes the caller with the
//! reply. On the gateway bench that took the unloaded added p50 from 91-122 us to 36-83 us
//! (`docs/gateway.md`, "Cost of the hop").
//!
//! Only reads use it. A write's retry decision tells "never sent" from "maybe applied" by
//! tonic's own error types ([`crate::error::classify_write_failure`]); a read is simply tried on
//! another replica whenever the way to a cluster failed, which needs only the codes below.
//!
//! Failures, as the read path classifies them ([`crate::error::is_transient`]):
//! * cannot connect, connection lost or closed, stream refused: UNAVAILABLE, "transport
//!   error: ..." (another replica is tried, and the cluster's health hears of it);
//! * the request's `grpc-timeout` passed: DEADLINE_EXCEEDED (not the cluster's fault);
//! * anything the cluster answered, as it answered (tonic decodes the reply and its trailers).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tonic::Status;

/// Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct H2Channel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for H2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "H2Channel({})", self.shared.addr)
    }
}

struct Shared {
    /// host:port to connect to.
    addr: String,
    /// scheme://authority every request's path is put under.
    origin: String,
    connect_timeout: Duration,
    keepalive: Duration,
    /// The open connection (with its number), if any.
    conn: Mutex<Option<(u64, h2::client::SendRequest<Bytes>)>>,
    /// One connection attempt at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<u64>,
}

impl H2Channel {
    /// A channel to `endpoint` (`http://host:port`). Connects on the first call. `keepalive`: a
    /// PING this often; no answer within twice that closes the connection, so that calls to a
    /// cluster whose host vanished fail fast instead of waiting for their deadline.
    pub fn new(endpoint: &str, connect_timeout: Duration, keepalive: Duration) -> Result<H2Channel, String> {
        let (addr, origin) = crate::config::parse_endpoint(endpoint).map_err(|e| format!("invalid endpoint {endpoint:?}: {e}"))?;
        Ok(H2Channel {
            shared: Arc::new(Shared {
                addr,
                origin,
                connect_timeout,
                keepalive,
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(0),
            }),
        })
    }
}

/// An h2 failure on the way to the cluster, as a status the read path retries elsewhere.
fn lost(addr: &str, e: &h2::Error) -> Status {
    if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return Status::unavailable(format!("transport error: {addr} refused the stream: {e}"));
    }
    Status::unavailable(format!("transport error: connection to {addr} lost: {e}"))
}

impl Shared {
    /// The open connection, or a new one.
    async fn sender(self: &Arc<Self>) -> Result<(u64, h2::client::SendRequest<Bytes>), Status> {
        if let Some(c) = self.conn.lock().clone() {
            return Ok(c);
        }
        let mut generation = self.connecting.lock().await;
        if let Some(c) = self.conn.lock().clone() {
            return Ok(c);
        }
        let failed = |e: &dyn std::fmt::Display| Status::unavailable(format!("transport error: cannot connect to {}: {e}", self.addr));
        let tcp = tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(&self.addr))
            .await
            .map_err(|_| failed(&format_args!("no connection within {:?}", self.connect_timeout)))?
            .map_err(|e| failed(&e))?;
        tcp.set_nodelay(true).map_err(|e| failed(&e))?;
        // Windows as large as tonic's defaults would grow them to: a large search reply is not
        // held up by WINDOW_UPDATE round trips.
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(2 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(tcp)
            .await
            .map_err(|e| failed(&e))?;
        *generation += 1;
        let id = *generation;
        let ping = conn.ping_pong();
        let shared = Arc::downgrade(self);
        let keepalive = self.keepalive;
        tokio::spawn(async move {
            tokio::select! {
                _ = &mut conn => {}
                _ = keep_alive(ping, keepalive) => {}
            }
            // Closed, failed or silent: the next call connects again.
            if let Some(s) = shared.upgrade() {
                s.forget(id);
            }
        });
        *self.conn.lock() = Some((id, send.clone()));
        Ok((id, send))
    }

    /// Forgets connection `id` (a call found it unusable, or it ended), unless a newer one
    /// replaced it already.
    fn forget(&self, id: u64) {
        let mut c = self.conn.lock();
        if c.as_ref().is_some_and(|(g, _)| *g == id) {
            *c = None;
        }
    }

    async fn call(self: Arc<Self>, req: http::Request<tonic::body::Body>) -> Result<http::Response<RecvBody>, Status> {
        let (mut parts, body) = req.into_parts();
        // A unary request's body is complete at once (one encoded message).
        let data = body.collect().await?.to_bytes();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = format!("{}{path}", self.origin).parse().map_err(|e| Status::internal(format!("request path {path:?}: {e}")))?;
        let (id, sender) = self.sender().await?;
        let mut sender = sender.ready().await.map_err(|e| {
            self.forget(id);
            lost(&self.addr, &e)
        })?;
        let (reply, mut body) = sender.send_request(http::Request::from_parts(parts, ()), data.is_empty()).map_err(|e| {
            self.forget(id);
            lost(&self.addr, &e)
        })?;
        if !data.is_empty() {
            body.send_data(data, true).map_err(|e| lost(&self.addr, &e))?;
        }
        let reply = reply.await.map_err(|e| lost(&self.addr, &e))?;
        let addr = self.addr.clone();
        Ok(reply.map(|recv| RecvBody { recv, data_done: false, addr }))
    }
}

/// Resolves when the peer failed to answer a PING within twice `every` (or the connection
/// closed under it); runs forever otherwise.
async fn keep_alive(mut ping: Option<h2::PingPong>, every: Duration) {
    let Some(ping) = ping.as_mut() else { return std::future::pending().await };
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(every * 2, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "keepalive ping failed");
                return;
            }
            Err(_) => {
                tracing::warn!("a cluster did not answer a keepalive ping within {:?}: closing the connection", every * 2);
                return;
            }
        }
    }
}

/// A reply's body: its DATA frames (their flow-control window given back as they are taken),
/// then its trailers (grpc-status).
pub struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
    addr: String,
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if !self.data_done {
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(b))) => {
                    // Only fails for a stream already closed; its data is here regardless.
                    let _ = self.recv.flow_control().release_capacity(b.len());
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(lost(&self.addr, &e)))),
                Poll::Ready(None) => self.data_done = true,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(lost(&self.addr, &e)))),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<RecvBody>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    /// Always ready: a call waits for the connection (and its stream limit) itself.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let timeout = req
            .headers()
            .get(tandem_proto::wire::GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(tandem_proto::wire::parse_grpc_timeout);
        let (shared, call) = (self.shared.clone(), self.shared.clone().call(req));
        Box::pin(async move {
            let Some(t) = timeout else { return call.await };
            tokio::time::timeout(t, call).await.unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!("the request's deadline ({t:?}) passed before {} answered", shared.addr)))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    fn channel(addr: std::net::SocketAddr) -> HealthClient<H2Channel> {
        HealthClient::new(H2Channel::new(&format!("http://{addr}"), Duration::from_secs(1), Duration::from_secs(10)).unwrap())
    }

    /// A health server on a runtime of its own: dropping it closes its connections too (a task
    /// aborted on the test's runtime would leave the connections it spawned serving).
    fn serve(addr: std::net::SocketAddr) -> tokio::runtime::Runtime {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        // The previous server on this port is shut down in the background
        // (`shutdown_background`): its listener may close a moment after its connections did.
        let mut tries = 0;
        let listener = loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 500 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        listener.set_nonblocking(true).unwrap();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (_reporter, health) = tonic_health::server::health_reporter();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming).await.unwrap();
        });
        rt
    }

    async fn check(c: &mut HealthClient<H2Channel>) -> Result<i32, Status> {
        c.check(HealthCheckRequest { service: String::new() }).await.map(|r| r.into_inner().status)
    }

    /// Refused while nothing listens, served once a server does, UNAVAILABLE when that server
    /// goes, and served again by the next one on the same port: one channel throughout.
    #[tokio::test]
    async fn connects_when_needed_and_again_after_the_connection_is_lost() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut c = channel(addr);
        let e = check(&mut c).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("transport error: cannot connect"), "{e:?}");

        let server = serve(addr);
        assert_eq!(check(&mut c).await.unwrap(), 1, "SERVING");
        server.shutdown_background();
        // Its connection is closed; the channel notices at the latest on its next call.
        let mut outcome = Ok(1);
        for _ in 0..100 {
            outcome = check(&mut c).await;
            if outcome.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let e = outcome.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("transport error"), "{e:?}");

        let server = serve(addr);
        let mut ok = None;
        for _ in 0..100 {
            match check(&mut c).await {
                Ok(s) => {
                    ok = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        assert_eq!(ok, Some(1), "served again after reconnecting");
        server.shutdown_background();
    }

    /// A peer that accepts the connection and never answers: the call ends at its deadline
    /// with DEADLINE_EXCEEDED (not a transport error, which would count against the cluster).
    #[tokio::test]
    async fn a_silent_peer_fails_the_call_at_its_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let mut c = channel(addr);
        let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
        req.set_timeout(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let e = c.check(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        held.abort();
    }

    #[test]
    fn endpoints_must_be_plain_http_with_a_host() {
        let new = |e: &str| H2Channel::new(e, Duration::from_secs(1), Duration::from_secs(1)).map(|c| format!("{c:?}"));
        assert_eq!(new("http://127.0.0.1:7").unwrap(), "H2Channel(127.0.0.1:7)");
        assert_eq!(new("http://localhost").unwrap(), "H2Channel(localhost:80)");
        assert_eq!(new("https://127.0.0.1:7").unwrap_err(), "invalid endpoint \"https://127.0.0.1:7\": scheme \"https\", expected http");
        assert!(new("127.0.0.1:7").unwrap_err().contains("expected http"), "a bare host:port has no scheme");
        assert!(new("http://").unwrap_err().contains("not a URL"));
    }
}
