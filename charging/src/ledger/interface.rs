//! The ledger's interface: what the load service, clearing, franchise, partner and API code
//! may do with the ledger, in the domain's words, without knowing how it is stored.
//!
//! [`LedgerRead`] is a consistent snapshot (every read in it sees the same committed state).
//! [`LedgerWrite`] is one transaction: whatever a closure given to
//! [`Ledger::transact`](super::Ledger::transact) does through it commits together, or not at
//! all (its failure rolls back only its own writes). The operations are the ledger's
//! transactions' steps — post, book a counter, insert / complete / void an intent, record an
//! anomaly, block a card, sweep the gaps — and the caller composes them into the transaction
//! its rule needs (clearing books a counter, posts the fare and voids a pending load in one).
//! No storage type (an LMDB transaction, a SQL connection) crosses this interface: a second
//! backend implements these two traits and nothing else changes.
//!
//! ## Proofs
//!
//! A card's shadow (its account's value, its counters, what it reported) changes only on a
//! proof: [`LedgerWrite::book_proved`], [`LedgerWrite::post_cleared_tap`] and
//! [`LedgerWrite::post_franchise_load`] take the HSM's [`TmacVerified`],
//! [`LedgerWrite::observe_card`] a [`CardSnapshot`] read under MAC,
//! [`LedgerWrite::complete_intent`] a [`Completion`]; the one exception is a card's issuance
//! ([`LedgerWrite::issue_card`], once per card, before it ever transacted). [`LedgerWrite::post`]
//! refuses a `card:` account ([`LedgerError::CardAccount`]). The primitives underneath (post to
//! any account, book a counter, record a counter, store a shadow, replace an intent) take a
//! [`LedgerOnly`] token
//! that only this module can make, and the trait is sealed, so code outside the ledger can
//! neither call them nor implement the trait to intercept the token:
//!
//! ```compile_fail
//! use charging::ledger::{LedgerOnly, LedgerWrite};
//! fn book_without_proof(t: &mut dyn LedgerWrite) {
//!     // A counter booked with no transaction MAC behind it: refused at compile time.
//!     let _ = t.book_counter(LedgerOnly(()), &[4; 7], 2, 5_900, 5_000, 0);
//! }
//! ```
//!
//! ```compile_fail
//! use charging::ledger::{LedgerOnly, LedgerWrite};
//! fn load_without_proof(t: &mut dyn LedgerWrite) {
//!     // Value posted to a card with no proof: refused at compile time.
//!     let card = "card:04040404040404";
//!     let _ = t.post_any(LedgerOnly(()), charging::ledger::NewPosting::new(0, "funding:card", card, 500, "x"));
//! }
//! ```
//!
//! ```compile_fail
//! use charging::ledger::{LedgerOnly, LedgerWrite, LoadIntent};
//! fn rewrite_intent(t: &mut dyn LedgerWrite, mut intent: LoadIntent) {
//!     // A pending load's amount rewritten behind the card's back: refused at compile time.
//!     intent.amount_minor = 1;
//!     let _ = t.put_intent(LedgerOnly(()), &[4; 7], &intent);
//! }
//! ```
//!
//! ```compile_fail
//! // Nor can another crate implement the trait (and be handed the token): its seal is
//! // private to the ledger.
//! struct Mine;
//! impl charging::ledger::interface::sealed::Sealed for Mine {}
//! ```
//!
//! Posting to a card through the public [`LedgerWrite::post`] compiles and is refused:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use charging::ledger::{card_account, Ledger, LedgerError};
//! let dir = tempfile::tempdir()?;
//! let ledger = Ledger::open(dir.path(), 16 << 20)?;
//! let card = card_account(&[4; 7]);
//! let r = ledger.transact(move |t| t.post(0, "funding:card", &card, 500, "load"));
//! assert!(matches!(r, Err(LedgerError::CardAccount { .. })));
//! # ledger.close();
//! # Ok(()) }
//! ```

use super::records::*;
use super::{card_account, learned_card_key, LearnedCard, LedgerError};
use purse::receipt::TxKind;
use purse::sam::TmacVerified;
use purse::txn::CardSnapshot;

pub mod propagation;
mod steps;

pub use propagation::BlockReach;

/// A posting to make: `amount_minor` from `from` to `to` at `time_ms`, traced by `reference`
/// ([`LedgerWrite::post_any`] numbers it).
#[derive(Clone, Copy, Debug)]
pub struct NewPosting<'a> {
    /// when (unix ms)
    pub time_ms: u64,
    /// debited account
    pub from: &'a str,
    /// credited account
    pub to: &'a str,
    /// minor units
    pub amount_minor: i64,
    /// trace
    pub reference: &'a str,
}

impl<'a> NewPosting<'a> {
    /// The posting of `amount_minor` from `from` to `to`.
    pub fn new(
        time_ms: u64,
        from: &'a str,
        to: &'a str,
        amount_minor: i64,
        reference: &'a str,
    ) -> Self {
        NewPosting {
            time_ms,
            from,
            to,
            amount_minor,
            reference,
        }
    }

    /// The stored posting, numbered `seq`.
    pub fn numbered(&self, seq: u64) -> Posting {
        Posting {
            seq,
            time_ms: self.time_ms,
            from: self.from.to_string(),
            to: self.to.to_string(),
            amount_minor: self.amount_minor,
            reference: self.reference.to_string(),
        }
    }
}

/// What a step is about to read ([`LedgerRead::look_up`]): each read then as the backend's
/// other reads would answer it (the snapshot's, or the latest committed when the look-up was
/// made).
#[derive(Clone, Debug, Default)]
pub struct Lookups {
    /// idempotency keys (their answers)
    pub keys: Vec<String>,
    /// cards (their shadows)
    pub cards: Vec<[u8; 7]>,
    /// cards (their open intents)
    pub open_intents: Vec<[u8; 7]>,
    /// (source, instrument id): registrations
    pub instruments: Vec<(String, String)>,
    /// (source, instrument id, day): day totals
    pub funding_days: Vec<(String, String, u64)>,
}

