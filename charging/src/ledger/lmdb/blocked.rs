//! The index of blocked cards (`blocked_cards`): UID (7) → nothing, in UID byte order, so the
//! signed blocklist and the console read the blocked cards, not every card.
//! [`LedgerWrite::set_blocked`] is the one step that changes a card's block state, and moves
//! its entry ([`LedgerCore::index_blocked`]). A ledger written before the index has it built
//! once when opened ([`LedgerCore::index_blocked_cards`]), and then holds the marker
//! [`super::cards::INDEXED`].

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

    /// Builds the index of a ledger written before it, at open ([`LedgerCore::build_card_index`]).
    pub(super) fn index_blocked_cards(&self, txn: &mut RwTxn<'_>) -> Result<(), LedgerError> {
        self.build_card_index(txn, self.blocked_cards, |uid, c| {
            c.blocked.then(|| uid.to_vec())
        })
    }
}
