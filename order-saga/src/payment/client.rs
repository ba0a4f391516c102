//! The payment service's client for the external provider, built so that a customer is
//! never charged twice and a sick provider is not hammered.
//!
//! Every call carries an `Idempotency-Key` derived from the order and the operation
//! (`order-<uuid>-authorize`), so any repeat is safe: the provider answers it from the first
//! call. Each attempt has a time limit; transport errors, time-outs and 5xx are retried with
//! exponential backoff and full jitter; a decline or another 4xx is an answer, not retried.
//! After an attempt whose fate is unknown (a time-out, a connection lost mid-call) the client
//! first asks the provider what became of the key, and only sends again if nothing was made.
//! A [`common::breaker::Breaker`] (the gateway's) guards every request: once the provider has
//! failed often enough in a row, calls fail at once with [`PaymentError::CircuitOpen`].

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use common::{
    breaker::{Admission, Breaker, BreakerSettings, Ticket},
    config::parse_duration,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rand::Rng;
use reqwest::{RequestBuilder, StatusCode, Url};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

/// How the client reaches the provider and how patient it is; flattened into the payment
/// service's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderClientSettings {
    /// Base URL of the payment provider.
    #[arg(long, env = "PROVIDER_URL", default_value = "http://127.0.0.1:8089")]
    pub provider_url: Url,
    /// Longest one attempt may take (connect, send, answer).
    #[arg(long, env = "PROVIDER_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub provider_timeout: Duration,
    /// Attempts per call, the first included, before it fails as unavailable.
    #[arg(long, env = "PROVIDER_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub provider_attempts: u32,
    /// Backoff before the first retry; each later one may wait twice as long (full jitter).
    #[arg(long, env = "PROVIDER_BACKOFF", default_value = "100ms", value_parser = parse_duration)]
    pub provider_backoff: Duration,
    /// Longest backoff between two attempts.
    #[arg(long, env = "PROVIDER_BACKOFF_MAX", default_value = "2s", value_parser = parse_duration)]
    pub provider_backoff_max: Duration,
    /// Consecutive failed requests that open the breaker. Twenty in a row happen by chance
    /// about once in 3·10¹⁶ requests at a 15 % failure rate, so it opens when the provider is
    /// down, not on its ordinary bad luck (five did, in `loadtest orders`' fault phase).
    #[arg(long, env = "PROVIDER_BREAKER_FAILURES", default_value_t = 20)]
    pub provider_breaker_failures: u32,
    /// How long an open breaker fails calls at once before it lets a probe through.
    /// Each opening refuses every call, so it is short: one probe every two seconds costs a
    /// provider that is down nothing.
    #[arg(long, env = "PROVIDER_BREAKER_OPEN_FOR", default_value = "2s", value_parser = parse_duration)]
    pub provider_breaker_open_for: Duration,
}

impl ProviderClientSettings {
    /// Settings for a provider at `url`, with the defaults above.
    pub fn new(url: Url) -> Self {
        Self {
            provider_url: url,
            provider_timeout: Duration::from_secs(2),
            provider_attempts: 4,
            provider_backoff: Duration::from_millis(100),
            provider_backoff_max: Duration::from_secs(2),
            provider_breaker_failures: 20,
            provider_breaker_open_for: Duration::from_secs(2),
        }
    }

    fn breaker(&self) -> BreakerSettings {
        BreakerSettings {
            failures: self.provider_breaker_failures,
            open_for: self.provider_breaker_open_for,
            half_open_probes: 1,
        }
    }
}

/// A provider call, as named in keys and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Hold the amount.
    Authorize,
    /// Take the held amount.
    Capture,
    /// Release the hold.
    Void,
    /// Give a captured amount back.
    Refund,
}

impl Operation {
    /// The name in keys, paths and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorize => "authorize",
            Self::Capture => "capture",
            Self::Void => "void",
            Self::Refund => "refund",
        }
    }
}

/// The key of `operation` for `order_id`: the same on every retry and every redelivery of
/// the saga command, so the provider makes the charge at most once.
pub fn idempotency_key(order_id: Uuid, operation: Operation) -> String {
    format!("order-{order_id}-{}", operation.as_str())
}

/// What the provider decided about an authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// The amount is held; capture or void it by `provider_id`.
    Authorized {
        /// The provider's id of the authorization.
        provider_id: String,
    },
    /// The provider refused the payment; the order cannot be paid this way.
    Declined {
        /// The provider's id of the declined authorization.
        provider_id: String,
        /// The provider's reason, e.g. `card_declined`.
        reason: String,
    },
}

