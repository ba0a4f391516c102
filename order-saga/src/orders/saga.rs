//! The saga's state machine, with no I/O: given where an order's saga stands and what just
//! happened (a reply, a deadline, a cancellation), what it becomes and what to send.
//!
//! Forward: reserve stock → authorize payment → create shipment → capture payment → confirm
//! stock → `confirmed`. A step that fails has had no effect (each participant guarantees
//! it), so the steps done before it are compensated in reverse order; a step that gets no
//! answer by its deadline may have taken effect, so it is compensated too. A compensation
//! that fails or times out is sent again after a backoff, up to a limit, past which the
//! order is left `needs_attention`. A reply that is not for the step and attempt being
//! awaited (a duplicate, a late answer after a timeout) changes nothing, so a completed step
//! is never run again.

use std::time::Duration;

use crate::messages::{Outcome, Step};

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The saga is running (forward or compensating).
    Pending,
    /// Every forward step succeeded.
    Confirmed,
    /// Rolled back completely.
    Cancelled,
    /// A compensation kept failing: an operator must look (terminal, audited).
    NeedsAttention,
}

impl Status {
    /// The name in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Cancelled => "cancelled",
            Self::NeedsAttention => "needs_attention",
        }
    }

    /// The status named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Confirmed,
            Self::Cancelled,
            Self::NeedsAttention,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
}

/// The persisted state of one order's saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saga {
    /// Where the order stands.
    pub status: Status,
    /// The step awaited (or about to be sent); `None` once terminal.
    pub step: Option<Step>,
    /// The attempt of `step`.
    pub attempt: u32,
    /// Whether the command for `step`/`attempt` has been sent (false while a compensation
    /// waits out its backoff).
    pub sent: bool,
    /// Compensations still to run after `step`, in order.
    pub compensations: Vec<Step>,
    /// Why the order is being, or was, cancelled.
    pub reason: Option<String>,
}

/// What happened to a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A participant answered.
    Replied {
        /// The step answered.
        step: Step,
        /// The attempt answered.
        attempt: u32,
        /// How it ended.
        outcome: Outcome,
        /// Why it failed.
        reason: Option<String>,
    },
    /// The awaited step's deadline (or a compensation's backoff) passed.
    DeadlinePassed {
        /// The step whose deadline it was.
        step: Step,
        /// Its attempt.
        attempt: u32,
    },
    /// The customer asked to cancel.
    CancelRequested,
}

/// How the step that just ended is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    /// It succeeded.
    Succeeded,
    /// It was refused.
    Failed,
    /// No answer by its deadline.
    TimedOut,
    /// Abandoned by a cancellation while in flight.
    Abandoned,
}

impl StepEnd {
    /// The name in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Abandoned => "abandoned",
        }
    }
}

/// What to do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The saga's new state.
    pub saga: Saga,
    /// The step that ended, how, and the detail to record.
    pub ended: Option<(Step, u32, StepEnd, Option<String>)>,
    /// The command to send now (`saga.step` at `saga.attempt`).
    pub send: bool,
    /// When the new step's deadline is: its answer's deadline, or a backoff before sending.
    pub deadline_in: Option<Duration>,
}

/// Why an event changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// Not the step and attempt awaited (a duplicate or a late answer).
    Stale,
    /// The saga is over.
    Terminal,
    /// A cancellation once the shipment is being booked, or while compensating.
    TooLateToCancel,
}

/// Limits of the machine.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a step may go unanswered.
    pub step_deadline: Duration,
    /// Attempts of a compensation before `needs_attention`.
    pub compensation_attempts: u32,
    /// The first compensation retry waits this; each further one twice as long.
    pub compensation_backoff: Duration,
}

impl Saga {
    /// A new saga, about to send its first step.
    pub fn start() -> Self {
        Self {
            status: Status::Pending,
            step: Some(Step::ReserveStock),
            attempt: 1,
            sent: true,
            compensations: Vec::new(),
            reason: None,
        }
    }

