//! The request pipeline on `/api/*`: authentication refusals, RBAC (and attempts to get around
//! it), identity going upstream, rate limits, CORS, header limits.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use test_support::free_port::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

const USER: &str = "0190b5e4-0000-7000-8000-000000000001";

#[tokio::test]
async fn every_bad_credential_gets_401_with_a_challenge_and_nothing_reaches_upstream() {
    let app = spawn_app().await;
    let url = format!("{}/api/orders/1", app.address);
    let expired = token_with(USER, &["user"], |c| {
        c.exp = chrono::Utc::now().timestamp() - 120;
        c.iat = c.exp - 600;
    });
    let not_yet = token_with(USER, &["user"], |c| {
        c.nbf = Some(chrono::Utc::now().timestamp() + 600);
    });
    let wrong_aud = token_with(USER, &["user"], |c| c.aud = "elsewhere".into());
    let wrong_iss = token_with(USER, &["user"], |c| c.iss = "someone-else".into());
    let good = token_for(USER, &["user"]);
    let mut parts: Vec<&str> = good.split('.').collect();
    // `alg: none`, with the signature stripped.
    let none_header = base64url(r#"{"alg":"none","typ":"JWT","kid":"test"}"#);
    parts[0] = &none_header;
    let alg_none = format!("{}.{}.", parts[0], parts[1]);
    // HS256 signed with the public key's bytes: the classic RS/HS confusion.
    let public = include_bytes!("../../../common/tests/fixtures/ed25519-public.pem");
    let hs = common::auth::Signer::hs256_secret("test", public)
        .unwrap()
        .sign(AccessToken::new(USER, &["admin"]).jti("x").claims())
        .unwrap();
    let unknown_kid = AccessToken::new(USER, &["user"])
        .key_id("other-kid")
        .jti("y")
        .sign();
    let tampered = format!("{}x", &good[..good.len() - 1]);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no credentials", None),
        ("garbage", Some("Bearer not-a-jwt".into())),
        ("expired", Some(format!("Bearer {expired}"))),
        ("not yet valid", Some(format!("Bearer {not_yet}"))),
        ("wrong audience", Some(format!("Bearer {wrong_aud}"))),
        ("wrong issuer", Some(format!("Bearer {wrong_iss}"))),
        ("alg none", Some(format!("Bearer {alg_none}"))),
        ("HS256 with the public key", Some(format!("Bearer {hs}"))),
        ("unknown kid", Some(format!("Bearer {unknown_kid}"))),
        ("bad signature", Some(format!("Bearer {tampered}"))),
        ("basic scheme", Some("Basic dXNlcjpwYXNz".into())),
        ("oversized", Some(format!("Bearer {}", "a".repeat(9000)))),
    ];
    for (name, authorization) in cases {
        let mut request = app.client.get(&url);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{name}");
        assert!(
            response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer realm=\"api-gateway\""),
            "{name}"
        );
        let body = problem(response, 401, None).await;
        assert!(
            body.get("headers").is_none(),
            "{name}: reached the upstream"
        );
    }
    // A token and a key at once is ambiguous.
    let response = app
        .client
        .get(&url)
        .bearer_auth(&good)
        .header("x-api-key", "gwk_whatever")
        .send()
        .await
        .unwrap();
    problem(response, 401, None).await;
    // The good token passes.
    assert_eq!(app.get_as("/api/orders/1", &good).await.status(), 200);
}

