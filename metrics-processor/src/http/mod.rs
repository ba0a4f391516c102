//! The HTTP face of the processor: routes, shared state and the service's own metrics.
//!
//! | route | purpose |
//! |---|---|
//! | `POST /v1/events` | one event (JSON) |
//! | `POST /v1/events/batch` | a JSON array or NDJSON of events; good ones are kept |
//! | `GET /v1/aggregates?minutes=N[&format=flat]` | statistics of the last N minutes |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | liveness, readiness, Prometheus |

mod aggregates;
mod events;
pub mod wire;

use std::sync::{Arc, atomic::AtomicBool};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::StatusCode,
    middleware::{from_fn, from_fn_with_state},
    routing::{get, post},
};
use common::{
    http::{
        ops::{self, Readiness},
        request_context, shed_load, time_limit,
    },
    problem::{self, Problem},
    prometheus::{HttpMetrics, latency_histogram, track_http},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::Semaphore;

use crate::processor::MetricsProcessor;

/// Limits the HTTP layer enforces before the core sees anything.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest body of `POST /v1/events`.
    pub max_event_bytes: usize,
    /// Largest body of `POST /v1/events/batch`.
    pub max_batch_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Most requests handled at once before shedding with 503.
    pub max_in_flight: usize,
    /// Most batch requests handled at once before shedding with 503: each may hold a body of
    /// `max_batch_bytes` and its parsed events, so this bounds their memory.
    pub max_batches_in_flight: usize,
    /// Longest a request may take.
    pub request_timeout: std::time::Duration,
}

/// Label of a refused event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `malformed`, `invalid_field`, `too_old`, `in_future`, `value_out_of_range`, `event_type_limit`.
    pub reason: &'static str,
}

/// The service's own metrics, beside the HTTP ones.
#[derive(Clone)]
pub struct IngestMetrics {
    ingested: Counter,
    rejected: Family<ReasonLabel, Counter>,
    event_types: Gauge,
    event_types_limit: Gauge,
    query_duration: Histogram,
}

impl IngestMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            ingested: Counter::default(),
            rejected: Family::default(),
            event_types: Gauge::default(),
            event_types_limit: Gauge::default(),
            query_duration: latency_histogram(),
        };
        registry.register(
            "events_ingested",
            "Events recorded in an aggregate",
            metrics.ingested.clone(),
        );
        registry.register(
            "events_rejected",
            "Events refused, by reason",
            metrics.rejected.clone(),
        );
        registry.register(
            "event_types",
            "Distinct event types tracked now",
            metrics.event_types.clone(),
        );
        registry.register(
            "event_types_limit",
            "Distinct event types that may be tracked at once",
            metrics.event_types_limit.clone(),
        );
        registry.register(
            "aggregate_query_duration_seconds",
            "Time to compute get_aggregates",
            metrics.query_duration.clone(),
        );
        metrics
    }

    fn rejected(&self, reason: &'static str, count: u64) {
        if count > 0 {
            self.rejected
                .get_or_create(&ReasonLabel { reason })
                .inc_by(count);
        }
    }
}

/// Shared state of every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    processor: Arc<MetricsProcessor>,
    limits: Arc<HttpLimits>,
    metrics: IngestMetrics,
    http_metrics: HttpMetrics,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

impl AppState {
    /// State for `processor`, registering every metric under the `metrics_processor` prefix.
    pub fn new(processor: Arc<MetricsProcessor>, limits: HttpLimits) -> Self {
        let mut registry = Registry::with_prefix("metrics_processor");
        let metrics = IngestMetrics::register(&mut registry);
        let http = HttpMetrics::register(&mut registry);
        metrics
            .event_types_limit
            .set(processor.config().max_event_types as i64);
        Self {
            processor,
            limits: Arc::new(limits),
            metrics,
            http_metrics: http,
            registry: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The flag `/readyz` reports; cleared when shutdown starts so balancers stop sending.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.ready)
    }
}

/// The whole service as a router, ready to serve or to call in tests without a socket.
pub fn router(state: AppState) -> Router {
    let http_metrics = state.http_metrics.clone();
    let limits = Arc::clone(&state.limits);
    let permits = Arc::new(Semaphore::new(limits.max_in_flight));
    let batch_permits = Arc::new(Semaphore::new(limits.max_batches_in_flight));

    let api = Router::new()
        .route(
            "/v1/events",
            post(events::ingest_one).layer(DefaultBodyLimit::max(limits.max_event_bytes)),
        )
        .route(
            "/v1/events/batch",
            post(events::ingest_batch)
                .layer(DefaultBodyLimit::max(limits.max_batch_bytes))
                .layer(from_fn_with_state(batch_permits, shed_load)),
        )
        .route("/v1/aggregates", get(aggregates::get_aggregates))
        .layer(from_fn_with_state(permits, shed_load));

    Router::new()
        .merge(api)
        .merge(ops::routes(
            Arc::clone(&state.ready),
            Arc::clone(&state.registry),
            state.clone(),
        ))
        .route_layer(from_fn_with_state(limits.request_timeout, time_limit))
        .route_layer(from_fn_with_state(http_metrics, track_http))
        .fallback(problem::not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .with_state(state)
        .layer(from_fn(request_context))
}

/// Ready whenever it is not draining: events live in memory, no backend to wait for.
impl Readiness for AppState {
    async fn check(&self) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
        Ok(serde_json::Map::new())
    }

    fn before_scrape(&self) {
        self.metrics
            .event_types
            .set(self.processor.live_event_types() as i64);
    }
}

/// Maps a body-reading failure (too large, aborted) to a problem.
fn body_problem(rejection: axum::extract::rejection::BytesRejection, limit: usize) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::too_large(format!(
            "the body is larger than this endpoint's limit of {limit} bytes"
        ))
    } else {
        Problem::malformed(format!(
            "the body could not be read: {}",
            rejection.body_text()
        ))
    }
}
