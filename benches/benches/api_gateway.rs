//! Benchmarks of the api-gateway core. Group `limiter` (ADR 0006): one rate-limit decision
//! in process, and one through the production `Limiter` over Redis (its script called bare,
//! next to GCRA's, is in `rate_limit_algorithms.rs`).
//! Group `jwt`: verifying an EdDSA access token, uncached, through the gateway's token
//! cache when it is cached, and when it misses a full cache and is inserted. Group `routes`:
//! normalising a path and matching it against the default route file.
//!
//! Needs Redis at `TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).
//! Run: `cargo bench -p benches --bench api_gateway`.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use api_gateway::limiter::{Backend, Limiter, LimiterSettings, Quota, SystemClock};
use criterion::{Criterion, criterion_group, criterion_main};
use prometheus_client::registry::Registry;
use test_support::{access_token::AccessToken, require_redis};
use tokio::runtime::Runtime;

/// Distinct keys the decisions rotate over, so the map and Redis hold a realistic population.
const KEYS: usize = 10_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a Tokio runtime")
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

fn limiter_group(c: &mut Criterion) {
    let rt = runtime();
    let redis_url = rt.block_on(require_redis());
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

    let shared = limiter(&rt, Some(redis_url), &prefix);
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

    group.finish();
}

/// An access token signed with the fixture key, as the gateway issues them; the same claims
/// on every run but the times.
fn fixture_token(sub: &str) -> String {
    AccessToken::new(sub, &["user"])
        .valid_for(Duration::from_secs(3_600))
        .jti(format!("bench-{sub}"))
        .sign()
}

/// A verifier of the fixture key's tokens.
fn verifier_for_bench() -> common::auth::Verifier {
    let public = include_bytes!("../../common/tests/fixtures/ed25519-public.pem");
    let mut keys = common::auth::KeySet::new();
    keys.insert_ed25519_pem("test", public)
        .expect("fixture key");
    common::auth::Verifier::new(keys, "api-gateway", "backend-suite")
}

fn jwt_group(c: &mut Criterion) {
    let cache = api_gateway::authn::TokenCache::new(verifier_for_bench(), 30, 65_536);
    let token = fixture_token("0190b5e4-0000-7000-8000-000000000001");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut group = c.benchmark_group("jwt");
    group.bench_function("verify_eddsa_uncached", |b| {
        b.iter(|| {
            cache
                .verify_uncached(black_box(&token), now)
                .expect("valid")
        })
    });
    cache.verify(&token, now).expect("valid");
    group.bench_function("verify_eddsa_cached", |b| {
        b.iter(|| cache.verify(black_box(&token), now).expect("valid"))
    });
    // A full cache of 16 (one token per shard) and 256 tokens in turn: every call misses,
    // verifies the signature and evicts to insert (ADR 0012).
    let full = api_gateway::authn::TokenCache::new(verifier_for_bench(), 30, 16);
    let tokens: Vec<String> = (0..256)
        .map(|i| fixture_token(&format!("0190b5e4-0000-7000-8000-{i:012}")))
        .collect();
    let mut next = tokens.iter().cycle();
    group.bench_function("verify_eddsa_insert_at_capacity", |b| {
        b.iter(|| {
            let token = next.next().expect("cycle is endless");
            full.verify(black_box(token), now).expect("valid")
        })
    });
    group.finish();
}

fn routes_group(c: &mut Criterion) {
    let config = api_gateway::config::GatewayConfig::parse(api_gateway::config::DEFAULT)
        .expect("the default route file parses");
    let table = config.table().expect("the default route table builds");
    let method = axum::http::Method::POST;
    let mut group = c.benchmark_group("routes");
    group.bench_function("normalize_clean_path", |b| {
        b.iter(|| api_gateway::routes::normalize(black_box("/api/notifications/v1/notifications")))
    });
    group.bench_function("normalize_hostile_path", |b| {
        b.iter(|| {
            api_gateway::routes::normalize(black_box(
                "//api/./orders/%2e%2e/notifications/%761/notifications",
            ))
        })
    });
    group.bench_function("match_rule_and_mount", |b| {
        b.iter(|| {
            let path = black_box("/api/notifications/v1/notifications");
            let rule = table.rule(&method, path).expect("a rule");
            let target = table.target(path).expect("a mount");
            (rule.allows(&["sender"]), target.path.len())
        })
    });
    group.finish();
}

criterion_group!(benches, limiter_group, jwt_group, routes_group);
criterion_main!(benches);
