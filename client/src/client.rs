//! [`Client`]: one connection to a cluster or a gateway, one session, typed calls.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::session::SessionToken;
use tandem_proto::v1 as pb;
use tandem_proto::v1::gateway_client::GatewayClient;
use tandem_proto::v1::tandem_client::TandemClient;
use tonic::transport::Endpoint;

use crate::channel::Channel;
use crate::error::{ClientError, Result};
use crate::retry::{RetryEvent, RetryPolicy};
use crate::session::Session;
use crate::types::{Ack, ClusterInfo, CollectionInfo, CollectionSpec, Consistency, Entity, Hit, Index, Rows, Topology, WriteResult};

/// Largest gRPC message sent or received: the server's default `limits.max_message_bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A closure sending one request on a clone of the generated client (the clone shares the
/// connection; the generated methods take `&mut self`).
macro_rules! rpc {
    ($client:expr, $method:ident) => {
        |r| {
            let mut c = $client.clone();
            async move { c.$method(r).await }
        }
    };
}

type RetryHook = Arc<dyn Fn(&RetryEvent<'_>) + Send + Sync>;
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Settings of a [`Client`]; `Client::builder(endpoint)...connect().await`.
#[derive(Clone)]
pub struct ClientBuilder {
    endpoint: String,
    connect_timeout: Duration,
    timeout: Option<Duration>,
    retry: RetryPolicy,
    consistency: Consistency,
    tcp_nodelay: bool,
    max_message_bytes: usize,
    session_token: String,
    on_retry: Option<RetryHook>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("endpoint", &self.endpoint)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("consistency", &self.consistency)
            .field("tcp_nodelay", &self.tcp_nodelay)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// How long `connect` waits for the endpoint to accept (default 5 s); also bounds each
    /// reconnection attempt later.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// The deadline of every call unless the call sets its own (default: none). It travels to
    /// the server as `grpc-timeout`, so a read waiting for a lagging replica gives up in time
    /// and says how far behind it is.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// How reads are retried (default [`RetryPolicy::default`]); writes never are.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// What reads see unless a call says otherwise (default [`Consistency::Session`]).
    pub fn consistency(mut self, c: Consistency) -> Self {
        self.consistency = c;
        self
    }

    /// Default on: requests are small and latency-bound, so Nagle's delay only hurts.
    pub fn tcp_nodelay(mut self, on: bool) -> Self {
        self.tcp_nodelay = on;
        self
    }

    /// Largest message sent or received (default 64 MiB, the server's default limit).
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// Continue a session another client or process started (its [`Client::session_token`]).
    /// Checked when connecting.
    pub fn session_token(mut self, token: impl Into<String>) -> Self {
        self.session_token = token.into();
        self
    }

    /// Called before each retry's wait (logging, metrics, tests).
    pub fn on_retry(mut self, hook: impl Fn(&RetryEvent<'_>) + Send + Sync + 'static) -> Self {
        self.on_retry = Some(Arc::new(hook));
        self
    }

    fn endpoint(&self) -> Result<(String, Endpoint)> {
        let url = if self.endpoint.contains("://") { self.endpoint.clone() } else { format!("http://{}", self.endpoint) };
        let ep = Endpoint::from_shared(url.clone()).map_err(|e| ClientError::InvalidEndpoint {
            endpoint: self.endpoint.clone(),
            reason: format!("{e}: expected a URL like http://127.0.0.1:19530"),
        })?;
        Ok((url, ep.connect_timeout(self.connect_timeout).tcp_nodelay(self.tcp_nodelay)))
    }

    /// Connects now, so a wrong address fails here rather than on the first call.
    pub async fn connect(self) -> Result<Client> {
        let (url, ep) = self.endpoint()?;
        let channel = ep.connect().await.map_err(|source| ClientError::Connect { endpoint: url.clone(), source })?;
        self.finish(url, channel.into())
    }

    /// Connects on the first call instead (and reconnects whenever the connection drops, as
    /// an eagerly connected client does too).
    pub fn connect_lazy(self) -> Result<Client> {
        let (url, ep) = self.endpoint()?;
        self.finish(url, ep.connect_lazy().into())
    }

    fn finish(self, endpoint: String, channel: Channel) -> Result<Client> {
        let session = Session::starting_at(SessionToken::decode(&self.session_token)?);
        let n = self.max_message_bytes;
        Ok(Client {
            tandem: TandemClient::new(channel.clone()).max_decoding_message_size(n).max_encoding_message_size(n),
            gateway: GatewayClient::new(channel).max_decoding_message_size(n).max_encoding_message_size(n),
            session,
            cfg: Arc::new(Config {
                endpoint,
                timeout: self.timeout,
                retry: self.retry,
                consistency: self.consistency,
                on_retry: self.on_retry,
            }),
        })
    }
}

struct Config {
    endpoint: String,
    timeout: Option<Duration>,
    retry: RetryPolicy,
    consistency: Consistency,
    on_retry: Option<RetryHook>,
}

/// A connection to a tandem cluster or gateway (they serve the same API) and a session.
///
/// Cloning is cheap and clones share both the connection (HTTP/2 multiplexes concurrent calls)
/// and the session: a write through one clone is seen by a SESSION read through another. Use
/// [`Client::new_session`] for an independent session on the same connection.
#[derive(Clone)]
pub struct Client {
    tandem: TandemClient<Channel>,
    gateway: GatewayClient<Channel>,
    session: Session,
    cfg: Arc<Config>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("endpoint", &self.cfg.endpoint).field("session", &self.session.encoded()).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects with the default settings. `endpoint` is a URL (`http://host:port`); a bare
    /// `host:port` means `http://`.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Client> {
        Client::builder(endpoint).connect().await
    }

    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            endpoint: endpoint.into(),
            connect_timeout: Duration::from_secs(5),
            timeout: None,
            retry: RetryPolicy::default(),
            consistency: Consistency::Session,
            tcp_nodelay: true,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            session_token: String::new(),
            on_retry: None,
        }
    }

    /// The URL this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.cfg.endpoint
    }

    // ---- session ------------------------------------------------------------------------------

    /// The newest token this session has seen, to hand to another client or process; `None`
    /// before the first reply.
    pub fn session_token(&self) -> Option<String> {
        self.session.get().map(|t| t.encode())
    }

    /// A client on the same connection whose own session starts at `token` (e.g. a token
    /// another process handed over). This client's session is left as it is.
    pub fn with_session_token(&self, token: &str) -> Result<Client> {
        let start = SessionToken::decode(token)?;
        Ok(Client { session: Session::starting_at(start), ..self.clone() })
    }

    /// Folds `token` into this client's session (the later one wins), e.g. a token that came
    /// back from a write made through another client.
    pub fn observe_session_token(&self, token: &str) -> Result<()> {
        self.session.observe(SessionToken::decode(token)?);
        Ok(())
    }

    /// A client on the same connection with an empty session of its own.
    pub fn new_session(&self) -> Client {
        Client { session: Session::default(), ..self.clone() }
    }

    /// The generated gRPC client on this connection, for what the typed API does not cover.
    /// Calls through it neither send nor update the session and are not retried.
    pub fn raw(&self) -> TandemClient<Channel> {
        self.tandem.clone()
    }

    // ---- plumbing -----------------------------------------------------------------------------

    fn request<T>(&self, msg: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = timeout.or(self.cfg.timeout) {
            r.set_timeout(t);
        }
        r
    }

    fn read_options(&self, c: Option<Consistency>) -> pb::ReadOptions {
        c.unwrap_or(self.cfg.consistency).to_pb(self.session.encoded())
    }

    /// Sent once: see `RetryPolicy` for why writes are not retried.
    async fn once<Req, Resp, Fut>(&self, req: Req, timeout: Option<Duration>, call: impl FnOnce(tonic::Request<Req>) -> Fut) -> Result<Resp>
    where
        Fut: Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        Ok(call(self.request(req, timeout)).await?.into_inner())
    }

    /// Sent again on transient failures, as the retry policy allows.
    async fn idempotent<Req: Clone, Resp, Fut>(
        &self,
        op: &'static str,
        req: Req,
        timeout: Option<Duration>,
        call: impl Fn(tonic::Request<Req>) -> Fut,
    ) -> Result<Resp>
    where
        Fut: Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match call(self.request(req.clone(), timeout)).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => ClientError::from(s),
            };
            let Some(delay) = self.cfg.retry.next_delay(attempt, start.elapsed(), &err) else { return Err(err) };
            tracing::debug!(op, attempt, ?delay, error = %err, endpoint = %self.cfg.endpoint, "retrying a read");
            if let Some(hook) = &self.cfg.on_retry {
                hook(&RetryEvent { op, attempt, delay, error: &err });
            }
            tokio::time::sleep(delay).await;
        }
    }

    // ---- DDL (not retried: a create whose reply was lost may have created) -----------------

    pub async fn create_collection(&self, spec: CollectionSpec) -> Result<CollectionInfo> {
        let req = pb::CreateCollectionRequest { schema: Some(spec.into()) };
        let r = self.once(req, None, rpc!(self.tandem, create_collection)).await?;
        self.session.observe_encoded(&r.session_token);
        r.collection.unwrap_or_default().try_into()
    }

    pub async fn drop_collection(&self, name: &str) -> Result<()> {
        let r = self.once(pb::DropCollectionRequest { name: name.into() }, None, rpc!(self.tandem, drop_collection)).await?;
        self.session.observe_encoded(&r.session_token);
        Ok(())
    }

    /// Replaces the collection's index; sealed segments are re-indexed in the background.
    pub async fn create_index(&self, collection: &str, index: Index) -> Result<()> {
        let req = pb::CreateIndexRequest { collection: collection.into(), index: Some(index.into()) };
        let r = self.once(req, None, rpc!(self.tandem, create_index)).await?;
        self.session.observe_encoded(&r.session_token);
        Ok(())
    }

    /// Back to FLAT (exact search).
    pub async fn drop_index(&self, collection: &str) -> Result<()> {
        let r = self.once(pb::DropIndexRequest { collection: collection.into() }, None, rpc!(self.tandem, drop_index)).await?;
        self.session.observe_encoded(&r.session_token);
        Ok(())
    }

    /// Seals the collection's growing segments and waits until they are indexed; returns how
    /// many were sealed.
    pub async fn flush(&self, collection: &str) -> Result<u64> {
        let r = self.once(pb::FlushRequest { collection: collection.into() }, None, rpc!(self.tandem, flush)).await?;
        self.session.observe_encoded(&r.session_token);
        Ok(r.sealed_segments)
    }

    pub async fn list_collections(&self) -> Result<Vec<String>> {
        let r = self.idempotent("ListCollections", pb::ListCollectionsRequest {}, None, rpc!(self.tandem, list_collections)).await?;
        Ok(r.names)
    }

    pub async fn describe_collection(&self, name: &str) -> Result<CollectionInfo> {
        let req = pb::DescribeCollectionRequest { name: name.into() };
        let r = self.idempotent("DescribeCollection", req, None, rpc!(self.tandem, describe_collection)).await?;
        r.collection.unwrap_or_default().try_into()
    }

    /// Sets how many of the cluster's replica groups hold copies of the collection's sealed
    /// segments, `None` for every group (the default), `Some(0)` for none; returns the groups
    /// that now do (docs/scaling.md). Through a gateway, the leading cluster's.
    pub async fn load_collection(&self, name: &str, replicas: Option<u32>) -> Result<Vec<u32>> {
        let req = pb::LoadCollectionRequest { name: name.into(), replicas };
        let r = self.idempotent("LoadCollection", req, None, rpc!(self.tandem, load_collection)).await?;
        Ok(r.groups)
    }

    /// The identity, role and collections of the cluster that answers.
    pub async fn cluster_info(&self) -> Result<ClusterInfo> {
        let r = self.idempotent("GetClusterInfo", pb::GetClusterInfoRequest {}, None, rpc!(self.tandem, get_cluster_info)).await?;
        Ok(r.into())
    }

    /// Every cluster a gateway knows and which one leads. Only a gateway answers it: against a
    /// cluster this is [`ClientError::NotAGateway`].
    pub async fn topology(&self) -> Result<Topology> {
        match self.idempotent("Topology", pb::TopologyRequest {}, None, rpc!(self.gateway, topology)).await {
            Ok(t) => Ok(t.into()),
            Err(ClientError::Status { code: tonic::Code::Unimplemented, .. }) => {
                Err(ClientError::NotAGateway { endpoint: self.cfg.endpoint.clone() })
            }
            Err(e) => Err(e),
        }
    }

    // ---- DML ----------------------------------------------------------------------------------

    /// Inserts rows; the whole write fails if an id exists. `client.insert("docs", rows).await`.
    pub fn insert(&self, collection: &str, rows: impl Into<Rows>) -> Write<'_> {
        Write::new(self, collection, WriteKind::Insert(rows.into()))
    }

    /// Inserts rows, replacing those whose id exists.
    pub fn upsert(&self, collection: &str, rows: impl Into<Rows>) -> Write<'_> {
        Write::new(self, collection, WriteKind::Upsert(rows.into()))
    }

    pub fn delete_ids(&self, collection: &str, ids: impl IntoIterator<Item = i64>) -> Write<'_> {
        Write::new(self, collection, WriteKind::DeleteIds(ids.into_iter().collect()))
    }

    /// Deletes every row the filter matches (resolved to ids by the server, atomically).
    pub fn delete_where(&self, collection: &str, filter: impl Into<String>) -> Write<'_> {
        Write::new(self, collection, WriteKind::DeleteWhere(filter.into()))
    }

    // ---- DQL ----------------------------------------------------------------------------------

    /// `client.search("docs").vector(q).top_k(5).filter("price < 10").await?` — one hit list
    /// per query vector, closest first.
    pub fn search(&self, collection: &str) -> Search<'_> {
        Search {
            client: self,
            req: pb::SearchRequest { collection: collection.into(), top_k: 10, ..Default::default() },
            vectors: Vec::new(),
            opts: CallOpts::default(),
        }
    }

    /// Rows by id, in the order asked; missing ids are absent.
    pub fn get(&self, collection: &str, ids: impl IntoIterator<Item = i64>) -> Get<'_> {
        let req = pb::GetRequest { collection: collection.into(), ids: ids.into_iter().collect(), ..Default::default() };
        Get { client: self, req, opts: CallOpts::default() }
    }

    /// Rows matching a filter (all rows without one), sorted by id, at most `limit`.
    pub fn query(&self, collection: &str) -> Query<'_> {
        Query { client: self, req: pb::QueryRequest { collection: collection.into(), ..Default::default() }, opts: CallOpts::default() }
    }

    /// Rows matching a filter (all rows without one).
    pub fn count(&self, collection: &str) -> Count<'_> {
        Count { client: self, req: pb::CountRequest { collection: collection.into(), ..Default::default() }, opts: CallOpts::default() }
    }
}

