//! Benchmarks of the order-saga core. Group `saga_step`: one event applied to a saga's state
//! machine (no I/O): a forward step succeeding, a refusal that starts the compensations, a
//! stale reply, and a whole saga from start to `confirmed`. Group `outbox_relay`: one
//! [`Relay::publish_batch`] of N committed outbox rows (claim `FOR UPDATE SKIP LOCKED`, one
//! `XADD` pipeline, delete, commit), the rows written untimed before each batch. Group
//! `inbox`: [`inbox::first_delivery`] in its own transaction, for a message never seen (the
//! row is inserted and committed) and for a duplicate (the insert finds the row).
//!
//! Runs against a fresh PostgreSQL database (dropped at the end) and a stream of its own.
//! Needs PostgreSQL at `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and Redis at `TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); fails, saying how to
//! start them, when either is down.
//! Run: `cargo bench -p benches --bench order_saga`.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use order_saga::{
    bus::{
        self, inbox,
        metrics::BusMetrics,
        outbox::{self, Relay, RelaySettings},
    },
    messages::{Body, Envelope, Line, Outcome, Step},
    orders::saga::{Event, Limits, Saga},
};
use prometheus_client::registry::Registry;
use redis::aio::ConnectionManager;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use test_support::{fresh_database, require_redis, test_database_url};
use tokio::runtime::Runtime;
use uuid::Uuid;

/// Batch sizes of the relay: one message (a quiet system), a burst, and the default (256).
const BATCHES: [i64; 3] = [1, 32, 256];

const LIMITS: Limits = Limits {
    step_deadline: Duration::from_secs(10),
    compensation_attempts: 5,
    compensation_backoff: Duration::from_millis(500),
};

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a Tokio runtime")
}

fn succeeded(saga: &Saga) -> Event {
    Event::Replied {
        step: saga.step.expect("a step is awaited"),
        attempt: saga.attempt,
        outcome: Outcome::Succeeded,
        reason: None,
    }
}

fn saga_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("saga_step");
    let start = Saga::start();
    group.bench_function("forward_succeeded", |b| {
        b.iter(|| {
            black_box(&start)
                .apply(succeeded(&start), &LIMITS)
                .expect("applies")
        })
    });

    // Three steps done: a refusal of the capture compensates all three.
    let mut shipping = Saga::start();
    for _ in 0..3 {
        shipping = shipping
            .apply(succeeded(&shipping), &LIMITS)
            .expect("applies")
            .saga;
    }
    assert_eq!(shipping.step, Some(Step::CapturePayment));
    group.bench_function("refused_starts_compensation", |b| {
        b.iter(|| {
            let event = Event::Replied {
                step: Step::CapturePayment,
                attempt: 1,
                outcome: Outcome::Failed,
                reason: Some("card declined".into()),
            };
            let t = black_box(&shipping).apply(event, &LIMITS).expect("applies");
            assert_eq!(t.saga.compensations.len(), 2);
            t
        })
    });

    group.bench_function("stale_reply", |b| {
        b.iter(|| {
            let late = Event::Replied {
                step: Step::ReserveStock,
                attempt: 1,
                outcome: Outcome::Succeeded,
                reason: None,
            };
            black_box(&shipping).apply(late, &LIMITS).unwrap_err()
        })
    });

    group.throughput(Throughput::Elements(Step::FORWARD.len() as u64));
    group.bench_function("whole_saga_to_confirmed", |b| {
        b.iter(|| {
            let mut saga = Saga::start();
            while saga.step.is_some() {
                saga = saga.apply(succeeded(&saga), &LIMITS).expect("applies").saga;
            }
            saga
        })
    });
    group.finish();
}

/// A command as the orders service writes it: a stock reservation of two lines, with a
/// trace context (about 400 bytes of JSON).
fn envelope() -> Envelope {
    let line = |quantity| Line {
        product_id: Uuid::now_v7(),
        quantity,
    };
    Envelope::new(
        Uuid::now_v7(),
        1,
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        Body::ReserveStock {
            lines: vec![line(2), line(1)],
        },
    )
}

