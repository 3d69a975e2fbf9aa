//! One write transaction ([`PgWrite`]) and the loop that runs a closure in it, again on a
//! conflict ([`run`]). Only the storage is here: the ledger's steps (`interface/steps.rs`) are
//! the LMDB backend's, run over these reads and writes; every refusal is decided before a
//! statement could fail, so a refused step leaves the transaction usable, as under LMDB.
//!
//! At `READ COMMITTED` (a closure wrapped by [`super::read_committed`]) the reads follow the
//! locking rule (`docs/postgres.md`, "Locking rule"): a card's row, the intents at a counter, an
//! answer under a key and a gap clock are read `FOR UPDATE` (a prefetch locks its cards' rows,
//! in uid order, before it reads anything of them); a balance shard is read only to check its
//! range and moved by `balance + delta`; a day total is raised by one conditional upsert; an
//! intent is updated where it was read locked or inserted plainly; a card with no row is locked
//! by a neutral row inserted in its place, deleted before `COMMIT` unless the card was written.
//! Any other read (through [`PgWrite::q`]), a prefetch of a card with no row and an intent
//! written at a counter not read abort the attempt, which runs again at `SERIALIZABLE`.

use super::db::{Commit, Param};
use super::read::{big, q, uid_hex, unbig};
use super::staged::Staged;
use super::{
    backoff, db_error, past, retryable, Db, Isolation, LedgerError, Session, MAX_ATTEMPTS,
};
use crate::ledger::interface::{LedgerOnly, LedgerWrite, NewPosting};
use crate::ledger::records::*;
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Transactions run again in this process (conflicts, lost connections, and `READ COMMITTED`
/// attempts run again at `SERIALIZABLE`).
pub(super) static RETRIES: AtomicU64 = AtomicU64::new(0);

/// What a closure running on this thread may choose of its transaction's isolation.
#[derive(Clone, Copy)]
enum Choice {
    /// No transaction of this backend runs here (an LMDB committer's thread, say).
    Closed,
    /// A transaction runs; its `BEGIN` (at this isolation) is not sent yet, or was.
    Open(Isolation),
    /// A transaction runs again at `SERIALIZABLE` (its attempt at `READ COMMITTED` read
    /// outside the locking rule): the closure's choice is not taken.
    Forced,
}

thread_local! {
    static CHOICE: Cell<Choice> = const { Cell::new(Choice::Closed) };
}

/// The closure running on this thread asks for `isolation` (before its first statement; later
/// the `BEGIN` is sent already and it changes nothing).
pub(super) fn choose(isolation: Isolation) {
    CHOICE.with(|c| {
        if let Choice::Open(_) = c.get() {
            c.set(Choice::Open(isolation));
        }
    });
}

/// The isolation the closure running on this thread asked for.
pub(super) fn chosen() -> Isolation {
    match CHOICE.with(Cell::get) {
        Choice::Open(i) => i,
        Choice::Closed | Choice::Forced => Isolation::Serializable,
    }
}

/// Runs `f` in a transaction on the session's connection — `SERIALIZABLE`, or
/// `READ COMMITTED` if `f` asks ([`super::read_committed`]) — again from the start when the
/// database aborts it (see the module docs of `postgres`).
pub(super) fn run<T>(
    s: &mut Session,
    mut f: impl FnMut(&mut dyn LedgerWrite) -> Result<T, LedgerError>,
) -> Result<T, LedgerError> {
    let deadline = Instant::now() + s.cfg.connect_timeout;
    // The choice of a transaction this one runs inside of on this thread, if any (a closure
    // that transacts): it is that one's again once this one's attempt ends.
    let outer = CHOICE.with(Cell::get);
    let mut attempt = 0u32;
    let mut forced = false;
    loop {
        attempt += 1;
        let may_retry = |lost: bool| attempt < MAX_ATTEMPTS && !(lost && past(deadline));
        if let Err(e) = s.client() {
            if may_retry(true) {
                RETRIES.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(backoff(attempt).max(std::time::Duration::from_millis(50)));
                continue;
            }
            return Err(e);
        }
        let Session {
            client,
            statements,
            shard,
            ..
        } = s;
        let shard = *shard;
        let client = client.as_mut().expect("connected above");
        CHOICE.with(|c| {
            c.set(match forced {
                true => Choice::Forced,
                false => Choice::Open(Isolation::Serializable),
            })
        });
        let (out, failure, open, commit) = {
            let mut w = PgWrite {
                db: RefCell::new(Db::transaction(client, statements)),
                shard,
                staged: RefCell::default(),
                neutral: RefCell::default(),
            };
            // What the closure staged goes out with the COMMIT (a failure there is noted by Db).
            let out = f(&mut w).and_then(|v| w.finish().map(|()| v));
            let mut db = w.db.into_inner();
            let commit = match (&out, &db.failure) {
                (Ok(_), None) => Some(db.commit()),
                _ => None,
            };
            let open = db.open();
            (out, db.failure, open, commit)
        };
        CHOICE.with(|c| c.set(outer));
        match (out, failure, commit) {
            // The connection went while the last writes or the COMMIT were out (whatever else
            // failed), or a write sent with the COMMIT failed in the client (the server did not
            // abort for it): never run again blindly.
            (_, _, Some(Commit::Unknown(e))) => {
                s.drop_client();
                return Err(LedgerError::CommitUnknown(e));
            }
            (_, Some(fl), _) => {
                if fl.lost || (open && super::control(client, "ROLLBACK").is_err()) {
                    s.drop_client();
                }
                forced |= fl.serializable;
                if fl.retryable && may_retry(fl.lost) {
                    RETRIES.fetch_add(1, Ordering::Relaxed);
                    if !fl.serializable {
                        std::thread::sleep(backoff(attempt));
                    }
                    continue;
                }
                let error = if fl.retryable {
                    format!("{} (gave up after {attempt} attempts)", fl.error)
                } else {
                    fl.error
                };
                return Err(if fl.lost {
                    LedgerError::Unavailable(error)
                } else {
                    LedgerError::Database(error)
                });
            }
            (Err(e), None, _) => {
                if open && super::control(client, "ROLLBACK").is_err() {
                    s.drop_client();
                }
                return Err(e);
            }
            (Ok(v), None, Some(Commit::Nothing | Commit::Done)) => return Ok(v),
            // The server refused the commit (a serialization failure found at commit):
            // nothing of it is durable.
            (Ok(_), None, Some(Commit::Refused(e))) if retryable(&e) && may_retry(false) => {
                RETRIES.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(backoff(attempt));
                continue;
            }
            (Ok(_), None, Some(Commit::Refused(e))) => return Err(db_error(&e)),
            // A failed COMMIT is noted as the transaction's failure (the arm above).
            (Ok(_), None, Some(Commit::Failed) | None) => {
                return Err(LedgerError::Database(
                    "the transaction did not commit".into(),
                ))
            }
        }
    }
}

/// One write transaction of the PostgreSQL ledger (it reads its own writes).
pub struct PgWrite<'s> {
    db: RefCell<Db<'s>>,
    /// This connection's shard of the accounts many transactions move.
    shard: i16,
    /// What the transaction read and wrote of the records a batch touches per tap, and the
    /// writes not sent yet (`staged.rs`).
    staged: RefCell<Staged>,
    /// Cards with no row that this transaction locked by inserting a neutral row (`READ
    /// COMMITTED`): the row is deleted before `COMMIT` unless the transaction wrote the card.
    neutral: RefCell<Vec<[u8; 7]>>,
}

