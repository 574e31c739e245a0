//! The signer (SPEC §4, "The signer"): keyroll signs tokens itself, so that
//! no application and no kube-apiserver holds a private key.
//!
//! A [`Keyring`] is one keyset's active keys parsed once into ring key pairs,
//! plus its published public keys, built from the same snapshot as the JWKS
//! and swapped with it (`Served::signing`). Requests only read the current
//! keyring: signing never waits on the store or on key generation.
//!
//! - [`socket`]: the sign API, HTTP/1.1 on a Unix socket;
//! - [`kube`]: the Kubernetes ExternalJWTSigner v1 gRPC service;
//! - `listen`: socket paths, checked like the other outputs, and bound.

pub mod client;
pub mod kube;
mod listen;
pub mod socket;

/// Code generated from `proto/externaljwt/v1/api.proto` (build.rs).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("v1");
}

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::clock::{Clock, Timestamp};
use crate::config::{Config, KeysetPolicy};
use crate::document::{KeyState, KeysetDoc};
use crate::key::{Alg, PublicJwk, SecretPem};
use crate::metrics::Metrics;
use crate::publish::ServedState;

pub use listen::check_socket_paths;

/// A request body larger than this is refused with 413.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("[signer] {key}: {path}: {source}")]
    Socket {
        key: &'static str,
        path: String,
        #[source]
        source: listen::SocketError,
    },
    #[error("the active {alg} key of keyset {keyset:?} cannot be loaded for signing ({why})")]
    Key {
        keyset: String,
        alg: Alg,
        why: KeyLoadFailure,
    },
}

/// Why a stored key cannot become a ring key pair; never the key's bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadFailure {
    #[error("not a PKCS#8 PEM key")]
    NotPem,
    /// ring's reason is one of its fixed words ("InvalidEncoding", …).
    #[error("{0}")]
    Rejected(ring::error::KeyRejected),
}

/// Why a sign request was not signed. Its status (HTTP or gRPC) and its
/// metric label follow from the variant; its text never quotes the claims.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no keyset {0:?}")]
    UnknownKeyset(String),
    #[error("keyset {keyset:?} has no algorithm {alg:?} (it has {configured})")]
    UnknownAlg {
        keyset: String,
        alg: String,
        configured: String,
    },
    #[error("not found: the sign API is POST /v1/keysets/<name>/sign")]
    NotFound,
    #[error("method not allowed: use POST")]
    Method,
    #[error("the request body is larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("the request body did not arrive in time")]
    Slow,
    #[error("the request is not {{\"claims\": {{...}}, \"alg\": \"ES256\"}}: {0}")]
    BadRequest(String),
    #[error("claims must be a JSON object")]
    ClaimsNotObject,
    #[error("claim {claim}: {why}")]
    BadClaim { claim: &'static str, why: String },
    #[error(
        "claim exp: exp - iat is {lifetime}s, longer than this keyset's token_ttl ({token_ttl}s)"
    )]
    ExpTooLong { lifetime: i64, token_ttl: u64 },
    #[error("claim iat: {iat} is {off}s from now, more than clock_skew ({skew}s)")]
    IatSkewed { iat: i64, off: i64, skew: u64 },
    #[error("keyset {0:?} has not been loaded yet; try again shortly")]
    NotLoaded(String),
    #[error("keyset {keyset:?} has no active {alg} key yet")]
    NoActiveKey { keyset: String, alg: Alg },
    #[error("signing is withheld: {0}")]
    Withheld(String),
}

impl Refusal {
    /// The `reason` label of `keyroll_sign_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::UnknownKeyset(_) => "unknown_keyset",
            Refusal::UnknownAlg { .. } => "unknown_alg",
            Refusal::NotFound => "not_found",
            Refusal::Method => "method",
            Refusal::TooLarge => "too_large",
            Refusal::Slow => "slow_request",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::ClaimsNotObject => "claims_not_object",
            Refusal::BadClaim { .. } => "bad_claim",
            Refusal::ExpTooLong { .. } => "exp_too_long",
            Refusal::IatSkewed { .. } => "iat_skewed",
            Refusal::NotLoaded(_) => "not_loaded",
            Refusal::NoActiveKey { .. } => "no_active_key",
            Refusal::Withheld(_) => "withheld",
        }
    }

    /// The HTTP status of the sign API (SPEC §4).
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::UnknownKeyset(_) | Refusal::UnknownAlg { .. } | Refusal::NotFound => 404,
            Refusal::Method => 405,
            Refusal::TooLarge => 413,
            Refusal::Slow => 408,
            Refusal::BadRequest(_)
            | Refusal::ClaimsNotObject
            | Refusal::BadClaim { .. }
            | Refusal::ExpTooLong { .. }
            | Refusal::IatSkewed { .. } => 400,
            Refusal::NotLoaded(_) | Refusal::NoActiveKey { .. } | Refusal::Withheld(_) => 503,
        }
    }
}

