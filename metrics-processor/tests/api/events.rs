//! `POST /v1/events` and `POST /v1/events/batch`, good and bad.

use chrono::{Duration, Utc};
use serde_json::{Value, json};

use crate::helpers::{event, problem, rfc3339, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_valid_event_is_accepted_and_counted() {
    let app = spawn_app().await;
    let response = app.post_event(&event("u1", "checkout", 12.5)).await;
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({ "accepted": 1 })
    );
    assert_eq!(app.count_of("checkout").await, 1);
}

#[tokio::test]
async fn malformed_json_is_400_and_records_nothing() {
    let app = spawn_app().await;
    for body in [
        "",
        "{",
        "{\"timestamp\": }",
        "not json",
        "{\"value\": NaN}",
        "{\"value\": 1e999}",
    ] {
        let body = problem(
            app.post_raw("/v1/events", Some("application/json"), body)
                .await,
            400,
        )
        .await;
        assert_eq!(body["type"], "urn:problem:malformed-request");
    }
    assert!(
        app.processor
            .get_aggregates(60)
            .unwrap()
            .event_types
            .is_empty()
    );
}

#[tokio::test]
async fn each_bad_field_is_named() {
    let app = spawn_app().await;
    let now = rfc3339(Utc::now());
    let long_type = "t".repeat(65);
    let long_user = "u".repeat(129);
    let cases = [
        (
            json!({ "user_id": "u", "event_type": "t", "value": 1 }),
            "timestamp",
        ),
        (
            json!({ "timestamp": now, "event_type": "t", "value": 1 }),
            "user_id",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "value": 1 }),
            "event_type",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "event_type": "t" }),
            "value",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "event_type": "t", "value": "NaN" }),
            "value",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "event_type": "t", "value": "Infinity" }),
            "value",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "event_type": "t", "value": null }),
            "value",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "event_type": "t", "value": 1e300 }),
            "value",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "event_type": "", "value": 1 }),
            "event_type",
        ),
        (
            json!({ "timestamp": now, "user_id": "", "event_type": "t", "value": 1 }),
            "user_id",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "event_type": long_type, "value": 1 }),
            "event_type",
        ),
        (
            json!({ "timestamp": now, "user_id": long_user, "event_type": "t", "value": 1 }),
            "user_id",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "event_type": "<script>", "value": 1 }),
            "event_type",
        ),
        (
            json!({ "timestamp": now, "user_id": "a\u{0}b", "event_type": "t", "value": 1 }),
            "user_id",
        ),
        (
            json!({ "timestamp": "last tuesday", "user_id": "u", "event_type": "t", "value": 1 }),
            "timestamp",
        ),
        (
            json!({ "timestamp": now, "user_id": "u", "event_type": "t", "value": 1, "extra": true }),
            "extra",
        ),
    ];
    for (event, field) in cases {
        let body = problem(app.post_event(&event).await, 422).await;
        assert_eq!(body["field"], field, "{event} -> {body}");
    }
    assert!(
        app.processor
            .get_aggregates(60)
            .unwrap()
            .event_types
            .is_empty(),
        "bad input changed nothing"
    );
}

#[tokio::test]
async fn timestamps_outside_the_window_are_refused() {
    let app = spawn_app().await;
    let old = rfc3339(Utc::now() - Duration::minutes(61));
    let future = rfc3339(Utc::now() + Duration::minutes(5));
    for timestamp in [
        old,
        future,
        "1970-01-01T00:00:00Z".to_owned(),
        "9999-12-31T23:59:59Z".to_owned(),
    ] {
        let event =
            json!({ "timestamp": timestamp, "user_id": "u", "event_type": "t", "value": 1 });
        let body = problem(app.post_event(&event).await, 422).await;
        assert_eq!(body["field"], "timestamp", "{body}");
    }
    let late = json!({ "timestamp": rfc3339(Utc::now() - Duration::minutes(30)), "user_id": "u", "event_type": "t", "value": 1 });
    assert_eq!(
        app.post_event(&late).await.status(),
        202,
        "late but inside the window"
    );
}

