//! Atomic file replacement, shared by the file store and the publishers:
//! a temp file in the same folder, fsync, rename over the target, fsync the
//! folder. A reader sees the old bytes or the new ones, never a mix, and a
//! crash leaves one of the two on disk.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` atomically with the given permission bits.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    // tempfile creates the file 0600, so secrets are never readable in
    // between; the final mode is set before the rename makes it visible.
    let mut tmp = tempfile::Builder::new().prefix(&prefix).tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file()
        .set_permissions(Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)?;
    remove_stale_temps(dir, &prefix);
    Ok(())
}

/// A temp file this old was left by a writer that was killed between
/// creating and renaming it (a live writer renames within milliseconds).
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes `.<name>.XXXXXX` files that killed writers left beside the
/// target: in the store folder they hold private keys. Best effort, and only
/// after a successful write, so it costs one directory read per change.
fn remove_stale_temps(dir: &Path, prefix: &std::ffi::OsStr) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = prefix.as_encoded_bytes();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        // tempfile's names: the prefix, then 6 random characters.
        if name.len() != prefix.len() + 6 || !name.starts_with(prefix) {
            continue;
        }
        let stale = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Writes only when the content or the mode differs: outputs watched by
/// other programs change only when something really changed.
/// Returns whether it wrote.
pub fn write_if_changed(path: &Path, bytes: &[u8], mode: u32) -> io::Result<bool> {
    // The current content may be a private key (signing_dir): zeroize it.
    let current = fs::read(path).map(zeroize::Zeroizing::new);
    if let (Ok(current), Ok(meta)) = (current, fs::metadata(path)) {
        if current.as_slice() == bytes && meta.permissions().mode() & 0o777 == mode {
            return Ok(false);
        }
    }
    write_atomic(path, bytes, mode)?;
    Ok(true)
}

/// Creates `dir` (and parents) if missing; a folder keyroll creates gets `mode`.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    // The umask may have narrowed or (never) widened the mode: set it exactly.
    fs::set_permissions(dir, Permissions::from_mode(mode))
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether `dir` exists and is writable, or can be created under a
/// writable parent; if not, a message for the operator naming the folder.
pub fn writable_dir(dir: &Path) -> Result<(), String> {
    let mut existing = dir;
    while !existing.exists() {
        existing = match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
    }
    if !existing.is_dir() {
        return Err(format!("{} is not a folder", existing.display()));
    }
    // Trying is the only reliable test (read-only mounts, ACLs, SELinux).
    tempfile::tempfile_in(existing)
        .map(drop)
        .map_err(|e| format!("{} is not writable: {e}", existing.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_with_mode_and_skips_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        assert!(write_if_changed(&path, b"one", 0o644).unwrap());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(!write_if_changed(&path, b"one", 0o644).unwrap());
        assert!(write_if_changed(&path, b"two", 0o600).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_write_removes_temps_that_killed_writers_left_only_when_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("default.json");
        let left = |name: &str, age_secs: u64| {
            let file = File::create(dir.path().join(name)).unwrap();
            let at = std::time::SystemTime::now() - std::time::Duration::from_secs(age_secs);
            file.set_modified(at).unwrap();
        };
        left(".default.json.aB3dE9", 3600); // a killed writer's, an hour ago
        left(".default.json.zZ9yY8", 0); // a live writer's, right now
        left(".other.json.aB3dE9", 3600); // another file's: not ours to judge
        left(".default.json.notatemp", 3600); // not tempfile's shape
        write_atomic(&path, b"doc", 0o600).unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".default.json.notatemp",
                ".default.json.zZ9yY8",
                ".other.json.aB3dE9",
                "default.json"
            ]
        );
    }
}
