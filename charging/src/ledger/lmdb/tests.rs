//! The LMDB ledger through its interface: durability, one intent per counter, group commit.

use crate::ledger::*;
use std::future::Future as _;

#[test]
fn postings_balance_to_zero_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let l = Ledger::open(dir.path(), 16 << 20).unwrap();
        l.transact(move |t| {
            t.post(1, "issuer:float", "wallet:01", 1_000, "issue:01")
                .unwrap();
            t.post(2, "funding:card", "wallet:01", 500, "load:01:1")
                .unwrap();
            t.post(3, "wallet:01", "operator:metro", 120, "tap:01:2")
                .unwrap();
            // A card's account moves only on a proof.
            for (from, to) in [("funding:card", "card:01"), ("card:01", "operator:metro")] {
                assert!(matches!(
                    t.post(4, from, to, 1, "x"),
                    Err(LedgerError::CardAccount { account }) if account == "card:01"
                ));
            }
            assert!(t.post(4, "a", "a", 1, "x").is_err());
            assert!(t.post(4, "a", "b", 0, "x").is_err());
            Ok(())
        })
        .unwrap();
        l.close();
    }
    let l = Ledger::open(dir.path(), 16 << 20).unwrap();
    let r = l.read().unwrap();
    assert_eq!(r.balance("wallet:01").unwrap(), 1_380);
    assert_eq!(r.balance("card:01").unwrap(), 0);
    let sum: i64 = r.balances().unwrap().iter().map(|(_, b)| b).sum();
    assert_eq!(sum, 0);
    assert_eq!(r.postings_with_prefix("load:").unwrap().len(), 1);
}

#[test]
fn one_intent_per_card_counter() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path(), 16 << 20).unwrap();
    let uid = [1u8; 7];
    let mut intent = LoadIntent {
        uid: hex::encode_upper(uid),
        tmc_before: 4,
        attempt: 0,
        balance_before_minor: 10,
        amount_minor: 100,
        key_version: 1,
        funding_source: "card".into(),
        funding_auth: "auth_1".into(),
        instrument: "tok_visa".into(),
        idempotency_key: "k".into(),
        requested_by: "alice".into(),
        state: IntentState::Authorised,
        created_ms: 0,
        settled_ms: None,
        kind: IntentKind::Load,
        reverses_tmc: None,
        reversed_at_tmc: None,
        payment_id: None,
    };
    l.transact(move |t| {
        t.insert_intent(&uid, &mut intent).unwrap();
        assert!(matches!(
            t.insert_intent(&uid, &mut intent.clone()),
            Err(LedgerError::IntentExists { .. })
        ));
        let mut other = intent.clone();
        other.tmc_before = 5;
        t.insert_intent(&uid, &mut other).unwrap();
        t.insert_intent(&[2u8; 7], &mut intent.clone()).unwrap();
        // Once voided, the counter takes a new attempt.
        t.void_intent(&uid, 4, 0).unwrap();
        intent.state = IntentState::Voided;
        let mut retry = intent.clone();
        retry.state = IntentState::Authorised;
        t.insert_intent(&uid, &mut retry).unwrap();
        assert_eq!(retry.attempt, 1);
        assert_eq!(t.intent(&uid, 4).unwrap().unwrap().attempt, 1);
        Ok(())
    })
    .unwrap();
    let r = l.read().unwrap();
    assert_eq!(r.open_intents(&uid).unwrap().len(), 2);
    assert_eq!(r.all_intents().unwrap().len(), 4);
}

