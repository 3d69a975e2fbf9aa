//! Online loads: the server drives the card dialogue through the HSM; the client only relays
//! APDUs, one HTTP round trip each.
//!
//! Exactly once across payment, network and card:
//! 1. the card is read under MAC in a session with its credit key (inside the HSM);
//! 2. older open intents of the card are settled from what it reports (its counter and balance);
//! 3. limits are checked, the funding source authorises (reference `load:<UID>:<TMC>`), and the
//!    intent (card, counter, amount, funding) is committed to the ledger — before any Credit
//!    leaves the server;
//! 4. Credit (FULL mode) and CommitTransaction go to the card; its transaction MAC is verified
//!    in the HSM; the ledger posts funding → card and marks the intent completed in one
//!    transaction; then the funding is captured.
//!
//! A load torn anywhere after step 3 stays `authorised` in the ledger and is settled at the
//! card's next contact ([`LoadService::settle_from_snapshot`]): completed and captured if the
//! card's counter shows it applied the credit, voided and released if not.

mod attempts;
mod complete;
mod decide;
mod order;
mod payment;
mod rekey;
mod reversal;
mod session;

pub use order::{
    complete_order_from_tap, list_version, order, OrderError, OrderLimits, OrderRecord,
    OrderRequest, OrderState, PickedUp, PickupBooked, ORDERS_PENDING, ORDERS_UNMATCHED,
};
pub use payment::{valid_merchant, PaymentAsk, PaymentLimits};

use crate::funding::{FundingError, FundingRequest, FundingSource, Holding};
use crate::ledger::{
    Completion, FundingAction, IntentKind, IntentState, Ledger, LedgerError, LoadIntent,
};
use purse::apdu::ins;
use purse::keys::KeyKind;
use purse::sam::{Hsm, SamError, TmacVerified};
use purse::txn::{self, CardSnapshot, Decision, Dialogue, Outcome, Settlement, Step, TxError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Load limits and timeouts: the server configuration's `[limits]` table, read as it is (one
/// list of fields; unknown keys refused, absent ones [`Default`]), plus the scheme's `currency`,
/// which the configuration gives at its top level.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    /// Highest balance a card may reach, minor units.
    pub balance_ceiling_minor: i32,
    /// Largest single load, minor units.
    pub max_load_minor: i32,
    /// Most a card may be loaded per day (UTC), minor units.
    pub max_daily_per_card_minor: i64,
    /// A relay session idle this long is dropped (its intent, if any, is settled later).
    pub session_idle_timeout_ms: u64,
    /// Most concurrent relay sessions (back-pressure: new loads are refused beyond it).
    pub max_sessions: usize,
    /// Most finished sessions kept (until `session_idle_timeout_ms`) so a retried last step
    /// gets the same answer; beyond it the oldest go first (a retry of `start` with the same
    /// idempotency key still gets the stored answer from the ledger).
    pub max_finished_sessions: usize,
    /// A completed load may be reversed (debited back and refunded) within this long.
    pub reversal_window_ms: u64,
    /// Most loaded per day (UTC) from one instrument of a funding source (a card token, a
    /// points holder), minor units.
    pub max_daily_per_instrument_minor: i64,
    /// `[limits.sources.<name>]`: tighter limits for particular funding sources, by source name.
    pub sources: HashMap<String, SourceLimits>,
    /// `[limits.payments]`: online payments' limits.
    pub payments: PaymentLimits,
    /// `[limits.orders]`: action-list orders (value picked up at the next tap).
    pub orders: OrderLimits,
    /// A card counter gap older than this is a `counter_gap` anomaly (and a block when value
    /// appeared across it); clearing's gap sweep reads it.
    pub counter_gap_timeout_ms: u64,
    /// Loads a caller may start per minute (0 = unlimited); the server's rate limit reads it.
    pub loads_per_minute_per_client: u32,
    /// The card scheme's currency (ISO 4217): what the cards' minor units count. A merchant's
    /// payment or refund in any other currency is refused when it is made. Not a `[limits]`
    /// key: the server sets it from the configuration's top-level `currency`.
    #[serde(skip)]
    pub currency: String,
}

/// The card scheme's currency when the configuration names none: the demo's metro fares are
/// in KRW.
pub const DEFAULT_CURRENCY: &str = "KRW";

