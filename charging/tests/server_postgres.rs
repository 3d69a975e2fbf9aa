//! The charging server with `[ledger] kind = "postgres"`, end to end over HTTP: a card issued,
//! a load relayed to the card, its fare cleared (the same batch twice), everything in one
//! throwaway PostgreSQL database — and the server's own tick calling the ledger from its tokio
//! workers meanwhile.

#[macro_use]
mod common;

use charging::api::Role;
use charging::ledger::{card_account, IntentState};
use charging::server::{LedgerConfig, LedgerKind};
use purse::card::Card;
use purse::keys::{KeyKind, KeySet};
use purse::sam::{SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::fixtures::{token, transit_card, value_tx};
use tapgate_testkit::postgres::TestDb;

const GW: &str = "tg_gw_pg";
const HOLDER: &str = "tg_holder_pg";
const OPS: &str = "tg_ops_pg";

/// The holder's load of `amount` relayed over HTTP until the server's final answer.
fn load(b: &str, card: &mut Card, amount: i32, key: &str) -> serde_json::Value {
    let uid = card.state().uid;
    let (code, mut reply) = common::post_with_key(
        &format!("{b}/v1/loads"),
        HOLDER,
        key,
        serde_json::json!({"card_uid": hex::encode_upper(uid), "amount_minor": amount,
                           "funding": {"source": "card", "instrument": "tok_visa"}}),
    );
    assert!(code < 300, "{code} {reply}");
    let mut rng = StdRng::seed_from_u64(3);
    while let Some(commands) = reply["commands"].as_array().cloned() {
        let answers: Vec<String> = commands
            .iter()
            .map(|c| {
                let apdu = hex::decode(c.as_str().unwrap()).unwrap();
                hex::encode_upper(card.process(&apdu, &mut rng).unwrap())
            })
            .collect();
        let id = reply["session_id"].as_str().unwrap().to_string();
        reply = common::post(
            &format!("{b}/v1/loads/{id}/steps"),
            HOLDER,
            serde_json::json!({"seq": reply["seq"], "responses": answers}),
        )
        .1;
    }
    reply
}

#[test]
fn a_load_and_a_cleared_tap_on_a_postgres_ledger() {
    let db = TestDb::start();
    let cfg = charging::ledger::PgConfig::new(&db.url, Some(db.password()));
    charging::ledger::postgres::migrate(&cfg).unwrap();
    let pw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pw.path(), format!("{}\n", db.password())).unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(5));
    let url = db.url.clone();
    let pw_path = pw.path().to_path_buf();
    let srv = common::start(&keys, move |c| {
        c.operator = "metro".into();
        c.tokens = vec![
            token("gw", Role::Gateway, GW),
            token("holder", Role::Cardholder, HOLDER),
            token("ops", Role::Operator, OPS),
        ];
        c.ledger = LedgerConfig {
            kind: LedgerKind::Postgres,
            url: Some(url),
            password_file: Some(pw_path),
            password_env: None,
            max_connections: Some(4),
            ca_file: None,
        };
    });
    let b = srv.base.clone();
    assert_eq!(srv.state.loads.ledger().kind(), "postgres");
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let uid = [4, 0x51, 7, 7, 7, 7, 1];
    let (code, out) = common::post(
        &format!("{b}/v1/cards"),
        OPS,
        serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": 1_000}),
    );
    assert_eq!(code, 201, "{out}");
    let mut card = transit_card(&hsm, uid, 1_000);
    common::register_instrument(&b, HOLDER, "card", "tok_visa");
    let done = load(&b, &mut card, 700, "k1");
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(card.state().balance_minor, 1_700);
    // The same idempotency key again: the stored answer, no second load.
    let again = load(&b, &mut card, 700, "k1");
    assert_eq!(again["status"], "completed", "{again}");
    assert_eq!(card.state().balance_minor, 1_700);

    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let fare = value_tx(
        &mut sam,
        &mut card,
        KeyKind::Debit,
        purse::apdu::ins::DEBIT,
        120,
    )
    .unwrap();
    let tap = serde_json::json!({
        "device_id": 1001, "device_seq": 1, "card_uid": hex::encode_upper(uid), "tmc": fare.tmc(),
        "kind": "debit", "amount_minor": 120, "balance_after_minor": fare.balance_after_minor(),
        "tmv": hex::encode_upper(fare.tmv()), "key_version": fare.key_version(), "operator": "metro",
    });
    for _ in 0..2 {
        let (code, out) = common::post(
            &format!("{b}/v1/clearing/batches"),
            GW,
            serde_json::json!({"batch_id": "b1", "taps": [tap.clone()]}),
        );
        assert_eq!(code, 200, "{out}");
        assert_eq!(out["cleared"], 1, "{out}");
    }
    let l = srv.state.loads.ledger();
    {
        let r = l.read().unwrap();
        assert_eq!(
            r.balance(&card_account(&uid)).unwrap(),
            1_580,
            "shadow = card"
        );
        assert_eq!(r.balance("operator:metro").unwrap(), 120, "the fare once");
        assert_eq!(r.balance("funding:card").unwrap(), -700, "the load once");
        let intents = r.all_intents().unwrap();
        assert_eq!(intents.len(), 1);
        assert_eq!(intents[0].state, IntentState::Completed);
    }
    let (code, metrics) = tapgate_testkit::http::get_text(&format!("{b}/metrics"), OPS);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("# TYPE tapgate_charging_ledger_retries_total counter"),
        "{metrics}"
    );
    let report = charging::reconcile::reconcile(l).unwrap();
    assert_eq!((report.cards, report.balanced), (1, 1), "{report:?}");
    // Finance reads the same in SQL.
    let rev = db
        .cluster
        .psql(
            db.name(),
            "SELECT operator, revenue_minor, taps FROM revenue_per_operator_day",
        )
        .unwrap();
    assert_eq!(rev.trim(), "metro|120|1");
    let causes = db
        .cluster
        .psql(db.name(), "SELECT cause, cards FROM reconciliation_causes")
        .unwrap();
    assert_eq!(causes.trim(), "balanced|1");
}
