//! RSA key generation per key, private key + PKCS#8 DER: the `rsa` crate
//! (keyroll's until issue 13.4), aws-lc-rs (`KeyPair::generate`, keyroll's
//! since; `benches/keygen.rs` times keyroll's own path), and `openssl genpkey`
//! (one process per key, minus the median of `openssl pkey` reading and
//! writing a key of the same size). Rounds alternate the three. Every
//! aws-lc-rs key is checked to load in ring, the signer's parser. ring
//! itself cannot generate RSA keys (its `RsaKeyPair` only parses).

use std::process::{Command, Stdio};
use std::time::Instant;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use rsa::pkcs8::EncodePrivateKey;

fn openssl(args: &[&str]) -> f64 {
    let start = Instant::now();
    let status = Command::new("openssl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl {args:?} failed");
    start.elapsed().as_secs_f64()
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("ROUNDS is a number"))
        .unwrap_or(2);
    let scratch = std::env::temp_dir().join(format!("rsa-keygen-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("a scratch folder");
    println!("median per key, {rounds} alternated rounds; ratios to openssl (minus its overhead)");
    for (bits, size, runs) in [
        (2048usize, KeySize::Rsa2048, 12usize),
        (3072, KeySize::Rsa3072, 4),
        (4096, KeySize::Rsa4096, 3),
    ] {
        let option = format!("rsa_keygen_bits:{bits}");
        let sample = scratch.join(format!("{bits}.pem"));
        let sample = sample.to_str().expect("a UTF-8 temp path");
        let generate = ["genpkey", "-algorithm", "RSA", "-pkeyopt", &option];
        openssl(&[&generate[..], &["-out", sample]].concat());
        let (mut rust, mut lc, mut ossl, mut overhead) = (vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            let mut rsa_crate = || {
                for _ in 0..runs {
                    let start = Instant::now();
                    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).unwrap();
                    std::hint::black_box(key.to_pkcs8_der().unwrap());
                    rust.push(start.elapsed().as_secs_f64());
                }
            };
            let mut aws_lc = || {
                for _ in 0..runs {
                    let start = Instant::now();
                    let key = KeyPair::generate(size).unwrap();
                    let der = AsDer::<Pkcs8V1Der>::as_der(&key).unwrap();
                    lc.push(start.elapsed().as_secs_f64());
                    ring::rsa::KeyPair::from_pkcs8(der.as_ref()).expect("ring loads it");
                }
            };
            let mut openssl_cli = || {
                for _ in 0..runs {
                    ossl.push(openssl(&[&generate[..], &["-out", "/dev/null"]].concat()));
                    overhead.push(openssl(&["pkey", "-in", sample, "-out", "/dev/null"]));
                }
            };
            if round % 2 == 0 {
                rsa_crate();
                aws_lc();
                openssl_cli();
            } else {
                openssl_cli();
                aws_lc();
                rsa_crate();
            }
        }
        let (r, a) = (median(&mut rust), median(&mut lc));
        let o = median(&mut ossl) - median(&mut overhead);
        println!(
            "RSA {bits}: rsa {:8.1} ms ({:.2}x openssl) | aws-lc-rs {:8.1} ms ({:.2}x openssl, {:.2}x rsa) | openssl {:8.1} ms | {} keys each",
            r * 1e3,
            r / o,
            a * 1e3,
            a / o,
            a / r,
            o * 1e3,
            rust.len()
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
