//! The HTTP API: batch ingest, the two daily reports (cached), the raw event listing and the
//! tenants. `docs/api/analytics-repo.openapi.yaml` is its contract.
//!
//! A batch is all or nothing: when any event is refused, nothing of the batch is stored and
//! the 422 lists every refused event by index (up to 100), so a client fixes them and sends
//! the batch again without working out which half landed.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{RawQuery, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use chrono::{NaiveDate, TimeDelta, Utc};
use common::{
    error::{Error, Result},
    http::{
        JsonFields, Page, PageSize, PathUuid, json_fields::string, json_object, media_type,
        query_params, read_body, unsupported_media_type,
    },
    problem::Problem,
    storable::StorableText,
};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    cache::{ReportCache, Scope},
    event::{self, EARLIEST},
    metrics::Metrics,
    repository::{DailyRow, EventRepository, IngestError, IngestPath, PLANS, start_of},
};

/// Refusals listed in one 422.
pub const MAX_REFUSALS: usize = 100;

/// The longest range a daily report may span, in days (ten years).
pub const MAX_SPAN_DAYS: i64 = 3_660;

const LIST_SIZE: PageSize = PageSize {
    default: 100,
    max: 1_000,
};

/// What the handlers share; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The repository.
    pub repository: EventRepository,
    /// The report cache.
    pub cache: ReportCache,
    /// The service's own metrics.
    pub metrics: Arc<Metrics>,
    /// Events accepted in one batch.
    pub max_batch: usize,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(ingest))
        .route("/v1/tenants", post(create_tenant))
        .route("/v1/tenants/{id}/plan", put(set_plan))
        .route("/v1/tenants/{id}/daily", get(tenant_daily))
        .route("/v1/tenants/{id}/events", get(list_events))
        .route("/v1/reports/enterprise-daily", get(enterprise_daily))
        .with_state(state)
}

async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = read_body(body)?;
    let now = Utc::now();
    let parsed = match media_type(&headers).as_deref() {
        Some("application/json") => match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Array(values)) => {
                check_size(values.len(), state.max_batch)?;
                event::parse_array(values, now, MAX_REFUSALS)
            }
            Ok(_) => {
                return Err(Problem::malformed("the body must be a JSON array of events").into());
            }
            Err(error) => {
                return Err(Problem::malformed(format!("the body is not JSON: {error}")).into());
            }
        },
        Some("application/x-ndjson") => {
            let lines = body
                .split(|&b| b == b'\n')
                .filter(|l| !l.trim_ascii().is_empty())
                .count();
            check_size(lines, state.max_batch)?;
            event::parse_ndjson(&body, now, MAX_REFUSALS)
        }
        _ => {
            return Err(unsupported_media_type(
                "send the batch as application/json (an array) or application/x-ndjson",
            )
            .into());
        }
    };
    let events = parsed.map_err(|refusals| refused(&refusals))?;
    if events.is_empty() {
        return Err(Problem::invalid_field("events", "the batch holds no events").into());
    }
    let started = std::time::Instant::now();
    let ingested = match state.repository.ingest(&events, IngestPath::Copy).await {
        Ok(ingested) => ingested,
        Err(IngestError::UnknownTenants(unknown)) => {
            let refusals: Vec<_> = unknown
                .iter()
                .take(MAX_REFUSALS)
                .map(|(index, tenant)| event::Refusal {
                    index: *index,
                    field: "tenant_id".into(),
                    detail: format!("no tenant {tenant}"),
                })
                .collect();
            return Err(refused(&refusals).into());
        }
        Err(IngestError::ArchivedMonths(months)) => {
            let refusals: Vec<_> = months
                .iter()
                .take(MAX_REFUSALS)
                .map(|(index, month)| event::Refusal {
                    index: *index,
                    field: "created_at".into(),
                    detail: format!(
                        "falls in {}, which is archived and read-only",
                        month.format("%Y-%m")
                    ),
                })
                .collect();
            return Err(refused(&refusals).into());
        }
        Err(IngestError::Database(error)) => return Err(error.into()),
    };
    state.metrics.ingested(&ingested, started.elapsed());
    if !ingested.late_tenants.is_empty() {
        state.cache.invalidate(&ingested.late_tenants).await;
    }
    Ok((
        StatusCode::OK,
        Json(json!({ "stored": ingested.rows, "late": ingested.late_rows })),
    )
        .into_response())
}

