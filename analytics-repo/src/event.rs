//! An event as the repository stores it, parsed from a client's JSON once, at the edge: a
//! [`NewEvent`] cannot hold an unknown shape, a time PostgreSQL cannot store, a negative
//! duration or text with U+0000, so nothing after the parse checks again.

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use common::storable::StorableText;
use serde_json::{Map, Value};
use uuid::Uuid;

/// The earliest `created_at` accepted: older times are typos or epoch zeros, not events.
pub const EARLIEST: NaiveDate = NaiveDate::from_ymd_opt(2000, 1, 1).expect("a valid date");

/// How far ahead of the server's clock a `created_at` may be (clients' clocks drift).
pub const MAX_AHEAD: TimeDelta = TimeDelta::days(1);

/// The longest event name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// One event to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The tenant it belongs to (it must exist; the repository checks).
    pub tenant_id: Uuid,
    /// When it happened, microsecond precision, UTC.
    pub created_at: DateTime<Utc>,
    /// How long it took to process, in milliseconds.
    pub processing_time: i32,
    /// What happened (`page_view`, `export`, ...).
    pub name: StorableText,
}

impl NewEvent {
    /// The UTC day it belongs to; the reports group by it.
    pub fn day(&self) -> NaiveDate {
        self.created_at.date_naive()
    }

    /// A new id for it: a UUIDv7 carrying `created_at` to the millisecond, so ids sort by time.
    pub fn new_id(&self) -> Uuid {
        id_at(self.created_at)
    }
}

/// A UUIDv7 with `at`'s millisecond and random bits.
pub fn id_at(at: DateTime<Utc>) -> Uuid {
    let millis = at.timestamp_millis().max(0) as u64;
    Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        millis / 1_000,
        (millis % 1_000) as u32 * 1_000_000,
    ))
}

/// The smallest UUIDv7 of `at`'s millisecond: every id made at or after `at` is at least this,
/// so `id >= floor_id(t)` lets the (tenant_id, id) index start where `created_at >= t` begins.
pub fn floor_id(at: DateTime<Utc>) -> Uuid {
    let millis = at.timestamp_millis().max(0) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6] = 0x70;
    bytes[8] = 0x80;
    Uuid::from_bytes(bytes)
}

/// Why one event of a batch was refused: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    /// The event's position in the batch, from 0.
    pub index: usize,
    /// The field at fault, or `""` when the event itself is not an object.
    pub field: String,
    /// What is wrong, in words a client developer can act on.
    pub detail: String,
}

impl Refusal {
    fn new(index: usize, field: &str, detail: impl Into<String>) -> Self {
        Self {
            index,
            field: field.to_owned(),
            detail: detail.into(),
        }
    }
}

/// Parses the event at `index` of a batch, given the server's clock `now`.
pub fn parse(index: usize, value: Value, now: DateTime<Utc>) -> Result<NewEvent, Refusal> {
    let Value::Object(mut object) = value else {
        return Err(Refusal::new(index, "", "each event must be a JSON object"));
    };
    let mut take = |field: &str| {
        object
            .remove(field)
            .ok_or_else(|| Refusal::new(index, field, "is required"))
    };
    let tenant_id = match take("tenant_id")? {
        Value::String(text) => Uuid::parse_str(&text)
            .map_err(|_| Refusal::new(index, "tenant_id", "must be a UUID"))?,
        _ => return Err(Refusal::new(index, "tenant_id", "must be a UUID string")),
    };
    let created_at = parse_time(take("created_at")?, now)
        .map_err(|detail| Refusal::new(index, "created_at", detail))?;
    let processing_time = match take("processing_time")? {
        Value::Number(number) => number
            .as_u64()
            .and_then(|ms| i32::try_from(ms).ok())
            .ok_or_else(|| {
                Refusal::new(
                    index,
                    "processing_time",
                    "must be a whole number of milliseconds from 0 to 2147483647",
                )
            })?,
        _ => {
            return Err(Refusal::new(
                index,
                "processing_time",
                "must be a whole number of milliseconds",
            ));
        }
    };
    let name = match take("name")? {
        Value::String(text) if text.is_empty() || text.len() > MAX_NAME_BYTES => {
            return Err(Refusal::new(
                index,
                "name",
                format!("must be 1 to {MAX_NAME_BYTES} bytes"),
            ));
        }
        Value::String(text) => StorableText::parse("name", text)
            .map_err(|unstorable| Refusal::new(index, "name", unstorable.detail()))?,
        _ => return Err(Refusal::new(index, "name", "must be a string")),
    };
    if let Some(unknown) = object.keys().next() {
        return Err(Refusal::new(index, unknown, "is not a field of an event"));
    }
    Ok(NewEvent {
        tenant_id,
        created_at,
        processing_time,
        name,
    })
}

