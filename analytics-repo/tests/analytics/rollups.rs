//! The reports read rollups for everything before the watermark and raw rows after it; at
//! every stage they must equal the naive query over the raw rows, exactly: late events,
//! out-of-order batches, the last and first microsecond of a day, plan changes, the open
//! day, a roll-up over several raw days, and ingests and roll-ups racing each other.

use std::time::Duration;

use analytics_repo::{
    event::NewEvent,
    repository::{EventRepository, IngestPath},
};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng, seq::SliceRandom as _};
use sqlx::Row as _;
use uuid::Uuid;

use crate::support::{
    ROLLUP_LOCK, assert_report_exact, at, ensure_recent, event, fresh, named, today,
};

/// `n` events of `tenants`, each `days_ago` drawn from `days` at a random time of that day
/// (but never later than now).
fn random_events(
    rng: &mut SmallRng,
    tenants: &[Uuid],
    days: std::ops::RangeInclusive<i64>,
    n: usize,
) -> Vec<NewEvent> {
    let now = Utc::now();
    (0..n)
        .map(|_| {
            let day = today() - TimeDelta::days(rng.random_range(days.clone()));
            let micros = rng.random_range(0..86_400_000_000i64);
            let created_at = (at(day, 0, 0, 0, 0) + TimeDelta::microseconds(micros)).min(now);
            let tenant = tenants[rng.random_range(0..tenants.len())];
            named(
                tenant,
                created_at,
                rng.random_range(0..=5_000),
                ["page_view", "export", "api_call"][rng.random_range(0..3)],
            )
        })
        .collect()
}

/// The last microsecond of the day before `day` and the first of `day`, for every tenant.
fn boundary(tenants: &[Uuid], day: NaiveDate, processing_time: i32) -> Vec<NewEvent> {
    tenants
        .iter()
        .flat_map(|&tenant| {
            [
                event(
                    tenant,
                    at(day - TimeDelta::days(1), 23, 59, 59, 999_999),
                    processing_time,
                ),
                event(tenant, at(day, 0, 0, 0, 0), processing_time + 1),
            ]
        })
        .collect()
}

async fn tenants(repository: &EventRepository, plans: &[&str]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        ids.push(
            repository
                .create_tenant(&format!("tenant {i}"), plan)
                .await
                .expect("tenant")
                .id,
        );
    }
    ids
}

async fn ingest(repository: &EventRepository, events: &[NewEvent], path: IngestPath) -> u64 {
    let ingested = repository.ingest(events, path).await.expect("ingest");
    assert_eq!(ingested.rows, events.len() as u64);
    ingested.late_rows
}

/// `tenant_daily` against an aggregate written by hand over its raw rows.
async fn assert_tenant_daily_exact(
    repository: &EventRepository,
    tenant: Uuid,
    from: NaiveDate,
    to: NaiveDate,
) -> usize {
    let report: Vec<(NaiveDate, i64, i64, String)> = repository
        .tenant_daily(tenant, from, to)
        .await
        .expect("tenant daily")
        .into_iter()
        .map(|r| (r.date, r.events, r.processing_time_sum, r.avg_time))
        .collect();
    let direct: Vec<(NaiveDate, i64, i64, String)> = sqlx::query(
        "SELECT (created_at AT TIME ZONE 'UTC')::date, count(*), sum(processing_time)::int8,
                avg(processing_time)::text
         FROM events WHERE tenant_id = $1 AND created_at >= $2 AND created_at < $3
         GROUP BY 1 ORDER BY 1",
    )
    .bind(tenant)
    .bind(at(from, 0, 0, 0, 0))
    .bind(at(to + TimeDelta::days(1), 0, 0, 0, 0))
    .fetch_all(repository.pool())
    .await
    .expect("direct aggregate")
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
    .collect();
    assert_eq!(
        report, direct,
        "tenant_daily of {tenant} from {from} to {to}"
    );
    report.len()
}

