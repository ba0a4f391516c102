//! The notification-server: real-time notifications over WebSocket.
//!
//! - [`notification`]: the notification, its ids and limits, and its pre-encoded frame.
//! - [`store`]: history and group membership in PostgreSQL, or in memory for one node.
//! - [`hub`]: this node's live connections by user, and the fan-out to their send queues.
//! - [`fanout`]: delivery across nodes over Redis pub/sub.
//! - [`error`]: the one error type, and which failures are the client's, which a retry fixes.
//! - [`service`]: the seed's `send_to_users`, `broadcast_to_group` and `get_history`.
//! - [`protocol`]: WebSocket frames and close codes (`docs/websocket-protocol.md`).
//! - [`http`]: the HTTP API, the WebSocket endpoint and the demo page.

pub mod error;
pub mod fanout;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod notification;
pub mod protocol;
pub mod service;
pub mod settings;
pub mod startup;
pub mod store;

pub use error::{Error, Result};
pub use notification::{Content, GroupId, Notification, UserId};
pub use service::Notifier;
pub use settings::Settings;
pub use startup::Application;
