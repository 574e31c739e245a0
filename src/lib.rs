//! keyroll keeps JWT signing keys rotating without breaking a verifier.
//!
//! - [`config`]: the TOML config, parsed and validated (pure).
//! - [`clock`]: time comes in from outside.
//! - [`key`]: RS256/ES256 generation, JWKs, RFC 7638 kids, x5c.
//! - [`document`]: the stored keyset document and its strict parser;
//!   [`secret_json`]: JSON holding private keys, with no copy left unwiped.
//! - [`planner`]: pure `(now, document, policy, action) -> steps`.
//! - [`reconcile`]: load → plan → save (compare-and-swap), retried on conflict.
//! - [`store`]: the `Store` trait and its file and memory backends.
//! - [`publish`]: JWKS and OpenID discovery rendering, HTTP, `jwks_file`,
//!   `signing_dir`, S3.
//! - [`aws`]: the one AWS SDK configuration, shared by the store and S3.
//! - [`daemon`]: the `run` loop, signals, sd_notify; [`metrics`]: Prometheus.
//! - [`signer`]: signs tokens itself: the sign API and Kubernetes' external signer.
//! - [`cli`]: the commands; `main.rs` only maps their result to an exit code.

pub mod aws;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod document;
pub mod footprint;
pub mod fsutil;
pub mod key;
pub mod logging;
pub mod manual;
pub mod metrics;
pub mod planner;
pub mod publish;
pub mod reconcile;
pub mod schedule;
pub mod secret_json;
pub mod signer;
pub mod store;
