//! Every setting of the service, as a flag with an environment variable (`--help` lists them).

use std::time::Duration;

use clap::Parser;
use common::{
    config::{ServeDefaults, ServeSettings, parse_bytes, parse_duration},
    telemetry::TelemetrySettings,
};

use crate::{http::HttpLimits, processor::ProcessorConfig};

/// Settings of the metrics-processor service.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "metrics-processor",
    version,
    about = "Real-time metrics aggregation over HTTP"
)]
pub struct Settings {
    /// Listening, request time limits, shutdown.
    #[command(flatten)]
    pub serve: ServeSettings<Self>,
    /// Minutes of data kept and queryable.
    #[arg(long, env = "RETENTION_MINUTES", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=1440))]
    pub retention_minutes: u32,
    /// Distinct event types tracked at once; further types get 422 until one ages out.
    #[arg(long, env = "MAX_EVENT_TYPES", default_value_t = 1_000)]
    pub max_event_types: usize,
    /// How far ahead of the server clock an event's timestamp may be.
    #[arg(long, env = "MAX_FUTURE_SKEW", default_value = "60s", value_parser = parse_duration)]
    pub max_future_skew: Duration,
    /// Lock shards of the aggregation core (rounded up to a power of two).
    #[arg(long, env = "SHARDS", default_value_t = 64)]
    pub shards: usize,
    /// Largest body of `POST /v1/events`.
    #[arg(long, env = "MAX_EVENT_BYTES", default_value = "64KiB", value_parser = parse_bytes)]
    pub max_event_bytes: usize,
    /// Largest body of `POST /v1/events/batch`.
    #[arg(long, env = "MAX_BATCH_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    pub max_batch_bytes: usize,
    /// Most events in one batch.
    #[arg(long, env = "MAX_BATCH_EVENTS", default_value_t = 100_000)]
    pub max_batch_events: usize,
    /// Requests handled at once; past it the service answers 503 with Retry-After.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 1_024)]
    pub max_in_flight: usize,
    /// Batch requests handled at once; past it they get 503 with Retry-After. Each may hold
    /// MAX_BATCH_BYTES of body plus its parsed events, so this bounds their memory.
    #[arg(long, env = "MAX_BATCHES_IN_FLIGHT", default_value_t = 8)]
    pub max_batches_in_flight: usize,
    /// How often minutes that left the window are freed and the full window's cache is
    /// re-warmed (it is also re-warmed just after every minute boundary).
    #[arg(long, env = "EVICT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub evict_interval: Duration,
    /// Logging.
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
}

/// The suite's port plan gives the metrics processor 8081.
impl ServeDefaults for Settings {
    const LISTEN_ADDR: &'static str = "127.0.0.1:8081";
}

impl Settings {
    /// The core's share of the settings.
    pub fn processor_config(&self) -> ProcessorConfig {
        ProcessorConfig {
            retention_minutes: self.retention_minutes,
            max_event_types: self.max_event_types,
            max_future_skew: self.max_future_skew,
            shards: self.shards,
        }
    }

    /// The HTTP layer's share of the settings.
    pub fn http_limits(&self) -> HttpLimits {
        HttpLimits {
            max_event_bytes: self.max_event_bytes,
            max_batch_bytes: self.max_batch_bytes,
            max_batch_events: self.max_batch_events,
            max_in_flight: self.max_in_flight,
            max_batches_in_flight: self.max_batches_in_flight,
            request_timeout: self.serve.request_timeout,
        }
    }

    /// Defaults with `--listen 127.0.0.1:0`, for tests and the load test.
    pub fn for_tests() -> Self {
        Self::parse_from(["metrics-processor", "--listen", "127.0.0.1:0"])
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_setting_is_a_flag_listed_by_help_and_the_port_is_the_services() {
        Settings::command().debug_assert();
        let settings = Settings::try_parse_from(["metrics-processor"]).unwrap();
        assert_eq!(settings.serve.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(settings.serve.shutdown_grace, Duration::from_secs(5));
        let help = Settings::command().render_long_help().to_string();
        for variable in [
            "LISTEN_ADDR",
            "REQUEST_TIMEOUT",
            "SHUTDOWN_GRACE",
            "LOG_FORMAT",
        ] {
            assert!(help.contains(variable), "{variable} missing from --help");
        }
    }
}
