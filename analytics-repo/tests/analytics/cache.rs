//! The report cache over HTTP: a hit after a miss, late events and plan changes invalidate,
//! concurrent misses of one key are computed once, and without Redis reports still answer.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use test_support::{PrivateRedis, free_port::free_port, polling::poll_until};

use crate::support::{Service, ensure_recent, event_json, fresh, today};

const COMPUTATIONS: &str = "analytics_repo_report_computations_total";

/// The enterprise report from `from`: its x-cache header and body.
async fn report(service: &Service, from: &str) -> (String, Value) {
    let response = service
        .get(&format!("/v1/reports/enterprise-daily?from={from}"))
        .await;
    assert_eq!(response.status(), 200);
    let cache = response.headers()["x-cache"]
        .to_str()
        .expect("x-cache")
        .to_owned();
    (cache, response.json().await.expect("report JSON"))
}

fn events_of(body: &Value, tenant: &str, date: &str) -> i64 {
    body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["tenant_id"] == tenant && r["date"] == date)
        .map(|r| r["events"].as_i64().expect("events"))
        .sum()
}

#[tokio::test]
async fn late_events_and_plan_changes_invalidate_cached_reports() {
    let (url, repository) = fresh().await;
    ensure_recent(repository.pool(), 40).await;
    let redis = test_support::require_redis().await;
    let service = Service::start(&url, &redis, &["--cache-open-ttl", "60s"]).await;
    let enterprise = service.tenant("enterprise").await;
    let pro = service.tenant("pro").await;
    let ten_days_ago = Utc::now() - TimeDelta::days(10);
    let date = ten_days_ago.date_naive().to_string();
    let batch = json!([
        event_json(enterprise, ten_days_ago, 100),
        event_json(pro, ten_days_ago, 100)
    ]);
    assert_eq!(service.post_json("/v1/events", &batch).await.status(), 200);
    let from = (today() - TimeDelta::days(30)).to_string();
    let (first, body) = report(&service, &from).await;
    assert_eq!(first, "miss");
    assert_eq!(events_of(&body, &enterprise.to_string(), &date), 1);
    let (second, again) = report(&service, &from).await;
    assert_eq!(second, "hit");
    assert_eq!(again, body);

    // A late event of an enterprise tenant: the next report is computed again and counts it.
    let late = json!([event_json(
        enterprise,
        ten_days_ago + TimeDelta::seconds(1),
        300
    )]);
    let stored = service.post_json("/v1/events", &late).await;
    assert_eq!(stored.status(), 200);
    assert_eq!(stored.json::<Value>().await.unwrap()["late"], 1);
    let (after_late, body) = report(&service, &from).await;
    assert_eq!(after_late, "miss");
    assert_eq!(events_of(&body, &enterprise.to_string(), &date), 2);
    assert_eq!(report(&service, &from).await.0, "hit");

    // The pro tenant becomes enterprise: its days join the report at once.
    assert_eq!(events_of(&body, &pro.to_string(), &date), 0);
    let changed = service
        .put_json(
            &format!("/v1/tenants/{pro}/plan"),
            &json!({"plan": "enterprise"}),
        )
        .await;
    assert_eq!(changed.status(), 200);
    let (after_plan, body) = report(&service, &from).await;
    assert_eq!(after_plan, "miss");
    assert_eq!(events_of(&body, &pro.to_string(), &date), 1);
    assert_eq!(report(&service, &from).await.0, "hit");

    // The tenant report is cached per tenant and invalidated by its late events too.
    let daily = format!(
        "/v1/tenants/{enterprise}/daily?from={from}&to={}",
        today() - TimeDelta::days(2)
    );
    let cache_of = async |path: &str| {
        let response = service.get(path).await;
        assert_eq!(response.status(), 200);
        let cache = response.headers()["x-cache"].to_str().unwrap().to_owned();
        (cache, response.json::<Value>().await.unwrap())
    };
    assert_eq!(cache_of(&daily).await.0, "miss");
    assert_eq!(cache_of(&daily).await.0, "hit");
    let late = json!([event_json(enterprise, ten_days_ago, 1)]);
    assert_eq!(service.post_json("/v1/events", &late).await.status(), 200);
    let (cache, body) = cache_of(&daily).await;
    assert_eq!(cache, "miss");
    let day = body["days"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["date"] == date)
        .expect("the day")
        .clone();
    assert_eq!(day["events"], 3);
}

