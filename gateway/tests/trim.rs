//! What is trimmed once clearing has answered: forwarded taps, after their retention window
//! (or at once while the map is past the quarantine mark); never a tap not yet forwarded.

use gateway::store::{Message, Store, StoreLimits};
use purse::keys::KeySet;
use tapgate_testkit::broker::tap_message as tap;
use tapgate_testkit::fixtures::gateway_keys;

const DAY_MS: u64 = 86_400_000;

fn ingest(store: &Store, keys: &KeySet, seqs: std::ops::RangeInclusive<u64>, now: u64) -> u64 {
    let msgs: Vec<Message> = seqs.map(|s| tap(keys, 1001, s)).collect();
    let out = store
        .ingest(&msgs, |d| keys.device_key(d).ok(), now)
        .unwrap();
    assert!(out.confirmations[&("metro".to_string(), 1001)].len() == msgs.len());
    out.stored
}

fn last_pending(store: &Store) -> u64 {
    store.pending_forward(usize::MAX).unwrap().last().unwrap().0
}

#[test]
fn forwarded_taps_are_kept_for_the_window_then_trimmed_and_unforwarded_ones_never() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(store.limits().forwarded_retention_ms, 7 * DAY_MS);
    let t0 = 1_790_000_000_000;
    assert_eq!(ingest(&store, &keys, 1..=10, t0), 10);
    // Clearing answered for 1..=6 on day 0; 7..=10 are still in the outbox.
    let through = store.pending_forward(6).unwrap().last().unwrap().0;
    assert_eq!(store.forwarded_at(through, t0).unwrap(), 0);
    assert_eq!(
        (store.outbox_len().unwrap(), store.forwarded_kept().unwrap()),
        (4, 6)
    );
    // Within the window: a late resend is still a duplicate, nothing trimmed.
    assert_eq!(ingest(&store, &keys, 1..=3, t0 + DAY_MS), 0);
    assert_eq!(store.forwarded_at(through, t0 + 7 * DAY_MS - 1).unwrap(), 0);
    assert_eq!(store.taps(100).unwrap().len(), 10);
    // Past it: the six forwarded taps go; the four not forwarded stay, however old.
    assert_eq!(store.forwarded_at(through, t0 + 7 * DAY_MS).unwrap(), 6);
    assert_eq!(store.forwarded_kept().unwrap(), 0);
    let kept: Vec<u64> = store
        .taps(100)
        .unwrap()
        .iter()
        .map(|r| u64::from_be_bytes(r[35..43].try_into().unwrap()))
        .collect();
    assert_eq!(kept, vec![7, 8, 9, 10]);
    assert_eq!(store.outbox_len().unwrap(), 4);
    assert_eq!(store.pending_forward(100).unwrap().len(), 4);
    // A resend of a trimmed tap is still a duplicate (the device's state tells it, not the
    // stored taps); the device's count and gaps are unchanged by the trim.
    assert_eq!(ingest(&store, &keys, 2..=2, t0 + 8 * DAY_MS), 0);
    let st = store.device(1001).unwrap().unwrap();
    assert_eq!((st.highest_seq, st.taps, st.gaps.len()), (10, 10, 0));
    // The outbox ids go on after the trimmed ones, and survive a reopen.
    let before = last_pending(&store);
    assert_eq!(ingest(&store, &keys, 11..=11, t0 + 8 * DAY_MS), 1);
    let last = last_pending(&store);
    assert!(last > before && before > through);
    drop(store);
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(store.forwarded_at(last, t0 + 8 * DAY_MS).unwrap(), 0);
    assert_eq!(store.forwarded_kept().unwrap(), 5);
    assert_eq!(store.forwarded_at(last, t0 + 15 * DAY_MS).unwrap(), 5);
    assert!(store.taps(100).unwrap().is_empty());
}

#[test]
fn a_store_past_the_quarantine_mark_trims_forwarded_taps_at_once() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 20)
        .unwrap()
        .with_limits(StoreLimits {
            quarantine_stop_at_fill_percent: 40,
            ..StoreLimits::default()
        });
    let mut seq = 0;
    while store.usage().map(|(u, m)| u < m / 100 * 40).unwrap() {
        assert_eq!(ingest(&store, &keys, seq + 1..=seq + 200, 0), 200);
        seq += 200;
    }
    let trimmed = store.forwarded_at(last_pending(&store), 0).unwrap();
    assert_eq!(
        trimmed, seq,
        "all forwarded taps trimmed, the window notwithstanding"
    );
    assert!(store.taps(usize::MAX).unwrap().is_empty());
    let (used, map) = store.usage().unwrap();
    assert!(used < map / 100 * 40, "{used} of {map}");
}

