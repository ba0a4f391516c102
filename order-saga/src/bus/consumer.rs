//! Reading a service's stream in a consumer group: each message goes to the service's
//! [`Handler`], and is acknowledged only once the handler's transaction has committed.
//!
//! - **Instances share the work.** Every instance of a service reads the same group; Redis
//!   hands each entry to one of them. Consumer names are the instance's stable name, so a
//!   restarted instance first takes back its own pending entries (read from id `0`).
//! - **Retries back off.** A handler that fails is retried in place with exponential backoff
//!   and full jitter (`retry_base`, doubled each time, `retries_in_place` times); if it still
//!   fails the entry stays pending, unacknowledged.
//! - **Idle entries are reclaimed.** Every `reclaim_every`, `XAUTOCLAIM` takes over entries
//!   pending longer than `reclaim_idle` in any consumer of the group (a crashed instance's,
//!   or this one's own failures) and delivers them again. Entries that were deleted or
//!   trimmed from the stream meanwhile come back as deleted ids: they are counted in `lost`
//!   and logged; the saga's step deadline turns such a loss into a compensation.
//! - **Dead letters.** An entry delivered `max_deliveries` times (Redis counts deliveries) is
//!   copied to `<stream>:dead` with the reason and acknowledged, and `dead_lettered` counts
//!   it; `order-saga dead-letters replay` puts it back. A malformed entry goes there at once.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures_util::future::join_all;
use rand::Rng as _;
use redis::{
    Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
    streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply},
};
use tokio_util::sync::CancellationToken;

use super::{dead_letters, metrics::BusMetrics};
use crate::messages::Envelope;

/// What a handler did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Its effect committed now.
    Applied,
    /// Its inbox row was already there: applied before.
    Duplicate,
}

/// A service's reaction to the messages of its stream.
pub trait Handler: Send + Sync + 'static {
    /// Applies `envelope`: its effect, its inbox row and any message it sends, in one
    /// transaction (a handler that must call out, like payment, commits the inbox row with
    /// the result). `Ok` once committed; an error leaves the message to be retried.
    fn handle(&self, envelope: Envelope) -> impl Future<Output = anyhow::Result<Applied>> + Send;
}

/// How a consumer reads, retries and gives up.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The stream.
    pub stream: String,
    /// The consumer group (the service's name).
    pub group: String,
    /// This instance's stable name in the group.
    pub consumer: String,
    /// Entries read at once; they are handled concurrently.
    pub batch: usize,
    /// How long one read waits for new entries.
    pub block: Duration,
    /// Retries in place after a failure, before the entry is left pending.
    pub retries_in_place: u32,
    /// The first in-place retry waits up to this; each further one up to twice as long.
    pub retry_base: Duration,
    /// How long an entry must have been pending before another read takes it over.
    pub reclaim_idle: Duration,
    /// How often idle entries are looked for.
    pub reclaim_every: Duration,
    /// Deliveries after which an entry goes to the dead-letter stream.
    pub max_deliveries: usize,
}

/// A consumer of one stream for one handler.
pub struct Consumer<H> {
    settings: ConsumerSettings,
    handler: Arc<H>,
    /// For acknowledgements, reclaims and dead letters.
    redis: ConnectionManager,
    /// For the blocking read alone: a blocked read would hold up every command behind it on
    /// a shared connection.
    reader: ConnectionManager,
    metrics: BusMetrics,
}

