//! The aggregate deltas waiting to be folded (issue 22).
//!
//! Each ingested batch adds its taps not to the aggregates in place (random keys: `card-day:`
//! ones, one per card and day, a million new a day; a batch's devices, stops and routes spread
//! over their part of the table — a leaf copied per key at every commit) but to this table, one
//! small entry per aggregate the batch touched, under (the batch's last outbox id ‖ the
//! aggregate's name): keys that only grow, appended with `MDB_APPEND` in whole pages, and no
//! value larger than a page. (Before, only the `card-day:` deltas were kept apart, as one JSON
//! record per batch: past ≈ 50 deltas LMDB stores it in overflow pages.)
//! [`Store::fold_aggregates`] sums the oldest batches' entries, adds them to the aggregates in
//! one sorted pass (a key many batches touched, once) and deletes them (the table's leading
//! pages); [`Store::aggregates`] adds the entries not folded yet, so the figures are exact at
//! any time. A store with `card-day:` records in the per-batch layout is migrated when opened
//! ([`Store::migrate_card_day_records`]).

use super::{add_aggregate, Aggregate, Store, StoreError, FOLD_CHUNK};
use heed::{PutFlags, RoTxn, RwTxn, WithoutTls};
use std::collections::BTreeMap;
use std::ops::Bound;

/// A delta's value: taps, refused (u64) and amount (i64), big-endian.
const VALUE_LEN: usize = 24;

/// Deltas moved per transaction when migrating the per-batch records (a record is moved whole:
/// one pre-fill batch may hold many more).
const MIGRATE_CHUNK: usize = 10_000;

/// The key of batch `id`'s delta for aggregate `name`.
fn delta_key(id: u64, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}

/// An aggregate's figures as a delta's value (also a `card_days` value).
pub(super) fn encode_value(a: &Aggregate) -> [u8; VALUE_LEN] {
    let mut v = [0u8; VALUE_LEN];
    v[..8].copy_from_slice(&a.taps.to_be_bytes());
    v[8..16].copy_from_slice(&a.refused.to_be_bytes());
    v[16..].copy_from_slice(&a.amount_minor.to_be_bytes());
    v
}

/// A delta's batch id, aggregate name and figures; `None` for an entry this layout did not
/// write (skipped, and deleted by the fold).
fn decode<'a>(key: &'a [u8], v: &[u8]) -> Option<(u64, &'a str, Aggregate)> {
    let (id, name) = key.split_first_chunk::<8>()?;
    let name = std::str::from_utf8(name).ok()?;
    Some((u64::from_be_bytes(*id), name, decode_value(v)?))
}

/// The figures of an [`encode_value`] value; `None` for one of another size.
pub(super) fn decode_value(v: &[u8]) -> Option<Aggregate> {
    let v: &[u8; VALUE_LEN] = v.try_into().ok()?;
    let word = |i: usize| v[i..i + 8].try_into().expect("8 bytes");
    Some(Aggregate {
        taps: u64::from_be_bytes(word(0)),
        refused: u64::from_be_bytes(word(8)),
        amount_minor: i64::from_be_bytes(word(16)),
    })
}

impl Store {
    /// Appends batch `id`'s aggregate deltas (`id` above every id in the table: the batch's
    /// last outbox id; the names in order, so the keys only grow).
    pub(super) fn append_deltas(
        &self,
        t: &mut RwTxn<'_>,
        id: u64,
        deltas: &BTreeMap<String, Aggregate>,
    ) -> Result<(), StoreError> {
        for (name, d) in deltas {
            self.aggregate_deltas.put_with_flags(
                t,
                PutFlags::APPEND,
                &delta_key(id, name),
                &encode_value(d),
            )?;
        }
        Ok(())
    }

