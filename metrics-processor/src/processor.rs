//! The aggregation core: [`MetricsProcessor::process_event`] and
//! [`MetricsProcessor::get_aggregates`].
//!
//! # Data layout
//! Event types are spread over `shards` mutexes by a hash of the type, so two threads meet
//! on a lock only when their events share a shard; there is no global lock and no shared
//! counter on the ingest path. Each type owns a ring of minute slots (`retention` minutes
//! back plus the allowed future skew); a slot holds count, sum, min, max, a [`MinuteSketch`]
//! of values and a [`HyperLogLog`] of users. An event lands in the slot of its own minute,
//! so late events inside the window are counted where they belong, and a slot whose minute
//! has left the window is reset when its ring position comes round again: old data ages out
//! by itself, and memory per type is fixed by the ring length.
//!
//! Memory is bounded by `max_event_types × ring length × slot size`, where a slot is about
//! 100 bytes plus 1 KiB of HyperLogLog plus up to 2 × 4 KiB of sketch bins (typically
//! 1–2 KiB): see the crate README for measurements. Nothing grows with the number of users.
//!
//! A query merges, for each type, the slots inside the window into a [`WindowSketch`] and a
//! HyperLogLog, locking one type at a time so ingest waits at most one type's merge, and
//! spreading the shards over every core. Minutes older than the previous one rarely change,
//! so each type keeps the merge of those "sealed" minutes for the last four windows asked: a
//! repeated query merges one cached window plus two live minutes instead of up to sixty,
//! and a late event into a cached minute drops that type's cache (see ADR 0001 and the
//! `get_aggregates` benches for the cold and warm costs).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3Builder;

use crate::{
    clock::{Clock, SystemClock},
    ddsketch::{MinuteSketch, WindowSketch},
    event::{Event, EventType},
    hyperloglog::HyperLogLog,
};

const MINUTE_MS: i64 = 60_000;

/// The largest accepted `|value|`. Far beyond any measurement, and small enough that sums of
/// any realistic number of values stay finite (a sum that overflowed would be `inf`, which
/// JSON cannot carry).
pub const MAX_ABS_VALUE: f64 = 1e15;

/// Limits and sizes of a [`MetricsProcessor`].
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// How many minutes of data are kept and queryable.
    pub retention_minutes: u32,
    /// Distinct event types tracked at once; events of a further type are refused.
    pub max_event_types: usize,
    /// How far ahead of the clock a timestamp may be (client clock drift).
    pub max_future_skew: Duration,
    /// Lock shards; rounded up to a power of two.
    pub shards: usize,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            retention_minutes: 60,
            max_event_types: 1_000,
            max_future_skew: Duration::from_secs(60),
            shards: 64,
        }
    }
}

/// Why an event was refused. Nothing was recorded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IngestError {
    /// NaN, ±infinity, or beyond ±[`MAX_ABS_VALUE`].
    #[error("value must be a finite number within ±1e15, got {0}")]
    ValueOutOfRange(f64),
    /// Older than the oldest minute kept.
    #[error("timestamp {timestamp} is older than the {retention_minutes}-minute retention window")]
    TooOld {
        /// The event's time.
        timestamp: DateTime<Utc>,
        /// The configured retention.
        retention_minutes: u32,
    },
    /// Further ahead of the server's clock than allowed.
    #[error("timestamp {timestamp} is more than {max_skew_secs} s ahead of the server clock")]
    InFuture {
        /// The event's time.
        timestamp: DateTime<Utc>,
        /// The configured skew, in seconds.
        max_skew_secs: u64,
    },
    /// The type would exceed `max_event_types`.
    #[error(
        "{limit} distinct event types are already tracked; `{event_type}` is refused until one ages out"
    )]
    TooManyEventTypes {
        /// The refused type.
        event_type: EventType,
        /// The configured limit.
        limit: usize,
    },
}

impl IngestError {
    /// The event field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            Self::ValueOutOfRange(_) => "value",
            Self::TooOld { .. } | Self::InFuture { .. } => "timestamp",
            Self::TooManyEventTypes { .. } => "event_type",
        }
    }

    /// A short stable name, used as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ValueOutOfRange(_) => "value_out_of_range",
            Self::TooOld { .. } => "too_old",
            Self::InFuture { .. } => "in_future",
            Self::TooManyEventTypes { .. } => "event_type_limit",
        }
    }
}

/// Why a query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `minutes` is 0 or beyond the retention.
    #[error("minutes must be between 1 and {max}, got {minutes}")]
    MinutesOutOfRange {
        /// What was asked.
        minutes: u32,
        /// The retention.
        max: u32,
    },
}

/// Statistics of one event type over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeAggregate {
    /// Events counted.
    pub count: u64,
    /// Sum of values.
    pub sum: f64,
    /// Mean value.
    pub avg: f64,
    /// Smallest value (exact).
    pub min: f64,
    /// Largest value (exact).
    pub max: f64,
    /// Median, within 1 % relative error.
    pub p50: f64,
    /// 90th percentile, within 1 % relative error.
    pub p90: f64,
    /// 99th percentile, within 1 % relative error.
    pub p99: f64,
    /// Distinct users, standard error 3.25 %.
    pub distinct_users: u64,
}

