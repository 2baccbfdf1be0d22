//! The channel tandem's clients send on: tonic's, except that a request whose body is complete
//! when it is sent (every unary call) reaches HTTP/2 as one chunk that ends the stream.
//!
//! Why: tonic encodes a request as a body that yields the message and only reports its end when
//! polled again, and hyper sends each thing the body yields as it comes. So a unary call went out
//! as three socket writes: HEADERS, the DATA frame, then an empty DATA frame carrying END_STREAM,
//! each also a wake-up of the server's connection. Given a body that is whole and knows it ends,
//! hyper puts END_STREAM on the DATA frame and the last write disappears. (HEADERS still goes
//! alone: hyper waits for the new stream's flow-control capacity before sending its data.)
//!
//! The gateway's clients to its clusters use it too, so the hop saves the same write; measured in
//! `docs/gateway.md`, "Cost of the hop".

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as _, Frame};
use tonic::body::Body;

/// A [`tonic::transport::Channel`] that sends complete request bodies as one ending chunk.
/// Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Channel(tonic::transport::Channel);

impl From<tonic::transport::Channel> for Channel {
    fn from(c: tonic::transport::Channel) -> Channel {
        Channel(c)
    }
}

impl tower_service::Service<http::Request<Body>> for Channel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (parts, body) = req.into_parts();
        self.0.call(http::Request::from_parts(parts, whole(body)))
    }
}

/// `body` as one chunk that ends the stream when all of it is ready now; otherwise what is ready
/// now followed by the rest, as it comes (a client stream).
fn whole(mut body: Body) -> Body {
    // Polled without a real waker: a body that is not ready is polled again, with hyper's
    // waker, through `Prefixed`, and registers that one then.
    let mut cx = Context::from_waker(Waker::noop());
    let mut ready = BytesMut::new();
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => return Body::new(http_body_util::Full::new(ready.freeze())),
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                if let Ok(data) = frame.into_data() {
                    ready.put(data);
                }
            }
            // Trailers, an error, or not ready: keep what was taken, in order, then the rest.
            Poll::Ready(Some(next)) => return Body::new(Prefixed { ready: ready.freeze(), next: Some(next), rest: body }),
            Poll::Pending => return Body::new(Prefixed { ready: ready.freeze(), next: None, rest: body }),
        }
    }
}

/// The frames `whole` took from a body that was not complete, then the rest of that body.
struct Prefixed {
    ready: Bytes,
    next: Option<Result<Frame<Bytes>, tonic::Status>>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if !self.ready.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut self.ready)))));
        }
        if let Some(next) = self.next.take() {
            return Poll::Ready(Some(next));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.next.is_none() && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn data(frames: &[Result<Frame<Bytes>, tonic::Status>]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match f {
                Ok(f) if f.is_data() => format!("data {:?}", f.data_ref().unwrap()),
                Ok(f) => format!("trailers {:?}", f.trailers_ref().unwrap().keys().collect::<Vec<_>>()),
                Err(s) => format!("error {}", s.message()),
            })
            .collect()
    }

    async fn frames(mut b: Body) -> Vec<Result<Frame<Bytes>, tonic::Status>> {
        let mut v = Vec::new();
        while let Some(f) = b.frame().await {
            v.push(f);
        }
        v
    }

    /// What hyper looks at: a complete body is one data frame, and the body says it ended as
    /// soon as that frame is taken (so END_STREAM goes on it, not on a frame of its own).
    #[tokio::test]
    async fn a_complete_body_is_one_chunk_that_ends_the_stream() {
        let chunks = ["ab", "cd", "e"].map(|s| Ok::<_, tonic::Status>(Frame::data(Bytes::from(s))));
        let mut b = whole(Body::new(http_body_util::StreamBody::new(futures::stream::iter(chunks))));
        assert!(!b.is_end_stream());
        let first = b.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap(), &Bytes::from("abcde"));
        assert!(b.is_end_stream(), "the body must end with its one data frame");
        assert!(b.frame().await.is_none());
    }

    /// A body not ready yet (a client stream) keeps every frame, in order, whatever comes.
    #[tokio::test]
    async fn a_body_that_is_not_ready_keeps_every_frame_in_order() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(8);
        tx.send(Ok(Frame::data(Bytes::from("a")))).await.unwrap();
        let rest = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let b = whole(Body::new(rest));
        let later = tokio::spawn(async move {
            tx.send(Ok(Frame::data(Bytes::from("b")))).await.unwrap();
            let mut t = http::HeaderMap::new();
            t.insert("x-end", "1".parse().unwrap());
            tx.send(Ok(Frame::trailers(t))).await.unwrap();
        });
        let got = frames(b).await;
        later.await.unwrap();
        assert_eq!(data(&got), ["data b\"a\"", "data b\"b\"", "trailers [\"x-end\"]"]);
    }

    /// An error the body yields while being gathered reaches the caller after what came before.
    #[tokio::test]
    async fn an_error_while_gathering_is_kept() {
        let items = [Ok(Frame::data(Bytes::from("a"))), Err(tonic::Status::internal("cannot encode"))];
        let b = whole(Body::new(http_body_util::StreamBody::new(futures::stream::iter(items))));
        assert_eq!(data(&frames(b).await), ["data b\"a\"", "error cannot encode"]);
    }
}
