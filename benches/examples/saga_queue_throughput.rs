//! ADR 0013's measurement: which queue carries the saga's messages. The same load goes
//! through three queues on this machine: Redis Streams with a consumer group (`XADD`,
//! `XREADGROUP`, `XACK`), a PostgreSQL queue table (`INSERT` + `NOTIFY`; the consumer
//! deletes a batch `FOR UPDATE SKIP LOCKED ... RETURNING` in a transaction it commits after
//! handling it, woken by `LISTEN`), and NATS JetStream (publish with its acknowledgement; a
//! durable pull consumer with explicit acks).
//!
//! Each message is a saga command's envelope (about 300 bytes of JSON) carrying its publish
//! time. Two phases per queue and run:
//! - throughput: `PRODUCERS` publishers, each sending `MESSAGES / PRODUCERS` in batches of
//!   `BATCH`, as fast as the queue takes them, while `CONSUMERS` consumers take batches of up
//!   to `BATCH` and acknowledge each batch; msgs/s = messages / (first publish → last ack).
//! - latency: the same publishers and consumers, but publishing one message at a time at
//!   `PACED_RATE` msgs/s in all, so the queue is not saturated; the latency is publish start →
//!   the consumer has the message, p50 and p99.
//!
//! Every run checks that each message arrived (none lost; duplicates counted). The median of
//! `RUNS` runs is printed as ADR 0013's table.
//!
//! JetStream is spoken over its wire protocol on a plain TCP connection (`PUB`, `SUB`,
//! `MSG`/`HMSG`, the `$JS.API` subjects), the same frames a client library sends: the
//! `async-nats` crate would bring 20 crates the workspace does not build (rustls, ring,
//! tokio-websockets, nkeys, ...) for one measurement. A batch of JetStream acks is confirmed
//! by a `PING`/`PONG` after it (the server handles a connection's frames in order), as
//! `XACK` and `COMMIT` are confirmed by their replies.
//!
//! Needs PostgreSQL at `TEST_DATABASE_URL`, Redis at `TEST_REDIS_URL` and a JetStream server
//! at `NATS_URL` (default `127.0.0.1:4222`); fails saying which is missing.
//! Run: `cargo run --release -p benches --example saga_queue_throughput`.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use redis::aio::MultiplexedConnection;
use serde::Deserialize;
use sqlx::{Connection, Executor, PgConnection, PgPool, Row, postgres::PgListener};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::Mutex,
    task::JoinSet,
};
use uuid::Uuid;

/// Messages per throughput phase.
const MESSAGES: usize = 20_000;
/// Publishing tasks, and consuming tasks, for every queue.
const PRODUCERS: usize = 2;
const CONSUMERS: usize = 2;
/// Messages per publish batch and per read.
const BATCH: usize = 32;
/// Messages per second, in all, during the latency phase, and how long it lasts.
const PACED_RATE: u32 = 1_000;
const PACED_FOR: Duration = Duration::from_secs(3);
/// How long a consumer blocks on an empty queue before it looks whether it is done.
const POLL: Duration = Duration::from_millis(100);
const RUNS: usize = 3;
/// A phase that takes longer than this has lost messages or hung: the run fails.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    RedisStreams,
    PostgresTable,
    JetStream,
}

impl Queue {
    fn key(self) -> &'static str {
        match self {
            Self::RedisStreams => "redis",
            Self::PostgresTable => "postgres",
            Self::JetStream => "jetstream",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::RedisStreams => "Redis Streams (consumer group)",
            Self::PostgresTable => "PostgreSQL table (SKIP LOCKED + NOTIFY)",
            Self::JetStream => "NATS JetStream (durable pull, explicit ack)",
        }
    }
}

/// What one phase measured.
struct Phase {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    duplicates: usize,
}

/// The fields of the envelope a consumer reads back.
#[derive(Deserialize)]
struct Stamp {
    seq: u64,
    t: u64,
}

/// A saga command's envelope with its sequence number and publish time (µs since `epoch`).
fn message(seq: u64, epoch: Instant) -> String {
    let t = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
    let id = Uuid::now_v7();
    format!(
        r#"{{"id":"{id}","order_id":"{}","attempt":1,"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","sent_at":"2026-12-05T05:00:00.000000Z","kind":"reserve_stock","lines":[{{"product_id":"{}","quantity":2}}],"seq":{seq},"t":{t}}}"#,
        Uuid::now_v7(),
        Uuid::now_v7()
    )
}

