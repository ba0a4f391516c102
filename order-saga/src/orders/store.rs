//! Orders and their sagas in PostgreSQL. Every change of a saga is one transaction that
//! locks the order's row, applies the [`saga`](super::saga) machine, records the step
//! history, and writes the command it sends to the outbox.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use super::{
    new_order::NewOrder,
    saga::{Event, Ignored, Limits, Saga, Status, Transition},
};
use crate::{
    bus::outbox,
    messages::{Address, Body, Envelope, Line, Service, Step},
};

/// A product line with its price, as stored.
#[derive(Debug, Clone, Copy)]
pub struct PricedLine {
    /// The product.
    pub product_id: Uuid,
    /// How many.
    pub quantity: i32,
    /// Price per unit, minor units.
    pub unit_price: i64,
}

/// What creating an order answered.
#[derive(Debug)]
pub enum Created {
    /// The answer to send (the first one, for a repeated key and body).
    Answer {
        /// HTTP status.
        status: u16,
        /// Body.
        body: Value,
        /// Whether it is a replay of an earlier answer.
        replayed: bool,
    },
    /// The same key is being processed by another request right now.
    InFlight,
    /// The key was used with a different body.
    KeyReused,
}

/// The fingerprint of a request body, compared between uses of one key.
pub fn fingerprint(body: &[u8]) -> Vec<u8> {
    Sha256::digest(body).to_vec()
}

/// What an earlier use of `key` answers a request whose body has `fingerprint`: its first
/// answer replayed for the same body, [`Created::KeyReused`] for another; `None` when the key
/// is new (or still being used by a request that has not committed).
pub async fn earlier_use(
    conn: &mut PgConnection,
    key: &str,
    fingerprint: &[u8],
) -> sqlx::Result<Option<Created>> {
    let earlier =
        sqlx::query("SELECT fingerprint, status, response FROM idempotency_keys WHERE key = $1")
            .bind(key)
            .fetch_optional(conn)
            .await?;
    Ok(earlier.map(|earlier| {
        if earlier.get::<Vec<u8>, _>("fingerprint") == fingerprint {
            Created::Answer {
                status: earlier.get::<i16, _>("status") as u16,
                body: earlier.get("response"),
                replayed: true,
            }
        } else {
            Created::KeyReused
        }
    }))
}

/// Persists a new order and its saga, and queues its first command, in one transaction
/// guarded by the idempotency key.
#[allow(clippy::too_many_arguments)]
pub async fn create(
    pool: &PgPool,
    key: &str,
    fingerprint: &[u8],
    order: &NewOrder,
    lines: &[PricedLine],
    currency: &str,
    traceparent: Option<String>,
    prefix: &str,
    limits: &Limits,
) -> sqlx::Result<Created> {
    let mut tx = pool.begin().await?;
    // A second request with the key while this one runs gets 409 at once rather than
    // waiting on the key row's lock.
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 7))")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
    if !locked {
        return Ok(Created::InFlight);
    }
    if let Some(earlier) = earlier_use(&mut tx, key, fingerprint).await? {
        // Ended here rather than by the drop, whose rollback runs later: until it does, the
        // key's lock is held and a retry sent right after this answer would get 409.
        tx.rollback().await?;
        return Ok(earlier);
    }
    let id = Uuid::now_v7();
    let total: i64 = lines
        .iter()
        .map(|l| l.unit_price * i64::from(l.quantity))
        .sum();
    let saga = Saga::start();
    let step = saga.step.expect("a new saga has a first step");
    let deadline =
        Utc::now() + chrono::Duration::from_std(limits.step_deadline).unwrap_or_default();
    let address = serde_json::to_value(&order.shipping_address).expect("an address serializes");
    let row = sqlx::query(
        "INSERT INTO orders (id, customer_id, status, total, currency, payment_method, shipping_address,
                             traceparent, step, attempt, sent, step_deadline)
         VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, $8, 1, true, $9)
         RETURNING *",
    )
    .bind(id)
    .bind(order.customer_id.as_str())
    .bind(total)
    .bind(currency)
    .bind(order.payment_method.as_str())
    .bind(&address)
    .bind(&traceparent)
    .bind(step.as_str())
    .bind(deadline)
    .fetch_one(&mut *tx)
    .await?;
    let products: Vec<Uuid> = lines.iter().map(|l| l.product_id).collect();
    let quantities: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
    let prices: Vec<i64> = lines.iter().map(|l| l.unit_price).collect();
    sqlx::query(
        "INSERT INTO order_lines (order_id, product_id, quantity, unit_price)
         SELECT $1, p, q, u FROM unnest($2::uuid[], $3::int[], $4::bigint[]) AS l(p, q, u)",
    )
    .bind(id)
    .bind(&products)
    .bind(&quantities)
    .bind(&prices)
    .execute(&mut *tx)
    .await?;
    start_step(&mut tx, id, step, 1).await?;
    let command = Envelope::new(
        id,
        1,
        traceparent,
        Body::ReserveStock {
            lines: lines
                .iter()
                .map(|l| Line {
                    product_id: l.product_id,
                    quantity: l.quantity,
                })
                .collect(),
        },
    );
    outbox::enqueue(&mut tx, &step.service().stream(prefix), &command).await?;
    let body = order_json(&row, lines_json(lines), Vec::new());
    sqlx::query("INSERT INTO idempotency_keys (key, fingerprint, order_id, status, response) VALUES ($1, $2, $3, 201, $4)")
        .bind(key)
        .bind(fingerprint)
        .bind(id)
        .bind(&body)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Created::Answer {
        status: 201,
        body,
        replayed: false,
    })
}

