//! Cards clearing has not seen: a genuine card (its transaction MAC verifies) that taps before
//! the back office registered it is learned from its first proved state — no negative shadow
//! purse, and a late registration leaves reconciliation balanced, in whatever order its taps
//! arrive. And a card clearing blocked as a clone is reported by reconciliation.

use charging::clearing::{clear_batch, BatchOutcome, ClearingBatch, ClearingTap};
use charging::ledger::card_account;
use charging::load::{LoadConfig, LoadService};
use charging::reconcile::{reconcile, Cause};
use purse::apdu::ins;
use purse::card::{Card, Personalisation};
use purse::keys::{KeyKind, KeySet};
use purse::receipt::CommitReceipt;
use purse::sam::{SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::charging::{authorised_load, load_service};
use tapgate_testkit::fixtures::{clearing_tap, transit_card, value_tx};

const T0: u64 = 1_700_000_000_000;

fn debit(sam: &mut SoftwareSam, card: &mut Card, amount: i32) -> CommitReceipt {
    value_tx(sam, card, KeyKind::Debit, ins::DEBIT, amount).unwrap()
}

struct Rig {
    svc: LoadService,
    hsm: SoftwareHsm,
    sam: SoftwareSam,
    _dir: tempfile::TempDir,
    /// The ledger's PostgreSQL cluster with TAPGATE_TEST_LEDGER=postgres (stopped last).
    _pg: Option<tapgate_testkit::postgres::TestDb>,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(21));
    let (pg, svc, _) = load_service(dir.path(), &keys, LoadConfig::default());
    Rig {
        svc,
        hsm: SoftwareHsm::new(&keys).unwrap(),
        sam: SoftwareSam::validator(&keys, 1001).unwrap(),
        _dir: dir,
        _pg: pg,
    }
}

fn clear(rig: &Rig, id: &str, taps: Vec<ClearingTap>, now: u64) -> BatchOutcome {
    clear_batch(
        rig.svc.ledger(),
        rig.svc.hsm(),
        ClearingBatch {
            batch_id: id.into(),
            taps,
        },
        now,
    )
    .unwrap()
}

fn card_balance_in_ledger(rig: &Rig, uid: &[u8; 7]) -> i64 {
    let l = rig.svc.ledger();
    let r = l.read().unwrap();
    r.balance(&card_account(uid)).unwrap()
}

fn revenue(rig: &Rig) -> i64 {
    let l = rig.svc.ledger();
    let r = l.read().unwrap();
    r.balance("operator:metro").unwrap()
}

#[test]
fn a_card_tapping_before_registration_is_learned_and_a_late_registration_keeps_it_balanced() {
    let mut rig = rig();
    let uid = [0x04, 0xC0, 0x0D, 0, 0, 0, 7];
    let mut card = transit_card(&rig.hsm, uid, 5_000);
    let d1 = debit(&mut rig.sam, &mut card, 100);
    let d2 = debit(&mut rig.sam, &mut card, 200);
    let out = clear(
        &rig,
        "b1",
        vec![clearing_tap(&d1, 1), clearing_tap(&d2, 2)],
        T0,
    );
    assert_eq!(out.cleared, 2, "{out:?}");
    assert!(out.anomalies.is_empty(), "no negative shadow: {out:?}");
    assert_eq!(out.cards_learned, 1, "{out:?}");
    assert_eq!(card_balance_in_ledger(&rig, &uid), 4_700);
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!((rep.cards, rep.balanced), (1, 1), "{rep:?}");

    // The operator registers it afterwards: nothing changes, it stays balanced.
    rig.svc.register_card(&uid, 5_000, T0 + 1).unwrap();
    assert_eq!(card_balance_in_ledger(&rig, &uid), 4_700);
    let d3 = debit(&mut rig.sam, &mut card, 50);
    let out = clear(&rig, "b2", vec![clearing_tap(&d3, 3)], T0 + 2);
    assert!(out.anomalies.is_empty(), "{out:?}");
    assert_eq!(out.cards_learned, 0);
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!((rep.cards, rep.balanced), (1, 1), "{rep:?}");
    assert_eq!(
        card_balance_in_ledger(&rig, &uid),
        i64::from(card.state().balance_minor)
    );
    assert_eq!(revenue(&rig), 350);
}

