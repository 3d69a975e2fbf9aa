//! Value bought online and picked up at the card's next tap (the action list, issue 19).
//!
//! An order is paid when it is made, through the same funding sources and instrument checks
//! as a load: authorised, then — once the order, its posting `funding:<source>` →
//! `orders:pending` and its list change are durable in one ledger transaction — captured. The
//! list the validators hold is numbered changes (an order added, an order withdrawn), signed
//! by the HSM as a snapshot or a delta ([`purse::actionlist`]); each added order carries the
//! card's credit key wrapped for validator SAMs ([`purse::sam::Hsm::wrap_order_key`]).
//!
//! A validator's pick-up reaches clearing as a tap of kind `pickup:<order id>` whose
//! transaction MAC the HSM verified; [`complete_order_from_tap`] completes the order exactly
//! once inside clearing's transaction (`orders:pending` → `card:<UID>`) and withdraws it from
//! the list. An order not picked up by its expiry (plus a grace for late taps) is refunded:
//! `orders:pending` → `funding:<source>` and the source's refund, once ([`LoadService::expire_orders`]).
//!
//! Orders live in the ledger's keyed records (the idempotency store both backends have),
//! written only inside ledger transactions: `action-order:<id>` (the [`OrderRecord`]),
//! `action-orders:next`, `action-orders:version`, `action-orders:change:<version>` and the
//! expiry sweep's cursor.

use super::*;
use crate::ledger::{Anomaly, LedgerRead, LedgerWrite};
use purse::actionlist::{ActionUpdate, Entry, Order};
use purse::blocklist::ListKind;

/// Limits of action-list orders (`[limits.orders]` in the server's configuration).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrderLimits {
    /// An order may be picked up for this long after it is made.
    pub expiry_ms: u64,
    /// After its expiry, an order is refunded only this much later (taps of pick-ups made
    /// before the expiry still reaching clearing).
    pub refund_grace_ms: u64,
    /// Largest order, minor units.
    pub max_order_minor: i32,
    /// The card key version the orders' wrapped credit keys are of.
    pub key_version: u8,
    /// Most a validator may have credited beyond its pick-ups cleared: its ceiling grants'
    /// total stays within the pick-ups cleared plus this.
    pub validator_exposure_minor: i64,
}

impl Default for OrderLimits {
    fn default() -> Self {
        OrderLimits {
            expiry_ms: 7 * 86_400_000,
            refund_grace_ms: 2 * 86_400_000,
            max_order_minor: 100_000,
            key_version: 1,
            validator_exposure_minor: 200_000,
        }
    }
}

/// Where an order stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// On the list, waiting for the card's next tap.
    Open,
    /// A validator credited it; clearing verified the card's transaction MAC.
    Completed,
    /// Not picked up in time: its value went back to its funding.
    Refunded,
}

/// The pick-up that completed an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PickedUp {
    /// The card counter the credit consumed.
    pub tmc: u32,
    /// The validator.
    pub device_id: u32,
    /// Its tap's sequence number.
    pub device_seq: u64,
    /// When clearing completed the order (unix ms).
    pub cleared_ms: u64,
}

/// An order, as the ledger keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// Order id (1, 2, …).
    pub id: u64,
    /// The card, 14 hex digits.
    pub card_uid: String,
    /// The value, minor units.
    pub amount_minor: i32,
    /// Funding source name.
    pub source: String,
    /// Instrument at the source.
    pub instrument: String,
    /// The source's authorisation id.
    pub auth: String,
    /// Who made it (API caller).
    pub caller: String,
    /// The caller's Idempotency-Key.
    pub idempotency_key: String,
    /// Made at (unix ms).
    pub created_ms: u64,
    /// Not picked up from then on (unix ms; validators compare in whole seconds).
    pub expires_ms: u64,
    /// The card key version of its wrapped key.
    pub key_version: u8,
    /// Its state.
    pub state: OrderState,
    /// The pick-up, once completed.
    #[serde(default)]
    pub picked_up: Option<PickedUp>,
    /// When it was refunded (unix ms).
    #[serde(default)]
    pub refunded_ms: Option<u64>,
}

/// What a new order asks for: what a load does (the card, the value, the funding, the
/// caller's idempotency key).
pub type OrderRequest = super::LoadRequest;

