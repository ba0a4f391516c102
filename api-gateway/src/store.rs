//! Users and refresh-token families in PostgreSQL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use common::storable::StorableText;

use crate::error::Error;

/// A user, as tokens describe them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// UUIDv7, the token's `sub`.
    pub id: Uuid,
    /// The login name.
    pub username: String,
    /// Roles, for RBAC.
    pub roles: Vec<String>,
}

/// What presenting a refresh token led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token was live: it is spent now, and the new one is stored in its family.
    Rotated {
        /// Whose family it is.
        user: User,
        /// The family.
        family_id: Uuid,
    },
    /// The token was spent moments ago and its successor is still unused: a client racing
    /// itself (two tabs refreshing at once). Refused, nothing revoked; audited with the
    /// family, so that a thief who refreshed first is on the record.
    Raced {
        /// Whose family it is.
        user_id: Uuid,
        /// The family.
        family_id: Uuid,
    },
    /// The token had been spent before: a copy is in someone else's hands. The whole family
    /// is revoked now.
    Reused {
        /// Whose family it was.
        user_id: Uuid,
        /// The family, now revoked.
        family_id: Uuid,
    },
    /// Unknown, expired, or revoked.
    Invalid,
}

/// An API key's record (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// UUIDv7.
    pub id: Uuid,
    /// The key's first characters, to recognise it in lists.
    pub prefix: String,
    /// A label.
    pub name: String,
    /// The user the key acts for.
    pub owner_id: Uuid,
    /// Roles, for RBAC.
    pub roles: Vec<String>,
    /// Its own quota (requests, window), if it has one.
    pub limit: Option<(u32, Duration)>,
    /// The admin who created it.
    pub created_by: Uuid,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key to store: everything but the id and times.
#[derive(Debug, Clone)]
pub struct NewApiKey<'a> {
    /// SHA-256 of the key.
    pub hash: &'a [u8],
    /// Its first characters.
    pub prefix: &'a str,
    /// A label.
    pub name: &'a StorableText,
    /// Whose.
    pub owner_id: Uuid,
    /// Roles.
    pub roles: &'a [String],
    /// Own quota.
    pub limit: Option<(u32, Duration)>,
    /// Creator.
    pub created_by: Uuid,
}

const API_KEY_COLUMNS: &str = "id, key_prefix, name, owner_id, roles, limit_count, \
     limit_window_ms, created_by, created_at, revoked_at";

fn api_key(row: &sqlx::postgres::PgRow) -> ApiKey {
    let count: Option<i32> = row.get(5);
    let window_ms: Option<i64> = row.get(6);
    ApiKey {
        id: row.get(0),
        prefix: row.get(1),
        name: row.get(2),
        owner_id: row.get(3),
        roles: row.get(4),
        limit: count.zip(window_ms).map(|(count, ms)| {
            (
                u32::try_from(count).unwrap_or(0),
                Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
            )
        }),
        created_by: row.get(7),
        created_at: row.get(8),
        revoked_at: row.get(9),
    }
}

