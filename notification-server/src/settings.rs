//! Every setting of the service, as a flag with an environment variable (`--help` lists them).

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use common::{
    auth::{KeySet, Verifier},
    config::{ServeDefaults, ServeSettings, parse_bytes, parse_duration, parse_secret},
    telemetry::TelemetrySettings,
};
use secrecy::{ExposeSecret, SecretString};

/// Settings of the notification-server.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "notification-server",
    version,
    about = "Real-time notifications over WebSocket, with history and cross-node fan-out"
)]
pub struct Settings {
    /// Listening, request time limits, shutdown.
    #[command(flatten)]
    pub serve: ServeSettings<Self>,
    /// PostgreSQL for history and membership. Unset: the memory engine (one node, not durable).
    #[arg(long, env = "DATABASE_URL", value_parser = parse_secret, hide_env_values = true)]
    pub database_url: Option<SecretString>,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: u32,
    /// Redis for cross-node fan-out. Unset: this node is the only one.
    #[arg(long, env = "REDIS_URL", value_parser = parse_secret, hide_env_values = true)]
    pub redis_url: Option<SecretString>,
    /// Prefix of this deployment's Redis keys and channels.
    #[arg(long, env = "REDIS_PREFIX", default_value = "notify:")]
    pub redis_prefix: String,
    /// A JWKS file of the token issuer's public keys (EdDSA or RS256, each with a `kid`).
    #[arg(long, env = "JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// An Ed25519 public key (PEM) that tokens may be signed with, under JWT_KEY_ID.
    #[arg(long, env = "JWT_ED25519_PUBLIC_KEY_FILE")]
    pub jwt_ed25519_public_key_file: Option<PathBuf>,
    /// An RSA public key (PEM) for RS256 tokens, under JWT_KEY_ID.
    #[arg(long, env = "JWT_RSA_PUBLIC_KEY_FILE")]
    pub jwt_rsa_public_key_file: Option<PathBuf>,
    /// A shared HS256 secret (at least 32 bytes), under JWT_KEY_ID. For local development only.
    #[arg(long, env = "JWT_HS256_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub jwt_hs256_secret: Option<SecretString>,
    /// The `kid` of the key given by a *_KEY_FILE or JWT_HS256_SECRET setting.
    #[arg(long, env = "JWT_KEY_ID", default_value = "default")]
    pub jwt_key_id: String,
    /// The `iss` every token must carry.
    #[arg(long, env = "JWT_ISSUER", default_value = "api-gateway")]
    pub jwt_issuer: String,
    /// The `aud` every token must carry.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "backend-suite")]
    pub jwt_audience: String,
    /// Most WebSocket connections at once; further upgrades get 503.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 25_000)]
    pub max_connections: usize,
    /// Frames a connection may have queued; a client slower than that is closed with 4008.
    #[arg(long, env = "SEND_QUEUE", default_value_t = 256)]
    pub send_queue: usize,
    /// How often the server pings each connection.
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// How long a ping may go unanswered (by a pong or any frame) before the connection is
    /// closed with 4002.
    #[arg(long, env = "HEARTBEAT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,
    /// Longest a frame write may block before the connection is dropped.
    #[arg(long, env = "WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,
    /// Largest client frame (message); larger ones close the connection with 1009.
    #[arg(long, env = "MAX_CLIENT_FRAME", default_value = "64KiB", value_parser = parse_bytes)]
    pub max_client_frame: usize,
    /// Client frames allowed per second on average; faster clients are closed with 4029.
    #[arg(long, env = "CLIENT_FRAMES_PER_SECOND", default_value_t = 10)]
    pub client_frames_per_second: u32,
    /// Client frames allowed in a burst above the average rate.
    #[arg(long, env = "CLIENT_FRAME_BURST", default_value_t = 50)]
    pub client_frame_burst: u32,
    /// Most notifications one recovery replays; the rest are left to history paging.
    #[arg(long, env = "RECOVERY_LIMIT", default_value_t = 1_000)]
    pub recovery_limit: usize,
    /// Notifications kept per user by the memory engine.
    #[arg(long, env = "MEMORY_HISTORY_PER_USER", default_value_t = 1_000)]
    pub memory_history_per_user: usize,
    /// Most users named in one `POST /v1/notifications`.
    #[arg(long, env = "MAX_RECIPIENTS", default_value_t = 10_000)]
    pub max_recipients: usize,
    /// Largest request body.
    #[arg(long, env = "MAX_BODY_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub max_body_bytes: usize,
    /// HTTP requests handled at once; past it the service answers 503 with Retry-After.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 512)]
    pub max_in_flight: usize,
    /// Logging.
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
}

