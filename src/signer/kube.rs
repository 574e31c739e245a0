//! The Kubernetes ExternalJWTSigner v1 gRPC service (KEP-740) on a Unix
//! socket, for kube-apiserver's `--service-account-signing-endpoint`.
//!
//! - `Sign`: the claims arrive as the token's second segment and are signed
//!   as received, never re-encoded; the header is base64url of exactly
//!   `{"alg","kid","typ":"JWT"}`; an ES256 signature is 64-byte R‖S.
//!   `exp − iat > token_ttl`, or an `iat` off by more than `clock_skew`:
//!   INVALID_ARGUMENT.
//! - `FetchKeys`: every published key as PKIX DER, never an empty list
//!   (UNAVAILABLE instead); `refresh_hint_seconds` = `jwks_cache_ttl`, which
//!   is why this keyset's `publish_lead` includes it (`Timings::relay_cache`).
//! - `Metadata`: `max_token_expiration_seconds` = `token_ttl`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::proto::external_jwt_signer_server::{ExternalJwtSigner, ExternalJwtSignerServer};
use super::proto::{
    FetchKeysRequest, FetchKeysResponse, Key, MetadataRequest, MetadataResponse, SignJwtRequest,
    SignJwtResponse,
};
use super::{Keyring, Peer, Refusal, Shared};
use crate::config::KubernetesSigner;
use crate::key::Alg;

/// The service for one keyset and algorithm.
pub struct KubeSigner {
    shared: Arc<Shared>,
    keyset: String,
    alg: Alg,
    /// `token_ttl` from the config at start, for `Metadata` before the
    /// keyset's first load (kube-apiserver asks once, when it starts).
    token_ttl: Duration,
}

impl KubeSigner {
    pub(crate) fn new(
        shared: Arc<Shared>,
        settings: &KubernetesSigner,
        token_ttl: Duration,
    ) -> Self {
        KubeSigner {
            shared,
            keyset: settings.keyset.clone(),
            alg: settings.alg,
            token_ttl,
        }
    }

    fn keyring(&self) -> Result<Arc<Keyring>, Refusal> {
        let served = self.shared.served.load();
        if !served.expected.contains(&self.keyset) {
            return Err(Refusal::UnknownKeyset(self.keyset.clone()));
        }
        served
            .signing
            .get(&self.keyset)
            .cloned()
            .ok_or_else(|| Refusal::NotLoaded(self.keyset.clone()))
    }

    fn refuse<T>(&self, refusal: Refusal, peer: Peer) -> Result<T, Status> {
        self.shared.refused(&self.keyset, &refusal, peer);
        let message = refusal.to_string();
        Err(match refusal.http_status() {
            400 | 413 => Status::invalid_argument(message),
            404 => Status::not_found(message),
            _ => Status::unavailable(message),
        })
    }
}

fn peer_of<T>(request: &Request<T>) -> Peer {
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred);
    match cred {
        Some(cred) => Peer {
            uid: Some(cred.uid()),
            pid: cred.pid(),
        },
        None => Peer::default(),
    }
}

#[tonic::async_trait]
impl ExternalJwtSigner for KubeSigner {
    async fn sign(
        &self,
        request: Request<SignJwtRequest>,
    ) -> Result<Response<SignJwtResponse>, Status> {
        let peer = peer_of(&request);
        let keyring = match self.keyring() {
            Ok(keyring) => keyring,
            Err(refusal) => return self.refuse(refusal, peer),
        };
        let claims = request.into_inner().claims;
        match keyring.sign_encoded(self.alg, &claims, self.shared.now()) {
            Ok((header, signature)) => {
                self.shared.metrics.token_signed(&self.keyset, self.alg);
                Ok(Response::new(SignJwtResponse { header, signature }))
            }
            Err(refusal) => self.refuse(refusal, peer),
        }
    }

    async fn fetch_keys(
        &self,
        request: Request<FetchKeysRequest>,
    ) -> Result<Response<FetchKeysResponse>, Status> {
        let peer = peer_of(&request);
        let keyring = match self.keyring() {
            Ok(keyring) => keyring,
            Err(refusal) => return self.refuse(refusal, peer),
        };
        if let Some(reason) = keyring.withheld_reason() {
            return self.refuse(Refusal::Withheld(reason.to_string()), peer);
        }
        // kube-apiserver would serve an empty JWKS and stop verifying every
        // token: no keys is an outage to report, not an answer.
        if keyring.published().is_empty() {
            return self.refuse(Refusal::NotLoaded(self.keyset.clone()), peer);
        }
        let keys = keyring
            .published()
            .iter()
            .map(|key| Key {
                key_id: key.kid.clone(),
                key: key.der.clone(),
                exclude_from_oidc_discovery: false,
            })
            .collect();
        let refresh = keyring
            .limits()
            .map_or(Duration::from_secs(300), |limits| limits.jwks_cache_ttl);
        Ok(Response::new(FetchKeysResponse {
            keys,
            data_timestamp: Some(prost_types::Timestamp {
                seconds: keyring.loaded_at(),
                nanos: 0,
            }),
            // Upstream treats zero or less as a misconfiguration.
            refresh_hint_seconds: refresh.as_secs().max(1) as i64,
        }))
    }

    async fn metadata(
        &self,
        _request: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        let token_ttl = self
            .keyring()
            .ok()
            .and_then(|keyring| keyring.limits())
            .map_or(self.token_ttl, |limits| limits.token_ttl);
        Ok(Response::new(MetadataResponse {
            max_token_expiration_seconds: token_ttl.as_secs() as i64,
        }))
    }
}

/// Serves the gRPC service on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: UnixListener,
    signer: KubeSigner,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let incoming = UnixListenerStream::new(listener);
    let result = tonic::transport::Server::builder()
        // A stalled client holds one stream, never the server.
        .timeout(Duration::from_secs(10))
        .add_service(ExternalJwtSignerServer::new(signer))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "Kubernetes external signer failed");
    }
}
