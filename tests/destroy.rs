//! Revoked means destroyed (issue 12). On AWS each private key lives in a
//! key secret of its own, deleted without recovery once a committed
//! document drops the key: checked against the emulator by reading every
//! version (by id and by label) of every secret under the test's prefix.
//! Also: a failing deletion retried and reported, the orphan sweep, racing
//! writers, the migration of a schema 2 document, an unknown schema left
//! alone, and what each operation costs in API calls (counted by a proxy in
//! front of the emulator); without `KEYROLL_TEST_AWS_ENDPOINT` those skip.
//! On the file store: no file in the store folder holds a revoked or
//! removed key, not even a temp file a killed writer left.

#[allow(dead_code)]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType};
use keyroll::clock::{Clock, SystemClock};
use keyroll::document::{KeyState, KeysetDoc};
use keyroll::key::{Alg, CryptoKeys, PrivateJwk, PrivateKey};
use keyroll::planner::Action;
use keyroll::reconcile::ReconcileError;
use keyroll::reconcile::Reconciler;
use keyroll::store::{AwsStore, FileStore, MemoryStore, Store, KEYS_INFIX};
use support::aws as emulator;
use support::{FakeClock, FakeKeys, PolicyText};

type Client = aws_sdk_secretsmanager::Client;

async fn store_on(endpoint: &str, prefix: &str, clock: Arc<dyn Clock>) -> AwsStore {
    AwsStore::connect(&emulator::settings(endpoint, prefix))
        .await
        .expect("connect")
        .with_clock(clock)
}

fn es256_only() -> keyroll::config::KeysetPolicy {
    PolicyText {
        algorithms: r#"["ES256"]"#,
        ..PolicyText::default()
    }
    .build()
}

