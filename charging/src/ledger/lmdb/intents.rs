//! Load intents (a load or a reversal) keyed by (card, counter, attempt): their storage; what an
//! intent's completion posts and which funding action follows is decided in `ledger::rules`.

use super::*;
use crate::ledger::rules::{self, Settled, Voided};

impl LedgerCore {
    /// Records a new load intent; refuses it while a live (authorised or completed) intent
    /// exists for the same card counter. Sets `intent.attempt`.
    pub(super) fn insert_intent(
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
    pub(super) fn intent(
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
    pub(super) fn put_intent(
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
    /// posts it as `rules::complete` says (a load funding → card, a reversal card → funding,
    /// …), marks the intent completed and books the counter, in `txn`. `before_learned`: the change happened before
    /// the state clearing learned the card from, so `issuer:float` (which funded the learned
    /// balance, this change included) stands in for the card in the posting. Returns what to
    /// do with the funding once `txn` is durable, or `None` if it was already completed.
    pub(super) fn complete_intent(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        tmc_before: u32,
        balance_after_minor: i32,
        before_learned: bool,
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
        let settled = match intent.kind {
            IntentKind::Load | IntentKind::Reversal => Settled::Funding,
            IntentKind::Refund => Settled::Refund(self.refund_credited(txn, &intent, tmc, now_ms)?),
            IntentKind::Payment => {
                Settled::Payment(self.payment_completed(txn, &intent, tmc, now_ms)?)
            }
        };
        let (m, action) = rules::complete(&mut intent, uid, tmc, before_learned, settled, now_ms)?;
        self.post(txn, now_ms, &m.from, &m.to, m.amount_minor, &m.reference)?;
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
    pub(super) fn void_intent(
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
        let voided = rules::void(&mut intent, now_ms);
        self.put_intent(txn, uid, &intent)?;
        match voided {
            Voided::Load(day, amount_minor, action) => {
                let mut shadow = self.card(txn, uid)?;
                if rules::give_back_load_day(&mut shadow, day, amount_minor) {
                    self.put_card(txn, uid, &shadow)?;
                }
                if !intent.instrument.is_empty() {
                    self.add_funding_day(
                        txn,
                        &intent.funding_source,
                        &intent.instrument,
                        day,
                        -amount_minor,
                    )?;
                }
                Ok(Some(action))
            }
            Voided::Payment => {
                self.payment_voided(txn, &intent)?;
                Ok(None)
            }
            Voided::Refund => {
                self.refund_voided(txn, &intent)?;
                Ok(None)
            }
            Voided::Reversal { load_tmc_before } => {
                if let Some(before) = load_tmc_before {
                    if let Some(mut load) = self.intent(txn, uid, before)? {
                        if rules::free_reversed_load(&mut load, tmc_before) {
                            self.put_intent(txn, uid, &load)?;
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    /// A card's intents that are not settled yet.
    pub(super) fn open_intents(
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
    pub(super) fn all_intents(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
    ) -> Result<Vec<LoadIntent>, LedgerError> {
        let mut out = Vec::new();
        for item in self.intents.iter(txn)? {
            out.push(item?.1);
        }
        Ok(out)
    }
}
