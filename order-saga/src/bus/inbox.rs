//! The inbox: which messages a service has already applied, so a message delivered twice
//! (a relay that published and crashed before deleting its row, a consumer that committed and
//! crashed before acknowledging) is applied once.

use sqlx::PgConnection;
use uuid::Uuid;

/// Records `message_id` in the transaction `conn` is in; false when it was already there,
/// in which case the caller applies nothing and acknowledges. Call it first in the
/// transaction that applies the message, so a concurrent duplicate waits on the row lock and
/// then sees the first one's commit.
pub async fn first_delivery(conn: &mut PgConnection, message_id: Uuid) -> sqlx::Result<bool> {
    let inserted = sqlx::query("INSERT INTO inbox (message_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(message_id)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(inserted == 1)
}

/// Deletes inbox rows older than `keep`, which must be longer than any message can take to
/// be redelivered (the streams' retention); returns how many went.
pub async fn prune(pool: &sqlx::PgPool, keep: std::time::Duration) -> sqlx::Result<u64> {
    let done = sqlx::query("DELETE FROM inbox WHERE received_at < now() - $1::interval")
        .bind(format!("{} seconds", keep.as_secs()))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
