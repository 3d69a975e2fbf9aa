//! The store's layout (issue 22): taps keyed by arrival, duplicates told by the device's state,
//! `card-day:` aggregates folded later yet exact at any time, and a store written in the old
//! layout (taps by device ‖ sequence) migrated at open.

use gateway::store::{Aggregate, DeviceState, Message, Store, MAX_GAPS};
use purse::keys::KeySet;
use tapgate_lmdb::heed::byteorder::BE;
use tapgate_lmdb::heed::types::{SerdeJson, Str, U64};
use tapgate_testkit::broker::tap_message as tap;
use tapgate_testkit::fixtures::{gateway_keys, signed_tap};

const DAY_MS: u64 = 86_400_000;
const T0: u64 = 1_790_000_000_000;

/// (stored, duplicates) of one batch of device 1001's `seqs`.
fn ingest(store: &Store, keys: &KeySet, seqs: &[u64], now: u64) -> (u64, u64) {
    let msgs: Vec<Message> = seqs.iter().map(|&s| tap(keys, 1001, s)).collect();
    let out = store
        .ingest(&msgs, |d| keys.device_key(d).ok(), now)
        .unwrap();
    assert_eq!(
        out.confirmations[&("metro".to_string(), 1001)].len(),
        seqs.len()
    );
    (out.stored, out.duplicates)
}

fn seq_of(raw: &[u8]) -> u64 {
    u64::from_be_bytes(raw[35..43].try_into().unwrap())
}

#[test]
fn taps_are_kept_in_arrival_order_and_duplicates_told_by_the_device_state() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(ingest(&store, &keys, &[5, 1, 3, 3], T0), (3, 1));
    assert_eq!(ingest(&store, &keys, &[2, 5, 4, 1, 6], T0), (3, 2));
    let order: Vec<u64> = store.taps(100).unwrap().iter().map(|r| seq_of(r)).collect();
    assert_eq!(order, vec![5, 1, 3, 2, 4, 6]);
    let ids: Vec<u64> = store
        .pending_forward(100)
        .unwrap()
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
    // Forwarded and trimmed, a resend is still a duplicate: the state remembers.
    store.forwarded_at(6, T0).unwrap();
    assert_eq!(store.trim_expired_at(T0 + 7 * DAY_MS).unwrap(), 6);
    assert!(store.taps(100).unwrap().is_empty());
    assert_eq!(ingest(&store, &keys, &[1, 2, 3, 4, 5, 6], T0), (0, 6));
    // Ids go on after the trimmed ones, across a reopen.
    drop(store);
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(ingest(&store, &keys, &[7], T0), (1, 0));
    assert_eq!(store.pending_forward(10).unwrap()[0].0, 7);
}

#[test]
fn a_tap_in_a_gap_no_longer_tracked_is_stored_not_lost() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    // Every other sequence: one gap each, one more than the list keeps.
    let evens: Vec<u64> = (1..=MAX_GAPS as u64 + 1).map(|i| 2 * i).collect();
    assert_eq!(ingest(&store, &keys, &evens, T0).0, evens.len() as u64);
    let st = store.device(1001).unwrap().unwrap();
    assert_eq!(st.gaps.len(), MAX_GAPS);
    assert_eq!(st.gaps[0], (3, 3), "the gap (1, 1) was dropped");
    // 1 fell in the dropped gap: stored (clearing drops it if it was a duplicate); 3 fills a
    // tracked gap; 4 is a duplicate the state still tells.
    assert_eq!(ingest(&store, &keys, &[1], T0), (1, 0));
    assert_eq!(ingest(&store, &keys, &[3, 4], T0), (1, 1));
    // The untracked mark survives a reopen.
    drop(store);
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(ingest(&store, &keys, &[1, 4], T0), (1, 1));
}

/// The aggregate deltas not folded yet (entries of their table).
fn pending(store: &Store) -> u64 {
    let (tables, _) = store.table_stats().unwrap();
    tables
        .iter()
        .find(|t| t.name == "aggregate_deltas")
        .unwrap()
        .entries
}

