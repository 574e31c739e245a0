//! The one AWS SDK configuration of a process, shared by the Secrets Manager
//! store and the S3 publisher: the standard credential chain (environment,
//! profile, web identity / IRSA, instance metadata), the region and endpoint
//! (config, then `AWS_REGION` / `AWS_ENDPOINT_URL`; `AWS_ENDPOINT_URL_S3`
//! and `AWS_ENDPOINT_URL_SECRETS_MANAGER` win for their service), and one
//! HTTP client with TLS through rustls on ring (see Cargo.toml).
//!
//! Loading reads the environment, profile files and, on EC2, instance
//! metadata, so it happens once per process: later callers asking for the
//! same region and endpoint get the cached configuration, and with it the
//! same connection pool and credentials cache.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use tokio::sync::Mutex;

/// Per-request limits. A dead endpoint fails one operation within
/// `OPERATION_TIMEOUT`; callers then back off and keep serving what they
/// have.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts per operation (the SDK's standard mode: exponential backoff with
/// jitter, retrying throttling, 5xx and connection failures only).
pub const MAX_ATTEMPTS: u32 = 4;

/// Where the SDK configuration comes from besides the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

static LOADED: Mutex<Option<(Overrides, SdkConfig)>> = Mutex::const_new(None);

/// The process's SDK configuration for these overrides: loaded on first use,
/// then cached. A SIGHUP that changes the store's region or endpoint loads a
/// new one (which then becomes the cached one).
pub async fn sdk_config(overrides: &Overrides) -> SdkConfig {
    let mut loaded = LOADED.lock().await;
    if let Some((cached_for, config)) = loaded.as_ref() {
        if cached_for == overrides {
            return config.clone();
        }
    }
    let config = load(overrides).await;
    *loaded = Some((overrides.clone(), config.clone()));
    config
}

async fn load(overrides: &Overrides) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
    if let Some(region) = &overrides.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &overrides.endpoint_url {
        loader = loader.endpoint_url(endpoint.clone());
    }
    loader.load().await
}

/// An S3 client on the shared configuration. With a custom endpoint (an
/// emulator, MinIO, a VPC endpoint by URL) requests use path-style
/// addressing (`http://host/bucket/key`): virtual-hosted style would need a
/// DNS name per bucket under the endpoint's host, which emulators and
/// `127.0.0.1` do not have.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let custom_endpoint = config.endpoint_url().is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some_and(|v| !v.is_empty());
    let s3 = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(custom_endpoint)
        // Plain requests, without aws-chunked checksum trailers: the objects
        // are a few KiB, the SigV4 signature already covers the payload's
        // SHA-256, and S3-compatible servers all accept this form.
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(s3)
}

/// An error and its causes on one line: "dispatch failure: io error: …".
/// (The SDK's `DisplayErrorContext` appends a `Debug` dump of the whole
/// response, too long for a log line.)
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