fn base64url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test]
async fn rbac_allows_by_role_and_denies_by_default() {
    let app = spawn_app().await;
    let user = token_for(USER, &["user"]);
    let admin = token_for(USER, &["admin"]);
    let nobody = token_for(USER, &[]);
    for (method, path, token, status) in [
        ("GET", "/api/orders/1", &user, 200),
        ("POST", "/api/orders", &user, 200),
        ("DELETE", "/api/orders/1", &user, 403),
        ("DELETE", "/api/orders/1", &admin, 200),
        ("GET", "/api/orders/1", &nobody, 403),
        // HEAD is GET without the body, and is allowed and refused as GET is.
        ("HEAD", "/api/orders/1", &user, 200),
        ("HEAD", "/api/orders/1", &nobody, 403),
        ("HEAD", "/api/analytics/reports", &user, 403),
        ("GET", "/api/analytics/reports", &user, 403),
        ("GET", "/api/metrics/v1/aggregates", &user, 403),
        ("POST", "/api/metrics/v1/events", &user, 403),
        // No rule: denied even for admins.
        ("PATCH", "/api/orders/1", &admin, 403),
        ("GET", "/api/unmounted", &admin, 403),
        // Any signed-in caller may open the notification socket route.
        ("GET", "/api/notifications/v1/ws", &nobody, 200),
    ] {
        let response = app
            .client
            .request(method.parse().unwrap(), format!("{}{path}", app.address))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        if method == "HEAD" {
            assert!(response.bytes().await.unwrap().is_empty(), "HEAD {path}");
        } else if status == 403 {
            problem(response, 403, None).await;
        }
    }
}

#[tokio::test]
async fn paths_are_normalised_before_matching_and_forwarded_as_authorised() {
    let app = spawn_app().await;
    // A user may read orders but not analytics; every trick to reach analytics is caught.
    let user = token_for(USER, &["user"]);
    let send = |path: &'static str| {
        let app = &app;
        let user = user.clone();
        async move {
            // reqwest would normalise dots itself; send the raw request line.
            raw_get(&app.address, path, &user).await
        }
    };
    for path in [
        "/api/orders/../analytics/reports",
        "/api/orders/%2e%2e/analytics/reports",
        "/api/orders/.%2E/analytics/reports",
        "//api//analytics/reports",
        "/api/%61nalytics/reports",
        "/api/orders/./../analytics/reports",
    ] {
        let (status, _) = send(path).await;
        assert_eq!(status, 403, "{path}");
    }
    for (path, status) in [
        ("/api/orders%2F..%2Fanalytics", 400),
        ("/api/orders/..%5Canalytics", 400),
        ("/api/orders\\..\\analytics", 400),
        ("/api/orders/%00", 400),
        ("/api/../../etc/passwd", 400),
        ("/api/orders/%zz", 400),
    ] {
        let (got, _) = send(path).await;
        assert_eq!(got, status, "{path}");
    }
    // Allowed paths reach the upstream in their normal form, prefix stripped, query intact.
    let (status, body) = send("/api//orders/./7/../8?x=%2F&y=1").await;
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/8?x=%2F&y=1");
    let (status, body) = send("/api/%6Frders/9").await;
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/9");
}

/// A GET with the path exactly as given (no client-side normalisation); status and body.
pub async fn raw_get(address: &str, path: &str, token: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    // Bodies come back unchunked for these small JSON answers, or chunked: take the JSON.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(start), Some(end)) => body[start..=end].to_owned(),
        _ => body,
    };
    (status, body)
}

#[tokio::test]
async fn identity_goes_upstream_and_client_copies_are_stripped() {
    let app = spawn_app().await;
    let token = token_for(USER, &["user", "admin"]);
    let response = app
        .client
        .get(format!("{}/api/orders/1", app.address))
        .bearer_auth(&token)
        .header("x-user-id", "someone-else")
        .header("X-User-Roles", "admin")
        .header("x-request-id", "client-chosen-id")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "client-chosen-id");
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["headers"]["x-user-id"], serde_json::json!([USER]));
    assert_eq!(
        echo["headers"]["x-user-roles"],
        serde_json::json!(["user,admin"])
    );
    assert_eq!(
        echo["headers"]["x-request-id"],
        serde_json::json!(["client-chosen-id"])
    );
    let traceparent = echo["headers"]["traceparent"][0].as_str().unwrap();
    assert_eq!(traceparent.len(), 55, "{traceparent}");
}

