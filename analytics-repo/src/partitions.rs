//! Monthly partitions, made ahead by the service itself, and the default partition kept empty.
//!
//! `CREATE TABLE … PARTITION OF` takes ACCESS EXCLUSIVE on `events`, so behind a long report
//! it would wait, and every insert would queue behind it. Instead a month is made in steps
//! that never lock `events` exclusively: the table is created on its own (with its index and a
//! CHECK matching its range, which spares ATTACH a scan of it), then, in one short
//! transaction under `lock_timeout`, rows of that month are moved out of the default partition
//! and the table is attached. ATTACH takes SHARE UPDATE EXCLUSIVE on `events`, which inserts
//! and reports do not conflict with, and ACCESS EXCLUSIVE on the new table and on the default
//! partition; reports never read the default partition (their ranges are bounded, and the
//! pool plans with parameters, so it is pruned). When the lock is not had in time, the step
//! is given up and retried, so ingest never waits behind it for longer than `lock_timeout`.

use std::time::Duration;

use chrono::{Datelike as _, Months, NaiveDate};
use sqlx::{PgConnection, PgPool};

use crate::repository::start_of;

/// The first day of `day`'s month.
pub fn month_of(day: NaiveDate) -> NaiveDate {
    day.with_day(1).expect("every month has a first day")
}

/// The partition of `month`: `events_pYYYYMM`.
pub fn table_name(month: NaiveDate) -> String {
    format!("events_p{:04}{:02}", month.year(), month.month())
}

/// The month after `month`.
pub fn next_month(month: NaiveDate) -> NaiveDate {
    month + Months::new(1)
}

/// How partition maintenance behaves.
#[derive(Debug, Clone, Copy)]
pub struct Maintenance {
    /// How long a DDL step may wait for its locks before it gives up (and is retried).
    pub lock_timeout: Duration,
    /// Attempts per step before it is left to the next round.
    pub attempts: u32,
}

impl Default for Maintenance {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_millis(200),
            attempts: 20,
        }
    }
}

/// What a round of maintenance did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// Months attached.
    pub created: Vec<NaiveDate>,
    /// Rows moved out of the default partition.
    pub drained_rows: u64,
    /// Steps given up because their locks were not had in time.
    pub lock_timeouts: u32,
}

/// The months `events` has a partition for.
pub async fn existing(pool: &PgPool) -> Result<Vec<NaiveDate>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'events'::regclass AND c.relname ~ '^events_p[0-9]{6}$'
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(names
        .iter()
        .filter_map(|name| {
            let digits = name.strip_prefix("events_p")?;
            NaiveDate::from_ymd_opt(digits[..4].parse().ok()?, digits[4..].parse().ok()?, 1)
        })
        .collect())
}

/// Makes sure `first..=last` (months) and every month with rows in the default partition have
/// a partition, moving those rows into it.
pub async fn ensure(
    pool: &PgPool,
    first: NaiveDate,
    last: NaiveDate,
    maintenance: Maintenance,
) -> Result<Round, sqlx::Error> {
    let have = existing(pool).await?;
    let mut wanted: Vec<NaiveDate> = sqlx::query_scalar(
        "SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')::date
         FROM events_default",
    )
    .fetch_all(pool)
    .await?;
    let mut month = month_of(first);
    while month <= last {
        wanted.push(month);
        month = next_month(month);
    }
    wanted.sort_unstable();
    wanted.dedup();
    let mut round = Round::default();
    for month in wanted.into_iter().filter(|m| !have.contains(m)) {
        // A month of the archive is not made again: its rows would be lost to a restore.
        let archived: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM archived_months WHERE month = $1 AND state <> 'restored')",
        )
        .bind(month)
        .fetch_one(pool)
        .await?;
        if archived {
            continue;
        }
        match create_month(pool, month, maintenance).await? {
            Some(moved) => {
                round.created.push(month);
                round.drained_rows += moved;
            }
            None => round.lock_timeouts += 1,
        }
    }
    Ok(round)
}

