//! What one write transaction has read or written of the records a clearing batch touches per
//! tap — card shadows, idempotency answers, card counters' intents, balance shards — and the
//! writes not sent yet ([`Staged`]). A read the transaction made (or a write it did) is answered
//! from here; the writes go in one multi-row statement per table when the transaction needs
//! the database's own answer to a query (before any other read), and before `COMMIT`.
//!
//! This changes no outcome: the transaction is `SERIALIZABLE`, so a row it read stays what it
//! read (or what it wrote) until it commits, or the database aborts it and the closure runs
//! again from the start with nothing staged. Every refusal is still decided when the step runs
//! (a balance that would leave i64 is checked against the shard's value read then); the
//! database's own constraints check the rows when they arrive.

use super::read::{big, uid_hex, unbig};
use super::{cards, db_error, Db, LedgerError};
use crate::ledger::records::*;
use postgres::types::ToSql;
use std::collections::{BTreeMap, HashMap};

/// Posting numbers reserved at once at most (the unused ones of a transaction leave a gap in
/// the numbers, as a rolled-back insert does).
const SEQ_BLOCK_MAX: i64 = 1_024;

/// Cards read ahead from which a transaction plans its statements for their arguments
/// (`SET LOCAL plan_cache_mode = force_custom_plan`, until it ends): a clearing batch, not a
/// load's one card. A prepared statement otherwise runs a generic plan after five runs, which
/// takes an array parameter for 10 elements: a batch's 1 000 cards looked up, and their rows
/// updated, one index descent (and version chain) each, instead of one pass over the table's
/// pages — about twice the time on a ledger whose card rows every batch updates.
const CUSTOM_PLANS_FROM: usize = 32;

/// The staged reads and writes of one write transaction.
#[derive(Default)]
pub(super) struct Staged {
    /// card → its shadow (`None`: no shadow), as read or written
    cards: HashMap<[u8; 7], Option<CardShadow>>,
    /// cards written since the last flush
    cards_dirty: BTreeMap<[u8; 7], ()>,
    /// card → its row as the database holds it now (as read or last sent): a shadow that
    /// differs from it in its counters only is sent as the counters alone (`cards.rs`)
    cards_stored: HashMap<[u8; 7], CardShadow>,
    /// key → its answer, as read or written
    idem: HashMap<String, Option<serde_json::Value>>,
    /// keys written since the last flush
    idem_dirty: BTreeMap<String, ()>,
    /// key → whether the database holds a row for it (as read, or since the last flush): a
    /// key known absent is sent as a plain `INSERT` — a key a concurrent transaction inserted
    /// meanwhile fails it (a unique violation: the transaction runs again and finds it)
    idem_rows: HashMap<String, bool>,
    /// (account, shard) → the shard's balance, as read and moved
    shards: HashMap<(String, i16), i64>,
    /// (account, shard) → what moved since the last flush
    deltas: BTreeMap<(String, i16), i64>,
    /// the shards the database holds a row for (as read, or since the last flush): moved by
    /// an `UPDATE`; the others (read as absent) inserted
    shard_rows: std::collections::HashSet<(String, i16)>,
    /// postings not sent yet
    postings: Vec<Posting>,
    /// posting numbers reserved and not used yet, and the next block's size
    seqs: std::collections::VecDeque<u64>,
    seq_block: i64,
    /// (card, counter before) → its intents by attempt (written through; kept in step)
    intents: HashMap<([u8; 7], u32), Vec<LoadIntent>>,
    /// card → its gap clock (written through; kept in step)
    gaps: HashMap<[u8; 7], Option<GapClock>>,
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, LedgerError> {
    serde_json::from_value(v).map_err(|e| LedgerError::Database(format!("a stored record: {e}")))
}

impl Staged {
    /// The card's shadow, if the transaction knows it.
    pub fn card(&self, uid: &[u8; 7]) -> Option<Option<CardShadow>> {
        self.cards.get(uid).cloned()
    }

    /// What the transaction read of the card.
    pub fn read_card(&mut self, uid: &[u8; 7], shadow: Option<CardShadow>) {
        if let Some(c) = &shadow {
            self.cards_stored.insert(*uid, c.clone());
        }
        self.cards.insert(*uid, shadow);
    }

