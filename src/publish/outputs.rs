//! File outputs: `jwks_file` (0644, the HTTP bytes) and `signing_dir` (0600:
//! per algorithm `<ALG>.pem` and `<ALG>.kid`, and `signing.json`), each
//! replaced atomically and only when its content changes.

use std::io;
use std::path::Path;

use serde::Serialize;

use crate::document::{KeyState, KeysetDoc};
use crate::fsutil;
use crate::key::{Alg, KeyError, PrivateJwk, PrivateKey};

pub const SIGNING_JSON: &str = "signing.json";

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("cannot read the active {alg} key for {path}: {source}")]
    Key {
        path: String,
        alg: Alg,
        source: KeyError,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Returns whether the file changed.
pub fn write_jwks_file(path: &Path, body: &[u8]) -> Result<bool, OutputError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsutil::ensure_dir(parent, 0o755).map_err(io_error(parent))?;
    }
    fsutil::write_if_changed(path, body, 0o644).map_err(io_error(path))
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
    fsutil::ensure_dir(dir, 0o700).map_err(io_error(dir))?;
    let mut changed = false;
    let mut private_jwks = Vec::new();
    for alg in Alg::ALL {
        let pem_path = dir.join(format!("{alg}.pem"));
        let kid_path = dir.join(format!("{alg}.kid"));
        let Some(key) = doc.key(alg, KeyState::Active) else {
            for stale in [&pem_path, &kid_path] {
                match std::fs::remove_file(stale) {
                    Ok(()) => changed = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(stale)(e)),
                }
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
            fsutil::write_if_changed(&pem_path, key.private_key_pem.expose().as_bytes(), 0o600)
                .map_err(io_error(&pem_path))?;
        changed |= fsutil::write_if_changed(&kid_path, key.kid.as_bytes(), 0o600)
            .map_err(io_error(&kid_path))?;
    }
    // Written once into a buffer of its exact size, zeroized on drop.
    let json = crate::secret_json::to_vec(&SigningKeys {
        keys: &private_jwks,
    });
    let json_path = dir.join(SIGNING_JSON);
    changed |= fsutil::write_if_changed(&json_path, &json, 0o600).map_err(io_error(&json_path))?;
    Ok(changed)
}
