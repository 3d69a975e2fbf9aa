//! The PostgreSQL ledger's pipelined statements (`ledger/postgres/db.rs`) across a server
//! restart: a transaction whose statements all go out with its `COMMIT` in one round trip.

use charging::ledger::postgres;
use charging::ledger::*;
use tapgate_testkit::postgres::TestDb;

/// A transaction that only writes (its `BEGIN`, writes and `COMMIT` in one round trip) on a
/// pooled connection the server ended while it was idle: it runs (again, on a new connection),
/// and its write is there once.
#[test]
fn a_write_only_transaction_on_a_connection_ended_while_idle_runs() {
    let TestDb { mut cluster, url } = TestDb::start();
    let mut cfg = PgConfig::new(&url, Some(cluster.password()));
    postgres::migrate(&cfg).unwrap();
    cfg.max_connections = 1;
    let l = Ledger::open_postgres(cfg).unwrap();
    l.transact(|t| t.put_idempotent("k1", &serde_json::json!("a")))
        .unwrap();
    cluster.stop();
    cluster.start_server().unwrap();
    let r = l.transact(|t| t.put_idempotent("k2", &serde_json::json!("b")));
    assert!(r.is_ok(), "{r:?}");
    let read = l.read().unwrap();
    assert_eq!(read.idempotent("k2").unwrap(), Some(serde_json::json!("b")));
    drop(read);
    l.close();
}
