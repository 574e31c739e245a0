//! Crash consistency (SPEC I1, I2, I5): `keyroll run` on the file store with
//! accelerated timings is SIGKILLed at random instants, over and over, while
//! `keyroll rotate --now` runs beside it and is killed too. After each kill,
//! with nothing running:
//!
//! - the stored document parses (with keyroll's strict parser) and so do the
//!   JWKS file and `signing.json`; `keyroll status --json` works and shows
//!   the stored keys;
//! - every slot has exactly one active key;
//! - no key seen in the store or the JWKS file is gone before its
//!   `remove_at`, and every removal in the audit trail came at or after it;
//! - every key in `signing.json` is in the published JWKS.
//!
//! At the end a daemon must finish whatever was interrupted: the JWKS file
//! and signing keys catch up with the store.
//!
//! The run is seeded: `KEYROLL_CRASH_SEED=N cargo test --test crash` replays
//! one (a failure prints its seed); `KEYROLL_CRASH_KILLS` sets the number of
//! kills (default 120).

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use keyroll::document::{AuditEvent, KeyState, KeysetDoc, Trigger};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::{jwks_kids, parse_json, Sandbox, LONG};

const DEFAULT_KILLS: usize = 120;
const ALGS: [&str; 2] = ["ES256", "RS256"];

/// Prints the seed when the test fails, however it fails.
struct SeedReport(u64);

impl Drop for SeedReport {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "\ncrash harness failed with seed {0}; replay: KEYROLL_CRASH_SEED={0} cargo test --test crash",
                self.0
            );
        }
    }
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
    )
}

/// What the checker has seen across kills.
#[derive(Default)]
struct History {
    /// Every kid ever seen in the store, with its `remove_at` once known.
    stored: BTreeMap<String, Option<DateTime<Utc>>>,
    /// Every kid ever seen in the JWKS file.
    published: BTreeSet<String>,
    kills: usize,
    rotations_started: usize,
    rotations_finished: usize,
    rotations_killed: usize,
    removals_seen: BTreeSet<String>,
}

struct Harness {
    sb: Sandbox,
    history: History,
}