/// Why an order was not made, or a list not built.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// Malformed or out of limits.
    #[error("{0}")]
    BadRequest(String),
    /// Refused: the card is blocked, the funding declined, the instrument is not the caller's.
    #[error("{reason}: {detail}")]
    Refused {
        /// machine-readable reason
        reason: &'static str,
        /// detail
        detail: String,
    },
    /// The Idempotency-Key was used for another order.
    #[error("the Idempotency-Key was used for a different order")]
    IdempotencyKeyReused,
    /// No such order (or not the caller's).
    #[error("no order {0}")]
    NotFound(u64),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The HSM failed.
    #[error("HSM: {0}")]
    Hsm(String),
}

impl From<LoadError> for OrderError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Ledger(l) => OrderError::Ledger(l),
            LoadError::NotYourInstrument { .. } => OrderError::Refused {
                reason: "not_your_instrument",
                detail: e.to_string(),
            },
            other => OrderError::BadRequest(other.to_string()),
        }
    }
}

fn order_key(id: u64) -> String {
    format!("action-order:{id:020}")
}
const NEXT_ID: &str = "action-orders:next";
const VERSION: &str = "action-orders:version";
fn change_key(v: u64) -> String {
    format!("action-orders:change:{v:020}")
}
const EXPIRY_CURSOR: &str = "action-orders:expiry-cursor";
fn grant_key(device: u32) -> String {
    format!("action-ceiling:{device}")
}
fn cleared_key(device: u32) -> String {
    format!("action-ceiling-cleared:{device}")
}
fn request_key(caller: &str, key: &str) -> String {
    format!("action-order-request:{caller}:{key}")
}
/// The escrow account paid orders wait in.
pub const ORDERS_PENDING: &str = "orders:pending";
/// Where a pick-up with no open order to complete is posted from (with an anomaly).
pub const ORDERS_UNMATCHED: &str = "orders:unmatched";

fn get_u64(r: &dyn LedgerRead, key: &str) -> Result<u64, LedgerError> {
    Ok(r.idempotent(key)?.and_then(|v| v.as_u64()).unwrap_or(0))
}

/// Order `id` as stored.
pub fn order(r: &dyn LedgerRead, id: u64) -> Result<Option<OrderRecord>, LedgerError> {
    Ok(r.idempotent(&order_key(id))?
        .and_then(|v| serde_json::from_value(v).ok()))
}

fn put_order(t: &mut dyn LedgerWrite, o: &OrderRecord) -> Result<(), LedgerError> {
    let v = serde_json::to_value(o).expect("an order serialises");
    t.put_idempotent(&order_key(o.id), &v)
}

/// Appends a list change (order added or withdrawn); returns the new list version.
fn append_change(t: &mut dyn LedgerWrite, id: u64, add: bool) -> Result<u64, LedgerError> {
    let v = get_u64(t, VERSION)? + 1;
    t.put_idempotent(
        &change_key(v),
        &serde_json::json!({"order_id": id, "add": add}),
    )?;
    t.put_idempotent(VERSION, &serde_json::json!(v))?;
    Ok(v)
}

/// The list's latest version (0: no order was ever made).
pub fn list_version(r: &dyn LedgerRead) -> Result<u64, LedgerError> {
    get_u64(r, VERSION)
}

/// What completing an order from a pick-up tap found.
#[derive(Debug, PartialEq, Eq)]
pub enum PickupBooked {
    /// The order is completed by this pick-up.
    Completed,
    /// Not an open order of this card and amount: the credit is posted from
    /// [`ORDERS_UNMATCHED`] (the card has the value) and reported.
    Unmatched(Anomaly),
}