#[tokio::test]
async fn responses_carry_rate_limit_headers_and_the_limit_is_enforced() {
    let app = spawn_app_with(|_, config| {
        config.limits.user.limit = 5;
    })
    .await;
    let token = token_for(USER, &["user"]);
    for expected_remaining in (0..5).rev() {
        let response = app.get_as("/api/orders/1", &token).await;
        assert_eq!(response.status(), 200);
        let headers = response.headers();
        assert_eq!(headers["x-ratelimit-limit"], "5");
        assert_eq!(
            headers["x-ratelimit-remaining"],
            expected_remaining.to_string().as_str()
        );
        assert_eq!(headers["ratelimit-policy"], "\"user\";q=5;w=60");
        assert!(
            headers["ratelimit"]
                .to_str()
                .unwrap()
                .starts_with(&format!("\"user\";r={expected_remaining};t=")),
        );
    }
    let response = app.get_as("/api/orders/1", &token).await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Sliding window: the 5 requests count in full until this window ends, then fade over
    // the next; the estimate 5 × (1 − t/60) drops to 4 at t = 12 s. So about 60 + 12 s.
    assert!((70..=72).contains(&retry_after), "{retry_after}");
    problem(response, 429, None).await;
    // Another user has a quota of their own.
    let other = token_for("0190b5e4-0000-7000-8000-000000000002", &["user"]);
    assert_eq!(app.get_as("/api/orders/1", &other).await.status(), 200);
}

#[tokio::test]
async fn a_route_with_its_own_quota_counts_apart() {
    let app = spawn_app_with(|_, config| {
        config.limits.user.limit = 100;
        for route in &mut config.routes {
            if route.prefix == "/api/analytics" {
                route.limit =
                    Some(api_gateway::limiter::Quota::new(2, Duration::from_secs(60)).unwrap());
            }
        }
    })
    .await;
    let token = token_for(USER, &["analyst", "user"]);
    for _ in 0..2 {
        assert_eq!(app.get_as("/api/analytics/r", &token).await.status(), 200);
    }
    let refused = app.get_as("/api/analytics/r", &token).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["ratelimit-policy"], "\"route\";q=2;w=60");
    // The default quota is untouched by the route's.
    let response = app.get_as("/api/orders/1", &token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ratelimit-remaining"], "99");
}

#[tokio::test]
async fn with_redis_down_and_the_closed_policy_requests_get_503_until_the_next_probe() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let app = spawn_app_with(|settings, _| {
        settings.redis_url = Some(url.into());
        settings.rate_limit_redis_down = api_gateway::limiter::RedisDownPolicy::Closed;
        settings.rate_limit_probe_interval = Duration::from_secs(7);
    })
    .await;
    let response = app
        .get_as("/api/orders/1", &token_for(USER, &["user"]))
        .await;
    assert_eq!(response.status(), 503);
    // The limiter tries Redis again after its probe interval: retrying sooner gets the same.
    assert_eq!(response.headers()["retry-after"], "7");
    let body = problem(response, 503, None).await;
    assert_eq!(body["detail"], "rate limits cannot be checked right now");
}

