//! Plumbing shared by every service of the suite, and nothing service-specific.
//!
//! # Layout
//! - [`auth`]: JWT access tokens: the claims the gateway issues and every service verifies,
//!   and [`auth::bearer`], which reads them from `Authorization`.
//! - [`breaker`]: the circuit breaker the gateway keeps per upstream target and the order
//!   saga's payment service keeps for its provider.
//! - [`config`]: what every service's clap `Settings` shares: the serving flags
//!   ([`config::ServeSettings`]), duration, size and secret parsers, URL redaction.
//! - [`telemetry`]: `tracing` setup, pretty for people or JSON lines for machines.
//! - [`shutdown`]: the SIGTERM / Ctrl-C future that starts a graceful shutdown, and the
//!   readiness withdrawal that comes first.
//! - [`problem`]: RFC 9457 `application/problem+json` errors.
//! - [`request_id`]: each request's id, in a task-local every log line, problem and audit
//!   row reads.
//! - [`http`]: the request-context middleware (request id, span, access log, timeout, load
//!   shedding) and [`http::serve`], which runs a router until a shutdown future fires and a
//!   grace period ends; [`http::JsonFields`] and [`http::Page`] read request bodies and list
//!   queries so a refusal names the field at fault.
//! - [`prometheus`]: the `/metrics` handler and the HTTP metrics `route_layer`.
//! - [`storable`]: text and JSON proven free of U+0000, which PostgreSQL cannot store; the
//!   refusal is a 422 naming the field.
//! - `database` (feature `postgres`): opening a pool (on a schema of its own), and which
//!   database failures a retry can fix (503 with `Retry-After`) and which it cannot (500).
//! - `error` (feature `postgres`): the handlers' error type every service answers with.

pub mod auth;
pub mod breaker;
pub mod config;
#[cfg(feature = "postgres")]
pub mod database;
#[cfg(feature = "postgres")]
pub mod error;
pub mod http;
pub mod problem;
pub mod prometheus;
pub mod request_id;
pub mod shutdown;
pub mod storable;
pub mod telemetry;