/// Every event type's statistics over the last `window_minutes` minute buckets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Aggregates {
    /// The window asked for.
    pub window_minutes: u32,
    /// Start of the oldest minute bucket included.
    pub from: DateTime<Utc>,
    /// The time of the query.
    pub to: DateTime<Utc>,
    /// Statistics by event type, for types with at least one event in the window.
    pub event_types: BTreeMap<String, TypeAggregate>,
}

impl Aggregates {
    /// The seed's flat view: `"checkout.count" → 12.0`, `"checkout.p99" → 830.5`, …
    pub fn to_flat_map(&self) -> BTreeMap<String, f64> {
        let mut flat = BTreeMap::new();
        for (event_type, a) in &self.event_types {
            let stats = [
                ("count", a.count as f64),
                ("sum", a.sum),
                ("avg", a.avg),
                ("min", a.min),
                ("max", a.max),
                ("p50", a.p50),
                ("p90", a.p90),
                ("p99", a.p99),
                ("distinct_users", a.distinct_users as f64),
            ];
            for (name, value) in stats {
                flat.insert(format!("{event_type}.{name}"), value);
            }
        }
        flat
    }
}

/// One event type's minute.
#[derive(Debug, Clone)]
struct Slot {
    /// Minutes since the epoch; `EMPTY` when unused.
    minute: i64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    values: MinuteSketch,
    users: HyperLogLog,
}

impl Slot {
    const EMPTY: i64 = i64::MIN;

    fn empty() -> Self {
        Self {
            minute: Self::EMPTY,
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            values: MinuteSketch::default(),
            users: HyperLogLog::default(),
        }
    }

    /// Starts `minute` in this slot, reusing its allocations.
    fn restart(&mut self, minute: i64) {
        self.minute = minute;
        self.count = 0;
        self.sum = 0.0;
        self.min = f64::INFINITY;
        self.max = f64::NEG_INFINITY;
        self.values.clear();
        self.users.clear();
    }

    /// Empties the slot and frees its memory (for slots that aged out with no successor).
    fn release(&mut self) {
        self.minute = Self::EMPTY;
        self.count = 0;
        self.values.release();
        self.users.release();
    }

    fn heap_bytes(&self) -> usize {
        self.values.heap_bytes() + self.users.heap_bytes()
    }
}

/// How many windows each type keeps merged: enough for a dashboard that polls a few
/// windows (say 5, 15 and 60 minutes) without one evicting another.
const CACHED_WINDOWS: usize = 4;

/// One event type's ring of minutes, and merges of its sealed minutes.
#[derive(Debug)]
struct Series {
    slots: Box<[Slot]>,
    /// Merges of minutes `from..=to`, all older than the previous minute, for the last few
    /// windows asked. A query for one of them reuses it and merges only the live minutes on
    /// top; a write into a cached minute (a late event) invalidates every window holding
    /// it, so none is ever stale.
    sealed: Vec<SealedWindow>,
    /// The newest minute any cached window holds (`i64::MIN` when none), so ingest checks
    /// one number, not every window.
    sealed_to: i64,
    /// Bumped on every query, to find the least recently used window.
    queries: u64,
}

#[derive(Debug)]
struct SealedWindow {
    from: i64,
    /// `i64::MIN` once invalidated.
    to: i64,
    last_used: u64,
    window: WindowAccumulator,
}

impl Series {
    fn new(ring_len: usize) -> Self {
        Self {
            slots: vec![Slot::empty(); ring_len].into_boxed_slice(),
            sealed: Vec::new(),
            sealed_to: i64::MIN,
            queries: 0,
        }
    }

    /// Returns `false` when the slot already holds a newer minute (the event aged out while
    /// it was being processed).
    #[inline]
    fn record(&mut self, minute: i64, value: f64, user_hash: u64) -> bool {
        let ring_len = self.slots.len() as i64;
        let slot = &mut self.slots[minute.rem_euclid(ring_len) as usize];
        if slot.minute != minute {
            if slot.minute > minute && slot.minute != Slot::EMPTY {
                return false;
            }
            slot.restart(minute);
        }
        slot.count += 1;
        slot.sum += value;
        slot.min = slot.min.min(value);
        slot.max = slot.max.max(value);
        slot.values.add(value);
        slot.users.insert_hash(user_hash);
        if minute <= self.sealed_to {
            self.invalidate_from(minute);
        }
        true
    }

    /// Invalidates every cached window holding `minute` (keeping the allocations: an
    /// impossible range never matches a query).
    #[cold]
    fn invalidate_from(&mut self, minute: i64) {
        for sealed in self
            .sealed
            .iter_mut()
            .filter(|sealed| (sealed.from..=sealed.to).contains(&minute))
        {
            sealed.to = i64::MIN;
        }
        self.refresh_sealed_to();
    }

    /// Recomputes [`Series::sealed_to`] after windows were invalidated or dropped.
    fn refresh_sealed_to(&mut self) {
        self.sealed_to = self
            .sealed
            .iter()
            .map(|sealed| sealed.to)
            .max()
            .unwrap_or(i64::MIN);
    }

