//! Text PostgreSQL cannot store (U+0000), huge numbers, deep nesting and broken encodings,
//! on every endpoint that takes text, against a real PostgreSQL. Each is a 4xx naming what is
//! wrong (never a 5xx, never a `Retry-After`), and nothing is stored.

use serde_json::{Value, json};

use crate::helpers::*;

fn sender() -> String {
    access_token("s", &["sender"])
}

/// `data` values and keys holding U+0000, at the top and nested, with the field each names.
fn nul_data() -> Vec<(Value, &'static str)> {
    vec![
        (json!({ "note": "a\u{0}b" }), "data.note"),
        (json!({ "a": { "b": ["ok", "x\u{0}"] } }), "data.a.b[1]"),
        (json!({ "a\u{0}b": 1 }), r#"data["a\u0000b"]"#),
        (
            json!({ "a": [{ "k\u{0}": true }] }),
            r#"data.a[0]["k\u0000"]"#,
        ),
        (json!({ "\u{0}": null }), r#"data["\u0000"]"#),
    ]
}

async fn refused(response: reqwest::Response, status: u16, field: Option<&str>) {
    assert!(
        response.headers().get("retry-after").is_none(),
        "a client error must not ask for a retry"
    );
    problem(response, status, field).await;
}

async fn history_of(app: &TestApp, user: &str) -> Value {
    let response = app
        .get(
            &format!("/v1/users/{user}/notifications"),
            Some(&access_token(user, &[])),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["notifications"].clone()
}

#[tokio::test]
async fn send_refuses_nul_in_any_text_or_data_naming_the_field_and_stores_nothing() {
    let app = spawn_app(Engine::Postgres).await;
    let valid = || json!({ "user_ids": ["bob"], "type": "t", "title": "hi", "message": "m" });
    let mut cases: Vec<(Value, String)> = nul_data()
        .into_iter()
        .map(|(data, field)| {
            let mut body = valid();
            body["data"] = data;
            (body, field.to_owned())
        })
        .collect();
    for (key, value) in [
        ("title", json!("a\u{0}")),
        ("message", json!("\u{0}")),
        ("type", json!("t\u{0}")),
        ("user_ids", json!(["bob", "b\u{0}b"])),
    ] {
        let mut body = valid();
        body[key] = value;
        let field = if key == "user_ids" {
            "user_ids[1]"
        } else {
            key
        };
        cases.push((body, field.to_owned()));
    }
    for (body, field) in cases {
        let response = app.post("/v1/notifications", Some(&sender()), &body).await;
        refused(response, 422, Some(&field)).await;
    }
    assert_eq!(history_of(&app, "bob").await, json!([]));
}

#[tokio::test]
async fn broadcast_refuses_nul_in_data_and_ids_and_stores_nothing() {
    let app = spawn_app(Engine::Postgres).await;
    app.join("team", "bob").await;
    for (data, field) in nul_data() {
        let mut body = content("x");
        body["data"] = data;
        let response = app
            .post("/v1/groups/team/notifications", Some(&sender()), &body)
            .await;
        refused(response, 422, Some(field)).await;
    }
    let mut body = content("x");
    body["title"] = json!("nul\u{0}");
    let response = app
        .post("/v1/groups/team/notifications", Some(&sender()), &body)
        .await;
    refused(response, 422, Some("title")).await;
    let response = app
        .post(
            "/v1/groups/te%00am/notifications",
            Some(&sender()),
            &content("x"),
        )
        .await;
    refused(response, 422, Some("group")).await;
    assert_eq!(history_of(&app, "bob").await, json!([]));
}

#[tokio::test]
async fn ids_in_paths_and_cursors_refuse_nul() {
    let app = spawn_app(Engine::Postgres).await;
    let admin = access_token("root", &["admin"]);
    refused(
        app.put("/v1/groups/te%00am/members/bob", &admin).await,
        422,
        Some("group"),
    )
    .await;
    refused(
        app.put("/v1/groups/team/members/b%00b", &admin).await,
        422,
        Some("user"),
    )
    .await;
    refused(
        app.delete("/v1/groups/team/members/b%00b", &admin).await,
        422,
        Some("user"),
    )
    .await;
    refused(
        app.get("/v1/groups/te%00am/members", Some(&admin)).await,
        422,
        Some("group"),
    )
    .await;
    refused(
        app.get("/v1/groups/team/members?cursor=a%00", Some(&admin))
            .await,
        422,
        Some("cursor"),
    )
    .await;
    refused(
        app.get("/v1/users/b%00b/notifications", Some(&admin)).await,
        422,
        Some("user"),
    )
    .await;
    refused(
        app.get("/v1/users/bob/notifications?cursor=%00", Some(&admin))
            .await,
        422,
        Some("cursor"),
    )
    .await;
    let members: Value = app
        .get("/v1/groups/team/members", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(members["members"], json!([]));
}

#[tokio::test]
async fn huge_numbers_deep_nesting_and_odd_encodings_never_get_a_5xx() {
    let app = spawn_app(Engine::Postgres).await;
    let valid = || json!({ "user_ids": ["bob"], "type": "t", "title": "hi", "message": "m" });

    // Numbers: large and tiny doubles and integers past u64 are stored and read back. The
    // very largest doubles come back from jsonb as 309 digits the JSON reader rounds past
    // the range: stored, they would break every read of this user's history, so they are
    // refused, naming the field.
    let mut body = valid();
    body["data"] = json!({ "nested": [{ "max": f64::MAX }] });
    let response = app.post("/v1/notifications", Some(&sender()), &body).await;
    refused(response, 422, Some("data.nested[0].max")).await;
    let mut body = valid();
    body["data"] = json!({ "big": 1e300, "min": -1e308, "tiny": 5e-324, "neg_zero": -0.0 });
    let response = app.post("/v1/notifications", Some(&sender()), &body).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let numbers = body["data"].clone();
    let raw = |bytes: Vec<u8>| {
        app.client
            .post(app.url("/v1/notifications"))
            .bearer_auth(sender())
            .header("content-type", "application/json")
            .body(bytes)
            .send()
    };
    let big_integer = br#"{"user_ids":["bob"],"type":"t","title":"hi","message":"m","data":{"n":123456789012345678901234567890}}"#;
    let response = raw(big_integer.to_vec()).await.unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    // Past the range of a double: not a number this API can keep.
    let too_big =
        br#"{"user_ids":["bob"],"type":"t","title":"hi","message":"m","data":{"n":1e400}}"#;
    refused(raw(too_big.to_vec()).await.unwrap(), 400, None).await;

    // Nesting: 100 levels is kept as it is; past the parser's limit (128) is malformed.
    let nested = |depth: usize| {
        let mut data = json!("leaf");
        for _ in 0..depth {
            data = json!({ "k": [data] });
        }
        data
    };
    let mut body = valid();
    body["data"] = json!({ "deep": nested(50) });
    let response = app.post("/v1/notifications", Some(&sender()), &body).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let deep = format!(
        r#"{{"user_ids":["bob"],"type":"t","title":"hi","message":"m","data":{}}}"#,
        "[".repeat(300) + &"]".repeat(300)
    );
    refused(raw(deep.into_bytes()).await.unwrap(), 400, None).await;

    // Encodings: invalid UTF-8, an overlong NUL, a lone surrogate, a byte-order mark.
    let with_text = |text: &[u8]| {
        let mut bytes = br#"{"user_ids":["bob"],"type":"t","title":""#.to_vec();
        bytes.extend_from_slice(text);
        bytes.extend_from_slice(br#"","message":"m"}"#);
        bytes
    };
    for bad in [&b"\xff\xfe"[..], b"\xc0\x80", b"\xed\xa0\x80", br"\ud800"] {
        refused(raw(with_text(bad)).await.unwrap(), 400, None).await;
    }
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend_from_slice(&with_text(b"ok"));
    refused(raw(bom).await.unwrap(), 400, None).await;
    // Valid but unusual text is stored and read back exactly.
    let mut body = valid();
    body["title"] = json!("\u{ffff} \u{10ffff} \u{1f600} \u{200b}");
    body["data"] = json!({ "\u{1f511}": "\u{fffd}", "": "empty key" });
    let response = app.post("/v1/notifications", Some(&sender()), &body).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());

    let history = history_of(&app, "bob").await;
    assert_eq!(history.as_array().unwrap().len(), 4, "{history}");
    assert_eq!(history[0]["title"], body["title"]);
    assert_eq!(history[0]["data"], body["data"]);
    assert_eq!(history[1]["data"]["deep"], nested(50));
    assert_eq!(history[3]["data"]["big"], numbers["big"]);
    assert_eq!(history[3]["data"]["min"], numbers["min"]);
    assert_eq!(history[3]["data"]["tiny"], numbers["tiny"]);
}