    /// A shadow written.
    pub fn put_card(&mut self, uid: &[u8; 7], shadow: &CardShadow) {
        self.cards.insert(*uid, Some(shadow.clone()));
        self.cards_dirty.insert(*uid, ());
    }

    /// The answer under `key`, if the transaction knows it.
    pub fn idempotent(&self, key: &str) -> Option<Option<serde_json::Value>> {
        self.idem.get(key).cloned()
    }

    /// What the transaction read under `key`.
    pub fn read_idempotent(&mut self, key: &str, answer: Option<serde_json::Value>) {
        self.idem_rows.insert(key.to_string(), answer.is_some());
        self.idem.insert(key.to_string(), answer);
    }

    /// An answer written.
    pub fn put_idempotent(&mut self, key: &str, answer: &serde_json::Value) {
        self.idem.insert(key.to_string(), Some(answer.clone()));
        self.idem_dirty.insert(key.to_string(), ());
    }

    /// The intents at (card, counter), if the transaction knows them.
    pub fn intents_at(&self, uid: &[u8; 7], tmc_before: u32) -> Option<Vec<LoadIntent>> {
        self.intents.get(&(*uid, tmc_before)).cloned()
    }

    /// What the transaction read at (card, counter).
    pub fn read_intents(&mut self, uid: &[u8; 7], tmc_before: u32, all: Vec<LoadIntent>) {
        self.intents.insert((*uid, tmc_before), all);
    }

    /// An intent written (through to the database): the known attempts stay in step.
    pub fn put_intent(&mut self, uid: &[u8; 7], intent: &LoadIntent) {
        if let Some(all) = self.intents.get_mut(&(*uid, intent.tmc_before)) {
            match all.iter_mut().find(|i| i.attempt == intent.attempt) {
                Some(i) => *i = intent.clone(),
                None => {
                    all.push(intent.clone());
                    all.sort_by_key(|i| i.attempt);
                }
            }
        }
    }

    /// The card's gap clock, if the transaction knows it.
    pub fn gap(&self, uid: &[u8; 7]) -> Option<Option<GapClock>> {
        self.gaps.get(uid).cloned()
    }

    /// The card's gap clock as read or written.
    pub fn set_gap(&mut self, uid: &[u8; 7], clock: Option<GapClock>) {
        self.gaps.insert(*uid, clock);
    }

    /// Reserves `n` posting numbers more at once (a batch about to post that many).
    pub fn reserve(&mut self, db: &mut Db<'_>, n: usize) -> Result<(), LedgerError> {
        let n = i64::try_from(n).unwrap_or(SEQ_BLOCK_MAX).min(SEQ_BLOCK_MAX);
        let rows = db.query(RESERVE, &[&n]).map_err(|e| db_error(&e))?;
        self.seqs
            .extend(rows.iter().map(|r| unbig(r.get::<_, i64>(0))));
        Ok(())
    }

    /// The balance of a card's account (its one shard), if the transaction knows it.
    pub fn card_balance(&self, account: &str) -> Option<i64> {
        self.shards.get(&(account.to_string(), 0)).copied()
    }

    /// Moves `(account, shard)` by `delta` unless it would leave i64 (`Some(false)`); `None`
    /// when the transaction has not read the shard yet.
    pub fn add_balance(&mut self, key: &(String, i16), delta: i64) -> Option<bool> {
        let current = self.shards.get_mut(key)?;
        let Some(next) = current.checked_add(delta) else {
            return Some(false);
        };
        *current = next;
        *self.deltas.entry(key.clone()).or_insert(0) += delta;
        Some(true)
    }

    /// What the transaction read of a shard: its balance, or `None` when it has no row.
    pub fn read_shard(&mut self, key: (String, i16), balance: Option<i64>) {
        if balance.is_some() {
            self.shard_rows.insert(key.clone());
        }
        self.shards.insert(key, balance.unwrap_or(0));
    }

    /// A posting to send, numbered from the reserved block (a new block reserved first when
    /// it is used up).
    pub fn posting(
        &mut self,
        db: &mut Db<'_>,
        entry: crate::ledger::NewPosting<'_>,
    ) -> Result<Posting, LedgerError> {
        if self.seqs.is_empty() {
            self.seq_block = (self.seq_block * 2).clamp(1, SEQ_BLOCK_MAX);
            self.reserve(db, self.seq_block as usize)?;
        }
        let seq = self
            .seqs
            .pop_front()
            .ok_or_else(|| LedgerError::Database("no posting number".into()))?;
        let p = entry.numbered(seq);
        self.postings.push(p.clone());
        Ok(p)
    }