fn check_size(len: usize, max: usize) -> Result<(), Problem> {
    if len > max {
        return Err(Problem::too_large(format!(
            "the batch holds {len} events; at most {max} are accepted at once"
        )));
    }
    Ok(())
}

fn refused(refusals: &[event::Refusal]) -> Problem {
    let first = &refusals[0];
    let detail = format!(
        "{} event(s) refused, nothing of the batch was stored; the first, at index {}: {} {}",
        refusals.len(),
        first.index,
        if first.field.is_empty() {
            "the event"
        } else {
            &first.field
        },
        first.detail
    );
    let mut problem = Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-events",
        "Invalid events",
        detail,
    )
    .with_extension("errors", serde_json::to_value(refusals).unwrap_or_default());
    if !first.field.is_empty() {
        problem = problem.with_field(format!("[{}].{}", first.index, first.field));
    }
    problem
}

/// The enterprise report's body.
#[derive(Serialize)]
struct EnterpriseDaily<'a> {
    from: NaiveDate,
    rows: &'a [DailyRow],
}

/// A tenant's daily report's body.
#[derive(Serialize)]
struct TenantDaily<'a> {
    tenant_id: Uuid,
    from: NaiveDate,
    to: NaiveDate,
    days: Vec<TenantDay<'a>>,
}

#[derive(Serialize)]
struct TenantDay<'a> {
    date: NaiveDate,
    events: i64,
    processing_time_sum: i64,
    avg_time: &'a str,
}

/// A required `YYYY-MM-DD` query parameter, from 2000-01-01 to tomorrow.
fn date_param(params: &HashMap<String, String>, name: &str) -> Result<NaiveDate, Problem> {
    let raw = params
        .get(name)
        .ok_or_else(|| Problem::invalid_field(name, "is required (a date such as 2026-01-31)"))?;
    let date = NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .filter(|_| raw.len() == 10)
        .ok_or_else(|| Problem::invalid_field(name, "must be a date such as 2026-01-31"))?;
    let tomorrow = Utc::now().date_naive() + TimeDelta::days(1);
    if date < EARLIEST || date > tomorrow {
        return Err(Problem::invalid_field(
            name,
            format!("must be from {EARLIEST} to {tomorrow}"),
        ));
    }
    Ok(date)
}

fn cached_json(body: Bytes, outcome: crate::cache::Outcome) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-cache", HeaderValue::from_static(outcome.as_str()));
    response
}

async fn enterprise_daily(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let params = query_params(query.as_deref(), &["from"])?;
    let from = date_param(&params, "from")?;
    let started = std::time::Instant::now();
    let repository = state.repository.clone();
    let (body, outcome) = state
        .cache
        .get_or_compute(
            &format!("report:enterprise-daily:{from}"),
            Scope::All,
            false,
            || async move {
                let rows = repository.enterprise_report(from).await?;
                // Serialized straight from the rows: a `serde_json::Value` tree of 140K rows
                // took most of a second to build.
                let body = serde_json::to_vec(&EnterpriseDaily { from, rows: &rows })
                    .map_err(|e| Error::Unexpected(e.into()))?;
                Ok::<_, Error>(Bytes::from(body))
            },
        )
        .await?;
    state
        .metrics
        .report("enterprise_daily", outcome, started.elapsed());
    Ok(cached_json(body, outcome))
}

