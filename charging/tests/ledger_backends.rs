//! The ledger's behaviour through its interface, the same test run on each backend (LMDB and
//! PostgreSQL, a throwaway cluster and database per test), and what only the database backend
//! has: exactly-once under concurrent transactions, retried conflicts, the schema check, the
//! migrations, a refused connection.

use charging::clearing::{clear_batch, ClearingBatch};
use charging::ledger::postgres::{self, MIGRATIONS};
use charging::ledger::*;
use charging::load::{LoadConfig, LoadRequest, LoadService, Reply};
use purse::apdu::ins;
use purse::keys::{KeyKind, KeySet};
use purse::sam::{SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;
use tapgate_testkit::charging::{authorised_load, load_service_on, relay_in_process};
use tapgate_testkit::fixtures::{clearing_tap, transit_card, value_tx};
use tapgate_testkit::postgres::TestDb;

const T0: u64 = 1_700_000_000_000;

/// A backend under test; the cluster (for PostgreSQL) lives as long as it.
struct Under {
    ledger: Option<Ledger>,
    _dir: tempfile::TempDir,
    db: Option<TestDb>,
}

impl Under {
    fn lmdb() -> Under {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger"), 64 << 20).unwrap();
        Under {
            ledger: Some(ledger),
            _dir: dir,
            db: None,
        }
    }

    fn postgres() -> Under {
        let db = TestDb::start();
        let cfg = PgConfig::new(&db.url, Some(db.password()));
        assert_eq!(postgres::migrate(&cfg).unwrap().len(), MIGRATIONS.len());
        let ledger = Ledger::open_postgres(cfg).unwrap();
        Under {
            ledger: Some(ledger),
            _dir: tempfile::tempdir().unwrap(),
            db: Some(db),
        }
    }

    fn ledger(&self) -> &Ledger {
        self.ledger.as_ref().unwrap()
    }
}

impl Drop for Under {
    fn drop(&mut self) {
        if let Some(l) = self.ledger.take() {
            l.close();
        }
    }
}

/// `backends!(f, …)`: for each `fn f(u: &Under)`, the tests `f::lmdb` and `f::postgres`.
macro_rules! backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn lmdb() {
                    super::$name(&super::Under::lmdb());
                }
                #[test]
                fn postgres() {
                    super::$name(&super::Under::postgres());
                }
            }
        )*
    };
}

backends!(
    postings_balance_to_zero_and_cards_move_only_on_proofs,
    one_intent_per_card_counter,
    concurrent_transactions_keep_each_callers_writes_and_roll_back_only_failures,
    blocks_and_anomalies_are_numbered_without_gaps,
    a_card_s_block_changes_and_anomalies_are_read_per_card,
    records_round_trip,
    a_gap_is_swept_once_and_a_block_lifts_when_it_fills,
    a_load_and_a_cleared_tap_end_to_end,
    cards_are_read_in_pages_in_uid_byte_order,
    reconciliation_in_pages_reports_as_in_one,
    cards_are_listed_by_owner,
    blocked_cards_are_read_from_their_index,
);

fn postings_balance_to_zero_and_cards_move_only_on_proofs(u: &Under) {
    let l = u.ledger();
    l.transact(move |t| {
        t.post(1, "issuer:float", "wallet:01", 1_000, "issue:01")?;
        t.post(2, "funding:card", "wallet:01", 500, "load:01:1")?;
        t.post(3, "wallet:01", "operator:metro", 120, "tap:01:2")?;
        for (from, to) in [("funding:card", "card:01"), ("card:01", "operator:metro")] {
            assert!(matches!(
                t.post(4, from, to, 1, "x"),
                Err(LedgerError::CardAccount { account }) if account == "card:01"
            ));
        }
        assert!(t.post(4, "a", "a", 1, "x").is_err());
        assert!(t.post(4, "a", "b", 0, "x").is_err());
        // A balance that would leave i64 is refused, and the transaction goes on.
        t.post(5, "big:a", "big:b", i64::MAX, "max")?;
        assert!(matches!(
            t.post(5, "big:a", "big:b", i64::MAX, "max"),
            Err(LedgerError::InvalidPosting(_))
        ));
        t.post(6, "big:b", "big:a", i64::MAX, "back")?;
        Ok(())
    })
    .unwrap();
    // A failing transaction leaves nothing.
    let r = l.transact(move |t| {
        t.post(7, "funding:card", "wallet:01", 9, "lost")?;
        Err::<(), _>(LedgerError::InvalidPosting("injected"))
    });
    assert!(r.is_err());
    let r = l.read().unwrap();
    assert_eq!(r.balance("wallet:01").unwrap(), 1_380);
    assert_eq!(r.balance("card:01").unwrap(), 0);
    let sum: i64 = r.balances().unwrap().iter().map(|(_, b)| b).sum();
    assert_eq!(sum, 0);
    let loads = r.postings_with_prefix("load:").unwrap();
    assert_eq!(loads.len(), 1);
    assert_eq!(
        (
            loads[0].from.as_str(),
            loads[0].to.as_str(),
            loads[0].amount_minor
        ),
        ("funding:card", "wallet:01", 500)
    );
    assert!(r.postings_with_prefix("lost").unwrap().is_empty());
}

fn intent(uid: [u8; 7], tmc_before: u32) -> LoadIntent {
    LoadIntent {
        funding_source: "card".into(),
        funding_auth: "auth_1".into(),
        instrument: "tok_visa".into(),
        ..authorised_load(uid, tmc_before, 10, 100, T0)
    }
}

fn one_intent_per_card_counter(u: &Under) {
    let l = u.ledger();
    let uid = [1u8; 7];
    l.transact(move |t| {
        let mut first = intent(uid, 4);
        t.insert_intent(&uid, &mut first)?;
        assert!(matches!(
            t.insert_intent(&uid, &mut intent(uid, 4)),
            Err(LedgerError::IntentExists { .. })
        ));
        t.insert_intent(&uid, &mut intent(uid, 5))?;
        t.insert_intent(&[2u8; 7], &mut intent([2u8; 7], 4))?;
        // Once voided, the counter takes a new attempt.
        assert!(matches!(
            t.void_intent(&uid, 4, T0 + 1)?,
            Some(FundingAction::Release { .. })
        ));
        let mut retry = intent(uid, 4);
        t.insert_intent(&uid, &mut retry)?;
        assert_eq!(retry.attempt, 1);
        assert_eq!(t.intent(&uid, 4)?.unwrap().attempt, 1);
        Ok(())
    })
    .unwrap();
    let r = l.read().unwrap();
    assert_eq!(r.open_intents(&uid).unwrap().len(), 2);
    assert_eq!(r.all_intents().unwrap().len(), 4);
    assert_eq!(
        r.intent(&uid, 4).unwrap().unwrap().state,
        IntentState::Authorised
    );
}

