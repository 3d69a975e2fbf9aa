//! The devices table's values: a compact binary device state (issue 22).
//!
//! A live batch of a few hundred taps by random devices rewrites most of the devices table's
//! leaves at every commit (the table is bounded by the fleet, not by the store). Kept as JSON
//! (≈ 100 bytes a state) its 2,000 devices took ≈ 80 leaves, ≈ 77 of a live commit's ≈ 110
//! pages; in this layout a state without gaps is [`HEADER_LEN`] bytes:
//!
//! `0x01` (layout) ‖ highest sequence ‖ taps ‖ last seen (u64, big-endian each) ‖ key version
//! known (0 or 1) ‖ key version ‖ each gap's first and last sequence (u64, big-endian).
//!
//! A JSON state (a store written before; it starts with `{`) still reads back as such, and
//! [`Store::open`] rewrites every one in this layout ([`Store::migrate_device_states`]), in
//! transactions of [`MIGRATE_CHUNK`] devices: a migration cut short leaves JSON states the next
//! open goes on rewriting (every state reads either way meanwhile).

use super::{DeviceState, Store, StoreError};
use heed::{BoxedError, BytesDecode, BytesEncode};
use std::borrow::Cow;

/// The layout byte: a JSON state starts with `{` instead.
const LAYOUT: u8 = 1;

/// Bytes of a state without gaps.
pub(super) const HEADER_LEN: usize = 1 + 8 + 8 + 8 + 1 + 1;

/// Devices rewritten per transaction when migrating JSON states.
const MIGRATE_CHUNK: usize = 10_000;

/// The devices table's value codec (see the module docs).
pub(super) enum DeviceCodec {}

/// A device state in this layout.
pub(super) fn encode(st: &DeviceState) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + 16 * st.gaps.len());
    v.push(LAYOUT);
    v.extend_from_slice(&st.highest_seq.to_be_bytes());
    v.extend_from_slice(&st.taps.to_be_bytes());
    v.extend_from_slice(&st.last_seen_ms.to_be_bytes());
    v.push(u8::from(st.device_key_version.is_some()));
    v.push(st.device_key_version.unwrap_or(0));
    for (a, b) in &st.gaps {
        v.extend_from_slice(&a.to_be_bytes());
        v.extend_from_slice(&b.to_be_bytes());
    }
    v
}

/// A state in this layout or in JSON; `None` for anything else.
pub(super) fn decode(v: &[u8]) -> Option<DeviceState> {
    match v.first()? {
        b'{' => serde_json::from_slice(v).ok(),
        &LAYOUT if v.len() >= HEADER_LEN && (v.len() - HEADER_LEN).is_multiple_of(16) => {
            let word = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
            let gaps = (HEADER_LEN..v.len())
                .step_by(16)
                .map(|i| (word(i), word(i + 8)))
                .collect();
            let device_key_version = match v[25] {
                0 => None,
                1 => Some(v[26]),
                _ => return None,
            };
            Some(DeviceState {
                highest_seq: word(1),
                taps: word(9),
                gaps,
                last_seen_ms: word(17),
                device_key_version,
            })
        }
        _ => None,
    }
}

/// Whether a stored value is a JSON state (to be rewritten).
fn is_json(v: &[u8]) -> bool {
    v.first() == Some(&b'{')
}

impl<'a> BytesEncode<'a> for DeviceCodec {
    type EItem = DeviceState;

    fn bytes_encode(st: &'a DeviceState) -> Result<Cow<'a, [u8]>, BoxedError> {
        Ok(Cow::Owned(encode(st)))
    }
}

impl<'a> BytesDecode<'a> for DeviceCodec {
    type DItem = DeviceState;

    fn bytes_decode(v: &'a [u8]) -> Result<DeviceState, BoxedError> {
        decode(v)
            .ok_or_else(|| format!("a device state of {} bytes in no known layout", v.len()).into())
    }
}

impl Store {
    /// Rewrites the JSON device states of a store written before this layout (see the module
    /// docs); how many were rewritten.
    pub(super) fn migrate_device_states(&self) -> Result<u64, StoreError> {
        let mut rewritten = 0u64;
        let mut from = 0u64;
        while let Some(next) =
            self.migrate_device_states_chunk(from, MIGRATE_CHUNK, &mut rewritten)?
        {
            from = next;
        }
        if rewritten > 0 {
            tracing::info!(rewritten, "device states rewritten in the binary layout");
        }
        Ok(rewritten)
    }

