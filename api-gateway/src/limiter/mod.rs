//! Rate limits shared by every gateway replica (ADR 0006).
//!
//! Each decision is one atomic Redis script: a sliding-window counter whose windows are
//! anchored at the key's first request, so a burst on either side of a minute boundary passes
//! once, and a refused request consumes nothing. When Redis fails, decisions follow the
//! configured [`RedisDownPolicy`] without waiting on Redis, a background probe tries it again
//! every `probe_interval`, and Redis takes over again by itself once it answers.
//!
//! The caller builds the key (e.g. `user:{id}`, `key:{id}`, `ip:{addr}:auth`) and picks the
//! [`Quota`]; a key should always be checked against the same window.
//!
//! - `clock.rs`: where "now" comes from ([`SystemClock`], [`ManualClock`] for tests).
//! - `window.rs`: the algorithm as pure integer arithmetic; `sliding_window.lua` is the same
//!   for Redis.
//! - `local.rs`: the in-process limiter. `redis.rs`: the shared one.

mod clock;
mod local;
mod redis;
mod window;

use std::{
    fmt,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, HeaderName, HeaderValue, header::RETRY_AFTER};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use serde::{Deserialize, Deserializer, de::Error as _};

pub use clock::{Clock, ManualClock, SystemClock};

use self::{clock::micros, local::LocalLimiter, redis::RedisWindow, window::Verdict};

/// The production decision script, for benches that call it directly.
pub const SLIDING_WINDOW_SCRIPT: &str = redis::SLIDING_WINDOW_SCRIPT;

/// How many requests a key may make per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests admitted per window (≥ 1).
    pub limit: u32,
    /// The window (≥ 1 ms; limit × window in µs below 2^53, e.g. up to 150 million a minute, or 104,000 a day).
    pub window: Duration,
}

impl Quota {
    /// `limit` per `window`; refuses a zero limit or a window under a millisecond.
    pub fn new(limit: u32, window: Duration) -> Result<Self, String> {
        if limit == 0 {
            return Err("a rate limit must admit at least 1 request".into());
        }
        if window < Duration::from_millis(1) {
            return Err("a rate-limit window must be at least 1ms".into());
        }
        // The Redis script computes in doubles: exact while limit × window (µs) < 2^53.
        if u128::from(limit) * window.as_micros() >= 1 << 53 {
            return Err(format!(
                "{limit} per {window:?} is beyond what the limiter counts exactly (limit × window in µs must stay below 2^53)"
            ));
        }
        Ok(Self { limit, window })
    }

    /// `limit` per minute (a limit of 0 counts as 1).
    pub fn per_minute(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            window: Duration::from_secs(60),
        }
    }

    /// The limit and window in microseconds, clamped to what the arithmetic accepts (the
    /// fields are public, so a bad value can get here without `new`).
    fn checked(self) -> (u64, u64) {
        (u64::from(self.limit.max(1)), micros(self.window).max(1_000))
    }
}

/// `{ limit = 1000, window = "1m" }`; the window takes `500ms`, `10s`, `1m`, `1h`, `1d`.
impl<'de> Deserialize<'de> for Quota {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            limit: u32,
            window: String,
        }
        let raw = Raw::deserialize(deserializer)?;
        let window = common::config::parse_duration(&raw.window).map_err(D::Error::custom)?;
        Self::new(raw.limit, window).map_err(D::Error::custom)
    }
}

/// Who made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The shared counters in Redis.
    Redis,
    /// This replica's own counters (no Redis configured, or Redis down under
    /// [`RedisDownPolicy::Local`]).
    Local,
    /// Redis down under [`RedisDownPolicy::Open`]: admitted unchecked.
    Open,
    /// Redis down under [`RedisDownPolicy::Closed`]: refused unchecked; answer 503, not 429.
    Closed,
}

impl Backend {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Local => "local",
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }
}

/// The answer for one request, with what its response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed (refused requests consume nothing).
    pub allowed: bool,
    /// The quota it was checked against.
    pub quota: Quota,
    /// Requests that would still be admitted now.
    pub remaining: u32,
    /// Until the key's current window ends; when refused, at least `retry_after`.
    pub reset: Duration,
    /// When refused: until the earliest moment one request will be admitted (for
    /// [`Backend::Closed`], the probe interval).
    pub retry_after: Option<Duration>,
    /// Who decided.
    pub backend: Backend,
}

