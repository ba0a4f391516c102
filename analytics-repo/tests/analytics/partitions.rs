//! Partition maintenance beside long reports: a month is attached while a report keeps its
//! snapshot open, ingest never queues behind a DDL step that cannot have its locks, and rows
//! that landed in the default partition are moved into their month.

use std::time::Duration;

use analytics_repo::{
    partitions::{self, Maintenance, month_of, table_name},
    repository::{EventRepository, IngestPath},
};
use chrono::{Months, NaiveDate, TimeDelta, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{assert_report_exact, at, ensure_recent, event, fresh, table_exists, today};

/// An ingest of one event now, which must finish within 5 s (it is not stalled behind DDL).
async fn ingest_promptly(repository: &EventRepository, tenant: Uuid) {
    let batch = [event(tenant, Utc::now(), 12)];
    let stored = tokio::time::timeout(
        Duration::from_secs(5),
        repository.ingest(&batch, IngestPath::Copy),
    )
    .await
    .expect("ingest stalled behind partition maintenance")
    .expect("ingest");
    assert_eq!(stored.rows, 1);
}

async fn default_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events_default")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_month_is_attached_while_a_report_holds_its_snapshot() {
    let (_url, repository) = fresh().await;
    let pool = repository.pool().clone();
    ensure_recent(&pool, 40).await;
    let tenant = repository
        .create_tenant("t", "enterprise")
        .await
        .unwrap()
        .id;
    ingest_promptly(&repository, tenant).await;

    // A report over a bounded range, its transaction (and its locks) kept open.
    let mut report = pool.begin().await.unwrap();
    let seen: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE created_at >= $1 AND created_at < $2",
    )
    .bind(Utc::now() - TimeDelta::days(1))
    .bind(Utc::now() + TimeDelta::days(1))
    .fetch_one(&mut *report)
    .await
    .unwrap();
    assert_eq!(seen, 1);
    let far = month_of(today()) + Months::new(20);
    let made = tokio::time::timeout(
        Duration::from_secs(3),
        partitions::create_month(&pool, far, Maintenance::default()),
    )
    .await
    .expect("create_month waited behind the report")
    .expect("create_month");
    assert_eq!(made, Some(0));
    assert!(partitions::existing(&pool).await.unwrap().contains(&far));
    ingest_promptly(&repository, tenant).await;
    report.commit().await.unwrap();

    // A scan that does lock the default partition (an unpruned report): the attach gives up
    // after its attempts, and ingest goes on meanwhile.
    let mut unpruned = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events_default IN ACCESS SHARE MODE")
        .execute(&mut *unpruned)
        .await
        .unwrap();
    let farther = next(far);
    let impatient = Maintenance {
        lock_timeout: Duration::from_millis(100),
        attempts: 3,
    };
    let (made, ()) = tokio::join!(
        partitions::create_month(&pool, farther, impatient),
        ingest_promptly(&repository, tenant)
    );
    assert_eq!(
        made.expect("create_month"),
        None,
        "the attach had locks it cannot have"
    );
    assert!(
        !partitions::existing(&pool)
            .await
            .unwrap()
            .contains(&farther)
    );
    ingest_promptly(&repository, tenant).await;
    unpruned.commit().await.unwrap();
    let made = partitions::create_month(&pool, farther, impatient)
        .await
        .expect("create_month");
    assert_eq!(made, Some(0));
    assert!(
        partitions::existing(&pool)
            .await
            .unwrap()
            .contains(&farther)
    );
    assert_report_exact(
        &repository,
        today() - TimeDelta::days(1),
        "after the attaches",
    )
    .await;
}

fn next(month: NaiveDate) -> NaiveDate {
    partitions::next_month(month)
}

#[tokio::test]
async fn rows_in_the_default_partition_are_moved_into_their_new_month() {
    let (_url, repository) = fresh().await;
    let pool = repository.pool().clone();
    ensure_recent(&pool, 2).await;
    let tenant = repository
        .create_tenant("t", "enterprise")
        .await
        .unwrap()
        .id;
    let old = NaiveDate::from_ymd_opt(2001, 3, 15).unwrap();
    let batch: Vec<_> = (0..50)
        .map(|i| event(tenant, at(old, 10, 0, i, 0), 100 + i as i32))
        .chain([
            event(tenant, at(month_of(old), 0, 0, 0, 0), 1),
            event(
                tenant,
                at(
                    NaiveDate::from_ymd_opt(2001, 3, 31).unwrap(),
                    23,
                    59,
                    59,
                    999_999,
                ),
                2,
            ),
        ])
        .collect();
    repository
        .ingest(&batch, IngestPath::Copy)
        .await
        .expect("ingest");
    assert_eq!(default_rows(&pool).await, 52);
    let before = assert_report_exact(
        &repository,
        NaiveDate::from_ymd_opt(2001, 1, 1).unwrap(),
        "in the default partition",
    )
    .await;
    assert_eq!(before, 3);

    let this_month = month_of(today());
    let round = partitions::ensure(&pool, this_month, this_month, Maintenance::default())
        .await
        .expect("ensure");
    let march = NaiveDate::from_ymd_opt(2001, 3, 1).unwrap();
    assert_eq!(round.created, [march]);
    assert_eq!(round.drained_rows, 52);
    assert_eq!(default_rows(&pool).await, 0);
    assert!(table_exists(&pool, &table_name(march)).await);
    let moved: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", table_name(march)))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(moved, 52);
    assert_report_exact(
        &repository,
        NaiveDate::from_ymd_opt(2001, 1, 1).unwrap(),
        "after the move",
    )
    .await;
    // A second round finds nothing to do.
    let again = partitions::ensure(&pool, this_month, this_month, Maintenance::default())
        .await
        .unwrap();
    assert!(
        again.created.is_empty() && again.drained_rows == 0,
        "{again:?}"
    );
}
