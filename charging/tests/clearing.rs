//! Clearing tap batches: every transaction MAC checked in the HSM, every counter booked once,
//! forged taps and clones raised as anomalies, pending loads settled from the counters taps used.

#[macro_use]
mod common;

use common::HsmKind;

use charging::api::Role;
use charging::server::ServerConfig;
use purse::card::Card;
use purse::keys::KeySet;
use purse::receipt::CommitReceipt;
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::fixtures::{token, transit_card};

const GW: &str = "tg_gw";
const HOTEL_GW: &str = "tg_hotel_gw";
const HOLDER: &str = "tg_holder";
const OPS: &str = "tg_ops";

/// The metro's server (the taps below are the metro's) with the bearer tokens named: `gw`,
/// `hotel-gw` (gateways), `holder` (a cardholder), `ops` (an operator).
fn metro(names: &'static [&'static str]) -> impl FnOnce(&mut ServerConfig) {
    move |cfg| {
        cfg.operator = "metro".into();
        cfg.tokens = names
            .iter()
            .map(|&name| {
                let (role, secret) = match name {
                    "gw" => (Role::Gateway, GW),
                    "hotel-gw" => (Role::Gateway, HOTEL_GW),
                    "holder" => (Role::Cardholder, HOLDER),
                    "ops" => (Role::Operator, OPS),
                    other => panic!("no token {other}"),
                };
                token(name, role, secret)
            })
            .collect();
    }
}

/// A transit card of 10.00 the operator issues on the server at `b` (201), and the card.
fn issued_card(b: &str, hsm: &SoftwareHsm, uid: [u8; 7]) -> Card {
    let (code, out) = common::post(
        &format!("{b}/v1/cards"),
        OPS,
        serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": 1_000}),
    );
    assert_eq!(code, 201, "{out}");
    transit_card(hsm, uid, 1_000)
}

