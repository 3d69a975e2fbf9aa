//! The gate during a key rotation (docs/key-rotation.md): a SAM holding both versions accepts
//! cards on either; after retirement a card on the old version is refused with its own reason
//! (`key_version_retired`, journalled, no value taken), while a card on a version the SAM never
//! held is `unknown_key_version`.

use fare_rules::record::TapKind;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::{Sam, SoftwareHsm, SoftwareSam};
use purse::tap::{RefusalReason, TapRecord};
use purse::txn::EmulatedReader;
use rand::rngs::StdRng;
use rand::SeedableRng;
use validator::gate::{Answer, Gate};
use validator::journal::Journal;

mod support;
use support::{metro_gate, T0_MS};

fn gate(sam_keys: &KeySet) -> Gate {
    let sam = SoftwareSam::validator(sam_keys, 1001).unwrap();
    metro_gate(sam, 1001, "Central", TapKind::Entry, 9)
}

fn card(hsm: &SoftwareHsm, n: u8, version: u8) -> Card {
    let uid = [0x04, 0x55, n, 1, 2, 3, 4];
    let mut p = Personalisation::transit(uid, 10_000);
    p.key_version = version;
    Card::personalise(&p, hsm.card_keys(&uid, version).unwrap())
}

fn tap(g: &mut Gate, j: &Journal, card: &mut Card, at_ms: u64) -> Answer {
    let mut reader = EmulatedReader {
        card: &mut *card,
        rng: StdRng::seed_from_u64(at_ms),
    };
    let out = g.tap(&mut reader, j, at_ms, &mut |_| {}).unwrap();
    card.remove_from_field();
    out.answer
}

#[test]
fn retired_and_unknown_versions_are_refused_each_with_its_reason() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut keys = KeySet::generate(&mut rng);
    keys.rotate_card_keys(&mut rng).unwrap();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 100, 1 << 24).unwrap();
    let (mut v1, mut v2) = (card(&hsm, 1, 1), card(&hsm, 2, 2));

    // The window: both accepted.
    let mut g = gate(&keys);
    assert!(matches!(
        tap(&mut g, &j, &mut v1, T0_MS),
        Answer::Accepted { .. }
    ));
    assert!(matches!(
        tap(&mut g, &j, &mut v2, T0_MS),
        Answer::Accepted { .. }
    ));

    // Retired: version 1 refused with its own reason, journalled, no value taken.
    keys.retire(1).unwrap();
    let mut g = gate(&keys);
    let before = v1.state().balance_minor;
    let a = tap(&mut g, &j, &mut v1, T0_MS + 3_600_000);
    let Answer::Refused { reason, seq } = a else {
        panic!("{a:?}");
    };
    assert_eq!(reason, RefusalReason::KeyVersionRetired);
    assert_eq!(v1.state().balance_minor, before);
    assert!(matches!(
        tap(&mut g, &j, &mut v2, T0_MS + 3_600_000),
        Answer::Accepted { .. }
    ));
    let seq = seq.expect("a refusal is journalled");
    let key = g.sam.device_key().clone();
    let (_, wire) = j
        .outbox_after(seq - 1, 1)
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    let t = TapRecord::decode_verified(&wire, "metro", |_| Some(key.clone())).unwrap();
    assert_eq!(t.refusal(), Some(RefusalReason::KeyVersionRetired));
    assert_eq!(t.refusal().unwrap().name(), "key_version_retired");

    // A card on a version newer than anything the SAM holds is not "retired".
    let mut newer = keys.clone();
    newer.rotate_card_keys(&mut rng).unwrap();
    let mut v3 = card(&SoftwareHsm::new(&newer).unwrap(), 3, 3);
    let a = tap(&mut g, &j, &mut v3, T0_MS + 3_600_000);
    assert!(
        matches!(
            a,
            Answer::Refused {
                reason: RefusalReason::UnknownKeyVersion,
                ..
            }
        ),
        "{a:?}"
    );
}
