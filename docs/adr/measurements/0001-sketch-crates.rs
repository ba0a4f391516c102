//! Compares metrics-processor's own DDSketch and HyperLogLog with the crates that offer the
//! same sketches, on the same inputs (ADR 0001, "Sketch crates").
//!
//! Not compiled by the workspace. To build and run it, from the repository root:
//!
//! ```text
//! mkdir -p /tmp/sketchcmp/src
//! cp docs/adr/measurements/0001-sketch-crates.rs /tmp/sketchcmp/src/main.rs
//! ln -s "$PWD/metrics-processor/src/ddsketch.rs" /tmp/sketchcmp/src/ddsketch.rs
//! ln -s "$PWD/metrics-processor/src/hyperloglog.rs" /tmp/sketchcmp/src/hyperloglog.rs
//! cat > /tmp/sketchcmp/Cargo.toml <<'EOF'
//! [package]
//! name = "sketchcmp"
//! version = "0.1.0"
//! edition = "2024"
//! publish = false
//!
//! [dependencies]
//! sketches-ddsketch = "0.4"
//! hyperloglogplus = "0.4"
//! hyperloglockless = "0.5"
//! datasketches = { version = "0.6", features = ["hll"] }
//! xxhash-rust = { version = "0.8", features = ["xxh3"] }
//!
//! [profile.release]
//! debug = "line-tables-only"
//! codegen-units = 16
//! lto = "thin"
//! EOF
//! cd /tmp/sketchcmp && CARGO_TARGET_DIR=/tmp/sketchcmp/target cargo build --release
//! target/release/sketchcmp accuracy          # relative errors and memory, natively
//! # instructions of one operation: run twice under callgrind and divide the difference
//! for n in 100000 200000; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg.$n target/release/sketchcmp dd_insert ours $n
//! done
//! ```
//!
//! Operations counted: `dd_insert`, `dd_merge`, `dd_quantile`, `hll_insert`, `hll_merge`,
//! `hll_estimate`; implementations: `ours` and `crate` for DDSketch, `ours`, `hllplus`
//! (hyperloglogplus), `lockless` (hyperloglockless) and `datasketches` for HyperLogLog. The
//! inputs of an operation are built before it, at a size independent of the count `n`, so
//! the difference of two runs is the operation alone.

#[allow(dead_code)]
mod ddsketch;
#[allow(dead_code)]
mod hyperloglog;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicUsize, Ordering},
};

use datasketches::hll::{HllSketch, HllType, HllUnion};
use hyperloglogplus::{HyperLogLog as _, HyperLogLogPlus};
use sketches_ddsketch::{Config, DDSketch};
use xxhash_rust::xxh3::Xxh3Builder;

/// Counts live heap bytes, so a sketch's memory is what it really allocated.
struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Heap bytes `build` leaves allocated in what it returns, plus the value's own size.
fn footprint<T>(build: impl FnOnce() -> T) -> (usize, T) {
    let before = LIVE.load(Ordering::Relaxed);
    let value = build();
    let heap = LIVE.load(Ordering::Relaxed) - before;
    (heap + std::mem::size_of::<T>(), value)
}

/// A deterministic generator, so every implementation sees the same inputs.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// A latency-like value: log-normal around `median_ms`, σ = 1 (p99 ≈ 10 × median).
    fn latency_ms(&mut self, median_ms: f64) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        let normal = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
        median_ms * normal.exp()
    }
}

/// One minute's values: `n` latencies whose median drifts with the minute.
fn minute_values(minute: u64, n: usize) -> Vec<f64> {
    let mut rng = SplitMix(0x5eed ^ minute);
    let median = 5.0 * (1.0 + 0.5 * ((minute as f64) / 10.0).sin());
    (0..n).map(|_| rng.latency_ms(median)).collect()
}

/// User ids of one minute: `n` of them, from a population of `population`.
fn minute_users(minute: u64, n: usize, population: u64) -> Vec<String> {
    let mut rng = SplitMix(0xface ^ minute);
    (0..n)
        .map(|_| format!("user-{}", rng.next_u64() % population))
        .collect()
}

fn crate_config() -> Config {
    // The same accuracy, bin cap and smallest magnitude as ours (ours caps each sign).
    Config::new(ddsketch::RELATIVE_ACCURACY, ddsketch::MAX_BINS as u32, ddsketch::MIN_INDEXABLE)
}

const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
}

