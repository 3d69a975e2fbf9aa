//! The index of blocked cards (`blocked_cards`): UID (7) → nothing, in UID byte order, so the
//! signed blocklist and the console read the blocked cards, not every card.
//! [`LedgerWrite::set_blocked`] is the one step that changes a card's block state, and moves
//! its entry ([`LedgerCore::index_blocked`]). A ledger written before the index has it built
//! once when opened ([`LedgerCore::index_blocked_cards`]), and then holds [`INDEXED`].

use super::*;

/// The key marking the index as built: one byte, shorter than any entry (a UID, 7 bytes).
const INDEXED: &[u8] = &[0];

/// Cards read at a time while the index is built (a few in tests, so that they walk pages).
const BUILD_PAGE: usize = if cfg!(test) { 2 } else { 10_000 };

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
                continue; // INDEXED
            };
            if let Some(shadow) = self.cards.get(txn, &uid)? {
                out.push((uid, shadow));
            }
        }
        Ok(out)
    }

    /// Builds the index of a ledger written before it, in the opening transaction: the cards
    /// walked a page at a time ([`LedgerCore::cards_after`]), each blocked card's entry
    /// written, then [`INDEXED`]. An indexed ledger reads one key.
    pub(super) fn index_blocked_cards(&self, txn: &mut RwTxn<'_>) -> Result<(), LedgerError> {
        if self.blocked_cards.get(txn, INDEXED)?.is_some() {
            return Ok(());
        }
        self.blocked_cards.clear(txn)?;
        crate::ledger::walk_card_pages(
            txn,
            BUILD_PAGE,
            |t, after, n| self.cards_after(t, after, n),
            |t, page| {
                for (uid, _) in page.iter().filter(|(_, c)| c.blocked) {
                    self.blocked_cards.put(t, uid, &[])?;
                }
                Ok(())
            },
        )?;
        self.blocked_cards.put(txn, INDEXED, &[])?;
        Ok(())
    }
}
