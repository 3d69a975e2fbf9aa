//! Online payments to merchants: the merchant makes a payment, the cardholder's client relays
//! the card's dialogue exactly as for a load, and the server debits the card (a Debit under the
//! credit key, inside the HSM, proved by the card's transaction MAC) and books card →
//! `merchant:<id>`. The payment intent (card, counter) is durable, and the payment pending,
//! before the Debit leaves the server; a torn payment is settled from the card's next contact
//! like a torn load ([`LoadService::settle_from_snapshot`]): paid once or opened again, never
//! paid twice, never lost.

use super::session::check_idempotency_key;
use super::*;
use crate::ledger::{FundingDay, Payment, PaymentState, Refund, RefundState};

/// Limits on online payments.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentLimits {
    /// Largest single payment, minor units.
    pub max_payment_minor: i32,
    /// Most one card may pay per day (UTC), minor units.
    pub max_daily_per_card_minor: i64,
    /// Most one merchant may be paid per day (UTC), minor units.
    pub max_daily_per_merchant_minor: i64,
    /// Longest a payment may stay payable, ms.
    pub max_expiry_ms: u64,
    /// A completed payment may be refunded within this long after it was paid, ms.
    pub refund_window_ms: u64,
    /// A refund the card has not collected this long after it was made expires: its value
    /// goes back to the merchant, ms.
    pub refund_expiry_ms: u64,
    /// Whether a `notify_url` may name `localhost` or a loopback, private, link-local or
    /// unspecified address (a merchant's test set-up on the server's own machine). Off, a
    /// merchant cannot aim the server's signed POSTs at the back office's own network. A host
    /// name is checked as written, not as it resolves.
    pub notify_private_hosts: bool,
}

impl Default for PaymentLimits {
    fn default() -> Self {
        PaymentLimits {
            max_payment_minor: 200_000,
            max_daily_per_card_minor: 500_000,
            max_daily_per_merchant_minor: 100_000_000,
            max_expiry_ms: 7 * 86_400_000,
            refund_window_ms: 30 * 86_400_000,
            refund_expiry_ms: 30 * 86_400_000,
            notify_private_hosts: false,
        }
    }
}

/// What a merchant asks for (`POST /v1/merchant/payments`).
#[derive(Clone, Debug)]
pub struct PaymentAsk {
    /// Amount, minor units.
    pub amount_minor: i32,
    /// ISO 4217 code (three capital letters).
    pub currency: String,
    /// The merchant's order id.
    pub order_id: String,
    /// What is bought.
    pub description: String,
    /// Payable until (unix ms).
    pub expires_ms: u64,
    /// Where the outcome is sent (http or https).
    pub notify_url: Option<String>,
}

use crate::ledger::{PAYMENT_CARD_DAY as CARD_DAY, PAYMENT_MERCHANT_DAY as MERCHANT_DAY};

/// A name usable in an account (`merchant:<name>`): letters, digits, `.`, `_`, `-`.
pub fn valid_merchant(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn printable(s: &str, max: usize) -> bool {
    s.len() <= max && !s.chars().any(char::is_control)
}

/// Whether an http(s) URL's host, as the HTTP client will read it (WHATWG rules, the `url`
/// crate ureq uses: `127.1`, `2130706433`, `0x7f.0.0.1`, `%31…` and `\\@` all name
/// 127.0.0.1), is `localhost` or an address that is not public: loopback, private, link-local,
/// unspecified, shared (100.64/10), "this network" (0/8), IPv6 unique-local, IPv4-mapped or
/// NAT64 forms of those. A URL it cannot parse counts as private.
fn names_a_private_host(url: &str) -> bool {
    use crate::notify::not_public;
    use std::net::IpAddr;
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    {
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.');
            d == "localhost" || d.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(a)) => not_public(IpAddr::V4(a)),
        Some(url::Host::Ipv6(a)) => not_public(IpAddr::V6(a)),
        None => true,
    }
}

