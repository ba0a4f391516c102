//! The notifier's one error type: what a request can fail with, and how each failure is
//! answered.
//!
//! Client faults are 4xx naming what is wrong. A database that cannot be reached is a 503
//! with `Retry-After`, since a retry may succeed; a statement the database refused is a 500
//! without it, since a retry cannot (the edge should have refused the input; see
//! [`common::storable`]). The cause of a 5xx is logged, never sent.

use axum::response::{IntoResponse, Response};
use common::{database::Failure, problem::Problem, storable::Unstorable};

use crate::notification::Invalid;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the input is not acceptable: 422 naming it.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// Any other client fault, already phrased for the client (400, 403, 404, ...).
    #[error("{}", .0.detail)]
    Refused(Problem),
    /// PostgreSQL failed: 503 when it is unreachable, 500 when it refused the statement.
    #[error("storage failed: {0}")]
    Database(#[from] sqlx::Error),
    /// Anything else that should not happen: 500.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// The notifier's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Problem> for Error {
    fn from(problem: Problem) -> Self {
        Self::Refused(problem)
    }
}

impl From<Unstorable> for Error {
    fn from(unstorable: Unstorable) -> Self {
        Self::Invalid(Invalid::new(unstorable.field(), unstorable.detail()))
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match self {
            Self::Invalid(invalid) => Problem::invalid_field(&invalid.field, invalid.detail),
            Self::Refused(problem) => problem,
            Self::Database(error) if Failure::of(&error).is_retryable() => {
                tracing::error!(%error, "storage is unreachable");
                Problem::unavailable("storage is unavailable; nothing was changed", 1)
            }
            Self::Database(error) => {
                tracing::error!(%error, "storage refused a statement");
                Problem::internal()
            }
            Self::Unexpected(error) => {
                tracing::error!(error = format!("{error:#}"), "request failed");
                Problem::internal()
            }
        }
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use sqlx::Connection as _;

    use super::*;

    #[tokio::test]
    async fn a_statement_postgresql_refuses_is_a_500_without_retry_after() {
        let mut db = sqlx::PgConnection::connect(&test_support::test_database_url())
            .await
            .expect("PostgreSQL must be running (scripts/test starts it)");
        let refused = sqlx::query("SELECT $1::text")
            .bind("nul\0")
            .execute(&mut db)
            .await
            .unwrap_err();
        let response = Error::from(refused).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers().get("retry-after").is_none());
    }

    #[test]
    fn an_unreachable_database_is_a_503_with_retry_after() {
        let response = Error::from(sqlx::Error::PoolTimedOut).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
    }
}
