//! The AWS Secrets Manager store: one secret per keyset, named
//! `<secret_prefix><keyset>`, whose `AWSCURRENT` version holds the keyset
//! document, and one *key secret* per private key,
//! `<secret_prefix><keyset>/keys/<kid>`, which the document names. Many
//! replicas and the CLI share a secret safely through a compare-and-swap
//! built on version ids and staging labels.
//!
//! # Private keys in key secrets
//!
//! Moving `AWSCURRENT` leaves older documents readable (`AWSPREVIOUS`, and
//! unlabelled versions by id), and Secrets Manager cannot delete a version.
//! So no document version holds a private key (schema 3, `aws_form`): a
//! save creates the key secrets of keys the expected document did not
//! name, then compare-and-swaps the document, then deletes with
//! `ForceDeleteWithoutRecovery` the key secrets of keys it dropped (listed
//! under `destroying` until seen gone, so any process retries a failed
//! deletion at its next load). A save that loses deletes the key secrets
//! it made; key secrets a crash orphaned are swept after [`ORPHAN_AGE`].
//! Key secrets never change, so their values are cached: an idle pass
//! reads the document alone. `docs/ARCHITECTURE.md` ("Revoked means
//! destroyed on AWS") defends each step.
//!
//! # The compare-and-swap protocol
//!
//! A document's [`Version`] is the id of the secret version that holds it.
//!
//! - **load**: `GetSecretValue(VersionStage=AWSCURRENT)`, keeping its
//!   `VersionId`. The stage is always named: without it, some emulators
//!   return a stale version after a label move.
//! - **save, expected version `E`**:
//!   1. `PutSecretValue` with a fresh `ClientRequestToken` `T` (which becomes
//!      the new `VersionId`) and `VersionStages=[keyroll-pending]`. The new
//!      version is stored but not current: no reader sees it yet.
//!   2. `UpdateSecretVersionStage(AWSCURRENT, MoveToVersionId=T,
//!      RemoveFromVersionId=E)`. Secrets Manager carries out the move only
//!      while `AWSCURRENT` is still on `E`, atomically, so of any number of
//!      writers that expected `E`, one wins.
//!   3. A refused move is a conflict, unless `AWSCURRENT` is on `T` already
//!      (our move landed but its answer was lost): `DescribeSecret` tells
//!      which. The loser takes `keyroll-pending` off its version, leaving it
//!      unlabelled, and Secrets Manager deletes it in time.
//! - **save, no expected version** (the keyset is new): `CreateSecret` with
//!   the document, `T`, `kms_key_id` and the tags; `ResourceExistsException`
//!   is a conflict. A secret that exists without a value (created by
//!   Terraform, say) gets its first version through step 1 alone: Secrets
//!   Manager makes a secret's first version `AWSCURRENT`, and only one can
//!   be first.
//!
//! One staging label shared by all writers, rather than one per writer:
//! Secrets Manager moves a label that is put on a new version, so a writer
//! that crashes between steps 1 and 2 leaves nothing behind that can pile up
//! to the quota of 20 labels per secret.
//!
//! Every request retries throttling and transient failures itself (the SDK's
//! standard mode: exponential backoff with jitter) within a time budget, so
//! a frozen endpoint fails a reconcile in seconds instead of hanging it. A
//! `ClientRequestToken` makes a retried `PutSecretValue` idempotent.
//!
//! # Cost
//!
//! A reconcile that changes nothing makes one `GetSecretValue` per keyset.
//! A save makes two calls (`CreateSecret`: one), plus one `CreateSecret` per
//! new key and one `DeleteSecret` per dropped key, plus one `DescribeSecret`
//! and one label removal when it loses. A process reads each key secret once
//! and lists a keyset's key secrets (`ListSecrets`) at its first load and
//! hourly. There is no change polling: the
//! backend has no call cheap enough to make twice a second, so replicas
//! notice each other's writes at `reconcile_interval`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_secretsmanager::config::http::HttpResponse;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::types::Tag;
use aws_sdk_secretsmanager::Client;
use zeroize::Zeroizing;