/// Per-call settings shared by the call builders.
#[derive(Debug, Clone, Copy, Default)]
struct CallOpts {
    consistency: Option<Consistency>,
    timeout: Option<Duration>,
}

macro_rules! read_setters {
    () => {
        /// What this read must see, instead of the client's default.
        pub fn consistency(mut self, c: Consistency) -> Self {
            self.opts.consistency = Some(c);
            self
        }

        /// This call's deadline, instead of the client's.
        pub fn timeout(mut self, d: Duration) -> Self {
            self.opts.timeout = Some(d);
            self
        }
    };
}

macro_rules! into_future {
    ($t:ident, $out:ty) => {
        impl<'a> IntoFuture for $t<'a> {
            type Output = Result<$out>;
            type IntoFuture = BoxFuture<'a, Result<$out>>;
            fn into_future(self) -> Self::IntoFuture {
                Box::pin(self.send())
            }
        }
    };
}

fn fields<I: IntoIterator<Item = S>, S: Into<String>>(f: I) -> Vec<String> {
    f.into_iter().map(Into::into).collect()
}

#[must_use = "a search does nothing until awaited"]
pub struct Search<'a> {
    client: &'a Client,
    req: pb::SearchRequest,
    vectors: Vec<Vec<f32>>,
    opts: CallOpts,
}

