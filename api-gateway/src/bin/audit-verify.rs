//! `audit-verify`: walks the gateway's audit chain and says whether it is intact.
//!
//! Exit status 0 when every row follows from the one before (and, with `--expect-head`, the
//! newest row's hash is the one recorded earlier), 1 when the chain is broken, 2 when the
//! database cannot be read. Prints the head hash: keep it somewhere else, since it is what
//! reveals rows deleted from the end.

use std::process::ExitCode;

use clap::Parser;
use secrecy::{ExposeSecret, SecretString};

/// Verifies the api-gateway's audit chain.
#[derive(Debug, Parser)]
#[command(name = "audit-verify", version)]
struct Args {
    /// The gateway's PostgreSQL.
    #[arg(long, env = "DATABASE_URL", value_parser = common::config::parse_secret, hide_env_values = true)]
    database_url: SecretString,
    /// A head hash recorded earlier: the chain must still end there or have grown past it.
    #[arg(long)]
    expect_head: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(args.database_url.expose_secret())
        .await
    {
        Ok(pool) => pool,
        Err(error) => {
            eprintln!(
                "cannot connect to {}: {error}",
                common::config::redact_url(args.database_url.expose_secret())
            );
            return ExitCode::from(2);
        }
    };
    let report = match api_gateway::audit::verify(&pool, args.expect_head.as_deref()).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("cannot read the audit log: {error}");
            return ExitCode::from(2);
        }
    };
    match report.broken {
        None => {
            println!("ok: {} rows, head {}", report.rows, report.head);
            ExitCode::SUCCESS
        }
        Some((seq, reason)) => {
            println!(
                "broken at row {seq}: {reason} ({} rows before it verify)",
                report.rows
            );
            ExitCode::from(1)
        }
    }
}
