//! Building and running the service: bind, serve, sweep, stop.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::{
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
        let listener = TcpListener::bind(settings.serve.listen)
            .await
            .with_context(|| format!("failed to bind {}", settings.serve.listen))?;
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

        let sweeper = tokio::spawn(sweep(
            Arc::clone(&self.processor),
            self.settings.evict_interval,
        ));

        let ready = self.state.readiness();
        let readiness_delay = self.settings.serve.shutdown_readiness_delay;
        let shutdown = async move {
            shutdown.await;
            common::shutdown::withdraw_readiness(&ready, readiness_delay).await;
            tracing::info!("no new connections, draining in-flight requests");
        };
        let started = std::time::Instant::now();
        let serve_options = self.settings.serve.serve_options();
        let drained =
            common::http::serve(self.listener, router(self.state), shutdown, serve_options)
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

/// Frees minutes that left the window, and keeps the full-retention window's cache warm:
/// it runs every `interval` and just after each minute boundary, when every type's sealed
/// minutes change, so a dashboard's next query finds the merge done.
async fn sweep(processor: Arc<MetricsProcessor>, interval: Duration) {
    let interval = interval.max(Duration::from_millis(100));
    loop {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let to_next_minute =
            Duration::from_millis((60_000 - now_ms.rem_euclid(60_000)) as u64 + 100);
        tokio::time::sleep(interval.min(to_next_minute)).await;
        let processor = Arc::clone(&processor);
        let swept = tokio::task::spawn_blocking(move || {
            let forgotten = processor.evict_expired();
            processor.warm_window_cache();
            forgotten
        })
        .await;
        match swept {
            Ok(0) => {}
            Ok(forgotten) => tracing::debug!(forgotten, "idle event types forgotten"),
            Err(error) => tracing::error!(%error, "sweep failed"),
        }
    }
}