#[test]
fn an_idle_store_trims_expired_taps_without_a_new_batch_in_chunks_of_trim_chunk() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let t0 = 1_790_000_000_000;
    let n = 2 * gateway::store::TRIM_CHUNK as u64 + 7;
    let mut seq = 0;
    while seq < n {
        let hi = (seq + 500).min(n);
        assert_eq!(ingest(&store, &keys, seq + 1..=hi, t0), hi - seq);
        seq = hi;
    }
    assert_eq!(store.forwarded_at(last_pending(&store), t0).unwrap(), 0);
    // No new tap, no new batch: the timer's trim alone, within the window then past it.
    assert_eq!(store.trim_expired_at(t0 + 7 * DAY_MS - 1).unwrap(), 0);
    assert_eq!(store.forwarded_kept().unwrap(), n);
    assert_eq!(store.trim_expired_at(t0 + 7 * DAY_MS).unwrap(), n);
    assert_eq!(store.forwarded_kept().unwrap(), 0);
    assert!(store.taps(10).unwrap().is_empty());
    assert_eq!(store.trim_expired_at(t0 + 8 * DAY_MS).unwrap(), 0);
}

/// The `card-day:` aggregates (name, taps) and device 1001's taps.
fn counts(store: &Store) -> (Vec<(String, u64)>, u64) {
    let days = store
        .aggregates("card-day:", 100)
        .unwrap()
        .into_iter()
        .map(|(k, a)| (k, a.taps))
        .collect();
    let device = store.aggregates("device:1001", 1).unwrap()[0].1.taps;
    (days, device)
}

#[test]
fn card_day_aggregates_are_trimmed_after_their_retention_and_a_late_tap_does_not_restart_one() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(store.limits().card_day_retention_days, 7);
    // The fixture's taps are on day 0 (validator clock), cards 04050505050501..03.
    assert_eq!(ingest(&store, &keys, 1..=3, DAY_MS / 2), 3);
    store
        .forwarded_at(last_pending(&store), DAY_MS / 2)
        .unwrap();
    let day0: Vec<(String, u64)> = (1..=3)
        .map(|s| (format!("card-day:0405050505050{s}:0"), 1))
        .collect();
    // Seven days after day 0 ended (the gateway clock at the end of day 7): still kept.
    assert_eq!(
        store.trim_expired_at(8 * DAY_MS - 1).unwrap(),
        3,
        "the taps"
    );
    assert_eq!(counts(&store), (day0.clone(), 3));
    assert_eq!(store.card_days_kept_from().unwrap(), 0);
    // Day 8: day 0's card-days go; the other aggregates stay.
    assert_eq!(store.trim_expired_at(8 * DAY_MS).unwrap(), 0);
    assert_eq!(counts(&store), (vec![], 3));
    assert_eq!(store.card_days_kept_from().unwrap(), 1);
    // A late tap of day 0 (a validator back after a week): stored, forwarded, counted for its
    // device; not a card-day of one tap for a day that had three.
    assert_eq!(ingest(&store, &keys, 4..=4, 8 * DAY_MS), 1);
    assert_eq!(counts(&store), (vec![], 4));
    store
        .forwarded_at(last_pending(&store), 8 * DAY_MS)
        .unwrap();
    assert_eq!(counts(&store), (vec![], 4));
    drop(store);
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(counts(&store), (vec![], 4));
    assert_eq!(store.card_days_kept_from().unwrap(), 1);
}

/// Housekeeping after each forwarded batch and on the timer (`trim_expired_at`: the forwarded
/// taps' trim, the card-days' trim, the fold) takes the store's writer lock — which ingest
/// needs — only when it has something to do: nothing expired, nothing pending to fold, no mark
/// to move opens no write transaction.
#[test]
fn housekeeping_with_nothing_to_do_takes_no_write_lock() {
    let keys = gateway_keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let t0 = 1_790_000_000_000;
    assert_eq!(ingest(&store, &keys, 1..=5, t0), 5);
    // The ingested taps' aggregate deltas to fold, the card-days' first mark to set: writes.
    let w = store.write_transactions();
    assert_eq!(store.trim_expired_at(t0).unwrap(), 0);
    assert!(store.write_transactions() > w);
    // Again, the same day, nothing forwarded: nothing to do, no write transaction.
    let w = store.write_transactions();
    assert_eq!(store.trim_expired_at(t0 + 1_000).unwrap(), 0);
    assert_eq!(store.write_transactions(), w);
    // Forwarded, still within the retention window: nothing expired, no write transaction.
    let through = last_pending(&store);
    assert_eq!(store.forwarded_at(through, t0 + 2_000).unwrap(), 0);
    let w = store.write_transactions();
    assert_eq!(store.trim_expired_at(t0 + 3_000).unwrap(), 0);
    assert_eq!(store.write_transactions(), w);
    // Past the window: the five go, in a write transaction.
    let w = store.write_transactions();
    assert_eq!(store.trim_expired_at(t0 + 7 * DAY_MS + 2_000).unwrap(), 5);
    assert!(store.write_transactions() > w);
    assert_eq!(store.forwarded_kept().unwrap(), 0);
    // A new tap's deltas are folded by the next call (the fold's check sees them).
    assert_eq!(ingest(&store, &keys, 6..=6, t0 + 7 * DAY_MS), 1);
    let w = store.write_transactions();
    store.trim_expired_at(t0 + 7 * DAY_MS + 1).unwrap();
    assert_eq!(store.write_transactions(), w + 1);
    assert_eq!(
        store.aggregates("device:", 10).unwrap()[0].1.taps,
        6,
        "every tap folded"
    );
}