impl Search<'_> {
    /// Adds a query vector.
    pub fn vector(mut self, v: impl Into<Vec<f32>>) -> Self {
        self.vectors.push(v.into());
        self
    }

    /// Adds query vectors (one hit list comes back per vector, in order).
    pub fn vectors<I: IntoIterator<Item = V>, V: Into<Vec<f32>>>(mut self, vs: I) -> Self {
        self.vectors.extend(vs.into_iter().map(Into::into));
        self
    }

    /// Hits per query (default 10).
    pub fn top_k(mut self, k: u32) -> Self {
        self.req.top_k = k;
        self
    }

    /// Payload filter; hits are the true top-k of the rows that pass it.
    pub fn filter(mut self, f: impl Into<String>) -> Self {
        self.req.filter = f.into();
        self
    }

    /// Payload fields returned with each hit; `["*"]` for all (default none).
    pub fn output_fields<I: IntoIterator<Item = S>, S: Into<String>>(mut self, f: I) -> Self {
        self.req.output_fields = fields(f);
        self
    }

    /// IVF: lists probed (0: the server's default).
    pub fn nprobe(mut self, n: u32) -> Self {
        self.req.params.get_or_insert_default().nprobe = n;
        self
    }

    /// HNSW: search breadth (0: the server's default).
    pub fn ef(mut self, ef: u32) -> Self {
        self.req.params.get_or_insert_default().ef_search = ef;
        self
    }

    read_setters!();

    async fn send(mut self) -> Result<Vec<Vec<Hit>>> {
        let Some(first) = self.vectors.first() else { return Err(ClientError::invalid("a search needs at least one query vector")) };
        let dim = first.len();
        if dim == 0 {
            return Err(ClientError::invalid("query vector 0 is empty"));
        }
        if let Some((i, v)) = self.vectors.iter().enumerate().find(|(_, v)| v.len() != dim) {
            return Err(ClientError::invalid(format!("query vector {i} has {} elements, query vector 0 has {dim}", v.len())));
        }
        self.req.vectors = self.vectors.concat();
        self.req.read = Some(self.client.read_options(self.opts.consistency));
        let c = self.client;
        let r = c.idempotent("Search", self.req, self.opts.timeout, rpc!(c.tandem, search)).await?;
        c.session.observe_encoded(&r.session_token);
        Ok(r.results.into_iter().map(|h| h.hits.into_iter().map(Hit::from).collect()).collect())
    }
}

