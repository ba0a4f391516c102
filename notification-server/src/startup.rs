//! Building and running the service: connect the backends, bind, serve, stop.

use std::{future::Future, sync::Arc, time::Instant};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, task::JoinHandle};

use secrecy::ExposeSecret;

use crate::{
    fanout::RedisFanout,
    http::{AppState, HttpLimits, router, ws::WsSettings},
    hub::Hub,
    metrics::Metrics,
    service::Notifier,
    settings::Settings,
    store::{MemoryStore, PgStore, Store},
};

/// A bound, not yet running service.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
    notifier: Arc<Notifier>,
    fanout_task: Option<JoinHandle<()>>,
    settings: Settings,
}

impl Application {
    /// Connects the backends (running migrations), subscribes to the fan-out, and binds.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let verifier = settings.verifier()?;
        let mut registry = Registry::with_prefix("notification_server");
        let metrics = Metrics::register(&mut registry);

        let store = match &settings.database_url {
            Some(url) => Store::Postgres(
                PgStore::connect(url.expose_secret(), settings.database_pool_size).await?,
            ),
            None => {
                tracing::warn!(
                    per_user = settings.memory_history_per_user,
                    "no DATABASE_URL: memory engine, single node, history lost on restart"
                );
                Store::Memory(Arc::new(MemoryStore::new(settings.memory_history_per_user)))
            }
        };
        let hub = Arc::new(Hub::new(settings.send_queue));
        let (fanout, fanout_task) = match &settings.redis_url {
            Some(url) => {
                anyhow::ensure!(
                    matches!(store, Store::Postgres(_)),
                    "REDIS_URL needs DATABASE_URL: nodes must share history for recovery to work"
                );
                let fanout =
                    RedisFanout::connect(url.expose_secret(), &settings.redis_prefix).await?;
                let task = fanout.start(Arc::clone(&hub), metrics.clone()).await?;
                (Some(fanout), Some(task))
            }
            None => {
                metrics.fanout_up.set(1);
                (None, None)
            }
        };
        tracing::info!(
            engine = store.engine(),
            nodes = if fanout.is_some() { "redis" } else { "single" },
            "backends ready"
        );
        let notifier = Arc::new(Notifier::new(
            store,
            hub,
            fanout,
            metrics.clone(),
            settings.max_recipients,
        ));

        let listener = TcpListener::bind(settings.serve.listen)
            .await
            .with_context(|| format!("failed to bind {}", settings.serve.listen))?;
        let port = listener
            .local_addr()
            .context("failed to read the bound address")?
            .port();
        let state = AppState::new(
            Arc::clone(&notifier),
            verifier,
            settings.ws_settings(),
            settings.http_limits(),
            metrics,
            registry,
        );
        Ok(Self {
            listener,
            port,
            state,
            notifier,
            fanout_task,
            settings,
        })
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The service core, for in-process checks.
    pub fn notifier(&self) -> Arc<Notifier> {
        Arc::clone(&self.notifier)
    }

    /// Serves until `shutdown` completes. Then: readiness fails (and the service keeps serving
    /// for SHUTDOWN_READINESS_DELAY), the listener closes, every WebSocket gets close 1001, requests in flight finish (their notifications are
    /// persisted before they are answered), and all of it within SHUTDOWN_GRACE.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let address = self
            .listener
            .local_addr()
            .context("failed to read the bound address")?;
        tracing::info!(addr = %address, "listening");

        let ready = self.state.readiness();
        let connections = self.state.connections();
        let hub = Arc::clone(self.notifier.hub());
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let readiness_delay = self.settings.serve.shutdown_readiness_delay;
        let shutdown = async move {
            shutdown.await;
            common::shutdown::withdraw_readiness(&ready, readiness_delay).await;
            let _ = started_tx.send(Instant::now());
            tracing::info!(
                connections = hub.connections(),
                "shutting down: closing WebSockets with 1001, draining requests"
            );
            hub.shut_down();
        };
        let serve_options = self.settings.serve.serve_options();
        let grace = serve_options.grace;
        let drained =
            common::http::serve(self.listener, router(self.state), shutdown, serve_options)
                .await
                .context("server failed")?;

        let started = started_rx.await.unwrap_or_else(|_| Instant::now());
        connections.close();
        let left = grace.saturating_sub(started.elapsed());
        let closed = tokio::time::timeout(left, connections.wait()).await.is_ok();
        if let Some(task) = self.fanout_task {
            task.abort();
        }
        if drained && closed {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "stopped cleanly"
            );
        } else {
            tracing::warn!(
                requests_drained = drained,
                websockets_closed = closed,
                "grace period over; remaining connections dropped"
            );
        }
        Ok(())
    }
}

impl Settings {
    /// The WebSocket layer's share of the settings.
    pub fn ws_settings(&self) -> WsSettings {
        WsSettings {
            max_connections: self.max_connections,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            write_timeout: self.write_timeout,
            max_client_frame: self.max_client_frame,
            client_frames_per_second: self.client_frames_per_second,
            client_frame_burst: self.client_frame_burst,
            recovery_limit: self.recovery_limit,
        }
    }

    /// The HTTP layer's share of the settings.
    pub fn http_limits(&self) -> HttpLimits {
        HttpLimits {
            max_body_bytes: self.max_body_bytes,
            max_in_flight: self.max_in_flight,
            request_timeout: self.serve.request_timeout,
        }
    }
}
