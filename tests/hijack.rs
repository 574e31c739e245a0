//! Outputs that can't be hijacked, and no core dumps (issue 12 §3–4),
//! against the real binary:
//!
//! - a symbolic link planted at `jwks_file`, at a `signing_dir` file, at
//!   the store document or at its lock file (pointing into the store
//!   folder, or to `/etc/passwd`), or a FIFO there, makes `validate` and
//!   `run` exit 2 naming the path and the reason; nothing is written
//!   through it;
//! - the same planted under a running daemon is an ERROR in the log and in
//!   `keyroll_publish_errors_total`, never a hang, and HTTP keeps serving
//!   while rotations carry on;
//! - a world-writable folder of another user, or a link on a folder path
//!   that another user owns, is refused (as root);
//! - the daemon and a CLI command run with a core size limit of 0 and are
//!   not dumpable.
//!
//! `/dev/zero` and paths under `/proc` are in `tests/data/bad-configs`.

#[allow(dead_code)]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use common::{
    get_ok, keyset_block, metric, metrics_text, outputs, wait_ready, Out, Sandbox, LONG, STEADY,
};

/// A sandbox with ES256 outputs in `out/` and a bootstrapped store.
fn sandbox() -> (Sandbox, PathBuf, PathBuf) {
    let sb = Sandbox::new();
    let jwks = sb.path("out/jwks.json");
    let signing = sb.path("out/signing");
    let extra = outputs(Some(&jwks), Some(&signing));
    sb.write_config(&keyset_block("default", &["ES256"], STEADY, &extra));
    sb.cli(&["rotate"]).ok();
    (sb, jwks, signing)
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

fn symlink(target: &Path, at: &Path) {
    std::os::unix::fs::symlink(target, at)
        .unwrap_or_else(|e| panic!("symlink {} -> {}: {e}", at.display(), target.display()));
}

/// What can be planted at a path.
#[derive(Clone, Copy, Debug)]
enum Plant<'a> {
    Link(&'a Path),
    Fifo,
}

impl Plant<'_> {
    fn put(self, at: &Path) {
        let _ = fs::remove_file(at);
        match self {
            Plant::Link(target) => symlink(target, at),
            Plant::Fifo => mkfifo(at),
        }
    }

    fn reason(self) -> String {
        match self {
            Plant::Link(target) => format!("is a symbolic link (to {})", target.display()),
            Plant::Fifo => "is a FIFO (named pipe), not a regular file".to_string(),
        }
    }

    /// Whether `at` still holds what was planted (nothing replaced it).
    fn still_there(self, at: &Path) -> bool {
        let Ok(meta) = fs::symlink_metadata(at) else {
            return false;
        };
        match self {
            Plant::Link(target) => {
                meta.file_type().is_symlink() && fs::read_link(at).ok().as_deref() == Some(target)
            }
            Plant::Fifo => meta.file_type().is_fifo(),
        }
    }
}