into_future!(Search, Vec<Vec<Hit>>);

#[must_use = "a get does nothing until awaited"]
pub struct Get<'a> {
    client: &'a Client,
    req: pb::GetRequest,
    opts: CallOpts,
}

impl Get<'_> {
    /// Payload fields returned; `["*"]` for all (default none).
    pub fn output_fields<I: IntoIterator<Item = S>, S: Into<String>>(mut self, f: I) -> Self {
        self.req.output_fields = fields(f);
        self
    }

    pub fn include_vectors(mut self, on: bool) -> Self {
        self.req.include_vectors = on;
        self
    }

    read_setters!();

    async fn send(mut self) -> Result<Vec<Entity>> {
        self.req.read = Some(self.client.read_options(self.opts.consistency));
        let c = self.client;
        let r = c.idempotent("Get", self.req, self.opts.timeout, rpc!(c.tandem, get)).await?;
        c.session.observe_encoded(&r.session_token);
        Ok(r.entities.into_iter().map(Entity::from).collect())
    }
}

into_future!(Get, Vec<Entity>);

#[must_use = "a query does nothing until awaited"]
pub struct Query<'a> {
    client: &'a Client,
    req: pb::QueryRequest,
    opts: CallOpts,
}

impl Query<'_> {
    pub fn filter(mut self, f: impl Into<String>) -> Self {
        self.req.filter = f.into();
        self
    }

    /// At most this many rows (0: the server's default, 1000; at most 16384).
    pub fn limit(mut self, n: u32) -> Self {
        self.req.limit = n;
        self
    }

    /// Payload fields returned; `["*"]` for all (default none).
    pub fn output_fields<I: IntoIterator<Item = S>, S: Into<String>>(mut self, f: I) -> Self {
        self.req.output_fields = fields(f);
        self
    }

    pub fn include_vectors(mut self, on: bool) -> Self {
        self.req.include_vectors = on;
        self
    }

    read_setters!();

    async fn send(mut self) -> Result<Vec<Entity>> {
        self.req.read = Some(self.client.read_options(self.opts.consistency));
        let c = self.client;
        let r = c.idempotent("Query", self.req, self.opts.timeout, rpc!(c.tandem, query)).await?;
        c.session.observe_encoded(&r.session_token);
        Ok(r.entities.into_iter().map(Entity::from).collect())
    }
}

