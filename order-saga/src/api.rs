//! What the saga services' handlers share: reading a path id, the query parameters a list
//! takes, and a JSON body, each refused with a 4xx that names what is wrong.

use std::collections::HashMap;

use axum::{body::Bytes, extract::rejection::BytesRejection, http::HeaderMap};
pub use common::http::{PathUuid, query_params};
use common::{
    http::{JsonFields, Page, PageSize, json_object},
    problem::Problem,
};
use uuid::Uuid;

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
