//! The orders service: the API buyers call, and the orchestrator of every order's saga.
//!
//! It consumes replies from its stream, applies each to the order's saga in one transaction
//! with the inbox row and the next command, and sweeps sagas whose step is past its
//! deadline (or whose compensation has waited out its backoff).
//!
//! # Layout
//! - [`saga`]: the state machine, no I/O.
//! - [`new_order`]: parsing an order at the edge; [`catalog`]: prices from inventory.
//! - [`store`]: orders, sagas, step history and idempotency keys in PostgreSQL.
//! - [`http`]: the API.

pub mod catalog;
pub mod http;
pub mod new_order;
pub mod saga;
pub mod store;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;
use common::config::{ServeDefaults, parse_duration};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use sqlx::PgPool;

use crate::{
    bus::{
        consumer::{Applied, Handler},
        inbox,
        outbox::Relay,
    },
    messages::{Body, Envelope, Service},
    settings::SharedSettings,
    startup::{Application, Core},
};
use saga::{Event, Limits, Status};

/// Settings of the orders service.
#[derive(Debug, Clone, Args)]
pub struct OrdersSettings {
    /// What every saga service shares.
    #[command(flatten)]
    pub shared: SharedSettings<OrdersSettings>,
    /// The inventory service, asked for prices when an order is created.
    #[arg(long, env = "INVENTORY_URL", default_value = "http://127.0.0.1:8084")]
    pub inventory_url: String,
    /// How long a step may go unanswered before the saga compensates. Longer than payment's
    /// worst case (provider timeout × attempts, plus backoff).
    #[arg(long, env = "STEP_DEADLINE", default_value = "30s", value_parser = parse_duration)]
    pub step_deadline: Duration,
    /// Attempts of a compensation before the order is left `needs_attention`.
    #[arg(long, env = "COMPENSATION_ATTEMPTS", default_value_t = 8)]
    pub compensation_attempts: u32,
    /// The first compensation retry waits this; each further one twice as long.
    #[arg(long, env = "COMPENSATION_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub compensation_backoff: Duration,
    /// How often overdue sagas are looked for.
    #[arg(long, env = "SWEEP_EVERY", default_value = "500ms", value_parser = parse_duration)]
    pub sweep_every: Duration,
    /// How long Idempotency-Keys are kept (at least 24 h).
    #[arg(long, env = "IDEMPOTENCY_TTL", default_value = "48h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,
}

impl ServeDefaults for OrdersSettings {
    const LISTEN_ADDR: &'static str = "127.0.0.1:8083";
}

impl OrdersSettings {
    fn limits(&self) -> Limits {
        Limits {
            step_deadline: self.step_deadline,
            compensation_attempts: self.compensation_attempts.max(1),
            compensation_backoff: self.compensation_backoff,
        }
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/orders");

/// A terminal outcome, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Finished {
    /// `confirmed`, `cancelled` or `needs_attention`.
    pub status: &'static str,
}

/// The orders service's own metrics.
#[derive(Clone)]
pub struct OrdersMetrics {
    /// Orders created (replays not counted).
    pub created: Counter,
    /// Sagas that reached a terminal status, by status.
    pub finished: Family<Finished, Counter>,
    /// Steps that passed their deadline.
    pub timeouts: Counter,
}

impl OrdersMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            created: Counter::default(),
            finished: Family::default(),
            timeouts: Counter::default(),
        };
        registry.register("orders_created", "Orders created", metrics.created.clone());
        registry.register(
            "sagas_finished",
            "Sagas that reached a terminal status, by status",
            metrics.finished.clone(),
        );
        registry.register(
            "step_timeouts",
            "Saga steps that passed their deadline",
            metrics.timeouts.clone(),
        );
        metrics
    }

    fn finished(&self, status: Status) {
        if status != Status::Pending {
            self.finished
                .get_or_create(&Finished {
                    status: status.as_str(),
                })
                .inc();
        }
    }
}

/// What the handlers share; cheap to clone.
#[derive(Clone)]
pub struct Orders {
    pool: PgPool,
    relay: Relay,
    catalog: catalog::Catalog,
    prefix: String,
    limits: Limits,
    metrics: OrdersMetrics,
}

/// Connects, migrates, starts the reply consumer and the deadline sweeper, and binds.
pub async fn build(settings: OrdersSettings) -> anyhow::Result<Application> {
    let mut core = Core::connect(Service::Orders, &settings.shared, &MIGRATOR).await?;
    let metrics = OrdersMetrics::register(&mut core.registry);
    let orders = Orders {
        pool: core.pool.clone(),
        relay: core.relay.clone(),
        catalog: catalog::Catalog::new(&settings.inventory_url, Duration::from_secs(2))?,
        prefix: core.prefix.clone(),
        limits: settings.limits(),
        metrics,
    };
    core.consume(&settings.shared, Arc::new(orders.clone()))
        .await?;
    let sweeper = orders.clone();
    let every = settings.sweep_every;
    let ttl = settings.idempotency_ttl.max(Duration::from_secs(24 * 3600));
    core.workers.spawn(|stop| async move {
        let mut pruned_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(error) = sweeper.sweep().await {
                tracing::warn!(error = format!("{error:#}"), "deadline sweep failed");
            }
            if pruned_at.elapsed() > Duration::from_secs(600) {
                pruned_at = tokio::time::Instant::now();
                if let Err(error) = store::prune_keys(&sweeper.pool, ttl).await {
                    tracing::warn!(%error, "pruning idempotency keys failed");
                }
            }
        }
    });
    let api = http::router(orders);
    core.bind(&settings.shared, api).await
}

impl Orders {
    /// Moves every overdue saga on.
    async fn sweep(&self) -> anyhow::Result<()> {
        loop {
            let handled = store::due(&self.pool, 100, &self.prefix, &self.limits).await?;
            if handled > 0 {
                self.metrics.timeouts.inc_by(handled as u64);
                self.relay.wake();
            }
            if handled < 100 {
                return Ok(());
            }
        }
    }
}

impl Handler for Orders {
    async fn handle(&self, envelope: Envelope) -> anyhow::Result<Applied> {
        let Body::Reply {
            step,
            outcome,
            reason,
        } = envelope.body
        else {
            anyhow::bail!("orders only takes replies, not {:?}", envelope.body);
        };
        let mut tx = self.pool.begin().await.context("failed to begin")?;
        if !inbox::first_delivery(&mut tx, envelope.id).await? {
            return Ok(Applied::Duplicate);
        }
        let event = Event::Replied {
            step,
            attempt: envelope.attempt,
            outcome,
            reason,
        };
        let applied = store::apply(
            &mut tx,
            envelope.order_id,
            event,
            &self.prefix,
            &self.limits,
        )
        .await?;
        tx.commit().await.context("failed to commit")?;
        match applied {
            Some(Ok(transition)) => {
                if transition.send {
                    self.relay.wake();
                }
                self.metrics.finished(transition.saga.status);
            }
            Some(Err(ignored)) => {
                tracing::debug!(order = %envelope.order_id, step = step.as_str(), ?ignored, "reply ignored")
            }
            None => tracing::warn!(order = %envelope.order_id, "reply for an unknown order"),
        }
        Ok(Applied::Applied)
    }
}
