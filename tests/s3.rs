//! S3 publication (SPEC §4, `s3_jwks` and `s3_discovery`) against the real
//! binary and an S3 emulator (moto, which `scripts/test` starts and which
//! serves S3 beside Secrets Manager): the objects hold the HTTP bytes with
//! their headers; a missing bucket, access denied, a frozen or restarted
//! emulator and objects deleted or overwritten by someone else; and, by
//! counting the emulator's own request log, no `PutObject` unless the bytes
//! changed, across a restart too. Without `KEYROLL_TEST_AWS_ENDPOINT` the
//! emulator tests skip; the access-denied test runs against a scripted
//! server and always runs.

#[allow(dead_code)]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use common::*;
use sha2::{Digest, Sha256};
use support::aws as emulator;

/// The idle check period the daemon runs with here (30 s in production).
const CHECK_EVERY: &str = "1s";
const JWKS_KEY: &str = "keys/jwks.json";
const DISCOVERY_KEY: &str = "tenant/.well-known/openid-configuration";

// ---- an S3 client of the test's own -------------------------------------------

struct S3 {
    runtime: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
}

/// An object as S3 holds it.
#[derive(Debug, PartialEq)]
struct Object {
    body: Vec<u8>,
    content_type: Option<String>,
    cache_control: Option<String>,
    sha256_metadata: Option<String>,
}

impl S3 {
    fn new(endpoint: &str) -> S3 {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let client = runtime.block_on(async {
            let http = aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https();
            let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .http_client(http)
                .region(aws_config::Region::new(emulator::REGION))
                .endpoint_url(endpoint)
                .credentials_provider(aws_sdk_s3::config::Credentials::new(
                    "testing",
                    "testing",
                    None,
                    None,
                    "keyroll-tests",
                ))
                .load()
                .await;
            let s3 = aws_sdk_s3::config::Builder::from(&config)
                .force_path_style(true)
                .build();
            aws_sdk_s3::Client::from_conf(s3)
        });
        S3 { runtime, client }
    }

    fn create_bucket(&self, bucket: &str) {
        self.runtime
            .block_on(self.client.create_bucket().bucket(bucket).send())
            .unwrap_or_else(|e| panic!("CreateBucket {bucket}: {e:?}"));
    }

    fn get(&self, bucket: &str, key: &str) -> Result<Object, String> {
        self.runtime.block_on(async {
            let got = self
                .client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| format!("GetObject s3://{bucket}/{key}: {e}"))?;
            let content_type = got.content_type().map(str::to_string);
            let cache_control = got.cache_control().map(str::to_string);
            let sha256_metadata = got.metadata().and_then(|m| m.get("sha256")).cloned();
            let body = got
                .body
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .into_bytes()
                .to_vec();
            Ok(Object {
                body,
                content_type,
                cache_control,
                sha256_metadata,
            })
        })
    }

    fn delete(&self, bucket: &str, key: &str) {
        self.runtime
            .block_on(self.client.delete_object().bucket(bucket).key(key).send())
            .expect("DeleteObject");
    }

    fn overwrite(&self, bucket: &str, key: &str, body: &'static [u8]) {
        self.runtime
            .block_on(
                self.client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(ByteStream::from_static(body))
                    .send(),
            )
            .expect("PutObject");
    }
}

fn unique_bucket() -> String {
    format!(
        "keyroll-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..20]
    )
}

// ---- the daemon ---------------------------------------------------------------

/// A keyset `default` publishing its JWKS and discovery document to
/// `bucket`, with `jwks_file` and `signing_dir` beside (the other outputs).
fn s3_sandbox(bucket: &str) -> Sandbox {
    let sb = Sandbox::new();
    let settings = format!(
        "issuer = \"http://127.0.0.1:{port}/tenant\"\ns3_jwks = \"s3://{bucket}/{JWKS_KEY}\"\n\
         s3_discovery = \"s3://{bucket}/{DISCOVERY_KEY}\"\n{}",
        outputs(Some(&sb.path("out/jwks.json")), Some(&sb.path("signing"))),
        port = sb.port,
    );
    sb.write_config(&keyset_block("default", &ALGS, STEADY, &settings));
    sb
}

