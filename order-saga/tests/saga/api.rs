//! Bad input and failing backends over real HTTP against the real processes: every refusal is
//! a 4xx problem+json naming the field at fault, a backend that cannot be reached is a 503
//! (never a 500), and in every case nothing is stored.

use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde_json::{Value, json};
use test_support::{forwarder::Forwarder, problem_json::problem};
use uuid::Uuid;

use crate::system::{Role, System, order_body};

/// What creating orders leaves in the orders schema: orders, their lines, outbox rows,
/// idempotency keys.
async fn stored(system: &System) -> [i64; 4] {
    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders.orders), (SELECT count(*) FROM orders.order_lines),
                (SELECT count(*) FROM orders.outbox), (SELECT count(*) FROM orders.idempotency_keys)",
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    [row.0, row.1, row.2, row.3]
}

/// POSTs raw `body` bytes to the orders API with `key` and `content_type`.
async fn post_raw(
    system: &System,
    key: Option<&str>,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = system
        .http
        .post(system.url(Role::Orders, "/v1/orders"))
        .header("content-type", content_type)
        .body(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

async fn post_with_key(system: &System, key: &str, body: &Value) -> reqwest::Response {
    post_raw(
        system,
        Some(key),
        "application/json",
        serde_json::to_vec(body).unwrap(),
    )
    .await
}

#[tokio::test]
async fn the_idempotency_key_is_required_and_replays_the_first_answer() {
    let system = System::start().await;
    let product = system.product(100, 700).await;
    let body = order_body(product, 2, "pm_card_ok", "DE");
    let bytes = serde_json::to_vec(&body).unwrap();

    let missing = post_raw(&system, None, "application/json", bytes.clone()).await;
    let missing = problem(missing, 400, Some("Idempotency-Key")).await;
    assert!(
        missing["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"),
        "{missing}"
    );
    let too_long = "k".repeat(256);
    for bad in [too_long.as_str(), "", "two words", "\"\""] {
        let refused = post_raw(&system, Some(bad), "application/json", bytes.clone()).await;
        problem(refused, 400, Some("Idempotency-Key")).await;
    }
    assert_eq!(stored(&system).await, [0; 4]);

    // A refused body leaves the key free for the corrected request.
    let key = Uuid::now_v7().to_string();
    let mut empty = body.clone();
    empty["items"] = json!([]);
    problem(
        post_with_key(&system, &key, &empty).await,
        422,
        Some("items"),
    )
    .await;
    let first = post_with_key(&system, &key, &body).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let first: Value = first.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/orders/{}", first["id"].as_str().unwrap())
    );

    let again = post_with_key(&system, &key, &body).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"].to_str().unwrap(), location);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first, "the first answer, replayed");
    // Back to back: a replay leaves the key free at once for the next retry (its
    // transaction, which holds the key's lock, ends before the answer is sent).
    for attempt in 0..100 {
        let replayed = post_with_key(&system, &key, &body).await;
        assert_eq!(replayed.status(), 201, "retry {attempt}");
        assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    }
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.orders")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(orders, 1, "a replay creates no second order");

    let other = order_body(product, 3, "pm_card_ok", "DE");
    let reused = problem(
        post_with_key(&system, &key, &other).await,
        422,
        Some("Idempotency-Key"),
    )
    .await;
    assert_eq!(reused["type"], "urn:problem:idempotency-key-reused");

    // A request under a key whose first request is still being processed: the service takes
    // the key's advisory lock (orders/store.rs) for the length of its transaction; holding it
    // here is what a first request in flight does.
    let busy = Uuid::now_v7().to_string();
    let mut holder = system.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 7))")
        .bind(&busy)
        .execute(&mut *holder)
        .await
        .unwrap();
    let in_flight = post_with_key(&system, &busy, &body).await;
    assert_eq!(in_flight.headers()["retry-after"], "1");
    let in_flight = problem(in_flight, 409, Some("Idempotency-Key")).await;
    assert_eq!(in_flight["type"], "urn:problem:idempotency-key-in-flight");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.idempotency_keys")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(keys, 1, "the request in flight stored nothing");
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 7))")
        .bind(&busy)
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);
    assert_eq!(post_with_key(&system, &busy, &body).await.status(), 201);
}

/// A body sent as it is: what it is, its content type, its bytes, the status and field expected.
type RawCase = (
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
    Option<&'static str>,
);

