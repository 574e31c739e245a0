//! The sign API (SPEC §4): HTTP/1.1 on a Unix socket.
//!
//! `POST /v1/keysets/<name>/sign` with `{"claims": {…}, "alg": "ES256"}`
//! answers `{"token","kid","alg","expires_at"}`. Another method on that path
//! gets 405, any other path 404, a body over 64 KiB 413, a keyset that is
//! not loaded or has no active key 503. Every connection is its own task
//! with a deadline for its header and its body, so a client that sends half
//! a request and hangs delays no other.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use super::{Peer, Refusal, Shared, MAX_REQUEST_BYTES};
use crate::clock::rfc3339;

/// A client must send a request's header within this time (from accept or
/// from the previous response on a kept-alive connection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// And its body within this time after the header.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How much of a too-large body is read (and dropped) before answering 413.
const DRAIN_LIMIT: usize = 1024 * 1024;
/// Open connections at most; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 4096;
/// Pause after a failed accept (out of file descriptors) instead of spinning.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignRequest {
    claims: Value,
    #[serde(default)]
    alg: Option<String>,
}

#[derive(serde::Serialize)]
struct SignResponse<'a> {
    token: &'a str,
    kid: &'a str,
    alg: &'a str,
    expires_at: String,
}

/// Serves until `shutdown` completes, then lets open connections finish
/// their request (bounded by the caller).
pub(crate) async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (draining, drain) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            // The semaphore is never closed.
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let connection = connection(stream, http.clone(), shared.clone(), drain.clone());
                tokio::spawn(async move {
                    connection.await;
                    drop(slot);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "sign API cannot accept a connection; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
    drop(listener);
    let _ = draining.send(true);
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
}

async fn connection(
    stream: UnixStream,
    http: http1::Builder,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
) {
    let peer = Peer::of(&stream);
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(answer(&shared, peer, request).await) }
    });
    let connection = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let draining = tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "sign API connection ended with an error");
            }
            false
        }
        _ = drain.wait_for(|stop| *stop) => true,
    };
    if draining {
        connection.as_mut().graceful_shutdown();
        let _ = connection.await;
    }
}

/// The keyset a path names, if it is the sign path.
fn sign_path(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/keysets/")?
        .strip_suffix("/sign")
        .filter(|name| !name.is_empty() && !name.contains('/'))
}

async fn answer(shared: &Shared, peer: Peer, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(keyset) = sign_path(request.uri().path()).map(str::to_string) else {
        return refuse(shared, "", Refusal::NotFound, peer);
    };
    // The metric's keyset label only takes configured names: a client
    // cannot grow it without bound.
    let known = shared.served.load().expected.contains(&keyset);
    let label = if known { keyset.as_str() } else { "" };
    if request.method() != Method::POST {
        return refuse(shared, label, Refusal::Method, peer);
    }
    if !known {
        return refuse(shared, label, Refusal::UnknownKeyset(keyset.clone()), peer);
    }
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(refusal) => return refuse(shared, label, refusal, peer),
    };
    match sign(shared, &keyset, &body) {
        Ok(response) => response,
        Err(refusal) => refuse(shared, label, refusal, peer),
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Refusal> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let mut body = request.into_body();
    let too_large = declared.is_some_and(|length| length > MAX_REQUEST_BYTES as u64);
    let read = async {
        let mut collected = Vec::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| Refusal::BadRequest(format!("the body could not be read: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            seen += data.len();
            // Past the limit the rest is read and dropped, up to a bound, so
            // the client gets its 413 instead of a reset connection.
            if seen > DRAIN_LIMIT {
                return Err(Refusal::TooLarge);
            }
            if !too_large && seen <= MAX_REQUEST_BYTES {
                collected.extend_from_slice(&data);
            }
        }
        if too_large || seen > MAX_REQUEST_BYTES {
            return Err(Refusal::TooLarge);
        }
        Ok(Bytes::from(collected))
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Err(_) if too_large => Err(Refusal::TooLarge),
        Err(_) => Err(Refusal::Slow),
        Ok(result) => result,
    }
}

fn sign(shared: &Shared, keyset: &str, body: &[u8]) -> Result<Response<Full<Bytes>>, Refusal> {
    let request: SignRequest = serde_json::from_slice(body).map_err(|e| {
        // serde_json's messages quote offending input at most as a short
        // type or field name; the claims are never echoed.
        Refusal::BadRequest(format!(
            "line {} column {}: {}",
            e.line(),
            e.column(),
            json_problem(&e)
        ))
    })?;
    if !request.claims.is_object() {
        return Err(Refusal::ClaimsNotObject);
    }
    let served = shared.served.load();
    let keyring = served
        .signing
        .get(keyset)
        .ok_or_else(|| Refusal::NotLoaded(keyset.to_string()))?;
    let signed = keyring.sign_claims(request.alg.as_deref(), request.claims, shared.now())?;
    shared.metrics.token_signed(keyset, signed.alg);
    let expires_at = chrono::DateTime::from_timestamp(signed.expires_at, 0)
        .map(rfc3339)
        .unwrap_or_default();
    let body = serde_json::to_vec(&SignResponse {
        token: &signed.token,
        kid: &signed.kid,
        alg: signed.alg.as_str(),
        expires_at,
    })
    .expect("a sign response always serializes");
    Ok(json(StatusCode::OK, body))
}

/// What is wrong with a request body, without quoting it.
fn json_problem(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Io => "the body could not be read",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => {
            "expected an object with \"claims\" (an object) and optionally \"alg\" (a string), nothing else"
        }
        serde_json::error::Category::Eof => "the JSON ends early",
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn refuse(shared: &Shared, keyset: &str, refusal: Refusal, peer: Peer) -> Response<Full<Bytes>> {
    shared.refused(keyset, &refusal, peer);
    let status = StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    let body = serde_json::to_vec(&serde_json::json!({
        "error": refusal.to_string(),
        "reason": refusal.reason(),
    }))
    .expect("an error always serializes");
    let mut response = json(status, body);
    if refusal == Refusal::Method {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    if matches!(refusal, Refusal::TooLarge | Refusal::Slow) {
        // The rest of the body is never read: the connection cannot be reused.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