/// What the consumers of one phase share: how many messages are still expected, which
/// sequence numbers arrived, and the latencies.
struct Received {
    expected: usize,
    done: AtomicUsize,
    seen: Mutex<(HashSet<u64>, usize, Vec<Duration>)>,
    epoch: Instant,
}

impl Received {
    fn new(expected: usize, epoch: Instant) -> Arc<Self> {
        Arc::new(Self {
            expected,
            done: AtomicUsize::new(0),
            seen: Mutex::new((HashSet::with_capacity(expected), 0, Vec::new())),
            epoch,
        })
    }

    fn finished(&self) -> bool {
        self.done.load(Ordering::Acquire) >= self.expected
    }

    /// Records the bodies a consumer has just read (before acknowledging them).
    async fn got(&self, bodies: &[Vec<u8>]) -> anyhow::Result<()> {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut seen = self.seen.lock().await;
        let mut new = 0;
        for body in bodies {
            let stamp: Stamp = serde_json::from_slice(body).context("not an envelope")?;
            if seen.0.insert(stamp.seq) {
                new += 1;
                seen.2
                    .push(Duration::from_micros(now.saturating_sub(stamp.t)));
            } else {
                seen.1 += 1;
            }
        }
        self.done.fetch_add(new, Ordering::AcqRel);
        Ok(())
    }
}

/// How a phase publishes: everything in batches as fast as possible, or one at a time paced.
#[derive(Clone, Copy)]
enum Pace {
    Flat,
    Paced { interval: Duration },
}

