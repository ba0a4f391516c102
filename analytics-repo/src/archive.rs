//! Archival of old months to cold storage, and their restore.
//!
//! A month goes through recorded steps, each one idempotent, so an archiver killed at any
//! point and run again finishes the job with no row lost or duplicated (ADR 0017):
//!
//! 1. **detach**: one short transaction, under `lock_timeout`, detaches the partition and
//!    records the month as `detached`. From then on no write can reach its rows (the
//!    repository refuses events of archived months and maintenance does not recreate them).
//! 2. **export**: `COPY … TO STDOUT (FORMAT csv)` streamed through zstd into
//!    `<dir>/events_pYYYYMM.csv.zst.partial`, synced, renamed. The file is then loaded back
//!    into a temporary table and its row count and checksum
//!    (`sum(hashtextextended(row::text, 0))`, order-independent) must equal the detached
//!    table's; only then is the month recorded `exported`, with the file's SHA-256.
//! 3. **drop**: the file's SHA-256 is checked again and, in one transaction, the table is
//!    dropped and the month recorded `dropped`.
//!
//! Restore reverses it: the file (SHA-256 checked) is loaded into a new table, its count and
//! checksum must equal the manifest's, and the table is attached and the month recorded
//! `restored` in one transaction. The daily rollups are never archived: the reports of an
//! archived month still answer.
//!
//! One archiver at a time: each holds a session advisory lock, which PostgreSQL releases
//! when the archiver's connection ends, killed or not.

