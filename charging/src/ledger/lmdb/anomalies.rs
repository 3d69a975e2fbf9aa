//! Numbered anomalies, and the sweep of counter gaps that never fill.

use super::*;
use crate::ledger::rules::{self, GapDecision};

impl LedgerCore {
    /// Appends an anomaly (numbered from 1) and returns its number.
    pub(super) fn record_anomaly(
        &self,
        txn: &mut RwTxn<'_>,
        a: &Anomaly,
    ) -> Result<u64, LedgerError> {
        let seq = self.anomalies.last(txn)?.map(|(k, _)| k + 1).unwrap_or(1);
        self.anomalies.put(txn, &seq, a)?;
        Ok(seq)
    }

    /// Anomalies numbered above `after`, at most `limit`, and the last number.
    pub(super) fn anomalies(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, Anomaly)>, u64), LedgerError> {
        let last = self.anomalies.last(txn)?.map(|(k, _)| k).unwrap_or(0);
        let mut out = Vec::new();
        let from = after.saturating_add(1);
        for item in self.anomalies.range(txn, &(from..))?.take(limit) {
            out.push(item?);
        }
        Ok((out, last))
    }

    /// A counter gap that never fills: every card whose lowest gap has been open longer than
    /// `older_than_ms` is reported once as a `counter_gap` anomaly. When the card's own proved
    /// balances show value *appearing* across the gap (more than the booked changes explain)
    /// and no load is pending there, the card is blocked ([`GAP_BLOCK_REASON`]): a credit the
    /// back office never made is a cloned card or a leaked key; if the gap later fills with
    /// proved transactions (a franchise terminal reporting late), the block is lifted. Missing
    /// debits (value that left the card at a terminal whose taps never arrived) are the
    /// operator's loss, not the cardholder's fault, and a pending load or reversal in the gap
    /// waits for the card: both are reported, not blocked. Returns the anomalies raised.
    pub(super) fn sweep_gaps(
        &self,
        txn: &mut RwTxn<'_>,
        now_ms: u64,
        older_than_ms: u64,
    ) -> Result<GapSweep, LedgerError> {
        let mut due = Vec::new();
        for item in self.gaps.iter(txn)? {
            let (uid, clock) = item?;
            if !clock.reported && now_ms.saturating_sub(clock.since_ms) >= older_than_ms {
                if let Ok(uid) = <[u8; 7]>::try_from(uid) {
                    due.push((uid, clock));
                }
            }
        }
        let mut sweep = GapSweep::default();
        for (uid, mut clock) in due {
            let c = self.card(txn, &uid)?;
            let open = self.open_intents(txn, &uid)?;
            let (anomaly, block) =
                match rules::gap_decision(&uid, &c, &open, clock.since_ms, now_ms) {
                    GapDecision::Closed => {
                        self.gaps.delete(txn, &uid)?;
                        continue;
                    }
                    GapDecision::Report { anomaly, block } => (anomaly, block),
                };
            self.record_anomaly(txn, &anomaly)?;
            sweep.anomalies.push(anomaly);
            if block
                && self
                    .set_blocked(txn, &uid, true, GAP_BLOCK_REASON, now_ms)?
                    .is_some()
            {
                sweep.cards_blocked += 1;
            }
            // Reported once; the clock restarts when the gap moves or a new one opens.
            clock.reported = true;
            self.gaps.put(txn, &uid, &clock)?;
        }
        Ok(sweep)
    }
}
