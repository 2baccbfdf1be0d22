//! The direct transport: an alternative streams the leader's own log over gRPC
//! (`Replication.Subscribe`), as Elasticsearch CCR pulls from its leader. No broker: the
//! default of the all-in-one mode. The leader keeps the WAL its subscribers still need
//! (retention leases) and publishing is a no-op, since the leader's WAL *is* the log.

use futures::StreamExt;
use tandem_proto::replication::v1 as rp;
use tandem_proto::replication::v1::replication_client::ReplicationClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::{ExportError, Result};
use crate::transport::{EventStream, StreamId, Transport};

#[derive(Clone)]
pub struct DirectTransport {
    client: ReplicationClient<Channel>,
    subscriber: String,
}

fn unavailable(e: impl std::fmt::Display) -> ExportError {
    ExportError::Unavailable { backend: "direct", message: e.to_string() }
}

pub fn status_to_error(stream: &StreamId, from: u64, s: tonic::Status) -> ExportError {
    match s.code() {
        // the leader's Truncated error
        tonic::Code::OutOfRange => ExportError::Truncated { stream: stream.to_string(), lsn: from, first: 0 },
        _ => unavailable(format!("{}: {}", s.code(), s.message())),
    }
}

impl DirectTransport {
    /// Connects lazily: the leader may be down now and come back.
    pub fn new(leader: &str, subscriber: &str) -> Result<DirectTransport> {
        let endpoint = Endpoint::from_shared(leader.to_string())
            .map_err(|e| ExportError::Config(format!("leader endpoint {leader:?}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(3))
            .tcp_nodelay(true);
        let client = ReplicationClient::new(endpoint.connect_lazy()).max_decoding_message_size(256 << 20);
        Ok(DirectTransport { client, subscriber: subscriber.to_string() })
    }

    pub fn client(&self) -> ReplicationClient<Channel> {
        self.client.clone()
    }

    fn request(&self, stream: &StreamId, from_lsn: u64) -> rp::SubscribeRequest {
        match *stream {
            StreamId::Ddl => rp::SubscribeRequest { ddl: true, from_lsn, subscriber: self.subscriber.clone(), ..Default::default() },
            StreamId::Shard { collection_id, shard } => {
                rp::SubscribeRequest { collection_id, shard, ddl: false, from_lsn, subscriber: self.subscriber.clone(), local: false }
            }
        }
    }
}

#[async_trait::async_trait]
impl Transport for DirectTransport {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn needs_publisher(&self) -> bool {
        false
    }

    async fn ensure_stream(&self, _stream: &StreamId, _shards: u32) -> Result<()> {
        Ok(())
    }

    async fn publish(&self, _stream: &StreamId, _events: Vec<rp::ChangeEvent>) -> Result<()> {
        Ok(())
    }

    async fn subscribe(&self, stream: &StreamId, from_lsn: u64) -> Result<EventStream> {
        let sid = *stream;
        let resp = self.client.clone().subscribe(self.request(stream, from_lsn)).await.map_err(|s| status_to_error(&sid, from_lsn, s))?;
        Ok(resp.into_inner().map(move |item| item.map_err(|s| status_to_error(&sid, from_lsn, s))).boxed())
    }

    async fn end_lsn(&self, stream: &StreamId) -> Result<u64> {
        let sid = *stream;
        Ok(self.client.clone().end_lsn(self.request(stream, 0)).await.map_err(|s| status_to_error(&sid, 0, s))?.into_inner().lsn)
    }
}
