//! notification-server: thousands of authenticated WebSocket connections, group broadcasts
//! and direct sends persisted in PostgreSQL, end-to-end delivery latency, exactly-once
//! delivery per connection, memory per connection, and shutdown under load.
//!
//! Latency is measured from the moment the load test starts sending the HTTP request
//! (its wall clock goes in the notification's `data.sent_at_us`) to the moment a client
//! task has read the frame: API, persistence, fan-out, socket and client parsing included.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::Range,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use test_support::access_token::AccessToken;
use tokio::{
    net::TcpSocket,
    sync::{Semaphore, mpsc, watch},
    task::JoinSet,
};
use tokio_tungstenite::tungstenite::{
    Message, client::IntoClientRequest, protocol::WebSocketConfig,
};

use crate::{
    backends::{self, Database},
    client::{self, Connection},
    progress::Progress,
    report::{Report, Target},
    scrape::{self, STEAL_LIMIT_PERCENT, is_quiet},
    service::{Service, cpu_seconds_of},
};

const PUBLIC_KEY: &[u8] = include_bytes!("../../common/tests/fixtures/ed25519-public.pem");
const KID: &str = "loadtest";
const GROUPS: usize = 10;
/// Client sockets are bound to 127.0.0.2 .. 127.0.0.(1 + SOURCE_ADDRESSES): one source
/// address has ~28,000 ephemeral ports, and this keeps the generator's pattern the same
/// whatever the connection count.
const SOURCE_ADDRESSES: usize = 8;

/// The shape of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    connections: usize,
    users: usize,
    all_broadcasts: usize,
    group_broadcasts: usize,
    direct_sends: usize,
    users_per_direct_send: usize,
    /// Time between two operations of the send schedule.
    tick: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        Self {
            connections: 5_000,
            users: 4_000,
            // The p99 rests mostly on the tails of the broadcasts to everyone, so even the
            // quick form sends 20 of them: with 10, one noisy moment moved it by 20 ms.
            all_broadcasts: if quick { 20 } else { 60 },
            group_broadcasts: if quick { 40 } else { 120 },
            direct_sends: if quick { 200 } else { 600 },
            users_per_direct_send: 50,
            tick: Duration::from_millis(25),
        }
    }
}

/// Runs the scenario into `report`.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let keys = Keys::new()?;
    let database = Database::create("notify").await?;
    let result = main_phase(report, &keys, &database, Plan::new(quick)).await;
    database.drop_it().await;
    result?;
    if !quick {
        let database = Database::create("notify").await?;
        let result = capacity_phase(report, &keys, &database, 19_000).await;
        database.drop_it().await;
        result?;
        let database = Database::create("notify").await?;
        let result = cluster_phase(report, &keys, &database, 3, 45_000).await;
        database.drop_it().await;
        result?;
    }
    Ok(())
}

/// The stated targets: 5,000 connections, delivery p99, exactly-once, shutdown with 1001.
async fn main_phase(
    report: &mut Report,
    keys: &Keys,
    database: &Database,
    plan: Plan,
) -> anyhow::Result<()> {
    let service = keys.start_service(&database.url).await?;
    let (rss_idle, _) = service.memory()?;
    println!(
        "notify: {} connections for {} users, {} groups",
        plan.connections, plan.users, GROUPS
    );

    join_groups(report, keys, &service.address, plan).await?;
    let (clients, per_connection) = connect_all(report, keys, &service, plan, rss_idle).await?;
    let sends = send_rounds(report, keys, &service, &clients, plan).await?;
    let broadcast_p99 = sends
        .outcome
        .api_latency_us
        .get("broadcast_all")
        .map_or(f64::NAN, |h| h.value_at_quantile(0.99) as f64 / 1e3);

    // Shut down with every client connected: each must get 1001, within 5 s.
    let (shutdown, clean) = service.terminate(Duration::from_secs(10)).await?;
    let results = clients.finish(Duration::from_secs(5)).await;
    let check = exactly_once(plan, &sends.expected, &results);
    let judged_p99_ms = delivery_latency(report, &sends, &results)?;
    broadcast_spread(report, &sends.outcome, &results);
    report.figure(
        "deliveries_received",
        results.iter().map(|r| r.receipts.len()).sum::<usize>(),
    );
    report.figure("deliveries_missing", check.missing);
    report.figure("deliveries_duplicated", check.duplicated);
    report.figure("deliveries_unexpected", check.unexpected);
    report.figure("shutdown_clean_exit", clean);
    report.figure("shutdown_seconds", shutdown.as_secs_f64());
    let closed_1001 = results
        .iter()
        .filter(|r| r.close_code == Some(1001))
        .count();
    report.figure("clients_closed_with_1001", closed_1001);

    report
        .targets
        .push(Target::below("delivery_p99_ms", 100.0, judged_p99_ms, "ms"));
    report.targets.push(Target::at_most(
        "deliveries_missing_or_duplicated",
        0.0,
        (check.missing + check.duplicated + check.unexpected) as f64,
        "frames",
    ));
    report.targets.push(Target::at_most(
        "send_failures",
        0.0,
        sends.outcome.failures as f64,
        "requests",
    ));
    report.targets.push(Target::below(
        "shutdown_seconds",
        5.0,
        shutdown.as_secs_f64(),
        "s",
    ));
    report.targets.push(Target::at_least(
        "clients_closed_with_1001",
        plan.connections as f64,
        closed_1001 as f64,
        "conns",
    ));
    report.goals.push(Target::at_most(
        "broadcast_5000_recipients_api_p99_ms",
        20.0,
        broadcast_p99,
        "ms",
    ));
    report.goals.push(Target::at_most(
        "service_rss_per_connection_kb",
        8.0,
        per_connection / 1e3,
        "KB",
    ));
    Ok(())
}