fn concurrent_transactions_keep_each_callers_writes_and_roll_back_only_failures(u: &Under) {
    let l = u.ledger();
    std::thread::scope(|scope| {
        for i in 0..8u64 {
            let l = l.clone();
            scope.spawn(move || {
                for j in 0..20u64 {
                    let ok = l.transact(move |t| {
                        t.post(
                            0,
                            "funding:card",
                            &format!("wallet:{i}"),
                            10,
                            &format!("load:{i}:{j}"),
                        )?;
                        if j % 10 == 9 {
                            return Err(LedgerError::InvalidPosting("injected"));
                        }
                        Ok(())
                    });
                    assert_eq!(ok.is_ok(), j % 10 != 9, "{ok:?}");
                }
            });
        }
    });
    let r = l.read().unwrap();
    for i in 0..8u64 {
        assert_eq!(r.balance(&format!("wallet:{i}")).unwrap(), 180);
    }
    assert_eq!(r.balance("funding:card").unwrap(), -8 * 180);
    assert_eq!(r.postings_with_prefix("load:").unwrap().len(), 8 * 18);
}

fn blocks_and_anomalies_are_numbered_without_gaps(u: &Under) {
    let l = u.ledger();
    let (a, b) = ([4u8; 7], [5u8; 7]);
    let versions = l
        .transact(move |t| {
            let v1 = t.set_blocked(&a, true, "lost", T0)?;
            let again = t.set_blocked(&a, true, "lost", T0)?;
            let v2 = t.set_blocked(&b, true, "stolen", T0)?;
            let v3 = t.set_blocked(&a, false, "found", T0 + 1)?;
            Ok((v1, again, v2, v3))
        })
        .unwrap();
    assert_eq!(versions, (Some(1), None, Some(2), Some(3)));
    // A failed transaction takes no number.
    let _ = l.transact(move |t| {
        t.set_blocked(&b, false, "x", T0)?;
        Err::<(), _>(LedgerError::InvalidPosting("injected"))
    });
    let anomaly = move |n: u32| Anomaly {
        kind: "clone".into(),
        card_uid: hex::encode_upper(a),
        tmc: n,
        device_id: 7,
        device_seq: u64::from(n),
        detail: format!("#{n}"),
    };
    let numbers = l
        .transact(move |t| {
            Ok((
                t.record_anomaly(&anomaly(1))?,
                t.record_anomaly(&anomaly(2))?,
            ))
        })
        .unwrap();
    assert_eq!(numbers, (1, 2));
    let r = l.read().unwrap();
    let (changes, latest) = r.block_changes(0, 10).unwrap();
    assert_eq!(latest, 3);
    assert_eq!(
        changes.iter().map(|c| c.version).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(changes[2].action, "unblock");
    assert_eq!(r.block_changes(2, 10).unwrap().0.len(), 1);
    assert_eq!(r.block_changes(u64::MAX, 10).unwrap(), (vec![], 3));
    // A card's latest change, through the per-card index: a's unblocking (not its block, nor
    // b's later-numbered block), b's block, none for a card never blocked.
    assert_eq!(
        r.latest_block_change(&a).unwrap().as_ref(),
        Some(&changes[2])
    );
    assert_eq!(
        r.latest_block_change(&b).unwrap().as_ref(),
        Some(&changes[1])
    );
    assert_eq!(r.latest_block_change(&[6u8; 7]).unwrap(), None);
    if let Some(db) = &u.db {
        // PostgreSQL answers it from the card's index (migration 4), one probe.
        let plan = db
            .cluster
            .psql(
                db.name(),
                "SET enable_seqscan = off; EXPLAIN SELECT version FROM block_changes \
                 WHERE card_uid = '04040404040404' ORDER BY version DESC LIMIT 1",
            )
            .unwrap();
        assert!(
            plan.contains("Index") && plan.contains("block_changes_card"),
            "{plan}"
        );
    }
    let (list, last) = r.anomalies(1, 10).unwrap();
    assert_eq!(last, 2);
    assert_eq!(list, vec![(2, anomaly(2))]);
    assert!(r.card(&a).unwrap().block_reason.is_none());
    assert!(r.card(&b).unwrap().blocked);
}

/// The console's card page reads one card's changes through the per-card index (newest first,
/// at most a limit) and its anomalies among the newest N (a bounded reverse scan).
fn a_card_s_block_changes_and_anomalies_are_read_per_card(u: &Under) {
    let l = u.ledger();
    let (a, b, never) = ([4u8; 7], [5u8; 7], [6u8; 7]);
    let anomaly = move |uid: String, n: u32| Anomaly {
        kind: "clone".into(),
        card_uid: uid,
        tmc: n,
        device_id: 7,
        device_seq: u64::from(n),
        detail: format!("#{n}"),
    };
    let (ah, bh) = (hex::encode_upper(a), hex::encode_upper(b));
    let ah2 = ah.clone();
    l.transact(move |t| {
        t.set_blocked(&a, true, "lost", T0)?;
        t.set_blocked(&b, true, "stolen", T0)?;
        t.set_blocked(&a, false, "found", T0 + 1)?;
        t.set_blocked(&a, true, "lost again", T0 + 2)?;
        t.record_anomaly(&anomaly(ah2.clone(), 1))?;
        t.record_anomaly(&anomaly(bh.clone(), 2))?;
        // A UID stored in lower case is still the card's.
        t.record_anomaly(&anomaly(ah2.to_lowercase(), 3))?;
        t.record_anomaly(&anomaly(ah2.clone(), 4))?;
        Ok(())
    })
    .unwrap();
    let r = l.read().unwrap();
    let versions = |uid: &[u8; 7], limit| {
        let changes = r.card_block_changes(uid, limit).unwrap();
        changes.iter().map(|c| c.version).collect::<Vec<_>>()
    };
    assert_eq!(versions(&a, 10), [4, 3, 1]);
    assert_eq!(versions(&a, 2), [4, 3]);
    assert_eq!(versions(&b, 10), [2]);
    assert!(versions(&never, 10).is_empty());
    assert_eq!(r.card_block_changes(&a, 1).unwrap()[0].reason, "lost again");
    let seqs = |uid: &[u8; 7], within| {
        let found = r.card_anomalies(uid, within).unwrap();
        found.iter().map(|(seq, _)| *seq).collect::<Vec<_>>()
    };
    assert_eq!(seqs(&a, 10), [4, 3, 1]);
    assert_eq!(r.card_anomalies(&a, 10).unwrap()[2], (1, anomaly(ah, 1)));
    // Only the newest `within` are looked through: b's (number 2) is not among the newest 2.
    assert_eq!(seqs(&a, 2), [4, 3]);
    assert!(seqs(&b, 2).is_empty());
    assert_eq!(seqs(&b, u64::MAX), [2]);
    assert!(seqs(&never, 10).is_empty());
    assert!(seqs(&a, 0).is_empty());
}

fn records_round_trip(u: &Under) {
    let l = u.ledger();
    let uid = [6u8; 7];
    let voucher = Voucher {
        code: "V1".into(),
        partner: "shop".into(),
        order_id: "o1".into(),
        kind: "load".into(),
        amount_minor: 500,
        card_uid: None,
        expires_ms: T0 + 10,
        state: "issued".into(),
        held_by: None,
        issued_ms: T0,
    };
    let instrument = |id: &str, owner: &str| Instrument {
        source: "card".into(),
        id: id.into(),
        owner: owner.into(),
        registered_by: owner.into(),
        registered_ms: T0,
    };
    let notification = |id: &str, due: u64| Notification {
        payment_id: id.into(),
        url: "https://shop.example/n".into(),
        attempts: 0,
        next_attempt_ms: due,
        delivered_ms: None,
        last_error: None,
    };
    let v = voucher.clone();
    let (i1, i2, i3) = (
        instrument("tok_a", "alice"),
        instrument("tok_b", "alice"),
        instrument("tok_c", "bob"),
    );
    let (n1, n2) = (notification("p2", T0 + 5), notification("p1", T0 + 9));
    l.transact(move |t| {
        assert!(t.issue_card(&uid, 1_000, "issue:06", T0)?);
        assert!(!t.issue_card(&uid, 1_000, "issue:06", T0)?);
        t.set_owner(&uid, "alice")?;
        t.add_load_day(&uid, 3, 250)?;
        t.put_voucher(&v)?;
        t.put_idempotent("batch:gw:b1", &serde_json::json!({"booked": 3}))?;
        t.put_instrument(&i1)?;
        t.put_instrument(&i2)?;
        t.put_instrument(&i3)?;
        t.add_funding_day(FundingDay::new("card", "tok_a", 3), 400)?;
        t.add_funding_day(FundingDay::new("card", "tok_a", 3), -100)?;
        t.put_notification(&n1)?;
        t.put_notification(&n2)?;
        Ok(())
    })
    .unwrap();
    let r = l.read().unwrap();
    let c = r.card(&uid).unwrap();
    assert_eq!(c.owner.as_deref(), Some("alice"));
    assert_eq!((c.load_day, c.load_day_minor), (3, 250));
    assert_eq!(c.booked_balance_minor, Some(1_000));
    assert!(r.card_known(&uid).unwrap());
    assert!(!r.card_known(&[7u8; 7]).unwrap());
    assert_eq!(r.card(&[7u8; 7]).unwrap(), CardShadow::default());
    assert_eq!(r.balance(&card_account(&uid)).unwrap(), 1_000);
    assert_eq!(r.all_cards().unwrap().len(), 1);
    assert_eq!(r.voucher("V1").unwrap(), Some(voucher));
    assert_eq!(r.voucher("V2").unwrap(), None);
    assert_eq!(
        r.idempotent("batch:gw:b1").unwrap(),
        Some(serde_json::json!({"booked": 3}))
    );
    assert_eq!(r.idempotent("batch:gw:b2").unwrap(), None);
    assert_eq!(r.instrument("card", "tok_c").unwrap().unwrap().owner, "bob");
    assert_eq!(r.instruments_of("alice").unwrap().len(), 2);
    assert_eq!(
        r.funding_day_total(FundingDay::new("card", "tok_a", 3))
            .unwrap(),
        300
    );
    assert_eq!(
        r.funding_day_total(FundingDay::new("card", "tok_a", 4))
            .unwrap(),
        0
    );
    let due = r.notifications_due(T0 + 9, 10).unwrap();
    assert_eq!(
        due.iter()
            .map(|n| n.payment_id.as_str())
            .collect::<Vec<_>>(),
        ["p2", "p1"],
        "earliest due first"
    );
    assert_eq!(r.notifications_due(T0 + 6, 10).unwrap().len(), 1);
    assert!(r.notification("p1").unwrap().is_some());
}

/// A validator's debit of `amount` on `card`, proved by its SAM.
fn debit(
    sam: &mut SoftwareSam,
    card: &mut purse::card::Card,
    amount: i32,
) -> purse::receipt::CommitReceipt {
    value_tx(sam, card, KeyKind::Debit, ins::DEBIT, amount).unwrap()
}

fn service(ledger: Ledger, keys: &KeySet, dir: &std::path::Path) -> LoadService {
    load_service_on(ledger, keys, dir, LoadConfig::default()).0
}

fn a_gap_is_swept_once_and_a_block_lifts_when_it_fills(u: &Under) {
    const HOUR: u64 = 3_600_000;
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(11));
    let svc = service(u.ledger().clone(), &keys, dir.path());
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let a = [0x04, 0xA0, 1, 2, 3, 4, 5];
    svc.register_card(&a, 1_000, T0).unwrap();
    let mut card = transit_card(&hsm, a, 1_000);
    let (a1, a2, a3) = (
        debit(&mut sam, &mut card, 100),
        debit(&mut sam, &mut card, 200),
        debit(&mut sam, &mut card, 50),
    );
    let batch = |id: &str, taps| ClearingBatch {
        batch_id: id.into(),
        taps,
    };
    let out = clear_batch(
        svc.ledger(),
        svc.hsm(),
        batch("b1", vec![clearing_tap(&a1, 1), clearing_tap(&a3, 3)]),
        T0,
    )
    .unwrap();
    assert!(out.anomalies.is_empty(), "{out:?}");
    // The same batch again books nothing twice.
    clear_batch(
        svc.ledger(),
        svc.hsm(),
        batch("b1", vec![clearing_tap(&a1, 1), clearing_tap(&a3, 3)]),
        T0,
    )
    .unwrap();
    let sweep = |now| {
        svc.ledger()
            .transact(move |t| t.sweep_gaps(now, 72 * HOUR))
            .unwrap()
    };
    assert_eq!(sweep(T0 + HOUR), Default::default());
    let s = sweep(T0 + 73 * HOUR);
    assert_eq!(s.anomalies.len(), 1);
    assert_eq!(
        (s.anomalies[0].kind.as_str(), s.anomalies[0].tmc),
        ("counter_gap", 2)
    );
    assert!(s.anomalies[0]
        .detail
        .contains("200 minor units of debits never cleared"));
    assert_eq!(s.cards_blocked, 0);
    assert_eq!(sweep(T0 + 100 * HOUR), Default::default(), "reported once");
    clear_batch(
        svc.ledger(),
        svc.hsm(),
        batch("b2", vec![clearing_tap(&a2, 2)]),
        T0 + 100 * HOUR,
    )
    .unwrap();
    let r = svc.ledger().read().unwrap();
    assert_eq!(
        r.postings_with_prefix("tap:").unwrap().len(),
        3,
        "each tap once"
    );
    assert_eq!(r.balance("operator:metro").unwrap(), 350);
    assert_eq!(r.balance(&card_account(&a)).unwrap(), 650);
    let shadow = r.card(&a).unwrap();
    assert_eq!(
        (shadow.booked_through_tmc, shadow.booked_balance_minor),
        (3, Some(650))
    );
    drop(r);
    let report = charging::reconcile::reconcile(svc.ledger()).unwrap();
    assert_eq!((report.cards, report.balanced), (1, 1), "{report:?}");
}

