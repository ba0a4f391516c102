//! Path parameters read so that a bad one is answered like a missing resource.

use axum::{
    extract::{FromRequestParts, Path},
    http::request::Parts,
};
use uuid::Uuid;

use crate::problem::Problem;

/// A path segment that must be a UUID; 404 otherwise (no such resource can exist), also when
/// it does not even decode (`%ff`), which axum's own rejection would answer in plain text.
#[derive(Debug, Clone, Copy)]
pub struct PathUuid(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathUuid {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Ok(Path(raw)) = Path::<String>::from_request_parts(parts, state).await else {
            return Err(Problem::not_found());
        };
        Uuid::parse_str(&raw)
            .map(Self)
            .map_err(|_| Problem::not_found())
    }
}
