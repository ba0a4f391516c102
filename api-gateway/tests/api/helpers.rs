//! Spawning the gateway on a fresh database, and a client for it.

use api_gateway::{passwords, settings::Settings, startup::Application, store::Store};
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

pub fn test_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A new, empty database for one test; its URL.
pub async fn fresh_database() -> String {
    let admin = test_database_url();
    let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|error| {
        panic!(
            "PostgreSQL is not reachable at {admin} ({error}). Start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
             or point TEST_DATABASE_URL at a running server (scripts/test does both)."
        )
    });
    let name = format!("gateway_test_{}", Uuid::now_v7().simple());
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("cannot create a test database");
    let (base, _) = admin
        .rsplit_once('/')
        .expect("TEST_DATABASE_URL has no database");
    format!("{base}/{name}")
}

pub struct TestApp {
    pub address: String,
    pub admin_address: String,
    pub database_url: String,
    pub client: reqwest::Client,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let database_url = fresh_database().await;
    let mut settings = Settings::for_tests(&database_url);
    configure(&mut settings);
    let application = Application::build(settings).await.expect("failed to build");
    let address = format!("http://127.0.0.1:{}", application.port());
    let admin_address = format!("http://127.0.0.1:{}", application.admin_port());
    tokio::spawn(application.run_until_stopped(std::future::pending()));
    TestApp {
        address,
        admin_address,
        database_url,
        client: reqwest::Client::new(),
    }
}

impl TestApp {
    /// Creates a user directly in the store.
    pub async fn add_user(&self, username: &str, password: &str, roles: &[&str]) {
        let store = Store::connect(&self.database_url, 1).await.unwrap();
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        store
            .create_user(username, &passwords::hash(password), &roles)
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

/// Asserts a problem+json response with `status` and, when given, `field`.
pub async fn problem(response: reqwest::Response, status: u16, field: Option<&str>) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status);
    if let Some(field) = field {
        assert_eq!(body["field"], field, "{body}");
    }
    body
}
