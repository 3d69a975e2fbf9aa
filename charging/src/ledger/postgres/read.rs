//! Reads: the queries behind [`LedgerRead`] (shared by a snapshot and a write transaction),
//! and [`PgRead`], a `REPEATABLE READ READ ONLY` snapshot on a leased connection.

use super::lookup::Found;
use super::{cards, db_error, Db, Lease, LedgerError};
use crate::ledger::interface::Lookups;
use crate::ledger::records::*;
use serde::de::DeserializeOwned;

/// A u64 the ledger keeps (times, counters, numbers) as a bigint.
pub(super) fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A bigint back to the u64 it was.
pub(super) fn unbig(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn uid_hex(uid: &[u8; 7]) -> String {
    hex::encode_upper(uid)
}

/// A record from its jsonb `record` column (a record that no longer parses is an error, never
/// a default).
pub(super) fn record<T: DeserializeOwned>(row: &postgres::Row) -> Result<T, LedgerError> {
    let v: serde_json::Value = row.get("record");
    serde_json::from_value(v).map_err(|e| LedgerError::Database(format!("a stored record: {e}")))
}

/// The queries: each takes the statement runner and owned-or-borrowed arguments and returns
/// the record, so a snapshot and a write transaction run the very same SQL.
pub(super) mod q {
    use super::super::lookup;
    use super::*;
    use postgres::types::ToSql;

    /// The record of the row `sql` selects (its `record` column), if there is one.
    fn record_opt<T: DeserializeOwned>(
        db: &mut Db<'_>,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, LedgerError> {
        let row = db.query_opt(sql, params).map_err(|e| db_error(&e))?;
        row.as_ref().map(record).transpose()
    }

    /// The records of the rows `sql` selects (their `record` column), in its order.
    fn records<T: DeserializeOwned>(
        db: &mut Db<'_>,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, LedgerError> {
        let rows = db.query(sql, params).map_err(|e| db_error(&e))?;
        rows.iter().map(record).collect()
    }

    pub fn balance(db: &mut Db<'_>, account: &str) -> Result<i64, LedgerError> {
        let row = db
            .query_opt(
                "SELECT coalesce(sum(balance_minor), 0)::bigint FROM balances WHERE account = $1",
                &[&account],
            )
            .map_err(|e| db_error(&e))?;
        Ok(row.map(|r| r.get(0)).unwrap_or(0))
    }

    pub fn balances(db: &mut Db<'_>) -> Result<Vec<(String, i64)>, LedgerError> {
        let rows = db
            .query(
                "SELECT account, sum(balance_minor)::bigint FROM balances GROUP BY account ORDER BY account COLLATE \"C\"",
                &[],
            )
            .map_err(|e| db_error(&e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub fn postings_with_prefix(
        db: &mut Db<'_>,
        prefix: &str,
    ) -> Result<Vec<Posting>, LedgerError> {
        let rows = db
            .query(
                "SELECT seq, time_ms, from_account, to_account, amount_minor, reference FROM postings \
                 WHERE starts_with(reference, $1) ORDER BY seq",
                &[&prefix],
            )
            .map_err(|e| db_error(&e))?;
        Ok(rows
            .iter()
            .map(|r| Posting {
                seq: unbig(r.get(0)),
                time_ms: unbig(r.get(1)),
                from: r.get(2),
                to: r.get(3),
                amount_minor: r.get(4),
                reference: r.get(5),
            })
            .collect())
    }

    pub fn card_opt(db: &mut Db<'_>, uid: &[u8; 7]) -> Result<Option<CardShadow>, LedgerError> {
        card_row(db, lookup::CARD, uid)
    }

    /// [`card_opt`], the card's row locked until the transaction ends (`READ COMMITTED`'s
    /// locking rule: `write.rs`).
    pub fn card_locked(db: &mut Db<'_>, uid: &[u8; 7]) -> Result<Option<CardShadow>, LedgerError> {
        card_row(
            db,
            concat!(
                "SELECT ",
                cards::columns!(),
                " FROM cards c WHERE c.uid = $1 FOR UPDATE"
            ),
            uid,
        )
    }

    /// At `READ COMMITTED` (the locking rule, `write.rs`): the card's row locked, or — for a
    /// card with no row — a neutral row inserted in its place (the shadow's default; the
    /// transaction deletes it before it commits unless it wrote the card), which locks the
    /// card as well: a concurrent insert of the same uid waits for this transaction. One
    /// statement either way; `Unseen` when a row committed while the insert waited for its
    /// inserter (the statement's snapshot is older than that row: read it again, locked).
    pub fn card_claimed(db: &mut Db<'_>, uid: &[u8; 7]) -> Result<Claimed, LedgerError> {
        let neutral = CardShadow::default();
        let record = cards::rest_text(&neutral)?;
        let (lt, lr, bt, bb) = cards::split(&neutral).1;
        let row = db
            .query_opt(
                concat!(
                    "WITH ins AS (INSERT INTO cards (uid, record, last_tmc, \
                     last_reported_balance_minor, booked_through_tmc, booked_balance_minor) \
                     VALUES ($1, $2::text::jsonb, $3, $4, $5, $6) ON CONFLICT (uid) DO NOTHING \
                     RETURNING uid), \
                     locked AS (SELECT ",
                    cards::columns!(),
                    " FROM cards c WHERE c.uid = $1 AND NOT EXISTS (SELECT 1 FROM ins) \
                     FOR UPDATE) \
                     SELECT EXISTS (SELECT 1 FROM ins), l.* FROM (VALUES (1)) AS v(one) \
                     LEFT JOIN locked AS l ON true"
                ),
                &[&uid_hex(uid), &record, &lt, &lr, &bt, &bb],
            )
            .map_err(|e| db_error(&e))?
            .ok_or_else(|| LedgerError::Database("a card's lock returned no row".into()))?;
        if row.get::<_, bool>(0) {
            return Ok(Claimed::Inserted);
        }
        match row.get::<_, Option<&str>>(1) {
            Some(_) => Ok(Claimed::Row(cards::from_row(&row, 1)?)),
            None => Ok(Claimed::Unseen),
        }
    }

    /// What [`card_claimed`] found.
    pub enum Claimed {
        /// The card's row, locked.
        Row(CardShadow),
        /// No row: a neutral one inserted (locked as this transaction's own).
        Inserted,
        /// A row committed while the statement waited: not in its snapshot.
        Unseen,
    }

    /// The card row `sql` selects (`cards::columns!()`, the UID as `$1`), if there is one.
    fn card_row(
        db: &mut Db<'_>,
        sql: &'static str,
        uid: &[u8; 7],
    ) -> Result<Option<CardShadow>, LedgerError> {
        let row = db
            .query_opt(sql, &[&uid_hex(uid)])
            .map_err(|e| db_error(&e))?;
        row.map(|r| cards::from_row(&r, 0)).transpose()
    }

    pub fn funding_day_total(db: &mut Db<'_>, key: FundingDay<'_>) -> Result<i64, LedgerError> {
        let row = db
            .query_opt(
                lookup::FUNDING_DAY,
                &[&key.source, &key.instrument, &big(key.day)],
            )
            .map_err(|e| db_error(&e))?;
        Ok(row.map(|r| r.get(0)).unwrap_or(0))
    }

    pub fn anomalies(
        db: &mut Db<'_>,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, Anomaly)>, u64), LedgerError> {
        let last: i64 = db
            .query_opt(
                "SELECT last FROM ledger_sequences WHERE name = 'anomalies'",
                &[],
            )
            .map_err(|e| db_error(&e))?
            .map(|r| r.get(0))
            .unwrap_or(0);
        let rows = db
            .query(
                "SELECT seq, record FROM anomalies WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&big(after), &big(limit as u64)],
            )
            .map_err(|e| db_error(&e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push((unbig(r.get(0)), record(r)?));
        }
        Ok((out, unbig(last)))
    }

    /// The start of a query of whole cards, (uid, [`cards::columns!`]), from `cards c`.
    macro_rules! select_cards {
        () => {
            concat!("SELECT c.uid, ", cards::columns!(), " FROM cards c")
        };
    }

    /// The cards a [`select_cards!`] query answers.
    fn cards_by(
        db: &mut Db<'_>,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        let rows = db.query(sql, params).map_err(|e| db_error(&e))?;
        card_rows(&rows)
    }

    /// The first `limit` cards above `after`, by UID: the primary key's range (its index, in
    /// the database's collation). A UID is 14 uppercase hex digits (the table's CHECK), all of
    /// one length; the C collation and the usual locales put the digits before `A`–`F`, so
    /// the text order is the bytes' order, LMDB's (tests/ledger_backends.rs checks it); the
    /// empty text (no `after`) sorts before every UID.
    pub fn cards_after(
        db: &mut Db<'_>,
        after: Option<[u8; 7]>,
        limit: usize,
    ) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = after.map(|uid| uid_hex(&uid)).unwrap_or_default();
        cards_by(
            db,
            concat!(select_cards!(), " WHERE c.uid > $1 ORDER BY c.uid LIMIT $2"),
            &[&after, &big(limit as u64)],
        )
    }

    /// The UIDs of `owner`'s cards, in UID order: a range of the index on the owner
    /// (`0006_card_owner.sql`; the order as [`cards_after`]'s).
    pub fn cards_of_owner(db: &mut Db<'_>, owner: &str) -> Result<Vec<[u8; 7]>, LedgerError> {
        let rows = db
            .query(
                "SELECT uid FROM cards WHERE owner = $1 ORDER BY uid",
                &[&owner],
            )
            .map_err(|e| db_error(&e))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                hex::decode(r.get::<_, &str>(0))
                    .ok()
                    .and_then(|b| <[u8; 7]>::try_from(b).ok())
            })
            .collect())
    }

    /// The blocked cards, in UID order: the partial index `cards_blocked`
    /// (`0007_card_blocked.sql`; the order as [`cards_after`]'s).
    pub fn blocked_cards(db: &mut Db<'_>) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        cards_by(
            db,
            concat!(select_cards!(), " WHERE c.blocked ORDER BY c.uid"),
            &[],
        )
    }

    /// How many cards there are.
    pub fn card_count(db: &mut Db<'_>) -> Result<u64, LedgerError> {
        let row = db
            .query_opt("SELECT count(*) FROM cards", &[])
            .map_err(|e| db_error(&e))?;
        Ok(row.map_or(0, |r| unbig(r.get(0))))
    }

    /// Cards selected as (uid, the card columns): a UID that is not 7 bytes of hex is left out.
    fn card_rows(rows: &[postgres::Row]) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let uid: String = r.get(0);
            if let Some(uid) = hex::decode(&uid)
                .ok()
                .and_then(|b| <[u8; 7]>::try_from(b).ok())
            {
                out.push((uid, cards::from_row(r, 1)?));
            }
        }
        Ok(out)
    }

    pub fn block_changes(
        db: &mut Db<'_>,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<BlockChange>, u64), LedgerError> {
        let latest: i64 = db
            .query_opt(
                "SELECT last FROM ledger_sequences WHERE name = 'block_changes'",
                &[],
            )
            .map_err(|e| db_error(&e))?
            .map(|r| r.get(0))
            .unwrap_or(0);
        // `after` comes from a query string: u64::MAX has no next version.
        if after.checked_add(1).is_none() {
            return Ok((Vec::new(), unbig(latest)));
        }
        let rows = db
            .query(
                "SELECT version, card_uid, action, reason, time_ms FROM block_changes \
                 WHERE version > $1 ORDER BY version LIMIT $2",
                &[&big(after), &big(limit as u64)],
            )
            .map_err(|e| db_error(&e))?;
        Ok((rows.iter().map(change_of).collect(), unbig(latest)))
    }

    /// A `block_changes` row selected as (version, card_uid, action, reason, time_ms).
    fn change_of(r: &postgres::Row) -> BlockChange {
        BlockChange {
            version: unbig(r.get(0)),
            card_uid: r.get(1),
            action: r.get(2),
            reason: r.get(3),
            time_ms: unbig(r.get(4)),
        }
    }

    /// The card's latest block change: one probe of `block_changes_card` (card, version).
    pub fn latest_block_change(
        db: &mut Db<'_>,
        uid: &[u8; 7],
    ) -> Result<Option<BlockChange>, LedgerError> {
        Ok(card_block_changes(db, uid, 1)?.pop())
    }

    /// The card's block changes, newest first, at most `limit`: `block_changes_card` (card,
    /// version) read backwards.
    pub fn card_block_changes(
        db: &mut Db<'_>,
        uid: &[u8; 7],
        limit: usize,
    ) -> Result<Vec<BlockChange>, LedgerError> {
        let rows = db
            .query(
                "SELECT version, card_uid, action, reason, time_ms FROM block_changes \
                 WHERE card_uid = $1 ORDER BY version DESC LIMIT $2",
                &[&hex::encode_upper(uid), &big(limit as u64)],
            )
            .map_err(|e| db_error(&e))?;
        Ok(rows.iter().map(change_of).collect())
    }

    /// The card's anomalies among the newest `within`, newest first: the primary key's range
    /// above `last - within` (no per-card index on `anomalies`).
    pub fn card_anomalies(
        db: &mut Db<'_>,
        uid: &[u8; 7],
        within: u64,
    ) -> Result<Vec<(u64, Anomaly)>, LedgerError> {
        let rows = db
            .query(
                "SELECT seq, record FROM anomalies \
                 WHERE seq > (SELECT last FROM ledger_sequences WHERE name = 'anomalies') - $2 \
                 AND upper(card_uid) = $1 ORDER BY seq DESC",
                &[&hex::encode_upper(uid), &big(within)],
            )
            .map_err(|e| db_error(&e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push((unbig(r.get(0)), record(r)?));
        }
        Ok(out)
    }

    pub fn voucher(db: &mut Db<'_>, code: &str) -> Result<Option<Voucher>, LedgerError> {
        record_opt(db, "SELECT record FROM vouchers WHERE code = $1", &[&code])
    }

    /// A card counter's intents, by attempt (`locked`: their rows locked until the
    /// transaction ends).
    pub fn intents_at(
        db: &mut Db<'_>,
        uid: &[u8; 7],
        tmc_before: u32,
        locked: bool,
    ) -> Result<Vec<LoadIntent>, LedgerError> {
        let sql = match locked {
            true => {
                "SELECT record FROM load_intents WHERE uid = $1 AND tmc_before = $2 \
                 ORDER BY attempt FOR UPDATE"
            }
            false => {
                "SELECT record FROM load_intents WHERE uid = $1 AND tmc_before = $2 ORDER BY attempt"
            }
        };
        records(db, sql, &[&uid_hex(uid), &i64::from(tmc_before)])
    }

    pub fn open_intents(db: &mut Db<'_>, uid: &[u8; 7]) -> Result<Vec<LoadIntent>, LedgerError> {
        records(db, lookup::OPEN_INTENTS, &[&uid_hex(uid)])
    }

    pub fn all_intents(db: &mut Db<'_>) -> Result<Vec<LoadIntent>, LedgerError> {
        records(
            db,
            "SELECT record FROM load_intents ORDER BY uid, tmc_before, attempt",
            &[],
        )
    }

    /// The answer under `key` (`locked`: its row locked until the transaction ends).
    pub fn idempotent(
        db: &mut Db<'_>,
        key: &str,
        locked: bool,
    ) -> Result<Option<serde_json::Value>, LedgerError> {
        let row = match locked {
            true => db.query_opt(
                "SELECT answer FROM idempotency WHERE key = $1 FOR UPDATE",
                &[&key],
            ),
            false => db.query_opt(lookup::KEY, &[&key]),
        }
        .map_err(|e| db_error(&e))?;
        Ok(row.map(|r| r.get(0)))
    }

    pub fn instrument(
        db: &mut Db<'_>,
        source: &str,
        id: &str,
    ) -> Result<Option<Instrument>, LedgerError> {
        record_opt(db, lookup::INSTRUMENT, &[&source, &id])
    }

    pub fn instruments_of(db: &mut Db<'_>, owner: &str) -> Result<Vec<Instrument>, LedgerError> {
        records(
            db,
            "SELECT record FROM instruments WHERE owner = $1 ORDER BY source COLLATE \"C\", id COLLATE \"C\"",
            &[&owner],
        )
    }

    pub fn payment(db: &mut Db<'_>, id: &str) -> Result<Option<Payment>, LedgerError> {
        record_opt(db, "SELECT record FROM payments WHERE id = $1", &[&id])
    }

    pub fn payment_for_order(
        db: &mut Db<'_>,
        merchant: &str,
        order_id: &str,
    ) -> Result<Option<String>, LedgerError> {
        let row = db
            .query_opt(
                "SELECT id FROM payments WHERE merchant = $1 AND order_id = $2",
                &[&merchant, &order_id],
            )
            .map_err(|e| db_error(&e))?;
        Ok(row.map(|r| r.get(0)))
    }

    pub fn refund(db: &mut Db<'_>, id: &str) -> Result<Option<Refund>, LedgerError> {
        record_opt(db, "SELECT record FROM refunds WHERE id = $1", &[&id])
    }

    pub fn refunds_uncollected(
        db: &mut Db<'_>,
        made_by_ms: u64,
        limit: usize,
    ) -> Result<Vec<Refund>, LedgerError> {
        records(
            db,
            "SELECT record FROM refunds WHERE state = 'pending' AND created_ms <= $1 \
             ORDER BY created_ms, id COLLATE \"C\" LIMIT $2",
            &[&big(made_by_ms), &big(limit as u64)],
        )
    }

    pub fn notification(
        db: &mut Db<'_>,
        payment_id: &str,
    ) -> Result<Option<Notification>, LedgerError> {
        record_opt(
            db,
            "SELECT record FROM notifications WHERE payment_id = $1",
            &[&payment_id],
        )
    }

    pub fn notifications_due(
        db: &mut Db<'_>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Notification>, LedgerError> {
        records(
            db,
            "SELECT record FROM notifications WHERE NOT delivered AND next_attempt_ms <= $1 \
             ORDER BY next_attempt_ms, payment_id COLLATE \"C\" LIMIT $2",
            &[&big(now_ms), &big(limit as u64)],
        )
    }
}