impl crate::ledger::interface::sealed::Sealed for PgWrite<'_> {}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, LedgerError> {
    serde_json::to_value(v).map_err(|e| LedgerError::Database(format!("a record: {e}")))
}

/// A unit enum's serde name (`authorised`, `load`).
fn word<T: serde::Serialize>(v: &T) -> Result<String, LedgerError> {
    match to_json(v)? {
        serde_json::Value::String(s) => Ok(s),
        other => Ok(other.to_string()),
    }
}

/// `$1, $2, …`: one placeholder a column named (up to six).
#[rustfmt::skip]
macro_rules! placeholders {
    ($a:tt) => { "$1" };
    ($a:tt $b:tt) => { "$1, $2" };
    ($a:tt $b:tt $c:tt) => { "$1, $2, $3" };
    ($a:tt $b:tt $c:tt $d:tt) => { "$1, $2, $3, $4" };
    ($a:tt $b:tt $c:tt $d:tt $e:tt) => { "$1, $2, $3, $4, $5" };
    ($a:tt $b:tt $c:tt $d:tt $e:tt $f:tt) => { "$1, $2, $3, $4, $5, $6" };
}

/// A row written whole whether or not its key has one, as one `&'static str`:
/// `upsert!("t", ["k"], ["a", "b"])` is `INSERT INTO t (k, a, b) VALUES ($1, $2, $3)
/// ON CONFLICT (k) DO UPDATE SET a = EXCLUDED.a, b = EXCLUDED.b` (the parameters: the key's
/// columns, then the others, in order).
macro_rules! upsert {
    ($table:literal, [$k0:literal $(, $k:literal)*], [$c0:literal $(, $c:literal)*]) => {
        concat!(
            "INSERT INTO ", $table, " (", $k0, $(", ", $k,)* ", ", $c0, $(", ", $c,)*
            ") VALUES (", placeholders!($k0 $($k)* $c0 $($c)*),
            ") ON CONFLICT (", $k0, $(", ", $k,)* ") DO UPDATE SET ",
            $c0, " = EXCLUDED.", $c0, $(", ", $c, " = EXCLUDED.", $c,)*
        )
    };
}