#[tokio::test]
async fn reports_equal_the_naive_query_through_late_events_plan_changes_and_roll_ups() {
    let (_url, repository) = fresh().await;
    let pool = repository.pool().clone();
    ensure_recent(&pool, 402).await;
    let ids = tenants(
        &repository,
        &[
            "enterprise",
            "enterprise",
            "enterprise",
            "pro",
            "pro",
            "free",
        ],
    )
    .await;
    let mut rng = SmallRng::seed_from_u64(7);
    let from_all = today() - TimeDelta::days(401);
    let from_recent = today() - TimeDelta::days(30);
    let watermark = repository.rolled_up_to().await.expect("watermark");
    assert_eq!(
        watermark,
        at(today(), 0, 0, 0, 0),
        "a fresh database rolls up to midnight"
    );

    // Late events over the last 400 days, in shuffled (out-of-order) batches, by all three
    // paths; the last and first microsecond of a past day and of today; the open day.
    let mut late = random_events(&mut rng, &ids, 2..=400, 3_000);
    late.extend(boundary(&ids, today() - TimeDelta::days(10), 100));
    late.extend(boundary(&ids, today() - TimeDelta::days(1), 300));
    late.shuffle(&mut rng);
    let mut late_rows = 0;
    for (chunk, path) in late.chunks(1_100).zip(IngestPath::ALL) {
        late_rows += ingest(&repository, chunk, path).await;
    }
    // Every one of them is before midnight today, the watermark: all added to the rollups.
    assert_eq!(late_rows, late.len() as u64);
    // Midnight today is the watermark: its last microsecond before is late, the first one
    // of today is raw.
    let open: Vec<NewEvent> = boundary(&ids, today(), 500)
        .into_iter()
        .chain(random_events(&mut rng, &ids, 0..=0, 300))
        .collect();
    assert_eq!(
        ingest(&repository, &open, IngestPath::Copy).await,
        ids.len() as u64
    );
    let rolled: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(events), 0)::int8 FROM daily_rollups")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        rolled,
        (late.len() + ids.len()) as i64,
        "late events are rolled up as they come"
    );
    assert!(assert_report_exact(&repository, from_all, "late and open").await > 100);
    assert_report_exact(&repository, from_recent, "late and open, recent").await;
    assert_report_exact(&repository, today(), "today only").await;

    // Plans change between batches: the report follows the tenants' current plans.
    repository
        .set_plan(ids[0], "pro")
        .await
        .unwrap()
        .expect("tenant");
    repository
        .set_plan(ids[3], "enterprise")
        .await
        .unwrap()
        .expect("tenant");
    assert_report_exact(&repository, from_all, "after plan changes").await;
    let mut more = random_events(&mut rng, &ids, 2..=60, 800);
    // Newest days first, then older: out of order across batches too.
    more.sort_by_key(|e| std::cmp::Reverse(e.created_at));
    for chunk in more.chunks(200) {
        ingest(&repository, chunk, IngestPath::Unnest).await;
    }
    repository
        .set_plan(ids[5], "enterprise")
        .await
        .unwrap()
        .expect("tenant");
    assert_report_exact(&repository, from_all, "late batches after plan changes").await;

    // The roll-up folds the open day's raw rows; then more of the open day arrive raw.
    let (new_watermark, folded) = repository.roll_up().await.expect("roll up");
    assert!(new_watermark > watermark);
    assert_eq!(
        folded,
        (open.len() - ids.len()) as u64,
        "the roll-up folds exactly the raw rows"
    );
    assert_report_exact(&repository, from_all, "after the roll-up").await;
    let later: Vec<NewEvent> = ids
        .iter()
        .map(|&t| event(t, Utc::now(), 42))
        .chain(boundary(&ids, today() - TimeDelta::days(3), 7))
        .collect();
    ingest(&repository, &later, IngestPath::Insert).await;
    assert_report_exact(&repository, from_all, "raw rows after the roll-up").await;
    assert_report_exact(&repository, today(), "today after the roll-up").await;

    for &tenant in &ids[..4] {
        assert!(assert_tenant_daily_exact(&repository, tenant, from_all, today()).await > 50);
        assert_tenant_daily_exact(
            &repository,
            tenant,
            today() - TimeDelta::days(10),
            today() - TimeDelta::days(1),
        )
        .await;
    }
}

