//! What a service and the machine say about a phase: Prometheus histograms scraped from a
//! service's admin port before and after it, and the CPU time the host took from this guest.
//!
//! Both attribute a latency tail. A slow request the client saw that the service's own
//! histogram did not see waited outside the service's handler (in the kernel, the runtime's
//! queue, or the client); one the service saw in a dependency's histogram waited there. And
//! while the host steals CPU time from the guest, every process of the run stalls at once.

use std::collections::BTreeMap;

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::{
    client::{self, Connection},
    report::Target,
};

/// Cumulative bucket counts by upper bound (seconds), summed over every label set of one
/// histogram family.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(BTreeMap<u64, u64>);

/// Bucket bounds are kept in nanoseconds: whole numbers order and compare exactly.
fn nanos(seconds: f64) -> u64 {
    (seconds * 1e9).round() as u64
}

impl Buckets {
    /// Observations in all.
    pub fn total(&self) -> u64 {
        self.0.values().next_back().copied().unwrap_or(0)
    }

    /// Observations above `bound` seconds, which must be one of the family's bucket bounds.
    pub fn above(&self, bound: f64) -> Option<u64> {
        let at = self.0.get(&nanos(bound))?;
        Some(self.total() - at)
    }

    /// The upper bound (seconds) of the bucket holding quantile `q`; None when empty, and
    /// infinity when it lies beyond the last finite bound.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil() as u64;
        self.0
            .iter()
            .find(|&(_, &count)| count >= rank)
            .map(|(&bound, _)| {
                if bound == u64::MAX {
                    f64::INFINITY
                } else {
                    bound as f64 / 1e9
                }
            })
    }

    /// What was observed between `earlier` and `self` (counters only grow).
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(&bound, &count)| {
                    let before = earlier.0.get(&bound).copied().unwrap_or(0);
                    (bound, count.saturating_sub(before))
                })
                .collect(),
        )
    }
}

/// Every histogram family in a Prometheus text exposition, by name (without `_bucket`).
#[cfg(test)]
pub fn histograms(exposition: &str) -> BTreeMap<String, Buckets> {
    histograms_with(exposition, &[])
}

/// [`histograms`] of the series that carry every one of `labels` (each `name="value"`), e.g.
/// one route's requests out of a family labelled by method and route.
pub fn histograms_with(exposition: &str, labels: &[&str]) -> BTreeMap<String, Buckets> {
    let mut families: BTreeMap<String, Buckets> = BTreeMap::new();
    for line in exposition.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels_text)) = series.split_once('{') else {
            continue;
        };
        let label_set: Vec<&str> = labels_text.trim_end_matches('}').split(',').collect();
        if !labels.iter().all(|wanted| label_set.contains(wanted)) {
            continue;
        }
        let labels = labels_text;
        let Some(family) = name.strip_suffix("_bucket") else {
            continue;
        };
        let Some(le) = labels
            .split(',')
            .find_map(|label| label.trim_end_matches('}').strip_prefix("le=\""))
            .map(|le| le.trim_end_matches('"'))
        else {
            continue;
        };
        let bound = if le == "+Inf" {
            u64::MAX
        } else {
            match le.parse::<f64>() {
                Ok(seconds) => nanos(seconds),
                Err(_) => continue,
            }
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        *families
            .entry(family.to_owned())
            .or_default()
            .0
            .entry(bound)
            .or_default() += count as u64;
    }
    families
}

/// Scrapes `GET /metrics` from `admin` (`host:port`).
pub async fn metrics(admin: &str) -> anyhow::Result<BTreeMap<String, Buckets>> {
    metrics_with(admin, &[]).await
}

/// Scrapes `GET /metrics` from `admin` (`host:port`), keeping the series that carry every one
/// of `labels` ([`histograms_with`]).
pub async fn metrics_with(
    admin: &str,
    labels: &[&str],
) -> anyhow::Result<BTreeMap<String, Buckets>> {
    let mut connection = Connection::open(admin).await?;
    let (status, body) = connection
        .send(&client::request("GET", "/metrics", "text/plain", b""))
        .await
        .with_context(|| format!("failed to scrape {admin}/metrics"))?;
    anyhow::ensure!(status == 200, "{admin}/metrics answered {status}");
    Ok(histograms_with(&String::from_utf8_lossy(&body), labels))
}

/// The machine's CPU time so far, from the first line of `/proc/stat`: (all, stolen), in
/// clock ticks. Steal is time the guest was ready to run but the host ran something else.
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    let all = fields.iter().take(8).sum();
    Some((all, *fields.get(7)?))
}

