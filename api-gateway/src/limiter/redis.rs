//! The shared limiter: one `EVALSHA` of `sliding_window.lua` per decision, so every replica
//! reads and updates a key's counters atomically in Redis.

use std::time::Duration;

use anyhow::Context;
use redis::{
    RedisError, RedisResult, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use super::window::Verdict;

/// The decision script; loaded by hash on first use and again after a Redis restart.
pub(crate) const SLIDING_WINDOW_SCRIPT: &str = include_str!("sliding_window.lua");

/// A connection (reconnecting by itself) and the script.
#[derive(Clone)]
pub(crate) struct RedisWindow {
    conn: ConnectionManager,
    script: Script,
    prefix: String,
    timeout: Duration,
}

impl RedisWindow {
    /// Prepares the connection without opening it, so a Redis that is down at start does not
    /// stop the gateway. Fails only on a malformed URL.
    pub(crate) fn new(url: &str, prefix: &str, timeout: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)
            .with_context(|| format!("invalid REDIS_URL {}", common::config::redact_url(url)))?;
        // No retries inside the manager: the limiter's own probe decides when to try again,
        // and a request never waits on a reconnect longer than `timeout`.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .context("cannot set up the Redis connection")?;
        Ok(Self {
            conn,
            script: Script::new(SLIDING_WINDOW_SCRIPT),
            prefix: prefix.to_owned(),
            timeout,
        })
    }

    /// One decision for `key` (prefixed here) at `now` (µs); `window` in µs.
    pub(crate) async fn check(
        &self,
        key: &str,
        now: u64,
        window: u64,
        limit: u64,
    ) -> RedisResult<Verdict> {
        let mut conn = self.conn.clone();
        let mut invocation = self.script.key(format!("{}{key}", self.prefix));
        invocation.arg(now).arg(window).arg(limit);
        let (allowed, remaining, reset, retry): (u8, u64, u64, i64) =
            bounded(self.timeout, invocation.invoke_async(&mut conn)).await?;
        Ok(Verdict {
            allowed: allowed == 1,
            remaining,
            reset,
            retry_after: u64::try_from(retry).ok(),
        })
    }

    /// Whether Redis answers; a first failure on a dead connection makes the manager
    /// reconnect, so a second try follows at once.
    pub(crate) async fn ping(&self) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        let first: RedisResult<String> =
            bounded(self.timeout, redis::cmd("PING").query_async(&mut conn)).await;
        match first {
            Ok(_) => Ok(()),
            Err(_) => bounded(
                self.timeout,
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await
            .map(drop),
        }
    }
}

/// `call`, or an I/O error once `timeout` has passed.
async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from((
                redis::ErrorKind::Io,
                "no answer within the limiter's Redis timeout",
            )))
        })
}
