//! The HTTP endpoints (SPEC §4): JWKS per keyset with a strong ETag,
//! `If-None-Match` → 304 and `Cache-Control`; the same for OpenID discovery
//! documents and `jwks_uri` paths; `/healthz`, `/readyz`,
//! `/metrics`. Requests read a pre-rendered snapshot; they never touch the
//! store or wait for a reconcile.
//!
//! The accept loop is ours rather than `axum::serve`, so that idle, slow and
//! oversized requests cannot stop JWKS serving: every connection has a
//! header-read deadline (which also closes idle keep-alive connections), a
//! header size limit and a maximum age; open connections are capped, and
//! running out of file descriptors pauses accepting instead of failing.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::discovery::{Route, DISCOVERY_CONTENT_TYPE};
use super::{JwksDocument, ServedState};
use crate::metrics::Metrics;

pub const JWKS_CONTENT_TYPE: &str = "application/jwk-set+json";

/// A client must send a request's whole header within this time, counted
/// from the connection's accept or, on a keep-alive connection, from the end
/// of the previous response: slow-header clients and idle connections close.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request line plus headers; larger gets `431` and the connection closes.
/// Real JWKS clients send well under 1 KiB.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// No endpoint takes a body; a request declaring more than this gets `413`.
const MAX_BODY_BYTES: u64 = 16 * 1024;
/// Open connections at most. Beyond it new connections wait in the kernel's
/// accept queue until others close (idle ones at the latest
/// `HEADER_READ_TIMEOUT` after going idle).
const MAX_CONNECTIONS: usize = 4096;
/// A connection is asked to close after this long even if busy, and dropped
/// `CLOSE_GRACE` later: bounds a client that never reads its responses.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// neither spins nor gives up; serving resumes once descriptors free up.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

#[derive(Clone)]
struct AppState {
    served: ServedState,
    metrics: Arc<Metrics>,
}

/// Everything but the JWKS, which [`Front`] answers before routing.
fn router(served: ServedState, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", any(healthz))
        .route("/readyz", any(readyz))
        .route("/metrics", any(metrics_text))
        .fallback(|| async { not_found() })
        .with_state(AppState { served, metrics })
}

/// Each connection's service. JWKS requests, nearly all the traffic, are
/// answered straight from the served snapshot: the router's per-request
/// layers (boxed services, extractors cloning the header map) made keyroll
/// serve fewer requests per second than nginx serving a file
/// (docs/BENCHMARKS.md). Health, readiness and metrics go through the router.
#[derive(Clone)]
struct Front {
    served: ServedState,
    router: TowerToHyperService<Router>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: hyper::Request<Incoming>) -> Answer {
        if declares_large_body(request.headers()) {
            let response = (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
            return Answer::Now(std::future::ready(Ok(response.into_response())));
        }
        let Some(wanted) = jwks_path(request.uri().path()) else {
            if let Some(response) = self.discovery_route(&request) {
                return Answer::Now(std::future::ready(Ok(response)));
            }
            return Answer::Routed(Box::pin(self.router.call(request)));
        };
        let served = self.served.load();
        let name = match wanted {
            JwksPath::Default => served.default_keyset.as_deref(),
            JwksPath::Named(name) => Some(name),
        };
        let jwks = name.and_then(|name| served.keysets.get(name));
        let response = document_response(
            request.method(),
            request.headers(),
            jwks.map(|j| j.as_ref()),
            JWKS_CONTENT_TYPE,
        );
        Answer::Now(std::future::ready(Ok(response)))
    }
}

impl Front {
    /// The answer on an OpenID discovery route (a keyset's
    /// `openid-configuration`, or its `jwks_uri` path), from the same
    /// snapshot as the JWKS; `None` for any other path. Until the keyset's
    /// JWKS is published, its discovery routes answer 404 like its JWKS.
    fn discovery_route(&self, request: &hyper::Request<Incoming>) -> Option<Response> {
        let served = self.served.load();
        let route = served.routes.get(request.uri().path())?;
        let jwks = served.keysets.get(route.keyset());
        let (method, headers) = (request.method(), request.headers());
        Some(match route {
            Route::Discovery { document, .. } => document_response(
                method,
                headers,
                jwks.map(|_| document.as_ref()),
                DISCOVERY_CONTENT_TYPE,
            ),
            Route::Jwks { .. } => {
                document_response(method, headers, jwks.map(|j| j.as_ref()), JWKS_CONTENT_TYPE)
            }
        })
    }
}

/// The keyset a JWKS path asks for (SPEC §4).
enum JwksPath<'a> {
    /// `/.well-known/jwks.json`
    Default,
    /// `/keysets/<name>/jwks.json`; keyset names need no percent-decoding
    /// (letters, digits, `-`, `_`, `.`).
    Named(&'a str),
}

fn jwks_path(path: &str) -> Option<JwksPath<'_>> {
    if path == "/.well-known/jwks.json" {
        return Some(JwksPath::Default);
    }
    path.strip_prefix("/keysets/")
        .and_then(|rest| rest.strip_suffix("/jwks.json"))
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .map(JwksPath::Named)
}

type Routed = std::pin::Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// A JWKS answer, ready at once, or the router's future.
enum Answer {
    Now(std::future::Ready<Result<Response, Infallible>>),
    Routed(Routed),
}