impl Decision {
    fn from_verdict(verdict: Verdict, quota: Quota, backend: Backend) -> Self {
        Self {
            allowed: verdict.allowed,
            quota,
            remaining: u32::try_from(verdict.remaining).unwrap_or(u32::MAX),
            reset: Duration::from_micros(verdict.reset),
            retry_after: verdict.retry_after.map(Duration::from_micros),
            backend,
        }
    }

    /// Adds the rate-limit headers under the policy name `policy` (e.g. `user`, `api-key`,
    /// `auth-ip`):
    ///
    /// ```text
    /// RateLimit-Policy: "user";q=1000;w=60
    /// RateLimit: "user";r=998;t=42
    /// X-RateLimit-Limit: 1000
    /// X-RateLimit-Remaining: 998
    /// X-RateLimit-Reset: 42
    /// Retry-After: 3                     (refused only)
    /// ```
    ///
    /// The first two follow draft-ietf-httpapi-ratelimit-headers-10 (structured-field lists:
    /// `q` quota, `w` window seconds, `r` remaining, `t` seconds to reset); the `X-` trio is
    /// the de-facto convention many clients read. Seconds are rounded up, so a client that
    /// waits them is never early. Decisions made without counting (Redis down under `Open` or
    /// `Closed`) carry only `Retry-After` when refused.
    pub fn write_headers(&self, policy: &str, headers: &mut HeaderMap) {
        if let Some(retry_after) = self.retry_after.filter(|_| !self.allowed) {
            headers.insert(RETRY_AFTER, seconds(ceil_secs(retry_after).max(1)));
        }
        if matches!(self.backend, Backend::Open | Backend::Closed) {
            return;
        }
        // Built by hand: this runs on every proxied request.
        let name = sf_string(policy);
        let mut numbers = itoa::Buffer::new();
        let limit = self.quota.limit;
        let window = ceil_secs(self.quota.window).max(1);
        let reset = ceil_secs(self.reset);
        let mut value = String::with_capacity(name.len() + 24);
        value.push_str(&name);
        value.push_str(";q=");
        value.push_str(numbers.format(limit));
        value.push_str(";w=");
        value.push_str(numbers.format(window));
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(RATELIMIT_POLICY.clone(), value);
        }
        value.truncate(name.len());
        value.push_str(";r=");
        value.push_str(numbers.format(self.remaining));
        value.push_str(";t=");
        value.push_str(numbers.format(reset));
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(RATELIMIT.clone(), value);
        }
        headers.insert(X_RATELIMIT_LIMIT.clone(), HeaderValue::from(limit));
        headers.insert(
            X_RATELIMIT_REMAINING.clone(),
            HeaderValue::from(self.remaining),
        );
        headers.insert(X_RATELIMIT_RESET.clone(), seconds(reset));
    }
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn seconds(value: u64) -> HeaderValue {
    HeaderValue::from(value)
}

/// `name` as a structured-field string: printable ASCII, `"` and `\` escaped, quoted.
fn sf_string(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// What to do while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RedisDownPolicy {
    /// Count in this replica with the same quotas: N replicas may admit up to N× a quota.
    #[default]
    Local,
    /// Admit everything unchecked.
    Open,
    /// Refuse everything (the gateway answers 503).
    Closed,
}

/// How the limiter reaches Redis and behaves without it.
#[derive(Clone)]
pub struct LimiterSettings {
    /// Redis shared by every replica; `None` counts in this process only (one replica).
    pub redis_url: Option<String>,
    /// Prefix of every key the limiter writes.
    pub key_prefix: String,
    /// Longest a decision waits on Redis before it counts as down.
    pub redis_timeout: Duration,
    /// What decides while Redis is down.
    pub down_policy: RedisDownPolicy,
    /// How often a down Redis is tried again.
    pub probe_interval: Duration,
}

impl Default for LimiterSettings {
    fn default() -> Self {
        Self {
            redis_url: None,
            key_prefix: "gateway:rl:".into(),
            redis_timeout: Duration::from_millis(100),
            down_policy: RedisDownPolicy::Local,
            probe_interval: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for LimiterSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimiterSettings")
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(common::config::redact_url),
            )
            .field("key_prefix", &self.key_prefix)
            .field("redis_timeout", &self.redis_timeout)
            .field("down_policy", &self.down_policy)
            .field("probe_interval", &self.probe_interval)
            .finish()
    }
}

/// Labels of a decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    backend: &'static str,
    outcome: &'static str,
}

#[derive(Clone)]
struct LimiterMetrics {
    decisions: Family<DecisionLabels, Counter>,
    redis_up: Gauge,
    redis_errors: Counter,
    redis_seconds: Histogram,
    redis_batch_size: Histogram,
}

