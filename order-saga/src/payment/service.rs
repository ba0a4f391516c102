//! The payment service's side of the saga: authorize, capture and void (or refund) an
//! order's payment at the provider, never charging twice.
//!
//! A provider call cannot sit inside a database transaction, so a command is applied in
//! three moves: a transaction records the payment as `authorizing` (or finds it already
//! decided, and answers from that); the provider is called with an idempotency key derived
//! from the order and the operation; a second transaction records the result with the
//! message's inbox row and the reply. A crash between the moves redelivers the message,
//! and the same key makes the provider answer as before: one authorization, one capture.

use anyhow::Context as _;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::client::{Authorization, PaymentError, ProviderClient};
use crate::{
    bus::{
        consumer::{Applied, Handler},
        inbox,
        outbox::{self, Relay},
    },
    messages::{Body, Envelope, Outcome, Step},
};

/// Applies payment commands.
pub struct PaymentHandler {
    /// The payment schema.
    pub pool: PgPool,
    /// Wakes the relay after a reply is written.
    pub relay: Relay,
    /// The orders stream.
    pub replies: String,
    /// The provider.
    pub client: ProviderClient,
}

/// What a command came to.
enum Verdict {
    Done,
    Refused(String),
}

impl Handler for PaymentHandler {
    async fn handle(&self, envelope: Envelope) -> anyhow::Result<Applied> {
        let seen: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM inbox WHERE message_id = $1)")
                .bind(envelope.id)
                .fetch_one(&self.pool)
                .await?;
        if seen {
            return Ok(Applied::Duplicate);
        }
        let order = envelope.order_id;
        let (step, verdict) = match &envelope.body {
            Body::AuthorizePayment {
                amount,
                currency,
                payment_method,
            } => (
                Step::AuthorizePayment,
                self.authorize(order, *amount, currency, payment_method)
                    .await?,
            ),
            Body::CapturePayment => (Step::CapturePayment, self.capture(order).await?),
            Body::VoidPayment => (Step::VoidPayment, self.void(order).await?),
            other => anyhow::bail!("payment cannot handle {other:?}"),
        };
        let mut tx = self.pool.begin().await.context("failed to begin")?;
        if !inbox::first_delivery(&mut tx, envelope.id).await? {
            return Ok(Applied::Duplicate);
        }
        let reply = match verdict {
            Verdict::Done => envelope.reply(step, Outcome::Succeeded, None),
            Verdict::Refused(reason) => envelope.reply(step, Outcome::Failed, Some(reason)),
        };
        outbox::enqueue(&mut tx, &self.replies, &reply).await?;
        tx.commit().await.context("failed to commit")?;
        self.relay.wake();
        Ok(Applied::Applied)
    }
}

