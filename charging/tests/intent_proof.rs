//! A pending change is completed only by the proof of that change: a genuine transaction MAC
//! of another transaction at the same counter (a validator's fare) completes nothing.

use charging::ledger::{Completion, IntentState, LedgerError};
use charging::load::LoadConfig;
use purse::apdu::ins;
use purse::keys::{KeyKind, KeySet};
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::charging::{authorised_load, load_service};
use tapgate_testkit::fixtures::{transit_card, value_tx};

const T0: u64 = 1_700_000_000_000;

#[test]
fn a_fare_at_a_loads_counter_does_not_complete_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(31));
    let (_pg, svc, _) = load_service(dir.path(), &keys, LoadConfig::default());
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let uid = [0x04, 0x1D, 1, 2, 3, 4, 5];
    svc.register_card(&uid, 1_000, T0).unwrap();
    let mut card = transit_card(&hsm, uid, 1_000);

    // A load of 5,000 pending at counter 0; the card's next change is a 100 fare instead.
    let mut intent = authorised_load(uid, 0, 1_000, 5_000, T0);
    svc.ledger()
        .transact(move |t| t.insert_intent(&uid, &mut intent))
        .unwrap();
    let fare = value_tx(&mut sam, &mut card, KeyKind::Debit, ins::DEBIT, 100).unwrap();
    assert_eq!(fare.tmc(), 1);
    let proof = hsm.verify_tmac(&fare).unwrap();

    let refused = svc
        .ledger()
        .transact(move |t| t.complete_intent(Completion::Proved(&proof), T0));
    assert!(
        matches!(&refused, Err(LedgerError::ProofNotIntent { tmc: 0, .. })),
        "{refused:?}"
    );
    let r = svc.ledger().read().unwrap();
    assert_eq!(
        r.balance(&format!("card:{}", hex::encode_upper(uid)))
            .unwrap(),
        1_000
    );
    assert_eq!(
        r.intent(&uid, 0).unwrap().unwrap().state,
        IntentState::Authorised
    );
}
