//! The double-entry ledger in LMDB (heed).
//!
//! Every movement of value is a [`Posting`]: an amount from one account to another, with a
//! reference that traces it to a card counter (`load:<UID>:<TMC>`, `tap:<UID>:<TMC>`) or a
//! funding reference. Account balances are kept beside the postings in the same transaction,
//! so the sum of all balances is always zero and a card account's balance is its shadow purse
//! relative to issuance: personalised value + loads − debits.
//!
//! Load intents are keyed by (card UID, the card's TMC before the load): at most one intent per
//! card counter can exist, so a load can never be applied or paid twice.
//!
//! Account names: `card:<UID hex>`, `issuer:float` (value issued at personalisation),
//! `funding:<source>` (what a funding source owes us), `operator:<id>` (fare revenue),
//! `pts:<programme>:member:<id>` (a points member's points, in points; `<id>` is a validated
//! instrument id, so it never names `pts:<programme>:issued`, `…:redeemed` or `…:held:…`),
//! `franchise:<id>`. No account name is ever formatted from a request without validation:
//! funding instruments are looked up in the instrument registry ([`Instrument`]).

use heed::byteorder::BE;
use heed::types::{Bytes, SerdeJson, Str, I64, U64};
use heed::{Database, Env, RoTxn, RwTxn, WithoutTls};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tapgate_lmdb::EnvConfig;