/// Applies `event` to the saga of `order_id` inside `conn`'s transaction: the new state, the
/// step history and the command to send. `Ok(None)` when the event changed nothing (or the
/// order does not exist).
pub async fn apply(
    conn: &mut PgConnection,
    order_id: Uuid,
    event: Event,
    prefix: &str,
    limits: &Limits,
) -> anyhow::Result<Option<Result<Transition, Ignored>>> {
    let Some(row) = sqlx::query("SELECT * FROM orders WHERE id = $1 FOR UPDATE")
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let saga = saga_of(&row)?;
    let transition = match saga.apply(event, limits) {
        Ok(transition) => transition,
        Err(ignored) => return Ok(Some(Err(ignored))),
    };
    if let Some((step, attempt, end, detail)) = &transition.ended {
        sqlx::query(
            "UPDATE saga_steps SET status = $4, detail = $5, finished_at = now()
             WHERE order_id = $1 AND step = $2 AND attempt = $3",
        )
        .bind(order_id)
        .bind(step.as_str())
        .bind(*attempt as i32)
        .bind(end.as_str())
        .bind(detail)
        .execute(&mut *conn)
        .await?;
    }
    let next = &transition.saga;
    let deadline = transition
        .deadline_in
        .map(|d| Utc::now() + chrono::Duration::from_std(d).unwrap_or_default());
    let compensations: Vec<&str> = next.compensations.iter().map(|s| s.as_str()).collect();
    sqlx::query(
        "UPDATE orders SET status = $2, reason = $3, step = $4, attempt = $5, sent = $6,
                compensations = $7, step_deadline = $8, updated_at = now()
         WHERE id = $1",
    )
    .bind(order_id)
    .bind(next.status.as_str())
    .bind(&next.reason)
    .bind(next.step.map(Step::as_str))
    .bind(next.attempt as i32)
    .bind(next.sent)
    .bind(&compensations)
    .bind(deadline)
    .execute(&mut *conn)
    .await?;
    if transition.send
        && let Some(step) = next.step
    {
        start_step(conn, order_id, step, next.attempt).await?;
        let body = command_for(conn, &row, step).await?;
        let traceparent: Option<String> = row.get("traceparent");
        let command = Envelope::new(order_id, next.attempt, traceparent, body);
        outbox::enqueue(conn, &step.service().stream(prefix), &command).await?;
    }
    if next.status == Status::NeedsAttention {
        sqlx::query(
            "INSERT INTO audit (order_id, event, detail) VALUES ($1, 'needs_attention', $2)",
        )
        .bind(order_id)
        .bind(&next.reason)
        .execute(&mut *conn)
        .await?;
    }
    Ok(Some(Ok(transition)))
}

async fn start_step(
    conn: &mut PgConnection,
    order_id: Uuid,
    step: Step,
    attempt: u32,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO saga_steps (order_id, step, attempt, status) VALUES ($1, $2, $3, 'started')
         ON CONFLICT DO NOTHING",
    )
    .bind(order_id)
    .bind(step.as_str())
    .bind(attempt as i32)
    .execute(conn)
    .await?;
    Ok(())
}

/// The command that starts `step` for the order in `row`.
async fn command_for(conn: &mut PgConnection, row: &PgRow, step: Step) -> anyhow::Result<Body> {
    Ok(match step {
        Step::ReserveStock => {
            let lines = sqlx::query("SELECT product_id, quantity FROM order_lines WHERE order_id = $1 ORDER BY product_id")
                .bind(row.get::<Uuid, _>("id"))
                .fetch_all(conn)
                .await?
                .iter()
                .map(|l| Line { product_id: l.get("product_id"), quantity: l.get("quantity") })
                .collect();
            Body::ReserveStock { lines }
        }
        Step::AuthorizePayment => Body::AuthorizePayment {
            amount: row.get("total"),
            currency: row.get("currency"),
            payment_method: row.get("payment_method"),
        },
        Step::CreateShipment => Body::CreateShipment {
            address: serde_json::from_value::<Address>(row.get("shipping_address"))
                .context("a stored address does not read back")?,
        },
        Step::CapturePayment => Body::CapturePayment,
        Step::ConfirmStock => Body::ConfirmStock,
        Step::CancelShipment => Body::CancelShipment,
        Step::VoidPayment => Body::VoidPayment,
        Step::ReleaseStock => Body::ReleaseStock,
    })
}