/// Everyone joins `all` and one of [`GROUPS`] smaller groups.
async fn join_groups(
    report: &mut Report,
    keys: &Keys,
    address: &str,
    plan: Plan,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let admin = keys.token("loadtest-admin", &["admin"]);
    let mut requests = Vec::with_capacity(plan.users * 2);
    for user in 0..plan.users {
        for group in ["all".to_owned(), format!("g{}", user % GROUPS)] {
            requests.push(client::authorized(
                "PUT",
                &format!("/v1/groups/{group}/members/u{user}"),
                &admin,
                None,
            ));
        }
    }
    run_requests(address, requests, 16, &[201, 204]).await?;
    report.figure("membership_setup_seconds", started.elapsed().as_secs_f64());

    Ok(())
}

/// Connects every client (user u has one connection, the first `connections - users` users
/// two) and records the memory each costs the service; returns the clients and that cost.
async fn connect_all(
    report: &mut Report,
    keys: &Keys,
    service: &Service,
    plan: Plan,
    rss_idle: u64,
) -> anyhow::Result<(Clients, f64)> {
    let started = Instant::now();
    let server: SocketAddr = service.address.parse()?;
    let clients = Clients::connect(&[server], keys, 0, plan.connections, plan.users).await?;
    let connect_seconds = started.elapsed().as_secs_f64();
    report.figure("connect_seconds", connect_seconds);
    report.figure(
        "connections_per_second",
        plan.connections as f64 / connect_seconds,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_connected, _) = service.memory()?;
    let per_connection = rss_connected.saturating_sub(rss_idle) as f64 / plan.connections as f64;
    report.figure("service_rss_idle_mb", rss_idle as f64 / 1e6);
    report.figure("service_rss_connected_mb", rss_connected as f64 / 1e6);
    report.targets.push(Target::at_least(
        "connections",
        plan.connections as f64,
        clients.connected() as f64,
        "conns",
    ));

    Ok((clients, per_connection))
}

/// The sends of every round, and what the clients must have received.
struct Rounds {
    outcome: SendOutcome,
    /// Each round's sends (a range of `outcome.sent`), and the host's steal while it ran.
    rounds: Vec<(Range<usize>, f64)>,
    /// The notification ids each user must receive.
    expected: Vec<HashSet<String>>,
}

/// Runs the send schedule until a round had the host quiet (see the comment inside), and
/// records the rounds, the CPU they cost and the API's latency.
async fn send_rounds(
    report: &mut Report,
    keys: &Keys,
    service: &Service,
    clients: &Clients,
    plan: Plan,
) -> anyhow::Result<Rounds> {
    let address = service.address.clone();
    // The send schedule: every all-broadcast, group broadcast and direct send, spread out.
    // It runs once on a quiet host. A round in which the host stole more than
    // STEAL_LIMIT_PERCENT measured the hypervisor as much as the service (one broadcast
    // reaches its 5,000 connections in ~50 ms, so a few ms stolen move the tail), so another
    // round follows, up to MAX_ROUNDS; the p99 target is judged on the quiet rounds, or on
    // every round when none was quiet. The choice rests on steal alone; every round is
    // reported, and exactly-once is checked over all of them.
    const MAX_ROUNDS: usize = 3;
    let sender = keys.token("loadtest-sender", &["sender"]);
    let schedule = schedule(plan);
    let (service_cpu, own_cpu, phase) = (
        service.cpu_seconds()?,
        cpu_seconds_of("/proc/self/stat")?,
        Instant::now(),
    );
    let mut outcome = SendOutcome {
        sent: Vec::new(),
        api_latency_us: HashMap::new(),
        failures: 0,
    };
    let mut rounds: Vec<(Range<usize>, f64)> = Vec::new();
    let (expected, total_expected) = loop {
        let _progress = Progress::start(
            format!("notify: send round {}", rounds.len() + 1),
            plan.tick * schedule.len() as u32,
            Some(plan.tick * schedule.len() as u32 + Duration::from_secs(15)),
        );
        let ticks = scrape::cpu_ticks();
        let round =
            send_schedule_alone(std::slice::from_ref(&address), &sender, plan, &schedule).await?;
        let first = outcome.sent.len();
        outcome.absorb(round)?;
        let expected = expectations(plan, &outcome.sent);
        let total_expected: usize = (0..plan.connections)
            .map(|c| expected[c % plan.users].len())
            .sum();
        let deadline = Instant::now() + Duration::from_secs(15);
        while clients.received() < total_expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let steal = scrape::steal_percent(ticks, scrape::cpu_ticks());
        rounds.push((first..outcome.sent.len(), steal));
        if is_quiet(steal) || rounds.len() >= MAX_ROUNDS {
            break (expected, total_expected);
        }
        println!(
            "notify: the host stole {steal:.2} % of the CPU in round {}; another round",
            rounds.len()
        );
    };
    // Where the two cores went while notifications flowed.
    let seconds = phase.elapsed().as_secs_f64();
    report.figure("send_phase_seconds", seconds);
    report.figure("send_rounds", rounds.len());
    report.figure(
        "send_phase_steal_percent",
        rounds.iter().map(|(_, steal)| *steal).collect::<Vec<_>>(),
    );
    report.figure("send_phase_steal_limit_percent", STEAL_LIMIT_PERCENT);
    report.figure(
        "send_phase_service_cpu_cores",
        (service.cpu_seconds()? - service_cpu) / seconds,
    );
    report.figure(
        "send_phase_loadtest_cpu_cores",
        (cpu_seconds_of("/proc/self/stat")? - own_cpu) / seconds,
    );
    report.figure("notifications_sent", outcome.sent.len());
    report.figure("deliveries_expected", total_expected);
    for (kind, histogram) in &outcome.api_latency_us {
        report.latency_figures(&format!("api_{kind}"), histogram);
    }
    report.figure("send_failures", outcome.failures);

    Ok(Rounds {
        outcome,
        rounds,
        expected,
    })
}

