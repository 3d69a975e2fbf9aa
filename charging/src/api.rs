//! The charging server's HTTP API (axum). Documented in `charging/openapi.yaml`, which the
//! server also serves at `/openapi.yaml`.
//!
//! Every endpoint that changes state or reads private data needs `Authorization: Bearer
//! <token>`; tokens map to a caller name and a role (cardholder, operator, partner, gateway).

use crate::load::{LoadError, LoadRequest, LoadService, Reply};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The OpenAPI description of this API.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

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
#[derive(Debug)]
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

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::BadRequest(d) => ApiError::BadRequest(d),
            LoadError::NoSession(_) => ApiError::NotFound(e.to_string()),
            LoadError::NotYours => ApiError::NotFound("no such load session".into()),
            LoadError::OutOfOrder { .. } => ApiError::Conflict(e.to_string()),
            LoadError::Busy => ApiError::Busy,
            LoadError::NoSuchLoad { .. } => ApiError::NotFound(e.to_string()),
            LoadError::NotReversible(_) | LoadError::InProgress => {
                ApiError::Conflict(e.to_string())
            }
            LoadError::NotYourInstrument { .. } => ApiError::ForbiddenDetail(e.to_string()),
            LoadError::InstrumentTaken(d) => ApiError::Conflict(d),
            LoadError::IdempotencyKeyReused(_) => ApiError::IdempotencyKeyReused(e.to_string()),
            LoadError::Ledger(_) | LoadError::Hsm(_) => ApiError::Internal(e.to_string()),
        }
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
    /// Per-caller rate limit on starting loads.
    pub rate: Arc<RateLimiter>,
    /// The operator id blocklists are signed for.
    pub operator: String,
    /// Gateway token name → the operators it may book taps to (unlisted: `operator` only).
    pub gateway_operators: Arc<std::collections::HashMap<String, Vec<String>>>,
    /// `/metrics` without a token (config `metrics_public`); otherwise operator or metrics role.
    pub metrics_public: bool,
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

/// `POST /v1/loads` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartLoad {
    /// Card UID, 14 hex digits.
    pub card_uid: String,
    /// Amount, minor units.
    pub amount_minor: i32,
    /// Funding.
    pub funding: Funding,
}

/// `POST /v1/reversals` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartReversal {
    /// Card UID, 14 hex digits.
    pub card_uid: String,
    /// The counter the load to reverse consumed (the `tmc` of its `completed` answer).
    pub load_tmc: u32,
}

/// Funding part of a load request.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Funding {
    /// Source name: `card`, `mileage`, `points`, …
    pub source: String,
    /// Instrument at the source: a card token, a points holder.
    pub instrument: String,
}

/// `POST /v1/loads/{id}/steps` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepBody {
    /// The step number from the commands being answered.
    pub seq: u32,
    /// The card's response APDUs, hex, in command order.
    pub responses: Vec<String>,
}

/// `POST /v1/cards` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterCard {
    /// Card UID, 14 hex digits.
    pub card_uid: String,
    /// Value personalised onto the card, minor units.
    pub personalised_minor: i64,
    /// The cardholder (API caller name) who owns it and may report it lost or stolen.
    #[serde(default)]
    pub owner: Option<String>,
}

/// `POST /v1/cards/{uid}/block` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockCard {
    /// Why (lost, stolen, fraud).
    pub reason: String,
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

/// What starting a load or a reversal checks: the Idempotency-Key, the card UID, the caller's
/// rate. Returns (key, uid, now).
fn start_checks(
    st: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    card_uid: &str,
) -> Result<(String, [u8; 7], u64), ApiError> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest("an Idempotency-Key header is required".into()))?
        .to_string();
    let uid = uid_of(card_uid)?;
    let now = (st.clock)();
    st.rate.take(&caller.name, now).map_err(ApiError::TooMany)?;
    Ok((key, uid, now))
}

