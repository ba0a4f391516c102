//! What a notification is, who it can be for, and what makes one valid.

use std::{fmt, sync::Arc};

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use common::storable::{StorableJson, StorableText};
use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Longest `type`, in bytes.
pub const MAX_TYPE_BYTES: usize = 64;
/// Longest `title`, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest `message`, in characters.
pub const MAX_MESSAGE_CHARS: usize = 4_000;
/// Largest `data`, serialized, in bytes.
pub const MAX_DATA_BYTES: usize = 16 * 1024;
/// Longest user or group id, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// A notification as stored, sent and listed. The JSON names are the seed's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// UUIDv7: unique, and ordered by creation time (the history cursor).
    pub id: Uuid,
    /// What kind of notification this is (`order.shipped`, `chat.message`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// A short headline.
    pub title: String,
    /// The body text.
    pub message: String,
    /// Optional structured payload, always a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
    /// When the notification was accepted, RFC 3339 UTC with milliseconds.
    pub timestamp: DateTime<Utc>,
}

/// The content of a notification before it gets an id and a time. Its text is
/// [`StorableText`] and its data [`StorableJson`], so nothing PostgreSQL would refuse
/// (U+0000) can reach the store; the other limits are checked by [`Content::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    /// See [`Notification::kind`].
    pub kind: StorableText,
    /// See [`Notification::title`].
    pub title: StorableText,
    /// See [`Notification::message`].
    pub message: StorableText,
    /// See [`Notification::data`].
    pub data: Option<StorableJson<Map<String, Value>>>,
}

/// Why some input was refused; `field` names the JSON field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct Invalid {
    /// The field at fault, as a JSON pointer-ish path (`title`, `user_ids[3]`).
    pub field: String,
    /// What is wrong with it.
    pub detail: String,
}

impl Invalid {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            detail: detail.into(),
        }
    }
}

impl Content {
    /// Checks every limit, naming the first field that breaks one.
    pub fn validate(&self) -> Result<(), Invalid> {
        let kind = self.kind.as_str();
        if kind.is_empty() || kind.len() > MAX_TYPE_BYTES {
            return Err(Invalid::new(
                "type",
                format!("must be 1 to {MAX_TYPE_BYTES} bytes"),
            ));
        }
        if !kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        {
            return Err(Invalid::new(
                "type",
                "may hold only ASCII letters, digits and . _ - :",
            ));
        }
        check_text("title", &self.title, MAX_TITLE_CHARS, false)?;
        check_text("message", &self.message, MAX_MESSAGE_CHARS, true)?;
        if let Some(data) = &self.data {
            let size = serde_json::to_vec(data.get())
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if size > MAX_DATA_BYTES {
                return Err(Invalid::new(
                    "data",
                    format!("is {size} bytes serialized; at most {MAX_DATA_BYTES} are allowed"),
                ));
            }
        }
        Ok(())
    }

    /// Gives the content its id (UUIDv7) and timestamp (now, to the millisecond).
    pub fn into_notification(self) -> Notification {
        let id = Uuid::now_v7();
        let timestamp = uuid_time(id).unwrap_or_else(Utc::now);
        Notification {
            id,
            kind: self.kind.into_string(),
            title: self.title.into_string(),
            message: self.message.into_string(),
            data: self.data.map(StorableJson::into_inner),
            timestamp,
        }
    }
}