/// Every value any secret under `prefix` still gives: by each version id
/// (deprecated versions included) and by each staging label, including
/// secrets scheduled for deletion.
async fn every_readable_value(client: &Client, prefix: &str) -> Vec<(String, String, String)> {
    let mut values = Vec::new();
    let mut names = Vec::new();
    let mut token = None;
    loop {
        let page = client
            .list_secrets()
            .include_planned_deletion(true)
            .filters(
                Filter::builder()
                    .key(FilterNameStringType::Name)
                    .values(prefix)
                    .build(),
            )
            .set_next_token(token)
            .send()
            .await
            .expect("ListSecrets");
        names.extend(
            page.secret_list()
                .iter()
                .filter_map(|s| s.name().map(str::to_string))
                .filter(|name| name.starts_with(prefix)),
        );
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    for name in names {
        let Ok(versions) = client
            .list_secret_version_ids()
            .secret_id(&name)
            .include_deprecated(true)
            .send()
            .await
        else {
            continue; // deleted between the two calls
        };
        let mut labels = BTreeSet::from(["AWSCURRENT".to_string(), "AWSPREVIOUS".to_string()]);
        for version in versions.versions() {
            labels.extend(version.version_stages().iter().cloned());
            let id = version.version_id().unwrap_or_default();
            if let Ok(got) = client
                .get_secret_value()
                .secret_id(&name)
                .version_id(id)
                .send()
                .await
            {
                values.push((
                    name.clone(),
                    id.to_string(),
                    got.secret_string.unwrap_or_default(),
                ));
            }
        }
        for label in labels {
            if let Ok(got) = client
                .get_secret_value()
                .secret_id(&name)
                .version_stage(&label)
                .send()
                .await
            {
                values.push((name.clone(), label, got.secret_string.unwrap_or_default()));
            }
        }
    }
    values
}

/// What identifies a private key in any text: 40 characters of its PEM
/// body that encode private values (the P-256 scalar after the fixed
/// PKCS#8 header; the end of an RSA key, its CRT values), and its JWK `d`.
struct Traces {
    kid: String,
    pem_marker: String,
    d: String,
}

fn traces(doc: &KeysetDoc, kid: &str) -> Traces {
    let key = doc.keys.iter().find(|k| k.kid == kid).expect("the key");
    let body: String = key
        .private_key_pem
        .expose()
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let pem_marker = match key.alg {
        Alg::ES256 => body[48..88].to_string(),
        Alg::RS256 => body[body.len() - 50..body.len() - 10].to_string(),
    };
    let private = PrivateKey::from_pem(key.alg, &key.private_key_pem).expect("a real key");
    let jwk = serde_json::to_value(PrivateJwk::from_private(&private)).unwrap();
    let d = jwk["d"].as_str().expect("d").to_string();
    Traces {
        kid: kid.to_string(),
        pem_marker,
        d,
    }
}

/// Where the key can still be read, as (secret, version or label). Line
/// breaks, raw or escaped in JSON, are ignored.
fn found(values: &[(String, String, String)], traces: &Traces) -> Vec<(String, String)> {
    values
        .iter()
        .filter(|(_, _, text)| {
            let flat: String = text.replace("\\n", "").replace(['\n', '\r'], "");
            flat.contains(&traces.pem_marker) || flat.contains(&traces.d)
        })
        .map(|(name, at, _)| (name.clone(), at.clone()))
        .collect()
}

async fn doc_of(store: &AwsStore) -> KeysetDoc {
    let stored = store.load("default").await.unwrap().expect("a document");
    KeysetDoc::parse(&stored.text, "default", "test").expect("parses")
}

fn kid_of(doc: &KeysetDoc, alg: Alg, state: KeyState) -> String {
    doc.key(alg, state).expect("the key").kid.clone()
}

/// Revoke, and removal after the grace: neither the document secret (in
/// any version) nor any key secret still gives the key, searched by its
/// PEM and by its JWK `d`. Before, the key was found in its key secret and
/// only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_and_removal_leave_the_private_key_in_no_version_of_any_secret() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let inspect = emulator::client(&endpoint).await;
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let store: Arc<AwsStore> = Arc::new(store_on(&endpoint, &prefix, clock.clone()).await);
    let reconciler = Reconciler::new(store.clone(), Arc::new(CryptoKeys), clock.clone());
    let policy = support::policy();
    reconciler
        .reconcile(&policy, None)
        .await
        .expect("bootstrap");
    // Some history: the document secret gets versions.
    let rotate = Action::Rotate {
        alg: None,
        force: true,
    };
    clock.advance(support::secs(60));
    reconciler.reconcile(&policy, Some(&rotate)).await.unwrap();

    let doc = doc_of(&store).await;
    let revoked = traces(&doc, &kid_of(&doc, Alg::ES256, KeyState::Active));
    let revoked_rsa = traces(&doc, &kid_of(&doc, Alg::RS256, KeyState::Next));
    let retired = traces(&doc, &kid_of(&doc, Alg::ES256, KeyState::Retired));
    let before = every_readable_value(&inspect, &prefix).await;
    for t in [&revoked, &revoked_rsa, &retired] {
        let key_secret = format!("{prefix}default{KEYS_INFIX}{}", t.kid);
        let seen: BTreeSet<String> = found(&before, t).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            seen,
            BTreeSet::from([key_secret]),
            "before: the key {} is in its key secret and nowhere else",
            t.kid
        );
    }

    for t in [&revoked, &revoked_rsa] {
        reconciler
            .reconcile(
                &policy,
                Some(&Action::Revoke {
                    kid: t.kid.clone(),
                    reason: "test".into(),
                }),
            )
            .await
            .expect("revoke");
    }
    assert!(store.destruction_pending("default").is_empty());
    let after = every_readable_value(&inspect, &prefix).await;
    for t in [&revoked, &revoked_rsa] {
        assert_eq!(found(&after, t), vec![], "after revoke: key {}", t.kid);
    }
    assert!(
        !found(&after, &retired).is_empty(),
        "the retired key stays until remove_at"
    );

    // The retired key's grace ends: removed, and destroyed with it.
    clock.advance(support::secs(3 * 3600));
    let outcome = reconciler.reconcile(&policy, None).await.unwrap();
    assert!(
        outcome
            .snapshot
            .doc
            .keys
            .iter()
            .all(|k| k.kid != retired.kid),
        "removed after its grace"
    );
    let after = every_readable_value(&inspect, &prefix).await;
    assert_eq!(found(&after, &retired), vec![], "after removal");
    // The audit trail keeps the kids, without key material.
    let doc = doc_of(&store).await;
    for t in [&revoked, &revoked_rsa, &retired] {
        assert!(doc.audit.iter().any(|r| r.kid == t.kid));
    }
    // The document secret, in every version, holds no private key at all.
    let document = format!("{prefix}default");
    for (name, at, text) in &after {
        if name == &document {
            assert!(
                !text.contains("PRIVATE KEY"),
                "version {at} of the document holds a private key"
            );
        }
    }
}

// ---- a proxy in front of the emulator: counts calls, fails DeleteSecret ----

