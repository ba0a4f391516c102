//! Archival: a month exported, verified and dropped, resumed from every recorded step a
//! killed archiver can leave, really killed (SIGKILL) at random moments and run again, and
//! restored to exactly the rows it held; one archiver at a time; no ingest into the archive.

use std::{path::PathBuf, process::Stdio, time::Duration};

use analytics_repo::{
    archive::Archiver,
    event::NewEvent,
    partitions::{self, Maintenance, month_of, next_month, table_name},
    repository::{EventRepository, IngestError, IngestPath, start_of},
};
use chrono::{Months, NaiveDate, TimeDelta};
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use sqlx::PgPool;
use tokio::process::Command;
use uuid::Uuid;

use crate::support::{ARCHIVE_LOCK, event, fingerprint, fresh, named, table_exists, today};

fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("analytics-archive-{}", Uuid::now_v7().simple()))
}

/// A month `months_back` months before this one, its partition made, `n` events of two
/// tenants in it (one of them on the last microsecond of the month); its fingerprint.
async fn old_month(
    repository: &EventRepository,
    months_back: u32,
    n: usize,
) -> (NaiveDate, Uuid, (i64, String)) {
    let month = month_of(today()) - Months::new(months_back);
    let made = partitions::create_month(repository.pool(), month, Maintenance::default())
        .await
        .expect("create month");
    assert_eq!(made, Some(0));
    let tenants = [
        repository
            .create_tenant("a", "enterprise")
            .await
            .unwrap()
            .id,
        repository.create_tenant("b", "pro").await.unwrap().id,
    ];
    let mut rng = SmallRng::seed_from_u64(u64::from(months_back));
    let span = (start_of(next_month(month)) - start_of(month))
        .num_microseconds()
        .unwrap();
    let mut events: Vec<NewEvent> = (0..n - 1)
        .map(|i| {
            named(
                tenants[i % 2],
                start_of(month) + TimeDelta::microseconds(rng.random_range(0..span)),
                rng.random_range(0..10_000),
                // Text CSV must carry exactly: commas, quotes, newlines, backslashes.
                [
                    "plain",
                    "with,comma",
                    "with \"quotes\"",
                    "multi\nline",
                    "back\\slash",
                ][i % 5],
            )
        })
        .collect();
    events.push(event(
        tenants[0],
        start_of(next_month(month)) - TimeDelta::microseconds(1),
        1,
    ));
    for chunk in events.chunks(1_000) {
        repository
            .ingest(chunk, IngestPath::Copy)
            .await
            .expect("ingest");
    }
    let print = month_fingerprint(repository.pool(), month).await;
    assert_eq!(print.0, n as i64);
    (month, tenants[0], print)
}

async fn month_fingerprint(pool: &PgPool, month: NaiveDate) -> (i64, String) {
    fingerprint(pool, start_of(month), start_of(next_month(month))).await
}

async fn state(pool: &PgPool, month: NaiveDate) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM archived_months WHERE month = $1")
        .bind(month)
        .fetch_optional(pool)
        .await
        .unwrap()
}

fn cutoff() -> NaiveDate {
    today() - Months::new(24)
}

