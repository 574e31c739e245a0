//! The keyring alone: parsing, claim checks, token shape, signatures checked
//! with ring's verifier and the published DER (read with the RustCrypto DER
//! types), reuse across passes.

use super::*;
use crate::config::{ConfigSource, ParseContext};
use crate::document::StoredKey;
use crate::key::{CryptoKeys, KeyFactory};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256};

fn policy(extra: &str) -> KeysetPolicy {
    let text = format!(
        "[[keysets]]\nname = \"k\"\nalgorithms = [\"RS256\", \"ES256\"]\ntoken_ttl = \"10m\"\nclock_skew = \"1m\"\n{extra}"
    );
    let context = ParseContext {
        state_directory: None,
        now: chrono::Utc::now(),
    };
    Config::parse(&text, ConfigSource::Embedded, &context)
        .expect("a valid config")
        .keysets
        .remove(0)
}

fn stored(alg: Alg, state: KeyState) -> StoredKey {
    let now = chrono::Utc::now();
    let key = crate::key::generate(alg, 2048, "k", now).expect("a key");
    StoredKey {
        kid: key.kid,
        alg,
        state,
        created_at: now,
        published_at: now,
        activated_at: (state != KeyState::Next).then_some(now),
        retired_at: None,
        remove_at: None,
        ready_at: None,
        longest_grace_seconds: None,
        certificate: key.certificate,
        private_key_pem: key.private_key_pem,
    }
}

fn doc() -> KeysetDoc {
    let mut doc = KeysetDoc::new("k");
    doc.keys = vec![
        stored(Alg::ES256, KeyState::Active),
        stored(Alg::RS256, KeyState::Active),
        stored(Alg::ES256, KeyState::Next),
    ];
    doc
}

fn keyring(doc: &KeysetDoc) -> Keyring {
    let jwks = doc.public_jwks(&CryptoKeys, "test").expect("valid keys");
    Keyring::new(
        &policy(""),
        Some(Alg::RS256),
        doc,
        &jwks,
        chrono::Utc::now(),
    )
    .expect("parses")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn segments(token: &str) -> (Value, Value, Vec<u8>) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let json = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
    (
        json(parts[0]),
        json(parts[1]),
        URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
    )
}

/// The raw public key ring verifies with, taken from the published DER:
/// the SubjectPublicKeyInfo's BIT STRING (a SEC1 point, a PKCS#1 key).
fn verify_with_published(ring: &Keyring, kid: &str, alg: Alg, token: &str) {
    let key = ring
        .published()
        .iter()
        .find(|k| k.kid == kid)
        .expect("published");
    let (input, signature) = token.rsplit_once('.').unwrap();
    let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
    match alg {
        Alg::ES256 => {
            assert_eq!(signature.len(), 64, "ES256 is 64-byte R||S");
            let point = &key.der[key.der.len() - 65..];
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                .verify(input.as_bytes(), &signature)
                .expect("the ES256 signature verifies");
        }
        Alg::RS256 => {
            let info = pkcs8::SubjectPublicKeyInfoRef::try_from(&key.der[..]).unwrap();
            assert_eq!(info.algorithm, pkcs1::ALGORITHM_ID, "rsaEncryption, NULL");
            let pkcs1 = info.subject_public_key.as_bytes().expect("whole bytes");
            UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, pkcs1)
                .verify(input.as_bytes(), &signature)
                .expect("the RS256 signature verifies");
        }
    }
}

#[test]
fn signs_with_the_active_key_and_a_header_of_exactly_alg_kid_typ() {
    let doc = doc();
    let ring = keyring(&doc);
    let signed = ring
        .sign_claims(None, serde_json::json!({"sub": "a"}), now())
        .unwrap();
    // The default is the first algorithm as written (RS256 here).
    assert_eq!(signed.alg, Alg::RS256);
    assert_eq!(
        signed.kid,
        doc.key(Alg::RS256, KeyState::Active).unwrap().kid
    );
    let (header, claims, _) = segments(&signed.token);
    assert_eq!(
        header,
        serde_json::json!({"alg": "RS256", "kid": signed.kid, "typ": "JWT"})
    );
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );
    assert_eq!(claims["exp"].as_i64(), Some(signed.expires_at));
    verify_with_published(&ring, &signed.kid, Alg::RS256, &signed.token);

    let signed = ring
        .sign_claims(Some("ES256"), serde_json::json!({"sub": "a"}), now())
        .unwrap();
    assert_eq!(
        signed.kid,
        doc.key(Alg::ES256, KeyState::Active).unwrap().kid
    );
    verify_with_published(&ring, &signed.kid, Alg::ES256, &signed.token);
}

