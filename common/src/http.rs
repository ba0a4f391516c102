//! HTTP plumbing every service stacks the same way: request context, load shedding, serving.
//!
//! A service's router ends with `.layer(from_fn(http::request_context))`, which gives each
//! request an id (kept from `X-Request-Id` or a new UUIDv7, see [`crate::request_id`]), a
//! span naming it, and one access-log line; [`time_limit`] and [`shed_load`] answer 503
//! problem+json for requests that run too long or arrive when too many are in flight.
//! [`serve`] runs the router until the shutdown future fires, then lets in-flight requests
//! finish within a grace period.
//! [`ops::routes`] serves `/healthz`, `/readyz` and `/metrics` for every service.
//! Handlers read their input through [`json_object`] and [`JsonFields`] (bodies) and
//! [`Page`] (list queries), so every service refuses bad input the same way.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{ConnectInfo, MatchedPath, Request, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::{
    problem::Problem,
    request_id::{self, X_REQUEST_ID},
};

pub mod json_fields;
pub mod ops;
pub mod page;
pub mod path;
pub mod query;

pub use json_fields::JsonFields;
pub use page::{Page, PageSize};
pub use path::PathUuid;
pub use query::query_params;

/// Request id, span and access log for every request. Apply with `Router::layer`.
///
/// A plain function returning [`in_request_context`]'s future, not an `async fn` awaiting
/// it: that would store the handler's future a second time.
pub fn request_context(
    request: Request,
    next: Next,
) -> impl Future<Output = Response> + Send + 'static {
    in_request_context(request, |request| next.run(request))
}

/// What [`request_context`] does, around any handler: for a service that dispatches
/// requests itself instead of through a middleware stack.
///
/// The work before the handler is done here and the future returned is the handler's,
/// wrapped once: nesting `async fn`s that each take and await a future stores it twice per
/// level, and the gateway's request future had grown to ~9.7 KB, copied on every request.
pub fn in_request_context<F, Fut>(
    request: Request,
    handle: F,
) -> impl Future<Output = Response> + use<F, Fut>
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let id = request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| request_id::accept_client_id(v))
        .map_or_else(request_id::new, str::to_owned);
    let header_id = HeaderValue::from_str(&id).ok();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
        traceparent = %request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    );
    let started = std::time::Instant::now();

    request_id::scope(
        id,
        async move {
            let mut response = handle(request).await;
            // Server errors are always logged; the rest only at debug, since a service
            // answering 50K requests/s cannot afford a log line for each.
            let status = response.status().as_u16();
            let elapsed_us = started.elapsed().as_micros() as u64;
            if response.status().is_server_error() {
                tracing::warn!(status, elapsed_us, "request failed");
            } else {
                tracing::debug!(status, elapsed_us, "request finished");
            }
            if let Some(value) = header_id {
                response.headers_mut().insert(X_REQUEST_ID.clone(), value);
            }
            response
        }
        .instrument(span),
    )
}

/// Answers 503 for a request still running after `limit`, and drops it. Apply with
/// `Router::route_layer` *before* the metrics layer, so timed-out requests are counted as the
/// 503s they are.
pub async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(?limit, "request timed out");
            Problem::unavailable("the request took longer than the server allows", 1)
                .into_response()
        }
    }
}

/// Bounds the requests handled at once; past the bound, answers 503 with `Retry-After`
/// at once instead of queueing without limit. Apply with `Router::layer`.
pub async fn shed_load(
    State(permits): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    match permits.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            let route = request
                .extensions()
                .get::<MatchedPath>()
                .map_or("unmatched", MatchedPath::as_str);
            tracing::warn!(route, "too many requests in flight, shedding");
            Problem::unavailable(
                "the server is at its in-flight request limit; retry shortly",
                1,
            )
            .into_response()
        }
    }
}

/// Once the grace is over, how long [`serve`] waits for the connections it drops to end
/// (each ends at its next poll, which dropping them schedules).
pub const DROP_WAIT: Duration = Duration::from_millis(100);