/// The `card-day:` aggregates under `prefix`: (name, taps, amount).
fn card_days(store: &Store, prefix: &str, limit: usize) -> Vec<(String, u64, i64)> {
    store
        .aggregates(prefix, limit)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("card-day:"))
        .map(|(k, a)| (k, a.taps, a.amount_minor))
        .collect()
}

#[test]
fn card_day_aggregates_are_exact_before_and_after_they_are_folded() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    // signed_tap: card 0405050505050<seq>, day 0, 100 minor units.
    assert_eq!(ingest(&store, &keys, &[1, 2, 3], T0), (3, 0));
    assert_eq!(ingest(&store, &keys, &[1, 4], T0), (1, 1));
    // Per batch one entry per aggregate it touched: its card-days (3, then 1) and its device,
    // stop, route, product and hour (5 each).
    assert_eq!(
        pending(&store),
        3 + 5 + 1 + 5,
        "one entry per batch and aggregate"
    );
    let expect: Vec<(String, u64, i64)> = (1..=4)
        .map(|s| (format!("card-day:0405050505050{s}:0"), 1, 100))
        .collect();
    let got = card_days;
    assert_eq!(got(&store, "card-day:", 10), expect);
    assert_eq!(got(&store, "card-day:", 2), expect[..2].to_vec());
    assert_eq!(
        got(&store, "card-day:04050505050503", 10),
        expect[2..3].to_vec()
    );
    assert_eq!(got(&store, "", 100), expect, "every prefix at once");
    // Folded (with the trim, on the timer), the same figures, from the table alone (the
    // timer's clock on the fixture's day 0, within its card-days' retention).
    assert_eq!(store.trim_expired_at(DAY_MS / 2).unwrap(), 0);
    assert_eq!(pending(&store), 0);
    assert_eq!(got(&store, "card-day:", 10), expect);
    // More for a folded key: added to it.
    let more = signed_tap(&keys, "metro", 1002, 1);
    let m = Message {
        topic: "tapgate/v1/metro/taps/1002".to_string(),
        payload: more,
    };
    store.ingest(&[m], |d| keys.device_key(d).ok(), T0).unwrap();
    let first = got(&store, "card-day:04050505050501", 10);
    assert_eq!(first, vec![(expect[0].0.clone(), 2, 200)]);
    assert_eq!(store.fold_aggregates().unwrap(), 1);
    assert_eq!(got(&store, "card-day:04050505050501", 10), first);
}

/// Writes a store in the layout before taps were keyed by arrival: device 1001's taps 1..=10,
/// 1..=6 forwarded (clearing answered at `T0`), 7..=10 in the outbox, and one tap of device
/// 1002 that neither names (forwarded before the forwarded log existed).
fn write_old_layout(dir: &std::path::Path, keys: &KeySet) {
    let (env, dbs) = tapgate_lmdb::open(
        dir,
        [
            "taps",
            "devices",
            "quarantine",
            "quarantine_index",
            "quarantine_devices",
            "outbox",
            "meta",
            "aggregates",
            "forwarded",
        ],
        &tapgate_lmdb::EnvConfig::durable(64 << 20),
    )
    .unwrap();
    let [taps, devices, _, _, _, outbox, meta, _, forwarded] = dbs;
    let devices = devices.remap_types::<U64<BE>, SerdeJson<DeviceState>>();
    let meta = meta.remap_types::<Str, U64<BE>>();
    let mut t = env.write_txn().unwrap();
    for seq in 1..=10u64 {
        let key = tapgate_lmdb::key::u32_u64(1001, seq);
        taps.put(&mut t, &key, &signed_tap(keys, "metro", 1001, seq))
            .unwrap();
        if seq <= 6 {
            let v = [&key[..], &T0.to_be_bytes()].concat();
            forwarded.put(&mut t, &seq.to_be_bytes(), &v).unwrap();
        } else {
            outbox.put(&mut t, &seq.to_be_bytes(), &key).unwrap();
        }
    }
    let orphan = tapgate_lmdb::key::u32_u64(1002, 1);
    taps.put(&mut t, &orphan, &signed_tap(keys, "metro", 1002, 1))
        .unwrap();
    let st = |highest_seq, taps| DeviceState {
        highest_seq,
        taps,
        ..Default::default()
    };
    devices.put(&mut t, &1001, &st(10, 10)).unwrap();
    devices.put(&mut t, &1002, &st(1, 1)).unwrap();
    meta.put(&mut t, "forwarded_through", &6).unwrap();
    t.commit().unwrap();
}

