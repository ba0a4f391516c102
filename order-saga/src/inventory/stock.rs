//! Stock operations, each one transaction that never reads and then writes: a reservation is
//! one conditional `UPDATE` over all the order's lines, so two buyers of the last unit cannot
//! both get it whatever the interleaving.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::Line;

/// What became of a command, for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done now or before.
    Done,
    /// Refused, with the reason the order will carry.
    Refused(String),
}

/// Holds `lines` for `order_id` until `expires_at`, all or nothing. A second reservation of
/// the same order answers as the first did; one arriving after the order was released (a
/// reordered message) is refused.
pub async fn reserve(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &[Line],
    expires_at: DateTime<Utc>,
) -> sqlx::Result<Verdict> {
    if let Some(state) = state_of(conn, order_id).await? {
        return Ok(match state.as_str() {
            "held" | "sold" => Verdict::Done,
            "refused" => Verdict::Refused(reason_of(conn, order_id).await?),
            other => Verdict::Refused(format!("the order's stock was already {other}")),
        });
    }
    let products: Vec<Uuid> = lines.iter().map(|l| l.product_id).collect();
    let quantities: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
    // Rows are locked in id order, so two orders over the same products cannot deadlock.
    let taken = sqlx::query(
        "WITH wanted AS (
             SELECT p, q FROM unnest($1::uuid[], $2::int[]) AS w(p, q)
         ), locked AS (
             SELECT products.id FROM products JOIN wanted ON products.id = wanted.p
             ORDER BY products.id FOR UPDATE
         )
         UPDATE products SET available = available - wanted.q, held = held + wanted.q
         FROM wanted
         WHERE products.id = wanted.p AND products.id IN (SELECT id FROM locked)
           AND products.available >= wanted.q",
    )
    .bind(&products)
    .bind(&quantities)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if taken as usize != lines.len() {
        // Not every line could be held: undo the lines that were, by the caller's savepoint.
        return Ok(Verdict::Refused(String::new()));
    }
    sqlx::query("INSERT INTO holds (order_id, state, expires_at) VALUES ($1, 'held', $2)")
        .bind(order_id)
        .bind(expires_at)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO hold_lines (order_id, product_id, quantity)
         SELECT $1, p, q FROM unnest($2::uuid[], $3::int[]) AS w(p, q)",
    )
    .bind(order_id)
    .bind(&products)
    .bind(&quantities)
    .execute(&mut *conn)
    .await?;
    Ok(Verdict::Done)
}