    /// The highest batch id with deltas not folded yet.
    pub(super) fn last_delta_batch(
        &self,
        t: &RoTxn<'_, WithoutTls>,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .aggregate_deltas
            .last(t)?
            .and_then(|(k, _)| k.first_chunk::<8>().copied())
            .map(u64::from_be_bytes))
    }

    /// Calls `f` with every delta not folded yet (name, figures), oldest batch first.
    pub(super) fn pending_deltas(
        &self,
        r: &RoTxn<'_, WithoutTls>,
        mut f: impl FnMut(&str, &Aggregate),
    ) -> Result<(), StoreError> {
        for item in self.aggregate_deltas.iter(r)? {
            let (k, v) = item?;
            if let Some((_, name, d)) = decode(k, v) {
                f(name, &d);
            }
        }
        Ok(())
    }

    /// Folds the pending deltas into the aggregates: summed per key, written in one sorted
    /// pass, in transactions of at most [`FOLD_CHUNK`] batches' deltas (one batch's while the
    /// map is past the quarantine mark). Called with every trim
    /// ([`Store::trim_expired_at`]: after each forwarded batch, and on a timer). Returns how
    /// many batches' deltas were folded.
    pub fn fold_aggregates(&self) -> Result<u64, StoreError> {
        // Nothing pending (a trim on the timer with no taps since): told in a read transaction,
        // without the write lock ingest needs.
        {
            let r = self.env.read_txn()?;
            if self.aggregate_deltas.first(&r)?.is_none() {
                return Ok(0);
            }
        }
        let mut folded = 0u64;
        loop {
            let mut t = self.write_txn()?;
            let chunk = if self.pressed(&t)? { 1 } else { FOLD_CHUNK };
            let mut batches = 0usize;
            let mut batch: Option<u64> = None;
            // The last entry read: every entry up to it is folded and deleted (an entry this
            // layout did not write too, so that none is read again and again).
            let mut last_key: Option<Vec<u8>> = None;
            let mut sum: BTreeMap<String, Aggregate> = BTreeMap::new();
            for item in self.aggregate_deltas.iter(&t)? {
                let (k, v) = item?;
                let id = k.first_chunk::<8>().map(|id| u64::from_be_bytes(*id));
                if batch.is_none() || batch != id {
                    if batches == chunk {
                        break;
                    }
                    batches += 1;
                    batch = id;
                }
                if let Some((_, name, d)) = decode(k, v) {
                    add_aggregate(sum.entry(name.to_string()).or_default(), &d);
                }
                last_key = Some(k.to_vec());
            }
            let Some(last_key) = last_key else {
                return Ok(folded);
            };
            // The entries read: the table's leading keys, up to the last one.
            let range = (Bound::Unbounded, Bound::Included(&last_key[..]));
            self.aggregate_deltas.delete_range(&mut t, &range)?;
            self.add_to_aggregates(&mut t, sum)?;
            t.commit()?;
            folded += batches as u64;
            if batches < chunk {
                return Ok(folded);
            }
        }
    }

    /// Moves the per-batch `card-day:` records of a store written before this layout (batch id
    /// → JSON list of (name, delta)) to the deltas table, in transactions of about
    /// [`MIGRATE_CHUNK`] deltas, each deleting the records it moved (a crash in between leaves
    /// a store the next open goes on migrating; nothing is counted twice).
    pub(super) fn migrate_card_day_records(&self) -> Result<(), StoreError> {
        let mut moved = 0u64;
        loop {
            let mut t = self.write_txn()?;
            let mut records: Vec<(u64, Vec<(String, Aggregate)>)> = Vec::new();
            let mut deltas = 0usize;
            for item in self.legacy_card_day_records.iter(&t)? {
                let (id, list) = item?;
                deltas += list.len();
                records.push((id, list));
                if deltas >= MIGRATE_CHUNK {
                    break;
                }
            }
            if records.is_empty() {
                if moved > 0 {
                    tracing::info!(moved, "card-day records migrated to the deltas table");
                }
                return Ok(());
            }
            for (id, list) in &records {
                let mut sum: BTreeMap<String, Aggregate> = BTreeMap::new();
                for (name, d) in list {
                    add_aggregate(sum.entry(name.clone()).or_default(), d);
                }
                for (name, d) in &sum {
                    // Not appended: a migration cut short left greater ids' deltas behind.
                    self.aggregate_deltas
                        .put(&mut t, &delta_key(*id, name), &encode_value(d))?;
                }
                self.legacy_card_day_records.delete(&mut t, id)?;
                moved += sum.len() as u64;
            }
            t.commit()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{decode, delta_key, encode_value, Aggregate};

    #[test]
    fn a_delta_reads_back_as_written_and_a_foreign_entry_is_refused() {
        let a = Aggregate {
            taps: 3,
            refused: 1,
            amount_minor: -250,
        };
        let k = delta_key(0x0102_0304_0506_0708, "card-day:04A1B2C3D4E5F6:20717");
        let v = encode_value(&a);
        let (id, name, back) = decode(&k, &v).unwrap();
        assert_eq!(
            (id, name, back),
            (0x0102_0304_0506_0708, "card-day:04A1B2C3D4E5F6:20717", a)
        );
        assert!(decode(&k, &v[..23]).is_none(), "short value");
        assert!(decode(&k[..7], &v).is_none(), "short key");
        assert!(
            decode(&[&k[..8], &[0xFF][..]].concat(), &v).is_none(),
            "not UTF-8"
        );
        // Keys of one batch sort by name, and every key of a batch below the next batch's.
        assert!(delta_key(7, "card-day:A") < delta_key(7, "card-day:B"));
        assert!(delta_key(7, "card-day:ZZZZ") < delta_key(8, ""));
    }
}
