//! Typed values of the API: what the common path needs without touching protobuf. Each type
//! converts to and from its `tandem_proto::v1` message here, and nowhere else.

use std::collections::BTreeMap;
use std::time::Duration;

use tandem_proto::v1 as pb;

use crate::error::{ClientError, Result};

// ---- values and rows ------------------------------------------------------------------------

/// A payload value. The schema declares each field's type; a row may leave a field unset (null).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int64(i64),
    Double(f64),
    Bool(bool),
    String(String),
    /// A JSON document, as text (JSON fields; structured values of dynamic fields).
    Json(String),
}

/// A row's payload: field name to value, ordered by name.
pub type Payload = BTreeMap<String, Value>;

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int64(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int64(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Double(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(v)
    }
}

impl Value {
    pub fn as_i64(&self) -> Option<i64> {
        if let Value::Int64(v) = self { Some(*v) } else { None }
    }
    pub fn as_f64(&self) -> Option<f64> {
        if let Value::Double(v) = self { Some(*v) } else { None }
    }
    pub fn as_bool(&self) -> Option<bool> {
        if let Value::Bool(v) = self { Some(*v) } else { None }
    }
    pub fn as_str(&self) -> Option<&str> {
        if let Value::String(v) = self { Some(v) } else { None }
    }
}

impl From<Value> for pb::Value {
    fn from(v: Value) -> Self {
        use pb::value::Kind;
        let kind = match v {
            Value::Int64(x) => Kind::Int64Value(x),
            Value::Double(x) => Kind::DoubleValue(x),
            Value::Bool(x) => Kind::BoolValue(x),
            Value::String(x) => Kind::StringValue(x),
            Value::Json(x) => Kind::JsonValue(x),
        };
        pb::Value { kind: Some(kind) }
    }
}

/// A value without a kind is how protobuf spells null; an unset field is simply absent from a
/// typed payload.
fn value_from_pb(v: pb::Value) -> Option<Value> {
    use pb::value::Kind;
    Some(match v.kind? {
        Kind::Int64Value(x) => Value::Int64(x),
        Kind::DoubleValue(x) => Value::Double(x),
        Kind::BoolValue(x) => Value::Bool(x),
        Kind::StringValue(x) => Value::String(x),
        Kind::JsonValue(x) => Value::Json(x),
    })
}

pub fn payload_to_pb(p: Payload) -> pb::Payload {
    pb::Payload { fields: p.into_iter().map(|(k, v)| (k, v.into())).collect() }
}

pub fn payload_from_pb(p: Option<pb::Payload>) -> Payload {
    p.map(|p| p.fields.into_iter().filter_map(|(k, v)| Some((k, value_from_pb(v)?))).collect()).unwrap_or_default()
}

/// One row to insert or upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: i64,
    pub vector: Vec<f32>,
    pub payload: Payload,
}

impl Row {
    pub fn new(id: i64, vector: impl Into<Vec<f32>>) -> Row {
        Row { id, vector: vector.into(), payload: Payload::new() }
    }

    /// Sets a payload field: `Row::new(1, v).with("price", 9.5).with("tag", "books")`.
    pub fn with(mut self, field: impl Into<String>, value: impl Into<Value>) -> Row {
        self.payload.insert(field.into(), value.into());
        self
    }
}

/// A batch of rows for one write, as rows or as columns (flattened vectors, as the wire carries
/// them: the cheaper form for bulk loads). Checked before sending: a flattened batch whose rows
/// had different lengths could otherwise be read by the server as rows of some other dimension.
#[derive(Debug, Clone)]
pub struct Rows(RowsInner);

#[derive(Debug, Clone)]
enum RowsInner {
    Rows(Vec<Row>),
    Columns { ids: Vec<i64>, vectors: Vec<f32>, payloads: Vec<pb::Payload> },
}

impl From<Vec<Row>> for Rows {
    fn from(rows: Vec<Row>) -> Self {
        Rows(RowsInner::Rows(rows))
    }
}
impl From<Row> for Rows {
    fn from(row: Row) -> Self {
        Rows(RowsInner::Rows(vec![row]))
    }
}
impl<const N: usize> From<[Row; N]> for Rows {
    fn from(rows: [Row; N]) -> Self {
        Rows(RowsInner::Rows(rows.into()))
    }
}

