//! Hostile franchises and terminals against the real `tapgate charging` daemon (issue 14,
//! items 5, 6 and 9): a franchise replays the server's own online load as its franchise load,
//! another franchise claims a shop's load, a debit-key holder credits a reversal back, and
//! hostile amounts try to wrap the ledger. Each attack is tried over HTTP and does no harm: the
//! shadow purse equals the card.

mod support;

use charging::client::{Client, LoadAsk};
use purse::apdu::ins;
use purse::card::{Card, Personalisation};
use purse::keys::{KeyKind, KeySet};
use purse::receipt::CommitReceipt;
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::txn::EmulatedReader;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::Path;
use tapgate_testkit::fixtures::{assert_boundary, value_tx};
use tapgate_testkit::http;

const PASS: &str = "hostile-franchise-pass";
const ALICE: &str = "tg_alice_token_hostile";
const OPS: &str = "tg_ops_token_hostile";
const SHOP: &str = "tg_corner_shop_token";
const KIOSK: &str = "tg_kiosk_token";

fn setup() -> (tempfile::TempDir, KeySet, support::Charging) {
    let dir = tempfile::tempdir().unwrap();
    let keys = support::keys_init(dir.path(), PASS);
    let mut cfg = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nledger_map_size_bytes = 67108864\n",
        dir.path().join("data").to_str().unwrap()
    );
    cfg.push_str(&support::tokens_toml(&[
        ("alice", "cardholder", ALICE),
        ("ops", "operator", OPS),
        ("corner-shop", "partner", SHOP),
        ("kiosk", "partner", KIOSK),
    ]));
    for (name, device) in [("corner-shop", 7001), ("kiosk", 7002)] {
        cfg.push_str(&format!(
            "\n[[franchises]]\nname = \"{name}\"\ndevice_id = {device}\nmax_exposure_minor = 100000\n"
        ));
    }
    std::fs::write(dir.path().join("charging.toml"), cfg).unwrap();
    let server = start(dir.path());
    (dir, keys, server)
}

fn start(dir: &Path) -> support::Charging {
    support::start_charging(&dir.join("charging.toml"), &dir.join("keys"), PASS)
}

fn post(base: &str, path: &str, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    http::post(&format!("{base}{path}"), token, body)
}

/// A franchise report of one load: (UID, counter, TMV, amount, balance after).
type Load = ([u8; 7], u32, [u8; 8], i32, i32);

fn of(r: &CommitReceipt) -> Load {
    (
        r.uid(),
        r.tmc(),
        r.tmv(),
        r.amount_minor(),
        r.balance_after_minor(),
    )
}

fn report(base: &str, token: &str, (uid, tmc, tmv, amount, after): Load) -> serde_json::Value {
    let (code, out) = post(
        base,
        "/v1/franchise/loads",
        token,
        serde_json::json!({"loads": [{
            "card_uid": hex::encode_upper(uid), "tmc": tmc, "amount_minor": amount,
            "balance_after_minor": after, "tmv": hex::encode_upper(tmv), "key_version": 1,
        }]}),
    );
    assert_eq!(code, 200, "{out}");
    out
}

fn shadow(base: &str, card: &Card) -> i64 {
    let uid = hex::encode_upper(card.state().uid);
    let (code, c) = http::get(&format!("{base}/v1/cards/{uid}"), OPS);
    assert_eq!(code, 200, "{c}");
    c["shadow_balance_minor"].as_i64().unwrap()
}

fn outstanding(base: &str, name: &str) -> i64 {
    let (code, s) = http::get(&format!("{base}/v1/franchises/{name}"), OPS);
    assert_eq!(code, 200, "{s}");
    s["outstanding_minor"].as_i64().unwrap()
}

