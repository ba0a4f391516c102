//! The reverse proxy behind `/api/*`: forwards an authenticated request to one target of an
//! upstream pool and streams the answer back.
//!
//! - [`ring`]: sticky target choice by consistent hashing of the user (ADR 0007).
//! - [`breaker`]: a circuit breaker per target (the shared `common::breaker`).
//! - `health`: active health checks.
//! - `forward`: one request's way through: headers, body limit, target choice, timeouts,
//!   retries of idempotent methods.
//! - `websocket`: splicing an upgraded connection to its upstream.
//! - `headers`: identity, hop-by-hop, request id, `traceparent`, `X-Forwarded-*`.
//!
//! The gateway authenticates, authorizes and rate-limits first, then calls
//! [`Proxy::forward`]; [`Proxy::start`] runs the health checks until shutdown.

pub mod breaker;
mod forward;
mod headers;
mod health;
pub mod ring;
mod websocket;

use std::{sync::Arc, time::Duration};

use anyhow::{Context, bail, ensure};
use axum::{
    extract::Request,
    http::uri::{Authority, PathAndQuery, Scheme, Uri},
    response::Response,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use serde::{Deserialize, Deserializer};
use std::sync::atomic::{AtomicBool, AtomicU32};
use tokio_util::sync::CancellationToken;

pub use breaker::BreakerSettings;
pub use headers::is_websocket_upgrade;

use self::{breaker::Breaker, ring::Ring};

/// One upstream service and how to reach it: a pool of equivalent targets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// The name routes refer to, e.g. `notifications`; also the `upstream` metric label.
    pub name: String,
    /// Base URLs of the targets, `http://host:port` (no path).
    pub targets: Vec<String>,
    /// Path the health check GETs; any 2xx is healthy.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// Time between health checks of a target.
    #[serde(
        default = "default_health_interval",
        deserialize_with = "deserialize_duration"
    )]
    pub health_interval: Duration,
    /// How long one health check may take.
    #[serde(
        default = "default_health_timeout",
        deserialize_with = "deserialize_duration"
    )]
    pub health_timeout: Duration,
    /// TCP connect timeout.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "deserialize_duration"
    )]
    pub connect_timeout: Duration,
    /// How long the upstream may take to send its response head (504 past it). The body is
    /// streamed afterwards without a limit, so long downloads still work.
    #[serde(default = "default_timeout", deserialize_with = "deserialize_duration")]
    pub timeout: Duration,
    /// Extra attempts on another target, for idempotent methods only.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// When a target's breaker opens and how it recovers.
    #[serde(default, deserialize_with = "breaker::deserialize_settings")]
    pub breaker: BreakerSettings,
    /// Largest request body forwarded (413 past it).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Whether the upstream verifies the caller's access token itself, as the notifier does
    /// through the JWKS. An API-key caller then goes there with a token the gateway signs for
    /// the key; upstreams without it never see one and trust `X-User-Id`.
    #[serde(default)]
    pub verifies_tokens: bool,
}

fn default_health_path() -> String {
    "/healthz".to_owned()
}

fn default_health_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_retries() -> u32 {
    1
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}

/// Reads durations written as `500ms`, `2s`, `1m` (see [`common::config::parse_duration`]).
fn deserialize_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    common::config::parse_duration(&text).map_err(serde::de::Error::custom)
}

impl UpstreamSettings {
    /// Settings with every default, for `name` and `targets`.
    pub fn new(name: impl Into<String>, targets: Vec<String>) -> Self {
        Self {
            name: name.into(),
            targets,
            health_path: default_health_path(),
            health_interval: default_health_interval(),
            health_timeout: default_health_timeout(),
            connect_timeout: default_connect_timeout(),
            timeout: default_timeout(),
            retries: default_retries(),
            breaker: BreakerSettings::default(),
            max_body_bytes: default_max_body_bytes(),
            verifies_tokens: false,
        }
    }
}

/// Who the gateway authenticated; sent upstream as `X-User-Id` and `X-User-Roles`, and the
/// key of sticky routing.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The token's `sub`.
    pub subject: String,
    /// The token's `roles`.
    pub roles: Vec<String>,
    /// For an API-key caller, `Bearer <token>` the gateway signed for the key's owner and
    /// roles, sent upstream in place of any `Authorization` the client sent; for a user, None:
    /// the user's own token goes upstream as it came.
    pub authorization: Option<axum::http::HeaderValue>,
}

