//! The gateway's one error type for its own endpoints (`/auth/*`, `/admin/*`): what a request
//! can fail with, and how each failure is answered.
//!
//! Client faults are 4xx naming what is wrong. A database that cannot be reached is a 503
//! with `Retry-After`, since a retry may succeed; a statement the database refused is a 500
//! without it, since a retry cannot (the edge should have refused the input; see
//! [`common::storable`]). The cause of a 5xx is logged, never sent. Proxied requests answer
//! with the upstream's status and are not this type's concern.

use axum::response::{IntoResponse, Response};
use common::{database, problem::Problem, storable::Unstorable};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A client fault, already phrased for the client (400, 401, 403, 404, 409, 422, ...).
    #[error("{}", .0.detail)]
    Refused(Problem),
    /// PostgreSQL failed: 503 when it is unreachable, 500 when it refused the statement.
    #[error("storage failed: {0}")]
    Database(#[from] sqlx::Error),
    /// Anything else that should not happen: 500.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// The gateway's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Problem> for Error {
    fn from(problem: Problem) -> Self {
        Self::Refused(problem)
    }
}

impl From<Unstorable> for Error {
    fn from(unstorable: Unstorable) -> Self {
        Self::Refused(unstorable.into())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match self {
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
