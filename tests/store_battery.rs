//! The `Store` contract (src/store/mod.rs, SPEC §3), written once over
//! `Arc<dyn Store>` and run against every backend. A new backend is an
//! `async fn` returning a [`Backend`] plus one line, e.g.
//! `battery!(aws, super::aws_backend);`.
//!
//! After the battery: tests only the file store can have (modes, temp
//! files, corrupted documents, several processes on one folder).

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyroll::reconcile::{ReconcileError, Reconciler};
use keyroll::store::{FileStore, MemoryStore, Store, StoreError, Version};
use support::{t0, FakeClock, FakeKeys};

/// A store under test and whatever must live as long as it (a temp dir).
pub struct Backend {
    pub store: Arc<dyn Store>,
    _guard: Box<dyn std::any::Any + Send>,
}

async fn memory_backend() -> Option<Backend> {
    Some(Backend {
        store: Arc::new(MemoryStore::new()),
        _guard: Box::new(()),
    })
}

async fn file_backend() -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    Some(Backend {
        store: Arc::new(FileStore::new(dir.path().join("keysets"))),
        _guard: Box::new(dir),
    })
}

/// A fresh secret prefix on the emulator, so tests never see each other's
/// secrets. `None` (skip) without `KEYROLL_TEST_AWS_ENDPOINT`.
async fn aws_backend() -> Option<Backend> {
    let store = support::aws::aws_store(&support::aws::unique_prefix()).await?;
    Some(Backend {
        store: Arc::new(store),
        _guard: Box::new(()),
    })
}

// ---- the battery: generic over any store -----------------------------------

async fn load(store: &Arc<dyn Store>, keyset: &str) -> Option<(String, Version)> {
    store
        .load(keyset)
        .await
        .expect("load")
        .map(|s| (s.text.to_string(), s.version))
}

fn assert_conflict(result: Result<Version, StoreError>, what: &str) {
    match result {
        Err(e @ StoreError::Conflict { .. }) => assert!(e.is_conflict()),
        other => panic!("{what}: expected a conflict, got {other:?}"),
    }
}

async fn missing_keyset_loads_as_none(store: Arc<dyn Store>) {
    assert!(load(&store, "never-saved").await.is_none());
}

async fn save_with_expected_none_creates(store: Arc<dyn Store>) {
    let v = store.save("ks", "first", None).await.expect("create");
    assert_eq!(load(&store, "ks").await, Some(("first".to_string(), v)));
}

async fn second_create_conflicts_and_keeps_the_first(store: Arc<dyn Store>) {
    let v = store.save("ks", "first", None).await.unwrap();
    assert_conflict(
        store.save("ks", "second", None).await,
        "create over an existing document",
    );
    assert_eq!(load(&store, "ks").await, Some(("first".to_string(), v)));
}

async fn save_with_the_current_version_succeeds_with_a_new_version(store: Arc<dyn Store>) {
    let v1 = store.save("ks", "one", None).await.unwrap();
    let v2 = store
        .save("ks", "two", Some(&v1))
        .await
        .expect("save with current version");
    assert_ne!(v1, v2);
    assert_eq!(
        load(&store, "ks").await,
        Some(("two".to_string(), v2.clone()))
    );
    let v3 = store.save("ks", "three", Some(&v2)).await.unwrap();
    assert!(v3 != v1 && v3 != v2);
}

async fn stale_version_conflicts_and_changes_nothing(store: Arc<dyn Store>) {
    let v1 = store.save("ks", "one", None).await.unwrap();
    let v2 = store.save("ks", "two", Some(&v1)).await.unwrap();
    assert_conflict(
        store.save("ks", "stale", Some(&v1)).await,
        "save with a stale version",
    );
    assert_eq!(
        load(&store, "ks").await,
        Some(("two".to_string(), v2.clone()))
    );
    // A made-up version conflicts too.
    assert_conflict(
        store
            .save("ks", "bogus", Some(&Version("no-such-version".into())))
            .await,
        "save with a made-up version",
    );
    // Expecting a version of a document that does not exist conflicts.
    assert_conflict(
        store.save("other", "x", Some(&v2)).await,
        "save of a missing document with a version",
    );
    assert!(load(&store, "other").await.is_none());
    assert_eq!(load(&store, "ks").await, Some(("two".to_string(), v2)));
}

async fn loads_without_a_save_in_between_agree(store: Arc<dyn Store>) {
    let v = store.save("ks", "one", None).await.unwrap();
    let a = load(&store, "ks").await.unwrap();
    let b = load(&store, "ks").await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a.1, v);
}

