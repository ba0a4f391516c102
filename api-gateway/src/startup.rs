//! Building and running the gateway: read the route file, connect PostgreSQL and Redis,
//! bootstrap, bind both listeners, serve, stop (drain, close tunnels, flush the audit queue).

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use common::{http::ServeOptions, shutdown::Background, storable::StorableText};
use prometheus_client::registry::Registry;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;

use crate::{
    audit::{Audit, AuditWriter},
    authn::{KeyCache, KeyTokens, TokenCache},
    client_ip::TrustedProxies,
    config::GatewayConfig,
    http::{AppState, AuthSettings, PublicService, Shared, admin_router},
    limiter::{Limiter, LimiterSettings, SystemClock},
    passwords,
    proxy::{Proxy, UpstreamSettings},
    revocations::Revocations,
    settings::Settings,
    store::Store,
};

/// A bound, not yet running gateway.
pub struct Application {
    listener: TcpListener,
    admin_listener: TcpListener,
    state: AppState,
    settings: Settings,
    proxy: Proxy,
    audit_writer: AuditWriter,
    revocations: Option<Arc<Revocations>>,
}

impl Application {
    /// Reads `GATEWAY_CONFIG` (or the compiled-in route file), then [`Self::build_with`].
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let config = GatewayConfig::load(settings.gateway_config.as_deref())?;
        Self::build_with(settings, config).await
    }

    /// Connects PostgreSQL (running migrations) and Redis, creates the bootstrap admin, binds.
    pub async fn build_with(settings: Settings, config: GatewayConfig) -> anyhow::Result<Self> {
        let issuer = Arc::new(settings.issuer()?);
        let table = config.table()?;
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let mut table = u.proxy.clone();
                table.insert("name".into(), toml::Value::String(u.name.clone()));
                toml::Value::Table(table)
                    .try_into::<UpstreamSettings>()
                    .with_context(|| format!("upstream {}", u.name))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let store = Store::connect(
            settings.database_url.expose_secret(),
            settings.database_pool_size,
        )
        .await?;
        if let (Some(username), Some(password)) = (
            &settings.bootstrap_admin_username,
            &settings.bootstrap_admin_password,
        ) {
            let hash = passwords::hash(password.expose_secret());
            let username = StorableText::parse("BOOTSTRAP_ADMIN_USERNAME", username.as_str())?;
            if store
                .create_user(&username, &hash, &["admin".to_owned()])
                .await?
                .is_some()
            {
                tracing::info!(%username, "bootstrap admin created");
            }
        }
        let listener = TcpListener::bind(settings.serve.listen)
            .await
            .with_context(|| format!("failed to bind {}", settings.serve.listen))?;
        let admin_listener = TcpListener::bind(settings.admin_listen)
            .await
            .with_context(|| format!("failed to bind {}", settings.admin_listen))?;
        let mut registry = Registry::with_prefix("api_gateway");
        let limiter = Limiter::new(
            LimiterSettings {
                redis_url: settings
                    .redis_url
                    .as_ref()
                    .map(|url| url.expose_secret().to_owned()),
                key_prefix: settings.rate_limit_prefix.clone(),
                redis_timeout: settings.rate_limit_redis_timeout,
                down_policy: settings.rate_limit_redis_down,
                probe_interval: settings.rate_limit_probe_interval,
            },
            Arc::new(SystemClock),
            &mut registry,
        )
        .await?;
        let proxy = Proxy::new(upstreams, &mut registry)?;
        let (audit, audit_writer) = Audit::new(store.pool().clone(), &mut registry);
        let verifier = issuer.verifier()?;
        let keys = Arc::new(KeyCache::new(settings.api_key_cache_ttl, 100_000));
        let revocations = match &settings.redis_url {
            Some(url) => Some(Arc::new(Revocations::new(
                url.expose_secret(),
                &settings.rate_limit_prefix,
                Arc::clone(&keys),
                &mut registry,
            )?)),
            None => None,
        };
        let state = AppState::new(
            Shared {
                tokens: TokenCache::new(verifier, 30, settings.token_cache_size),
                keys,
                key_tokens: KeyTokens::new(Arc::clone(&issuer)),
                revocations: revocations.clone(),
                store,
                issuer,
                table,
                limits: config.limits,
                limiter,
                proxy: proxy.clone(),
                audit,
                settings: AuthSettings {
                    refresh_token_ttl: settings.refresh_token_ttl,
                    refresh_race_grace: settings.refresh_race_grace,
                    max_body_bytes: settings.max_body_bytes,
                    request_timeout: settings.serve.request_timeout,
                    cors_allowed_origins: settings.cors_allowed_origins.clone(),
                    trusted_proxies: TrustedProxies::new(settings.trusted_proxies.clone()),
                },
            },
            registry,
        );
        Ok(Self {
            listener,
            admin_listener,
            state,
            settings,
            proxy,
            audit_writer,
            revocations,
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

    /// Serves until `shutdown`, then (once SHUTDOWN_READINESS_DELAY has passed with readiness
    /// failing) stops within SHUTDOWN_GRACE: requests in flight get most of it ([`drain_and_flush`]), and the audit queue is flushed in the rest.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let address = self.listener.local_addr()?;
        let admin_address = self.admin_listener.local_addr()?;
        tracing::info!(addr = %address, admin = %admin_address, "listening");
        let (drain, flush) = drain_and_flush(self.settings.serve.shutdown_grace);
        let serve_options = ServeOptions {
            grace: drain,
            max_header_bytes: Some(crate::http::hyper_head_limit(
                self.settings.max_header_bytes,
            )),
            ..self.settings.serve.serve_options()
        };
        // Background work, by the moment it stops: as the shutdown starts, the admin server
        // and the proxy's health checks and WebSocket tunnels (tunnels never end by
        // themselves and would hold up the drain); once serving has ended, the revocation
        // listener; after the drain, the audit writer, which flushes what the last requests
        // recorded.
        let at_shutdown = Background::new();
        let with_server = Background::new();
        let after_drain = Background::new();
        let proxy = self.proxy;
        at_shutdown.spawn(|stop| {
            let checks = proxy.start(stop);
            async move {
                let _ = checks.await;
            }
        });
        let (admin_listener, admin) = (self.admin_listener, admin_router(self.state.clone()));
        // The admin router does not measure heads itself: hyper's bound is the setting.
        let admin_settings = ServeOptions {
            max_header_bytes: Some(self.settings.max_header_bytes),
            ..serve_options
        };
        at_shutdown.spawn(|stop| async move {
            let served = common::http::serve(
                admin_listener,
                admin,
                stop.cancelled_owned(),
                admin_settings,
            );
            if let Err(error) = served.await {
                tracing::error!(error = format!("{error:#}"), "the admin server failed");
            }
        });
        if let Some(revocations) = self.revocations {
            with_server.spawn(|stop| revocations.listen(stop));
        }
        let audit_writer = self.audit_writer;
        after_drain.spawn(|stop| audit_writer.run(stop));
        let ready = self.state.readiness();
        let shutdown = {
            let at_shutdown = at_shutdown.clone();
            let readiness_delay = self.settings.serve.shutdown_readiness_delay;
            async move {
                shutdown.await;
                common::shutdown::withdraw_readiness(&ready, readiness_delay).await;
                at_shutdown.cancel();
            }
        };
        let served = common::http::serve(
            self.listener,
            PublicService::new(self.state, self.settings.max_header_bytes),
            shutdown,
            serve_options,
        )
        .await;
        // Whether serving ended well or not, the background work stops, in that order, before
        // this returns. The first two were told to stop when the shutdown started.
        at_shutdown.stop(drain).await;
        with_server.stop(drain).await;
        // No request is left to record anything: the writer flushes what is queued and ends.
        if !after_drain.stop(flush).await {
            tracing::error!("audit events still queued at exit: PostgreSQL is not taking them");
        }
        let drained = served.context("server failed")?;
        if drained {
            tracing::info!("stopped cleanly");
        }
        Ok(())
    }
}

/// How SHUTDOWN_GRACE is shared: requests in flight may take all but the last fifth (at
/// most 2 s, at least 200 ms, never over half), which is kept for flushing the audit events
/// they recorded. A container runtime that kills at SHUTDOWN_GRACE (compose's
/// `stop_grace_period`) then loses no event of a request that finished.
/// The drain's share includes the moment `serve` waits for connections it drops at its end
/// ([`common::http::DROP_WAIT`]).
fn drain_and_flush(grace: Duration) -> (Duration, Duration) {
    let flush = (grace / 5)
        .clamp(Duration::from_millis(200), Duration::from_secs(2))
        .min(grace / 2);
    let drain = (grace - flush).saturating_sub(common::http::DROP_WAIT);
    (drain, flush)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_grace_is_shared_between_draining_and_flushing_and_never_exceeded() {
        let secs = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(drain_and_flush(secs(10)), (ms(7_900), secs(2)));
        assert_eq!(drain_and_flush(secs(30)), (ms(27_900), secs(2)));
        assert_eq!(drain_and_flush(secs(2)), (ms(1_500), ms(400)));
        assert_eq!(drain_and_flush(ms(300)), (ms(50), ms(150)));
        assert_eq!(drain_and_flush(ms(100)), (Duration::ZERO, ms(50)));
        assert_eq!(
            drain_and_flush(Duration::ZERO),
            (Duration::ZERO, Duration::ZERO)
        );
        // Drain, the wait for dropped connections and the flush fit in the grace.
        for grace in [ms(300), secs(2), secs(10), secs(30)] {
            let (drain, flush) = drain_and_flush(grace);
            assert!(
                drain + common::http::DROP_WAIT + flush <= grace,
                "{grace:?}"
            );
        }
    }
}