/// Completes order `order_id` from a pick-up the HSM proved (inside clearing's transaction;
/// the tap's own idempotency marker makes a resent tap a duplicate before this is reached).
/// An open order of the same card and amount: `orders:pending` → card, completed, withdrawn
/// from the list. Anything else — unknown, another card or amount, already completed (two
/// validators applied it), refunded — still posts the card's credit (from
/// [`ORDERS_UNMATCHED`]), so the card's shadow purse matches the card, and is an anomaly.
pub fn complete_order_from_tap(
    t: &mut dyn LedgerWrite,
    proof: &TmacVerified,
    order_id: u64,
    device_id: u32,
    device_seq: u64,
    now_ms: u64,
) -> Result<PickupBooked, LedgerError> {
    let r = proof.receipt();
    let uid = hex::encode_upper(r.uid());
    let reference = format!("order:{order_id}:pickup:{uid}:{}", r.tmc());
    // Whatever it completes, the device credited this much of its ceiling.
    let cleared = get_u64(t, &cleared_key(device_id))?
        .saturating_add(u64::try_from(r.amount_minor()).unwrap_or(0));
    t.put_idempotent(&cleared_key(device_id), &serde_json::json!(cleared))?;
    let found = order(t, order_id)?;
    let why = match &found {
        None => Some("no such order".to_string()),
        Some(o) if o.card_uid != uid || o.amount_minor != r.amount_minor() => Some(format!(
            "order {order_id} is {} for card {}",
            o.amount_minor, o.card_uid
        )),
        Some(o) if o.state == OrderState::Completed => {
            Some(format!("order {order_id} was already picked up"))
        }
        Some(o) if o.state == OrderState::Refunded => Some(format!(
            "order {order_id} was refunded before this pick-up reached clearing"
        )),
        Some(_) => None,
    };
    if let Some(detail) = why {
        t.post_order_pickup(proof, ORDERS_UNMATCHED, &reference, now_ms)?;
        return Ok(PickupBooked::Unmatched(Anomaly {
            kind: "pickup_unmatched".into(),
            card_uid: uid,
            tmc: r.tmc(),
            device_id,
            device_seq,
            detail,
        }));
    }
    let mut o = found.expect("checked");
    t.post_order_pickup(proof, ORDERS_PENDING, &reference, now_ms)?;
    o.state = OrderState::Completed;
    o.picked_up = Some(PickedUp {
        tmc: r.tmc(),
        device_id,
        device_seq,
        cleared_ms: now_ms,
    });
    put_order(t, &o)?;
    append_change(t, order_id, false)?;
    Ok(PickupBooked::Completed)
}