impl Rows {
    /// `ids.len()` rows whose vectors are concatenated in `vectors`; `payloads` is empty or one
    /// per id.
    pub fn columns(ids: Vec<i64>, vectors: Vec<f32>, payloads: Vec<Payload>) -> Rows {
        Rows(RowsInner::Columns { ids, vectors, payloads: payloads.into_iter().map(payload_to_pb).collect() })
    }

    /// [`Rows::columns`] with payloads already in wire form (e.g. parsed by a file reader).
    pub fn columns_pb(ids: Vec<i64>, vectors: Vec<f32>, payloads: Vec<pb::Payload>) -> Rows {
        Rows(RowsInner::Columns { ids, vectors, payloads })
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            RowsInner::Rows(r) => r.len(),
            RowsInner::Columns { ids, .. } => ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The wire form (ids, flattened vectors, payloads), after checking the batch's shape.
    pub(crate) fn into_wire(self) -> Result<(Vec<i64>, Vec<f32>, Vec<pb::Payload>)> {
        match self.0 {
            RowsInner::Rows(rows) => {
                let Some(first) = rows.first() else { return Err(ClientError::invalid("no rows to write")) };
                let dim = first.vector.len();
                if dim == 0 {
                    return Err(ClientError::invalid(format!("row with id {} has an empty vector", first.id)));
                }
                if let Some(r) = rows.iter().find(|r| r.vector.len() != dim) {
                    return Err(ClientError::invalid(format!(
                        "row with id {} has a vector of {} elements, the first row's has {dim}: every row of a write needs the collection's dimension",
                        r.id,
                        r.vector.len()
                    )));
                }
                let with_payload = rows.iter().any(|r| !r.payload.is_empty());
                let mut ids = Vec::with_capacity(rows.len());
                let mut vectors = Vec::with_capacity(rows.len() * dim);
                let mut payloads = Vec::with_capacity(if with_payload { rows.len() } else { 0 });
                for r in rows {
                    ids.push(r.id);
                    vectors.extend_from_slice(&r.vector);
                    if with_payload {
                        payloads.push(payload_to_pb(r.payload));
                    }
                }
                Ok((ids, vectors, payloads))
            }
            RowsInner::Columns { ids, vectors, payloads } => {
                if ids.is_empty() {
                    return Err(ClientError::invalid("no rows to write"));
                }
                if vectors.is_empty() || vectors.len() % ids.len() != 0 {
                    return Err(ClientError::invalid(format!(
                        "{} floats do not make {} vectors of one dimension",
                        vectors.len(),
                        ids.len()
                    )));
                }
                if !payloads.is_empty() && payloads.len() != ids.len() {
                    return Err(ClientError::invalid(format!(
                        "{} payloads for {} rows: give none or one per row",
                        payloads.len(),
                        ids.len()
                    )));
                }
                Ok((ids, vectors, payloads))
            }
        }
    }
}

/// One search result, closest first within its query's list.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: i64,
    /// The metric's raw score: squared L2 (smaller is closer), IP or cosine (larger is closer).
    pub distance: f32,
    /// The requested output fields that are set on the row.
    pub payload: Payload,
}

impl From<pb::Hit> for Hit {
    fn from(h: pb::Hit) -> Self {
        Hit { id: h.id, distance: h.distance, payload: payload_from_pb(h.payload) }
    }
}

impl From<&Hit> for pb::Hit {
    fn from(h: &Hit) -> Self {
        pb::Hit { id: h.id, distance: h.distance, payload: Some(payload_to_pb(h.payload.clone())) }
    }
}

/// A stored row as `get` and `query` return it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub id: i64,
    /// Empty unless the call asked for vectors.
    pub vector: Vec<f32>,
    pub payload: Payload,
}

