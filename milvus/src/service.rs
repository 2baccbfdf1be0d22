//! `MilvusService` over an inner tandem API: each RPC is translated into calls on `T`, in
//! process, carrying the caller's metadata (deadline, trace context) along.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prost::Message;
use tandem_proto::session::physical_ms;
use tandem_proto::v1 as t;
use tandem_proto::v1::tandem_server::Tandem;
use tonic::{Request, Response};

use crate::convert::{self, Entity, OutputPlan};
use crate::pb::common as mc;
use crate::pb::milvus as mm;
use crate::pb::schema as ms;
use crate::status::{self, MilvusCode, MilvusError};

type Reply<T> = Result<Response<T>, tonic::Status>;

/// How long a collection's schema is reused without asking again. Only names are taken from
/// it (key, vector, declared fields): the cluster still checks every write against its own.
/// Also how long a collection created or dropped through this endpoint is known to exist or
/// not without asking: behind the gateway a read may reach an alternative that has not applied
/// the DDL yet, and a client must not see its own create or drop undone.
const SCHEMA_TTL: Duration = Duration::from_secs(2);

/// The most rows a query returns (Milvus's default quota, and tandem's query limit).
const MAX_QUERY_ROWS: u32 = 16_384;

/// A collection as this endpoint last saw it, and when; `None`: dropped through this endpoint.
type Known = (Instant, Option<Arc<t::CollectionInfo>>);

/// Serves `MilvusService` by calling `inner`.
pub struct MilvusApi<T> {
    inner: Arc<T>,
    schemas: Mutex<HashMap<String, Known>>,
    connections: AtomicI64,
}

impl<T: Tandem> MilvusApi<T> {
    pub fn new(inner: Arc<T>) -> MilvusApi<T> {
        MilvusApi { inner, schemas: Mutex::new(HashMap::new()), connections: AtomicI64::new(1) }
    }

