//! `notify-token`: mints an access token for trying the service locally (the demo page, curl).
//! It signs with the development HS256 secret, or with an Ed25519 private key, as the
//! api-gateway would in production.
//!
//! ```sh
//! JWT_HS256_SECRET=… notify-token --sub alice                 # a user who may connect
//! JWT_HS256_SECRET=… notify-token --sub ops --roles sender     # may send notifications
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use common::auth::{Claims, Signer};

/// Mints an access token the notification-server accepts.
#[derive(Debug, Parser)]
#[command(name = "notify-token", version)]
struct Args {
    /// The user id (`sub`).
    #[arg(long)]
    sub: String,
    /// Roles, comma-separated: `sender`, `support`, `admin`.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3_600)]
    ttl: i64,
    /// The development HS256 secret the server was given.
    #[arg(long, env = "JWT_HS256_SECRET", hide_env_values = true)]
    hs256_secret: Option<String>,
    /// An Ed25519 private key (PEM) whose public key the server trusts.
    #[arg(long, env = "JWT_ED25519_PRIVATE_KEY_FILE")]
    ed25519_private_key_file: Option<PathBuf>,
    /// The `kid` the server knows the key by.
    #[arg(long, env = "JWT_KEY_ID", default_value = "default")]
    key_id: String,
    /// `iss`.
    #[arg(long, env = "JWT_ISSUER", default_value = "api-gateway")]
    issuer: String,
    /// `aud`.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "backend-suite")]
    audience: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let signer = match (&args.ed25519_private_key_file, &args.hs256_secret) {
        (Some(path), _) => {
            let pem =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Signer::ed25519_pem(&args.key_id, &pem)?
        }
        (None, Some(secret)) => Signer::hs256_secret(&args.key_id, secret.as_bytes())?,
        (None, None) => anyhow::bail!("give JWT_HS256_SECRET or JWT_ED25519_PRIVATE_KEY_FILE"),
    };
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        sub: args.sub,
        roles: args.roles,
        groups: Vec::new(),
        iss: args.issuer,
        aud: args.audience,
        exp: now + args.ttl,
        iat: now,
        nbf: None,
        jti: uuid::Uuid::now_v7().to_string(),
    };
    println!("{}", signer.sign(&claims)?);
    Ok(())
}
