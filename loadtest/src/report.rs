//! The JSON report every scenario writes (`target/loadtest/<scenario>.json`) and the table
//! it prints. Targets gate the exit code; figures are everything else worth recording.

use std::{fmt::Write as _, path::Path};

use anyhow::Context;
use serde::Serialize;
use serde_json::{Map, Value};

/// A stated target and what was measured against it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured, e.g. `http_events_per_second`.
    pub name: String,
    /// The requirement, e.g. `>= 100000`.
    pub required: String,
    /// The measured value.
    pub measured: f64,
    /// Unit of `measured`.
    pub unit: String,
    /// Whether the requirement holds.
    pub pass: bool,
}

impl Target {
    /// Passes when `measured >= minimum`.
    pub fn at_least(name: &str, minimum: f64, measured: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            required: format!(">= {}", number(minimum)),
            measured,
            unit: unit.into(),
            pass: measured >= minimum,
        }
    }

    /// Passes when `measured < limit`.
    pub fn below(name: &str, limit: f64, measured: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            required: format!("< {}", number(limit)),
            measured,
            unit: unit.into(),
            pass: measured < limit,
        }
    }

    /// Passes when `measured <= limit`.
    pub fn at_most(name: &str, limit: f64, measured: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            required: format!("<= {}", number(limit)),
            measured,
            unit: unit.into(),
            pass: measured <= limit,
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
        }
    }

    /// Records a figure.
    pub fn figure(&mut self, name: &str, value: impl Into<Value>) {
        self.figures.insert(name.into(), value.into());
    }

    /// True when every stated target holds.
    pub fn passed(&self) -> bool {
        self.targets.iter().all(|t| t.pass)
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
            let verdict = match (kind, t.pass) {
                (_, true) => "PASS",
                ("target", false) => "FAIL",
                _ => "missed",
            };
            let _ = writeln!(
                out,
                "{:<10} {:<6} {:<40} {:>14} {:>16} {:<8} {}",
                report.scenario,
                kind,
                t.name,
                t.required,
                number(t.measured),
                t.unit,
                verdict
            );
        }
    }
    out
}
