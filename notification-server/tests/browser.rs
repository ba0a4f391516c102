//! The demo page (`GET /`) in a real headless Chromium, used as a person would: paste a
//! token, click Connect, watch notifications sent over HTTP appear newest first; then the
//! server restarts, and the page must reconnect by itself and show what it missed, marked
//! "recovered". The API tests cannot see any of this: it lives in the page's script.
//!
//! Chromium is driven through chromedriver's W3C WebDriver HTTP protocol with `reqwest`, so
//! no browser-automation crate and no Node.js are needed. Needs Debian's `chromium` and
//! `chromium-driver` (scripts/test installs them) and PostgreSQL, whose history outlives the
//! restart.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use notification_server::{settings::Settings, startup::Application};
use serde_json::{Value, json};
use test_support::{access_token::access_token, free_port::free_port};
use uuid::Uuid;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long the page may take to show what it should.
const WAIT: Duration = Duration::from_secs(10);
/// The class of a notification's item when it arrived live, and when it was replayed.
const LIVE: &str = "";
const RECOVERED: &str = "recovered";
/// W3C WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_live_notifications_and_recovers_missed_ones_after_a_restart() {
    for binary in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: this test drives a real browser. Install it with \
             `apt-get install chromium chromium-driver` (scripts/test does)."
        );
    }
    let database = test_support::fresh_database("notify_test").await;
    let mut node = Node::start(&database, 0).await;
    let driver = ChromeDriver::start();
    let browser = Browser::open(&driver).await;

    // Connect as a person would: paste the token, click.
    browser.navigate(&node.url("/")).await;
    browser
        .type_into("#token", &access_token("browser-user", &[]))
        .await;
    browser.click("#connect").await;
    browser.wait_for_status("connected as browser-user").await;

    // Live delivery, newest first.
    let first = node.send("browser-user", "Hello from the test").await;
    assert_eq!(
        browser.wait_for_item(&first, "Hello from the test").await,
        LIVE
    );
    let second = node.send("browser-user", "Second hello").await;
    assert_eq!(browser.wait_for_item(&second, "Second hello").await, LIVE);
    assert_eq!(browser.listed().await, [second.as_str(), first.as_str()]);

    // The server restarts: its WebSockets close with 1001 and the page starts retrying. A
    // second node on the same database takes a notification meanwhile.
    let port = node.port;
    let mut backup = Node::start(&database, 0).await;
    node.stop().await;
    browser
        .wait_until(
            "the page to notice the drop",
            r#"return document.getElementById("status").dataset.state !== "open";"#,
            json!([]),
        )
        .await;
    let missed = backup
        .send("browser-user", "Sent while you were away")
        .await;
    assert_eq!(browser.listed().await, [second.as_str(), first.as_str()]);
    let mut node = Node::start(&database, port).await;

    // The page reconnects with the last id it saw and the server replays the missed one.
    assert_eq!(
        browser
            .wait_for_item(&missed, "Sent while you were away")
            .await,
        RECOVERED
    );
    browser.wait_for_status("connected as browser-user").await;
    assert_eq!(
        browser.listed().await,
        [missed.as_str(), second.as_str(), first.as_str()]
    );

    // Then live delivery goes on, no longer marked.
    let after = node.send("browser-user", "Back to normal").await;
    assert_eq!(browser.wait_for_item(&after, "Back to normal").await, LIVE);
    assert_eq!(
        browser.listed().await,
        [
            after.as_str(),
            missed.as_str(),
            second.as_str(),
            first.as_str()
        ]
    );

    drop(browser);
    node.stop().await;
    backup.stop().await;
}

// --- The service -------------------------------------------------------------------------

