//! The pool, tuned for this workload, and the migrations.

use std::time::Duration;

use clap::Args;
use common::config::{parse_duration, parse_secret};
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::{PgPool, migrate::Migrator, postgres::PgPoolOptions};

/// The schema's migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The schema the service keeps its tables in.
pub const SCHEMA: &str = "analytics";

/// How the service reaches PostgreSQL, and why each setting is what it is (README, "The pool").
#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    /// PostgreSQL; the tables live in its `analytics` schema.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_secret, hide_env_values = true)]
    pub database_url: SecretString,
    /// Connections in the pool. Ingest is bound by PostgreSQL's CPU and WAL, not by
    /// connections: past about twice the server's cores, more only queue inside PostgreSQL.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 8)]
    pub database_pool_size: u32,
    /// Prepared statements kept per connection. The service runs about twenty distinct
    /// statements; the multi-row INSERT path is not cached, so this never churns.
    #[arg(long, env = "STATEMENT_CACHE", default_value_t = 64)]
    pub statement_cache: usize,
    /// Longest any statement may run; a report past it is cut off instead of holding its
    /// snapshot (and its locks) for ever. The CLI's seed and archive raise it.
    #[arg(long, env = "STATEMENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub statement_timeout: Duration,
    /// How long a request waits for a free connection before it is answered 503.
    #[arg(long, env = "ACQUIRE_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub acquire_timeout: Duration,
}

/// Opens the pool and migrates the schema.
///
/// Every connection runs in UTC (the reports' days are UTC days, and `DATE(created_at)` follows
/// the session's time zone) and plans every statement with its parameters
/// (`plan_cache_mode = force_custom_plan`): a generic plan of a partitioned query cannot prune
/// at plan time and locks every partition, the default one included, which would make a report
/// conflict with partition maintenance; planning costs a report a fraction of a millisecond.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let timeout_ms = settings.statement_timeout.as_millis().to_string();
    let cache = settings.statement_cache;
    let pool = PgPoolOptions::new()
        .max_connections(settings.database_pool_size)
        .acquire_timeout(settings.acquire_timeout)
        // A broken connection shows up as an error on use (a 503 the client retries); the
        // ping before every acquire would cost every request a round trip.
        .test_before_acquire(false)
        .idle_timeout(Duration::from_secs(300));
    let pool = common::database::connect_tuned(
        settings.database_url.expose_secret(),
        Some(SCHEMA),
        move |options| {
            options
                .statement_cache_capacity(cache)
                .application_name("analytics-repo")
                .options([
                    ("timezone", "UTC"),
                    ("plan_cache_mode", "force_custom_plan"),
                    ("statement_timeout", timeout_ms.as_str()),
                ])
        },
        pool,
    )
    .await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// Applies the migrations; several instances starting at once wait for each other
/// (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    MIGRATOR
        .run(pool)
        .await
        .context("cannot migrate the analytics schema")
}