/// What a transaction is about to read ([`LedgerWrite::prefetch`]).
#[derive(Clone, Debug, Default)]
pub struct ReadsAhead {
    /// cards (their shadows, accounts and gap clocks)
    pub cards: Vec<[u8; 7]>,
    /// idempotency keys
    pub keys: Vec<String>,
    /// card counters (their intents)
    pub counters: Vec<([u8; 7], u32)>,
    /// idempotency keys that exist only once their card has reported their counter (a tap's
    /// clearing marker): (card, counter, key). A backend may take one as absent without
    /// reading it when the card, read ahead too, has no shadow or one whose last counter is
    /// below — provided such a key is then written only by an insert the database refuses if
    /// the key exists (PostgreSQL: a plain `INSERT`, `staged.rs`).
    pub counted_keys: Vec<([u8; 7], u32, String)>,
}

/// What proves that a card made an intent's change — the only ways to complete one
/// ([`LedgerWrite::complete_intent`]).
#[derive(Clone, Copy, Debug)]
pub enum Completion<'a> {
    /// The HSM verified the card's transaction MAC of the change itself (the load's or
    /// reversal's commit answer, or a torn one settled from the card's counter).
    Proved(&'a TmacVerified),
    /// The intent's own record is on the card, read under MAC at a later counter
    /// (`snapshot`): the change left `balance_after_minor`.
    OnCard {
        /// the card's later read
        snapshot: &'a CardSnapshot,
        /// the intent's counter
        tmc_before: u32,
        /// the balance the change left
        balance_after_minor: i32,
    },
    /// Clearing: the card's booked balances across the intent's counter — every one from a
    /// tap whose transaction MAC the HSM verified, `booked` being the one booked now — show
    /// exactly the intent's change.
    AcrossGap {
        /// the verified tap being booked
        booked: &'a TmacVerified,
        /// the intent's counter
        tmc_before: u32,
        /// the balance the change left
        balance_after_minor: i32,
    },
}

impl Completion<'_> {
    /// The card.
    pub fn uid(&self) -> [u8; 7] {
        match self {
            Completion::Proved(p) => p.receipt().uid(),
            Completion::OnCard { snapshot, .. } => snapshot.uid(),
            Completion::AcrossGap { booked, .. } => booked.receipt().uid(),
        }
    }

    /// The intent's counter (the card's counter before the change).
    pub fn tmc_before(&self) -> u32 {
        match self {
            // A committed change consumed counter tmc ≥ 1.
            Completion::Proved(p) => p.receipt().tmc().saturating_sub(1),
            Completion::OnCard { tmc_before, .. } | Completion::AcrossGap { tmc_before, .. } => {
                *tmc_before
            }
        }
    }

    /// The balance the change left on the card.
    pub fn balance_after_minor(&self) -> i32 {
        match self {
            Completion::Proved(p) => p.receipt().balance_after_minor(),
            Completion::OnCard {
                balance_after_minor,
                ..
            }
            | Completion::AcrossGap {
                balance_after_minor,
                ..
            } => *balance_after_minor,
        }
    }
}

/// Reads in one consistent snapshot of the ledger.
pub trait LedgerRead {
    /// Reads `ahead` at once where a backend pays a round trip a read (PostgreSQL: one round
    /// trip for them all); the reads of them that follow are answered from what it read. A
    /// backend that reads from memory (LMDB) does nothing.
    fn look_up(&self, ahead: &Lookups) -> Result<(), LedgerError> {
        let _ = ahead;
        Ok(())
    }

    /// An account's balance.
    fn balance(&self, account: &str) -> Result<i64, LedgerError>;

    /// Every account and its balance.
    fn balances(&self) -> Result<Vec<(String, i64)>, LedgerError>;

    /// Every posting whose reference starts with `prefix` (reports, tests).
    fn postings_with_prefix(&self, prefix: &str) -> Result<Vec<Posting>, LedgerError>;

    /// The card's shadow record.
    fn card(&self, uid: &[u8; 7]) -> Result<CardShadow, LedgerError>;

    /// What was loaded from `key.instrument` at `key.source` on UTC day `key.day` (minor
    /// units).
    fn funding_day_total(&self, key: FundingDay<'_>) -> Result<i64, LedgerError>;

    /// Anomalies numbered above `after`, at most `limit`, and the last number.
    fn anomalies(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, Anomaly)>, u64), LedgerError>;

