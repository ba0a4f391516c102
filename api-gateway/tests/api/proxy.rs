//! The reverse proxy against real upstream servers on port 0: header rewriting, sticky
//! routing, health checks, breakers, timeouts, retries, body limits and WebSocket tunnels.
//!
//! `Proxy::forward` sits behind a small router that stands in for the gateway: it takes the
//! upstream name from `/api/{upstream}/…`, the subject from `x-test-subject` (default
//! `alice`), and is served with `common::http::serve`, so `ConnectInfo` and upgrades work as
//! in production.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use api_gateway::proxy::{BreakerSettings, Identity, Proxy, UpstreamSettings};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    middleware::from_fn,
    response::{IntoResponse, Response},
    routing::get,
};
use common::http::{ServeOptions, request_context, serve};
use futures_util::{SinkExt, StreamExt};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use test_support::polling::poll_until;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::helpers::{header_values, problem};

const SERVE: ServeOptions = ServeOptions {
    grace: Duration::from_secs(1),
    header_read_timeout: Duration::from_secs(10),
    max_header_bytes: None,
};

// ---------------------------------------------------------------------------------------
// Upstreams
// ---------------------------------------------------------------------------------------

const MODE_OK: u8 = 0;
const MODE_503: u8 = 1;

/// What an upstream saw and how it behaves; shared across restarts.
#[derive(Default)]
struct UpstreamState {
    /// Requests other than health checks.
    hits: AtomicUsize,
    mode: AtomicU8,
}

/// A real HTTP upstream: echo on every path, `/slow` that sleeps, `/hop` that answers with
/// hop-by-hop headers, `/healthz`.
struct TestUpstream {
    id: String,
    port: u16,
    url: String,
    state: Arc<UpstreamState>,
    stop: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl TestUpstream {
    async fn start(id: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut upstream = Self {
            id: id.to_owned(),
            port,
            url: format!("http://127.0.0.1:{port}"),
            state: Arc::default(),
            stop: None,
        };
        upstream.serve(listener);
        upstream
    }

    fn serve(&mut self, listener: TcpListener) {
        let router = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/hop", get(hop))
            .route("/slow", get(slow))
            .fallback(echo)
            .with_state((self.id.clone(), self.state.clone()));
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            serve(listener, router, shutdown, SERVE).await.unwrap();
        });
        self.stop = Some((stop, task));
    }

    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    fn set_mode(&self, mode: u8) {
        self.state.mode.store(mode, Ordering::SeqCst);
    }

    /// Stops accepting and closes every connection; the port is refused until `restart`.
    async fn stop(&mut self) {
        if let Some((stop, task)) = self.stop.take() {
            stop.cancel();
            task.await.unwrap();
        }
    }

    async fn restart(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.serve(listener);
    }
}

type UpstreamCtx = (String, Arc<UpstreamState>);

async fn echo(State((id, state)): State<UpstreamCtx>, request: Request) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    if state.mode.load(Ordering::SeqCst) == MODE_503 {
        return (StatusCode::SERVICE_UNAVAILABLE, "upstream says no").into_response();
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(value.to_str().unwrap_or("<binary>").to_owned());
    }
    Json(json!({
        "server": id,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("", |p| p.as_str()),
        "headers": headers,
        "body_len": body.len(),
    }))
    .into_response()
}

async fn hop(State((_, state)): State<UpstreamCtx>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let mut headers = HeaderMap::new();
    headers.insert("connection", HeaderValue::from_static("x-hop-named"));
    headers.insert("x-hop-named", HeaderValue::from_static("1"));
    headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    headers.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
    headers.insert("x-end-to-end", HeaderValue::from_static("kept"));
    (headers, "hop").into_response()
}

async fn slow(State((_, state)): State<UpstreamCtx>) -> &'static str {
    state.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    "finally"
}

/// A WebSocket echo server (tokio-tungstenite on a raw listener); its URL.
async fn start_websocket_echo() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // Health checks are plain GETs: their handshake fails, which is fine here.
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    // "bye": the upstream goes away without a close frame (its side only).
                    if message.to_text().is_ok_and(|text| text == "bye") {
                        return;
                    }
                    if message.is_text() || message.is_binary() {
                        if ws.send(message).await.is_err() {
                            return;
                        }
                    } else if message.is_close() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// An address nothing listens on: connections are refused.
async fn dead_target() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

// ---------------------------------------------------------------------------------------
// The stand-in gateway
// ---------------------------------------------------------------------------------------

