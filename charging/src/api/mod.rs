//! The charging server's HTTP API (axum). Documented in `charging/openapi.yaml`, which the
//! server also serves at `/openapi.yaml`.
//!
//! Every endpoint that changes state or reads private data needs `Authorization: Bearer
//! <token>`; tokens map to a caller name and a role (cardholder, operator, partner, gateway,
//! merchant, metrics).

mod blocklist;
mod cards;
mod fares;
mod franchise;
mod loads;
mod orders;
mod partner;
mod payments;
mod propagation;
pub mod snapshot_cache;

use blocklist::*;
use cards::*;
use franchise::*;
use loads::*;
use orders::*;
use partner::*;
use payments::*;
use propagation::*;

pub use cards::{BlockCard, RegisterCard};
pub use loads::{Funding, RegisterInstrument, StartLoad, StartReversal, StepBody};
pub use orders::{order_json, CreateOrder};
pub use partner::CreditPoints;
pub use payments::{payment_json, refund_json, rfc3339, CreatePayment, CreateRefund, PayPayment};
pub use propagation::PropagationReport;

use crate::load::{LoadError, LoadRequest, LoadService, Reply};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The OpenAPI description of this API.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

pub use tapgate_http::auth::{Auth, Caller, Role, TokenEntry};

/// The caller of a request, if its role is one of `roles`.
fn require(auth: &Auth, headers: &HeaderMap, roles: &[Role]) -> Result<Caller, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    auth.require(value, roles).map_err(ApiError::from)
}

impl From<tapgate_http::auth::AuthError> for ApiError {
    fn from(e: tapgate_http::auth::AuthError) -> Self {
        match e {
            tapgate_http::auth::AuthError::Unauthenticated(m) => ApiError::Unauthenticated(m),
            tapgate_http::auth::AuthError::Forbidden(r) => ApiError::Forbidden(r),
        }
    }
}

/// API errors, each with its HTTP status and a JSON body `{"error": code, "detail": text}`.
#[derive(Clone, Debug)]
pub enum ApiError {
    /// 401
    Unauthenticated(&'static str),
    /// 403
    Forbidden(Role),
    /// 403, with what was refused
    ForbiddenDetail(String),
    /// 400
    BadRequest(String),
    /// 404
    NotFound(String),
    /// 409
    Conflict(String),
    /// 409 with its own stable error code: `unknown_session` (a relay step reached a server
    /// that does not hold its session), `in_progress` (retry shortly with the same key)
    ConflictCode(&'static str, String),
    /// 422: an Idempotency-Key (or a partner reference) reused for a different request
    IdempotencyKeyReused(String),
    /// 503
    Busy,
    /// 429, with Retry-After seconds
    TooMany(u64),
    /// 500
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, detail) = match self {
            ApiError::Unauthenticated(d) => {
                (StatusCode::UNAUTHORIZED, "unauthenticated", d.to_string())
            }
            ApiError::Forbidden(r) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("role {r:?} may not do this"),
            ),
            ApiError::ForbiddenDetail(d) => (StatusCode::FORBIDDEN, "forbidden", d),
            ApiError::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad_request", d),
            ApiError::NotFound(d) => (StatusCode::NOT_FOUND, "not_found", d),
            ApiError::Conflict(d) => (StatusCode::CONFLICT, "conflict", d),
            ApiError::ConflictCode(code, d) => (StatusCode::CONFLICT, code, d),
            ApiError::IdempotencyKeyReused(d) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                d,
            ),
            ApiError::TooMany(after) => {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(axum::http::header::RETRY_AFTER, after.to_string())],
                    Json(serde_json::json!({"error": "rate_limited", "detail": format!("too many loads started; retry in {after} s")})),
                )
                    .into_response()
            }
            ApiError::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many load sessions; retry later".into(),
            ),
            ApiError::Internal(d) => {
                tracing::error!(detail = %d, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server log".into(),
                )
            }
        };
        (
            status,
            Json(serde_json::json!({"error": code, "detail": detail})),
        )
            .into_response()
    }
}