async fn start_load(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Reply>, ApiError> {
    let caller = require(
        &st.auth,
        &headers,
        &[Role::Cardholder, Role::Partner, Role::Operator],
    )?;
    let req: StartLoad = json_body(&body)?;
    let (key, uid, now) = start_checks(&st, &headers, &caller, &req.card_uid)?;
    if caller.role == Role::Cardholder {
        own_card_or_anonymous(&st, &caller, &uid)?;
    }
    let loads = st.loads.clone();
    let reply = blocking(move || {
        Ok(loads.start(
            &caller.name,
            LoadRequest {
                uid,
                amount_minor: req.amount_minor,
                funding_source: req.funding.source,
                instrument: req.funding.instrument,
                idempotency_key: key,
            },
            now,
        )?)
    })
    .await?;
    Ok(Json(reply))
}

/// A cardholder loads only its own cards: a card registered with an owner is that owner's
/// alone; a card registered without one (anonymous, sold over the counter) or not registered
/// is loaded by whoever holds it (the card proves itself to the HSM in the dialogue).
fn own_card_or_anonymous(st: &AppState, caller: &Caller, uid: &[u8; 7]) -> Result<(), ApiError> {
    let l = st.loads.ledger();
    let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
    let shadow = r.card(uid).map_err(|e| ApiError::Internal(e.to_string()))?;
    match shadow.owner.as_deref() {
        Some(owner) if owner != caller.name => Err(ApiError::ForbiddenDetail(format!(
            "card {} is registered to another account",
            hex::encode_upper(uid)
        ))),
        _ => Ok(()),
    }
}

/// `POST /v1/instruments` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterInstrument {
    /// Source name: `card` (processor tokens); points memberships are linked by their programme.
    pub source: String,
    /// The instrument id (e.g. the processor's card token).
    pub instrument: String,
}

/// `POST /v1/instruments`: registers a funding instrument (a card-processor token) to the
/// caller's account; 201 when new, 200 when it was already the caller's, 409 when it is
/// another account's.
async fn register_instrument(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let caller = require(
        &st.auth,
        &headers,
        &[Role::Cardholder, Role::Partner, Role::Operator],
    )?;
    let req: RegisterInstrument = json_body(&body)?;
    let now = (st.clock)();
    let loads = st.loads.clone();
    let name = caller.name.clone();
    let (source, instrument) = (req.source.clone(), req.instrument.clone());
    let new = blocking(move || {
        Ok(loads.register_instrument(&name, &req.source, &req.instrument, now)?)
    })
    .await?;
    Ok((
        if new {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(
            serde_json::json!({"source": source, "instrument": instrument, "account": caller.name}),
        ),
    ))
}

/// `GET /v1/instruments`: the caller's registered instruments.
async fn list_instruments(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = require(
        &st.auth,
        &headers,
        &[Role::Cardholder, Role::Partner, Role::Operator],
    )?;
    let l = st.loads.ledger();
    let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
    let list = r
        .instruments_of(&caller.name)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(serde_json::json!({
        "instruments": list.iter().map(|i| serde_json::json!({"source": i.source, "instrument": i.id, "registered_ms": i.registered_ms})).collect::<Vec<_>>(),
    })))
}

/// `POST /v1/partner/points` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditPoints {
    /// The points programme (a `[[points]]` name).
    pub program: String,
    /// The member id at the programme (the funding instrument: `<program>:<member_id>`).
    pub member_id: String,
    /// The cardholder account (token name) the membership belongs to.
    pub account: String,
    /// Points to credit.
    pub points: i64,
    /// The programme's reference (idempotency: the same credit again is answered once).
    pub reference: String,
}

/// `POST /v1/partner/points` (role partner, one of the programme's `partners`): credits points
/// to a member and links the membership to the cardholder account it belongs to.
async fn credit_points(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<crate::funding::Earned>), ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Partner])?;
    let req: CreditPoints = json_body(&body)?;
    let now = (st.clock)();
    let loads = st.loads.clone();
    let earned = blocking(move || {
        let program = loads
            .points_program(&req.program)
            .ok_or_else(|| ApiError::NotFound(format!("no points programme {:?}", req.program)))?;
        use crate::funding::EarnError as E;
        program
            .earn(
                &caller.name,
                &req.member_id,
                &req.account,
                req.points,
                &req.reference,
                now,
            )
            .map_err(|e| match e {
                E::NotThisProgrammesPartner { .. } => ApiError::ForbiddenDetail(e.to_string()),
                E::MemberOfAnotherAccount { .. } => ApiError::Conflict(e.to_string()),
                E::ReferenceReused(_) => ApiError::IdempotencyKeyReused(e.to_string()),
                E::Storage(d) => ApiError::Internal(d),
                other => ApiError::BadRequest(other.to_string()),
            })
    })
    .await?;
    let status = if earned.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(earned)))
}

