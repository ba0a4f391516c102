//! The JSON report every scenario writes (`target/loadtest/<scenario>.json`) and the table
//! it prints. Targets gate the exit code; figures are everything else worth recording. A
//! scenario that fails part-way keeps what it measured and records why it stopped.

use std::{fmt::Write as _, path::Path};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Map, Value};

/// A stated target and what was measured against it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured, e.g. `http_events_per_second`.
    pub name: String,
    /// The requirement, e.g. `>= 100000`.
    pub required: String,
    /// The measured value; `null` when it could not be measured (see `note`).
    pub measured: Option<f64>,
    /// Unit of `measured`.
    pub unit: String,
    /// Whether the requirement holds; false when not measured.
    pub pass: bool,
    /// Why a figure is missing, and how to get it measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Target {
    /// Passes when `measured >= minimum`.
    pub fn at_least(name: &str, minimum: f64, measured: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            required: format!(">= {}", number(minimum)),
            measured: Some(measured),
            unit: unit.into(),
            pass: measured >= minimum,
            note: None,
        }
    }

    /// Passes when `measured < limit`.
    pub fn below(name: &str, limit: f64, measured: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            required: format!("< {}", number(limit)),
            measured: Some(measured),
            unit: unit.into(),
            pass: measured < limit,
            note: None,
        }
    }

    /// Passes when `measured <= limit`.
    pub fn at_most(name: &str, limit: f64, measured: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            required: format!("<= {}", number(limit)),
            measured: Some(measured),
            unit: unit.into(),
            pass: measured <= limit,
            note: None,
        }
    }

    /// Passes when `measured == required`.
    pub fn exactly(name: &str, required: u64, measured: u64, unit: &str) -> Self {
        Self {
            name: name.into(),
            required: format!("= {required}"),
            measured: Some(measured as f64),
            unit: unit.into(),
            pass: measured == required,
            note: None,
        }
    }

    /// A requirement this run could not measure, with `why` (and how to make it measurable).
    /// Only goals may be left unmeasured: a stated target always is measured.
    pub fn not_measured(name: &str, required: &str, unit: &str, why: &str) -> Self {
        Self {
            name: name.into(),
            required: required.into(),
            measured: None,
            unit: unit.into(),
            pass: false,
            note: Some(why.into()),
        }
    }
}

/// A scenario's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Whether the short form ran.
    pub quick: bool,
    /// Stated targets; any miss makes the run fail.
    pub targets: Vec<Target>,
    /// Goals that are reported, met or not, without failing the run.
    pub goals: Vec<Target>,
    /// Every other figure measured.
    pub figures: Map<String, Value>,
    /// Why the scenario stopped before its end, when it did; the run then fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    /// An empty report.
    pub fn new(scenario: &str, quick: bool) -> Self {
        Self {
            scenario: scenario.into(),
            quick,
            targets: Vec::new(),
            goals: Vec::new(),
            figures: Map::new(),
            error: None,
        }
    }

    /// Records a figure.
    pub fn figure(&mut self, name: &str, value: impl Into<Value>) {
        self.figures.insert(name.into(), value.into());
    }

    /// Records a latency histogram (in microseconds) as `<name>_p50_ms`, `_p99_ms`,
    /// `_p999_ms`, `_max_ms` and `_samples`.
    pub fn latency_figures(&mut self, name: &str, histogram_us: &Histogram<u64>) {
        self.latency_figures_per_ms(name, histogram_us, 1e3);
    }

    /// [`Report::latency_figures`] of a histogram in nanoseconds.
    pub fn latency_figures_ns(&mut self, name: &str, histogram_ns: &Histogram<u64>) {
        self.latency_figures_per_ms(name, histogram_ns, 1e6);
    }

    fn latency_figures_per_ms(&mut self, name: &str, histogram: &Histogram<u64>, per_ms: f64) {
        let ms = |value: u64| value as f64 / per_ms;
        for (suffix, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            self.figure(
                &format!("{name}_{suffix}_ms"),
                ms(histogram.value_at_quantile(q)),
            );
        }
        self.figure(&format!("{name}_max_ms"), ms(histogram.max()));
        self.figure(&format!("{name}_samples"), histogram.len());
    }

    /// True when the scenario ran to its end and every stated target holds.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.targets.iter().all(|t| t.pass)
    }

    /// Writes `<dir>/<scenario>.json`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.scenario));
        let json = serde_json::to_string_pretty(self).context("failed to encode the report")?;
        std::fs::write(&path, json)
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(path)
    }
}

fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

/// Renders the targets and goals of `reports` as one table.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<6} {:<40} {:>14} {:>16} {:<8} result",
        "scenario", "kind", "name", "required", "measured", "unit"
    );
    for report in reports {
        let rows = report
            .targets
            .iter()
            .map(|t| ("target", t))
            .chain(report.goals.iter().map(|t| ("goal", t)));
        for (kind, t) in rows {
            let verdict = match (kind, t.pass, t.measured) {
                (_, true, _) => "PASS",
                ("target", false, _) => "FAIL",
                (_, false, None) => "not measured",
                _ => "missed",
            };
            let measured = t.measured.map_or_else(|| "-".to_owned(), number);
            let _ = writeln!(
                out,
                "{:<10} {:<6} {:<40} {:>14} {:>16} {:<8} {}",
                report.scenario, kind, t.name, t.required, measured, t.unit, verdict
            );
            if let Some(note) = &t.note {
                let _ = writeln!(out, "{:<10} {:<6}   {note}", "", "");
            }
        }
        if let Some(error) = &report.error {
            let _ = writeln!(
                out,
                "{:<10} {:<6} {:<40} {:>14} {:>16} {:<8} FAIL",
                report.scenario, "error", "stopped before its end", "", "", ""
            );
            let _ = writeln!(out, "{:<10} {:<6}   {error}", "", "");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmeasured_goal_is_shown_with_its_reason_and_fails_nothing() {
        let mut report = Report::new("gateway", true);
        report
            .targets
            .push(Target::at_most("errors", 0.0, 0.0, "requests"));
        report.goals.push(Target::not_measured(
            "gateway_vs_nginx_throughput",
            ">= 0.8",
            "ratio",
            "nginx is not installed: apt-get install nginx-light",
        ));
        assert!(report.passed());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["goals"][0]["measured"], Value::Null);
        assert_eq!(json["goals"][0]["pass"], false);
        assert!(json.get("error").is_none());
        let table = table(&[report]);
        assert!(table.contains("not measured"), "{table}");
        assert!(table.contains("apt-get install nginx-light"), "{table}");
    }

    #[test]
    fn a_scenario_that_stopped_fails_and_says_why() {
        let mut report = Report::new("notify", true);
        report
            .targets
            .push(Target::at_least("connections", 5.0, 5.0, "connections"));
        report.error = Some("the service exited".into());
        assert!(!report.passed());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["error"], "the service exited");
        assert!(table(&[report]).contains("the service exited"));
    }

    #[test]
    fn latency_figures_are_in_milliseconds() {
        let mut histogram = Histogram::<u64>::new(3).unwrap();
        for micros in 1..=1_000 {
            histogram.record(micros).unwrap();
        }
        let mut report = Report::new("metrics", true);
        report.latency_figures("x", &histogram);
        let p99 = report.figures["x_p99_ms"].as_f64().unwrap();
        assert!((0.98..=1.0).contains(&p99), "{p99}");
        assert_eq!(report.figures["x_samples"], 1_000);
        assert_eq!(report.figures["x_max_ms"].as_f64().unwrap(), 1.0);
    }
}
