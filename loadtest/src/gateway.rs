//! api-gateway: JWT-authenticated load through the gateway to a trivial upstream, compared in
//! the same run with the same load sent straight to the upstream and through nginx's
//! `proxy_pass`; then two replicas sharing Redis, and one user over quota.
//!
//! Processes: the echo upstream (`loadtest echo-upstream`, a child so its CPU is apart from
//! the generator's), nginx (`loadtest/nginx.conf`), and the release gateway on a fresh
//! database, with Redis and a route file mounting the upstream at `/api/orders` for role
//! `user`. Every request carries a bearer token; the users rotate over [`USERS`] so that no
//! one nears the per-user limit while speed is measured. Each target gets the same load:
//!
//! - closed loop: [`CONNECTIONS`] keep-alive connections back to back → requests/s;
//! - open loop: one fixed rate for all three (half the slowest closed-loop rate) → latency.
//!   A request held back because the previous answer on its connection was late is timed
//!   from when it was due (coordinated omission); one only sent late because the 1 ms timer
//!   woke late, on a free connection, is timed from when it was written.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use axum::{Router, http::header, routing::get, serve::ListenerExt};
use hdrhistogram::Histogram;
use test_support::access_token::AccessToken;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
    task::JoinSet,
};

use crate::{
    backends::{self, Database},
    client::{self, Connection},
    progress::Progress,
    report::{Report, Target},
    scrape,
    service::{CpuTime, Process, Service, cpu_seconds_of},
};

const PRIVATE_KEY: &[u8] = include_bytes!("../../common/tests/fixtures/ed25519-private.pem");
const NGINX_CONF: &str = include_str!("../nginx.conf");
const KID: &str = "loadtest";
/// What the echo upstream answers on every path but `/healthz`.
const UPSTREAM_BODY: &str = r#"{"id":1,"status":"shipped","items":3}"#;
/// Keep-alive connections per target in the speed phases.
const CONNECTIONS: usize = 64;
/// Users whose tokens the speed phases rotate through: a full run sends each well under a
/// hundred requests, far from the per-user limit.
const USERS: usize = 4_000;
/// The gateway's default per-user quota (gateway.toml), written into the route file.
const USER_LIMIT: u64 = 1_000;
/// The over-quota user's requests, and how many connections send them.
const LIMITER_REQUESTS: usize = 3_000;
const LIMITER_CONNECTIONS: usize = 32;
/// The open loop's rate, as a share of the slowest target's closed-loop rate.
const OPEN_LOOP_SHARE: f64 = 0.5;
/// Left out of the open loop's latency histogram.
const WARM_UP: Duration = Duration::from_millis(500);

/// The three ways the same load is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct,
    Nginx,
    Gateway,
}

impl Via {
    const ALL: [Self; 3] = [Self::Direct, Self::Nginx, Self::Gateway];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Nginx => "nginx",
            Self::Gateway => "gateway",
        }
    }

    /// The request path: the upstream itself has no `/api/orders` mount.
    fn path(self) -> &'static str {
        match self {
            Self::Direct => "/1",
            Self::Nginx | Self::Gateway => "/api/orders/1",
        }
    }
}

/// How to get the comparison peer, for the report when it is missing.
pub const NGINX_MISSING: &str = "nginx is not installed, so the comparison with nginx's \
    proxy_pass was not measured; install it as root (apt-get install nginx-light) and run \
    `loadtest gateway` again";

