//! Benchmarks of the analytics-repo core. Group `ingest`: one batch of today's events stored
//! by [`EventRepository::ingest`] through each path (binary `COPY`, `UNNEST`, multi-row
//! `INSERT`) at 1K, 10K and 100K events; the batch is generated untimed, the time runs from
//! the call to its commit. Group `report`: the enterprise report over a seeded database
//! (200,000 events, 100 tenants, 400 days): computed from PostgreSQL (uncached) and answered
//! from the Redis cache (a hit: one `MGET` and the copy of the body).
//!
//! Runs against a fresh PostgreSQL database (dropped at the end) and a key prefix of its own
//! in Redis. Needs PostgreSQL at `TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and Redis at `TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`); fails, saying how to start them, when either is down.
//! Run: `cargo bench -p benches --bench analytics_repo`.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use analytics_repo::{
    cache::{CacheMetrics, CacheSettings, Outcome, ReportCache, Scope},
    db::{self, DatabaseSettings},
    event::NewEvent,
    repository::{EventRepository, IngestPath},
    seed::{self, SeedSpec},
};
use bytes::Bytes;
use chrono::{TimeDelta, Utc};
use common::storable::StorableText;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sqlx::{Connection, Executor, PgConnection};
use test_support::{fresh_database, require_redis, test_database_url};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const BATCHES: [usize; 3] = [1_000, 10_000, 100_000];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build a Tokio runtime")
}

fn settings(url: String) -> DatabaseSettings {
    DatabaseSettings {
        database_url: url.into(),
        database_pool_size: 4,
        statement_cache: 64,
        statement_timeout: Duration::ZERO,
        acquire_timeout: Duration::from_secs(10),
    }
}

fn events(tenants: &[Uuid], count: usize, n: &mut u64) -> Vec<NewEvent> {
    let now = Utc::now();
    let name = StorableText::parse("name", "api_call").expect("no NUL");
    (0..count)
        .map(|i| {
            *n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            NewEvent {
                tenant_id: tenants[(*n >> 33) as usize % tenants.len()],
                created_at: now - TimeDelta::milliseconds((i % 1_000) as i64),
                processing_time: ((*n >> 40) % 2_000) as i32,
                name: name.clone(),
            }
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let redis_url = rt.block_on(require_redis());
    let url = rt.block_on(fresh_database("bench_analytics"));
    let repository = rt.block_on(async {
        EventRepository::new(db::connect(&settings(url.clone())).await.expect("connects"))
    });
    // Seed first: the report group reads it, and ingest then writes into a table of some size.
    let spec = SeedSpec {
        rows: 200_000,
        tenants: 100,
        days: 400,
        batch: 10_000,
        workers: 2,
        seed: 7,
    };
    rt.block_on(seed::seed(&repository, &spec, Arc::new(AtomicU64::new(0))))
        .expect("seeds");
    let tenants = rt
        .block_on(seed::tenants(&repository, spec.tenants))
        .expect("tenants");

    let mut group = c.benchmark_group("ingest");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    let mut n = 1;
    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        for path in IngestPath::ALL {
            group.bench_with_input(
                BenchmarkId::new(path.as_str(), batch),
                &batch,
                |b, &batch| {
                    b.iter_custom(|iterations| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iterations {
                            let events = events(&tenants, batch, &mut n);
                            let started = Instant::now();
                            rt.block_on(repository.ingest(&events, path))
                                .expect("stores");
                            total += started.elapsed();
                        }
                        total
                    })
                },
            );
        }
    }
    group.finish();
    rt.block_on(repository.roll_up()).expect("rolls up");

    let mut group = c.benchmark_group("report");
    group.sample_size(20);
    let from = Utc::now().date_naive() - TimeDelta::days(365);
    group.bench_function("enterprise_daily_uncached", |b| {
        b.iter(|| {
            rt.block_on(repository.enterprise_report(from))
                .expect("reports")
        })
    });
    let stop = CancellationToken::new();
    let cache = {
        let _guard = rt.enter();
        ReportCache::start(
            Some(redis::Client::open(redis_url).expect("a Redis URL")),
            CacheSettings {
                prefix: format!("bench-{}", Uuid::now_v7().simple()),
                open_ttl: Duration::from_secs(600),
                closed_ttl: Duration::from_secs(600),
                timeout: Duration::from_secs(1),
            },
            CacheMetrics::default(),
            stop.clone(),
        )
    };
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cache.usable() {
            assert!(
                Instant::now() < deadline,
                "the cache did not connect to Redis"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let compute = || async {
        let rows = repository.enterprise_report(from).await?;
        Ok::<_, sqlx::Error>(Bytes::from(serde_json::to_vec(&rows).expect("serializes")))
    };
    rt.block_on(cache.get_or_compute("bench-report", Scope::All, false, compute))
        .expect("computes");
    group.bench_function("enterprise_daily_cached", |b| {
        b.iter(|| {
            let (body, outcome) = rt
                .block_on(cache.get_or_compute("bench-report", Scope::All, false, compute))
                .expect("answers");
            assert_eq!(outcome, Outcome::Hit);
            body
        })
    });
    group.finish();
    stop.cancel();

    rt.block_on(async {
        repository.pool().close().await;
        let name = url.rsplit('/').next().expect("a database name").to_owned();
        let mut admin = PgConnection::connect(&test_database_url())
            .await
            .expect("connects");
        let _ = admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
    });
}

criterion_group!(analytics_repo, benches);
criterion_main!(analytics_repo);
