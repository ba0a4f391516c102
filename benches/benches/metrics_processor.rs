//! Benchmarks of the metrics-processor core: ingest on one and two threads, batch ingest,
//! and `get_aggregates(60)` over 1,000 event types with every minute filled, warm (the
//! sealed minutes cached, as when a dashboard polls) and cold (every minute merged).
//!
//! Run: `cargo bench -p benches --bench metrics_processor`.

use std::{hint::black_box, sync::Arc, thread, time::Instant};

use chrono::DateTime;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use metrics_processor::{
    Event, EventType, MetricsProcessor, ProcessorConfig, UserId, clock::ManualClock,
};

const NOW_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

/// Deterministic events: `types` event types, a million users, values log-uniform over
/// 1 ms .. 1 s (the spread of request latencies), timestamps inside the last minute.
fn events(count: usize, types: usize, seed: u64) -> Vec<Event> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let type_names: Vec<EventType> = (0..types)
        .map(|t| EventType::parse(&format!("type-{t}")).unwrap())
        .collect();
    (0..count)
        .map(|_| {
            let r = next();
            Event {
                timestamp: DateTime::from_timestamp_millis(NOW_MS - (r % 50_000) as i64).unwrap(),
                user_id: UserId::parse(&format!("user-{}", (r >> 20) % 1_000_000)).unwrap(),
                event_type: type_names[(r >> 40) as usize % types].clone(),
                value: 10f64.powf(((r >> 11) as f64 / (1u64 << 53) as f64) * 3.0),
            }
        })
        .collect()
}

fn processor(types: usize) -> Arc<MetricsProcessor> {
    let config = ProcessorConfig {
        max_event_types: types,
        ..ProcessorConfig::default()
    };
    Arc::new(MetricsProcessor::with_clock(
        config,
        Arc::new(ManualClock::new(NOW_MS)),
    ))
}

fn process_event(c: &mut Criterion) {
    let mut group = c.benchmark_group("process_event");
    for threads in [1usize, 2] {
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_with_input(
            BenchmarkId::new("threads", threads),
            &threads,
            |b, &threads| {
                let processor = processor(1_000);
                let inputs: Vec<Vec<Event>> = (0..threads)
                    .map(|t| events(1 << 16, 1_000, t as u64 + 1))
                    .collect();
                b.iter_custom(|iters| {
                    thread::scope(|scope| {
                        let started = Instant::now();
                        for input in &inputs {
                            let processor = &processor;
                            scope.spawn(move || {
                                for event in input.iter().cycle().take(iters as usize) {
                                    processor.process_event(black_box(event.clone())).unwrap();
                                }
                            });
                        }
                        started
                    })
                    .elapsed()
                });
            },
        );
    }
    group.finish();
}

fn process_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("process_batch");
    let batch = events(1_000, 1_000, 9);
    group.throughput(Throughput::Elements(batch.len() as u64));
    let processor = processor(1_000);
    group.bench_function("1000_events", |b| {
        b.iter_batched(
            || batch.clone(),
            |events| processor.process_batch(events),
            criterion::BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn get_aggregates(c: &mut Criterion) {
    let mut group = c.benchmark_group("get_aggregates");
    group.sample_size(30);
    let clock = Arc::new(ManualClock::new(NOW_MS - 59 * 60_000));
    let processor = Arc::new(MetricsProcessor::with_clock(
        ProcessorConfig {
            max_event_types: 1_000,
            ..ProcessorConfig::default()
        },
        clock.clone(),
    ));
    // 60 minutes × 1,000 types, 500 events in every type-minute (30M events).
    let minute = events(500_000, 1_000, 42);
    for m in 0..60 {
        clock.set(NOW_MS - (59 - m) * 60_000);
        let shift = chrono::Duration::milliseconds(-(59 - m) * 60_000);
        for event in &minute {
            let mut event = event.clone();
            event.timestamp += shift;
            processor.process_event(event).unwrap();
        }
    }
    assert_eq!(
        processor.get_aggregates(60).unwrap().event_types.len(),
        1_000
    );
    // Warm: the same window again, as a dashboard polls it (sealed minutes cached).
    group.bench_function("60_minutes_1000_types", |b| {
        b.iter(|| processor.get_aggregates(black_box(60)).unwrap())
    });
    // A dashboard polling three windows in turn (each type caches up to four).
    group.bench_function("dashboard_5_15_60_minutes_1000_types", |b| {
        b.iter(|| {
            for minutes in [5, 15, 60] {
                black_box(processor.get_aggregates(minutes).unwrap());
            }
        })
    });
    // Cold: six windows in turn, more than the four each type caches, so every query
    // merges all of its minutes.
    let mut minutes = 55;
    group.bench_function("60_minutes_1000_types_cold", |b| {
        b.iter(|| {
            minutes = if minutes == 60 { 55 } else { minutes + 1 };
            processor.get_aggregates(black_box(minutes)).unwrap()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(4));
    targets = process_event, process_batch, get_aggregates
}
criterion_main!(benches);