use super::aws_form::{self, KeyMaterial, Referencing, Split};
use super::{OpenError, Store, StoreError, Stored, Version};
use crate::aws::error_chain;
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::config::AwsSettings;

/// The staging label of a version that is written but not yet current.
pub const PENDING_LABEL: &str = "keyroll-pending";
const CURRENT_LABEL: &str = "AWSCURRENT";
/// The most a secret value may hold.
pub const MAX_SECRET_BYTES: usize = 65_536;
/// What the stored form of a document may need beyond its inline form: a
/// key secret's name can be longer than the key it replaces (a long
/// `secret_prefix`; the tiny fake keys of tests), and the stored form adds
/// the kids still to destroy. A document whose stored form is larger still
/// is refused (`Rejected`), never cut.
pub const REFERENCE_ROOM: usize = 4096;

/// Error codes that say "try again later", whatever the operation.
const TRANSIENT_CODES: &[&str] = &[
    "InternalServiceError",
    "InternalFailure",
    "ServiceUnavailable",
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// The part of a key secret's name between the keyset and the kid:
/// `<secret_prefix><keyset>/keys/<kid>`. Keyset names hold no `/`, so no
/// key secret can be taken for a keyset's document.
pub const KEYS_INFIX: &str = "/keys/";
/// An unreferenced key secret younger than this is never swept: it may
/// belong to a save still on its way to the compare-and-swap. A save gives
/// up before [`WRITE_SPAN`], far below this; an orphan never signed
/// anything (no committed document named it), so keeping it a day costs
/// nothing but a day's storage.
pub const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The longest a save may take from creating its first key secret to its
/// compare-and-swap; a save that took longer gives up and deletes them.
pub const WRITE_SPAN: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// How often a process looks for orphaned key secrets of a keyset (and at
/// its first load of each keyset).
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

pub struct AwsStore {
    client: Client,
    prefix: String,
    region: String,
    kms_key_id: Option<String>,
    tags: BTreeMap<String, String>,
    /// Compared with the secrets' creation dates by the orphan sweep.
    clock: Arc<dyn Clock>,
    // A std Mutex is right here: it is never held across an await.
    memory: Mutex<Memory>,
}

/// What this process knows of the key secrets.
#[derive(Default)]
struct Memory {
    /// Private keys by secret name. Key secrets never change once created,
    /// so a value read once stays right until its key is dropped; an idle
    /// pass then reads the document alone.
    values: HashMap<String, Zeroizing<String>>,
    /// Per keyset: the last document version seen and what it referenced.
    seen: HashMap<String, Seen>,
    /// Per keyset: kids whose key secrets this process saw deleted (or
    /// found gone).
    destroyed: HashMap<String, BTreeSet<String>>,
    /// Per keyset: when this process last swept its orphans.
    swept_at: HashMap<String, Timestamp>,
}

#[derive(Clone, Default)]
struct Seen {
    version: Option<Version>,
    /// Kids whose private keys the document keeps in key secrets.
    refs: BTreeSet<String>,
    /// Kids the document dropped whose key secrets are to be deleted.
    destroying: BTreeSet<String>,
}

impl AwsStore {
    /// Builds the one client this process uses, from the settings and the
    /// standard AWS chain: credentials from the environment, profile, web
    /// identity (IRSA) or instance metadata; `AWS_ENDPOINT_URL` honoured.
    /// Credentials are resolved at the first request, not here.
    pub async fn connect(settings: &AwsSettings) -> Result<Self, OpenError> {
        let sdk_config = crate::aws::sdk_config(&crate::aws::Overrides {
            region: settings.region.clone(),
            endpoint_url: settings.endpoint_url.clone(),
        })
        .await;
        let region = sdk_config
            .region()
            .map(|r| r.to_string())
            .ok_or(OpenError::AwsNoRegion)?;
        Ok(Self {
            client: Client::new(&sdk_config),
            prefix: settings.secret_prefix.clone(),
            region,
            kms_key_id: settings.kms_key_id.clone(),
            tags: settings.tags.clone(),
            clock: Arc::new(SystemClock),
            memory: Mutex::new(Memory::default()),
        })
    }

    /// The clock the orphan sweep compares secrets' creation dates with
    /// (tests hand in a fake one).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn secret_name(&self, keyset: &str) -> String {
        format!("{}{keyset}", self.prefix)
    }

    /// The id of the version `AWSCURRENT` is on, if any, without reading
    /// (or decrypting) the value.
    async fn current_version(&self, keyset: &str) -> Result<Option<String>, StoreError> {
        let described = match self
            .client
            .describe_secret()
            .secret_id(self.secret_name(keyset))
            .send()
            .await
        {
            Ok(described) => described,
            Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(None),
            Err(e) => return Err(self.failure(keyset, "DescribeSecret", e)),
        };
        Ok(described
            .version_ids_to_stages
            .unwrap_or_default()
            .into_iter()
            .find(|(_, stages)| stages.iter().any(|s| s == CURRENT_LABEL))
            .map(|(version, _)| version))
    }

    /// Stores `text` as a new version labelled `keyroll-pending`; returns
    /// the labels the new version got (`AWSCURRENT` among them when it is
    /// the secret's first version).
    async fn put_pending(
        &self,
        keyset: &str,
        text: &str,
        token: &str,
    ) -> Result<Vec<String>, StoreError> {
        let put = self
            .client
            .put_secret_value()
            .secret_id(self.secret_name(keyset))
            .secret_string(text)
            .client_request_token(token)
            .version_stages(PENDING_LABEL)
            .send()
            .await;
        match put {
            Ok(out) => Ok(out.version_stages.unwrap_or_default()),
            // Deleted since it was read: the expected version is gone.
            Err(e) if e.code() == Some("ResourceNotFoundException") => Err(self.conflict(keyset)),
            Err(e) => Err(self.failure(keyset, "PutSecretValue", e)),
        }
    }

    /// After losing: the loser's version keeps no label, so it neither
    /// counts towards the label quota nor looks like a write in progress.
    /// Best effort: the label may have moved to another writer's version.
    async fn drop_pending(&self, keyset: &str, version: &str) {
        let removed = self
            .client
            .update_secret_version_stage()
            .secret_id(self.secret_name(keyset))
            .version_stage(PENDING_LABEL)
            .remove_from_version_id(version)
            .send()
            .await;
        if let Err(e) = removed {
            tracing::debug!(
                secret = %self.secret_name(keyset),
                error = %error_chain(&e),
                "leaving {PENDING_LABEL} where it is"
            );
        }
    }

    /// Our version lost a race: unless our move in fact landed, clean up
    /// and report the conflict.
    async fn settle_refused(&self, keyset: &str, token: &str) -> Result<Version, StoreError> {
        if self.current_version(keyset).await?.as_deref() == Some(token) {
            return Ok(Version(token.to_string()));
        }
        self.drop_pending(keyset, token).await;
        Err(self.conflict(keyset))
    }

    async fn create(&self, keyset: &str, text: &str) -> Result<Version, StoreError> {
        let token = new_token();
        let created = self
            .client
            .create_secret()
            .name(self.secret_name(keyset))
            .description(format!(
                "keyroll keyset {keyset:?}: JWT signing keys, written by keyroll only"
            ))
            .secret_string(text)
            .client_request_token(&token)
            .set_kms_key_id(self.kms_key_id.clone())
            .set_tags(self.tag_list())
            .send()
            .await;
        match created {
            Ok(_) => Ok(Version(token)),
            Err(e) if e.code() == Some("ResourceExistsException") => {
                match self.current_version(keyset).await? {
                    // Our own create, whose answer was lost and retried.
                    Some(current) if current == token => Ok(Version(token)),
                    Some(_) => Err(self.conflict(keyset)),
                    // A secret without a value: the first version wins.
                    None => {
                        let stages = self.put_pending(keyset, text, &token).await?;
                        if stages.iter().any(|s| s == CURRENT_LABEL) {
                            Ok(Version(token))
                        } else {
                            self.settle_refused(keyset, &token).await
                        }
                    }
                }
            }
            Err(e) => Err(self.failure(keyset, "CreateSecret", e)),
        }
    }

    async fn replace(
        &self,
        keyset: &str,
        text: &str,
        expected: &Version,
    ) -> Result<Version, StoreError> {
        let token = new_token();
        self.put_pending(keyset, text, &token).await?;
        let moved = self
            .client
            .update_secret_version_stage()
            .secret_id(self.secret_name(keyset))
            .version_stage(CURRENT_LABEL)
            .move_to_version_id(&token)
            .remove_from_version_id(&expected.0)
            .send()
            .await;
        match moved {
            Ok(_) => Ok(Version(token)),
            // Refused: AWSCURRENT is no longer on the expected version (or
            // that version, or the secret, is gone).
            Err(e)
                if matches!(
                    e.code(),
                    Some("InvalidParameterException" | "ResourceNotFoundException")
                ) =>
            {
                self.settle_refused(keyset, &token).await
            }
            Err(e) => Err(self.failure(keyset, "UpdateSecretVersionStage", e)),
        }
    }

    /// The `AWSCURRENT` value of the keyset's document and its version.
    async fn get_current(
        &self,
        keyset: &str,
    ) -> Result<Option<(Zeroizing<String>, Version)>, StoreError> {
        let got = self
            .client
            .get_secret_value()
            .secret_id(self.secret_name(keyset))
            .version_stage(CURRENT_LABEL)
            .send()
            .await;
        let mut out = match got {
            Ok(out) => out,
            // No secret, or a secret without a value yet.
            Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(None),
            Err(e) => return Err(self.failure(keyset, "GetSecretValue", e)),
        };
        let Some(version) = out.version_id.take() else {
            return Err(StoreError::Unavailable {
                location: self.location(keyset),
                message: "GetSecretValue answered without a VersionId".into(),
            });
        };
        match out.secret_string.take() {
            Some(text) => Ok(Some((Zeroizing::new(text), Version(version)))),
            None => Err(StoreError::Corrupt {
                location: self.location(keyset),
                message: "the secret holds a binary value, not a keyroll document".into(),
            }),
        }
    }

    /// The plain compare-and-swap of a document text.
    async fn compare_and_swap(
        &self,
        keyset: &str,
        text: &str,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        match expected {
            None => self.create(keyset, text).await,
            Some(expected) => self.replace(keyset, text, expected).await,
        }
    }

    // ---- key secrets ---------------------------------------------------------

    fn key_secret_name(&self, keyset: &str, kid: &str) -> String {
        format!("{}{keyset}{KEYS_INFIX}{kid}", self.prefix)
    }

    fn key_location(&self, keyset: &str, kid: &str) -> String {
        format!(
            "secretsmanager:{}:{}",
            self.region,
            self.key_secret_name(keyset, kid)
        )
    }

    /// A schema 3 document, or `None` for anything else.
    fn referencing(&self, keyset: &str, text: &str) -> Result<Option<Referencing>, StoreError> {
        aws_form::referencing(text, |kid| self.key_secret_name(keyset, kid)).map_err(|e| {
            StoreError::Corrupt {
                location: self.location(keyset),
                message: format!("not a keyroll keyset document ({e})"),
            }
        })
    }

    fn remember(&self, keyset: &str, seen: Seen) {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        // Forget the private keys this keyset no longer references.
        let own = format!("{}{keyset}{KEYS_INFIX}", self.prefix);
        memory.values.retain(|name, _| {
            name.strip_prefix(&own)
                .is_none_or(|kid| seen.refs.contains(kid))
        });
        // What the document no longer lists need not be remembered.
        if let Some(destroyed) = memory.destroyed.get_mut(keyset) {
            destroyed.retain(|kid| seen.destroying.contains(kid));
        }
        memory.seen.insert(keyset.to_string(), seen);
    }

    /// The private key of every reference: from memory, or read once from
    /// its key secret.
    async fn key_values(
        &self,
        keyset: &str,
        doc: &Referencing,
    ) -> Result<BTreeMap<String, Zeroizing<String>>, StoreError> {
        let mut pems = BTreeMap::new();
        for (kid, name) in &doc.refs {
            let cached = {
                let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                memory.values.get(name).cloned()
            };
            let pem = match cached {
                Some(pem) => pem,
                None => {
                    let pem = self.read_key_secret(keyset, kid).await?;
                    let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                    memory.values.insert(name.clone(), pem.clone());
                    pem
                }
            };
            pems.insert(kid.clone(), pem);
        }
        Ok(pems)
    }

    async fn read_key_secret(
        &self,
        keyset: &str,
        kid: &str,
    ) -> Result<Zeroizing<String>, StoreError> {
        let location = self.key_location(keyset, kid);
        let got = self
            .client
            .get_secret_value()
            .secret_id(self.key_secret_name(keyset, kid))
            .version_stage(CURRENT_LABEL)
            .send()
            .await;
        match got {
            Ok(mut out) => {
                out.secret_string
                    .take()
                    .map(Zeroizing::new)
                    .ok_or_else(|| StoreError::Corrupt {
                        location,
                        message: "the key secret holds a binary value, not a private key".into(),
                    })
            }
            Err(e) if e.code() == Some("ResourceNotFoundException") => Err(StoreError::Corrupt {
                location,
                message: format!(
                    "the document of keyset {keyset:?} references this key secret, which is missing"
                ),
            }),
            Err(e) => Err(failure_at(location, "GetSecretValue", e)),
        }
    }

    /// What the document at `expected` referenced: from memory (the
    /// reconciler always loads before it saves), else read by version id.
    async fn seen_at(&self, keyset: &str, expected: Option<&Version>) -> Result<Seen, StoreError> {
        let Some(expected) = expected else {
            return Ok(Seen::default());
        };
        {
            let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(seen) = memory.seen.get(keyset) {
                if seen.version.as_ref() == Some(expected) {
                    return Ok(seen.clone());
                }
            }
        }
        let got = self
            .client
            .get_secret_value()
            .secret_id(self.secret_name(keyset))
            .version_id(&expected.0)
            .send()
            .await;
        let text = match got {
            Ok(out) => Zeroizing::new(out.secret_string.unwrap_or_default()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("ResourceNotFoundException" | "InvalidParameterException")
                ) =>
            {
                return Err(self.conflict(keyset))
            }
            Err(e) => return Err(self.failure(keyset, "GetSecretValue", e)),
        };
        Ok(match self.referencing(keyset, &text)? {
            Some(doc) => Seen {
                version: Some(expected.clone()),
                refs: doc.kids(),
                destroying: doc.destroying,
            },
            None => Seen {
                version: Some(expected.clone()),
                ..Seen::default()
            },
        })
    }

    /// Creates the key secrets of new keys, then compare-and-swaps the
    /// document that references them, then deletes the key secrets of the
    /// keys it dropped. See the module header for why in this order.
    async fn save_split(
        &self,
        keyset: &str,
        split: Split,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let before = self.seen_at(keyset, expected).await?;
        let kids = split.kids();
        let confirmed = {
            let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            memory.destroyed.get(keyset).cloned().unwrap_or_default()
        };
        // Dropped now, or dropped before and not yet seen gone.
        let destroying: BTreeSet<String> = before
            .destroying
            .union(&before.refs)
            .filter(|kid| !kids.contains(*kid) && !confirmed.contains(*kid))
            .cloned()
            .collect();
        let started = std::time::Instant::now();
        let mut created = Vec::new();
        for key in split.keys.iter().filter(|k| !before.refs.contains(&k.kid)) {
            match self.create_key_secret(keyset, key).await {
                Ok(()) => created.push(key.kid.clone()),
                Err(e) => {
                    self.discard(keyset, &created).await;
                    return Err(e);
                }
            }
        }
        let stored = split.stored_text(&destroying);
        drop(split);
        if started.elapsed() > WRITE_SPAN {
            self.discard(keyset, &created).await;
            return Err(StoreError::Unavailable {
                location: self.location(keyset),
                message: format!(
                    "creating the key secrets took longer than {} s; gave up before the \
                     orphan sweep could take them",
                    WRITE_SPAN.as_secs()
                ),
            });
        }
        if stored.len() > MAX_SECRET_BYTES {
            self.discard(keyset, &created).await;
            return Err(self.too_large(keyset, stored.len()));
        }
        match self.compare_and_swap(keyset, &stored, expected).await {
            Ok(version) => {
                self.remember(
                    keyset,
                    Seen {
                        version: Some(version.clone()),
                        refs: kids,
                        destroying: destroying.clone(),
                    },
                );
                self.destroy(keyset, &destroying).await;
                Ok(version)
            }
            Err(e) if e.is_conflict() => {
                // No document will ever reference keys made for a lost
                // compare-and-swap: the planner makes new ones.
                self.discard(keyset, &created).await;
                Err(e)
            }
            // It may have landed: the keys stay, referenced or swept.
            Err(e) => Err(e),
        }
    }

    async fn create_key_secret(&self, keyset: &str, key: &KeyMaterial) -> Result<(), StoreError> {
        let name = self.key_secret_name(keyset, &key.kid);
        let created = self
            .client
            .create_secret()
            .name(&name)
            .description(format!(
                "keyroll keyset {keyset:?}: the private key of kid {}; keyroll deletes it \
                 when the key is revoked or removed",
                key.kid
            ))
            .secret_string(key.pem.as_str())
            .set_kms_key_id(self.kms_key_id.clone())
            .set_tags(self.tag_list())
            .send()
            .await;
        match created {
            Ok(_) => {}
            // An earlier attempt of ours whose answer was lost: fine if it
            // holds this very key.
            Err(e) if e.code() == Some("ResourceExistsException") => {
                let existing = self.read_key_secret(keyset, &key.kid).await?;
                if existing.as_str() != key.pem.as_str() {
                    return Err(StoreError::Rejected {
                        location: self.key_location(keyset, &key.kid),
                        message: "the key secret exists and holds another value; it is left \
                                  untouched"
                            .into(),
                    });
                }
            }
            Err(e) => {
                return Err(failure_at(
                    self.key_location(keyset, &key.kid),
                    "CreateSecret",
                    e,
                ))
            }
        }
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.values.insert(name, key.pem.clone());
        Ok(())
    }

    /// Deletes key secrets no document references, made for a save that
    /// did not land. Best effort: what fails is swept later. These keys
    /// were never published and never signed anything.
    async fn discard(&self, keyset: &str, kids: &[String]) {
        for kid in kids {
            if let Err(e) = self.delete_key_secret(keyset, kid).await {
                tracing::warn!(
                    keyset = %keyset,
                    kid = %kid,
                    error = %e,
                    "cannot delete the key secret of a save that did not land; the orphan sweep will"
                );
            }
            let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            memory.values.remove(&self.key_secret_name(keyset, kid));
        }
    }

    /// Destroys the key secrets of keys a committed document dropped
    /// (revoked, or removed after their grace), unless this process saw
    /// them gone already. A failure is an ERROR, counted in
    /// `keyroll_key_destruction_pending`, and retried at every load.
    async fn destroy(&self, keyset: &str, kids: &BTreeSet<String>) {
        for kid in kids {
            let known_gone = {
                let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                memory
                    .destroyed
                    .get(keyset)
                    .is_some_and(|d| d.contains(kid))
            };
            if known_gone {
                continue;
            }
            match self.delete_key_secret(keyset, kid).await {
                Ok(()) => {
                    tracing::info!(
                        keyset = %keyset,
                        kid = %kid,
                        secret = %self.key_secret_name(keyset, kid),
                        "key.destroyed"
                    );
                    let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                    memory.values.remove(&self.key_secret_name(keyset, kid));
                    memory
                        .destroyed
                        .entry(keyset.to_string())
                        .or_default()
                        .insert(kid.clone());
                }
                Err(e) => tracing::error!(
                    keyset = %keyset,
                    kid = %kid,
                    error = %e,
                    "cannot destroy the private key of a revoked or removed key: it stays \
                     readable in its key secret until this succeeds; retrying at every pass"
                ),
            }
        }
    }

    /// `DeleteSecret` without a recovery window: the value is gone at once
    /// (Secrets Manager finishes the deletion asynchronously, within
    /// seconds). A secret already gone counts as deleted.
    async fn delete_key_secret(&self, keyset: &str, kid: &str) -> Result<(), StoreError> {
        let deleted = self
            .client
            .delete_secret()
            .secret_id(self.key_secret_name(keyset, kid))
            .force_delete_without_recovery(true)
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(()),
            Err(e) => Err(failure_at(
                self.key_location(keyset, kid),
                "DeleteSecret",
                e,
            )),
        }
    }

    /// At a process's first load of a keyset, then every [`SWEEP_EVERY`]:
    /// deletes the keyset's key secrets that the document does not
    /// reference and that are older than [`ORPHAN_AGE`] (a crash between
    /// creating a key secret and the compare-and-swap, a lost answer, a
    /// document deleted by hand). Failures are logged and retried at the
    /// next sweep.
    async fn sweep_if_due(&self, keyset: &str, refs: &BTreeSet<String>) {
        let now = self.clock.now();
        {
            let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            let due = memory.swept_at.get(keyset).is_none_or(|at| {
                now.signed_duration_since(*at).to_std().unwrap_or_default() >= SWEEP_EVERY
            });
            if !due {
                return;
            }
            memory.swept_at.insert(keyset.to_string(), now);
        }
        let secrets = match self.key_secrets(keyset).await {
            Ok(secrets) => secrets,
            Err(e) => {
                tracing::warn!(keyset = %keyset, error = %e, "cannot look for orphaned key secrets; will try again");
                return;
            }
        };
        let oldest_kept = now - chrono::Duration::from_std(ORPHAN_AGE).unwrap_or_default();
        for (kid, created) in secrets {
            if refs.contains(&kid) || created.is_none_or(|at| at > oldest_kept) {
                continue;
            }
            match self.delete_key_secret(keyset, &kid).await {
                Ok(()) => tracing::warn!(
                    keyset = %keyset,
                    kid = %kid,
                    "deleted an orphaned key secret (no document references it; a save crashed or lost its answer)"
                ),
                Err(e) => {
                    tracing::warn!(keyset = %keyset, kid = %kid, error = %e, "cannot delete an orphaned key secret; will try again")
                }
            }
        }
    }

    /// The keyset's key secrets: kid and creation date.
    async fn key_secrets(
        &self,
        keyset: &str,
    ) -> Result<Vec<(String, Option<Timestamp>)>, StoreError> {
        use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType};
        let own = format!("{}{keyset}{KEYS_INFIX}", self.prefix);
        let mut found = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_secrets()
                .max_results(100)
                .filters(
                    Filter::builder()
                        .key(FilterNameStringType::Name)
                        .values(&own)
                        .build(),
                )
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| self.failure(keyset, "ListSecrets", e))?;
            for secret in page.secret_list() {
                let Some(kid) = secret
                    .name()
                    .and_then(|name| name.strip_prefix(own.as_str()))
                else {
                    continue;
                };
                if !aws_form::is_kid(kid) || secret.deleted_date().is_some() {
                    continue;
                }
                let created = secret
                    .created_date()
                    .and_then(|at| chrono::DateTime::from_timestamp(at.secs(), at.subsec_nanos()));
                found.push((kid.to_string(), created));
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(found);
            }
        }
    }

    fn tag_list(&self) -> Option<Vec<Tag>> {
        let tags = self
            .tags
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .collect::<Vec<_>>();
        (!tags.is_empty()).then_some(tags)
    }

    fn too_large(&self, keyset: &str, size: usize) -> StoreError {
        StoreError::Rejected {
            location: self.location(keyset),
            message: format!(
                "the keyset document is {size} bytes and a secret holds at most {MAX_SECRET_BYTES}; \
                 use fewer algorithms or smaller RSA keys in this keyset"
            ),
        }
    }

    fn conflict(&self, keyset: &str) -> StoreError {
        StoreError::Conflict {
            location: self.location(keyset),
        }
    }

    /// Sorts an SDK error into "try again later" and "an operator must act".
    fn failure<E>(&self, keyset: &str, call: &str, error: SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        failure_at(self.location(keyset), call, error)
    }
}

