//! One write transaction ([`PgWrite`]) and the loop that runs a closure in it, again on a
//! conflict ([`run`]). The ledger's steps are those of the LMDB backend (`lmdb/`), decided in
//! the same order on the same records; every refusal is decided before a statement could fail,
//! so a refused step leaves the transaction usable, as under LMDB.

use super::read::{big, q, uid_hex, unbig};
use super::{backoff, db_error, lost, past, retryable, Db, LedgerError, Session, MAX_ATTEMPTS};
use crate::ledger::interface::{Completion, LedgerOnly, LedgerRead, LedgerWrite};
use crate::ledger::records::*;
use crate::ledger::rules::{self, GapAfterBooking, GapDecision, Settled, Voided};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Transactions run again in this process (conflicts and lost connections).
pub(super) static RETRIES: AtomicU64 = AtomicU64::new(0);

/// Runs `f` in a `SERIALIZABLE` transaction on the session's connection, again from the start
/// when the database aborts it (see the module docs of `postgres`).
pub(super) fn run<T>(
    s: &mut Session,
    mut f: impl FnMut(&mut dyn LedgerWrite) -> Result<T, LedgerError>,
) -> Result<T, LedgerError> {
    let deadline = Instant::now() + s.cfg.connect_timeout;
    let mut attempt = 0u32;
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
        if let Err(e) = client.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE") {
            let gone = lost(&e);
            if gone {
                s.drop_client();
            }
            if retryable(&e) && may_retry(gone) {
                RETRIES.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(backoff(attempt));
                continue;
            }
            return Err(db_error(&e));
        }
        let (out, failure) = {
            let mut w = PgWrite {
                db: RefCell::new(Db::new(client, statements)),
                shard,
            };
            let out = f(&mut w);
            (out, w.db.into_inner().failure)
        };
        match (out, failure) {
            (_, Some(fl)) => {
                if fl.lost || client.batch_execute("ROLLBACK").is_err() {
                    s.drop_client();
                }
                if fl.retryable && may_retry(fl.lost) {
                    RETRIES.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(backoff(attempt));
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
            (Err(e), None) => {
                if client.batch_execute("ROLLBACK").is_err() {
                    s.drop_client();
                }
                return Err(e);
            }
            (Ok(v), None) => match client.batch_execute("COMMIT") {
                Ok(()) => return Ok(v),
                Err(e) if lost(&e) => {
                    s.drop_client();
                    return Err(LedgerError::CommitUnknown(e.to_string()));
                }
                Err(e) if retryable(&e) && may_retry(false) => {
                    // The server refused the commit (a serialization failure found at commit):
                    // nothing of it is durable.
                    RETRIES.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(backoff(attempt));
                    continue;
                }
                Err(e) => return Err(db_error(&e)),
            },
        }
    }
}

/// One write transaction of the PostgreSQL ledger (it reads its own writes).
pub struct PgWrite<'s> {
    db: RefCell<Db<'s>>,
    /// This connection's shard of the accounts many transactions move.
    shard: i16,
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

