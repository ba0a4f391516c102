//! Tracing setup: pretty lines for a terminal, JSON lines (`LOG_FORMAT=json`) for collectors.
//!
//! The request-context middleware in [`crate::http`] opens a span carrying `request_id`, and
//! both formats print the current span's fields, so every line of a request names it.

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when stdout is a terminal.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The logging settings every service flattens into its own `Settings`.
#[derive(Clone, Debug, clap::Args)]
pub struct TelemetrySettings {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` EnvFilter syntax, e.g. `info,metrics_processor=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

/// Installs the global subscriber. Call once, at the top of `main`.
pub fn init(settings: &TelemetrySettings) {
    let filter =
        EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match settings.log_format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .init(),
        LogFormat::Pretty => registry.with(fmt::layer().compact()).init(),
    }
}
