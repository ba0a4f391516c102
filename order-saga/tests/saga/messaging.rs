//! The messaging layer under the saga: duplicates, messages out of order, a poison message
//! through the dead-letter stream and back, and several instances of every service at once.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::system::{Options, Role, System, order_body, poll_until};
use order_saga::messages::{Body, Envelope, Line};

/// Every entry of `stream`, as (id, `m` field).
async fn entries(system: &System, stream: &str) -> Vec<(String, String)> {
    let mut redis = system.redis().await;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| (e.id.clone(), e.get::<String>("m").unwrap_or_default()))
        .collect()
}

async fn publish(system: &System, stream: &str, body: &str) {
    let mut redis = system.redis().await;
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("m")
        .arg(body)
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// The value of the first sample of the service's metrics whose line contains `name`.
async fn metric(system: &System, role: Role, name: &str) -> f64 {
    let text = system
        .http
        .get(system.url(role, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.contains(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn inbox_has(system: &System, schema: &str, id: Uuid) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.inbox WHERE message_id = $1"
    ))
    .bind(id)
    .fetch_one(&system.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_message_delivered_twice_is_applied_once() {
    let system = System::start().await;
    let product = system.product(10, 100).await;
    let id = system.order(product, 2, "pm_card_ok", "DE").await;
    assert_eq!(system.finished(id).await["status"], "confirmed");
    // Publish the reservation and its reply again, as a relay that crashed before deleting
    // its rows would.
    let inventory = format!("{}:inventory", system.prefix);
    let orders = format!("{}:orders", system.prefix);
    let (_, reserve) = entries(&system, &inventory).await.remove(0);
    let (_, reply) = entries(&system, &orders).await.remove(0);
    publish(&system, &inventory, &reserve).await;
    publish(&system, &orders, &reply).await;
    let reserve: Envelope = serde_json::from_str(&reserve).unwrap();
    let reply: Envelope = serde_json::from_str(&reply).unwrap();
    for role in [Role::Inventory, Role::Orders] {
        poll_until(
            &format!("{role:?} to see the duplicate"),
            Duration::from_secs(10),
            async || {
                (metric(&system, role, "bus_handled_total{outcome=\"duplicate\"}").await >= 1.0)
                    .then_some(())
            },
        )
        .await;
    }
    // Applied once: one inbox row each, stock and saga unchanged.
    assert_eq!(inbox_has(&system, "inventory", reserve.id).await, 1);
    assert_eq!(inbox_has(&system, "orders", reply.id).await, 1);
    assert_eq!(system.stock(product).await, (8, 0, 2));
    assert_eq!(system.finished(id).await["status"], "confirmed");
    system.assert_invariants().await;
}

#[tokio::test]
async fn a_reservation_that_arrives_after_its_release_holds_nothing() {
    let system = System::start().await;
    let product = system.product(4, 100).await;
    let order = Uuid::now_v7();
    let inventory = format!("{}:inventory", system.prefix);
    let release = Envelope::new(order, 1, None, Body::ReleaseStock);
    let reserve = Envelope::new(
        order,
        1,
        None,
        Body::ReserveStock {
            lines: vec![Line {
                product_id: product,
                quantity: 3,
            }],
        },
    );
    publish(
        &system,
        &inventory,
        &serde_json::to_string(&release).unwrap(),
    )
    .await;
    poll_until(
        "the release to be applied",
        Duration::from_secs(10),
        async || (inbox_has(&system, "inventory", release.id).await == 1).then_some(()),
    )
    .await;
    publish(
        &system,
        &inventory,
        &serde_json::to_string(&reserve).unwrap(),
    )
    .await;
    poll_until(
        "the late reservation to be applied",
        Duration::from_secs(10),
        async || (inbox_has(&system, "inventory", reserve.id).await == 1).then_some(()),
    )
    .await;
    assert_eq!(
        system.stock(product).await,
        (4, 0, 0),
        "a released order holds nothing"
    );
    let state: String = sqlx::query_scalar("SELECT state FROM inventory.holds WHERE order_id = $1")
        .bind(order)
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(state, "released");
}

#[tokio::test]
async fn a_poison_message_goes_to_the_dead_letters_and_comes_back_once_fixed() {
    let system = System::start_with(
        Options::default()
            .flag(Role::Inventory, "--max-deliveries", "2")
            .flag(Role::Inventory, "--retries-in-place", "1")
            .flag(Role::Orders, "--step-deadline", "120s"),
    )
    .await;
    let product = system.product(5, 100).await;
    let inventory = format!("{}:inventory", system.prefix);
    // A message that is not an envelope at all is buried at once.
    publish(&system, &inventory, "{\"not\": \"an envelope\"}").await;
    // A schema drift makes every reservation fail until it is repaired.
    sqlx::query("ALTER TABLE inventory.hold_lines RENAME TO hold_lines_moved")
        .execute(&system.pool)
        .await
        .unwrap();
    let id = system.order(product, 1, "pm_card_ok", "DE").await;
    let dead = format!("{inventory}:dead");
    poll_until(
        "both messages to reach the dead-letter stream",
        Duration::from_secs(30),
        async || (entries(&system, &dead).await.len() == 2).then_some(()),
    )
    .await;
    let letters = entries(&system, &dead).await;
    assert!(letters[0].1.contains("an envelope"), "{letters:?}");
    assert_eq!(system.get_order(id).await["status"], "pending");
    let metrics = system
        .http
        .get(system.url(Role::Inventory, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("order_saga_inventory_bus_dead_lettered_total 2"),
        "{metrics}"
    );

    // Repaired, the operator lists and replays the reservation.
    sqlx::query("ALTER TABLE inventory.hold_lines_moved RENAME TO hold_lines")
        .execute(&system.pool)
        .await
        .unwrap();
    let cli = |command: &str, extra: &[&str]| {
        let mut args = vec![
            "dead-letters",
            command,
            "--service",
            "inventory",
            "--redis-url",
            &system.redis_url,
            "--stream-prefix",
            &system.prefix,
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_order-saga"))
            .args(args)
            .output()
            .unwrap()
    };
    let listed = cli("list", &[]);
    assert!(listed.status.success());
    let listed: Vec<Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 2);
    let reservation = listed
        .iter()
        .find(|l| l["message"].as_str().unwrap().contains("reserve_stock"))
        .unwrap();
    assert!(
        reservation["reason"]
            .as_str()
            .unwrap()
            .contains("delivered"),
        "{reservation}"
    );
    let replayed = cli(
        "replay",
        &["--id", reservation["dead_id"].as_str().unwrap()],
    );
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let order = system.finished(id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(
        entries(&system, &dead).await.len(),
        1,
        "the malformed message stays buried"
    );
    system.assert_invariants().await;
}

#[tokio::test]
async fn two_instances_of_every_service_share_the_work() {
    let options = [Role::Inventory, Role::Payment, Role::Shipping, Role::Orders]
        .into_iter()
        .fold(Options::default(), |options, role| {
            options.instances(role, 2)
        });
    let system = System::start_with(options).await;
    let product = system.product(1_000, 100).await;
    let body = order_body(product, 1, "pm_card_ok", "DE");
    let posts = (0..80).map(|i| {
        let url = format!("{}/v1/orders", system.procs[&Role::Orders][i % 2].address);
        let body = body.clone();
        let http = system.http.clone();
        async move {
            http.post(url)
                .header("idempotency-key", Uuid::now_v7().to_string())
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    for status in futures_util::future::join_all(posts).await {
        assert_eq!(status, 201);
    }
    system.all_finished(Duration::from_secs(60)).await;
    let counts = order_saga::invariants::counts(&system.pool).await.unwrap();
    assert_eq!(counts.confirmed, 80, "{counts:?}");
    // Every instance consumed and relayed its share.
    for role in [Role::Inventory, Role::Payment, Role::Shipping, Role::Orders] {
        for proc in &system.procs[&role] {
            let metrics = system
                .http
                .get(format!("{}/metrics", proc.address))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let value = |name: &str| {
                metrics
                    .lines()
                    .find(|l| l.contains(name) && !l.starts_with('#'))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            assert!(
                value("bus_handled_total{outcome=\"applied\"}") > 0.0,
                "{role:?} {} consumed nothing",
                proc.address
            );
            assert!(
                value("bus_published_total") > 0.0,
                "{role:?} {} relayed nothing",
                proc.address
            );
        }
    }
    system.assert_invariants().await;
}