/// The holder's load of 7.00 (from a card token registered first) relayed over HTTP until the
/// server hands out the value batch (Credit first); with `applied` the card gets that batch,
/// otherwise the client vanishes with it. Either way the answers never reach the server and
/// the card leaves the field.
fn load_lost_at_the_credit(b: &str, card: &mut Card, applied: bool) {
    let uid = card.state().uid;
    common::register_instrument(b, HOLDER, "card", "tok_visa");
    let (_, mut reply) = common::post_with_key(
        &format!("{b}/v1/loads"),
        HOLDER,
        "k",
        serde_json::json!({"card_uid": hex::encode_upper(uid), "amount_minor": 700, "funding": {"source": "card", "instrument": "tok_visa"}}),
    );
    let mut rng = StdRng::seed_from_u64(3);
    loop {
        let commands: Vec<Vec<u8>> = reply["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| hex::decode(c.as_str().unwrap()).unwrap())
            .collect();
        let credit = commands[0][1] == purse::apdu::ins::CREDIT;
        if credit && !applied {
            break;
        }
        let answers: Vec<String> = commands
            .iter()
            .map(|c| hex::encode_upper(card.process(c, &mut rng).unwrap()))
            .collect();
        if credit {
            break;
        }
        let id = reply["session_id"].as_str().unwrap().to_string();
        reply = common::post(
            &format!("{b}/v1/loads/{id}/steps"),
            HOLDER,
            serde_json::json!({"seq": reply["seq"], "responses": answers}),
        )
        .1;
    }
    card.remove_from_field();
}

fn debit(sam: &mut SoftwareSam, card: &mut Card, amount: i32) -> CommitReceipt {
    let mut reader = EmulatedReader {
        card,
        rng: StdRng::seed_from_u64(1),
    };
    match txn::debit(&mut reader, sam, &mut StdRng::seed_from_u64(2), |_| {
        Decision::Apply {
            amount_minor: amount,
            record: Some(vec![1; 32]),
        }
    })
    .unwrap()
    {
        Outcome::Committed { receipt, .. } => receipt,
        Outcome::Refused { .. } => panic!("refused"),
    }
}

/// Posts the batch `id` of `taps` to the clearing of the server at `b` as `token`.
fn clear(b: &str, token: &str, id: &str, taps: Vec<serde_json::Value>) -> (u16, serde_json::Value) {
    common::post(
        &format!("{b}/v1/clearing/batches"),
        token,
        serde_json::json!({"batch_id": id, "taps": taps}),
    )
}

fn tap_json(r: &CommitReceipt, seq: u64) -> serde_json::Value {
    serde_json::json!({
        "device_id": 1001, "device_seq": seq, "card_uid": hex::encode_upper(r.uid()), "tmc": r.tmc(),
        "kind": if r.amount_minor() == 0 { "record_only" } else { "debit" }, "amount_minor": r.amount_minor(),
        "balance_after_minor": r.balance_after_minor(), "tmv": hex::encode_upper(r.tmv()), "key_version": r.key_version(),
        "operator": "metro",
    })
}

fn batches_clear_once_forgeries_and_clones_are_anomalies(kind: HsmKind) {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(1));
    let srv = common::start_with(kind, &keys, metro(&["gw", "ops"]));
    let b = srv.base.clone();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let uid = [4, 1, 2, 3, 4, 5, 6];
    let mut card = issued_card(&b, &hsm, uid);
    let r1 = debit(&mut sam, &mut card, 150);
    let r2 = debit(&mut sam, &mut card, 0); // a free transfer tap
    let r3 = debit(&mut sam, &mut card, 200);

    // A forged tap: a compromised validator claims a debit the card never made.
    let mut forged = tap_json(&r3, 9);
    forged["amount_minor"] = 5.into();
    let taps = vec![tap_json(&r1, 1), tap_json(&r2, 2), tap_json(&r3, 3), forged];
    let (code, out) = clear(&b, GW, "gw1-000001", taps.clone());
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["cleared"], 3);
    assert_eq!(out["anomalies"].as_array().unwrap().len(), 1);
    assert_eq!(out["anomalies"][0]["kind"], "forged_tmac");
    // The same batch again: the stored answer, nothing booked twice.
    let (_, again) = clear(&b, GW, "gw1-000001", taps);
    assert_eq!(again, out);
    // The same id with other taps (a gateway whose store was reset reuses ids): refused
    // loudly, never answered with the old outcome (its taps would be dropped unbooked).
    let (code, conflict) = clear(&b, GW, "gw1-000001", vec![tap_json(&r1, 1)]);
    assert_eq!(code, 409, "{conflict}");
    assert!(
        conflict["detail"]
            .as_str()
            .unwrap()
            .contains("answered for other taps"),
        "{conflict}"
    );
    // The same taps in another batch (the gateway lost its acknowledgement): duplicates.
    let (_, dup) = clear(&b, GW, "gw1-000002", vec![tap_json(&r1, 1)]);
    assert_eq!(
        (dup["cleared"].as_u64(), dup["duplicates"].as_u64()),
        (Some(0), Some(1))
    );

    // The ledger agrees with the card; reconciliation balances.
    let l = srv.state.loads.ledger();
    {
        let r = l.read().unwrap();
        assert_eq!(
            r.balance(&charging::ledger::card_account(&uid)).unwrap(),
            i64::from(card.state().balance_minor)
        );
        assert_eq!(r.balance("operator:metro").unwrap(), 350);
    }
    let report = charging::reconcile::reconcile(l).unwrap();
    assert_eq!(report.balanced, 1, "{report:?}");

    // A clone: a second card image with the same keys spends counter 4 differently.
    let mut clone = Card::power_on(card.nvm().clone(), hsm.card_keys(&uid, 1).unwrap());
    let real4 = debit(&mut sam, &mut card, 100);
    let fake4 = debit(&mut sam, &mut clone, 300);
    assert_eq!(real4.tmc(), fake4.tmc());
    let (_, out) = clear(
        &b,
        GW,
        "gw1-000003",
        vec![tap_json(&real4, 4), tap_json(&fake4, 5)],
    );
    assert_eq!(out["cleared"], 1);
    assert_eq!(out["cards_blocked"], 1);
    assert_eq!(out["anomalies"][0]["kind"], "clone");
    let r = l.read().unwrap();
    assert!(r.card(&uid).unwrap().blocked, "the cloned card is blocked");
    // Only gateways clear.
    let (code, _) = clear(&b, OPS, "x", vec![]);
    assert_eq!(code, 403);
}