#[test]
fn group_commit_keeps_each_callers_writes_and_rolls_back_only_failures() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path(), 64 << 20).unwrap();
    std::thread::scope(|scope| {
        for i in 0..16u64 {
            let l = l.clone();
            scope.spawn(move || {
                for j in 0..50u64 {
                    let ok = l.transact(move |t| {
                        t.post(
                            0,
                            "funding:card",
                            &format!("wallet:{i}"),
                            10,
                            &format!("load:{i}:{j}"),
                        )?;
                        if j % 10 == 9 {
                            // A failing job: its posting must not survive.
                            return Err(LedgerError::InvalidPosting("injected"));
                        }
                        Ok(())
                    });
                    assert_eq!(ok.is_ok(), j % 10 != 9);
                }
            });
        }
    });
    l.close();
    let l = Ledger::open(dir.path(), 64 << 20).unwrap();
    let r = l.read().unwrap();
    for i in 0..16u64 {
        assert_eq!(r.balance(&format!("wallet:{i}")).unwrap(), 450);
    }
    assert_eq!(r.balance("funding:card").unwrap(), -16 * 450);
    assert_eq!(r.postings_with_prefix("load:").unwrap().len(), 16 * 45);
}

fn one_worker() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A task awaiting its group commit holds no thread: on a runtime of one worker, a transaction
/// that can only finish once another task has run on that worker still finishes.
#[test]
fn an_awaited_commit_leaves_the_worker_to_other_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path(), 16 << 20).unwrap();
    let (ran_tx, ran_rx) = std::sync::mpsc::channel::<()>();
    let waiting = l.clone();
    let waited = one_worker().block_on(async move {
        let handler = tokio::spawn(async move {
            let wait = std::time::Duration::from_secs(5);
            waiting
                .transact_async(move |_| Ok(ran_rx.recv_timeout(wait).is_ok()))
                .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tokio::spawn(async move {
            let _ = ran_tx.send(());
        })
        .await
        .unwrap();
        handler.await.unwrap()
    });
    assert!(
        waited.unwrap(),
        "the other task ran while the handler awaited"
    );
    l.close();
}

/// Concurrent awaited transactions all become durable, each with its own answer; one handed
/// over and then dropped (a cancelled caller) commits all the same; the blocking form
/// ([`wait_for`]) waits for its own.
#[test]
fn awaited_commits_are_durable_even_when_the_caller_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path(), 16 << 20).unwrap();
    let results = one_worker().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..16u32 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                l.transact_async(move |t| {
                    t.put_idempotent(&format!("k{i}"), &serde_json::json!(i))?;
                    Ok(i)
                })
                .await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    });
    assert_eq!(results, (0..16).collect::<Vec<u32>>());
    // Polled once (handed to the committer), then dropped.
    let dropped = l.transact_async(|t| t.put_idempotent("dropped", &serde_json::json!(1)));
    let mut dropped = Box::pin(dropped);
    let waker = std::task::Waker::noop();
    let _ = dropped
        .as_mut()
        .poll(&mut std::task::Context::from_waker(waker));
    drop(dropped);
    let after = wait_for(l.transact_async(|t| t.idempotent("dropped")));
    assert_eq!(after.unwrap(), Some(serde_json::json!(1)));
    let r = l.read().unwrap();
    for i in 0..16u32 {
        assert_eq!(
            r.idempotent(&format!("k{i}")).unwrap(),
            Some(serde_json::json!(i))
        );
    }
    drop(r);
    l.close();
}

