//! Text PostgreSQL cannot store (U+0000), huge numbers, deep nesting and broken encodings on
//! the gateway's own endpoints. Each is a 4xx naming what is wrong (never a 5xx, never a
//! `Retry-After`), and nothing is stored.

use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::helpers::*;

async fn refused(response: reqwest::Response, status: u16, field: Option<&str>) {
    assert!(
        response.headers().get("retry-after").is_none(),
        "a client error must not ask for a retry"
    );
    problem(response, status, field).await;
}

async fn count(app: &TestApp, table: &str) -> i64 {
    let mut db = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut db)
        .await
        .unwrap()
}

async fn raw(app: &TestApp, path: &str, token: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}{path}", app.address))
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// Bodies no JSON reader should accept: invalid UTF-8, an overlong NUL, an encoded
/// surrogate, an escaped lone surrogate, a byte-order mark, nesting past the parser's limit,
/// a number past a double's range; each in the place of a string field `name`.
fn undecodable(name: &str) -> Vec<Vec<u8>> {
    let with = |text: &[u8]| {
        let mut bytes = format!(r#"{{"{name}":""#).into_bytes();
        bytes.extend_from_slice(text);
        bytes.extend_from_slice(br#""}"#);
        bytes
    };
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend_from_slice(&with(b"ok"));
    vec![
        with(b"\xff\xfe"),
        with(b"\xc0\x80"),
        with(b"\xed\xa0\x80"),
        with(br"\ud800"),
        bom,
        format!(r#"{{"{name}":{}}}"#, "[".repeat(300) + &"]".repeat(300)).into_bytes(),
        format!(r#"{{"{name}":1e400}}"#).into_bytes(),
    ]
}

#[tokio::test]
async fn login_refuses_nul_in_the_name_or_password_naming_the_field() {
    let app = spawn_app().await;
    app.add_user("ann", "correct horse battery", &[]).await;
    for name in ["ann\u{0}", "\u{0}ann", "a\u{0}nn", "\u{0}"] {
        refused(
            app.login(name, "correct horse battery").await,
            422,
            Some("username"),
        )
        .await;
    }
    refused(
        app.login("ann", "correct horse battery\u{0}").await,
        422,
        Some("password"),
    )
    .await;
    assert_eq!(count(&app, "refresh_tokens").await, 0);

    for body in undecodable("username") {
        refused(raw(&app, "/auth/login", None, body).await, 400, None).await;
    }
    // A number where the name belongs is named, whatever its size.
    for number in ["123456789012345678901234567890", "1e300", "-0"] {
        let body = format!(r#"{{"username":{number},"password":"x"}}"#);
        refused(
            raw(&app, "/auth/login", None, body.into_bytes()).await,
            422,
            Some("username"),
        )
        .await;
    }
    assert_eq!(count(&app, "refresh_tokens").await, 0);
    app.login_ok("ann", "correct horse battery").await;
}

#[tokio::test]
async fn refresh_and_logout_with_odd_tokens_are_refused_without_a_5xx() {
    let app = spawn_app().await;
    for path in ["/auth/refresh", "/auth/logout"] {
        let response = app
            .post(path, &json!({ "refresh_token": "abc\u{0}def" }))
            .await;
        assert!(response.status().is_client_error() || response.status() == 204);
        assert!(response.headers().get("retry-after").is_none());
        for body in undecodable("refresh_token") {
            refused(raw(&app, path, None, body).await, 400, None).await;
        }
    }
}

#[tokio::test]
async fn api_key_names_refuse_nul_and_nothing_is_created() {
    let app = spawn_app().await;
    app.add_user("root", "correct horse battery", &["admin"])
        .await;
    let pair = app.login_ok("root", "correct horse battery").await;
    let token = pair["access_token"].as_str().unwrap();
    for name in ["\u{0}", "key\u{0}", "a\u{0}b"] {
        let response = raw(
            &app,
            "/admin/api-keys",
            Some(token),
            serde_json::to_vec(&json!({ "name": name })).unwrap(),
        )
        .await;
        refused(response, 422, Some("name")).await;
    }
    for body in undecodable("name") {
        refused(
            raw(&app, "/admin/api-keys", Some(token), body).await,
            400,
            None,
        )
        .await;
    }
    for limit in ["1e300", "18446744073709551616", "-1", "1.5"] {
        let body = format!(r#"{{"name":"n","limit":{{"limit":{limit},"window":"1m"}}}}"#);
        refused(
            raw(&app, "/admin/api-keys", Some(token), body.into_bytes()).await,
            422,
            Some("limit"),
        )
        .await;
    }
    assert_eq!(count(&app, "api_keys").await, 0);
    let list: Value = app
        .get_as("/admin/api-keys", token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([]));
}
