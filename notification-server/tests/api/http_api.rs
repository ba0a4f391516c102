//! Bad input on every endpoint: malformed, missing, oversized, hostile. Each gets a
//! problem+json naming what is wrong, and changes nothing.

use serde_json::{Value, json};

use crate::helpers::*;

fn sender() -> String {
    access_token("s", &["sender"])
}

#[tokio::test]
async fn send_refuses_bad_bodies_naming_the_field() {
    let app = spawn_app(Engine::Memory).await;
    let valid = || json!({ "user_ids": ["bob"], "type": "t", "title": "hi", "message": "m" });
    let with = |key: &str, value: Value| {
        let mut body = valid();
        body[key] = value;
        body
    };
    let without = |key: &str| {
        let mut body = valid();
        body.as_object_mut().unwrap().remove(key);
        body
    };
    let too_many: Vec<String> = (0..10_001).map(|i| format!("u{i}")).collect();
    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (json!([1, 2]), 400, None),
        (json!("text"), 400, None),
        (without("user_ids"), 422, Some("user_ids")),
        (without("title"), 422, Some("title")),
        (without("message"), 422, Some("message")),
        (without("type"), 422, Some("type")),
        (with("user_ids", json!([])), 422, Some("user_ids")),
        (with("user_ids", json!("bob")), 422, Some("user_ids")),
        (with("user_ids", json!(["ok", 7])), 422, Some("user_ids[1]")),
        (
            with("user_ids", json!(["ok", "../etc/passwd"])),
            422,
            Some("user_ids[1]"),
        ),
        (with("user_ids", json!(too_many)), 422, Some("user_ids")),
        (with("title", json!(42)), 422, Some("title")),
        (with("title", json!("")), 422, Some("title")),
        (with("title", json!("x".repeat(201))), 422, Some("title")),
        (with("type", json!("has space")), 422, Some("type")),
        (
            with("message", json!("m".repeat(4_001))),
            422,
            Some("message"),
        ),
        (with("data", json!([1])), 422, Some("data")),
        (
            with("data", json!({ "blob": "x".repeat(17_000) })),
            422,
            Some("data"),
        ),
        (with("surprise", json!(true)), 422, Some("surprise")),
    ];
    for (body, status, field) in cases {
        let response = app.post("/v1/notifications", Some(&sender()), &body).await;
        problem(response, status, field).await;
    }

    // Not JSON, wrong media type, too big.
    let raw = |body: &'static str, content_type: &'static str| {
        app.client
            .post(app.url("/v1/notifications"))
            .bearer_auth(sender())
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    problem(
        raw("{\"user_ids\":", "application/json").await.unwrap(),
        400,
        None,
    )
    .await;
    problem(raw("{}", "text/plain").await.unwrap(), 415, None).await;
    let huge = app
        .client
        .post(app.url("/v1/notifications"))
        .bearer_auth(sender())
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    problem(huge, 413, None).await;

    // Nothing was stored by any of it.
    let history: Value = app
        .get(
            "/v1/users/bob/notifications",
            Some(&access_token("bob", &[])),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(history["notifications"], json!([]));
    // A `data` object and `null` are both fine.
    let ok = app
        .post(
            "/v1/notifications",
            Some(&sender()),
            &with("data", json!({ "order": 7 })),
        )
        .await;
    assert_eq!(ok.status(), 201);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(body["notification"]["data"]["order"], 7);
    assert_eq!(body["recipients"], 1);
    let ok = app
        .post(
            "/v1/notifications",
            Some(&sender()),
            &with("data", Value::Null),
        )
        .await;
    assert_eq!(ok.status(), 201);
}

#[tokio::test]
async fn broadcast_and_membership_refuse_bad_ids() {
    let app = spawn_app(Engine::Memory).await;
    let admin = access_token("root", &["admin"]);
    let long = "g".repeat(129);
    let response = app
        .post(
            &format!("/v1/groups/{long}/notifications"),
            Some(&sender()),
            &content("x"),
        )
        .await;
    problem(response, 422, Some("group")).await;
    let response = app
        .post(
            "/v1/groups/bad%20id/notifications",
            Some(&sender()),
            &content("x"),
        )
        .await;
    problem(response, 422, Some("group")).await;
    let response = app.put("/v1/groups/team/members/bad%2Fuser", &admin).await;
    problem(response, 422, Some("user")).await;

    assert_eq!(
        app.put("/v1/groups/team/members/ann", &admin)
            .await
            .status(),
        201
    );
    assert_eq!(
        app.put("/v1/groups/team/members/ann", &admin)
            .await
            .status(),
        204
    );
    assert_eq!(
        app.delete("/v1/groups/team/members/ann", &admin)
            .await
            .status(),
        204
    );
    let response = app.delete("/v1/groups/team/members/ann", &admin).await;
    problem(response, 404, None).await;

    for i in 0..5 {
        app.put(&format!("/v1/groups/team/members/u{i}"), &admin)
            .await;
    }
    let page: Value = app
        .get("/v1/groups/team/members?limit=2&cursor=u1", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["members"], json!(["u2", "u3"]));
    assert_eq!(page["next_cursor"], "u3");
}

#[tokio::test]
async fn history_refuses_bad_paging() {
    let app = spawn_app(Engine::Memory).await;
    let bob = access_token("bob", &[]);
    for (query, status, field) in [
        ("?limit=0", 422, Some("limit")),
        ("?limit=101", 422, Some("limit")),
        ("?limit=-1", 422, Some("limit")),
        ("?limit=ten", 422, Some("limit")),
        ("?cursor=yesterday", 422, Some("cursor")),
        ("?offset=20", 400, Some("offset")),
    ] {
        let response = app
            .get(&format!("/v1/users/bob/notifications{query}"), Some(&bob))
            .await;
        problem(response, status, field).await;
    }
    let response = app
        .get("/v1/users/bob/notifications?limit=100", Some(&bob))
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn unknown_paths_and_methods_get_problems() {
    let app = spawn_app(Engine::Memory).await;
    problem(app.get("/v1/nothing", None).await, 404, None).await;
    let response = app
        .client
        .delete(app.url("/v1/notifications"))
        .send()
        .await
        .unwrap();
    problem(response, 405, None).await;
}