impl<H: Handler> Consumer<H> {
    /// Connects its two Redis connections and makes sure the group exists (reading the
    /// stream from its start, so messages published before the first instance came up are
    /// not missed).
    pub async fn connect(
        client: &redis::Client,
        settings: ConsumerSettings,
        handler: Arc<H>,
        metrics: BusMetrics,
    ) -> anyhow::Result<Self> {
        let redis = ConnectionManager::new(client.clone())
            .await
            .context("cannot connect to Redis")?;
        let reader_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.block + Duration::from_secs(2)));
        let reader = ConnectionManager::new_with_config(client.clone(), reader_config)
            .await
            .context("cannot connect to Redis")?;
        let consumer = Self {
            settings,
            handler,
            redis,
            reader,
            metrics,
        };
        consumer.create_group().await?;
        Ok(consumer)
    }

    async fn create_group(&self) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.settings.stream)
            .arg(&self.settings.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut redis)
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            Err(error) => Err(error).context("cannot create the consumer group"),
        }
    }

    /// Reads and handles until `stop` is cancelled; messages being handled then are finished
    /// first. Redis outages are waited out.
    pub async fn run(self, stop: CancellationToken) {
        // First this consumer's own pending entries (a restart), one pass, then new ones.
        let mut backlog = Some("0".to_owned());
        let mut next_reclaim = tokio::time::Instant::now();
        loop {
            if stop.is_cancelled() {
                return;
            }
            if tokio::time::Instant::now() >= next_reclaim {
                if let Err(error) = self.reclaim().await {
                    tracing::warn!(error = format!("{error:#}"), "reclaim failed");
                }
                next_reclaim = tokio::time::Instant::now() + self.settings.reclaim_every;
            }
            let from = backlog.as_deref().unwrap_or(">");
            let read = tokio::select! {
                () = stop.cancelled() => return,
                read = self.read(from) => read,
            };
            match read {
                Ok(entries) => {
                    if backlog.is_some() {
                        backlog = entries.last().map(|entry| entry.id.clone());
                    }
                    join_all(entries.into_iter().map(|entry| self.deliver(entry))).await;
                }
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), stream = %self.settings.stream, "stream read failed");
                    // A Redis that restarted empty (it keeps nothing on disk here) has lost
                    // the group: make it again, or this consumer would never read again.
                    if format!("{error:#}").contains("NOGROUP")
                        && let Err(error) = self.create_group().await
                    {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "cannot recreate the consumer group"
                        );
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    async fn read(&self, from: &str) -> anyhow::Result<Vec<StreamId>> {
        let mut reader = self.reader.clone();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.settings.group)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(self.settings.batch);
        if from == ">" {
            cmd.arg("BLOCK").arg(self.settings.block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.settings.stream).arg(from);
        let reply: Option<StreamReadReply> = cmd
            .query_async(&mut reader)
            .await
            .context("XREADGROUP failed")?;
        Ok(reply
            .map(|reply| reply.keys.into_iter().flat_map(|key| key.ids).collect())
            .unwrap_or_default())
    }

    /// Handles one entry, retrying in place, and acknowledges it once handled.
    async fn deliver(&self, entry: StreamId) {
        let Some(envelope) = parse(&entry) else {
            self.metrics.handled("malformed");
            self.dead_letter(&entry, "malformed: not an envelope").await;
            return;
        };
        let mut attempt = 0;
        loop {
            match self.handler.handle(envelope.clone()).await {
                Ok(applied) => {
                    self.metrics.handled(match applied {
                        Applied::Applied => "applied",
                        Applied::Duplicate => "duplicate",
                    });
                    if let Err(error) = self.ack(&entry.id).await {
                        // Still pending: it will be reclaimed and found in the inbox.
                        tracing::warn!(%error, id = %entry.id, "acknowledgement failed");
                    }
                    return;
                }
                Err(error) if attempt < self.settings.retries_in_place => {
                    attempt += 1;
                    let delay = backoff(self.settings.retry_base, attempt);
                    tracing::debug!(
                        error = format!("{error:#}"),
                        ?delay,
                        "handler failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    self.metrics.handled("failed");
                    tracing::warn!(
                        error = format!("{error:#}"),
                        message = %envelope.id,
                        order = %envelope.order_id,
                        "handler failed; left pending for a later delivery"
                    );
                    return;
                }
            }
        }
    }

    async fn ack(&self, id: &str) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        redis::cmd("XACK")
            .arg(&self.settings.stream)
            .arg(&self.settings.group)
            .arg(id)
            .query_async(&mut redis)
            .await
    }

    async fn dead_letter(&self, entry: &StreamId, reason: &str) {
        let body = entry.get::<String>("m").unwrap_or_default();
        let moved = dead_letters::bury(
            &mut self.redis.clone(),
            &self.settings.stream,
            &self.settings.group,
            &entry.id,
            &body,
            reason,
        )
        .await;
        match moved {
            Ok(()) => {
                self.metrics.dead_lettered.inc();
                tracing::error!(stream = %self.settings.stream, id = %entry.id, reason, "message moved to the dead-letter stream");
            }
            Err(error) => {
                tracing::warn!(%error, id = %entry.id, "cannot dead-letter; left pending")
            }
        }
    }

    /// Takes over idle pending entries of the group and delivers them again, or buries those
    /// delivered too often.
    async fn reclaim(&self) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        let mut cursor = "0-0".to_owned();
        // A bounded sweep per tick, so a long backlog does not starve new messages.
        for _ in 0..8 {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.settings.stream)
                .arg(&self.settings.group)
                .arg(&self.settings.consumer)
                .arg(self.settings.reclaim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(self.settings.batch)
                .query_async(&mut redis)
                .await
                .context("XAUTOCLAIM failed")?;
            if !reply.deleted_ids.is_empty() {
                self.metrics.lost.inc_by(reply.deleted_ids.len() as u64);
                tracing::error!(
                    stream = %self.settings.stream,
                    ids = ?reply.deleted_ids,
                    "pending messages were deleted from the stream before being handled"
                );
            }
            if !reply.claimed.is_empty() {
                self.metrics.reclaimed.inc_by(reply.claimed.len() as u64);
                let deliveries = self.deliveries(&reply.claimed).await?;
                join_all(reply.claimed.into_iter().map(|entry| {
                    let delivered = deliveries
                        .iter()
                        .find(|(id, _)| *id == entry.id)
                        .map_or(0, |(_, n)| *n);
                    async move {
                        if delivered >= self.settings.max_deliveries {
                            self.dead_letter(
                                &entry,
                                &format!("delivered {delivered} times without success"),
                            )
                            .await;
                        } else {
                            self.deliver(entry).await;
                        }
                    }
                }))
                .await;
            }
            cursor = reply.next_stream_id;
            if cursor == "0-0" {
                break;
            }
        }
        Ok(())
    }

    /// How many times each of `entries` has been delivered.
    async fn deliveries(&self, entries: &[StreamId]) -> anyhow::Result<Vec<(String, usize)>> {
        let first = entries
            .iter()
            .map(|e| e.id.as_str())
            .min_by(|a, b| stream_id_cmp(a, b));
        let last = entries
            .iter()
            .map(|e| e.id.as_str())
            .max_by(|a, b| stream_id_cmp(a, b));
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(Vec::new());
        };
        let mut redis = self.redis.clone();
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.settings.stream)
            .arg(&self.settings.group)
            .arg(first)
            .arg(last)
            .arg(entries.len().max(self.settings.batch) * 4)
            .arg(&self.settings.consumer)
            .query_async(&mut redis)
            .await
            .context("XPENDING failed")?;
        Ok(pending
            .ids
            .into_iter()
            .map(|p| (p.id, p.times_delivered))
            .collect())
    }
}