/// Why a provider call did not get an answer the saga can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The breaker is open: the provider failed repeatedly and is left alone for a while.
    /// Nothing was sent. Retry later.
    #[error("the payment provider's circuit breaker is open; retry in {retry_in:?}")]
    CircuitOpen {
        /// How long until the breaker lets a probe through.
        retry_in: Duration,
    },
    /// Every attempt failed (transport, time-out, 5xx). Retry later: with the same key the
    /// provider will not charge twice.
    #[error("the payment provider is unavailable: {detail}")]
    Unavailable {
        /// The last failure.
        detail: String,
        /// Whether the provider may have carried the operation out (an answer was lost);
        /// false when every attempt provably failed to reach it (connection refused, breaker
        /// open) or it said it had not.
        maybe_done: bool,
    },
    /// The provider refused the request (4xx other than a decline); retrying will not help.
    #[error("the payment provider refused the request ({status}): {reason}")]
    Rejected {
        /// The provider's status code.
        status: u16,
        /// The provider's `detail`, or the status text.
        reason: String,
    },
}

impl PaymentError {
    /// An open breaker met after earlier attempts of the same call: if one of them may have
    /// been carried out, the call's outcome is unknown, not "nothing sent".
    fn after(self, unsure: bool) -> Self {
        match self {
            Self::CircuitOpen { retry_in } if unsure => Self::Unavailable {
                detail: format!(
                    "the breaker opened after an attempt whose answer was lost (retry in {retry_in:?})"
                ),
                maybe_done: true,
            },
            other => other,
        }
    }

    /// Whether the operation certainly did not happen: nothing reached the provider, or it
    /// said so. Then a saga may move on as if it had been refused.
    pub fn certainly_not_done(&self) -> bool {
        matches!(
            self,
            Self::CircuitOpen { .. }
                | Self::Unavailable {
                    maybe_done: false,
                    ..
                }
        )
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Rejected { .. })
    }
}

/// Labels of a finished call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    operation: &'static str,
    outcome: &'static str,
}

/// Labels of a retry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    operation: &'static str,
    reason: &'static str,
}

/// Labels of one request's duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

type DurationFamily = Family<OperationLabel, Histogram, fn() -> Histogram>;

#[derive(Clone)]
struct ClientMetrics {
    calls: Family<CallLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    duration: DurationFamily,
}

impl ClientMetrics {
    fn register(registry: &mut Registry, breaker_state: Gauge) -> Self {
        let calls = Family::default();
        let retries = Family::default();
        let duration: DurationFamily =
            Family::new_with_constructor(common::prometheus::latency_histogram);
        registry.register(
            "provider_calls",
            "Calls to the payment provider by operation and outcome",
            calls.clone(),
        );
        registry.register(
            "provider_retries",
            "Retries of provider calls by operation and the failure retried",
            retries.clone(),
        );
        registry.register(
            "provider_request_duration_seconds",
            "Time of one request to the provider, by operation",
            duration.clone(),
        );
        registry.register(
            "provider_breaker_state",
            "The provider's circuit breaker: 0 closed, 1 open, 2 half-open",
            breaker_state,
        );
        Self {
            calls,
            retries,
            duration,
        }
    }
}

/// A request's failure that a retry may cure.
#[derive(Debug)]
struct Failure {
    /// Metric label.
    reason: &'static str,
    /// Whether the provider may have acted on the request (its answer is unknown).
    unsure: bool,
    detail: String,
}

/// The answer to one request that reached the provider and was not a failure.
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
}

/// A breaker admission given back if no outcome is recorded (the call was cancelled).
struct Admitted<'a> {
    breaker: &'a Breaker,
    ticket: Option<Ticket>,
}

impl Admitted<'_> {
    fn record(mut self, success: bool) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker.record(ticket, success, Instant::now());
        }
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker.release(ticket);
        }
    }
}

/// The provider's view of an authorization.
#[derive(Debug, Deserialize)]
struct AuthorizationBody {
    id: String,
    status: String,
    reason: Option<String>,
}

/// The provider's problem body, for a refusal's reason.
#[derive(Deserialize)]
struct ProblemBody {
    detail: Option<String>,
}

/// What a lookup after an unsure attempt found.
enum Found<T> {
    /// The operation had been done: its result.
    Done(T),
    /// It had not: send it.
    NotDone,
}

