//! Signing keys: generation (RS256, ES256), parsing of stored PKCS#8 PEM, the
//! public and private JWK forms, and the RFC 7638 thumbprint used as `kid`.
//!
//! keyroll never signs or decrypts with the `rsa` crate (RUSTSEC-2023-0071):
//! it only generates RSA keys and reads their public and CRT parameters. The
//! one signature keyroll makes, the self-signed x5c certificate, is made by
//! rcgen on top of ring.

mod jwk;
mod x5c;

use std::fmt;

use rand::rngs::OsRng;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::clock::Timestamp;
pub use jwk::{thumbprint, PrivateJwk, PublicJwk};

/// RSA modulus sizes keyroll accepts; fewer than 2048 bits is refused.
pub const RSA_BITS_ALLOWED: [u32; 3] = [2048, 3072, 4096];

/// A JWS algorithm keyroll can manage: each one is a slot of a keyset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Alg {
    ES256,
    RS256,
}

impl Alg {
    pub const ALL: [Alg; 2] = [Alg::ES256, Alg::RS256];

    pub fn as_str(self) -> &'static str {
        match self {
            Alg::ES256 => "ES256",
            Alg::RS256 => "RS256",
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Alg {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Alg::ALL
            .into_iter()
            .find(|alg| alg.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| KeyError::UnknownAlg(s.to_string()))
    }
}

/// PKCS#8 PEM of a private key. Zeroized on drop; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretPem(Zeroizing<String>);

impl SecretPem {
    pub fn new(pem: Zeroizing<String>) -> Self {
        SecretPem(pem)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem([redacted])")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unknown algorithm {0:?} (supported: ES256, RS256)")]
    UnknownAlg(String),
    #[error("RSA keys must have 2048, 3072 or 4096 bits; {0} is not allowed")]
    RsaBits(u32),
    // The underlying parser errors are deliberately not carried: some of them
    // quote the input, and the input here is private key material.
    #[error("the stored private key is not a valid {alg} PKCS#8 PEM key")]
    Unparseable { alg: Alg },
    #[error("{alg} key generation failed")]
    Generation { alg: Alg },
    #[error("x5c certificate: {0}")]
    Certificate(rcgen::Error),
    #[error("x5c certificate: the creation time is out of range: {0}")]
    CertificateStart(time::error::ComponentRange),
}

/// A freshly generated key, ready to be stored.
pub struct NewKey {
    pub kid: String,
    pub alg: Alg,
    pub private_key_pem: SecretPem,
    /// The self-signed certificate, DER, base64 (standard alphabet, as x5c wants).
    pub certificate: String,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A private key parsed from its stored PEM. `Debug` is redacted.
pub enum PrivateKey {
    Rsa(Box<rsa::RsaPrivateKey>),
    Ec(p256::SecretKey),
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, [redacted])", self.alg())
    }
}

impl PrivateKey {
    pub fn generate(alg: Alg, rsa_bits: u32) -> Result<Self, KeyError> {
        match alg {
            Alg::RS256 => {
                if !RSA_BITS_ALLOWED.contains(&rsa_bits) {
                    return Err(KeyError::RsaBits(rsa_bits));
                }
                let key = rsa::RsaPrivateKey::new(&mut OsRng, rsa_bits as usize)
                    .map_err(|_| KeyError::Generation { alg })?;
                Ok(PrivateKey::Rsa(Box::new(key)))
            }
            Alg::ES256 => Ok(PrivateKey::Ec(p256::SecretKey::random(&mut OsRng))),
        }
    }

    pub fn from_pem(alg: Alg, pem: &SecretPem) -> Result<Self, KeyError> {
        let unparseable = |_| KeyError::Unparseable { alg };
        match alg {
            Alg::RS256 => rsa::RsaPrivateKey::from_pkcs8_pem(pem.expose())
                .map(|key| PrivateKey::Rsa(Box::new(key)))
                .map_err(unparseable),
            Alg::ES256 => p256::SecretKey::from_pkcs8_pem(pem.expose())
                .map(PrivateKey::Ec)
                .map_err(unparseable),
        }
    }

    pub fn alg(&self) -> Alg {
        match self {
            PrivateKey::Rsa(_) => Alg::RS256,
            PrivateKey::Ec(_) => Alg::ES256,
        }
    }

    pub fn to_pem(&self) -> Result<SecretPem, KeyError> {
        let alg = self.alg();
        let pem = match self {
            PrivateKey::Rsa(key) => key.to_pkcs8_pem(LineEnding::LF),
            PrivateKey::Ec(key) => key.to_pkcs8_pem(LineEnding::LF),
        }
        .map_err(|_| KeyError::Generation { alg })?;
        Ok(SecretPem::new(pem))
    }

    /// The RSA modulus size in bits, `None` for EC keys.
    pub fn rsa_bits(&self) -> Option<usize> {
        use rsa::traits::PublicKeyParts;
        match self {
            PrivateKey::Rsa(key) => Some(key.n().bits()),
            PrivateKey::Ec(_) => None,
        }
    }
}

