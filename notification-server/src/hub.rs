//! The live connections of this node, by user, and the fan-out to them.
//!
//! Users are kept in a [`DashMap`] of 64 lock shards (ADR 0012: the map sharded by hand it
//! replaced hashed each user twice). Delivering to a user takes its shard's read lock and
//! offers the shared, pre-encoded frame to each of the user's connections with `try_send`:
//! fan-out never waits on a client. A connection whose bounded queue is full is
//! a slow consumer; it is cancelled with close code 4008 and recovers through history when
//! it reconnects, while everyone else goes on receiving.

use std::sync::{
    Arc,
    atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering},
};

use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    notification::{Frame, UserId},
    protocol::close,
};

/// Lock shards of the user map: as many as a 16-core host's default would be, so
/// connection churn and fan-out rarely meet on one lock, whatever the host (ADR 0012).
const SHARDS: usize = 64;

/// What a connection's queue carries.
pub type Outbound = Arc<Frame>;

/// The hub's side of one connection.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
    close_code: AtomicU16,
}

impl Conn {
    /// Cancels the connection, recording why; the first reason wins.
    pub fn kick(&self, code: u16) {
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.cancel.cancel();
    }
}

/// What the connection task keeps: its queue and its cancellation.
#[derive(Debug)]
pub struct Registration {
    /// The hub-wide connection id.
    pub id: u64,
    /// Frames to send, in order.
    pub rx: mpsc::Receiver<Outbound>,
    /// Cancelled when the hub wants the connection closed; see [`Registration::close_code`].
    pub cancel: CancellationToken,
    conn: Arc<Conn>,
}

impl Registration {
    /// Why the hub cancelled the connection (0 when it did not).
    pub fn close_code(&self) -> u16 {
        self.conn.close_code.load(Ordering::Acquire)
    }
}

/// Counts of one delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Frames queued to connections.
    pub queued: usize,
    /// Connections cancelled because their queue was full.
    pub slow: usize,
}

/// This node's connections.
pub struct Hub {
    users: DashMap<UserId, Vec<Arc<Conn>>>,
    next_id: AtomicU64,
    connections: AtomicUsize,
    queue_capacity: usize,
    shutdown: CancellationToken,
}

impl Hub {
    /// A hub whose connections each queue at most `queue_capacity` frames.
    pub fn new(queue_capacity: usize) -> Self {
        Self {
            users: DashMap::with_shard_amount(SHARDS),
            next_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            queue_capacity: queue_capacity.max(1),
            shutdown: CancellationToken::new(),
        }
    }

    /// Adds a connection of `user`; it receives every frame delivered to the user from now on.
    pub fn register(&self, user: &UserId) -> Registration {
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = self.shutdown.child_token();
        let conn = Arc::new(Conn {
            id,
            tx,
            cancel: cancel.clone(),
            close_code: AtomicU16::new(0),
        });
        self.users
            .entry(user.clone())
            .or_default()
            .push(Arc::clone(&conn));
        self.connections.fetch_add(1, Ordering::Relaxed);
        Registration {
            id,
            rx,
            cancel,
            conn,
        }
    }

    /// Removes connection `id` of `user`.
    pub fn unregister(&self, user: &UserId, id: u64) {
        // One write lock: drop the connection, and the user with it when it was the last.
        self.users.remove_if_mut(user, |_, conns| {
            let before = conns.len();
            conns.retain(|conn| conn.id != id);
            if conns.len() < before {
                self.connections.fetch_sub(1, Ordering::Relaxed);
            }
            conns.is_empty()
        });
    }

    /// Queues `frame` to every connection of every user in `users`.
    pub fn deliver<'a>(
        &self,
        users: impl IntoIterator<Item = &'a UserId>,
        frame: &Outbound,
    ) -> Delivered {
        let mut delivered = Delivered::default();
        for user in users {
            let Some(conns) = self.users.get(user) else {
                continue;
            };
            for conn in conns.iter() {
                match conn.tx.try_send(Arc::clone(frame)) {
                    Ok(()) => delivered.queued += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        if !conn.cancel.is_cancelled() {
                            delivered.slow += 1;
                        }
                        conn.kick(close::SLOW_CONSUMER);
                    }
                    // The connection is closing; it unregisters itself.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        delivered
    }

    /// Cancels every connection with `code` (1001 on shutdown, 4503 when fan-out broke).
    pub fn kick_all(&self, code: u16) {
        for conns in self.users.iter() {
            for conn in conns.iter() {
                conn.kick(code);
            }
        }
    }

    /// Cancels every connection with 1001, and every one registered later too.
    pub fn shut_down(&self) {
        self.kick_all(close::GOING_AWAY);
        self.shutdown.cancel();
    }

    /// Whether [`Hub::shut_down`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Users with at least one open connection.
    pub fn users(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn user(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    fn frame() -> Outbound {
        Frame::from_encoded(Uuid::now_v7(), "{}".into())
    }

    #[tokio::test]
    async fn every_connection_of_a_user_gets_the_frame() {
        let hub = Hub::new(4);
        let mut a1 = hub.register(&user("a"));
        let mut a2 = hub.register(&user("a"));
        let mut b = hub.register(&user("b"));
        let f = frame();
        let delivered = hub.deliver([&user("a"), &user("nobody")], &f);
        assert_eq!(delivered, Delivered { queued: 2, slow: 0 });
        assert_eq!(a1.rx.recv().await.unwrap().id, f.id);
        assert_eq!(a2.rx.recv().await.unwrap().id, f.id);
        assert!(b.rx.try_recv().is_err());
        assert_eq!((hub.connections(), hub.users()), (3, 2));
        hub.unregister(&user("a"), a1.id);
        hub.unregister(&user("a"), a1.id);
        assert_eq!((hub.connections(), hub.users()), (2, 2));
    }

    #[tokio::test]
    async fn a_full_queue_cancels_only_that_connection() {
        let hub = Hub::new(2);
        let slow = hub.register(&user("slow"));
        let mut fast = hub.register(&user("fast"));
        let users = [user("slow"), user("fast")];
        let mut slow_count = 0;
        for _ in 0..3 {
            let delivered = hub.deliver(&users, &frame());
            slow_count += delivered.slow;
            fast.rx.recv().await.unwrap();
        }
        assert_eq!(slow_count, 1);
        assert!(slow.cancel.is_cancelled());
        assert_eq!(slow.close_code(), close::SLOW_CONSUMER);
        assert!(!fast.cancel.is_cancelled());
    }

    #[tokio::test]
    async fn shutdown_cancels_present_and_future_connections_with_1001() {
        let hub = Hub::new(2);
        let before = hub.register(&user("a"));
        hub.shut_down();
        let after = hub.register(&user("b"));
        assert_eq!(before.close_code(), close::GOING_AWAY);
        assert!(after.cancel.is_cancelled());
        assert!(hub.is_shutting_down());
    }
}
