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