/// The error code of a relay step that reached a server not holding its session (409): the
/// client starts again with the same Idempotency-Key ([`crate::client`] does).
pub const UNKNOWN_SESSION: &str = "unknown_session";
/// The error code of a start or step whose load is being worked on right now, here or on
/// another server (409): retry shortly with the same Idempotency-Key.
pub const IN_PROGRESS: &str = "in_progress";

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::BadRequest(d) => ApiError::BadRequest(d),
            // Another caller's session is answered as one this server does not hold.
            LoadError::NoSession(_) => ApiError::ConflictCode(UNKNOWN_SESSION, e.to_string()),
            LoadError::NotYours => ApiError::ConflictCode(
                UNKNOWN_SESSION,
                "no such load session on this server: start again with the same Idempotency-Key"
                    .into(),
            ),
            LoadError::OutOfOrder { .. } => ApiError::Conflict(e.to_string()),
            LoadError::Busy => ApiError::Busy,
            LoadError::NoSuchLoad { .. } | LoadError::NoSuchPayment(_) => {
                ApiError::NotFound(e.to_string())
            }
            LoadError::PaymentNotPayable(d) => ApiError::Conflict(d),
            LoadError::RefundRefused(_) => ApiError::Conflict(e.to_string()),
            LoadError::PaymentLimit(d) | LoadError::Pin(d) => ApiError::ForbiddenDetail(d),
            LoadError::NotReversible(_) => ApiError::Conflict(e.to_string()),
            LoadError::InProgress => ApiError::ConflictCode(IN_PROGRESS, e.to_string()),
            LoadError::NotYourInstrument { .. } => ApiError::ForbiddenDetail(e.to_string()),
            LoadError::InstrumentTaken(d) | LoadError::RegistrationConflict(d) => {
                ApiError::Conflict(d)
            }
            LoadError::IdempotencyKeyReused(_) => ApiError::IdempotencyKeyReused(e.to_string()),
            LoadError::Ledger(_) | LoadError::Hsm(_) => ApiError::Internal(e.to_string()),
        }
    }
}

/// A ledger read or write that failed: the server's fault (500).
impl From<crate::ledger::LedgerError> for ApiError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// Shared state of the server.
#[derive(Clone)]
pub struct AppState {
    /// Loads.
    pub loads: Arc<LoadService>,
    /// Token verification.
    pub auth: Auth,
    /// Partner signature verification.
    pub partners: crate::partner::Partners,
    /// Franchises by name.
    pub franchises: Arc<std::collections::HashMap<String, crate::franchise::FranchiseConfig>>,
    /// Clock (unix ms) — injected so tests control time.
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Prometheus registry.
    pub metrics: prometheus::Registry,
    /// Clearing's counters (`/metrics`).
    pub clearing: Arc<crate::clearing::ClearingStats>,
    /// Per-caller rate limit on starting loads.
    pub rate: Arc<RateLimiter>,
    /// The operator id blocklists are signed for.
    pub operator: String,
    /// Gateway token name → the operators it may book taps to (unlisted: `operator` only).
    pub gateway_operators: Arc<std::collections::HashMap<String, Vec<String>>>,
    /// `/metrics` without a token (config `metrics_public`); otherwise operator or metrics role.
    pub metrics_public: bool,
    /// Relay requests run on the HTTP worker itself (LMDB ledger and the in-process software
    /// HSM: the steps are memory reads and microseconds of crypto); otherwise (PostgreSQL, whose
    /// reads are round trips, or a PKCS#11 token, which may be a network HSM taking
    /// milliseconds per call) each request goes to a blocking thread.
    pub relay_inline: bool,
    /// The signed blocklist snapshot of the latest version, built once per version (issue 22).
    pub blocklist_snapshot: Arc<snapshot_cache::SnapshotCache>,
}

/// A token bucket per caller: `per_minute` starts, refilled continuously, at most
/// `max_callers` buckets (the oldest idle ones are dropped beyond it).
pub struct RateLimiter {
    per_minute: u32,
    max_callers: usize,
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, u64)>>,
}

impl RateLimiter {
    /// `per_minute` starts per caller (0 = unlimited).
    pub fn new(per_minute: u32) -> Self {
        RateLimiter {
            per_minute,
            max_callers: 100_000,
            buckets: Default::default(),
        }
    }

    /// Takes one token for `caller` at `now_ms`; `Err(retry_after_s)` when empty.
    pub fn take(&self, caller: &str, now_ms: u64) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let cap = f64::from(self.per_minute);
        let mut b = self.buckets.lock().expect("rate lock");
        if b.len() >= self.max_callers && !b.contains_key(caller) {
            let cutoff = now_ms.saturating_sub(60_000);
            b.retain(|_, (_, last)| *last >= cutoff);
        }
        let (tokens, last) = b.entry(caller.to_string()).or_insert((cap, now_ms));
        let refill = (now_ms.saturating_sub(*last) as f64) * cap / 60_000.0;
        *tokens = (*tokens + refill).min(cap);
        *last = now_ms;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - *tokens) * 60.0 / cap).ceil() as u64).max(1))
        }
    }
}

fn uid_of(s: &str) -> Result<[u8; 7], ApiError> {
    hex::decode(s)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| {
            ApiError::BadRequest(format!("card_uid {s:?} must be 14 hex digits (7 bytes)"))
        })
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("request body: {e}")))
}

/// Runs work that may block (an HSM call, a group commit's fsync) on this worker thread,
/// telling the runtime to move its other tasks elsewhere: no hand-off to a blocking pool, which
/// costs two context switches per request. On a current-thread runtime it falls back to the
/// blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ApiError::Internal(format!("worker failed: {e}")))?,
    }
}