/// The client. Cheap to clone; one per payment service process, so the breaker sees every
/// call.
#[derive(Clone)]
pub struct ProviderClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    settings: ProviderClientSettings,
    breaker: Breaker,
    metrics: ClientMetrics,
}

impl ProviderClient {
    /// A client for the provider `settings` names, registering its metrics
    /// (`provider_calls_total`, `provider_retries_total`, `provider_breaker_state`, …) in
    /// `registry`.
    pub fn new(settings: ProviderClientSettings, registry: &mut Registry) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.provider_timeout)
            .build()
            .context("failed to build the provider's HTTP client")?;
        let gauge = Gauge::default();
        let metrics = ClientMetrics::register(registry, gauge.clone());
        let breaker = Breaker::new(settings.breaker(), gauge);
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                settings,
                breaker,
                metrics,
            }),
        })
    }

    /// Asks the provider to hold `amount_minor` of `currency` for `order_id`. A decline is an
    /// answer ([`Authorization::Declined`]), not an error.
    #[tracing::instrument(skip(self), fields(%order_id))]
    pub async fn authorize(
        &self,
        order_id: Uuid,
        amount_minor: i64,
        currency: &str,
        payment_method: &str,
    ) -> Result<Authorization, PaymentError> {
        let key = idempotency_key(order_id, Operation::Authorize);
        let body = json!({
            "amount": amount_minor,
            "currency": currency,
            "payment_method": payment_method,
        });
        let send = || self.post("/v1/authorizations", &key).json(&body);
        let lookup = || {
            let mut url = self.url("/v1/authorizations");
            url.query_pairs_mut().append_pair("idempotency_key", &key);
            self.inner.http.get(url)
        };
        let result = self
            .call(
                Operation::Authorize,
                send,
                lookup,
                |body| authorization(&body),
                |body| authorization(&body).map(Found::Done),
            )
            .await;
        let outcome = match &result {
            Ok(Authorization::Authorized { .. }) => "authorized",
            Ok(Authorization::Declined { .. }) => "declined",
            Err(error) => error_outcome(error),
        };
        self.count(Operation::Authorize, outcome);
        result
    }

    /// Takes the amount held by `provider_id` for `order_id`.
    #[tracing::instrument(skip(self), fields(%order_id))]
    pub async fn capture(&self, order_id: Uuid, provider_id: &str) -> Result<(), PaymentError> {
        self.settle(
            order_id,
            provider_id,
            Operation::Capture,
            &["captured", "refunded"],
        )
        .await
    }

    /// Releases the hold of `provider_id` for `order_id` (the saga's compensation).
    #[tracing::instrument(skip(self), fields(%order_id))]
    pub async fn void(&self, order_id: Uuid, provider_id: &str) -> Result<(), PaymentError> {
        self.settle(order_id, provider_id, Operation::Void, &["voided"])
            .await
    }

    /// Gives back what `provider_id` captured for `order_id`.
    #[tracing::instrument(skip(self), fields(%order_id))]
    pub async fn refund(&self, order_id: Uuid, provider_id: &str) -> Result<(), PaymentError> {
        self.settle(order_id, provider_id, Operation::Refund, &["refunded"])
            .await
    }

    /// The authorization made for `order_id`, if any: what a compensation asks when the
    /// outcome of an authorization was never learnt. `Ok(None)` when the provider has none.
    #[tracing::instrument(skip(self), fields(%order_id))]
    pub async fn find_authorization(
        &self,
        order_id: Uuid,
    ) -> Result<Option<Authorization>, PaymentError> {
        let key = idempotency_key(order_id, Operation::Authorize);
        let mut url = self.url("/v1/authorizations");
        url.query_pairs_mut().append_pair("idempotency_key", &key);
        let reply = match self
            .exchange(Operation::Authorize, self.inner.http.get(url))
            .await?
        {
            Ok(reply) => reply,
            Err(failure) => {
                return Err(PaymentError::Unavailable {
                    detail: failure.detail,
                    maybe_done: false,
                });
            }
        };
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !reply.status.is_success() {
            return Err(rejected(&reply));
        }
        authorization(&reply.body)
            .map(Some)
            .map_err(|detail| PaymentError::Unavailable {
                detail,
                maybe_done: false,
            })
    }

    /// Whether the breaker is open now (for readiness and logs).
    pub fn breaker_open(&self) -> bool {
        self.inner.breaker.open_until(Instant::now()).is_some()
    }

    async fn settle(
        &self,
        order_id: Uuid,
        provider_id: &str,
        operation: Operation,
        done_states: &[&str],
    ) -> Result<(), PaymentError> {
        let key = idempotency_key(order_id, operation);
        // The id goes into a path: one segment, so it cannot walk elsewhere.
        let mut path = self.url("/v1/authorizations");
        path.path_segments_mut()
            .map_err(|()| PaymentError::Rejected {
                status: 0,
                reason: "the provider URL cannot take a path".into(),
            })?
            .push(provider_id);
        let mut action = path.clone();
        action
            .path_segments_mut()
            .map_err(|()| PaymentError::Rejected {
                status: 0,
                reason: "the provider URL cannot take a path".into(),
            })?
            .push(operation.as_str());
        let send = || {
            self.inner
                .http
                .post(action.clone())
                .header("idempotency-key", &key)
        };
        let lookup = || self.inner.http.get(path.clone());
        let result = self
            .call(
                operation,
                send,
                lookup,
                |_| Ok(()),
                |body| {
                    let found: AuthorizationBody = serde_json::from_slice(&body)
                        .map_err(|error| format!("unreadable authorization: {error}"))?;
                    Ok(if done_states.contains(&found.status.as_str()) {
                        Found::Done(())
                    } else {
                        Found::NotDone
                    })
                },
            )
            .await;
        let outcome = match &result {
            Ok(()) => "succeeded",
            Err(error) => error_outcome(error),
        };
        self.count(operation, outcome);
        result
    }

    /// The retry loop every operation shares. `send` builds the request; `lookup` asks what
    /// became of an attempt whose answer was lost (404: nothing); `done` reads a 2xx answer
    /// and `found` a 2xx lookup.
    async fn call<T>(
        &self,
        operation: Operation,
        send: impl Fn() -> RequestBuilder,
        lookup: impl Fn() -> RequestBuilder,
        done: impl Fn(Vec<u8>) -> Result<T, String>,
        found: impl Fn(Vec<u8>) -> Result<Found<T>, String>,
    ) -> Result<T, PaymentError> {
        let settings = &self.inner.settings;
        let mut unsure = false;
        let mut last: Option<Failure> = None;
        for attempt in 0..settings.provider_attempts {
            if let Some(failure) = &last {
                self.inner
                    .metrics
                    .retries
                    .get_or_create(&RetryLabels {
                        operation: operation.as_str(),
                        reason: failure.reason,
                    })
                    .inc();
                tokio::time::sleep(self.backoff(attempt)).await;
            }
            if unsure {
                let looked = match self.exchange(operation, lookup()).await {
                    Ok(looked) => looked,
                    Err(open) => return Err(open.after(unsure)),
                };
                match looked {
                    Ok(reply) if reply.status.is_success() => match found(reply.body) {
                        Ok(Found::Done(value)) => return Ok(value),
                        Ok(Found::NotDone) => unsure = false,
                        Err(detail) => {
                            last = Some(Failure {
                                reason: "bad_answer",
                                unsure: true,
                                detail,
                            });
                            continue;
                        }
                    },
                    Ok(reply) if reply.status == StatusCode::NOT_FOUND => unsure = false,
                    Ok(reply) => return Err(rejected(&reply)),
                    Err(failure) => {
                        last = Some(failure);
                        continue;
                    }
                }
            }
            let sent = match self.exchange(operation, send()).await {
                Ok(sent) => sent,
                Err(open) => return Err(open.after(unsure)),
            };
            match sent {
                Ok(reply) if reply.status.is_success() => match done(reply.body) {
                    Ok(value) => return Ok(value),
                    Err(detail) => {
                        unsure = true;
                        last = Some(Failure {
                            reason: "bad_answer",
                            unsure: true,
                            detail,
                        });
                    }
                },
                Ok(reply) => return Err(rejected(&reply)),
                Err(failure) => {
                    unsure = unsure || failure.unsure;
                    last = Some(failure);
                }
            }
        }
        let detail = last.map_or_else(|| "no attempt made".to_owned(), |f| f.detail);
        tracing::warn!(operation = operation.as_str(), %detail, "provider call failed");
        Err(PaymentError::Unavailable {
            detail: format!(
                "{} attempts failed; last: {detail}",
                settings.provider_attempts
            ),
            maybe_done: unsure,
        })
    }

    /// One request through the breaker. The outer error is an open breaker (nothing sent);
    /// the inner one a failure a retry may cure. 4xx and 2xx are both answers.
    async fn exchange(
        &self,
        operation: Operation,
        request: RequestBuilder,
    ) -> Result<Result<Reply, Failure>, PaymentError> {
        let now = Instant::now();
        let ticket = match self.inner.breaker.try_acquire(now) {
            Admission::Admitted(ticket) => ticket,
            Admission::Refused { retry_at } => {
                return Err(PaymentError::CircuitOpen {
                    retry_in: retry_at.saturating_duration_since(now),
                });
            }
        };
        let admitted = Admitted {
            breaker: &self.inner.breaker,
            ticket: Some(ticket),
        };
        let started = Instant::now();
        let result = self.send(request).await;
        self.inner
            .metrics
            .duration
            .get_or_create(&OperationLabel {
                operation: operation.as_str(),
            })
            .observe(started.elapsed().as_secs_f64());
        admitted.record(result.is_ok());
        Ok(result)
    }

    async fn send(&self, request: RequestBuilder) -> Result<Reply, Failure> {
        let transport = |error: reqwest::Error| {
            let (reason, unsure) = if error.is_timeout() {
                ("timeout", true)
            } else if error.is_connect() {
                ("connect", false)
            } else {
                ("transport", true)
            };
            Failure {
                reason,
                unsure,
                detail: format!("{reason}: {error}"),
            }
        };
        let response = request
            .timeout(self.inner.settings.provider_timeout)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?.to_vec();
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            return Err(Failure {
                reason: "server_error",
                // The provider said it failed; a repeat under the same key is safe anyway.
                unsure: false,
                detail: format!("the provider answered {status}"),
            });
        }
        Ok(Reply { status, body })
    }

    /// Full jitter: a uniform wait between zero and base × 2^(attempt-1), capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let settings = &self.inner.settings;
        let ceiling = settings
            .provider_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(settings.provider_backoff_max);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }

    fn url(&self, path: &str) -> Url {
        let mut url = self.inner.settings.provider_url.clone();
        url.set_path(path);
        url
    }

    fn post(&self, path: &str, key: &str) -> RequestBuilder {
        self.inner
            .http
            .post(self.url(path))
            .header("idempotency-key", key)
    }

    fn count(&self, operation: Operation, outcome: &'static str) {
        self.inner
            .metrics
            .calls
            .get_or_create(&CallLabels {
                operation: operation.as_str(),
                outcome,
            })
            .inc();
    }
}

