//! The AWS Secrets Manager store: one secret per keyset, named
//! `<secret_prefix><keyset>`, whose `AWSCURRENT` version holds the keyset
//! document. Many replicas and the CLI share a secret safely through a
//! compare-and-swap built on version ids and staging labels.
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
//! A save makes two calls (`CreateSecret`: one), plus one `DescribeSecret`
//! and one label removal when it loses. There is no change polling: the
//! backend has no call cheap enough to make twice a second, so replicas
//! notice each other's writes at `reconcile_interval`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_secretsmanager::config::http::HttpResponse;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::types::Tag;
use aws_sdk_secretsmanager::Client;
use zeroize::Zeroizing;

use super::{OpenError, Store, StoreError, Stored, Version};
use crate::aws::error_chain;
use crate::config::AwsSettings;

/// The staging label of a version that is written but not yet current.
pub const PENDING_LABEL: &str = "keyroll-pending";
const CURRENT_LABEL: &str = "AWSCURRENT";
/// The most a secret value may hold.
pub const MAX_SECRET_BYTES: usize = 65_536;

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

pub struct AwsStore {
    client: Client,
    prefix: String,
    region: String,
    kms_key_id: Option<String>,
    tags: BTreeMap<String, String>,
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
        })
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
        let tags = self
            .tags
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .collect::<Vec<_>>();
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
            .set_tags((!tags.is_empty()).then_some(tags))
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
        let location = self.location(keyset);
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

    fn max_document_bytes(&self) -> Option<usize> {
        Some(MAX_SECRET_BYTES)
    }

    async fn load(&self, keyset: &str) -> Result<Option<Stored>, StoreError> {
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
            Some(text) => Ok(Some(Stored {
                text: Zeroizing::new(text),
                version: Version(version),
            })),
            None => Err(StoreError::Corrupt {
                location: self.location(keyset),
                message: "the secret holds a binary value, not a keyroll document".into(),
            }),
        }
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
                if let Some(keyset) = secret
                    .name()
                    .and_then(|name| name.strip_prefix(self.prefix.as_str()))
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
            return Err(StoreError::Rejected {
                location: self.location(keyset),
                message: format!(
                    "the keyset document is {} bytes and a secret holds at most {MAX_SECRET_BYTES}; \
                     use fewer algorithms or smaller RSA keys in this keyset",
                    text.len()
                ),
            });
        }
        match expected {
            None => self.create(keyset, text).await,
            Some(expected) => self.replace(keyset, text, expected).await,
        }
    }
}
