//! Card shadows and the numbered block changes (storage only: booking a counter, observing a
//! card and blocking it are the ledger's steps, `interface/steps.rs`).

use super::*;

impl LedgerCore {
    /// The card's shadow record.
    pub(super) fn card(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
    ) -> Result<CardShadow, LedgerError> {
        Ok(self.cards.get(txn, uid)?.unwrap_or_default())
    }

    /// Whether the card has a shadow record.
    pub(super) fn card_known(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
    ) -> Result<bool, LedgerError> {
        Ok(self.cards.get(txn, uid)?.is_some())
    }

    /// Stores the card's shadow record.
    pub(super) fn put_card(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        shadow: &CardShadow,
    ) -> Result<(), LedgerError> {
        Ok(self.cards.put(txn, uid, shadow)?)
    }

    /// Every card's shadow record (reconciliation).
    pub(super) fn all_cards(
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

    /// Appends a block change numbered after the last one; returns its version.
    pub(super) fn append_block_change(
        &self,
        txn: &mut RwTxn<'_>,
        mut change: BlockChange,
    ) -> Result<u64, LedgerError> {
        let version = self.blocks.last(txn)?.map(|(k, _)| k + 1).unwrap_or(1);
        change.version = version;
        self.blocks.put(txn, &version, &change)?;
        Ok(version)
    }

    /// Block changes after `after`, at most `limit`, and the latest version.
    pub(super) fn block_changes(
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
}
