//! Text PostgreSQL can store, proven at the edge.
//!
//! PostgreSQL's `text` and `jsonb` cannot hold U+0000: a string or JSON document carrying one
//! fails inside the database (`invalid byte sequence for encoding "UTF8": 0x00`,
//! `unsupported Unicode escape sequence`), long after the request was accepted, where the
//! only honest answer left is a 5xx that no retry can fix. So every client text headed for
//! PostgreSQL becomes a [`StorableText`] or a [`StorableJson`] where it is parsed; their
//! constructors refuse U+0000 and name the field at fault ([`Unstorable`], a 422), and the
//! core, which takes only these types, cannot receive such text.
//!
//! `jsonb` also keeps numbers as exact decimals and gives them back written out in full
//! (`1.7976931348623157e308` comes back as 309 digits). A number whose full decimal form the
//! JSON reader cannot read back (the largest doubles round up past the range) would be
//! stored and then make every read of it fail, so [`StorableJson`] refuses it too.
//!
//! Field names are paths in the request body: `data`, `data.items[2].sku`, and for a key
//! that is not a plain identifier, `data["bad\u0000key"]` (the key as a JSON string).

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::problem::Problem;

/// Why some input cannot be stored, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {}", self.detail())]
pub struct Unstorable {
    field: String,
    number: bool,
}

impl Unstorable {
    fn nul(field: &str) -> Self {
        Self {
            field: field.to_owned(),
            number: false,
        }
    }

    /// The path of the offending field (or key) in the request.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What to tell the client.
    pub fn detail(&self) -> &'static str {
        if self.number {
            "is a number too close to the limit of a double to be stored and read back"
        } else {
            "must not contain U+0000 (NUL): it cannot be stored"
        }
    }
}

impl From<Unstorable> for Problem {
    fn from(unstorable: Unstorable) -> Self {
        Problem::invalid_field(&unstorable.field, unstorable.detail())
    }
}

/// A string with no U+0000, so PostgreSQL's `text` can hold it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct StorableText(String);

impl StorableText {
    /// `text`, or the refusal naming `field` when it holds U+0000.
    pub fn parse(field: &str, text: impl Into<String>) -> Result<Self, Unstorable> {
        let text = text.into();
        if text.contains('\0') {
            return Err(Unstorable::nul(field));
        }
        Ok(Self(text))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::ops::Deref for StorableText {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for StorableText {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorableText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// For inputs read with serde: the refusal then carries no path, only serde's position.
impl<'de> Deserialize<'de> for StorableText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse("value", text).map_err(|_| {
            serde::de::Error::custom("must not contain U+0000 (NUL): it cannot be stored")
        })
    }
}

/// A JSON document (a [`Value`], or a [`Map`] for an object) with no U+0000 in any string
/// or object key at any depth, so PostgreSQL's `jsonb` can hold it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct StorableJson<T = Value>(T);

impl StorableJson<Value> {
    /// `value`, or the refusal naming the first path (below `field`) that holds U+0000.
    pub fn parse(field: &str, value: Value) -> Result<Self, Unstorable> {
        let mut path = field.to_owned();
        check_value(&mut path, &value)?;
        Ok(Self(value))
    }
}

impl StorableJson<Map<String, Value>> {
    /// The object `object`, or the refusal naming the first path (below `field`) that
    /// holds U+0000.
    pub fn parse_object(field: &str, object: Map<String, Value>) -> Result<Self, Unstorable> {
        let mut path = field.to_owned();
        check_object(&mut path, &object)?;
        Ok(Self(object))
    }
}

impl<T> StorableJson<T> {
    /// The document.
    pub fn get(&self) -> &T {
        &self.0
    }

    /// The document, owned.
    pub fn into_inner(self) -> T {
        self.0
    }
}

/// Walks `value`, keeping `path` as the path of the node being looked at, so the refusal can
/// name it without building a path for every node that is fine.
fn check_value(path: &mut String, value: &Value) -> Result<(), Unstorable> {
    match value {
        Value::String(text) if text.contains('\0') => Err(Unstorable::nul(path)),
        Value::Number(number) if !reads_back_in_full(number) => Err(Unstorable {
            field: path.clone(),
            number: true,
        }),
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{index}]");
                check_value(path, item)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(object) => check_object(path, object),
        _ => Ok(()),
    }
}

fn check_object(path: &mut String, object: &Map<String, Value>) -> Result<(), Unstorable> {
    for (key, value) in object {
        let len = path.len();
        push_key(path, key);
        if key.contains('\0') {
            return Err(Unstorable::nul(path));
        }
        check_value(path, value)?;
        path.truncate(len);
    }
    Ok(())
}

/// Whether `number`, written out in full as `jsonb` gives it back (no exponent: Rust's
/// `Display` of a double prints the same digits), reads back as a number. Integers always do.
fn reads_back_in_full(number: &serde_json::Number) -> bool {
    match number.as_f64() {
        Some(double) if number.is_f64() => {
            serde_json::from_str::<serde_json::Number>(&double.to_string()).is_ok()
        }
        _ => true,
    }
}

/// `.key` for a plain identifier, `["key"]` (a JSON string) for anything else.
fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if plain {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&Value::String(key.to_owned()).to_string());
        path.push(']');
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused_at(value: Value) -> String {
        StorableJson::parse("data", value)
            .unwrap_err()
            .field()
            .to_owned()
    }

