//! Several real notifier processes sharing one PostgreSQL and one Redis.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use test_support::{PrivateRedis, free_port::free_port};

use crate::helpers::*;

/// A notifier process.
struct Node {
    child: Child,
    app: TestApp,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real binary; reads its port from the `listening` log line.
async fn start_node(database_url: &str, redis_url: &str, prefix: &str) -> Node {
    let key = format!(
        "{}/../common/tests/fixtures/ed25519-public.pem",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_notification-server"))
        .env_clear()
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", database_url)
        .env("REDIS_URL", redis_url)
        .env("REDIS_PREFIX", prefix)
        .env("JWT_ED25519_PUBLIC_KEY_FILE", key)
        .env("JWT_KEY_ID", "test")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot start notification-server");
    let stdout = child.stdout.take().unwrap();
    let port = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("the node exited before listening")
                .unwrap();
            if let Some(at) = line.find("\"addr\":\"127.0.0.1:") {
                let rest = &line[at + "\"addr\":\"127.0.0.1:".len()..];
                break rest[..rest.find('"').unwrap()].parse::<u16>().unwrap();
            }
        };
        // Keep draining so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        port
    })
    .await
    .unwrap();
    let app = TestApp::remote(port);
    Node { child, app }
}

#[tokio::test]
async fn a_notification_accepted_by_one_node_reaches_connections_on_every_node() {
    let database = fresh_database().await;
    let prefix = fresh_prefix();
    let a = start_node(&database, &test_redis_url(), &prefix).await;
    let b = start_node(&database, &test_redis_url(), &prefix).await;

    let mut alice_on_a = a.app.connect("alice").await;
    let mut alice_on_b = b.app.connect("alice").await;
    let mut bob_on_b = b.app.connect("bob").await;

    // Sent through A: reaches Alice on both nodes and Bob on B, once each.
    let id = a.app.send(&["alice", "bob"], "cross-node").await;
    for client in [&mut alice_on_a, &mut alice_on_b, &mut bob_on_b] {
        assert_eq!(client.next_notification().await["id"], id.as_str());
    }
    // A group broadcast through B reaches A's member.
    b.app.join("ops", "alice").await;
    let (id, recipients) = b.app.broadcast("ops", "page").await;
    assert_eq!(recipients, 1);
    assert_eq!(alice_on_a.next_notification().await["id"], id.as_str());
    assert_eq!(alice_on_b.next_notification().await["id"], id.as_str());
    bob_on_b.expect_silence().await;
    alice_on_a.expect_silence().await;

    // History is shared: recovery on B covers what was sent through A.
    drop(alice_on_b);
    let first = a.app.send(&["alice"], "while away").await;
    let mut back = b.app.reconnect("alice", &id).await;
    assert_eq!(back.next_notification().await["id"], first.as_str());
    assert_eq!(back.next_json().await["type"], "recovered");
}

#[tokio::test]
async fn when_redis_drops_clients_are_told_to_resync_and_recover_what_they_missed() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let database = fresh_database().await;
    let prefix = fresh_prefix();
    let a = start_node(&database, &redis.url(), &prefix).await;
    let b = start_node(&database, &redis.url(), &prefix).await;
    let mut alice = b.app.connect("alice").await;
    let seen = a.app.send(&["alice"], "before").await;
    assert_eq!(alice.next_notification().await["id"], seen.as_str());

    redis.kill();
    assert_eq!(alice.expect_close().await, Some(4503));
    // Sends still succeed: persisted first; the publish fails and is counted.
    let missed = a.app.send(&["alice"], "during the outage").await;
    let ready = b.app.get("/readyz", None).await;
    assert_eq!(ready.status(), 503);

    let _redis = PrivateRedis::start(port);
    let mut ready = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if b.app.get("/readyz", None).await.status() == 200 {
            ready = true;
            break;
        }
    }
    assert!(ready, "the node did not resubscribe after Redis came back");
    let mut alice = b.app.reconnect("alice", &seen).await;
    assert_eq!(alice.next_notification().await["id"], missed.as_str());
    assert_eq!(alice.next_json().await["type"], "recovered");
    let live = a.app.send(&["alice"], "after").await;
    assert_eq!(alice.next_notification().await["id"], live.as_str());
    let metrics = a.app.get("/metrics", None).await.text().await.unwrap();
    assert!(
        metrics.contains("notification_server_fanout_publish_failures_total 1"),
        "{metrics}"
    );
}