/// The HSM failing (here: the PKCS#11 token's login lost) is no verdict on the taps: the batch
/// fails with a 500 and books nothing, no tap is called forged, and the same batch resent once
/// the token answers again clears normally.
#[test]
fn an_hsm_failure_fails_the_batch_and_the_resent_batch_clears() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(9));
    let (token, hw) = tapgate_testkit::softhsm::hsm_for(&keys).unwrap_or_else(|e| panic!("{e}"));
    let srv = common::start_with_hsm(Box::new(hw), metro(&["gw", "ops"]));
    let b = srv.base.clone();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let uid = [4, 9, 9, 9, 9, 9, 9];
    let mut card = issued_card(&b, &hsm, uid);
    let r1 = debit(&mut sam, &mut card, 150);
    let taps = vec![tap_json(&r1, 1)];

    tapgate_pkcs11::TokenSession::open(&token.config)
        .unwrap()
        .session
        .logout()
        .unwrap();
    let (code, out) = clear(&b, GW, "gw9-000001", taps.clone());
    assert_eq!(code, 500, "{out}");
    assert_eq!(out["error"], "internal", "{out}");
    let l = srv.state.loads.ledger();
    {
        let r = l.read().unwrap();
        assert_eq!(r.balance("operator:metro").unwrap(), 0);
    }

    let (code, out) = clear(&b, GW, "gw9-000001", taps);
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["cleared"], 1);
    assert_eq!(out["anomalies"].as_array().unwrap().len(), 0, "{out}");
    let r = l.read().unwrap();
    assert_eq!(r.balance("operator:metro").unwrap(), 150);
}

/// A load torn before its credit reached the card, and the card then used at a validator: the
/// cleared tap shows the counter was a debit, so the pending load is voided and its funding
/// released — without the card ever coming back to a load session.
fn a_cleared_tap_voids_the_pending_load_whose_counter_it_used(kind: HsmKind) {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(2));
    let srv = common::start_with(kind, &keys, metro(&["gw", "holder"]));
    let b = srv.base.clone();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let uid = [4, 6, 6, 6, 6, 6, 6];
    let mut card = transit_card(&hsm, uid, 1_000);
    // The client vanishes with the value batch.
    load_lost_at_the_credit(&b, &mut card, false);
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let tap = debit(&mut sam, &mut card, 120);
    assert_eq!(tap.tmc(), 1);
    let (_, out) = clear(&b, GW, "b1", vec![tap_json(&tap, 1)]);
    assert_eq!(out["loads_voided"], 1, "{out}");
    let l = srv.state.loads.ledger();
    let r = l.read().unwrap();
    let intents = r.all_intents().unwrap();
    assert_eq!(intents[0].state, charging::ledger::IntentState::Voided);
}

/// A load the card applied but whose proof never reached the server, and the card then only
/// used at validators: the cleared tap's proved balance shows the load's amount arriving across
/// the load's counter, so clearing completes the load and captures its funding.
fn a_cleared_tap_completes_the_pending_load_the_card_applied(kind: HsmKind) {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(3));
    let srv = common::start_with(kind, &keys, metro(&["gw", "holder", "ops"]));
    let b = srv.base.clone();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let uid = [4, 7, 7, 7, 7, 7, 1];
    let mut card = issued_card(&b, &hsm, uid);
    // The card applied it; the answers never reach the server.
    load_lost_at_the_credit(&b, &mut card, true);
    assert_eq!(card.state().balance_minor, 1_700);
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let tap = debit(&mut sam, &mut card, 120);
    assert_eq!(tap.tmc(), 2);
    let (_, out) = clear(&b, GW, "b1", vec![tap_json(&tap, 1)]);
    assert_eq!(out["loads_completed"], 1, "{out}");
    let l = srv.state.loads.ledger();
    {
        let r = l.read().unwrap();
        assert_eq!(
            r.balance(&charging::ledger::card_account(&uid)).unwrap(),
            1_580
        );
        assert_eq!(
            r.all_intents().unwrap()[0].state,
            charging::ledger::IntentState::Completed
        );
    }
    let report = charging::reconcile::reconcile(l).unwrap();
    assert_eq!(report.balanced, 1, "{report:?}");
}

