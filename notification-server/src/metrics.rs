//! The service's own Prometheus metrics (the HTTP ones come from `common`).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// A bounded label value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// One of a fixed set per metric.
    pub reason: &'static str,
}

/// Metrics of connections, deliveries and fan-out.
#[derive(Clone)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// Connections accepted.
    pub connections_opened: Counter,
    /// Connections closed, by reason.
    pub connections_closed: Family<Reason, Counter>,
    /// Upgrade requests refused before the upgrade, by reason.
    pub connections_refused: Family<Reason, Counter>,
    /// Notifications accepted, by target (`users`, `group`).
    pub notifications: Family<Reason, Counter>,
    /// Frames queued to connections of this node.
    pub deliveries: Counter,
    /// Connections closed because their send queue was full.
    pub slow_consumers: Counter,
    /// Notifications replayed to reconnecting clients.
    pub recovered: Counter,
    /// Client frames refused, by error code.
    pub client_frames_refused: Family<Reason, Counter>,
    /// Cross-node messages published to Redis.
    pub fanout_published: Counter,
    /// Cross-node publishes that failed.
    pub fanout_publish_failures: Counter,
    /// Cross-node messages received from other nodes.
    pub fanout_received: Counter,
    /// Times the cross-node subscription was lost (every local client is told to resync).
    pub fanout_resyncs: Counter,
    /// 1 while the cross-node subscription is up (always 1 on a single node).
    pub fanout_up: Gauge,
    /// Time to persist a notification with its recipients.
    pub persist_duration: Histogram,
}

impl Metrics {
    /// Registers every metric in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            connections: Gauge::default(),
            connections_opened: Counter::default(),
            connections_closed: Family::default(),
            connections_refused: Family::default(),
            notifications: Family::default(),
            deliveries: Counter::default(),
            slow_consumers: Counter::default(),
            recovered: Counter::default(),
            client_frames_refused: Family::default(),
            fanout_published: Counter::default(),
            fanout_publish_failures: Counter::default(),
            fanout_received: Counter::default(),
            fanout_resyncs: Counter::default(),
            fanout_up: Gauge::default(),
            persist_duration: common::prometheus::latency_histogram(),
        };
        let m = &metrics;
        registry.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections accepted",
            m.connections_opened.clone(),
        );
        registry.register(
            "connections_closed",
            "WebSocket connections closed, by reason",
            m.connections_closed.clone(),
        );
        registry.register(
            "connections_refused",
            "WebSocket upgrades refused, by reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "notifications",
            "Notifications accepted, by target",
            m.notifications.clone(),
        );
        registry.register(
            "deliveries",
            "Notification frames queued to connections of this node",
            m.deliveries.clone(),
        );
        registry.register(
            "slow_consumers",
            "Connections closed because their send queue was full",
            m.slow_consumers.clone(),
        );
        registry.register(
            "recovered_notifications",
            "Notifications replayed to reconnecting clients",
            m.recovered.clone(),
        );
        registry.register(
            "client_frames_refused",
            "Client frames refused, by error code",
            m.client_frames_refused.clone(),
        );
        registry.register(
            "fanout_published",
            "Cross-node messages published",
            m.fanout_published.clone(),
        );
        registry.register(
            "fanout_publish_failures",
            "Cross-node publishes that failed",
            m.fanout_publish_failures.clone(),
        );
        registry.register(
            "fanout_received",
            "Cross-node messages received from other nodes",
            m.fanout_received.clone(),
        );
        registry.register(
            "fanout_resyncs",
            "Times the cross-node subscription was lost and clients were told to resync",
            m.fanout_resyncs.clone(),
        );
        registry.register(
            "fanout_up",
            "1 while the cross-node subscription is up",
            m.fanout_up.clone(),
        );
        registry.register(
            "persist_duration_seconds",
            "Time to persist a notification with its recipients",
            m.persist_duration.clone(),
        );
        metrics
    }

    /// Counts one `reason` in `family`.
    pub fn count(family: &Family<Reason, Counter>, reason: &'static str) {
        family.get_or_create(&Reason { reason }).inc();
    }
}
