//! `/auth/login`, `/auth/refresh`, `/auth/logout`.

use std::net::SocketAddr;

use anyhow::Context as _;

use axum::{
    Json,
    body::Bytes,
    extract::{ConnectInfo, Request, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use common::{http::json_object, problem::Problem, storable::StorableText};
use serde_json::{Map, Value, json};

use super::{AppState, Outcome};
use crate::{
    audit::Event,
    error::Result,
    passwords,
    store::{Rotation, User},
    tokens::{hash_refresh_token, new_refresh_token},
};

/// Longest user name.
pub const MAX_USERNAME_CHARS: usize = 64;

/// `POST /auth/login`: `{"username", "password"}` → a token pair.
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let mut object = json_object(&headers, body)?;
    // Both are text the user store reads (the name) or could be asked to keep (a password
    // set elsewhere), so both are refused when PostgreSQL could not hold them.
    let username = take_text(&mut object, "username", MAX_USERNAME_CHARS * 4)?;
    let password = take_text(&mut object, "password", passwords::MAX_PASSWORD_BYTES)?;
    no_more_fields(&object)?;
    if username.chars().count() > MAX_USERNAME_CHARS {
        return Err(Problem::invalid_field(
            "username",
            format!("must be at most {MAX_USERNAME_CHARS} characters"),
        )
        .into());
    }

    let found = state.store.find_user(&username).await?;
    // argon2 runs on the blocking pool: ~20 ms of CPU that must not stall the runtime.
    let (user, valid) = tokio::task::spawn_blocking(move || match found {
        Some((user, hash)) => {
            let valid = passwords::verify(&password, &hash);
            (Some(user), valid)
        }
        None => {
            // Same work for an unknown name as for a wrong password.
            let _ = passwords::verify(&password, passwords::decoy());
            (None, false)
        }
    })
    .await
    .context("the password check panicked")?;
    let user = match user {
        Some(user) if valid => user,
        user => {
            count(&state.metrics().logins, "invalid_credentials");
            // The name is not recorded: a password typed into the name field would be in the
            // trail. A known user is the subject; an unknown name is only said to be unknown.
            let event = Event::new("login", "failure").ip(Some(state.client_ip(peer, &headers)));
            state.audit.record(match user {
                Some(user) => event.subject(user.id.to_string()).detail("wrong password"),
                None => event.detail("unknown user name"),
            });
            return Err(invalid_credentials().into());
        }
    };
    let (refresh, hash) = new_refresh_token();
    let expires = refresh_expiry(&state);
    state.store.start_family(user.id, &hash, expires).await?;
    count(&state.metrics().logins, "success");
    state.audit.record(
        Event::new("login", "success")
            .subject(user.id.to_string())
            .ip(Some(state.client_ip(peer, &headers))),
    );
    token_pair(&state, &user, refresh)
}

/// `POST /auth/refresh`: `{"refresh_token"}` → a new pair; the presented token is spent.
pub async fn refresh(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let presented = refresh_token_body(&headers, body)?;
    let ip = Some(state.client_ip(peer, &headers));
    let (next, next_hash) = new_refresh_token();
    let rotation = state
        .store
        .rotate(
            &hash_refresh_token(&presented),
            &next_hash,
            refresh_expiry(&state),
            state.settings.refresh_race_grace,
        )
        .await?;
    match rotation {
        Rotation::Rotated { user, family_id } => {
            count(&state.metrics().refreshes, "success");
            state.audit.record(
                Event::new("refresh", "success")
                    .subject(user.id.to_string())
                    .ip(ip)
                    .detail(format!("family {family_id}")),
            );
            token_pair(&state, &user, next)
        }
        Rotation::Raced { user_id, family_id } => {
            count(&state.metrics().refreshes, "raced");
            state.audit.record(
                Event::new("refresh", "raced")
                    .subject(user_id.to_string())
                    .ip(ip)
                    .detail(format!("family {family_id}")),
            );
            Err(Problem::new(
                StatusCode::CONFLICT,
                "refresh-raced",
                "Refresh token already rotated",
                "this refresh token was just rotated by a concurrent request; use the pair that request received",
            )
            .into())
        }
        Rotation::Reused { user_id, family_id } => {
            count(&state.metrics().refreshes, "reuse_detected");
            tracing::warn!(
                subject = %user_id,
                family = %family_id,
                "a spent refresh token was presented again; its family is revoked"
            );
            state.audit.record(
                Event::new("refresh", "reuse_detected")
                    .subject(user_id.to_string())
                    .ip(ip)
                    .detail(format!("family {family_id} revoked")),
            );
            Err(invalid_refresh().into())
        }
        Rotation::Invalid => {
            count(&state.metrics().refreshes, "invalid");
            state.audit.record(Event::new("refresh", "failure").ip(ip));
            Err(invalid_refresh().into())
        }
    }
}

/// `POST /auth/logout`: `{"refresh_token"}` → 204; the token's family is revoked.
pub async fn logout(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode> {
    let presented = refresh_token_body(&headers, body)?;
    let revoked = state
        .store
        .revoke_family(&hash_refresh_token(&presented))
        .await?;
    state.metrics().logouts.inc();
    let event = match revoked {
        Some((user_id, family_id)) => Event::new("logout", "success")
            .subject(user_id.to_string())
            .detail(format!("family {family_id}")),
        None => Event::new("logout", "unknown_token"),
    };
    state
        .audit
        .record(event.ip(Some(state.client_ip(peer, &headers))));
    // The same answer for an unknown token: logout reveals nothing about which tokens exist.
    Ok(StatusCode::NO_CONTENT)
}

/// The per-IP quota on `/auth/*`, against password guessing and token stuffing.
pub async fn limit_by_ip(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let ip = state.request_ip(&request);
    let key = crate::client_ip::limit_key(ip);
    let decision = state.limiter.check(&key, state.limits.auth_ip).await;
    let what = request.uri().path().to_owned();
    if let Some(refused) = state.refuse_over_limit(&decision, None, ip, "auth-ip", &what) {
        return refused;
    }
    let mut response = next.run(request).await;
    decision.write_headers("auth-ip", response.headers_mut());
    response
}

fn token_pair(state: &AppState, user: &User, refresh: String) -> Result<Response> {
    let (access, _exp) = state
        .issuer
        .issue(user)
        .context("failed to sign the access token")?;
    let mut response = Json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": state.issuer.access_ttl().as_secs(),
        "refresh_token": refresh,
        "refresh_expires_in": state.settings.refresh_token_ttl.as_secs(),
    }))
    .into_response();
    // RFC 6749 §5.1: token responses must not be cached.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