#[test]
fn a_card_s_latest_block_change_is_indexed_and_a_ledger_without_the_index_gets_it_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = ([4u8; 7], [5u8; 7]);
    {
        let l = super::LmdbLedger::open(dir.path(), 16 << 20).unwrap();
        l.transact(move |t| {
            t.set_blocked(&a, true, "lost", 1)?;
            t.set_blocked(&b, true, "stolen", 2)?;
            t.set_blocked(&a, false, "found", 3)?;
            Ok(())
        })
        .unwrap();
        let latest = |uid| {
            l.read()
                .unwrap()
                .latest_block_change(uid)
                .unwrap()
                .map(|c| (c.version, c.action))
        };
        assert_eq!(latest(&a), Some((3, "unblock".to_string())));
        assert_eq!(latest(&b), Some((2, "block".to_string())));
        assert_eq!(latest(&[6u8; 7]), None);
        // As a build before the index left it: the changes, no index.
        let mut w = l.env.write_txn().unwrap();
        l.blocks_by_card.clear(&mut w).unwrap();
        w.commit().unwrap();
        assert_eq!(latest(&a), None);
        l.close();
    }
    let l = Ledger::open(dir.path(), 16 << 20).unwrap();
    let r = l.read().unwrap();
    let (all, _) = r.block_changes(0, 10).unwrap();
    assert_eq!(r.latest_block_change(&a).unwrap().as_ref(), Some(&all[2]));
    assert_eq!(r.latest_block_change(&b).unwrap().as_ref(), Some(&all[1]));
    drop(r);
    // Written after the rebuild, a change is indexed as it is appended.
    l.transact(move |t| t.set_blocked(&b, false, "found", 4))
        .unwrap();
    let r = l.read().unwrap();
    assert_eq!(
        r.latest_block_change(&b).unwrap().map(|c| c.version),
        Some(4)
    );
    drop(r);
    l.close();
}