fn fingerprint(path: &Path) -> (Vec<u8>, i64, i64) {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (
        fs::read(path).expect("read"),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

#[test]
fn a_link_or_fifo_planted_at_any_output_or_store_file_is_refused_before_start() {
    let (sb, jwks, signing) = sandbox();
    fs::create_dir_all(&signing).unwrap();
    let document = sb.store_file("default");
    let lock = sb.store_dir().join(".default.lock");
    let elsewhere = sb.store_dir().join("elsewhere.json");
    fs::copy(&document, &elsewhere).unwrap();
    let passwd = Path::new("/etc/passwd");
    let passwd_before = fingerprint(passwd);
    let document_before = fingerprint(&document);
    let locations: [(&str, PathBuf); 4] = [
        ("keysets[default].jwks_file", jwks.clone()),
        ("keysets[default].signing_dir", signing.join("ES256.pem")),
        ("store.dir", document.clone()),
        ("store.dir", lock.clone()),
    ];
    let mut wrong = Vec::new();
    for (key, at) in &locations {
        // Into the store folder: the document with every private key, or
        // (for the document itself) another file beside it.
        let into_store = if *at == document {
            &elsewhere
        } else {
            &document
        };
        for plant in [Plant::Link(into_store), Plant::Link(passwd), Plant::Fifo] {
            let saved = fs::read(at).ok();
            plant.put(at);
            // validate and run refuse the config, naming its key.
            let mut outs: Vec<(Out, i32, &str)> =
                vec![(sb.cli(&["validate"]), 2, key), (sb.cli(&["run"]), 2, key)];
            // A command that writes the store meets the plant in the store
            // itself (never run against a link to /etc/passwd).
            if key == &"store.dir" && !matches!(plant, Plant::Link(p) if p == passwd) {
                outs.push((sb.cli(&["rotate", "--now"]), 1, ""));
            }
            for (out, code, key) in outs {
                let reason = plant.reason();
                let needles = [key, &at.display().to_string(), reason.as_str()];
                let missing: Vec<&&str> = needles
                    .iter()
                    .filter(|n| !out.stderr.contains(**n))
                    .collect();
                if out.code != Some(code) || !missing.is_empty() {
                    wrong.push(format!(
                        "{plant:?} at {}: expected exit {code} naming {needles:?} (missing {missing:?})\n{out}",
                        at.display()
                    ));
                }
            }
            if !plant.still_there(at) {
                wrong.push(format!("{plant:?} at {} was replaced", at.display()));
            }
            fs::remove_file(at).unwrap();
            if let Some(saved) = saved {
                fs::write(at, saved).unwrap();
                fs::set_permissions(at, fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    assert_eq!(
        fingerprint(&document).0,
        document_before.0,
        "the document changed"
    );
    assert_eq!(fingerprint(passwd), passwd_before, "/etc/passwd changed");
    assert_eq!(fs::read(&elsewhere).unwrap(), document_before.0);
    assert!(!jwks.exists(), "jwks_file was written");
}

/// The planted things a running daemon must report, not follow, not hang on.
#[test]
fn links_and_fifos_planted_under_a_running_daemon_are_errors_and_http_keeps_serving() {
    let (sb, jwks, signing) = sandbox();
    let mut daemon = sb.spawn(&[]);
    let log_path = daemon.log_path();
    let log = || String::from_utf8_lossy(&fs::read(&log_path).unwrap_or_default()).into_owned();
    wait_ready(&mut daemon, &sb);
    daemon.until("the signing files", LONG, || {
        signing
            .join("ES256.pem")
            .exists()
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    let document = sb.store_file("default");
    let decoy = sb.path("decoy");
    fs::write(&decoy, "decoy").unwrap();
    let pem = signing.join("ES256.pem");
    let pem_target = document.clone();

    // Links at jwks_file (to a decoy) and at a signing file (to the store).
    Plant::Link(&decoy).put(&jwks);
    Plant::Link(&pem_target).put(&pem);
    let document_before = fs::read(&document).unwrap();
    for (output, at, target) in [
        ("jwks_file", &jwks, &decoy),
        ("signing_dir", &pem, &pem_target),
    ] {
        let line = format!(
            "{} is a symbolic link (to {})",
            at.display(),
            target.display()
        );
        daemon.until(&format!("an ERROR about {output}"), LONG, || {
            let log = log();
            let counted = metric(
                &metrics_text(&sb),
                "keyroll_publish_errors_total",
                &[("keyset", "default"), ("output", output)],
            )
            .unwrap_or(0.0);
            (log.lines()
                .any(|l| l.contains("ERROR") && l.contains(&line))
                && counted >= 1.0)
                .then_some(())
                .ok_or_else(|| format!("{output} errors counted: {counted}"))
        });
    }
    // Reconciles carry on: a rotation reaches HTTP.
    rotation_reaches_http(&sb, &mut daemon);
    assert_eq!(fs::read(&decoy).unwrap(), b"decoy");
    assert!(Plant::Link(&decoy).still_there(&jwks));
    assert!(Plant::Link(&pem_target).still_there(&pem));

    // A FIFO at jwks_file: an error, not a reader blocked forever.
    Plant::Fifo.put(&jwks);
    daemon.until("an ERROR about the FIFO", LONG, || {
        let line = format!("{} is a FIFO", jwks.display());
        log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(&line))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    rotation_reaches_http(&sb, &mut daemon);
    assert!(Plant::Fifo.still_there(&jwks));

    // The store document swapped for a link: the keyset is not reconciled,
    // HTTP serves the last JWKS, nothing is written through the link.
    let copy = sb.store_dir().join("copy.json");
    fs::copy(&document, &copy).unwrap();
    let copy_before = fs::read(&copy).unwrap();
    Plant::Link(&copy).put(&document);
    daemon.until("an ERROR about the store document", LONG, || {
        let line = format!(
            "{} is a symbolic link (to {})",
            document.display(),
            copy.display()
        );
        log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(&line))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    let served = get_ok(&sb.url("/.well-known/jwks.json")).unwrap().body;
    assert!(
        !common::jwks_kids(&served).is_empty(),
        "HTTP serves the last JWKS"
    );
    get_ok(&sb.url("/healthz")).unwrap();
    assert_eq!(fs::read(&copy).unwrap(), copy_before);
    assert!(Plant::Link(&copy).still_there(&document));
    assert_ne!(copy_before, document_before, "the rotations were saved");
    daemon.stop_cleanly("TERM");
}

/// `rotate --now` changes the served JWKS within the deadline.
fn rotation_reaches_http(sb: &Sandbox, daemon: &mut common::Daemon) {
    let before = get_ok(&sb.url("/.well-known/jwks.json")).unwrap().body;
    sb.cli(&["rotate", "--now"]).ok();
    daemon.until("the rotation to reach HTTP", LONG, || {
        let now = get_ok(&sb.url("/.well-known/jwks.json"))?.body;
        (now != before)
            .then_some(())
            .ok_or_else(|| "the JWKS is unchanged".to_string())
    });
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0)
}

#[test]
fn another_users_world_writable_folder_or_folder_link_is_refused() {
    if !running_as_root() {
        support::skipped(
            "only root can give a folder to another user (fsutil's unit tests cover the rule)",
        );
        return;
    }
    let sb = Sandbox::new();
    let shared = sb.path("shared");
    fs::create_dir(&shared).unwrap();
    std::os::unix::fs::chown(&shared, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let extra = outputs(
        Some(&shared.join("jwks.json")),
        Some(&shared.join("signing")),
    );
    sb.write_config(&keyset_block("default", &["ES256"], STEADY, &extra));
    let reason = format!(
        "{} is group- and world-writable and owned by uid 65534",
        shared.display()
    );
    for command in ["validate", "run"] {
        sb.cli(&[command]).exits(2).stderr_has(&[
            "keysets[default].jwks_file",
            "keysets[default].signing_dir",
            &reason,
        ]);
    }
    assert_eq!(
        fs::read_dir(&shared).unwrap().count(),
        0,
        "something was written"
    );
    // Root's own 0777 folder (like a Kubernetes emptyDir) is accepted.
    std::os::unix::fs::chown(&shared, Some(0), Some(0)).unwrap();
    sb.cli(&["validate"]).ok();

    // A link on a folder path is followed only if keyroll's user or root
    // made it: one owned by another user is refused, whatever it points to.
    let real = sb.path("real");
    fs::create_dir(&real).unwrap();
    let link = sb.path("planted");
    symlink(&real, &link);
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let extra = outputs(None, Some(&link));
    sb.write_config(&keyset_block("default", &["ES256"], STEADY, &extra));
    let reason = format!("{} is a symbolic link owned by uid 65534", link.display());
    for command in ["validate", "run"] {
        sb.cli(&[command])
            .exits(2)
            .stderr_has(&["keysets[default].signing_dir", &reason]);
    }
    assert_eq!(
        fs::read_dir(&real).unwrap().count(),
        0,
        "something was written"
    );
    // The same link made by root is the operator's: followed.
    std::os::unix::fs::lchown(&link, Some(0), Some(0)).unwrap();
    sb.cli(&["validate"]).ok();
}

/// Core size limit of the process `pid`, soft and hard, from /proc.
fn core_limit(pid: u32) -> String {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .expect("a core limit line")
}

/// A non-dumpable process's `/proc/<pid>` files belong to root whatever
/// its user; so the process runs as another user than root (nobody, when
/// the test is root) and the owner is checked.
fn assert_not_dumpable(pid: u32, label: &str) {
    let status = format!("/proc/{pid}/status");
    let owner = fs::metadata(&status).expect("stat status").uid();
    let text = fs::read_to_string(&status).expect("read status");
    let uid = text
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("an effective uid");
    assert_ne!(
        uid, "0",
        "{label} must run as another user than root for this check"
    );
    assert_eq!(
        owner, 0,
        "{label} (uid {uid}) is dumpable: {status} belongs to uid {owner}"
    );
}

/// As root, commands run as nobody (uid 65534) in a sandbox it owns.
fn as_unprivileged(cmd: &mut std::process::Command, sb: &Sandbox) {
    if running_as_root() {
        let status = std::process::Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(sb.root())
            .status()
            .expect("run chown");
        assert!(status.success());
        cmd.uid(65534).gid(65534);
    }
}

#[test]
fn no_core_dump_can_hold_a_key_in_the_daemon_or_a_cli_command() {
    let sb = Sandbox::new();
    let socket = sb.path("sign.sock");
    let keysets = keyset_block("default", &["ES256"], STEADY, "");
    let text = format!(
        "{}{keysets}\n[signer]\nsocket = '{}'\n",
        sb.head(),
        socket.display()
    );
    fs::write(sb.config_path(), text).unwrap();

    let mut cmd = sb.command();
    cmd.arg("--config").arg(sb.config_path()).arg("run");
    as_unprivileged(&mut cmd, &sb);
    let mut daemon = common::Daemon::start(cmd, sb.root());
    wait_ready(&mut daemon, &sb);
    assert_eq!(core_limit(daemon.pid()), "Max core file size 0 0 bytes");
    assert_not_dumpable(daemon.pid(), "keyroll run");
    daemon.stop_cleanly("TERM");

    // `keyroll sign` waits on a socket that accepts and never answers.
    let _ = fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = sb.command();
    cmd.arg("--config")
        .arg(sb.config_path())
        .args(["sign", "--claims", "{}"]);
    as_unprivileged(&mut cmd, &sb);
    let mut sign = common::Daemon::start(cmd, sb.root());
    let (connection, _) = listener.accept().expect("keyroll sign connects");
    sign.assert_alive();
    assert_eq!(core_limit(sign.pid()), "Max core file size 0 0 bytes");
    assert_not_dumpable(sign.pid(), "keyroll sign");
    drop(connection);
    drop(listener);
    drop(sign);
}
