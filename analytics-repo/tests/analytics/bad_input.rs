//! Bad input on every endpoint answers the problem that names it, never a 5xx, and a refused
//! batch stores nothing.

use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use test_support::problem_json::problem;
use uuid::Uuid;

use crate::support::{Service, event_json, fresh, today};

async fn stored(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn bad_batches_are_refused_whole_and_by_index() {
    let (url, repository) = fresh().await;
    let pool = repository.pool().clone();
    let redis = test_support::require_redis().await;
    let service = Service::start(
        &url,
        &redis,
        &["--max-body-bytes", "4096", "--max-batch", "10"],
    )
    .await;
    let tenant = service.tenant("enterprise").await;
    let now = Utc::now() - TimeDelta::minutes(1);
    let good = event_json(tenant, now, 10);
    let json_type = "application/json";

    problem(
        service.post("/v1/events", json_type, "not json").await,
        400,
        None,
    )
    .await;
    problem(service.post_json("/v1/events", &good).await, 400, None).await;
    problem(
        service
            .post("/v1/events", "text/plain", json!([good]).to_string())
            .await,
        415,
        None,
    )
    .await;
    problem(
        service
            .post("/v1/events", "", json!([good]).to_string())
            .await,
        415,
        None,
    )
    .await;
    let big = format!("[{}]", vec![good.to_string(); 40].join(","));
    assert!(big.len() > 4096);
    problem(service.post("/v1/events", json_type, big).await, 413, None).await;
    let eleven = Value::Array(vec![good.clone(); 11]);
    problem(service.post_json("/v1/events", &eleven).await, 413, None).await;
    problem(
        service.post_json("/v1/events", &json!([])).await,
        422,
        Some("events"),
    )
    .await;

    let mut nul = good.clone();
    nul["name"] = json!("a\u{0}b");
    let body = problem(
        service.post_json("/v1/events", &json!([good, nul])).await,
        422,
        Some("[1].name"),
    )
    .await;
    assert_eq!(body["errors"][0]["index"], 1);
    assert_eq!(body["errors"][0]["field"], "name");

    let mut invalid_utf8 = br#"[{"tenant_id": ""#.to_vec();
    invalid_utf8.extend_from_slice(tenant.to_string().as_bytes());
    invalid_utf8.extend_from_slice(
        b"\", \"created_at\": \"2026-01-01T00:00:00Z\", \"processing_time\": 1, \"name\": \"\xff\xfe\"}]",
    );
    problem(
        service.post("/v1/events", json_type, invalid_utf8).await,
        400,
        None,
    )
    .await;

    // A number no f64 holds is not JSON serde reads; one past u64 is a bad field.
    let huge = good
        .to_string()
        .replace("\"processing_time\":10", "\"processing_time\":1e400");
    assert!(huge.contains("1e400"));
    problem(
        service
            .post("/v1/events", json_type, format!("[{huge}]"))
            .await,
        400,
        None,
    )
    .await;
    let past_u64 = good.to_string().replace(
        "\"processing_time\":10",
        "\"processing_time\":18446744073709551616",
    );
    let body = problem(
        service
            .post("/v1/events", json_type, format!("[{past_u64}]"))
            .await,
        422,
        Some("[0].processing_time"),
    )
    .await;
    assert_eq!(body["errors"][0]["index"], 0);

    let stranger = Uuid::now_v7();
    let body = problem(
        service
            .post_json(
                "/v1/events",
                &json!([good, event_json(stranger, now, 1), good]),
            )
            .await,
        422,
        Some("[1].tenant_id"),
    )
    .await;
    assert_eq!(body["errors"][0]["index"], 1);
    assert_eq!(body["errors"][0]["field"], "tenant_id");
    assert_eq!(body["errors"].as_array().unwrap().len(), 1);

    // Good rows beside bad ones: nothing of the batch is stored.
    let mut negative = good.clone();
    negative["processing_time"] = json!(-1);
    let mut future = good.clone();
    future["created_at"] = json!((Utc::now() + TimeDelta::days(3)).to_rfc3339());
    let body = problem(
        service
            .post_json(
                "/v1/events",
                &json!([good, negative, good, future, {"x": 1}]),
            )
            .await,
        422,
        Some("[1].processing_time"),
    )
    .await;
    let indexes: Vec<_> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [1, 3, 4]);
    assert_eq!(stored(&pool).await, 0);

    let ndjson = format!("{good}\n\n{good}\r\n{good}\n");
    let response = service
        .post("/v1/events", "application/x-ndjson", ndjson)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["stored"], 3);
    let ndjson = format!("{good}\n{{\"tenant_id\": 1}}\n{good}\n");
    let body = problem(
        service
            .post("/v1/events", "application/x-ndjson", ndjson)
            .await,
        422,
        Some("[1].tenant_id"),
    )
    .await;
    assert_eq!(body["errors"][0]["index"], 1);
    let ndjson = format!("{good}\nnot json\n");
    let body = problem(
        service
            .post("/v1/events", "application/x-ndjson", ndjson)
            .await,
        422,
        None,
    )
    .await;
    assert_eq!(body["errors"][0]["index"], 1);
    assert_eq!(stored(&pool).await, 3);
}

