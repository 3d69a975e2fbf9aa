//! Online loads through the load service with an emulated card on the client side: the
//! client only relays APDUs; exactly-once across funding, network and card under tears.

#[macro_use]
mod common;

use charging::funding::{FundingSource, PointsProgram, SandboxProcessor};
use charging::ledger::{card_account, IntentState};
use charging::load::{LoadConfig, LoadRequest, LoadService, Reply};
use common::HsmKind;
use purse::card::Card;
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;
use tapgate_testkit::charging::{relay_in_process, Tear};
use tapgate_testkit::fixtures::{debit, transit_card};

struct World {
    _dir: tempfile::TempDir,
    svc: LoadService,
    processor: Arc<SandboxProcessor>,
    miles: Arc<PointsProgram>,
    hsm: SoftwareHsm,
    keys: KeySet,
    now_ms: u64,
    /// The ledger's PostgreSQL cluster with TAPGATE_TEST_LEDGER=postgres (stopped last).
    _pg: Option<tapgate_testkit::postgres::TestDb>,
}

fn world(cfg: LoadConfig, kind: HsmKind) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let keys = KeySet::generate(&mut rng);
    let (ledger, pg) = tapgate_testkit::charging::test_ledger(&dir.path().join("ledger"));
    let processor = Arc::new(SandboxProcessor::open(&dir.path().join("processor")).unwrap());
    let miles = Arc::new(
        PointsProgram::new("mileage", ledger.clone(), 2, 1).with_partners(vec!["airline".into()]),
    );
    let svc = LoadService::new(
        ledger,
        common::hsm(kind, &keys),
        vec![processor.clone() as Arc<dyn FundingSource>, miles.clone()],
        cfg,
    );
    // A load is funded only from the caller's own instruments: alice registers her card
    // tokens; the airline links her mileage membership to her account.
    for token in ["tok_visa", "tok_decline"] {
        svc.register_instrument("alice", "card", token, 0).unwrap();
    }
    World {
        _dir: dir,
        svc,
        processor,
        miles,
        hsm: SoftwareHsm::new(&keys).unwrap(),
        keys: keys.clone(),
        now_ms: 1_700_000_000_000,
        _pg: pg,
    }
}

impl World {
    fn card(&self, n: u8, balance: i32) -> Card {
        let uid = [0x04, n, 1, 2, 3, 4, 5];
        self.svc
            .register_card(&uid, i64::from(balance), self.now_ms)
            .unwrap();
        transit_card(&self.hsm, uid, balance)
    }

    fn req(
        &self,
        card: &Card,
        amount: i32,
        source: &str,
        instrument: &str,
        key: &str,
    ) -> LoadRequest {
        LoadRequest {
            uid: card.state().uid,
            amount_minor: amount,
            funding_source: source.into(),
            instrument: instrument.into(),
            idempotency_key: key.into(),
        }
    }

    /// Relays until a final reply (the kit's in-process relay, a step every 5 ms); with `tear`
    /// the card leaves the field at that command and the client vanishes.
    fn relay(&mut self, card: &mut Card, reply: Reply, tear: Option<Tear>) -> Reply {
        relay_in_process(&self.svc, "alice", card, reply, &mut self.now_ms, 5, tear)
            .unwrap()
            .0
    }

    /// Starts alice's load of `amount` from `source`'s `instrument` under `key`.
    fn start(&self, card: &Card, amount: i32, source: &str, instrument: &str, key: &str) -> Reply {
        self.svc
            .start(
                "alice",
                self.req(card, amount, source, instrument, key),
                self.now_ms,
            )
            .unwrap()
    }

    /// Alice's load of `amount` with her card token, relayed to its final reply.
    fn load(&mut self, card: &mut Card, amount: i32, key: &str) -> Reply {
        self.load_from(card, amount, "card", "tok_visa", key)
    }

    /// Alice's load of `amount` from `source`'s `instrument`, relayed to its final reply.
    fn load_from(
        &mut self,
        card: &mut Card,
        amount: i32,
        source: &str,
        instrument: &str,
        key: &str,
    ) -> Reply {
        let r = self.start(card, amount, source, instrument, key);
        self.relay(card, r, None)
    }

    fn shadow(&self, card: &Card) -> i64 {
        let r = self.svc.ledger().read().unwrap();
        r.balance(&card_account(&card.state().uid)).unwrap()
    }
}

/// Asserts that `r` is a refusal for `why`.
fn assert_refused(r: &Reply, why: &str) {
    assert!(
        matches!(r, Reply::Refused { reason, .. } if reason == why),
        "{r:?}"
    );
}