fn relative_error(estimate: f64, exact: f64) -> f64 {
    (estimate - exact).abs() / exact.abs()
}

fn accuracy() {
    const MINUTES: u64 = 60;
    const PER_MINUTE: usize = 20_000;
    println!("## DDSketch, 1 % relative accuracy, {MINUTES} minutes × {PER_MINUTE} log-normal values");
    let minutes: Vec<Vec<f64>> = (0..MINUTES).map(|m| minute_values(m, PER_MINUTE)).collect();
    let mut all: Vec<f64> = minutes.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let mut one: Vec<f64> = minutes[0].clone();
    one.sort_by(f64::total_cmp);

    let (ours_minute_bytes, ours_minutes) = footprint(|| {
        minutes
            .iter()
            .map(|values| {
                let mut sketch = ddsketch::MinuteSketch::default();
                values.iter().for_each(|&v| sketch.add(v));
                sketch
            })
            .collect::<Vec<_>>()
    });
    let (crate_minute_bytes, crate_minutes) = footprint(|| {
        minutes
            .iter()
            .map(|values| {
                let mut sketch = DDSketch::new(crate_config());
                values.iter().for_each(|&v| sketch.add(v));
                sketch
            })
            .collect::<Vec<_>>()
    });
    println!(
        "memory per minute sketch (heap + struct, mean of {MINUTES}): ours {} B, sketches-ddsketch {} B",
        (ours_minute_bytes - 24) / MINUTES as usize,
        (crate_minute_bytes - 24) / MINUTES as usize,
    );
    let mut ours_window = ddsketch::WindowSketch::default();
    let mut crate_window = DDSketch::new(crate_config());
    for (ours, theirs) in ours_minutes.iter().zip(&crate_minutes) {
        ours_window.merge(ours);
        crate_window.merge(theirs).expect("same config");
    }
    let mut ours_first = ddsketch::WindowSketch::default();
    ours_first.merge(&ours_minutes[0]);
    println!("| quantile | exact (1 min) | ours | crate | exact (60 min) | ours | crate |");
    println!("|---|---|---|---|---|---|---|");
    for q in QUANTILES {
        let (e1, e60) = (exact_quantile(&one, q), exact_quantile(&all, q));
        let o1 = ours_first.quantile(q).unwrap();
        let c1 = crate_minutes[0].quantile(q).unwrap().unwrap();
        let o60 = ours_window.quantile(q).unwrap();
        let c60 = crate_window.quantile(q).unwrap().unwrap();
        println!(
            "| p{} | {e1:.3} ms | {:+.3} % | {:+.3} % | {e60:.3} ms | {:+.3} % | {:+.3} % |",
            q * 100.0,
            100.0 * (o1 - e1) / e1,
            100.0 * (c1 - e1) / e1,
            100.0 * (o60 - e60) / e60,
            100.0 * (c60 - e60) / e60,
        );
    }
    let worst = |estimate: &dyn Fn(f64) -> f64, sorted: &[f64]| {
        (1..1000)
            .map(|i| f64::from(i) / 1000.0)
            .map(|q| relative_error(estimate(q), exact_quantile(sorted, q)))
            .fold(0.0, f64::max)
    };
    println!(
        "worst relative error over q = 0.001..0.999, 60-minute window: ours {:.3} %, crate {:.3} %",
        100.0 * worst(&|q| ours_window.quantile(q).unwrap(), &all),
        100.0 * worst(&|q| crate_window.quantile(q).unwrap().unwrap(), &all),
    );

    println!();
    println!("## HyperLogLog, 2^10 registers");
    println!("| distinct | ours | hyperloglogplus | hyperloglockless | datasketches Hll8 |");
    println!("|---|---|---|---|---|");
    for distinct in [100u64, 1_000, 10_000, 100_000, 1_000_000] {
        const TRIALS: u64 = 64;
        let mut errors = [0.0f64; 4];
        for trial in 0..TRIALS {
            let ids: Vec<String> = (0..distinct).map(|i| format!("user-{trial}-{i}")).collect();
            let estimates = [
                {
                    let mut s = hyperloglog::HyperLogLog::default();
                    ids.iter().for_each(|id| s.insert(id.as_bytes()));
                    s.estimate() as f64
                },
                {
                    let mut s = hllplus();
                    ids.iter().for_each(|id| s.insert(id.as_str()));
                    s.count()
                },
                {
                    let mut s = hyperloglockless::HyperLogLog::new(10);
                    ids.iter().for_each(|id| s.insert(id.as_str()));
                    s.count() as f64
                },
                {
                    let mut s = HllSketch::new(10, HllType::Hll8).unwrap();
                    ids.iter().for_each(|id| s.update(id.as_str()));
                    s.estimate()
                },
            ];
            for (error, estimate) in errors.iter_mut().zip(estimates) {
                *error += relative_error(estimate, distinct as f64).powi(2);
            }
        }
        let rms = errors.map(|e| 100.0 * (e / TRIALS as f64).sqrt());
        println!(
            "| {distinct} | {:.2} % | {:.2} % | {:.2} % | {:.2} % |",
            rms[0], rms[1], rms[2], rms[3]
        );
    }
    for distinct in [100u64, 5_000, 1_000_000] {
        let ids: Vec<String> = (0..distinct).map(|i| format!("user-{i}")).collect();
        let (ours, _) = footprint(|| {
            let mut s = hyperloglog::HyperLogLog::default();
            ids.iter().for_each(|id| s.insert(id.as_bytes()));
            s
        });
        let (plus, _) = footprint(|| {
            let mut s = hllplus();
            ids.iter().for_each(|id| s.insert(id.as_str()));
            s.count();
            s
        });
        let (lockless, _) = footprint(|| {
            let mut s = hyperloglockless::HyperLogLog::new(10);
            ids.iter().for_each(|id| s.insert(id.as_str()));
            s
        });
        let (sketches, _) = footprint(|| {
            let mut s = HllSketch::new(10, HllType::Hll8).unwrap();
            ids.iter().for_each(|id| s.update(id.as_str()));
            s
        });
        println!(
            "memory at {distinct} distinct (heap + struct): ours {ours} B, hyperloglogplus {plus} B, \
             hyperloglockless {lockless} B, datasketches {sketches} B"
        );
    }
}

