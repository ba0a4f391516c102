//! The payment service: one payment per order, driven by saga commands and carried out at
//! the external provider without ever charging twice.
//!
//! | route | purpose |
//! |---|---|
//! | `GET /v1/payments?order_id=` | an order's payment |
//!
//! # Layout
//! - [`client`]: the provider client (timeouts, retries, breaker, idempotency keys).
//! - [`service`]: applying authorize, capture and void commands.

pub mod client;
pub mod service;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{RawQuery, State},
    response::{IntoResponse, Response},
    routing::get,
};
use clap::Args;
use common::{config::ServeDefaults, problem::Problem};
use serde_json::json;
use sqlx::{PgPool, Row};

use crate::{
    api::{query_params, uuid_param},
    error::Result,
    messages::Service,
    settings::SharedSettings,
    startup::{Application, Core},
};

/// Settings of the payment service.
#[derive(Debug, Clone, Args)]
pub struct PaymentSettings {
    /// What every saga service shares.
    #[command(flatten)]
    pub shared: SharedSettings<PaymentSettings>,
    /// The provider and how patient to be with it.
    #[command(flatten)]
    pub provider: client::ProviderClientSettings,
}

impl ServeDefaults for PaymentSettings {
    const LISTEN_ADDR: &'static str = "127.0.0.1:8085";
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/payment");

/// Connects, migrates, starts the consumer, and binds.
pub async fn build(settings: PaymentSettings) -> anyhow::Result<Application> {
    let mut core = Core::connect(Service::Payment, &settings.shared, &MIGRATOR).await?;
    let client = client::ProviderClient::new(settings.provider.clone(), &mut core.registry)?;
    let handler = Arc::new(service::PaymentHandler {
        pool: core.pool.clone(),
        relay: core.relay.clone(),
        replies: Service::Orders.stream(&core.prefix),
        client,
    });
    core.consume(&settings.shared, handler).await?;
    let api = Router::new()
        .route("/v1/payments", get(payment))
        .with_state(core.pool.clone());
    core.bind(&settings.shared, api).await
}

async fn payment(State(pool): State<PgPool>, RawQuery(query): RawQuery) -> Result<Response> {
    let params = query_params(query.as_deref(), &["order_id"])?;
    let order_id = uuid_param(&params, "order_id")?;
    let row = sqlx::query("SELECT * FROM payments WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&pool)
        .await?
        .ok_or_else(Problem::not_found)?;
    Ok(Json(json!({
        "order_id": order_id,
        "state": row.get::<String, _>("state"),
        "amount": row.get::<i64, _>("amount"),
        "currency": row.get::<String, _>("currency"),
        "provider_id": row.get::<Option<String>, _>("provider_id"),
        "reason": row.get::<Option<String>, _>("reason"),
        "updated_at": row.get::<chrono::DateTime<chrono::Utc>, _>("updated_at"),
    }))
    .into_response())
}
