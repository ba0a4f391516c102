//! Prometheus exposition: a registry per service, the `/metrics` handler, and the HTTP
//! metrics `route_layer`.
//!
//! Each service owns a [`prometheus_client::registry::Registry`] created with its prefix
//! (`metrics_processor`, …), registers its own metrics in it next to [`HttpMetrics`], and
//! serves it with [`render`]. The HTTP layer labels by `MatchedPath` (the route template),
//! never the raw path, so label values stay bounded whatever clients send.

use std::{
    borrow::Cow,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: Cow<'static, str>,
    /// Route template, e.g. `/v1/events/batch`.
    pub route: Cow<'static, str>,
    /// Response status code.
    pub status: u16,
}

/// Labels of a request's duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// HTTP method.
    pub method: Cow<'static, str>,
    /// Route template.
    pub route: Cow<'static, str>,
}

type DurationFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Request counts and latencies by route; cheap to clone (the families are shared).
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: DurationFamily,
}

impl HttpMetrics {
    /// Registers `http_requests_total` and `http_request_duration_seconds` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: DurationFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_requests",
            "HTTP requests handled, by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response head, by route",
            duration.clone(),
        );
        Self { requests, duration }
    }

    /// Counts one request to `route` (a template, never a raw path) answered with `status`
    /// after `elapsed`. A standard method and a `'static` route cost no allocation.
    pub fn record(
        &self,
        method: &Method,
        route: Cow<'static, str>,
        status: u16,
        elapsed: Duration,
    ) {
        let method = method_label(method);
        self.duration
            .get_or_create(&RouteLabels {
                method: method.clone(),
                route: route.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route,
                status,
            })
            .inc();
    }
}

/// The method as a label value, borrowed for the standard ones.
fn method_label(method: &Method) -> Cow<'static, str> {
    Cow::Borrowed(match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return Cow::Owned(method.as_str().to_owned()),
    })
}

/// Buckets from 50 µs to about 1.6 s: the services answer in microseconds when healthy.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Records every request that matched a route. Apply with `Router::route_layer`.
pub async fn track_http(
    State(metrics): State<HttpMetrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(Cow::Borrowed("unmatched"), |p| {
            Cow::Owned(p.as_str().to_owned())
        });
    let method = request.method().clone();
    let response = next.run(request).await;
    metrics.record(
        &method,
        route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Renders `registry` in the text exposition format, for a `GET /metrics` handler.
pub fn render(registry: &Arc<Registry>) -> Response {
    let mut body = String::with_capacity(16 * 1024);
    if let Err(error) = encode(&mut body, registry) {
        tracing::error!(%error, "failed to encode metrics");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{Router, body::Body, middleware::from_fn_with_state, routing::get};
    use tower::ServiceExt;

    #[tokio::test]
    async fn requests_are_labelled_by_route_template_not_raw_path() {
        let mut registry = Registry::with_prefix("svc");
        let metrics = HttpMetrics::register(&mut registry);
        let registry = Arc::new(registry);
        let app = Router::new()
            .route("/items/{id}", get(|| async { "ok" }))
            .route_layer(from_fn_with_state(metrics, track_http));

        for id in ["1", "2", "3"] {
            let request = Request::get(format!("/items/{id}"))
                .body(Body::empty())
                .unwrap();
            assert_eq!(app.clone().oneshot(request).await.unwrap().status(), 200);
        }

        let body = axum::body::to_bytes(render(&registry).into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.contains(
                r#"svc_http_requests_total{method="GET",route="/items/{id}",status="200"} 3"#
            ),
            "{text}"
        );
        assert!(
            !text.contains("/items/1"),
            "raw paths must never become labels"
        );
    }
}
