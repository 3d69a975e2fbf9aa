//! Reversals: a completed load taken back from the card (a Debit the card proves) and refunded to
//! its funding, once, by the caller who made it or an operator, within the window; a reversal
//! torn at any step is settled from the card's counter like a load, and value is conserved.

use charging::funding::SandboxProcessor;
use charging::ledger::{card_account, IntentKind, IntentState};
use charging::load::{LoadConfig, LoadError, LoadRequest, LoadService, Reply};
use purse::apdu::ins;
use purse::card::Card;
use purse::keys::{KeyKind, KeySet};
use purse::sam::{SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;
use tapgate_testkit::charging::{load_service, relay_in_process, Tear};
use tapgate_testkit::fixtures::{clearing_tap, transit_card, value_tx_with_record};

const T0: u64 = 1_700_000_000_000;

struct World {
    _dir: tempfile::TempDir,
    svc: LoadService,
    processor: Arc<SandboxProcessor>,
    hsm: SoftwareHsm,
    keys: KeySet,
    now: u64,
    /// The ledger's PostgreSQL cluster with TAPGATE_TEST_LEDGER=postgres (stopped last).
    _pg: Option<tapgate_testkit::postgres::TestDb>,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(21));
    let (pg, svc, processor) = load_service(dir.path(), &keys, LoadConfig::default());
    svc.register_instrument("alice", "card", "tok_visa", T0)
        .unwrap();
    World {
        _dir: dir,
        svc,
        processor,
        hsm: SoftwareHsm::new(&keys).unwrap(),
        keys,
        now: T0,
        _pg: pg,
    }
}

impl World {
    fn card(&self, n: u8, balance: i32) -> Card {
        let uid = [0x04, 0x77, n, 2, 3, 4, 5];
        self.svc
            .register_card(&uid, i64::from(balance), self.now)
            .unwrap();
        transit_card(&self.hsm, uid, balance)
    }

    /// Relays until a final reply (the kit's in-process relay, a step every 5 ms); with
    /// `stop_after` the card leaves the field at that command (`deliver_last`: whether that
    /// command reached it first) and the client vanishes.
    fn relay(
        &mut self,
        caller: &str,
        card: &mut Card,
        reply: Reply,
        stop_after: Option<usize>,
        deliver_last: bool,
    ) -> Reply {
        let tear = stop_after.map(|at| Tear {
            at,
            delivered: deliver_last,
        });
        relay_in_process(&self.svc, caller, card, reply, &mut self.now, 5, tear)
            .unwrap()
            .0
    }

    fn load(&mut self, card: &mut Card, amount: i32, key: &str) -> Reply {
        let r = self
            .svc
            .start(
                "alice",
                LoadRequest {
                    uid: card.state().uid,
                    amount_minor: amount,
                    funding_source: "card".into(),
                    instrument: "tok_visa".into(),
                    idempotency_key: key.into(),
                },
                self.now,
            )
            .unwrap();
        self.relay("alice", card, r, None, true)
    }

    fn reverse(
        &mut self,
        caller: &str,
        card: &Card,
        load_tmc: u32,
        key: &str,
    ) -> Result<Reply, LoadError> {
        self.svc.start_reversal(
            caller,
            caller == "ops",
            card.state().uid,
            load_tmc,
            key.into(),
            self.now,
        )
    }

    fn shadow(&self, card: &Card) -> i64 {
        let l = self.svc.ledger();
        let r = l.read().unwrap();
        r.balance(&card_account(&card.state().uid)).unwrap()
    }

    /// What the funding source and the operator hold (negative: paid out to cards).
    fn funding(&self) -> i64 {
        let l = self.svc.ledger();
        let r = l.read().unwrap();
        r.balance("funding:card").unwrap() + r.balance("operator:metro").unwrap()
    }

    fn load_auth(&self, card: &Card, load_tmc: u32) -> String {
        let l = self.svc.ledger();
        let r = l.read().unwrap();
        r.intent(&card.state().uid, load_tmc - 1)
            .unwrap()
            .unwrap()
            .funding_auth
    }

    fn refunded(&self, card: &Card, load_tmc: u32) -> i64 {
        self.processor
            .authorisation(&self.load_auth(card, load_tmc))
            .unwrap()
            .refunded_minor
    }