/// A payment or a refund in `currency` when the cards hold `scheme`'s minor units: refused
/// (the amount would be taken as `scheme`'s units — "500 EUR" would debit 500 KRW).
fn same_currency(what: &str, currency: &str, scheme: &str) -> Result<(), LoadError> {
    if currency == scheme {
        return Ok(());
    }
    Err(LoadError::BadRequest(format!(
        "currency {currency:?} is not the card scheme's: cards hold {scheme}, so a {what} is \
         made in {scheme} (amount_minor in {scheme} minor units)"
    )))
}

impl PaymentAsk {
    fn check(&self, limits: &PaymentLimits, scheme: &str, now_ms: u64) -> Result<(), LoadError> {
        let bad = |m: String| Err(LoadError::BadRequest(m));
        if self.amount_minor <= 0 {
            return bad(format!(
                "amount_minor must be positive, got {}",
                self.amount_minor
            ));
        }
        if self.amount_minor > limits.max_payment_minor {
            return Err(LoadError::PaymentLimit(format!(
                "amount_minor {} exceeds the per-payment limit of {}",
                self.amount_minor, limits.max_payment_minor
            )));
        }
        if !valid_currency(&self.currency) {
            return bad(format!(
                "currency {:?} must be an ISO 4217 code (three capital letters)",
                self.currency
            ));
        }
        same_currency("payment", &self.currency, scheme)?;
        if self.order_id.is_empty() || !printable(&self.order_id, 128) {
            return bad("order_id must be 1 to 128 printable characters".into());
        }
        if !printable(&self.description, 500) {
            return bad("description must be at most 500 printable characters".into());
        }
        if self.expires_ms <= now_ms || self.expires_ms - now_ms > limits.max_expiry_ms {
            return bad(format!(
                "expires must be in the future and within {} h",
                limits.max_expiry_ms / 3_600_000
            ));
        }
        if let Some(url) = &self.notify_url {
            let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
            if !scheme_ok || !printable(url, 2_000) || url.contains(char::is_whitespace) {
                return bad("notify_url must be an http(s) URL".into());
            }
            if !limits.notify_private_hosts && names_a_private_host(url) {
                return bad(format!(
                    "notify_url {url:?} names localhost or a loopback, private or link-local \
                     address; notifications go to the merchant's public endpoint"
                ));
            }
        }
        Ok(())
    }
}

/// A new random id with this prefix (`pay`, `ref`).
fn new_id(prefix: &str) -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("{prefix}_{}", hex::encode(b))
}

impl LoadService {
    /// Makes `merchant`'s payment, or returns the one it already made for that order id
    /// (`false`). An order id made again with other terms is refused.
    pub fn create_payment(
        &self,
        merchant: &str,
        ask: PaymentAsk,
        now_ms: u64,
    ) -> Result<(Payment, bool), LoadError> {
        if !valid_merchant(merchant) {
            return Err(LoadError::BadRequest(format!(
                "merchant name {merchant:?} is not usable in an account"
            )));
        }
        ask.check(&self.cfg.payments, &self.cfg.currency, now_ms)?;
        let payment = Payment {
            id: new_id("pay"),
            merchant: merchant.to_string(),
            order_id: ask.order_id,
            amount_minor: ask.amount_minor,
            currency: ask.currency,
            description: ask.description,
            expires_ms: ask.expires_ms,
            notify_url: ask.notify_url,
            state: PaymentState::Open,
            created_ms: now_ms,
            card_uid: None,
            tmc: None,
            paid_ms: None,
            refunded_minor: 0,
        };
        let asked = payment.clone();
        let (stored, new) = self.ledger.transact(move |t| t.create_payment(&asked))?;
        let same_terms = stored.amount_minor == payment.amount_minor
            && stored.currency == payment.currency
            && stored.description == payment.description
            && stored.notify_url == payment.notify_url;
        if !new && !same_terms {
            return Err(LoadError::IdempotencyKeyReused(
                "order id made before with another amount, currency, description or notify_url",
            ));
        }
        Ok((stored, new))
    }

    /// `merchant`'s payment `id` (another merchant's is not found).
    pub fn payment_of(&self, merchant: &str, id: &str) -> Result<Payment, LoadError> {
        let r = self.ledger.read()?;
        r.payment(id)?
            .filter(|p| p.merchant == merchant)
            .ok_or_else(|| LoadError::NoSuchPayment(id.to_string()))
    }

