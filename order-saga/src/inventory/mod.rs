//! The inventory service: products and their stock, and the holds the saga places on them.
//!
//! It consumes `reserve_stock`, `confirm_stock` and `release_stock` from its stream and
//! replies on the orders stream; a sweeper gives back holds the saga did not confirm in time.
//!
//! # Layout
//! - [`stock`]: the stock operations, one conditional statement each.
//! - [`http`]: the admin API for products, stock and holds.

pub mod http;
pub mod stock;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;
use common::config::{ServeDefaults, parse_duration};
use sqlx::{Acquire as _, PgPool};

use crate::{
    bus::{
        consumer::{Applied, Handler},
        inbox,
        outbox::{self, Relay},
    },
    messages::{Body, Envelope, Outcome, Service, Step},
    settings::SharedSettings,
    startup::{Application, Core},
};
use stock::Verdict;

/// Settings of the inventory service.
#[derive(Debug, Clone, Args)]
pub struct InventorySettings {
    /// What every saga service shares.
    #[command(flatten)]
    pub shared: SharedSettings<InventorySettings>,
    /// How long a reservation holds stock for the saga to confirm it.
    #[arg(long, env = "HOLD_FOR", default_value = "60s", value_parser = parse_duration)]
    pub hold_for: Duration,
    /// How often expired holds are looked for.
    #[arg(long, env = "SWEEP_EVERY", default_value = "1s", value_parser = parse_duration)]
    pub sweep_every: Duration,
}

impl ServeDefaults for InventorySettings {
    const LISTEN_ADDR: &'static str = "127.0.0.1:8084";
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/inventory");

/// Connects, migrates, starts the consumer and the sweeper, and binds.
pub async fn build(settings: InventorySettings) -> anyhow::Result<Application> {
    let core = Core::connect(Service::Inventory, &settings.shared, &MIGRATOR).await?;
    let handler = Arc::new(StockHandler {
        pool: core.pool.clone(),
        relay: core.relay.clone(),
        replies: Service::Orders.stream(&core.prefix),
        hold_for: settings.hold_for,
    });
    core.consume(&settings.shared, handler).await?;
    let pool = core.pool.clone();
    let every = settings.sweep_every;
    core.workers.spawn(|stop| async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(error) = sweep(&pool).await {
                tracing::warn!(error = format!("{error:#}"), "hold sweep failed");
            }
        }
    });
    let api = http::router(core.pool.clone());
    core.bind(&settings.shared, api).await
}

/// Gives back every expired hold, in batches.
pub async fn sweep(pool: &PgPool) -> anyhow::Result<usize> {
    let mut total = 0;
    loop {
        let mut tx = pool.begin().await.context("failed to begin")?;
        let released = stock::expire(&mut tx, 100)
            .await
            .context("failed to expire holds")?;
        tx.commit().await.context("failed to commit")?;
        if !released.is_empty() {
            tracing::info!(holds = released.len(), "expired holds released");
        }
        total += released.len();
        if released.len() < 100 {
            return Ok(total);
        }
    }
}

/// Applies stock commands.
struct StockHandler {
    pool: PgPool,
    relay: Relay,
    replies: String,
    hold_for: Duration,
}

impl Handler for StockHandler {
    async fn handle(&self, envelope: Envelope) -> anyhow::Result<Applied> {
        let mut tx = self.pool.begin().await.context("failed to begin")?;
        if !inbox::first_delivery(&mut tx, envelope.id).await? {
            return Ok(Applied::Duplicate);
        }
        let order = envelope.order_id;
        let (step, verdict) = match &envelope.body {
            Body::ReserveStock { lines } => {
                let expires_at = chrono::Utc::now()
                    + chrono::Duration::from_std(self.hold_for).context("HOLD_FOR too long")?;
                let mut savepoint = tx.begin().await?;
                let verdict = stock::reserve(&mut savepoint, order, lines, expires_at).await?;
                let verdict = match verdict {
                    Verdict::Refused(reason) if reason.is_empty() => {
                        savepoint.rollback().await?;
                        Verdict::Refused(stock::refuse(&mut tx, order, lines).await?)
                    }
                    verdict => {
                        savepoint.commit().await?;
                        verdict
                    }
                };
                (Step::ReserveStock, verdict)
            }
            Body::ConfirmStock => (Step::ConfirmStock, stock::confirm(&mut tx, order).await?),
            Body::ReleaseStock => (Step::ReleaseStock, stock::release(&mut tx, order).await?),
            other => anyhow::bail!("inventory cannot handle {other:?}"),
        };
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