#[test]
fn taps_of_an_unregistered_card_arriving_out_of_order_still_balance() {
    let mut rig = rig();
    let uid = [0x04, 0xC0, 0x0D, 0, 0, 0, 8];
    let mut card = transit_card(&rig.hsm, uid, 5_000);
    let d: Vec<CommitReceipt> = [100, 200, 50, 400]
        .into_iter()
        .map(|a| debit(&mut rig.sam, &mut card, a))
        .collect();
    // The third and fourth taps come first (another gateway was faster); learned at counter 3.
    let out = clear(
        &rig,
        "late-first",
        vec![clearing_tap(&d[2], 3), clearing_tap(&d[3], 4)],
        T0,
    );
    assert!(out.anomalies.is_empty(), "{out:?}");
    assert_eq!(out.cards_learned, 1);
    assert_eq!(card_balance_in_ledger(&rig, &uid), 4_250);
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert!(
        matches!(
            rep.differences.first().map(|d| &d.cause),
            Some(Cause::CounterGap {
                from_tmc: 1,
                to_tmc: 2
            })
        ),
        "counters 1 and 2 are not cleared yet: {rep:?}"
    );
    // The first two arrive: the card's balance does not move again (their value left the card
    // before the state it was learned from), the operator gets its fares.
    let out = clear(
        &rig,
        "early-last",
        vec![clearing_tap(&d[0], 1), clearing_tap(&d[1], 2)],
        T0 + 1,
    );
    assert!(out.anomalies.is_empty(), "{out:?}");
    assert_eq!(
        card_balance_in_ledger(&rig, &uid),
        i64::from(card.state().balance_minor)
    );
    assert_eq!(revenue(&rig), 750);
    rig.svc.register_card(&uid, 5_000, T0 + 2).unwrap();
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!((rep.cards, rep.balanced), (1, 1), "{rep:?}");
    // The issuer's float paid out exactly the card's personalised value.
    let l = rig.svc.ledger();
    let r = l.read().unwrap();
    assert_eq!(r.balance("issuer:float").unwrap(), -5_000);
}

#[test]
fn a_card_blocked_as_a_clone_is_reported_by_reconciliation() {
    let mut rig = rig();
    let uid = [0x04, 0xC0, 0x0D, 0, 0, 0, 9];
    rig.svc.register_card(&uid, 5_000, T0).unwrap();
    let keys = rig.hsm.card_keys(&uid, 1).unwrap();
    let mut card = Card::personalise(&Personalisation::transit(uid, 5_000), keys);
    // A copy of the card's memory, used elsewhere at the same counter.
    let mut copy = Card::power_on(card.nvm().clone(), rig.hsm.card_keys(&uid, 1).unwrap());
    let genuine = debit(&mut rig.sam, &mut card, 100);
    let cloned = debit(&mut rig.sam, &mut copy, 300);
    assert_eq!(genuine.tmc(), cloned.tmc());
    let out = clear(&rig, "c1", vec![clearing_tap(&genuine, 1)], T0);
    assert!(out.anomalies.is_empty(), "{out:?}");
    let out = clear(&rig, "c2", vec![clearing_tap(&cloned, 2)], T0 + 1);
    assert_eq!(out.cards_blocked, 1, "{out:?}");
    assert_eq!(out.anomalies[0].kind, "clone");
    // The ledger and the genuine card agree, but the card is a clone: reconciliation says so.
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!(rep.balanced, 0, "{rep:?}");
    let d = &rep.differences[0];
    assert_eq!(d.card_uid, hex::encode_upper(uid));
    assert!(
        matches!(&d.cause, Cause::Clone { tmc: Some(1), .. }),
        "{rep:?}"
    );
    let json = serde_json::to_value(d).unwrap();
    assert_eq!(json["cause"], "clone", "{json}");
}

