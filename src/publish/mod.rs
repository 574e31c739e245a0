//! Everything keyroll publishes, always from a document the store accepted:
//! the JWKS bytes (served over HTTP and written to `jwks_file`), the
//! signing keys in `signing_dir`, and, for keysets that ask for them, the
//! OpenID discovery document (HTTP, `discovery_file`) and S3 copies of both.

pub mod discovery;
mod extra;
pub mod http;
mod jwks;
mod outputs;
pub mod s3;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use extra::ExtraOutputs;
pub use jwks::{parse_public_keys, render, JwksDocument};
pub use outputs::{write_jwks_file, write_signing_dir, SIGNING_JSON};

/// The public keys a keyset's `jwks_file` holds: should its document be
/// missing, neither the daemon nor a CLI write may silently bootstrap it
/// (SPEC C2).
pub fn published_in_jwks_file(policy: &crate::config::KeysetPolicy) -> crate::planner::Published {
    let keys = policy
        .jwks_file
        .as_ref()
        .and_then(|path| read_small_file(path))
        .map(|body| parse_public_keys(&body))
        .unwrap_or_default();
    crate::planner::Published {
        keys,
        // The file holds no timings: the current grace applies.
        longest_grace: std::time::Duration::ZERO,
    }
}

/// A regular file's bytes, if it is one and holds at most 1 MiB (a JWKS
/// holds a few KiB): a FIFO or a device planted at the path is not read.
fn read_small_file(path: &std::path::Path) -> Option<Vec<u8>> {
    use std::io::Read;
    const LIMIT: u64 = 1 << 20;
    // Checked before opening: opening a FIFO for reading blocks.
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > LIMIT {
        return None;
    }
    let file = std::fs::File::open(path).ok()?;
    let mut body = Vec::new();
    file.take(LIMIT).read_to_end(&mut body).ok()?;
    Some(body)
}

/// What the HTTP server serves, swapped whole on every change so a request
/// never waits for a reconcile.
#[derive(Clone, Default)]
pub struct Served {
    /// Keyset name → its current JWKS.
    pub keysets: HashMap<String, Arc<JwksDocument>>,
    /// The keyset behind `/.well-known/jwks.json`.
    pub default_keyset: Option<String>,
    /// Keysets the config names; `/readyz` waits for all of them.
    pub expected: Vec<String>,
    /// Keysets that failed closed (SPEC C5), with why: `/readyz` answers
    /// 503 while any is here, though their last JWKS is still served.
    pub failed_closed: BTreeMap<String, String>,
    /// The `(alg, kid)` of each key signers are offered, per keyset: what
    /// `signing_dir` holds. Empty when signing keys are withheld.
    pub offered: HashMap<String, Vec<(crate::key::Alg, String)>>,
    /// OpenID discovery routes (discovery documents, `jwks_uri` paths).
    pub routes: Arc<discovery::Routes>,
    /// Keyset name → the signer's keys, from the same snapshot as its JWKS
    /// (empty without a `[signer]` table).
    pub signing: HashMap<String, Arc<crate::signer::Keyring>>,
}

impl Served {
    pub fn ready(&self) -> bool {
        self.not_ready().is_empty()
    }

    /// Why `/readyz` answers 503: nothing when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let unpublished = self
            .expected
            .iter()
            .filter(|name| !self.keysets.contains_key(*name))
            .map(|name| format!("keyset {name} not yet published"));
        let closed = self
            .failed_closed
            .iter()
            .map(|(name, why)| format!("keyset {name} failed closed: {why}"));
        unpublished.chain(closed).collect()
    }
}

pub type ServedState = Arc<ArcSwap<Served>>;
