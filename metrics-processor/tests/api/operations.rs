//! Probes, metrics, request ids and unknown routes.

use std::time::Duration;

use test_support::polling::poll_until;

use crate::helpers::{event, problem, spawn_app};

/// How long a test waits for the service to get where it should.
const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
}

#[tokio::test]
async fn metrics_are_prometheus_text_labelled_by_route() {
    let app = spawn_app().await;
    app.post_event(&event("u", "t", 1.0)).await;
    app.post_event(&serde_json::json!({ "value": 1 })).await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    for expected in [
        r#"metrics_processor_http_requests_total{method="POST",route="/v1/events",status="202"} 1"#,
        r#"metrics_processor_http_requests_total{method="POST",route="/v1/events",status="422"} 1"#,
        "metrics_processor_events_ingested_total 1",
        r#"metrics_processor_events_rejected_total{reason="invalid_field"} 1"#,
        "metrics_processor_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let app = spawn_app().await;
    let mine = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(mine.headers()["x-request-id"], "trace-me-42");
    let hostile = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "a b c")
        .send()
        .await
        .unwrap();
    let made = hostile.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(made, "a b c");
    assert_eq!(
        uuid_version(&made),
        Some('7'),
        "generated ids are UUIDv7: {made}"
    );
}

fn uuid_version(id: &str) -> Option<char> {
    (id.len() == 36).then(|| id.chars().nth(14)).flatten()
}

#[tokio::test]
async fn unknown_paths_and_methods_are_problems() {
    let app = spawn_app().await;
    let body = problem(app.get("/v1/nothing-here").await, 404).await;
    assert_eq!(body["type"], "urn:problem:not-found");
    let wrong_method = app
        .client
        .delete(app.url("/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
}

#[tokio::test]
async fn clients_that_never_finish_a_request_head_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = crate::helpers::spawn_app_with(|s| {
        s.serve.header_read_timeout = std::time::Duration::from_millis(500)
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    // Silent and dribbling clients are closed by the timeout; an HTTP/2 preface is refused
    // at once (this server speaks HTTP/1.1 only).
    let cases: [(&[u8], bool); 3] = [
        (b"", true),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", true),
        (b"PRI * HTTP/2.0\r\n", false),
    ];
    for (opening, by_timeout) in cases {
        let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
        slow.write_all(opening).await.unwrap();
        let started = std::time::Instant::now();
        let mut buffer = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            slow.read_to_end(&mut buffer),
        )
        .await;
        let shown = String::from_utf8_lossy(opening);
        assert!(
            closed.is_ok(),
            "{shown:?}: the connection was still open after 5 s"
        );
        if by_timeout {
            assert!(
                started.elapsed() >= std::time::Duration::from_millis(400),
                "{shown:?}: closed too early"
            );
        }
    }

    // Everyone else is served as before.
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_request_that_runs_too_long_is_503_and_counted_under_its_route() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = crate::helpers::spawn_app_with(|s| {
        s.serve.request_timeout = std::time::Duration::from_millis(300)
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    // The body is promised but never sent, so the handler waits until the limit.
    let mut stuck = tokio::net::TcpStream::connect(&address).await.unwrap();
    stuck
        .write_all(b"POST /v1/events/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[")
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stuck.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..read]);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );

    let metrics = app.get("/metrics").await.text().await.unwrap();
    let expected = r#"metrics_processor_http_requests_total{method="POST",route="/v1/events/batch",status="503"} 1"#;
    assert!(metrics.contains(expected), "{metrics}");
}

#[tokio::test]
async fn readiness_fails_before_the_listener_closes() {
    let mut app = crate::helpers::spawn_app_with(|s| {
        s.serve.shutdown_readiness_delay = std::time::Duration::from_millis(800)
    })
    .await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    app.begin_shutdown();
    let not_ready = poll_until("/readyz to fail once shutdown began", WAIT, async || {
        let response = app.get("/readyz").await;
        (response.status() == 503).then_some(response)
    })
    .await;
    // Not ready, but still serving everything else.
    problem(not_ready, 503).await;
    assert_eq!(app.post_event(&event("u", "t", 1.0)).await.status(), 202);
    poll_until("the listener to close after the delay", WAIT, async || {
        let refused = app.client.get(app.url("/healthz")).send().await;
        refused.is_err().then_some(())
    })
    .await;
}
