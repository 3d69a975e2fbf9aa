//! The gateway's HTTP API (operator role): devices and their sequence gaps, running
//! aggregates, quarantine, the TIDES export; Prometheus metrics.

use crate::daemon::GatewayStats;
use crate::store::Store;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use purse::keys::KeySet;
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tapgate_http::auth::{Auth, AuthError, Role};

/// Shared state.
#[derive(Clone)]
pub struct ApiState {
    /// The store.
    pub store: Store,
    /// The gateway's keys (device-MAC checks when exporting).
    pub keys: KeySet,
    /// Counters.
    pub stats: Arc<GatewayStats>,
    /// Tokens.
    pub auth: Auth,
    /// Currency code and minor-unit exponent for exports.
    pub currency: (String, u32),
    /// The stop and route ids the export writes for tap records' codes.
    pub places: Arc<crate::report::Places>,
    /// `/metrics` without a token (config `metrics_public`); otherwise operator or metrics role.
    pub metrics_public: bool,
    /// The operator this gateway serves (stored taps verify for it).
    pub operator: String,
}

fn err(status: StatusCode, code: &str, detail: String) -> Response {
    (
        status,
        Json(serde_json::json!({"error": code, "detail": detail})),
    )
        .into_response()
}

/// The state, for a caller with an operator token: a handler taking it runs only for one (401
/// or 403 otherwise). It comes after a handler's other extractors, so they are judged first.
struct Operator(ApiState);

impl axum::extract::FromRequestParts<ApiState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &ApiState,
    ) -> Result<Self, Response> {
        let value = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match refusal(st.auth.require(value, &[Role::Operator]).map(|_| ())) {
            None => Ok(Operator(st.clone())),
            Some(r) => Err(r),
        }
    }
}

