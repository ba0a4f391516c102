//! The messaging layer's Prometheus metrics, the same in every saga service.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// What became of a message a consumer read.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Handled {
    /// `applied`, `duplicate`, `failed` (left pending for a retry) or `malformed`.
    pub outcome: &'static str,
}

/// Messages published, consumed, retried, reclaimed and dead-lettered.
#[derive(Clone)]
pub struct BusMetrics {
    /// Outbox rows published to their stream.
    pub published: Counter,
    /// Relay batches that failed (the rows stay and are published by the next one).
    pub relay_failures: Counter,
    /// Time from a message's commit to its publication.
    pub publish_delay: Histogram,
    /// Messages handled by this service's consumer, by outcome.
    pub handled: Family<Handled, Counter>,
    /// Pending messages taken over from an idle consumer (a crashed or stopped instance).
    pub reclaimed: Counter,
    /// Pending messages found deleted from the stream (trimmed) when reclaimed; the saga's
    /// step deadline covers their loss.
    pub lost: Counter,
    /// Messages moved to the dead-letter stream after too many deliveries.
    pub dead_lettered: Counter,
}

impl BusMetrics {
    /// Registers every metric in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            published: Counter::default(),
            relay_failures: Counter::default(),
            publish_delay: common::prometheus::latency_histogram(),
            handled: Family::default(),
            reclaimed: Counter::default(),
            lost: Counter::default(),
            dead_lettered: Counter::default(),
        };
        let bus = registry.sub_registry_with_prefix("bus");
        bus.register(
            "published",
            "Outbox messages published to their stream",
            metrics.published.clone(),
        );
        bus.register(
            "relay_failures",
            "Relay batches that failed; their rows are published by a later batch",
            metrics.relay_failures.clone(),
        );
        bus.register(
            "publish_delay_seconds",
            "Time from a message's commit to its publication",
            metrics.publish_delay.clone(),
        );
        bus.register(
            "handled",
            "Messages handled by this service's consumer, by outcome",
            metrics.handled.clone(),
        );
        bus.register(
            "reclaimed",
            "Pending messages taken over from an idle consumer",
            metrics.reclaimed.clone(),
        );
        bus.register(
            "lost",
            "Pending messages found deleted from their stream when reclaimed",
            metrics.lost.clone(),
        );
        bus.register(
            "dead_lettered",
            "Messages moved to the dead-letter stream after too many deliveries",
            metrics.dead_lettered.clone(),
        );
        metrics
    }

    /// Counts one handled message.
    pub fn handled(&self, outcome: &'static str) {
        self.handled.get_or_create(&Handled { outcome }).inc();
    }
}
