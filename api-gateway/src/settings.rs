//! Every setting of the gateway, as a flag with an environment variable (`--help` lists them).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use common::{
    config::{ServeDefaults, ServeSettings, parse_duration, parse_secret},
    telemetry::TelemetrySettings,
};
use secrecy::{ExposeSecret, SecretString};

use crate::{limiter::RedisDownPolicy, tokens::TokenIssuer};

/// Settings of the api-gateway.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "api-gateway",
    version,
    about = "The suite's authenticating gateway"
)]
pub struct Settings {
    /// The public listener, request time limits, shutdown.
    #[command(flatten)]
    pub serve: ServeSettings<Self>,
    /// Operations address: `/metrics` is served here only.
    #[arg(long, env = "ADMIN_LISTEN_ADDR", default_value = "127.0.0.1:9080")]
    pub admin_listen: SocketAddr,
    /// PostgreSQL: users, refresh tokens.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_secret, hide_env_values = true)]
    pub database_url: SecretString,
    /// Redis, shared by every replica for rate limits. Without it each replica limits alone.
    #[arg(long, env = "REDIS_URL", value_parser = parse_secret, hide_env_values = true)]
    pub redis_url: Option<SecretString>,
    /// The route file: quotas, upstreams, RBAC rules (see `gateway.toml`). Default: the
    /// compiled-in `gateway.toml`.
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub gateway_config: Option<PathBuf>,
    /// Prefix of the limiter's Redis keys.
    #[arg(long, env = "RATE_LIMIT_PREFIX", default_value = "gw:rl:")]
    pub rate_limit_prefix: String,
    /// How long one limiter decision may wait for Redis before the fallback decides.
    #[arg(long, env = "RATE_LIMIT_REDIS_TIMEOUT", default_value = "100ms", value_parser = parse_duration)]
    pub rate_limit_redis_timeout: Duration,
    /// What decides while Redis is unreachable: `local` (each replica enforces the quotas
    /// alone), `open` (admit everything), `closed` (refuse with 503).
    #[arg(
        long,
        env = "RATE_LIMIT_REDIS_DOWN",
        value_enum,
        default_value = "local"
    )]
    pub rate_limit_redis_down: RedisDownPolicy,
    /// While Redis is down, how often one request tries it again.
    #[arg(long, env = "RATE_LIMIT_PROBE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub rate_limit_probe_interval: Duration,
    /// Browser origins allowed to call the gateway (CORS), comma-separated; none by default.
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,
    /// Proxies in front of the gateway whose `X-Forwarded-For` is believed (addresses or
    /// networks, comma-separated: `10.0.0.0/8,::1`); none by default, so the TCP peer is the
    /// client for the per-IP limit and the audit log.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<crate::client_ip::Network>,
    /// Verified access tokens remembered, so a signature is checked once per token.
    #[arg(long, env = "TOKEN_CACHE_SIZE", default_value_t = 65_536)]
    pub token_cache_size: usize,
    /// How long a found API key is trusted before it is looked up again: the bound on how
    /// long a revocation on another replica takes to apply here when its Redis message is
    /// missed (it normally applies as the message arrives).
    #[arg(long, env = "API_KEY_CACHE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub api_key_cache_ttl: Duration,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: u32,
    /// The Ed25519 private key (PKCS#8 PEM) access tokens are signed with (EdDSA).
    #[arg(long, env = "JWT_ED25519_PRIVATE_KEY_FILE")]
    pub jwt_ed25519_private_key_file: Option<PathBuf>,
    /// A shared HS256 secret instead (≥ 32 bytes): local development only.
    #[arg(long, env = "JWT_HS256_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub jwt_hs256_secret: Option<SecretString>,
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
    #[arg(long, env = "BOOTSTRAP_ADMIN_PASSWORD", value_parser = parse_secret, hide_env_values = true)]
    pub bootstrap_admin_password: Option<SecretString>,
    /// Largest request body the gateway itself reads.
    #[arg(long, env = "MAX_BODY_BYTES", default_value = "16KiB", value_parser = common::config::parse_bytes)]
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers); larger ones get a 431 problem
    /// (past twice this, a bare 431 from the HTTP layer).
    #[arg(long, env = "MAX_HEADER_BYTES", default_value = "16KiB", value_parser = common::config::parse_bytes)]
    pub max_header_bytes: usize,
    /// Logging.
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
}

/// The suite's port plan gives the gateway 8080. Its grace is longer than the others': the
/// last part of it is kept for flushing the audit queue (see `startup::drain_and_flush`).
impl ServeDefaults for Settings {
    const LISTEN_ADDR: &'static str = "127.0.0.1:8080";
    const SHUTDOWN_GRACE: &'static str = "10s";
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
                    secret.expose_secret().as_bytes(),
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

    /// Defaults on port 0 for both listeners, `database_url`, the Ed25519 test key of
    /// `common/tests/fixtures` under kid `test`, no Redis, and a limiter key prefix of its
    /// own; for tests and the load test.
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
        settings.redis_url = None;
        settings.gateway_config = None;
        settings.cors_allowed_origins = Vec::new();
        settings.trusted_proxies = Vec::new();
        settings.rate_limit_prefix = format!("gw-test:{}:", uuid::Uuid::now_v7().simple());
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(args: &[&str]) -> Result<Settings, clap::Error> {
        let base = ["api-gateway", "--database-url", "postgres://x/y"];
        Settings::try_parse_from(base.iter().chain(args))
    }

    #[test]
    fn every_setting_is_a_flag_listed_by_help_and_the_port_is_the_services() {
        use clap::CommandFactory;
        Settings::command().debug_assert();
        let settings = with(&[]).unwrap();
        assert_eq!(settings.serve.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(settings.serve.shutdown_grace, Duration::from_secs(10));
        let help = Settings::command().render_long_help().to_string();
        for variable in [
            "LISTEN_ADDR",
            "ADMIN_LISTEN_ADDR",
            "SHUTDOWN_GRACE",
            "DATABASE_URL",
        ] {
            assert!(help.contains(variable), "{variable} missing from --help");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let settings = Settings::try_parse_from([
            "api-gateway",
            "--database-url",
            "postgres://app:pg-password@db/gateway",
            "--redis-url",
            "redis://:redis-password@cache:6379",
            "--jwt-hs256-secret",
            "a-shared-secret-of-at-least-32-bytes",
            "--bootstrap-admin-username",
            "root",
            "--bootstrap-admin-password",
            "the-admin-password",
        ])
        .unwrap();
        let printed = format!("{settings:?}");
        for secret in [
            "pg-password",
            "redis-password",
            "a-shared-secret",
            "the-admin-password",
        ] {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        let password = settings.bootstrap_admin_password.as_ref().unwrap();
        assert_eq!(password.expose_secret(), "the-admin-password");
    }

    #[test]
    fn trusted_proxies_are_a_list_of_networks_and_bad_ones_stop_the_start() {
        let settings = with(&["--trusted-proxies", "10.0.0.0/8,::1"]).unwrap();
        assert_eq!(settings.trusted_proxies.len(), 2);
        assert!(settings.trusted_proxies[0].contains("10.1.2.3".parse().unwrap()));
        assert!(settings.trusted_proxies[1].contains("::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "proxy.internal", "10.0.0.0/8,,"] {
            assert!(with(&["--trusted-proxies", bad]).is_err(), "{bad}");
        }
    }
}
