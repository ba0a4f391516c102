//! Reading events off the wire so every fault is named, not just "invalid JSON".
//!
//! serde's derive stops at the first wrong field with a message that names no field in a
//! machine-readable way, and fails a whole array for one bad element. Here each field is
//! first read as any JSON [`Scalar`], so a missing field, a wrong type, an unknown or
//! duplicated key, or an element that is not an object becomes a [`Rejection`] naming the
//! field, and a batch keeps its good events. Only broken JSON syntax fails a whole body.

use std::{borrow::Cow, fmt};

use chrono::{DateTime, Utc};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, SeqAccess, Visitor},
};

use crate::event::{Event, EventType, UserId};

/// Why one event was refused, in terms a client can act on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// The field at fault, if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong.
    pub detail: String,
}

impl Rejection {
    fn field(field: &str, detail: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_owned()),
            detail: detail.into(),
        }
    }

    /// A rejection with no single field at fault (e.g. broken JSON on an NDJSON line).
    pub fn whole(detail: impl Into<String>) -> Self {
        Self {
            field: None,
            detail: detail.into(),
        }
    }
}

/// Any JSON value, kept only as far as the checks need.
#[derive(Debug)]
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Num(f64),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Num(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Num(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Num(v as f64))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other("a boolean"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other("null"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("an object"))
    }
}

/// An event as sent, every field still unchecked.
#[derive(Debug, Default)]
pub struct WireEvent<'a> {
    timestamp: Option<Scalar<'a>>,
    user_id: Option<Scalar<'a>>,
    event_type: Option<Scalar<'a>>,
    value: Option<Scalar<'a>>,
    /// The first structural fault seen (unknown or repeated key, not an object).
    fault: Option<Rejection>,
}

impl<'de> Deserialize<'de> for WireEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(WireEventVisitor)
    }
}

struct WireEventVisitor;

impl WireEventVisitor {
    fn not_an_object<'a>(kind: &str) -> WireEvent<'a> {
        WireEvent {
            fault: Some(Rejection::whole(format!(
                "an event must be a JSON object, got {kind}"
            ))),
            ..WireEvent::default()
        }
    }
}

impl<'de> Visitor<'de> for WireEventVisitor {
    type Value = WireEvent<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut event = WireEvent::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "timestamp" => &mut event.timestamp,
                "user_id" => &mut event.user_id,
                "event_type" => &mut event.event_type,
                "value" => &mut event.value,
                unknown => {
                    map.next_value::<IgnoredAny>()?;
                    if event.fault.is_none() {
                        let shown: String = unknown.chars().take(64).collect();
                        event.fault = Some(Rejection::field(
                            &shown,
                            format!(
                                "unknown field `{shown}`; expected timestamp, user_id, event_type, value"
                            ),
                        ));
                    }
                    continue;
                }
            };
            let value = map.next_value::<Scalar<'de>>()?;
            if slot.replace(value).is_some() && event.fault.is_none() {
                event.fault = Some(Rejection::field(
                    &key,
                    format!("field `{key}` appears more than once"),
                ));
            }
        }
        Ok(event)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::not_an_object("an array"))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Self::not_an_object("a string"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Self::not_an_object("a number"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Self::not_an_object("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Self::not_an_object("a number"))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Self::not_an_object("a boolean"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Self::not_an_object("null"))
    }
}

fn string_field<'s>(
    field: &'static str,
    raw: &'s Option<Scalar<'_>>,
) -> Result<&'s str, Rejection> {
    match raw {
        Some(Scalar::Str(s)) => Ok(s),
        Some(Scalar::Num(_)) => Err(Rejection::field(
            field,
            format!("{field} must be a string, got a number"),
        )),
        Some(Scalar::Other(kind)) => Err(Rejection::field(
            field,
            format!("{field} must be a string, got {kind}"),
        )),
        None => Err(Rejection::field(field, format!("{field} is required"))),
    }
}

impl WireEvent<'_> {
    /// Checks every field, in wire order, and builds the domain event.
    pub fn into_event(self) -> Result<Event, Rejection> {
        if let Some(fault) = self.fault {
            return Err(fault);
        }
        let raw_timestamp = string_field("timestamp", &self.timestamp)?;
        let timestamp = DateTime::parse_from_rfc3339(raw_timestamp)
            .map_err(|e| {
                Rejection::field(
                    "timestamp",
                    format!(
                        "timestamp must be an RFC 3339 time such as 2026-01-01T12:00:00Z ({e})"
                    ),
                )
            })?
            .with_timezone(&Utc);
        let user_id = UserId::parse(string_field("user_id", &self.user_id)?)
            .map_err(|e| Rejection::field(e.field, e.to_string()))?;
        let event_type = EventType::parse(string_field("event_type", &self.event_type)?)
            .map_err(|e| Rejection::field(e.field, e.to_string()))?;
        let value = match self.value {
            Some(Scalar::Num(v)) if v.is_finite() => v,
            Some(Scalar::Num(v)) => {
                return Err(Rejection::field(
                    "value",
                    format!("value must be finite, got {v}"),
                ));
            }
            Some(Scalar::Str(s)) => {
                let shown: String = s.chars().take(32).collect();
                return Err(Rejection::field(
                    "value",
                    format!("value must be a JSON number, got the string {shown:?}"),
                ));
            }
            Some(Scalar::Other(kind)) => {
                return Err(Rejection::field(
                    "value",
                    format!("value must be a JSON number, got {kind}"),
                ));
            }
            None => return Err(Rejection::field("value", "value is required")),
        };
        Ok(Event {
            timestamp,
            user_id,
            event_type,
            value,
        })
    }
}