/// A read snapshot of the PostgreSQL ledger: one leased connection in a
/// `REPEATABLE READ READ ONLY` transaction, ended when the snapshot drops. The transaction
/// begins with the snapshot's first query, in the same round trip; a snapshot that reads
/// nothing sends nothing.
pub struct PgRead {
    lease: Lease,
    /// Whether its reads share one snapshot (`false`: each reads the latest committed state,
    /// [`super::PgLedger::read_latest`]).
    snapshot: bool,
    /// Whether `BEGIN` was sent (then `COMMIT` is, when the snapshot drops).
    begun: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// What [`crate::ledger::LedgerRead::look_up`] read, for the reads that follow.
    found: std::cell::RefCell<Found>,
}

impl super::PgLedger {
    /// Reads that each see the latest committed state, with no transaction around them: no
    /// `BEGIN` and `COMMIT` round trips. For a step whose reads need not agree with one
    /// another (each is checked again where it matters, in the write transaction that
    /// follows), holding one connection until it is dropped.
    pub fn read_latest(&self) -> Result<PgRead, LedgerError> {
        Ok(PgRead {
            lease: self.pool.lease()?,
            snapshot: false,
            begun: Default::default(),
            found: Default::default(),
        })
    }
}

impl PgRead {
    pub(super) fn begin(lease: Lease) -> Result<PgRead, LedgerError> {
        Ok(PgRead {
            lease,
            snapshot: true,
            begun: Default::default(),
            found: Default::default(),
        })
    }

