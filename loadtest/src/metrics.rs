//! The `metrics` scenario: the metrics-processor in process and over HTTP.
//!
//! Stated targets (DESIGN.md), which gate the exit code:
//! - ≥ 100,000 events/s offered open-loop over HTTP (batches of 100 at 1,000 req/s) with a
//!   per-event acknowledgement p99 < 1 ms;
//! - peak RSS of the service < 1 GB;
//! - exit within 5 s of SIGTERM while under load.
//!
//! Goals from the issue, reported met or not: in-process ≥ 20M events/s on 2 threads, HTTP
//! batch ≥ 1M events/s, single-event HTTP ≥ 50K events/s, `get_aggregates(60)` at 1,000
//! types p99 ≤ 5 ms, RSS ≤ 256 MB after 60 simulated minutes with 1M users and 1,000 types.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use hdrhistogram::Histogram;
use metrics_processor::{
    Event, EventType, MetricsProcessor, ProcessorConfig, UserId, clock::ManualClock,
};
use serde_json::{Value, json};

use crate::{
    client::{self, Connection, request},
    progress::Progress,
    report::{Report, Target},
    scrape::{self, STEAL_LIMIT_PERCENT, is_quiet},
    service::{Service, memory_of},
};

const MB: f64 = 1024.0 * 1024.0;
/// Latencies of a phase's first half second (connection set-up, the service's first
/// allocations) are left out of its histogram; its throughput counts the whole phase.
const WARM_UP: Duration = Duration::from_millis(500);

/// A small deterministic generator (SplitMix64): repeatable runs, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Log-uniform over 1 .. 1000: the spread of latencies in milliseconds.
    fn value(&mut self) -> f64 {
        10f64.powf((self.next() >> 11) as f64 / (1u64 << 53) as f64 * 3.0)
    }
}

/// `count` events of `types` types from a million users, stamped within a minute before `now_ms`.
fn events(count: usize, types: usize, now_ms: i64, seed: u64) -> Vec<Event> {
    let mut rng = Rng(seed);
    let names: Vec<EventType> = (0..types)
        .map(|t| EventType::parse(&format!("type-{t}")).unwrap())
        .collect();
    (0..count)
        .map(|_| {
            let r = rng.next();
            Event {
                timestamp: DateTime::from_timestamp_millis(now_ms - (r % 50_000) as i64).unwrap(),
                user_id: UserId::parse(&format!("user-{}", (r >> 20) % 1_000_000)).unwrap(),
                event_type: names[(r >> 44) as usize % types].clone(),
                value: rng.value(),
            }
        })
        .collect()
}

fn micros(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64
}

/// Runs the scenario into `report`.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let phase = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(15)
    };

    println!("metrics: in-process ingest and query …");
    in_process(report, quick).await?;
    println!("metrics: memory soak (60 simulated minutes) …");
    soak(report, quick).await?;
    println!("metrics: HTTP phases against the real service …");
    over_http(report, phase).await
}

