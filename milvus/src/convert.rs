//! Conversions between Milvus's messages and tandem's: schemas, the column-wise `FieldData` of
//! inserts and results, search parameters and consistency levels.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value as Json;
use tandem_proto::json::{value_from_json, value_to_json};
use tandem_proto::session::SessionToken;
use tandem_proto::v1 as t;
use tandem_proto::v1::value::Kind;

use crate::pb::common as mc;
use crate::pb::schema as ms;
use crate::status::MilvusError;

/// The name Milvus gives the hidden JSON field of a dynamic schema.
pub const DYNAMIC_FIELD: &str = "$meta";
/// The longest VarChar Milvus accepts; tandem's limit for STRING fields declared without one.
pub const MAX_VARCHAR: u32 = 65_535;
/// Field ids as Milvus numbers them: user fields from 100 on.
const FIRST_FIELD_ID: i64 = 100;

fn param<'a>(params: &'a [mc::KeyValuePair], key: &str) -> Option<&'a str> {
    params.iter().find(|kv| kv.key == key).map(|kv| kv.value.as_str())
}

fn type_name(t: i32) -> String {
    ms::DataType::try_from(t).map_or_else(|_| format!("data type {t}"), |d| d.as_str_name().to_string())
}

/// A Milvus schema as a tandem schema: one Int64 primary key, one FloatVector, scalar fields.
pub fn schema_to_tandem(name: &str, s: &ms::CollectionSchema, shards: i32) -> Result<t::CollectionSchema, MilvusError> {
    let mut out = t::CollectionSchema {
        name: name.to_string(),
        shards: u32::try_from(shards.max(1)).unwrap_or(1),
        dynamic_fields: s.enable_dynamic_field,
        auto_id: s.auto_id,
        description: s.description.clone(),
        ..Default::default()
    };
    if !s.name.is_empty() && s.name != name {
        return Err(MilvusError::invalid(format!("the schema is named {:?} but the request creates collection {name:?}", s.name)));
    }
    let (mut primary, mut vector) = (None, None);
    for f in &s.fields {
        if f.is_dynamic {
            continue;
        }
        if f.nullable {
            return Err(MilvusError::unsupported(format!("nullable field {:?}", f.name)));
        }
        if f.is_partition_key {
            return Err(MilvusError::unsupported(format!("partition key field {:?}", f.name)));
        }
        let dt = ms::DataType::try_from(f.data_type)
            .map_err(|_| MilvusError::invalid(format!("field {:?} has unknown data type {}", f.name, f.data_type)))?;
        use ms::DataType as D;
        if f.is_primary_key {
            if dt != D::Int64 {
                return Err(MilvusError::unsupported(format!(
                    "primary key {:?} of type {} (tandem keys are Int64)",
                    f.name,
                    type_name(f.data_type)
                )));
            }
            if primary.replace(f.name.clone()).is_some() {
                return Err(MilvusError::invalid("the schema has more than one primary key"));
            }
            out.auto_id |= f.auto_id;
            continue;
        }
        let scalar = match dt {
            D::FloatVector => {
                let dim =
                    param(&f.type_params, "dim").ok_or_else(|| MilvusError::invalid(format!("vector field {:?} has no dim", f.name)))?;
                out.dim = dim
                    .trim()
                    .parse()
                    .map_err(|_| MilvusError::invalid(format!("vector field {:?} has dim {dim:?}, not a number", f.name)))?;
                if vector.replace(f.name.clone()).is_some() {
                    return Err(MilvusError::unsupported("more than one vector field"));
                }
                continue;
            }
            D::Bool => t::ScalarType::Bool,
            D::Int8 => t::ScalarType::Int8,
            D::Int16 => t::ScalarType::Int16,
            D::Int32 => t::ScalarType::Int32,
            D::Int64 => t::ScalarType::Int64,
            D::Float => t::ScalarType::Float,
            D::Double => t::ScalarType::Double,
            D::VarChar | D::String => t::ScalarType::String,
            D::Json => t::ScalarType::Json,
            _ => return Err(MilvusError::unsupported(format!("field {:?} of type {}", f.name, type_name(f.data_type)))),
        };
        let max_length = match (scalar, param(&f.type_params, "max_length")) {
            (t::ScalarType::String, Some(v)) => {
                let n: u32 =
                    v.trim().parse().map_err(|_| MilvusError::invalid(format!("field {:?} has max_length {v:?}, not a number", f.name)))?;
                if n == 0 || n > MAX_VARCHAR {
                    return Err(MilvusError::invalid(format!("field {:?} has max_length {n}, out of range 1..={MAX_VARCHAR}", f.name)));
                }
                n
            }
            (t::ScalarType::String, None) => return Err(MilvusError::invalid(format!("VarChar field {:?} has no max_length", f.name))),
            _ => 0,
        };
        out.fields.push(t::FieldSchema { name: f.name.clone(), r#type: scalar as i32, max_length, description: f.description.clone() });
    }
    out.primary_field = primary.ok_or_else(|| MilvusError::invalid("the schema has no primary key field"))?;
    out.vector_field = vector.ok_or_else(|| MilvusError::invalid("the schema has no FloatVector field"))?;
    Ok(out)
}

fn kv(key: &str, value: impl ToString) -> mc::KeyValuePair {
    mc::KeyValuePair { key: key.to_string(), value: value.to_string() }
}

/// A tandem schema as Milvus describes it. Field ids: the key 100, the vector 101, then the
/// scalar fields in declaration order; the hidden dynamic field is not listed (as Milvus).
pub fn schema_to_milvus(s: &t::CollectionSchema) -> ms::CollectionSchema {
    let mut fields = vec![
        ms::FieldSchema {
            field_id: FIRST_FIELD_ID,
            name: primary_name(s).to_string(),
            is_primary_key: true,
            data_type: ms::DataType::Int64 as i32,
            auto_id: s.auto_id,
            ..Default::default()
        },
        ms::FieldSchema {
            field_id: FIRST_FIELD_ID + 1,
            name: vector_name(s).to_string(),
            data_type: ms::DataType::FloatVector as i32,
            type_params: vec![kv("dim", s.dim)],
            ..Default::default()
        },
    ];
    for (i, f) in s.fields.iter().enumerate() {
        let dt = milvus_type(f.r#type);
        let type_params = if dt == ms::DataType::VarChar {
            vec![kv("max_length", if f.max_length == 0 { MAX_VARCHAR } else { f.max_length })]
        } else {
            Vec::new()
        };
        fields.push(ms::FieldSchema {
            field_id: FIRST_FIELD_ID + 2 + i as i64,
            name: f.name.clone(),
            description: f.description.clone(),
            data_type: dt as i32,
            type_params,
            ..Default::default()
        });
    }
    ms::CollectionSchema {
        name: s.name.clone(),
        description: s.description.clone(),
        auto_id: s.auto_id,
        fields,
        enable_dynamic_field: s.dynamic_fields,
        properties: Vec::new(),
    }
}

pub fn primary_name(s: &t::CollectionSchema) -> &str {
    if s.primary_field.is_empty() { "id" } else { &s.primary_field }
}

pub fn vector_name(s: &t::CollectionSchema) -> &str {
    if s.vector_field.is_empty() { "vector" } else { &s.vector_field }
}

fn milvus_type(t: i32) -> ms::DataType {
    use ms::DataType as D;
    match t::ScalarType::try_from(t) {
        Ok(t::ScalarType::Int64) => D::Int64,
        Ok(t::ScalarType::Int32) => D::Int32,
        Ok(t::ScalarType::Int16) => D::Int16,
        Ok(t::ScalarType::Int8) => D::Int8,
        Ok(t::ScalarType::Double) => D::Double,
        Ok(t::ScalarType::Float) => D::Float,
        Ok(t::ScalarType::Bool) => D::Bool,
        Ok(t::ScalarType::String) => D::VarChar,
        Ok(t::ScalarType::Json) => D::Json,
        Ok(t::ScalarType::Unspecified) | Err(_) => D::None,
    }
}

/// Rows of an insert or upsert, column-wise as Milvus sends them, made row-wise.
#[derive(Debug, Default)]
pub struct Rows {
    pub ids: Vec<i64>,
    pub vectors: Vec<f32>,
    pub payloads: Vec<t::Payload>,
}

fn column_len(f: &ms::FieldData, dim: usize) -> Option<usize> {
    use ms::scalar_field::Data as S;
    Some(match f.field.as_ref()? {
        ms::field_data::Field::Scalars(s) => match s.data.as_ref()? {
            S::BoolData(a) => a.data.len(),
            S::IntData(a) => a.data.len(),
            S::LongData(a) => a.data.len(),
            S::FloatData(a) => a.data.len(),
            S::DoubleData(a) => a.data.len(),
            S::StringData(a) => a.data.len(),
            S::BytesData(a) => a.data.len(),
            S::JsonData(a) => a.data.len(),
        },
        ms::field_data::Field::Vectors(v) => match v.data.as_ref()? {
            ms::vector_field::Data::FloatVector(a) => a.data.len() / dim.max(1),
            ms::vector_field::Data::BinaryVector(b) => b.len(),
        },
    })
}

fn bad_column(f: &ms::FieldData, want: &str) -> MilvusError {
    MilvusError::invalid(format!("field {:?} carries {} data, but the collection declares it {want}", f.field_name, type_name(f.r#type)))
}

fn parse_json(field: &str, bytes: &[u8]) -> Result<Json, MilvusError> {
    serde_json::from_slice(bytes).map_err(|e| MilvusError::invalid(format!("field {field:?} holds invalid JSON: {e}")))
}

/// Milvus's column-wise insert as tandem rows. Every declared field must be present (as in
/// Milvus), with one value per row; the key is absent exactly when the collection assigns ids.
pub fn rows_from_fields(s: &t::CollectionSchema, columns: &[ms::FieldData], num_rows: u32) -> Result<Rows, MilvusError> {
    let dim = s.dim as usize;
    let (pk, vec_name) = (primary_name(s), vector_name(s));
    let vector = columns
        .iter()
        .find(|f| f.field_name == vec_name)
        .ok_or_else(|| MilvusError::invalid(format!("the insert has no data for vector field {vec_name:?}")))?;
    let n = column_len(vector, dim).unwrap_or(0);
    if num_rows != 0 && n != num_rows as usize {
        return Err(MilvusError::invalid(format!("vector field {vec_name:?} has {n} rows but the request says num_rows {num_rows}")));
    }
    let mut rows = Rows { payloads: vec![t::Payload::default(); n], ..Default::default() };
    let declared: HashMap<&str, &t::FieldSchema> = s.fields.iter().map(|f| (f.name.as_str(), f)).collect();
    let mut seen = Vec::new();
    use ms::scalar_field::Data as S;
    for col in columns {
        let name = col.field_name.as_str();
        if seen.contains(&name) {
            return Err(MilvusError::invalid(format!("field {name:?} appears twice in the insert")));
        }
        seen.push(name);
        let len = column_len(col, dim).unwrap_or(0);
        if len != n {
            return Err(MilvusError::invalid(format!("field {name:?} has {len} rows, the vector field {vec_name:?} has {n}")));
        }
        let valid = |i: usize| col.valid_data.is_empty() || col.valid_data.get(i).copied().unwrap_or(false);
        let scalars = match col.field.as_ref() {
            Some(ms::field_data::Field::Scalars(sc)) => sc.data.as_ref(),
            _ => None,
        };
        if name == vec_name {
            match col.field.as_ref() {
                Some(ms::field_data::Field::Vectors(ms::VectorField { data: Some(ms::vector_field::Data::FloatVector(a)), dim: d })) => {
                    if *d != 0 && *d as usize != dim {
                        return Err(MilvusError::invalid(format!("vector field {name:?} has dim {d}, the collection's is {dim}")));
                    }
                    if a.data.len() != n * dim {
                        return Err(MilvusError::invalid(format!(
                            "vector field {name:?} holds {} floats, not a multiple of dim {dim}",
                            a.data.len()
                        )));
                    }
                    rows.vectors = a.data.clone();
                }
                _ => return Err(bad_column(col, "FloatVector")),
            }
        } else if name == pk {
            if s.auto_id {
                return Err(MilvusError::invalid(format!("primary key {pk:?} is auto_id: the insert must not carry it")));
            }
            match scalars {
                Some(S::LongData(a)) => rows.ids = a.data.clone(),
                _ => return Err(bad_column(col, "Int64")),
            }
        } else if col.is_dynamic || name == DYNAMIC_FIELD {
            if !s.dynamic_fields {
                return Err(MilvusError::invalid(format!("collection {:?} has no dynamic fields; the insert carries {name:?}", s.name)));
            }
            let Some(S::JsonData(a)) = scalars else { return Err(bad_column(col, "JSON")) };
            for (i, bytes) in a.data.iter().enumerate().filter(|(i, _)| valid(*i)) {
                let Json::Object(obj) = parse_json(name, bytes)? else {
                    return Err(MilvusError::invalid(format!("row {i}'s dynamic fields are not a JSON object")));
                };
                for (k, v) in obj {
                    if k == pk || k == vec_name || declared.contains_key(k.as_str()) {
                        return Err(MilvusError::invalid(format!("row {i}'s dynamic field {k:?} has the name of a declared field")));
                    }
                    rows.payloads[i].fields.insert(k, value_from_json(&v));
                }
            }
        } else {
            let Some(f) = declared.get(name) else {
                return Err(MilvusError::invalid(format!("field {name:?} is not in the schema of collection {:?}", s.name)));
            };
            let ty = t::ScalarType::try_from(f.r#type).unwrap_or(t::ScalarType::Unspecified);
            let want = milvus_type(f.r#type).as_str_name();
            let mut put = |i: usize, k: Kind| {
                if valid(i) {
                    rows.payloads[i].fields.insert(name.to_string(), t::Value { kind: Some(k) });
                }
            };
            use t::ScalarType as T;
            match (ty, scalars) {
                (T::Bool, Some(S::BoolData(a))) => a.data.iter().enumerate().for_each(|(i, v)| put(i, Kind::BoolValue(*v))),
                (T::Int8 | T::Int16 | T::Int32, Some(S::IntData(a))) => {
                    a.data.iter().enumerate().for_each(|(i, v)| put(i, Kind::Int64Value(i64::from(*v))))
                }
                (T::Int64, Some(S::LongData(a))) => a.data.iter().enumerate().for_each(|(i, v)| put(i, Kind::Int64Value(*v))),
                (T::Float, Some(S::FloatData(a))) => a.data.iter().enumerate().for_each(|(i, v)| put(i, Kind::DoubleValue(f64::from(*v)))),
                (T::Double, Some(S::DoubleData(a))) => a.data.iter().enumerate().for_each(|(i, v)| put(i, Kind::DoubleValue(*v))),
                (T::String, Some(S::StringData(a))) => a.data.iter().enumerate().for_each(|(i, v)| put(i, Kind::StringValue(v.clone()))),
                (T::Json, Some(S::JsonData(a))) => {
                    for (i, bytes) in a.data.iter().enumerate() {
                        let text = std::str::from_utf8(bytes)
                            .map_err(|_| MilvusError::invalid(format!("field {name:?} row {i} is not UTF-8 JSON")))?;
                        put(i, Kind::JsonValue(text.to_string()));
                    }
                }
                _ => return Err(bad_column(col, want)),
            }
        }
    }
    if let Some(missing) = s.fields.iter().find(|f| !seen.contains(&f.name.as_str())) {
        return Err(MilvusError::invalid(format!("the insert has no data for field {:?}", missing.name)));
    }
    if !s.auto_id && rows.ids.is_empty() && n > 0 {
        return Err(MilvusError::invalid(format!("the insert has no data for primary key {pk:?}")));
    }
    if rows.payloads.iter().all(|p| p.fields.is_empty()) {
        rows.payloads.clear();
    }
    Ok(rows)
}

/// Which fields a read returns, resolved against the schema.
#[derive(Debug, Default, Clone)]
pub struct OutputPlan {
    /// Declared scalar fields, in the order asked.
    pub declared: Vec<t::FieldSchema>,
    pub vector: bool,
    /// Dynamic keys asked for by name.
    pub dynamic_keys: Vec<String>,
    /// Every dynamic key (`*` or `$meta`).
    pub all_dynamic: bool,
    /// Names as the reply lists them.
    pub names: Vec<String>,
}

impl OutputPlan {
    pub fn new(s: &t::CollectionSchema, asked: &[String]) -> Result<OutputPlan, MilvusError> {
        let mut plan = OutputPlan::default();
        let add_declared = |plan: &mut OutputPlan, f: &t::FieldSchema| {
            if !plan.declared.iter().any(|d| d.name == f.name) {
                plan.declared.push(f.clone());
                plan.names.push(f.name.clone());
            }
        };
        for name in asked.iter().flat_map(|n| n.split(',')).map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                s.fields.iter().for_each(|f| add_declared(&mut plan, f));
                plan.vector = true;
                if s.dynamic_fields && !plan.all_dynamic {
                    plan.all_dynamic = true;
                    plan.names.push(DYNAMIC_FIELD.into());
                }
            } else if name == primary_name(s) {
                // The key is always returned.
            } else if name == vector_name(s) {
                if !plan.vector {
                    plan.vector = true;
                    plan.names.push(name.to_string());
                }
            } else if let Some(f) = s.fields.iter().find(|f| f.name == name) {
                add_declared(&mut plan, f);
            } else if s.dynamic_fields && name == DYNAMIC_FIELD {
                if !plan.all_dynamic {
                    plan.all_dynamic = true;
                    plan.names.push(DYNAMIC_FIELD.into());
                }
            } else if s.dynamic_fields {
                if !plan.dynamic_keys.iter().any(|k| k == name) {
                    plan.dynamic_keys.push(name.to_string());
                    plan.names.push(name.to_string());
                }
            } else {
                return Err(MilvusError::invalid(format!("field {name:?} does not exist in collection {:?}", s.name)));
            }
        }
        if plan.vector && !plan.names.iter().any(|n| n == vector_name(s)) {
            plan.names.push(vector_name(s).to_string());
        }
        Ok(plan)
    }

    /// What to ask tandem for: declared names, and "*" when dynamic keys are wanted.
    pub fn tandem_fields(&self) -> Vec<String> {
        let mut v: Vec<String> = self.declared.iter().map(|f| f.name.clone()).collect();
        if self.all_dynamic {
            v.push("*".into());
        } else {
            v.extend(self.dynamic_keys.iter().cloned());
        }
        v
    }

    pub fn wants_dynamic(&self) -> bool {
        self.all_dynamic || !self.dynamic_keys.is_empty()
    }
}

/// One result row: key, vector (when asked), payload.
pub struct Entity<'a> {
    pub id: i64,
    pub vector: &'a [f32],
    pub payload: Option<&'a t::Payload>,
}

fn scalar_column(name: &str, dt: ms::DataType, data: ms::scalar_field::Data, valid: Vec<bool>) -> ms::FieldData {
    let valid_data = if valid.iter().all(|v| *v) { Vec::new() } else { valid };
    ms::FieldData {
        r#type: dt as i32,
        field_name: name.to_string(),
        field: Some(ms::field_data::Field::Scalars(ms::ScalarField { data: Some(data) })),
        valid_data,
        ..Default::default()
    }
}

/// Result rows column-wise, as Milvus returns them.
pub fn fields_from_entities(s: &t::CollectionSchema, plan: &OutputPlan, rows: &[Entity<'_>], with_key: bool) -> Vec<ms::FieldData> {
    use ms::scalar_field::Data as S;
    let mut out = Vec::new();
    if with_key {
        out.push(scalar_column(
            primary_name(s),
            ms::DataType::Int64,
            S::LongData(ms::LongArray { data: rows.iter().map(|r| r.id).collect() }),
            vec![],
        ));
    }
    for f in &plan.declared {
        let get = |r: &Entity<'_>| r.payload.and_then(|p| p.fields.get(&f.name)).and_then(|v| v.kind.clone());
        let valid: Vec<bool> = rows.iter().map(|r| get(r).is_some()).collect();
        let dt = milvus_type(f.r#type);
        use ms::DataType as D;
        let data = match dt {
            D::Bool => S::BoolData(ms::BoolArray { data: rows.iter().map(|r| matches!(get(r), Some(Kind::BoolValue(true)))).collect() }),
            D::Int8 | D::Int16 | D::Int32 => S::IntData(ms::IntArray {
                data: rows.iter().map(|r| if let Some(Kind::Int64Value(v)) = get(r) { v as i32 } else { 0 }).collect(),
            }),
            D::Int64 => S::LongData(ms::LongArray {
                data: rows.iter().map(|r| if let Some(Kind::Int64Value(v)) = get(r) { v } else { 0 }).collect(),
            }),
            D::Float => S::FloatData(ms::FloatArray {
                data: rows.iter().map(|r| if let Some(Kind::DoubleValue(v)) = get(r) { v as f32 } else { 0.0 }).collect(),
            }),
            D::Double => S::DoubleData(ms::DoubleArray {
                data: rows.iter().map(|r| if let Some(Kind::DoubleValue(v)) = get(r) { v } else { 0.0 }).collect(),
            }),
            D::Json => S::JsonData(ms::JsonArray {
                data: rows.iter().map(|r| if let Some(Kind::JsonValue(v)) = get(r) { v.into_bytes() } else { b"null".to_vec() }).collect(),
            }),
            _ => S::StringData(ms::StringArray {
                data: rows.iter().map(|r| if let Some(Kind::StringValue(v)) = get(r) { v } else { String::new() }).collect(),
            }),
        };
        out.push(scalar_column(&f.name, dt, data, valid));
    }
    if plan.vector {
        let dim = s.dim as usize;
        let mut data = Vec::with_capacity(rows.len() * dim);
        for r in rows {
            if r.vector.len() == dim {
                data.extend_from_slice(r.vector);
            } else {
                data.extend(std::iter::repeat_n(0.0, dim));
            }
        }
        out.push(ms::FieldData {
            r#type: ms::DataType::FloatVector as i32,
            field_name: vector_name(s).to_string(),
            field: Some(ms::field_data::Field::Vectors(ms::VectorField {
                dim: dim as i64,
                data: Some(ms::vector_field::Data::FloatVector(ms::FloatArray { data })),
            })),
            ..Default::default()
        });
    }
    if plan.wants_dynamic() {
        let declared: Vec<&str> = s.fields.iter().map(|f| f.name.as_str()).collect();
        let data = rows
            .iter()
            .map(|r| {
                let obj: BTreeMap<&str, Json> = r
                    .payload
                    .map(|p| {
                        p.fields
                            .iter()
                            .filter(|(k, _)| !declared.contains(&k.as_str()) && (plan.all_dynamic || plan.dynamic_keys.contains(k)))
                            .map(|(k, v)| (k.as_str(), value_to_json(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                serde_json::to_vec(&obj).unwrap_or_else(|_| b"{}".to_vec())
            })
            .collect();
        out.push(ms::FieldData {
            r#type: ms::DataType::Json as i32,
            field_name: DYNAMIC_FIELD.to_string(),
            field: Some(ms::field_data::Field::Scalars(ms::ScalarField { data: Some(S::JsonData(ms::JsonArray { data })) })),
            is_dynamic: true,
            ..Default::default()
        });
    }
    out
}

/// The read options a Milvus read's consistency fields stand for. Milvus timestamps are
/// tandem's hybrid timestamps, so a guarantee timestamp is a session token's.
pub fn read_options(level: i32, guarantee: u64, use_default: bool) -> t::ReadOptions {
    // pymilvus sends 1 ("eventually") and 2 ("bounded") as symbolic guarantee timestamps.
    let session = |fallback: t::ConsistencyLevel| {
        if guarantee > 2 {
            t::ReadOptions {
                consistency: t::ConsistencyLevel::Session as i32,
                session_token: SessionToken { epoch: 0, ts: guarantee }.encode(),
                staleness_ms: 0,
            }
        } else {
            t::ReadOptions { consistency: fallback as i32, ..Default::default() }
        }
    };
    if use_default {
        return session(t::ConsistencyLevel::Bounded);
    }
    match mc::ConsistencyLevel::try_from(level) {
        Ok(mc::ConsistencyLevel::Strong) => t::ReadOptions { consistency: t::ConsistencyLevel::Strong as i32, ..Default::default() },
        Ok(mc::ConsistencyLevel::Bounded) => t::ReadOptions { consistency: t::ConsistencyLevel::Bounded as i32, ..Default::default() },
        Ok(mc::ConsistencyLevel::Eventually) => {
            t::ReadOptions { consistency: t::ConsistencyLevel::Eventually as i32, ..Default::default() }
        }
        Ok(mc::ConsistencyLevel::Session) | Ok(mc::ConsistencyLevel::Customized) | Err(_) => session(t::ConsistencyLevel::Eventually),
    }
}

/// The timestamp a reply's session token carries (Milvus's `session_ts`).
pub fn token_ts(token: &str) -> u64 {
    SessionToken::decode(token).ok().flatten().map_or(0, |t| t.ts)
}

/// The query vectors of a search's placeholder group: float vectors of `dim`, row after row.
pub fn query_vectors(group: &[u8], dim: usize) -> Result<(Vec<f32>, usize), MilvusError> {
    use prost::Message;
    let g = mc::PlaceholderGroup::decode(group)
        .map_err(|e| MilvusError::invalid(format!("the search's placeholder group does not decode: {e}")))?;
    let [p] = g.placeholders.as_slice() else {
        return Err(MilvusError::invalid(format!("the search has {} placeholders, expected 1", g.placeholders.len())));
    };
    if p.r#type != mc::PlaceholderType::FloatVector as i32 {
        let name = mc::PlaceholderType::try_from(p.r#type).map_or_else(|_| p.r#type.to_string(), |t| t.as_str_name().to_string());
        return Err(MilvusError::unsupported(format!("search data of type {name} (tandem searches FloatVector data)")));
    }
    let mut out = Vec::with_capacity(p.values.len() * dim);
    for (i, v) in p.values.iter().enumerate() {
        if v.len() != dim * 4 {
            return Err(MilvusError::invalid(format!(
                "query vector {i} has {} dimensions, the collection's vectors have {dim}",
                v.len() / 4
            )));
        }
        out.extend(v.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    }
    Ok((out, p.values.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, dt: ms::DataType, params: &[(&str, &str)]) -> ms::FieldSchema {
        ms::FieldSchema {
            name: name.into(),
            data_type: dt as i32,
            type_params: params.iter().map(|(k, v)| kv(k, v)).collect(),
            ..Default::default()
        }
    }

    fn quick_schema() -> ms::CollectionSchema {
        let mut pk = field("pk", ms::DataType::Int64, &[]);
        pk.is_primary_key = true;
        ms::CollectionSchema {
            name: "c".into(),
            fields: vec![
                pk,
                field("emb", ms::DataType::FloatVector, &[("dim", "2")]),
                field("tag", ms::DataType::VarChar, &[("max_length", "8")]),
                field("n", ms::DataType::Int16, &[]),
            ],
            enable_dynamic_field: true,
            ..Default::default()
        }
    }

    #[test]
    fn schemas_convert_both_ways() {
        let t = schema_to_tandem("c", &quick_schema(), 0).unwrap();
        assert_eq!((t.dim, t.shards, t.primary_field.as_str(), t.vector_field.as_str(), t.dynamic_fields), (2, 1, "pk", "emb", true));
        assert_eq!(t.fields[0].max_length, 8);
        let back = schema_to_milvus(&t);
        let names: Vec<_> = back.fields.iter().map(|f| (f.name.as_str(), f.field_id)).collect();
        assert_eq!(names, [("pk", 100), ("emb", 101), ("tag", 102), ("n", 103)]);
        assert_eq!(back.fields[3].data_type, ms::DataType::Int16 as i32);
        assert_eq!(schema_to_tandem("c", &back, 1).unwrap(), t);
    }

    #[test]
    fn bad_schemas_are_refused_naming_the_field() {
        type Mutation = Box<dyn Fn(&mut ms::CollectionSchema)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.fields[0].data_type = ms::DataType::VarChar as i32), "primary key \"pk\" of type VarChar"),
            (
                Box::new(|s| {
                    s.fields.remove(1);
                }),
                "no FloatVector",
            ),
            (Box::new(|s| s.fields[2].type_params.clear()), "\"tag\" has no max_length"),
            (Box::new(|s| s.fields[3].data_type = ms::DataType::Array as i32), "field \"n\" of type Array"),
            (Box::new(|s| s.fields[1].type_params[0].value = "x".into()), "dim \"x\""),
        ];
        for (mutate, needle) in cases {
            let mut s = quick_schema();
            mutate(&mut s);
            let e = schema_to_tandem("c", &s, 1).unwrap_err();
            let st = e.status().unwrap();
            assert!(st.reason.contains(needle), "{} should mention {needle}", st.reason);
        }
    }

    #[test]
    fn inserts_become_rows_and_results_become_columns() {
        let t = schema_to_tandem("c", &quick_schema(), 1).unwrap();
        use ms::scalar_field::Data as S;
        let col = |name: &str, dt, data| scalar_column(name, dt, data, vec![]);
        let mut meta = col(
            DYNAMIC_FIELD,
            ms::DataType::Json,
            S::JsonData(ms::JsonArray { data: vec![br#"{"color":"red","w":[1]}"#.to_vec(), b"{}".to_vec()] }),
        );
        meta.is_dynamic = true;
        let columns = vec![
            col("pk", ms::DataType::Int64, S::LongData(ms::LongArray { data: vec![7, 8] })),
            ms::FieldData {
                field_name: "emb".into(),
                field: Some(ms::field_data::Field::Vectors(ms::VectorField {
                    dim: 2,
                    data: Some(ms::vector_field::Data::FloatVector(ms::FloatArray { data: vec![1.0, 2.0, 3.0, 4.0] })),
                })),
                ..Default::default()
            },
            col("tag", ms::DataType::VarChar, S::StringData(ms::StringArray { data: vec!["a".into(), "b".into()] })),
            col("n", ms::DataType::Int16, S::IntData(ms::IntArray { data: vec![-3, 4] })),
            meta,
        ];
        let rows = rows_from_fields(&t, &columns, 2).unwrap();
        assert_eq!(rows.ids, [7, 8]);
        assert_eq!(rows.vectors, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(rows.payloads[0].fields["color"], t::Value { kind: Some(Kind::StringValue("red".into())) });
        assert_eq!(rows.payloads[0].fields["w"], t::Value { kind: Some(Kind::JsonValue("[1]".into())) });
        assert_eq!(rows.payloads[1].fields["n"], t::Value { kind: Some(Kind::Int64Value(4)) });

        let e = rows_from_fields(&t, &columns[..3], 2).unwrap_err();
        assert!(e.status().unwrap().reason.contains("no data for field \"n\""));

        let plan = OutputPlan::new(&t, &["color".into(), "n".into()]).unwrap();
        let entities: Vec<Entity<'_>> =
            rows.ids.iter().zip(&rows.payloads).map(|(id, p)| Entity { id: *id, vector: &[], payload: Some(p) }).collect();
        let out = fields_from_entities(&t, &plan, &entities, true);
        let names: Vec<_> = out.iter().map(|f| f.field_name.as_str()).collect();
        assert_eq!(names, ["pk", "n", DYNAMIC_FIELD]);
        let Some(ms::field_data::Field::Scalars(ms::ScalarField { data: Some(S::JsonData(j)) })) = &out[2].field else { panic!() };
        assert_eq!(j.data[0], br#"{"color":"red"}"#);
        assert!(
            OutputPlan::new(
                &schema_to_tandem("c", &ms::CollectionSchema { enable_dynamic_field: false, ..quick_schema() }, 1).unwrap(),
                &["nope".into()]
            )
            .is_err()
        );
    }

    #[test]
    fn consistency_maps_onto_tandem_levels() {
        let r = read_options(mc::ConsistencyLevel::Session as i32, 1 << 40, false);
        assert_eq!(r.consistency, t::ConsistencyLevel::Session as i32);
        assert_eq!(token_ts(&r.session_token), 1 << 40);
        assert_eq!(read_options(mc::ConsistencyLevel::Session as i32, 1, false).consistency, t::ConsistencyLevel::Eventually as i32);
        assert_eq!(read_options(mc::ConsistencyLevel::Strong as i32, 0, false).consistency, t::ConsistencyLevel::Strong as i32);
        assert_eq!(read_options(0, 2, true).consistency, t::ConsistencyLevel::Bounded as i32);
        assert_eq!(read_options(0, 99, true).consistency, t::ConsistencyLevel::Session as i32);
    }
}