#[test]
fn a_store_in_the_old_layout_is_migrated_at_open() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    write_old_layout(dir.path(), &keys);
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let stored: Vec<u64> = store.taps(100).unwrap().iter().map(|r| seq_of(r)).collect();
    assert_eq!(stored, (1..=10).collect::<Vec<_>>(), "the orphan dropped");
    let pending: Vec<(u64, u64)> = store
        .pending_forward(100)
        .unwrap()
        .iter()
        .map(|(id, raw)| (*id, seq_of(raw)))
        .collect();
    assert_eq!(pending, (7..=10).map(|s| (s, s)).collect::<Vec<_>>());
    assert_eq!(
        (store.outbox_len().unwrap(), store.forwarded_kept().unwrap()),
        (4, 6)
    );
    // Duplicates still told, the orphan's too; new taps go on after the old ids.
    assert_eq!(ingest(&store, &keys, &[3, 9, 11], T0), (1, 2));
    let m = tap(&keys, 1002, 1);
    let out = store.ingest(&[m], |d| keys.device_key(d).ok(), T0).unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 1));
    assert_eq!(store.pending_forward(100).unwrap().last().unwrap().0, 11);
    // The forwarded six keep their answer time: trimmed when their window ends.
    assert_eq!(store.trim_expired_at(T0 + 7 * DAY_MS - 1).unwrap(), 0);
    assert_eq!(store.trim_expired_at(T0 + 7 * DAY_MS).unwrap(), 6);
    // Opened again: nothing left to migrate, nothing changed.
    drop(store);
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let stored: Vec<u64> = store.taps(100).unwrap().iter().map(|r| seq_of(r)).collect();
    assert_eq!(stored, vec![7, 8, 9, 10, 11]);
    assert_eq!(store.forwarded_at(11, T0).unwrap(), 0);
    assert_eq!(store.trim_expired_at(T0 + 7 * DAY_MS).unwrap(), 5);
    assert!(store.taps(100).unwrap().is_empty());
}

#[test]
fn a_batch_with_more_card_days_than_a_page_holds_folds_exactly() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    // signed_tap's card is 0405050505 05 <seq as u8>: 300 taps, 256 cards, 44 of them twice.
    let seqs: Vec<u64> = (1..=300).collect();
    assert_eq!(ingest(&store, &keys, &seqs, T0), (300, 0));
    assert_eq!(
        pending(&store),
        256 + 5,
        "its card-days, device, stop, route, product, hour"
    );
    let before = card_days(&store, "card-day:", 1_000);
    assert_eq!(before.len(), 256);
    assert_eq!(before.iter().map(|c| c.1).sum::<u64>(), 300);
    assert_eq!(before.iter().map(|c| c.2).sum::<i64>(), 300 * 100);
    let twice = before.iter().filter(|c| c.1 == 2).count();
    assert_eq!(twice, 44);
    // A second batch on the same cards, folded with the first in one pass.
    assert_eq!(ingest(&store, &keys, &[301], T0), (1, 0));
    assert_eq!(store.fold_aggregates().unwrap(), 2);
    assert_eq!(pending(&store), 0);
    let after = card_days(&store, "card-day:", 1_000);
    let mut expect = before.clone();
    let c = expect
        .iter_mut()
        .find(|c| c.0 == "card-day:0405050505052D:0")
        .unwrap();
    (c.1, c.2) = (c.1 + 1, c.2 + 100);
    assert_eq!(after, expect);
    // Nothing left to fold; ingestion goes on after the folded ids.
    assert_eq!(store.fold_aggregates().unwrap(), 0);
    assert_eq!(ingest(&store, &keys, &[302], T0), (1, 0));
    assert_eq!(store.pending_forward(1_000).unwrap().last().unwrap().0, 302);
}

