//! `GET /v1/aggregates`.

use serde_json::Value;

use crate::helpers::{event, problem, spawn_app};

#[tokio::test]
async fn aggregates_report_every_statistic() {
    let app = spawn_app().await;
    let batch: Vec<Value> = (1..=100)
        .map(|i| event(&format!("u{}", i % 25), "checkout", f64::from(i)))
        .collect();
    assert_eq!(app.post_batch(&batch).await.status(), 202);

    let response = app.aggregates("?minutes=5").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["window_minutes"], 5);
    let checkout = &body["event_types"]["checkout"];
    assert_eq!(checkout["count"], 100);
    assert_eq!(checkout["sum"], 5050.0);
    assert_eq!(checkout["avg"], 50.5);
    assert_eq!(checkout["min"], 1.0);
    assert_eq!(checkout["max"], 100.0);
    assert_eq!(checkout["distinct_users"], 25);
    for (name, exact) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0)] {
        let estimate = checkout[name].as_f64().unwrap();
        assert!(
            (estimate - exact).abs() <= exact * 0.011 + 0.5,
            "{name} = {estimate}"
        );
    }
}

#[tokio::test]
async fn the_flat_view_matches_the_seed() {
    let app = spawn_app().await;
    app.post_event(&event("u", "checkout", 10.0)).await;
    app.post_event(&event("v", "checkout", 30.0)).await;
    let flat: Value = app
        .aggregates("?minutes=1&format=flat")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(flat["checkout.count"], 2.0);
    assert_eq!(flat["checkout.sum"], 40.0);
    assert_eq!(flat["checkout.avg"], 20.0);
    assert_eq!(flat["checkout.distinct_users"], 2.0);
}

#[tokio::test]
async fn minutes_is_required_and_bounded_by_retention() {
    let app = spawn_app().await;
    for query in [
        "",
        "?minutes=",
        "?minutes=0",
        "?minutes=61",
        "?minutes=-1",
        "?minutes=abc",
        "?minutes=1.5",
        "?minutes=99999999999999",
    ] {
        let body = problem(app.aggregates(query).await, 422).await;
        assert_eq!(body["field"], "minutes", "{query}: {body}");
    }
    let body = problem(app.aggregates("?minutes=5&format=xml").await, 422).await;
    assert_eq!(body["field"], "format");
    assert_eq!(app.aggregates("?minutes=60").await.status(), 200);
    assert_eq!(
        app.aggregates("?minutes=1&unknown=1").await.status(),
        200,
        "unknown parameters are ignored"
    );
}

#[tokio::test]
async fn an_empty_window_is_an_empty_map() {
    let app = spawn_app().await;
    let body: Value = app.aggregates("?minutes=10").await.json().await.unwrap();
    assert_eq!(body["event_types"], serde_json::json!({}));
}
