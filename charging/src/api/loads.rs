//! Loads and reversals over the relay (`/v1/loads`, `/v1/reversals`, steps), and the caller's funding instruments (`/v1/instruments`).

use super::*;

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

impl Funding {
    /// A load's (or an order's) request for `amount_minor` onto card `uid` from this funding.
    pub(super) fn request(self, uid: [u8; 7], amount_minor: i32, key: String) -> LoadRequest {
        LoadRequest {
            uid,
            amount_minor,
            funding_source: self.source,
            instrument: self.instrument,
            idempotency_key: key,
        }
    }
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

/// What starting a load or a reversal checks: the Idempotency-Key, the card UID, the caller's
/// rate. Returns (key, uid, now).
pub(super) fn start_checks(
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

/// Who may load, order and keep funding instruments: a cardholder, a partner, an operator.
pub(super) const PAYERS: &[Role] = &[Role::Cardholder, Role::Partner, Role::Operator];

/// The card's registered owner (none: sold anonymously, or not registered).
pub(super) fn card_owner(st: &AppState, uid: &[u8; 7]) -> Result<Option<String>, ApiError> {
    let l = st.loads.ledger();
    // One read: the latest committed shadow (no snapshot to begin and end).
    let r = l
        .read_latest()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let shadow = r.card(uid).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(shadow.owner)
}

pub(super) async fn start_load(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Reply>, ApiError> {
    let caller = require(&st.auth, &headers, PAYERS)?;
    let req: StartLoad = json_body(&body)?;
    let (key, uid, now) = start_checks(&st, &headers, &caller, &req.card_uid)?;
    if caller.role == Role::Cardholder {
        own_card_or_anonymous(&st, &caller, &uid)?;
    }
    let loads = st.loads.clone();
    let reply = relay_work(&st, move || {
        Ok(loads.start(
            &caller.name,
            req.funding.request(uid, req.amount_minor, key),
            now,
        )?)
    })
    .await?;
    Ok(Json(reply))
}

/// A cardholder loads only its own cards: a card registered with an owner is that owner's
/// alone; a card registered without one (anonymous, sold over the counter) or not registered
/// is loaded by whoever holds it (the card proves itself to the HSM in the dialogue).
pub(super) fn own_card_or_anonymous(
    st: &AppState,
    caller: &Caller,
    uid: &[u8; 7],
) -> Result<(), ApiError> {
    match card_owner(st, uid)?.as_deref() {
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
pub(super) async fn register_instrument(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let caller = require(&st.auth, &headers, PAYERS)?;
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
pub(super) async fn list_instruments(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = require(&st.auth, &headers, PAYERS)?;
    let l = st.loads.ledger();
    let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
    let list = r
        .instruments_of(&caller.name)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(serde_json::json!({
        "instruments": list.iter().map(|i| serde_json::json!({"source": i.source, "instrument": i.id, "registered_ms": i.registered_ms})).collect::<Vec<_>>(),
    })))
}

/// `POST /v1/reversals`: takes a completed load back from the card (debit proved by the card)
/// and refunds its funding. The caller who made the load, or an operator. Same relay as a load.
pub(super) async fn start_reversal(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Reply>, ApiError> {
    let caller = require(&st.auth, &headers, PAYERS)?;
    let req: StartReversal = json_body(&body)?;
    let (key, uid, now) = start_checks(&st, &headers, &caller, &req.card_uid)?;
    let loads = st.loads.clone();
    let any = caller.role == Role::Operator;
    let reply = relay_work(&st, move || {
        Ok(loads.start_reversal(&caller.name, any, uid, req.load_tmc, key, now)?)
    })
    .await?;
    Ok(Json(reply))
}

pub(super) async fn load_step(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Reply>, ApiError> {
    let caller = require(&st.auth, &headers, PAYERS)?;
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
    let reply = if st.relay_inline {
        // In a task of its own: the step takes its session out while it awaits the ledger's
        // group commit, and a client hanging up (which drops this handler) must not leave it
        // there.
        tokio::spawn(async move {
            loads
                .respond_async(&caller.name, &id, step.seq, &responses, now)
                .await
        })
        .await
        .map_err(|e| ApiError::Internal(format!("step failed: {e}")))??
    } else {
        blocking(move || Ok(loads.respond(&caller.name, &id, step.seq, &responses, now)?)).await?
    };
    Ok(Json(reply))
}

/// Runs a relay request's start (a load, a reversal, a payment). With the LMDB ledger on the
/// worker itself: its reads are memory reads and a load's start waits for no commit. (A step is run by
/// [`load_step`]: with LMDB as a task that awaits the group commits of the steps that decide
/// or book, with no thread waiting for them — [`crate::ledger::Ledger::transact_async`].)
/// Handing every request to [`blocking`] instead cost each a thread hand-off (block_in_place
/// wakes a thread to take the worker over). With PostgreSQL every read is a round trip to the
/// database, and a PKCS#11 token may be a network HSM: then the whole request goes to
/// [`blocking`] ([`AppState::relay_inline`]).
async fn relay_work<T: Send + 'static>(
    st: &AppState,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if st.relay_inline {
        f()
    } else {
        blocking(f).await
    }
}
