//! Hostile users of the back office (issue 14, items 5, 6, 9 and 11): a franchise reporting
//! the server's own online loads, a terminal crediting a reversal back, money arithmetic at its
//! edges, a batch of forged taps. Each attack is tried and does no harm: the shadow purse
//! equals the card and the ledger sums to zero.

#[macro_use]
mod common;

use charging::api::{Auth, Role, TokenEntry};
use charging::clearing::{self, ClearingBatch, ClearingTap, REJECTED_EXAMPLES_MAX};
use charging::franchise::{self, FranchiseConfig, ReportedLoad};
use charging::funding::{FundingSource, SandboxProcessor};
use charging::ledger::{card_account, Ledger, LedgerError};
use charging::load::{LoadConfig, LoadError, LoadRequest, LoadService, Reply};
use common::HsmKind;
use purse::apdu::ins;
use purse::card::{Card, Personalisation};
use purse::keys::{KeyKind, KeySet};
use purse::receipt::CommitReceipt;
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::{Arc, Mutex};
use tapgate_testkit::charging::relay_in_process;
use tapgate_testkit::fixtures::{assert_boundary, value_tx};
use tapgate_testkit::http;

const T0: u64 = 1_700_000_000_000;

struct World {
    _dir: tempfile::TempDir,
    svc: LoadService,
    /// The same HSM kind, for clearing and franchise reports.
    hsm: Mutex<Box<dyn Hsm + Send>>,
    /// Personalises cards (the issuer's side).
    issuer: SoftwareHsm,
    keys: KeySet,
    now: u64,
}

fn world(kind: HsmKind) -> World {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(1414));
    let ledger = Ledger::open(&dir.path().join("ledger"), 64 << 20).unwrap();
    let processor = Arc::new(SandboxProcessor::open(&dir.path().join("processor")).unwrap());
    let svc = LoadService::new(
        ledger,
        common::hsm(kind, &keys),
        vec![processor as Arc<dyn FundingSource>],
        LoadConfig::default(),
    );
    svc.register_instrument("alice", "card", "tok_visa", T0)
        .unwrap();
    World {
        _dir: dir,
        svc,
        hsm: Mutex::new(common::hsm(kind, &keys)),
        issuer: SoftwareHsm::new(&keys).unwrap(),
        keys,
        now: T0,
    }
}

impl World {
    fn card(&self, n: u8) -> Card {
        let uid = [0x04, 0x14, n, 2, 3, 4, 5];
        self.svc.register_card(&uid, 0, self.now).unwrap();
        Card::personalise(
            &Personalisation::transit(uid, 0),
            self.issuer.card_keys(&uid, 1).unwrap(),
        )
    }

    fn relay(&mut self, card: &mut Card, reply: Reply) -> Reply {
        relay_in_process(&self.svc, "alice", card, reply, &mut self.now, 5, None)
            .expect("a relay step")
            .0
    }

    fn load(&mut self, card: &mut Card, amount: i32, key: &str) -> u32 {
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
        match self.relay(card, r) {
            Reply::Completed { tmc, .. } => tmc,
            other => panic!("not completed: {other:?}"),
        }
    }

    fn reverse(&mut self, card: &mut Card, load_tmc: u32, key: &str) -> u32 {
        let r = self
            .svc
            .start_reversal(
                "alice",
                false,
                card.state().uid,
                load_tmc,
                key.into(),
                self.now,
            )
            .unwrap();
        match self.relay(card, r) {
            Reply::Completed { tmc, .. } => tmc,
            other => panic!("not completed: {other:?}"),
        }
    }

    fn balance(&self, account: &str) -> i64 {
        let l = self.svc.ledger();
        let r = l.read().unwrap();
        r.balance(account).unwrap()
    }

    /// Double entry: every account together sums to zero.
    fn ledger_sums_to_zero(&self) {
        let l = self.svc.ledger();
        let r = l.read().unwrap();
        let sum: i128 = r
            .balances()
            .unwrap()
            .iter()
            .map(|(_, b)| i128::from(*b))
            .sum();
        assert_eq!(sum, 0);
    }

    fn conserved(&self, card: &Card) {
        assert_eq!(
            self.balance(&card_account(&card.state().uid)),
            i64::from(card.state().balance_minor),
            "the shadow purse equals the card"
        );
        self.ledger_sums_to_zero();
    }