impl LoadService {
    /// Makes an order: checked like a load (amount, funding source, the caller's own
    /// instrument, the card not blocked), authorised at the source, recorded with its posting
    /// `funding:<source>` → `orders:pending` and its list change in one ledger transaction,
    /// then captured. The same (caller, Idempotency-Key) returns the same order.
    pub fn create_order(
        &self,
        caller: &str,
        limits: &OrderLimits,
        req: OrderRequest,
        now_ms: u64,
    ) -> Result<OrderRecord, OrderError> {
        let uid_hex = hex::encode_upper(req.uid);
        let same = |o: &OrderRecord| {
            o.card_uid == uid_hex
                && o.amount_minor == req.amount_minor
                && o.source == req.funding_source
                && o.instrument == req.instrument
        };
        if let Some(o) = self.order_for_request(caller, &req.idempotency_key)? {
            return if same(&o) {
                Ok(o)
            } else {
                Err(OrderError::IdempotencyKeyReused)
            };
        }
        if req.amount_minor <= 0 || req.amount_minor > limits.max_order_minor {
            return Err(OrderError::BadRequest(format!(
                "amount_minor must be 1 to {}",
                limits.max_order_minor
            )));
        }
        let source = self
            .sources
            .get(&req.funding_source)
            .cloned()
            .ok_or_else(|| {
                OrderError::BadRequest(format!(
                    "no funding source {:?}; known: {}",
                    req.funding_source,
                    self.source_names().join(", ")
                ))
            })?;
        if !source.refundable() {
            return Err(OrderError::Refused {
                reason: "source_not_refundable",
                detail: format!(
                    "an order not picked up is refunded; {} cannot refund",
                    source.name()
                ),
            });
        }
        self.check_instrument(caller, &*source, &req.instrument)?;
        self.card_takes_order(&req, &uid_hex)?;
        let reference = format!("order:{caller}:{}", req.idempotency_key);
        let freq = FundingRequest {
            amount_minor: i64::from(req.amount_minor),
            reference: &reference,
            instrument: &req.instrument,
        };
        let auth = match source.authorise(&freq) {
            Err(FundingError::Timeout) => source.authorise(&freq), // same reference: safe
            other => other,
        }
        .map_err(|e| OrderError::Refused {
            reason: "funding_declined",
            detail: e.to_string(),
        })?;
        let draft = OrderRecord {
            id: 0,
            card_uid: uid_hex.clone(),
            amount_minor: req.amount_minor,
            source: req.funding_source.clone(),
            instrument: req.instrument.clone(),
            auth: auth.clone(),
            caller: caller.to_string(),
            idempotency_key: req.idempotency_key.clone(),
            created_ms: now_ms,
            expires_ms: now_ms.saturating_add(limits.expiry_ms),
            key_version: limits.key_version,
            state: OrderState::Open,
            picked_up: None,
            refunded_ms: None,
        };
        let account = source.ledger_account();
        let rkey = request_key(caller, &req.idempotency_key);
        let written = self.ledger.transact(move |t| {
            // A racing request with the same key made it first: that order stands.
            if let Some(id) = t.idempotent(&rkey)?.and_then(|v| v.as_u64()) {
                return Ok((order(t, id)?, false));
            }
            let id = get_u64(t, NEXT_ID)? + 1;
            let o = OrderRecord {
                id,
                ..draft.clone()
            };
            t.post(
                now_ms,
                &account,
                ORDERS_PENDING,
                i64::from(o.amount_minor),
                &format!("order:{id}"),
            )?;
            put_order(t, &o)?;
            append_change(t, id, true)?;
            t.put_idempotent(NEXT_ID, &serde_json::json!(id))?;
            t.put_idempotent(&rkey, &serde_json::json!(id))?;
            Ok((Some(o), true))
        });
        match written {
            Ok((Some(o), true)) => {
                self.apply_funding(&FundingAction::Capture {
                    source: o.source.clone(),
                    auth: o.auth.clone(),
                });
                tracing::info!(order = o.id, amount_minor = o.amount_minor, source = %o.source, "order made; on the action list");
                Ok(o)
            }
            Ok((found, _)) => {
                // A racing request with the same key wrote the order first. A source answers
                // one reference with one authorisation, so ours may be the very one that
                // order holds (and is capturing): voiding it would leave the order open, to
                // be credited at the next tap, with nothing taken. Void only one of our own.
                if found.as_ref().is_none_or(|o| o.auth != auth) {
                    let _ = source.void(&auth);
                }
                match found {
                    Some(o) if same(&o) => Ok(o),
                    _ => Err(OrderError::IdempotencyKeyReused),
                }
            }
            Err(e) => {
                if let Err(ve) = source.void(&auth) {
                    tracing::error!(%ve, auth, "the order could not be written and its authorisation could not be voided; void it at the source");
                }
                Err(e.into())
            }
        }
    }

    /// An order's card checks, before anything is authorised: the card is not blocked, and
    /// the order would not take it over its balance ceiling.
    fn card_takes_order(&self, req: &OrderRequest, uid_hex: &str) -> Result<(), OrderError> {
        let r = self.ledger.read()?;
        if r.card(&req.uid)?.blocked {
            return Err(OrderError::Refused {
                reason: "card_blocked",
                detail: format!("card {uid_hex} is blocked"),
            });
        }
        // The card would refuse a credit over its upper limit: not taken as an order. (The
        // shadow purse lags only by fares not cleared yet, which lower it.)
        let balance = r.balance(&crate::ledger::card_account(&req.uid))?;
        let ceiling = i64::from(self.cfg.balance_ceiling_minor);
        if balance.saturating_add(i64::from(req.amount_minor)) > ceiling {
            return Err(OrderError::Refused {
                reason: "balance_ceiling",
                detail: format!(
                    "balance {balance} + {} would exceed the ceiling of {ceiling}",
                    req.amount_minor
                ),
            });
        }
        Ok(())
    }

    fn order_for_request(
        &self,
        caller: &str,
        key: &str,
    ) -> Result<Option<OrderRecord>, OrderError> {
        let r = self.ledger.read()?;
        match r
            .idempotent(&request_key(caller, key))?
            .and_then(|v| v.as_u64())
        {
            Some(id) => Ok(order(&*r, id)?),
            None => Ok(None),
        }
    }

