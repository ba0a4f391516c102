//! `/admin/api-keys`: admins create, list and revoke API keys.
//!
//! Only a user's access token with the `admin` role may call these ([`crate::authn::Admin`]);
//! an API key may not mint or revoke keys, whatever its roles, so a leaked key cannot make
//! itself a successor. The key itself is returned once, at creation; afterwards only its
//! prefix is shown.

use std::net::SocketAddr;

use axum::{
    Json,
    body::Bytes,
    extract::{ConnectInfo, Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use common::{
    auth::Claims,
    http::{JsonFields, Page, PageSize, json_fields::string, json_object},
    problem::Problem,
};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use self::new_key::{KeyName, KeyQuota, KeyRoles, owner_id};
use super::AppState;
use crate::{
    audit::Event,
    authn::{Admin, new_api_key},
    error::Result,
    store::{ApiKey, NewApiKey},
};

mod new_key;

/// Longest key name.
pub const MAX_NAME_CHARS: usize = 100;
/// Most roles on one key.
pub const MAX_ROLES: usize = 32;
/// Largest quota a key may be given, per window.
pub const MAX_KEY_LIMIT: u64 = 10_000_000;
/// Page sizes of the key list.
const PAGE_SIZE: PageSize = PageSize {
    default: 50,
    max: 100,
};

/// `POST /admin/api-keys`: `{"name", "roles"?, "owner"?, "limit"?: {"limit", "window"}}` →
/// 201 with the key (shown this once).
pub async fn create(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Admin(admin): Admin,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let ip = Some(state.client_ip(peer, &headers));
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
    let mut fields = JsonFields::from(json_object(headers, body)?);
    let name = fields.required("name", |value| KeyName::parse(string(value)?))?;
    let roles = fields
        .optional("roles", KeyRoles::parse)?
        .unwrap_or_default();
    let owner = match fields.nullable("owner", owner_id)? {
        Some(owner) => owner,
        None => admin
            .sub
            .parse::<Uuid>()
            .map_err(|_| Problem::invalid_field("owner", "is required for this caller"))?,
    };
    let quota = fields.nullable("limit", KeyQuota::parse)?;
    fields.finish("this request")?;
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
            name: name.as_storable(),
            owner_id: owner,
            roles: roles.as_slice(),
            limit: quota.map(|quota| (quota.0.limit, quota.0.window)),
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

/// `?limit=&cursor=` of the list, as sent.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /admin/api-keys?limit=&cursor=`: keys in creation order, revoked ones included.
pub async fn list(
    State(state): State<AppState>,
    _: Admin,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let Query(query) =
            query.map_err(|_| Problem::malformed("the query string is malformed"))?;
        let page = Page::parse(
            query.limit.as_deref(),
            query.cursor.as_deref(),
            PAGE_SIZE,
            |text| {
                text.parse::<Uuid>()
                    .map_err(|_| "is not a cursor from this list".to_owned())
            },
        )?;
        let (limit, after) = (page.limit as i64, page.cursor);
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
    Admin(admin): Admin,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Response {
    let ip = Some(state.client_ip(peer, &headers));
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
