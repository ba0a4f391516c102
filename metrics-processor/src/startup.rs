//! Building and running the service: bind, serve, sweep, stop.

use std::{
    future::Future,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::{
    clock::Clock,
    http::{AppState, router},
    processor::MetricsProcessor,
    settings::Settings,
};

/// A bound, not yet running service.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
    processor: Arc<MetricsProcessor>,
    settings: Settings,
}

impl Application {
    /// Binds the listener and builds the processor on the wall clock.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let processor = Arc::new(MetricsProcessor::new(settings.processor_config()));
        Self::build_with(settings, processor).await
    }

    /// Binds the listener around an existing processor (tests use a [`Clock`] they drive).
    pub async fn build_with_clock(
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let processor = Arc::new(MetricsProcessor::with_clock(
            settings.processor_config(),
            clock,
        ));
        Self::build_with(settings, processor).await
    }

    async fn build_with(
        settings: Settings,
        processor: Arc<MetricsProcessor>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("failed to bind {}", settings.listen))?;
        let port = listener
            .local_addr()
            .context("failed to read the bound address")?
            .port();
        let state = AppState::new(Arc::clone(&processor), settings.http_limits());
        Ok(Self {
            listener,
            port,
            state,
            processor,
            settings,
        })
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The aggregation core, for in-process checks.
    pub fn processor(&self) -> Arc<MetricsProcessor> {
        Arc::clone(&self.processor)
    }

    /// Serves until `shutdown` completes, then drains within the configured grace period.
    /// Every request answered before the process exits had its events recorded.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let address = self
            .listener
            .local_addr()
            .context("failed to read the bound address")?;
        tracing::info!(addr = %address, "listening");

        let processor = Arc::clone(&self.processor);
        let interval = self.settings.evict_interval.max(Duration::from_millis(100));
        let sweeper = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let processor = Arc::clone(&processor);
                match tokio::task::spawn_blocking(move || processor.evict_expired()).await {
                    Ok(0) => {}
                    Ok(forgotten) => tracing::debug!(forgotten, "idle event types forgotten"),
                    Err(error) => tracing::error!(%error, "eviction sweep failed"),
                }
            }
        });

        let ready = self.state.readiness();
        let shutdown = async move {
            shutdown.await;
            ready.store(false, Ordering::Release);
            tracing::info!("shutdown started: no new connections, draining in-flight requests");
        };
        let started = std::time::Instant::now();
        let drained = common::http::serve(
            self.listener,
            router(self.state),
            shutdown,
            self.settings.shutdown_grace,
        )
        .await
        .context("server failed")?;
        sweeper.abort();
        if drained {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "stopped cleanly"
            );
        }
        Ok(())
    }
}