/// UIDs whose bytes' order is not the order they are issued in, with last bytes across the
/// hex digits' `9`/`A` and `F`/`1` edges (a text order that put letters first would differ).
const PAGED_UIDS: [[u8; 7]; 12] = [
    [0x04, 0, 0, 0, 0, 0, 0xA0],
    [0x04, 0, 0, 0, 0, 0, 0x09],
    [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
    [0x04, 0, 0, 0, 0, 0, 0x0A],
    [0x04, 0, 0, 0, 0, 0, 0x9F],
    [0x00, 0, 0, 0, 0, 0, 0x01],
    [0x04, 0, 0, 0, 0, 0, 0x10],
    [0x04, 0, 0, 0, 0, 0, 0x0F],
    [0x04, 0, 0, 0, 0, 0x01, 0x00],
    [0x04, 0, 0, 0, 0, 0, 0xFF],
    [0x3A, 0x99, 0, 0, 0, 0, 0],
    [0x04, 0, 0, 0, 0, 0, 0x00],
];

fn issue_paged_cards(l: &Ledger) {
    l.transact(|t| {
        for (i, uid) in PAGED_UIDS.iter().enumerate() {
            t.issue_card(uid, 1_000 + i as i32, &format!("issue:{i}"), T0)?;
        }
        Ok(())
    })
    .unwrap();
}

fn cards_are_read_in_pages_in_uid_byte_order(u: &Under) {
    let l = u.ledger();
    issue_paged_cards(l);
    let r = l.read().unwrap();
    let all = r.all_cards().unwrap();
    let mut sorted = PAGED_UIDS.to_vec();
    sorted.sort();
    assert_eq!(all.iter().map(|c| c.0).collect::<Vec<_>>(), sorted);
    assert_eq!(r.cards_after(None, usize::MAX).unwrap(), all);
    // Every page size, a boundary falling between any two cards: the pages put together are
    // every card, each once, in order.
    for limit in 1..=all.len() + 1 {
        let (mut walked, mut pages, mut after) = (Vec::new(), 0, None);
        loop {
            let page = r.cards_after(after, limit).unwrap();
            assert!(page.len() <= limit);
            let Some(&(last, _)) = page.last() else {
                break;
            };
            pages += 1;
            after = Some(last);
            walked.extend(page);
        }
        assert_eq!(walked, all, "pages of {limit}");
        assert_eq!(pages, all.len().div_ceil(limit), "pages of {limit}");
    }
    // `after` need not be a card: the page starts at the next card up.
    let between = [0x04, 0, 0, 0, 0, 0, 0x0B];
    let next = all.iter().position(|c| c.0 > between).unwrap();
    assert_eq!(all[next].0, [0x04, 0, 0, 0, 0, 0, 0x0F]);
    assert_eq!(
        r.cards_after(Some(between), 2).unwrap(),
        all[next..next + 2].to_vec()
    );
    assert_eq!(r.cards_after(Some([0; 7]), 1).unwrap(), all[..1].to_vec());
    assert!(r.cards_after(Some([0xFF; 7]), 5).unwrap().is_empty());
    assert!(r.cards_after(None, 0).unwrap().is_empty());
    drop(r);
    // Inside a transaction, a card it wrote is in its pages.
    let late = [0x04, 0, 0, 0, 0, 0, 0x0C];
    let seen = l
        .transact(move |t| {
            t.issue_card(&late, 5, "issue:late", T0)?;
            t.cards_after(Some(between), 1)
        })
        .unwrap();
    assert_eq!(seen.iter().map(|c| c.0).collect::<Vec<_>>(), vec![late]);
}

/// The blocked cards, from the index of blocked cards: exactly those blocked and not unblocked
/// since, in UID byte order, with their shadows; a block repeated or an unblock of a card not
/// blocked changes nothing; a transaction rolled back leaves the index as it was; the card
/// count counts every card, blocked or not.
fn blocked_cards_are_read_from_their_index(u: &Under) {
    let l = u.ledger();
    let blocked = |l: &Ledger| -> Vec<[u8; 7]> {
        let cards = l.read().unwrap().blocked_cards().unwrap();
        assert!(cards.iter().all(|(_, c)| c.blocked), "{cards:?}");
        cards.into_iter().map(|(uid, _)| uid).collect()
    };
    assert!(blocked(l).is_empty());
    assert_eq!(l.read().unwrap().card_count().unwrap(), 0);
    issue_paged_cards(l);
    assert_eq!(
        l.read().unwrap().card_count().unwrap(),
        PAGED_UIDS.len() as u64
    );
    assert!(blocked(l).is_empty());
    // Every third card (in issue order) blocked, one of them twice.
    let mut want: Vec<[u8; 7]> = PAGED_UIDS.iter().step_by(3).copied().collect();
    let w = want.clone();
    let seen = l
        .transact(move |t| {
            for uid in &w {
                t.set_blocked(uid, true, "lost", T0)?;
            }
            assert_eq!(t.set_blocked(&w[0], true, "again", T0)?, None);
            // Inside the transaction, its own blocks are listed.
            t.blocked_cards()
        })
        .unwrap();
    assert_eq!(seen.len(), want.len());
    want.sort();
    assert_eq!(blocked(l), want);
    let r = l.read().unwrap();
    for (uid, c) in r.blocked_cards().unwrap() {
        assert_eq!(c, r.card(&uid).unwrap());
        assert_eq!(c.block_reason.as_deref(), Some("lost"));
    }
    drop(r);
    // An unblock takes the card out; unblocking a card that is not blocked changes nothing.
    let lifted = want.remove(1);
    let free = *PAGED_UIDS
        .iter()
        .find(|u| !want.contains(u) && **u != lifted)
        .unwrap();
    l.transact(move |t| {
        assert!(t.set_blocked(&lifted, false, "found", T0)?.is_some());
        assert_eq!(t.set_blocked(&free, false, "found", T0)?, None);
        Ok(())
    })
    .unwrap();
    assert_eq!(blocked(l), want);
    // A block in a transaction that fails is not in the index.
    let err = l
        .transact(move |t| -> Result<(), LedgerError> {
            t.set_blocked(&free, true, "lost", T0)?;
            Err(LedgerError::Database("rolled back on purpose".into()))
        })
        .unwrap_err();
    assert!(err.to_string().contains("on purpose"), "{err}");
    assert_eq!(blocked(l), want);
    assert_eq!(
        l.read().unwrap().card_count().unwrap(),
        PAGED_UIDS.len() as u64
    );
}

/// The cards of an owner, from the index by owner: exactly those `set_owner` gave it, in UID
/// byte order; a card given to another owner leaves the first's list; an owner of none has an
/// empty list; an owner the index cannot key is refused and changes nothing.
fn cards_are_listed_by_owner(u: &Under) {
    let l = u.ledger();
    issue_paged_cards(l);
    // Every other card (in issue order) to alice, the rest but one to bob.
    let (mut alice, mut bob) = (Vec::new(), Vec::new());
    for (i, uid) in PAGED_UIDS.iter().enumerate() {
        match i % 2 {
            0 => alice.push(*uid),
            _ if i + 1 < PAGED_UIDS.len() => bob.push(*uid),
            _ => {}
        }
    }
    let (a, b) = (alice.clone(), bob.clone());
    l.transact(move |t| {
        for uid in &a {
            t.set_owner(uid, "alice")?;
        }
        for uid in &b {
            t.set_owner(uid, "bob")?;
        }
        // Inside the transaction, its own writes are listed.
        t.cards_of_owner("alice")
    })
    .map(|seen| assert_eq!(seen.len(), alice.len()))
    .unwrap();
    alice.sort();
    bob.sort();
    let of = |owner: &str| l.read().unwrap().cards_of_owner(owner).unwrap();
    assert_eq!(of("alice"), alice);
    assert_eq!(of("bob"), bob);
    assert!(of("carol").is_empty());
    assert!(of("ali").is_empty());
    assert!(of("").is_empty());
    // Setting the same owner again lists the card once.
    let again = alice[0];
    l.transact(move |t| t.set_owner(&again, "alice")).unwrap();
    assert_eq!(of("alice"), alice);
    // Reassigned to bob: gone from alice's list, in bob's.
    let moved = alice.remove(1);
    l.transact(move |t| t.set_owner(&moved, "bob")).unwrap();
    bob.push(moved);
    bob.sort();
    assert_eq!(of("alice"), alice);
    assert_eq!(of("bob"), bob);
    assert_eq!(
        l.read().unwrap().card(&moved).unwrap().owner.as_deref(),
        Some("bob")
    );
    // A card's other writes (a block) leave it in its owner's list.
    l.transact(move |t| t.set_blocked(&moved, true, "lost", T0).map(|_| ()))
        .unwrap();
    assert_eq!(of("bob"), bob);
    // An owner with a NUL byte, or too long, is refused; the card keeps its owner.
    for bad in ["bob\0x".to_string(), "x".repeat(MAX_OWNER_BYTES + 1)] {
        let owner = bad.clone();
        let err = l
            .transact(move |t| t.set_owner(&moved, &owner))
            .unwrap_err();
        assert!(matches!(err, LedgerError::InvalidOwner(_)), "{err}");
    }
    assert_eq!(of("bob"), bob);
    let longest = "y".repeat(MAX_OWNER_BYTES);
    let owner = longest.clone();
    l.transact(move |t| t.set_owner(&moved, &owner)).unwrap();
    assert_eq!(of(&longest), vec![moved]);
}

fn reconciliation_in_pages_reports_as_in_one(u: &Under) {
    use charging::reconcile::{reconcile, reconcile_in_pages, Cause};
    use purse::receipt::{CommitReceipt, TxKind};
    use purse::sam::TmacVerified;
    let l = u.ledger();
    issue_paged_cards(l);
    let proved = |uid, tmc, kind, amount, after| {
        TmacVerified::for_tests(CommitReceipt::for_tests(
            uid, tmc, [0; 8], kind, amount, after,
        ))
    };
    let [a, b, c, d, ..] = PAGED_UIDS;
    l.transact(move |t| {
        // a: blocked as a clone; b: a load pending; c: a franchise load posted, its counter
        // not booked yet (the card's shadow still proves 1 002); d: counter 3 booked, 1-2 not.
        t.set_blocked(&a, true, CLONE_BLOCK_REASON, T0)?;
        t.insert_intent(&b, &mut intent(b, 0))?;
        t.post_franchise_load(&proved(c, 1, TxKind::Credit, 500, 1_502), "f", "load:c", T0)?;
        t.book_proved(&proved(d, 3, TxKind::Debit, 100, 900), T0)?;
        Ok(())
    })
    .unwrap();
    let whole = reconcile_in_pages(l, usize::MAX).unwrap();
    let causes: Vec<(String, Cause)> = whole
        .differences
        .iter()
        .map(|d| (d.card_uid.clone(), d.cause.clone()))
        .collect();
    assert_eq!(
        causes,
        vec![
            (hex::encode_upper(b), Cause::PendingLoad { at_tmc: vec![0] }),
            (
                hex::encode_upper(d),
                Cause::CounterGap {
                    from_tmc: 1,
                    to_tmc: 2
                }
            ),
            (hex::encode_upper(a), Cause::Clone { tmc: None }),
            (hex::encode_upper(c), Cause::Mismatch),
        ],
        "in UID order: {whole:?}"
    );
    assert_eq!((whole.cards, whole.balanced), (12, 8));
    for page in (0..=13).chain([10_000]) {
        let paged = reconcile_in_pages(l, page).unwrap();
        assert_eq!(
            (paged.cards, paged.balanced, &paged.differences),
            (whole.cards, whole.balanced, &whole.differences),
            "pages of {page}"
        );
    }
    let default = reconcile(l).unwrap();
    assert_eq!(default.differences, whole.differences);
}

fn a_load_and_a_cleared_tap_end_to_end(u: &Under) {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(3));
    let svc = service(u.ledger().clone(), &keys, dir.path());
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let uid = [0x04, 0x11, 1, 2, 3, 4, 5];
    svc.register_card(&uid, 1_000, T0).unwrap();
    svc.register_instrument("alice", "card", "tok_visa", T0)
        .unwrap();
    let mut card = transit_card(&hsm, uid, 1_000);
    let mut now = T0;
    let req = LoadRequest {
        uid,
        amount_minor: 2_500,
        funding_source: "card".into(),
        instrument: "tok_visa".into(),
        idempotency_key: "k1".into(),
    };
    let first = svc.start("alice", req.clone(), now).unwrap();
    let (done, _) = relay_in_process(&svc, "alice", &mut card, first, &mut now, 5, None).unwrap();
    assert!(
        matches!(
            done,
            Reply::Completed {
                balance_minor: 3_500,
                tmc: 1,
                ..
            }
        ),
        "{done:?}"
    );
    // The same key again: the stored answer, no second load.
    assert_eq!(svc.start("alice", req, now).unwrap(), done);
    let fare = debit(&mut sam, &mut card, 300);
    let out = clear_batch(
        svc.ledger(),
        svc.hsm(),
        ClearingBatch {
            batch_id: "gw-1".into(),
            taps: vec![clearing_tap(&fare, 1)],
        },
        now,
    )
    .unwrap();
    assert!(out.anomalies.is_empty(), "{out:?}");
    let r = svc.ledger().read().unwrap();
    assert_eq!(card.state().balance_minor, 3_200);
    assert_eq!(
        r.balance(&card_account(&uid)).unwrap(),
        3_200,
        "shadow = card"
    );
    assert_eq!(r.balance("funding:card").unwrap(), -2_500);
    assert_eq!(r.balance("operator:metro").unwrap(), 300);
    assert_eq!(r.postings_with_prefix("load:").unwrap().len(), 1);
    let intents = r.all_intents().unwrap();
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0].state, IntentState::Completed);
    let sum: i64 = r.balances().unwrap().iter().map(|(_, b)| b).sum();
    assert_eq!(sum, 0);
}