/// The suite's port plan gives the notification server 8082.
impl ServeDefaults for Settings {
    const LISTEN_ADDR: &'static str = "127.0.0.1:8082";
}

impl Settings {
    /// The token verifier these settings describe; at least one key is required.
    pub fn verifier(&self) -> anyhow::Result<Verifier> {
        let mut keys = match &self.jwt_jwks_file {
            Some(path) => {
                let json = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read JWT_JWKS_FILE {}", path.display()))?;
                KeySet::from_jwks(&json)
                    .with_context(|| format!("invalid JWKS in {}", path.display()))?
            }
            None => KeySet::new(),
        };
        let kid = &self.jwt_key_id;
        if let Some(path) = &self.jwt_ed25519_public_key_file {
            let pem =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            keys.insert_ed25519_pem(kid, &pem)
                .with_context(|| format!("invalid Ed25519 public key in {}", path.display()))?;
        }
        if let Some(path) = &self.jwt_rsa_public_key_file {
            let pem =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            keys.insert_rsa_pem(kid, &pem)
                .with_context(|| format!("invalid RSA public key in {}", path.display()))?;
        }
        if let Some(secret) = &self.jwt_hs256_secret {
            tracing::warn!("JWT_HS256_SECRET set: shared-secret tokens are for development only");
            keys.insert_hs256_secret(kid, secret.expose_secret().as_bytes())
                .context("invalid JWT_HS256_SECRET")?;
        }
        anyhow::ensure!(
            !keys.is_empty(),
            "no token key configured: set JWT_JWKS_FILE, JWT_ED25519_PUBLIC_KEY_FILE, \
             JWT_RSA_PUBLIC_KEY_FILE or (for development) JWT_HS256_SECRET"
        );
        Ok(Verifier::new(keys, &self.jwt_issuer, &self.jwt_audience))
    }

    /// Defaults on `127.0.0.1:0`, the memory engine, one node, and the Ed25519 test key of
    /// `common/tests/fixtures` under kid `test`; for tests and the load test.
    pub fn for_tests() -> Self {
        let key = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../common/tests/fixtures/ed25519-public.pem"
        );
        let mut settings = Self::parse_from([
            "notification-server",
            "--listen",
            "127.0.0.1:0",
            "--jwt-key-id",
            "test",
        ]);
        settings.jwt_ed25519_public_key_file = Some(key.into());
        settings.database_url = None;
        settings.redis_url = None;
        settings.jwt_jwks_file = None;
        settings.jwt_rsa_public_key_file = None;
        settings.jwt_hs256_secret = None;
        settings
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_setting_is_a_flag_listed_by_help_and_the_port_is_the_services() {
        Settings::command().debug_assert();
        let settings = Settings::try_parse_from(["notification-server"]).unwrap();
        assert_eq!(settings.serve.listen, "127.0.0.1:8082".parse().unwrap());
        assert_eq!(settings.serve.shutdown_grace, Duration::from_secs(5));
        let help = Settings::command().render_long_help().to_string();
        for variable in [
            "LISTEN_ADDR",
            "HEADER_READ_TIMEOUT",
            "DATABASE_URL",
            "REDIS_URL",
        ] {
            assert!(help.contains(variable), "{variable} missing from --help");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let settings = Settings::try_parse_from([
            "notification-server",
            "--database-url",
            "postgres://app:pg-password@db/notify",
            "--redis-url",
            "redis://:redis-password@cache:6379",
            "--jwt-hs256-secret",
            "a-shared-secret-of-at-least-32-bytes",
        ])
        .unwrap();
        let printed = format!("{settings:?}");
        for secret in ["pg-password", "redis-password", "a-shared-secret"] {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        let url = settings.database_url.as_ref().unwrap();
        assert_eq!(url.expose_secret(), "postgres://app:pg-password@db/notify");
    }
}