    /// Merges the slots of minutes `from..=to` into `window`.
    fn merge_range(&self, from: i64, to: i64, window: &mut WindowAccumulator) {
        for slot in self
            .slots
            .iter()
            .filter(|s| s.minute != Slot::EMPTY && (from..=to).contains(&s.minute))
        {
            window.count += slot.count;
            window.sum += slot.sum;
            window.min = window.min.min(slot.min);
            window.max = window.max.max(slot.max);
            window.values.merge(&slot.values);
            window.users.merge(&slot.users);
        }
    }

    /// The merge of minutes `from..=now_minute`: the sealed part from the cache when it
    /// matches (else merged and cached), then the previous and current minutes, which may
    /// still change, merged on top. Minutes after `now_minute` (events up to the allowed
    /// clock skew ahead) join the windows once their minute has come.
    fn window(&mut self, from: i64, now_minute: i64) -> WindowAccumulator {
        let sealed_to = now_minute - 2;
        if sealed_to < from {
            let mut window = WindowAccumulator::new();
            self.merge_range(from, now_minute, &mut window);
            return window;
        }
        self.queries += 1;
        let now = self.queries;
        let cached = self
            .sealed
            .iter_mut()
            .find(|sealed| sealed.from == from && sealed.to == sealed_to);
        let mut window = match cached {
            Some(sealed) => {
                sealed.last_used = now;
                sealed.window.clone()
            }
            None => {
                let mut merged = WindowAccumulator::new();
                self.merge_range(from, sealed_to, &mut merged);
                let window = merged.clone();
                let entry = SealedWindow {
                    from,
                    to: sealed_to,
                    last_used: now,
                    window: merged,
                };
                // Replace this window's stale merge, else an invalidated one, else the least
                // recently used once the cache is full.
                let victim = self
                    .sealed
                    .iter()
                    .position(|sealed| sealed.from == from || sealed.to == i64::MIN)
                    .or_else(|| {
                        (self.sealed.len() == CACHED_WINDOWS)
                            .then(|| {
                                (0..self.sealed.len()).min_by_key(|&i| self.sealed[i].last_used)
                            })
                            .flatten()
                    });
                match victim {
                    Some(index) => self.sealed[index] = entry,
                    None => self.sealed.push(entry),
                }
                self.sealed_to = self.sealed_to.max(sealed_to);
                window
            }
        };
        self.merge_range(sealed_to + 1, now_minute, &mut window);
        window
    }

    /// Frees slots older than `oldest_minute`; returns whether any slot is still live.
    fn evict_before(&mut self, oldest_minute: i64) -> bool {
        let mut live = false;
        for slot in self.slots.iter_mut() {
            if slot.minute == Slot::EMPTY {
                continue;
            }
            if slot.minute < oldest_minute {
                slot.release();
            } else {
                live = true;
            }
        }
        self.sealed.retain(|sealed| sealed.from >= oldest_minute);
        self.refresh_sealed_to();
        live
    }

    fn heap_bytes(&self) -> usize {
        let sealed: usize = self.sealed.iter().map(|s| s.window.heap_bytes()).sum();
        self.slots.iter().map(Slot::heap_bytes).sum::<usize>() + sealed
    }
}

/// A window being merged.
#[derive(Debug, Clone)]
struct WindowAccumulator {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    values: WindowSketch,
    users: HyperLogLog,
}

impl WindowAccumulator {
    fn heap_bytes(&self) -> usize {
        self.values.heap_bytes() + self.users.heap_bytes()
    }

    fn new() -> Self {
        Self {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            values: WindowSketch::default(),
            users: HyperLogLog::default(),
        }
    }

    fn finish(self) -> TypeAggregate {
        // Sketch quantiles are clamped to the exact extremes, which only improves them.
        let quantile = |q: f64| {
            self.values
                .quantile(q)
                .map_or(f64::NAN, |v| v.clamp(self.min, self.max))
        };
        TypeAggregate {
            count: self.count,
            sum: self.sum,
            avg: self.sum / self.count as f64,
            min: self.min,
            max: self.max,
            p50: quantile(0.5),
            p90: quantile(0.9),
            p99: quantile(0.99),
            distinct_users: self.users.estimate(),
        }
    }
}

/// A shard's types, padded to its own cache lines so neighbouring locks never false-share.
#[repr(align(128))]
struct Shard(Mutex<HashMap<EventType, Series, Xxh3Builder>>);

/// Thread-safe, sharded, time-bucketed aggregation of events; see the module docs.
pub struct MetricsProcessor {
    shards: Box<[Shard]>,
    shard_mask: usize,
    ring_len: usize,
    config: ProcessorConfig,
    clock: Arc<dyn Clock>,
    live_types: AtomicUsize,
}

impl std::fmt::Debug for MetricsProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsProcessor")
            .field("config", &self.config)
            .field("live_types", &self.live_event_types())
            .finish_non_exhaustive()
    }
}

