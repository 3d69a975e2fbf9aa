//! A hostile device against the gateway's store (issue 14, item 3): garbage is bounded per
//! device and never takes the room genuine taps need; a full store refuses a batch whole
//! (nothing stored, acknowledged or confirmed), keeps serving, and takes it when room returns.

use gateway::daemon::{ingest_durably, GatewayStats};
use gateway::store::{Message, Store, StoreLimits};
use purse::keys::{KeySet, Role};
use purse::receipt::{CommitReceipt, TxKind};
use purse::tap::{TapMeta, TapRecord, TAP_LEN};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn keys() -> KeySet {
    KeySet::generate(&mut StdRng::seed_from_u64(14))
        .for_role(Role::Gateway, 0)
        .unwrap()
}

fn tap(keys: &KeySet, device: u32, seq: u64) -> Vec<u8> {
    let r = CommitReceipt::for_tests(
        [4, 9, 9, 9, 9, (seq >> 8) as u8, seq as u8],
        seq as u32,
        [seq as u8; 8],
        TxKind::Debit,
        100,
        900,
    );
    TapRecord::accepted(
        &r,
        TapMeta {
            device_id: device,
            device_seq: seq,
            ..Default::default()
        },
    )
    .sign("metro", &keys.device_key(device).unwrap())
    .to_vec()
}

fn msg(device: u32, payload: Vec<u8>) -> Message {
    Message {
        topic: format!("tapgate/v1/metro/taps/{device}"),
        payload,
    }
}

/// The attack of the issue: 16 MB messages of garbage records (and unaligned garbage) from one
/// device, 70 of them, with another device's genuine taps in the same batches.
#[test]
fn one_devices_garbage_is_bounded_and_never_stops_another_devices_taps() {
    let ks = keys();
    let key = |d: u32| ks.device_key(d).ok();
    let dir = tempfile::tempdir().unwrap();
    // 64 MB: the old store put 200,000 quarantine rows in it per message and was full after
    // a handful.
    let limits = StoreLimits::default();
    let store = Store::open(dir.path(), 64 << 20)
        .unwrap()
        .with_limits(limits);
    let records = (16 << 20) / TAP_LEN;
    let mut garbage = vec![0u8; records * TAP_LEN];
    StdRng::seed_from_u64(1).fill_bytes(&mut garbage);
    for rec in garbage.chunks_exact_mut(TAP_LEN) {
        rec[0] = purse::tap::TAP_VERSION; // well-formed enough to be decoded and MAC-checked
        rec[31..35].copy_from_slice(&666u32.to_be_bytes());
    }
    let unaligned = vec![0x5a; (16 << 20) + 1];
    let mut genuine_seq = 0u64;
    let t0 = Instant::now();
    for i in 0..70u64 {
        genuine_seq += 1;
        let bad = if i % 2 == 0 {
            garbage.clone()
        } else {
            unaligned.clone()
        };
        let out = store
            .ingest(
                &[msg(666, bad), msg(1001, tap(&ks, 1001, genuine_seq))],
                key,
                1_000 + i * 1_000,
            )
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(out.stored, 1, "message {i}: the genuine tap is stored");
        assert_eq!(
            out.confirmations[&("metro".to_string(), 1001)],
            vec![genuine_seq],
            "and confirmed"
        );
        assert!(
            !out.confirmations.contains_key(&("metro".to_string(), 666)),
            "nothing of the garbage is confirmed"
        );
    }
    // Bounded: per device, in entries and bytes; the whole store stays small.
    let q = store.quarantine_devices(10).unwrap();
    let (dev, acct) = q.iter().find(|(d, _)| *d == 666).unwrap();
    assert_eq!(*dev, 666);
    assert!(acct.entries <= limits.quarantine_max_per_device);
    assert!(acct.bytes <= limits.quarantine_max_bytes_per_device);
    assert_eq!(acct.messages, 70, "every bad message is counted");
    assert!(store.quarantine_len().unwrap() <= limits.quarantine_max_per_device);
    let (used, map) = store.usage().unwrap();
    assert!(used < map / 4, "store grew to {used} of {map}");
    // One entry per message, with its count (examination stops at the per-message bound).
    let entries = store.quarantined(1_000).unwrap();
    assert_eq!(
        entries[0].records,
        limits.quarantine_max_bad_records_per_message
    );
    assert!(
        entries[0].reason.contains("records refused"),
        "{:?}",
        entries[0]
    );
    assert!(entries[0].payload_hex.len() <= 2 * 1024);
    assert_eq!(store.device(1001).unwrap().unwrap().taps, 70);
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "garbage examined cheaply"
    );

    // A flood of small garbage messages: oldest entries dropped and counted, the device
    // flagged (and then throttled: at most one entry per interval).
    let small: Vec<Message> = (0..3_000).map(|i| msg(777, vec![i as u8; 10])).collect();
    let out = store.ingest(&small, key, 500_000).unwrap();
    assert!(out.quarantine_dropped > 0);
    assert_eq!(out.flagged, vec![777]);
    let out = store
        .ingest(
            &[msg(777, vec![1; 10]), msg(1001, tap(&ks, 1001, 71))],
            key,
            500_001,
        )
        .unwrap();
    assert_eq!((out.quarantine_throttled, out.stored), (1, 1));
    let q = store.quarantine_devices(10).unwrap();
    let acct = &q.iter().find(|(d, _)| *d == 777).unwrap().1;
    assert!(acct.flagged);
    assert!(acct.entries <= limits.quarantine_max_per_device);
    assert_eq!(acct.messages, 3_001);
    assert!(acct.dropped_entries >= 1);
    assert_eq!(
        acct.entries + acct.dropped_entries + acct.throttled_messages,
        3_001,
        "every message kept, dropped or throttled, and counted"
    );
}