/// `keyroll run` sending S3 requests to `endpoint` (through
/// `AWS_ENDPOINT_URL_S3`, as an operator would), checking every second.
fn spawn(sb: &Sandbox, endpoint: &str) -> Daemon {
    let mut cmd = sb.command();
    cmd.env("AWS_ENDPOINT_URL_S3", endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", emulator::REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("KEYROLL_S3_CHECK_INTERVAL", CHECK_EVERY)
        .arg("--config")
        .arg(sb.config_path())
        .arg("run");
    Daemon::start(cmd, sb.root())
}

fn http_jwks(sb: &Sandbox) -> Vec<u8> {
    get_ok(&jwks_url(sb, "default")).expect("the JWKS").body
}

fn http_discovery(sb: &Sandbox) -> Vec<u8> {
    get_ok(&sb.url("/tenant/.well-known/openid-configuration"))
        .expect("the discovery document")
        .body
}

/// Waits until the object holds `wanted`.
fn until_object(daemon: &mut Daemon, s3: &S3, bucket: &str, key: &str, wanted: &[u8]) -> Object {
    daemon.until(
        &format!("s3://{bucket}/{key} to hold the HTTP bytes"),
        LONG,
        || {
            let object = s3.get(bucket, key)?;
            if object.body == wanted {
                Ok(object)
            } else {
                Err(format!(
                    "it holds {:?}",
                    String::from_utf8_lossy(&object.body)
                ))
            }
        },
    )
}

fn s3_errors(sb: &Sandbox) -> f64 {
    metric(
        &metrics_text(sb),
        "keyroll_publish_errors_total",
        &[("keyset", "default"), ("output", "s3")],
    )
    .unwrap_or(0.0)
}

/// `/readyz`, the JWKS and `jwks_file` are all as they should be.
fn other_outputs_work(sb: &Sandbox) {
    assert_eq!(get(&sb.url("/readyz")).unwrap().status, 200, "/readyz");
    let jwks = http_jwks(sb);
    assert_eq!(
        fs::read(sb.path("out/jwks.json")).unwrap(),
        jwks,
        "jwks_file"
    );
    read_signer(&sb.path("signing"), "ES256").expect("signing_dir");
}

fn rotate_now(sb: &Sandbox) {
    sb.cli(&["rotate", "--now"]).ok();
}

// ---- tests on the shared emulator ---------------------------------------------

/// Both objects hold the HTTP bytes, with `Content-Type`, `Cache-Control`
/// and the SHA-256 keyroll compares against; a rotation is uploaded.
#[test]
fn objects_hold_the_http_bytes_and_headers() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let s3 = S3::new(&endpoint);
    let bucket = unique_bucket();
    s3.create_bucket(&bucket);
    let sb = s3_sandbox(&bucket);
    let mut daemon = spawn(&sb, &endpoint);
    wait_ready(&mut daemon, &sb);

    let jwks = http_jwks(&sb);
    let object = until_object(&mut daemon, &s3, &bucket, JWKS_KEY, &jwks);
    assert_eq!(
        object.content_type.as_deref(),
        Some("application/jwk-set+json")
    );
    assert_eq!(object.cache_control.as_deref(), Some("public, max-age=2"));
    assert_eq!(
        object.sha256_metadata.as_deref(),
        Some(hex(&Sha256::digest(&jwks)).as_str())
    );
    let discovery = http_discovery(&sb);
    let object = until_object(&mut daemon, &s3, &bucket, DISCOVERY_KEY, &discovery);
    assert_eq!(object.content_type.as_deref(), Some("application/json"));
    assert_eq!(object.cache_control.as_deref(), Some("public, max-age=2"));

    rotate_now(&sb);
    let rotated = daemon.until("the rotated JWKS on HTTP", LONG, || {
        let now = http_jwks(&sb);
        if now != jwks {
            Ok(now)
        } else {
            Err("not yet".into())
        }
    });
    until_object(&mut daemon, &s3, &bucket, JWKS_KEY, &rotated);
    assert_eq!(s3_errors(&sb), 0.0, "{}", tail(&daemon.stderr()));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A bucket that does not exist: an error in the logs and the metric, while
/// HTTP, `jwks_file`, `signing_dir` and `/readyz` carry on and a rotation is
/// still published at once; once the bucket exists the objects appear.
#[test]
fn a_missing_bucket_is_reported_and_nothing_else_stops() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let s3 = S3::new(&endpoint);
    let bucket = unique_bucket();
    let sb = s3_sandbox(&bucket);
    let mut daemon = spawn(&sb, &endpoint);
    wait_ready(&mut daemon, &sb);
    daemon.until("an S3 error counted", LONG, || {
        let errors = s3_errors(&sb);
        if errors >= 2.0 {
            Ok(())
        } else {
            Err(format!("{errors} errors"))
        }
    });
    daemon.until("NoSuchBucket in the log", LONG, || {
        let log = daemon_log(&sb);
        if log.contains("NoSuchBucket") && log.contains("cannot publish to S3") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    other_outputs_work(&sb);
    let before = http_jwks(&sb);
    rotate_now(&sb);
    daemon.until("the rotation on HTTP despite S3", LONG, || {
        if http_jwks(&sb) != before {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    other_outputs_work(&sb);

    s3.create_bucket(&bucket);
    let jwks = http_jwks(&sb);
    until_object(&mut daemon, &s3, &bucket, JWKS_KEY, &jwks);
    until_object(
        &mut daemon,
        &s3,
        &bucket,
        DISCOVERY_KEY,
        &http_discovery(&sb),
    );
    daemon.until("the recovery logged", LONG, || {
        if daemon_log(&sb).contains("S3 upload works again") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
}

/// The daemon's stderr, wherever the harness put it.
fn daemon_log(sb: &Sandbox) -> String {
    fs::read_dir(sb.root())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("daemon-") && name.ends_with(".stderr")
        })
        .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

/// An object deleted, or overwritten by someone else, is put back within
/// the check period (here 1 s), without a change of keys.
#[test]
fn objects_deleted_or_overwritten_are_put_back() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let s3 = S3::new(&endpoint);
    let bucket = unique_bucket();
    s3.create_bucket(&bucket);
    let sb = s3_sandbox(&bucket);
    let mut daemon = spawn(&sb, &endpoint);
    wait_ready(&mut daemon, &sb);
    let (jwks, discovery) = (http_jwks(&sb), http_discovery(&sb));
    until_object(&mut daemon, &s3, &bucket, JWKS_KEY, &jwks);
    until_object(&mut daemon, &s3, &bucket, DISCOVERY_KEY, &discovery);

    s3.delete(&bucket, JWKS_KEY);
    s3.overwrite(
        &bucket,
        DISCOVERY_KEY,
        b"{\"issuer\":\"https://attacker.example\"}",
    );
    let object = until_object(&mut daemon, &s3, &bucket, JWKS_KEY, &jwks);
    assert_eq!(
        object.content_type.as_deref(),
        Some("application/jwk-set+json")
    );
    let object = until_object(&mut daemon, &s3, &bucket, DISCOVERY_KEY, &discovery);
    assert_eq!(object.cache_control.as_deref(), Some("public, max-age=2"));
    assert!(
        daemon_log(&sb).contains("changed by someone else; put it back"),
        "{}",
        tail(&daemon.stderr())
    );
    assert_eq!(http_jwks(&sb), jwks, "nothing else changed");
}

// ---- access denied, from a scripted server ----------------------------------------

/// Answers every request with 403 AccessDenied (S3's XML error; no body for
/// HEAD), counting requests by method.
fn access_denied_server() -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (heads, puts) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (head_count, put_count) = (heads.clone(), puts.clone());
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if request_line.is_empty() {
                    request_line = line.clone();
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let head = request_line.starts_with("HEAD ");
            if head {
                head_count.fetch_add(1, Ordering::SeqCst);
            } else if request_line.starts_with("PUT ") {
                put_count.fetch_add(1, Ordering::SeqCst);
            }
            let reply = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message><RequestId>1</RequestId></Error>";
            let answer = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                reply.len(),
                if head { "" } else { reply }
            );
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    (endpoint, heads, puts)
}

/// Access denied: logged with S3's error code and counted, retried with
/// backoff (not in a tight loop), while HTTP, the files and `/readyz` carry
/// on. A 403 on `HeadObject` (what S3 answers for a missing key without
/// `s3:ListBucket`) is followed by a `PutObject`, whose answer decides.
#[test]
fn access_denied_is_reported_and_nothing_else_stops() {
    let (endpoint, heads, puts) = access_denied_server();
    let sb = s3_sandbox("keys-bucket");
    let mut daemon = spawn(&sb, &endpoint);
    wait_ready(&mut daemon, &sb);
    daemon.until("AccessDenied logged and counted", LONG, || {
        let errors = s3_errors(&sb);
        let log = daemon_log(&sb);
        if errors >= 2.0 && log.contains("AccessDenied") {
            Ok(())
        } else {
            Err(format!("{errors} errors"))
        }
    });
    other_outputs_work(&sb);
    assert!(
        puts.load(Ordering::SeqCst) >= 1,
        "a PutObject after the 403 HEAD"
    );
    let started = Instant::now();
    let before = heads.load(Ordering::SeqCst) + puts.load(Ordering::SeqCst);
    thread::sleep(Duration::from_secs(3)); // a measurement window, not synchronisation
    let per_second = (heads.load(Ordering::SeqCst) + puts.load(Ordering::SeqCst) - before) as f64
        / started.elapsed().as_secs_f64();
    // Two objects retried at most once per check period (1 s) each, two
    // requests per retry: a tight loop would make hundreds.
    assert!(per_second <= 8.0, "{per_second} requests/s while denied");
}

// ---- a private emulator: stopped, restarted, and its requests counted -----------

/// A moto_server of the test's own on a fixed port, its request log kept:
/// werkzeug logs one line per request (`"PUT /bucket/key?x-id=PutObject
/// HTTP/1.1" 200`).
struct LoggedEmulator {
    server: PathBuf,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl LoggedEmulator {
    fn start(server: PathBuf, dir: &Path) -> LoggedEmulator {
        let mut emulator = LoggedEmulator {
            server,
            port: free_port(),
            log: dir.join("moto.log"),
            child: None,
        };
        emulator.restart();
        emulator
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.server)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        self.child = Some(child);
        wait_until("moto_server to listen", LONG, || {
            std::net::TcpStream::connect(("127.0.0.1", self.port))
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Requests of `method` on `s3://bucket/key` so far.
    fn count(&self, method: &str, bucket: &str, key: &str) -> usize {
        let needle = format!("{method} /{bucket}/{key}");
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                line.split_once(needle.as_str())
                    .is_some_and(|(_, rest)| rest.starts_with(' ') || rest.starts_with('?'))
            })
            .count()
    }
}

impl Drop for LoggedEmulator {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Counts {
    jwks_puts: usize,
    jwks_heads: usize,
    discovery_puts: usize,
    discovery_heads: usize,
}

fn counts(emulator: &LoggedEmulator, bucket: &str) -> Counts {
    Counts {
        jwks_puts: emulator.count("PUT", bucket, JWKS_KEY),
        jwks_heads: emulator.count("HEAD", bucket, JWKS_KEY),
        discovery_puts: emulator.count("PUT", bucket, DISCOVERY_KEY),
        discovery_heads: emulator.count("HEAD", bucket, DISCOVERY_KEY),
    }
}

/// Waits until both objects have been checked `n` more times than `since`.
fn until_checked(
    daemon: &mut Daemon,
    emulator: &LoggedEmulator,
    bucket: &str,
    since: Counts,
    n: usize,
) -> Counts {
    daemon.until(&format!("{n} more HeadObject per object"), LONG, || {
        let now = counts(emulator, bucket);
        if now.jwks_heads >= since.jwks_heads + n
            && now.discovery_heads >= since.discovery_heads + n
        {
            Ok(now)
        } else {
            Err(format!("{now:?}"))
        }
    })
}

/// Counted in the emulator's own request log: the first start puts each
/// object once; idle, only `HeadObject`s; a restart with the same keys
/// makes no `PutObject`; a rotation makes one `PutObject` of the JWKS and
/// none of the (unchanged) discovery document. Prints the figures.
#[test]
fn put_object_only_when_the_bytes_change_across_restarts() {
    let Some(server) = emulator::moto_server() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let emulator = LoggedEmulator::start(server, work.path());
    let s3 = S3::new(&emulator.endpoint());
    let bucket = unique_bucket();
    s3.create_bucket(&bucket);
    let sb = s3_sandbox(&bucket);

    let mut daemon = spawn(&sb, &emulator.endpoint());
    wait_ready(&mut daemon, &sb);
    until_object(&mut daemon, &s3, &bucket, JWKS_KEY, &http_jwks(&sb));
    until_object(
        &mut daemon,
        &s3,
        &bucket,
        DISCOVERY_KEY,
        &http_discovery(&sb),
    );
    let first = counts(&emulator, &bucket);
    assert_eq!((first.jwks_puts, first.discovery_puts), (1, 1), "{first:?}");

    let idle_started = Instant::now();
    let idle = until_checked(&mut daemon, &emulator, &bucket, first, 5);
    let idle_seconds = idle_started.elapsed().as_secs_f64();
    assert_eq!(
        (idle.jwks_puts, idle.discovery_puts),
        (1, 1),
        "idle: {idle:?}"
    );

    daemon.stop_cleanly("TERM");
    let mut daemon = spawn(&sb, &emulator.endpoint());
    wait_ready(&mut daemon, &sb);
    let restarted = until_checked(&mut daemon, &emulator, &bucket, idle, 3);
    assert_eq!(
        (restarted.jwks_puts, restarted.discovery_puts),
        (1, 1),
        "a restart with the same keys wrote: {restarted:?}"
    );

    rotate_now(&sb);
    let rotated = daemon.until("the rotation uploaded", LONG, || {
        let jwks = http_jwks(&sb);
        match s3.get(&bucket, JWKS_KEY) {
            Ok(object) if object.body == jwks => Ok(counts(&emulator, &bucket)),
            _ => Err("not yet".into()),
        }
    });
    let settled = until_checked(&mut daemon, &emulator, &bucket, rotated, 2);
    assert_eq!(
        settled.jwks_puts, 2,
        "one PutObject per change: {settled:?}"
    );
    assert_eq!(
        settled.discovery_puts, 1,
        "the discovery document did not change"
    );

    let idle_heads =
        (idle.jwks_heads - first.jwks_heads) + (idle.discovery_heads - first.discovery_heads);
    eprintln!(
        "S3 requests: first start {} HEAD + {} PUT for 2 objects; idle {} HEAD and 0 PUT in {:.1} s \
         (check period {CHECK_EVERY}: one HEAD per object per period); restart with the same keys \
         {} HEAD + 0 PUT; a rotation {} PUT (JWKS only, after one HEAD)",
        first.jwks_heads + first.discovery_heads,
        first.jwks_puts + first.discovery_puts,
        idle_heads,
        idle_seconds,
        (restarted.jwks_heads - idle.jwks_heads) + (restarted.discovery_heads - idle.discovery_heads),
        settled.jwks_puts - restarted.jwks_puts,
    );
}

/// A frozen emulator delays no reconcile: a rotation reaches HTTP while S3
/// requests hang. Stopped and restarted empty (moto keeps nothing), with
/// the bucket made again: the objects are put back, with the latest bytes.
#[test]
fn a_frozen_then_restarted_emulator_gets_the_objects_back() {
    let Some(server) = emulator::moto_server() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let mut emulator = LoggedEmulator::start(server, work.path());
    let s3 = S3::new(&emulator.endpoint());
    let bucket = unique_bucket();
    s3.create_bucket(&bucket);
    let sb = s3_sandbox(&bucket);
    let mut daemon = spawn(&sb, &emulator.endpoint());
    wait_ready(&mut daemon, &sb);
    until_object(&mut daemon, &s3, &bucket, JWKS_KEY, &http_jwks(&sb));

    emulator.signal("STOP");
    let before = http_jwks(&sb);
    rotate_now(&sb);
    let rotated = daemon.until("the rotation on HTTP while S3 hangs", LONG, || {
        let now = http_jwks(&sb);
        if now != before {
            Ok(now)
        } else {
            Err("not yet".into())
        }
    });
    other_outputs_work(&sb);

    emulator.stop();
    daemon.until("the outage counted", LONG, || {
        let errors = s3_errors(&sb);
        if errors >= 1.0 {
            Ok(())
        } else {
            Err(format!("{errors} errors"))
        }
    });
    other_outputs_work(&sb);
    emulator.restart();
    let s3 = S3::new(&emulator.endpoint());
    s3.create_bucket(&bucket);
    until_object(&mut daemon, &s3, &bucket, JWKS_KEY, &rotated);
    until_object(
        &mut daemon,
        &s3,
        &bucket,
        DISCOVERY_KEY,
        &http_discovery(&sb),
    );
}

// ---- the IAM statements shipped in deploy/aws ------------------------------------

fn statements(file: &str) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/aws")
        .join(file);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let policy: serde_json::Value = serde_json::from_str(&text).expect("a JSON policy");
    policy["Statement"].as_array().expect("statements").clone()
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::String(one) => vec![one.clone()],
        serde_json::Value::Array(many) => many
            .iter()
            .map(|v| v.as_str().expect("a string").to_string())
            .collect(),
        other => panic!("expected a string or a list, got {other}"),
    }
}

/// Least privilege: keyroll's policy allows exactly the two calls it makes
/// (`HeadObject` is authorized by `s3:GetObject`) on named objects, no
/// wildcard; the public bucket policy allows reading those objects only.
#[test]
fn the_shipped_s3_policies_name_objects_and_nothing_more() {
    for (file, allowed) in [
        ("iam-policy-s3.json", vec!["s3:GetObject", "s3:PutObject"]),
        ("s3-bucket-policy-public-read.json", vec!["s3:GetObject"]),
    ] {
        for statement in statements(file) {
            assert_eq!(statement["Effect"], "Allow", "{file}");
            let mut actions = strings(&statement["Action"]);
            actions.sort();
            assert_eq!(actions, allowed, "{file}");
            for resource in strings(&statement["Resource"]) {
                let object = resource
                    .strip_prefix("arn:aws:s3:::BUCKET/")
                    .unwrap_or_else(|| panic!("{file}: {resource} is not an object ARN"));
                assert!(
                    !object.is_empty() && !object.contains('*'),
                    "{file}: {resource} is not one object"
                );
            }
        }
    }
}
