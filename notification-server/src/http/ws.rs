//! `GET /v1/ws`: authentication before the upgrade, then one task per connection.
//!
//! The task owns the socket and waits on four things at once: the hub cancelling it
//! (shutdown, slow consumer, resync), a frame in its send queue, a frame from the client,
//! and its next timer (heartbeat or token expiry). Writes have a deadline, so a peer that
//! stops reading cannot hold the task for ever; the queue in front of it is bounded, so such
//! a peer is cut off by the hub long before.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use axum::{
    extract::{
        Query, State,
        rejection::QueryRejection,
        ws::{
            CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade,
            rejection::WebSocketUpgradeRejection,
        },
    },
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use common::{
    auth::{Claims, bearer},
    problem::Problem,
};
use tokio_util::task::task_tracker::TaskTrackerToken;
use uuid::Uuid;

use super::{AppState, unauthorized};
use crate::{
    hub::Registration,
    metrics::{Metrics, Reason},
    notification::{Frame, UserId},
    protocol::{ClientFrame, ConnectParams, ServerFrame, close, parse_client_frame},
};

/// How long the recovered ids are remembered to drop live duplicates of them: live frames
/// published before the recovery query ran arrive within this, even through Redis.
const DEDUP_WINDOW: Duration = Duration::from_secs(30);
/// How long a closing handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Read buffer per connection; tungstenite's default is 128 KiB, allocated up front for
/// every connection. Client frames are small (pings), and the buffer grows to fit a larger
/// one, so a small buffer costs nothing but memory saved: each 1 KiB here is ~19 MB at
/// 19,000 connections.
const READ_BUFFER: usize = 512;

/// Settings of WebSocket connections.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Most connections at once.
    pub max_connections: usize,
    /// Ping interval.
    pub heartbeat_interval: Duration,
    /// How long a ping may go unanswered.
    pub heartbeat_timeout: Duration,
    /// Deadline of one write.
    pub write_timeout: Duration,
    /// Largest client message.
    pub max_client_frame: usize,
    /// Average client frames per second.
    pub client_frames_per_second: u32,
    /// Client frame burst.
    pub client_frame_burst: u32,
    /// Most notifications one recovery replays.
    pub recovery_limit: usize,
}

/// Authenticates, then upgrades. Refusals are problem+json and never upgrade.
pub async fn upgrade(
    State(state): State<AppState>,
    query: Result<Query<ConnectParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
) -> Response {
    let refuse = |reason: &'static str| {
        Metrics::count(&state.metrics.connections_refused, reason);
    };
    let Query(params) = match query {
        Ok(query) => query,
        Err(rejection) => {
            refuse("bad_request");
            return Problem::malformed(format!(
                "bad query: {}; this endpoint takes token and last_id (a notification id)",
                rejection.body_text()
            ))
            .into_response();
        }
    };
    let Some(token) = bearer(&headers).map(str::to_owned).or(params.token) else {
        refuse("unauthenticated");
        return unauthorized(None);
    };
    let now = chrono::Utc::now().timestamp();
    let claims = match state.verifier.verify(&token, now) {
        // The verifier allows clock leeway past `exp`; a connection would be closed with
        // 4001 at once, and a client retrying with the same token would loop. Refuse it.
        Ok(claims) if claims.exp <= now => {
            refuse("invalid_token");
            return unauthorized(Some(common::auth::TokenError::Expired));
        }
        Ok(claims) => claims,
        Err(error) => {
            refuse("invalid_token");
            return unauthorized(Some(error));
        }
    };
    let Ok(user) = UserId::parse(&claims.sub) else {
        refuse("invalid_token");
        return Problem::invalid_field("sub", "the token's subject is not a valid user id")
            .into_response();
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            refuse("not_websocket");
            return Problem::new(
                StatusCode::UPGRADE_REQUIRED,
                "websocket-required",
                "WebSocket upgrade required",
                format!(
                    "this endpoint speaks WebSocket only: {}",
                    rejection.body_text()
                ),
            )
            .into_response();
        }
    };
    let hub = state.notifier.hub();
    if hub.is_shutting_down() || !state.ready.load(std::sync::atomic::Ordering::Acquire) {
        refuse("shutting_down");
        return Problem::unavailable("shutting down; connect to another node", 1).into_response();
    }
    if hub.connections() >= state.ws.max_connections {
        refuse("capacity");
        return Problem::unavailable("this node is at its connection limit", 5).into_response();
    }
    let settings = &state.ws;
    let token = state.connections.token();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(settings.max_client_frame)
        .max_frame_size(settings.max_client_frame)
        .on_failed_upgrade(|error| tracing::debug!(%error, "upgrade failed"))
        .on_upgrade(move |socket| connection(socket, state, claims, user, params.last_id, token))
}

