//! The records the ledger stores: postings, load intents, card shadows, block changes,
//! vouchers, instruments and anomalies. They are the same whatever backend stores them.

use serde::{Deserialize, Serialize};

/// One movement of value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    /// Sequence number (monotonic, the LMDB key).
    pub seq: u64,
    /// When it was posted (unix ms, from the daemon's clock).
    pub time_ms: u64,
    /// Account debited.
    pub from: String,
    /// Account credited.
    pub to: String,
    /// Amount, minor units (> 0).
    pub amount_minor: i64,
    /// What it traces to: `load:<UID>:<TMC>`, `tap:<UID>:<TMC>`, `issue:<UID>`, a funding ref.
    pub reference: String,
}

/// Where a load intent stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentState {
    /// Funding authorised, Credit may have been sent; the card has not proved it yet.
    Authorised,
    /// The card proved the credit (transaction MAC verified); funding captured.
    Completed,
    /// The card never applied it; funding released.
    Voided,
}

/// What an intent changes on the card.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentKind {
    /// A load: Credit, funding → card.
    #[default]
    Load,
    /// A reversal of a completed load: Debit by the back office, card → funding, and the
    /// funding refunded.
    Reversal,
    /// An online payment to a merchant: Debit by the back office, card → `merchant:<id>`
    /// (the intent's `payment_id` names the [`Payment`]).
    Payment,
    /// A merchant's refund collected by the card: Credit by the back office,
    /// `refunds:pending` → card (the intent's `payment_id` names the [`Refund`]).
    Refund,
}

/// What to do with the funding source once an intent's change is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FundingAction {
    /// A load the card applied: capture the authorisation.
    Capture {
        /// source name
        source: String,
        /// authorisation id
        auth: String,
    },
    /// A load the card never applied: release the authorisation.
    Release {
        /// source name
        source: String,
        /// authorisation id
        auth: String,
    },
    /// A payment the card made: the merchant is told (no funding moves).
    Paid {
        /// the payment
        payment_id: String,
        /// its merchant
        merchant: String,
    },
    /// A refund the card collected (no funding moves).
    RefundCredited {
        /// the refund
        refund_id: String,
    },
    /// A reversal the card applied: refund the load's funding.
    Refund {
        /// source name
        source: String,
        /// authorisation id
        auth: String,
        /// minor units
        amount_minor: i64,
    },
}

/// A load or a reversal: (card, counter, amount, funding), recorded before the card is touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadIntent {
    /// Card UID (hex).
    pub uid: String,
    /// The card's TMC before the load; the load consumes `tmc_before + 1`.
    pub tmc_before: u32,
    /// Attempt number at this counter (earlier attempts were voided).
    #[serde(default)]
    pub attempt: u16,
    /// The card's balance before the load.
    pub balance_before_minor: i32,
    /// Amount, minor units.
    pub amount_minor: i32,
    /// The card key version.
    pub key_version: u8,
    /// The funding source name.
    pub funding_source: String,
    /// The funding source's authorisation id.
    pub funding_auth: String,
    /// The instrument at the source (card token, points holder) — for its daily limit.
    #[serde(default)]
    pub instrument: String,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// Who asked (the authenticated caller).
    pub requested_by: String,
    /// State.
    pub state: IntentState,
    /// Created (unix ms).
    pub created_ms: u64,
    /// Settled (unix ms).
    pub settled_ms: Option<u64>,
    /// Load or reversal.
    #[serde(default)]
    pub kind: IntentKind,
    /// A reversal: the counter the reversed load consumed.
    #[serde(default)]
    pub reverses_tmc: Option<u32>,
    /// A load: the counter of the reversal that takes (or took) it back, while that reversal
    /// is pending or completed.
    #[serde(default)]
    pub reversed_at_tmc: Option<u32>,
    /// A payment: the [`Payment`] it pays; a refund: the [`Refund`] it collects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
}

impl LoadIntent {
    /// The change to the card's value, minor units (negative for a reversal).
    pub fn delta_minor(&self) -> i64 {
        match self.kind {
            IntentKind::Load | IntentKind::Refund => i64::from(self.amount_minor),
            IntentKind::Reversal | IntentKind::Payment => -i64::from(self.amount_minor),
        }
    }

    /// The value command the card executes for it.
    pub fn tx_kind(&self) -> purse::receipt::TxKind {
        match self.kind {
            IntentKind::Load | IntentKind::Refund => purse::receipt::TxKind::Credit,
            IntentKind::Reversal | IntentKind::Payment => purse::receipt::TxKind::Debit,
        }
    }