/// The same, with the taps arriving out of order (different validators, different gateway
/// batches): the tap after the load is cleared before the tap before it. The load is completed
/// once the gap below it closes.
fn a_pending_load_is_completed_whatever_order_the_taps_arrive_in(kind: HsmKind) {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(4));
    let srv = common::start_with(kind, &keys, metro(&["gw", "holder", "ops"]));
    let b = srv.base.clone();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let uid = [4, 7, 7, 7, 7, 7, 2];
    let mut card = issued_card(&b, &hsm, uid);
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let before = debit(&mut sam, &mut card, 100); // tmc 1, not cleared yet
                                                  // Applied (tmc 2); the answers are lost.
    load_lost_at_the_credit(&b, &mut card, true);
    let after = debit(&mut sam, &mut card, 50); // tmc 3
    assert_eq!((before.tmc(), after.tmc()), (1, 3));
    let (_, first) = clear(&b, GW, "late-1", vec![tap_json(&after, 2)]);
    assert_eq!(
        first["loads_completed"], 0,
        "the gap below is still open: {first}"
    );
    let (_, second) = clear(&b, GW, "late-2", vec![tap_json(&before, 1)]);
    assert_eq!(second["loads_completed"], 1, "{second}");
    let l = srv.state.loads.ledger();
    {
        let r = l.read().unwrap();
        assert_eq!(
            r.balance(&charging::ledger::card_account(&uid)).unwrap(),
            i64::from(card.state().balance_minor)
        );
    }
    assert_eq!(charging::reconcile::reconcile(l).unwrap().balanced, 1);
}

both_hsms!(
    batches_clear_once_forgeries_and_clones_are_anomalies,
    a_cleared_tap_voids_the_pending_load_whose_counter_it_used,
    a_cleared_tap_completes_the_pending_load_the_card_applied,
    a_pending_load_is_completed_whatever_order_the_taps_arrive_in,
);

/// A gateway token books fares only to the operators it serves: the metro's gateway cannot put
/// taps on the hotel's account (nor the hotel's on the metro's); nothing of a refused batch is
/// booked, and the same taps from the right gateway clear.
#[test]
fn a_gateway_books_taps_only_to_its_own_operators() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(8));
    let srv = common::start(&keys, |cfg| {
        metro(&["gw", "hotel-gw", "ops"])(cfg);
        cfg.gateway_operators
            .insert("hotel-gw".into(), vec!["hotel".into()]);
    });
    let b = srv.base.clone();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let uid = [4, 1, 2, 3, 4, 5, 6];
    let mut card = issued_card(&b, &hsm, uid);
    let fare = tap_json(&debit(&mut sam, &mut card, 150), 1);
    let mut sale = tap_json(&debit(&mut sam, &mut card, 499), 2);
    sale["operator"] = "hotel".into();
    for (token, id, taps) in [
        (GW, "gw-1", vec![fare.clone(), sale.clone()]),
        (HOTEL_GW, "hotel-1", vec![sale.clone(), fare.clone()]),
    ] {
        let (code, out) = clear(&b, token, id, taps);
        assert_eq!(code, 403, "{out}");
        assert!(
            out["detail"]
                .as_str()
                .unwrap()
                .contains("may not book taps"),
            "{out}"
        );
    }
    {
        let l = srv.state.loads.ledger();
        let r = l.read().unwrap();
        assert_eq!(r.balance("operator:metro").unwrap(), 0);
        assert_eq!(r.balance("operator:hotel").unwrap(), 0);
    }
    // Batch ids are per gateway: the hotel's token sending an (empty) batch under the metro's
    // next id does not make the metro's real batch look already answered.
    let _ = clear(&b, HOTEL_GW, "gw-2", vec![]);
    let (code, out) = clear(&b, GW, "gw-2", vec![fare]);
    assert_eq!((code, out["cleared"].as_u64()), (200, Some(1)), "{out}");
    assert_eq!(out["batch_id"], "gw-2");
    assert_eq!(clear(&b, HOTEL_GW, "hotel-2", vec![sale]).0, 200);
    let l = srv.state.loads.ledger();
    let r = l.read().unwrap();
    assert_eq!(r.balance("operator:metro").unwrap(), 150);
    assert_eq!(r.balance("operator:hotel").unwrap(), 499);
    assert_eq!(
        r.balance(&charging::ledger::card_account(&uid)).unwrap(),
        i64::from(card.state().balance_minor)
    );
}
