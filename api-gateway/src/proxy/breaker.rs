//! A circuit breaker per upstream target: the shared [`common::breaker`], plus how the
//! routes TOML spells its settings (`breaker = { failures = 5, open_for = "10s" }`).

use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use common::breaker::{Admission, Breaker, BreakerSettings, State, Ticket};

/// The `breaker` table of an upstream as written in TOML; every key may be left out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerToml {
    /// Consecutive failures (connect error, timeout, 502/503/504) that open the breaker.
    #[serde(default = "default_failures")]
    failures: u32,
    /// How long an open breaker refuses requests before it lets probes through.
    #[serde(
        default = "default_open_for",
        deserialize_with = "super::deserialize_duration"
    )]
    open_for: Duration,
    /// Trial requests admitted at once while half-open.
    #[serde(default = "default_half_open_probes")]
    half_open_probes: u32,
}

fn default_failures() -> u32 {
    BreakerSettings::DEFAULT.failures
}

fn default_open_for() -> Duration {
    BreakerSettings::DEFAULT.open_for
}

fn default_half_open_probes() -> u32 {
    BreakerSettings::DEFAULT.half_open_probes
}

/// Reads an upstream's `breaker` table, for `#[serde(deserialize_with = ...)]`.
pub(super) fn deserialize_settings<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BreakerSettings, D::Error> {
    let toml = BreakerToml::deserialize(deserializer)?;
    Ok(BreakerSettings {
        failures: toml.failures,
        open_for: toml.open_for,
        half_open_probes: toml.half_open_probes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Upstream {
        #[serde(default, deserialize_with = "deserialize_settings")]
        breaker: BreakerSettings,
    }

    #[test]
    fn the_table_reads_into_the_shared_settings_and_refuses_unknown_keys() {
        let read: Upstream =
            toml::from_str("breaker = { failures = 2, half_open_probes = 3 }").unwrap();
        assert_eq!(
            read.breaker,
            BreakerSettings {
                failures: 2,
                open_for: Duration::from_secs(10),
                half_open_probes: 3,
            }
        );
        let absent: Upstream = toml::from_str("").unwrap();
        assert_eq!(absent.breaker, BreakerSettings::DEFAULT);
        let error = toml::from_str::<Upstream>("breaker = { opens_for = \"1s\" }")
            .err()
            .unwrap();
        assert!(error.to_string().contains("opens_for"), "{error}");
    }
}
