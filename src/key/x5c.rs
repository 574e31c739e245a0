//! The self-signed X.509 certificate published as `x5c` (SPEC §2).
//!
//! It is made once, when the key is created, and stored with the key: an
//! ECDSA signature is randomized, so certificates made per replica would make
//! the JWKS differ between replicas.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, KeyUsagePurpose};

use super::{Alg, KeyError, SecretPem};
use crate::clock::Timestamp;

/// RFC 5280 §4.1.2.5: 99991231235959Z means "no well-defined expiration".
/// A key's `remove_at` is unknown when it is created (it depends on when it
/// is retired), and SPEC §2 asks for validity until at least `remove_at`.
fn not_after() -> time::OffsetDateTime {
    time::Date::from_calendar_date(9999, time::Month::December, 31)
        .and_then(|date| date.with_hms(23, 59, 59))
        .expect("9999-12-31T23:59:59 is a valid instant")
        .assume_utc()
}

pub(super) fn self_signed(
    alg: Alg,
    pem: &SecretPem,
    subject: &str,
    created_at: Timestamp,
) -> Result<String, KeyError> {
    let sign_algo = match alg {
        Alg::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        Alg::RS256 => &rcgen::PKCS_RSA_SHA256,
    };
    // rcgen errors describe the failure, never the key bytes.
    let key_pair = KeyPair::from_pkcs8_pem_and_sign_algo(pem.expose(), sign_algo)
        .map_err(KeyError::Certificate)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, subject);
    params.distinguished_name = name;
    params.not_before = time::OffsetDateTime::from_unix_timestamp(created_at.timestamp())
        .map_err(KeyError::CertificateStart)?;
    params.not_after = not_after();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params
        .self_signed(&key_pair)
        .map_err(KeyError::Certificate)?;
    Ok(STANDARD.encode(cert.der()))
}