/// Quarantine stops writing well before the map is full: garbage cannot take the room that
/// genuine taps need.
#[test]
fn garbage_cannot_fill_the_room_genuine_taps_need() {
    let ks = keys();
    let key = |d: u32| ks.device_key(d).ok();
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        // Generous per device: the fill mark must bind first.
        quarantine_max_per_device: u64::MAX,
        quarantine_max_bytes_per_device: u64::MAX,
        ..StoreLimits::default()
    };
    let store = Store::open(dir.path(), 4 << 20)
        .unwrap()
        .with_limits(limits);
    // Many devices' garbage (device ids are free in a topic): bounded by the fill mark.
    for round in 0..160u64 {
        let batch: Vec<Message> = (0..50u32)
            .map(|d| msg(10_000 + d + round as u32 * 50, vec![0x77; 3_000]))
            .collect();
        store.ingest(&batch, key, round).unwrap();
    }
    let (used, map) = store.usage().unwrap();
    assert!(
        used <= map / 100 * (limits.quarantine_stop_at_fill_percent + 10),
        "{used} of {map}"
    );
    let out = store
        .ingest(&[msg(1001, tap(&ks, 1001, 1))], key, 99)
        .unwrap();
    assert_eq!(out.stored, 1);
    assert!(out.confirmations[&("metro".to_string(), 1001)] == vec![1]);
}

fn fill_until_full(store: &Store, ks: &KeySet, seq: &mut u64) -> Vec<Message> {
    let key = |d: u32| ks.device_key(d).ok();
    loop {
        let batch: Vec<Message> = (0..200)
            .map(|_| {
                *seq += 1;
                msg(1001, tap(ks, 1001, *seq))
            })
            .collect();
        match store.ingest(&batch, key, 0) {
            Ok(o) => assert_eq!(o.stored, 200),
            Err(e) => {
                assert!(e.is_full(), "{e}");
                return batch;
            }
        }
    }
}

/// A full map (refusal mark, or LMDB's MDB_MAP_FULL itself): the batch is refused whole, the
/// store still reads and trims, and the same batch goes in once room returns.
#[test]
fn a_full_store_refuses_a_batch_whole_and_takes_it_when_room_returns() {
    let ks = keys();
    let key = |d: u32| ks.device_key(d).ok();
    for refuse_at in [90, 100] {
        let dir = tempfile::tempdir().unwrap();
        let limits = StoreLimits {
            ingest_refuse_at_fill_percent: refuse_at,
            quarantine_stop_at_fill_percent: 50,
            ..StoreLimits::default()
        };
        let store = Store::open(dir.path(), 2 << 20)
            .unwrap()
            .with_limits(limits);
        let mut seq = 0;
        let refused = fill_until_full(&store, &ks, &mut seq);
        let stored = store.device(1001).unwrap().unwrap().taps;
        assert_eq!(stored, seq - 200, "nothing of the refused batch was stored");
        // Still serving reads; a second try is refused the same way (no wedge, no partial).
        assert_eq!(store.taps(1_000_000).unwrap().len() as u64, stored);
        assert!(store.ingest(&refused, key, 0).unwrap_err().is_full());
        if refuse_at == 100 {
            // LMDB's own MDB_MAP_FULL: room returns with a larger map (a restart).
            drop(store);
            let store = Store::open(dir.path(), 8 << 20)
                .unwrap()
                .with_limits(limits);
            let out = store.ingest(&refused, key, 0).unwrap();
            assert_eq!(out.stored, 200);
            assert_eq!(out.confirmations[&("metro".to_string(), 1001)].len(), 200);
            assert_eq!(store.device(1001).unwrap().unwrap().taps, seq);
        } else {
            // Below LMDB's limit the outbox can still be trimmed: forwarding makes room.
            let last = store.pending_forward(usize::MAX).unwrap().last().unwrap().0;
            store.forwarded(last).unwrap();
            let out = store.ingest(&refused, key, 0).unwrap();
            assert_eq!(out.stored, 200);
            assert_eq!(store.device(1001).unwrap().unwrap().taps, seq);
        }
    }
}

/// The daemon's ingestion step on a full store: raises the alarm, stalls without confirming
/// (or losing) the batch, and finishes it once room returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_raises_the_alarm_stalls_and_recovers() {
    let ks = keys();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 2 << 20).unwrap();
    let mut seq = 0;
    let refused = fill_until_full(&store, &ks, &mut seq);
    let stats = Arc::new(GatewayStats::default());
    let task = {
        let (store, ks, stats) = (store.clone(), ks.clone(), stats.clone());
        tokio::spawn(async move { ingest_durably(&store, &ks, &stats, refused, 0).await })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stats.store_full.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "no alarm");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.store_full_events.load(Ordering::Relaxed), 1);
    assert!(!task.is_finished(), "the batch is held, not confirmed");
    // Room returns: clearing took the outbox.
    let last = store.pending_forward(usize::MAX).unwrap().last().unwrap().0;
    store.forwarded(last).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("ingestion resumed")
        .unwrap();
    assert_eq!(out.stored, 200);
    assert_eq!(out.confirmations[&("metro".to_string(), 1001)].len(), 200);
    assert!(!stats.store_full.load(Ordering::Relaxed), "alarm cleared");
    assert_eq!(store.device(1001).unwrap().unwrap().taps, seq);
}