    /// A tonic service ready to add to a server, sharing `inner` with tandem's own API. RPCs of
    /// MilvusService that tandem does not serve answer a Milvus status naming the RPC.
    pub fn server(
        inner: Arc<T>,
        max_message_bytes: usize,
    ) -> crate::unsupported::NameUnsupported<mm::milvus_service_server::MilvusServiceServer<MilvusApi<T>>> {
        crate::unsupported::NameUnsupported::new(
            mm::milvus_service_server::MilvusServiceServer::new(MilvusApi::new(inner))
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
    }

    async fn describe(&self, md: &tonic::metadata::MetadataMap, name: &str) -> Result<Arc<t::CollectionInfo>, MilvusError> {
        if let Some((at, info)) = self.schemas.lock().get(name)
            && at.elapsed() < SCHEMA_TTL
        {
            return info.clone().ok_or_else(|| MilvusError::collection_not_found(name));
        }
        let info = match self.fresh(md, name).await {
            Ok(info) => Arc::new(info),
            Err(e) => {
                self.forget(name);
                return Err(e);
            }
        };
        self.remember(name, info.clone());
        Ok(info)
    }

    /// The collection as a replica describes it now, past this endpoint's memory.
    async fn fresh(&self, md: &tonic::metadata::MetadataMap, name: &str) -> Result<t::CollectionInfo, MilvusError> {
        match self.inner.describe_collection(inner(md, t::DescribeCollectionRequest { name: name.to_string() })).await {
            Ok(r) => Ok(r.into_inner().collection.unwrap_or_default()),
            Err(e) if e.code() == tonic::Code::NotFound => Err(MilvusError::collection_not_found(name)),
            Err(e) => Err(e.into()),
        }
    }

    fn remember(&self, name: &str, info: Arc<t::CollectionInfo>) {
        let mut schemas = self.schemas.lock();
        // Bounded: entries of collections no longer asked about go once stale.
        if schemas.len() > 4096 {
            schemas.retain(|_, (at, _)| at.elapsed() < SCHEMA_TTL);
        }
        schemas.insert(name.to_string(), (Instant::now(), Some(info)));
    }

    fn forget(&self, name: &str) {
        self.schemas.lock().remove(name);
    }

    /// Remembers an index change made through this endpoint (see [`SCHEMA_TTL`]).
    async fn index_changed(&self, md: &tonic::metadata::MetadataMap, name: &str, index: t::IndexSpec) {
        self.forget(name);
        if let Ok(info) = self.describe(md, name).await {
            let mut info = (*info).clone();
            if let Some(s) = info.schema.as_mut() {
                if index.metric != 0 {
                    s.metric = index.metric;
                }
                s.index = Some(t::IndexSpec { metric: 0, ..index });
            }
            self.remember(name, Arc::new(info));
        }
    }

    fn dropped(&self, name: &str) {
        self.schemas.lock().insert(name.to_string(), (Instant::now(), None));
    }

    /// The checks every RPC naming a collection makes first: the database, the partitions, and
    /// that the collection exists (as this endpoint knows it).
    async fn known(
        &self,
        md: &tonic::metadata::MetadataMap,
        db: &str,
        name: &str,
        partitions: &[String],
    ) -> Result<Arc<t::CollectionInfo>, MilvusError> {
        check_db(db)?;
        check_partitions(partitions)?;
        self.describe(md, name).await
    }

    /// The collection whose id is `id` (a request that names no collection).
    async fn by_id(&self, md: &tonic::metadata::MetadataMap, db: &str, id: i64) -> Result<Arc<t::CollectionInfo>, MilvusError> {
        check_db(db)?;
        let names = self.inner.list_collections(inner(md, t::ListCollectionsRequest {})).await?.into_inner().names;
        for name in names {
            let info = self.describe(md, &name).await?;
            if info.collection_id as i64 == id {
                return Ok(info);
            }
        }
        Err(MilvusError::collection_not_found(&format!("id {id}")))
    }

    async fn write_rows(&self, md: &tonic::metadata::MetadataMap, w: RowsWrite) -> Result<mm::MutationResult, MilvusError> {
        let schema = schema_of(&*self.known(md, &w.db, &w.collection, std::slice::from_ref(&w.partition)).await?);
        let rows = convert::rows_from_fields(&schema, &w.columns, w.num_rows)?;
        let n = rows.vectors.len() / (schema.dim as usize).max(1);
        let r = if w.upsert {
            if schema.auto_id {
                return Err(MilvusError::invalid(format!(
                    "collection {:?} assigns ids (auto_id): upsert needs ids it cannot take",
                    w.collection
                )));
            }
            let req = t::UpsertRequest { collection: w.collection, ids: rows.ids, vectors: rows.vectors, payloads: rows.payloads, ack: 0 };
            self.inner.upsert(inner(md, req)).await?.into_inner()
        } else {
            let req = t::InsertRequest {
                collection: w.collection,
                ids: rows.ids.clone(),
                vectors: rows.vectors,
                payloads: rows.payloads,
                ack: 0,
            };
            let mut r = self.inner.insert(inner(md, req)).await?.into_inner();
            if r.ids.is_empty() {
                r.ids = rows.ids;
            }
            r
        };
        let count = r.count as i64;
        Ok(mm::MutationResult {
            status: Some(status::ok()),
            i_ds: Some(int_ids(r.ids)),
            succ_index: (0..n as u32).collect(),
            insert_cnt: if w.upsert { 0 } else { count },
            upsert_cnt: if w.upsert { count } else { 0 },
            timestamp: r.ts,
            ..Default::default()
        })
    }
}

struct RowsWrite {
    db: String,
    collection: String,
    partition: String,
    columns: Vec<ms::FieldData>,
    num_rows: u32,
    upsert: bool,
}

fn schema_of(info: &t::CollectionInfo) -> t::CollectionSchema {
    info.schema.clone().unwrap_or_default()
}

/// Primary keys as Milvus lists them.
fn int_ids(data: Vec<i64>) -> ms::IDs {
    ms::IDs { id_field: Some(ms::i_ds::IdField::IntId(ms::LongArray { data })) }
}

/// An inner request carrying the caller's metadata (grpc-timeout, traceparent, ...).
fn inner<M>(md: &tonic::metadata::MetadataMap, msg: M) -> Request<M> {
    Request::from_parts(md.clone(), tonic::Extensions::default(), msg)
}

fn check_db(db: &str) -> Result<(), MilvusError> {
    if db.is_empty() || db == "default" {
        Ok(())
    } else {
        Err(MilvusError::Status {
            code: MilvusCode::DatabaseNotFound,
            reason: format!("database not found[database={db}]: tandem has only the default database"),
        })
    }
}

fn check_partition(p: &str) -> Result<(), MilvusError> {
    if p.is_empty() || p == "_default" {
        Ok(())
    } else {
        Err(MilvusError::unsupported(format!("partition {p:?} (tandem collections have only the _default partition)")))
    }
}

fn check_partitions(ps: &[String]) -> Result<(), MilvusError> {
    ps.iter().try_for_each(|p| check_partition(p))
}

/// A reply whose body is a bare `common.Status`.
fn done(r: Result<(), MilvusError>) -> Reply<mc::Status> {
    match r {
        Ok(()) => Ok(Response::new(status::ok())),
        Err(MilvusError::Grpc(s)) => Err(s),
        Err(e) => Ok(Response::new(e.status().expect("a status error"))),
    }
}

/// Replies carrying a `status` field.
trait WithStatus: Default {
    fn set_status(&mut self, s: mc::Status);
}

macro_rules! with_status {
    ($($t:ty),* $(,)?) => {
        $(impl WithStatus for $t {
            fn set_status(&mut self, s: mc::Status) {
                self.status = Some(s);
            }
        })*
    };
}

with_status!(
    mm::BoolResponse,
    mm::DescribeCollectionResponse,
    mm::GetCollectionStatisticsResponse,
    mm::ShowCollectionsResponse,
    mm::DescribeIndexResponse,
    mm::MutationResult,
    mm::SearchResults,
    mm::QueryResults,
    mm::FlushResponse,
    mm::GetFlushStateResponse,
    mm::GetLoadingProgressResponse,
    mm::GetLoadStateResponse,
    mm::GetVersionResponse,
    mm::CheckHealthResponse,
    mm::AllocTimestampResponse,
    mm::ConnectResponse,
    mm::GetReplicasResponse,
);

fn reply<R: WithStatus>(r: Result<R, MilvusError>) -> Reply<R> {
    match r {
        Ok(mut v) => {
            v.set_status(status::ok());
            Ok(Response::new(v))
        }
        Err(MilvusError::Grpc(s)) => Err(s),
        Err(e) => {
            let mut v = R::default();
            v.set_status(e.status().expect("a status error"));
            Ok(Response::new(v))
        }
    }
}

/// Search parameters from Milvus's key/value list (values as pymilvus writes them: strings,
/// numbers, or a JSON object under "params").
#[derive(Debug)]
struct SearchParams {
    limit: u32,
    offset: u32,
    round_decimal: i32,
    metric: Option<String>,
    anns_field: Option<String>,
    ef: u32,
    nprobe: u32,
}

/// Milvus's key/value parameters as one JSON map: each value read as JSON where it parses (a
/// string otherwise), and the object under "params" merged in. A "params" that is no object
/// stays a string under that key.
fn param_map(kvs: &[mc::KeyValuePair]) -> serde_json::Map<String, serde_json::Value> {
    let mut all = serde_json::Map::new();
    for kv in kvs {
        match serde_json::from_str(&kv.value) {
            Ok(serde_json::Value::Object(m)) if kv.key == "params" => all.extend(m),
            Ok(v) if kv.key != "params" => drop(all.insert(kv.key.clone(), v)),
            _ => drop(all.insert(kv.key.clone(), serde_json::Value::String(kv.value.clone()))),
        }
    }
    all
}

/// `what` ("search", "index") parameter `key` as an integer.
fn number(what: &str, key: &str, v: &serde_json::Value) -> Result<i64, MilvusError> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        .ok_or_else(|| MilvusError::invalid(format!("{what} parameter {key} is {v}, not an integer")))
}

/// [`number`], within u32.
fn count(what: &str, key: &str, v: &serde_json::Value) -> Result<u32, MilvusError> {
    u32::try_from(number(what, key, v)?).map_err(|_| MilvusError::invalid(format!("{what} parameter {key} is {v}, out of range")))
}