fn check_text(
    field: &str,
    text: &str,
    max_chars: usize,
    allow_newlines: bool,
) -> Result<(), Invalid> {
    if text.trim().is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if text.chars().count() > max_chars {
        return Err(Invalid::new(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    if text
        .chars()
        .any(|c| c.is_control() && !(allow_newlines && matches!(c, '\n' | '\t')))
    {
        return Err(Invalid::new(field, "must not hold control characters"));
    }
    Ok(())
}

/// The millisecond timestamp a UUIDv7 carries.
pub fn uuid_time(id: Uuid) -> Option<DateTime<Utc>> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    DateTime::from_timestamp(secs as i64, nanos - nanos % 1_000_000)
}

macro_rules! identifier {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A ", $what, " id: 1 to 128 bytes of ASCII letters, digits and `. _ - @ :`.")]
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(CompactString);

        impl $name {
            #[doc = concat!("Parses a ", $what, " id, or says why it is not one.")]
            pub fn parse(raw: &str) -> Result<Self, String> {
                if raw.is_empty() || raw.len() > MAX_ID_BYTES {
                    return Err(format!("must be 1 to {MAX_ID_BYTES} bytes"));
                }
                if !raw.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b':')
                }) {
                    return Err("may hold only ASCII letters, digits and . _ - @ :".into());
                }
                Ok(Self(CompactString::new(raw)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

identifier!(UserId, "user");
identifier!(GroupId, "group");

/// A notification encoded once as the WebSocket frame every recipient gets, so fan-out to
/// thousands of connections clones a reference count, not a string.
#[derive(Debug)]
pub struct Frame {
    /// The notification's id, for de-duplication during recovery.
    pub id: Uuid,
    /// `{"type":"notification","notification":{...}}`.
    pub text: Utf8Bytes,
}

impl Frame {
    /// Encodes `notification` as a `notification` frame.
    pub fn encode(notification: &Notification) -> Arc<Self> {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            notification: &'a Notification,
        }
        let text = serde_json::to_string(&Wire {
            kind: "notification",
            notification,
        })
        .expect("a notification always serializes");
        Arc::new(Self {
            id: notification.id,
            text: text.into(),
        })
    }

    /// A frame received from another node, already encoded.
    pub fn from_encoded(id: Uuid, text: String) -> Arc<Self> {
        Arc::new(Self {
            id,
            text: text.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(text: impl Into<String>) -> StorableText {
        StorableText::parse("test", text).unwrap()
    }

    fn content() -> Content {
        Content {
            kind: text("order.shipped"),
            title: text("Shipped"),
            message: text("Your order left the warehouse.\nTrack it."),
            data: None,
        }
    }

    #[test]
    fn valid_content_passes_and_gets_a_v7_id_with_its_time() {
        let content = content();
        content.validate().unwrap();
        let n = content.into_notification();
        assert_eq!(n.id.get_version_num(), 7);
        assert_eq!(uuid_time(n.id), Some(n.timestamp));
        assert!((Utc::now() - n.timestamp).num_seconds().abs() < 5);
    }

    #[test]
    fn each_limit_names_its_field() {
        let cases: Vec<(Content, &str)> = vec![
            (
                Content {
                    kind: text(String::new()),
                    ..content()
                },
                "type",
            ),
            (
                Content {
                    kind: text("a b"),
                    ..content()
                },
                "type",
            ),
            (
                Content {
                    kind: text("x".repeat(65)),
                    ..content()
                },
                "type",
            ),
            (
                Content {
                    title: text("  "),
                    ..content()
                },
                "title",
            ),
            (
                Content {
                    title: text("t".repeat(201)),
                    ..content()
                },
                "title",
            ),
            (
                Content {
                    title: text("a\nb"),
                    ..content()
                },
                "title",
            ),
            (
                Content {
                    message: text("m".repeat(4_001)),
                    ..content()
                },
                "message",
            ),
            (
                Content {
                    message: text("bell\u{7}"),
                    ..content()
                },
                "message",
            ),
        ];
        for (content, field) in cases {
            assert_eq!(content.validate().unwrap_err().field, field, "{content:?}");
        }
        let mut data = Map::new();
        data.insert("blob".into(), Value::String("x".repeat(MAX_DATA_BYTES)));
        let big = Content {
            data: Some(StorableJson::parse_object("data", data).unwrap()),
            ..content()
        };
        assert_eq!(big.validate().unwrap_err().field, "data");
    }

    #[test]
    fn ids_refuse_what_could_break_a_channel_or_a_url() {
        assert!(UserId::parse("alice@example.com").is_ok());
        assert!(GroupId::parse("team:backend-1").is_ok());
        for bad in [
            "",
            "a b",
            "a/b",
            "a\nb",
            "a\0b",
            "\0",
            "é",
            &"x".repeat(129),
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
        let parsed: Result<UserId, _> = serde_json::from_str("\"a\\nb\"");
        assert!(parsed.is_err());
    }

    #[test]
    fn a_frame_carries_the_notification_under_its_seed_names() {
        let n = content().into_notification();
        let frame = Frame::encode(&n);
        let value: Value = serde_json::from_str(frame.text.as_str()).unwrap();
        assert_eq!(value["type"], "notification");
        assert_eq!(value["notification"]["type"], "order.shipped");
        assert_eq!(value["notification"]["id"], n.id.to_string());
        assert!(value["notification"].get("data").is_none());
        let back: Notification = serde_json::from_value(value["notification"].clone()).unwrap();
        assert_eq!(back, n);
    }
}