/// Forwards each request to the emulator and records its `X-Amz-Target`
/// operation; answers `DeleteSecret` with 500 (or 400 AccessDenied) while
/// told to.
struct Proxy {
    endpoint: String,
    calls: Arc<Mutex<Vec<String>>>,
    fail_delete: Arc<Mutex<Option<(u16, &'static str)>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fail_delete = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, f, s) = (calls.clone(), fail_delete.clone(), stop.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (upstream, c, f) = (upstream.clone(), c.clone(), f.clone());
                thread::spawn(move || serve(stream, &upstream, &c, &f));
            }
        });
        Proxy {
            endpoint,
            calls,
            fail_delete,
            stop,
        }
    }

    fn take_calls(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for call in self.calls.lock().unwrap().drain(..) {
            *counts.entry(call).or_default() += 1;
        }
        counts
    }

    fn fail_deletes(&self, how: Option<(u16, &'static str)>) {
        *self.fail_delete.lock().unwrap() = how;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.endpoint.trim_start_matches("http://"));
    }
}

/// One client connection: requests one after another (keep-alive), each
/// forwarded on a fresh upstream connection.
fn serve(
    stream: TcpStream,
    upstream: &str,
    calls: &Mutex<Vec<String>>,
    fail_delete: &Mutex<Option<(u16, &'static str)>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut client = stream;
    loop {
        let mut head = Vec::new();
        let mut length = 0;
        let mut target = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if let Some(v) = line
                .split_once(':')
                .filter(|(name, _)| name.eq_ignore_ascii_case("x-amz-target"))
            {
                target =
                    v.1.trim()
                        .rsplit('.')
                        .next()
                        .unwrap_or_default()
                        .to_string();
            }
            if lower.starts_with("connection:") {
                continue;
            }
            if line == "\r\n" {
                head.extend_from_slice(b"connection: close\r\n\r\n");
                break;
            }
            head.extend_from_slice(line.as_bytes());
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        calls.lock().unwrap().push(target.clone());
        let failing = *fail_delete.lock().unwrap();
        let reply = match failing.filter(|_| target == "DeleteSecret") {
            Some((status, kind)) => {
                let body = format!(r#"{{"__type":"{kind}","message":"scripted {kind}"}}"#);
                let mut reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                reply.extend_from_slice(body.as_bytes());
                reply
            }
            None => {
                let Ok(mut up) = TcpStream::connect(upstream) else {
                    return;
                };
                up.write_all(&head).unwrap();
                up.write_all(&body).unwrap();
                let mut reply = Vec::new();
                if up.read_to_end(&mut reply).is_err() {
                    return;
                }
                keep_alive(reply)
            }
        };
        if client.write_all(&reply).is_err() {
            return;
        }
    }
}

/// The emulator's answer, minus its `Connection: close`, so the client
/// keeps its connection to the proxy.
fn keep_alive(reply: Vec<u8>) -> Vec<u8> {
    let Some(end) = reply.windows(4).position(|w| w == b"\r\n\r\n") else {
        return reply;
    };
    let head = String::from_utf8_lossy(&reply[..end]);
    let mut out: Vec<u8> = head
        .split("\r\n")
        .filter(|line| !line.to_ascii_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n")
        .into_bytes();
    out.extend_from_slice(&reply[end..]);
    out
}

/// A tracing subscriber on this thread that keeps what is logged.
fn capture_logs() -> (tracing::subscriber::DefaultGuard, Arc<Mutex<Vec<u8>>>) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink(buffer.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    (tracing::subscriber::set_default(subscriber), buffer)
}

/// DeleteSecret failing (500 beyond the SDK's retries, then access
/// denied): the revoke is committed, the key is reported (ERROR naming
/// keyset and kid, never the key; `destruction_pending`), each later load
/// tries again, and once deletion works the key is gone everywhere.
#[tokio::test]
async fn a_failed_destruction_is_reported_and_retried_until_it_succeeds() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let (_guard, logs) = capture_logs();
    let proxy = Proxy::start(&endpoint);
    let prefix = emulator::unique_prefix();
    let inspect = emulator::client(&endpoint).await;
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let store = Arc::new(store_on(&proxy.endpoint, &prefix, clock.clone()).await);
    let reconciler = Reconciler::new(store.clone(), Arc::new(CryptoKeys), clock.clone());
    let policy = es256_only();
    reconciler
        .reconcile(&policy, None)
        .await
        .expect("bootstrap");
    let doc = doc_of(&store).await;
    let revoked = traces(&doc, &kid_of(&doc, Alg::ES256, KeyState::Next));

    proxy.fail_deletes(Some((500, "InternalServiceError")));
    proxy.take_calls();
    reconciler
        .reconcile(
            &policy,
            Some(&Action::Revoke {
                kid: revoked.kid.clone(),
                reason: "test".into(),
            }),
        )
        .await
        .expect("the revoke is committed even though the deletion fails");
    let calls = proxy.take_calls();
    assert_eq!(
        calls.get("DeleteSecret"),
        Some(&(keyroll::aws::MAX_ATTEMPTS as usize)),
        "the SDK retried the 500: {calls:?}"
    );
    assert_eq!(
        store.destruction_pending("default"),
        vec![revoked.kid.clone()]
    );
    let readable = found(&every_readable_value(&inspect, &prefix).await, &revoked);
    let key_secret = format!("{prefix}default{KEYS_INFIX}{}", revoked.kid);
    assert!(
        !readable.is_empty() && readable.iter().all(|(name, _)| *name == key_secret),
        "still readable in its key secret, and reported: {readable:?}"
    );
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("cannot destroy"))
        .unwrap_or_else(|| panic!("no ERROR line:\n{text}"));
    assert!(
        line.contains("keyset=default") && line.contains(&revoked.kid),
        "{line}"
    );
    assert!(!text.contains(&revoked.pem_marker) && !text.contains(&revoked.d));

    // Each later pass tries again; a denial is reported the same way.
    proxy.fail_deletes(Some((400, "AccessDeniedException")));
    for _ in 0..2 {
        reconciler.reconcile(&policy, None).await.unwrap();
        let calls = proxy.take_calls();
        assert_eq!(calls.get("DeleteSecret"), Some(&1), "{calls:?}");
        assert_eq!(
            store.destruction_pending("default"),
            vec![revoked.kid.clone()]
        );
    }
    // Another process sees it pending from the document alone.
    let other = store_on(&proxy.endpoint, &prefix, clock.clone()).await;
    other.load("default").await.unwrap();
    assert_eq!(
        other.destruction_pending("default"),
        vec![revoked.kid.clone()]
    );

    proxy.fail_deletes(None);
    reconciler.reconcile(&policy, None).await.unwrap();
    assert!(store.destruction_pending("default").is_empty());
    assert_eq!(
        found(&every_readable_value(&inspect, &prefix).await, &revoked),
        vec![]
    );
    // Known gone: the next idle pass reads the document alone.
    proxy.take_calls();
    reconciler.reconcile(&policy, None).await.unwrap();
    assert_eq!(
        proxy.take_calls(),
        BTreeMap::from([("GetSecretValue".to_string(), 1)])
    );
}

/// The key secrets of the keyset, by kid.
async fn key_secrets(client: &Client, prefix: &str) -> BTreeSet<String> {
    let own = format!("{prefix}default{KEYS_INFIX}");
    every_readable_value(client, &own)
        .await
        .into_iter()
        .map(|(name, _, _)| name[own.len()..].to_string())
        .collect()
}

fn referenced(doc: &KeysetDoc) -> BTreeSet<String> {
    doc.keys.iter().map(|k| k.kid.clone()).collect()
}

/// A key secret no document references (a writer crashed between creating
/// it and its compare-and-swap) is kept while it is younger than the orphan
/// age, and deleted by the first sweep after; referenced ones stay.
#[tokio::test]
async fn orphaned_key_secrets_are_swept_after_the_orphan_age_only() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let inspect = emulator::client(&endpoint).await;
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let store = Arc::new(store_on(&endpoint, &prefix, clock.clone()).await);
    let reconciler = Reconciler::new(store.clone(), Arc::new(FakeKeys::new()), clock.clone());
    let policy = es256_only();
    reconciler.reconcile(&policy, None).await.unwrap();
    let orphan = "o".repeat(43);
    inspect
        .create_secret()
        .name(format!("{prefix}default{KEYS_INFIX}{orphan}"))
        .secret_string("a crashed writer's key")
        .send()
        .await
        .unwrap();

    // A new process sweeps at its first load; the orphan is too young.
    let fresh = store_on(&endpoint, &prefix, clock.clone()).await;
    fresh.load("default").await.unwrap();
    let doc = doc_of(&store).await;
    let mut expected = referenced(&doc);
    expected.insert(orphan.clone());
    assert_eq!(key_secrets(&inspect, &prefix).await, expected);

    // A day later, the next sweep takes it, and only it (the day's
    // rotation adds a key meanwhile).
    clock.advance(
        chrono::Duration::from_std(keyroll::store::ORPHAN_AGE).unwrap() + support::secs(60),
    );
    let outcome = reconciler.reconcile(&policy, None).await.unwrap();
    assert_eq!(
        key_secrets(&inspect, &prefix).await,
        referenced(&outcome.snapshot.doc)
    );
    assert_eq!(
        referenced(&doc_of(&store).await),
        referenced(&outcome.snapshot.doc)
    );
}

