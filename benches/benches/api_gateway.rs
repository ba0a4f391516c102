//! Benchmarks of the api-gateway core. Group `limiter` (ADR 0006): one rate-limit decision
//! in process, one through the production `Limiter` over Redis, and the two candidate
//! scripts (sliding window, GCRA) called the same bare way so they compare like for like.
//! Other groups (JWT verification, route matching) belong here too, one function each.
//!
//! Needs Redis at `TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).
//! Run: `cargo bench -p benches --bench api_gateway`.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use api_gateway::limiter::{
    Backend, Limiter, LimiterSettings, Quota, SLIDING_WINDOW_SCRIPT, SystemClock, gcra,
};
use criterion::{Criterion, criterion_group, criterion_main};
use prometheus_client::registry::Registry;
use tokio::runtime::Runtime;

/// Distinct keys the decisions rotate over, so the map and Redis hold a realistic population.
const KEYS: usize = 10_000;

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a Tokio runtime")
}

/// A connection to the bench Redis, or a panic that says how to get one.
fn redis_connection(rt: &Runtime) -> redis::aio::MultiplexedConnection {
    let url = redis_url();
    rt.block_on(async {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    })
    .unwrap_or_else(|error| {
        panic!(
            "Redis is not reachable at {url} ({error}): start it with \
             `redis-server --daemonize yes --save '' --appendonly no`, or set TEST_REDIS_URL"
        )
    })
}

fn limiter(rt: &Runtime, redis_url: Option<String>, prefix: &str) -> Limiter {
    let settings = LimiterSettings {
        redis_url,
        key_prefix: prefix.to_owned(),
        redis_timeout: Duration::from_secs(1),
        ..LimiterSettings::default()
    };
    let mut registry = Registry::with_prefix("api_gateway");
    rt.block_on(Limiter::new(settings, Arc::new(SystemClock), &mut registry))
        .expect("cannot build the limiter")
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("user:{i}")).collect()
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn limiter_group(c: &mut Criterion) {
    let rt = runtime();
    let mut conn = redis_connection(&rt);
    let prefix = format!("bench:{}:", std::process::id());
    let keys = keys();
    // High enough that every decision admits (the common case, and the one that writes),
    // within the exact range of the script's arithmetic.
    let quota = Quota::per_minute(1_000_000);
    let mut group = c.benchmark_group("limiter");

    let local = limiter(&rt, None, &prefix);
    let mut i = 0;
    group.bench_function("local_decision", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let decision = rt.block_on(local.check(black_box(&keys[i]), quota));
            assert_eq!(decision.backend, Backend::Local);
        })
    });

    let shared = limiter(&rt, Some(redis_url()), &prefix);
    group.bench_function("redis_decision", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for n in 0..iters {
                    let key = &keys[usize::try_from(n).unwrap_or(0) % KEYS];
                    let decision = shared.check(black_box(key), quota).await;
                    assert_eq!(decision.backend, Backend::Redis);
                }
                started.elapsed()
            })
        })
    });

    let window = 60_000_000u64;
    for (name, source) in [
        ("script_sliding_window", SLIDING_WINDOW_SCRIPT),
        ("script_gcra", gcra::SCRIPT),
    ] {
        let script = redis::Script::new(source);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for n in 0..iters {
                        let key = &keys[usize::try_from(n).unwrap_or(0) % KEYS];
                        let (allowed, ..): (u8, i64, i64, i64) = script
                            .key(format!("{prefix}{name}:{key}"))
                            .arg(now_micros())
                            .arg(window)
                            .arg(quota.limit)
                            .invoke_async(&mut conn)
                            .await
                            .expect("script failed");
                        assert_eq!(allowed, 1);
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, limiter_group);
criterion_main!(benches);
