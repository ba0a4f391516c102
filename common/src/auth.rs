//! JWT access tokens: the claims the gateway issues and every service verifies.
//!
//! Every verification key carries the one algorithm it may be used with, and a token is
//! checked against the key its `kid` names, with that key's algorithm only. So `alg: none`,
//! an algorithm the key does not allow, and the classic confusion (an HS256 token "signed"
//! with an RSA public key as the HMAC secret) are all refused before any signature is
//! checked. Time claims are checked against the clock the caller passes, with a small leeway
//! for skew, so tests can move time.
//!
//! Keys come from PEM files or from the gateway's JWKS (`/.well-known/jwks.json`), where each
//! key must state its `alg`. HS256 exists for local development only.
//!
//! Tokens arrive as `Authorization: Bearer <token>`; [`bearer`] reads that header the same
//! way in every service.

use std::{collections::HashMap, fmt, time::Duration};

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine as _;
use jsonwebtoken::{
    DecodingKey, EncodingKey, Header, Validation,
    errors::ErrorKind,
    jwk::{JwkSet, KeyAlgorithm},
};
use serde::{Deserialize, Serialize};

/// The most bytes a token may have; longer ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Roles, for RBAC (`admin`, `sender`, …).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Groups, for group broadcasts.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Who issued the token (the gateway).
    pub iss: String,
    /// Who the token is for.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issue time, seconds since the epoch.
    pub iat: i64,
    /// Not valid before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// A unique id, for audit and revocation.
    pub jti: String,
}

impl Claims {
    /// True when the token grants `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// The algorithms this suite signs with. Each key allows exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// Ed25519: small keys and signatures, fast; the default.
    EdDsa,
    /// RSA PKCS#1 v1.5 with SHA-256, for clients that cannot do EdDSA.
    Rs256,
    /// HMAC-SHA256 with a shared secret: local development only.
    Hs256,
}

impl Algorithm {
    fn to_jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Self::EdDsa => jsonwebtoken::Algorithm::EdDSA,
            Self::Rs256 => jsonwebtoken::Algorithm::RS256,
            Self::Hs256 => jsonwebtoken::Algorithm::HS256,
        }
    }
}

/// Why a key could not be loaded or a token signed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key material could not be read.
    #[error("key `{kid}` is unusable: {reason}")]
    Invalid {
        /// The key id.
        kid: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The JWKS document could not be read.
    #[error("the JWKS document is invalid: {0}")]
    Jwks(String),
}

/// Why a token was refused. [`TokenError::reason`] is a short, stable label for logs,
/// audit rows and metrics; clients only ever learn "invalid token".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, too long, or its parts do not decode.
    #[error("the token is malformed")]
    Malformed,
    /// The header names no key.
    #[error("the token names no key (kid)")]
    MissingKeyId,
    /// The header names a key this service does not know.
    #[error("the token names an unknown key")]
    UnknownKeyId,
    /// The header's algorithm is `none`, unknown, or not the one its key allows.
    #[error("the token's algorithm is not allowed for its key")]
    AlgorithmNotAllowed,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// A required claim is missing or of the wrong type.
    #[error("the token's claims are invalid")]
    InvalidClaims,
    /// `iss` is not the expected issuer.
    #[error("the token was issued by someone else")]
    WrongIssuer,
    /// `aud` is not this service's audience.
    #[error("the token is meant for another audience")]
    WrongAudience,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
}

impl TokenError {
    /// A short stable label (`expired`, `bad_signature`, …).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::MissingKeyId => "missing_kid",
            Self::UnknownKeyId => "unknown_kid",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::BadSignature => "bad_signature",
            Self::InvalidClaims => "invalid_claims",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
        }
    }
}

struct VerificationKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The keys a service accepts, by `kid`, each with its one allowed algorithm.
#[derive(Default)]
pub struct KeySet {
    keys: HashMap<String, VerificationKey>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<(&String, Algorithm)> =
            self.keys.iter().map(|(k, v)| (k, v.algorithm)).collect();
        kids.sort();
        f.debug_struct("KeySet").field("keys", &kids).finish()
    }
}