/// Two writers racing from one version: the loser's new key secret is
/// deleted at once (it is never referenced), so no orphan is left to
/// read, before or after the sweep. Then two reconcilers racing rotations
/// over many rounds: every key secret is referenced by the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_leave_no_readable_orphan() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let inspect = emulator::client(&endpoint).await;
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let a = Arc::new(store_on(&endpoint, &prefix, clock.clone()).await);
    let b = Arc::new(store_on(&endpoint, &prefix, clock.clone()).await);
    let keys = Arc::new(FakeKeys::new());
    let policy = es256_only();
    let ra = Reconciler::new(a.clone(), keys.clone(), clock.clone());
    let rb = Reconciler::new(b.clone(), keys.clone(), clock.clone());
    ra.reconcile(&policy, None).await.unwrap();

    // Both load the same version and both save a rotation: one conflicts.
    let rotate = Action::Rotate {
        alg: None,
        force: true,
    };
    let mut conflicts = 0;
    for round in 0..6 {
        clock.advance(support::secs(60));
        let (x, y) = tokio::join!(
            ra.reconcile(&policy, Some(&rotate)),
            rb.reconcile(&policy, Some(&rotate))
        );
        conflicts += x.unwrap().conflicts + y.unwrap().conflicts;
        let doc = doc_of(&a).await;
        let secrets = key_secrets(&inspect, &prefix).await;
        assert_eq!(
            secrets,
            referenced(&doc),
            "round {round}: key secrets other than the document's keys"
        );
    }
    // The deterministic race, at the store: the same expected version.
    let loaded = a.load("default").await.unwrap().unwrap();
    b.load("default").await.unwrap();
    let doc = KeysetDoc::parse(&loaded.text, "default", "t").unwrap();
    // Each writer adds a key of its own (a retired one: no state rule to
    // break), made as the reconciler makes keys.
    let with_new_key = || {
        let mut next = doc.clone();
        let key = keyroll::key::KeyFactory::generate(
            keys.as_ref(),
            Alg::ES256,
            2048,
            "default",
            clock.now(),
        )
        .unwrap();
        let mut stored = next.keys[0].clone();
        stored.kid = key.kid;
        stored.private_key_pem = key.private_key_pem;
        stored.state = KeyState::Retired;
        stored.activated_at = Some(clock.now());
        stored.retired_at = Some(clock.now());
        stored.remove_at = Some(clock.now());
        next.keys.push(stored);
        next.to_json()
    };
    let (ta, tb) = (with_new_key(), with_new_key());
    a.save("default", &ta, Some(&loaded.version))
        .await
        .expect("a wins");
    let lost = b.save("default", &tb, Some(&loaded.version)).await;
    assert!(matches!(lost, Err(ref e) if e.is_conflict()), "{lost:?}");
    conflicts += 1;
    let won = KeysetDoc::parse(
        &a.load("default").await.unwrap().unwrap().text,
        "default",
        "t",
    )
    .unwrap();
    assert_eq!(key_secrets(&inspect, &prefix).await, referenced(&won));

    // And after the orphan age, the sweep finds nothing to take.
    clock.advance(
        chrono::Duration::from_std(keyroll::store::ORPHAN_AGE).unwrap() + support::secs(60),
    );
    let later = store_on(&endpoint, &prefix, clock.clone()).await;
    later.load("default").await.unwrap();
    assert_eq!(key_secrets(&inspect, &prefix).await, referenced(&won));
    assert!(conflicts >= 1);
    eprintln!("{conflicts} conflicts met");
}

