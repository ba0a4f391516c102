//! The shared limiter: every replica reads and updates a key's counters atomically in Redis,
//! through `sliding_window.lua`.
//!
//! Decisions are batched: one task owns the calls to Redis, and each call decides every
//! request queued since the last one went out (up to [`MAX_BATCH`]), with at most
//! [`IN_FLIGHT`] call outstanding. A lone request goes out at once, so batching adds no wait
//! when the gateway is quiet; under load one `EVALSHA` carries many decisions, which spares
//! Redis and the gateway a round trip, a command and a socket write for each (ADR 0006 has
//! the figures). Each decision stays atomic and exact: the script runs the batch in order, as
//! if its decisions had arrived one by one.

use std::{fmt, sync::Arc, time::Duration};

use anyhow::Context;
use futures_util::{StreamExt, stream::FuturesUnordered};
use prometheus_client::metrics::histogram::Histogram;
use redis::{
    RedisError, RedisResult, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::sync::{mpsc, oneshot};

use super::window::Verdict;

/// The decision script; loaded by hash on first use and again after a Redis restart.
pub(crate) const SLIDING_WINDOW_SCRIPT: &str = include_str!("sliding_window.lua");

/// Most decisions in one script call.
const MAX_BATCH: usize = 256;
/// Most script calls outstanding at once: while one runs, the next batch gathers. With one,
/// loadtest gateway's batches averaged 10 decisions and Redis spent 8.1 µs of CPU per request;
/// with two, 6.6 and 8.8–9.6 µs.
const IN_FLIGHT: usize = 1;
/// Requests waiting for a batch before callers wait to queue (far above what the in-flight
/// requests of one replica can reach).
const QUEUE: usize = 16_384;

/// Why a decision could not be made in Redis.
#[derive(Debug, Clone)]
pub(crate) struct Failure(Arc<str>);

impl Failure {
    fn new(what: impl fmt::Display) -> Self {
        Self(what.to_string().into())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One decision waiting for its batch.
struct Pending {
    key: String,
    now: u64,
    window: u64,
    limit: u64,
    reply: oneshot::Sender<Result<Verdict, Failure>>,
}

/// The queue of the task that batches decisions, which owns the connection (reconnecting
/// by itself).
#[derive(Clone)]
pub(crate) struct RedisWindow {
    queue: mpsc::Sender<Pending>,
    prefix: String,
    timeout: Duration,
}

impl RedisWindow {
    /// Prepares the connection without opening it, so a Redis that is down at start does not
    /// stop the gateway, and starts the batching task, which ends when the last clone of this
    /// is dropped. Fails only on a malformed URL. Needs a Tokio runtime.
    /// `batch_size` observes the decisions of each script call.
    pub(crate) fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
        batch_size: Histogram,
    ) -> anyhow::Result<Self> {
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
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(batch_decisions(
            pending,
            Batches {
                conn,
                script: Script::new(SLIDING_WINDOW_SCRIPT),
                timeout,
                size: batch_size,
            },
        ));
        Ok(Self {
            queue,
            prefix: prefix.to_owned(),
            timeout,
        })
    }

    /// One decision for `key` (prefixed here) at `now` (µs); `window` in µs. Waits at most
    /// the Redis timeout, queueing included.
    pub(crate) async fn check(
        &self,
        key: &str,
        now: u64,
        window: u64,
        limit: u64,
    ) -> Result<Verdict, Failure> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            key: format!("{}{key}", self.prefix),
            now,
            window,
            limit,
            reply,
        };
        let decided = async {
            self.queue
                .send(pending)
                .await
                .map_err(|_| Failure::new("the limiter's batching task has stopped"))?;
            answer
                .await
                .map_err(|_| Failure::new("the limiter's batching task dropped a decision"))?
        };
        tokio::time::timeout(self.timeout, decided)
            .await
            .unwrap_or_else(|_| Err(Failure::new("no answer within the limiter's Redis timeout")))
    }

    /// Whether Redis takes decisions: one real decision, through the batching task, on a key
    /// of the limiter's own. A `PING` would not do: a Redis that answers it may still refuse
    /// the script's writes (`READONLY` after a failover, `OOM` at `maxmemory`, `MISCONF`),
    /// and every probe would then put the limiter back on Redis for one failed call. A first
    /// failure on a dead connection makes the manager reconnect, so a second try follows.
    pub(crate) async fn probe(&self, now: u64) -> Result<(), Failure> {
        let decide = || self.check(PROBE_KEY, now, PROBE_WINDOW_MICROS, PROBE_LIMIT);
        match decide().await {
            Ok(_) => Ok(()),
            Err(_) => decide().await.map(drop),
        }
    }
}