async fn connection(
    mut socket: WebSocket,
    state: AppState,
    claims: Claims,
    user: UserId,
    last_id: Option<Uuid>,
    _tracked: TaskTrackerToken,
) {
    let hub = std::sync::Arc::clone(state.notifier.hub());
    let mut registration = hub.register(&user);
    state.metrics.connections.inc();
    state.metrics.connections_opened.inc();
    let id = registration.id;
    tracing::debug!(%user, connection = id, "connected");

    let mut conn = Connection {
        socket: &mut socket,
        state: &state,
        user: &user,
        claims: &claims,
    };
    let outcome = conn.run(&mut registration, last_id).await;
    hub.unregister(&user, id);
    drop(registration);

    let code = match outcome {
        Outcome::Close(code) => {
            close_gracefully(&mut socket, code).await;
            Some(code)
        }
        Outcome::Gone => None,
    };
    let label = code.map_or("client", close::label);
    state.metrics.connections.dec();
    state
        .metrics
        .connections_closed
        .get_or_create(&Reason { reason: label })
        .inc();
    tracing::debug!(%user, connection = id, reason = label, "disconnected");
}

/// How a connection ends.
enum Outcome {
    /// The server closes with this code.
    Close(u16),
    /// The client left, or the socket broke; nothing more to send.
    Gone,
}

struct Connection<'a> {
    socket: &'a mut WebSocket,
    state: &'a AppState,
    user: &'a UserId,
    claims: &'a Claims,
}

