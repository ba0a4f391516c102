//! Moving messages between the services: the transactional outbox and its relay to Redis
//! Streams, the consumer-group reader with its inbox, reclaim and dead letters.
//!
//! A service changes its state and writes the message that follows from it in one local
//! transaction ([`outbox::enqueue`]); the [`outbox::Relay`] publishes committed rows and
//! deletes them. A [`consumer::Consumer`] reads its service's stream in a consumer group,
//! hands each message to the service's [`consumer::Handler`], which applies it in one
//! transaction together with its inbox row ([`inbox::first_delivery`]), and acknowledges it
//! only after that commit. Delivery is at least once; the effect is applied once.

pub mod consumer;
pub mod dead_letters;
pub mod inbox;
pub mod metrics;
pub mod outbox;

use sqlx::migrate::Migrator;

/// The outbox and inbox tables, applied into each service's schema before its own tables
/// (their versions start at 1; each service's own start at 100).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/bus");

/// Applies the bus tables and then `service`'s own migrations to the pool's schema, as one
/// list in version order, so sqlx's checks (checksums, nothing applied is missing) hold for
/// both sets together.
pub async fn migrate(pool: &sqlx::PgPool, service: &Migrator) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let migrations: Vec<_> = MIGRATOR.iter().chain(service.iter()).cloned().collect();
    let both = Migrator {
        migrations: migrations.into(),
        ..Migrator::DEFAULT
    };
    both.run(pool).await.context("database migrations failed")
}
