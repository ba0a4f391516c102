//! Who is calling: an access token (`Authorization: Bearer`) or an API key (`X-API-Key`).
//!
//! [`authenticate`] is the one check. The proxied `/api/*` pipeline calls it directly
//! (plain function calls, see [`crate::http`]); the gateway's own endpoints take a
//! [`Principal`] or an [`Admin`] as an axum extractor, which calls it and answers the
//! refusal itself, audited and counted like the pipeline's. `caches` holds what makes the
//! check cheap: tokens that verified, keys found recently, and the tokens signed for key
//! callers to take upstream.

mod caches;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{ConnectInfo, FromRequestParts, MatchedPath},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{
    auth::{Claims, TokenError},
    problem::Problem,
};
use sha2::{Digest, Sha256};

pub use self::caches::{KEY_TOKEN_TTL, KeyCache, KeyTokens, TokenCache};
use crate::{
    http::{AppState, Shared},
    store::ApiKey,
};

/// The authenticated caller.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A user, by access token.
    User(Arc<Claims>),
    /// An API key, acting for its owner with its own roles.
    Key(Arc<ApiKey>),
}

impl Principal {
    /// The subject for logs, audit and upstreams: the user id, or `key:<id>`.
    pub fn subject(&self) -> String {
        match self {
            Self::User(claims) => claims.sub.clone(),
            Self::Key(key) => format!("key:{}", key.id),
        }
    }

    /// The user upstreams act for: the token's subject, or the key's owner.
    pub fn user_id(&self) -> String {
        match self {
            Self::User(claims) => claims.sub.clone(),
            Self::Key(key) => key.owner_id.to_string(),
        }
    }

    /// Roles for RBAC.
    pub fn roles(&self) -> &[String] {
        match self {
            Self::User(claims) => &claims.roles,
            Self::Key(key) => &key.roles,
        }
    }
}

/// Why a caller is not authenticated; the reason goes to logs, audit and metrics only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// No credentials at all.
    #[error("no credentials")]
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("unsupported authorization scheme")]
    Scheme,
    /// The token was refused.
    #[error("invalid token: {0}")]
    Token(TokenError),
    /// No live key matches.
    #[error("unknown or revoked API key")]
    UnknownKey,
    /// Both a token and a key: ambiguous, refused.
    #[error("both a token and an API key")]
    Both,
    /// A token the gateway signed for an API-key caller's upstream, presented to the gateway.
    #[error("a token signed for an upstream, not for the gateway")]
    UpstreamOnly,
}

impl AuthnError {
    /// A short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Scheme => "scheme",
            Self::Token(error) => error.reason(),
            Self::UnknownKey => "unknown_api_key",
            Self::Both => "ambiguous",
            Self::UpstreamOnly => "upstream_only_token",
        }
    }
}

/// Why a request is not authenticated.
pub enum Refusal {
    /// Bad or missing credentials: 401.
    Unauthenticated(AuthnError),
    /// The key store cannot be asked: 503.
    Unavailable,
}

/// The caller of a request, from `Authorization: Bearer` or `X-API-Key`; WebSocket
/// upgrades may carry the token as `?token=` (browsers cannot set headers there).
pub async fn authenticate(
    state: &Shared,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Principal, Refusal> {
    let bearer = headers.get(header::AUTHORIZATION);
    let key = headers.get("x-api-key");
    let now = chrono::Utc::now().timestamp();
    match (bearer, key) {
        (Some(_), Some(_)) => Err(Refusal::Unauthenticated(AuthnError::Both)),
        (Some(value), None) => {
            let token = common::auth::bearer_token(value)
                .ok_or(Refusal::Unauthenticated(AuthnError::Scheme))?;
            verify_user_token(&state.tokens, token, now)
        }
        (None, Some(value)) => {
            let presented = value
                .to_str()
                .map_err(|_| Refusal::Unauthenticated(AuthnError::UnknownKey))?;
            if !presented.starts_with(API_KEY_PREFIX) || presented.len() > 128 {
                return Err(Refusal::Unauthenticated(AuthnError::UnknownKey));
            }
            match state.keys.find(&state.store, presented).await {
                Ok(Some(key)) => Ok(Principal::Key(key)),
                Ok(None) => Err(Refusal::Unauthenticated(AuthnError::UnknownKey)),
                Err(error) => {
                    tracing::error!(%error, "API key lookup failed");
                    Err(Refusal::Unavailable)
                }
            }
        }
        (None, None) => {
            let token = crate::proxy::is_websocket_upgrade(headers)
                .then(|| query_token(query?))
                .flatten()
                .ok_or(Refusal::Unauthenticated(AuthnError::Missing))?;
            verify_user_token(&state.tokens, &token, now)
        }
    }
}

/// A user's access token. One the gateway signed for an API-key caller to take upstream
/// is refused here: presented back, it would make the key its owner's session, past the
/// key's quota and its revocation, and through the rule that keys never manage keys.
fn verify_user_token(tokens: &TokenCache, token: &str, now: i64) -> Result<Principal, Refusal> {
    let claims = tokens
        .verify(token, now)
        .map_err(|e| Refusal::Unauthenticated(AuthnError::Token(e)))?;
    if crate::tokens::is_upstream_only(&claims) {
        return Err(Refusal::Unauthenticated(AuthnError::UpstreamOnly));
    }
    Ok(Principal::User(claims))
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Response;

    /// The caller by its headers (never `?token=`, which is for WebSocket upgrades); a 401,
    /// audited and counted, or a 503 when the key store cannot be asked.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        match authenticate(state, &parts.headers, None).await {
            Ok(principal) => Ok(principal),
            Err(Refusal::Unauthenticated(error)) => {
                Err(state.refuse_unauthenticated(&error, client_ip(parts, state), &action(parts)))
            }
            Err(Refusal::Unavailable) => {
                Err(Problem::unavailable("the key store is unavailable", 1).into_response())
            }
        }
    }
}

