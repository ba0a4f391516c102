//! Cache-aside for report results in Redis, with versioned invalidation and single-flight.
//!
//! Each entry is stored with the versions it was computed under: the global version
//! (`<prefix>:v:all`) and, for a tenant's report, that tenant's (`<prefix>:v:t:<id>`). A
//! lookup reads the versions and the entry in one `MGET`; an entry whose versions are not the
//! current ones is a miss. A batch with events of closed days bumps the versions of its
//! tenants and the global one after it commits, so a cached answer never outlives a late
//! event. The versions are read before the report's snapshot is taken, so an entry can only be
//! tagged older than its data, never newer.
//!
//! Misses of one key are computed once per process ([`SingleFlight`]): the others wait for
//! that answer instead of each reaching PostgreSQL.
//!
//! Redis down: lookups and stores fail fast (a short response timeout), are counted, and the
//! report is computed from PostgreSQL. A failed invalidation marks the cache *dirty*: it is
//! not used until a background task has bumped the global version, which makes every entry
//! written before the outage a miss.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use prometheus_client::{
    encoding::EncodeLabelSet, metrics::counter::Counter, metrics::family::Family,
    registry::Registry,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How a request's answer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// From Redis.
    Hit,
    /// Computed here (or by a request it waited for), and stored.
    Miss,
    /// Computed without the cache: Redis is unreachable, or the cache is dirty.
    Bypass,
}

impl Outcome {
    /// For the `X-Cache` header and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
}

/// What a cached answer depends on.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// Every tenant's closed days (the enterprise report).
    All,
    /// One tenant's closed days.
    Tenant(Uuid),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

/// The cache's metrics.
#[derive(Debug, Clone, Default)]
pub struct CacheMetrics {
    lookups: Family<OutcomeLabels, Counter>,
    errors: Family<OperationLabels, Counter>,
    computations: Counter,
    joined: Counter,
    invalidations: Counter,
}

impl CacheMetrics {
    /// Registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "report_cache_lookups",
            "Report requests by how the answer was found (hit, miss, bypass)",
            metrics.lookups.clone(),
        );
        registry.register(
            "report_cache_errors",
            "Redis operations of the report cache that failed (the report was served from PostgreSQL)",
            metrics.errors.clone(),
        );
        registry.register(
            "report_computations",
            "Reports computed from PostgreSQL",
            metrics.computations.clone(),
        );
        registry.register(
            "report_single_flight_joined",
            "Report requests that waited for another request's computation of the same key",
            metrics.joined.clone(),
        );
        registry.register(
            "report_cache_invalidations",
            "Version bumps after late events changed closed days",
            metrics.invalidations.clone(),
        );
        metrics
    }

    /// Reports computed from PostgreSQL so far.
    pub fn computations(&self) -> u64 {
        self.computations.get()
    }
}

/// Settings of the cache.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Key prefix; deployments sharing a Redis differ by it.
    pub prefix: String,
    /// How long an answer that includes an open day is kept: its raw rows change with every
    /// batch, and nothing invalidates them, so this bounds how stale it may be.
    pub open_ttl: Duration,
    /// How long an answer over closed days only is kept (late events invalidate it).
    pub closed_ttl: Duration,
    /// How long a Redis operation may take before the cache is bypassed.
    pub timeout: Duration,
}

/// The report cache. Cheap to clone.
#[derive(Clone)]
pub struct ReportCache {
    inner: Arc<Inner>,
}

struct Inner {
    redis: RwLock<Option<ConnectionManager>>,
    settings: CacheSettings,
    dirty: AtomicBool,
    flights: SingleFlight,
    metrics: CacheMetrics,
}