fn parse_time(value: Value, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let Value::String(text) = value else {
        return Err("must be an RFC 3339 time string".to_owned());
    };
    let at = DateTime::parse_from_rfc3339(&text)
        .map_err(|_| "must be an RFC 3339 time such as 2026-01-31T23:59:59.5Z".to_owned())?
        .with_timezone(&Utc);
    // PostgreSQL keeps microseconds; a finer time would be rounded, and could cross midnight.
    let at = to_microseconds(at).ok_or_else(|| "is not a representable time".to_owned())?;
    if at.date_naive() < EARLIEST {
        return Err(format!("must not be before {EARLIEST}"));
    }
    if at > now + MAX_AHEAD {
        return Err("must not be more than a day ahead of the server's clock".to_owned());
    }
    Ok(at)
}

/// `at` truncated to whole microseconds, as PostgreSQL will hold it.
fn to_microseconds(at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    use chrono::Timelike as _;
    let nanos = at.nanosecond() / 1_000 * 1_000;
    // A leap second (23:59:60) is stored by PostgreSQL as the next day's first second:
    // take it as that here too, or its rollup day would not be its row's day.
    if nanos >= 1_000_000_000 {
        return Some(at.with_nanosecond(nanos - 1_000_000_000)? + TimeDelta::seconds(1));
    }
    at.with_nanosecond(nanos)
}

/// The events of a JSON array body, all parsed, or every refusal (up to `max_refusals`).
pub fn parse_array(
    values: Vec<Value>,
    now: DateTime<Utc>,
    max_refusals: usize,
) -> Result<Vec<NewEvent>, Vec<Refusal>> {
    collect(
        values
            .into_iter()
            .enumerate()
            .map(|(index, value)| parse(index, value, now)),
        max_refusals,
    )
}

