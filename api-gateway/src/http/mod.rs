//! The gateway's HTTP faces: the public router and the admin router (`/metrics` only there).
//!
//! | route | purpose |
//! |---|---|
//! | `POST /auth/login` | user name + password → access JWT + refresh token |
//! | `POST /auth/refresh` | rotate: spend the refresh token, get a new pair |
//! | `POST /auth/logout` | revoke the refresh token's family |
//! | `GET /.well-known/jwks.json` | the public signing keys |
//! | `POST`, `GET /admin/api-keys`, `DELETE /admin/api-keys/{id}` | API keys (admins) |
//! | `/api/*` | authenticate, authorise, rate-limit, forward to the upstream mounted there |
//! | `GET /healthz`, `GET /readyz` | liveness, readiness |
//! | admin: `GET /metrics` | Prometheus |
//!
//! [`PublicService`] is the public face as one service. Around every request, outermost first:
//! the request context (id, span, access log), security headers, CORS (when origins are
//! configured), and path normalisation, which runs before routing so that `/api/x/../y` is
//! routed, authorised and forwarded as `/api/y`. Then `/api/*` goes straight into the
//! pipeline ([`pipeline::forward`]) and everything else through the router of the gateway's
//! own endpoints. The proxied path is plain function calls rather than a stack of axum
//! middleware, each of which clones and boxes per request: under callgrind the stack cost
//! about 9,000 of the 102,000 user-space instructions of a proxied request.

mod auth;
mod keys;
pub mod pipeline;

use std::{
    borrow::Cow,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    ops::Deref,
    sync::{Arc, atomic::AtomicBool},
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, DefaultBodyLimit, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header},
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use common::{
    http::{
        in_request_context,
        ops::{self, Readiness},
        time_limit,
    },
    problem::{self, Problem},
    prometheus::{HttpMetrics, track_http},
};
use futures_util::{FutureExt as _, future::BoxFuture};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use tower::{Layer, Service, ServiceExt};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

use crate::{
    audit::Audit,
    authn::{KeyCache, KeyTokens, TokenCache},
    client_ip::TrustedProxies,
    config::Limits,
    limiter::Limiter,
    proxy::Proxy,
    revocations::Revocations,
    routes::{self, RouteTable},
    store::Store,
    tokens::TokenIssuer,
};

/// A bounded label value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// What happened (`success`, `invalid_credentials`, `reuse_detected`, …).
    pub outcome: &'static str,
}

/// A refusal's kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// `unauthenticated`, `forbidden`, `rate_limited`, `bad_path`.
    pub reason: &'static str,
}

/// The gateway's own metrics.
#[derive(Clone, Default)]
pub struct AuthMetrics {
    logins: Family<Outcome, Counter>,
    refreshes: Family<Outcome, Counter>,
    logouts: Counter,
    refusals: Family<Reason, Counter>,
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
        registry.register(
            "refusals",
            "Requests the gateway refused itself, by reason",
            metrics.refusals.clone(),
        );
        metrics
    }

    /// Counts one refusal.
    pub fn count_refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&Reason { reason }).inc();
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
    /// Origins allowed to call from a browser (CORS); empty: none.
    pub cors_allowed_origins: Vec<String>,
    /// Whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
}

/// Everything the handlers share, built once by `startup`: adding a dependency is a field
/// here and a line there.
pub struct Shared {
    /// Users, refresh tokens, API keys.
    pub store: Store,
    /// Signs access tokens (shared with [`KeyTokens`]).
    pub issuer: Arc<TokenIssuer>,
    /// Verifies them (cached).
    pub tokens: TokenCache,
    /// Finds API keys (cached).
    pub keys: Arc<KeyCache>,
    /// Signs the tokens API-key callers take upstream.
    pub key_tokens: KeyTokens,
    /// Tells other replicas about revoked keys; none without Redis.
    pub revocations: Option<Arc<Revocations>>,
    /// Route table.
    pub table: RouteTable,
    /// Default quotas.
    pub limits: Limits,
    /// The distributed limiter.
    pub limiter: Limiter,
    /// Upstreams.
    pub proxy: Proxy,
    /// The audit trail.
    pub audit: Audit,
    /// Handler settings.
    pub settings: AuthSettings,
}

/// Shared state of every handler; cloning it is one reference count. It derefs to the
/// [`Shared`] dependencies; what it derives from them itself (its metrics, the registry
/// that renders them, the readiness flag) it keeps apart.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What [`AppState`] holds.
struct Inner {
    shared: Shared,
    metrics: AuthMetrics,
    http_metrics: HttpMetrics,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0.shared
    }
}