/// A schema 2 document (keys inline, as keyroll wrote before) still loads
/// and is served; its first change writes schema 3 with every key in a key
/// secret. The old inline versions stay readable under AWSPREVIOUS and by
/// version id: Secrets Manager cannot delete one version (README says so).
#[tokio::test]
async fn a_schema_2_document_is_migrated_at_its_next_change() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let inspect = emulator::client(&endpoint).await;
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let keys = Arc::new(FakeKeys::new());
    let policy = es256_only();
    // What an older keyroll stored: the document with its keys inline.
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
    Reconciler::new(memory.clone(), keys.clone(), clock.clone())
        .reconcile(&policy, None)
        .await
        .unwrap();
    let legacy = memory.load("default").await.unwrap().unwrap().text;
    assert!(legacy.contains("\"schema_version\": 2") && legacy.contains("private_key_pem"));
    inspect
        .create_secret()
        .name(format!("{prefix}default"))
        .secret_string(legacy.as_str())
        .send()
        .await
        .unwrap();

    let store = Arc::new(store_on(&endpoint, &prefix, clock.clone()).await);
    let reconciler = Reconciler::new(store.clone(), keys.clone(), clock.clone());
    let outcome = reconciler.reconcile(&policy, None).await.expect("loads");
    assert!(
        outcome.committed.is_empty(),
        "nothing to change, nothing written"
    );
    let before_kids = referenced(&outcome.snapshot.doc);
    assert!(key_secrets(&inspect, &prefix).await.is_empty());

    clock.advance(support::secs(60));
    let rotate = Action::Rotate {
        alg: None,
        force: true,
    };
    let outcome = reconciler.reconcile(&policy, Some(&rotate)).await.unwrap();
    let current = emulator::current_value(&inspect, &format!("{prefix}default")).await;
    assert!(current.contains("\"schema_version\": 3"), "{current}");
    assert!(!current.contains("private_key_pem"), "{current}");
    assert_eq!(
        key_secrets(&inspect, &prefix).await,
        referenced(&outcome.snapshot.doc)
    );
    assert!(before_kids.is_subset(&referenced(&outcome.snapshot.doc)));
    // The honest part: the schema 2 version is AWSPREVIOUS now.
    let labels = emulator::labels(&inspect, &format!("{prefix}default")).await;
    assert_eq!(labels.len(), 2, "{labels:?}");
}

