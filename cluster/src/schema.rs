//! Collection schemas: validation of what a client asks for, and conversion of payloads between
//! the API's `map<string, Value>` and the row form the engine stores (one slot per declared
//! field, in declaration order, so filters resolve names once at compile time).

use std::collections::HashMap;

use tandem_proto::v1 as pb;

use crate::error::{ClusterError, Result};
use crate::filter::{DYNAMIC_FIELD, FieldDef, Scalar, ScalarType, Scope};

pub const MAX_DIM: u32 = 32_768;
pub const MAX_SHARDS: u32 = 64;
pub const MAX_FIELDS: usize = 256;
pub const MAX_STRING_BYTES: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    L2,
    Ip,
    Cosine,
}

impl Metric {
    /// Whether a smaller score is closer (L2) or a larger one (IP, cosine).
    pub fn smaller_is_closer(self) -> bool {
        match self {
            Metric::L2 => true,
            Metric::Ip | Metric::Cosine => false,
        }
    }

    pub fn from_proto(m: i32) -> Result<Metric> {
        match pb::Metric::try_from(m) {
            // The friendliest default: most embedding models are compared by L2 or cosine, and
            // L2 is what faiss and Milvus default to.
            Ok(pb::Metric::Unspecified) | Ok(pb::Metric::L2) => Ok(Metric::L2),
            Ok(pb::Metric::Ip) => Ok(Metric::Ip),
            Ok(pb::Metric::Cosine) => Ok(Metric::Cosine),
            Err(_) => Err(ClusterError::invalid(format!("unknown metric {m}: use L2, IP or COSINE"))),
        }
    }

    pub fn to_proto(self) -> pb::Metric {
        match self {
            Metric::L2 => pb::Metric::L2,
            Metric::Ip => pb::Metric::Ip,
            Metric::Cosine => pb::Metric::Cosine,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    Flat,
    IvfFlat { nlist: u32 },
    Hnsw { m: u32, ef_construction: u32 },
}

impl IndexKind {
    pub fn from_proto(spec: Option<&pb::IndexSpec>) -> Result<IndexKind> {
        use pb::index_spec::Kind;
        match spec.and_then(|s| s.kind.as_ref()) {
            None | Some(Kind::Flat(_)) => Ok(IndexKind::Flat),
            Some(Kind::IvfFlat(ivf)) => {
                let nlist = if ivf.nlist == 0 { 128 } else { ivf.nlist };
                if nlist > 65_536 {
                    return Err(ClusterError::invalid(format!("ivf_flat nlist {nlist} is out of range 1..=65536")));
                }
                Ok(IndexKind::IvfFlat { nlist })
            }
            Some(Kind::Hnsw(h)) => {
                let m = if h.m == 0 { 16 } else { h.m };
                let ef_construction = if h.ef_construction == 0 { 200 } else { h.ef_construction };
                if !(2..=128).contains(&m) {
                    return Err(ClusterError::invalid(format!("hnsw m {m} is out of range 2..=128")));
                }
                if !(8..=4096).contains(&ef_construction) {
                    return Err(ClusterError::invalid(format!("hnsw ef_construction {ef_construction} is out of range 8..=4096")));
                }
                Ok(IndexKind::Hnsw { m, ef_construction })
            }
        }
    }

    pub fn to_proto(self) -> pb::IndexSpec {
        use pb::index_spec::Kind;
        let kind = match self {
            IndexKind::Flat => Kind::Flat(pb::FlatIndex {}),
            IndexKind::IvfFlat { nlist } => Kind::IvfFlat(pb::IvfFlatIndex { nlist }),
            IndexKind::Hnsw { m, ef_construction } => Kind::Hnsw(pb::HnswIndex { m, ef_construction }),
        };
        pb::IndexSpec { kind: Some(kind), metric: 0 }
    }
}

impl std::fmt::Display for IndexKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexKind::Flat => write!(f, "FLAT"),
            IndexKind::IvfFlat { nlist } => write!(f, "IVF_FLAT(nlist={nlist})"),
            IndexKind::Hnsw { m, ef_construction } => write!(f, "HNSW(m={m}, ef_construction={ef_construction})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    pub name: String,
    pub dim: usize,
    pub metric: Metric,
    pub index: IndexKind,
    pub shards: u32,
    /// One slot per declared field, in order, then (dynamic schemas) the hidden Json field
    /// [`DYNAMIC_FIELD`] that holds each row's undeclared fields.
    pub fields: Vec<FieldDef>,
    /// The declared fields as the API declares them (`fields[i]` is `declared[i]`).
    pub declared: Vec<DeclaredField>,
    pub options: SchemaOptions,
    field_pos: HashMap<String, usize>,
}

/// A declared field: the API type (narrower than the stored one for INT32, FLOAT, ...) and its
/// limits.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredField {
    pub ty: pb::ScalarType,
    /// STRING: longest value in bytes; 0 = [`MAX_STRING_BYTES`].
    pub max_length: u32,
    pub description: String,
}

/// Collection-level options beyond the vector and the fields.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SchemaOptions {
    pub dynamic_fields: bool,
    pub auto_id: bool,
    /// The primary key's name in filters; "id" by default.
    pub primary_field: String,
    /// The vector's name, for APIs that name it; "vector" by default.
    pub vector_field: String,
    pub description: String,
}