#[test]
fn kubernetes_claims_are_signed_as_received() {
    let doc = doc();
    let ring = keyring(&doc);
    let t = now();
    // Deliberately not how serde_json would write it: spaces, key order.
    let raw = format!(
        "{{ \"sub\": \"system:serviceaccount:a:b\", \"exp\": {}, \"iat\": {t} }}",
        t + 600
    );
    let claims = URL_SAFE_NO_PAD.encode(&raw);
    let (header, signature) = ring.sign_encoded(Alg::ES256, &claims, t).unwrap();
    assert!(!header.contains('=') && !signature.contains('='));
    let token = format!("{header}.{claims}.{signature}");
    let kid = doc.key(Alg::ES256, KeyState::Active).unwrap().kid.clone();
    verify_with_published(&ring, &kid, Alg::ES256, &token);

    let too_long = URL_SAFE_NO_PAD.encode(format!("{{\"exp\": {}, \"iat\": {t}}}", t + 601));
    assert!(matches!(
        ring.sign_encoded(Alg::ES256, &too_long, t),
        Err(Refusal::ExpTooLong { lifetime: 601, .. })
    ));
    let no_exp = URL_SAFE_NO_PAD.encode(format!("{{\"iat\": {t}}}"));
    assert!(matches!(
        ring.sign_encoded(Alg::ES256, &no_exp, t),
        Err(Refusal::BadClaim { claim: "exp", .. })
    ));
    assert!(matches!(
        ring.sign_encoded(Alg::ES256, "not base64!", t),
        Err(Refusal::BadClaim { .. })
    ));
}

#[test]
fn claims_are_held_to_token_ttl_and_clock_skew() {
    let ring = keyring(&doc());
    let t = now();
    let refuse = |claims: Value| ring.sign_claims(Some("ES256"), claims, t).unwrap_err();
    assert!(matches!(
        refuse(serde_json::json!({"exp": t + 601})),
        Refusal::ExpTooLong { .. }
    ));
    assert!(matches!(
        refuse(serde_json::json!({"iat": t - 61})),
        Refusal::IatSkewed { .. }
    ));
    assert!(matches!(
        refuse(serde_json::json!({"iat": t + 61})),
        Refusal::IatSkewed { .. }
    ));
    assert!(matches!(
        refuse(serde_json::json!({"exp": "tomorrow"})),
        Refusal::BadClaim { claim: "exp", .. }
    ));
    assert!(matches!(
        refuse(serde_json::json!({"exp": t - 1})),
        Refusal::BadClaim { claim: "exp", .. }
    ));
    assert_eq!(refuse(serde_json::json!(["a"])), Refusal::ClaimsNotObject);
    // At the limits: accepted.
    ring.sign_claims(
        Some("ES256"),
        serde_json::json!({"iat": t - 60, "exp": t + 540}),
        t,
    )
    .unwrap();
    let unknown = ring
        .sign_claims(Some("HS256"), serde_json::json!({}), t)
        .unwrap_err();
    assert_eq!(unknown.http_status(), 404);
    // Algorithm names are exact, as JOSE writes them.
    assert_eq!(
        ring.sign_claims(Some("es256"), serde_json::json!({}), t)
            .unwrap_err()
            .http_status(),
        404
    );
}

#[test]
fn refusals_never_quote_the_claims() {
    let ring = keyring(&doc());
    let t = now();
    let secret = "do-not-log-me";
    for claims in [
        serde_json::json!({"sub": secret, "exp": t + 9999}),
        serde_json::json!({"sub": secret, "iat": t - 9999}),
        serde_json::json!({"sub": secret, "exp": secret}),
    ] {
        let refusal = ring.sign_claims(None, claims, t).unwrap_err();
        assert!(!refusal.to_string().contains(secret), "{refusal}");
    }
}