impl LimiterMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            decisions: Family::default(),
            redis_up: Gauge::default(),
            redis_errors: Counter::default(),
            redis_seconds: common::prometheus::latency_histogram(),
            redis_batch_size: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 9),
            ),
        };
        registry.register(
            "limiter_decisions",
            "Rate-limit decisions, by who decided and the outcome",
            metrics.decisions.clone(),
        );
        registry.register(
            "limiter_redis_up",
            "1 while the rate limiter's Redis answers, 0 while decisions fall back",
            metrics.redis_up.clone(),
        );
        registry.register(
            "limiter_redis_errors",
            "Rate-limit calls to Redis that failed or timed out",
            metrics.redis_errors.clone(),
        );
        registry.register(
            "limiter_redis_seconds",
            "Time of one rate-limit decision in Redis, the wait for its batch included",
            metrics.redis_seconds.clone(),
        );
        registry.register(
            "limiter_redis_batch_size",
            "Decisions carried by one call of the rate-limit script",
            metrics.redis_batch_size.clone(),
        );
        metrics
    }
}

/// Decides whether a request is within its quota; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    clock: Arc<dyn Clock>,
    local: LocalLimiter,
    redis: Option<RedisWindow>,
    up: AtomicBool,
    policy: RedisDownPolicy,
    probe_interval: Duration,
    metrics: LimiterMetrics,
}

impl Limiter {
    /// Builds the limiter and registers its metrics. Redis being down at start is not an
    /// error: the limiter starts degraded (logged, `limiter_redis_up` 0) and keeps probing.
    /// Fails only on a malformed URL.
    pub async fn new(
        settings: LimiterSettings,
        clock: Arc<dyn Clock>,
        registry: &mut Registry,
    ) -> anyhow::Result<Self> {
        let metrics = LimiterMetrics::register(registry);
        let redis = settings
            .redis_url
            .as_deref()
            .map(|url| {
                RedisWindow::new(
                    url,
                    &settings.key_prefix,
                    settings.redis_timeout,
                    metrics.redis_batch_size.clone(),
                )
            })
            .transpose()?;
        let limiter = Self {
            inner: Arc::new(Inner {
                clock,
                local: LocalLimiter::new(),
                redis,
                up: AtomicBool::new(false),
                policy: settings.down_policy,
                probe_interval: settings.probe_interval,
                metrics,
            }),
        };
        let Some(redis) = &limiter.inner.redis else {
            tracing::info!("rate limits counted in this process only: no REDIS_URL (one replica)");
            return Ok(limiter);
        };
        match redis.probe(limiter.inner.clock.now_micros()).await {
            Ok(()) => limiter.mark_up(),
            Err(error) => {
                limiter.inner.metrics.redis_errors.inc();
                tracing::warn!(
                    %error,
                    policy = ?limiter.inner.policy,
                    "rate-limit Redis unreachable at start; deciding by the down policy until it answers"
                );
            }
        }
        tokio::spawn(probe(Arc::downgrade(&limiter.inner)));
        Ok(limiter)
    }

    /// Checks one request for `key` against `quota`, counting it if admitted. With Redis up
    /// this is one script call; with Redis down it does not wait on Redis.
    pub async fn check(&self, key: &str, quota: Quota) -> Decision {
        let inner = &self.inner;
        let now = inner.clock.now_micros();
        let (limit, window) = quota.checked();
        let decision = match &inner.redis {
            Some(redis) if inner.up.load(Ordering::Acquire) => {
                let started = Instant::now();
                match redis.check(key, now, window, limit).await {
                    Ok(verdict) => {
                        inner
                            .metrics
                            .redis_seconds
                            .observe(started.elapsed().as_secs_f64());
                        Decision::from_verdict(verdict, quota, Backend::Redis)
                    }
                    Err(error) => {
                        self.mark_down(&error);
                        self.fallback(key, quota, now)
                    }
                }
            }
            Some(_) => self.fallback(key, quota, now),
            None => self.local(key, quota, now),
        };
        let outcome = if decision.allowed {
            "allowed"
        } else {
            "limited"
        };
        inner
            .metrics
            .decisions
            .get_or_create(&DecisionLabels {
                backend: decision.backend.as_str(),
                outcome,
            })
            .inc();
        decision
    }

    /// Whether decisions currently come from Redis (false without a Redis configured).
    pub fn redis_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    fn local(&self, key: &str, quota: Quota, now: u64) -> Decision {
        let (limit, window) = quota.checked();
        let verdict = self.inner.local.check(key, now, window, limit);
        Decision::from_verdict(verdict, quota, Backend::Local)
    }