    fn report(&self, franchise: &FranchiseConfig, r: &CommitReceipt) -> franchise::ReportOutcome {
        let load = ReportedLoad {
            card_uid: hex::encode_upper(r.uid()),
            tmc: r.tmc(),
            amount_minor: r.amount_minor(),
            balance_after_minor: r.balance_after_minor(),
            tmv: hex::encode_upper(r.tmv()),
            key_version: r.key_version(),
        };
        franchise::report_loads(self.svc.ledger(), &self.hsm, franchise, &[load], self.now).unwrap()
    }
}

fn shop(name: &str, device_id: u32) -> FranchiseConfig {
    FranchiseConfig {
        name: name.into(),
        device_id,
        max_exposure_minor: 100_000,
    }
}

/// Item 5: the online load's credit replayed as a franchise load is refused (its transaction
/// MAC carries no franchise SAM's reader id, and its counter is booked); one franchise's load
/// cannot be reported by another; a franchise's own load is booked once.
fn a_franchise_cannot_report_an_online_load_or_another_franchises_load(kind: HsmKind) {
    let mut w = world(kind);
    let mut card = w.card(1);
    let corner = shop("corner-shop", 7001);
    let kiosk = shop("kiosk", 7002);

    let load_tmc = w.load(&mut card, 500, "l1");
    let online = CommitReceipt::for_tests(
        card.state().uid,
        load_tmc,
        card.state().tmv,
        purse::receipt::TxKind::Credit,
        500,
        500,
    );
    let out = w.report(&corner, &online);
    assert_eq!(
        (out.accepted, out.rejected.len()),
        (0, 1),
        "the server's own load is not the franchise's: {out:?}"
    );
    assert_eq!(w.balance("franchise:corner-shop"), 0);
    w.conserved(&card);

    // The shop's SAM loads 200; another franchise claims it; the shop reports it twice.
    let mut sam = SoftwareSam::franchise(&w.keys, 7001, 1_000).unwrap();
    let own = value_tx(&mut sam, &mut card, KeyKind::Credit, ins::CREDIT, 200).unwrap();
    let out = w.report(&kiosk, &own);
    assert_eq!((out.accepted, out.rejected.len()), (0, 1), "{out:?}");
    assert_eq!(w.report(&corner, &own).accepted, 1);
    let again = w.report(&corner, &own);
    assert_eq!((again.accepted, again.duplicates), (0, 1));
    assert_eq!(w.balance("franchise:corner-shop"), -200);
    assert_eq!(w.balance("franchise:kiosk"), 0);
    assert_eq!(card.state().balance_minor, 700);
    w.conserved(&card);
}

/// Item 6: after a reversal, a terminal holding the debit key cannot give the reversed value
/// back (the card refuses); and a limited credit right after a reversal — from a card that
/// would not refuse it — is not booked by clearing: an anomaly, and the card is blocked.
fn a_reversal_cannot_be_credited_back_by_a_debit_key_holder(kind: HsmKind) {
    let mut w = world(kind);
    let mut card = w.card(2);
    let load_tmc = w.load(&mut card, 500, "l1");
    let rev_tmc = w.reverse(&mut card, load_tmc, "r1");
    assert_eq!((card.state().balance_minor, rev_tmc), (0, load_tmc + 1));
    assert_eq!(card.state().limited_credit_minor, 0);
    w.conserved(&card);

    let mut validator = SoftwareSam::validator(&w.keys, 1001).unwrap();
    let r = value_tx(
        &mut validator,
        &mut card,
        KeyKind::Debit,
        ins::LIMITED_CREDIT,
        500,
    );
    assert_boundary(&r);
    assert_eq!(card.state().balance_minor, 0);
    w.conserved(&card);

    // A card that armed the allowance anyway (older firmware, a fault): clearing refuses.
    let mut nvm = card.nvm().clone();
    nvm.main.limited_credit_minor = 500;
    let mut odd = Card::power_on(nvm, w.issuer.card_keys(&card.state().uid, 1).unwrap());
    let lc = value_tx(
        &mut validator,
        &mut odd,
        KeyKind::Debit,
        ins::LIMITED_CREDIT,
        500,
    )
    .unwrap();
    let operator_before = w.balance("operator:default");
    let out = clearing::clear_batch(
        w.svc.ledger(),
        &w.hsm,
        ClearingBatch {
            batch_id: "gw-1-1".into(),
            taps: vec![ClearingTap {
                device_id: 1001,
                device_seq: 1,
                card_uid: hex::encode_upper(lc.uid()),
                tmc: lc.tmc(),
                kind: "limited_credit".into(),
                amount_minor: lc.amount_minor(),
                balance_after_minor: lc.balance_after_minor(),
                tmv: hex::encode_upper(lc.tmv()),
                key_version: lc.key_version(),
                operator: None,
                device_time_ms: w.now,
                ..Default::default()
            }],
        },
        w.now,
    )
    .unwrap();
    assert_eq!(out.cleared, 0, "{out:?}");
    assert_eq!(out.cards_blocked, 1);
    assert!(out
        .anomalies
        .iter()
        .any(|a| a.kind == "limited_credit_after_reversal"));
    assert_eq!(w.balance("operator:default"), operator_before);
    assert_eq!(w.balance(&card_account(&card.state().uid)), 0);
    w.ledger_sums_to_zero();
    let l = w.svc.ledger();
    assert!(l.read().unwrap().card(&card.state().uid).unwrap().blocked);
}