impl SchemaOptions {
    fn from_proto(p: &pb::CollectionSchema) -> Result<SchemaOptions> {
        let name = |v: &str, default: &str| if v.is_empty() { default.to_string() } else { v.to_string() };
        let o = SchemaOptions {
            dynamic_fields: p.dynamic_fields,
            auto_id: p.auto_id,
            primary_field: name(&p.primary_field, "id"),
            vector_field: name(&p.vector_field, "vector"),
            description: p.description.clone(),
        };
        validate_name("primary field", &o.primary_field)?;
        validate_name("vector field", &o.vector_field)?;
        if o.primary_field == o.vector_field {
            return Err(ClusterError::invalid(format!("the primary and vector fields are both named {:?}", o.primary_field)));
        }
        Ok(o)
    }
}

/// Which payload fields a read returns: declared slots and, on a dynamic schema, undeclared keys.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    slots: Vec<usize>,
    dynamic: DynamicOutputs,
}

#[derive(Debug, Clone, Default)]
enum DynamicOutputs {
    #[default]
    None,
    All,
    Keys(Vec<String>),
}

impl Outputs {
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && matches!(self.dynamic, DynamicOutputs::None)
    }
}

pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::invalid(format!(
            "invalid {what} name {name:?}: use letters, digits and _, starting with a letter or _, at most 255"
        )))
    }
}

