//! Where "now" comes from. Decisions take the time from a [`Clock`] chosen by the caller and
//! send it to Redis as a script argument, so tests can move time and replicas never depend
//! on Redis's own clock.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// A source of the current time in microseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Microseconds since 1970-01-01T00:00:00Z.
    fn now_micros(&self) -> u64;
}

/// The wall clock; what production uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> u64 {
        // A clock set before 1970 reads as the epoch rather than failing the request.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, micros)
    }
}

/// A clock that moves only when told to, for tests; clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `start_micros`.
    pub fn new(start_micros: u64) -> Self {
        Self(Arc::new(AtomicU64::new(start_micros)))
    }

    /// Sets the time to `micros`.
    pub fn set(&self, micros: u64) {
        self.0.store(micros, Ordering::SeqCst);
    }

    /// Moves the time forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(micros(by), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// `duration` in whole microseconds, saturating (no real duration comes near 584,000 years).
pub(crate) fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let clock = ManualClock::new(1_000);
        let other = clock.clone();
        clock.advance(Duration::from_millis(2));
        assert_eq!(other.now_micros(), 3_000);
        other.set(7);
        assert_eq!(clock.now_micros(), 7);
    }

    #[test]
    fn the_system_clock_reads_after_2020() {
        assert!(SystemClock.now_micros() > 1_577_836_800_000_000);
    }
}