impl Connection<'_> {
    async fn run(&mut self, registration: &mut Registration, last_id: Option<Uuid>) -> Outcome {
        let settings = &*self.state.ws;
        let welcome = ServerFrame::Welcome {
            user_id: self.user.as_str(),
            connection_id: registration.id,
            heartbeat_interval_ms: settings.heartbeat_interval.as_millis() as u64,
            token_expires_at: self.claims.exp,
        };
        if !self.send(welcome.encode().into()).await {
            return Outcome::Gone;
        }

        // Registered first, then recovered: whatever is committed after the query below is
        // also queued live, so nothing falls between; duplicates are dropped by id.
        let mut recovered: HashSet<Uuid> = HashSet::new();
        if let Some(last_id) = last_id {
            match self.recover(last_id, &mut recovered).await {
                Ok(true) => {}
                Ok(false) => return Outcome::Gone,
                Err(code) => return Outcome::Close(code),
            }
        }
        let dedup_until = Instant::now() + DEDUP_WINDOW;

        let mut bucket = TokenBucket::new(
            settings.client_frames_per_second,
            settings.client_frame_burst,
        );
        let expires = token_deadline(self.claims.exp);
        let mut next_ping = tokio::time::Instant::now() + settings.heartbeat_interval;
        let mut awaiting_pong: Option<tokio::time::Instant> = None;
        let mut armed = next_ping.min(expires);
        let timer = tokio::time::sleep_until(armed);
        tokio::pin!(timer);
        // One waiter for the whole connection, not one registered and dropped per frame.
        let cancelled = registration.cancel.clone().cancelled_owned();
        tokio::pin!(cancelled);

        loop {
            let deadline = awaiting_pong
                .map_or(next_ping, |sent| sent + settings.heartbeat_timeout)
                .min(expires);
            // Re-arming takes the timer driver's lock: do it only when the deadline moved,
            // not for every frame (a broadcast wakes thousands of these loops at once).
            if deadline != armed {
                timer.as_mut().reset(deadline);
                armed = deadline;
            }
            // The queue comes first: a connection the hub kicked has its close code set
            // before its token is cancelled, so the atomic check below catches it without
            // polling the token, whose every poll takes two locks (3.4 % of the service's
            // CPU in a broadcast, by `perf record` during `loadtest notify --quick`).
            tokio::select! {
                biased;
                frame = registration.rx.recv() => {
                    let Some(frame) = frame else {
                        return Outcome::Close(close::INTERNAL_ERROR);
                    };
                    if let code @ 1.. = registration.close_code() {
                        return Outcome::Close(code);
                    }
                    if !recovered.is_empty() {
                        if Instant::now() > dedup_until {
                            recovered = HashSet::new();
                        } else if recovered.contains(&frame.id) {
                            continue;
                        }
                    }
                    if !self.send(frame.text.clone()).await {
                        return Outcome::Gone;
                    }
                }
                () = &mut cancelled => {
                    let code = match registration.close_code() {
                        0 => close::GOING_AWAY,
                        code => code,
                    };
                    return Outcome::Close(code);
                }
                message = self.socket.recv() => {
                    let message = match message {
                        None => return Outcome::Gone,
                        Some(Ok(message)) => message,
                        Some(Err(error)) => return read_error(error),
                    };
                    awaiting_pong = None;
                    if let Some(outcome) = self.on_client_message(message, &mut bucket).await {
                        return outcome;
                    }
                }
                () = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if now >= expires {
                        return Outcome::Close(close::TOKEN_EXPIRED);
                    }
                    if let Some(sent) = awaiting_pong {
                        if now >= sent + settings.heartbeat_timeout {
                            return Outcome::Close(close::HEARTBEAT_TIMEOUT);
                        }
                    } else if now >= next_ping {
                        if !self.send_message(Message::Ping(Default::default())).await {
                            return Outcome::Gone;
                        }
                        awaiting_pong = Some(now);
                        next_ping = now + settings.heartbeat_interval;
                    }
                }
            }
        }
    }

    /// Replays what the user missed after `last_id`. `Ok(false)`: the client is gone.
    async fn recover(&mut self, last_id: Uuid, recovered: &mut HashSet<Uuid>) -> Result<bool, u16> {
        let limit = self.state.ws.recovery_limit;
        let missed = match self
            .state
            .notifier
            .store()
            .since(self.user, last_id, limit + 1)
            .await
        {
            Ok(missed) => missed,
            Err(error) => {
                tracing::error!(%error, user = %self.user, "recovery query failed");
                return Err(close::INTERNAL_ERROR);
            }
        };
        // One more than the limit was asked for, to tell "exactly the limit" from "more".
        let complete = missed.len() <= limit;
        let count = missed.len().min(limit);
        for notification in &missed[..count] {
            recovered.insert(notification.id);
            if !self.send(Frame::encode(notification).text.clone()).await {
                return Ok(false);
            }
        }
        self.state.metrics.recovered.inc_by(count as u64);
        let done = ServerFrame::Recovered { count, complete };
        Ok(self.send(done.encode().into()).await)
    }

    async fn on_client_message(
        &mut self,
        message: Message,
        bucket: &mut TokenBucket,
    ) -> Option<Outcome> {
        if matches!(message, Message::Close(_)) {
            return Some(Outcome::Gone);
        }
        if !bucket.take() {
            Metrics::count(&self.state.metrics.client_frames_refused, "rate_limited");
            return Some(Outcome::Close(close::RATE_LIMITED));
        }
        let reply = match message {
            Message::Text(text) => match parse_client_frame(text.as_str()) {
                Ok(ClientFrame::Ping { nonce }) => ServerFrame::Pong {
                    nonce: nonce.as_deref(),
                }
                .encode(),
                Err(error) => {
                    Metrics::count(&self.state.metrics.client_frames_refused, error.code);
                    ServerFrame::Error {
                        code: error.code,
                        detail: &error.detail,
                    }
                    .encode()
                }
            },
            Message::Binary(_) => {
                Metrics::count(
                    &self.state.metrics.client_frames_refused,
                    "binary_unsupported",
                );
                ServerFrame::Error {
                    code: "binary_unsupported",
                    detail: "this protocol speaks JSON text frames only",
                }
                .encode()
            }
            // tungstenite answers pings itself; a pong is proof of life, already noted.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => return None,
        };
        if self.send(reply.into()).await {
            None
        } else {
            Some(Outcome::Gone)
        }
    }

    async fn send(&mut self, text: Utf8Bytes) -> bool {
        self.send_message(Message::Text(text)).await
    }

    async fn send_message(&mut self, message: Message) -> bool {
        let timeout = self.state.ws.write_timeout;
        matches!(
            tokio::time::timeout(timeout, self.socket.send(message)).await,
            Ok(Ok(()))
        )
    }
}

/// Oversized frames close with 1009; any other read error means the socket is done.
fn read_error(error: axum::Error) -> Outcome {
    let inner = error.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => Outcome::Close(close::TOO_BIG),
        Some(tungstenite::Error::Protocol(_)) => Outcome::Close(close::POLICY_VIOLATION),
        _ => {
            tracing::debug!(error = %inner, "socket read failed");
            Outcome::Gone
        }
    }
}

/// Sends the close frame and waits briefly for the client's, so the close is clean.
async fn close_gracefully(socket: &mut WebSocket, code: u16) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(close::reason(code)),
    };
    let handshake = async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// The token's `exp` as a Tokio instant (far in the future when it is absurdly far).
fn token_deadline(exp: i64) -> tokio::time::Instant {
    let left = exp.saturating_sub(chrono::Utc::now().timestamp()).max(0) as u64;
    tokio::time::Instant::now() + Duration::from_secs(left.min(10 * 365 * 24 * 3600))
}

/// A token bucket for client frames.
struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            tokens: burst,
            burst,
            per_second: f64::from(per_second),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(0, 3);
        assert!(bucket.take() && bucket.take() && bucket.take());
        assert!(!bucket.take());
        let mut bucket = TokenBucket::new(1_000_000, 1);
        assert!(bucket.take());
        std::thread::sleep(Duration::from_millis(2));
        assert!(bucket.take());
    }
}