    /// Order `id`.
    pub fn order(&self, id: u64) -> Result<OrderRecord, OrderError> {
        order(&*self.ledger.read()?, id)?.ok_or(OrderError::NotFound(id))
    }

    /// The list entry of an open order: the card's credit key wrapped by the HSM.
    fn entry_of(&self, o: &OrderRecord) -> Result<Entry, OrderError> {
        let uid: [u8; 7] = hex::decode(&o.card_uid)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| OrderError::Hsm(format!("stored card UID {:?}", o.card_uid)))?;
        let wrapped_key = self
            .hsm
            .lock()
            .expect("hsm lock")
            .wrap_order_key(&uid, o.key_version)
            .map_err(|e| OrderError::Hsm(e.to_string()))?;
        Ok(Entry::Add(Order {
            order_id: o.id,
            uid,
            amount_minor: o.amount_minor,
            expires_s: o.expires_ms / 1000,
            key_version: o.key_version,
            wrapped_key,
        }))
    }

    /// The list changes after version `after` (at most `limit` versions) as a delta for
    /// `operator`, or `None` when there are none. An order added and withdrawn inside the
    /// range is sent withdrawn (one entry per order).
    pub fn action_delta(
        &self,
        operator: &str,
        after: u64,
        limit: u64,
    ) -> Result<Option<ActionUpdate>, OrderError> {
        let (latest, last_state) = {
            let r = self.ledger.read()?;
            let latest = list_version(&*r)?;
            if latest <= after {
                return Ok(None);
            }
            let to = latest.min(after.saturating_add(limit.max(1)));
            let mut last: BTreeMap<u64, Option<OrderRecord>> = BTreeMap::new();
            for v in after + 1..=to {
                let Some(c) = r.idempotent(&change_key(v))? else {
                    continue;
                };
                let id = c.get("order_id").and_then(|x| x.as_u64()).unwrap_or(0);
                let add = c.get("add").and_then(|x| x.as_bool()).unwrap_or(false);
                let o = if add { order(&*r, id)? } else { None };
                last.insert(id, o.filter(|o| o.state == OrderState::Open));
            }
            (to, last)
        };
        let mut entries = Vec::with_capacity(last_state.len());
        for (id, o) in last_state {
            entries.push(match o {
                Some(o) => self.entry_of(&o)?,
                None => Entry::Remove { order_id: id },
            });
        }
        Ok(Some(ActionUpdate {
            kind: ListKind::Delta,
            operator: operator.to_string(),
            from_version: after,
            to_version: latest,
            entries,
        }))
    }

    /// Every open order at the latest version, as a snapshot for `operator` (`None` before
    /// the first order).
    pub fn action_snapshot(&self, operator: &str) -> Result<Option<ActionUpdate>, OrderError> {
        let (latest, open) = {
            let r = self.ledger.read()?;
            let latest = list_version(&*r)?;
            if latest == 0 {
                return Ok(None);
            }
            let from = get_u64(&*r, EXPIRY_CURSOR)?.max(1);
            let next = get_u64(&*r, NEXT_ID)?;
            let mut open = Vec::new();
            for id in from..=next {
                if let Some(o) = order(&*r, id)?.filter(|o| o.state == OrderState::Open) {
                    open.push(o);
                }
            }
            (latest, open)
        };
        let entries = open
            .iter()
            .map(|o| self.entry_of(o))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(ActionUpdate {
            kind: ListKind::Snapshot,
            operator: operator.to_string(),
            from_version: 0,
            to_version: latest,
            entries,
        }))
    }

    /// Validator `device`'s action-list ceiling grant: the total granted, raised (a new
    /// number) to the device's pick-ups cleared plus `validator_exposure_minor` when that is
    /// more than granted so far; otherwise the last grant again. MAC'd by the HSM with the
    /// device's key ([`purse::sam::ActionGrant`]).
    pub fn action_grant_for(
        &self,
        device: u32,
        limits: &OrderLimits,
    ) -> Result<purse::sam::ActionGrant, OrderError> {
        let exposure = limits.validator_exposure_minor.max(0);
        let (seq, total) = self.ledger.transact(move |t| {
            let cleared = i64::try_from(get_u64(t, &cleared_key(device))?).unwrap_or(i64::MAX);
            let (seq, total) = t
                .idempotent(&grant_key(device))?
                .and_then(|v| {
                    Some((
                        u32::try_from(v.get("seq")?.as_u64()?).ok()?,
                        v.get("total_minor")?.as_i64()?,
                    ))
                })
                .unwrap_or((0, 0));
            let target = cleared.saturating_add(exposure);
            if target <= total && seq > 0 {
                return Ok((seq, total));
            }
            let next = (seq + 1, target.max(total));
            t.put_idempotent(
                &grant_key(device),
                &serde_json::json!({"seq": next.0, "total_minor": next.1}),
            )?;
            Ok(next)
        })?;
        self.hsm
            .lock()
            .expect("hsm lock")
            .action_grant(device, seq, total)
            .map_err(|e| OrderError::Hsm(e.to_string()))
    }

    /// Signs an action-list update with the back office's Ed25519 key (as the blocklist).
    pub fn sign_actions(&self, u: &ActionUpdate) -> Result<Vec<u8>, OrderError> {
        let body = u.body();
        let sig = self
            .with_hsm(|hsm| hsm.sign(&body))
            .map_err(|e| OrderError::Hsm(e.to_string()))?;
        let mut bytes = body;
        bytes.extend_from_slice(&sig);
        Ok(bytes)
    }

    /// Refunds the orders not picked up by their expiry plus `refund_grace_ms` (at most
    /// `limit` per call, oldest first): each in its own transaction — `orders:pending` →
    /// `funding:<source>`, the order refunded and withdrawn from the list — then refunded at
    /// its source. Exactly once: the state is read again inside the transaction. Returns the
    /// orders refunded.
    pub fn expire_orders(
        &self,
        limits: &OrderLimits,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<OrderRecord>, OrderError> {
        let mut refunded = Vec::new();
        let accounts: Arc<HashMap<String, String>> = Arc::new(
            self.sources
                .iter()
                .map(|(n, s)| (n.clone(), s.ledger_account()))
                .collect(),
        );
        for _ in 0..limit {
            let grace = limits.refund_grace_ms;
            let accounts = accounts.clone();
            let step = self.ledger.transact(move |t| {
                let next = get_u64(t, NEXT_ID)?;
                let cursor = get_u64(t, EXPIRY_CURSOR)?.max(1);
                if cursor > next {
                    return Ok(None);
                }
                let Some(mut o) = order(t, cursor)? else {
                    t.put_idempotent(EXPIRY_CURSOR, &serde_json::json!(cursor + 1))?;
                    return Ok(Some(None));
                };
                if o.state == OrderState::Open {
                    // Orders are made with one expiry window: the first one not due ends the sweep.
                    if o.expires_ms.saturating_add(grace) > now_ms {
                        return Ok(None);
                    }
                    let account = accounts
                        .get(&o.source)
                        .cloned()
                        .unwrap_or_else(|| format!("funding:{}", o.source));
                    t.post(
                        now_ms,
                        ORDERS_PENDING,
                        &account,
                        i64::from(o.amount_minor),
                        &format!("order:{}:refund", o.id),
                    )?;
                    o.state = OrderState::Refunded;
                    o.refunded_ms = Some(now_ms);
                    put_order(t, &o)?;
                    append_change(t, o.id, false)?;
                    t.put_idempotent(EXPIRY_CURSOR, &serde_json::json!(cursor + 1))?;
                    return Ok(Some(Some(o)));
                }
                t.put_idempotent(EXPIRY_CURSOR, &serde_json::json!(cursor + 1))?;
                Ok(Some(None))
            })?;
            match step {
                None => break,
                Some(None) => {}
                Some(Some(o)) => {
                    tracing::info!(order = o.id, amount_minor = o.amount_minor, source = %o.source, "order not picked up in time: refunded");
                    self.apply_funding(&FundingAction::Refund {
                        source: o.source.clone(),
                        auth: o.auth.clone(),
                        amount_minor: i64::from(o.amount_minor),
                    });
                    refunded.push(o);
                }
            }
        }
        Ok(refunded)
    }
}

use std::collections::BTreeMap;
