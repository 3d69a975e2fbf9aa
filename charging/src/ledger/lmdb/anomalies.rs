//! Numbered anomalies, and the sweep of counter gaps that never fill.

use super::*;

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
            let Some(&(first_above, balance_after, delta)) = c.booked_above.first() else {
                self.gaps.delete(txn, &uid)?;
                continue;
            };
            let from_tmc = c.booked_through_tmc.saturating_add(1);
            let to_tmc = first_above - 1;
            let hours = now_ms.saturating_sub(clock.since_ms) / 3_600_000;
            let waiting = self
                .open_intents(txn, &uid)?
                .into_iter()
                .find(|i| i.tmc_before + 1 >= from_tmc && i.tmc_before < first_above);
            // What the missing counters changed: the balance before the first booked counter
            // above the gap, minus the balance after the last one below it.
            let missing = c
                .booked_balance_minor
                .map(|below| i64::from(balance_after) - delta - i64::from(below));
            let (block, detail) = match (waiting, missing) {
                (Some(i), _) => (
                    false,
                    format!(
                        "counters {from_tmc}..={to_tmc} missing for {hours} h; a pending {:?} at counter {} waits for the card",
                        i.kind,
                        i.tmc_before + 1
                    ),
                ),
                (None, Some(m)) if m > 0 => (
                    true,
                    format!(
                        "counters {from_tmc}..={to_tmc} missing for {hours} h and {m} minor units appeared across them with no load booked"
                    ),
                ),
                (None, Some(m)) => (
                    false,
                    format!(
                        "counters {from_tmc}..={to_tmc} missing for {hours} h: {} minor units of debits never cleared",
                        -m
                    ),
                ),
                (None, None) => (
                    false,
                    format!("counters {from_tmc}..={to_tmc} missing for {hours} h"),
                ),
            };
            let anomaly = Anomaly {
                kind: "counter_gap".into(),
                card_uid: hex::encode_upper(uid),
                tmc: from_tmc,
                device_id: 0,
                device_seq: 0,
                detail,
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
