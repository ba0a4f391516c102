//! The keyset listing of a tenant's events: every event exactly once, in id order, across
//! pages and months.

use std::collections::HashSet;

use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Service, ensure_recent, event_json, fresh, today};

#[tokio::test]
async fn pages_through_next_cursor_list_every_event_once_in_id_order() {
    let (url, repository) = fresh().await;
    let pool = repository.pool().clone();
    ensure_recent(&pool, 70).await;
    let redis = test_support::require_redis().await;
    let service = Service::start(&url, &redis, &[]).await;
    let tenant = service.tenant("pro").await;
    let other = service.tenant("pro").await;
    // 250 events over the last 60 days (across a month boundary), some sharing a
    // millisecond, and another tenant's events between them.
    let now = Utc::now();
    let mut batch: Vec<Value> = (0..250i64)
        .map(|i| {
            let at = now - TimeDelta::minutes(i * 340) - TimeDelta::microseconds(i % 3);
            event_json(tenant, at - TimeDelta::milliseconds(i % 2), i)
        })
        .collect();
    batch.extend((0..50i64).map(|i| event_json(other, now - TimeDelta::minutes(i * 1_000), i)));
    let response = service.post_json("/v1/events", &json!(batch)).await;
    assert_eq!(response.status(), 200);

    let from = today() - TimeDelta::days(61);
    let mut seen: Vec<Uuid> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!(
            "/v1/tenants/{tenant}/events?from={from}&to={}&limit=100",
            today()
        );
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let response = service.get(&path).await;
        assert_eq!(response.status(), 200);
        let page: Value = response.json().await.unwrap();
        pages += 1;
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 100);
        seen.extend(
            events
                .iter()
                .map(|e| e["id"].as_str().unwrap().parse::<Uuid>().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(events.len(), 100);
                assert_eq!(next, events.last().unwrap()["id"]);
                cursor = Some(next.to_owned());
            }
            None => break,
        }
        assert!(pages < 10, "the listing does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 250);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        250,
        "an event listed twice"
    );
    let expected: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM events WHERE tenant_id = $1 ORDER BY id")
            .bind(tenant)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(seen, expected);

    // A narrower window lists only its days.
    let yesterday = today() - TimeDelta::days(1);
    let response = service
        .get(&format!(
            "/v1/tenants/{tenant}/events?from={yesterday}&to={yesterday}&limit=1000"
        ))
        .await;
    let page: Value = response.json().await.unwrap();
    let within: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE tenant_id = $1
         AND (created_at AT TIME ZONE 'UTC')::date = (now() AT TIME ZONE 'UTC')::date - 1",
    )
    .bind(tenant)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(within > 0);
    assert_eq!(page["events"].as_array().unwrap().len() as i64, within);
    assert!(page["next_cursor"].is_null());
}
