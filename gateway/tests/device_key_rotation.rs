//! KM_DEVICE rotated at the gateway (docs/key-rotation.md): taps MAC'd under the current and
//! the previous device-master version are stored and confirmed under the version that
//! verified them; after retirement a tap MAC'd under the old version is quarantined with its
//! own reason and not confirmed (its validator keeps it); one stored before still forwards and
//! is still in the TIDES export.

use gateway::forward::forward_once_with_rings;
use gateway::store::{Message, Store};
use purse::keys::{KeySet, Role};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::fixtures::signed_tap;

fn msg(device: u32, payload: Vec<u8>) -> Message {
    Message {
        topic: format!("tapgate/v1/metro/taps/{device}"),
        payload,
    }
}

#[test]
fn both_device_master_versions_verify_until_the_old_one_is_retired() {
    let mut issuer = KeySet::generate(&mut StdRng::seed_from_u64(1));
    // Validator 11 was provisioned before the rotation: it MACs under version 1.
    let old_sam = issuer.for_role(Role::ValidatorSam, 11).unwrap();
    issuer
        .rotate_device_master(&mut StdRng::seed_from_u64(2))
        .unwrap();
    // Validator 12 is re-provisioned at once: it MACs under version 2.
    let new_sam = issuer.for_role(Role::ValidatorSam, 12).unwrap();
    let tap = |sam: &KeySet, d, seq| signed_tap(sam, "metro", d, seq);
    let gw = issuer.for_role(Role::Gateway, 0).unwrap();
    let ring = |d| gw.device_key_ring(d).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let out = store
        .ingest_with_rings(
            &[msg(11, tap(&old_sam, 11, 1)), msg(12, tap(&new_sam, 12, 1))],
            ring,
            1,
        )
        .unwrap();
    assert_eq!((out.stored, out.quarantined), (2, 0));
    assert_eq!(out.device_key_versions.get(&11), Some(&1));
    assert_eq!(out.device_key_versions.get(&12), Some(&2));
    // The devices API shows which version each device MACs under (who is left on the old).
    let version = |d| store.device(d).unwrap().unwrap().device_key_version;
    assert_eq!((version(11), version(12)), (Some(1), Some(2)));
    // The confirmation key for each is the one its validator holds.
    assert_eq!(
        gw.device_key_at(11, 1).unwrap().expose_secret(),
        old_sam.device_key(11).unwrap().expose_secret()
    );

    // Retired: validator 11 was not re-provisioned; its next tap is quarantined, unconfirmed.
    issuer.retire_device_master(1).unwrap();
    let gw = issuer.for_role(Role::Gateway, 0).unwrap();
    let ring = |d| gw.device_key_ring(d).unwrap();
    let out = store
        .ingest_with_rings(
            &[msg(11, tap(&old_sam, 11, 2)), msg(12, tap(&new_sam, 12, 2))],
            ring,
            2,
        )
        .unwrap();
    assert_eq!((out.stored, out.quarantined), (1, 1));
    assert!(!out.confirmations.contains_key(&("metro".to_string(), 11)));
    let q = store.quarantined(10).unwrap();
    assert_eq!(q.len(), 1);
    assert!(
        q[0].reason.contains("retired device-key version 1"),
        "{}",
        q[0].reason
    );
    // A forgery is still told apart from a retired key.
    let forger = KeySet::generate(&mut StdRng::seed_from_u64(7));
    let forged = tap(&forger, 12, 3);
    store
        .ingest_with_rings(&[msg(12, forged)], ring, 3)
        .unwrap();
    let q = store.quarantined(10).unwrap();
    assert!(q[1].reason.contains("does not verify"), "{}", q[1].reason);

    // The taps stored before the retirement still reach clearing (old-key one included).
    let mut batches = Vec::new();
    let n = forward_once_with_rings(&store, "gw", "metro", ring, 100, &mut |b| {
        batches.push(b.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 3);
    assert_eq!(batches[0]["taps"].as_array().unwrap().len(), 3);
    // And to the TIDES export: the old-key tap is a tap (one row per stored tap, 11's included).
    let csv = gateway::report::tides_fare_transactions(
        &store,
        "metro",
        ring,
        0,
        u64::MAX,
        "KRW",
        0,
        &gateway::report::Places::default(),
        100,
    )
    .unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows.iter().any(|r| r.starts_with("11-1,")), "{csv}");
}
