//! Each service killed with SIGKILL in the middle of running sagas and started again under
//! the same instance name: every saga still ends, with its compensations done.

use std::time::Duration;

use crate::system::{Options, Role, System, order_body};

async fn kill_mid_saga(role: Role) {
    // Slow payments and a fifth of them declined keep sagas in flight, forward and back.
    let mut system = System::start_with(
        Options::default()
            .flag(Role::Provider, "--latency", "100ms")
            .flag(Role::Provider, "--decline-rate", "0.2")
            .flag(Role::Provider, "--seed", "7"),
    )
    .await;
    let product = system.product(100, 250).await;
    let body = order_body(product, 1, "pm_card_ok", "DE");
    for _ in 0..30 {
        assert_eq!(system.post_order(&body).await.status(), 201);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let proc = &mut system.procs.get_mut(&role).unwrap()[0];
    proc.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proc.restart().await;
    system.all_finished(Duration::from_secs(90)).await;
    let counts = order_saga::invariants::counts(&system.pool).await.unwrap();
    assert_eq!(
        counts.confirmed + counts.cancelled,
        30,
        "{role:?}: {counts:?}"
    );
    assert_eq!(counts.needs_attention, 0, "{role:?}: {counts:?}");
    system.assert_invariants().await;
    let summary = system.provider_summary().await;
    assert_eq!(
        summary["captures"].as_i64(),
        Some(counts.confirmed),
        "{role:?}: one capture per confirmed order: {summary}"
    );
}

#[tokio::test]
async fn orders_killed_mid_saga() {
    kill_mid_saga(Role::Orders).await;
}

#[tokio::test]
async fn inventory_killed_mid_saga() {
    kill_mid_saga(Role::Inventory).await;
}

#[tokio::test]
async fn payment_killed_mid_saga() {
    kill_mid_saga(Role::Payment).await;
}

#[tokio::test]
async fn shipping_killed_mid_saga() {
    kill_mid_saga(Role::Shipping).await;
}

#[tokio::test]
async fn sigterm_stops_every_process_cleanly() {
    let mut system = System::start().await;
    let product = system.product(5, 100).await;
    let id = system.order(product, 1, "pm_card_ok", "DE").await;
    assert_eq!(system.finished(id).await["status"], "confirmed");
    for role in [
        Role::Orders,
        Role::Inventory,
        Role::Payment,
        Role::Shipping,
        Role::Provider,
    ] {
        let status = system.procs.get_mut(&role).unwrap()[0].terminate().await;
        assert!(status.success(), "{role:?} exited with {status}");
    }
}

#[tokio::test]
async fn orders_are_taken_while_redis_is_down_and_finish_once_it_is_back() {
    let port = test_support::free_port::free_port();
    let mut redis = test_support::PrivateRedis::start(port);
    let system = System::start_with(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    })
    .await;
    let product = system.product(5, 100).await;
    let before = system.order(product, 1, "pm_card_ok", "DE").await;
    assert_eq!(system.finished(before).await["status"], "confirmed");

    // Redis gone: the order is still taken (the outbox holds its first message), and the
    // service says it is not ready.
    redis.kill();
    let during = system.order(product, 1, "pm_card_ok", "DE").await;
    let ready = system
        .http
        .get(system.url(Role::Orders, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    // Back, empty (it keeps nothing on disk): the groups are made again, the relay publishes
    // what waited in the outbox, and the saga finishes.
    let _redis = test_support::PrivateRedis::start(port);
    let order = system.finished(during).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(system.stock(product).await, (3, 0, 2));
    system.assert_invariants().await;
}