    /// Every card's shadow record, in UID order, in one `Vec` (reconciliation walks the cards
    /// with [`LedgerRead::cards_after`] instead, a cardholder's cards page reads
    /// [`LedgerRead::cards_of_owner`], the console and the signed blocklist
    /// [`LedgerRead::blocked_cards`] and [`LedgerRead::card_count`]): one page of them all.
    fn all_cards(&self) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        self.cards_after(None, usize::MAX)
    }

    /// The blocked cards' shadows ([`LedgerWrite::set_blocked`]), in UID byte order, read from
    /// an index of the blocked cards (LMDB: its `blocked_cards` database; PostgreSQL: the
    /// partial index `cards_blocked` on the `blocked` column the database computes from the
    /// card's record, migration 7): the reads grow with the blocked cards, not with the
    /// ledger's (the signed blocklist, the console).
    fn blocked_cards(&self) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError>;

    /// How many cards the ledger holds (LMDB: the cards database's entry count, one read;
    /// PostgreSQL: a count of the primary key's index).
    fn card_count(&self) -> Result<u64, LedgerError>;

    /// The UIDs of the cards whose owner is `owner` ([`LedgerWrite::set_owner`]), in UID byte
    /// order, read from an index by owner (LMDB: its `card_owners` database; PostgreSQL: the
    /// index `cards_owner` on the `owner` column the database computes from the card's record,
    /// migration 6): the reads grow with the owner's cards, not with the ledger's (a
    /// cardholder's cards page).
    fn cards_of_owner(&self, owner: &str) -> Result<Vec<[u8; 7]>, LedgerError>;

    /// A page of card shadows: the first `limit` cards whose UID is above `after` (`None`: from
    /// the first card), in UID order — the bytes' order, the same on both backends (LMDB's keys
    /// are the UID's bytes; PostgreSQL's are its 14 uppercase hex digits, which sort as the
    /// bytes do). `after` need not be a card's UID. Walking every card page by page (each page
    /// from the last UID of the one before) in one snapshot reads what [`LedgerRead::all_cards`]
    /// reads, holding a page at a time (reconciliation).
    fn cards_after(
        &self,
        after: Option<[u8; 7]>,
        limit: usize,
    ) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError>;

    /// Block changes after `after`, at most `limit`, and the latest version.
    fn block_changes(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<BlockChange>, u64), LedgerError>;

    /// The card's latest block change (`None`: it never had one): read through a per-card
    /// index (LMDB: `block_changes_by_card`; PostgreSQL: `block_changes_card`), so its cost is
    /// the index lookup, not the number of changes ever made.
    fn latest_block_change(&self, uid: &[u8; 7]) -> Result<Option<BlockChange>, LedgerError>;

    /// The card's block changes, newest first, at most `limit`: read through the same per-card
    /// index, so the cost is the card's changes read, not every change ever made.
    fn card_block_changes(
        &self,
        uid: &[u8; 7],
        limit: usize,
    ) -> Result<Vec<BlockChange>, LedgerError>;

    /// The card's anomalies among the newest `within` (by number), newest first. Neither
    /// backend indexes anomalies by card: this is a bounded reverse scan of at most `within`
    /// anomalies (LMDB: a cursor back from the last number; PostgreSQL: the primary key's range
    /// above `last - within`), so an older anomaly of the card is not listed.
    fn card_anomalies(
        &self,
        uid: &[u8; 7],
        within: u64,
    ) -> Result<Vec<(u64, Anomaly)>, LedgerError>;

    /// How far the blocklist versions reached the validators, as each gateway last reported
    /// ([`propagation`]): per gateway (by name), its figures by version, oldest first.
    fn block_propagation(&self) -> Result<Vec<(String, Vec<BlockReach>)>, LedgerError> {
        propagation::all(self)
    }

    /// A voucher by code.
    fn voucher(&self, code: &str) -> Result<Option<Voucher>, LedgerError>;

    /// Whether the card has a shadow record.
    fn card_known(&self, uid: &[u8; 7]) -> Result<bool, LedgerError>;

    /// Every intent at (card, counter), by attempt.
    fn intents_at(&self, uid: &[u8; 7], tmc_before: u32) -> Result<Vec<LoadIntent>, LedgerError>;

    /// The live intent at (card, counter), or else the latest voided one.
    fn intent(&self, uid: &[u8; 7], tmc_before: u32) -> Result<Option<LoadIntent>, LedgerError> {
        let mut all = self.intents_at(uid, tmc_before)?;
        match all.iter().position(|i| i.state != IntentState::Voided) {
            Some(live) => Ok(Some(all.swap_remove(live))),
            None => Ok(all.pop()),
        }
    }

    /// A card's intents that are not settled yet.
    fn open_intents(&self, uid: &[u8; 7]) -> Result<Vec<LoadIntent>, LedgerError>;

    /// All intents (reports, reconciliation).
    fn all_intents(&self) -> Result<Vec<LoadIntent>, LedgerError>;

    /// The stored answer for an idempotency key.
    fn idempotent(&self, key: &str) -> Result<Option<serde_json::Value>, LedgerError>;

    /// The state clearing learned the card from, if it learned it ([`LearnedCard`]).
    fn learned_card(&self, uid: &[u8; 7]) -> Result<Option<LearnedCard>, LedgerError> {
        Ok(self
            .idempotent(&learned_card_key(uid))?
            .and_then(|v| serde_json::from_value(v).ok()))
    }

    /// Whether the card's change at counter `tmc` happened before the state clearing learned
    /// the card from: its value is inside the balance the card was issued with from
    /// `issuer:float`, so the card side of its posting is `issuer:float`, not the card.
    fn changed_before_learned(&self, uid: &[u8; 7], tmc: u32) -> Result<bool, LedgerError> {
        Ok(self.learned_card(uid)?.is_some_and(|l| tmc < l.tmc))
    }

    /// The registered instrument `id` of funding source `source`, if any.
    fn instrument(&self, source: &str, id: &str) -> Result<Option<Instrument>, LedgerError>;

    /// Every instrument registered to `owner`.
    fn instruments_of(&self, owner: &str) -> Result<Vec<Instrument>, LedgerError>;

    /// A payment by id.
    fn payment(&self, id: &str) -> Result<Option<Payment>, LedgerError>;

    /// The id of `merchant`'s payment for `order_id`, if it made one.
    fn payment_for_order(
        &self,
        merchant: &str,
        order_id: &str,
    ) -> Result<Option<String>, LedgerError>;

    /// A refund by id.
    fn refund(&self, id: &str) -> Result<Option<Refund>, LedgerError>;

    /// Refunds not collected (`pending`) made at or before `made_by_ms`, oldest first, at
    /// most `limit` (an index by the time they were made: the expiry sweep reads only these).
    fn refunds_uncollected(
        &self,
        made_by_ms: u64,
        limit: usize,
    ) -> Result<Vec<Refund>, LedgerError>;

    /// The notification of a payment's outcome.
    fn notification(&self, payment_id: &str) -> Result<Option<Notification>, LedgerError>;

    /// Undelivered notifications due at `now_ms`, at most `limit`.
    fn notifications_due(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Notification>, LedgerError>;
}

/// A token only this module can make: the ledger's primitives that change a card's shadow
/// without a proof take it, so only the proof-taking steps of [`LedgerWrite`] call them.
#[derive(Debug)]
pub struct LedgerOnly(());

/// The seal: only the ledger's backends implement [`LedgerWrite`] (another implementation
/// would be handed [`LedgerOnly`] tokens).
pub(super) mod sealed {
    /// Implemented by the ledger's own write transactions only.
    pub trait Sealed {}
}

/// The longest owner a card may have, in bytes ([`LedgerWrite::set_owner`]): LMDB's keys hold at
/// most 511 bytes, and the index by owner keys the owner, a separator and the UID.
pub const MAX_OWNER_BYTES: usize = 256;