/// `GET /metrics`: an operator or metrics token, unless `metrics_public`.
async fn metrics(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = st.auth.metrics_caller(value, st.metrics_public) {
        return ApiError::from(e).into_response();
    }
    let stats = st.loads.stats();
    let mut out = String::new();
    for (name, v) in [
        ("tapgate_charging_loads_completed_total", stats.completed),
        ("tapgate_charging_loads_refused_total", stats.refused),
        ("tapgate_charging_loads_pending_total", stats.pending),
        (
            "tapgate_charging_loads_settled_completed_total",
            stats.settled_completed,
        ),
        (
            "tapgate_charging_loads_settled_voided_total",
            stats.settled_voided,
        ),
        (
            "tapgate_charging_payments_completed_total",
            stats.payments_completed,
        ),
        ("tapgate_charging_keys_rotated_total", stats.keys_rotated),
        // Transactions the ledger's database aborted and this process ran again (PostgreSQL;
        // always 0 on LMDB).
        (
            "tapgate_charging_ledger_retries_total",
            crate::ledger::PgLedger::retries(),
        ),
    ] {
        out.push_str(&format!("# TYPE {name} counter\n{name} {v}\n"));
    }
    out.push_str(&st.clearing.render());
    let encoder = prometheus::TextEncoder::new();
    if let Ok(s) = encoder.encode_to_string(&st.metrics.gather()) {
        out.push_str(&s);
    }
    tapgate_http::serve::prometheus_text(out)
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/loads", post(start_load))
        .route("/v1/loads/{id}/steps", post(load_step))
        .route("/v1/reversals", post(start_reversal))
        .route("/v1/cards", post(register_card))
        .route("/v1/cards/{uid}", get(get_card))
        .route(
            "/v1/cards/{uid}/block",
            post(|st, uid, headers, body| operator_set_block(st, uid, headers, body, true)),
        )
        .route(
            "/v1/cards/{uid}/unblock",
            post(|st, uid, headers, body| operator_set_block(st, uid, headers, body, false)),
        )
        .route("/v1/cards/{uid}/report", post(report_card))
        .route("/v1/blocklist/changes", get(block_changes))
        .route("/v1/anomalies", get(anomalies))
        .route("/v1/blocklist/signed/snapshot", get(signed_snapshot))
        .route("/v1/blocklist/signed/delta", get(signed_delta))
        .route(
            "/v1/blocklist/propagation",
            get(read_propagation).post(report_propagation),
        )
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/actions/signed/snapshot", get(actions_snapshot))
        .route("/v1/actions/signed/delta", get(actions_delta))
        .route("/v1/validators/{device}/ceiling", post(validator_ceiling))
        .route("/v1/partner/vouchers", post(partner_voucher))
        .route(
            "/v1/clearing/batches",
            post(clearing_batch).layer(axum::extract::DefaultBodyLimit::max(8 << 20)),
        )
        .route(
            "/v1/franchise/loads",
            post(franchise_loads).layer(axum::extract::DefaultBodyLimit::max(8 << 20)),
        )
        .route("/v1/franchise/ceiling", post(franchise_ceiling))
        .route("/v1/franchises/{name}", get(franchise_status))
        .route("/v1/franchises/{name}/payments", post(franchise_payment))
        .route("/v1/vouchers/lookup", post(lookup_voucher))
        .route(
            "/v1/instruments",
            post(register_instrument).get(list_instruments),
        )
        .route("/v1/partner/points", post(credit_points))
        .route("/v1/merchant/payments", post(create_payment))
        .route("/v1/merchant/payments/{id}", get(merchant_payment))
        .route("/v1/merchant/notification-key", get(notification_key))
        .route("/v1/merchant/payments/{id}/refunds", post(create_refund))
        .route("/v1/merchant/refunds/{id}", get(merchant_refund))
        .route("/v1/refunds/{id}", get(refund_for_cardholder))
        .route("/v1/refunds/{id}/collect", collect_refund())
        .route("/v1/payments/{id}", get(payment_for_cardholder))
        .route("/v1/payments/{id}/pay", pay_payment())
        .route("/v1/cards/{uid}/payment-pin", post(set_payment_pin))
        .merge(fares::routes())
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/openapi.yaml",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/yaml")],
                    OPENAPI_YAML,
                )
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_refills_per_caller() {
        let r = RateLimiter::new(2);
        assert!(r.take("a", 0).is_ok());
        assert!(r.take("a", 0).is_ok());
        assert_eq!(r.take("a", 0), Err(30));
        assert!(r.take("b", 0).is_ok(), "per caller");
        assert!(r.take("a", 30_000).is_ok(), "refilled after half a minute");
        assert!(RateLimiter::new(0).take("a", 0).is_ok());
    }
}
