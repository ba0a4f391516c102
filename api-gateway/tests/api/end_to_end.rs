//! The gateway in front of the real notification-server: a user logs in at the gateway, opens
//! the notifier's WebSocket through it, and a sender's notification posted through it
//! arrives on that socket.

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

use crate::helpers::*;

#[tokio::test]
async fn a_notification_posted_through_the_gateway_arrives_on_a_socket_opened_through_it() {
    // The notifier trusts the same fixture key the test gateway signs with.
    let notifier = notification_server::startup::Application::build(
        notification_server::Settings::for_tests(),
    )
    .await
    .expect("notifier failed to build");
    let notifier_address = format!("http://127.0.0.1:{}", notifier.port());
    let (stop_notifier, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(notifier.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let app = spawn_app_with(|_, config| {
        config
            .set_targets("notifications", std::slice::from_ref(&notifier_address))
            .unwrap();
    })
    .await;
    app.add_user("ann", "correct horse battery", &["user"])
        .await;
    app.add_user("ops", "correct horse battery", &["sender"])
        .await;
    let ann = app.login_ok("ann", "correct horse battery").await;
    let ops = app.login_ok("ops", "correct horse battery").await;
    let ann_token = ann["access_token"].as_str().unwrap();
    let ann_id = subject(ann_token);

    // A browser cannot set headers on a WebSocket: the token rides in the query.
    let url = format!(
        "{}/api/notifications/v1/ws?token={ann_token}",
        app.address.replace("http://", "ws://")
    );
    let (mut socket, response) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("upgrade through the gateway failed");
    assert_eq!(response.status(), 101);
    let welcome = next_json(&mut socket).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");

    let ops_token = ops["access_token"].as_str().unwrap();
    let sent = post_note(
        &app,
        |r| r.bearer_auth(ops_token),
        &ann_id,
        "through the gateway",
    )
    .await;
    assert_eq!(sent.status(), 201, "{}", sent.text().await.unwrap());
    let frame = next_json(&mut socket).await;
    assert_eq!(frame["type"], "notification", "{frame}");
    assert_eq!(frame["notification"]["title"], "through the gateway");

    // An API key with role `sender` sends too: the notifier, which verifies a JWT itself,
    // gets one the gateway signed for the key's owner and roles.
    app.add_user("root", "correct horse battery", &["admin"])
        .await;
    let root = app.login_ok("root", "correct horse battery").await;
    let created: Value = app
        .client
        .post(format!("{}/admin/api-keys", app.address))
        .bearer_auth(root["access_token"].as_str().unwrap())
        .json(&json!({ "name": "alerts job", "roles": ["sender"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap();
    let sent = post_note(&app, |r| r.header("x-api-key", key), &ann_id, "from a key").await;
    assert_eq!(sent.status(), 201, "{}", sent.text().await.unwrap());
    let frame = next_json(&mut socket).await;
    assert_eq!(frame["notification"]["title"], "from a key", "{frame}");

    // The key opens a socket too: the notifier gets a token the gateway signed for the key's
    // owner, and the owner's notifications arrive on it.
    let mut request = format!(
        "{}/api/notifications/v1/ws",
        app.address.replace("http://", "ws://")
    )
    .into_client_request()
    .unwrap();
    request
        .headers_mut()
        .insert("x-api-key", key.parse().unwrap());
    let (mut key_socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade with an API key through the gateway failed");
    assert_eq!(response.status(), 101);
    let welcome = next_json(&mut key_socket).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let root_id = subject(root["access_token"].as_str().unwrap());
    let sent = post_note(
        &app,
        |r| r.header("x-api-key", key),
        &root_id,
        "to the key's owner",
    )
    .await;
    assert_eq!(sent.status(), 201, "{}", sent.text().await.unwrap());
    let frame = next_json(&mut key_socket).await;
    assert_eq!(
        frame["notification"]["title"], "to the key's owner",
        "{frame}"
    );

    // Ann may not send (RBAC at the gateway, before the notifier is asked).
    let refused = post_note(&app, |r| r.bearer_auth(ann_token), &ann_id, "x").await;
    problem(refused, 403, None).await;

    // Shutting the gateway down closes the tunnel.
    app.shut_down().await;
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the tunnel outlived the gateway");
    let _ = stop_notifier.send(());
}

#[tokio::test]
async fn text_postgresql_cannot_store_is_refused_by_the_notifier_and_never_opens_the_breaker() {
    // The notifier keeps history in PostgreSQL, where U+0000 in `data` used to fail.
    let mut settings = notification_server::Settings::for_tests();
    settings.database_url = Some(test_support::fresh_database("gateway_nul").await.into());
    let notifier = notification_server::startup::Application::build(settings)
        .await
        .expect("notifier failed to build");
    let notifier_address = format!("http://127.0.0.1:{}", notifier.port());
    let (stop_notifier, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(notifier.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let app = spawn_app_with(|_, config| {
        config
            .set_targets("notifications", std::slice::from_ref(&notifier_address))
            .unwrap();
    })
    .await;
    app.add_user("ops", "correct horse battery", &["sender"])
        .await;
    let ops = app.login_ok("ops", "correct horse battery").await;
    let token = ops["access_token"].as_str().unwrap();
    let url = format!("{}/api/notifications/v1/notifications", app.address);

    // More bad sends in a row than the breaker's threshold (5).
    for i in 0..7 {
        let response = app
            .client
            .post(&url)
            .bearer_auth(token)
            .json(&json!({
                "user_ids": ["someone"],
                "type": "test.note",
                "title": "bad data",
                "message": "hello",
                "data": { "nested": { "value": format!("nul\u{0}{i}") } },
            }))
            .send()
            .await
            .unwrap();
        assert!(response.headers().get("retry-after").is_none());
        let body = problem(response, 422, None).await;
        assert_eq!(body["field"], "data.nested.value", "{body}");
    }
    let sent = post_note(&app, |r| r.bearer_auth(token), "someone", "clean").await;
    assert_eq!(sent.status(), 201, "{}", sent.text().await.unwrap());
    let _ = stop_notifier.send(());
}

/// Posts a note for `user` titled `title` through the gateway, with `credentials` applied.
async fn post_note(
    app: &TestApp,
    credentials: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    user: &str,
    title: &str,
) -> reqwest::Response {
    let request = app.client.post(format!(
        "{}/api/notifications/v1/notifications",
        app.address
    ));
    credentials(request)
        .json(&json!({
            "user_ids": [user],
            "type": "test.note",
            "title": title,
            "message": "hello",
        }))
        .send()
        .await
        .unwrap()
}

fn subject(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["sub"].as_str().unwrap().to_owned()
}

async fn next_json<S>(socket: &mut S) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), socket.next())
            .await
            .expect("no frame within 5 s")
            .expect("socket closed")
            .expect("socket failed");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}
