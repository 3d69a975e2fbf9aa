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

use crate::funding::{FundingError, FundingRequest, FundingSource, Holding};
use crate::ledger::{
    card_account, FundingAction, IntentKind, IntentState, Ledger, LedgerError, LoadIntent,
};
use purse::apdu::ins;
use purse::keys::KeyKind;
use purse::sam::{Hsm, SamError};
use purse::txn::{
    self, CardSnapshot, Decision, Dialogue, Outcome, PendingChange, Settlement, Step, TxError,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Load limits and timeouts.
#[derive(Clone, Debug)]
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
    /// Tighter limits for particular funding sources, by source name.
    pub sources: HashMap<String, SourceLimits>,
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
    /// Unknown or expired session.
    #[error("no load session {0} (unknown, finished or expired)")]
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
    /// No completed load at that counter of that card (or not the caller's).
    #[error("no completed load of card {uid} at counter {tmc} that you may reverse")]
    NoSuchLoad {
        /// card UID hex
        uid: String,
        /// the load's counter
        tmc: u32,
    },
    /// A step of this load (or reversal) is being worked on right now: retry shortly.
    #[error("this load is being worked on right now; retry in a moment")]
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

struct Session {
    id: String,
    caller: String,
    request: LoadRequest,
    dialogue: Dialogue,
    seq: u32,
    last_reply: Reply,
    touched_ms: u64,
    /// Set once the intent is in the ledger (after that, errors leave it for settlement).
    intent_recorded: bool,
    /// Set once CommitTransaction was sent (after that, the outcome is unknown on error).
    commit_sent: bool,
    /// A reversal of the completed load at this counter (a Debit), instead of a load.
    reverses: Option<u32>,
    /// The key its final answer is stored under (`LoadService::idem_key`).
    idem: String,
    /// SHA-256 of what was asked (`request_fingerprint`): a key reused for another request
    /// is refused.
    fingerprint: String,
    /// Set once the final reply is stored under the idempotency key.
    idempotent_stored: bool,
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

/// SHA-256 (hex) of what a start asked for: a load's card, amount and funding, or a reversal's
/// card and load counter. Stored with the answer under the Idempotency-Key.
fn request_fingerprint(req: &LoadRequest, reverses: Option<u32>) -> String {
    let text = match reverses {
        None => format!(
            "load\n{}\n{}\n{}\n{}",
            hex::encode_upper(req.uid),
            req.amount_minor,
            req.funding_source,
            req.instrument
        ),
        Some(tmc) => return reversal_fingerprint(&req.uid, tmc),
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

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Captures, releases or refunds at the funding source once the ledger change behind it
    /// is durable (here, or in clearing). A failure is logged; the intent in the ledger says
    /// what is owed.
    pub fn apply_funding(&self, action: &FundingAction) {
        let (source, auth, result) = match action {
            FundingAction::Capture { source, auth } => (
                source,
                auth,
                self.sources.get(source).map(|s| s.capture(auth)),
            ),
            FundingAction::Release { source, auth } => {
                (source, auth, self.sources.get(source).map(|s| s.void(auth)))
            }
            FundingAction::Refund {
                source,
                auth,
                amount_minor,
            } => (
                source,
                auth,
                self.sources
                    .get(source)
                    .map(|s| s.refund(auth, *amount_minor)),
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

    /// The HSM (shared with franchise reports and clearing).
    pub fn hsm(&self) -> &Mutex<Box<dyn Hsm + Send>> {
        &self.hsm
    }

    /// A copy of the counters.
    pub fn stats(&self) -> LoadStats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// Funding source names.
    pub fn source_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.sources.keys().cloned().collect();
        v.sort();
        v
    }

    /// Where the final answer to (caller, key) is stored: loads and reversals have their own
    /// namespaces, so a key reused for the other kind never returns the wrong answer.
    fn idem_key(reversal: bool, caller: &str, key: &str) -> String {
        if reversal {
            format!("reversal:{caller}:{key}")
        } else {
            format!("load:{caller}:{key}")
        }
    }

    /// Starts a load: returns the first command for the card.
    pub fn start(&self, caller: &str, req: LoadRequest, now_ms: u64) -> Result<Reply, LoadError> {
        self.open_session(caller, req, None, now_ms)
    }

    /// Starts the reversal of the completed load that consumed counter `load_tmc` of card
    /// `uid`: the server debits the load's amount from the card (a Debit with the debit key,
    /// inside the HSM, proved by the card's transaction MAC) and refunds the load's funding.
    /// Only the caller who made the load, or an operator (`any_caller`), may; within
    /// `reversal_window_ms` of the load; once. Returns the first command for the card, like
    /// [`LoadService::start`]; the relay goes on with [`LoadService::respond`].
    pub fn start_reversal(
        &self,
        caller: &str,
        any_caller: bool,
        uid: [u8; 7],
        load_tmc: u32,
        idempotency_key: String,
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        let not_found = || LoadError::NoSuchLoad {
            uid: hex::encode_upper(uid),
            tmc: load_tmc,
        };
        let load = {
            let r = self.ledger.read()?;
            match load_tmc.checked_sub(1) {
                Some(before) => r.intent(&uid, before)?,
                None => None,
            }
        }
        .filter(|i| {
            i.kind == IntentKind::Load
                && i.state == IntentState::Completed
                && (any_caller || i.requested_by == caller)
        });
        let fingerprint = reversal_fingerprint(&uid, load_tmc);
        let Some(load) = load else {
            // An idempotent retry of a finished reversal still gets its answer.
            if let Some(v) = self.stored_answer(caller, &idempotency_key, &fingerprint)? {
                return Ok(v);
            }
            return Err(not_found());
        };
        let req = LoadRequest {
            uid,
            amount_minor: load.amount_minor,
            funding_source: load.funding_source.clone(),
            instrument: String::new(),
            idempotency_key,
        };
        if let Some(v) = self.stored_answer(caller, &req.idempotency_key, &fingerprint)? {
            return Ok(v);
        }
        if let Some(at) = load.reversed_at_tmc {
            return Err(LoadError::NotReversible(format!(
                "a reversal at counter {at} took it back or is in progress"
            )));
        }
        // From when the load was made (a load completed late by clearing gets no extra days).
        let age = now_ms.saturating_sub(load.created_ms);
        if age > self.cfg.reversal_window_ms {
            return Err(LoadError::NotReversible(format!(
                "loaded {} h ago; loads are reversed within {} h",
                age / 3_600_000,
                self.cfg.reversal_window_ms / 3_600_000
            )));
        }
        match self.sources.get(&load.funding_source) {
            Some(src) if src.refundable() => {}
            _ => {
                return Err(LoadError::NotReversible(format!(
                    "{} funding is not refunded",
                    load.funding_source
                )))
            }
        }
        self.open_session(caller, req, Some(load_tmc), now_ms)
    }

    /// The stored final answer to (caller, idempotency key) of a reversal, if any; refused
    /// when the key was used for another reversal.
    fn stored_answer(
        &self,
        caller: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<Reply>, LoadError> {
        let r = self.ledger.read()?;
        match r.idempotent(&Self::idem_key(true, caller, key))? {
            Some(v) => {
                same_request(&v, fingerprint, REVERSAL_DIFFERS)?;
                Ok(Some(reply_from_json(&v)))
            }
            None => Ok(None),
        }
    }

    fn open_session(
        &self,
        caller: &str,
        req: LoadRequest,
        reverses: Option<u32>,
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        if req.idempotency_key.is_empty() || req.idempotency_key.len() > 128 {
            return Err(LoadError::BadRequest(
                "an Idempotency-Key of 1 to 128 characters is required".into(),
            ));
        }
        let ikey = Self::idem_key(reverses.is_some(), caller, &req.idempotency_key);
        let fingerprint = request_fingerprint(&req, reverses);
        let differs = if reverses.is_some() {
            REVERSAL_DIFFERS
        } else {
            LOAD_DIFFERS
        };
        {
            let r = self.ledger.read()?;
            if let Some(v) = r.idempotent(&ikey)? {
                same_request(&v, &fingerprint, differs)?;
                return Ok(reply_from_json(&v));
            }
        }
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(id) = sessions.by_idem.get(&ikey) {
            if let Some(s) = sessions.active.get(id) {
                if s.fingerprint != fingerprint {
                    return Err(LoadError::IdempotencyKeyReused(differs));
                }
                return Ok(s.last_reply.clone());
            }
            if let Some(f) = sessions.finished.get(id) {
                if f.fingerprint != fingerprint {
                    return Err(LoadError::IdempotencyKeyReused(differs));
                }
                return Ok(f.reply.clone());
            }
            if sessions.in_flight.contains(id) {
                return Err(LoadError::InProgress);
            }
        }
        if req.amount_minor <= 0 {
            return Err(LoadError::BadRequest(format!(
                "amount_minor must be positive, got {}",
                req.amount_minor
            )));
        }
        let max_load = self.cfg.max_load_for(&req.funding_source);
        // A reversal takes back exactly what was loaded, whatever the limits are today.
        if reverses.is_none() && req.amount_minor > max_load {
            return Err(LoadError::BadRequest(format!(
                "amount_minor {} exceeds the per-load limit of {max_load} for {} funding",
                req.amount_minor, req.funding_source
            )));
        }
        let Some(source) = self.sources.get(&req.funding_source) else {
            return Err(LoadError::BadRequest(format!(
                "unknown funding source {:?}; available: {}",
                req.funding_source,
                self.source_names().join(", ")
            )));
        };
        if reverses.is_none() {
            // The instrument is looked up, never formatted into an account from the request.
            self.check_instrument(caller, source.as_ref(), &req.instrument)?;
        }
        if sessions.active.len() >= self.cfg.max_sessions {
            return Err(LoadError::Busy);
        }
        let (dialogue, first) = match reverses {
            None => Dialogue::start(req.uid, KeyKind::Credit, ins::CREDIT),
            // A reversal debits under the credit key: the card does not arm LimitedCredit for
            // a debit under that key, so no debit-key holder can credit a reversal back.
            Some(_) => Dialogue::start(req.uid, KeyKind::Credit, ins::DEBIT),
        };
        let id = session_id();
        let reply = Reply::Command {
            session_id: id.clone(),
            seq: 1,
            commands: first.iter().map(hex::encode_upper).collect(),
        };
        sessions.insert(Session {
            id,
            caller: caller.to_string(),
            request: req,
            dialogue,
            seq: 1,
            last_reply: reply.clone(),
            touched_ms: now_ms,
            intent_recorded: false,
            commit_sent: false,
            idempotent_stored: false,
            reverses,
            idem: ikey,
            fingerprint,
        });
        Ok(reply)
    }

    /// A load may be funded only from an instrument of the caller's own: a well-formed id,
    /// registered to the caller (card tokens, points memberships); bearer instruments
    /// (voucher codes) only need to be well-formed.
    fn check_instrument(
        &self,
        caller: &str,
        source: &dyn FundingSource,
        instrument: &str,
    ) -> Result<(), LoadError> {
        if !crate::funding::valid_instrument_id(instrument) {
            return Err(LoadError::BadRequest(format!(
                "funding.instrument must be 1 to {} letters, digits, '-', '_' or '.' (not starting with '.')",
                crate::funding::MAX_INSTRUMENT_ID_LEN
            )));
        }
        if source.holding() == Holding::Bearer {
            return Ok(());
        }
        let owner = {
            let r = self.ledger.read()?;
            r.instrument(source.name(), instrument)?
        };
        match owner {
            Some(i) if i.owner == caller => Ok(()),
            _ => Err(LoadError::NotYourInstrument {
                source_name: source.name().to_string(),
                instrument: instrument.to_string(),
            }),
        }
    }

    /// Registers instrument `id` of `source` to `caller`'s account (a card-processor token).
    /// Returns whether it is new (false: it was already the caller's). Points memberships are
    /// linked by their programme ([`crate::funding::PointsProgram::earn`]); voucher codes are
    /// bearer instruments and are not registered.
    pub fn register_instrument(
        &self,
        caller: &str,
        source_name: &str,
        id: &str,
        now_ms: u64,
    ) -> Result<bool, LoadError> {
        let source = self.sources.get(source_name).ok_or_else(|| {
            LoadError::BadRequest(format!(
                "unknown funding source {source_name:?}; available: {}",
                self.source_names().join(", ")
            ))
        })?;
        match source.holding() {
            Holding::SelfRegistered => {}
            Holding::LinkedByProgramme => {
                return Err(LoadError::BadRequest(format!(
                    "{source_name} memberships are linked to accounts by the programme (partner API), not registered by holders"
                )))
            }
            Holding::Bearer => {
                return Err(LoadError::BadRequest(format!(
                    "{source_name} instruments are bearer codes: nothing to register"
                )))
            }
        }
        if !crate::funding::valid_instrument_id(id) {
            return Err(LoadError::BadRequest(format!(
                "instrument must be 1 to {} letters, digits, '-', '_' or '.' (not starting with '.')",
                crate::funding::MAX_INSTRUMENT_ID_LEN
            )));
        }
        if !crate::funding::valid_account_name(caller) {
            return Err(LoadError::BadRequest(format!(
                "account {caller:?} cannot hold instruments (its name must be letters, digits, '-', '_' or '.')"
            )));
        }
        source
            .check_instrument(id)
            .map_err(|e| LoadError::BadRequest(e.to_string()))?;
        let (source_name, id, caller) =
            (source_name.to_string(), id.to_string(), caller.to_string());
        let taken = format!("{source_name}:{id} is registered to another account");
        self.ledger
            .transact(move |t| match t.instrument(&source_name, &id)? {
                Some(i) if i.owner == caller => Ok(Ok(false)),
                Some(_) => Ok(Err(LoadError::InstrumentTaken(taken))),
                None => {
                    t.put_instrument(&crate::ledger::Instrument {
                        source: source_name,
                        id,
                        owner: caller.clone(),
                        registered_by: caller,
                        registered_ms: now_ms,
                    })?;
                    Ok(Ok(true))
                }
            })?
    }

    /// The points programme called `name`, if it is one of the funding sources.
    pub fn points_program(&self, name: &str) -> Option<&crate::funding::PointsProgram> {
        self.sources.get(name).and_then(|s| s.as_points())
    }

    /// Feeds the card's answers to the commands of step `seq` of session `id`.
    pub fn respond(
        &self,
        caller: &str,
        id: &str,
        seq: u32,
        responses: &[Vec<u8>],
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        if responses.is_empty() || responses.len() > 8 {
            return Err(LoadError::BadRequest(format!(
                "{} responses: a step has 1 to 8",
                responses.len()
            )));
        }
        // Take the session out while we work on it (no lock held across HSM or ledger work).
        let mut s = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            if let Some(f) = sessions.finished.get(id) {
                if f.caller != caller {
                    return Err(LoadError::NotYours);
                }
                if seq == f.seq {
                    // A retry of the last step: the same final answer again.
                    return Ok(f.reply.clone());
                }
                return Err(LoadError::OutOfOrder {
                    expected: f.seq,
                    got: seq,
                });
            }
            if sessions.in_flight.contains(id) {
                return Err(LoadError::InProgress);
            }
            let s = sessions
                .active
                .get(id)
                .ok_or_else(|| LoadError::NoSession(id.to_string()))?;
            if s.caller != caller {
                return Err(LoadError::NotYours);
            }
            if seq == s.seq.wrapping_sub(1) {
                // A retry of the previous step: the same answer again.
                return Ok(s.last_reply.clone());
            }
            if seq != s.seq {
                return Err(LoadError::OutOfOrder {
                    expected: s.seq,
                    got: seq,
                });
            }
            sessions.take(id).expect("present")
        };
        s.touched_ms = now_ms;
        let reply = self.advance(&mut s, responses, now_ms).and_then(|reply| {
            if !reply.is_final() || s.idempotent_stored {
                return Ok(reply);
            }
            let (key, value) = (s.idem.clone(), stored_value(&reply, &s.fingerprint));
            self.ledger
                .transact(move |t| t.put_idempotent(&key, &value))?;
            s.idempotent_stored = true;
            Ok(reply)
        });
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // Our own failure (storage, HSM): the session ends; an intent already recorded
                // is settled at the card's next contact.
                let mut sessions = self.sessions.lock().expect("sessions lock");
                if s.intent_recorded {
                    self.stats.lock().expect("stats").pending += 1;
                    // A retried start with this key must not begin a second load while this
                    // one is undecided: it gets this answer (kept in memory; the ledger could
                    // not take it).
                    s.last_reply = Reply::Pending {
                        session_id: s.id.clone(),
                        detail: format!("the server failed ({e}); the load is settled at the card's next contact"),
                    };
                    s.seq += 1;
                    sessions.finish(s, self.cfg.max_finished_sessions);
                } else {
                    sessions.forget(&s.id, &s.idem);
                }
                return Err(e);
            }
        };
        s.last_reply = reply.clone();
        if let Reply::Command { seq, .. } = &reply {
            s.seq = *seq;
        } else {
            s.seq += 1;
        }
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if reply.is_final() {
            // Finished sessions stay for retries until they expire.
            sessions.finish(s, self.cfg.max_finished_sessions);
        } else {
            sessions.insert(s);
        }
        Ok(reply)
    }

    fn advance(
        &self,
        s: &mut Session,
        responses: &[Vec<u8>],
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        let mut step = Step::Continue;
        for response in responses {
            let fed = {
                let mut hsm = self.hsm.lock().expect("hsm lock");
                s.dialogue
                    .on_response(hsm.as_mut(), &mut rand::rngs::OsRng, response)
            };
            step = match fed {
                Ok(st) => st,
                Err(e) => return Ok(self.dialogue_failed(s, e)),
            };
        }
        if matches!(step, Step::Continue) {
            // Fewer answers than commands: the card left the field mid-batch.
            return Ok(
                self.dialogue_failed(s, TxError::Transport(purse::txn::TransportError::CardGone))
            );
        }
        let step = match step {
            Step::Decide(snapshot) => match self.decide(s, &snapshot, now_ms)? {
                Ok(decision) => {
                    let mut hsm = self.hsm.lock().expect("hsm lock");
                    match s.dialogue.decide(hsm.as_mut(), decision) {
                        Ok(st) => st,
                        Err(e) => {
                            drop(hsm);
                            return Ok(self.dialogue_failed(s, e));
                        }
                    }
                }
                Err(refusal) => return Ok(refusal),
            },
            other => other,
        };
        match step {
            Step::Transmit(batch) => {
                if s.dialogue.commit_sent() {
                    s.commit_sent = true;
                }
                Ok(Reply::Command {
                    session_id: s.id.clone(),
                    seq: s.seq + 1,
                    commands: batch.iter().map(hex::encode_upper).collect(),
                })
            }
            Step::Done(Outcome::Committed { snapshot, receipt }) => {
                let verified = {
                    let hsm = self.hsm.lock().expect("hsm lock");
                    hsm.verify_tmac(&receipt)
                };
                match verified {
                    Ok(_) => {
                        let reply = Reply::Completed {
                            session_id: s.id.clone(),
                            amount_minor: receipt.amount_minor,
                            balance_minor: receipt.balance_after_minor,
                            tmc: receipt.tmc,
                        };
                        let stored = (s.idem.clone(), stored_value(&reply, &s.fingerprint));
                        self.complete(&snapshot, &receipt, now_ms, Some(stored))?;
                        s.idempotent_stored = true;
                        self.stats.lock().expect("stats").completed += 1;
                        Ok(reply)
                    }
                    Err(e) => {
                        // The commit answer verified under the session MAC but the TMV does
                        // not: a broken card or key mismatch. Leave it for settlement.
                        self.stats.lock().expect("stats").pending += 1;
                        Ok(Reply::Pending {
                            session_id: s.id.clone(),
                            detail: format!("transaction MAC check failed: {e}"),
                        })
                    }
                }
            }
            Step::Done(Outcome::Refused { .. }) => {
                Ok(self.refused(s, "refused", "nothing to load"))
            }
            Step::Decide(_) | Step::Continue => unreachable!("handled above"),
        }
    }

    fn refused(&self, s: &Session, reason: &str, detail: &str) -> Reply {
        self.stats.lock().expect("stats").refused += 1;
        Reply::Refused {
            session_id: s.id.clone(),
            reason: reason.to_string(),
            detail: detail.to_string(),
        }
    }

    fn dialogue_failed(&self, s: &Session, e: TxError) -> Reply {
        if s.commit_sent {
            // The card may or may not have committed: settle at next contact.
            self.stats.lock().expect("stats").pending += 1;
            return Reply::Pending {
                session_id: s.id.clone(),
                detail: format!("the card's answer to the commit could not be verified ({e}); the load is settled at the card's next contact"),
            };
        }
        if s.intent_recorded {
            // The card refused before any commit (limit, wrong MAC): nothing is staged on a
            // card after an error, so the intent can be voided now.
            let uid = s.request.uid;
            if let Some(snap) = s.dialogue.snapshot().cloned() {
                if let Err(err) = self.void_intent(&uid, snap.tmc, 0) {
                    tracing::warn!(%err, "voiding after a refused credit failed; left for settlement");
                }
            }
        }
        let reason = match &e {
            TxError::UnknownKeyVersion(_) => "unknown_key_version",
            TxError::Card { .. } => "card_refused",
            TxError::Sam(_) => "authentication_failed",
            _ => "card_dialogue_failed",
        };
        self.refused(s, reason, &e.to_string())
    }

    /// Checks the ledger and limits, authorises funding and records the intent.
    /// Returns the decision, or a final refusal.
    fn decide(
        &self,
        s: &mut Session,
        snap: &CardSnapshot,
        now_ms: u64,
    ) -> Result<Result<Decision, Reply>, LoadError> {
        let uid = snap.uid;
        self.settle_from_snapshot(snap, now_ms)?;
        let shadow = {
            let r = self.ledger.read()?;
            r.card(&uid)?
        };
        if shadow.blocked {
            return Ok(Err(self.refused(
                s,
                "card_blocked",
                shadow.block_reason.as_deref().unwrap_or("blocked"),
            )));
        }
        if snap.tmc < shadow.last_tmc {
            return Ok(Err(self.refused(
                s,
                "counter_behind",
                &format!(
                    "card reports counter {} but {} was already seen: a restored or cloned card",
                    snap.tmc, shadow.last_tmc
                ),
            )));
        }
        if let Some(load_tmc) = s.reverses {
            return self.decide_reversal(s, snap, load_tmc, now_ms);
        }
        let amount = s.request.amount_minor;
        if i64::from(snap.balance_minor) + i64::from(amount)
            > i64::from(self.cfg.balance_ceiling_minor)
        {
            return Ok(Err(self.refused(
                s,
                "balance_ceiling",
                &format!(
                    "balance {} + {} would exceed the ceiling of {}",
                    snap.balance_minor, amount, self.cfg.balance_ceiling_minor
                ),
            )));
        }
        let today = day_of(now_ms);
        let loaded_today = if shadow.load_day == today {
            shadow.load_day_minor
        } else {
            0
        };
        if loaded_today + i64::from(amount) > self.cfg.max_daily_per_card_minor {
            return Ok(Err(self.refused(
                s,
                "daily_limit",
                &format!(
                    "{loaded_today} already loaded today; the daily limit is {}",
                    self.cfg.max_daily_per_card_minor
                ),
            )));
        }
        let source_name = s.request.funding_source.clone();
        let instrument = s.request.instrument.clone();
        let max_daily = self.cfg.max_daily_for(&source_name);
        let instrument_today = {
            let r = self.ledger.read()?;
            r.funding_day_total(&source_name, &instrument, today)?
        };
        if instrument_today + i64::from(amount) > max_daily {
            return Ok(Err(self.instrument_limit(s, instrument_today, max_daily)));
        }
        let source = self.sources[&s.request.funding_source].clone();
        // Unique per session (a retry inside the session reuses it; two racing sessions never
        // share an authorisation).
        let reference = format!("load:{}:{}:{}", hex::encode_upper(uid), snap.tmc + 1, s.id);
        let req = FundingRequest {
            amount_minor: i64::from(amount),
            reference: &reference,
            instrument: &s.request.instrument,
        };
        let auth = match source.authorise(&req) {
            Err(FundingError::Timeout) => source.authorise(&req), // same reference: safe
            other => other,
        };
        let auth = match auth {
            Ok(a) => a,
            Err(e) => return Ok(Err(self.refused(s, "funding_declined", &e.to_string()))),
        };
        let mut intent = LoadIntent {
            uid: hex::encode_upper(uid),
            tmc_before: snap.tmc,
            attempt: 0,
            balance_before_minor: snap.balance_minor,
            amount_minor: amount,
            key_version: snap.key_version,
            funding_source: s.request.funding_source.clone(),
            funding_auth: auth.clone(),
            instrument: instrument.clone(),
            idempotency_key: s.request.idempotency_key.clone(),
            requested_by: s.caller.clone(),
            state: IntentState::Authorised,
            created_ms: now_ms,
            settled_ms: None,
            kind: IntentKind::Load,
            reverses_tmc: None,
            reversed_at_tmc: None,
        };
        let (tmc, balance) = (snap.tmc, snap.balance_minor);
        let record = intent_record(&intent).to_vec();
        // Durable before any Credit leaves the server (group commit: shared fsync).
        // The instrument's day total is checked again where it is raised (two cards loading
        // from one instrument at once).
        let recorded = self.ledger.transact(move |t| {
            let so_far = t.funding_day_total(&source_name, &instrument, today)?;
            if so_far + i64::from(amount) > max_daily {
                return Ok(Some(so_far));
            }
            t.add_funding_day(&source_name, &instrument, today, i64::from(amount))?;
            t.insert_intent(&uid, &mut intent)?;
            let mut shadow = t.observe_card(&uid, tmc, balance)?;
            if shadow.load_day != today {
                shadow.load_day = today;
                shadow.load_day_minor = 0;
            }
            shadow.load_day_minor += i64::from(amount);
            t.put_card(&uid, &shadow)?;
            Ok(None)
        });
        match recorded {
            Ok(None) => {}
            Ok(Some(so_far)) => {
                let _ = source.void(&auth);
                return Ok(Err(self.instrument_limit(s, so_far, max_daily)));
            }
            Err(LedgerError::IntentExists { .. }) => {
                let _ = source.void(&auth);
                return Ok(Err(self.refused(
                    s,
                    "load_in_progress",
                    "another load for this card at this counter is in progress",
                )));
            }
            Err(e) => {
                // No intent, so no Credit will be sent: release the funds now (nothing else
                // would — settlement only knows intents in the ledger).
                if let Err(ve) = source.void(&auth) {
                    tracing::error!(%ve, auth, source = %s.request.funding_source, "the intent could not be written and its authorisation could not be voided; void it at the source");
                }
                return Err(e.into());
            }
        }
        s.intent_recorded = true;
        Ok(Ok(Decision::Apply {
            amount_minor: amount,
            record: Some(record),
        }))
    }

    fn instrument_limit(&self, s: &Session, so_far: i64, max: i64) -> Reply {
        self.refused(
            s,
            "instrument_daily_limit",
            &format!(
                "{so_far} already loaded today from this {} instrument; its daily limit is {max}",
                s.request.funding_source
            ),
        )
    }

    /// A reversal: the card must still hold the load's value; the reversal intent and the
    /// load's "being reversed" mark are durable before the Debit leaves the server.
    fn decide_reversal(
        &self,
        s: &mut Session,
        snap: &CardSnapshot,
        load_tmc: u32,
        now_ms: u64,
    ) -> Result<Result<Decision, Reply>, LoadError> {
        let amount = s.request.amount_minor;
        if snap.balance_minor < amount {
            return Ok(Err(self.refused(
                s,
                "insufficient_value",
                &format!(
                    "the card holds {}; the load of {amount} was partly spent",
                    snap.balance_minor
                ),
            )));
        }
        let uid = snap.uid;
        let (tmc, balance) = (snap.tmc, snap.balance_minor);
        let (caller, key, key_version) = (
            s.caller.clone(),
            s.request.idempotency_key.clone(),
            snap.key_version,
        );
        let mut reversal = LoadIntent {
            uid: hex::encode_upper(uid),
            tmc_before: tmc,
            attempt: 0,
            balance_before_minor: balance,
            amount_minor: amount,
            key_version,
            funding_source: String::new(),
            funding_auth: String::new(),
            instrument: String::new(),
            idempotency_key: key,
            requested_by: caller,
            state: IntentState::Authorised,
            created_ms: now_ms,
            settled_ms: None,
            kind: IntentKind::Reversal,
            reverses_tmc: Some(load_tmc),
            reversed_at_tmc: None,
        };
        let record = intent_record(&reversal).to_vec();
        let recorded = self.ledger.transact(move |t| {
            let Some(mut load) = t.intent(&uid, load_tmc - 1)? else {
                return Ok(Err("the load is gone"));
            };
            if load.state != IntentState::Completed || load.reversed_at_tmc.is_some() {
                return Ok(Err("another reversal took it back or is in progress"));
            }
            reversal.funding_source = load.funding_source.clone();
            reversal.funding_auth = load.funding_auth.clone();
            reversal.instrument = load.instrument.clone();
            t.insert_intent(&uid, &mut reversal)?;
            load.reversed_at_tmc = Some(tmc + 1);
            t.put_intent(&uid, &load)?;
            t.observe_card(&uid, tmc, balance)?;
            Ok(Ok(()))
        });
        match recorded {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Ok(Err(self.refused(s, "not_reversible", why))),
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
            amount_minor: amount,
            record: Some(record),
        }))
    }

    fn complete(
        &self,
        snapshot: &CardSnapshot,
        receipt: &purse::receipt::CommitReceipt,
        now_ms: u64,
        idem: Option<(String, serde_json::Value)>,
    ) -> Result<(), LoadError> {
        let uid = receipt.uid;
        let tmc_before = snapshot.tmc;
        let balance_after = receipt.balance_after_minor;
        // One group-committed transaction: the posting, the intent's state, the card's
        // shadow and the client's stored answer become durable together.
        let done = self.ledger.transact(move |t| {
            let action = t.complete_intent(&uid, tmc_before, balance_after, now_ms)?;
            if let Some((key, value)) = &idem {
                t.put_idempotent(key, value)?;
            }
            Ok(action)
        })?;
        if let Some(action) = done {
            self.apply_funding(&action);
        }
        Ok(())
    }

    fn void_intent(&self, uid: &[u8; 7], tmc_before: u32, now_ms: u64) -> Result<(), LoadError> {
        let uid = *uid;
        let voided = self
            .ledger
            .transact(move |t| t.void_intent(&uid, tmc_before, now_ms))?;
        if let Some(action) = voided {
            self.apply_funding(&action);
        }
        Ok(())
    }

    /// Settles the card's open intents from a snapshot read under MAC (a later load session,
    /// or the counter and balance of a cleared tap). Returns how many were settled.
    pub fn settle_from_snapshot(
        &self,
        snap: &CardSnapshot,
        now_ms: u64,
    ) -> Result<usize, LoadError> {
        let open = {
            let r = self.ledger.read()?;
            r.open_intents(&snap.uid)?
        };
        let mut settled = 0;
        for intent in open {
            // Whether the card made *this* change is decided by the record the server wrote
            // with it (read under MAC in this session), never by counter and balance alone: a
            // validator's debit (or a franchise credit) of the same amount at the same counter
            // has the same counter, balance and kind of transaction MAC.
            let ours = intent_record(&intent);
            let at = intent.tmc_before + 1;
            let on_card = snap.records.iter().any(|r| r[..] == ours[..]);
            if snap.tmc == at && snap.records.first().is_some_and(|r| r[..] == ours[..]) {
                let pending = PendingChange {
                    uid: snap.uid,
                    tmc_before: intent.tmc_before,
                    balance_before_minor: intent.balance_before_minor,
                    kind: intent.tx_kind(),
                    amount_minor: intent.amount_minor,
                    key_version: intent.key_version,
                };
                let Ok(Settlement::Committed(receipt)) = txn::settle(&pending, snap) else {
                    tracing::error!(uid = %intent.uid, tmc = intent.tmc_before, "pending change: the card holds its record but not its balance; left for clearing");
                    continue;
                };
                let verified = {
                    let hsm = self.hsm.lock().expect("hsm lock");
                    hsm.verify_tmac(&receipt)
                };
                // The HSM failing says nothing about the card: fail the request, the intent
                // stays open for the next contact.
                if let Err(e @ SamError::Hsm(_)) = verified {
                    return Err(e.into());
                }
                if verified.is_err() {
                    tracing::error!(uid = %intent.uid, tmc = intent.tmc_before, "pending change: the card's transaction MAC does not verify");
                    continue;
                }
                let before = CardSnapshot {
                    tmc: intent.tmc_before,
                    ..snap.clone()
                };
                self.complete(&before, &receipt, now_ms, None)?;
            } else if snap.tmc > at && on_card {
                // Applied, and the card has transacted since (its MAC for this one is gone):
                // the record, read under MAC, proves it.
                let after = i64::from(intent.balance_before_minor) + intent.delta_minor();
                let Ok(after) = i32::try_from(after) else {
                    continue;
                };
                let (uid, before) = (snap.uid, intent.tmc_before);
                let done = self
                    .ledger
                    .transact(move |t| t.complete_intent(&uid, before, after, now_ms))?;
                if let Some(action) = done {
                    self.apply_funding(&action);
                }
            } else if snap.tmc == intent.tmc_before
                || (snap.tmc >= at && !on_card && ((snap.tmc - at) as usize) < snap.records.len())
            {
                // The counter never moved; or the record is not on the card and fewer
                // transactions followed than the card holds records (whatever size its cyclic
                // file is, ours could not have been pushed out): the card never applied it.
                self.void_intent(&snap.uid, intent.tmc_before, now_ms)?;
                self.stats.lock().expect("stats").settled_voided += 1;
                settled += 1;
                continue;
            } else {
                // Counter behind (a restored card) or too far ahead to tell: clearing decides.
                continue;
            }
            self.stats.lock().expect("stats").settled_completed += 1;
            settled += 1;
        }
        Ok(settled)
    }

    /// Drops relay sessions idle longer than the configured timeout.
    pub fn expire_sessions(&self, now_ms: u64) -> usize {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let sessions = &mut *sessions;
        let before = sessions.active.len() + sessions.finished.len();
        let timeout = self.cfg.session_idle_timeout_ms;
        let mut pending = 0;
        let by_idem = &mut sessions.by_idem;
        sessions.active.retain(|_, s| {
            let keep = now_ms.saturating_sub(s.touched_ms) < timeout;
            if !keep {
                if s.intent_recorded {
                    pending += 1;
                }
                if by_idem.get(&s.idem).is_some_and(|v| *v == s.id) {
                    by_idem.remove(&s.idem);
                }
            }
            keep
        });
        let by_idem = &mut sessions.by_idem;
        sessions.finished.retain(|id, f| {
            let keep = now_ms.saturating_sub(f.touched_ms) < timeout;
            if !keep && by_idem.get(&f.idem).is_some_and(|v| v == id) {
                by_idem.remove(&f.idem);
            }
            keep
        });
        let finished = &sessions.finished;
        sessions
            .finished_order
            .retain(|id| finished.contains_key(id));
        self.stats.lock().expect("stats").pending += pending;
        before - sessions.active.len() - sessions.finished.len()
    }

    /// Registers a newly personalised card: posts its initial value from `issuer:float`.
    pub fn register_card(
        &self,
        uid: &[u8; 7],
        personalised_minor: i64,
        now_ms: u64,
    ) -> Result<(), LoadError> {
        // The card holds an i32: a value beyond it would be booked as one amount and held as
        // another (4 294 967 396 as 100).
        let Ok(personalised_i32) = i32::try_from(personalised_minor) else {
            return Err(LoadError::BadRequest(format!(
                "personalised value {personalised_minor} does not fit a card's 32-bit balance"
            )));
        };
        let reference = format!("issue:{}", hex::encode_upper(uid));
        let uid = *uid;
        self.ledger.transact(move |t| {
            if t.card_known(&uid)? {
                return Ok(());
            }
            if personalised_minor > 0 {
                t.post(
                    now_ms,
                    "issuer:float",
                    &card_account(&uid),
                    personalised_minor,
                    &reference,
                )?;
            }
            t.put_card(
                &uid,
                &crate::ledger::CardShadow {
                    booked_balance_minor: Some(personalised_i32),
                    ..Default::default()
                },
            )
        })?;
        Ok(())
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