// ---- PostgreSQL only ----

#[test]
fn two_transactions_racing_for_one_card_counter_book_it_once() {
    let u = Under::postgres();
    let l = u.ledger();
    let uid = [9u8; 7];
    for round in 0..10u32 {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let results: Vec<_> = (0..2)
            .map(|n| {
                let (l, barrier) = (l.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut waited = false;
                    l.transact(move |t| {
                        let existing = t.intent(&uid, round)?;
                        // A retried run does not wait again.
                        if !std::mem::replace(&mut waited, true) {
                            barrier.wait();
                        }
                        if existing.is_some() {
                            return Err(LedgerError::IntentExists {
                                uid: hex::encode_upper(uid),
                                tmc: round,
                            });
                        }
                        let mut i = intent(uid, round);
                        i.idempotency_key = format!("k{n}");
                        t.insert_intent(&uid, &mut i)?;
                        t.post(T0, "funding:card", "wallet:race", 100, &format!("r{round}"))?;
                        Ok(n)
                    })
                })
            })
            .collect();
        let results: Vec<_> = results.into_iter().map(|h| h.join().unwrap()).collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}");
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(LedgerError::IntentExists { .. }))));
    }
    let r = l.read().unwrap();
    assert_eq!(r.open_intents(&uid).unwrap().len(), 10);
    assert_eq!(
        r.balance("wallet:race").unwrap(),
        1_000,
        "each counter paid once"
    );
}