/// Whether `code` looks like an ISO 4217 code: three capital letters.
pub fn valid_currency(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

/// Limits of one funding source (each tightens the general limit).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceLimits {
    /// Largest single load funded here.
    pub max_load_minor: Option<i32>,
    /// Most loaded per day from one instrument here.
    pub max_daily_per_instrument_minor: Option<i64>,
}

impl LoadConfig {
    fn max_load_for(&self, source: &str) -> i32 {
        let own = self.sources.get(source).and_then(|l| l.max_load_minor);
        own.map_or(self.max_load_minor, |m| m.min(self.max_load_minor))
    }

    fn max_daily_for(&self, source: &str) -> i64 {
        let own = self
            .sources
            .get(source)
            .and_then(|l| l.max_daily_per_instrument_minor);
        own.map_or(self.max_daily_per_instrument_minor, |m| {
            m.min(self.max_daily_per_instrument_minor)
        })
    }
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            balance_ceiling_minor: 500_000,
            max_load_minor: 200_000,
            max_daily_per_card_minor: 500_000,
            session_idle_timeout_ms: 30_000,
            max_sessions: 10_000,
            max_finished_sessions: 100_000,
            reversal_window_ms: 7 * 86_400_000,
            max_daily_per_instrument_minor: 1_000_000,
            sources: HashMap::new(),
            payments: PaymentLimits::default(),
            orders: OrderLimits::default(),
            counter_gap_timeout_ms: 72 * 3_600_000,
            loads_per_minute_per_client: 60,
            currency: DEFAULT_CURRENCY.to_string(),
        }
    }
}

/// What the client asked for.
#[derive(Clone, Debug)]
pub struct LoadRequest {
    /// Card UID as the client's reader saw it.
    pub uid: [u8; 7],
    /// Amount, minor units.
    pub amount_minor: i32,
    /// Funding source name.
    pub funding_source: String,
    /// Instrument at the source (card token, points holder).
    pub instrument: String,
    /// The client's idempotency key.
    pub idempotency_key: String,
}

/// The server's answer to every step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Reply {
    /// Send `commands` (hex APDUs) to the card in order and post their answers, in the same
    /// order, with `seq`. Stop at the first answer that is not `91 00`/`91 AF` or when the
    /// card leaves the field, and post the answers you have.
    Command {
        /// session id
        session_id: String,
        /// step number the answers must carry
        seq: u32,
        /// hex APDUs for the card
        commands: Vec<String>,
    },
    /// The card applied the load and proved it.
    Completed {
        /// session id
        session_id: String,
        /// amount loaded
        amount_minor: i32,
        /// balance after
        balance_minor: i32,
        /// the counter the load consumed
        tmc: u32,
    },
    /// Refused before any value moved.
    Refused {
        /// session id
        session_id: String,
        /// machine-readable reason
        reason: String,
        /// human-readable detail
        detail: String,
    },
    /// The dialogue broke after the credit may have been sent; the load is settled at the
    /// card's next contact (never paid twice, never lost).
    Pending {
        /// session id
        session_id: String,
        /// detail
        detail: String,
    },
}

impl Reply {
    fn is_final(&self) -> bool {
        !matches!(self, Reply::Command { .. })
    }
}