    /// One transaction of [`Store::migrate_device_states`]: the JSON states among the `chunk`
    /// devices from `from` on; the device to go on from, if any is left.
    fn migrate_device_states_chunk(
        &self,
        from: u64,
        chunk: usize,
        rewritten: &mut u64,
    ) -> Result<Option<u64>, StoreError> {
        let raw = self.devices.remap_data_type::<heed::types::Bytes>();
        let mut t = self.write_txn()?;
        let mut todo: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut next = None;
        for (seen, item) in raw.range(&t, &(from..))?.enumerate() {
            let (device, v) = item?;
            if seen == chunk {
                next = Some(device);
                break;
            }
            if is_json(v) {
                todo.push((device, v.to_vec()));
            }
        }
        let before = *rewritten;
        for (device, v) in &todo {
            // A JSON state that does not parse is left as it is (it failed to read before too).
            if let Some(st) = decode(v) {
                raw.put(&mut t, device, &encode(&st))?;
                *rewritten += 1;
            }
        }
        if *rewritten == before {
            // Nothing rewritten (the states of a migrated store): nothing to commit.
            t.abort();
        } else {
            t.commit()?;
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::{decode, encode, is_json, DeviceState, HEADER_LEN};
    use crate::store::Store;
    use heed::types::{Bytes, SerdeJson};

    fn states() -> Vec<DeviceState> {
        vec![
            DeviceState::default(),
            DeviceState {
                highest_seq: u64::MAX,
                taps: 12_345,
                gaps: vec![(1, 1), (3, 9), (u64::MAX - 2, u64::MAX - 1)],
                last_seen_ms: 1_790_000_000_000,
                device_key_version: Some(0),
            },
            DeviceState {
                highest_seq: 7,
                taps: 7,
                gaps: vec![],
                last_seen_ms: 1,
                device_key_version: Some(255),
            },
        ]
    }

    #[test]
    fn a_state_reads_back_as_written_in_either_layout() {
        for st in states() {
            let v = encode(&st);
            assert_eq!(v.len(), HEADER_LEN + 16 * st.gaps.len());
            assert_eq!(decode(&v).as_ref(), Some(&st));
            let json = serde_json::to_vec(&st).unwrap();
            assert_eq!(decode(&json).as_ref(), Some(&st), "a JSON state");
        }
        // The layout's size with no gaps, against the JSON it replaces.
        let json = serde_json::to_vec(&states()[2]).unwrap();
        assert!(json.len() > 2 * HEADER_LEN, "{} bytes of JSON", json.len());
    }

    #[test]
    fn a_value_in_no_known_layout_is_refused() {
        let v = encode(&states()[1]);
        assert!(decode(&[]).is_none(), "empty");
        assert!(decode(&v[..HEADER_LEN - 1]).is_none(), "short");
        assert!(decode(&v[..v.len() - 1]).is_none(), "a gap cut short");
        let mut bad = v.clone();
        bad[25] = 2;
        assert!(decode(&bad).is_none(), "key version flag");
        bad[0] = 2;
        assert!(decode(&bad).is_none(), "layout byte");
        assert!(decode(b"{\"highest_seq\":").is_none(), "broken JSON");
    }

    /// Writes the states as JSON, as the layout before did.
    fn put_json(store: &Store, states: &[(u64, DeviceState)]) {
        let json = store.devices.remap_data_type::<SerdeJson<DeviceState>>();
        let mut t = store.env.write_txn().unwrap();
        for (d, st) in states {
            json.put(&mut t, d, st).unwrap();
        }
        t.commit().unwrap();
    }

    /// The devices whose stored value is JSON.
    /// Every device's state as the store reads it, by device.
    fn read_states(store: &Store) -> Vec<(u64, DeviceState)> {
        let all = store.devices().unwrap().into_iter();
        all.map(|(d, st)| (u64::from(d), st)).collect()
    }

    fn json_devices(store: &Store) -> Vec<u64> {
        let raw = store.devices.remap_data_type::<Bytes>();
        let r = store.env.read_txn().unwrap();
        raw.iter(&r)
            .unwrap()
            .map(|i| i.unwrap())
            .filter(|(_, v)| is_json(v))
            .map(|(d, _)| d)
            .collect()
    }

    #[test]
    fn json_states_are_migrated_at_open_and_a_migration_cut_short_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let expect: Vec<(u64, DeviceState)> = (0..25u64)
            .map(|d| {
                let mut st = states()[(d % 3) as usize].clone();
                st.taps = d;
                (1000 + d, st)
            })
            .collect();
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        put_json(&store, &expect);
        assert_eq!(json_devices(&store).len(), 25);
        // Cut short: one transaction of 10 devices, then the process stops.
        let mut rewritten = 0;
        let next = store
            .migrate_device_states_chunk(0, 10, &mut rewritten)
            .unwrap();
        assert_eq!((next, rewritten), (Some(1010), 10));
        assert_eq!(json_devices(&store), (1010..1025).collect::<Vec<_>>());
        // Meanwhile every state reads, in either layout.
        assert_eq!(read_states(&store), expect);
        drop(store);
        // The next open goes on: nothing left in JSON, the same states.
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        assert!(json_devices(&store).is_empty());
        assert_eq!(read_states(&store), expect);
        assert_eq!(store.migrate_device_states().unwrap(), 0, "nothing to do");
    }
}
