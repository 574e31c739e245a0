//! Shared test helpers: a fake clock, a fast fake key factory, policies.
//! Included by each integration test with `#[path = "support/mod.rs"] mod support;`.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::TimeZone;
use keyroll::clock::{Clock, Timestamp};
use keyroll::config::{Config, ConfigSource, KeysetPolicy, ParseContext};
use keyroll::key::{Alg, KeyError, KeyFactory, NewKey, PublicJwk, SecretPem};

/// Prefix of every fake private key: a JWKS that contains it leaks key material.
pub const FAKE_PEM_PREFIX: &str = "fake-private-";

/// Records that the running test cannot run here (`reason`: what is missing
/// and what provides it), so a skip is never mistaken for a pass.
///
/// The note goes to stderr and, when `scripts/test` set
/// `KEYROLL_TEST_SKIP_LOG`, to that file, which its summary counts as
/// skipped and lists. With `KEYROLL_TEST_REQUIRE_ALL=1` (set by
/// `scripts/test` once it has started the emulator and installed faketime,
/// so in CI) a skip fails the test instead: everything must run there.
pub fn skipped(reason: &str) {
    // "s3::objects_are_put_back": the test binary (its name less cargo's
    // hash) and the test, as libtest names the test's thread.
    let binary = std::env::args()
        .next()
        .and_then(|path| {
            let stem = std::path::Path::new(&path)
                .file_stem()?
                .to_str()?
                .to_string();
            Some(
                stem.rsplit_once('-')
                    .map_or(stem.clone(), |(name, _)| name.to_string()),
            )
        })
        .unwrap_or_default();
    let test = format!(
        "{binary}::{}",
        std::thread::current().name().unwrap_or("an unnamed test")
    );
    if std::env::var("KEYROLL_TEST_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{test} cannot run: {reason} (KEYROLL_TEST_REQUIRE_ALL=1 forbids skipping)");
    }
    eprintln!("skipped: {test}: {reason}");
    if let Some(log) = std::env::var_os("KEYROLL_TEST_SKIP_LOG") {
        use std::io::Write;
        let line = format!("{test}: {reason}\n");
        // O_APPEND: test threads and processes write whole lines.
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(e) = appended {
            panic!(
                "cannot record the skip in {}: {e}",
                std::path::Path::new(&log).display()
            );
        }
    }
}

/// A fixed, readable starting instant.
pub fn t0() -> Timestamp {
    chrono::Utc.with_ymd_and_hms(2030, 1, 7, 12, 0, 0).unwrap()
}

pub fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

pub fn dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap()
}

/// A clock the test moves by hand.
pub struct FakeClock(Mutex<Timestamp>);

impl FakeClock {
    pub fn new(at: Timestamp) -> Self {
        FakeClock(Mutex::new(at))
    }
    pub fn set(&self, at: Timestamp) {
        *self.0.lock().unwrap() = at;
    }
    pub fn advance(&self, by: chrono::Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap()
    }
}

/// Keys without cryptography: the "PEM" names the key's number, from which
/// `public_jwk` derives made-up public parameters; the kid is their RFC 7638
/// thumbprint, as for a real key (so a mismatched kid is caught like one).
#[derive(Default)]
pub struct FakeKeys {
    counter: AtomicU64,
}

impl FakeKeys {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn generated(&self) -> u64 {
        self.counter.load(Ordering::SeqCst)
    }
}

pub fn fake_pem(name: &str) -> String {
    format!("{FAKE_PEM_PREFIX}{name}")
}

fn fake_public(alg: Alg, name: &str) -> PublicJwk {
    match alg {
        Alg::ES256 => PublicJwk::ec(format!("x-{name}"), format!("y-{name}")),
        Alg::RS256 => PublicJwk::rsa(format!("n-{name}"), "AQAB".to_string()),
    }
}

impl KeyFactory for FakeKeys {
    fn generate(
        &self,
        alg: Alg,
        _bits: u32,
        _subject: &str,
        _created_at: Timestamp,
    ) -> Result<NewKey, KeyError> {
        let n = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
        let name = format!("k{n}-{alg}");
        Ok(NewKey {
            private_key_pem: SecretPem::new(zeroize::Zeroizing::new(fake_pem(&name))),
            kid: fake_public(alg, &name).kid,
            alg,
            // "fake-cert" in standard base64: a valid x5c entry.
            certificate: "ZmFrZS1jZXJ0".into(),
        })
    }

    fn public_jwk(&self, alg: Alg, pem: &SecretPem) -> Result<PublicJwk, KeyError> {
        let name = pem
            .expose()
            .strip_prefix(FAKE_PEM_PREFIX)
            .filter(|name| name.ends_with(&format!("-{alg}")))
            .ok_or(KeyError::Unparseable { alg })?;
        Ok(fake_public(alg, name))
    }

    fn generates_instantly(&self) -> bool {
        true
    }
}

/// Timing inputs of a keyset, written as in the config file.
#[derive(Clone, Debug)]
pub struct PolicyText {
    pub algorithms: &'static str,
    pub schedule: String,
    pub token_ttl: &'static str,
    pub jwks_cache_ttl: &'static str,
    /// `None`: the same as `jwks_cache_ttl` (verifiers that honour max-age).
    pub verifier_cache_ttl: Option<&'static str>,
    pub propagation: &'static str,
    pub clock_skew: &'static str,
}

impl Default for PolicyText {
    fn default() -> Self {
        PolicyText {
            algorithms: r#"["ES256", "RS256"]"#,
            schedule: r#"rotate_every = "1d""#.to_string(),
            token_ttl: "1h",
            jwks_cache_ttl: "5m",
            verifier_cache_ttl: None,
            propagation: "1m",
            clock_skew: "1m",
        }
    }
}

impl PolicyText {
    pub fn build(&self) -> KeysetPolicy {
        let text = format!(
            "[store]\ntype = \"file\"\ndir = \"/nonexistent\"\n\n[[keysets]]\nname = \"default\"\nalgorithms = {}\n{}\n\
             token_ttl = \"{}\"\njwks_cache_ttl = \"{}\"\nverifier_cache_ttl = \"{}\"\npropagation = \"{}\"\nclock_skew = \"{}\"\n",
            self.algorithms, self.schedule, self.token_ttl, self.jwks_cache_ttl, self.verifier_cache_ttl.unwrap_or(self.jwks_cache_ttl), self.propagation, self.clock_skew
        );
        let config = Config::parse(
            &text,
            ConfigSource::File("t.toml".into()),
            &ParseContext {
                state_directory: None,
                now: t0(),
            },
        )
        .unwrap_or_else(|e| panic!("test policy must be valid: {e}\n{text}"));
        config.keysets[0].clone()
    }
}

/// The default test policy: ES256 + RS256, rotate every day, token_ttl 1h,
/// jwks_cache_ttl 5m, propagation 1m, clock_skew 1m
/// (publish_lead 6m, retire_grace 1h2m).
pub fn policy() -> KeysetPolicy {
    PolicyText::default().build()
}

pub mod aws;