#[tokio::test]
async fn a_month_is_archived_resumed_from_each_step_and_restored_exactly() {
    let (_url, repository) = fresh().await;
    let pool = repository.pool().clone();
    let (month, tenant, print) = old_month(&repository, 30, 2_000).await;
    let daily_before = repository
        .tenant_daily(tenant, month, next_month(month))
        .await
        .unwrap();
    let dir = temp_dir();
    let archiver = Archiver::new(pool.clone(), &dir, Maintenance::default());
    let table = table_name(month);

    // Killed after the detach was recorded, with a half-written file left behind.
    sqlx::query(&format!("ALTER TABLE events DETACH PARTITION {table}"))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO archived_months (month, state, path, rows, checksum, file_sha256, file_bytes)
         VALUES ($1, 'detached', $2, 0, 0, '', 0)",
    )
    .bind(month)
    // Resumed with another directory than the killed run's: the file goes to this one.
    .bind("/nonexistent/archive/elsewhere.csv.zst")
    .execute(&pool)
    .await
    .unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let partial = dir.join(format!("{table}.csv.zst.partial"));
    std::fs::write(&partial, b"half a file").unwrap();
    // The detached month takes no events.
    let refused = repository
        .ingest(&[event(tenant, start_of(month), 1)], IngestPath::Copy)
        .await;
    match refused {
        Err(IngestError::ArchivedMonths(months)) => assert_eq!(months, [(0, month)]),
        other => panic!("ingest into a detached month: {other:?}"),
    }

    // A second archiver while one holds the lock is refused, saying why.
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(ARCHIVE_LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    let error = archiver.archive_before(cutoff()).await.unwrap_err();
    assert!(
        format!("{error:#}").contains("another archiver"),
        "{error:#}"
    );
    assert_eq!(state(&pool, month).await.as_deref(), Some("detached"));
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(ARCHIVE_LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);

    let archived = archiver.archive_before(cutoff()).await.expect("archive");
    assert_eq!(archived.len(), 1);
    let record = &archived[0];
    assert_eq!((record.month, record.state.as_str()), (month, "dropped"));
    assert_eq!((record.rows, &record.checksum), (print.0, &print.1));
    assert!(!partial.exists());
    assert!(PathBuf::from(&record.path).exists());
    assert!(!table_exists(&pool, &table).await);
    assert_eq!(month_fingerprint(&pool, month).await.0, 0);
    // The rollups are kept: the tenant's days still answer.
    assert_eq!(
        repository
            .tenant_daily(tenant, month, next_month(month))
            .await
            .unwrap(),
        daily_before
    );
    let refused = repository
        .ingest(&[event(tenant, start_of(month), 1)], IngestPath::Copy)
        .await;
    assert!(
        matches!(refused, Err(IngestError::ArchivedMonths(_))),
        "{refused:?}"
    );
    // Maintenance does not make the archived month again.
    let round = partitions::ensure(&pool, month, month, Maintenance::default())
        .await
        .unwrap();
    assert!(round.created.is_empty(), "{round:?}");
    // Run again: nothing left to do, nothing changed.
    assert!(archiver.archive_before(cutoff()).await.unwrap().is_empty());

    // Killed after the export was recorded, before the drop: restore, then put the month
    // back as such a kill leaves it (its table detached and whole, the state "exported").
    let restored = archiver.restore(month).await.expect("restore");
    assert_eq!(restored.state, "restored");
    assert_eq!(month_fingerprint(&pool, month).await, print);
    sqlx::query(&format!("ALTER TABLE events DETACH PARTITION {table}"))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE archived_months SET state = 'exported' WHERE month = $1")
        .bind(month)
        .execute(&pool)
        .await
        .unwrap();
    // Only a dropped month can be restored.
    let error = archiver.restore(month).await.unwrap_err();
    assert!(format!("{error:#}").contains("exported"), "{error:#}");
    let resumed = archiver
        .archive_before(cutoff())
        .await
        .expect("resume the drop");
    assert_eq!(resumed[0].state, "dropped");
    assert_eq!((resumed[0].rows, &resumed[0].checksum), (print.0, &print.1));
    assert!(!table_exists(&pool, &table).await);

    // A tampered file is not dropped against, nor restored from.
    let path = PathBuf::from(&resumed[0].path);
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, b"not the archive").unwrap();
    let error = archiver.restore(month).await.unwrap_err();
    assert!(format!("{error:#}").contains("SHA-256"), "{error:#}");
    std::fs::write(&path, &good).unwrap();

    let restored = archiver.restore(month).await.expect("restore");
    assert_eq!((restored.rows, &restored.checksum), (print.0, &print.1));
    assert_eq!(month_fingerprint(&pool, month).await, print);
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT id FROM events GROUP BY id HAVING count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(duplicates, 0);
    // A restored month takes events again.
    repository
        .ingest(&[event(tenant, start_of(month), 1)], IngestPath::Copy)
        .await
        .expect("ingest into a restored month");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_archive_command_killed_at_random_moments_finishes_on_the_next_run() {
    let (url, repository) = fresh().await;
    let pool = repository.pool().clone();
    let (month, _, print) = old_month(&repository, 27, 20_000).await;
    let table = table_name(month);
    let dir = temp_dir();
    let archive = || {
        Command::new(env!("CARGO_BIN_EXE_analytics-repo"))
            .arg("archive")
            .arg("--dir")
            .arg(&dir)
            .args(["--retention-months", "24"])
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start analytics-repo archive")
    };
    let mut rng = SmallRng::seed_from_u64(3);
    let mut states = Vec::new();
    // Growing delays, until a run finishes before its kill.
    let mut delay_ms = 10.0f64;
    while states.last().is_none_or(|(_, _, finished)| !finished) && delay_ms < 5_000.0 {
        let mut child = archive();
        let delay = delay_ms as u64 + rng.random_range(0..10);
        delay_ms *= 1.5;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill().await;
        let state = state(&pool, month).await;
        // Whatever the moment, every row is still in exactly one place.
        match state.as_deref() {
            None | Some("detached") | Some("exported") => {
                assert!(table_exists(&pool, &table).await, "{state:?}");
                assert_eq!(
                    fingerprint_of_table(&pool, &table).await,
                    print,
                    "after a kill at {delay} ms ({state:?})"
                );
            }
            Some("dropped") => {}
            other => panic!("unexpected state {other:?}"),
        }
        states.push((delay, state, finished));
    }
    eprintln!("kills (delay ms, state left, had exited): {states:?}");
    assert!(
        states.iter().any(|(_, _, finished)| !finished),
        "no run was killed: {states:?}"
    );
    let status = archive().wait().await.unwrap();
    assert!(
        status.success(),
        "the last run failed ({status}); kills: {states:?}"
    );
    let record = sqlx::query_as::<_, (String, i64, String)>(
        "SELECT state, rows, checksum::text FROM archived_months WHERE month = $1",
    )
    .bind(month)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        record,
        ("dropped".to_owned(), print.0, print.1.clone()),
        "{states:?}"
    );
    assert!(!table_exists(&pool, &table).await);
    assert_eq!(month_fingerprint(&pool, month).await.0, 0);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(leftovers, [format!("{table}.csv.zst")]);

    let restore = Command::new(env!("CARGO_BIN_EXE_analytics-repo"))
        .arg("restore")
        .arg("--dir")
        .arg(&dir)
        .args(["--month", &month.format("%Y-%m").to_string()])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(restore.success());
    assert_eq!(month_fingerprint(&pool, month).await, print);
    assert_eq!(state(&pool, month).await.as_deref(), Some("restored"));
    let _ = std::fs::remove_dir_all(&dir);
}

async fn fingerprint_of_table(pool: &PgPool, table: &str) -> (i64, String) {
    sqlx::query_as(&format!(
        "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {table} t"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}