/// The scheme the client used, put on the request by whoever knows it (the gateway handler,
/// from a trusted proxy's `X-Forwarded-Proto`), and sent upstream as `X-Forwarded-Proto`.
/// A request without it is sent as `http`, the gateway's own scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardedProto(pub &'static str);

/// Labels of metrics about an upstream as a whole.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

/// Labels of responses by status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    upstream: String,
    class: &'static str,
}

/// Labels of failures by kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    upstream: String,
    kind: &'static str,
}

/// Labels of per-target metrics; targets come from configuration, so the set is bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    upstream: String,
    target: String,
}

/// The families, registered once; each upstream keeps handles to its own series so the hot
/// path never builds a label set.
struct Families {
    requests: Family<ClassLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<UpstreamLabel, Histogram, fn() -> Histogram>,
    retries: Family<UpstreamLabel, Counter>,
    breaker_state: Family<TargetLabels, Gauge>,
    healthy: Family<TargetLabels, Gauge>,
    tunnels: Gauge,
}

impl Families {
    fn register(registry: &mut Registry) -> Self {
        let families = Self {
            requests: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(common::prometheus::latency_histogram),
            retries: Family::default(),
            breaker_state: Family::default(),
            healthy: Family::default(),
            tunnels: Gauge::default(),
        };
        registry.register(
            "upstream_requests",
            "Responses received from upstreams, by status class",
            families.requests.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream attempts that got no usable response, by kind (connect, timeout, body, protocol)",
            families.errors.clone(),
        );
        registry.register(
            "upstream_request_seconds",
            "Time from sending a request upstream to its response head",
            families.duration.clone(),
        );
        registry.register(
            "upstream_retries",
            "Extra attempts of idempotent requests on another target",
            families.retries.clone(),
        );
        registry.register(
            "upstream_breaker_state",
            "Circuit breaker per target: 0 closed, 1 open, 2 half-open",
            families.breaker_state.clone(),
        );
        registry.register(
            "upstream_healthy",
            "Active health check verdict per target: 1 healthy, 0 unhealthy",
            families.healthy.clone(),
        );
        registry.register(
            "websocket_tunnels",
            "WebSocket connections currently spliced to an upstream",
            families.tunnels.clone(),
        );
        families
    }
}

/// Failure kinds, in the order of [`UpstreamMetrics::errors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    Connect = 0,
    Timeout = 1,
    Body = 2,
    Protocol = 3,
}

/// One upstream's series.
struct UpstreamMetrics {
    /// 2xx (and 1xx), 3xx, 4xx, 5xx.
    responses: [Counter; 4],
    errors: [Counter; 4],
    duration: Histogram,
    retries: Counter,
}

impl UpstreamMetrics {
    fn new(families: &Families, upstream: &str) -> Self {
        let class = |class| {
            families
                .requests
                .get_or_create(&ClassLabels {
                    upstream: upstream.to_owned(),
                    class,
                })
                .clone()
        };
        let error = |kind| {
            families
                .errors
                .get_or_create(&ErrorLabels {
                    upstream: upstream.to_owned(),
                    kind,
                })
                .clone()
        };
        let label = UpstreamLabel {
            upstream: upstream.to_owned(),
        };
        Self {
            responses: [class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            errors: [
                error("connect"),
                error("timeout"),
                error("body"),
                error("protocol"),
            ],
            duration: families.duration.get_or_create(&label).clone(),
            retries: families.retries.get_or_create(&label).clone(),
        }
    }

    fn response(&self, status: u16) {
        let index = match status {
            300..=399 => 1,
            400..=499 => 2,
            500.. => 3,
            _ => 0,
        };
        self.responses[index].inc();
    }

    fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].inc();
    }
}

/// One target of an upstream.
struct Target {
    /// The configured URL, for logs and labels.
    url: String,
    scheme: Scheme,
    authority: Authority,
    breaker: Breaker,
    /// The health check's verdict; read on every request, written by the health task only.
    healthy: AtomicBool,
    /// Consecutive failed health checks.
    health_failures: AtomicU32,
    healthy_gauge: Gauge,
}

impl Target {
    /// The absolute URI of `path` on this target.
    fn uri(&self, path: PathAndQuery) -> Uri {
        let mut parts = axum::http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
    }
}

