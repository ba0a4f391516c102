//! API keys: admin endpoints, authenticating with a key, its own quota, revocation; and the
//! audit trail with its hash chain.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use test_support::free_port::free_port;

use crate::helpers::*;

/// seq, action, outcome, subject, ip, request_id.
type AuditRow = (
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

struct Admin {
    token: String,
    id: String,
}

async fn admin(app: &TestApp) -> Admin {
    app.add_user("root", "correct horse battery", &["admin"])
        .await;
    let pair = app.login_ok("root", "correct horse battery").await;
    let token = pair["access_token"].as_str().unwrap().to_owned();
    let claims: Value = {
        use base64::Engine as _;
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    Admin {
        token,
        id: claims["sub"].as_str().unwrap().to_owned(),
    }
}

async fn create_key(app: &TestApp, token: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(format!("{}/admin/api-keys", app.address))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_admin_creates_a_key_that_authenticates_with_its_roles_until_revoked() {
    let app = spawn_app().await;
    let admin = admin(&app).await;
    let response = create_key(
        &app,
        &admin.token,
        &json!({ "name": "reporting job", "roles": ["analyst"] }),
    )
    .await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let created: Value = response.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("gwk_"));
    assert_eq!(created["owner"], admin.id.as_str());
    assert_eq!(created["roles"], json!(["analyst"]));
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));

    // The key works where its roles allow, and acts for its owner upstream.
    let call = |path: &'static str| {
        app.client
            .get(format!("{}{path}", app.address))
            .header("x-api-key", &key)
            .send()
    };
    let response = call("/api/analytics/daily").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["ratelimit-policy"],
        "\"api-key\";q=10000;w=60"
    );
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["headers"]["x-user-id"], json!([admin.id]));
    assert_eq!(echo["headers"]["x-user-roles"], json!(["analyst"]));
    assert!(
        echo["headers"].get("x-api-key").is_none(),
        "the key leaked upstream"
    );
    assert_eq!(call("/api/orders/1").await.unwrap().status(), 403);

    // Upstreams that trust X-User-Id never see a token: one that echoed it would hand it
    // to the caller.
    assert!(header_values(&echo, "authorization").is_empty(), "{echo}");

    // Upstreams that verify a JWT themselves (the notifier) get one the gateway signed for
    // the key's owner and roles, short-lived, reused across requests.
    let authorization = |echo: &Value| {
        let values = header_values(echo, "authorization");
        assert_eq!(values.len(), 1, "{echo}");
        values[0].strip_prefix("Bearer ").unwrap().to_owned()
    };
    let to_notifier = || async {
        let response = call("/api/notifications/v1/users/me").await.unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()
    };
    let token = authorization(&to_notifier().await);
    let jwks = app
        .client
        .get(format!("{}/.well-known/jwks.json", app.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let verifier = jwks_verifier(&jwks);
    let claims = verifier
        .verify(&token, chrono::Utc::now().timestamp())
        .unwrap();
    assert_eq!(claims.sub, admin.id);
    assert_eq!(claims.roles, ["analyst"]);
    assert_eq!(claims.exp - claims.iat, 60);
    assert_eq!(
        authorization(&to_notifier().await),
        token,
        "signed once, then reused"
    );

    // A WebSocket opened with the key gets a token of its own that lives as long as a user's
    // access token, since the notifier closes a socket when its token expires.
    let upgrade: Value = app
        .client
        .get(format!("{}/api/notifications/v1/ws", app.address))
        .header("x-api-key", &key)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let socket_token = authorization(&upgrade);
    let socket_claims = verifier
        .verify(&socket_token, chrono::Utc::now().timestamp())
        .unwrap();
    assert_eq!(socket_claims.sub, admin.id);
    assert_eq!(socket_claims.exp - socket_claims.iat, 15 * 60);

    // Presented back to the gateway, such a token is refused: it would make the key its
    // owner's session (another quota, past revocation, and able to manage keys).
    for token in [&token, &socket_token] {
        for path in ["/api/analytics/daily", "/admin/api-keys"] {
            let response = app
                .client
                .get(format!("{}{path}", app.address))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 401, "{path}");
            assert!(
                response.headers()["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .contains("invalid_token")
            );
        }
    }

    // Listed without the secret.
    let list: Value = app
        .get_as("/admin/api-keys", &admin.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["items"][0].get("key").is_none());
    assert!(!list.to_string().contains(&key));

    // Revoked: refused at once.
    let id = created["id"].as_str().unwrap();
    let revoke = app
        .client
        .delete(format!("{}/admin/api-keys/{id}", app.address))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 204);
    let response = call("/api/analytics/daily").await.unwrap();
    problem(response, 401, None).await;
    let again = app
        .client
        .delete(format!(
            "{}/admin/api-keys/{}",
            app.address,
            uuid::Uuid::now_v7()
        ))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    problem(again, 404, None).await;
}

