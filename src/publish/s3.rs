//! S3 publication (SPEC §4, `s3_jwks` and `s3_discovery`): one background
//! task per object keeps it equal to what HTTP serves.
//!
//! The daemon hands each task the current bytes through a `watch` channel
//! and moves on: an S3 outage never delays a reconcile, never changes
//! `/readyz` and never touches another output.
//!
//! # Requests
//!
//! Each object carries the SHA-256 of its body as user metadata
//! (`x-amz-meta-sha256`), with its `Content-Type` and `Cache-Control`.
//!
//! - **start**: one `HeadObject`; `PutObject` only if the object is missing
//!   or differs (so a restart with unchanged keys writes nothing).
//! - **a change**: one `HeadObject`, then one `PutObject` unless another
//!   replica has written the same bytes already (replicas render identical
//!   bytes from the same document, so usually one of them writes).
//! - **idle**: one `HeadObject` per `check_every` (30 s): an object deleted
//!   or overwritten by someone else is put back within that period. Never a
//!   periodic `PutObject`.
//! - **a failure**: logged, counted in `keyroll_publish_errors_total{output="s3"}`,
//!   retried with exponential backoff (1 s, doubling, at most
//!   `check_every`). Each request itself retries throttling, 5xx and
//!   connection failures within the SDK's time budget (`crate::aws`).
//!
//! Without `s3:ListBucket`, S3 answers `HeadObject` on a missing key with
//! 403, not 404: a 403 is therefore followed by a `PutObject`, whose own
//! answer says whether access is really denied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::head_object::HeadObjectError;
use aws_sdk_s3::operation::put_object::PutObjectError;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::aws::error_chain;
use crate::config::S3Object;
use crate::metrics::Metrics;

/// How often an idle object is checked with `HeadObject`.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);
/// Overrides `CHECK_EVERY` (a humantime duration), so tests need not wait
/// 30 s for a deleted object to come back.
pub const CHECK_EVERY_ENV: &str = "KEYROLL_S3_CHECK_INTERVAL";
/// The user metadata holding the body's SHA-256 (hex).
const DIGEST_METADATA: &str = "sha256";
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// What an object should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub body: Bytes,
    pub content_type: &'static str,
    pub cache_control: String,
}

impl Content {
    fn digest(&self) -> String {
        hex::encode(Sha256::digest(&self.body))
    }
}

/// The S3 client and one upload task per configured object.
pub struct S3Publisher {
    client: aws_sdk_s3::Client,
    check_every: Duration,
    metrics: Arc<Metrics>,
    uploads: HashMap<S3Object, Upload>,
}

struct Upload {
    keyset: String,
    content: watch::Sender<Arc<Content>>,
    task: JoinHandle<()>,
}

impl S3Publisher {
    pub fn new(client: aws_sdk_s3::Client, metrics: Arc<Metrics>) -> Self {
        let check_every = std::env::var(CHECK_EVERY_ENV)
            .ok()
            .and_then(|text| humantime::parse_duration(&text).ok())
            .filter(|period| !period.is_zero())
            .unwrap_or(CHECK_EVERY);
        S3Publisher {
            client,
            check_every,
            metrics,
            uploads: HashMap::new(),
        }
    }

    /// Makes `object` hold `content` from now on. Returns at once; the
    /// upload happens in the background, and only if the bytes changed.
    pub fn publish(&mut self, keyset: &str, object: &S3Object, content: Content) {
        if let Some(upload) = self.uploads.get(object).filter(|u| u.keyset == keyset) {
            upload.content.send_if_modified(|current| {
                let changed = **current != content;
                if changed {
                    *current = Arc::new(content);
                }
                changed
            });
            return;
        }
        let (sender, receiver) = watch::channel(Arc::new(content));
        let sync = ObjectSync {
            client: self.client.clone(),
            object: object.clone(),
            keyset: keyset.to_string(),
            metrics: self.metrics.clone(),
            known: None,
        };
        let task = tokio::spawn(sync.run(receiver, self.check_every));
        let upload = Upload {
            keyset: keyset.to_string(),
            content: sender,
            task,
        };
        if let Some(replaced) = self.uploads.insert(object.clone(), upload) {
            replaced.task.abort();
        }
    }

    /// Stops the tasks of objects no longer configured (after a SIGHUP).
    /// The objects themselves stay: keyroll never deletes what relying
    /// parties may still fetch.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &S3Object) -> bool) {
        self.uploads.retain(|object, upload| {
            let kept = keep(&upload.keyset, object);
            if !kept {
                upload.task.abort();
            }
            kept
        });
    }
}

impl Drop for S3Publisher {
    fn drop(&mut self) {
        for upload in self.uploads.values() {
            upload.task.abort();
        }
    }
}

/// What this process knows the object holds.
struct Known {
    digest: String,
}

/// One object's task: keeps it equal to the latest content.
struct ObjectSync {
    client: aws_sdk_s3::Client,
    object: S3Object,
    keyset: String,
    metrics: Arc<Metrics>,
    known: Option<Known>,
}

