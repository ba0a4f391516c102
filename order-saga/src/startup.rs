//! Building and running a saga service, the same way for all four: connect PostgreSQL (the
//! service's own schema, migrated) and Redis, start the relay, the consumer and the service's
//! sweepers, bind, serve the service's routes beside `/healthz`, `/readyz` and `/metrics`,
//! and stop in order.
//!
//! Shutdown: `/readyz` fails, the listener closes and requests in flight finish; then the
//! consumer stops reading (messages being handled finish and are acknowledged), and last the
//! relay publishes what those wrote and stops. Whatever is cut short is still in the outbox
//! or pending in its group, and the next instance picks it up.

use std::{
    future::Future,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{
    Router,
    extract::DefaultBodyLimit,
    middleware::{from_fn, from_fn_with_state},
};
use common::{
    config::ServeDefaults,
    http::{
        ServeOptions,
        ops::{self, Readiness},
        request_context, shed_load, time_limit,
    },
    problem::{self, Problem},
    prometheus::{HttpMetrics, track_http},
    shutdown::Background,
};
use prometheus_client::registry::Registry;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret as _;
use sqlx::{PgPool, migrate::Migrator};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    bus::{self, metrics::BusMetrics, outbox::Relay},
    messages::Service,
    settings::SharedSettings,
};

/// The backends and messaging of a connected service, before its HTTP side is built.
pub struct Core {
    /// The service.
    pub service: Service,
    /// Its schema's pool.
    pub pool: PgPool,
    /// Redis, for the consumer and the relay.
    pub redis_client: redis::Client,
    /// A shared connection (readiness, relay).
    pub redis: ConnectionManager,
    /// Its relay; wake it after a commit that wrote the outbox.
    pub relay: Relay,
    /// The messaging metrics.
    pub bus_metrics: BusMetrics,
    /// The registry every metric of the service goes in.
    pub registry: Registry,
    /// Stream prefix.
    pub prefix: String,
    /// Work that stops after the server has drained: consumer, sweepers.
    pub workers: Background,
    /// The relay, which stops last, so it publishes what the workers wrote.
    pub relaying: Background,
}

impl Core {
    /// Connects `service`'s backends, applies the bus's and `migrator`'s migrations to its
    /// schema, and starts its relay.
    pub async fn connect<D: ServeDefaults + Send + Sync + 'static>(
        service: Service,
        shared: &SharedSettings<D>,
        migrator: &Migrator,
    ) -> anyhow::Result<Self> {
        let pool = common::database::connect(
            shared.backends.database_url.expose_secret(),
            shared.backends.database_pool_size,
            Some(service.as_str()),
        )
        .await?;
        bus::migrate(&pool, migrator).await?;
        let url = shared.backends.redis_url.expose_secret();
        let redis_client = redis::Client::open(url)
            .with_context(|| format!("invalid REDIS_URL {}", common::config::redact_url(url)))?;
        let redis = ConnectionManager::new_with_config(
            redis_client.clone(),
            ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(2))),
        )
        .await
        .with_context(|| {
            format!(
                "cannot connect to Redis at {}",
                common::config::redact_url(url)
            )
        })?;
        let mut registry = Registry::with_prefix(format!("order_saga_{}", service.as_str()));
        let bus_metrics = BusMetrics::register(&mut registry);
        let relay = Relay::new(
            pool.clone(),
            redis.clone(),
            shared.bus.relay(),
            bus_metrics.clone(),
        );
        let relaying = Background::new();
        relaying.spawn(|stop| relay.clone().run(stop));
        Ok(Self {
            service,
            pool,
            redis_client,
            redis,
            relay,
            bus_metrics,
            registry,
            prefix: shared.bus.stream_prefix.clone(),
            workers: Background::new(),
            relaying,
        })
    }

    /// Starts the consumer of the service's stream with `handler`.
    pub async fn consume<H: bus::consumer::Handler, D: ServeDefaults + Send + Sync + 'static>(
        &self,
        shared: &SharedSettings<D>,
        handler: Arc<H>,
    ) -> anyhow::Result<()> {
        let consumer = bus::consumer::Consumer::connect(
            &self.redis_client,
            shared.bus.consumer(self.service),
            handler,
            self.bus_metrics.clone(),
        )
        .await?;
        self.workers.spawn(|stop| consumer.run(stop));
        Ok(())
    }

    /// Binds and assembles the HTTP side: `api` (the service's routes, already given their
    /// state) behind the body limit, load shedding and the request timeout, next to the
    /// operations routes.
    pub async fn bind<D: ServeDefaults + Send + Sync + 'static>(
        mut self,
        shared: &SharedSettings<D>,
        api: Router,
    ) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(shared.serve.listen)
            .await
            .with_context(|| format!("failed to bind {}", shared.serve.listen))?;
        let port = listener
            .local_addr()
            .context("failed to read the bound address")?
            .port();
        let http_metrics = HttpMetrics::register(&mut self.registry);
        let ready = Arc::new(AtomicBool::new(true));
        let backends = Backends {
            pool: self.pool.clone(),
            redis: self.redis.clone(),
        };
        let registry = Arc::new(std::mem::take(&mut self.registry));
        let permits = Arc::new(Semaphore::new(shared.max_in_flight));
        let router = api
            .layer(DefaultBodyLimit::max(shared.max_body_bytes))
            .layer(from_fn_with_state(permits, shed_load))
            .route_layer(from_fn_with_state(shared.serve.request_timeout, time_limit))
            .merge(ops::routes(Arc::clone(&ready), registry, backends))
            .route_layer(from_fn_with_state(http_metrics, track_http))
            .fallback(problem::not_found)
            .method_not_allowed_fallback(problem::method_not_allowed)
            .layer(from_fn(request_context));
        Ok(Application {
            listener,
            port,
            router,
            ready,
            options: shared.serve.serve_options(),
            readiness_delay: shared.serve.shutdown_readiness_delay,
            service: self.service,
            workers: self.workers,
            relaying: self.relaying,
        })
    }
}