use std::{
    fs::File,
    io::{BufWriter, Read as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use chrono::NaiveDate;
use futures_util::TryStreamExt as _;
use sha2::{Digest as _, Sha256};
use sqlx::{PgConnection, PgPool, pool::PoolConnection};

use crate::partitions::{self, Maintenance, month_of, table_name};

/// The advisory lock key only one archiver holds.
const ARCHIVE_LOCK: i64 = 0x616e_616c_7974_0002;

/// A month's archive as recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArchivedMonth {
    /// The month (its first day).
    pub month: NaiveDate,
    /// `detached`, `exported`, `dropped` or `restored`.
    pub state: String,
    /// The file.
    pub path: String,
    /// Rows in it.
    pub rows: i64,
    /// The rows' checksum, as PostgreSQL computes it.
    pub checksum: String,
    /// The file's SHA-256, hex.
    pub file_sha256: String,
    /// The file's size.
    pub file_bytes: i64,
}

/// The archiver: where files go and how long DDL may wait for locks.
#[derive(Debug, Clone)]
pub struct Archiver {
    pool: PgPool,
    dir: PathBuf,
    maintenance: Maintenance,
}

/// Holds the archiver's lock for as long as it lives.
struct Lock(PoolConnection<sqlx::Postgres>);

impl Lock {
    async fn take(pool: &PgPool) -> anyhow::Result<Self> {
        let mut conn = pool.acquire().await?;
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(ARCHIVE_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        ensure!(
            held,
            "another archiver is running (it holds the archive lock)"
        );
        Ok(Self(conn))
    }

    async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(ARCHIVE_LOCK)
            .execute(&mut *self.0)
            .await;
    }
}

impl Archiver {
    /// Archives into `dir` (created if missing).
    pub fn new(pool: PgPool, dir: impl Into<PathBuf>, maintenance: Maintenance) -> Self {
        Self {
            pool,
            dir: dir.into(),
            maintenance,
        }
    }

    /// Archives every month before `cutoff`'s month, finishing first any month a killed
    /// archiver left half done; the months archived.
    pub async fn archive_before(&self, cutoff: NaiveDate) -> anyhow::Result<Vec<ArchivedMonth>> {
        let lock = Lock::take(&self.pool).await?;
        let result = self.archive_locked(month_of(cutoff)).await;
        lock.release().await;
        result
    }

    async fn archive_locked(&self, cutoff: NaiveDate) -> anyhow::Result<Vec<ArchivedMonth>> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let mut months: Vec<NaiveDate> = sqlx::query_scalar(
            "SELECT month FROM archived_months WHERE state IN ('detached', 'exported')",
        )
        .fetch_all(&self.pool)
        .await?;
        months.extend(
            partitions::existing(&self.pool)
                .await?
                .into_iter()
                .filter(|month| *month < cutoff),
        );
        months.sort_unstable();
        months.dedup();
        let mut done = Vec::new();
        for month in months {
            done.push(self.archive_month(month).await?);
        }
        Ok(done)
    }

    /// Archives one month, resuming from its recorded step.
    async fn archive_month(&self, month: NaiveDate) -> anyhow::Result<ArchivedMonth> {
        loop {
            let state = self.record(month).await?.map(|r| r.state);
            match state.as_deref() {
                None | Some("restored") => self.detach(month).await?,
                Some("detached") => self.export(month).await?,
                Some("exported") => self.drop_table(month).await?,
                Some("dropped") => {
                    let record = self.record(month).await?.expect("recorded");
                    tracing::info!(%month, rows = record.rows, path = record.path, "month archived");
                    return Ok(record);
                }
                Some(other) => bail!("month {month} is in an unknown state {other:?}"),
            }
        }
    }

    /// The manifest's row for `month`.
    pub async fn record(&self, month: NaiveDate) -> anyhow::Result<Option<ArchivedMonth>> {
        let row: Option<(NaiveDate, String, String, i64, String, String, i64)> = sqlx::query_as(
            "SELECT month, state, path, rows, checksum::text, file_sha256, file_bytes
             FROM archived_months WHERE month = $1",
        )
        .bind(month)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(
            |(month, state, path, rows, checksum, file_sha256, file_bytes)| ArchivedMonth {
                month,
                state,
                path,
                rows,
                checksum,
                file_sha256,
                file_bytes,
            },
        ))
    }

    /// Every recorded month.
    pub async fn manifest(&self) -> anyhow::Result<Vec<ArchivedMonth>> {
        let months: Vec<NaiveDate> =
            sqlx::query_scalar("SELECT month FROM archived_months ORDER BY month")
                .fetch_all(&self.pool)
                .await?;
        let mut records = Vec::with_capacity(months.len());
        for month in months {
            records.extend(self.record(month).await?);
        }
        Ok(records)
    }

    fn path(&self, month: NaiveDate) -> PathBuf {
        self.dir.join(format!("{}.csv.zst", table_name(month)))
    }

    async fn detach(&self, month: NaiveDate) -> anyhow::Result<()> {
        let table = table_name(month);
        let path = self.path(month).display().to_string();
        let detached = partitions::retry_on_lock_timeout(self.maintenance, || async {
            let mut tx = self.pool.begin().await?;
            partitions::set_lock_timeout(&mut tx, self.maintenance).await?;
            sqlx::query(&format!("ALTER TABLE events DETACH PARTITION {table}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO archived_months
                     (month, state, path, rows, checksum, file_sha256, file_bytes)
                 VALUES ($1, 'detached', $2, 0, 0, '', 0)
                 ON CONFLICT (month) DO UPDATE
                 SET state = 'detached', path = $2, rows = 0, checksum = 0,
                     file_sha256 = '', file_bytes = 0, updated_at = now()",
            )
            .bind(month)
            .bind(&path)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })
        .await
        .with_context(|| format!("cannot detach {table}"))?;
        ensure!(
            detached.is_some(),
            "{table} could not be detached: its locks were not had in time; run again"
        );
        Ok(())
    }

    async fn export(&self, month: NaiveDate) -> anyhow::Result<()> {
        let table = table_name(month);
        let path = self.path(month);
        let partial = path.with_extension("zst.partial");
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        let (rows, checksum) = fingerprint(&mut conn, &table).await?;
        {
            let file = File::create(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?;
            let mut encoder = zstd::Encoder::new(BufWriter::new(file), 3)?;
            let mut stream = conn
                .copy_out_raw(&format!("COPY {table} TO STDOUT (FORMAT csv)"))
                .await?;
            while let Some(chunk) = stream.try_next().await? {
                encoder.write_all(&chunk)?;
            }
            drop(stream);
            let file = encoder.finish()?.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
        }
        std::fs::rename(&partial, &path)?;
        sync_dir(&self.dir)?;
        let (file_sha256, file_bytes) = file_digest(&path)?;
        // Read back what was written, as a restore would, and compare.
        let (file_rows, file_checksum) = load_and_fingerprint(&mut conn, &path, None).await?;
        ensure!(
            (file_rows, &file_checksum) == (rows, &checksum),
            "{}: the file holds {file_rows} rows (checksum {file_checksum}) but {table} holds \
             {rows} (checksum {checksum}); nothing recorded, run again",
            path.display()
        );
        sqlx::query("RESET statement_timeout")
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "UPDATE archived_months
             SET state = 'exported', rows = $2, checksum = $3::numeric, file_sha256 = $4,
                 file_bytes = $5, path = $6, updated_at = now()
             WHERE month = $1 AND state = 'detached'",
        )
        .bind(month)
        .bind(rows)
        .bind(&checksum)
        .bind(&file_sha256)
        .bind(file_bytes as i64)
        // The file just written: a run resumed with another directory than the one that
        // detached the month writes there, and the drop and a restore must look there.
        .bind(path.display().to_string())
        .execute(&mut *conn)
        .await?;
        tracing::info!(%month, rows, file_bytes, "month exported and verified");
        Ok(())
    }

    async fn drop_table(&self, month: NaiveDate) -> anyhow::Result<()> {
        let record = self.record(month).await?.context("no manifest row")?;
        let (sha, _) = file_digest(Path::new(&record.path))?;
        ensure!(
            sha == record.file_sha256,
            "{} changed since it was verified (SHA-256 {sha}, recorded {}); the table is kept",
            record.path,
            record.file_sha256
        );
        let table = table_name(month);
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE archived_months SET state = 'dropped', updated_at = now()
             WHERE month = $1 AND state = 'exported'",
        )
        .bind(month)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Brings an archived month back into `events`, verified against the manifest.
    pub async fn restore(&self, month: NaiveDate) -> anyhow::Result<ArchivedMonth> {
        let lock = Lock::take(&self.pool).await?;
        let result = self.restore_locked(month_of(month)).await;
        lock.release().await;
        result
    }

    async fn restore_locked(&self, month: NaiveDate) -> anyhow::Result<ArchivedMonth> {
        let record = self
            .record(month)
            .await?
            .with_context(|| format!("month {month} was never archived"))?;
        ensure!(
            record.state == "dropped",
            "month {month} is {}, not archived; only a dropped month can be restored",
            record.state
        );
        let (sha, _) = file_digest(Path::new(&record.path))
            .with_context(|| format!("the archive of {month} is unreadable"))?;
        ensure!(
            sha == record.file_sha256,
            "{} has SHA-256 {sha} but {} was recorded; refusing to restore it",
            record.path,
            record.file_sha256
        );
        let table = table_name(month);
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        // What a restore killed half-way left behind (never attached: the state says so).
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(&mut *conn)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {table} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        ))
        .execute(&mut *conn)
        .await?;
        let (rows, checksum) =
            load_and_fingerprint(&mut conn, Path::new(&record.path), Some(&table)).await?;
        ensure!(
            (rows, &checksum) == (record.rows, &record.checksum),
            "{} loaded {rows} rows (checksum {checksum}) but the manifest says {} ({}); \
             the table {table} is left detached for inspection",
            record.path,
            record.rows,
            record.checksum
        );
        sqlx::query("RESET statement_timeout")
            .execute(&mut *conn)
            .await?;
        drop(conn);
        // The range CHECK and index, then the attach, exactly as a new month is made.
        let attached = partitions::create_month(&self.pool, month, self.maintenance).await?;
        ensure!(
            attached.is_some(),
            "{table} is loaded and verified but could not be attached (locks); run restore again"
        );
        sqlx::query(
            "UPDATE archived_months SET state = 'restored', updated_at = now() WHERE month = $1",
        )
        .bind(month)
        .execute(&self.pool)
        .await?;
        tracing::info!(%month, rows, "month restored and verified");
        Ok(self.record(month).await?.expect("recorded"))
    }
}

