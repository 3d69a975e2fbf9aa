//! Signed downlink at the validator: blocklists and fare tables verify, apply in order,
//! survive a restart, and anything forged, out of order or older changes nothing.

mod support;

use ed25519_dalek::{Signer, SigningKey};
use purse::blocklist::{ListKind, ListUpdate};
use purse::keys::{KeySet, Role};
use purse::sam::SoftwareSam;
use rand::rngs::StdRng;
use rand::SeedableRng;
use validator::daemon::{apply_actions, apply_downlink, restore, Downlink, Metrics};
use validator::gate::Gate;
use validator::journal::Journal;

fn gate(keys: &KeySet) -> Gate {
    support::downlink_gate(SoftwareSam::validator(keys, 7).unwrap(), 7, 1)
}

fn list(key: &SigningKey, kind: ListKind, from: u64, to: u64, uid: u8) -> Vec<u8> {
    ListUpdate {
        kind,
        operator: "metro".into(),
        from_version: from,
        to_version: to,
        entries: vec![([4, 0, 0, 0, 0, 0, uid], true)],
    }
    .sign_with(|m| key.sign(m).to_bytes())
}

fn table(key: &SigningKey, version: u32) -> Vec<u8> {
    let src = include_str!("../../fare-rules/samples/metro-city/rules.toml")
        .replace("version = 1", &format!("version = {version}"));
    let t = fare_rules::source::compile("rules.toml", &src).unwrap();
    fare_rules::signed::encode(&t, |m| key.sign(m).to_bytes()).unwrap()
}

#[test]
fn downlink_applies_in_order_refuses_forgeries_and_survives_a_restart() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(2));
    let back_office = SigningKey::from_bytes(&[1; 32]);
    let forger = SigningKey::from_bytes(&[2; 32]);
    let pk = back_office.verifying_key().to_bytes();
    let d = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
        let mut g = gate(&keys);
        let bl = Downlink::Blocklist;
        assert_eq!(
            apply_downlink(
                &mut g,
                &j,
                &pk,
                bl,
                &list(&back_office, ListKind::Snapshot, 0, 3, 1)
            ),
            Ok(3)
        );
        // A delta that does not start at the version held, and a forged one: refused.
        assert!(apply_downlink(
            &mut g,
            &j,
            &pk,
            bl,
            &list(&back_office, ListKind::Delta, 4, 5, 2)
        )
        .is_err());
        let forged = apply_downlink(
            &mut g,
            &j,
            &pk,
            bl,
            &list(&forger, ListKind::Delta, 3, 4, 2),
        );
        assert!(forged.unwrap_err().contains("blocklist refused"));
        assert_eq!(g.blocklist.version(), 3);
        assert_eq!(
            apply_downlink(
                &mut g,
                &j,
                &pk,
                bl,
                &list(&back_office, ListKind::Delta, 3, 4, 2)
            ),
            Ok(4)
        );
        assert!(g.blocklist.is_blocked(&[4, 0, 0, 0, 0, 0, 2]));

        let ft = Downlink::FareTable;
        assert_eq!(
            apply_downlink(&mut g, &j, &pk, ft, &table(&back_office, 5)),
            Ok(5)
        );
        let older = apply_downlink(&mut g, &j, &pk, ft, &table(&back_office, 4)).unwrap_err();
        assert!(older.contains("version 5 is in force"), "{older}");
        assert!(apply_downlink(&mut g, &j, &pk, ft, &table(&forger, 6))
            .unwrap_err()
            .contains("signature"));
        let mut torn = table(&back_office, 6);
        torn.truncate(torn.len() - 10);
        assert!(apply_downlink(&mut g, &j, &pk, ft, &torn).is_err());
        assert_eq!(g.fare_version(), 5);
        // A newer, genuine table that does not know this gate's stop: refused, the old one stays.
        let hotel = fare_rules::source::compile(
            "hotel.toml",
            &include_str!("../../fare-rules/samples/hotel/rules.toml")
                .replace("version = 1", "version = 9"),
        )
        .unwrap();
        let hotel = fare_rules::signed::encode(&hotel, |m| back_office.sign(m).to_bytes()).unwrap();
        let e = apply_downlink(&mut g, &j, &pk, ft, &hotel).unwrap_err();
        assert!(e.contains("is not in fare table version 9"), "{e}");
        assert_eq!(g.fare_version(), 5);
    }
    // Restart: the journal gives back the same state.
    let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
    let mut g = gate(&keys);
    restore(&mut g, &j, &pk).unwrap();
    assert_eq!(g.blocklist.version(), 4);
    assert!(g.blocklist.is_blocked(&[4, 0, 0, 0, 0, 0, 1]));
    assert!(g.blocklist.is_blocked(&[4, 0, 0, 0, 0, 0, 2]));
    assert_eq!(g.fare_version(), 5);
}

