//! Action-list orders in the back office: an order is paid through a funding source like a
//! load, listed (signed snapshot and deltas a validator applies), completed exactly once by
//! clearing from the pick-up's transaction MAC, and refunded to its funding once after its
//! expiry when never picked up — value conserved throughout.

use charging::clearing::{clear_batch, ClearingBatch, ClearingTap};
use charging::funding::SandboxProcessor;
use charging::ledger::card_account;
use charging::load::{
    LoadConfig, LoadService, OrderError, OrderLimits, OrderRequest, OrderState, ORDERS_PENDING,
};
use purse::actionlist::{self, ActionList};
use purse::apdu::ins;
use purse::card::Card;
use purse::keys::{KeyKind, KeySet};
use purse::receipt::CommitReceipt;
use purse::rotation::SignedMessage;
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use purse::tap::{TapMeta, TapRecord};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;
use tapgate_testkit::charging::load_service;
use tapgate_testkit::fixtures::{transit_card, value_tx};

mod common;

const T0: u64 = 1_800_000_000_000;
const HOLDER: &str = "alice";

struct Rig {
    svc: LoadService,
    hsm: SoftwareHsm,
    keys: KeySet,
    processor: Arc<SandboxProcessor>,
    limits: OrderLimits,
    _dir: tempfile::TempDir,
    _pg: Option<tapgate_testkit::postgres::TestDb>,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(1919));
    let (pg, svc, processor) = load_service(dir.path(), &keys, LoadConfig::default());
    svc.register_instrument(HOLDER, "card", "tok_visa", T0)
        .unwrap();
    Rig {
        svc,
        hsm: SoftwareHsm::new(&keys).unwrap(),
        keys,
        processor,
        limits: OrderLimits {
            expiry_ms: 3_600_000,
            refund_grace_ms: 600_000,
            ..OrderLimits::default()
        },
        _dir: dir,
        _pg: pg,
    }
}

fn card(rig: &Rig, n: u8, balance: i32) -> Card {
    let uid = [0x04, 0x19, n, 1, 2, 3, 4];
    rig.svc.register_card(&uid, i64::from(balance), T0).unwrap();
    transit_card(&rig.hsm, uid, balance)
}

fn request(card: &Card, amount: i32, key: &str) -> OrderRequest {
    OrderRequest {
        uid: card.state().uid,
        amount_minor: amount,
        funding_source: "card".into(),
        instrument: "tok_visa".into(),
        idempotency_key: key.into(),
    }
}

/// The validator side: the signed snapshot applied as a validator does.
fn validator_list(rig: &Rig) -> ActionList {
    let snap = rig.svc.action_snapshot("metro").unwrap().unwrap();
    let bytes = rig.svc.sign_actions(&snap).unwrap();
    let mut l = ActionList::new("metro");
    l.apply(&bytes, &rig.hsm.verifying_key()).unwrap();
    l
}

/// A validator SAM (granted `ceiling`) picks up order `id` from the list: the credit's receipt.
fn pick_up(rig: &Rig, list: &ActionList, id: u64, card: &mut Card, device: u32) -> CommitReceipt {
    let mut sam = SoftwareSam::validator(&rig.keys, device).unwrap();
    sam.apply_action_grant(&rig.hsm.action_grant(device, 1, 1_000_000).unwrap())
        .unwrap();
    let o = list.get(id).unwrap();
    let amount = o.order().amount_minor;
    let mut p = sam.pickup(o, T0 / 1000).unwrap();
    value_tx(&mut p, card, KeyKind::Credit, ins::CREDIT, amount).unwrap()
}

fn pickup_tap(r: &CommitReceipt, order_id: u64, device: u32, seq: u64) -> ClearingTap {
    let (hi, lo) = actionlist::order_tap_codes(order_id);
    let meta = TapMeta {
        device_id: device,
        device_seq: seq,
        device_time_ms: T0,
        stop_id: hi,
        route_id: lo,
        ..TapMeta::default()
    };
    ClearingTap::from_tap(&TapRecord::accepted(r, meta), "metro").unwrap()
}

fn clear(rig: &Rig, id: &str, taps: Vec<ClearingTap>) -> charging::clearing::BatchOutcome {
    clear_batch(
        rig.svc.ledger(),
        rig.svc.hsm(),
        ClearingBatch {
            batch_id: id.into(),
            taps,
        },
        T0 + 60_000,
    )
    .unwrap()
}

