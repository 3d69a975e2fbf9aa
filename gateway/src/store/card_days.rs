//! The `card-day:` aggregates, kept day first (issue 22).
//!
//! One aggregate per card and day (≈ 0.64 a tap, random UIDs, never trimmed): keyed by their
//! public name `card-day:<UID>:<day>` in the `aggregates` table, every fold rewrote random
//! leaves over the whole of it (≈ 19.6 M entries at 30 M taps) and freed the old copies all
//! over the file, the free-list scatter that made a live commit's writes grow with the store.
//! Here they have a table of their own, `card_days`, keyed by
//!
//! day (u64, big-endian) ‖ UID ‖ `:`   →   taps, refused (u64) ‖ amount (i64), big-endian
//!
//! so that a fold's leaves lie in the current day's part of the table, however long the store
//! has run, and the entries of a finished day are no longer rewritten. The trailing `:` keeps a
//! day's entries in the order of their public names (a UID holds no `:`). The public name stays
//! the interface: [`Store::aggregates`] reads these entries back under it, in its order, by-card
//! prefixes (`card-day:<UID>`) included, one seek per stored day ([`Store::stored_card_days`]).
//! A store holding its card-days in `aggregates` is migrated when opened
//! ([`Store::migrate_card_days`]), in transactions of [`MIGRATE_CHUNK`] entries each deleting
//! what it moved: a migration cut short goes on at the next open, nothing counted twice.

use super::deltas::{decode_value, encode_value};
use super::{add_aggregate, Aggregate, Store, StoreError, CARD_DAY};
use heed::{RoTxn, RwTxn, WithoutTls};
use std::collections::BTreeMap;
use std::ops::Bound;

/// Card-days moved per transaction when migrating.
const MIGRATE_CHUNK: usize = 10_000;

/// The `card_days` key of a public name; `None` for a name not of the form
/// `card-day:<UID>:<day>` (UID without `:`, day in canonical decimal), which stays in
/// `aggregates` under its name.
pub(super) fn key_of(name: &str) -> Option<Vec<u8>> {
    let (uid, day) = name.strip_prefix(CARD_DAY)?.split_once(':')?;
    let d: u64 = day.parse().ok()?;
    if d.to_string() != day {
        return None;
    }
    let mut k = Vec::with_capacity(8 + uid.len() + 1);
    k.extend_from_slice(&d.to_be_bytes());
    k.extend_from_slice(uid.as_bytes());
    k.push(b':');
    Some(k)
}

/// The public name of a `card_days` key; `None` for a key this layout did not write.
pub(super) fn name_of(key: &[u8]) -> Option<String> {
    let (day, uid) = key.split_first_chunk::<8>()?;
    let uid = std::str::from_utf8(uid.strip_suffix(b":")?).ok()?;
    if uid.contains(':') {
        return None;
    }
    Some(format!("{CARD_DAY}{uid}:{}", u64::from_be_bytes(*day)))
}

/// Which card-days a public prefix selects: those whose UID starts with the first (the whole
/// UID when the second is true), or none.
fn selection(prefix: &str) -> Option<(&str, bool)> {
    if CARD_DAY.starts_with(prefix) {
        return Some(("", false));
    }
    let rest = prefix.strip_prefix(CARD_DAY)?;
    Some(match rest.split_once(':') {
        Some((uid, _)) => (uid, true),
        None => (rest, false),
    })
}

impl Store {
    /// The stored card-days whose public name starts with `prefix`, the first `cap` in the order
    /// of those names (the deltas not folded yet not included).
    pub(super) fn stored_card_days(
        &self,
        r: &RoTxn<'_, WithoutTls>,
        prefix: &str,
        cap: usize,
    ) -> Result<BTreeMap<String, Aggregate>, StoreError> {
        let mut out: BTreeMap<String, Aggregate> = BTreeMap::new();
        let Some((uid, whole)) = selection(prefix) else {
            return Ok(out);
        };
        if cap == 0 {
            return Ok(out);
        }
        let mut day = 0u64;
        loop {
            // The first stored day from `day` on.
            let from = day.to_be_bytes();
            let first = self
                .card_days
                .range(r, &(Bound::Included(&from[..]), Bound::Unbounded))?
                .next()
                .transpose()?;
            let Some(d) = first.and_then(|(k, _)| k.first_chunk::<8>().copied()) else {
                return Ok(out);
            };
            day = u64::from_be_bytes(d);
            let mut seek = d.to_vec();
            seek.extend_from_slice(uid.as_bytes());
            if whole {
                seek.push(b':');
            }
            for item in self
                .card_days
                .range(r, &(Bound::Included(&seek[..]), Bound::Unbounded))?
            {
                let (k, v) = item?;
                if !k.starts_with(&seek) {
                    break;
                }
                let (Some(name), Some(a)) = (name_of(k), decode_value(v)) else {
                    continue;
                };
                // A day's names come in order: past the cap's last, the rest of it is too.
                if out.len() >= cap && out.last_key_value().is_some_and(|(l, _)| *l < name) {
                    break;
                }
                if name.starts_with(prefix) {
                    out.insert(name, a);
                    if out.len() > cap {
                        out.pop_last();
                    }
                }
            }
            let Some(next) = day.checked_add(1) else {
                return Ok(out);
            };
            day = next;
        }
    }