    /// Starts paying payment `payment_id` with card `uid`: returns the first command for the
    /// card, like [`LoadService::start`]; the relay goes on with [`LoadService::respond`].
    /// Above the amount the cardholder chose, the card's payment PIN (`pin`) is checked first.
    pub fn start_payment(
        &self,
        caller: &str,
        payment_id: &str,
        uid: [u8; 7],
        idempotency_key: String,
        pin: Option<String>,
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        let (payment, shadow) = {
            let r = self.ledger.read()?;
            (r.payment(payment_id)?, r.card(&uid)?)
        };
        let payment = payment.ok_or_else(|| LoadError::NoSuchPayment(payment_id.to_string()))?;
        let guarded = shadow
            .payment_pin
            .as_ref()
            .is_some_and(|p| payment.amount_minor > p.above_minor);
        if guarded && payment.state == PaymentState::Open {
            self.check_pin(&uid, pin)?;
        }
        let purpose = Purpose::Payment(payment.id.clone());
        let req = LoadRequest {
            uid,
            amount_minor: payment.amount_minor,
            funding_source: String::new(),
            instrument: String::new(),
            idempotency_key,
        };
        let this_card = payment.card_uid.as_deref() == Some(hex::encode_upper(uid).as_str());
        let payable = match payment.state {
            // Made before currencies were checked: its amount is not in the cards' units.
            PaymentState::Open if payment.currency != self.cfg.currency => {
                Err("its currency is not the card scheme's")
            }
            PaymentState::Open if now_ms > payment.expires_ms => Err("it expired"),
            PaymentState::Open => Ok(()),
            // Torn with this card: its contact now settles it first (then it is paid, or open
            // to pay again).
            PaymentState::Pending if this_card => Ok(()),
            PaymentState::Pending => Err("a card's payment of it is in progress"),
            PaymentState::Completed => Err("it is paid"),
        };
        if let Err(why) = payable {
            // A retried start of the session that paid it gets its answer again.
            let ikey = Self::idem_key(&purpose, caller, &req.idempotency_key);
            let fingerprint = request_fingerprint(&req, &purpose);
            if let Some(r) = self.stored_reply(&ikey, &fingerprint, PAYMENT_DIFFERS)? {
                return Ok(r);
            }
            let sessions = self.sessions.lock().expect("sessions lock");
            if let Some(r) = sessions.answer_again(&ikey, &fingerprint, PAYMENT_DIFFERS)? {
                return Ok(r);
            }
            return Err(LoadError::PaymentNotPayable(format!(
                "payment {payment_id} cannot be paid: {why}"
            )));
        }
        self.open_session(caller, req, purpose, now_ms)
    }

    /// The card's payment PIN: needed, right (clears the count), or wrong (counts towards the
    /// lock). The attempt is counted in the ledger before the PIN is checked, so guesses sent in
    /// parallel cannot outnumber the lock, and the Argon2id check runs outside the ledger's
    /// write transaction (it takes tens of milliseconds). A right PIN clears the count and
    /// replaces a record from before Argon2 with an Argon2id one.
    fn check_pin(&self, uid: &[u8; 7], pin: Option<String>) -> Result<(), LoadError> {
        use crate::ledger::PaymentPin;
        let locked = || {
            LoadError::Pin("pin_locked: too many wrong PINs; an operator sets the PIN again".into())
        };
        let Some(pin) = pin else {
            return Err(LoadError::Pin(
                "pin_required: this card's holder asks for its payment PIN here".into(),
            ));
        };
        let uid = *uid;
        let reserved = self.ledger.transact(move |t| {
            let Some(mut p) = t.card(&uid)?.payment_pin else {
                return Ok(None);
            };
            if p.failures >= PaymentPin::MAX_FAILURES {
                return Ok(Some(None));
            }
            let record = p.clone();
            p.failures += 1;
            t.set_payment_pin(&uid, &p)?;
            Ok(Some(Some(record)))
        })?;
        let record = match reserved {
            None => return Ok(()),
            Some(None) => return Err(locked()),
            Some(Some(record)) => record,
        };
        if !record.matches(&pin) {
            return Err(if record.failures + 1 >= PaymentPin::MAX_FAILURES {
                locked()
            } else {
                LoadError::Pin("wrong_pin".into())
            });
        }
        let upgraded = record
            .is_legacy()
            .then(|| PaymentPin::new(&pin, record.above_minor));
        self.ledger.transact(move |t| {
            // Only the record this PIN was checked against (not one an operator set since).
            let now = t.card(&uid)?.payment_pin;
            let same = now.as_ref().is_some_and(|p| {
                (&p.phc, &p.salt_hex, &p.sha256_hex)
                    == (&record.phc, &record.salt_hex, &record.sha256_hex)
            });
            match now {
                Some(p) if same => {
                    let cleared = PaymentPin {
                        failures: 0,
                        above_minor: p.above_minor,
                        ..upgraded.clone().unwrap_or(p)
                    };
                    t.set_payment_pin(&uid, &cleared)
                }
                _ => Ok(()),
            }
        })?;
        Ok(())
    }