impl MetricsProcessor {
    /// A processor on the wall clock.
    pub fn new(config: ProcessorConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A processor reading time from `clock`.
    pub fn with_clock(config: ProcessorConfig, clock: Arc<dyn Clock>) -> Self {
        let shard_count = config.shards.max(1).next_power_of_two();
        let skew_minutes = config
            .max_future_skew
            .as_millis()
            .div_ceil(MINUTE_MS as u128) as usize;
        let ring_len = config.retention_minutes.max(1) as usize + skew_minutes + 1;
        let shards = (0..shard_count)
            .map(|_| Shard(Mutex::new(HashMap::with_hasher(Xxh3Builder::new()))))
            .collect();
        Self {
            shards,
            shard_mask: shard_count - 1,
            ring_len,
            config,
            clock,
            live_types: AtomicUsize::new(0),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }

    /// Event types currently tracked (they hold at least one live minute or have not yet
    /// been swept by [`Self::evict_expired`]).
    pub fn live_event_types(&self) -> usize {
        self.live_types.load(Ordering::Relaxed)
    }

    /// Records `event` in its type's minute. Errors leave every aggregate unchanged.
    #[inline]
    pub fn process_event(&self, event: Event) -> Result<(), IngestError> {
        self.process_at(self.clock.now_millis(), &event)
    }

    /// Records every event, returning each refusal with its position. One clock read serves
    /// the whole batch.
    pub fn process_batch<I>(&self, events: I) -> Vec<(usize, IngestError)>
    where
        I: IntoIterator<Item = Event>,
    {
        let now = self.clock.now_millis();
        events
            .into_iter()
            .enumerate()
            .filter_map(|(index, event)| self.process_at(now, &event).err().map(|e| (index, e)))
            .collect()
    }

    fn process_at(&self, now: i64, event: &Event) -> Result<(), IngestError> {
        if !event.value.is_finite() || event.value.abs() > MAX_ABS_VALUE {
            return Err(IngestError::ValueOutOfRange(event.value));
        }
        let timestamp = event.timestamp.timestamp_millis();
        let minute = timestamp.div_euclid(MINUTE_MS);
        if minute < self.oldest_minute(now) {
            return Err(self.too_old(event));
        }
        if timestamp > now.saturating_add(self.config.max_future_skew.as_millis() as i64) {
            return Err(IngestError::InFuture {
                timestamp: event.timestamp,
                max_skew_secs: self.config.max_future_skew.as_secs(),
            });
        }
        let user_hash = xxhash_rust::xxh3::xxh3_64(event.user_id.as_str().as_bytes());
        let type_hash = xxhash_rust::xxh3::xxh3_64(event.event_type.as_str().as_bytes());
        let shard = &self.shards[(type_hash as usize) & self.shard_mask];
        let mut types = shard.0.lock();
        let recorded = match types.get_mut(&event.event_type) {
            Some(series) => series.record(minute, event.value, user_hash),
            None => {
                self.reserve_type(&event.event_type)?;
                let mut series = Series::new(self.ring_len);
                let recorded = series.record(minute, event.value, user_hash);
                types.insert(event.event_type.clone(), series);
                recorded
            }
        };
        if recorded {
            Ok(())
        } else {
            Err(self.too_old(event))
        }
    }

    fn too_old(&self, event: &Event) -> IngestError {
        IngestError::TooOld {
            timestamp: event.timestamp,
            retention_minutes: self.config.retention_minutes,
        }
    }

    /// Takes one of the `max_event_types` places, or refuses.
    fn reserve_type(&self, event_type: &EventType) -> Result<(), IngestError> {
        let limit = self.config.max_event_types;
        self.live_types
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map(drop)
            .map_err(|_| IngestError::TooManyEventTypes {
                event_type: event_type.clone(),
                limit,
            })
    }

    /// The oldest minute still inside the retention window at `now`.
    fn oldest_minute(&self, now: i64) -> i64 {
        now.div_euclid(MINUTE_MS) - i64::from(self.config.retention_minutes) + 1
    }

    /// Statistics of every event type over the last `minutes` minute buckets, the current
    /// (partial) minute included.
    pub fn get_aggregates(&self, minutes: u32) -> Result<Aggregates, QueryError> {
        // Shards are independent, so the merge runs on every core (see the get_aggregates bench).
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        self.aggregates_on(minutes, threads)
    }

    /// Merges the full retention window on the calling thread alone, so that the next
    /// [`Self::get_aggregates`] finds every type's sealed minutes merged. The background
    /// sweep calls it: spread over every core like a query, it took both of them from
    /// ingest for the length of the merge, and the paced load test's p99 showed it.
    pub fn warm_window_cache(&self) {
        let _ = self.aggregates_on(self.config.retention_minutes, 1);
    }

    fn aggregates_on(&self, minutes: u32, threads: usize) -> Result<Aggregates, QueryError> {
        let retention = self.config.retention_minutes;
        if minutes == 0 || minutes > retention {
            return Err(QueryError::MinutesOutOfRange {
                minutes,
                max: retention,
            });
        }
        let now = self.clock.now_millis();
        let now_minute = now.div_euclid(MINUTE_MS);
        let from_minute = now_minute - i64::from(minutes) + 1;
        let event_types = if threads <= 1 {
            Self::merge_shards(&self.shards, from_minute, now_minute)
                .into_iter()
                .collect()
        } else {
            self.merge_in_parallel(threads, from_minute, now_minute)
        };
        Ok(Aggregates {
            window_minutes: minutes,
            from: DateTime::from_timestamp_millis(from_minute * MINUTE_MS).unwrap_or_default(),
            to: DateTime::from_timestamp_millis(now).unwrap_or_default(),
            event_types,
        })
    }

    /// [`Self::merge_shards`] over `threads` scoped threads, each a run of shards.
    fn merge_in_parallel(
        &self,
        threads: usize,
        from_minute: i64,
        now_minute: i64,
    ) -> BTreeMap<String, TypeAggregate> {
        let chunk = self.shards.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let parts: Vec<_> = self
                .shards
                .chunks(chunk)
                .map(|shards| {
                    scope.spawn(move || Self::merge_shards(shards, from_minute, now_minute))
                })
                .collect();
            let mut all = BTreeMap::new();
            for part in parts {
                all.extend(
                    part.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                );
            }
            all
        })
    }

