//! The HTTP endpoints (SPEC §4): JWKS per keyset with a strong ETag,
//! `If-None-Match` → 304 and `Cache-Control`; `/healthz`, `/readyz`,
//! `/metrics`. Requests read a pre-rendered snapshot; they never touch the
//! store or wait for a reconcile.

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use tokio::net::TcpListener;

use super::{JwksDocument, ServedState};
use crate::metrics::Metrics;

pub const JWKS_CONTENT_TYPE: &str = "application/jwk-set+json";

#[derive(Clone)]
struct AppState {
    served: ServedState,
    metrics: Arc<Metrics>,
}

pub fn router(served: ServedState, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", any(default_jwks))
        .route("/keysets/{name}/jwks.json", any(keyset_jwks))
        .route("/healthz", any(healthz))
        .route("/readyz", any(readyz))
        .route("/metrics", any(metrics_text))
        .fallback(|| async { not_found() })
        .with_state(AppState { served, metrics })
}

/// Serves until `shutdown` completes, then finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    served: ServedState,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(served, metrics))
        .with_graceful_shutdown(shutdown)
        .await
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

async fn default_jwks(method: Method, headers: HeaderMap, State(app): State<AppState>) -> Response {
    let served = app.served.load();
    let jwks = served
        .default_keyset
        .as_ref()
        .and_then(|name| served.keysets.get(name));
    jwks_response(&method, &headers, jwks.map(|j| j.as_ref()))
}

async fn keyset_jwks(
    method: Method,
    headers: HeaderMap,
    Path(name): Path<String>,
    State(app): State<AppState>,
) -> Response {
    let served = app.served.load();
    jwks_response(
        &method,
        &headers,
        served.keysets.get(&name).map(|j| j.as_ref()),
    )
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

fn jwks_response(method: &Method, headers: &HeaderMap, jwks: Option<&JwksDocument>) -> Response {
    let (Some(jwks), true) = (jwks, readable(method)) else {
        return not_found();
    };
    let cache_control = format!("public, max-age={}", jwks.max_age_seconds);
    let mut builder = Response::builder()
        .header(header::ETAG, &jwks.etag)
        .header(header::CACHE_CONTROL, cache_control);
    if none_match(headers, &jwks.etag) {
        builder = builder.status(StatusCode::NOT_MODIFIED);
        return builder.body(Body::empty()).unwrap_or_else(|_| not_found());
    }
    builder
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, JWKS_CONTENT_TYPE)
        .header(header::CONTENT_LENGTH, jwks.body.len())
        .body(body_for(method, jwks.body.clone()))
        .unwrap_or_else(|_| not_found())
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
    let missing: Vec<&str> = served
        .expected
        .iter()
        .filter(|name| !served.keysets.contains_key(*name))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        text(
            &method,
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ready\n".into(),
        )
    } else {
        let body = format!(
            "not ready: keysets not yet published: {}\n",
            missing.join(", ")
        );
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
    let body = app.metrics.encode(&crate::clock::SystemClock);
    text(&method, StatusCode::OK, crate::metrics::CONTENT_TYPE, body)
}