#[test]
fn clearing_counts_batches_taps_and_anomalies_by_kind_once() {
    let mut rig = rig();
    let stats = charging::clearing::ClearingStats::default();
    let uid = [0x04, 0xC0, 0x0D, 0, 0, 0, 10];
    let keys = rig.hsm.card_keys(&uid, 1).unwrap();
    let mut card = Card::personalise(&Personalisation::transit(uid, 5_000), keys);
    let mut copy = Card::power_on(card.nvm().clone(), rig.hsm.card_keys(&uid, 1).unwrap());
    let d1 = debit(&mut rig.sam, &mut card, 100);
    let d2 = debit(&mut rig.sam, &mut card, 200);
    let fake1 = debit(&mut rig.sam, &mut copy, 300);
    let batch = |id: &str, taps: Vec<ClearingTap>| ClearingBatch {
        batch_id: id.into(),
        taps,
    };
    let count = |b| {
        charging::clearing::clear_batch_counted(rig.svc.ledger(), rig.svc.hsm(), b, T0, &stats)
            .unwrap()
    };
    count(batch(
        "b1",
        vec![clearing_tap(&d1, 1), clearing_tap(&d2, 2)],
    ));
    // The gateway lost the answer and sends the same batch again: not counted twice.
    count(batch(
        "b1",
        vec![clearing_tap(&d1, 1), clearing_tap(&d2, 2)],
    ));
    count(batch("b2", vec![clearing_tap(&fake1, 3)]));
    let text = stats.render();
    for line in [
        "tapgate_charging_clearing_batches_total 2",
        "tapgate_charging_clearing_taps_booked_total 2",
        "tapgate_charging_clearing_cards_learned_total 1",
        "tapgate_charging_clearing_cards_blocked_total 1",
        "tapgate_charging_clearing_anomalies_total{kind=\"clone\"} 1",
        "tapgate_charging_clearing_anomalies_total{kind=\"forged_tmac\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}:\n{text}");
    }
}

/// The franchise terminal of the learned-card tests, with a ceiling granted by the back office.
fn franchise(rig: &Rig) -> (charging::franchise::FranchiseConfig, SoftwareSam) {
    let cfg = charging::franchise::FranchiseConfig {
        name: "corner-shop".into(),
        device_id: 7001,
        max_exposure_minor: 10_000,
    };
    let grant = charging::franchise::grant_ceiling(rig.svc.ledger(), rig.svc.hsm(), &cfg, 10_000)
        .unwrap()
        .expect("a ceiling");
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(21));
    let mut sam = SoftwareSam::franchise(&keys, cfg.device_id, 0).unwrap();
    sam.apply_ceiling_grant(&grant).unwrap();
    (cfg, sam)
}

fn credit(sam: &mut SoftwareSam, card: &mut Card, amount: i32) -> CommitReceipt {
    value_tx(sam, card, KeyKind::Credit, ins::CREDIT, amount).unwrap()
}

fn balance_of(rig: &Rig, account: &str) -> i64 {
    rig.svc.ledger().read().unwrap().balance(account).unwrap()
}