/// What each operation costs in Secrets Manager calls, counted by the
/// proxy, for a keyset with ES256 and RS256 (a process already warm):
/// an idle pass reads the document alone.
#[tokio::test]
async fn api_calls_per_operation() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let proxy = Proxy::start(&endpoint);
    let prefix = emulator::unique_prefix();
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let keys = Arc::new(FakeKeys::new());
    let store = Arc::new(store_on(&proxy.endpoint, &prefix, clock.clone()).await);
    let reconciler = Reconciler::new(store.clone(), keys.clone(), clock.clone());
    let policy = support::policy();
    let calls = |pairs: &[(&str, usize)]| -> BTreeMap<String, usize> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    let mut table = Vec::new();

    reconciler.reconcile(&policy, None).await.unwrap();
    let bootstrap = proxy.take_calls();
    // Load (document missing, sweep), four key secrets, the document.
    assert_eq!(
        bootstrap,
        calls(&[
            ("CreateSecret", 5),
            ("GetSecretValue", 1),
            ("ListSecrets", 1)
        ]),
    );
    table.push(("bootstrap (2 slots, first pass)", bootstrap));

    reconciler.reconcile(&policy, None).await.unwrap();
    let idle = proxy.take_calls();
    assert_eq!(idle, calls(&[("GetSecretValue", 1)]));
    table.push(("idle pass", idle));

    clock.advance(support::secs(60));
    let rotate = Action::Rotate {
        alg: None,
        force: true,
    };
    reconciler.reconcile(&policy, Some(&rotate)).await.unwrap();
    let rotation = proxy.take_calls();
    assert_eq!(
        rotation,
        calls(&[
            ("CreateSecret", 2),
            ("GetSecretValue", 1),
            ("PutSecretValue", 1),
            ("UpdateSecretVersionStage", 1),
        ])
    );
    table.push(("rotation of both slots", rotation));

    let doc = doc_of(&store).await;
    proxy.take_calls();
    let active = kid_of(&doc, Alg::ES256, KeyState::Active);
    reconciler
        .reconcile(
            &policy,
            Some(&Action::Revoke {
                kid: active,
                reason: "cost".into(),
            }),
        )
        .await
        .unwrap();
    let revoke = proxy.take_calls();
    assert_eq!(
        revoke,
        calls(&[
            ("CreateSecret", 1),
            ("DeleteSecret", 1),
            ("GetSecretValue", 1),
            ("PutSecretValue", 1),
            ("UpdateSecretVersionStage", 1),
        ])
    );
    table.push(("revoke of an active key", revoke));

    // Past the grace (and the hourly sweep falls due on the way).
    clock.advance(support::secs(3 * 3600));
    reconciler.reconcile(&policy, None).await.unwrap();
    let removal = proxy.take_calls();
    assert_eq!(
        removal,
        calls(&[
            ("DeleteSecret", 2),
            ("GetSecretValue", 1),
            ("ListSecrets", 1),
            ("PutSecretValue", 1),
            ("UpdateSecretVersionStage", 1),
        ])
    );
    table.push(("removal of two retired keys (+ hourly sweep)", removal));

    // A new process (the CLI): the document, each key once, one sweep.
    let cli = store_on(&proxy.endpoint, &prefix, clock.clone()).await;
    cli.load("default").await.unwrap();
    let first = proxy.take_calls();
    let key_count = doc_of(&store).await.keys.len();
    proxy.take_calls();
    // The two kids the last save dropped are still listed for
    // destruction; a process that did not see them go asks once.
    assert_eq!(
        first,
        calls(&[
            ("DeleteSecret", 2),
            ("GetSecretValue", 1 + key_count),
            ("ListSecrets", 1),
        ])
    );
    table.push(("first load by a new process (CLI)", first));
    for (what, calls) in table {
        eprintln!("{what:40} {calls:?}");
    }
}

