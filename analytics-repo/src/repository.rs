//! [`EventRepository`]: every statement the service runs against its events, over one tuned
//! pool.
//!
//! Ingest writes a batch in one transaction: the raw rows (by binary `COPY`, the fastest path
//! measured; `UNNEST` and multi-row `INSERT` are kept for the bench that compares them), and,
//! for the rows older than the watermark (late events), their sums added to `daily_rollups`.
//! The roll-up ([`EventRepository::roll_up`], every second in the service) folds the raw rows
//! between the watermark and now into the rollups and moves the watermark. The
//! shared/exclusive advisory lock keeps those two apart, so every row is counted in exactly one
//! of "before the watermark, in the rollups" or "after it, raw", and a report that reads both
//! in one `REPEATABLE READ` snapshot equals the naive query over the raw rows. Closed days come
//! from the rollups; of the open day, only the last second or so is read raw.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, SecondsFormat, TimeDelta, Utc};
use futures_util::StreamExt as _;
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Row as _};
use uuid::Uuid;

use crate::{
    event::{NewEvent, floor_id},
    partitions::month_of,
};

/// The advisory lock key ingest holds shared and day closing holds exclusively
/// (`'analytics.rollup'` hashed; any constant unique in the database does).
const ROLLUP_LOCK: i64 = 0x616e_616c_7974_0001;

/// How a batch reaches the `events` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IngestPath {
    /// `COPY events FROM STDIN (FORMAT binary)`: the fastest measured (README, benches).
    #[default]
    Copy,
    /// `INSERT … SELECT * FROM unnest($1::uuid[], …)`: one statement, five array parameters.
    Unnest,
    /// `INSERT … VALUES (…), (…)`: up to 13,000 rows per statement (65,535 parameters).
    Insert,
}

impl IngestPath {
    /// Every path, for benches.
    pub const ALL: [Self; 3] = [Self::Copy, Self::Unnest, Self::Insert];

    /// Its name in benches and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy_binary",
            Self::Unnest => "unnest",
            Self::Insert => "multi_row_insert",
        }
    }
}

/// What a stored batch changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Rows stored.
    pub rows: u64,
    /// Rows older than the watermark (late events), added to the rollups too.
    pub late_rows: u64,
    /// Tenants with late events for days before today: their cached reports are stale. (Events
    /// of today change only answers that include today, which the cache keeps for seconds.)
    pub late_tenants: Vec<Uuid>,
}

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Events of tenants that do not exist: (index in the batch, tenant).
    #[error("{} events name tenants that do not exist", .0.len())]
    UnknownTenants(Vec<(usize, Uuid)>),
    /// Events of months already archived: (index in the batch, month).
    #[error("{} events fall in archived months", .0.len())]
    ArchivedMonths(Vec<(usize, NaiveDate)>),
    /// PostgreSQL failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// One row of a daily report: a tenant's day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DailyRow {
    /// The tenant.
    pub tenant_id: Uuid,
    /// The UTC day.
    pub date: NaiveDate,
    /// Its events.
    pub events: i64,
    /// The sum of their processing times, ms.
    pub processing_time_sum: i64,
    /// `AVG(processing_time)` exactly as PostgreSQL prints it (a numeric, as text):
    /// `sum::numeric / count`, which is how `AVG` of an integer column finishes. The naive
    /// query reads it from `AVG` itself and leaves `processing_time_sum` at 0.
    pub avg_time: String,
}

/// One stored event, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    /// Its id (UUIDv7, the listing's cursor).
    pub id: Uuid,
    /// When it happened.
    pub created_at: DateTime<Utc>,
    /// Milliseconds.
    pub processing_time: i32,
    /// What happened.
    pub name: String,
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Tenant {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// `free`, `pro` or `enterprise`.
    pub plan: String,
}

/// The plans a tenant may be on.
pub const PLANS: [&str; 3] = ["free", "pro", "enterprise"];

/// Midnight UTC starting `day`.
pub fn start_of(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

/// The repository. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct EventRepository {
    pool: PgPool,
}