#[test]
fn a_franchise_load_inside_a_learned_balance_is_not_credited_twice() {
    let mut rig = rig();
    let (cfg, mut shop) = franchise(&rig);
    let uid = [0x04, 0xC0, 0x0D, 0, 0, 0, 11];
    let mut card = transit_card(&rig.hsm, uid, 5_000);
    // Loaded offline at the shop (counter 1), then a fare (counter 2); the tap is cleared first.
    let load = credit(&mut shop, &mut card, 2_000);
    assert_eq!(load.tmc(), 1);
    let fare = debit(&mut rig.sam, &mut card, 100);
    let out = clear(&rig, "t1", vec![clearing_tap(&fare, 1)], T0);
    assert_eq!(out.cards_learned, 1, "{out:?}");
    assert_eq!(card_balance_in_ledger(&rig, &uid), 6_900);

    // The shop reports its load: the learned balance already held it.
    let reported = charging::franchise::ReportedLoad {
        card_uid: hex::encode_upper(uid),
        tmc: load.tmc(),
        amount_minor: load.amount_minor(),
        balance_after_minor: load.balance_after_minor(),
        tmv: hex::encode_upper(load.tmv()),
        key_version: load.key_version(),
    };
    let out = charging::franchise::report_loads(
        rig.svc.ledger(),
        rig.svc.hsm(),
        &cfg,
        std::slice::from_ref(&reported),
        T0 + 1,
    )
    .unwrap();
    assert_eq!((out.accepted, out.rejected.len()), (1, 0), "{out:?}");
    assert_eq!(
        card_balance_in_ledger(&rig, &uid),
        i64::from(card.state().balance_minor),
        "the card is credited once"
    );
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!((rep.cards, rep.balanced), (1, 1), "{rep:?}");
    // The shop owes its load; the float paid out only the personalised value.
    assert_eq!(balance_of(&rig, "franchise:corner-shop"), -2_000);
    assert_eq!(balance_of(&rig, "issuer:float"), -5_000);
    assert_eq!(revenue(&rig), 100);
    // The operator registers it afterwards with its real personalised value: nothing moves.
    rig.svc.register_card(&uid, 5_000, T0 + 2).unwrap();
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!((rep.cards, rep.balanced), (1, 1), "{rep:?}");
}

#[test]
fn an_online_load_below_the_learned_counter_completed_late_is_not_credited_twice() {
    use charging::ledger::Completion;
    use purse::sam::Hsm;
    let mut rig = rig();
    let (_, mut shop) = franchise(&rig);
    let uid = [0x04, 0xC0, 0x0D, 0, 0, 0, 12];
    let mut card = transit_card(&rig.hsm, uid, 5_000);
    // A load of 2,000 pending at counter 0 that the card applied; its answer was lost.
    let mut intent = authorised_load(uid, 0, 5_000, 2_000, T0);
    rig.svc
        .ledger()
        .transact(move |t| t.insert_intent(&uid, &mut intent))
        .unwrap();
    let load = credit(&mut shop, &mut card, 2_000);
    let fare = debit(&mut rig.sam, &mut card, 100);
    let out = clear(&rig, "t1", vec![clearing_tap(&fare, 1)], T0);
    assert_eq!(out.cards_learned, 1, "{out:?}");

    // The load's proof arrives after the card was learned from the state that holds it.
    let proof = rig.hsm.verify_tmac(&load).unwrap();
    rig.svc
        .ledger()
        .transact(move |t| t.complete_intent(Completion::Proved(&proof), T0 + 1))
        .unwrap()
        .expect("completed now");
    assert_eq!(
        card_balance_in_ledger(&rig, &uid),
        i64::from(card.state().balance_minor),
        "the card is credited once"
    );
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!((rep.cards, rep.balanced), (1, 1), "{rep:?}");
    assert_eq!(balance_of(&rig, "funding:sandbox"), -2_000);
    assert_eq!(balance_of(&rig, "issuer:float"), -5_000);
}