    /// Runs one query of the snapshot on its connection (the first begins it).
    fn q<T: Send>(
        &self,
        f: impl FnOnce(&mut Db<'_>) -> Result<T, LedgerError> + Send,
    ) -> Result<T, LedgerError> {
        use std::sync::atomic::Ordering;
        let snapshot = self.snapshot;
        let first = snapshot && !self.begun.load(Ordering::Relaxed);
        let begun = self.begun.clone();
        self.lease.run(move |s| {
            if first || !snapshot {
                // A snapshot's first read, or a read that stands alone: a connection missing
                // or lost is made afresh.
                s.client()?;
            }
            let Some(client) = s.client.as_mut() else {
                return Err(LedgerError::Unavailable(
                    "the snapshot's connection is gone".into(),
                ));
            };
            // A snapshot's BEGIN goes with its first read.
            let mut db = match first {
                true => Db::snapshot(client, &mut s.statements),
                false => Db::new(client, &mut s.statements),
            };
            let out = f(&mut db);
            if first && db.begun() {
                begun.store(true, Ordering::Relaxed);
            }
            if db.failure.as_ref().is_some_and(|f| f.lost) {
                s.drop_client();
            }
            out
        })?
    }
}

impl PgRead {
    /// Reads `ahead` in one round trip; the reads of it that follow are answered from it.
    fn look_up_all(&self, ahead: &Lookups) -> Result<(), LedgerError> {
        let ahead = ahead.clone();
        let found = self.q(move |db| super::lookup::look_up(db, &ahead))?;
        let mut known = self.found.borrow_mut();
        known.keys.extend(found.keys);
        known.cards.extend(found.cards);
        known.open_intents.extend(found.open_intents);
        known.instruments.extend(found.instruments);
        known.funding_days.extend(found.funding_days);
        Ok(())
    }