fn refresh_expiry(state: &AppState) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
        + chrono::Duration::from_std(state.settings.refresh_token_ttl)
            .unwrap_or(chrono::Duration::days(14))
}

fn count(
    family: &prometheus_client::metrics::family::Family<
        Outcome,
        prometheus_client::metrics::counter::Counter,
    >,
    outcome: &'static str,
) {
    family.get_or_create(&Outcome { outcome }).inc();
}

fn invalid_credentials() -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "invalid-credentials",
        "Invalid credentials",
        "the user name or the password is wrong",
    )
}

fn invalid_refresh() -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "invalid-refresh-token",
        "Invalid refresh token",
        "the refresh token is unknown, expired, spent or revoked; log in again",
    )
}

/// The body of `/auth/refresh` and `/auth/logout`: `{"refresh_token"}` and nothing else.
fn refresh_token_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, Problem> {
    let mut object = json_object(headers, body)?;
    let presented = take_string(&mut object, "refresh_token", 256)?;
    no_more_fields(&object)?;
    Ok(presented)
}

/// A text field headed for the user store: [`take_string`], refused when it holds U+0000.
fn take_text(
    object: &mut Map<String, Value>,
    name: &str,
    max_bytes: usize,
) -> Result<StorableText, Problem> {
    Ok(StorableText::parse(
        name,
        take_string(object, name, max_bytes)?,
    )?)
}

fn take_string(
    object: &mut Map<String, Value>,
    name: &str,
    max_bytes: usize,
) -> Result<String, Problem> {
    match object.remove(name) {
        Some(Value::String(s)) if s.is_empty() => {
            Err(Problem::invalid_field(name, "must not be empty"))
        }
        Some(Value::String(s)) if s.len() > max_bytes => Err(Problem::invalid_field(
            name,
            format!("must be at most {max_bytes} bytes"),
        )),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Problem::invalid_field(name, "must be a string")),
        None => Err(Problem::invalid_field(name, "is required")),
    }
}

fn no_more_fields(object: &Map<String, Value>) -> Result<(), Problem> {
    match object.keys().next() {
        Some(unknown) => Err(Problem::invalid_field(
            unknown,
            "is not a field of this request",
        )),
        None => Ok(()),
    }
}