impl AppState {
    /// State over `shared`; `registry` already holds the limiter's, proxy's and audit's
    /// metrics, and gets the HTTP and auth ones here.
    pub fn new(shared: Shared, mut registry: Registry) -> Self {
        let metrics = AuthMetrics::register(&mut registry);
        let http_metrics = HttpMetrics::register(&mut registry);
        Self(Arc::new(Inner {
            shared,
            metrics,
            http_metrics,
            registry: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(true)),
        }))
    }

    /// The gateway's own counters (logins, refreshes, refusals).
    fn metrics(&self) -> &AuthMetrics {
        &self.0.metrics
    }

    /// Requests by route, status and duration.
    fn http_metrics(&self) -> &HttpMetrics {
        &self.0.http_metrics
    }

    /// The client's address for a request from `peer`: the peer itself, unless it is a
    /// trusted proxy and `X-Forwarded-For` says more (see [`crate::client_ip`]).
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        self.settings.trusted_proxies.client(peer.ip(), headers)
    }

    /// [`AppState::client_ip`] for a request whose peer `common::http::serve` recorded.
    pub fn request_ip(&self, request: &Request) -> Option<IpAddr> {
        Some(self.client_ip(peer(request)?, request.headers()))
    }

    /// The scheme the client used (see [`crate::client_ip::TrustedProxies::scheme`]).
    pub fn request_scheme(&self, request: &Request) -> &'static str {
        peer(request).map_or("http", |peer| {
            self.settings
                .trusted_proxies
                .scheme(peer.ip(), request.headers())
        })
    }

    /// The flag `/readyz` reports; cleared when shutdown starts.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0.ready)
    }
}

/// The TCP peer `common::http::serve` recorded on `request`.
fn peer(request: &Request) -> Option<SocketAddr> {
    let ConnectInfo(peer) = request.extensions().get::<ConnectInfo<SocketAddr>>()?;
    Some(*peer)
}

/// The route label of every proxied request in the HTTP metrics.
const API_ROUTE: &str = "/api/{*rest}";

/// The public face; see the module docs for what it does in which order.
#[derive(Clone)]
pub struct PublicService {
    dispatch: Dispatch,
    cors: Option<Cors<Dispatch>>,
}

impl PublicService {
    /// The service over `state`.
    /// `max_head_bytes`: the largest request head answered; a larger one gets a 431
    /// problem. hyper must be given a higher bound of its own (see [`hyper_head_limit`]),
    /// since what it refuses gets a bare 431 without a body or the gateway's headers.
    pub fn new(state: AppState, max_head_bytes: usize) -> Self {
        let dispatch = Dispatch {
            own: own_routes(state.clone()),
            state,
            max_head_bytes,
        };
        let cors = cors(&dispatch.state.settings.cors_allowed_origins)
            .map(|layer| layer.layer(dispatch.clone()));
        Self { dispatch, cors }
    }
}

impl Service<Request> for PublicService {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let this = self.clone();
        // `map`, not an `async` block awaiting it: that would hold the future twice.
        Box::pin(
            in_request_context(request, |request| async move {
                let mut response = match this.cors {
                    Some(cors) => {
                        let Ok(response) = cors.oneshot(request).await;
                        response
                    }
                    None => this.dispatch.handle(request).await,
                };
                security_headers(&mut response);
                response
            })
            .map(Ok),
        )
    }
}

/// hyper's own bound on a request head for a gateway that answers heads over `max_head_bytes`
/// itself: far enough above it that a head the gateway measures as too large reaches it.
pub fn hyper_head_limit(max_head_bytes: usize) -> usize {
    max_head_bytes
        .saturating_mul(2)
        .max(max_head_bytes.saturating_add(8 * 1024))
}

/// The size of `request`'s head as a client sends it in HTTP/1.1: request line, each header
/// in the usual form `name: value` and the line ends. A client that leaves out the optional
/// spaces is counted a byte more per header.
fn head_bytes(request: &Request) -> usize {
    // `METHOD target HTTP/1.1\r\n`: two spaces, the version, the line end.
    let line = request.method().as_str().len()
        + request
            .uri()
            .path_and_query()
            .map_or(1, |p| p.as_str().len())
        + "  HTTP/1.1\r\n".len();
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + ": \r\n".len())
        .sum();
    line + headers + "\r\n".len()
}

/// Normalises the path, then sends `/api/*` into the pipeline and the rest to `own`.
#[derive(Clone)]
struct Dispatch {
    state: AppState,
    own: Router,
    max_head_bytes: usize,
}

