//! A circuit breaker, so a failing dependency is given time to recover instead of every
//! request paying its timeout. The gateway keeps one per upstream target, the order saga's
//! payment service one for the payment provider; both share this one.
//!
//! Closed → open after `failures` consecutive failures; open for `open_for`; then half-open,
//! admitting `half_open_probes` trial requests: a success closes it, a failure re-opens it.
//! Every method takes the current time, so tests drive the clock themselves.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;

/// When a breaker opens and how it recovers. Plain data: each service reads it from its own
/// configuration (the gateway from its routes TOML, the payment service from flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures (connect error, timeout, 5xx) that open the breaker.
    pub failures: u32,
    /// How long an open breaker refuses requests before it lets probes through.
    pub open_for: Duration,
    /// Trial requests admitted at once while half-open.
    pub half_open_probes: u32,
}

impl BreakerSettings {
    /// Five failures, ten seconds open, one probe.
    pub const DEFAULT: Self = Self {
        failures: 5,
        open_for: Duration::from_secs(10),
        half_open_probes: 1,
    };
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The breaker's state, as exported in a gauge (0, 1, 2), e.g. the gateway's
/// `upstream_breaker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests flow; consecutive failures are counted.
    Closed,
    /// Requests are refused until the instant given.
    Open,
    /// A few trial requests decide whether to close or re-open.
    HalfOpen,
}

impl State {
    fn gauge_value(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probes_in_flight: u32 },
}

/// Whether a request may go to the dependency.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; report the outcome with [`Breaker::record`].
    Admitted(Ticket),
    /// Refused; the breaker lets a probe through at this instant.
    Refused {
        /// When the breaker half-opens (or, while half-open with every probe slot taken, a
        /// short while from now).
        retry_at: Instant,
    },
}

/// Proof that a request was admitted, and whether it is a half-open probe. Hand it back to
/// [`Breaker::record`] or [`Breaker::release`]; a dropped probe ticket must be released, so the
/// calling code wraps it in a guard.
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket {
    probe: bool,
}

/// One dependency's breaker. Its lock is held for a few instructions and never across an await.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    gauge: Gauge,
}

impl Breaker {
    /// A closed breaker whose state is mirrored into `gauge`.
    pub fn new(settings: BreakerSettings, gauge: Gauge) -> Self {
        gauge.set(0);
        Self {
            settings,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            gauge,
        }
    }

