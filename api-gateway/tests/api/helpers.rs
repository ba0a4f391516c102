//! Spawning the gateway on a fresh database, and a client for it.

use std::{collections::BTreeMap, net::SocketAddr};

use api_gateway::{
    config::GatewayConfig, passwords, settings::Settings, startup::Application, store::Store,
};
use axum::{
    Json, Router,
    extract::{ConnectInfo, Request},
    routing::any,
};
use common::auth::Claims;
use serde_json::{Value, json};
pub use test_support::{
    access_token::{AccessToken, access_token},
    problem_json::problem,
    require_redis, test_database_url, test_redis_url,
};

/// A new, empty database for one test; its URL.
pub async fn fresh_database() -> String {
    test_support::fresh_database("gateway_test").await
}

pub struct TestApp {
    pub address: String,
    pub admin_address: String,
    pub database_url: String,
    pub client: reqwest::Client,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub stopped: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_, _| {}).await
}

/// A gateway on a fresh database, with Redis, every upstream mounted on one echo server;
/// `configure` may change the settings and the route file first.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings, &mut GatewayConfig)) -> TestApp {
    spawn_app_on(&fresh_database().await, configure).await
}

/// Like [`spawn_app_with`], on an existing database: another replica of the same gateway
/// (give both the same `rate_limit_prefix` to share the Redis state too).
pub async fn spawn_app_on(
    database_url: &str,
    configure: impl FnOnce(&mut Settings, &mut GatewayConfig),
) -> TestApp {
    require_redis().await;
    let database_url = database_url.to_owned();
    let upstream = spawn_echo_upstream().await;
    let mut settings = Settings::for_tests(&database_url);
    settings.redis_url = Some(test_redis_url().into());
    let mut config = GatewayConfig::parse(api_gateway::config::DEFAULT).unwrap();
    for name in ["metrics", "notifications", "orders", "analytics"] {
        config
            .set_targets(name, std::slice::from_ref(&upstream))
            .unwrap();
    }
    configure(&mut settings, &mut config);
    let application = Application::build_with(settings, config)
        .await
        .expect("failed to build");
    let address = format!("http://127.0.0.1:{}", application.port());
    let admin_address = format!("http://127.0.0.1:{}", application.admin_port());
    let (stop, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let stopped = tokio::spawn(application.run_until_stopped(async move {
        let _ = stopped_rx.await;
    }));
    TestApp {
        address,
        admin_address,
        database_url,
        client: reqwest::Client::new(),
        stop,
        stopped,
    }
}

/// An upstream answering every request with what it received: method, path and query,
/// headers (repeated ones joined with `, `), and the peer.
pub async fn spawn_echo_upstream() -> String {
    async fn echo(ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request) -> Json<Value> {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in request.headers() {
            headers
                .entry(name.as_str().to_owned())
                .or_default()
                .push(value.to_str().unwrap_or("<binary>").to_owned());
        }
        Json(json!({
            "method": request.method().as_str(),
            "path": request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            "headers": headers,
            "peer": peer.to_string(),
        }))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let router = Router::new()
        .route("/", any(echo))
        .route("/{*rest}", any(echo));
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    address
}

/// An access token signed with the fixture key the test gateway trusts.
pub fn token_for(sub: &str, roles: &[&str]) -> String {
    access_token(sub, roles)
}

/// A token whose claims `change` may alter first.
pub fn token_with(sub: &str, roles: &[&str], change: impl FnOnce(&mut Claims)) -> String {
    AccessToken::new(sub, roles).with_claims(change).sign()
}

impl TestApp {
    /// The Prometheus page of the admin listener.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin_address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET path` with `Authorization: Bearer token`.
    pub async fn get_as(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// Stops the gateway and waits for it to finish (audit flushed).
    pub async fn shut_down(self) {
        let _ = self.stop.send(());
        self.stopped.await.unwrap().unwrap();
    }

    /// Creates a user directly in the store.
    pub async fn add_user(&self, username: &str, password: &str, roles: &[&str]) {
        let store = Store::connect(&self.database_url, 1).await.unwrap();
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        store
            .create_user(
                &common::storable::StorableText::parse("username", username).unwrap(),
                &passwords::hash(password),
                &roles,
            )
            .await
            .unwrap()
            .expect("user exists already");
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.address))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn login(&self, username: &str, password: &str) -> reqwest::Response {
        self.post(
            "/auth/login",
            &json!({ "username": username, "password": password }),
        )
        .await
    }

    /// Logs in and returns the token pair body.
    pub async fn login_ok(&self, username: &str, password: &str) -> Value {
        let response = self.login(username, password).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn refresh(&self, token: &str) -> reqwest::Response {
        self.post("/auth/refresh", &json!({ "refresh_token": token }))
            .await
    }
}

/// The values of header `name` an echo upstream says it received.
pub fn header_values(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What the notifier does with the gateway's JWKS: a verifier trusting those keys alone.
pub fn jwks_verifier(jwks: &str) -> common::auth::Verifier {
    common::auth::Verifier::new(
        common::auth::KeySet::from_jwks(jwks).unwrap(),
        "api-gateway",
        "backend-suite",
    )
}