/// The retained snapshot and table come again at every reconnect: a version already held is
/// told apart from a refusal (the daemon logs it at debug, not as a warning), and changes nothing.
#[test]
fn a_version_already_held_is_not_a_refusal() {
    use validator::daemon::{apply_downlink_outcome, DownlinkOutcome};
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(3));
    let back_office = SigningKey::from_bytes(&[1; 32]);
    let pk = back_office.verifying_key().to_bytes();
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
    let mut g = gate(&keys);
    let (bl, ft) = (Downlink::Blocklist, Downlink::FareTable);
    let snapshot = list(&back_office, ListKind::Snapshot, 0, 3, 1);
    assert_eq!(
        apply_downlink_outcome(&mut g, &j, &pk, bl, &snapshot),
        Ok(DownlinkOutcome::Applied(3))
    );
    assert_eq!(
        apply_downlink_outcome(&mut g, &j, &pk, bl, &snapshot),
        Ok(DownlinkOutcome::AlreadyHeld { held: 3, got: 3 })
    );
    assert_eq!(
        apply_downlink_outcome(&mut g, &j, &pk, ft, &table(&back_office, 5)),
        Ok(DownlinkOutcome::Applied(5))
    );
    assert_eq!(
        apply_downlink_outcome(&mut g, &j, &pk, ft, &table(&back_office, 5)),
        Ok(DownlinkOutcome::AlreadyHeld { held: 5, got: 5 })
    );
    // A forgery is still a refusal, whatever version it claims.
    let forger = SigningKey::from_bytes(&[2; 32]);
    assert!(apply_downlink_outcome(
        &mut g,
        &j,
        &pk,
        bl,
        &list(&forger, ListKind::Snapshot, 0, 3, 1)
    )
    .is_err());
    // The old entry point keeps its answer for callers that want one.
    assert!(apply_downlink(&mut g, &j, &pk, bl, &snapshot)
        .unwrap_err()
        .contains("stale blocklist version 3 (holding 3)"));
    assert_eq!(g.blocklist.version(), 3);
    assert_eq!(g.fare_version(), 5);
}

// The list-signing key rotated (docs/key-rotation.md): lists signed by every accepted version
// apply; after the old version is retired a list signed by it is refused with its own reason
// and metric, and what the journal already holds still restores.

fn signer(keys: &KeySet) -> SigningKey {
    SigningKey::from_bytes(keys.signing_seed.as_ref().unwrap())
}

