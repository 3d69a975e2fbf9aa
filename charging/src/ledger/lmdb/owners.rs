//! The index of cards by owner (`card_owners`): owner ‖ 0x00 ‖ UID (7) → nothing, so an
//! owner's cards are the keys under its prefix, in UID byte order (the cardholder's cards page
//! reads them, not every card). [`LedgerWrite::set_owner`] is the one step that changes a
//! card's owner, and moves its entry ([`LedgerCore::index_owner`]); an owner never holds a NUL
//! byte (`set_owner` refuses one), so the separator ends the owner. A ledger written before the
//! index has it built once when opened ([`LedgerCore::index_owners`]), and then holds
//! [`super::cards::INDEXED`].

use super::*;

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
        owner: Option<&str>,
    ) -> Result<(), LedgerError> {
        if let Some(b) = before {
            self.card_owners.delete(txn, &owner_key(b, uid))?;
        }
        if let Some(o) = owner {
            self.card_owners.put(txn, &owner_key(o, uid), &[])?;
        }
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

    /// Builds the index of a ledger written before it, at open ([`LedgerCore::build_card_index`]).
    /// Unlike the blocked cards' index it carries no stamp: a build without the index that
    /// wrote owners after it was built (a rollback) leaves it behind; clear `card_owners` and the
    /// next open rebuilds it (docs/pages.md).
    pub(super) fn index_owners(&self, txn: &mut RwTxn<'_>) -> Result<(), LedgerError> {
        self.build_card_index(txn, self.card_owners, &[], |uid, c| {
            c.owner.as_deref().map(|owner| owner_key(owner, uid))
        })
    }
}
