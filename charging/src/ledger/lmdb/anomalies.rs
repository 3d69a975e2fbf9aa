//! Numbered anomalies, and the gap clocks the sweep reads (the sweep itself is a ledger step,
//! `interface/steps.rs`).

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

    /// The card's anomalies among the newest `within`, newest first (no per-card index: a
    /// reverse scan of at most `within` entries).
    pub(super) fn card_anomalies(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        uid: &[u8; 7],
        within: u64,
    ) -> Result<Vec<(u64, Anomaly)>, LedgerError> {
        let last = self.anomalies.last(txn)?.map(|(k, _)| k).unwrap_or(0);
        let from = last.saturating_sub(within).saturating_add(1);
        let hex_uid = hex::encode_upper(uid);
        let mut out = Vec::new();
        for item in self.anomalies.rev_range(txn, &(from..))? {
            let (seq, a) = item?;
            if a.card_uid.eq_ignore_ascii_case(&hex_uid) {
                out.push((seq, a));
            }
        }
        Ok(out)
    }

    /// Every gap clock not reported yet, by card.
    pub(super) fn unreported_gaps(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
    ) -> Result<Vec<([u8; 7], GapClock)>, LedgerError> {
        kept(self.gaps.iter(txn)?, |uid, clock| {
            let uid = <[u8; 7]>::try_from(uid).ok()?;
            (!clock.reported).then_some((uid, clock))
        })
    }
}