#[test]
fn both_signing_versions_apply_until_the_old_one_is_retired() {
    let mut issuer = KeySet::generate(&mut StdRng::seed_from_u64(2));
    let old = signer(&issuer);
    issuer
        .rotate_signing(&mut StdRng::seed_from_u64(3))
        .unwrap();
    let new = signer(&issuer);
    // The validator's cut carries both public keys (what `keys provision` writes to signing.pub).
    let sam_keys = issuer.for_role(Role::ValidatorSam, 7).unwrap();
    let window = sam_keys.trusted_signing_keys();
    assert_eq!(window.accepted_versions(), vec![2, 1]);
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
    let mut g = gate(&sam_keys);
    let bl = Downlink::Blocklist;
    // A snapshot the back office signed before the rotation, a delta after it.
    let snap = list(&old, ListKind::Snapshot, 0, 3, 3);
    assert_eq!(apply_downlink(&mut g, &j, &window, bl, &snap), Ok(3));
    assert_eq!(
        apply_downlink(
            &mut g,
            &j,
            &window,
            bl,
            &list(&new, ListKind::Delta, 3, 4, 4)
        ),
        Ok(4)
    );
    // A validator not yet re-provisioned (old key only) refuses the new key's list.
    let mut g_old = gate(&sam_keys);
    let j_old = Journal::open(tempfile::tempdir().unwrap().path(), 10, 1 << 24).unwrap();
    let e = apply_downlink(
        &mut g_old,
        &j_old,
        &old.verifying_key().to_bytes(),
        bl,
        &list(&new, ListKind::Snapshot, 0, 4, 4),
    )
    .unwrap_err();
    assert!(e.contains("signature"), "{e}");

    // Retired: a list signed by the old key is refused with its own reason and metric.
    issuer.retire_signing(1).unwrap();
    let after = issuer
        .for_role(Role::ValidatorSam, 7)
        .unwrap()
        .trusted_signing_keys();
    let text = after.render();
    assert!(text.contains(" retired"), "{text}");
    let after = purse::rotation::TrustedKeys::parse(&text).unwrap();
    let metrics = Metrics::new(7);
    let e = apply_downlink(
        &mut g,
        &j,
        &after,
        bl,
        &list(&old, ListKind::Delta, 4, 5, 5),
    )
    .unwrap_err();
    assert!(e.contains("retired signing key version 1"), "{e}");
    metrics.count_downlink_refused(&e);
    let forged = list(&SigningKey::from_bytes(&[9; 32]), ListKind::Delta, 4, 5, 5);
    let e = apply_downlink(&mut g, &j, &after, bl, &forged).unwrap_err();
    assert!(!e.contains("retired"), "{e}");
    metrics.count_downlink_refused(&e);
    let refused = |r: &str| metrics.downlink_refused.with_label_values(&[r]).get();
    assert_eq!((refused("retired_signing_key"), refused("refused")), (1, 1));
    assert_eq!(g.blocklist.version(), 4);
    // The new key's lists go on applying.
    assert_eq!(
        apply_downlink(
            &mut g,
            &j,
            &after,
            bl,
            &list(&new, ListKind::Delta, 4, 5, 5)
        ),
        Ok(5)
    );
    // A restart after the retirement keeps the snapshot the old key signed before it.
    let mut g2 = gate(&sam_keys);
    restore(&mut g2, &j, &after).unwrap();
    assert_eq!(g2.blocklist.version(), 5);
    assert!(g2.blocklist.is_blocked(&[4, 0, 0, 0, 0, 0, 3]));
}

#[test]
fn an_action_list_signed_by_a_retired_key_is_refused() {
    let mut issuer = KeySet::generate(&mut StdRng::seed_from_u64(4));
    let old = signer(&issuer);
    issuer
        .rotate_signing(&mut StdRng::seed_from_u64(5))
        .unwrap();
    let new = signer(&issuer);
    issuer.retire_signing(1).unwrap();
    let keys = issuer.trusted_signing_keys();
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
    let sign = |k: &SigningKey, to: u64| {
        purse::actionlist::ActionUpdate {
            kind: ListKind::Snapshot,
            operator: "metro".into(),
            from_version: 0,
            to_version: to,
            entries: vec![],
        }
        .sign_with(|m| k.sign(m).to_bytes())
    };
    let mut l = purse::actionlist::ActionList::new("metro");
    let e = apply_actions(&mut l, &j, &keys, &sign(&old, 1), 0).unwrap_err();
    assert!(e.contains("retired signing key version 1"), "{e}");
    assert_eq!(l.version(), 0);
    assert!(apply_actions(&mut l, &j, &keys, &sign(&new, 2), 0).is_ok());
    assert_eq!(l.version(), 2);
}