/// A bound, not yet serving saga service.
pub struct Application {
    listener: TcpListener,
    port: u16,
    router: Router,
    ready: Arc<AtomicBool>,
    options: ServeOptions,
    readiness_delay: Duration,
    service: Service,
    workers: Background,
    relaying: Background,
}

impl Application {
    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` completes, then stops in order within the grace period.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let address = self
            .listener
            .local_addr()
            .context("failed to read the bound address")?;
        tracing::info!(service = self.service.as_str(), addr = %address, "listening");
        let ready = Arc::clone(&self.ready);
        let delay = self.readiness_delay;
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            shutdown.await;
            common::shutdown::withdraw_readiness(&ready, delay).await;
            let _ = started_tx.send(Instant::now());
            tracing::info!("shutting down: draining requests");
        };
        let grace = self.options.grace;
        let drained = common::http::serve(self.listener, self.router, shutdown, self.options)
            .await
            .context("server failed")?;
        let started = started_rx.await.unwrap_or_else(|_| Instant::now());
        let workers = self
            .workers
            .stop(grace.saturating_sub(started.elapsed()))
            .await;
        let relayed = self
            .relaying
            .stop(grace.saturating_sub(started.elapsed()))
            .await;
        if drained && workers && relayed {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "stopped cleanly"
            );
        } else {
            tracing::warn!(
                requests_drained = drained,
                workers_stopped = workers,
                relay_stopped = relayed,
                "grace period over; what was cut short is picked up by the next instance"
            );
        }
        Ok(())
    }
}

/// What readiness depends on: the service's schema (PostgreSQL) and the message bus (Redis Streams).
#[derive(Clone)]
struct Backends {
    pool: PgPool,
    redis: ConnectionManager,
}

impl Readiness for Backends {
    async fn check(&self) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
        ops::postgres_reachable(&self.pool).await?;
        let mut redis = self.redis.clone();
        if let Err(error) = redis::cmd("PING").query_async::<String>(&mut redis).await {
            tracing::warn!(%error, "readiness: Redis unreachable");
            return Err(Problem::unavailable("Redis is unreachable", 1));
        }
        Ok(serde_json::Map::new())
    }
}
