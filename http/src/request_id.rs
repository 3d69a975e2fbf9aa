//! A request id per HTTP request: the caller's `X-Request-Id` when it is a short token, else
//! one made here (unique in the process: its start time and a counter). The handler runs inside
//! a `request` span carrying `request_id`, `method` and `path`, so every log line written while
//! answering names the request; the answer carries the id back in `X-Request-Id`. Each answer
//! is logged at debug level (`TAPGATE_LOG=tapgate_http=debug`): status and time taken.
//! [`serve_router`](crate::serve::serve_router) adds the layer to every router it serves.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use tracing::Instrument;

/// The header both ways.
pub const HEADER: &str = "x-request-id";

/// Longest caller-chosen id kept.
const MAX_LEN: usize = 64;

/// A request's id, also in the request's extensions for handlers that want it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The caller's id if it is 1 to 64 characters of `[A-Za-z0-9._-]`, else a new one.
pub fn request_id(given: Option<&HeaderValue>) -> String {
    if let Some(v) = given.and_then(|v| v.to_str().ok()) {
        if !v.is_empty()
            && v.len() <= MAX_LEN
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return v.to_string();
        }
    }
    static START: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let start = *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    });
    format!("{start:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The middleware (`axum::middleware::from_fn(layer)`).
pub async fn layer(mut req: Request, next: Next) -> Response {
    let id = request_id(req.headers().get(HEADER));
    // At ERROR level so that the span is on whatever the log filter: its level only decides
    // whether it exists, and the request id must be on every line written for the request.
    let span = tracing::error_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path()
    );
    req.extensions_mut().insert(RequestId(id.clone()));
    let started = std::time::Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "answered"
        )
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(HEADER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_id_is_kept_when_it_is_a_short_token_and_replaced_otherwise() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(request_id(Some(&h("abc-123_X.y"))), "abc-123_X.y");
        let made = request_id(Some(&h("has space")));
        assert_ne!(made, "has space");
        assert!(!request_id(Some(&h(&"a".repeat(65)))).starts_with("aaaa"));
        let (a, b) = (request_id(None), request_id(None));
        assert_ne!(a, b, "ids made here are unique");
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-'));
    }
}