#[test]
fn a_serialization_conflict_is_retried_and_the_closure_runs_again() {
    let u = Under::postgres();
    let l = u.ledger();
    l.transact(|t| t.post(T0, "seed:a", "hot", 1, "seed").map(|_| ()))
        .unwrap();
    let before = PgLedger::retries();
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|n| {
            let (l, runs, barrier) = (l.clone(), runs.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut waited = false;
                l.transact(move |t| {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Both read the hot balance, then both write it: one must run again.
                    let b = t.balance("hot")?;
                    if !std::mem::replace(&mut waited, true) {
                        barrier.wait();
                    }
                    t.post(T0, &format!("payer:{n}"), "hot", 10, &format!("p{n}"))?;
                    Ok(b)
                })
            })
        })
        .collect();
    let seen: Vec<i64> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert!(
        runs.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "one closure ran again"
    );
    assert!(PgLedger::retries() > before);
    let mut seen = seen;
    seen.sort();
    assert_eq!(seen, [1, 11], "the retried one saw the other's posting");
    assert_eq!(l.read().unwrap().balance("hot").unwrap(), 21);
}

#[test]
fn migrate_is_idempotent_and_the_schema_is_checked_at_open() {
    let db = TestDb::start();
    let cfg = PgConfig::new(&db.url, Some(db.password()));
    // An empty database is refused with what to do.
    let e = PgLedger::open(cfg.clone()).unwrap_err();
    assert!(
        matches!(&e, LedgerError::Schema(m) if m.contains("schema version 0") && m.contains("tapgate charging migrate")),
        "{e}"
    );
    let applied = postgres::migrate(&cfg).unwrap();
    assert_eq!(applied, MIGRATIONS.iter().map(|m| m.0).collect::<Vec<_>>());
    assert!(postgres::migrate(&cfg).unwrap().is_empty(), "nothing twice");
    let latest = MIGRATIONS.last().unwrap().0;
    assert_eq!(postgres::schema_version(&cfg).unwrap(), latest);
    PgLedger::open(cfg.clone()).unwrap();
    // Two migrators at once on a fresh database apply each migration once.
    let mut cluster = db.cluster;
    let url2 = cluster.create_database();
    let cfg2 = PgConfig::new(&url2, Some(cluster.password()));
    let both: Vec<_> = (0..2)
        .map(|_| {
            let c = cfg2.clone();
            std::thread::spawn(move || postgres::migrate(&c).unwrap())
        })
        .collect();
    let total: usize = both.into_iter().map(|h| h.join().unwrap().len()).sum();
    assert_eq!(total, MIGRATIONS.len());
    // A schema newer than this build knows is refused, by open and by migrate.
    cluster
        .psql(
            "test1",
            &format!(
                "INSERT INTO schema_version (version, name) VALUES ({}, 'future')",
                latest + 1
            ),
        )
        .unwrap();
    let e = PgLedger::open(cfg.clone()).unwrap_err();
    assert!(
        matches!(&e, LedgerError::Schema(m) if m.contains("newer")),
        "{e}"
    );
    assert!(matches!(
        postgres::migrate(&cfg),
        Err(LedgerError::Schema(_))
    ));
    // An older one (a version removed) is refused too.
    cluster
        .psql(
            "test1",
            &format!("DELETE FROM schema_version WHERE version >= {latest}"),
        )
        .unwrap();
    let e = PgLedger::open(cfg).unwrap_err();
    assert!(
        matches!(&e, LedgerError::Schema(m) if m.contains("needs")),
        "{e}"
    );
}