impl EventRepository {
    /// Over `pool` (see [`crate::db::connect`] for how it is tuned).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Stores `events` in one transaction by `path`: all of them or, when a tenant is unknown
    /// or a month archived, none.
    pub async fn ingest(
        &self,
        events: &[NewEvent],
        path: IngestPath,
    ) -> Result<Ingested, IngestError> {
        if events.is_empty() {
            return Ok(Ingested::default());
        }
        let mut tx = self.pool.begin().await?;
        // The lock in a statement of its own: a statement reads the snapshot it started with,
        // so a read in the same statement as the wait would see the watermark from before a
        // roll-up it waited for, and store as raw the events that roll-up already passed.
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(ROLLUP_LOCK)
            .execute(&mut *tx)
            .await?;
        let watermark: DateTime<Utc> = sqlx::query_scalar("SELECT rolled_up_to FROM rollup_state")
            .fetch_one(&mut *tx)
            .await?;
        check_tenants(&mut tx, events).await?;
        let late = late_sums(events, watermark);
        if let Some(oldest) = late.keys().map(|(_, day)| *day).min() {
            check_months(&mut tx, events, oldest).await?;
        }
        match path {
            IngestPath::Copy => copy_binary(&mut tx, events).await?,
            IngestPath::Unnest => insert_unnest(&mut tx, events).await?,
            IngestPath::Insert => insert_values(&mut tx, events).await?,
        }
        let late_rows = late.values().map(|(count, _)| *count).sum::<i64>() as u64;
        if !late.is_empty() {
            add_to_rollups(&mut tx, &late).await?;
        }
        tx.commit().await?;
        // A change to today is left to the cache's short TTL for answers that include today;
        // a change to an earlier day would otherwise live as long as a closed-days answer.
        let today = Utc::now().date_naive();
        let mut late_tenants: Vec<Uuid> = late
            .keys()
            .filter(|(_, day)| *day < today)
            .map(|(tenant, _)| *tenant)
            .collect();
        late_tenants.dedup();
        Ok(Ingested {
            rows: events.len() as u64,
            late_rows,
            late_tenants,
        })
    }

