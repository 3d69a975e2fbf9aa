//! Property tests: random sequences of debits, loads, limited credits and aborts, with tears at
//! random points (card pulled before an APDU, response lost after it, power lost after any NVM
//! write), keep value conserved, the counter strictly increasing by one per committed change,
//! balances within limits, and every torn card in exactly its old or its new state.

mod common;

use common::{Rig, Tear, TearingReader};
use proptest::prelude::*;
use purse::apdu::{self, ins};
use purse::card::{Card, CardState};
use purse::keys::KeyKind;
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::Hsm;
use purse::sm::CommMode;
use purse::txn::{self, Decision, EmulatedReader, Transport};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[derive(Clone, Copy, Debug)]
enum Op {
    Debit(i32),
    Load(i32),
    LimitedCredit(i32),
    AbortedDebit(i32),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..3_000i32).prop_map(Op::Debit),
        2 => (1..20_000i32).prop_map(Op::Load),
        1 => (1..3_000i32).prop_map(Op::LimitedCredit),
        1 => (1..3_000i32).prop_map(Op::AbortedDebit),
    ]
}

fn tear_strategy() -> impl Strategy<Value = Tear> {
    prop_oneof![
        3 => Just(Tear::None),
        1 => (1..12usize).prop_map(Tear::PullBefore),
        1 => (1..12usize).prop_map(Tear::LoseAnswer),
        1 => (1..=purse::card::COMMIT_WRITES).prop_map(Tear::Power),
    ]
}

fn expected_new(pre: &CardState, op: Op) -> Option<(TxKind, i32, i32)> {
    let (kind, amount, after) = match op {
        Op::Debit(a) => (TxKind::Debit, a, pre.balance_minor - a),
        Op::Load(a) => (TxKind::Credit, a, pre.balance_minor + a),
        Op::LimitedCredit(a) => (TxKind::LimitedCredit, a, pre.balance_minor + a),
        Op::AbortedDebit(_) => return None,
    };
    Some((kind, amount, after))
}

