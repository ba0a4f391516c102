//! Spawning the real service (memory or PostgreSQL, one node or several over Redis), and a
//! WebSocket client that speaks the protocol. Tokens come from `test_support::access_token`.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use notification_server::{settings::Settings, startup::Application};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        self, Message,
        client::IntoClientRequest,
        http::{HeaderValue, StatusCode},
        protocol::frame::coding::CloseCode,
    },
};
use uuid::Uuid;

/// How long a test waits for a frame that should come.
pub const WAIT: Duration = Duration::from_secs(5);

/// Which storage engine a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Memory,
    Postgres,
}

/// Both engines, for tests that must behave the same on each.
pub const ENGINES: [Engine; 2] = [Engine::Memory, Engine::Postgres];

pub use test_support::{
    access_token::{AccessToken, FixtureKey, access_token},
    problem_json::problem,
    test_database_url, test_redis_url,
};

/// A new, empty database for one test; its URL.
pub async fn fresh_database() -> String {
    test_support::fresh_database("notify_test").await
}

/// A Redis prefix no other test uses.
pub fn fresh_prefix() -> String {
    format!("notify-test-{}:", Uuid::now_v7().simple())
}

/// Settings for `engine`; PostgreSQL gets a fresh database.
pub async fn settings_for(engine: Engine) -> Settings {
    let mut settings = Settings::for_tests();
    if engine == Engine::Postgres {
        settings.database_url = Some(fresh_database().await.into());
    }
    settings
}

/// A running service and clients for it.
pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    stopped: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app(engine: Engine) -> TestApp {
    spawn_app_with(engine, |_| {}).await
}

pub async fn spawn_app_with(engine: Engine, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = settings_for(engine).await;
    configure(&mut settings);
    spawn_with_settings(settings).await
}

pub async fn spawn_with_settings(settings: Settings) -> TestApp {
    let application = Application::build(settings)
        .await
        .expect("failed to build the application");
    let port = application.port();
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let stopped = tokio::spawn(application.run_until_stopped(async move {
        let _ = stop.await;
    }));
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        client: reqwest::Client::new(),
        shutdown: Some(shutdown),
        stopped: Some(stopped),
    }
}

/// A notification body.
pub fn content(title: &str) -> Value {
    json!({ "type": "test.note", "title": title, "message": format!("about {title}") })
}

impl TestApp {
    /// A client for a service running elsewhere (another process) on `port`.
    pub fn remote(port: u16) -> Self {
        Self {
            address: format!("http://127.0.0.1:{port}"),
            port,
            client: reqwest::Client::new(),
            shutdown: None,
            stopped: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/v1/ws{query}", self.port)
    }

    /// Starts a graceful shutdown, as SIGTERM would, and returns when the service stopped.
    pub async fn shut_down(&mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(stopped) = self.stopped.take() {
            stopped.await.unwrap().unwrap();
        }
        started.elapsed()
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request failed")
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> reqwest::Response {
        let mut request = self.client.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request failed")
    }

    pub async fn put(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request failed")
    }

    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request failed")
    }

    /// Sends `title` to `users` as a sender; returns the notification's id.
    pub async fn send(&self, users: &[&str], title: &str) -> String {
        let mut body = content(title);
        body["user_ids"] = json!(users);
        let response = self
            .post(
                "/v1/notifications",
                Some(&access_token("sender-1", &["sender"])),
                &body,
            )
            .await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let body: Value = response.json().await.unwrap();
        body["notification"]["id"].as_str().unwrap().to_owned()
    }

    /// Broadcasts `title` to `group`; returns (id, recipients).
    pub async fn broadcast(&self, group: &str, title: &str) -> (String, u64) {
        let response = self
            .post(
                &format!("/v1/groups/{group}/notifications"),
                Some(&access_token("sender-1", &["sender"])),
                &content(title),
            )
            .await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let body: Value = response.json().await.unwrap();
        (
            body["notification"]["id"].as_str().unwrap().to_owned(),
            body["recipients"].as_u64().unwrap(),
        )
    }

    pub async fn join(&self, group: &str, user: &str) {
        let response = self
            .put(
                &format!("/v1/groups/{group}/members/{user}"),
                &access_token("root", &["admin"]),
            )
            .await;
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// Connects as `user` with the token in the query; waits for the welcome frame.
    pub async fn connect(&self, user: &str) -> WsClient {
        self.connect_with(&format!("?token={}", access_token(user, &[])))
            .await
    }

    /// Connects as `user`, recovering after `last_id`.
    pub async fn reconnect(&self, user: &str, last_id: &str) -> WsClient {
        self.connect_with(&format!(
            "?token={}&last_id={last_id}",
            access_token(user, &[])
        ))
        .await
    }

    pub async fn connect_with(&self, query: &str) -> WsClient {
        let mut client = self
            .try_connect(query, None)
            .await
            .expect("upgrade refused");
        let welcome = client.next_json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client
    }

    /// Attempts an upgrade; a refusal returns its status and body.
    pub async fn try_connect(
        &self,
        query: &str,
        authorization: Option<&str>,
    ) -> Result<WsClient, (StatusCode, String)> {
        let mut request = self.ws_url(query).into_client_request().unwrap();
        if let Some(value) = authorization {
            request
                .headers_mut()
                .insert("authorization", HeaderValue::from_str(value).unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => Ok(WsClient { stream }),
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status();
                let body = response
                    .into_body()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                Err((status, body))
            }
            Err(error) => panic!("connect failed: {error}"),
        }
    }
}

/// A protocol client.
pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the server did next.
#[derive(Debug)]
pub enum Next {
    Json(Value),
    Closed(Option<u16>),
}

impl WsClient {
    /// The next text frame or close, skipping pings; panics after [`WAIT`].
    pub async fn next(&mut self) -> Next {
        self.next_within(WAIT)
            .await
            .expect("no frame from the server in time")
    }

    /// Like [`WsClient::next`], or None when nothing came within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Next> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let message = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(Next::Json(serde_json::from_str(text.as_str()).unwrap()));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Next::Closed(frame.map(|f| u16::from(f.code))));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Some(Next::Closed(None)),
            }
        }
    }

    pub async fn next_json(&mut self) -> Value {
        match self.next().await {
            Next::Json(value) => value,
            Next::Closed(code) => panic!("closed ({code:?}) while a frame was expected"),
        }
    }

    /// The next notification frame's notification.
    pub async fn next_notification(&mut self) -> Value {
        let frame = self.next_json().await;
        assert_eq!(frame["type"], "notification", "{frame}");
        frame["notification"].clone()
    }

    /// Waits for the close and returns its code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Next::Closed(code) => return code,
                Next::Json(_) => continue,
            }
        }
    }

    /// Asserts nothing arrives for a moment.
    pub async fn expect_silence(&mut self) {
        if let Some(Next::Json(frame)) = self.next_within(Duration::from_millis(300)).await {
            panic!("unexpected frame {frame}");
        }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.stream
            .send(Message::Text(text.into().into()))
            .await
            .unwrap();
    }

    pub async fn close(mut self) {
        let _ = self
            .stream
            .close(Some(tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}
