//! Merchants' online payments, by id and by (merchant, order).

use super::*;

fn order_key(merchant: &str, order_id: &str) -> String {
    format!("{merchant}\u{1f}{order_id}")
}

/// A key of a time index: the time (unix ms, u64 BE) ‖ the id (the notifications' next
/// attempt ‖ payment id, the uncollected refunds' creation ‖ refund id).
fn due_key(next_attempt_ms: u64, payment_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + payment_id.len());
    k.extend_from_slice(&next_attempt_ms.to_be_bytes());
    k.extend_from_slice(payment_id.as_bytes());
    k
}

impl LedgerCore {
    /// A payment by id.
    pub(super) fn payment(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        id: &str,
    ) -> Result<Option<Payment>, LedgerError> {
        Ok(self.payments.get(txn, id)?)
    }

    /// The id of `merchant`'s payment for `order_id`.
    pub(super) fn payment_for_order(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        merchant: &str,
        order_id: &str,
    ) -> Result<Option<String>, LedgerError> {
        Ok(self
            .payment_orders
            .get(txn, &order_key(merchant, order_id))?
            .map(str::to_string))
    }

    /// Stores a payment and its order index.
    pub(super) fn put_payment(&self, txn: &mut RwTxn<'_>, p: &Payment) -> Result<(), LedgerError> {
        self.payments.put(txn, &p.id, p)?;
        self.payment_orders
            .put(txn, &order_key(&p.merchant, &p.order_id), &p.id)?;
        Ok(())
    }

    /// The notifications and their due index: in it at their next attempt while undelivered.
    pub(super) fn notifications_by_due(&self) -> TimeIndex<'_, Notification> {
        TimeIndex {
            index: &self.notifications_due,
            records: &self.notifications,
            entry: |n| (n.next_attempt_ms, n.payment_id.as_str()),
            indexed: |n| n.delivered_ms.is_none(),
        }
    }

    /// The refunds and the index of uncollected ones: in it at their creation while pending.
    pub(super) fn refunds_by_creation(&self) -> TimeIndex<'_, Refund> {
        TimeIndex {
            index: &self.refunds_uncollected,
            records: &self.refunds,
            entry: |r| (r.created_ms, r.id.as_str()),
            indexed: |r| r.state == RefundState::Pending,
        }
    }
}

/// A table of records by id with a time index ([`due_key`]) of those for which `indexed`
/// holds, each at the time and under the id `entry` gives: the notifications by their next
/// attempt, the uncollected refunds by their creation.
pub(super) struct TimeIndex<'a, T: 'static> {
    index: &'a Database<Bytes, Bytes>,
    records: &'a Database<Str, SerdeJson<T>>,
    /// A record's time and id in the index.
    entry: fn(&T) -> (u64, &str),
    /// Whether a record belongs in the index.
    indexed: fn(&T) -> bool,
}

impl<T: serde::Serialize + serde::de::DeserializeOwned + 'static> TimeIndex<'_, T> {
    /// Stores a record under its id and keeps the index in step: its old entry goes, a new
    /// one while it belongs there.
    pub(super) fn put(&self, txn: &mut RwTxn<'_>, record: &T) -> Result<(), LedgerError> {
        let (at, id) = (self.entry)(record);
        if let Some(old) = self.records.get(txn, id)? {
            let (old_at, _) = (self.entry)(&old);
            self.index.delete(txn, &due_key(old_at, id))?;
        }
        self.records.put(txn, id, record)?;
        if (self.indexed)(record) {
            self.index.put(txn, &due_key(at, id), &[])?;
        }
        Ok(())
    }

    /// Indexes the records of a ledger written before the index (one scan at open, only while
    /// the index is empty).
    pub(super) fn fill(&self, txn: &mut RwTxn<'_>) -> Result<(), LedgerError> {
        if !self.index.is_empty(txn)? {
            return Ok(());
        }
        let keys: Vec<Vec<u8>> = self
            .records
            .iter(txn)?
            .filter_map(|item| item.ok().map(|(_, r)| r))
            .filter(|r| (self.indexed)(r))
            .map(|r| {
                let (at, id) = (self.entry)(&r);
                due_key(at, id)
            })
            .collect();
        for k in keys {
            self.index.put(txn, &k, &[])?;
        }
        Ok(())
    }

    /// The indexed records whose time is at or before `until_ms`, earliest first, at most
    /// `limit`: read from the index, so it costs what is due, not every record ever stored.
    pub(super) fn until(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<T>, LedgerError> {
        let mut out = Vec::new();
        for item in self.index.iter(txn)? {
            if out.len() >= limit {
                break;
            }
            let (key, _) = item?;
            let Some((when, id)) = key.split_first_chunk::<8>() else {
                continue;
            };
            if u64::from_be_bytes(*when) > until_ms {
                break;
            }
            let Ok(id) = std::str::from_utf8(id) else {
                continue;
            };
            if let Some(r) = self.records.get(txn, id)? {
                if (self.indexed)(&r) && (self.entry)(&r).0 <= until_ms {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }
}
