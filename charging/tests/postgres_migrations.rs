//! The PostgreSQL ledger's migrations on a database that holds data: a database at schema
//! version 2 (card shadows kept whole as JSON) is migrated to 3 (the counters in their own
//! columns) by `migrate`, and every shadow reads back as it was, the reconciliation view
//! answers the same, and a migrated card is written again.

use charging::ledger::postgres::{self, MIGRATIONS};
use charging::ledger::*;
use tapgate_testkit::postgres::TestDb;

const T0: u64 = 1_700_000_000_000;

/// Shadows as version 2 stored them, one of each kind the record holds.
fn shadows() -> Vec<([u8; 7], CardShadow)> {
    let plain = CardShadow {
        last_tmc: 7,
        last_reported_balance_minor: Some(1_250),
        booked_through_tmc: 7,
        booked_balance_minor: Some(1_250),
        ..Default::default()
    };
    let blocked = CardShadow {
        last_tmc: u32::MAX,
        last_reported_balance_minor: Some(i32::MIN),
        blocked: true,
        block_reason: Some("clone suspected: two cards, one counter".into()),
        load_day: 20_000,
        load_day_minor: 4_000,
        owner: Some("rider-1".into()),
        booked_through_tmc: 3,
        booked_balance_minor: Some(-5),
        booked_above: vec![(5, 100, -25), (9, 75, -25)],
        payment_pin: Some(PaymentPin {
            phc: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
            above_minor: 2_000,
            failures: 2,
            ..Default::default()
        }),
    };
    let unseen = CardShadow {
        last_tmc: 4,
        last_reported_balance_minor: None,
        booked_through_tmc: 0,
        booked_balance_minor: None,
        ..Default::default()
    };
    vec![
        ([0x04, 1, 2, 3, 4, 5, 6], plain),
        ([0x04, 1, 2, 3, 4, 5, 7], blocked),
        ([0x04, 1, 2, 3, 4, 5, 8], unseen),
        ([0x04, 1, 2, 3, 4, 5, 9], CardShadow::default()),
    ]
}

/// The database behind `db` brought to schema version 2 as a build of version 2 left it, with
/// the shadows of [`shadows`] and a balance for the first card.
fn at_version_2(db: &TestDb) {
    let psql = |sql: &str| db.cluster.psql(db.name(), sql).unwrap();
    psql(
        "CREATE TABLE schema_version (version integer PRIMARY KEY, name text NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now())",
    );
    for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 <= 2) {
        psql(sql);
        psql(&format!(
            "INSERT INTO schema_version (version, name) VALUES ({version}, '{name}')"
        ));
    }
    for (uid, shadow) in shadows() {
        let record = serde_json::to_string(&shadow).unwrap();
        psql(&format!(
            "INSERT INTO cards (uid, record) VALUES ('{}', $j${record}$j$::jsonb)",
            hex::encode_upper(uid)
        ));
    }
    psql(&format!(
        "INSERT INTO balances (account, shard, balance_minor) VALUES ('card:{}', 0, 1250), \
         ('issuer:float', 0, -1250)",
        hex::encode_upper(shadows()[0].0)
    ));
}

/// The UIDs the ledger lists as blocked.
fn blocked_uids(r: &dyn LedgerRead) -> Vec<[u8; 7]> {
    r.blocked_cards()
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect()
}

fn reconciliation(db: &TestDb) -> String {
    db.cluster
        .psql(
            db.name(),
            "SELECT card_uid, ledger_balance_minor, card_balance_minor, booked_through_tmc, \
             last_tmc, cause FROM reconciliation ORDER BY card_uid",
        )
        .unwrap()
}

