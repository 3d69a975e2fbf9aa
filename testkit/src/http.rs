//! The HTTP calls the tests make to the charging server and the gateway's API: JSON in and
//! out, a bearer token, an optional Idempotency-Key; every answer, error statuses included,
//! returned as (status, body) so that a test asserts on it (a body that is not JSON reads as
//! `null`). A transport error (nothing listening) panics.

use serde_json::Value;

/// `method url` with `token` (if any) as bearer, `key` (if any) as Idempotency-Key and
/// `body` (if any) as JSON.
pub fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let (code, text) = call_text(method, url, token, key, body);
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// [`call`], the body as text (empty when unreadable).
pub fn call_text(
    method: &str,
    url: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut req = ureq::request(method, url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    if let Some(k) = key {
        req = req.set("Idempotency-Key", k);
    }
    let res = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match res {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{method} {url}: transport error: {e}"),
    }
}

/// GET a text body (the Prometheus metrics) with a bearer token.
pub fn get_text(url: &str, token: &str) -> (u16, String) {
    call_text("GET", url, Some(token), None, None)
}

/// GET with a bearer token.
pub fn get(url: &str, token: &str) -> (u16, Value) {
    call("GET", url, Some(token), None, None)
}

/// POST JSON with a bearer token.
pub fn post(url: &str, token: &str, body: Value) -> (u16, Value) {
    call("POST", url, Some(token), None, Some(body))
}

/// POST JSON with a bearer token and an Idempotency-Key.
pub fn post_with_key(url: &str, token: &str, key: &str, body: Value) -> (u16, Value) {
    call("POST", url, Some(token), Some(key), Some(body))
}