/// Records that `order_id` could not be held, naming the first line short of stock.
pub async fn refuse(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &[Line],
) -> sqlx::Result<String> {
    let products: Vec<Uuid> = lines.iter().map(|l| l.product_id).collect();
    let quantities: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
    let short: Option<Uuid> = sqlx::query_scalar(
        "SELECT w.p FROM unnest($1::uuid[], $2::int[]) AS w(p, q)
         LEFT JOIN products ON products.id = w.p
         WHERE products.id IS NULL OR products.available < w.q
         ORDER BY w.p LIMIT 1",
    )
    .bind(&products)
    .bind(&quantities)
    .fetch_optional(&mut *conn)
    .await?;
    let reason = match short {
        Some(product) => format!("out of stock: product {product}"),
        None => "out of stock".to_owned(),
    };
    sqlx::query(
        "INSERT INTO holds (order_id, state, reason, expires_at) VALUES ($1, 'refused', $2, now())
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(&reason)
    .execute(conn)
    .await?;
    Ok(reason)
}

/// Turns the order's live hold into a sale. A hold that expired (the sweeper gave its stock
/// back) is refused: the saga then compensates.
pub async fn confirm(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Verdict> {
    let state: Option<(String, bool)> = sqlx::query_as(
        "SELECT state, expires_at <= now() FROM holds WHERE order_id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await?;
    match state {
        Some((state, _)) if state == "sold" => Ok(Verdict::Done),
        Some((state, false)) if state == "held" => {
            move_stock(conn, order_id, Movement::HeldToSold).await?;
            set_state(conn, order_id, "sold", None).await?;
            Ok(Verdict::Done)
        }
        Some((state, true)) if state == "held" => {
            // Past its time but not yet swept: give it back now rather than sell it late.
            move_stock(conn, order_id, Movement::HeldToAvailable).await?;
            set_state(
                conn,
                order_id,
                "expired",
                Some("the hold expired before confirmation"),
            )
            .await?;
            Ok(Verdict::Refused(
                "the stock hold expired before confirmation".into(),
            ))
        }
        Some((state, _)) => Ok(Verdict::Refused(format!("the order's stock is {state}"))),
        None => Ok(Verdict::Refused("the order holds no stock".into())),
    }
}

/// Gives the order's stock back, held or sold. Releasing an order inventory never saw leaves
/// a tombstone, so a reservation that arrives late is refused instead of holding stock for
/// an order that is already cancelled.
pub async fn release(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Verdict> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM holds WHERE order_id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_optional(&mut *conn)
            .await?;
    match state.as_deref() {
        None => {
            sqlx::query(
                "INSERT INTO holds (order_id, state, reason, expires_at)
                 VALUES ($1, 'released', 'released before it was reserved', now())",
            )
            .bind(order_id)
            .execute(&mut *conn)
            .await?;
        }
        Some("held") => {
            move_stock(conn, order_id, Movement::HeldToAvailable).await?;
            set_state(conn, order_id, "released", None).await?;
        }
        Some("sold") => {
            move_stock(conn, order_id, Movement::SoldToAvailable).await?;
            set_state(conn, order_id, "released", None).await?;
        }
        Some(_) => {}
    }
    Ok(Verdict::Done)
}

/// Gives back up to `limit` holds past their time; returns the orders released.
pub async fn expire(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<Uuid>> {
    let due: Vec<Uuid> = sqlx::query_scalar(
        "SELECT order_id FROM holds WHERE state = 'held' AND expires_at <= now()
         ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    for order_id in &due {
        move_stock(conn, *order_id, Movement::HeldToAvailable).await?;
        set_state(conn, *order_id, "expired", Some("not confirmed in time")).await?;
    }
    Ok(due)
}

/// Where a hold's units move.
#[derive(Debug, Clone, Copy)]
enum Movement {
    HeldToSold,
    HeldToAvailable,
    SoldToAvailable,
}

/// Moves the units of `order_id`'s lines, locking its products in id order (as
/// [`reserve`] does) so concurrent moves over the same products cannot deadlock.
async fn move_stock(
    conn: &mut PgConnection,
    order_id: Uuid,
    movement: Movement,
) -> sqlx::Result<()> {
    let assignments = match movement {
        Movement::HeldToSold => "held = held - l.quantity, sold = sold + l.quantity",
        Movement::HeldToAvailable => "held = held - l.quantity, available = available + l.quantity",
        Movement::SoldToAvailable => "sold = sold - l.quantity, available = available + l.quantity",
    };
    sqlx::query(&format!(
        "WITH locked AS (
             SELECT products.id FROM products JOIN hold_lines ON hold_lines.product_id = products.id
             WHERE hold_lines.order_id = $1 ORDER BY products.id FOR UPDATE OF products
         )
         UPDATE products SET {assignments}
         FROM hold_lines l
         WHERE l.order_id = $1 AND products.id = l.product_id
           AND products.id IN (SELECT id FROM locked)"
    ))
    .bind(order_id)
    .execute(conn)
    .await?;
    Ok(())
}

async fn set_state(
    conn: &mut PgConnection,
    order_id: Uuid,
    state: &str,
    reason: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE holds SET state = $2, reason = coalesce($3, reason), updated_at = now() WHERE order_id = $1")
        .bind(order_id)
        .bind(state)
        .bind(reason)
        .execute(conn)
        .await?;
    Ok(())
}

async fn state_of(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT state FROM holds WHERE order_id = $1 FOR UPDATE")
        .bind(order_id)
        .fetch_optional(conn)
        .await
}

async fn reason_of(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<String> {
    let reason: Option<String> = sqlx::query_scalar("SELECT reason FROM holds WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(conn)
        .await?;
    Ok(reason.unwrap_or_else(|| "out of stock".into()))
}