/// Ledger errors.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// LMDB failed (disk full, map full, I/O).
    #[error("ledger storage: {0}")]
    Storage(#[from] heed::Error),
    /// An intent already exists for this card counter and is not settled.
    #[error("card {uid} already has a load pending at counter {tmc}")]
    IntentExists {
        /// card
        uid: String,
        /// counter
        tmc: u32,
    },
    /// No intent for this card counter.
    #[error("no load intent for card {uid} at counter {tmc}")]
    NoIntent {
        /// card
        uid: String,
        /// counter
        tmc: u32,
    },
    /// A posting would be invalid (non-positive amount, same account on both sides).
    #[error("invalid posting: {0}")]
    InvalidPosting(&'static str),
    /// The group commit failed (disk full, I/O): nothing of the batch is durable.
    #[error("ledger commit failed: {0}")]
    Commit(String),
    /// The ledger's environment could not be opened (directory, map size, LMDB).
    #[error("opening the ledger: {0}")]
    Open(#[from] tapgate_lmdb::OpenError),
    /// The ledger directory could not be prepared, or its committer thread not started.
    #[error("ledger directory {path}: {source}")]
    Dir {
        /// path
        path: String,
        /// cause
        source: std::io::Error,
    },
}

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
}

impl LoadIntent {
    /// The change to the card's value, minor units (negative for a reversal).
    pub fn delta_minor(&self) -> i64 {
        match self.kind {
            IntentKind::Load => i64::from(self.amount_minor),
            IntentKind::Reversal => -i64::from(self.amount_minor),
        }
    }

    /// The value command the card executes for it.
    pub fn tx_kind(&self) -> purse::receipt::TxKind {
        match self.kind {
            IntentKind::Load => purse::receipt::TxKind::Credit,
            IntentKind::Reversal => purse::receipt::TxKind::Debit,
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
    pub anomalies: Vec<crate::clearing::Anomaly>,
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

/// The ledger's databases; every read and write method lives here. [`Ledger`] derefs to it.
#[derive(Clone)]
pub struct LedgerCore {
    env: Env<WithoutTls>,
    balances: Database<Str, I64<BE>>,
    postings: Database<U64<BE>, SerdeJson<Posting>>,
    intents: Database<Bytes, SerdeJson<LoadIntent>>,
    cards: Database<Bytes, SerdeJson<CardShadow>>,
    idem: Database<Str, SerdeJson<serde_json::Value>>,
    vouchers: Database<Str, SerdeJson<Voucher>>,
    blocks: Database<U64<BE>, SerdeJson<BlockChange>>,
    /// Every anomaly raised (clearing, the gap sweep), numbered.
    anomalies: Database<U64<BE>, SerdeJson<crate::clearing::Anomaly>>,
    /// Cards with counters booked above a gap → the gap's clock.
    gaps: Database<Bytes, SerdeJson<GapClock>>,
    /// Loaded per (funding source, instrument, UTC day), minor units: the per-instrument
    /// daily limit.
    funding_days: Database<Str, I64<BE>>,
    /// Funding instruments and the account each belongs to, by (source, instrument id).
    instruments: Database<Str, SerdeJson<Instrument>>,
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

fn instrument_key(source: &str, id: &str) -> String {
    format!("{source}\u{1f}{id}")
}

/// The key of a load intent: UID (7) ‖ TMC before (u32 BE) ‖ attempt (u16 BE), so one card's
/// intents sort by counter and keys only grow.
pub fn intent_key(uid: &[u8; 7], tmc_before: u32, attempt: u16) -> [u8; 13] {
    tapgate_lmdb::key::uid_counter_attempt(uid, tmc_before, attempt)
}

fn counter_prefix(uid: &[u8; 7], tmc_before: u32) -> [u8; 11] {
    tapgate_lmdb::key::uid_counter(uid, tmc_before)
}

fn funding_day_key(source: &str, instrument: &str, day: u64) -> String {
    format!("{source}\u{1f}{instrument}\u{1f}{day}")
}

/// The account name of a card's shadow purse.
pub fn card_account(uid: &[u8; 7]) -> String {
    format!("card:{}", hex::encode_upper(uid))
}

/// A unit of work for the group committer: runs inside a nested transaction of the shared
/// batch transaction and reports back once the batch is durable.
type Job = Box<dyn FnOnce(&LedgerCore, &mut RwTxn<'_>) -> JobDone + Send>;

struct JobDone {
    ok: bool,
    deliver: Box<dyn FnOnce(Result<(), String>) + Send>,
}

/// Most jobs in one group commit.
pub const GROUP_COMMIT_MAX_JOBS: usize = 256;
/// Most jobs waiting for the committer (back-pressure beyond it).
pub const GROUP_COMMIT_QUEUE_JOBS: usize = 4_096;

/// The ledger: its databases plus a group committer, so that concurrent transactions share one
/// fsync without giving up durability (each caller returns only after its batch committed).
#[derive(Clone)]
pub struct Ledger {
    core: LedgerCore,
    jobs: std::sync::mpsc::SyncSender<Job>,
    committer: std::sync::Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::ops::Deref for Ledger {
    type Target = LedgerCore;
    fn deref(&self) -> &LedgerCore {
        &self.core
    }
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir` with room for `map_size_bytes`, and starts its
    /// committer thread (it ends when the last `Ledger` clone is dropped).
    pub fn open(dir: &Path, map_size_bytes: usize) -> Result<Ledger, LedgerError> {
        let core = LedgerCore::open(dir, map_size_bytes)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(GROUP_COMMIT_QUEUE_JOBS);
        let writer = core.clone();
        let handle = std::thread::Builder::new()
            .name("ledger-commit".into())
            .spawn(move || group_commit_loop(writer, rx))
            .map_err(|source| LedgerError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        Ok(Ledger {
            core,
            jobs: tx,
            committer: std::sync::Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }

    /// Closes this handle; the last one to close waits for the committer to finish, so the
    /// environment can be opened again in the same process.
    pub fn close(self) {
        let Ledger {
            core,
            jobs,
            committer,
        } = self;
        drop(jobs);
        drop(core);
        if let Ok(m) = std::sync::Arc::try_unwrap(committer) {
            if let Some(h) = m.into_inner().ok().flatten() {
                let _ = h.join();
            }
        }
    }

    /// Runs `f` in a write transaction that is committed together with other concurrent
    /// callers' (group commit), and returns once it is durable. If `f` fails, only its own
    /// writes are rolled back (it runs in a nested transaction).
    pub fn transact<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LedgerCore, &mut RwTxn<'_>) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<T, LedgerError>>(1);
        let job: Job = Box::new(move |core, txn| {
            let result = f(core, txn);
            JobDone {
                ok: result.is_ok(),
                deliver: Box::new(move |committed| {
                    let out = match (result, committed) {
                        (Ok(v), Ok(())) => Ok(v),
                        (Ok(_), Err(e)) => Err(LedgerError::Commit(e)),
                        (Err(e), _) => Err(e),
                    };
                    let _ = tx.send(out);
                }),
            }
        });
        self.jobs
            .send(job)
            .map_err(|_| LedgerError::Commit("the committer thread has stopped".into()))?;
        rx.recv()
            .map_err(|_| LedgerError::Commit("the committer thread has stopped".into()))?
    }
}

fn group_commit_loop(core: LedgerCore, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX_JOBS {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let mut dones = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), heed::Error> {
            let mut wtxn = core.env.write_txn()?;
            for job in batch.drain(..) {
                let mut nested = core.env.nested_write_txn(&mut wtxn)?;
                let done = job(&core, &mut nested);
                if done.ok {
                    nested.commit()?;
                } else {
                    nested.abort();
                }
                dones.push(done);
            }
            wtxn.commit()
        })();
        let result = result.map_err(|e| e.to_string());
        // Jobs that never ran (the batch failed to start) are told too.
        for job in batch {
            let done = JobDone {
                ok: false,
                deliver: Box::new(|_| {}),
            };
            drop(job);
            dones.push(done);
        }
        for d in dones {
            (d.deliver)(result.clone());
        }
    }
}

/// The ledger's databases, in the order [`LedgerCore::open`] destructures them.
const DATABASES: tapgate_lmdb::Databases<11> = [
    "balances",
    "postings",
    "load_intents",
    "cards",
    "idempotency",
    "vouchers",
    "block_changes",
    "anomalies",
    "counter_gaps",
    "funding_days",
    "instruments",
];

/// The ledger's map size when its config names none: 1 GiB (`ledger_map_size_bytes`).
pub const DEFAULT_MAP_SIZE_BYTES: usize = 1 << 30;

impl LedgerCore {
    /// Opens (or creates) the ledger databases in `dir`.
    fn open(dir: &Path, map_size_bytes: usize) -> Result<LedgerCore, LedgerError> {
        let (env, dbs) = tapgate_lmdb::open(dir, DATABASES, &EnvConfig::durable(map_size_bytes))?;
        let [balances, postings, intents, cards, idem, vouchers, blocks, anomalies, gaps, funding_days, instruments] =
            dbs;
        Ok(LedgerCore {
            env,
            balances: balances.remap_types(),
            postings: postings.remap_types(),
            intents: intents.remap_types(),
            cards: cards.remap_types(),
            idem: idem.remap_types(),
            vouchers: vouchers.remap_types(),
            blocks: blocks.remap_types(),
            anomalies: anomalies.remap_types(),
            gaps: gaps.remap_types(),
            funding_days: funding_days.remap_types(),
            instruments: instruments.remap_types(),
        })
    }

    /// A read transaction.
    pub fn read(&self) -> Result<RoTxn<'_, WithoutTls>, LedgerError> {
        Ok(self.env.read_txn()?)
    }

    /// A write transaction (one at a time; commit makes everything in it durable at once).
    pub fn write(&self) -> Result<RwTxn<'_>, LedgerError> {
        Ok(self.env.write_txn()?)
    }

    /// Posts `amount_minor` from `from` to `to` inside `txn`.
    pub fn post(
        &self,
        txn: &mut RwTxn<'_>,
        time_ms: u64,
        from: &str,
        to: &str,
        amount_minor: i64,
        reference: &str,
    ) -> Result<Posting, LedgerError> {
        if amount_minor <= 0 {
            return Err(LedgerError::InvalidPosting("amount must be positive"));
        }
        if from == to {
            return Err(LedgerError::InvalidPosting(
                "from and to are the same account",
            ));
        }
        let seq = match self.postings.last(txn)? {
            Some((k, _)) => k + 1,
            None => 1,
        };
        let p = Posting {
            seq,
            time_ms,
            from: from.to_string(),
            to: to.to_string(),
            amount_minor,
            reference: reference.to_string(),
        };
        // Checked: a balance that would leave i64 refuses the posting (two payments of
        // i64::MAX must not wrap an account round to a small number).
        let fb = self.balances.get(txn, from)?.unwrap_or(0);
        let tb = self.balances.get(txn, to)?.unwrap_or(0);
        let (Some(fb), Some(tb)) = (fb.checked_sub(amount_minor), tb.checked_add(amount_minor))
        else {
            return Err(LedgerError::InvalidPosting(
                "an account balance would overflow",
            ));
        };
        self.postings.put(txn, &seq, &p)?;
        self.balances.put(txn, from, &fb)?;
        self.balances.put(txn, to, &tb)?;
        Ok(p)
    }

    /// An account's balance.
    pub fn balance(&self, txn: &RoTxn<'_, WithoutTls>, account: &str) -> Result<i64, LedgerError> {
        Ok(self.balances.get(txn, account)?.unwrap_or(0))
    }

    /// Every account and its balance.
    pub fn balances(&self, txn: &RoTxn<'_, WithoutTls>) -> Result<Vec<(String, i64)>, LedgerError> {
        let mut out = Vec::new();
        for item in self.balances.iter(txn)? {
            let (k, v) = item?;
            out.push((k.to_string(), v));
        }
        Ok(out)
    }

    /// Every posting whose reference starts with `prefix` (reports, tests).
    pub fn postings_with_prefix(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        prefix: &str,
    ) -> Result<Vec<Posting>, LedgerError> {
        let mut out = Vec::new();
        for item in self.postings.iter(txn)? {
            let (_, p) = item?;
            if p.reference.starts_with(prefix) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The card's shadow record.
    pub fn card(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
    ) -> Result<CardShadow, LedgerError> {
        Ok(self.cards.get(txn, uid)?.unwrap_or_default())
    }

    /// Records that the card's transaction at counter `tmc` (leaving `balance_after_minor`) is
    /// booked. Counters only advance `booked_through_tmc` when contiguous; a counter booked
    /// above a gap starts the gap's clock (`now_ms`) for [`LedgerCore::sweep_gaps`].
    pub fn book_counter(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        tmc: u32,
        balance_after_minor: i32,
        delta_minor: i64,
        now_ms: u64,
    ) -> Result<Booking, LedgerError> {
        let mut c = self.card(txn, uid)?;
        let booking = c.book(tmc, balance_after_minor, delta_minor);
        if booking != Booking::Duplicate {
            self.cards.put(txn, uid, &c)?;
            if c.booked_above.is_empty() {
                self.gaps.delete(txn, uid)?;
                if c.blocked && c.block_reason.as_deref() == Some(GAP_BLOCK_REASON) {
                    // Every booked counter is proved by the card's MAC: the value that seemed
                    // to appear came from a real transaction (a late franchise report, say).
                    self.set_blocked(txn, uid, false, "the counter gap filled", now_ms)?;
                }
            } else {
                // The lowest gap starts at the first counter not booked; a new one (or the same
                // one after the counters below it arrived) starts a new clock.
                let from_tmc = c.booked_through_tmc.saturating_add(1);
                if self
                    .gaps
                    .get(txn, uid)?
                    .is_none_or(|g| g.from_tmc != from_tmc)
                {
                    self.gaps.put(
                        txn,
                        uid,
                        &GapClock {
                            from_tmc,
                            since_ms: now_ms,
                            reported: false,
                        },
                    )?;
                }
            }
        }
        Ok(booking)
    }

    /// What was loaded from `instrument` at `source` on UTC day `day` (minor units).
    pub fn funding_day_total(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        source: &str,
        instrument: &str,
        day: u64,
    ) -> Result<i64, LedgerError> {
        Ok(self
            .funding_days
            .get(txn, &funding_day_key(source, instrument, day))?
            .unwrap_or(0))
    }

    /// Adds `delta_minor` to that day's total.
    pub fn add_funding_day(
        &self,
        txn: &mut RwTxn<'_>,
        source: &str,
        instrument: &str,
        day: u64,
        delta_minor: i64,
    ) -> Result<(), LedgerError> {
        let key = funding_day_key(source, instrument, day);
        let total = self
            .funding_days
            .get(txn, &key)?
            .unwrap_or(0)
            .checked_add(delta_minor)
            .ok_or(LedgerError::InvalidPosting("a day total would overflow"))?;
        Ok(self.funding_days.put(txn, &key, &total)?)
    }

    /// Appends an anomaly (numbered from 1) and returns its number.
    pub fn record_anomaly(
        &self,
        txn: &mut RwTxn<'_>,
        a: &crate::clearing::Anomaly,
    ) -> Result<u64, LedgerError> {
        let seq = self.anomalies.last(txn)?.map(|(k, _)| k + 1).unwrap_or(1);
        self.anomalies.put(txn, &seq, a)?;
        Ok(seq)
    }

    /// Anomalies numbered above `after`, at most `limit`, and the last number.
    pub fn anomalies(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, crate::clearing::Anomaly)>, u64), LedgerError> {
        let last = self.anomalies.last(txn)?.map(|(k, _)| k).unwrap_or(0);
        let mut out = Vec::new();
        let from = after.saturating_add(1);
        for item in self.anomalies.range(txn, &(from..))?.take(limit) {
            out.push(item?);
        }
        Ok((out, last))
    }

    /// A counter gap that never fills: every card whose lowest gap has been open longer than
    /// `older_than_ms` is reported once as a `counter_gap` anomaly. When the card's own proved
    /// balances show value *appearing* across the gap (more than the booked changes explain)
    /// and no load is pending there, the card is blocked ([`GAP_BLOCK_REASON`]): a credit the
    /// back office never made is a cloned card or a leaked key; if the gap later fills with
    /// proved transactions (a franchise terminal reporting late), the block is lifted. Missing
    /// debits (value that left the card at a terminal whose taps never arrived) are the
    /// operator's loss, not the cardholder's fault, and a pending load or reversal in the gap
    /// waits for the card: both are reported, not blocked. Returns the anomalies raised.
    pub fn sweep_gaps(
        &self,
        txn: &mut RwTxn<'_>,
        now_ms: u64,
        older_than_ms: u64,
    ) -> Result<GapSweep, LedgerError> {
        let mut due = Vec::new();
        for item in self.gaps.iter(txn)? {
            let (uid, clock) = item?;
            if !clock.reported && now_ms.saturating_sub(clock.since_ms) >= older_than_ms {
                if let Ok(uid) = <[u8; 7]>::try_from(uid) {
                    due.push((uid, clock));
                }
            }
        }
        let mut sweep = GapSweep::default();
        for (uid, mut clock) in due {
            let c = self.card(txn, &uid)?;
            let Some(&(first_above, balance_after, delta)) = c.booked_above.first() else {
                self.gaps.delete(txn, &uid)?;
                continue;
            };
            let from_tmc = c.booked_through_tmc.saturating_add(1);
            let to_tmc = first_above - 1;
            let hours = now_ms.saturating_sub(clock.since_ms) / 3_600_000;
            let waiting = self
                .open_intents(txn, &uid)?
                .into_iter()
                .find(|i| i.tmc_before + 1 >= from_tmc && i.tmc_before < first_above);
            // What the missing counters changed: the balance before the first booked counter
            // above the gap, minus the balance after the last one below it.
            let missing = c
                .booked_balance_minor
                .map(|below| i64::from(balance_after) - delta - i64::from(below));
            let (block, detail) = match (waiting, missing) {
                (Some(i), _) => (
                    false,
                    format!(
                        "counters {from_tmc}..={to_tmc} missing for {hours} h; a pending {:?} at counter {} waits for the card",
                        i.kind,
                        i.tmc_before + 1
                    ),
                ),
                (None, Some(m)) if m > 0 => (
                    true,
                    format!(
                        "counters {from_tmc}..={to_tmc} missing for {hours} h and {m} minor units appeared across them with no load booked"
                    ),
                ),
                (None, Some(m)) => (
                    false,
                    format!(
                        "counters {from_tmc}..={to_tmc} missing for {hours} h: {} minor units of debits never cleared",
                        -m
                    ),
                ),
                (None, None) => (
                    false,
                    format!("counters {from_tmc}..={to_tmc} missing for {hours} h"),
                ),
            };
            let anomaly = crate::clearing::Anomaly {
                kind: "counter_gap".into(),
                card_uid: hex::encode_upper(uid),
                tmc: from_tmc,
                device_id: 0,
                device_seq: 0,
                detail,
            };
            self.record_anomaly(txn, &anomaly)?;
            sweep.anomalies.push(anomaly);
            if block
                && self
                    .set_blocked(txn, &uid, true, GAP_BLOCK_REASON, now_ms)?
                    .is_some()
            {
                sweep.cards_blocked += 1;
            }
            // Reported once; the clock restarts when the gap moves or a new one opens.
            clock.reported = true;
            self.gaps.put(txn, &uid, &clock)?;
        }
        Ok(sweep)
    }

    /// Every card's shadow record (reconciliation).
    pub fn all_cards(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
    ) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        let mut out = Vec::new();
        for item in self.cards.iter(txn)? {
            let (k, v) = item?;
            if let Ok(uid) = <[u8; 7]>::try_from(k) {
                out.push((uid, v));
            }
        }
        Ok(out)
    }

    /// Blocks or unblocks a card, appending a numbered change when its state changes.
    /// Returns the new version, or `None` when the card already was in that state.
    pub fn set_blocked(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        blocked: bool,
        reason: &str,
        time_ms: u64,
    ) -> Result<Option<u64>, LedgerError> {
        let mut c = self.card(txn, uid)?;
        if c.blocked == blocked {
            return Ok(None);
        }
        c.blocked = blocked;
        c.block_reason = blocked.then(|| reason.to_string());
        self.cards.put(txn, uid, &c)?;
        let version = self.blocks.last(txn)?.map(|(k, _)| k + 1).unwrap_or(1);
        self.blocks.put(
            txn,
            &version,
            &BlockChange {
                version,
                card_uid: hex::encode_upper(uid),
                action: if blocked { "block" } else { "unblock" }.into(),
                reason: reason.to_string(),
                time_ms,
            },
        )?;
        Ok(Some(version))
    }

    /// Block changes after `after`, at most `limit`, and the latest version.
    pub fn block_changes(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<BlockChange>, u64), LedgerError> {
        let latest = self.blocks.last(txn)?.map(|(k, _)| k).unwrap_or(0);
        let mut out = Vec::new();
        // `after` comes from a query string: u64::MAX has no next version (it must not wrap
        // round to 0 and list everything).
        let Some(from) = after.checked_add(1) else {
            return Ok((out, latest));
        };
        for item in self.blocks.range(txn, &(from..))? {
            let (_, c) = item?;
            out.push(c);
            if out.len() >= limit {
                break;
            }
        }
        Ok((out, latest))
    }

    /// A voucher by code.
    pub fn voucher(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        code: &str,
    ) -> Result<Option<Voucher>, LedgerError> {
        Ok(self.vouchers.get(txn, code)?)
    }

    /// Stores a voucher.
    pub fn put_voucher(&self, txn: &mut RwTxn<'_>, v: &Voucher) -> Result<(), LedgerError> {
        Ok(self.vouchers.put(txn, &v.code, v)?)
    }

    /// Whether the card has a shadow record.
    pub fn card_known(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
    ) -> Result<bool, LedgerError> {
        Ok(self.cards.get(txn, uid)?.is_some())
    }

    /// Stores the card's shadow record.
    pub fn put_card(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        shadow: &CardShadow,
    ) -> Result<(), LedgerError> {
        Ok(self.cards.put(txn, uid, shadow)?)
    }

    /// Records what a card reported (its counter and balance, read under MAC).
    pub fn observe_card(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        tmc: u32,
        balance_minor: i32,
    ) -> Result<CardShadow, LedgerError> {
        let mut c = self.card(txn, uid)?;
        if tmc >= c.last_tmc {
            c.last_tmc = tmc;
            c.last_reported_balance_minor = Some(balance_minor);
            self.cards.put(txn, uid, &c)?;
        }
        Ok(c)
    }

    /// Records a new load intent; refuses it while a live (authorised or completed) intent
    /// exists for the same card counter. Sets `intent.attempt`.
    pub fn insert_intent(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        intent: &mut LoadIntent,
    ) -> Result<(), LedgerError> {
        let mut attempts = 0u16;
        for item in self
            .intents
            .prefix_iter(txn, &counter_prefix(uid, intent.tmc_before)[..])?
        {
            let (_, existing) = item?;
            if existing.state != IntentState::Voided {
                return Err(LedgerError::IntentExists {
                    uid: hex::encode_upper(uid),
                    tmc: intent.tmc_before,
                });
            }
            attempts += 1;
        }
        intent.attempt = attempts;
        Ok(self
            .intents
            .put(txn, &intent_key(uid, intent.tmc_before, attempts), intent)?)
    }

    /// The live intent at (card, counter), or else the latest voided one.
    pub fn intent(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
        tmc_before: u32,
    ) -> Result<Option<LoadIntent>, LedgerError> {
        let mut last = None;
        for item in self
            .intents
            .prefix_iter(txn, &counter_prefix(uid, tmc_before)[..])?
        {
            let (_, i) = item?;
            if i.state != IntentState::Voided {
                return Ok(Some(i));
            }
            last = Some(i);
        }
        Ok(last)
    }

    /// Replaces an intent (same card, counter and attempt).
    pub fn put_intent(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        intent: &LoadIntent,
    ) -> Result<(), LedgerError> {
        Ok(self.intents.put(
            txn,
            &intent_key(uid, intent.tmc_before, intent.attempt),
            intent,
        )?)
    }

    /// The card proved the intent's change at counter `tmc` (leaving `balance_after_minor`):
    /// posts it (a load funding → card, a reversal card → funding), marks the intent
    /// completed and books the counter, in `txn`. Returns what to do with the funding once
    /// `txn` is durable, or `None` if it was already completed.
    pub fn complete_intent(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        tmc_before: u32,
        balance_after_minor: i32,
        now_ms: u64,
    ) -> Result<Option<FundingAction>, LedgerError> {
        let mut intent =
            self.intent(txn, uid, tmc_before)?
                .ok_or_else(|| LedgerError::NoIntent {
                    uid: hex::encode_upper(uid),
                    tmc: tmc_before,
                })?;
        if intent.state != IntentState::Authorised {
            return Ok(None); // completed already, or voided: never both
        }
        // A card at the last counter cannot commit another change: no intent completes there.
        let tmc = tmc_before.checked_add(1).ok_or(LedgerError::NoIntent {
            uid: hex::encode_upper(uid),
            tmc: tmc_before,
        })?;
        let funding = format!("funding:{}", intent.funding_source);
        let card = card_account(uid);
        let amount = i64::from(intent.amount_minor);
        let action = match intent.kind {
            IntentKind::Load => {
                self.post(
                    txn,
                    now_ms,
                    &funding,
                    &card,
                    amount,
                    &format!("load:{}:{tmc}", hex::encode_upper(uid)),
                )?;
                FundingAction::Capture {
                    source: intent.funding_source.clone(),
                    auth: intent.funding_auth.clone(),
                }
            }
            IntentKind::Reversal => {
                self.post(
                    txn,
                    now_ms,
                    &card,
                    &funding,
                    amount,
                    &format!("reversal:{}:{tmc}", hex::encode_upper(uid)),
                )?;
                FundingAction::Refund {
                    source: intent.funding_source.clone(),
                    auth: intent.funding_auth.clone(),
                    amount_minor: amount,
                }
            }
        };
        intent.state = IntentState::Completed;
        intent.settled_ms = Some(now_ms);
        self.put_intent(txn, uid, &intent)?;
        self.observe_card(txn, uid, tmc, balance_after_minor)?;
        self.book_counter(
            txn,
            uid,
            tmc,
            balance_after_minor,
            intent.delta_minor(),
            now_ms,
        )?;
        Ok(Some(action))
    }

    /// The card never applied the intent's change: marks it voided in `txn` (a load's day
    /// total is given back; a reversal frees its load to be reversed again). Returns what to
    /// do with the funding once `txn` is durable, or `None` if it was not open.
    pub fn void_intent(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        tmc_before: u32,
        now_ms: u64,
    ) -> Result<Option<FundingAction>, LedgerError> {
        let Some(mut intent) = self.intent(txn, uid, tmc_before)? else {
            return Ok(None);
        };
        if intent.state != IntentState::Authorised {
            return Ok(None);
        }
        intent.state = IntentState::Voided;
        intent.settled_ms = Some(now_ms);
        self.put_intent(txn, uid, &intent)?;
        match intent.kind {
            IntentKind::Load => {
                let day = intent.created_ms / 86_400_000;
                let mut shadow = self.card(txn, uid)?;
                if shadow.load_day == day {
                    shadow.load_day_minor -= i64::from(intent.amount_minor);
                    self.put_card(txn, uid, &shadow)?;
                }
                if !intent.instrument.is_empty() {
                    self.add_funding_day(
                        txn,
                        &intent.funding_source,
                        &intent.instrument,
                        day,
                        -i64::from(intent.amount_minor),
                    )?;
                }
                Ok(Some(FundingAction::Release {
                    source: intent.funding_source,
                    auth: intent.funding_auth,
                }))
            }
            IntentKind::Reversal => {
                if let Some(load_tmc) = intent.reverses_tmc {
                    let load = match load_tmc.checked_sub(1) {
                        Some(before) => self.intent(txn, uid, before)?,
                        None => None,
                    };
                    if let Some(mut load) = load {
                        if load.reversed_at_tmc == tmc_before.checked_add(1) {
                            load.reversed_at_tmc = None;
                            self.put_intent(txn, uid, &load)?;
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    /// A card's intents that are not settled yet.
    pub fn open_intents(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
    ) -> Result<Vec<LoadIntent>, LedgerError> {
        let mut out = Vec::new();
        for item in self.intents.prefix_iter(txn, &uid[..])? {
            let (_, i) = item?;
            if i.state == IntentState::Authorised {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// All intents (reports, reconciliation).
    pub fn all_intents(&self, txn: &RoTxn<'_, WithoutTls>) -> Result<Vec<LoadIntent>, LedgerError> {
        let mut out = Vec::new();
        for item in self.intents.iter(txn)? {
            out.push(item?.1);
        }
        Ok(out)
    }

    /// The stored answer for an idempotency key.
    pub fn idempotent(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        key: &str,
    ) -> Result<Option<serde_json::Value>, LedgerError> {
        Ok(self.idem.get(txn, key)?)
    }

    /// Stores the answer for an idempotency key.
    pub fn put_idempotent(
        &self,
        txn: &mut RwTxn<'_>,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), LedgerError> {
        Ok(self.idem.put(txn, key, value)?)
    }

    /// The registered instrument `id` of funding source `source`, if any.
    pub fn instrument(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        source: &str,
        id: &str,
    ) -> Result<Option<Instrument>, LedgerError> {
        Ok(self.instruments.get(txn, &instrument_key(source, id))?)
    }

    /// Registers an instrument (replacing what was stored under its source and id: callers
    /// check the owner first).
    pub fn put_instrument(&self, txn: &mut RwTxn<'_>, i: &Instrument) -> Result<(), LedgerError> {
        Ok(self
            .instruments
            .put(txn, &instrument_key(&i.source, &i.id), i)?)
    }

    /// Every instrument registered to `owner`.
    pub fn instruments_of(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        owner: &str,
    ) -> Result<Vec<Instrument>, LedgerError> {
        let mut out = Vec::new();
        for item in self.instruments.iter(txn)? {
            let (_, i) = item?;
            if i.owner == owner {
                out.push(i);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postings_balance_to_zero_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = Ledger::open(dir.path(), 16 << 20).unwrap();
            let mut t = l.write().unwrap();
            l.post(&mut t, 1, "issuer:float", "card:01", 1_000, "issue:01")
                .unwrap();
            l.post(&mut t, 2, "funding:card", "card:01", 500, "load:01:1")
                .unwrap();
            l.post(&mut t, 3, "card:01", "operator:metro", 120, "tap:01:2")
                .unwrap();
            assert!(l.post(&mut t, 4, "a", "a", 1, "x").is_err());
            assert!(l.post(&mut t, 4, "a", "b", 0, "x").is_err());
            t.commit().unwrap();
            l.close();
        }
        let l = Ledger::open(dir.path(), 16 << 20).unwrap();
        let r = l.read().unwrap();
        assert_eq!(l.balance(&r, "card:01").unwrap(), 1_380);
        let sum: i64 = l.balances(&r).unwrap().iter().map(|(_, b)| b).sum();
        assert_eq!(sum, 0);
        assert_eq!(l.postings_with_prefix(&r, "load:").unwrap().len(), 1);
    }

    #[test]
    fn one_intent_per_card_counter() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path(), 16 << 20).unwrap();
        let uid = [1u8; 7];
        let mut intent = LoadIntent {
            uid: hex::encode_upper(uid),
            tmc_before: 4,
            attempt: 0,
            balance_before_minor: 10,
            amount_minor: 100,
            key_version: 1,
            funding_source: "card".into(),
            funding_auth: "auth_1".into(),
            instrument: "tok_visa".into(),
            idempotency_key: "k".into(),
            requested_by: "alice".into(),
            state: IntentState::Authorised,
            created_ms: 0,
            settled_ms: None,
            kind: IntentKind::Load,
            reverses_tmc: None,
            reversed_at_tmc: None,
        };
        let mut t = l.write().unwrap();
        l.insert_intent(&mut t, &uid, &mut intent).unwrap();
        assert!(matches!(
            l.insert_intent(&mut t, &uid, &mut intent.clone()),
            Err(LedgerError::IntentExists { .. })
        ));
        let mut other = intent.clone();
        other.tmc_before = 5;
        l.insert_intent(&mut t, &uid, &mut other).unwrap();
        l.insert_intent(&mut t, &[2u8; 7], &mut intent.clone())
            .unwrap();
        // Once voided, the counter takes a new attempt.
        intent.state = IntentState::Voided;
        l.put_intent(&mut t, &uid, &intent).unwrap();
        let mut retry = intent.clone();
        retry.state = IntentState::Authorised;
        l.insert_intent(&mut t, &uid, &mut retry).unwrap();
        assert_eq!(retry.attempt, 1);
        assert_eq!(l.intent(&t, &uid, 4).unwrap().unwrap().attempt, 1);
        t.commit().unwrap();
        let r = l.read().unwrap();
        assert_eq!(l.open_intents(&r, &uid).unwrap().len(), 2);
        assert_eq!(l.all_intents(&r).unwrap().len(), 4);
    }

    #[test]
    fn group_commit_keeps_each_callers_writes_and_rolls_back_only_failures() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path(), 64 << 20).unwrap();
        std::thread::scope(|scope| {
            for i in 0..16u64 {
                let l = l.clone();
                scope.spawn(move || {
                    for j in 0..50u64 {
                        let ok = l.transact(move |c, t| {
                            c.post(
                                t,
                                0,
                                "funding:card",
                                &format!("card:{i}"),
                                10,
                                &format!("load:{i}:{j}"),
                            )?;
                            if j % 10 == 9 {
                                // A failing job: its posting must not survive.
                                return Err(LedgerError::InvalidPosting("injected"));
                            }
                            Ok(())
                        });
                        assert_eq!(ok.is_ok(), j % 10 != 9);
                    }
                });
            }
        });
        l.close();
        let l = Ledger::open(dir.path(), 64 << 20).unwrap();
        let r = l.read().unwrap();
        for i in 0..16u64 {
            assert_eq!(l.balance(&r, &format!("card:{i}")).unwrap(), 450);
        }
        assert_eq!(l.balance(&r, "funding:card").unwrap(), -16 * 450);
        assert_eq!(l.postings_with_prefix(&r, "load:").unwrap().len(), 16 * 45);
    }
}
