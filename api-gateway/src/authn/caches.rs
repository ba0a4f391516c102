//! What makes authentication cheap: tokens that verified, API keys found recently, and the
//! tokens the gateway signs for API-key callers to take upstream.
//!
//! Verifying an EdDSA signature costs tens of microseconds, more than everything else the
//! gateway does for a request, and a client sends the same token for its whole lifetime. So
//! [`TokenCache`] remembers tokens that verified, keyed by a hash of the token and compared
//! in full, until the moment the verifier itself would stop accepting them. Only successes
//! are cached: a bad token is checked (and refused) every time.
//!
//! API keys are looked up by their SHA-256; [`KeyCache`] keeps found keys for a few seconds.
//! A revocation evicts the key at once on this replica and, through Redis, on the others
//! ([`crate::revocations`]); without Redis they notice within `API_KEY_CACHE_TTL`.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::http::HeaderValue;
use common::auth::{Claims, TokenError, Verifier};
use parking_lot::Mutex;
use uuid::Uuid;

use super::hash_api_key;
use crate::{
    error::Error,
    store::{ApiKey, Store},
    tokens::TokenIssuer,
};

const SHARDS: usize = 16;

/// Token hash → (the token, its claims).
type TokenShard = HashMap<u64, (Box<str>, Arc<Claims>)>;

/// When a key was found, and the key.
type FoundKey = (Instant, Arc<ApiKey>);

/// Tokens that verified, until they would stop verifying.
///
/// Sharded by hand rather than a `DashMap`: a full shard evicts only itself, which a
/// `DashMap` cannot do without its unstable raw API, and a hit costs fewer instructions
/// (ADR 0012).
pub struct TokenCache {
    verifier: Verifier,
    leeway_secs: i64,
    shards: Box<[Mutex<TokenShard>]>,
    per_shard: usize,
    /// Seeds the token hash, so nobody outside can aim tokens at one shard.
    seed: u64,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens in front of `verifier`, whose leeway is
    /// `leeway_secs`.
    pub fn new(verifier: Verifier, leeway_secs: i64, capacity: usize) -> Self {
        Self {
            verifier,
            leeway_secs,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            seed: rand_seed(),
        }
    }

    /// The claims of `token` at `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<Arc<Claims>, TokenError> {
        // xxh3 rather than SipHash: a token is a few hundred bytes, hashed on every request.
        let hash = xxhash_rust::xxh3::xxh3_64_with_seed(token.as_bytes(), self.seed);
        let shard = &self.shards[(hash as usize) % SHARDS];
        if let Some((cached, claims)) = shard.lock().get(&hash)
            && **cached == *token
            && self.still_valid(claims, now)
        {
            return Ok(Arc::clone(claims));
        }
        let claims = Arc::new(self.verifier.verify(token, now)?);
        let mut shard = shard.lock();
        if shard.len() >= self.per_shard {
            // Cheap and rare: drop what has expired, and everything if that is not enough.
            shard.retain(|_, (_, c)| self.still_valid(c, now));
            if shard.len() >= self.per_shard {
                shard.clear();
            }
        }
        shard.insert(hash, (token.into(), Arc::clone(&claims)));
        Ok(claims)
    }

    /// Verifies without the cache (benchmarks compare).
    pub fn verify_uncached(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        self.verifier.verify(token, now)
    }

    fn still_valid(&self, claims: &Claims, now: i64) -> bool {
        // The verifier's own rules (`common::auth::Verifier::verify`).
        let not_before = claims.nbf.unwrap_or(claims.iat).max(claims.iat);
        claims.exp.saturating_add(self.leeway_secs) >= now
            && not_before.saturating_sub(self.leeway_secs) <= now
    }
}

/// A random 64-bit seed (the standard library's per-process random hash keys).
fn rand_seed() -> u64 {
    use std::hash::BuildHasher as _;
    std::hash::RandomState::new().hash_one(0x5eed_u64)
}

