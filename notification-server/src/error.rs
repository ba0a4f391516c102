//! The notifier's one error type: what a request can fail with, and how each failure is
//! answered.
//!
//! Client faults are 4xx naming what is wrong. A database that cannot be reached is a 503
//! with `Retry-After`, since a retry may succeed; a statement the database refused is a 500
//! without it, since a retry cannot (the edge should have refused the input; see
//! [`common::storable`]). The cause of a 5xx is logged, never sent.

use axum::response::{IntoResponse, Response};
use common::{database, problem::Problem, storable::Unstorable};

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
            Self::Database(error) => database::problem(&error),
            Self::Unexpected(error) => {
                tracing::error!(error = format!("{error:#}"), "request failed");
                Problem::internal()
            }
        }
        .into_response()
    }
}