fn balance(rig: &Rig, account: &str) -> i64 {
    rig.svc.ledger().read().unwrap().balance(account).unwrap()
}

#[test]
fn an_order_is_paid_listed_picked_up_and_completed_once_by_clearing() {
    let rig = rig();
    let mut c = card(&rig, 1, 1_000);
    let uid = c.state().uid;
    let o = rig
        .svc
        .create_order(HOLDER, &rig.limits, request(&c, 5_000, "k1"), T0)
        .unwrap();
    assert_eq!((o.id, o.state), (1, OrderState::Open));
    // The same key again: the same order, not a second one; another order under it: refused.
    let again = rig
        .svc
        .create_order(HOLDER, &rig.limits, request(&c, 5_000, "k1"), T0)
        .unwrap();
    assert_eq!(again, o);
    assert!(matches!(
        rig.svc
            .create_order(HOLDER, &rig.limits, request(&c, 6_000, "k1"), T0),
        Err(OrderError::IdempotencyKeyReused)
    ));
    // Paid up front: captured at the source, the value waiting in orders:pending.
    assert_eq!(
        rig.processor.authorisation(&o.auth).unwrap().state,
        "captured"
    );
    assert_eq!(balance(&rig, ORDERS_PENDING), 5_000);

    let list = validator_list(&rig);
    assert_eq!(list.len(), 1);
    let r = pick_up(&rig, &list, 1, &mut c, 1001);
    assert_eq!(c.state().balance_minor, 6_000);
    let tap = pickup_tap(&r, 1, 1001, 7);
    let out = clear(&rig, "gw-7-7", vec![tap.clone()]);
    assert!(out.anomalies.is_empty(), "{out:?}");
    // Resent (the gateway lost the answer): booked once.
    let again = clear(&rig, "gw-7-7-again", vec![tap]);
    assert!(again.anomalies.is_empty(), "{again:?}");
    let o = rig.svc.order(1).unwrap();
    assert_eq!(o.state, OrderState::Completed);
    assert_eq!(o.picked_up.unwrap().tmc, r.tmc());
    assert_eq!(balance(&rig, ORDERS_PENDING), 0);
    assert_eq!(balance(&rig, &card_account(&uid)), 6_000);
    // Withdrawn from the list: a delta removes it; a validator applying it holds nothing.
    let d = rig.svc.action_delta("metro", 1, 100).unwrap().unwrap();
    assert_eq!(d.entries, vec![actionlist::Entry::Remove { order_id: 1 }]);
    let mut l = list.clone();
    l.apply(&rig.svc.sign_actions(&d).unwrap(), &rig.hsm.verifying_key())
        .unwrap();
    assert!(l.is_empty());
    // Expiry later refunds nothing: it was picked up.
    let refunded = rig
        .svc
        .expire_orders(&rig.limits, T0 + 86_400_000, 100)
        .unwrap();
    assert!(refunded.is_empty());
    let rep = charging::reconcile::reconcile(rig.svc.ledger()).unwrap();
    assert_eq!(rep.balanced, rep.cards, "{rep:?}");
}

#[test]
fn an_order_picked_up_twice_is_completed_once_and_the_second_credit_is_an_anomaly() {
    let rig = rig();
    let mut c = card(&rig, 2, 0);
    let uid = c.state().uid;
    rig.svc
        .create_order(HOLDER, &rig.limits, request(&c, 2_000, "k"), T0)
        .unwrap();
    let list = validator_list(&rig);
    // Two validators whose card records were lost between them (beyond the cyclic file).
    let a = pick_up(&rig, &list, 1, &mut c, 1001);
    let b = pick_up(&rig, &list, 1, &mut c, 1002);
    let out = clear(
        &rig,
        "b",
        vec![pickup_tap(&a, 1, 1001, 1), pickup_tap(&b, 1, 1002, 1)],
    );
    assert_eq!(out.anomalies.len(), 1, "{out:?}");
    assert_eq!(out.anomalies[0].kind, "pickup_unmatched");
    assert_eq!(rig.svc.order(1).unwrap().picked_up.unwrap().device_id, 1001);
    // The ledger follows the card (both credits are real); the second is the operator's loss.
    assert_eq!(balance(&rig, &card_account(&uid)), 4_000);
    assert_eq!(balance(&rig, ORDERS_PENDING), 0);
    assert_eq!(balance(&rig, charging::load::ORDERS_UNMATCHED), -2_000);
}

