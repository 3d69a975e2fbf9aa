//! Franchise terminals: offline loads reported, ceilings granted, payments, status; and the gateways' clearing batches.

use super::*;

/// Unauthenticated messages are few and fixed in shape; keep them as owned strings in the
/// error body without widening `ApiError`.
pub(super) fn leak_static(s: String) -> &'static str {
    match s.as_str() {
        x if x.contains("unknown partner") => "unknown partner",
        x if x.contains("timestamp") => "timestamp missing, malformed or outside the allowed skew",
        x if x.contains("128 hex") => "X-Tapgate-Signature must be 128 hex digits",
        _ => "partner signature does not verify",
    }
}

pub(super) fn franchise_err(e: crate::franchise::FranchiseError) -> ApiError {
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

pub(super) fn own_franchise(
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
pub(super) struct FranchiseReport {
    loads: Vec<crate::franchise::ReportedLoad>,
}

pub(super) async fn franchise_loads(
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
pub(super) struct CeilingRequest {
    requested_minor: i64,
}

pub(super) async fn franchise_ceiling(
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
pub(super) struct Payment {
    amount_minor: i64,
    reference: String,
}

pub(super) async fn franchise_payment(
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

pub(super) async fn franchise_status(
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

pub(super) async fn clearing_batch(
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
    let stats = st.clearing.clone();
    let out = blocking(move || {
        let mut out =
            crate::clearing::clear_batch_counted(loads.ledger(), loads.hsm(), batch, now, &stats)
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
