//! Building and running the gateway: connect, bootstrap, bind both listeners, serve, stop.

use std::{future::Future, sync::atomic::Ordering};

use anyhow::Context;
use common::http::ServeSettings;
use tokio::net::TcpListener;

use crate::{
    http::{AppState, AuthSettings, admin_router, router},
    passwords,
    settings::Settings,
    store::Store,
};

/// A bound, not yet running gateway.
pub struct Application {
    listener: TcpListener,
    admin_listener: TcpListener,
    state: AppState,
    settings: Settings,
}

impl Application {
    /// Connects PostgreSQL (running migrations), creates the bootstrap admin, binds.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let issuer = settings.issuer()?;
        let store = Store::connect(&settings.database_url, settings.database_pool_size).await?;
        if let (Some(username), Some(password)) = (
            &settings.bootstrap_admin_username,
            &settings.bootstrap_admin_password,
        ) {
            let hash = passwords::hash(password);
            if store
                .create_user(username, &hash, &["admin".to_owned()])
                .await?
                .is_some()
            {
                tracing::info!(%username, "bootstrap admin created");
            }
        }
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("failed to bind {}", settings.listen))?;
        let admin_listener = TcpListener::bind(settings.admin_listen)
            .await
            .with_context(|| format!("failed to bind {}", settings.admin_listen))?;
        let state = AppState::new(
            store,
            issuer,
            AuthSettings {
                refresh_token_ttl: settings.refresh_token_ttl,
                refresh_race_grace: settings.refresh_race_grace,
                max_body_bytes: settings.max_body_bytes,
                request_timeout: settings.request_timeout,
            },
        );
        Ok(Self {
            listener,
            admin_listener,
            state,
            settings,
        })
    }

    /// The public port actually bound.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The admin port actually bound.
    pub fn admin_port(&self) -> u16 {
        self.admin_listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(0)
    }

    /// Serves until `shutdown`, then drains within SHUTDOWN_GRACE.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let address = self.listener.local_addr()?;
        let admin_address = self.admin_listener.local_addr()?;
        tracing::info!(addr = %address, admin = %admin_address, "listening");
        let serve_settings = ServeSettings {
            grace: self.settings.shutdown_grace,
            header_read_timeout: self.settings.header_read_timeout,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let ready = self.state.readiness();
        let admin = {
            let mut stop_rx = stop_rx.clone();
            tokio::spawn(common::http::serve(
                self.admin_listener,
                admin_router(self.state.clone()),
                async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                },
                serve_settings,
            ))
        };
        let shutdown = async move {
            shutdown.await;
            ready.store(false, Ordering::Release);
            let _ = stop_tx.send(true);
        };
        let drained =
            common::http::serve(self.listener, router(self.state), shutdown, serve_settings)
                .await
                .context("server failed")?;
        let _ = admin.await;
        drop(stop_rx);
        if drained {
            tracing::info!("stopped cleanly");
        }
        Ok(())
    }
}