    /// Folds the raw rows from the watermark to now into the rollups and moves the
    /// watermark to now, in one transaction holding the roll-up lock exclusively (batches wait
    /// for it; it waits for batches in flight); the new watermark and the rows folded.
    pub async fn roll_up(&self) -> Result<(DateTime<Utc>, u64), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // As in ingest: the watermark is read after the wait, by a statement of its own, or a
        // roll-up queued behind another would fold that one's rows a second time.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ROLLUP_LOCK)
            .execute(&mut *tx)
            .await?;
        let (from, to): (DateTime<Utc>, DateTime<Utc>) =
            sqlx::query_as("SELECT rolled_up_to, greatest(rolled_up_to, now()) FROM rollup_state")
                .fetch_one(&mut *tx)
                .await?;
        let folded: Option<i64> = sqlx::query_scalar(
            "WITH sums AS (
                 SELECT tenant_id, (created_at AT TIME ZONE 'UTC')::date AS day,
                        count(*) AS events, sum(processing_time) AS total
                 FROM events WHERE created_at >= $1 AND created_at < $2
                 GROUP BY 1, 2 ORDER BY 1, 2
             ), added AS (
                 INSERT INTO daily_rollups AS r (tenant_id, day, events, processing_time_sum)
                 SELECT tenant_id, day, events, total FROM sums
                 ON CONFLICT (tenant_id, day) DO UPDATE
                 SET events = r.events + excluded.events,
                     processing_time_sum = r.processing_time_sum + excluded.processing_time_sum
             )
             SELECT sum(events)::int8 FROM sums",
        )
        .bind(from)
        .bind(to)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE rollup_state SET rolled_up_to = $1")
            .bind(to)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((to, folded.unwrap_or(0) as u64))
    }

    /// The watermark: events before it are in the rollups.
    pub async fn rolled_up_to(&self) -> Result<DateTime<Utc>, sqlx::Error> {
        sqlx::query_scalar("SELECT rolled_up_to FROM rollup_state")
            .fetch_one(&self.pool)
            .await
    }

    /// The enterprise report from `from` on: the rollups, plus the raw rows after the
    /// watermark, in one snapshot; newest day first, then by tenant.
    pub async fn enterprise_report(&self, from: NaiveDate) -> Result<Vec<DailyRow>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let (watermark, now): (DateTime<Utc>, DateTime<Utc>) =
            sqlx::query_as("SELECT rolled_up_to, now() FROM rollup_state")
                .fetch_one(&mut *tx)
                .await?;
        let open_from = start_of(from).max(watermark);
        // No event is later than this (the edge refuses them), and the bound lets the planner
        // prune the default partition, so a report never holds a lock partition
        // maintenance needs.
        let open_to = start_of(now.date_naive() + TimeDelta::days(2));
        // Read as binary COPY, not as a query's rows: at 140K rows, decoding each row through
        // sqlx took about as long as PostgreSQL took to produce them (README, "Queries").
        // COPY takes no parameters; every value written in is one of ours, typed, never a
        // client's text.
        let statement = format!(
            // Days before the watermark's are whole in the rollups and pass through as they
            // are; only the watermark's day (and any later) adds rollup and raw parts.
            "COPY (
             WITH enterprise AS MATERIALIZED (
                 SELECT ARRAY(SELECT id FROM tenants WHERE plan = 'enterprise') AS ids
             ), open_parts AS (
                 SELECT tenant_id, day, events, processing_time_sum AS total
                 FROM daily_rollups
                 WHERE tenant_id = ANY((SELECT ids FROM enterprise)::uuid[])
                   AND day >= greatest('{from}'::date, '{watermark_day}'::date)
                 UNION ALL
                 SELECT tenant_id, (created_at AT TIME ZONE 'UTC')::date,
                        count(*), sum(processing_time)
                 FROM events
                 WHERE tenant_id = ANY((SELECT ids FROM enterprise)::uuid[])
                   AND id >= '{floor}'::uuid
                   AND created_at >= '{open_from}'::timestamptz
                   AND created_at < '{open_to}'::timestamptz
                 GROUP BY 1, 2
             )
             SELECT tenant_id, day, events, processing_time_sum
             FROM daily_rollups
             WHERE tenant_id = ANY((SELECT ids FROM enterprise)::uuid[])
               AND day >= '{from}'::date AND day < '{watermark_day}'::date
             UNION ALL
             SELECT tenant_id, day, sum(events)::int8, sum(total)::int8
             FROM open_parts GROUP BY tenant_id, day
             ) TO STDOUT (FORMAT binary)",
            floor = floor_id(open_from),
            open_from = open_from.to_rfc3339_opts(SecondsFormat::Micros, true),
            open_to = open_to.to_rfc3339_opts(SecondsFormat::Micros, true),
            watermark_day = watermark.date_naive(),
        );
        // Decoded as PostgreSQL sends it (a message a row), so the decoding runs on one
        // core while PostgreSQL produces the rest on the other.
        let mut copy = tx.copy_out_raw(&statement).await?;
        let mut decoder = DaySumDecoder::default();
        while let Some(chunk) = copy.next().await {
            decoder.feed(&chunk?).map_err(protocol)?;
        }
        drop(copy);
        tx.commit().await?;
        let sums = decoder.finish().map_err(protocol)?;
        // Sorted and averaged here, not by PostgreSQL: at 100K rows its sort (spilling past
        // work_mem) and numeric division took about 80 of a 100 ms query (README, "Queries").
        Ok(newest_first(sums)
            .into_iter()
            .map(DaySum::averaged)
            .collect())
    }

    /// The seed's query as it was written, over raw rows only: the baseline the report is
    /// measured and checked against.
    pub async fn naive_enterprise_report(
        &self,
        from: NaiveDate,
    ) -> Result<Vec<DailyRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT tenant_id, DATE(created_at) AS date, COUNT(*) AS events,
                    AVG(processing_time)::text AS avg_time
             FROM events WHERE created_at >= $1
               AND tenant_id IN (SELECT id FROM tenants WHERE plan = 'enterprise')
             GROUP BY tenant_id, DATE(created_at) ORDER BY date DESC",
        )
        .bind(start_of(from))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| DailyRow {
                tenant_id: row.get(0),
                date: row.get(1),
                events: row.get(2),
                processing_time_sum: 0,
                avg_time: row.get(3),
            })
            .collect())
    }

    /// One tenant's days `from..=to`: the rollups, plus the raw rows after the watermark, in
    /// one snapshot; oldest first.
    pub async fn tenant_daily(
        &self,
        tenant: Uuid,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DailyRow>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let watermark: DateTime<Utc> = sqlx::query_scalar("SELECT rolled_up_to FROM rollup_state")
            .fetch_one(&mut *tx)
            .await?;
        let open_from = start_of(from).max(watermark);
        let open_to = start_of(to + TimeDelta::days(1));
        let rows = sqlx::query(
            "WITH parts AS (
                 SELECT tenant_id, day, events, processing_time_sum AS total
                 FROM daily_rollups
                 WHERE tenant_id = $1 AND day >= $2 AND day <= $3
                 UNION ALL
                 SELECT tenant_id, (created_at AT TIME ZONE 'UTC')::date,
                        count(*), sum(processing_time)
                 FROM events
                 WHERE tenant_id = $1 AND id >= $4 AND created_at >= $5 AND created_at < $6
                 GROUP BY 1, 2
             )
             SELECT tenant_id, day, sum(events)::int8, sum(total)::int8
             FROM parts GROUP BY tenant_id, day
             ORDER BY day",
        )
        .bind(tenant)
        .bind(from)
        .bind(to)
        .bind(floor_id(open_from))
        .bind(open_from)
        .bind(open_to)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows.iter().map(daily_row).collect())
    }

    /// A tenant's events in `[from, to)`, oldest first, `limit` after the id `after`.
    pub async fn list_events(
        &self,
        tenant: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let start = after.map_or(floor_id(from), |id| id.max(floor_id(from)));
        // The cursor's own millisecond bounds created_at too, which prunes the months before it.
        let from = after
            .and_then(|id| id.get_timestamp())
            .map(|ts| {
                let (secs, nanos) = ts.to_unix();
                DateTime::from_timestamp(secs as i64, nanos).unwrap_or(from)
            })
            .map_or(from, |cursor| cursor.max(from));
        let rows = sqlx::query(
            "SELECT id, created_at, processing_time, name FROM events
             WHERE tenant_id = $1 AND id > $2 AND created_at >= $3 AND created_at < $4
             ORDER BY id LIMIT $5",
        )
        .bind(tenant)
        .bind(if after.is_some() {
            start
        } else {
            // `id > floor - 1`: the floor id itself is a possible id.
            Uuid::from_u128(start.as_u128().saturating_sub(1))
        })
        .bind(from)
        .bind(to)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| StoredEvent {
                id: row.get(0),
                created_at: row.get(1),
                processing_time: row.get(2),
                name: row.get(3),
            })
            .collect())
    }

    /// The tenant, if it exists.
    pub async fn tenant(&self, id: Uuid) -> Result<Option<Tenant>, sqlx::Error> {
        sqlx::query_as("SELECT id, name, plan FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Creates a tenant.
    pub async fn create_tenant(&self, name: &str, plan: &str) -> Result<Tenant, sqlx::Error> {
        sqlx::query_as(
            "INSERT INTO tenants (id, name, plan) VALUES ($1, $2, $3) RETURNING id, name, plan",
        )
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(plan)
        .fetch_one(&self.pool)
        .await
    }

    /// Moves a tenant to `plan`; `None` when there is no such tenant.
    pub async fn set_plan(&self, id: Uuid, plan: &str) -> Result<Option<Tenant>, sqlx::Error> {
        sqlx::query_as("UPDATE tenants SET plan = $2 WHERE id = $1 RETURNING id, name, plan")
            .bind(id)
            .bind(plan)
            .fetch_optional(&self.pool)
            .await
    }

    /// Every tenant, by id.
    pub async fn tenants(&self) -> Result<Vec<Tenant>, sqlx::Error> {
        sqlx::query_as("SELECT id, name, plan FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await
    }
}

fn daily_row(row: &sqlx::postgres::PgRow) -> DailyRow {
    let (events, sum) = (row.get(2), row.get(3));
    DailyRow {
        tenant_id: row.get(0),
        date: row.get(1),
        events,
        processing_time_sum: sum,
        avg_time: exact_avg(sum, events),
    }
}

/// Newest day first, tenants in id order within a day: the naive query's `ORDER BY date
/// DESC`, with its ties settled. Rows go into one bucket per day (a report spans at most a
/// few hundred days) and each bucket is sorted by tenant, where they mostly arrive sorted
/// already: linear, where a comparison sort of 140K rows took 11 ms.
fn newest_first(rows: Vec<DaySum>) -> Vec<DaySum> {
    let Some(newest) = rows.iter().map(|r| r.date).max() else {
        return rows;
    };
    let age = |row: &DaySum| (newest - row.date).num_days() as usize;
    let mut starts = vec![0_usize; rows.iter().map(age).max().unwrap_or(0) + 2];
    for row in &rows {
        starts[age(row) + 1] += 1;
    }
    for i in 1..starts.len() {
        starts[i] += starts[i - 1];
    }
    let mut sorted = rows.clone();
    let mut next = starts.clone();
    for row in rows {
        let slot = &mut next[age(&row)];
        sorted[*slot] = row;
        *slot += 1;
    }
    for day in starts.windows(2) {
        sorted[day[0]..day[1]].sort_unstable_by_key(|r| r.tenant_id);
    }
    sorted
}

/// One (tenant, day) of a report before it is averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DaySum {
    tenant_id: Uuid,
    date: NaiveDate,
    events: i64,
    sum: i64,
}

impl DaySum {
    fn averaged(self) -> DailyRow {
        DailyRow {
            tenant_id: self.tenant_id,
            date: self.date,
            events: self.events,
            processing_time_sum: self.sum,
            avg_time: exact_avg(self.sum, self.events),
        }
    }
}

/// `sum / count` written exactly as PostgreSQL writes `AVG` of an integer column, which is
/// `numeric_div(sum, count)`: rounded half away from zero to the scale `select_div_scale`
/// picks for two integers, enough for 16 significant digits (`NUMERIC_MIN_SIG_DIGITS`),
/// counted in base-10000 digit groups. The reports are compared with PostgreSQL's own `AVG`
/// digit for digit (tests, `loadtest analytics`).
pub fn exact_avg(sum: i64, count: i64) -> String {
    if count <= 0 {
        return "NaN".to_owned();
    }
    let negative = sum < 0;
    let (sum, count) = (sum.unsigned_abs(), count.unsigned_abs());
    let scale = div_scale(sum, count);
    // The quotient's digits, then `scale` digits of the fraction by long division, as many
    // digits a step as keep `remainder × 10^k` within u64 (u128 only for a huge count): a
    // report averages some 140K rows, and a division a digit took most of its time.
    let mut digits = Vec::with_capacity(20 + scale + 2);
    push_decimal(&mut digits, sum / count);
    let mut remainder = sum % count;
    let mut left = scale;
    while left > 0 {
        let mut step = left.min(19);
        while step > 0 && count > u64::MAX / POW10[step] {
            step -= 1;
        }
        let quotient = if step > 0 {
            let r = remainder * POW10[step];
            remainder = r % count;
            r / count
        } else {
            step = 1;
            let r = u128::from(remainder) * 10;
            remainder = (r % u128::from(count)) as u64;
            (r / u128::from(count)) as u64
        };
        let at = digits.len();
        digits.resize(at + step, b'0');
        let mut q = quotient;
        for digit in digits[at..].iter_mut().rev() {
            *digit = b'0' + (q % 10) as u8;
            q /= 10;
        }
        left -= step;
    }
    // The next digit decides: 5 or more (an exact half included) rounds away from zero;
    // that digit is 5 or more exactly when 2 × remainder ≥ count (no overflow: both < 2^63).
    if remainder * 2 >= count {
        increment(&mut digits);
    }
    if scale > 0 {
        digits.insert(digits.len() - scale, b'.');
    }
    if negative && digits.iter().any(|&b| b != b'0' && b != b'.') {
        digits.insert(0, b'-');
    }
    String::from_utf8(digits).expect("digits are ASCII")
}

/// Appends `value` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut buffer = [0_u8; 20];
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&buffer[at..]);
}