/// A schema this keyroll does not know (a newer one) is refused, and no
/// version is written over it.
#[tokio::test]
async fn an_unknown_schema_on_aws_is_refused_and_never_overwritten() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let inspect = emulator::client(&endpoint).await;
    let name = format!("{prefix}default");
    let future = r#"{"schema_version": 99, "keyset": "default", "keys": [], "future": true}"#;
    inspect
        .create_secret()
        .name(&name)
        .secret_string(future)
        .send()
        .await
        .unwrap();
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let store = Arc::new(store_on(&endpoint, &prefix, clock.clone()).await);
    let reconciler = Reconciler::new(store, Arc::new(FakeKeys::new()), clock);
    let err = reconciler.reconcile(&es256_only(), None).await.unwrap_err();
    assert!(matches!(err, ReconcileError::Document(_)), "{err}");
    assert!(err.to_string().contains("schema version 99"), "{err}");
    assert_eq!(emulator::labels(&inspect, &name).await.len(), 1);
    assert_eq!(emulator::current_value(&inspect, &name).await, future);
}

/// Every file under `dir` (dot files too) that holds the key.
fn files_holding(dir: &std::path::Path, traces: &Traces) -> Vec<String> {
    let mut holding = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let values = [(String::new(), String::new(), text)];
        if !found(&values, traces).is_empty() {
            holding.push(entry.file_name().to_string_lossy().to_string());
        }
    }
    holding.sort();
    holding
}

/// The file store: after revoke, and after removal, no file in the store
/// folder holds the key: not the document, not the lock, not a temp file
/// that a writer killed between write and rename left seconds before.
#[tokio::test]
async fn file_store_revoke_and_removal_leave_the_key_in_no_file_of_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keysets");
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let store: Arc<dyn Store> = Arc::new(FileStore::new(&dir));
    let reconciler = Reconciler::new(store.clone(), Arc::new(CryptoKeys), clock.clone());
    let policy = es256_only();
    reconciler.reconcile(&policy, None).await.unwrap();
    clock.advance(support::secs(60));
    let rotate = Action::Rotate {
        alg: None,
        force: true,
    };
    let outcome = reconciler.reconcile(&policy, Some(&rotate)).await.unwrap();
    let doc = outcome.snapshot.doc;
    let revoked = traces(&doc, &kid_of(&doc, Alg::ES256, KeyState::Active));
    let retired = traces(&doc, &kid_of(&doc, Alg::ES256, KeyState::Retired));
    // A writer killed between writing its temp file and the rename, just
    // now: the temp holds the whole document.
    let current = std::fs::read(dir.join("default.json")).unwrap();
    std::fs::write(dir.join(".default.json.Xk3p9Q"), &current).unwrap();
    assert_eq!(
        files_holding(&dir, &revoked),
        [".default.json.Xk3p9Q", "default.json"],
        "before: the document and the temp"
    );

    reconciler
        .reconcile(
            &policy,
            Some(&Action::Revoke {
                kid: revoked.kid.clone(),
                reason: "test".into(),
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        files_holding(&dir, &revoked),
        Vec::<String>::new(),
        "after revoke"
    );
    assert_eq!(
        files_holding(&dir, &retired),
        vec!["default.json".to_string()]
    );

    clock.advance(support::secs(3 * 3600));
    reconciler.reconcile(&policy, None).await.unwrap();
    assert_eq!(
        files_holding(&dir, &retired),
        Vec::<String>::new(),
        "after removal"
    );
}

/// The shipped IAM policy grants every call the AWS store makes, and
/// `DeleteSecret` only on key secrets: a keyset's document can never be
/// deleted with it (keyset names hold no `/`).
#[test]
fn the_shipped_iam_policy_deletes_key_secrets_only() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/aws/iam-policy.json");
    let policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut granted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for statement in policy["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow");
        let list = |v: &serde_json::Value| -> Vec<String> {
            match v {
                serde_json::Value::String(one) => vec![one.clone()],
                many => many
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect(),
            }
        };
        for action in list(&statement["Action"]) {
            granted
                .entry(action)
                .or_default()
                .extend(list(&statement["Resource"]));
        }
    }
    for call in [
        "GetSecretValue",
        "DescribeSecret",
        "PutSecretValue",
        "UpdateSecretVersionStage",
        "CreateSecret",
        "TagResource",
        "DeleteSecret",
        "ListSecrets",
    ] {
        assert!(
            granted.contains_key(&format!("secretsmanager:{call}")),
            "{call} is not granted"
        );
    }
    assert_eq!(
        granted["secretsmanager:DeleteSecret"],
        ["arn:aws:secretsmanager:*:*:secret:keyroll/*/keys/*"]
    );
    assert_eq!(granted.len(), 8, "no other action: {granted:?}");
}

