//! Prints key-generation and rotation figures (not a pass/fail test):
//! `cargo bench --bench keygen`. Each figure is the median and p90 of N runs,
//! with ES256 generation as the in-run reference for the ratios.
//!
//! `--samples ALG BITS N` instead prints N raw timings, one per line, of
//! generating a private key and encoding it as PKCS#8 PEM — what
//! `openssl genpkey` does — so that `bench/run` can alternate it with
//! `openssl` rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyroll::clock::{Clock, SystemClock};
use keyroll::config::{Config, ConfigSource, ParseContext};
use keyroll::key::{self, Alg, CryptoKeys, PrivateKey};
use keyroll::planner::Action;
use keyroll::reconcile::Reconciler;
use keyroll::store::FileStore;

fn summary(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.9))
}

fn time<F: FnMut()>(runs: usize, mut f: F) -> (Duration, Duration) {
    summary(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

fn main() {
    // `cargo test --all-targets` also runs this file's main, without
    // `--bench`: measuring a debug build there would only waste CI time.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("keygen: figures only under `cargo bench --bench keygen`");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == "--samples") {
        let (alg, bits, runs) = match &args[at + 1..] {
            [alg, bits, runs, ..] => (alg, bits, runs),
            _ => panic!("usage: --samples ES256|RS256 BITS RUNS"),
        };
        let alg: Alg = alg.parse().expect("ES256 or RS256");
        let bits: u32 = bits.parse().expect("BITS is a number");
        for _ in 0..runs.parse::<usize>().expect("RUNS is a number") {
            let start = Instant::now();
            let key = PrivateKey::generate(alg, bits).unwrap();
            std::hint::black_box(key.to_pem().unwrap());
            println!("{:.6}", start.elapsed().as_secs_f64());
        }
        return;
    }
    let now = SystemClock.now();
    let (es_median, es_p90) = time(200, || {
        key::generate(Alg::ES256, 2048, "bench", now).unwrap();
    });
    println!("key generation (with its x5c certificate), median / p90 / ratio to ES256:");
    println!("  ES256          {es_median:>12.3?} {es_p90:>12.3?}      1.0x");
    for (bits, runs) in [(2048u32, 20usize), (3072, 10), (4096, 5)] {
        let (median, p90) = time(runs, || {
            key::generate(Alg::RS256, bits, "bench", now).unwrap();
        });
        let ratio = median.as_secs_f64() / es_median.as_secs_f64();
        println!("  RS256 {bits:>4}     {median:>12.3?} {p90:>12.3?} {ratio:>9.0}x  ({runs} runs)");
    }

    // One manual rotation (`rotate --now`) on the file store: load, plan,
    // generate the replacement next keys (ES256 + RS256-2048), CAS save.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[store]\ntype = \"file\"\ndir = \"{}\"\n[[keysets]]\nname = \"bench\"\n",
        dir.path().display()
    );
    let context = ParseContext {
        state_directory: None,
        now,
    };
    let config = Config::parse(&text, ConfigSource::Embedded, &context).unwrap();
    let policy = config.keysets[0].clone();
    let reconciler = Reconciler::new(
        Arc::new(FileStore::new(dir.path())),
        Arc::new(CryptoKeys),
        Arc::new(SystemClock),
    );
    runtime
        .block_on(reconciler.reconcile(&policy, None))
        .unwrap();
    let action = Action::Rotate {
        alg: None,
        force: true,
    };
    let (median, p90) = time(10, || {
        runtime
            .block_on(reconciler.reconcile(&policy, Some(&action)))
            .unwrap();
    });
    println!("rotation of both slots (rotate --now, file store, RSA 2048), median / p90:");
    println!("  {median:>12.3?} {p90:>12.3?}  (10 runs)");
}