    /// The card's value equals the ledger's shadow purse, and every minor unit the card
    /// holds came from the issuer's float or a funding source, less what it paid operators.
    fn conserved(&self, card: &Card, personalised: i64) {
        assert_eq!(self.shadow(card), i64::from(card.state().balance_minor));
        assert_eq!(
            i64::from(card.state().balance_minor),
            personalised - self.funding()
        );
    }
}

fn tmc_of(reply: &Reply) -> u32 {
    match reply {
        Reply::Completed { tmc, .. } => *tmc,
        other => panic!("not completed: {other:?}"),
    }
}

#[test]
fn a_completed_load_is_reversed_once_and_refunded() {
    let mut w = world();
    let mut card = w.card(1, 200);
    let done = w.load(&mut card, 1_000, "l1");
    let load_tmc = tmc_of(&done);
    assert_eq!(card.state().balance_minor, 1_200);
    w.conserved(&card, 200);

    // Not the caller's load: as if it did not exist. No such counter either.
    assert!(matches!(
        w.reverse("mallory", &card, load_tmc, "m1"),
        Err(LoadError::NoSuchLoad { .. })
    ));
    assert!(matches!(
        w.reverse("alice", &card, load_tmc + 5, "a0"),
        Err(LoadError::NoSuchLoad { .. })
    ));

    let first = w.reverse("alice", &card, load_tmc, "r1").unwrap();
    let back = w.relay("alice", &mut card, first, None, true);
    let Reply::Completed {
        amount_minor,
        balance_minor,
        tmc,
        ..
    } = back.clone()
    else {
        panic!("{back:?}")
    };
    assert_eq!(
        (amount_minor, balance_minor, tmc),
        (1_000, 200, load_tmc + 1)
    );
    assert_eq!(card.state().balance_minor, 200);
    assert_eq!(
        card.state().tmc,
        load_tmc + 1,
        "one counter for the reversal"
    );
    w.conserved(&card, 200);
    assert_eq!(w.refunded(&card, load_tmc), 1_000);
    {
        let l = w.svc.ledger();
        let r = l.read().unwrap();
        let rev = r.intent(&card.state().uid, load_tmc).unwrap().unwrap();
        assert_eq!(rev.kind, IntentKind::Reversal);
        assert_eq!(rev.state, IntentState::Completed);
        assert_eq!(rev.reverses_tmc, Some(load_tmc));
        let load = r.intent(&card.state().uid, load_tmc - 1).unwrap().unwrap();
        assert_eq!(load.reversed_at_tmc, Some(load_tmc + 1));
    }
    let report = charging::reconcile::reconcile(w.svc.ledger()).unwrap();
    assert_eq!(report.balanced, 1, "{report:?}");

    // The same key again: the same answer, nothing moves. Another key: refused.
    assert_eq!(w.reverse("alice", &card, load_tmc, "r1").unwrap(), back);
    assert!(matches!(
        w.reverse("alice", &card, load_tmc, "r2"),
        Err(LoadError::NotReversible(_))
    ));
    assert!(matches!(
        w.reverse("ops", &card, load_tmc, "r3"),
        Err(LoadError::NotReversible(_))
    ));
    assert_eq!(card.state().balance_minor, 200);
    assert_eq!(w.refunded(&card, load_tmc), 1_000);
}

#[test]
fn a_spent_load_or_an_old_one_is_not_reversed_and_an_operator_may_reverse_any() {
    let mut w = world();
    let mut card = w.card(2, 0);
    let load_tmc = tmc_of(&w.load(&mut card, 500, "l1"));
    // Spend part of it at a validator.
    let _ = validator_debit(&w.keys, &mut card, 120);
    let r = w.reverse("alice", &card, load_tmc, "r1").unwrap();
    let refused = w.relay("alice", &mut card, r, None, true);
    assert!(
        matches!(&refused, Reply::Refused { reason, .. } if reason == "insufficient_value"),
        "{refused:?}"
    );
    assert_eq!(card.state().balance_minor, 380);
    assert_eq!(w.refunded(&card, load_tmc), 0);

    // A second load, reversed by an operator; a third, too old.
    let second = tmc_of(&w.load(&mut card, 700, "l2"));
    let r = w.reverse("ops", &card, second, "o1").unwrap();
    let back = w.relay("ops", &mut card, r, None, true);
    assert!(matches!(back, Reply::Completed { .. }), "{back:?}");
    assert_eq!(card.state().balance_minor, 380);
    assert_eq!(w.refunded(&card, second), 700);
    let third = tmc_of(&w.load(&mut card, 300, "l3"));
    w.now += 8 * 86_400_000;
    assert!(matches!(
        w.reverse("alice", &card, third, "r3"),
        Err(LoadError::NotReversible(_))
    ));
}