    fn card_opt(&self, uid: &[u8; 7]) -> Result<Option<CardShadow>, LedgerError> {
        if let Some(c) = self.found.borrow().cards.get(uid) {
            return Ok(c.clone());
        }
        let uid = *uid;
        self.q(move |db| q::card_opt(db, &uid))
    }

    fn open_intents_of(&self, uid: &[u8; 7]) -> Result<Vec<LoadIntent>, LedgerError> {
        if let Some(open) = self.found.borrow().open_intents.get(uid) {
            return Ok(open.clone());
        }
        let uid = *uid;
        self.q(move |db| q::open_intents(db, &uid))
    }

    fn instrument_of(&self, source: &str, id: &str) -> Result<Option<Instrument>, LedgerError> {
        let key = (source.to_string(), id.to_string());
        if let Some(i) = self.found.borrow().instruments.get(&key) {
            return Ok(i.clone());
        }
        self.q(move |db| q::instrument(db, &key.0, &key.1))
    }

    fn funding_day_of(&self, key: FundingDay<'_>) -> Result<i64, LedgerError> {
        let key = (key.source.to_string(), key.instrument.to_string(), key.day);
        if let Some(total) = self.found.borrow().funding_days.get(&key) {
            return Ok(*total);
        }
        self.q(move |db| q::funding_day_total(db, FundingDay::new(&key.0, &key.1, key.2)))
    }