impl KeySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an Ed25519 public key (PEM, SubjectPublicKeyInfo) for EdDSA.
    pub fn insert_ed25519_pem(&mut self, kid: &str, pem: &[u8]) -> Result<(), KeyError> {
        let key = DecodingKey::from_ed_pem(pem).map_err(|e| invalid(kid, e))?;
        self.insert(kid, Algorithm::EdDsa, key);
        Ok(())
    }

    /// Adds an RSA public key (PEM) for RS256.
    pub fn insert_rsa_pem(&mut self, kid: &str, pem: &[u8]) -> Result<(), KeyError> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|e| invalid(kid, e))?;
        self.insert(kid, Algorithm::Rs256, key);
        Ok(())
    }

    /// Adds a shared secret for HS256. For local development only: anyone who can verify
    /// can also sign. Secrets shorter than 32 bytes are refused.
    pub fn insert_hs256_secret(&mut self, kid: &str, secret: &[u8]) -> Result<(), KeyError> {
        if secret.len() < 32 {
            return Err(KeyError::Invalid {
                kid: kid.to_owned(),
                reason: "an HS256 secret needs at least 32 bytes".into(),
            });
        }
        self.insert(kid, Algorithm::Hs256, DecodingKey::from_secret(secret));
        Ok(())
    }

    /// Reads a JWKS document (the gateway's `/.well-known/jwks.json`). Every key must have a
    /// `kid` and an `alg` of `EdDSA` or `RS256`; anything else is refused, not skipped, so a
    /// misconfigured issuer is noticed at start-up.
    pub fn from_jwks(json: &str) -> Result<Self, KeyError> {
        let set: JwkSet = serde_json::from_str(json).map_err(|e| KeyError::Jwks(e.to_string()))?;
        let mut keys = Self::new();
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| KeyError::Jwks("a key has no kid".into()))?;
            let algorithm = match jwk.common.key_algorithm {
                Some(KeyAlgorithm::EdDSA) => Algorithm::EdDsa,
                Some(KeyAlgorithm::RS256) => Algorithm::Rs256,
                _ => {
                    return Err(KeyError::Jwks(format!(
                        "key `{kid}` must state alg EdDSA or RS256"
                    )));
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(&kid, e))?;
            keys.insert(&kid, algorithm, key);
        }
        Ok(keys)
    }

    fn insert(&mut self, kid: &str, algorithm: Algorithm, key: DecodingKey) {
        self.keys
            .insert(kid.to_owned(), VerificationKey { algorithm, key });
    }

    /// How many keys are known.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is known.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn invalid(kid: &str, error: jsonwebtoken::errors::Error) -> KeyError {
    KeyError::Invalid {
        kid: kid.to_owned(),
        reason: error.to_string(),
    }
}

/// Verifies access tokens for one issuer and audience.
pub struct Verifier {
    keys: KeySet,
    issuer: String,
    audience: String,
    leeway_secs: i64,
    validations: HashMap<Algorithm, Validation>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl Verifier {
    /// A verifier accepting tokens signed by `keys`, issued by `issuer` for `audience`, with
    /// 30 s of leeway on time claims.
    pub fn new(keys: KeySet, issuer: &str, audience: &str) -> Self {
        let validations = [Algorithm::EdDsa, Algorithm::Rs256, Algorithm::Hs256]
            .into_iter()
            .map(|algorithm| {
                let mut validation = Validation::new(algorithm.to_jwt());
                validation.set_issuer(&[issuer]);
                validation.set_audience(&[audience]);
                validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                // Time is checked below against the caller's clock.
                validation.validate_exp = false;
                validation.validate_nbf = false;
                (algorithm, validation)
            })
            .collect();
        Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway_secs: 30,
            validations,
        }
    }

    /// Sets the allowed clock skew on `exp`, `nbf` and `iat`.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway_secs = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
        self
    }

    /// The claims of `token` if it is valid at `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| header_error(token))?;
        let kid = header.kid.as_deref().ok_or(TokenError::MissingKeyId)?;
        let key = self.keys.keys.get(kid).ok_or(TokenError::UnknownKeyId)?;
        if header.alg != key.algorithm.to_jwt() {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let validation = &self.validations[&key.algorithm];
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, validation)
            .map_err(|error| match error.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidAlgorithm => TokenError::AlgorithmNotAllowed,
                ErrorKind::MissingRequiredClaim(_)
                | ErrorKind::InvalidClaimFormat(_)
                | ErrorKind::Json(_) => TokenError::InvalidClaims,
                _ => TokenError::Malformed,
            })?
            .claims;
        if claims.exp.saturating_add(self.leeway_secs) < now {
            return Err(TokenError::Expired);
        }
        let not_before = claims.nbf.unwrap_or(claims.iat).max(claims.iat);
        if not_before.saturating_sub(self.leeway_secs) > now {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }
}

