//! File outputs: `jwks_file` (0644, the HTTP bytes) and `signing_dir` (0600:
//! per algorithm `<ALG>.pem` and `<ALG>.kid`, and `signing.json`), each
//! replaced atomically and only when its content changes.

use std::path::Path;

use serde::Serialize;

use crate::document::{KeyState, KeysetDoc};
use crate::fsutil;
use crate::key::{Alg, KeyError, PrivateJwk, PrivateKey};

pub const SIGNING_JSON: &str = "signing.json";

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    File(#[from] fsutil::FsError),
    #[error("cannot read the active {alg} key for {path}: {source}")]
    Key {
        path: String,
        alg: Alg,
        source: KeyError,
    },
}

/// Returns whether the file changed.
pub fn write_jwks_file(path: &Path, body: &[u8]) -> Result<bool, OutputError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsutil::ensure_dir(parent, 0o755)?;
    }
    Ok(fsutil::write_if_changed(path, body, 0o644)?)
}

#[derive(Serialize)]
struct SigningKeys<'a> {
    keys: &'a [PrivateJwk],
}

/// Writes the active keys of `doc` for a co-located signer. `<ALG>.pem` and
/// `<ALG>.kid` come first and `signing.json` last: a signer that reads
/// `signing.json` always gets a key and its kid from one consistent write.
/// Files of algorithms with no active key are removed. Returns whether
/// anything changed.
pub fn write_signing_dir(dir: &Path, doc: &KeysetDoc) -> Result<bool, OutputError> {
    let folder = fsutil::Dir::create(dir, 0o700)?;
    let mut changed = false;
    let mut private_jwks = Vec::new();
    for alg in Alg::ALL {
        let (pem_name, kid_name) = (format!("{alg}.pem"), format!("{alg}.kid"));
        let pem_path = dir.join(&pem_name);
        let Some(key) = doc.key(alg, KeyState::Active) else {
            for stale in [&pem_name, &kid_name] {
                changed |= folder.remove(stale)?;
            }
            continue;
        };
        let parsed =
            PrivateKey::from_pem(alg, &key.private_key_pem).map_err(|source| OutputError::Key {
                path: pem_path.display().to_string(),
                alg,
                source,
            })?;
        private_jwks.push(PrivateJwk::from_private(&parsed));
        changed |=
            folder.write_if_changed(&pem_name, key.private_key_pem.expose().as_bytes(), 0o600)?;
        changed |= folder.write_if_changed(&kid_name, key.kid.as_bytes(), 0o600)?;
    }
    // Written once into a buffer of its exact size, zeroized on drop.
    let json = crate::secret_json::to_vec(&SigningKeys {
        keys: &private_jwks,
    });
    changed |= folder.write_if_changed(SIGNING_JSON, &json, 0o600)?;
    Ok(changed)
}