/// The backends of the I/O groups, and what to remove when they are done.
struct Backends {
    database: String,
    pool: PgPool,
    redis: ConnectionManager,
    stream: String,
}

impl Backends {
    async fn start() -> Self {
        let redis_url = require_redis().await;
        let url = fresh_database("saga_bench").await;
        let pool = common::database::connect(&url, 4, Some("orders"))
            .await
            .expect("cannot connect to the bench database");
        bus::MIGRATOR
            .run(&pool)
            .await
            .expect("cannot apply the bus migrations");
        let client = redis::Client::open(redis_url).expect("a valid Redis URL");
        let redis = ConnectionManager::new(client)
            .await
            .expect("cannot connect to Redis");
        let database = url.rsplit_once('/').expect("a database URL").1.to_owned();
        Self {
            database,
            pool,
            redis,
            stream: format!("saga-bench-{}:inventory", Uuid::now_v7().simple()),
        }
    }

    async fn stop(self) {
        let mut redis = self.redis.clone();
        let _: () = redis::cmd("DEL")
            .arg(&self.stream)
            .query_async(&mut redis)
            .await
            .expect("cannot delete the bench stream");
        self.pool.close().await;
        let mut admin = PgConnection::connect(&test_database_url())
            .await
            .expect("cannot reconnect to PostgreSQL");
        admin
            .execute(format!("DROP DATABASE {} WITH (FORCE)", self.database).as_str())
            .await
            .expect("cannot drop the bench database");
    }

    /// Writes `n` outbox rows in one committed transaction, as a service's handlers do.
    async fn enqueue(&self, n: i64) {
        let mut tx = self.pool.begin().await.expect("cannot begin");
        for _ in 0..n {
            outbox::enqueue(&mut tx, &self.stream, &envelope())
                .await
                .expect("cannot enqueue");
        }
        tx.commit().await.expect("cannot commit");
    }
}

fn io_groups(c: &mut Criterion) {
    let rt = runtime();
    let backends = rt.block_on(Backends::start());
    let body = serde_json::to_string(&envelope()).expect("serializes");
    eprintln!("outbox message body: {} bytes", body.len());

    let mut group = c.benchmark_group("outbox_relay");
    for batch in BATCHES {
        let relay = Relay::new(
            backends.pool.clone(),
            backends.redis.clone(),
            RelaySettings {
                batch,
                poll: Duration::from_secs(1),
                stream_max_len: 100_000,
            },
            BusMetrics::register(&mut Registry::default()),
        );
        group.throughput(Throughput::Elements(u64::try_from(batch).unwrap_or(0)));
        group.bench_with_input(BenchmarkId::new("publish_batch", batch), &batch, |b, &n| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        backends.enqueue(n).await;
                        let started = Instant::now();
                        let published = relay.publish_batch().await.expect("relay batch failed");
                        spent += started.elapsed();
                        assert_eq!(published, usize::try_from(n).unwrap_or(0));
                    }
                    spent
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("inbox");
    group.bench_function("first_delivery_new", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let mut tx = backends.pool.begin().await.expect("cannot begin");
                    let first = inbox::first_delivery(&mut tx, Uuid::now_v7())
                        .await
                        .expect("inbox insert failed");
                    assert!(first);
                    tx.commit().await.expect("cannot commit");
                }
                started.elapsed()
            })
        })
    });
    let seen = Uuid::now_v7();
    rt.block_on(async {
        let mut conn = backends.pool.acquire().await.expect("cannot acquire");
        assert!(
            inbox::first_delivery(&mut conn, seen)
                .await
                .expect("insert")
        );
    });
    group.bench_function("first_delivery_duplicate", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let mut tx = backends.pool.begin().await.expect("cannot begin");
                    let first = inbox::first_delivery(&mut tx, black_box(seen))
                        .await
                        .expect("inbox insert failed");
                    assert!(!first);
                    tx.commit().await.expect("cannot commit");
                }
                started.elapsed()
            })
        })
    });
    group.finish();

    rt.block_on(backends.stop());
}

criterion_group!(benches, saga_step, io_groups);
criterion_main!(benches);