#[tokio::test]
async fn deep_json_is_a_bad_request_not_a_crash() {
    let (url, _repository) = fresh().await;
    let redis = test_support::require_redis().await;
    let service = Service::start(&url, &redis, &[]).await;
    for depth in [200, 10_000] {
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        problem(
            service
                .post("/v1/events", "application/json", deep.clone())
                .await,
            400,
            None,
        )
        .await;
        let line = format!("{}{}\n", "{\"a\":".repeat(depth), "}".repeat(depth));
        problem(
            service
                .post("/v1/events", "application/x-ndjson", line)
                .await,
            422,
            None,
        )
        .await;
    }
    // Still serving.
    assert_eq!(service.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn bad_queries_paths_and_tenants_are_named() {
    let (url, _repository) = fresh().await;
    let redis = test_support::require_redis().await;
    let service = Service::start(&url, &redis, &[]).await;
    let tenant = service.tenant("pro").await;
    let report = "/v1/reports/enterprise-daily";
    let daily = format!("/v1/tenants/{tenant}/daily");
    let list = format!("/v1/tenants/{tenant}/events");
    let (day, tomorrow) = (
        today().to_string(),
        (today() + TimeDelta::days(1)).to_string(),
    );

    problem(service.get(report).await, 422, Some("from")).await;
    for bad in [
        "2024-13-01",
        "0000-01-01",
        "1999-12-31",
        "2024-1-01",
        "yesterday",
        "",
    ] {
        problem(
            service.get(&format!("{report}?from={bad}")).await,
            422,
            Some("from"),
        )
        .await;
    }
    let too_late = (today() + TimeDelta::days(2)).to_string();
    problem(
        service.get(&format!("{report}?from={too_late}")).await,
        422,
        Some("from"),
    )
    .await;
    problem(
        service
            .get(&format!("{report}?from={day}&colour=red"))
            .await,
        400,
        Some("colour"),
    )
    .await;
    problem(
        service
            .get(&format!("{report}?from={day}&from={day}"))
            .await,
        400,
        Some("from"),
    )
    .await;
    problem(
        service.get(&format!("{report}?from=%ff")).await,
        400,
        Some("from"),
    )
    .await;
    problem(service.get(&format!("{report}?%ff={day}")).await, 400, None).await;
    assert_eq!(
        service.get(&format!("{report}?from={day}")).await.status(),
        200
    );

    problem(
        service.get(&format!("{daily}?from={day}")).await,
        422,
        Some("to"),
    )
    .await;
    problem(
        service
            .get(&format!("{daily}?from={tomorrow}&to={day}"))
            .await,
        422,
        Some("to"),
    )
    .await;
    problem(
        service
            .get(&format!("{daily}?from=2000-01-01&to={day}"))
            .await,
        422,
        Some("to"),
    )
    .await;
    assert_eq!(
        service
            .get(&format!("{daily}?from=2016-01-01&to=2025-12-31"))
            .await
            .status(),
        200
    );
    problem(
        service
            .get(&format!(
                "/v1/tenants/{}/daily?from={day}&to={day}",
                Uuid::now_v7()
            ))
            .await,
        404,
        None,
    )
    .await;
    problem(
        service
            .get(&format!("/v1/tenants/not-a-uuid/daily?from={day}&to={day}"))
            .await,
        404,
        None,
    )
    .await;
    problem(
        service
            .get(&format!("/v1/tenants/%ff/daily?from={day}&to={day}"))
            .await,
        404,
        None,
    )
    .await;

    problem(
        service
            .get(&format!("{list}?from={day}&to={day}&limit=0"))
            .await,
        422,
        Some("limit"),
    )
    .await;
    problem(
        service
            .get(&format!("{list}?from={day}&to={day}&limit=1001"))
            .await,
        422,
        Some("limit"),
    )
    .await;
    problem(
        service
            .get(&format!("{list}?from={day}&to={day}&cursor=abc"))
            .await,
        422,
        Some("cursor"),
    )
    .await;
    // A UUID, but not one of ours (version 4).
    problem(
        service
            .get(&format!(
                "{list}?from={day}&to={day}&cursor={}",
                Uuid::new_v4()
            ))
            .await,
        422,
        Some("cursor"),
    )
    .await;
    problem(
        service
            .get(&format!("{list}?from={day}&to=2000-01-01"))
            .await,
        422,
        Some("to"),
    )
    .await;
    problem(
        service
            .get(&format!(
                "/v1/tenants/{}/events?from={day}&to={day}",
                Uuid::now_v7()
            ))
            .await,
        404,
        None,
    )
    .await;

    // Tenants.
    problem(
        service
            .post_json("/v1/tenants", &json!({"name": "x", "plan": "platinum"}))
            .await,
        422,
        Some("plan"),
    )
    .await;
    problem(
        service
            .post_json("/v1/tenants", &json!({"name": "a\u{0}b", "plan": "pro"}))
            .await,
        422,
        Some("name"),
    )
    .await;
    problem(
        service
            .post_json(
                "/v1/tenants",
                &json!({"name": "x", "plan": "pro", "owner": 1}),
            )
            .await,
        422,
        Some("owner"),
    )
    .await;
    problem(
        service.post("/v1/tenants", "application/json", "{").await,
        400,
        None,
    )
    .await;
    problem(
        service
            .put_json(
                &format!("/v1/tenants/{}/plan", Uuid::now_v7()),
                &json!({"plan": "pro"}),
            )
            .await,
        404,
        None,
    )
    .await;
    problem(
        service
            .put_json(&format!("/v1/tenants/{tenant}/plan"), &json!({"plan": 5}))
            .await,
        422,
        Some("plan"),
    )
    .await;
    problem(
        service
            .put_json("/v1/tenants/nope/plan", &json!({"plan": "pro"}))
            .await,
        404,
        None,
    )
    .await;
    problem(service.get("/v1/nothing-here").await, 404, None).await;
    let wrong_method = service
        .http
        .delete(service.url("/v1/events"))
        .send()
        .await
        .unwrap();
    problem(wrong_method, 405, None).await;
}