/// API keys found recently.
pub struct KeyCache {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], FoundKey>>,
    capacity: usize,
    /// Bumped, under the entries' lock, by every eviction. A lookup remembers what it found
    /// only if no eviction came while it waited on PostgreSQL: one that did may be the
    /// revocation of that very key, read before it committed.
    generation: AtomicU64,
}

impl KeyCache {
    /// Keeps found keys for `ttl`, at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            entries: Mutex::default(),
            capacity,
            generation: AtomicU64::new(0),
        }
    }

    /// The live key `presented` is, if any.
    pub async fn find(&self, store: &Store, presented: &str) -> Result<Option<Arc<ApiKey>>, Error> {
        let hash = hash_api_key(presented);
        let generation = {
            let entries = self.entries.lock();
            if let Some((at, key)) = entries.get(&hash)
                && at.elapsed() < self.ttl
            {
                return Ok(Some(Arc::clone(key)));
            }
            self.generation.load(Ordering::Acquire)
        };
        let Some(key) = store.find_api_key(&hash).await? else {
            self.entries.lock().remove(&hash);
            return Ok(None);
        };
        let key = Arc::new(key);
        self.remember(hash, Arc::clone(&key), generation);
        Ok(Some(key))
    }

    /// Caches `key` under `hash` unless an eviction came since `generation` was read; true
    /// when it did cache.
    fn remember(&self, hash: [u8; 32], key: Arc<ApiKey>, generation: u64) -> bool {
        let mut entries = self.entries.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return false;
        }
        if entries.len() >= self.capacity {
            entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(hash, (Instant::now(), key));
        true
    }

    /// Forgets the key `id` (after a revocation here or on another replica).
    pub fn evict(&self, id: Uuid) {
        let mut entries = self.entries.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.retain(|_, (_, key)| key.id != id);
    }

    /// Forgets every key (revocations may have been missed).
    pub fn clear(&self) {
        let mut entries = self.entries.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }
}

/// How long an access token the gateway signs for an API-key caller lives. It only ever
/// travels from the gateway to an upstream, with one request; it is reused while it has more
/// than half of this left, so a key costs one signature per half-minute per replica.
pub const KEY_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Keys whose upstream tokens are remembered, at most (then the map starts again).
const KEY_TOKENS: usize = 100_000;

/// Access tokens the gateway signs for API-key callers, so that an upstream which verifies
/// the caller's JWT itself (the notifier, through the JWKS) accepts them as it accepts users:
/// the key's owner as `sub`, the key's roles as `roles`, valid [`KEY_TOKEN_TTL`].
pub struct KeyTokens {
    issuer: Arc<TokenIssuer>,
    entries: Mutex<HashMap<Uuid, (HeaderValue, i64)>>,
}

impl KeyTokens {
    /// Tokens signed by `issuer`.
    pub fn new(issuer: Arc<TokenIssuer>) -> Self {
        Self {
            issuer,
            entries: Mutex::default(),
        }
    }

    /// `Bearer <token>` for `key`: a remembered one with more than half its life left, or a
    /// new one. None only if signing fails.
    pub fn authorization(&self, key: &ApiKey) -> Option<HeaderValue> {
        let now = chrono::Utc::now().timestamp();
        let fresh_until = KEY_TOKEN_TTL.as_secs() as i64 / 2;
        if let Some((value, exp)) = self.entries.lock().get(&key.id)
            && exp - now > fresh_until
        {
            return Some(value.clone());
        }
        let (value, exp) = self.sign(key, KEY_TOKEN_TTL)?;
        let mut entries = self.entries.lock();
        if entries.len() >= KEY_TOKENS {
            entries.clear();
        }
        entries.insert(key.id, (value.clone(), exp));
        Some(value)
    }

    /// `Bearer <token>` for a WebSocket that `key` opens: a new token that lives as long as a
    /// user's access token, because the notifier closes a socket when its token expires (4001)
    /// and a key caller, unlike a user, has no way to hand it a fresh one. It reconnects
    /// through the gateway, as a user does after refreshing. None only if signing fails.
    pub fn authorization_for_socket(&self, key: &ApiKey) -> Option<HeaderValue> {
        self.sign(key, self.issuer.access_ttl())
            .map(|(value, _)| value)
    }

