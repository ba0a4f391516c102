//! Real-time metrics aggregation: events in, per-type statistics over the last N minutes out.
//!
//! The core ([`MetricsProcessor`]) knows nothing of HTTP: it takes [`Event`]s that are valid
//! by construction, keeps per-type minute buckets in lock shards, and answers
//! [`MetricsProcessor::get_aggregates`] by merging mergeable sketches. The [`http`] module and
//! [`startup::Application`] put it on the network.
//!
//! # Layout
//! - [`event`]: `Event` and its field types, parsed once at the edge.
//! - [`processor`]: the sharded, time-bucketed aggregation core.
//! - [`ddsketch`], [`hyperloglog`]: the mergeable sketches behind quantiles and distinct users.
//! - [`clock`]: wall and manual clocks, so time can be driven in tests.
//! - [`http`]: routes, wire parsing that names bad fields, the service's metrics.
//! - [`settings`], [`startup`]: configuration and the runnable application.

pub mod clock;
pub mod ddsketch;
pub mod event;
pub mod http;
pub mod hyperloglog;
pub mod processor;
pub mod settings;
pub mod startup;

pub use event::{Event, EventType, UserId};
pub use processor::{
    Aggregates, IngestError, MetricsProcessor, ProcessorConfig, QueryError, TypeAggregate,
};
