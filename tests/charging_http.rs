//! The charging daemon over real HTTP: a client that only relays APDUs loads an emulated card;
//! roles are enforced; a server killed mid-load and restarted settles the torn load from the
//! card's counter — never paid twice, never lost.

mod support;

use charging::client::{Client, Ending, Vanish};
use charging::load::Reply;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use purse::txn::EmulatedReader;
use std::path::Path;
use std::process::Command;
use tapgate_testkit::http;

const PASS: &str = "http-test-pass";
const CARDHOLDER: &str = "tg_cardholder_token_for_tests";
const OPERATOR: &str = "tg_operator_token_for_tests";

fn start(dir: &Path) -> support::Charging {
    support::start_charging(&dir.join("charging.toml"), &dir.join("keys"), PASS)
}

fn setup() -> (tempfile::TempDir, KeySet) {
    let dir = tempfile::tempdir().unwrap();
    let ks = support::keys_init(dir.path(), PASS);
    let cfg = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nledger_map_size_bytes = 67108864\n{}",
        dir.path().join("data").to_str().unwrap(),
        support::tokens_toml(&[
            ("alice", "cardholder", CARDHOLDER),
            ("ops", "operator", OPERATOR)
        ])
    );
    std::fs::write(dir.path().join("charging.toml"), cfg).unwrap();
    (dir, ks)
}

fn post(
    base: &str,
    path: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    http::call("POST", &format!("{base}{path}"), token, key, Some(body))
}

/// Relays with the typed client from the start's answer `first` until a final status; if
/// `stop_at_commit`, delivers the commit to the card, takes the card away and returns `null`
/// without answering the server.
fn relay(
    base: &str,
    card: &mut Card,
    first: serde_json::Value,
    stop_at_commit: bool,
) -> serde_json::Value {
    let first: Reply = serde_json::from_value(first).expect("a load reply");
    let vanish = stop_at_commit.then_some(Vanish::AfterIns(purse::apdu::ins::COMMIT_TRANSACTION));
    let mut reader = EmulatedReader {
        card: &mut *card,
        rng: rand::rngs::OsRng,
    };
    let relayed = Client::new(base, CARDHOLDER)
        .relay(&mut reader, first, vanish)
        .expect("relayed");
    match relayed.ending {
        Ending::Answered(reply) => serde_json::to_value(reply).unwrap(),
        Ending::Vanished { .. } => {
            card.remove_from_field();
            serde_json::Value::Null
        }
    }
}