impl Schema {
    pub fn from_proto(p: &pb::CollectionSchema) -> Result<Schema> {
        validate_name("collection", &p.name)?;
        if p.dim == 0 || p.dim > MAX_DIM {
            return Err(ClusterError::invalid(format!("dim {} is out of range 1..={MAX_DIM}", p.dim)));
        }
        let shards = if p.shards == 0 { 1 } else { p.shards };
        if shards > MAX_SHARDS {
            return Err(ClusterError::invalid(format!("shards {shards} is out of range 1..={MAX_SHARDS}")));
        }
        if p.fields.len() > MAX_FIELDS {
            return Err(ClusterError::invalid(format!("{} payload fields, at most {MAX_FIELDS}", p.fields.len())));
        }
        let mut fields = Vec::with_capacity(p.fields.len());
        let options = SchemaOptions::from_proto(p)?;
        let mut declared = Vec::with_capacity(p.fields.len());
        for f in &p.fields {
            validate_name("field", &f.name)?;
            if f.name == options.primary_field || f.name == options.vector_field {
                return Err(ClusterError::invalid(format!(
                    "field name {:?} is reserved for the {}",
                    f.name,
                    if f.name == options.primary_field { "primary key" } else { "vector" }
                )));
            }
            let types = pb::ScalarType::try_from(f.r#type).ok().and_then(|api| Some((api, stored_type(api)?)));
            let Some((api, ty)) = types else {
                return Err(ClusterError::invalid(format!(
                    "field {:?} has no valid type (got {}): use INT64, INT32, INT16, INT8, DOUBLE, FLOAT, BOOL, STRING or JSON",
                    f.name, f.r#type
                )));
            };
            if f.max_length as usize > MAX_STRING_BYTES {
                return Err(ClusterError::invalid(format!(
                    "field {:?}: max_length {} exceeds the limit of {MAX_STRING_BYTES}",
                    f.name, f.max_length
                )));
            }
            fields.push(FieldDef { name: f.name.clone(), ty });
            declared.push(DeclaredField { ty: api, max_length: f.max_length, description: f.description.clone() });
        }
        let mut schema = Schema::new(
            p.name.clone(),
            p.dim as usize,
            Metric::from_proto(p.metric)?,
            IndexKind::from_proto(p.index.as_ref())?,
            shards,
            fields,
        )?;
        schema.declared = declared;
        schema.set_options(options);
        Ok(schema)
    }

    pub fn new(name: String, dim: usize, metric: Metric, index: IndexKind, shards: u32, fields: Vec<FieldDef>) -> Result<Schema> {
        let mut field_pos = HashMap::new();
        for (i, f) in fields.iter().enumerate() {
            if field_pos.insert(f.name.clone(), i).is_some() {
                return Err(ClusterError::invalid(format!("field {:?} is declared twice", f.name)));
            }
        }
        let declared =
            fields.iter().map(|f| DeclaredField { ty: stored_api_type(f.ty), max_length: 0, description: String::new() }).collect();
        let options = SchemaOptions { primary_field: "id".into(), vector_field: "vector".into(), ..Default::default() };
        Ok(Schema { name, dim, metric, index, shards, fields, declared, options, field_pos })
    }

    fn set_options(&mut self, options: SchemaOptions) {
        if options.dynamic_fields {
            self.fields.push(FieldDef { name: DYNAMIC_FIELD.into(), ty: ScalarType::Json });
        }
        self.options = options;
    }

    /// The slot of the hidden dynamic-fields column, on a dynamic schema.
    fn dynamic_slot(&self) -> Option<usize> {
        self.options.dynamic_fields.then(|| self.fields.len() - 1)
    }

    /// How filters on this collection resolve names.
    pub fn filter_scope(&self) -> Scope<'_> {
        Scope { fields: &self.fields, primary: &self.options.primary_field, dynamic: self.dynamic_slot() }
    }

    pub fn to_proto(&self) -> pb::CollectionSchema {
        pb::CollectionSchema {
            name: self.name.clone(),
            dim: self.dim as u32,
            metric: self.metric.to_proto() as i32,
            index: Some(self.index.to_proto()),
            shards: self.shards,
            fields: self
                .declared
                .iter()
                .zip(&self.fields)
                .map(|(d, f)| pb::FieldSchema {
                    name: f.name.clone(),
                    r#type: d.ty as i32,
                    max_length: d.max_length,
                    description: d.description.clone(),
                })
                .collect(),
            dynamic_fields: self.options.dynamic_fields,
            auto_id: self.options.auto_id,
            primary_field: self.options.primary_field.clone(),
            vector_field: self.options.vector_field.clone(),
            description: self.options.description.clone(),
        }
    }

    /// Converts an API payload to a stored row, rejecting wrong types, values out of their
    /// declared range, and (unless the schema is dynamic) undeclared fields.
    pub fn row_from_payload(&self, p: Option<&pb::Payload>) -> Result<Vec<Option<Scalar>>> {
        let mut row = vec![None; self.fields.len()];
        let Some(p) = p else { return Ok(row) };
        let mut extra = serde_json::Map::new();
        for (name, value) in &p.fields {
            // `field_pos` holds the declared fields only (their names cannot be `$meta`).
            let Some(&i) = self.field_pos.get(name) else {
                if self.options.dynamic_fields && name != DYNAMIC_FIELD {
                    if let Some(v) = dynamic_value(name, value)? {
                        extra.insert(name.clone(), v);
                    }
                    continue;
                }
                return Err(ClusterError::invalid(format!(
                    "unknown payload field {name:?}: collection {:?} declares {}",
                    self.name,
                    self.declared()
                )));
            };
            row[i] = self.declared_value(i, name, value)?;
        }
        if let Some(slot) = self.dynamic_slot().filter(|_| !extra.is_empty()) {
            let text_len = serde_json::to_string(&extra).map_or(0, |t| t.len());
            if text_len > MAX_STRING_BYTES {
                return Err(ClusterError::invalid(format!(
                    "the row's dynamic fields are {text_len} bytes of JSON, at most {MAX_STRING_BYTES}"
                )));
            }
            row[slot] = Some(Scalar::Json(Box::new(serde_json::Value::Object(extra))));
        }
        Ok(row)
    }

