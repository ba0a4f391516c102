//! Active health checks, so a target that died between requests is skipped before a user's
//! request pays for finding out.
//!
//! Every `health_interval`, each target gets `GET health_path`; two failures in a row mark it
//! unhealthy (the ring walks past it), one success marks it healthy again. Each transition is
//! logged once and mirrored in `upstream_healthy`.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    body::Body,
    http::{Method, Request, Uri, header, uri::PathAndQuery},
};
use http_body_util::{BodyExt, Limited};
use tokio_util::sync::CancellationToken;

use super::{Inner, Target, UpstreamClient};

/// Failed checks in a row that make a target unhealthy.
const FAILURES_TO_UNHEALTHY: u32 = 2;

/// Checks one target until `stop` fires.
pub(super) async fn run(
    inner: Arc<Inner>,
    upstream: usize,
    target: usize,
    stop: CancellationToken,
) {
    let pool = &inner.upstreams[upstream];
    let settings = &pool.settings;
    let target = &pool.targets[target];
    let uri = match PathAndQuery::try_from(settings.health_path.as_str()) {
        Ok(path) => target.uri(path),
        Err(error) => {
            tracing::error!(%error, upstream = %settings.name, "health_path is not a valid path; no health checks");
            return;
        }
    };
    let mut interval =
        tokio::time::interval(settings.health_interval.max(Duration::from_millis(10)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let ok = tokio::select! {
            () = stop.cancelled() => return,
            ok = check(&pool.client, &uri, settings.health_timeout) => ok,
        };
        record(&settings.name, target, ok);
    }
}

/// One check: a 2xx within `timeout`, body included (so the connection goes back to the pool).
async fn check(client: &UpstreamClient, uri: &Uri, timeout: Duration) -> bool {
    let request = Request::builder()
        .method(Method::GET)
        .uri(uri.clone())
        .header(header::USER_AGENT, "api-gateway-health-check")
        .body(Body::empty())
        .expect("a GET with a valid URI is a valid request");
    let attempt = async {
        let response = client.request(request).await.ok()?;
        let success = response.status().is_success();
        Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .ok()?;
        Some(success)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Applies one check's verdict to `target`, logging and exporting transitions.
fn record(upstream: &str, target: &Target, ok: bool) {
    if ok {
        target.health_failures.store(0, Ordering::Relaxed);
        if !target.healthy.swap(true, Ordering::Relaxed) {
            target.healthy_gauge.set(1);
            tracing::info!(upstream, target = %target.url, "upstream target is healthy again");
        }
        return;
    }
    let failures = target.health_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if failures >= FAILURES_TO_UNHEALTHY && target.healthy.swap(false, Ordering::Relaxed) {
        target.healthy_gauge.set(0);
        tracing::warn!(
            upstream,
            target = %target.url,
            failures,
            "upstream target failed its health checks; routing around it"
        );
    }
}