/// [`AwsStore::failure`] for any secret: `location` names it.
fn failure_at<E>(location: String, call: &str, error: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let transient = match &error {
        SdkError::ServiceError(service) => {
            service.raw().status().is_server_error()
                || service
                    .err()
                    .code()
                    .is_some_and(|code| TRANSIENT_CODES.contains(&code))
        }
        // Timeouts, connection failures, unreadable answers.
        _ => true,
    };
    let message = format!("{call} failed: {}", error_chain(&error));
    if transient {
        StoreError::Unavailable { location, message }
    } else {
        StoreError::Rejected { location, message }
    }
}

fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[async_trait]
impl Store for AwsStore {
    fn location(&self, keyset: &str) -> String {
        format!(
            "secretsmanager:{}:{}",
            self.region,
            self.secret_name(keyset)
        )
    }

    /// A secret's limit less [`REFERENCE_ROOM`]: the limit applies to the
    /// document with its keys inline, and the stored form must fit too.
    fn max_document_bytes(&self) -> Option<usize> {
        Some(MAX_SECRET_BYTES - REFERENCE_ROOM)
    }

    /// The document with its private keys inline, read from their key
    /// secrets (or this process's memory of them); see the module header.
    async fn load(&self, keyset: &str) -> Result<Option<Stored>, StoreError> {
        let Some((text, version)) = self.get_current(keyset).await? else {
            self.remember(keyset, Seen::default());
            self.sweep_if_due(keyset, &BTreeSet::new()).await;
            return Ok(None);
        };
        let Some(doc) = self.referencing(keyset, &text)? else {
            // Keys inline (schema 1 or 2), or not a keyroll document: the
            // document parser decides.
            self.remember(
                keyset,
                Seen {
                    version: Some(version.clone()),
                    ..Seen::default()
                },
            );
            self.sweep_if_due(keyset, &BTreeSet::new()).await;
            return Ok(Some(Stored { text, version }));
        };
        let pems = self.key_values(keyset, &doc).await?;
        self.remember(
            keyset,
            Seen {
                version: Some(version.clone()),
                refs: doc.kids(),
                destroying: doc.destroying.clone(),
            },
        );
        self.destroy(keyset, &doc.destroying).await;
        self.sweep_if_due(keyset, &doc.kids()).await;
        Ok(Some(Stored {
            text: aws_form::join(&doc, &pems),
            version,
        }))
    }