/// Refuses an owner the index by owner cannot key: a NUL byte (LMDB's key separates the owner
/// from the UID with one) or more than [`MAX_OWNER_BYTES`]. [`LedgerWrite::set_owner`] checks
/// it; the API checks it too, before it registers a card with that owner.
pub fn check_owner(owner: &str) -> Result<(), LedgerError> {
    if owner.as_bytes().contains(&0) {
        return Err(LedgerError::InvalidOwner(
            "a card's owner holds no NUL byte",
        ));
    }
    if owner.len() > MAX_OWNER_BYTES {
        return Err(LedgerError::InvalidOwner(
            "a card's owner is at most 256 bytes",
        ));
    }
    Ok(())
}

/// A page of cards: (UID, shadow), in UID byte order.
pub type CardPage = Vec<([u8; 7], CardShadow)>;

/// Walks every card a page of `page` (at least 1) at a time, in UID byte order from the first:
/// `next(ctx, after, page)` reads the cards above `after` (a backend's `cards_after`), and
/// `each(ctx, cards)` takes each page; the walk ends after a page shorter than `page`. `ctx`
/// is what both need, `each` mutably (an index build's write transaction, a report).
pub fn walk_card_pages<C: ?Sized, E>(
    ctx: &mut C,
    page: usize,
    mut next: impl FnMut(&C, Option<[u8; 7]>, usize) -> Result<CardPage, E>,
    mut each: impl FnMut(&mut C, &[([u8; 7], CardShadow)]) -> Result<(), E>,
) -> Result<(), E> {
    let page = page.max(1);
    let mut after = None;
    loop {
        let cards = next(ctx, after, page)?;
        each(ctx, &cards)?;
        match cards.last() {
            Some(&(last, _)) if cards.len() == page => after = Some(last),
            _ => return Ok(()),
        }
    }
}

/// Whether an account is a card's shadow purse.
fn is_card_account(account: &str) -> bool {
    account.starts_with("card:")
}

/// One write transaction of the ledger (it reads its own writes).
pub trait LedgerWrite: LedgerRead + sealed::Sealed {
    /// Posts `amount_minor` from `from` to `to`, neither of them a card: value reaches or
    /// leaves a card only on a proof (the proof-taking steps below), or at its issuance.
    fn post(
        &mut self,
        time_ms: u64,
        from: &str,
        to: &str,
        amount_minor: i64,
        reference: &str,
    ) -> Result<Posting, LedgerError> {
        if let Some(account) = [from, to].into_iter().find(|a| is_card_account(a)) {
            return Err(LedgerError::CardAccount {
                account: account.to_string(),
            });
        }
        let entry = NewPosting::new(time_ms, from, to, amount_minor, reference);
        self.post_any(LedgerOnly(()), entry)
    }

    /// Posts between any two accounts, cards included (the ledger's own steps only): a
    /// positive amount between two different accounts, refused if either balance would leave
    /// i64 (then nothing moves and the transaction goes on).
    fn post_any(&mut self, _: LedgerOnly, entry: NewPosting<'_>) -> Result<Posting, LedgerError> {
        super::rules::check_posting(entry.from, entry.to, entry.amount_minor)?;
        self.append_posting(LedgerOnly(()), entry)
    }

    /// Numbers and stores a checked posting and moves both balances, unless one would leave
    /// i64 ([`LedgerError::InvalidPosting`], nothing changed) (the ledger's own steps only:
    /// [`LedgerWrite::post_any`] checks it first).
    fn append_posting(
        &mut self,
        token: LedgerOnly,
        entry: NewPosting<'_>,
    ) -> Result<Posting, LedgerError>;

    /// A hint, changing nothing: the transaction is about to read these cards (their shadows
    /// and accounts), idempotency answers and card counters' intents — a backend that pays a
    /// round trip per read reads them in one go. Clearing gives its batch's.
    fn prefetch(&mut self, ahead: &ReadsAhead) -> Result<(), LedgerError> {
        let _ = ahead;
        Ok(())
    }

    /// Records that the card's transaction at counter `tmc` (leaving `balance_after_minor`) is
    /// booked. Counters only advance `booked_through_tmc` when contiguous; a counter booked
    /// above a gap starts the gap's clock (`now_ms`) for [`LedgerWrite::sweep_gaps`]. The
    /// ledger's own steps only: the services book through [`LedgerWrite::book_proved`] and
    /// [`LedgerWrite::complete_intent`].
    fn book_counter(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        tmc: u32,
        balance_after_minor: i32,
        delta_minor: i64,
        now_ms: u64,
    ) -> Result<Booking, LedgerError> {
        steps::book(self, uid, (tmc, balance_after_minor, delta_minor), now_ms)
    }

    /// The card's gap clock, if a counter is booked above a gap (the ledger's own steps).
    fn counter_gap(&self, uid: &[u8; 7]) -> Result<Option<GapClock>, LedgerError>;

    /// Every gap clock the sweep has not reported yet, by card.
    fn unreported_gaps(&self) -> Result<Vec<([u8; 7], GapClock)>, LedgerError>;

    /// Stores the card's gap clock, or removes it (`None`) (the ledger's own steps only).
    fn put_gap(
        &mut self,
        token: LedgerOnly,
        uid: &[u8; 7],
        clock: Option<&GapClock>,
    ) -> Result<(), LedgerError>;

    /// Appends a block change, numbered next in the one series of versions, and returns its
    /// version (the ledger's own steps only: [`LedgerWrite::set_blocked`] decides).
    fn append_block_change(
        &mut self,
        token: LedgerOnly,
        change: BlockChange,
    ) -> Result<u64, LedgerError>;

    /// Records a counter and balance the card reported (the ledger's own steps only: the
    /// services record a [`CardSnapshot`] with [`LedgerWrite::observe_card`]).
    fn observe_counter(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        tmc: u32,
        balance_minor: i32,
    ) -> Result<CardShadow, LedgerError> {
        steps::observe(self, uid, tmc, balance_minor)
    }