/// Why a JSON array of events could not be read.
#[derive(Debug)]
pub enum ArrayError {
    /// Broken JSON, or not an array.
    Malformed(serde_json::Error),
    /// More than the allowed number of elements; reading stopped at the first one too many.
    TooMany,
}

/// Reads a JSON array of at most `limit` events, stopping at the first element past the
/// limit, so an oversized batch never costs more than `limit` parsed elements.
pub fn parse_array(body: &[u8], limit: usize) -> Result<Vec<WireEvent<'_>>, ArrayError> {
    let too_many = std::cell::Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let events = serde::de::DeserializeSeed::deserialize(
        BoundedArray {
            limit,
            too_many: &too_many,
        },
        &mut deserializer,
    )
    .and_then(|events| deserializer.end().map(|()| events));
    match events {
        Ok(events) => Ok(events),
        Err(_) if too_many.get() => Err(ArrayError::TooMany),
        Err(error) => Err(ArrayError::Malformed(error)),
    }
}

struct BoundedArray<'c> {
    limit: usize,
    too_many: &'c std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for BoundedArray<'_> {
    type Value = Vec<WireEvent<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BoundedArray<'_> {
    type Value = Vec<WireEvent<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of at most {} events", self.limit)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut events =
            Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.limit).min(4_096));
        while let Some(event) = seq.next_element::<WireEvent<'de>>()? {
            if events.len() == self.limit {
                self.too_many.set(true);
                return Err(serde::de::Error::custom("too many events"));
            }
            events.push(event);
        }
        Ok(events)
    }
}