#[test]
fn an_order_never_picked_up_is_refunded_to_its_funding_once_after_expiry() {
    let rig = rig();
    let c = card(&rig, 3, 0);
    let o = rig
        .svc
        .create_order(HOLDER, &rig.limits, request(&c, 3_000, "k"), T0)
        .unwrap();
    let o2 = rig
        .svc
        .create_order(
            HOLDER,
            &rig.limits,
            request(&c, 1_000, "k2"),
            T0 + 1_000_000,
        )
        .unwrap();
    let funding_before = balance(&rig, "funding:card");
    // Not before expiry plus the grace.
    let at = o.expires_ms + rig.limits.refund_grace_ms - 1;
    assert!(rig
        .svc
        .expire_orders(&rig.limits, at, 100)
        .unwrap()
        .is_empty());
    let at = o.expires_ms + rig.limits.refund_grace_ms;
    let refunded = rig.svc.expire_orders(&rig.limits, at, 100).unwrap();
    assert_eq!(refunded.len(), 1, "only the first is due");
    assert_eq!(refunded[0].id, o.id);
    assert!(
        rig.svc
            .expire_orders(&rig.limits, at, 100)
            .unwrap()
            .is_empty(),
        "once"
    );
    assert_eq!(rig.svc.order(o.id).unwrap().state, OrderState::Refunded);
    assert_eq!(rig.svc.order(o2.id).unwrap().state, OrderState::Open);
    assert_eq!(balance(&rig, "funding:card"), funding_before + 3_000);
    assert_eq!(balance(&rig, ORDERS_PENDING), 1_000);
    let a = rig.processor.authorisation(&o.auth).unwrap();
    assert_eq!(a.refunded_minor, 3_000);
    // The snapshot lists the open one only.
    let snap = rig.svc.action_snapshot("metro").unwrap().unwrap();
    assert_eq!(snap.entries.len(), 1);
    assert_eq!(snap.entries[0].order_id(), o2.id);
}

#[test]
fn orders_are_refused_for_blocked_cards_others_instruments_and_out_of_limits() {
    let rig = rig();
    let c = card(&rig, 4, 0);
    let uid = c.state().uid;
    assert!(matches!(
        rig.svc
            .create_order("mallory", &rig.limits, request(&c, 1_000, "k"), T0),
        Err(OrderError::Refused {
            reason: "not_your_instrument",
            ..
        })
    ));
    assert!(matches!(
        rig.svc
            .create_order(HOLDER, &rig.limits, request(&c, 0, "k"), T0),
        Err(OrderError::BadRequest(_))
    ));
    let mut declined = request(&c, 1_000, "k3");
    declined.instrument = "tok_decline_1".into();
    rig.svc
        .register_instrument(HOLDER, "card", "tok_decline_1", T0)
        .unwrap();
    assert!(matches!(
        rig.svc.create_order(HOLDER, &rig.limits, declined, T0),
        Err(OrderError::Refused {
            reason: "funding_declined",
            ..
        })
    ));
    rig.svc
        .ledger()
        .transact(move |t| t.set_blocked(&uid, true, "lost", T0).map(|_| ()))
        .unwrap();
    assert!(matches!(
        rig.svc
            .create_order(HOLDER, &rig.limits, request(&c, 1_000, "k4"), T0),
        Err(OrderError::Refused {
            reason: "card_blocked",
            ..
        })
    ));
    assert_eq!(balance(&rig, ORDERS_PENDING), 0);
    assert!(rig.svc.action_snapshot("metro").unwrap().is_none());
    // Over the card's balance ceiling (500 000 by default): the card would refuse it.
    let rich = card(&rig, 6, 480_000);
    let mut limits = rig.limits.clone();
    limits.max_order_minor = 100_000;
    assert!(matches!(
        rig.svc
            .create_order(HOLDER, &limits, request(&rich, 30_000, "k5"), T0),
        Err(OrderError::Refused {
            reason: "balance_ceiling",
            ..
        })
    ));
    rig.svc
        .create_order(HOLDER, &limits, request(&rich, 20_000, "k6"), T0)
        .unwrap();
}

