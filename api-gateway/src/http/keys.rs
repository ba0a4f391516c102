//! `/admin/api-keys`: admins create, list and revoke API keys.
//!
//! Only a user's access token with the `admin` role may call these; an API key may not mint
//! or revoke keys, whatever its roles, so a leaked key cannot make itself a successor. The key
//! itself is returned once, at creation; afterwards only its prefix is shown.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json,
    body::Bytes,
    extract::{ConnectInfo, Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use common::{auth::Claims, http::json_object, problem::Problem, storable::StorableText};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{AppState, gateway};
use crate::{
    audit::Event,
    authn::{Principal, new_api_key},
    error::Result,
    store::{ApiKey, NewApiKey},
};

/// Longest key name.
pub const MAX_NAME_CHARS: usize = 100;
/// Most roles on one key.
pub const MAX_ROLES: usize = 32;
/// Largest quota a key may be given, per window.
pub const MAX_KEY_LIMIT: u64 = 10_000_000;

/// `POST /admin/api-keys`: `{"name", "roles"?, "owner"?, "limit"?: {"limit", "window"}}` →
/// 201 with the key (shown this once).
pub async fn create(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let ip = Some(state.client_ip(peer, &headers));
    let admin = match admin(&state, &headers, ip, "POST /admin/api-keys").await {
        Ok(admin) => admin,
        Err(response) => return response,
    };
    create_key(&state, &headers, body, &admin, ip)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn create_key(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    admin: &Claims,
    ip: Option<std::net::IpAddr>,
) -> Result<Response> {
    let mut object = json_object(headers, body)?;
    let name = match object.remove("name") {
        Some(Value::String(name)) => StorableText::parse("name", name)?,
        Some(_) => return Err(Problem::invalid_field("name", "must be a string").into()),
        None => return Err(Problem::invalid_field("name", "is required").into()),
    };
    if name.trim().is_empty() {
        return Err(Problem::invalid_field("name", "must not be empty").into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(Problem::invalid_field(
            "name",
            format!("must be at most {MAX_NAME_CHARS} characters"),
        )
        .into());
    }
    if name.chars().any(char::is_control) {
        return Err(Problem::invalid_field("name", "must not contain control characters").into());
    }
    let roles = roles(object.remove("roles"))?;
    let owner = match object.remove("owner") {
        None | Some(Value::Null) => admin
            .sub
            .parse::<Uuid>()
            .map_err(|_| Problem::invalid_field("owner", "is required for this caller"))?,
        Some(Value::String(owner)) => owner
            .parse::<Uuid>()
            .map_err(|_| Problem::invalid_field("owner", "must be a user id (UUID)"))?,
        Some(_) => return Err(Problem::invalid_field("owner", "must be a user id (UUID)").into()),
    };
    let limit = limit(object.remove("limit"))?;
    if let Some(unknown) = object.keys().next() {
        return Err(Problem::invalid_field(unknown, "is not a field of this request").into());
    }
    if !state.store.user_exists(owner).await? {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-field",
            "Invalid field",
            "no user has this id",
        )
        .with_field("owner")
        .into());
    }
    let created_by = admin.sub.parse::<Uuid>().unwrap_or(owner);
    let (key, hash) = new_api_key();
    let prefix = &key[..crate::authn::API_KEY_PREFIX.len() + 6];
    let record = state
        .store
        .create_api_key(NewApiKey {
            hash: &hash,
            prefix,
            name: &name,
            owner_id: owner,
            roles: &roles,
            limit,
            created_by,
        })
        .await?;
    state.audit.record(
        Event::new("api_key.create", "success")
            .subject(&admin.sub)
            .ip(ip)
            .detail(format!("key {} for {owner}", record.id)),
    );
    let mut body = describe(&record);
    body["key"] = Value::String(key);
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `?limit=&cursor=` of the list.
#[derive(Debug, Deserialize)]
pub struct Page {
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /admin/api-keys?limit=&cursor=`: keys in creation order, revoked ones included.
pub async fn list(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    query: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let ip = Some(state.client_ip(peer, &headers));
    if let Err(response) = admin(&state, &headers, ip, "GET /admin/api-keys").await {
        return response;
    }
    let result = async {
        let Query(page) = query.map_err(|_| Problem::malformed("the query string is malformed"))?;
        let limit = match page.limit.as_deref() {
            None => 50,
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| Problem::invalid_field("limit", "must be 1 to 100"))?,
        };
        let after =
            match page.cursor.as_deref() {
                None => None,
                Some(text) => Some(text.parse::<Uuid>().map_err(|_| {
                    Problem::invalid_field("cursor", "is not a cursor from this list")
                })?),
            };
        let keys = state.store.list_api_keys(after, limit + 1).await?;
        let more = keys.len() as i64 > limit;
        let items: Vec<Value> = keys.iter().take(limit as usize).map(describe).collect();
        let next = more
            .then(|| keys.get(limit as usize - 1).map(|k| k.id.to_string()))
            .flatten();
        Ok::<_, crate::error::Error>(
            Json(json!({ "items": items, "next_cursor": next })).into_response(),
        )
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /admin/api-keys/{id}`: 204, and the key stops working: at once on this replica,
/// as soon as the Redis message arrives on the others (within `API_KEY_CACHE_TTL` without
/// Redis; a lookup already waiting on PostgreSQL answers its one request and is not cached);
/// 404 for an unknown id.
pub async fn revoke(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Response {
    let ip = Some(state.client_ip(peer, &headers));
    let admin = match admin(&state, &headers, ip, "DELETE /admin/api-keys").await {
        Ok(admin) => admin,
        Err(response) => return response,
    };
    let Some(id) = id.ok().and_then(|Path(id)| id.parse::<Uuid>().ok()) else {
        return Problem::not_found().into_response();
    };
    match state.store.revoke_api_key(id).await {
        Ok(Some(_)) => {
            state.keys.evict(id);
            if let Some(revocations) = &state.revocations {
                revocations.publish(id).await;
            }
            state.audit.record(
                Event::new("api_key.revoke", "success")
                    .subject(&admin.sub)
                    .ip(ip)
                    .detail(format!("key {id}")),
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(None) => Problem::not_found().into_response(),
        Err(error) => error.into_response(),
    }
}

/// The caller, when it is a user with the `admin` role; the refusal otherwise (audited).
async fn admin(
    state: &AppState,
    headers: &HeaderMap,
    ip: Option<std::net::IpAddr>,
    what: &str,
) -> Result<Arc<Claims>, Response> {
    let principal = match state.authenticate(headers, None).await {
        Ok(principal) => principal,
        Err(gateway::Refusal::Unauthenticated(error)) => {
            return Err(state.refuse_unauthenticated(&error, ip, what));
        }
        Err(gateway::Refusal::Unavailable) => {
            return Err(Problem::unavailable("the key store is unavailable", 1).into_response());
        }
    };
    let claims = match &principal {
        Principal::User(claims) if claims.has_role("admin") => Arc::clone(claims),
        _ => {
            return Err(state.refuse_forbidden(
                &principal,
                ip,
                what.to_owned(),
                "managing API keys needs a signed-in admin (API keys cannot manage keys)",
            ));
        }
    };
    let (key, quota) = (format!("user:{}", claims.sub), state.limits.user);
    let decision = state.limiter.check(&key, quota).await;
    if let Some(refused) = state.refuse_over_limit(&decision, Some(&principal), ip, "user", what) {
        return Err(refused);
    }
    Ok(claims)
}

fn roles(value: Option<Value>) -> Result<Vec<String>, Problem> {
    let items = match value {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(Problem::invalid_field(
                "roles",
                "must be an array of strings",
            ));
        }
    };
    if items.len() > MAX_ROLES {
        return Err(Problem::invalid_field(
            "roles",
            format!("must have at most {MAX_ROLES} roles"),
        ));
    }
    let mut roles = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::String(role)
                if (1..=64).contains(&role.len())
                    && role
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b)) =>
            {
                if !roles.contains(&role) {
                    roles.push(role);
                }
            }
            _ => {
                return Err(Problem::invalid_field(
                    "roles",
                    "each role is 1-64 characters of A-Z a-z 0-9 : . _ -",
                ));
            }
        }
    }
    Ok(roles)
}

fn limit(value: Option<Value>) -> Result<Option<(u32, std::time::Duration)>, Problem> {
    let object: Map<String, Value> = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(object)) => object,
        Some(_) => {
            return Err(Problem::invalid_field(
                "limit",
                "must be an object {\"limit\": n, \"window\": \"1m\"}",
            ));
        }
    };
    let count = object
        .get("limit")
        .and_then(Value::as_u64)
        .filter(|n| (1..=MAX_KEY_LIMIT).contains(n))
        .ok_or_else(|| {
            Problem::invalid_field("limit", format!("limit.limit must be 1 to {MAX_KEY_LIMIT}"))
        })?;
    let window = object
        .get("window")
        .and_then(Value::as_str)
        .and_then(|w| common::config::parse_duration(w).ok())
        .filter(|w| {
            (std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(86_400)).contains(w)
        })
        .ok_or_else(|| {
            Problem::invalid_field(
                "limit",
                "limit.window must be a duration from 1s to 1d, like \"1m\"",
            )
        })?;
    if object.len() > 2 {
        return Err(Problem::invalid_field(
            "limit",
            "has fields other than limit and window",
        ));
    }
    let quota = crate::limiter::Quota::new(count as u32, window)
        .map_err(|reason| Problem::invalid_field("limit", reason))?;
    Ok(Some((quota.limit, quota.window)))
}

fn describe(key: &ApiKey) -> Value {
    json!({
        "id": key.id,
        "prefix": key.prefix,
        "name": key.name,
        "owner": key.owner_id,
        "roles": key.roles,
        "limit": key.limit.map(|(limit, window)| json!({ "limit": limit, "window_seconds": window.as_secs() })),
        "created_by": key.created_by,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    })
}
