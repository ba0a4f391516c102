//! `loadtest`: drives the suite's services and checks their stated targets.
//!
//! `loadtest <scenario> [--quick]` runs one scenario, prints a table of targets and
//! figures, writes `target/loadtest/<scenario>.json`, and exits non-zero when a stated
//! target is missed. `loadtest suite` runs every scenario. Service binaries are taken from
//! the loadtest binary's own folder, so build them first: `cargo build --release --bins`.
//!
//! Before any load, [`preflight`] checks what the chosen scenarios need. Each scenario's
//! report is written as soon as it ends; one that fails part-way records why in its report,
//! and the suite goes on with the next.
//!
//! # Layout
//! - [`preflight`]: the checks before any load; [`backends`]: PostgreSQL and Redis.
//! - [`metrics`], [`notify`], [`gateway`], [`orders`], [`analytics`]: one scenario each.
//! - [`report`]: targets, goals, figures, the JSON report and the table.
//! - [`scrape`]: services' histograms and the host's steal, and the quiet-stretch judgement.
//! - [`service`]: child processes; [`client`]: the raw HTTP/1.1 client; [`progress`]: the
//!   terminal's progress lines.

mod analytics;
mod backends;
mod client;
mod gateway;
mod metrics;
mod notify;
mod orders;
mod preflight;
mod progress;
mod report;
mod scrape;
mod service;

use std::{panic::AssertUnwindSafe, path::PathBuf, process::ExitCode};

use backends::Backend;
use clap::{Parser, Subcommand};
use futures_util::FutureExt;

use preflight::Needs;
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
    /// order-saga: create latency and sagas/s beside pgbench, 1,000 buyers of 10 units, and
    /// provider faults with a service killed mid-phase, ending with the invariants.
    Orders,
    /// analytics-repo: the seed's query against the rewritten report on the same data, ingest
    /// through the repository and HTTP with the report beside it, one old month archived and
    /// restored.
    Analytics,
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
            eprintln!("a stated target was missed, or a scenario stopped before its end");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("loadtest failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The scenarios a command runs, in order.
fn scenarios(scenario: &Scenario) -> Vec<Scenario> {
    match scenario {
        Scenario::Suite => vec![
            Scenario::Metrics,
            Scenario::Notify,
            Scenario::Gateway,
            Scenario::Orders,
            Scenario::Analytics,
        ],
        Scenario::Metrics => vec![Scenario::Metrics],
        Scenario::Notify => vec![Scenario::Notify],
        Scenario::Gateway => vec![Scenario::Gateway],
        Scenario::Orders => vec![Scenario::Orders],
        Scenario::Analytics => vec![Scenario::Analytics],
        Scenario::MetricsSoak | Scenario::NotifyClients { .. } | Scenario::EchoUpstream { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}

/// What a scenario needs before it starts.
fn needs(scenario: &Scenario, quick: bool) -> Needs {
    match scenario {
        Scenario::Metrics => Needs {
            scenario: "metrics",
            binaries: &["metrics-processor"],
            backends: &[],
            open_files: 256,
            nginx_peer: false,
        },
        Scenario::Notify => Needs {
            scenario: "notify",
            binaries: &["notification-server"],
            backends: &[Backend::Postgres, Backend::Redis],
            // The capacity phase holds 19,000 connections in one client process.
            open_files: if quick { 5_500 } else { 19_500 },
            nginx_peer: false,
        },
        Scenario::Gateway => Needs {
            scenario: "gateway",
            binaries: &["api-gateway"],
            backends: &[Backend::Postgres, Backend::Redis],
            open_files: 1_024,
            nginx_peer: true,
        },
        Scenario::Orders => Needs {
            scenario: "orders",
            binaries: &["order-saga"],
            backends: &[Backend::Postgres, Backend::Redis],
            // The oversell phase's 1,000 buyers each hold a connection.
            open_files: 2_048,
            nginx_peer: false,
        },
        Scenario::Analytics => Needs {
            scenario: "analytics",
            binaries: &["analytics-repo"],
            backends: &[Backend::Postgres, Backend::Redis],
            open_files: 256,
            nginx_peer: false,
        },
        _ => unreachable!("only scenarios have needs"),
    }
}

async fn run(cli: &Cli) -> anyhow::Result<bool> {
    let scenarios = scenarios(&cli.scenario);
    let needs: Vec<Needs> = scenarios.iter().map(|s| needs(s, cli.quick)).collect();
    preflight::check(&needs, &cli.out_dir).await?;
    let mut reports = Vec::new();
    for (scenario, needs) in scenarios.iter().zip(&needs) {
        let mut report = Report::new(needs.scenario, cli.quick);
        let outcome = match scenario {
            Scenario::Metrics => {
                AssertUnwindSafe(metrics::run(&mut report, cli.quick))
                    .catch_unwind()
                    .await
            }
            Scenario::Notify => {
                AssertUnwindSafe(notify::run(&mut report, cli.quick))
                    .catch_unwind()
                    .await
            }
            Scenario::Gateway => {
                AssertUnwindSafe(gateway::run(&mut report, cli.quick))
                    .catch_unwind()
                    .await
            }
            Scenario::Orders => {
                AssertUnwindSafe(orders::run(&mut report, cli.quick))
                    .catch_unwind()
                    .await
            }
            Scenario::Analytics => {
                AssertUnwindSafe(analytics::run(&mut report, cli.quick))
                    .catch_unwind()
                    .await
            }
            _ => unreachable!("only scenarios are run"),
        };
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(format!("{error:#}")),
            Err(panic) => Some(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            )),
        };
        if let Some(error) = error {
            eprintln!("{}: stopped before its end: {error}", needs.scenario);
            report.error = Some(error);
        }
        let path = report.write(&cli.out_dir)?;
        println!("wrote {}", path.display());
        reports.push(report);
    }
    println!("\n{}", report::table(&reports));
    Ok(reports.iter().all(Report::passed))
}
