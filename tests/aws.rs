//! The AWS Secrets Manager store against a real HTTP emulator (moto, started
//! by `scripts/test`): the compare-and-swap protocol as the secret's version
//! labels show it, many clients and processes racing on one secret, what an
//! operator may have put in a secret, and an emulator frozen under running
//! replicas. Without `KEYROLL_TEST_AWS_ENDPOINT` every test here skips.
//!
//! The generic store contract runs against the emulator too, in
//! `tests/store_battery.rs`.

#[allow(dead_code)]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use keyroll::config::AwsSettings;
use keyroll::planner::Action;
use keyroll::reconcile::{ReconcileError, Reconciler};
use keyroll::store::{AwsStore, Store, StoreError, MAX_SECRET_BYTES, PENDING_LABEL};
use serde_json::Value;
use support::aws::{self as emulator, Emulator};
use support::{t0, FakeClock, FakeKeys};

// ---- the protocol, seen through the secret's labels ---------------------------

async fn store_on(endpoint: &str, prefix: &str) -> AwsStore {
    AwsStore::connect(&emulator::settings(endpoint, prefix))
        .await
        .expect("connect")
}

/// Separate clients (as separate processes would have) race rounds of saves
/// against one version: one wins each round, the losers' versions keep no
/// label, and the labels never pile up towards the quota of 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_clients_have_one_winner_per_round_and_leave_no_stray_labels() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let name = format!("{prefix}ks");
    let inspect = emulator::client(&endpoint).await;
    const WRITERS: usize = 8;
    let mut stores = Vec::new();
    for _ in 0..WRITERS {
        stores.push(Arc::new(store_on(&endpoint, &prefix).await));
    }
    let mut version = stores[0].save("ks", "round 0", None).await.unwrap();
    for round in 1..=6 {
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let tasks: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let (store, barrier, expected) = (store.clone(), barrier.clone(), version.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let text = format!("round {round} writer {i}");
                    (text.clone(), store.save("ks", &text, Some(&expected)).await)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (text, Ok(v)) => winners.push((text, v)),
                (_, Err(StoreError::Conflict { .. })) => {}
                (_, Err(e)) => panic!("round {round}: a save failed other than by conflict: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let (text, won) = winners.pop().unwrap();
        assert_eq!(emulator::current_value(&inspect, &name).await, text);

        // Only the winner and the version it replaced carry labels. The
        // pending label stays on the winner unless a loser's later write
        // took it (and that loser then dropped it).
        let mut labels = emulator::labels(&inspect, &name).await;
        let winner_labels = labels.remove(&won.0).unwrap_or_default();
        assert!(
            winner_labels == ["AWSCURRENT"] || winner_labels == ["AWSCURRENT", PENDING_LABEL],
            "round {round}: the winner's labels: {winner_labels:?}"
        );
        let mut expected_rest = BTreeMap::new();
        expected_rest.insert(version.0.clone(), vec!["AWSPREVIOUS".to_string()]);
        assert_eq!(
            labels, expected_rest,
            "round {round}: no loser keeps a label"
        );
        version = won;
    }
}

/// A secret made beforehand without a value (Terraform, say, to choose its
/// KMS key and resource policy): keyroll bootstraps into it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_created_without_a_value_is_bootstrapped_into_by_one_writer() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let name = format!("{prefix}default");
    let inspect = emulator::client(&endpoint).await;
    inspect
        .create_secret()
        .name(&name)
        .description("made by the platform team's Terraform")
        .send()
        .await
        .expect("CreateSecret without a value");

    let a = Arc::new(store_on(&endpoint, &prefix).await);
    let b = Arc::new(store_on(&endpoint, &prefix).await);
    assert!(a.load("default").await.unwrap().is_none());
    let (ra, rb) = tokio::join!(
        a.save("default", "from a", None),
        b.save("default", "from b", None)
    );
    let winner = match (ra, rb) {
        (Ok(v), Err(StoreError::Conflict { .. })) => ("from a", v),
        (Err(StoreError::Conflict { .. }), Ok(v)) => ("from b", v),
        other => panic!("expected one winner and one conflict, got {other:?}"),
    };
    let loaded = a.load("default").await.unwrap().expect("a value now");
    assert_eq!((loaded.text.as_str(), loaded.version), (winner.0, winner.1));
    // The description the operator chose is kept.
    let described = inspect
        .describe_secret()
        .secret_id(&name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        described.description.as_deref(),
        Some("made by the platform team's Terraform")
    );
}