impl PaymentHandler {
    async fn authorize(
        &self,
        order: Uuid,
        amount: i64,
        currency: &str,
        method: &str,
    ) -> anyhow::Result<Verdict> {
        sqlx::query(
            "INSERT INTO payments (order_id, state, amount, currency) VALUES ($1, 'authorizing', $2, $3)
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(order)
        .bind(amount)
        .bind(currency)
        .execute(&self.pool)
        .await?;
        let (state, reason) = self.state(order).await?;
        match state.as_str() {
            "authorizing" => {}
            "authorized" | "captured" => return Ok(Verdict::Done),
            "declined" => {
                return Ok(Verdict::Refused(
                    reason.unwrap_or_else(|| "payment declined".into()),
                ));
            }
            other => return Ok(Verdict::Refused(format!("the payment was already {other}"))),
        }
        // Whether an earlier delivery may have had this order authorized.
        let attempted: bool =
            sqlx::query_scalar("SELECT attempted FROM payments WHERE order_id = $1")
                .bind(order)
                .fetch_one(&self.pool)
                .await?;
        match self.client.authorize(order, amount, currency, method).await {
            Ok(Authorization::Authorized { provider_id }) => {
                let recorded = self
                    .settle(order, "authorizing", "authorized", Some(&provider_id), None)
                    .await?;
                if recorded {
                    Ok(Verdict::Done)
                } else {
                    // A void overtook this authorization: give the money back at once.
                    self.client
                        .void(order, &provider_id)
                        .await
                        .map_err(anyhow::Error::from)?;
                    Ok(Verdict::Refused(
                        "the payment was voided while it was being authorized".into(),
                    ))
                }
            }
            Ok(Authorization::Declined { reason, .. }) => {
                self.settle(order, "authorizing", "declined", None, Some(&reason))
                    .await?;
                Ok(Verdict::Refused(format!("payment declined: {reason}")))
            }
            Err(PaymentError::Rejected { reason, .. }) => {
                self.settle(order, "authorizing", "declined", None, Some(&reason))
                    .await?;
                Ok(Verdict::Refused(format!(
                    "payment refused by the provider: {reason}"
                )))
            }
            Err(error) if error.certainly_not_done() && !attempted => {
                // No request for this order ever reached the provider (refused connections,
                // an open breaker): certainly nothing was authorized, so the saga may cancel
                // at once instead of waiting out its deadline.
                let reason = format!("the payment provider is unavailable: {error}");
                self.settle(order, "authorizing", "voided", None, Some(&reason))
                    .await?;
                Ok(Verdict::Refused(reason))
            }
            Err(error) => {
                if !error.certainly_not_done() {
                    sqlx::query("UPDATE payments SET attempted = true WHERE order_id = $1")
                        .bind(order)
                        .execute(&self.pool)
                        .await?;
                }
                // It may have been authorized: leave the message pending; the next delivery
                // asks the provider under the same key, and the saga's deadline bounds the wait.
                Err(anyhow::Error::from(error).context("authorization outcome unknown"))
            }
        }
    }

    async fn capture(&self, order: Uuid) -> anyhow::Result<Verdict> {
        let (state, _) = self.state(order).await?;
        match state.as_str() {
            "captured" => return Ok(Verdict::Done),
            "authorized" => {}
            other => {
                return Ok(Verdict::Refused(format!(
                    "cannot capture a payment that is {other}"
                )));
            }
        }
        let provider_id = self.provider_id(order).await?;
        match self.client.capture(order, &provider_id).await {
            Ok(()) => {
                self.settle(order, "authorized", "captured", None, None)
                    .await?;
                Ok(Verdict::Done)
            }
            Err(PaymentError::Rejected { reason, .. }) => {
                Ok(Verdict::Refused(format!("capture refused: {reason}")))
            }
            Err(error) => Err(anyhow::Error::from(error).context("capture outcome unknown")),
        }
    }

    /// Voids an authorization, refunds a capture, or leaves a tombstone when there is
    /// nothing yet, so a late authorization is refused (and voided).
    async fn void(&self, order: Uuid) -> anyhow::Result<Verdict> {
        let state =
            sqlx::query_scalar::<_, String>("SELECT state FROM payments WHERE order_id = $1")
                .bind(order)
                .fetch_optional(&self.pool)
                .await?;
        match state.as_deref() {
            None => {
                sqlx::query(
                    "INSERT INTO payments (order_id, state, amount, currency, reason)
                     VALUES ($1, 'voided', 0, 'EUR', 'voided before it was authorized')
                     ON CONFLICT (order_id) DO NOTHING",
                )
                .bind(order)
                .execute(&self.pool)
                .await?;
                // Raced with an authorization that just inserted its row: decide again.
                if self.state(order).await?.0 != "voided" {
                    anyhow::bail!("the payment changed while being voided; retrying");
                }
                Ok(Verdict::Done)
            }
            Some("authorizing") if !self.attempted(order).await? => {
                // No request ever reached the provider: nothing to give back.
                self.settle(
                    order,
                    "authorizing",
                    "voided",
                    None,
                    Some("never reached the provider"),
                )
                .await?;
                Ok(Verdict::Done)
            }
            Some("authorizing") => {
                // Maybe authorized at the provider: ask under the same key.
                let found = self
                    .client
                    .find_authorization(order)
                    .await
                    .map_err(anyhow::Error::from)?;
                match found {
                    Some(Authorization::Authorized { provider_id }) => {
                        self.client
                            .void(order, &provider_id)
                            .await
                            .map_err(anyhow::Error::from)?;
                        self.settle(
                            order,
                            "authorizing",
                            "voided",
                            Some(&provider_id),
                            Some("voided by compensation"),
                        )
                        .await?;
                    }
                    Some(Authorization::Declined { .. }) | None => {
                        self.settle(
                            order,
                            "authorizing",
                            "voided",
                            None,
                            Some("never authorized"),
                        )
                        .await?;
                    }
                }
                Ok(Verdict::Done)
            }
            Some("authorized") => {
                let provider_id = self.provider_id(order).await?;
                self.client
                    .void(order, &provider_id)
                    .await
                    .map_err(anyhow::Error::from)?;
                self.settle(order, "authorized", "voided", None, None)
                    .await?;
                Ok(Verdict::Done)
            }
            Some("captured") => {
                let provider_id = self.provider_id(order).await?;
                self.client
                    .refund(order, &provider_id)
                    .await
                    .map_err(anyhow::Error::from)?;
                self.settle(order, "captured", "refunded", None, None)
                    .await?;
                Ok(Verdict::Done)
            }
            Some(_) => Ok(Verdict::Done),
        }
    }

    async fn attempted(&self, order: Uuid) -> sqlx::Result<bool> {
        sqlx::query_scalar("SELECT attempted FROM payments WHERE order_id = $1")
            .bind(order)
            .fetch_one(&self.pool)
            .await
    }

    async fn state(&self, order: Uuid) -> sqlx::Result<(String, Option<String>)> {
        let row = sqlx::query("SELECT state, reason FROM payments WHERE order_id = $1")
            .bind(order)
            .fetch_one(&self.pool)
            .await?;
        Ok((row.get("state"), row.get("reason")))
    }

    async fn provider_id(&self, order: Uuid) -> anyhow::Result<String> {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT provider_id FROM payments WHERE order_id = $1",
        )
        .bind(order)
        .fetch_one(&self.pool)
        .await?
        .context("an authorized payment has no provider id")
    }

    /// Moves the payment from `from` to `to`; false when it was no longer in `from`.
    async fn settle(
        &self,
        order: Uuid,
        from: &str,
        to: &str,
        provider_id: Option<&str>,
        reason: Option<&str>,
    ) -> sqlx::Result<bool> {
        let mut conn = self.pool.acquire().await?;
        settle_on(&mut conn, order, from, to, provider_id, reason).await
    }
}

async fn settle_on(
    conn: &mut PgConnection,
    order: Uuid,
    from: &str,
    to: &str,
    provider_id: Option<&str>,
    reason: Option<&str>,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE payments SET state = $3, provider_id = coalesce($4, provider_id), reason = coalesce($5, reason),
                updated_at = now()
         WHERE order_id = $1 AND state = $2",
    )
    .bind(order)
    .bind(from)
    .bind(to)
    .bind(provider_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