fn saga_of(row: &PgRow) -> anyhow::Result<Saga> {
    let status: String = row.get("status");
    let step: Option<String> = row.get("step");
    let compensations: Vec<String> = row.get("compensations");
    Ok(Saga {
        status: Status::parse(&status).with_context(|| format!("unknown status {status}"))?,
        step: step
            .map(|s| Step::parse(&s).with_context(|| format!("unknown step {s}")))
            .transpose()?,
        attempt: row.get::<i32, _>("attempt") as u32,
        sent: row.get("sent"),
        compensations: compensations
            .iter()
            .map(|s| Step::parse(s).with_context(|| format!("unknown step {s}")))
            .collect::<anyhow::Result<_>>()?,
        reason: row.get("reason"),
    })
}

/// Orders whose step deadline (or backoff) has passed, up to `limit`, each handled in its
/// own transaction with the row locked (`SKIP LOCKED`, so several instances share them).
pub async fn due(
    pool: &PgPool,
    limit: i64,
    prefix: &str,
    limits: &Limits,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, step, attempt FROM orders
         WHERE status = 'pending' AND step_deadline <= now()
         ORDER BY step_deadline LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let count = rows.len();
    for row in rows {
        let step: Option<String> = row.get("step");
        let Some(step) = step.as_deref().and_then(Step::parse) else {
            continue;
        };
        let event = Event::DeadlinePassed {
            step,
            attempt: row.get::<i32, _>("attempt") as u32,
        };
        apply(&mut tx, row.get("id"), event, prefix, limits).await?;
    }
    tx.commit().await?;
    Ok(count)
}

/// Deletes idempotency keys older than `keep`.
pub async fn prune_keys(pool: &PgPool, keep: Duration) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(keep.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// One order with its lines and step history.
pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Value>> {
    let Some(row) = sqlx::query("SELECT * FROM orders WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let lines = sqlx::query("SELECT product_id, quantity, unit_price FROM order_lines WHERE order_id = $1 ORDER BY product_id")
        .bind(id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|l| json!({"product_id": l.get::<Uuid, _>("product_id"), "quantity": l.get::<i32, _>("quantity"), "unit_price": l.get::<i64, _>("unit_price")}))
        .collect();
    let steps =
        sqlx::query("SELECT * FROM saga_steps WHERE order_id = $1 ORDER BY started_at, attempt")
            .bind(id)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|s| {
                json!({
                    "step": s.get::<String, _>("step"),
                    "attempt": s.get::<i32, _>("attempt"),
                    "status": s.get::<String, _>("status"),
                    "detail": s.get::<Option<String>, _>("detail"),
                    "started_at": s.get::<DateTime<Utc>, _>("started_at"),
                    "finished_at": s.get::<Option<DateTime<Utc>>, _>("finished_at"),
                })
            })
            .collect();
    Ok(Some(order_json(&row, lines, steps)))
}

/// A page of orders, newest first, after `cursor`.
pub async fn list(
    pool: &PgPool,
    cursor: Option<Uuid>,
    limit: usize,
) -> sqlx::Result<(Vec<Value>, bool)> {
    let rows = sqlx::query(
        "SELECT * FROM orders WHERE $1::uuid IS NULL OR id < $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(cursor)
    .bind(limit as i64 + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() > limit;
    Ok((
        rows.iter()
            .take(limit)
            .map(|r| order_json(r, Value::Null, Vec::new()))
            .collect(),
        more,
    ))
}

fn lines_json(lines: &[PricedLine]) -> Value {
    lines
        .iter()
        .map(|l| json!({"product_id": l.product_id, "quantity": l.quantity, "unit_price": l.unit_price}))
        .collect()
}

fn order_json(row: &PgRow, items: Value, steps: Vec<Value>) -> Value {
    let mut order = json!({
        "id": row.get::<Uuid, _>("id"),
        "status": row.get::<String, _>("status"),
        "reason": row.get::<Option<String>, _>("reason"),
        "customer_id": row.get::<String, _>("customer_id"),
        "total": row.get::<i64, _>("total"),
        "currency": row.get::<String, _>("currency"),
        "step": row.get::<Option<String>, _>("step"),
        "deadline": row.get::<Option<DateTime<Utc>>, _>("step_deadline"),
        "created_at": row.get::<DateTime<Utc>, _>("created_at"),
        "updated_at": row.get::<DateTime<Utc>, _>("updated_at"),
    });
    if !items.is_null() {
        order["items"] = items;
        order["steps"] = Value::Array(steps);
    }
    order
}

/// The stream replies arrive on.
pub fn replies(prefix: &str) -> String {
    Service::Orders.stream(prefix)
}
