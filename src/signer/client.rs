//! A client of the sign API, for `keyroll sign`: one request over the
//! running daemon's socket.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no keyroll daemon is listening on {path} ({source}): start `keyroll run` with this config"
    )]
    NoDaemon {
        path: String,
        source: std::io::Error,
    },
    #[error("the sign API on {path} did not answer: {source}")]
    Protocol { path: String, source: ProtocolError },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Request(#[from] hyper::http::Error),
    #[error("the answer is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
}

/// The daemon's answer: its status and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// `POST /v1/keysets/<keyset>/sign` with `{"claims": claims, "alg": alg}`.
pub async fn sign(
    socket: &Path,
    keyset: &str,
    alg: Option<&str>,
    claims: Value,
) -> Result<Answer, ClientError> {
    let path = socket.display().to_string();
    let protocol = |source: ProtocolError| ClientError::Protocol {
        path: path.clone(),
        source,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::NoDaemon {
            path: path.clone(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| protocol(e.into()))?;
    tokio::spawn(connection);
    let mut request = serde_json::json!({ "claims": claims });
    if let Some(alg) = alg {
        request["alg"] = alg.into();
    }
    let request = hyper::Request::post(format!("/v1/keysets/{keyset}/sign"))
        .header(header::HOST, "keyroll")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(request.to_string())))
        .map_err(|e| protocol(e.into()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| protocol(e.into()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| protocol(e.into()))?
        .to_bytes();
    let body = serde_json::from_slice(&body).map_err(|e| protocol(e.into()))?;
    Ok(Answer { status, body })
}
