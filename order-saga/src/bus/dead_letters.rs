//! The dead-letter streams: where a message goes after too many failed deliveries, how an
//! operator lists them, and how one is put back on its stream once its cause is fixed.
//!
//! `<stream>:dead` holds, per entry: `m` (the message as it was), `stream`, `group`, `id`
//! (its id on the original stream), `reason` and `at`. Replaying adds `m` to the original
//! stream as a new entry and deletes the dead letter; the message keeps its envelope id, so
//! it is still applied at most once.

use anyhow::Context as _;
use redis::{aio::ConnectionLike, streams::StreamRangeReply};
use serde::Serialize;

/// The dead-letter stream of `stream`.
pub fn dead_stream(stream: &str) -> String {
    format!("{stream}:dead")
}

/// Moves entry `id` of `stream` to its dead-letter stream and acknowledges it, atomically.
pub async fn bury(
    redis: &mut impl ConnectionLike,
    stream: &str,
    group: &str,
    id: &str,
    body: &str,
    reason: &str,
) -> redis::RedisResult<()> {
    redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(dead_stream(stream))
        .arg("*")
        .arg("m")
        .arg(body)
        .arg("stream")
        .arg(stream)
        .arg("group")
        .arg(group)
        .arg("id")
        .arg(id)
        .arg("reason")
        .arg(reason)
        .arg("at")
        .arg(chrono::Utc::now().to_rfc3339())
        .ignore()
        .cmd("XACK")
        .arg(stream)
        .arg(group)
        .arg(id)
        .ignore()
        .query_async(redis)
        .await
}

/// One dead letter, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its id on the dead-letter stream (what `replay --id` takes).
    pub dead_id: String,
    /// The stream it came from.
    pub stream: String,
    /// Its id there.
    pub id: String,
    /// Why it was buried.
    pub reason: String,
    /// When.
    pub at: String,
    /// The message.
    pub message: String,
}

/// Up to `limit` dead letters of `stream`, oldest first.
pub async fn list(
    redis: &mut impl ConnectionLike,
    stream: &str,
    limit: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(dead_stream(stream))
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(limit)
        .query_async(redis)
        .await
        .context("XRANGE failed")?;
    Ok(reply
        .ids
        .into_iter()
        .map(|entry| DeadLetter {
            stream: entry.get("stream").unwrap_or_default(),
            id: entry.get("id").unwrap_or_default(),
            reason: entry.get("reason").unwrap_or_default(),
            at: entry.get("at").unwrap_or_default(),
            message: entry.get("m").unwrap_or_default(),
            dead_id: entry.id,
        })
        .collect())
}

/// Puts dead letters of `stream` back on it: the one with dead-letter id `only`, or all.
/// Returns how many went back.
pub async fn replay(
    redis: &mut impl ConnectionLike,
    stream: &str,
    only: Option<&str>,
) -> anyhow::Result<usize> {
    let letters = list(redis, stream, 10_000).await?;
    let mut replayed = 0;
    for letter in letters
        .iter()
        .filter(|letter| only.is_none_or(|id| id == letter.dead_id))
    {
        redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("m")
            .arg(&letter.message)
            .ignore()
            .cmd("XDEL")
            .arg(dead_stream(stream))
            .arg(&letter.dead_id)
            .ignore()
            .query_async::<()>(redis)
            .await
            .context("replay failed")?;
        replayed += 1;
    }
    Ok(replayed)
}