/// `POST /v1/reversals`: takes a completed load back from the card (debit proved by the card)
/// and refunds its funding. The caller who made the load, or an operator. Same relay as a load.
async fn start_reversal(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Reply>, ApiError> {
    let caller = require(
        &st.auth,
        &headers,
        &[Role::Cardholder, Role::Partner, Role::Operator],
    )?;
    let req: StartReversal = json_body(&body)?;
    let (key, uid, now) = start_checks(&st, &headers, &caller, &req.card_uid)?;
    let loads = st.loads.clone();
    let any = caller.role == Role::Operator;
    let reply = blocking(move || {
        Ok(loads.start_reversal(&caller.name, any, uid, req.load_tmc, key, now)?)
    })
    .await?;
    Ok(Json(reply))
}

async fn load_step(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Reply>, ApiError> {
    let caller = require(
        &st.auth,
        &headers,
        &[Role::Cardholder, Role::Partner, Role::Operator],
    )?;
    let step: StepBody = json_body(&body)?;
    let mut responses = Vec::with_capacity(step.responses.len());
    for (i, r) in step.responses.iter().enumerate() {
        let bytes = hex::decode(r.trim())
            .map_err(|e| ApiError::BadRequest(format!("responses[{i}] must be hex: {e}")))?;
        if bytes.len() < 2 || bytes.len() > 258 {
            return Err(ApiError::BadRequest(format!(
                "responses[{i}] of {} bytes is not a card response APDU (2..=258 bytes)",
                bytes.len()
            )));
        }
        responses.push(bytes);
    }
    let now = (st.clock)();
    let loads = st.loads.clone();
    let reply =
        blocking(move || Ok(loads.respond(&caller.name, &id, step.seq, &responses, now)?)).await?;
    Ok(Json(reply))
}

async fn register_card(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    require(&st.auth, &headers, &[Role::Operator])?;
    let req: RegisterCard = json_body(&body)?;
    let uid = uid_of(&req.card_uid)?;
    // A card's balance is an i32 on the card: a larger value cannot be personalised (it
    // would be booked as one amount and held as another).
    if req.personalised_minor < 0 || i32::try_from(req.personalised_minor).is_err() {
        return Err(ApiError::BadRequest(format!(
            "personalised_minor must be 0 to {} (a card's balance is a 32-bit value)",
            i32::MAX
        )));
    }
    let now = (st.clock)();
    let loads = st.loads.clone();
    blocking(move || {
        loads
            .register_card(&uid, req.personalised_minor, now)
            .map_err(ApiError::from)?;
        if let Some(owner) = req.owner {
            let l = loads.ledger();
            l.transact(move |t| {
                let mut s = t.card(&uid)?;
                s.owner = Some(owner);
                t.put_card(&uid, &s)
            })
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::CREATED)
}

async fn get_card(
    State(st): State<AppState>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Operator])?;
    let uid = uid_of(&uid_hex)?;
    let l = st.loads.ledger();
    let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
    if !r
        .card_known(&uid)
        .map_err(|e| ApiError::Internal(e.to_string()))?
    {
        return Err(ApiError::NotFound(format!(
            "card {uid_hex} is not registered"
        )));
    }
    let shadow = r
        .card(&uid)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let balance = r
        .balance(&crate::ledger::card_account(&uid))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let open = r
        .open_intents(&uid)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(serde_json::json!({
        "card_uid": hex::encode_upper(uid),
        "shadow_balance_minor": balance,
        "last_tmc": shadow.last_tmc,
        "booked_through_tmc": shadow.booked_through_tmc,
        "last_reported_balance_minor": shadow.last_reported_balance_minor,
        "blocked": shadow.blocked,
        "block_reason": shadow.block_reason,
        "pending_loads": open.len(),
    })))
}

async fn set_block(
    st: &AppState,
    uid: [u8; 7],
    blocked: bool,
    reason: String,
) -> Result<Option<u64>, ApiError> {
    let now = (st.clock)();
    let ledger = st.loads.ledger().clone();
    blocking(move || {
        ledger
            .transact(move |t| t.set_blocked(&uid, blocked, &reason, now))
            .map_err(|e| ApiError::Internal(e.to_string()))
    })
    .await
}

fn reason_of(req: &BlockCard) -> Result<String, ApiError> {
    if req.reason.trim().is_empty() || req.reason.len() > 200 {
        return Err(ApiError::BadRequest(
            "reason must be 1 to 200 characters".into(),
        ));
    }
    Ok(req.reason.trim().to_string())
}

async fn block_card(
    State(st): State<AppState>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    operator_set_block(&st, &uid_hex, &headers, &body, true).await
}

async fn unblock_card(
    State(st): State<AppState>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    operator_set_block(&st, &uid_hex, &headers, &body, false).await
}

/// The body of `block` and `unblock`: an operator sets the card's block state with a reason.
async fn operator_set_block(
    st: &AppState,
    uid_hex: &str,
    headers: &HeaderMap,
    body: &[u8],
    blocked: bool,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, headers, &[Role::Operator])?;
    let uid = uid_of(uid_hex)?;
    let reason = reason_of(&json_body(body)?)?;
    let version = set_block(st, uid, blocked, reason).await?;
    Ok(Json(serde_json::json!({"blocklist_version": version})))
}