/// The trait promises: equal versions mean equal content (a load returns a
/// version it returned before only if the content is the same). A backend
/// may keep the version when identical text is saved again, or not.
async fn equal_versions_mean_equal_content(store: Arc<dyn Store>) {
    let mut named: std::collections::HashMap<Version, String> = Default::default();
    let mut version: Option<Version> = None;
    for text in ["a", "b", "a", "a", "c", "b", "b", "a"] {
        let before = version.clone();
        let v = store
            .save("ks", text, version.as_ref())
            .await
            .expect("save with the current version");
        let (loaded, loaded_version) = load(&store, "ks").await.unwrap();
        assert_eq!((loaded.as_str(), &loaded_version), (text, &v));
        if let Some(earlier) = named.insert(v.clone(), text.to_string()) {
            assert_eq!(earlier, text, "version {v:?} named two different contents");
        }
        let previous_text = before.as_ref().map(|b| named[b].clone());
        if previous_text.as_deref() != Some(text) {
            assert_ne!(
                before.as_ref(),
                Some(&v),
                "the content changed but the version did not"
            );
            // And the version read before the change is now stale.
            if let Some(stale) = &before {
                assert_conflict(store.save("ks", "stale", Some(stale)).await, "stale save");
            }
        }
        version = Some(v);
    }
}

/// `keysets` names every saved document and nothing else (no lock or temp
/// file, no other deployment's prefix): a restarted daemon finds keysets
/// removed from its config with it (SPEC C1).
async fn keysets_lists_every_saved_document(store: Arc<dyn Store>) {
    assert!(store.keysets().await.expect("list").is_empty());
    let a = store.save("a", "a-one", None).await.unwrap();
    store.save("b.c", "b-one", None).await.unwrap();
    store.save("a", "a-two", Some(&a)).await.unwrap();
    let mut names = store.keysets().await.expect("list");
    names.sort();
    assert_eq!(names, ["a", "b.c"]);
}

async fn keysets_are_independent(store: Arc<dyn Store>) {
    let a1 = store.save("a", "a-one", None).await.unwrap();
    // `b` does not exist yet even though `a` does.
    assert!(load(&store, "b").await.is_none());
    let b1 = store
        .save("b", "b-one", None)
        .await
        .expect("create b next to a");
    let a2 = store.save("a", "a-two", Some(&a1)).await.unwrap();
    assert_eq!(
        load(&store, "b").await,
        Some(("b-one".to_string(), b1.clone()))
    );
    // A conflict on one keyset leaves the other alone.
    assert_conflict(store.save("a", "x", Some(&a1)).await, "stale save of a");
    let b2 = store
        .save("b", "b-two", Some(&b1))
        .await
        .expect("b's version is not a's");
    assert_eq!(load(&store, "a").await, Some(("a-two".to_string(), a2)));
    assert_eq!(load(&store, "b").await, Some(("b-two".to_string(), b2)));
    // A name that extends another is a different keyset.
    assert!(load(&store, "a-").await.is_none());
}