/// Rows and checksum of `table`, computed by PostgreSQL.
async fn fingerprint(conn: &mut PgConnection, table: &str) -> anyhow::Result<(i64, String)> {
    Ok(sqlx::query_as(&format!(
        "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {table} t"
    ))
    .fetch_one(conn)
    .await?)
}

/// Loads the archive at `path` into `table` (a temporary copy of `events` when `None`) and
/// fingerprints what was loaded.
async fn load_and_fingerprint(
    conn: &mut PgConnection,
    path: &Path,
    table: Option<&str>,
) -> anyhow::Result<(i64, String)> {
    let table = match table {
        Some(table) => table.to_owned(),
        None => {
            sqlx::query("DROP TABLE IF EXISTS pg_temp.archive_check")
                .execute(&mut *conn)
                .await?;
            sqlx::query("CREATE TEMP TABLE archive_check (LIKE events)")
                .execute(&mut *conn)
                .await?;
            "archive_check".to_owned()
        }
    };
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut decoder = zstd::Decoder::new(file)?;
    let mut copy = conn
        .copy_in_raw(&format!("COPY {table} FROM STDIN (FORMAT csv)"))
        .await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let read = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) => {
                let _ = copy.abort("the archive could not be read").await;
                return Err(error).with_context(|| format!("{} is corrupt", path.display()));
            }
        };
        copy.send(&buf[..read]).await?;
    }
    copy.finish().await?;
    let fingerprint = fingerprint(conn, &table).await?;
    if table == "archive_check" {
        sqlx::query("DROP TABLE pg_temp.archive_check")
            .execute(&mut *conn)
            .await?;
    }
    Ok(fingerprint)
}

fn file_digest(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let read = file.read(&mut buf)?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
        bytes += read as u64;
    }
    let digest = hasher.finalize();
    let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, bytes))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