#[test]
fn card_day_records_of_the_per_batch_layout_are_migrated_at_open() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    {
        // A store as the per-batch layout left it: two batches' records not folded yet (ids
        // 3 and 5; batch 5 has a card twice over, as a record could), under the old table.
        let store = Store::open(dir.path(), 64 << 20).unwrap();
        assert_eq!(ingest(&store, &keys, &[1, 2, 3, 4, 5], T0), (5, 0));
        drop(store);
        let (env, dbs) = tapgate_lmdb::open(
            dir.path(),
            ["card_day_pending", "aggregate_deltas"],
            &tapgate_lmdb::EnvConfig::durable(64 << 20),
        )
        .unwrap();
        let [old, new] = dbs;
        let old = old.remap_types::<U64<BE>, SerdeJson<Vec<(String, Aggregate)>>>();
        let a = |taps, amount_minor| Aggregate {
            taps,
            refused: 0,
            amount_minor,
        };
        let mut t = env.write_txn().unwrap();
        new.clear(&mut t).unwrap();
        let day = |s: u8| format!("card-day:0405050505050{s}:0");
        old.put(
            &mut t,
            &3,
            &vec![
                (day(1), a(1, 100)),
                (day(2), a(1, 100)),
                (day(3), a(1, 100)),
            ],
        )
        .unwrap();
        old.put(
            &mut t,
            &5,
            &vec![(day(4), a(1, 100)), (day(5), a(1, 60)), (day(5), a(1, 40))],
        )
        .unwrap();
        t.commit().unwrap();
    }
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let expect: Vec<(String, u64, i64)> = (1..=5)
        .map(|s| {
            (
                format!("card-day:0405050505050{s}:0"),
                1 + u64::from(s == 5),
                100,
            )
        })
        .collect();
    assert_eq!(
        pending(&store),
        5,
        "one entry per batch and card-day migrated"
    );
    assert_eq!(card_days(&store, "card-day:", 10), expect);
    // New batches go after the migrated ids; all folded, the same figures plus the new tap.
    assert_eq!(ingest(&store, &keys, &[6], T0), (1, 0));
    assert_eq!(store.pending_forward(10).unwrap().last().unwrap().0, 6);
    assert_eq!(store.fold_aggregates().unwrap(), 3);
    let mut with_six = expect.clone();
    with_six.push(("card-day:04050505050506:0".to_string(), 1, 100));
    assert_eq!(card_days(&store, "card-day:", 10), with_six);
    // Opened again: nothing left to migrate.
    drop(store);
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(pending(&store), 0);
    assert_eq!(card_days(&store, "card-day:", 10), with_six);
}

#[test]
fn an_entry_the_deltas_layout_did_not_write_is_skipped_and_folded_away() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(ingest(&store, &keys, &[1], T0), (1, 0));
    drop(store);
    {
        // A short key after every batch's, a value of the wrong size before them.
        let (env, dbs) = tapgate_lmdb::open(
            dir.path(),
            ["aggregate_deltas"],
            &tapgate_lmdb::EnvConfig::durable(64 << 20),
        )
        .unwrap();
        let [deltas] = dbs;
        let mut t = env.write_txn().unwrap();
        deltas.put(&mut t, &[0xFF], &[0; 24]).unwrap();
        let early = [&0u64.to_be_bytes()[..], b"card-day:X:0"].concat();
        deltas.put(&mut t, &early, &[1; 3]).unwrap();
        t.commit().unwrap();
    }
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let expect = vec![("card-day:04050505050501:0".to_string(), 1, 100)];
    assert_eq!(card_days(&store, "card-day:", 10), expect);
    assert_eq!(pending(&store), 5 + 1 + 2);
    // Folded: the batch counted once, the two foreign entries deleted, nothing left.
    assert_eq!(store.fold_aggregates().unwrap(), 3);
    assert_eq!(pending(&store), 0);
    assert_eq!(store.fold_aggregates().unwrap(), 0);
    assert_eq!(card_days(&store, "card-day:", 10), expect);
}
