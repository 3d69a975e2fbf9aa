//! Card shadows: counters booked once, what the card reported, blocks and their numbered changes.

use super::*;
use crate::ledger::rules::{self, GapAfterBooking};

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

    /// Records what a card reported (its counter and balance, read under MAC).
    pub(super) fn observe_card(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        tmc: u32,
        balance_minor: i32,
    ) -> Result<CardShadow, LedgerError> {
        let mut c = self.card(txn, uid)?;
        if tmc >= c.last_tmc {
            c.last_tmc = tmc;
            c.last_reported_balance_minor = Some(balance_minor);
            self.cards.put(txn, uid, &c)?;
        }
        Ok(c)
    }

    /// Records that the card's transaction at counter `tmc` (leaving `balance_after_minor`) is
    /// booked. Counters only advance `booked_through_tmc` when contiguous; a counter booked
    /// above a gap starts the gap's clock (`now_ms`) for [`LedgerWrite::sweep_gaps`].
    pub(super) fn book_counter(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        tmc: u32,
        balance_after_minor: i32,
        delta_minor: i64,
        now_ms: u64,
    ) -> Result<Booking, LedgerError> {
        let mut c = self.card(txn, uid)?;
        let booking = c.book(tmc, balance_after_minor, delta_minor);
        if booking != Booking::Duplicate {
            self.cards.put(txn, uid, &c)?;
            match rules::gap_after_booking(&c, now_ms, || Ok(self.gaps.get(txn, uid)?))? {
                GapAfterBooking::Filled { unblock } => {
                    self.gaps.delete(txn, uid)?;
                    if unblock {
                        self.set_blocked(txn, uid, false, rules::GAP_FILLED, now_ms)?;
                    }
                }
                GapAfterBooking::Start(clock) => self.gaps.put(txn, uid, &clock)?,
                GapAfterBooking::Keep => {}
            }
        }
        Ok(booking)
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

    /// Blocks or unblocks a card, appending a numbered change when its state changes.
    /// Returns the new version, or `None` when the card already was in that state.
    pub(super) fn set_blocked(
        &self,
        txn: &mut RwTxn<'_>,
        uid: &[u8; 7],
        blocked: bool,
        reason: &str,
        time_ms: u64,
    ) -> Result<Option<u64>, LedgerError> {
        let mut c = self.card(txn, uid)?;
        if c.blocked == blocked {
            return Ok(None);
        }
        c.blocked = blocked;
        c.block_reason = blocked.then(|| reason.to_string());
        self.cards.put(txn, uid, &c)?;
        let version = self.blocks.last(txn)?.map(|(k, _)| k + 1).unwrap_or(1);
        self.blocks.put(
            txn,
            &version,
            &BlockChange {
                version,
                card_uid: hex::encode_upper(uid),
                action: if blocked { "block" } else { "unblock" }.into(),
                reason: reason.to_string(),
                time_ms,
            },
        )?;
        Ok(Some(version))
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
