//! JWK forms of a key (RFC 7517/7518) and its RFC 7638 thumbprint.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{Alg, PrivateKey};

fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A private value (d, p, q, …) as base64url; zeroized on drop.
fn secret_b64url(bytes: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(b64url(bytes))
}

/// The public JWK as published. Field order is the serialization order, so
/// the same key always gives the same bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PublicJwk {
    pub kty: &'static str,
    #[serde(rename = "use")]
    pub use_: &'static str,
    pub alg: Alg,
    pub kid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x5c: Option<Vec<String>>,
    #[serde(rename = "x5t#S256", skip_serializing_if = "Option::is_none")]
    pub x5t_s256: Option<String>,
}

impl PublicJwk {
    /// An RSA public key from its base64url modulus and exponent; the kid
    /// is the RFC 7638 thumbprint.
    pub fn rsa(n: String, e: String) -> Self {
        Self::with_thumbprint(PublicJwk {
            kty: "RSA",
            use_: "sig",
            alg: Alg::RS256,
            kid: String::new(),
            crv: None,
            x: None,
            y: None,
            n: Some(n),
            e: Some(e),
            x5c: None,
            x5t_s256: None,
        })
    }

    /// A P-256 public key from its base64url coordinates.
    pub fn ec(x: String, y: String) -> Self {
        Self::with_thumbprint(PublicJwk {
            kty: "EC",
            use_: "sig",
            alg: Alg::ES256,
            kid: String::new(),
            crv: Some("P-256"),
            x: Some(x),
            y: Some(y),
            n: None,
            e: None,
            x5c: None,
            x5t_s256: None,
        })
    }

    fn with_thumbprint(mut jwk: PublicJwk) -> Self {
        jwk.kid = thumbprint(&jwk);
        jwk
    }

    pub fn from_private(key: &PrivateKey) -> Self {
        match key {
            PrivateKey::Rsa(key) => {
                let parts = key.parts();
                PublicJwk::rsa(
                    b64url(parts.modulus.as_bytes()),
                    b64url(parts.public_exponent.as_bytes()),
                )
            }
            PrivateKey::Ec(key) => {
                let point = key.public_key().to_encoded_point(false);
                // An uncompressed point always has both coordinates.
                let coordinate =
                    |c: Option<&p256::FieldBytes>| c.map(|c| b64url(c)).unwrap_or_default();
                PublicJwk::ec(coordinate(point.x()), coordinate(point.y()))
            }
        }
    }

    /// Attaches the certificate (base64 DER) as `x5c` and its `x5t#S256`.
    pub fn with_certificate(mut self, certificate_b64: &str) -> Self {
        if let Ok(der) = STANDARD.decode(certificate_b64) {
            self.x5t_s256 = Some(b64url(&Sha256::digest(&der)));
            self.x5c = Some(vec![certificate_b64.to_string()]);
        }
        self
    }
}

/// RFC 7638 §3: SHA-256 over the required members in lexicographic order,
/// with no white space, base64url without padding.
pub fn thumbprint(jwk: &PublicJwk) -> String {
    let canonical = match jwk.kty {
        "RSA" => serde_json::json!({"e": jwk.e, "kty": "RSA", "n": jwk.n}),
        _ => serde_json::json!({"crv": jwk.crv, "kty": jwk.kty, "x": jwk.x, "y": jwk.y}),
    };
    // serde_json's map is ordered by key (no `preserve_order` feature), which
    // is exactly the lexicographic order RFC 7638 requires.
    let bytes = serde_json::to_vec(&canonical).expect("a JSON value always serializes");
    b64url(&Sha256::digest(bytes))
}

/// A private JWK, as written to `signing.json` for a co-located signer.
/// Every private member is zeroized on drop; `Debug` shows only the kid.
#[derive(Serialize)]
pub struct PrivateJwk {
    #[serde(flatten)]
    public: PublicJwk,
    #[serde(skip_serializing_if = "Option::is_none")]
    d: Option<Zeroizing<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p: Option<Zeroizing<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    q: Option<Zeroizing<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dp: Option<Zeroizing<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dq: Option<Zeroizing<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qi: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for PrivateJwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateJwk({}, [redacted])", self.public.kid)
    }
}

impl PrivateJwk {
    pub fn from_private(key: &PrivateKey) -> Self {
        let public = PublicJwk::from_private(key);
        match key {
            PrivateKey::Ec(key) => PrivateJwk {
                public,
                d: Some(secret_b64url(&key.to_bytes())),
                p: None,
                q: None,
                dp: None,
                dq: None,
                qi: None,
            },
            PrivateKey::Rsa(key) => {
                // Borrowed from the key's zeroizing DER, without leading
                // zero bytes (RFC 7518 §6.3.2); only the base64 is a copy.
                let parts = key.parts();
                let secret = |value: pkcs1::UintRef<'_>| Some(secret_b64url(value.as_bytes()));
                PrivateJwk {
                    public,
                    d: secret(parts.private_exponent),
                    p: secret(parts.prime1),
                    q: secret(parts.prime2),
                    dp: secret(parts.exponent1),
                    dq: secret(parts.exponent2),
                    qi: secret(parts.coefficient),
                }
            }
        }
    }

    pub fn kid(&self) -> &str {
        &self.public.kid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 §3.1: the worked example's thumbprint.
    #[test]
    fn rfc7638_example_thumbprint() {
        let jwk = PublicJwk::rsa("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw".into(), "AQAB".into());
        assert_eq!(jwk.kid, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }
}