#[tokio::test]
async fn wrong_or_missing_content_type_is_415() {
    let app = spawn_app().await;
    let body = event("u", "t", 1.0).to_string();
    for content_type in [None, Some("text/plain"), Some("application/x-ndjson")] {
        let body = problem(
            app.post_raw("/v1/events", content_type, body.clone()).await,
            415,
        )
        .await;
        assert_eq!(body["field"], "Content-Type");
    }
    let accepted = app
        .post_raw("/v1/events", Some("application/json; charset=utf-8"), body)
        .await;
    assert_eq!(
        accepted.status(),
        202,
        "parameters on the media type are fine"
    );
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = spawn_app_with(|s| {
        s.max_event_bytes = 1024;
        s.max_batch_bytes = 4096;
    })
    .await;
    let huge = json!({ "timestamp": rfc3339(Utc::now()), "user_id": "u".repeat(2000), "event_type": "t", "value": 1 });
    problem(app.post_event(&huge).await, 413).await;
    let many: Vec<Value> = (0..100)
        .map(|i| event(&format!("u{i}"), "t", 1.0))
        .collect();
    problem(app.post_batch(&many).await, 413).await;
    assert_eq!(app.count_of("t").await, 0);
}

#[tokio::test]
async fn a_batch_keeps_good_events_and_reports_bad_ones_by_index() {
    let app = spawn_app().await;
    let batch = vec![
        event("u1", "page.view", 1.0),
        json!({ "timestamp": rfc3339(Utc::now()), "user_id": "u2", "event_type": "page.view" }),
        json!("not an event"),
        event("u3", "page.view", 3.0),
        json!({ "timestamp": rfc3339(Utc::now() - Duration::hours(3)), "user_id": "u4", "event_type": "page.view", "value": 4 }),
    ];
    let response = app.post_batch(&batch).await;
    assert_eq!(response.status(), 202);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["accepted"], 2);
    assert_eq!(report["rejected"], 3);
    let errors = report["errors"].as_array().unwrap();
    let indexes: Vec<u64> = errors
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![1, 2, 4]);
    assert_eq!(errors[0]["field"], "value");
    assert!(errors[1].get("field").is_none());
    assert_eq!(errors[2]["field"], "timestamp");
    assert_eq!(app.count_of("page.view").await, 2);
}

