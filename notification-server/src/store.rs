//! Where notifications and group membership live: PostgreSQL, or memory for one node.
//!
//! Both engines answer the same questions the same way; the integration tests run against
//! each. PostgreSQL keeps everything and is shared by every node. The memory engine keeps
//! the newest `history_per_user` notifications of each user, is lost on restart and is
//! private to its process, so it suits one node in development (as Centrifugo's memory
//! engine does).

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::{
    error::Error,
    notification::{GroupId, Notification, UserId},
};

/// Group membership listing, one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersPage {
    /// Members in id order.
    pub members: Vec<UserId>,
    /// Whether more follow the last one.
    pub more: bool,
}

/// The storage engine.
#[derive(Clone)]
pub enum Store {
    /// PostgreSQL, shared by every node.
    Postgres(PgStore),
    /// Memory, one node, not durable.
    Memory(Arc<MemoryStore>),
}

impl Store {
    /// A short name for logs and `/readyz`.
    pub fn engine(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Memory(_) => "memory",
        }
    }

    /// Persists `notification` for `users` (deduplicated by the caller).
    pub async fn insert_for_users(
        &self,
        notification: &Notification,
        users: &[UserId],
    ) -> Result<(), Error> {
        match self {
            Self::Postgres(pg) => pg.insert_for_users(notification, users).await,
            Self::Memory(memory) => {
                memory.insert(notification, users);
                Ok(())
            }
        }
    }

    /// Persists `notification` for every current member of `group`, and returns them.
    pub async fn insert_for_group(
        &self,
        notification: &Notification,
        group: &GroupId,
    ) -> Result<Vec<UserId>, Error> {
        match self {
            Self::Postgres(pg) => pg.insert_for_group(notification, group).await,
            Self::Memory(memory) => {
                let members = memory.members_of(group);
                memory.insert(notification, &members);
                Ok(members)
            }
        }
    }

    /// The newest `limit` notifications of `user` older than `before`, newest first.
    pub async fn history(
        &self,
        user: &UserId,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Notification>, Error> {
        match self {
            Self::Postgres(pg) => pg.history(user, before, limit).await,
            Self::Memory(memory) => Ok(memory.history(user, before, limit)),
        }
    }

    /// The oldest `limit` notifications of `user` newer than `after`, oldest first: what a
    /// reconnecting client missed.
    pub async fn since(
        &self,
        user: &UserId,
        after: Uuid,
        limit: usize,
    ) -> Result<Vec<Notification>, Error> {
        match self {
            Self::Postgres(pg) => pg.since(user, after, limit).await,
            Self::Memory(memory) => Ok(memory.since(user, after, limit)),
        }
    }

    /// Adds `user` to `group`; false when it already was a member.
    pub async fn add_member(&self, group: &GroupId, user: &UserId) -> Result<bool, Error> {
        match self {
            Self::Postgres(pg) => pg.add_member(group, user).await,
            Self::Memory(memory) => Ok(memory.add_member(group, user)),
        }
    }

    /// Removes `user` from `group`; false when it was not a member.
    pub async fn remove_member(&self, group: &GroupId, user: &UserId) -> Result<bool, Error> {
        match self {
            Self::Postgres(pg) => pg.remove_member(group, user).await,
            Self::Memory(memory) => Ok(memory.remove_member(group, user)),
        }
    }

    /// Members of `group` after `after`, in id order.
    pub async fn members(
        &self,
        group: &GroupId,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<MembersPage, Error> {
        match self {
            Self::Postgres(pg) => pg.members(group, after, limit).await,
            Self::Memory(memory) => Ok(memory.members(group, after, limit)),
        }
    }

    /// Whether the backend answers.
    pub async fn ping(&self) -> Result<(), Error> {
        match self {
            Self::Postgres(pg) => {
                sqlx::query("SELECT 1").execute(&pg.pool).await?;
                Ok(())
            }
            Self::Memory(_) => Ok(()),
        }
    }
}

/// The PostgreSQL engine.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects, and brings the schema up to date with the embedded migrations.
    pub async fn connect(url: &str, pool_size: u32) -> anyhow::Result<Self> {
        use anyhow::Context;
        let pool = common::database::connect(url, pool_size, None).await?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .context("database migrations failed")?;
        Ok(Self { pool })
    }

    /// The pool, for tests and EXPLAIN.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn insert_for_users(&self, n: &Notification, users: &[UserId]) -> Result<(), Error> {
        let users: Vec<&str> = users.iter().map(UserId::as_str).collect();
        // One statement, one round trip: the notification and its inbox rows commit together.
        sqlx::query(
            "WITH n AS (
                 INSERT INTO notifications (id, kind, title, message, data, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
             )
             INSERT INTO deliveries (user_id, notification_id)
             SELECT u, $1 FROM unnest($7::text[]) AS u",
        )
        .bind(n.id)
        .bind(&n.kind)
        .bind(&n.title)
        .bind(&n.message)
        .bind(n.data.clone().map(Value::Object))
        .bind(n.timestamp)
        .bind(&users)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_for_group(
        &self,
        n: &Notification,
        group: &GroupId,
    ) -> Result<Vec<UserId>, Error> {
        // Fan-out on read: the broadcast is one row, whatever the group's size, and the
        // members' histories find it through their membership intervals (ADR 0004). The
        // recipients returned for live delivery are exactly the members whose interval
        // holds this id, as history will see it.
        let rows = sqlx::query(
            "WITH n AS (
                 INSERT INTO notifications (id, kind, title, message, data, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
             ), g AS (
                 INSERT INTO group_notifications (group_id, notification_id) VALUES ($7, $1)
             )
             SELECT user_id FROM group_members
             WHERE group_id = $7 AND since_id < $1 AND (until_id IS NULL OR until_id > $1)",
        )
        .bind(n.id)
        .bind(&n.kind)
        .bind(&n.title)
        .bind(&n.message)
        .bind(n.data.clone().map(Value::Object))
        .bind(n.timestamp)
        .bind(group.as_str())
        .fetch_all(&self.pool)
        .await?;
        // Intervals do not overlap, but ids come from several nodes' clocks: never deliver twice.
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        Ok(user_ids(&rows)
            .filter(|user| seen.insert(user.clone()))
            .collect())
    }

    async fn history(
        &self,
        user: &UserId,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Notification>, Error> {
        // The newest `limit` ids of the user's inbox, merged with the newest `limit` of each
        // group over the user's membership intervals (k + 1 short backward index scans, each
        // bounded by its interval), cut to `limit`, and only then joined to the notifications.
        // Uuid::max() as the default cursor keeps one plan for the first and later pages.
        let rows = sqlx::query(
            "SELECT n.id, n.kind, n.title, n.message, n.data, n.created_at
             FROM (
                 SELECT id FROM (
                     (SELECT d.notification_id AS id FROM deliveries d
                      WHERE d.user_id = $1 AND d.notification_id < $2
                      ORDER BY d.notification_id DESC LIMIT $3)
                     UNION ALL
                     (SELECT g.notification_id
                      FROM group_members m CROSS JOIN LATERAL (
                          SELECT gn.notification_id FROM group_notifications gn
                          WHERE gn.group_id = m.group_id
                            AND gn.notification_id > m.since_id
                            AND gn.notification_id < LEAST($2, COALESCE(m.until_id, $2))
                          ORDER BY gn.notification_id DESC LIMIT $3) g
                      WHERE m.user_id = $1)
                 ) candidates
                 ORDER BY id DESC LIMIT $3
             ) newest JOIN notifications n ON n.id = newest.id
             ORDER BY n.id DESC",
        )
        .bind(user.as_str())
        .bind(before.unwrap_or(Uuid::max()))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(notification_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn since(
        &self,
        user: &UserId,
        after: Uuid,
        limit: usize,
    ) -> Result<Vec<Notification>, Error> {
        // The same, forwards: the oldest `limit` after `after`.
        let rows = sqlx::query(
            "SELECT n.id, n.kind, n.title, n.message, n.data, n.created_at
             FROM (
                 SELECT id FROM (
                     (SELECT d.notification_id AS id FROM deliveries d
                      WHERE d.user_id = $1 AND d.notification_id > $2
                      ORDER BY d.notification_id ASC LIMIT $3)
                     UNION ALL
                     (SELECT g.notification_id
                      FROM group_members m CROSS JOIN LATERAL (
                          SELECT gn.notification_id FROM group_notifications gn
                          WHERE gn.group_id = m.group_id
                            AND gn.notification_id > GREATEST($2, m.since_id)
                            AND gn.notification_id < COALESCE(m.until_id, $4)
                          ORDER BY gn.notification_id ASC LIMIT $3) g
                      WHERE m.user_id = $1)
                 ) candidates
                 ORDER BY id ASC LIMIT $3
             ) oldest JOIN notifications n ON n.id = oldest.id
             ORDER BY n.id ASC",
        )
        .bind(user.as_str())
        .bind(after)
        .bind(limit as i64)
        .bind(Uuid::max())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(notification_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn add_member(&self, group: &GroupId, user: &UserId) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO group_members (group_id, user_id, since_id) VALUES ($1, $2, $3)
             ON CONFLICT (group_id, user_id) WHERE until_id IS NULL DO NOTHING",
        )
        .bind(group.as_str())
        .bind(user.as_str())
        .bind(Uuid::now_v7())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_member(&self, group: &GroupId, user: &UserId) -> Result<bool, Error> {
        let done = sqlx::query(
            // GREATEST: another node's clock may be behind the one that recorded the join.
            "UPDATE group_members SET until_id = GREATEST($3, since_id)
             WHERE group_id = $1 AND user_id = $2 AND until_id IS NULL",
        )
        .bind(group.as_str())
        .bind(user.as_str())
        .bind(Uuid::now_v7())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn members(
        &self,
        group: &GroupId,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<MembersPage, Error> {
        let rows = sqlx::query(
            "SELECT user_id FROM group_members
             WHERE group_id = $1 AND until_id IS NULL AND user_id > $2
             ORDER BY user_id LIMIT $3",
        )
        .bind(group.as_str())
        .bind(after.map_or("", UserId::as_str))
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut members: Vec<UserId> = user_ids(&rows).collect();
        let more = members.len() > limit;
        members.truncate(limit);
        Ok(MembersPage { members, more })
    }
}

/// The user ids in the first column of `rows` (written by this service, so always valid).
fn user_ids(rows: &[sqlx::postgres::PgRow]) -> impl Iterator<Item = UserId> + '_ {
    rows.iter()
        .filter_map(|row| UserId::parse(row.get::<&str, _>(0)).ok())
}

/// A stored notification. A row that does not decode is an error (a 500 for that request),
/// not a panic that would drop the connection.
fn notification_from_row(row: &sqlx::postgres::PgRow) -> Result<Notification, sqlx::Error> {
    let data: Option<Value> = row.try_get(4)?;
    Ok(Notification {
        id: row.try_get(0)?,
        kind: row.try_get(1)?,
        title: row.try_get(2)?,
        message: row.try_get(3)?,
        data: match data {
            Some(Value::Object(map)) => Some(map),
            _ => None,
        },
        timestamp: row.try_get::<DateTime<Utc>, _>(5)?,
    })
}

/// The memory engine: bounded per-user history, membership sets.
pub struct MemoryStore {
    history_per_user: usize,
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    inbox: HashMap<UserId, VecDeque<Arc<Notification>>>,
    groups: HashMap<GroupId, BTreeSet<UserId>>,
}

impl MemoryStore {
    /// Keeps at most `history_per_user` notifications per user; older ones are dropped.
    pub fn new(history_per_user: usize) -> Self {
        Self {
            history_per_user: history_per_user.max(1),
            inner: Mutex::default(),
        }
    }

    fn insert(&self, n: &Notification, users: &[UserId]) {
        let n = Arc::new(n.clone());
        let mut inner = self.inner.lock();
        for user in users {
            let inbox = inner.inbox.entry(user.clone()).or_default();
            // Ids from one process are increasing, but keep the inbox sorted regardless.
            let at = inbox.partition_point(|have| have.id < n.id);
            if inbox.get(at).is_some_and(|have| have.id == n.id) {
                continue;
            }
            inbox.insert(at, Arc::clone(&n));
            if inbox.len() > self.history_per_user {
                inbox.pop_front();
            }
        }
    }

    fn history(&self, user: &UserId, before: Option<Uuid>, limit: usize) -> Vec<Notification> {
        let inner = self.inner.lock();
        let Some(inbox) = inner.inbox.get(user) else {
            return Vec::new();
        };
        let end = before.map_or(inbox.len(), |b| inbox.partition_point(|n| n.id < b));
        inbox
            .range(..end)
            .rev()
            .take(limit)
            .map(|n| Notification::clone(n))
            .collect()
    }

    fn since(&self, user: &UserId, after: Uuid, limit: usize) -> Vec<Notification> {
        let inner = self.inner.lock();
        let Some(inbox) = inner.inbox.get(user) else {
            return Vec::new();
        };
        let start = inbox.partition_point(|n| n.id <= after);
        inbox
            .range(start..)
            .take(limit)
            .map(|n| Notification::clone(n))
            .collect()
    }

    fn members_of(&self, group: &GroupId) -> Vec<UserId> {
        let inner = self.inner.lock();
        inner
            .groups
            .get(group)
            .map(|members| members.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn add_member(&self, group: &GroupId, user: &UserId) -> bool {
        self.inner
            .lock()
            .groups
            .entry(group.clone())
            .or_default()
            .insert(user.clone())
    }

    fn remove_member(&self, group: &GroupId, user: &UserId) -> bool {
        let mut inner = self.inner.lock();
        let Some(members) = inner.groups.get_mut(group) else {
            return false;
        };
        let removed = members.remove(user);
        if members.is_empty() {
            inner.groups.remove(group);
        }
        removed
    }

    fn members(&self, group: &GroupId, after: Option<&UserId>, limit: usize) -> MembersPage {
        let inner = self.inner.lock();
        let Some(set) = inner.groups.get(group) else {
            return MembersPage {
                members: Vec::new(),
                more: false,
            };
        };
        let mut members: Vec<UserId> = match after {
            Some(after) => set
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .take(limit + 1)
                .cloned()
                .collect(),
            None => set.iter().take(limit + 1).cloned().collect(),
        };
        let more = members.len() > limit;
        members.truncate(limit);
        MembersPage { members, more }
    }
}

#[cfg(test)]
mod tests {
    use common::storable::StorableText;

    use super::*;
    use crate::notification::Content;

    fn note(title: &str) -> Notification {
        let text = |t: &str| StorableText::parse("test", t).unwrap();
        Content {
            kind: text("t"),
            title: text(title),
            message: text("m"),
            data: None,
        }
        .into_notification()
    }

    fn user(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    #[test]
    fn memory_history_pages_newest_first_and_forgets_the_oldest() {
        let store = MemoryStore::new(3);
        let notes: Vec<Notification> = (0..5).map(|i| note(&i.to_string())).collect();
        for n in &notes {
            store.insert(n, &[user("a")]);
        }
        let titles = |v: Vec<Notification>| v.into_iter().map(|n| n.title).collect::<Vec<_>>();
        assert_eq!(titles(store.history(&user("a"), None, 10)), ["4", "3", "2"]);
        assert_eq!(
            titles(store.history(&user("a"), Some(notes[3].id), 10)),
            ["2"]
        );
        assert_eq!(titles(store.since(&user("a"), notes[2].id, 10)), ["3", "4"]);
        assert_eq!(titles(store.since(&user("a"), notes[2].id, 1)), ["3"]);
        assert!(store.history(&user("b"), None, 10).is_empty());
    }

    #[test]
    fn memory_membership_is_a_set() {
        let store = MemoryStore::new(10);
        let g = GroupId::parse("g").unwrap();
        assert!(store.add_member(&g, &user("b")));
        assert!(store.add_member(&g, &user("a")));
        assert!(!store.add_member(&g, &user("a")));
        let page = store.members(&g, None, 1);
        assert_eq!(page.members, [user("a")]);
        assert!(page.more);
        assert_eq!(store.members(&g, Some(&user("a")), 5).members, [user("b")]);
        assert!(store.remove_member(&g, &user("a")));
        assert!(!store.remove_member(&g, &user("a")));
    }
}
