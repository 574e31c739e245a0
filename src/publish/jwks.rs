//! The JWKS bytes: deterministic, so every replica holding the same document
//! serves the same bytes (and the same ETag).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::document::{KeyState, KeysetDoc};
use crate::key::PublicJwk;

/// A rendered JWKS with what HTTP needs to serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwksDocument {
    pub body: bytes::Bytes,
    /// A strong validator: the digest of the body, quoted.
    pub etag: String,
    /// `Cache-Control: max-age`, the keyset's `jwks_cache_ttl`.
    pub max_age_seconds: u64,
    /// `etag` and `public, max-age=N` as header values, built once here
    /// rather than for every response.
    pub etag_header: http::HeaderValue,
    pub cache_control: http::HeaderValue,
}

#[derive(Serialize)]
struct KeySet<'a> {
    keys: Vec<&'a PublicJwk>,
}

fn state_rank(state: KeyState) -> u8 {
    match state {
        KeyState::Active => 0,
        KeyState::Next => 1,
        KeyState::Retired => 2,
    }
}

/// Renders the JWKS of `doc` (`jwks` aligned with `doc.keys`): active, then
/// next, then retired keys; within a state by alg, then kid (SPEC §2).
pub fn render(
    doc: &KeysetDoc,
    jwks: &[PublicJwk],
    x5c: bool,
    max_age_seconds: u64,
) -> JwksDocument {
    let mut entries: Vec<(u8, &str, &str, PublicJwk)> = doc
        .keys
        .iter()
        .zip(jwks)
        .map(|(key, jwk)| {
            let jwk = if x5c {
                jwk.clone().with_certificate(&key.certificate)
            } else {
                jwk.clone()
            };
            (
                state_rank(key.state),
                key.alg.as_str(),
                key.kid.as_str(),
                jwk,
            )
        })
        .collect();
    // Keys published before the document was lost (SPEC C2), as retired;
    // their kids were checked when the document was parsed or made.
    entries.extend(doc.orphans.iter().filter_map(|orphan| {
        let jwk = orphan.public_jwk().ok()?;
        let jwk = match (&orphan.certificate, x5c) {
            (Some(certificate), true) => jwk.with_certificate(certificate),
            _ => jwk,
        };
        Some((
            state_rank(KeyState::Retired),
            orphan.alg.as_str(),
            orphan.kid.as_str(),
            jwk,
        ))
    }));
    entries.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let set = KeySet {
        keys: entries.iter().map(|entry| &entry.3).collect(),
    };
    let body = serde_json::to_vec(&set).expect("a JWKS always serializes");
    rendered(body, max_age_seconds)
}

/// A served document: the body and its strong ETag (a digest of the body,
/// quoted), shared by the JWKS and the discovery document.
pub(super) fn rendered(body: Vec<u8>, max_age_seconds: u64) -> JwksDocument {
    let etag = format!(
        "\"{}\"",
        URL_SAFE_NO_PAD.encode(&Sha256::digest(&body)[..18])
    );
    // Quoted base64url and digits: always valid header values.
    let header = |text: String| http::HeaderValue::from_str(&text).expect("an ASCII header value");
    JwksDocument {
        body: body.into(),
        etag_header: header(etag.clone()),
        cache_control: header(format!("public, max-age={max_age_seconds}")),
        etag,
        max_age_seconds,
    }
}

/// The public keys in a JWKS this keyset published (a `jwks_file`, or the
/// bytes last served): what must stay published if the stored document is
/// lost (SPEC C2). Entries that are not well-formed keyroll keys (their kid
/// the RFC 7638 thumbprint of their parameters) are left out.
pub fn parse_public_keys(body: &[u8]) -> Vec<PublicJwk> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        kty: String,
        kid: Option<String>,
        n: Option<String>,
        e: Option<String>,
        crv: Option<String>,
        x: Option<String>,
        y: Option<String>,
        x5c: Option<Vec<String>>,
    }
    let Ok(set) = serde_json::from_slice::<Set>(body) else {
        return Vec::new();
    };
    set.keys
        .into_iter()
        .filter_map(|entry| {
            let jwk = match (entry.kty.as_str(), entry.crv.as_deref()) {
                ("RSA", _) => PublicJwk::rsa(entry.n?, entry.e?),
                ("EC", Some("P-256")) => PublicJwk::ec(entry.x?, entry.y?),
                _ => return None,
            };
            if entry.kid.as_deref() != Some(jwk.kid.as_str()) {
                return None;
            }
            Some(match entry.x5c.as_ref().and_then(|chain| chain.first()) {
                Some(certificate) => jwk.with_certificate(certificate),
                None => jwk,
            })
        })
        .collect()
}
