//! The fake external payment provider: a real HTTP service, run as its own process
//! (`order-saga provider`), standing in for a payment company. It keeps authorizations in
//! memory, honours `Idempotency-Key` (never a second authorization for one key), and
//! misbehaves on request (latency, declines, 500/503, calls that are carried out and then
//! hang) so the payment service's client can be tested against the failures a real provider
//! shows. `GET /v1/summary` lets a test prove "exactly one charge".
//!
//! - [`ledger`]: the books and the behaviour knobs (no HTTP).
//! - [`http`]: the API (CONTRACT.md, "provider (8089)").
//! - this file: [`ProviderSettings`] and [`Application`], built and run like every service.

pub mod http;
pub mod ledger;

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use common::config::{ServeDefaults, ServeSettings, parse_duration};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use self::{
    http::{ProviderState, router},
    ledger::{Behaviour, Ledger},
};

/// Settings of the provider process; flattened into the `provider` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderSettings {
    /// Listening, request time limits, shutdown.
    #[command(flatten)]
    pub serve: ServeSettings<Self>,
    /// Logs.
    #[command(flatten)]
    pub telemetry: common::telemetry::TelemetrySettings,
    /// Extra time every payment call takes before it is handled.
    #[arg(long, env = "PROVIDER_LATENCY", default_value = "0ms", value_parser = parse_duration)]
    pub latency: Duration,
    /// Share of authorizations declined (0 to 1); `pm_card_declined` always declines.
    #[arg(long, env = "PROVIDER_DECLINE_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub decline_rate: f64,
    /// Share of payment calls answered 500 or 503 without doing anything (0 to 1).
    #[arg(long, env = "PROVIDER_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,
    /// Share of payment calls carried out and then left hanging for HANG_FOR (0 to 1).
    #[arg(long, env = "PROVIDER_TIMEOUT_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub timeout_rate: f64,
    /// How long a "timed out" call hangs before it answers after all.
    #[arg(long, env = "PROVIDER_HANG_FOR", default_value = "30s", value_parser = parse_duration)]
    pub hang_for: Duration,
    /// Seed of the dice, so a run's faults repeat; unset, they differ every run.
    #[arg(long, env = "PROVIDER_SEED")]
    pub seed: Option<u64>,
}

/// The suite's port plan gives the fake payment provider 8089.
impl ServeDefaults for ProviderSettings {
    const LISTEN_ADDR: &'static str = "127.0.0.1:8089";
}

/// Reads a rate from 0 to 1.
fn parse_rate(input: &str) -> Result<f64, String> {
    input
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|rate| (0.0..=1.0).contains(rate))
        .ok_or_else(|| format!("`{input}` is not a rate from 0 to 1"))
}

impl ProviderSettings {
    /// The behaviour these settings start with.
    pub fn behaviour(&self) -> Behaviour {
        Behaviour {
            latency: self.latency,
            decline_rate: self.decline_rate,
            error_rate: self.error_rate,
            timeout_rate: self.timeout_rate,
            hang_for: self.hang_for,
            fail_next: 0,
        }
    }

    /// Defaults on `127.0.0.1:0`, well behaved, seeded, with a 1 s shutdown grace; for tests
    /// and the load test.
    pub fn for_tests() -> Self {
        #[derive(Parser)]
        struct Command {
            #[command(flatten)]
            provider: ProviderSettings,
        }
        Command::parse_from([
            "provider",
            "--listen",
            "127.0.0.1:0",
            "--shutdown-grace",
            "1s",
            "--latency",
            "0ms",
            "--decline-rate",
            "0",
            "--error-rate",
            "0",
            "--timeout-rate",
            "0",
            "--hang-for",
            "30s",
            "--seed",
            "7",
        ])
        .provider
    }
}

/// A bound, not yet running provider.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: ProviderState,
    settings: ProviderSettings,
}

impl Application {
    /// Binds the listener and sets up empty books.
    pub async fn build(settings: ProviderSettings) -> anyhow::Result<Self> {
        let ledger = Arc::new(Ledger::new(settings.behaviour(), settings.seed));
        let registry = Registry::with_prefix("order_saga_provider");
        let state = ProviderState::new(ledger, registry);
        let listener = TcpListener::bind(settings.serve.listen)
            .await
            .with_context(|| format!("failed to bind {}", settings.serve.listen))?;
        let port = listener
            .local_addr()
            .context("failed to read the bound address")?
            .port();
        Ok(Self {
            listener,
            port,
            state,
            settings,
        })
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` completes, then lets requests in flight finish within
    /// SHUTDOWN_GRACE (a hanging call is dropped when it runs out).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let address = self
            .listener
            .local_addr()
            .context("failed to read the bound address")?;
        tracing::info!(addr = %address, behaviour = ?self.settings.behaviour(), "listening");
        let drained = common::http::serve(
            self.listener,
            router(self.state),
            shutdown,
            self.settings.serve.serve_options(),
        )
        .await
        .context("server failed")?;
        if drained {
            tracing::info!("stopped cleanly");
        } else {
            tracing::warn!("grace period over; hanging calls dropped");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        provider: ProviderSettings,
    }

    #[test]
    fn every_setting_is_a_flag_and_the_port_is_the_providers() {
        Command::command().debug_assert();
        let settings = Command::try_parse_from(["provider"]).unwrap().provider;
        assert_eq!(settings.serve.listen, "127.0.0.1:8089".parse().unwrap());
        assert_eq!(settings.hang_for, Duration::from_secs(30));
        assert!(Command::try_parse_from(["provider", "--error-rate", "1.5"]).is_err());
        let help = Command::command().render_long_help().to_string();
        for variable in ["LISTEN_ADDR", "PROVIDER_TIMEOUT_RATE", "PROVIDER_HANG_FOR"] {
            assert!(help.contains(variable), "{variable} missing from --help");
        }
    }
}