    /// The change it records, as the card would have made it: what
    /// [`purse::txn::settle`] compares the card's next snapshot with.
    pub fn pending_change(&self, uid: [u8; 7]) -> purse::txn::PendingChange {
        purse::txn::PendingChange {
            uid,
            tmc_before: self.tmc_before,
            balance_before_minor: self.balance_before_minor,
            kind: self.tx_kind(),
            amount_minor: self.amount_minor,
            key_version: self.key_version,
        }
    }
}

/// What the ledger knows about a card.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardShadow {
    /// The highest TMC the back office has seen from the card.
    pub last_tmc: u32,
    /// The balance the card reported with that TMC.
    pub last_reported_balance_minor: Option<i32>,
    /// Blocked cards are refused loads and listed for validators.
    pub blocked: bool,
    /// Why it is blocked.
    pub block_reason: Option<String>,
    /// The day (unix days, UTC) `load_day_minor` counts.
    #[serde(default)]
    pub load_day: u64,
    /// Loads authorised or completed on `load_day`, minor units.
    #[serde(default)]
    pub load_day_minor: i64,
    /// The cardholder (API caller name) who may report the card lost or stolen.
    #[serde(default)]
    pub owner: Option<String>,
    /// Every counter 1..=`booked_through_tmc` has been booked (load, debit, or record-only).
    #[serde(default)]
    pub booked_through_tmc: u32,
    /// The card's balance after the transaction at `booked_through_tmc` (as the card proved it).
    #[serde(default)]
    pub booked_balance_minor: Option<i32>,
    /// Counters booked above a gap: (counter, balance after, the change it made), sorted; a
    /// gap that never fills is an anomaly.
    #[serde(default)]
    pub booked_above: Vec<(u32, i32, i64)>,
    /// The cardholder's PIN for online payments above an amount, if it set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_pin: Option<PaymentPin>,
}

/// A card's PIN for online payments above `above_minor`: an Argon2id hash (memory-hard, a
/// random salt per PIN, both in the PHC string), never the PIN — a 4-digit PIN in a copy of the
/// ledger costs 10 000 Argon2id runs of 19 MiB each, not 10 000 SHA-256s. Locked after
/// [`PaymentPin::MAX_FAILURES`] wrong ones in a row until the cardholder sets it again.
///
/// A record written before Argon2 (`salt_hex` + `sha256_hex`, SHA-256(salt ‖ PIN)) still
/// verifies, and the load service replaces it with an Argon2id one at its first right PIN.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentPin {
    /// `$argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>`; empty in a record from before Argon2.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phc: String,
    /// Before Argon2: the random salt, hex (empty since).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub salt_hex: String,
    /// Before Argon2: SHA-256(salt ‖ PIN), hex (empty since).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256_hex: String,
    /// Payments above this need the PIN, minor units.
    pub above_minor: i32,
    /// Wrong PINs in a row.
    pub failures: u32,
}

impl std::fmt::Debug for PaymentPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentPin")
            .field("above_minor", &self.above_minor)
            .field("failures", &self.failures)
            .field("legacy", &self.is_legacy())
            .finish_non_exhaustive()
    }
}

/// Argon2id's cost for payment PINs: 19 MiB, 2 passes, 1 lane (OWASP's first choice).
const PIN_M_KIB: u32 = 19_456;
const PIN_T: u32 = 2;
const PIN_P: u32 = 1;
/// The most memory a stored PHC string may ask for (a corrupt record cannot make a check
/// allocate gigabytes).
const PIN_MAX_M_KIB: u32 = 262_144;

impl PaymentPin {
    /// Wrong PINs in a row that lock it.
    pub const MAX_FAILURES: u32 = 3;

    /// A PIN record for `pin`: Argon2id with a new random 16-byte salt.
    pub fn new(pin: &str, above_minor: i32) -> PaymentPin {
        use argon2::password_hash::{PasswordHasher, SaltString};
        use rand::RngCore;
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt");
        let params = argon2::Params::new(PIN_M_KIB, PIN_T, PIN_P, Some(32)).expect("valid params");
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let phc = argon
            .hash_password(pin.as_bytes(), &salt)
            .expect("Argon2id over a short PIN")
            .to_string();
        PaymentPin {
            phc,
            salt_hex: String::new(),
            sha256_hex: String::new(),
            above_minor,
            failures: 0,
        }
    }

    /// Whether the record is from before Argon2 (salted SHA-256).
    pub fn is_legacy(&self) -> bool {
        self.phc.is_empty()
    }

