//! Prints the time and memory of a reconcile pass over 1,000 ES256 keysets
//! on the file store (not a pass/fail test): `cargo bench --bench reconcile`.
//!
//! A pass is what the daemon does per keyset: reconcile (load, parse,
//! verify, plan, generate, compare-and-swap save) and render the JWKS. The
//! bootstrap pass generates and saves every keyset; a steady pass finds
//! nothing to do; a cold steady pass is the first after a restart (every
//! private key parsed and checked again). Each is set against its floor,
//! measured in the same round: generating the keys alone, and reading the
//! documents alone. Rounds alternate; each figure is the median of rounds.
//! Peak RSS is per phase (`VmHWM`, reset through `/proc/self/clear_refs`),
//! from the first round, where the phases run in the order printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyroll::clock::{Clock, SystemClock};
use keyroll::config::{Config, ConfigSource, KeysetPolicy, ParseContext};
use keyroll::key::{self, Alg, CryptoKeys};
use keyroll::publish;
use keyroll::reconcile::Reconciler;
use keyroll::store::{FileStore, Store};

const KEYSETS: usize = 1000;

fn config(dir: &std::path::Path, count: usize) -> Config {
    let mut text = format!("[store]\ntype = \"file\"\ndir = \"{}\"\n", dir.display());
    for n in 0..count {
        text.push_str(&format!(
            "[[keysets]]\nname = \"keyset-{n:04}\"\nalgorithms = [\"ES256\"]\n"
        ));
    }
    let context = ParseContext {
        state_directory: None,
        now: SystemClock.now(),
    };
    Config::parse(&text, ConfigSource::Embedded, &context).expect("a valid config")
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets the peak RSS to the current RSS (Linux ≥ 4.0).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs `phase`, returning its wall time and the peak RSS (KiB) during it.
fn measured<T>(phase: impl FnOnce() -> T) -> (Duration, u64, T) {
    reset_peak();
    let start = Instant::now();
    let value = phase();
    (start.elapsed(), status_kib("VmHWM:"), value)
}

/// One daemon-like pass: reconcile and render every keyset in turn.
fn pass(runtime: &tokio::runtime::Runtime, reconciler: &Reconciler, policies: &[KeysetPolicy]) {
    runtime.block_on(async {
        for policy in policies {
            let outcome = reconciler.reconcile(policy, None).await.expect("reconcile");
            let jwks = publish::render(
                &outcome.snapshot.doc,
                &outcome.snapshot.jwks,
                policy.x5c,
                policy.timings.jwks_cache_ttl.as_secs(),
            );
            std::hint::black_box(jwks);
        }
    });
}

fn reconciler(dir: &std::path::Path) -> Reconciler {
    Reconciler::new(
        Arc::new(FileStore::new(dir)),
        Arc::new(CryptoKeys),
        Arc::new(SystemClock),
    )
}

#[derive(Default)]
struct Phase {
    times: Vec<Duration>,
    peaks: Vec<u64>,
}

impl Phase {
    fn add(&mut self, (time, peak, _): (Duration, u64, ())) {
        self.times.push(time);
        self.peaks.push(peak);
    }

    /// The median time, and the first round's peak RSS (later rounds start
    /// with what the allocator kept from earlier ones).
    fn median(&self) -> (Duration, u64) {
        let mut times = self.times.clone();
        times.sort();
        (times[times.len() / 2], self.peaks[0])
    }
}

fn main() {
    // `cargo test --all-targets` also runs this file's main, without
    // `--bench`: measuring a debug build there would only waste CI time.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("reconcile: figures only under `cargo bench --bench reconcile`");
        return;
    }
    let rounds: usize = std::env::var("KEYROLL_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let baseline_kib = status_kib("VmRSS:");
    let now = SystemClock.now();
    let [mut keygen, mut bootstrap, mut steady, mut cold, mut loads]: [Phase; 5] =
        Default::default();
    for _ in 0..rounds {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let policies = config(dir.path(), KEYSETS).keysets;
        // The passes first: in the first round their peak RSS is their own.
        let warm = reconciler(dir.path());
        bootstrap.add(measured(|| pass(&runtime, &warm, &policies)));
        steady.add(measured(|| pass(&runtime, &warm, &policies)));
        let restarted = reconciler(dir.path());
        cold.add(measured(|| pass(&runtime, &restarted, &policies)));
        let store = FileStore::new(dir.path());
        loads.add(measured(|| {
            runtime.block_on(async {
                for policy in &policies {
                    std::hint::black_box(store.load(&policy.name).await.unwrap());
                }
            })
        }));
        keygen.add(measured(|| {
            // Bootstrap makes an active and a next key per keyset.
            for _ in 0..2 * KEYSETS {
                std::hint::black_box(key::generate(Alg::ES256, 2048, "bench", now).unwrap());
            }
        }));
    }

    println!(
        "reconcile pass over {KEYSETS} ES256 keysets, file store, median of {rounds} alternated rounds"
    );
    println!(
        "(process RSS before: {baseline_kib} KiB; peak RSS: the process's during the phase, first round)"
    );
    println!(
        "  {:<34} {:>10} {:>12} {:>14}",
        "phase, in the order run", "time", "peak RSS", "ratio to floor"
    );
    let keygen_time = keygen.median().0;
    let load_time = loads.median().0;
    let rows = [
        ("bootstrap pass (generate + save)", &bootstrap, keygen_time),
        ("steady pass (nothing to do)", &steady, load_time),
        ("cold steady pass (after restart)", &cold, load_time),
        ("floor: load 1,000 documents", &loads, load_time),
        ("floor: generate 2,000 ES256 keys", &keygen, keygen_time),
    ];
    for (label, phase, floor) in rows {
        let (time, peak) = phase.median();
        println!(
            "  {label:<34} {:>10.3?} {:>8} KiB {:>13.1}x",
            time,
            peak,
            time.as_secs_f64() / floor.as_secs_f64()
        );
    }
    println!(
        "  per keyset: bootstrap {:.3?}, steady {:.3?}, cold {:.3?}",
        bootstrap.median().0 / KEYSETS as u32,
        steady.median().0 / KEYSETS as u32,
        cold.median().0 / KEYSETS as u32
    );
}
