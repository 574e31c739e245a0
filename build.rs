//! Compiles proto/externaljwt/v1/api.proto (the Kubernetes ExternalJWTSigner
//! contract) into Rust with tonic and prost. protox parses the proto in
//! Rust, so building keyroll needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Relative relocations packed (DT_RELR, glibc 2.36+): the dynamic
    // loader reads about 10 KiB of relocation table at each start instead
    // of 1 MiB of `.rela.dyn`, which also stayed resident (issue 13).
    // GNU ld before 2.38 ignores the option with a warning.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    let proto = "proto/externaljwt/v1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
