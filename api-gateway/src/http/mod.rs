//! The gateway's HTTP faces: the public router and the admin router (`/metrics` only there).
//!
//! | route | purpose |
//! |---|---|
//! | `POST /auth/login` | user name + password → access JWT + refresh token |
//! | `POST /auth/refresh` | rotate: spend the refresh token, get a new pair |
//! | `POST /auth/logout` | revoke the refresh token's family |
//! | `GET /.well-known/jwks.json` | the public signing keys |
//! | `GET /healthz`, `GET /readyz` | liveness, readiness |
//! | admin: `GET /metrics` | Prometheus |

mod auth;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::{HeaderValue, header},
    middleware::{from_fn, from_fn_with_state},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use common::{
    http::{request_context, time_limit},
    problem::{self, Problem},
    prometheus::{HttpMetrics, track_http},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::{store::Store, tokens::TokenIssuer};

/// A bounded label value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// What happened (`success`, `invalid_credentials`, `reuse_detected`, …).
    pub outcome: &'static str,
}

/// The gateway's own metrics.
#[derive(Clone, Default)]
pub struct AuthMetrics {
    logins: Family<Outcome, Counter>,
    refreshes: Family<Outcome, Counter>,
    logouts: Counter,
}

impl AuthMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "logins",
            "Login attempts, by outcome",
            metrics.logins.clone(),
        );
        registry.register(
            "refreshes",
            "Refresh attempts, by outcome",
            metrics.refreshes.clone(),
        );
        registry.register("logouts", "Logouts", metrics.logouts.clone());
        metrics
    }
}

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Refresh token lifetime.
    pub refresh_token_ttl: std::time::Duration,
    /// See `REFRESH_RACE_GRACE`.
    pub refresh_race_grace: std::time::Duration,
    /// Largest body read.
    pub max_body_bytes: usize,
    /// Longest a request may run.
    pub request_timeout: std::time::Duration,
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    store: Store,
    issuer: Arc<TokenIssuer>,
    settings: Arc<AuthSettings>,
    metrics: AuthMetrics,
    http_metrics: HttpMetrics,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

impl AppState {
    /// State over `store`, signing with `issuer`.
    pub fn new(store: Store, issuer: TokenIssuer, settings: AuthSettings) -> Self {
        let mut registry = Registry::with_prefix("api_gateway");
        let metrics = AuthMetrics::register(&mut registry);
        let http_metrics = HttpMetrics::register(&mut registry);
        Self {
            store,
            issuer: Arc::new(issuer),
            settings: Arc::new(settings),
            metrics,
            http_metrics,
            registry: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The flag `/readyz` reports; cleared when shutdown starts.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.ready)
    }
}

/// The public router.
pub fn router(state: AppState) -> Router {
    let settings = Arc::clone(&state.settings);
    Router::new()
        .route("/auth/login", post(auth::login))
        .route("/auth/refresh", post(auth::refresh))
        .route("/auth/logout", post(auth::logout))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .route_layer(from_fn_with_state(settings.request_timeout, time_limit))
        .route_layer(from_fn_with_state(state.http_metrics.clone(), track_http))
        .fallback(problem::not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .with_state(state)
        .layer(from_fn(security_headers))
        .layer(from_fn(request_context))
}

/// The admin router: metrics and health, on `ADMIN_LISTEN_ADDR` only.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(problem::not_found)
        .with_state(state)
}

async fn security_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    response
}

async fn jwks(State(state): State<AppState>) -> Response {
    let mut response = Json(state.issuer.jwks().clone()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return Problem::unavailable("shutting down", 5).into_response();
    }
    if let Err(error) = state.store.ping().await {
        tracing::warn!(%error, "readiness: PostgreSQL unreachable");
        return Problem::unavailable("PostgreSQL is unreachable", 1).into_response();
    }
    Json(serde_json::json!({ "status": "ready" })).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    common::prometheus::render(&state.registry)
}
