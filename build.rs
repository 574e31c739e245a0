//! Compiles proto/externaljwt/v1/api.proto (the Kubernetes ExternalJWTSigner
//! contract) into Rust with tonic and prost. protox parses the proto in
//! Rust, so building keyroll needs no system `protoc`.
//!
//! Also passes the linker two layout options for the executable (issue 13):
//! packed relative relocations, and in release builds linked by lld, the
//! functions a started daemon runs placed first (`link/hot-text.txt`).

use std::env;
use std::process::Command;

/// Written by bench/hot_text.py.
const HOT_TEXT: &str = "link/hot-text.txt";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Relative relocations packed (DT_RELR, glibc 2.36+): the dynamic
    // loader reads about 10 KiB of relocation table at each start instead
    // of 1 MiB of `.rela.dyn`, which also stayed resident (issue 13).
    // GNU ld before 2.38 ignores the option with a warning.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    order_hot_text();
    let proto = "proto/externaljwt/v1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

/// The kernel maps 64 KiB of the executable around every page a process
/// touches. The few hundred functions an idle daemon runs, scattered over
/// the whole `.text`, kept 4 MiB of code resident; placed together, a few
/// hundred KiB. Only lld takes `--symbol-ordering-file`: it is the default
/// linker of x86_64-unknown-linux-gnu from Rust 1.90, unless RUSTFLAGS
/// choose another. A listed name absent from the build is skipped.
fn order_hot_text() {
    println!("cargo:rerun-if-changed={HOT_TEXT}");
    println!("cargo:rerun-if-env-changed=KEYROLL_NO_HOT_TEXT");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let own_linker = flags.contains("linker") || flags.contains("fuse-ld");
    if !release || !target || own_linker || env::var_os("KEYROLL_NO_HOT_TEXT").is_some() {
        return;
    }
    if !rustc_links_with_lld() {
        return;
    }
    let order = format!(
        "{}/{HOT_TEXT}",
        env::var("CARGO_MANIFEST_DIR").unwrap_or_default()
    );
    // lld fails the link on a missing file; a build without the list only
    // keeps more code resident.
    if !std::path::Path::new(&order).is_file() {
        println!("cargo:warning={HOT_TEXT} is missing: the executable is linked without its function order");
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Whether this rustc is 1.90 or later, which links this target with its
/// own lld by default.
fn rustc_links_with_lld() -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(release) = text.lines().find_map(|l| l.strip_prefix("release: ")) else {
        return false;
    };
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