fn error_outcome(error: &PaymentError) -> &'static str {
    match error {
        PaymentError::CircuitOpen { .. } => "circuit_open",
        PaymentError::Unavailable { .. } => "unavailable",
        PaymentError::Rejected { .. } => "rejected",
    }
}

fn rejected(reply: &Reply) -> PaymentError {
    let reason = serde_json::from_slice::<ProblemBody>(&reply.body)
        .ok()
        .and_then(|problem| problem.detail)
        .unwrap_or_else(|| reply.status.to_string());
    PaymentError::Rejected {
        status: reply.status.as_u16(),
        reason,
    }
}

fn authorization(body: &[u8]) -> Result<Authorization, String> {
    let body: AuthorizationBody = serde_json::from_slice(body)
        .map_err(|error| format!("unreadable authorization: {error}"))?;
    match body.status.as_str() {
        "declined" => Ok(Authorization::Declined {
            provider_id: body.id,
            reason: body.reason.unwrap_or_else(|| "declined".to_owned()),
        }),
        // A lookup may find it already captured, voided or refunded: it was authorized.
        _ => Ok(Authorization::Authorized {
            provider_id: body.id,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_order_and_the_operation() {
        let order = Uuid::nil();
        assert_eq!(
            idempotency_key(order, Operation::Authorize),
            "order-00000000-0000-0000-0000-000000000000-authorize"
        );
        assert_ne!(
            idempotency_key(order, Operation::Capture),
            idempotency_key(order, Operation::Void)
        );
    }

    #[test]
    fn backoff_is_jittered_below_a_doubling_capped_ceiling() {
        let mut settings = ProviderClientSettings::new("http://127.0.0.1:1".parse().unwrap());
        settings.provider_backoff = Duration::from_millis(100);
        settings.provider_backoff_max = Duration::from_millis(300);
        let client = ProviderClient::new(settings, &mut Registry::default()).unwrap();
        for _ in 0..200 {
            assert!(client.backoff(1) <= Duration::from_millis(100));
            assert!(client.backoff(2) <= Duration::from_millis(200));
            assert!(client.backoff(10) <= Duration::from_millis(300));
        }
        let waits: std::collections::HashSet<_> = (0..50).map(|_| client.backoff(3)).collect();
        assert!(waits.len() > 1, "the wait is random, not fixed");
    }
}