impl Harness {
    fn new() -> Self {
        let sb = Sandbox::new();
        let algs: Vec<String> = ALGS.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            "reconcile_interval = \"1s\"\nstate_dir = '{state}'\n\n[store]\ntype = \"file\"\ndir = '{store}'\n\n\
             [[keysets]]\nname = \"default\"\nalgorithms = [{algs}]\n{timings}jwks_file = '{jwks}'\nsigning_dir = '{signing}'\n",
            state = sb.path("state").display(),
            store = sb.store_dir().display(),
            algs = algs.join(", "),
            timings = common::FAST,
            jwks = sb.path("out/jwks.json").display(),
            signing = sb.path("out/signing").display(),
        );
        fs::write(sb.config_path(), config).expect("write the config");
        Harness {
            sb,
            history: History::default(),
        }
    }

    /// Starts `keyroll ARGS…`, its output in `<name>.stdout`/`.stderr`.
    fn start(&self, name: &str, args: &[&str]) -> Child {
        let out = |stream: &str| {
            fs::File::create(self.sb.path(&format!("{name}.{stream}")))
                .expect("create an output file")
        };
        self.sb
            .command()
            .arg("--config")
            .arg(self.sb.config_path())
            .args(args)
            .stdout(out("stdout"))
            .stderr(out("stderr"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start keyroll {}: {e}", args.join(" ")))
    }

    fn stderr_of(&self, name: &str) -> String {
        fs::read_to_string(self.sb.path(&format!("{name}.stderr"))).unwrap_or_default()
    }

    /// One round: a daemon (and maybe a `rotate --now`) killed at random.
    fn round(&mut self, rng: &mut StdRng, n: usize) {
        let daemon_name = format!("run-{n}");
        let mut daemon = self.start(&daemon_name, &["run"]);
        // A third of the kills land in start-up, bootstrap and the first
        // pass; the rest anywhere in the first reconcile intervals.
        let life = if rng.gen_bool(1.0 / 3.0) {
            rng.gen_range(5..150)
        } else {
            rng.gen_range(150..900)
        };
        let rotate_at = rng.gen_bool(0.5).then(|| rng.gen_range(0..life));
        let started = Instant::now();
        let mut rotation = None;
        if let Some(at) = rotate_at {
            // Sleeps here only pick the random instants; nothing waits on them.
            thread::sleep(Duration::from_millis(at));
            rotation = Some(self.start(&format!("rotate-{n}"), &["rotate", "--now"]));
            self.history.rotations_started += 1;
        }
        thread::sleep(Duration::from_millis(life).saturating_sub(started.elapsed()));
        if let Some(status) = daemon.try_wait().expect("query the daemon") {
            panic!(
                "round {n}: keyroll run exited by itself with {status}:\n{}",
                common::tail(&self.stderr_of(&daemon_name))
            );
        }
        // SIGKILL, then wait: the checks run with nothing running.
        daemon.kill().expect("SIGKILL the daemon");
        daemon.wait().expect("reap the daemon");
        self.history.kills += 1;
        if let Some(mut child) = rotation {
            match child.try_wait().expect("query rotate") {
                Some(status) => {
                    self.history.rotations_finished += 1;
                    let stderr = self.stderr_of(&format!("rotate-{n}"));
                    assert!(
                        status.success(),
                        "round {n}: `rotate --now` failed with {status}:\n{stderr}"
                    );
                }
                None => {
                    child.kill().expect("SIGKILL rotate");
                    child.wait().expect("reap rotate");
                    self.history.kills += 1;
                    self.history.rotations_killed += 1;
                }
            }
        }
    }

    /// The checks after a kill, with nothing running.
    fn check(&mut self, n: usize) {
        let now = Utc::now();
        let fail = |what: String| -> ! { panic!("after kill round {n}: {what}") };
        let store_file = self.sb.store_file("default");
        let doc = match fs::read_to_string(&store_file) {
            Ok(text) => Some(
                KeysetDoc::parse(&text, "default", &store_file.display().to_string())
                    .unwrap_or_else(|e| fail(format!("the stored document is refused: {e}"))),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => fail(format!("cannot read the store: {e}")),
        };
        let jwks = fs::read(self.sb.path("out/jwks.json"))
            .ok()
            .map(|bytes| jwks_kids(&bytes));
        let status = self.sb.status_json();
        let status_kids: BTreeSet<String> = common::keyset_status(&status, "default")["keys"]
            .as_array()
            .expect("a keys array")
            .iter()
            .map(|k| k["kid"].as_str().expect("a kid").to_string())
            .collect();

        let Some(doc) = doc else {
            // Killed before the first save: nothing may have been published.
            if jwks.is_some() || !self.history.stored.is_empty() {
                fail("the stored document vanished".into());
            }
            return;
        };
        let kids: BTreeSet<String> = doc.keys.iter().map(|k| k.kid.clone()).collect();
        if status_kids != kids {
            fail(format!(
                "status shows {status_kids:?}, the store holds {kids:?}"
            ));
        }

        // I1: one active key per slot.
        for alg in ALGS {
            let active = doc
                .keys
                .iter()
                .filter(|k| k.alg.as_str() == alg && k.state == KeyState::Active)
                .count();
            if active != 1 {
                fail(format!("slot {alg} has {active} active keys"));
            }
        }

        // I5: removals only at or after remove_at, and only by the grace.
        for record in doc.audit.iter().filter(|r| r.event == AuditEvent::Removed) {
            let early = record.key.remove_at.is_none_or(|at| record.at < at);
            if early || record.trigger != Trigger::GraceEnded {
                fail(format!("{} was removed early: {record:?}", record.kid));
            }
            self.history.removals_seen.insert(record.kid.clone());
        }
        for key in &doc.keys {
            self.history.stored.insert(key.kid.clone(), key.remove_at);
        }
        let gone_early = |kid: &str, stored: &BTreeMap<String, Option<DateTime<Utc>>>| {
            let removed = doc
                .audit
                .iter()
                .any(|r| r.event == AuditEvent::Removed && r.kid == kid);
            let due = stored
                .get(kid)
                .copied()
                .flatten()
                .is_some_and(|at| at <= now);
            !(removed || due)
        };
        for kid in self.history.stored.keys() {
            if !kids.contains(kid) && gone_early(kid, &self.history.stored) {
                fail(format!("{kid} left the store before its remove_at"));
            }
        }

        // I2 across crashes: a published key stays published until remove_at.
        if let Some(published) = &jwks {
            for kid in &self.history.published {
                if !published.contains(kid) && gone_early(kid, &self.history.stored) {
                    fail(format!("{kid} left the JWKS file before its remove_at"));
                }
            }
            self.history.published.extend(published.iter().cloned());
        } else if !self.history.published.is_empty() {
            fail("the JWKS file vanished".into());
        }

        // A signer's keys are always published.
        if let Ok(bytes) = fs::read(self.sb.path("out/signing/signing.json")) {
            let signing = parse_json(&bytes, "signing.json");
            let published = jwks.clone().unwrap_or_default();
            for key in signing["keys"].as_array().expect("signing.json has keys") {
                let kid = key["kid"].as_str().expect("a kid");
                if !published.iter().any(|k| k == kid) && gone_early(kid, &self.history.stored) {
                    fail(format!("signing.json holds {kid}, which is not published"));
                }
            }
        }
    }

    /// Leftover temp files of interrupted atomic writes, counted. Those
    /// beside private keys (store, signing_dir) must never be readable by
    /// others; a JWKS temp file may already have its public 0644.
    fn leftovers(&self) -> usize {
        let dirs = [
            (self.sb.store_dir(), true),
            (self.sb.path("out/signing"), true),
            (self.sb.path("out"), false),
        ];
        let mut count = 0;
        for (dir, secret) in dirs {
            for entry in fs::read_dir(&dir).into_iter().flatten() {
                let entry = entry.expect("a folder entry");
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') || name.ends_with(".lock") {
                    continue;
                }
                count += 1;
                let mode = common::mode(&entry.path());
                assert!(
                    !secret || mode & 0o077 == 0,
                    "{} is readable by others ({mode:o})",
                    entry.path().display()
                );
            }
        }
        count
    }

    /// A last daemon finishes whatever the kills interrupted.
    fn recover(&self) {
        let mut daemon = self.sb.spawn(&[]);
        let jwks_file = self.sb.path("out/jwks.json");
        daemon.until(
            "the JWKS file and signing keys to match the store",
            LONG,
            || {
                // Fails until the keyset exists (every kill may have come
                // before the first save).
                let out = self.sb.cli(&["jwks"]);
                if out.code != Some(0) {
                    return Err(format!("`keyroll jwks`: {}", out.stderr.trim()));
                }
                let expected = out.stdout;
                let published = fs::read_to_string(&jwks_file).map_err(|e| e.to_string())?;
                if published != expected {
                    return Err("the JWKS file differs from `keyroll jwks`".into());
                }
                let active: BTreeSet<String> = common::key_rows(&self.sb.status_json(), "default")
                    .into_iter()
                    .filter(|row| row.state == "active")
                    .map(|row| row.kid)
                    .collect();
                let signing = signing_kids(&self.sb.path("out/signing/signing.json"))?;
                if signing != active {
                    return Err(format!(
                        "signing.json has {signing:?}, active are {active:?}"
                    ));
                }
                Ok(())
            },
        );
        let (status, _) = daemon.stop("TERM");
        assert!(status.success(), "keyroll run exited with {status}");
    }
}

fn signing_kids(path: &Path) -> Result<BTreeSet<String>, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let signing: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("signing.json: {e}"))?;
    Ok(signing["keys"]
        .as_array()
        .ok_or("signing.json has no keys")?
        .iter()
        .filter_map(|k| k["kid"].as_str().map(str::to_string))
        .collect())
}

#[test]
fn sigkill_at_random_instants_never_breaks_the_store_or_the_jwks() {
    let seed = env_number("KEYROLL_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_nanos() as u64
    });
    let _report = SeedReport(seed);
    let rounds = env_number("KEYROLL_CRASH_KILLS").map_or(DEFAULT_KILLS, |n| n as usize);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut harness = Harness::new();
    let started = Instant::now();
    for n in 0..rounds {
        harness.round(&mut rng, n);
        harness.check(n);
    }
    let leftovers = harness.leftovers();
    harness.recover();
    let h = &harness.history;
    eprintln!(
        "crash harness: seed {seed}, {} kills in {} rounds ({} `rotate --now`: {} finished, {} killed), \
         {} keys stored, {} published, {} removed by their grace, {leftovers} temp files left by kills, {:.1}s",
        h.kills,
        rounds,
        h.rotations_started,
        h.rotations_finished,
        h.rotations_killed,
        h.stored.len(),
        h.published.len(),
        h.removals_seen.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(h.kills >= rounds);
}
