//! One reconcile of one keyset: load → plan → make keys → apply → save with
//! the expected version; on a conflict, reload and plan again. What it
//! returns is only ever a document the store accepted (or already held), so
//! nothing downstream can publish a key the store does not have.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::clock::{Clock, Timestamp};
use crate::config::KeysetPolicy;
use crate::document::{AuditRecord, DocumentError, KeysetDoc, StructureError};
use crate::key::{Alg, KeyError, KeyFactory, NewKey, PublicJwk};
use crate::planner::{self, Action, Plan, PlanError, Step};
use crate::store::{Store, StoreError, Version};

/// Conflicts in a row after which a reconcile gives up until the next pass.
/// Each conflict means another writer made progress, so this only trips
/// under pathological contention.
pub const MAX_CONFLICTS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("keyset {keyset:?}: {source}")]
    Key { keyset: String, source: KeyError },
    #[error("keyset {keyset:?}: refusing to save a document that breaks the stored-document rules ({problem}); this is a keyroll bug, please report it")]
    Inconsistent {
        keyset: String,
        problem: StructureError,
    },
    #[error("{location}: gave up after {attempts} conflicting writes in a row; will try again")]
    Contention { location: String, attempts: u32 },
}

/// A keyset as the store holds it, with the public JWKs of its keys.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub doc: KeysetDoc,
    /// `None`: the keyset has never been saved.
    pub version: Option<Version>,
    /// The public JWK of each key, in the order of `doc.keys`.
    pub jwks: Vec<PublicJwk>,
}

#[derive(Debug)]
pub struct Outcome {
    pub snapshot: Snapshot,
    /// The plan that was carried out (or that had nothing to do).
    pub plan: Plan,
    /// The transitions this reconcile saved, in order.
    pub committed: Vec<AuditRecord>,
    /// Conflicts met (and resolved) on the way.
    pub conflicts: u32,
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyFactory>,
    clock: Arc<dyn Clock>,
    /// Verified JWKs per keyset and version: re-parsing every private key
    /// on every pass would cost far more than reading the document.
    verified: Mutex<HashMap<String, (Version, Vec<PublicJwk>)>>,
}