/// The client every request and health check to one upstream goes through: keep-alive
/// connections pooled per target, `TCP_NODELAY`, the upstream's connect timeout.
type UpstreamClient = Client<HttpConnector, axum::body::Body>;

/// An upstream pool.
struct Upstream {
    settings: UpstreamSettings,
    targets: Vec<Target>,
    ring: Ring,
    client: UpstreamClient,
    metrics: UpstreamMetrics,
}

impl Upstream {
    fn new(settings: UpstreamSettings, families: &Families) -> anyhow::Result<Self> {
        ensure!(
            !settings.targets.is_empty(),
            "upstream `{}` has no targets",
            settings.name
        );
        ensure!(
            settings.targets.len() <= ring::MAX_TARGETS,
            "upstream `{}` has more than {} targets",
            settings.name,
            ring::MAX_TARGETS
        );
        ensure!(
            settings.health_path.starts_with('/')
                && PathAndQuery::try_from(settings.health_path.as_str()).is_ok(),
            "upstream `{}`: health_path must start with `/`",
            settings.name
        );
        let mut targets = Vec::with_capacity(settings.targets.len());
        for url in &settings.targets {
            if settings.targets.iter().filter(|t| *t == url).count() > 1 {
                bail!("upstream `{}` lists target {url} twice", settings.name);
            }
            let uri: Uri = url
                .parse()
                .with_context(|| format!("upstream `{}`: `{url}` is not a URL", settings.name))?;
            let parts = uri.into_parts();
            ensure!(
                parts.scheme.as_ref() == Some(&Scheme::HTTP),
                "upstream `{}`: target `{url}` must be an http:// URL",
                settings.name
            );
            let authority = parts.authority.with_context(|| {
                format!("upstream `{}`: target `{url}` has no host", settings.name)
            })?;
            ensure!(
                parts
                    .path_and_query
                    .as_ref()
                    .is_none_or(|p| p.as_str() == "/"),
                "upstream `{}`: target `{url}` must not have a path",
                settings.name
            );
            let labels = TargetLabels {
                upstream: settings.name.clone(),
                target: url.clone(),
            };
            let healthy_gauge = families.healthy.get_or_create(&labels).clone();
            healthy_gauge.set(1);
            targets.push(Target {
                url: url.clone(),
                scheme: Scheme::HTTP,
                authority,
                breaker: Breaker::new(
                    settings.breaker,
                    families.breaker_state.get_or_create(&labels).clone(),
                ),
                healthy: AtomicBool::new(true),
                health_failures: AtomicU32::new(0),
                healthy_gauge,
            });
        }

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);

        Ok(Self {
            ring: Ring::new(&settings.targets),
            metrics: UpstreamMetrics::new(families, &settings.name),
            targets,
            client,
            settings,
        })
    }

    /// Some target is healthy and its breaker not open.
    fn available(&self) -> bool {
        let now = std::time::Instant::now();
        self.targets.iter().any(|t| {
            t.healthy.load(std::sync::atomic::Ordering::Relaxed)
                && t.breaker.open_until(now).is_none()
        })
    }
}

struct Inner {
    upstreams: Vec<Upstream>,
    tunnels: websocket::Tunnels,
}

