//! `/api/*`: authenticate ([`authn::authenticate`]), authorise, rate-limit, forward.
//!
//! The path was normalised before routing ([`super::normalize_path`]), so the rule matched
//! here and the path the upstream receives are the same string. Each refusal is audited.

use std::net::IpAddr;

use axum::{
    extract::Request,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use common::problem::Problem;

use super::AppState;
use crate::{
    audit::Event,
    authn::{self, AuthnError, Principal, Refusal},
    limiter::{Backend, Decision, Quota},
    proxy::{ForwardedProto, Identity},
};

/// What a 403 on `/api/*` tells the client.
const ROLES_DO_NOT_ALLOW: &str = "your roles do not allow this request";

/// Marks a response that came from an upstream, so gateway-only headers (CSP) leave it be.
#[derive(Debug, Clone, Copy)]
pub struct Proxied;

/// Every proxied request.
pub async fn forward(state: &AppState, mut request: Request) -> Response {
    let ip = state.request_ip(&request);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let what = || format!("{method} {path}");

    let principal = match authn::authenticate(state, request.headers(), request.uri().query()).await
    {
        Ok(principal) => principal,
        Err(Refusal::Unauthenticated(error)) => {
            return state.refuse_unauthenticated(&error, ip, &what());
        }
        Err(Refusal::Unavailable) => {
            return Problem::unavailable("credentials cannot be checked right now", 1)
                .into_response();
        }
    };

    let Some(rule) = state.table.rule(&method, &path) else {
        return state.refuse_forbidden(
            &principal,
            ip,
            format!("no rule: {}", what()),
            ROLES_DO_NOT_ALLOW,
        );
    };
    if !rule.allows(principal.roles()) {
        return state.refuse_forbidden(
            &principal,
            ip,
            format!("{}: {}", rule.name, what()),
            ROLES_DO_NOT_ALLOW,
        );
    }
    let Some(target) = state.table.target(&path) else {
        return Problem::not_found().into_response();
    };

    let (key, quota, policy) = state.quota_for(&principal, rule);
    let decision = state.limiter.check(&key, quota).await;
    if let Some(refused) = state.refuse_over_limit(&decision, Some(&principal), ip, policy, &what())
    {
        return refused;
    }

    let upstream_path = match request.uri().query() {
        Some(query) => format!("{}?{query}", target.path),
        None => target.path.to_owned(),
    };
    let identity = Identity {
        subject: principal.user_id(),
        roles: principal.roles().to_vec(),
        // Only an upstream that verifies tokens itself gets one signed for a key caller; the
        // others trust `X-User-Id`, and one that echoed it would hand it to the caller.
        authorization: match &principal {
            Principal::Key(key) if state.proxy.verifies_tokens(target.upstream) => {
                if crate::proxy::is_websocket_upgrade(request.headers()) {
                    state.key_tokens.authorization_for_socket(key)
                } else {
                    state.key_tokens.authorization(key)
                }
            }
            Principal::User(_) | Principal::Key(_) => None,
        },
    };
    // Only the exception is marked: `http` is what the proxy sends when nothing says more,
    // and an extension costs an allocation on every request.
    let scheme = state.request_scheme(&request);
    if scheme != "http" {
        request.extensions_mut().insert(ForwardedProto(scheme));
    }
    let upstream = target.upstream.to_owned();
    let mut response = state
        .proxy
        .forward(&upstream, &upstream_path, request, &identity)
        .await;
    decision.write_headers(policy, response.headers_mut());
    response.extensions_mut().insert(Proxied);
    response
}

impl AppState {
    /// The limiter key, quota and policy name for `principal` on `rule`: a route with a
    /// quota of its own is counted apart; otherwise the caller's default applies (an API key's
    /// own quota, or the default for keys or users).
    fn quota_for(
        &self,
        principal: &Principal,
        rule: &crate::routes::Rule,
    ) -> (String, Quota, &'static str) {
        let (base, default, policy) = match principal {
            Principal::User(claims) => (format!("user:{}", claims.sub), self.limits.user, "user"),
            Principal::Key(key) => (
                format!("key:{}", key.id),
                // Creation refuses a quota past 2^53 µs; one stored before that check keeps
                // its own, counted a little inexactly at the very boundary (the script's
                // doubles), rather than falling silently to the default.
                key.limit
                    .map_or(self.limits.api_key, |(limit, window)| Quota {
                        limit,
                        window,
                    }),
                "api-key",
            ),
        };
        match rule.limit {
            Some(route) => (format!("{base}:route:{}", rule.name), route, "route"),
            None => (base, default, policy),
        }
    }

    /// 401 for `error` (with its challenge), audited and counted; `what` names the request.
    pub fn refuse_unauthenticated(
        &self,
        error: &AuthnError,
        ip: Option<IpAddr>,
        what: &str,
    ) -> Response {
        self.audit.record(
            Event::new("authenticate", "failure")
                .ip(ip)
                .detail(format!("{}: {what}", error.reason())),
        );
        self.metrics().count_refusal("unauthenticated");
        authn::unauthenticated(error)
    }

    /// 403 telling the client `detail`, audited with `audit_detail` and counted.
    pub fn refuse_forbidden(
        &self,
        principal: &Principal,
        ip: Option<IpAddr>,
        audit_detail: String,
        detail: &'static str,
    ) -> Response {
        self.audit.record(
            Event::new("authorize", "denied")
                .subject(principal.subject())
                .ip(ip)
                .detail(audit_detail),
        );
        self.metrics().count_refusal("forbidden");
        Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail).into_response()
    }

    /// The response for a request the limiter did not admit, if it did not.
    pub fn refuse_over_limit(
        &self,
        decision: &Decision,
        principal: Option<&Principal>,
        ip: Option<IpAddr>,
        policy: &str,
        what: &str,
    ) -> Option<Response> {
        if decision.allowed {
            return None;
        }
        if decision.backend == Backend::Closed {
            // The limiter tries Redis again after its probe interval, which the decision
            // carries as its retry.
            let retry = decision.retry_after.map_or(1, |wait| {
                u32::try_from(wait.as_secs().max(1)).unwrap_or(u32::MAX)
            });
            return Some(
                Problem::unavailable("rate limits cannot be checked right now", retry)
                    .into_response(),
            );
        }
        let mut event = Event::new("rate_limit", "limited")
            .ip(ip)
            .detail(format!("{policy}: {what}"));
        if let Some(principal) = principal {
            event = event.subject(principal.subject());
        }
        self.audit.record(event);
        self.metrics().count_refusal("rate_limited");
        Some(too_many_requests(decision, policy))
    }
}

/// 429 with the limiter's headers and `Retry-After`.
pub fn too_many_requests(decision: &Decision, policy: &str) -> Response {
    let mut response = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "Too many requests",
        "the rate limit for this caller is used up; retry after the time in Retry-After",
    )
    .into_response();
    decision.write_headers(policy, response.headers_mut());
    response
}