/// Runs one phase: `PRODUCERS` publishing `per_producer` messages each, `CONSUMERS` taking
/// them, until every message has arrived.
async fn phase(queue: Queue, env: &Env, per_producer: usize, pace: Pace) -> anyhow::Result<Phase> {
    let epoch = Instant::now();
    let received = Received::new(per_producer * PRODUCERS, epoch);
    let mut tasks = JoinSet::new();
    for c in 0..CONSUMERS {
        let received = received.clone();
        let env = env.clone();
        tasks.spawn(async move { consume(queue, &env, c, &received).await });
    }
    // Consumers are connected and waiting before anything is published.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    for p in 0..PRODUCERS {
        let env = env.clone();
        tasks.spawn(async move {
            let first = (p * per_producer) as u64;
            produce(queue, &env, first, per_producer, pace, epoch).await
        });
    }
    let all = async {
        while let Some(done) = tasks.join_next().await {
            done.context("a task panicked")??;
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(PHASE_LIMIT, all).await {
        Ok(done) => done?,
        Err(_) => bail!(
            "{}: only {} of {} messages arrived within {PHASE_LIMIT:?}",
            queue.name(),
            received.done.load(Ordering::Acquire),
            received.expected
        ),
    }
    let elapsed = started.elapsed();
    let mut seen = received.seen.lock().await;
    ensure!(
        seen.0.len() == received.expected,
        "{}: {} of {} messages arrived",
        queue.name(),
        seen.0.len(),
        received.expected
    );
    let duplicates = seen.1;
    let latencies = &mut seen.2;
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(Phase {
        per_second: received.expected as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        duplicates,
    })
}

/// The backends, and the names this run uses in each.
#[derive(Clone)]
struct Env {
    pool: PgPool,
    pg_url: String,
    redis: redis::Client,
    nats: String,
    stream: String,
    jet_stream: String,
    jet_stream_base: String,
    phases: u32,
}

async fn produce(
    queue: Queue,
    env: &Env,
    first: u64,
    count: usize,
    pace: Pace,
    epoch: Instant,
) -> anyhow::Result<()> {
    let per_call = match pace {
        Pace::Flat => BATCH,
        Pace::Paced { .. } => 1,
    };
    let mut ticks = match pace {
        Pace::Paced { interval } => Some(tokio::time::interval(interval)),
        Pace::Flat => None,
    };
    let mut publisher = Publisher::connect(queue, env).await?;
    let mut seq = first;
    let end = first + count as u64;
    while seq < end {
        if let Some(ticks) = &mut ticks {
            ticks.tick().await;
        }
        let n = per_call.min(usize::try_from(end - seq).unwrap_or(per_call));
        let bodies: Vec<String> = (seq..seq + n as u64).map(|s| message(s, epoch)).collect();
        publisher.publish(env, &bodies).await?;
        seq += n as u64;
    }
    Ok(())
}

enum Publisher {
    Redis(MultiplexedConnection),
    Postgres(PgConnection),
    Nats(Nats, String),
}

impl Publisher {
    async fn connect(queue: Queue, env: &Env) -> anyhow::Result<Self> {
        Ok(match queue {
            Queue::RedisStreams => Self::Redis(env.redis.get_multiplexed_async_connection().await?),
            Queue::PostgresTable => Self::Postgres(PgConnection::connect(&env.pg_url).await?),
            Queue::JetStream => {
                let mut nats = Nats::connect(&env.nats).await?;
                let inbox = format!("_INBOX.{}", Uuid::now_v7().simple());
                nats.sub(&inbox).await?;
                Self::Nats(nats, inbox)
            }
        })
    }

    /// Publishes `bodies`, returning once the queue has confirmed each.
    async fn publish(&mut self, env: &Env, bodies: &[String]) -> anyhow::Result<()> {
        match self {
            Self::Redis(conn) => {
                let mut pipe = redis::pipe();
                for body in bodies {
                    pipe.cmd("XADD")
                        .arg(&env.stream)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(1_000_000)
                        .arg("*")
                        .arg("m")
                        .arg(body)
                        .ignore();
                }
                pipe.query_async::<()>(conn).await?;
            }
            Self::Postgres(conn) => {
                // One statement for the batch, and the wake-up in the same transaction.
                let mut tx = conn.begin().await?;
                sqlx::query("INSERT INTO saga_queue (body) SELECT unnest($1::text[])")
                    .bind(bodies)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("NOTIFY saga_queue").execute(&mut *tx).await?;
                tx.commit().await?;
            }
            Self::Nats(nats, inbox) => {
                let subject = format!("{}.inventory", env.jet_stream);
                for body in bodies {
                    nats.publish(&subject, Some(inbox), body.as_bytes());
                }
                nats.flush().await?;
                for _ in bodies {
                    let ack = nats.next().await?;
                    ensure!(
                        ack.status.is_none() && ack.payload.windows(5).any(|w| w == b"\"seq\""),
                        "JetStream did not store a message: {}",
                        String::from_utf8_lossy(&ack.payload)
                    );
                }
            }
        }
        Ok(())
    }
}

async fn consume(queue: Queue, env: &Env, index: usize, received: &Received) -> anyhow::Result<()> {
    match queue {
        Queue::RedisStreams => {
            let mut conn = env.redis.get_multiplexed_async_connection().await?;
            let consumer = format!("c{index}");
            while !received.finished() {
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("saga")
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(BATCH)
                    .arg("BLOCK")
                    .arg(POLL.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&env.stream)
                    .arg(">")
                    .query_async(&mut conn)
                    .await?;
                let entries: Vec<_> = reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect();
                if entries.is_empty() {
                    continue;
                }
                let mut bodies = Vec::with_capacity(entries.len());
                for entry in &entries {
                    match entry.map.get("m") {
                        Some(redis::Value::BulkString(body)) => bodies.push(body.clone()),
                        other => bail!("entry {} has no body: {other:?}", entry.id),
                    }
                }
                received.got(&bodies).await?;
                let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
                let acked: usize = redis::cmd("XACK")
                    .arg(&env.stream)
                    .arg("saga")
                    .arg(&ids)
                    .query_async(&mut conn)
                    .await?;
                ensure!(
                    acked == ids.len(),
                    "XACK acknowledged {acked} of {}",
                    ids.len()
                );
            }
        }
        Queue::PostgresTable => {
            let mut listener = PgListener::connect(&env.pg_url).await?;
            listener.listen("saga_queue").await?;
            let mut conn = PgConnection::connect(&env.pg_url).await?;
            while !received.finished() {
                let mut tx = conn.begin().await?;
                let rows = sqlx::query(
                    "DELETE FROM saga_queue WHERE id IN (
                         SELECT id FROM saga_queue ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                     RETURNING body",
                )
                .bind(BATCH as i64)
                .fetch_all(&mut *tx)
                .await?;
                if rows.is_empty() {
                    tx.rollback().await?;
                    // Woken by the next commit's NOTIFY, or looks again after POLL.
                    let _ = tokio::time::timeout(POLL, listener.recv()).await;
                    continue;
                }
                let bodies: Vec<Vec<u8>> = rows
                    .iter()
                    .map(|r| r.get::<String, _>("body").into_bytes())
                    .collect();
                received.got(&bodies).await?;
                tx.commit().await?;
            }
        }
        Queue::JetStream => {
            let mut nats = Nats::connect(&env.nats).await?;
            let inbox = format!("_INBOX.{}", Uuid::now_v7().simple());
            nats.sub(&inbox).await?;
            let next = format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.saga",
                env.jet_stream.to_uppercase()
            );
            let request = format!(r#"{{"batch":{BATCH},"expires":{}}}"#, POLL.as_nanos());
            while !received.finished() {
                nats.publish(&next, Some(&inbox), request.as_bytes());
                nats.flush().await?;
                let mut bodies = Vec::with_capacity(BATCH);
                let mut acks = Vec::with_capacity(BATCH);
                while bodies.len() < BATCH {
                    let msg = nats.next().await?;
                    if msg.status.is_some() {
                        // 404 no messages, 408 the request expired: this pull is over.
                        break;
                    }
                    acks.push(
                        msg.reply
                            .context("a JetStream message without an ack subject")?,
                    );
                    // A pull hands each message over as it arrives, not when the batch fills.
                    received.got(std::slice::from_ref(&msg.payload)).await?;
                    bodies.push(msg.payload);
                }
                if bodies.is_empty() {
                    continue;
                }
                for ack in &acks {
                    nats.publish(ack, None, b"+ACK");
                }
                nats.ping().await?;
            }
        }
    }
    Ok(())
}

/// A NATS connection speaking the client protocol, used by one task.
struct Nats {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    pending: Vec<u8>,
    line: String,
    sids: u32,
}

/// A message delivered to a subscription; `status` is a JetStream status (`404`, `408`, ...)
/// when the message is one.
struct Delivered {
    reply: Option<String>,
    status: Option<String>,
    payload: Vec<u8>,
}

impl Nats {
    async fn connect(address: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(address).await.with_context(|| {
            format!(
                "NATS is not reachable at {address}: start it with \
                 `nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server`, or set NATS_URL"
            )
        })?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        let mut nats = Self {
            reader: BufReader::new(read),
            writer,
            pending: Vec::new(),
            line: String::new(),
            sids: 0,
        };
        nats.read_line().await?;
        ensure!(
            nats.line.starts_with("INFO "),
            "not a NATS server: {}",
            nats.line
        );
        ensure!(
            nats.line.contains("\"jetstream\":true"),
            "the NATS server at {address} runs without JetStream (start it with -js)"
        );
        nats.pending.extend_from_slice(
            br#"CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"lang":"rust","version":"0"}"#,
        );
        nats.pending.extend_from_slice(b"\r\n");
        nats.ping().await?;
        Ok(nats)
    }

    async fn read_line(&mut self) -> anyhow::Result<()> {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).await?;
        ensure!(n > 0, "NATS closed the connection");
        Ok(())
    }

    async fn sub(&mut self, subject: &str) -> anyhow::Result<()> {
        self.sids += 1;
        let sid = self.sids;
        self.pending
            .extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
        self.ping().await
    }

    /// Queues a `PUB`, sent at the next flush.
    fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) {
        let head = match reply {
            Some(reply) => format!("PUB {subject} {reply} {}\r\n", payload.len()),
            None => format!("PUB {subject} {}\r\n", payload.len()),
        };
        self.pending.extend_from_slice(head.as_bytes());
        self.pending.extend_from_slice(payload);
        self.pending.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.writer.write_all(&self.pending).await?;
        self.pending.clear();
        Ok(())
    }

    /// Sends what is queued and a `PING`, and waits for the `PONG`: the server has then
    /// handled everything before it. Fails on a message in between (none is expected).
    async fn ping(&mut self) -> anyhow::Result<()> {
        self.pending.extend_from_slice(b"PING\r\n");
        self.flush().await?;
        loop {
            self.read_line().await?;
            match self.line.trim_end() {
                "PONG" => return Ok(()),
                "PING" => {
                    self.writer.write_all(b"PONG\r\n").await?;
                }
                line if line.starts_with("-ERR") => bail!("NATS: {line}"),
                line if line.starts_with("+OK") || line.starts_with("INFO") => {}
                line => bail!("NATS: unexpected {line:?} while waiting for PONG"),
            }
        }
    }

    /// The next message delivered to one of this connection's subscriptions.
    async fn next(&mut self) -> anyhow::Result<Delivered> {
        loop {
            self.read_line().await?;
            let line = self.line.trim_end().to_owned();
            let words: Vec<&str> = line.split(' ').collect();
            match words[0] {
                "MSG" => {
                    // MSG <subject> <sid> [reply-to] <#bytes>
                    let size: usize = words[words.len() - 1].parse()?;
                    let reply = (words.len() == 5).then(|| words[3].to_owned());
                    let payload = self.read_payload(size).await?;
                    return Ok(Delivered {
                        reply,
                        status: None,
                        payload,
                    });
                }
                "HMSG" => {
                    // HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
                    let total: usize = words[words.len() - 1].parse()?;
                    let headers: usize = words[words.len() - 2].parse()?;
                    let reply = (words.len() == 6).then(|| words[3].to_owned());
                    let mut all = self.read_payload(total).await?;
                    let payload = all.split_off(headers.min(all.len()));
                    let head = String::from_utf8_lossy(&all);
                    // "NATS/1.0 408 Request Timeout" carries a status; plain headers do not.
                    let status = head
                        .lines()
                        .next()
                        .and_then(|first| first.split(' ').nth(1))
                        .map(str::to_owned);
                    return Ok(Delivered {
                        reply,
                        status,
                        payload,
                    });
                }
                "PING" => self.writer.write_all(b"PONG\r\n").await?,
                "+OK" | "INFO" | "PONG" => {}
                _ if line.starts_with("-ERR") => bail!("NATS: {line}"),
                _ => bail!("NATS: unexpected {line:?}"),
            }
        }
    }

    async fn read_payload(&mut self, size: usize) -> anyhow::Result<Vec<u8>> {
        let mut payload = vec![0; size + 2];
        self.reader.read_exact(&mut payload).await?;
        payload.truncate(size);
        Ok(payload)
    }

    /// A JetStream API request and its JSON answer; fails on an API error.
    async fn request(&mut self, subject: &str, body: &str) -> anyhow::Result<serde_json::Value> {
        let inbox = format!("_INBOX.{}", Uuid::now_v7().simple());
        self.sub(&inbox).await?;
        self.publish(subject, Some(&inbox), body.as_bytes());
        self.flush().await?;
        let answer = self.next().await?;
        let value: serde_json::Value =
            serde_json::from_slice(&answer.payload).context("a JetStream answer is JSON")?;
        if let Some(error) = value.get("error") {
            bail!("JetStream {subject}: {error}");
        }
        Ok(value)
    }
}

