//! The provider's HTTP API (CONTRACT.md, "provider (8089)"):
//!
//! | route | purpose |
//! |---|---|
//! | `POST /v1/authorizations` | authorize an amount (`Idempotency-Key` required) |
//! | `GET /v1/authorizations?idempotency_key=K` | the authorization made under K, or 404 |
//! | `GET /v1/authorizations/{id}` | one authorization |
//! | `POST /v1/authorizations/{id}/capture`, `/void`, `/refund` | settle it (`Idempotency-Key` required) |
//! | `GET /v1/summary` | totals, for tests and the load test |
//! | `GET`, `PUT /admin/behaviour` | read or change latency, decline, error and timeout rates |
//! | `GET /healthz`, `/readyz`, `/metrics` | operations |
//!
//! Injected faults apply to the four payment calls only; lookups, the summary and the admin
//! routes always answer at once, so a merchant can find out what happened. There is no
//! request time limit: hanging is what the provider is asked to do.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, Path, Query, State,
        rejection::{BytesRejection, PathRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode},
    middleware::{from_fn, from_fn_with_state},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use common::{
    http::{JsonFields, json_fields::string, json_object, request_context},
    problem::{self, Problem},
    prometheus::{HttpMetrics, track_http},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::ledger::{Answer, AuthorizeRequest, Fault, Ledger, LedgerError, Settlement};

/// The header that makes a payment call safe to repeat.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Largest request body the provider reads.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Largest amount accepted, in minor units (ten billion in major units).
const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// Labels of a payment call's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
    outcome: &'static str,
}

/// The provider's own metrics.
#[derive(Clone)]
struct ProviderMetrics {
    operations: Family<OperationLabels, Counter>,
}

impl ProviderMetrics {
    fn register(registry: &mut Registry) -> Self {
        let operations = Family::default();
        registry.register(
            "operations",
            "Payment calls by operation and outcome (replayed, injected faults included)",
            operations.clone(),
        );
        Self { operations }
    }

    fn count(&self, operation: &'static str, outcome: &'static str) {
        self.operations
            .get_or_create(&OperationLabels { operation, outcome })
            .inc();
    }
}

/// Shared state of every handler; cheap to clone.
#[derive(Clone)]
pub struct ProviderState {
    ledger: Arc<Ledger>,
    metrics: ProviderMetrics,
    http_metrics: HttpMetrics,
    registry: Arc<Registry>,
}

impl ProviderState {
    /// State over `ledger`, registering the provider's metrics in `registry`.
    pub fn new(ledger: Arc<Ledger>, mut registry: Registry) -> Self {
        let metrics = ProviderMetrics::register(&mut registry);
        let http_metrics = HttpMetrics::register(&mut registry);
        Self {
            ledger,
            metrics,
            http_metrics,
            registry: Arc::new(registry),
        }
    }
}

