//! The seed's interface: `send_to_users`, `broadcast_to_group`, `get_history`.
//!
//! Every send follows the same order: validate, persist (the notification and its recipients
//! in one statement), then deliver to this node's connections and publish to the others. A
//! notification is reported as sent only once it is persisted, so a client that was offline,
//! slow, or on a node that missed the publish finds it in history or recovery.

use std::{collections::HashSet, sync::Arc, time::Instant};

use uuid::Uuid;

use crate::{
    error::Result,
    fanout::RedisFanout,
    hub::Hub,
    metrics::Metrics,
    notification::{Content, Frame, GroupId, Invalid, Notification, UserId},
    store::Store,
};

/// The outcome of a send.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The notification as persisted.
    pub notification: Notification,
    /// How many users it was persisted for.
    pub recipients: usize,
}

/// One page of history.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// Newest first.
    pub notifications: Vec<Notification>,
    /// The cursor of the next (older) page, when there may be one.
    pub next_cursor: Option<Uuid>,
}

/// The notification service of one node.
pub struct Notifier {
    store: Store,
    hub: Arc<Hub>,
    fanout: Option<RedisFanout>,
    metrics: Metrics,
    max_recipients: usize,
}

impl Notifier {
    /// A notifier over `store`, delivering to `hub` and, when given, to other nodes.
    pub fn new(
        store: Store,
        hub: Arc<Hub>,
        fanout: Option<RedisFanout>,
        metrics: Metrics,
        max_recipients: usize,
    ) -> Self {
        Self {
            store,
            hub,
            fanout,
            metrics,
            max_recipients,
        }
    }

    /// The storage engine.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This node's connections.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The cross-node link, when there is one.
    pub fn fanout(&self) -> Option<&RedisFanout> {
        self.fanout.as_ref()
    }

    /// Most recipients of one `send_to_users`.
    pub fn max_recipients(&self) -> usize {
        self.max_recipients
    }

    /// Persists `content` for `users` (duplicates count once) and delivers it to every
    /// connection of theirs, on every node.
    pub async fn send_to_users(&self, users: Vec<UserId>, content: Content) -> Result<Sent> {
        content.validate()?;
        if users.is_empty() {
            return Err(Invalid::new("user_ids", "must name at least one user").into());
        }
        if users.len() > self.max_recipients {
            return Err(Invalid::new(
                "user_ids",
                format!("at most {} users per notification", self.max_recipients),
            )
            .into());
        }
        let mut seen = HashSet::with_capacity(users.len());
        let users: Vec<UserId> = users
            .into_iter()
            .filter(|u| seen.insert(u.clone()))
            .collect();
        let notification = content.into_notification();
        let started = Instant::now();
        self.store.insert_for_users(&notification, &users).await?;
        self.metrics
            .persist_duration
            .observe(started.elapsed().as_secs_f64());
        Metrics::count(&self.metrics.notifications, "users");
        self.deliver(&notification, &users).await;
        Ok(Sent {
            notification,
            recipients: users.len(),
        })
    }

    /// Persists `content` for every current member of `group` and delivers it to them.
    pub async fn broadcast_to_group(&self, group: &GroupId, content: Content) -> Result<Sent> {
        content.validate()?;
        let notification = content.into_notification();
        let started = Instant::now();
        let members = self.store.insert_for_group(&notification, group).await?;
        self.metrics
            .persist_duration
            .observe(started.elapsed().as_secs_f64());
        Metrics::count(&self.metrics.notifications, "group");
        self.deliver(&notification, &members).await;
        Ok(Sent {
            notification,
            recipients: members.len(),
        })
    }

    /// `user`'s notifications older than `cursor`, newest first.
    pub async fn get_history(
        &self,
        user: &UserId,
        limit: usize,
        cursor: Option<Uuid>,
    ) -> Result<HistoryPage> {
        let mut notifications = self.store.history(user, cursor, limit + 1).await?;
        let more = notifications.len() > limit;
        notifications.truncate(limit);
        let next_cursor = if more {
            notifications.last().map(|n| n.id)
        } else {
            None
        };
        Ok(HistoryPage {
            notifications,
            next_cursor,
        })
    }

    async fn deliver(&self, notification: &Notification, users: &[UserId]) {
        if users.is_empty() {
            return;
        }
        let frame = Frame::encode(notification);
        let delivered = self.hub.deliver(users, &frame);
        self.metrics.deliveries.inc_by(delivered.queued as u64);
        self.metrics.slow_consumers.inc_by(delivered.slow as u64);
        if let Some(fanout) = &self.fanout {
            match fanout.publish(&frame, users).await {
                Ok(()) => {
                    self.metrics.fanout_published.inc();
                }
                Err(error) => {
                    // Persisted already: other nodes' clients get it through recovery (their
                    // subscription breaks too when Redis is down, which makes them resync).
                    self.metrics.fanout_publish_failures.inc();
                    tracing::warn!(%error, id = %notification.id, "cross-node publish failed");
                }
            }
        }
    }
}
