//! Access tokens signed with the fixture keys, as the gateway issues them, so the gateway's
//! and the notifier's tests, the load test and the benches all present the same claims
//! (`iss` `api-gateway`, `aud` `backend-suite`, a fresh UUIDv7 `jti`) and one change to the
//! token format is made in one place.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::auth::{Claims, Signer};
use uuid::Uuid;

/// The Ed25519 private key the test services trust (PEM, PKCS#8).
pub const PRIVATE_KEY_PEM: &[u8] =
    include_bytes!("../../common/tests/fixtures/ed25519-private.pem");

/// An Ed25519 private key no test service trusts: a token it signs must be refused.
pub const UNTRUSTED_PRIVATE_KEY_PEM: &[u8] =
    include_bytes!("../../common/tests/fixtures/ed25519-other-private.pem");

/// The key id the test services know the fixture key by.
pub const KEY_ID: &str = "test";

/// How long a token is valid unless a test says otherwise: long enough for any test, short
/// enough that a leaked one is worthless.
pub const LIFETIME: Duration = Duration::from_secs(600);

/// Which fixture key signs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FixtureKey {
    /// [`PRIVATE_KEY_PEM`]: the services accept what it signs.
    #[default]
    Trusted,
    /// [`UNTRUSTED_PRIVATE_KEY_PEM`]: the services must refuse what it signs.
    Untrusted,
}

impl FixtureKey {
    fn pem(self) -> &'static [u8] {
        match self {
            Self::Trusted => PRIVATE_KEY_PEM,
            Self::Untrusted => UNTRUSTED_PRIVATE_KEY_PEM,
        }
    }
}

/// A token being built: claims as the gateway issues them, which a test may change before
/// [`AccessToken::sign`] (expired, another audience, a key the service does not trust, …).
#[derive(Debug, Clone)]
pub struct AccessToken {
    claims: Claims,
    key_id: String,
    key: FixtureKey,
}

impl AccessToken {
    /// A token for `sub` with `roles`, no groups, issued now and valid for [`LIFETIME`],
    /// signed with the trusted key under [`KEY_ID`].
    pub fn new(sub: &str, roles: &[&str]) -> Self {
        let now = unix_seconds();
        Self::from_claims(Claims {
            sub: sub.into(),
            roles: roles.iter().map(|role| role.to_string()).collect(),
            groups: Vec::new(),
            iss: "api-gateway".into(),
            aud: "backend-suite".into(),
            exp: now + LIFETIME.as_secs() as i64,
            iat: now,
            nbf: None,
            jti: Uuid::now_v7().to_string(),
        })
    }

    /// Exactly these claims, signed with the trusted key under [`KEY_ID`].
    pub fn from_claims(claims: Claims) -> Self {
        Self {
            claims,
            key_id: KEY_ID.into(),
            key: FixtureKey::Trusted,
        }
    }

    /// Valid for `lifetime` from its issue time instead of [`LIFETIME`].
    pub fn valid_for(mut self, lifetime: Duration) -> Self {
        self.claims.exp = self.claims.iat + lifetime.as_secs() as i64;
        self
    }

    /// Signed under key id `key_id` (a service configured with another id for the same key).
    pub fn key_id(mut self, key_id: &str) -> Self {
        self.key_id = key_id.into();
        self
    }

    /// Signed with `key`.
    pub fn signed_with(mut self, key: FixtureKey) -> Self {
        self.key = key;
        self
    }

    /// With `jti` instead of a fresh UUIDv7 (a token that must be the same on every run).
    pub fn jti(mut self, jti: impl Into<String>) -> Self {
        self.claims.jti = jti.into();
        self
    }

    /// With claims that `change` altered: the cases a verifier must refuse.
    pub fn with_claims(mut self, change: impl FnOnce(&mut Claims)) -> Self {
        change(&mut self.claims);
        self
    }

    /// The claims it will carry.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// The signed token (a JWT, EdDSA).
    pub fn sign(&self) -> String {
        Signer::ed25519_pem(&self.key_id, self.key.pem())
            .and_then(|signer| signer.sign(&self.claims))
            .expect("the fixture keys sign")
    }
}

/// A valid token for `sub` with `roles`: [`AccessToken::new`] signed as it is.
pub fn access_token(sub: &str, roles: &[&str]) -> String {
    AccessToken::new(sub, roles).sign()
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64)
}