/// Records the delivery latency over every round and per round; returns the p99 the target
/// judges: over the quiet rounds, or over every round when none was quiet (ADR 0010).
fn delivery_latency(
    report: &mut Report,
    sends: &Rounds,
    results: &[ClientResult],
) -> anyhow::Result<f64> {
    let Rounds {
        outcome, rounds, ..
    } = sends;
    let round_of: HashMap<&str, usize> = rounds
        .iter()
        .enumerate()
        .flat_map(|(round, (sends, _))| {
            outcome.sent[sends.clone()]
                .iter()
                .map(move |(_, id, _)| (id.as_str(), round))
        })
        .collect();
    let new_histogram = || Histogram::<u64>::new_with_bounds(1, 120_000_000, 3);
    let mut latency = new_histogram()?;
    let mut per_round = vec![new_histogram()?; rounds.len()];
    for result in results {
        for (id, us) in &result.receipts {
            latency.record((*us).max(1))?;
            if let Some(&round) = round_of.get(&**id) {
                per_round[round].record((*us).max(1))?;
            }
        }
    }
    report.latency_figures("delivery", &latency);
    let quiet = scrape::quiet_stretches(
        per_round.iter().zip(rounds.iter().map(|(_, steal)| *steal)),
        1,
    );
    let quiet_count = quiet.as_ref().map_or(0, |q| q.count);
    let judged_p99_ms = quiet
        .as_ref()
        .map_or(&latency, |q| &q.merged)
        .value_at_quantile(0.99) as f64
        / 1e3;
    report.figure(
        "round_delivery_p99_ms",
        per_round
            .iter()
            .map(|h| h.value_at_quantile(0.99) as f64 / 1e3)
            .collect::<Vec<_>>(),
    );
    report.figure("quiet_rounds", quiet_count);
    report.figure(
        "delivery_p99_judged_on",
        if quiet_count == 0 {
            "every round (none was quiet)"
        } else {
            "quiet rounds"
        },
    );
    Ok(judged_p99_ms)
}

/// How a broadcast to everyone unfolds: its first delivery, and the spread to its last.
fn broadcast_spread(report: &mut Report, outcome: &SendOutcome, results: &[ClientResult]) {
    let everyone: HashSet<&str> = outcome
        .sent
        .iter()
        .filter(|(op, _, _)| matches!(op, Op::BroadcastAll))
        .map(|(_, id, _)| id.as_str())
        .collect();
    let mut span: HashMap<&str, (u64, u64)> = HashMap::new();
    for result in results {
        for (id, us) in &result.receipts {
            if everyone.contains(&**id) {
                let entry = span.entry(&**id).or_insert((u64::MAX, 0));
                entry.0 = entry.0.min(*us);
                entry.1 = entry.1.max(*us);
            }
        }
    }
    let mut firsts: Vec<u64> = span.values().map(|s| s.0).collect();
    let mut spreads: Vec<u64> = span.values().map(|s| s.1 - s.0).collect();
    firsts.sort_unstable();
    spreads.sort_unstable();
    if !firsts.is_empty() {
        report.figure(
            "broadcast_all_first_delivery_p50_ms",
            firsts[firsts.len() / 2] as f64 / 1e3,
        );
        report.figure(
            "broadcast_all_first_to_last_p50_ms",
            spreads[spreads.len() / 2] as f64 / 1e3,
        );
        report.figure(
            "broadcast_all_first_to_last_max_ms",
            spreads[spreads.len() - 1] as f64 / 1e3,
        );
    }
}