/// Load errors that are the caller's (HTTP 4xx) or ours (5xx).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A malformed request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Unknown or expired session — or one another charging server holds (a session's keys
    /// never leave the server that opened it): start again with the same Idempotency-Key.
    #[error("no load session {0} on this server (unknown, expired, or opened on another server): start again with the same Idempotency-Key")]
    NoSession(String),
    /// The session belongs to another caller.
    #[error("this load session belongs to another caller")]
    NotYours,
    /// The step number is not the expected one.
    #[error("step {got} out of order: expected {expected}")]
    OutOfOrder {
        /// expected seq
        expected: u32,
        /// got
        got: u32,
    },
    /// Too many sessions.
    #[error("too many load sessions in progress; retry later")]
    Busy,
    /// No such payment (or not the caller's to see).
    #[error("no payment {0}")]
    NoSuchPayment(String),
    /// The payment cannot be paid (paid, pending, expired).
    #[error("{0}")]
    PaymentNotPayable(String),
    /// The card's payment PIN is needed, wrong, or locked (by then: set it again).
    #[error("{0}")]
    Pin(String),
    /// A refund cannot be made or collected.
    #[error("refund refused: {0}")]
    RefundRefused(String),
    /// A merchant's payment request is refused by a limit.
    #[error("{0}")]
    PaymentLimit(String),
    /// No completed load at that counter of that card (or not the caller's).
    #[error("no completed load of card {uid} at counter {tmc} that you may reverse")]
    NoSuchLoad {
        /// card UID hex
        uid: String,
        /// the load's counter
        tmc: u32,
    },
    /// A step of this load (or reversal) is being worked on right now — here, or, with the same
    /// idempotency key, on another charging server: retry shortly (with the same key).
    #[error(
        "this load is being worked on right now; retry in a moment with the same Idempotency-Key"
    )]
    InProgress,
    /// The load cannot be reversed (already reversed, window passed, not refundable).
    #[error("the load cannot be reversed: {0}")]
    NotReversible(String),
    /// The funding instrument is not registered to the caller (or not at all).
    #[error("funding instrument {source_name}:{instrument} is not registered to your account")]
    NotYourInstrument {
        /// source name
        source_name: String,
        /// the instrument id as asked
        instrument: String,
    },
    /// The instrument is registered to another account.
    #[error("{0}")]
    InstrumentTaken(String),
    /// A card's registration contradicts what the card proved (its personalised value
    /// differs from the balance clearing learned it with).
    #[error("{0}")]
    RegistrationConflict(String),
    /// The Idempotency-Key was used before for a different request.
    #[error("this Idempotency-Key was used for a different request ({0}); use a new key for a new request")]
    IdempotencyKeyReused(&'static str),
    /// Storage failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The HSM failed.
    #[error("HSM: {0}")]
    Hsm(#[from] SamError),
}

/// What a relay session changes on the card.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Purpose {
    /// A load (Credit), funded by the request's source.
    Load,
    /// A reversal (a Debit) of the completed load that consumed this counter.
    Reversal(u32),
    /// A payment (a Debit) of this [`crate::ledger::Payment`] to its merchant.
    Payment(String),
    /// A merchant's [`crate::ledger::Refund`] collected by the card (a Credit).
    Refund(String),
}

impl Purpose {
    /// The namespace of its idempotency keys and intent records.
    fn word(&self) -> &'static str {
        match self {
            Purpose::Load => "load",
            Purpose::Reversal(_) => "reversal",
            Purpose::Payment(_) => "payment",
            Purpose::Refund(_) => "refund",
        }
    }
}

struct Session {
    id: String,
    caller: String,
    request: LoadRequest,
    dialogue: Dialogue,
    seq: u32,
    last_reply: Reply,
    touched_ms: u64,
    /// When it was opened: the card's session with this server began after it (see
    /// [`LoadService::earlier_attempt`]).
    started_ms: u64,
    /// Set once the intent is in the ledger (after that, errors leave it for settlement).
    intent_recorded: bool,
    /// Set once CommitTransaction was sent (after that, the outcome is unknown on error).
    commit_sent: bool,
    /// A load, a reversal or a payment.
    purpose: Purpose,
    /// The key its final answer is stored under (`LoadService::idem_key`).
    idem: String,
    /// SHA-256 of what was asked (`request_fingerprint`): a key reused for another request
    /// is refused.
    fingerprint: String,
    /// Set once the final reply is stored under the idempotency key.
    idempotent_stored: bool,
    /// A key rotation under way after the completed load (`rekey.rs`).
    migration: Option<rekey::Migration>,
}

/// Counters for metrics and the bench.
#[derive(Default, Debug, Clone, Serialize)]
pub struct LoadStats {
    /// loads completed
    pub completed: u64,
    /// loads refused before value moved
    pub refused: u64,
    /// loads left pending for settlement
    pub pending: u64,
    /// pending loads settled as completed
    pub settled_completed: u64,
    /// pending loads settled as voided
    pub settled_voided: u64,
    /// payments completed (at once or settled later)
    pub payments_completed: u64,
    /// cards moved to the current key version after a load (`rekey.rs`)
    pub keys_rotated: u64,
}

/// A session that gave its final answer, kept so a retried last step (or start) gets it again.
struct Finished {
    /// Its idempotency key (as stored).
    idem: String,
    /// What was asked (`request_fingerprint`).
    fingerprint: String,
    caller: String,
    /// The step that produced the final answer.
    seq: u32,
    reply: Reply,
    touched_ms: u64,
}