/// The whole provider as a router.
pub fn router(state: ProviderState) -> Router {
    Router::new()
        .route(
            "/v1/authorizations",
            post(authorize).get(find_by_idempotency_key),
        )
        .route("/v1/authorizations/{id}", get(get_authorization))
        .route("/v1/authorizations/{id}/capture", post(capture))
        .route("/v1/authorizations/{id}/void", post(void))
        .route("/v1/authorizations/{id}/refund", post(refund))
        .route("/v1/summary", get(summary))
        .route("/admin/behaviour", get(behaviour).put(set_behaviour))
        .route("/healthz", get(healthz))
        .route("/readyz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .route_layer(from_fn_with_state(state.http_metrics.clone(), track_http))
        .fallback(problem::not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .with_state(state)
        .layer(from_fn(request_context))
}

#[tracing::instrument(skip_all)]
async fn authorize(
    State(state): State<ProviderState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let key = idempotency_key(&headers)?;
    let request = authorize_request(json_object(&headers, body)?.into())?;
    state.ledger.count_authorize_request();
    let fault = play_fault_before(&state, "authorize").await?;
    let answer = state
        .ledger
        .authorize(&key, request)
        .map_err(|error| refuse(&state, "authorize", &error))?;
    play_fault_after(fault).await;
    let outcome = if answer.replayed {
        "replayed"
    } else if answer.authorization.reason.is_some() {
        "declined"
    } else {
        "authorized"
    };
    state.metrics.count("authorize", outcome);
    Ok(answer_response(answer))
}

async fn capture(
    state: State<ProviderState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    settle(state, headers, id, Settlement::Capture).await
}

async fn void(
    state: State<ProviderState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    settle(state, headers, id, Settlement::Void).await
}

async fn refund(
    state: State<ProviderState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    settle(state, headers, id, Settlement::Refund).await
}

#[tracing::instrument(skip_all, fields(operation = settlement.as_str()))]
async fn settle(
    State(state): State<ProviderState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    settlement: Settlement,
) -> Result<Response, Problem> {
    let id = authorization_id(id)?;
    let key = idempotency_key(&headers)?;
    let operation = settlement.as_str();
    let fault = play_fault_before(&state, operation).await?;
    let answer = state
        .ledger
        .settle(&key, id, settlement)
        .map_err(|error| refuse(&state, operation, &error))?;
    play_fault_after(fault).await;
    let outcome = if answer.replayed {
        "replayed"
    } else {
        "succeeded"
    };
    state.metrics.count(operation, outcome);
    Ok(answer_response(answer))
}

#[derive(Deserialize)]
struct LookupQuery {
    idempotency_key: Option<String>,
}

async fn find_by_idempotency_key(
    State(state): State<ProviderState>,
    query: Result<Query<LookupQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(query) = query.map_err(|rejection| Problem::malformed(rejection.body_text()))?;
    let key = query.idempotency_key.ok_or_else(|| {
        Problem::malformed("the idempotency_key query parameter is required")
            .with_field("idempotency_key")
    })?;
    let authorization = state.ledger.find_by_key(&key).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "no authorization was made under this idempotency key",
        )
    })?;
    Ok(Json(authorization).into_response())
}

async fn get_authorization(
    State(state): State<ProviderState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = authorization_id(id)?;
    let authorization = state.ledger.get(id).ok_or_else(no_such_authorization)?;
    Ok(Json(authorization).into_response())
}

async fn summary(State(state): State<ProviderState>) -> Response {
    Json(state.ledger.summary()).into_response()
}

async fn behaviour(State(state): State<ProviderState>) -> Response {
    Json(state.ledger.behaviour()).into_response()
}

/// Changes the fields given, keeps the others.
async fn set_behaviour(
    State(state): State<ProviderState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let mut fields = JsonFields::from(json_object(&headers, body)?);
    let mut behaviour = state.ledger.behaviour();
    if let Some(ms) = fields.optional("latency_ms", millis)? {
        behaviour.latency = ms;
    }
    if let Some(rate) = fields.optional("decline_rate", rate)? {
        behaviour.decline_rate = rate;
    }
    if let Some(rate) = fields.optional("error_rate", rate)? {
        behaviour.error_rate = rate;
    }
    if let Some(rate) = fields.optional("timeout_rate", rate)? {
        behaviour.timeout_rate = rate;
    }
    if let Some(ms) = fields.optional("hang_for_ms", millis)? {
        behaviour.hang_for = ms;
    }
    if let Some(count) = fields.optional("fail_next", |value| {
        value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n <= 1_000_000)
            .ok_or_else(|| "must be an integer from 0 to 1000000".to_owned())
    })? {
        behaviour.fail_next = count;
    }
    fields.finish("the behaviour")?;
    state.ledger.set_behaviour(behaviour);
    tracing::info!(?behaviour, "behaviour changed");
    Ok(Json(behaviour).into_response())
}