#[test]
fn a_refused_connection_is_a_clear_error_not_a_panic() {
    let port = tapgate_testkit::free_port();
    let mut cfg = PgConfig::new(
        &format!("postgres://tapgate@127.0.0.1:{port}/x"),
        Some("pw"),
    );
    cfg.connect_timeout = std::time::Duration::from_millis(300);
    let e = PgLedger::open(cfg.clone()).unwrap_err();
    assert!(matches!(e, LedgerError::Unavailable(_)), "{e}");
    assert!(!e.to_string().contains("pw@"), "{e}");
    // A wrong password is refused too, and never shown.
    let db = TestDb::start();
    let cfg = PgConfig::new(&db.url, Some("not-the-password"));
    let e = PgLedger::open(cfg).unwrap_err();
    assert!(matches!(e, LedgerError::Unavailable(_)), "{e}");
    assert!(!e.to_string().contains("not-the-password"));
}

#[test]
fn the_ledger_survives_a_server_restart_between_transactions() {
    let mut u = Under::postgres();
    let l = u.ledger().clone();
    l.transact(|t| t.post(T0, "a", "b", 5, "before").map(|_| ()))
        .unwrap();
    let db = u.db.as_mut().unwrap();
    db.cluster.stop();
    db.cluster.start_server().unwrap();
    // The pooled connection died with the server: the transaction reconnects and runs.
    l.transact(|t| t.post(T0, "a", "b", 5, "after").map(|_| ()))
        .unwrap();
    assert_eq!(l.read().unwrap().balance("b").unwrap(), 10);
}