#[test]
fn a_reversal_torn_at_any_step_is_settled_exactly_once() {
    let total = reversal_commands();
    assert!(total >= 4);
    let (mut applied_n, mut voided_n) = (0, 0);
    for stop in 1..=total {
        for deliver in [false, true] {
            let mut w = world();
            let mut card = w.card(3, 100);
            let load_tmc = tmc_of(&w.load(&mut card, 400, "l"));
            let r = w.reverse("alice", &card, load_tmc, "r").unwrap();
            let _ = w.relay("alice", &mut card, r, Some(stop), deliver);
            let applied = card.state().balance_minor == 100;
            // The client is gone; the card comes back for another load, which settles first.
            w.now += 60_000;
            w.svc.expire_sessions(w.now);
            let next = w.load(&mut card, 50, "l-next");
            assert!(
                matches!(next, Reply::Completed { .. }),
                "stop {stop} deliver {deliver}: {next:?}"
            );
            w.conserved(&card, 100);
            let refunded = w.refunded(&card, load_tmc);
            let l = w.svc.ledger();
            let r = l.read().unwrap();
            let intents = r.all_intents().unwrap();
            let load = r.intent(&card.state().uid, load_tmc - 1).unwrap().unwrap();
            drop(r);
            assert!(
                intents.iter().all(|i| i.state != IntentState::Authorised),
                "all settled: {intents:?}"
            );
            let reversals: Vec<_> = intents
                .iter()
                .filter(|i| i.kind == IntentKind::Reversal)
                .collect();
            if applied {
                applied_n += 1;
                assert_eq!(refunded, 400, "stop {stop} deliver {deliver}");
                assert_eq!(reversals.len(), 1);
                assert_eq!(reversals[0].state, IntentState::Completed);
                assert_eq!(load.reversed_at_tmc, Some(load_tmc + 1));
            } else {
                voided_n += 1;
                assert_eq!(refunded, 0, "stop {stop} deliver {deliver}");
                assert!(reversals.iter().all(|i| i.state == IntentState::Voided));
                assert_eq!(load.reversed_at_tmc, None, "reversible again");
            }
            let report = charging::reconcile::reconcile(w.svc.ledger()).unwrap();
            assert_eq!(
                report.balanced, 1,
                "stop {stop} deliver {deliver}: {report:?}"
            );
        }
    }
    // Both outcomes of a tear were exercised: the commit reached the card, or it did not.
    assert!(
        applied_n >= 1 && voided_n >= total,
        "{applied_n} applied, {voided_n} voided"
    );
}

/// How many commands a whole reversal sends (the last one is the commit).
fn reversal_commands() -> usize {
    let mut w = world();
    let mut card = w.card(3, 0);
    let load_tmc = tmc_of(&w.load(&mut card, 400, "l"));
    let reply = w.reverse("alice", &card, load_tmc, "r").unwrap();
    // Relayed at one instant: n counts every command the card answered.
    let (reply, n) =
        relay_in_process(&w.svc, "alice", &mut card, reply, &mut w.now, 0, None).unwrap();
    assert!(matches!(reply, Reply::Completed { .. }), "{reply:?}");
    n
}

/// A fare at a validator (debit key, a trip record), as the tap clearing would receive.
fn validator_debit(keys: &KeySet, card: &mut Card, amount: i32) -> charging::clearing::ClearingTap {
    let mut sam = SoftwareSam::validator(keys, 1001).unwrap();
    let trip = Some(vec![1; 32]);
    let r = value_tx_with_record(&mut sam, card, KeyKind::Debit, ins::DEBIT, amount, trip).unwrap();
    clearing_tap(&r, u64::from(r.tmc()))
}

