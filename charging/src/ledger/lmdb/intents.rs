//! Load intents (a load, a reversal, a payment, a refund) keyed by (card, counter, attempt):
//! their storage only (inserting, completing and voiding one are the ledger's steps,
//! `interface/steps.rs`).

use super::*;

impl LedgerCore {
    /// Every intent at (card, counter), by attempt.
    pub(super) fn intents_at(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
        tmc_before: u32,
    ) -> Result<Vec<LoadIntent>, LedgerError> {
        kept(
            self.intents
                .prefix_iter(txn, &counter_prefix(uid, tmc_before)[..])?,
            |_, i| Some(i),
        )
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

    /// A card's intents that are not settled yet.
    pub(super) fn open_intents(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
    ) -> Result<Vec<LoadIntent>, LedgerError> {
        kept(self.intents.prefix_iter(txn, &uid[..])?, |_, i| {
            (i.state == IntentState::Authorised).then_some(i)
        })
    }

    /// All intents (reports, reconciliation).
    pub(super) fn all_intents(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
    ) -> Result<Vec<LoadIntent>, LedgerError> {
        kept(self.intents.iter(txn)?, |_, i| Some(i))
    }
}