#[test]
fn a_ledger_on_postgres_is_usable_from_inside_a_tokio_runtime() {
    let u = Under::postgres();
    let l = u.ledger().clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let b = rt.block_on(async move {
        // Called straight on a worker thread (no spawn_blocking): no panic.
        l.transact(|t| t.post(T0, "x", "y", 3, "in-runtime").map(|_| ()))
            .unwrap();
        let r = l.read().unwrap();
        r.balance("y").unwrap()
    });
    assert_eq!(b, 3);
}

#[test]
fn finance_views_answer_in_sql() {
    let u = Under::postgres();
    let l = u.ledger();
    let day = 1_700_006_400_000u64; // 2023-11-15T00:00:00Z
    l.transact(move |t| {
        t.post(day + 1_000, "wallet:1", "operator:metro", 300, "tap:1")?;
        t.post(day + 2_000, "wallet:1", "operator:metro", 200, "tap:2")?;
        t.post(day + 3_000, "operator:metro", "wallet:1", 50, "undo:2")?;
        t.post(
            day + 4_000,
            "franchise:shop",
            "wallet:2",
            2_000,
            "franchise-load:1",
        )?;
        t.post(
            day + 5_000,
            "bank",
            "franchise:shop",
            1_500,
            "franchise-payment:1",
        )?;
        Ok(())
    })
    .unwrap();
    let db = u.db.as_ref().unwrap();
    let q = |sql: &str| db.cluster.psql(db.name(), sql).unwrap().trim().to_string();
    assert_eq!(
        q("SELECT operator, day, fares_minor, undone_minor, revenue_minor, taps FROM revenue_per_operator_day"),
        "metro|2023-11-15|500|50|450|2"
    );
    assert_eq!(
        q("SELECT franchise, day, loads_minor, payments_minor, owed_minor FROM settlement_per_franchise_day"),
        "shop|2023-11-15|2000|1500|500"
    );
    assert_eq!(q("SELECT count(*) FROM reconciliation_causes"), "0");
}

#[test]
fn a_snapshot_held_across_a_transaction_never_starves_the_pool() {
    let db = TestDb::start();
    let mut cfg = PgConfig::new(&db.url, Some(db.password()));
    postgres::migrate(&cfg).unwrap();
    cfg.max_connections = 1;
    let l = Ledger::open_postgres(cfg).unwrap();
    std::thread::scope(|scope| {
        for i in 0..4 {
            let l = l.clone();
            scope.spawn(move || {
                for j in 0..5 {
                    // As clearing does: a snapshot still open while the thread transacts.
                    let r = l.read().unwrap();
                    let _ = r.idempotent(&format!("batch:{i}:{j}")).unwrap();
                    l.transact(move |t| {
                        t.post(T0, "funding:card", &format!("w:{i}"), 1, "x")
                            .map(|_| ())
                    })
                    .unwrap();
                    drop(r);
                }
            });
        }
    });
    assert_eq!(l.read().unwrap().balance("funding:card").unwrap(), -20);
    l.close();
}

#[test]
fn a_server_lost_mid_transaction_is_retried_and_books_once() {
    let TestDb { cluster, url } = TestDb::start();
    let cfg = PgConfig::new(&url, Some(cluster.password()));
    postgres::migrate(&cfg).unwrap();
    let l = Ledger::open_postgres(cfg).unwrap();
    let cluster = Arc::new(std::sync::Mutex::new(cluster));
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (c, r) = (cluster.clone(), runs.clone());
    l.transact(move |t| {
        t.post(T0, "funding:card", "wallet:x", 7, "load:x:1")?;
        if r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            // The database restarts under the open transaction (its session is ended).
            let mut c = c.lock().unwrap();
            c.stop();
            c.start_server().unwrap();
        }
        t.put_idempotent("load-key", &serde_json::json!("done"))
    })
    .unwrap();
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "run again once"
    );
    let r = l.read().unwrap();
    assert_eq!(r.balance("wallet:x").unwrap(), 7, "posted once");
    assert_eq!(r.postings_with_prefix("load:x:").unwrap().len(), 1);
    assert_eq!(
        r.idempotent("load-key").unwrap(),
        Some(serde_json::json!("done"))
    );
    drop(r);
    l.close();
}