/// Creates, for one run, the Redis stream and its group, the PostgreSQL table, and the
/// JetStream stream with its durable consumer.
async fn prepare(env: &mut Env) -> anyhow::Result<()> {
    // A new JetStream stream each time: one deleted and made again under the same name
    // sometimes delivered nothing to the new consumer.
    delete_jet_stream(env).await;
    env.phases += 1;
    env.jet_stream = format!("{}_{}", env.jet_stream_base, env.phases);
    let mut redis = env.redis.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("DEL")
        .arg(&env.stream)
        .query_async(&mut redis)
        .await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&env.stream)
        .arg("saga")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await?;
    env.pool
        .execute(
            "DROP TABLE IF EXISTS saga_queue;
             CREATE TABLE saga_queue (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text NOT NULL)",
        )
        .await?;
    let mut nats = Nats::connect(&env.nats).await?;
    let name = env.jet_stream.to_uppercase();
    nats.request(
        &format!("$JS.API.STREAM.CREATE.{name}"),
        &format!(
            r#"{{"name":"{name}","subjects":["{}.>"],"storage":"file","retention":"limits","num_replicas":1}}"#,
            env.jet_stream
        ),
    )
    .await?;
    nats.request(
        &format!("$JS.API.CONSUMER.DURABLE.CREATE.{name}.saga"),
        &format!(
            r#"{{"stream_name":"{name}","config":{{"durable_name":"saga","ack_policy":"explicit","deliver_policy":"all","ack_wait":30000000000,"max_ack_pending":10000}}}}"#
        ),
    )
    .await?;
    Ok(())
}