fn a_relayed_load_completes_and_is_posted_and_captured(kind: HsmKind) {
    let mut w = world(LoadConfig::default(), kind);
    let mut card = w.card(1, 1_000);
    let r = w.load(&mut card, 2_500, "k1");
    match r {
        Reply::Completed {
            amount_minor,
            balance_minor,
            tmc,
            ..
        } => {
            assert_eq!((amount_minor, balance_minor, tmc), (2_500, 3_500, 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(card.state().balance_minor, 3_500);
    assert_eq!(
        w.shadow(&card),
        3_500,
        "shadow purse = personalised + loads"
    );
    let r = w.svc.ledger().read().unwrap();
    assert_eq!(r.balance("funding:card").unwrap(), -2_500);
    let intents = r.all_intents().unwrap();
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0].state, IntentState::Completed);
    assert_eq!(
        w.processor
            .authorisation(&intents[0].funding_auth)
            .unwrap()
            .state,
        "captured"
    );
}

fn the_same_idempotency_key_never_loads_twice(kind: HsmKind) {
    let mut w = world(LoadConfig::default(), kind);
    let mut card = w.card(2, 0);
    let first = w.load(&mut card, 1_000, "same");
    let again = w.start(&card, 1_000, "card", "tok_visa", "same");
    assert_eq!(first, again, "a repeated start returns the stored outcome");
    assert_eq!(card.state().balance_minor, 1_000);
    // The same key from another caller is another request (bob pays with his own card).
    w.svc
        .register_instrument("bob", "card", "tok_bob", w.now_ms)
        .unwrap();
    let other = w
        .svc
        .start(
            "bob",
            w.req(&card, 1_000, "card", "tok_bob", "same"),
            w.now_ms,
        )
        .unwrap();
    assert!(matches!(other, Reply::Command { .. }));
}

fn a_retried_step_gets_the_same_command_and_feeds_the_card_once(kind: HsmKind) {
    let mut w = world(LoadConfig::default(), kind);
    let mut card = w.card(3, 0);
    let mut rng = StdRng::seed_from_u64(2);
    let r = w.start(&card, 700, "card", "tok_visa", "r");
    let Reply::Command {
        session_id,
        seq,
        commands,
    } = r
    else {
        panic!()
    };
    let resp: Vec<Vec<u8>> = commands
        .iter()
        .map(|c| card.process(&hex::decode(c).unwrap(), &mut rng).unwrap())
        .collect();
    let a = w
        .svc
        .respond("alice", &session_id, seq, &resp, w.now_ms)
        .unwrap();
    let b = w
        .svc
        .respond("alice", &session_id, seq, &resp, w.now_ms)
        .unwrap();
    assert_eq!(a, b);
    assert!(
        w.svc
            .respond("alice", &session_id, seq + 5, &resp, w.now_ms)
            .is_err(),
        "out of order"
    );
    assert!(
        w.svc
            .respond("mallory", &session_id, seq + 1, &resp, w.now_ms)
            .is_err(),
        "not yours"
    );
    assert!(
        w.svc
            .respond("alice", &session_id, seq + 1, &[], w.now_ms)
            .is_err(),
        "no answers"
    );
    let done = w.relay(&mut card, a, None);
    assert!(matches!(done, Reply::Completed { .. }), "{done:?}");
    assert_eq!(card.state().balance_minor, 700);
}

fn refusals_move_nothing(kind: HsmKind) {
    let mut w = world(
        LoadConfig {
            balance_ceiling_minor: 10_000,
            max_daily_per_card_minor: 6_000,
            ..LoadConfig::default()
        },
        kind,
    );
    let mut card = w.card(4, 9_000);
    // Ceiling.
    let r = w.load(&mut card, 1_001, "c1");
    assert_refused(&r, "balance_ceiling");
    // Declined card.
    let r = w.load_from(&mut card, 500, "card", "tok_decline", "c2");
    assert_refused(&r, "funding_declined");
    // Bad requests.
    assert!(w
        .svc
        .start("alice", w.req(&card, 0, "card", "tok_visa", "c3"), w.now_ms)
        .is_err());
    assert!(w
        .svc
        .start("alice", w.req(&card, 10, "bitcoin", "x", "c4"), w.now_ms)
        .is_err());
    assert!(w
        .svc
        .start("alice", w.req(&card, 10, "card", "tok_visa", ""), w.now_ms)
        .is_err());
    assert_eq!(card.state().balance_minor, 9_000);
    assert_eq!(card.state().tmc, 0);
    // Daily limit.
    let mut card2 = w.card(5, 0);
    assert!(matches!(
        w.load(&mut card2, 5_000, "d1"),
        Reply::Completed { .. }
    ));
    let r = w.load(&mut card2, 1_001, "d2");
    assert_refused(&r, "daily_limit");
    assert_eq!(card2.state().balance_minor, 5_000);
}

fn mileage_funds_a_load_and_only_holds_what_it_converts(kind: HsmKind) {
    let mut w = world(LoadConfig::default(), kind);
    w.miles
        .earn("airline", "alice", "alice", 1_000, "flight:ICN-NRT", 0)
        .unwrap();
    let mut card = w.card(6, 0);
    let r = w.load_from(&mut card, 1_200, "mileage", "alice", "m1");
    assert!(
        matches!(
            r,
            Reply::Completed {
                balance_minor: 1_200,
                ..
            }
        ),
        "{r:?}"
    );
    assert_eq!(w.miles.balance("alice").unwrap(), 400);
    let r = w.load_from(&mut card, 1_000, "mileage", "alice", "m2");
    assert_refused(&r, "funding_declined");
    assert_eq!(w.miles.balance("alice").unwrap(), 400);
}

/// The promise: a load torn at any relay step — the client gone before or after the card got
/// the command — is settled at the card's next load session: completed and captured if the
/// card applied it, voided and released if not. Never paid twice, never lost.
fn a_load_torn_at_any_step_is_settled_exactly_once(kind: HsmKind) {
    let (mut applied, mut voided) = (0, 0);
    for stop in 1..=11usize {
        for deliver in [false, true] {
            let mut w = world(LoadConfig::default(), kind);
            let mut card = w.card(7, 1_000);
            let r = w.start(&card, 3_000, "card", "tok_visa", "t1");
            let tear = Tear {
                at: stop,
                delivered: deliver,
            };
            let torn = w.relay(&mut card, r, Some(tear));
            // Sessions expire; the next contact is a new load.
            w.now_ms += 60_000;
            w.svc.expire_sessions(w.now_ms);
            let next = w.load(&mut card, 500, "t2");
            assert!(
                matches!(next, Reply::Completed { .. }),
                "stop {stop} deliver {deliver}: {next:?} after {torn:?}"
            );
            let first_applied = card.state().balance_minor == 1_000 + 3_000 + 500;
            assert!(
                first_applied || card.state().balance_minor == 1_500,
                "stop {stop}: {}",
                card.state().balance_minor
            );
            if first_applied {
                applied += 1
            } else {
                voided += 1
            }
            // Ledger agrees with the card.
            assert_eq!(
                w.shadow(&card),
                i64::from(card.state().balance_minor),
                "stop {stop} deliver {deliver}"
            );
            let r = w.svc.ledger().read().unwrap();
            let intents = r.all_intents().unwrap();
            assert!(
                intents.iter().all(|i| i.state != IntentState::Authorised),
                "all settled: {intents:?}"
            );
            // Funding: captured exactly for completed intents, voided for the others.
            for i in &intents {
                let a = w.processor.authorisation(&i.funding_auth).unwrap();
                match i.state {
                    IntentState::Completed => assert_eq!(a.state, "captured"),
                    IntentState::Voided => assert_eq!(a.state, "voided"),
                    IntentState::Authorised => unreachable!(),
                }
            }
            let captured: i64 = intents
                .iter()
                .filter(|i| i.state == IntentState::Completed)
                .map(|i| i64::from(i.amount_minor))
                .sum();
            assert_eq!(captured, i64::from(card.state().balance_minor) - 1_000);
        }
    }
    assert!(
        applied >= 1 && voided >= 1,
        "both outcomes exercised: {applied} applied, {voided} voided"
    );
}

fn a_blocked_card_is_refused(kind: HsmKind) {
    let mut w = world(LoadConfig::default(), kind);
    let mut card = w.card(8, 0);
    {
        let l = w.svc.ledger();
        let uid = card.state().uid;
        l.transact(move |t| t.set_blocked(&uid, true, "reported stolen", 0))
            .unwrap();
    }
    let r = w.load(&mut card, 100, "b");
    assert_refused(&r, "card_blocked");
    assert_eq!(card.state().balance_minor, 0);
}

/// The card leaves the field in the middle of the value batch and the client posts the one
/// answer it got. Once [Credit, WriteRecord, Commit] has been handed to the client, the server
/// cannot tell a real tear from a client that hides the commit's answer, so the load stays
/// pending and is settled from the card's counter at its next contact — here voided, since the
/// commit never reached the card.
fn a_partial_batch_is_left_pending_and_settled_from_the_counter(kind: HsmKind) {
    let mut w = world(LoadConfig::default(), kind);
    let mut card = w.card(9, 0);
    let mut rng = StdRng::seed_from_u64(3);
    let mut reply = w.start(&card, 900, "card", "tok_visa", "p1");
    loop {
        let Reply::Command {
            session_id,
            seq,
            commands,
        } = &reply
        else {
            panic!("{reply:?}")
        };
        let is_value_batch = commands.len() == 3
            && hex::decode(&commands[0]).unwrap()[1] == purse::apdu::ins::CREDIT;
        let take = if is_value_batch { 1 } else { commands.len() };
        let answers: Vec<Vec<u8>> = commands[..take]
            .iter()
            .map(|c| card.process(&hex::decode(c).unwrap(), &mut rng).unwrap())
            .collect();
        reply = w
            .svc
            .respond("alice", session_id, *seq, &answers, w.now_ms)
            .unwrap();
        if is_value_batch {
            break;
        }
    }
    card.remove_from_field();
    assert!(matches!(&reply, Reply::Pending { .. }), "{reply:?}");
    assert_eq!(card.state().balance_minor, 0);
    let next = w.load(&mut card, 100, "p2");
    assert!(
        matches!(
            next,
            Reply::Completed {
                balance_minor: 100,
                ..
            }
        ),
        "{next:?}"
    );
    let r = w.svc.ledger().read().unwrap();
    let intents = r.all_intents().unwrap();
    assert_eq!(intents.len(), 2);
    assert_eq!(intents[0].state, IntentState::Voided);
    assert_eq!(
        w.processor
            .authorisation(&intents[0].funding_auth)
            .unwrap()
            .state,
        "voided"
    );
    assert_eq!(w.shadow(&card), 100);
}

/// Reconciliation names the cause of every difference: a pending load, a counter gap (taps not
/// cleared yet), or nothing — the ledger agrees with the card.
fn reconcile_reports_each_difference_with_its_cause(kind: HsmKind) {
    use charging::reconcile::{reconcile, Cause};
    let mut w = world(LoadConfig::default(), kind);
    let mut a = w.card(20, 1_000);
    let mut b = w.card(21, 1_000);
    let mut c = w.card(22, 1_000);
    assert!(matches!(w.load(&mut a, 500, "a1"), Reply::Completed { .. }));
    // b: a load torn after the commit reached the card.
    let r = w.start(&b, 300, "card", "tok_visa", "b1");
    let tear = Tear {
        at: 10,
        delivered: true,
    };
    w.relay(&mut b, r, Some(tear));
    // c: a debit at a validator (not cleared yet), then a load: the load's counter sits above
    // a gap.
    let mut sam = purse::sam::SoftwareSam::validator(&w.keys, 1).unwrap();
    debit(&mut sam, &mut c, 200, 1, 2);
    assert!(matches!(w.load(&mut c, 100, "c1"), Reply::Completed { .. }));

    let report = reconcile(w.svc.ledger()).unwrap();
    assert_eq!(report.cards, 3);
    assert_eq!(report.balanced, 1, "{report:?}");
    let cause = |uid: [u8; 7]| {
        report
            .differences
            .iter()
            .find(|d| d.card_uid == hex::encode_upper(uid))
            .map(|d| d.cause.clone())
    };
    assert_eq!(cause(a.state().uid), None);
    assert_eq!(
        cause(b.state().uid),
        Some(Cause::PendingLoad { at_tmc: vec![0] })
    );
    assert_eq!(
        cause(c.state().uid),
        Some(Cause::CounterGap {
            from_tmc: 1,
            to_tmc: 1
        })
    );
}

both_hsms!(
    a_relayed_load_completes_and_is_posted_and_captured,
    the_same_idempotency_key_never_loads_twice,
    a_retried_step_gets_the_same_command_and_feeds_the_card_once,
    refusals_move_nothing,
    mileage_funds_a_load_and_only_holds_what_it_converts,
    a_load_torn_at_any_step_is_settled_exactly_once,
    a_blocked_card_is_refused,
    a_partial_batch_is_left_pending_and_settled_from_the_counter,
    reconcile_reports_each_difference_with_its_cause,
);