/// How long tokens may live, and the leeway on `iat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub token_ttl: Duration,
    pub clock_skew: Duration,
    /// `refresh_hint_seconds` of FetchKeys: the JWKS `max-age`.
    pub jwks_cache_ttl: Duration,
}

impl Limits {
    pub fn of(policy: &KeysetPolicy) -> Self {
        Limits {
            token_ttl: policy.timings.token_ttl,
            clock_skew: policy.timings.clock_skew,
            jwks_cache_ttl: policy.timings.jwks_cache_ttl,
        }
    }
}

enum Pair {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// One slot's active key, parsed, with its JWS header already encoded.
struct SigningKey {
    alg: Alg,
    kid: String,
    /// base64url of `{"alg","kid","typ":"JWT"}`: the token's first segment.
    header: String,
    pair: Pair,
}

impl SigningKey {
    fn parse(keyset: &str, alg: Alg, kid: &str, pem: &SecretPem) -> Result<Self, SignerError> {
        let fail = |why| SignerError::Key {
            keyset: keyset.to_string(),
            alg,
            why,
        };
        // SecretDocument zeroizes the DER when dropped; ring keeps its own
        // form of the key for as long as the keyring lives.
        let (_, der) = pkcs8::SecretDocument::from_pem(pem.expose())
            .map_err(|_| fail(KeyLoadFailure::NotPem))?;
        let pair = match alg {
            Alg::ES256 => EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                der.as_bytes(),
                &SystemRandom::new(),
            )
            .map(Pair::Ec)
            .map_err(|e| fail(KeyLoadFailure::Rejected(e)))?,
            Alg::RS256 => RsaKeyPair::from_pkcs8(der.as_bytes())
                .map(Pair::Rsa)
                .map_err(|e| fail(KeyLoadFailure::Rejected(e)))?,
        };
        Ok(SigningKey {
            alg,
            kid: kid.to_string(),
            header: encode_header(alg, kid),
            pair,
        })
    }

    /// The signature over `input`: 64-byte R‖S for ES256, PKCS#1 v1.5 for RS256.
    fn sign(&self, rng: &SystemRandom, input: &[u8]) -> Vec<u8> {
        match &self.pair {
            // ring fails only if the system RNG fails, which it treats as
            // fatal everywhere else too.
            Pair::Ec(pair) => pair
                .sign(rng, input)
                .expect("ECDSA signing fails only without a system RNG")
                .as_ref()
                .to_vec(),
            Pair::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, rng, input, &mut signature)
                    .expect("RSA signing fails only without a system RNG or with a short buffer");
                signature
            }
        }
    }
}

/// `{"alg":…,"kid":…,"typ":"JWT"}` in that order, base64url without padding.
fn encode_header(alg: Alg, kid: &str) -> String {
    let header = serde_json::json!({"alg": alg.as_str(), "kid": kid, "typ": "JWT"});
    // serde_json keeps maps sorted by key: alg, kid, typ.
    URL_SAFE_NO_PAD.encode(header.to_string())
}

/// A published public key, as FetchKeys gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedKey {
    pub kid: String,
    pub alg: Alg,
    /// SubjectPublicKeyInfo, DER.
    pub der: Vec<u8>,
}

fn spki_der(jwk: &PublicJwk) -> Option<Vec<u8>> {
    use pkcs8::EncodePublicKey;
    let decode = |value: &Option<String>| URL_SAFE_NO_PAD.decode(value.as_ref()?).ok();
    match jwk.alg {
        Alg::ES256 => {
            let point = [&[0x04][..], &decode(&jwk.x)?, &decode(&jwk.y)?].concat();
            let key = p256::PublicKey::from_sec1_bytes(&point).ok()?;
            Some(key.to_public_key_der().ok()?.into_vec())
        }
        Alg::RS256 => rsa_spki_der(decode(&jwk.n)?, decode(&jwk.e)?),
    }
}

