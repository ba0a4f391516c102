//! The rate limiter against a real Redis: the boundary burst, refused requests that consume
//! nothing, exact Retry-After, two replicas sharing a quota, the local limiter matching Redis,
//! and a private redis-server killed and restarted under each down policy. (The figures ADR
//! 0006 compares with GCRA come from `benches/benches/rate_limit_algorithms.rs`.)

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use api_gateway::limiter::{
    Backend, Clock, Decision, Limiter, LimiterSettings, ManualClock, Quota, RedisDownPolicy,
    SystemClock,
};
use axum::http::HeaderMap;
use chrono::{NaiveDate, TimeZone, Utc};
use prometheus_client::registry::Registry;
use test_support::{PrivateRedis, free_port::free_port, polling::poll_until};
use uuid::Uuid;

use crate::helpers::require_redis;

const SECOND: u64 = 1_000_000;

/// A key prefix no other test uses.
fn fresh_prefix() -> String {
    format!("limiter-test-{}:", Uuid::now_v7().simple())
}

fn settings(url: Option<String>, prefix: &str) -> LimiterSettings {
    LimiterSettings {
        redis_url: url,
        key_prefix: prefix.to_owned(),
        // Generous: a debug build on two busy cores must not flip to the fallback by accident.
        redis_timeout: Duration::from_secs(2),
        down_policy: RedisDownPolicy::Local,
        probe_interval: Duration::from_millis(200),
    }
}

async fn limiter(settings: LimiterSettings, clock: Arc<dyn Clock>) -> (Limiter, Registry) {
    let mut registry = Registry::with_prefix("api_gateway");
    let limiter = Limiter::new(settings, clock, &mut registry)
        .await
        .expect("failed to build the limiter");
    (limiter, registry)
}

/// 2030-01-01 at `h:m:s` UTC, in microseconds.
fn at(h: u32, m: u32, s: u32) -> u64 {
    let time = NaiveDate::from_ymd_opt(2030, 1, 1)
        .and_then(|d| d.and_hms_opt(h, m, s))
        .unwrap();
    u64::try_from(Utc.from_utc_datetime(&time).timestamp_micros()).unwrap()
}

/// Sends `count` requests for `key` one after the other; how many were admitted.
async fn burst(limiter: &Limiter, key: &str, quota: Quota, count: u32) -> u32 {
    let mut admitted = 0;
    for _ in 0..count {
        let decision = limiter.check(key, quota).await;
        assert_eq!(decision.backend, Backend::Redis, "{decision:?}");
        admitted += u32::from(decision.allowed);
    }
    admitted
}

/// Waits for `limiter` to use Redis again, failing past two probe intervals (and a second)
/// after `since`, when Redis became usable.
async fn wait_until_redis_up(limiter: &Limiter, since: Instant, probe_interval: Duration) {
    while !limiter.redis_up() {
        assert!(
            since.elapsed() < probe_interval * 2 + Duration::from_secs(1),
            "Redis not back in use after {:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(registry: &Registry, name: &str) -> Option<String> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")).map(str::to_owned))
}

