//! One request's way through the proxy: rewrite its headers, bound its body, pick a target on
//! the ring, send it with a response-head timeout, retry idempotent methods on the next
//! target, and stream the answer back (or splice a WebSocket).
//!
//! The hot path holds no lock across an await (breaker locks are taken for a few
//! instructions), builds no metric label set, and streams bodies; only a request that may be
//! retried with a body has it buffered, since a stream cannot be replayed.
//!
//! The upstream's timeout runs from when it last had something to do: from the send, or
//! for a streamed body from its last frame. A slow upload is no fault of the target; a
//! client whose body stops arriving for the timeout gets 408 and the target's breaker is not
//! told. A target that stops reading the body it is sent is timed out as usual.

use std::{
    error::Error as StdError,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request},
    http::{Method, StatusCode, Version, header, uri::PathAndQuery},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use common::problem::Problem;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::{body::Body as _, upgrade::OnUpgrade};

use super::{
    ErrorKind, Identity, Upstream,
    breaker::{Admission, Breaker, Ticket},
    headers,
    ring::{Ring, Walk},
    websocket::Tunnels,
};

/// The request body as each attempt needs it.
enum Payload {
    /// No body (most GETs): nothing to buffer or replay.
    Empty,
    /// Buffered because the request may be retried.
    Buffered(Bytes),
    /// Streamed through the body limit, to a single attempt.
    Stream(Option<Body>),
}

impl Payload {
    /// The body of one attempt, and for a streamed one, how far its upload has got.
    fn for_attempt(&mut self, limit: usize) -> (Body, Option<Arc<Upload>>) {
        match self {
            Self::Empty => (Body::empty(), None),
            Self::Buffered(bytes) => (Body::from(bytes.clone()), None),
            Self::Stream(body) => match body.take() {
                Some(body) => {
                    let upload = Arc::new(Upload::new());
                    let body = Body::new(Tracked {
                        inner: Limited::new(body, limit),
                        upload: Arc::clone(&upload),
                    });
                    (body, Some(upload))
                }
                None => (Body::empty(), None),
            },
        }
    }
}

/// How far a streamed request body has got, as the client connection sends it and the
/// upstream connection takes it.
struct Upload {
    origin: Instant,
    /// µs after `origin` of the last frame passed on (or of the end).
    activity: AtomicU64,
    /// The whole body has been passed on.
    finished: AtomicBool,
    /// The upstream connection asked for the next frame and the client has not sent it.
    waiting_on_client: AtomicBool,
}

impl Upload {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            activity: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            waiting_on_client: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let micros = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.activity.store(micros, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.origin + Duration::from_micros(self.activity.load(Ordering::Relaxed))
    }

    /// Whether the client is the one holding the request up: it has not sent the rest of
    /// the body that the upstream connection is waiting for.
    fn client_stalled(&self) -> bool {
        !self.finished.load(Ordering::Relaxed) && self.waiting_on_client.load(Ordering::Relaxed)
    }
}

/// A request body that reports its progress to an [`Upload`].
struct Tracked<B> {
    inner: B,
    upload: Arc<Upload>,
}

impl<B> hyper::body::Body for Tracked<B>
where
    B: hyper::body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let upload = &self.upload;
        match &polled {
            Poll::Pending => upload.waiting_on_client.store(true, Ordering::Relaxed),
            Poll::Ready(frame) => {
                if frame.is_none() {
                    upload.finished.store(true, Ordering::Relaxed);
                }
                upload.touch();
                upload.waiting_on_client.store(false, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// How waiting for a response head ended.
enum Head<T> {
    Answered(T),
    /// The target had the timeout to answer after its last work and did not.
    UpstreamTimeout,
    /// The client's body stopped arriving for the timeout.
    ClientStalled,
}

/// Waits for `response` until `timeout` after the send or, while `upload` makes progress,
/// after its last frame.
async fn wait_for_head<F: Future>(
    response: F,
    timeout: Duration,
    sent: Instant,
    upload: Option<&Upload>,
) -> Head<F::Output> {
    tokio::pin!(response);
    let mut deadline = sent + timeout;
    loop {
        match tokio::time::timeout_at(deadline.into(), response.as_mut()).await {
            Ok(output) => return Head::Answered(output),
            Err(_) => {
                let Some(upload) = upload else {
                    return Head::UpstreamTimeout;
                };
                let later = upload.last_activity() + timeout;
                if later > Instant::now() {
                    deadline = later;
                } else if upload.client_stalled() {
                    return Head::ClientStalled;
                } else {
                    return Head::UpstreamTimeout;
                }
            }
        }
    }
}

/// A breaker admission that is given back if nobody reports an outcome (the client went
/// away while the request was in flight), so a half-open probe slot is never lost.
struct Permit<'a> {
    breaker: &'a Breaker,
    ticket: Option<Ticket>,
}

impl Permit<'_> {
    fn record(mut self, success: bool) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker.record(ticket, success, Instant::now());
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker.release(ticket);
        }
    }
}