#[tokio::test]
async fn concurrent_misses_of_one_report_are_computed_once() {
    let (url, repository) = fresh().await;
    let redis = test_support::require_redis().await;
    let service = Service::start(&url, &redis, &["--cache-open-ttl", "60s"]).await;
    let tenant = service.tenant("enterprise").await;
    let batch = json!([event_json(tenant, Utc::now() - TimeDelta::hours(1), 5)]);
    assert_eq!(service.post_json("/v1/events", &batch).await.status(), 200);
    let text = service.metrics_text().await;
    assert!(
        text.lines().any(|l| l.starts_with(COMPUTATIONS)),
        "no {COMPUTATIONS} in /metrics:\n{text}"
    );
    let before = service.metric(COMPUTATIONS).await;
    let joined_before = service
        .metric("analytics_repo_report_single_flight_joined_total")
        .await;

    // The report waits on a lock held here, so every request finds the key cold and its
    // computation still running.
    let mut blocker = repository.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let from = (today() - TimeDelta::days(3)).to_string();
    let requests: Vec<_> = (0..30)
        .map(|_| {
            let (http, url) = (
                service.http.clone(),
                service.url(&format!("/v1/reports/enterprise-daily?from={from}")),
            );
            tokio::spawn(async move { http.get(url).send().await.expect("GET") })
        })
        .collect();
    poll_until(
        "29 requests joining the running computation",
        Duration::from_secs(10),
        async || {
            let joined = service
                .metric("analytics_repo_report_single_flight_joined_total")
                .await;
            (joined - joined_before >= 29.0).then_some(())
        },
    )
    .await;
    blocker.rollback().await.unwrap();
    let mut bodies = Vec::new();
    for request in requests {
        let response = request.await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-cache"], "miss");
        bodies.push(response.text().await.unwrap());
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]));
    assert!(bodies[0].contains(&tenant.to_string()));
    assert_eq!(service.metric(COMPUTATIONS).await - before, 1.0);
    assert_eq!(report(&service, &from).await.0, "hit");
}

#[tokio::test]
async fn reports_answer_from_postgresql_while_redis_is_down() {
    let (url, _repository) = fresh().await;
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let service = Service::start(&url, &redis.url(), &["--cache-open-ttl", "60s"]).await;
    let tenant = service.tenant("enterprise").await;
    let batch = json!([event_json(tenant, Utc::now() - TimeDelta::days(2), 5)]);
    assert_eq!(service.post_json("/v1/events", &batch).await.status(), 200);
    let from = (today() - TimeDelta::days(5)).to_string();
    // The cache connects in the background.
    poll_until("a cache hit", Duration::from_secs(10), async || {
        (report(&service, &from).await.0 == "hit").then_some(())
    })
    .await;

    redis.kill();
    let bypass = "analytics_repo_report_cache_lookups_total{outcome=\"bypass\"}";
    let errors = "analytics_repo_report_cache_errors_total{operation=\"lookup\"}";
    let (bypassed_before, errors_before) =
        (service.metric(bypass).await, service.metric(errors).await);
    for _ in 0..3 {
        let (cache, body) = report(&service, &from).await;
        assert_eq!(cache, "bypass");
        assert_eq!(body["rows"][0]["tenant_id"], tenant.to_string());
    }
    assert!(service.metric(bypass).await - bypassed_before >= 3.0);
    assert!(service.metric(errors).await > errors_before);
    let ready = service.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    // A late event while Redis is down: ingest still answers.
    let late = json!([event_json(tenant, Utc::now() - TimeDelta::days(2), 7)]);
    assert_eq!(service.post_json("/v1/events", &late).await.status(), 200);
    let (_, body) = report(&service, &from).await;
    assert_eq!(body["rows"][0]["events"], 2);

    // Redis back (empty): the cache is used again within seconds, and its answers are
    // current.
    let _redis = PrivateRedis::start(port);
    poll_until(
        "cache hits once Redis is back",
        Duration::from_secs(15),
        async || (report(&service, &from).await.0 == "hit").then_some(()),
    )
    .await;
    let (_, body) = report(&service, &from).await;
    assert_eq!(body["rows"][0]["events"], 2);
}
