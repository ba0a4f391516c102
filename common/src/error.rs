//! The error type of the services' HTTP handlers, shared so every service answers a failure
//! the same way: a client fault is the 4xx [`Problem`] it was phrased as; a database failure is
//! answered by [`crate::database::problem`] (503 with `Retry-After` for an outage, 500 for a
//! refusal); anything else is a 500. The cause of a 5xx is logged, never sent.
//!
//! A service re-exports it as its own `error::Error`, and adds `From` impls for its own
//! input errors (the notifier's `Invalid`, say), so handlers use `?` throughout.

use axum::response::{IntoResponse, Response};

use crate::{problem::Problem, storable::Unstorable};

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
            Self::Database(error) => crate::database::problem(&error),
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

    use super::*;

    #[test]
    fn each_failure_gets_its_status() {
        let refused = Error::from(Problem::not_found()).into_response();
        assert_eq!(refused.status(), StatusCode::NOT_FOUND);
        let outage = Error::from(sqlx::Error::PoolTimedOut).into_response();
        assert_eq!(outage.status(), StatusCode::SERVICE_UNAVAILABLE);
        let bug = Error::from(anyhow::anyhow!("secret cause")).into_response();
        assert_eq!(bug.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
