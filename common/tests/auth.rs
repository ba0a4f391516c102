//! Access-token verification: every refusal the suite promises (bad, expired, not yet valid,
//! wrongly addressed, unknown key, `alg: none`, algorithm confusion, tampering), with real
//! Ed25519 and RSA keys from `tests/fixtures/`.

use base64::Engine as _;
use common::auth::{Algorithm, Claims, KeySet, MAX_TOKEN_BYTES, Signer, TokenError, Verifier};

const NOW: i64 = 1_795_000_000;
const ED_PRIVATE: &[u8] = include_bytes!("fixtures/ed25519-private.pem");
const ED_PUBLIC: &[u8] = include_bytes!("fixtures/ed25519-public.pem");
const ED_OTHER_PRIVATE: &[u8] = include_bytes!("fixtures/ed25519-other-private.pem");
const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/rsa-public.pem");
const JWKS: &str = include_str!("fixtures/jwks.json");
const SECRET: &[u8] = b"a development secret of at least 32 bytes";

fn claims() -> Claims {
    Claims {
        sub: "user-42".into(),
        roles: vec!["sender".into()],
        groups: vec!["team-a".into()],
        iss: "https://gateway.suite".into(),
        aud: "suite".into(),
        exp: NOW + 900,
        iat: NOW,
        nbf: None,
        jti: "0192f1d2-0000-7000-8000-000000000001".into(),
    }
}

fn verifier() -> Verifier {
    let mut keys = KeySet::new();
    keys.insert_ed25519_pem("ed-2026", ED_PUBLIC).unwrap();
    keys.insert_rsa_pem("rsa-2026", RSA_PUBLIC).unwrap();
    keys.insert_hs256_secret("dev", SECRET).unwrap();
    Verifier::new(keys, "https://gateway.suite", "suite")
}

fn ed_signer() -> Signer {
    Signer::ed25519_pem("ed-2026", ED_PRIVATE).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with any header and payload, signed with HMAC-SHA256 over `secret`.
fn forge_hs256(header: &serde_json::Value, payload: &serde_json::Value, secret: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    );
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    let signature = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &key,
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    format!("{signing_input}.{signature}")
}

#[test]
fn tokens_of_every_allowed_algorithm_verify_and_round_trip_their_claims() {
    let verifier = verifier();
    let signers = [
        ed_signer(),
        Signer::rsa_pem("rsa-2026", RSA_PRIVATE).unwrap(),
        Signer::hs256_secret("dev", SECRET).unwrap(),
    ];
    for signer in signers {
        let token = signer.sign(&claims()).unwrap();
        assert_eq!(
            verifier.verify(&token, NOW + 10),
            Ok(claims()),
            "{signer:?}"
        );
    }
    assert!(claims().has_role("sender") && !claims().has_role("admin"));
}

#[test]
fn expiry_and_not_before_respect_the_leeway() {
    let verifier = verifier();
    let token = ed_signer().sign(&claims()).unwrap();
    assert!(
        verifier.verify(&token, NOW + 900 + 30).is_ok(),
        "within the 30 s leeway"
    );
    assert_eq!(
        verifier.verify(&token, NOW + 900 + 31),
        Err(TokenError::Expired)
    );

    let future = Claims {
        nbf: Some(NOW + 120),
        ..claims()
    };
    let token = ed_signer().sign(&future).unwrap();
    assert_eq!(verifier.verify(&token, NOW), Err(TokenError::NotYetValid));
    assert!(verifier.verify(&token, NOW + 100).is_ok());

    let issued_later = Claims {
        iat: NOW + 600,
        ..claims()
    };
    let token = ed_signer().sign(&issued_later).unwrap();
    assert_eq!(
        verifier.verify(&token, NOW),
        Err(TokenError::NotYetValid),
        "iat in the future"
    );
}

#[test]
fn issuer_and_audience_must_match() {
    let verifier = verifier();
    let token = ed_signer()
        .sign(&Claims {
            iss: "https://evil.example".into(),
            ..claims()
        })
        .unwrap();
    assert_eq!(verifier.verify(&token, NOW), Err(TokenError::WrongIssuer));
    let token = ed_signer()
        .sign(&Claims {
            aud: "another-service".into(),
            ..claims()
        })
        .unwrap();
    assert_eq!(verifier.verify(&token, NOW), Err(TokenError::WrongAudience));
}

#[test]
fn unknown_and_missing_key_ids_are_refused() {
    let verifier = verifier();
    let token = Signer::ed25519_pem("retired-2025", ED_PRIVATE)
        .unwrap()
        .sign(&claims())
        .unwrap();
    assert_eq!(verifier.verify(&token, NOW), Err(TokenError::UnknownKeyId));
    let no_kid = forge_hs256(
        &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
        &serde_json::to_value(claims()).unwrap(),
        SECRET,
    );
    assert_eq!(verifier.verify(&no_kid, NOW), Err(TokenError::MissingKeyId));
}