    fn legacy_digest(salt: &[u8], pin: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(salt);
        h.update(pin.as_bytes());
        h.finalize().into()
    }

    /// Whether `pin` is this PIN: the Argon2id hash recomputed with the record's salt and
    /// parameters and compared in constant time (a record from before Argon2: its salted
    /// SHA-256, in constant time too). A record that does not parse matches nothing.
    pub fn matches(&self, pin: &str) -> bool {
        use subtle::ConstantTimeEq;
        if self.is_legacy() {
            let (Ok(salt), Ok(want)) = (hex::decode(&self.salt_hex), hex::decode(&self.sha256_hex))
            else {
                return false;
            };
            return bool::from(Self::legacy_digest(&salt, pin).ct_eq(&want[..]));
        }
        self.argon2_matches(pin).unwrap_or(false)
    }

    fn argon2_matches(&self, pin: &str) -> Option<bool> {
        use argon2::password_hash::{PasswordHash, PasswordHasher};
        use subtle::ConstantTimeEq;
        let parsed = PasswordHash::new(&self.phc).ok()?;
        if parsed.algorithm != argon2::Algorithm::Argon2id.ident() {
            return None;
        }
        let params = argon2::Params::try_from(&parsed).ok()?;
        if params.m_cost() > PIN_MAX_M_KIB {
            return None;
        }
        let (want, salt) = (parsed.hash?, parsed.salt?);
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            params.clone(),
        );
        let got = argon
            .hash_password_customized(pin.as_bytes(), None, None, params, salt)
            .ok()?
            .hash?;
        Some(bool::from(got.as_bytes().ct_eq(want.as_bytes())))
    }
}

#[cfg(test)]
mod payment_pin_tests {
    use super::PaymentPin;

    #[test]
    fn a_pin_is_kept_as_argon2id_with_its_own_salt() {
        let a = PaymentPin::new("2468", 5_000);
        let b = PaymentPin::new("2468", 5_000);
        assert!(
            a.phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            a.phc
        );
        assert!(a.salt_hex.is_empty() && a.sha256_hex.is_empty());
        // A random salt per PIN: the same PIN never gives the same record.
        assert_ne!(a.phc, b.phc);
        assert!(a.matches("2468") && b.matches("2468"));
        assert!(!a.matches("2469") && !a.matches("") && !a.matches("24680"));
        // The JSON the ledger stores holds no SHA-256 of the PIN.
        let json = serde_json::to_string(&a).unwrap();
        assert!(!json.contains("sha256"), "{json}");
    }

    #[test]
    fn a_record_from_before_argon2_still_verifies() {
        let salt = [7u8; 16];
        let legacy = serde_json::json!({
            "salt_hex": hex::encode(salt),
            "sha256_hex": hex::encode(PaymentPin::legacy_digest(&salt, "1357")),
            "above_minor": 100,
            "failures": 1,
        });
        let p: PaymentPin = serde_json::from_value(legacy).unwrap();
        assert!(p.is_legacy());
        assert!(p.matches("1357") && !p.matches("1358"));
    }

    #[test]
    fn a_corrupt_or_foreign_phc_matches_nothing() {
        let mut p = PaymentPin::new("2468", 0);
        p.phc = p.phc.replace("argon2id", "argon2i");
        assert!(!p.matches("2468"));
        p.phc = "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".into();
        assert!(!p.matches("2468"));
        p.phc = "garbage".into();
        assert!(!p.matches("2468"));
    }
}

/// Bound on counters kept above a gap per card (beyond it, the oldest are reported and dropped).
pub const BOOKED_ABOVE_MAX: usize = 64;

