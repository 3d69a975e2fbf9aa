//! [`Db`]'s deferred writes against a database of their own: what the `COMMIT` sent with them
//! may and may not make durable.

use super::*;
use tapgate_testkit::postgres::TestDb;

fn connected(pg: &TestDb) -> PgClient {
    let cfg = super::super::PgConfig::new(&pg.url, Some(pg.password()));
    cfg.connect_pipelined().expect("connecting")
}

/// The rows of `t`, by a client of its own (what committed).
fn rows(pg: &TestDb) -> i64 {
    let mut c = connected(pg);
    let s = c.prepare("SELECT count(*) FROM t").unwrap();
    match c.pipeline(&[Op::Query(&s, &[])]).pop().unwrap().unwrap() {
        Answer::Rows(r) => r[0].get(0),
        other => panic!("{other:?}"),
    }
}

/// Ends a transaction as `write::run` does: `COMMIT` when nothing failed, else `ROLLBACK` if
/// it is open; what `commit` said, if it ran.
fn end(db: &mut Db<'_>, closure_ok: bool) -> Option<Commit> {
    if closure_ok && db.failure.is_none() {
        return Some(db.commit());
    }
    if db.open() {
        db.client.batch_execute("ROLLBACK").unwrap();
    }
    None
}

/// A deferred write the client cannot encode (a parameter of the wrong type) never reaches
/// the server, so the server would not abort the transaction for it: the `COMMIT` sent with
/// the writes must not make the others durable.
#[test]
fn a_deferred_write_the_client_cannot_send_commits_nothing() {
    let pg = TestDb::start();
    let mut client = connected(&pg);
    client
        .batch_execute("CREATE TABLE t (a bigint NOT NULL)")
        .unwrap();
    let mut statements = HashMap::new();
    let mut db = Db::transaction(&mut client, &mut statements);
    db.defer("INSERT INTO t (a) VALUES ($1)", vec![Box::new(1i64)])
        .unwrap();
    let wrong = db.defer(
        "INSERT INTO t (a) VALUES ($1)",
        vec![Box::new("one".to_string())],
    );
    let commit = end(&mut db, wrong.is_ok());
    assert!(
        !matches!(commit, Some(Commit::Done)),
        "a transaction with a failed write reported committed"
    );
    drop(db);
    assert_eq!(rows(&pg), 0, "the writes before the failed one committed");
}

/// A deferred write with too few parameters is refused as well, before anything is sent.
#[test]
fn a_deferred_write_with_missing_parameters_commits_nothing() {
    let pg = TestDb::start();
    let mut client = connected(&pg);
    client
        .batch_execute("CREATE TABLE t (a bigint NOT NULL, b bigint NOT NULL)")
        .unwrap();
    let mut statements = HashMap::new();
    let mut db = Db::transaction(&mut client, &mut statements);
    db.defer(
        "INSERT INTO t (a, b) VALUES ($1, $2)",
        vec![Box::new(1i64), Box::new(2i64)],
    )
    .unwrap();
    let short = db.defer("INSERT INTO t (a, b) VALUES ($1, $2)", vec![Box::new(3i64)]);
    let commit = end(&mut db, short.is_ok());
    assert!(!matches!(commit, Some(Commit::Done)));
    drop(db);
    assert_eq!(rows(&pg), 0, "the writes before the failed one committed");
}

/// A deferred write the server refuses (a row count `ledger_expect_rows` does not accept)
/// rolls the transaction back: the `COMMIT` behind it answers, and nothing is durable.
#[test]
fn a_deferred_write_the_server_refuses_rolls_the_commit_back() {
    let pg = TestDb::start();
    let mut client = connected(&pg);
    client
        .batch_execute(concat!(
            "CREATE TABLE t (a bigint NOT NULL);",
            include_str!("../../../migrations/0005_expect_rows.sql")
        ))
        .unwrap();
    let mut statements = HashMap::new();
    let mut db = Db::transaction(&mut client, &mut statements);
    db.defer("INSERT INTO t (a) VALUES ($1)", vec![Box::new(1i64)])
        .unwrap();
    db.defer(
        "WITH w AS (UPDATE t SET a = a + 1 WHERE a = $1 RETURNING 1) \
         SELECT ledger_expect_rows('rows', count(*), 1) FROM w",
        vec![Box::new(7i64)],
    )
    .unwrap();
    let commit = end(&mut db, true);
    assert!(matches!(commit, Some(Commit::Failed)));
    assert!(db.failure.as_ref().is_some_and(|f| !f.lost && !f.retryable));
    drop(db);
    assert_eq!(rows(&pg), 0);
}
