//! The provider's books: authorizations in memory, the answers stored under each
//! idempotency key, the running totals tests read, and the behaviour knobs that make the
//! provider slow, flaky or hanging on purpose. No HTTP here; `super::http` speaks for it.
//!
//! One lock guards everything and is held for a few map operations, never across an await:
//! the handler asks [`Ledger::draw_fault`] first, sleeps outside the lock, then applies.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use uuid::Uuid;

/// The payment method that always declines, whatever the decline rate.
pub const ALWAYS_DECLINED: &str = "pm_card_declined";

/// How the provider misbehaves; set by flags at start and by `PUT /admin/behaviour`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Behaviour {
    /// Extra time every payment call takes before it is handled.
    #[serde(rename = "latency_ms", serialize_with = "millis")]
    pub latency: Duration,
    /// Share of new authorizations declined (0..=1).
    pub decline_rate: f64,
    /// Share of payment calls answered 500 or 503 without doing anything (0..=1).
    pub error_rate: f64,
    /// Share of payment calls that are carried out and then hang for `hang_for` (0..=1).
    pub timeout_rate: f64,
    /// How long a "timed out" call hangs before it answers after all.
    #[serde(rename = "hang_for_ms", serialize_with = "millis")]
    pub hang_for: Duration,
    /// The next this-many payment calls answer 503, whatever the rates: a deterministic fault
    /// for tests.
    pub fail_next: u32,
}

fn millis<S: serde::Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// What the dice decided for one payment call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Handle it normally.
    None,
    /// Answer with this 5xx status and change nothing.
    Error(u16),
    /// Carry it out, then hang this long before answering.
    Hang(Duration),
}

/// Where an authorization is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Funds held; may be captured or voided.
    Authorized,
    /// Refused at authorization; nothing was held.
    Declined,
    /// Funds taken.
    Captured,
    /// The hold released without taking anything.
    Voided,
    /// Captured funds given back.
    Refunded,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Authorized => "authorized",
            Self::Declined => "declined",
            Self::Captured => "captured",
            Self::Voided => "voided",
            Self::Refunded => "refunded",
        }
    }
}

/// One authorization, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Authorization {
    /// The provider's id, what the merchant stores.
    pub id: Uuid,
    /// Where it is in its life.
    pub status: Status,
    /// Minor units (cents).
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// The merchant's payment method token.
    pub payment_method: String,
    /// Why it was declined, when it was.
    pub reason: Option<&'static str>,
    /// The key it was made under, so a merchant that lost the answer can find it.
    pub idempotency_key: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When its status last changed.
    pub updated_at: DateTime<Utc>,
}

/// A new authorization asked for, already checked at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeRequest {
    /// Minor units, positive.
    pub amount: i64,
    /// Three upper-case letters.
    pub currency: String,
    /// A payment method token.
    pub payment_method: String,
}

/// A change to an existing authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// authorized → captured.
    Capture,
    /// authorized → voided.
    Void,
    /// captured → refunded.
    Refund,
}

impl Settlement {
    /// The operation's name in paths and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Capture => "capture",
            Self::Void => "void",
            Self::Refund => "refund",
        }
    }
}

/// Running totals, so a test can prove "exactly one charge".
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Well-formed `POST /v1/authorizations` received, replays and injected faults included.
    pub authorize_requests: u64,
    /// Authorizations made (approved or declined).
    pub authorizations: u64,
    /// Authorizations approved.
    pub authorized: u64,
    /// Sum of approved amounts.
    pub authorized_amount: i64,
    /// Authorizations declined.
    pub declined: u64,
    /// Authorizations captured (each at most once).
    pub captures: u64,
    /// Sum of captured amounts.
    pub captured_amount: i64,
    /// Authorizations voided.
    pub voids: u64,
    /// Sum of voided amounts.
    pub voided_amount: i64,
    /// Captures refunded.
    pub refunds: u64,
    /// Sum of refunded amounts.
    pub refunded_amount: i64,
    /// Calls answered from an idempotency key's stored answer.
    pub replays: u64,
    /// Calls answered 500/503 on purpose.
    pub injected_errors: u64,
    /// Calls that hung on purpose.
    pub injected_timeouts: u64,
}

/// Why a payment call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// No authorization has that id.
    #[error("no authorization has this id")]
    NotFound,
    /// The idempotency key was first used for another request.
    #[error("this Idempotency-Key was used for a different request")]
    KeyReused,
    /// The authorization is not in a state that allows the change.
    #[error("the authorization is {0}; it cannot be {1}")]
    Conflict(&'static str, &'static str),
}