    /// Merges the window of every type in `shards`, locking one type at a time so ingest
    /// never waits longer than one type's merge.
    fn merge_shards(
        shards: &[Shard],
        from_minute: i64,
        now_minute: i64,
    ) -> Vec<(String, TypeAggregate)> {
        let mut merged = Vec::new();
        for shard in shards {
            let names: Vec<EventType> = shard.0.lock().keys().cloned().collect();
            for name in names {
                let window = {
                    let mut types = shard.0.lock();
                    let Some(series) = types.get_mut(&name) else {
                        continue;
                    };
                    series.window(from_minute, now_minute)
                };
                if window.count > 0 {
                    merged.push((name.as_str().to_owned(), window.finish()));
                }
            }
        }
        merged
    }

    /// Frees minutes that left the window and forgets types with none left, giving their
    /// places back to `max_event_types`. The service runs it every few seconds; ingest
    /// works without it, but idle types keep their memory and places until it runs.
    /// Returns the number of types forgotten.
    pub fn evict_expired(&self) -> usize {
        let oldest = self.oldest_minute(self.clock.now_millis());
        let mut forgotten = 0;
        for shard in self.shards.iter() {
            let mut types = shard.0.lock();
            let before = types.len();
            types.retain(|_, series| series.evict_before(oldest));
            // Give the places back while the shard is still locked, so a type forgotten here
            // and seen again at once never meets a stale count at the cap.
            let gone = before - types.len();
            self.live_types.fetch_sub(gone, Ordering::AcqRel);
            forgotten += gone;
        }
        forgotten
    }

    /// Heap bytes held by sketches, summed over every slot (for the memory analysis).
    pub fn sketch_heap_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .0
                    .lock()
                    .values()
                    .map(Series::heap_bytes)
                    .sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z, a minute boundary

    fn setup(config: ProcessorConfig) -> (Arc<ManualClock>, MetricsProcessor) {
        let clock = Arc::new(ManualClock::new(T0 + 30_000));
        let processor = MetricsProcessor::with_clock(config, clock.clone());
        (clock, processor)
    }

    fn event(at_ms: i64, user: &str, kind: &str, value: f64) -> Event {
        Event {
            timestamp: DateTime::from_timestamp_millis(at_ms).unwrap(),
            user_id: crate::UserId::parse(user).unwrap(),
            event_type: EventType::parse(kind).unwrap(),
            value,
        }
    }

    #[test]
    fn the_one_thread_merge_answers_as_the_parallel_one_and_warms_the_cache() {
        let config = ProcessorConfig::default();
        let retention = config.retention_minutes;
        let (clock, processor) = setup(config);
        // Types spread over many shards, minutes sealed and live.
        for minute in 0..5 {
            for i in 0..400 {
                let at = T0 + minute * 60_000 + i64::from(i) * 100;
                let kind = format!("type-{}", i % 40);
                processor
                    .process_event(event(at, &format!("u{i}"), &kind, f64::from(i)))
                    .unwrap();
            }
            clock.advance(60_000);
        }
        let one = processor.aggregates_on(retention, 1).unwrap();
        let parallel = processor.aggregates_on(retention, 4).unwrap();
        assert_eq!(one.event_types.len(), 40);
        assert_eq!(one, parallel);
        processor.warm_window_cache();
        assert_eq!(processor.get_aggregates(retention).unwrap(), one);
    }

