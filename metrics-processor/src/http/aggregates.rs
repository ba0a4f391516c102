//! `GET /v1/aggregates?minutes=N[&format=flat]`.

use std::time::Instant;

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
    response::{IntoResponse, Response},
};
use common::problem::Problem;
use serde::Deserialize;

use super::AppState;

/// Query parameters, read as text so each fault can be named.
#[derive(Debug, Deserialize)]
pub struct AggregatesQuery {
    minutes: Option<String>,
    format: Option<String>,
}

/// Statistics per event type over the last `minutes` minute buckets (1..=retention).
/// `format=flat` returns the seed's `{"checkout.count": 12.0, …}` map instead.
#[tracing::instrument(skip_all)]
pub async fn get_aggregates(
    State(state): State<AppState>,
    query: Result<Query<AggregatesQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(query) =
        query.map_err(|e| Problem::malformed(format!("the query string is malformed: {e}")))?;
    let retention = state.processor.config().retention_minutes;
    let raw = query.minutes.ok_or_else(|| {
        Problem::invalid_field("minutes", format!("minutes is required (1 to {retention})"))
    })?;
    let minutes: u32 = raw.trim().parse().map_err(|_| {
        let shown: String = raw.chars().take(32).collect();
        Problem::invalid_field(
            "minutes",
            format!("minutes must be a whole number from 1 to {retention}, got {shown:?}"),
        )
    })?;
    let flat = match query.format.as_deref() {
        None | Some("full") => false,
        Some("flat") => true,
        Some(other) => {
            let shown: String = other.chars().take(32).collect();
            return Err(Problem::invalid_field(
                "format",
                format!("format must be `full` or `flat`, got {shown:?}"),
            ));
        }
    };

    let started = Instant::now();
    let processor = std::sync::Arc::clone(&state.processor);
    // A query over every type and minute takes milliseconds; keep it off the I/O threads.
    let result = tokio::task::spawn_blocking(move || processor.get_aggregates(minutes))
        .await
        .map_err(|error| {
            tracing::error!(%error, "aggregate query task failed");
            Problem::internal()
        })?;
    state
        .metrics
        .query_duration
        .observe(started.elapsed().as_secs_f64());
    let aggregates =
        result.map_err(|error| Problem::invalid_field("minutes", error.to_string()))?;
    Ok(if flat {
        Json(aggregates.to_flat_map()).into_response()
    } else {
        Json(aggregates).into_response()
    })
}