/// Relay sessions: the ones waiting for the client (bounded by `max_sessions`), the ones a step
/// is being worked on right now, and the finished ones (bounded by `max_finished_sessions`).
/// The idempotency index covers the first two, so a retried start never opens a second session
/// for a load that is still going.
#[derive(Default)]
struct Sessions {
    active: HashMap<String, Session>,
    /// Ids whose step is being worked on (taken out of `active` meanwhile).
    in_flight: std::collections::HashSet<String>,
    /// Idempotency key (as stored, see `LoadService::idem_key`) → id, for the sessions in
    /// `active`, `in_flight` and `finished`.
    by_idem: HashMap<String, String>,
    finished: HashMap<String, Finished>,
    /// Finished ids, oldest first (an id may be stale after expiry; skipped then).
    finished_order: VecDeque<String>,
}

impl Sessions {
    fn insert(&mut self, s: Session) {
        self.in_flight.remove(&s.id);
        self.by_idem.insert(s.idem.clone(), s.id.clone());
        self.active.insert(s.id.clone(), s);
    }

    /// Takes a session out to work on a step; it stays known as in flight.
    fn take(&mut self, id: &str) -> Option<Session> {
        let s = self.active.remove(id)?;
        self.in_flight.insert(s.id.clone());
        Some(s)
    }

    /// Forgets a session (its index entry only if it is still this session's).
    fn forget(&mut self, id: &str, idem: &str) {
        self.in_flight.remove(id);
        if self.by_idem.get(idem).is_some_and(|v| v == id) {
            self.by_idem.remove(idem);
        }
    }

    /// The answer of the session started with idempotency key `ikey`, while it is kept (an
    /// error while a step of it is being worked on).
    fn answer_again(
        &self,
        ikey: &str,
        fingerprint: &str,
        differs: &'static str,
    ) -> Result<Option<Reply>, LoadError> {
        let Some(id) = self.by_idem.get(ikey) else {
            return Ok(None);
        };
        if let Some(s) = self.active.get(id) {
            if s.fingerprint != fingerprint {
                return Err(LoadError::IdempotencyKeyReused(differs));
            }
            return Ok(Some(s.last_reply.clone()));
        }
        if let Some(f) = self.finished.get(id) {
            if f.fingerprint != fingerprint {
                return Err(LoadError::IdempotencyKeyReused(differs));
            }
            return Ok(Some(f.reply.clone()));
        }
        if self.in_flight.contains(id) {
            return Err(LoadError::InProgress);
        }
        Ok(None)
    }

    fn finish(&mut self, s: Session, max: usize) {
        self.in_flight.remove(&s.id);
        self.by_idem.insert(s.idem.clone(), s.id.clone());
        self.finished.insert(
            s.id.clone(),
            Finished {
                idem: s.idem,
                fingerprint: s.fingerprint,
                caller: s.caller,
                seq: s.seq.wrapping_sub(1),
                reply: s.last_reply,
                touched_ms: s.touched_ms,
            },
        );
        self.finished_order.push_back(s.id);
        while self.finished.len() > max {
            match self.finished_order.pop_front() {
                Some(old) => {
                    if let Some(f) = self.finished.remove(&old) {
                        self.forget(&old, &f.idem);
                    }
                }
                None => break,
            }
        }
    }
}

/// The load service: sessions in memory, intents and postings in the ledger.
pub struct LoadService {
    ledger: Ledger,
    hsm: Mutex<Box<dyn Hsm + Send>>,
    sources: HashMap<String, Arc<dyn FundingSource>>,
    sessions: Mutex<Sessions>,
    cfg: LoadConfig,
    stats: Mutex<LoadStats>,
}

fn session_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// The record the server writes to the card with an intent's value command — 'L' (a load) or
/// 'R' (a reversal), the amount, the time the intent was made, the reversed load's counter — so
/// that a later session can tell this change from any other at the same counter. Not a trip
/// record: validators skip it.
fn intent_record(intent: &LoadIntent) -> [u8; txn::RECORD_SIZE] {
    let mut r = [0u8; txn::RECORD_SIZE];
    r[0] = match intent.kind {
        IntentKind::Load => 0x4C,
        IntentKind::Reversal => 0x52,
        IntentKind::Payment => 0x50,
        IntentKind::Refund => 0x43,
    };
    r[1..5].copy_from_slice(&intent.amount_minor.to_le_bytes());
    r[5..13].copy_from_slice(&intent.created_ms.to_le_bytes());
    if let Some(t) = intent.reverses_tmc {
        r[13..17].copy_from_slice(&t.to_le_bytes());
    }
    r
}

