//! The operations routes every service serves the same way: `/healthz` (the process
//! answers), `/readyz` (keep this node in rotation, or take it out) and `/metrics`
//! (Prometheus exposition).
//!
//! A service says only what its readiness depends on, through [`Readiness`]; draining on
//! shutdown (the flag [`crate::shutdown::withdraw_readiness`] clears) is handled here for all.
//!
//! ```ignore
//! let router = api.merge(ops::routes(Arc::clone(&ready), registry, Backends { pool }));
//! ```

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};

use crate::problem::Problem;

/// What a node needs before it takes traffic.
pub trait Readiness: Clone + Send + Sync + 'static {
    /// `Ok` with the fields reported beside `"status": "ready"`, or the problem (a 503 with
    /// `Retry-After`) that takes this node out of rotation.
    fn check(&self) -> impl Future<Output = Result<Map<String, Value>, Problem>> + Send;

    /// Refreshes gauges sampled when scraped; called before `/metrics` renders.
    fn before_scrape(&self) {}
}

/// A service that is ready whenever it is not draining.
impl Readiness for () {
    async fn check(&self) -> Result<Map<String, Value>, Problem> {
        Ok(Map::new())
    }
}

#[derive(Clone)]
struct Probes<R> {
    ready: Arc<AtomicBool>,
    readiness: R,
}

#[derive(Clone)]
struct Scrape<R> {
    registry: Arc<Registry>,
    readiness: R,
}

/// `/healthz`, `/readyz` and `/metrics`, to merge into a service's router (before its
/// `route_layer`s, so they are timed and counted like every other route).
pub fn routes<S, R>(ready: Arc<AtomicBool>, registry: Arc<Registry>, readiness: R) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    R: Readiness,
{
    let scrape = Router::new()
        .route("/metrics", get(metrics::<R>))
        .with_state(Scrape {
            registry,
            readiness: readiness.clone(),
        });
    probes(ready, readiness).merge(scrape)
}

/// `/healthz` and `/readyz` alone, for a listener that must not expose `/metrics`.
pub fn probes<S, R>(ready: Arc<AtomicBool>, readiness: R) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    R: Readiness,
{
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<R>))
        .with_state(Probes { ready, readiness })
}

/// `Ok` when PostgreSQL answers a trivial query; otherwise the 503 readiness reports.
#[cfg(feature = "postgres")]
pub async fn postgres_reachable(pool: &sqlx::PgPool) -> Result<(), Problem> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map(drop)
        .map_err(|error| {
            tracing::warn!(%error, "readiness: PostgreSQL unreachable");
            Problem::unavailable("PostgreSQL is unreachable", 1)
        })
}

async fn healthz() -> Json<Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz<R: Readiness>(State(ops): State<Probes<R>>) -> Response {
    if !ops.ready.load(Ordering::Acquire) {
        return Problem::unavailable("shutting down", 5).into_response();
    }
    match ops.readiness.check().await {
        Ok(mut fields) => {
            fields.insert("status".into(), "ready".into());
            Json(Value::Object(fields)).into_response()
        }
        Err(problem) => problem.into_response(),
    }
}

async fn metrics<R: Readiness>(State(ops): State<Scrape<R>>) -> Response {
    ops.readiness.before_scrape();
    crate::prometheus::render(&ops.registry)
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    use super::*;

    #[derive(Clone)]
    struct Down;

    impl Readiness for Down {
        async fn check(&self) -> Result<Map<String, Value>, Problem> {
            Err(Problem::unavailable("the store is unreachable", 1))
        }
    }

    async fn status(router: Router, path: &str) -> (u16, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readiness_reports_draining_before_asking_the_backends() {
        let ready = Arc::new(AtomicBool::new(true));
        let router = || routes(Arc::clone(&ready), Arc::new(Registry::default()), ());
        assert_eq!(status(router(), "/readyz").await.0, 200);
        assert_eq!(status(router(), "/healthz").await.0, 200);
        ready.store(false, Ordering::Release);
        let (code, body) = status(router(), "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("shutting down"), "{body}");
        assert_eq!(
            status(router(), "/healthz").await.0,
            200,
            "alive while draining"
        );
    }

    #[tokio::test]
    async fn a_backend_down_takes_the_node_out_of_rotation() {
        let router = routes(
            Arc::new(AtomicBool::new(true)),
            Arc::new(Registry::default()),
            Down,
        );
        let (code, body) = status(router, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("the store is unreachable"), "{body}");
    }
}