/// The real binary, with `DeleteSecret` denied: `keyroll revoke` commits the
/// revoke but exits 1 saying the key is not destroyed; the daemon's
/// `keyroll_key_destruction_pending` and `keyroll status` show it; once
/// deleting is allowed again, the daemon's next pass destroys it and both
/// go back to nothing.
#[test]
fn the_cli_and_the_daemon_report_a_key_they_could_not_destroy() {
    use common::{
        key_rows, keyset_block, keyset_status, metric, metrics_text, wait_ready, wait_until,
        Sandbox, LONG, STEADY,
    };
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let proxy = Proxy::start(&endpoint);
    let prefix = emulator::unique_prefix();
    let sb = Sandbox::new();
    let text = format!(
        "reconcile_interval = \"1s\"\nstate_dir = '{state}'\n\n[store]\ntype = \"aws-secrets-manager\"\n\
         endpoint_url = \"{endpoint}\"\nregion = \"{region}\"\nsecret_prefix = \"{prefix}\"\n\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n{keysets}",
        state = sb.path("state").display(),
        endpoint = proxy.endpoint,
        region = emulator::REGION,
        port = sb.port,
        keysets = keyset_block("default", &["ES256"], STEADY, ""),
    );
    std::fs::write(sb.config_path(), text).unwrap();
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    let pending = |sb: &Sandbox| {
        metric(
            &metrics_text(sb),
            "keyroll_key_destruction_pending",
            &[("keyset", "default")],
        )
    };
    assert_eq!(pending(&sb), Some(0.0));
    let status = sb.status_json();
    let kid = key_rows(&status, "default")
        .into_iter()
        .find(|row| row.state == "next")
        .expect("a next key")
        .kid;

    proxy.fail_deletes(Some((400, "AccessDeniedException")));
    let out = sb.cli(&["revoke", "default", &kid]).exits(1);
    out.stderr_has(&[
        "cannot destroy",
        &kid,
        "deleting its private key from the store failed",
    ]);
    daemon.until("the daemon to report the key", LONG, || {
        match pending(&sb) {
            Some(1.0) => Ok(()),
            other => Err(format!("keyroll_key_destruction_pending {other:?}")),
        }
    });
    let status = sb.status_json();
    assert_eq!(
        keyset_status(&status, "default")["destruction_pending"],
        serde_json::json!([kid])
    );
    assert!(key_rows(&status, "default")
        .iter()
        .all(|row| row.kid != kid));
    sb.cli(&["status"])
        .ok()
        .stdout_has(&["KEY NOT DESTROYED", &kid]);

    proxy.fail_deletes(None);
    wait_until("the daemon to destroy the key", LONG, || {
        match pending(&sb) {
            Some(0.0) => Ok(()),
            other => Err(format!("keyroll_key_destruction_pending {other:?}")),
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gone = runtime.block_on(async {
        let client = emulator::client(&endpoint).await;
        client
            .get_secret_value()
            .secret_id(format!("{prefix}default{KEYS_INFIX}{kid}"))
            .version_stage("AWSCURRENT")
            .send()
            .await
            .is_err()
    });
    assert!(gone, "the key secret is gone");
    let status = sb.status_json();
    assert_eq!(
        keyset_status(&status, "default")["destruction_pending"],
        serde_json::json!([])
    );
    let log = daemon.stderr();
    assert!(
        log.contains("cannot destroy") && log.contains(&kid),
        "{log}"
    );
    daemon.stop_cleanly("TERM");
}
