//! KM_DEVICE rotated at the gateway (docs/key-rotation.md): taps MAC'd under the current and
//! the previous device-master version are stored and confirmed under the version that
//! verified them; after retirement a tap MAC'd under the old version is quarantined with its
//! own reason and not confirmed (its validator keeps it); one stored before still forwards.

use gateway::forward::forward_once_with_rings;
use gateway::store::{Message, Store};
use purse::crypto::AesKey;
use purse::keys::{KeySet, Role};
use purse::receipt::{CommitReceipt, TxKind};
use purse::tap::{TapMeta, TapRecord};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn tap(device_key: &AesKey, device: u32, seq: u64) -> Vec<u8> {
    let r = CommitReceipt::for_tests(
        [4, 1, 1, 1, 1, 1, seq as u8],
        seq as u32,
        [seq as u8; 8],
        TxKind::Debit,
        100,
        900,
    );
    let meta = TapMeta {
        device_id: device,
        device_seq: seq,
        ..Default::default()
    };
    TapRecord::accepted(&r, meta)
        .sign("metro", device_key)
        .to_vec()
}

fn msg(device: u32, payload: Vec<u8>) -> Message {
    Message {
        topic: format!("tapgate/v1/metro/taps/{device}"),
        payload,
    }
}

/// The device key a validator provisioned from `issuer` now holds.
fn provisioned(issuer: &KeySet, device: u32) -> AesKey {
    let sam = issuer.for_role(Role::ValidatorSam, device).unwrap();
    sam.device_key(device).unwrap()
}

#[test]
fn both_device_master_versions_verify_until_the_old_one_is_retired() {
    let mut issuer = KeySet::generate(&mut StdRng::seed_from_u64(1));
    let old_key = provisioned(&issuer, 11);
    issuer
        .rotate_device_master(&mut StdRng::seed_from_u64(2))
        .unwrap();
    // Validator 12 is re-provisioned at once: it MACs under version 2.
    let new_key = provisioned(&issuer, 12);
    let gw = issuer.for_role(Role::Gateway, 0).unwrap();
    let ring = |d| gw.device_key_ring(d).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let out = store
        .ingest_with_rings(
            &[msg(11, tap(&old_key, 11, 1)), msg(12, tap(&new_key, 12, 1))],
            ring,
            1,
        )
        .unwrap();
    assert_eq!((out.stored, out.quarantined), (2, 0));
    assert_eq!(out.device_key_versions.get(&11), Some(&1));
    assert_eq!(out.device_key_versions.get(&12), Some(&2));
    // The confirmation key for each is the one its validator holds.
    assert_eq!(
        gw.device_key_at(11, 1).unwrap().expose_secret(),
        old_key.expose_secret()
    );

    // Retired: validator 11 was not re-provisioned; its next tap is quarantined, unconfirmed.
    issuer.retire_device_master(1).unwrap();
    let gw = issuer.for_role(Role::Gateway, 0).unwrap();
    let ring = |d| gw.device_key_ring(d).unwrap();
    let out = store
        .ingest_with_rings(
            &[msg(11, tap(&old_key, 11, 2)), msg(12, tap(&new_key, 12, 2))],
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
    let forged = tap(&AesKey::from_bytes([7; 16]), 12, 3);
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
}
