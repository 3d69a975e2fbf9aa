//! Online payments: the merchant's API (`/v1/merchant/payments`) and the cardholder's relay of
//! a payment (`POST /v1/payments/{id}/pay`, then the load relay's steps).

use super::*;
use crate::ledger::{Payment, PaymentState, Refund, RefundState};
use crate::load::PaymentAsk;
use axum::routing::MethodRouter;
use time::format_description::well_known::Rfc3339;

/// `POST /v1/merchant/payments` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePayment {
    /// Amount, minor units.
    pub amount_minor: i32,
    /// ISO 4217 code: the card scheme's (`currency` in charging.toml, default `KRW`); any
    /// other is refused (400).
    pub currency: String,
    /// The merchant's order id: the same order id gives the same payment.
    pub order_id: String,
    /// What is bought (shown to the cardholder).
    #[serde(default)]
    pub description: String,
    /// Payable until (RFC 3339, e.g. `2026-12-06T15:00:00Z`).
    pub expires: String,
    /// Where the outcome is sent.
    #[serde(default)]
    pub notify_url: Option<String>,
}

/// `POST /v1/merchant/payments/{id}/refunds` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRefund {
    /// Amount, minor units (all or part of what is left to refund).
    pub amount_minor: i32,
    /// ISO 4217 code; when given, it must be the card scheme's (as the payment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// `POST /v1/payments/{id}/pay` and `POST /v1/refunds/{id}/collect` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayPayment {
    /// Card UID, 14 hex digits.
    pub card_uid: String,
    /// The card's payment PIN, when its holder set one and the payment is above its amount
    /// (not used to collect a refund).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

/// `POST /v1/cards/{uid}/payment-pin` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPaymentPin {
    /// 4 to 12 digits.
    pub pin: String,
    /// Payments above this need the PIN, minor units.
    pub above_minor: i32,
    /// The PIN set now, if the card has one (a cardholder changes it only with it).
    #[serde(default)]
    pub current_pin: Option<String>,
}

/// `POST /v1/cards/{uid}/payment-pin` (cardholder, the card's registered owner, with
/// `current_pin` once the card has one; or an operator): payments above `above_minor` from
/// this card need the PIN; three wrong ones lock it until an operator sets it again.
pub(super) async fn set_payment_pin(
    State(st): State<AppState>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Cardholder, Role::Operator])?;
    let req: SetPaymentPin = json_body(&body)?;
    let uid = uid_of(&uid_hex)?;
    let loads = st.loads.clone();
    let operator = caller.role == Role::Operator;
    blocking(move || {
        Ok(loads.set_payment_pin(
            &caller.name,
            operator,
            uid,
            &req.pin,
            req.current_pin,
            req.above_minor,
        )?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Unix ms as RFC 3339 UTC (`2026-12-06T15:00:00Z`), as the payments API writes and reads
/// times; empty when out of range.
pub fn rfc3339(ms: u64) -> String {
    i64::try_from(ms / 1000)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn parse_rfc3339(field: &str, s: &str) -> Result<u64, ApiError> {
    let t = time::OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| ApiError::BadRequest(format!("{field} {s:?} is not an RFC 3339 time: {e}")))?;
    u64::try_from(t.unix_timestamp())
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| ApiError::BadRequest(format!("{field} {s:?} is out of range")))
}

/// A payment as its merchant sees it (`state`: `open`, `pending`, `completed`, `expired`).
pub fn payment_json(p: &Payment, now_ms: u64) -> serde_json::Value {
    let state = match p.state {
        PaymentState::Open if now_ms > p.expires_ms => "expired",
        PaymentState::Open => "open",
        PaymentState::Pending => "pending",
        PaymentState::Completed => "completed",
    };
    serde_json::json!({
        "id": p.id,
        "merchant": p.merchant,
        "order_id": p.order_id,
        "amount_minor": p.amount_minor,
        "currency": p.currency,
        "description": p.description,
        "expires": rfc3339(p.expires_ms),
        "notify_url": p.notify_url,
        "state": state,
        "created": rfc3339(p.created_ms),
        "card_uid": p.card_uid,
        "tmc": p.tmc,
        "paid": p.paid_ms.map(rfc3339),
        "refunded_minor": p.refunded_minor,
    })
}

/// A refund as its merchant and its cardholder see it (`state`: `pending`, `collecting`,
/// `credited`, `expired` — not collected in time, its value back with the merchant).
pub fn refund_json(r: &Refund) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "payment_id": r.payment_id,
        "merchant": r.merchant,
        "card_uid": r.card_uid,
        "amount_minor": r.amount_minor,
        "state": match r.state {
            RefundState::Pending => "pending",
            RefundState::Collecting => "collecting",
            RefundState::Credited => "credited",
            RefundState::Expired => "expired",
        },
        "created": rfc3339(r.created_ms),
        "tmc": r.tmc,
        "credited": r.credited_ms.map(rfc3339),
        "expired": r.expired_ms.map(rfc3339),
    })
}