/// The gateway's PostgreSQL.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects and applies the embedded migrations.
    pub async fn connect(url: &str, pool_size: u32) -> anyhow::Result<Self> {
        use anyhow::Context;
        let pool = common::database::connect(url, pool_size, None).await?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .context("database migrations failed")?;
        Ok(Self { pool })
    }

    /// Whether PostgreSQL answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Creates a user; `None` when the name is taken.
    pub async fn create_user(
        &self,
        username: &StorableText,
        password_hash: &str,
        roles: &[String],
    ) -> Result<Option<User>, Error> {
        let id = Uuid::now_v7();
        let done = sqlx::query(
            "INSERT INTO users (id, username, password_hash, roles) VALUES ($1, $2, $3, $4)
             ON CONFLICT (username) DO NOTHING",
        )
        .bind(id)
        .bind(username.as_str())
        .bind(password_hash)
        .bind(roles)
        .execute(&self.pool)
        .await?;
        Ok((done.rows_affected() == 1).then(|| User {
            id,
            username: username.to_string(),
            roles: roles.to_vec(),
        }))
    }

    /// The user named `username` and their password hash.
    pub async fn find_user(
        &self,
        username: &StorableText,
    ) -> Result<Option<(User, String)>, Error> {
        let row =
            sqlx::query("SELECT id, username, roles, password_hash FROM users WHERE username = $1")
                .bind(username.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|row| {
            (
                User {
                    id: row.get(0),
                    username: row.get(1),
                    roles: row.get(2),
                },
                row.get(3),
            )
        }))
    }

    /// Stores the first token of a new family (a login); returns the family id.
    pub async fn start_family(
        &self,
        user_id: Uuid,
        token_hash: &[u8],
        expires_at: DateTime<Utc>,
    ) -> Result<Uuid, Error> {
        let family_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::now_v7())
        .bind(family_id)
        .bind(user_id)
        .bind(token_hash)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(family_id)
    }

    /// Spends the token hashed `presented` and stores `next` in its place, atomically: of
    /// concurrent rotations of one token exactly one finds it unspent.
    ///
    /// Rotation, reuse detection and logout each hold their family's lock
    /// ([`lock_family`]) for their whole transaction. Without it a revocation (one `UPDATE`
    /// of the family, under READ COMMITTED) that ran while a rotation was inserting the
    /// successor saw only the rows committed when it started: it revoked the presented token
    /// and missed the successor, which then stayed live and went on rotating.
    pub async fn rotate(
        &self,
        presented: &[u8],
        next: &[u8],
        next_expires_at: DateTime<Utc>,
        race_grace: Duration,
    ) -> Result<Rotation, Error> {
        let mut tx = self.pool.begin().await?;
        if !lock_family(&mut tx, presented).await? {
            tx.rollback().await?;
            return Ok(Rotation::Invalid);
        }
        let next_id = Uuid::now_v7();
        // The row lock taken here makes a concurrent rotation of the same token wait, then
        // find it spent.
        let spent = sqlx::query(
            "UPDATE refresh_tokens SET spent_at = now(), replaced_by = $2
             WHERE token_hash = $1 AND spent_at IS NULL AND revoked_at IS NULL
               AND expires_at > now()
             RETURNING family_id, user_id",
        )
        .bind(presented)
        .bind(next_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = spent {
            let family_id: Uuid = row.get(0);
            let user_id: Uuid = row.get(1);
            sqlx::query(
                "INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(next_id)
            .bind(family_id)
            .bind(user_id)
            .bind(next)
            .bind(next_expires_at)
            .execute(&mut *tx)
            .await?;
            let user = sqlx::query("SELECT id, username, roles FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(Rotation::Rotated {
                user: User {
                    id: user.get(0),
                    username: user.get(1),
                    roles: user.get(2),
                },
                family_id,
            });
        }

        // Not live. Spent, revoked, expired, or unknown?
        let row = sqlx::query(
            "SELECT t.family_id, t.user_id, t.revoked_at IS NOT NULL,
                    t.spent_at IS NOT NULL AND t.spent_at > now() - make_interval(secs => $2),
                    n.spent_at IS NULL AND n.revoked_at IS NULL
             FROM refresh_tokens t LEFT JOIN refresh_tokens n ON n.id = t.replaced_by
             WHERE t.token_hash = $1 AND t.spent_at IS NOT NULL",
        )
        .bind(presented)
        .bind(race_grace.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(Rotation::Invalid);
        };
        let (family_id, user_id): (Uuid, Uuid) = (row.get(0), row.get(1));
        let revoked: bool = row.get(2);
        let recent: bool = row.get(3);
        let successor_unused: Option<bool> = row.get(4);
        if revoked {
            tx.rollback().await?;
            return Ok(Rotation::Invalid);
        }
        if recent && successor_unused == Some(true) {
            tx.rollback().await?;
            return Ok(Rotation::Raced { user_id, family_id });
        }
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL",
        )
        .bind(family_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Rotation::Reused { user_id, family_id })
    }

    /// Revokes the family of the token hashed `presented` (logout), successors being issued
    /// at this moment included (see [`Store::rotate`]). Returns the user and family when the
    /// token was known.
    pub async fn revoke_family(&self, presented: &[u8]) -> Result<Option<(Uuid, Uuid)>, Error> {
        let mut tx = self.pool.begin().await?;
        if !lock_family(&mut tx, presented).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        // A statement of its own, after the lock: its snapshot holds every committed rotation.
        let row = sqlx::query(
            "WITH t AS (SELECT family_id, user_id FROM refresh_tokens WHERE token_hash = $1),
                  r AS (UPDATE refresh_tokens SET revoked_at = now()
                        WHERE family_id = (SELECT family_id FROM t) AND revoked_at IS NULL)
             SELECT family_id, user_id FROM t",
        )
        .bind(presented)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.map(|row| (row.get(1), row.get(0))))
    }

    /// The pool, for the audit writer.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether a user with this id exists.
    pub async fn user_exists(&self, id: Uuid) -> Result<bool, Error> {
        Ok(sqlx::query("SELECT 1 FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Stores a new API key.
    pub async fn create_api_key(&self, key: NewApiKey<'_>) -> Result<ApiKey, Error> {
        let (count, window_ms) = match key.limit {
            Some((count, window)) => (
                Some(i32::try_from(count).unwrap_or(i32::MAX)),
                Some(i64::try_from(window.as_millis()).unwrap_or(i64::MAX)),
            ),
            None => (None, None),
        };
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (id, key_hash, key_prefix, name, owner_id, roles, limit_count,
                                   limit_window_ms, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(key.hash)
        .bind(key.prefix)
        .bind(key.name.as_str())
        .bind(key.owner_id)
        .bind(key.roles)
        .bind(count)
        .bind(window_ms)
        .bind(key.created_by)
        .fetch_one(&self.pool)
        .await?;
        Ok(api_key(&row))
    }

    /// The live (unrevoked) key with this hash.
    pub async fn find_api_key(&self, hash: &[u8]) -> Result<Option<ApiKey>, Error> {
        let row = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(api_key))
    }

    /// Keys in id order after `after`, at most `limit`, revoked ones included.
    pub async fn list_api_keys(
        &self,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<ApiKey>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE $1::uuid IS NULL OR id > $1
             ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(api_key).collect())
    }

    /// Revokes a key; returns its record (`None`: no such key). Revoking twice keeps the
    /// first time.
    pub async fn revoke_api_key(&self, id: Uuid) -> Result<Option<ApiKey>, Error> {
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1
             RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(api_key))
    }
}

/// The first key of the refresh-family locks (the two-key form: a key space apart from the
/// audit chain's one-key lock).
const REFRESH_FAMILY_LOCK: i32 = 0x7266_616d; // "rfam"

/// Takes, for the rest of `tx`, the lock of the family of the refresh token hashed
/// `presented`; false for a token that is not stored. The family is read without a lock
/// first, so every transaction takes the family lock before any row lock and none waits
/// for the other in a cycle.
async fn lock_family(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    presented: &[u8],
) -> Result<bool, Error> {
    let family: Option<Uuid> =
        sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
            .bind(presented)
            .fetch_optional(&mut **tx)
            .await?;
    let Some(family) = family else {
        return Ok(false);
    };
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2::uuid::text))")
        .bind(REFRESH_FAMILY_LOCK)
        .bind(family)
        .execute(&mut **tx)
        .await?;
    Ok(true)
}