/// How [`serve`] treats connections; [`crate::config::ServeSettings::serve_options`] makes one
/// from a service's flags.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Once shutdown starts, how long requests in flight may take to finish.
    pub grace: Duration,
    /// A client must send a request's whole head within this long, from the moment its
    /// connection is accepted or its previous response was sent, or the connection is
    /// closed. axum's own `serve` installs no timer, so without this a client that sends
    /// nothing, or dribbles header bytes (slowloris), holds a connection and a file
    /// descriptor for ever.
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers) accepted; a larger one is answered
    /// 431 and the connection closed. `None`: hyper's buffer limit (about 400 KiB).
    pub max_header_bytes: Option<usize>,
}

/// Serves `service` (a `Router`, or any service of the same shape) over HTTP/1.1 on
/// `listener` until `shutdown` completes, then stops
/// accepting, lets requests in flight finish, and returns once they have or the grace period
/// has passed, whichever comes first. Returns `true` when every connection drained in time;
/// otherwise the connections still open are dropped, with their requests, before it returns,
/// so nothing of theirs runs on after the server has stopped.
///
/// This is axum's accept loop with hyper's HTTP/1 builder used directly (hyper-util's
/// auto-detecting builder first sniffs for HTTP/2 with no timer running), a Tokio timer so the
/// header read timeout applies, and `TCP_NODELAY` on every connection (responses are written
/// whole; Nagle would only hold small ones back behind delayed ACKs). Each request carries the
/// peer's [`ConnectInfo`], and upgrades (WebSocket) are supported.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()> + Send + 'static,
    settings: ServeOptions,
) -> std::io::Result<bool>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    if let Some(bytes) = settings.max_header_bytes {
        builder.max_header_size(bytes);
    }
    // Dropping `stop_tx` tells every connection to finish its request and close; each
    // connection holds a `done_rx`, so `done_tx.closed()` completes when the last one ends.
    let (stop_tx, stop_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    // Dropping `kill_tx` once the grace is over ends every connection still open.
    let (kill_tx, kill_rx) = watch::channel(());
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "failed to set TCP_NODELAY");
        }
        let service = service.clone();
        let service = tower::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            service.clone().oneshot(request)
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let (mut stop_rx, mut kill_rx, done_rx) =
            (stop_rx.clone(), kill_rx.clone(), done_rx.clone());
        tokio::spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop_rx.changed() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        result = connection.as_mut() => result,
                        _ = kill_rx.changed() => Ok(()),
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
            drop(done_rx);
        });
    }

    drop(listener);
    drop(stop_tx);
    drop(done_rx);
    drop(kill_rx);
    tokio::select! {
        () = done_tx.closed() => Ok(true),
        () = tokio::time::sleep(settings.grace) => {
            tracing::warn!(grace = ?settings.grace, "grace period over with requests still in flight; closing them");
            drop(kill_tx);
            let _ = tokio::time::timeout(DROP_WAIT, done_tx.closed()).await;
            Ok(false)
        }
    }
}

/// A JSON request body as an object, or the problem saying why it is not one: 413 past the
/// route's body limit, 415 without `Content-Type: application/json`, 400 for anything that is
/// not a JSON object. Handlers then take fields out of the map and name the one at fault.
pub fn json_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
    let body = read_body(body)?;
    if media_type(headers).as_deref() != Some("application/json") {
        return Err(unsupported_media_type("send the body as application/json"));
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(object)) => Ok(object),
        Ok(_) => Err(Problem::malformed("the body must be a JSON object")),
        Err(error) => Err(Problem::malformed(format!("the body is not JSON: {error}"))),
    }
}

/// A body as read by the `Bytes` extractor, or the problem: 413 past the route's body limit,
/// 400 when it could not be read.
pub fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Problem> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::too_large("the body is larger than MAX_BODY_BYTES")
        } else {
            Problem::malformed(rejection.body_text())
        }
    })
}

/// The request's media type without parameters, lowercased (`application/json` for
/// `Application/JSON; charset=utf-8`); `None` without a readable `Content-Type`.
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
}

/// 415, saying what to send instead.
pub fn unsupported_media_type(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "Unsupported media type",
        detail,
    )
}