    /// Stores a payment and indexes it by (merchant, order) (the ledger's own steps only: a
    /// payment completes only with its intent).
    fn put_payment(&mut self, token: LedgerOnly, payment: &Payment) -> Result<(), LedgerError>;

    /// Makes a merchant's payment, or returns the one it already made for that order (and
    /// `false`).
    fn create_payment(&mut self, payment: &Payment) -> Result<(Payment, bool), LedgerError> {
        if let Some(id) = self.payment_for_order(&payment.merchant, &payment.order_id)? {
            if let Some(p) = self.payment(&id)? {
                return Ok((p, false));
            }
        }
        if payment.state != PaymentState::Open || payment.card_uid.is_some() {
            return Err(LedgerError::InvalidPosting(
                "a new payment is open and unpaid",
            ));
        }
        self.put_payment(LedgerOnly(()), payment)?;
        Ok((payment.clone(), true))
    }

    /// Records a card's payment intent (`intent.payment_id` names the payment, which must be
    /// open and unexpired at `now_ms`): the payment becomes pending at the intent's card and
    /// counter, in the same transaction; [`LedgerWrite::complete_intent`] completes both,
    /// [`LedgerWrite::void_intent`] opens the payment again.
    fn begin_payment(
        &mut self,
        uid: &[u8; 7],
        intent: &mut LoadIntent,
        now_ms: u64,
    ) -> Result<Payment, LedgerError> {
        let id = intent.payment_id.clone().unwrap_or_default();
        let mut p = self
            .payment(&id)?
            .ok_or_else(|| LedgerError::PaymentNotOpen {
                id: id.clone(),
                why: "no such payment".into(),
            })?;
        let why = match p.state {
            PaymentState::Open if now_ms > p.expires_ms => Some("it expired".to_string()),
            PaymentState::Open => None,
            PaymentState::Pending => Some("another card's payment of it is in progress".into()),
            PaymentState::Completed => Some("it is paid".into()),
        };
        if let Some(why) = why {
            return Err(LedgerError::PaymentNotOpen { id, why });
        }
        if intent.kind != IntentKind::Payment || intent.amount_minor != p.amount_minor {
            return Err(LedgerError::InvalidPosting(
                "the intent is not this payment's",
            ));
        }
        self.insert_intent(uid, intent)?;
        p.state = PaymentState::Pending;
        p.card_uid = Some(hex::encode_upper(uid));
        p.tmc = intent.tmc_before.checked_add(1);
        self.put_payment(LedgerOnly(()), &p)?;
        Ok(p)
    }

    /// Stores a refund (the ledger's own steps only: a refund moves value only with its
    /// posting, or the card's proof).
    fn put_refund(&mut self, token: LedgerOnly, refund: &Refund) -> Result<(), LedgerError>;

