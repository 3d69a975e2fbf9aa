//! A top-up picked up at the card's next tap: the page pays for it now as an action-list order
//! (`LoadService::create_order`, what `POST /v1/orders` does for a cardholder's own card), which
//! the gateways relay to every validator; the card's next tap anywhere credits it, and clearing
//! completes the order from the card's transaction MAC. Not picked up before it expires, its
//! value goes back to the funding.

use super::card::TopUp;
use super::*;
use crate::load::{OrderError, OrderRequest, OrderState};

/// Pays for `t` as an order made by `holder` (the top-up's idempotency key: asking again makes
/// no second order): its id, or why it was refused (shown on the form).
pub(super) fn order_topup(
    p: &Pages,
    holder: &str,
    uid: [u8; 7],
    t: &TopUp,
) -> Result<Result<u64, String>, PageError> {
    let now = p.now();
    if let Err(wait_s) = p.api.rate.take(holder, now) {
        return Ok(Err(format!(
            "Too many top-ups at once: try again in {wait_s} seconds."
        )));
    }
    let amount_minor = i32::try_from(t.amount_minor)
        .map_err(|_| PageError::Bad("That amount is too large.".into()))?;
    let req = OrderRequest {
        uid,
        amount_minor,
        funding_source: t.source.clone(),
        instrument: t.instrument.clone(),
        idempotency_key: t.idempotency_key(),
    };
    let loads = &p.api.loads;
    match loads.create_order(holder, loads.order_limits(), req, now) {
        Ok(o) => Ok(Ok(o.id)),
        Err(OrderError::BadRequest(why)) => Ok(Err(format!("Refused: {why}."))),
        Err(OrderError::Refused { detail, .. }) => Ok(Err(format!("Refused: {detail}."))),
        Err(e @ OrderError::IdempotencyKeyReused) => Ok(Err(e.to_string())),
        Err(e) => Err(PageError::Internal(e.to_string())),
    }
}

/// Where a picked-up top-up stands: `pending` while its order waits for the card's next tap,
/// `completed` once a validator credited it and clearing verified it, `refunded` when it
/// expired and its value went back; and when it expires or expired (unix ms). Read in `r`, the
/// snapshot the page is already reading (not a second one).
pub(super) fn state(r: &dyn LedgerRead, order_id: u64) -> Result<(&'static str, u64), PageError> {
    let o = crate::load::order(r, order_id)?
        .ok_or_else(|| PageError::Internal(format!("order {order_id} is not stored")))?;
    let state = match o.state {
        OrderState::Open => "pending",
        OrderState::Completed => "completed",
        OrderState::Refunded => "refunded",
    };
    Ok((state, o.expires_ms))
}
