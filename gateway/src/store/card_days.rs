//! The `card-day:` aggregates, kept day first (issue 22).
//!
//! One aggregate per card and day (≈ 0.64 a tap, random UIDs): keyed by their
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
//!
//! Retention: a day's card-days are kept [`StoreLimits::card_day_retention_days`] whole days
//! after the day ends, then trimmed ([`Store::trim_expired_card_days_at`], from
//! [`Store::trim_expired_at`]). Day first, the expired days are the table's leading keys: each
//! transaction deletes a run of them (at most the trim chunk, the write lock released between
//! two, at most [`TRIM_MAX_PER_CALL`] a call). The first day kept is written to `meta`
//! ([`KEPT_FROM`]) in the trim's first transaction; from then on a day before it reads as
//! trimmed — [`Store::aggregates`] shows none of its entries, not yet deleted or deltas not yet
//! folded, and a late tap's delta for it is dropped at the fold instead of starting a partial
//! figure — and [`Store::card_days_kept_from`] tells a reader which days are answered. Most
//! calls find nothing to do, told in a read transaction: then the write lock (ingest's too) is
//! not taken.
//!
//! Days ahead of the gateway's clock (a validator's clock far ahead, or the gateway's own
//! behind) are kept like any other: the store cannot tell a wrong clock from a right one
//! without deleting real days when the gateway's own clock is the wrong one (one restored from
//! its last shutdown after a long outage), so such a day's card-days go only when the first
//! day kept passes them.
//!
//! [`StoreLimits::card_day_retention_days`]: super::StoreLimits::card_day_retention_days

use super::deltas::{decode_value, encode_value};
use super::{
    add_aggregate, Aggregate, Store, StoreError, CARD_DAY, TRIM_CHUNK_PRESSED, TRIM_MAX_PER_CALL,
};
use heed::{RoTxn, RwTxn, WithoutTls};
use std::collections::BTreeMap;
use std::ops::Bound;

/// Card-days moved per transaction when migrating.
const MIGRATE_CHUNK: usize = 10_000;

/// `meta` key of the first day whose card-days are kept (0, or absent: none trimmed yet).
pub(super) const KEPT_FROM: &str = "card_days_kept_from";

const DAY_MS: u64 = 86_400_000;

/// The first day kept at `now_ms` (gateway clock) when a day is kept `retention_days` whole
/// days after it ends: the open day (`now_ms`'s) and the `retention_days` before it.
pub(super) fn first_day_kept(now_ms: u64, retention_days: u64) -> u64 {
    (now_ms / DAY_MS).saturating_sub(retention_days)
}

/// Whether `name` is a card-day of a day before `kept_from` (trimmed).
pub(super) fn trimmed(name: &str, kept_from: u64) -> bool {
    key_of(name).is_some_and(|k| day_of(&k) < kept_from)
}