    /// Whether writes wait to be sent.
    pub fn dirty(&self) -> bool {
        !(self.cards_dirty.is_empty()
            && self.idem_dirty.is_empty()
            && self.deltas.is_empty()
            && self.postings.is_empty())
    }

    /// Sends the staged writes: one statement per table. The cards' rows go first: a load at
    /// `READ COMMITTED` locks its card's row before anything else (docs/postgres.md, "Locking
    /// rule"), so a batch that moved the card's balance shard first and wrote its row last
    /// could deadlock with it (40P01: retried, but after the database's deadlock timeout).
    pub fn flush(&mut self, db: &mut Db<'_>) -> Result<(), LedgerError> {
        if !self.cards_dirty.is_empty() {
            self.flush_cards(db)?;
        }
        self.flush_postings(db)?;
        if !self.deltas.is_empty() {
            self.flush_balances(db)?;
        }
        if !self.idem_dirty.is_empty() {
            self.flush_idempotent(db)?;
        }
        Ok(())
    }

    /// The balance moves, summed per shard: the shards the database holds moved by one
    /// `UPDATE … FROM unnest` (its row count checked), the others inserted by one plain
    /// `INSERT` (every shard moved was read first: `add_balance`).
    fn flush_balances(&mut self, db: &mut Db<'_>) -> Result<(), LedgerError> {
        let deltas = std::mem::take(&mut self.deltas);
        let (mut held, mut new) = (Moves::default(), Moves::default());
        for (key, delta) in deltas {
            if self.shard_rows.contains(&key) {
                held.push(key, delta);
            } else {
                self.shard_rows.insert(key.clone());
                new.push(key, delta);
            }
        }
        if !held.accounts.is_empty() {
            let n = count(held.accounts.len());
            db.defer(
                "WITH w AS (UPDATE balances AS b SET balance_minor = b.balance_minor + u.d \
                 FROM unnest($1::text[], $2::smallint[], $3::bigint[]) AS u(a, s, d) \
                 WHERE b.account = u.a AND b.shard = u.s RETURNING 1) \
                 SELECT ledger_expect_rows('balance shards to move', count(*), $4) FROM w",
                vec![
                    Box::new(held.accounts),
                    Box::new(held.shards),
                    Box::new(held.amounts),
                    Box::new(n),
                ],
            )?;
        }
        if !new.accounts.is_empty() {
            db.defer(
                "INSERT INTO balances (account, shard, balance_minor) \
                 SELECT * FROM unnest($1::text[], $2::smallint[], $3::bigint[])",
                vec![
                    Box::new(new.accounts),
                    Box::new(new.shards),
                    Box::new(new.amounts),
                ],
            )?;
        }
        Ok(())
    }

    /// The answers written: a key the transaction read as absent inserted by one plain
    /// `INSERT` (a key a concurrent transaction took fails it: the transaction runs again and
    /// finds the key, so a tap's marker is booked once by the database's unique key); one it
    /// read as present updated; one it never read upserted.
    fn flush_idempotent(&mut self, db: &mut Db<'_>) -> Result<(), LedgerError> {
        let dirty = std::mem::take(&mut self.idem_dirty);
        let (mut new, mut held, mut unread) =
            (Answers::default(), Answers::default(), Answers::default());
        for key in dirty.into_keys() {
            let Some(Some(a)) = self.idem.get(&key) else {
                continue;
            };
            let a = a.clone();
            match self.idem_rows.insert(key.clone(), true) {
                Some(false) => new.push(key, a),
                Some(true) => held.push(key, a),
                None => unread.push(key, a),
            }
        }
        if !new.keys.is_empty() {
            db.defer(
                "INSERT INTO idempotency (key, answer) SELECT * FROM unnest($1::text[], $2::jsonb[])",
                vec![Box::new(new.keys), Box::new(new.answers)],
            )?;
        }
        if !held.keys.is_empty() {
            let n = count(held.keys.len());
            db.defer(
                "WITH w AS (UPDATE idempotency AS i SET answer = u.a \
                 FROM unnest($1::text[], $2::jsonb[]) AS u(k, a) WHERE i.key = u.k RETURNING 1) \
                 SELECT ledger_expect_rows('stored answers to update', count(*), $3) FROM w",
                vec![Box::new(held.keys), Box::new(held.answers), Box::new(n)],
            )?;
        }
        if !unread.keys.is_empty() {
            db.defer(
                "INSERT INTO idempotency (key, answer) SELECT * FROM unnest($1::text[], $2::jsonb[]) \
                 ON CONFLICT (key) DO UPDATE SET answer = EXCLUDED.answer",
                vec![Box::new(unread.keys), Box::new(unread.answers)],
            )?;
        }
        Ok(())
    }