#[test]
fn a_database_at_version_2_is_migrated_with_its_card_shadows_unchanged() {
    let db = TestDb::start();
    at_version_2(&db);
    let cfg = PgConfig::new(&db.url, Some(db.password()));
    assert_eq!(postgres::schema_version(&cfg).unwrap(), 2);
    // A build of version 3 refuses it until it is migrated.
    let e = PgLedger::open(cfg.clone()).unwrap_err();
    assert!(
        matches!(&e, LedgerError::Schema(m) if m.contains("schema version 2")),
        "{e}"
    );
    let before = reconciliation(&db);
    assert!(
        before.contains("|clone") && before.contains("|balanced"),
        "{before}"
    );

    let applied = postgres::migrate(&cfg).unwrap();
    // Every migration after 2 (3 moved the counters; 4 only adds an index; 6 adds the
    // owner's column, computed from the records, and its index; 7 the block state's column
    // and the partial index of blocked cards).
    assert_eq!(
        applied,
        MIGRATIONS
            .iter()
            .map(|m| m.0)
            .filter(|v| *v > 2)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        postgres::schema_version(&cfg).unwrap(),
        postgres::known_version()
    );
    assert_eq!(reconciliation(&db), before, "the view answers as before");
    // The counters left the records.
    let keys = db
        .cluster
        .psql(
            db.name(),
            "SELECT count(*) FROM cards WHERE record ?| ARRAY['last_tmc', \
             'last_reported_balance_minor', 'booked_through_tmc', 'booked_balance_minor']",
        )
        .unwrap();
    assert_eq!(keys.trim(), "0");

    let ledger = Ledger::open_postgres(cfg).unwrap();
    let r = ledger.read().unwrap();
    let mut want = shadows();
    want.sort_by_key(|(uid, _)| *uid);
    assert_eq!(r.all_cards().unwrap(), want);
    for (uid, shadow) in &want {
        assert_eq!(&r.card(uid).unwrap(), shadow);
    }
    // The owner a record held before version 6 is in the index by owner (the column is
    // computed from the records when it is added).
    assert_eq!(r.cards_of_owner("rider-1").unwrap(), vec![want[1].0]);
    assert!(r.cards_of_owner("rider-2").unwrap().is_empty());
    drop(r);
    // The cards page's query reads the index (scans not allowed, so that the plan does not
    // depend on how few rows the table holds).
    let plan = db
        .cluster
        .psql(
            db.name(),
            "SET enable_seqscan = off; \
             EXPLAIN SELECT uid FROM cards WHERE owner = 'rider-1' ORDER BY uid",
        )
        .unwrap();
    assert!(plan.contains("cards_owner"), "{plan}");
    // A card blocked before version 7 is in the index of blocked cards, which the blocklist's
    // and the console's query reads.
    let r = ledger.read().unwrap();
    let listed = blocked_uids(&*r);
    assert_eq!(listed, vec![want[1].0]);
    assert_eq!(r.card_count().unwrap(), want.len() as u64);
    drop(r);
    let plan = db
        .cluster
        .psql(
            db.name(),
            "SET enable_seqscan = off; \
             EXPLAIN SELECT uid FROM cards c WHERE c.blocked ORDER BY c.uid",
        )
        .unwrap();
    assert!(plan.contains("cards_blocked"), "{plan}");

    // Written again (whole: a block and an unblock; the counters alone are what every
    // clearing test writes).
    let (plain, blocked) = (want[0].0, want[1].0);
    ledger
        .transact(move |t| {
            t.set_blocked(&plain, true, "lost", T0)?;
            t.set_blocked(&blocked, false, "cleared", T0)?;
            Ok(())
        })
        .unwrap();
    let r = ledger.read().unwrap();
    let p = r.card(&plain).unwrap();
    assert_eq!(
        p,
        CardShadow {
            blocked: true,
            block_reason: Some("lost".into()),
            ..want[0].1.clone()
        }
    );
    let b = r.card(&blocked).unwrap();
    assert_eq!(
        b,
        CardShadow {
            blocked: false,
            block_reason: None,
            ..want[1].1.clone()
        }
    );
    let listed = blocked_uids(&*r);
    assert_eq!(listed, vec![plain]);
    drop(r);
    ledger.close();
}