/// The probe's key (after the prefix): no caller's key looks like it, since those start with
/// `user:`, `key:` or `ip:`.
const PROBE_KEY: &str = "limiter-probe";
/// The probe's quota: far more than probes ever come, in a window that expires soon.
const PROBE_WINDOW_MICROS: u64 = 1_000_000;
const PROBE_LIMIT: u64 = 1_000_000;

/// The batching task: takes what is queued, up to [`MAX_BATCH`], whenever fewer than
/// [`IN_FLIGHT`] calls are outstanding, and answers each decision when its call returns.
async fn batch_decisions(mut pending: mpsc::Receiver<Pending>, batches: Batches) {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            batch = take(&mut pending), if open && in_flight.len() < IN_FLIGHT => {
                match batch {
                    Some(batch) => in_flight.push(batches.decide(batch)),
                    None => open = false,
                }
            }
        }
    }
}

/// The next batch: waits for one decision, then takes whatever else is queued; `None` once
/// every sender is gone.
async fn take(pending: &mut mpsc::Receiver<Pending>) -> Option<Vec<Pending>> {
    let mut batch = Vec::with_capacity(MAX_BATCH.min(pending.len() + 1));
    (pending.recv_many(&mut batch, MAX_BATCH).await > 0).then_some(batch)
}

/// What the batching task sends batches with.
struct Batches {
    conn: ConnectionManager,
    script: Script,
    timeout: Duration,
    size: Histogram,
}

impl Batches {
    /// One script call for `batch`; every decision in it gets the verdict or the failure.
    /// A decision whose caller has stopped waiting (timed out and decided by the down
    /// policy, or gone with its client) is not sent: counted in Redis it would use quota for
    /// a request that Redis did not decide.
    async fn decide(&self, mut batch: Vec<Pending>) {
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        self.size.observe(batch.len() as f64);
        let mut conn = self.conn.clone();
        let mut invocation = self.script.prepare_invoke();
        for pending in &batch {
            invocation
                .key(&pending.key)
                .arg(pending.now)
                .arg(pending.window)
                .arg(pending.limit);
        }
        let reply: RedisResult<Vec<i64>> =
            bounded(self.timeout, invocation.invoke_async(&mut conn)).await;
        let failure = match reply.map(|flat| verdicts(&flat, batch.len()).ok_or(flat.len())) {
            Ok(Ok(verdicts)) => {
                for (pending, verdict) in batch.into_iter().zip(verdicts) {
                    // A caller that timed out while the call was out has gone; its verdict
                    // is dropped (Redis counted it: a reply that comes too late cannot be
                    // taken back).
                    let _ = pending.reply.send(Ok(verdict));
                }
                return;
            }
            Ok(Err(values)) => Failure::new(format!(
                "the limiter script answered {values} values, not {} verdicts",
                batch.len()
            )),
            Err(error) => Failure::new(error),
        };
        for pending in batch {
            let _ = pending.reply.send(Err(failure.clone()));
        }
    }
}