/// The two backends given the same random sequence of the ledger's steps — cards' proved
/// debits and credits booked in any order (gaps, duplicates), loads inserted, completed by
/// their proof or voided, blocks, anomalies, gap sweeps, plain postings (some refused), day
/// totals — answer every step alike and end in the same state. The steps are written once per
/// backend: this keeps them equal.
#[test]
fn both_backends_answer_a_random_history_alike() {
    use purse::sam::Hsm;
    use rand::Rng;
    let (lmdb, pg) = (Under::lmdb(), Under::postgres());
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(77));
    let mut hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let mut rng = StdRng::seed_from_u64(2024);
    // Per card: its proved transactions in counter order (debits by a validator, credits by
    // the HSM as a load would make them).
    let mut proofs = Vec::new();
    for n in 0..4u8 {
        let uid = [0x04, 0xD0 + n, 1, 2, 3, 4, 5];
        let mut card = transit_card(&hsm, uid, 2_000);
        for _ in 0..6 {
            let r = if rng.gen_bool(0.3) {
                value_tx(&mut hsm, &mut card, KeyKind::Credit, ins::CREDIT, 500).unwrap()
            } else {
                debit(&mut sam, &mut card, rng.gen_range(50..400))
            };
            proofs.push((uid, hsm.verify_tmac(&r).unwrap()));
        }
    }
    type Step = Box<dyn FnMut(&mut dyn LedgerWrite) -> Result<String, LedgerError> + Send>;
    let mut steps: Vec<Step> = Vec::new();
    for n in 0..4u8 {
        let uid = [0x04, 0xD0 + n, 1, 2, 3, 4, 5];
        steps.push(Box::new(move |t| {
            Ok(format!("{:?}", t.issue_card(&uid, 2_000, "issue", T0)?))
        }));
    }
    let mut now = T0;
    for i in 0..400u32 {
        now += rng.gen_range(0..2 * 3_600_000);
        let (uid, proof) = proofs[rng.gen_range(0..proofs.len())].clone();
        let r = proof.receipt();
        let (tmc, credit) = (r.tmc(), r.kind() == purse::receipt::TxKind::Credit);
        let amount = r.amount_minor();
        let pick = if credit && rng.gen_bool(0.6) {
            rng.gen_range(0..3)
        } else {
            rng.gen_range(0..10)
        };
        let step: Step = match pick {
            0 | 1 => {
                let mut intent = intent(uid, tmc - 1);
                intent.amount_minor = amount;
                intent.created_ms = now;
                Box::new(move |t| Ok(format!("{:?}", t.insert_intent(&uid, &mut intent.clone()))))
            }
            2 => Box::new(move |t| {
                Ok(format!(
                    "{:?}",
                    t.complete_intent(Completion::Proved(&proof), now)
                ))
            }),
            3 => Box::new(move |t| Ok(format!("{:?}", t.void_intent(&uid, tmc - 1, now)?))),
            4 | 5 => Box::new(move |t| {
                let booking = t.book_proved(&proof, now)?;
                if booking != Booking::Duplicate {
                    t.post_cleared_tap(&proof, "metro", &format!("tap:{i}"), now)?;
                }
                Ok(format!("{booking:?}"))
            }),
            6 => {
                let blocked = rng.gen_bool(0.5);
                Box::new(move |t| Ok(format!("{:?}", t.set_blocked(&uid, blocked, "why", now)?)))
            }
            7 => Box::new(move |t| Ok(format!("{:?}", t.sweep_gaps(now, 8 * 3_600_000)?))),
            8 => {
                let amount = [0, 1, 250, i64::MAX][rng.gen_range(0..4)];
                let (from, to) = (format!("acct:{}", i % 3), format!("acct:{}", (i + 1) % 3));
                Box::new(move |t| {
                    let p = t.post(now, &from, &to, amount, &format!("p:{i}"));
                    Ok(format!("{:?}", p.map(|p| (p.from, p.to, p.amount_minor))))
                })
            }
            _ => {
                let delta = rng.gen_range(-300..300);
                Box::new(move |t| {
                    t.add_funding_day(FundingDay::new("card", "tok", now / 86_400_000), delta)?;
                    let a = Anomaly {
                        kind: "test".into(),
                        card_uid: hex::encode_upper(uid),
                        tmc,
                        device_id: 1,
                        device_seq: u64::from(i),
                        detail: String::new(),
                    };
                    Ok(format!("{}", t.record_anomaly(&a)?))
                })
            }
        };
        steps.push(step);
    }
    let mut answers = String::new();
    for (i, step) in steps.into_iter().enumerate() {
        let step = Arc::new(std::sync::Mutex::new(step));
        let run = |l: &Ledger| {
            let s = step.clone();
            format!("{:?}", l.transact(move |t| (s.lock().unwrap())(t)))
        };
        let (a, b) = (run(lmdb.ledger()), run(pg.ledger()));
        assert_eq!(a, b, "step {i}");
        answers.push_str(&a);
        answers.push('\n');
    }
    // The history went through the interesting cases.
    for case in [
        "InOrder",
        "AboveGap",
        "Duplicate",
        "Capture",
        "Release",
        "IntentExists",
        "ProofNotIntent",
        "InvalidPosting",
        "counter_gap",
        "Some(1)",
    ] {
        assert!(answers.contains(case), "no {case} in:\n{answers}");
    }
    let state = |l: &Ledger| {
        let r = l.read().unwrap();
        let postings: Vec<_> = r
            .postings_with_prefix("")
            .unwrap()
            .into_iter()
            .map(|p| (p.time_ms, p.from, p.to, p.amount_minor, p.reference))
            .collect();
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            r.balances().unwrap(),
            r.all_cards().unwrap(),
            r.all_intents().unwrap(),
            r.block_changes(0, 1_000).unwrap(),
            r.anomalies(0, 1_000).unwrap(),
            postings,
            (0..40)
                .map(|d| r
                    .funding_day_total(FundingDay::new("card", "tok", T0 / 86_400_000 + d))
                    .unwrap())
                .collect::<Vec<_>>(),
        )
    };
    let (a, b) = (state(lmdb.ledger()), state(pg.ledger()));
    for (la, lb) in a.lines().zip(b.lines()) {
        assert_eq!(la, lb);
    }
}

#[test]
fn a_closure_that_panics_panics_its_caller_and_the_ledger_goes_on() {
    let db = TestDb::start();
    let mut cfg = PgConfig::new(&db.url, Some(db.password()));
    postgres::migrate(&cfg).unwrap();
    cfg.max_connections = 1;
    let l = Ledger::open_postgres(cfg).unwrap();
    let l2 = l.clone();
    let caught = std::panic::catch_unwind(move || {
        l2.transact(|t| {
            t.post(T0, "a", "b", 5, "half")?;
            panic!("a bug in a closure");
            #[allow(unreachable_code)]
            Ok(())
        })
    });
    let message = caught.unwrap_err();
    assert_eq!(message.downcast_ref::<&str>(), Some(&"a bug in a closure"));
    // Nothing of it committed, and the one connection thread serves the next transaction.
    l.transact(|t| t.post(T0, "a", "b", 7, "whole").map(|_| ()))
        .unwrap();
    let r = l.read().unwrap();
    assert_eq!(r.balance("b").unwrap(), 7);
    assert!(r.postings_with_prefix("half").unwrap().is_empty());
}

/// A CA and a certificate it signs for 127.0.0.1: (CA PEM, certificate PEM, key PEM).
fn tls_chain() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn tls_to_the_database_is_verified_against_the_configured_ca() {
    let TestDb { mut cluster, url } = TestDb::start();
    let (ca, cert, key) = tls_chain();
    cluster.enable_tls(&cert, &key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let mut cfg = PgConfig::new(&url, Some(cluster.password()));
    cfg.ca_file = Some(ca_file);
    postgres::migrate(&cfg).unwrap();
    let l = Ledger::open_postgres(cfg).unwrap();
    l.transact(|t| t.post(T0, "a", "b", 3, "over-tls").map(|_| ()))
        .unwrap();
    assert_eq!(l.read().unwrap().balance("b").unwrap(), 3);
    let db = url.rsplit('/').next().unwrap();
    let tls = cluster
        .psql(
            db,
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'tapgate-charging'",
        )
        .unwrap();
    assert_eq!(tls.trim(), "t", "every ledger connection is TLS");
    l.close();

    // A server whose certificate another CA signed is refused.
    let (other_ca, _, _) = tls_chain();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca).unwrap();
    let mut cfg = PgConfig::new(&url, Some(cluster.password()));
    cfg.ca_file = Some(other);
    cfg.connect_timeout = std::time::Duration::from_millis(200);
    let e = PgLedger::open(cfg).unwrap_err();
    assert!(matches!(e, LedgerError::Unavailable(_)), "{e}");
    // A URL that asks for TLS without a CA to check it is refused before connecting.
    let cfg = PgConfig::new(&format!("{url}?sslmode=require"), Some(cluster.password()));
    let e = PgLedger::open(cfg).unwrap_err();
    assert!(e.to_string().contains("ca_file"), "{e}");
}