impl Future for Answer {
    type Output = Result<Response, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Answer::Now(ready) => std::pin::Pin::new(ready).poll(cx),
            Answer::Routed(routed) => routed.as_mut().poll(cx),
        }
    }
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight
/// requests finish and closes idle connections; returns once every
/// connection has closed (the caller bounds how long it waits).
pub async fn serve(
    listener: TcpListener,
    served: ServedState,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = Front {
        router: TowerToHyperService::new(router(served.clone(), metrics)),
        served,
    };
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (draining, drain) = watch::channel(false);
    let mut accept_failing = false;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        match accepted {
            Ok((stream, slot)) => {
                if std::mem::take(&mut accept_failing) {
                    tracing::info!("HTTP accepting connections again");
                }
                let connection = serve_connection(stream, http.clone(), service.clone());
                tokio::spawn(until_drained(connection, drain.clone(), slot));
            }
            Err(error) => {
                if !std::mem::replace(&mut accept_failing, true) {
                    tracing::warn!(%error, "HTTP cannot accept connections; retrying");
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
    drop(listener);
    let _ = draining.send(true);
    // Each connection holds a slot until it has closed.
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
    Ok(())
}

/// Waits for a free connection slot, then for a connection.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, OwnedSemaphorePermit)> {
    // The semaphore is never closed, so acquiring cannot fail.
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(std::io::Error::other)?;
    let (stream, _) = listener.accept().await?;
    // Responses are written whole; waiting to coalesce them only adds latency.
    let _ = stream.set_nodelay(true);
    Ok((stream, slot))
}

type Connection = http1::Connection<TokioIo<TcpStream>, Front>;

fn serve_connection(stream: TcpStream, http: http1::Builder, service: Front) -> Connection {
    http.serve_connection(TokioIo::new(stream), service)
}

/// Drives one connection until it ends, closing it gracefully when the
/// server drains or the connection reaches `MAX_CONNECTION_AGE`, and
/// dropping it if it still has not closed `CLOSE_GRACE` after that.
async fn until_drained(
    connection: Connection,
    mut drain: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    tokio::pin!(connection);
    let deadline = tokio::time::sleep(MAX_CONNECTION_AGE);
    tokio::pin!(deadline);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "HTTP connection ended with an error");
                }
                return;
            }
            _ = drain.wait_for(|stop| *stop), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
                deadline.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            _ = &mut deadline => {
                if closing {
                    return;
                }
                closing = true;
                connection.as_mut().graceful_shutdown();
                deadline.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
        }
    }
}

/// A request declaring a body larger than any endpoint could want gets
/// `413`; the body is never read, so hyper closes the connection after.
fn declares_large_body(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .is_some_and(|length| length > MAX_BODY_BYTES)
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

fn readable(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// The body for GET, none for HEAD (same headers either way).
fn body_for(method: &Method, body: impl Into<Body>) -> Body {
    if method == Method::HEAD {
        Body::empty()
    } else {
        body.into()
    }
}

/// RFC 9110 §13.1.2: `If-None-Match` uses the weak comparison, so `W/"x"`
/// matches our strong `"x"`; `*` matches any current representation.
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().any(|value| {
        value.to_str().is_ok_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
        })
    })
}

/// A JWKS or discovery document: strong ETag, `If-None-Match` → 304,
/// `Cache-Control: public, max-age=N`, HEAD without a body.
fn document_response(
    method: &Method,
    headers: &HeaderMap,
    jwks: Option<&JwksDocument>,
    content_type: &'static str,
) -> Response {
    let (Some(jwks), true) = (jwks, readable(method)) else {
        return not_found();
    };
    let not_modified = none_match(headers, &jwks.etag);
    let mut response = if not_modified {
        Response::new(Body::empty())
    } else {
        Response::new(body_for(method, jwks.body.clone()))
    };
    let out = response.headers_mut();
    // Both are ASCII (a quoted base64url digest, digits): always valid values.
    if let Ok(etag) = HeaderValue::from_str(&jwks.etag) {
        out.insert(header::ETAG, etag);
    }
    let cache_control = format!("public, max-age={}", jwks.max_age_seconds);
    if let Ok(cache_control) = HeaderValue::from_str(&cache_control) {
        out.insert(header::CACHE_CONTROL, cache_control);
    }
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return response;
    }
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(jwks.body.len()));
    response
}

fn text(method: &Method, status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut response = Response::new(body_for(method, body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn healthz(method: Method) -> Response {
    if !readable(&method) {
        return not_found();
    }
    text(
        &method,
        StatusCode::OK,
        "text/plain; charset=utf-8",
        "ok\n".into(),
    )
}

async fn readyz(method: Method, State(app): State<AppState>) -> Response {
    if !readable(&method) {
        return not_found();
    }
    let served = app.served.load();
    let missing = served.not_ready();
    if missing.is_empty() {
        text(
            &method,
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ready\n".into(),
        )
    } else {
        let body = format!("not ready: {}\n", missing.join("; "));
        text(
            &method,
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            body,
        )
    }
}

async fn metrics_text(method: Method, State(app): State<AppState>) -> Response {
    if !readable(&method) {
        return not_found();
    }
    // keyroll_ready mirrors /readyz at the instant of the scrape.
    app.metrics.set_ready(app.served.load().ready());
    let body = app.metrics.encode(&crate::clock::SystemClock);
    text(&method, StatusCode::OK, crate::metrics::CONTENT_TYPE, body)
}
