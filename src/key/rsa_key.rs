//! RSA private keys without RSA arithmetic of our own: AWS-LC generates them
//! and checks the ones read back; their parts are read from the PKCS#8 DER
//! with the RustCrypto `pkcs8`/`pkcs1` types.

use std::fmt;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use pkcs8::{EncodePrivateKey, PrivateKeyInfo, SecretDocument};

/// An RSA private key as its PKCS#8 v1 document (zeroized on drop), known
/// to hold a consistent two-prime key. `Debug` shows only its size.
#[derive(Clone)]
pub struct RsaKey {
    der: SecretDocument,
}

/// The AWS-LC size for each of [`super::RSA_BITS_ALLOWED`].
pub(super) fn key_size(bits: u32) -> Option<KeySize> {
    match bits {
        2048 => Some(KeySize::Rsa2048),
        3072 => Some(KeySize::Rsa3072),
        4096 => Some(KeySize::Rsa4096),
        _ => None,
    }
}

impl RsaKey {
    /// A new key; `None` only if AWS-LC fails (no system randomness).
    pub(super) fn generate(size: KeySize) -> Option<Self> {
        let pair = KeyPair::generate(size).ok()?;
        // Zeroized on drop, like every copy below.
        let der: Pkcs8V1Der<'static> = pair.as_der().ok()?;
        let info = PrivateKeyInfo::try_from(der.as_ref()).ok()?;
        RsaKey::try_from(info).ok()
    }

    /// The key's parts, borrowed from its DER.
    pub(super) fn parts(&self) -> pkcs1::RsaPrivateKey<'_> {
        let info: PrivateKeyInfo<'_> = self
            .der
            .decode_msg()
            .expect("an RsaKey's DER was decoded as PrivateKeyInfo when it was made");
        pkcs1::RsaPrivateKey::try_from(info.private_key)
            .expect("an RsaKey's private key was decoded as PKCS#1 when it was made")
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        // UintRef holds the value without leading zero bytes.
        let modulus = self.parts().modulus.as_bytes();
        match modulus.first() {
            Some(top) => modulus.len() * 8 - top.leading_zeros() as usize,
            None => 0,
        }
    }
}

/// Reads a PKCS#8 RSA key as strictly as the `rsa` crate did and more:
/// rsaEncryption, two primes, and AWS-LC's `RSA_check_key` (n = p·q, d·e ≡ 1
/// mod p−1 and q−1, the CRT values), 2048 to 8192 bits. Errors carry no key
/// material. Through it, [`pkcs8::DecodePrivateKey`] gives `from_pkcs8_pem`.
impl TryFrom<PrivateKeyInfo<'_>> for RsaKey {
    type Error = pkcs8::Error;

    fn try_from(info: PrivateKeyInfo<'_>) -> pkcs8::Result<Self> {
        info.algorithm.assert_algorithm_oid(pkcs1::ALGORITHM_OID)?;
        let parts = pkcs1::RsaPrivateKey::try_from(info.private_key)?;
        if parts.version() != pkcs1::Version::TwoPrime {
            return Err(pkcs8::Error::KeyMalformed);
        }
        // Re-encoded, so that what is kept is exactly what AWS-LC checks:
        // PKCS#8 attributes, which nothing reads, are dropped (as the `rsa`
        // crate dropped them); the rest has one DER encoding.
        let der = SecretDocument::try_from(info)?;
        KeyPair::from_pkcs8(der.as_bytes()).map_err(|_| pkcs8::Error::KeyMalformed)?;
        Ok(RsaKey { der })
    }
}

/// Gives `to_pkcs8_pem`: the stored form, unchanged since the `rsa` crate.
impl EncodePrivateKey for RsaKey {
    fn to_pkcs8_der(&self) -> pkcs8::Result<SecretDocument> {
        Ok(self.der.clone())
    }
}

impl fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaKey({} bits, [redacted])", self.bits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkcs8::DecodePrivateKey;

    /// Made by keyroll before it used aws-lc-rs (the `rsa` crate 0.9.10).
    const OLD_PEM: &str = include_str!("../../tests/data/keys/rs256-2048-rsa-crate.pem");

    #[test]
    fn every_allowed_size_has_an_aws_lc_size() {
        for bits in super::super::RSA_BITS_ALLOWED {
            assert!(key_size(bits).is_some(), "{bits}");
        }
    }

    /// The value with its second-lowest bit flipped: same length, same parity.
    fn off(value: pkcs1::UintRef<'_>) -> Vec<u8> {
        let mut bytes = value.as_bytes().to_vec();
        *bytes.last_mut().expect("RSA parts are not zero") ^= 0x02;
        bytes
    }

    fn uint(bytes: &[u8]) -> pkcs1::UintRef<'_> {
        pkcs1::UintRef::new(bytes).expect("a valid unsigned integer")
    }

    fn read(parts: &pkcs1::RsaPrivateKey<'_>) -> pkcs8::Result<RsaKey> {
        let inner = pkcs8::der::Encode::to_der(parts).expect("encodable");
        RsaKey::try_from(PrivateKeyInfo::new(pkcs1::ALGORITHM_ID, &inner))
    }

    #[test]
    fn keys_with_inconsistent_parts_are_refused() {
        let key = RsaKey::from_pkcs8_pem(OLD_PEM).unwrap();
        let good = key.parts();
        assert!(read(&good).is_ok(), "the test's own encoding is right");
        let (d, dp, dq, qi) = (
            off(good.private_exponent),
            off(good.exponent1),
            off(good.exponent2),
            off(good.coefficient),
        );
        let bad = [
            pkcs1::RsaPrivateKey {
                private_exponent: uint(&d),
                ..good.clone()
            },
            pkcs1::RsaPrivateKey {
                exponent1: uint(&dp),
                ..good.clone()
            },
            pkcs1::RsaPrivateKey {
                exponent2: uint(&dq),
                ..good.clone()
            },
            pkcs1::RsaPrivateKey {
                coefficient: uint(&qi),
                ..good.clone()
            },
            // qi belongs to the other order of the primes.
            pkcs1::RsaPrivateKey {
                prime1: good.prime2,
                prime2: good.prime1,
                ..good.clone()
            },
        ];
        for (case, parts) in bad.iter().enumerate() {
            assert!(read(parts).is_err(), "case {case} was accepted");
        }
    }
}
