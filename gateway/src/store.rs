//! The gateway's durable store (LMDB via heed) and its ingestion step.
//!
//! One call to [`Store::ingest`] takes a batch of MQTT messages and, in ONE write transaction
//! (group commit: one fsync for the whole batch):
//! - decodes every tap record strictly and verifies its device MAC (keys derived from KM_DEVICE);
//! - checks the topic's device against the record's;
//! - drops duplicates by (device, sequence) — QoS 1 redelivers;
//! - stores new taps under keys that only grow (device ‖ sequence), appends them to the
//!   forwarding outbox, and tracks sequence gaps per device;
//! - keeps anything bad in a quarantine table with the reason.
//!
//! Only after that commit does it return the confirmations to send: a tap is confirmed to its
//! validator only once it is durable here.

use heed::byteorder::BE;
use heed::types::{Bytes, SerdeJson, U64};
use heed::{Database, Env, EnvOpenOptions, RwTxn, WithoutTls};
use purse::crypto::AesKey;
use purse::tap::{TapError, TapRecord, TAP_LEN};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Store errors (storage only: bad input is quarantined, never an error).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// LMDB failed.
    #[error("gateway storage: {0}")]
    Storage(#[from] heed::Error),
    /// The data directory could not be prepared.
    #[error("gateway data directory {path}: {source}")]
    Dir {
        /// path
        path: String,
        /// cause
        source: std::io::Error,
    },
}

/// What the gateway knows about a device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Highest sequence number stored.
    pub highest_seq: u64,
    /// Taps stored.
    pub taps: u64,
    /// Missing sequence ranges (inclusive), oldest first, bounded by [`MAX_GAPS`].
    pub gaps: Vec<(u64, u64)>,
    /// Last time a tap arrived (unix ms, gateway clock).
    pub last_seen_ms: u64,
}

/// Most open gap ranges kept per device (older ones are reported and dropped).
pub const MAX_GAPS: usize = 256;

/// A running aggregate (per device, stop, route, card-day, product).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Accepted taps.
    pub taps: u64,
    /// Refused taps.
    pub refused: u64,
    /// Sum of amounts, minor units.
    pub amount_minor: i64,
}

/// A quarantined message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// When (unix ms).
    pub received_ms: u64,
    /// The MQTT topic.
    pub topic: String,
    /// Why.
    pub reason: String,
    /// The payload, hex (truncated to 1 KiB).
    pub payload_hex: String,
}

/// One incoming MQTT message.
#[derive(Clone, Debug)]
pub struct Message {
    /// The topic it arrived on.
    pub topic: String,
    /// Its payload: one or more 79-byte tap records.
    pub payload: Vec<u8>,
}

/// What one ingest round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// New taps stored.
    pub stored: u64,
    /// Duplicates dropped (already stored).
    pub duplicates: u64,
    /// Messages or records quarantined.
    pub quarantined: u64,
    /// Sequence numbers to confirm, per (operator, device): stored now or already stored.
    pub confirmations: BTreeMap<(String, u32), Vec<u64>>,
}

/// The store.
#[derive(Clone)]
pub struct Store {
    env: Env<WithoutTls>,
    taps: Database<Bytes, Bytes>,
    devices: Database<U64<BE>, SerdeJson<DeviceState>>,
    quarantine: Database<U64<BE>, SerdeJson<Quarantined>>,
    outbox: Database<U64<BE>, Bytes>,
    meta: Database<heed::types::Str, U64<BE>>,
    aggregates: Database<heed::types::Str, SerdeJson<Aggregate>>,
}

/// Parses `tapgate/v1/<operator>/taps/<device>`.
pub fn parse_tap_topic(topic: &str) -> Option<(&str, u32)> {
    let mut it = topic.split('/');
    match (
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
    ) {
        (Some("tapgate"), Some("v1"), Some(op), Some("taps"), Some(dev), None)
            if !op.is_empty() =>
        {
            Some((op, dev.parse().ok()?))
        }
        _ => None,
    }
}

/// Adds one tap to the batch's aggregate deltas.
fn aggregate_into(aggs: &mut BTreeMap<String, Aggregate>, tap: &TapRecord) {
    let day = tap.meta.device_time_ms / 86_400_000;
    let product = match (tap.refusal, tap.kind) {
        (Some(r), _) => format!("refused:{}", r.name()),
        (None, purse::receipt::TxKind::RecordOnly) => "free".to_string(),
        (None, _) => "stored_value".to_string(),
    };
    for k in [
        format!("device:{}", tap.meta.device_id),
        format!("stop:{}", tap.meta.stop_id),
        format!("route:{}", tap.meta.route_id),
        format!("card-day:{}:{day}", hex::encode_upper(tap.uid)),
        format!("product:{product}"),
    ] {
        let a = aggs.entry(k).or_default();
        if tap.refusal.is_some() {
            a.refused = a.refused.saturating_add(1);
        } else {
            a.taps = a.taps.saturating_add(1);
            // Saturating: a device's taps (MAC'd by the device, not yet by the card) cannot
            // wrap an operator's aggregate.
            a.amount_minor = a.amount_minor.saturating_add(i64::from(tap.amount_minor));
        }
    }
}

