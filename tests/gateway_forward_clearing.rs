//! The gateway's forwarding against the charging server's clearing core (in process):
//! idempotent batches that clearing books exactly once, even when an answer is lost. (In the
//! root tests: the gateway crate does not depend on the charging server, even for tests.)

use gateway::forward::forward_once;
use gateway::store::{Message, Store};
use purse::keys::{KeySet, Role};
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use purse::tap::{TapFlags, TapMeta, TapRecord};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Mutex;
use tapgate_testkit::fixtures::{debit, transit_card};

fn keys() -> KeySet {
    KeySet::generate(&mut StdRng::seed_from_u64(1))
}

fn msg(topic: &str, payload: Vec<u8>) -> Message {
    Message {
        topic: topic.into(),
        payload,
    }
}

fn real_debits(keys: &KeySet, n: usize) -> Vec<TapRecord> {
    let hsm = SoftwareHsm::new(keys).unwrap();
    let mut sam = SoftwareSam::validator(keys, 1001).unwrap();
    let uid = [4, 2, 2, 2, 2, 2, 2];
    let mut card = transit_card(&hsm, uid, 100_000);
    (0..n)
        .map(|i| {
            let receipt = debit(&mut sam, &mut card, 150, i as u64, 7);
            TapRecord::accepted(
                &receipt,
                TapMeta {
                    device_id: 1001,
                    device_seq: i as u64 + 1,
                    stop_id: 40 + i as u32,
                    route_id: 3,
                    ..Default::default()
                },
            )
            .with_flags(TapFlags::new(i % 2 == 1, i % 5 == 0, false))
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
    let records = real_debits(&ks, 25);
    let msgs: Vec<Message> = records
        .iter()
        .map(|t| {
            msg(
                "tapgate/v1/metro/taps/1001",
                t.sign("metro", &device_key).to_vec(),
            )
        })
        .collect();
    assert_eq!(store.ingest(&msgs, key, 0).unwrap().stored, 25);

    // Clearing in process (the charging core), behind a sink that fails once.
    let ledger = charging::ledger::Ledger::open(&dir.path().join("ledger"), 64 << 20).unwrap();
    let uid = [4, 2, 2, 2, 2, 2, 2];
    ledger
        .transact(move |t| t.issue_card(&uid, 100_000, "issue", 0))
        .unwrap();
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
        r.balance("operator:metro").unwrap(),
        25 * 150,
        "each tap booked once"
    );
    // Each tap's stop, route and fare flags reached the back office through the gateway.
    for t in &records {
        let d = charging::clearing::tap_detail(&*r, &uid, t.tmc()).unwrap();
        let want = charging::clearing::TapDetail {
            stop_id: Some(t.meta().stop_id),
            route_id: Some(3),
            flags: t.flags(),
        };
        assert_eq!(d, Some(want), "counter {}", t.tmc());
    }
    assert!(records
        .iter()
        .any(|t| t.flags().is_some_and(|f| f.transfer())));
}