#[test]
fn clearing_settles_a_torn_reversal_from_the_counters_taps_prove() {
    let commit = reversal_commands();
    for deliver_commit in [true, false] {
        let mut w = world();
        let mut card = w.card(4, 1_000);
        let load_tmc = tmc_of(&w.load(&mut card, 600, "l"));
        let r = w.reverse("alice", &card, load_tmc, "r").unwrap();
        // The card is pulled at the commit (delivered or not); the client is gone. The card
        // is next seen at a validator, and clearing gets that tap.
        let _ = w.relay("alice", &mut card, r, Some(commit), deliver_commit);
        let tap = validator_debit(&w.keys, &mut card, 100);
        let out = charging::clearing::clear_batch(
            w.svc.ledger(),
            w.svc.hsm(),
            charging::clearing::ClearingBatch {
                batch_id: "b1".into(),
                taps: vec![tap],
            },
            w.now,
        )
        .unwrap();
        for action in &out.funding {
            w.svc.apply_funding(action);
        }
        assert!(out.anomalies.is_empty(), "{out:?}");
        if deliver_commit {
            // Clearing never infers a reversal from balances (a fare of the same amount would
            // look the same): it waits for the card. Its next session proves it by its record.
            assert_eq!(card.state().balance_minor, 1_000 - 100);
            assert_eq!(out.loads_completed, 0, "{out:?}");
            assert_eq!(w.refunded(&card, load_tmc), 0);
            let next = w.load(&mut card, 10, "next");
            assert!(matches!(next, Reply::Completed { .. }), "{next:?}");
            assert_eq!(w.refunded(&card, load_tmc), 600);
            w.conserved(&card, 1_000);
        } else {
            let refunded = w.refunded(&card, load_tmc);
            assert_eq!(card.state().balance_minor, 1_600 - 100);
            assert_eq!(out.loads_voided, 1, "{out:?}");
            assert_eq!(refunded, 0);
            // Reversible again (the tap took the counter the reversal had reserved).
            let l = w.svc.ledger();
            let r = l.read().unwrap();
            let load = r.intent(&card.state().uid, load_tmc - 1).unwrap().unwrap();
            assert_eq!(load.reversed_at_tmc, None);
            drop(r);
            w.conserved(&card, 1_000);
        }
        let report = charging::reconcile::reconcile(w.svc.ledger()).unwrap();
        assert_eq!(report.balanced, 1, "deliver {deliver_commit}: {report:?}");
    }
}

/// A torn reversal whose Debit never reached the card, then a fare of exactly the reversal's
/// amount at the counter the reversal had reserved: counter, balance and kind of MAC all match
/// the reversal, but the card's records do not hold the reversal's record — it is voided, and
/// nothing is refunded.
#[test]
fn a_fare_of_the_same_amount_is_never_taken_for_a_torn_reversal() {
    let commit = reversal_commands();
    let mut w = world();
    let mut card = w.card(5, 1_000);
    let load_tmc = tmc_of(&w.load(&mut card, 250, "l"));
    let r = w.reverse("alice", &card, load_tmc, "r").unwrap();
    let _ = w.relay("alice", &mut card, r, Some(commit), false);
    assert_eq!(card.state().balance_minor, 1_250);
    // A bus fare of 250 with a trip record, at counter load_tmc + 1.
    let _ = validator_debit(&w.keys, &mut card, 250);
    assert_eq!(card.state().tmc, load_tmc + 1);
    // The card's next online session settles the reversal: not applied.
    w.now += 60_000;
    w.svc.expire_sessions(w.now);
    let next = w.load(&mut card, 10, "next");
    assert!(matches!(next, Reply::Completed { .. }), "{next:?}");
    assert_eq!(w.refunded(&card, load_tmc), 0, "nothing refunded");
    let l = w.svc.ledger();
    let r = l.read().unwrap();
    let reversals: Vec<_> = r
        .all_intents()
        .unwrap()
        .into_iter()
        .filter(|i| i.kind == IntentKind::Reversal)
        .collect();
    assert_eq!(reversals.len(), 1);
    assert_eq!(reversals[0].state, IntentState::Voided);
    let load = r.intent(&card.state().uid, load_tmc - 1).unwrap().unwrap();
    assert_eq!(load.reversed_at_tmc, None, "the load can be reversed again");
}

#[test]
fn a_key_used_for_a_load_does_not_answer_a_reversal() {
    let mut w = world();
    let mut card = w.card(6, 0);
    let load_tmc = tmc_of(&w.load(&mut card, 300, "same-key"));
    // The same key for the reversal: a reversal starts (the load's answer is not replayed).
    let r = w.reverse("alice", &card, load_tmc, "same-key").unwrap();
    assert!(matches!(r, Reply::Command { .. }), "{r:?}");
    let back = w.relay("alice", &mut card, r, None, true);
    assert!(matches!(back, Reply::Completed { .. }), "{back:?}");
    assert_eq!(card.state().balance_minor, 0);
    assert_eq!(w.refunded(&card, load_tmc), 300);
}
