//! The event and its fields as domain types: once an [`Event`] exists, its `event_type` and
//! `user_id` are known to be well-formed, so the aggregation core never re-checks them.

use std::fmt;

use chrono::{DateTime, Utc};
use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Longest accepted `event_type`, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 64;
/// Longest accepted `user_id`, in bytes.
pub const MAX_USER_ID_LEN: usize = 128;

/// One observation: `user_id` did `event_type` at `timestamp`, measuring `value`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened (RFC 3339 on the wire). Decides the minute bucket it lands in.
    pub timestamp: DateTime<Utc>,
    /// Who did it; only counted through a distinct-users sketch, never stored.
    pub user_id: UserId,
    /// What happened; the key aggregates are grouped by.
    pub event_type: EventType,
    /// The measured value; must be finite.
    pub value: f64,
}

/// Why a field of an event was refused; the message names the rule broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct FieldError {
    /// The wire name of the field.
    pub field: &'static str,
    /// The rule it broke, e.g. "must not be empty".
    pub reason: String,
}

impl FieldError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// An event type: 1 to 64 bytes of ASCII letters, digits and `_ . : - /`.
///
/// The narrow alphabet keeps types safe in metric names, logs and the flat `"type.stat"`
/// view. Short names are stored inline (no heap allocation up to 24 bytes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "CompactString", into = "CompactString")]
pub struct EventType(CompactString);

impl EventType {
    /// Checks `raw` against the rules above.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        const FIELD: &str = "event_type";
        if raw.is_empty() {
            return Err(FieldError::new(FIELD, "must not be empty"));
        }
        if raw.len() > MAX_EVENT_TYPE_LEN {
            return Err(FieldError::new(
                FIELD,
                format!(
                    "must be at most {MAX_EVENT_TYPE_LEN} bytes, got {}",
                    raw.len()
                ),
            ));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-' | '/')))
        {
            return Err(FieldError::new(
                FIELD,
                format!("may hold only ASCII letters, digits and _ . : - /, found {bad:?}"),
            ));
        }
        Ok(Self(CompactString::new(raw)))
    }

    /// The type as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A user id: 1 to 128 bytes of printable characters (no control characters).
///
/// It only ever feeds the distinct-users sketch, so it is hashed and never stored.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "CompactString", into = "CompactString")]
pub struct UserId(CompactString);

impl UserId {
    /// Checks `raw` against the rules above.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        const FIELD: &str = "user_id";
        if raw.is_empty() {
            return Err(FieldError::new(FIELD, "must not be empty"));
        }
        if raw.len() > MAX_USER_ID_LEN {
            return Err(FieldError::new(
                FIELD,
                format!("must be at most {MAX_USER_ID_LEN} bytes, got {}", raw.len()),
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(FieldError::new(
                FIELD,
                "must not contain control characters",
            ));
        }
        Ok(Self(CompactString::new(raw)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! text_newtype_impls {
    ($name:ident) => {
        impl TryFrom<CompactString> for $name {
            type Error = FieldError;
            fn try_from(raw: CompactString) -> Result<Self, FieldError> {
                Self::parse(&raw)
            }
        }
        impl From<$name> for CompactString {
            fn from(value: $name) -> Self {
                value.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.0.as_str(), f)
            }
        }
    };
}
text_newtype_impls!(EventType);
text_newtype_impls!(UserId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_accepts_the_documented_alphabet() {
        for ok in [
            "checkout",
            "page.view",
            "api:GET/v1-items_2",
            &"a".repeat(64),
        ] {
            assert_eq!(EventType::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn event_type_refuses_empty_long_and_odd_characters() {
        assert_eq!(
            EventType::parse("").unwrap_err().reason,
            "must not be empty"
        );
        assert!(
            EventType::parse(&"a".repeat(65))
                .unwrap_err()
                .reason
                .contains("at most 64")
        );
        for bad in [
            "with space",
            "emoji😀",
            "semi;colon",
            "new\nline",
            "quote\"",
        ] {
            let error = EventType::parse(bad).unwrap_err();
            assert_eq!(error.field, "event_type", "{bad}");
        }
    }

    #[test]
    fn user_id_allows_unicode_but_not_control_characters() {
        assert!(UserId::parse("użytkownik-42").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a\u{0}b").is_err());
        assert!(UserId::parse(&"u".repeat(129)).is_err());
        assert!(UserId::parse(&"u".repeat(128)).is_ok());
    }

    #[test]
    fn serde_goes_through_parse() {
        let json = r#"{"timestamp":"2026-01-01T00:00:00Z","user_id":"u1","event_type":"bad type","value":1}"#;
        assert!(serde_json::from_str::<Event>(json).is_err());
    }
}