    /// Makes a merchant's refund of its completed payment `refund.payment_id` (paid at most
    /// `window_ms` before `now_ms`), no more than what was paid less what was refunded
    /// already: the refund's value moves `merchant:<id>` → `refunds:pending` now (so it is
    /// never settled to the merchant) and reaches the card when the card collects it.
    fn create_refund(
        &mut self,
        refund: &Refund,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<Refund, LedgerError> {
        let refused = |why: String| Err(LedgerError::RefundRefused(why));
        let Some(mut p) = self
            .payment(&refund.payment_id)?
            .filter(|p| p.merchant == refund.merchant)
        else {
            return refused(format!("no payment {}", refund.payment_id));
        };
        let (Some(card), Some(paid_ms)) = (p.card_uid.clone(), p.paid_ms) else {
            return refused("the payment is not paid".into());
        };
        if p.state != PaymentState::Completed {
            return refused("the payment is not paid".into());
        }
        if now_ms.saturating_sub(paid_ms) > window_ms {
            return refused(format!(
                "paid {} h ago; payments are refunded within {} h",
                now_ms.saturating_sub(paid_ms) / 3_600_000,
                window_ms / 3_600_000
            ));
        }
        let left = i64::from(p.amount_minor) - p.refunded_minor;
        if refund.amount_minor <= 0 || i64::from(refund.amount_minor) > left {
            return refused(format!(
                "{} is not between 1 and the {left} left to refund",
                refund.amount_minor
            ));
        }
        p.refunded_minor += i64::from(refund.amount_minor);
        self.put_payment(LedgerOnly(()), &p)?;
        self.post(
            now_ms,
            &format!("merchant:{}", p.merchant),
            "refunds:pending",
            i64::from(refund.amount_minor),
            &format!("refund-made:{}", refund.id),
        )?;
        let made = Refund {
            card_uid: card,
            state: RefundState::Pending,
            created_ms: now_ms,
            tmc: None,
            credited_ms: None,
            ..refund.clone()
        };
        self.put_refund(LedgerOnly(()), &made)?;
        Ok(made)
    }

    /// Records a card's collection of a refund (`intent.payment_id` names it): the refund must
    /// be pending and this card's; it becomes collecting at the intent's counter, in the same
    /// transaction.
    fn begin_refund(
        &mut self,
        uid: &[u8; 7],
        intent: &mut LoadIntent,
    ) -> Result<Refund, LedgerError> {
        let id = intent.payment_id.clone().unwrap_or_default();
        let refused = |why: &str| Err(LedgerError::RefundRefused(why.to_string()));
        let Some(mut r) = self.refund(&id)? else {
            return refused("no such refund");
        };
        if r.card_uid != hex::encode_upper(uid) {
            return refused("the refund goes to the card that paid");
        }
        match r.state {
            RefundState::Pending => {}
            RefundState::Collecting => return refused("it is being collected"),
            RefundState::Credited => return refused("it is collected"),
            RefundState::Expired => {
                return refused("it expired uncollected; its value went back to the merchant")
            }
        }
        if intent.kind != IntentKind::Refund || intent.amount_minor != r.amount_minor {
            return Err(LedgerError::InvalidPosting(
                "the intent is not this refund's",
            ));
        }
        self.insert_intent(uid, intent)?;
        r.state = RefundState::Collecting;
        r.tmc = intent.tmc_before.checked_add(1);
        self.put_refund(LedgerOnly(()), &r)?;
        Ok(r)
    }

    /// A refund still `pending` (not collected, no collection in progress) expires: its value
    /// goes back `refunds:pending` → `merchant:<id>` (reference `refund-expired:<id>`), the
    /// payment's `refunded_minor` gives it back, and the refund is `expired` — in this
    /// transaction. Any other refund is left as it is (`None`).
    fn expire_refund(&mut self, id: &str, now_ms: u64) -> Result<Option<Refund>, LedgerError> {
        let Some(mut r) = self.refund(id)? else {
            return Ok(None);
        };
        if r.state != RefundState::Pending {
            return Ok(None);
        }
        let amount = i64::from(r.amount_minor);
        self.post(
            now_ms,
            "refunds:pending",
            &format!("merchant:{}", r.merchant),
            amount,
            &format!("refund-expired:{}", r.id),
        )?;
        if let Some(mut p) = self.payment(&r.payment_id)? {
            p.refunded_minor = (p.refunded_minor - amount).max(0);
            self.put_payment(LedgerOnly(()), &p)?;
        }
        r.state = RefundState::Expired;
        r.expired_ms = Some(now_ms);
        self.put_refund(LedgerOnly(()), &r)?;
        Ok(Some(r))
    }

    /// Stores a notification's delivery state.
    fn put_notification(&mut self, n: &Notification) -> Result<(), LedgerError>;

    /// Stores the card's shadow record (the ledger's own steps only).
    fn put_card(
        &mut self,
        token: LedgerOnly,
        uid: &[u8; 7],
        shadow: &CardShadow,
    ) -> Result<(), LedgerError>;

    /// Adds `delta_minor` to that day's total.
    fn add_funding_day(
        &mut self,
        key: FundingDay<'_>,
        delta_minor: i64,
    ) -> Result<(), LedgerError> {
        steps::add_funding_day(self, key, delta_minor)
    }

    /// Adds `delta_minor` to that day's total unless the total would pass `max_minor`: then
    /// nothing changes and the answer is the total so far. A backend may raise it in one
    /// statement that reads nothing first (PostgreSQL: no read of the totals' index for a
    /// concurrent transaction's insert to conflict with).
    fn add_funding_day_within(
        &mut self,
        key: FundingDay<'_>,
        delta_minor: i64,
        max_minor: i64,
    ) -> Result<Result<(), i64>, LedgerError> {
        let so_far = self.funding_day_total(key)?;
        if so_far.saturating_add(delta_minor) > max_minor {
            return Ok(Err(so_far));
        }
        steps::add_funding_day(self, key, delta_minor).map(Ok)
    }

    /// Stores a day total: (funding source, instrument, UTC day) → minor units (the ledger's
    /// own steps only: [`LedgerWrite::add_funding_day`]).
    fn put_funding_day(
        &mut self,
        token: LedgerOnly,
        key: FundingDay<'_>,
        total_minor: i64,
    ) -> Result<(), LedgerError>;

    /// Appends an anomaly (numbered from 1) and returns its number.
    fn record_anomaly(&mut self, a: &crate::clearing::Anomaly) -> Result<u64, LedgerError>;

    /// A counter gap that never fills: every card whose lowest gap has been open longer than
    /// `older_than_ms` is reported once as a `counter_gap` anomaly. When the card's own proved
    /// balances show value *appearing* across the gap (more than the booked changes explain)
    /// and no load is pending there, the card is blocked ([`GAP_BLOCK_REASON`]): a credit the
    /// back office never made is a cloned card or a leaked key; if the gap later fills with
    /// proved transactions (a franchise terminal reporting late), the block is lifted. Missing
    /// debits (value that left the card at a terminal whose taps never arrived) are the
    /// operator's loss, not the cardholder's fault, and a pending load or reversal in the gap
    /// waits for the card: both are reported, not blocked. Returns the anomalies raised.
    fn sweep_gaps(&mut self, now_ms: u64, older_than_ms: u64) -> Result<GapSweep, LedgerError> {
        steps::sweep_gaps(self, now_ms, older_than_ms)
    }

    /// Keeps `gateway`'s figures of how far blocklist versions reached its validators (each
    /// replacing the one it reported before for that version; the newest
    /// [`propagation::KEPT_VERSIONS`] versions kept). Returns how many versions are kept.
    fn record_block_propagation(
        &mut self,
        gateway: &str,
        figures: &[BlockReach],
        now_ms: u64,
    ) -> Result<usize, LedgerError> {
        propagation::record(self, gateway, figures, now_ms)
    }

    /// Blocks or unblocks a card, appending a numbered change when its state changes.
    /// Returns the new version, or `None` when the card already was in that state.
    fn set_blocked(
        &mut self,
        uid: &[u8; 7],
        blocked: bool,
        reason: &str,
        time_ms: u64,
    ) -> Result<Option<u64>, LedgerError> {
        steps::set_blocked(self, uid, blocked, reason, time_ms)
    }

    /// Stores a voucher.
    fn put_voucher(&mut self, v: &Voucher) -> Result<(), LedgerError>;

    /// Records what a card reported: its counter and balance, read under MAC by a dialogue.
    fn observe_card(&mut self, snapshot: &CardSnapshot) -> Result<CardShadow, LedgerError> {
        self.observe_counter(
            LedgerOnly(()),
            &snapshot.uid(),
            snapshot.tmc(),
            snapshot.balance_minor(),
        )
    }

    /// Issues a newly personalised card: posts its personalised value `issuer:float` →
    /// `card:<UID>` and starts its shadow there. A card already known is left as it is
    /// (returns `false`): its value changes only on proofs from then on.
    fn issue_card(
        &mut self,
        uid: &[u8; 7],
        personalised_minor: i32,
        reference: &str,
        now_ms: u64,
    ) -> Result<bool, LedgerError> {
        if self.card_known(uid)? {
            return Ok(false);
        }
        if personalised_minor < 0 {
            return Err(LedgerError::InvalidPosting(
                "a card's personalised value is not negative",
            ));
        }
        if personalised_minor > 0 {
            let card = card_account(uid);
            let value = i64::from(personalised_minor);
            let entry = NewPosting::new(now_ms, "issuer:float", &card, value, reference);
            self.post_any(LedgerOnly(()), entry)?;
        }
        let shadow = CardShadow {
            booked_balance_minor: Some(personalised_minor),
            ..Default::default()
        };
        self.put_card(LedgerOnly(()), uid, &shadow)?;
        Ok(true)
    }

    /// Sets the cardholder who may report the card lost or stolen (and who sees it on the
    /// cardholder's cards page, [`LedgerRead::cards_of_owner`]). An owner holding a NUL byte
    /// or longer than [`MAX_OWNER_BYTES`] is refused ([`LedgerError::InvalidOwner`]): the
    /// index by owner could not key it.
    fn set_owner(&mut self, uid: &[u8; 7], owner: &str) -> Result<(), LedgerError> {
        check_owner(owner)?;
        let before = self.card(uid)?;
        let shadow = CardShadow {
            owner: Some(owner.to_string()),
            ..before.clone()
        };
        self.index_card(LedgerOnly(()), uid, &before, &shadow)?;
        self.put_card(LedgerOnly(()), uid, &shadow)
    }

    /// Moves the card's entries in the indexes of cards (by owner, blocked) from its shadow
    /// `before` to `after`, which is about to be written (the ledger's own steps only, those
    /// that change what is indexed: [`LedgerWrite::set_owner`], [`LedgerWrite::set_blocked`]).
    /// A backend whose indexes follow the stored shadow (PostgreSQL's are on columns the
    /// database computes from the card's record) does nothing.
    fn index_card(
        &mut self,
        token: LedgerOnly,
        uid: &[u8; 7],
        before: &CardShadow,
        after: &CardShadow,
    ) -> Result<(), LedgerError>;

    /// Sets (or replaces, unlocking it) the card's PIN for online payments.
    fn set_payment_pin(&mut self, uid: &[u8; 7], pin: &PaymentPin) -> Result<(), LedgerError> {
        let mut shadow = self.card(uid)?;
        shadow.payment_pin = Some(pin.clone());
        self.put_card(LedgerOnly(()), uid, &shadow)
    }

    /// Checks `pin` against the card's payment PIN: a wrong one counts towards the lock, a
    /// right one (while not locked) clears the count. Returns whether it was accepted.
    fn check_payment_pin(&mut self, uid: &[u8; 7], pin: &str) -> Result<bool, LedgerError> {
        let mut shadow = self.card(uid)?;
        let Some(p) = shadow.payment_pin.as_mut() else {
            return Ok(true);
        };
        let ok = p.failures < PaymentPin::MAX_FAILURES && p.matches(pin);
        let failures = if ok { 0 } else { p.failures.saturating_add(1) };
        if failures != p.failures {
            p.failures = failures;
            self.put_card(LedgerOnly(()), uid, &shadow)?;
        }
        Ok(ok)
    }

    /// Counts `amount_minor` into the card's loads of UTC day `day` (the per-card daily
    /// limit), starting the day's count afresh on a new day.
    fn add_load_day(
        &mut self,
        uid: &[u8; 7],
        day: u64,
        amount_minor: i64,
    ) -> Result<CardShadow, LedgerError> {
        let mut shadow = self.card(uid)?;
        if shadow.load_day != day {
            shadow.load_day = day;
            shadow.load_day_minor = 0;
        }
        shadow.load_day_minor = shadow
            .load_day_minor
            .checked_add(amount_minor)
            .ok_or(LedgerError::InvalidPosting("a day total would overflow"))?;
        self.put_card(LedgerOnly(()), uid, &shadow)?;
        Ok(shadow)
    }

    /// Records a new load intent; refuses it while a live (authorised or completed) intent
    /// exists for the same card counter. Sets `intent.attempt`.
    fn insert_intent(&mut self, uid: &[u8; 7], intent: &mut LoadIntent) -> Result<(), LedgerError> {
        steps::insert_intent(self, uid, intent)
    }

    /// Stores `intent` as the first attempt (0) at its card counter if the counter has no
    /// intent yet, without reading the counter's intents first: whether it did (`false`: the
    /// counter has intents, or the backend does not do this; [`LedgerWrite::insert_intent`]
    /// then reads them). The ledger's own steps only.
    fn put_first_intent(
        &mut self,
        token: LedgerOnly,
        uid: &[u8; 7],
        intent: &LoadIntent,
    ) -> Result<bool, LedgerError> {
        let _ = (token, uid, intent);
        Ok(false)
    }

    /// Replaces an intent (same card, counter and attempt). The ledger's own steps only: an
    /// intent's amount, kind and funding are fixed when it is inserted; its state changes
    /// through [`LedgerWrite::complete_intent`] and [`LedgerWrite::void_intent`], a load's
    /// reversal mark through [`LedgerWrite::mark_load_reversing`].
    fn put_intent(
        &mut self,
        token: LedgerOnly,
        uid: &[u8; 7],
        intent: &LoadIntent,
    ) -> Result<(), LedgerError>;

    /// Marks the completed load whose change consumed counter `load_tmc` as being taken back
    /// by the reversal whose change will consume `reversal_tmc` (voiding that reversal clears
    /// the mark again). Refused unless the load is completed and not marked already. Returns
    /// the load as marked.
    fn mark_load_reversing(
        &mut self,
        uid: &[u8; 7],
        load_tmc: u32,
        reversal_tmc: u32,
    ) -> Result<LoadIntent, LedgerError> {
        let refused = |why: &'static str| LedgerError::NotReversible {
            uid: hex::encode_upper(uid),
            tmc: load_tmc,
            why,
        };
        let load = match load_tmc.checked_sub(1) {
            Some(before) => self.intent(uid, before)?,
            None => None,
        };
        let Some(mut load) = load.filter(|i| i.kind == IntentKind::Load) else {
            return Err(refused("no load there"));
        };
        if load.state != IntentState::Completed {
            return Err(refused("the load is not completed"));
        }
        if load.reversed_at_tmc.is_some() {
            return Err(refused("another reversal took it back or is in progress"));
        }
        load.reversed_at_tmc = Some(reversal_tmc);
        self.put_intent(LedgerOnly(()), uid, &load)?;
        Ok(load)
    }

