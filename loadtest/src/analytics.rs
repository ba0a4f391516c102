//! analytics-repo: the seed's query against the rewritten report on the same data, ingest
//! through the repository and through the HTTP API, the report while ingest runs, and one old
//! month archived and restored.
//!
//! - **seed**: [`ROWS`] (quick: [`QUICK_ROWS`]) events over 1,000 tenants and [`DAYS`] days,
//!   stored by the repository's ingest (binary `COPY`, rollups of closed days in the same
//!   transaction), so the database holds what real traffic would have left. Its rate is the
//!   repository's sustained ingest; its time and the database's size are recorded.
//! - **report**: the naive query (the seed's, over raw rows) and the rewritten report
//!   (rollups for closed days, raw rows for the open one) from the same day, each run
//!   several times on the same data; the medians, their ratio, and whether the two answers
//!   are identical row for row.
//! - **ingest**: clients post NDJSON batches to `POST /v1/events` for a fixed time, while
//!   another task runs the uncached report over and over; rows/s and the report's worst time
//!   under that load. The same through the repository alone.
//! - **archive**: `analytics-repo archive` moves every month older than 24 months to zstd
//!   CSV files, verified; `analytics-repo restore` brings the oldest back, verified; the row
//!   counts must match what the database held before.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use analytics_repo::{
    db::DatabaseSettings,
    event::NewEvent,
    repository::{EventRepository, IngestPath},
    seed::{self, SeedSpec},
};
use anyhow::{Context, ensure};
use chrono::{Months, TimeDelta, Utc};
use common::storable::StorableText;
use secrecy::SecretString;
use serde_json::json;
use tokio::task::JoinSet;

use crate::{
    backends::{self, Database},
    client::{self, Connection},
    progress::Progress,
    report::{Report, Target},
    service::{Service, binary},
};

const BINARY: &str = "analytics-repo";
/// Rows seeded in the full run, and in the quick one.
const ROWS: u64 = 100_000_000;
const QUICK_ROWS: u64 = 1_000_000;
const TENANTS: usize = 1_000;
/// Days the events span: over two years, so some months are old enough to archive.
const DAYS: u32 = 800;
/// The report reads from this many days back (the seed's query used a fixed date).
const REPORT_DAYS: i64 = 700;
/// Stated targets.
const REPORT_LIMIT_MS: f64 = 1_000.0;
const INGEST_MIN_ROWS_PER_SECOND: f64 = 50_000.0;
/// Goals.
const GOAL_REPORT_MS: f64 = 50.0;
const GOAL_SPEEDUP: f64 = 600.0;
const GOAL_REPOSITORY_ROWS_PER_SECOND: f64 = 250_000.0;
/// Events per HTTP batch, and clients posting at once.
const HTTP_BATCH: usize = 5_000;
const HTTP_CLIENTS: usize = 3;

/// Runs the scenario into `report`.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let database = Database::create("analytics").await?;
    let outcome = scenario(report, quick, &database).await;
    database.drop_it().await;
    outcome
}

fn settings(url: &str) -> DatabaseSettings {
    DatabaseSettings {
        database_url: SecretString::from(url.to_owned()),
        database_pool_size: 8,
        statement_cache: 64,
        statement_timeout: Duration::ZERO,
        acquire_timeout: Duration::from_secs(10),
    }
}