async fn healthz() -> Json<Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(state): State<ProviderState>) -> Response {
    common::prometheus::render(&state.registry)
}

/// Sleeps the latency, then answers an injected error or says what to do after the work.
async fn play_fault_before(
    state: &ProviderState,
    operation: &'static str,
) -> Result<Fault, Problem> {
    let (latency, fault) = state.ledger.draw_fault();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Fault::Error(status) => {
            state.metrics.count(operation, "injected_error");
            Err(if status == 503 {
                Problem::unavailable("the provider is unavailable (injected fault)", 1)
            } else {
                Problem::internal()
            })
        }
        Fault::Hang(_) => {
            state.metrics.count(operation, "injected_timeout");
            Ok(fault)
        }
        Fault::None => Ok(fault),
    }
}

async fn play_fault_after(fault: Fault) {
    if let Fault::Hang(hang_for) = fault {
        tokio::time::sleep(hang_for).await;
    }
}

fn refuse(state: &ProviderState, operation: &'static str, error: &LedgerError) -> Problem {
    state.metrics.count(operation, "refused");
    match error {
        LedgerError::NotFound => no_such_authorization(),
        LedgerError::KeyReused => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency key reused",
            error.to_string(),
        )
        .with_field("Idempotency-Key"),
        LedgerError::Conflict(..) => Problem::new(
            StatusCode::CONFLICT,
            "invalid-state",
            "Invalid state",
            error.to_string(),
        ),
    }
}

fn no_such_authorization() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no authorization has this id",
    )
}

fn answer_response(answer: Answer) -> Response {
    let status = if answer.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = (status, Json(answer.authorization)).into_response();
    if answer.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters, else 400.
fn idempotency_key(headers: &HeaderMap) -> Result<String, Problem> {
    let value = headers.get(IDEMPOTENCY_KEY).ok_or_else(|| {
        Problem::malformed("the Idempotency-Key header is required").with_field("Idempotency-Key")
    })?;
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(Problem::malformed(
            "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
        )
        .with_field("Idempotency-Key"));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn authorization_id(id: Result<Path<String>, PathRejection>) -> Result<Uuid, Problem> {
    let Path(id) = id.map_err(|rejection| Problem::malformed(rejection.body_text()))?;
    Uuid::parse_str(&id).map_err(|_| no_such_authorization())
}

fn authorize_request(mut fields: JsonFields) -> Result<AuthorizeRequest, Problem> {
    let amount = fields.required("amount", |value| {
        let amount = value
            .as_i64()
            .ok_or_else(|| "must be an integer amount in minor units".to_owned())?;
        if (1..=MAX_AMOUNT).contains(&amount) {
            Ok(amount)
        } else {
            Err(format!("must be from 1 to {MAX_AMOUNT} (minor units)"))
        }
    })?;
    let currency = fields.required("currency", |value| {
        let currency = string(value)?;
        if currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(currency)
        } else {
            Err("must be an ISO 4217 code such as EUR".to_owned())
        }
    })?;
    let payment_method = fields.required("payment_method", |value| {
        let method = string(value)?;
        if (1..=100).contains(&method.len()) && method.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            Ok(method)
        } else {
            Err("must be 1 to 100 visible ASCII characters".to_owned())
        }
    })?;
    fields.finish("an authorization")?;
    Ok(AuthorizeRequest {
        amount,
        currency,
        payment_method,
    })
}

fn rate(value: Value) -> Result<f64, String> {
    value
        .as_f64()
        .filter(|rate| (0.0..=1.0).contains(rate))
        .ok_or_else(|| "must be a number from 0 to 1".to_owned())
}

fn millis(value: Value) -> Result<Duration, String> {
    value
        .as_u64()
        .filter(|ms| *ms <= 600_000)
        .map(Duration::from_millis)
        .ok_or_else(|| "must be an integer from 0 to 600000 (milliseconds)".to_owned())
}
