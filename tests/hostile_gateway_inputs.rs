//! Issue 14, items 2 and 4 (their cryptographic halves): whatever the broker lets through,
//! a validator deletes a tap only on a confirmation MAC'd with its own device key and bound to
//! the sequence numbers; a tap's device MAC binds it to its operator, so a metro device's tap
//! on a hotel's topics is not booked to the hotel.

use gateway::forward::forward_once;
use gateway::store::{Message, Store};
use purse::confirm::encode_with_key;
use purse::keys::{KeySet, Role};
use purse::sam::{Sam, SoftwareHsm, SoftwareSam};
use purse::tap::{TapMeta, TapRecord, TAP_LEN};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::{Arc, Mutex};
use tapgate_testkit::fixtures::{debit, transit_card};
use validator::daemon::{Confirmations, Metrics};
use validator::journal::Journal;

fn issuer() -> KeySet {
    KeySet::generate(&mut StdRng::seed_from_u64(14))
}

/// A validator's journal with `n` taps in its outbox, and its confirmation handler (the
/// daemon's, with the SAM's device key).
fn a_validator(
    keys: &KeySet,
    device: u32,
    n: u64,
    dir: &std::path::Path,
) -> (Arc<Journal>, Confirmations) {
    let sam = SoftwareSam::validator(keys, device).unwrap();
    let journal = Arc::new(Journal::open(dir, 1_000, 1 << 24).unwrap());
    for _ in 0..n {
        journal.append_tap(None, |s| [s as u8; TAP_LEN]).unwrap();
    }
    let c = Confirmations {
        journal: journal.clone(),
        metrics: Arc::new(Metrics::new(device)),
        device_key: sam.device_key().clone(),
        operator: "metro".into(),
        device_id: device,
        log: Mutex::new((None, 0)),
    };
    (journal, c)
}

fn outbox(j: &Journal) -> Vec<u64> {
    j.outbox_after(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|e| e.0)
        .collect()
}

