//! `Ledger::read_latest` on PostgreSQL: reads with no transaction around them, on whatever
//! connection thread the pool lends — a new one that has never connected, or one whose
//! connection the server ended.

use charging::ledger::postgres;
use charging::ledger::*;
use tapgate_testkit::postgres::TestDb;

#[test]
fn latest_reads_connect_a_new_connection_and_reconnect_after_a_restart() {
    let TestDb { mut cluster, url } = TestDb::start();
    let mut cfg = PgConfig::new(&url, Some(cluster.password()));
    postgres::migrate(&cfg).unwrap();
    cfg.max_connections = 4;
    let l = Ledger::open_postgres(cfg).unwrap();
    l.transact(|t| t.put_idempotent("k", &serde_json::json!("v")))
        .unwrap();
    // Held while the next are taken: each of those is lent a connection thread of its own,
    // the later ones never connected before.
    let held: Vec<_> = (0..3).map(|_| l.read_latest().unwrap()).collect();
    for r in &held {
        assert_eq!(r.idempotent("k").unwrap(), Some(serde_json::json!("v")));
    }
    drop(held);
    // Every connection the pool holds is ended by the restart; a latest read connects afresh
    // (the first read on a dead connection may fail; the next on that thread does not).
    cluster.stop();
    cluster.start_server().unwrap();
    for _ in 0..8 {
        let r = l.read_latest().unwrap();
        let _ = r.idempotent("k");
    }
    for _ in 0..4 {
        let r = l.read_latest().unwrap();
        assert_eq!(r.idempotent("k").unwrap(), Some(serde_json::json!("v")));
        assert_eq!(r.balance("funding:card").unwrap(), 0);
    }
    l.close();
}
