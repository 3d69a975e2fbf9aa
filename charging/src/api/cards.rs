//! Cards: registration, the back office's view of a card, blocks, lost/stolen reports, anomalies.

use super::*;

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

pub(super) async fn register_card(
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
    // The ledger indexes cards by owner (the cardholder's cards page): an owner it cannot key
    // is refused before the card is registered.
    if let Some(owner) = &req.owner {
        crate::ledger::check_owner(owner).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    let now = (st.clock)();
    let loads = st.loads.clone();
    blocking(move || {
        loads
            .register_card(&uid, req.personalised_minor, now)
            .map_err(ApiError::from)?;
        if let Some(owner) = req.owner {
            let l = loads.ledger();
            l.transact(move |t| t.set_owner(&uid, &owner))?;
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::CREATED)
}

pub(super) async fn get_card(
    State(st): State<AppState>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Operator])?;
    let uid = uid_of(&uid_hex)?;
    let r = st.loads.ledger().read()?;
    if !r.card_known(&uid)? {
        return Err(ApiError::NotFound(format!(
            "card {uid_hex} is not registered"
        )));
    }
    let shadow = r.card(&uid)?;
    let balance = r.balance(&crate::ledger::card_account(&uid))?;
    let open = r.open_intents(&uid)?;
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

pub(super) async fn set_block(
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
            .map_err(ApiError::from)
    })
    .await
}

pub(super) fn reason_of(req: &BlockCard) -> Result<String, ApiError> {
    if req.reason.trim().is_empty() || req.reason.len() > 200 {
        return Err(ApiError::BadRequest(
            "reason must be 1 to 200 characters".into(),
        ));
    }
    Ok(req.reason.trim().to_string())
}

/// `POST /v1/cards/{uid}/block` (`blocked`) and `…/unblock`: an operator sets the card's
/// block state with a reason.
pub(super) async fn operator_set_block(
    State(st): State<AppState>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
    blocked: bool,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Operator])?;
    let uid = uid_of(&uid_hex)?;
    let reason = reason_of(&json_body(&body)?)?;
    let version = set_block(&st, uid, blocked, reason).await?;
    Ok(Json(serde_json::json!({"blocklist_version": version})))
}

/// `POST /v1/cards/{uid}/report`: the card's owner (or an operator) reports it lost or stolen.
pub(super) async fn report_card(
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
    if caller.role == Role::Cardholder
        && card_owner(&st, &uid)?.as_deref() != Some(caller.name.as_str())
    {
        // Same answer as for an unknown card: do not reveal whose cards exist.
        return Err(ApiError::NotFound(format!(
            "card {uid_hex} is not registered to you"
        )));
    }
    let version = set_block(&st, uid, true, reason).await?;
    Ok(Json(
        serde_json::json!({"blocked": true, "blocklist_version": version}),
    ))
}

/// `GET /v1/anomalies?after=N&limit=M` (operator): what clearing and the gap sweep found, in
/// the order raised.
pub(super) async fn anomalies(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ChangesQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Operator])?;
    let r = st.loads.ledger().read()?;
    let (found, last) = r.anomalies(q.after, q.limit.clamp(1, 100_000))?;
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
