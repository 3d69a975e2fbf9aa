//! Value bought online and picked up at the next tap: orders (`/v1/orders`) and the signed
//! action list the gateways relay to validators (`/v1/actions/signed/{snapshot,delta}`).

use super::*;
use crate::load::{OrderError, OrderRecord};

/// `POST /v1/orders` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrder {
    /// Card UID, 14 hex digits.
    pub card_uid: String,
    /// Amount, minor units.
    pub amount_minor: i32,
    /// Funding, as for a load.
    pub funding: Funding,
}

fn order_err(e: OrderError) -> ApiError {
    match e {
        OrderError::BadRequest(d) => ApiError::BadRequest(d),
        OrderError::Refused { reason, detail } => {
            ApiError::ForbiddenDetail(format!("{reason}: {detail}"))
        }
        OrderError::IdempotencyKeyReused => ApiError::IdempotencyKeyReused(e.to_string()),
        OrderError::NotFound(_) => ApiError::NotFound(e.to_string()),
        OrderError::Ledger(_) | OrderError::Hsm(_) => ApiError::Internal(e.to_string()),
    }
}

/// An order as its maker sees it (the source's authorisation id stays inside).
pub fn order_json(o: &OrderRecord) -> serde_json::Value {
    serde_json::json!({
        "order_id": o.id,
        "card_uid": o.card_uid,
        "amount_minor": o.amount_minor,
        "funding_source": o.source,
        "state": o.state,
        "created_ms": o.created_ms,
        "expires_ms": o.expires_ms,
        "picked_up": o.picked_up,
        "refunded_ms": o.refunded_ms,
    })
}

/// `POST /v1/orders` (cardholder for a card registered to them, operator, partner): value
/// paid now from the caller's funding instrument, credited at the card's next tap at any
/// validator. Needs an Idempotency-Key; 201 with the order.
pub(super) async fn create_order(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let caller = require(&st.auth, &headers, PAYERS)?;
    let req: CreateOrder = json_body(&body)?;
    let (key, uid, now) = start_checks(&st, &headers, &caller, &req.card_uid)?;
    if caller.role == Role::Cardholder {
        // No card at a reader proves anything here: a cardholder orders for its own
        // registered cards only.
        if card_owner(&st, &uid)?.as_deref() != Some(caller.name.as_str()) {
            return Err(ApiError::ForbiddenDetail(format!(
                "card {} is not registered to this account",
                hex::encode_upper(uid)
            )));
        }
    }
    let loads = st.loads.clone();
    let o = blocking(move || {
        loads
            .create_order(
                &caller.name,
                loads.order_limits(),
                req.funding.request(uid, req.amount_minor, key),
                now,
            )
            .map_err(order_err)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(order_json(&o))))
}

/// `GET /v1/orders/{id}`: the order's maker (or, for a cardholder, the card's owner) or an
/// operator; anyone else gets 404.
pub(super) async fn get_order(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = require(&st.auth, &headers, PAYERS)?;
    let o = st.loads.order(id).map_err(order_err)?;
    let visible = caller.role == Role::Operator
        || o.caller == caller.name
        || (caller.role == Role::Cardholder && {
            let uid = uid_of(&o.card_uid)?;
            card_owner(&st, &uid)?.as_deref() == Some(caller.name.as_str())
        });
    if !visible {
        return Err(ApiError::NotFound(format!("no order {id}")));
    }
    Ok(Json(order_json(&o)))
}

fn signed_actions(
    st: &AppState,
    u: Option<purse::actionlist::ActionUpdate>,
) -> Result<Response, ApiError> {
    let Some(u) = u else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let bytes = st.loads.sign_actions(&u).map_err(order_err)?;
    Ok(super::blocklist::signed_list_response(
        "x-tapgate-actions-version",
        u.to_version,
        bytes,
    ))
}

/// `GET /v1/actions/signed/snapshot` (gateway, operator): every open order at the latest
/// version, signed (wire format: purse::actionlist); 204 before the first order.
pub(super) async fn actions_snapshot(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    blocking(move || {
        let u = st.loads.action_snapshot(&st.operator).map_err(order_err)?;
        signed_actions(&st, u)
    })
    .await
}

/// `GET /v1/actions/signed/delta?after=N&limit=M` (gateway, operator): the list's changes
/// after version N, signed; 204 when there are none.
pub(super) async fn actions_delta(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ChangesQuery>,
) -> Result<Response, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    blocking(move || {
        let limit = q.limit.clamp(1, 100_000) as u64;
        let u = st
            .loads
            .action_delta(&st.operator, q.after, limit)
            .map_err(order_err)?;
        signed_actions(&st, u)
    })
    .await
}

/// `POST /v1/validators/{device}/ceiling` (gateway, operator): the validator's action-list
/// ceiling grant — the total granted, raised to its pick-ups cleared plus the exposure limit
/// when that is more — as `{device_id, seq, total_minor, grant}` (`grant`: the 28-byte wire
/// form, hex, that the gateway publishes retained on the device's `…/devices/<id>/ceiling`).
pub(super) async fn validator_ceiling(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(device): Path<u32>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    let loads = st.loads.clone();
    let g = blocking(move || {
        loads
            .action_grant_for(device, loads.order_limits())
            .map_err(order_err)
    })
    .await?;
    Ok(Json(serde_json::json!({
        "device_id": g.device_id,
        "seq": g.seq,
        "total_minor": g.total_minor,
        "grant": hex::encode_upper(g.encode()),
    })))
}
