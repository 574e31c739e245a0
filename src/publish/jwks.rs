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
    JwksDocument {
        body: body.into(),
        etag,
        max_age_seconds,
    }
}