impl PgWrite<'_> {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Db<'_>) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let mut db = self.db.borrow_mut();
        f(&mut db)
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

    /// The next number of a gap-free series (`block_changes`, `anomalies`).
    fn next_number(&self, series: &'static str) -> Result<u64, LedgerError> {
        let row = self
            .db
            .borrow_mut()
            .query_opt(
                "UPDATE ledger_sequences SET last = last + 1 WHERE name = $1 RETURNING last",
                &[&series],
            )
            .map_err(|e| db_error(&e))?
            .ok_or_else(|| LedgerError::Database(format!("no series {series}")))?;
        Ok(unbig(row.get(0)))
    }

    fn post_raw(
        &self,
        time_ms: u64,
        from: &str,
        to: &str,
        amount_minor: i64,
        reference: &str,
    ) -> Result<Posting, LedgerError> {
        rules::check_posting(from, to, amount_minor)?;
        // Each side's shard moves by the amount, unless that would leave i64 (then nothing
        // moves and the posting is refused; the transaction goes on, as under LMDB).
        if !self.add_balance(from, -amount_minor)? {
            return Err(LedgerError::InvalidPosting(
                "an account balance would overflow",
            ));
        }
        if !self.add_balance(to, amount_minor)? {
            self.add_balance(from, amount_minor)?;
            return Err(LedgerError::InvalidPosting(
                "an account balance would overflow",
            ));
        }
        let row = self
            .db
            .borrow_mut()
            .query_opt(
                "INSERT INTO postings (time_ms, from_account, to_account, amount_minor, reference) \
                 VALUES ($1, $2, $3, $4, $5) RETURNING seq",
                &[&big(time_ms), &from, &to, &amount_minor, &reference],
            )
            .map_err(|e| db_error(&e))?
            .ok_or_else(|| LedgerError::Database("no posting number".into()))?;
        Ok(Posting {
            seq: unbig(row.get(0)),
            time_ms,
            from: from.to_string(),
            to: to.to_string(),
            amount_minor,
            reference: reference.to_string(),
        })
    }

    /// Adds `delta` to `account`'s shard (a card's account: its one shard; another account:
    /// this connection's), unless the shard would leave i64 (`false`, nothing changed).
    fn add_balance(&self, account: &str, delta: i64) -> Result<bool, LedgerError> {
        let shard = if account.starts_with("card:") {
            0
        } else {
            self.shard
        };
        let row = self
            .db
            .borrow_mut()
            .query_opt(
                "INSERT INTO balances (account, shard, balance_minor) VALUES ($1, $2, $3) \
                 ON CONFLICT (account, shard) DO UPDATE \
                 SET balance_minor = balances.balance_minor + EXCLUDED.balance_minor \
                 WHERE balances.balance_minor::numeric + EXCLUDED.balance_minor::numeric \
                 BETWEEN -9223372036854775808 AND 9223372036854775807 \
                 RETURNING balance_minor",
                &[&account, &shard, &delta],
            )
            .map_err(|e| db_error(&e))?;
        Ok(row.is_some())
    }

    fn store_card(&self, uid: &[u8; 7], shadow: &CardShadow) -> Result<(), LedgerError> {
        let rec = to_json(shadow)?;
        self.exec(
            "INSERT INTO cards (uid, record) VALUES ($1, $2) \
             ON CONFLICT (uid) DO UPDATE SET record = EXCLUDED.record",
            &[&uid_hex(uid), &rec],
        )?;
        Ok(())
    }

    fn store_payment(&self, p: &Payment) -> Result<(), LedgerError> {
        let rec = to_json(p)?;
        self.exec(
            "INSERT INTO payments (id, merchant, order_id, record) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET merchant = EXCLUDED.merchant, \
             order_id = EXCLUDED.order_id, record = EXCLUDED.record",
            &[&p.id, &p.merchant, &p.order_id, &rec],
        )?;
        Ok(())
    }

    fn store_refund(&self, r: &Refund) -> Result<(), LedgerError> {
        let (rec, state) = (to_json(r)?, word(&r.state)?);
        self.exec(
            "INSERT INTO refunds (id, state, created_ms, record) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, \
             created_ms = EXCLUDED.created_ms, record = EXCLUDED.record",
            &[&r.id, &state, &big(r.created_ms), &rec],
        )?;
        Ok(())
    }

    fn store_notification(&self, n: &Notification) -> Result<(), LedgerError> {
        let rec = to_json(n)?;
        self.exec(
            "INSERT INTO notifications (payment_id, next_attempt_ms, delivered, record) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (payment_id) DO UPDATE SET \
             next_attempt_ms = EXCLUDED.next_attempt_ms, delivered = EXCLUDED.delivered, \
             record = EXCLUDED.record",
            &[
                &n.payment_id,
                &big(n.next_attempt_ms),
                &n.delivered_ms.is_some(),
                &rec,
            ],
        )?;
        Ok(())
    }

    fn store_intent(&self, uid: &[u8; 7], intent: &LoadIntent) -> Result<(), LedgerError> {
        let (rec, state, kind) = (to_json(intent)?, word(&intent.state)?, word(&intent.kind)?);
        self.exec(
            "INSERT INTO load_intents (uid, tmc_before, attempt, state, kind, record) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (uid, tmc_before, attempt) DO UPDATE \
             SET state = EXCLUDED.state, kind = EXCLUDED.kind, record = EXCLUDED.record",
            &[
                &uid_hex(uid),
                &i64::from(intent.tmc_before),
                &i32::from(intent.attempt),
                &state,
                &kind,
                &rec,
            ],
        )?;
        Ok(())
    }

    fn gap(&self, uid: &[u8; 7]) -> Result<Option<GapClock>, LedgerError> {
        let row = self
            .db
            .borrow_mut()
            .query_opt(
                "SELECT from_tmc, since_ms, reported FROM counter_gaps WHERE uid = $1",
                &[&uid_hex(uid)],
            )
            .map_err(|e| db_error(&e))?;
        Ok(row.map(|r| GapClock {
            from_tmc: u32::try_from(r.get::<_, i64>(0)).unwrap_or(u32::MAX),
            since_ms: unbig(r.get(1)),
            reported: r.get(2),
        }))
    }

    fn put_gap(&self, uid: &[u8; 7], g: &GapClock) -> Result<(), LedgerError> {
        self.exec(
            "INSERT INTO counter_gaps (uid, from_tmc, since_ms, reported) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (uid) DO UPDATE SET from_tmc = EXCLUDED.from_tmc, \
             since_ms = EXCLUDED.since_ms, reported = EXCLUDED.reported",
            &[
                &uid_hex(uid),
                &i64::from(g.from_tmc),
                &big(g.since_ms),
                &g.reported,
            ],
        )?;
        Ok(())
    }

    fn delete_gap(&self, uid: &[u8; 7]) -> Result<(), LedgerError> {
        self.exec("DELETE FROM counter_gaps WHERE uid = $1", &[&uid_hex(uid)])?;
        Ok(())
    }

    /// See `LedgerCore::book_counter` (LMDB): the same steps.
    fn book(
        &mut self,
        uid: &[u8; 7],
        tmc: u32,
        balance_after_minor: i32,
        delta_minor: i64,
        now_ms: u64,
    ) -> Result<Booking, LedgerError> {
        let mut c = self.card(uid)?;
        let booking = c.book(tmc, balance_after_minor, delta_minor);
        if booking != Booking::Duplicate {
            self.store_card(uid, &c)?;
            match rules::gap_after_booking(&c, now_ms, || self.gap(uid))? {
                GapAfterBooking::Filled { unblock } => {
                    self.delete_gap(uid)?;
                    if unblock {
                        self.set_blocked(uid, false, rules::GAP_FILLED, now_ms)?;
                    }
                }
                GapAfterBooking::Start(clock) => self.put_gap(uid, &clock)?,
                GapAfterBooking::Keep => {}
            }
        }
        Ok(booking)
    }

    fn observe(
        &mut self,
        uid: &[u8; 7],
        tmc: u32,
        balance_minor: i32,
    ) -> Result<CardShadow, LedgerError> {
        let mut c = self.card(uid)?;
        if tmc >= c.last_tmc {
            c.last_tmc = tmc;
            c.last_reported_balance_minor = Some(balance_minor);
            self.store_card(uid, &c)?;
        }
        Ok(c)
    }

    fn payment_completed(
        &mut self,
        intent: &LoadIntent,
        tmc: u32,
        now_ms: u64,
    ) -> Result<Payment, LedgerError> {
        let id = intent.payment_id.as_deref().unwrap_or_default();
        let mut p = self
            .payment(id)?
            .ok_or_else(|| LedgerError::PaymentNotOpen {
                id: id.to_string(),
                why: "the intent's payment is gone".into(),
            })?;
        let notification = rules::pay(&mut p, intent, tmc, now_ms);
        self.store_payment(&p)?;
        if let Some(n) = notification {
            if self.notification(&p.id)?.is_none() {
                self.store_notification(&n)?;
            }
        }
        Ok(p)
    }

    fn payment_voided(&mut self, intent: &LoadIntent) -> Result<(), LedgerError> {
        let id = intent.payment_id.as_deref().unwrap_or_default();
        let Some(mut p) = self.payment(id)? else {
            return Ok(());
        };
        let (day, amount) = (
            intent.created_ms / 86_400_000,
            i64::from(intent.amount_minor),
        );
        self.add_funding_day(PAYMENT_CARD_DAY, &intent.uid, day, -amount)?;
        self.add_funding_day(PAYMENT_MERCHANT_DAY, &p.merchant, day, -amount)?;
        if rules::reopen_payment(&mut p, intent) {
            self.store_payment(&p)?;
        }
        Ok(())
    }

    fn refund_credited(
        &mut self,
        intent: &LoadIntent,
        tmc: u32,
        now_ms: u64,
    ) -> Result<Refund, LedgerError> {
        let id = intent.payment_id.as_deref().unwrap_or_default();
        let mut r = self
            .refund(id)?
            .ok_or_else(|| LedgerError::RefundRefused(format!("refund {id} is gone")))?;
        rules::credit_refund(&mut r, tmc, now_ms);
        self.store_refund(&r)?;
        Ok(r)
    }

    fn refund_voided(&mut self, intent: &LoadIntent) -> Result<(), LedgerError> {
        let id = intent.payment_id.as_deref().unwrap_or_default();
        let Some(mut r) = self.refund(id)? else {
            return Ok(());
        };
        if rules::reopen_refund(&mut r, intent) {
            self.store_refund(&r)?;
        }
        Ok(())
    }
}