    /// The card proved the intent's change (`proof`: its counter and the balance it left):
    /// posts it (a load funding → card, a reversal card → funding; for a change made before
    /// the state clearing learned the card from, [`LedgerRead::changed_before_learned`],
    /// `issuer:float` stands in for the card), marks the intent completed and books the
    /// counter. Returns what to do with the funding once the
    /// transaction is durable, or `None` if it was already completed.
    fn complete_intent(
        &mut self,
        proof: Completion<'_>,
        now_ms: u64,
    ) -> Result<Option<FundingAction>, LedgerError> {
        steps::complete_intent(self, proof, now_ms)
    }

    /// Books a card transaction the HSM proved (a cleared tap, a franchise load): the card's
    /// shadow observes its counter and balance, and the counter is booked once with its
    /// change.
    fn book_proved(&mut self, proof: &TmacVerified, now_ms: u64) -> Result<Booking, LedgerError> {
        let r = proof.receipt();
        let uid = r.uid();
        self.observe_counter(LedgerOnly(()), &uid, r.tmc(), r.balance_after_minor())?;
        let delta = match r.kind() {
            TxKind::Debit => -i64::from(r.amount_minor()),
            TxKind::LimitedCredit | TxKind::Credit => i64::from(r.amount_minor()),
            TxKind::RecordOnly => 0,
        };
        self.book_counter(
            LedgerOnly(()),
            &uid,
            r.tmc(),
            r.balance_after_minor(),
            delta,
            now_ms,
        )
    }

