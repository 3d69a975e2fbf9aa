//! A pending change is completed only by the proof of that change: a genuine transaction MAC
//! of another transaction at the same counter (a validator's fare) completes nothing.

use charging::funding::{FundingSource, SandboxProcessor};
use charging::ledger::{Completion, IntentKind, IntentState, LedgerError, LoadIntent};
use charging::load::{LoadConfig, LoadService};
use purse::apdu::ins;
use purse::keys::{KeyKind, KeySet};
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;
use tapgate_testkit::fixtures::{transit_card, value_tx};

const T0: u64 = 1_700_000_000_000;

#[test]
fn a_fare_at_a_loads_counter_does_not_complete_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(31));
    let (ledger, _pg) = tapgate_testkit::charging::test_ledger(&dir.path().join("ledger"));
    let processor = Arc::new(SandboxProcessor::open(&dir.path().join("processor")).unwrap());
    let svc = LoadService::new(
        ledger,
        Box::new(SoftwareHsm::new(&keys).unwrap()),
        vec![processor as Arc<dyn FundingSource>],
        LoadConfig::default(),
    );
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let uid = [0x04, 0x1D, 1, 2, 3, 4, 5];
    svc.register_card(&uid, 1_000, T0).unwrap();
    let mut card = transit_card(&hsm, uid, 1_000);

    // A load of 5,000 pending at counter 0; the card's next change is a 100 fare instead.
    let mut intent = LoadIntent {
        uid: hex::encode_upper(uid),
        tmc_before: 0,
        attempt: 0,
        balance_before_minor: 1_000,
        amount_minor: 5_000,
        key_version: 1,
        funding_source: "sandbox".into(),
        funding_auth: "auth-1".into(),
        instrument: String::new(),
        idempotency_key: "k".into(),
        requested_by: "alice".into(),
        state: IntentState::Authorised,
        created_ms: T0,
        settled_ms: None,
        kind: IntentKind::Load,
        reverses_tmc: None,
        reversed_at_tmc: None,
        payment_id: None,
    };
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