/// RSA public keys are offered if AWS-LC finds (n, e) well formed (no
/// leading zero bytes, n odd, e odd, 3 ≤ e < 2^33) and n has at most 4096
/// bits: the limit keyroll always had, and ring's for signing.
fn rsa_spki_der(n: Vec<u8>, e: Vec<u8>) -> Option<Vec<u8>> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{PublicKey, PublicKeyComponents};
    if n.len() > 4096 / 8 {
        return None;
    }
    let der = PublicKeyComponents { n, e }.as_der().ok()?;
    // Encoding checks nothing; parsing runs AWS-LC's RSA_check_key.
    PublicKey::from_der(der.as_ref()).ok()?;
    Some(der.as_ref().to_vec())
}

/// What a keyring was built from; an equal one is reused, not re-parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Identity {
    keys: Vec<(String, KeyState)>,
    algorithms: Vec<Alg>,
    limits: Limits,
}

/// A token the sign API made.
#[derive(Debug)]
pub struct Signed {
    pub token: String,
    pub kid: String,
    pub alg: Alg,
    /// `exp`, seconds since 1970.
    pub expires_at: i64,
}

/// One keyset's signing keys and published keys, from one snapshot.
pub struct Keyring {
    keyset: String,
    /// Why nothing is signed or fetched (C1, C5), when that is so.
    withheld: Option<String>,
    /// The keyset's algorithms; the first is the default of a request.
    algorithms: Vec<Alg>,
    signing: Vec<SigningKey>,
    published: Vec<PublishedKey>,
    limits: Option<Limits>,
    identity: Option<Identity>,
    /// When the keys were last loaded from the store (FetchKeys'
    /// `data_timestamp`), seconds since 1970.
    loaded_at: AtomicI64,
    rng: SystemRandom,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self.signing.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("Keyring")
            .field("keyset", &self.keyset)
            .field("withheld", &self.withheld)
            .field("signing_kids", &kids)
            .field("published", &self.published.len())
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Parses the active keys of `doc` (the slots of `policy`) and the public
    /// keys of `jwks`. `default_alg` goes first among the algorithms.
    pub fn new(
        policy: &KeysetPolicy,
        default_alg: Option<Alg>,
        doc: &KeysetDoc,
        jwks: &[PublicJwk],
        loaded_at: Timestamp,
    ) -> Result<Keyring, SignerError> {
        let algorithms = ordered(policy, default_alg);
        let mut signing = Vec::new();
        for alg in &algorithms {
            if let Some(key) = doc.key(*alg, KeyState::Active) {
                signing.push(SigningKey::parse(
                    &policy.name,
                    *alg,
                    &key.kid,
                    &key.private_key_pem,
                )?);
            }
        }
        let published = jwks
            .iter()
            .filter_map(|jwk| {
                Some(PublishedKey {
                    kid: jwk.kid.clone(),
                    alg: jwk.alg,
                    der: spki_der(jwk)?,
                })
            })
            .collect();
        Ok(Keyring {
            keyset: policy.name.clone(),
            withheld: None,
            identity: Some(identity(policy, &algorithms, doc)),
            algorithms,
            signing,
            published,
            limits: Some(Limits::of(policy)),
            loaded_at: AtomicI64::new(loaded_at.timestamp()),
            rng: SystemRandom::new(),
        })
    }

    /// A keyring that signs nothing and fetches nothing, saying why: a
    /// keyset removed from the config (C1) or a replica failed closed (C5).
    /// The sign API answers 503 with `reason`; Sign and FetchKeys UNAVAILABLE.
    pub fn withheld(reason: String) -> Keyring {
        Keyring {
            keyset: String::new(),
            withheld: Some(reason),
            algorithms: Vec::new(),
            signing: Vec::new(),
            published: Vec::new(),
            limits: None,
            identity: None,
            loaded_at: AtomicI64::new(0),
            rng: SystemRandom::new(),
        }
    }