async fn scenario(report: &mut Report, quick: bool, database: &Database) -> anyhow::Result<()> {
    let pool = analytics_repo::db::connect(&settings(&database.url)).await?;
    let repository = EventRepository::new(pool.clone());
    let rows = if quick { QUICK_ROWS } else { ROWS };

    // Seed, through the repository.
    let spec = SeedSpec {
        rows,
        tenants: TENANTS,
        days: DAYS,
        batch: 10_000,
        workers: 3,
        seed: 1,
    };
    let stored = Arc::new(AtomicU64::new(0));
    let expected = Duration::from_secs_f64(rows as f64 / 150_000.0);
    let started = Instant::now();
    {
        let _progress = Progress::start(format!("analytics: seeding {rows} rows"), expected, None);
        seed::seed(&repository, &spec, Arc::clone(&stored)).await?;
    }
    let seed_seconds = started.elapsed().as_secs_f64();
    let seed_rate = rows as f64 / seed_seconds;
    let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(&pool)
        .await?;
    report.figure("seeded_rows", rows);
    report.figure("tenants", TENANTS as u64);
    report.figure("seed_seconds", round(seed_seconds));
    report.figure("seed_rows_per_second", seed_rate.round());
    report.figure("database_bytes_after_seed", size);
    println!(
        "analytics: seeded {rows} rows in {seed_seconds:.1} s ({seed_rate:.0} rows/s), database {} MB",
        size / 1_000_000
    );

    // The naive query and the report, same data, same run.
    let from = Utc::now().date_naive() - TimeDelta::days(REPORT_DAYS);
    let naive_runs = if quick { 3 } else { 1 };
    let mut naive_ms = Vec::new();
    let mut naive = Vec::new();
    for _ in 0..naive_runs {
        let started = Instant::now();
        naive = repository.naive_enterprise_report(from).await?;
        naive_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let mut report_ms = Vec::new();
    let mut rewritten = Vec::new();
    for _ in 0..7 {
        let started = Instant::now();
        rewritten = repository.enterprise_report(from).await?;
        report_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let key = |rows: &[analytics_repo::repository::DailyRow]| {
        let mut keyed: Vec<_> = rows
            .iter()
            .map(|r| (r.tenant_id, r.date, r.events, r.avg_time.clone()))
            .collect();
        keyed.sort();
        keyed
    };
    let identical = key(&naive) == key(&rewritten);
    let (naive_median, report_median) = (median(&mut naive_ms), median(&mut report_ms));
    let speedup = naive_median / report_median;
    report.figure("report_rows", rewritten.len() as u64);
    report.figure(
        "naive_query_ms",
        json!(naive_ms.iter().map(|m| round(*m)).collect::<Vec<_>>()),
    );
    report.figure(
        "report_ms",
        json!(report_ms.iter().map(|m| round(*m)).collect::<Vec<_>>()),
    );
    report.figure("naive_over_report", round(speedup));
    report.targets.push(Target::exactly(
        "report_rows_differing_from_naive_query",
        0,
        u64::from(!identical) * (naive.len().max(rewritten.len()) as u64),
        "rows",
    ));
    report.targets.push(Target::below(
        "report_median_ms",
        REPORT_LIMIT_MS,
        report_median,
        "ms",
    ));
    report.goals.push(at_goal_rows(
        Target::at_most(
            "report_median_ms_at_100m_rows",
            GOAL_REPORT_MS,
            report_median,
            "ms",
        ),
        rows,
    ));
    report.goals.push(at_goal_rows(
        Target::at_least("naive_over_report", GOAL_SPEEDUP, speedup, "x"),
        rows,
    ));
    println!(
        "analytics: naive {naive_median:.1} ms, report {report_median:.1} ms ({speedup:.0}x), {} rows, identical: {identical}",
        rewritten.len()
    );

    // Ingest through the repository alone.
    let phase = if quick {
        Duration::from_secs(8)
    } else {
        Duration::from_secs(30)
    };
    let tenants: Arc<Vec<uuid::Uuid>> = Arc::new(seed::tenants(&repository, TENANTS).await?);
    let repository_rate = {
        let _progress = Progress::start("analytics: repository ingest", phase, None);
        repository_ingest(&repository, &tenants, phase).await?
    };
    report.figure("repository_ingest_rows_per_second", repository_rate.round());
    report.goals.push(Target::at_least(
        "repository_ingest_rows_per_second",
        GOAL_REPOSITORY_ROWS_PER_SECOND,
        repository_rate,
        "rows/s",
    ));

    // Ingest through HTTP, with the report running beside it.
    let service = Service::start_command(
        BINARY,
        &["serve"],
        &[],
        &[
            ("DATABASE_URL", database.url.as_str()),
            ("REDIS_URL", backends::redis_url().as_str()),
            (
                "CACHE_PREFIX",
                &format!("loadtest-{}", uuid::Uuid::now_v7().simple()),
            ),
            ("RUST_LOG", "warn"),
        ],
    )
    .await?;
    let (http_rate, worst_report_ms, reports_during) = {
        let _progress =
            Progress::start("analytics: HTTP ingest with reports beside it", phase, None);
        http_ingest(&service.address, &repository, &tenants, phase, from).await?
    };
    report.figure("http_ingest_rows_per_second", http_rate.round());
    report.figure("reports_during_ingest", reports_during);
    report.figure("report_worst_ms_during_ingest", round(worst_report_ms));
    report.targets.push(Target::at_least(
        "http_ingest_rows_per_second",
        INGEST_MIN_ROWS_PER_SECOND,
        http_rate,
        "rows/s",
    ));
    report.targets.push(Target::below(
        "report_worst_ms_during_ingest",
        REPORT_LIMIT_MS,
        worst_report_ms,
        "ms",
    ));

    // The report through the service, cold then cached.
    let mut connection = Connection::open(&service.address).await?;
    let path = format!("/v1/reports/enterprise-daily?from={from}");
    let request = client::request("GET", &path, "application/json", b"");
    let started = Instant::now();
    let (status, _) = connection.send(&request).await?;
    let cold_ms = started.elapsed().as_secs_f64() * 1e3;
    ensure!(status == 200, "the report answered {status}");
    let mut cached_ms = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let (status, _) = connection.send(&request).await?;
        ensure!(status == 200, "the report answered {status}");
        ensure!(
            connection.header("x-cache") == Some("hit"),
            "the second report was not a cache hit"
        );
        cached_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    report.figure("http_report_cold_ms", round(cold_ms));
    report.figure(
        "http_report_cached_median_ms",
        round(median(&mut cached_ms)),
    );
    service.terminate(Duration::from_secs(10)).await?;

    // Archive the months over two years old, restore the oldest.
    archive_and_restore(report, database, &pool).await?;
    Ok(())
}

async fn repository_ingest(
    repository: &EventRepository,
    tenants: &Arc<Vec<uuid::Uuid>>,
    phase: Duration,
) -> anyhow::Result<f64> {
    let stored = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for worker in 0..3u64 {
        let (repository, tenants, stored) =
            (repository.clone(), Arc::clone(tenants), Arc::clone(&stored));
        workers.spawn(async move {
            let mut n = worker;
            while started.elapsed() < phase {
                let events = today_events(&tenants, 10_000, &mut n);
                repository.ingest(&events, IngestPath::Copy).await?;
                stored.fetch_add(events.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(stored.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Events of the open day, spread over the tenants.
fn today_events(tenants: &[uuid::Uuid], count: usize, n: &mut u64) -> Vec<NewEvent> {
    let now = Utc::now();
    let name = StorableText::parse("name", "api_call").expect("no NUL");
    (0..count)
        .map(|i| {
            *n = n
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            NewEvent {
                tenant_id: tenants[(*n >> 33) as usize % tenants.len()],
                created_at: now - TimeDelta::milliseconds((i % 1_000) as i64),
                processing_time: ((*n >> 40) % 2_000) as i32,
                name: name.clone(),
            }
        })
        .collect()
}

async fn http_ingest(
    address: &str,
    repository: &EventRepository,
    tenants: &Arc<Vec<uuid::Uuid>>,
    phase: Duration,
    from: chrono::NaiveDate,
) -> anyhow::Result<(f64, f64, u64)> {
    let stored = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for client_index in 0..HTTP_CLIENTS as u64 {
        let (address, tenants, stored) =
            (address.to_owned(), Arc::clone(tenants), Arc::clone(&stored));
        clients.spawn(async move {
            let mut connection = Connection::open(&address).await?;
            let mut n = client_index + 100;
            while started.elapsed() < phase {
                let events = today_events(&tenants, HTTP_BATCH, &mut n);
                let mut body = Vec::with_capacity(HTTP_BATCH * 130);
                for event in &events {
                    serde_json::to_writer(&mut body, &analytics_repo::event::to_json(event))?;
                    body.push(b'\n');
                }
                let request = client::request("POST", "/v1/events", "application/x-ndjson", &body);
                let (status, answer) = connection.send(&request).await?;
                ensure!(
                    status == 200,
                    "ingest answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
                stored.fetch_add(events.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    // The uncached report, again and again, while the batches land.
    let reporter = {
        let repository = repository.clone();
        tokio::spawn(async move {
            let (mut worst, mut runs) = (0f64, 0u64);
            while started.elapsed() < phase {
                let began = Instant::now();
                repository.enterprise_report(from).await?;
                worst = worst.max(began.elapsed().as_secs_f64() * 1e3);
                runs += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok((worst, runs))
        })
    };
    while let Some(done) = clients.join_next().await {
        done??;
    }
    let rate = stored.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let (worst, runs) = reporter.await.context("the reporter panicked")??;
    Ok((rate, worst, runs))
}

async fn archive_and_restore(
    report: &mut Report,
    database: &Database,
    pool: &sqlx::PgPool,
) -> anyhow::Result<()> {
    let cutoff = analytics_repo::partitions::month_of(Utc::now().date_naive() - Months::new(24));
    let old_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE created_at < $1")
        .bind(analytics_repo::repository::start_of(cutoff))
        .fetch_one(pool)
        .await?;
    let dir = std::env::temp_dir().join(format!(
        "analytics-archive-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let binary = binary(BINARY)?;
    let started = Instant::now();
    let archived = tokio::process::Command::new(&binary)
        .args(["archive", "--dir"])
        .arg(&dir)
        .env("DATABASE_URL", &database.url)
        .env("RUST_LOG", "warn")
        .output()
        .await?;
    ensure!(
        archived.status.success(),
        "archive failed: {}",
        String::from_utf8_lossy(&archived.stderr)
    );
    let archive_seconds = started.elapsed().as_secs_f64();
    let (months, archived_rows, file_bytes): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT count(*), sum(rows)::int8, sum(file_bytes)::int8 FROM archived_months WHERE state = 'dropped'",
    )
    .fetch_one(pool)
    .await?;
    let archived_rows = archived_rows.unwrap_or(0);
    ensure!(months > 0, "nothing was old enough to archive");
    report.figure("archived_months", months);
    report.figure("archive_seconds", round(archive_seconds));
    report.figure("archive_file_bytes", file_bytes.unwrap_or(0));
    report.targets.push(Target::exactly(
        "archived_rows_missing",
        0,
        (old_rows - archived_rows).unsigned_abs(),
        "rows",
    ));

    let (month, month_rows): (chrono::NaiveDate, i64) =
        sqlx::query_as("SELECT month, rows FROM archived_months ORDER BY month LIMIT 1")
            .fetch_one(pool)
            .await?;
    let started = Instant::now();
    let restored = tokio::process::Command::new(&binary)
        .args(["restore", "--dir"])
        .arg(&dir)
        .args(["--month", &month.format("%Y-%m").to_string()])
        .env("DATABASE_URL", &database.url)
        .env("RUST_LOG", "warn")
        .output()
        .await?;
    ensure!(
        restored.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&restored.stderr)
    );
    report.figure("restore_seconds", round(started.elapsed().as_secs_f64()));
    let back: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE created_at >= $1 AND created_at < $2",
    )
    .bind(analytics_repo::repository::start_of(month))
    .bind(analytics_repo::repository::start_of(month + Months::new(1)))
    .fetch_one(pool)
    .await?;
    report.figure("restored_month", month.format("%Y-%m").to_string());
    report.targets.push(Target::exactly(
        "restored_rows_missing",
        0,
        (month_rows - back).unsigned_abs(),
        "rows",
    ));
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "analytics: archived {months} month(s), {archived_rows} rows in {archive_seconds:.1} s; restored {month}: {back} of {month_rows} rows"
    );
    Ok(())
}

/// A report goal, which counts only at the goal's [`ROWS`]: on fewer rows (the quick run)
/// the figure is shown, with a note, and missed, as neither the report's time nor the naive
/// query's is the same at a hundredth of the data.
fn at_goal_rows(mut goal: Target, rows: u64) -> Target {
    if rows < ROWS {
        goal.pass = false;
        goal.note = Some(format!(
            "measured at {} rows, not at {}",
            millions(rows),
            millions(ROWS)
        ));
    }
    goal
}

fn millions(rows: u64) -> String {
    format!("{}M", rows / 1_000_000)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn round(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}
