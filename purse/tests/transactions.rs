//! Whole transactions on emulated cards, and the attacks the card and HSM must refuse.

mod common;

use common::{Flaky, Rig};
use purse::apdu::{self, ins, Status};
use purse::card::{Card, FILE_VALUE};
use purse::keys::KeyKind;
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::{Authenticator, Hsm, SamError, SoftwareSam};
use purse::sm::{Channel, CommMode};
use purse::txn::{self, Decision, EmulatedReader, Outcome, Transport, TxError};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::fixtures::{assert_boundary, value_tx};

/// A debit session the rig's validator SAM opens on `card` (the SAM drawing from `rng`): the
/// reader holding the card, and the session's channel.
fn debit_session<'c>(
    rig: &mut Rig,
    card: &'c mut Card,
    rng: &mut StdRng,
) -> (EmulatedReader<'c, StdRng>, Channel) {
    let mut reader = EmulatedReader {
        card,
        rng: StdRng::seed_from_u64(1),
    };
    let (ch, _snapshot) =
        txn::open_session(&mut reader, &mut rig.sam, KeyKind::Debit, rng).unwrap();
    (reader, ch)
}

fn receipt(o: Outcome) -> CommitReceipt {
    match o {
        Outcome::Committed { receipt, .. } => receipt,
        Outcome::Refused { .. } => panic!("expected a commit"),
    }
}

