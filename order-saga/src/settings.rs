//! Every setting of every process, as a flag with an environment variable (`--help` of each
//! subcommand lists them). What the four saga services share ([`Backends`], [`BusSettings`])
//! is flattened into each one's settings.

use std::time::Duration;

use clap::Args;
use common::{
    config::{ServeDefaults, ServeSettings, parse_duration, parse_secret},
    telemetry::TelemetrySettings,
};
use secrecy::SecretString;

use crate::{bus::consumer::ConsumerSettings, bus::outbox::RelaySettings, messages::Service};

/// Where a saga service keeps its state.
#[derive(Debug, Clone, Args)]
pub struct Backends {
    /// PostgreSQL; the service keeps its tables in its own schema of this database.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_secret, hide_env_values = true)]
    pub database_url: SecretString,
    /// Connections in the service's pool.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: u32,
    /// Redis, carrying the streams.
    #[arg(long, env = "REDIS_URL", value_parser = parse_secret, hide_env_values = true)]
    pub redis_url: SecretString,
}

/// How a saga service publishes and consumes messages.
#[derive(Debug, Clone, Args)]
pub struct BusSettings {
    /// Prefix of every stream name (`<prefix>:orders`, ...); systems sharing a Redis differ by it.
    #[arg(long, env = "STREAM_PREFIX", default_value = "saga")]
    pub stream_prefix: String,
    /// This instance's stable name in its consumer group; a restart under the same name takes
    /// back its own pending messages. Defaults to the host name.
    #[arg(long = "instance", env = "INSTANCE_ID")]
    pub instance: Option<String>,
    /// Outbox rows the relay publishes per transaction.
    #[arg(long, env = "RELAY_BATCH", default_value_t = 256)]
    pub relay_batch: i64,
    /// How often the relay looks for rows when not woken.
    #[arg(long, env = "RELAY_POLL", default_value = "100ms", value_parser = parse_duration)]
    pub relay_poll: Duration,
    /// Approximate length streams are trimmed to.
    #[arg(long, env = "STREAM_MAX_LEN", default_value_t = 1_000_000)]
    pub stream_max_len: usize,
    /// Messages read (and handled concurrently) at once.
    #[arg(long, env = "CONSUMER_BATCH", default_value_t = 64)]
    pub consumer_batch: usize,
    /// Retries in place after a handler failure, before the message is left pending.
    #[arg(long, env = "RETRIES_IN_PLACE", default_value_t = 3)]
    pub retries_in_place: u32,
    /// The first in-place retry waits up to this, each further one up to twice as long.
    #[arg(long, env = "RETRY_BASE", default_value = "50ms", value_parser = parse_duration)]
    pub retry_base: Duration,
    /// How long a message may stay pending before another read takes it over.
    #[arg(long, env = "RECLAIM_IDLE", default_value = "5s", value_parser = parse_duration)]
    pub reclaim_idle: Duration,
    /// How often pending messages are looked for.
    #[arg(long, env = "RECLAIM_EVERY", default_value = "1s", value_parser = parse_duration)]
    pub reclaim_every: Duration,
    /// Deliveries after which a message goes to the dead-letter stream.
    #[arg(long, env = "MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: usize,
}

impl BusSettings {
    /// The instance name: `--instance`, else the host name.
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "instance".to_owned())
        })
    }

    /// The relay's share.
    pub fn relay(&self) -> RelaySettings {
        RelaySettings {
            batch: self.relay_batch,
            poll: self.relay_poll,
            stream_max_len: self.stream_max_len,
        }
    }

    /// The consumer's share, for `service`'s stream.
    pub fn consumer(&self, service: Service) -> ConsumerSettings {
        ConsumerSettings {
            stream: service.stream(&self.stream_prefix),
            group: service.as_str().to_owned(),
            consumer: self.instance(),
            batch: self.consumer_batch,
            block: Duration::from_secs(1),
            retries_in_place: self.retries_in_place,
            retry_base: self.retry_base,
            reclaim_idle: self.reclaim_idle,
            reclaim_every: self.reclaim_every,
            max_deliveries: self.max_deliveries,
        }
    }
}

/// What every saga service's settings hold besides its own.
#[derive(Debug, Clone, Args)]
pub struct SharedSettings<D: ServeDefaults + Send + Sync + 'static> {
    /// Listening and shutdown.
    #[command(flatten)]
    pub serve: ServeSettings<D>,
    /// PostgreSQL and Redis.
    #[command(flatten)]
    pub backends: Backends,
    /// Streams.
    #[command(flatten)]
    pub bus: BusSettings,
    /// Logs.
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
    /// Largest request body.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Requests handled at once before shedding with 503.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
}
