//! An in-process store for tests: the same contract as the others, no I/O.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::{Store, StoreError, Stored, Version};

#[derive(Default)]
pub struct MemoryStore {
    // A std Mutex is right here: it is never held across an await.
    documents: Mutex<HashMap<String, (Zeroizing<String>, u64)>>,
    counter: std::sync::atomic::AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn location(&self, keyset: &str) -> String {
        format!("memory:{keyset}")
    }

    async fn load(&self, keyset: &str) -> Result<Option<Stored>, StoreError> {
        let documents = self.documents.lock().unwrap_or_else(|e| e.into_inner());
        Ok(documents.get(keyset).map(|(text, version)| Stored {
            text: text.clone(),
            version: Version(version.to_string()),
        }))
    }

    async fn save(
        &self,
        keyset: &str,
        text: &str,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let mut documents = self.documents.lock().unwrap_or_else(|e| e.into_inner());
        let current = documents.get(keyset).map(|(_, v)| Version(v.to_string()));
        if current.as_ref() != expected {
            return Err(StoreError::Conflict {
                location: self.location(keyset),
            });
        }
        let version = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        documents.insert(
            keyset.to_string(),
            (Zeroizing::new(text.to_string()), version),
        );
        Ok(Version(version.to_string()))
    }

    async fn keysets(&self) -> Result<Vec<String>, StoreError> {
        let documents = self.documents.lock().unwrap_or_else(|e| e.into_inner());
        Ok(documents.keys().cloned().collect())
    }
}