impl From<pb::Entity> for Entity {
    fn from(e: pb::Entity) -> Self {
        Entity { id: e.id, vector: e.vector, payload: payload_from_pb(e.payload) }
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResult {
    /// Rows inserted, upserted or deleted.
    pub count: u64,
    /// The timestamp the write was assigned.
    pub ts: u64,
    /// The write's session token (already folded into the client's session).
    pub session_token: String,
}

/// When a leader acknowledges a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ack {
    /// The cluster's `replication.ack` setting.
    #[default]
    ClusterDefault,
    /// Once the replication transport holds the write: no acknowledged write is lost with the leader.
    Exported,
    /// Once the leader's WAL holds it: lower latency, replication catches up asynchronously.
    Local,
}

impl Ack {
    pub(crate) fn to_pb(self) -> i32 {
        match self {
            Ack::ClusterDefault => pb::AckPolicy::Unspecified as i32,
            Ack::Exported => pb::AckPolicy::Exported as i32,
            Ack::Local => pb::AckPolicy::Local as i32,
        }
    }
}

// ---- consistency ------------------------------------------------------------------------------

/// What a read must see. See docs/client.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Every write acknowledged before the read started (on an alternative: waits until it has
    /// applied everything the leader had at that moment).
    Strong,
    /// Every write older than `staleness` (zero: the server's default).
    Bounded { staleness: Duration },
    /// Every write this client's session has seen (its own writes and what earlier reads
    /// returned): read-your-writes and monotonic reads, whichever replica answers.
    #[default]
    Session,
    /// Whatever the replica has.
    Eventually,
}

impl Consistency {
    pub(crate) fn to_pb(self, session_token: String) -> pb::ReadOptions {
        let (level, staleness_ms) = match self {
            Consistency::Strong => (pb::ConsistencyLevel::Strong, 0),
            Consistency::Bounded { staleness } => (pb::ConsistencyLevel::Bounded, u64::try_from(staleness.as_millis()).unwrap_or(u64::MAX)),
            Consistency::Session => (pb::ConsistencyLevel::Session, 0),
            Consistency::Eventually => (pb::ConsistencyLevel::Eventually, 0),
        };
        pb::ReadOptions { consistency: level as i32, session_token, staleness_ms }
    }
}

// ---- schema -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Metric {
    /// Squared euclidean distance (smaller is closer).
    #[default]
    L2,
    /// Inner product (larger is closer).
    Ip,
    /// Cosine similarity (larger is closer); vectors are normalised on write.
    Cosine,
}

/// A collection's index. Zero parameters mean the server's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Index {
    /// Exact search.
    #[default]
    Flat,
    IvfFlat {
        nlist: u32,
    },
    Hnsw {
        m: u32,
        ef_construction: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Int64,
    Double,
    Bool,
    String,
    /// Stored as Int64, range-checked on write.
    Int32,
    Int16,
    Int8,
    /// Stored as Double, rounded to f32 on write.
    Float,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub ty: FieldType,
}

/// A collection's schema: `CollectionSpec::new("docs", 128).metric(Metric::Cosine).field("tag", FieldType::String)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionSpec {
    pub name: String,
    pub dim: u32,
    pub metric: Metric,
    pub index: Index,
    /// Ordered change logs; more spread writes over more WALs. 0 means 1.
    pub shards: u32,
    pub fields: Vec<Field>,
}

impl CollectionSpec {
    pub fn new(name: impl Into<String>, dim: u32) -> CollectionSpec {
        CollectionSpec { name: name.into(), dim, metric: Metric::L2, index: Index::Flat, shards: 1, fields: Vec::new() }
    }
    pub fn metric(mut self, metric: Metric) -> Self {
        self.metric = metric;
        self
    }
    pub fn index(mut self, index: Index) -> Self {
        self.index = index;
        self
    }
    pub fn shards(mut self, shards: u32) -> Self {
        self.shards = shards;
        self
    }
    pub fn field(mut self, name: impl Into<String>, ty: FieldType) -> Self {
        self.fields.push(Field { name: name.into(), ty });
        self
    }
}

impl From<Index> for pb::IndexSpec {
    fn from(i: Index) -> Self {
        use pb::index_spec::Kind;
        let kind = match i {
            Index::Flat => Kind::Flat(pb::FlatIndex {}),
            Index::IvfFlat { nlist } => Kind::IvfFlat(pb::IvfFlatIndex { nlist }),
            Index::Hnsw { m, ef_construction } => Kind::Hnsw(pb::HnswIndex { m, ef_construction }),
        };
        pb::IndexSpec { kind: Some(kind), metric: 0 }
    }
}

fn index_from_pb(i: Option<pb::IndexSpec>) -> Index {
    use pb::index_spec::Kind;
    match i.and_then(|i| i.kind) {
        None | Some(Kind::Flat(_)) => Index::Flat,
        Some(Kind::IvfFlat(x)) => Index::IvfFlat { nlist: x.nlist },
        Some(Kind::Hnsw(x)) => Index::Hnsw { m: x.m, ef_construction: x.ef_construction },
    }
}

