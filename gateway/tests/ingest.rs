//! Ingestion: verified, de-duplicated, durable; bad input quarantined with a reason; gaps
//! tracked. (Forwarding to clearing: the root tests' gateway_forward_clearing.rs.)

use gateway::store::{Message, Store};
use purse::keys::{KeySet, Role};
use purse::receipt::{CommitReceipt, TxKind};
use purse::tap::{TapMeta, TapRecord};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::fixtures::signed_tap;

fn keys() -> KeySet {
    KeySet::generate(&mut StdRng::seed_from_u64(1))
}

fn signed(keys: &KeySet, device: u32, seq: u64) -> Vec<u8> {
    signed_tap(
        &keys.for_role(Role::Gateway, 0).unwrap(),
        "metro",
        device,
        seq,
    )
}

/// The issuer keys and a new store in a temporary directory (kept while the test runs).
fn open_store() -> (KeySet, tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    (keys(), dir, store)
}

fn msg(topic: &str, payload: Vec<u8>) -> Message {
    Message {
        topic: topic.into(),
        payload,
    }
}

#[test]
fn ingest_verifies_dedupes_quarantines_and_tracks_gaps() {
    let (ks, dir, store) = open_store();
    let gw = ks.for_role(Role::Gateway, 0).unwrap();
    let key = |d: u32| gw.device_key(d).ok();
    let topic = "tapgate/v1/metro/taps/1001";
    let mut two = signed(&ks, 1001, 1);
    two.extend(signed(&ks, 1001, 2));
    let mut forged = signed(&ks, 1001, 9);
    forged[20] ^= 1;
    let out = store
        .ingest(
            &[
                msg(topic, two),
                msg(topic, signed(&ks, 1001, 5)),
                msg(topic, signed(&ks, 1001, 2)), // QoS 1 redelivery
                msg(topic, forged),
                msg("tapgate/v1/metro/taps/1002", signed(&ks, 1001, 6)), // another device's topic
                msg(topic, vec![1, 2, 3]),
                msg("elsewhere/taps", signed(&ks, 1001, 7)),
            ],
            key,
            1_000,
        )
        .unwrap();
    assert_eq!((out.stored, out.duplicates, out.quarantined), (3, 1, 4));
    assert_eq!(
        out.confirmations[&("metro".to_string(), 1001)],
        vec![1, 2, 5, 2]
    );
    let q = store.quarantined(10).unwrap();
    assert!(q[0].reason.contains("device MAC"), "{q:?}");
    assert!(
        q[1].reason.contains("device 1001 published on device 1002"),
        "{q:?}"
    );
    assert!(
        q[2].reason.contains("not a sequence of tap records"),
        "{q:?}"
    );
    assert!(q[3].reason.contains("topic"), "{q:?}");
    assert_eq!(store.device(1001).unwrap().unwrap().gaps, vec![(3, 4)]);
    // A late tap fills part of the gap; the store survives a reopen; duplicates still caught.
    drop(store);
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let out = store
        .ingest(
            &[
                msg(topic, signed(&ks, 1001, 4)),
                msg(topic, signed(&ks, 1001, 1)),
            ],
            key,
            2_000,
        )
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (1, 1));
    assert_eq!(store.device(1001).unwrap().unwrap().gaps, vec![(3, 3)]);
    assert_eq!(store.outbox_len().unwrap(), 4);
}

/// `signed(keys, device, seq)` as format v2 (79 bytes, no flags byte), as a validator journalled
/// it before its upgrade.
fn signed_v2(keys: &KeySet, device: u32, seq: u64) -> Vec<u8> {
    let v3 = signed(keys, device, seq);
    let mut body = v3[..71].to_vec();
    body[0] = 2;
    let key = keys
        .for_role(Role::Gateway, 0)
        .unwrap()
        .device_key(device)
        .unwrap();
    let mac = purse::crypto::mac8(&key, &purse::tap::mac_input(&body, "metro"));
    body.extend_from_slice(&mac);
    body
}

#[test]
fn a_message_mixing_v2_and_v3_records_is_split_by_each_version_byte() {
    let (ks, _dir, store) = open_store();
    let gw = ks.for_role(Role::Gateway, 0).unwrap();
    let key = |d: u32| gw.device_key(d).ok();
    let topic = "tapgate/v1/metro/taps/1001";
    let mixed = [
        signed_v2(&ks, 1001, 1),
        signed(&ks, 1001, 2),
        signed_v2(&ks, 1001, 3),
    ]
    .concat();
    assert_eq!(mixed.len(), 79 + 80 + 79);
    // Cut short: where the records after the cut begin cannot be known; quarantined whole.
    let cut = mixed[..mixed.len() - 1].to_vec();
    let out = store
        .ingest(&[msg(topic, mixed), msg(topic, cut)], key, 1_000)
        .unwrap();
    assert_eq!((out.stored, out.quarantined), (3, 1), "{out:?}");
    let flags: Vec<_> = store
        .taps(10)
        .unwrap()
        .iter()
        .map(|raw| {
            TapRecord::decode_verified(raw, "metro", key)
                .unwrap()
                .flags()
        })
        .collect();
    assert_eq!(flags.iter().filter(|f| f.is_none()).count(), 2, "{flags:?}");
    assert_eq!(flags.iter().filter(|f| f.is_some()).count(), 1, "{flags:?}");
    let q = store.quarantined(10).unwrap();
    assert!(q[0].reason.contains("is 78 bytes, expected 79"), "{q:?}");
}

#[test]
fn an_action_list_pickup_is_value_added_not_a_fare() {
    let (ks, _dir, store) = open_store();
    let gw = ks.for_role(Role::Gateway, 0).unwrap();
    let key = |d: u32| gw.device_key(d).ok();
    let (hi, lo) = purse::actionlist::order_tap_codes(77);
    let r = CommitReceipt::for_tests(
        [4, 7, 7, 7, 7, 7, 7],
        3,
        [3; 8],
        TxKind::Credit,
        5_000,
        6_000,
    );
    let pickup = TapRecord::accepted(
        &r,
        TapMeta {
            device_id: 1001,
            device_seq: 1,
            device_time_ms: 1_796_079_600_000,
            stop_id: hi,
            route_id: lo,
            ..Default::default()
        },
    )
    .sign("metro", &gw.device_key(1001).unwrap());
    let out = store
        .ingest(
            &[msg("tapgate/v1/metro/taps/1001", pickup.to_vec())],
            key,
            1_000,
        )
        .unwrap();
    assert_eq!(out.stored, 1);
    let products = store.aggregates("product:", 10).unwrap();
    assert_eq!(products.len(), 1);
    assert_eq!(products[0].0, "product:pickup");
    assert_eq!(products[0].1.amount_minor, 5_000);
    for prefix in ["stop:", "route:", "card-day:", "device:"] {
        assert!(store.aggregates(prefix, 10).unwrap().is_empty(), "{prefix}");
    }
    let csv = gateway::report::tides_fare_transactions(
        &store,
        "metro",
        |d| gw.device_key_ring(d).unwrap_or_default(),
        0,
        u64::MAX,
        "KRW",
        0,
        &gateway::report::Places::default(),
        10,
    )
    .unwrap();
    let row = csv.lines().nth(1).unwrap();
    assert!(row.contains(",Add,1001,,1,"), "{row}");
    assert!(row.ends_with(','), "no route: {row}");
}