/// The reverse proxy: every upstream pool, their clients, breakers and health state. Cheap
/// to clone (one `Arc`).
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field(
                "upstreams",
                &self
                    .inner
                    .upstreams
                    .iter()
                    .map(|u| &u.settings.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Proxy {
    /// Builds the pools and registers the proxy's metrics in `registry`. Fails on a target
    /// that is not an `http://host:port` URL, an upstream without targets, or two upstreams
    /// with the same name.
    pub fn new(upstreams: Vec<UpstreamSettings>, registry: &mut Registry) -> anyhow::Result<Self> {
        for (i, upstream) in upstreams.iter().enumerate() {
            ensure!(!upstream.name.is_empty(), "an upstream has an empty name");
            ensure!(
                upstreams[..i].iter().all(|u| u.name != upstream.name),
                "upstream `{}` is configured twice",
                upstream.name
            );
        }
        let families = Families::register(registry);
        let upstreams = upstreams
            .into_iter()
            .map(|settings| Upstream::new(settings, &families))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                upstreams,
                tunnels: websocket::Tunnels::new(families.tunnels),
            }),
        })
    }

    /// Runs the active health checks until `stop` fires; then also closes every WebSocket
    /// tunnel, so a graceful shutdown is not held up by long-lived connections. Pass the
    /// token whose cancellation starts the server's shutdown; await the handle to know the
    /// checks have ended.
    pub fn start(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut checks = tokio::task::JoinSet::new();
            for upstream in 0..inner.upstreams.len() {
                for target in 0..inner.upstreams[upstream].targets.len() {
                    checks.spawn(health::run(inner.clone(), upstream, target, stop.clone()));
                }
            }
            stop.cancelled().await;
            inner.tunnels.close_all();
            while checks.join_next().await.is_some() {}
        })
    }

    /// Forwards `request` to a target of `upstream` at `upstream_path_and_query`, as
    /// `identity`, and returns the upstream's response (streamed), or a problem+json: 413
    /// for a body past the limit, 502 when no target could be reached, 503 with `Retry-After`
    /// when every target is unhealthy or its breaker open, 504 on a response-head timeout.
    pub async fn forward(
        &self,
        upstream: &str,
        upstream_path_and_query: &str,
        request: Request,
        identity: &Identity,
    ) -> Response {
        let Some(pool) = self.find(upstream) else {
            tracing::error!(upstream, "forward to an upstream that is not configured");
            return axum::response::IntoResponse::into_response(
                common::problem::Problem::internal(),
            );
        };
        forward::forward(
            pool,
            &self.inner.tunnels,
            upstream_path_and_query,
            request,
            identity,
        )
        .await
    }

    /// Whether `upstream` has a target that is healthy and whose breaker is not open, for
    /// `/readyz`. An unknown upstream is not available.
    pub fn available(&self, upstream: &str) -> bool {
        self.find(upstream).is_some_and(Upstream::available)
    }

    /// Whether `upstream` verifies callers' tokens itself ([`UpstreamSettings::verifies_tokens`]).
    pub fn verifies_tokens(&self, upstream: &str) -> bool {
        self.find(upstream)
            .is_some_and(|u| u.settings.verifies_tokens)
    }

    /// The configured upstream names.
    pub fn upstreams(&self) -> impl Iterator<Item = &str> {
        self.inner
            .upstreams
            .iter()
            .map(|u| u.settings.name.as_str())
    }

    fn find(&self, name: &str) -> Option<&Upstream> {
        self.inner
            .upstreams
            .iter()
            .find(|u| u.settings.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_everything_but_name_and_targets() {
        let settings: UpstreamSettings =
            toml::from_str("name = \"orders\"\ntargets = [\"http://127.0.0.1:8083\"]\nbreaker = { open_for = \"3s\" }\ntimeout = \"250ms\"")
                .unwrap();
        assert_eq!(settings.health_path, "/healthz");
        assert_eq!(settings.health_interval, Duration::from_secs(2));
        assert_eq!(settings.connect_timeout, Duration::from_secs(1));
        assert_eq!(settings.timeout, Duration::from_millis(250));
        assert_eq!(settings.retries, 1);
        assert_eq!(settings.breaker.failures, 5);
        assert_eq!(settings.breaker.open_for, Duration::from_secs(3));
        assert_eq!(settings.breaker.half_open_probes, 1);
        assert_eq!(settings.max_body_bytes, 1024 * 1024);
    }

    #[test]
    fn bad_configurations_are_refused() {
        let mut registry = Registry::default();
        let one = |targets: &[&str]| {
            UpstreamSettings::new("a", targets.iter().map(|t| t.to_string()).collect())
        };
        for bad in [
            vec![one(&["https://127.0.0.1:1"])],
            vec![one(&["127.0.0.1:1"])],
            vec![one(&["http://127.0.0.1:1/base"])],
            vec![one(&[])],
            vec![one(&["http://127.0.0.1:1", "http://127.0.0.1:1"])],
            vec![one(&["http://127.0.0.1:1"]), one(&["http://127.0.0.1:2"])],
        ] {
            assert!(
                Proxy::new(bad.clone(), &mut registry).is_err(),
                "{bad:?} was accepted"
            );
        }
        let proxy = Proxy::new(
            vec![one(&["http://127.0.0.1:1", "http://localhost:2/"])],
            &mut registry,
        )
        .unwrap();
        assert!(proxy.available("a"));
        assert!(!proxy.available("b"));
    }
}