impl PgWrite<'_> {
    /// Runs one query of the transaction (the same queries a snapshot runs, `read::q`), after
    /// the staged writes are sent. At `READ COMMITTED` such a read (a payment, a refund, a
    /// balance summed over shards, …) is outside the locking rule: the closure runs again at
    /// `SERIALIZABLE`.
    pub(super) fn q<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db<'_>) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        if self.read_committed() {
            return Err(self.db.borrow_mut().outside_rule("an unlocked read"));
        }
        self.q_any(f)
    }

    /// [`Self::q`] at any isolation (a read the locking rule allows unlocked).
    fn q_any<T>(
        &self,
        f: impl FnOnce(&mut Db<'_>) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        self.flush()?;
        let mut db = self.db.borrow_mut();
        f(&mut db)
    }

    /// A write transaction reads as it goes (a step's reads ahead are
    /// [`LedgerWrite::prefetch`]).
    fn look_up_all(&self, _: &crate::ledger::interface::Lookups) -> Result<(), LedgerError> {
        Ok(())
    }

    fn open_intents_of(&self, uid: &[u8; 7]) -> Result<Vec<LoadIntent>, LedgerError> {
        let uid = *uid;
        self.q(move |db| q::open_intents(db, &uid))
    }

    fn instrument_of(&self, source: &str, id: &str) -> Result<Option<Instrument>, LedgerError> {
        let (source, id) = (source.to_string(), id.to_string());
        self.q(move |db| q::instrument(db, &source, &id))
    }

    fn funding_day_of(&self, key: FundingDay<'_>) -> Result<i64, LedgerError> {
        let (source, id, day) = (key.source.to_string(), key.instrument.to_string(), key.day);
        self.q(move |db| q::funding_day_total(db, FundingDay::new(&source, &id, day)))
    }

    /// Whether the transaction runs at `READ COMMITTED` under the locking rule.
    fn read_committed(&self) -> bool {
        self.db.borrow().isolation() == Isolation::ReadCommitted
    }

    /// Before `COMMIT`: the staged writes sent, and the neutral rows of cards this transaction
    /// locked but never wrote deleted — a card with no row keeps none (`card_known`, clearing's
    /// learning of a card, the reconciliation answer as before), and a concurrent insert of the
    /// card that waited for this one goes ahead.
    fn finish(&self) -> Result<(), LedgerError> {
        self.flush()?;
        let unwritten: Vec<String> = {
            let staged = self.staged.borrow();
            let neutral = self.neutral.borrow();
            let unwritten = neutral.iter().filter(|u| staged.card(u) == Some(None));
            unwritten.map(uid_hex).collect()
        };
        if !unwritten.is_empty() {
            self.defer(
                "DELETE FROM cards WHERE uid = ANY($1)",
                vec![Box::new(unwritten)],
            )?;
        }
        Ok(())
    }

    /// Sends the staged writes.
    fn flush(&self) -> Result<(), LedgerError> {
        let mut staged = self.staged.borrow_mut();
        if staged.dirty() {
            staged.flush(&mut self.db.borrow_mut())?;
        }
        Ok(())
    }

    /// The card's shadow: staged, or read (a card not staged was not written here).
    fn card_opt(&self, uid: &[u8; 7]) -> Result<Option<CardShadow>, LedgerError> {
        if let Some(c) = self.staged.borrow().card(uid) {
            return Ok(c);
        }
        let c = if self.read_committed() {
            // The card's row locked (or, with no row, a neutral one inserted: the card is
            // still read as unknown): loads, reversals and clearing on one card take turns.
            let mut db = self.db.borrow_mut();
            match q::card_claimed(&mut db, uid)? {
                q::Claimed::Row(c) => Some(c),
                q::Claimed::Inserted => {
                    self.neutral.borrow_mut().push(*uid);
                    None
                }
                q::Claimed::Unseen => match q::card_locked(&mut db, uid)? {
                    Some(c) => Some(c),
                    // Committed and gone again: nothing deletes a card; run at SERIALIZABLE.
                    None => return Err(db.outside_rule("a card with no row")),
                },
            }
        } else {
            q::card_opt(&mut self.db.borrow_mut(), uid)?
        };
        self.staged.borrow_mut().read_card(uid, c.clone());
        Ok(c)
    }

    /// An idempotency answer: staged, or read.
    fn idempotent_of(&self, key: &str) -> Result<Option<serde_json::Value>, LedgerError> {
        if let Some(a) = self.staged.borrow().idempotent(key) {
            return Ok(a);
        }
        let locked = self.read_committed();
        let a = q::idempotent(&mut self.db.borrow_mut(), key, locked)?;
        self.staged.borrow_mut().read_idempotent(key, a.clone());
        Ok(a)
    }

    /// The intents at a card counter: staged, or read (intents are written through).
    fn intents_of(&self, uid: &[u8; 7], tmc_before: u32) -> Result<Vec<LoadIntent>, LedgerError> {
        if let Some(all) = self.staged.borrow().intents_at(uid, tmc_before) {
            return Ok(all);
        }
        let locked = self.read_committed();
        let all = q::intents_at(&mut self.db.borrow_mut(), uid, tmc_before, locked)?;
        self.staged
            .borrow_mut()
            .read_intents(uid, tmc_before, all.clone());
        Ok(all)
    }

    /// An account's balance: a card's (one shard) staged or read, another's summed by the
    /// database after the staged writes are sent.
    fn balance_of(&self, account: &str) -> Result<i64, LedgerError> {
        if !account.starts_with("card:") {
            let account = account.to_string();
            return self.q(move |db| q::balance(db, &account));
        }
        if let Some(b) = self.staged.borrow().card_balance(account) {
            return Ok(b);
        }
        self.shard_balance(&(account.to_string(), 0))
    }

    /// A shard's balance as the database holds it (0 without a row), staged from then on.
    fn shard_balance(&self, key: &(String, i16)) -> Result<i64, LedgerError> {
        let b = self
            .one(
                "SELECT balance_minor FROM balances WHERE account = $1 AND shard = $2",
                &[&key.0, &key.1],
            )?
            .map(|r| r.get(0));
        self.staged.borrow_mut().read_shard(key.clone(), b);
        Ok(b.unwrap_or(0))
    }

    /// Runs a statement; its error as the ledger reports it (the failure is noted by [`Db`]).
    fn exec(
        &self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64, LedgerError> {
        self.db
            .borrow_mut()
            .execute(sql, params)
            .map_err(|e| db_error(&e))
    }

    /// Sends a write with the transaction's next statement or its `COMMIT` (nothing waits
    /// for its answer; a failure fails the transaction there).
    fn defer(&self, sql: &'static str, params: Vec<Param>) -> Result<(), LedgerError> {
        self.db.borrow_mut().defer(sql, params)
    }

    /// `intent`'s row of card `uid` as the parameters `$1`–`$6` of a statement writing it.
    fn intent_params(uid: &[u8; 7], intent: &LoadIntent) -> Result<Vec<Param>, LedgerError> {
        let (rec, state, kind) = (to_json(intent)?, word(&intent.state)?, word(&intent.kind)?);
        Ok(vec![
            Box::new(uid_hex(uid)),
            Box::new(i64::from(intent.tmc_before)),
            Box::new(i32::from(intent.attempt)),
            Box::new(state),
            Box::new(kind),
            Box::new(rec),
        ])
    }

    /// Writes `intent`'s row of card `uid` by `sql` (an INSERT of the six columns, its
    /// ON CONFLICT the caller's): the rows it changed.
    fn intent_row(
        &self,
        sql: &'static str,
        uid: &[u8; 7],
        intent: &LoadIntent,
    ) -> Result<u64, LedgerError> {
        let params = Self::intent_params(uid, intent)?;
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|p| &**p as _).collect();
        self.exec(sql, &refs)
    }

    /// Runs a statement that returns one row.
    fn one(
        &self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Option<postgres::Row>, LedgerError> {
        self.db
            .borrow_mut()
            .query_opt(sql, params)
            .map_err(|e| db_error(&e))
    }

    /// The next number of a gap-free series (`block_changes`, `anomalies`).
    fn next_number(&self, series: &'static str) -> Result<u64, LedgerError> {
        let row = self
            .one(
                "UPDATE ledger_sequences SET last = last + 1 WHERE name = $1 RETURNING last",
                &[&series],
            )?
            .ok_or_else(|| LedgerError::Database(format!("no series {series}")))?;
        Ok(unbig(row.get(0)))
    }

    /// Adds `delta` to `account`'s shard (a card's account: its one shard; another account:
    /// this connection's), unless the shard would leave i64 (`false`, nothing changed).
    fn add_balance(&self, account: &str, delta: i64) -> Result<bool, LedgerError> {
        let shard = if account.starts_with("card:") {
            0
        } else {
            self.shard
        };
        let key = (account.to_string(), shard);
        if let Some(moved) = self.staged.borrow_mut().add_balance(&key, delta) {
            return Ok(moved);
        }
        self.shard_balance(&key)?;
        let moved = self.staged.borrow_mut().add_balance(&key, delta);
        moved.ok_or_else(|| LedgerError::Database("a balance read is not staged".into()))
    }

    /// [`LedgerWrite::put_intent`] at `READ COMMITTED`: the counter's intents were read locked
    /// in this transaction, so an attempt among them is updated in place and a new one
    /// inserted plainly (an attempt a concurrent transaction inserted meanwhile fails the
    /// insert: the closure runs again). An intent written at a counter not read is outside the
    /// rule.
    fn put_intent_locked(&self, uid: &[u8; 7], intent: &LoadIntent) -> Result<(), LedgerError> {
        let known = self
            .staged
            .borrow()
            .intents_at(uid, intent.tmc_before)
            .map(|all| all.iter().any(|i| i.attempt == intent.attempt));
        match known {
            Some(true) => self.defer(
                "WITH w AS (UPDATE load_intents SET state = $4, kind = $5, record = $6 \
                 WHERE uid = $1 AND tmc_before = $2 AND attempt = $3 RETURNING 1) \
                 SELECT ledger_expect_rows('locked intents to update', count(*), 1) FROM w",
                Self::intent_params(uid, intent)?,
            )?,
            Some(false) => self.defer(
                "INSERT INTO load_intents (uid, tmc_before, attempt, state, kind, record) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                Self::intent_params(uid, intent)?,
            )?,
            None => {
                return Err(self
                    .db
                    .borrow_mut()
                    .outside_rule("an intent written at a counter not read"))
            }
        }
        self.staged.borrow_mut().put_intent(uid, intent);
        Ok(())
    }
}

super::read::reads_through_q!(PgWrite<'_>);

impl LedgerWrite for PgWrite<'_> {
    fn append_posting(
        &mut self,
        _: LedgerOnly,
        entry: NewPosting<'_>,
    ) -> Result<Posting, LedgerError> {
        let (from, to, amount_minor) = (entry.from, entry.to, entry.amount_minor);
        // Each side's shard moves by the amount, unless that would leave i64 (then nothing
        // moves and the posting is refused; the transaction goes on, as under LMDB).
        let overflow = LedgerError::InvalidPosting("an account balance would overflow");
        if !self.add_balance(from, -amount_minor)? {
            return Err(overflow);
        }
        if !self.add_balance(to, amount_minor)? {
            self.add_balance(from, amount_minor)?;
            return Err(overflow);
        }
        let mut db = self.db.borrow_mut();
        self.staged.borrow_mut().posting(&mut db, entry)
    }

    /// One round trip (`Staged::prefetch`); at `READ COMMITTED` the cards' rows locked first,
    /// then the answers and intents read locked, then what those locks guard.
    fn prefetch(&mut self, ahead: &crate::ledger::ReadsAhead) -> Result<(), LedgerError> {
        let locked = self.read_committed();
        let mut db = self.db.borrow_mut();
        self.staged.borrow_mut().prefetch(&mut db, ahead, locked)
    }

    fn counter_gap(&self, uid: &[u8; 7]) -> Result<Option<GapClock>, LedgerError> {
        if let Some(g) = self.staged.borrow().gap(uid) {
            return Ok(g);
        }
        let row = match self.read_committed() {
            true => self.one(
                "SELECT from_tmc, since_ms, reported FROM counter_gaps WHERE uid = $1 FOR UPDATE",
                &[&uid_hex(uid)],
            )?,
            false => self.one(
                "SELECT from_tmc, since_ms, reported FROM counter_gaps WHERE uid = $1",
                &[&uid_hex(uid)],
            )?,
        };
        let g = row.map(|r| gap_clock(&r, 0));
        self.staged.borrow_mut().set_gap(uid, g.clone());
        Ok(g)
    }

    fn unreported_gaps(&self) -> Result<Vec<([u8; 7], GapClock)>, LedgerError> {
        if self.read_committed() {
            return Err(self
                .db
                .borrow_mut()
                .outside_rule("a scan of the gap clocks"));
        }
        let rows = self
            .db
            .borrow_mut()
            .query(
                "SELECT from_tmc, since_ms, reported, uid FROM counter_gaps WHERE NOT reported ORDER BY uid",
                &[],
            )
            .map_err(|e| db_error(&e))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let uid = hex::decode(r.get::<_, String>(3)).ok()?;
                Some((<[u8; 7]>::try_from(uid).ok()?, gap_clock(r, 0)))
            })
            .collect())
    }

    fn put_gap(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        clock: Option<&GapClock>,
    ) -> Result<(), LedgerError> {
        let known = self.staged.borrow().gap(uid);
        self.staged.borrow_mut().set_gap(uid, clock.cloned());
        let Some(g) = clock else {
            // A gap the transaction knows is absent has nothing to delete.
            if known.is_none_or(|g| g.is_some()) {
                self.defer(
                    "DELETE FROM counter_gaps WHERE uid = $1",
                    vec![Box::new(uid_hex(uid))],
                )?;
            }
            return Ok(());
        };
        self.defer(
            upsert!(
                "counter_gaps",
                ["uid"],
                ["from_tmc", "since_ms", "reported"]
            ),
            vec![
                Box::new(uid_hex(uid)),
                Box::new(i64::from(g.from_tmc)),
                Box::new(big(g.since_ms)),
                Box::new(g.reported),
            ],
        )
    }

    fn append_block_change(
        &mut self,
        _: LedgerOnly,
        change: BlockChange,
    ) -> Result<u64, LedgerError> {
        let version = self.next_number("block_changes")?;
        self.defer(
            "INSERT INTO block_changes (version, card_uid, action, reason, time_ms) \
             VALUES ($1, $2, $3, $4, $5)",
            vec![
                Box::new(big(version)),
                Box::new(change.card_uid),
                Box::new(change.action),
                Box::new(change.reason),
                Box::new(big(change.time_ms)),
            ],
        )?;
        Ok(version)
    }

    fn put_funding_day(
        &mut self,
        _: LedgerOnly,
        key: FundingDay<'_>,
        total_minor: i64,
    ) -> Result<(), LedgerError> {
        self.defer(
            upsert!(
                "funding_days",
                ["source", "instrument", "day"],
                ["total_minor"]
            ),
            vec![
                Box::new(key.source.to_string()),
                Box::new(key.instrument.to_string()),
                Box::new(big(key.day)),
                Box::new(total_minor),
            ],
        )
    }

    fn record_anomaly(&mut self, a: &crate::clearing::Anomaly) -> Result<u64, LedgerError> {
        let rec = to_json(a)?;
        let seq = self.next_number("anomalies")?;
        self.defer(
            "INSERT INTO anomalies (seq, kind, card_uid, record) VALUES ($1, $2, $3, $4)",
            vec![
                Box::new(big(seq)),
                Box::new(a.kind.clone()),
                Box::new(a.card_uid.clone()),
                Box::new(rec),
            ],
        )?;
        Ok(seq)
    }

    fn put_voucher(&mut self, v: &Voucher) -> Result<(), LedgerError> {
        let rec = to_json(v)?;
        self.defer(
            upsert!("vouchers", ["code"], ["record"]),
            vec![Box::new(v.code.clone()), Box::new(rec)],
        )
    }

    fn put_payment(&mut self, _: LedgerOnly, p: &Payment) -> Result<(), LedgerError> {
        let rec = to_json(p)?;
        self.defer(
            upsert!("payments", ["id"], ["merchant", "order_id", "record"]),
            vec![
                Box::new(p.id.clone()),
                Box::new(p.merchant.clone()),
                Box::new(p.order_id.clone()),
                Box::new(rec),
            ],
        )
    }

    fn put_refund(&mut self, _: LedgerOnly, r: &Refund) -> Result<(), LedgerError> {
        let (rec, state) = (to_json(r)?, word(&r.state)?);
        self.defer(
            upsert!("refunds", ["id"], ["state", "created_ms", "record"]),
            vec![
                Box::new(r.id.clone()),
                Box::new(state),
                Box::new(big(r.created_ms)),
                Box::new(rec),
            ],
        )
    }

    fn put_notification(&mut self, n: &Notification) -> Result<(), LedgerError> {
        let rec = to_json(n)?;
        self.defer(
            upsert!(
                "notifications",
                ["payment_id"],
                ["next_attempt_ms", "delivered", "record"]
            ),
            vec![
                Box::new(n.payment_id.clone()),
                Box::new(big(n.next_attempt_ms)),
                Box::new(n.delivered_ms.is_some()),
                Box::new(rec),
            ],
        )
    }

    fn put_card(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        shadow: &CardShadow,
    ) -> Result<(), LedgerError> {
        self.staged.borrow_mut().put_card(uid, shadow);
        Ok(())
    }

    /// The indexes are on columns the database computes from the card's record (`owner`,
    /// `0006_card_owner.sql`; `blocked`, `0007_card_blocked.sql`): the card's write moves them.
    fn index_card(
        &mut self,
        _: LedgerOnly,
        _: &[u8; 7],
        _: &CardShadow,
        _: &CardShadow,
    ) -> Result<(), LedgerError> {
        Ok(())
    }

    fn put_intent(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        intent: &LoadIntent,
    ) -> Result<(), LedgerError> {
        if self.read_committed() {
            return self.put_intent_locked(uid, intent);
        }
        self.defer(
            upsert!(
                "load_intents",
                ["uid", "tmc_before", "attempt"],
                ["state", "kind", "record"]
            ),
            Self::intent_params(uid, intent)?,
        )?;
        self.staged.borrow_mut().put_intent(uid, intent);
        Ok(())
    }

    fn put_idempotent(&mut self, key: &str, value: &serde_json::Value) -> Result<(), LedgerError> {
        self.staged.borrow_mut().put_idempotent(key, value);
        Ok(())
    }

    /// An insert that reads nothing first: no predicate lock on the key's index page, which
    /// concurrent loads insert their own keys into (each such read was a false
    /// serialization conflict with them). A key committed by a transaction this one cannot
    /// see is a serialization failure: run again, it finds the key.
    fn claim_idempotent(
        &mut self,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<bool, LedgerError> {
        if let Some(known) = self.staged.borrow().idempotent(key) {
            if known.is_some() {
                return Ok(false);
            }
        }
        let claimed = self.exec(
            "INSERT INTO idempotency (key, answer) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&key, value],
        )? == 1;
        if claimed {
            self.staged
                .borrow_mut()
                .read_idempotent(key, Some(value.clone()));
        }
        Ok(claimed)
    }

    /// One statement that raises the total only within the limit (the row locked by the
    /// update, nothing read first); the total is read only when it refuses.
    fn add_funding_day_within(
        &mut self,
        key: FundingDay<'_>,
        delta_minor: i64,
        max_minor: i64,
    ) -> Result<Result<(), i64>, LedgerError> {
        if delta_minor <= max_minor {
            let raised = self.one(
                "INSERT INTO funding_days (source, instrument, day, total_minor) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (source, instrument, day) DO UPDATE \
                 SET total_minor = funding_days.total_minor + EXCLUDED.total_minor \
                 WHERE funding_days.total_minor + EXCLUDED.total_minor <= $5 \
                 RETURNING total_minor",
                &[
                    &key.source,
                    &key.instrument,
                    &big(key.day),
                    &delta_minor,
                    &max_minor,
                ],
            )?;
            if raised.is_some() {
                return Ok(Ok(()));
            }
        }
        // The total as it stands (for the refusal's message: nothing is decided on it).
        let so_far = self.q_any(|db| q::funding_day_total(db, key))?;
        Ok(Err(so_far))
    }

    /// Inserted unless the counter has an intent (any unique key taken: nothing changes), with
    /// nothing read first.
    fn put_first_intent(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        intent: &LoadIntent,
    ) -> Result<bool, LedgerError> {
        let inserted = self.intent_row(
            "INSERT INTO load_intents (uid, tmc_before, attempt, state, kind, record) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            uid,
            intent,
        )? == 1;
        if inserted {
            self.staged.borrow_mut().put_intent(uid, intent);
        }
        Ok(inserted)
    }

    fn put_instrument(&mut self, i: &Instrument) -> Result<(), LedgerError> {
        let rec = to_json(i)?;
        self.defer(
            upsert!("instruments", ["source", "id"], ["owner", "record"]),
            vec![
                Box::new(i.source.clone()),
                Box::new(i.id.clone()),
                Box::new(i.owner.clone()),
                Box::new(rec),
            ],
        )
    }
}

/// A gap clock from its row's columns `from_tmc, since_ms, reported`, from column `at`.
pub(super) fn gap_clock(r: &postgres::Row, at: usize) -> GapClock {
    GapClock {
        from_tmc: u32::try_from(r.get::<_, i64>(at)).unwrap_or(u32::MAX),
        since_ms: unbig(r.get(at + 1)),
        reported: r.get(at + 2),
    }
}
