//! Benchmarks of the notification-server core: encoding a notification as its WebSocket
//! frame (once per notification, whatever the number of recipients), and the hub's fan-out
//! of one frame to 5,000 subscribers (offering it to each one's bounded queue), with the
//! subscribers' queues drained between iterations as their connection tasks would.
//!
//! Run: `cargo bench -p benches --bench notification_server`.

use std::hint::black_box;

use common::storable::{StorableJson, StorableText};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use notification_server::{
    Content, UserId,
    hub::{Hub, Registration},
    notification::Frame,
};
use serde_json::json;

fn notification(data: bool) -> notification_server::Notification {
    let text = |t: &str| StorableText::parse("bench", t).unwrap();
    Content {
        kind: text("order.shipped"),
        title: text("Your order has shipped"),
        message: text("Order #12345 left the warehouse and arrives on Tuesday."),
        data: data.then(|| {
            let data = json!({ "order_id": 12345, "carrier": "DHL", "tracking": "JD014600006281", "items": [1, 2, 3] })
                .as_object()
                .cloned()
                .unwrap();
            StorableJson::parse_object("data", data).unwrap()
        }),
    }
    .into_notification()
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_encode");
    for data in [false, true] {
        let n = notification(data);
        group.bench_function(if data { "with_data" } else { "without_data" }, |b| {
            b.iter(|| Frame::encode(black_box(&n)))
        });
    }
    group.finish();
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("hub_fan_out");
    for (users, connections_per_user) in [(5_000, 1), (2_500, 2)] {
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
        let frame = Frame::encode(&notification(true));
        let subscribers = users * connections_per_user;
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::new("subscribers", format!("{users}x{connections_per_user}")),
            &ids,
            |b, ids| {
                b.iter(|| {
                    let delivered = hub.deliver(black_box(ids), &frame);
                    assert_eq!(delivered.queued, subscribers);
                    for registration in &mut registrations {
                        let _ = registration.rx.try_recv();
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, encode, fan_out);
criterion_main!(benches);
