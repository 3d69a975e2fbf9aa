//! Forwarding stored taps to clearing in batches with idempotent batch ids.
//!
//! A batch is the outbox range `[first, last]` and its id is `<gateway>-<first>-<last>`: after a
//! crash the gateway rebuilds exactly the same batch from its outbox, so clearing's idempotency
//! on the batch id makes a retry harmless. The outbox is trimmed only after clearing answered.

use crate::store::{Store, StoreError};
use purse::batch::{ClearingBatch, ClearingTap};
use purse::crypto::AesKey;
use purse::tap::TapRecord;

/// Forwarding errors.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Storage.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Clearing did not take the batch (network, server); retry later with the same batch.
    #[error("clearing refused or unreachable: {0}")]
    Sink(String),
}

/// Forwards one batch of at most `max_taps`; returns how many outbox entries it cleared.
/// `sink` posts the batch JSON and returns only once clearing durably took it.
pub fn forward_once(
    store: &Store,
    gateway_id: &str,
    operator: &str,
    device_key: impl Fn(u32) -> Option<AesKey>,
    max_taps: usize,
    sink: &mut dyn FnMut(&serde_json::Value) -> Result<(), String>,
) -> Result<usize, ForwardError> {
    let pending = store.pending_forward(max_taps)?;
    let (Some(first), Some(last)) = (pending.first().map(|p| p.0), pending.last().map(|p| p.0))
    else {
        return Ok(0);
    };
    let mut taps = Vec::with_capacity(pending.len());
    for (_, raw) in &pending {
        // Verified at ingest; verified again, since nothing read back from disk is trusted.
        match TapRecord::decode_verified(raw, operator, &device_key) {
            Ok(t) => taps.extend(ClearingTap::from_tap(&t, operator)),
            Err(e) => tracing::error!(%e, "a stored tap no longer verifies; not forwarded"),
        }
    }
    let batch = ClearingBatch {
        batch_id: format!("{gateway_id}-{first}-{last}"),
        taps,
    };
    let batch = serde_json::to_value(&batch).map_err(|e| ForwardError::Sink(e.to_string()))?;
    sink(&batch).map_err(ForwardError::Sink)?;
    store.forwarded(last)?;
    Ok(pending.len())
}