#[test]
fn cards_are_indexed_by_owner_and_a_ledger_without_the_index_gets_it_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let uids: Vec<[u8; 7]> = (1..=7u8).map(|i| [4, 0, 0, 0, 0, 0, i]).collect();
    let owner_of = |i: usize| match i % 3 {
        0 => Some("alice"),
        1 => Some("bob"),
        _ => None,
    };
    let of = |l: &super::LmdbLedger, owner: &str| l.read().unwrap().cards_of_owner(owner).unwrap();
    let alice: Vec<[u8; 7]> = (0..uids.len())
        .filter(|&i| owner_of(i) == Some("alice"))
        .map(|i| uids[i])
        .collect();
    let bob: Vec<[u8; 7]> = (0..uids.len())
        .filter(|&i| owner_of(i) == Some("bob"))
        .map(|i| uids[i])
        .collect();
    {
        let l = super::LmdbLedger::open(dir.path(), 16 << 20).unwrap();
        let cards = uids.clone();
        l.transact(move |t| {
            for (i, uid) in cards.iter().enumerate() {
                t.issue_card(uid, 100, &format!("issue:{i}"), 1)?;
                if let Some(o) = owner_of(i) {
                    t.set_owner(uid, o)?;
                }
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(of(&l, "alice"), alice);
        assert_eq!(of(&l, "bob"), bob);
        // An owner whose name another's begins with sees only its own cards.
        assert!(of(&l, "ali").is_empty());
        assert!(of(&l, "").is_empty());
        // As a build before the index left it: the cards and their owners, no index.
        let mut w = l.env.write_txn().unwrap();
        l.card_owners.clear(&mut w).unwrap();
        w.commit().unwrap();
        assert!(of(&l, "alice").is_empty());
        l.close();
    }
    // Opened again, the index is built from the cards (walked a page of 2 at a time here).
    let l = super::LmdbLedger::open(dir.path(), 16 << 20).unwrap();
    assert_eq!(of(&l, "alice"), alice);
    assert_eq!(of(&l, "bob"), bob);
    assert!(of(&l, "").is_empty());
    // The marker holds: a card whose entry is removed stays out across a reopen (the build
    // runs once, not at every open).
    let first = alice[0];
    let mut w = l.env.write_txn().unwrap();
    l.card_owners
        .delete(&mut w, &[&b"alice\0"[..], &first[..]].concat())
        .unwrap();
    w.commit().unwrap();
    l.close();
    let l = super::LmdbLedger::open(dir.path(), 16 << 20).unwrap();
    assert_eq!(of(&l, "alice"), alice[1..].to_vec());
    // After the build, set_owner moves a card's entry.
    l.transact(move |t| t.set_owner(&first, "bob")).unwrap();
    let mut bob_now = bob.clone();
    bob_now.push(first);
    bob_now.sort();
    assert_eq!(of(&l, "bob"), bob_now);
    assert_eq!(of(&l, "alice"), alice[1..].to_vec());
    l.close();
}

/// A ledger written before the index of blocked cards (the database absent: cleared here) gets
/// it built from the cards at open, a page of 2 at a time, once.
#[test]
fn a_ledger_without_the_blocked_index_gets_it_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let uids: Vec<[u8; 7]> = (1..=7u8).map(|i| [4, 0, 0, 0, 0, 0, i]).collect();
    let want: Vec<[u8; 7]> = uids.iter().step_by(2).copied().collect();
    let blocked = |l: &super::LmdbLedger| -> Vec<[u8; 7]> {
        let r = l.read().unwrap();
        r.blocked_cards()
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect()
    };
    {
        let l = super::LmdbLedger::open(dir.path(), 16 << 20).unwrap();
        let (cards, w) = (uids.clone(), want.clone());
        l.transact(move |t| {
            for (i, uid) in cards.iter().enumerate() {
                t.issue_card(uid, 100, &format!("issue:{i}"), 1)?;
            }
            for uid in &w {
                t.set_blocked(uid, true, "lost", 1)?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(blocked(&l), want);
        let mut w = l.env.write_txn().unwrap();
        l.blocked_cards.clear(&mut w).unwrap();
        w.commit().unwrap();
        assert!(blocked(&l).is_empty());
        l.close();
    }
    let l = super::LmdbLedger::open(dir.path(), 16 << 20).unwrap();
    assert_eq!(blocked(&l), want);
    // The marker holds: an entry removed stays out across a reopen (built once).
    let mut w = l.env.write_txn().unwrap();
    l.blocked_cards.delete(&mut w, &want[0][..]).unwrap();
    w.commit().unwrap();
    l.close();
    let l = super::LmdbLedger::open(dir.path(), 16 << 20).unwrap();
    assert_eq!(blocked(&l), want[1..].to_vec());
    assert_eq!(l.read().unwrap().card_count().unwrap(), uids.len() as u64);
    // A build without the index (a rollback) blocks a card: the card and a new block version,
    // not the index nor its stamp. Opened again, the index is rebuilt from the cards.
    let late = uids[1];
    let mut w = l.env.write_txn().unwrap();
    let mut shadow = l.cards.get(&w, &late[..]).unwrap().unwrap();
    shadow.blocked = true;
    l.cards.put(&mut w, &late[..], &shadow).unwrap();
    let version = l.blocks.last(&w).unwrap().unwrap().0 + 1;
    let change = BlockChange {
        version,
        card_uid: hex::encode_upper(late),
        action: "block".into(),
        reason: "stolen".into(),
        time_ms: 2,
    };
    l.blocks.put(&mut w, &version, &change).unwrap();
    w.commit().unwrap();
    l.close();
    let l = super::LmdbLedger::open(dir.path(), 16 << 20).unwrap();
    let mut now = want.clone();
    now.push(late);
    now.sort();
    assert_eq!(blocked(&l), now);
    l.close();
}

/// The group-commit counters the bench reads: each durable commit counts once with the
/// transactions it held; a failed transaction in a committed batch is counted with it, and
/// nothing is counted before the commit.
#[test]
fn group_commits_are_counted_with_their_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path(), 16 << 20).unwrap();
    let (commits, transactions) = LmdbLedger::group_commits();
    l.transact(|t| t.post(1, "issuer:float", "wallet:01", 1, "issue:01"))
        .unwrap();
    assert!(l
        .transact(|t| t.post(2, "a", "a", 1, "x").map(|_| ()))
        .is_err());
    let (c, j) = LmdbLedger::group_commits();
    // Other tests in this process may commit meanwhile: at least ours are counted.
    assert!(c >= commits + 2, "two commits counted: {commits} -> {c}");
    assert!(
        j >= transactions + 2,
        "two transactions counted: {transactions} -> {j}"
    );
    l.close();
}