    fn sign(&self, key: &ApiKey, ttl: Duration) -> Option<(HeaderValue, i64)> {
        let (token, exp) =
            match self
                .issuer
                .issue_for_key(&key.owner_id.to_string(), &key.roles, ttl)
            {
                Ok(issued) => issued,
                Err(error) => {
                    tracing::error!(%error, "signing an API-key caller's upstream token failed");
                    return None;
                }
            };
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        value.set_sensitive(true);
        Some((value, exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::auth::{KeySet, Signer};

    const PRIVATE: &[u8] = include_bytes!("../../../common/tests/fixtures/ed25519-private.pem");
    const PUBLIC: &[u8] = include_bytes!("../../../common/tests/fixtures/ed25519-public.pem");

    fn api_key() -> Arc<ApiKey> {
        Arc::new(ApiKey {
            id: Uuid::now_v7(),
            prefix: "gwk_abcd".into(),
            name: "job".into(),
            owner_id: Uuid::now_v7(),
            roles: vec!["analyst".into()],
            limit: None,
            created_by: Uuid::now_v7(),
            created_at: chrono::Utc::now(),
            revoked_at: None,
        })
    }

    #[test]
    fn a_lookup_overtaken_by_an_eviction_does_not_cache_what_it_found() {
        let keys = KeyCache::new(Duration::from_secs(300), 16);
        let (hash, key) = ([1u8; 32], api_key());
        // A lookup starts, then the key is revoked while it waits on the database.
        let seen = keys.generation.load(Ordering::Acquire);
        keys.evict(key.id);
        assert!(!keys.remember(hash, Arc::clone(&key), seen));
        assert!(keys.entries.lock().is_empty(), "the stale key was cached");
        // `clear` (a missed revocation) overtakes a lookup the same way.
        let seen = keys.generation.load(Ordering::Acquire);
        keys.clear();
        assert!(!keys.remember(hash, Arc::clone(&key), seen));
        // A lookup nothing overtook caches, and a later eviction removes it.
        let seen = keys.generation.load(Ordering::Acquire);
        assert!(keys.remember(hash, Arc::clone(&key), seen));
        assert_eq!(keys.entries.lock().len(), 1);
        keys.evict(key.id);
        assert!(keys.entries.lock().is_empty());
    }

    fn cache() -> TokenCache {
        let mut keys = KeySet::new();
        keys.insert_ed25519_pem("k", PUBLIC).unwrap();
        TokenCache::new(Verifier::new(keys, "iss", "aud"), 30, 4)
    }

    fn token(exp: i64) -> String {
        let claims = Claims {
            sub: "u".into(),
            roles: vec![],
            groups: vec![],
            iss: "iss".into(),
            aud: "aud".into(),
            exp,
            iat: exp - 900,
            nbf: None,
            jti: Uuid::now_v7().to_string(),
        };
        Signer::ed25519_pem("k", PRIVATE)
            .unwrap()
            .sign(&claims)
            .unwrap()
    }

    #[test]
    fn a_cached_token_stops_verifying_when_the_verifier_would_refuse_it() {
        let cache = cache();
        let token = token(1_000);
        assert!(cache.verify(&token, 900).is_ok());
        assert!(cache.verify(&token, 1_030).is_ok(), "inside the leeway");
        assert_eq!(cache.verify(&token, 1_031), Err(TokenError::Expired));
    }

    #[test]
    fn a_tampered_token_is_not_served_from_the_cache() {
        let cache = cache();
        let token = token(1_000);
        cache.verify(&token, 900).unwrap();
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(cache.verify(&tampered, 900).is_err());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = cache();
        for _ in 0..100 {
            cache.verify(&token(1_000), 900).unwrap();
        }
        let cached: usize = cache.shards.iter().map(|s| s.lock().len()).sum();
        assert!(cached <= SHARDS, "{cached}");
    }
}
