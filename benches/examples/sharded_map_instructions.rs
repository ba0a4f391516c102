//! Runs one benchmark body of the sharded maps a fixed number of times, so that an
//! instruction counter measures it independently of the machine's load (ADR 0012).
//!
//! Criterion's wall-clock figures move with whatever else the two shared cores run; the
//! count of executed instructions does not. The setup (registering 5,000 connections,
//! signing tokens) costs far more than one iteration, so it is cancelled out by running
//! twice with different iteration counts and dividing the difference:
//!
//! ```text
//! cargo build --release -p benches --example sharded_map_instructions
//! for n in 200 400; do
//!   valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \
//!     target/release/examples/sharded_map_instructions hub_fan_out_5000x1 $n
//! done
//! # instructions per iteration = (total at 400 - total at 200) / 200
//! ```
//!
//! The bodies are those of `benches/benches/notification_server.rs` (`hub_fan_out`) and
//! `benches/benches/api_gateway.rs` (`jwt/verify_eddsa_cached`,
//! `jwt/verify_eddsa_insert_at_capacity`).

use common::storable::{StorableJson, StorableText};
use std::{
    hint::black_box,
    time::{SystemTime, UNIX_EPOCH},
};

use api_gateway::authn::TokenCache;
use notification_server::{
    Content, UserId,
    hub::{Hub, Registration},
    notification::Frame,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(case), Some(iterations)) = (args.next(), args.next()) else {
        eprintln!(
            "usage: sharded_map_instructions <hub_fan_out_5000x1|hub_fan_out_2500x2|\
             token_cache_hit|token_cache_insert_at_capacity> <iterations>"
        );
        std::process::exit(2);
    };
    let iterations: usize = iterations.parse().expect("iterations is a number");
    match case.as_str() {
        "hub_fan_out_5000x1" => hub_fan_out(5_000, 1, iterations),
        "hub_fan_out_2500x2" => hub_fan_out(2_500, 2, iterations),
        "token_cache_hit" => token_cache_hit(iterations),
        "token_cache_insert_at_capacity" => token_cache_insert_at_capacity(iterations),
        other => {
            eprintln!("unknown case {other}");
            std::process::exit(2);
        }
    }
}

/// `hub_fan_out/subscribers/{users}x{connections_per_user}`.
fn hub_fan_out(users: usize, connections_per_user: usize, iterations: usize) {
    let hub = Hub::new(256);
    let ids: Vec<UserId> = (0..users)
        .map(|u| UserId::parse(&format!("user-{u}")).unwrap())
        .collect();
    let mut registrations: Vec<Registration> = ids
        .iter()
        .flat_map(|id| {
            (0..connections_per_user)
                .map(|_| hub.register(id))
                .collect::<Vec<_>>()
        })
        .collect();
    let frame = Frame::encode(
        &Content {
            kind: StorableText::parse("kind", "order.shipped").unwrap(),
            title: StorableText::parse("title", "Your order has shipped").unwrap(),
            message: StorableText::parse(
                "message",
                "Order #12345 left the warehouse and arrives on Tuesday.",
            )
            .unwrap(),
            data: serde_json::json!({ "order_id": 12345, "carrier": "DHL", "items": [1, 2, 3] })
                .as_object()
                .cloned()
                .map(|data| StorableJson::parse_object("data", data).unwrap()),
        }
        .into_notification(),
    );
    let subscribers = users * connections_per_user;
    for _ in 0..iterations {
        let delivered = hub.deliver(black_box(&ids), &frame);
        assert_eq!(delivered.queued, subscribers);
        for registration in &mut registrations {
            let _ = registration.rx.try_recv();
        }
    }
}

/// `jwt/verify_eddsa_cached`: the token is in the cache.
fn token_cache_hit(iterations: usize) {
    let cache = token_cache(65_536);
    let token = fixture_token("0190b5e4-0000-7000-8000-000000000001");
    let now = now();
    cache.verify(&token, now).expect("valid");
    for _ in 0..iterations {
        black_box(cache.verify(black_box(&token), now).expect("valid"));
    }
}

/// `jwt/verify_eddsa_insert_at_capacity`: every token misses and is inserted into a full
/// cache, so each one verifies the signature and evicts.
fn token_cache_insert_at_capacity(iterations: usize) {
    let cache = token_cache(16);
    let tokens: Vec<String> = (0..256)
        .map(|i| fixture_token(&format!("0190b5e4-0000-7000-8000-{i:012}")))
        .collect();
    let now = now();
    for token in &tokens {
        cache.verify(token, now).expect("valid");
    }
    for token in tokens.iter().cycle().take(iterations) {
        black_box(cache.verify(black_box(token), now).expect("valid"));
    }
}

fn token_cache(capacity: usize) -> TokenCache {
    let public = include_bytes!("../../common/tests/fixtures/ed25519-public.pem");
    let mut keys = common::auth::KeySet::new();
    keys.insert_ed25519_pem("test", public)
        .expect("fixture key");
    let verifier = common::auth::Verifier::new(keys, "api-gateway", "backend-suite");
    TokenCache::new(verifier, 30, capacity)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An access token signed with the fixture key, as the gateway issues them.
fn fixture_token(sub: &str) -> String {
    let now = now();
    let claims = common::auth::Claims {
        sub: sub.into(),
        roles: vec!["user".into()],
        groups: vec![],
        iss: "api-gateway".into(),
        aud: "backend-suite".into(),
        exp: now + 3600,
        iat: now,
        nbf: None,
        jti: format!("bench-{sub}"),
    };
    let pem = include_bytes!("../../common/tests/fixtures/ed25519-private.pem");
    common::auth::Signer::ed25519_pem("test", pem)
        .and_then(|signer| signer.sign(&claims))
        .expect("cannot sign a bench token")
}