/// `api_gateway_limiter_redis_errors_total`: failed Redis calls, probes included.
fn redis_errors(registry: &Registry) -> u64 {
    metric(registry, "api_gateway_limiter_redis_errors_total")
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn limiter_a_burst_either_side_of_a_minute_passes_the_limit_once_not_twice() {
    let clock = ManualClock::new(at(12, 0, 59));
    let (limiter, _) = limiter(
        settings(Some(require_redis().await), &fresh_prefix()),
        Arc::new(clock.clone()),
    )
    .await;
    let quota = Quota::per_minute(100);
    let before = burst(&limiter, "user:alice", quota, 100).await;
    clock.set(at(12, 1, 1));
    let after = burst(&limiter, "user:alice", quota, 100).await;
    // The key's window opened at 12:00:59 and runs to 12:01:59: the second burst is in it.
    assert_eq!((before, after), (100, 0));
}

#[tokio::test]
async fn limiter_a_burst_straddling_the_keys_own_window_boundary_passes_the_limit_once() {
    // An earlier request anchors the key's windows at 12:00:00, so 12:01:00 divides the burst.
    let clock = ManualClock::new(at(12, 0, 0));
    let (limiter, _) = limiter(
        settings(Some(require_redis().await), &fresh_prefix()),
        Arc::new(clock.clone()),
    )
    .await;
    let quota = Quota::per_minute(100);
    assert_eq!(burst(&limiter, "user:bob", quota, 1).await, 1);
    clock.set(at(12, 0, 59));
    let before = burst(&limiter, "user:bob", quota, 100).await;
    clock.set(at(12, 1, 1));
    let after = burst(&limiter, "user:bob", quota, 100).await;
    // At 12:01:01 the previous window's 100 still weigh 100 × 59/60 = 98.3: one more fits.
    assert_eq!((before, after), (99, 1));
    assert!(before + after <= 100);
}

#[tokio::test]
async fn limiter_refused_requests_consume_nothing() {
    let start = at(9, 0, 0);
    let clock = ManualClock::new(start);
    let (limiter, _) = limiter(
        settings(Some(require_redis().await), &fresh_prefix()),
        Arc::new(clock.clone()),
    )
    .await;
    let quota = Quota::per_minute(10);
    for key in ["spammer", "control"] {
        assert_eq!(burst(&limiter, key, quota, 10).await, 10);
    }
    // The spammer keeps hammering for the rest of the window; the control waits.
    for step in 1..=500u64 {
        clock.set(start + step * 120_000);
        assert!(!limiter.check("spammer", quota).await.allowed);
    }
    // Both recover exactly alike, request for request.
    for second in 61..=200u64 {
        clock.set(start + second * SECOND);
        let spammer = limiter.check("spammer", quota).await;
        let control = limiter.check("control", quota).await;
        assert_eq!(spammer, control, "at +{second}s");
    }
}

#[tokio::test]
async fn limiter_retry_after_is_exact() {
    let start = at(10, 0, 0);
    let clock = ManualClock::new(start);
    let (limiter, _) = limiter(
        settings(Some(require_redis().await), &fresh_prefix()),
        Arc::new(clock.clone()),
    )
    .await;
    let quota = Quota::per_minute(5);
    // Full in this window; then 40 s into the next, with the previous five decaying.
    for (key, setup) in [("full", vec![(0, 5)]), ("decaying", vec![(0, 5), (100, 3)])] {
        for (second, count) in setup {
            clock.set(start + second * SECOND);
            burst(&limiter, key, quota, count).await;
        }
        let refused = limiter.check(key, quota).await;
        assert!(!refused.allowed, "{key}: {refused:?}");
        let wait = u64::try_from(refused.retry_after.unwrap().as_micros()).unwrap();
        let now = clock.now_micros();
        clock.set(now + wait - 1);
        assert!(!limiter.check(key, quota).await.allowed, "{key}: early");
        clock.set(now + wait);
        assert!(limiter.check(key, quota).await.allowed, "{key}: on time");
    }
}

#[tokio::test]
async fn limiter_two_replicas_sharing_redis_admit_exactly_the_quota_of_3000_concurrent_requests() {
    let url = require_redis().await;
    let prefix = fresh_prefix();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (a, _) = limiter(settings(Some(url.clone()), &prefix), clock.clone()).await;
    let (b, _) = limiter(settings(Some(url), &prefix), clock).await;
    let quota = Quota::per_minute(1_000);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..3_000 {
        let replica = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move { replica.check("user:carol", quota).await });
    }
    let decisions: Vec<Decision> = tasks.join_all().await;
    assert!(decisions.iter().all(|d| d.backend == Backend::Redis));
    assert_eq!(decisions.iter().filter(|d| d.allowed).count(), 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_concurrent_decisions_share_script_calls_and_each_is_decided_as_if_alone() {
    let clock = ManualClock::new(at(14, 0, 0));
    let (limiter, registry) = limiter(
        settings(Some(require_redis().await), &fresh_prefix()),
        Arc::new(clock),
    )
    .await;
    let quota = Quota::per_minute(20);
    let (keys, per_key) = (8u32, 50u32);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..keys * per_key {
        let limiter = limiter.clone();
        tasks.spawn(async move {
            let key = format!("user:{}", i % keys);
            (key.clone(), limiter.check(&key, quota).await)
        });
    }
    let decisions = tasks.join_all().await;
    assert!(decisions.iter().all(|(_, d)| d.backend == Backend::Redis));
    for k in 0..keys {
        let key = format!("user:{k}");
        let mut remaining: Vec<u32> = decisions
            .iter()
            .filter(|(d_key, d)| *d_key == key && d.allowed)
            .map(|(_, d)| d.remaining)
            .collect();
        remaining.sort_unstable();
        // Exactly the quota, and each admitted decision saw every one before it: 19, 18, … 0.
        assert_eq!(remaining, (0..20).collect::<Vec<u32>>(), "{key}");
    }
    // The start's probe was one decision in one call of its own.
    let calls: u64 = metric(&registry, "api_gateway_limiter_redis_batch_size_count")
        .unwrap()
        .parse::<u64>()
        .unwrap()
        - 1;
    let carried: f64 = metric(&registry, "api_gateway_limiter_redis_batch_size_sum")
        .unwrap()
        .parse::<f64>()
        .unwrap()
        - 1.0;
    assert_eq!(carried, f64::from(keys * per_key));
    assert!(
        calls < u64::from(keys * per_key),
        "{calls} script calls for {carried} decisions: nothing was batched"
    );
}

#[tokio::test]
async fn limiter_headers_describe_a_real_decision() {
    let clock = ManualClock::new(at(11, 0, 0));
    let (limiter, _) = limiter(
        settings(Some(require_redis().await), &fresh_prefix()),
        Arc::new(clock.clone()),
    )
    .await;
    let quota = Quota::per_minute(2);
    let mut headers = HeaderMap::new();
    limiter
        .check("key:k1", quota)
        .await
        .write_headers("api-key", &mut headers);
    let get = |h: &HeaderMap, name: &str| h.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        get(&headers, "ratelimit-policy").unwrap(),
        r#""api-key";q=2;w=60"#
    );
    assert_eq!(get(&headers, "ratelimit").unwrap(), r#""api-key";r=1;t=60"#);
    assert_eq!(get(&headers, "x-ratelimit-remaining").unwrap(), "1");
    assert_eq!(get(&headers, "retry-after"), None);

    clock.set(at(11, 0, 20));
    limiter.check("key:k1", quota).await;
    let refused = limiter.check("key:k1", quota).await;
    let mut headers = HeaderMap::new();
    refused.write_headers("api-key", &mut headers);
    // Full until the window ends at 11:01:00; the next one starts with the two still
    // weighing 2 × (1 − e/60): one fits at e = 30 s.
    assert_eq!(refused.retry_after, Some(Duration::from_secs(70)));
    assert_eq!(get(&headers, "retry-after").unwrap(), "70");
    assert_eq!(get(&headers, "ratelimit").unwrap(), r#""api-key";r=0;t=70"#);
    assert_eq!(get(&headers, "x-ratelimit-reset").unwrap(), "70");
}

#[tokio::test]
async fn limiter_the_local_limiter_decides_exactly_like_redis() {
    let clock = ManualClock::new(at(13, 0, 0));
    let shared: Arc<dyn Clock> = Arc::new(clock.clone());
    let (redis, _) = limiter(
        settings(Some(require_redis().await), &fresh_prefix()),
        shared.clone(),
    )
    .await;
    let (local, _) = limiter(settings(None, "unused:"), shared).await;
    assert!(!local.redis_up());
    let quotas = [
        Quota::per_minute(7),
        Quota::new(3, Duration::from_secs(5)).unwrap(),
    ];
    // A fixed pseudo-random walk: bursts, pauses within and across windows, several keys.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..3_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let step = match seed % 10 {
            0..=5 => 0,
            6..=8 => seed % 2_000_000,
            _ => seed % 90_000_000,
        };
        clock.advance(Duration::from_micros(step));
        let key = format!("k{}", (seed >> 8) % 3);
        let quota = quotas[usize::from((seed >> 16).is_multiple_of(2))];
        let key = format!("{key}:{}", quota.limit);
        let from_redis = redis.check(&key, quota).await;
        let from_local = local.check(&key, quota).await;
        assert_eq!(from_redis.backend, Backend::Redis);
        assert_eq!(from_local.backend, Backend::Local);
        assert_eq!(
            Decision {
                backend: Backend::Local,
                ..from_redis
            },
            from_local
        );
    }
}

#[tokio::test]
async fn limiter_when_redis_dies_the_policy_decides_and_redis_takes_over_again_by_itself() {
    let port = free_port();
    let mut server = PrivateRedis::start(port);
    let clock = ManualClock::new(at(14, 0, 0));
    let probe_interval = Duration::from_millis(300);
    let mut replicas = Vec::new();
    for policy in [
        RedisDownPolicy::Local,
        RedisDownPolicy::Open,
        RedisDownPolicy::Closed,
    ] {
        let settings = LimiterSettings {
            redis_timeout: Duration::from_millis(500),
            down_policy: policy,
            probe_interval,
            ..settings(Some(server.url()), &fresh_prefix())
        };
        let (limiter, registry) = limiter(settings, Arc::new(clock.clone())).await;
        assert!(limiter.redis_up());
        assert_eq!(
            metric(&registry, "api_gateway_limiter_redis_up").unwrap(),
            "1"
        );
        replicas.push((policy, limiter, registry));
    }
    let quota = Quota::per_minute(3);
    for (_, limiter, _) in &replicas {
        assert_eq!(burst(limiter, "user:dave", quota, 2).await, 2);
    }

    server.kill();
    for (policy, limiter, registry) in &replicas {
        let decisions =
            futures_util::future::join_all((0..5).map(|_| limiter.check("user:dave", quota))).await;
        let admitted = decisions.iter().filter(|d| d.allowed).count();
        let backends: Vec<Backend> = decisions.iter().map(|d| d.backend).collect();
        match policy {
            // A fresh local count: this replica alone admits the whole quota again.
            RedisDownPolicy::Local => {
                assert!(
                    backends.iter().all(|b| *b == Backend::Local),
                    "{backends:?}"
                );
                assert_eq!(admitted, 3);
            }
            RedisDownPolicy::Open => {
                assert!(backends.iter().all(|b| *b == Backend::Open), "{backends:?}");
                assert_eq!(admitted, 5);
            }
            RedisDownPolicy::Closed => {
                assert!(
                    backends.iter().all(|b| *b == Backend::Closed),
                    "{backends:?}"
                );
                assert_eq!(admitted, 0);
            }
        }
        assert!(!limiter.redis_up());
        assert_eq!(
            metric(registry, "api_gateway_limiter_redis_up").unwrap(),
            "0"
        );
        assert!(redis_errors(registry) >= 1);
    }
    // Once down, a decision does not wait on Redis.
    let started = Instant::now();
    replicas[1].1.check("user:erin", quota).await;
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );

    let _server = PrivateRedis::start(port);
    let restarted = Instant::now();
    for (_, limiter, registry) in &replicas {
        wait_until_redis_up(limiter, restarted, probe_interval).await;
        assert_eq!(
            metric(registry, "api_gateway_limiter_redis_up").unwrap(),
            "1"
        );
        // The restarted Redis is empty: the key starts over, counted in Redis again.
        assert_eq!(burst(limiter, "user:dave", quota, 4).await, 3);
    }
    println!(
        "Redis back in use {:?} after the restart",
        restarted.elapsed()
    );
}