#[test]
fn a_load_over_http_with_roles_enforced_and_a_restart_mid_load() {
    let (dir, ks) = setup();
    let server = start(dir.path());
    let base = server.base.clone();
    let uid = [0x04, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66];
    let uid_hex = hex::encode_upper(uid);
    let hsm = SoftwareHsm::new(&ks).unwrap();
    let mut card = Card::personalise(
        &Personalisation::transit(uid, 1_000),
        hsm.card_keys(&uid, 1).unwrap(),
    );

    // Authentication and roles.
    let load_body = serde_json::json!({"card_uid": uid_hex, "amount_minor": 2_000, "funding": {"source": "card", "instrument": "tok_visa"}});
    assert_eq!(
        post(&base, "/v1/loads", None, Some("k1"), load_body.clone()).0,
        401
    );
    assert_eq!(
        post(
            &base,
            "/v1/loads",
            Some("tg_wrong"),
            Some("k1"),
            load_body.clone()
        )
        .0,
        401
    );
    let (code, body) = post(
        &base,
        "/v1/cards",
        Some(CARDHOLDER),
        None,
        serde_json::json!({"card_uid": uid_hex, "personalised_minor": 1_000}),
    );
    assert_eq!(code, 403, "{body}");
    let (code, body) = post(
        &base,
        "/v1/cards",
        Some(OPERATOR),
        None,
        serde_json::json!({"card_uid": uid_hex, "personalised_minor": 1_000}),
    );
    assert_eq!(code, 201, "{body}");
    // The cardholder pays with a card token registered to its account.
    let (code, body) = post(
        &base,
        "/v1/instruments",
        Some(CARDHOLDER),
        None,
        serde_json::json!({"source": "card", "instrument": "tok_visa"}),
    );
    assert_eq!(code, 201, "{body}");
    // Bad input: a clear 400, and the server keeps serving.
    let (code, body) = post(
        &base,
        "/v1/loads",
        Some(CARDHOLDER),
        Some("k0"),
        serde_json::json!({"card_uid": "XYZ", "amount_minor": 1, "funding": {"source": "card", "instrument": "tok_visa"}}),
    );
    assert_eq!(code, 400);
    assert!(
        body["detail"].as_str().unwrap().contains("14 hex digits"),
        "{body}"
    );
    let (code, body) = post(
        &base,
        "/v1/loads",
        Some(CARDHOLDER),
        Some("k0"),
        serde_json::json!({"card_uid": uid_hex, "amount_minor": "ten"}),
    );
    assert_eq!(code, 400, "{body}");
    let (code, _) = post(
        &base,
        "/v1/loads",
        Some(CARDHOLDER),
        None,
        load_body.clone(),
    );
    assert_eq!(code, 400, "missing Idempotency-Key");

    // A load, relayed.
    let (code, first) = post(
        &base,
        "/v1/loads",
        Some(CARDHOLDER),
        Some("k1"),
        load_body.clone(),
    );
    assert_eq!(code, 200, "{first}");
    let done = relay(&base, &mut card, first, false);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["balance_minor"], 3_000);
    assert_eq!(card.state().balance_minor, 3_000);
    // Replaying the start returns the outcome, not a new load.
    let (_, again) = post(
        &base,
        "/v1/loads",
        Some(CARDHOLDER),
        Some("k1"),
        load_body.clone(),
    );
    assert_eq!(again["status"], "completed");

    // A load torn at the commit, then the server is killed (no graceful anything).
    let (_, first) = post(
        &base,
        "/v1/loads",
        Some(CARDHOLDER),
        Some("k2"),
        serde_json::json!({"card_uid": uid_hex, "amount_minor": 500, "funding": {"source": "card", "instrument": "tok_visa"}}),
    );
    relay(&base, &mut card, first, true);
    assert_eq!(card.state().balance_minor, 3_500, "the card applied it");
    drop(server);

    // Restarted, the next load settles the torn one from the card's counter.
    let server = start(dir.path());
    let base = server.base.clone();
    let (_, first) = post(
        &base,
        "/v1/loads",
        Some(CARDHOLDER),
        Some("k3"),
        serde_json::json!({"card_uid": uid_hex, "amount_minor": 100, "funding": {"source": "card", "instrument": "tok_visa"}}),
    );
    let done = relay(&base, &mut card, first, false);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(card.state().balance_minor, 3_600);
    let (code, got) = http::get(&format!("{base}/v1/cards/{uid_hex}"), OPERATOR);
    assert_eq!(code, 200, "{got}");
    assert_eq!(
        got["shadow_balance_minor"], 3_600,
        "ledger agrees with the card: {got}"
    );
    assert_eq!(got["pending_loads"], 0);
    // The OpenAPI document and metrics are served.
    let doc = ureq::get(&format!("{base}/openapi.yaml"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(doc.contains("/v1/loads/{id}/steps"));
    // /metrics needs an operator (or metrics) token unless `metrics_public` is set.
    let (code, _) = http::call("GET", &format!("{base}/metrics"), None, None, None);
    assert_eq!(code, 401, "metrics without a token");
    let (code, _) = http::get_text(&format!("{base}/metrics"), CARDHOLDER);
    assert_eq!(code, 403, "metrics with a cardholder token");
    let (code, metrics) = http::get_text(&format!("{base}/metrics"), OPERATOR);
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.contains("tapgate_charging_loads_settled_completed_total 1"),
        "{metrics}"
    );
    // Reconciliation (another process, while the server runs): the card balances.
    let report = support::reconcile(&dir.path().join("data"));
    assert_eq!(report["cards"], 1, "{report}");
    assert_eq!(report["balanced"], 1, "{report}");
    drop(server);
}

/// `tapgate charge`: the cardholder's client loads an emulated card image through the server.
#[test]
fn tapgate_charge_loads_a_card_through_the_server() {
    let (dir, _ks) = setup();
    let server = start(dir.path());
    let d = dir.path();
    let card = d.join("card.json");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args(args)
            .env("TAPGATE_KEY_PASSPHRASE", PASS)
            .env("TAPGATE_TOKEN", CARDHOLDER)
            .output()
            .unwrap()
    };
    let out = run(&[
        "card",
        "issue",
        "--keys",
        d.join("keys").to_str().unwrap(),
        "--uid",
        "04A1A2A3A4A5A6",
        "--balance",
        "250",
        "--out",
        card.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let charge = |amount: &str, funding: &str, key: &str| {
        run(&[
            "charge",
            "--server",
            &server.base,
            "--amount",
            amount,
            "--funding",
            funding,
            "--card",
            card.to_str().unwrap(),
            "--keys",
            d.join("keys").to_str().unwrap(),
            "--idempotency-key",
            key,
        ])
    };
    let out = charge("1000", "card:tok_visa", "c1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(
            "load completed: amount_minor=1000 balance_minor=1250 tmc=1 round_trips=5"
        ),
        "{stdout}"
    );
    // Retrying with the same key does not load twice.
    let out = charge("1000", "card:tok_visa", "c1");
    assert!(String::from_utf8_lossy(&out.stdout).contains("balance_minor=1250"));
    let out = charge("500", "card:tok_decline", "c2");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("reason=funding_declined"));
    let out = charge("500", "nonsense", "c3");
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["card", "show", card.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("balance_minor   1250"));
}
