//! An order system over an orchestrated saga: the orders service drives inventory, payment
//! and shipping through commands and replies on Redis Streams, each service writes its
//! messages to a transactional outbox in the same transaction as its state, and every
//! consumer is idempotent through an inbox. No overselling, no double charge, and a failed
//! order is rolled back completely. `docs/order-saga.md` has the whole design.
//!
//! # Layout
//! - [`messages`]: the saga's steps, commands and replies, and their envelope.
//! - [`bus`]: the outbox and its relay, the stream consumer with its inbox, reclaim and dead
//!   letters.
//! - [`orders`]: the orders service, the saga's orchestrator.
//! - [`inventory`], [`payment`], [`shipping`]: the participants; [`payment::client`] calls the
//!   provider with timeouts, retries and a circuit breaker, and never charges twice.
//! - [`provider`]: the fake external payment provider, its own process (`order-saga provider`).
//! - [`startup`]: how each saga service is connected, bound and stopped; [`settings`]: what
//!   they share; [`api`] and [`error`]: what their handlers share.
//! - [`invariants`]: what must hold across the four schemas, checked in SQL.
//! - [`all`]: every process in one, and the dead-letter command.

pub mod all;
pub mod api;
pub mod bus;
pub mod error;
pub mod invariants;
pub mod inventory;
pub mod messages;
pub mod orders;
pub mod payment;
pub mod provider;
pub mod settings;
pub mod shipping;
pub mod startup;