    /// The keyring for `snapshot`'s keys: `previous` itself when it was built
    /// from the same keys and settings (only its load time moves), else a
    /// new one. A key that does not parse withholds signing and says why.
    pub fn refresh(
        previous: Option<&Arc<Keyring>>,
        policy: &KeysetPolicy,
        default_alg: Option<Alg>,
        doc: &KeysetDoc,
        jwks: &[PublicJwk],
        loaded_at: Timestamp,
    ) -> Arc<Keyring> {
        let algorithms = ordered(policy, default_alg);
        if let Some(previous) = previous {
            if previous.identity.as_ref() == Some(&identity(policy, &algorithms, doc)) {
                previous
                    .loaded_at
                    .store(loaded_at.timestamp(), Ordering::Relaxed);
                return previous.clone();
            }
        }
        match Keyring::new(policy, default_alg, doc, jwks, loaded_at) {
            Ok(keyring) => Arc::new(keyring),
            Err(error) => {
                tracing::error!(keyset = %policy.name, %error, "the signer withholds this keyset");
                Arc::new(Keyring::withheld(error.to_string()))
            }
        }
    }

    pub fn keyset(&self) -> &str {
        &self.keyset
    }

    /// Why signing is withheld, if it is.
    pub fn withheld_reason(&self) -> Option<&str> {
        self.withheld.as_deref()
    }

    pub fn limits(&self) -> Option<Limits> {
        self.limits
    }

    /// Every published key (next, active, retired).
    pub fn published(&self) -> &[PublishedKey] {
        &self.published
    }

    pub fn loaded_at(&self) -> i64 {
        self.loaded_at.load(Ordering::Relaxed)
    }

    /// The store confirmed at `at` that these keys are still current
    /// without a load (its watch reported no change).
    pub fn confirmed(&self, at: Timestamp) {
        self.loaded_at.store(at.timestamp(), Ordering::Relaxed);
    }

    /// The active kid of `alg`, if any.
    pub fn active_kid(&self, alg: Alg) -> Option<&str> {
        self.signing
            .iter()
            .find(|k| k.alg == alg)
            .map(|k| k.kid.as_str())
    }

    /// The key that signs for `alg` (`None`: the keyset's default).
    fn key(&self, alg: Option<&str>) -> Result<&SigningKey, Refusal> {
        if let Some(reason) = &self.withheld {
            return Err(Refusal::Withheld(reason.clone()));
        }
        let alg = match alg {
            None => *self
                .algorithms
                .first()
                .ok_or_else(|| Refusal::NotLoaded(self.keyset.clone()))?,
            Some(name) => self
                .algorithms
                .iter()
                .copied()
                .find(|alg| alg.as_str() == name)
                .ok_or_else(|| Refusal::UnknownAlg {
                    keyset: self.keyset.clone(),
                    alg: name.to_string(),
                    configured: self
                        .algorithms
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?,
        };
        self.signing
            .iter()
            .find(|k| k.alg == alg)
            .ok_or_else(|| Refusal::NoActiveKey {
                keyset: self.keyset.clone(),
                alg,
            })
    }

    fn limits_or_withheld(&self) -> Result<Limits, Refusal> {
        self.limits.ok_or_else(|| {
            Refusal::Withheld(self.withheld.clone().unwrap_or_else(|| "no keys".into()))
        })
    }

    /// The sign API: `iat` defaults to `now`, `exp` to `iat + token_ttl`;
    /// the claims are checked, serialized and signed with the active key.
    pub fn sign_claims(
        &self,
        alg: Option<&str>,
        claims: Value,
        now: i64,
    ) -> Result<Signed, Refusal> {
        let key = self.key(alg)?;
        let limits = self.limits_or_withheld()?;
        let Value::Object(mut claims) = claims else {
            return Err(Refusal::ClaimsNotObject);
        };
        let expires_at = check_claims(&mut claims, now, limits, Defaults::Fill)?;
        let payload = URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string());
        let input = format!("{}.{payload}", key.header);
        let signature = URL_SAFE_NO_PAD.encode(key.sign(&self.rng, input.as_bytes()));
        Ok(Signed {
            token: format!("{input}.{signature}"),
            kid: key.kid.clone(),
            alg: key.alg,
            expires_at,
        })
    }

    /// Kubernetes' Sign: `claims` is the token's second segment as the API
    /// server made it, signed as received. Returns (header, signature).
    pub fn sign_encoded(
        &self,
        alg: Alg,
        claims: &str,
        now: i64,
    ) -> Result<(String, String), Refusal> {
        let key = self.key(Some(alg.as_str()))?;
        let limits = self.limits_or_withheld()?;
        let decoded = URL_SAFE_NO_PAD
            .decode(claims)
            .map_err(|_| Refusal::BadClaim {
                claim: "claims",
                why: "not unpadded base64url".into(),
            })?;
        let Ok(Value::Object(mut parsed)) = serde_json::from_slice::<Value>(&decoded) else {
            return Err(Refusal::ClaimsNotObject);
        };
        check_claims(&mut parsed, now, limits, Defaults::Require)?;
        let input = format!("{}.{claims}", key.header);
        let signature = URL_SAFE_NO_PAD.encode(key.sign(&self.rng, input.as_bytes()));
        Ok((key.header.clone(), signature))
    }
}

/// The keyset's algorithms with `default_alg` first.
fn ordered(policy: &KeysetPolicy, default_alg: Option<Alg>) -> Vec<Alg> {
    let mut algorithms = policy.algorithms.clone();
    if let Some(first) = default_alg.filter(|alg| algorithms.contains(alg)) {
        algorithms.retain(|alg| *alg != first);
        algorithms.insert(0, first);
    }
    algorithms
}

fn identity(policy: &KeysetPolicy, algorithms: &[Alg], doc: &KeysetDoc) -> Identity {
    Identity {
        keys: doc.keys.iter().map(|k| (k.kid.clone(), k.state)).collect(),
        algorithms: algorithms.to_vec(),
        limits: Limits::of(policy),
    }
}

/// Whether missing `iat`/`exp` are filled in (sign API) or refused
/// (Kubernetes, whose API server always sets them).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Defaults {
    Fill,
    Require,
}