/// `app`'s answer to `GET /api/analytics/daily` with `key`.
async fn status_with_key(app: &TestApp, key: &str) -> u16 {
    app.client
        .get(format!("{}/api/analytics/daily", app.address))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls `app` until `key` is refused; how long that took, or None within `limit`.
async fn refused_within(app: &TestApp, key: &str, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if status_with_key(app, key).await == 401 {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A new key for role `analyst`, created on `app`: the key and its id.
async fn analyst_key(app: &TestApp, admin: &Admin) -> (String, String) {
    let created: Value = create_key(
        app,
        &admin.token,
        &json!({ "name": "job", "roles": ["analyst"] }),
    )
    .await
    .json()
    .await
    .unwrap();
    let text = |field: &str| created[field].as_str().unwrap().to_owned();
    (text("key"), text("id"))
}

async fn revoke(app: &TestApp, admin: &Admin, id: &str) -> u16 {
    app.client
        .delete(format!("{}/admin/api-keys/{id}", app.address))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_revocation_reaches_the_other_replicas_through_redis_not_after_the_cache_ttl() {
    // Two replicas of one gateway; a found key would be trusted for five minutes.
    let prefix = format!("gw-test:{}:", uuid::Uuid::now_v7().simple());
    let replica = |prefix: String| {
        move |settings: &mut api_gateway::Settings, _: &mut api_gateway::config::GatewayConfig| {
            settings.rate_limit_prefix = prefix;
            settings.api_key_cache_ttl = Duration::from_secs(300);
        }
    };
    let a = spawn_app_with(replica(prefix.clone())).await;
    let b = spawn_app_on(&a.database_url, replica(prefix.clone())).await;
    // b subscribes in the background once it runs; a message published before is not its.
    wait_for_metric(&b, "api_gateway_api_key_revocations_subscribed 1").await;
    let admin = admin(&a).await;
    let (key, id) = analyst_key(&a, &admin).await;
    let key = key.as_str();
    assert_eq!(status_with_key(&b, key).await, 200, "cached on b now");

    assert_eq!(revoke(&a, &admin, &id).await, 204);
    assert_eq!(
        status_with_key(&a, key).await,
        401,
        "refused at once where revoked"
    );
    assert!(
        refused_within(&b, key, Duration::from_secs(10))
            .await
            .is_some(),
        "b still accepts the key 10 s after its revocation"
    );
    let metrics = b.metrics().await;
    assert!(
        has_line(&metrics, "api_gateway_api_key_revocations_received_total 1"),
        "{metrics}"
    );
    assert!(has_line(
        &metrics,
        "api_gateway_api_key_revocations_subscribed 1"
    ));
}

/// Whether the Prometheus page holds `line` as a whole line (a HELP text may quote it).
fn has_line(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

/// Polls `app`'s metrics until they hold `line`.
async fn wait_for_metric(app: &TestApp, line: &str) {
    let started = Instant::now();
    while !has_line(&app.metrics().await, line) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never saw {line:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_revocation_missed_while_redis_was_down_applies_when_the_replica_subscribes_again() {
    let port = free_port();
    let mut redis = test_support::PrivateRedis::start(port);
    let prefix = format!("gw-test:{}:", uuid::Uuid::now_v7().simple());
    let replica = |url: String, prefix: String| {
        move |settings: &mut api_gateway::Settings, _: &mut api_gateway::config::GatewayConfig| {
            settings.redis_url = Some(url.into());
            settings.rate_limit_prefix = prefix;
            settings.api_key_cache_ttl = Duration::from_secs(300);
        }
    };
    let a = spawn_app_with(replica(redis.url(), prefix.clone())).await;
    let b = spawn_app_on(&a.database_url, replica(redis.url(), prefix.clone())).await;
    wait_for_metric(&b, "api_gateway_api_key_revocations_subscribed 1").await;
    let admin = admin(&a).await;
    let (key, id) = analyst_key(&a, &admin).await;
    assert_eq!(status_with_key(&b, &key).await, 200, "cached on b now");

    // Redis goes away: the revocation commits, its message cannot be sent, and b, which
    // trusts its cache for five minutes, has not heard of it.
    redis.kill();
    wait_for_metric(&b, "api_gateway_api_key_revocations_subscribed 0").await;
    assert_eq!(revoke(&a, &admin, &id).await, 204);
    assert!(has_line(
        &a.metrics().await,
        "api_gateway_api_key_revocation_publish_failures_total 1"
    ));
    assert_eq!(status_with_key(&b, &key).await, 200, "b missed the message");

    // Redis is back: b subscribes again, drops its cache, and asks PostgreSQL.
    let _redis = test_support::PrivateRedis::start(port);
    wait_for_metric(&b, "api_gateway_api_key_revocations_subscribed 1").await;
    assert_eq!(status_with_key(&b, &key).await, 401);
}

#[tokio::test]
async fn a_subscription_that_stops_answering_is_dropped_and_made_again() {
    let port = free_port();
    let redis = test_support::PrivateRedis::start(port);
    let url = redis.url();
    let app = spawn_app_with(move |settings, _| {
        settings.redis_url = Some(url.into());
        settings.api_key_cache_ttl = Duration::from_secs(300);
    })
    .await;
    wait_for_metric(&app, "api_gateway_api_key_revocations_subscribed 1").await;
    // Frozen, Redis keeps the connection open and answers nothing: without a PING the
    // replica would go on looking subscribed while every revocation is lost.
    redis.freeze();
    wait_for_metric(&app, "api_gateway_api_key_revocations_subscribed 0").await;
    redis.thaw();
    wait_for_metric(&app, "api_gateway_api_key_revocations_subscribed 1").await;
}

#[tokio::test]
async fn without_redis_a_revocation_reaches_the_other_replicas_within_the_cache_ttl() {
    // b cannot reach Redis (nothing listens on port 1): only its cache TTL bounds a stale key.
    let a = spawn_app_with(|settings, _| settings.api_key_cache_ttl = Duration::from_secs(1)).await;
    let b = spawn_app_on(&a.database_url, |settings, _| {
        settings.redis_url = Some(String::from("redis://127.0.0.1:1").into());
        settings.api_key_cache_ttl = Duration::from_secs(1);
    })
    .await;
    let admin = admin(&a).await;
    let (key, id) = analyst_key(&a, &admin).await;
    let key = key.as_str();
    assert_eq!(status_with_key(&b, key).await, 200);
    assert_eq!(revoke(&a, &admin, &id).await, 204);
    assert!(
        refused_within(&b, key, Duration::from_secs(3))
            .await
            .is_some(),
        "b still accepts the key 3 s after its revocation, with a 1 s cache TTL"
    );
    let metrics = b.metrics().await;
    assert!(has_line(
        &metrics,
        "api_gateway_api_key_revocations_subscribed 0"
    ));
}

#[tokio::test]
async fn a_key_with_its_own_quota_is_limited_by_it() {
    let app = spawn_app().await;
    let admin = admin(&app).await;
    let created: Value = create_key(
        &app,
        &admin.token,
        &json!({ "name": "tiny", "roles": ["user"], "limit": { "limit": 3, "window": "1m" } }),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        created["limit"],
        json!({ "limit": 3, "window_seconds": 60 })
    );
    let key = created["key"].as_str().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = app
            .client
            .get(format!("{}/api/orders/1", app.address))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
}

#[tokio::test]
async fn only_signed_in_admins_manage_keys_and_bad_bodies_are_named() {
    let app = spawn_app().await;
    let admin = admin(&app).await;
    let user = token_for("0190b5e4-0000-7000-8000-000000000009", &["user"]);
    let response = create_key(&app, &user, &json!({ "name": "x" })).await;
    problem(response, 403, None).await;
    let response = app
        .client
        .post(format!("{}/admin/api-keys", app.address))
        .json(&json!({ "name": "x" }))
        .send()
        .await
        .unwrap();
    problem(response, 401, None).await;
    // A key with the admin role still cannot mint keys.
    let created: Value = create_key(
        &app,
        &admin.token,
        &json!({ "name": "a", "roles": ["admin"] }),
    )
    .await
    .json()
    .await
    .unwrap();
    let response = app
        .client
        .post(format!("{}/admin/api-keys", app.address))
        .header("x-api-key", created["key"].as_str().unwrap())
        .json(&json!({ "name": "successor" }))
        .send()
        .await
        .unwrap();
    problem(response, 403, None).await;

    for (body, field) in [
        (json!({}), "name"),
        (json!({ "name": "" }), "name"),
        (json!({ "name": "a".repeat(101) }), "name"),
        (json!({ "name": 7 }), "name"),
        (json!({ "name": "x\u{0007}" }), "name"),
        (json!({ "name": "x", "roles": "admin" }), "roles"),
        (json!({ "name": "x", "roles": ["ad min"] }), "roles"),
        (json!({ "name": "x", "roles": vec!["r"; 33] }), "roles"),
        (json!({ "name": "x", "owner": "not-a-uuid" }), "owner"),
        (
            json!({ "name": "x", "limit": { "limit": 0, "window": "1m" } }),
            "limit",
        ),
        (
            json!({ "name": "x", "limit": { "limit": 5, "window": "forever" } }),
            "limit",
        ),
        (json!({ "name": "x", "limit": 5 }), "limit"),
        // Within each bound, but past what the limiter counts exactly (2^53 µs).
        (
            json!({ "name": "x", "limit": { "limit": 10_000_000, "window": "1d" } }),
            "limit",
        ),
        (json!({ "name": "x", "extra": true }), "extra"),
    ] {
        let response = create_key(&app, &admin.token, &body).await;
        problem(response, 422, Some(field)).await;
    }
    let response = create_key(
        &app,
        &admin.token,
        &json!({ "name": "x", "owner": uuid::Uuid::now_v7() }),
    )
    .await;
    problem(response, 422, Some("owner")).await;
    let response = app
        .client
        .post(format!("{}/admin/api-keys", app.address))
        .bearer_auth(&admin.token)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    problem(response, 400, None).await;
    let response = app
        .client
        .post(format!("{}/admin/api-keys", app.address))
        .bearer_auth(&admin.token)
        .body("name=x")
        .send()
        .await
        .unwrap();
    problem(response, 415, None).await;
    let response = app.get_as("/admin/api-keys?limit=0", &admin.token).await;
    problem(response, 422, Some("limit")).await;
    let response = app.get_as("/admin/api-keys?cursor=zzz", &admin.token).await;
    problem(response, 422, Some("cursor")).await;
    // Unknown keys, and strings that are not keys at all.
    for key in ["gwk_unknown", "not-a-key", &"gwk_".repeat(100)] {
        let response = app
            .client
            .get(format!("{}/api/orders/1", app.address))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        problem(response, 401, None).await;
    }
}

#[tokio::test]
async fn refusals_on_the_admin_endpoints_name_the_method_and_the_collection_in_the_trail() {
    let app = spawn_app().await;
    let user = token_for("0190b5e4-0000-7000-8000-000000000009", &["user"]);
    let revoked = app
        .client
        .delete(format!(
            "{}/admin/api-keys/0190b5e4-0000-7000-8000-0000000000aa",
            app.address
        ))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 403);
    assert_eq!(app.get_as("/admin/api-keys", &user).await.status(), 403);
    let anonymous = app
        .client
        .post(format!("{}/admin/api-keys", app.address))
        .json(&json!({ "name": "k" }))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let database_url = app.database_url.clone();
    app.shut_down().await;

    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT action, outcome, detail FROM audit_log \
         WHERE action IN ('authorize', 'authenticate') ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let row = |action: &str, outcome: &str, detail: &str| {
        (
            action.to_owned(),
            outcome.to_owned(),
            Some(detail.to_owned()),
        )
    };
    assert_eq!(
        rows,
        [
            row("authorize", "denied", "DELETE /admin/api-keys"),
            row("authorize", "denied", "GET /admin/api-keys"),
            row("authenticate", "failure", "missing: POST /admin/api-keys"),
        ]
    );
}

#[tokio::test]
async fn security_events_are_audited_in_a_chain_that_detects_tampering() {
    let app = spawn_app().await;
    let admin = admin(&app).await;
    assert_eq!(app.login("root", "wrong").await.status(), 401);
    // A password typed into the name field: it must not reach the trail either.
    assert_eq!(app.login("correct horse battery", "x").await.status(), 401);
    let pair = app.login_ok("root", "correct horse battery").await;
    let refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    let rotated: Value = app.refresh(&refresh).await.json().await.unwrap();
    let rotated: Value = app
        .refresh(rotated["refresh_token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(app.refresh(&refresh).await.status(), 401); // reuse: family revoked
    let created: Value = create_key(&app, &admin.token, &json!({ "name": "k" }))
        .await
        .json()
        .await
        .unwrap();
    app.client
        .delete(format!(
            "{}/admin/api-keys/{}",
            app.address,
            created["id"].as_str().unwrap()
        ))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    let user = token_for("0190b5e4-0000-7000-8000-000000000009", &["user"]);
    assert_eq!(app.get_as("/api/analytics/x", &user).await.status(), 403);
    assert_eq!(
        app.client
            .get(format!("{}/api/orders/1", app.address))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    app.post(
        "/auth/logout",
        &json!({ "refresh_token": rotated["refresh_token"] }),
    )
    .await;
    let database_url = app.database_url.clone();
    app.shut_down().await;

    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT seq, action, outcome, subject, ip, request_id FROM audit_log ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let events: Vec<(&str, &str)> = rows
        .iter()
        .map(|(_, a, o, ..)| (a.as_str(), o.as_str()))
        .collect();
    for expected in [
        ("login", "success"),
        ("login", "failure"),
        ("refresh", "success"),
        ("refresh", "reuse_detected"),
        ("api_key.create", "success"),
        ("api_key.revoke", "success"),
        ("authorize", "denied"),
        ("authenticate", "failure"),
        ("logout", "success"),
    ] {
        assert!(
            events.contains(&expected),
            "{expected:?} missing from {events:?}"
        );
    }
    for (seq, _, _, _, ip, request_id) in &rows {
        assert_eq!(ip.as_deref(), Some("127.0.0.1"), "row {seq}");
        assert!(request_id.is_some(), "row {seq}");
    }
    // No secret anywhere in the trail.
    let dump: String =
        sqlx::query_scalar("SELECT string_agg(audit_log::text, '\n') FROM audit_log")
            .fetch_one(&pool)
            .await
            .unwrap();
    for secret in [
        "correct horse battery",
        refresh.as_str(),
        admin.token.as_str(),
        created["key"].as_str().unwrap(),
    ] {
        assert!(!dump.contains(secret), "a secret is in the audit log");
    }

    let report = api_gateway::audit::verify(&pool, None).await.unwrap();
    assert_eq!(report.broken, None);
    assert_eq!(report.rows, rows.len() as u64);
    let head = report.head.clone();
    assert!(
        api_gateway::audit::verify(&pool, Some(&head))
            .await
            .unwrap()
            .broken
            .is_none()
    );

    // The verify command agrees, and fails once a row is edited.
    let verify = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_audit-verify"))
            .args(["--database-url", &database_url, "--expect-head", &head])
            .output()
            .unwrap()
    };
    let ok = verify();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains(&head));
    sqlx::query("UPDATE audit_log SET outcome = 'success' WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    let report = api_gateway::audit::verify(&pool, None).await.unwrap();
    assert_eq!(report.broken.as_ref().map(|b| b.0), Some(2));
    let broken = verify();
    assert_eq!(broken.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&broken.stdout).contains("broken at row 2"));
}

#[tokio::test]
async fn deleted_and_truncated_rows_break_the_chain() {
    let app = spawn_app().await;
    for _ in 0..4 {
        app.login("nobody", "wrong").await;
    }
    let database_url = app.database_url.clone();
    app.shut_down().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let head = api_gateway::audit::verify(&pool, None).await.unwrap().head;
    sqlx::query("DELETE FROM audit_log WHERE seq = 4")
        .execute(&pool)
        .await
        .unwrap();
    let report = api_gateway::audit::verify(&pool, Some(&head))
        .await
        .unwrap();
    assert!(
        report.broken.is_some(),
        "deleting the last row must be caught"
    );
    sqlx::query("DELETE FROM audit_log WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    let report = api_gateway::audit::verify(&pool, None).await.unwrap();
    assert_eq!(report.broken.map(|b| b.0), Some(3));
}
