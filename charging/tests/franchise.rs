//! A franchise terminal loads cards offline under its SAM's ceiling, reports the loads later,
//! gets its ceiling replenished online within its exposure limit, and pays what it owes.

#[macro_use]
mod common;

use common::HsmKind;

use charging::api::{Auth, Role, TokenEntry};
use charging::franchise::FranchiseConfig;
use purse::apdu::ins;
use purse::card::{Card, Personalisation};
use purse::keys::{KeyKind, KeySet};
use purse::sam::{CeilingGrant, SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::fixtures::value_tx;

const SHOP: &str = "tg_shop_token";
const OPS: &str = "tg_ops_token";

fn offline_load(sam: &mut SoftwareSam, card: &mut Card, amount: i32) -> serde_json::Value {
    let receipt = value_tx(sam, card, KeyKind::Credit, ins::CREDIT, amount).unwrap();
    serde_json::json!({
        "card_uid": hex::encode_upper(receipt.uid()),
        "tmc": receipt.tmc(),
        "amount_minor": receipt.amount_minor(),
        "balance_after_minor": receipt.balance_after_minor(),
        "tmv": hex::encode_upper(receipt.tmv()),
        "key_version": receipt.key_version(),
    })
}

fn franchise_loads_are_reported_verified_booked_once_and_ceilings_follow_exposure(kind: HsmKind) {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(1));
    let srv = common::start_with(kind, &keys, |cfg| {
        cfg.tokens = vec![
            TokenEntry {
                name: "corner-shop".into(),
                role: Role::Partner,
                sha256: Auth::hash_token(SHOP),
            },
            TokenEntry {
                name: "ops".into(),
                role: Role::Operator,
                sha256: Auth::hash_token(OPS),
            },
        ];
        cfg.franchises = vec![FranchiseConfig {
            name: "corner-shop".into(),
            device_id: 7001,
            max_exposure_minor: 10_000,
        }];
    });
    let base = srv.base.clone();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::franchise(&keys, 7001, 0).unwrap();

    // The first grant: the whole exposure limit.
    let (code, g) = common::post(
        &format!("{base}/v1/franchise/ceiling"),
        SHOP,
        serde_json::json!({"requested_minor": 50_000}),
    );
    assert_eq!(code, 200, "{g}");
    assert_eq!(g["amount_minor"], 10_000);
    let grant = CeilingGrant {
        device_id: 7001,
        seq: g["seq"].as_u64().unwrap() as u32,
        amount_minor: g["amount_minor"].as_i64().unwrap(),
        mac: hex::decode(g["mac"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap(),
    };
    sam.apply_ceiling_grant(&grant).unwrap();
    // No more headroom until loads are reported and paid.
    let (code, _) = common::post(
        &format!("{base}/v1/franchise/ceiling"),
        SHOP,
        serde_json::json!({"requested_minor": 1}),
    );
    assert_eq!(code, 409);

    // Offline loads on three cards.
    let mut cards: Vec<Card> = (0..3u8)
        .map(|i| {
            let uid = [4, 7, 7, 7, 7, 7, i];
            Card::personalise(
                &Personalisation::transit(uid, 0),
                hsm.card_keys(&uid, 1).unwrap(),
            )
        })
        .collect();
    let mut report: Vec<serde_json::Value> = cards
        .iter_mut()
        .map(|c| offline_load(&mut sam, c, 2_000))
        .collect();
    assert_eq!(sam.ceiling_minor(), 4_000);
    // A forged entry (a load that never happened) rides along.
    let mut forged = report[0].clone();
    forged["tmc"] = 2.into();
    forged["amount_minor"] = 9_000.into();
    report.push(forged);

    let (code, out) = common::post(
        &format!("{base}/v1/franchise/loads"),
        SHOP,
        serde_json::json!({"loads": report}),
    );
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["accepted"], 3);
    assert_eq!(out["rejected"].as_array().unwrap().len(), 1, "{out}");
    // Reported again (a retry): nothing booked twice.
    let (_, again) = common::post(
        &format!("{base}/v1/franchise/loads"),
        SHOP,
        serde_json::json!({"loads": &report[..3]}),
    );
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(3))
    );

    // Exposure now: 4 000 granted-unreported + 6 000 owed = the limit.
    let (code, _) = common::post(
        &format!("{base}/v1/franchise/ceiling"),
        SHOP,
        serde_json::json!({"requested_minor": 1}),
    );
    assert_eq!(code, 409);
    // The shop pays; the ceiling can grow again by what was paid.
    let (code, body) = common::post(
        &format!("{base}/v1/franchises/corner-shop/payments"),
        OPS,
        serde_json::json!({"amount_minor": 6_000, "reference": "bank-2026-11-24"}),
    );
    assert_eq!(code, 204, "{body}");
    let (code, _) = common::post(
        &format!("{base}/v1/franchises/corner-shop/payments"),
        SHOP,
        serde_json::json!({"amount_minor": 6_000, "reference": "x"}),
    );
    assert_eq!(code, 403, "a franchise cannot record its own payments");
    let (code, g2) = common::post(
        &format!("{base}/v1/franchise/ceiling"),
        SHOP,
        serde_json::json!({"requested_minor": 50_000}),
    );
    assert_eq!((code, g2["amount_minor"].as_i64()), (200, Some(6_000)));
    assert_eq!(g2["seq"], 2);

    // The ledger: each card holds its load; the franchise owes nothing more.
    let l = srv.state.loads.ledger();
    let r = l.read().unwrap();
    for c in &cards {
        assert_eq!(
            r.balance(&charging::ledger::card_account(&c.state().uid))
                .unwrap(),
            2_000
        );
    }
    assert_eq!(r.balance("franchise:corner-shop").unwrap(), 0);
    drop(r);
    let status: serde_json::Value = ureq::get(&format!("{base}/v1/franchises/corner-shop"))
        .set("Authorization", &format!("Bearer {SHOP}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(status["reported_total_minor"], 6_000);
    assert_eq!(status["granted_total_minor"], 16_000);
}

both_hsms!(franchise_loads_are_reported_verified_booked_once_and_ceilings_follow_exposure,);