fn day_of(ms: u64) -> u64 {
    ms / 86_400_000
}

/// SHA-256 (hex) of what a start asked for: a load's card, amount and funding, a reversal's
/// card and load counter, a payment's card and payment. Stored with the answer under the
/// Idempotency-Key.
fn request_fingerprint(req: &LoadRequest, purpose: &Purpose) -> String {
    let text = match purpose {
        Purpose::Load => format!(
            "load\n{}\n{}\n{}\n{}",
            hex::encode_upper(req.uid),
            req.amount_minor,
            req.funding_source,
            req.instrument
        ),
        Purpose::Reversal(tmc) => return reversal_fingerprint(&req.uid, *tmc),
        Purpose::Payment(id) => format!("payment\n{}\n{id}", hex::encode_upper(req.uid)),
        Purpose::Refund(id) => format!("refund\n{}\n{id}", hex::encode_upper(req.uid)),
    };
    sha256_hex(&text)
}

fn reversal_fingerprint(uid: &[u8; 7], load_tmc: u32) -> String {
    sha256_hex(&format!("reversal\n{}\n{load_tmc}", hex::encode_upper(uid)))
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The value stored under an idempotency key: the final answer and what was asked.
fn stored_value(reply: &Reply, fingerprint: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(reply).expect("reply serialises");
    v["request_sha256"] = fingerprint.into();
    v
}

/// A stored answer may be returned only to the same request (answers stored before requests
/// were fingerprinted carry none and are returned as before).
fn same_request(
    stored: &serde_json::Value,
    fingerprint: &str,
    what: &'static str,
) -> Result<(), LoadError> {
    match stored.get("request_sha256").and_then(|v| v.as_str()) {
        Some(fp) if fp != fingerprint => Err(LoadError::IdempotencyKeyReused(what)),
        _ => Ok(()),
    }
}

const LOAD_DIFFERS: &str = "card, amount or funding differ";
const REVERSAL_DIFFERS: &str = "card or load counter differ";
const PAYMENT_DIFFERS: &str = "card or payment differ";

impl LoadService {
    /// A service over a ledger, an HSM and funding sources.
    pub fn new(
        ledger: Ledger,
        hsm: Box<dyn Hsm + Send>,
        sources: Vec<Arc<dyn FundingSource>>,
        cfg: LoadConfig,
    ) -> Self {
        LoadService {
            ledger,
            hsm: Mutex::new(hsm),
            sources: sources
                .into_iter()
                .map(|s| (s.name().to_string(), s))
                .collect(),
            sessions: Mutex::new(Sessions::default()),
            cfg,
            stats: Mutex::new(LoadStats::default()),
        }
    }

    /// The action-list order limits in force (the API's and the server tick's): the
    /// configuration's `[limits.orders]`.
    pub fn order_limits(&self) -> &OrderLimits {
        &self.cfg.orders
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Captures, releases or refunds at the funding source once the ledger change behind it
    /// is durable (here, or in clearing). A failure is logged; the intent in the ledger says
    /// what is owed.
    pub fn apply_funding(&self, action: &FundingAction) {
        let (source, auth, result) = match action {
            FundingAction::Paid {
                payment_id,
                merchant,
            } => {
                self.payment_paid(payment_id, merchant);
                return;
            }
            FundingAction::RefundCredited { refund_id } => {
                tracing::info!(refund_id, "refund credited to the card");
                return;
            }
            FundingAction::Capture { source, auth } => {
                (source, auth, self.at_source(source, |s| s.capture(auth)))
            }
            FundingAction::Release { source, auth } => {
                (source, auth, self.at_source(source, |s| s.void(auth)))
            }
            FundingAction::Refund {
                source,
                auth,
                amount_minor,
            } => (
                source,
                auth,
                self.at_source(source, |s| s.refund(auth, *amount_minor)),
            ),
        };
        match result {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::error!(%e, auth, source, ?action, "funding action failed; retry from the intent")
            }
            None => tracing::error!(source, "funding source no longer configured"),
        }
    }

    /// `call` on the configured funding source `source`, as [`decide::funding_call`] runs a
    /// source's call; `None` when no such source is configured.
    fn at_source(
        &self,
        source: &str,
        call: impl FnOnce(&dyn FundingSource) -> Result<(), FundingError>,
    ) -> Option<Result<(), FundingError>> {
        let s = self.sources.get(source)?;
        Some(decide::funding_call(&**s, || call(&**s)))
    }

    /// `f` with the HSM, locked for that call only.
    fn with_hsm<T>(&self, f: impl FnOnce(&mut dyn Hsm) -> T) -> T {
        f(self.hsm.lock().expect("hsm lock").as_mut())
    }

    /// The HSM (shared with franchise reports and clearing).
    pub fn hsm(&self) -> &Mutex<Box<dyn Hsm + Send>> {
        &self.hsm
    }

    /// A copy of the counters.
    pub fn stats(&self) -> LoadStats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// The decision once a back-office change's intent is recorded (`recorded`: the ledger
    /// transaction's outcome — done, a refusal as (reason, detail), or an error): the value
    /// command with the intent's `record`, or the refusal.
    fn apply_once_recorded(
        &self,
        s: &mut Session,
        recorded: Result<Result<(), (&'static str, String)>, LedgerError>,
        record: Vec<u8>,
    ) -> Result<Result<Decision, Reply>, LoadError> {
        match recorded {
            Ok(Ok(())) => {}
            Ok(Err((reason, detail))) => return Ok(Err(self.refused(s, reason, &detail))),
            Err(LedgerError::IntentExists { .. }) => {
                return Ok(Err(self.refused(
                    s,
                    "load_in_progress",
                    "another change for this card at this counter is in progress",
                )))
            }
            Err(e) => return Err(e.into()),
        }
        s.intent_recorded = true;
        Ok(Ok(Decision::Apply {
            amount_minor: s.request.amount_minor,
            record: Some(record),
        }))
    }

    /// A back-office debit of the session's amount that the card cannot cover: the refusal
    /// (`insufficient_value`; `what` says what the amount is), or `None`.
    fn too_little(&self, s: &Session, snap: &CardSnapshot, what: &str) -> Option<Reply> {
        (snap.balance_minor() < s.request.amount_minor).then(|| {
            self.refused(
                s,
                "insufficient_value",
                &format!("the card holds {}; {what}", snap.balance_minor()),
            )
        })
    }

    /// Funding source names.
    pub fn source_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.sources.keys().cloned().collect();
        v.sort();
        v
    }

    /// Where the final answer to (caller, key) is stored: loads, reversals and payments have
    /// their own namespaces, so a key reused for another kind never returns the wrong answer.
    fn idem_key(purpose: &Purpose, caller: &str, key: &str) -> String {
        format!("{}:{caller}:{key}", purpose.word())
    }

    /// Starts a load: returns the first command for the card.
    pub fn start(&self, caller: &str, req: LoadRequest, now_ms: u64) -> Result<Reply, LoadError> {
        self.open_session(caller, req, Purpose::Load, now_ms)
    }

    /// The stored final answer to (caller, idempotency key) of a reversal, if any; refused
    /// when the key was used for another reversal.
    fn stored_answer(
        &self,
        caller: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<Reply>, LoadError> {
        let ikey = Self::idem_key(&Purpose::Reversal(0), caller, key);
        self.stored_reply(&ikey, fingerprint, REVERSAL_DIFFERS)
    }
}

fn reply_from_json(v: &serde_json::Value) -> Reply {
    let s = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let n = |k: &str| v.get(k).and_then(|x| x.as_i64()).unwrap_or_default();
    match v.get("status").and_then(|x| x.as_str()) {
        Some("completed") => Reply::Completed {
            session_id: s("session_id"),
            // Stored by this server; a value out of range is not trusted into a wrapped one.
            amount_minor: i32::try_from(n("amount_minor")).unwrap_or_default(),
            balance_minor: i32::try_from(n("balance_minor")).unwrap_or_default(),
            tmc: u32::try_from(n("tmc")).unwrap_or_default(),
        },
        Some("refused") => Reply::Refused {
            session_id: s("session_id"),
            reason: s("reason"),
            detail: s("detail"),
        },
        _ => Reply::Pending {
            session_id: s("session_id"),
            detail: s("detail"),
        },
    }
}