impl LedgerRead for PgWrite<'_> {
    fn balance(&self, account: &str) -> Result<i64, LedgerError> {
        self.with(|db| q::balance(db, account))
    }

    fn balances(&self) -> Result<Vec<(String, i64)>, LedgerError> {
        self.with(q::balances)
    }

    fn postings_with_prefix(&self, prefix: &str) -> Result<Vec<Posting>, LedgerError> {
        self.with(|db| q::postings_with_prefix(db, prefix))
    }

    fn card(&self, uid: &[u8; 7]) -> Result<CardShadow, LedgerError> {
        self.with(|db| Ok(q::card_opt(db, uid)?.unwrap_or_default()))
    }

    fn funding_day_total(
        &self,
        source: &str,
        instrument: &str,
        day: u64,
    ) -> Result<i64, LedgerError> {
        self.with(|db| q::funding_day_total(db, source, instrument, day))
    }

    fn anomalies(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, Anomaly)>, u64), LedgerError> {
        self.with(|db| q::anomalies(db, after, limit))
    }

    fn all_cards(&self) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        self.with(q::all_cards)
    }

    fn block_changes(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<BlockChange>, u64), LedgerError> {
        self.with(|db| q::block_changes(db, after, limit))
    }

    fn voucher(&self, code: &str) -> Result<Option<Voucher>, LedgerError> {
        self.with(|db| q::voucher(db, code))
    }

    fn card_known(&self, uid: &[u8; 7]) -> Result<bool, LedgerError> {
        self.with(|db| Ok(q::card_opt(db, uid)?.is_some()))
    }

    fn intent(&self, uid: &[u8; 7], tmc_before: u32) -> Result<Option<LoadIntent>, LedgerError> {
        self.with(|db| q::intent(db, uid, tmc_before))
    }

    fn open_intents(&self, uid: &[u8; 7]) -> Result<Vec<LoadIntent>, LedgerError> {
        self.with(|db| q::open_intents(db, uid))
    }

    fn all_intents(&self) -> Result<Vec<LoadIntent>, LedgerError> {
        self.with(q::all_intents)
    }

    fn idempotent(&self, key: &str) -> Result<Option<serde_json::Value>, LedgerError> {
        self.with(|db| q::idempotent(db, key))
    }

    fn instrument(&self, source: &str, id: &str) -> Result<Option<Instrument>, LedgerError> {
        self.with(|db| q::instrument(db, source, id))
    }

    fn instruments_of(&self, owner: &str) -> Result<Vec<Instrument>, LedgerError> {
        self.with(|db| q::instruments_of(db, owner))
    }

    fn payment(&self, id: &str) -> Result<Option<Payment>, LedgerError> {
        self.with(|db| q::payment(db, id))
    }

    fn payment_for_order(
        &self,
        merchant: &str,
        order_id: &str,
    ) -> Result<Option<String>, LedgerError> {
        self.with(|db| q::payment_for_order(db, merchant, order_id))
    }

    fn refund(&self, id: &str) -> Result<Option<Refund>, LedgerError> {
        self.with(|db| q::refund(db, id))
    }

    fn refunds_uncollected(
        &self,
        made_by_ms: u64,
        limit: usize,
    ) -> Result<Vec<Refund>, LedgerError> {
        self.with(|db| q::refunds_uncollected(db, made_by_ms, limit))
    }

    fn notification(&self, payment_id: &str) -> Result<Option<Notification>, LedgerError> {
        self.with(|db| q::notification(db, payment_id))
    }

    fn notifications_due(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Notification>, LedgerError> {
        self.with(|db| q::notifications_due(db, now_ms, limit))
    }
}

