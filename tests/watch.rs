//! The daemon notices another writer's change to the file store at once,
//! not at its next `reconcile_interval`: here an hour, so a change seen
//! within the tests' deadline was seen by the watch (or, when watching is
//! forced off, by the fallback poll). No timing is asserted beyond that.

#[allow(dead_code)]
mod common;

use std::fs;
use std::path::Path;

use common::{
    get_ok, jwks_kids, keyset_block, metric, metrics_text, now_unix, outputs, read_signer,
    wait_ready, Daemon, Sandbox, LONG, STEADY,
};

/// A sandbox whose daemon reconciles only every hour on its own.
fn hourly(sb: &Sandbox, signing_dir: &Path) {
    let text = sb
        .head()
        .replace("reconcile_interval = \"1s\"", "reconcile_interval = \"1h\"")
        + &keyset_block(
            "default",
            &["ES256"],
            STEADY,
            &outputs(None, Some(signing_dir)),
        );
    fs::write(sb.config_path(), text).expect("write the config");
}

fn spawn(sb: &Sandbox, watch_mode: Option<&str>) -> Daemon {
    let mut cmd = sb.command();
    cmd.arg("--config").arg(sb.config_path()).arg("run");
    if let Some(mode) = watch_mode {
        cmd.env("KEYROLL_FILE_WATCH", mode);
    }
    Daemon::start(cmd, sb.root())
}

/// The ES256 key signers are offered, as `signing_dir` and HTTP show it.
fn active_kid(daemon: &mut Daemon, sb: &Sandbox, signing_dir: &Path) -> String {
    wait_ready(daemon, sb);
    daemon.until("the signing key to be written", LONG, || {
        read_signer(signing_dir, "ES256").map(|key| key.kid)
    })
}

/// `keyroll rotate --now` from the CLI, and the daemon serving and writing
/// the new key within the deadline.
fn rotation_is_noticed(sb: &Sandbox, daemon: &mut Daemon, signing_dir: &Path) {
    let before = active_kid(daemon, sb, signing_dir);
    sb.cli(&["rotate", "--now", "--alg", "ES256"]).ok();
    let after = daemon.until("the rotated key in signing_dir", LONG, || {
        let kid = read_signer(signing_dir, "ES256")?.kid;
        (kid != before)
            .then_some(kid)
            .ok_or("still the old key".to_string())
    });
    daemon.until("the rotated key served", LONG, || {
        let jwks = get_ok(&sb.url("/.well-known/jwks.json"))?;
        jwks_kids(&jwks.body)
            .contains(&after)
            .then_some(())
            .ok_or(format!("{after} not in {jwks:?}"))
    });
}

#[test]
fn a_cli_rotation_is_served_without_waiting_for_reconcile_interval() {
    let sb = Sandbox::new();
    let signing_dir = sb.path("signing");
    hourly(&sb, &signing_dir);
    let mut daemon = spawn(&sb, None);
    rotation_is_noticed(&sb, &mut daemon, &signing_dir);
    let log = daemon.stderr();
    assert!(
        log.contains("watching the store for changes"),
        "the log says the store is watched:\n{log}"
    );
    assert!(!log.contains("polling it for changes"), "{log}");
}

#[test]
fn with_watching_forced_off_the_daemon_polls_and_says_so() {
    let sb = Sandbox::new();
    let signing_dir = sb.path("signing");
    hourly(&sb, &signing_dir);
    let mut daemon = spawn(&sb, Some("poll"));
    rotation_is_noticed(&sb, &mut daemon, &signing_dir);
    let log = daemon.stderr();
    let warned: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("polling it for changes"))
        .collect();
    assert_eq!(warned.len(), 1, "one WARN naming the mode:\n{log}");
    assert!(
        warned[0].contains("KEYROLL_FILE_WATCH=poll"),
        "and why: {}",
        warned[0]
    );
}

#[test]
fn a_deleted_document_is_noticed_at_once() {
    let sb = Sandbox::new();
    let signing_dir = sb.path("signing");
    hourly(&sb, &signing_dir);
    let mut daemon = spawn(&sb, None);
    active_kid(&mut daemon, &sb, &signing_dir);
    fs::remove_file(sb.store_file("default")).expect("delete the stored document");
    // SPEC C2: the daemon records the loss in a new document at once.
    daemon.until("the loss recorded in the store", LONG, || {
        let text = fs::read_to_string(sb.store_file("default")).map_err(|e| e.to_string())?;
        text.contains("document-lost")
            .then_some(())
            .ok_or(format!("no loss recorded: {text}"))
    });
}