    /// Whether the saga is undoing.
    pub fn compensating(&self) -> bool {
        self.step.is_some_and(|s| s.compensation().is_none())
    }

    /// Applies `event`.
    pub fn apply(&self, event: Event, limits: &Limits) -> Result<Transition, Ignored> {
        if self.status != Status::Pending {
            return Err(Ignored::Terminal);
        }
        let step = self.step.ok_or(Ignored::Terminal)?;
        match event {
            Event::Replied {
                step: s, attempt, ..
            }
            | Event::DeadlinePassed { step: s, attempt }
                if s != step || attempt != self.attempt =>
            {
                Err(Ignored::Stale)
            }
            Event::Replied {
                outcome, reason, ..
            } => {
                if !self.sent {
                    return Err(Ignored::Stale);
                }
                Ok(match (self.compensating(), outcome) {
                    (false, Outcome::Succeeded) => self.forward_succeeded(step, limits),
                    (false, Outcome::Failed) => {
                        let reason = reason.unwrap_or_else(|| format!("{} failed", step.as_str()));
                        self.compensate(step, false, StepEnd::Failed, reason, limits)
                    }
                    (true, Outcome::Succeeded) => self.compensation_succeeded(step, limits),
                    (true, Outcome::Failed) => {
                        self.compensation_failed(step, StepEnd::Failed, reason, limits)
                    }
                })
            }
            Event::DeadlinePassed { .. } if !self.sent => Ok(Transition {
                saga: Saga {
                    sent: true,
                    ..self.clone()
                },
                ended: None,
                send: true,
                deadline_in: Some(limits.step_deadline),
            }),
            Event::DeadlinePassed { .. } if self.compensating() => Ok(self.compensation_failed(
                step,
                StepEnd::TimedOut,
                Some("no answer by the deadline".into()),
                limits,
            )),
            Event::DeadlinePassed { .. } => Ok(self.compensate(
                step,
                true,
                StepEnd::TimedOut,
                format!("{} got no answer by its deadline", step.as_str()),
                limits,
            )),
            Event::CancelRequested => {
                if !matches!(step, Step::ReserveStock | Step::AuthorizePayment) {
                    return Err(Ignored::TooLateToCancel);
                }
                Ok(self.compensate(
                    step,
                    true,
                    StepEnd::Abandoned,
                    "cancelled by the customer".into(),
                    limits,
                ))
            }
        }
    }

    fn forward_succeeded(&self, step: Step, limits: &Limits) -> Transition {
        let next = Step::FORWARD
            .iter()
            .skip_while(|s| **s != step)
            .nth(1)
            .copied();
        let saga = match next {
            Some(next) => Saga {
                step: Some(next),
                attempt: 1,
                sent: true,
                ..self.clone()
            },
            None => Saga {
                status: Status::Confirmed,
                step: None,
                attempt: 0,
                sent: false,
                ..self.clone()
            },
        };
        Transition {
            send: saga.step.is_some(),
            deadline_in: saga.step.map(|_| limits.step_deadline),
            ended: Some((step, self.attempt, StepEnd::Succeeded, None)),
            saga,
        }
    }

    /// Starts undoing: the forward steps before `step` (and `step` itself when it may have
    /// taken effect), last first, each compensation once.
    fn compensate(
        &self,
        step: Step,
        include_current: bool,
        end: StepEnd,
        reason: String,
        limits: &Limits,
    ) -> Transition {
        let position = Step::FORWARD.iter().position(|s| *s == step).unwrap_or(0);
        let upto = if include_current {
            position + 1
        } else {
            position
        };
        let mut compensations: Vec<Step> = Vec::new();
        for done in Step::FORWARD[..upto].iter().rev() {
            if let Some(undo) = done.compensation()
                && !compensations.contains(&undo)
            {
                compensations.push(undo);
            }
        }
        let ended = Some((step, self.attempt, end, Some(reason.clone())));
        let mut rest = compensations.into_iter();
        match rest.next() {
            None => Transition {
                saga: Saga {
                    status: Status::Cancelled,
                    step: None,
                    attempt: 0,
                    sent: false,
                    compensations: Vec::new(),
                    reason: Some(reason),
                },
                ended,
                send: false,
                deadline_in: None,
            },
            Some(first) => Transition {
                saga: Saga {
                    status: Status::Pending,
                    step: Some(first),
                    attempt: 1,
                    sent: true,
                    compensations: rest.collect(),
                    reason: Some(reason),
                },
                ended,
                send: true,
                deadline_in: Some(limits.step_deadline),
            },
        }
    }

