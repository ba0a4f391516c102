//! What the tests share: a fresh database with the repository over it, events made to
//! order, the service spawned from its binary on port 0, and its metrics read back.

use std::{process::Stdio, time::Duration};

use analytics_repo::{
    db::{self, DatabaseSettings},
    event::NewEvent,
    partitions::{self, Maintenance, month_of},
    repository::{DailyRow, EventRepository},
};
use chrono::{DateTime, Months, NaiveDate, TimeDelta, Utc};
use common::storable::StorableText;
use serde_json::Value;
use sqlx::PgPool;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};
use uuid::Uuid;

/// The key ingest holds shared and the roll-up exclusively (`repository::ROLLUP_LOCK`).
pub const ROLLUP_LOCK: i64 = 0x616e_616c_7974_0001;

/// The key one archiver holds (`archive::ARCHIVE_LOCK`).
pub const ARCHIVE_LOCK: i64 = 0x616e_616c_7974_0002;

/// The pool settings the tests use: the service's, with a roomier acquire timeout.
pub fn settings(url: &str) -> DatabaseSettings {
    DatabaseSettings {
        database_url: url.to_owned().into(),
        database_pool_size: 8,
        statement_cache: 64,
        statement_timeout: Duration::from_secs(30),
        acquire_timeout: Duration::from_secs(10),
    }
}

/// A fresh, migrated database: its URL and the repository over it.
pub async fn fresh() -> (String, EventRepository) {
    let url = test_support::fresh_database("analytics").await;
    let pool = db::connect(&settings(&url)).await.expect("connect");
    (url, EventRepository::new(pool))
}

/// Partitions for every month from `first` to `last` (days), made as the service makes them.
pub async fn ensure_months(pool: &PgPool, first: NaiveDate, last: NaiveDate) {
    let round = partitions::ensure(
        pool,
        month_of(first),
        month_of(last),
        Maintenance::default(),
    )
    .await
    .expect("ensure partitions");
    assert_eq!(round.lock_timeouts, 0, "{round:?}");
}

/// Partitions from `days_back` days ago to next month.
pub async fn ensure_recent(pool: &PgPool, days_back: i64) {
    let today = today();
    ensure_months(
        pool,
        today - TimeDelta::days(days_back),
        today + Months::new(1),
    )
    .await;
}

/// Today, UTC.
pub fn today() -> NaiveDate {
    Utc::now().date_naive()
}

/// `day` at `h:m:s.micros` UTC.
pub fn at(day: NaiveDate, h: u32, m: u32, s: u32, micros: u32) -> DateTime<Utc> {
    day.and_hms_micro_opt(h, m, s, micros)
        .expect("a valid time")
        .and_utc()
}

/// An event.
pub fn event(tenant: Uuid, created_at: DateTime<Utc>, processing_time: i32) -> NewEvent {
    named(tenant, created_at, processing_time, "page_view")
}

/// An event with a name.
pub fn named(
    tenant: Uuid,
    created_at: DateTime<Utc>,
    processing_time: i32,
    name: &str,
) -> NewEvent {
    NewEvent {
        tenant_id: tenant,
        created_at,
        processing_time,
        name: StorableText::parse("name", name).expect("storable"),
    }
}

/// A report's rows as the comparable set: (tenant, date, events, avg_time), sorted.
pub fn comparable(rows: &[DailyRow]) -> Vec<(Uuid, NaiveDate, i64, String)> {
    let mut set: Vec<_> = rows
        .iter()
        .map(|r| (r.tenant_id, r.date, r.events, r.avg_time.clone()))
        .collect();
    set.sort();
    set
}

/// Asserts the enterprise report from `from` equals the naive query over raw rows, exactly;
/// the number of rows compared.
pub async fn assert_report_exact(
    repository: &EventRepository,
    from: NaiveDate,
    stage: &str,
) -> usize {
    let report = comparable(&repository.enterprise_report(from).await.expect("report"));
    let naive = comparable(
        &repository
            .naive_enterprise_report(from)
            .await
            .expect("naive report"),
    );
    assert_eq!(
        report, naive,
        "{stage}: the report differs from the naive query (from {from})"
    );
    report.len()
}

