//! A card counter gap that never fills is an anomaly: reported once after the timeout, a block
//! when value appeared across it (a credit the back office never made), and every anomaly is
//! kept in the ledger and listed for operators over HTTP.

use charging::api::{Auth, Role, TokenEntry};
use charging::clearing::{clear_batch, ClearingBatch, ClearingTap};
use charging::load::{LoadConfig, LoadService};
use charging::server::{self, ServerConfig};
use purse::apdu::ins;
use purse::keys::{KeyKind, KeySet};
use purse::sam::{SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;
use tapgate_testkit::charging::load_service;
use tapgate_testkit::fixtures::{clearing_tap, transit_card, value_tx};

const T0: u64 = 1_700_000_000_000;
const HOUR: u64 = 3_600_000;
const TIMEOUT: u64 = 72 * HOUR;
const OPS: &str = "tg_ops_gaps";

fn clear(svc: &LoadService, id: &str, taps: Vec<ClearingTap>, now: u64) {
    let out = clear_batch(
        svc.ledger(),
        svc.hsm(),
        ClearingBatch {
            batch_id: id.into(),
            taps,
        },
        now,
    )
    .unwrap();
    assert!(out.anomalies.is_empty(), "{out:?}");
}

fn sweep(svc: &LoadService, now: u64) -> charging::ledger::GapSweep {
    svc.ledger()
        .transact(move |t| t.sweep_gaps(now, TIMEOUT))
        .unwrap()
}

fn blocked(svc: &LoadService, uid: &[u8; 7]) -> bool {
    let l = svc.ledger();
    let r = l.read().unwrap();
    r.card(uid).unwrap().blocked
}

#[test]
fn a_gap_that_never_fills_is_reported_once_and_blocks_only_when_value_appeared() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(11));
    let (_pg, svc, _) = load_service(dir.path(), &keys, LoadConfig::default());
    let mut hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();

    // Card A: three debits; the middle one's tap is late (its validator was offline).
    let a = [0x04, 0xA0, 1, 2, 3, 4, 5];
    svc.register_card(&a, 1_000, T0).unwrap();
    let mut card_a = transit_card(&hsm, a, 1_000);
    let a1 = value_tx(&mut sam, &mut card_a, KeyKind::Debit, ins::DEBIT, 100).unwrap();
    let a2 = value_tx(&mut sam, &mut card_a, KeyKind::Debit, ins::DEBIT, 200).unwrap();
    let a3 = value_tx(&mut sam, &mut card_a, KeyKind::Debit, ins::DEBIT, 50).unwrap();
    clear(
        &svc,
        "b1",
        vec![clearing_tap(&a1, 1), clearing_tap(&a3, 3)],
        T0,
    );

    // Card B: a credit the back office never made (a leaked credit key), then a debit that is
    // cleared: value appeared across the gap.
    let b = [0x04, 0xB0, 1, 2, 3, 4, 5];
    svc.register_card(&b, 1_000, T0).unwrap();
    let mut card_b = transit_card(&hsm, b, 1_000);
    let b1 = value_tx(&mut sam, &mut card_b, KeyKind::Debit, ins::DEBIT, 100).unwrap();
    let rogue = value_tx(&mut hsm, &mut card_b, KeyKind::Credit, ins::CREDIT, 5_000).unwrap();
    let b3 = value_tx(&mut sam, &mut card_b, KeyKind::Debit, ins::DEBIT, 100).unwrap();
    clear(
        &svc,
        "b2",
        vec![clearing_tap(&b1, 4), clearing_tap(&b3, 6)],
        T0 + HOUR,
    );

    // Before the timeout nothing is raised.
    assert_eq!(sweep(&svc, T0 + TIMEOUT - HOUR), Default::default());

    // After it: one anomaly per card; only B (value appeared) is blocked.
    let s = sweep(&svc, T0 + TIMEOUT + 2 * HOUR);
    assert_eq!(s.anomalies.len(), 2, "{s:?}");
    assert_eq!(s.cards_blocked, 1);
    let by_card = |uid: &[u8; 7]| {
        s.anomalies
            .iter()
            .find(|x| x.card_uid == hex::encode_upper(uid))
            .unwrap()
            .clone()
    };
    let ga = by_card(&a);
    assert_eq!((ga.kind.as_str(), ga.tmc), ("counter_gap", 2));
    assert!(
        ga.detail
            .contains("200 minor units of debits never cleared"),
        "{}",
        ga.detail
    );
    let gb = by_card(&b);
    assert_eq!((gb.kind.as_str(), gb.tmc), ("counter_gap", 2));
    assert!(
        gb.detail.contains("5000 minor units appeared"),
        "{}",
        gb.detail
    );
    assert!(!blocked(&svc, &a));
    assert!(blocked(&svc, &b));
    {
        let l = svc.ledger();
        let r = l.read().unwrap();
        let (changes, _) = r.block_changes(0, 10).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].card_uid, hex::encode_upper(b));
    }

    // Reported once.
    assert_eq!(sweep(&svc, T0 + 2 * TIMEOUT), Default::default());

    // Had B's credit been a franchise load reported late, its booking fills the gap: the
    // value is explained by a proved transaction and the block is lifted.
    {
        let l = svc.ledger();
        let proof = purse::sam::Hsm::verify_tmac(&hsm, &rogue).unwrap();
        let now = T0 + 2 * TIMEOUT;
        l.transact(move |t| t.book_proved(&proof, now)).unwrap();
    }
    assert!(!blocked(&svc, &b), "unblocked when the gap filled");
    {
        let l = svc.ledger();
        let r = l.read().unwrap();
        let (changes, _) = r.block_changes(0, 10).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1].action, "unblock");
    }

    // A's late tap fills its gap: A reconciles; B still differs (its counter 2 was booked
    // by hand above, without a posting: the value the ledger never saw).
    clear(&svc, "b3", vec![clearing_tap(&a2, 2)], T0 + 2 * TIMEOUT);
    let report = charging::reconcile::reconcile(svc.ledger()).unwrap();
    assert_eq!(report.balanced, 1, "{report:?}");
    assert_eq!(report.differences.len(), 1);
    assert_eq!(report.differences[0].card_uid, hex::encode_upper(b));

    // A new gap on A later starts a new clock.
    let a4 = value_tx(&mut sam, &mut card_a, KeyKind::Debit, ins::DEBIT, 10).unwrap();
    let a5 = value_tx(&mut sam, &mut card_a, KeyKind::Debit, ins::DEBIT, 10).unwrap();
    let _ = a4;
    clear(&svc, "b4", vec![clearing_tap(&a5, 5)], T0 + 3 * TIMEOUT);
    assert_eq!(
        sweep(&svc, T0 + 3 * TIMEOUT + HOUR),
        Default::default(),
        "the new gap is too young"
    );
    assert_eq!(sweep(&svc, T0 + 4 * TIMEOUT + HOUR).anomalies.len(), 1);

    // Operators read every anomaly over HTTP, in order; other roles may not.
    let cfg = ServerConfig {
        tokens: vec![
            TokenEntry {
                name: "ops".into(),
                role: Role::Operator,
                sha256: Auth::hash_token(OPS),
            },
            TokenEntry {
                name: "gw".into(),
                role: Role::Gateway,
                sha256: Auth::hash_token("tg_gw_gaps"),
            },
        ],
        ..ServerConfig::from_toml(&format!(
            "data_dir = {:?}",
            dir.path().join("server").to_str().unwrap()
        ))
        .unwrap()
    };
    let state = charging::api::AppState {
        loads: Arc::new(svc),
        ..server::build(&cfg, Box::new(SoftwareHsm::new(&keys).unwrap())).unwrap()
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(async move {
        server::serve_on(listener, &cfg, state, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let get = |token: &str, query: &str| match ureq::get(&format!("{base}/v1/anomalies{query}"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
    {
        Ok(r) => (r.status(), r.into_json::<serde_json::Value>().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    };
    let (code, all) = get(OPS, "");
    assert_eq!(code, 200, "{all}");
    assert_eq!(all["last_seq"], 3);
    let list = all["anomalies"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[2]["seq"], 3);
    assert_eq!(list[2]["card_uid"], hex::encode_upper(a));
    let (_, after) = get(OPS, "?after=2");
    assert_eq!(after["anomalies"].as_array().unwrap().len(), 1);
    assert_eq!(get("tg_gw_gaps", "").0, 403);
    assert_eq!(get("nobody", "").0, 401);

    // The reversal endpoint: roles, the Idempotency-Key, and a load that does not exist.
    let reverse = |token: &str, key: Option<&str>, body: serde_json::Value| {
        let mut req = ureq::post(&format!("{base}/v1/reversals"))
            .set("Authorization", &format!("Bearer {token}"));
        if let Some(k) = key {
            req = req.set("Idempotency-Key", k);
        }
        match req.send_json(body) {
            Ok(r) => (r.status(), r.into_json::<serde_json::Value>().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        }
    };
    let body = serde_json::json!({"card_uid": hex::encode_upper(a), "load_tmc": 2});
    assert_eq!(reverse("tg_gw_gaps", Some("k"), body.clone()).0, 403);
    let (code, e) = reverse(OPS, None, body.clone());
    assert_eq!(
        (code, e["error"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    let (code, e) = reverse(OPS, Some("k"), body);
    assert_eq!((code, e["error"].as_str()), (404, Some("not_found")), "{e}");
    let (code, _) = reverse(OPS, Some("k"), serde_json::json!({"card_uid": "zz"}));
    assert_eq!(code, 400);
    let _ = stop_tx.send(());
    rt.block_on(server).unwrap().unwrap();
}