/// Full runs only: as many idle connections as one process may hold here (the open-file
/// ceiling is 20,000), and the memory each costs.
async fn capacity_phase(
    report: &mut Report,
    keys: &Keys,
    database: &Database,
    connections: usize,
) -> anyhow::Result<()> {
    let service = keys.start_service(&database.url).await?;
    let (rss_idle, _) = service.memory()?;
    println!("notify: capacity, {connections} connections on one node");
    let started = Instant::now();
    let server: SocketAddr = service.address.parse()?;
    let progress = Progress::start(
        format!("notify: opening {connections} connections"),
        Duration::from_secs(20),
        None,
    );
    let clients = Clients::connect(&[server], keys, 0, connections, connections).await?;
    drop(progress);
    report.figure("capacity_connect_seconds", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, _) = service.memory()?;
    let per_connection = rss.saturating_sub(rss_idle) as f64 / clients.connected() as f64;
    report.figure("capacity_connections", clients.connected());
    report.figure("capacity_service_rss_mb", rss as f64 / 1e6);
    report.goals.push(Target::at_least(
        "capacity_connections_one_node",
        connections as f64,
        clients.connected() as f64,
        "conns",
    ));
    report.goals.push(Target::at_most(
        "capacity_rss_per_connection_kb",
        8.0,
        per_connection / 1e3,
        "KB",
    ));
    let (shutdown, _) = service.terminate(Duration::from_secs(10)).await?;
    report.figure("capacity_shutdown_seconds", shutdown.as_secs_f64());
    clients.finish(Duration::from_secs(5)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_parse_agrees_with_the_json_parser() {
        let id = "0195f5a8-8a5c-7c1e-9d4e-3f2a1b0c9d8e";
        let frame = format!(
            r#"{{"type":"notification","notification":{{"id":"{id}","type":"t","title":"x","message":"m","data":{{"sent_at_us":1234567,"seq":3}},"timestamp":"2026-11-21T10:00:00.000Z"}}}}"#
        );
        assert_eq!(parse_notification(&frame), Some((id, Some(1_234_567))));
        let reordered = format!(
            r#"{{"notification":{{"id":"{id}","data":{{"sent_at_us":5}}}},"type":"notification"}}"#
        );
        assert_eq!(parse_notification(&reordered), Some((id, Some(5))));
        assert_eq!(
            parse_notification(r#"{"type":"recovered","count":1}"#),
            None
        );
    }
}

/// Connections one client process opens at most: the open-file ceiling is 20,000 per process.
const CONNECTIONS_PER_CLIENT_PROCESS: usize = 15_000;

/// Full runs only: `nodes` processes sharing PostgreSQL and Redis hold `connections` together
/// (clients in child processes, spread over every node), and direct sends accepted by one node
/// are delivered to connections on the others.
async fn cluster_phase(
    report: &mut Report,
    keys: &Keys,
    database: &Database,
    nodes: usize,
    connections: usize,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let redis_url = backends::redis_url();
    let prefix = format!("notify-loadtest-{}:", uuid::Uuid::now_v7().simple());
    let mut services = Vec::new();
    for _ in 0..nodes {
        services.push(
            keys.start_node(&database.url, Some((&redis_url, &prefix)))
                .await?,
        );
    }
    let addresses: Vec<String> = services.iter().map(|s| s.address.clone()).collect();
    let idle: Vec<u64> = services
        .iter()
        .map(|s| s.memory().map(|m| m.0))
        .collect::<anyhow::Result<_>>()?;
    println!("notify: cluster, {connections} connections over {nodes} nodes");

    // Client processes: each opens its share, spread over every node.
    let _progress = Progress::start(
        format!("notify: cluster of {nodes} nodes, {connections} connections"),
        Duration::from_secs(90),
        None,
    );
    let started = Instant::now();
    let mut children = Vec::new();
    let mut first = 0;
    while first < connections {
        let count = CONNECTIONS_PER_CLIENT_PROCESS.min(connections - first);
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["notify-clients", "--servers", &addresses.join(",")])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--users", &connections.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start a client process")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        children.push((child, stdin, lines));
        first += count;
    }
    let mut connected = 0;
    for (_, _, lines) in &mut children {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .context("a client process did not connect in time")??
            .context("a client process exited")?;
        let ready: Value = serde_json::from_str(&line)?;
        connected += ready["connected"].as_u64().unwrap_or(0) as usize;
    }
    report.figure("cluster_connect_seconds", started.elapsed().as_secs_f64());
    report.figure("cluster_connections", connected);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rss_per_connection = Vec::new();
    for (service, idle) in services.iter().zip(&idle) {
        let (rss, _) = service.memory()?;
        rss_per_connection
            .push(rss.saturating_sub(*idle) as f64 / (connections / nodes) as f64 / 1e3);
    }
    report.figure("cluster_rss_per_connection_kb", json!(rss_per_connection));

    // Direct sends, op i through node i % nodes; user u's connection is on node u % nodes.
    let plan = Plan {
        connections,
        users: connections,
        all_broadcasts: 0,
        group_broadcasts: 0,
        direct_sends: 400,
        users_per_direct_send: 50,
        tick: Duration::from_millis(20),
    };
    let sender = keys.token("loadtest-sender", &["sender"]);
    let outcome = send_schedule_alone(&addresses, &sender, plan, &schedule(plan)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut results = Vec::new();
    for (mut child, mut stdin, mut lines) in children {
        stdin.write_all(b"finish\n").await?;
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("a client process did not report")??
            .context("a client process exited without a report")?;
        let receipts: Vec<(usize, String, u64)> = serde_json::from_str(&line)?;
        results.extend(receipts);
        let _ = child.wait().await;
    }
    let node_of_op: HashMap<&str, usize> = outcome
        .sent
        .iter()
        .map(|(_, id, i)| (id.as_str(), i % nodes))
        .collect();
    let expected = expectations(plan, &outcome.sent);
    let mut cross = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut same = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut seen: HashMap<(usize, &str), u32> = HashMap::new();
    for (index, id, latency) in &results {
        *seen.entry((*index, id.as_str())).or_default() += 1;
        match node_of_op.get(id.as_str()) {
            Some(&node) if node != index % nodes => cross.record((*latency).max(1))?,
            Some(_) => same.record((*latency).max(1))?,
            None => {}
        }
    }
    let duplicated: u32 = seen.values().map(|c| c - 1).sum();
    let missing: usize = expected
        .iter()
        .enumerate()
        .map(|(user, ids)| {
            ids.iter()
                .filter(|id| !seen.contains_key(&(user, id.as_str())))
                .count()
        })
        .sum();
    report.latency_figures("cluster_cross_node_delivery", &cross);
    report.latency_figures("cluster_same_node_delivery", &same);
    report.figure("cluster_sends", outcome.sent.len());
    report.figure("cluster_send_failures", outcome.failures);
    report.figure("cluster_deliveries_missing", missing);
    report.figure("cluster_deliveries_duplicated", duplicated);
    report.goals.push(Target::at_least(
        "cluster_connections_3_nodes",
        connections as f64,
        connected as f64,
        "conns",
    ));
    report.goals.push(Target::at_most(
        "cluster_cross_node_delivery_p99_ms",
        50.0,
        cross.value_at_quantile(0.99) as f64 / 1e3,
        "ms",
    ));
    report.goals.push(Target::at_most(
        "cluster_deliveries_missing_or_duplicated",
        0.0,
        (missing + duplicated as usize) as f64,
        "frames",
    ));
    for service in services {
        service.terminate(Duration::from_secs(10)).await?;
    }
    Ok(())
}

/// The client side of [`cluster_phase`], in its own process (`loadtest notify-clients`):
/// opens its connections, prints `{"connected": n}`, and after a `finish` line on stdin prints
/// every receipt as `[connection index, id, latency µs]`.
pub fn clients_child(
    servers: Vec<SocketAddr>,
    first: usize,
    count: usize,
    users: usize,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let keys = Keys::new()?;
        let clients = Clients::connect(&servers, &keys, first, count, users).await?;
        println!("{}", json!({ "connected": clients.connected() }));
        // Wait for the parent's `finish` (or for it to go away).
        tokio::task::spawn_blocking(|| {
            for line in std::io::stdin().lines() {
                match line {
                    Ok(line) if line.trim() == "finish" => break,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        })
        .await?;
        let results = clients.finish(Duration::ZERO).await;
        let receipts: Vec<(usize, &str, u64)> = results
            .iter()
            .flat_map(|r| r.receipts.iter().map(move |(id, us)| (r.index, &**id, *us)))
            .collect();
        println!("{}", serde_json::to_string(&receipts)?);
        anyhow::Ok(())
    })
}

/// The public key the service is started with, and tokens signed with its private twin.
struct Keys {
    public_key_file: std::path::PathBuf,
}

impl Keys {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("loadtest-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let public_key_file = dir.join("ed25519-public.pem");
        std::fs::write(&public_key_file, PUBLIC_KEY)?;
        Ok(Self { public_key_file })
    }

    fn token(&self, sub: &str, roles: &[&str]) -> String {
        AccessToken::new(sub, roles)
            .key_id(KID)
            .valid_for(Duration::from_secs(3_600))
            .sign()
    }

    async fn start_service(&self, database_url: &str) -> anyhow::Result<Service> {
        self.start_node(database_url, None).await
    }

    /// A node; with `redis` = (url, prefix), one of several sharing that fan-out.
    async fn start_node(
        &self,
        database_url: &str,
        redis: Option<(&str, &str)>,
    ) -> anyhow::Result<Service> {
        let key = self.public_key_file.to_string_lossy().into_owned();
        let mut env = vec![
            ("DATABASE_URL", database_url),
            ("JWT_ED25519_PUBLIC_KEY_FILE", &key),
            ("JWT_KEY_ID", KID),
            ("MAX_CONNECTIONS", "25000"),
        ];
        if let Some((url, prefix)) = redis {
            env.push(("REDIS_URL", url));
            env.push(("REDIS_PREFIX", prefix));
        }
        Service::start_with_env("notification-server", &[], &env).await
    }
}

/// Sends `requests` over `parallel` keep-alive connections; any other status is an error.
async fn run_requests(
    address: &str,
    requests: Vec<Vec<u8>>,
    parallel: usize,
    ok: &'static [u16],
) -> anyhow::Result<()> {
    let requests = Arc::new(std::sync::Mutex::new(requests));
    let mut tasks = JoinSet::new();
    for _ in 0..parallel {
        let requests = Arc::clone(&requests);
        let address = address.to_owned();
        tasks.spawn(async move {
            let mut conn = Connection::open(&address).await?;
            loop {
                let Some(request) = requests.lock().unwrap().pop() else {
                    return anyhow::Ok(());
                };
                let (status, body) = conn.send(&request).await?;
                if !ok.contains(&status) {
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

/// One send of the schedule.
#[derive(Debug, Clone, Copy)]
enum Op {
    BroadcastAll,
    BroadcastGroup(usize),
    Direct(usize),
}

impl Op {
    fn kind(self) -> &'static str {
        match self {
            Self::BroadcastAll => "broadcast_all",
            Self::BroadcastGroup(_) => "broadcast_group",
            Self::Direct(_) => "send_to_users",
        }
    }

    /// The user indices this op is for.
    fn users(self, plan: Plan) -> Vec<usize> {
        match self {
            Self::BroadcastAll => (0..plan.users).collect(),
            Self::BroadcastGroup(g) => (g..plan.users).step_by(GROUPS).collect(),
            Self::Direct(seed) => {
                // A deterministic spread of distinct users.
                let step = 7_919 % plan.users.max(1);
                (0..plan.users_per_direct_send.min(plan.users))
                    .map(|k| (seed * 131 + k * step.max(1)) % plan.users)
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect()
            }
        }
    }
}

/// All sends, interleaved: broadcasts to everyone evenly spaced, the rest between them.
fn schedule(plan: Plan) -> Vec<Op> {
    let total = plan.all_broadcasts + plan.group_broadcasts + plan.direct_sends;
    let mut ops = Vec::with_capacity(total);
    let (mut a, mut g, mut d) = (0, 0, 0);
    for i in 0..total {
        // Whichever kind is furthest behind its even share goes next.
        let share = |done: usize, of: usize| done as f64 / of.max(1) as f64;
        let progress = (i as f64 + 1.0) / total as f64;
        let candidates = [
            (plan.all_broadcasts, a, 0),
            (plan.group_broadcasts, g, 1),
            (plan.direct_sends, d, 2),
        ];
        let pick = candidates
            .iter()
            .filter(|(of, done, _)| done < of)
            .min_by(|x, y| (share(x.1, x.0) - progress).total_cmp(&(share(y.1, y.0) - progress)))
            .map(|c| c.2)
            .unwrap_or(2);
        match pick {
            0 => {
                ops.push(Op::BroadcastAll);
                a += 1;
            }
            1 => {
                ops.push(Op::BroadcastGroup(g % GROUPS));
                g += 1;
            }
            _ => {
                ops.push(Op::Direct(d));
                d += 1;
            }
        }
    }
    ops
}

struct SendOutcome {
    /// (op, notification id, schedule index) of every accepted send.
    sent: Vec<(Op, String, usize)>,
    api_latency_us: HashMap<&'static str, Histogram<u64>>,
    failures: usize,
}

impl SendOutcome {
    /// Adds another round's sends, latencies and failures to these.
    fn absorb(&mut self, round: SendOutcome) -> anyhow::Result<()> {
        self.sent.extend(round.sent);
        self.failures += round.failures;
        for (kind, histogram) in round.api_latency_us {
            match self.api_latency_us.entry(kind) {
                std::collections::hash_map::Entry::Occupied(mut mine) => {
                    mine.get_mut().add(&histogram)?;
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(histogram);
                }
            }
        }
        Ok(())
    }
}

/// [`send_schedule`] on one thread of its own (a current-thread runtime). On the shared
/// runtime, an op due while thousands of client tasks were reading a broadcast waited behind
/// them: its `sent_at_us` was stamped late, which shortened the delivery latency it measured,
/// and its response was read late, which lengthened the API latency.
async fn send_schedule_alone(
    addresses: &[String],
    token: &str,
    plan: Plan,
    schedule: &[Op],
) -> anyhow::Result<SendOutcome> {
    let (addresses, token, schedule) = (addresses.to_vec(), token.to_owned(), schedule.to_vec());
    client::on_own_thread("notify-sender", move || async move {
        send_schedule(&addresses, &token, plan, &schedule).await
    })
    .await
}

/// Runs the schedule at one op per `plan.tick`, each op on a connection of a small pool so a
/// slow one does not hold the next back (open loop). Op `i` goes to node `i % nodes`.
async fn send_schedule(
    addresses: &[String],
    token: &str,
    plan: Plan,
    schedule: &[Op],
) -> anyhow::Result<SendOutcome> {
    let mut pools = Vec::new();
    for address in addresses {
        let (pool_tx, pool_rx) = mpsc::channel::<Connection>(32);
        for _ in 0..32 {
            pool_tx.send(Connection::open(address).await?).await?;
        }
        pools.push((pool_tx, pool_rx));
    }
    let mut tasks = JoinSet::new();
    let start = tokio::time::Instant::now();
    for (i, &op) in schedule.iter().enumerate() {
        tokio::time::sleep_until(start + plan.tick * i as u32).await;
        let (pool_tx, pool_rx) = &mut pools[i % addresses.len()];
        let Some(mut conn) = pool_rx.recv().await else {
            bail!("connection pool closed");
        };
        let pool_tx = pool_tx.clone();
        let (path, body) = request_for(op, plan, i);
        let token = token.to_owned();
        tasks.spawn(async move {
            let sent_at = Instant::now();
            let mut body = body;
            body["data"] = json!({ "sent_at_us": unix_us(), "seq": i });
            let bytes = serde_json::to_vec(&body).expect("json");
            let request = client::authorized("POST", &path, &token, Some(&bytes));
            let result = conn.send(&request).await;
            let elapsed = sent_at.elapsed();
            let _ = pool_tx.send(conn).await;
            (i, op, elapsed, result)
        });
    }
    let mut outcome = SendOutcome {
        sent: Vec::new(),
        api_latency_us: HashMap::new(),
        failures: 0,
    };
    while let Some(joined) = tasks.join_next().await {
        let (i, op, elapsed, result) = joined?;
        match result {
            Ok((201, body)) => {
                let body: Value = serde_json::from_slice(&body)?;
                let id = body["notification"]["id"]
                    .as_str()
                    .context("no id in the response")?
                    .to_owned();
                outcome.sent.push((op, id, i));
                outcome
                    .api_latency_us
                    .entry(op.kind())
                    .or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000, 3).unwrap())
                    .record(elapsed.as_micros().max(1) as u64)?;
            }
            Ok((status, body)) => {
                outcome.failures += 1;
                eprintln!("send failed: {status} {}", String::from_utf8_lossy(&body));
            }
            Err(error) => {
                outcome.failures += 1;
                eprintln!("send failed: {error:#}");
            }
        }
    }
    Ok(outcome)
}

fn request_for(op: Op, plan: Plan, i: usize) -> (String, Value) {
    let content = json!({
        "type": "loadtest.notify",
        "title": format!("#{i} {}", op.kind()),
        "message": "Your order #12345 has shipped and will arrive on Tuesday.",
    });
    match op {
        Op::BroadcastAll => ("/v1/groups/all/notifications".into(), content),
        Op::BroadcastGroup(g) => (format!("/v1/groups/g{g}/notifications"), content),
        Op::Direct(_) => {
            let mut body = content;
            body["user_ids"] = json!(
                op.users(plan)
                    .iter()
                    .map(|u| format!("u{u}"))
                    .collect::<Vec<_>>()
            );
            ("/v1/notifications".into(), body)
        }
    }
}

/// For each user index, the ids it must receive.
fn expectations(plan: Plan, sent: &[(Op, String, usize)]) -> Vec<HashSet<String>> {
    let mut expected = vec![HashSet::new(); plan.users];
    for (op, id, _) in sent {
        for user in op.users(plan) {
            expected[user].insert(id.clone());
        }
    }
    expected
}

#[derive(Default)]
struct Check {
    missing: usize,
    duplicated: usize,
    unexpected: usize,
}

fn exactly_once(plan: Plan, expected: &[HashSet<String>], results: &[ClientResult]) -> Check {
    let mut check = Check::default();
    for result in results {
        let want = &expected[result.index % plan.users];
        let counts = result.counts();
        for (id, &count) in &counts {
            if !want.contains(*id) {
                check.unexpected += count as usize;
            } else if count > 1 {
                check.duplicated += count as usize - 1;
            }
        }
        check.missing += want
            .iter()
            .filter(|id| !counts.contains_key(id.as_str()))
            .count();
    }
    // Connections that never came up received nothing: count what they missed too.
    let connected: HashSet<usize> = results.iter().map(|r| r.index).collect();
    for index in (0..plan.connections).filter(|i| !connected.contains(i)) {
        check.missing += expected[index % plan.users].len();
    }
    check
}

/// What one client connection saw.
struct ClientResult {
    index: usize,
    /// Every notification frame read: its id, and its latency in µs (0 when unknown).
    receipts: Vec<(Box<str>, u64)>,
    close_code: Option<u16>,
}

impl ClientResult {
    fn counts(&self) -> HashMap<&str, u32> {
        let mut counts = HashMap::new();
        for (id, _) in &self.receipts {
            *counts.entry(&**id).or_default() += 1;
        }
        counts
    }
}

/// The client connections.
struct Clients {
    tasks: JoinSet<Option<ClientResult>>,
    connected: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

impl Clients {
    /// Opens connections `first .. first + count`; connection `i` is user `u{i % users}` on
    /// server `i % servers.len()`.
    async fn connect(
        servers: &[SocketAddr],
        keys: &Keys,
        first: usize,
        count: usize,
        users: usize,
    ) -> anyhow::Result<Self> {
        let connected = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(AtomicUsize::new(0));
        let (stop, _) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(128));
        let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(1_024);
        let mut tasks = JoinSet::new();
        let mut tokens: HashMap<usize, Arc<str>> = HashMap::new();
        for index in first..first + count {
            let user = index % users;
            let token = Arc::clone(
                tokens
                    .entry(user)
                    .or_insert_with(|| Arc::from(keys.token(&format!("u{user}"), &[]))),
            );
            let server = servers[index % servers.len()];
            let permits = Arc::clone(&permits);
            let connected = Arc::clone(&connected);
            let received = Arc::clone(&received);
            let stop = stop.subscribe();
            let ready_tx = ready_tx.clone();
            tasks.spawn(async move {
                let permit = permits.acquire_owned().await.ok()?;
                let socket = match open(server, index, &token).await {
                    Ok(socket) => socket,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error)).await;
                        return None;
                    }
                };
                drop(permit);
                connected.fetch_add(1, Ordering::Relaxed);
                let _ = ready_tx.send(Ok(())).await;
                Some(read_frames(index, socket, received, stop).await)
            });
        }
        drop(ready_tx);
        let mut failures = 0;
        let mut first_error = None;
        for _ in 0..count {
            match ready_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(error)) => {
                    failures += 1;
                    first_error.get_or_insert(error);
                }
                None => break,
            }
        }
        if let Some(error) = first_error {
            eprintln!("notify: {failures} connections failed; first: {error:#}");
        }
        Ok(Self {
            tasks,
            connected,
            received,
            stop,
        })
    }

    fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits up to `wait` for the server to close the connections, then closes the rest.
    async fn finish(mut self, wait: Duration) -> Vec<ClientResult> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut results = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(Ok(Some(result)))) => results.push(result),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    let _ = self.stop.send(true);
                    while let Some(joined) = self.tasks.join_next().await {
                        if let Ok(Some(result)) = joined {
                            results.push(result);
                        }
                    }
                    break;
                }
            }
        }
        results
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects from 127.0.0.(2 + index % SOURCE_ADDRESSES) and waits for the welcome frame.
async fn open(server: SocketAddr, index: usize, token: &str) -> anyhow::Result<Socket> {
    let source = Ipv4Addr::new(127, 0, 0, 2 + (index % SOURCE_ADDRESSES) as u8);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(server).await.context("connect")?;
    stream.set_nodelay(true)?;
    let request = format!("ws://{server}/v1/ws?token={token}").into_client_request()?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (mut socket, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .context("upgrade")?;
    match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
        Ok(Some(Ok(Message::Text(text)))) if text.as_str().contains("\"welcome\"") => Ok(socket),
        other => bail!("no welcome frame: {other:?}"),
    }
}

