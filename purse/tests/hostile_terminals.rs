//! Attacks by terminals that hold real keys (issue 14, items 5 and 6), refused by the card
//! and the HSM themselves.

mod common;

use common::Rig;
use purse::apdu::{ins, Status};
use purse::keys::KeyKind;
use purse::receipt::{CommitReceipt, TxClaim, TxKind};
use purse::sam::{reader_id_of_device, Authenticator, Hsm, SamError, SoftwareSam};
use purse::txn::{self, TxError};
use tapgate_testkit::fixtures::{assert_boundary, value_tx};

/// Invariant 1: a limited credit undoes only a validator's own fare, never the back office's
/// reversal of a load — even for a terminal holding the debit key.
#[test]
fn a_debit_key_holder_cannot_credit_back_a_reversal() {
    let mut rig = Rig::new(61);
    let mut card = rig.card(61, 0);
    // The cardholder loads 500 online, then the load is reversed (the funding refunded).
    rig.load(&mut card, 500).unwrap();
    let rev = value_tx(&mut rig.hsm, &mut card, KeyKind::Credit, ins::DEBIT, 500).unwrap();
    assert_eq!((rev.kind(), rev.balance_after_minor()), (TxKind::Debit, 0));
    rig.hsm.verify_tmac(&rev).unwrap();
    assert_eq!(
        card.state().limited_credit_minor,
        0,
        "a reversal arms nothing"
    );
    // A (compromised) validator tries to give the reversed 500 back.
    let before = card.state().clone();
    assert_boundary(&value_tx(
        &mut rig.sam,
        &mut card,
        KeyKind::Debit,
        ins::LIMITED_CREDIT,
        500,
    ));
    assert_eq!(card.state(), &before, "value conserved: nothing moved");
}

#[test]
fn a_reversal_disarms_a_fare_allowance_and_a_fare_still_can_be_undone() {
    let mut rig = Rig::new(62);
    let mut card = rig.card(62, 2_000);
    // A fare, undone by the validator: allowed (its own last debit).
    rig.debit(&mut card, 300).unwrap();
    assert_eq!(card.state().limited_credit_minor, 300);
    let lc = value_tx(
        &mut rig.sam,
        &mut card,
        KeyKind::Debit,
        ins::LIMITED_CREDIT,
        300,
    )
    .unwrap();
    assert_eq!(lc.balance_after_minor(), 2_000);
    // A fare, then a reversal: the fare's allowance is gone.
    rig.debit(&mut card, 300).unwrap();
    value_tx(&mut rig.hsm, &mut card, KeyKind::Credit, ins::DEBIT, 100).unwrap();
    let before = card.state().clone();
    assert_boundary(&value_tx(
        &mut rig.sam,
        &mut card,
        KeyKind::Debit,
        ins::LIMITED_CREDIT,
        100,
    ));
    assert_eq!(card.state(), &before);
    // The credit key still cannot run LimitedCredit, nor the debit key Credit.
    for (auth_key, code) in [
        (KeyKind::Credit, ins::LIMITED_CREDIT),
        (KeyKind::Debit, ins::CREDIT),
    ] {
        let r = value_tx(&mut rig.hsm, &mut card, auth_key, code, 1);
        assert!(
            matches!(
                r,
                Err(TxError::Card {
                    status: Status::PermissionDenied,
                    ..
                })
            ),
            "{auth_key:?} {code:#x}: {r:?}"
        );
    }
    assert_eq!(card.state().balance_minor, before.balance_minor);
}

/// Item 5: the card binds the franchise SAM's reader id into its transaction MAC, so a load
/// proves which SAM made it: an online load cannot be claimed as a franchise's, nor one
/// franchise's load as another's.
#[test]
fn a_franchise_load_proves_its_sam_and_an_online_load_proves_none() {
    let mut rig = Rig::new(63);
    let mut shop = SoftwareSam::franchise(&rig.keys, 7001, 10_000).unwrap();
    assert_eq!(shop.reader_id(), Some(reader_id_of_device(7001)));
    assert_eq!(rig.sam.reader_id(), None, "validators commit no reader id");
    let mut card = rig.card(63, 0);

    let franchise_load = value_tx(&mut shop, &mut card, KeyKind::Credit, ins::CREDIT, 700).unwrap();
    assert_eq!(franchise_load.reader_id(), Some(reader_id_of_device(7001)));
    rig.hsm.verify_tmac(&franchise_load).unwrap();
    let claim = |r: &CommitReceipt, reader: Option<[u8; 16]>| TxClaim {
        uid: r.uid(),
        tmc: r.tmc(),
        tmv: r.tmv(),
        kind: r.kind(),
        amount_minor: r.amount_minor(),
        balance_after_minor: r.balance_after_minor(),
        key_version: r.key_version(),
        reader_id: reader,
    };
    rig.hsm
        .verify_claim(&claim(&franchise_load, Some(reader_id_of_device(7001))))
        .unwrap();
    for wrong in [None, Some(reader_id_of_device(7002))] {
        assert!(matches!(
            rig.hsm.verify_claim(&claim(&franchise_load, wrong)),
            Err(SamError::TmacMismatch { .. })
        ));
    }

    let online = match rig.load(&mut card, 500).unwrap() {
        txn::LoadOutcome::Loaded { proof, .. } => proof.receipt().clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(online.reader_id(), None);
    assert!(matches!(
        rig.hsm
            .verify_claim(&claim(&online, Some(reader_id_of_device(7001)))),
        Err(SamError::TmacMismatch { .. })
    ));
    assert_eq!(card.state().balance_minor, 1_200);
}