/// The day of a `card_days` key (the first 8 bytes; 0 for a shorter key).
fn day_of(key: &[u8]) -> u64 {
    key.first_chunk::<8>().map_or(0, |d| u64::from_be_bytes(*d))
}

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
    /// The first day whose card-days are kept, as `r` sees it ([`KEPT_FROM`]).
    pub(super) fn card_days_kept_from_in(
        &self,
        r: &RoTxn<'_, WithoutTls>,
    ) -> Result<u64, StoreError> {
        Ok(self.meta.get(r, KEPT_FROM)?.unwrap_or(0))
    }

    /// The first day (unix day) whose `card-day:` aggregates are kept: those of the days before
    /// were trimmed (their retention ended) and are not answered, neither the entries nor a late
    /// tap's. 0 before the first trim.
    pub fn card_days_kept_from(&self) -> Result<u64, StoreError> {
        let r = self.env.read_txn()?;
        self.card_days_kept_from_in(&r)
    }

    /// The stored card-days whose public name starts with `prefix`, of the days from
    /// `kept_from` on, the first `cap` in the order of those names (the deltas not folded yet
    /// not included).
    pub(super) fn stored_card_days(
        &self,
        r: &RoTxn<'_, WithoutTls>,
        prefix: &str,
        cap: usize,
        kept_from: u64,
    ) -> Result<BTreeMap<String, Aggregate>, StoreError> {
        let mut out: BTreeMap<String, Aggregate> = BTreeMap::new();
        let Some((uid, whole)) = selection(prefix) else {
            return Ok(out);
        };
        if cap == 0 {
            return Ok(out);
        }
        // The days before `kept_from` are trimmed, whether or not their entries are deleted yet.
        let mut day = kept_from;
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

    /// Adds folded deltas to card-days (by `card_days` key), in key order; those of a trimmed
    /// day (a late tap's) are dropped: a trimmed day is not started again with part of its taps.
    pub(super) fn add_to_card_days(
        &self,
        t: &mut RwTxn<'_>,
        deltas: BTreeMap<Vec<u8>, Aggregate>,
    ) -> Result<(), StoreError> {
        let kept_from = self.card_days_kept_from_in(t)?;
        for (k, delta) in deltas {
            if day_of(&k) < kept_from {
                continue;
            }
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

    /// Trims the card-days of the days whose retention ended by `now_ms` (gateway clock; see
    /// the module docs), oldest day first: at most [`TRIM_MAX_PER_CALL`] (a backlog,
    /// such as a day's ≈ 1.26 M at midnight in a large city, goes over several calls), in
    /// transactions of at most the trim chunk ([`super::TRIM_CHUNK`]; [`TRIM_CHUNK_PRESSED`]
    /// while the map is past the quarantine mark), the write lock released between two. Never
    /// the open day. Most calls find nothing to do, told in a read transaction: then the write
    /// lock (ingest's too) is not taken. Called by [`Store::trim_expired_at`]. Returns how many
    /// were trimmed.
    pub fn trim_expired_card_days_at(&self, now_ms: u64) -> Result<u64, StoreError> {
        self.trim_card_days(now_ms, TRIM_MAX_PER_CALL)
    }

    /// [`Store::trim_expired_card_days_at`] with at most `max` trimmed.
    pub(super) fn trim_card_days(&self, now_ms: u64, max: usize) -> Result<u64, StoreError> {
        let due = first_day_kept(now_ms, self.limits.card_day_retention_days.max(1));
        if !self.card_days_due(due)? {
            return Ok(0);
        }
        let mut trimmed = 0usize;
        loop {
            let mut t = self.write_txn()?;
            let chunk = if self.pressed(&t)? {
                TRIM_CHUNK_PRESSED
            } else {
                self.trim_chunk
            };
            let chunk = chunk.min(max - trimmed);
            // The first day kept only ever rises: a retention raised or a clock set back must
            // not answer days already deleted as days without taps.
            let stored = self.card_days_kept_from_in(&t)?;
            let kept_from = stored.max(due);
            let moved = kept_from != stored;
            if moved {
                self.meta.put(&mut t, KEPT_FROM, &kept_from)?;
            }
            let n = self.trim_card_days_chunk(&mut t, kept_from, chunk)?;
            if n == 0 && !moved {
                return Ok(trimmed as u64);
            }
            t.commit()?;
            trimmed += n;
            if n < chunk || trimmed >= max {
                return Ok(trimmed as u64);
            }
        }
    }

    /// Whether a trim with the first day kept `due` has anything to do: the mark
    /// ([`KEPT_FROM`]) to raise, or a card-day of a day before it (the table's first).
    fn card_days_due(&self, due: u64) -> Result<bool, StoreError> {
        let r = self.env.read_txn()?;
        let kept_from = self.card_days_kept_from_in(&r)?;
        if kept_from < due {
            return Ok(true);
        }
        Ok(self
            .card_days
            .first(&r)?
            .is_some_and(|(k, _)| day_of(k) < kept_from))
    }

    /// One transaction of [`Store::trim_card_days`]: deletes up to `max` card-days of the days
    /// before `kept_from`, the table's leading keys (one range); how many.
    pub(super) fn trim_card_days_chunk(
        &self,
        t: &mut RwTxn<'_>,
        kept_from: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let end = kept_from.to_be_bytes();
        let mut n = 0usize;
        let mut last: Option<Vec<u8>> = None;
        for item in self.card_days.iter(t)? {
            let (k, _) = item?;
            if n == max || k >= &end[..] {
                break;
            }
            n += 1;
            last = Some(k.to_vec());
        }
        if let Some(last) = last {
            let range = (Bound::Unbounded, Bound::Included(&last[..]));
            self.card_days.delete_range(t, &range)?;
        }
        Ok(n)
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
        let mut t = self.write_txn()?;
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
        if sum.is_empty() {
            // Nothing moved (a migrated store, or only names not of the form): nothing to commit.
            t.abort();
            return Ok(next);
        }
        self.add_to_card_days(&mut t, sum)?;
        t.commit()?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::{first_day_kept, key_of, name_of, selection, DAY_MS};
    use crate::store::{Aggregate, Store};
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

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

    /// Folded card-days (public name → figures), written as a fold writes them.
    fn put_card_days(store: &Store, entries: &[(String, Aggregate)]) {
        let mut t = store.env.write_txn().unwrap();
        let mut by_key = BTreeMap::new();
        for (name, v) in entries {
            by_key.insert(key_of(name).unwrap(), v.clone());
        }
        store.add_to_card_days(&mut t, by_key).unwrap();
        t.commit().unwrap();
    }

    /// Deltas not folded yet, as a batch `id` (above every batch so far) appends them.
    fn put_deltas(store: &Store, id: u64, entries: &[(String, Aggregate)]) {
        let mut t = store.env.write_txn().unwrap();
        let deltas: BTreeMap<String, Aggregate> = entries.iter().cloned().collect();
        store.append_deltas(&mut t, id, &deltas).unwrap();
        t.commit().unwrap();
    }

    fn entries(store: &Store) -> u64 {
        let r = store.env.read_txn().unwrap();
        store.card_days.len(&r).unwrap()
    }

    const TODAY: u64 = 20_717;
    /// Noon of [`TODAY`], gateway clock.
    const NOW: u64 = TODAY * DAY_MS + DAY_MS / 2;

    #[test]
    fn the_first_day_kept_is_the_open_day_less_the_retention() {
        assert_eq!(first_day_kept(NOW, 7), TODAY - 7);
        assert_eq!(first_day_kept(TODAY * DAY_MS, 1), TODAY - 1);
        assert_eq!(first_day_kept(TODAY * DAY_MS - 1, 1), TODAY - 2);
        assert_eq!(first_day_kept(3 * DAY_MS, 7), 0, "nothing before day 0");
    }

    #[test]
    fn days_past_the_retention_go_and_the_open_and_recent_days_read_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.limits().card_day_retention_days, 7);
        // Days before the retention (TODAY - 8 and older), its first day (TODAY - 7), a recent
        // one, the open day, and one a validator's clock puts ahead of the gateway's.
        let old = [TODAY - 400, TODAY - 9, TODAY - 8];
        let kept = [TODAY - 7, TODAY - 1, TODAY, TODAY + 1];
        let mut all = Vec::new();
        for day in old.iter().chain(&kept) {
            for card in 0..3u64 {
                all.push((
                    format!("card-day:04{card:012X}:{day}"),
                    a(card + 1, *day as i64),
                ));
            }
        }
        all.sort_by(|x, y| x.0.cmp(&y.0));
        put_card_days(&store, &all);
        // Not folded yet: a late tap of a day about to be trimmed, one of the open day.
        let late = format!("card-day:04{:012X}:{}", 9, TODAY - 8);
        let open = format!("card-day:04{:012X}:{}", 0, TODAY);
        put_deltas(
            &store,
            1,
            &[(late.clone(), a(1, 5)), (open.clone(), a(1, 5))],
        );
        assert_eq!(store.card_days_kept_from().unwrap(), 0);
        assert_eq!(store.aggregates("card-day:", 1_000).unwrap().len(), 22);

        let is_kept = |name: &str| kept.iter().any(|d| name.ends_with(&format!(":{d}")));
        let mut expect: Vec<(String, Aggregate)> =
            all.iter().filter(|(k, _)| is_kept(k)).cloned().collect();
        let o = expect.iter_mut().find(|(k, _)| *k == open).unwrap();
        (o.1.taps, o.1.amount_minor) = (o.1.taps + 1, o.1.amount_minor + 5);
        // The trim of the gateway's timer (no forwarded taps): 9 card-days of 3 old days.
        assert_eq!(store.trim_expired_at(NOW).unwrap(), 0);
        assert_eq!(store.card_days_kept_from().unwrap(), TODAY - 7);
        assert_eq!(entries(&store), 12, "the late delta dropped at the fold");
        assert_eq!(store.aggregates("card-day:", 1_000).unwrap(), expect);
        assert_eq!(store.aggregates("", 1_000).unwrap(), expect);
        // A trimmed day reads as trimmed: no entry, and the day the read says it starts from.
        let (got, from) = store.aggregates_kept_from(&late, 10).unwrap();
        assert!(got.is_empty() && from > TODAY - 8);
        // Again the same day: nothing more to trim.
        assert_eq!(store.trim_card_days(NOW, usize::MAX).unwrap(), 0);
        // A late tap of a trimmed day after the trim: not shown, not folded into a new entry.
        put_deltas(&store, 2, &[(late.clone(), a(1, 5))]);
        assert!(store.aggregates(&late, 10).unwrap().is_empty());
        assert_eq!(store.fold_aggregates().unwrap(), 1);
        assert_eq!(entries(&store), 12);

        // Reopened: the same answers; the open day still takes taps; the next day trims one more.
        drop(store);
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.card_days_kept_from().unwrap(), TODAY - 7);
        assert_eq!(store.aggregates("card-day:", 1_000).unwrap(), expect);
        put_deltas(&store, 3, &[(open.clone(), a(1, 5))]);
        assert_eq!(store.trim_expired_at(NOW).unwrap(), 0);
        let o = expect.iter_mut().find(|(k, _)| *k == open).unwrap();
        (o.1.taps, o.1.amount_minor) = (o.1.taps + 1, o.1.amount_minor + 5);
        assert_eq!(store.aggregates("card-day:", 1_000).unwrap(), expect);
        assert_eq!(store.trim_card_days(NOW + DAY_MS, usize::MAX).unwrap(), 3);
        assert_eq!(store.card_days_kept_from().unwrap(), TODAY - 6);
        expect.retain(|(k, _)| !k.ends_with(&format!(":{}", TODAY - 7)));
        assert_eq!(store.aggregates("card-day:", 1_000).unwrap(), expect);
    }

    #[test]
    fn a_trim_of_many_card_days_runs_in_chunks_within_a_cap_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 64 << 20)
            .unwrap()
            .with_trim_chunk(100);
        let mut all: Vec<(String, Aggregate)> = (0..1_050u64)
            .map(|c| (format!("card-day:04{c:012X}:{}", TODAY - 30), a(1, 1)))
            .collect();
        all.extend((0..5u64).map(|c| (format!("card-day:04{c:012X}:{TODAY}"), a(2, 2))));
        put_card_days(&store, &all);
        let txn = || store.env.info().last_txn_id;
        // One transaction deletes at most its chunk, the table's leading keys.
        let before = txn();
        let mut t = store.env.write_txn().unwrap();
        assert_eq!(store.trim_card_days_chunk(&mut t, TODAY, 100).unwrap(), 100);
        drop(t);
        assert_eq!(
            (txn(), entries(&store)),
            (before, 1_055),
            "aborted: nothing gone"
        );
        // A cap of 250: two whole chunks and half a third, three transactions.
        assert_eq!(store.trim_card_days(NOW, 250).unwrap(), 250);
        assert_eq!((txn() - before, entries(&store)), (3, 805));
        // The rest in one call of the public cap: 800 in eight transactions of 100, the last
        // finding no more (a chunk not full ends the call).
        let before = txn();
        assert_eq!(store.trim_expired_card_days_at(NOW).unwrap(), 800);
        assert_eq!((txn() - before, entries(&store)), (8, 5));
        assert_eq!(store.trim_expired_card_days_at(NOW).unwrap(), 0);
        assert_eq!(txn() - before, 8, "nothing to do: nothing written");
        let left = store.aggregates("card-day:", 10).unwrap();
        assert_eq!(left, all[1_050..].to_vec(), "the open day's, unchanged");
    }

    fn day_names(days: &[u64]) -> Vec<(String, Aggregate)> {
        let mut all: Vec<(String, Aggregate)> = days
            .iter()
            .map(|d| (format!("card-day:04A1:{d}"), a(1, *d as i64)))
            .collect();
        all.sort_by(|x, y| x.0.cmp(&y.0));
        all
    }

    /// A card-day written straight into the table (as a store of an older gateway may hold it).
    fn put_raw(store: &Store, name: &str) {
        let mut t = store.env.write_txn().unwrap();
        let k = key_of(name).unwrap();
        store.card_days.put(&mut t, &k, &[0u8; 24]).unwrap();
        t.commit().unwrap();
    }

    #[test]
    fn a_trim_with_nothing_due_takes_no_write_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        put_card_days(&store, &day_names(&[TODAY - 8, TODAY - 5, TODAY]));
        let writes = || store.write_txns.load(Ordering::Relaxed);
        let txn = || store.env.info().last_txn_id;
        // Due: the mark to set, a day to delete.
        let w = writes();
        assert_eq!(store.trim_card_days(NOW, usize::MAX).unwrap(), 1);
        assert_eq!(writes() - w, 1);
        // Nothing due (the same day again, at its start, later; a clock set back, the mark
        // not lowered): not even the write lock, and nothing written.
        let (w, id) = (writes(), txn());
        for now in [NOW, TODAY * DAY_MS, NOW + DAY_MS / 3, NOW - 3 * DAY_MS] {
            assert_eq!(store.trim_card_days(now, usize::MAX).unwrap(), 0, "{now}");
            assert_eq!(store.trim_expired_card_days_at(now).unwrap(), 0, "{now}");
        }
        assert_eq!((writes(), txn()), (w, id));
        assert_eq!(store.card_days_kept_from().unwrap(), TODAY - 7);
        // A card-day below the mark all the same: due, deleted.
        put_raw(&store, &format!("card-day:04B2:{}", TODAY - 30));
        let (w, id) = (writes(), txn());
        assert_eq!(store.trim_card_days(NOW, usize::MAX).unwrap(), 1);
        assert_eq!((writes() - w, txn() - id), (1, 1));
        // The next day: nothing to delete, but the mark to raise (one transaction, committed).
        let (w, id) = (writes(), txn());
        assert_eq!(store.trim_card_days(NOW + DAY_MS, usize::MAX).unwrap(), 0);
        assert_eq!((writes() - w, txn() - id), (1, 1));
        assert_eq!(store.card_days_kept_from().unwrap(), TODAY - 6);
        assert_eq!(
            store.aggregates("card-day:", 10).unwrap(),
            day_names(&[TODAY - 5, TODAY])
        );
        // An empty table with the mark in place: nothing due.
        let w = writes();
        assert_eq!(store.trim_card_days(NOW + DAY_MS, usize::MAX).unwrap(), 0);
        assert_eq!(writes(), w);
    }

    /// A day ahead of the gateway's clock is kept like any other, its deltas folded: the
    /// gateway's own clock may be the wrong one (restored from its last shutdown after an
    /// outage longer than the retention), and then the "days ahead" are today's real taps.
    /// They go only when the first day kept passes them.
    #[test]
    fn card_days_ahead_of_the_gateway_clock_are_kept_and_folded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        put_card_days(&store, &day_names(&[TODAY]));
        assert_eq!(store.trim_card_days(NOW, usize::MAX).unwrap(), 0);
        assert_eq!(store.card_days_kept_from().unwrap(), TODAY - 7);
        // The validators' real day, nine days past the gateway's stale clock, and one far ahead.
        let real = format!("card-day:04A1:{}", TODAY + 9);
        let far = format!("card-day:04A1:{}", 47_117u64);
        put_deltas(
            &store,
            1,
            &[(real.clone(), a(1, 5)), (far.clone(), a(1, 5))],
        );
        assert_eq!(store.trim_expired_at(NOW).unwrap(), 0);
        assert_eq!(
            store.aggregates(&real, 10).unwrap(),
            vec![(real.clone(), a(1, 5))]
        );
        assert_eq!(
            store.aggregates(&far, 10).unwrap(),
            vec![(far.clone(), a(1, 5))]
        );
        // The clock put right: the days kept move up to the real day, which stays.
        store.trim_expired_at(NOW + 9 * DAY_MS).unwrap();
        assert_eq!(store.card_days_kept_from().unwrap(), TODAY + 2);
        assert_eq!(store.aggregates(&real, 10).unwrap(), vec![(real, a(1, 5))]);
        assert!(store
            .aggregates(&format!("card-day:04A1:{TODAY}"), 10)
            .unwrap()
            .is_empty());
    }
}
