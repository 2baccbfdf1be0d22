//! The answer to a MilvusService RPC tandem does not serve: a Milvus status naming the RPC,
//! code 10 (merr ServiceUnimplemented), which pymilvus raises as a `MilvusException`. The
//! generated server would answer a bare gRPC UNIMPLEMENTED with no message, which pymilvus
//! lets through as a raw gRPC error that says nothing.
//!
//! The reply's type depends on the RPC: [`BARE_STATUS_RPCS`] reply with a bare `common.Status`,
//! every other MilvusService RPC with a message whose field 1 is a `common.Status`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;

use crate::pb::milvus::milvus_service_server::SERVICE_NAME;

#[derive(Debug, Clone)]
pub struct NameUnsupported<S> {
    inner: S,
}

impl<S> NameUnsupported<S> {
    pub fn new(inner: S) -> Self {
        NameUnsupported { inner }
    }
}

impl<S> NamedService for NameUnsupported<S> {
    const NAME: &'static str = SERVICE_NAME;
}

/// The MilvusService RPCs whose reply is a bare `common.Status`, as Milvus's published
/// `milvus.proto` declares them (milvus-proto, the version pymilvus 3.0.2 is built from).
pub const BARE_STATUS_RPCS: &[&str] = &[
    "CreateCollection",
    "DropCollection",
    "LoadCollection",
    "ReleaseCollection",
    "AlterCollection",
    "AlterCollectionField",
    "AddCollectionFunction",
    "AlterCollectionFunction",
    "DropCollectionFunction",
    "CreatePartition",
    "DropPartition",
    "LoadPartitions",
    "ReleasePartitions",
    "CreateAlias",
    "DropAlias",
    "AlterAlias",
    "CreateIndex",
    "AlterIndex",
    "DropIndex",
    "AddCollectionField",
    "AddCollectionStructField",
    "LoadBalance",
    "CreateCredential",
    "UpdateCredential",
    "DeleteCredential",
    "CreateRole",
    "AlterRole",
    "DropRole",
    "OperateUserRole",
    "OperatePrivilege",
    "OperatePrivilegeV2",
    "CreateResourceGroup",
    "DropResourceGroup",
    "UpdateResourceGroups",
    "TransferNode",
    "TransferReplica",
    "RenameCollection",
    "CreateDatabase",
    "DropDatabase",
    "AlterDatabase",
    "RestoreRBAC",
    "CreatePrivilegeGroup",
    "DropPrivilegeGroup",
    "OperatePrivilegeGroup",
    "AddFileResource",
    "RemoveFileResource",
    "AddUserTags",
    "DeleteUserTags",
    "CreateRowPolicy",
    "DropRowPolicy",
    "UpdateReplicateConfiguration",
    "CreateSnapshot",
    "DropSnapshot",
    "UnpinSnapshotData",
    "BatchUpdateManifest",
];

/// What an RPC tandem does not serve is answered with.
pub fn unsupported_message(rpc: &str) -> String {
    // RPC names are ASCII letters; anything else in the path is not echoed back.
    let rpc: String = rpc.chars().filter(char::is_ascii_alphanumeric).collect();
    format!("tandem does not serve the Milvus RPC {rpc} (docs/milvus.md lists what it serves)")
}

/// The reply body of `rpc`: the status itself, or a message holding it in field 1.
pub fn unsupported_body(rpc: &str) -> Vec<u8> {
    use prost::Message;
    let status = crate::status::status(crate::MilvusCode::Unimplemented, &unsupported_message(rpc));
    if BARE_STATUS_RPCS.contains(&rpc) {
        status.encode_to_vec()
    } else {
        let mut msg = Vec::new();
        prost::encoding::message::encode(1, &status, &mut msg);
        msg
    }
}

fn status_reply(rpc: &str) -> http::Response<Body> {
    let msg = unsupported_body(rpc);
    let mut frame = Vec::with_capacity(5 + msg.len());
    frame.push(0); // not compressed
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = futures::stream::iter([
        Ok::<_, tonic::Status>(http_body::Frame::data(bytes::Bytes::from(frame))),
        Ok(http_body::Frame::trailers(trailers)),
    ]);
    let mut resp = http::Response::new(Body::new(http_body_util::StreamBody::new(frames)));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    resp
}

impl<S, B> tower::Service<http::Request<B>> for NameUnsupported<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = req.uri().path().rsplit('/').next().unwrap_or_default().to_string();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let unimplemented = resp.headers().get("grpc-status").is_some_and(|v| v.as_bytes() == b"12");
            if !unimplemented {
                return Ok(resp);
            }
            Ok(status_reply(&rpc))
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::pb::common::Status;
    use crate::pb::milvus::{BoolResponse, GetVersionResponse};

    #[test]
    fn the_reply_has_the_rpcs_shape_and_names_it() {
        let bare = Status::decode(unsupported_body("CreatePartition").as_slice()).unwrap();
        assert_eq!((bare.code, bare.error_code), (10, 1));
        assert!(bare.reason.contains("Milvus RPC CreatePartition"), "{}", bare.reason);
        let wrapped = BoolResponse::decode(unsupported_body("HasPartition").as_slice()).unwrap().status.unwrap();
        assert_eq!(wrapped.code, 10);
        assert!(wrapped.reason.contains("Milvus RPC HasPartition"), "{}", wrapped.reason);
        let v = GetVersionResponse::decode(unsupported_body("GetComponentStates").as_slice()).unwrap();
        assert_eq!(v.status.unwrap().code, 10);
    }
}
