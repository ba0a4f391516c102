//! Every setting of the service, as a flag with an environment variable (`--help` lists them).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use common::{
    config::{parse_bytes, parse_duration},
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
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
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
    /// Longest a request may run before it is answered with 503.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long a client may take to send a request's head before its connection is closed;
    /// also how long a keep-alive connection may sit idle between requests.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Once shutdown starts, how long to keep serving with /readyz failing before the
    /// listener closes, so load balancers stop sending first. 0 closes at once; the exit then
    /// takes up to this plus SHUTDOWN_GRACE.
    #[arg(long, env = "SHUTDOWN_READINESS_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_readiness_delay: Duration,
    /// How long a shutdown waits for in-flight requests before closing them.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How often minutes that left the window are freed and the full window's cache is
    /// re-warmed (it is also re-warmed just after every minute boundary).
    #[arg(long, env = "EVICT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub evict_interval: Duration,
    /// Logging.
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
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
            request_timeout: self.request_timeout,
        }
    }

    /// Defaults with `--listen 127.0.0.1:0`, for tests and the load test.
    pub fn for_tests() -> Self {
        Self::parse_from(["metrics-processor", "--listen", "127.0.0.1:0"])
    }
}
