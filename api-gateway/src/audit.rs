//! The audit trail: security events appended to PostgreSQL as a hash chain, and logged.
//!
//! [`Audit::record`] never waits: it writes the JSON log line (target `audit`) at once and
//! queues the event for [`AuditWriter`], one task that appends batches in a transaction. The
//! transaction takes an advisory lock and reads the last row, so replicas sharing the
//! database extend one chain: row `n` stores `hash(n) = SHA-256(hash(n-1) ‖ fields of n)`, with
//! every field length-prefixed so no two rows encode alike. [`verify`] recomputes the chain;
//! a changed, deleted or reordered row breaks it at that row. Truncating the newest rows is
//! only visible against a head hash kept elsewhere, which is why `audit-verify` prints it.
//!
//! While PostgreSQL is down the writer keeps its batch and retries; the queue holds
//! [`QUEUE_CAPACITY`] events, past which new ones are counted as dropped and logged as errors
//! (the JSON line still exists). Shutdown flushes what is queued.

use std::{net::IpAddr, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use tokio::sync::mpsc;

/// Events waiting for the writer, at most.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Rows appended per transaction, at most.
const BATCH: usize = 512;
/// The advisory lock every writer of the chain takes (an arbitrary constant: "audit").
const CHAIN_LOCK: i64 = 0x0061_7564_6974;
/// The hash before the first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// One security event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When it happened (microsecond precision, as stored).
    pub at: DateTime<Utc>,
    /// The request it happened in.
    pub request_id: Option<String>,
    /// Who: a user id, `key:<id>`, or nobody known.
    pub subject: Option<String>,
    /// The client's address.
    pub ip: Option<String>,
    /// What was attempted: `login`, `refresh`, `logout`, `api_key.create`, `api_key.revoke`,
    /// `authenticate`, `authorize`, `rate_limit`.
    pub action: &'static str,
    /// How it ended: `success`, `failure`, `reuse_detected`, `denied`, `limited`, ….
    pub outcome: &'static str,
    /// A short reason or target (`expired`, `GET /api/orders`); never a secret.
    pub detail: Option<String>,
}

impl Event {
    /// An event now, in the current request (its id taken from the request context).
    pub fn new(action: &'static str, outcome: &'static str) -> Self {
        Self {
            at: now_micros(),
            request_id: common::request_id::current(),
            subject: None,
            ip: None,
            action,
            outcome,
            detail: None,
        }
    }

    /// Sets who.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the client address.
    pub fn ip(mut self, ip: Option<IpAddr>) -> Self {
        self.ip = ip.map(|ip| ip.to_string());
        self
    }

    /// Sets the reason.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The chain hash of this event after `prev`, as row `seq`.
    pub fn hash(&self, seq: i64, prev: &[u8]) -> [u8; 32] {
        chain_hash(
            seq,
            prev,
            &self.at,
            [
                self.request_id.as_deref(),
                self.subject.as_deref(),
                self.ip.as_deref(),
                Some(self.action),
                Some(self.outcome),
                self.detail.as_deref(),
            ],
        )
    }
}

/// `SHA-256(prev ‖ seq ‖ at ‖ request_id ‖ subject ‖ ip ‖ action ‖ outcome ‖ detail)`, each
/// text field length-prefixed and a NULL distinct from an empty string.
fn chain_hash(seq: i64, prev: &[u8], at: &DateTime<Utc>, fields: [Option<&str>; 6]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(seq.to_be_bytes());
    let at = at.to_rfc3339_opts(SecondsFormat::Micros, true);
    for field in std::iter::once(Some(at.as_str())).chain(fields) {
        match field {
            None => hasher.update([0]),
            Some(text) => {
                hasher.update([1]);
                hasher.update((text.len() as u64).to_be_bytes());
                hasher.update(text.as_bytes());
            }
        }
    }
    hasher.finalize().into()
}

fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// The handle requests record events through; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    queue: mpsc::Sender<Event>,
    dropped: Counter,
}

/// Audit counters.
#[derive(Clone, Default)]
struct AuditMetrics {
    written: Counter,
    dropped: Counter,
    write_errors: Counter,
}

