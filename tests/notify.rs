//! systemd's notify protocol (SPEC §5) spoken by the real binary to a socket
//! this test listens on, as `Type=notify` with `WatchdogSec=` would see it:
//! READY=1 only once the JWKS is served, STATUS= naming the next rotation,
//! WATCHDOG=1 pings while the watchdog is on, STOPPING=1 on SIGTERM.

#[allow(dead_code)]
mod common;

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Instant;

use common::{
    get_ok, jwks_kids, keyset_block, outputs, read_signer, scrubbed, Daemon, Sandbox, ALGS, BIN,
    LONG, POLL, STEADY,
};

/// systemd's watchdog period handed to the daemon: it pings at half of it.
const WATCHDOG_USEC: &str = "2000000";
/// Pings that show the watchdog repeats rather than firing once.
const PINGS_WANTED: usize = 3;

/// The service manager's end: a datagram socket in the sandbox, and every
/// message received so far, one `KEY=VALUE` line per entry.
struct NotifySocket {
    socket: UnixDatagram,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind(sb: &Sandbox) -> NotifySocket {
        let socket = UnixDatagram::bind(sb.path("notify.sock")).expect("bind the notify socket");
        // The read timeout is the polling step; deadlines are the callers'.
        socket
            .set_read_timeout(Some(POLL))
            .expect("set a read timeout");
        NotifySocket {
            socket,
            received: Vec::new(),
        }
    }

    /// Receives until a line satisfies `wanted` (returning it), checking the
    /// daemon is alive in between; panics with everything received at the
    /// deadline.
    fn until(&mut self, daemon: &mut Daemon, what: &str, wanted: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + LONG;
        while !wanted(&self.received) {
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {LONG:?} waiting for {what}; received {:?}\n--- daemon stderr ---\n{}",
                    self.received,
                    common::tail(&daemon.stderr())
                );
            }
            if !self.receive() {
                daemon.assert_alive();
            }
        }
    }

    /// One datagram, if one arrives within the read timeout.
    fn receive(&mut self) -> bool {
        let mut buffer = [0u8; 4096];
        match self.socket.recv(&mut buffer) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                self.received
                    .extend(text.lines().filter(|l| !l.is_empty()).map(str::to_string));
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }

    /// Everything still queued (the daemon has exited: nothing more comes).
    fn drain(&mut self) {
        while self.receive() {}
    }

    fn count(&self, line: &str) -> usize {
        self.received.iter().filter(|l| *l == line).count()
    }

    fn position(&self, line: &str) -> Option<usize> {
        self.received.iter().position(|l| l == line)
    }
}

/// `keyroll run` as systemd starts a `Type=notify` service with a watchdog:
/// NOTIFY_SOCKET, WATCHDOG_USEC, and WATCHDOG_PID = the service's own pid
/// (`exec` from the shell keeps `$$`).
fn spawn_under_notify(sb: &Sandbox) -> Daemon {
    let mut cmd = scrubbed(Command::new("sh"), sb.root());
    cmd.arg("-c")
        .arg("export WATCHDOG_PID=$$; exec \"$0\" \"$@\"")
        .arg(BIN)
        .arg("--config")
        .arg(sb.config_path())
        .arg("run")
        .env("NOTIFY_SOCKET", sb.path("notify.sock"))
        .env("WATCHDOG_USEC", WATCHDOG_USEC);
    Daemon::start(cmd, sb.root())
}

#[test]
fn ready_after_first_publish_watchdog_pings_and_stopping_on_sigterm() {
    let sb = Sandbox::new();
    let signing_dir = sb.path("signing");
    sb.write_config(&keyset_block(
        "default",
        &ALGS,
        STEADY,
        &outputs(None, Some(&signing_dir)),
    ));
    let mut notify = NotifySocket::bind(&sb);
    let mut daemon = spawn_under_notify(&sb);

    notify.until(&mut daemon, "READY=1", |r| r.iter().any(|l| l == "READY=1"));
    // READY=1 promises the first publish is done: a unit ordered after
    // keyroll fetches the JWKS and reads its signing key at once, no retry.
    let jwks = get_ok(&sb.url("/.well-known/jwks.json"))
        .unwrap_or_else(|e| panic!("READY=1 was sent but the JWKS is not served: {e}"));
    let kids = jwks_kids(&jwks.body);
    assert_eq!(
        kids.len(),
        4,
        "READY=1 before every key was published: {jwks:?}"
    );
    for alg in ALGS {
        let signer = read_signer(&signing_dir, alg)
            .unwrap_or_else(|e| panic!("READY=1 was sent but signing_dir lacks {alg}: {e}"));
        assert!(
            kids.contains(&signer.kid),
            "{alg}.kid {} is not published",
            signer.kid
        );
    }
    get_ok(&sb.url("/readyz")).expect("READY=1 was sent but /readyz is not 200");
    assert_eq!(
        notify.count("READY=1"),
        1,
        "READY=1 once: {:?}",
        notify.received
    );

    notify.until(&mut daemon, "STATUS= with the next rotation", |r| {
        r.iter()
            .any(|l| l.starts_with("STATUS=next rotation: default/"))
    });

    notify.until(
        &mut daemon,
        &format!("{PINGS_WANTED} WATCHDOG=1 pings"),
        |r| r.iter().filter(|l| *l == "WATCHDOG=1").count() >= PINGS_WANTED,
    );

    let (status, _) = daemon.stop("TERM");
    assert!(
        status.success(),
        "SIGTERM must stop keyroll cleanly: {status}"
    );
    notify.drain();
    let stopping = notify
        .position("STOPPING=1")
        .unwrap_or_else(|| panic!("no STOPPING=1 after SIGTERM: {:?}", notify.received));
    let ready = notify.position("READY=1").expect("READY=1 was received");
    assert!(
        ready < stopping,
        "STOPPING=1 before READY=1: {:?}",
        notify.received
    );
    assert_eq!(notify.count("STOPPING=1"), 1, "{:?}", notify.received);
}