async fn racing_saves_against_one_version(
    store: Arc<dyn Store>,
    expected: Option<Version>,
    keyset: &'static str,
) {
    const N: usize = 16;
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (store, barrier, expected) = (store.clone(), barrier.clone(), expected.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let text = format!("writer {i}");
                (
                    text.clone(),
                    store.save(keyset, &text, expected.as_ref()).await,
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (text, result) = task.await.unwrap();
        match result {
            Ok(version) => winners.push((text, version)),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("a racing save failed other than by conflict: {e}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one of {N} racing saves wins: {winners:?}"
    );
    assert_eq!(load(&store, keyset).await, Some(winners.pop().unwrap()));
}

async fn concurrent_saves_against_one_version_have_one_winner(store: Arc<dyn Store>) {
    let v0 = store.save("ks", "start", None).await.unwrap();
    racing_saves_against_one_version(store, Some(v0), "ks").await;
}

async fn concurrent_creates_have_one_winner(store: Arc<dyn Store>) {
    racing_saves_against_one_version(store, None, "fresh").await;
}

/// Read-modify-write with retry on conflict from many tasks: no update is lost.
async fn increment(store: &Arc<dyn Store>, keyset: &str) -> u32 {
    let mut conflicts = 0;
    loop {
        let (n, version) = match load(store, keyset).await {
            Some((text, version)) => (text.trim().parse::<u64>().unwrap(), Some(version)),
            None => (0, None),
        };
        match store
            .save(keyset, &format!("{}\n", n + 1), version.as_ref())
            .await
        {
            Ok(_) => return conflicts,
            Err(e) if e.is_conflict() => {
                conflicts += 1;
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

async fn concurrent_read_modify_write_loses_no_update(store: Arc<dyn Store>) {
    const TASKS: u64 = 8;
    const EACH: u64 = 10;
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..EACH {
                    increment(&store, "counter").await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (text, _) = load(&store, "counter").await.unwrap();
    assert_eq!(text, format!("{}\n", TASKS * EACH));
}

async fn content_round_trips_byte_for_byte(store: Arc<dyn Store>) {
    let big: String = (0..2000).map(|i| format!("line {i} ✓\n")).collect();
    let texts = [
        "{\"schema_version\": 1}".to_string(),
        "ünïcödé — 鍵 — 🔑🗝️ — \u{200b}zero-width — \"quotes\" \\ backslash".to_string(),
        "crlf\r\nlf\ntab\tand trailing spaces   \n\n".to_string(),
        "  leading whitespace and no newline at the end".to_string(),
        big,
    ];
    let mut version = None;
    for text in &texts {
        let v = store.save("ks", text, version.as_ref()).await.unwrap();
        let (loaded, loaded_version) = load(&store, "ks").await.unwrap();
        assert_eq!(loaded.as_bytes(), text.as_bytes());
        assert_eq!(loaded_version, v);
        version = Some(v);
    }
}

async fn errors_name_the_location(store: Arc<dyn Store>) {
    let location = store.location("ks");
    assert!(location.contains("ks"), "{location}");
    store.save("ks", "x", None).await.unwrap();
    let err = store.save("ks", "y", None).await.unwrap_err();
    assert!(err.to_string().contains(&location), "{err}");
}

/// The reconciler works on the backend: a bootstrap is saved, and a second
/// reconcile at the same instant writes nothing.
async fn reconciler_bootstraps_and_then_rests(store: Arc<dyn Store>) {
    let policy = support::policy();
    let clock = Arc::new(FakeClock::new(t0()));
    let r = Reconciler::new(store.clone(), Arc::new(FakeKeys::new()), clock.clone());
    let first = r.reconcile(&policy, None).await.unwrap();
    assert_eq!(first.snapshot.doc.keys.len(), 4);
    let (_, version) = load(&store, &policy.name).await.unwrap();
    assert_eq!(first.snapshot.version.as_ref(), Some(&version));
    let second = r.reconcile(&policy, None).await.unwrap();
    assert!(second.committed.is_empty());
    assert_eq!(load(&store, &policy.name).await.unwrap().1, version);
    assert_eq!(second.snapshot.doc, first.snapshot.doc);
}

macro_rules! case {
    ($make:path, $test:ident $(, #[$attr:meta])*) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let Some(backend): Option<Backend> = $make().await else {
                return;
            };
            super::$test(backend.store.clone()).await;
        }
    };
}

/// `battery!(name, make_backend)` runs the whole contract against one backend.
macro_rules! battery {
    ($name:ident, $make:path) => {
        mod $name {
            use super::Backend;
            case!($make, missing_keyset_loads_as_none);
            case!($make, save_with_expected_none_creates);
            case!($make, second_create_conflicts_and_keeps_the_first);
            case!(
                $make,
                save_with_the_current_version_succeeds_with_a_new_version
            );
            case!($make, stale_version_conflicts_and_changes_nothing);
            case!($make, loads_without_a_save_in_between_agree);
            case!($make, equal_versions_mean_equal_content);
            case!($make, keysets_are_independent);
            case!($make, keysets_lists_every_saved_document);
            case!($make, concurrent_saves_against_one_version_have_one_winner);
            case!($make, concurrent_creates_have_one_winner);
            case!($make, concurrent_read_modify_write_loses_no_update);
            case!($make, content_round_trips_byte_for_byte);
            case!($make, errors_name_the_location);
            case!($make, reconciler_bootstraps_and_then_rests);
            case!($make, fingerprint_changes_with_every_save);
        }
    };
}

battery!(memory, super::memory_backend);
battery!(file, super::file_backend);
battery!(aws, super::aws_backend);

// ---- the file store only ----------------------------------------------------

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn file_store() -> (tempfile::TempDir, PathBuf, Arc<dyn Store>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state").join("keysets");
    let store: Arc<dyn Store> = Arc::new(FileStore::new(&dir));
    (tmp, dir, store)
}

#[tokio::test]
async fn file_store_creates_a_0700_folder_and_0600_documents() {
    let (_tmp, dir, store) = file_store();
    assert!(!dir.exists());
    // Loading creates nothing.
    assert!(store.load("default").await.unwrap().is_none());
    assert!(!dir.exists());
    let v = store.save("default", "one", None).await.unwrap();
    assert_eq!(mode(&dir), 0o700);
    let path = dir.join("default.json");
    assert_eq!(mode(&path), 0o600);
    store.save("default", "two", Some(&v)).await.unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
}

#[tokio::test]
async fn file_store_tightens_a_document_someone_made_world_readable() {
    let (_tmp, dir, store) = file_store();
    let v = store.save("default", "one", None).await.unwrap();
    let path = dir.join("default.json");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    store.save("default", "two", Some(&v)).await.unwrap();
    assert_eq!(mode(&path), 0o600);
}

#[tokio::test]
async fn file_store_leaves_no_temp_files_behind() {
    let (_tmp, dir, store) = file_store();
    let mut version = None;
    for i in 0..5 {
        version = Some(
            store
                .save("default", &format!("{i}"), version.as_ref())
                .await
                .unwrap(),
        );
    }
    let _ = store.save("default", "stale", None).await.unwrap_err();
    store.save("other", "x", None).await.unwrap();
    let names = entries(&dir);
    let documents: BTreeSet<String> = names
        .iter()
        .filter(|n| !n.ends_with(".lock"))
        .cloned()
        .collect();
    assert_eq!(
        documents,
        BTreeSet::from(["default.json".to_string(), "other.json".to_string()]),
        "{names:?}"
    );
    for name in &names {
        assert!(
            name.ends_with(".json") || name == ".default.lock" || name == ".other.lock",
            "unexpected file {name} in {names:?}"
        );
    }
}

#[tokio::test]
async fn file_store_finds_a_document_written_by_another_instance() {
    let (_tmp, dir, a) = file_store();
    let b: Arc<dyn Store> = Arc::new(FileStore::new(&dir));
    let v = a.save("default", "from a", None).await.unwrap();
    assert_eq!(
        load(&b, "default").await,
        Some(("from a".to_string(), v.clone()))
    );
    let w = b.save("default", "from b", Some(&v)).await.unwrap();
    assert_conflict(
        a.save("default", "stale a", Some(&v)).await,
        "a's stale save",
    );
    assert_eq!(load(&a, "default").await, Some(("from b".to_string(), w)));
}

/// Sixteen "processes" (each its own FileStore instance and runtime, on its
/// own thread) race against one version: exactly one wins.
#[test]
fn file_store_cas_holds_across_instances_on_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keysets");
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let v0 = runtime()
        .block_on(FileStore::new(&dir).save("default", "start", None))
        .unwrap();
    const N: usize = 16;
    let barrier = Arc::new(std::sync::Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (dir, barrier, v0) = (dir.clone(), barrier.clone(), v0.clone());
            std::thread::spawn(move || {
                let store = FileStore::new(&dir);
                let rt = runtime();
                barrier.wait();
                rt.block_on(store.save("default", &format!("writer {i}"), Some(&v0)))
                    .map(|v| (i, v))
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(e.is_conflict(), "{e}");
        }
    }
    let (i, v) = winners[0];
    let text = std::fs::read_to_string(dir.join("default.json")).unwrap();
    assert_eq!(text, format!("writer {i}"));
    let loaded = runtime()
        .block_on(FileStore::new(&dir).load("default"))
        .unwrap()
        .unwrap();
    assert_eq!(&loaded.version, v);
}

/// Read-modify-write from many instances on threads: no update is lost.
#[test]
fn file_store_instances_on_threads_lose_no_update() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keysets");
    const THREADS: u64 = 6;
    const EACH: u64 = 10;
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let store: Arc<dyn Store> = Arc::new(FileStore::new(&dir));
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for _ in 0..EACH {
                        increment(&store, "counter").await;
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let text = std::fs::read_to_string(dir.join("counter.json")).unwrap();
    assert_eq!(text, format!("{}\n", THREADS * EACH));
}

/// A document the reconciler cannot use is loaded as-is by the store, stops
/// the reconcile with an error naming the file, and is never overwritten.
async fn refuses_and_keeps(bytes: &[u8], want_document_error: bool) {
    let (_tmp, dir, store) = file_store();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("default.json");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(text) = std::str::from_utf8(bytes) {
        let (loaded, _) = load(&store, "default")
            .await
            .expect("the store returns it as-is");
        assert_eq!(loaded.as_bytes(), text.as_bytes());
    }
    let clock = Arc::new(FakeClock::new(t0()));
    let r = Reconciler::new(store.clone(), Arc::new(FakeKeys::new()), clock.clone());
    let policy = support::policy();
    for action in [
        None,
        Some(keyroll::planner::Action::Rotate {
            alg: None,
            force: true,
        }),
    ] {
        let err = r.reconcile(&policy, action.as_ref()).await.unwrap_err();
        if want_document_error {
            assert!(matches!(err, ReconcileError::Document(_)), "{err:?}");
        }
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the file was overwritten"
        );
        clock.advance(support::secs(86_400 * 30));
    }
    assert!(r.load("default").await.is_err());
}

#[tokio::test]
async fn a_document_that_does_not_parse_is_reported_and_left_untouched() {
    refuses_and_keeps(
        b"{\"schema_version\": 1, \"keyset\": \"default\", \"keys\": [",
        true,
    )
    .await;
    refuses_and_keeps(b"", true).await;
    refuses_and_keeps("not json at all — ünïcödé".as_bytes(), true).await;
}

#[tokio::test]
async fn a_document_of_an_unknown_schema_is_reported_and_left_untouched() {
    refuses_and_keeps(
        b"{\"schema_version\": 99, \"keyset\": \"default\", \"keys\": [], \"future\": true}",
        true,
    )
    .await;
}

#[tokio::test]
async fn a_document_for_another_keyset_or_with_a_wrong_kid_is_left_untouched() {
    // Make a valid document, then tamper with it.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let r = Reconciler::new(
        store.clone(),
        Arc::new(FakeKeys::new()),
        Arc::new(FakeClock::new(t0())),
    );
    let doc = r
        .reconcile(&support::policy(), None)
        .await
        .unwrap()
        .snapshot
        .doc;
    let text = doc.to_json();
    refuses_and_keeps(
        text.replace("\"keyset\": \"default\"", "\"keyset\": \"other\"")
            .as_bytes(),
        true,
    )
    .await;
    let kid = &doc.keys[0].kid;
    let tampered = text.replacen(&format!("\"kid\": \"{kid}\""), "\"kid\": \"k999-ES256\"", 1);
    assert_ne!(tampered, *text);
    refuses_and_keeps(tampered.as_bytes(), true).await;
}

#[tokio::test]
async fn a_document_that_is_not_utf8_is_reported_and_left_untouched() {
    refuses_and_keeps(b"{\"schema_version\": 1, \xff\xfe}", false).await;
}

#[tokio::test]
async fn a_real_key_document_survives_the_file_store_round_trip() {
    let (_tmp, dir, store) = file_store();
    let policy = support::PolicyText {
        algorithms: r#"["ES256"]"#,
        ..Default::default()
    }
    .build();
    let clock = Arc::new(FakeClock::new(t0()));
    let r = Reconciler::new(
        store.clone(),
        Arc::new(keyroll::key::CryptoKeys),
        clock.clone(),
    );
    let first = r.reconcile(&policy, None).await.unwrap();
    // A fresh reconciler (a restarted process) reads and verifies it.
    let again = Reconciler::new(store, Arc::new(keyroll::key::CryptoKeys), clock);
    let loaded = again.load("default").await.unwrap();
    assert_eq!(loaded.doc, first.snapshot.doc);
    assert_eq!(loaded.jwks, first.snapshot.jwks);
    assert_eq!(mode(&dir.join("default.json")), 0o600);
}

/// `fingerprint` (when a backend offers one) changes whenever the document
/// changes, so an idle daemon notices another writer's save.
async fn fingerprint_changes_with_every_save(store: Arc<dyn Store>) {
    let first = store.fingerprint("ks").await;
    let mut seen = vec![first.clone()];
    let mut version = None;
    for i in 0..30 {
        // Same length every time: only the content differs.
        version = Some(
            store
                .save("ks", &format!("document {i:04}"), version.as_ref())
                .await
                .unwrap(),
        );
        let fingerprint = store.fingerprint("ks").await;
        if first.is_none() {
            assert!(
                fingerprint.is_none(),
                "a backend offers a fingerprint for some states only"
            );
            continue;
        }
        assert!(
            !seen.contains(&fingerprint),
            "save {i}: fingerprint {fingerprint:?} was seen before: {seen:?}"
        );
        seen.push(fingerprint);
    }
}