#[tokio::test]
async fn ndjson_batches_report_bad_lines() {
    let app = spawn_app().await;
    let body = format!(
        "{}\n\n{{broken\n{}\r\n{}\n",
        event("a", "search", 1.0),
        event("b", "search", 2.0),
        json!({ "timestamp": rfc3339(Utc::now()), "user_id": "c", "event_type": "bad type", "value": 1 }),
    );
    let response = app
        .post_raw("/v1/events/batch", Some("application/x-ndjson"), body)
        .await;
    assert_eq!(response.status(), 202);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["accepted"], 2);
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    assert_eq!(
        (errors[0]["index"].as_u64(), errors[0]["line"].as_u64()),
        (Some(1), Some(3))
    );
    assert!(
        errors[0]["detail"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    assert_eq!(
        (errors[1]["index"].as_u64(), errors[1]["line"].as_u64()),
        (Some(3), Some(5))
    );
    assert_eq!(errors[1]["field"], "event_type");
    assert_eq!(app.count_of("search").await, 2);
}

#[tokio::test]
async fn a_broken_array_is_refused_whole() {
    let app = spawn_app().await;
    let body = format!("[{}, {{\"timestamp\": ", event("u", "t", 1.0));
    problem(
        app.post_raw("/v1/events/batch", Some("application/json"), body)
            .await,
        400,
    )
    .await;
    problem(
        app.post_raw("/v1/events/batch", Some("application/json"), "{}")
            .await,
        400,
    )
    .await;
    assert_eq!(app.count_of("t").await, 0);
}

#[tokio::test]
async fn empty_all_bad_and_too_long_batches_are_refused() {
    let app = spawn_app_with(|s| s.max_batch_events = 10).await;
    let body = problem(app.post_batch(&[]).await, 422).await;
    assert_eq!(body["field"], "body");
    let empty_ndjson = app
        .post_raw("/v1/events/batch", Some("application/x-ndjson"), "\n \n")
        .await;
    problem(empty_ndjson, 422).await;

    let all_bad = vec![json!(1), json!({ "value": 2 })];
    let body = problem(app.post_batch(&all_bad).await, 422).await;
    assert_eq!(body["type"], "urn:problem:batch-rejected");
    assert_eq!(body["errors"].as_array().unwrap().len(), 2);

    let eleven: Vec<Value> = (0..11).map(|i| event(&format!("u{i}"), "t", 1.0)).collect();
    problem(app.post_batch(&eleven).await, 413).await;
    let ndjson: String = eleven.iter().map(|e| format!("{e}\n")).collect();
    problem(
        app.post_raw("/v1/events/batch", Some("application/x-ndjson"), ndjson)
            .await,
        413,
    )
    .await;
    assert_eq!(app.count_of("t").await, 0);
}

#[tokio::test]
async fn many_bad_events_get_a_bounded_error_list() {
    let app = spawn_app().await;
    let mut batch: Vec<Value> = (0..2_500).map(|_| json!({ "value": 1 })).collect();
    batch.push(event("u", "t", 1.0));
    let report: Value = app.post_batch(&batch).await.json().await.unwrap();
    assert_eq!(report["accepted"], 1);
    assert_eq!(report["rejected"], 2_500);
    assert_eq!(report["errors"].as_array().unwrap().len(), 1_000);
    assert_eq!(report["errors_truncated"], true);
}

#[tokio::test]
async fn the_event_type_limit_is_a_clear_error_and_a_metric() {
    let app = spawn_app_with(|s| s.max_event_types = 2).await;
    assert_eq!(app.post_event(&event("u", "a", 1.0)).await.status(), 202);
    assert_eq!(app.post_event(&event("u", "b", 1.0)).await.status(), 202);
    let body = problem(app.post_event(&event("u", "c", 1.0)).await, 422).await;
    assert_eq!(body["type"], "urn:problem:event-type-limit");
    assert_eq!(body["field"], "event_type");
    assert_eq!(
        app.post_event(&event("u", "a", 1.0)).await.status(),
        202,
        "known types still flow"
    );

    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"metrics_processor_events_rejected_total{reason="event_type_limit"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("metrics_processor_event_types 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("metrics_processor_event_types_limit 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_huge_array_is_refused_at_the_limit_without_parsing_it_all() {
    let app = spawn_app_with(|s| s.max_batch_events = 1_000).await;
    // 16 MiB of empty objects: 5.6M elements. Reading stops at element 1,001.
    let body = format!("[{}{{}}]", "{},".repeat((16 << 20) / 3 - 1));
    let response = app
        .post_raw("/v1/events/batch", Some("application/json"), body)
        .await;
    let body = problem(response, 413).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("at most 1000 events"),
        "{body}"
    );
}

#[tokio::test]
async fn batches_beyond_their_own_in_flight_bound_are_shed() {
    let app = spawn_app_with(|s| s.max_batches_in_flight = 0).await;
    let response = app.post_batch(&[event("u", "t", 1.0)]).await;
    assert_eq!(response.headers()["retry-after"], "1");
    problem(response, 503).await;
    assert_eq!(
        app.post_event(&event("u", "t", 1.0)).await.status(),
        202,
        "single events are not affected"
    );
}

#[tokio::test]
async fn a_full_server_sheds_with_503_and_retry_after() {
    let app = spawn_app_with(|s| s.max_in_flight = 0).await;
    let response = app.post_event(&event("u", "t", 1.0)).await;
    assert_eq!(response.headers()["retry-after"], "1");
    let body = problem(response, 503).await;
    assert_eq!(body["type"], "urn:problem:unavailable");
    assert_eq!(
        app.processor.get_aggregates(60).unwrap().event_types.len(),
        0,
        "shed requests record nothing"
    );
    assert_eq!(
        app.get("/healthz").await.status(),
        200,
        "probes are never shed"
    );
}
