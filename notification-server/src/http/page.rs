//! `GET /`: a small page to try the service from a browser.

use axum::{
    http::{HeaderValue, header},
    response::{Html, IntoResponse, Response},
};

const PAGE: &str = include_str!("../../static/index.html");

/// The demo page: paste a token, connect, watch notifications arrive, reconnect with recovery.
pub async fn index() -> Response {
    let mut response = Html(PAGE).into_response();
    let headers = response.headers_mut();
    // Inline script and style only, and WebSocket/fetch back to this origin.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
