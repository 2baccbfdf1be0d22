//! Collection schemas: validation of what a client asks for, and conversion of payloads between
//! the API's `map<string, Value>` and the row form the engine stores (one slot per declared
//! field, in declaration order, so filters resolve names once at compile time).

use std::collections::HashMap;

use tandem_proto::v1 as pb;

use crate::error::{ClusterError, Result};
use crate::filter::{FieldDef, Scalar, ScalarType};

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

    fn from_proto(m: i32) -> Result<Metric> {
        match pb::Metric::try_from(m) {
            // The friendliest default: most embedding models are compared by L2 or cosine, and
            // L2 is what faiss and Milvus default to.
            Ok(pb::Metric::Unspecified) | Ok(pb::Metric::L2) => Ok(Metric::L2),
            Ok(pb::Metric::Ip) => Ok(Metric::Ip),
            Ok(pb::Metric::Cosine) => Ok(Metric::Cosine),
            Err(_) => Err(ClusterError::invalid(format!("unknown metric {m}: use L2, IP or COSINE"))),
        }
    }

    fn to_proto(self) -> pb::Metric {
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
        pb::IndexSpec { kind: Some(kind) }
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
    pub fields: Vec<FieldDef>,
    field_pos: HashMap<String, usize>,
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
        for f in &p.fields {
            validate_name("field", &f.name)?;
            if f.name == "id" {
                return Err(ClusterError::invalid("field name \"id\" is reserved for the primary key"));
            }
            let ty = match pb::ScalarType::try_from(f.r#type) {
                Ok(pb::ScalarType::Int64) => ScalarType::Int64,
                Ok(pb::ScalarType::Double) => ScalarType::Float64,
                Ok(pb::ScalarType::Bool) => ScalarType::Bool,
                Ok(pb::ScalarType::String) => ScalarType::String,
                Ok(pb::ScalarType::Unspecified) | Err(_) => {
                    return Err(ClusterError::invalid(format!(
                        "field {:?} has no valid type (got {}): use INT64, DOUBLE, BOOL or STRING",
                        f.name, f.r#type
                    )));
                }
            };
            fields.push(FieldDef { name: f.name.clone(), ty });
        }
        Schema::new(p.name.clone(), p.dim as usize, Metric::from_proto(p.metric)?, IndexKind::from_proto(p.index.as_ref())?, shards, fields)
    }

    pub fn new(name: String, dim: usize, metric: Metric, index: IndexKind, shards: u32, fields: Vec<FieldDef>) -> Result<Schema> {
        let mut field_pos = HashMap::new();
        for (i, f) in fields.iter().enumerate() {
            if field_pos.insert(f.name.clone(), i).is_some() {
                return Err(ClusterError::invalid(format!("field {:?} is declared twice", f.name)));
            }
        }
        Ok(Schema { name, dim, metric, index, shards, fields, field_pos })
    }

    pub fn to_proto(&self) -> pb::CollectionSchema {
        pb::CollectionSchema {
            name: self.name.clone(),
            dim: self.dim as u32,
            metric: self.metric.to_proto() as i32,
            index: Some(self.index.to_proto()),
            shards: self.shards,
            fields: self
                .fields
                .iter()
                .map(|f| pb::FieldSchema {
                    name: f.name.clone(),
                    r#type: match f.ty {
                        ScalarType::Int64 => pb::ScalarType::Int64,
                        ScalarType::Float64 => pb::ScalarType::Double,
                        ScalarType::Bool => pb::ScalarType::Bool,
                        ScalarType::String => pb::ScalarType::String,
                    } as i32,
                })
                .collect(),
        }
    }

    /// Converts an API payload to a stored row, rejecting undeclared fields and wrong types.
    pub fn row_from_payload(&self, p: Option<&pb::Payload>) -> Result<Vec<Option<Scalar>>> {
        let mut row = vec![None; self.fields.len()];
        let Some(p) = p else { return Ok(row) };
        for (name, value) in &p.fields {
            let Some(&i) = self.field_pos.get(name) else {
                return Err(ClusterError::invalid(format!(
                    "unknown payload field {name:?}: collection {:?} declares {}",
                    self.name,
                    self.declared()
                )));
            };
            let want = self.fields[i].ty;
            use pb::value::Kind;
            let v = match (&value.kind, want) {
                (None, _) => None,
                (Some(Kind::Int64Value(v)), ScalarType::Int64) => Some(Scalar::Int64(*v)),
                // An integer literal for a DOUBLE field is what JSON-fed clients send for 1.0.
                (Some(Kind::Int64Value(v)), ScalarType::Float64) => Some(Scalar::Float64(*v as f64)),
                (Some(Kind::DoubleValue(v)), ScalarType::Float64) => {
                    if !v.is_finite() {
                        return Err(ClusterError::invalid(format!("payload field {name:?} is {v}: only finite numbers")));
                    }
                    Some(Scalar::Float64(*v))
                }
                (Some(Kind::BoolValue(v)), ScalarType::Bool) => Some(Scalar::Bool(*v)),
                (Some(Kind::StringValue(v)), ScalarType::String) => {
                    if v.len() > MAX_STRING_BYTES {
                        return Err(ClusterError::invalid(format!(
                            "payload field {name:?} is {} bytes, at most {MAX_STRING_BYTES}",
                            v.len()
                        )));
                    }
                    Some(Scalar::String(v.clone()))
                }
                (Some(k), _) => {
                    return Err(ClusterError::invalid(format!(
                        "payload field {name:?} is declared {} but got {}",
                        api_type_name(want),
                        kind_name(k)
                    )));
                }
            };
            row[i] = v;
        }
        Ok(row)
    }

    /// Resolves the output field list of a read ("*" = all declared fields).
    pub fn output_fields(&self, names: &[String]) -> Result<Vec<usize>> {
        if names.iter().any(|n| n == "*") {
            return Ok((0..self.fields.len()).collect());
        }
        names
            .iter()
            .map(|n| {
                self.field_pos.get(n).copied().ok_or_else(|| {
                    ClusterError::invalid(format!("unknown output field {n:?}: collection {:?} declares {}", self.name, self.declared()))
                })
            })
            .collect()
    }

    pub fn payload_of(&self, row: &[Option<Scalar>], outputs: &[usize]) -> Option<pb::Payload> {
        if outputs.is_empty() {
            return None;
        }
        let mut fields = HashMap::with_capacity(outputs.len());
        for &i in outputs {
            if let Some(v) = &row[i] {
                fields.insert(self.fields[i].name.clone(), scalar_to_value(v));
            }
        }
        Some(pb::Payload { fields })
    }

    fn declared(&self) -> String {
        if self.fields.is_empty() {
            "no payload fields".to_string()
        } else {
            self.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
        }
    }
}

