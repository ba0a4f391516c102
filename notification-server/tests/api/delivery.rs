//! Delivery on one node, on both engines: every connection of a recipient, nobody else,
//! history newest first, recovery with no gap and no duplicate.

use std::collections::HashSet;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn every_connection_of_a_recipient_gets_it_and_nobody_else_does() {
    for engine in ENGINES {
        let app = spawn_app(engine).await;
        let mut phone = app.connect("alice").await;
        let mut laptop = app.connect("alice").await;
        let mut bob = app.connect("bob").await;
        let mut carol = app.connect("carol").await;

        let id = app.send(&["alice", "bob", "alice"], "hello").await;
        for client in [&mut phone, &mut laptop, &mut bob] {
            let n = client.next_notification().await;
            assert_eq!(n["id"], id.as_str(), "{engine:?}");
            assert_eq!(n["title"], "hello");
            assert_eq!(n["type"], "test.note");
        }
        // Named twice, delivered once.
        phone.expect_silence().await;
        carol.expect_silence().await;
    }
}

#[tokio::test]
async fn a_group_broadcast_reaches_current_members_only() {
    for engine in ENGINES {
        let app = spawn_app(engine).await;
        app.join("team", "alice").await;
        app.join("team", "bob").await;
        app.join("team", "carol").await;
        let admin = access_token("root", &["admin"]);
        assert_eq!(
            app.delete("/v1/groups/team/members/carol", &admin)
                .await
                .status(),
            204
        );
        let mut alice = app.connect("alice").await;
        let mut bob = app.connect("bob").await;
        let mut carol = app.connect("carol").await;

        let (id, recipients) = app.broadcast("team", "standup").await;
        assert_eq!(recipients, 2, "{engine:?}");
        assert_eq!(alice.next_notification().await["id"], id.as_str());
        assert_eq!(bob.next_notification().await["id"], id.as_str());
        carol.expect_silence().await;

        // Carol's history does not have it; Alice's does.
        let history: Value = app
            .get(
                "/v1/users/carol/notifications",
                Some(&access_token("carol", &[])),
            )
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(history["notifications"].as_array().unwrap().len(), 0);
        let (_, nobody) = app.broadcast("empty-group", "to no one").await;
        assert_eq!(nobody, 0);
    }
}

#[tokio::test]
async fn history_pages_newest_first_with_a_cursor() {
    for engine in ENGINES {
        let app = spawn_app(engine).await;
        let mut ids = Vec::new();
        for i in 0..7 {
            ids.push(app.send(&["dave"], &format!("n{i}")).await);
        }
        let dave = access_token("dave", &[]);
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/users/dave/notifications?limit=3&cursor={c}"),
                None => "/v1/users/dave/notifications?limit=3".into(),
            };
            let page: Value = app.get(&path, Some(&dave)).await.json().await.unwrap();
            let items = page["notifications"].as_array().unwrap();
            assert!(items.len() <= 3);
            seen.extend(items.iter().map(|n| n["id"].as_str().unwrap().to_owned()));
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        ids.reverse();
        assert_eq!(seen, ids, "{engine:?}");

        let default: Value = app
            .get("/v1/users/dave/notifications", Some(&dave))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(default["notifications"].as_array().unwrap().len(), 7);
        assert!(default["next_cursor"].is_null());
        let first = &default["notifications"][0];
        assert_eq!(first["title"], "n6");
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}

#[tokio::test]
async fn a_reconnecting_client_gets_what_it_missed_in_order_then_live_ones() {
    for engine in ENGINES {
        let app = spawn_app(engine).await;
        let mut erin = app.connect("erin").await;
        let first = app.send(&["erin"], "before").await;
        assert_eq!(erin.next_notification().await["id"], first.as_str());
        erin.close().await;

        let mut missed = Vec::new();
        for i in 0..5 {
            missed.push(app.send(&["erin"], &format!("missed {i}")).await);
        }
        let mut erin = app.reconnect("erin", &first).await;
        for id in &missed {
            assert_eq!(
                erin.next_notification().await["id"],
                id.as_str(),
                "{engine:?}"
            );
        }
        let done = erin.next_json().await;
        assert_eq!(done["type"], "recovered");
        assert_eq!(done["count"], 5);
        assert_eq!(done["complete"], true);
        let live = app.send(&["erin"], "live").await;
        assert_eq!(erin.next_notification().await["id"], live.as_str());
        erin.expect_silence().await;
    }
}