#[test]
fn a_replaced_store_folder_is_watched_again() {
    let sb = Sandbox::new();
    let signing_dir = sb.path("signing");
    hourly(&sb, &signing_dir);
    let mut daemon = spawn(&sb, None);
    active_kid(&mut daemon, &sb, &signing_dir);
    // An operator restores the folder from a copy: the old one moved away,
    // a new one (another inode) in its place.
    let store = sb.store_dir();
    let copy = sb.path("store.copy");
    fs::create_dir(&copy).expect("make the copy's folder");
    for entry in fs::read_dir(&store).expect("list the store") {
        let entry = entry.expect("a store entry");
        fs::copy(entry.path(), copy.join(entry.file_name())).expect("copy a store file");
    }
    fs::rename(&store, sb.path("store.old")).expect("move the store away");
    fs::rename(&copy, &store).expect("put the copy in its place");
    rotation_is_noticed(&sb, &mut daemon, &signing_dir);
}

/// Every keyset's `keyroll_last_reconcile_success_timestamp_seconds`.
fn reconciled_at(sb: &Sandbox, keysets: &[&str]) -> Result<Vec<f64>, String> {
    let text = metrics_text(sb);
    keysets
        .iter()
        .map(|keyset| {
            metric(
                &text,
                "keyroll_last_reconcile_success_timestamp_seconds",
                &[("keyset", keyset)],
            )
            .ok_or(format!("no reconcile metric for {keyset}"))
        })
        .collect()
}

fn errors_of(sb: &Sandbox, keyset: &str) -> f64 {
    metric(
        &metrics_text(sb),
        "keyroll_reconcile_errors_total",
        &[("keyset", keyset)],
    )
    .unwrap_or(0.0)
}

/// What makes an idle daemon with many keysets cheap (issue 13): with the
/// store watched, a timer pass reads only the keysets that are due and
/// takes the watch's word for the others. They still count as reconciled
/// every `reconcile_interval` (an alert watches that metric), and a full
/// pass (SIGHUP) reads them all again.
#[test]
fn a_watched_idle_daemon_rereads_no_document_yet_keeps_every_keyset_reconciled() {
    let sb = Sandbox::new();
    let names = ["a", "b", "c"];
    let blocks: Vec<String> = names
        .iter()
        .map(|name| keyset_block(name, &["ES256"], STEADY, ""))
        .collect();
    sb.write_config(&blocks.concat()); // reconcile_interval = "1s"
    let mut daemon = spawn(&sb, None);
    wait_ready(&mut daemon, &sb);
    // Settled: b's next key recorded ready (publish_lead after its
    // publication); nothing is due again before the rotation, an hour on.
    daemon.until("b's next key to be ready", LONG, || {
        let doc: serde_json::Value =
            serde_json::from_slice(&fs::read(sb.store_file("b")).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        let keys = doc["keys"].as_array().ok_or("no keys")?;
        keys.iter()
            .any(|k| k["state"] == "next" && !k["ready_at"].is_null())
            .then_some(())
            .ok_or(format!("{keys:?}"))
    });

    // b's document goes bad through a hard link outside the store folder:
    // the same file, but no event reaches the folder's watch. A pass that
    // read b would report it.
    let link = sb.path("b-elsewhere.json");
    fs::hard_link(sb.store_file("b"), &link).expect("link b's document");
    let corrupt = b"{ not a keyset document";
    fs::write(&link, corrupt).expect("write through the link");
    let corrupted_at = now_unix();
    // Three timer passes later every keyset, b too, counts as reconciled
    // after the corruption, and none read b.
    daemon.until("three more timer passes", LONG, || {
        let at = reconciled_at(&sb, &names)?;
        at.iter()
            .all(|t| *t >= corrupted_at + 3.0)
            .then_some(())
            .ok_or(format!("{at:?}"))
    });
    assert_eq!(errors_of(&sb, "b"), 0.0, "no timer pass read b");
    let log = daemon.stderr();
    assert!(
        !log.contains("ERROR"),
        "nothing read the bad document:\n{log}"
    );

    // A full pass reads every document: b's is reported, and left as it is.
    daemon.signal("HUP");
    daemon.until("b's document reported", LONG, || {
        let errors = errors_of(&sb, "b");
        (errors >= 1.0)
            .then_some(())
            .ok_or(format!("{errors} errors"))
    });
    assert_eq!(
        fs::read(sb.store_file("b")).expect("read b's document"),
        corrupt,
        "a corrupted document is never overwritten"
    );
    assert_eq!(errors_of(&sb, "a"), 0.0);
    daemon.assert_alive();
}
