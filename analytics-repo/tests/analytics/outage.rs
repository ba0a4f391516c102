//! PostgreSQL cut off under a running service (a forwarder between them, closed mid-test):
//! readiness takes the node out, every endpoint that needs the database answers 503 with
//! `Retry-After` within the acquire timeout, a refused batch stores nothing, and once the
//! database is reachable again the service recovers without a restart.

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use reqwest::{Method, Url};
use serde_json::{Value, json};
use test_support::{forwarder::Forwarder, polling::poll_until, problem_json::problem};

use crate::support::{Service, event_json, fresh, today};

/// `method path` (with a JSON body when given): a 503 with `Retry-After`, within 10 s.
async fn unavailable(service: &Service, method: Method, path: &str, body: Option<&Value>) {
    let started = Instant::now();
    let mut request = service.http.request(method.clone(), service.url(path));
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("request");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{method} {path} answered only after {:?}",
        started.elapsed()
    );
    assert_eq!(
        response.status(),
        503,
        "{method} {path}: {:?}",
        response.headers()
    );
    assert!(
        response.headers().contains_key("retry-after"),
        "{method} {path}: no Retry-After"
    );
    problem(response, 503, None).await;
}

async fn events_of(service: &Service, tenant: &str, day: &str) -> i64 {
    let response = service
        .get(&format!("/v1/tenants/{tenant}/daily?from={day}&to={day}"))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("daily JSON");
    body["days"]
        .as_array()
        .expect("days")
        .iter()
        .map(|d| d["events"].as_i64().expect("events"))
        .sum()
}

#[tokio::test]
async fn postgres_unreachable_is_503_stores_nothing_and_recovers_by_itself() {
    let (url, repository) = fresh().await;
    let mut through = Url::parse(&url).expect("database URL");
    let upstream = format!(
        "{}:{}",
        through.host_str().expect("host"),
        through.port().unwrap_or(5432)
    );
    let forwarder = Forwarder::start(upstream.clone()).await;
    let port = forwarder.port;
    through.set_port(Some(port)).expect("port");
    let service = Service::start(
        through.as_str(),
        &test_support::test_redis_url(),
        &["--acquire-timeout", "1s"],
    )
    .await;
    let tenant = service.tenant("enterprise").await;
    let yesterday = Utc::now() - TimeDelta::days(1);
    let day = (today() - TimeDelta::days(1)).to_string();
    let first = json!([event_json(tenant, yesterday, 5)]);
    assert_eq!(service.post_json("/v1/events", &first).await.status(), 200);
    let stored = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(repository.pool())
            .await
            .expect("count")
    };
    assert_eq!(stored().await, 1);

    forwarder.cut().await;
    let ready = service
        .http
        .get(service.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.headers()["retry-after"], "1");
    let body = problem(ready, 503, None).await;
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("PostgreSQL"),
        "{body}"
    );
    // Alive, so not restarted: only out of rotation.
    assert_eq!(service.get("/healthz").await.status(), 200);
    let batch = json!([
        event_json(tenant, yesterday, 7),
        event_json(tenant, yesterday, 9)
    ]);
    unavailable(&service, Method::POST, "/v1/events", Some(&batch)).await;
    let ndjson = service
        .http
        .post(service.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(format!("{}\n", event_json(tenant, yesterday, 11)))
        .send()
        .await
        .expect("ndjson");
    assert_eq!(ndjson.status(), 503);
    unavailable(
        &service,
        Method::POST,
        "/v1/tenants",
        Some(&json!({"name": "during the cut", "plan": "free"})),
    )
    .await;
    // Keys never asked before, so the cache cannot answer them.
    let week_ago = (today() - TimeDelta::days(7)).to_string();
    for path in [
        format!("/v1/tenants/{tenant}/daily?from={week_ago}&to={day}"),
        format!("/v1/reports/enterprise-daily?from={week_ago}"),
        format!("/v1/tenants/{tenant}/events?from={day}&to={day}"),
    ] {
        unavailable(&service, Method::GET, &path, None).await;
    }
    unavailable(
        &service,
        Method::PUT,
        &format!("/v1/tenants/{tenant}/plan"),
        Some(&json!({"plan": "free"})),
    )
    .await;
    assert_eq!(stored().await, 1, "a refused batch stored rows");

    // The same address answers again: the pool reconnects, readiness returns, ingest and
    // reports work, and the roll-up that failed meanwhile catches up.
    let _back = Forwarder::start_on(port, upstream).await;
    poll_until("ready again", Duration::from_secs(20), async || {
        let ready = service.http.get(service.url("/readyz")).send().await.ok()?;
        (ready.status() == 200).then_some(())
    })
    .await;
    let again = json!([event_json(tenant, yesterday, 13)]);
    assert_eq!(service.post_json("/v1/events", &again).await.status(), 200);
    assert_eq!(stored().await, 2);
    poll_until(
        "the report counts both events",
        Duration::from_secs(20),
        async || (events_of(&service, &tenant.to_string(), &day).await == 2).then_some(()),
    )
    .await;
}
