//! The payment provider misbehaving: answers lost to timeouts, failures, and the provider
//! gone. A customer is charged once or not at all, and the saga always ends.

use std::time::Duration;

use serde_json::json;

use crate::system::{Options, Role, System, order_body};

#[tokio::test]
async fn answers_lost_to_timeouts_still_charge_exactly_once() {
    // Every payment call is carried out, then hangs past the client's timeout: only the
    // lookup under the idempotency key tells the payment service what happened.
    let system = System::start_with(
        Options::default()
            .flag(Role::Provider, "--timeout-rate", "1")
            .flag(Role::Provider, "--hang-for", "5s")
            .flag(Role::Payment, "--provider-timeout", "300ms"),
    )
    .await;
    let product = system.product(5, 2_000).await;
    let id = system.order(product, 1, "pm_card_ok", "DE").await;
    let order = system.finished(id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    let summary = system.provider_summary().await;
    assert_eq!(summary["authorizations"], 1, "{summary}");
    assert_eq!(summary["captures"], 1, "{summary}");
    assert_eq!(summary["captured_amount"], 2_000);
    assert!(
        summary["injected_timeouts"].as_u64().unwrap() >= 2,
        "{summary}"
    );
    system.assert_invariants().await;
}

#[tokio::test]
async fn provider_errors_are_retried_with_one_authorization() {
    let system = System::start().await;
    system.provider_behaviour(json!({ "fail_next": 3 })).await;
    let product = system.product(5, 300).await;
    let id = system.order(product, 1, "pm_card_ok", "DE").await;
    let order = system.finished(id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    let summary = system.provider_summary().await;
    assert_eq!(summary["authorizations"], 1, "{summary}");
    assert_eq!(summary["injected_errors"], 3, "{summary}");
    system.assert_invariants().await;
}

#[tokio::test]
async fn with_the_provider_down_the_breaker_opens_and_orders_cancel_cleanly() {
    let mut system = System::start_with(
        Options::default()
            .flag(Role::Payment, "--provider-attempts", "2")
            .flag(Role::Payment, "--provider-backoff", "10ms")
            .flag(Role::Payment, "--provider-breaker-failures", "3")
            .flag(Role::Payment, "--provider-breaker-open-for", "60s"),
    )
    .await;
    let product = system.product(20, 100).await;
    system.procs.get_mut(&Role::Provider).unwrap()[0]
        .kill()
        .await;
    let body = order_body(product, 1, "pm_card_ok", "DE");
    let mut ids = Vec::new();
    for _ in 0..8 {
        let response = system.post_order(&body).await;
        assert_eq!(response.status(), 201);
        ids.push(
            response.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    system.all_finished(Duration::from_secs(30)).await;
    for id in &ids {
        let order = system.get_order(id.parse().unwrap()).await;
        assert_eq!(order["status"], "cancelled", "{order}");
        assert!(
            order["reason"]
                .as_str()
                .unwrap()
                .contains("provider is unavailable"),
            "{order}"
        );
    }
    let metrics = system
        .http
        .get(system.url(Role::Payment, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("order_saga_payment_provider_breaker_state") && l.ends_with(" 1")
        ),
        "the breaker is open:\n{metrics}"
    );
    assert_eq!(system.stock(product).await, (20, 0, 0));
    system.assert_invariants().await;
}