    #[test]
    fn text_without_nul_is_kept_as_it_is() {
        let text = StorableText::parse("name", "zoë\ttab\u{1}").unwrap();
        assert_eq!(text.as_str(), "zoë\ttab\u{1}");
    }

    #[test]
    fn text_with_nul_anywhere_is_refused_naming_the_field() {
        for bad in ["\0", "a\0", "\0b", "a\0b"] {
            let refused = StorableText::parse("username", bad).unwrap_err();
            assert_eq!(refused.field(), "username");
        }
    }

    #[test]
    fn json_refusal_names_the_path_of_the_value_or_key() {
        assert_eq!(refused_at(json!({"a": "x\0"})), "data.a");
        assert_eq!(
            refused_at(json!({"a": {"b": [1, "ok", "\0"]}})),
            "data.a.b[2]"
        );
        assert_eq!(refused_at(json!({"a\0b": 1})), r#"data["a\u0000b"]"#);
        assert_eq!(
            refused_at(json!({"outer": [{"in\0ner": true}]})),
            r#"data.outer[0]["in\u0000ner"]"#
        );
        assert_eq!(refused_at(json!("\0")), "data");
        assert_eq!(
            refused_at(json!({"odd key": {"x": "\0"}})),
            r#"data["odd key"].x"#
        );
    }

    #[test]
    fn numbers_that_would_not_read_back_are_refused_naming_their_path() {
        assert_eq!(refused_at(json!({ "n": [f64::MAX] })), "data.n[0]");
        assert_eq!(refused_at(json!({ "n": -f64::MAX })), "data.n");
        for fine in [1e300, -1e300, 5e-324, 0.1, -0.0, 1e308] {
            assert!(
                StorableJson::parse("data", json!({ "n": fine })).is_ok(),
                "{fine}"
            );
        }
        assert!(StorableJson::parse("data", json!({ "n": u64::MAX, "m": i64::MIN })).is_ok());
    }

    #[test]
    fn clean_json_at_any_depth_is_kept() {
        let mut deep = json!("leaf");
        for _ in 0..200 {
            deep = json!({ "k": [deep] });
        }
        let object = json!({"n": 1e300, "s": "\u{1}\u{fffd}", "deep": deep});
        let Value::Object(object) = object else {
            unreachable!()
        };
        let kept = StorableJson::parse_object("data", object.clone()).unwrap();
        assert_eq!(kept.into_inner(), object);
    }

    #[test]
    fn refusal_becomes_a_422_naming_the_field() {
        let problem = Problem::from(StorableText::parse("title", "a\0").unwrap_err());
        assert_eq!(problem.status.as_u16(), 422);
        assert_eq!(problem.field.as_deref(), Some("title"));
    }

    #[test]
    fn serde_refuses_nul_too() {
        assert!(serde_json::from_str::<StorableText>(r#""a\u0000""#).is_err());
        assert_eq!(
            serde_json::from_str::<StorableText>(r#""ok""#)
                .unwrap()
                .as_str(),
            "ok"
        );
    }
}
