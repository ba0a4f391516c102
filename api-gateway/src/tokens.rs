//! Access tokens (JWT, signed here, verified by every service) and opaque refresh tokens.

use std::time::Duration;

use anyhow::Context;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use common::auth::{Claims, KeySet, Signer, Verifier};
use ed25519_dalek::{SigningKey, pkcs8::DecodePrivateKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::store::User;

/// Signs access tokens and publishes the public key.
pub struct TokenIssuer {
    signer: Signer,
    jwks: Value,
    keys_for_verifier: KeySetSource,
    issuer: String,
    audience: String,
    access_ttl: Duration,
}

enum KeySetSource {
    Jwks(String),
    Hs256 { kid: String, secret: Vec<u8> },
}

impl TokenIssuer {
    /// EdDSA with the Ed25519 private key in `pem` (PKCS#8), published under `kid`.
    pub fn ed25519(
        kid: &str,
        pem: &[u8],
        issuer: &str,
        audience: &str,
        access_ttl: Duration,
    ) -> anyhow::Result<Self> {
        let text = std::str::from_utf8(pem).context("the private key is not PEM text")?;
        let key = SigningKey::from_pkcs8_pem(text).context("not an Ed25519 PKCS#8 private key")?;
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
        let jwks = json!({ "keys": [{
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"
        }] });
        Ok(Self {
            signer: Signer::ed25519_pem(kid, pem)?,
            keys_for_verifier: KeySetSource::Jwks(jwks.to_string()),
            jwks,
            issuer: issuer.into(),
            audience: audience.into(),
            access_ttl,
        })
    }

    /// HS256 with a shared secret: for local development only; nothing is published.
    pub fn hs256(
        kid: &str,
        secret: &[u8],
        issuer: &str,
        audience: &str,
        access_ttl: Duration,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            signer: Signer::hs256_secret(kid, secret)?,
            jwks: json!({ "keys": [] }),
            keys_for_verifier: KeySetSource::Hs256 {
                kid: kid.into(),
                secret: secret.to_vec(),
            },
            issuer: issuer.into(),
            audience: audience.into(),
            access_ttl,
        })
    }

    /// The public keys, as served at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> &Value {
        &self.jwks
    }

    /// A verifier that accepts exactly the tokens this issuer signs.
    pub fn verifier(&self) -> anyhow::Result<Verifier> {
        let keys = match &self.keys_for_verifier {
            KeySetSource::Jwks(json) => KeySet::from_jwks(json)?,
            KeySetSource::Hs256 { kid, secret } => {
                let mut keys = KeySet::new();
                keys.insert_hs256_secret(kid, secret)?;
                keys
            }
        };
        Ok(Verifier::new(keys, &self.issuer, &self.audience))
    }

    /// Seconds an access token lives.
    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// An access token for `user`, and its expiry (seconds since the epoch).
    pub fn issue(&self, user: &User) -> anyhow::Result<(String, i64)> {
        let jti = Uuid::now_v7().to_string();
        self.sign(&user.id.to_string(), &user.roles, self.access_ttl, jti)
    }

    /// A token for an API-key caller to take to an upstream that verifies tokens itself: the
    /// key's owner as `sub`, the key's roles, living `ttl`, its `jti` marked with
    /// [`UPSTREAM_ONLY_JTI_PREFIX`] so that the gateway refuses it when it is presented there
    /// (it would otherwise turn a key into its owner's session).
    pub fn issue_for_key(
        &self,
        owner: &str,
        roles: &[String],
        ttl: Duration,
    ) -> anyhow::Result<(String, i64)> {
        let jti = format!("{UPSTREAM_ONLY_JTI_PREFIX}{}", Uuid::now_v7());
        self.sign(owner, roles, ttl, jti)
    }

    fn sign(
        &self,
        subject: &str,
        roles: &[String],
        ttl: Duration,
        jti: String,
    ) -> anyhow::Result<(String, i64)> {
        let now = chrono::Utc::now().timestamp();
        let exp = now + ttl.as_secs() as i64;
        let claims = Claims {
            sub: subject.to_owned(),
            roles: roles.to_vec(),
            groups: Vec::new(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            exp,
            iat: now,
            nbf: None,
            jti,
        };
        Ok((self.signer.sign(&claims)?, exp))
    }
}

/// How the `jti` of a token signed for an API-key caller begins ([`TokenIssuer::issue_for_key`]).
/// Users' tokens carry a bare UUID, so no user token ever starts so, and the `jti` is signed.
pub const UPSTREAM_ONLY_JTI_PREFIX: &str = "key.";

/// Whether `claims` are those of a token the gateway signed for an API-key caller's upstream.
pub fn is_upstream_only(claims: &Claims) -> bool {
    claims.jti.starts_with(UPSTREAM_ONLY_JTI_PREFIX)
}

/// A new opaque refresh token (256 random bits, base64url) and the hash that is stored.
pub fn new_refresh_token() -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_refresh_token(&token);
    (token, hash)
}

/// SHA-256 of a presented refresh token: what the database is searched by.
pub fn hash_refresh_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &[u8] = include_bytes!("../../common/tests/fixtures/ed25519-private.pem");

    fn user() -> User {
        User {
            id: Uuid::now_v7(),
            username: "ann".into(),
            roles: vec!["admin".into()],
        }
    }

    /// An EdDSA issuer signing with the fixture key.
    fn issuer() -> TokenIssuer {
        TokenIssuer::ed25519(
            "gw-1",
            PEM,
            "api-gateway",
            "backend-suite",
            Duration::from_secs(900),
        )
        .unwrap()
    }

    #[test]
    fn only_tokens_signed_for_api_keys_are_upstream_only() {
        let issuer = issuer();
        let keys = KeySet::from_jwks(&issuer.jwks().to_string()).unwrap();
        let verifier = Verifier::new(keys, "api-gateway", "backend-suite");
        let now = chrono::Utc::now().timestamp();
        let (user_token, _) = issuer.issue(&user()).unwrap();
        let user_claims = verifier.verify(&user_token, now).unwrap();
        assert!(!is_upstream_only(&user_claims));
        let roles = vec!["sender".to_owned()];
        let (key_token, exp) = issuer
            .issue_for_key("owner-1", &roles, Duration::from_secs(60))
            .unwrap();
        let key_claims = verifier.verify(&key_token, now).unwrap();
        assert!(is_upstream_only(&key_claims), "{key_claims:?}");
        assert_eq!((key_claims.sub.as_str(), key_claims.exp), ("owner-1", exp));
        assert_eq!(key_claims.roles, roles);
    }

    #[test]
    fn issued_tokens_verify_through_the_published_jwks() {
        let issuer = issuer();
        let (token, exp) = issuer.issue(&user()).unwrap();
        // What another service does: build its key set from the JWKS document alone.
        let keys = KeySet::from_jwks(&issuer.jwks().to_string()).unwrap();
        let verifier = Verifier::new(keys, "api-gateway", "backend-suite");
        let claims = verifier
            .verify(&token, chrono::Utc::now().timestamp())
            .unwrap();
        assert_eq!(claims.exp, exp);
        assert_eq!(claims.roles, ["admin"]);
        assert_eq!(issuer.jwks()["keys"][0]["kid"], "gw-1");
    }

    #[test]
    fn refresh_tokens_are_random_and_only_their_hash_is_kept() {
        let (a, hash_a) = new_refresh_token();
        let (b, _) = new_refresh_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hash_refresh_token(&a), hash_a);
        assert_eq!(hash_a.len(), 32);
    }
}
