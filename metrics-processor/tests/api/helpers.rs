//! `spawn_app` and typed helpers over the running service.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use metrics_processor::{MetricsProcessor, settings::Settings, startup::Application};
use serde_json::{Value, json};

/// A running service and a client for it.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub processor: Arc<MetricsProcessor>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Spawns the service with default settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns the service after `configure` adjusts its settings.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = Settings::for_tests();
    configure(&mut settings);
    let application = Application::build(settings)
        .await
        .expect("failed to build the application");
    let address = format!("http://127.0.0.1:{}", application.port());
    let processor = application.processor();
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(application.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        processor,
        shutdown: Some(shutdown),
    }
}

/// `at` as RFC 3339, the way clients send it.
pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A valid event happening now.
pub fn event(user: &str, kind: &str, value: f64) -> Value {
    json!({ "timestamp": rfc3339(Utc::now()), "user_id": user, "event_type": kind, "value": value })
}

impl TestApp {
    /// Starts a graceful shutdown, as SIGTERM would.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request failed")
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut request = self.client.post(self.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().await.expect("request failed")
    }

    pub async fn post_event(&self, event: &Value) -> reqwest::Response {
        self.post_raw("/v1/events", Some("application/json"), event.to_string())
            .await
    }

    pub async fn post_batch(&self, events: &[Value]) -> reqwest::Response {
        self.post_raw(
            "/v1/events/batch",
            Some("application/json"),
            Value::from(events.to_vec()).to_string(),
        )
        .await
    }

    pub async fn aggregates(&self, query: &str) -> reqwest::Response {
        self.get(&format!("/v1/aggregates{query}")).await
    }

    /// The count of `kind` over the whole retention, 0 when absent.
    pub async fn count_of(&self, kind: &str) -> u64 {
        let body: Value = self.aggregates("?minutes=60").await.json().await.unwrap();
        body["event_types"][kind]["count"].as_u64().unwrap_or(0)
    }
}

/// Reads a problem+json body, checking the media type and the members every problem has.
pub async fn problem(response: reqwest::Response, status: u16) -> Value {
    let body = test_support::problem_json::problem(response, status, None).await;
    assert!(
        body["type"].as_str().unwrap().starts_with("urn:problem:"),
        "{body}"
    );
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    assert!(
        body["request_id"].is_string(),
        "every problem names its request: {body}"
    );
    body
}