#[tokio::test]
async fn raw_days_behind_a_lagging_watermark_are_rolled_up_exactly() {
    let (_url, repository) = fresh().await;
    let pool = repository.pool().clone();
    ensure_recent(&pool, 40).await;
    let ids = tenants(&repository, &["enterprise", "enterprise", "pro"]).await;
    // The watermark five days back, as after a roll-up that stopped running for days.
    sqlx::query("UPDATE rollup_state SET rolled_up_to = date_trunc('day', now(), 'UTC') - interval '5 days'")
        .execute(&pool)
        .await
        .unwrap();
    let watermark = repository.rolled_up_to().await.unwrap();
    assert_eq!(watermark, at(today() - TimeDelta::days(5), 0, 0, 0, 0));
    let mut rng = SmallRng::seed_from_u64(11);
    let mut raw = random_events(&mut rng, &ids, 1..=4, 1_500);
    raw.extend(boundary(&ids, today() - TimeDelta::days(2), 10));
    raw.extend(boundary(&ids, today(), 20));
    raw.extend(boundary(&ids, today() - TimeDelta::days(4), 30));
    raw.shuffle(&mut rng);
    // The first microsecond of the fifth day back is the watermark itself: raw, not late.
    let late: Vec<NewEvent> = random_events(&mut rng, &ids, 6..=20, 400)
        .into_iter()
        .chain(boundary(&ids, today() - TimeDelta::days(5), 40))
        .collect();
    let expected_late = late.iter().filter(|e| e.created_at < watermark).count() as u64;
    assert_eq!(expected_late, 400 + ids.len() as u64);
    assert_eq!(ingest(&repository, &raw, IngestPath::Copy).await, 0);
    assert_eq!(
        ingest(&repository, &late, IngestPath::Copy).await,
        expected_late
    );
    let from = today() - TimeDelta::days(30);
    assert_report_exact(&repository, from, "raw days behind the watermark").await;
    let recent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM daily_rollups WHERE day >= (now() AT TIME ZONE 'UTC')::date - 4",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        recent, 0,
        "days after the watermark are not in the rollups yet"
    );

    let (new_watermark, folded) = repository.roll_up().await.expect("roll up");
    assert!(new_watermark > Utc::now() - TimeDelta::minutes(1));
    assert_eq!(repository.rolled_up_to().await.unwrap(), new_watermark);
    assert_eq!(folded, raw.len() as u64 + ids.len() as u64);
    let (days, rolled): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT day), coalesce(sum(events), 0)::int8 FROM daily_rollups
         WHERE day >= (now() AT TIME ZONE 'UTC')::date - 5",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        days, 6,
        "the fifth to the first day back, and today, are rolled up"
    );
    assert_eq!(rolled, folded as i64);
    assert_report_exact(&repository, from, "after rolling up five days").await;
    for &tenant in &ids {
        assert_tenant_daily_exact(&repository, tenant, from, today()).await;
    }
    // A second roll-up right after finds nothing new and changes nothing.
    let (_, again) = repository.roll_up().await.expect("roll up again");
    assert_eq!(again, 0);
    assert_report_exact(&repository, from, "after a second roll-up").await;
}

/// Takes the roll-up lock exclusively in an open transaction, as a roll-up in progress does.
async fn hold_rollup_lock(pool: &sqlx::PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ROLLUP_LOCK)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

async fn wait_for_advisory_waiters(pool: &sqlx::PgPool, n: i64) {
    test_support::polling::poll_until(
        &format!("{n} sessions waiting for the roll-up lock"),
        Duration::from_secs(5),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            (waiting >= n).then_some(())
        },
    )
    .await;
}