#[tokio::test]
async fn a_bad_order_is_refused_naming_its_field_and_nothing_is_stored() {
    let system = System::start().await;
    let product = system.product(100, 700).await;
    let other = system.product(100, 900).await;
    let valid = order_body(product, 1, "pm_card_ok", "DE");
    let with = |pointer: &str, value: Value| {
        let mut body = valid.clone();
        *body.pointer_mut(pointer).unwrap() = value;
        body
    };
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        ("empty items", with("/items", json!([])), 422, Some("items")),
        (
            "items not an array",
            with("/items", json!({})),
            422,
            Some("items"),
        ),
        (
            "101 items",
            with(
                "/items",
                (0..101)
                    .map(|_| json!({"product_id": Uuid::new_v4(), "quantity": 1}))
                    .collect(),
            ),
            422,
            Some("items"),
        ),
        (
            "a product twice",
            with(
                "/items",
                json!([{"product_id": product, "quantity": 1}, {"product_id": other, "quantity": 1}, {"product_id": product, "quantity": 2}]),
            ),
            422,
            Some("items[2].product_id"),
        ),
        (
            "an unknown product",
            with(
                "/items",
                json!([{"product_id": product, "quantity": 1}, {"product_id": Uuid::now_v7(), "quantity": 1}]),
            ),
            422,
            Some("items[1].product_id"),
        ),
        (
            "a product id that is not a UUID",
            with("/items/0/product_id", json!("p-1")),
            422,
            Some("items[0].product_id"),
        ),
        (
            "quantity 0",
            with("/items/0/quantity", json!(0)),
            422,
            Some("items[0].quantity"),
        ),
        (
            "a negative quantity",
            with("/items/0/quantity", json!(-1)),
            422,
            Some("items[0].quantity"),
        ),
        (
            "a quantity over the limit",
            with("/items/0/quantity", json!(1001)),
            422,
            Some("items[0].quantity"),
        ),
        (
            "a fractional quantity",
            with("/items/0/quantity", json!(1.5)),
            422,
            Some("items[0].quantity"),
        ),
        (
            "a quantity as a string",
            with("/items/0/quantity", json!("1")),
            422,
            Some("items[0].quantity"),
        ),
        (
            "a quantity past i64",
            with("/items/0/quantity", json!(u64::MAX)),
            422,
            Some("items[0].quantity"),
        ),
        (
            "an unknown item member",
            with(
                "/items/0",
                json!({"product_id": product, "quantity": 1, "price": 1}),
            ),
            422,
            Some("items[0].price"),
        ),
        (
            "customer_id over 64 characters",
            with("/customer_id", json!("c".repeat(65))),
            422,
            Some("customer_id"),
        ),
        (
            "a blank customer_id",
            with("/customer_id", json!("   ")),
            422,
            Some("customer_id"),
        ),
        (
            "payment_method over 64 characters",
            with("/payment_method", json!("p".repeat(65))),
            422,
            Some("payment_method"),
        ),
        (
            "a name over 200 characters",
            with("/shipping_address/name", json!("n".repeat(201))),
            422,
            Some("shipping_address.name"),
        ),
        (
            "a postal code over 20 characters",
            with("/shipping_address/postal_code", json!("1".repeat(21))),
            422,
            Some("shipping_address.postal_code"),
        ),
        (
            "a country that is not alpha-2",
            with("/shipping_address/country", json!("DEU")),
            422,
            Some("shipping_address.country"),
        ),
        (
            "NUL in customer_id",
            with("/customer_id", json!("a\u{0}b")),
            422,
            Some("customer_id"),
        ),
        (
            "NUL in the city",
            with("/shipping_address/city", json!("Berlin\u{0}")),
            422,
            Some("shipping_address.city"),
        ),
        (
            "NUL in payment_method",
            with("/payment_method", json!("\u{0}")),
            422,
            Some("payment_method"),
        ),
        (
            "an unknown member",
            {
                let mut body = valid.clone();
                body["coupon"] = json!("FREE");
                body
            },
            422,
            Some("coupon"),
        ),
        (
            "customer_id missing",
            {
                let mut body = valid.clone();
                body.as_object_mut().unwrap().remove("customer_id");
                body
            },
            422,
            Some("customer_id"),
        ),
        ("a JSON array", json!([valid.clone()]), 400, None),
    ];
    for (case, body, status, field) in cases {
        let response = post_with_key(&system, &Uuid::now_v7().to_string(), &body).await;
        assert_eq!(response.status(), status, "{case}");
        problem(response, status, field).await;
        assert_eq!(stored(&system).await, [0; 4], "{case} stored something");
    }

    let valid_bytes = serde_json::to_vec(&valid).unwrap();
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let huge_quantity = String::from_utf8(valid_bytes.clone()).unwrap().replace(
        "\"quantity\":1",
        "\"quantity\":1000000000000000000000000000000000000000",
    );
    assert_ne!(huge_quantity.as_bytes(), valid_bytes.as_slice());
    let mut invalid_utf8 = br#"{"customer_id": ""#.to_vec();
    invalid_utf8.extend([0xff, 0xfe]);
    invalid_utf8.extend(br#""}"#);
    let oversized = format!(r#"{{"customer_id": "{}"}}"#, "x".repeat(64 * 1024 + 1));
    let raw: Vec<RawCase> = vec![
        (
            "malformed JSON",
            "application/json",
            br#"{"customer_id": "c-1", "items": ["#.to_vec(),
            400,
            None,
        ),
        ("an empty body", "application/json", Vec::new(), 400, None),
        (
            "a quantity beyond any integer type",
            "application/json",
            huge_quantity.into_bytes(),
            422,
            Some("items[0].quantity"),
        ),
        (
            "the wrong content type",
            "text/plain",
            valid_bytes.clone(),
            415,
            None,
        ),
        (
            "a form",
            "application/x-www-form-urlencoded",
            b"customer_id=c-1".to_vec(),
            415,
            None,
        ),
        (
            "JSON nested 10,000 deep",
            "application/json",
            format!(r#"{{"customer_id": {nested}}}"#).into_bytes(),
            400,
            None,
        ),
        ("invalid UTF-8", "application/json", invalid_utf8, 400, None),
        (
            "a body over MAX_BODY_BYTES",
            "application/json",
            oversized.into_bytes(),
            413,
            None,
        ),
    ];
    for (case, content_type, body, status, field) in raw {
        let key = Uuid::now_v7().to_string();
        let response = post_raw(&system, Some(&key), content_type, body).await;
        assert_eq!(response.status(), status, "{case}");
        problem(response, status, field).await;
        assert_eq!(stored(&system).await, [0; 4], "{case} stored something");
    }

    // Two currencies in one order.
    let dollars = system.product_in(10, 500, "USD").await;
    let mixed = with(
        "/items",
        json!([{"product_id": product, "quantity": 1}, {"product_id": dollars, "quantity": 1}]),
    );
    problem(
        post_with_key(&system, "mixed-currencies", &mixed).await,
        422,
        Some("items[1].product_id"),
    )
    .await;
    assert_eq!(stored(&system).await, [0; 4]);
    // And the valid order still goes through.
    assert_eq!(
        post_with_key(&system, "valid", &valid).await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn bad_ids_queries_and_products_are_refused_by_every_service() {
    let system = System::start().await;
    let product = system.product(5, 100).await;
    let get = |role: Role, path: &str| system.http.get(system.url(role, path)).send();

    for (role, path) in [
        (Role::Orders, "/v1/orders/not-a-uuid"),
        (Role::Orders, "/v1/orders/12345"),
        (Role::Inventory, "/v1/products/not-a-uuid"),
        // Not even UTF-8 once decoded.
        (Role::Orders, "/v1/orders/%ff"),
        (Role::Inventory, "/v1/products/%c3%28"),
        (Role::Orders, &format!("/v1/orders/{}", Uuid::now_v7())),
        (Role::Inventory, &format!("/v1/products/{}", Uuid::now_v7())),
        (
            Role::Payment,
            &format!("/v1/payments?order_id={}", Uuid::now_v7()),
        ),
        (
            Role::Shipping,
            &format!("/v1/shipments?order_id={}", Uuid::now_v7()),
        ),
        (
            Role::Inventory,
            &format!("/v1/holds?order_id={}", Uuid::now_v7()),
        ),
        // Each service serves its own paths only.
        (Role::Payment, "/v1/orders"),
    ] {
        problem(get(role, path).await.unwrap(), 404, None).await;
    }
    for path in [
        "/v1/orders/not-a-uuid/cancel",
        "/v1/orders/%ff/cancel",
        "/v1/products/nope/stock",
        "/v1/products/%ff/stock",
    ] {
        let role = if path.starts_with("/v1/orders") {
            Role::Orders
        } else {
            Role::Inventory
        };
        let response = system
            .http
            .post(system.url(role, path))
            .json(&json!({"add": 1}))
            .send()
            .await
            .unwrap();
        problem(response, 404, None).await;
    }
    let cancel_unknown = system
        .http
        .post(system.url(
            Role::Orders,
            &format!("/v1/orders/{}/cancel", Uuid::now_v7()),
        ))
        .send()
        .await
        .unwrap();
    problem(cancel_unknown, 404, None).await;

    for (role, path, status, field) in [
        (Role::Orders, "/v1/orders?limit=0", 422, "limit"),
        (Role::Orders, "/v1/orders?limit=201", 422, "limit"),
        (Role::Orders, "/v1/orders?limit=-1", 422, "limit"),
        (
            Role::Orders,
            "/v1/orders?limit=99999999999999999999999",
            422,
            "limit",
        ),
        (Role::Orders, "/v1/orders?limit=ten", 422, "limit"),
        (Role::Orders, "/v1/orders?cursor=not-a-uuid", 422, "cursor"),
        (Role::Orders, "/v1/orders?offset=5", 400, "offset"),
        (Role::Orders, "/v1/orders?limit=1&limit=2", 400, "limit"),
        (Role::Orders, "/v1/orders?cursor=%ff", 400, "cursor"),
        (Role::Inventory, "/v1/products?limit=501", 422, "limit"),
        (Role::Inventory, "/v1/products?cursor=%00", 422, "cursor"),
        (Role::Inventory, "/v1/holds", 422, "order_id"),
        (Role::Inventory, "/v1/holds?order_id=x", 422, "order_id"),
        (Role::Payment, "/v1/payments", 422, "order_id"),
        (Role::Payment, "/v1/payments?order_id=1%00", 422, "order_id"),
        (Role::Payment, "/v1/payments?order=1", 400, "order"),
        (Role::Shipping, "/v1/shipments?order_id=", 422, "order_id"),
        (Role::Shipping, "/v1/shipments?id=x", 400, "id"),
    ] {
        let response = get(role, path).await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        problem(response, status, Some(field)).await;
    }

    let products = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM inventory.products")
            .fetch_one(&system.pool)
            .await
            .unwrap()
    };
    let valid =
        json!({"sku": "s-1", "name": "Widget", "price": 100, "currency": "EUR", "stock": 1});
    let with = |name: &str, value: Value| {
        let mut body = valid.clone();
        body[name] = value;
        body
    };
    let without = |name: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(name);
        body
    };
    for (case, body, field) in [
        ("sku missing", without("sku"), "sku"),
        ("sku over 64", with("sku", json!("s".repeat(65))), "sku"),
        ("sku with NUL", with("sku", json!("s\u{0}")), "sku"),
        ("name blank", with("name", json!("")), "name"),
        ("name not a string", with("name", json!(7)), "name"),
        ("price negative", with("price", json!(-1)), "price"),
        (
            "price too high",
            with("price", json!(10_000_000_001_i64)),
            "price",
        ),
        ("price fractional", with("price", json!(1.25)), "price"),
        (
            "currency lower case",
            with("currency", json!("eur")),
            "currency",
        ),
        (
            "stock too high",
            with("stock", json!(1_000_000_001)),
            "stock",
        ),
        ("stock past u64", with("stock", json!(1e300)), "stock"),
        ("an unknown member", with("colour", json!("red")), "colour"),
    ] {
        let response = system
            .http
            .post(system.url(Role::Inventory, "/v1/products"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{case}");
        problem(response, 422, Some(field)).await;
    }
    assert_eq!(products().await, 1, "only the product made at the start");
    let wrong_type = system
        .http
        .post(system.url(Role::Inventory, "/v1/products"))
        .header("content-type", "text/plain")
        .body(valid.to_string())
        .send()
        .await
        .unwrap();
    problem(wrong_type, 415, None).await;
    let first = system
        .http
        .post(system.url(Role::Inventory, "/v1/products"))
        .json(&valid)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let duplicate = system
        .http
        .post(system.url(Role::Inventory, "/v1/products"))
        .json(&valid)
        .send()
        .await
        .unwrap();
    problem(duplicate, 409, Some("sku")).await;
    assert_eq!(products().await, 2);

    let stock = format!("/v1/products/{product}/stock");
    for (body, field) in [
        (json!({"add": 0}), "add"),
        (json!({"add": -5}), "add"),
        (json!({"add": 1_000_000_000}), "add"),
        (json!({}), "add"),
        (json!({"add": 1, "more": 1}), "more"),
    ] {
        let response = system
            .http
            .post(system.url(Role::Inventory, &stock))
            .json(&body)
            .send()
            .await
            .unwrap();
        problem(response, 422, Some(field)).await;
    }
    assert_eq!(system.stock(product).await, (5, 0, 0), "no stock added");
}

#[tokio::test]
async fn inventory_down_refuses_an_order_with_503_and_stores_nothing() {
    let mut system = System::start().await;
    let product = system.product(10, 300).await;
    let earlier = order_body(system.product(10, 200).await, 1, "pm_card_ok", "DE");
    let first = post_with_key(&system, "before-inventory-went-down", &earlier).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    system.procs.get_mut(&Role::Inventory).unwrap()[0]
        .kill()
        .await;
    // A fresh orders process has no price in memory: a retry is still answered from the key.
    system.procs.get_mut(&Role::Orders).unwrap()[0]
        .restart()
        .await;
    let retry = post_with_key(&system, "before-inventory-went-down", &earlier).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap(), first);
    problem(
        post_with_key(
            &system,
            "before-inventory-went-down",
            &order_body(product, 1, "pm_card_ok", "DE"),
        )
        .await,
        422,
        Some("Idempotency-Key"),
    )
    .await;
    let before = stored(&system).await;
    assert_eq!([before[0], before[3]], [1, 1]);
    let response = post_with_key(
        &system,
        "while-inventory-is-down",
        &order_body(product, 1, "pm_card_ok", "DE"),
    )
    .await;
    assert_eq!(response.headers()["retry-after"], "1");
    let body = problem(response, 503, None).await;
    assert_eq!(body["type"], "urn:problem:unavailable");
    let after = stored(&system).await;
    assert_eq!(
        [after[0], after[1], after[3]],
        [before[0], before[1], before[3]]
    );
}

#[tokio::test]
async fn postgres_unreachable_is_503_on_readyz_and_on_requests() {
    let system = System::start().await;
    let product = system.product(10, 300).await;
    let mut url = Url::parse(&system.database_url).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let forwarder = Forwarder::start(upstream).await;
    url.set_port(Some(forwarder.port)).unwrap();
    let mut cut_off = Vec::new();
    for role in [Role::Orders, Role::Inventory, Role::Payment, Role::Shipping] {
        let instance = system
            .spawn(role, &format!("{role:?}-cut-off"), url.as_str())
            .await;
        let ready = system
            .http
            .get(format!("{}/readyz", instance.address))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200, "{role:?}");
        cut_off.push((role, instance));
    }
    let (_, orders) = &cut_off[0];
    let before = post_to(&system, &orders.address, "before-the-cut", product).await;
    assert_eq!(before.status(), 201);
    let order: Value = before.json().await.unwrap();
    let stored_before = stored(&system).await;

    forwarder.cut().await;
    for (role, instance) in &cut_off {
        let ready = system
            .http
            .get(format!("{}/readyz", instance.address))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.headers()["retry-after"], "1", "{role:?}");
        let body = problem(ready, 503, None).await;
        assert!(
            body["detail"].as_str().unwrap().contains("PostgreSQL"),
            "{role:?}: {body}"
        );
        let path = match role {
            Role::Orders => format!("/v1/orders/{}", order["id"].as_str().unwrap()),
            Role::Inventory => format!("/v1/products/{product}"),
            Role::Payment => format!("/v1/payments?order_id={}", Uuid::now_v7()),
            _ => format!("/v1/shipments?order_id={}", Uuid::now_v7()),
        };
        let started = std::time::Instant::now();
        let response = system
            .http
            .get(format!("{}{path}", instance.address))
            .send()
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{role:?} answered only after {:?}",
            started.elapsed()
        );
        assert_eq!(response.headers()["retry-after"], "1", "{role:?}");
        problem(response, 503, None).await;
        // Liveness does not depend on the database.
        let alive = system
            .http
            .get(format!("{}/healthz", instance.address))
            .send()
            .await
            .unwrap();
        assert_eq!(alive.status(), 200, "{role:?}");
    }
    // A new order (its product priced by the inventory that still reaches PostgreSQL) and a
    // cancellation are refused with 503, and nothing is stored.
    let during = post_to(&system, &orders.address, "during-the-cut", product).await;
    assert_eq!(during.headers()["retry-after"], "1");
    problem(during, 503, None).await;
    let cancel = system
        .http
        .post(format!(
            "{}/v1/orders/{}/cancel",
            orders.address,
            order["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    problem(cancel, 503, None).await;
    let after = stored(&system).await;
    assert_eq!(after[0], stored_before[0], "no order added");
    assert_eq!(after[3], stored_before[3], "no key added");
}

async fn post_to(system: &System, base: &str, key: &str, product: Uuid) -> reqwest::Response {
    system
        .http
        .post(format!("{base}/v1/orders"))
        .header("idempotency-key", key)
        .json(&order_body(product, 1, "pm_card_ok", "DE"))
        .send()
        .await
        .unwrap()
}
