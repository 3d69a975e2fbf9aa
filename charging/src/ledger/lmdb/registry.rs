//! Vouchers, idempotency answers and the instrument registry.

use super::*;

impl LedgerCore {
    /// A voucher by code.
    pub(super) fn voucher(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        code: &str,
    ) -> Result<Option<Voucher>, LedgerError> {
        Ok(self.vouchers.get(txn, code)?)
    }

    /// Stores a voucher.
    pub(super) fn put_voucher(&self, txn: &mut RwTxn<'_>, v: &Voucher) -> Result<(), LedgerError> {
        Ok(self.vouchers.put(txn, &v.code, v)?)
    }

    /// The stored answer for an idempotency key.
    pub(super) fn idempotent(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        key: &str,
    ) -> Result<Option<serde_json::Value>, LedgerError> {
        Ok(self.idem.get(txn, key)?)
    }

    /// Stores the answer for an idempotency key.
    pub(super) fn put_idempotent(
        &self,
        txn: &mut RwTxn<'_>,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), LedgerError> {
        Ok(self.idem.put(txn, key, value)?)
    }

    /// The registered instrument `id` of funding source `source`, if any.
    pub(super) fn instrument(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        source: &str,
        id: &str,
    ) -> Result<Option<Instrument>, LedgerError> {
        Ok(self.instruments.get(txn, &instrument_key(source, id))?)
    }

    /// Registers an instrument (replacing what was stored under its source and id: callers
    /// check the owner first).
    pub(super) fn put_instrument(
        &self,
        txn: &mut RwTxn<'_>,
        i: &Instrument,
    ) -> Result<(), LedgerError> {
        Ok(self
            .instruments
            .put(txn, &instrument_key(&i.source, &i.id), i)?)
    }

    /// Every instrument registered to `owner`.
    pub(super) fn instruments_of(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        owner: &str,
    ) -> Result<Vec<Instrument>, LedgerError> {
        kept(self.instruments.iter(txn)?, |_, i| {
            (i.owner == owner).then_some(i)
        })
    }
}