fn search_params(kvs: &[mc::KeyValuePair]) -> Result<SearchParams, MilvusError> {
    let all = param_map(kvs);
    if let Some(v) = all.get("params") {
        return Err(MilvusError::invalid(format!("search parameter params is {v}, not a JSON object")));
    }
    let mut p = SearchParams { limit: 0, offset: 0, round_decimal: -1, metric: None, anns_field: None, ef: 0, nprobe: 0 };
    for (k, v) in &all {
        match k.as_str() {
            "topk" | "limit" => p.limit = count("search", k, v)?,
            "offset" => p.offset = count("search", k, v)?,
            "round_decimal" => p.round_decimal = number("search", k, v)? as i32,
            "metric_type" => p.metric = v.as_str().map(str::to_ascii_uppercase),
            "anns_field" => p.anns_field = v.as_str().map(str::to_string),
            "ef" => p.ef = count("search", k, v)?,
            "nprobe" => p.nprobe = count("search", k, v)?,
            "radius" | "range_filter" => return Err(MilvusError::unsupported("range search (radius, range_filter)")),
            "group_by_field" | "group_size" | "iterator" | "search_iter_v2" | "order_by_fields" => {
                return Err(MilvusError::unsupported(format!("search parameter {k}")));
            }
            // Hints and tuning knobs of other index types change no result here.
            _ => {}
        }
    }
    if p.limit == 0 {
        return Err(MilvusError::invalid("search needs a limit (topk) of at least 1"));
    }
    Ok(p)
}

fn metric_name(m: i32) -> &'static str {
    match t::Metric::try_from(m) {
        Ok(t::Metric::Ip) => "IP",
        Ok(t::Metric::Cosine) => "COSINE",
        _ => "L2",
    }
}

fn metric_from_name(name: &str) -> Result<t::Metric, MilvusError> {
    match name.trim().to_ascii_uppercase().as_str() {
        "L2" => Ok(t::Metric::L2),
        "IP" => Ok(t::Metric::Ip),
        "COSINE" => Ok(t::Metric::Cosine),
        other => Err(MilvusError::invalid(format!("metric type {other:?} is not supported: use L2, IP or COSINE"))),
    }
}

/// The index a Milvus CreateIndex asks for, and its metric.
fn index_spec(kvs: &[mc::KeyValuePair]) -> Result<(t::IndexSpec, Option<t::Metric>), MilvusError> {
    let all = param_map(kvs);
    let get = |k: &str| all.get(k);
    let int = |k: &str, default: u32| get(k).map_or(Ok(default), |v| count("index", k, v));
    let kind_name = get("index_type").and_then(|v| v.as_str()).unwrap_or("AUTOINDEX").to_ascii_uppercase();
    use t::index_spec::Kind;
    let kind = match kind_name.as_str() {
        "FLAT" => Kind::Flat(t::FlatIndex {}),
        "IVF_FLAT" => Kind::IvfFlat(t::IvfFlatIndex { nlist: int("nlist", 128)? }),
        // AUTOINDEX: tandem's choice, HNSW with the usual parameters.
        "HNSW" | "AUTOINDEX" => Kind::Hnsw(t::HnswIndex { m: int("M", 16)?, ef_construction: int("efConstruction", 200)? }),
        other => return Err(MilvusError::invalid(format!("index type {other:?} is not supported: use FLAT, IVF_FLAT, HNSW or AUTOINDEX"))),
    };
    let metric = get("metric_type").and_then(|v| v.as_str()).map(metric_from_name).transpose()?;
    Ok((t::IndexSpec { kind: Some(kind), metric: metric.map_or(0, |m| m as i32) }, metric))
}

/// How Milvus describes tandem's index (`params` as Milvus lists them). Rows count as indexed
/// in segments indexed with the current index, pending in sealed segments waiting for it;
/// growing rows are neither (Milvus indexes sealed segments only, too).
fn index_description(info: &t::CollectionInfo) -> mm::IndexDescription {
    let s = info.schema.clone().unwrap_or_default();
    let rows_in = |state: t::segment_info::State| -> u64 {
        info.segments.iter().filter(|g| g.state == state as i32).map(|g| g.rows.saturating_sub(g.deleted)).sum()
    };
    let (indexed, pending) = (rows_in(t::segment_info::State::Indexed), rows_in(t::segment_info::State::Sealed));
    use t::index_spec::Kind;
    let kv = |k: &str, v: String| mc::KeyValuePair { key: k.into(), value: v };
    let mut params = vec![kv("metric_type", metric_name(s.metric).into())];
    match s.index.as_ref().and_then(|i| i.kind.as_ref()) {
        None | Some(Kind::Flat(_)) => params.push(kv("index_type", "FLAT".into())),
        Some(Kind::IvfFlat(x)) => {
            params.push(kv("index_type", "IVF_FLAT".into()));
            params.push(kv("nlist", x.nlist.to_string()));
        }
        Some(Kind::Hnsw(x)) => {
            params.push(kv("index_type", "HNSW".into()));
            params.push(kv("M", x.m.to_string()));
            params.push(kv("efConstruction", x.ef_construction.to_string()));
        }
    }
    let vector = convert::vector_name(&s).to_string();
    let state = if pending == 0 { mc::IndexState::Finished } else { mc::IndexState::InProgress };
    mm::IndexDescription {
        index_name: vector.clone(),
        index_id: 1,
        params,
        field_name: vector,
        indexed_rows: indexed as i64,
        total_rows: info.rows as i64,
        pending_index_rows: pending as i64,
        state: state as i32,
        ..Default::default()
    }
}

fn round(v: f32, decimals: i32) -> f32 {
    if decimals < 0 {
        return v;
    }
    let p = 10f64.powi(decimals);
    ((f64::from(v) * p).round() / p) as f32
}

#[tonic::async_trait]
impl<T: Tandem> mm::milvus_service_server::MilvusService for MilvusApi<T> {
    async fn connect(&self, _req: Request<mm::ConnectRequest>) -> Reply<mm::ConnectResponse> {
        let server_info = mc::ServerInfo {
            build_tags: format!("tandem {}", env!("CARGO_PKG_VERSION")),
            deploy_mode: "tandem".into(),
            ..Default::default()
        };
        reply(Ok(mm::ConnectResponse {
            status: None,
            server_info: Some(server_info),
            identifier: self.connections.fetch_add(1, Ordering::Relaxed),
        }))
    }

    async fn get_version(&self, _req: Request<mm::GetVersionRequest>) -> Reply<mm::GetVersionResponse> {
        reply(Ok(mm::GetVersionResponse { status: None, version: crate::MILVUS_VERSION.into() }))
    }