async fn in_process(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let duration = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(8)
    };
    let quick_copy = quick;
    let _progress = Progress::start(
        "metrics: in-process ingest, then 60-minute queries",
        duration * 3,
        None,
    );
    let (events_per_second, latency, query) = tokio::task::spawn_blocking(move || {
        let now = Utc::now().timestamp_millis();
        let processor = MetricsProcessor::with_clock(
            ProcessorConfig::default(),
            Arc::new(ManualClock::new(now)),
        );
        let inputs: Vec<Vec<Event>> = (0..2).map(|t| events(1 << 16, 1_000, now, t + 1)).collect();

        // Throughput: two threads, as fast as they go.
        let processed = AtomicU64::new(0);
        let started = Instant::now();
        std::thread::scope(|scope| {
            for input in &inputs {
                let (processor, processed) = (&processor, &processed);
                scope.spawn(move || {
                    let mut done = 0u64;
                    'outer: loop {
                        for chunk in input.chunks(4096) {
                            for event in chunk {
                                processor
                                    .process_event(event.clone())
                                    .expect("generated events are valid");
                            }
                            done += chunk.len() as u64;
                            if started.elapsed() >= duration {
                                break 'outer;
                            }
                        }
                    }
                    processed.fetch_add(done, Ordering::Relaxed);
                });
            }
        });
        let events_per_second =
            processed.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

        // Latency: every call timed, one thread.
        let mut latency = Histogram::<u64>::new(3).unwrap();
        for event in inputs[0]
            .iter()
            .cycle()
            .take(if quick_copy { 500_000 } else { 2_000_000 })
        {
            let event = event.clone();
            let t = Instant::now();
            processor.process_event(event).unwrap();
            latency.record(t.elapsed().as_nanos() as u64).unwrap();
        }

        // Query: 1,000 types with every one of 60 minutes filled (full run only; the
        // criterion bench `get_aggregates` measures the same with 500 events a slot).
        let query = (!quick_copy).then(|| {
            let clock = Arc::new(ManualClock::new(now - 59 * 60_000));
            let processor = MetricsProcessor::with_clock(ProcessorConfig::default(), clock.clone());
            let minute = events(200_000, 1_000, now, 99);
            for m in 0..60i64 {
                let shift = chrono::Duration::milliseconds(-(59 - m) * 60_000);
                clock.set(now - (59 - m) * 60_000);
                for event in &minute {
                    let mut event = event.clone();
                    event.timestamp += shift;
                    processor.process_event(event).unwrap();
                }
            }
            // 200 samples each, so p99 is a percentile and not the maximum.
            // Warm: the same window polled again (sealed minutes cached, as after the
            // service's warmer ran); cold: alternating windows, every minute merged.
            let mut warm = Histogram::<u64>::new(3).unwrap();
            let mut cold = Histogram::<u64>::new(3).unwrap();
            processor.get_aggregates(60).unwrap();
            // Each type caches four windows. Cold samples rotate through six others (54-59),
            // so each was evicted long before it comes round again: always a miss. Warm
            // samples ask 60 right after re-caching it: always a hit.
            for i in 0..200u32 {
                let t = Instant::now();
                let aggregates = processor.get_aggregates(54 + i % 6).unwrap();
                cold.record(t.elapsed().as_micros() as u64).unwrap();
                assert_eq!(aggregates.event_types.len(), 1_000);
                processor.get_aggregates(60).unwrap();
                let t = Instant::now();
                let aggregates = processor.get_aggregates(60).unwrap();
                warm.record(t.elapsed().as_micros() as u64).unwrap();
                assert_eq!(aggregates.event_types.len(), 1_000);
            }
            (warm, cold)
        });
        (events_per_second, latency, query)
    })
    .await?;

    report.figure(
        "in_process_events_per_second_2_threads",
        events_per_second.round(),
    );
    report.latency_figures_ns("in_process_event_latency", &latency);
    report.goals.push(Target::at_least(
        "in_process_events_per_second_2_threads",
        20e6,
        events_per_second.round(),
        "events/s",
    ));
    if let Some((warm, cold)) = query {
        report.latency_figures("get_aggregates_60m_1000_types_warm", &warm);
        report.latency_figures("get_aggregates_60m_1000_types_cold", &cold);
        let warm_p99 = micros(&warm, 0.99) / 1e3;
        let cold_p99 = micros(&cold, 0.99) / 1e3;
        report.goals.push(Target::at_most(
            "get_aggregates_60m_1000_types_warm_p99",
            5.0,
            warm_p99,
            "ms",
        ));
        report.goals.push(Target::at_most(
            "get_aggregates_60m_1000_types_cold_p99",
            5.0,
            cold_p99,
            "ms",
        ));
    }
    Ok(())
}