/// Generates a key with its self-signed certificate (CN = `subject`, valid
/// from `created_at`). CPU-heavy for RSA: call it off the async runtime.
pub fn generate(
    alg: Alg,
    rsa_bits: u32,
    subject: &str,
    created_at: Timestamp,
) -> Result<NewKey, KeyError> {
    let key = PrivateKey::generate(alg, rsa_bits)?;
    let private_key_pem = key.to_pem()?;
    let kid = PublicJwk::from_private(&key).kid;
    let certificate = x5c::self_signed(alg, &private_key_pem, subject, created_at)?;
    Ok(NewKey {
        kid,
        alg,
        private_key_pem,
        certificate,
    })
}

/// Where key material comes from and how a stored key is read back: the
/// real one does cryptography; tests substitute a cheap fake so a model test
/// can run thousands of rotations.
pub trait KeyFactory: Send + Sync {
    /// Generates a key with its self-signed certificate. CPU-heavy for RSA:
    /// callers run it off the async runtime.
    fn generate(
        &self,
        alg: Alg,
        rsa_bits: u32,
        subject: &str,
        created_at: Timestamp,
    ) -> Result<NewKey, KeyError>;

    /// The public JWK of a stored private key (its `kid` is the thumbprint).
    fn public_jwk(&self, alg: Alg, pem: &SecretPem) -> Result<PublicJwk, KeyError>;

    /// Whether `generate` is cheap enough to run on the async runtime
    /// (test fakes): then no blocking thread is involved, and a test under
    /// tokio's paused clock sees no time pass while keys are made.
    fn generates_instantly(&self) -> bool {
        false
    }
}

/// The real [`KeyFactory`]: RSA and P-256 keys, rcgen certificates.
#[derive(Clone, Copy, Debug, Default)]
pub struct CryptoKeys;

impl KeyFactory for CryptoKeys {
    fn generate(
        &self,
        alg: Alg,
        rsa_bits: u32,
        subject: &str,
        created_at: Timestamp,
    ) -> Result<NewKey, KeyError> {
        // On a thread of its own at a lower CPU priority: an RSA-4096 key
        // takes seconds of CPU, and the signer's requests must not wait
        // behind it (SPEC §4: signing never waits on key generation).
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    lower_this_threads_priority();
                    generate(alg, rsa_bits, subject, created_at)
                })
                .join()
                .unwrap_or(Err(KeyError::Generation { alg }))
        })
    }

    fn public_jwk(&self, alg: Alg, pem: &SecretPem) -> Result<PublicJwk, KeyError> {
        Ok(PublicJwk::from_private(&PrivateKey::from_pem(alg, pem)?))
    }
}

/// Niceness of key-generation threads: under full CPU contention they get
/// about a tenth of a CPU beside a normal thread (CFS weights 110 vs 1024),
/// so generation still finishes in seconds while signing keeps its latency.
const KEYGEN_NICE: libc::c_int = 10;

/// Best effort: a sandbox that forbids setpriority (systemd's
/// `SystemCallFilter=~@resources`) leaves the thread as it was.
fn lower_this_threads_priority() {
    // SAFETY: gettid and setpriority take no pointers; on Linux
    // PRIO_PROCESS with a thread id sets that one thread's niceness.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid, KEYGEN_NICE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alg_names_parse_case_insensitively_and_reject_others() {
        assert_eq!("es256".parse::<Alg>().unwrap(), Alg::ES256);
        assert_eq!("RS256".parse::<Alg>().unwrap(), Alg::RS256);
        assert!("HS256".parse::<Alg>().is_err());
    }

    #[test]
    fn small_rsa_keys_are_refused() {
        assert!(matches!(
            PrivateKey::generate(Alg::RS256, 1024),
            Err(KeyError::RsaBits(1024))
        ));
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let key = generate(Alg::ES256, 2048, "t", chrono::Utc::now()).unwrap();
        let pem = key.private_key_pem.expose().to_string();
        let body_line = pem.lines().nth(1).unwrap();
        let parsed = PrivateKey::from_pem(Alg::ES256, &key.private_key_pem).unwrap();
        for shown in [
            format!("{key:?}"),
            format!("{:?}", key.private_key_pem),
            format!("{parsed:?}"),
        ] {
            assert!(!shown.contains(body_line), "{shown}");
            assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        }
    }

    #[test]
    fn pem_round_trip_keeps_the_kid() {
        let key = generate(Alg::RS256, 2048, "t", chrono::Utc::now()).unwrap();
        let parsed = PrivateKey::from_pem(Alg::RS256, &key.private_key_pem).unwrap();
        assert_eq!(parsed.rsa_bits(), Some(2048));
        assert_eq!(PublicJwk::from_private(&parsed).kid, key.kid);
        assert!(matches!(
            PrivateKey::from_pem(Alg::ES256, &key.private_key_pem),
            Err(KeyError::Unparseable { alg: Alg::ES256 })
        ));
    }
}
