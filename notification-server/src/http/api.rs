//! The JSON endpoints: send, broadcast, history, membership.

use std::collections::HashMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use common::{
    http::json_object,
    problem::Problem,
    storable::{StorableJson, StorableText},
};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{AppState, Caller, ROLE_SENDER, ROLE_SUPPORT, forbidden};
use crate::{
    error::Result,
    notification::{Content, GroupId, UserId},
    service::Sent,
};

/// History page size when `limit` is absent.
pub const DEFAULT_LIMIT: usize = 20;
/// Largest history page.
pub const MAX_LIMIT: usize = 100;

/// `POST /v1/notifications`: `{"user_ids": [...], "type", "title", "message", "data"?}`.
pub async fn send_to_users(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    caller.require(&[ROLE_SENDER], "sending notifications")?;
    let mut object = json_object(&headers, body)?;
    let users = take_user_ids(&mut object, state.notifier.max_recipients())?;
    let content = take_content(object)?;
    let sent = state.notifier.send_to_users(users, content).await?;
    Ok(created(sent))
}

/// `POST /v1/groups/{group}/notifications`: `{"type", "title", "message", "data"?}`.
pub async fn broadcast_to_group(
    State(state): State<AppState>,
    caller: Caller,
    Path(group): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    caller.require(&[ROLE_SENDER], "broadcasting")?;
    let group = path_id(&group, "group", GroupId::parse)?;
    let object = json_object(&headers, body)?;
    let content = take_content(object)?;
    let sent = state.notifier.broadcast_to_group(&group, content).await?;
    Ok(created(sent))
}

/// `GET /v1/users/{user}/notifications?limit=&cursor=`: newest first.
pub async fn history(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response> {
    let user = path_id(&user, "user", UserId::parse)?;
    if caller.0.sub != user.as_str() && !caller.has_any(&[ROLE_SUPPORT]) {
        return Err(forbidden(
            "users may read only their own history unless they hold `support` or `admin`",
        )
        .into());
    }
    let (limit, cursor) = page_params(&query, |raw| {
        Uuid::parse_str(raw).map_err(|_| "must be the id of a notification (a UUID)".into())
    })?;
    let page = state.notifier.get_history(&user, limit, cursor).await?;
    Ok(Json(json!({
        "notifications": page.notifications,
        "next_cursor": page.next_cursor,
    }))
    .into_response())
}

/// `PUT /v1/groups/{group}/members/{user}`: 201 when added, 204 when already a member.
pub async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((group, user)): Path<(String, String)>,
) -> Result<StatusCode> {
    caller.require(&[], "managing groups")?;
    let group = path_id(&group, "group", GroupId::parse)?;
    let user = path_id(&user, "user", UserId::parse)?;
    let added = state.notifier.store().add_member(&group, &user).await?;
    Ok(if added {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    })
}

/// `DELETE /v1/groups/{group}/members/{user}`: 204, or 404 when not a member.
pub async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((group, user)): Path<(String, String)>,
) -> Result<StatusCode> {
    caller.require(&[], "managing groups")?;
    let group = path_id(&group, "group", GroupId::parse)?;
    let user = path_id(&user, "user", UserId::parse)?;
    let removed = state.notifier.store().remove_member(&group, &user).await?;
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-a-member",
            "Not a member",
            format!("{user} is not a member of {group}"),
        )
        .into())
    }
}

/// `GET /v1/groups/{group}/members?limit=&cursor=`: in user id order.
pub async fn members(
    State(state): State<AppState>,
    caller: Caller,
    Path(group): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response> {
    caller.require(&[], "listing group members")?;
    let group = path_id(&group, "group", GroupId::parse)?;
    let (limit, cursor) = page_params(&query, UserId::parse)?;
    let page = state
        .notifier
        .store()
        .members(&group, cursor.as_ref(), limit)
        .await?;
    let next_cursor = page.more.then(|| page.members.last().cloned()).flatten();
    Ok(Json(json!({ "members": page.members, "next_cursor": next_cursor })).into_response())
}

fn created(sent: Sent) -> Response {
    (
        StatusCode::CREATED,
        Json(json!({
            "notification": sent.notification,
            "recipients": sent.recipients,
        })),
    )
        .into_response()
}

fn path_id<T>(raw: &str, what: &str, parse: fn(&str) -> Result<T, String>) -> Result<T, Problem> {
    parse(raw).map_err(|detail| Problem::invalid_field(what, format!("{what} id {detail}")))
}

fn page_params<C>(
    query: &HashMap<String, String>,
    parse_cursor: impl Fn(&str) -> Result<C, String>,
) -> Result<(usize, Option<C>), Problem> {
    if let Some(unknown) = query
        .keys()
        .find(|k| !matches!(k.as_str(), "limit" | "cursor"))
    {
        return Err(Problem::malformed(format!(
            "unknown query parameter {unknown:?}; this endpoint takes limit and cursor"
        ))
        .with_field(unknown.clone()));
    }
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                Problem::invalid_field("limit", format!("must be an integer from 1 to {MAX_LIMIT}"))
            })?,
    };
    let cursor = match query.get("cursor") {
        None => None,
        Some(raw) => {
            Some(parse_cursor(raw).map_err(|detail| Problem::invalid_field("cursor", detail))?)
        }
    };
    Ok((limit, cursor))
}

fn take_user_ids(object: &mut Map<String, Value>, max: usize) -> Result<Vec<UserId>, Problem> {
    let Some(value) = object.remove("user_ids") else {
        return Err(Problem::invalid_field("user_ids", "is required"));
    };
    let Value::Array(items) = value else {
        return Err(Problem::invalid_field(
            "user_ids",
            "must be an array of user ids",
        ));
    };
    if items.is_empty() {
        return Err(Problem::invalid_field(
            "user_ids",
            "must name at least one user",
        ));
    }
    if items.len() > max {
        return Err(Problem::invalid_field(
            "user_ids",
            format!("at most {max} users per notification; got {}", items.len()),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("user_ids[{i}]");
            let raw = item
                .as_str()
                .ok_or_else(|| Problem::invalid_field(&field, "must be a string"))?;
            UserId::parse(raw).map_err(|detail| Problem::invalid_field(&field, detail))
        })
        .collect()
}

fn take_content(mut object: Map<String, Value>) -> Result<Content> {
    let mut text = |name: &str| -> Result<StorableText, Problem> {
        match object.remove(name) {
            Some(Value::String(s)) => Ok(StorableText::parse(name, s)?),
            Some(_) => Err(Problem::invalid_field(name, "must be a string")),
            None => Err(Problem::invalid_field(name, "is required")),
        }
    };
    let kind = text("type")?;
    let title = text("title")?;
    let message = text("message")?;
    let data = match object.remove("data") {
        None | Some(Value::Null) => None,
        Some(Value::Object(data)) => Some(StorableJson::parse_object("data", data)?),
        Some(_) => return Err(Problem::invalid_field("data", "must be a JSON object").into()),
    };
    if let Some(unknown) = object.keys().next() {
        return Err(Problem::invalid_field(unknown, "is not a field of a notification").into());
    }
    let content = Content {
        kind,
        title,
        message,
        data,
    };
    content.validate()?;
    Ok(content)
}