    fn fallback(&self, key: &str, quota: Quota, now: u64) -> Decision {
        match self.inner.policy {
            RedisDownPolicy::Local => self.local(key, quota, now),
            RedisDownPolicy::Open => Decision {
                allowed: true,
                quota,
                remaining: quota.limit,
                reset: Duration::ZERO,
                retry_after: None,
                backend: Backend::Open,
            },
            RedisDownPolicy::Closed => Decision {
                allowed: false,
                quota,
                remaining: 0,
                reset: self.inner.probe_interval,
                retry_after: Some(self.inner.probe_interval),
                backend: Backend::Closed,
            },
        }
    }

    fn mark_down(&self, error: &dyn fmt::Display) {
        let inner = &self.inner;
        inner.metrics.redis_errors.inc();
        if inner.up.swap(false, Ordering::AcqRel) {
            inner.metrics.redis_up.set(0);
            tracing::warn!(
                %error,
                policy = ?inner.policy,
                "rate-limit Redis failed; deciding by the down policy until it answers"
            );
        }
    }

    fn mark_up(&self) {
        let inner = &self.inner;
        if !inner.up.swap(true, Ordering::AcqRel) {
            inner.metrics.redis_up.set(1);
            inner.local.clear();
            tracing::info!("rate-limit Redis answers; decisions are shared again");
        }
    }
}

/// Tries a down Redis once per probe interval until the limiter is dropped.
async fn probe(inner: Weak<Inner>) {
    loop {
        let Some(interval) = inner.upgrade().map(|inner| inner.probe_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let limiter = Limiter { inner };
        let Some(redis) = limiter.inner.redis.clone() else {
            return;
        };
        if limiter.redis_up() {
            continue;
        }
        match redis.probe(limiter.inner.clock.now_micros()).await {
            Ok(()) => limiter.mark_up(),
            Err(error) => {
                limiter.inner.metrics.redis_errors.inc();
                tracing::debug!(%error, "rate-limit Redis still down");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(allowed: bool, backend: Backend) -> Decision {
        Decision {
            allowed,
            quota: Quota::per_minute(1000),
            remaining: if allowed { 998 } else { 0 },
            reset: Duration::from_millis(41_200),
            retry_after: (!allowed).then(|| Duration::from_millis(2_001)),
            backend,
        }
    }

    fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn headers_follow_the_draft_and_the_x_convention() {
        let mut headers = HeaderMap::new();
        decision(true, Backend::Redis).write_headers("user", &mut headers);
        assert_eq!(
            header(&headers, "ratelimit-policy"),
            Some(r#""user";q=1000;w=60"#)
        );
        assert_eq!(header(&headers, "ratelimit"), Some(r#""user";r=998;t=42"#));
        assert_eq!(header(&headers, "x-ratelimit-limit"), Some("1000"));
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("998"));
        assert_eq!(header(&headers, "x-ratelimit-reset"), Some("42"));
        assert_eq!(header(&headers, "retry-after"), None);

        let mut headers = HeaderMap::new();
        decision(false, Backend::Local).write_headers("we\"ird\\\n", &mut headers);
        assert_eq!(header(&headers, "retry-after"), Some("3"));
        assert_eq!(
            header(&headers, "ratelimit"),
            Some(r#""we\"ird\\";r=0;t=42"#)
        );
    }

    #[test]
    fn retry_after_is_at_least_one_second_and_unchecked_decisions_claim_no_quota() {
        let mut refused = decision(false, Backend::Closed);
        refused.retry_after = Some(Duration::from_micros(1));
        let mut headers = HeaderMap::new();
        refused.write_headers("user", &mut headers);
        assert_eq!(header(&headers, "retry-after"), Some("1"));
        assert_eq!(header(&headers, "ratelimit"), None);
        let mut headers = HeaderMap::new();
        decision(true, Backend::Open).write_headers("user", &mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn quotas_read_from_config_and_refuse_nonsense() {
        #[derive(Deserialize)]
        struct Routes {
            user: Quota,
        }
        let routes: Routes = toml::from_str("user = { limit = 1000, window = \"1m\" }").unwrap();
        assert_eq!(routes.user, Quota::per_minute(1000));
        for bad in [
            "user = { limit = 0, window = \"1m\" }",
            "user = { limit = 5, window = \"0s\" }",
            "user = { limit = 5, window = \"1 fortnight\" }",
            "user = { limit = 200000, window = \"1d\" }",
            "user = { limit = 5, window = \"1m\", burst = 3 }",
        ] {
            assert!(toml::from_str::<Routes>(bad).is_err(), "{bad}");
        }
    }
}
