# syntax=docker/dockerfile:1
# keyroll's container image: built in a full Rust image, shipped on distroless.
#
#   docker build -t keyroll:0.1.0 .
#   docker run --rm -p 8080:8080 -v "$PWD/keyroll.toml:/etc/keyroll/keyroll.toml:ro" \
#       -v keyroll-state:/var/lib/keyroll keyroll:0.1.0
#
# The runtime image holds the binary and what it links (glibc, libgcc_s, from
# distroless/cc) plus CA certificates for TLS to AWS: no shell, no package
# manager. It runs as UID/GID 65532 ("nonroot"). keyroll reads
# /etc/keyroll/keyroll.toml (mount it; its [http] listen must be 0.0.0.0:8080
# to be reached from outside the container). The file store defaults to
# /var/lib/keyroll/keysets ($STATE_DIRECTORY): mount a volume there, or use the
# AWS store. With a read-only root filesystem, every path keyroll writes
# (file store, jwks_file, signing_dir) must be on a volume.

# 1.90 or later links with lld, which places the functions a running daemon
# uses together (link/hot-text.txt, build.rs): a smaller resident set.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# Only what the build reads (.dockerignore keeps the rest out).
COPY Cargo.toml Cargo.lock build.rs ./
# The Kubernetes signer's gRPC contract, compiled by build.rs (no protoc).
COPY proto ./proto
# The linker's function order (build.rs).
COPY link ./link
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keyroll \
    && install -D -m 0755 target/release/keyroll /out/keyroll \
    && install -d -m 0700 /out/state

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keyroll /usr/local/bin/keyroll
# An empty state folder owned by the runtime user, so that a fresh volume
# mounted there is writable; keyroll's state_dir defaults to it.
COPY --from=build --chown=65532:65532 /out/state /var/lib/keyroll
ENV STATE_DIRECTORY=/var/lib/keyroll
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keyroll"]
CMD ["run"]