/// Creates and attaches `month`'s partition; the rows moved out of the default partition, or
/// `None` when its locks were not had within the attempts.
pub async fn create_month(
    pool: &PgPool,
    month: NaiveDate,
    maintenance: Maintenance,
) -> Result<Option<u64>, sqlx::Error> {
    let table = table_name(month);
    let (from, to) = (start_of(month), start_of(next_month(month)));
    let timeout = format!(
        "SET lock_timeout = '{}ms'",
        maintenance.lock_timeout.as_millis()
    );
    // Each of these locks only the new table.
    let mut conn = pool.acquire().await?;
    sqlx::query(&timeout).execute(&mut *conn).await?;
    let prepare = async {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        ))
        .execute(&mut *conn)
        .await?;
        sqlx::query(&format!(
            "DO $$ BEGIN
                 ALTER TABLE {table} ADD CONSTRAINT {table}_range
                 CHECK (created_at >= '{from}' AND created_at < '{to}');
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            from = from.to_rfc3339(),
            to = to.to_rfc3339(),
        ))
        .execute(&mut *conn)
        .await?;
        sqlx::query(&format!(
            "CREATE INDEX IF NOT EXISTS {table}_tenant_id ON {table} (tenant_id, id)"
        ))
        .execute(&mut *conn)
        .await?;
        sqlx::query(&format!(
            "CREATE INDEX IF NOT EXISTS {table}_created_at ON {table} USING brin (created_at)"
        ))
        .execute(&mut *conn)
        .await?;
        Ok::<_, sqlx::Error>(())
    };
    let prepared = prepare.await;
    sqlx::query("RESET lock_timeout")
        .execute(&mut *conn)
        .await?;
    prepared?;
    drop(conn);

    let attached =
        retry_on_lock_timeout(maintenance, || attach(pool, &table, from, to, maintenance)).await?;
    match attached {
        Some(moved) => tracing::info!(%month, table, moved, "partition attached"),
        None => tracing::warn!(
            table,
            "attach did not get its locks; left to the next round"
        ),
    }
    Ok(attached)
}

/// Runs `step` until it does not fail for a lock it waited too long for (SQLSTATE 55P03,
/// lock_not_available), backing off between attempts; `None` when every attempt did.
pub async fn retry_on_lock_timeout<T, F, Fut>(
    maintenance: Maintenance,
    mut step: F,
) -> Result<Option<T>, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut wait = Duration::from_millis(50);
    for _ in 0..maintenance.attempts {
        match step().await {
            Ok(done) => return Ok(Some(done)),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
                tracing::debug!("a DDL step gave up waiting for its locks; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(error) => return Err(error),
        }
    }
    Ok(None)
}

/// `SET LOCAL lock_timeout` for the transaction on `conn`.
pub async fn set_lock_timeout(
    conn: &mut PgConnection,
    maintenance: Maintenance,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        maintenance.lock_timeout.as_millis()
    ))
    .execute(conn)
    .await?;
    Ok(())
}

async fn attach(
    pool: &PgPool,
    table: &str,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
    maintenance: Maintenance,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    set_lock_timeout(&mut tx, maintenance).await?;
    let moved = sqlx::query(&format!(
        "WITH moved AS (
             DELETE FROM events_default WHERE created_at >= $1 AND created_at < $2 RETURNING *
         )
         INSERT INTO {table} SELECT * FROM moved"
    ))
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(&format!(
        "ALTER TABLE events ATTACH PARTITION {table} FOR VALUES FROM ('{}') TO ('{}')",
        from.to_rfc3339(),
        to.to_rfc3339()
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_named_and_stepped() {
        let day = NaiveDate::from_ymd_opt(2024, 12, 31).unwrap();
        assert_eq!(month_of(day).to_string(), "2024-12-01");
        assert_eq!(table_name(month_of(day)), "events_p202412");
        assert_eq!(next_month(month_of(day)).to_string(), "2025-01-01");
    }
}