/// 10^0 to 10^19, every power of ten a u64 holds.
const POW10: [u64; 20] = {
    let mut powers = [1_u64; 20];
    let mut i = 1;
    while i < 20 {
        powers[i] = powers[i - 1] * 10;
        i += 1;
    }
    powers
};

/// `select_div_scale` for two integers (display scale 0): 16 − 4 × the quotient's weight in
/// base-10000 groups, the weight one less when the dividend's first group is not above the
/// divisor's; clamped to 0..=1000.
fn div_scale(sum: u64, count: u64) -> usize {
    fn weight_and_first_group(value: u64) -> (i32, u64) {
        let (mut weight, mut group) = (0, value);
        while group >= 10_000 {
            group /= 10_000;
            weight += 1;
        }
        (weight, group)
    }
    let (w1, f1) = if sum == 0 {
        (0, 0)
    } else {
        weight_and_first_group(sum)
    };
    let (w2, f2) = weight_and_first_group(count);
    let mut weight = w1 - w2;
    if f1 <= f2 {
        weight -= 1;
    }
    (16 - weight * 4).clamp(0, 1000) as usize
}

/// Adds one to a decimal number's last digit, carrying (`999` becomes `1000`).
fn increment(digits: &mut Vec<u8>) {
    for byte in digits.iter_mut().rev() {
        if *byte == b'9' {
            *byte = b'0';
        } else {
            *byte += 1;
            return;
        }
    }
    digits.insert(0, b'1');
}

