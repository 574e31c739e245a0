//! The HTTP endpoints (SPEC §4): JWKS per keyset with a strong ETag,
//! `If-None-Match` → 304 and `Cache-Control`; the same for OpenID discovery
//! documents and `jwks_uri` paths; `/healthz`, `/readyz`, and `/metrics`
//! (on `[http] metrics_listen` when set). Requests read a pre-rendered
//! snapshot; they never touch the store or wait for a reconcile.
//!
//! The listeners run on one thread of their own with a single-threaded
//! runtime, as one nginx worker does: JWKS requests never queue behind a
//! reconcile pass or a signature, and no second thread is woken to steal
//! work (docs/BENCHMARKS.md, "JWKS tail against nginx with one worker").
//! It does not hand its CPU to waiting tasks (`sched_yield`) between
//! requests: that bought nginx's p99 with wrk beside it on two CPUs, and
//! cost 99% of the requests beside a busy loop ("Issue 13, fourth part").
//! Idle, slow, oversized and greedy clients cannot stop JWKS serving:
//! every connection has a header-read deadline (which also closes idle
//! keep-alive connections), a header size limit and a maximum age; open
//! connections are capped, in all and per client address; running out of
//! file descriptors pauses accepting instead of failing. Shutdown drains
//! through hyper-util's [`GracefulShutdown`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::discovery::{Route, DISCOVERY_CONTENT_TYPE};
use super::{JwksDocument, ServedState};
use crate::config::MAX_HTTP_CONNECTIONS;
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
/// Responses after this age carry `Connection: close`, and a connection
/// still open `CLOSE_GRACE` later is dropped: bounds a client that never
/// reads its responses.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// neither spins nor gives up; serving resumes once descriptors free up.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// The kernel's queue of connections not yet accepted (as `TcpListener::bind`).
const BACKLOG: u32 = 1024;

type Body = Full<Bytes>;

/// What one listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// JWKS, discovery, `/healthz`, `/readyz`, and `/metrics` unless it has
    /// a listener of its own.
    Public { metrics: bool },
    /// `[http] metrics_listen`: `/metrics` only.
    Metrics,
}