fn tap_key(device: u32, seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&device.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl Store {
    /// Opens (or creates) the store.
    pub fn open(dir: &Path, map_size_bytes: usize) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        // SAFETY: LMDB requires the environment to be opened once per process and its files to
        // be modified by LMDB only; the gateway owns its data directory.
        #[allow(unsafe_code)]
        let env = unsafe {
            EnvOpenOptions::new()
                .read_txn_without_tls()
                .map_size(map_size_bytes)
                .max_dbs(8)
                .open(dir)?
        };
        let mut t = env.write_txn()?;
        let taps = env.create_database(&mut t, Some("taps"))?;
        let devices = env.create_database(&mut t, Some("devices"))?;
        let quarantine = env.create_database(&mut t, Some("quarantine"))?;
        let outbox = env.create_database(&mut t, Some("outbox"))?;
        let meta = env.create_database(&mut t, Some("meta"))?;
        let aggregates = env.create_database(&mut t, Some("aggregates"))?;
        t.commit()?;
        Ok(Store {
            env,
            taps,
            devices,
            quarantine,
            outbox,
            meta,
            aggregates,
        })
    }

    fn quarantine_put(
        &self,
        t: &mut RwTxn<'_>,
        now_ms: u64,
        topic: &str,
        reason: String,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let seq = self.quarantine.last(t)?.map(|(k, _)| k + 1).unwrap_or(1);
        let shown = &payload[..payload.len().min(1024)];
        self.quarantine.put(
            t,
            &seq,
            &Quarantined {
                received_ms: now_ms,
                topic: topic.to_string(),
                reason,
                payload_hex: hex::encode(shown),
            },
        )?;
        Ok(())
    }

    /// Ingests a batch of messages in one durable transaction; see the module docs.
    pub fn ingest(
        &self,
        messages: &[Message],
        device_key: impl Fn(u32) -> Option<AesKey>,
        now_ms: u64,
    ) -> Result<IngestOutcome, StoreError> {
        let mut out = IngestOutcome::default();
        let mut dev_states: BTreeMap<u32, DeviceState> = BTreeMap::new();
        let mut aggs: BTreeMap<String, Aggregate> = BTreeMap::new();
        let mut device_keys: BTreeMap<u32, Option<Box<AesKey>>> = BTreeMap::new();
        let mut t = self.env.write_txn()?;
        let mut next_outbox = self
            .outbox
            .last(&t)?
            .map(|(k, _)| k + 1)
            .unwrap_or_else(|| {
                // Continue after what was forwarded, so outbox ids never repeat.
                0
            });
        if next_outbox == 0 {
            next_outbox = self.meta.get(&t, "forwarded_through")?.unwrap_or(0) + 1;
        }
        for m in messages {
            let Some((op, topic_device)) = parse_tap_topic(&m.topic) else {
                self.quarantine_put(
                    &mut t,
                    now_ms,
                    &m.topic,
                    "topic is not tapgate/v1/<operator>/taps/<device>".into(),
                    &m.payload,
                )?;
                out.quarantined += 1;
                continue;
            };
            if m.payload.is_empty() || m.payload.len() % TAP_LEN != 0 {
                self.quarantine_put(
                    &mut t,
                    now_ms,
                    &m.topic,
                    format!(
                        "payload of {} bytes is not a whole number of {TAP_LEN}-byte tap records",
                        m.payload.len()
                    ),
                    &m.payload,
                )?;
                out.quarantined += 1;
                continue;
            }
            for rec in m.payload.chunks_exact(TAP_LEN) {
                // One derivation per device and batch (an outbox draining repeats the device).
                // (Boxed: the map moves its values between nodes, and a moved key would leave
                // an unwiped copy behind; the box is zeroized in place when dropped.)
                let key_for = |d: u32| {
                    device_keys
                        .entry(d)
                        .or_insert_with(|| device_key(d).map(Box::new))
                        .as_deref()
                        .cloned()
                };
                let tap = match TapRecord::decode_verified(rec, key_for) {
                    Ok(tap) => tap,
                    Err(e) => {
                        let reason = match e {
                            TapError::BadMac => {
                                "device MAC does not verify (forged or altered)".to_string()
                            }
                            other => other.to_string(),
                        };
                        self.quarantine_put(&mut t, now_ms, &m.topic, reason, rec)?;
                        out.quarantined += 1;
                        continue;
                    }
                };
                let device = tap.meta.device_id;
                if device != topic_device {
                    self.quarantine_put(
                        &mut t,
                        now_ms,
                        &m.topic,
                        format!(
                            "record of device {device} published on device {topic_device}'s topic"
                        ),
                        rec,
                    )?;
                    out.quarantined += 1;
                    continue;
                }
                let seq = tap.meta.device_seq;
                let key = tap_key(device, seq);
                let confirm = out
                    .confirmations
                    .entry((op.to_string(), device))
                    .or_default();
                if self.taps.get(&t, &key)?.is_some() {
                    out.duplicates += 1;
                    confirm.push(seq);
                    continue;
                }
                self.taps.put(&mut t, &key, rec)?;
                self.outbox.put(&mut t, &next_outbox, &key)?;
                next_outbox += 1;
                // Device states and aggregates are accumulated for the whole batch and written
                // once per key at the end (an outbox draining repeats the same keys).
                let st = match dev_states.entry(device) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => e.insert(
                        self.devices
                            .get(&t, &u64::from(device))?
                            .unwrap_or_default(),
                    ),
                };
                if seq > st.highest_seq + 1 {
                    st.gaps.push((st.highest_seq + 1, seq - 1));
                    if st.gaps.len() > MAX_GAPS {
                        let dropped = st.gaps.remove(0);
                        tracing::warn!(
                            device,
                            ?dropped,
                            "gap list full; oldest gap no longer tracked"
                        );
                    }
                } else if seq < st.highest_seq {
                    // Fills (part of) a gap.
                    let mut gaps = Vec::with_capacity(st.gaps.len() + 1);
                    for (a, b) in st.gaps.drain(..) {
                        if seq < a || seq > b {
                            gaps.push((a, b));
                        } else {
                            if a < seq {
                                gaps.push((a, seq - 1));
                            }
                            if seq < b {
                                gaps.push((seq + 1, b));
                            }
                        }
                    }
                    st.gaps = gaps;
                }
                st.highest_seq = st.highest_seq.max(seq);
                st.taps += 1;
                st.last_seen_ms = now_ms;
                aggregate_into(&mut aggs, &tap);
                out.stored += 1;
                confirm.push(seq);
            }
        }
        for (device, st) in &dev_states {
            self.devices.put(&mut t, &u64::from(*device), st)?;
        }
        for (k, delta) in aggs {
            let mut a = self.aggregates.get(&t, &k)?.unwrap_or_default();
            a.taps = a.taps.saturating_add(delta.taps);
            a.refused = a.refused.saturating_add(delta.refused);
            a.amount_minor = a.amount_minor.saturating_add(delta.amount_minor);
            self.aggregates.put(&mut t, &k, &a)?;
        }
        t.commit()?;
        Ok(out)
    }

    /// Aggregates whose key starts with `prefix` (`device:`, `stop:`, `route:`, `card-day:`,
    /// `product:`), at most `limit`.
    pub fn aggregates(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Aggregate)>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.aggregates.prefix_iter(&r, prefix)? {
            let (k, v) = item?;
            out.push((k.to_string(), v));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Every stored tap record (raw), in (device, sequence) order, at most `limit`.
    pub fn taps(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.taps.iter(&r)? {
            out.push(item?.1.to_vec());
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// All devices and their state.
    pub fn devices(&self) -> Result<Vec<(u32, DeviceState)>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.devices.iter(&r)? {
            let (k, v) = item?;
            out.push((k as u32, v));
        }
        Ok(out)
    }

    /// A device's state.
    pub fn device(&self, device: u32) -> Result<Option<DeviceState>, StoreError> {
        let r = self.env.read_txn()?;
        Ok(self.devices.get(&r, &u64::from(device))?)
    }

    /// Quarantined messages, oldest first (at most `limit`).
    pub fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.quarantine.iter(&r)? {
            out.push(item?.1);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The next outbox entries to forward: (outbox id, raw tap record), at most `limit`.
    pub fn pending_forward(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::with_capacity(limit.min(10_000));
        for item in self.outbox.iter(&r)? {
            let (id, key) = item?;
            if let Some(raw) = self.taps.get(&r, key)? {
                out.push((id, raw.to_vec()));
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Marks everything up to `through` forwarded (clearing acknowledged it durably).
    pub fn forwarded(&self, through: u64) -> Result<(), StoreError> {
        let mut t = self.env.write_txn()?;
        let ids: Vec<u64> = {
            let mut v = Vec::new();
            for item in self.outbox.iter(&t)? {
                let (id, _) = item?;
                if id > through {
                    break;
                }
                v.push(id);
            }
            v
        };
        for id in ids {
            self.outbox.delete(&mut t, &id)?;
        }
        let prev = self.meta.get(&t, "forwarded_through")?.unwrap_or(0);
        self.meta
            .put(&mut t, "forwarded_through", &prev.max(through))?;
        t.commit()?;
        Ok(())
    }

    /// The blocklist version last published to validators.
    pub fn blocklist_version(&self) -> Result<u64, StoreError> {
        let r = self.env.read_txn()?;
        Ok(self.meta.get(&r, "blocklist_version")?.unwrap_or(0))
    }

    /// Records the blocklist version published.
    pub fn set_blocklist_version(&self, v: u64) -> Result<(), StoreError> {
        let mut t = self.env.write_txn()?;
        self.meta.put(&mut t, "blocklist_version", &v)?;
        t.commit()?;
        Ok(())
    }

    /// Taps waiting to be forwarded.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let r = self.env.read_txn()?;
        Ok(self.outbox.len(&r)?)
    }
}
