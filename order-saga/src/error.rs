//! The one error type of the saga services' HTTP handlers, and how each failure is answered.
//!
//! Client faults are 4xx naming what is wrong; a database failure is answered by
//! [`common::database::problem`] (503 with `Retry-After` for an outage, 500 for a refusal);
//! the cause of a 5xx is logged, never sent.

use axum::response::{IntoResponse, Response};
use common::{database, problem::Problem, storable::Unstorable};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A client fault, already phrased for the client.
    #[error("{}", .0.detail)]
    Refused(Problem),
    /// PostgreSQL failed.
    #[error("storage failed: {0}")]
    Database(#[from] sqlx::Error),
    /// Anything else that should not happen: 500.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// A handler's result.
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