/// The answer a call got, stored under its key and replayed for a repeat.
#[derive(Debug, Clone)]
pub struct Answer {
    /// 201 for a new authorization, 200 otherwise.
    pub created: bool,
    /// The authorization as it was when first answered.
    pub authorization: Authorization,
    /// Whether this is a replay of the first answer.
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Fingerprint {
    Authorize(AuthorizeRequest),
    Settle(Settlement, Uuid),
}

struct Stored {
    fingerprint: Fingerprint,
    created: bool,
    authorization: Authorization,
}

struct Books {
    authorizations: HashMap<Uuid, Authorization>,
    by_key: HashMap<String, Stored>,
    /// Keys under which an authorization was made, for lookups.
    authorization_keys: HashMap<String, Uuid>,
    summary: Summary,
    behaviour: Behaviour,
    rng: StdRng,
}

/// The provider's whole state. Cheap to share behind an `Arc`.
pub struct Ledger {
    books: Mutex<Books>,
}

impl Ledger {
    /// Empty books misbehaving as `behaviour` says; `seed` makes the dice repeatable.
    pub fn new(behaviour: Behaviour, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            books: Mutex::new(Books {
                authorizations: HashMap::new(),
                by_key: HashMap::new(),
                authorization_keys: HashMap::new(),
                summary: Summary::default(),
                behaviour,
                rng,
            }),
        }
    }

    /// The behaviour now.
    pub fn behaviour(&self) -> Behaviour {
        self.books.lock().behaviour
    }

    /// Replaces the behaviour (the load test's fault phase).
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.books.lock().behaviour = behaviour;
    }

    /// The totals now.
    pub fn summary(&self) -> Summary {
        self.books.lock().summary.clone()
    }

    /// Notes one `POST /v1/authorizations` received.
    pub fn count_authorize_request(&self) {
        self.books.lock().summary.authorize_requests += 1;
    }

    /// The latency to add and the fault to play for one payment call; counts the fault.
    pub fn draw_fault(&self) -> (Duration, Fault) {
        let mut books = self.books.lock();
        let books = &mut *books;
        let behaviour = books.behaviour;
        let fault = if behaviour.fail_next > 0 {
            books.behaviour.fail_next -= 1;
            Fault::Error(503)
        } else if books.rng.random_bool(behaviour.error_rate) {
            Fault::Error(if books.rng.random_bool(0.5) { 500 } else { 503 })
        } else if books.rng.random_bool(behaviour.timeout_rate) {
            Fault::Hang(behaviour.hang_for)
        } else {
            Fault::None
        };
        match fault {
            Fault::Error(_) => books.summary.injected_errors += 1,
            Fault::Hang(_) => books.summary.injected_timeouts += 1,
            Fault::None => {}
        }
        (behaviour.latency, fault)
    }

    /// Authorizes under `key`, or replays the answer first given under it.
    pub fn authorize(&self, key: &str, request: AuthorizeRequest) -> Result<Answer, LedgerError> {
        let mut books = self.books.lock();
        let books = &mut *books;
        let fingerprint = Fingerprint::Authorize(request.clone());
        if let Some(answer) = replay(books, key, &fingerprint)? {
            return Ok(answer);
        }
        let declined = request.payment_method == ALWAYS_DECLINED
            || books.rng.random_bool(books.behaviour.decline_rate);
        let now = Utc::now();
        let authorization = Authorization {
            id: Uuid::now_v7(),
            status: if declined {
                Status::Declined
            } else {
                Status::Authorized
            },
            amount: request.amount,
            currency: request.currency,
            payment_method: request.payment_method,
            reason: declined.then_some("card_declined"),
            idempotency_key: key.to_owned(),
            created_at: now,
            updated_at: now,
        };
        let summary = &mut books.summary;
        summary.authorizations += 1;
        if declined {
            summary.declined += 1;
        } else {
            summary.authorized += 1;
            summary.authorized_amount += authorization.amount;
        }
        books
            .authorizations
            .insert(authorization.id, authorization.clone());
        books
            .authorization_keys
            .insert(key.to_owned(), authorization.id);
        Ok(store(books, key, fingerprint, true, authorization))
    }

    /// Captures, voids or refunds authorization `id` under `key`. Doing it to an
    /// authorization already in the target state answers as success and counts nothing.
    pub fn settle(
        &self,
        key: &str,
        id: Uuid,
        settlement: Settlement,
    ) -> Result<Answer, LedgerError> {
        let mut books = self.books.lock();
        let books = &mut *books;
        let fingerprint = Fingerprint::Settle(settlement, id);
        if let Some(answer) = replay(books, key, &fingerprint)? {
            return Ok(answer);
        }
        let authorization = books
            .authorizations
            .get_mut(&id)
            .ok_or(LedgerError::NotFound)?;
        let (from, to, past) = match settlement {
            Settlement::Capture => (Status::Authorized, Status::Captured, "captured"),
            Settlement::Void => (Status::Authorized, Status::Voided, "voided"),
            Settlement::Refund => (Status::Captured, Status::Refunded, "refunded"),
        };
        if authorization.status == from {
            authorization.status = to;
            authorization.updated_at = Utc::now();
            let amount = authorization.amount;
            let summary = &mut books.summary;
            match settlement {
                Settlement::Capture => {
                    summary.captures += 1;
                    summary.captured_amount += amount;
                }
                Settlement::Void => {
                    summary.voids += 1;
                    summary.voided_amount += amount;
                }
                Settlement::Refund => {
                    summary.refunds += 1;
                    summary.refunded_amount += amount;
                }
            }
        } else if authorization.status != to {
            return Err(LedgerError::Conflict(authorization.status.as_str(), past));
        }
        let authorization = authorization.clone();
        Ok(store(books, key, fingerprint, false, authorization))
    }

    /// The authorization with this id.
    pub fn get(&self, id: Uuid) -> Option<Authorization> {
        self.books.lock().authorizations.get(&id).cloned()
    }

    /// The authorization made under `key`, as it is now.
    pub fn find_by_key(&self, key: &str) -> Option<Authorization> {
        let books = self.books.lock();
        let id = books.authorization_keys.get(key)?;
        books.authorizations.get(id).cloned()
    }
}