/// A request that would wait on its upstream for longer than the shutdown grace does not
/// hold the stop up: the gateway stops within SHUTDOWN_GRACE, the request is cut off then,
/// and what was audited before is in the table.
#[tokio::test]
async fn shutdown_ends_within_its_grace_with_a_request_stuck_upstream() {
    // An upstream that takes connections and never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hole.accept().await {
            held.push(stream);
        }
    });
    let app = spawn_app_with(|settings, config| {
        settings.serve.shutdown_grace = Duration::from_secs(1);
        config
            .set_targets("orders", std::slice::from_ref(&hole_url))
            .unwrap();
        let orders = config.upstreams.iter_mut().find(|u| u.name == "orders");
        orders
            .unwrap()
            .proxy
            .insert("health_interval".into(), "1h".into());
    })
    .await;
    assert_eq!(app.login("nobody", "wrong password").await.status(), 401);
    let stuck = {
        let (client, url) = (app.client.clone(), format!("{}/api/orders/1", app.address));
        let token = token_for(USER, &["user"]);
        tokio::spawn(async move { client.get(url).bearer_auth(token).send().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stuck.is_finished());

    let database_url = app.database_url.clone();
    let stopping = std::time::Instant::now();
    let _ = app.stop.send(());
    app.stopped.await.unwrap().unwrap();
    let stopped = stopping.elapsed();
    assert!(stopped < Duration::from_millis(1_500), "{stopped:?}");
    // The upstream's timeout is 10 s; the request ended with the gateway.
    let ended = tokio::time::timeout(Duration::from_millis(500), stuck).await;
    assert!(ended.is_ok(), "the request outlived the gateway");

    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let failures: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'login' AND outcome = 'failure'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(failures, 1);
}

#[tokio::test]
async fn auth_endpoints_are_limited_per_ip() {
    let app = spawn_app_with(|_, config| {
        config.limits.auth_ip.limit = 3;
    })
    .await;
    for _ in 0..3 {
        assert_eq!(app.login("nobody", "wrong password").await.status(), 401);
    }
    let response = app.login("nobody", "wrong password").await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        response.headers()["ratelimit-policy"],
        "\"auth-ip\";q=3;w=60"
    );
    // Refresh shares the same per-IP quota.
    assert_eq!(app.refresh("anything").await.status(), 429);
}