/// The (tenant, day) sums of the events before `watermark`, in key order, which is also the
/// order their rollup rows are locked in (so concurrent batches cannot deadlock).
fn late_sums(
    events: &[NewEvent],
    watermark: DateTime<Utc>,
) -> BTreeMap<(Uuid, NaiveDate), (i64, i64)> {
    let mut sums = BTreeMap::new();
    for event in events.iter().filter(|e| e.created_at < watermark) {
        let entry = sums.entry((event.tenant_id, event.day())).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += i64::from(event.processing_time);
    }
    sums
}

async fn check_tenants(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), IngestError> {
    let mut tenants: Vec<Uuid> = events.iter().map(|e| e.tenant_id).collect();
    tenants.sort_unstable();
    tenants.dedup();
    let known: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = ANY($1)")
        .bind(&tenants)
        .fetch_all(&mut *conn)
        .await?;
    if known.len() == tenants.len() {
        return Ok(());
    }
    let unknown: Vec<(usize, Uuid)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| !known.contains(&e.tenant_id))
        .map(|(index, e)| (index, e.tenant_id))
        .collect();
    Err(IngestError::UnknownTenants(unknown))
}

/// Refuses events of archived months: their rows are in cold storage and the partition is
/// gone, so a new row there would be lost to the next restore.
async fn check_months(
    conn: &mut PgConnection,
    events: &[NewEvent],
    oldest: NaiveDate,
) -> Result<(), IngestError> {
    let archived: Vec<NaiveDate> = sqlx::query_scalar(
        "SELECT month FROM archived_months WHERE state <> 'restored' AND month >= $1",
    )
    .bind(month_of(oldest))
    .fetch_all(&mut *conn)
    .await?;
    if archived.is_empty() {
        return Ok(());
    }
    let refused: Vec<(usize, NaiveDate)> = events
        .iter()
        .enumerate()
        .map(|(index, e)| (index, month_of(e.day())))
        .filter(|(_, month)| archived.contains(month))
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(IngestError::ArchivedMonths(refused))
    }
}

