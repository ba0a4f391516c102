//! What clients send: pings, garbage, binary, oversized frames, floods; and clients that do
//! not read (slow consumers) or do not answer (dead peers).

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use test_support::polling::poll_until;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

#[tokio::test]
async fn bad_frames_get_an_error_frame_and_the_connection_stays_open() {
    let app = spawn_app(Engine::Memory).await;
    let mut client = app.connect("alice").await;

    client.send_text(r#"{"type":"ping","nonce":"n-1"}"#).await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "pong", "nonce": "n-1"})
    );

    for (text, code) in [
        ("not json", "malformed"),
        ("{\"type\":", "malformed"),
        ("[1,2]", "malformed"),
        (r#"{"no_type":true}"#, "malformed"),
        (r#"{"type":"subscribe","channel":"x"}"#, "unknown_type"),
        (r#"{"type":"ping","extra":1}"#, "malformed"),
    ] {
        client.send_text(text).await;
        let frame = client.next_json().await;
        assert_eq!(frame["type"], "error", "{text}");
        assert_eq!(frame["code"], code, "{text}");
    }
    client
        .stream
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(client.next_json().await["code"], "binary_unsupported");

    // Still connected and still delivering.
    let id = app.send(&["alice"], "after the garbage").await;
    assert_eq!(client.next_notification().await["id"], id.as_str());
}

#[tokio::test]
async fn a_frame_over_64_kib_closes_with_1009() {
    let app = spawn_app(Engine::Memory).await;
    let mut client = app.connect("alice").await;
    client
        .send_text(format!(
            r#"{{"type":"ping","nonce":"{}"}}"#,
            "x".repeat(70 * 1024)
        ))
        .await;
    assert_eq!(client.expect_close().await, Some(1009));
    // A frame just under the limit is fine on a new connection.
    let mut client = app.connect("alice").await;
    client
        .send_text(format!(
            r#"{{"type":"ping","nonce":"{}"}}"#,
            "x".repeat(60 * 1024)
        ))
        .await;
    assert_eq!(client.next_json().await["type"], "pong");
}

#[tokio::test]
async fn a_frame_flood_closes_with_4029() {
    let app = spawn_app_with(Engine::Memory, |s| {
        s.client_frames_per_second = 5;
        s.client_frame_burst = 20;
    })
    .await;
    let mut client = app.connect("alice").await;
    for _ in 0..100 {
        if client
            .stream
            .send(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut pongs = 0;
    let code = loop {
        match client.next().await {
            Next::Json(frame) if frame["type"] == "pong" => pongs += 1,
            Next::Json(frame) => panic!("unexpected {frame}"),
            Next::Closed(code) => break code,
        }
    };
    assert_eq!(code, Some(4029));
    assert_eq!(pongs, 20, "the burst is answered, the rest is not");
}

#[tokio::test]
async fn a_client_that_does_not_read_is_cut_off_and_others_get_everything() {
    let app = spawn_app_with(Engine::Memory, |s| {
        s.send_queue = 8;
        s.write_timeout = Duration::from_secs(30);
        s.memory_history_per_user = 10_000;
    })
    .await;
    let mut slow = app.connect("slow").await;
    let mut fast = app.connect("fast").await;

    // ~4 KB per frame: enough of them fill the socket buffers, then the slow queue.
    let big = "x".repeat(3_900);
    let sender = access_token("s", &["sender"]);
    let mut sent = 0;
    let reader = tokio::spawn(async move {
        let mut count = 0;
        while count < 3_000 {
            match fast.next_within(Duration::from_secs(10)).await {
                Some(Next::Json(frame)) if frame["type"] == "notification" => count += 1,
                other => panic!("fast client: {other:?}"),
            }
        }
        count
    });
    while sent < 3_000 {
        let body =
            json!({ "user_ids": ["slow", "fast"], "type": "bulk", "title": "t", "message": big });
        let response = app.post("/v1/notifications", Some(&sender), &body).await;
        assert_eq!(response.status(), 201);
        sent += 1;
    }
    assert_eq!(
        reader.await.unwrap(),
        3_000,
        "the fast client lost notifications"
    );
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(
        metrics.contains("notification_server_slow_consumers_total 1"),
        "{metrics}"
    );
    // The slow client drains what reached it, then gets 4008.
    let mut received = 0;
    let code = loop {
        match slow.next_within(Duration::from_secs(10)).await {
            Some(Next::Json(_)) => received += 1,
            Some(Next::Closed(code)) => break code,
            None => panic!("the slow client was not closed"),
        }
    };
    assert!(received < 3_000);
    assert_eq!(code, Some(4008));
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed_with_4002() {
    let app = spawn_app_with(Engine::Memory, |s| {
        s.heartbeat_interval = Duration::from_millis(200);
        s.heartbeat_timeout = Duration::from_millis(300);
    })
    .await;
    let mut client = app.connect("alice").await;
    // Not reading means not answering the server's ping (the client answers when it reads):
    // read only once the server has given up on the connection.
    poll_until(
        "the server to close the silent peer",
        WAIT * 2,
        async || {
            let metrics = app.get("/metrics", None).await.text().await.unwrap();
            metrics
                .contains(
                    r#"notification_server_connections_closed_total{reason="heartbeat_timeout"} 1"#,
                )
                .then_some(())
        },
    )
    .await;
    assert_eq!(client.expect_close().await, Some(4002));

    // A client that reads (and so answers pings) stays.
    let mut alive = app.connect("bob").await;
    assert!(
        alive
            .next_within(Duration::from_millis(1_200))
            .await
            .is_none()
    );
    let id = app.send(&["bob"], "still here").await;
    assert_eq!(alive.next_notification().await["id"], id.as_str());
}
