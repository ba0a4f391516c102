//! ADR 0006's comparison of the gateway's rate-limit algorithm, a sliding-window counter
//! anchored at each key's first request, with GCRA, the alternative it turned down. First,
//! printed and checked: what each admits in the ADR's scenarios, and the Redis memory each
//! keeps per key. Then group `limiter`: one decision with each script called the same bare
//! way, so they compare like for like.
//!
//! GCRA lives here only (`gcra.lua`); the gateway does not use it.
//!
//! Needs Redis at `TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).
//! Run: `cargo bench -p benches --bench rate_limit_algorithms`.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use api_gateway::limiter::{
    Backend, Limiter, LimiterSettings, ManualClock, Quota, SLIDING_WINDOW_SCRIPT,
};
use chrono::{NaiveDate, TimeZone, Utc};
use criterion::Criterion;
use prometheus_client::registry::Registry;
use redis::aio::MultiplexedConnection;
use test_support::require_redis;
use tokio::runtime::Runtime;

/// GCRA as one Lua script with the same arguments as the gateway's: `KEYS[1]`,
/// `ARGV = now µs, window µs, limit`; its reply starts with `allowed` (0 or 1).
const GCRA_SCRIPT: &str = include_str!("gcra.lua");

/// Distinct keys the timed decisions rotate over, as in `api_gateway.rs`.
const KEYS: usize = 10_000;

const SECOND: u64 = 1_000_000;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a Tokio runtime");
    let url = rt.block_on(require_redis());
    let prefix = format!("bench:{}:{}:", std::process::id(), now_micros());
    rt.block_on(admissions_and_memory(&url, &prefix));

    let mut criterion = Criterion::default().configure_from_args();
    script_latency(&mut criterion, &rt, &url, &prefix);
    criterion.final_summary();
}

/// 2030-01-01 at `h:m:s` UTC, in microseconds.
fn at(h: u32, m: u32, s: u32) -> u64 {
    let time = NaiveDate::from_ymd_opt(2030, 1, 1)
        .and_then(|d| d.and_hms_opt(h, m, s))
        .expect("a valid time");
    u64::try_from(Utc.from_utc_datetime(&time).timestamp_micros()).expect("after 1970")
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("a valid Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("cannot connect to Redis")
}

/// The table of ADR 0006's Measurements: the sliding window through the production
/// `Limiter` on a clock the bench drives, GCRA through its script with the same times.
async fn admissions_and_memory(url: &str, prefix: &str) {
    let mut conn = connect(url).await;
    let gcra_script = redis::Script::new(GCRA_SCRIPT);
    let clock = ManualClock::new(0);
    let settings = LimiterSettings {
        redis_url: Some(url.to_owned()),
        key_prefix: prefix.to_owned(),
        redis_timeout: Duration::from_secs(2),
        ..LimiterSettings::default()
    };
    let limiter = Limiter::new(settings, Arc::new(clock.clone()), &mut Registry::default())
        .await
        .expect("cannot build the limiter");

    let sliding = async |key: &str, now: u64, quota: Quota, count: u32| -> u32 {
        clock.set(now);
        let mut admitted = 0;
        for _ in 0..count {
            let decision = limiter.check(key, quota).await;
            assert_eq!(decision.backend, Backend::Redis, "{decision:?}");
            admitted += u32::from(decision.allowed);
        }
        admitted
    };
    let mut gcra = async |key: &str, now: u64, quota: Quota, count: u32| -> u32 {
        let window = u64::try_from(quota.window.as_micros()).expect("a window in µs");
        let mut admitted = 0;
        for _ in 0..count {
            let (allowed, ..): (u8, i64, i64, i64) = gcra_script
                .key(format!("{prefix}gcra:{key}"))
                .arg(now)
                .arg(window)
                .arg(quota.limit)
                .invoke_async(&mut conn)
                .await
                .expect("the GCRA script failed");
            admitted += u32::from(allowed);
        }
        admitted
    };

    // 100 at 12:00:59 and 100 at 12:01:01 against 100/min.
    let quota = Quota::per_minute(100);
    let sliding_boundary = sliding("boundary", at(12, 0, 59), quota, 100).await
        + sliding("boundary", at(12, 1, 1), quota, 100).await;
    let gcra_boundary = gcra("boundary", at(12, 0, 59), quota, 100).await
        + gcra("boundary", at(12, 1, 1), quota, 100).await;

    // 3,000 requests from one user evenly over 2 s, then over 59 s, against 1,000/min.
    let quota = Quota::per_minute(1_000);
    let mut spread = Vec::new();
    for (span_s, start) in [(2, at(15, 0, 0)), (59, at(16, 0, 0))] {
        let key = format!("spread-{span_s}");
        let (mut s, mut g) = (0, 0);
        for i in 0..3_000u64 {
            let now = start + i * span_s * SECOND / 3_000;
            s += sliding(&key, now, quota, 1).await;
            g += gcra(&key, now, quota, 1).await;
        }
        spread.push((span_s, s, g));
    }

    let memory_usage = async |key: String| -> u64 {
        redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .query_async(&mut connect(url).await)
            .await
            .expect("MEMORY USAGE failed")
    };
    let sliding_bytes = memory_usage(format!("{prefix}spread-59")).await;
    let gcra_bytes = memory_usage(format!("{prefix}gcra:spread-59")).await;

    println!(
        "boundary (100/min, 100 at :59 + 100 at :01): sliding {sliding_boundary}, gcra {gcra_boundary}"
    );
    for (span, s, g) in &spread {
        println!("3,000 over {span} s against 1,000/min: sliding {s}, gcra {g}");
    }
    println!("MEMORY USAGE per key: sliding {sliding_bytes} B, gcra {gcra_bytes} B");
    assert_eq!(sliding_boundary, 100);
    assert_eq!(gcra_boundary, 103);
    assert_eq!(spread[0].1, 1_000);
    assert_eq!(spread[1].1, 1_000);
}

/// One admitted decision, each script called directly with the same arguments, rotating over
/// [`KEYS`] keys.
fn script_latency(c: &mut Criterion, rt: &Runtime, url: &str, prefix: &str) {
    let mut conn = rt.block_on(connect(url));
    let keys: Vec<String> = (0..KEYS).map(|i| format!("user:{i}")).collect();
    // High enough that every decision admits (the common case, and the one that writes),
    // within the exact range of the script's arithmetic.
    let quota = Quota::per_minute(1_000_000);
    let window = 60_000_000u64;
    // How each script's reply says "admitted": the sliding window answers remaining (>= 0)
    // and reset, GCRA an allowed flag first.
    let sliding_admits: fn(&[i64]) -> bool = |reply| reply.len() == 2 && reply[0] >= 0;
    let gcra_admits: fn(&[i64]) -> bool = |reply| reply.first() == Some(&1);
    let mut group = c.benchmark_group("limiter");
    for (name, source, admitted) in [
        (
            "script_sliding_window",
            SLIDING_WINDOW_SCRIPT,
            sliding_admits,
        ),
        ("script_gcra", GCRA_SCRIPT, gcra_admits),
    ] {
        let script = redis::Script::new(source);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for n in 0..iters {
                        let key = &keys[usize::try_from(n).unwrap_or(0) % KEYS];
                        let reply: Vec<i64> = script
                            .key(format!("{prefix}{name}:{key}"))
                            .arg(now_micros())
                            .arg(window)
                            .arg(quota.limit)
                            .invoke_async(&mut conn)
                            .await
                            .expect("script failed");
                        assert!(admitted(&reply), "refused: {reply:?}");
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}
