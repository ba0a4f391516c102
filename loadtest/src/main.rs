//! `loadtest`: drives the suite's services and checks their stated targets.
//!
//! `loadtest <scenario> [--quick]` runs one scenario, prints a table of targets and
//! figures, writes `target/loadtest/<scenario>.json`, and exits non-zero when a stated
//! target is missed. `loadtest suite` runs every scenario. Service binaries are taken from
//! the loadtest binary's own folder, so build them first: `cargo build --release --bins`.

mod client;
mod database;
mod gateway;
mod metrics;
mod notify;
mod report;
mod scrape;
mod service;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use report::Report;

#[derive(Debug, Parser)]
#[command(name = "loadtest", about = "Load tests of the backend challenge suite")]
struct Cli {
    /// The short form CI runs (each scenario under a minute).
    #[arg(long, global = true)]
    quick: bool,
    /// Where the JSON reports go.
    #[arg(long, global = true, default_value = "target/loadtest")]
    out_dir: PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// metrics-processor: in-process and HTTP throughput, latency, memory, shutdown.
    Metrics,
    /// notification-server: 5,000 WebSocket connections, broadcasts, exactly-once delivery.
    Notify,
    /// api-gateway: throughput and added latency against nginx, one user's limit over two replicas.
    Gateway,
    /// Every scenario, one table.
    Suite,
    /// Internal: the memory soak, run in a child process so its RSS is measured alone.
    #[command(hide = true)]
    MetricsSoak,
    /// Internal: one client process of the notify cluster phase.
    #[command(hide = true)]
    NotifyClients {
        /// Notifier nodes, comma-separated `host:port`.
        #[arg(long, value_delimiter = ',')]
        servers: Vec<std::net::SocketAddr>,
        /// Index of the first connection.
        #[arg(long)]
        first: usize,
        /// Connections to open.
        #[arg(long)]
        count: usize,
        /// Users in the run (connection i is user i % users).
        #[arg(long)]
        users: usize,
    },
    /// Internal: the trivial upstream of the gateway scenario, in its own process.
    #[command(hide = true)]
    EchoUpstream {
        /// Address to listen on; port 0 picks a free port.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Scenario::MetricsSoak = cli.scenario {
        return match metrics::soak_child(cli.quick) {
            Ok(result) => {
                println!("{result}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("soak failed: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Scenario::NotifyClients {
        servers,
        first,
        count,
        users,
    } = &cli.scenario
    {
        return match notify::clients_child(servers.clone(), *first, *count, *users) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("notify clients failed: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Scenario::EchoUpstream { listen } = cli.scenario {
        return match gateway::echo_upstream(listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("echo upstream failed: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("failed to start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("a stated target was missed");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("loadtest failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<bool> {
    let reports: Vec<Report> = match cli.scenario {
        Scenario::Metrics => vec![metrics::run(cli.quick).await?],
        Scenario::Notify => vec![notify::run(cli.quick).await?],
        Scenario::Gateway => vec![gateway::run(cli.quick).await?],
        Scenario::Suite => vec![
            metrics::run(cli.quick).await?,
            notify::run(cli.quick).await?,
            gateway::run(cli.quick).await?,
        ],
        Scenario::MetricsSoak | Scenario::NotifyClients { .. } | Scenario::EchoUpstream { .. } => {
            unreachable!("handled before the runtime starts")
        }
    };
    for report in &reports {
        let path = report.write(&cli.out_dir)?;
        println!("wrote {}", path.display());
    }
    println!("\n{}", report::table(&reports));
    Ok(reports.iter().all(Report::passed))
}