/// `POST /v1/cards/{uid}/report`: the card's owner (or an operator) reports it lost or stolen.
async fn report_card(
    State(st): State<AppState>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Cardholder, Role::Operator])?;
    let uid = uid_of(&uid_hex)?;
    let req: BlockCard = json_body(&body)?;
    let reason = match req.reason.as_str() {
        "lost" | "stolen" => req.reason.clone(),
        other => {
            return Err(ApiError::BadRequest(format!(
                "reason {other:?} must be \"lost\" or \"stolen\""
            )))
        }
    };
    if caller.role == Role::Cardholder {
        let l = st.loads.ledger();
        let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
        let shadow = r
            .card(&uid)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if shadow.owner.as_deref() != Some(caller.name.as_str()) {
            // Same answer as for an unknown card: do not reveal whose cards exist.
            return Err(ApiError::NotFound(format!(
                "card {uid_hex} is not registered to you"
            )));
        }
    }
    let version = set_block(&st, uid, true, reason).await?;
    Ok(Json(
        serde_json::json!({"blocked": true, "blocklist_version": version}),
    ))
}

#[derive(Deserialize)]
struct ChangesQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    10_000
}

/// `GET /v1/blocklist/changes?after=N&limit=M` (gateway, operator): numbered block and unblock
/// changes, for the gateway to sign and publish in order.
async fn block_changes(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ChangesQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    let l = st.loads.ledger();
    let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
    let (changes, latest) = r
        .block_changes(q.after, q.limit.clamp(1, 100_000))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(
        serde_json::json!({"latest_version": latest, "changes": changes}),
    ))
}

/// `GET /v1/anomalies?after=N&limit=M` (operator): what clearing and the gap sweep found, in
/// the order raised.
async fn anomalies(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ChangesQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Operator])?;
    let l = st.loads.ledger();
    let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
    let (found, last) = r
        .anomalies(q.after, q.limit.clamp(1, 100_000))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let list: Vec<serde_json::Value> = found
        .into_iter()
        .map(|(seq, a)| {
            let mut v = serde_json::to_value(a).unwrap_or_default();
            v["seq"] = seq.into();
            v
        })
        .collect();
    Ok(Json(
        serde_json::json!({"last_seq": last, "anomalies": list}),
    ))
}