/// Names the header fault: `alg: none` (or any unknown algorithm) is "not allowed", anything
/// else "malformed".
fn header_error(token: &str) -> TokenError {
    let alg = token
        .split('.')
        .next()
        .and_then(|part| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|header| {
            header
                .get("alg")
                .and_then(|a| a.as_str().map(str::to_owned))
        });
    match alg {
        Some(_) => TokenError::AlgorithmNotAllowed,
        None => TokenError::Malformed,
    }
}

/// Signs access tokens with one key (the gateway's current one; tests).
pub struct Signer {
    kid: String,
    algorithm: Algorithm,
    key: EncodingKey,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key itself is never printed.
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// An EdDSA signer from an Ed25519 private key (PEM, PKCS#8).
    pub fn ed25519_pem(kid: &str, pem: &[u8]) -> Result<Self, KeyError> {
        let key = EncodingKey::from_ed_pem(pem).map_err(|e| invalid(kid, e))?;
        Ok(Self {
            kid: kid.to_owned(),
            algorithm: Algorithm::EdDsa,
            key,
        })
    }

    /// An RS256 signer from an RSA private key (PEM).
    pub fn rsa_pem(kid: &str, pem: &[u8]) -> Result<Self, KeyError> {
        let key = EncodingKey::from_rsa_pem(pem).map_err(|e| invalid(kid, e))?;
        Ok(Self {
            kid: kid.to_owned(),
            algorithm: Algorithm::Rs256,
            key,
        })
    }

    /// An HS256 signer: local development only.
    pub fn hs256_secret(kid: &str, secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < 32 {
            return Err(KeyError::Invalid {
                kid: kid.to_owned(),
                reason: "an HS256 secret needs at least 32 bytes".into(),
            });
        }
        Ok(Self {
            kid: kid.to_owned(),
            algorithm: Algorithm::Hs256,
            key: EncodingKey::from_secret(secret),
        })
    }

    /// The signed token.
    pub fn sign(&self, claims: &Claims) -> Result<String, KeyError> {
        let mut header = Header::new(self.algorithm.to_jwt());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| invalid(&self.kid, e))
    }
}

/// The token of the request's `Authorization: Bearer <token>` header; `None` when the header
/// is absent or is not a bearer token. See [`bearer_token`].
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_token(headers.get(header::AUTHORIZATION)?)
}

/// The token of one `Authorization` value, or `None` when the value is not `Bearer <token>`.
/// The scheme is matched case-insensitively (RFC 9110 §11.1: `bearer` and `BEARER` are
/// `Bearer`), spaces around the token are ignored, and a value that is not visible ASCII, has
/// another scheme, or has no token at all is not a bearer token. Whether the token is valid
/// is the verifier's business.
pub fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_of(value: &[u8]) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(value).unwrap(),
        );
        bearer(&headers).map(str::to_owned)
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR abc"] {
            assert_eq!(
                token_of(value.as_bytes()).as_deref(),
                Some("abc"),
                "{value}"
            );
        }
    }

    #[test]
    fn spaces_around_the_token_are_ignored() {
        assert_eq!(token_of(b"Bearer    abc").as_deref(), Some("abc"));
        assert_eq!(token_of(b"Bearer abc   ").as_deref(), Some("abc"));
        assert_eq!(token_of(b"Bearer \tabc").as_deref(), Some("abc"));
    }

    #[test]
    fn a_value_without_a_token_is_not_a_bearer_token() {
        for value in ["Bearer", "Bearer ", "Bearer    ", "bearer"] {
            assert_eq!(token_of(value.as_bytes()), None, "{value:?}");
        }
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn other_schemes_and_lookalikes_are_refused() {
        for value in [
            "Basic dXNlcjpwYXNz",
            "Token abc",
            "Bearerabc",
            "Bearer-x abc",
            "abc",
        ] {
            assert_eq!(token_of(value.as_bytes()), None, "{value:?}");
        }
    }

    #[test]
    fn a_header_that_is_not_visible_ascii_is_refused() {
        assert_eq!(token_of("Bearer tökén".as_bytes()), None);
        assert_eq!(token_of(b"Bearer \xff\xfe"), None);
    }
}