    async fn check_health(&self, req: Request<mm::CheckHealthRequest>) -> Reply<mm::CheckHealthResponse> {
        let r = self.inner.get_cluster_info(inner(req.metadata(), t::GetClusterInfoRequest {})).await;
        let (healthy, reasons) = match r {
            Ok(_) => (true, Vec::new()),
            Err(e) => (false, vec![e.message().to_string()]),
        };
        reply(Ok(mm::CheckHealthResponse { status: None, is_healthy: healthy, reasons }))
    }

    async fn alloc_timestamp(&self, req: Request<mm::AllocTimestampRequest>) -> Reply<mm::AllocTimestampResponse> {
        let r = async {
            let info = self.inner.get_cluster_info(inner(req.metadata(), t::GetClusterInfoRequest {})).await?.into_inner();
            Ok(mm::AllocTimestampResponse { status: None, timestamp: info.current_ts })
        };
        reply(r.await)
    }

    async fn create_collection(&self, req: Request<mm::CreateCollectionRequest>) -> Reply<mc::Status> {
        let (md, _, r) = req.into_parts();
        done(
            async {
                check_db(&r.db_name)?;
                let schema = ms::CollectionSchema::decode(r.schema.as_slice())
                    .map_err(|e| MilvusError::invalid(format!("the collection schema does not decode: {e}")))?;
                let schema = convert::schema_to_tandem(&r.collection_name, &schema, r.shards_num)?;
                self.forget(&r.collection_name);
                let created =
                    self.inner.create_collection(inner(&md, t::CreateCollectionRequest { schema: Some(schema) })).await?.into_inner();
                if let Some(info) = created.collection {
                    self.remember(&r.collection_name, Arc::new(info));
                }
                Ok(())
            }
            .await,
        )
    }

    async fn drop_collection(&self, req: Request<mm::DropCollectionRequest>) -> Reply<mc::Status> {
        let (md, _, r) = req.into_parts();
        self.forget(&r.collection_name);
        done(
            async {
                check_db(&r.db_name)?;
                match self.inner.drop_collection(inner(&md, t::DropCollectionRequest { name: r.collection_name.clone() })).await {
                    // Milvus answers success for a collection that does not exist.
                    Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
                    Err(e) => Err(e.into()),
                    Ok(_) => {
                        self.dropped(&r.collection_name);
                        Ok(())
                    }
                }
            }
            .await,
        )
    }

