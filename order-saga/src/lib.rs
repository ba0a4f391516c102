//! An order system over an orchestrated saga: the orders service drives inventory, payment
//! and shipping through commands and replies on Redis Streams, each service writes its
//! messages to a transactional outbox in the same transaction as its state, and every
//! consumer is idempotent through an inbox. No overselling, no double charge, and a failed
//! order is rolled back completely. `docs/order-saga.md` has the whole design.
//!
//! # Layout
//! - [`provider`]: the fake external payment provider, its own process (`order-saga provider`).
//! - [`payment`]: the payment service; [`payment::client`] calls the provider with timeouts,
//!   retries and a circuit breaker, and never charges twice.

pub mod payment;
pub mod provider;