/// Runs the soak in a child process, so its RSS is the processor's alone.
async fn soak(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let mut command = tokio::process::Command::new(me);
    command.arg("metrics-soak");
    if quick {
        command.arg("--quick");
    }
    let _progress = Progress::start(
        "metrics: memory soak",
        Duration::from_secs(if quick { 20 } else { 60 }),
        None,
    );
    let output = command
        .output()
        .await
        .context("failed to run the soak child")?;
    if !output.status.success() {
        bail!(
            "the soak child failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let result: Value =
        serde_json::from_slice(&output.stdout).context("the soak child printed no JSON")?;
    let rss_mb = result["rss_mb"].as_f64().unwrap_or(f64::MAX);
    if let Value::Object(fields) = &result {
        for (name, value) in fields {
            report.figure(&format!("soak_{name}"), value.clone());
        }
    }
    report.goals.push(Target::at_most(
        "rss_after_60_simulated_minutes",
        256.0,
        rss_mb,
        "MB",
    ));
    Ok(())
}

/// The soak itself (run by `loadtest metrics-soak`): 75 simulated minutes of traffic from a
/// million users over 1,000 types through one processor, minute by minute on a manual clock,
/// sweeping as the service does. Prints one JSON object.
pub fn soak_child(quick: bool) -> anyhow::Result<Value> {
    let per_second: u64 = if quick { 5_000 } else { 100_000 };
    let minutes = 75i64;
    let start = Utc::now().timestamp_millis().div_euclid(60_000) * 60_000 - minutes * 60_000;
    let clock = Arc::new(ManualClock::new(start));
    let processor = MetricsProcessor::with_clock(ProcessorConfig::default(), clock.clone());
    let names: Vec<EventType> = (0..1_000)
        .map(|t| EventType::parse(&format!("type-{t}")).unwrap())
        .collect();
    let started = Instant::now();
    for minute in 0..minutes {
        let minute_start = start + minute * 60_000;
        clock.set(minute_start + 59_999);
        std::thread::scope(|scope| {
            for thread in 0..2u64 {
                let (processor, names) = (&processor, &names);
                scope.spawn(move || {
                    let mut rng = Rng((minute as u64) << 8 | thread);
                    for _ in 0..per_second * 60 / 2 {
                        let r = rng.next();
                        let event = Event {
                            timestamp: DateTime::from_timestamp_millis(
                                minute_start + (r % 60_000) as i64,
                            )
                            .unwrap(),
                            user_id: UserId::parse(&format!("user-{}", (r >> 20) % 1_000_000))
                                .unwrap(),
                            event_type: names[(r >> 44) as usize % names.len()].clone(),
                            value: rng.value(),
                        };
                        processor
                            .process_event(event)
                            .expect("soak events are valid");
                    }
                });
            }
        });
        processor.evict_expired();
    }
    let elapsed = started.elapsed();
    let (rss, hwm) = memory_of("/proc/self/status")?;
    let query_started = Instant::now();
    let aggregates = processor.get_aggregates(60)?;
    let query_ms = query_started.elapsed().as_secs_f64() * 1e3;
    // Each type saw per_second × 3600 / 1000 events from a million users over the hour; the
    // expected distinct count is n (1 − e^(−k/n)).
    let per_type = (per_second * 3_600 / 1_000) as f64;
    let expected_users = 1e6 * (1.0 - (-per_type / 1e6).exp());
    let mean_users = aggregates
        .event_types
        .values()
        .map(|a| a.distinct_users as f64)
        .sum::<f64>()
        / aggregates.event_types.len().max(1) as f64;
    Ok(json!({
        "simulated_minutes": minutes,
        "events": per_second * 60 * minutes as u64,
        "events_per_simulated_second": per_second,
        "distinct_users": 1_000_000,
        "event_types": aggregates.event_types.len(),
        "wall_seconds": elapsed.as_secs_f64(),
        "rss_mb": rss as f64 / MB,
        "peak_rss_mb": hwm as f64 / MB,
        "sketch_heap_mb": processor.sketch_heap_bytes() as f64 / MB,
        "get_aggregates_60_ms": query_ms,
        "distinct_users_per_type_expected": expected_users.round(),
        "distinct_users_per_type_estimated_mean": mean_users.round(),
    }))
}

fn event_json(rng: &mut Rng, timestamp: &str, types: usize) -> String {
    let r = rng.next();
    format!(
        r#"{{"timestamp":"{timestamp}","user_id":"user-{}","event_type":"type-{}","value":{:.3}}}"#,
        (r >> 20) % 1_000_000,
        (r >> 44) as usize % types,
        rng.value()
    )
}

fn batch_requests(count: usize, events_each: usize, seed: u64) -> Vec<Arc<Vec<u8>>> {
    let timestamp = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| {
            let events: Vec<String> = (0..events_each)
                .map(|_| event_json(&mut rng, &timestamp, 100))
                .collect();
            Arc::new(request(
                "POST",
                "/v1/events/batch",
                "application/json",
                format!("[{}]", events.join(",")).as_bytes(),
            ))
        })
        .collect()
}

/// What a group of connections achieved.
struct Outcome {
    accepted_requests: u64,
    failed_requests: u64,
    /// Request latency after the [`WARM_UP`], one histogram per [`WINDOW`] of the phase.
    windows: Vec<Histogram<u64>>,
    elapsed: Duration,
}

impl Outcome {
    /// Every window's latencies in one histogram.
    fn latency_us(&self) -> Histogram<u64> {
        merged(self.windows.iter())
    }
}

fn merged<'a>(windows: impl Iterator<Item = &'a Histogram<u64>>) -> Histogram<u64> {
    let mut all = Histogram::new(3).unwrap();
    for window in windows {
        all.add(window).unwrap();
    }
    all
}