/// Rows of `events` and their checksum, as the archiver computes it, for `[from, to)`.
pub async fn fingerprint(pool: &PgPool, from: DateTime<Utc>, to: DateTime<Utc>) -> (i64, String) {
    sqlx::query_as(
        "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text
         FROM events t WHERE created_at >= $1 AND created_at < $2",
    )
    .bind(from)
    .bind(to)
    .fetch_one(pool)
    .await
    .expect("fingerprint")
}

/// Whether a table of that name exists in the analytics schema.
pub async fn table_exists(pool: &PgPool, table: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("analytics.{table}"))
        .fetch_one(pool)
        .await
        .expect("to_regclass")
}

/// The service, spawned from its binary.
pub struct Service {
    /// Killed when the test drops it.
    _child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A client for it.
    pub http: reqwest::Client,
}

impl Service {
    /// `serve` on port 0 over `database_url` and `redis_url`, with its own cache prefix and
    /// the extra flags; returns once it logged "listening".
    pub async fn start(database_url: &str, redis_url: &str, flags: &[&str]) -> Service {
        let mut child = Command::new(env!("CARGO_BIN_EXE_analytics-repo"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(flags)
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url)
            .env("CACHE_PREFIX", format!("test-{}", Uuid::now_v7().simple()))
            .env("LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                std::env::var("ANALYTICS_LOG")
                    .unwrap_or_else(|_| "warn,analytics_repo=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start analytics-repo");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let address = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.expect("read log") {
                let log: Value = serde_json::from_str(&line).unwrap_or_default();
                if log["fields"]["message"] == "listening" {
                    return log["fields"]["addr"].as_str().expect("addr").to_owned();
                }
            }
            panic!("analytics-repo exited before listening");
        })
        .await
        .expect("analytics-repo did not listen within 20 s");
        let echo = std::env::var_os("ANALYTICS_LOG").is_some();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("[analytics-repo] {line}");
                }
            }
        });
        Service {
            _child: child,
            base: format!("http://{address}"),
            http: reqwest::Client::new(),
        }
    }

    /// The URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path`; never a 5xx.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        assert!(
            response.status().as_u16() < 500,
            "GET {path}: {}",
            response.status()
        );
        response
    }

    /// POST `body` as `content_type` to `path`; never a 5xx.
    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let response = self
            .http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("POST");
        assert!(
            response.status().as_u16() < 500,
            "POST {path}: {}",
            response.status()
        );
        response
    }

    /// POST a JSON value.
    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.post(path, "application/json", body.to_string()).await
    }

    /// PUT a JSON value; never a 5xx.
    pub async fn put_json(&self, path: &str, body: &Value) -> reqwest::Response {
        let response = self
            .http
            .put(self.url(path))
            .json(body)
            .send()
            .await
            .expect("PUT");
        assert!(
            response.status().as_u16() < 500,
            "PUT {path}: {}",
            response.status()
        );
        response
    }

    /// Creates a tenant over HTTP; its id.
    pub async fn tenant(&self, plan: &str) -> Uuid {
        let response = self
            .post_json(
                "/v1/tenants",
                &serde_json::json!({"name": format!("{plan} tenant"), "plan": plan}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("tenant JSON");
        assert_eq!(body["plan"], plan);
        body["id"].as_str().expect("id").parse().expect("uuid")
    }

    /// The value of one sample of `/metrics` (`name` with its labels, as printed), 0 when
    /// absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics_text().await;
        sample_value(&text, sample).unwrap_or(0.0)
    }

    /// `/metrics`, as text.
    pub async fn metrics_text(&self) -> String {
        let response = self.get("/metrics").await;
        assert_eq!(response.status(), 200);
        response.text().await.expect("metrics text")
    }
}

/// The value of `sample` in a Prometheus text exposition.
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map(|value| value.trim().parse().expect("a number"))
}

/// An event as the API takes it.
pub fn event_json(tenant: Uuid, created_at: DateTime<Utc>, processing_time: i64) -> Value {
    serde_json::json!({
        "tenant_id": tenant,
        "created_at": created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "processing_time": processing_time,
        "name": "page_view",
    })
}