async fn add_to_rollups(
    conn: &mut PgConnection,
    sums: &BTreeMap<(Uuid, NaiveDate), (i64, i64)>,
) -> Result<(), sqlx::Error> {
    let (mut tenants, mut days, mut counts, mut totals) = (
        Vec::with_capacity(sums.len()),
        Vec::with_capacity(sums.len()),
        Vec::with_capacity(sums.len()),
        Vec::with_capacity(sums.len()),
    );
    for (&(tenant, day), &(count, total)) in sums {
        tenants.push(tenant);
        days.push(day);
        counts.push(count);
        totals.push(total);
    }
    sqlx::query(
        "INSERT INTO daily_rollups AS r (tenant_id, day, events, processing_time_sum)
         SELECT * FROM unnest($1::uuid[], $2::date[], $3::int8[], $4::int8[])
         ON CONFLICT (tenant_id, day) DO UPDATE
         SET events = r.events + excluded.events,
             processing_time_sum = r.processing_time_sum + excluded.processing_time_sum",
    )
    .bind(tenants)
    .bind(days)
    .bind(counts)
    .bind(totals)
    .execute(conn)
    .await?;
    Ok(())
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The batch in `COPY … (FORMAT binary)`'s encoding: header, one tuple per event, trailer.
pub fn encode_binary(events: &[NewEvent]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(19 + 2 + events.len() * 90);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags
    buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for event in events {
        buf.extend_from_slice(&5i16.to_be_bytes());
        buf.extend_from_slice(&16i32.to_be_bytes());
        buf.extend_from_slice(event.new_id().as_bytes());
        buf.extend_from_slice(&16i32.to_be_bytes());
        buf.extend_from_slice(event.tenant_id.as_bytes());
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(
            &(event.created_at.timestamp_micros() - PG_EPOCH_MICROS).to_be_bytes(),
        );
        buf.extend_from_slice(&4i32.to_be_bytes());
        buf.extend_from_slice(&event.processing_time.to_be_bytes());
        let name = event.name.as_str().as_bytes();
        buf.extend_from_slice(&(name.len() as i32).to_be_bytes());
        buf.extend_from_slice(name);
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    buf
}

fn protocol(what: &'static str) -> sqlx::Error {
    sqlx::Error::Protocol(format!("report COPY output: {what}"))
}

/// Decodes the output of `COPY (SELECT tenant_id, day, events, processing_time_sum …) TO
/// STDOUT (FORMAT binary)` chunk by chunk, as it arrives: the header, fixed-size rows of a
/// uuid, a date and two int8, and the trailer.
#[derive(Default)]
struct DaySumDecoder {
    /// Bytes of a header or row cut by a chunk's end.
    pending: Vec<u8>,
    header_read: bool,
    trailer_read: bool,
    rows: Vec<DaySum>,
}

impl DaySumDecoder {
    /// Field count, then length and value of each field.
    const ROW_BYTES: usize = 2 + (4 + 16) + (4 + 4) + (4 + 8) + (4 + 8);
    const SIGNATURE: &'static [u8] = b"PGCOPY\n\xff\r\n\0";

    fn feed(&mut self, chunk: &[u8]) -> Result<(), &'static str> {
        if self.pending.is_empty() {
            let used = self.decode(chunk)?;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(chunk);
            let used = self.decode(&pending)?;
            pending.drain(..used);
            self.pending = pending;
        }
        Ok(())
    }

    /// Decodes every whole header, row and trailer at the start of `input`; the bytes used.
    fn decode(&mut self, input: &[u8]) -> Result<usize, &'static str> {
        let mut used = 0;
        if !self.header_read {
            // Signature, flags, extension length, extension.
            let Some(fixed) = input.get(..Self::SIGNATURE.len() + 8) else {
                return Ok(0);
            };
            if !fixed.starts_with(Self::SIGNATURE) {
                return Err("no binary COPY signature");
            }
            let extension = be_i32(&fixed[Self::SIGNATURE.len() + 4..]);
            let extension = usize::try_from(extension).map_err(|_| "negative header extension")?;
            used = fixed.len() + extension;
            if input.len() < used {
                return Ok(0);
            }
            self.header_read = true;
        }
        while let Some(count) = input.get(used..used + 2) {
            if self.trailer_read {
                return Err("bytes after the trailer");
            }
            match i16::from_be_bytes([count[0], count[1]]) {
                -1 => {
                    self.trailer_read = true;
                    used += 2;
                    continue;
                }
                4 => {}
                _ => return Err("a row without four fields"),
            }
            let Some(row) = input.get(used..used + Self::ROW_BYTES) else {
                break;
            };
            self.rows.push(Self::row(&row[2..])?);
            used += Self::ROW_BYTES;
        }
        Ok(used)
    }

    fn row(fields: &[u8]) -> Result<DaySum, &'static str> {
        let lengths: [(usize, i32); 4] = [(0, 16), (20, 4), (28, 8), (40, 8)];
        if lengths
            .iter()
            .any(|&(at, len)| be_i32(&fields[at..]) != len)
        {
            return Err("a field of an unexpected length (or NULL)");
        }
        let tenant_id = Uuid::from_slice(&fields[4..20]).map_err(|_| "a malformed uuid")?;
        let days = be_i32(&fields[24..]);
        let date = PG_EPOCH_DATE
            .checked_add_signed(TimeDelta::days(i64::from(days)))
            .ok_or("a date out of range")?;
        let events = i64::from_be_bytes(fields[32..40].try_into().expect("8 bytes"));
        let sum = i64::from_be_bytes(fields[44..52].try_into().expect("8 bytes"));
        Ok(DaySum {
            tenant_id,
            date,
            events,
            sum,
        })
    }

    fn finish(self) -> Result<Vec<DaySum>, &'static str> {
        if !self.trailer_read || !self.pending.is_empty() {
            return Err("cut short");
        }
        Ok(self.rows)
    }
}