/// A user with the `admin` role, signed in with an access token, within the user's rate
/// limit. An API key never qualifies, whatever its roles, so a leaked key cannot mint or
/// revoke keys and make itself a successor. The admin endpoints are the API-key ones, and
/// the 403 says so.
#[derive(Debug, Clone)]
pub struct Admin(pub Arc<Claims>);

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let (ip, what) = (client_ip(parts, state), action(parts));
        let claims = match &principal {
            Principal::User(claims) if claims.has_role("admin") => Arc::clone(claims),
            _ => {
                return Err(state.refuse_forbidden(
                    &principal,
                    ip,
                    what,
                    "managing API keys needs a signed-in admin (API keys cannot manage keys)",
                ));
            }
        };
        let (key, quota) = (format!("user:{}", claims.sub), state.limits.user);
        let decision = state.limiter.check(&key, quota).await;
        if let Some(refused) =
            state.refuse_over_limit(&decision, Some(&principal), ip, "user", &what)
        {
            return Err(refused);
        }
        Ok(Self(claims))
    }
}

/// The client's address, when `common::http::serve` recorded the peer.
fn client_ip(parts: &Parts, state: &AppState) -> Option<std::net::IpAddr> {
    let ConnectInfo(peer) = parts.extensions.get::<ConnectInfo<SocketAddr>>()?;
    Some(state.client_ip(*peer, &parts.headers))
}

/// What a refusal names in the audit trail: the method and the resource the route manages,
/// its path up to the first parameter (`DELETE /admin/api-keys` for
/// `/admin/api-keys/{id}`).
fn action(parts: &Parts) -> String {
    let path = parts
        .extensions
        .get::<MatchedPath>()
        .map_or(parts.uri.path(), MatchedPath::as_str);
    let resource = path.split_once("/{").map_or(path, |(resource, _)| resource);
    format!("{} {resource}", parts.method)
}

/// `?token=` from a query string (the name the notifier reads too, since the query is
/// forwarded as it is).
fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == "token")
            .then(|| value.to_owned())
            .filter(|v| !v.is_empty())
    })
}

/// 401 with the challenge RFC 6750 asks for.
pub fn unauthenticated(error: &AuthnError) -> Response {
    let (challenge, detail) = match error {
        AuthnError::Missing => (
            r#"Bearer realm="api-gateway""#,
            "send an access token (Authorization: Bearer) or an API key (X-API-Key)",
        ),
        AuthnError::Both => (
            r#"Bearer realm="api-gateway", error="invalid_request""#,
            "send an access token or an API key, not both",
        ),
        AuthnError::Scheme => (
            r#"Bearer realm="api-gateway", error="invalid_request""#,
            "the Authorization header must be `Bearer <token>`",
        ),
        AuthnError::Token(_) => (
            r#"Bearer realm="api-gateway", error="invalid_token""#,
            "the access token is invalid or expired",
        ),
        AuthnError::UpstreamOnly => (
            r#"Bearer realm="api-gateway", error="invalid_token""#,
            "this token was signed for an upstream on an API key's behalf; send the API key",
        ),
        AuthnError::UnknownKey => (
            r#"Bearer realm="api-gateway""#,
            "the API key is unknown or revoked",
        ),
    };
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "Authentication required",
        detail,
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// The prefix every API key starts with, so leaked keys are recognisable by scanners.
pub const API_KEY_PREFIX: &str = "gwk_";

/// A new API key (256 random bits) and its SHA-256.
pub fn new_api_key() -> (String, [u8; 32]) {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let key = format!("{API_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_api_key(&key);
    (key, hash)
}

/// SHA-256 of a presented key.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_random_prefixed_and_hashed() {
        let (a, hash) = new_api_key();
        let (b, _) = new_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with(API_KEY_PREFIX));
        assert_eq!(a.len(), API_KEY_PREFIX.len() + 43);
        assert_eq!(hash_api_key(&a), hash);
    }
}