fn get_bytes(url: &str, token: &str) -> (u16, Option<String>, Vec<u8>) {
    match ureq::get(url)
        .set("Authorization", &format!("Bearer {token}"))
        .call()
    {
        Ok(r) => {
            let v = r.header("x-tapgate-actions-version").map(str::to_string);
            let code = r.status();
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut b).unwrap();
            (code, v, b)
        }
        Err(ureq::Error::Status(c, _)) => (c, None, Vec::new()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn over_http_a_cardholder_orders_for_its_own_card_and_the_gateway_reads_the_signed_list() {
    use charging::api::{Auth, Role, TokenEntry};
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(2020));
    let srv = common::start(&keys, |cfg| {
        let t = |n: &str, r, tok: &str| TokenEntry {
            name: n.into(),
            role: r,
            sha256: Auth::hash_token(tok),
        };
        cfg.tokens = vec![
            t("alice", Role::Cardholder, "tg_alice"),
            t("bob", Role::Cardholder, "tg_bob"),
            t("ops", Role::Operator, "tg_ops"),
            t("gw", Role::Gateway, "tg_gw"),
        ];
    });
    let b = srv.base.clone();
    let uid = "04AABBCCDDEE19";
    let (code, _) = common::post(
        &format!("{b}/v1/cards"),
        "tg_ops",
        serde_json::json!({"card_uid": uid, "personalised_minor": 0, "owner": "alice"}),
    );
    assert_eq!(code, 201);
    common::register_instrument(&b, "tg_alice", "card", "tok_visa");
    common::register_instrument(&b, "tg_bob", "card", "tok_bob");
    // Nothing listed yet.
    assert_eq!(
        get_bytes(&format!("{b}/v1/actions/signed/snapshot"), "tg_gw").0,
        204
    );
    let body = |instrument: &str| {
        serde_json::json!({"card_uid": uid, "amount_minor": 5000,
            "funding": {"source": "card", "instrument": instrument}})
    };
    // Another holder's card: refused; no Idempotency-Key: refused.
    let (code, _) = tapgate_testkit::http::post_with_key(
        &format!("{b}/v1/orders"),
        "tg_bob",
        "o1",
        body("tok_bob"),
    );
    assert_eq!(code, 403);
    let (code, _) = common::post(&format!("{b}/v1/orders"), "tg_alice", body("tok_visa"));
    assert_eq!(code, 400);
    let (code, o) = tapgate_testkit::http::post_with_key(
        &format!("{b}/v1/orders"),
        "tg_alice",
        "o1",
        body("tok_visa"),
    );
    assert_eq!(code, 201, "{o}");
    assert_eq!(
        (o["state"].as_str(), o["amount_minor"].as_i64()),
        (Some("open"), Some(5000))
    );
    let id = o["order_id"].as_u64().unwrap();
    let (code, again) = tapgate_testkit::http::post_with_key(
        &format!("{b}/v1/orders"),
        "tg_alice",
        "o1",
        body("tok_visa"),
    );
    assert_eq!(
        (code, again["order_id"].as_u64()),
        (201, Some(id)),
        "the same order"
    );
    let get = |token: &str| match ureq::get(&format!("{b}/v1/orders/{id}"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        (get("tg_alice"), get("tg_ops"), get("tg_bob")),
        (200, 200, 404)
    );
    // The gateway's reads: the snapshot and the delta, signed by the back office.
    for path in ["snapshot", "delta?after=0"] {
        let (code, v, bytes) = get_bytes(&format!("{b}/v1/actions/signed/{path}"), "tg_gw");
        assert_eq!((code, v.as_deref()), (200, Some("1")), "{path}");
        let u = actionlist::ActionUpdate::verify(&bytes, &keys.verifying_key).unwrap();
        assert_eq!(u.entries.len(), 1);
        assert_eq!(u.entries[0].order_id(), id);
    }
    assert_eq!(
        get_bytes(&format!("{b}/v1/actions/signed/delta?after=1"), "tg_gw").0,
        204
    );
    assert_eq!(
        get_bytes(&format!("{b}/v1/actions/signed/snapshot"), "tg_alice").0,
        403
    );
    // The gateway asks for a validator's ceiling grant; a cardholder may not.
    let (code, g) = common::post(
        &format!("{b}/v1/validators/1001/ceiling"),
        "tg_gw",
        serde_json::json!({}),
    );
    assert_eq!(code, 200, "{g}");
    let bytes = hex::decode(g["grant"].as_str().unwrap()).unwrap();
    let grant = purse::sam::ActionGrant::decode(&bytes).unwrap();
    assert_eq!((grant.device_id, grant.seq), (1001, 1));
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    sam.apply_action_grant(&grant).unwrap();
    let (code, _) = common::post(
        &format!("{b}/v1/validators/1001/ceiling"),
        "tg_alice",
        serde_json::json!({}),
    );
    assert_eq!(code, 403);
}

#[test]
fn a_validators_ceiling_grant_follows_its_cleared_pickups_within_the_exposure_limit() {
    let mut rig = rig();
    rig.limits.validator_exposure_minor = 10_000;
    let g1 = rig.svc.action_grant_for(1001, &rig.limits).unwrap();
    assert_eq!((g1.seq, g1.total_minor), (1, 10_000));
    // Asked again with nothing cleared: the same grant, no more exposure.
    let again = rig.svc.action_grant_for(1001, &rig.limits).unwrap();
    assert_eq!(again, g1);
    let mut sam = SoftwareSam::validator(&rig.keys, 1001).unwrap();
    sam.apply_action_grant(&g1).unwrap();
    // The validator picks up an order; once clearing has it, the grant tops the ceiling up.
    let mut c = card(&rig, 5, 0);
    rig.svc
        .create_order(HOLDER, &rig.limits, request(&c, 4_000, "k"), T0)
        .unwrap();
    let list = validator_list(&rig);
    let o = list.get(1).unwrap();
    let r = value_tx(
        &mut sam.pickup(o, T0 / 1000).unwrap(),
        &mut c,
        KeyKind::Credit,
        ins::CREDIT,
        4_000,
    )
    .unwrap();
    assert_eq!(sam.ceiling_minor(), 6_000);
    let out = clear(&rig, "b", vec![pickup_tap(&r, 1, 1001, 1)]);
    assert!(out.anomalies.is_empty(), "{out:?}");
    let g2 = rig.svc.action_grant_for(1001, &rig.limits).unwrap();
    assert_eq!((g2.seq, g2.total_minor), (2, 14_000));
    sam.apply_action_grant(&g2).unwrap();
    assert_eq!(sam.ceiling_minor(), 10_000, "exposure back at the limit");
    // Another device's grants are its own.
    let other = rig.svc.action_grant_for(1002, &rig.limits).unwrap();
    assert_eq!(
        (other.device_id, other.seq, other.total_minor),
        (1002, 1, 10_000)
    );
    assert!(sam.apply_action_grant(&other).is_err());
}

#[test]
fn order_limits_come_from_the_limits_orders_table() {
    let l: charging::load::LoadConfig =
        toml::from_str("[orders]\nexpiry_ms = 86400000\nvalidator_exposure_minor = 50000\n")
            .unwrap();
    assert_eq!(l.orders.expiry_ms, 86_400_000);
    assert_eq!(l.orders.validator_exposure_minor, 50_000);
    assert_eq!(
        l.orders.max_order_minor,
        OrderLimits::default().max_order_minor
    );
    assert!(toml::from_str::<charging::load::LoadConfig>("[orders]\nexpiry = 1\n").is_err());
    // The currency is the configuration's top-level key, not a `[limits]` one.
    assert!(toml::from_str::<charging::load::LoadConfig>("currency = \"EUR\"\n").is_err());
    assert_eq!(
        charging::load::LoadConfig::default().orders,
        OrderLimits::default()
    );
}

/// The same order requested twice at once (a double click on the top-up form): both requests
/// pass the first look for the key, and both authorise with the one reference the key gives,
/// so both hold the same authorisation. The one that finds the order already written must not
/// void it — else the order stays open, is credited at the next tap, and nothing is taken.
#[test]
fn the_same_order_requested_twice_at_once_is_one_order_and_stays_paid() {
    let rig = rig();
    let c = card(&rig, 9, 1_000);
    const ROUNDS: i64 = 20;
    for i in 0..ROUNDS {
        let req = request(&c, 100, &format!("race-{i}"));
        let barrier = std::sync::Barrier::new(2);
        let got: Vec<_> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let (req, barrier, rig) = (req.clone(), &barrier, &rig);
                    s.spawn(move || {
                        barrier.wait();
                        rig.svc.create_order(HOLDER, &rig.limits, req, T0)
                    })
                })
                .collect();
            racers.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (a, b) = (got[0].as_ref().unwrap(), got[1].as_ref().unwrap());
        assert_eq!(a, b, "round {i}: one order");
        assert_eq!(
            rig.processor.authorisation(&a.auth).unwrap().state,
            "captured",
            "round {i}: the order's payment was taken, not voided"
        );
    }
    assert_eq!(balance(&rig, ORDERS_PENDING), ROUNDS * 100);
}