    /// One declared field's value, checked against its declared type and limits.
    fn declared_value(&self, i: usize, name: &str, value: &pb::Value) -> Result<Option<Scalar>> {
        use pb::value::Kind;
        let want = &self.declared[i];
        let bad =
            |k: &Kind| ClusterError::invalid(format!("payload field {name:?} is declared {} but got {}", type_name(want.ty), kind_name(k)));
        let Some(kind) = &value.kind else { return Ok(None) };
        let v = match (kind, self.fields[i].ty) {
            (Kind::Int64Value(v), ScalarType::Int64) => {
                let range = int_range(want.ty);
                if !range.contains(v) {
                    return Err(ClusterError::invalid(format!(
                        "payload field {name:?} is {v}, out of range for {} ({}..={})",
                        type_name(want.ty),
                        range.start(),
                        range.end()
                    )));
                }
                Scalar::Int64(*v)
            }
            // An integer literal for a DOUBLE field is what JSON-fed clients send for 1.0.
            (Kind::Int64Value(v), ScalarType::Float64) => Scalar::Float64(self.float_as_declared(want, *v as f64)),
            (Kind::DoubleValue(v), ScalarType::Float64) => {
                if !v.is_finite() || (want.ty == pb::ScalarType::Float && !(*v as f32).is_finite()) {
                    return Err(ClusterError::invalid(format!(
                        "payload field {name:?} is {v}: only finite numbers (of {})",
                        type_name(want.ty)
                    )));
                }
                Scalar::Float64(self.float_as_declared(want, *v))
            }
            (Kind::BoolValue(v), ScalarType::Bool) => Scalar::Bool(*v),
            (Kind::StringValue(v), ScalarType::String) => {
                let max = if want.max_length == 0 { MAX_STRING_BYTES } else { want.max_length as usize };
                if v.len() > max {
                    return Err(ClusterError::invalid(format!("payload field {name:?} is {} bytes, at most {max}", v.len())));
                }
                Scalar::String(v.clone())
            }
            (Kind::JsonValue(text), ScalarType::Json) => Scalar::Json(Box::new(parse_json(name, text)?)),
            (k, _) => return Err(bad(k)),
        };
        Ok(Some(v))
    }

    /// FLOAT fields hold what an f32 holds: the value is rounded on write, so it reads back
    /// exactly as an f32 client would see it.
    fn float_as_declared(&self, want: &DeclaredField, v: f64) -> f64 {
        if want.ty == pb::ScalarType::Float { f64::from(v as f32) } else { v }
    }

    /// Resolves the output field list of a read: "*" is every field (dynamic ones included);
    /// on a dynamic schema an undeclared name is a dynamic field (returned where a row has it).
    pub fn output_fields(&self, names: &[String]) -> Result<Outputs> {
        let declared = self.fields.len() - usize::from(self.options.dynamic_fields);
        if names.iter().any(|n| n == "*") {
            let dynamic = if self.options.dynamic_fields { DynamicOutputs::All } else { DynamicOutputs::None };
            return Ok(Outputs { slots: (0..declared).collect(), dynamic });
        }
        let mut out = Outputs::default();
        let mut keys = Vec::new();
        for n in names {
            match self.field_pos.get(n) {
                Some(&i) => out.slots.push(i),
                // `$meta` by name: the whole dynamic part, as Milvus clients ask for it.
                None if self.options.dynamic_fields && n == DYNAMIC_FIELD => out.dynamic = DynamicOutputs::All,
                None if self.options.dynamic_fields => keys.push(n.clone()),
                None => {
                    return Err(ClusterError::invalid(format!(
                        "unknown output field {n:?}: collection {:?} declares {}",
                        self.name,
                        self.declared()
                    )));
                }
            }
        }
        if !keys.is_empty() && matches!(out.dynamic, DynamicOutputs::None) {
            out.dynamic = DynamicOutputs::Keys(keys);
        }
        Ok(out)
    }

