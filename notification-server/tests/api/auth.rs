//! Tokens: refused before the upgrade, accepted from the header or the query, and the
//! connection closed with 4001 when the token expires.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_connection_without_a_valid_token_gets_401_and_no_upgrade() {
    let app = spawn_app(Engine::Memory).await;
    let now = chrono::Utc::now().timestamp();
    let expired = AccessToken::new("alice", &[])
        .with_claims(|c| c.exp = now - 120)
        .sign();
    // Inside the verifier's clock leeway, but expired: it would be closed with 4001 at once.
    let just_expired = AccessToken::new("alice", &[])
        .with_claims(|c| c.exp = now - 5)
        .sign();
    let wrong_audience = AccessToken::new("alice", &[])
        .with_claims(|c| c.aud = "someone-else".into())
        .sign();
    let wrong_issuer = AccessToken::new("alice", &[])
        .with_claims(|c| c.iss = "mallory".into())
        .sign();
    let other_key = AccessToken::new("alice", &[])
        .signed_with(FixtureKey::Untrusted)
        .sign();
    let unsigned = {
        // alg "none" with the claims of a valid token and no signature.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(r#"{"alg":"none","typ":"JWT","kid":"test"}"#);
        let body =
            b64.encode(serde_json::to_vec(AccessToken::new("alice", &["admin"]).claims()).unwrap());
        format!("{header}.{body}.")
    };
    let cases = [
        ("no token", String::new()),
        ("garbage", "?token=not.a.jwt".into()),
        ("expired", format!("?token={expired}")),
        ("just expired", format!("?token={just_expired}")),
        ("other key", format!("?token={other_key}")),
        ("wrong audience", format!("?token={wrong_audience}")),
        ("wrong issuer", format!("?token={wrong_issuer}")),
        ("alg none", format!("?token={unsigned}")),
        ("huge", format!("?token={}", "a".repeat(9_000))),
    ];
    for (case, query) in cases {
        let (status, body) = match app.try_connect(&query, None).await {
            Ok(_) => panic!("{case}: upgraded"),
            Err(refusal) => refusal,
        };
        assert_eq!(status, 401, "{case}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["type"], "urn:problem:unauthorized", "{case}");
    }
    let (status, _) = app
        .try_connect("", Some("Basic YWxpY2U6c2VjcmV0"))
        .await
        .err()
        .expect("basic auth upgraded");
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_token_in_the_authorization_header_is_accepted() {
    let app = spawn_app(Engine::Memory).await;
    let mut client = app
        .try_connect("", Some(&format!("Bearer {}", access_token("alice", &[]))))
        .await
        .expect("refused");
    let welcome = client.next_json().await;
    assert_eq!(welcome["user_id"], "alice");
    assert!(welcome["heartbeat_interval_ms"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_plain_get_with_a_valid_token_gets_426() {
    let app = spawn_app(Engine::Memory).await;
    let response = app.get("/v1/ws", Some(&access_token("alice", &[]))).await;
    problem(response, 426, None).await;
    let response = app
        .get("/v1/ws?last_id=nope", Some(&access_token("alice", &[])))
        .await;
    problem(response, 400, None).await;
}

#[tokio::test]
async fn the_connection_closes_with_4001_when_the_token_expires() {
    let app = spawn_app(Engine::Memory).await;
    let short = AccessToken::new("alice", &[])
        .with_claims(|c| c.exp = chrono::Utc::now().timestamp() + 2)
        .sign();
    let mut client = app.connect_with(&format!("?token={short}")).await;
    let started = std::time::Instant::now();
    let code = match client.next_within(Duration::from_secs(6)).await {
        Some(Next::Closed(code)) => code,
        Some(Next::Json(frame)) => panic!("unexpected {frame}"),
        None => panic!("not closed after the token expired"),
    };
    assert_eq!(code, Some(4001));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn http_endpoints_need_a_token_and_the_right_role() {
    let app = spawn_app(Engine::Memory).await;
    let body = json!({ "user_ids": ["bob"], "type": "t", "title": "hi", "message": "m" });

    let response = app.post("/v1/notifications", None, &body).await;
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    problem(response, 401, None).await;

    let response = app
        .post(
            "/v1/notifications",
            Some(
                &AccessToken::new("x", &["sender"])
                    .signed_with(FixtureKey::Untrusted)
                    .sign(),
            ),
            &body,
        )
        .await;
    problem(response, 401, None).await;

    let plain_user = access_token("alice", &[]);
    let response = app
        .post("/v1/notifications", Some(&plain_user), &body)
        .await;
    problem(response, 403, None).await;
    let response = app
        .post(
            "/v1/groups/g/notifications",
            Some(&plain_user),
            &content("x"),
        )
        .await;
    problem(response, 403, None).await;
    let response = app.put("/v1/groups/g/members/alice", &plain_user).await;
    problem(response, 403, None).await;
    let response = app
        .put(
            "/v1/groups/g/members/alice",
            &access_token("s", &["sender"]),
        )
        .await;
    problem(response, 403, None).await;

    // History: one's own, or any with `support`.
    app.send(&["bob"], "for bob").await;
    let response = app
        .get("/v1/users/bob/notifications", Some(&plain_user))
        .await;
    problem(response, 403, None).await;
    let response = app
        .get(
            "/v1/users/bob/notifications",
            Some(&access_token("bob", &[])),
        )
        .await;
    assert_eq!(response.status(), 200);
    let response = app
        .get(
            "/v1/users/bob/notifications",
            Some(&access_token("helpdesk", &["support"])),
        )
        .await;
    assert_eq!(response.status(), 200);
}