    /// The cards written: those whose row differs in its counters only, one `UPDATE` of the
    /// counters; the others (new, or their record changed) written whole, one upsert.
    fn flush_cards(&mut self, db: &mut Db<'_>) -> Result<(), LedgerError> {
        let dirty = std::mem::take(&mut self.cards_dirty);
        let (mut counted, mut counters) = (vec![], cards::CounterArrays::default());
        let (mut whole, mut records, mut whole_counters) =
            (vec![], vec![], cards::CounterArrays::default());
        for uid in dirty.into_keys() {
            let Some(Some(c)) = self.cards.get(&uid) else {
                continue;
            };
            match self.cards_stored.get(&uid) {
                Some(stored) if cards::same_rest(stored, c) => {
                    if stored != c {
                        counted.push(uid_hex(&uid));
                        counters.push(cards::split(c).1);
                    }
                }
                _ => {
                    whole.push(uid_hex(&uid));
                    records.push(cards::rest_text(c)?);
                    whole_counters.push(cards::split(c).1);
                }
            }
            self.cards_stored.insert(uid, c.clone());
        }
        if !counted.is_empty() {
            let (n, a) = (count(counted.len()), counters);
            db.defer(
                "WITH w AS (UPDATE cards AS c SET last_tmc = u.lt, \
                 last_reported_balance_minor = u.lr, booked_through_tmc = u.bt, \
                 booked_balance_minor = u.bb \
                 FROM unnest($1::text[], $2::bigint[], $3::integer[], $4::bigint[], \
                 $5::integer[]) AS u(uid, lt, lr, bt, bb) WHERE c.uid = u.uid RETURNING 1) \
                 SELECT ledger_expect_rows('card shadows to update', count(*), $6) FROM w",
                vec![
                    Box::new(counted),
                    Box::new(a.last_tmc),
                    Box::new(a.last_reported),
                    Box::new(a.booked_through),
                    Box::new(a.booked_balance),
                    Box::new(n),
                ],
            )?;
        }
        if !whole.is_empty() {
            let a = whole_counters;
            // The records as JSON text, parsed once by the database.
            db.defer(
                "INSERT INTO cards (uid, record, last_tmc, last_reported_balance_minor, \
                 booked_through_tmc, booked_balance_minor) \
                 SELECT u, r::jsonb, lt, lr, bt, bb FROM unnest($1::text[], $2::text[], \
                 $3::bigint[], $4::integer[], $5::bigint[], $6::integer[]) \
                 AS t(u, r, lt, lr, bt, bb) \
                 ON CONFLICT (uid) DO UPDATE SET record = EXCLUDED.record, \
                 last_tmc = EXCLUDED.last_tmc, \
                 last_reported_balance_minor = EXCLUDED.last_reported_balance_minor, \
                 booked_through_tmc = EXCLUDED.booked_through_tmc, \
                 booked_balance_minor = EXCLUDED.booked_balance_minor",
                vec![
                    Box::new(whole),
                    Box::new(records),
                    Box::new(a.last_tmc),
                    Box::new(a.last_reported),
                    Box::new(a.booked_through),
                    Box::new(a.booked_balance),
                ],
            )?;
        }
        Ok(())
    }

