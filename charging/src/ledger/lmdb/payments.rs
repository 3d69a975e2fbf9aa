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

    /// Stores a notification and keeps the due index in step: its old entry goes, a new one
    /// at its next attempt while it is undelivered.
    pub(super) fn put_notification(
        &self,
        txn: &mut RwTxn<'_>,
        n: &Notification,
    ) -> Result<(), LedgerError> {
        if let Some(old) = self.notifications.get(txn, &n.payment_id)? {
            self.notifications_due
                .delete(txn, &due_key(old.next_attempt_ms, &old.payment_id))?;
        }
        self.notifications.put(txn, &n.payment_id, n)?;
        if n.delivered_ms.is_none() {
            self.notifications_due
                .put(txn, &due_key(n.next_attempt_ms, &n.payment_id), &[])?;
        }
        Ok(())
    }

    /// Indexes the undelivered notifications of a ledger written before the due index (one
    /// scan, only while the index is empty).
    pub(super) fn index_notifications(&self, txn: &mut RwTxn<'_>) -> Result<(), LedgerError> {
        if !self.notifications_due.is_empty(txn)? {
            return Ok(());
        }
        let undelivered: Vec<Notification> = self
            .notifications
            .iter(txn)?
            .filter_map(|item| item.ok().map(|(_, n)| n))
            .filter(|n| n.delivered_ms.is_none())
            .collect();
        for n in undelivered {
            self.notifications_due
                .put(txn, &due_key(n.next_attempt_ms, &n.payment_id), &[])?;
        }
        Ok(())
    }

    /// Undelivered notifications due at `now_ms`, at most `limit`, earliest due first: read
    /// from the due index, so a round costs what is due, not every notification ever stored.
    pub(super) fn notifications_due(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Notification>, LedgerError> {
        let mut out = Vec::new();
        for item in self.notifications_due.iter(txn)? {
            if out.len() >= limit {
                break;
            }
            let (key, _) = item?;
            let Some((when, id)) = key.split_first_chunk::<8>() else {
                continue;
            };
            if u64::from_be_bytes(*when) > now_ms {
                break;
            }
            let Ok(id) = std::str::from_utf8(id) else {
                continue;
            };
            if let Some(n) = self.notifications.get(txn, id)? {
                if n.delivered_ms.is_none() && n.next_attempt_ms <= now_ms {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }
}

impl LedgerCore {
    /// Stores a refund and keeps the index of uncollected ones in step: in it while `pending`.
    pub(super) fn put_refund(&self, txn: &mut RwTxn<'_>, r: &Refund) -> Result<(), LedgerError> {
        if let Some(old) = self.refunds.get(txn, &r.id)? {
            self.refunds_uncollected
                .delete(txn, &due_key(old.created_ms, &old.id))?;
        }
        self.refunds.put(txn, &r.id, r)?;
        if r.state == RefundState::Pending {
            self.refunds_uncollected
                .put(txn, &due_key(r.created_ms, &r.id), &[])?;
        }
        Ok(())
    }

    /// Indexes the pending refunds of a ledger written before the index (one scan, only while
    /// the index is empty).
    pub(super) fn index_refunds(&self, txn: &mut RwTxn<'_>) -> Result<(), LedgerError> {
        if !self.refunds_uncollected.is_empty(txn)? {
            return Ok(());
        }
        let pending: Vec<Refund> = self
            .refunds
            .iter(txn)?
            .filter_map(|item| item.ok().map(|(_, r)| r))
            .filter(|r| r.state == RefundState::Pending)
            .collect();
        for r in pending {
            self.refunds_uncollected
                .put(txn, &due_key(r.created_ms, &r.id), &[])?;
        }
        Ok(())
    }

    /// Pending refunds made at or before `made_by_ms`, oldest first, at most `limit`.
    pub(super) fn refunds_uncollected(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        made_by_ms: u64,
        limit: usize,
    ) -> Result<Vec<Refund>, LedgerError> {
        let mut out = Vec::new();
        for item in self.refunds_uncollected.iter(txn)? {
            if out.len() >= limit {
                break;
            }
            let (key, _) = item?;
            let Some((made, id)) = key.split_first_chunk::<8>() else {
                continue;
            };
            if u64::from_be_bytes(*made) > made_by_ms {
                break;
            }
            let Ok(id) = std::str::from_utf8(id) else {
                continue;
            };
            if let Some(r) = self.refunds.get(txn, id)? {
                if r.state == RefundState::Pending {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }
}
