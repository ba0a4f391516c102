//! The two operator commands that are not one service: `all`, every process of the system
//! in one for local trials, and `dead-letters`, listing and replaying dead letters.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use common::config::parse_secret;
use secrecy::{ExposeSecret as _, SecretString};

use crate::{bus::dead_letters, messages::Service};

/// `order-saga all`: every service and the provider in one process.
#[derive(Debug, Clone, Args)]
pub struct AllSettings {
    /// PostgreSQL; each service keeps its own schema in it.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_secret, hide_env_values = true)]
    pub database_url: SecretString,
    /// Redis, carrying the streams.
    #[arg(long, env = "REDIS_URL", value_parser = parse_secret, hide_env_values = true)]
    pub redis_url: SecretString,
    /// Prefix of the stream names.
    #[arg(long, env = "STREAM_PREFIX", default_value = "saga")]
    pub stream_prefix: String,
    /// Where the orders service listens.
    #[arg(long, default_value = "127.0.0.1:8083")]
    pub orders_listen: SocketAddr,
    /// Where the inventory service listens.
    #[arg(long, default_value = "127.0.0.1:8084")]
    pub inventory_listen: SocketAddr,
    /// Where the payment service listens.
    #[arg(long, default_value = "127.0.0.1:8085")]
    pub payment_listen: SocketAddr,
    /// Where the shipping service listens.
    #[arg(long, default_value = "127.0.0.1:8086")]
    pub shipping_listen: SocketAddr,
    /// Where the fake payment provider listens.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub provider_listen: SocketAddr,
}

impl AllSettings {
    /// Settings of one service as its own command line would give them: `--listen`, the
    /// backends and the prefix from here, `extra` on top, the rest at their defaults.
    pub fn service<T: Parser>(
        &self,
        name: &str,
        listen: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<T> {
        let mut args = vec![
            name.to_owned(),
            "--listen".into(),
            listen.to_string(),
            "--database-url".into(),
            self.database_url.expose_secret().to_owned(),
            "--redis-url".into(),
            self.redis_url.expose_secret().to_owned(),
            "--stream-prefix".into(),
            self.stream_prefix.clone(),
        ];
        args.extend_from_slice(extra);
        T::try_parse_from(args).with_context(|| format!("bad settings for {name}"))
    }
}

/// `order-saga dead-letters`.
#[derive(Debug, Clone, Subcommand)]
pub enum DeadLetterCommand {
    /// Prints the dead letters of a service's stream, oldest first, as JSON lines.
    List(DeadLetterArgs),
    /// Puts dead letters back on their stream (one with `--id`, else all).
    Replay(DeadLetterArgs),
}

/// Which dead letters.
#[derive(Debug, Clone, Args)]
pub struct DeadLetterArgs {
    /// Redis.
    #[arg(long, env = "REDIS_URL", value_parser = parse_secret, hide_env_values = true)]
    pub redis_url: SecretString,
    /// Prefix of the stream names.
    #[arg(long, env = "STREAM_PREFIX", default_value = "saga")]
    pub stream_prefix: String,
    /// The service whose stream: orders, inventory, payment or shipping.
    #[arg(long, value_parser = ["orders", "inventory", "payment", "shipping"])]
    pub service: String,
    /// One dead letter's id (as listed).
    #[arg(long)]
    pub id: Option<String>,
    /// Most dead letters listed.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// Runs a dead-letter command, printing to stdout.
pub async fn dead_letter_command(command: DeadLetterCommand) -> anyhow::Result<()> {
    let (args, replay) = match command {
        DeadLetterCommand::List(args) => (args, false),
        DeadLetterCommand::Replay(args) => (args, true),
    };
    let service = Service::ALL
        .into_iter()
        .find(|s| s.as_str() == args.service)
        .context("unknown service")?;
    let stream = service.stream(&args.stream_prefix);
    let client =
        redis::Client::open(args.redis_url.expose_secret()).context("invalid REDIS_URL")?;
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .context("cannot connect to Redis")?;
    if replay {
        let replayed = dead_letters::replay(&mut redis, &stream, args.id.as_deref()).await?;
        println!(
            "{}",
            serde_json::json!({ "stream": stream, "replayed": replayed })
        );
    } else {
        for letter in dead_letters::list(&mut redis, &stream, args.limit).await? {
            println!("{}", serde_json::to_string(&letter)?);
        }
    }
    Ok(())
}