fn run_op(rig: &mut Rig, card: &mut Card, op: Op, tear: Tear) {
    if let Tear::Power(k) = tear {
        card.tear_after_writes(Some(k));
    }
    let mut rng = StdRng::seed_from_u64(11);
    let mut t = TearingReader {
        inner: EmulatedReader {
            card,
            rng: StdRng::seed_from_u64(12),
        },
        tear,
        sent: 0,
    };
    let apply = |a| {
        move |_: &txn::CardSnapshot| Decision::Apply {
            amount_minor: a,
            record: Some(vec![1; 32]),
        }
    };
    let _ = match op {
        Op::Debit(a) => txn::debit(&mut t, &mut rig.sam, &mut rng, apply(a)).map(|_| ()),
        Op::Load(a) => txn::load_online(&mut t, &mut rig.hsm, &mut rng, apply(a)).map(|_| ()),
        Op::LimitedCredit(a) => txn::run(
            &mut t,
            &mut rig.sam,
            KeyKind::Debit,
            ins::LIMITED_CREDIT,
            &mut rng,
            apply(a),
        )
        .map(|_| ()),
        Op::AbortedDebit(a) => (|| {
            let (mut ch, _) = txn::open_session(&mut t, &mut rig.sam, KeyKind::Debit, &mut rng)?;
            let body = purse::sam::Authenticator::wrap_value(&mut rig.sam, &mut ch, ins::DEBIT, a)?;
            let r = t.transmit(&apdu::wrap(ins::DEBIT, &body))?;
            let (d, _) = apdu::parse_response(&r).unwrap();
            if ch.open_response(d, CommMode::Mac).is_err() {
                return Ok(());
            }
            let body = ch
                .wrap_command(ins::ABORT_TRANSACTION, &[], &[], CommMode::Mac)
                .unwrap();
            let r = t.transmit(&apdu::wrap(ins::ABORT_TRANSACTION, &body))?;
            let (d, _) = apdu::parse_response(&r).unwrap();
            let _ = ch.open_response(d, CommMode::Mac);
            let body = ch
                .wrap_command(ins::COMMIT_TRANSACTION, &[], &[0x01], CommMode::Mac)
                .unwrap();
            t.transmit(&apdu::wrap(ins::COMMIT_TRANSACTION, &body))?;
            Ok::<(), txn::TxError>(())
        })(),
    };
    card.tear_after_writes(None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn value_is_conserved_under_random_tears(
        initial in 0..50_000i32,
        ops in prop::collection::vec((op_strategy(), tear_strategy()), 1..24),
    ) {
        let mut rig = Rig::new(42);
        let mut card = rig.card(0x42, initial);
        let uid = card.state().uid;
        let (mut loads, mut debits, mut limited) = (0i64, 0i64, 0i64);
        for (op, tear) in ops {
            let pre = card.state().clone();
            run_op(&mut rig, &mut card, op, tear);
            if card.is_torn() {
                let nvm = card.nvm().clone();
                card = Card::power_on(nvm, rig.hsm.card_keys(&uid, 1).unwrap());
            }
            card.remove_from_field();
            let post = card.state().clone();
            // Exactly the old or the new state, settled from the counter.
            if post.tmc == pre.tmc {
                prop_assert_eq!(&post, &pre, "counter unchanged but state moved");
                continue;
            }
            prop_assert_eq!(post.tmc, pre.tmc + 1, "counter moved by more than one");
            let (kind, amount, after) = expected_new(&pre, op)
                .ok_or_else(|| TestCaseError::fail("an aborted transaction committed"))?;
            prop_assert_eq!(post.balance_minor, after);
            prop_assert!(post.balance_minor >= post.lower_limit_minor && post.balance_minor <= post.upper_limit_minor);
            // The card's transaction MAC for the change verifies in the HSM.
            let r = CommitReceipt::for_tests(uid, post.tmc, post.tmv, kind, amount, after);
            prop_assert!(rig.hsm.verify_tmac(&r).is_ok());
            match kind {
                TxKind::Debit => debits += amount as i64,
                TxKind::Credit => loads += amount as i64,
                TxKind::LimitedCredit => limited += amount as i64,
                TxKind::RecordOnly => {}
            }
        }
        prop_assert_eq!(card.state().balance_minor as i64, initial as i64 + loads + limited - debits);
        prop_assert!(card.nvm().validate().is_ok());
        prop_assert!(card.nvm().journal.is_none());
    }
}

/// Every single tear point of one debit, enumerated: power after write 1 keeps the old
/// state, after writes 2..=6 the new one (the commit flag is set at write 2).
#[test]
fn power_loss_after_each_commit_write_settles_old_or_new() {
    for k in 1..=purse::card::COMMIT_WRITES {
        let mut rig = Rig::new(7);
        let mut card = rig.card(7, 1_000);
        let uid = card.state().uid;
        run_op(&mut rig, &mut card, Op::Debit(100), Tear::Power(k));
        assert!(card.is_torn(), "write {k}");
        let card = Card::power_on(card.nvm().clone(), rig.hsm.card_keys(&uid, 1).unwrap());
        let s = card.state();
        if k == 1 {
            assert_eq!((s.balance_minor, s.tmc), (1_000, 0), "write {k}");
        } else {
            assert_eq!(
                (s.balance_minor, s.tmc, s.records.len()),
                (900, 1, 1),
                "write {k}"
            );
        }
    }
}

/// The validator's view of a tear: it records the pending debit before sending it, loses the
/// card at every possible APDU, and at the card's next contact settles it from the counter —
/// committed (with a receipt whose TMV verifies in the HSM) or not, never twice, never lost.
#[test]
fn pending_debit_is_settled_exactly_once_at_next_contact() {
    use purse::txn::{settle, PendingChange, Settlement};
    for lose_at in 1..=11usize {
        for lose_answer in [false, true] {
            let mut rig = Rig::new(3);
            let mut card = rig.card(3, 1_000);
            let mut pending = None;
            let tear = if lose_answer {
                Tear::LoseAnswer(lose_at)
            } else {
                Tear::PullBefore(lose_at)
            };
            let result = {
                let mut t = TearingReader {
                    inner: EmulatedReader {
                        card: &mut card,
                        rng: StdRng::seed_from_u64(1),
                    },
                    tear,
                    sent: 0,
                };
                txn::debit(&mut t, &mut rig.sam, &mut StdRng::seed_from_u64(2), |s| {
                    pending = Some(PendingChange::new(s, TxKind::Debit, 250));
                    Decision::Apply {
                        amount_minor: 250,
                        record: Some(vec![7; 32]),
                    }
                })
            };
            if result.is_ok() {
                continue; // the dialogue finished before the tear point
            }
            let Some(pending) = pending else { continue }; // lost before the decision
                                                           // Next contact: a read-only session.
            let mut reader = EmulatedReader {
                card: &mut card,
                rng: StdRng::seed_from_u64(9),
            };
            let (_, snap) = txn::open_session(
                &mut reader,
                &mut rig.sam,
                KeyKind::Debit,
                &mut StdRng::seed_from_u64(4),
            )
            .unwrap();
            match settle(&pending, &snap).unwrap() {
                Settlement::Committed(r) => {
                    assert_eq!((snap.balance_minor(), snap.tmc()), (750, 1), "{tear:?}");
                    assert!(rig.hsm.verify_claim(r.claim()).is_ok(), "{tear:?}");
                }
                Settlement::NotCommitted => {
                    assert_eq!((snap.balance_minor(), snap.tmc()), (1_000, 0), "{tear:?}")
                }
                Settlement::MovedOn => panic!("no other transaction happened"),
            }
        }
    }
}
