//! What must hold of the whole system at any quiet moment, checked in SQL across the four
//! schemas of one database: the proof the tests and the load test end with.
//!
//! - Stock is conserved: per product, available + held + sold = received, and held and sold
//!   equal what the holds say.
//! - Money follows orders: captured payments add up to the confirmed orders' totals, order by
//!   order.
//! - A cancelled order keeps nothing: no live or sold hold, no authorized or captured payment,
//!   no live shipment.
//! - No saga is stuck: every order is terminal, or pending within its step's deadline.

use std::{fmt, time::Duration};

use sqlx::PgPool;
use uuid::Uuid;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which rule.
    pub rule: &'static str,
    /// What broke it.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.detail)
    }
}

/// Orders by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Still running.
    pub pending: i64,
    /// Confirmed.
    pub confirmed: i64,
    /// Cancelled.
    pub cancelled: i64,
    /// Left for an operator.
    pub needs_attention: i64,
    /// Cancelled because stock ran out.
    pub cancelled_out_of_stock: i64,
}

/// Every broken invariant; empty when all hold. `slack` is how far past its deadline a
/// pending order may be (the sweeper's period and a little).
pub async fn check(pool: &PgPool, slack: Duration) -> sqlx::Result<Vec<Violation>> {
    let mut violations = Vec::new();
    let rules: [(&'static str, String); 6] = [
        (
            "stock is conserved",
            "SELECT id::text || ': available ' || available || ' + held ' || held || ' + sold ' || sold
                    || ' != received ' || received
             FROM inventory.products WHERE available + held + sold <> received"
                .into(),
        ),
        (
            "held and sold match the holds",
            "SELECT p.id::text || ': held ' || p.held || ' vs holds ' || coalesce(h.held, 0)
                    || ', sold ' || p.sold || ' vs holds ' || coalesce(h.sold, 0)
             FROM inventory.products p
             LEFT JOIN (SELECT l.product_id,
                               sum(l.quantity) FILTER (WHERE s.state = 'held') AS held,
                               sum(l.quantity) FILTER (WHERE s.state = 'sold') AS sold
                        FROM inventory.hold_lines l JOIN inventory.holds s USING (order_id)
                        GROUP BY l.product_id) h ON h.product_id = p.id
             WHERE p.held <> coalesce(h.held, 0) OR p.sold <> coalesce(h.sold, 0)"
                .into(),
        ),
        (
            "captured payments equal confirmed totals",
            "SELECT coalesce(o.id, p.order_id)::text || ': order ' || coalesce(o.status, 'missing')
                    || ' total ' || coalesce(o.total, 0) || ', payment ' || coalesce(p.state, 'none')
                    || ' ' || coalesce(p.amount, 0)
             FROM (SELECT id, status, total FROM orders.orders WHERE status = 'confirmed') o
             FULL JOIN (SELECT order_id, state, amount FROM payment.payments WHERE state = 'captured') p
               ON p.order_id = o.id
             WHERE o.id IS NULL OR p.order_id IS NULL OR o.total <> p.amount"
                .into(),
        ),
        (
            "a cancelled order keeps no stock",
            "SELECT o.id::text || ': hold ' || h.state FROM orders.orders o
             JOIN inventory.holds h ON h.order_id = o.id
             WHERE o.status = 'cancelled' AND h.state IN ('held', 'sold')"
                .into(),
        ),
        (
            "a cancelled order keeps no money",
            "SELECT o.id::text || ': payment ' || p.state FROM orders.orders o
             JOIN payment.payments p ON p.order_id = o.id
             WHERE o.status = 'cancelled' AND p.state IN ('authorizing', 'authorized', 'captured')"
                .into(),
        ),
        (
            "every order is terminal or within its deadline",
            format!(
                "SELECT id::text || ': pending at ' || coalesce(step, '?') || ' since ' || step_deadline
                 FROM orders.orders
                 WHERE status = 'pending' AND step_deadline < now() - interval '{} milliseconds'",
                slack.as_millis()
            ),
        ),
    ];
    for (rule, sql) in rules {
        let broken: Vec<String> = sqlx::query_scalar(&sql).fetch_all(pool).await?;
        violations.extend(broken.into_iter().map(|detail| Violation { rule, detail }));
    }
    let shipped: Vec<String> = sqlx::query_scalar(
        "SELECT o.id::text || ': shipment ' || s.state FROM orders.orders o
         JOIN shipping.shipments s ON s.order_id = o.id
         WHERE o.status = 'cancelled' AND s.state = 'created'",
    )
    .fetch_all(pool)
    .await?;
    violations.extend(shipped.into_iter().map(|detail| Violation {
        rule: "a cancelled order keeps no shipment",
        detail,
    }));
    Ok(violations)
}

/// Orders by status.
pub async fn counts(pool: &PgPool) -> sqlx::Result<Counts> {
    let row: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'),
                count(*) FILTER (WHERE status = 'confirmed'),
                count(*) FILTER (WHERE status = 'cancelled'),
                count(*) FILTER (WHERE status = 'needs_attention'),
                count(*) FILTER (WHERE status = 'cancelled' AND reason LIKE 'out of stock%')
         FROM orders.orders",
    )
    .fetch_one(pool)
    .await?;
    Ok(Counts {
        pending: row.0,
        confirmed: row.1,
        cancelled: row.2,
        needs_attention: row.3,
        cancelled_out_of_stock: row.4,
    })
}

/// Units sold beyond what was received, per product: must be zero.
pub async fn oversold(pool: &PgPool, product: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT greatest(sold + held - received, 0)::bigint FROM inventory.products WHERE id = $1",
    )
    .bind(product)
    .fetch_one(pool)
    .await
}