into_future!(Query, Vec<Entity>);

#[must_use = "a count does nothing until awaited"]
pub struct Count<'a> {
    client: &'a Client,
    req: pb::CountRequest,
    opts: CallOpts,
}

impl Count<'_> {
    pub fn filter(mut self, f: impl Into<String>) -> Self {
        self.req.filter = f.into();
        self
    }

    read_setters!();

    async fn send(mut self) -> Result<u64> {
        self.req.read = Some(self.client.read_options(self.opts.consistency));
        let c = self.client;
        let r = c.idempotent("Count", self.req, self.opts.timeout, rpc!(c.tandem, count)).await?;
        c.session.observe_encoded(&r.session_token);
        Ok(r.count)
    }
}

into_future!(Count, u64);

enum WriteKind {
    Insert(Rows),
    Upsert(Rows),
    DeleteIds(Vec<i64>),
    DeleteWhere(String),
}

/// An insert, upsert or delete; sent once when awaited (never retried by the SDK).
#[must_use = "a write does nothing until awaited"]
pub struct Write<'a> {
    client: &'a Client,
    collection: String,
    kind: WriteKind,
    ack: Ack,
    timeout: Option<Duration>,
}

impl<'a> Write<'a> {
    fn new(client: &'a Client, collection: &str, kind: WriteKind) -> Self {
        Write { client, collection: collection.into(), kind, ack: Ack::ClusterDefault, timeout: None }
    }