both_hsms!(
    a_franchise_cannot_report_an_online_load_or_another_franchises_load,
    a_reversal_cannot_be_credited_back_by_a_debit_key_holder,
);

/// Item 11: a batch of 10 000 forged taps is counted per device, and only a bounded number of
/// them is stored (as anomalies and in the stored batch answer) — not 10 000 rows twice.
#[test]
fn a_batch_of_forged_taps_is_stored_as_a_bounded_summary() {
    let w = world(HsmKind::Software);
    let taps: Vec<ClearingTap> = (0..clearing::BATCH_MAX_TAPS as u64)
        .map(|i| ClearingTap {
            device_id: 1001 + (i % 2) as u32,
            device_seq: i + 1,
            card_uid: "04141414141414".into(),
            tmc: (i + 1) as u32,
            kind: "debit".into(),
            amount_minor: 100,
            balance_after_minor: 1_000,
            tmv: "00112233445566FF".into(),
            key_version: 1,
            operator: None,
            device_time_ms: T0,
            ..Default::default()
        })
        .collect();
    let out = clearing::clear_batch(
        w.svc.ledger(),
        &w.hsm,
        ClearingBatch {
            batch_id: "gw-1-10000".into(),
            taps,
        },
        T0,
    )
    .unwrap();
    assert_eq!(out.cleared, 0);
    assert_eq!(out.anomalies.len(), REJECTED_EXAMPLES_MAX);
    let mut counts: Vec<(u32, String, u32)> = out
        .rejected
        .iter()
        .map(|r| (r.device_id, r.kind.clone(), r.count))
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        vec![
            (1001, "forged_tmac".into(), 5_000),
            (1002, "forged_tmac".into(), 5_000)
        ]
    );
    let l = w.svc.ledger();
    let r = l.read().unwrap();
    let (rows, last) = r.anomalies(0, 100_000).unwrap();
    assert_eq!(last as usize, rows.len());
    assert!(
        rows.len() <= REJECTED_EXAMPLES_MAX + 2,
        "{} anomaly rows",
        rows.len()
    );
    assert!(rows
        .iter()
        .any(|(_, a)| a.detail.contains("5000 forged_tmac")));
    let stored = r.idempotent("clearing-batch:gw-1-10000").unwrap().unwrap();
    assert!(
        stored.to_string().len() < 16 * 1024,
        "the stored answer is bounded"
    );
    drop(r);
    w.ledger_sums_to_zero();
}