    async fn has_collection(&self, req: Request<mm::HasCollectionRequest>) -> Reply<mm::BoolResponse> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                match self.known(&md, &r.db_name, &r.collection_name, &[]).await {
                    Ok(_) => Ok(mm::BoolResponse { status: None, value: true }),
                    Err(MilvusError::Status { code: MilvusCode::CollectionNotFound, .. }) => {
                        Ok(mm::BoolResponse { status: None, value: false })
                    }
                    Err(e) => Err(e),
                }
            }
            .await,
        )
    }

    async fn load_collection(&self, req: Request<mm::LoadCollectionRequest>) -> Reply<mc::Status> {
        let (md, _, r) = req.into_parts();
        // A tandem collection is always in memory and searchable: loading sets how many of the
        // cluster's replica groups (query_nodes.groups, docs/scaling.md) hold copies of it,
        // `replica_number` of them (0 is Milvus's default, 1). A cluster without query nodes is
        // one replica.
        done(
            async {
                self.known(&md, &r.db_name, &r.collection_name, &[]).await?;
                if r.replica_number < 0 {
                    return Err(MilvusError::invalid(format!("replica_number {} is negative", r.replica_number)));
                }
                let replicas = r.replica_number.max(1) as u32;
                if replicas > 1 {
                    // Checked here too, to name Milvus's parameter; the cluster checks again.
                    let cluster = self.inner.get_cluster_info(inner(&md, t::GetClusterInfoRequest {})).await?.into_inner();
                    let groups = replica_groups(&cluster, None).len();
                    if replicas as usize > groups {
                        return Err(MilvusError::invalid(format!(
                            "replica_number {replicas} is more than the {groups} replica group(s) the cluster has (query_nodes.groups; docs/scaling.md)"
                        )));
                    }
                }
                let req = t::LoadCollectionRequest { name: r.collection_name.clone(), replicas: Some(replicas) };
                self.inner.load_collection(inner(&md, req)).await?;
                Ok(())
            }
            .await,
        )
    }

    async fn release_collection(&self, req: Request<mm::ReleaseCollectionRequest>) -> Reply<mc::Status> {
        let (md, _, r) = req.into_parts();
        // The query nodes release their copies; the collection stays searchable, served by the
        // cluster's own process, which holds every segment (docs/milvus.md).
        done(
            async {
                self.known(&md, &r.db_name, &r.collection_name, &[]).await?;
                let req = t::LoadCollectionRequest { name: r.collection_name.clone(), replicas: Some(0) };
                self.inner.load_collection(inner(&md, req)).await?;
                Ok(())
            }
            .await,
        )
    }

    async fn describe_collection(&self, req: Request<mm::DescribeCollectionRequest>) -> Reply<mm::DescribeCollectionResponse> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                let info = self.known(&md, &r.db_name, &r.collection_name, &[]).await?;
                let s = schema_of(&info);
                Ok(mm::DescribeCollectionResponse {
                    schema: Some(convert::schema_to_milvus(&s)),
                    collection_id: info.collection_id as i64,
                    virtual_channel_names: (0..s.shards).map(|i| format!("{}_shard{i}", s.name)).collect(),
                    physical_channel_names: (0..s.shards).map(|i| format!("{}_shard{i}", s.name)).collect(),
                    created_timestamp: info.created_ts,
                    created_utc_timestamp: physical_ms(info.created_ts),
                    shards_num: s.shards as i32,
                    consistency_level: mc::ConsistencyLevel::Bounded as i32,
                    collection_name: s.name.clone(),
                    db_name: "default".into(),
                    num_partitions: 1,
                    update_timestamp: info.created_ts,
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn get_collection_statistics(
        &self,
        req: Request<mm::GetCollectionStatisticsRequest>,
    ) -> Reply<mm::GetCollectionStatisticsResponse> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                // Row counts fresh; a collection dropped through this endpoint stays dropped.
                self.known(&md, &r.db_name, &r.collection_name, &[]).await?;
                let info = self.fresh(&md, &r.collection_name).await?;
                Ok(mm::GetCollectionStatisticsResponse {
                    status: None,
                    stats: vec![mc::KeyValuePair { key: "row_count".into(), value: info.rows.to_string() }],
                })
            }
            .await,
        )
    }

    async fn show_collections(&self, req: Request<mm::ShowCollectionsRequest>) -> Reply<mm::ShowCollectionsResponse> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                check_db(&r.db_name)?;
                let names = self.inner.list_collections(inner(&md, t::ListCollectionsRequest {})).await?.into_inner().names;
                let names: Vec<String> = if r.collection_names.is_empty() {
                    names
                } else {
                    names.into_iter().filter(|n| r.collection_names.contains(n)).collect()
                };
                let n = names.len();
                Ok(mm::ShowCollectionsResponse {
                    status: None,
                    collection_names: names,
                    in_memory_percentages: vec![100; n],
                    query_service_available: vec![true; n],
                    ..Default::default()
                })
            }
            .await,
        )
    }

    async fn create_index(&self, req: Request<mm::CreateIndexRequest>) -> Reply<mc::Status> {
        let (md, _, r) = req.into_parts();
        done(
            async {
                let s = schema_of(&*self.known(&md, &r.db_name, &r.collection_name, &[]).await?);
                if r.field_name != convert::vector_name(&s) {
                    if s.fields.iter().any(|f| f.name == r.field_name) {
                        // Scalar indexes speed filters up in Milvus; tandem filters without one,
                        // with the same results, so the request changes nothing.
                        return Ok(());
                    }
                    return Err(MilvusError::invalid(format!(
                        "field {:?} does not exist in collection {:?}",
                        r.field_name, r.collection_name
                    )));
                }
                let (index, _) = index_spec(&r.extra_params)?;
                self.forget(&r.collection_name);
                self.inner
                    .create_index(inner(&md, t::CreateIndexRequest { collection: r.collection_name.clone(), index: Some(index) }))
                    .await?;
                self.index_changed(&md, &r.collection_name, index).await;
                Ok(())
            }
            .await,
        )
    }

    async fn describe_index(&self, req: Request<mm::DescribeIndexRequest>) -> Reply<mm::DescribeIndexResponse> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                let known = self.known(&md, &r.db_name, &r.collection_name, &[]).await?;
                // Segment states fresh (progress is what a client polls for); the schema as this
                // endpoint knows it (an index changed through it wins over a lagging replica).
                let mut info = self.fresh(&md, &r.collection_name).await?;
                info.schema = known.schema.clone();
                let d = index_description(&info);
                let asked = if r.index_name.is_empty() { &r.field_name } else { &r.index_name };
                if !asked.is_empty() && *asked != d.index_name {
                    return Err(MilvusError::Status {
                        code: MilvusCode::IndexNotFound,
                        reason: format!("index not found[indexName={asked}]"),
                    });
                }
                Ok(mm::DescribeIndexResponse { status: None, index_descriptions: vec![d] })
            }
            .await,
        )
    }

    async fn drop_index(&self, req: Request<mm::DropIndexRequest>) -> Reply<mc::Status> {
        let (md, _, r) = req.into_parts();
        self.forget(&r.collection_name);
        done(
            async {
                check_db(&r.db_name)?;
                self.inner.drop_index(inner(&md, t::DropIndexRequest { collection: r.collection_name.clone() })).await?;
                let flat = t::IndexSpec { kind: Some(t::index_spec::Kind::Flat(t::FlatIndex {})), metric: 0 };
                self.index_changed(&md, &r.collection_name, flat).await;
                Ok(())
            }
            .await,
        )
    }

    async fn insert(&self, req: Request<mm::InsertRequest>) -> Reply<mm::MutationResult> {
        let (md, _, r) = req.into_parts();
        let w = RowsWrite {
            db: r.db_name,
            collection: r.collection_name,
            partition: r.partition_name,
            columns: r.fields_data,
            num_rows: r.num_rows,
            upsert: false,
        };
        reply(self.write_rows(&md, w).await)
    }

    async fn upsert(&self, req: Request<mm::UpsertRequest>) -> Reply<mm::MutationResult> {
        let (md, _, r) = req.into_parts();
        if r.partial_update {
            return reply(Err(MilvusError::unsupported("partial update")));
        }
        let w = RowsWrite {
            db: r.db_name,
            collection: r.collection_name,
            partition: r.partition_name,
            columns: r.fields_data,
            num_rows: r.num_rows,
            upsert: true,
        };
        reply(self.write_rows(&md, w).await)
    }

    async fn delete(&self, req: Request<mm::DeleteRequest>) -> Reply<mm::MutationResult> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                check_db(&r.db_name)?;
                check_partition(&r.partition_name)?;
                if r.expr.trim().is_empty() {
                    return Err(MilvusError::invalid("delete needs an expression (expr)"));
                }
                let d = self
                    .inner
                    .delete(inner(&md, t::DeleteRequest { collection: r.collection_name.clone(), ids: Vec::new(), filter: r.expr, ack: 0 }))
                    .await?
                    .into_inner();
                Ok(mm::MutationResult { delete_cnt: d.count as i64, timestamp: d.ts, i_ds: Some(ms::IDs::default()), ..Default::default() })
            }
            .await,
        )
    }

    async fn search(&self, req: Request<mm::SearchRequest>) -> Reply<mm::SearchResults> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                let s = schema_of(&*self.known(&md, &r.db_name, &r.collection_name, &r.partition_names).await?);
                let p = search_params(&r.search_params)?;
                if let Some(f) = p.anns_field.as_deref().filter(|f| !f.is_empty() && *f != convert::vector_name(&s)) {
                    return Err(MilvusError::invalid(format!(
                        "anns_field {f:?} is not the vector field of collection {:?}",
                        r.collection_name
                    )));
                }
                if let Some(m) = p.metric.as_deref().filter(|m| !m.is_empty()) {
                    let want = metric_name(s.metric);
                    if m != want {
                        return Err(MilvusError::invalid(format!(
                            "metric type not match: the search asks for {m}, collection {:?} is indexed for {want}",
                            r.collection_name
                        )));
                    }
                }
                let Some(mm::search_request::SearchInput::PlaceholderGroup(group)) = &r.search_input else {
                    return Err(MilvusError::unsupported("search by primary keys"));
                };
                let (vectors, nq) = convert::query_vectors(group, s.dim as usize)?;
                let plan = OutputPlan::new(&s, &r.output_fields)?;
                let read = convert::read_options(r.consistency_level, r.guarantee_timestamp, r.use_default_consistency);
                let top_k = p.limit.checked_add(p.offset).ok_or_else(|| MilvusError::invalid("limit + offset is out of range"))?;
                let req = t::SearchRequest {
                    collection: r.collection_name.clone(),
                    vectors,
                    top_k,
                    filter: r.dsl.clone(),
                    output_fields: plan.tandem_fields(),
                    params: Some(t::SearchParams { nprobe: p.nprobe, ef_search: p.ef }),
                    read: Some(read),
                };
                let found = self.inner.search(inner(&md, req)).await?.into_inner();
                let mut token = found.session_token.clone();
                let mut hits: Vec<&t::Hit> = Vec::new();
                let mut topks = Vec::with_capacity(nq);
                for q in &found.results {
                    let page: Vec<&t::Hit> = q.hits.iter().skip(p.offset as usize).collect();
                    topks.push(page.len() as i64);
                    hits.extend(page);
                }
                // Vectors come from a Get at the search's snapshot (passing its token).
                let mut vectors: HashMap<i64, Vec<f32>> = HashMap::new();
                if plan.vector && !hits.is_empty() {
                    let ids: Vec<i64> = hits.iter().map(|h| h.id).collect();
                    let read =
                        t::ReadOptions { consistency: t::ConsistencyLevel::Session as i32, session_token: token.clone(), staleness_ms: 0 };
                    let got = self
                        .inner
                        .get(inner(
                            &md,
                            t::GetRequest {
                                collection: r.collection_name.clone(),
                                ids,
                                output_fields: vec![],
                                include_vectors: true,
                                read: Some(read),
                            },
                        ))
                        .await?
                        .into_inner();
                    token = got.session_token;
                    vectors = got.entities.into_iter().map(|e| (e.id, e.vector)).collect();
                }
                let entities: Vec<Entity<'_>> = hits
                    .iter()
                    .map(|h| Entity { id: h.id, vector: vectors.get(&h.id).map_or(&[][..], Vec::as_slice), payload: h.payload.as_ref() })
                    .collect();
                let results = ms::SearchResultData {
                    num_queries: nq as i64,
                    top_k: i64::from(p.limit),
                    fields_data: convert::fields_from_entities(&s, &plan, &entities, false),
                    scores: hits.iter().map(|h| round(h.distance, p.round_decimal)).collect(),
                    ids: Some(int_ids(hits.iter().map(|h| h.id).collect())),
                    topks,
                    output_fields: plan.names.clone(),
                    distances: Vec::new(),
                    primary_field_name: convert::primary_name(&s).to_string(),
                };
                Ok(mm::SearchResults {
                    status: None,
                    results: Some(results),
                    collection_name: r.collection_name.clone(),
                    session_ts: convert::token_ts(&token),
                })
            }
            .await,
        )
    }

    async fn query(&self, req: Request<mm::QueryRequest>) -> Reply<mm::QueryResults> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                let s = schema_of(&*self.known(&md, &r.db_name, &r.collection_name, &r.partition_names).await?);
                let read = convert::read_options(r.consistency_level, r.guarantee_timestamp, r.use_default_consistency);
                let param = |k: &str| r.query_params.iter().find(|kv| kv.key == k).map(|kv| kv.value.trim().to_string());
                let parse = |k: &str| -> Result<Option<u32>, MilvusError> {
                    param(k)
                        .map(|v| {
                            v.parse::<u32>()
                                .map_err(|_| MilvusError::invalid(format!("query parameter {k} is {v:?}, not a non-negative integer")))
                        })
                        .transpose()
                };
                let (limit, offset) = (parse("limit")?, parse("offset")?.unwrap_or(0));
                let pk = convert::primary_name(&s).to_string();
                if r.output_fields.iter().any(|f| f.trim().eq_ignore_ascii_case("count(*)")) {
                    if r.output_fields.len() > 1 {
                        return Err(MilvusError::invalid("count(*) cannot be combined with other output fields"));
                    }
                    let c = self
                        .inner
                        .count(inner(
                            &md,
                            t::CountRequest { collection: r.collection_name.clone(), filter: r.expr.clone(), read: Some(read) },
                        ))
                        .await?
                        .into_inner();
                    let column = ms::FieldData {
                        r#type: ms::DataType::Int64 as i32,
                        field_name: "count(*)".into(),
                        field: Some(ms::field_data::Field::Scalars(ms::ScalarField {
                            data: Some(ms::scalar_field::Data::LongData(ms::LongArray { data: vec![c.count as i64] })),
                        })),
                        ..Default::default()
                    };
                    return Ok(mm::QueryResults {
                        fields_data: vec![column],
                        collection_name: r.collection_name.clone(),
                        output_fields: vec!["count(*)".into()],
                        session_ts: convert::token_ts(&c.session_token),
                        primary_field_name: pk,
                        ..Default::default()
                    });
                }
                if r.expr.trim().is_empty() && limit.is_none() {
                    return Err(MilvusError::invalid("empty expression should be used with limit"));
                }
                let plan = OutputPlan::new(&s, &r.output_fields)?;
                let want = limit.unwrap_or(MAX_QUERY_ROWS).saturating_add(offset);
                if want > MAX_QUERY_ROWS {
                    return Err(MilvusError::invalid(format!("query limit + offset is {want}, at most {MAX_QUERY_ROWS}")));
                }
                let req = t::QueryRequest {
                    collection: r.collection_name.clone(),
                    filter: r.expr.clone(),
                    limit: want,
                    output_fields: plan.tandem_fields(),
                    include_vectors: plan.vector,
                    read: Some(read),
                };
                let found = self.inner.query(inner(&md, req)).await?.into_inner();
                let entities: Vec<Entity<'_>> = found
                    .entities
                    .iter()
                    .skip(offset as usize)
                    .map(|e| Entity { id: e.id, vector: &e.vector, payload: e.payload.as_ref() })
                    .collect();
                let mut output_fields = vec![pk.clone()];
                output_fields.extend(plan.names.iter().cloned());
                Ok(mm::QueryResults {
                    status: None,
                    fields_data: convert::fields_from_entities(&s, &plan, &entities, true),
                    collection_name: r.collection_name.clone(),
                    output_fields,
                    session_ts: convert::token_ts(&found.session_token),
                    primary_field_name: pk,
                })
            }
            .await,
        )
    }

    async fn flush(&self, req: Request<mm::FlushRequest>) -> Reply<mm::FlushResponse> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                check_db(&r.db_name)?;
                let mut out = mm::FlushResponse { db_name: "default".into(), ..Default::default() };
                for name in &r.collection_names {
                    let f = self.inner.flush(inner(&md, t::FlushRequest { collection: name.clone() })).await?.into_inner();
                    out.coll_seg_i_ds.insert(name.clone(), ms::LongArray::default());
                    out.flush_coll_seg_i_ds.insert(name.clone(), ms::LongArray::default());
                    out.coll_seal_times.insert(name.clone(), 0);
                    out.coll_flush_ts.insert(name.clone(), convert::token_ts(&f.session_token));
                }
                Ok(out)
            }
            .await,
        )
    }

    async fn get_flush_state(&self, _req: Request<mm::GetFlushStateRequest>) -> Reply<mm::GetFlushStateResponse> {
        // tandem's Flush returns once its segments are sealed, indexed and persisted.
        reply(Ok(mm::GetFlushStateResponse { status: None, flushed: true }))
    }

    async fn get_loading_progress(&self, req: Request<mm::GetLoadingProgressRequest>) -> Reply<mm::GetLoadingProgressResponse> {
        let (md, _, r) = req.into_parts();
        let known = self.known(&md, &r.db_name, &r.collection_name, &r.partition_names).await;
        reply(known.map(|_| mm::GetLoadingProgressResponse { status: None, progress: 100, refresh_progress: 100 }))
    }

    async fn get_load_state(&self, req: Request<mm::GetLoadStateRequest>) -> Reply<mm::GetLoadStateResponse> {
        let (md, _, r) = req.into_parts();
        let known = self.known(&md, &r.db_name, &r.collection_name, &r.partition_names).await;
        reply(known.map(|_| mm::GetLoadStateResponse { status: None, state: mc::LoadState::Loaded as i32 }))
    }

    /// The cluster's replica groups (docs/milvus.md): one replica without query nodes, else one
    /// per `query_nodes.groups` entry. pymilvus asks by collection id only.
    async fn get_replicas(&self, req: Request<mm::GetReplicasRequest>) -> Reply<mm::GetReplicasResponse> {
        let (md, _, r) = req.into_parts();
        reply(
            async {
                let info = if r.collection_name.is_empty() {
                    self.by_id(&md, &r.db_name, r.collection_id).await?
                } else {
                    self.known(&md, &r.db_name, &r.collection_name, &[]).await?
                };
                let cluster = self.inner.get_cluster_info(inner(&md, t::GetClusterInfoRequest {})).await?.into_inner();
                let name = info.schema.as_ref().map_or("", |s| s.name.as_str());
                let replicas = replicas_of(&schema_of(&info), info.collection_id as i64, replica_groups(&cluster, Some(name)));
                Ok(mm::GetReplicasResponse { status: None, replicas })
            }
            .await,
        )
    }
}