    pub fn payload_of(&self, row: &[Option<Scalar>], outputs: &Outputs) -> Option<pb::Payload> {
        if outputs.is_empty() {
            return None;
        }
        let mut fields = HashMap::with_capacity(outputs.slots.len());
        for &i in &outputs.slots {
            if let Some(v) = &row[i] {
                fields.insert(self.fields[i].name.clone(), scalar_to_value(v));
            }
        }
        let extra = self.dynamic_slot().and_then(|i| match &row[i] {
            Some(Scalar::Json(v)) => v.as_object(),
            _ => None,
        });
        if let Some(extra) = extra {
            let mut put = |k: &String, v: &serde_json::Value| {
                fields.insert(k.clone(), tandem_proto::json::value_from_json(v));
            };
            match &outputs.dynamic {
                DynamicOutputs::None => {}
                DynamicOutputs::All => extra.iter().for_each(|(k, v)| put(k, v)),
                DynamicOutputs::Keys(keys) => keys.iter().for_each(|k| {
                    if let Some(v) = extra.get(k) {
                        put(k, v)
                    }
                }),
            }
        }
        Some(pb::Payload { fields })
    }

    fn declared(&self) -> String {
        let names: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).filter(|n| *n != DYNAMIC_FIELD).collect();
        if names.is_empty() { "no payload fields".to_string() } else { names.join(", ") }
    }
}

/// What an API type is stored as (`None`: UNSPECIFIED, no type).
fn stored_type(t: pb::ScalarType) -> Option<ScalarType> {
    use pb::ScalarType as T;
    match t {
        T::Int64 | T::Int32 | T::Int16 | T::Int8 => Some(ScalarType::Int64),
        T::Double | T::Float => Some(ScalarType::Float64),
        T::Bool => Some(ScalarType::Bool),
        T::String => Some(ScalarType::String),
        T::Json => Some(ScalarType::Json),
        T::Unspecified => None,
    }
}

/// The API type a stored type stands for when a schema is built without API declarations.
fn stored_api_type(t: ScalarType) -> pb::ScalarType {
    match t {
        ScalarType::Int64 => pb::ScalarType::Int64,
        ScalarType::Float64 => pb::ScalarType::Double,
        ScalarType::Bool => pb::ScalarType::Bool,
        ScalarType::String => pb::ScalarType::String,
        ScalarType::Json => pb::ScalarType::Json,
    }
}

fn int_range(t: pb::ScalarType) -> std::ops::RangeInclusive<i64> {
    match t {
        pb::ScalarType::Int32 => i64::from(i32::MIN)..=i64::from(i32::MAX),
        pb::ScalarType::Int16 => i64::from(i16::MIN)..=i64::from(i16::MAX),
        pb::ScalarType::Int8 => i64::from(i8::MIN)..=i64::from(i8::MAX),
        _ => i64::MIN..=i64::MAX,
    }
}

fn parse_json(name: &str, text: &str) -> Result<serde_json::Value> {
    if text.len() > MAX_STRING_BYTES {
        return Err(ClusterError::invalid(format!("payload field {name:?} is {} bytes of JSON, at most {MAX_STRING_BYTES}", text.len())));
    }
    serde_json::from_str(text).map_err(|e| ClusterError::invalid(format!("payload field {name:?} is not valid JSON: {e}")))
}

/// An undeclared field of a dynamic schema, as the JSON it is kept as (`None`: unset).
fn dynamic_value(name: &str, value: &pb::Value) -> Result<Option<serde_json::Value>> {
    use pb::value::Kind;
    Ok(match &value.kind {
        None => None,
        Some(Kind::Int64Value(v)) => Some((*v).into()),
        Some(Kind::DoubleValue(v)) => Some(
            serde_json::Number::from_f64(*v)
                .ok_or_else(|| ClusterError::invalid(format!("payload field {name:?} is {v}: only finite numbers")))?
                .into(),
        ),
        Some(Kind::BoolValue(v)) => Some((*v).into()),
        Some(Kind::StringValue(v)) => Some(v.clone().into()),
        Some(Kind::JsonValue(text)) => Some(parse_json(name, text)?),
    })
}