fn replay(
    books: &mut Books,
    key: &str,
    fingerprint: &Fingerprint,
) -> Result<Option<Answer>, LedgerError> {
    let Some(stored) = books.by_key.get(key) else {
        return Ok(None);
    };
    if stored.fingerprint != *fingerprint {
        return Err(LedgerError::KeyReused);
    }
    books.summary.replays += 1;
    Ok(Some(Answer {
        created: stored.created,
        authorization: stored.authorization.clone(),
        replayed: true,
    }))
}

fn store(
    books: &mut Books,
    key: &str,
    fingerprint: Fingerprint,
    created: bool,
    authorization: Authorization,
) -> Answer {
    books.by_key.insert(
        key.to_owned(),
        Stored {
            fingerprint,
            created,
            authorization: authorization.clone(),
        },
    );
    Answer {
        created,
        authorization,
        replayed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calm() -> Behaviour {
        Behaviour {
            latency: Duration::ZERO,
            decline_rate: 0.0,
            error_rate: 0.0,
            timeout_rate: 0.0,
            hang_for: Duration::from_secs(30),
            fail_next: 0,
        }
    }

    fn request(amount: i64, method: &str) -> AuthorizeRequest {
        AuthorizeRequest {
            amount,
            currency: "EUR".into(),
            payment_method: method.into(),
        }
    }

    #[test]
    fn a_key_makes_one_authorization_and_another_body_is_refused() {
        let ledger = Ledger::new(calm(), Some(1));
        let first = ledger.authorize("k", request(100, "pm_card_ok")).unwrap();
        let again = ledger.authorize("k", request(100, "pm_card_ok")).unwrap();
        assert!(first.created && !first.replayed && again.replayed);
        assert_eq!(first.authorization.id, again.authorization.id);
        assert_eq!(
            ledger
                .authorize("k", request(101, "pm_card_ok"))
                .unwrap_err(),
            LedgerError::KeyReused
        );
        let summary = ledger.summary();
        assert_eq!((summary.authorizations, summary.replays), (1, 1));
    }

    #[test]
    fn captures_count_once_and_wrong_transitions_conflict() {
        let ledger = Ledger::new(calm(), Some(1));
        let id = ledger
            .authorize("a", request(250, "pm_card_ok"))
            .unwrap()
            .authorization
            .id;
        ledger.settle("c1", id, Settlement::Capture).unwrap();
        ledger.settle("c2", id, Settlement::Capture).unwrap();
        assert_eq!(
            ledger.settle("v", id, Settlement::Void).unwrap_err(),
            LedgerError::Conflict("captured", "voided")
        );
        ledger.settle("r", id, Settlement::Refund).unwrap();
        let summary = ledger.summary();
        assert_eq!((summary.captures, summary.captured_amount), (1, 250));
        assert_eq!((summary.refunds, summary.refunded_amount), (1, 250));
        assert_eq!(
            ledger
                .settle("x", Uuid::now_v7(), Settlement::Capture)
                .unwrap_err(),
            LedgerError::NotFound
        );
    }

    #[test]
    fn the_declining_method_declines_and_fail_next_fails_exactly_that_often() {
        let ledger = Ledger::new(
            Behaviour {
                fail_next: 2,
                ..calm()
            },
            Some(1),
        );
        let answer = ledger.authorize("d", request(5, ALWAYS_DECLINED)).unwrap();
        assert_eq!(answer.authorization.status, Status::Declined);
        assert_eq!(ledger.draw_fault().1, Fault::Error(503));
        assert_eq!(ledger.draw_fault().1, Fault::Error(503));
        assert_eq!(ledger.draw_fault().1, Fault::None);
        assert_eq!(ledger.summary().injected_errors, 2);
    }
}