impl From<CollectionSpec> for pb::CollectionSchema {
    fn from(s: CollectionSpec) -> Self {
        let metric = match s.metric {
            Metric::L2 => pb::Metric::L2,
            Metric::Ip => pb::Metric::Ip,
            Metric::Cosine => pb::Metric::Cosine,
        };
        let field_type = |t: FieldType| match t {
            FieldType::Int64 => pb::ScalarType::Int64,
            FieldType::Double => pb::ScalarType::Double,
            FieldType::Bool => pb::ScalarType::Bool,
            FieldType::String => pb::ScalarType::String,
            FieldType::Int32 => pb::ScalarType::Int32,
            FieldType::Int16 => pb::ScalarType::Int16,
            FieldType::Int8 => pb::ScalarType::Int8,
            FieldType::Float => pb::ScalarType::Float,
            FieldType::Json => pb::ScalarType::Json,
        };
        pb::CollectionSchema {
            name: s.name,
            dim: s.dim,
            metric: metric as i32,
            index: Some(s.index.into()),
            shards: s.shards,
            fields: s
                .fields
                .into_iter()
                .map(|f| pb::FieldSchema { name: f.name, r#type: field_type(f.ty) as i32, ..Default::default() })
                .collect(),
            ..Default::default()
        }
    }
}

impl TryFrom<pb::CollectionSchema> for CollectionSpec {
    type Error = ClientError;

    /// Fails only on enum values this SDK does not know (a newer server).
    fn try_from(s: pb::CollectionSchema) -> Result<Self> {
        let metric = match pb::Metric::try_from(s.metric) {
            Ok(pb::Metric::L2) => Metric::L2,
            Ok(pb::Metric::Ip) => Metric::Ip,
            Ok(pb::Metric::Cosine) => Metric::Cosine,
            Ok(pb::Metric::Unspecified) | Err(_) => return Err(unknown("metric", s.metric)),
        };
        let fields = s
            .fields
            .into_iter()
            .map(|f| {
                let ty = match pb::ScalarType::try_from(f.r#type) {
                    Ok(pb::ScalarType::Int64) => FieldType::Int64,
                    Ok(pb::ScalarType::Double) => FieldType::Double,
                    Ok(pb::ScalarType::Bool) => FieldType::Bool,
                    Ok(pb::ScalarType::String) => FieldType::String,
                    Ok(pb::ScalarType::Int32) => FieldType::Int32,
                    Ok(pb::ScalarType::Int16) => FieldType::Int16,
                    Ok(pb::ScalarType::Int8) => FieldType::Int8,
                    Ok(pb::ScalarType::Float) => FieldType::Float,
                    Ok(pb::ScalarType::Json) => FieldType::Json,
                    Ok(pb::ScalarType::Unspecified) | Err(_) => return Err(unknown("field type", f.r#type)),
                };
                Ok(Field { name: f.name, ty })
            })
            .collect::<Result<_>>()?;
        Ok(CollectionSpec { name: s.name, dim: s.dim, metric, index: index_from_pb(s.index), shards: s.shards, fields })
    }
}

fn unknown(what: &str, v: i32) -> ClientError {
    ClientError::Status {
        code: tonic::Code::Internal,
        message: format!("the server sent {what} {v}, which this SDK does not know: upgrade tandem-client"),
        refusal: None,
    }
}

// ---- descriptions ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentState {
    /// Takes inserts; searched exactly.
    Growing,
    /// Immutable, searched exactly while its index is built.
    Sealed,
    Indexed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub id: u64,
    pub shard: u32,
    pub state: SegmentState,
    pub rows: u64,
    pub deleted: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionInfo {
    pub spec: CollectionSpec,
    pub collection_id: u64,
    pub created_ts: u64,
    /// Live rows (deleted rows excluded).
    pub rows: u64,
    pub segments: Vec<SegmentInfo>,
    /// Every write with a ts at or below it is applied and durable here.
    pub serviceable_ts: u64,
}

impl TryFrom<pb::CollectionInfo> for CollectionInfo {
    type Error = ClientError;

    fn try_from(c: pb::CollectionInfo) -> Result<Self> {
        use pb::segment_info::State;
        let segments = c
            .segments
            .into_iter()
            .map(|g| {
                let state = match State::try_from(g.state) {
                    Ok(State::Growing) => SegmentState::Growing,
                    Ok(State::Sealed) => SegmentState::Sealed,
                    Ok(State::Indexed) => SegmentState::Indexed,
                    Ok(State::Unspecified) | Err(_) => return Err(unknown("segment state", g.state)),
                };
                Ok(SegmentInfo { id: g.id, shard: g.shard, state, rows: g.rows, deleted: g.deleted })
            })
            .collect::<Result<_>>()?;
        Ok(CollectionInfo {
            spec: c.schema.unwrap_or_default().try_into()?,
            collection_id: c.collection_id,
            created_ts: c.created_ts,
            rows: c.rows,
            segments,
            serviceable_ts: c.serviceable_ts,
        })
    }
}

// Servers may add fields; `..Default::default()` keeps this compiling when they do.
#[allow(clippy::needless_update)]
impl From<&CollectionInfo> for pb::CollectionInfo {
    fn from(c: &CollectionInfo) -> Self {
        use pb::segment_info::State;
        pb::CollectionInfo {
            schema: Some(c.spec.clone().into()),
            collection_id: c.collection_id,
            created_ts: c.created_ts,
            rows: c.rows,
            segments: c
                .segments
                .iter()
                .map(|g| pb::SegmentInfo {
                    id: g.id,
                    shard: g.shard,
                    state: match g.state {
                        SegmentState::Growing => State::Growing,
                        SegmentState::Sealed => State::Sealed,
                        SegmentState::Indexed => State::Indexed,
                    } as i32,
                    rows: g.rows,
                    deleted: g.deleted,
                })
                .collect(),
            serviceable_ts: c.serviceable_ts,
            ..Default::default()
        }
    }
}

/// A cluster's role: the one type clusters, the gateway and the SDK share.
pub use tandem_proto::Role;

/// A role as the wire carries it (UNSPECIFIED for `None`).
fn role_to_wire(role: Option<Role>) -> i32 {
    role.map_or(pb::Role::Unspecified as i32, |r| r.to_proto() as i32)
}

/// One collection as `cluster_info` and `topology` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionStatus {
    pub name: String,
    pub serviceable_ts: u64,
    pub rows: u64,
    pub growing_segments: u64,
    pub sealed_segments: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// How far behind the leader's clock the serviceable ts is (0 on the leader).
    pub lag_ms: u64,
    /// On an alternative: "following", "bootstrapping", `"halted: <reason>"`; empty on a leader.
    pub replication: String,
    /// The replica groups holding copies of its sealed segments
    /// ([`Client::load_collection`](crate::Client::load_collection)); empty without query nodes.
    pub replica_groups: Vec<u32>,
}

impl From<pb::CollectionStatus> for CollectionStatus {
    fn from(c: pb::CollectionStatus) -> Self {
        CollectionStatus {
            name: c.name,
            serviceable_ts: c.serviceable_ts,
            rows: c.rows,
            growing_segments: c.growing_segments,
            sealed_segments: c.sealed_segments,
            memory_bytes: c.memory_bytes,
            disk_bytes: c.disk_bytes,
            lag_ms: c.lag_ms,
            replication: c.replication,
            replica_groups: c.replica_groups,
        }
    }
}

// Servers may add fields; `..Default::default()` keeps this compiling when they do.
#[allow(clippy::needless_update)]
impl From<&CollectionStatus> for pb::CollectionStatus {
    fn from(c: &CollectionStatus) -> Self {
        pb::CollectionStatus {
            name: c.name.clone(),
            serviceable_ts: c.serviceable_ts,
            rows: c.rows,
            growing_segments: c.growing_segments,
            sealed_segments: c.sealed_segments,
            memory_bytes: c.memory_bytes,
            disk_bytes: c.disk_bytes,
            lag_ms: c.lag_ms,
            replication: c.replication.clone(),
            replica_groups: c.replica_groups.clone(),
            ..Default::default()
        }
    }
}

/// What the endpoint says about itself (a cluster, or the cluster a gateway forwarded to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    pub cluster_id: String,
    /// `None`: a role this SDK does not know (a newer server), kept rather than failing.
    pub role: Option<Role>,
    pub epoch: u64,
    /// The node's current hybrid timestamp.
    pub current_ts: u64,
    pub collections: Vec<CollectionStatus>,
    pub version: String,
    /// On an alternative: where the leader is.
    pub leader: String,
    /// The query nodes holding copies of the cluster's sealed segments (docs/scaling.md).
    pub query_nodes: Vec<QueryNodeStatus>,
}

/// One query node as its cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryNodeStatus {
    /// The replica group.
    pub group: u32,
    pub endpoint: String,
    /// False from a failed call until the node answers a probe again.
    pub up: bool,
    /// Sealed segments whose copy in the group it holds.
    pub segments: u64,
    /// Sub-searches it answered.
    pub searches: u64,
    /// Sub-searches it took, while idle, from a busy node whose turn it was (long-tail stealing).
    pub stolen: u64,
    /// Shards it leads in its group: it keeps their growing rows and searches them.
    pub shards_led: u32,
    /// Sub-searches in which it searched a shard's growing rows, as the shard's leader.
    pub growing_searches: u64,
    /// The shards it leads: (collection, shard number).
    pub led_shards: Vec<(String, u32)>,
    /// It joined its group itself (`tandem query-node --join`) rather than being listed.
    pub joined: bool,
}

impl From<pb::QueryNodeStatus> for QueryNodeStatus {
    fn from(q: pb::QueryNodeStatus) -> Self {
        QueryNodeStatus {
            group: q.group,
            endpoint: q.endpoint,
            up: q.up,
            segments: q.segments,
            searches: q.searches,
            stolen: q.stolen,
            shards_led: q.shards_led,
            growing_searches: q.growing_searches,
            led_shards: q.led_shards.into_iter().map(|l| (l.collection, l.shard)).collect(),
            joined: q.joined,
        }
    }
}

impl From<&QueryNodeStatus> for pb::QueryNodeStatus {
    fn from(q: &QueryNodeStatus) -> Self {
        pb::QueryNodeStatus {
            group: q.group,
            endpoint: q.endpoint.clone(),
            up: q.up,
            segments: q.segments,
            searches: q.searches,
            stolen: q.stolen,
            shards_led: q.shards_led,
            growing_searches: q.growing_searches,
            led_shards: q
                .led_shards
                .iter()
                .map(|(collection, shard)| pb::LedShard { collection: collection.clone(), shard: *shard })
                .collect(),
            joined: q.joined,
        }
    }
}

impl From<pb::GetClusterInfoResponse> for ClusterInfo {
    fn from(r: pb::GetClusterInfoResponse) -> Self {
        ClusterInfo {
            cluster_id: r.cluster_id,
            role: Role::from_proto(r.role),
            epoch: r.epoch,
            current_ts: r.current_ts,
            collections: r.collections.into_iter().map(Into::into).collect(),
            version: r.version,
            leader: r.leader,
            query_nodes: r.query_nodes.into_iter().map(Into::into).collect(),
        }
    }
}

// Servers may add fields; `..Default::default()` keeps this compiling when they do.
#[allow(clippy::needless_update)]
impl From<&ClusterInfo> for pb::GetClusterInfoResponse {
    fn from(c: &ClusterInfo) -> Self {
        pb::GetClusterInfoResponse {
            cluster_id: c.cluster_id.clone(),
            role: role_to_wire(c.role),
            epoch: c.epoch,
            current_ts: c.current_ts,
            collections: c.collections.iter().map(Into::into).collect(),
            version: c.version.clone(),
            leader: c.leader.clone(),
            query_nodes: c.query_nodes.iter().map(Into::into).collect(),
            // Fields this SDK does not model yet keep their defaults.
            ..Default::default()
        }
    }
}

// ---- topology (gateway) ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No check has decided yet (counts as unhealthy for routing).
    Unknown,
    Healthy,
    Unhealthy,
}

