//! Building and running the service: connect and migrate PostgreSQL, start the report cache
//! (Redis is optional at start), run partition maintenance and day closing in the background,
//! bind, serve the API beside `/healthz`, `/readyz` and `/metrics`, and stop in order.

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
use chrono::{Months, Utc};
use clap::Args;
use common::{
    config::{ServeDefaults, ServeSettings, parse_duration, parse_secret},
    http::{
        ServeOptions,
        ops::{self, Readiness},
        request_context, shed_load, time_limit,
    },
    problem::{self, Problem},
    prometheus::{HttpMetrics, track_http},
    shutdown::Background,
    telemetry::TelemetrySettings,
};
use prometheus_client::registry::Registry;
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    cache::{CacheMetrics, CacheSettings, ReportCache},
    db::{self, DatabaseSettings},
    http::{AppState, router},
    metrics::Metrics,
    partitions::{self, Maintenance, month_of},
    repository::EventRepository,
};

/// Every setting of `analytics-repo serve`.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Listening and shutdown.
    #[command(flatten)]
    pub serve: ServeSettings<Settings>,
    /// PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseSettings,
    /// Redis, for the report cache; without it (or while it is down) reports come from
    /// PostgreSQL.
    #[arg(long, env = "REDIS_URL", value_parser = parse_secret, hide_env_values = true)]
    pub redis_url: Option<SecretString>,
    /// Prefix of the cache's keys.
    #[arg(long, env = "CACHE_PREFIX", default_value = "analytics")]
    pub cache_prefix: String,
    /// How long a cached report that includes today (whose raw rows keep changing) is kept.
    #[arg(long, env = "CACHE_OPEN_TTL", default_value = "5s", value_parser = parse_duration)]
    pub cache_open_ttl: Duration,
    /// How long a cached report over closed days only is kept (late events invalidate it).
    #[arg(long, env = "CACHE_CLOSED_TTL", default_value = "1h", value_parser = parse_duration)]
    pub cache_closed_ttl: Duration,
    /// How long a Redis operation may take before the cache is bypassed.
    #[arg(long, env = "CACHE_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub cache_timeout: Duration,
    /// How often partitions are made ahead and the default partition drained.
    #[arg(long, env = "MAINTENANCE_EVERY", default_value = "60s", value_parser = parse_duration)]
    pub maintenance_every: Duration,
    /// How often the raw rows up to now are folded into the rollups; the reports read raw
    /// only what arrived since.
    #[arg(long, env = "ROLL_UP_EVERY", default_value = "1s", value_parser = parse_duration)]
    pub roll_up_every: Duration,
    /// Months of partitions kept made ahead of the current one.
    #[arg(long, env = "MONTHS_AHEAD", default_value_t = 3)]
    pub months_ahead: u32,
    /// How long a partition step may wait for its locks before it gives up and retries.
    #[arg(long, env = "DDL_LOCK_TIMEOUT", default_value = "200ms", value_parser = parse_duration)]
    pub ddl_lock_timeout: Duration,
    /// Logs.
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
    /// Largest request body (a batch).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most events in one batch.
    #[arg(long, env = "MAX_BATCH", default_value_t = 50_000)]
    pub max_batch: usize,
    /// Requests handled at once before shedding with 503.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,
}

impl ServeDefaults for Settings {
    const LISTEN_ADDR: &'static str = "0.0.0.0:8087";
}

impl Settings {
    /// The partition maintenance settings.
    pub fn maintenance(&self) -> Maintenance {
        Maintenance {
            lock_timeout: self.ddl_lock_timeout,
            ..Maintenance::default()
        }
    }
}

/// A bound, not yet serving service.
pub struct Application {
    listener: TcpListener,
    router: Router,
    ready: Arc<AtomicBool>,
    options: ServeOptions,
    readiness_delay: Duration,
    background: Background,
}

/// One round of maintenance: partitions from last month to `months_ahead` ahead (and any
/// month with rows in the default partition), then a roll-up.
pub async fn maintain(
    repository: &EventRepository,
    maintenance: Maintenance,
    months_ahead: u32,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let this_month = month_of(Utc::now().date_naive());
    let round = partitions::ensure(
        repository.pool(),
        this_month - Months::new(1),
        this_month + Months::new(months_ahead),
        maintenance,
    )
    .await?;
    metrics.maintained(&round);
    let (watermark, rows) = repository.roll_up().await?;
    metrics.rolled_up(rows, watermark);
    Ok(())
}

