//! Cross-node fan-out over Redis pub/sub (ADR 0005).
//!
//! A node that accepts a notification persists it, delivers it to its own connections, and
//! publishes it once on one channel with the list of recipients. Every other node receives
//! it and delivers it to the recipients connected there. Pub/sub delivers at most once: a
//! node whose subscription drops may miss messages, so when that happens it closes every
//! local connection with 4503 and the clients recover what they missed from history (which
//! was written before the publish). Recovery, not the bus, is what makes delivery complete.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use futures_util::StreamExt;
use redis::{AsyncCommands, aio::ConnectionManager};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::{
    hub::Hub,
    metrics::Metrics,
    notification::{Frame, UserId},
    protocol::close,
};

const VERSION: &str = "n1";
/// Longest a publish may take before it counts as failed.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// This node's link to the others.
#[derive(Clone)]
pub struct RedisFanout {
    node: Uuid,
    client: redis::Client,
    channel: String,
    publisher: ConnectionManager,
    up: Arc<AtomicBool>,
}

impl RedisFanout {
    /// Connects the publisher; the channel is `{prefix}fanout`.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)
            .with_context(|| format!("invalid REDIS_URL {}", common::config::redact_url(url)))?;
        let publisher = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new(client.clone()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| {
            format!(
                "cannot connect to Redis at {}",
                common::config::redact_url(url)
            )
        })?;
        Ok(Self {
            node: Uuid::now_v7(),
            client,
            channel: format!("{prefix}fanout"),
            publisher,
            up: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Whether the subscription is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Publishes `frame` for `users` to every other node.
    pub async fn publish(&self, frame: &Frame, users: &[UserId]) -> redis::RedisResult<()> {
        let payload = encode(self.node, frame, users);
        let mut conn = self.publisher.clone();
        // Never hold a send for long on a Redis that does not answer: the notification is
        // persisted already, and recovery covers the other nodes.
        match tokio::time::timeout(
            PUBLISH_TIMEOUT,
            conn.publish::<_, _, i64>(&self.channel, payload),
        )
        .await
        {
            Ok(result) => result.map(drop),
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "publish timed out",
            ))),
        }
    }

    /// Subscribes, and keeps delivering what other nodes publish to `hub` until aborted.
    /// Returns once the first subscription is up, or with the error that prevented it.
    pub async fn start(&self, hub: Arc<Hub>, metrics: Metrics) -> anyhow::Result<JoinHandle<()>> {
        let mut pubsub = self
            .subscribe()
            .await
            .context("cannot subscribe to the fan-out channel")?;
        self.up.store(true, Ordering::Release);
        metrics.fanout_up.set(1);
        let this = self.clone();
        Ok(tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                this.pump(&mut pubsub, &hub, &metrics).await;
                // The subscription broke: whatever was published meanwhile is lost to us.
                this.up.store(false, Ordering::Release);
                metrics.fanout_up.set(0);
                metrics.fanout_resyncs.inc();
                tracing::warn!("lost the fan-out subscription; clients told to resync");
                hub.kick_all(close::RESYNC);
                pubsub = loop {
                    tokio::time::sleep(backoff).await;
                    match this.subscribe().await {
                        Ok(pubsub) => break pubsub,
                        Err(error) => {
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            tracing::warn!(%error, "fan-out resubscribe failed");
                        }
                    }
                };
                backoff = Duration::from_millis(100);
                // Clients that reconnected while we were down may have missed messages too.
                hub.kick_all(close::RESYNC);
                this.up.store(true, Ordering::Release);
                metrics.fanout_up.set(1);
                tracing::info!("fan-out subscription restored");
            }
        }))
    }

    async fn subscribe(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        Ok(pubsub)
    }

    async fn pump(&self, pubsub: &mut redis::aio::PubSub, hub: &Hub, metrics: &Metrics) {
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Some((origin, frame, users)) = decode(message.get_payload_bytes()) else {
                tracing::warn!("undecodable fan-out message ignored");
                continue;
            };
            if origin == self.node {
                continue;
            }
            metrics.fanout_received.inc();
            let delivered = hub.deliver(&users, &frame);
            metrics.deliveries.inc_by(delivered.queued as u64);
            metrics.slow_consumers.inc_by(delivered.slow as u64);
        }
    }
}

/// `n1\n<origin>\n<id>\n<frame json>\n<user>\n<user>...`: frame JSON never holds a raw
/// newline (serde_json escapes it) and ids cannot, so lines are unambiguous.
fn encode(node: Uuid, frame: &Frame, users: &[UserId]) -> Vec<u8> {
    let size = 80 + frame.text.len() + users.iter().map(|u| u.as_str().len() + 1).sum::<usize>();
    let mut out = String::with_capacity(size);
    out.push_str(VERSION);
    out.push('\n');
    out.push_str(&node.to_string());
    out.push('\n');
    out.push_str(&frame.id.to_string());
    out.push('\n');
    out.push_str(frame.text.as_str());
    for user in users {
        out.push('\n');
        out.push_str(user.as_str());
    }
    out.into_bytes()
}

fn decode(payload: &[u8]) -> Option<(Uuid, Arc<Frame>, Vec<UserId>)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut lines = text.split('\n');
    if lines.next()? != VERSION {
        return None;
    }
    let origin = Uuid::parse_str(lines.next()?).ok()?;
    let id = Uuid::parse_str(lines.next()?).ok()?;
    let frame = lines.next()?.to_owned();
    let users = lines
        .map(UserId::parse)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some((origin, Frame::from_encoded(id, frame), users))
}

#[cfg(test)]
mod tests {
    use common::storable::StorableText;

    use super::*;
    use crate::notification::Content;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let text = |t: &str| StorableText::parse("test", t).unwrap();
        let n = Content {
            kind: text("t"),
            title: text("multi line? no: title"),
            message: text("line one\nline two"),
            data: None,
        }
        .into_notification();
        let frame = Frame::encode(&n);
        let users = vec![UserId::parse("a").unwrap(), UserId::parse("b@x").unwrap()];
        let node = Uuid::now_v7();
        let (origin, back, back_users) = decode(&encode(node, &frame, &users)).unwrap();
        assert_eq!(origin, node);
        assert_eq!(back.id, n.id);
        assert_eq!(back.text, frame.text);
        assert_eq!(back_users, users);
        assert!(decode(b"n2\nx").is_none());
        assert!(decode(&[0xff, 0xfe]).is_none());
        let bad_user = format!("n1\n{node}\n{}\n{{}}\nno spaces allowed", n.id);
        assert!(decode(bad_user.as_bytes()).is_none());
    }
}
