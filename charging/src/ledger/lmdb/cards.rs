//! Card shadows and the numbered block changes (storage only: booking a counter, observing a
//! card and blocking it are the ledger's steps, `interface/steps.rs`).

use super::*;

/// The most a page of cards reserves up front (a caller may ask for more and get it).
const PAGE_CAPACITY: usize = 10_000;

/// The key marking an index of the cards as built: one byte, shorter than any entry (an entry
/// holds a UID, 7 bytes), so no read of the entries includes it.
pub(super) const INDEXED: &[u8] = &[0];

/// Cards read at a time while an index is built (a few in tests, so that they walk pages).
const BUILD_PAGE: usize = if cfg!(test) { 2 } else { 10_000 };

impl LedgerCore {
    /// Builds `index`, an index of the cards, for a ledger written before it, in the opening
    /// transaction, unless its [`INDEXED`] holds `stamp`: cleared, the cards walked a page at a
    /// time, the key `entry` gives a card written for each card it gives one, then [`INDEXED`]
    /// with `stamp`. A built index reads one key. The stamp tells an index left behind by a
    /// build without it that wrote to the ledger (the blocked cards': the latest block version,
    /// which every block and unblock moves).
    pub(super) fn build_card_index(
        &self,
        txn: &mut RwTxn<'_>,
        index: Database<Bytes, Bytes>,
        stamp: &[u8],
        entry: impl Fn(&[u8; 7], &CardShadow) -> Option<Vec<u8>>,
    ) -> Result<(), LedgerError> {
        if index.get(txn, INDEXED)? == Some(stamp) {
            return Ok(());
        }
        index.clear(txn)?;
        crate::ledger::walk_card_pages(
            txn,
            BUILD_PAGE,
            |t, after, n| self.cards_after(t, after, n),
            |t, page| {
                for key in page.iter().filter_map(|(uid, c)| entry(uid, c)) {
                    index.put(t, &key, &[])?;
                }
                Ok(())
            },
        )?;
        index.put(txn, INDEXED, stamp)?;
        Ok(())
    }

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

    /// The first `limit` card shadows whose UID is above `after` (`None`: from the first), in
    /// key (UID byte) order: a cursor from the key after `after`.
    pub(super) fn cards_after(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        after: Option<[u8; 7]>,
        limit: usize,
    ) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        use std::ops::Bound;
        let mut out = Vec::with_capacity(limit.min(PAGE_CAPACITY));
        if limit == 0 {
            return Ok(out);
        }
        let from = match &after {
            Some(uid) => Bound::Excluded(&uid[..]),
            None => Bound::Unbounded,
        };
        for entry in self.cards.range(txn, &(from, Bound::Unbounded))? {
            let (k, v) = entry?;
            if let Ok(uid) = <[u8; 7]>::try_from(k) {
                out.push((uid, v));
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Moves the card's entries in the indexes of cards from its shadow `before` to `after`:
    /// by owner ([`LedgerCore::index_owner`]) and blocked ([`LedgerCore::index_blocked`]),
    /// each only where it changed.
    pub(super) fn index_card(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        before: &CardShadow,
        after: &CardShadow,
    ) -> Result<(), LedgerError> {
        if before.owner != after.owner {
            self.index_owner(txn, uid, before.owner.as_deref(), after.owner.as_deref())?;
        }
        if before.blocked != after.blocked {
            self.index_blocked(txn, uid, after.blocked)?;
        }
        Ok(())
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
        self.index_block_change(txn, &change)?;
        self.stamp_blocked_cards(txn, version)?;
        Ok(version)
    }

    /// Adds `change` to the per-card index (a change whose UID is not 7 bytes of hex, which
    /// `set_blocked` never writes, is left out).
    fn index_block_change(
        &self,
        txn: &mut RwTxn<'_>,
        change: &BlockChange,
    ) -> Result<(), LedgerError> {
        if let Some(key) = by_card_key(&change.card_uid, change.version) {
            self.blocks_by_card.put(txn, &key, &[])?;
        }
        Ok(())
    }

    /// Indexes the block changes of a ledger written before the per-card index (or by a build
    /// without it since): rebuilt whole, in the opening transaction, when it does not hold as
    /// many entries as there are changes; otherwise nothing but two counts is read.
    pub(super) fn index_block_changes(&self, txn: &mut RwTxn<'_>) -> Result<(), LedgerError> {
        if self.blocks_by_card.len(txn)? == self.blocks.len(txn)? {
            return Ok(());
        }
        self.blocks_by_card.clear(txn)?;
        let changes: Vec<BlockChange> = self
            .blocks
            .iter(txn)?
            .map(|item| item.map(|(_, c)| c))
            .collect::<Result<_, _>>()?;
        for c in &changes {
            self.index_block_change(txn, c)?;
        }
        Ok(())
    }

    /// The card's latest block change: the last key under its UID in the per-card index, one
    /// cursor seek.
    pub(super) fn latest_block_change(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
    ) -> Result<Option<BlockChange>, LedgerError> {
        Ok(self.card_block_changes(txn, uid, 1)?.pop())
    }

    /// The card's block changes, newest first, at most `limit`: its keys in the per-card index
    /// read backwards from its highest version, each change then got by version.
    pub(super) fn card_block_changes(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
        limit: usize,
    ) -> Result<Vec<BlockChange>, LedgerError> {
        let mut out = Vec::new();
        for item in self.blocks_by_card.rev_prefix_iter(txn, uid)?.take(limit) {
            let (key, _) = item?;
            let Some(version) = key.get(7..).and_then(|v| <[u8; 8]>::try_from(v).ok()) else {
                continue;
            };
            if let Some(c) = self.blocks.get(txn, &u64::from_be_bytes(version))? {
                out.push(c);
            }
        }
        Ok(out)
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

/// The per-card index's key of a change: UID (7) ‖ version (u64 BE); `None` when the change's
/// UID is not 7 bytes of hex.
fn by_card_key(card_uid: &str, version: u64) -> Option<[u8; 15]> {
    let uid: [u8; 7] = hex::decode(card_uid).ok()?.try_into().ok()?;
    let mut key = [0u8; 15];
    key[..7].copy_from_slice(&uid);
    key[7..].copy_from_slice(&version.to_be_bytes());
    Some(key)
}
