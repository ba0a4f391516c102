//! `POST /v1/events` and `POST /v1/events/batch`.
//!
//! Both answer only after the events are in their aggregates: an event acknowledged with
//! 202 is counted, and there is no queue in between that could lose it. A batch keeps its
//! good events and reports each bad one by its 0-based position (and line, for NDJSON); it
//! is refused whole only when its JSON is broken, it holds no events or too many, or every
//! event in it is bad.

use axum::{
    Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use common::problem::Problem;
use serde::Serialize;

use super::{AppState, body_problem, wire};
use crate::{event::Event, processor::IngestError};

/// At most this many per-event errors are listed in one response.
pub const MAX_REPORTED_ERRORS: usize = 1_000;

/// A refused event of a batch.
#[derive(Debug, Serialize)]
struct EventError {
    /// 0-based position among the batch's events.
    index: usize,
    /// 1-based line, for NDJSON bodies.
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    #[serde(flatten)]
    rejection: wire::Rejection,
}

/// The answer to an accepted batch.
#[derive(Debug, Serialize)]
struct BatchReport {
    accepted: usize,
    rejected: usize,
    errors: Vec<EventError>,
    /// True when more errors happened than are listed.
    errors_truncated: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    Json,
    Ndjson,
}

fn body_format(headers: &HeaderMap, allow_ndjson: bool) -> Result<BodyFormat, Problem> {
    let expected = if allow_ndjson {
        "application/json or application/x-ndjson"
    } else {
        "application/json"
    };
    let unsupported = |got: &str| {
        Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            format!("Content-Type must be {expected}, got {got}"),
        )
        .with_field("Content-Type")
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(unsupported("none"));
    };
    let media = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" if allow_ndjson => Ok(BodyFormat::Ndjson),
        other => Err(unsupported(
            &format!("{other:?}").chars().take(80).collect::<String>(),
        )),
    }
}

fn ingest_problem(error: &IngestError) -> Problem {
    let problem = match error {
        IngestError::TooManyEventTypes { .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "event-type-limit",
            "Event type limit reached",
            error.to_string(),
        )
        .with_field(error.field()),
        _ => Problem::invalid_field(error.field(), error.to_string()),
    };
    problem.with_extension("reason", error.reason())
}

/// `POST /v1/events`: one event.
#[tracing::instrument(skip_all)]
pub async fn ingest_one(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    body_format(&headers, false)?;
    let body = body.map_err(|r| body_problem(r, state.limits.max_event_bytes))?;
    let event = match wire::parse_one(&body) {
        Err(error) => {
            state.metrics.rejected("malformed", 1);
            return Err(Problem::malformed(format!(
                "the body is not valid JSON: {error}"
            )));
        }
        Ok(Err(rejection)) => {
            state.metrics.rejected("invalid_field", 1);
            return Err(match rejection.field {
                Some(field) => Problem::invalid_field(&field, rejection.detail),
                None => Problem::malformed(rejection.detail),
            });
        }
        Ok(Ok(event)) => event,
    };
    match state.processor.process_event(event) {
        Ok(()) => {
            state.metrics.ingested.inc();
            Ok((
                StatusCode::ACCEPTED,
                Json(serde_json::json!({ "accepted": 1 })),
            )
                .into_response())
        }
        Err(error) => {
            state.metrics.rejected(error.reason(), 1);
            Err(ingest_problem(&error))
        }
    }
}

/// `POST /v1/events/batch`: a JSON array or NDJSON lines of events.
#[tracing::instrument(skip_all, fields(events))]
pub async fn ingest_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let format = body_format(&headers, true)?;
    let body = body.map_err(|r| body_problem(r, state.limits.max_batch_bytes))?;
    let limit = state.limits.max_batch_events;

    let parsed: Vec<(Option<usize>, Result<Event, wire::Rejection>)> = match format {
        BodyFormat::Json => match wire::parse_array(&body, limit) {
            Ok(events) => events.into_iter().map(|w| (None, w.into_event())).collect(),
            Err(wire::ArrayError::TooMany) => return Err(too_many(limit)),
            Err(wire::ArrayError::Malformed(error)) => {
                state.metrics.rejected("malformed", 1);
                return Err(Problem::malformed(format!(
                    "the body is not a valid JSON array of events: {error}"
                )));
            }
        },
        BodyFormat::Ndjson => {
            let mut parsed = Vec::new();
            for (number, line) in body.split(|&b| b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if parsed.len() == limit {
                    return Err(too_many(limit));
                }
                let event = wire::parse_one(line).unwrap_or_else(|error| {
                    Err(wire::Rejection::whole(format!(
                        "line is not valid JSON: {error}"
                    )))
                });
                parsed.push((Some(number + 1), event));
            }
            parsed
        }
    };
    tracing::Span::current().record("events", parsed.len());
    if parsed.is_empty() {
        return Err(Problem::invalid_field("body", "the batch holds no events"));
    }

    let total = parsed.len();
    let mut errors = Vec::new();
    let mut rejected = 0usize;
    let mut invalid = 0u64;
    let mut note = |index: usize, line: Option<usize>, rejection: wire::Rejection| {
        rejected += 1;
        if errors.len() < MAX_REPORTED_ERRORS {
            errors.push(EventError {
                index,
                line,
                rejection,
            });
        }
    };
    let mut good = Vec::with_capacity(total);
    let mut positions = Vec::with_capacity(total);
    for (index, (line, event)) in parsed.into_iter().enumerate() {
        match event {
            Ok(event) => {
                positions.push((index, line));
                good.push(event);
            }
            Err(rejection) => {
                invalid += 1;
                note(index, line, rejection);
            }
        }
    }
    state.metrics.rejected("invalid_field", invalid);
    for (position, error) in state.processor.process_batch(good) {
        let (index, line) = positions[position];
        state.metrics.rejected(error.reason(), 1);
        note(
            index,
            line,
            wire::Rejection {
                field: Some(error.field().to_owned()),
                detail: error.to_string(),
            },
        );
    }
    errors.sort_by_key(|e| e.index);
    let accepted = total - rejected;
    state.metrics.ingested.inc_by(accepted as u64);

    let truncated = rejected > errors.len();
    if accepted == 0 {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "batch-rejected",
            "Every event of the batch was refused",
            format!("all {total} events were refused; see errors"),
        )
        .with_extension("errors", serde_json::to_value(&errors).unwrap_or_default())
        .with_extension("errors_truncated", truncated));
    }
    let report = BatchReport {
        accepted,
        rejected,
        errors,
        errors_truncated: truncated,
    };
    Ok((StatusCode::ACCEPTED, Json(report)).into_response())
}

fn too_many(limit: usize) -> Problem {
    Problem::too_large(format!("a batch may hold at most {limit} events")).with_field("body")
}