    #[test]
    fn aggregates_hold_count_sum_avg_min_max_quantiles_and_users() {
        let (_, processor) = setup(ProcessorConfig::default());
        for i in 1..=100 {
            processor
                .process_event(event(
                    T0 + 1_000,
                    &format!("u{}", i % 10),
                    "checkout",
                    f64::from(i),
                ))
                .unwrap();
        }
        let aggregates = processor.get_aggregates(1).unwrap();
        let a = &aggregates.event_types["checkout"];
        assert_eq!(a.count, 100);
        assert_eq!(a.sum, 5050.0);
        assert_eq!(a.avg, 50.5);
        assert_eq!((a.min, a.max), (1.0, 100.0));
        assert!((a.p50 - 50.0).abs() <= 0.5 + 50.0 * 0.01, "p50 {}", a.p50);
        assert!((a.p90 - 90.0).abs() <= 90.0 * 0.011, "p90 {}", a.p90);
        assert!((a.p99 - 99.0).abs() <= 99.0 * 0.011, "p99 {}", a.p99);
        assert_eq!(a.distinct_users, 10);

        let flat = aggregates.to_flat_map();
        assert_eq!(flat["checkout.count"], 100.0);
        assert_eq!(flat["checkout.avg"], 50.5);
        assert_eq!(flat.len(), 9);
    }

    #[test]
    fn late_events_count_in_their_own_minute() {
        let (clock, processor) = setup(ProcessorConfig::default());
        clock.set(T0 + 10 * 60_000 + 5_000);
        processor
            .process_event(event(T0 + 10 * 60_000, "u", "login", 1.0))
            .unwrap();
        // Seven minutes late, still inside the hour.
        processor
            .process_event(event(T0 + 3 * 60_000, "u", "login", 7.0))
            .unwrap();
        let recent = processor.get_aggregates(5).unwrap();
        assert_eq!(
            recent.event_types["login"].count, 1,
            "the late event is not in the last 5 minutes"
        );
        let wider = processor.get_aggregates(8).unwrap();
        assert_eq!(wider.event_types["login"].count, 2);
        assert_eq!(wider.event_types["login"].max, 7.0);
    }

    #[test]
    fn old_data_ages_out_by_itself() {
        let (clock, processor) = setup(ProcessorConfig {
            retention_minutes: 5,
            ..ProcessorConfig::default()
        });
        processor
            .process_event(event(T0, "u", "view", 1.0))
            .unwrap();
        clock.advance(4 * 60_000);
        assert_eq!(
            processor.get_aggregates(5).unwrap().event_types["view"].count,
            1
        );
        clock.advance(60_000);
        assert!(
            processor.get_aggregates(5).unwrap().event_types.is_empty(),
            "minute 0 left the window"
        );
        // The ring position comes round again: the new minute starts from zero.
        clock.set(T0 + 7 * 60_000 * 10);
        processor
            .process_event(event(T0 + 7 * 60_000 * 10, "u", "view", 5.0))
            .unwrap();
        let a = &processor.get_aggregates(1).unwrap().event_types["view"];
        assert_eq!((a.count, a.sum), (1, 5.0));
    }

    #[test]
    fn timestamps_outside_the_window_are_refused_and_change_nothing() {
        let (clock, processor) = setup(ProcessorConfig::default());
        clock.set(T0 + 120 * 60_000);
        let too_old = processor
            .process_event(event(T0, "u", "t", 1.0))
            .unwrap_err();
        assert!(matches!(too_old, IngestError::TooOld { .. }), "{too_old:?}");
        assert_eq!(too_old.field(), "timestamp");
        let future = processor
            .process_event(event(T0 + 122 * 60_000, "u", "t", 1.0))
            .unwrap_err();
        assert!(matches!(future, IngestError::InFuture { .. }), "{future:?}");
        // Within the skew is fine.
        processor
            .process_event(event(T0 + 120 * 60_000 + 59_000, "u", "t", 1.0))
            .unwrap();
        assert_eq!(
            processor.get_aggregates(60).unwrap().event_types["t"].count,
            1
        );
        assert_eq!(
            processor.live_event_types(),
            1,
            "refused events created no type"
        );
    }

