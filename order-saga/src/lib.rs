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

pub mod bus;
pub mod messages;
pub mod api;
pub mod error;
pub mod inventory;
pub mod settings;
pub mod startup;
pub mod shipping;
pub mod orders;
pub mod all;
pub mod invariants;