/// Deletes the phase's JetStream stream, if there is one.
async fn delete_jet_stream(env: &Env) {
    if env.phases == 0 {
        return;
    }
    if let Ok(mut nats) = Nats::connect(&env.nats).await {
        let name = env.jet_stream.to_uppercase();
        let _ = nats
            .request(&format!("$JS.API.STREAM.DELETE.{name}"), "")
            .await;
    }
}

async fn clean_up(env: &Env, database: &str) -> anyhow::Result<()> {
    let mut redis = env.redis.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("DEL")
        .arg(&env.stream)
        .query_async(&mut redis)
        .await?;
    delete_jet_stream(env).await;
    env.pool.close().await;
    let mut admin = PgConnection::connect(&test_support::test_database_url()).await?;
    admin
        .execute(format!("DROP DATABASE {database} WITH (FORCE)").as_str())
        .await?;
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let redis_url = test_support::require_redis().await;
    let pg_url = test_support::fresh_database("saga_queue").await;
    let database = pg_url
        .rsplit_once('/')
        .context("a database URL")?
        .1
        .to_owned();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg_url)
        .await?;
    let run = Uuid::now_v7().simple().to_string();
    let mut env = Env {
        pool,
        pg_url,
        redis: redis::Client::open(redis_url)?,
        nats: std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into()),
        stream: format!("saga-queue-bench-{run}"),
        jet_stream: String::new(),
        jet_stream_base: format!("saga_queue_bench_{run}"),
        phases: 0,
    };
    println!(
        "{MESSAGES} messages of {} bytes, {PRODUCERS} producers, {CONSUMERS} consumers, \
         batch {BATCH}; latency at {PACED_RATE} msgs/s for {PACED_FOR:?}; median of {RUNS} runs",
        message(0, Instant::now()).len()
    );
    let paced_per_producer = (PACED_RATE as usize * PACED_FOR.as_secs() as usize) / PRODUCERS;
    let interval = Duration::from_secs(PRODUCERS as u64) / PACED_RATE;
    // `saga_queue_throughput redis postgres jetstream`, or nothing for all three.
    let only: Vec<String> = std::env::args().skip(1).collect();
    let queues = [Queue::RedisStreams, Queue::PostgresTable, Queue::JetStream];
    let mut results: Vec<(Queue, Vec<Phase>, Vec<Phase>)> = queues
        .iter()
        .map(|q| (*q, Vec::new(), Vec::new()))
        .collect();
    for run in 1..=RUNS {
        // Interleaved, so a slow moment of the shared host does not fall on one queue only.
        for (queue, flat, paced) in &mut results {
            if !only.is_empty() && !only.iter().any(|o| o == queue.key()) {
                continue;
            }
            let began = Instant::now();
            prepare(&mut env).await?;
            let f = phase(*queue, &env, MESSAGES / PRODUCERS, Pace::Flat).await?;
            prepare(&mut env).await?;
            let p = phase(*queue, &env, paced_per_producer, Pace::Paced { interval }).await?;
            eprintln!("({} took {:.1?})", queue.key(), began.elapsed());
            println!(
                "run {run} {:<45} {:>8.0} msgs/s (dup {}) | paced p50 {:>8.2?} p99 {:>8.2?} (dup {})",
                queue.name(),
                f.per_second,
                f.duplicates,
                p.p50,
                p.p99,
                p.duplicates
            );
            flat.push(f);
            paced.push(p);
        }
    }
    println!();
    println!(
        "| queue | msgs/s (saturated) | p50 saturated | p99 saturated | p50 at {PACED_RATE}/s | p99 at {PACED_RATE}/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let ms = |d: &[Phase], f: fn(&Phase) -> Duration| {
        median(d.iter().map(|p| f(p).as_secs_f64() * 1000.0).collect())
    };
    for (queue, flat, paced) in &results {
        if flat.is_empty() {
            continue;
        }
        println!(
            "| {} | {:.0} | {:.1} ms | {:.1} ms | {:.2} ms | {:.2} ms |",
            queue.name(),
            median(flat.iter().map(|p| p.per_second).collect()),
            ms(flat, |p| p.p50),
            ms(flat, |p| p.p99),
            ms(paced, |p| p.p50),
            ms(paced, |p| p.p99),
        );
    }
    clean_up(&env, &database).await
}