impl CardShadow {
    /// Books the card's transaction at counter `tmc` (leaving `balance_after_minor`, having
    /// changed the balance by `delta_minor`) in the shadow: a counter at or below
    /// `booked_through_tmc` or already waiting above a gap is a duplicate; the next one advances
    /// `booked_through_tmc` and absorbs the counters waiting right above it; a later one waits
    /// above the gap (at most [`BOOKED_ABOVE_MAX`], the oldest dropped). Any shadow — one read
    /// back corrupt included — and any counter leave `booked_above` sorted, unique, above
    /// `booked_through_tmc` and bounded; nothing overflows.
    pub fn book(&mut self, tmc: u32, balance_after_minor: i32, delta_minor: i64) -> Booking {
        // A shadow read back corrupt: only sorted, unique counters above the contiguous ones.
        self.booked_above.sort_unstable();
        self.booked_above.dedup_by_key(|e| e.0);
        let through = self.booked_through_tmc;
        self.booked_above.retain(|e| e.0 > through);
        let booking =
            if tmc <= self.booked_through_tmc || self.booked_above.iter().any(|e| e.0 == tmc) {
                Booking::Duplicate
            } else if Some(tmc) == self.booked_through_tmc.checked_add(1) {
                self.booked_through_tmc = tmc;
                self.booked_balance_minor = Some(balance_after_minor);
                // Absorb counters that were waiting above the gap.
                while let Some(&(t, b, _)) = self.booked_above.first() {
                    if Some(t) != self.booked_through_tmc.checked_add(1) {
                        break;
                    }
                    self.booked_through_tmc = t;
                    self.booked_balance_minor = Some(b);
                    self.booked_above.remove(0);
                }
                Booking::InOrder
            } else {
                self.booked_above
                    .push((tmc, balance_after_minor, delta_minor));
                self.booked_above.sort_unstable();
                Booking::AboveGap
            };
        let excess = self.booked_above.len().saturating_sub(BOOKED_ABOVE_MAX);
        self.booked_above.drain(..excess);
        booking
    }
}

/// A gift certificate or prepaid load sold by a partner, redeemable into a purse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    /// The redemption code (secret to the holder).
    pub code: String,
    /// The partner that sold it.
    pub partner: String,
    /// The partner's order id (idempotency).
    pub order_id: String,
    /// `gift` (any card) or `load` (bound to `card_uid`).
    pub kind: String,
    /// Value, minor units.
    pub amount_minor: i64,
    /// Only this card may redeem it (`load` vouchers).
    pub card_uid: Option<String>,
    /// Expiry (unix ms).
    pub expires_ms: u64,
    /// `issued`, `held` (a load is in progress), `redeemed`.
    pub state: String,
    /// The load reference holding it.
    pub held_by: Option<String>,
    /// Issued at (unix ms).
    pub issued_ms: u64,
}

/// One change to the blocklist, numbered: the gateway publishes them in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockChange {
    /// Version (1, 2, …): the list after this change.
    pub version: u64,
    /// Card UID (hex).
    pub card_uid: String,
    /// `block` or `unblock`.
    pub action: String,
    /// Why (lost, stolen, clone suspected, …).
    pub reason: String,
    /// When (unix ms).
    pub time_ms: u64,
}

/// Why the gap sweep blocks a card (and the reason it is unblocked under when the gap fills).
pub const GAP_BLOCK_REASON: &str = "value appeared across a counter gap that never filled";

/// The clock of a card's lowest counter gap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapClock {
    /// The first missing counter.
    pub from_tmc: u32,
    /// When this gap was first seen (unix ms).
    pub since_ms: u64,
    /// Reported by the sweep already.
    pub reported: bool,
}

/// What a gap sweep found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GapSweep {
    /// The `counter_gap` anomalies raised (also recorded in the ledger).
    pub anomalies: Vec<Anomaly>,
    /// Cards blocked because value appeared across a gap.
    pub cards_blocked: u32,
}

/// What booking a counter found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Booking {
    /// Booked in order.
    InOrder,
    /// Booked above a gap (earlier counters not seen yet).
    AboveGap,
    /// This counter was already booked: a duplicate (or a cloned card).
    Duplicate,
}

/// A funding instrument registered to an account (an API caller name): a card-processor token
/// its holder registered, or a points membership the programme linked to the account. A load
/// may be funded only from an instrument registered to its caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instrument {
    /// The funding source (`card`, `mileage`, …).
    pub source: String,
    /// The instrument id at the source (a card token, a member id).
    pub id: String,
    /// The account it belongs to (the cardholder's token name).
    pub owner: String,
    /// Who registered it: the holder itself, or the partner that linked the membership.
    pub registered_by: String,
    /// When (unix ms).
    pub registered_ms: u64,
}

/// Something found wrong with a card or a device, numbered in the ledger (`GET /v1/anomalies`).
/// The ledger stores it; clearing and the gap sweep decide what it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// `forged_tmac`, `clone`, `negative_shadow`, `malformed`, `counter_gap` (the gap sweep;
    /// device id and sequence 0).
    pub kind: String,
    /// Card UID (hex), when known.
    pub card_uid: String,
    /// The counter.
    pub tmc: u32,
    /// The reporting device and its sequence number.
    pub device_id: u32,
    /// Device sequence number.
    pub device_seq: u64,
    /// Detail.
    pub detail: String,
}