/// `POST /v1/merchant/payments/{id}/refunds` (merchant, Idempotency-Key): refunds all or part
/// of its completed payment; the card that paid collects it online
/// (`POST /v1/refunds/{id}/collect`).
pub(super) async fn create_refund(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Merchant])?;
    let req: CreateRefund = json_body(&body)?;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let now = (st.clock)();
    let loads = st.loads.clone();
    let r = blocking(move || {
        Ok(loads.create_refund(
            &caller.name,
            &id,
            req.amount_minor,
            req.currency.as_deref(),
            &key,
            now,
        )?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(refund_json(&r))))
}

/// `GET /v1/merchant/refunds/{id}` (merchant): its own refund.
pub(super) async fn merchant_refund(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Merchant])?;
    Ok(Json(refund_json(
        &st.loads.refund_of(Some(&caller.name), &id)?,
    )))
}

/// `GET /v1/refunds/{id}` (cardholder): a refund to collect.
pub(super) async fn refund_for_cardholder(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Cardholder, Role::Operator])?;
    Ok(Json(refund_json(&st.loads.refund_of(None, &id)?)))
}

/// `POST /v1/refunds/{id}/collect` (cardholder, Idempotency-Key): the card that paid collects
/// the refund (a Credit by the back office), relayed like a load.
pub(super) fn collect_refund() -> MethodRouter<AppState> {
    relay(|loads, caller, id, uid, key, _pin, now| loads.start_refund(caller, id, uid, key, now))
}

/// `POST /v1/payments/{id}/pay` (cardholder): starts paying the payment from the card; the
/// relay goes on at `POST /v1/loads/{session}/steps`, exactly as a load's.
pub(super) fn pay_payment() -> MethodRouter<AppState> {
    relay(LoadService::start_payment)
}

/// How a relay starts: the loads, the caller, the route's id (the payment's or the refund's),
/// the card, the Idempotency-Key, the PIN if given, now.
type RelayStart =
    fn(&LoadService, &str, &str, [u8; 7], String, Option<String>, u64) -> Result<Reply, LoadError>;

/// The `POST` of a cardholder's relay on its own (or an anonymous) card, on a route whose one
/// path parameter is the id `start` is given: the checks of a load's start, then `start` on
/// the blocking pool.
fn relay(start: RelayStart) -> MethodRouter<AppState> {
    post(
        move |State(st): State<AppState>,
              Path(id): Path<String>,
              headers: HeaderMap,
              body: axum::body::Bytes| async move {
            let caller = require(&st.auth, &headers, &[Role::Cardholder])?;
            let req: PayPayment = json_body(&body)?;
            let (key, uid, now) = start_checks(&st, &headers, &caller, &req.card_uid)?;
            own_card_or_anonymous(&st, &caller, &uid)?;
            let loads = st.loads.clone();
            let reply =
                blocking(move || Ok(start(&loads, &caller.name, &id, uid, key, req.pin, now)?))
                    .await?;
            Ok::<_, ApiError>(Json(reply))
        },
    )
}

/// `POST /v1/merchant/payments` (merchant): makes a payment; 201 when new, 200 with the same
/// payment when the order id was made before with the same terms.
pub(super) async fn create_payment(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Merchant])?;
    let req: CreatePayment = json_body(&body)?;
    let ask = PaymentAsk {
        amount_minor: req.amount_minor,
        currency: req.currency,
        order_id: req.order_id,
        description: req.description,
        expires_ms: parse_rfc3339("expires", &req.expires)?,
        notify_url: req.notify_url,
    };
    let now = (st.clock)();
    let loads = st.loads.clone();
    let (p, new) = blocking(move || Ok(loads.create_payment(&caller.name, ask, now)?)).await?;
    let code = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(payment_json(&p, now))))
}

/// `GET /v1/merchant/payments/{id}` (merchant): its own payment; another merchant's is not
/// found.
pub(super) async fn merchant_payment(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Merchant])?;
    let p = st.loads.payment_of(&caller.name, &id)?;
    Ok(Json(payment_json(&p, (st.clock)())))
}

/// `GET /v1/merchant/notification-key` (merchant): the Ed25519 public key that signs
/// notifications, and the context the signature covers before the body.
pub(super) async fn notification_key(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Merchant])?;
    let key = st.loads.hsm().lock().expect("hsm lock").verifying_key();
    Ok(Json(serde_json::json!({
        "algorithm": "ed25519",
        "public_key_hex": hex::encode(key),
        "header": crate::notify::SIGNATURE_HEADER,
        "signed": "context || body",
        "context": String::from_utf8_lossy(crate::notify::SIGNATURE_CONTEXT),
    })))
}

/// `GET /v1/payments/{id}` (cardholder): what the payment asks for, before paying it.
pub(super) async fn payment_for_cardholder(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Cardholder, Role::Operator])?;
    let r = st.loads.ledger().read()?;
    let p = r
        .payment(&id)?
        .ok_or_else(|| ApiError::NotFound(format!("no payment {id}")))?;
    let full = payment_json(&p, (st.clock)());
    Ok(Json(serde_json::json!({
        "id": full["id"],
        "merchant": full["merchant"],
        "amount_minor": full["amount_minor"],
        "currency": full["currency"],
        "description": full["description"],
        "expires": full["expires"],
        "state": full["state"],
    })))
}