#[test]
fn a_forged_confirmation_deletes_no_tap_from_a_validator() {
    let keys = issuer();
    let gateway = keys.for_role(Role::Gateway, 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (journal, handler) = a_validator(&keys, 1001, 25, dir.path());
    let all: Vec<u64> = (1..=25).collect();
    assert_eq!(outbox(&journal), all);
    let seqs: Vec<u64> = (1..=19).collect();

    // The attack as found: a device's password lets it publish `{"seqs": [...]}` on another
    // device's confirm topic.
    let unsigned = serde_json::json!({ "seqs": seqs }).to_string();
    // A wrong MAC; the attacker's own device key (1002's, which it does hold); the genuine
    // confirmation of 1001's taps 1 and 2 with the seqs stretched to 1..=19; a genuine
    // confirmation for another operator's topics; and for another device.
    let wrong_mac = format!(r#"{{"seqs":{:?},"mac":"0011223344556677"}}"#, seqs);
    let own_key =
        encode_with_key("metro", 1001, &seqs, &gateway.device_key(1002).unwrap()).unwrap();
    let genuine_two =
        encode_with_key("metro", 1001, &[1, 2], &gateway.device_key(1001).unwrap()).unwrap();
    let mac = serde_json::from_str::<serde_json::Value>(&genuine_two).unwrap()["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let stretched = format!(r#"{{"seqs":{:?},"mac":"{mac}"}}"#, seqs);
    let other_operator = encode_with_key(
        "grand-hotel",
        1001,
        &seqs,
        &gateway.device_key(1001).unwrap(),
    )
    .unwrap();
    let other_device =
        encode_with_key("metro", 1002, &seqs, &gateway.device_key(1002).unwrap()).unwrap();
    for forged in [
        &unsigned,
        &wrong_mac,
        &own_key,
        &stretched,
        &other_operator,
        &other_device,
    ] {
        assert_eq!(handler.apply(forged.as_bytes()).unwrap(), None, "{forged}");
        assert_eq!(outbox(&journal), all, "{forged} deleted a tap");
    }
    let refused = handler.metrics.render();
    assert!(
        refused.contains("confirmations_refused_total{reason=\"bad_mac\",device=\"1001\"} 5")
            && refused
                .contains("confirmations_refused_total{reason=\"malformed\",device=\"1001\"} 1"),
        "{refused}"
    );

    // The gateway's genuine confirmation (its key from KM_DEVICE; the validator's from its
    // SAM) deletes exactly its taps; replayed, it deletes nothing more.
    let genuine = encode_with_key(
        "metro",
        1001,
        &[3, 5, 7],
        &gateway.device_key(1001).unwrap(),
    )
    .unwrap();
    assert_eq!(handler.apply(genuine.as_bytes()).unwrap(), Some(3));
    let left: Vec<u64> = all
        .iter()
        .copied()
        .filter(|s| ![3, 5, 7].contains(s))
        .collect();
    assert_eq!(outbox(&journal), left);
    assert_eq!(handler.apply(genuine.as_bytes()).unwrap(), Some(0));
    assert_eq!(outbox(&journal), left);
}

/// A real debit on an emulated card, signed by device 1001's SAM for the metro.
fn metro_tap(keys: &KeySet) -> Vec<u8> {
    let hsm = SoftwareHsm::new(keys).unwrap();
    let mut sam = SoftwareSam::validator(keys, 1001).unwrap();
    let uid = [4, 1, 4, 1, 4, 1, 4];
    let mut card = transit_card(&hsm, uid, 10_000);
    let receipt = debit(&mut sam, &mut card, 250, 3, 4);
    TapRecord::accepted(
        &receipt,
        TapMeta {
            device_id: 1001,
            device_seq: 1,
            ..Default::default()
        },
    )
    .sign_with("metro", |b| sam.device_mac(b))
    .to_vec()
}

#[test]
fn a_metro_devices_tap_on_the_hotels_topic_is_not_booked_to_the_hotel() {
    let keys = issuer();
    let gw = keys.for_role(Role::Gateway, 0).unwrap();
    let key = |d: u32| gw.device_key(d).ok();
    let tap = metro_tap(&keys);
    let dir = tempfile::tempdir().unwrap();

    // The hotel's gateway takes it from the hotel's topic: quarantined, not stored, not
    // confirmed, nothing forwarded to clearing as hotel revenue.
    let hotel = Store::open(&dir.path().join("hotel"), 16 << 20).unwrap();
    let out = hotel
        .ingest(
            &[Message {
                topic: "tapgate/v1/hotel/taps/1001".into(),
                payload: tap.clone(),
            }],
            key,
            0,
        )
        .unwrap();
    assert_eq!((out.stored, out.quarantined), (0, 1));
    assert!(out.confirmations.is_empty());
    let q = hotel.quarantined(10).unwrap();
    assert!(q[0].reason.contains("operator hotel"), "{q:?}");
    let mut batches = Vec::new();
    forward_once(&hotel, "gw-hotel", "hotel", key, 100, &mut |b| {
        batches.push(b.clone());
        Ok(())
    })
    .unwrap();
    assert!(batches.is_empty(), "{batches:?}");

    // The metro's gateway stores and books it.
    let metro = Store::open(&dir.path().join("metro"), 16 << 20).unwrap();
    let out = metro
        .ingest(
            &[Message {
                topic: "tapgate/v1/metro/taps/1001".into(),
                payload: tap,
            }],
            key,
            0,
        )
        .unwrap();
    assert_eq!(out.stored, 1);
    // A gateway that got hold of the metro's stored tap cannot forward it as the hotel's: it
    // no longer verifies under that operator.
    let mut as_hotel = Vec::new();
    forward_once(&metro.clone(), "gw-hotel", "hotel", key, 100, &mut |b| {
        as_hotel.push(b.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(as_hotel[0]["taps"].as_array().unwrap().len(), 0);
}