    fn destruction_pending(&self, keyset: &str) -> Vec<String> {
        let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let destroyed = memory.destroyed.get(keyset);
        memory
            .seen
            .get(keyset)
            .map(|seen| {
                seen.destroying
                    .iter()
                    .filter(|kid| !destroyed.is_some_and(|d| d.contains(*kid)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `ListSecrets` filtered by name prefix (a few calls, at start only).
    async fn keysets(&self) -> Result<Vec<String>, StoreError> {
        use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType};
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let mut request = self.client.list_secrets().max_results(100);
            if !self.prefix.is_empty() {
                request = request.filters(
                    Filter::builder()
                        .key(FilterNameStringType::Name)
                        .values(&self.prefix)
                        .build(),
                );
            }
            let page = request
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| self.failure("", "ListSecrets", e))?;
            for secret in page.secret_list() {
                // The filter matches any name containing the prefix' words;
                // only names starting with it are ours.
                // Key secrets (`<keyset>/keys/<kid>`) are not keysets.
                if let Some(keyset) = secret
                    .name()
                    .and_then(|name| name.strip_prefix(self.prefix.as_str()))
                    .filter(|keyset| !keyset.contains('/'))
                {
                    names.push(keyset.to_string());
                }
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(names);
            }
        }
    }

    async fn save(
        &self,
        keyset: &str,
        text: &str,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        if text.len() > MAX_SECRET_BYTES {
            return Err(self.too_large(keyset, text.len()));
        }
        let split =
            aws_form::split(text, |kid| self.key_secret_name(keyset, kid)).map_err(|e| {
                StoreError::Rejected {
                    location: self.location(keyset),
                    message: format!("cannot take the private keys out of the document: {e}"),
                }
            })?;
        match split {
            Some(split) => self.save_split(keyset, split, expected).await,
            None => self.compare_and_swap(keyset, text, expected).await,
        }
    }
}