async fn tenant_daily(
    State(state): State<AppState>,
    PathUuid(tenant): PathUuid,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let params = query_params(query.as_deref(), &["from", "to"])?;
    let from = date_param(&params, "from")?;
    let to = date_param(&params, "to")?;
    if to < from {
        return Err(Problem::invalid_field("to", "must not be before from").into());
    }
    if (to - from).num_days() >= MAX_SPAN_DAYS {
        return Err(Problem::invalid_field(
            "to",
            format!("the range may span at most {MAX_SPAN_DAYS} days"),
        )
        .into());
    }
    let started = std::time::Instant::now();
    let closed_only = to < Utc::now().date_naive() - TimeDelta::days(1);
    let repository = state.repository.clone();
    let (body, outcome) = state
        .cache
        .get_or_compute(
            &format!("tenant:{tenant}:daily:{from}:{to}"),
            Scope::Tenant(tenant),
            closed_only,
            // Checked only on a miss: a cached answer implies the tenant existed, and tenants
            // are never deleted.
            || async move {
                if repository.tenant(tenant).await?.is_none() {
                    return Err(no_tenant(tenant).into());
                }
                let rows = repository.tenant_daily(tenant, from, to).await?;
                let days = rows
                    .iter()
                    .map(|row| TenantDay {
                        date: row.date,
                        events: row.events,
                        processing_time_sum: row.processing_time_sum,
                        avg_time: &row.avg_time,
                    })
                    .collect();
                let body = TenantDaily {
                    tenant_id: tenant,
                    from,
                    to,
                    days,
                };
                Ok::<_, Error>(Bytes::from(
                    serde_json::to_vec(&body).map_err(|e| Error::Unexpected(e.into()))?,
                ))
            },
        )
        .await?;
    state
        .metrics
        .report("tenant_daily", outcome, started.elapsed());
    Ok(cached_json(body, outcome))
}

async fn list_events(
    State(state): State<AppState>,
    PathUuid(tenant): PathUuid,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>> {
    let params = query_params(query.as_deref(), &["from", "to", "limit", "cursor"])?;
    let from = date_param(&params, "from")?;
    let to = date_param(&params, "to")?;
    if to < from {
        return Err(Problem::invalid_field("to", "must not be before from").into());
    }
    let page = Page::parse(
        params.get("limit").map(String::as_str),
        params.get("cursor").map(String::as_str),
        LIST_SIZE,
        |raw| {
            Uuid::parse_str(raw)
                .ok()
                .filter(|id| id.get_version_num() == 7)
                .ok_or_else(|| "must be an id from a previous page".to_owned())
        },
    )?;
    if state.repository.tenant(tenant).await?.is_none() {
        return Err(no_tenant(tenant).into());
    }
    let events = state
        .repository
        .list_events(
            tenant,
            start_of(from),
            start_of(to + TimeDelta::days(1)),
            page.cursor,
            page.limit,
        )
        .await?;
    let next = (events.len() == page.limit)
        .then(|| events.last().map(|e| e.id))
        .flatten();
    Ok(Json(json!({ "events": events, "next_cursor": next })))
}

async fn create_tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>)> {
    let mut fields = JsonFields::from(json_object(&headers, body)?);
    let name = fields.required("name", |value| {
        let name = string(value)?;
        if name.is_empty() || name.len() > 200 {
            return Err("must be 1 to 200 bytes".to_owned());
        }
        StorableText::parse("name", name).map_err(|e| e.detail().to_owned())
    })?;
    let plan = fields.required("plan", plan)?;
    fields.finish("a tenant")?;
    let tenant = state.repository.create_tenant(name.as_str(), plan).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(tenant).unwrap_or_default()),
    ))
}

async fn set_plan(
    State(state): State<AppState>,
    PathUuid(tenant): PathUuid,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>> {
    let mut fields = JsonFields::from(json_object(&headers, body)?);
    let plan = fields.required("plan", plan)?;
    fields.finish("a plan change")?;
    let Some(updated) = state.repository.set_plan(tenant, plan).await? else {
        return Err(no_tenant(tenant).into());
    };
    // Which tenants are enterprise changed: every cached enterprise report is stale.
    state.cache.invalidate(&[tenant]).await;
    Ok(Json(serde_json::to_value(updated).unwrap_or_default()))
}

fn plan(value: Value) -> Result<&'static str, String> {
    let text = string(value)?;
    PLANS
        .iter()
        .find(|p| **p == text)
        .copied()
        .ok_or_else(|| format!("must be one of {}", PLANS.join(", ")))
}

fn no_tenant(tenant: Uuid) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        format!("no tenant {tenant}"),
    )
}