fn be_i32(bytes: &[u8]) -> i32 {
    i32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

/// PostgreSQL's day 0 for `date` in binary form.
const PG_EPOCH_DATE: NaiveDate = NaiveDate::from_ymd_opt(2000, 1, 1).expect("a valid date");

async fn copy_binary(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(
            "COPY events (id, tenant_id, created_at, processing_time, name) FROM STDIN (FORMAT binary)",
        )
        .await?;
    if let Err(error) = copy.send(encode_binary(events)).await {
        let _ = copy.abort("the batch could not be sent").await;
        return Err(error);
    }
    copy.finish().await?;
    Ok(())
}

async fn insert_unnest(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = events.iter().map(NewEvent::new_id).collect();
    let tenants: Vec<Uuid> = events.iter().map(|e| e.tenant_id).collect();
    let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.created_at).collect();
    let durations: Vec<i32> = events.iter().map(|e| e.processing_time).collect();
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    sqlx::query(
        "INSERT INTO events (id, tenant_id, created_at, processing_time, name)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::int4[], $5::text[])",
    )
    .bind(ids)
    .bind(tenants)
    .bind(times)
    .bind(durations)
    .bind(names)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_values(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    // 65,535 bind parameters per statement, five per row.
    for chunk in events.chunks(13_000) {
        let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO events (id, tenant_id, created_at, processing_time, name) ",
        );
        query.push_values(chunk, |mut row, event| {
            row.push_bind(event.new_id())
                .push_bind(event.tenant_id)
                .push_bind(event.created_at)
                .push_bind(event.processing_time)
                .push_bind(event.name.as_str());
        });
        // Not cached: each chunk size would be a statement of its own in the cache.
        query.build().persistent(false).execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_written_as_postgresql_writes_avg() {
        // Each pair printed by PostgreSQL 15: SELECT avg(x) FROM ... with that sum and count.
        let cases = [
            (3, 2, "1.5000000000000000"),
            (10, 3, "3.3333333333333333"),
            (20, 3, "6.6666666666666667"),
            (5, 1, "5.0000000000000000"),
            (1, 3, "0.33333333333333333333"),
            (0, 4, "0.00000000000000000000"),
            (123_456_789, 7, "17636684.142857142857"),
            (2_147_483_647, 1, "2147483647.00000000"),
            (99_999, 10_000, "9.9999000000000000"),
            (1_000, 3, "333.3333333333333333"),
        ];
        for (sum, count, printed) in cases {
            assert_eq!(exact_avg(sum, count), printed, "{sum} / {count}");
        }
    }

    /// COPY's binary output of `rows`, as PostgreSQL writes it.
    fn copy_output(rows: &[DaySum]) -> Vec<u8> {
        let mut out = b"PGCOPY\n\xff\r\n\0".to_vec();
        out.extend_from_slice(&0_i32.to_be_bytes());
        out.extend_from_slice(&4_i32.to_be_bytes());
        out.extend_from_slice(b"ext!");
        for row in rows {
            out.extend_from_slice(&4_i16.to_be_bytes());
            out.extend_from_slice(&16_i32.to_be_bytes());
            out.extend_from_slice(row.tenant_id.as_bytes());
            out.extend_from_slice(&4_i32.to_be_bytes());
            let days = (row.date - PG_EPOCH_DATE).num_days() as i32;
            out.extend_from_slice(&days.to_be_bytes());
            for value in [row.events, row.sum] {
                out.extend_from_slice(&8_i32.to_be_bytes());
                out.extend_from_slice(&value.to_be_bytes());
            }
        }
        out.extend_from_slice(&(-1_i16).to_be_bytes());
        out
    }

    fn sample() -> Vec<DaySum> {
        (0..5)
            .map(|i| DaySum {
                tenant_id: Uuid::from_u128(i * 7 + 1),
                date: NaiveDate::from_ymd_opt(1999, 12, 30).unwrap() + TimeDelta::days(i as i64),
                events: i as i64 + 1,
                sum: -(i as i64) * 1_000_000_007,
            })
            .collect()
    }

    #[test]
    fn copy_output_decodes_however_it_is_cut_into_chunks() {
        let rows = sample();
        let bytes = copy_output(&rows);
        for size in [1, 2, 3, 7, 53, 54, 55, bytes.len()] {
            let mut decoder = DaySumDecoder::default();
            for chunk in bytes.chunks(size) {
                decoder.feed(chunk).unwrap();
            }
            assert_eq!(decoder.finish().unwrap(), rows, "chunks of {size}");
        }
    }

    #[test]
    fn damaged_copy_output_is_an_error_not_a_short_answer() {
        let bytes = copy_output(&sample());
        let decode = |bytes: &[u8]| {
            let mut decoder = DaySumDecoder::default();
            decoder.feed(bytes)?;
            decoder.finish()
        };
        assert_eq!(decode(&bytes[..bytes.len() - 2]), Err("cut short"));
        assert_eq!(decode(&bytes[..bytes.len() - 30]), Err("cut short"));
        assert!(decode(&bytes[1..]).is_err());
        let mut null_sum = bytes.clone();
        // The first row's last field length: 42 bytes into the row, after the 23-byte header.
        null_sum[23 + 42..23 + 46].copy_from_slice(&(-1_i32).to_be_bytes());
        assert_eq!(
            decode(&null_sum),
            Err("a field of an unexpected length (or NULL)")
        );
        let mut extra = bytes;
        extra.push(0);
        assert_eq!(decode(&extra), Err("cut short"));
    }

    #[test]
    fn rows_come_newest_day_first_then_by_tenant() {
        let mut rows = sample();
        rows.extend(sample().into_iter().map(|mut r| {
            r.tenant_id = Uuid::from_u128(0);
            r
        }));
        rows.reverse();
        let sorted = newest_first(rows.clone());
        let mut expected = rows;
        expected.sort_by(|a, b| b.date.cmp(&a.date).then(a.tenant_id.cmp(&b.tenant_id)));
        assert_eq!(sorted, expected);
    }
}