/// A Redis that answers `PING` but refuses writes (here `READONLY`, as a replica after a
/// failover; `OOM` and `MISCONF` look the same to the limiter) is down for the limiter: the
/// probe makes a real decision, so the local counts are not cleared every probe interval,
/// and the limiter comes back once writes are taken again.
#[tokio::test]
async fn limiter_a_redis_that_answers_ping_but_refuses_writes_stays_down() {
    let port = free_port();
    let server = PrivateRedis::start(port);
    let client = redis::Client::open(server.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let probe_interval = Duration::from_millis(100);
    let settings = LimiterSettings {
        redis_timeout: Duration::from_millis(500),
        probe_interval,
        ..settings(Some(server.url()), &fresh_prefix())
    };
    let (limiter, registry) = limiter(settings, Arc::new(SystemClock)).await;
    assert!(limiter.redis_up());
    let quota = Quota::per_minute(3);

    // A replica of a primary that does not exist: it answers PING, refuses every write.
    let _: String = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(1)
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: String = redis::cmd("PING").query_async(&mut admin).await.unwrap();

    let mut backends = Vec::new();
    let mut admitted = 0;
    for _ in 0..6 {
        let decision = limiter.check("user:frank", quota).await;
        backends.push(decision.backend);
        admitted += u32::from(decision.allowed);
        // Two probes between decisions, each meeting the refusal (a failed probe counts an
        // error; one that took the refusal for an answer would count none, and clear the
        // local counts).
        let errors = redis_errors(&registry);
        poll_until(
            "two probes of the Redis that refuses writes",
            Duration::from_secs(5),
            async || (redis_errors(&registry) >= errors + 2).then_some(()),
        )
        .await;
    }
    assert!(
        backends.iter().all(|b| *b == Backend::Local),
        "{backends:?}"
    );
    assert_eq!(admitted, 3, "the local count was reset: {backends:?}");
    assert!(!limiter.redis_up());
    assert_eq!(
        metric(&registry, "api_gateway_limiter_redis_up").unwrap(),
        "0"
    );

    let _: String = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut admin)
        .await
        .unwrap();
    wait_until_redis_up(&limiter, Instant::now(), probe_interval).await;
    assert_eq!(burst(&limiter, "user:frank", quota, 4).await, 3);
}

/// 3,000 requests from one user spread evenly over 2 s, then over 59 s, against 1,000 a
/// minute: the sliding window admits exactly 1,000 each time (GCRA, which ADR 0006 turned
/// down, admits 1,033 and 1,983: `benches/benches/rate_limit_algorithms.rs`).
#[tokio::test]
async fn limiter_3000_requests_spread_within_a_minute_admit_exactly_the_quota() {
    let clock = ManualClock::new(0);
    let (limiter, _) = limiter(
        settings(Some(require_redis().await), &fresh_prefix()),
        Arc::new(clock.clone()),
    )
    .await;
    let quota = Quota::per_minute(1_000);
    for (span_s, start) in [(2, at(15, 0, 0)), (59, at(16, 0, 0))] {
        let key = format!("spread-{span_s}");
        let mut admitted = 0;
        for i in 0..3_000u64 {
            clock.set(start + i * span_s * SECOND / 3_000);
            let decision = limiter.check(&key, quota).await;
            assert_eq!(decision.backend, Backend::Redis, "{decision:?}");
            admitted += u32::from(decision.allowed);
        }
        assert_eq!(admitted, 1_000, "over {span_s} s");
    }
}