#[tokio::test]
async fn recovery_while_notifications_keep_coming_has_no_gap_and_no_duplicate() {
    for engine in ENGINES {
        let app = std::sync::Arc::new(spawn_app(engine).await);
        let mut frank = app.connect("frank").await;
        let first = app.send(&["frank"], "first").await;
        assert_eq!(frank.next_notification().await["id"], first.as_str());
        drop(frank);

        // A sender keeps going while frank reconnects.
        let sender = {
            let app = std::sync::Arc::clone(&app);
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..60 {
                    ids.push(app.send(&["frank"], &format!("m{i}")).await);
                }
                ids
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut frank = app.reconnect("frank", &first).await;
        let sent = sender.await.unwrap();
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let frame = frank.next_json().await;
            match frame["type"].as_str() {
                Some("notification") => {
                    got.push(frame["notification"]["id"].as_str().unwrap().to_owned())
                }
                Some("recovered") => {}
                _ => panic!("unexpected {frame}"),
            }
        }
        frank.expect_silence().await;
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "{engine:?}: a duplicate");
        assert_eq!(
            unique,
            sent.iter().collect::<HashSet<_>>(),
            "{engine:?}: a gap"
        );
    }
}

#[tokio::test]
async fn recovery_says_when_it_was_cut_short() {
    let app = spawn_app_with(Engine::Memory, |s| s.recovery_limit = 3).await;
    let first = app.send(&["gina"], "first").await;
    for i in 0..5 {
        app.send(&["gina"], &format!("n{i}")).await;
    }
    let mut gina = app.reconnect("gina", &first).await;
    for _ in 0..3 {
        gina.next_notification().await;
    }
    let done = gina.next_json().await;
    assert_eq!(done["type"], "recovered");
    assert_eq!(done["count"], 3);
    assert_eq!(done["complete"], false);

    // Exactly the limit missed: all of it came, so the recovery is complete.
    let third = app.send(&["hal"], "first").await;
    for i in 0..3 {
        app.send(&["hal"], &format!("n{i}")).await;
    }
    let mut hal = app.reconnect("hal", &third).await;
    for _ in 0..3 {
        hal.next_notification().await;
    }
    let done = hal.next_json().await;
    assert_eq!(done["count"], 3);
    assert_eq!(done["complete"], true);
}

#[tokio::test]
async fn group_history_follows_membership_over_time() {
    for engine in ENGINES {
        let app = spawn_app(engine).await;
        let admin = access_token("root", &["admin"]);
        let ivy = access_token("ivy", &[]);
        let titles = |page: Value| -> Vec<String> {
            page["notifications"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["title"].as_str().unwrap().to_owned())
                .collect()
        };
        app.join("club", "jon").await;
        app.broadcast("club", "before ivy joined").await;
        app.join("club", "ivy").await;
        app.broadcast("club", "while ivy was in").await;
        assert_eq!(
            app.delete("/v1/groups/club/members/ivy", &admin)
                .await
                .status(),
            204
        );
        app.broadcast("club", "after ivy left").await;
        app.join("club", "ivy").await;
        app.broadcast("club", "after ivy came back").await;
        app.send(&["ivy"], "direct").await;

        let page: Value = app
            .get("/v1/users/ivy/notifications", Some(&ivy))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            titles(page),
            ["direct", "after ivy came back", "while ivy was in"],
            "{engine:?}"
        );
        let page: Value = app
            .get(
                "/v1/users/jon/notifications",
                Some(&access_token("jon", &[])),
            )
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(titles(page).len(), 4, "{engine:?}");

        // Recovery sees the same thing as history.
        let first: Value = app
            .get(
                "/v1/users/ivy/notifications?limit=1&cursor=ffffffff-ffff-ffff-ffff-ffffffffffff",
                Some(&ivy),
            )
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(first["notifications"][0]["title"], "direct");
        let oldest: Value = app
            .get("/v1/users/ivy/notifications?limit=100", Some(&ivy))
            .await
            .json()
            .await
            .unwrap();
        let oldest_id = oldest["notifications"][2]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut client = app.reconnect("ivy", &oldest_id).await;
        assert_eq!(
            client.next_notification().await["title"],
            "after ivy came back"
        );
        assert_eq!(client.next_notification().await["title"], "direct");
        assert_eq!(client.next_json().await["count"], 2);
    }
}
