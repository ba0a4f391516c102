//! Login, refresh rotation with reuse detection, logout, JWKS.

use std::time::Duration;

use serde_json::{Value, json};

use sqlx::Connection;
use test_support::polling::poll_until;

use crate::helpers::*;

#[tokio::test]
async fn login_issues_an_access_token_that_verifies_through_the_jwks() {
    let app = spawn_app().await;
    app.add_user("ann", "correct horse battery", &["admin", "sender"])
        .await;
    let response = app.login("ann", "correct horse battery").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let pair: Value = response.json().await.unwrap();
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(pair["expires_in"], 900);
    assert_eq!(pair["refresh_token"].as_str().unwrap().len(), 43);

    // What the notifier does: fetch the JWKS, verify the token with it alone.
    let jwks = app
        .client
        .get(format!("{}/.well-known/jwks.json", app.address))
        .send()
        .await
        .unwrap();
    assert!(
        jwks.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age")
    );
    let jwks = jwks.text().await.unwrap();
    let claims = jwks_verifier(&jwks)
        .verify(
            pair["access_token"].as_str().unwrap(),
            chrono::Utc::now().timestamp(),
        )
        .unwrap();
    assert_eq!(claims.roles, ["admin", "sender"]);
    assert_eq!(
        uuid::Uuid::parse_str(&claims.sub)
            .unwrap()
            .get_version_num(),
        7
    );
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_user_get_the_same_401() {
    let app = spawn_app().await;
    app.add_user("ann", "correct horse battery", &[]).await;
    let wrong = problem(app.login("ann", "wrong").await, 401, None).await;
    let unknown = problem(app.login("nobody", "wrong").await, 401, None).await;
    assert_eq!(wrong["type"], unknown["type"]);
    assert_eq!(wrong["detail"], unknown["detail"]);
}

#[tokio::test]
async fn login_refuses_bad_bodies() {
    let app = spawn_app().await;
    for (body, status, field) in [
        (json!({ "username": "ann" }), 422, Some("password")),
        (json!({ "password": "x" }), 422, Some("username")),
        (
            json!({ "username": 7, "password": "x" }),
            422,
            Some("username"),
        ),
        (
            json!({ "username": "", "password": "x" }),
            422,
            Some("username"),
        ),
        (
            json!({ "username": "ann", "password": "x".repeat(1_025) }),
            422,
            Some("password"),
        ),
        (
            json!({ "username": "a".repeat(65), "password": "x" }),
            422,
            Some("username"),
        ),
        (
            json!({ "username": "ann", "password": "x", "admin": true }),
            422,
            Some("admin"),
        ),
        (json!(["ann", "x"]), 400, None),
    ] {
        problem(app.post("/auth/login", &body).await, status, field).await;
    }
    let raw = |body: &'static str, content_type: &'static str| {
        app.client
            .post(format!("{}/auth/login", app.address))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    problem(
        raw("{\"username\":", "application/json").await.unwrap(),
        400,
        None,
    )
    .await;
    problem(
        raw("username=ann", "application/x-www-form-urlencoded")
            .await
            .unwrap(),
        415,
        None,
    )
    .await;
    let huge = app
        .client
        .post(format!("{}/auth/login", app.address))
        .header("content-type", "application/json")
        .body(vec![b' '; 64 * 1024])
        .send()
        .await
        .unwrap();
    problem(huge, 413, None).await;
}

#[tokio::test]
async fn refresh_rotates_and_an_old_token_replayed_after_two_rotations_revokes_the_family() {
    let app = spawn_app().await;
    app.add_user("ann", "correct horse battery", &[]).await;
    let first = app.login_ok("ann", "correct horse battery").await;
    let r1 = first["refresh_token"].as_str().unwrap().to_owned();

    let second: Value = app.refresh(&r1).await.json().await.unwrap();
    let r2 = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    assert!(second["access_token"].is_string());
    let third: Value = app.refresh(&r2).await.json().await.unwrap();
    let r3 = third["refresh_token"].as_str().unwrap().to_owned();

    // Someone replays the first token: theft. Refused, and the family dies with it.
    problem(app.refresh(&r1).await, 401, None).await;
    problem(app.refresh(&r3).await, 401, None).await;
    // A new login starts a new family and works.
    let fresh = app.login_ok("ann", "correct horse battery").await;
    assert_eq!(
        app.refresh(fresh["refresh_token"].as_str().unwrap())
            .await
            .status(),
        200
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("api_gateway_refreshes_total{outcome=\"reuse_detected\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn concurrent_refreshes_of_one_token_have_exactly_one_winner() {
    let app = std::sync::Arc::new(spawn_app().await);
    app.add_user("ann", "correct horse battery", &[]).await;
    let pair = app.login_ok("ann", "correct horse battery").await;
    let token = pair["refresh_token"].as_str().unwrap().to_owned();
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let app = std::sync::Arc::clone(&app);
            let token = token.clone();
            tokio::spawn(async move {
                let response = app.refresh(&token).await;
                let status = response.status().as_u16();
                (status, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut winners = Vec::new();
    for attempt in attempts {
        let (status, body) = attempt.await.unwrap();
        match status {
            200 => winners.push(body),
            409 => assert_eq!(body["type"], "urn:problem:refresh-raced"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(winners.len(), 1);
    // The winner's pair is intact: the race revoked nothing.
    let next = winners[0]["refresh_token"].as_str().unwrap();
    assert_eq!(app.refresh(next).await.status(), 200);

    // Each loser is on the record with the user and the family, in case the winner was a
    // thief.
    let app = std::sync::Arc::into_inner(app).unwrap();
    let database_url = app.database_url.clone();
    app.shut_down().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let ann: String = sqlx::query_scalar("SELECT id::text FROM users WHERE username = 'ann'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let raced: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT subject, detail FROM audit_log WHERE action = 'refresh' AND outcome = 'raced'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(raced.len(), 7);
    for (subject, detail) in raced {
        assert_eq!(subject.as_deref(), Some(ann.as_str()));
        assert!(detail.is_some_and(|d| d.starts_with("family ")));
    }
}

/// A logout that runs while a refresh of the same family is issuing its successor revokes
/// the successor too: whichever finishes first, no token of the family is live afterwards.
/// A logout that saw only the rows committed when it started would miss the successor.
///
/// Two rounds arrange the race so that it happens for certain: the refresh is inside its
/// transaction, holding the family, when the logout arrives, and the other way round. Forty
/// more rounds send both at once and let them fall as they may.
#[tokio::test]
async fn a_logout_racing_a_refresh_leaves_no_live_token_in_the_family() {
    let app = spawn_app_with(|_, config| config.limits.auth_ip.limit = 10_000).await;
    app.add_user("ann", "correct horse battery", &[]).await;
    let (mut refreshed, mut refused) = (0, 0);

    // The race the test is about: the logout waits for the refresh's successor, then revokes it.
    let (refresh, logout) = arranged_race(&app, First::Refresh).await;
    assert_eq!(logout.status(), 204);
    assert_eq!(refresh.status(), 200, "the refresh went first");
    let body: Value = refresh.json().await.unwrap();
    let next = body["refresh_token"].as_str().unwrap();
    problem(app.refresh(next).await, 401, None).await;
    refreshed += 1;
    // And the other way: the refresh waits for the logout, then finds the family revoked.
    let (refresh, logout) = arranged_race(&app, First::Logout).await;
    assert_eq!(logout.status(), 204);
    problem(refresh, 401, None).await;
    refused += 1;

    for round in 0..40 {
        let pair = app.login_ok("ann", "correct horse battery").await;
        let token = pair["refresh_token"].as_str().unwrap().to_owned();
        let body = json!({ "refresh_token": token });
        let (refresh, logout) = tokio::join!(app.refresh(&token), app.post("/auth/logout", &body));
        assert_eq!(logout.status(), 204, "round {round}");
        match refresh.status().as_u16() {
            200 => {
                refreshed += 1;
                let body: Value = refresh.json().await.unwrap();
                let next = body["refresh_token"].as_str().unwrap();
                problem(app.refresh(next).await, 401, None).await;
            }
            401 => refused += 1,
            other => panic!("round {round}: unexpected {other}"),
        }
    }
    println!("{refreshed} refreshes finished first, {refused} logouts did");
}

/// Which request of an arranged race reaches the family first.
#[derive(Clone, Copy, Debug)]
enum First {
    Refresh,
    Logout,
}

/// Logs in, then sends a refresh and a logout of the new token so that `first` is inside its
/// transaction, holding the family lock, while the other waits for that lock; their answers
/// (refresh, logout).
///
/// How: a transaction of the test's own locks the family's token row. The request sent first
/// takes the family lock and stops at its write of that row; once the database shows it
/// waiting there, the second is sent, and once it shows that one waiting for the family lock,
/// the test's transaction ends and the two go on in that order.
async fn arranged_race(app: &TestApp, first: First) -> (reqwest::Response, reqwest::Response) {
    let pair = app.login_ok("ann", "correct horse battery").await;
    let body = json!({ "refresh_token": pair["refresh_token"] });
    let mut holder = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut observer = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut hold = holder.begin().await.unwrap();
    // Every earlier family was revoked by its logout: the live row is the new token's.
    let locked = sqlx::query("SELECT id FROM refresh_tokens WHERE revoked_at IS NULL FOR UPDATE")
        .fetch_all(&mut *hold)
        .await
        .unwrap();
    assert_eq!(locked.len(), 1, "one live refresh token");

    let send = |path: &str| {
        app.client
            .post(format!("{}{path}", app.address))
            .json(&body)
            .send()
    };
    let (first_path, second_path) = match first {
        First::Refresh => ("/auth/refresh", "/auth/logout"),
        First::Logout => ("/auth/logout", "/auth/refresh"),
    };
    let first_call = tokio::spawn(send(first_path));
    wait_for_lock_waiter(&mut observer, "%UPDATE refresh_tokens%").await;
    let second_call = tokio::spawn(send(second_path));
    wait_for_lock_waiter(&mut observer, "%pg_advisory_xact_lock%").await;
    hold.commit().await.unwrap();
    let first_response = first_call.await.unwrap().unwrap();
    let second_response = second_call.await.unwrap().unwrap();
    match first {
        First::Refresh => (first_response, second_response),
        First::Logout => (second_response, first_response),
    }
}

/// Waits until a session of this test's database waits for a lock in a statement matching
/// `statement` (a `LIKE` pattern).
async fn wait_for_lock_waiter(observer: &mut sqlx::PgConnection, statement: &str) {
    poll_until(
        &format!("a session waiting for a lock in {statement}"),
        Duration::from_secs(10),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE $1",
            )
            .bind(statement)
            .fetch_one(&mut *observer)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_spent_token_replayed_after_the_grace_period_is_theft_even_if_unused_since() {
    let app = spawn_app_with(|s, _| s.refresh_race_grace = Duration::from_millis(200)).await;
    app.add_user("ann", "correct horse battery", &[]).await;
    let pair = app.login_ok("ann", "correct horse battery").await;
    let r1 = pair["refresh_token"].as_str().unwrap().to_owned();
    let second: Value = app.refresh(&r1).await.json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    problem(app.refresh(&r1).await, 401, None).await;
    problem(
        app.refresh(second["refresh_token"].as_str().unwrap()).await,
        401,
        None,
    )
    .await;
}

#[tokio::test]
async fn logout_revokes_the_family_and_unknown_tokens_are_refused() {
    let app = spawn_app().await;
    app.add_user("ann", "correct horse battery", &[]).await;
    let pair = app.login_ok("ann", "correct horse battery").await;
    let r1 = pair["refresh_token"].as_str().unwrap().to_owned();
    let logout = app
        .post("/auth/logout", &json!({ "refresh_token": r1 }))
        .await;
    assert_eq!(logout.status(), 204);
    problem(app.refresh(&r1).await, 401, None).await;
    // Unknown tokens: refresh refuses, logout answers the same as for a known one.
    problem(app.refresh("not-a-token").await, 401, None).await;
    let logout = app
        .post("/auth/logout", &json!({ "refresh_token": "not-a-token" }))
        .await;
    assert_eq!(logout.status(), 204);
    problem(
        app.post("/auth/refresh", &json!({})).await,
        422,
        Some("refresh_token"),
    )
    .await;
}

#[tokio::test]
async fn an_expired_refresh_token_is_refused() {
    let app = spawn_app_with(|s, _| s.refresh_token_ttl = Duration::from_secs(1)).await;
    app.add_user("ann", "correct horse battery", &[]).await;
    let pair = app.login_ok("ann", "correct horse battery").await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    problem(
        app.refresh(pair["refresh_token"].as_str().unwrap()).await,
        401,
        None,
    )
    .await;
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_listener_only_and_responses_carry_security_headers() {
    let app = spawn_app().await;
    let public = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    for name in [
        "strict-transport-security",
        "x-content-type-options",
        "referrer-policy",
        "content-security-policy",
    ] {
        assert!(public.headers().contains_key(name), "{name}");
    }
    let health = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let admin = app
        .client
        .get(format!("{}/metrics", app.admin_address))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    assert!(
        admin
            .text()
            .await
            .unwrap()
            .contains("api_gateway_http_requests_total")
    );
}

#[tokio::test]
async fn when_postgresql_goes_away_login_gets_503() {
    let app = spawn_app().await;
    app.add_user("ann", "correct horse battery", &[]).await;
    let database = app.database_url.rsplit('/').next().unwrap().to_owned();
    let mut admin = sqlx::PgConnection::connect(&test_database_url())
        .await
        .unwrap();
    sqlx::Executor::execute(
        &mut admin,
        format!("DROP DATABASE {database} WITH (FORCE)").as_str(),
    )
    .await
    .unwrap();
    problem(app.login("ann", "correct horse battery").await, 503, None).await;
    let ready = app
        .client
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
}
