//! The analytics-repo binary: the service (`serve`) and the operator's commands (`seed`,
//! `query`, `maintain`, `archive`, `restore`).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use analytics_repo::{
    archive::Archiver,
    db::{self, DatabaseSettings},
    metrics::Metrics,
    partitions::Maintenance,
    repository::EventRepository,
    seed::{self, SeedSpec},
    startup::{self, Settings},
};
use chrono::{Months, NaiveDate, Utc};
use clap::{Parser, Subcommand};
use common::telemetry::TelemetrySettings;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "analytics-repo",
    version,
    about = "Tenant analytics on partitioned PostgreSQL: ingest, daily reports, archival"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The HTTP service (port 8087).
    Serve(Box<Settings>),
    /// Stores generated tenants and events through the repository, with a progress line.
    Seed {
        #[command(flatten)]
        database: DatabaseSettings,
        #[command(flatten)]
        spec: SeedSpec,
        #[command(flatten)]
        telemetry: TelemetrySettings,
    },
    /// Runs a report and prints its rows as JSON lines (the time on stderr).
    Query {
        #[command(flatten)]
        database: DatabaseSettings,
        #[command(subcommand)]
        report: Report,
        /// Runs it this many times over one pool, printing each run's time (the first pays
        /// for a fresh connection's catalog cache); the rows are printed once.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        repeat: u32,
        #[command(flatten)]
        telemetry: TelemetrySettings,
    },
    /// One round of maintenance: partitions made ahead, the default partition drained, the
    /// raw rows up to now rolled up.
    Maintain {
        #[command(flatten)]
        database: DatabaseSettings,
        /// Months of partitions made ahead.
        #[arg(long, default_value_t = 3)]
        months_ahead: u32,
        #[command(flatten)]
        telemetry: TelemetrySettings,
    },
    /// Archives every month older than the retention to the cold-storage directory,
    /// verified, then drops it; finishes what a killed run left half done.
    Archive {
        #[command(flatten)]
        database: DatabaseSettings,
        /// The cold-storage directory.
        #[arg(long, env = "ARCHIVE_DIR")]
        dir: PathBuf,
        /// Months kept in PostgreSQL; older ones are archived.
        #[arg(long, env = "RETENTION_MONTHS", default_value_t = 24)]
        retention_months: u32,
        #[command(flatten)]
        telemetry: TelemetrySettings,
    },
    /// Brings an archived month back, verified against the manifest.
    Restore {
        #[command(flatten)]
        database: DatabaseSettings,
        /// The cold-storage directory.
        #[arg(long, env = "ARCHIVE_DIR")]
        dir: PathBuf,
        /// The month, as YYYY-MM.
        #[arg(long, value_parser = parse_month)]
        month: NaiveDate,
        #[command(flatten)]
        telemetry: TelemetrySettings,
    },
}

#[derive(Debug, Subcommand)]
enum Report {
    /// Enterprise tenants' days from `--from`, through the rollups.
    EnterpriseDaily {
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        from: NaiveDate,
        /// Run the original query over raw rows instead.
        #[arg(long)]
        naive: bool,
    },
    /// One tenant's days.
    TenantDaily {
        /// The tenant.
        #[arg(long)]
        tenant: Uuid,
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        from: NaiveDate,
        /// Last day, YYYY-MM-DD.
        #[arg(long)]
        to: NaiveDate,
    },
}

fn parse_month(raw: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(&format!("{raw}-01"), "%Y-%m-%d")
        .map_err(|_| format!("`{raw}` is not a month such as 2024-01"))
}

/// The CLI's jobs run long: no statement timeout unless one is set explicitly.
fn batch_job(mut database: DatabaseSettings) -> DatabaseSettings {
    if std::env::var_os("STATEMENT_TIMEOUT").is_none() {
        database.statement_timeout = Duration::ZERO;
    }
    database
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(settings) => {
            common::telemetry::init(&settings.telemetry);
            startup::build(*settings)
                .await?
                .run_until_stopped(common::shutdown::signal())
                .await
        }
        Command::Seed {
            database,
            spec,
            telemetry,
        } => {
            common::telemetry::init(&telemetry);
            let repository = EventRepository::new(db::connect(&batch_job(database)).await?);
            let stored = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let progress = {
                let (stored, total) = (Arc::clone(&stored), spec.rows);
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        print_progress(stored.load(Ordering::Relaxed), total, started);
                    }
                })
            };
            let result = seed::seed(&repository, &spec, Arc::clone(&stored)).await;
            progress.abort();
            print_progress(stored.load(Ordering::Relaxed), spec.rows, started);
            eprintln!();
            result
        }
        Command::Query {
            database,
            report,
            repeat,
            telemetry,
        } => {
            common::telemetry::init(&telemetry);
            let repository = EventRepository::new(db::connect(&batch_job(database)).await?);
            let mut rows = Vec::new();
            for _ in 0..repeat {
                let started = Instant::now();
                rows = match report {
                    Report::EnterpriseDaily { from, naive: false } => {
                        repository.enterprise_report(from).await?
                    }
                    Report::EnterpriseDaily { from, naive: true } => {
                        repository.naive_enterprise_report(from).await?
                    }
                    Report::TenantDaily { tenant, from, to } => {
                        repository.tenant_daily(tenant, from, to).await?
                    }
                };
                let took = started.elapsed();
                eprintln!("{} rows in {:.1} ms", rows.len(), took.as_secs_f64() * 1e3);
            }
            for row in &rows {
                println!("{}", serde_json::to_string(row)?);
            }
            Ok(())
        }
        Command::Maintain {
            database,
            months_ahead,
            telemetry,
        } => {
            common::telemetry::init(&telemetry);
            let repository = EventRepository::new(db::connect(&batch_job(database)).await?);
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = Metrics::register(&mut registry);
            startup::maintain(&repository, Maintenance::default(), months_ahead, &metrics).await?;
            eprintln!("rolled up to {}", repository.rolled_up_to().await?);
            Ok(())
        }
        Command::Archive {
            database,
            dir,
            retention_months,
            telemetry,
        } => {
            common::telemetry::init(&telemetry);
            let pool = db::connect(&batch_job(database)).await?;
            let cutoff = Utc::now().date_naive() - Months::new(retention_months);
            let archived = Archiver::new(pool, dir, Maintenance::default())
                .archive_before(cutoff)
                .await?;
            for month in &archived {
                println!("{}", serde_json::to_string(month)?);
            }
            eprintln!("{} month(s) archived (before {cutoff})", archived.len());
            Ok(())
        }
        Command::Restore {
            database,
            dir,
            month,
            telemetry,
        } => {
            common::telemetry::init(&telemetry);
            let pool = db::connect(&batch_job(database)).await?;
            let restored = Archiver::new(pool, dir, Maintenance::default())
                .restore(month)
                .await?;
            println!("{}", serde_json::to_string(&restored)?);
            Ok(())
        }
    }
}

fn print_progress(done: u64, total: u64, started: Instant) {
    let share = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = (share * 30.0) as usize;
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
    eprint!(
        "\r[{}{}] {:>5.1}% {done}/{total} rows, {rate:.0} rows/s ",
        "#".repeat(filled),
        " ".repeat(30 - filled.min(30)),
        share * 100.0
    );
}