/// Reads one event from a JSON body. `Err` means the JSON itself is broken.
pub fn parse_one(body: &[u8]) -> Result<Result<Event, Rejection>, serde_json::Error> {
    serde_json::from_slice::<WireEvent<'_>>(body).map(WireEvent::into_event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject(json: &str) -> Rejection {
        parse_one(json.as_bytes())
            .expect("valid JSON")
            .expect_err("must be refused")
    }

    const GOOD: &str = r#"{"timestamp":"2026-01-01T12:00:00Z","user_id":"u1","event_type":"checkout","value":9.5}"#;

    #[test]
    fn a_good_event_parses() {
        let event = parse_one(GOOD.as_bytes()).unwrap().unwrap();
        assert_eq!(event.event_type.as_str(), "checkout");
        assert_eq!(event.value, 9.5);
    }

    #[test]
    fn offsets_are_normalised_to_utc() {
        let json =
            r#"{"timestamp":"2026-01-01T14:00:00+02:00","user_id":"u","event_type":"t","value":1}"#;
        let event = parse_one(json.as_bytes()).unwrap().unwrap();
        assert_eq!(event.timestamp.to_rfc3339(), "2026-01-01T12:00:00+00:00");
    }

    #[test]
    fn each_missing_field_is_named() {
        for field in ["timestamp", "user_id", "event_type", "value"] {
            let mut object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(GOOD).unwrap();
            object.remove(field);
            let rejection = reject(&serde_json::Value::Object(object).to_string());
            assert_eq!(rejection.field.as_deref(), Some(field));
            assert!(rejection.detail.contains("required"), "{rejection:?}");
        }
    }

    #[test]
    fn wrong_types_are_named() {
        let cases = [
            (
                r#"{"timestamp":5,"user_id":"u","event_type":"t","value":1}"#,
                "timestamp",
            ),
            (
                r#"{"timestamp":"2026-01-01T12:00:00Z","user_id":null,"event_type":"t","value":1}"#,
                "user_id",
            ),
            (
                r#"{"timestamp":"2026-01-01T12:00:00Z","user_id":"u","event_type":["t"],"value":1}"#,
                "event_type",
            ),
            (
                r#"{"timestamp":"2026-01-01T12:00:00Z","user_id":"u","event_type":"t","value":"NaN"}"#,
                "value",
            ),
            (
                r#"{"timestamp":"2026-01-01T12:00:00Z","user_id":"u","event_type":"t","value":{"x":1}}"#,
                "value",
            ),
            (
                r#"{"timestamp":"yesterday","user_id":"u","event_type":"t","value":1}"#,
                "timestamp",
            ),
            (
                r#"{"timestamp":"2026-01-01T12:00:00","user_id":"u","event_type":"t","value":1}"#,
                "timestamp",
            ),
        ];
        for (json, field) in cases {
            assert_eq!(reject(json).field.as_deref(), Some(field), "{json}");
        }
    }

    #[test]
    fn unknown_and_duplicate_keys_are_refused() {
        let unknown = reject(
            r#"{"timestamp":"2026-01-01T12:00:00Z","userId":"u","user_id":"u","event_type":"t","value":1}"#,
        );
        assert_eq!(unknown.field.as_deref(), Some("userId"));
        let duplicate = reject(
            r#"{"timestamp":"2026-01-01T12:00:00Z","user_id":"u","user_id":"v","event_type":"t","value":1}"#,
        );
        assert_eq!(duplicate.field.as_deref(), Some("user_id"));
        assert!(duplicate.detail.contains("more than once"));
    }

    #[test]
    fn non_objects_are_refused_without_a_field() {
        for json in ["[]", "\"event\"", "42", "true", "null"] {
            let rejection = reject(json);
            assert_eq!(rejection.field, None);
            assert!(
                rejection.detail.contains("must be a JSON object"),
                "{json}: {rejection:?}"
            );
        }
    }

    #[test]
    fn broken_json_is_an_error_not_a_rejection() {
        for json in [
            "",
            "{",
            r#"{"timestamp":}"#,
            "{\"value\": NaN}",
            "{\"value\": 1e999}",
        ] {
            assert!(parse_one(json.as_bytes()).is_err(), "{json}");
        }
    }

    #[test]
    fn arrays_stop_at_the_limit() {
        let one =
            r#"{"timestamp":"2026-01-01T12:00:00Z","user_id":"u","event_type":"t","value":1}"#;
        let three = format!("[{one},{one},{one}]");
        assert_eq!(parse_array(three.as_bytes(), 3).unwrap().len(), 3);
        assert!(matches!(
            parse_array(three.as_bytes(), 2),
            Err(ArrayError::TooMany)
        ));
        // The limit is found before the rest is even read: trailing garbage is not reached.
        assert!(matches!(
            parse_array(b"[{},{},{},!!!", 2),
            Err(ArrayError::TooMany)
        ));
        assert!(matches!(
            parse_array(b"[{}] trailing", 5),
            Err(ArrayError::Malformed(_))
        ));
        assert!(matches!(
            parse_array(b"{}", 5),
            Err(ArrayError::Malformed(_))
        ));
        assert_eq!(parse_array(b"[]", 5).unwrap().len(), 0);
    }

    #[test]
    fn arbitrary_and_mutated_input_never_panics_and_parses_the_same_everywhere() {
        // A deterministic fuzz: random bytes, and valid events with bytes flipped, cut or
        // duplicated. Whatever comes in, parsing must not panic, and an event accepted alone
        // must be accepted inside an array too.
        let mut state = 0x5EED_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = br#"{"timestamp":"2026-01-01T12:00:00.5+01:00","user_id":"u\u00e9","event_type":"a.b:c","value":-1.5e3}"#;
        let alphabet = br#"{}[]":,\u0123456789.eE+-tfnulrsTZ aA"#;
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut input: Vec<u8> = if round % 4 == 0 {
                (0..next() % 96).map(|_| next() as u8).collect()
            } else {
                seed.to_vec()
            };
            for _ in 0..1 + next() % 4 {
                if input.is_empty() {
                    break;
                }
                let at = (next() as usize) % input.len();
                match next() % 4 {
                    0 => input[at] = alphabet[(next() as usize) % alphabet.len()],
                    1 => input.truncate(at),
                    2 => {
                        let copy = input[at..].to_vec();
                        input.extend_from_slice(&copy);
                    }
                    _ => input.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                }
            }
            let alone = parse_one(&input);
            let mut array = b"[".to_vec();
            array.extend_from_slice(&input);
            array.push(b']');
            if let Ok(Ok(event)) = alone {
                let parsed =
                    parse_array(&array, 10).expect("an accepted event is a valid array element");
                assert_eq!(parsed.len(), 1);
                assert_eq!(
                    parsed.into_iter().next().unwrap().into_event().unwrap(),
                    event
                );
                accepted += 1;
            } else {
                let _ = parse_array(&array, 10);
            }
        }
        assert!(
            accepted > 200,
            "the mutations must leave some events valid, got {accepted}"
        );
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let json = r#"{"timestamp":"2026-01-01T12:00:00Z","user_id":"\u0075ser","event_type":"t","value":1}"#;
        assert_eq!(
            parse_one(json.as_bytes())
                .unwrap()
                .unwrap()
                .user_id
                .as_str(),
            "user"
        );
    }
}
