//! Ingestion: verified, de-duplicated, durable; bad input quarantined with a reason; gaps
//! tracked; forwarding in idempotent batches that clearing books exactly once.

use gateway::forward::forward_once;
use gateway::store::{Message, Store};
use purse::card::{Card, Personalisation};
use purse::keys::{KeySet, Role};
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use purse::tap::{TapMeta, TapRecord};
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Mutex;

fn keys() -> KeySet {
    KeySet::generate(&mut StdRng::seed_from_u64(1))
}

fn signed(keys: &KeySet, device: u32, seq: u64) -> Vec<u8> {
    let r = CommitReceipt::for_tests(
        [4, 1, 1, 1, 1, 1, seq as u8],
        seq as u32,
        [seq as u8; 8],
        TxKind::Debit,
        100,
        900,
    );
    let t = TapRecord::accepted(
        &r,
        TapMeta {
            device_id: device,
            device_seq: seq,
            ..Default::default()
        },
    );
    t.sign(
        "metro",
        &keys
            .for_role(Role::Gateway, 0)
            .unwrap()
            .device_key(device)
            .unwrap(),
    )
    .to_vec()
}

fn msg(topic: &str, payload: Vec<u8>) -> Message {
    Message {
        topic: topic.into(),
        payload,
    }
}

#[test]
fn ingest_verifies_dedupes_quarantines_and_tracks_gaps() {
    let ks = keys();
    let gw = ks.for_role(Role::Gateway, 0).unwrap();
    let key = |d: u32| gw.device_key(d).ok();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
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
    assert!(q[2].reason.contains("not a whole number"), "{q:?}");
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

fn real_debits(keys: &KeySet, n: usize) -> Vec<TapRecord> {
    let hsm = SoftwareHsm::new(keys).unwrap();
    let mut sam = SoftwareSam::validator(keys, 1001).unwrap();
    let uid = [4, 2, 2, 2, 2, 2, 2];
    let mut card = Card::personalise(
        &Personalisation::transit(uid, 100_000),
        hsm.card_keys(&uid, 1).unwrap(),
    );
    (0..n)
        .map(|i| {
            let mut reader = EmulatedReader {
                card: &mut card,
                rng: StdRng::seed_from_u64(i as u64),
            };
            let Outcome::Committed { receipt, .. } =
                txn::debit(&mut reader, &mut sam, &mut StdRng::seed_from_u64(7), |_| {
                    Decision::Apply {
                        amount_minor: 150,
                        record: None,
                    }
                })
                .unwrap()
            else {
                panic!()
            };
            TapRecord::accepted(
                &receipt,
                TapMeta {
                    device_id: 1001,
                    device_seq: i as u64 + 1,
                    ..Default::default()
                },
            )
        })
        .collect()
}

#[test]
fn forwarding_is_idempotent_and_clearing_books_each_tap_once() {
    let ks = keys();
    let gw = ks.for_role(Role::Gateway, 0).unwrap();
    let key = |d: u32| gw.device_key(d).ok();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("gw"), 64 << 20).unwrap();
    let device_key = gw.device_key(1001).unwrap();
    let msgs: Vec<Message> = real_debits(&ks, 25)
        .iter()
        .map(|t| msg("tapgate/v1/metro/taps/1001", t.sign("metro", &device_key).to_vec()))
        .collect();
    assert_eq!(store.ingest(&msgs, key, 0).unwrap().stored, 25);

    // Clearing in process (the charging core), behind a sink that fails once.
    let ledger = charging::ledger::Ledger::open(&dir.path().join("ledger"), 64 << 20).unwrap();
    {
        let mut t = ledger.write().unwrap();
        ledger
            .post(
                &mut t,
                0,
                "issuer:float",
                &charging::ledger::card_account(&[4, 2, 2, 2, 2, 2, 2]),
                100_000,
                "issue",
            )
            .unwrap();
        ledger
            .put_card(
                &mut t,
                &[4, 2, 2, 2, 2, 2, 2],
                &charging::ledger::CardShadow {
                    booked_balance_minor: Some(100_000),
                    ..Default::default()
                },
            )
            .unwrap();
        t.commit().unwrap();
    }
    let hsm: Mutex<Box<dyn Hsm + Send>> = Mutex::new(Box::new(SoftwareHsm::new(&ks).unwrap()));
    let mut ids = Vec::new();
    let mut fail_next = true;
    let mut sink = |batch: &serde_json::Value| -> Result<(), String> {
        ids.push(batch["batch_id"].as_str().unwrap().to_string());
        let b: charging::clearing::ClearingBatch =
            serde_json::from_value(batch.clone()).map_err(|e| e.to_string())?;
        let out =
            charging::clearing::clear_batch(&ledger, &hsm, b, 0).map_err(|e| e.to_string())?;
        assert!(out.anomalies.is_empty(), "{out:?}");
        if fail_next {
            fail_next = false;
            return Err("acknowledgement lost".into()); // clearing booked it; we did not hear
        }
        Ok(())
    };
    assert!(forward_once(&store, "gw1", "metro", key, 10, &mut sink).is_err());
    assert_eq!(
        store.outbox_len().unwrap(),
        25,
        "nothing trimmed without an answer"
    );
    while forward_once(&store, "gw1", "metro", key, 10, &mut sink).unwrap() > 0 {}
    assert_eq!(ids[0], ids[1], "the retry is the same batch");
    assert_eq!(store.outbox_len().unwrap(), 0);
    let r = ledger.read().unwrap();
    assert_eq!(
        ledger.balance(&r, "operator:metro").unwrap(),
        25 * 150,
        "each tap booked once"
    );
}
