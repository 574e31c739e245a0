//! The AWS Secrets Manager emulator for tests: the endpoint `scripts/test`
//! exports (`KEYROLL_TEST_AWS_ENDPOINT`), a unique secret prefix per test,
//! an SDK client of our own to inspect what keyroll wrote, and private
//! emulator instances for tests that freeze one.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyroll::config::AwsSettings;
use keyroll::store::AwsStore;

pub const REGION: &str = "us-east-1";

/// The shared emulator's endpoint, or `None` with a note: the test skips.
pub fn endpoint() -> Option<String> {
    match std::env::var("KEYROLL_TEST_AWS_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(endpoint),
        _ => {
            super::skipped(
                "no AWS emulator (KEYROLL_TEST_AWS_ENDPOINT unset; scripts/test starts one)",
            );
            None
        }
    }
}

pub fn unique_prefix() -> String {
    format!("keyroll-test/{}/", uuid::Uuid::new_v4().simple())
}

pub fn settings(endpoint: &str, prefix: &str) -> AwsSettings {
    AwsSettings {
        secret_prefix: prefix.to_string(),
        region: Some(REGION.to_string()),
        endpoint_url: Some(endpoint.to_string()),
        kms_key_id: None,
        tags: BTreeMap::new(),
    }
}

/// A store on the shared emulator under `prefix`; `None` to skip.
pub async fn aws_store(prefix: &str) -> Option<AwsStore> {
    let endpoint = endpoint()?;
    Some(
        AwsStore::connect(&settings(&endpoint, prefix))
            .await
            .expect("connect to the emulator"),
    )
}

/// An SDK client of the test's own, to look at and tamper with secrets.
pub async fn client(endpoint: &str) -> aws_sdk_secretsmanager::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "keyroll-tests",
        ))
        .load()
        .await;
    aws_sdk_secretsmanager::Client::new(&config)
}

/// Version id → staging labels of a secret.
pub async fn labels(
    client: &aws_sdk_secretsmanager::Client,
    name: &str,
) -> BTreeMap<String, Vec<String>> {
    let described = client
        .describe_secret()
        .secret_id(name)
        .send()
        .await
        .expect("DescribeSecret");
    described
        .version_ids_to_stages
        .unwrap_or_default()
        .into_iter()
        .map(|(version, mut stages)| {
            stages.sort();
            (version, stages)
        })
        .filter(|(_, stages)| !stages.is_empty())
        .collect()
}

/// The `AWSCURRENT` value of a secret.
pub async fn current_value(client: &aws_sdk_secretsmanager::Client, name: &str) -> String {
    client
        .get_secret_value()
        .secret_id(name)
        .version_stage("AWSCURRENT")
        .send()
        .await
        .expect("GetSecretValue")
        .secret_string
        .expect("a string secret")
}

/// `moto_server` from the venv `scripts/test` made: the test's own
/// emulator, for tests that freeze or stop it.
pub fn moto_server() -> Option<PathBuf> {
    endpoint()?;
    let path = std::env::var_os("KEYROLL_TEST_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server"));
    if path.exists() {
        Some(path)
    } else {
        super::skipped(&format!(
            "no moto_server at {} (KEYROLL_TEST_MOTO_SERVER; scripts/test installs it)",
            path.display()
        ));
        None
    }
}

/// A private emulator instance, killed on drop.
pub struct Emulator {
    pub child: Child,
    pub endpoint: String,
}

impl Emulator {
    pub fn start(moto_server: &PathBuf) -> Emulator {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
            listener.local_addr().unwrap().port()
        };
        let child = Command::new(moto_server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let emulator = Emulator {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        emulator
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // A frozen emulator must be thawed to die cleanly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