pub fn scalar_to_value(v: &Scalar) -> pb::Value {
    use pb::value::Kind;
    pb::Value {
        kind: Some(match v {
            Scalar::Int64(x) => Kind::Int64Value(*x),
            Scalar::Float64(x) => Kind::DoubleValue(*x),
            Scalar::Bool(x) => Kind::BoolValue(*x),
            Scalar::String(x) => Kind::StringValue(x.clone()),
            Scalar::Json(x) => Kind::JsonValue(x.to_string()),
        }),
    }
}

/// Stored rows back to API payloads (WAL records, segment files and snapshots keep the API form;
/// see storage.proto): one per row, or none when the schema has no fields (a `RowBatch` leaves
/// them out then). Dynamic fields come back as top-level keys, which
/// [`Schema::row_from_payload`] gathers again.
pub fn rows_to_payloads(schema: &Schema, rows: &[Vec<Option<Scalar>>]) -> Vec<pb::Payload> {
    if schema.fields.is_empty() {
        return Vec::new();
    }
    let all = schema.output_fields(&["*".to_string()]).unwrap_or_default();
    rows.iter().map(|row| schema.payload_of(row, &all).unwrap_or_default()).collect()
}

/// The type's name as the API spells it (`ScalarType` in tandem.proto).
pub fn type_name(t: pb::ScalarType) -> &'static str {
    t.as_str_name()
}