    fn balance_of(&self, account: &str) -> Result<i64, LedgerError> {
        let account = account.to_string();
        self.q(move |db| q::balance(db, &account))
    }

    fn intents_of(&self, uid: &[u8; 7], tmc_before: u32) -> Result<Vec<LoadIntent>, LedgerError> {
        let uid = *uid;
        self.q(move |db| q::intents_at(db, &uid, tmc_before, false))
    }

    fn idempotent_of(&self, key: &str) -> Result<Option<serde_json::Value>, LedgerError> {
        if let Some(a) = self.found.borrow().keys.get(key) {
            return Ok(a.clone());
        }
        let key = key.to_string();
        self.q(move |db| q::idempotent(db, &key, false))
    }
}

impl Drop for PgRead {
    fn drop(&mut self) {
        if !self.begun.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // Before the lease returns the connection to the pool.
        let _ = self.lease.run(|s| {
            if let Some(c) = s.client.as_mut() {
                if super::control(c, "COMMIT").is_err() {
                    s.drop_client();
                }
            }
        });
    }
}

/// The [`LedgerRead`] of a type whose `q` runs one query (a snapshot, a write transaction):
/// written once for both, over the queries of [`q`]; the reads a write transaction stages
/// (`staged.rs`: a card, a balance, the intents at a counter, an idempotency answer) go through
/// the type's own `card_opt`, `balance_of`, `intents_of` and `idempotent_of`, and those a
/// snapshot may have looked up (`look_up_all`) through `open_intents_of`, `instrument_of` and
/// `funding_day_of`.
macro_rules! reads_through_q {
    ($t:ty) => {
        impl crate::ledger::interface::LedgerRead for $t {
            fn look_up(
                &self,
                ahead: &crate::ledger::interface::Lookups,
            ) -> Result<(), LedgerError> {
                self.look_up_all(ahead)
            }

            fn balance(&self, account: &str) -> Result<i64, LedgerError> {
                self.balance_of(account)
            }

            fn balances(&self) -> Result<Vec<(String, i64)>, LedgerError> {
                self.q(super::read::q::balances)
            }

            fn postings_with_prefix(&self, prefix: &str) -> Result<Vec<Posting>, LedgerError> {
                let prefix = prefix.to_string();
                self.q(move |db| super::read::q::postings_with_prefix(db, &prefix))
            }

            fn card(&self, uid: &[u8; 7]) -> Result<CardShadow, LedgerError> {
                Ok(self.card_opt(uid)?.unwrap_or_default())
            }

            fn funding_day_total(&self, key: FundingDay<'_>) -> Result<i64, LedgerError> {
                self.funding_day_of(key)
            }

            fn anomalies(
                &self,
                after: u64,
                limit: usize,
            ) -> Result<(Vec<(u64, Anomaly)>, u64), LedgerError> {
                self.q(move |db| super::read::q::anomalies(db, after, limit))
            }

            fn cards_after(
                &self,
                after: Option<[u8; 7]>,
                limit: usize,
            ) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
                self.q(move |db| super::read::q::cards_after(db, after, limit))
            }

            fn cards_of_owner(&self, owner: &str) -> Result<Vec<[u8; 7]>, LedgerError> {
                let owner = owner.to_string();
                self.q(move |db| super::read::q::cards_of_owner(db, &owner))
            }

            fn blocked_cards(&self) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
                self.q(super::read::q::blocked_cards)
            }

            fn card_count(&self) -> Result<u64, LedgerError> {
                self.q(super::read::q::card_count)
            }

            fn block_changes(
                &self,
                after: u64,
                limit: usize,
            ) -> Result<(Vec<BlockChange>, u64), LedgerError> {
                self.q(move |db| super::read::q::block_changes(db, after, limit))
            }

            fn latest_block_change(
                &self,
                uid: &[u8; 7],
            ) -> Result<Option<BlockChange>, LedgerError> {
                let uid = *uid;
                self.q(move |db| super::read::q::latest_block_change(db, &uid))
            }

            fn card_block_changes(
                &self,
                uid: &[u8; 7],
                limit: usize,
            ) -> Result<Vec<BlockChange>, LedgerError> {
                let uid = *uid;
                self.q(move |db| super::read::q::card_block_changes(db, &uid, limit))
            }

            fn card_anomalies(
                &self,
                uid: &[u8; 7],
                within: u64,
            ) -> Result<Vec<(u64, Anomaly)>, LedgerError> {
                let uid = *uid;
                self.q(move |db| super::read::q::card_anomalies(db, &uid, within))
            }

            fn voucher(&self, code: &str) -> Result<Option<Voucher>, LedgerError> {
                let code = code.to_string();
                self.q(move |db| super::read::q::voucher(db, &code))
            }

            fn card_known(&self, uid: &[u8; 7]) -> Result<bool, LedgerError> {
                Ok(self.card_opt(uid)?.is_some())
            }

            fn intents_at(
                &self,
                uid: &[u8; 7],
                tmc_before: u32,
            ) -> Result<Vec<LoadIntent>, LedgerError> {
                self.intents_of(uid, tmc_before)
            }

            fn open_intents(&self, uid: &[u8; 7]) -> Result<Vec<LoadIntent>, LedgerError> {
                self.open_intents_of(uid)
            }

            fn all_intents(&self) -> Result<Vec<LoadIntent>, LedgerError> {
                self.q(super::read::q::all_intents)
            }

            fn idempotent(&self, key: &str) -> Result<Option<serde_json::Value>, LedgerError> {
                self.idempotent_of(key)
            }

            fn instrument(
                &self,
                source: &str,
                id: &str,
            ) -> Result<Option<Instrument>, LedgerError> {
                self.instrument_of(source, id)
            }

            fn instruments_of(&self, owner: &str) -> Result<Vec<Instrument>, LedgerError> {
                let owner = owner.to_string();
                self.q(move |db| super::read::q::instruments_of(db, &owner))
            }

            fn payment(&self, id: &str) -> Result<Option<Payment>, LedgerError> {
                let id = id.to_string();
                self.q(move |db| super::read::q::payment(db, &id))
            }

            fn payment_for_order(
                &self,
                merchant: &str,
                order_id: &str,
            ) -> Result<Option<String>, LedgerError> {
                let (merchant, order_id) = (merchant.to_string(), order_id.to_string());
                self.q(move |db| super::read::q::payment_for_order(db, &merchant, &order_id))
            }

            fn refund(&self, id: &str) -> Result<Option<Refund>, LedgerError> {
                let id = id.to_string();
                self.q(move |db| super::read::q::refund(db, &id))
            }

            fn refunds_uncollected(
                &self,
                made_by_ms: u64,
                limit: usize,
            ) -> Result<Vec<Refund>, LedgerError> {
                self.q(move |db| super::read::q::refunds_uncollected(db, made_by_ms, limit))
            }

            fn notification(&self, payment_id: &str) -> Result<Option<Notification>, LedgerError> {
                let id = payment_id.to_string();
                self.q(move |db| super::read::q::notification(db, &id))
            }

            fn notifications_due(
                &self,
                now_ms: u64,
                limit: usize,
            ) -> Result<Vec<Notification>, LedgerError> {
                self.q(move |db| super::read::q::notifications_due(db, now_ms, limit))
            }
        }
    };
}

pub(super) use reads_through_q;

reads_through_q!(PgRead);