/// The key of a day total: what was loaded (or paid) from `instrument` at funding source
/// `source` on UTC day `day`, in minor units ([`crate::ledger::LedgerRead::funding_day_total`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FundingDay<'a> {
    /// The funding source (or [`PAYMENT_CARD_DAY`], [`PAYMENT_MERCHANT_DAY`]).
    pub source: &'a str,
    /// The instrument at that source: a load's funding instrument (its token); for the payment
    /// totals a card's UID in hex or a merchant.
    pub instrument: &'a str,
    /// The UTC day (days since the epoch).
    pub day: u64,
}

impl<'a> FundingDay<'a> {
    /// The key of `instrument` at `source` on `day`.
    pub fn new(source: &'a str, instrument: &'a str, day: u64) -> FundingDay<'a> {
        FundingDay {
            source,
            instrument,
            day,
        }
    }
}

/// The day-total key (funding source position) of what a card paid online per day; the
/// instrument is the card's UID in hex. Not an account.
pub const PAYMENT_CARD_DAY: &str = "payments:card";
/// The day-total key of what a merchant was paid online per day; the instrument is the
/// merchant. Not an account.
pub const PAYMENT_MERCHANT_DAY: &str = "payments:merchant";

/// Where an online payment stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentState {
    /// Made by the merchant; no card has paid it yet (or a card's attempt was voided).
    Open,
    /// A card's Debit may have been sent: settled from the card's next contact.
    Pending,
    /// The card paid it (its transaction MAC verified, or its record read back under MAC).
    Completed,
}

/// A merchant's online payment: what the cardholder's card pays, once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// `pay_<32 hex>`.
    pub id: String,
    /// The merchant (its token's name): the payment goes to `merchant:<merchant>`.
    pub merchant: String,
    /// The merchant's order id (one payment per merchant and order).
    pub order_id: String,
    /// Amount, minor units.
    pub amount_minor: i32,
    /// ISO 4217 code.
    pub currency: String,
    /// What is bought.
    pub description: String,
    /// Unpaid after this (unix ms), it can no longer be paid.
    pub expires_ms: u64,
    /// Where the outcome is sent.
    #[serde(default)]
    pub notify_url: Option<String>,
    /// State.
    pub state: PaymentState,
    /// Made (unix ms).
    pub created_ms: u64,
    /// The card paying (pending) or that paid (completed), hex.
    #[serde(default)]
    pub card_uid: Option<String>,
    /// The card counter the payment consumes (pending) or consumed (completed).
    #[serde(default)]
    pub tmc: Option<u32>,
    /// Completed (unix ms).
    #[serde(default)]
    pub paid_ms: Option<u64>,
    /// Refunded so far (every refund made, collected or not), minor units.
    #[serde(default)]
    pub refunded_minor: i64,
}

/// Where a refund stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundState {
    /// Made by the merchant (its value held in `refunds:pending`); the card has not collected
    /// it.
    Pending,
    /// The card's Credit may have been sent: settled from the card's next contact.
    Collecting,
    /// The card proved the credit.
    Credited,
    /// Not collected within `[limits.payments] refund_expiry_ms`: its value went back from
    /// `refunds:pending` to the merchant (reference `refund-expired:<id>`).
    Expired,
}

/// A merchant's refund of (part of) a completed payment, credited to the card that paid it
/// when the card collects it online.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    /// `ref_<32 hex>`.
    pub id: String,
    /// The refunded payment.
    pub payment_id: String,
    /// Its merchant.
    pub merchant: String,
    /// The card that paid, hex: the only card that collects it.
    pub card_uid: String,
    /// Amount, minor units.
    pub amount_minor: i32,
    /// State.
    pub state: RefundState,
    /// Made (unix ms).
    pub created_ms: u64,
    /// The card counter the credit consumes (collecting) or consumed (credited).
    #[serde(default)]
    pub tmc: Option<u32>,
    /// Credited (unix ms).
    #[serde(default)]
    pub credited_ms: Option<u64>,
    /// Expired, its value back with the merchant (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_ms: Option<u64>,
}

/// A merchant's notification of a payment's outcome, retried until its `notify_url` answers
/// 2xx.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The payment (the merchant de-duplicates by it).
    pub payment_id: String,
    /// Where it goes.
    pub url: String,
    /// Attempts made.
    pub attempts: u32,
    /// The next attempt is due then (unix ms).
    pub next_attempt_ms: u64,
    /// Delivered (a 2xx answer) then (unix ms).
    pub delivered_ms: Option<u64>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}
