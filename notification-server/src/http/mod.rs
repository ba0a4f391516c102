//! The HTTP face of the notifier: routes, shared state, authentication.
//!
//! | route | who | purpose |
//! |---|---|---|
//! | `GET /v1/ws` | any valid token | the WebSocket (`docs/websocket-protocol.md`) |
//! | `POST /v1/notifications` | `sender`, `admin` | send to users |
//! | `POST /v1/groups/{group}/notifications` | `sender`, `admin` | broadcast to a group |
//! | `GET /v1/users/{user}/notifications` | the user, `support`, `admin` | history, newest first |
//! | `PUT`/`DELETE /v1/groups/{group}/members/{user}` | `admin` | membership |
//! | `GET /v1/groups/{group}/members` | `admin` | list members |
//! | `GET /` | anyone | the demo page |
//! | `GET /healthz`, `/readyz`, `/metrics` | anyone | operations |

mod api;
mod page;
pub mod ws;

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, FromRequestParts},
    http::{HeaderValue, StatusCode, header, request::Parts},
    middleware::{from_fn, from_fn_with_state},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use common::{
    auth::{Claims, TokenError, Verifier, bearer},
    http::{
        ops::{self, Readiness},
        request_context, shed_load, time_limit,
    },
    problem::{self, Problem},
    prometheus::{HttpMetrics, track_http},
};
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::{metrics::Metrics, service::Notifier};

/// Role that may send notifications.
pub const ROLE_SENDER: &str = "sender";
/// Role that may read any user's history.
pub const ROLE_SUPPORT: &str = "support";
/// Role that may do everything, including managing groups.
pub const ROLE_ADMIN: &str = "admin";

/// Limits of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Requests handled at once before shedding with 503.
    pub max_in_flight: usize,
    /// Longest a request may take.
    pub request_timeout: Duration,
}

/// Shared state of every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    notifier: Arc<Notifier>,
    verifier: Arc<Verifier>,
    ws: Arc<ws::WsSettings>,
    limits: Arc<HttpLimits>,
    metrics: Metrics,
    http_metrics: HttpMetrics,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    connections: TaskTracker,
}

impl AppState {
    /// State for `notifier`; `registry` already holds `metrics`.
    pub fn new(
        notifier: Arc<Notifier>,
        verifier: Verifier,
        ws: ws::WsSettings,
        limits: HttpLimits,
        metrics: Metrics,
        mut registry: Registry,
    ) -> Self {
        let http_metrics = HttpMetrics::register(&mut registry);
        Self {
            notifier,
            verifier: Arc::new(verifier),
            ws: Arc::new(ws),
            limits: Arc::new(limits),
            metrics,
            http_metrics,
            registry: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(true)),
            connections: TaskTracker::new(),
        }
    }

    /// The flag `/readyz` reports; cleared when shutdown starts.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.ready)
    }

    /// Tracks every WebSocket connection task, so shutdown can wait for them.
    pub fn connections(&self) -> TaskTracker {
        self.connections.clone()
    }
}

/// The whole service as a router.
pub fn router(state: AppState) -> Router {
    let limits = Arc::clone(&state.limits);
    let permits = Arc::new(Semaphore::new(limits.max_in_flight));
    let api = Router::new()
        .route("/v1/notifications", post(api::send_to_users))
        .route(
            "/v1/groups/{group}/notifications",
            post(api::broadcast_to_group),
        )
        .route("/v1/users/{user}/notifications", get(api::history))
        .route(
            "/v1/groups/{group}/members/{user}",
            put(api::add_member).delete(api::remove_member),
        )
        .route("/v1/groups/{group}/members", get(api::members))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(from_fn_with_state(permits, shed_load))
        .route_layer(from_fn_with_state(limits.request_timeout, time_limit));

    Router::new()
        .merge(api)
        // The upgrade itself is quick; the connection then lives outside any request timer.
        .route("/v1/ws", get(ws::upgrade))
        .route("/", get(page::index))
        .merge(ops::routes(
            Arc::clone(&state.ready),
            Arc::clone(&state.registry),
            state.clone(),
        ))
        .route_layer(from_fn_with_state(state.http_metrics.clone(), track_http))
        .fallback(problem::not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .with_state(state)
        .layer(from_fn(request_context))
}

/// Ready when the store answers and, across nodes, the Redis fan-out is up.
impl Readiness for AppState {
    async fn check(&self) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
        let store = self.notifier.store();
        if let Err(error) = store.ping().await {
            tracing::warn!(%error, "readiness: storage unreachable");
            return Err(Problem::unavailable(
                format!("{} is unreachable", store.engine()),
                1,
            ));
        }
        if let Some(fanout) = self.notifier.fanout()
            && !fanout.is_up()
        {
            return Err(Problem::unavailable(
                "the cross-node fan-out (Redis) is down",
                1,
            ));
        }
        let mut fields = serde_json::Map::new();
        fields.insert("engine".into(), store.engine().into());
        let nodes = if self.notifier.fanout().is_some() {
            "redis"
        } else {
            "single"
        };
        fields.insert("nodes".into(), nodes.into());
        fields.insert(
            "connections".into(),
            self.notifier.hub().connections().into(),
        );
        Ok(fields)
    }
}

/// The caller, authenticated by the bearer token in `Authorization`.
pub struct Caller(pub Claims);

impl Caller {
    /// True when the caller holds any of `roles` (or `admin`).
    pub fn has_any(&self, roles: &[&str]) -> bool {
        self.0.has_role(ROLE_ADMIN) || roles.iter().any(|r| self.0.has_role(r))
    }

    /// `Ok` when the caller holds any of `roles` (or `admin`), else 403.
    pub fn require(&self, roles: &[&str], action: &str) -> Result<(), Problem> {
        if self.has_any(roles) {
            Ok(())
        } else {
            Err(forbidden(format!(
                "{action} needs one of the roles {}",
                roles
                    .iter()
                    .chain(std::iter::once(&ROLE_ADMIN))
                    .map(|r| format!("`{r}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let token = bearer(&parts.headers).ok_or_else(|| unauthorized(None))?;
        match state.verifier.verify(token, chrono::Utc::now().timestamp()) {
            Ok(claims) => Ok(Self(claims)),
            Err(error) => Err(unauthorized(Some(error))),
        }
    }
}

/// 401 with a `WWW-Authenticate` challenge (RFC 6750). The reason is logged, not sent.
pub fn unauthorized(error: Option<TokenError>) -> Response {
    let detail = match &error {
        None => "a bearer token is required".to_owned(),
        Some(TokenError::Expired) => "the token has expired".to_owned(),
        Some(_) => "the token is invalid".to_owned(),
    };
    if let Some(error) = &error {
        tracing::info!(reason = error.reason(), "token refused");
    }
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail,
    )
    .into_response();
    let challenge = if error.is_some() {
        r#"Bearer realm="notification-server", error="invalid_token""#
    } else {
        r#"Bearer realm="notification-server""#
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// 403: authenticated, not allowed.
pub fn forbidden(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
}