fn kind_name(k: &pb::value::Kind) -> &'static str {
    use pb::value::Kind;
    match k {
        Kind::Int64Value(_) => "an int64",
        Kind::DoubleValue(_) => "a double",
        Kind::BoolValue(_) => "a bool",
        Kind::StringValue(_) => "a string",
        Kind::JsonValue(_) => "a JSON document",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_proto() -> pb::CollectionSchema {
        pb::CollectionSchema {
            name: "docs".into(),
            dim: 4,
            metric: pb::Metric::Cosine as i32,
            index: Some(IndexKind::Hnsw { m: 8, ef_construction: 64 }.to_proto()),
            shards: 2,
            fields: vec![
                pb::FieldSchema { name: "price".into(), r#type: pb::ScalarType::Double as i32, ..Default::default() },
                pb::FieldSchema { name: "tag".into(), r#type: pb::ScalarType::String as i32, ..Default::default() },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn proto_round_trip() {
        let s = Schema::from_proto(&schema_proto()).unwrap();
        assert_eq!(Schema::from_proto(&s.to_proto()).unwrap(), s);
    }

    #[test]
    fn rejects_bad_schemas_naming_the_value() {
        #[allow(clippy::type_complexity)]
        let cases: Vec<(fn(&mut pb::CollectionSchema), &str)> = vec![
            (|s| s.name = "1abc".into(), "\"1abc\""),
            (|s| s.name = "".into(), "collection name"),
            (|s| s.dim = 0, "dim 0"),
            (|s| s.dim = MAX_DIM + 1, "dim 32769"),
            (|s| s.shards = 65, "shards 65"),
            (|s| s.metric = 9, "metric 9"),
            (|s| s.fields[1].name = "price".into(), "\"price\" is declared twice"),
            (|s| s.fields[0].name = "id".into(), "reserved"),
            (|s| s.fields[0].r#type = 0, "no valid type"),
            (|s| s.index = Some(IndexKind::Hnsw { m: 1, ef_construction: 64 }.to_proto()), "hnsw m 1"),
        ];
        for (mutate, needle) in cases {
            let mut p = schema_proto();
            mutate(&mut p);
            let e = Schema::from_proto(&p).unwrap_err();
            assert!(e.to_string().contains(needle), "{e} should mention {needle}");
        }
    }

    #[test]
    fn declared_types_dynamic_fields_and_names_round_trip() {
        let mut p = schema_proto();
        p.fields.push(pb::FieldSchema { name: "small".into(), r#type: pb::ScalarType::Int8 as i32, ..Default::default() });
        p.fields.push(pb::FieldSchema { name: "f".into(), r#type: pb::ScalarType::Float as i32, ..Default::default() });
        p.fields.push(pb::FieldSchema { name: "doc".into(), r#type: pb::ScalarType::Json as i32, ..Default::default() });
        p.fields[1].max_length = 4;
        p.dynamic_fields = true;
        p.primary_field = "pk".into();
        p.vector_field = "emb".into();
        let s = Schema::from_proto(&p).unwrap();
        assert_eq!(Schema::from_proto(&s.to_proto()).unwrap(), s);
        assert_eq!(s.to_proto().fields.len(), 5, "the hidden dynamic column is not declared");

        let v = |k: pb::value::Kind| pb::Value { kind: Some(k) };
        use pb::value::Kind;
        let mut payload = pb::Payload::default();
        payload.fields.insert("small".into(), v(Kind::Int64Value(-128)));
        payload.fields.insert("f".into(), v(Kind::DoubleValue(0.1)));
        payload.fields.insert("doc".into(), v(Kind::JsonValue(r#"{"a": [1, 2]}"#.into())));
        payload.fields.insert("colour".into(), v(Kind::StringValue("red".into())));
        payload.fields.insert("tags".into(), v(Kind::JsonValue(r#"["x"]"#.into())));
        let row = s.row_from_payload(Some(&payload)).unwrap();
        assert_eq!(row[3], Some(Scalar::Float64(f64::from(0.1f32))), "FLOAT keeps what an f32 holds");
        // Stored and read back (the WAL's form) gives the same row.
        assert_eq!(s.row_from_payload(rows_to_payloads(&s, std::slice::from_ref(&row)).first()).unwrap(), row);
        let back = s.payload_of(&row, &s.output_fields(&["colour".into(), "small".into()]).unwrap()).unwrap();
        assert_eq!(back.fields.len(), 2);
        assert_eq!(back.fields["colour"], v(Kind::StringValue("red".into())));
        let all = s.payload_of(&row, &s.output_fields(&["*".into()]).unwrap()).unwrap();
        assert_eq!(all.fields["tags"], v(Kind::JsonValue(r#"["x"]"#.into())));
        let meta = s.payload_of(&row, &s.output_fields(&[DYNAMIC_FIELD.into()]).unwrap()).unwrap();
        let mut keys: Vec<&str> = meta.fields.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["colour", "tags"], "`$meta` by name is every dynamic field");

        let bad = |name: &str, k: Kind, needle: &str| {
            let mut p = pb::Payload::default();
            p.fields.insert(name.into(), v(k));
            let e = s.row_from_payload(Some(&p)).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        };
        bad("small", Kind::Int64Value(128), "128, out of range for INT8");
        bad("tag", Kind::StringValue("toolong".into()), "at most 4");
        bad("f", Kind::DoubleValue(1e300), "only finite numbers");
        bad("doc", Kind::JsonValue("{nope".into()), "not valid JSON");
        bad("$meta", Kind::StringValue("x".into()), "unknown payload field \"$meta\"");

        let mut p2 = schema_proto();
        p2.primary_field = "tag".into();
        assert!(Schema::from_proto(&p2).unwrap_err().to_string().contains("reserved for the primary key"));
    }

    #[test]
    fn payload_conversion_is_strict() {
        let s = Schema::from_proto(&schema_proto()).unwrap();
        let mut p = pb::Payload::default();
        p.fields.insert("price".into(), scalar_to_value(&Scalar::Int64(3)));
        let row = s.row_from_payload(Some(&p)).unwrap();
        assert_eq!(row, vec![Some(Scalar::Float64(3.0)), None]);

        p.fields.insert("colour".into(), scalar_to_value(&Scalar::Bool(true)));
        let e = s.row_from_payload(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("unknown payload field \"colour\""), "{e}");

        let mut p = pb::Payload::default();
        p.fields.insert("tag".into(), scalar_to_value(&Scalar::Int64(1)));
        let e = s.row_from_payload(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("\"tag\" is declared STRING but got an int64"), "{e}");

        let mut p = pb::Payload::default();
        p.fields.insert("price".into(), scalar_to_value(&Scalar::Float64(f64::NAN)));
        assert!(s.row_from_payload(Some(&p)).is_err());
    }
}
