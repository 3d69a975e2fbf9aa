//! Opening a store written before taps were keyed by arrival (issue 22).
//!
//! The old layout kept each tap under device ‖ sequence (`taps`), the outbox as outbox id → that
//! key and the forwarded log as outbox id → that key ‖ when clearing answered. [`Store::open`]
//! moves every tap the outbox or the forwarded log names to `arrivals` under its outbox id and
//! rewrites the entry (the outbox's empty, the log's the answer's 8 bytes alone), in
//! transactions of [`CHUNK`] entries each deleting the old taps it moved: a crash in between
//! leaves a store the next open goes on migrating, and the map never holds two copies of more
//! than a chunk. Taps neither names (forwarded by a store before the forwarded log existed,
//! kept for good for their dedupe, which the device states now answer) are dropped. A device
//! whose gap list is full may have dropped older gaps: the sequences below its oldest gap are
//! marked untracked (a tap among them is stored again, never lost).

use super::{DeviceState, Store, StoreError, MAX_GAPS};
use heed::byteorder::BE;
use heed::types::{Bytes, U64};
use heed::Database;

/// Entries migrated per transaction.
const CHUNK: usize = 10_000;

/// The old layout's tap key: device (4 bytes) ‖ sequence (8 bytes).
const OLD_KEY_LEN: usize = 12;

impl Store {
    /// Migrates an old-layout store, if this is one (see the module docs).
    pub(super) fn migrate_legacy_taps(&self) -> Result<(), StoreError> {
        {
            let r = self.env.read_txn()?;
            if self.legacy_taps.is_empty(&r)? {
                return Ok(());
            }
        }
        let pending = self.migrate_refs(self.outbox, OLD_KEY_LEN)?;
        let forwarded = self.migrate_refs(self.forwarded_log, OLD_KEY_LEN + 8)?;
        let mut t = self.write_txn()?;
        let dropped = self.legacy_taps.len(&t)?;
        self.legacy_taps.clear(&mut t)?;
        let mut full: Vec<(u32, u64)> = Vec::new();
        for item in self.devices.iter(&t)? {
            let (device, st): (u64, DeviceState) = item?;
            if let (Ok(device), true) = (u32::try_from(device), st.gaps.len() >= MAX_GAPS) {
                full.push((device, st.gaps[0].0.saturating_sub(1)));
            }
        }
        for (device, below) in &full {
            let key = super::untracked_key(*device);
            let was = self.meta.get(&t, &key)?.unwrap_or(0);
            self.meta.put(&mut t, &key, &was.max(*below))?;
        }
        t.commit()?;
        tracing::info!(
            pending,
            forwarded,
            dropped,
            devices_with_full_gap_lists = full.len(),
            "gateway store migrated to taps keyed by arrival"
        );
        Ok(())
    }

    /// Moves the taps `db`'s old-layout entries (values of `old_len` bytes, starting with the
    /// old tap key) name to `arrivals` and rewrites the entries; how many taps moved.
    fn migrate_refs(
        &self,
        db: Database<U64<BE>, Bytes>,
        old_len: usize,
    ) -> Result<u64, StoreError> {
        let mut from = 0u64;
        let mut moved = 0u64;
        loop {
            let mut t = self.write_txn()?;
            let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
            for item in db.range(&t, &(from..))? {
                let (id, v) = item?;
                if v.len() == old_len {
                    batch.push((id, v.to_vec()));
                    if batch.len() >= CHUNK {
                        break;
                    }
                }
            }
            if batch.is_empty() {
                // No old-layout entry left: nothing to commit.
                t.abort();
                return Ok(moved);
            }
            for (id, v) in &batch {
                let (key, rest) = v.split_at(OLD_KEY_LEN);
                if let Some(raw) = self.legacy_taps.get(&t, key)? {
                    let raw = raw.to_vec();
                    self.arrivals.put(&mut t, id, &raw)?;
                    self.legacy_taps.delete(&mut t, key)?;
                    moved += 1;
                }
                db.put(&mut t, id, rest)?;
            }
            t.commit()?;
            match batch.last() {
                Some((id, _)) if batch.len() >= CHUNK => from = id + 1,
                _ => return Ok(moved),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{Aggregate, DeviceState, Store};
    use heed::types::{Bytes, SerdeJson};

    /// Leftovers every open's migrations read and move nothing of: a name `card-day:` not of
    /// the form (stays in `aggregates`), a JSON device state that does not parse (stays as it
    /// is); and what the first open moves: an old-layout card-day and a JSON state.
    fn put_leftovers(store: &Store) {
        let mut t = store.env.write_txn().unwrap();
        let one = Aggregate {
            taps: 1,
            refused: 0,
            amount_minor: 5,
        };
        for name in ["card-day:odd", "card-day:04A1:20717", "device:7"] {
            store.aggregates.put(&mut t, name, &one).unwrap();
        }
        let raw = store.devices.remap_data_type::<Bytes>();
        raw.put(&mut t, &7, b"{broken").unwrap();
        let json = store.devices.remap_data_type::<SerdeJson<DeviceState>>();
        json.put(&mut t, &8, &DeviceState::default()).unwrap();
        t.commit().unwrap();
    }

    #[test]
    fn opening_a_migrated_store_again_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        put_leftovers(&store);
        let before = store.env.info().last_txn_id;
        drop(store);
        // The first open migrates (the card-day moved, the state rewritten): written.
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        let migrated = store.env.info().last_txn_id;
        assert!(migrated > before);
        let r = store.env.read_txn().unwrap();
        assert_eq!(store.card_days.len(&r).unwrap(), 1);
        assert_eq!(
            store.aggregates.len(&r).unwrap(),
            2,
            "card-day:odd, device:7"
        );
        drop(r);
        drop(store);
        // Opened twice more: the migrations read the leftovers again and write nothing.
        for _ in 0..2 {
            let store = Store::open(dir.path(), 16 << 20).unwrap();
            assert_eq!(store.env.info().last_txn_id, migrated);
        }
    }
}
