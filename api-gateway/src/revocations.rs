//! API-key revocations, told to every replica at once through Redis pub/sub.
//!
//! Each replica keeps found API keys for `API_KEY_CACHE_TTL` ([`KeyCache`]). The replica that
//! revokes a key evicts it at once; without more, the others would go on accepting it until
//! their entry expires. So the revoking replica publishes the key's id on
//! `<RATE_LIMIT_PREFIX>api-key-revocations`, and every replica subscribed there evicts it as
//! the message arrives, within milliseconds.
//!
//! The message is a hint, never the authority: PostgreSQL holds the revocation, and the
//! cache's TTL still bounds how long a missed message can matter. When the subscription
//! breaks (Redis down), messages published meanwhile are lost, so on subscribing again the
//! replica drops its whole cache; a subscription that stops answering PING (half open) is
//! dropped and made again the same way. A publish that fails is logged; the TTL covers it.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use redis::AsyncCommands as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::authn::KeyCache;

/// Longest a revocation waits on Redis to publish (the revocation itself is committed).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait between two attempts to subscribe again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a quiet subscription is asked whether it is still there, and how long its
/// answer may take before it is dropped and made again.
const PING_INTERVAL: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a connection and SUBSCRIBE may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel, and what it needs to publish and listen.
pub struct Revocations {
    client: redis::Client,
    channel: String,
    keys: Arc<KeyCache>,
    subscribed: Gauge,
    received: Counter,
    publish_failures: Counter,
}

impl Revocations {
    /// Revocations over the Redis at `redis_url`, on the channel of replicas sharing
    /// `prefix`, evicting from `keys`.
    pub fn new(
        redis_url: &str,
        prefix: &str,
        keys: Arc<KeyCache>,
        registry: &mut Registry,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(redis_url).with_context(|| {
            format!(
                "invalid REDIS_URL {}",
                common::config::redact_url(redis_url)
            )
        })?;
        let this = Self {
            client,
            channel: format!("{prefix}api-key-revocations"),
            keys,
            subscribed: Gauge::default(),
            received: Counter::default(),
            publish_failures: Counter::default(),
        };
        registry.register(
            "api_key_revocations_subscribed",
            "1 while revocations from other replicas arrive through Redis, 0 while only the cache TTL applies",
            this.subscribed.clone(),
        );
        registry.register(
            "api_key_revocations_received",
            "API-key revocations other replicas published, evicted here",
            this.received.clone(),
        );
        registry.register(
            "api_key_revocation_publish_failures",
            "Revocations made here that could not be published (other replicas wait out the TTL)",
            this.publish_failures.clone(),
        );
        Ok(this)
    }

    /// Tells every replica that key `id` is revoked. Best effort: a failure is logged and
    /// counted, and the other replicas stop accepting the key within the cache TTL.
    pub async fn publish(&self, id: Uuid) {
        let publish = async {
            let mut connection = self.client.get_multiplexed_async_connection().await?;
            connection
                .publish::<_, _, i64>(&self.channel, id.to_string())
                .await
        };
        let error = match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(_)) => return,
            Ok(Err(error)) => error.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        self.publish_failures.inc();
        tracing::warn!(%id, %error, "API-key revocation not published; other replicas wait out the cache TTL");
    }

    /// Listens until `stop`, subscribing again whenever the subscription breaks. Connecting
    /// to a Redis that does not answer can take long; `stop` ends that too.
    pub async fn listen(self: Arc<Self>, stop: CancellationToken) {
        tokio::select! {
            () = stop.cancelled() => {}
            () = self.listen_forever() => {}
        }
    }

    async fn listen_forever(&self) {
        let mut backoff = Duration::from_millis(100);
        let mut was_up = true;
        loop {
            match self.subscribe().await {
                Ok(pubsub) => {
                    // Whatever was published while we were not listening is lost.
                    self.keys.clear();
                    self.subscribed.set(1);
                    if !was_up {
                        tracing::info!("API-key revocations arrive through Redis again");
                    }
                    was_up = true;
                    backoff = Duration::from_millis(100);
                    let why = self.receive(pubsub).await;
                    self.lost(&mut was_up, why);
                }
                Err(error) => self.lost(&mut was_up, &error.to_string()),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Evicts every revoked key the subscription brings, until it ends or stops answering
    /// a PING; returns why it is over. A connection that is half open (an idle timeout or a
    /// failover in between drops it without a word) would otherwise look subscribed while
    /// every message is lost.
    async fn receive(&self, pubsub: redis::aio::PubSub) -> &'static str {
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        return "the subscription ended";
                    };
                    let id = message
                        .get_payload::<String>()
                        .ok()
                        .and_then(|text| text.parse::<Uuid>().ok());
                    match id {
                        Some(id) => {
                            self.keys.evict(id);
                            self.received.inc();
                        }
                        None => tracing::warn!("unreadable API-key revocation ignored"),
                    }
                }
                _ = ping.tick() => {
                    let answered = tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>());
                    if !matches!(answered.await, Ok(Ok(_))) {
                        return "the subscription stopped answering PING";
                    }
                }
            }
        }
    }

    /// A new subscription; one that takes longer than [`SUBSCRIBE_TIMEOUT`] (a Redis that
    /// accepts connections but does not answer) is given up and tried again.
    async fn subscribe(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let subscribe = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok(pubsub)
        };
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe)
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "subscribing timed out",
                )))
            })
    }

    /// Logs the first failure of an outage, not every retry.
    fn lost(&self, was_up: &mut bool, error: &str) {
        self.subscribed.set(0);
        if *was_up {
            tracing::warn!(
                %error,
                "API-key revocations from other replicas now wait out the cache TTL"
            );
        }
        *was_up = false;
    }
}