/// The task appending queued events to the chain.
pub struct AuditWriter {
    pool: PgPool,
    queue: mpsc::Receiver<Event>,
    metrics: AuditMetrics,
}

impl Audit {
    /// A handle and the writer that drains it into `pool`; run the writer with
    /// [`AuditWriter::run`]. It ends once every handle is dropped and the queue is flushed.
    pub fn new(pool: PgPool, registry: &mut Registry) -> (Self, AuditWriter) {
        let metrics = AuditMetrics::default();
        registry.register(
            "audit_events_written",
            "Audit events appended to the chain",
            metrics.written.clone(),
        );
        registry.register(
            "audit_events_dropped",
            "Audit events lost because the queue was full (PostgreSQL down too long)",
            metrics.dropped.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed attempts to append a batch (retried)",
            metrics.write_errors.clone(),
        );
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        (
            Self {
                queue,
                dropped: metrics.dropped.clone(),
            },
            AuditWriter {
                pool,
                queue: receiver,
                metrics,
            },
        )
    }

    /// Logs `event` as a JSON line now and queues it for the table.
    pub fn record(&self, event: Event) {
        tracing::info!(
            target: "audit",
            at = %event.at.to_rfc3339_opts(SecondsFormat::Micros, true),
            request_id = event.request_id.as_deref().unwrap_or(""),
            subject = event.subject.as_deref().unwrap_or(""),
            ip = event.ip.as_deref().unwrap_or(""),
            action = event.action,
            outcome = event.outcome,
            detail = event.detail.as_deref().unwrap_or(""),
            "audit"
        );
        if let Err(error) = self.queue.try_send(event) {
            self.dropped.inc();
            tracing::error!(%error, "audit queue full: event not stored (it is in the log)");
        }
    }
}