async fn partner_voucher(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let now = (st.clock)();
    let (partner, max) = st
        .partners
        .verify(
            &h("x-tapgate-partner"),
            &h("x-tapgate-timestamp"),
            &h("x-tapgate-signature"),
            "POST",
            "/v1/partner/vouchers",
            &body,
            now,
        )
        .map_err(|e| ApiError::Unauthenticated(leak_static(e.to_string())))?;
    let order: crate::partner::VoucherOrder = json_body(&body)?;
    let ledger = st.loads.ledger().clone();
    let v = blocking(move || {
        crate::partner::issue_voucher(&ledger, &partner, max, order, now).map_err(|e| match e {
            crate::partner::PartnerError::BadRequest(d) => ApiError::BadRequest(d),
            other => ApiError::Internal(other.to_string()),
        })
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "code": v.code,
            "kind": v.kind,
            "amount_minor": v.amount_minor,
            "card_uid": v.card_uid,
            "expires_ms": v.expires_ms,
            "order_id": v.order_id,
        })),
    ))
}

/// `POST /v1/vouchers/lookup` body: the code travels in the body, never in a path or query (a
/// voucher code is a bearer secret, and paths end up in access logs).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VoucherLookup {
    code: String,
}

/// `POST /v1/vouchers/lookup`: a voucher's state, for whoever holds its code.
async fn lookup_voucher(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Cardholder, Role::Operator])?;
    let VoucherLookup { code } = json_body(&body)?;
    if code.is_empty() || code.len() > 64 {
        return Err(ApiError::BadRequest(
            "code must be 1 to 64 characters".into(),
        ));
    }
    let l = st.loads.ledger();
    let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
    let v = r
        .voucher(&code)
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| ApiError::NotFound("no such voucher".into()))?;
    Ok(Json(serde_json::json!({
        "code": v.code,
        "kind": v.kind,
        "amount_minor": v.amount_minor,
        "card_uid": v.card_uid,
        "expires_ms": v.expires_ms,
        "state": v.state,
    })))
}

/// Unauthenticated messages are few and fixed in shape; keep them as owned strings in the
/// error body without widening `ApiError`.
fn leak_static(s: String) -> &'static str {
    match s.as_str() {
        x if x.contains("unknown partner") => "unknown partner",
        x if x.contains("timestamp") => "timestamp missing, malformed or outside the allowed skew",
        x if x.contains("128 hex") => "X-Tapgate-Signature must be 128 hex digits",
        _ => "partner signature does not verify",
    }
}

fn franchise_err(e: crate::franchise::FranchiseError) -> ApiError {
    match e {
        crate::franchise::FranchiseError::BadRequest(d) => ApiError::BadRequest(d),
        // A payment above what is owed, or a total that would overflow: refused, nothing booked.
        crate::franchise::FranchiseError::Ledger(crate::ledger::LedgerError::InvalidPosting(d)) => {
            ApiError::BadRequest(d.to_string())
        }
        crate::franchise::FranchiseError::Unknown(n) => {
            ApiError::NotFound(format!("no franchise {n:?}"))
        }
        other => ApiError::Internal(other.to_string()),
    }
}