/// The events of an NDJSON body (one object per line; blank lines skipped), or every refusal.
pub fn parse_ndjson(
    body: &[u8],
    now: DateTime<Utc>,
    max_refusals: usize,
) -> Result<Vec<NewEvent>, Vec<Refusal>> {
    collect(
        body.split(|&b| b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .enumerate()
            .map(
                |(index, line)| match serde_json::from_slice::<Value>(line) {
                    Ok(value) => parse(index, value, now),
                    Err(error) => Err(Refusal::new(
                        index,
                        "",
                        format!("line is not a JSON object: {error}"),
                    )),
                },
            ),
        max_refusals,
    )
}

fn collect(
    parsed: impl Iterator<Item = Result<NewEvent, Refusal>>,
    max_refusals: usize,
) -> Result<Vec<NewEvent>, Vec<Refusal>> {
    let mut events = Vec::with_capacity(parsed.size_hint().0);
    let mut refusals = Vec::new();
    for result in parsed {
        match result {
            Ok(event) if refusals.is_empty() => events.push(event),
            Ok(_) => {}
            Err(refusal) => {
                refusals.push(refusal);
                if refusals.len() == max_refusals {
                    break;
                }
            }
        }
    }
    if refusals.is_empty() {
        Ok(events)
    } else {
        Err(refusals)
    }
}

/// An event object as JSON, for clients and tests that build batches.
pub fn to_json(event: &NewEvent) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("tenant_id".into(), event.tenant_id.to_string().into());
    object.insert(
        "created_at".into(),
        event
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .into(),
    );
    object.insert("processing_time".into(), event.processing_time.into());
    object.insert("name".into(), event.name.as_str().into());
    object
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-06-15T12:00:00Z".parse().unwrap()
    }

    fn event() -> Value {
        json!({
            "tenant_id": "0190f6a0-0000-7000-8000-000000000001",
            "created_at": "2026-06-14T23:59:59.9999995Z",
            "processing_time": 120,
            "name": "page_view",
        })
    }

    #[test]
    fn a_good_event_parses_with_microseconds_truncated_not_rounded() {
        let parsed = parse(0, event(), now()).unwrap();
        assert_eq!(
            parsed.created_at.to_rfc3339(),
            "2026-06-14T23:59:59.999999+00:00"
        );
        assert_eq!(parsed.day().to_string(), "2026-06-14");
    }

    #[test]
    fn a_leap_second_is_the_next_days_first_second_as_postgresql_stores_it() {
        let mut body = event();
        body["created_at"] = json!("2026-06-14T23:59:60.5000009Z");
        let parsed = parse(0, body, now()).unwrap();
        assert_eq!(
            parsed.created_at.to_rfc3339(),
            "2026-06-15T00:00:00.500+00:00"
        );
        assert_eq!(parsed.day().to_string(), "2026-06-15");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("tenant_id", json!("x"), "must be a UUID"),
            ("tenant_id", json!(5), "must be a UUID string"),
            ("created_at", json!("yesterday"), "RFC 3339"),
            ("created_at", json!("1999-12-31T23:59:59Z"), "before"),
            ("created_at", json!("2026-06-17T00:00:00Z"), "ahead"),
            ("created_at", json!("+262143-01-01T00:00:00Z"), "RFC 3339"),
            ("processing_time", json!(-1), "from 0"),
            ("processing_time", json!(1e300), "from 0"),
            ("processing_time", json!(2_147_483_648u64), "from 0"),
            ("processing_time", json!("5"), "whole number"),
            ("name", json!(""), "1 to 128"),
            ("name", json!("a\u{0}b"), "U+0000"),
            ("name", json!("x".repeat(129)), "1 to 128"),
        ];
        for (field, value, detail) in cases {
            let mut body = event();
            body[field] = value.clone();
            let refusal = parse(3, body, now()).unwrap_err();
            assert_eq!(
                (refusal.index, refusal.field.as_str()),
                (3, field),
                "{value}"
            );
            assert!(
                refusal.detail.contains(detail),
                "{value}: {}",
                refusal.detail
            );
        }
    }

    #[test]
    fn missing_and_unknown_fields_are_named() {
        let mut body = event();
        body.as_object_mut().unwrap().remove("name");
        assert_eq!(parse(0, body, now()).unwrap_err().field, "name");
        let mut body = event();
        body["colour"] = json!("red");
        assert_eq!(parse(0, body, now()).unwrap_err().field, "colour");
        assert_eq!(parse(0, json!([1]), now()).unwrap_err().field, "");
    }

    #[test]
    fn a_batch_with_a_bad_event_yields_every_refusal_by_index() {
        let batch = vec![event(), json!({}), event(), json!(7)];
        let refusals = parse_array(batch, now(), 100).unwrap_err();
        let indexes: Vec<_> = refusals.iter().map(|r| r.index).collect();
        assert_eq!(indexes, [1, 3]);
        let ndjson = format!("{}\n\n{{\n{}\r\n", event(), event());
        let refusals = parse_ndjson(ndjson.as_bytes(), now(), 100).unwrap_err();
        assert_eq!(refusals.len(), 1);
        assert_eq!(refusals[0].index, 1);
    }

    #[test]
    fn ids_sort_by_time_and_floor_ids_bound_them() {
        let at: DateTime<Utc> = "2026-06-14T10:00:00.123456Z".parse().unwrap();
        let id = id_at(at);
        assert_eq!(id.get_version_num(), 7);
        assert!(floor_id(at) <= id);
        assert!(id < floor_id(at + TimeDelta::milliseconds(1)));
        assert_eq!(floor_id(at).get_version_num(), 7);
    }
}