impl ReportCache {
    /// A cache over `client`, connecting in the background (the service starts, and serves
    /// from PostgreSQL, while Redis is down), with a task that clears the dirty mark; both
    /// stop with `stop`.
    pub fn start(
        client: Option<redis::Client>,
        settings: CacheSettings,
        metrics: CacheMetrics,
        stop: CancellationToken,
    ) -> Self {
        let cache = Self {
            inner: Arc::new(Inner {
                redis: RwLock::new(None),
                settings,
                dirty: AtomicBool::new(false),
                flights: SingleFlight::default(),
                metrics,
            }),
        };
        if let Some(client) = client {
            let background = cache.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = background.keep_up(client) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
        cache
    }

    async fn keep_up(&self, client: redis::Client) {
        let timeout = self.inner.settings.timeout;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
            .set_number_of_retries(1);
        loop {
            let connected = self.inner.redis.read().is_some();
            if !connected {
                match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                    Ok(manager) => {
                        *self.inner.redis.write() = Some(manager);
                        tracing::info!("report cache connected to Redis");
                    }
                    Err(error) => tracing::debug!(%error, "report cache: Redis unreachable"),
                }
            }
            if self.inner.dirty.load(Ordering::Acquire) && self.bump(&[]).await {
                self.inner.dirty.store(false, Ordering::Release);
                tracing::info!("report cache: Redis is back; every older entry is now stale");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn connection(&self) -> Option<ConnectionManager> {
        if self.inner.dirty.load(Ordering::Acquire) {
            return None;
        }
        self.inner.redis.read().clone()
    }

    /// True while the cache is in use (Redis connected, not dirty).
    pub fn usable(&self) -> bool {
        self.connection().is_some()
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.inner.settings.prefix)
    }

    fn version_keys(&self, scope: Scope) -> Vec<String> {
        match scope {
            Scope::All => vec![self.key("v:all")],
            Scope::Tenant(id) => vec![self.key("v:all"), self.key(&format!("v:t:{id}"))],
        }
    }

    /// The answer for `name` under `scope`: from Redis when current, else computed by
    /// `compute` (once per process for concurrent misses of one key) and stored for
    /// `open_ttl` or, when `closed_only`, `closed_ttl`.
    pub async fn get_or_compute<E, F, Fut>(
        &self,
        name: &str,
        scope: Scope,
        closed_only: bool,
        compute: F,
    ) -> Result<(Bytes, Outcome), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let key = self.key(name);
        let metrics = &self.inner.metrics;
        let Some(mut redis) = self.connection() else {
            metrics
                .lookups
                .get_or_create(&OutcomeLabels { outcome: "bypass" })
                .inc();
            let body = self.compute_once(key, compute).await?;
            return Ok((body, Outcome::Bypass));
        };
        let mut keys = self.version_keys(scope);
        keys.push(key.clone());
        let found: Result<Vec<Option<Vec<u8>>>, _> =
            redis::cmd("MGET").arg(&keys).query_async(&mut redis).await;
        let (tag, cached) = match found {
            Ok(mut values) => {
                let cached = values.pop().flatten();
                (tag_of(&values), cached)
            }
            Err(error) => {
                tracing::debug!(%error, "report cache lookup failed");
                metrics
                    .errors
                    .get_or_create(&OperationLabels {
                        operation: "lookup",
                    })
                    .inc();
                metrics
                    .lookups
                    .get_or_create(&OutcomeLabels { outcome: "bypass" })
                    .inc();
                let body = self.compute_once(key, compute).await?;
                return Ok((body, Outcome::Bypass));
            }
        };
        if let Some(body) = cached.as_deref().and_then(|entry| strip_tag(entry, &tag)) {
            metrics
                .lookups
                .get_or_create(&OutcomeLabels { outcome: "hit" })
                .inc();
            return Ok((Bytes::copy_from_slice(body), Outcome::Hit));
        }
        metrics
            .lookups
            .get_or_create(&OutcomeLabels { outcome: "miss" })
            .inc();
        let ttl = if closed_only {
            self.inner.settings.closed_ttl
        } else {
            self.inner.settings.open_ttl
        };
        let store_key = key.clone();
        let body = self
            .compute_once(key, || async move {
                let body = compute().await?;
                let mut entry = Vec::with_capacity(tag.len() + 1 + body.len());
                entry.extend_from_slice(tag.as_bytes());
                entry.push(b'\n');
                entry.extend_from_slice(&body);
                let stored: Result<(), _> = redis::cmd("SET")
                    .arg(&store_key)
                    .arg(entry)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .query_async(&mut redis)
                    .await;
                if let Err(error) = stored {
                    tracing::debug!(%error, "report cache store failed");
                    metrics
                        .errors
                        .get_or_create(&OperationLabels { operation: "store" })
                        .inc();
                }
                Ok(body)
            })
            .await?;
        Ok((body, Outcome::Miss))
    }

    async fn compute_once<E, F, Fut>(&self, key: String, compute: F) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let metrics = &self.inner.metrics;
        self.inner
            .flights
            .run(
                key,
                || async {
                    metrics.computations.inc();
                    compute().await
                },
                || {
                    metrics.joined.inc();
                },
            )
            .await
    }

    /// After a commit that changed closed days of `tenants`: their versions and the global
    /// one move on, so every answer depending on them is stale. Never fails: when Redis cannot
    /// be told, the cache is marked dirty and bypassed until it can.
    pub async fn invalidate(&self, tenants: &[Uuid]) {
        self.inner.metrics.invalidations.inc();
        if !self.bump(tenants).await {
            self.inner.dirty.store(true, Ordering::Release);
            self.inner
                .metrics
                .errors
                .get_or_create(&OperationLabels {
                    operation: "invalidate",
                })
                .inc();
            tracing::warn!(
                "report cache: Redis could not be told of a change; bypassing it until it can"
            );
        }
    }