/// The envelope in an entry's `m` field, if it holds one.
fn parse(entry: &StreamId) -> Option<Envelope> {
    match entry.map.get("m")? {
        Value::BulkString(bytes) => serde_json::from_slice(bytes).ok(),
        Value::SimpleString(text) => serde_json::from_str(text).ok(),
        _ => None,
    }
}

/// Orders stream ids (`<ms>-<seq>`) numerically.
fn stream_id_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    split(a).cmp(&split(b))
}

/// Full jitter: a random wait between zero and `base · 2^(attempt-1)`, capped at 30 s, so
/// instances retrying the same outage do not retry in step.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(Duration::from_secs(30));
    ceiling.mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_a_doubling_ceiling() {
        let base = Duration::from_millis(100);
        for attempt in 1..=6 {
            let ceiling = base * (1 << (attempt - 1));
            for _ in 0..50 {
                assert!(backoff(base, attempt) <= ceiling);
            }
        }
        assert!(backoff(base, 40) <= Duration::from_secs(30));
    }

    #[test]
    fn stream_ids_order_numerically() {
        assert_eq!(stream_id_cmp("9-0", "10-0"), std::cmp::Ordering::Less);
        assert_eq!(stream_id_cmp("10-2", "10-10"), std::cmp::Ordering::Less);
    }
}
