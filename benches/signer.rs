//! Prints the signer's figures (not a pass/fail test): `cargo bench --bench
//! signer`. Starts the real `keyroll run` with a sign API socket, then:
//!
//! - ES256 and RS256 tokens per second over the socket with 1, 16 and 64
//!   concurrent clients (each a kept-alive HTTP/1.1 connection), with p50
//!   and p99 latency, against the in-process limit: the same keyring call
//!   (claims check, encoding, ring signature) in a loop on one thread,
//!   measured in the same run;
//! - ES256 p99 at 16 clients while the daemon generates RSA-4096 keys (a
//!   keyset added by SIGHUP), against the same load with no generation.
//!
//! The load generator runs on the same machine as the daemon and takes its
//! share of the CPUs: read the figures as ratios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use keyroll::clock::{Clock, SystemClock};
use keyroll::config::{Config, ConfigSource, ParseContext};
use keyroll::document::KeysetDoc;
use keyroll::key::CryptoKeys;
use keyroll::signer::Keyring;

const MEASURE: Duration = Duration::from_secs(3);

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config_text(dir: &Path, port: u16, big: bool) -> String {
    let mut text = format!(
        "reconcile_interval = \"1s\"\nstate_dir = '{dir}/state'\n[store]\ntype = \"file\"\ndir = '{dir}/store'\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
         [[keysets]]\nname = \"default\"\nalgorithms = [\"ES256\", \"RS256\"]\nrotate_every = \"7d\"\ntoken_ttl = \"1h\"\n",
        dir = dir.display()
    );
    if big {
        text.push_str("[[keysets]]\nname = \"big\"\nalgorithms = [\"RS256\"]\nrsa_bits = 4096\n");
    }
    text.push_str(&format!(
        "[signer]\nsocket = '{}/sign.sock'\n",
        dir.display()
    ));
    text
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

struct Load {
    tokens_per_second: f64,
    p50: Duration,
    p99: Duration,
}

/// `clients` connections signing `alg` tokens back to back until `until`.
async fn load(
    socket: &Path,
    alg: &str,
    clients: usize,
    until: impl Fn() -> bool + Clone + Send + 'static,
) -> Load {
    let body = Bytes::from(format!(
        "{{\"claims\":{{\"sub\":\"bench\"}},\"alg\":\"{alg}\"}}"
    ));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (socket, body, until) = (socket.to_path_buf(), body.clone(), until.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::UnixStream::connect(&socket)
                .await
                .expect("connect");
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            while !until() {
                let request = hyper::Request::post("/v1/keysets/default/sign")
                    .header("host", "keyroll")
                    .body(Full::new(body.clone()))
                    .unwrap();
                let sent = Instant::now();
                sender.ready().await.expect("connection ready");
                let response = sender.send_request(request).await.expect("a response");
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.expect("a body");
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Load {
        tokens_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    }
}

fn for_a_while() -> impl Fn() -> bool + Clone + Send + 'static {
    let end = Instant::now() + MEASURE;
    move || Instant::now() >= end
}

/// Tokens per second of the keyring call alone, on this thread.
fn in_process(keyring: &Keyring, alg: &str) -> f64 {
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < MEASURE {
        let now = SystemClock.now().timestamp();
        let signed = keyring
            .sign_claims(Some(alg), serde_json::json!({"sub": "bench"}), now)
            .expect("signs");
        std::hint::black_box(signed);
        count += 1;
    }
    count as f64 / started.elapsed().as_secs_f64()
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n"
    );
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

fn main() {
    // `cargo test --all-targets` also runs this file's main, without
    // `--bench`: measuring a debug build there would only waste CI time.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("signer: figures only under `cargo bench --bench signer`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config_path: PathBuf = dir.path().join("keyroll.toml");
    std::fs::write(&config_path, config_text(dir.path(), port, false)).unwrap();
    let socket = dir.path().join("sign.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_keyroll"))
        .arg("--config")
        .arg(&config_path)
        .arg("--log-level")
        .arg("warn")
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keyroll run");
    let daemon = Daemon(child);
    wait_for("/readyz", || http_ok(port, "/readyz"));

    // The in-process reference: the stored keys, parsed as the daemon does.
    let context = ParseContext::from_env(SystemClock.now());
    let config = Config::parse(
        &std::fs::read_to_string(&config_path).unwrap(),
        ConfigSource::Embedded,
        &context,
    )
    .unwrap();
    let policy = &config.keysets[0];
    let text = std::fs::read_to_string(dir.path().join("store/default.json")).unwrap();
    let doc = KeysetDoc::parse(&text, "default", "bench").unwrap();
    let jwks = doc.public_jwks(&CryptoKeys, "bench").unwrap();
    let keyring = Keyring::new(policy, None, &doc, &jwks, SystemClock.now()).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "signer: keyroll run on a Unix socket; {} CPUs; {MEASURE:?} per figure",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<6} {:>8} {:>12} {:>10} {:>10} {:>12} {:>8}",
        "alg", "clients", "tokens/s", "p50", "p99", "in-process", "ratio"
    );
    for alg in ["ES256", "RS256"] {
        for clients in [1, 16, 64] {
            let limit = in_process(&keyring, alg);
            let measured = runtime.block_on(load(&socket, alg, clients, for_a_while()));
            println!(
                "{alg:<6} {clients:>8} {:>12.0} {:>10.2?} {:>10.2?} {:>12.0} {:>7.2}x",
                measured.tokens_per_second,
                measured.p50,
                measured.p99,
                limit,
                measured.tokens_per_second / limit
            );
        }
    }

    // ES256 p99 while RSA-4096 keys are generated, against the same load
    // with nothing generated, alternated.
    println!("\nES256, 16 clients: idle vs while the daemon generates RSA-4096 keys");
    println!(
        "{:<11} {:>10} {:>10} {:>12}",
        "round", "p50", "p99", "tokens/s"
    );
    for round in 0..2 {
        let idle = runtime.block_on(load(&socket, "ES256", 16, for_a_while()));
        println!(
            "{:<11} {:>10.2?} {:>10.2?} {:>12.0}",
            format!("idle {}", round + 1),
            idle.p50,
            idle.p99,
            idle.tokens_per_second
        );
        // A new keyset by SIGHUP: the daemon generates its RSA-4096 active
        // and next keys while the load runs, until its JWKS is served.
        let name = format!("big{round}");
        let text = config_text(dir.path(), port, true)
            .replace("name = \"big\"", &format!("name = \"{name}\""));
        std::fs::write(&config_path, text).unwrap();
        let pid = daemon.0.id().to_string();
        let sent = Instant::now();
        Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        // Watched from a thread of its own: the clients only read a flag.
        let path = format!("/keysets/{name}/jwks.json");
        let served = Arc::new(AtomicBool::new(false));
        let watcher = {
            let served = served.clone();
            std::thread::spawn(move || {
                wait_for("the RSA-4096 keyset", || http_ok(port, &path));
                served.store(true, Ordering::Relaxed);
            })
        };
        let until = move || served.load(Ordering::Relaxed);
        let busy = runtime.block_on(load(&socket, "ES256", 16, until));
        println!(
            "{:<11} {:>10.2?} {:>10.2?} {:>12.0}   (keys served {:.1?} after SIGHUP; p99 {:.2}x idle)",
            format!("keygen {}", round + 1),
            busy.p50,
            busy.p99,
            busy.tokens_per_second,
            sent.elapsed(),
            busy.p99.as_secs_f64() / idle.p99.as_secs_f64()
        );
        watcher.join().expect("the watcher thread");
    }
    drop(daemon);
}