impl Dispatch {
    async fn handle(self, mut request: Request) -> Response {
        if head_bytes(&request) > self.max_head_bytes {
            return Problem::new(
                axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header-fields-too-large",
                "Request header fields too large",
                format!(
                    "the request head is larger than the {} bytes this gateway accepts",
                    self.max_head_bytes
                ),
            )
            .into_response();
        }
        if let Some(refused) = normalize_path(&self.state, &mut request) {
            return refused;
        }
        // What axum's `/api/{*rest}` matches: something after `/api/`.
        let proxied = request
            .uri()
            .path()
            .strip_prefix("/api/")
            .is_some_and(|rest| !rest.is_empty());
        if !proxied {
            let Ok(response) = self.own.oneshot(request).await;
            return response;
        }
        let started = Instant::now();
        let method = request.method().clone();
        let response = pipeline::forward(&self.state, request).await;
        self.state.http_metrics().record(
            &method,
            Cow::Borrowed(API_ROUTE),
            response.status().as_u16(),
            started.elapsed(),
        );
        response
    }
}

impl Service<Request> for Dispatch {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        Box::pin(self.clone().handle(request).map(Ok))
    }
}

/// The gateway's own endpoints: bounded bodies and run time, HTTP metrics by route.
fn own_routes(state: AppState) -> Router {
    let (max_body_bytes, request_timeout) = (
        state.settings.max_body_bytes,
        state.settings.request_timeout,
    );
    let auth_routes = Router::new()
        .route("/auth/login", post(auth::login))
        .route("/auth/refresh", post(auth::refresh))
        .route("/auth/logout", post(auth::logout))
        .route_layer(from_fn_with_state(state.clone(), auth::limit_by_ip));
    Router::new()
        .merge(auth_routes)
        .route("/admin/api-keys", post(keys::create).get(keys::list))
        .route("/admin/api-keys/{id}", delete(keys::revoke))
        .route("/.well-known/jwks.json", get(jwks))
        .merge(ops::probes(Arc::clone(&state.0.ready), state.clone()))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .route_layer(from_fn_with_state(request_timeout, time_limit))
        .route_layer(from_fn_with_state(state.http_metrics().clone(), track_http))
        .fallback(problem::not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .with_state(state)
}

/// Rewrites the request's path to its normal form; or, when it has none, the answer (400).
fn normalize_path(state: &AppState, request: &mut Request) -> Option<Response> {
    let uri = request.uri();
    if routes::is_normal(uri.path()) {
        return None;
    }
    let normalized = match routes::normalize(uri.path()) {
        Ok(path) => path,
        Err(error) => {
            state.metrics().count_refusal("bad_path");
            return Some(Problem::malformed(format!("{error}")).into_response());
        }
    };
    if normalized == uri.path() {
        return None;
    }
    let path_and_query = match uri.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized,
    };
    let Ok(path_and_query) = path_and_query.parse() else {
        return Some(Problem::malformed("the path is malformed").into_response());
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    None
}

/// CORS for the configured origins only; without any, no CORS layer at all (so `OPTIONS`
/// goes through the pipeline like any other method).
fn cors(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("traceparent"),
        ])
        .expose_headers([
            HeaderName::from_static("ratelimit"),
            HeaderName::from_static("ratelimit-policy"),
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderName::from_static("x-ratelimit-reset"),
            header::RETRY_AFTER,
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(std::time::Duration::from_secs(600));
    Some(layer)
}

/// The admin router: metrics and health, on `ADMIN_LISTEN_ADDR` only.
pub fn admin_router(state: AppState) -> Router {
    ops::routes(
        Arc::clone(&state.0.ready),
        Arc::clone(&state.0.registry),
        state,
    )
    .fallback(problem::not_found)
}

/// HSTS, nosniff and no-referrer on every answer, and a CSP on the gateway's own.
fn security_headers(response: &mut Response) {
    let proxied = response.extensions().get::<pipeline::Proxied>().is_some();
    let headers = response.headers_mut();
    headers.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers
        .entry(header::REFERRER_POLICY)
        .or_insert(HeaderValue::from_static("no-referrer"));
    // The gateway's own answers are JSON and never render; an upstream's page keeps its policy.
    if !proxied {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        );
    }
}

async fn jwks(State(state): State<AppState>) -> Response {
    let mut response = Json(state.issuer.jwks().clone()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

/// Ready when PostgreSQL answers. Redis and upstreams are reported, not required: the
/// limiter has its fallback policy, and one upstream being down must not take the gateway
/// out of rotation for the others.
impl Readiness for AppState {
    async fn check(&self) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
        if let Err(error) = self.store.ping().await {
            tracing::warn!(%error, "readiness: PostgreSQL unreachable");
            return Err(Problem::unavailable("PostgreSQL is unreachable", 1));
        }
        let upstreams: serde_json::Map<String, serde_json::Value> = self
            .table
            .mounts()
            .iter()
            .map(|m| (m.name.clone(), self.proxy.available(&m.name).into()))
            .collect();
        let mut fields = serde_json::Map::new();
        fields.insert("redis".into(), self.limiter.redis_up().into());
        fields.insert("upstreams".into(), upstreams.into());
        Ok(fields)
    }
}