    /// Sets the payment PIN of `caller`'s own card `uid` (a card registered to it): payments
    /// above `above_minor` need it. A card that has a PIN changes it only with `current` (a
    /// wrong one counts towards the lock, as at a payment): the owner's token alone does not
    /// lift the PIN. An `operator` (who identified the holder otherwise) sets it without, which
    /// also unlocks a locked one.
    pub fn set_payment_pin(
        &self,
        caller: &str,
        operator: bool,
        uid: [u8; 7],
        pin: &str,
        current: Option<String>,
        above_minor: i32,
    ) -> Result<(), LoadError> {
        if !(4..=12).contains(&pin.len()) || !pin.bytes().all(|b| b.is_ascii_digit()) {
            return Err(LoadError::BadRequest("pin must be 4 to 12 digits".into()));
        }
        if above_minor < 0 {
            return Err(LoadError::BadRequest(
                "above_minor must not be negative".into(),
            ));
        }
        if !operator {
            let card = self.ledger.read()?.card(&uid)?;
            if card.owner.as_deref() != Some(caller) {
                return Err(LoadError::Pin(
                    "only the card's registered owner sets its payment PIN".into(),
                ));
            }
            if card.payment_pin.is_some() {
                self.check_pin(&uid, current)?;
            }
        }
        let record = crate::ledger::PaymentPin::new(pin, above_minor);
        self.ledger
            .transact(move |t| t.set_payment_pin(&uid, &record))?;
        Ok(())
    }

    /// At `Step::Decide` of a payment: the card holds enough, the day limits of the card and
    /// the merchant hold, and the intent with the payment pending is durable before the Debit
    /// leaves the server — or a refusal.
    pub(super) fn decide_payment(
        &self,
        s: &mut Session,
        snap: &CardSnapshot,
        payment_id: &str,
        now_ms: u64,
    ) -> Result<Result<Decision, Reply>, LoadError> {
        let amount = s.request.amount_minor;
        let uid = snap.uid();
        let mut intent = LoadIntent {
            payment_id: Some(payment_id.to_string()),
            ..self.server_intent(s, snap, now_ms)
        };
        let record = intent_record(&intent).to_vec();
        let snapshot = snap.clone();
        let limits = self.cfg.payments.clone();
        let today = day_of(now_ms);
        let card = hex::encode_upper(uid);
        let recorded = self.ledger.transact(move |t| {
            let merchant = match t.payment(intent.payment_id.as_deref().unwrap_or_default())? {
                Some(p) if p.state == PaymentState::Completed => {
                    return Ok(Err((
                        "already_paid",
                        format!(
                            "the payment is paid (card {}, counter {})",
                            p.card_uid.unwrap_or_default(),
                            p.tmc.unwrap_or_default()
                        ),
                    )))
                }
                Some(p) => p.merchant,
                None => return Ok(Err(("payment_not_payable", "no such payment".into()))),
            };
            // After the payment's state: a payment the card already made (settled from this
            // contact) is `already_paid` even when what is left on the card is less.
            if snapshot.balance_minor() < amount {
                return Ok(Err((
                    "insufficient_value",
                    format!(
                        "the card holds {}; the payment is {amount}",
                        snapshot.balance_minor()
                    ),
                )));
            }
            let card_key = FundingDay::new(CARD_DAY, &card, today);
            let card_day = t.funding_day_total(card_key)?;
            if card_day + i64::from(amount) > limits.max_daily_per_card_minor {
                return Ok(Err((
                    "daily_limit",
                    format!(
                        "{card_day} already paid with this card today; its daily limit is {}",
                        limits.max_daily_per_card_minor
                    ),
                )));
            }
            let merchant_key = FundingDay::new(MERCHANT_DAY, &merchant, today);
            let merchant_day = t.funding_day_total(merchant_key)?;
            if merchant_day + i64::from(amount) > limits.max_daily_per_merchant_minor {
                return Ok(Err((
                    "merchant_daily_limit",
                    "the merchant's daily limit is reached".into(),
                )));
            }
            match t.begin_payment(&uid, &mut intent, now_ms) {
                Ok(_) => {}
                Err(LedgerError::PaymentNotOpen { why, .. }) => {
                    return Ok(Err(("payment_not_payable", why)))
                }
                Err(e) => return Err(e),
            }
            t.add_funding_day(card_key, i64::from(amount))?;
            t.add_funding_day(merchant_key, i64::from(amount))?;
            t.observe_card(&snapshot)?;
            Ok(Ok(()))
        });
        self.apply_once_recorded(s, recorded, record)
    }