#[tokio::test]
async fn kms_key_and_tags_are_set_when_keyroll_creates_the_secret() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let settings = AwsSettings {
        kms_key_id: Some("alias/keyroll-test".into()),
        tags: [("team", "identity"), ("env", "test")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..emulator::settings(&endpoint, &prefix)
    };
    let store = AwsStore::connect(&settings).await.unwrap();
    store.save("default", "{}", None).await.unwrap();
    let described = emulator::client(&endpoint)
        .await
        .describe_secret()
        .secret_id(format!("{prefix}default"))
        .send()
        .await
        .unwrap();
    assert_eq!(described.kms_key_id.as_deref(), Some("alias/keyroll-test"));
    let tags: BTreeMap<String, String> = described
        .tags
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key.unwrap_or_default(), t.value.unwrap_or_default()))
        .collect();
    assert_eq!(tags.get("team").map(String::as_str), Some("identity"));
    assert_eq!(tags.get("env").map(String::as_str), Some("test"));
}

/// Whatever else a secret holds is reported, and never overwritten.
#[tokio::test]
async fn a_secret_holding_something_else_is_reported_and_left_untouched() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let inspect = emulator::client(&endpoint).await;
    inspect
        .create_secret()
        .name(format!("{prefix}default"))
        .secret_string(r#"{"username":"admin","password":"hunter2"}"#)
        .send()
        .await
        .unwrap();
    inspect
        .create_secret()
        .name(format!("{prefix}binary"))
        .secret_binary(aws_sdk_secretsmanager::primitives::Blob::new(vec![
            0u8, 159, 146, 150,
        ]))
        .send()
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store_on(&endpoint, &prefix).await);
    let before = emulator::labels(&inspect, &format!("{prefix}default")).await;
    let reconciler = Reconciler::new(
        store.clone(),
        Arc::new(FakeKeys::new()),
        Arc::new(FakeClock::new(t0())),
    );
    let policy = support::policy();
    let err = reconciler.reconcile(&policy, None).await.unwrap_err();
    assert!(matches!(err, ReconcileError::Document(_)), "{err}");
    let message = err.to_string();
    assert!(message.contains(&format!("{prefix}default")), "{message}");
    assert!(
        !message.contains("hunter2"),
        "the secret's value leaked: {message}"
    );
    assert_eq!(
        emulator::labels(&inspect, &format!("{prefix}default")).await,
        before,
        "no version was written"
    );
    assert_eq!(
        emulator::current_value(&inspect, &format!("{prefix}default")).await,
        r#"{"username":"admin","password":"hunter2"}"#
    );

    match store.load("binary").await {
        Err(e @ StoreError::Corrupt { .. }) => {
            assert!(e.to_string().contains("binary"), "{e}")
        }
        other => panic!("a binary secret: {other:?}"),
    }
}

