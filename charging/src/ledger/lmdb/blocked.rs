//! The index of blocked cards (`blocked_cards`): UID (7) → nothing, in UID byte order, so the
//! signed blocklist and the console read the blocked cards, not every card.
//! [`LedgerWrite::set_blocked`] is the one step that changes a card's block state, and moves
//! its entry ([`LedgerCore::index_blocked`]). A ledger written before the index has it built
//! once when opened ([`LedgerCore::index_blocked_cards`]), and then holds the marker
//! [`super::cards::INDEXED`] stamped with the latest block version, which every block and
//! unblock moves with the index: a build without the index that blocks or unblocks a card (a
//! rollback) moves the version and not the stamp, and the next open rebuilds the index.

use super::*;

impl LedgerCore {
    /// Puts the card in the index (`blocked`) or takes it out.
    pub(super) fn index_blocked(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        blocked: bool,
    ) -> Result<(), LedgerError> {
        if blocked {
            self.blocked_cards.put(txn, uid, &[])?;
        } else {
            self.blocked_cards.delete(txn, uid)?;
        }
        Ok(())
    }

    /// The blocked cards' shadows, in UID byte order: the index's entries, each card's shadow
    /// read by its key.
    pub(super) fn blocked_cards(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
    ) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        let mut out = Vec::new();
        for entry in self.blocked_cards.iter(txn)? {
            let (key, _) = entry?;
            let Ok(uid) = <[u8; 7]>::try_from(key) else {
                continue; // the marker, INDEXED
            };
            if let Some(shadow) = self.cards.get(txn, &uid)? {
                out.push((uid, shadow));
            }
        }
        Ok(out)
    }

    /// Builds the index at open ([`LedgerCore::build_card_index`]) unless it is stamped with the
    /// latest block version: a ledger written before it, or blocked or unblocked since by a
    /// build without it (a rollback), which moved the version but not the index.
    pub(super) fn index_blocked_cards(&self, txn: &mut RwTxn<'_>) -> Result<(), LedgerError> {
        let latest = self.blocks.last(txn)?.map_or(0, |(v, _)| v);
        self.build_card_index(txn, self.blocked_cards, &latest.to_be_bytes(), |uid, c| {
            c.blocked.then(|| uid.to_vec())
        })
    }

    /// Stamps the index with block version `version`, the one a block or an unblock just took
    /// (with the index moved in the same transaction: [`LedgerCore::index_blocked`]).
    pub(super) fn stamp_blocked_cards(
        &self,
        txn: &mut RwTxn<'_>,
        version: u64,
    ) -> Result<(), LedgerError> {
        Ok(self
            .blocked_cards
            .put(txn, super::cards::INDEXED, &version.to_be_bytes())?)
    }
}