/// The paced phase is measured in windows of this length (~5,000 samples each, so a
/// window's p99 rests on its 50 slowest requests), each with the host's steal beside it.
const WINDOW: Duration = Duration::from_secs(5);

/// How long the paced phase runs: at least `min_windows`; then until `quiet_windows` of
/// them had the host quiet, or `max_windows` in all.
#[derive(Debug, Clone, Copy)]
struct WindowPlan {
    min_windows: usize,
    quiet_windows: usize,
    max_windows: usize,
}

/// `connections` clients, each sending its next request when the last is answered.
async fn closed_loop(
    address: &str,
    connections: usize,
    duration: Duration,
    requests: Arc<Vec<Arc<Vec<u8>>>>,
) -> anyhow::Result<Outcome> {
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let outcome = drive(address, connections, None, Instant::now(), stop, requests).await;
    timer.abort();
    outcome
}

/// A paced phase: its outcome, and the host's steal (%) in each of its windows.
struct Paced {
    outcome: Outcome,
    steal_percent: Vec<f64>,
}

/// `connections` clients sending on a fixed schedule, `rate` requests/s in all, driven from
/// one thread of its own: on the shared runtime a response could wake a second worker before
/// its task ran, and that hop was charged to the service (p50 0.21 against 0.25 ms, and fewer
/// p99 outliers, in alternating runs). It runs for as many [`WINDOW`]s as `plan` asks.
async fn paced(
    address: &str,
    connections: usize,
    rate: f64,
    plan: WindowPlan,
    requests: Arc<Vec<Arc<Vec<u8>>>>,
) -> anyhow::Result<Paced> {
    let address = address.to_owned();
    client::on_own_thread("paced-client", move || async move {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(watch_windows(started, Arc::clone(&stop), plan));
        let outcome = drive(&address, connections, Some(rate), started, stop, requests).await;
        let steal_percent = watcher.await?;
        let mut outcome = outcome?;
        // Requests answered after the last full window count for the rate only.
        outcome.windows.truncate(steal_percent.len());
        Ok(Paced {
            outcome,
            steal_percent,
        })
    })
    .await
}

/// Reads the host's steal at every window boundary and stops the phase when `plan` is met;
/// returns each window's steal. An unreadable `/proc/stat` counts as a quiet host.
async fn watch_windows(started: Instant, stop: Arc<AtomicBool>, plan: WindowPlan) -> Vec<f64> {
    let first = tokio::time::Instant::from_std(started + WARM_UP);
    tokio::time::sleep_until(first).await;
    let mut before = scrape::cpu_ticks();
    let mut steal = Vec::new();
    loop {
        tokio::time::sleep_until(first + WINDOW * (steal.len() as u32 + 1)).await;
        let now = scrape::cpu_ticks();
        steal.push(scrape::steal_percent(before, now));
        before = now;
        let quiet = steal.iter().filter(|s| is_quiet(**s)).count();
        let enough = steal.len() >= plan.min_windows && quiet >= plan.quiet_windows;
        if enough || steal.len() >= plan.max_windows {
            stop.store(true, Ordering::Relaxed);
            return steal;
        }
    }
}

/// `values` with `decimals` each, comma-separated.
fn list(values: &[f64], decimals: usize) -> String {
    let shown: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
    shown.join(", ")
}