impl Reconciler {
    pub fn new(store: Arc<dyn Store>, keys: Arc<dyn KeyFactory>, clock: Arc<dyn Clock>) -> Self {
        Reconciler {
            store,
            keys,
            clock,
            verified: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Loads, parses and verifies the stored keyset; an empty keyset if it
    /// was never saved.
    pub async fn load(&self, keyset: &str) -> Result<Snapshot, ReconcileError> {
        let location = self.store.location(keyset);
        let Some(stored) = self.store.load(keyset).await? else {
            return Ok(Snapshot {
                doc: KeysetDoc::new(keyset),
                version: None,
                jwks: Vec::new(),
            });
        };
        let doc = KeysetDoc::parse(&stored.text, keyset, &location)?;
        let cached = {
            let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            verified
                .get(keyset)
                .filter(|(version, _)| *version == stored.version)
                .map(|(_, jwks)| jwks.clone())
        };
        let jwks = match cached {
            Some(jwks) => jwks,
            None => {
                let jwks = doc.public_jwks(self.keys.as_ref(), &location)?;
                self.remember(keyset, &stored.version, &jwks);
                jwks
            }
        };
        Ok(Snapshot {
            doc,
            version: Some(stored.version),
            jwks,
        })
    }

    /// SPEC C5: the snapshot a replica cut off from the store publishes at
    /// `now`, following the plan of the last document it loaded;
    /// `loaded_at`: when the snapshot was loaded (transitions between then
    /// and `now` happen at their own instants).
    pub fn project(
        snapshot: &Snapshot,
        policy: &KeysetPolicy,
        loaded_at: Timestamp,
        now: Timestamp,
    ) -> Snapshot {
        let doc = planner::project(now, loaded_at, &snapshot.doc, policy);
        let jwks = doc
            .keys
            .iter()
            .filter_map(|key| {
                snapshot
                    .doc
                    .keys
                    .iter()
                    .zip(&snapshot.jwks)
                    .find(|(old, _)| old.kid == key.kid)
                    .map(|(_, jwk)| jwk.clone())
            })
            .collect();
        Snapshot {
            doc,
            version: snapshot.version.clone(),
            jwks,
        }
    }

    fn remember(&self, keyset: &str, version: &Version, jwks: &[PublicJwk]) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified.insert(keyset.to_string(), (version.clone(), jwks.to_vec()));
    }

    /// Brings one keyset up to date (and carries out `action`, if any).
    pub async fn reconcile(
        &self,
        policy: &KeysetPolicy,
        action: Option<&Action>,
    ) -> Result<Outcome, ReconcileError> {
        self.reconcile_with(policy, action, &planner::Published::default())
            .await
    }

    /// [`Reconciler::reconcile`], knowing which public keys this keyset had
    /// published: should its document be missing, they stay published and
    /// no key is activated at once (SPEC C2).
    pub async fn reconcile_with(
        &self,
        policy: &KeysetPolicy,
        action: Option<&Action>,
        published_before: &planner::Published,
    ) -> Result<Outcome, ReconcileError> {
        let mut conflicts = 0;
        loop {
            let snapshot = self.load(&policy.name).await?;
            let now = self.clock.now();
            let nothing = planner::Published::default();
            let known = if snapshot.version.is_none() {
                published_before
            } else {
                &nothing
            };
            let plan = planner::plan_with(now, &snapshot.doc, policy, action, known)?;
            if plan.steps.is_empty() {
                return Ok(Outcome {
                    snapshot,
                    plan,
                    committed: Vec::new(),
                    conflicts,
                });
            }
            let (mut doc, committed, fresh_jwks) =
                self.carry_out(policy, &snapshot.doc, &plan).await?;
            // The same rules a load enforces: a planner bug must fail this
            // reconcile, not store a document every later load refuses.
            doc.check_structure(&policy.name)
                .map_err(|problem| ReconcileError::Inconsistent {
                    keyset: policy.name.clone(),
                    problem,
                })?;
            let limit = self.store.max_document_bytes();
            let text = doc
                .to_json_within(limit)
                .map_err(|size| StoreError::Rejected {
                    location: self.store.location(&policy.name),
                    message: format!(
                        "the keyset document needs {size} bytes and the store holds at most {}; \
                         use fewer algorithms or smaller RSA keys in this keyset",
                        limit.unwrap_or_default()
                    ),
                })?;
            match self
                .store
                .save(&policy.name, &text, snapshot.version.as_ref())
                .await
            {
                Ok(version) => {
                    let jwks = self.jwks_after(&snapshot, &doc, fresh_jwks)?;
                    self.remember(&policy.name, &version, &jwks);
                    return Ok(Outcome {
                        snapshot: Snapshot {
                            doc,
                            version: Some(version),
                            jwks,
                        },
                        plan,
                        committed,
                        conflicts,
                    });
                }
                Err(e) if e.is_conflict() => {
                    conflicts += 1;
                    tracing::debug!(keyset = %policy.name, conflicts, "store conflict; planning again");
                    if conflicts >= MAX_CONFLICTS {
                        return Err(ReconcileError::Contention {
                            location: self.store.location(&policy.name),
                            attempts: conflicts,
                        });
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Makes the new keys the plan needs (off the async runtime: RSA
    /// generation takes up to seconds) and applies the plan to a copy.
    async fn carry_out(
        &self,
        policy: &KeysetPolicy,
        doc: &KeysetDoc,
        plan: &Plan,
    ) -> Result<(KeysetDoc, Vec<AuditRecord>, Vec<PublicJwk>), ReconcileError> {
        let wanted: Vec<Alg> = plan
            .steps
            .iter()
            .filter_map(|step| match step {
                Step::Create { alg, .. } => Some(*alg),
                _ => None,
            })
            .collect();
        let mut fresh = self.generate(policy, &wanted, plan.now).await?;
        let mut fresh_jwks = Vec::new();
        fresh.reverse();
        let mut doc = doc.clone();
        let keys = self.keys.clone();
        let committed = planner::apply(&mut doc, plan, policy, &mut |alg| {
            let key = fresh
                .pop()
                .filter(|k| k.alg == alg)
                .ok_or(KeyError::Generation { alg })?;
            fresh_jwks.push(keys.public_jwk(alg, &key.private_key_pem)?);
            Ok::<NewKey, KeyError>(key)
        })
        .map_err(|source| ReconcileError::Key {
            keyset: policy.name.clone(),
            source,
        })?;
        Ok((doc, committed, fresh_jwks))
    }

    async fn generate(
        &self,
        policy: &KeysetPolicy,
        algs: &[Alg],
        created_at: Timestamp,
    ) -> Result<Vec<NewKey>, ReconcileError> {
        if self.keys.generates_instantly() {
            return algs
                .iter()
                .map(|&alg| {
                    self.keys
                        .generate(alg, policy.rsa_bits, &policy.name, created_at)
                        .map_err(|source| ReconcileError::Key {
                            keyset: policy.name.clone(),
                            source,
                        })
                })
                .collect();
        }
        let tasks: Vec<_> = algs
            .iter()
            .map(|&alg| {
                let keys = self.keys.clone();
                let (bits, subject) = (policy.rsa_bits, policy.name.clone());
                tokio::task::spawn_blocking(move || keys.generate(alg, bits, &subject, created_at))
            })
            .collect();
        let mut made = Vec::with_capacity(tasks.len());
        for task in tasks {
            let key = task
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
                .map_err(|source| ReconcileError::Key {
                    keyset: policy.name.clone(),
                    source,
                })?;
            made.push(key);
        }
        Ok(made)
    }

    /// The JWKs of a saved document: the old keys' from the snapshot, the
    /// new keys' as they were made.
    fn jwks_after(
        &self,
        before: &Snapshot,
        doc: &KeysetDoc,
        fresh: Vec<PublicJwk>,
    ) -> Result<Vec<PublicJwk>, ReconcileError> {
        let mut known: HashMap<&str, &PublicJwk> = before
            .doc
            .keys
            .iter()
            .zip(&before.jwks)
            .map(|(key, jwk)| (key.kid.as_str(), jwk))
            .collect();
        for jwk in &fresh {
            known.insert(jwk.kid.as_str(), jwk);
        }
        doc.keys
            .iter()
            .map(|key| {
                known
                    .get(key.kid.as_str())
                    .map(|jwk| (*jwk).clone())
                    .ok_or_else(|| ReconcileError::Key {
                        keyset: doc.keyset.clone(),
                        source: KeyError::Generation { alg: key.alg },
                    })
            })
            .collect()
    }
}
