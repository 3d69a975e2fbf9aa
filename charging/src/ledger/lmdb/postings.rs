//! Postings and balances (double entry), and the per-instrument day totals.

use super::*;

impl LedgerCore {
    /// Numbers and stores a checked posting inside `txn` and moves both balances.
    pub(super) fn append_posting(
        &self,
        txn: &mut RwTxn<'_>,
        entry: crate::ledger::NewPosting<'_>,
    ) -> Result<Posting, LedgerError> {
        let seq = match self.postings.last(txn)? {
            Some((k, _)) => k + 1,
            None => 1,
        };
        let p = entry.numbered(seq);
        let (from, to, amount_minor) = (entry.from, entry.to, entry.amount_minor);
        // Checked: a balance that would leave i64 refuses the posting (two payments of
        // i64::MAX must not wrap an account round to a small number).
        let fb = self.balances.get(txn, from)?.unwrap_or(0);
        let tb = self.balances.get(txn, to)?.unwrap_or(0);
        let (Some(fb), Some(tb)) = (fb.checked_sub(amount_minor), tb.checked_add(amount_minor))
        else {
            return Err(LedgerError::InvalidPosting(
                "an account balance would overflow",
            ));
        };
        self.postings.put(txn, &seq, &p)?;
        self.balances.put(txn, from, &fb)?;
        self.balances.put(txn, to, &tb)?;
        Ok(p)
    }

    /// An account's balance.
    pub(super) fn balance(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        account: &str,
    ) -> Result<i64, LedgerError> {
        Ok(self.balances.get(txn, account)?.unwrap_or(0))
    }

    /// Every account and its balance.
    pub(super) fn balances(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
    ) -> Result<Vec<(String, i64)>, LedgerError> {
        kept(self.balances.iter(txn)?, |k, v| Some((k.to_string(), v)))
    }

    /// Every posting whose reference starts with `prefix` (reports, tests).
    pub(super) fn postings_with_prefix(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        prefix: &str,
    ) -> Result<Vec<Posting>, LedgerError> {
        kept(self.postings.iter(txn)?, |_, p| {
            p.reference.starts_with(prefix).then_some(p)
        })
    }

    /// What was loaded from `key.instrument` at `key.source` on UTC day `key.day` (minor
    /// units).
    pub(super) fn funding_day_total(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        key: FundingDay<'_>,
    ) -> Result<i64, LedgerError> {
        Ok(self
            .funding_days
            .get(txn, &funding_day_key(key))?
            .unwrap_or(0))
    }

    /// Stores a day total.
    pub(super) fn put_funding_day(
        &self,
        txn: &mut RwTxn<'_>,
        key: FundingDay<'_>,
        total_minor: i64,
    ) -> Result<(), LedgerError> {
        Ok(self
            .funding_days
            .put(txn, &funding_day_key(key), &total_minor)?)
    }
}