struct Gateway {
    address: String,
    port: u16,
    client: reqwest::Client,
    registry: Arc<Registry>,
    proxy: Proxy,
    stop: CancellationToken,
}

async fn spawn_gateway(upstreams: Vec<UpstreamSettings>) -> Gateway {
    let mut registry = Registry::with_prefix("api_gateway");
    let proxy = Proxy::new(upstreams, &mut registry).expect("valid proxy settings");
    let stop = CancellationToken::new();
    proxy.start(stop.clone());
    let router = Router::new()
        .fallback(route_to_upstream)
        .with_state(proxy.clone())
        .layer(from_fn(request_context));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(serve(
        listener,
        router,
        stop.clone().cancelled_owned(),
        SERVE,
    ));
    Gateway {
        address: format!("http://127.0.0.1:{port}"),
        port,
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
        registry: Arc::new(registry),
        proxy,
        stop,
    }
}

/// `/api/{upstream}/{rest}?{query}` → `forward(upstream, "/{rest}?{query}")`.
async fn route_to_upstream(State(proxy): State<Proxy>, request: Request) -> Response {
    let path = request.uri().path();
    let Some(rest) = path.strip_prefix("/api/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (upstream, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let upstream = upstream.to_owned();
    let mut path_and_query = format!("/{tail}");
    if let Some(query) = request.uri().query() {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    let subject = request
        .headers()
        .get("x-test-subject")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("alice")
        .to_owned();
    let identity = Identity {
        subject,
        roles: vec!["user".into(), "admin".into()],
        authorization: None,
    };
    proxy
        .forward(&upstream, &path_and_query, request, &identity)
        .await
}

impl Gateway {
    async fn get_as(&self, user: &str, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .header("x-test-subject", user)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` as `user` and returns the id of the upstream server that answered.
    async fn server_for(&self, user: &str, path: &str) -> String {
        let response = self.get_as(user, path).await;
        assert_eq!(response.status(), 200, "{user}");
        let body: Value = response.json().await.unwrap();
        body["server"].as_str().unwrap().to_owned()
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    /// The value of the series whose line starts with `series` (name and labels).
    fn metric(&self, series: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    /// Polls `series` until it equals `value` (health checks run in the background).
    async fn wait_for_metric(&self, series: &str, value: f64) {
        for _ in 0..100 {
            if self.metric(series) == Some(value) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{series} never became {value}:\n{}", self.metrics());
    }
}

/// Settings that keep health checks out of the way unless a test wants them.
fn settings(name: &str, targets: Vec<String>) -> UpstreamSettings {
    let mut settings = UpstreamSettings::new(name, targets);
    settings.health_interval = Duration::from_secs(3600);
    settings.timeout = Duration::from_secs(5);
    settings
}

// ---------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn identity_is_set_by_the_gateway_and_client_copies_are_stripped() {
    let upstream = TestUpstream::start("a").await;
    let gateway = spawn_gateway(vec![settings("orders", vec![upstream.url.clone()])]).await;

    let response = gateway
        .client
        .get(format!("{}/api/orders/items", gateway.address))
        .header("X-User-Id", "mallory")
        .header("x-user-id", "mallory-again")
        .header("X-USER-ROLES", "superuser")
        .header("x-user-roles", "root")
        .header("X-Api-Key", "secret-key")
        .header("Authorization", "Bearer token-for-the-notifier")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(header_values(&echo, "x-user-id"), ["alice"]);
    assert_eq!(header_values(&echo, "x-user-roles"), ["user,admin"]);
    assert!(header_values(&echo, "x-api-key").is_empty(), "{echo}");
    assert_eq!(
        header_values(&echo, "authorization"),
        ["Bearer token-for-the-notifier"]
    );
}

#[tokio::test]
async fn request_id_is_passed_on_or_created() {
    let upstream = TestUpstream::start("a").await;
    let gateway = spawn_gateway(vec![settings("orders", vec![upstream.url.clone()])]).await;

    let response = gateway
        .client
        .get(format!("{}/api/orders/x", gateway.address))
        .header("x-request-id", "client-chosen-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-chosen-123");
    let echo: Value = response.json().await.unwrap();
    assert_eq!(header_values(&echo, "x-request-id"), ["client-chosen-123"]);

    let response = gateway.get_as("alice", "/api/orders/x").await;
    let returned = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let echo: Value = response.json().await.unwrap();
    let created = header_values(&echo, "x-request-id");
    assert_eq!(
        created,
        [returned.as_str()],
        "upstream and client see one id"
    );
    assert!(uuid::Uuid::parse_str(&returned).is_ok(), "{returned}");
}

#[tokio::test]
async fn traceparent_keeps_the_trace_with_a_new_parent_or_starts_one() {
    let upstream = TestUpstream::start("a").await;
    let gateway = spawn_gateway(vec![settings("orders", vec![upstream.url.clone()])]).await;

    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let echo: Value = gateway
        .client
        .get(format!("{}/api/orders/x", gateway.address))
        .header("traceparent", incoming)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sent = header_values(&echo, "traceparent");
    assert_eq!(sent.len(), 1);
    let parts: Vec<&str> = sent[0].split('-').collect();
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
    assert_ne!(parts[2], "00f067aa0ba902b7", "new parent id");
    assert_eq!(parts[2].len(), 16);
    assert_eq!(parts[3], "01");

    for invalid in [None, Some("00-zzzz-00f067aa0ba902b7-01")] {
        let mut request = gateway
            .client
            .get(format!("{}/api/orders/x", gateway.address));
        if let Some(invalid) = invalid {
            request = request.header("traceparent", invalid);
        }
        let echo: Value = request.send().await.unwrap().json().await.unwrap();
        let created = header_values(&echo, "traceparent");
        assert_eq!(created.len(), 1);
        let parts: Vec<&str> = created[0].split('-').collect();
        assert_eq!(parts.len(), 4, "{created:?}");
        assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));
        assert_ne!(parts[1], "0".repeat(32));
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways_and_forwarding_headers_set() {
    let upstream = TestUpstream::start("a").await;
    let gateway = spawn_gateway(vec![settings("orders", vec![upstream.url.clone()])]).await;

    let response = gateway
        .client
        .get(format!("{}/api/orders/x", gateway.address))
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("upgrade", "h2c")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .unwrap();
    let echo: Value = response.json().await.unwrap();
    for gone in [
        "x-drop-me",
        "te",
        "proxy-authorization",
        "upgrade",
        "keep-alive",
    ] {
        assert!(
            header_values(&echo, gone).is_empty(),
            "{gone} reached the upstream: {echo}"
        );
    }
    assert_eq!(header_values(&echo, "x-end-to-end"), ["kept"]);
    assert_eq!(
        header_values(&echo, "x-forwarded-for"),
        ["203.0.113.9, 127.0.0.1"]
    );
    assert_eq!(header_values(&echo, "x-forwarded-proto"), ["http"]);
    assert_eq!(
        header_values(&echo, "x-forwarded-host"),
        [format!("127.0.0.1:{}", gateway.port)]
    );
    assert_eq!(
        header_values(&echo, "host"),
        [upstream.url.trim_start_matches("http://")],
        "Host names the upstream"
    );

    let response = gateway.get_as("alice", "/api/orders/hop").await;
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    for gone in ["x-hop-named", "keep-alive", "proxy-authenticate"] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} reached the client: {headers:?}"
        );
    }
    assert_eq!(headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn path_and_query_are_forwarded_exactly() {
    let upstream = TestUpstream::start("a").await;
    let gateway = spawn_gateway(vec![settings("analytics", vec![upstream.url.clone()])]).await;

    for (asked, expected) in [
        (
            "/api/analytics/tenants/t%201/daily?from=2024-01-01&to=%2F&flag",
            "/tenants/t%201/daily?from=2024-01-01&to=%2F&flag",
        ),
        ("/api/analytics/", "/"),
        ("/api/analytics/a//b/?", "/a//b/?"),
    ] {
        let echo: Value = gateway.get_as("alice", asked).await.json().await.unwrap();
        assert_eq!(echo["path"], expected, "{asked}");
        assert_eq!(echo["method"], "GET");
    }
}

// ---------------------------------------------------------------------------------------
// Routing, health, breakers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn users_stick_to_a_target_and_only_the_lost_targets_users_move() {
    let mut upstreams = Vec::new();
    for id in ["a", "b", "c"] {
        upstreams.push(TestUpstream::start(id).await);
    }
    let urls = upstreams.iter().map(|u| u.url.clone()).collect();
    let mut config = settings("orders", urls);
    config.breaker.failures = 1_000;
    let gateway = spawn_gateway(vec![config]).await;

    let users: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let mut before = HashMap::new();
    for user in &users {
        let first = gateway.server_for(user, "/api/orders/x").await;
        for _ in 0..2 {
            assert_eq!(
                gateway.server_for(user, "/api/orders/x").await,
                first,
                "{user}"
            );
        }
        before.insert(user.clone(), first);
    }
    let per_server = |server: &str| before.values().filter(|s| *s == server).count();
    assert!(
        ["a", "b", "c"].iter().all(|s| per_server(s) > 5),
        "uneven spread: {before:?}"
    );

    upstreams[1].stop().await;
    let mut moved = 0;
    for user in &users {
        let now = gateway.server_for(user, "/api/orders/x").await;
        if before[user] == "b" {
            assert_ne!(now, "b");
            moved += 1;
        } else {
            assert_eq!(
                now, before[user],
                "{user} moved although its target stayed up"
            );
        }
    }
    assert_eq!(moved, per_server("b"));
}

#[tokio::test]
async fn health_checks_route_around_a_stopped_target_and_bring_it_back() {
    let a = TestUpstream::start("a").await;
    let mut b = TestUpstream::start("b").await;
    let mut config = settings("metrics", vec![a.url.clone(), b.url.clone()]);
    config.health_interval = Duration::from_millis(100);
    config.health_timeout = Duration::from_millis(500);
    let gateway = spawn_gateway(vec![config]).await;
    let b_healthy = format!(
        "api_gateway_upstream_healthy{{upstream=\"metrics\",target=\"{}\"}}",
        b.url
    );
    let connect_errors = "api_gateway_upstream_errors_total{upstream=\"metrics\",kind=\"connect\"}";
    gateway.wait_for_metric(&b_healthy, 1.0).await;

    let users: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    let mut b_users = Vec::new();
    for user in &users {
        if gateway.server_for(user, "/api/metrics/x").await == "b" {
            b_users.push(user.clone());
        }
    }
    assert!(!b_users.is_empty());

    b.stop().await;
    gateway.wait_for_metric(&b_healthy, 0.0).await;
    assert!(gateway.proxy.available("metrics"), "a is still up");
    for user in &users {
        assert_eq!(gateway.server_for(user, "/api/metrics/x").await, "a");
    }
    assert_eq!(
        gateway.metric(connect_errors),
        Some(0.0),
        "no request was sent to the unhealthy target"
    );

    b.restart().await;
    gateway.wait_for_metric(&b_healthy, 1.0).await;
    let hits = b.hits();
    for user in &b_users {
        assert_eq!(gateway.server_for(user, "/api/metrics/x").await, "b");
    }
    assert_eq!(b.hits(), hits + b_users.len());
}

#[tokio::test]
async fn the_breaker_opens_answers_503_without_the_upstream_then_closes_on_recovery() {
    let upstream = TestUpstream::start("a").await;
    let mut config = settings("orders", vec![upstream.url.clone()]);
    config.breaker = BreakerSettings {
        failures: 3,
        open_for: Duration::from_secs(1),
        half_open_probes: 1,
    };
    let gateway = spawn_gateway(vec![config]).await;
    let state = format!(
        "api_gateway_upstream_breaker_state{{upstream=\"orders\",target=\"{}\"}}",
        upstream.url
    );

    upstream.set_mode(MODE_503);
    for _ in 0..3 {
        let response = gateway.get_as("alice", "/api/orders/x").await;
        assert_eq!(response.status(), 503);
        assert_eq!(response.text().await.unwrap(), "upstream says no");
    }
    assert_eq!(upstream.hits(), 3);
    assert_eq!(gateway.metric(&state), Some(1.0));
    assert!(!gateway.proxy.available("orders"));

    let response = gateway.get_as("alice", "/api/orders/x").await;
    assert_eq!(response.headers()["retry-after"], "1");
    let body = problem(response, 503, None).await;
    assert_eq!(body["detail"], "upstream orders unavailable");
    assert_eq!(
        upstream.hits(),
        3,
        "an open breaker does not contact the upstream"
    );

    upstream.set_mode(MODE_OK);
    poll_until(
        "the breaker to let a probe through once open_for passed",
        Duration::from_secs(5),
        async || gateway.proxy.available("orders").then_some(()),
    )
    .await;
    let response = gateway.get_as("alice", "/api/orders/x").await;
    assert_eq!(response.status(), 200, "the half-open probe goes through");
    assert_eq!(upstream.hits(), 4);
    assert_eq!(gateway.metric(&state), Some(0.0));
    assert_eq!(gateway.get_as("bob", "/api/orders/x").await.status(), 200);
}

#[tokio::test]
async fn a_slow_upstream_gets_a_504() {
    let upstream = TestUpstream::start("a").await;
    let mut config = settings("orders", vec![upstream.url.clone()]);
    config.timeout = Duration::from_millis(200);
    let gateway = spawn_gateway(vec![config]).await;

    let body = problem(gateway.get_as("alice", "/api/orders/slow").await, 504, None).await;
    assert_eq!(body["detail"], "upstream orders unavailable");
    assert_eq!(
        gateway.metric("api_gateway_upstream_errors_total{upstream=\"orders\",kind=\"timeout\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn get_is_retried_on_another_target_and_post_is_not() {
    let live = TestUpstream::start("live").await;
    let dead = dead_target().await;
    let mut config = settings("orders", vec![live.url.clone(), dead]);
    config.breaker.failures = 1_000;
    let gateway = spawn_gateway(vec![config]).await;
    let users: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();

    for user in &users {
        assert_eq!(gateway.server_for(user, "/api/orders/x").await, "live");
    }
    assert_eq!(live.hits(), users.len());
    let retries = gateway
        .metric("api_gateway_upstream_retries_total{upstream=\"orders\"}")
        .unwrap();
    assert!(retries > 0.0, "some users belong to the dead target");

    let (mut ok, mut bad_gateway) = (0, 0);
    for user in &users {
        let response = gateway
            .client
            .post(format!("{}/api/orders/x", gateway.address))
            .header("x-test-subject", user)
            .body("{}")
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => ok += 1,
            502 => {
                let body = problem(response, 502, None).await;
                assert_eq!(body["detail"], "upstream orders unavailable");
                bad_gateway += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(bad_gateway as f64, retries, "the same users, not retried");
    assert_eq!(live.hits(), users.len() + ok);
    assert_eq!(
        gateway.metric("api_gateway_upstream_retries_total{upstream=\"orders\"}"),
        Some(retries),
        "POST was never retried"
    );
}

#[tokio::test]
async fn every_target_down_answers_502_then_503_once_breakers_open() {
    let mut config = settings("orders", vec![dead_target().await, dead_target().await]);
    config.breaker.failures = 1;
    config.breaker.open_for = Duration::from_secs(30);
    let gateway = spawn_gateway(vec![config]).await;

    problem(gateway.get_as("alice", "/api/orders/x").await, 502, None).await;
    let response = gateway.get_as("alice", "/api/orders/x").await;
    let retry_after: u32 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    problem(response, 503, None).await;
    assert!(!gateway.proxy.available("orders"));
}

// ---------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------

/// Sends a chunked request of `total` bytes over a raw connection; the response status.
async fn send_chunked(port: u16, method: &str, total: usize) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "{method} /api/orders/upload HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 256];
    let mut sent = 0;
    while sent < total {
        let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
        if stream.write_all(&frame).await.is_err() {
            break; // the gateway answered and closed early
        }
        sent += chunk.len();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    response_status(&mut stream, Duration::from_secs(5)).await
}

/// The status of the response on `stream`, read to its end (or for at most `wait`).
async fn response_status(stream: &mut TcpStream, wait: Duration) -> u16 {
    let mut response = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no response: {text:?}"))
}

/// Sends a chunked POST of `chunks` chunks, `gap` apart, then the end if `finish`; the
/// response status (read with the body still open when not `finish`).
async fn send_slowly(port: u16, chunks: usize, gap: Duration, finish: bool) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = "POST /api/orders/upload HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..chunks {
        if stream
            .write_all(b"10\r\n0123456789abcdef\r\n")
            .await
            .is_err()
        {
            break; // the gateway answered and closed early
        }
        tokio::time::sleep(gap).await;
    }
    if finish {
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
    response_status(&mut stream, Duration::from_secs(10)).await
}

#[tokio::test]
async fn a_slow_upload_is_not_the_upstreams_fault_and_a_stalled_one_gets_408() {
    let upstream = TestUpstream::start("a").await;
    let mut config = settings("orders", vec![upstream.url.clone()]);
    config.timeout = Duration::from_millis(300);
    config.breaker.failures = 2;
    let gateway = spawn_gateway(vec![config]).await;
    let state = format!(
        "api_gateway_upstream_breaker_state{{upstream=\"orders\",target=\"{}\"}}",
        upstream.url
    );
    let timeouts = "api_gateway_upstream_errors_total{upstream=\"orders\",kind=\"timeout\"}";

    // Twelve chunks 100 ms apart: 1.2 s of upload against a 300 ms timeout, always moving.
    let uploads = (0..3).map(|_| send_slowly(gateway.port, 12, Duration::from_millis(100), true));
    for status in futures_util::future::join_all(uploads).await {
        assert_eq!(status, 200);
    }

    // One chunk, then nothing: the client's fault, three times over a breaker that opens
    // after two failures.
    let started = std::time::Instant::now();
    let stalls = (0..3).map(|_| send_slowly(gateway.port, 1, Duration::ZERO, false));
    for status in futures_util::future::join_all(stalls).await {
        assert_eq!(status, 408);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        gateway.metric(&state),
        Some(0.0),
        "the breaker stays closed"
    );
    assert_eq!(gateway.metric(timeouts).unwrap_or(0.0), 0.0);
    assert_eq!(gateway.get_as("alice", "/api/orders/x").await.status(), 200);

    // A target that takes too long after the whole body is in is still timed out.
    let response = gateway.get_as("alice", "/api/orders/slow").await;
    problem(response, 504, None).await;
    assert_eq!(gateway.metric(timeouts), Some(1.0));
}

#[tokio::test]
async fn bodies_past_the_limit_get_413_by_length_and_by_stream() {
    // Two targets, so PUT may be retried and is therefore buffered, while POST streams.
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let mut config = settings("orders", vec![a.url.clone(), b.url.clone()]);
    config.max_body_bytes = 1024;
    let gateway = spawn_gateway(vec![config]).await;
    let url = format!("{}/api/orders/upload", gateway.address);

    let response = gateway
        .client
        .post(&url)
        .body(Bytes::from(vec![b'x'; 2_000]))
        .send()
        .await
        .unwrap();
    problem(response, 413, None).await;
    assert_eq!(
        a.hits() + b.hits(),
        0,
        "refused before contacting the upstream"
    );

    let echo: Value = gateway
        .client
        .put(&url)
        .header("x-test-subject", "someone")
        .body(Bytes::from(vec![b'x'; 1_000]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        echo["body_len"], 1_000,
        "a body within the limit arrives whole"
    );

    // POST streams through the limit; PUT (retryable) is buffered first.
    assert_eq!(send_chunked(gateway.port, "POST", 4_096).await, 413);
    assert_eq!(send_chunked(gateway.port, "PUT", 4_096).await, 413);
    assert_eq!(send_chunked(gateway.port, "POST", 512).await, 200);
}

// ---------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_tunnel_ends_soon_after_the_upstream_closes_though_the_client_stays_open() {
    let echo = start_websocket_echo().await;
    let gateway = spawn_gateway(vec![settings("notifications", vec![echo])]).await;
    let url = format!("ws://127.0.0.1:{}/api/notifications/ws", gateway.port);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    assert!(ws.next().await.unwrap().is_ok());
    gateway
        .wait_for_metric("api_gateway_websocket_tunnels", 1.0)
        .await;

    let closed = std::time::Instant::now();
    ws.send(Message::text("bye")).await.unwrap();
    // The upstream's end reaches the client; the client keeps its own side open (`ws` lives).
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(matches!(ended, Ok(None | Some(Err(_)))), "{ended:?}");
    gateway
        .wait_for_metric("api_gateway_websocket_tunnels", 0.0)
        .await;
    assert!(
        closed.elapsed() < Duration::from_secs(4),
        "{:?}",
        closed.elapsed()
    );
    drop(ws);
}

#[tokio::test]
async fn websocket_frames_are_tunnelled_and_the_tunnel_closes_on_stop() {
    let echo = start_websocket_echo().await;
    let gateway = spawn_gateway(vec![settings("notifications", vec![echo])]).await;
    let url = format!("ws://127.0.0.1:{}/api/notifications/ws", gateway.port);
    let (mut ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("sec-websocket-accept"));

    for text in ["hello", "through the gateway"] {
        ws.send(Message::text(text)).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), text);
    }
    gateway
        .wait_for_metric("api_gateway_websocket_tunnels", 1.0)
        .await;

    gateway.stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the tunnel stayed open after stop");
    gateway
        .wait_for_metric("api_gateway_websocket_tunnels", 0.0)
        .await;
}