async fn read_frames(
    index: usize,
    mut socket: Socket,
    received: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> ClientResult {
    let mut result = ClientResult {
        index,
        receipts: Vec::new(),
        close_code: None,
    };
    // Registered once: 5,000 tasks re-registering on the one shared channel for every frame
    // would contend on its lock and slow the generator, inflating the latency it measures.
    let stopped = async move {
        let _ = stop.changed().await;
    };
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            () = &mut stopped => {
                let _ = socket.close(None).await;
                return result;
            }
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                let now = unix_us();
                let Some((id, sent_at_us)) = parse_notification(text.as_str()) else {
                    continue;
                };
                received.fetch_add(1, Ordering::Relaxed);
                let latency = sent_at_us.map_or(0, |sent| now.saturating_sub(sent));
                result.receipts.push((id.into(), latency));
            }
            Some(Ok(Message::Close(frame))) => {
                result.close_code = frame.map(|f| u16::from(f.code));
                let _ = socket.flush().await;
                // Drive the close handshake to its end.
                while let Some(Ok(_)) = socket.next().await {}
                return result;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return result,
        }
    }
}

/// The id and `data.sent_at_us` of a notification frame; None for other frames. The
/// service writes `{"type":"notification","notification":{"id":"…",…}}`, so two substring
/// searches do what a full JSON parse would, at a fraction of the CPU the generator shares
/// with the service; anything unexpected falls back to the parser.
fn parse_notification(text: &str) -> Option<(&str, Option<u64>)> {
    const PREFIX: &str = r#"{"type":"notification","notification":{"id":""#;
    if let Some(rest) = text.strip_prefix(PREFIX) {
        let id = rest.get(..36)?;
        let sent = rest.find(r#""sent_at_us":"#).and_then(|at| {
            let digits = &rest[at + 13..];
            let end = digits.find(|c: char| !c.is_ascii_digit())?;
            digits[..end].parse().ok()
        });
        return Some((id, sent));
    }
    let frame: Value = serde_json::from_str(text).ok()?;
    if frame["type"] != "notification" {
        return None;
    }
    let id = frame["notification"]["id"].as_str()?;
    let id = text.get(text.find(id)?..)?.get(..id.len())?;
    Some((id, frame["notification"]["data"]["sent_at_us"].as_u64()))
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