/// One node of the service, in this process, on the given database.
struct Node {
    port: u16,
    client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    stopped: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Node {
    /// Starts a node on `port` (0: any free port). A given port was just freed by a node
    /// that stopped, so a refused bind is retried for a moment.
    async fn start(database_url: &str, port: u16) -> Self {
        let mut settings = Settings::for_tests();
        settings.database_url = Some(database_url.to_owned().into());
        settings.serve.listen = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(5);
        let application = loop {
            match Application::build(settings.clone()).await {
                Ok(application) => break application,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("cannot start a node on port {port} yet: {error:#}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("failed to build the application: {error:#}"),
            }
        };
        let port = application.port();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let stopped = tokio::spawn(application.run_until_stopped(async move {
            let _ = stop.await;
        }));
        Self {
            port,
            client: reqwest::Client::new(),
            shutdown: Some(shutdown),
            stopped: Some(stopped),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Sends a notification to `user` as a sender would; returns its id.
    async fn send(&self, user: &str, title: &str) -> String {
        let response = self
            .client
            .post(self.url("/v1/notifications"))
            .bearer_auth(access_token("sender-1", &["sender"]))
            .json(&json!({
                "user_ids": [user],
                "type": "test.browser",
                "title": title,
                "message": format!("sent by the browser test: {title}"),
            }))
            .send()
            .await
            .expect("POST /v1/notifications failed");
        let status = response.status();
        let body: Value = response.json().await.expect("a JSON answer");
        assert_eq!(status, 201, "{body}");
        body["notification"]["id"]
            .as_str()
            .expect("the answer names the notification's id")
            .to_owned()
    }

    /// Stops as on SIGTERM and returns when the node has stopped.
    async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(stopped) = self.stopped.take() {
            stopped.await.unwrap().unwrap();
        }
    }
}

// --- The browser -------------------------------------------------------------------------

/// chromedriver on a free port, with a folder for its log and Chromium's profile; killed,
/// and the folder removed, on drop.
struct ChromeDriver {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl ChromeDriver {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("browser-test-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(dir.join("profile")).expect("cannot create a temp folder");
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    /// The end of chromedriver's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("chromedriver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A WebDriver session: one Chromium, deleted (Chromium quits) on drop, even on a failure.
struct Browser {
    http: reqwest::Client,
    session: String,
}

impl Browser {
    /// Waits for chromedriver to be ready, then starts Chromium headless. The flags keep it
    /// from reaching for Google's services, which this closed network refuses.
    async fn open(driver: &ChromeDriver) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let status = http.get(format!("{}/status", driver.url)).send().await;
            if let Ok(response) = status
                && let Ok(body) = response.json::<Value>().await
                && body["value"]["ready"] == true
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready within {WAIT:?}; its log:\n{}",
                driver.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = driver.dir.join("profile");
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let response = http
            .post(format!("{}/session", driver.url))
            .json(&capabilities)
            .send()
            .await
            .expect("chromedriver did not answer");
        let body: Value = response.json().await.expect("a JSON answer");
        let Some(id) = body["value"]["sessionId"].as_str() else {
            panic!(
                "Chromium did not start: {body}\nchromedriver's log:\n{}",
                driver.log_tail()
            );
        };
        Self {
            session: format!("{}/session/{id}", driver.url),
            http,
        }
    }

    /// Runs one WebDriver command; its `value`, or a panic with the driver's error.
    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let response = self
            .http
            .request(method.clone(), format!("{}{path}", self.session))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path} failed: {e}"));
        let status = response.status();
        let mut answer: Value = response.json().await.expect("a JSON answer");
        assert!(
            status.is_success(),
            "WebDriver {method} {path} answered {status}: {} ({})",
            answer["value"]["error"],
            answer["value"]["message"]
        );
        answer["value"].take()
    }

    async fn navigate(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element reference for {css}: {found}"))
            .to_owned()
    }

    /// Types `text` into the element, as keystrokes.
    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            json!({}),
        )
        .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    async fn script(&self, script: &str, args: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Polls `script` until it returns something other than null or false; that value.
    /// Panics after [`WAIT`] with what the page shows.
    async fn wait_until(&self, what: &str, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.script(script, args.clone()).await;
            if !value.is_null() && value != false {
                return value;
            }
            if Instant::now() >= deadline {
                let page = self
                    .script(
                        r#"const $ = (id) => document.getElementById(id);
                           return { status: $("status").textContent,
                                    items: $("notifications").innerText,
                                    log: $("log").textContent };"#,
                        json!([]),
                    )
                    .await;
                panic!("waited {WAIT:?} for {what}; the page shows {page:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the status reads `text` with the state "open".
    async fn wait_for_status(&self, text: &str) {
        self.wait_until(
            &format!("the status {text:?}"),
            r#"const status = document.getElementById("status");
               return status.dataset.state === "open" && status.textContent === arguments[0];"#,
            json!([text]),
        )
        .await;
    }

    /// Waits for the item of notification `id` titled `title`; its class ([`LIVE`] or
    /// [`RECOVERED`]).
    async fn wait_for_item(&self, id: &str, title: &str) -> String {
        let class = self
            .wait_until(
                &format!("notification {id} titled {title:?}"),
                r#"const item = document.querySelector(
                       `#notifications > li[data-id="${CSS.escape(arguments[0])}"]`);
                   const title = item && item.querySelector("strong");
                   return title && title.textContent === arguments[1] ? item.className : null;"#,
                json!([id, title]),
            )
            .await;
        class.as_str().unwrap_or_default().to_owned()
    }

    /// The ids of the listed notifications, top to bottom.
    async fn listed(&self) -> Vec<String> {
        let ids = self
            .script(
                r##"return Array.from(document.querySelectorAll("#notifications > li"),
                                      (item) => item.dataset.id);"##,
                json!([]),
            )
            .await;
        serde_json::from_value(ids).expect("a list of ids")
    }
}

impl Drop for Browser {
    /// Deletes the session from a thread of its own: drop cannot await, and the test's
    /// runtime may be the one unwinding.
    fn drop(&mut self) {
        let session = self.session.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                reqwest::Client::new()
                    .delete(session)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
            })
        })
        .join();
        if !matches!(deleted, Ok(Ok(ref response)) if response.status().is_success()) {
            eprintln!("could not delete the WebDriver session: {deleted:?}");
        }
    }
}