/// The cluster's own process as a node id: the proxy, and the leader of a shard no query node
/// leads.
const CLUSTER_NODE: i64 = 1;

/// One replica group as Milvus reports a replica: the node ids of its live query nodes, and per
/// shard the one that leads it (keeps and searches its growing rows).
#[derive(Debug, Default, PartialEq)]
struct Group {
    nodes: Vec<i64>,
    /// shard -> (node id, address)
    leaders: std::collections::BTreeMap<u32, (i64, String)>,
}

/// The cluster's replica groups as Milvus counts replicas (LoadCollection's `replica_number`,
/// GetReplicas); with `collection`, only the groups holding it (LoadCollection set them), and
/// the shards of it that each group's query nodes lead. tandem has no numeric node ids, so query
/// nodes are numbered from 2 in the order GetClusterInfo lists them (per group, the listed ones,
/// then those that joined). A cluster without
/// query nodes, or a collection no group holds, is one replica, of the cluster's process alone.
fn replica_groups(cluster: &t::GetClusterInfoResponse, collection: Option<&str>) -> std::collections::BTreeMap<u32, Group> {
    // Not listed (a cluster that does not have the collection yet): every group, the default.
    let held = collection.and_then(|name| cluster.collections.iter().find(|c| c.name == name)).map(|c| &c.replica_groups);
    let mut groups: std::collections::BTreeMap<u32, Group> = std::collections::BTreeMap::new();
    for (i, q) in cluster.query_nodes.iter().enumerate() {
        if held.is_some_and(|h| !h.contains(&q.group)) {
            continue;
        }
        let group = groups.entry(q.group).or_default();
        if !q.up {
            continue;
        }
        let id = i as i64 + 2;
        group.nodes.push(id);
        // Milvus's leader address is host:port, without a scheme.
        let addr = q.endpoint.split_once("://").map_or(q.endpoint.as_str(), |(_, rest)| rest).trim_end_matches('/');
        for l in q.led_shards.iter().filter(|l| Some(l.collection.as_str()) == collection) {
            group.leaders.insert(l.shard, (id, addr.to_string()));
        }
    }
    if groups.is_empty() {
        groups.insert(0, Group::default());
    }
    groups
}