#[test]
fn withheld_and_keyless_keyrings_answer_503_saying_why() {
    let ring = Keyring::withheld("keyset removed from the config".into());
    let refusal = ring
        .sign_claims(None, serde_json::json!({}), now())
        .unwrap_err();
    assert_eq!(refusal.http_status(), 503);
    assert!(refusal
        .to_string()
        .contains("keyset removed from the config"));
    assert!(ring.published().is_empty());

    // A slot whose first key is still `next` (a new algorithm): 503 too.
    let mut doc = doc();
    doc.keys.retain(|k| k.alg == Alg::RS256);
    doc.keys.push(stored(Alg::ES256, KeyState::Next));
    let ring = keyring(&doc);
    let refusal = ring
        .sign_claims(Some("ES256"), serde_json::json!({}), now())
        .unwrap_err();
    assert!(matches!(
        refusal,
        Refusal::NoActiveKey {
            alg: Alg::ES256,
            ..
        }
    ));
    assert_eq!(refusal.http_status(), 503);
}

#[test]
fn published_der_is_each_jwk_and_a_keyring_is_reused_until_keys_change() {
    let mut doc = doc();
    let jwks = doc.public_jwks(&CryptoKeys, "test").unwrap();
    let policy = policy("");
    let first = Keyring::refresh(None, &policy, None, &doc, &jwks, chrono::Utc::now());
    assert_eq!(first.published().len(), 3);
    for (published, jwk) in first.published().iter().zip(&jwks) {
        assert_eq!(published.kid, jwk.kid);
        let again = CryptoKeys
            .public_jwk(
                jwk.alg,
                &doc.keys
                    .iter()
                    .find(|k| k.kid == jwk.kid)
                    .unwrap()
                    .private_key_pem,
            )
            .unwrap();
        assert_eq!(spki_der(&again).unwrap(), published.der);
    }
    let same = Keyring::refresh(Some(&first), &policy, None, &doc, &jwks, chrono::Utc::now());
    assert!(
        Arc::ptr_eq(&first, &same),
        "unchanged keys are not parsed again"
    );
    // A rotation: the next key becomes active.
    doc.keys[0].state = KeyState::Retired;
    doc.keys[2].state = KeyState::Active;
    let rotated = Keyring::refresh(Some(&first), &policy, None, &doc, &jwks, chrono::Utc::now());
    assert!(!Arc::ptr_eq(&first, &rotated));
    assert_eq!(
        rotated.active_kid(Alg::ES256),
        Some(doc.keys[2].kid.as_str())
    );
}

#[test]
fn rsa_keys_are_offered_only_well_formed_and_at_most_4096_bits() {
    let old: PublicJwk = {
        let jwk: Value = serde_json::from_str(include_str!(
            "../../tests/data/keys/rs256-2048-rsa-crate.jwk.json"
        ))
        .unwrap();
        let member = |name: &str| jwk[name].as_str().unwrap().to_string();
        PublicJwk::rsa(member("n"), member("e"))
    };
    let n = URL_SAFE_NO_PAD.decode(old.n.as_deref().unwrap()).unwrap();
    let e = URL_SAFE_NO_PAD.decode(old.e.as_deref().unwrap()).unwrap();
    let der = rsa_spki_der(n.clone(), e.clone()).expect("a good key");
    let info = pkcs8::SubjectPublicKeyInfoRef::try_from(&der[..]).unwrap();
    let parsed =
        pkcs1::RsaPublicKey::try_from(info.subject_public_key.as_bytes().unwrap()).unwrap();
    assert_eq!(
        (parsed.modulus.as_bytes(), parsed.public_exponent.as_bytes()),
        (&n[..], &e[..])
    );
    assert_eq!(spki_der(&old), Some(der));

    let mut even = n.clone();
    *even.last_mut().unwrap() ^= 1;
    let leading_zero = [&[0][..], &n].concat();
    let bits_4096 = [&n[..], &n].concat();
    assert!(rsa_spki_der(bits_4096.clone(), e.clone()).is_some());
    let too_large = [&[1][..], &bits_4096].concat();
    for (case, n, e) in [
        ("even modulus", even, e.clone()),
        ("leading zero", leading_zero, e.clone()),
        ("4097 bits", too_large, e.clone()),
        ("even exponent", n.clone(), vec![1, 0, 0]),
        ("34-bit exponent", n.clone(), vec![3, 0, 0, 0, 1]),
        ("exponent 1", n.clone(), vec![1]),
    ] {
        assert_eq!(rsa_spki_der(n, e), None, "{case}");
    }
}

#[test]
fn debug_shows_no_key_material() {
    let doc = doc();
    let ring = keyring(&doc);
    let shown = format!("{ring:?}");
    let pem = doc.keys[0].private_key_pem.expose();
    assert!(!shown.contains(pem.lines().nth(1).unwrap()), "{shown}");
    assert!(!shown.contains("PRIVATE"), "{shown}");
}
