//! Generated data for trials and the load test: tenants (a fifth of them enterprise) and
//! events spread evenly over the last N days, in time order, stored through the repository's
//! ingest, so a seeded database holds what real traffic would have left, rollups included.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use chrono::{Months, TimeDelta, Utc};
use common::storable::StorableText;
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use uuid::Uuid;

use crate::{
    event::NewEvent,
    partitions::{self, Maintenance, month_of},
    repository::{EventRepository, IngestPath},
};

/// What to seed.
#[derive(Debug, Clone, clap::Args)]
pub struct SeedSpec {
    /// Events to store.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Tenants the events are spread over (created when fewer exist).
    #[arg(long, default_value_t = 1_000)]
    pub tenants: usize,
    /// Days back from now the events are spread over.
    #[arg(long, default_value_t = 730)]
    pub days: u32,
    /// Events per batch.
    #[arg(long, default_value_t = 10_000)]
    pub batch: usize,
    /// Batches stored at once.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// The random generator's seed; the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

const NAMES: [&str; 6] = [
    "page_view",
    "click",
    "signup",
    "export",
    "api_call",
    "login",
];

/// Makes sure `count` tenants exist, every fifth on the enterprise plan; all tenants' ids.
pub async fn tenants(repository: &EventRepository, count: usize) -> anyhow::Result<Vec<Uuid>> {
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants")
        .fetch_one(repository.pool())
        .await?;
    let missing = count.saturating_sub(existing as usize);
    if missing > 0 {
        let start = existing as usize;
        let ids: Vec<Uuid> = (0..missing).map(|_| Uuid::now_v7()).collect();
        let names: Vec<String> = (start..start + missing)
            .map(|i| format!("tenant-{i:05}"))
            .collect();
        let plans: Vec<&str> = (start..start + missing)
            .map(|i| match i % 5 {
                0 => "enterprise",
                1 | 2 => "pro",
                _ => "free",
            })
            .collect();
        sqlx::query(
            "INSERT INTO tenants (id, name, plan)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])",
        )
        .bind(ids)
        .bind(names)
        .bind(plans)
        .execute(repository.pool())
        .await?;
        sqlx::query("ANALYZE tenants")
            .execute(repository.pool())
            .await?;
    }
    Ok(
        sqlx::query_scalar("SELECT id FROM tenants ORDER BY name LIMIT $1")
            .bind(count as i64)
            .fetch_all(repository.pool())
            .await?,
    )
}

/// Seeds `spec`; `stored` counts the rows as they commit (for a progress display).
pub async fn seed(
    repository: &EventRepository,
    spec: &SeedSpec,
    stored: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        spec.tenants > 0 && spec.batch > 0 && spec.workers > 0,
        "tenants, batch and workers must be positive"
    );
    let tenants = Arc::new(tenants(repository, spec.tenants).await?);
    let now = Utc::now();
    let first = month_of((now - TimeDelta::days(i64::from(spec.days))).date_naive());
    partitions::ensure(
        repository.pool(),
        first,
        month_of(now.date_naive()) + Months::new(1),
        Maintenance::default(),
    )
    .await?;
    // Each worker fills its own stretch of the span, oldest first, a batch a slice of it: as
    // a live stream would arrive (a batch touches a day's rollups, not hundreds of days'),
    // and the BRIN index stays tight.
    let span_us = i64::from(spec.days) * 86_400_000_000;
    let stretch_us = span_us / spec.workers as i64;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..spec.workers {
        let share = spec.rows / spec.workers as u64
            + u64::from((worker as u64) < spec.rows % spec.workers as u64);
        let (repository, tenants, stored) = (
            repository.clone(),
            Arc::clone(&tenants),
            Arc::clone(&stored),
        );
        let (batch, seed) = (
            spec.batch,
            spec.seed.wrapping_mul(1_000).wrapping_add(worker as u64),
        );
        let start = now - TimeDelta::microseconds(span_us - worker as i64 * stretch_us);
        workers.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed);
            let names: Vec<StorableText> = NAMES
                .iter()
                .map(|n| StorableText::parse("name", *n).expect("no NUL"))
                .collect();
            let batches = share.div_ceil(batch as u64).max(1) as i64;
            let slice_us = (stretch_us / batches).max(1);
            let mut left = share;
            let mut slice_start = start;
            while left > 0 {
                let n = left.min(batch as u64) as usize;
                let events: Vec<NewEvent> = (0..n)
                    .map(|_| NewEvent {
                        tenant_id: tenants[rng.random_range(0..tenants.len())],
                        created_at: slice_start
                            + TimeDelta::microseconds(rng.random_range(0..slice_us)),
                        processing_time: rng.random_range(1..=2_000),
                        name: names[rng.random_range(0..names.len())].clone(),
                    })
                    .collect();
                repository.ingest(&events, IngestPath::Copy).await?;
                stored.fetch_add(n as u64, Ordering::Relaxed);
                left -= n as u64;
                slice_start += TimeDelta::microseconds(slice_us);
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    // What the service's roll-up would do within its first second: fold the rows the
    // ingest left after the watermark (the open day's, at least), so a report run right after
    // seeding reads raw rows for the part of today since the last roll-up only, as it would
    // on a running service.
    repository.roll_up().await?;
    // What autovacuum would do after a bulk load, at once: statistics for the planner, and a
    // visibility map so the rollups are read by index alone.
    for table in ["events", "daily_rollups"] {
        sqlx::query(&format!("VACUUM (ANALYZE) {table}"))
            .execute(repository.pool())
            .await?;
    }
    Ok(())
}