#[tokio::test]
async fn a_document_too_large_for_a_secret_is_refused_before_any_write() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let store = store_on(&endpoint, &prefix).await;
    let huge = "x".repeat(MAX_SECRET_BYTES + 1);
    match store.save("default", &huge, None).await {
        Err(e @ StoreError::Rejected { .. }) => assert!(e.to_string().contains("65536"), "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(store.load("default").await.unwrap().is_none());
}

/// Months of rotations fill the audit trail; the oldest records give way so
/// that the document keeps fitting a secret, and no key is lost.
#[tokio::test]
async fn the_audit_trail_is_trimmed_to_fit_a_secret() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let store: Arc<dyn Store> = Arc::new(store_on(&endpoint, &prefix).await);
    let clock = Arc::new(FakeClock::new(t0()));
    let reconciler = Reconciler::new(store.clone(), Arc::new(FakeKeys::new()), clock.clone());
    let policy = support::policy();
    let rotate = Action::Rotate {
        alg: None,
        force: true,
    };
    let inspect = emulator::client(&endpoint).await;
    let limit = store.max_document_bytes().expect("a limit");
    let mut largest = 0;
    for _ in 0..60 {
        clock.advance(support::secs(3600));
        let outcome = reconciler.reconcile(&policy, Some(&rotate)).await.unwrap();
        let stored = store.load(&policy.name).await.unwrap().unwrap();
        largest = largest.max(stored.text.len());
        // The document with its keys inline within the store's limit, and
        // the secret's value (keys by reference) within a secret's.
        assert!(stored.text.len() <= limit);
        let secret = emulator::current_value(&inspect, &format!("{prefix}default")).await;
        assert!(secret.len() <= MAX_SECRET_BYTES);
        assert_eq!(Some(&stored.version), outcome.snapshot.version.as_ref());
    }
    let doc: Value =
        serde_json::from_str(&store.load(&policy.name).await.unwrap().unwrap().text).unwrap();
    let audit = doc["audit"].as_array().unwrap();
    assert!(
        largest > limit - 2048,
        "the test should reach the limit (largest document {largest} bytes)"
    );
    assert!(
        audit.len() < 200,
        "trimmed below the usual cap: {}",
        audit.len()
    );
    // The newest records are the ones kept: the last one is this hour's.
    let last_at = audit.last().unwrap()["at"].as_str().unwrap().to_string();
    assert_eq!(
        last_at,
        keyroll::clock::rfc3339(keyroll::clock::Clock::now(clock.as_ref()))
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_clear_retryable_error() {
    let Some(_) = emulator::endpoint() else {
        return;
    };
    let closed = format!("http://127.0.0.1:{}", free_port());
    let store = store_on(&closed, "keyroll/").await;
    match store.load("default").await {
        Err(e @ StoreError::Unavailable { .. }) => {
            let message = e.to_string();
            assert!(message.contains("keyroll/default"), "{message}");
            assert!(message.contains("GetSecretValue"), "{message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

// ---- the real binary: replicas and CLIs sharing one secret --------------------

/// A replica's sandbox: its own port and `signing_dir`, the config pointing
/// at the emulator's secrets under `prefix`.
fn aws_replica(endpoint: &str, prefix: &str, timings: &str) -> Sandbox {
    let sb = Sandbox::new();
    let keysets = keyset_block(
        "default",
        &ALGS,
        timings,
        &outputs(None, Some(&signing_dir(&sb))),
    );
    let text = format!(
        "reconcile_interval = \"1s\"\nstate_dir = '{state}'\n\n[store]\ntype = \"aws-secrets-manager\"\n\
         endpoint_url = \"{endpoint}\"\nregion = \"{region}\"\nsecret_prefix = \"{prefix}\"\n\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n{keysets}",
        state = sb.path("state").display(),
        region = emulator::REGION,
        port = sb.port,
    );
    fs::write(sb.config_path(), text).expect("write the config");
    sb
}

fn signing_dir(sb: &Sandbox) -> PathBuf {
    sb.path("signing")
}

fn jwks_body(sb: &Sandbox) -> Result<Vec<u8>, String> {
    get_ok(&jwks_url(sb, "default")).map(|reply| reply.body)
}

/// Every kid the stored document holds or has ever held (its audit trail).
fn stored_kids_ever(sb: &Sandbox) -> BTreeSet<String> {
    let out = sb.cli(&["status", "--json"]).ok();
    let status: Value = serde_json::from_str(&out.stdout).expect("status --json");
    key_rows(&status, "default")
        .into_iter()
        .map(|row| row.kid)
        .collect()
}

/// Three `keyroll run` replicas and two concurrent `keyroll rotate` on one
/// secret, with rotations every 10 s: at every sample one active key per
/// slot in the store, no replica publishing or signing with a kid the store
/// never held, a token signed with one replica's key verifying against the
/// other replicas' JWKS; in the end byte-identical JWKS everywhere.
#[test]
fn replicas_and_concurrent_clis_share_one_secret() {
    let Some(endpoint) = emulator::endpoint() else {
        return;
    };
    let prefix = emulator::unique_prefix();
    let replicas: Vec<Sandbox> = (0..3)
        .map(|_| aws_replica(&endpoint, &prefix, FAST))
        .collect();
    let mut daemons: Vec<Daemon> = replicas.iter().map(|sb| sb.spawn(&[])).collect();
    for (daemon, sb) in daemons.iter_mut().zip(&replicas) {
        wait_ready(daemon, sb);
    }

    let mut stored: BTreeSet<String> = stored_kids_ever(&replicas[0]);
    let mut samples = 0;
    let mut verified = 0;
    let mut clis: Vec<thread::JoinHandle<Out>> = Vec::new();
    let started = Instant::now();
    // Two scheduled rotations per slot, and the CLIs racing in the middle.
    let run_for = Duration::from_secs(2 * ROTATE_EVERY as u64 + 4);
    while started.elapsed() < run_for {
        if clis.is_empty() && started.elapsed() > Duration::from_secs(ROTATE_EVERY as u64 / 2) {
            for sb in &replicas[..2] {
                let mut cmd = sb.command();
                cmd.arg("--config").arg(sb.config_path()).arg("rotate");
                let root = sb.root().to_path_buf();
                clis.push(thread::spawn(move || {
                    run_to_end(cmd, &root, "keyroll rotate".into())
                }));
            }
        }
        // The store's view first: every kid any replica shows below was
        // saved before this sample or is in the audit trail read after it.
        let status: Value =
            serde_json::from_str(&replicas[samples % 3].cli(&["status", "--json"]).ok().stdout)
                .expect("status --json");
        let rows = key_rows(&status, "default");
        for alg in ALGS {
            let active = rows
                .iter()
                .filter(|r| r.alg == alg && r.state == "active")
                .count();
            assert_eq!(
                active, 1,
                "sample {samples}: {alg} active keys in the store: {rows:?}"
            );
        }
        stored.extend(rows.iter().map(|r| r.kid.clone()));

        let bodies: Vec<Vec<u8>> = replicas
            .iter()
            .map(|sb| jwks_body(sb).unwrap_or_else(|e| panic!("sample {samples}: {e}")))
            .collect();
        for (i, sb) in replicas.iter().enumerate() {
            for alg in ALGS {
                let signer = read_signer(&signing_dir(sb), alg)
                    .unwrap_or_else(|e| panic!("replica {i}: {e}"));
                let token = sign(&signer);
                for (j, body) in bodies.iter().enumerate() {
                    if i != j {
                        verify(&token, body).unwrap_or_else(|e| {
                            panic!("sample {samples}: signed by replica {i}, verified by replica {j}: {e}")
                        });
                        verified += 1;
                    }
                }
            }
        }
        for daemon in &mut daemons {
            daemon.assert_alive();
        }
        samples += 1;
        thread::sleep(Duration::from_millis(200));
    }
    for cli in clis {
        cli.join().unwrap().ok();
    }

    // The stored history, including keys already removed.
    let doc = stored_doc(&endpoint, &format!("{prefix}default"));
    let audit = doc["audit"].as_array().unwrap();
    for record in audit {
        stored.insert(record["kid"].as_str().unwrap().to_string());
    }
    // One transition per step: replicas racing for the same scheduled tick
    // would show as two activations of a slot in quick succession.
    for alg in ALGS {
        let activations: Vec<(i64, &str)> = audit
            .iter()
            .filter(|r| r["event"] == "activated" && r["alg"] == alg)
            .map(|r| (timestamp(&r["at"]).unwrap(), r["trigger"].as_str().unwrap()))
            .collect();
        for pair in activations.windows(2) {
            let ((before, _), (at, trigger)) = (pair[0], pair[1]);
            if trigger == "schedule" {
                assert!(
                    at - before >= ROTATE_EVERY - 1,
                    "{alg}: a scheduled activation {}s after the previous one: {activations:?}",
                    at - before
                );
            }
        }
    }
    let published: BTreeSet<String> = replicas
        .iter()
        .flat_map(|sb| jwks_kids(&jwks_body(sb).unwrap()))
        .collect();
    let phantom: Vec<_> = published.difference(&stored).collect();
    assert!(
        phantom.is_empty(),
        "kids published but never stored: {phantom:?}"
    );

    // Converged: every replica serves the very bytes `keyroll jwks` renders
    // from the store.
    wait_until("byte-identical JWKS on all replicas", LONG, || {
        let expected = replicas[0].cli(&["jwks"]).ok().stdout.into_bytes();
        for (i, sb) in replicas.iter().enumerate() {
            let body = jwks_body(sb)?;
            if body.trim_ascii() != expected.trim_ascii() {
                return Err(format!("replica {i} differs from the store"));
            }
        }
        Ok(())
    });
    let rotations: f64 = replicas
        .iter()
        .map(|sb| {
            let text = metrics_text(sb);
            ALGS.iter()
                .filter_map(|alg| {
                    metric(
                        &text,
                        "keyroll_rotations_total",
                        &[("keyset", "default"), ("alg", alg), ("trigger", "schedule")],
                    )
                })
                .sum::<f64>()
        })
        .sum();
    let conflicts: f64 = replicas
        .iter()
        .filter_map(|sb| {
            metric(
                &metrics_text(sb),
                "keyroll_store_conflicts_total",
                &[("keyset", "default")],
            )
        })
        .sum();
    eprintln!(
        "{samples} samples, {verified} cross-replica verifications, {} kids stored, \
         {rotations} scheduled rotations committed by the replicas, {conflicts} conflicts resolved",
        stored.len()
    );
    assert!(samples >= 20, "too few samples to mean anything: {samples}");
}

/// The stored document, read with a client of the test's own.
fn stored_doc(endpoint: &str, name: &str) -> Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = runtime.block_on(async {
        let client = emulator::client(endpoint).await;
        emulator::current_value(&client, name).await
    });
    serde_json::from_str(&text).expect("the stored document is JSON")
}

/// SIGSTOP the emulator under two replicas for longer than a request's whole
/// time budget: they keep answering 200 with the same JWKS, remove nothing,
/// count the errors, and recover by themselves after SIGCONT.
#[test]
fn replicas_keep_serving_through_a_frozen_backend_and_recover() {
    let Some(moto) = emulator::moto_server() else {
        return;
    };
    let emu = Emulator::start(&moto);
    let prefix = emulator::unique_prefix();
    let replicas: Vec<Sandbox> = (0..2)
        .map(|_| aws_replica(&emu.endpoint, &prefix, STEADY))
        .collect();
    let mut daemons: Vec<Daemon> = replicas.iter().map(|sb| sb.spawn(&[])).collect();
    for (daemon, sb) in daemons.iter_mut().zip(&replicas) {
        wait_ready(daemon, sb);
    }
    let before: Vec<Vec<u8>> = replicas.iter().map(|sb| jwks_body(sb).unwrap()).collect();
    assert_eq!(before[0], before[1]);

    signal(emu.pid(), "STOP");
    let frozen_at = now_unix();
    // Longer than one request's budget (15 s), so every replica's reconcile
    // fails at least once while frozen.
    let freeze = Duration::from_secs(20);
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < freeze {
        for (i, sb) in replicas.iter().enumerate() {
            let body = jwks_body(sb).unwrap_or_else(|e| panic!("replica {i} while frozen: {e}"));
            assert_eq!(
                body, before[i],
                "replica {i} changed its JWKS while the store was frozen"
            );
            get_ok(&sb.url("/readyz")).unwrap_or_else(|e| panic!("replica {i} /readyz: {e}"));
            served += 1;
        }
        for daemon in &mut daemons {
            daemon.assert_alive();
        }
        thread::sleep(Duration::from_millis(250));
    }
    for (i, sb) in replicas.iter().enumerate() {
        let errors = metric(
            &metrics_text(sb),
            "keyroll_reconcile_errors_total",
            &[("keyset", "default")],
        );
        assert!(
            errors.unwrap_or(0.0) >= 1.0,
            "replica {i} counted no reconcile error while the store was frozen: {errors:?}\n{}",
            tail(&daemons[i].stderr())
        );
    }
    signal(emu.pid(), "CONT");
    let thawed_at = now_unix();

    for (i, (daemon, sb)) in daemons.iter_mut().zip(&replicas).enumerate() {
        daemon.until(&format!("replica {i} to reconcile again"), LONG, || {
            let text = get_ok(&sb.url("/metrics"))?.text();
            let last = metric(
                &text,
                "keyroll_last_reconcile_success_timestamp_seconds",
                &[("keyset", "default")],
            )
            .ok_or("no last-success metric")?;
            if last >= thawed_at.floor() {
                Ok(())
            } else {
                Err(format!("last success {last}, thawed at {thawed_at}"))
            }
        });
        let log = daemon.stderr();
        assert!(
            log.contains("store unreachable"),
            "replica {i} did not say so:\n{}",
            tail(&log)
        );
    }
    // And they follow the store again: a rotation reaches both.
    replicas[0].cli(&["rotate", "--now"]).ok();
    wait_until("both replicas to serve the rotated JWKS", LONG, || {
        let expected = replicas[0].cli(&["jwks"]).ok().stdout.into_bytes();
        for (i, sb) in replicas.iter().enumerate() {
            if jwks_body(sb)?.trim_ascii() != expected.trim_ascii() {
                return Err(format!("replica {i} not yet"));
            }
        }
        Ok(())
    });
    eprintln!(
        "frozen {:.1} s: {served} JWKS requests answered 200 unchanged",
        thawed_at - frozen_at
    );
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Without a region from the config or the environment, `run` refuses to
/// start with exit 2 and says where a region comes from.
#[test]
fn no_region_anywhere_is_a_config_error() {
    let sb = Sandbox::new();
    let text = format!(
        "state_dir = '{}'\n[store]\ntype = \"aws-secrets-manager\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[[keysets]]\nname = \"default\"\n",
        sb.path("state").display(),
        sb.port
    );
    fs::write(sb.config_path(), text).unwrap();
    let mut cmd = sb.command();
    cmd.env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", sb.path("no-such-aws-config"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .arg("--config")
        .arg(sb.config_path())
        .arg("status");
    let out = run_to_end(cmd, sb.root(), "keyroll status".into()).exits(2);
    out.stderr_has(&["region", "store.region", "AWS_REGION"]);
}

// ---- retries and error classes, against a scripted HTTP server ----------------

/// Answers each request with the next of `replies` (status, error type or
/// `None` for a GetSecretValue success), counting the requests.
fn scripted_server(
    replies: Vec<(u16, Option<&'static str>)>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    thread::spawn(move || {
        for (stream, (status, error)) in listener.incoming().zip(replies) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let reply = match error {
                Some(kind) => format!(r#"{{"__type":"{kind}","message":"scripted {kind}"}}"#),
                None => r#"{"ARN":"arn:aws:secretsmanager:us-east-1:123456789012:secret:keyroll/default-AbCdEf","Name":"keyroll/default","VersionId":"v-1","SecretString":"stored text","VersionStages":["AWSCURRENT"],"CreatedDate":1.7E9}"#.to_string(),
            };
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                reply.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(reply.as_bytes()).unwrap();
        }
    });
    (endpoint, served)
}

/// Throttling is retried (with backoff) until it passes; the caller never
/// sees it.
#[tokio::test]
async fn throttling_is_retried_until_it_passes() {
    // Credentials come from the environment scripts/test sets up.
    let Some(_) = emulator::endpoint() else {
        return;
    };
    let (endpoint, served) = scripted_server(vec![
        (400, Some("ThrottlingException")),
        (500, Some("InternalServiceError")),
        (200, None),
    ]);
    let store = store_on(&endpoint, "keyroll/").await;
    let loaded = store
        .load("default")
        .await
        .expect("load after retries")
        .unwrap();
    assert_eq!(loaded.text.as_str(), "stored text");
    assert_eq!(loaded.version.0, "v-1");
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 3);
}

/// What retrying cannot cure is not retried, and says so: access denied is
/// `Rejected`; throttling that never ends is `Unavailable` after the
/// attempts run out.
#[tokio::test]
async fn errors_are_sorted_into_retryable_and_not() {
    // Credentials come from the environment scripts/test sets up.
    let Some(_) = emulator::endpoint() else {
        return;
    };
    let (endpoint, served) = scripted_server(vec![(400, Some("AccessDeniedException"))]);
    let store = store_on(&endpoint, "keyroll/").await;
    match store.load("default").await {
        Err(e @ StoreError::Rejected { .. }) => {
            assert!(e.to_string().contains("AccessDeniedException"), "{e}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);

    let (endpoint, served) = scripted_server(vec![(400, Some("ThrottlingException")); 10]);
    let store = store_on(&endpoint, "keyroll/").await;
    match store.load("default").await {
        Err(e @ StoreError::Unavailable { .. }) => {
            assert!(e.to_string().contains("ThrottlingException"), "{e}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(
        served.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "4 attempts"
    );
}