    #[test]
    fn non_finite_and_huge_values_are_refused() {
        let (_, processor) = setup(ProcessorConfig::default());
        processor
            .process_event(event(T0, "u", "edge", MAX_ABS_VALUE))
            .unwrap();
        processor
            .process_event(event(T0, "u", "edge", -MAX_ABS_VALUE))
            .unwrap();
        for value in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1.0001e15,
            -1e308,
        ] {
            let error = processor
                .process_event(event(T0, "u", "t", value))
                .unwrap_err();
            assert_eq!(error.field(), "value");
        }
        let edge = &processor.get_aggregates(60).unwrap().event_types["edge"];
        assert_eq!((edge.count, edge.sum), (2, 0.0));
    }

    #[test]
    fn the_event_type_cap_holds_until_types_age_out() {
        let (clock, processor) = setup(ProcessorConfig {
            retention_minutes: 2,
            max_event_types: 3,
            ..ProcessorConfig::default()
        });
        for kind in ["a", "b", "c"] {
            processor.process_event(event(T0, "u", kind, 1.0)).unwrap();
        }
        let error = processor
            .process_event(event(T0, "u", "d", 1.0))
            .unwrap_err();
        assert!(
            matches!(error, IngestError::TooManyEventTypes { limit: 3, .. }),
            "{error:?}"
        );
        assert_eq!(error.reason(), "event_type_limit");
        // Known types still work at the cap.
        processor.process_event(event(T0, "u", "a", 1.0)).unwrap();
        assert_eq!(processor.evict_expired(), 0, "nothing expired yet");

        clock.advance(3 * 60_000);
        assert_eq!(processor.evict_expired(), 3);
        assert_eq!(processor.live_event_types(), 0);
        assert_eq!(
            processor.sketch_heap_bytes(),
            0,
            "evicted types free their memory"
        );
        processor
            .process_event(event(T0 + 3 * 60_000, "u", "d", 1.0))
            .unwrap();
    }

    #[test]
    fn query_minutes_must_be_within_retention() {
        let (_, processor) = setup(ProcessorConfig::default());
        assert_eq!(
            processor.get_aggregates(0),
            Err(QueryError::MinutesOutOfRange {
                minutes: 0,
                max: 60
            })
        );
        assert_eq!(
            processor.get_aggregates(61),
            Err(QueryError::MinutesOutOfRange {
                minutes: 61,
                max: 60
            })
        );
        assert!(processor.get_aggregates(60).is_ok());
    }

    #[test]
    fn concurrent_ingest_loses_nothing() {
        let (_, processor) = setup(ProcessorConfig {
            shards: 4,
            ..ProcessorConfig::default()
        });
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let processor = &processor;
                scope.spawn(move || {
                    for i in 0..10_000 {
                        let kind = format!("type-{}", i % 7);
                        processor
                            .process_event(event(T0 + 1_000, &format!("u{thread}-{i}"), &kind, 1.0))
                            .unwrap();
                    }
                });
            }
        });
        let aggregates = processor.get_aggregates(1).unwrap();
        let total: u64 = aggregates.event_types.values().map(|a| a.count).sum();
        assert_eq!(total, 40_000);
        let users: u64 = aggregates
            .event_types
            .values()
            .map(|a| a.distinct_users)
            .sum();
        assert!(
            (users as f64 - 40_000.0).abs() / 40_000.0 < 3.0 * crate::hyperloglog::STANDARD_ERROR
        );
    }

    #[test]
    fn a_batch_reports_each_refusal_by_position_and_keeps_the_rest() {
        let (_, processor) = setup(ProcessorConfig::default());
        let batch = vec![
            event(T0, "u", "ok", 1.0),
            event(T0, "u", "ok", f64::NAN),
            event(T0 - 3 * 3_600_000, "u", "ok", 1.0),
            event(T0, "u", "ok", 2.0),
        ];
        let refused: Vec<usize> = processor
            .process_batch(batch)
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(refused, vec![1, 2]);
        assert_eq!(
            processor.get_aggregates(1).unwrap().event_types["ok"].count,
            2
        );
    }

    #[test]
    fn memory_per_type_does_not_grow_with_users() {
        let (_, processor) = setup(ProcessorConfig::default());
        for user in 0..1_000 {
            processor
                .process_event(event(T0, &format!("u{user}"), "t", 1.0))
                .unwrap();
        }
        let after_thousand = processor.sketch_heap_bytes();
        for user in 1_000..200_000 {
            processor
                .process_event(event(T0, &format!("u{user}"), "t", 1.0))
                .unwrap();
        }
        assert_eq!(processor.sketch_heap_bytes(), after_thousand);
    }

    #[test]
    fn cached_windows_always_equal_a_fresh_merge() {
        // Late events, minute rollovers and changing windows, each query checked against a
        // processor that replays every event and has never cached anything.
        let (clock, processor) = setup(ProcessorConfig::default());
        let mut replayed: Vec<Event> = Vec::new();
        let mut state = 17u64;
        let mut next = move |bound: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % bound
        };
        clock.set(T0 + 20 * 60_000);
        let mut queries = 0;
        for step in 0..600 {
            let now = clock.now_millis();
            match next(10) {
                0 => clock.advance(20_000 + next(60_000) as i64),
                1..=6 => {
                    // Mostly recent, sometimes up to 40 minutes late.
                    let late = if next(4) == 0 {
                        next(40 * 60_000)
                    } else {
                        next(90_000)
                    } as i64;
                    let e = event(
                        now - late,
                        &format!("u{}", next(50)),
                        &format!("t{}", next(5)),
                        next(1_000) as f64,
                    );
                    processor.process_event(e.clone()).unwrap();
                    replayed.push(e);
                }
                _ => {
                    let minutes = [1u32, 2, 3, 10, 60][next(5) as usize];
                    let fresh = MetricsProcessor::with_clock(
                        ProcessorConfig::default(),
                        Arc::new(ManualClock::new(now)),
                    );
                    for e in &replayed {
                        let _ = fresh.process_event(e.clone());
                    }
                    let cached = processor.get_aggregates(minutes).unwrap();
                    assert_eq!(
                        cached,
                        fresh.get_aggregates(minutes).unwrap(),
                        "step {step}"
                    );
                    queries += usize::from(!cached.event_types.is_empty());
                }
            }
        }
        assert!(
            queries > 50,
            "the walk must exercise non-empty windows, got {queries}"
        );
    }

    #[test]
    fn a_late_event_into_a_cached_minute_shows_up_at_once() {
        let (clock, processor) = setup(ProcessorConfig::default());
        clock.set(T0 + 10 * 60_000 + 30_000);
        for minute in 0..=10 {
            processor
                .process_event(event(T0 + minute * 60_000, "u", "t", 1.0))
                .unwrap();
        }
        assert_eq!(
            processor.get_aggregates(60).unwrap().event_types["t"].count,
            11
        );
        processor
            .process_event(event(T0 + 3 * 60_000, "late", "t", 500.0))
            .unwrap();
        let a = &processor.get_aggregates(60).unwrap().event_types["t"];
        assert_eq!((a.count, a.max, a.distinct_users), (12, 500.0, 2));
    }

    #[test]
    fn events_ahead_of_the_clock_count_once_their_minute_comes() {
        let (clock, processor) = setup(ProcessorConfig::default());
        // At 00:00:30 an event stamped 00:01:10 is accepted (within the 60 s skew) …
        processor
            .process_event(event(T0 + 70_000, "u", "early", 1.0))
            .unwrap();
        // … but no window ending now holds it yet.
        assert!(processor.get_aggregates(60).unwrap().event_types.is_empty());
        clock.set(T0 + 60_000);
        assert_eq!(
            processor.get_aggregates(1).unwrap().event_types["early"].count,
            1
        );
    }

    #[test]
    fn a_dashboard_polling_several_windows_keeps_each_one_cached() {
        let (clock, processor) = setup(ProcessorConfig::default());
        clock.set(T0 + 59 * 60_000 + 30_000);
        for minute in 0..60 {
            processor
                .process_event(event(T0 + minute * 60_000, "u", "t", 1.0))
                .unwrap();
        }
        let cached_froms = || -> Vec<i64> {
            let shard = &processor.shards
                [(xxhash_rust::xxh3::xxh3_64(b"t") as usize) & processor.shard_mask];
            let types = shard.0.lock();
            let mut froms: Vec<i64> = types
                .values()
                .flat_map(|s| s.sealed.iter().filter(|w| w.to != i64::MIN).map(|w| w.from))
                .collect();
            froms.sort_unstable();
            froms
        };
        for round in 0..3 {
            for minutes in [5, 15, 60] {
                assert_eq!(
                    processor.get_aggregates(minutes).unwrap().event_types["t"].count,
                    u64::from(minutes),
                    "round {round}"
                );
            }
        }
        let now_minute = (T0 + 59 * 60_000) / 60_000;
        assert_eq!(
            cached_froms(),
            vec![now_minute - 59, now_minute - 14, now_minute - 4]
        );
        // Two more windows: the first fills the fourth place, the second evicts the least
        // recently used, which is 5 (each round asked 5, then 15, then 60).
        for minutes in [30, 45] {
            processor.get_aggregates(minutes).unwrap();
        }
        assert_eq!(
            cached_froms(),
            vec![
                now_minute - 59,
                now_minute - 44,
                now_minute - 29,
                now_minute - 14
            ]
        );
        // A late event into minute 10 invalidates only the window that holds it (60).
        processor
            .process_event(event(T0 + 10 * 60_000, "late", "t", 1.0))
            .unwrap();
        assert_eq!(
            cached_froms(),
            vec![now_minute - 44, now_minute - 29, now_minute - 14]
        );
        assert_eq!(
            processor.get_aggregates(60).unwrap().event_types["t"].count,
            61
        );
        assert_eq!(
            processor.get_aggregates(45).unwrap().event_types["t"].count,
            45
        );
    }

    #[test]
    fn ingest_queries_eviction_and_a_moving_clock_together_lose_nothing() {
        let (clock, processor) = setup(ProcessorConfig {
            shards: 4,
            ..ProcessorConfig::default()
        });
        clock.set(T0 + 10 * 60_000);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            // The clock moves on by a second at a time, for three simulated minutes.
            scope.spawn(|| {
                for _ in 0..180 {
                    clock.advance(1_000);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            });
            // Queries of varied windows build and reuse caches the whole time …
            scope.spawn(|| {
                let mut round = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let aggregates = processor
                        .get_aggregates([1, 3, 10, 30, 60][round as usize % 5])
                        .unwrap();
                    assert!(
                        aggregates
                            .event_types
                            .values()
                            .map(|a| a.count)
                            .sum::<u64>()
                            <= 60_000
                    );
                    round += 1;
                }
            });
            // … and eviction sweeps.
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    processor.evict_expired();
                }
            });
            let ingest: Vec<_> = (0..3u64)
                .map(|thread| {
                    let (clock, processor) = (&clock, &processor);
                    scope.spawn(move || {
                        for i in 0..20_000u64 {
                            // Up to 90 s late: many land in sealed, cached minutes.
                            let late = ((i * 7_919 + thread * 104_729) % 90_000) as i64;
                            let at = clock.now_millis() - late;
                            let kind = format!("t{}", i % 20);
                            processor
                                .process_event(event(at, &format!("u{thread}-{i}"), &kind, 1.0))
                                .unwrap();
                        }
                    })
                })
                .collect();
            for handle in ingest {
                handle.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        let total: u64 = processor
            .get_aggregates(60)
            .unwrap()
            .event_types
            .values()
            .map(|a| a.count)
            .sum();
        assert_eq!(total, 60_000);
    }
}