#[test]
fn debit_then_load_moves_exact_value_and_one_counter_each() {
    let mut rig = Rig::new(1);
    let mut card = rig.card(1, 10_000);
    let r = receipt(rig.debit(&mut card, 1_250).unwrap());
    assert_eq!(
        (r.kind(), r.amount_minor(), r.balance_after_minor(), r.tmc()),
        (TxKind::Debit, 1_250, 8_750, 1)
    );
    assert_eq!(card.state().balance_minor, 8_750);
    assert_eq!(card.state().records.len(), 1);
    // The HSM accepts the card's transaction MAC on the debit (clearing).
    rig.hsm.verify_tmac(&r).unwrap();

    match rig.load(&mut card, 5_000).unwrap() {
        txn::LoadOutcome::Loaded { proof, snapshot } => {
            assert_eq!(snapshot.balance_minor(), 8_750);
            assert_eq!(proof.receipt().tmc(), 2);
            assert_eq!(proof.receipt().balance_after_minor(), 13_750);
            assert_eq!(proof.receipt().kind(), TxKind::Credit);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(card.state().balance_minor, 13_750);
    assert_eq!(card.state().tmc, 2);
}

#[test]
fn insufficient_value_is_a_boundary_error_and_changes_nothing() {
    let mut rig = Rig::new(2);
    let mut card = rig.card(2, 100);
    let before = card.state().clone();
    match rig.debit(&mut card, 101) {
        Err(TxError::Card {
            status: Status::BoundaryError,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(card.state(), &before);
}

#[test]
fn refusal_decision_leaves_card_untouched() {
    let mut rig = Rig::new(3);
    let mut card = rig.card(3, 500);
    let before = card.state().clone();
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(1),
    };
    let out = txn::debit(&mut reader, &mut rig.sam, &mut rig.rng, |s| {
        assert_eq!(s.balance_minor(), 500);
        Decision::Refuse
    })
    .unwrap();
    assert!(matches!(out, Outcome::Refused { .. }));
    assert_eq!(card.state(), &before);
}

#[test]
fn zero_fare_tap_writes_record_and_consumes_one_counter() {
    let mut rig = Rig::new(4);
    let mut card = rig.card(4, 500);
    let r = receipt(rig.debit(&mut card, 0).unwrap());
    assert_eq!(
        (r.kind(), r.amount_minor(), r.tmc()),
        (TxKind::RecordOnly, 0, 1)
    );
    assert_eq!(card.state().balance_minor, 500);
    rig.hsm.verify_tmac(&r).unwrap();
}

#[test]
fn validator_sam_cannot_authenticate_with_the_credit_key() {
    let mut rig = Rig::new(5);
    let mut card = rig.card(5, 500);
    let err = value_tx(&mut rig.sam, &mut card, KeyKind::Credit, ins::CREDIT, 1_000).unwrap_err();
    assert!(matches!(err, TxError::UnknownKeyVersion(1)), "{err}");
    // And asked directly, the SAM has no credit key to authenticate with.
    let err = rig
        .sam
        .auth_part1(
            KeyKind::Credit,
            1,
            &card.state().uid,
            &[0; 16],
            &mut rig.rng,
        )
        .unwrap_err();
    assert!(matches!(err, SamError::KeyNotHeld { .. }), "{err}");
    assert_eq!(card.state().balance_minor, 500);
}

/// A compromised validator with its debit session forges a Credit frame by hand: the card
/// refuses it (the debit key has no credit right), and LimitedCredit beyond its own last debit.
#[test]
fn compromised_validator_cannot_add_value() {
    let mut rig = Rig::new(6);
    let mut card = rig.card(6, 500);
    let mut rng = StdRng::seed_from_u64(2);
    let (mut reader, mut ch) = debit_session(&mut rig, &mut card, &mut rng);
    // The SAM itself refuses to build a credit...
    assert!(rig.sam.wrap_value(&mut ch, ins::CREDIT, 100).is_err());
    // ...and a hand-built one under the debit session is refused by the card.
    let body = ch
        .wrap_command(
            ins::CREDIT,
            &[FILE_VALUE],
            &100i32.to_le_bytes(),
            CommMode::Full,
        )
        .unwrap();
    let resp = reader.transmit(&apdu::wrap(ins::CREDIT, &body)).unwrap();
    assert_eq!(resp, Status::PermissionDenied.sw().to_vec());

    // LimitedCredit under the debit key with no prior debit: boundary error.
    let lc = |amount: i32, card: &mut Card, rig: &mut Rig| {
        value_tx(
            &mut rig.sam,
            card,
            KeyKind::Debit,
            ins::LIMITED_CREDIT,
            amount,
        )
    };
    assert_boundary(&lc(1, &mut card, &mut rig));
    assert_eq!(card.state().balance_minor, 500);

    // After a debit of 200, LimitedCredit may undo up to 200 and no more, once.
    receipt(rig.debit(&mut card, 200).unwrap());
    assert!(lc(201, &mut card, &mut rig).is_err());
    let r = lc(200, &mut card, &mut rig).unwrap();
    assert_eq!(
        (r.kind(), r.balance_after_minor()),
        (TxKind::LimitedCredit, 500)
    );
    assert!(
        lc(1, &mut card, &mut rig).is_err(),
        "limited credit only once"
    );
    assert_eq!(card.state().balance_minor, 500);
}

#[test]
fn forged_or_altered_transaction_mac_is_refused_by_the_hsm() {
    let mut rig = Rig::new(7);
    let mut card = rig.card(7, 5_000);
    let r = receipt(rig.debit(&mut card, 300).unwrap());
    rig.hsm.verify_tmac(&r).unwrap();
    // A terminal claims a smaller debit, a different balance, counter or card: all refused.
    let uid = r.uid();
    let variants = [
        CommitReceipt::for_tests(uid, r.tmc(), r.tmv(), TxKind::Debit, 30, 4_970),
        CommitReceipt::for_tests(uid, r.tmc(), r.tmv(), TxKind::Debit, 300, 4_800),
        CommitReceipt::for_tests(uid, r.tmc() + 1, r.tmv(), TxKind::Debit, 300, 4_700),
        CommitReceipt::for_tests([9; 7], r.tmc(), r.tmv(), TxKind::Debit, 300, 4_700),
        CommitReceipt::for_tests(uid, r.tmc(), [0; 8], TxKind::Debit, 300, 4_700),
        CommitReceipt::for_tests(uid, r.tmc(), r.tmv(), TxKind::Credit, 300, 4_700),
    ];
    for v in variants {
        assert!(
            matches!(rig.hsm.verify_tmac(&v), Err(SamError::TmacMismatch { .. })),
            "{v:?}"
        );
    }
}

/// Replays every APDU of a completed debit into a fresh session: the card refuses the replayed
/// authentication answer and every MAC'd command, so no value moves.
#[test]
fn replayed_debit_session_is_refused() {
    let mut rig = Rig::new(8);
    let mut card = rig.card(8, 5_000);
    let sent = {
        let mut t = Flaky::new(&mut card, None);
        let mut rng = StdRng::seed_from_u64(4);
        txn::debit(&mut t, &mut rig.sam, &mut rng, |_| Decision::Apply {
            amount_minor: 100,
            record: None,
        })
        .unwrap();
        t.sent
    };
    assert_eq!(card.state().balance_minor, 4_900);
    let mut rng = StdRng::seed_from_u64(77); // the card draws a different RndB
    let mut statuses = vec![];
    for cmd in &sent {
        let resp = card.process(cmd, &mut rng).unwrap();
        statuses.push(apdu::parse_response(&resp).unwrap().1);
    }
    assert_eq!(card.state().balance_minor, 4_900);
    assert_eq!(card.state().tmc, 1);
    assert!(
        statuses.contains(&Status::AuthenticationError),
        "{statuses:?}"
    );
}

/// Reordering: swapping two MAC'd commands within a live session breaks the counter binding.
#[test]
fn reordered_and_altered_frames_end_the_session() {
    let mut rig = Rig::new(9);
    let mut card = rig.card(9, 5_000);
    let mut rng = StdRng::seed_from_u64(2);
    let (mut reader, mut ch) = debit_session(&mut rig, &mut card, &mut rng);
    let first = rig.sam.wrap_value(&mut ch, ins::DEBIT, 100).unwrap();
    // Pretend the first went through on our side only, build the next at counter+1.
    let _ = ch.open_response(&[0u8; 8], CommMode::Mac); // fails, counter unchanged
    let mut altered = first.clone();
    altered[3] ^= 0x01;
    let resp = reader.transmit(&apdu::wrap(ins::DEBIT, &altered)).unwrap();
    assert_eq!(resp, Status::IntegrityError.sw().to_vec());
    // The session is over: even the genuine frame is now refused.
    let resp = reader.transmit(&apdu::wrap(ins::DEBIT, &first)).unwrap();
    assert_eq!(resp, Status::AuthenticationError.sw().to_vec());
    assert_eq!(card.state().balance_minor, 5_000);
}

#[test]
fn franchise_sam_loads_only_under_its_ceiling() {
    let rig = Rig::new(10);
    let mut fsam = SoftwareSam::franchise(&rig.keys, 7001, 1_000).unwrap();
    let mut card = rig.card(10, 0);
    let go = |amount: i32, card: &mut Card, fsam: &mut SoftwareSam| {
        value_tx(fsam, card, KeyKind::Credit, ins::CREDIT, amount)
    };
    go(600, &mut card, &mut fsam).unwrap();
    assert_eq!(fsam.ceiling_minor(), 400);
    let err = go(600, &mut card, &mut fsam).unwrap_err();
    assert!(
        matches!(err, TxError::Sam(SamError::CeilingExceeded { .. })),
        "{err}"
    );
    assert_eq!(card.state().balance_minor, 600);
    // The back office replenishes it online with a grant MAC'd under the SAM's device key.
    let grant = rig.hsm.ceiling_grant(7001, 1, 1_000).unwrap();
    fsam.apply_ceiling_grant(&grant).unwrap();
    assert!(
        fsam.apply_ceiling_grant(&grant).is_err(),
        "a grant applies once"
    );
    let mut forged = rig.hsm.ceiling_grant(7001, 2, 1_000).unwrap();
    forged.amount_minor = 1_000_000;
    assert!(
        fsam.apply_ceiling_grant(&forged).is_err(),
        "an altered grant is refused"
    );
    let other = rig.hsm.ceiling_grant(7002, 3, 1_000).unwrap();
    assert!(
        fsam.apply_ceiling_grant(&other).is_err(),
        "another device's grant is refused"
    );
    assert_eq!(fsam.ceiling_minor(), 1_400);
    go(600, &mut card, &mut fsam).unwrap();
    assert_eq!(card.state().balance_minor, 1_200);
}

#[test]
fn upper_limit_refuses_an_overload() {
    let mut rig = Rig::new(11);
    let mut card = rig.card(11, 499_000);
    let err = rig.load(&mut card, 1_001).unwrap_err();
    assert!(
        matches!(
            err,
            TxError::Card {
                status: Status::BoundaryError,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(card.state().balance_minor, 499_000);
}

#[test]
fn unknown_key_version_is_reported() {
    let mut rig = Rig::new(12);
    let uid = [4, 12, 0, 0, 0, 0, 1];
    let mut p = purse::card::Personalisation::transit(uid, 100);
    p.key_version = 1;
    let mut card = Card::personalise(&p, rig.hsm.card_keys(&uid, 1).unwrap());
    // A SAM cut from a key set whose debit master was rotated to v2 only.
    let mut ks2 = rig.keys.clone();
    assert_eq!(ks2.rotate(KeyKind::Debit, &mut rig.rng), 2);
    ks2.entries
        .retain(|e| !(e.kind == KeyKind::Debit && e.version == 1));
    let mut sam2 = SoftwareSam::validator(&ks2, 5).unwrap();
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(1),
    };
    let err = txn::debit(&mut reader, &mut sam2, &mut rig.rng, |_| Decision::Refuse).unwrap_err();
    assert!(matches!(err, TxError::UnknownKeyVersion(1)), "{err}");
}

#[test]
fn records_are_cyclic_and_read_newest_first() {
    let mut rig = Rig::new(13);
    let mut card = rig.card(13, 100_000);
    for i in 0..11u8 {
        let mut reader = EmulatedReader {
            card: &mut card,
            rng: StdRng::seed_from_u64(1),
        };
        txn::debit(&mut reader, &mut rig.sam, &mut rig.rng, |_| {
            Decision::Apply {
                amount_minor: 10,
                record: Some(vec![i; 32]),
            }
        })
        .unwrap();
    }
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(1),
    };
    let out = txn::debit(&mut reader, &mut rig.sam, &mut rig.rng, |s| {
        assert_eq!(s.records().len(), 7);
        assert_eq!(s.records()[0], [10; 32]);
        assert_eq!(s.records()[6], [4; 32]);
        Decision::Refuse
    })
    .unwrap();
    assert!(matches!(out, Outcome::Refused { .. }));
}

#[test]
fn hsm_does_not_authenticate_with_the_tmac_key() {
    let mut rig = Rig::new(14);
    let err = rig
        .hsm
        .auth_part1(KeyKind::Tmac, 1, &[1; 7], &[0; 16], &mut rig.rng)
        .unwrap_err();
    assert!(matches!(err, SamError::NotAllowed(_)));
}

/// A device grant's MAC covers its tag, then device id, number and amount big-endian: the tag
/// keeps a franchise's ceiling grant from passing as a validator's action grant.
#[test]
fn grant_mac_inputs_are_tagged_and_big_endian() {
    use purse::sam::{ActionGrant, CeilingGrant};
    let c = CeilingGrant::mac_input(0x0102_0304, 5, -2);
    assert_eq!(&c[..4], b"CEIL");
    assert_eq!(c[4..8], [1, 2, 3, 4]);
    assert_eq!(c[8..12], 5u32.to_be_bytes());
    assert_eq!(c[12..], (-2i64).to_be_bytes());
    let a = ActionGrant::mac_input(0x0102_0304, 5, -2);
    assert_eq!(&a[..4], b"ACTC");
    assert_eq!(a[4..], c[4..]);
}
