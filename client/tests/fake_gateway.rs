//! The SDK against a scripted `tandem.v1.Gateway` (one RPC, so a fake is small): the typed
//! topology, retries of transient failures until success, and no retry of other errors.
//! Real clusters are exercised in the workspace's tests/client.rs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tandem_client::{Client, Health, RetryPolicy, Role};
use tandem_proto::v1 as pb;
use tandem_proto::v1::gateway_server::{Gateway, GatewayServer};

/// Fails the first `failures` calls with `code`, then answers a two-cluster topology.
struct Scripted {
    calls: Arc<AtomicU32>,
    failures: u32,
    code: tonic::Code,
}

#[tonic::async_trait]
impl Gateway for Scripted {
    async fn topology(&self, _: tonic::Request<pb::TopologyRequest>) -> Result<tonic::Response<pb::TopologyResponse>, tonic::Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.failures {
            return Err(tonic::Status::new(self.code, format!("scripted failure {n}")));
        }
        let view = |id: &str, role: pb::Role, lag_ms| pb::ClusterView {
            id: id.into(),
            datacenter: format!("dc-{id}"),
            role: role as i32,
            epoch: 3,
            endpoints: vec![format!("http://{id}:19530")],
            health: pb::Health::Healthy as i32,
            readable: true,
            lag_ms,
            checked_ms_ago: 40,
            ..Default::default()
        };
        Ok(tonic::Response::new(pb::TopologyResponse {
            clusters: vec![view("a", pb::Role::Leading, 0), view("b", pb::Role::Alternative, 12)],
            leader: "a".into(),
            epoch: 3,
        }))
    }
}

async fn serve(failures: u32, code: tonic::Code) -> (String, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = GatewayServer::new(Scripted { calls: calls.clone(), failures, code });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming));
    (format!("http://{addr}"), calls)
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        multiplier: 2.0,
        max_elapsed: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn topology_is_typed_and_retried_until_it_succeeds() {
    let (url, calls) = serve(3, tonic::Code::Unavailable).await;
    let retried = Arc::new(AtomicU32::new(0));
    let r = retried.clone();
    let c = Client::builder(&url)
        .retry(quick_retries())
        .on_retry(move |ev| {
            assert_eq!(ev.op, "Topology");
            r.fetch_add(1, Ordering::SeqCst);
        })
        .connect()
        .await
        .unwrap();
    let t = c.topology().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4, "three failures, then the answer");
    assert_eq!(retried.load(Ordering::SeqCst), 3);
    assert_eq!(t.leader.as_deref(), Some("a"));
    assert_eq!(t.epoch, 3);
    let lead = t.leader_view().unwrap();
    assert_eq!((lead.role, lead.health, lead.datacenter.as_str()), (Some(Role::Leading), Health::Healthy, "dc-a"));
    assert_eq!(t.clusters[1].role, Some(Role::Alternative));
    assert_eq!(t.clusters[1].lag_ms, 12);
    assert_eq!(t.clusters[1].checked_ago, Some(Duration::from_millis(40)));
    assert_eq!(t.clusters[1].endpoints, ["http://b:19530"]);
}

#[tokio::test]
async fn retries_stop_at_max_attempts_with_the_last_error() {
    let (url, calls) = serve(100, tonic::Code::Unavailable).await;
    let c = Client::builder(&url).retry(quick_retries()).connect().await.unwrap();
    let e = c.topology().await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert_eq!(e.to_string(), "scripted failure 4");
}

#[tokio::test]
async fn non_transient_errors_are_returned_at_once() {
    for code in [tonic::Code::InvalidArgument, tonic::Code::DeadlineExceeded, tonic::Code::FailedPrecondition] {
        let (url, calls) = serve(1, code).await;
        let c = Client::builder(&url).retry(quick_retries()).connect().await.unwrap();
        let e = c.topology().await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{code:?} is not retried");
        assert_eq!((e.code(), e.message()), (code, "scripted failure 0".to_string()));
    }
}

/// HTTP/2 frames (type, flags, payload length) a client sent on stream 1, as a TCP tap between
/// the client and `upstream` saw them.
async fn tap(upstream: String) -> (String, Arc<std::sync::Mutex<Vec<(u8, u8, usize)>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frames = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = frames.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(upstream.trim_start_matches("http://")).await.unwrap();
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
        // The connection preface, then frames: 3 bytes length, type, flags, 4 bytes stream id.
        let (mut buf, mut chunk, mut at) = (Vec::new(), [0u8; 4096], 24);
        loop {
            let n = from_client.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            to_server.write_all(&chunk[..n]).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= at + 9 {
                let h = &buf[at..at + 9];
                let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
                if buf.len() < at + 9 + len {
                    break;
                }
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                if stream == 1 {
                    seen.lock().unwrap().push((h[3], h[4], len));
                }
                at += 9 + len;
            }
        }
    });
    (format!("http://{addr}"), frames)
}

/// A unary call goes out as HEADERS and one DATA frame that ends the stream: no empty DATA
/// frame of its own for END_STREAM (a write, and a wake-up of the server, per call).
#[tokio::test]
async fn a_unary_call_ends_the_stream_on_its_data_frame() {
    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const END_STREAM: u8 = 0x1;
    let (url, _) = serve(0, tonic::Code::Ok).await;
    let (tapped, frames) = tap(url).await;
    let c = Client::builder(&tapped).retry(quick_retries()).connect().await.unwrap();
    assert_eq!(c.topology().await.unwrap().leader.as_deref(), Some("a"));
    let frames = frames.lock().unwrap().clone();
    let kinds: Vec<(u8, bool)> = frames.iter().map(|&(t, f, _)| (t, f & END_STREAM != 0)).collect();
    assert_eq!(kinds, [(HEADERS, false), (DATA, true)], "frames on the call's stream: {frames:?}");
    assert!(frames[1].2 >= 5, "the DATA frame carries the message: {frames:?}");
}
