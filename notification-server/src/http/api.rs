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
    http::{JsonFields, Page, PageSize, json_fields::string, json_object},
    problem::Problem,
    storable::{StorableJson, StorableText},
};
use serde_json::{Value, json};
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
/// The page sizes of every list here.
const PAGE_SIZE: PageSize = PageSize {
    default: DEFAULT_LIMIT,
    max: MAX_LIMIT,
};

/// `POST /v1/notifications`: `{"user_ids": [...], "type", "title", "message", "data"?}`.
pub async fn send_to_users(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    caller.require(&[ROLE_SENDER], "sending notifications")?;
    let mut fields = JsonFields::from(json_object(&headers, body)?);
    let users = take_user_ids(&mut fields, state.notifier.max_recipients())?;
    let content = take_content(fields)?;
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
    let fields = JsonFields::from(json_object(&headers, body)?);
    let content = take_content(fields)?;
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
    let page = page_params(&query, |raw| {
        Uuid::parse_str(raw).map_err(|_| "must be the id of a notification (a UUID)".into())
    })?;
    let page = state
        .notifier
        .get_history(&user, page.limit, page.cursor)
        .await?;
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
    let page = page_params(&query, UserId::parse)?;
    let page = state
        .notifier
        .store()
        .members(&group, page.cursor.as_ref(), page.limit)
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

/// `limit` and `cursor`; any other parameter is refused by name.
fn page_params<C>(
    query: &HashMap<String, String>,
    parse_cursor: impl FnOnce(&str) -> Result<C, String>,
) -> Result<Page<C>, Problem> {
    if let Some(unknown) = query
        .keys()
        .find(|k| !matches!(k.as_str(), "limit" | "cursor"))
    {
        return Err(Problem::malformed(format!(
            "unknown query parameter {unknown:?}; this endpoint takes limit and cursor"
        ))
        .with_field(unknown.clone()));
    }
    Page::parse(
        query.get("limit").map(String::as_str),
        query.get("cursor").map(String::as_str),
        PAGE_SIZE,
        parse_cursor,
    )
}

fn take_user_ids(fields: &mut JsonFields, max: usize) -> Result<Vec<UserId>, Problem> {
    let value = fields.required("user_ids", Ok)?;
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

fn take_content(mut fields: JsonFields) -> Result<Content> {
    let kind = fields.required("type", string)?;
    let title = fields.required("title", string)?;
    let message = fields.required("message", string)?;
    let data = fields.nullable("data", |value| match value {
        Value::Object(data) => Ok(data),
        _ => Err("must be a JSON object".to_owned()),
    })?;
    fields.finish("a notification")?;
    // Text PostgreSQL cannot store is refused here, naming the field, before the store.
    let kind = StorableText::parse("type", kind)?;
    let title = StorableText::parse("title", title)?;
    let message = StorableText::parse("message", message)?;
    let data = data
        .map(|data| StorableJson::parse_object("data", data))
        .transpose()?;
    let content = Content {
        kind,
        title,
        message,
        data,
    };
    content.validate()?;
    Ok(content)
}
