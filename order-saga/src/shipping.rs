//! The shipping service: books a shipment for an order, or refuses a destination it does not
//! serve, and cancels one when the saga compensates.
//!
//! | route | purpose |
//! |---|---|
//! | `GET /v1/shipments?order_id=` | an order's shipment |

use std::sync::Arc;

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::{RawQuery, State},
    response::{IntoResponse, Response},
    routing::get,
};
use clap::Args;
use common::{config::ServeDefaults, problem::Problem};
use serde_json::json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    api::{query_params, uuid_param},
    bus::{
        consumer::{Applied, Handler},
        inbox,
        outbox::{self, Relay},
    },
    error::Result,
    messages::{Address, Body, Envelope, Outcome, Service, Step},
    settings::SharedSettings,
    startup::{Application, Core},
};

/// Settings of the shipping service.
#[derive(Debug, Clone, Args)]
pub struct ShippingSettings {
    /// What every saga service shares.
    #[command(flatten)]
    pub shared: SharedSettings<ShippingSettings>,
    /// Countries delivered to (ISO 3166-1 alpha-2, comma-separated); others are refused.
    #[arg(
        long,
        env = "SHIP_TO",
        value_delimiter = ',',
        default_value = "AT,BE,CH,DE,DK,ES,FI,FR,GB,IE,IT,NL,NO,PL,PT,SE,US"
    )]
    pub ship_to: Vec<String>,
}

impl ServeDefaults for ShippingSettings {
    const LISTEN_ADDR: &'static str = "127.0.0.1:8086";
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/shipping");

/// Connects, migrates, starts the consumer, and binds.
pub async fn build(settings: ShippingSettings) -> anyhow::Result<Application> {
    let core = Core::connect(Service::Shipping, &settings.shared, &MIGRATOR).await?;
    let handler = Arc::new(ShipmentHandler {
        pool: core.pool.clone(),
        relay: core.relay.clone(),
        replies: Service::Orders.stream(&core.prefix),
        ship_to: settings
            .ship_to
            .iter()
            .map(|c| c.trim().to_ascii_uppercase())
            .collect(),
    });
    core.consume(&settings.shared, handler).await?;
    let api = Router::new()
        .route("/v1/shipments", get(shipment))
        .with_state(core.pool.clone());
    core.bind(&settings.shared, api).await
}

struct ShipmentHandler {
    pool: PgPool,
    relay: Relay,
    replies: String,
    ship_to: Vec<String>,
}

impl Handler for ShipmentHandler {
    async fn handle(&self, envelope: Envelope) -> anyhow::Result<Applied> {
        let mut tx = self.pool.begin().await.context("failed to begin")?;
        if !inbox::first_delivery(&mut tx, envelope.id).await? {
            return Ok(Applied::Duplicate);
        }
        let order = envelope.order_id;
        let reply = match &envelope.body {
            Body::CreateShipment { address } => {
                match create(&mut tx, order, address, &self.ship_to).await? {
                    None => envelope.reply(Step::CreateShipment, Outcome::Succeeded, None),
                    Some(reason) => {
                        envelope.reply(Step::CreateShipment, Outcome::Failed, Some(reason))
                    }
                }
            }
            Body::CancelShipment => {
                cancel(&mut tx, order).await?;
                envelope.reply(Step::CancelShipment, Outcome::Succeeded, None)
            }
            other => anyhow::bail!("shipping cannot handle {other:?}"),
        };
        outbox::enqueue(&mut tx, &self.replies, &reply).await?;
        tx.commit().await.context("failed to commit")?;
        self.relay.wake();
        Ok(Applied::Applied)
    }
}

/// Books the shipment; the reason when refused. A repeat answers as the first did; one that
/// arrives after the cancellation (reordered) is refused.
async fn create(
    conn: &mut PgConnection,
    order_id: Uuid,
    address: &Address,
    ship_to: &[String],
) -> sqlx::Result<Option<String>> {
    let existing: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT state, reason FROM shipments WHERE order_id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some((state, reason)) = existing {
        return Ok(match state.as_str() {
            "created" => None,
            "refused" => Some(reason.unwrap_or_else(|| "destination not served".into())),
            _ => Some("the shipment was already cancelled".into()),
        });
    }
    let served = ship_to.contains(&address.country);
    let reason = (!served).then(|| format!("destination not served: {}", address.country));
    sqlx::query(
        "INSERT INTO shipments (order_id, state, reason, country, address) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(order_id)
    .bind(if served { "created" } else { "refused" })
    .bind(&reason)
    .bind(&address.country)
    .bind(serde_json::to_value(address).expect("an address serializes"))
    .execute(conn)
    .await?;
    Ok(reason)
}

/// Cancels the shipment, or leaves a tombstone when there is none yet.
async fn cancel(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO shipments (order_id, state, reason) VALUES ($1, 'cancelled', 'cancelled before it was booked')
         ON CONFLICT (order_id) DO UPDATE SET state = 'cancelled', updated_at = now()
         WHERE shipments.state = 'created'",
    )
    .bind(order_id)
    .execute(conn)
    .await?;
    Ok(())
}

async fn shipment(State(pool): State<PgPool>, RawQuery(query): RawQuery) -> Result<Response> {
    let params = query_params(query.as_deref(), &["order_id"])?;
    let order_id = uuid_param(&params, "order_id")?;
    let row = sqlx::query("SELECT * FROM shipments WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&pool)
        .await?
        .ok_or_else(Problem::not_found)?;
    Ok(Json(json!({
        "order_id": order_id,
        "state": row.get::<String, _>("state"),
        "reason": row.get::<Option<String>, _>("reason"),
        "country": row.get::<Option<String>, _>("country"),
        "created_at": row.get::<chrono::DateTime<chrono::Utc>, _>("created_at"),
        "updated_at": row.get::<chrono::DateTime<chrono::Utc>, _>("updated_at"),
    }))
    .into_response())
}