/// The response for a refused caller, `None` when let in.
fn refusal(r: Result<(), AuthError>) -> Option<Response> {
    match r {
        Ok(()) => None,
        Err(AuthError::Unauthenticated(m)) => {
            Some(err(StatusCode::UNAUTHORIZED, "unauthenticated", m.into()))
        }
        Err(e @ AuthError::Forbidden(_)) => {
            Some(err(StatusCode::FORBIDDEN, "forbidden", e.to_string()))
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(%e, "gateway API");
    err(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see the log".into(),
    )
}

/// Every device the gateway knows of, by id: from its taps (taps stored, highest sequence,
/// open gaps, last tap), its heartbeats (online, last heartbeat, the blocklist and fare table
/// versions it holds, its outbox's depth, its clock's skew) and the quarantine's account of it
/// (`flagged`, `quarantine`). A device only heard from by heartbeat, or only through refused
/// messages, is listed too. `GET /v1/devices` and the console's devices page.
pub fn devices_view(st: &ApiState) -> Result<Vec<serde_json::Value>, crate::store::StoreError> {
    let heartbeats: std::collections::BTreeMap<u64, crate::propagation::ValidatorStatus> = st
        .stats
        .validator_statuses()
        .into_iter()
        .map(|v| (u64::from(v.device_id), v))
        .collect();
    let quarantine = st
        .store
        .quarantine_devices(100_000)?
        .into_iter()
        .collect::<std::collections::BTreeMap<u64, _>>();
    let taps: std::collections::BTreeMap<u64, crate::store::DeviceState> = st
        .store
        .devices()?
        .into_iter()
        .map(|(id, s)| (u64::from(id), s))
        .collect();
    let ids: std::collections::BTreeSet<u64> = taps
        .keys()
        .chain(heartbeats.keys())
        .chain(quarantine.keys())
        .copied()
        .collect();
    Ok(ids
        .into_iter()
        .map(|id| {
            let q = quarantine.get(&id);
            let h = heartbeats.get(&id);
            let s = taps.get(&id).cloned().unwrap_or_default();
            let last_seen_ms = match taps.get(&id) {
                Some(s) => s.last_seen_ms,
                None => q.map_or(0, |q| q.last_seen_ms),
            };
            serde_json::json!({
                "device_id": id, "taps": s.taps, "highest_seq": s.highest_seq,
                "gaps": s.gaps, "last_seen_ms": last_seen_ms,
                "clock_skew_ms": h.and_then(|h| h.clock_skew_ms),
                "flagged": q.is_some_and(|q| q.flagged), "quarantine": q,
                "online": h.is_some_and(|h| h.online),
                "last_heartbeat_ms": h.map(|h| h.last_heartbeat_ms),
                "blocklist_version": h.map(|h| h.blocklist_version),
                "fare_table_version": h.and_then(|h| h.fare_table_version),
                "outbox_depth": h.and_then(|h| h.outbox_depth),
                "device_key_version": s.device_key_version,
            })
        })
        .collect())
}

async fn devices(Operator(st): Operator) -> Response {
    match tokio::task::spawn_blocking(move || devices_view(&st)).await {
        Ok(Ok(out)) => Json(serde_json::json!({ "devices": out })).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn device(Path(id): Path<String>, Operator(st): Operator) -> Response {
    let Ok(id) = id.parse::<u32>() else {
        return err(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("device id {id:?} is not a number"),
        );
    };
    match st.store.device(id) {
        Ok(Some(s)) => Json(serde_json::json!({
            "device_id": id, "taps": s.taps, "highest_seq": s.highest_seq,
            "gaps": s.gaps, "last_seen_ms": s.last_seen_ms,
            "clock_skew_ms": st.stats.propagation.lock().ok().and_then(|p| p.clock_skew(id)),
        }))
        .into_response(),
        Ok(None) => err(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no taps from device {id}"),
        ),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct AggQuery {
    prefix: Option<String>,
    limit: Option<usize>,
}

async fn aggregates(Query(q): Query<AggQuery>, Operator(st): Operator) -> Response {
    let prefix = q.prefix.unwrap_or_default();
    match st
        .store
        .aggregates_kept_from(&prefix, q.limit.unwrap_or(10_000).min(100_000))
    {
        Ok((a, from)) => Json(serde_json::json!({
            "aggregates": a.iter().map(|(k, v)| serde_json::json!({
                "key": k, "taps": v.taps, "refused": v.refused, "amount_minor": v.amount_minor,
            })).collect::<Vec<_>>(),
            // `card-day:` aggregates of the days before it were trimmed (their retention
            // ended): not shown, rather than shown as zero or as part of a day.
            "card_days_kept_from": from,
        }))
        .into_response(),
        Err(e) => internal(e),
    }
}

async fn quarantine(Operator(st): Operator) -> Response {
    match st.store.quarantined(1_000) {
        Ok(q) => Json(serde_json::json!({"quarantined": q})).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct ExportQuery {
    from_ms: Option<u64>,
    to_ms: Option<u64>,
}

async fn tides(Query(q): Query<ExportQuery>, Operator(st): Operator) -> Response {
    let (from, to) = (q.from_ms.unwrap_or(0), q.to_ms.unwrap_or(u64::MAX));
    if from >= to {
        return err(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "from_ms must be before to_ms".into(),
        );
    }
    let (cur, exp) = st.currency.clone();
    let keys = st.keys.clone();
    let store = st.store.clone();
    let operator = st.operator.clone();
    let places = st.places.clone();
    let csv = tokio::task::spawn_blocking(move || {
        crate::report::tides_fare_transactions(
            &store,
            &operator,
            |d| keys.device_key_ring(d).unwrap_or_default(),
            from,
            to,
            &cur,
            exp,
            &places,
            10_000_000,
        )
    })
    .await;
    match csv {
        Ok(Ok(csv)) => (
            [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            csv,
        )
            .into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

/// `GET /metrics`: an operator or metrics token, unless `metrics_public`.
async fn metrics(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(r) = refusal(st.auth.metrics_caller(value, st.metrics_public)) {
        return r;
    }
    let s = &st.stats;
    let mut out = crate::metrics::counters(&[
        ("tapgate_gateway_taps_stored_total", &s.stored),
        ("tapgate_gateway_taps_duplicate_total", &s.duplicates),
        ("tapgate_gateway_taps_quarantined_total", &s.quarantined),
        ("tapgate_gateway_taps_forwarded_total", &s.forwarded),
        (
            "tapgate_gateway_blocklists_refused_total",
            &s.blocklists_refused,
        ),
        (
            "tapgate_gateway_forward_failures_total",
            &s.forward_failures,
        ),
        (
            "tapgate_gateway_propagation_reports_dropped_total",
            &s.propagation_reports_dropped,
        ),
    ]);
    if let Ok(n) = st.store.outbox_len() {
        out.push_str(&format!(
            "# TYPE tapgate_gateway_outbox_taps gauge\ntapgate_gateway_outbox_taps {n}\n"
        ));
    }
    if let Ok(q) = st.store.quarantine_devices(100_000) {
        let flagged = q.iter().filter(|(_, d)| d.flagged).count();
        let dropped: u64 = q.iter().map(|(_, d)| d.dropped_entries).sum();
        let throttled: u64 = q.iter().map(|(_, d)| d.throttled_messages).sum();
        out.push_str(&format!(
            "# TYPE tapgate_gateway_quarantine_flagged_devices gauge\ntapgate_gateway_quarantine_flagged_devices {flagged}\n\
             # TYPE tapgate_gateway_quarantine_dropped_total counter\ntapgate_gateway_quarantine_dropped_total {dropped}\n\
             # TYPE tapgate_gateway_quarantine_throttled_total counter\ntapgate_gateway_quarantine_throttled_total {throttled}\n"
        ));
    }
    let full = u8::from(st.stats.store_full.load(Ordering::Relaxed));
    let full_events = st.stats.store_full_events.load(Ordering::Relaxed);
    out.push_str(&format!(
        "# TYPE tapgate_gateway_store_full gauge\ntapgate_gateway_store_full {full}\n\
         # TYPE tapgate_gateway_store_full_total counter\ntapgate_gateway_store_full_total {full_events}\n"
    ));
    if let Some(b) = st.stats.broker.get() {
        out.push_str(&b.prometheus());
    }
    if let Ok(p) = st.stats.propagation.lock() {
        out.push_str(&crate::metrics::validators(&p));
    }
    if let Ok(d) = st.store.devices() {
        out.push_str(&crate::metrics::gaps(&d));
    }
    let up = u8::from(st.stats.subscribed.load(Ordering::Relaxed));
    out.push_str(&format!(
        "# TYPE tapgate_gateway_mqtt_subscribed gauge\ntapgate_gateway_mqtt_subscribed {up}\n"
    ));
    tapgate_http::serve::prometheus_text(out)
}

#[derive(serde::Deserialize)]
struct PropagationQuery {
    version: Option<u64>,
}

/// `GET /v1/blocklist/propagation?version=V` (default: the latest published): how long until
/// 50%, 99% and 100% of the online validators held that version.
async fn propagation(Query(q): Query<PropagationQuery>, Operator(st): Operator) -> Response {
    let Ok(p) = st.stats.propagation.lock() else {
        return internal("propagation lock poisoned");
    };
    let Some(version) = q.version.or_else(|| p.latest()) else {
        return err(
            StatusCode::NOT_FOUND,
            "no_version",
            "no blocklist version has been published by this gateway yet".into(),
        );
    };
    match p.report(version) {
        Some(r) => Json(r).into_response(),
        None => err(
            StatusCode::NOT_FOUND,
            "unknown_version",
            format!("version {version} was not published by this gateway (or is too old to be remembered)"),
        ),
    }
}

/// The router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{id}", get(device))
        .route("/v1/aggregates", get(aggregates))
        .route("/v1/quarantine", get(quarantine))
        .route("/v1/blocklist/propagation", get(propagation))
        .route("/v1/export/tides/fare_transactions.csv", get(tides))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}