/// `connections` clients sending on a fixed schedule (`rate` requests/s in all) when given,
/// back to back otherwise, on the runtime it is polled on, from `started` until `stop` is
/// set. Latency is measured from the moment a request is written, or, on a schedule, from
/// when it was due if a slow response held it back (so a stalled service is charged for the
/// requests it delayed); the [`WARM_UP`] is left out, and the rest is kept per [`WINDOW`].
async fn drive(
    address: &str,
    connections: usize,
    rate: Option<f64>,
    started: Instant,
    stop: Arc<AtomicBool>,
    requests: Arc<Vec<Arc<Vec<u8>>>>,
) -> anyhow::Result<Outcome> {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mut connection = Connection::open(address).await?;
        let requests = Arc::clone(&requests);
        let stop = Arc::clone(&stop);
        let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut windows: Vec<Histogram<u64>> = Vec::new();
            let (mut ok, mut failed) = (0u64, 0u64);
            let first = tokio::time::Instant::now()
                + interval.map_or(Duration::ZERO, |i| i.mul_f64(c as f64 / connections as f64));
            let mut k = 0u32;
            let mut previous_done = tokio::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let scheduled = interval.map(|interval| first + interval * k);
                if let Some(scheduled) = scheduled {
                    tokio::time::sleep_until(scheduled).await;
                }
                let request = &requests[(k as usize * connections + c) % requests.len()];
                // Coordinated omission: a request held back because the previous response was
                // late is timed from when it was due. One sent late only because the 1 ms timer
                // woke late, on a free connection, is timed from when it was written.
                let start = match scheduled {
                    Some(scheduled) if previous_done > scheduled => scheduled,
                    _ => tokio::time::Instant::now(),
                };
                match connection.send(request).await {
                    Ok((202, _)) => ok += 1,
                    Ok(_) | Err(_) => failed += 1,
                }
                previous_done = tokio::time::Instant::now();
                let since = started.elapsed();
                if since >= WARM_UP {
                    let window = ((since - WARM_UP).as_nanos() / WINDOW.as_nanos()) as usize;
                    if windows.len() <= window {
                        windows.resize_with(window + 1, || Histogram::new(3).unwrap());
                    }
                    windows[window]
                        .record((previous_done - start).as_micros() as u64)
                        .unwrap();
                }
                k += 1;
            }
            (ok, failed, windows)
        }));
    }
    let mut outcome = Outcome {
        accepted_requests: 0,
        failed_requests: 0,
        windows: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let (ok, failed, windows) = task.await?;
        outcome.accepted_requests += ok;
        outcome.failed_requests += failed;
        if outcome.windows.len() < windows.len() {
            outcome
                .windows
                .resize_with(windows.len(), || Histogram::new(3).unwrap());
        }
        for (all, window) in outcome.windows.iter_mut().zip(&windows) {
            all.add(window).unwrap();
        }
    }
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}

/// Records a back-to-back phase's event rate (with its goal), failures and request latency;
/// returns the events acknowledged.
fn record_phase(
    report: &mut Report,
    name: &str,
    outcome: &Outcome,
    events_per_request: u64,
    goal: f64,
) -> u64 {
    let acknowledged = outcome.accepted_requests * events_per_request;
    let rate = (acknowledged as f64 / outcome.elapsed.as_secs_f64()).round();
    report.figure(&format!("{name}_events_per_second"), rate);
    report.figure(&format!("{name}_failed_requests"), outcome.failed_requests);
    report.latency_figures(&format!("{name}_request_latency"), &outcome.latency_us());
    report.goals.push(Target::at_least(
        &format!("{name}_events_per_second"),
        goal,
        rate,
        "events/s",
    ));
    acknowledged
}

async fn over_http(report: &mut Report, phase: Duration) -> anyhow::Result<()> {
    let service = Service::start("metrics-processor", &[]).await?;
    let back_to_back = back_to_back(report, &service.address, phase).await?;
    let offered = paced_target(report, &service.address, phase).await?;
    report.targets.push(Target::at_most(
        "http_failed_requests",
        0.0,
        (back_to_back.failed_requests + offered.failed_requests) as f64,
        "requests",
    ));
    nothing_lost(
        report,
        &service.address,
        back_to_back.acknowledged + offered.acknowledged,
    )
    .await?;
    shutdown_under_load(report, service).await
}

/// What a phase over HTTP had acknowledged, and how many requests failed.
struct Sent {
    acknowledged: u64,
    failed_requests: u64,
}

/// The goals of single events (16 connections) and batches of 1,000 (4 connections), each
/// sent back to back for `phase`.
async fn back_to_back(report: &mut Report, address: &str, phase: Duration) -> anyhow::Result<Sent> {
    let mut acknowledged = 0u64;
    // Single events, 16 connections back to back.
    let timestamp = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut rng = Rng(5);
    let singles: Vec<Arc<Vec<u8>>> = (0..4_096)
        .map(|_| {
            Arc::new(request(
                "POST",
                "/v1/events",
                "application/json",
                event_json(&mut rng, &timestamp, 100).as_bytes(),
            ))
        })
        .collect();
    let progress = Progress::start("metrics: single events over HTTP", phase, None);
    let single = closed_loop(address, 16, phase, Arc::new(singles)).await?;
    drop(progress);
    acknowledged += record_phase(report, "http_single", &single, 1, 50_000.0);

    // Batches of 1,000, 4 connections back to back.
    let progress = Progress::start("metrics: batches over HTTP", phase, None);
    let batches = closed_loop(address, 4, phase, Arc::new(batch_requests(16, 1_000, 6))).await?;
    drop(progress);
    acknowledged += record_phase(report, "http_batch", &batches, 1_000, 1e6);

    Ok(Sent {
        acknowledged,
        failed_requests: single.failed_requests + batches.failed_requests,
    })
}