/// GetReplicas' answer for the collection: one replica per group of [`replica_groups`], replica
/// ids the group's index + 1; a shard no query node of the group leads is led by
/// [`CLUSTER_NODE`] (it writes every shard and keeps its growing rows too).
fn replicas_of(s: &t::CollectionSchema, collection_id: i64, groups: std::collections::BTreeMap<u32, Group>) -> Vec<mm::ReplicaInfo> {
    groups
        .into_iter()
        .map(|(g, group)| {
            let node_ids: Vec<i64> = std::iter::once(CLUSTER_NODE).chain(group.nodes).collect();
            mm::ReplicaInfo {
                replica_id: i64::from(g) + 1,
                collection_id,
                shard_replicas: (0..s.shards)
                    .map(|i| {
                        let (leader_id, leader_addr) = group.leaders.get(&i).cloned().unwrap_or((CLUSTER_NODE, String::new()));
                        mm::ShardReplica {
                            leader_id,
                            leader_addr,
                            dm_channel_name: format!("{}_shard{i}", s.name),
                            node_ids: node_ids.clone(),
                        }
                    })
                    .collect(),
                node_ids,
                resource_group_name: "__default_resource_group".into(),
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvs(pairs: &[(&str, &str)]) -> Vec<mc::KeyValuePair> {
        pairs.iter().map(|(k, v)| mc::KeyValuePair { key: (*k).into(), value: (*v).into() }).collect()
    }

    #[test]
    fn replicas_are_the_clusters_groups_led_by_their_query_nodes_or_its_own_process() {
        let s = t::CollectionSchema { name: "docs".into(), shards: 2, ..Default::default() };
        let q = |group, up| t::QueryNodeStatus { group, up, ..Default::default() };
        // No query nodes: one replica, the cluster's process alone.
        let one = replicas_of(&s, 7, replica_groups(&t::GetClusterInfoResponse::default(), Some("docs")));
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].replica_id, one[0].collection_id, one[0].node_ids.clone()), (1, 7, vec![1]));
        let channels: Vec<&str> = one[0].shard_replicas.iter().map(|r| r.dm_channel_name.as_str()).collect();
        assert_eq!(channels, ["docs_shard0", "docs_shard1"]);
        // Two groups; a node that is down is not listed.
        let mut info = t::GetClusterInfoResponse { query_nodes: vec![q(0, true), q(0, false), q(1, true)], ..Default::default() };
        let two = replicas_of(&s, 7, replica_groups(&info, Some("docs")));
        let nodes: Vec<(i64, Vec<i64>)> = two.iter().map(|r| (r.replica_id, r.node_ids.clone())).collect();
        assert_eq!(nodes, [(1, vec![1, 2]), (2, vec![1, 4])]);
        assert!(two.iter().flat_map(|r| &r.shard_replicas).all(|sr| sr.leader_id == 1), "no query node leads a shard");
        // Shard leaders on query nodes: per group, the live node leading each shard of this
        // collection (another collection's shards, or a down node's, are not this one's).
        let led = |c: &str, shard| t::LedShard { collection: c.into(), shard };
        info.query_nodes[0].endpoint = "http://10.0.0.5:19540".into();
        info.query_nodes[0].led_shards = vec![led("docs", 1), led("logs", 0)];
        info.query_nodes[1].led_shards = vec![led("docs", 0)];
        info.query_nodes[2].endpoint = "http://10.0.0.7:19540".into();
        info.query_nodes[2].led_shards = vec![led("docs", 0), led("docs", 1)];
        let led_by: Vec<Vec<(i64, String)>> = replicas_of(&s, 7, replica_groups(&info, Some("docs")))
            .iter()
            .map(|r| r.shard_replicas.iter().map(|sr| (sr.leader_id, sr.leader_addr.clone())).collect())
            .collect();
        assert_eq!(
            led_by,
            [vec![(1, String::new()), (2, "10.0.0.5:19540".into())], vec![(4, "10.0.0.7:19540".into()), (4, "10.0.0.7:19540".into())]]
        );
        for q in &mut info.query_nodes {
            q.led_shards.clear();
        }
        // Loaded with one replica, in group 1: that group alone; with none, the process alone.
        let status = |groups: Vec<u32>| t::CollectionStatus { name: "docs".into(), replica_groups: groups, ..Default::default() };
        info.collections = vec![status(vec![1])];
        let nodes: Vec<(i64, Vec<i64>)> =
            replicas_of(&s, 7, replica_groups(&info, Some("docs"))).iter().map(|r| (r.replica_id, r.node_ids.clone())).collect();
        assert_eq!(nodes, [(2, vec![1, 4])]);
        assert_eq!(replica_groups(&info, None).len(), 2, "the cluster's groups, for LoadCollection's check");
        info.collections = vec![status(vec![])];
        let nodes: Vec<(i64, Vec<i64>)> =
            replicas_of(&s, 7, replica_groups(&info, Some("docs"))).iter().map(|r| (r.replica_id, r.node_ids.clone())).collect();
        assert_eq!(nodes, [(1, vec![1])]);
    }

    #[test]
    fn search_params_as_pymilvus_sends_them() {
        let p = search_params(&kvs(&[
            ("topk", "10"),
            ("round_decimal", "-1"),
            ("metric_type", "COSINE"),
            ("params", r#"{"ef": 64, "offset": 5}"#),
        ]))
        .unwrap();
        assert_eq!((p.limit, p.offset, p.ef, p.metric.as_deref()), (10, 5, 64, Some("COSINE")));
        let e = search_params(&kvs(&[("topk", "10"), ("params", r#"{"radius": 1.0}"#)])).unwrap_err();
        assert!(e.status().unwrap().reason.contains("range search"));
        let e = search_params(&kvs(&[("topk", "ten")])).unwrap_err();
        assert!(e.status().unwrap().reason.contains("\"ten\""), "{:?}", e.status());
    }

    #[test]
    fn index_params_in_either_layout() {
        let (spec, metric) =
            index_spec(&kvs(&[("index_type", "HNSW"), ("metric_type", "IP"), ("params", r#"{"M": 8, "efConstruction": 100}"#)])).unwrap();
        assert_eq!(spec.kind, Some(t::index_spec::Kind::Hnsw(t::HnswIndex { m: 8, ef_construction: 100 })));
        assert_eq!(metric, Some(t::Metric::Ip));
        let (spec, _) = index_spec(&kvs(&[("index_type", "IVF_FLAT"), ("nlist", "64"), ("metric_type", "L2")])).unwrap();
        assert_eq!(spec.kind, Some(t::index_spec::Kind::IvfFlat(t::IvfFlatIndex { nlist: 64 })));
        let e = index_spec(&kvs(&[("index_type", "DISKANN")])).unwrap_err();
        assert!(e.status().unwrap().reason.contains("\"DISKANN\""));
        let e = index_spec(&kvs(&[("index_type", "FLAT"), ("metric_type", "HAMMING")])).unwrap_err();
        assert!(e.status().unwrap().reason.contains("\"HAMMING\""));
    }
}