    fn flush_postings(&mut self, db: &mut Db<'_>) -> Result<(), LedgerError> {
        if self.postings.is_empty() {
            return Ok(());
        }
        let postings = std::mem::take(&mut self.postings);
        let (mut seq, mut time, mut from, mut to, mut amount, mut reference) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for p in postings {
            seq.push(big(p.seq));
            time.push(big(p.time_ms));
            from.push(p.from);
            to.push(p.to);
            amount.push(p.amount_minor);
            reference.push(p.reference);
        }
        db.defer(
            "INSERT INTO postings (seq, time_ms, from_account, to_account, amount_minor, reference) \
             OVERRIDING SYSTEM VALUE SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], \
             $4::text[], $5::bigint[], $6::text[])",
            vec![
                Box::new(seq),
                Box::new(time),
                Box::new(from),
                Box::new(to),
                Box::new(amount),
                Box::new(reference),
            ],
        )?;
        Ok(())
    }

    /// Reads what a step or a batch will ask of the records staged here: the cards' shadows,
    /// their accounts' balances and gap clocks (a lookup by key each), the answers under
    /// `keys`, the intents at `counters`, and a posting number per card — all in one round
    /// trip. What the transaction knows already is not read again. `locked` (`READ
    /// COMMITTED`, the locking rule): the cards' rows and gap clocks locked first (in uid
    /// order; a card with no row is outside the rule), then the answers and intents read
    /// locked, and only then the shadows, balances and clocks those locks guard — the database
    /// runs the statements in that order. A batch (from [`CUSTOM_PLANS_FROM`] cards) has its
    /// statements planned for their arguments; its counted keys are read after its cards.
    pub fn prefetch(
        &mut self,
        db: &mut Db<'_>,
        ahead: &crate::ledger::ReadsAhead,
        locked: bool,
    ) -> Result<(), LedgerError> {
        if locked && !ahead.counted_keys.is_empty() {
            return Err(db.outside_rule("a batch's counted keys"));
        }
        let cards: Vec<[u8; 7]> =
            dedup(ahead.cards.iter().filter(|u| !self.cards.contains_key(*u)));
        let keys: Vec<String> = dedup(ahead.keys.iter().filter(|k| !self.idem.contains_key(*k)));
        let counters: Vec<([u8; 7], u32)> = dedup(
            ahead
                .counters
                .iter()
                .filter(|c| !self.intents.contains_key(*c)),
        );
        let hex: Vec<String> = cards.iter().map(uid_hex).collect();
        let accounts: Vec<String> = cards.iter().map(crate::ledger::card_account).collect();
        let counter_uids: Vec<String> = counters.iter().map(|(u, _)| uid_hex(u)).collect();
        let counter_tmcs: Vec<i64> = counters.iter().map(|(_, t)| i64::from(*t)).collect();
        // Each tap of a batch, each load's completion, posts once.
        let reserve = count(cards.len().saturating_sub(self.seqs.len())).min(SEQ_BLOCK_MAX);
        let by_uid: [&(dyn ToSql + Sync); 1] = [&hex];
        let by_account: [&(dyn ToSql + Sync); 1] = [&accounts];
        let by_key: [&(dyn ToSql + Sync); 1] = [&keys];
        let by_counter: [&(dyn ToSql + Sync); 2] = [&counter_uids, &counter_tmcs];
        let by_count: [&(dyn ToSql + Sync); 1] = [&reserve];
        let custom = cards.len() >= CUSTOM_PLANS_FROM;
        let lock = locked && !cards.is_empty();
        let mut plan: Vec<(&'static str, &[&(dyn ToSql + Sync)])> = Vec::new();
        if custom {
            plan.push(("SET LOCAL plan_cache_mode = force_custom_plan", &[]));
        }
        if lock {
            plan.push((LOCK_CARDS, &by_uid));
        }
        if !keys.is_empty() {
            plan.push((if locked { KEYS_LOCKED } else { KEYS }, &by_key));
        }
        if !counters.is_empty() {
            plan.push((if locked { INTENTS_LOCKED } else { INTENTS }, &by_counter));
        }
        if !cards.is_empty() {
            plan.push((CARDS, &by_uid));
            plan.push((BALANCES, &by_account));
            plan.push((GAPS, &by_uid));
        }
        if reserve > 0 {
            plan.push((RESERVE, &by_count));
        }
        if plan.is_empty() && ahead.counted_keys.is_empty() {
            return Ok(());
        }
        let mut answers = db.query_all(&plan).map_err(|e| db_error(&e))?.into_iter();
        let mut next = || answers.next().unwrap_or_default();
        if custom {
            next();
        }
        if lock {
            let locked_cards: i64 = next().first().map_or(0, |r| r.get(0));
            if locked_cards != count(cards.len()) {
                return Err(db.outside_rule("a card with no row"));
            }
        }
        if !keys.is_empty() {
            self.staged_answers(&keys, &next())?;
        }
        if !counters.is_empty() {
            self.staged_intents(&counters, &next())?;
        }
        if !cards.is_empty() {
            let (shadows, balances, gaps) = (next(), next(), next());
            self.staged_cards(&cards, &hex, accounts, (&shadows, &balances, &gaps))?;
        }
        if reserve > 0 {
            let numbers = next();
            self.seqs
                .extend(numbers.iter().map(|r| unbig(r.get::<_, i64>(0))));
        }
        self.prefetch_counted_keys(db, &ahead.counted_keys)
    }

    /// A batch's counted keys ([`crate::ledger::ReadsAhead::counted_keys`]), after its cards:
    /// a key whose card has not reported its counter is taken as absent without reading it.
    fn prefetch_counted_keys(
        &mut self,
        db: &mut Db<'_>,
        counted: &[([u8; 7], u32, String)],
    ) -> Result<(), LedgerError> {
        let mut keys = Vec::new();
        for (uid, tmc, key) in counted {
            // The card has not reported the counter: no such key can exist, and the plain
            // INSERT that writes it would fail if one did (`flush_idempotent`).
            let unreached = match self.cards.get(uid) {
                Some(None) => true,
                Some(Some(c)) => c.last_tmc < *tmc,
                None => false,
            };
            if unreached {
                self.absent(key);
            } else {
                keys.push(key.clone());
            }
        }
        let keys: Vec<String> = dedup(keys.iter().filter(|k| !self.idem.contains_key(*k)));
        if keys.is_empty() {
            return Ok(());
        }
        let rows = db.query(KEYS, &[&keys]).map_err(|e| db_error(&e))?;
        self.staged_answers(&keys, &rows)
    }

    /// The answers read under `keys` (rows of `key, answer`; a key without a row has none).
    fn staged_answers(
        &mut self,
        keys: &[String],
        rows: &[postgres::Row],
    ) -> Result<(), LedgerError> {
        let mut found: HashMap<String, serde_json::Value> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for k in keys {
            let answer = found.remove(k);
            self.read_idempotent(k, answer);
        }
        Ok(())
    }

    /// A key taken as absent without reading it ([`crate::ledger::ReadsAhead::counted_keys`]).
    fn absent(&mut self, key: &str) {
        if !self.idem.contains_key(key) {
            self.read_idempotent(key, None);
        }
    }

    /// The cards' shadows, their accounts' balances and their gap clocks as read: one lookup
    /// of each table by key (`= ANY($1)`), no join. A prepared statement soon runs a generic
    /// plan, which takes an `unnest` of a parameter for 10 rows: joined on one, a table read
    /// before its statistics were gathered (a ledger younger than autovacuum's first look) was
    /// scanned once per card (1 000 × 1 000 rows a batch). A lookup by key is linear whatever
    /// the plan.
    fn staged_cards(
        &mut self,
        cards: &[[u8; 7]],
        hex: &[String],
        accounts: Vec<String>,
        (shadows, balances, gaps): (&[postgres::Row], &[postgres::Row], &[postgres::Row]),
    ) -> Result<(), LedgerError> {
        let mut by_uid = HashMap::with_capacity(shadows.len());
        for r in shadows {
            by_uid.insert(r.get::<_, String>(0), cards::from_row(r, 1)?);
        }
        let mut balances: HashMap<String, i64> =
            balances.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut gaps: HashMap<String, GapClock> = gaps
            .iter()
            .map(|r| (r.get(0), super::write::gap_clock(r, 1)))
            .collect();
        for ((uid, h), account) in cards.iter().zip(hex).zip(accounts) {
            self.read_card(uid, by_uid.remove(h));
            let balance = balances.remove(&account);
            if !self.shards.contains_key(&(account.clone(), 0)) {
                self.read_shard((account, 0), balance);
            }
            self.gaps.entry(*uid).or_insert(gaps.remove(h));
        }
        Ok(())
    }

    /// The intents read at `counters` (rows of `uid, record`, by attempt).
    fn staged_intents(
        &mut self,
        counters: &[([u8; 7], u32)],
        rows: &[postgres::Row],
    ) -> Result<(), LedgerError> {
        for c in counters {
            self.intents.insert(*c, Vec::new());
        }
        for r in rows {
            let intent: LoadIntent = from_json(r.get(1))?;
            let uid = hex::decode(r.get::<_, String>(0))
                .ok()
                .and_then(|b| <[u8; 7]>::try_from(b).ok());
            if let Some(all) = uid.and_then(|u| self.intents.get_mut(&(u, intent.tmc_before))) {
                all.push(intent);
            }
        }
        Ok(())
    }
}

/// Locks the cards' rows and gap clocks (`READ COMMITTED`), in uid order: how many cards have
/// a row.
const LOCK_CARDS: &str = "SELECT (SELECT count(*) FROM (SELECT 1 FROM cards WHERE uid = ANY($1) \
     ORDER BY uid FOR UPDATE) c), (SELECT count(*) FROM (SELECT 1 FROM counter_gaps \
     WHERE uid = ANY($1) ORDER BY uid FOR UPDATE) g)";
/// The answers under keys.
const KEYS: &str = "SELECT key, answer FROM idempotency WHERE key = ANY($1)";
/// The answers under keys, locked.
const KEYS_LOCKED: &str =
    "SELECT key, answer FROM idempotency WHERE key = ANY($1) ORDER BY key FOR UPDATE";
/// The intents at card counters, by attempt.
const INTENTS: &str = "SELECT i.uid, i.record FROM load_intents i \
     JOIN unnest($1::text[], $2::bigint[]) AS c(uid, tmc) \
     ON i.uid = c.uid AND i.tmc_before = c.tmc ORDER BY i.attempt";
/// The intents at card counters, by attempt, locked.
const INTENTS_LOCKED: &str = "SELECT i.uid, i.record FROM load_intents i \
     JOIN unnest($1::text[], $2::bigint[]) AS c(uid, tmc) \
     ON i.uid = c.uid AND i.tmc_before = c.tmc ORDER BY i.uid, i.tmc_before, i.attempt \
     FOR UPDATE OF i";
/// The cards' shadows.
const CARDS: &str = concat!(
    "SELECT c.uid, ",
    cards::columns!(),
    " FROM cards c WHERE c.uid = ANY($1)"
);
/// The cards' accounts' balances (their one shard).
const BALANCES: &str =
    "SELECT account, balance_minor FROM balances WHERE shard = 0 AND account = ANY($1)";
/// The cards' gap clocks.
const GAPS: &str = "SELECT uid, from_tmc, since_ms, reported FROM counter_gaps WHERE uid = ANY($1)";
/// `$1` posting numbers (the sequence looked up once, not once a number).
const RESERVE: &str = "WITH s AS MATERIALIZED \
     (SELECT pg_get_serial_sequence('postings', 'seq')::regclass AS seq) \
     SELECT nextval(s.seq) FROM s, generate_series(1, $1::bigint)";

/// A number of rows a write must change (`ledger_expect_rows`, migration 0005).
fn count(rows: usize) -> i64 {
    i64::try_from(rows).unwrap_or(i64::MAX)
}

/// Balance moves as the arrays of one multi-row statement.
#[derive(Default)]
struct Moves {
    accounts: Vec<String>,
    shards: Vec<i16>,
    amounts: Vec<i64>,
}

impl Moves {
    fn push(&mut self, (account, shard): (String, i16), delta: i64) {
        self.accounts.push(account);
        self.shards.push(shard);
        self.amounts.push(delta);
    }
}

/// Idempotency answers as the arrays of one multi-row statement.
#[derive(Default)]
struct Answers {
    keys: Vec<String>,
    answers: Vec<serde_json::Value>,
}

impl Answers {
    fn push(&mut self, key: String, answer: serde_json::Value) {
        self.keys.push(key);
        self.answers.push(answer);
    }
}

/// The distinct items, in their first order.
fn dedup<'a, T: Clone + Eq + std::hash::Hash + 'a>(items: impl Iterator<Item = &'a T>) -> Vec<T> {
    let mut seen = std::collections::HashSet::new();
    items
        .filter(|i| seen.insert((*i).clone()))
        .cloned()
        .collect()
}