/// The stated targets of throughput and per-event p99, judged as ADR 0010 says.
async fn paced_target(report: &mut Report, address: &str, phase: Duration) -> anyhow::Result<Sent> {
    // The stated target: 100K events/s offered open-loop as 1,000 batches of 100 per second,
    // measured in 5 s windows beside the host's steal. This shared machine has spells of a
    // few seconds in which the hypervisor runs something else (quick runs once measured 0.44
    // to 6.9 ms in one hour), so the phase runs 15 s even in the quick form, goes on while
    // windows are disturbed (up to two minutes in the quick form: one CI run saw steal of
    // 3-20 % in all of its twelve windows), and the p99 is judged on the windows in which the
    // host took at most STEAL_LIMIT_PERCENT; every window is reported.
    let plan = if phase < Duration::from_secs(15) {
        WindowPlan {
            min_windows: 3,
            quiet_windows: 3,
            max_windows: 24,
        }
    } else {
        WindowPlan {
            min_windows: 6,
            quiet_windows: 6,
            max_windows: 36,
        }
    };
    // The service's own handler histogram over the phase tells a slow service from a wait
    // outside it (the kernel, the runtimes' queues, the host).
    const HANDLER: &str = "metrics_processor_http_request_duration_seconds";
    let handler_before = scrape::metrics(address).await?;
    let progress = Progress::start(
        "metrics: paced 100K events/s, until the host is quiet",
        WARM_UP + WINDOW * plan.min_windows as u32,
        Some(WARM_UP + WINDOW * plan.max_windows as u32),
    );
    let Paced {
        outcome: offered,
        steal_percent,
    } = paced(
        address,
        8,
        1_000.0,
        plan,
        Arc::new(batch_requests(64, 100, 7)),
    )
    .await?;
    drop(progress);
    let handler = scrape::metrics(address)
        .await?
        .get(HANDLER)
        .map(|after| after.since(handler_before.get(HANDLER).unwrap_or(&Default::default())))
        .with_context(|| format!("the service exports no {HANDLER}"))?;
    let handler_p99_ms = handler.quantile_bound(0.99).map(|s| s * 1e3);
    let handler_over = handler.above(0.000_8).unwrap_or(0);
    let all_windows = offered.latency_us();
    let client_over = all_windows.count_between(1_000, u64::MAX);
    report.figure("http_paced_service_handler_p99_bucket_ms", handler_p99_ms);
    report.figure("http_paced_service_handler_over_0_8_ms", handler_over);
    report.figure("http_paced_service_handler_observations", handler.total());
    report.figure("http_paced_client_over_1_ms", client_over);
    let offered_rate = (offered.accepted_requests * 100) as f64 / offered.elapsed.as_secs_f64();
    report.figure("http_paced_failed_requests", offered.failed_requests);
    report.latency_figures("http_paced_event_latency", &all_windows);
    let window_p99: Vec<f64> = offered
        .windows
        .iter()
        .map(|w| micros(w, 0.99) / 1e3)
        .collect();
    // At least two quiet windows (~10,000 samples) judge the client's p99. When the host
    // stole CPU in (nearly) every window, the client measured the hypervisor: the target is
    // then judged on the service's own handler histogram over the same phase, at the upper
    // bound of the bucket holding its p99 (0.8 ms or 1.6 ms around the limit), so a slow
    // service still fails; the client's figure over every window is kept as a goal.
    let quiet =
        scrape::quiet_stretches(offered.windows.iter().zip(steal_percent.iter().copied()), 2);
    let on_quiet = quiet.is_some();
    let quiet_count = quiet.as_ref().map_or(0, |q| q.count);
    let judged = quiet.map_or(all_windows, |q| q.merged);
    let client_p99 = micros(&judged, 0.99) / 1e3;
    report.figure("http_paced_window_seconds", WINDOW.as_secs());
    report.figure("http_paced_window_p99_ms", window_p99.clone());
    report.figure("http_paced_window_steal_percent", steal_percent.clone());
    report.figure("http_paced_steal_limit_percent", STEAL_LIMIT_PERCENT);
    report.figure("http_paced_quiet_windows", quiet_count);
    report.figure("http_paced_judged_samples", judged.len());
    report.figure(
        "http_paced_judged_on",
        if on_quiet {
            "client, quiet windows"
        } else {
            "service handler histogram (host never quiet)"
        },
    );
    println!(
        "metrics: paced 100K events/s, {} windows of {} s: p99 {} ms; host steal {} %; \
         client p99 {client_p99:.3} ms over {}",
        window_p99.len(),
        WINDOW.as_secs(),
        list(&window_p99, 3),
        list(&steal_percent, 2),
        if on_quiet {
            format!("{quiet_count} quiet windows")
        } else {
            format!(
                "all {} windows; fewer than two were quiet, so the target is judged inside \
                 the service",
                window_p99.len()
            )
        },
    );
    println!(
        "metrics: paced phase inside the service: handler p99 <= {} ms, {handler_over} of {} \
         over 0.8 ms; {client_over} requests over 1 ms at the client",
        handler_p99_ms.map_or("?".to_owned(), |ms| format!("{ms:.1}")),
        handler.total(),
    );
    // A 3 % allowance for the schedule's start-up and tokio's 1 ms timer granularity.
    report.targets.push(Target::at_least(
        "http_events_per_second_sustained",
        97_000.0,
        offered_rate.round(),
        "events/s",
    ));
    let (target, goal) = scrape::p99_verdict(
        "http_event_latency_p99",
        1.0,
        on_quiet,
        client_p99,
        handler_p99_ms,
    );
    report.targets.push(target);
    report.goals.extend(goal);

    Ok(Sent {
        acknowledged: offered.accepted_requests * 100,
        failed_requests: offered.failed_requests,
    })
}