    /// Makes `merchant`'s refund of `amount_minor` of its completed payment `payment_id`
    /// (`idempotency_key`: the same key gives the same refund, never a second one).
    /// `currency`, when the merchant names one, must be the card scheme's.
    pub fn create_refund(
        &self,
        merchant: &str,
        payment_id: &str,
        amount_minor: i32,
        currency: Option<&str>,
        idempotency_key: &str,
        now_ms: u64,
    ) -> Result<Refund, LoadError> {
        check_idempotency_key(idempotency_key)?;
        if let Some(c) = currency {
            same_currency("refund", c, &self.cfg.currency)?;
        }
        // Another merchant's payment is not found (whatever its id).
        self.payment_of(merchant, payment_id)?;
        let ikey = format!("refund-made:{merchant}:{idempotency_key}");
        let refund = Refund {
            id: new_id("ref"),
            payment_id: payment_id.to_string(),
            merchant: merchant.to_string(),
            card_uid: String::new(),
            amount_minor,
            state: RefundState::Pending,
            created_ms: now_ms,
            tmc: None,
            credited_ms: None,
            expired_ms: None,
        };
        let window = self.cfg.payments.refund_window_ms;
        let made = self.ledger.transact(move |t| {
            if let Some(v) = t.idempotent(&ikey)? {
                let earlier = v.as_str().and_then(|id| t.refund(id).transpose());
                return match earlier.transpose()? {
                    Some(r)
                        if r.payment_id == refund.payment_id && r.amount_minor == amount_minor =>
                    {
                        Ok(Ok(r))
                    }
                    _ => Ok(Err(())),
                };
            }
            let r = t.create_refund(&refund, now_ms, window)?;
            t.put_idempotent(&ikey, &serde_json::Value::String(r.id.clone()))?;
            Ok(Ok(r))
        });
        match made {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(())) => Err(LoadError::IdempotencyKeyReused("payment or amount differ")),
            Err(LedgerError::RefundRefused(why)) => Err(LoadError::RefundRefused(why)),
            Err(e) => Err(e.into()),
        }
    }

    /// Expires the refunds not collected within `refund_expiry_ms` of being made (at most
    /// `limit` per call, oldest first; a collection in progress is left to settle): each one's
    /// value goes back to its merchant in its own transaction. Returns the refunds expired.
    pub fn expire_refunds(&self, now_ms: u64, limit: usize) -> Result<Vec<Refund>, LoadError> {
        let Some(made_by) = now_ms.checked_sub(self.cfg.payments.refund_expiry_ms) else {
            return Ok(Vec::new());
        };
        let due = self.ledger.read()?.refunds_uncollected(made_by, limit)?;
        let mut expired = Vec::new();
        for r in due {
            let id = r.id.clone();
            if let Some(e) = self
                .ledger
                .transact(move |t| t.expire_refund(&id, now_ms))?
            {
                tracing::info!(refund_id = %e.id, merchant = %e.merchant, amount_minor = e.amount_minor, "refund not collected in time: back to the merchant");
                expired.push(e);
            }
        }
        Ok(expired)
    }

    /// `merchant`'s refund `id`, or the cardholder's view of it (`merchant` `None`).
    pub fn refund_of(&self, merchant: Option<&str>, id: &str) -> Result<Refund, LoadError> {
        let r = self.ledger.read()?;
        r.refund(id)?
            .filter(|r| merchant.is_none_or(|m| r.merchant == m))
            .ok_or_else(|| LoadError::NoSuchPayment(id.to_string()))
    }

    /// Starts collecting refund `refund_id` onto card `uid` (the card that paid): returns the
    /// first command for the card; the relay goes on with [`LoadService::respond`].
    pub fn start_refund(
        &self,
        caller: &str,
        refund_id: &str,
        uid: [u8; 7],
        idempotency_key: String,
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        let refund = self.refund_of(None, refund_id)?;
        if refund.card_uid != hex::encode_upper(uid) {
            return Err(LoadError::RefundRefused(
                "the refund goes to the card that paid".into(),
            ));
        }
        let req = LoadRequest {
            uid,
            amount_minor: refund.amount_minor,
            funding_source: String::new(),
            instrument: String::new(),
            idempotency_key,
        };
        self.open_session(caller, req, Purpose::Refund(refund.id), now_ms)
    }

    /// At `Step::Decide` of a refund's collection: the card's balance ceiling holds, and the
    /// intent with the refund collecting is durable before the Credit leaves the server.
    pub(super) fn decide_refund(
        &self,
        s: &mut Session,
        snap: &CardSnapshot,
        refund_id: &str,
        now_ms: u64,
    ) -> Result<Result<Decision, Reply>, LoadError> {
        let amount = s.request.amount_minor;
        if i64::from(snap.balance_minor()) + i64::from(amount)
            > i64::from(self.cfg.balance_ceiling_minor)
        {
            return Ok(Err(self.refused(
                s,
                "balance_ceiling",
                &format!(
                    "balance {} + {amount} would exceed the ceiling of {}",
                    snap.balance_minor(),
                    self.cfg.balance_ceiling_minor
                ),
            )));
        }
        let uid = snap.uid();
        let mut intent = LoadIntent {
            kind: IntentKind::Refund,
            payment_id: Some(refund_id.to_string()),
            ..self.server_intent(s, snap, now_ms)
        };
        let record = intent_record(&intent).to_vec();
        let snapshot = snap.clone();
        let recorded = self.ledger.transact(move |t| {
            match t.begin_refund(&uid, &mut intent) {
                Ok(_) => {}
                Err(LedgerError::RefundRefused(why)) => {
                    return Ok(Err(("refund_not_collectable", why)))
                }
                Err(e) => return Err(e),
            }
            t.observe_card(&snapshot)?;
            Ok(Ok(()))
        });
        self.apply_once_recorded(s, recorded, record)
    }

    /// The intent of a back-office change with no funding source (a payment, a refund) at the
    /// card's snapshot.
    fn server_intent(&self, s: &Session, snap: &CardSnapshot, now_ms: u64) -> LoadIntent {
        LoadIntent {
            uid: hex::encode_upper(snap.uid()),
            tmc_before: snap.tmc(),
            attempt: 0,
            balance_before_minor: snap.balance_minor(),
            amount_minor: s.request.amount_minor,
            key_version: snap.key_version(),
            funding_source: String::new(),
            funding_auth: String::new(),
            instrument: String::new(),
            idempotency_key: s.request.idempotency_key.clone(),
            requested_by: s.caller.clone(),
            state: IntentState::Authorised,
            created_ms: now_ms,
            settled_ms: None,
            kind: IntentKind::Payment,
            reverses_tmc: None,
            reversed_at_tmc: None,
            payment_id: None,
        }
    }

    /// A payment the card made is booked (here, or settled later): the merchant is told.
    pub(super) fn payment_paid(&self, payment_id: &str, merchant: &str) {
        self.stats.lock().expect("stats").payments_completed += 1;
        tracing::info!(payment_id, merchant, "payment completed");
    }
}
