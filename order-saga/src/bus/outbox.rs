//! The transactional outbox: a message is written in the same transaction as the state it
//! follows from, and the [`Relay`] publishes it to its Redis stream after the commit.
//!
//! The relay claims rows with `FOR UPDATE SKIP LOCKED` in id order, publishes them in one
//! pipeline and deletes them in the same transaction. It keeps no "last id seen": a row
//! whose transaction commits after a row with a larger id has been published is simply
//! still in the table, and the next batch takes it. Several relays (one per instance) share
//! the rows without waiting on each other. A relay that publishes and then dies before its
//! commit leaves the rows to be published again; consumers absorb the duplicate through
//! their inbox.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::metrics::BusMetrics;
use crate::messages::Envelope;

/// Writes `envelope` to the outbox for `stream`, in the transaction `conn` is in.
pub async fn enqueue(
    conn: &mut PgConnection,
    stream: &str,
    envelope: &Envelope,
) -> sqlx::Result<()> {
    let body = serde_json::to_string(envelope).expect("an envelope always serializes");
    sqlx::query("INSERT INTO outbox (id, stream, body) VALUES ($1, $2, $3)")
        .bind(envelope.id)
        .bind(stream)
        .bind(body)
        .execute(conn)
        .await?;
    Ok(())
}

/// How the relay runs.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    /// Rows published per transaction.
    pub batch: i64,
    /// How often it looks for rows when nobody woke it (rows of another instance, rows
    /// left by a failed batch).
    pub poll: Duration,
    /// Approximate length each stream is trimmed to (`MAXLEN ~`): memory stays bounded, and
    /// a consumer that falls this far behind loses the oldest entries (see `lost`).
    pub stream_max_len: usize,
}

/// Publishes committed outbox rows. Cheap to clone; wake it with [`Relay::wake`] after a
/// commit that wrote the outbox, so a message does not wait for the next poll.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    redis: ConnectionManager,
    settings: RelaySettings,
    wake: Arc<Notify>,
    metrics: BusMetrics,
}

impl Relay {
    /// A relay over the outbox of `pool`'s schema.
    pub fn new(
        pool: PgPool,
        redis: ConnectionManager,
        settings: RelaySettings,
        metrics: BusMetrics,
    ) -> Self {
        Self {
            pool,
            redis,
            settings,
            wake: Arc::new(Notify::new()),
            metrics,
        }
    }

    /// Tells the relay rows are waiting.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Publishes until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            loop {
                match self.publish_batch().await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(error) => {
                        self.metrics.relay_failures.inc();
                        tracing::warn!(error = format!("{error:#}"), "outbox relay batch failed");
                        break;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll) => {}
            }
        }
    }

    /// Publishes one batch in one transaction; returns how many rows went out.
    pub async fn publish_batch(&self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await.context("failed to begin")?;
        let rows = sqlx::query(
            "SELECT id, stream, body, created_at FROM outbox
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.settings.batch)
        .fetch_all(&mut *tx)
        .await
        .context("failed to claim outbox rows")?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        let mut ids = Vec::with_capacity(rows.len());
        let now = chrono::Utc::now();
        for row in &rows {
            let stream: &str = row.get("stream");
            let body: &str = row.get("body");
            pipe.cmd("XADD")
                .arg(stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.settings.stream_max_len)
                .arg("*")
                .arg("m")
                .arg(body)
                .ignore();
            ids.push(row.get::<Uuid, _>("id"));
            let created: chrono::DateTime<chrono::Utc> = row.get("created_at");
            self.metrics
                .publish_delay
                .observe((now - created).to_std().unwrap_or_default().as_secs_f64());
        }
        let mut redis = self.redis.clone();
        pipe.query_async::<()>(&mut redis)
            .await
            .context("failed to publish to Redis")?;
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .context("failed to delete published rows")?;
        tx.commit().await.context("failed to commit")?;
        self.metrics.published.inc_by(ids.len() as u64);
        Ok(ids.len())
    }
}