    /// The state at `now` (an open breaker past its time reads as half-open).
    pub fn state(&self, now: Instant) -> State {
        match &*self.inner.lock() {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { until } if now < *until => State::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// When an open breaker will let a probe through, if it is open at `now`.
    pub fn open_until(&self, now: Instant) -> Option<Instant> {
        match &*self.inner.lock() {
            Inner::Open { until } if now < *until => Some(*until),
            _ => None,
        }
    }

    /// Asks to send one request at `now`.
    pub fn try_acquire(&self, now: Instant) -> Admission {
        let mut inner = self.inner.lock();
        match &mut *inner {
            Inner::Closed { .. } => Admission::Admitted(Ticket { probe: false }),
            Inner::Open { until } if now < *until => Admission::Refused { retry_at: *until },
            Inner::Open { .. } => {
                if self.settings.half_open_probes == 0 {
                    // No probes allowed means "close as soon as the time is up".
                    *inner = Inner::Closed { failures: 0 };
                    self.gauge.set(State::Closed.gauge_value());
                    return Admission::Admitted(Ticket { probe: false });
                }
                *inner = Inner::HalfOpen {
                    probes_in_flight: 1,
                };
                self.gauge.set(State::HalfOpen.gauge_value());
                Admission::Admitted(Ticket { probe: true })
            }
            Inner::HalfOpen { probes_in_flight } => {
                if *probes_in_flight < self.settings.half_open_probes {
                    *probes_in_flight += 1;
                    Admission::Admitted(Ticket { probe: true })
                } else {
                    Admission::Refused {
                        retry_at: now + Duration::from_secs(1),
                    }
                }
            }
        }
    }

    /// Reports the outcome of an admitted request at `now`.
    pub fn record(&self, ticket: Ticket, success: bool, now: Instant) {
        let mut inner = self.inner.lock();
        let next = match &mut *inner {
            Inner::Closed { failures } => {
                if success {
                    *failures = 0;
                    None
                } else {
                    *failures += 1;
                    (*failures >= self.settings.failures.max(1)).then(|| Inner::Open {
                        until: now + self.settings.open_for,
                    })
                }
            }
            // A request admitted before the breaker opened: its outcome changes nothing.
            Inner::Open { .. } => None,
            // Only probes decide; a request admitted while closed proves nothing now.
            Inner::HalfOpen { .. } if !ticket.probe => None,
            Inner::HalfOpen { .. } if success => Some(Inner::Closed { failures: 0 }),
            Inner::HalfOpen { .. } => Some(Inner::Open {
                until: now + self.settings.open_for,
            }),
        };
        if let Some(next) = next {
            let state = match next {
                Inner::Closed { .. } => State::Closed,
                Inner::Open { .. } => State::Open,
                Inner::HalfOpen { .. } => State::HalfOpen,
            };
            *inner = next;
            self.gauge.set(state.gauge_value());
        }
    }

    /// Gives back a ticket whose request neither succeeded nor failed on the dependency's account
    /// (the client went away, or sent too large a body), so a probe slot is not lost.
    pub fn release(&self, ticket: Ticket) {
        if !ticket.probe {
            return;
        }
        if let Inner::HalfOpen { probes_in_flight } = &mut *self.inner.lock() {
            *probes_in_flight = probes_in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32, probes: u32) -> Breaker {
        Breaker::new(
            BreakerSettings {
                failures,
                open_for: Duration::from_secs(10),
                half_open_probes: probes,
            },
            Gauge::default(),
        )
    }

    fn admit(breaker: &Breaker, now: Instant) -> Ticket {
        match breaker.try_acquire(now) {
            Admission::Admitted(ticket) => ticket,
            refused => panic!("expected admission, got {refused:?}"),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let b = breaker(3, 1);
        for _ in 0..2 {
            b.record(admit(&b, t0), false, t0);
        }
        // A success in between resets the count.
        b.record(admit(&b, t0), true, t0);
        for _ in 0..2 {
            b.record(admit(&b, t0), false, t0);
        }
        assert_eq!(b.state(t0), State::Closed);
        b.record(admit(&b, t0), false, t0);
        assert_eq!(b.state(t0), State::Open);
        assert_eq!(b.gauge.get(), 1);
        assert_eq!(
            b.try_acquire(t0 + Duration::from_secs(3)),
            Admission::Refused {
                retry_at: t0 + Duration::from_secs(10)
            }
        );
        assert_eq!(b.open_until(t0), Some(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn half_open_admits_the_probes_and_a_success_closes() {
        let t0 = Instant::now();
        let b = breaker(2, 2);
        b.record(admit(&b, t0), false, t0);
        b.record(admit(&b, t0), false, t0);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.state(later), State::HalfOpen);
        let first = admit(&b, later);
        assert_eq!(b.gauge.get(), 2);
        let second = admit(&b, later);
        assert!(matches!(b.try_acquire(later), Admission::Refused { .. }));
        b.record(first, true, later);
        assert_eq!(b.state(later), State::Closed);
        assert_eq!(b.gauge.get(), 0);
        // The other probe's late failure counts as an ordinary closed-state failure.
        b.record(second, false, later);
        assert_eq!(b.state(later), State::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_for_a_full_period() {
        let t0 = Instant::now();
        let b = breaker(1, 1);
        b.record(admit(&b, t0), false, t0);
        let later = t0 + Duration::from_secs(11);
        let probe = admit(&b, later);
        b.record(probe, false, later);
        assert_eq!(b.state(later), State::Open);
        assert_eq!(b.open_until(later), Some(later + Duration::from_secs(10)));
        assert_eq!(b.state(later + Duration::from_secs(10)), State::HalfOpen);
    }

    #[test]
    fn a_released_probe_frees_its_slot() {
        let t0 = Instant::now();
        let b = breaker(1, 1);
        b.record(admit(&b, t0), false, t0);
        let later = t0 + Duration::from_secs(10);
        let probe = admit(&b, later);
        assert!(matches!(b.try_acquire(later), Admission::Refused { .. }));
        b.release(probe);
        let again = admit(&b, later);
        b.record(again, true, later);
        assert_eq!(b.state(later), State::Closed);
    }

    #[test]
    fn outcomes_of_requests_admitted_before_opening_are_ignored() {
        let t0 = Instant::now();
        let b = breaker(1, 1);
        let early = admit(&b, t0);
        b.record(admit(&b, t0), false, t0);
        b.record(early, true, t0);
        assert_eq!(b.state(t0), State::Open);
    }
}