impl AuditWriter {
    /// Appends queued events until `stop` fires (or every [`Audit`] handle is gone), then
    /// flushes what is queued and returns.
    pub async fn run(mut self, stop: tokio_util::sync::CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut backoff = Duration::from_millis(100);
        let mut stopping = false;
        loop {
            if batch.is_empty() {
                if stopping {
                    match self.queue.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(_) => return,
                    }
                } else {
                    tokio::select! {
                        event = self.queue.recv() => match event {
                            Some(event) => batch.push(event),
                            None => return,
                        },
                        () = stop.cancelled() => {
                            stopping = true;
                            continue;
                        }
                    }
                }
            }
            while batch.len() < BATCH {
                match self.queue.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            match append(&self.pool, &batch).await {
                Ok(()) => {
                    self.metrics.written.inc_by(batch.len() as u64);
                    batch.clear();
                    backoff = Duration::from_millis(100);
                }
                Err(error) => {
                    self.metrics.write_errors.inc();
                    tracing::error!(%error, pending = batch.len(), ?backoff, "audit append failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Appends `events` to the chain in one transaction.
async fn append(pool: &PgPool, events: &[Event]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CHAIN_LOCK)
        .execute(&mut *tx)
        .await?;
    let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?;
    let (mut seq, mut prev): (i64, Vec<u8>) = match last {
        Some(row) => (row.get(0), row.get(1)),
        None => (0, GENESIS.to_vec()),
    };
    let n = events.len();
    let (mut seqs, mut ats, mut request_ids, mut subjects, mut ips) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut actions, mut outcomes, mut details, mut prevs, mut hashes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for event in events {
        seq += 1;
        let hash = event.hash(seq, &prev);
        seqs.push(seq);
        ats.push(event.at);
        request_ids.push(event.request_id.clone());
        subjects.push(event.subject.clone());
        ips.push(event.ip.clone());
        actions.push(event.action);
        outcomes.push(event.outcome);
        details.push(event.detail.clone());
        prevs.push(std::mem::replace(&mut prev, hash.to_vec()));
        hashes.push(hash.to_vec());
    }
    sqlx::query(
        "INSERT INTO audit_log (seq, at, request_id, subject, ip, action, outcome, detail, prev_hash, hash)
         SELECT * FROM UNNEST($1::bigint[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::bytea[], $10::bytea[])",
    )
    .bind(&seqs)
    .bind(&ats)
    .bind(&request_ids)
    .bind(&subjects)
    .bind(&ips)
    .bind(&actions)
    .bind(&outcomes)
    .bind(&details)
    .bind(&prevs)
    .bind(&hashes)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// What walking the chain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Rows checked.
    pub rows: u64,
    /// The last row's hash (hex), to keep elsewhere: it anchors the chain against truncation.
    pub head: String,
    /// The first row that does not follow from the one before, and why.
    pub broken: Option<(i64, String)>,
}

/// Recomputes the whole chain, oldest row first. With `expect_head` (a head printed by an
/// earlier run), some row must still have that hash: rows cut from the end are found too.
pub async fn verify(pool: &PgPool, expect_head: Option<&str>) -> Result<ChainReport, sqlx::Error> {
    use futures_util::TryStreamExt;
    let mut rows = sqlx::query(
        "SELECT seq, at, request_id, subject, ip, action, outcome, detail, prev_hash, hash
         FROM audit_log ORDER BY seq",
    )
    .fetch(pool);
    let mut expected_seq = 1i64;
    let mut prev = GENESIS.to_vec();
    let mut count = 0u64;
    let mut head_seen = expect_head.is_none();
    while let Some(row) = rows.try_next().await? {
        let seq: i64 = row.get(0);
        let action: String = row.get(5);
        let outcome: String = row.get(6);
        let stored_prev: Vec<u8> = row.get(8);
        let stored_hash: Vec<u8> = row.get(9);
        let broken = |reason: String| ChainReport {
            rows: count,
            head: hex(&prev),
            broken: Some((seq, reason)),
        };
        if seq != expected_seq {
            return Ok(broken(format!(
                "expected row {expected_seq}, found {seq}: rows are missing"
            )));
        }
        if stored_prev != prev {
            return Ok(broken("prev_hash is not the hash of the row before".into()));
        }
        let at: DateTime<Utc> = row.get(1);
        let text = |i: usize| row.get::<Option<String>, _>(i);
        let (request_id, subject, ip, detail) = (text(2), text(3), text(4), text(7));
        let hash = chain_hash(
            seq,
            &prev,
            &at,
            [
                request_id.as_deref(),
                subject.as_deref(),
                ip.as_deref(),
                Some(&action),
                Some(&outcome),
                detail.as_deref(),
            ],
        );
        if stored_hash != hash {
            return Ok(broken(
                "the row's content does not match its hash: it was changed".into(),
            ));
        }
        prev = hash.to_vec();
        expected_seq += 1;
        count += 1;
        head_seen = head_seen || expect_head == Some(hex(&prev).as_str());
    }
    let head = hex(&prev);
    let broken = (!head_seen).then(|| {
        (
            expected_seq,
            "the expected head is not in the chain: rows were removed from its end".to_owned(),
        )
    });
    Ok(ChainReport {
        rows: count,
        head,
        broken,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            at: DateTime::from_timestamp_micros(1_763_000_000_123_456).unwrap(),
            request_id: Some("r1".into()),
            subject: Some("u1".into()),
            ip: Some("127.0.0.1".into()),
            action: "login",
            outcome: "success",
            detail: None,
        }
    }

    #[test]
    fn every_field_and_the_position_change_the_hash() {
        let base = event().hash(1, &GENESIS);
        assert_eq!(base, event().hash(1, &GENESIS));
        assert_ne!(base, event().hash(2, &GENESIS));
        assert_ne!(base, event().hash(1, &[1; 32]));
        let mut changed = event();
        changed.outcome = "failure";
        assert_ne!(base, changed.hash(1, &GENESIS));
        let mut empty_detail = event();
        empty_detail.detail = Some(String::new());
        assert_ne!(base, empty_detail.hash(1, &GENESIS));
        // Moving text between adjacent fields changes the hash (length prefixes).
        let mut shifted = event();
        shifted.request_id = Some("r1u".into());
        shifted.subject = Some("1".into());
        assert_ne!(base, shifted.hash(1, &GENESIS));
    }
}