/// Methods that may be sent twice (RFC 9110 §9.2.2), minus TRACE, which the gateway does
/// not forward anywhere it matters.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// See [`super::Proxy::forward`].
pub(super) async fn forward(
    pool: &Upstream,
    tunnels: &Tunnels,
    path_and_query: &str,
    request: Request,
    identity: &Identity,
) -> Response {
    let settings = &pool.settings;
    let (mut parts, body) = request.into_parts();

    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > settings.max_body_bytes as u64) {
        return too_large(pool);
    }
    let Ok(path) = PathAndQuery::try_from(path_and_query) else {
        return Problem::malformed("the request path is not valid").into_response();
    };

    let client_upgrade = if headers::is_websocket_upgrade(&parts.headers) {
        parts.extensions.remove::<OnUpgrade>()
    } else {
        None
    };
    let websocket = client_upgrade.is_some();

    let mut headers = std::mem::take(&mut parts.headers);
    // Room for what is added below (identity, request id, traceparent, forwarding), so the
    // map, sized for the client's headers, grows once rather than rehashing as they go in.
    headers.reserve(8);
    headers::strip_hop_by_hop(&mut headers, websocket);
    if headers::set_identity(&mut headers, &identity.subject, &identity.roles).is_err() {
        tracing::error!(upstream = %settings.name, "the subject cannot be sent as a header value");
        return Problem::internal().into_response();
    }
    if let Some(authorization) = &identity.authorization {
        headers.insert(axum::http::header::AUTHORIZATION, authorization.clone());
    }
    headers::set_request_id(&mut headers);
    headers::set_traceparent(&mut headers);
    let client_ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let scheme = parts
        .extensions
        .get::<super::ForwardedProto>()
        .map_or("http", |proto| proto.0);
    headers::set_forwarded(&mut headers, client_ip, scheme);

    let max_attempts = if is_idempotent(&parts.method) {
        1 + (settings.retries as usize).min(pool.targets.len() - 1)
    } else {
        1
    };
    let mut payload = if body.is_end_stream() {
        Payload::Empty
    } else if max_attempts > 1 {
        match Limited::new(body, settings.max_body_bytes).collect().await {
            Ok(collected) => Payload::Buffered(collected.to_bytes()),
            Err(error) if error.is::<LengthLimitError>() => return too_large(pool),
            Err(_) => return unreadable_body(),
        }
    } else {
        Payload::Stream(Some(body))
    };

    let mut walk = pool.ring.walk(Ring::hash(&identity.subject));
    let mut retry_at = None;
    let mut next = admit_next(pool, &mut walk, &mut retry_at);
    let mut attempts_left = max_attempts;
    let mut last_error = None;
    while let Some((index, ticket)) = next.take() {
        attempts_left -= 1;
        let target = &pool.targets[index];
        let permit = Permit {
            breaker: &target.breaker,
            ticket: Some(ticket),
        };
        let more = attempts_left > 0;
        let (body, upload) = payload.for_attempt(settings.max_body_bytes);
        let mut upstream_request = hyper::Request::new(body);
        *upstream_request.method_mut() = parts.method.clone();
        *upstream_request.uri_mut() = target.uri(path.clone());
        *upstream_request.version_mut() = Version::HTTP_11;
        // The last possible attempt takes the headers; an earlier one sends a copy, since the
        // client consumes the request and gives nothing back on failure.
        *upstream_request.headers_mut() = if more {
            headers.clone()
        } else {
            std::mem::take(&mut headers)
        };

        let sent = Instant::now();
        let outcome = wait_for_head(
            pool.client.request(upstream_request),
            settings.timeout,
            sent,
            upload.as_deref(),
        )
        .await;
        let kind = match outcome {
            Head::Answered(Ok(response)) => {
                pool.metrics.duration.observe(sent.elapsed().as_secs_f64());
                let status = response.status();
                pool.metrics.response(status.as_u16());
                let failed = matches!(
                    status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                );
                permit.record(!failed);
                if failed && more {
                    next = admit_next(pool, &mut walk, &mut retry_at);
                    if next.is_some() {
                        pool.metrics.retries.inc();
                        continue;
                    }
                }
                return respond(pool, tunnels, response, client_upgrade);
            }
            Head::Answered(Err(error)) => match classify(&error) {
                Classified::BodyTooLarge => {
                    drop(permit);
                    return too_large(pool);
                }
                Classified::ClientBody => {
                    drop(permit);
                    return unreadable_body();
                }
                Classified::Upstream(kind) => {
                    tracing::warn!(
                        upstream = %settings.name,
                        target = %target.url,
                        error = %ErrorChain(&error),
                        "upstream request failed"
                    );
                    kind
                }
            },
            Head::ClientStalled => {
                drop(permit);
                return Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request-timeout",
                    "Request timeout",
                    "the request body stopped arriving",
                )
                .into_response();
            }
            Head::UpstreamTimeout => {
                tracing::warn!(
                    upstream = %settings.name,
                    target = %target.url,
                    timeout = ?settings.timeout,
                    "upstream did not send a response head in time"
                );
                ErrorKind::Timeout
            }
        };
        pool.metrics.error(kind);
        permit.record(false);
        last_error = Some(kind);
        if more {
            next = admit_next(pool, &mut walk, &mut retry_at);
            if next.is_some() {
                pool.metrics.retries.inc();
            }
        }
    }

    let unavailable = format!("upstream {} unavailable", settings.name);
    match last_error {
        Some(ErrorKind::Timeout) => Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "gateway-timeout",
            "Gateway timeout",
            unavailable,
        )
        .into_response(),
        Some(_) => Problem::new(
            StatusCode::BAD_GATEWAY,
            "bad-gateway",
            "Bad gateway",
            unavailable,
        )
        .into_response(),
        None => {
            let now = Instant::now();
            let secs = retry_at.map_or(1, |at: Instant| {
                at.saturating_duration_since(now).as_secs_f64().ceil() as u32
            });
            Problem::unavailable(unavailable, secs.max(1)).into_response()
        }
    }
}

