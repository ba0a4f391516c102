//! The in-process limiter: the same algorithm as Redis (`window.rs`) over a sharded map. It
//! decides alone when no Redis is configured, and stands in for Redis while it is down under
//! [`RedisDownPolicy::Local`](super::RedisDownPolicy::Local); its quotas are then per
//! replica.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::window::{Verdict, WindowState, decide};

/// Shards keep two cores from queueing on one lock; a power of two.
const SHARDS: usize = 16;
/// How often (in the limiter's clock) a shard drops keys idle for two windows.
const SWEEP_EVERY_MICROS: u64 = 10_000_000;

struct Entry {
    state: WindowState,
    window: u64,
}

#[derive(Default)]
struct Shard {
    keys: HashMap<Box<str>, Entry>,
    swept_at: u64,
}

/// Sliding-window counters in memory; memory stays bounded by the keys seen in the last two
/// windows (plus one sweep period).
pub(crate) struct LocalLimiter {
    shards: Box<[Mutex<Shard>]>,
}

impl LocalLimiter {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// Decides one request for `key` at `now` (µs); `window` in µs.
    pub(crate) fn check(&self, key: &str, now: u64, window: u64, limit: u64) -> Verdict {
        // The mask keeps the index below SHARDS, so the truncation is intended.
        #[allow(clippy::cast_possible_truncation)]
        let index = (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) as usize) & (SHARDS - 1);
        let mut shard = self.shards[index].lock();
        if now.saturating_sub(shard.swept_at) >= SWEEP_EVERY_MICROS {
            shard
                .keys
                .retain(|_, entry| now < entry.state.start.saturating_add(2 * entry.window));
            shard.swept_at = now;
        }
        let state = shard.keys.get(key).map(|entry| entry.state);
        let (verdict, next) = decide(state, now, window, limit);
        if let Some(state) = next {
            match shard.keys.get_mut(key) {
                Some(entry) => *entry = Entry { state, window },
                None => {
                    shard.keys.insert(key.into(), Entry { state, window });
                }
            }
        }
        verdict
    }

    /// Forgets every key: once Redis is back, counts made during the outage are stale, and
    /// dropping them keeps memory bounded until the next one.
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            shard.lock().keys.clear();
        }
    }

    /// Keys held, for tests of the sweep.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().keys.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_keys_are_swept() {
        let limiter = LocalLimiter::new();
        let minute = 60_000_000;
        for user in 0..1_000 {
            assert!(
                limiter
                    .check(&format!("user-{user}"), 0, minute, 10)
                    .allowed
            );
        }
        assert_eq!(limiter.len(), 1_000);
        // Two windows later every shard sweeps on its next use.
        for user in 0..256 {
            limiter.check(&format!("late-{user}"), 2 * minute, minute, 10);
        }
        assert_eq!(limiter.len(), 256);
    }
}