/// Runs the scenario into `report`; without nginx (see [`nginx_binary`]), the goals that
/// compare with it are reported as not measured and everything else is measured.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let nginx = nginx_binary();
    let redis_url = backends::redis_url();
    let redis = backends::redis_connection(&redis_url).await?;
    let dir = std::env::temp_dir().join(format!("loadtest-gateway-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let database = Database::create("gateway").await?;
    let result = phases(
        report,
        quick,
        nginx.as_deref(),
        &redis_url,
        redis,
        &dir,
        &database,
    )
    .await;
    database.drop_it().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn phases(
    report: &mut Report,
    quick: bool,
    nginx_binary: Option<&Path>,
    redis_url: &str,
    redis: redis::aio::MultiplexedConnection,
    dir: &Path,
    database: &Database,
) -> anyhow::Result<()> {
    let phase = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let (upstream, upstream_address) = start_upstream().await?;
    let nginx = match nginx_binary {
        Some(binary) => Some(start_nginx(binary, dir, &upstream_address).await?),
        None => {
            println!("gateway: {NGINX_MISSING}");
            None
        }
    };
    let gateway_env = GatewayEnv::write(dir, database, redis_url, &upstream_address)?;
    let gateway = gateway_env.start().await?;
    wait_ready(&gateway.address).await?;
    report.figure("proxy_worker_threads", workers());
    report.figure("connections", CONNECTIONS);
    report.figure("users", USERS);
    report.figure("phase_seconds", phase.as_secs_f64());
    report.figure("stall_threshold_ms", STALL.as_secs_f64() * 1e3);

    let mut rig = Rig {
        tokens: (0..USERS)
            .map(|u| token(&format!("loadtest-user-{u}")))
            .collect(),
        upstream: (upstream, upstream_address),
        nginx,
        gateway,
        redis,
    };
    rig.warm_up().await?;
    let closed = closed_loop(report, &mut rig, phase).await?;
    let open = open_loop(report, &rig, &closed, phase).await?;
    compare(report, &rig, &closed, &open);

    // Two replicas, one Redis: one user's 3,000 requests, alternating between them.
    let second = gateway_env.start().await?;
    wait_ready(&second.address).await?;
    let user = format!("loadtest-limited-{}", uuid::Uuid::now_v7().simple());
    limiter_phase(
        report,
        [&rig.gateway.address, &second.address],
        &token(&user),
    )
    .await?;

    second.terminate(Duration::from_secs(10)).await?;
    rig.stop().await
}

/// The three paths the same load takes, and what runs them.
struct Rig {
    /// One token per user the speed phases rotate through.
    tokens: Vec<String>,
    upstream: (Process, String),
    /// nginx and its address, when installed.
    nginx: Option<(Process, String)>,
    gateway: Service,
    /// For Redis's CPU time.
    redis: redis::aio::MultiplexedConnection,
}

impl Rig {
    /// The paths this run measures: nginx's only when it is installed.
    fn paths(&self) -> Vec<Via> {
        Via::ALL
            .into_iter()
            .filter(|path| *path != Via::Nginx || self.nginx.is_some())
            .collect()
    }

    fn address(&self, path: Via) -> &str {
        match path {
            Via::Direct => &self.upstream.1,
            Via::Nginx => self.nginx.as_ref().map_or("", |(_, address)| address),
            Via::Gateway => &self.gateway.address,
        }
    }

    /// One request per token along `path`.
    fn requests(&self, path: Via) -> Arc<Vec<Vec<u8>>> {
        Arc::new(
            self.tokens
                .iter()
                .map(|t| client::authorized("GET", path.path(), t, None))
                .collect(),
        )
    }

    /// Every token once through every path: the gateway's token cache, nginx's upstream
    /// keep-alive pool and every process's allocator are warm before anything is timed.
    async fn warm_up(&self) -> anyhow::Result<()> {
        for path in self.paths() {
            send_all(self.address(path), self.requests(path), CONNECTIONS)
                .await
                .with_context(|| format!("warm-up through {} failed", path.name()))?;
        }
        Ok(())
    }

    /// Sends the load along `path` for `phase` ([`drive`]: at `rate` when given, back to back
    /// otherwise), and records where its tail came from.
    async fn drive(
        &self,
        report: &mut Report,
        path: Via,
        rate: Option<f64>,
        phase: Duration,
    ) -> anyhow::Result<Outcome> {
        let label = match rate {
            None => format!("{}_closed_loop", path.name()),
            Some(_) => format!("{}_open_loop", path.name()),
        };
        let inside = Inside::take(path, &self.gateway).await;
        let progress = Progress::start(format!("gateway: {label}"), phase, None);
        let outcome = drive(
            self.address(path),
            self.requests(path),
            CONNECTIONS,
            rate,
            phase,
        )
        .await?;
        drop(progress);
        Inside::take(path, &self.gateway)
            .await
            .record_since(report, &inside, &label);
        Ok(outcome)
    }

    async fn cpu(&mut self) -> CpuSnapshot {
        CpuSnapshot::take(
            &self.upstream.0,
            self.nginx.as_ref().map(|(process, _)| process),
            &self.gateway,
            &mut self.redis,
        )
        .await
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.gateway.terminate(Duration::from_secs(10)).await?;
        if let Some((nginx, _)) = self.nginx {
            nginx.terminate(Duration::from_secs(5)).await?;
        }
        self.upstream.0.terminate(Duration::from_secs(5)).await?;
        Ok(())
    }
}

/// Per path (indexed by `Via as usize`; NaN where not measured).
type PerPath = [f64; 3];

/// What the closed loop measured.
struct ClosedLoop {
    throughput: PerPath,
    errors: u64,
}

/// Closed loop: how many requests each path carries, and where the CPU went.
async fn closed_loop(
    report: &mut Report,
    rig: &mut Rig,
    phase: Duration,
) -> anyhow::Result<ClosedLoop> {
    let mut errors = 0u64;
    let mut throughput = [f64::NAN; 3];
    let mut cpu = [PhaseCpu::default(); 3];
    for path in rig.paths() {
        let (i, name) = (path as usize, path.name());
        let before = rig.cpu().await;
        let outcome = rig.drive(report, path, None, phase).await?;
        let after = rig.cpu().await;
        let rate = outcome.ok as f64 / outcome.elapsed.as_secs_f64();
        throughput[i] = rate;
        println!(
            "gateway: closed loop via {name}: {rate:.0} requests/s, {} errors",
            outcome.errors
        );
        report.figure(&format!("{name}_requests_per_second"), rate.round());
        report.figure(&format!("{name}_closed_loop_errors"), outcome.errors);
        report.latency_figures(&format!("{name}_closed_loop_latency"), &outcome.latency_us);
        cpu[i] = after.record_since(report, &before, path, outcome.ok);
        errors += outcome.errors;
        if let Some(error) = &outcome.first_error {
            report.figure(&format!("{name}_closed_loop_first_error"), error.as_str());
        }
    }
    if rig.nginx.is_some() {
        cpu_ceiling(report, cpu[Via::Nginx as usize], cpu[Via::Gateway as usize]);
    }
    Ok(ClosedLoop { throughput, errors })
}

/// What the open loop measured.
struct OpenLoop {
    p50: PerPath,
    p99: PerPath,
    errors: u64,
}

/// Open loop: the same rate for every path, half the slowest one's capacity; latency.
async fn open_loop(
    report: &mut Report,
    rig: &Rig,
    closed: &ClosedLoop,
    phase: Duration,
) -> anyhow::Result<OpenLoop> {
    let paths = rig.paths();
    let slowest = paths
        .iter()
        .map(|path| closed.throughput[*path as usize])
        .fold(f64::INFINITY, f64::min);
    let rate = (slowest * OPEN_LOOP_SHARE).floor().max(100.0);
    report.figure("open_loop_requests_per_second", rate);
    let mut open = OpenLoop {
        p50: [f64::NAN; 3],
        p99: [f64::NAN; 3],
        errors: 0,
    };
    for path in paths {
        let (i, name) = (path as usize, path.name());
        let outcome = rig.drive(report, path, Some(rate), phase).await?;
        let ms = |q: f64| outcome.latency_us.value_at_quantile(q) as f64 / 1e3;
        (open.p50[i], open.p99[i]) = (ms(0.5), ms(0.99));
        println!(
            "gateway: open loop via {name} at {rate:.0}/s: p50 {:.3} ms, p99 {:.3} ms, {} errors",
            open.p50[i], open.p99[i], outcome.errors
        );
        report.latency_figures(&format!("{name}_latency"), &outcome.latency_us);
        report.figure(
            &format!("{name}_latency_stalls"),
            over(&outcome.latency_us, STALL),
        );
        report.figure(
            &format!("{name}_open_loop_achieved_per_second"),
            (outcome.ok as f64 / outcome.elapsed.as_secs_f64()).round(),
        );
        report.figure(&format!("{name}_open_loop_errors"), outcome.errors);
        open.errors += outcome.errors;
        if let Some(error) = &outcome.first_error {
            report.figure(&format!("{name}_open_loop_first_error"), error.as_str());
        }
    }
    Ok(open)
}

/// The stated target of no errors, the latency each proxy adds, and the goals against nginx
/// (not measured without it).
fn compare(report: &mut Report, rig: &Rig, closed: &ClosedLoop, open: &OpenLoop) {
    let [direct, via_nginx, via_gateway] = Via::ALL.map(|path| path as usize);
    let (p50, p99) = (open.p50, open.p99);
    report.figure(
        "gateway_added_latency_p50_ms",
        p50[via_gateway] - p50[direct],
    );
    report.figure(
        "gateway_added_latency_p99_ms",
        p99[via_gateway] - p99[direct],
    );
    report.targets.push(Target::at_most(
        "speed_phase_errors",
        0.0,
        (closed.errors + open.errors) as f64,
        "requests",
    ));
    if rig.nginx.is_none() {
        for (name, required) in [
            ("gateway_vs_nginx_throughput", ">= 0.8"),
            ("gateway_vs_nginx_p99", "<= 1.5"),
        ] {
            report
                .goals
                .push(Target::not_measured(name, required, "ratio", NGINX_MISSING));
        }
        return;
    }
    report.figure("nginx_added_latency_p50_ms", p50[via_nginx] - p50[direct]);
    report.figure("nginx_added_latency_p99_ms", p99[via_nginx] - p99[direct]);
    report.goals.push(Target::at_least(
        "gateway_vs_nginx_throughput",
        0.8,
        closed.throughput[via_gateway] / closed.throughput[via_nginx],
        "ratio",
    ));
    report.goals.push(Target::at_most(
        "gateway_vs_nginx_p99",
        1.5,
        p99[via_gateway] / p99[via_nginx],
        "ratio",
    ));
}

/// What the closed-loop phases' CPU says of the throughput goal. Every process of the run
/// shares the machine's cores and each phase keeps them busy, so each path's throughput is
/// about the cores over the CPU that all processes spend per request. Two figures follow:
///
/// - `gateway_vs_nginx_cpu_ratio`: nginx's path's CPU per request over the gateway's, which
///   the measured throughput ratio should match if the model holds (the check on the model);
/// - `gateway_vs_nginx_throughput_ceiling`: the ratio if the gateway's own code (its user
///   time) cost no more than nginx's, with everything else as measured: the kernel's work for
///   the gateway's sockets, Redis's decisions, the generator and the upstream. No rewrite of
///   the gateway's code alone goes past it.
fn cpu_ceiling(report: &mut Report, nginx: PhaseCpu, gateway: PhaseCpu) {
    let model = nginx.total / gateway.total;
    let ceiling = nginx.total / (gateway.total - gateway.proxy.user + nginx.proxy.user);
    report.figure("gateway_vs_nginx_cpu_ratio", model);
    report.figure("gateway_vs_nginx_throughput_ceiling", ceiling);
    println!(
        "gateway: CPU per request, all processes: {:.1} µs via nginx (nginx {:.1} user + {:.1} \
         system), {:.1} µs via the gateway (gateway {:.1} user + {:.1} system, Redis {:.1}); \
         ratio {model:.3}; with nginx's user time the gateway would reach {ceiling:.3}",
        nginx.total,
        nginx.proxy.user,
        nginx.proxy.system,
        gateway.total,
        gateway.proxy.user,
        gateway.proxy.system,
        gateway.redis,
    );
}

/// One user sends [`LIMITER_REQUESTS`] over both replicas at once; exactly the quota passes.
async fn limiter_phase(
    report: &mut Report,
    replicas: [&str; 2],
    token: &str,
) -> anyhow::Result<()> {
    let request = Arc::new(client::authorized("GET", Via::Gateway.path(), token, None));
    let next = Arc::new(AtomicUsize::new(0));
    let mut connections = Vec::with_capacity(LIMITER_CONNECTIONS);
    for c in 0..LIMITER_CONNECTIONS {
        connections.push((c % 2, Connection::open(replicas[c % 2]).await?));
    }
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (replica, mut connection) in connections {
        let (request, next) = (Arc::clone(&request), Arc::clone(&next));
        tasks.spawn(async move {
            let mut counts = LimiterCounts::default();
            while next.fetch_add(1, Ordering::Relaxed) < LIMITER_REQUESTS {
                let (status, _) = connection.send(&request).await?;
                match status {
                    200 => counts.admitted[replica] += 1,
                    429 => {
                        counts.refused += 1;
                        if connection.header("retry-after").is_none() {
                            counts.without_retry_after += 1;
                        }
                    }
                    _ => counts.other += 1,
                }
            }
            anyhow::Ok(counts)
        });
    }
    let mut total = LimiterCounts::default();
    while let Some(counts) = tasks.join_next().await {
        let counts = counts??;
        total.admitted[0] += counts.admitted[0];
        total.admitted[1] += counts.admitted[1];
        total.refused += counts.refused;
        total.without_retry_after += counts.without_retry_after;
        total.other += counts.other;
    }
    let seconds = started.elapsed().as_secs_f64();
    let admitted = total.admitted[0] + total.admitted[1];
    println!(
        "gateway: one user, {LIMITER_REQUESTS} requests over two replicas in {seconds:.2} s: \
         {admitted} admitted ({} + {}), {} refused with 429",
        total.admitted[0], total.admitted[1], total.refused
    );
    report.figure("limiter_seconds", seconds);
    report.figure("limiter_admitted_replica_1", total.admitted[0]);
    report.figure("limiter_admitted_replica_2", total.admitted[1]);
    report.targets.push(Target::exactly(
        "limiter_admitted_of_3000",
        USER_LIMIT,
        admitted,
        "requests",
    ));
    report.targets.push(Target::exactly(
        "limiter_refused_with_429",
        LIMITER_REQUESTS as u64 - USER_LIMIT,
        total.refused,
        "requests",
    ));
    report.targets.push(Target::at_most(
        "limiter_429_without_retry_after",
        0.0,
        total.without_retry_after as f64,
        "requests",
    ));
    report.targets.push(Target::at_most(
        "limiter_other_statuses",
        0.0,
        total.other as f64,
        "requests",
    ));
    report
        .targets
        .push(Target::below("limiter_phase_seconds", 60.0, seconds, "s"));
    Ok(())
}

#[derive(Debug, Default)]
struct LimiterCounts {
    admitted: [u64; 2],
    refused: u64,
    without_retry_after: u64,
    other: u64,
}

/// A target that passes only on the exact count.
/// An access token the gateway accepts, for role `user`, valid for an hour.
fn token(sub: &str) -> String {
    AccessToken::new(sub, &["user"])
        .key_id(KID)
        .valid_for(Duration::from_secs(3_600))
        .sign()
}

/// What one phase against one path achieved.
struct Outcome {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latency_us: Histogram<u64>,
    elapsed: Duration,
}

/// `connections` clients sending `requests` in turn for `duration`: on a fixed schedule of
/// `rate` requests/s in all when given, back to back otherwise. Any answer but a 2xx is an
/// error; a connection that fails is opened again.
async fn drive(
    address: &str,
    requests: Arc<Vec<Vec<u8>>>,
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let mut opened = Vec::with_capacity(connections);
    for _ in 0..connections {
        opened.push(Connection::open(address).await?);
    }
    let started = Instant::now();
    let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
    let mut tasks = JoinSet::new();
    for (c, mut connection) in opened.into_iter().enumerate() {
        let requests = Arc::clone(&requests);
        let address = address.to_owned();
        tasks.spawn(async move {
            let mut outcome = Outcome {
                ok: 0,
                errors: 0,
                first_error: None,
                latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
                elapsed: Duration::ZERO,
            };
            let first = tokio::time::Instant::now()
                + interval.map_or(Duration::ZERO, |i| i.mul_f64(c as f64 / connections as f64));
            let mut previous_done = tokio::time::Instant::now();
            let mut k = 0usize;
            while started.elapsed() < duration {
                let scheduled = interval.map(|interval| first + interval * k as u32);
                if let Some(scheduled) = scheduled {
                    tokio::time::sleep_until(scheduled).await;
                }
                let start = match scheduled {
                    Some(scheduled) if previous_done > scheduled => scheduled,
                    _ => tokio::time::Instant::now(),
                };
                let request = &requests[(k * connections + c) % requests.len()];
                let failure = match connection.send(request).await {
                    Ok((200..=299, _)) => None,
                    Ok((status, body)) => Some(format!(
                        "status {status}: {}",
                        String::from_utf8_lossy(&body)
                    )),
                    Err(error) => {
                        let failure = format!("{error:#}");
                        match Connection::open(&address).await {
                            Ok(fresh) => connection = fresh,
                            Err(_) => {
                                outcome.errors += 1;
                                outcome.first_error.get_or_insert(failure);
                                break;
                            }
                        }
                        Some(failure)
                    }
                };
                previous_done = tokio::time::Instant::now();
                match failure {
                    None => outcome.ok += 1,
                    Some(failure) => {
                        outcome.errors += 1;
                        outcome.first_error.get_or_insert(failure);
                    }
                }
                if rate.is_none() || started.elapsed() >= WARM_UP {
                    let us = (previous_done - start).as_micros().max(1) as u64;
                    outcome.latency_us.saturating_record(us);
                }
                k += 1;
            }
            outcome
        });
    }
    let mut total = Outcome {
        ok: 0,
        errors: 0,
        first_error: None,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        elapsed: Duration::ZERO,
    };
    while let Some(outcome) = tasks.join_next().await {
        let outcome = outcome?;
        total.ok += outcome.ok;
        total.errors += outcome.errors;
        total.first_error = total.first_error.or(outcome.first_error);
        total.latency_us.add(&outcome.latency_us)?;
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// Sends every request once over `parallel` connections; anything but a 2xx is an error.
async fn send_all(
    address: &str,
    requests: Arc<Vec<Vec<u8>>>,
    parallel: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..parallel {
        let (requests, next) = (Arc::clone(&requests), Arc::clone(&next));
        let address = address.to_owned();
        tasks.spawn(async move {
            let mut connection = Connection::open(&address).await?;
            loop {
                let Some(request) = requests.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return anyhow::Ok(());
                };
                let (status, body) = connection.send(request).await?;
                if !(200..300).contains(&status) {
                    bail!("status {status}: {}", String::from_utf8_lossy(&body));
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}

/// A response slower than this counts as a stall in the figures that attribute the tail: it
/// is a bound of the gateway's latency histograms (50 µs doubled eight times).
const STALL: Duration = Duration::from_micros(12_800);
/// The gateway's latency histograms, by the name their figures take.
const GATEWAY_HISTOGRAMS: [(&str, &str); 3] = [
    // From the request to the response head, inside the gateway's handler.
    ("handler", "api_gateway_http_request_duration_seconds"),
    // One rate-limit decision in Redis, the wait for its batch included.
    ("redis", "api_gateway_limiter_redis_seconds"),
    // From sending the request upstream to its response head.
    ("upstream", "api_gateway_upstream_request_seconds"),
];

/// Responses of `histogram` (µs) slower than `limit`.
fn over(histogram: &Histogram<u64>, limit: Duration) -> u64 {
    let limit = limit.as_micros() as u64;
    histogram.len() - histogram.count_between(0, limit)
}

/// Where a phase's tail came from: the host's steal for every path, and for the gateway its
/// own latency histograms. A stall the client saw that the handler did not see waited outside
/// it (kernel, runtime queue, client); one in the `redis` or `upstream` histogram waited there.
struct Inside {
    ticks: Option<(u64, u64)>,
    gateway: Option<std::collections::BTreeMap<String, scrape::Buckets>>,
}

impl Inside {
    async fn take(path: Via, gateway: &Service) -> Self {
        let histograms = match (path, &gateway.admin) {
            (Via::Gateway, Some(admin)) => match scrape::metrics(admin).await {
                Ok(histograms) => Some(histograms),
                Err(error) => {
                    eprintln!("gateway: no histograms for this phase: {error:#}");
                    None
                }
            },
            _ => None,
        };
        Self {
            ticks: scrape::cpu_ticks(),
            gateway: histograms,
        }
    }

    /// Records `{phase}_steal_percent`, and for the gateway each histogram's p99 (as the
    /// bound of its bucket) and how many of its observations were stalls (over [`STALL`]).
    fn record_since(&self, report: &mut Report, before: &Self, phase: &str) {
        let steal = scrape::steal_percent(before.ticks, self.ticks);
        report.figure(&format!("{phase}_steal_percent"), steal);
        let (Some(now), Some(then)) = (&self.gateway, &before.gateway) else {
            return;
        };
        let mut summary = Vec::new();
        for (short, family) in GATEWAY_HISTOGRAMS {
            let (Some(now), Some(then)) = (now.get(family), then.get(family)) else {
                continue;
            };
            let phase_buckets = now.since(then);
            let p99 = phase_buckets.quantile_bound(0.99).map(|s| s * 1e3);
            let stalls = phase_buckets.above(STALL.as_secs_f64());
            report.figure(&format!("{phase}_{short}_p99_bound_ms"), p99);
            report.figure(&format!("{phase}_{short}_stalls"), stalls);
            summary.push(format!(
                "{short} p99 <= {} ms, {} over {} ms",
                p99.map_or("-".into(), |p| format!("{p}")),
                stalls.map_or("-".into(), |s| s.to_string()),
                STALL.as_secs_f64() * 1e3,
            ));
        }
        println!(
            "gateway: {phase} inside the gateway: {}; host steal {steal:.1} %",
            summary.join(", ")
        );
    }
}

/// CPU seconds used so far by every process of the run; the proxies' user and system apart.
struct CpuSnapshot {
    upstream: f64,
    nginx: CpuTime,
    gateway: CpuTime,
    generator: f64,
    redis: Option<f64>,
}

/// Where one closed-loop phase's CPU went, per request (µs).
#[derive(Debug, Clone, Copy, Default)]
struct PhaseCpu {
    /// Every process of the run: generator, upstream, proxy and Redis.
    total: f64,
    /// The proxy's own code (user time), and the kernel's work on its behalf.
    proxy: CpuTime,
    redis: f64,
}

impl CpuSnapshot {
    async fn take(
        upstream: &Process,
        nginx: Option<&Process>,
        gateway: &Service,
        redis: &mut redis::aio::MultiplexedConnection,
    ) -> Self {
        Self {
            upstream: upstream.cpu_time().total(),
            nginx: nginx.map(Process::cpu_time).unwrap_or_default(),
            gateway: gateway.cpu_time().unwrap_or(CpuTime {
                user: f64::NAN,
                system: f64::NAN,
            }),
            generator: cpu_seconds_of("/proc/self/stat").unwrap_or(f64::NAN),
            redis: redis_cpu_seconds(redis).await,
        }
    }

    /// Records where the CPU went between `before` and now, while `path` carried `requests`,
    /// and returns it per request.
    fn record_since(
        &self,
        report: &mut Report,
        before: &Self,
        path: Via,
        requests: u64,
    ) -> PhaseCpu {
        let name = path.name();
        let proxy = match path {
            Via::Direct => None,
            Via::Nginx => Some(self.nginx - before.nginx),
            Via::Gateway => Some(self.gateway - before.gateway),
        };
        let upstream = self.upstream - before.upstream;
        let generator = self.generator - before.generator;
        report.figure(&format!("{name}_cpu_seconds_upstream"), upstream);
        report.figure(&format!("{name}_cpu_seconds_generator"), generator);
        let redis = match (self.redis, before.redis) {
            (Some(now), Some(then)) => {
                report.figure(&format!("{name}_cpu_seconds_redis"), now - then);
                now - then
            }
            _ => 0.0,
        };
        let per_request = |seconds: f64| seconds / requests.max(1) as f64 * 1e6;
        let proxy = proxy.unwrap_or_default();
        if path != Via::Direct {
            report.figure(&format!("{name}_cpu_seconds_proxy"), proxy.total());
            report.figure(
                &format!("{name}_proxy_cpu_us_per_request"),
                per_request(proxy.total()),
            );
            report.figure(
                &format!("{name}_proxy_user_cpu_us_per_request"),
                per_request(proxy.user),
            );
            report.figure(
                &format!("{name}_proxy_system_cpu_us_per_request"),
                per_request(proxy.system),
            );
        }
        let cpu = PhaseCpu {
            total: per_request(upstream + generator + proxy.total() + redis),
            proxy: CpuTime {
                user: per_request(proxy.user),
                system: per_request(proxy.system),
            },
            redis: per_request(redis),
        };
        report.figure(&format!("{name}_all_cpu_us_per_request"), cpu.total);
        cpu
    }
}

/// The proxies' parallelism: the gateway's tokio runtime has one worker thread per core, and
/// nginx gets as many worker processes.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// `loadtest echo-upstream`: answers every path with [`UPSTREAM_BODY`] (with its
/// Content-Length) and `/healthz` with `ok`. Prints `listening <addr>` once bound.
pub fn echo_upstream(listen: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("failed to bind {listen}"))?;
        println!("listening {}", listener.local_addr()?);
        let router = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .fallback(|| async { ([(header::CONTENT_TYPE, "application/json")], UPSTREAM_BODY) });
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router)
            .await
            .context("the echo upstream failed")
    })
}

/// Starts `loadtest echo-upstream` and returns it with its address.
async fn start_upstream() -> anyhow::Result<(Process, String)> {
    let me = std::env::current_exe().context("failed to locate the loadtest binary")?;
    let mut child = Command::new(me)
        .args(["echo-upstream", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("failed to start the echo upstream")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let process = Process::new(child)?;
    let line = tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).lines().next_line(),
    )
    .await
    .context("the echo upstream did not start within 10 s")??
    .context("the echo upstream exited before listening")?;
    let address = line
        .strip_prefix("listening ")
        .with_context(|| format!("unexpected line from the echo upstream: {line}"))?
        .to_owned();
    Ok((process, address))
}

/// Debian's nginx, the comparison peer, when it is installed.
pub fn nginx_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let candidates = [PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")];
    candidates
        .iter()
        .chain(&on_path)
        .map(|dir| dir.join("nginx"))
        .find(|path| path.is_file())
}

/// Fills in `loadtest/nginx.conf`, runs nginx in the foreground, and waits until it proxies.
async fn start_nginx(
    binary: &Path,
    dir: &Path,
    upstream: &str,
) -> anyhow::Result<(Process, String)> {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(&prefix)
        .with_context(|| format!("failed to create {}", prefix.display()))?;
    let port = test_support::free_port::free_port();
    let listen = format!("127.0.0.1:{port}");
    let prefix_text = prefix.to_string_lossy();
    let conf = NGINX_CONF
        .replace("{{prefix}}", &prefix_text)
        .replace("{{listen}}", &listen)
        .replace("{{upstream}}", upstream)
        .replace("{{workers}}", &workers().to_string());
    let conf_path = prefix.join("nginx.conf");
    let error_log = prefix.join("error.log");
    std::fs::write(&conf_path, conf)
        .with_context(|| format!("failed to write {}", conf_path.display()))?;
    let child = Command::new(binary)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(&error_log)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    let mut process = Process::new(child)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = process.try_wait()? {
            let log = std::fs::read_to_string(&error_log).unwrap_or_default();
            bail!("nginx exited ({status}) before serving:\n{log}");
        }
        if let Ok(mut connection) = Connection::open(&listen).await
            && let Ok((200, _)) = connection
                .send(&client::request("GET", "/healthz", "text/plain", b""))
                .await
        {
            return Ok((process, listen));
        }
        if Instant::now() > deadline {
            bail!(
                "nginx did not proxy /healthz within 10 s (log: {})",
                error_log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What every gateway replica of the run is started with.
struct GatewayEnv {
    database_url: String,
    redis_url: String,
    rate_limit_prefix: String,
    config: String,
    key: String,
}

impl GatewayEnv {
    /// Writes the route file and the signing key into `dir`.
    fn write(
        dir: &Path,
        database: &Database,
        redis_url: &str,
        upstream: &str,
    ) -> anyhow::Result<Self> {
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                r#"[limits]
user = {{ limit = {USER_LIMIT}, window = "1m" }}
api_key = {{ limit = 10000, window = "1m" }}
auth_ip = {{ limit = 60, window = "1m" }}

[[upstreams]]
name = "orders"
prefix = "/api/orders"
targets = ["http://{upstream}"]

[[routes]]
methods = ["GET"]
prefix = "/api/orders"
roles = ["user"]
"#
            ),
        )
        .context("failed to write the route file")?;
        let key = dir.join("ed25519-private.pem");
        std::fs::write(&key, PRIVATE_KEY).context("failed to write the signing key")?;
        Ok(Self {
            database_url: database.url.clone(),
            redis_url: redis_url.to_owned(),
            rate_limit_prefix: format!("loadtest:{}:", uuid::Uuid::now_v7().simple()),
            config: config.to_string_lossy().into_owned(),
            key: key.to_string_lossy().into_owned(),
        })
    }

    /// One replica; logs at warn (plus the gateway's few startup lines).
    async fn start(&self) -> anyhow::Result<Service> {
        Service::start_with_env(
            "api-gateway",
            &["--admin-listen", "127.0.0.1:0"],
            &[
                ("DATABASE_URL", &self.database_url),
                ("REDIS_URL", &self.redis_url),
                ("RATE_LIMIT_PREFIX", &self.rate_limit_prefix),
                ("GATEWAY_CONFIG", &self.config),
                ("JWT_ED25519_PRIVATE_KEY_FILE", &self.key),
                ("JWT_KEY_ID", KID),
            ],
        )
        .await
    }
}

/// Waits until `/readyz` says ready, with Redis up and the upstream available.
async fn wait_ready(address: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    loop {
        if let Ok(mut connection) = Connection::open(address).await
            && let Ok((status, body)) = connection
                .send(&client::request("GET", "/readyz", "text/plain", b""))
                .await
        {
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if status == 200 && body["redis"] == true && body["upstreams"]["orders"] == true {
                return Ok(());
            }
            last = format!("{status} {body}");
        }
        if Instant::now() > deadline {
            bail!("the gateway at {address} was not ready within 15 s: /readyz said {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Redis's own user + system CPU seconds (`INFO cpu`), when it says.
async fn redis_cpu_seconds(redis: &mut redis::aio::MultiplexedConnection) -> Option<f64> {
    let mut command = redis::cmd("INFO");
    command.arg("cpu");
    let info = tokio::time::timeout(Duration::from_secs(1), command.query_async::<String>(redis))
        .await
        .ok()?
        .ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(field("used_cpu_user:")? + field("used_cpu_sys:")?)
}