    /// When the leader acknowledges (default: the cluster's `replication.ack`).
    pub fn ack(mut self, ack: Ack) -> Self {
        self.ack = ack;
        self
    }

    /// This call's deadline, instead of the client's.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    async fn send(self) -> Result<WriteResult> {
        let Write { client: c, collection, kind, ack, timeout } = self;
        let ack = ack.to_pb();
        let r = match kind {
            WriteKind::Insert(rows) => {
                let (ids, vectors, payloads) = rows.into_wire()?;
                let req = pb::InsertRequest { collection, ids, vectors, payloads, ack };
                c.once(req, timeout, rpc!(c.tandem, insert)).await?
            }
            WriteKind::Upsert(rows) => {
                let (ids, vectors, payloads) = rows.into_wire()?;
                let req = pb::UpsertRequest { collection, ids, vectors, payloads, ack };
                c.once(req, timeout, rpc!(c.tandem, upsert)).await?
            }
            WriteKind::DeleteIds(ids) => {
                if ids.is_empty() {
                    return Err(ClientError::invalid("delete_ids with no ids: nothing to delete"));
                }
                let req = pb::DeleteRequest { collection, ids, filter: String::new(), ack };
                c.once(req, timeout, rpc!(c.tandem, delete)).await?
            }
            WriteKind::DeleteWhere(filter) => {
                if filter.trim().is_empty() {
                    return Err(ClientError::invalid("delete_where with an empty filter: to delete every row, drop the collection"));
                }
                let req = pb::DeleteRequest { collection, ids: Vec::new(), filter, ack };
                c.once(req, timeout, rpc!(c.tandem, delete)).await?
            }
        };
        c.session.observe_encoded(&r.session_token);
        Ok(WriteResult { count: r.count, ts: r.ts, session_token: r.session_token })
    }
}

into_future!(Write, WriteResult);