/// The stated target that nothing acknowledged was lost: the service counts exactly what it
/// acknowledged.
async fn nothing_lost(report: &mut Report, address: &str, acknowledged: u64) -> anyhow::Result<()> {
    let mut connection = Connection::open(address).await?;
    let (status, body) = connection
        .send(&request(
            "GET",
            "/v1/aggregates?minutes=60",
            "application/json",
            b"",
        ))
        .await?;
    if status != 200 {
        bail!("GET /v1/aggregates answered {status}");
    }
    let aggregates: Value = serde_json::from_slice(&body)?;
    let counted: u64 = aggregates["event_types"].as_object().map_or(0, |types| {
        types.values().filter_map(|t| t["count"].as_u64()).sum()
    });
    report.figure("events_acknowledged", acknowledged);
    report.figure("events_counted_by_service", counted);
    report.targets.push(Target::at_most(
        "acknowledged_events_missing",
        0.0,
        acknowledged.abs_diff(counted) as f64,
        "events",
    ));

    Ok(())
}

/// The stated targets of peak memory and a clean shutdown within 5 s while two clients keep
/// sending batches.
async fn shutdown_under_load(report: &mut Report, service: Service) -> anyhow::Result<()> {
    let address = service.address.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(batch_requests(4, 1_000, 8));
    let mut loaders = Vec::new();
    for _ in 0..2 {
        let mut connection = Connection::open(&address).await?;
        let (stop, answered, requests) = (
            Arc::clone(&stop),
            Arc::clone(&answered),
            Arc::clone(&requests),
        );
        loaders.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                match connection.send(&requests[i % requests.len()]).await {
                    Ok((202, _)) => answered.fetch_add(1, Ordering::Relaxed),
                    _ => break,
                };
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, hwm) = service.memory()?;
    report.figure("service_rss_mb", rss as f64 / MB);
    report.targets.push(Target::below(
        "service_peak_rss",
        1024.0,
        hwm as f64 / MB,
        "MB",
    ));
    let (took, clean) = service.terminate(Duration::from_secs(10)).await?;
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        loader.await.ok();
    }
    report.figure("shutdown_clean_exit", clean);
    report.figure(
        "shutdown_batches_answered_under_load",
        answered.load(Ordering::Relaxed),
    );
    report.targets.push(Target::below(
        "shutdown_under_load",
        5.0,
        if clean {
            took.as_secs_f64()
        } else {
            f64::INFINITY
        },
        "s",
    ));
    Ok(())
}
