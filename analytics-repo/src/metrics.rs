//! The service's own metrics (the HTTP ones come from `common::prometheus`), all prefixed
//! `analytics_repo_`.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{cache::Outcome, repository::Ingested};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReportLabels {
    report: &'static str,
    cache: &'static str,
}

/// Ingest, reports and maintenance.
#[derive(Debug)]
pub struct Metrics {
    rows: Counter,
    late_rows: Counter,
    batches: Counter,
    batch_seconds: Histogram,
    report_seconds: Family<ReportLabels, Histogram, fn() -> Histogram>,
    partitions_created: Counter,
    default_rows_moved: Counter,
    maintenance_lock_timeouts: Counter,
    maintenance_errors: Counter,
    watermark_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    rolled_rows: Counter,
}

fn histogram() -> Histogram {
    // 100 µs to about 6.5 s: a cached report is sub-millisecond, a cold one at 100M rows
    // tens of milliseconds, a batch of 10,000 rows tens of milliseconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 17,
    ))
}

impl Metrics {
    /// Registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            rows: Counter::default(),
            late_rows: Counter::default(),
            batches: Counter::default(),
            batch_seconds: histogram(),
            report_seconds: Family::new_with_constructor(histogram),
            partitions_created: Counter::default(),
            default_rows_moved: Counter::default(),
            maintenance_lock_timeouts: Counter::default(),
            maintenance_errors: Counter::default(),
            watermark_lag: Gauge::default(),
            rolled_rows: Counter::default(),
        };
        registry.register("ingested_rows", "Events stored", metrics.rows.clone());
        registry.register(
            "ingested_late_rows",
            "Events stored for days already closed (added to the rollups as they came)",
            metrics.late_rows.clone(),
        );
        registry.register(
            "ingested_batches",
            "Batches stored",
            metrics.batches.clone(),
        );
        registry.register(
            "ingest_batch_seconds",
            "Time to store a batch, from its parse to its commit",
            metrics.batch_seconds.clone(),
        );
        registry.register(
            "report_seconds",
            "Time to answer a report request, by report and cache outcome",
            metrics.report_seconds.clone(),
        );
        registry.register(
            "partitions_created",
            "Monthly partitions made by maintenance",
            metrics.partitions_created.clone(),
        );
        registry.register(
            "default_partition_rows_moved",
            "Rows moved out of the default partition into their month",
            metrics.default_rows_moved.clone(),
        );
        registry.register(
            "maintenance_lock_timeouts",
            "Partition steps given up because their locks were not had within lock_timeout",
            metrics.maintenance_lock_timeouts.clone(),
        );
        registry.register(
            "maintenance_errors",
            "Maintenance rounds that failed (retried next round)",
            metrics.maintenance_errors.clone(),
        );
        registry.register(
            "rollup_watermark_lag_seconds",
            "How far the roll-up watermark was behind the clock after the last roll-up",
            metrics.watermark_lag.clone(),
        );
        registry.register(
            "rolled_up_rows",
            "Raw rows folded into the rollups by the roll-up",
            metrics.rolled_rows.clone(),
        );
        metrics
    }

    /// A batch stored.
    pub fn ingested(&self, ingested: &Ingested, took: Duration) {
        self.rows.inc_by(ingested.rows);
        self.late_rows.inc_by(ingested.late_rows);
        self.batches.inc();
        self.batch_seconds.observe(took.as_secs_f64());
    }

    /// A report answered.
    pub fn report(&self, report: &'static str, outcome: Outcome, took: Duration) {
        self.report_seconds
            .get_or_create(&ReportLabels {
                report,
                cache: outcome.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    /// A maintenance round's outcome.
    pub fn maintained(&self, round: &crate::partitions::Round) {
        self.partitions_created.inc_by(round.created.len() as u64);
        self.default_rows_moved.inc_by(round.drained_rows);
        self.maintenance_lock_timeouts
            .inc_by(u64::from(round.lock_timeouts));
    }

    /// A maintenance round failed.
    pub fn maintenance_failed(&self) {
        self.maintenance_errors.inc();
    }

    /// A roll-up done: the rows it folded, and the watermark it left.
    pub fn rolled_up(&self, rows: u64, watermark: chrono::DateTime<chrono::Utc>) {
        self.rolled_rows.inc_by(rows);
        let lag = (chrono::Utc::now() - watermark).num_milliseconds() as f64 / 1e3;
        self.watermark_lag.set(lag.max(0.0));
    }
}