    async fn bump(&self, tenants: &[Uuid]) -> bool {
        let Some(mut redis) = self.inner.redis.read().clone() else {
            // Not connected: whatever it holds is older than this change, and it is bumped
            // by keep_up before use if it had been marked dirty.
            return false;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("INCR").arg(self.key("v:all")).ignore();
        for tenant in tenants {
            pipe.cmd("INCR")
                .arg(self.key(&format!("v:t:{tenant}")))
                .ignore();
        }
        pipe.query_async::<()>(&mut redis).await.is_ok()
    }

    /// The metrics.
    pub fn metrics(&self) -> &CacheMetrics {
        &self.inner.metrics
    }
}

fn tag_of(versions: &[Option<Vec<u8>>]) -> String {
    versions
        .iter()
        .map(|v| {
            v.as_deref()
                .map_or("0", |v| std::str::from_utf8(v).unwrap_or("?"))
        })
        .collect::<Vec<_>>()
        .join(":")
}

fn strip_tag<'a>(entry: &'a [u8], tag: &str) -> Option<&'a [u8]> {
    let split = entry.iter().position(|&b| b == b'\n')?;
    (&entry[..split] == tag.as_bytes()).then(|| &entry[split + 1..])
}

/// Concurrent computations of one key, run once: the first caller computes, the others wait
/// for its answer. A failed (or cancelled) computation is not shared: the next waiter runs
/// its own.
#[derive(Default)]
pub struct SingleFlight {
    flights: Mutex<HashMap<String, Arc<OnceCell<Bytes>>>>,
}

impl SingleFlight {
    /// `compute`'s answer for `key`, or the answer of the computation already running for it
    /// (then `joined` is called).
    pub async fn run<E, F, Fut>(
        &self,
        key: String,
        compute: F,
        joined: impl FnOnce(),
    ) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let (cell, leader) = {
            let mut flights = self.flights.lock();
            match flights.get(&key) {
                Some(cell) => (Arc::clone(cell), false),
                None => {
                    let cell = Arc::new(OnceCell::new());
                    flights.insert(key.clone(), Arc::clone(&cell));
                    (cell, true)
                }
            }
        };
        if !leader {
            joined();
        }
        let result = cell.get_or_try_init(compute).await.cloned();
        let mut flights = self.flights.lock();
        if flights.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) && cell.initialized() {
            flights.remove(&key);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test]
    async fn concurrent_misses_of_one_key_compute_once() {
        let flights = Arc::new(SingleFlight::default());
        let computed = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let mut waiting = Vec::new();
        for _ in 0..50 {
            let (flights, computed, mut released) = (
                Arc::clone(&flights),
                Arc::clone(&computed),
                released.clone(),
            );
            waiting.push(tokio::spawn(async move {
                flights
                    .run(
                        "k".to_owned(),
                        || async move {
                            computed.fetch_add(1, Ordering::SeqCst);
                            let _ = released.wait_for(|r| *r).await;
                            Ok::<_, ()>(Bytes::from_static(b"answer"))
                        },
                        || {},
                    )
                    .await
            }));
        }
        tokio::task::yield_now().await;
        release.send(true).unwrap();
        for task in waiting {
            assert_eq!(task.await.unwrap().unwrap(), "answer");
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        assert!(flights.flights.lock().is_empty());
    }

    #[tokio::test]
    async fn a_failed_computation_is_not_shared() {
        let flights = SingleFlight::default();
        let failed: Result<Bytes, &str> = flights
            .run("k".into(), || async { Err("down") }, || {})
            .await;
        assert_eq!(failed, Err("down"));
        let next: Result<Bytes, &str> = flights
            .run(
                "k".into(),
                || async { Ok(Bytes::from_static(b"ok")) },
                || {},
            )
            .await;
        assert_eq!(next.unwrap(), "ok");
    }

    #[test]
    fn an_entry_is_current_only_under_its_versions() {
        let tag = tag_of(&[Some(b"3".to_vec()), None]);
        assert_eq!(tag, "3:0");
        assert_eq!(strip_tag(b"3:0\n[1]", &tag), Some(&b"[1]"[..]));
        assert_eq!(strip_tag(b"2:0\n[1]", &tag), None);
        assert_eq!(strip_tag(b"garbage", &tag), None);
    }
}