/// One cluster as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    pub id: String,
    pub datacenter: String,
    /// `None`: a role this SDK does not know.
    pub role: Option<Role>,
    pub epoch: u64,
    pub endpoints: Vec<String>,
    pub health: Health,
    /// Whether the gateway sends reads there now.
    pub readable: bool,
    pub serviceable_ts: u64,
    pub lag_ms: u64,
    pub collections: Vec<CollectionStatus>,
    pub last_error: String,
    /// Since the last successful health check (`None`: never).
    pub checked_ago: Option<Duration>,
    /// Its query nodes, as last reported (empty for a cluster of one process).
    pub query_nodes: Vec<QueryNodeStatus>,
}

/// Every cluster a gateway knows, and which one leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub clusters: Vec<ClusterView>,
    /// Id of the leading cluster, when one is known.
    pub leader: Option<String>,
    pub epoch: u64,
}

impl Topology {
    pub fn leader_view(&self) -> Option<&ClusterView> {
        let id = self.leader.as_deref()?;
        self.clusters.iter().find(|c| c.id == id)
    }
}

impl From<pb::TopologyResponse> for Topology {
    fn from(t: pb::TopologyResponse) -> Self {
        let clusters = t
            .clusters
            .into_iter()
            .map(|c| ClusterView {
                health: match pb::Health::try_from(c.health) {
                    Ok(pb::Health::Healthy) => Health::Healthy,
                    Ok(pb::Health::Unhealthy) => Health::Unhealthy,
                    Ok(pb::Health::Unknown | pb::Health::Unspecified) | Err(_) => Health::Unknown,
                },
                id: c.id,
                datacenter: c.datacenter,
                role: Role::from_proto(c.role),
                epoch: c.epoch,
                endpoints: c.endpoints,
                readable: c.readable,
                serviceable_ts: c.serviceable_ts,
                lag_ms: c.lag_ms,
                collections: c.collections.into_iter().map(Into::into).collect(),
                last_error: c.last_error,
                checked_ago: (c.checked_ms_ago > 0).then(|| Duration::from_millis(c.checked_ms_ago)),
                query_nodes: c.query_nodes.into_iter().map(Into::into).collect(),
            })
            .collect();
        Topology { clusters, leader: (!t.leader.is_empty()).then_some(t.leader), epoch: t.epoch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_flatten_and_reject_ragged_batches() {
        let (ids, v, p) = Rows::from(vec![Row::new(1, [1.0, 2.0]), Row::new(2, [3.0, 4.0]).with("tag", "x")]).into_wire().unwrap();
        assert_eq!(ids, [1, 2]);
        assert_eq!(v, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(p.len(), 2);
        assert!(p[0].fields.is_empty());
        assert_eq!(p[1].fields["tag"], Value::from("x").into());
        let (_, _, p) = Rows::from(Row::new(1, [1.0])).into_wire().unwrap();
        assert!(p.is_empty(), "no payloads at all travel as none");

        let e = Rows::from(vec![Row::new(1, [1.0, 2.0]), Row::new(7, [3.0])]).into_wire().unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("row with id 7 has a vector of 1 elements, the first row's has 2"), "{e}");
        assert!(Rows::from(Vec::new()).into_wire().unwrap_err().to_string().contains("no rows"));
        let e = Rows::columns(vec![1, 2], vec![1.0, 2.0, 3.0], vec![]).into_wire().unwrap_err();
        assert!(e.to_string().contains("3 floats do not make 2 vectors"), "{e}");
        let e = Rows::columns(vec![1, 2], vec![1.0, 2.0], vec![Payload::new()]).into_wire().unwrap_err();
        assert!(e.to_string().contains("1 payloads for 2 rows"), "{e}");
    }

    #[test]
    fn specs_and_infos_round_trip_through_protobuf() {
        let spec = CollectionSpec::new("docs", 8)
            .metric(Metric::Cosine)
            .index(Index::Hnsw { m: 8, ef_construction: 40 })
            .shards(2)
            .field("tag", FieldType::String)
            .field("n", FieldType::Int64);
        let back = CollectionSpec::try_from(pb::CollectionSchema::from(spec.clone())).unwrap();
        assert_eq!(back, spec);
        let info = CollectionInfo {
            spec,
            collection_id: 3,
            created_ts: 99,
            rows: 10,
            segments: vec![SegmentInfo { id: 1, shard: 1, state: SegmentState::Sealed, rows: 10, deleted: 2 }],
            serviceable_ts: 100,
        };
        assert_eq!(CollectionInfo::try_from(pb::CollectionInfo::from(&info)).unwrap(), info);
        let e = CollectionSpec::try_from(pb::CollectionSchema { metric: 42, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("metric 42"), "{e}");
        assert_eq!(Role::from_proto(role_to_wire(Some(Role::Alternative))), Some(Role::Alternative));
        assert_eq!(Role::from_proto(role_to_wire(None)), None);
    }

    #[test]
    fn consistency_becomes_read_options() {
        let r = Consistency::Bounded { staleness: Duration::from_millis(250) }.to_pb("t1-1-2".into());
        assert_eq!(r.consistency, pb::ConsistencyLevel::Bounded as i32);
        assert_eq!(r.staleness_ms, 250);
        assert_eq!(r.session_token, "t1-1-2");
        assert_eq!(Consistency::default(), Consistency::Session);
    }
}
