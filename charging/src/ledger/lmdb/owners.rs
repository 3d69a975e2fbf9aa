//! The index of cards by owner (`card_owners`): owner ‖ 0x00 ‖ UID (7) → nothing, so an
//! owner's cards are the keys under its prefix, in UID byte order (the cardholder's cards page
//! reads them, not every card). [`LedgerWrite::set_owner`] is the one step that changes a
//! card's owner, and moves its entry ([`LedgerCore::index_owner`]); an owner never holds a NUL
//! byte (`set_owner` refuses one), so the separator ends the owner. A ledger written before the
//! index has it built once when opened ([`LedgerCore::index_owners`]), and then holds
//! [`INDEXED`].

use super::*;

/// The key marking the index as built: shorter than any entry (an entry is at least the
/// separator and a UID, 8 bytes), so no owner's cards include it.
const INDEXED: &[u8] = &[0];

/// Cards read at a time while the index is built (a few in tests, so that they walk pages).
const BUILD_PAGE: usize = if cfg!(test) { 2 } else { 10_000 };

/// An entry's key: owner ‖ 0x00 ‖ UID.
fn owner_key(owner: &str, uid: &[u8; 7]) -> Vec<u8> {
    let mut key = Vec::with_capacity(owner.len() + 8);
    key.extend_from_slice(owner.as_bytes());
    key.push(0);
    key.extend_from_slice(uid);
    key
}

impl LedgerCore {
    /// Moves the card's entry from `before` (its owner until now) to `owner`.
    pub(super) fn index_owner(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        before: Option<&str>,
        owner: &str,
    ) -> Result<(), LedgerError> {
        if let Some(b) = before {
            self.card_owners.delete(txn, &owner_key(b, uid))?;
        }
        self.card_owners.put(txn, &owner_key(owner, uid), &[])?;
        Ok(())
    }

    /// The UIDs of `owner`'s cards, in UID byte order: the keys under owner ‖ 0x00.
    pub(super) fn cards_of_owner(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        owner: &str,
    ) -> Result<Vec<[u8; 7]>, LedgerError> {
        let mut prefix = owner.as_bytes().to_vec();
        prefix.push(0);
        kept(self.card_owners.prefix_iter(txn, &prefix)?, |k, _| {
            k.get(prefix.len()..)
                .and_then(|uid| <[u8; 7]>::try_from(uid).ok())
        })
    }

    /// Builds the index of a ledger written before it, in the opening transaction: the cards
    /// walked a page at a time ([`LedgerCore::cards_after`]), each owned card's entry written,
    /// then [`INDEXED`]. An indexed ledger reads one key. (A build without the index writing
    /// to the ledger after it was built would leave the index behind: delete [`INDEXED`]
    /// then, and the next open rebuilds it.)
    pub(super) fn index_owners(&self, txn: &mut RwTxn<'_>) -> Result<(), LedgerError> {
        if self.card_owners.get(txn, INDEXED)?.is_some() {
            return Ok(());
        }
        self.card_owners.clear(txn)?;
        crate::ledger::walk_card_pages(
            txn,
            BUILD_PAGE,
            |t, after, n| self.cards_after(t, after, n),
            |t, page| {
                for (uid, shadow) in page {
                    if let Some(owner) = &shadow.owner {
                        self.card_owners.put(t, &owner_key(owner, uid), &[])?;
                    }
                }
                Ok(())
            },
        )?;
        self.card_owners.put(txn, INDEXED, &[])?;
        Ok(())
    }
}