type HllPlus = HyperLogLogPlus<str, Xxh3Builder>;

fn hllplus() -> HllPlus {
    HyperLogLogPlus::new(10, Xxh3Builder::new()).unwrap()
}

/// Runs `n` times the operation `op` of implementation `which`.
fn count(op: &str, which: &str, n: usize) {
    const INPUTS: usize = 200_000;
    match (op, which) {
        ("dd_insert", "ours") => {
            let values = minute_values(0, INPUTS);
            let mut sketch = ddsketch::MinuteSketch::default();
            values.iter().cycle().take(n).for_each(|&v| sketch.add(black_box(v)));
            black_box(sketch.count());
        }
        ("dd_insert", "crate") => {
            let values = minute_values(0, INPUTS);
            let mut sketch = DDSketch::new(crate_config());
            values.iter().cycle().take(n).for_each(|&v| sketch.add(black_box(v)));
            black_box(sketch.count());
        }
        ("dd_merge", "ours") => {
            let minutes: Vec<_> = (0..60)
                .map(|m| {
                    let mut s = ddsketch::MinuteSketch::default();
                    minute_values(m, 20_000).iter().for_each(|&v| s.add(v));
                    s
                })
                .collect();
            let mut window = ddsketch::WindowSketch::default();
            minutes.iter().cycle().take(n).for_each(|m| window.merge(black_box(m)));
            black_box(window.count());
        }
        ("dd_merge", "crate") => {
            let minutes: Vec<_> = (0..60)
                .map(|m| {
                    let mut s = DDSketch::new(crate_config());
                    minute_values(m, 20_000).iter().for_each(|&v| s.add(v));
                    s
                })
                .collect();
            let mut window = DDSketch::new(crate_config());
            minutes
                .iter()
                .cycle()
                .take(n)
                .for_each(|m| window.merge(black_box(m)).unwrap());
            black_box(window.count());
        }
        ("dd_quantile", "ours") => {
            let mut window = ddsketch::WindowSketch::default();
            let mut minute = ddsketch::MinuteSketch::default();
            minute_values(0, INPUTS).iter().for_each(|&v| minute.add(v));
            window.merge(&minute);
            (0..n).for_each(|_| {
                black_box(window.quantile(black_box(0.99)));
            });
        }
        ("dd_quantile", "crate") => {
            let mut window = DDSketch::new(crate_config());
            minute_values(0, INPUTS).iter().for_each(|&v| window.add(v));
            (0..n).for_each(|_| {
                black_box(window.quantile(black_box(0.99)).unwrap());
            });
        }
        ("hll_insert", _) => {
            let users = minute_users(0, INPUTS, 50_000);
            let users = users.iter().cycle().take(n);
            match which {
                "ours" => {
                    let mut s = hyperloglog::HyperLogLog::default();
                    users.for_each(|u| s.insert(black_box(u.as_bytes())));
                    black_box(s.heap_bytes());
                }
                "hllplus" => {
                    let mut s = hllplus();
                    users.for_each(|u| s.insert(black_box(u.as_str())));
                    black_box(&s);
                }
                "lockless" => {
                    let mut s = hyperloglockless::HyperLogLog::new(10);
                    users.for_each(|u| s.insert(black_box(u.as_str())));
                    black_box(&s);
                }
                "datasketches" => {
                    let mut s = HllSketch::new(10, HllType::Hll8).unwrap();
                    users.for_each(|u| s.update(black_box(u.as_str())));
                    black_box(&s);
                }
                other => panic!("unknown implementation {other}"),
            }
        }
        ("hll_merge" | "hll_estimate", _) => {
            let minutes: Vec<Vec<String>> = (0..60).map(|m| minute_users(m, 5_000, 50_000)).collect();
            let merging = op == "hll_merge";
            match which {
                "ours" => {
                    let sketches: Vec<_> = minutes
                        .iter()
                        .map(|ids| {
                            let mut s = hyperloglog::HyperLogLog::default();
                            ids.iter().for_each(|id| s.insert(id.as_bytes()));
                            s
                        })
                        .collect();
                    let mut window = hyperloglog::HyperLogLog::default();
                    if merging {
                        sketches.iter().cycle().take(n).for_each(|s| window.merge(black_box(s)));
                    } else {
                        sketches.iter().for_each(|s| window.merge(s));
                        (0..n).for_each(|_| {
                            black_box(black_box(&window).estimate());
                        });
                    }
                    black_box(window.estimate());
                }
                "hllplus" => {
                    let sketches: Vec<_> = minutes
                        .iter()
                        .map(|ids| {
                            let mut s = hllplus();
                            ids.iter().for_each(|id| s.insert(id.as_str()));
                            s
                        })
                        .collect();
                    let mut window = hllplus();
                    if merging {
                        sketches
                            .iter()
                            .cycle()
                            .take(n)
                            .for_each(|s| window.merge(black_box(s)).unwrap());
                    } else {
                        sketches.iter().for_each(|s| window.merge(s).unwrap());
                        (0..n).for_each(|_| {
                            black_box(black_box(&mut window).count());
                        });
                    }
                    black_box(window.count());
                }
                "lockless" => {
                    let sketches: Vec<_> = minutes
                        .iter()
                        .map(|ids| {
                            let mut s = hyperloglockless::HyperLogLog::new(10);
                            ids.iter().for_each(|id| s.insert(id.as_str()));
                            s
                        })
                        .collect();
                    let mut window = hyperloglockless::HyperLogLog::new(10);
                    if merging {
                        sketches
                            .iter()
                            .cycle()
                            .take(n)
                            .for_each(|s| window.union(black_box(s)).unwrap());
                    } else {
                        sketches.iter().for_each(|s| window.union(s).unwrap());
                        (0..n).for_each(|_| {
                            black_box(black_box(&window).count());
                        });
                    }
                    black_box(window.count());
                }
                "datasketches" => {
                    let sketches: Vec<_> = minutes
                        .iter()
                        .map(|ids| {
                            let mut s = HllSketch::new(10, HllType::Hll8).unwrap();
                            ids.iter().for_each(|id| s.update(id.as_str()));
                            s
                        })
                        .collect();
                    let mut window = HllUnion::new(10).unwrap();
                    if merging {
                        sketches.iter().cycle().take(n).for_each(|s| window.update(black_box(s)));
                    } else {
                        sketches.iter().for_each(|s| window.update(s));
                        (0..n).for_each(|_| {
                            black_box(black_box(&window).estimate());
                        });
                    }
                    black_box(window.estimate());
                }
                other => panic!("unknown implementation {other}"),
            }
        }
        other => panic!("unknown operation {other:?}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [accuracy_only] if accuracy_only == "accuracy" => accuracy(),
        [op, which, n] => count(op, which, n.parse().expect("n is a count")),
        _ => {
            eprintln!("usage: sketchcmp accuracy | sketchcmp <operation> <implementation> <n>");
            std::process::exit(2);
        }
    }
}
