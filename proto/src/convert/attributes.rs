//! OTLP `AnyValue` / `KeyValue` lists into `Map<Utf8, Utf8>` columns.
//!
//! Non-string values follow the OpenTelemetry rule for representing attributes as strings:
//! booleans and numbers in their usual text form, bytes as base64, arrays and maps as JSON.

use arrow::array::{MapBuilder, StringBuilder};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use serde_json::Value as Json;

pub(crate) type AttrBuilder = MapBuilder<StringBuilder, StringBuilder>;

/// A map builder for `rows` maps of about `per_row` attributes (keys and values of ~16 bytes).
pub(crate) fn attr_builder(rows: usize, per_row: usize) -> AttrBuilder {
    let entries = rows * per_row;
    MapBuilder::with_capacity(
        None,
        StringBuilder::with_capacity(entries, entries * 16),
        StringBuilder::with_capacity(entries, entries * 16),
        rows,
    )
}

/// Appends one map entry per attribute and closes the map (never null).
pub(crate) fn append_attrs(b: &mut AttrBuilder, kvs: &[KeyValue]) {
    for kv in kvs {
        b.keys().append_value(&kv.key);
        match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => b.values().append_value(s),
            Some(v) => b.values().append_value(value_to_string(v)),
            None => b.values().append_null(),
        }
    }
    // `append` only fails when keys and values differ in length, which they cannot here.
    let _ = b.append(true);
}

/// Finds an attribute by key.
pub(crate) fn find<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

/// The first present string form of several attribute keys (current name, then aliases).
pub(crate) fn find_str(kvs: &[KeyValue], keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| find(kvs, k)).map(|v| match v {
        Value::StringValue(s) => s.clone(),
        other => value_to_string(other),
    })
}

/// The first present integer form of several attribute keys (ints, or strings holding one).
pub(crate) fn find_i64(kvs: &[KeyValue], keys: &[&str]) -> Option<i64> {
    keys.iter().find_map(|k| match find(kvs, k)? {
        Value::IntValue(i) => Some(*i),
        Value::StringValue(s) => s.trim().parse().ok(),
        Value::DoubleValue(d) if d.fract() == 0.0 => Some(*d as i64),
        _ => None,
    })
}

/// The string form of an `AnyValue` (empty string for an empty value).
pub fn any_value_to_string(v: &AnyValue) -> String {
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(other) => value_to_string(other),
        None => String::new(),
    }
}

fn value_to_string(v: &Value) -> String {
    match v {
        Value::StringValue(s) => s.clone(),
        Value::BoolValue(b) => b.to_string(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BytesValue(b) => base64_encode(b),
        Value::ArrayValue(_) | Value::KvlistValue(_) => to_json(v).to_string(),
        // An index into a profile's string table: meaningless outside profiles.
        Value::StringValueStrindex(i) => i.to_string(),
    }
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::StringValue(s) => Json::String(s.clone()),
        Value::BoolValue(b) => Json::Bool(*b),
        Value::IntValue(i) => Json::from(*i),
        Value::DoubleValue(d) => serde_json::Number::from_f64(*d)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(d.to_string())),
        Value::BytesValue(b) => Json::String(base64_encode(b)),
        Value::StringValueStrindex(i) => Json::from(*i),
        Value::ArrayValue(a) => Json::Array(
            a.values
                .iter()
                .map(|x| x.value.as_ref().map(to_json).unwrap_or(Json::Null))
                .collect(),
        ),
        Value::KvlistValue(kv) => Json::Object(
            kv.values
                .iter()
                .map(|kv| {
                    let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
                    (kv.key.clone(), v.map(to_json).unwrap_or(Json::Null))
                })
                .collect(),
        ),
    }
}

/// Standard base64 with padding (RFC 4648), as the OTLP/JSON mapping writes bytes.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};

    fn s(v: &str) -> AnyValue {
        AnyValue {
            value: Some(Value::StringValue(v.into())),
        }
    }

    #[test]
    fn scalars_and_bytes() {
        assert_eq!(value_to_string(&Value::BoolValue(true)), "true");
        assert_eq!(value_to_string(&Value::IntValue(-42)), "-42");
        assert_eq!(value_to_string(&Value::DoubleValue(1.5)), "1.5");
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_encode(b"M"), "TQ==");
        assert_eq!(base64_encode(b""), "");
    }

    #[test]
    fn nested_values_become_json() {
        let v = Value::KvlistValue(KeyValueList {
            values: vec![KeyValue {
                key: "a".into(),
                value: Some(AnyValue {
                    value: Some(Value::ArrayValue(ArrayValue {
                        values: vec![
                            s("x"),
                            AnyValue {
                                value: Some(Value::IntValue(1)),
                            },
                        ],
                    })),
                }),
                ..Default::default()
            }],
        });
        assert_eq!(value_to_string(&v), r#"{"a":["x",1]}"#);
    }

    #[test]
    fn lookups_follow_aliases() {
        let kvs = vec![
            KeyValue {
                key: "http.status_code".into(),
                value: Some(s("503")),
                ..Default::default()
            },
            KeyValue {
                key: "net.peer.name".into(),
                value: Some(s("db")),
                ..Default::default()
            },
        ];
        assert_eq!(
            find_i64(&kvs, &["http.response.status_code", "http.status_code"]),
            Some(503)
        );
        assert_eq!(
            find_str(&kvs, &["server.address", "net.peer.name"]).as_deref(),
            Some("db")
        );
        assert_eq!(find_str(&kvs, &["peer.service"]), None);
    }
}