/// The next target clockwise that is healthy and whose breaker admits a request, noting in
/// `retry_at` the earliest moment a skipped one may take requests again.
fn admit_next(
    pool: &Upstream,
    walk: &mut Walk<'_>,
    retry_at: &mut Option<Instant>,
) -> Option<(usize, Ticket)> {
    let now = Instant::now();
    let mut note = |at: Instant| {
        if retry_at.is_none_or(|earliest| at < earliest) {
            *retry_at = Some(at);
        }
    };
    for index in walk.by_ref() {
        let target = &pool.targets[index];
        if !target.healthy.load(std::sync::atomic::Ordering::Relaxed) {
            note(now + pool.settings.health_interval);
            continue;
        }
        match target.breaker.try_acquire(now) {
            Admission::Admitted(ticket) => return Some((index, ticket)),
            Admission::Refused { retry_at } => note(retry_at),
        }
    }
    None
}

/// Turns the upstream's response into the client's: hop-by-hop headers removed, body
/// streamed, or for a WebSocket 101 the two connections spliced.
fn respond(
    pool: &Upstream,
    tunnels: &Tunnels,
    mut response: hyper::Response<hyper::body::Incoming>,
    client_upgrade: Option<OnUpgrade>,
) -> Response {
    let status = response.status();
    let mut headers = std::mem::take(response.headers_mut());
    // Room for the rate-limit and security headers and the request id added on the way out.
    headers.reserve(10);
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(&mut headers, switching && client_upgrade.is_some());

    let body = if switching {
        match (
            client_upgrade,
            response.extensions_mut().remove::<OnUpgrade>(),
        ) {
            (Some(client), Some(upstream)) => {
                tunnels.spawn(&pool.settings.name, client, upstream);
                Body::empty()
            }
            _ => {
                // A 101 the client did not ask for cannot be relayed.
                tracing::warn!(upstream = %pool.settings.name, "unexpected 101 from upstream");
                pool.metrics.error(ErrorKind::Protocol);
                return Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "bad-gateway",
                    "Bad gateway",
                    format!("upstream {} unavailable", pool.settings.name),
                )
                .into_response();
            }
        }
    } else {
        let errors = pool.metrics.errors[ErrorKind::Body as usize].clone();
        Body::new(response.into_body().map_err(move |error| {
            errors.inc();
            error
        }))
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// What a client error says about whom to blame.
enum Classified {
    /// The request body passed `max_body_bytes` while streaming.
    BodyTooLarge,
    /// The client's body stream failed (it went away mid-upload): not the target's fault.
    ClientBody,
    /// The target failed.
    Upstream(ErrorKind),
}

fn classify(error: &hyper_util::client::legacy::Error) -> Classified {
    let mut timed_out = false;
    let mut user = false;
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(cause) = source {
        if cause.is::<LengthLimitError>() {
            return Classified::BodyTooLarge;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
        }
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            user |= hyper.is_user();
            timed_out |= hyper.is_timeout();
        }
        source = cause.source();
    }
    if error.is_connect() {
        Classified::Upstream(if timed_out {
            ErrorKind::Timeout
        } else {
            ErrorKind::Connect
        })
    } else if user {
        Classified::ClientBody
    } else if timed_out {
        Classified::Upstream(ErrorKind::Timeout)
    } else {
        Classified::Upstream(ErrorKind::Protocol)
    }
}

/// An error with its causes, for one log field (hyper's own messages are terse).
struct ErrorChain<'a>(&'a (dyn StdError + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

fn too_large(pool: &Upstream) -> Response {
    Problem::too_large(format!(
        "the body is larger than the {} bytes this route accepts",
        pool.settings.max_body_bytes
    ))
    .into_response()
}

fn unreadable_body() -> Response {
    Problem::malformed("the request body could not be read to its end").into_response()
}
