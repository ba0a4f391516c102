//! What the saga services' handlers share: reading a path id, the query parameters a list
//! takes, and a JSON body, each refused with a 4xx that names what is wrong.

use std::collections::HashMap;

use axum::{
    body::Bytes,
    extract::{FromRequestParts, Path, rejection::BytesRejection},
    http::{HeaderMap, request::Parts},
};
use common::{
    http::{JsonFields, Page, PageSize, json_object},
    problem::Problem,
};
use uuid::Uuid;

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

/// The query string as parameters, refusing any not in `allowed` (400 naming it).
pub fn query_params(
    raw: Option<&str>,
    allowed: &[&str],
) -> Result<HashMap<String, String>, Problem> {
    let mut params = HashMap::new();
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name).ok_or_else(|| {
            Problem::malformed("the query string is not valid percent-encoded UTF-8")
        })?;
        let value = decode(value).ok_or_else(|| {
            Problem::malformed("the query string is not valid percent-encoded UTF-8")
                .with_field(name.clone())
        })?;
        if !allowed.contains(&name.as_str()) {
            return Err(Problem::malformed(format!(
                "unknown query parameter {name:?}; this endpoint takes {}",
                allowed.join(", ")
            ))
            .with_field(name));
        }
        if params.insert(name.clone(), value).is_some() {
            return Err(
                Problem::malformed(format!("query parameter {name:?} is given twice"))
                    .with_field(name),
            );
        }
    }
    Ok(params)
}

/// `limit` and `cursor` (a UUIDv7 id, the last of the previous page) from `params`.
pub fn page(params: &HashMap<String, String>, size: PageSize) -> Result<Page<Uuid>, Problem> {
    Page::parse(
        params.get("limit").map(String::as_str),
        params.get("cursor").map(String::as_str),
        size,
        |raw| Uuid::parse_str(raw).map_err(|_| "must be an id from a previous page".to_owned()),
    )
}

/// A required query parameter that must be a UUID (422 naming it).
pub fn uuid_param(params: &HashMap<String, String>, name: &str) -> Result<Uuid, Problem> {
    let raw = params
        .get(name)
        .ok_or_else(|| Problem::invalid_field(name, "is required"))?;
    Uuid::parse_str(raw).map_err(|_| Problem::invalid_field(name, "must be a UUID"))
}

/// The body as JSON object fields (413, 415 or 400 otherwise).
pub fn fields(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<JsonFields, Problem> {
    json_object(headers, body).map(JsonFields::from)
}

fn decode(raw: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut input = raw.bytes();
    while let Some(byte) = input.next() {
        match byte {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = [input.next()?, input.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
            }
            other => bytes.push(other),
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_decoded_and_strangers_refused() {
        let params = query_params(Some("limit=5&cursor=a%2Fb+c"), &["limit", "cursor"]).unwrap();
        assert_eq!(params["cursor"], "a/b c");
        let refused = query_params(Some("limt=5"), &["limit"]).unwrap_err();
        assert_eq!(refused.field.as_deref(), Some("limt"));
        assert!(query_params(Some("limit=%ff"), &["limit"]).is_err());
        assert!(query_params(Some("limit=%4"), &["limit"]).is_err());
        assert!(query_params(Some("limit=1&limit=2"), &["limit"]).is_err());
    }
}
