//! Compiles proto/externaljwt/v1/api.proto (the Kubernetes ExternalJWTSigner
//! contract) into Rust with tonic and prost. protox parses the proto in
//! Rust, so building keyroll needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/externaljwt/v1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