#[test]
fn alg_none_is_refused() {
    let verifier = verifier();
    let payload = b64(serde_json::to_string(&claims()).unwrap().as_bytes());
    for alg in ["none", "None", "NONE"] {
        let header = b64(format!(r#"{{"alg":"{alg}","kid":"ed-2026"}}"#).as_bytes());
        for signature in ["", "AAAA"] {
            let token = format!("{header}.{payload}.{signature}");
            assert_eq!(
                verifier.verify(&token, NOW),
                Err(TokenError::AlgorithmNotAllowed),
                "{alg} / {signature:?}"
            );
        }
    }
}

#[test]
fn an_hmac_token_keyed_with_the_rsa_public_key_is_refused() {
    // The classic confusion: the attacker "signs" HS256 with the public key as the secret and
    // names the RSA key; a verifier that trusted the header's alg would accept it.
    let verifier = verifier();
    let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "rsa-2026"});
    let admin = Claims {
        roles: vec!["admin".into()],
        ..claims()
    };
    let token = forge_hs256(&header, &serde_json::to_value(admin).unwrap(), RSA_PUBLIC);
    assert_eq!(
        verifier.verify(&token, NOW),
        Err(TokenError::AlgorithmNotAllowed)
    );
    // Likewise an RS256 token naming the HS256 key.
    let token = Signer::rsa_pem("dev", RSA_PRIVATE)
        .unwrap()
        .sign(&claims())
        .unwrap();
    assert_eq!(
        verifier.verify(&token, NOW),
        Err(TokenError::AlgorithmNotAllowed)
    );
}

#[test]
fn a_signature_by_another_key_or_over_other_claims_is_refused() {
    let verifier = verifier();
    let impostor = Signer::ed25519_pem("ed-2026", ED_OTHER_PRIVATE).unwrap();
    assert_eq!(
        verifier.verify(&impostor.sign(&claims()).unwrap(), NOW),
        Err(TokenError::BadSignature)
    );

    let token = ed_signer().sign(&claims()).unwrap();
    let mut parts: Vec<&str> = token.split('.').collect();
    let escalated = b64(serde_json::to_string(&Claims {
        roles: vec!["admin".into()],
        ..claims()
    })
    .unwrap()
    .as_bytes());
    parts[1] = &escalated;
    assert_eq!(
        verifier.verify(&parts.join("."), NOW),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn malformed_and_oversized_tokens_are_refused() {
    let verifier = verifier();
    let oversized = format!("{}.{}.{}", "a".repeat(MAX_TOKEN_BYTES), "b", "c");
    for token in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.???.***",
        "e30.e30.e30",
        oversized.as_str(),
    ] {
        assert_eq!(
            verifier.verify(token, NOW),
            Err(TokenError::Malformed),
            "{:.40}",
            token
        );
    }
}

#[test]
fn missing_or_mistyped_claims_are_refused() {
    let verifier = verifier();
    let header = serde_json::json!({"alg": "HS256", "kid": "dev"});
    let mut payload = serde_json::to_value(claims()).unwrap();
    payload.as_object_mut().unwrap().remove("sub");
    assert_eq!(
        verifier.verify(&forge_hs256(&header, &payload, SECRET), NOW),
        Err(TokenError::InvalidClaims)
    );
    let mut payload = serde_json::to_value(claims()).unwrap();
    payload["exp"] = serde_json::json!("tomorrow");
    assert_eq!(
        verifier.verify(&forge_hs256(&header, &payload, SECRET), NOW),
        Err(TokenError::InvalidClaims)
    );
}

#[test]
fn jwks_keys_verify_and_must_state_their_algorithm() {
    let keys = KeySet::from_jwks(JWKS).unwrap();
    assert_eq!(keys.len(), 1);
    let verifier = Verifier::new(keys, "https://gateway.suite", "suite");
    assert_eq!(
        verifier.verify(&ed_signer().sign(&claims()).unwrap(), NOW),
        Ok(claims())
    );

    let without_alg = JWKS.replace(r#""alg":"EdDSA","#, "");
    assert!(KeySet::from_jwks(&without_alg).is_err());
    let without_kid = JWKS.replace(r#""kid":"ed-2026","#, "");
    assert!(KeySet::from_jwks(&without_kid).is_err());
    let hmac = r#"{"keys":[{"kty":"oct","alg":"HS256","kid":"k","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}"#;
    assert!(
        KeySet::from_jwks(hmac).is_err(),
        "shared secrets are never published"
    );
    assert!(KeySet::from_jwks("not json").is_err());
}

#[test]
fn weak_secrets_are_refused_and_keys_are_never_printed() {
    assert!(KeySet::new().insert_hs256_secret("dev", b"short").is_err());
    assert!(Signer::hs256_secret("dev", b"short").is_err());
    let printed = format!("{:?} {:?}", ed_signer(), verifier());
    assert!(
        !printed.contains("PRIVATE") && !printed.contains("MC4CAQ"),
        "{printed}"
    );
    assert!(printed.contains("ed-2026") && printed.contains(&format!("{:?}", Algorithm::EdDsa)));
}