/// A request that failed, with the SDK's error (shown with S3's error code).
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("HeadObject failed: {}", describe(.0))]
    Head(SdkError<HeadObjectError, HttpResponse>),
    #[error("PutObject failed: {}", describe(.0))]
    Put(SdkError<PutObjectError, HttpResponse>),
}

#[derive(Debug)]
enum Outcome {
    Unchanged,
    Written,
    Restored,
}

impl ObjectSync {
    async fn run(mut self, mut content: watch::Receiver<Arc<Content>>, check_every: Duration) {
        let mut failures: u32 = 0;
        // The first check is at once: HeadObject, then PutObject if needed.
        let mut wait = Duration::ZERO;
        loop {
            let check = tokio::select! {
                changed = content.changed() => {
                    if changed.is_err() {
                        return; // the publisher is gone
                    }
                    false
                }
                _ = tokio::time::sleep(wait) => true,
            };
            let wanted = content.borrow_and_update().clone();
            match self.sync(&wanted, check).await {
                Ok(outcome) => {
                    if failures > 0 {
                        tracing::info!(keyset = %self.keyset, object = %self.object, "S3 upload works again");
                    }
                    failures = 0;
                    wait = check_every;
                    self.log(&outcome);
                }
                Err(error) => {
                    failures += 1;
                    wait = retry_delay(failures, check_every);
                    self.metrics.publish_error(&self.keyset, "s3");
                    tracing::error!(
                        keyset = %self.keyset, object = %self.object, %error, retry_in = ?wait,
                        "cannot publish to S3; HTTP and the other outputs are unaffected"
                    );
                }
            }
        }
    }

    fn log(&self, outcome: &Outcome) {
        let digest = self.known.as_ref().map(|k| k.digest.as_str());
        match outcome {
            Outcome::Unchanged => {}
            Outcome::Written => {
                tracing::info!(keyset = %self.keyset, object = %self.object, sha256 = digest, "S3 object updated")
            }
            Outcome::Restored => tracing::warn!(
                keyset = %self.keyset, object = %self.object, sha256 = digest,
                "S3 object was missing or changed by someone else; put it back"
            ),
        }
    }

    /// Brings the object in line with `wanted`: `HeadObject`, then
    /// `PutObject` only if the object differs. A new content is looked up
    /// first too: another replica, rendering the same bytes from the same
    /// document, has often written it already.
    async fn sync(&mut self, wanted: &Content, check: bool) -> Result<Outcome, SyncError> {
        let digest = wanted.digest();
        let known_same = self.known.as_ref().is_some_and(|k| k.digest == digest);
        if known_same && !check {
            return Ok(Outcome::Unchanged);
        }
        if self.head_matches(wanted, &digest).await? {
            self.known = Some(Known { digest });
            return Ok(Outcome::Unchanged);
        }
        self.put(wanted, digest).await?;
        Ok(if known_same {
            Outcome::Restored
        } else {
            Outcome::Written
        })
    }

    /// Whether the object holds `wanted`: its stored digest, length and
    /// headers. Not its ETag: with SSE-KMS every write of the same bytes
    /// gets another ETag, and replicas would overwrite each other forever.
    async fn head_matches(&self, wanted: &Content, digest: &str) -> Result<bool, SyncError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.object.bucket)
            .key(&self.object.key)
            .send()
            .await;
        let head = match head {
            Ok(head) => head,
            // 404: gone. 403: maybe gone (without s3:ListBucket S3 answers
            // 403 for a missing key) or denied; the PutObject tells which.
            Err(SdkError::ServiceError(e)) if matches!(e.raw().status().as_u16(), 404 | 403) => {
                return Ok(false);
            }
            Err(e) => return Err(SyncError::Head(e)),
        };
        Ok(head
            .metadata()
            .and_then(|m| m.get(DIGEST_METADATA))
            .is_some_and(|stored| stored == digest)
            && head.content_length() == Some(wanted.body.len() as i64)
            && head.content_type() == Some(wanted.content_type)
            && head.cache_control() == Some(wanted.cache_control.as_str()))
    }

    async fn put(&mut self, wanted: &Content, digest: String) -> Result<(), SyncError> {
        self.client
            .put_object()
            .bucket(&self.object.bucket)
            .key(&self.object.key)
            .body(ByteStream::from(wanted.body.clone()))
            .content_type(wanted.content_type)
            .cache_control(&wanted.cache_control)
            .metadata(DIGEST_METADATA, &digest)
            .send()
            .await
            .map_err(SyncError::Put)?;
        self.known = Some(Known { digest });
        Ok(())
    }
}

/// An SDK error on one line, with S3's error code when it sent one
/// (`NoSuchBucket`, `AccessDenied`).
fn describe<E>(error: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match error {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            match (service.err().code(), service.err().message()) {
                (Some(code), Some(message)) => format!("HTTP {status} {code}: {message}"),
                (Some(code), None) => format!("HTTP {status} {code}"),
                _ => format!("HTTP {status}"),
            }
        }
        other => error_chain(other),
    }
}

/// 1 s, 2 s, 4 s… but never longer than the idle check period.
fn retry_delay(failures: u32, check_every: Duration) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(check_every)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_the_check_period() {
        let period = Duration::from_secs(30);
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(n, period).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(retry_delay(1000, period), period);
    }
}