/// A failed login claiming to come from `forwarded_for`; the status it got.
async fn login_from(app: &TestApp, forwarded_for: &str) -> u16 {
    app.client
        .post(format!("{}/auth/login", app.address))
        .header("x-forwarded-for", forwarded_for)
        .json(&serde_json::json!({ "username": "nobody", "password": "wrong password" }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn x_forwarded_proto_says_https_only_when_a_trusted_proxy_does() {
    let scheme_upstream_sees = |app: &TestApp| {
        let request = app
            .client
            .get(format!("{}/api/orders/1", app.address))
            .bearer_auth(token_for("u-1", &["user"]))
            .header("x-forwarded-proto", "https")
            .send();
        async move {
            let echo: Value = request.await.unwrap().json().await.unwrap();
            header_values(&echo, "x-forwarded-proto")
        }
    };
    // Anyone may write the header; by default the upstream is told the gateway's scheme.
    let app = spawn_app().await;
    assert_eq!(scheme_upstream_sees(&app).await, ["http"]);
    app.shut_down().await;
    // The test client's 127.0.0.1 as a trusted proxy that ended TLS.
    let app = spawn_app_with(|settings, _| {
        settings.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    assert_eq!(scheme_upstream_sees(&app).await, ["https"]);
    app.shut_down().await;
}

#[tokio::test]
async fn x_forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    // Not trusted (the default): a client cannot escape its quota by claiming addresses.
    let app = spawn_app_with(|_, config| config.limits.auth_ip.limit = 2).await;
    assert_eq!(login_from(&app, "203.0.113.1").await, 401);
    assert_eq!(login_from(&app, "203.0.113.2").await, 401);
    assert_eq!(login_from(&app, "203.0.113.3").await, 429);
    app.shut_down().await;

    // The test client's 127.0.0.1 as a trusted proxy: each forwarded client has its own
    // quota, and the audit log names it.
    let app = spawn_app_with(|settings, config| {
        settings.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        config.limits.auth_ip.limit = 2;
    })
    .await;
    assert_eq!(login_from(&app, "203.0.113.1").await, 401);
    assert_eq!(login_from(&app, "203.0.113.1").await, 401);
    assert_eq!(login_from(&app, "203.0.113.1").await, 429);
    // What a client wrote left of the proxy's entry is not believed.
    assert_eq!(login_from(&app, "198.51.100.9, 203.0.113.1").await, 429);
    assert_eq!(login_from(&app, "203.0.113.2").await, 401);
    // A garbled list stops at the proxy that wrote it: the proxy's own quota.
    assert_eq!(login_from(&app, "203.0.113.3, not-an-address").await, 401);
    assert_eq!(login_from(&app, "203.0.113.4:1234").await, 401);
    assert_eq!(login_from(&app, "").await, 429);
    // An IPv6 client is counted by its /64: a new address in it is no new quota.
    assert_eq!(login_from(&app, "2001:db8:7:1::1").await, 401);
    assert_eq!(login_from(&app, "2001:db8:7:1::2").await, 401);
    assert_eq!(login_from(&app, "2001:db8:7:1:ffff::3").await, 429);
    assert_eq!(login_from(&app, "2001:db8:7:2::1").await, 401);
    let database_url = app.database_url.clone();
    app.shut_down().await;

    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let ips: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT ip FROM audit_log WHERE action = 'login' AND outcome = 'failure' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let ips: Vec<&str> = ips.iter().map(|ip| ip.as_deref().unwrap_or("-")).collect();
    assert_eq!(
        ips,
        [
            "203.0.113.1",
            "203.0.113.1",
            "203.0.113.2",
            "127.0.0.1",
            "127.0.0.1",
            "2001:db8:7:1::1",
            "2001:db8:7:1::2",
            "2001:db8:7:2::1"
        ]
    );
}

#[tokio::test]
async fn cors_answers_allowed_origins_only() {
    let app = spawn_app_with(|settings, _| {
        settings.cors_allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/orders/1", app.address),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert!(allowed.status().is_success());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let refused = preflight("https://evil.example").await.unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );
    // Actual requests: the header is present for the allowed origin, with the rate-limit
    // headers exposed to scripts.
    let response = app
        .client
        .get(format!("{}/api/orders/1", app.address))
        .bearer_auth(token_for(USER, &["user"]))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(
        response.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("ratelimit")
    );
}

#[tokio::test]
async fn oversized_heads_get_431_and_oversized_bodies_413() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!("{}/api/orders/1", app.address))
        .bearer_auth(token_for(USER, &["user"]))
        .header("x-padding", "a".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    // The gateway's own answer: problem+json, with its security headers.
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let body = problem(response, 431, None).await;
    assert_eq!(body["type"], "urn:problem:header-fields-too-large");

    // The bound is the head as sent: 16 KiB passes (to authentication: no credentials), one
    // byte more does not.
    let host = app.address.trim_start_matches("http://");
    for (extra, status) in [(0, "401"), (1, "431")] {
        let head = |padding: usize| {
            format!(
                "GET /api/orders/1 HTTP/1.1\r\nhost: {host}\r\nx-padding: {}\r\n\r\n",
                "a".repeat(padding)
            )
        };
        let head = head(16 * 1024 - head(0).len() + extra);
        assert_eq!(head.len(), 16 * 1024 + extra);
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer[9..12], status.as_bytes(), "{extra} byte(s) over");
    }
    let response = app
        .client
        .post(format!("{}/auth/login", app.address))
        .header("content-type", "application/json")
        .body(format!("{{\"username\":\"{}\"}}", "a".repeat(64 * 1024)))
        .send()
        .await
        .unwrap();
    problem(response, 413, None).await;
}

#[tokio::test]
async fn gateway_answers_carry_security_headers_and_upstream_pages_keep_their_csp() {
    let app = spawn_app().await;
    let own = app
        .client
        .get(format!("{}/api/orders/1", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 401);
    for header in [
        "strict-transport-security",
        "x-content-type-options",
        "referrer-policy",
        "content-security-policy",
    ] {
        assert!(own.headers().contains_key(header), "{header}");
    }
    let proxied = app
        .get_as("/api/orders/1", &token_for(USER, &["user"]))
        .await;
    assert_eq!(proxied.status(), 200);
    assert!(proxied.headers().contains_key("strict-transport-security"));
    assert!(!proxied.headers().contains_key("content-security-policy"));
}