fn numeric(claims: &Map<String, Value>, claim: &'static str) -> Result<Option<i64>, Refusal> {
    match claims.get(claim) {
        None => Ok(None),
        Some(value) => value
            .as_f64()
            .filter(|v| v.is_finite() && v.abs() < 1e15)
            // A fractional NumericDate counts by its whole seconds, rounded
            // up for exp so a token is never allowed longer than checked.
            .map(|v| {
                Some(if claim == "exp" {
                    v.ceil() as i64
                } else {
                    v.floor() as i64
                })
            })
            .ok_or(Refusal::BadClaim {
                claim,
                why: "must be a number (seconds since 1970)".into(),
            }),
    }
}

/// Holds a token to `token_ttl` and its `iat` to `clock_skew` of now; returns
/// `exp`. Never quotes the claims beyond the two numbers it checks.
fn check_claims(
    claims: &mut Map<String, Value>,
    now: i64,
    limits: Limits,
    defaults: Defaults,
) -> Result<i64, Refusal> {
    let ttl = limits.token_ttl.as_secs() as i64;
    let skew = limits.clock_skew.as_secs() as i64;
    let missing = |claim: &'static str| Refusal::BadClaim {
        claim,
        why: "is required".into(),
    };
    let iat = match numeric(claims, "iat")? {
        Some(iat) => iat,
        None if defaults == Defaults::Fill => {
            claims.insert("iat".into(), now.into());
            now
        }
        None => return Err(missing("iat")),
    };
    if (iat - now).abs() > skew {
        return Err(Refusal::IatSkewed {
            iat,
            off: iat - now,
            skew: skew as u64,
        });
    }
    let exp = match numeric(claims, "exp")? {
        Some(exp) => exp,
        None if defaults == Defaults::Fill => {
            claims.insert("exp".into(), (iat + ttl).into());
            iat + ttl
        }
        None => return Err(missing("exp")),
    };
    if exp <= iat {
        return Err(Refusal::BadClaim {
            claim: "exp",
            why: "must be after iat".into(),
        });
    }
    if exp - iat > ttl {
        return Err(Refusal::ExpTooLong {
            lifetime: exp - iat,
            token_ttl: ttl as u64,
        });
    }
    Ok(exp)
}

