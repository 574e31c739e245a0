//! Everything keyroll publishes, always from a document the store accepted:
//! the JWKS bytes (served over HTTP and written to `jwks_file`) and the
//! signing keys in `signing_dir`.

pub mod http;
mod jwks;
mod outputs;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use jwks::{render, JwksDocument};
pub use outputs::{write_jwks_file, write_signing_dir, SIGNING_JSON};

/// What the HTTP server serves, swapped whole on every change so a request
/// never waits for a reconcile.
#[derive(Default)]
pub struct Served {
    /// Keyset name → its current JWKS.
    pub keysets: HashMap<String, Arc<JwksDocument>>,
    /// The keyset behind `/.well-known/jwks.json`.
    pub default_keyset: Option<String>,
    /// Keysets the config names; `/readyz` waits for all of them.
    pub expected: Vec<String>,
    /// Keyset name → the signer's keys, from the same snapshot as its JWKS
    /// (empty without a `[signer]` table).
    pub signing: HashMap<String, Arc<crate::signer::Keyring>>,
}

impl Served {
    pub fn ready(&self) -> bool {
        self.expected
            .iter()
            .all(|name| self.keysets.contains_key(name))
    }
}

pub type ServedState = Arc<ArcSwap<Served>>;
