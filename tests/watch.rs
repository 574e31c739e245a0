//! The daemon notices another writer's change to the file store at once,
//! not at its next `reconcile_interval`: here an hour, so a change seen
//! within the tests' deadline was seen by the watch (or, when watching is
//! forced off, by the fallback poll). No timing is asserted beyond that.

#[allow(dead_code)]
mod common;

use std::fs;
use std::path::Path;

use common::{
    get_ok, jwks_kids, keyset_block, outputs, read_signer, wait_ready, Daemon, Sandbox, LONG,
    STEADY,
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
