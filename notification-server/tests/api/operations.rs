//! Health, readiness, metrics, the demo page, a PostgreSQL that goes away, and shutdown.

use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};

use crate::helpers::*;
use notification_server::Settings;

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    for engine in ENGINES {
        let app = spawn_app(engine).await;
        assert_eq!(app.get("/healthz", None).await.status(), 200);
        let ready: Value = app.get("/readyz", None).await.json().await.unwrap();
        assert_eq!(ready["status"], "ready");
        assert_eq!(
            ready["engine"],
            if engine == Engine::Memory {
                "memory"
            } else {
                "postgres"
            }
        );
        let _client = app.connect("alice").await;
        app.send(&["alice"], "counted").await;
        let metrics = app.get("/metrics", None).await.text().await.unwrap();
        for line in [
            "notification_server_connections 1",
            "notification_server_notifications_total{reason=\"users\"} 1",
            "notification_server_deliveries_total 1",
            "notification_server_http_requests_total",
        ] {
            assert!(metrics.contains(line), "{line} missing from\n{metrics}");
        }
    }
}

#[tokio::test]
async fn the_demo_page_is_served_with_a_strict_csp() {
    let app = spawn_app(Engine::Memory).await;
    let response = app.get("/", None).await;
    assert_eq!(response.status(), 200);
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = response.text().await.unwrap();
    assert!(html.contains("/v1/ws") && html.contains("last_id"));
}

#[tokio::test]
async fn when_postgresql_goes_away_sends_get_503_and_readiness_fails() {
    let url = fresh_database().await;
    let database = url.rsplit('/').next().unwrap().to_owned();
    let mut settings = Settings::for_tests();
    settings.database_url = Some(url.into());
    let app = spawn_with_settings(settings).await;
    app.send(&["alice"], "before").await;

    let mut admin = PgConnection::connect(&test_database_url()).await.unwrap();
    admin
        .execute(format!("DROP DATABASE {database} WITH (FORCE)").as_str())
        .await
        .unwrap();

    let mut body = content("after");
    body["user_ids"] = serde_json::json!(["alice"]);
    let response = app
        .post(
            "/v1/notifications",
            Some(&access_token("s", &["sender"])),
            &body,
        )
        .await;
    let problem = problem(response, 503, None).await;
    assert_eq!(problem["type"], "urn:problem:unavailable");
    assert!(!problem["detail"].as_str().unwrap().contains("sqlx"));
    let response = app.get("/readyz", None).await;
    assert_eq!(response.status(), 503);
    // Live connections are not the database's business: health stays green.
    assert_eq!(app.get("/healthz", None).await.status(), 200);
}

#[tokio::test]
async fn shutdown_closes_every_websocket_with_1001_and_keeps_what_was_persisted() {
    let url = fresh_database().await;
    let mut settings = Settings::for_tests();
    settings.database_url = Some(url.clone().into());
    let mut app = spawn_with_settings(settings).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(app.connect(&format!("user{}", i % 5)).await);
    }
    let id = app.send(&["user0"], "persisted").await;
    let took = app.shut_down().await;
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    for client in &mut clients {
        assert_eq!(client.expect_close().await, Some(1001));
    }
    // A new node on the same database still has it.
    let mut settings = Settings::for_tests();
    settings.database_url = Some(url.into());
    let app = spawn_with_settings(settings).await;
    let history: Value = app
        .get(
            "/v1/users/user0/notifications",
            Some(&access_token("user0", &[])),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(history["notifications"][0]["id"], id.as_str());
}