#[test]
fn a_franchise_reports_only_what_its_own_sam_did_and_a_reversal_stays_reversed() {
    let (_dir, keys, server) = setup();
    let base = server.base.clone();
    let issuer = SoftwareHsm::new(&keys).unwrap();
    let uid = [0x04, 0x14, 0x05, 0x06, 0x07, 0x08, 0x09];
    let uid_hex = hex::encode_upper(uid);
    let mut card = Card::personalise(
        &Personalisation::transit(uid, 0),
        issuer.card_keys(&uid, 1).unwrap(),
    );
    let (code, body) = post(
        &base,
        "/v1/cards",
        OPS,
        serde_json::json!({"card_uid": uid_hex, "personalised_minor": 0, "owner": "alice"}),
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = post(
        &base,
        "/v1/instruments",
        ALICE,
        serde_json::json!({"source": "card", "instrument": "tok_visa"}),
    );
    assert!(code == 200 || code == 201, "{code} {body}");

    // An online load of 500.
    let client = Client::new(&base, ALICE);
    let loaded = client
        .load(
            &mut EmulatedReader {
                card: &mut card,
                rng: StdRng::seed_from_u64(5),
            },
            &LoadAsk {
                amount_minor: 500,
                source: "card",
                instrument: "tok_visa",
                idempotency_key: "load-1",
                vanish: None,
            },
        )
        .unwrap();
    assert!(loaded.completed().is_some(), "{:?}", loaded.ending);
    let load_tmc = card.state().tmc;
    assert_eq!(card.state().balance_minor, 500);

    // Item 5: the shop replays the online load's credit as its own franchise load.
    let online: Load = (uid, load_tmc, card.state().tmv, 500, 500);
    let out = report(&base, SHOP, online);
    assert_eq!(out["accepted"], 0, "{out}");
    assert_eq!(out["rejected"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(outstanding(&base, "corner-shop"), 0);
    assert_eq!(shadow(&base, &card), 500, "the shadow purse did not move");

    // The shop's own SAM loads 200 offline: the kiosk cannot report it, the shop can, once.
    let mut sam = SoftwareSam::franchise(&keys, 7001, 1_000).unwrap();
    let own = value_tx(&mut sam, &mut card, KeyKind::Credit, ins::CREDIT, 200).unwrap();
    let out = report(&base, KIOSK, of(&own));
    assert_eq!(
        (
            out["accepted"].as_u64(),
            out["rejected"].as_array().map(Vec::len)
        ),
        (Some(0), Some(1)),
        "{out}"
    );
    let out = report(&base, SHOP, of(&own));
    assert_eq!(out["accepted"], 1, "{out}");
    let out = report(&base, SHOP, of(&own));
    assert_eq!(
        (out["accepted"].as_u64(), out["duplicates"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(outstanding(&base, "corner-shop"), 200);
    assert_eq!(outstanding(&base, "kiosk"), 0);
    assert_eq!(shadow(&base, &card), 700);
    assert_eq!(card.state().balance_minor, 700);

    // Item 6: the online load is reversed (refunded)...
    let reversed = client
        .reverse(
            &mut EmulatedReader {
                card: &mut card,
                rng: StdRng::seed_from_u64(5),
            },
            load_tmc,
            "rev-1",
        )
        .unwrap();
    assert!(reversed.completed().is_some(), "{:?}", reversed.ending);
    assert_eq!(card.state().balance_minor, 200);
    // ... and a terminal holding the debit key cannot give the 500 back.
    let mut validator = SoftwareSam::validator(&keys, 1001).unwrap();
    let r = value_tx(
        &mut validator,
        &mut card,
        KeyKind::Debit,
        ins::LIMITED_CREDIT,
        500,
    );
    assert_boundary(&r);
    assert_eq!(card.state().balance_minor, 200);
    assert_eq!(
        shadow(&base, &card),
        200,
        "value conserved: shadow equals card"
    );

    // Item 9: hostile amounts are refused, nothing wraps.
    for reference in ["max-1", "max-2"] {
        let (code, body) = post(
            &base,
            "/v1/franchises/corner-shop/payments",
            OPS,
            serde_json::json!({"amount_minor": i64::MAX, "reference": reference}),
        );
        assert_eq!(code, 400, "{body}");
    }
    assert_eq!(outstanding(&base, "corner-shop"), 200);
    let (code, body) = post(
        &base,
        "/v1/cards",
        OPS,
        serde_json::json!({"card_uid": "04141414141499", "personalised_minor": 4_294_967_396i64}),
    );
    assert_eq!(code, 400, "{body}");
    let (code, body) = post(
        &base,
        &format!("/v1/cards/{uid_hex}/block"),
        OPS,
        serde_json::json!({"reason": "test"}),
    );
    assert_eq!(code, 200, "{body}");
    let delta = |after: &str| {
        http::get(
            &format!("{base}/v1/blocklist/signed/delta?after={after}"),
            OPS,
        )
        .0
    };
    assert_eq!(delta("0"), 200);
    assert_eq!(delta("18446744073709551615"), 204);
}