/// The share (%) of the machine's CPU time the host stole between two [`cpu_ticks`].
pub fn steal_percent(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> f64 {
    match (before, after) {
        (Some((all0, steal0)), Some((all1, steal1))) if all1 > all0 => {
            (steal1 - steal0) as f64 / (all1 - all0) as f64 * 100.0
        }
        _ => f64::NAN,
    }
}

/// A stretch in which the host stole more than this share of the guest's CPU time measured
/// the hypervisor, not the service: at 1,000 requests/s, 0.5 % of two vCPUs over 5 s is
/// 50 ms of stalls, enough to delay the 50 requests that make a metrics window's p99, and
/// a fifth of the time a broadcast to 5,000 connections takes to reach them all.
pub const STEAL_LIMIT_PERCENT: f64 = 0.5;

/// Whether a stretch with this steal measured the service rather than the host; an
/// unreadable `/proc/stat` (NaN) counts as quiet, so the strict judgement applies.
pub fn is_quiet(steal_percent: f64) -> bool {
    steal_percent.is_nan() || steal_percent <= STEAL_LIMIT_PERCENT
}

/// The stretches of a timed phase during which the host was quiet, merged: what ADR 0010
/// judges an end-to-end p99 on.
pub struct QuietStretches {
    /// Every quiet stretch's samples together.
    pub merged: Histogram<u64>,
    /// How many stretches were quiet.
    pub count: usize,
}

/// Merges the stretches (each a latency histogram and the host's steal while it ran) that
/// were quiet, when at least `min_quiet` were; `None` tells the caller to fall back as its
/// scenario documents (the service's own histogram, or every stretch).
pub fn quiet_stretches<'a>(
    stretches: impl IntoIterator<Item = (&'a Histogram<u64>, f64)>,
    min_quiet: usize,
) -> Option<QuietStretches> {
    let mut merged = Histogram::new(3).expect("3 significant figures is a valid precision");
    let mut count = 0;
    for (histogram, steal) in stretches {
        if is_quiet(steal) {
            merged
                .add(histogram)
                .expect("an auto-resizing histogram takes any other");
            count += 1;
        }
    }
    (count >= min_quiet.max(1)).then_some(QuietStretches { merged, count })
}

/// A p99 target judged as ADR 0010 says, and the goal that keeps the client's figure when
/// the target is judged inside the service. With `on_quiet` (enough quiet stretches, see
/// [`quiet_stretches`]) the client's p99 over those stretches is judged as `name`; otherwise
/// the host never let the client measure the service alone, and the service's own histogram
/// p99 (the upper bound of its bucket, [`Buckets::quantile_bound`]; none observed counts as
/// a miss) is judged as `<name>_in_service`, with the client's figure kept as the goal
/// `<name>_client_noisy_host`.
pub fn p99_verdict(
    name: &str,
    limit_ms: f64,
    on_quiet: bool,
    client_p99_ms: f64,
    in_service_p99_ms: Option<f64>,
) -> (Target, Option<Target>) {
    if on_quiet {
        return (Target::below(name, limit_ms, client_p99_ms, "ms"), None);
    }
    let target = Target::below(
        &format!("{name}_in_service"),
        limit_ms,
        in_service_p99_ms.unwrap_or(f64::INFINITY),
        "ms",
    );
    let goal = Target::below(
        &format!("{name}_client_noisy_host"),
        limit_ms,
        client_p99_ms,
        "ms",
    );
    (target, Some(goal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_host_judges_the_client_p99() {
        let (target, goal) = p99_verdict("x_p99", 1.0, true, 0.7, Some(1.6));
        assert_eq!(target.name, "x_p99");
        assert!(target.pass);
        assert!(goal.is_none());
        let (target, _) = p99_verdict("x_p99", 1.0, true, 1.2, Some(0.4));
        assert!(!target.pass, "a slow client p99 on a quiet host is a miss");
    }

    #[test]
    fn a_host_never_quiet_judges_the_service_and_keeps_the_client_figure() {
        let (target, goal) = p99_verdict("x_p99", 1.0, false, 11.9, Some(0.8));
        assert_eq!(target.name, "x_p99_in_service");
        assert!(target.pass);
        let goal = goal.expect("the client's figure is kept");
        assert_eq!(goal.name, "x_p99_client_noisy_host");
        assert_eq!(goal.measured, Some(11.9));
        assert!(!goal.pass);
    }

    #[test]
    fn a_slow_service_fails_even_on_a_noisy_host() {
        assert!(!p99_verdict("x_p99", 1.0, false, 11.9, Some(1.6)).0.pass);
        assert!(!p99_verdict("x_p99", 1.0, false, 0.5, None).0.pass);
    }

    #[test]
    fn series_can_be_picked_by_their_labels() {
        let exposition = "\
svc_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/orders\",le=\"0.1\"} 4
svc_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/orders\",le=\"+Inf\"} 5
svc_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/orders\",le=\"0.1\"} 7
svc_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/orders\",le=\"+Inf\"} 7
svc_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/orders/{id}/cancel\",le=\"+Inf\"} 9
";
        let family = "svc_http_request_duration_seconds";
        let posts = histograms_with(exposition, &["method=\"POST\"", "route=\"/v1/orders\""]);
        assert_eq!(posts[family].total(), 5);
        assert_eq!(posts[family].above(0.1), Some(1));
        assert_eq!(histograms(exposition)[family].total(), 21);
        assert!(histograms_with(exposition, &["route=\"/nowhere\""]).is_empty());
    }

    const EXPOSITION: &str = "\
# HELP api_gateway_limiter_redis_seconds Time of one decision, as in x_bucket{le=\"1\"} 5.
# TYPE api_gateway_limiter_redis_seconds histogram
api_gateway_limiter_redis_seconds_sum 0.5
api_gateway_limiter_redis_seconds_count 10
api_gateway_limiter_redis_seconds_bucket{le=\"0.0001\"} 6
api_gateway_limiter_redis_seconds_bucket{le=\"0.0002\"} 8
api_gateway_limiter_redis_seconds_bucket{le=\"0.0128\"} 9
api_gateway_limiter_redis_seconds_bucket{le=\"+Inf\"} 10
api_gateway_http_request_duration_seconds_bucket{route=\"a\",le=\"0.0001\"} 1
api_gateway_http_request_duration_seconds_bucket{route=\"a\",le=\"+Inf\"} 2
api_gateway_http_request_duration_seconds_bucket{route=\"b\",le=\"0.0001\"} 3
api_gateway_http_request_duration_seconds_bucket{route=\"b\",le=\"+Inf\"} 3
api_gateway_limiter_decisions_total{by=\"redis\"} 7
";

    #[test]
    fn histograms_are_summed_over_label_sets() {
        let families = histograms(EXPOSITION);
        assert_eq!(families.len(), 2);
        let requests = &families["api_gateway_http_request_duration_seconds"];
        assert_eq!(requests.total(), 5);
        assert_eq!(requests.above(0.0001), Some(1));
        let redis = &families["api_gateway_limiter_redis_seconds"];
        assert_eq!(redis.total(), 10);
        assert_eq!(redis.above(0.0128), Some(1));
        assert_eq!(redis.above(0.0002), Some(2));
        assert_eq!(redis.above(0.005), None, "not a bucket bound");
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let redis = &histograms(EXPOSITION)["api_gateway_limiter_redis_seconds"];
        assert_eq!(redis.quantile_bound(0.5), Some(0.0001));
        assert_eq!(redis.quantile_bound(0.7), Some(0.0002));
        assert_eq!(redis.quantile_bound(0.9), Some(0.0128));
        assert_eq!(redis.quantile_bound(0.99), Some(f64::INFINITY));
        assert_eq!(Buckets::default().quantile_bound(0.5), None);
    }

    #[test]
    fn a_phase_is_the_difference_of_two_scrapes() {
        let before = histograms(EXPOSITION);
        let after = histograms(&EXPOSITION.replace("le=\"+Inf\"} 10", "le=\"+Inf\"} 14"));
        let name = "api_gateway_limiter_redis_seconds";
        let phase = after[name].since(&before[name]);
        assert_eq!(phase.total(), 4);
        assert_eq!(phase.above(0.0128), Some(4));
        assert_eq!(phase.quantile_bound(0.5), Some(f64::INFINITY));
    }

    #[test]
    fn only_quiet_stretches_are_merged_and_too_few_fall_back() {
        let stretch = |micros: u64| {
            let mut h = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap();
            h.record(micros).unwrap();
            h
        };
        let (fast, slow, fast_too) = (stretch(100), stretch(90_000), stretch(200));
        let stretches = [(&fast, 0.1), (&slow, 7.5), (&fast_too, f64::NAN)];
        let quiet = quiet_stretches(stretches, 2).expect("two quiet stretches");
        assert_eq!(quiet.count, 2);
        assert_eq!(quiet.merged.len(), 2);
        assert!(
            quiet.merged.max() < 1_000,
            "the disturbed stretch is left out"
        );
        assert!(quiet_stretches(stretches, 3).is_none());
        assert!(
            quiet_stretches([(&slow, 3.0)], 0).is_none(),
            "none quiet is never enough"
        );
    }

    #[test]
    fn steal_is_a_share_of_all_ticks() {
        assert_eq!(steal_percent(Some((100, 5)), Some((300, 25))), 10.0);
        assert!(steal_percent(None, Some((300, 25))).is_nan());
        assert!(steal_percent(Some((300, 25)), Some((300, 25))).is_nan());
        assert!(cpu_ticks().is_some_and(|(all, steal)| all >= steal));
    }
}