    /// Posts a cleared tap's revenue, proved by the HSM: a fare `card:<UID>` →
    /// `operator:<operator>`, a limited credit (an undone fare) back; a record-only tap posts
    /// nothing.
    fn post_cleared_tap(
        &mut self,
        proof: &TmacVerified,
        operator: &str,
        reference: &str,
        now_ms: u64,
    ) -> Result<(), LedgerError> {
        let r = proof.receipt();
        let (card, op) = (card_account(&r.uid()), format!("operator:{operator}"));
        let amount = i64::from(r.amount_minor());
        let (from, to) = match r.kind() {
            TxKind::Debit if amount > 0 => (&card, &op),
            TxKind::LimitedCredit if amount > 0 => (&op, &card),
            _ => return Ok(()),
        };
        self.post_any(
            LedgerOnly(()),
            NewPosting::new(now_ms, from, to, amount, reference),
        )?;
        Ok(())
    }

    /// Posts a franchise terminal's offline load, proved by the HSM (its transaction MAC bound
    /// to the franchise SAM's reader id): `franchise:<name>` → `card:<UID>`; or, for a load
    /// made before the state clearing learned the card from
    /// ([`LedgerRead::changed_before_learned`]), `franchise:<name>` → `issuer:float`: the card
    /// was issued with a balance that already held the load, so the franchise pays back the
    /// float that funded it and the card is not credited twice.
    fn post_franchise_load(
        &mut self,
        proof: &TmacVerified,
        franchise: &str,
        reference: &str,
        now_ms: u64,
    ) -> Result<Posting, LedgerError> {
        let r = proof.receipt();
        let uid = r.uid();
        let to = if self.changed_before_learned(&uid, r.tmc())? {
            "issuer:float".to_string()
        } else {
            card_account(&uid)
        };
        let from = format!("franchise:{franchise}");
        let amount = i64::from(r.amount_minor());
        self.post_any(
            LedgerOnly(()),
            NewPosting::new(now_ms, &from, &to, amount, reference),
        )
    }

    /// Posts an action-list order a validator credited at a tap, proved by the HSM (the
    /// card's transaction MAC over the Credit): `from` (the orders' escrow, `orders:pending`)
    /// → `card:<UID>`; for a credit made before the state clearing learned the card from,
    /// `from` → `issuer:float` (the card's issued balance already held it), as for a franchise
    /// load. Only a Credit posts.
    fn post_order_pickup(
        &mut self,
        proof: &TmacVerified,
        from: &str,
        reference: &str,
        now_ms: u64,
    ) -> Result<Posting, LedgerError> {
        let r = proof.receipt();
        if r.kind() != TxKind::Credit {
            return Err(LedgerError::InvalidPosting(
                "an order is picked up by a credit only",
            ));
        }
        let uid = r.uid();
        let to = if self.changed_before_learned(&uid, r.tmc())? {
            "issuer:float".to_string()
        } else {
            card_account(&uid)
        };
        let amount = i64::from(r.amount_minor());
        self.post_any(
            LedgerOnly(()),
            NewPosting::new(now_ms, from, &to, amount, reference),
        )
    }

    /// The card never applied the intent's change: marks it voided (a load's day
    /// total is given back; a reversal frees its load to be reversed again). Returns what to
    /// do with the funding once the transaction is durable, or `None` if it was not open.
    fn void_intent(
        &mut self,
        uid: &[u8; 7],
        tmc_before: u32,
        now_ms: u64,
    ) -> Result<Option<FundingAction>, LedgerError> {
        steps::void_intent(self, uid, tmc_before, now_ms)
    }

    /// Stores the answer for an idempotency key.
    fn put_idempotent(&mut self, key: &str, value: &serde_json::Value) -> Result<(), LedgerError>;

    /// Stores `value` under `key` unless an answer is stored there already: whether it did
    /// (nothing changes when it did not). A backend may claim the key by an insert that
    /// reads nothing first (PostgreSQL: `INSERT … ON CONFLICT DO NOTHING`).
    fn claim_idempotent(
        &mut self,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<bool, LedgerError> {
        if self.idempotent(key)?.is_some() {
            return Ok(false);
        }
        self.put_idempotent(key, value)?;
        Ok(true)
    }

    /// Registers an instrument (replacing what was stored under its source and id: callers
    /// check the owner first).
    fn put_instrument(&mut self, i: &Instrument) -> Result<(), LedgerError>;
}