/// Item 9: money and counters never wrap.
#[test]
fn money_and_counters_never_wrap_at_their_edges() {
    let w = world(HsmKind::Software);
    // A card's balance is an i32: 4 294 967 396 is refused, not booked as one and held as 100.
    let uid = [0x04, 0x14, 9, 9, 9, 9, 9];
    assert!(matches!(
        w.svc.register_card(&uid, 4_294_967_396, T0),
        Err(LoadError::BadRequest(_))
    ));
    let l = w.svc.ledger();
    assert!(!l.read().unwrap().card_known(&uid).unwrap());
    assert_eq!(w.balance(&card_account(&uid)), 0);

    // Postings that would overflow an account are refused and change nothing.
    l.transact(|t| t.post(T0, "a", "b", i64::MAX, "p1").map(|_| ()))
        .unwrap();
    let e = l
        .transact(|t| t.post(T0, "a", "b", i64::MAX, "p2").map(|_| ()))
        .unwrap_err();
    assert!(matches!(e, LedgerError::InvalidPosting(_)), "{e}");
    assert_eq!((w.balance("a"), w.balance("b")), (-i64::MAX, i64::MAX));

    // The blocklist after the last possible version: nothing, not everything from 0.
    let r = l.read().unwrap();
    let (changes, _) = r.block_changes(u64::MAX, 10).unwrap();
    assert!(changes.is_empty());
}

const OPS: &str = "tg_ops_token";
const SHOP: &str = "tg_shop_token";

/// Item 9 over HTTP: two payments of i64::MAX do not wrap a franchise's outstanding; a card of
/// 4 294 967 396 is refused; `?after=u64::MAX` on the blocklist delta signs nothing.
#[test]
fn hostile_amounts_over_http_are_refused_without_wrapping() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(99));
    let srv = common::start(&keys, |cfg| {
        cfg.tokens = vec![
            TokenEntry {
                name: "ops".into(),
                role: Role::Operator,
                sha256: Auth::hash_token(OPS),
            },
            TokenEntry {
                name: "corner-shop".into(),
                role: Role::Partner,
                sha256: Auth::hash_token(SHOP),
            },
        ];
        cfg.franchises = vec![shop("corner-shop", 7001)];
    });
    let base = &srv.base;
    let (code, body) = common::post(
        &format!("{base}/v1/cards"),
        OPS,
        serde_json::json!({"card_uid": "04141414141401", "personalised_minor": 4_294_967_396i64}),
    );
    assert_eq!(code, 400, "{body}");
    // An owner the ledger cannot index by (a NUL character, over 256 bytes) is refused before
    // the card is registered.
    for owner in ["rider\u{0}1".to_string(), "r".repeat(257)] {
        let (code, body) = common::post(
            &format!("{base}/v1/cards"),
            OPS,
            serde_json::json!({"card_uid": "04141414141403", "personalised_minor": 0, "owner": owner}),
        );
        assert_eq!(code, 400, "{body}");
    }
    let (code, body) = http::get(&format!("{base}/v1/cards/04141414141403"), OPS);
    assert_eq!(code, 404, "{body}");

    // The shop owes 501 for a load it reports.
    let issuer = SoftwareHsm::new(&keys).unwrap();
    let uid = [0x04, 0x14, 0x14, 0x14, 0x14, 0x14, 0x02];
    let mut card = Card::personalise(
        &Personalisation::transit(uid, 0),
        issuer.card_keys(&uid, 1).unwrap(),
    );
    let mut sam = SoftwareSam::franchise(&keys, 7001, 1_000).unwrap();
    let r = value_tx(&mut sam, &mut card, KeyKind::Credit, ins::CREDIT, 501).unwrap();
    let (code, out) = common::post(
        &format!("{base}/v1/franchise/loads"),
        SHOP,
        serde_json::json!({"loads": [{
            "card_uid": hex::encode_upper(r.uid()), "tmc": r.tmc(), "amount_minor": 501,
            "balance_after_minor": 501, "tmv": hex::encode_upper(r.tmv()), "key_version": 1,
        }]}),
    );
    assert_eq!((code, out["accepted"].as_u64()), (200, Some(1)), "{out}");
    for reference in ["max-1", "max-2"] {
        let (code, body) = common::post(
            &format!("{base}/v1/franchises/corner-shop/payments"),
            OPS,
            serde_json::json!({"amount_minor": i64::MAX, "reference": reference}),
        );
        assert_eq!(code, 400, "{body}");
    }
    let (code, status) = http::get(&format!("{base}/v1/franchises/corner-shop"), OPS);
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["outstanding_minor"], 501);

    // A block exists; the delta after u64::MAX is empty (204), not a signed list from 0.
    let l = srv.state.loads.ledger();
    l.transact(move |t| t.set_blocked(&uid, true, "lost", T0).map(|_| ()))
        .unwrap();
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