pub fn scalar_to_value(v: &Scalar) -> pb::Value {
    use pb::value::Kind;
    pb::Value {
        kind: Some(match v {
            Scalar::Int64(x) => Kind::Int64Value(*x),
            Scalar::Float64(x) => Kind::DoubleValue(*x),
            Scalar::Bool(x) => Kind::BoolValue(*x),
            Scalar::String(x) => Kind::StringValue(x.clone()),
        }),
    }
}

/// Stored rows back to API payloads (WAL and segment files keep the API form; see storage.proto).
pub fn row_to_payload(schema: &Schema, row: &[Option<Scalar>]) -> pb::Payload {
    let all: Vec<usize> = (0..schema.fields.len()).collect();
    schema.payload_of(row, &all).unwrap_or_default()
}

/// The type's name as the API spells it (`ScalarType` in tandem.proto).
pub fn api_type_name(t: ScalarType) -> &'static str {
    match t {
        ScalarType::Int64 => "INT64",
        ScalarType::Float64 => "DOUBLE",
        ScalarType::Bool => "BOOL",
        ScalarType::String => "STRING",
    }
}

fn kind_name(k: &pb::value::Kind) -> &'static str {
    use pb::value::Kind;
    match k {
        Kind::Int64Value(_) => "an int64",
        Kind::DoubleValue(_) => "a double",
        Kind::BoolValue(_) => "a bool",
        Kind::StringValue(_) => "a string",
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
                pb::FieldSchema { name: "price".into(), r#type: pb::ScalarType::Double as i32 },
                pb::FieldSchema { name: "tag".into(), r#type: pb::ScalarType::String as i32 },
            ],
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