async fn lag_watermark(pool: &sqlx::PgPool, by: &str) -> DateTime<Utc> {
    sqlx::query_scalar(&format!(
        "UPDATE rollup_state SET rolled_up_to = now() - interval '{by}' RETURNING rolled_up_to"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_ingest_queued_behind_a_roll_up_counts_its_events_once() {
    let (_url, repository) = fresh().await;
    let pool = repository.pool().clone();
    ensure_recent(&pool, 2).await;
    let tenant = tenants(&repository, &["enterprise"]).await[0];
    let watermark = lag_watermark(&pool, "1 hour").await;
    let from = watermark.date_naive() - TimeDelta::days(1);
    // A roll-up waits for the lock, then a batch queues behind it; the batch's event is
    // between the old watermark and the one the roll-up moves it to.
    let blocker = hold_rollup_lock(&pool).await;
    let roll_up = tokio::spawn({
        let repository = repository.clone();
        async move { repository.roll_up().await }
    });
    wait_for_advisory_waiters(&pool, 1).await;
    let ingest = tokio::spawn({
        let repository = repository.clone();
        let batch = vec![event(tenant, watermark + TimeDelta::minutes(30), 250)];
        async move { repository.ingest(&batch, IngestPath::Copy).await }
    });
    wait_for_advisory_waiters(&pool, 2).await;
    blocker.commit().await.unwrap();
    let (moved_to, _) = roll_up.await.unwrap().expect("roll up");
    assert!(moved_to > watermark + TimeDelta::minutes(30));
    ingest.await.unwrap().expect("ingest");
    let rows = assert_report_exact(&repository, from, "a batch behind a roll-up").await;
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn two_roll_ups_at_once_fold_each_row_once() {
    let (_url, repository) = fresh().await;
    let pool = repository.pool().clone();
    ensure_recent(&pool, 2).await;
    let tenant = tenants(&repository, &["enterprise"]).await[0];
    let watermark = lag_watermark(&pool, "1 hour").await;
    let batch: Vec<NewEvent> = (1..=10)
        .map(|i| event(tenant, watermark + TimeDelta::minutes(i), 10 * i as i32))
        .collect();
    assert_eq!(ingest(&repository, &batch, IngestPath::Copy).await, 0);
    // Two roll-ups (two instances of the service, or `maintain` beside one) queue up.
    let blocker = hold_rollup_lock(&pool).await;
    let first = tokio::spawn({
        let repository = repository.clone();
        async move { repository.roll_up().await }
    });
    wait_for_advisory_waiters(&pool, 1).await;
    let second = tokio::spawn({
        let repository = repository.clone();
        async move { repository.roll_up().await }
    });
    wait_for_advisory_waiters(&pool, 2).await;
    blocker.commit().await.unwrap();
    let (_, a) = first.await.unwrap().expect("first roll-up");
    let (_, b) = second.await.unwrap().expect("second roll-up");
    assert_eq!(a + b, 10, "the rows are folded once between the two");
    let rolled: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(events), 0)::int8 FROM daily_rollups")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rolled, 10);
    assert_report_exact(&repository, watermark.date_naive(), "two roll-ups").await;
}

/// `exact_avg` against PostgreSQL's own division (`AVG` of an integer column ends in
/// `numeric_div(sum, count)`), over random and edge pairs: small and huge, negative, exact
/// halves, carries through every digit.
#[tokio::test]
async fn exact_avg_writes_every_average_as_postgresql_does() {
    let (_, repository) = fresh().await;
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let mut pairs: Vec<(i64, i64)> = vec![
        (i64::MAX, 1),
        (i64::MAX, 2),
        (i64::MAX, i64::MAX),
        (i64::MIN + 1, 3),
        (i64::MAX, 7),
        (1, i64::MAX),
        (-1, 2),
        (-1, 3),
        (0, 1),
        (2, 3),
        (1, 2),
        (-5, 10),
        (999_999_999_999, 1_000_000_000_000),
        (19_999, 2),
        (99_995, 10_000),
    ];
    for _ in 0..20_000 {
        let count = match rng.random_range(0..3) {
            0 => rng.random_range(1..100),
            1 => rng.random_range(1..1_000_000),
            _ => rng.random_range(1..i64::MAX),
        };
        let sum = match rng.random_range(0..4) {
            0 => (i128::from(rng.random_range(0..1_000_i64)) * i128::from(count) / 1_000) as i64,
            1 => rng.random_range(-1_000_000..1_000_000_000),
            2 => rng.random_range(i64::MIN + 1..i64::MAX),
            _ => count.saturating_mul(rng.random_range(0..5_000)),
        };
        pairs.push((sum, count));
    }
    let (sums, counts): (Vec<i64>, Vec<i64>) = pairs.iter().copied().unzip();
    let printed: Vec<String> = sqlx::query_scalar(
        "SELECT (s::numeric / c::numeric)::text
         FROM unnest($1::int8[], $2::int8[]) WITH ORDINALITY AS p(s, c, n) ORDER BY n",
    )
    .bind(&sums)
    .bind(&counts)
    .fetch_all(repository.pool())
    .await
    .expect("PostgreSQL's averages");
    for ((sum, count), printed) in pairs.iter().zip(&printed) {
        assert_eq!(
            &analytics_repo::repository::exact_avg(*sum, *count),
            printed,
            "{sum} / {count}"
        );
    }
}
