//! Partners: points credited by a programme, voucher sales by partner shops, voucher look-up.

use super::*;

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
pub(super) async fn credit_points(
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

pub(super) async fn partner_voucher(
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
pub(super) struct VoucherLookup {
    code: String,
}

/// `POST /v1/vouchers/lookup`: a voucher's state, for whoever holds its code.
pub(super) async fn lookup_voucher(
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
    let r = st.loads.ledger().read()?;
    let v = r
        .voucher(&code)?
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