/// The keyring a publish swaps in with the JWKS, or `None` without a
/// `[signer]` table (then nothing is parsed at all).
pub fn keyring_for(
    config: &Config,
    policy: &KeysetPolicy,
    previous: Option<&Arc<Keyring>>,
    doc: &KeysetDoc,
    jwks: &[PublicJwk],
    loaded_at: Timestamp,
) -> Option<Arc<Keyring>> {
    let signer = config.signer.as_ref()?;
    Some(Keyring::refresh(
        previous,
        policy,
        signer.default_alg(policy),
        doc,
        jwks,
        loaded_at,
    ))
}

/// What both servers share: the served snapshot, metrics, the clock, and
/// the rate limit of refusal logs.
pub(crate) struct Shared {
    pub served: ServedState,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    refusals: RefusalLog,
}

impl Shared {
    fn now(&self) -> i64 {
        self.clock.now().timestamp()
    }

    /// Counts a refusal and logs it, at most once a minute per reason.
    pub(crate) fn refused(&self, keyset: &str, refusal: &Refusal, peer: Peer) {
        self.metrics.sign_refused(keyset, refusal.reason());
        if self.refusals.should_log(refusal.reason()) {
            tracing::warn!(
                keyset,
                reason = refusal.reason(),
                peer_uid = peer.uid,
                peer_pid = peer.pid,
                error = %refusal,
                "sign request refused (logged once a minute per reason)"
            );
        }
    }
}

/// The process at the other end of a Unix socket (SO_PEERCRED).
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl Peer {
    pub(crate) fn of(stream: &tokio::net::UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => Peer {
                uid: Some(cred.uid()),
                pid: cred.pid(),
            },
            Err(_) => Peer::default(),
        }
    }
}

/// Refusals are logged once per reason per minute: a misbehaving client
/// must not flood the log, and the metric counts every one.
struct RefusalLog {
    last: Mutex<HashMap<&'static str, Instant>>,
}

const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

impl RefusalLog {
    fn should_log(&self, reason: &'static str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match last.get(reason) {
            Some(at) if now.duration_since(*at) < REFUSAL_LOG_EVERY => false,
            _ => {
                last.insert(reason, now);
                true
            }
        }
    }
}

/// Binds the configured sockets and serves them until `stopped` turns
/// true. Returns the servers' tasks; each removes its socket file when done.
pub async fn start(
    config: &Config,
    served: ServedState,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    stopped: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, SignerError> {
    let Some(settings) = &config.signer else {
        return Ok(Vec::new());
    };
    let shared = Arc::new(Shared {
        served,
        metrics,
        clock,
        refusals: RefusalLog {
            last: Mutex::new(HashMap::new()),
        },
    });
    let mut tasks = Vec::new();
    if let Some(path) = &settings.socket {
        let (listener, file) = listen::bind(path, settings.socket_mode, "socket")?;
        tracing::info!(socket = %path.display(), "sign API listening");
        let server = socket::serve(listener, shared.clone(), shutdown(stopped.clone()));
        tasks.push(tokio::spawn(async move {
            server.await;
            drop(file);
        }));
    }
    if let Some(kubernetes) = &settings.kubernetes {
        let (listener, file) = listen::bind(
            &kubernetes.socket,
            settings.socket_mode,
            "kubernetes_socket",
        )?;
        let token_ttl = config
            .keyset(&kubernetes.keyset)
            .map(|k| k.timings.token_ttl)
            .unwrap_or_default();
        tracing::info!(
            socket = %kubernetes.socket.display(),
            keyset = %kubernetes.keyset,
            alg = %kubernetes.alg,
            "Kubernetes external signer listening"
        );
        let signer = kube::KubeSigner::new(shared.clone(), kubernetes, token_ttl);
        let server = kube::serve(listener, signer, shutdown(stopped));
        tasks.push(tokio::spawn(async move {
            server.await;
            drop(file);
        }));
    }
    Ok(tasks)
}

/// Whether a reloaded config binds other sockets (or serves another
/// Kubernetes slot) than the running servers: that takes a restart.
pub fn needs_restart(running: &Config, reloaded: &Config) -> bool {
    let bound = |config: &Config| {
        config.signer.as_ref().map(|signer| {
            (
                signer.socket.clone(),
                signer.socket_mode,
                signer.kubernetes.clone(),
            )
        })
    };
    bound(running) != bound(reloaded)
}

async fn shutdown(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests;