#[test]
fn registering_a_learned_card_with_another_personalised_value_is_a_conflict() {
    let mut rig = rig();
    let uid = [0x04, 0xC0, 0x0D, 0, 0, 0, 13];
    let mut card = transit_card(&rig.hsm, uid, 5_000);
    let fare = debit(&mut rig.sam, &mut card, 100);
    let out = clear(&rig, "t1", vec![clearing_tap(&fare, 1)], T0);
    assert_eq!(out.cards_learned, 1, "{out:?}");

    let refused = rig.svc.register_card(&uid, 7_000, T0 + 1);
    let Err(charging::load::LoadError::RegistrationConflict(why)) = &refused else {
        panic!("{refused:?}");
    };
    assert!(why.contains("5000") && why.contains("7000"), "{why}");
    assert!(why.contains(&hex::encode_upper(uid)), "{why}");
    let l = rig.svc.ledger();
    let (anomalies, _) = l.read().unwrap().anomalies(0, 100).unwrap();
    assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    assert_eq!(anomalies[0].1.kind, "registration_mismatch");
    assert_eq!(anomalies[0].1.card_uid, hex::encode_upper(uid));
    assert_eq!(card_balance_in_ledger(&rig, &uid), 4_900);

    // The value the card proved: an idempotent success, nothing recorded.
    rig.svc.register_card(&uid, 5_000, T0 + 2).unwrap();
    rig.svc.register_card(&uid, 5_000, T0 + 3).unwrap();
    assert_eq!(l.read().unwrap().anomalies(0, 100).unwrap().0.len(), 1);
    assert_eq!(card_balance_in_ledger(&rig, &uid), 4_900);
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!((rep.cards, rep.balanced), (1, 1), "{rep:?}");
}

#[test]
fn only_clearings_own_clone_block_makes_a_clone_in_reconciliation() {
    let rig = rig();
    let uid = [0x04, 0xC0, 0x0D, 0, 0, 0, 14];
    rig.svc.register_card(&uid, 5_000, T0).unwrap();
    // An operator's block whose free text happens to start like clearing's reason.
    rig.svc
        .ledger()
        .transact(move |t| {
            t.set_blocked(&uid, true, "clone suspected by the conductor, checking", T0)
        })
        .unwrap();
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!((rep.cards, rep.balanced), (1, 1), "{rep:?}");
    // Clearing's own reason is the shared constant.
    let uid2 = [0x04, 0xC0, 0x0D, 0, 0, 0, 15];
    rig.svc.register_card(&uid2, 5_000, T0).unwrap();
    rig.svc
        .ledger()
        .transact(move |t| t.set_blocked(&uid2, true, charging::ledger::CLONE_BLOCK_REASON, T0))
        .unwrap();
    let rep = reconcile(rig.svc.ledger()).unwrap();
    assert_eq!(rep.balanced, 1, "{rep:?}");
    assert!(
        matches!(rep.differences[0].cause, Cause::Clone { tmc: None }),
        "{rep:?}"
    );
}

/// A tap's marker above its card's last counter cannot happen (clearing writes it together
/// with the shadow observing the counter), but were one there, the tap is still booked once: on
/// PostgreSQL the marker, taken as absent without being read, fails the batch's first attempt
/// on its unique key and the attempt after reads it (a duplicate); LMDB reads it at once.
#[test]
fn a_marker_above_the_cards_counter_still_keeps_the_tap_from_being_booked_twice() {
    let mut rig = rig();
    let uid = [0x04, 0xC0, 0x0E, 0, 0, 0, 9];
    rig.svc.register_card(&uid, 5_000, T0).unwrap();
    let keys = rig.hsm.card_keys(&uid, 1).unwrap();
    let mut card = Card::personalise(&Personalisation::transit(uid, 5_000), keys);
    let r = debit(&mut rig.sam, &mut card, 100);
    let tap = clearing_tap(&r, 1);
    // The marker alone, as if the tap were booked, the card's shadow left below its counter.
    let key = format!("tap:{}:{}", hex::encode_upper(uid), r.tmc());
    let tmv = serde_json::Value::String(tap.tmv.to_uppercase());
    rig.svc
        .ledger()
        .transact(move |t| t.put_idempotent(&key, &tmv))
        .unwrap();
    let retries_before = charging::ledger::PgLedger::retries();
    let out = clear(&rig, "m1", vec![tap], T0);
    assert_eq!((out.cleared, out.duplicates), (0, 1), "{out:?}");
    assert_eq!(card_balance_in_ledger(&rig, &uid), 5_000);
    assert_eq!(revenue(&rig), 0);
    if rig._pg.is_some() {
        // The first attempt took the marker as absent and its insert was refused.
        assert!(charging::ledger::PgLedger::retries() > retries_before);
    }
}
