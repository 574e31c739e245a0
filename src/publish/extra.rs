//! The outputs a keyset may add beside HTTP's JWKS, `jwks_file` and
//! `signing_dir`: OpenID discovery (HTTP routes and `discovery_file`) and
//! S3 copies of the JWKS and the discovery document. The daemon calls
//! [`ExtraOutputs::publish`] where it publishes a keyset's JWKS; nothing
//! here can fail a reconcile or delay it beyond a small file write.

use std::sync::Arc;

use tokio::sync::Mutex;

use super::discovery::{self, Routes, DISCOVERY_CONTENT_TYPE};
use super::http::JWKS_CONTENT_TYPE;
use super::s3::{Content, S3Publisher};
use super::{JwksDocument, ServedState};
use crate::config::{Config, KeysetPolicy, S3Object, StoreSettings};
use crate::metrics::Metrics;

/// Holds the S3 publisher, made on first use: a config without S3 outputs
/// never loads an AWS configuration. Made again when a SIGHUP changes the
/// AWS settings it was made with.
#[derive(Default)]
pub struct ExtraOutputs {
    s3: Mutex<Option<(crate::aws::Overrides, S3Publisher)>>,
}

impl ExtraOutputs {
    /// Publishes `policy`'s discovery document and S3 objects for `jwks`,
    /// the JWKS just published, and installs the discovery routes of
    /// `config` in `served`. Returns false when `discovery_file` could not
    /// be written (the daemon tries again at its next pass); S3 uploads
    /// retry on their own.
    pub async fn publish(
        &self,
        config: &Config,
        policy: &KeysetPolicy,
        jwks: &JwksDocument,
        served: &ServedState,
        metrics: &Arc<Metrics>,
    ) -> bool {
        install_routes(config, served);
        let document = discovery::render(policy);
        let mut written = true;
        if let (Some(document), Some(settings)) = (&document, &policy.discovery) {
            if let Some(path) = &settings.file {
                written = write_discovery_file(policy, path.clone(), document, metrics).await;
            }
        }
        let objects = s3_objects(policy, jwks, document.as_ref());
        let overrides = aws_overrides(config);
        let mut s3 = self.s3.lock().await;
        if s3
            .as_ref()
            .is_some_and(|(made_with, _)| *made_with != overrides)
        {
            *s3 = None; // dropping the publisher stops its tasks
        }
        if let Some((_, publisher)) = s3.as_mut() {
            publisher.retain(|keyset, object| configured(config, keyset, object));
        }
        if objects.is_empty() {
            return written;
        }
        let (_, publisher) = match s3.as_mut() {
            Some(made) => made,
            None => s3.insert((
                overrides.clone(),
                start_s3(&overrides, metrics.clone()).await,
            )),
        };
        for (object, content) in objects {
            metrics.register_output(&policy.name, "s3");
            publisher.publish(&policy.name, &object, content);
        }
        written
    }
}

/// Whether `config` still has `keyset` publish to `object`.
fn configured(config: &Config, keyset: &str, object: &S3Object) -> bool {
    config.keyset(keyset).is_some_and(|policy| {
        policy.s3_jwks.as_deref() == Some(object)
            || policy
                .discovery
                .as_ref()
                .is_some_and(|d| d.s3.as_ref() == Some(object))
    })
}

/// Swaps in the discovery routes of `config` when they differ from the
/// served ones (the first pass, and after a SIGHUP that changed them).
fn install_routes(config: &Config, served: &ServedState) {
    let routes = Routes::of(config);
    if *served.load().routes == routes {
        return;
    }
    let routes = Arc::new(routes);
    served.rcu(|current| {
        let mut next = super::Served::clone(current);
        next.routes = routes.clone();
        next
    });
}

async fn write_discovery_file(
    policy: &KeysetPolicy,
    path: std::path::PathBuf,
    document: &JwksDocument,
    metrics: &Metrics,
) -> bool {
    metrics.register_output(&policy.name, "discovery_file");
    let body = document.body.clone();
    let written = tokio::task::spawn_blocking(move || super::write_jwks_file(&path, &body)).await;
    match written {
        Ok(Ok(true)) => tracing::info!(keyset = %policy.name, output = "discovery_file", "updated"),
        Ok(Ok(false)) => {}
        Ok(Err(error)) => {
            metrics.publish_error(&policy.name, "discovery_file");
            tracing::error!(keyset = %policy.name, output = "discovery_file", %error, "cannot publish; HTTP keeps serving the discovery document");
            return false;
        }
        Err(error) => {
            metrics.publish_error(&policy.name, "discovery_file");
            tracing::error!(keyset = %policy.name, output = "discovery_file", %error, "the discovery_file writer failed");
            return false;
        }
    }
    true
}

/// The S3 objects `policy` asks for, with what each should hold: the same
/// bytes and `Cache-Control` as HTTP.
fn s3_objects(
    policy: &KeysetPolicy,
    jwks: &JwksDocument,
    document: Option<&JwksDocument>,
) -> Vec<(S3Object, Content)> {
    let content = |rendered: &JwksDocument, content_type| Content {
        body: rendered.body.clone(),
        content_type,
        cache_control: format!("public, max-age={}", rendered.max_age_seconds),
    };
    let mut objects = Vec::new();
    if let Some(object) = policy.s3_jwks.as_deref() {
        objects.push((object.clone(), content(jwks, JWKS_CONTENT_TYPE)));
    }
    let discovery_object = policy.discovery.as_ref().and_then(|d| d.s3.as_ref());
    if let (Some(object), Some(document)) = (discovery_object, document) {
        objects.push((object.clone(), content(document, DISCOVERY_CONTENT_TYPE)));
    }
    objects
}

/// The SDK settings the store uses: its region and `endpoint_url` when it
/// is on AWS, the AWS chain alone otherwise.
fn aws_overrides(config: &Config) -> crate::aws::Overrides {
    match &config.store {
        StoreSettings::AwsSecretsManager(aws) => crate::aws::Overrides {
            region: aws.region.clone(),
            endpoint_url: aws.endpoint_url.clone(),
        },
        StoreSettings::File { .. } => crate::aws::Overrides::default(),
    }
}

/// The S3 client, on the SDK configuration the store shares.
async fn start_s3(overrides: &crate::aws::Overrides, metrics: Arc<Metrics>) -> S3Publisher {
    let sdk_config = crate::aws::sdk_config(overrides).await;
    if sdk_config.region().is_none() {
        tracing::error!(
            "S3 outputs configured but no AWS region: set AWS_REGION (or a profile's region); uploads will fail until then"
        );
    }
    S3Publisher::new(crate::aws::s3_client(&sdk_config), metrics)
}
