//! Forwarding stored taps to clearing in batches with idempotent batch ids.
//!
//! A batch is the outbox range `[first, last]` and its id is `<gateway>-<first>-<last>`: after a
//! crash the gateway rebuilds exactly the same batch from its outbox, so clearing's idempotency
//! on the batch id makes a retry harmless. The outbox is trimmed only after clearing answered.

use crate::store::{Store, StoreError};
use purse::batch::{ClearingBatch, ClearingTap};
use purse::crypto::AesKey;
use purse::rotation::DeviceKeyRing;
use purse::tap::{TapError, TapRecord};
use std::collections::BTreeMap;

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
    let ring = |d| {
        device_key(d)
            .map(|k| DeviceKeyRing::single(0, k))
            .unwrap_or_default()
    };
    forward_once_with_rings(store, gateway_id, operator, ring, max_taps, sink)
}

/// [`forward_once`] with each device's versioned keys: a stored tap verifies again under any
/// version the ring holds, retired ones included (it was accepted at ingest; a retirement
/// since must not keep a real debit from clearing).
pub fn forward_once_with_rings(
    store: &Store,
    gateway_id: &str,
    operator: &str,
    device_key: impl Fn(u32) -> DeviceKeyRing,
    max_taps: usize,
    sink: &mut dyn FnMut(&serde_json::Value) -> Result<(), String>,
) -> Result<usize, ForwardError> {
    let mut rings: BTreeMap<u32, DeviceKeyRing> = BTreeMap::new();
    let pending = store.pending_forward(max_taps)?;
    let (Some(first), Some(last)) = (pending.first().map(|p| p.0), pending.last().map(|p| p.0))
    else {
        return Ok(0);
    };
    let mut taps = Vec::with_capacity(pending.len());
    for (_, raw) in &pending {
        // Verified at ingest; verified again, since nothing read back from disk is trusted.
        match verify_stored(raw, operator, &mut rings, &device_key) {
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

/// A stored tap verified again under its device's ring: every version the ring holds, retired
/// ones included (the tap was accepted at ingest; a retirement since must not hide a real
/// debit from clearing or from the exports). Rings are derived once per device into `rings`.
pub(crate) fn verify_stored(
    raw: &[u8],
    operator: &str,
    rings: &mut BTreeMap<u32, DeviceKeyRing>,
    device_key: &impl Fn(u32) -> DeviceKeyRing,
) -> Result<TapRecord, TapError> {
    let mut verified = TapRecord::decode_verified(raw, operator, |_| None);
    if let Err(TapError::UnknownDevice(d)) = verified {
        let ring = rings.entry(d).or_insert_with(|| device_key(d));
        for (_, k) in ring.accepted.iter().chain(&ring.retired) {
            verified = TapRecord::decode_verified(raw, operator, |_| Some(k.clone()));
            if !matches!(verified, Err(TapError::BadMac)) {
                break;
            }
        }
    }
    verified
}