fn own_franchise(
    st: &AppState,
    headers: &HeaderMap,
) -> Result<crate::franchise::FranchiseConfig, ApiError> {
    let caller = require(&st.auth, headers, &[Role::Partner])?;
    st.franchises
        .get(&caller.name)
        .cloned()
        .ok_or(ApiError::Forbidden(Role::Partner))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FranchiseReport {
    loads: Vec<crate::franchise::ReportedLoad>,
}

async fn franchise_loads(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let f = own_franchise(&st, &headers)?;
    let report: FranchiseReport = json_body(&body)?;
    if report.loads.is_empty() || report.loads.len() > 10_000 {
        return Err(ApiError::BadRequest(
            "a report holds 1 to 10000 loads".into(),
        ));
    }
    let now = (st.clock)();
    let loads = st.loads.clone();
    let out = blocking(move || {
        crate::franchise::report_loads(loads.ledger(), loads.hsm(), &f, &report.loads, now)
            .map_err(franchise_err)
    })
    .await?;
    Ok(Json(serde_json::json!({
        "accepted": out.accepted,
        "duplicates": out.duplicates,
        "rejected": out.rejected.iter().map(|(i, r)| serde_json::json!({"index": i, "reason": r})).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CeilingRequest {
    requested_minor: i64,
}

async fn franchise_ceiling(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let f = own_franchise(&st, &headers)?;
    let req: CeilingRequest = json_body(&body)?;
    let loads = st.loads.clone();
    let grant = blocking(move || {
        crate::franchise::grant_ceiling(loads.ledger(), loads.hsm(), &f, req.requested_minor)
            .map_err(franchise_err)
    })
    .await?
    .ok_or_else(|| {
        ApiError::Conflict(
            "exposure at its limit: report loads and settle what is owed before more ceiling"
                .into(),
        )
    })?;
    Ok(Json(serde_json::json!({
        "device_id": grant.device_id,
        "seq": grant.seq,
        "amount_minor": grant.amount_minor,
        "mac": hex::encode_upper(grant.mac),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Payment {
    amount_minor: i64,
    reference: String,
}

async fn franchise_payment(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    require(&st.auth, &headers, &[Role::Operator])?;
    if !st.franchises.contains_key(&name) {
        return Err(ApiError::NotFound(format!("no franchise {name:?}")));
    }
    let p: Payment = json_body(&body)?;
    if p.reference.is_empty() || p.reference.len() > 128 {
        return Err(ApiError::BadRequest(
            "reference must be 1 to 128 characters".into(),
        ));
    }
    let now = (st.clock)();
    let loads = st.loads.clone();
    blocking(move || {
        crate::franchise::record_payment(loads.ledger(), &name, p.amount_minor, &p.reference, now)
            .map_err(franchise_err)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn franchise_status(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Operator, Role::Partner])?;
    if caller.role == Role::Partner && caller.name != name {
        return Err(ApiError::Forbidden(Role::Partner));
    }
    let f = st
        .franchises
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no franchise {name:?}")))?;
    let l = st.loads.ledger();
    let s = crate::franchise::state(l, &name).map_err(franchise_err)?;
    let owed = crate::franchise::outstanding_minor(l, &name).map_err(franchise_err)?;
    Ok(Json(serde_json::json!({
        "name": name,
        "device_id": f.device_id,
        "max_exposure_minor": f.max_exposure_minor,
        "granted_total_minor": s.granted_total_minor,
        "reported_total_minor": s.reported_total_minor,
        "outstanding_minor": owed,
        "last_grant_seq": s.last_grant_seq,
    })))
}

async fn clearing_batch(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<crate::clearing::BatchOutcome>, ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Gateway])?;
    let mut batch: crate::clearing::ClearingBatch = json_body(&body)?;
    // A gateway books fares only to the operators it serves: its token cannot move revenue to
    // another operator's account.
    let own = [st.operator.clone()];
    let allowed = st
        .gateway_operators
        .get(&caller.name)
        .map_or(&own[..], Vec::as_slice);
    if let Some(t) = batch.taps.iter().find(|t| {
        let op = t.operator.as_deref().unwrap_or("default");
        !allowed.iter().any(|a| a == op)
    }) {
        return Err(ApiError::ForbiddenDetail(format!(
            "gateway {:?} may not book taps to operator {:?} (it may: {}; [gateway_operators] in the charging config)",
            caller.name,
            t.operator.as_deref().unwrap_or("default"),
            allowed.join(", ")
        )));
    }
    // Batch ids are per gateway: another gateway's token cannot pre-empt this one's next id
    // (an empty batch under it would have made the real one look answered, and lost its taps).
    let asked_id = batch.batch_id.clone();
    if asked_id.is_empty() || asked_id.len() > 128 {
        return Err(ApiError::BadRequest(
            "batch_id must be 1 to 128 characters".into(),
        ));
    }
    batch.batch_id = format!("{}/{}", caller.name, batch.batch_id);
    let now = (st.clock)();
    let loads = st.loads.clone();
    let out = blocking(move || {
        let mut out = crate::clearing::clear_batch(loads.ledger(), loads.hsm(), batch, now)
            .map_err(|e| match e {
                crate::clearing::ClearingError::BadRequest(d) => ApiError::BadRequest(d),
                crate::clearing::ClearingError::Conflict(d) => ApiError::Conflict(d),
                other => ApiError::Internal(other.to_string()),
            })?;
        for action in &out.funding {
            loads.apply_funding(action);
        }
        out.batch_id = asked_id;
        Ok(out)
    })
    .await?;
    Ok(Json(out))
}

fn signed_list(st: &AppState, update: &purse::blocklist::ListUpdate) -> Result<Response, ApiError> {
    let body = update.body();
    let sig = st
        .loads
        .hsm()
        .lock()
        .expect("hsm lock")
        .sign(&body)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut bytes = body;
    bytes.extend_from_slice(&sig);
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (
                axum::http::HeaderName::from_static("x-tapgate-blocklist-version"),
                update.to_version.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// `GET /v1/blocklist/signed/snapshot` (gateway, operator): every blocked card at the latest
/// version, signed by the back office (wire format: purse::blocklist).
async fn signed_snapshot(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    let st2 = st.clone();
    blocking(move || {
        let l = st2.loads.ledger();
        let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
        let (_, latest) = r
            .block_changes(u64::MAX - 1, 1)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if latest == 0 {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let entries: Vec<([u8; 7], bool)> = r
            .all_cards()
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .into_iter()
            .filter(|(_, c)| c.blocked)
            .map(|(uid, _)| (uid, true))
            .collect();
        drop(r);
        signed_list(
            &st2,
            &purse::blocklist::ListUpdate {
                kind: purse::blocklist::ListKind::Snapshot,
                operator: st2.operator.clone(),
                from_version: 0,
                to_version: latest,
                entries,
            },
        )
    })
    .await
}

/// `GET /v1/blocklist/signed/delta?after=N` (gateway, operator): the changes after version N,
/// signed; 204 when there are none.
async fn signed_delta(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ChangesQuery>,
) -> Result<Response, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    let st2 = st.clone();
    blocking(move || {
        let l = st2.loads.ledger();
        let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
        let (changes, _) = r
            .block_changes(q.after, q.limit.clamp(1, 1_000_000))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        drop(r);
        let Some(last) = changes.last().map(|c| c.version) else {
            return Ok(StatusCode::NO_CONTENT.into_response());
        };
        let mut entries = Vec::with_capacity(changes.len());
        for c in &changes {
            let uid: [u8; 7] = hex::decode(&c.card_uid)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| ApiError::Internal(format!("stored UID {:?}", c.card_uid)))?;
            entries.push((uid, c.action == "block"));
        }
        signed_list(
            &st2,
            &purse::blocklist::ListUpdate {
                kind: purse::blocklist::ListKind::Delta,
                operator: st2.operator.clone(),
                from_version: q.after,
                to_version: last,
                entries,
            },
        )
    })
    .await
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
    ] {
        out.push_str(&format!("# TYPE {name} counter\n{name} {v}\n"));
    }
    let encoder = prometheus::TextEncoder::new();
    if let Ok(s) = encoder.encode_to_string(&st.metrics.gather()) {
        out.push_str(&s);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/loads", post(start_load))
        .route("/v1/loads/{id}/steps", post(load_step))
        .route("/v1/reversals", post(start_reversal))
        .route("/v1/cards", post(register_card))
        .route("/v1/cards/{uid}", get(get_card))
        .route("/v1/cards/{uid}/block", post(block_card))
        .route("/v1/cards/{uid}/unblock", post(unblock_card))
        .route("/v1/cards/{uid}/report", post(report_card))
        .route("/v1/blocklist/changes", get(block_changes))
        .route("/v1/anomalies", get(anomalies))
        .route("/v1/blocklist/signed/snapshot", get(signed_snapshot))
        .route("/v1/blocklist/signed/delta", get(signed_delta))
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
