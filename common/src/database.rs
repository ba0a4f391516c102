//! Which database failures a retry can fix, so a service answers 503 with `Retry-After` only
//! for those.
//!
//! A pool that timed out, a connection that closed, a server that is starting up or shutting
//! down: the same statement may well succeed a second later, and the client is told so. A
//! statement the server read and refused (a data exception, a broken constraint, a syntax
//! error) fails the same way every time; it is a 500 without `Retry-After`, and it means the
//! edge let through input it should have refused, or a bug.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{config::redact_url, problem::Problem};

/// Opens a pool of at most `size` connections to `url`, failing with a message that names
/// the server (password hidden) when it cannot. With `schema`, that schema is created if
/// missing and every connection's `search_path` is set to it, so a service owning one schema
/// of a shared database reads and migrates only its own tables. A request waits at most
/// three seconds for a connection, then fails as an outage (503).
pub async fn connect(url: &str, size: u32, schema: Option<&str>) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(3));
    connect_tuned(url, schema, |options| options, pool).await
}

/// [`connect`] for a service that tunes its connections (`tune` adds session settings, the
/// statement cache's size, ...) and its pool itself.
pub async fn connect_tuned(
    url: &str,
    schema: Option<&str>,
    tune: impl FnOnce(PgConnectOptions) -> PgConnectOptions,
    pool: PgPoolOptions,
) -> anyhow::Result<PgPool> {
    let failed = || format!("cannot connect to PostgreSQL at {}", redact_url(url));
    let mut options: PgConnectOptions = url.parse().with_context(failed)?;
    if let Some(schema) = schema {
        anyhow::ensure!(
            !schema.is_empty() && schema.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "schema name {schema:?} must be lowercase letters and underscores"
        );
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.clone())
            .await
            .with_context(failed)?;
        // Several instances may start at once: IF NOT EXISTS still races on the catalog's
        // unique index, so a duplicate means another instance made it first.
        match sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .execute(&admin)
            .await
        {
            Ok(_) => {}
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {}
            Err(error) => return Err(error).context(format!("cannot create schema {schema}")),
        }
        admin.close().await;
        options = options.options([("search_path", schema)]);
    }
    pool.connect_with(tune(options)).await.with_context(failed)
}

/// The answer to a request whose statement failed, with the cause logged and not sent: 503
/// with `Retry-After` for an outage, 500 without it for a refusal. Every service's `Error`
/// renders its database variant through this, so they all answer alike.
pub fn problem(error: &sqlx::Error) -> Problem {
    match Failure::of(error) {
        Failure::Unavailable => {
            tracing::error!(%error, "storage is unreachable");
            Problem::unavailable("storage is unavailable; nothing was changed", 1)
        }
        Failure::Refused => {
            tracing::error!(%error, "storage refused a statement");
            Problem::internal()
        }
    }
}

/// What a failed statement says about retrying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database could not be reached or could not run the statement now: retry later.
    Unavailable,
    /// The database refused this statement; it will refuse it again.
    Refused,
}

impl Failure {
    /// Sorts `error` into a retryable outage or a refusal.
    pub fn of(error: &sqlx::Error) -> Self {
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            // A connection cut mid-message surfaces as a protocol error.
            | sqlx::Error::Protocol(_) => Self::Unavailable,
            sqlx::Error::Database(db) => match db.code() {
                Some(code) if refused_class(&code) => Self::Refused,
                // Connection exceptions (08), rollbacks a retry resolves (40: serialization,
                // deadlock), insufficient resources (53), operator intervention (57: admin
                // shutdown, statement timeout), system errors (58), a database that is gone
                // or not yet created (3D) or a login refused (28) while it is recreated.
                _ => Self::Unavailable,
            },
            _ => Self::Refused,
        }
    }

    /// True when a retry may succeed.
    pub fn is_retryable(self) -> bool {
        self == Self::Unavailable
    }
}

/// SQLSTATE classes that describe the statement, not the server's condition.
fn refused_class(code: &str) -> bool {
    matches!(
        code.get(..2),
        Some(
            "0A" // feature not supported
            | "21" // cardinality violation
            | "22" // data exception (U+0000 in text or jsonb, out of range, bad encoding)
            | "23" // integrity constraint violation
            | "25" // invalid transaction state
            | "2F" | "38" | "39" // routine exceptions
            | "42" // syntax error or access rule violation
            | "44" // WITH CHECK OPTION violation
            | "54" // program limit exceeded
        )
    )
}

#[cfg(test)]
mod tests {
    use axum::{http::StatusCode, response::IntoResponse as _};

    use super::*;

    #[test]
    fn an_outage_is_a_503_with_retry_after() {
        let response = problem(&sqlx::Error::PoolTimedOut).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
    }

    #[test]
    fn a_refusal_is_a_500_without_retry_after() {
        let response = problem(&sqlx::Error::RowNotFound).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers().get("retry-after").is_none());
    }

    #[test]
    fn outages_are_retryable_and_refusals_are_not() {
        assert!(Failure::of(&sqlx::Error::PoolTimedOut).is_retryable());
        assert!(Failure::of(&sqlx::Error::PoolClosed).is_retryable());
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(Failure::of(&sqlx::Error::Io(reset)).is_retryable());
        assert!(!Failure::of(&sqlx::Error::RowNotFound).is_retryable());
    }

    #[test]
    fn statement_classes_are_refusals() {
        for code in ["22P05", "22021", "23505", "42601", "54000"] {
            assert!(refused_class(code), "{code}");
        }
        for code in ["08006", "40001", "53300", "57P01", "3D000", "XX000"] {
            assert!(!refused_class(code), "{code}");
        }
    }
}
