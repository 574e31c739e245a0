//! Where keyset documents live. A backend stores one text document per
//! keyset and offers exactly two operations: load with a version, and save
//! only if the version is unchanged (compare-and-swap). Every change, by the
//! daemon or the CLI, is load → plan → save(expected version); on a conflict
//! the writer reloads and plans again. There is no other write path.

mod aws;
mod aws_form;
mod file;
mod memory;
pub mod watch;

use async_trait::async_trait;
use zeroize::Zeroizing;

pub use aws::{AwsStore, KEYS_INFIX, MAX_SECRET_BYTES, ORPHAN_AGE, PENDING_LABEL};
pub use file::FileStore;
pub use memory::MemoryStore;

/// An opaque token naming one stored revision of a document.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version(pub String);

/// A loaded document. The text holds private keys: zeroized on drop, and
/// `Debug` shows only the version.
pub struct Stored {
    pub text: Zeroizing<String>,
    pub version: Version,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stored({:?}, [redacted])", self.version)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The document changed (or appeared) since the version the writer
    /// expected: reload, plan again, save again.
    #[error("{location}: changed by another writer since it was read")]
    Conflict { location: String },
    /// The stored bytes cannot be a document at all (e.g. not UTF-8). Like
    /// a document that does not parse, it is reported and left untouched.
    #[error("{location}: {message}; it is left untouched")]
    Corrupt { location: String, message: String },
    /// The backend could not be reached or failed; worth retrying later.
    #[error("{location}: {message}")]
    Unavailable { location: String, message: String },
    /// The backend refused the request for a reason that lasts until an
    /// operator acts: access denied, a disabled KMS key, a secret marked for
    /// deletion, a document too large.
    #[error("{location}: {message}")]
    Rejected { location: String, message: String },
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

/// A keyset document store.
///
/// The contract every backend keeps (checked by `tests/store_battery.rs`):
///
/// - `load` returns the latest saved text with its version, or `None` if the
///   keyset was never saved. Equal versions mean equal content: a load
///   returns the version it returned before only if the content is the same.
///   (A backend may give identical text saved again the same version, as the
///   file store's content digest does; that is safe because every plan is a
///   function of the content alone.)
/// - `save(keyset, text, expected)` stores `text` only if the current
///   version is still `expected` (`None`: the document must not exist yet),
///   and returns the new version. Otherwise it stores nothing and returns
///   [`StoreError::Conflict`]. Of any number of concurrent saves against the
///   same expected version, across threads, processes and hosts, at most
///   one succeeds.
/// - A save is durable and atomic when it returns `Ok`: a crash at any point
///   leaves either the old document or the new one, never a mix.
/// - A failed save (`Unavailable`) may or may not have landed; the caller
///   finds out by loading again, which the reconcile loop always does.
/// - Documents are never deleted, only replaced. (A backend that keeps
///   private keys apart from the document, like the AWS store, deletes a
///   key's copy once a saved document no longer holds the key.)
#[async_trait]
pub trait Store: Send + Sync {
    /// Names the document for people: a path, a secret name.
    fn location(&self, keyset: &str) -> String;

    async fn load(&self, keyset: &str) -> Result<Option<Stored>, StoreError>;

    async fn save(
        &self,
        keyset: &str,
        text: &str,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError>;

    /// A cheap token that changes whenever the keyset's document changes,
    /// so an idle daemon notices a CLI's write within a second. `None` when
    /// the backend has no cheap way to tell (the daemon then relies on
    /// `reconcile_interval`); a token that changes spuriously only costs an
    /// extra reconcile.
    async fn fingerprint(&self, _keyset: &str) -> Option<String> {
        None
    }

    /// A feed that reports changes as they happen, so the daemon need not
    /// poll `fingerprint`. `None`: the backend has none (the daemon polls
    /// fingerprints, if any); `Some(Err)`: it has one that cannot work here
    /// (the daemon says why and polls). Called once, from the daemon's
    /// runtime, before its first pass.
    fn watch(&self) -> Option<Result<Box<dyn watch::ChangeFeed>, watch::WatchError>> {
        None
    }

    /// The keysets that have a document. The daemon looks for keysets that
    /// were removed from the config and are still retiring (SPEC C1), so a
    /// restart does not drop their JWKS early. A backend that cannot list
    /// answers an empty list.
    async fn keysets(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    /// Kids of keys a saved document dropped (revoke, removal) whose
    /// private keys this process has not yet seen destroyed in the backend:
    /// the daemon reports them (`keyroll_key_destruction_pending`). Empty
    /// for backends that destroy a key with the document write itself.
    fn destruction_pending(&self, _keyset: &str) -> Vec<String> {
        Vec::new()
    }

    /// The largest document the backend can hold, if it has a limit; the
    /// reconciler trims the oldest audit records to fit it.
    fn max_document_bytes(&self) -> Option<usize> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "store type \"aws-secrets-manager\": no AWS region; set store.region in the config, \
         or AWS_REGION / a profile's region in the environment"
    )]
    AwsNoRegion,
}

/// Opens the store the config names. For AWS this builds the process's
/// client (credentials are resolved at the first request).
pub async fn open(
    settings: &crate::config::StoreSettings,
) -> Result<std::sync::Arc<dyn Store>, OpenError> {
    match settings {
        crate::config::StoreSettings::File { dir } => {
            Ok(std::sync::Arc::new(FileStore::new(dir.clone())))
        }
        crate::config::StoreSettings::AwsSecretsManager(aws) => {
            Ok(std::sync::Arc::new(AwsStore::connect(aws).await?))
        }
    }
}