/// Connects, migrates, makes this month's partitions, and binds.
pub async fn build(settings: Settings) -> anyhow::Result<Application> {
    let pool = db::connect(&settings.database).await?;
    let repository = EventRepository::new(pool.clone());
    let mut registry = Registry::with_prefix("analytics_repo");
    let metrics = Arc::new(Metrics::register(&mut registry));
    let cache_metrics = CacheMetrics::register(&mut registry);
    let background = Background::new();
    let maintenance = settings.maintenance();
    // The first round before serving: ingest needs this month's partition.
    maintain(&repository, maintenance, settings.months_ahead, &metrics).await?;
    {
        let (repository, metrics) = (repository.clone(), Arc::clone(&metrics));
        let (every, ahead) = (settings.maintenance_every, settings.months_ahead);
        background.spawn(|stop| async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                if let Err(error) = maintain(&repository, maintenance, ahead, &metrics).await {
                    metrics.maintenance_failed();
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "maintenance failed; retrying next round"
                    );
                }
            }
        });
    }
    {
        let (repository, metrics, every) = (
            repository.clone(),
            Arc::clone(&metrics),
            settings.roll_up_every,
        );
        background.spawn(|stop| async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                match repository.roll_up().await {
                    Ok((watermark, rows)) => metrics.rolled_up(rows, watermark),
                    Err(error) => {
                        metrics.maintenance_failed();
                        tracing::warn!(%error, "roll-up failed; retrying");
                    }
                }
            }
        });
    }
    let client = match &settings.redis_url {
        Some(url) => Some(redis::Client::open(url.expose_secret()).with_context(|| {
            format!(
                "invalid REDIS_URL {}",
                common::config::redact_url(url.expose_secret())
            )
        })?),
        None => None,
    };
    let stop_cache = CancellationToken::new();
    let cache = ReportCache::start(
        client,
        CacheSettings {
            prefix: settings.cache_prefix.clone(),
            open_ttl: settings.cache_open_ttl,
            closed_ttl: settings.cache_closed_ttl,
            timeout: settings.cache_timeout,
        },
        cache_metrics,
        stop_cache.clone(),
    );
    background.spawn(|stop| async move {
        stop.cancelled().await;
        stop_cache.cancel();
    });

    let listener = TcpListener::bind(settings.serve.listen)
        .await
        .with_context(|| format!("failed to bind {}", settings.serve.listen))?;
    let http_metrics = HttpMetrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(true));
    let backends = Backends {
        pool,
        cache: cache.clone(),
    };
    let state = AppState {
        repository,
        cache,
        metrics,
        max_batch: settings.max_batch,
    };
    let permits = Arc::new(Semaphore::new(settings.max_in_flight));
    let router = router(state)
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(from_fn_with_state(permits, shed_load))
        .route_layer(from_fn_with_state(
            settings.serve.request_timeout,
            time_limit,
        ))
        .merge(ops::routes(
            Arc::clone(&ready),
            Arc::new(registry),
            backends,
        ))
        .route_layer(from_fn_with_state(http_metrics, track_http))
        .fallback(problem::not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(from_fn(request_context));
    Ok(Application {
        listener,
        router,
        ready,
        options: settings.serve.serve_options(),
        readiness_delay: settings.serve.shutdown_readiness_delay,
        background,
    })
}

impl Application {
    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map_or(0, |a| a.port())
    }

    /// Serves until `shutdown` completes, then drains within the grace period.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let address = self
            .listener
            .local_addr()
            .context("failed to read the bound address")?;
        tracing::info!(addr = %address, "listening");
        let ready = Arc::clone(&self.ready);
        let delay = self.readiness_delay;
        let started = Arc::new(parking_lot::Mutex::new(None::<Instant>));
        let started_at = Arc::clone(&started);
        let shutdown = async move {
            shutdown.await;
            common::shutdown::withdraw_readiness(&ready, delay).await;
            *started_at.lock() = Some(Instant::now());
            tracing::info!("shutting down: draining requests");
        };
        let grace = self.options.grace;
        let drained = common::http::serve(self.listener, self.router, shutdown, self.options)
            .await
            .context("server failed")?;
        let elapsed = started.lock().map_or(Duration::ZERO, |s| s.elapsed());
        let stopped = self.background.stop(grace.saturating_sub(elapsed)).await;
        if drained && stopped {
            tracing::info!("stopped cleanly");
        } else {
            tracing::warn!(
                requests_drained = drained,
                maintenance_stopped = stopped,
                "grace period over"
            );
        }
        Ok(())
    }
}

/// Ready when PostgreSQL answers; Redis only speeds reports up, so its absence is reported,
/// not failed on.
#[derive(Clone)]
struct Backends {
    pool: PgPool,
    cache: ReportCache,
}

impl Readiness for Backends {
    async fn check(&self) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
        ops::postgres_reachable(&self.pool).await?;
        let cache = if self.cache.usable() {
            "in use"
        } else {
            "bypassed"
        };
        let mut fields = serde_json::Map::new();
        fields.insert("report_cache".into(), cache.into());
        Ok(fields)
    }
}