    fn compensation_succeeded(&self, step: Step, limits: &Limits) -> Transition {
        let ended = Some((step, self.attempt, StepEnd::Succeeded, None));
        match self.compensations.split_first() {
            Some((next, rest)) => Transition {
                saga: Saga {
                    step: Some(*next),
                    attempt: 1,
                    sent: true,
                    compensations: rest.to_vec(),
                    ..self.clone()
                },
                ended,
                send: true,
                deadline_in: Some(limits.step_deadline),
            },
            None => Transition {
                saga: Saga {
                    status: Status::Cancelled,
                    step: None,
                    attempt: 0,
                    sent: false,
                    ..self.clone()
                },
                ended,
                send: false,
                deadline_in: None,
            },
        }
    }

    fn compensation_failed(
        &self,
        step: Step,
        end: StepEnd,
        reason: Option<String>,
        limits: &Limits,
    ) -> Transition {
        let ended = Some((step, self.attempt, end, reason.clone()));
        if self.attempt >= limits.compensation_attempts {
            let why = format!(
                "{} failed {} times ({}); {}",
                step.as_str(),
                self.attempt,
                reason.unwrap_or_else(|| "no reason given".into()),
                self.reason.as_deref().unwrap_or("cancelling")
            );
            return Transition {
                saga: Saga {
                    status: Status::NeedsAttention,
                    step: None,
                    attempt: 0,
                    sent: false,
                    reason: Some(why),
                    ..self.clone()
                },
                ended,
                send: false,
                deadline_in: None,
            };
        }
        let backoff = limits
            .compensation_backoff
            .saturating_mul(1 << (self.attempt - 1).min(10));
        Transition {
            saga: Saga {
                attempt: self.attempt + 1,
                sent: false,
                ..self.clone()
            },
            ended,
            send: false,
            deadline_in: Some(backoff),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        step_deadline: Duration::from_secs(10),
        compensation_attempts: 3,
        compensation_backoff: Duration::from_millis(100),
    };

    fn reply(saga: &Saga, outcome: Outcome) -> Saga {
        let step = saga.step.expect("a step is awaited");
        saga.apply(
            Event::Replied {
                step,
                attempt: saga.attempt,
                outcome,
                reason: Some("no".into()),
            },
            &LIMITS,
        )
        .expect("the reply applies")
        .saga
    }

    #[test]
    fn every_step_succeeding_confirms_the_order() {
        let mut saga = Saga::start();
        for step in Step::FORWARD {
            assert_eq!(saga.step, Some(step));
            saga = reply(&saga, Outcome::Succeeded);
        }
        assert_eq!(saga.status, Status::Confirmed);
        assert_eq!(saga.step, None);
    }

    #[test]
    fn a_failure_undoes_the_steps_before_it_last_first() {
        let mut saga = Saga::start();
        for _ in 0..3 {
            saga = reply(&saga, Outcome::Succeeded);
        }
        assert_eq!(saga.step, Some(Step::CapturePayment));
        saga = reply(&saga, Outcome::Failed);
        assert_eq!(saga.step, Some(Step::CancelShipment));
        assert_eq!(
            saga.compensations,
            vec![Step::VoidPayment, Step::ReleaseStock]
        );
        assert_eq!(saga.reason.as_deref(), Some("no"));
        for expected in [Step::VoidPayment, Step::ReleaseStock] {
            saga = reply(&saga, Outcome::Succeeded);
            assert_eq!(saga.step, Some(expected));
        }
        saga = reply(&saga, Outcome::Succeeded);
        assert_eq!(saga.status, Status::Cancelled);
    }

    #[test]
    fn a_first_step_refused_cancels_at_once() {
        let saga = reply(&Saga::start(), Outcome::Failed);
        assert_eq!(saga.status, Status::Cancelled);
        assert_eq!(saga.step, None);
    }

    #[test]
    fn a_timeout_also_undoes_the_step_that_timed_out() {
        let saga = reply(&Saga::start(), Outcome::Succeeded);
        let t = saga
            .apply(
                Event::DeadlinePassed {
                    step: Step::AuthorizePayment,
                    attempt: 1,
                },
                &LIMITS,
            )
            .unwrap();
        assert_eq!(t.saga.step, Some(Step::VoidPayment));
        assert_eq!(t.saga.compensations, vec![Step::ReleaseStock]);
        assert_eq!(t.ended.unwrap().2, StepEnd::TimedOut);
    }

    #[test]
    fn stale_and_duplicate_replies_change_nothing() {
        let saga = reply(&Saga::start(), Outcome::Succeeded);
        let late = Event::Replied {
            step: Step::ReserveStock,
            attempt: 1,
            outcome: Outcome::Failed,
            reason: None,
        };
        assert_eq!(saga.apply(late, &LIMITS), Err(Ignored::Stale));
        let wrong_attempt = Event::Replied {
            step: Step::AuthorizePayment,
            attempt: 2,
            outcome: Outcome::Succeeded,
            reason: None,
        };
        assert_eq!(saga.apply(wrong_attempt, &LIMITS), Err(Ignored::Stale));
    }

    #[test]
    fn a_failing_compensation_backs_off_then_needs_attention() {
        let mut saga = reply(&reply(&Saga::start(), Outcome::Succeeded), Outcome::Failed);
        assert_eq!(saga.step, Some(Step::ReleaseStock));
        let mut waits = Vec::new();
        for attempt in 1..=2 {
            let t = saga
                .apply(
                    Event::Replied {
                        step: Step::ReleaseStock,
                        attempt,
                        outcome: Outcome::Failed,
                        reason: None,
                    },
                    &LIMITS,
                )
                .unwrap();
            assert!(!t.send, "a retry waits out its backoff first");
            waits.push(t.deadline_in.unwrap());
            saga = t.saga;
            let resend = saga
                .apply(
                    Event::DeadlinePassed {
                        step: Step::ReleaseStock,
                        attempt: attempt + 1,
                    },
                    &LIMITS,
                )
                .unwrap();
            assert!(resend.send);
            saga = resend.saga;
        }
        assert_eq!(
            waits,
            vec![Duration::from_millis(100), Duration::from_millis(200)]
        );
        let t = saga
            .apply(
                Event::DeadlinePassed {
                    step: Step::ReleaseStock,
                    attempt: 3,
                },
                &LIMITS,
            )
            .unwrap();
        assert_eq!(t.saga.status, Status::NeedsAttention);
        assert!(
            t.saga
                .reason
                .unwrap()
                .contains("release_stock failed 3 times")
        );
    }

    #[test]
    fn cancelling_is_allowed_until_the_shipment_is_being_booked() {
        let saga = reply(&Saga::start(), Outcome::Succeeded);
        let t = saga.apply(Event::CancelRequested, &LIMITS).unwrap();
        assert_eq!(t.saga.step, Some(Step::VoidPayment));
        assert_eq!(t.saga.reason.as_deref(), Some("cancelled by the customer"));
        let shipping = reply(&saga, Outcome::Succeeded);
        assert_eq!(
            shipping.apply(Event::CancelRequested, &LIMITS),
            Err(Ignored::TooLateToCancel)
        );
        let cancelled = reply(&Saga::start(), Outcome::Failed);
        assert_eq!(
            cancelled.apply(Event::CancelRequested, &LIMITS),
            Err(Ignored::Terminal)
        );
    }
}
