//! Every setting of the gateway, as a flag with an environment variable (`--help` lists them).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use common::{config::parse_duration, telemetry::TelemetrySettings};

use crate::tokens::TokenIssuer;

/// Settings of the api-gateway.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "api-gateway",
    version,
    about = "The suite's authenticating gateway"
)]
pub struct Settings {
    /// Public address; port 0 picks a free port.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Operations address: `/metrics` is served here only.
    #[arg(long, env = "ADMIN_LISTEN_ADDR", default_value = "127.0.0.1:9080")]
    pub admin_listen: SocketAddr,
    /// PostgreSQL: users, refresh tokens.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: u32,
    /// The Ed25519 private key (PKCS#8 PEM) access tokens are signed with (EdDSA).
    #[arg(long, env = "JWT_ED25519_PRIVATE_KEY_FILE")]
    pub jwt_ed25519_private_key_file: Option<PathBuf>,
    /// A shared HS256 secret instead (≥ 32 bytes): local development only.
    #[arg(long, env = "JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// The `kid` the signing key is published under.
    #[arg(long, env = "JWT_KEY_ID", default_value = "gateway-1")]
    pub jwt_key_id: String,
    /// `iss` of issued tokens.
    #[arg(long, env = "JWT_ISSUER", default_value = "api-gateway")]
    pub jwt_issuer: String,
    /// `aud` of issued tokens.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "backend-suite")]
    pub jwt_audience: String,
    /// Access token lifetime.
    #[arg(long, env = "ACCESS_TOKEN_TTL", default_value = "15m", value_parser = parse_duration)]
    pub access_token_ttl: Duration,
    /// Refresh token lifetime (each rotation issues a new one with a full lifetime).
    #[arg(long, env = "REFRESH_TOKEN_TTL", default_value = "14d", value_parser = parse_duration)]
    pub refresh_token_ttl: Duration,
    /// How long after a rotation a second use of the same refresh token counts as the same
    /// client racing itself (409, nothing revoked) rather than theft, provided the token
    /// issued in its place is still unused.
    #[arg(long, env = "REFRESH_RACE_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub refresh_race_grace: Duration,
    /// Creates this admin user at start when no user has the name (with
    /// BOOTSTRAP_ADMIN_PASSWORD).
    #[arg(long, env = "BOOTSTRAP_ADMIN_USERNAME")]
    pub bootstrap_admin_username: Option<String>,
    /// The bootstrap admin's password.
    #[arg(long, env = "BOOTSTRAP_ADMIN_PASSWORD", hide_env_values = true)]
    pub bootstrap_admin_password: Option<String>,
    /// Largest request body the gateway itself reads.
    #[arg(long, env = "MAX_BODY_BYTES", default_value = "16KiB", value_parser = common::config::parse_bytes)]
    pub max_body_bytes: usize,
    /// Longest a request may run.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long a client may take to send a request's head.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// How long a shutdown waits for requests in flight.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Logging.
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
}

impl Settings {
    /// The token issuer these settings describe.
    pub fn issuer(&self) -> anyhow::Result<TokenIssuer> {
        match (&self.jwt_ed25519_private_key_file, &self.jwt_hs256_secret) {
            (Some(path), _) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                TokenIssuer::ed25519(
                    &self.jwt_key_id,
                    &pem,
                    &self.jwt_issuer,
                    &self.jwt_audience,
                    self.access_token_ttl,
                )
            }
            (None, Some(secret)) => {
                tracing::warn!(
                    "JWT_HS256_SECRET set: shared-secret tokens are for development only"
                );
                TokenIssuer::hs256(
                    &self.jwt_key_id,
                    secret.as_bytes(),
                    &self.jwt_issuer,
                    &self.jwt_audience,
                    self.access_token_ttl,
                )
            }
            (None, None) => anyhow::bail!(
                "no signing key: set JWT_ED25519_PRIVATE_KEY_FILE (or, for development, JWT_HS256_SECRET)"
            ),
        }
    }

    /// Defaults on port 0 for both listeners, `database_url`, and the Ed25519 test key of
    /// `common/tests/fixtures` under kid `test`; for tests and the load test.
    pub fn for_tests(database_url: &str) -> Self {
        let mut settings = Self::parse_from([
            "api-gateway",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--jwt-key-id",
            "test",
        ]);
        settings.jwt_ed25519_private_key_file = Some(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../common/tests/fixtures/ed25519-private.pem"
            )
            .into(),
        );
        settings.jwt_hs256_secret = None;
        settings.bootstrap_admin_username = None;
        settings.bootstrap_admin_password = None;
        settings
    }
}
