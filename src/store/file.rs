//! The embedded default store: `<dir>/<keyset>.json`, mode 0600 in a 0700
//! folder, replaced atomically; compare-and-swap under an advisory lock on
//! `<dir>/.<keyset>.lock`, so the daemon and CLI processes on one host (or
//! on a shared POSIX filesystem with working `flock`) never lose an update.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{Store, StoreError, Stored, Version};
use crate::fsutil::{Dir, FsError};

/// The largest document the file store writes and reads; a file beyond it
/// is refused unread (a FIFO or `/dev/zero` planted there never hangs a read).
pub const MAX_DOCUMENT_BYTES: usize = 16 << 20;

pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStore { dir: dir.into() }
    }

    pub fn path(&self, keyset: &str) -> PathBuf {
        self.dir.join(format!("{keyset}.json"))
    }

    fn file_name(keyset: &str) -> String {
        format!("{keyset}.json")
    }

    fn lock_name(keyset: &str) -> String {
        format!(".{keyset}.lock")
    }
}

/// The version of a file is the digest of its bytes: it changes exactly when
/// the content does, and survives restarts without extra state.
fn version_of(bytes: &[u8]) -> Version {
    let digest = Sha256::digest(bytes);
    Version(digest[..12].iter().map(|b| format!("{b:02x}")).collect())
}

impl FileStore {
    fn unavailable(&self, keyset: &str, what: &str, e: io::Error) -> StoreError {
        StoreError::Unavailable {
            location: self.path(keyset).display().to_string(),
            message: format!("{what}: {e}"),
        }
    }

    /// A path that is unsafe or not a file lasts until an operator acts;
    /// a failing read or write may pass.
    fn refused(&self, keyset: &str, e: FsError) -> StoreError {
        let location = self.path(keyset).display().to_string();
        let message = e.to_string();
        match e {
            FsError::Io { .. } => StoreError::Unavailable { location, message },
            _ => StoreError::Rejected { location, message },
        }
    }

    fn load_blocking(&self, keyset: &str) -> Result<Option<Stored>, StoreError> {
        let path = self.path(keyset);
        let dir = match Dir::open(&self.dir) {
            Ok(dir) => dir,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(self.refused(keyset, e)),
        };
        let Some(bytes) = dir
            .read(&Self::file_name(keyset), MAX_DOCUMENT_BYTES)
            .map_err(|e| self.refused(keyset, e))?
        else {
            return Ok(None);
        };
        let version = version_of(&bytes);
        // Checked in place, then copied once at its exact size: a refused
        // `String::from_utf8` would drop its copy unwiped.
        let text = std::str::from_utf8(&bytes).map_err(|_| StoreError::Corrupt {
            location: path.display().to_string(),
            message: "not a keyroll keyset document (not UTF-8 text)".to_string(),
        })?;
        Ok(Some(Stored {
            text: Zeroizing::new(text.to_owned()),
            version,
        }))
    }

    fn save_blocking(
        &self,
        keyset: &str,
        text: &str,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let dir = Dir::create(&self.dir, 0o700).map_err(|e| self.refused(keyset, e))?;
        let lock = dir
            .open_lock(&Self::lock_name(keyset))
            .map_err(|e| self.refused(keyset, e))?;
        // Held until `lock` is dropped at the end of this function; a process
        // that dies holding it releases it with its file descriptors.
        File::lock(&lock).map_err(|e| self.unavailable(keyset, "cannot take the lock", e))?;
        let path = self.path(keyset);
        let current = dir
            .read(&Self::file_name(keyset), MAX_DOCUMENT_BYTES)
            .map_err(|e| self.refused(keyset, e))?;
        let current_version = current.as_ref().map(|bytes| version_of(bytes));
        if current_version.as_ref() != expected {
            return Err(StoreError::Conflict {
                location: path.display().to_string(),
            });
        }
        dir.write_atomic(&Self::file_name(keyset), text.as_bytes(), 0o600)
            .map_err(|e| self.refused(keyset, e))?;
        // Every writer holds the lock, so any temp file left now is a killed
        // writer's, whatever its age, and may hold keys this save dropped (a
        // revoke): removed now, not a minute later.
        dir.remove_dead_writers_temps(&Self::file_name(keyset));
        Ok(version_of(text.as_bytes()))
    }
}

#[async_trait]
impl Store for FileStore {
    fn location(&self, keyset: &str) -> String {
        self.path(keyset).display().to_string()
    }

    /// What a load reads at most: a document never outgrows it.
    fn max_document_bytes(&self) -> Option<usize> {
        Some(MAX_DOCUMENT_BYTES)
    }

    async fn load(&self, keyset: &str) -> Result<Option<Stored>, StoreError> {
        let store = FileStore::new(self.dir.clone());
        let keyset = keyset.to_string();
        tokio::task::spawn_blocking(move || store.load_blocking(&keyset))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    async fn save(
        &self,
        keyset: &str,
        text: &str,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let store = FileStore::new(self.dir.clone());
        let keyset = keyset.to_string();
        let text = Zeroizing::new(text.to_string());
        let expected = expected.cloned();
        tokio::task::spawn_blocking(move || store.save_blocking(&keyset, &text, expected.as_ref()))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// `<keyset>.json` files; temp and lock files start with a dot.
    async fn keysets(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.dir.clone();
        let location = self.dir.display().to_string();
        let listed = tokio::task::spawn_blocking(move || -> io::Result<Vec<String>> {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut names = Vec::new();
            for entry in entries {
                let name = entry?.file_name();
                let Some(keyset) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                    continue;
                };
                if !keyset.starts_with('.') && !keyset.is_empty() {
                    names.push(keyset.to_string());
                }
            }
            Ok(names)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        listed.map_err(|e| StoreError::Unavailable {
            location,
            message: format!("cannot list the store folder: {e}"),
        })
    }

    /// Every save renames a new file into place, so the inode alone would
    /// do; mtime and size also catch an operator editing the file in place.
    async fn fingerprint(&self, keyset: &str) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        match tokio::fs::metadata(self.path(keyset)).await {
            Ok(meta) => Some(format!(
                "{}:{}.{}:{}",
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.len()
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some("absent".to_string()),
            Err(_) => None,
        }
    }

    /// The folder, watched with inotify: a save renames a file into it.
    fn watch(&self) -> Option<Result<Box<dyn super::watch::ChangeFeed>, super::watch::WatchError>> {
        Some(
            super::watch::FolderWatch::new(self.dir.clone())
                .map(|watch| Box::new(watch) as Box<dyn super::watch::ChangeFeed>),
        )
    }
}
