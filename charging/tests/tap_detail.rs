//! A cleared tap keeps the stop, route and fare flags its gateway sent (on LMDB, and on
//! PostgreSQL with `TAPGATE_TEST_LEDGER=postgres`); a tap whose flags set an undefined bit is
//! refused with a reason; a tap sent without them (an older gateway) clears as before.

use charging::clearing::{clear_batch, tap_detail, ClearingBatch, ClearingTap, TapDetail};
use charging::load::LoadConfig;
use purse::apdu::ins;
use purse::keys::{KeyKind, KeySet};
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::tap::TapFlags;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::charging::load_service;
use tapgate_testkit::fixtures::{clearing_tap, transit_card, value_tx};

const T0: u64 = 1_700_000_000_000;

#[test]
fn a_cleared_tap_keeps_its_stop_and_flags_and_undefined_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(18));
    let (_pg, svc, _) = load_service(dir.path(), &keys, LoadConfig::default());
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let uid = [0x04, 0x18, 1, 2, 3, 4, 5];
    svc.register_card(&uid, 1_000, T0).unwrap();
    let mut card = transit_card(&hsm, uid, 1_000);
    let mut debit = || value_tx(&mut sam, &mut card, KeyKind::Debit, ins::DEBIT, 100).unwrap();
    let (r1, r2, r3) = (debit(), debit(), debit());
    let placed = ClearingTap {
        stop_id: Some(4_000_000_000),
        route_id: Some(7),
        fare_flags: Some(TapFlags::CAPPED | TapFlags::PENALTY),
        ..clearing_tap(&r1, 1)
    };
    let old = clearing_tap(&r2, 2);
    let hostile = ClearingTap {
        fare_flags: Some(0x80),
        ..clearing_tap(&r3, 3)
    };
    let out = clear_batch(
        svc.ledger(),
        svc.hsm(),
        ClearingBatch {
            batch_id: "gw-1-3".into(),
            taps: vec![placed.clone(), old, hostile],
        },
        T0,
    )
    .unwrap();
    assert_eq!(out.cleared, 2, "{out:?}");
    assert_eq!(out.anomalies.len(), 1, "{out:?}");
    assert_eq!(out.anomalies[0].kind, "malformed");
    assert_eq!(out.anomalies[0].tmc, r3.tmc());
    assert!(out.anomalies[0].detail.contains("fare_flags"), "{out:?}");

    let l = svc.ledger();
    let r = l.read().unwrap();
    let d = tap_detail(&*r, &uid, r1.tmc()).unwrap().unwrap();
    assert_eq!(
        d,
        TapDetail {
            stop_id: Some(4_000_000_000),
            route_id: Some(7),
            flags: Some(TapFlags::new(false, true, true)),
        }
    );
    assert_eq!(
        tap_detail(&*r, &uid, r2.tmc()).unwrap(),
        Some(TapDetail::default())
    );
    assert_eq!(tap_detail(&*r, &uid, r3.tmc()).unwrap(), None);
    drop(r);

    // The same tap resent (a gateway retry under a new batch id) is a duplicate, not a clone.
    let again = clear_batch(
        svc.ledger(),
        svc.hsm(),
        ClearingBatch {
            batch_id: "gw-1-1".into(),
            taps: vec![placed],
        },
        T0 + 1,
    )
    .unwrap();
    assert_eq!((again.duplicates, again.cards_blocked), (1, 0), "{again:?}");
    assert!(again.anomalies.is_empty(), "{again:?}");
}
