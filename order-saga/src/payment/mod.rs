//! The payment service: payments per order, driven by saga commands, charged through the
//! external provider.
//!
//! - [`client`]: the provider client (timeouts, retries, breaker, idempotency keys).

pub mod client;
