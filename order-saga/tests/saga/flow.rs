//! The saga's paths: confirmed, declined, not deliverable, out of stock, cancelled by the
//! buyer, and a hold that expired before its confirmation.

use std::time::Duration;

use serde_json::json;

use crate::system::{Options, Role, System, order_body, steps};

#[tokio::test]
async fn an_order_runs_every_step_and_is_confirmed() {
    let system = System::start().await;
    let product = system.product(10, 1_250).await;
    let id = system.order(product, 3, "pm_card_ok", "DE").await;
    let order = system.finished(id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["total"], 3_750);
    let expected: Vec<(String, String)> = [
        "reserve_stock",
        "authorize_payment",
        "create_shipment",
        "capture_payment",
        "confirm_stock",
    ]
    .iter()
    .map(|s| (s.to_string(), "succeeded".to_string()))
    .collect();
    assert_eq!(steps(&order), expected);
    assert_eq!(system.stock(product).await, (7, 0, 3));
    let summary = system.provider_summary().await;
    assert_eq!(summary["captures"], 1);
    assert_eq!(summary["captured_amount"], 3_750);
    let payment: serde_json::Value = system
        .http
        .get(system.url(Role::Payment, &format!("/v1/payments?order_id={id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(payment["state"], "captured");
    system.assert_invariants().await;
}

#[tokio::test]
async fn a_declined_payment_releases_the_stock_and_cancels() {
    let system = System::start().await;
    let product = system.product(5, 500).await;
    let id = system.order(product, 2, "pm_card_declined", "DE").await;
    let order = system.finished(id).await;
    assert_eq!(order["status"], "cancelled");
    assert!(
        order["reason"].as_str().unwrap().contains("declined"),
        "{order}"
    );
    assert_eq!(
        steps(&order),
        vec![
            ("reserve_stock".into(), "succeeded".into()),
            ("authorize_payment".into(), "failed".into()),
            ("release_stock".into(), "succeeded".into()),
        ]
    );
    assert_eq!(system.stock(product).await, (5, 0, 0));
    assert_eq!(system.provider_summary().await["authorized"], 0);
    system.assert_invariants().await;
}

#[tokio::test]
async fn a_destination_not_served_voids_the_payment_and_releases_the_stock() {
    let system = System::start().await;
    let product = system.product(5, 700).await;
    let id = system.order(product, 1, "pm_card_ok", "JP").await;
    let order = system.finished(id).await;
    assert_eq!(order["status"], "cancelled");
    assert!(
        order["reason"]
            .as_str()
            .unwrap()
            .contains("destination not served"),
        "{order}"
    );
    let undone: Vec<String> = steps(&order).into_iter().skip(3).map(|(s, _)| s).collect();
    assert_eq!(undone, vec!["void_payment", "release_stock"]);
    let summary = system.provider_summary().await;
    assert_eq!(
        (summary["authorized"].as_u64(), summary["voids"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(summary["captures"], 0);
    assert_eq!(system.stock(product).await, (5, 0, 0));
    system.assert_invariants().await;
}

#[tokio::test]
async fn the_last_units_go_to_exactly_as_many_buyers_as_there_are_units() {
    let system = System::start().await;
    let product = system.product(10, 100).await;
    let body = order_body(product, 1, "pm_card_ok", "DE");
    let created = futures_util::future::join_all((0..40).map(|_| system.post_order(&body))).await;
    assert!(created.iter().all(|r| r.status() == 201));
    system.all_finished(Duration::from_secs(60)).await;
    let counts = order_saga::invariants::counts(&system.pool).await.unwrap();
    assert_eq!(counts.confirmed, 10, "{counts:?}");
    assert_eq!(counts.cancelled, 30);
    assert_eq!(counts.cancelled_out_of_stock, 30);
    assert_eq!(
        order_saga::invariants::oversold(&system.pool, product)
            .await
            .unwrap(),
        0
    );
    assert_eq!(system.stock(product).await, (0, 0, 10));
    system.assert_invariants().await;
}

#[tokio::test]
async fn a_buyer_cancels_while_the_payment_is_being_authorized() {
    // The provider takes 1.5 s per call: the order is waiting on its authorization.
    let system =
        System::start_with(Options::default().flag(Role::Provider, "--latency", "1500ms")).await;
    let product = system.product(5, 900).await;
    let id = system.order(product, 1, "pm_card_ok", "DE").await;
    crate::system::poll_until(
        "the authorization to start",
        Duration::from_secs(10),
        async || {
            let order = system.get_order(id).await;
            (order["step"] == "authorize_payment").then_some(())
        },
    )
    .await;
    let response = system
        .http
        .post(system.url(Role::Orders, &format!("/v1/orders/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let order = system.finished(id).await;
    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["reason"], "cancelled by the customer");
    // The authorization that was in flight is voided once it lands, and the stock is back.
    crate::system::poll_until(
        "the late authorization to be voided",
        Duration::from_secs(15),
        async || {
            let summary = system.provider_summary().await;
            (summary["authorized"] == summary["voids"]).then_some(())
        },
    )
    .await;
    assert_eq!(system.stock(product).await, (5, 0, 0));
    let again = system
        .http
        .post(system.url(Role::Orders, &format!("/v1/orders/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    system.assert_invariants().await;
}

#[tokio::test]
async fn a_hold_that_expires_before_confirmation_is_refused_and_refunded() {
    // Holds last 1 s; the provider's 800 ms per call makes authorize + capture outlast them.
    let system = System::start_with(
        Options::default()
            .flag(Role::Inventory, "--hold-for", "1s")
            .flag(Role::Inventory, "--sweep-every", "100ms")
            .flag(Role::Provider, "--latency", "800ms"),
    )
    .await;
    let product = system.product(3, 400).await;
    let id = system.order(product, 2, "pm_card_ok", "DE").await;
    let order = system.finished(id).await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert!(
        order["reason"].as_str().unwrap().contains("expired"),
        "{order}"
    );
    let summary = system.provider_summary().await;
    assert_eq!(summary["captures"], 1);
    assert_eq!(
        summary["refunds"], 1,
        "the captured amount is refunded: {summary}"
    );
    assert_eq!(system.stock(product).await, (3, 0, 0));
    system.assert_invariants().await;
    let _ = json!({});
}