impl LedgerWrite for PgWrite<'_> {
    fn post_any(
        &mut self,
        _: LedgerOnly,
        time_ms: u64,
        from: &str,
        to: &str,
        amount_minor: i64,
        reference: &str,
    ) -> Result<Posting, LedgerError> {
        self.post_raw(time_ms, from, to, amount_minor, reference)
    }

    fn book_counter(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        tmc: u32,
        balance_after_minor: i32,
        delta_minor: i64,
        now_ms: u64,
    ) -> Result<Booking, LedgerError> {
        self.book(uid, tmc, balance_after_minor, delta_minor, now_ms)
    }

    fn observe_counter(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        tmc: u32,
        balance_minor: i32,
    ) -> Result<CardShadow, LedgerError> {
        self.observe(uid, tmc, balance_minor)
    }

    fn put_payment(&mut self, _: LedgerOnly, payment: &Payment) -> Result<(), LedgerError> {
        self.store_payment(payment)
    }

    fn put_refund(&mut self, _: LedgerOnly, refund: &Refund) -> Result<(), LedgerError> {
        self.store_refund(refund)
    }

    fn put_notification(&mut self, n: &Notification) -> Result<(), LedgerError> {
        self.store_notification(n)
    }

    fn put_card(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        shadow: &CardShadow,
    ) -> Result<(), LedgerError> {
        self.store_card(uid, shadow)
    }

    fn add_funding_day(
        &mut self,
        source: &str,
        instrument: &str,
        day: u64,
        delta_minor: i64,
    ) -> Result<(), LedgerError> {
        let total = self
            .funding_day_total(source, instrument, day)?
            .checked_add(delta_minor)
            .ok_or(LedgerError::InvalidPosting("a day total would overflow"))?;
        self.exec(
            "INSERT INTO funding_days (source, instrument, day, total_minor) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (source, instrument, day) DO UPDATE SET total_minor = EXCLUDED.total_minor",
            &[&source, &instrument, &big(day), &total],
        )?;
        Ok(())
    }

    fn record_anomaly(&mut self, a: &crate::clearing::Anomaly) -> Result<u64, LedgerError> {
        let rec = to_json(a)?;
        let seq = self.next_number("anomalies")?;
        self.exec(
            "INSERT INTO anomalies (seq, kind, card_uid, record) VALUES ($1, $2, $3, $4)",
            &[&big(seq), &a.kind, &a.card_uid, &rec],
        )?;
        Ok(seq)
    }

    /// See `LedgerCore::sweep_gaps` (LMDB): the same steps.
    fn sweep_gaps(&mut self, now_ms: u64, older_than_ms: u64) -> Result<GapSweep, LedgerError> {
        let rows = self
            .db
            .borrow_mut()
            .query(
                "SELECT uid, from_tmc, since_ms, reported FROM counter_gaps WHERE NOT reported ORDER BY uid",
                &[],
            )
            .map_err(|e| db_error(&e))?;
        let mut due = Vec::new();
        for r in &rows {
            let clock = GapClock {
                from_tmc: u32::try_from(r.get::<_, i64>(1)).unwrap_or(u32::MAX),
                since_ms: unbig(r.get(2)),
                reported: r.get(3),
            };
            let uid: String = r.get(0);
            if now_ms.saturating_sub(clock.since_ms) >= older_than_ms {
                if let Some(uid) = hex::decode(&uid)
                    .ok()
                    .and_then(|b| <[u8; 7]>::try_from(b).ok())
                {
                    due.push((uid, clock));
                }
            }
        }
        let mut sweep = GapSweep::default();
        for (uid, mut clock) in due {
            let c = self.card(&uid)?;
            let open = self.open_intents(&uid)?;
            let (anomaly, block) =
                match rules::gap_decision(&uid, &c, &open, clock.since_ms, now_ms) {
                    GapDecision::Closed => {
                        self.delete_gap(&uid)?;
                        continue;
                    }
                    GapDecision::Report { anomaly, block } => (anomaly, block),
                };
            self.record_anomaly(&anomaly)?;
            sweep.anomalies.push(anomaly);
            if block
                && self
                    .set_blocked(&uid, true, GAP_BLOCK_REASON, now_ms)?
                    .is_some()
            {
                sweep.cards_blocked += 1;
            }
            clock.reported = true;
            self.put_gap(&uid, &clock)?;
        }
        Ok(sweep)
    }

    fn set_blocked(
        &mut self,
        uid: &[u8; 7],
        blocked: bool,
        reason: &str,
        time_ms: u64,
    ) -> Result<Option<u64>, LedgerError> {
        let mut c = self.card(uid)?;
        if c.blocked == blocked {
            return Ok(None);
        }
        c.blocked = blocked;
        c.block_reason = blocked.then(|| reason.to_string());
        self.store_card(uid, &c)?;
        let version = self.next_number("block_changes")?;
        let action = if blocked { "block" } else { "unblock" };
        self.exec(
            "INSERT INTO block_changes (version, card_uid, action, reason, time_ms) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &big(version),
                &uid_hex(uid),
                &action,
                &reason,
                &big(time_ms),
            ],
        )?;
        Ok(Some(version))
    }

    fn put_voucher(&mut self, v: &Voucher) -> Result<(), LedgerError> {
        let rec = to_json(v)?;
        self.exec(
            "INSERT INTO vouchers (code, record) VALUES ($1, $2) \
             ON CONFLICT (code) DO UPDATE SET record = EXCLUDED.record",
            &[&v.code, &rec],
        )?;
        Ok(())
    }

    fn insert_intent(&mut self, uid: &[u8; 7], intent: &mut LoadIntent) -> Result<(), LedgerError> {
        let existing = self.with(|db| q::intents_at(db, uid, intent.tmc_before))?;
        if existing.iter().any(|i| i.state != IntentState::Voided) {
            return Err(LedgerError::IntentExists {
                uid: hex::encode_upper(uid),
                tmc: intent.tmc_before,
            });
        }
        intent.attempt = u16::try_from(existing.len())
            .map_err(|_| LedgerError::InvalidPosting("too many attempts at one counter"))?;
        self.store_intent(uid, intent)
    }

    fn put_intent(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        intent: &LoadIntent,
    ) -> Result<(), LedgerError> {
        self.store_intent(uid, intent)
    }

    /// See `LmdbWrite::complete_intent` and `LedgerCore::complete_intent` (LMDB): the same
    /// steps.
    fn complete_intent(
        &mut self,
        proof: Completion<'_>,
        now_ms: u64,
    ) -> Result<Option<FundingAction>, LedgerError> {
        let (uid, tmc_before) = (proof.uid(), proof.tmc_before());
        if let Completion::Proved(v) = &proof {
            let r = v.receipt();
            if let Some(intent) = self.intent(&uid, tmc_before)? {
                rules::check_proof(&intent, &uid, tmc_before, r.kind(), r.amount_minor())?;
            }
        }
        let before_learned = match tmc_before.checked_add(1) {
            Some(tmc) => self.changed_before_learned(&uid, tmc)?,
            None => false,
        };
        let balance_after_minor = proof.balance_after_minor();
        let mut intent = self
            .intent(&uid, tmc_before)?
            .ok_or_else(|| LedgerError::NoIntent {
                uid: hex::encode_upper(uid),
                tmc: tmc_before,
            })?;
        if intent.state != IntentState::Authorised {
            return Ok(None);
        }
        let tmc = tmc_before.checked_add(1).ok_or(LedgerError::NoIntent {
            uid: hex::encode_upper(uid),
            tmc: tmc_before,
        })?;
        let settled = match intent.kind {
            IntentKind::Load | IntentKind::Reversal => Settled::Funding,
            IntentKind::Refund => Settled::Refund(self.refund_credited(&intent, tmc, now_ms)?),
            IntentKind::Payment => Settled::Payment(self.payment_completed(&intent, tmc, now_ms)?),
        };
        let (m, action) = rules::complete(&mut intent, &uid, tmc, before_learned, settled, now_ms)?;
        self.post_raw(now_ms, &m.from, &m.to, m.amount_minor, &m.reference)?;
        self.store_intent(&uid, &intent)?;
        self.observe(&uid, tmc, balance_after_minor)?;
        self.book(&uid, tmc, balance_after_minor, intent.delta_minor(), now_ms)?;
        Ok(Some(action))
    }

    /// See `LedgerCore::void_intent` (LMDB): the same steps.
    fn void_intent(
        &mut self,
        uid: &[u8; 7],
        tmc_before: u32,
        now_ms: u64,
    ) -> Result<Option<FundingAction>, LedgerError> {
        let Some(mut intent) = self.intent(uid, tmc_before)? else {
            return Ok(None);
        };
        if intent.state != IntentState::Authorised {
            return Ok(None);
        }
        let voided = rules::void(&mut intent, now_ms);
        self.store_intent(uid, &intent)?;
        match voided {
            Voided::Load(day, amount_minor, action) => {
                let mut shadow = self.card(uid)?;
                if rules::give_back_load_day(&mut shadow, day, amount_minor) {
                    self.store_card(uid, &shadow)?;
                }
                if !intent.instrument.is_empty() {
                    self.add_funding_day(
                        &intent.funding_source,
                        &intent.instrument,
                        day,
                        -amount_minor,
                    )?;
                }
                Ok(Some(action))
            }
            Voided::Payment => {
                self.payment_voided(&intent)?;
                Ok(None)
            }
            Voided::Refund => {
                self.refund_voided(&intent)?;
                Ok(None)
            }
            Voided::Reversal { load_tmc_before } => {
                if let Some(before) = load_tmc_before {
                    if let Some(mut load) = self.intent(uid, before)? {
                        if rules::free_reversed_load(&mut load, tmc_before) {
                            self.store_intent(uid, &load)?;
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    fn put_idempotent(&mut self, key: &str, value: &serde_json::Value) -> Result<(), LedgerError> {
        self.exec(
            "INSERT INTO idempotency (key, answer) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET answer = EXCLUDED.answer",
            &[&key, value],
        )?;
        Ok(())
    }

    fn put_instrument(&mut self, i: &Instrument) -> Result<(), LedgerError> {
        let rec = to_json(i)?;
        self.exec(
            "INSERT INTO instruments (source, id, owner, record) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (source, id) DO UPDATE SET owner = EXCLUDED.owner, record = EXCLUDED.record",
            &[&i.source, &i.id, &i.owner, &rec],
        )?;
        Ok(())
    }
}