/// The verdicts in a reply of `sliding_window.lua`: two integers for an allowed decision
/// (remaining, reset), three for a refused one (-(remaining + 1), reset, retry after).
/// `None` unless the reply holds exactly `decisions` whole verdicts.
fn verdicts(flat: &[i64], decisions: usize) -> Option<Vec<Verdict>> {
    let unsigned = |value: i64| u64::try_from(value).unwrap_or(0);
    let mut verdicts = Vec::with_capacity(decisions);
    let mut rest = flat;
    while !rest.is_empty() {
        let (verdict, tail) = match *rest {
            [remaining, reset, ref tail @ ..] if remaining >= 0 => (
                Verdict {
                    allowed: true,
                    remaining: unsigned(remaining),
                    reset: unsigned(reset),
                    retry_after: None,
                },
                tail,
            ),
            [refused, reset, retry, ref tail @ ..] if refused < 0 => (
                Verdict {
                    allowed: false,
                    remaining: unsigned((-1i64).saturating_sub(refused)),
                    reset: unsigned(reset),
                    retry_after: u64::try_from(retry).ok(),
                },
                tail,
            ),
            _ => return None,
        };
        verdicts.push(verdict);
        rest = tail;
    }
    (verdicts.len() == decisions).then_some(verdicts)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(remaining: u64, reset: u64) -> Verdict {
        Verdict {
            allowed: true,
            remaining,
            reset,
            retry_after: None,
        }
    }

    fn refused(remaining: u64, reset: u64, retry: u64) -> Verdict {
        Verdict {
            allowed: false,
            remaining,
            reset,
            retry_after: Some(retry),
        }
    }

    #[test]
    fn a_reply_reads_as_two_integers_per_admission_and_three_per_refusal() {
        let reply = [19, 60_000_000, -1, 59_000_000, 1_000, 0, 5, -3, 7, 7];
        assert_eq!(
            verdicts(&reply, 4),
            Some(vec![
                allowed(19, 60_000_000),
                refused(0, 59_000_000, 1_000),
                allowed(0, 5),
                refused(2, 7, 7),
            ])
        );
        assert_eq!(verdicts(&[], 0), Some(vec![]));
    }

    fn observations(histogram: &Histogram) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("batch", "", histogram.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .filter(|line| line.starts_with("batch_count") || line.starts_with("batch_sum"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn pending(key: &str) -> (Pending, oneshot::Receiver<Result<Verdict, Failure>>) {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            key: key.to_owned(),
            now: 1,
            window: 60_000_000,
            limit: 10,
            reply,
        };
        (pending, answer)
    }

    #[tokio::test]
    async fn decisions_whose_callers_stopped_waiting_are_not_sent() {
        // Nothing listens on port 1: a call that goes out fails, and says so to its caller.
        let client = redis::Client::open("redis://127.0.0.1:1").unwrap();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(200)))
            .set_number_of_retries(0);
        let batches = Batches {
            conn: ConnectionManager::new_lazy_with_config(client, config).unwrap(),
            script: Script::new(SLIDING_WINDOW_SCRIPT),
            timeout: Duration::from_millis(500),
            size: Histogram::new([1.0, 2.0, 4.0]),
        };

        let gone: Vec<_> = (0..3).map(|i| pending(&format!("k{i}")).0).collect();
        batches.decide(gone).await;
        assert_eq!(observations(&batches.size), "batch_sum 0.0 batch_count 0");

        let (waiting, answer) = pending("k3");
        let mut batch: Vec<_> = (4..6).map(|i| pending(&format!("k{i}")).0).collect();
        batch.insert(1, waiting);
        batches.decide(batch).await;
        assert_eq!(observations(&batches.size), "batch_sum 1.0 batch_count 1");
        assert!(answer.await.unwrap().is_err());
    }

    #[test]
    fn a_reply_that_does_not_hold_exactly_the_verdicts_asked_for_is_refused() {
        // Too few, too many, cut inside a verdict, and a refusal without its retry.
        assert_eq!(verdicts(&[19, 60], 2), None);
        assert_eq!(verdicts(&[19, 60, 18, 60], 1), None);
        assert_eq!(verdicts(&[19], 1), None);
        assert_eq!(verdicts(&[-1, 60], 1), None);
        assert_eq!(verdicts(&[], 1), None);
    }
}