    /// Adds folded deltas to card-days (by `card_days` key), in key order.
    pub(super) fn add_to_card_days(
        &self,
        t: &mut RwTxn<'_>,
        deltas: BTreeMap<Vec<u8>, Aggregate>,
    ) -> Result<(), StoreError> {
        for (k, delta) in deltas {
            let mut a = self
                .card_days
                .get(t, &k)?
                .and_then(decode_value)
                .unwrap_or_default();
            add_aggregate(&mut a, &delta);
            self.card_days.put(t, &k, &encode_value(&a))?;
        }
        Ok(())
    }

    /// Moves the `card-day:` aggregates of a store written before this layout from
    /// `aggregates` to `card_days` (see the module docs); how many were moved.
    pub(super) fn migrate_card_days(&self) -> Result<u64, StoreError> {
        let mut moved = 0u64;
        let mut from = CARD_DAY.to_string();
        while let Some(next) = self.migrate_card_days_chunk(&from, MIGRATE_CHUNK, &mut moved)? {
            from = next;
        }
        if moved > 0 {
            tracing::info!(moved, "card-day aggregates moved to their day-first table");
        }
        Ok(moved)
    }

    /// One transaction of [`Store::migrate_card_days`]: up to `chunk` `card-day:` aggregates
    /// from the name `from` on; the name to go on from, if any is left.
    pub(super) fn migrate_card_days_chunk(
        &self,
        from: &str,
        chunk: usize,
        moved: &mut u64,
    ) -> Result<Option<String>, StoreError> {
        let mut t = self.env.write_txn()?;
        let mut batch: Vec<(String, Aggregate)> = Vec::new();
        let mut next = None;
        for item in self
            .aggregates
            .range(&t, &(Bound::Included(from), Bound::Unbounded))?
        {
            let (name, a) = item?;
            if !name.starts_with(CARD_DAY) {
                break;
            }
            if batch.len() == chunk {
                next = Some(name.to_string());
                break;
            }
            batch.push((name.to_string(), a));
        }
        let mut sum: BTreeMap<Vec<u8>, Aggregate> = BTreeMap::new();
        for (name, a) in &batch {
            // A name not of the form stays where it is, read under it as before.
            if let Some(k) = key_of(name) {
                add_aggregate(sum.entry(k).or_default(), a);
                self.aggregates.delete(&mut t, name)?;
                *moved += 1;
            }
        }
        self.add_to_card_days(&mut t, sum)?;
        t.commit()?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::{key_of, name_of, selection};
    use crate::store::{Aggregate, Store};

    #[test]
    fn a_name_and_its_key_translate_both_ways() {
        for name in [
            "card-day:04A1B2C3D4E5F6:20717",
            "card-day:04A1B2C3D4E5F6:0",
            "card-day::7",
            &format!("card-day:AB:{}", u64::MAX),
        ] {
            let k = key_of(name).unwrap();
            assert_eq!(name_of(&k).as_deref(), Some(name));
        }
        let k = key_of("card-day:04A1B2C3D4E5F6:20717").unwrap();
        assert_eq!(&k[..8], &20717u64.to_be_bytes());
        assert_eq!(&k[8..], b"04A1B2C3D4E5F6:");
        for name in [
            "card-day:04A1",
            "card-day:04A1:",
            "card-day:04A1:007",
            "card-day:04A1:+7",
            "card-day:04A1:7:8",
            "card-day:04A1:-1",
            "device:7",
        ] {
            assert!(key_of(name).is_none(), "{name}");
        }
        assert!(name_of(b"short").is_none());
        assert!(name_of(&[&[0u8; 8][..], b"A:B:"].concat()).is_none());
        assert!(name_of(&[&[0u8; 8][..], b"AB"].concat()).is_none());
    }

    #[test]
    fn keys_sort_by_day_then_as_the_public_names_of_that_day() {
        // Day first: the day's numbers, not their decimal strings.
        assert!(key_of("card-day:FF:9").unwrap() < key_of("card-day:00:10").unwrap());
        // Within a day, as the names: `AB0:` before `AB:` (':' sorts after the digits).
        let names = ["card-day:AB0:5", "card-day:AB:5", "card-day:ABC:5"];
        let mut keys: Vec<Vec<u8>> = names.iter().map(|n| key_of(n).unwrap()).collect();
        keys.sort();
        let back: Vec<String> = keys.iter().map(|k| name_of(k).unwrap()).collect();
        assert_eq!(back, names);
        let mut sorted = names;
        sorted.sort();
        assert_eq!(sorted, names);
    }

    #[test]
    fn a_prefix_selects_the_card_days_it_names() {
        assert_eq!(selection(""), Some(("", false)));
        assert_eq!(selection("card"), Some(("", false)));
        assert_eq!(selection("card-day:"), Some(("", false)));
        assert_eq!(selection("card-day:04A"), Some(("04A", false)));
        assert_eq!(selection("card-day:04A:2"), Some(("04A", true)));
        assert_eq!(selection("device:"), None);
        assert_eq!(selection("d"), None);
    }

    fn a(taps: u64, amount_minor: i64) -> Aggregate {
        Aggregate {
            taps,
            refused: 0,
            amount_minor,
        }
    }

    /// Card-days in the layout before (`aggregates`, JSON, by public name), with other
    /// aggregates around them.
    fn put_old(store: &Store, entries: &[(String, Aggregate)]) {
        let mut t = store.env.write_txn().unwrap();
        for (k, v) in entries {
            store.aggregates.put(&mut t, k, v).unwrap();
        }
        t.commit().unwrap();
    }

    #[test]
    fn card_days_are_migrated_at_open_and_a_migration_cut_short_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let mut old: Vec<(String, Aggregate)> = Vec::new();
        for card in 0..12u64 {
            for day in [9u64, 10, 20717] {
                let n = card * 100 + day;
                old.push((format!("card-day:04{card:012X}:{day}"), a(n, n as i64)));
            }
        }
        old.push(("card-day:odd".to_string(), a(1, 1)));
        old.push(("device:7".to_string(), a(2, 2)));
        old.push(("stop:1".to_string(), a(3, 3)));
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        put_old(&store, &old);
        let everything = store.aggregates("", 1_000).unwrap();
        let mut expect = old.clone();
        expect.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(everything, expect, "read in the old layout");
        // Cut short: one transaction of 10, then the process stops.
        let mut moved = 0;
        let next = store
            .migrate_card_days_chunk("card-day:", 10, &mut moved)
            .unwrap();
        assert_eq!(moved, 10);
        assert!(next.is_some());
        assert_eq!(store.aggregates("", 1_000).unwrap(), expect, "half moved");
        drop(store);
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.aggregates("", 1_000).unwrap(), expect, "all moved");
        let r = store.env.read_txn().unwrap();
        assert_eq!(store.card_days.len(&r).unwrap(), 36);
        let left: Vec<String> = store
            .aggregates
            .iter(&r)
            .unwrap()
            .map(|i| i.unwrap().0.to_string())
            .collect();
        assert_eq!(left, ["card-day:odd", "device:7", "stop:1"]);
        drop(r);
        // By card, by card and day, with limits: as the names sort.
        let card = "card-day:04000000000003";
        let got: Vec<String> = store
            .aggregates(card, 10)
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, [":10", ":20717", ":9"].map(|d| format!("{card}{d}")));
        let got = store.aggregates(&format!("{card}:2"), 10).unwrap();
        assert_eq!(
            got,
            vec![(format!("{card}:20717"), a(20_717 + 300, 21_017))]
        );
        for limit in [0, 1, 5, 36, 37, 40] {
            assert_eq!(
                store.aggregates("card-day:", limit).unwrap(),
                expect[..limit.min(37)].to_vec(),
                "limit {limit}"
            );
            assert_eq!(
                store.aggregates("", limit).unwrap(),
                expect[..limit.min(39)].to_vec(),
                "limit {limit}"
            );
        }
        assert_eq!(store.migrate_card_days().unwrap(), 0, "nothing to do");
    }
}