/// What every listener shares.
pub struct Site {
    pub served: ServedState,
    pub metrics: Arc<Metrics>,
    /// Open connections one client address may hold on each listener.
    pub per_client: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds every listener, then serves them on a thread of its own until
/// `shutdown` completes. Returns once all are bound; the returned future
/// completes when every connection has drained (the caller bounds how long
/// it waits).
pub async fn start(
    listeners: Vec<(SocketAddr, Endpoints)>,
    site: Site,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = ()>, ListenError> {
    let (bound_tx, bound_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let first = listeners.first().map(|(addr, _)| *addr);
    let thread_error = |source| ListenError {
        addr: first.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(thread_error)?;
    std::thread::Builder::new()
        .name("keyroll-http".into())
        .spawn(move || {
            runtime.block_on(serve_all(listeners, site, shutdown, bound_tx));
            // Dropped when the runtime is: the daemon waits for this.
            drop(done_tx);
        })
        .map_err(thread_error)?;
    match bound_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(error),
        Err(_) => return Err(thread_error(std::io::Error::other("the HTTP thread ended"))),
    }
    Ok(async move {
        let _ = done_rx.await;
    })
}

async fn serve_all(
    listeners: Vec<(SocketAddr, Endpoints)>,
    site: Site,
    shutdown: impl Future<Output = ()>,
    bound: oneshot::Sender<Result<(), ListenError>>,
) {
    let mut bound_listeners = Vec::new();
    for (addr, endpoints) in listeners {
        match bind(addr) {
            Ok(listener) => bound_listeners.push((listener, endpoints)),
            Err(source) => {
                let _ = bound.send(Err(ListenError { addr, source }));
                return;
            }
        }
    }
    let _ = bound.send(Ok(()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let site = Arc::new(site);
    let servers: Vec<_> = bound_listeners
        .into_iter()
        .map(|(listener, endpoints)| {
            let mut stopped = stopped.clone();
            let until = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            tokio::spawn(serve(listener, endpoints, site.clone(), until))
        })
        .collect();
    shutdown.await;
    let _ = stop.send(true);
    for server in servers {
        let _ = server.await;
    }
}

/// As `TcpListener::bind` (`SO_REUSEADDR`, so a restart binds at once), on
/// the calling runtime.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves one listener until `shutdown` completes, then stops accepting and
/// drains: in-flight responses finish, idle connections close.
async fn serve(
    listener: TcpListener,
    endpoints: Endpoints,
    site: Arc<Site>,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES);
    let slots = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    let clients = Clients::new(site.per_client);
    let graceful = GracefulShutdown::new();
    let mut accept_failing = false;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let (stream, peer, slot) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if !std::mem::replace(&mut accept_failing, true) {
                    tracing::warn!(%error, "HTTP cannot accept connections; retrying");
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        if std::mem::take(&mut accept_failing) {
            tracing::info!("HTTP accepting connections again");
        }
        let Some(client) = clients.admit(peer.ip()) else {
            tracing::debug!(client = %peer.ip(), "HTTP connection refused: the client holds its share of connections");
            site.metrics.http_connection_refused();
            continue;
        };
        let service = Front {
            site: site.clone(),
            endpoints,
            born: Instant::now(),
        };
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _held = (slot, client);
            match tokio::time::timeout(MAX_CONNECTION_AGE + CLOSE_GRACE, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, "HTTP connection ended with an error"),
                Err(_) => tracing::debug!("HTTP connection dropped past its maximum age"),
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Waits for a free connection slot, then for a connection.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    // The semaphore is never closed, so acquiring cannot fail.
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(std::io::Error::other)?;
    let (stream, peer) = listener.accept().await?;
    // Responses are written whole; waiting to coalesce them only adds latency.
    let _ = stream.set_nodelay(true);
    Ok((stream, peer, slot))
}

/// Open connections per client address. An IPv6 client counts by its /64,
/// the prefix one host usually holds whole.
#[derive(Clone)]
struct Clients {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
}

impl Clients {
    fn new(limit: usize) -> Self {
        Clients {
            open: Arc::default(),
            limit,
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
            v4 => v4,
        }
    }

    /// A hold on one of `ip`'s connections, or `None` at its limit.
    fn admit(&self, ip: IpAddr) -> Option<ClientHold> {
        let key = Self::key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(ClientHold {
            clients: self.clone(),
            key,
        })
    }
}

/// Released when its connection ends.
struct ClientHold {
    clients: Clients,
    key: IpAddr,
}

impl Drop for ClientHold {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// One connection's service. Every answer is ready at once: built from the
/// served snapshot with header values rendered beforehand, no routing
/// layers, no boxing.
struct Front {
    site: Arc<Site>,
    endpoints: Endpoints,
    born: Instant,
}

impl hyper::service::Service<Request<Incoming>> for Front {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let mut response = self.answer(&request);
        if self.born.elapsed() >= MAX_CONNECTION_AGE {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        ready(Ok(response))
    }
}

impl Front {
    fn answer(&self, request: &Request<Incoming>) -> Response<Body> {
        let (method, headers, path) = (request.method(), request.headers(), request.uri().path());
        if declares_large_body(headers) {
            return text(
                method,
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large\n",
            );
        }
        let with_metrics = match self.endpoints {
            Endpoints::Metrics if path == "/metrics" => return self.metrics_text(method),
            Endpoints::Metrics => return not_found(),
            Endpoints::Public { metrics } => metrics,
        };
        let served = self.site.served.load();
        if let Some(wanted) = jwks_path(path) {
            let name = match wanted {
                JwksPath::Default => served.default_keyset.as_deref(),
                JwksPath::Named(name) => Some(name),
            };
            let jwks = name.and_then(|name| served.keysets.get(name));
            return document_response(method, headers, jwks.map(|j| j.as_ref()), JWKS_CONTENT_TYPE);
        }
        // Until the keyset's JWKS is published, its discovery routes answer
        // 404 like its JWKS.
        if let Some(route) = served.routes.get(path) {
            let jwks = served.keysets.get(route.keyset());
            return match route {
                Route::Discovery { document, .. } => document_response(
                    method,
                    headers,
                    jwks.map(|_| document.as_ref()),
                    DISCOVERY_CONTENT_TYPE,
                ),
                Route::Jwks { .. } => {
                    document_response(method, headers, jwks.map(|j| j.as_ref()), JWKS_CONTENT_TYPE)
                }
            };
        }
        match path {
            "/healthz" if readable(method) => text(method, StatusCode::OK, "ok\n"),
            "/readyz" if readable(method) => {
                let missing = served.not_ready();
                if missing.is_empty() {
                    text(method, StatusCode::OK, "ready\n")
                } else {
                    let body = format!("not ready: {}\n", missing.join("; "));
                    text(method, StatusCode::SERVICE_UNAVAILABLE, body)
                }
            }
            "/metrics" if with_metrics => self.metrics_text(method),
            _ => not_found(),
        }
    }

    fn metrics_text(&self, method: &Method) -> Response<Body> {
        if !readable(method) {
            return not_found();
        }
        // keyroll_ready mirrors /readyz at the instant of the scrape.
        let site = &self.site;
        site.metrics.set_ready(site.served.load().ready());
        let body = site.metrics.encode(&crate::clock::SystemClock);
        let mut response = Response::new(body_for(method, body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        );
        response
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

/// A request declaring a body larger than any endpoint could want gets
/// `413`; the body is never read, so hyper closes the connection after.
fn declares_large_body(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .is_some_and(|length| length > MAX_BODY_BYTES)
}

fn not_found() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

fn readable(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// The body for GET, none for HEAD (same headers either way).
fn body_for(method: &Method, body: impl Into<Bytes>) -> Body {
    if method == Method::HEAD {
        Full::new(Bytes::new())
    } else {
        Full::new(body.into())
    }
}

fn text(method: &Method, status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(body_for(method, body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
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
) -> Response<Body> {
    let (Some(jwks), true) = (jwks, readable(method)) else {
        return not_found();
    };
    let not_modified = none_match(headers, &jwks.etag);
    let body = if not_modified {
        Full::new(Bytes::new())
    } else {
        body_for(method, jwks.body.clone())
    };
    let mut response = Response::new(body);
    let out = response.headers_mut();
    out.reserve(4);
    out.insert(header::ETAG, jwks.etag_header.clone());
    out.insert(header::CACHE_CONTROL, jwks.cache_control.clone());
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return response;
    }
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(jwks.body.len()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_count_by_address_and_ipv6_prefix() {
        let clients = Clients::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = clients.admit(a).expect("a's first");
        let _second = clients.admit(a).expect("a's second");
        assert!(clients.admit(a).is_none(), "a's third is refused");
        // IPv4-mapped IPv6 is the same client.
        assert!(clients.admit("::ffff:192.0.2.1".parse().unwrap()).is_none());
        let _other = clients.admit(b).expect("another client is not affected");
        drop(first);
        let _again = clients.admit(a).expect("a closed one: room again");
        // One IPv6 /64 is one client; another /64 is another.
        let _v6 = clients.admit("2001:db8::1".parse().unwrap()).unwrap();
        let _v6b = clients.admit("2001:db8::ffff:2".parse().unwrap()).unwrap();
        assert!(clients.admit("2001:db8::3".parse().unwrap()).is_none());
        assert!(clients.admit("2001:db8:0:1::1".parse().unwrap()).is_some());
    }

    #[test]
    fn a_closed_client_leaves_no_entry() {
        let clients = Clients::new(1);
        drop(clients.admit("192.0.2.1".parse().unwrap()));
        assert!(clients.open.lock().unwrap().is_empty());
    }
}
