//! API values and JSON, both ways: how dynamic fields and JSON fields are kept (the cluster),
//! and how JSON-speaking clients see values (the CLI, the Milvus API). One definition, so a value
//! reads the same wherever it is shown.

use crate::v1::Value;
use crate::v1::value::Kind;

/// A JSON value as an API value: numbers (integers as Int64), strings and bools as themselves,
/// anything else (null, arrays, objects) as JSON text.
pub fn value_from_json(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Bool(b) => Kind::BoolValue(*b),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Number(n) => match n.as_i64() {
            Some(i) => Kind::Int64Value(i),
            None => Kind::DoubleValue(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::Null | J::Array(_) | J::Object(_) => Kind::JsonValue(v.to_string()),
    };
    Value { kind: Some(kind) }
}

/// An API value as JSON: a value without a kind (protobuf's null) and non-finite doubles are
/// null; JSON text is parsed (servers only send valid JSON; text that is not is shown as a
/// string rather than lost).
pub fn value_to_json(v: &Value) -> serde_json::Value {
    match &v.kind {
        None => serde_json::Value::Null,
        Some(Kind::Int64Value(x)) => (*x).into(),
        Some(Kind::DoubleValue(x)) => (*x).into(),
        Some(Kind::BoolValue(x)) => (*x).into(),
        Some(Kind::StringValue(x)) => x.clone().into(),
        Some(Kind::JsonValue(x)) => serde_json::from_str(x).unwrap_or_else(|_| x.clone().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_stay_scalars_and_structures_travel_as_text() {
        let j = serde_json::json!({"a": [1, 2.5, "x", true, null]});
        for v in [serde_json::json!(7), serde_json::json!(2.5), serde_json::json!("s"), serde_json::json!(false), j.clone()] {
            assert_eq!(value_to_json(&value_from_json(&v)), v);
        }
        assert_eq!(value_from_json(&serde_json::json!(7)).kind, Some(Kind::Int64Value(7)));
        assert_eq!(value_from_json(&j).kind, Some(Kind::JsonValue(j.to_string())));
        assert_eq!(value_to_json(&Value { kind: Some(Kind::DoubleValue(f64::NAN)) }), serde_json::Value::Null);
        assert_eq!(value_to_json(&Value { kind: Some(Kind::JsonValue("{nope".into())) }), serde_json::json!("{nope"));
    }
}
