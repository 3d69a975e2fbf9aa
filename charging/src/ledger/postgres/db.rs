//! The statements of one transaction or read ([`Db`]): prepared once per connection, sent with
//! as few round trips as their answers allow. A transaction's `BEGIN` goes with its first
//! statement; a write whose answer nothing waits for ([`Db::defer`]: the staged writes, an
//! upsert, a neutral row's delete) goes with the next statement, or with the `COMMIT`
//! ([`Db::commit`]). A write that must change a known number of rows says so in its SQL
//! (`ledger_expect_rows`, migration 0005): the database refuses it, and so the transaction,
//! before the `COMMIT` behind it could commit.

use super::client::{Answer, Op, PgClient};
use super::write;
use super::{lost, retryable, Isolation, ROUND_TRIPS};
use postgres::types::ToSql;
use std::collections::HashMap;

/// A parameter owned by a deferred write.
pub(crate) type Param = Box<dyn ToSql + Sync + Send>;

/// A write sent with whatever goes next: its parameters already encoded for the statement's
/// types (encoded once, when the write is deferred: [`Db::defer`]).
struct Deferred {
    statement: postgres::Statement,
    params: Vec<Encoded>,
}

/// A parameter in its wire form for the type it was encoded for (`None`: SQL `NULL`); sending
/// it copies the bytes.
#[derive(Debug)]
struct Encoded(Option<bytes::Bytes>);

impl ToSql for Encoded {
    fn to_sql(
        &self,
        _: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(b) => {
                out.extend_from_slice(b);
                Ok(postgres::types::IsNull::No)
            }
            None => Ok(postgres::types::IsNull::Yes),
        }
    }

    /// Its type was checked when it was encoded ([`encode`]), against the same statement.
    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// A statement run through the session's cache of prepared statements.
pub(crate) struct Db<'s> {
    client: &'s mut PgClient,
    statements: &'s mut HashMap<&'static str, postgres::Statement>,
    /// The first error of the transaction (it aborts the transaction, whatever the caller
    /// does with it).
    pub(super) failure: Option<Failure>,
    /// The transaction's `BEGIN`: not sent yet, sent, or the transaction ended.
    begin: Begin,
    /// Writes not sent yet, in their order.
    deferred: Vec<Deferred>,
}

/// Where a transaction's `BEGIN` is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Begin {
    /// No transaction (a read of the latest: each statement stands alone).
    None,
    /// A write transaction's, sent with the first statement at the isolation the closure
    /// chose by then.
    Write,
    /// A read snapshot's (`REPEATABLE READ READ ONLY`), sent with the first statement.
    Snapshot,
    /// Sent (a snapshot's counted as `SERIALIZABLE`: it writes nothing).
    Sent(Isolation),
    /// The transaction ended with its `COMMIT` (committed, or rolled back by the database
    /// after a statement before it failed).
    Ended,
}

/// How a statement failed: whether the transaction may run again, whether the connection is
/// gone, whether the next run must be `SERIALIZABLE` (a read outside the locking rule), and the
/// error as the ledger reports it.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(super) retryable: bool,
    pub(super) lost: bool,
    pub(super) serializable: bool,
    /// Whether the server refused the statement (an error response: the transaction is
    /// aborted there), not the client (a statement never sent, or an answer not understood).
    pub(super) server: bool,
    /// Whether the server answered it by ending the session (`FATAL`, `PANIC`: its backend ran
    /// nothing after it, such as a `COMMIT` sent behind it).
    pub(super) fatal: bool,
    pub(super) error: String,
}

/// How a write transaction's `COMMIT` went ([`Db::commit`]).
pub(super) enum Commit {
    /// Nothing was sent: nothing to commit.
    Nothing,
    /// Committed.
    Done,
    /// A statement sent with the `COMMIT` failed (noted as the transaction's failure): the
    /// database rolled the transaction back.
    Failed,
    /// The database refused the `COMMIT` itself (a serialization failure found at commit):
    /// nothing of it is durable.
    Refused(postgres::Error),
    /// The connection was lost before the answer, or a write sent with the `COMMIT` failed
    /// in the client, not on the server: committed or not, nobody knows.
    Unknown(String),
}

impl<'s> Db<'s> {
    fn with(
        client: &'s mut PgClient,
        statements: &'s mut HashMap<&'static str, postgres::Statement>,
        begin: Begin,
    ) -> Db<'s> {
        Db {
            client,
            statements,
            failure: None,
            begin,
            deferred: Vec::new(),
        }
    }

    /// Statements that each stand alone.
    pub(super) fn new(
        client: &'s mut PgClient,
        statements: &'s mut HashMap<&'static str, postgres::Statement>,
    ) -> Db<'s> {
        Db::with(client, statements, Begin::None)
    }

    /// A read snapshot's statements: its `BEGIN` goes with the first.
    pub(super) fn snapshot(
        client: &'s mut PgClient,
        statements: &'s mut HashMap<&'static str, postgres::Statement>,
    ) -> Db<'s> {
        Db::with(client, statements, Begin::Snapshot)
    }

    /// A write transaction's statements: its `BEGIN` goes with the first.
    pub(super) fn transaction(
        client: &'s mut PgClient,
        statements: &'s mut HashMap<&'static str, postgres::Statement>,
    ) -> Db<'s> {
        Db::with(client, statements, Begin::Write)
    }

    /// The isolation of this write transaction (`BEGIN` sent or not: the closure's choice
    /// so far).
    pub(super) fn isolation(&self) -> Isolation {
        match self.begin {
            Begin::Sent(i) => i,
            Begin::Write => write::chosen(),
            Begin::None | Begin::Snapshot | Begin::Ended => Isolation::Serializable,
        }
    }

    /// Whether `BEGIN` was sent (then `COMMIT` or `ROLLBACK` ends the transaction).
    pub(super) fn begun(&self) -> bool {
        matches!(self.begin, Begin::Sent(_) | Begin::Ended)
    }

    /// Whether a transaction is open on the connection (`BEGIN` sent, not ended): a
    /// `ROLLBACK` ends it.
    pub(super) fn open(&self) -> bool {
        matches!(self.begin, Begin::Sent(_))
    }

    /// The `BEGIN` to send with the next statement, if it is not sent yet.
    fn take_begin(&mut self) -> Option<&'static str> {
        let (sql, isolation) = match self.begin {
            Begin::Write => {
                let i = write::chosen();
                (i.begin(), i)
            }
            Begin::Snapshot => (
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                Isolation::Serializable,
            ),
            Begin::None | Begin::Sent(_) | Begin::Ended => return None,
        };
        self.begin = Begin::Sent(isolation);
        Some(sql)
    }

    /// Records the first failure of the transaction.
    fn note<T>(&mut self, r: Result<T, postgres::Error>) -> Result<T, postgres::Error> {
        if let Err(e) = &r {
            self.fail(Failure {
                retryable: retryable(e),
                lost: lost(e),
                serializable: false,
                server: e.as_db_error().is_some(),
                fatal: fatal(e),
                error: e.to_string(),
            });
        }
        r
    }

    /// Keeps `f` as the transaction's failure unless an earlier one is kept already.
    fn fail(&mut self, f: Failure) {
        self.failure.get_or_insert(f);
    }

    /// Aborts a `READ COMMITTED` attempt that read outside the locking rule: the closure runs
    /// again at `SERIALIZABLE`.
    pub(super) fn outside_rule(&mut self, what: &str) -> super::LedgerError {
        let error = format!("{what}: outside the READ COMMITTED locking rule");
        self.fail(Failure {
            retryable: true,
            lost: false,
            serializable: true,
            server: false,
            fatal: false,
            error: error.clone(),
        });
        super::LedgerError::Database(error)
    }

    /// Fails the transaction for a write the client refused to send (it never commits).
    fn refuse(&mut self, error: String) -> super::LedgerError {
        self.fail(Failure {
            retryable: false,
            lost: false,
            serializable: false,
            server: false,
            fatal: false,
            error: error.clone(),
        });
        super::LedgerError::Database(error)
    }

    /// `sql` prepared (once per connection: a round trip the first time).
    fn prepared(&mut self, sql: &'static str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        ROUND_TRIPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let s = self.client.prepare(sql);
        let s = self.note(s)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    /// Sends the pending `BEGIN`, the deferred writes and then `last` in one round trip; each
    /// answer noted, `last`'s returned (a deferred write that failed fails it too: the
    /// transaction is aborted).
    fn send(&mut self, last: Op<'_>) -> Result<Answer, postgres::Error> {
        let answer = self.send_unnoted(last);
        self.note(answer)
    }

    /// The rows of each of `queries`, all sent in one round trip (with the pending `BEGIN`
    /// and deferred writes before them), run by the database in their order: a lock the first
    /// takes is held when the next one runs. The first failure is returned (and noted).
    pub(crate) fn query_all(
        &mut self,
        queries: &[(&'static str, &[&(dyn ToSql + Sync)])],
    ) -> Result<Vec<Vec<postgres::Row>>, postgres::Error> {
        if queries.is_empty() {
            // Nothing to read: no round trip (a pending `BEGIN` and deferred writes go with
            // the next statement or the `COMMIT`).
            return Ok(Vec::new());
        }
        let mut statements = Vec::with_capacity(queries.len());
        for (sql, _) in queries {
            statements.push(self.prepared(sql)?);
        }
        let ops: Vec<Op<'_>> = statements
            .iter()
            .zip(queries)
            .map(|(s, (_, params))| Op::Query(s, params))
            .collect();
        let answers = self.send_all(&ops);
        let mut all = Vec::with_capacity(answers.len());
        let mut first = None;
        for a in answers {
            match self.note(a) {
                Ok(Answer::Rows(rows)) => all.push(rows),
                Ok(_) => all.push(Vec::new()),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(all),
        }
    }

    /// [`Self::send`], `last`'s answer not noted.
    fn send_unnoted(&mut self, last: Op<'_>) -> Result<Answer, postgres::Error> {
        let mut answers = self.send_all(std::slice::from_ref(&last));
        answers.pop().expect("the last statement's answer")
    }

    /// Sends the pending `BEGIN`, the deferred writes and then `tail` in one round trip; the
    /// answers before `tail`'s noted, `tail`'s returned.
    fn send_all(&mut self, tail: &[Op<'_>]) -> Vec<Result<Answer, postgres::Error>> {
        let begin = self.take_begin();
        let deferred = std::mem::take(&mut self.deferred);
        let refs: Vec<Vec<&(dyn ToSql + Sync)>> = deferred
            .iter()
            .map(|d| d.params.iter().map(|p| p as &(dyn ToSql + Sync)).collect())
            .collect();
        let mut ops = Vec::with_capacity(deferred.len() + tail.len() + 1);
        ops.extend(begin.map(Op::Control));
        for (d, params) in deferred.iter().zip(&refs) {
            ops.push(Op::Execute(&d.statement, params));
        }
        ops.extend_from_slice(tail);
        ROUND_TRIPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut answers = self.client.pipeline(&ops);
        let tail = answers.split_off(answers.len() - tail.len());
        for a in answers {
            let _ = self.note(a);
        }
        tail
    }

    /// Rows of `sql`.
    pub(crate) fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let s = self.prepared(sql)?;
        match self.send(Op::Query(&s, params))? {
            Answer::Rows(rows) => Ok(rows),
            _ => unreachable!("a query answers rows"),
        }
    }

    /// At most one row of `sql` (more is an error).
    pub(crate) fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<postgres::Row>, postgres::Error> {
        let s = self.prepared(sql)?;
        match self.send(Op::QueryOpt(&s, params))? {
            Answer::Row(row) => Ok(row),
            _ => unreachable!("a query of one row answers a row"),
        }
    }

    /// Runs `sql`; the rows it changed.
    pub(crate) fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let s = self.prepared(sql)?;
        match self.send(Op::Execute(&s, params))? {
            Answer::Count(n) => Ok(n),
            _ => unreachable!("a statement answers its row count"),
        }
    }

    /// Runs `sql` with the next statement or the `COMMIT`: nothing waits for its answer (a
    /// failure fails the transaction there). Only for a write transaction's statements.
    ///
    /// Its parameters are encoded here once: a write the client cannot encode (a parameter of
    /// the wrong type or number) would fail without ever reaching the server, which would then
    /// not abort the transaction, and the `COMMIT` sent behind it would commit the rest. Such a
    /// write fails the transaction now.
    pub(crate) fn defer(
        &mut self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<(), super::LedgerError> {
        let statement = self.prepared(sql).map_err(|e| super::db_error(&e))?;
        let params = match encode(&statement, &params) {
            Ok(encoded) => encoded,
            Err(e) => return Err(self.refuse(format!("a write not sent ({e}): {sql}"))),
        };
        self.deferred.push(Deferred { statement, params });
        Ok(())
    }

    /// Ends a write transaction whose closure succeeded (no failure noted): its deferred
    /// writes and `COMMIT` in one round trip (with its `BEGIN` too, if nothing was sent yet).
    pub(super) fn commit(&mut self) -> Commit {
        if self.begin == Begin::Write && self.deferred.is_empty() {
            return Commit::Nothing;
        }
        let answer = self.send_unnoted(Op::Control("COMMIT"));
        self.begin = Begin::Ended;
        match (&self.failure, answer) {
            // The server ended the session at a statement before the COMMIT (a stale pooled
            // connection's BEGIN, say): its backend never ran the COMMIT.
            (Some(f), _) if f.fatal => Commit::Failed,
            // The connection went while the writes were out: the COMMIT may have run.
            (Some(f), _) if f.lost => Commit::Unknown(f.error.clone()),
            // A write before the COMMIT failed on the server: the transaction is aborted there,
            // and the COMMIT rolled it back.
            (Some(f), _) if f.server => Commit::Failed,
            // A write failed in the client (not sent, or its answer not understood): the server
            // did not abort for it, so the COMMIT may have committed without it, or with it.
            (Some(f), _) => Commit::Unknown(f.error.clone()),
            (None, Ok(_)) => Commit::Done,
            (None, Err(e)) if lost(&e) => Commit::Unknown(e.to_string()),
            (None, Err(e)) => Commit::Refused(e),
        }
    }
}

/// Whether the server answered a statement by ending the session (its backend exits after
/// sending a `FATAL` or `PANIC` error: it runs nothing after that statement).
fn fatal(e: &postgres::Error) -> bool {
    use postgres::error::Severity;
    e.as_db_error().is_some_and(|d| match d.parsed_severity() {
        Some(s) => matches!(s, Severity::Fatal | Severity::Panic),
        None => matches!(d.severity(), "FATAL" | "PANIC"),
    })
}

/// `params` encoded for `statement` as the client sends them, or why they cannot be: their
/// number, each one's type, and each one's size (a message field holds at most `i32::MAX`
/// bytes).
fn encode(statement: &postgres::Statement, params: &[Param]) -> Result<Vec<Encoded>, String> {
    let types = statement.params();
    if types.len() != params.len() {
        return Err(format!(
            "{} parameters for a statement of {}",
            params.len(),
            types.len()
        ));
    }
    let mut buf = bytes::BytesMut::new();
    let mut encoded = Vec::with_capacity(params.len());
    for (i, (p, ty)) in params.iter().zip(types).enumerate() {
        let null = p
            .to_sql_checked(ty, &mut buf)
            .map_err(|e| format!("parameter ${}: {e}", i + 1))?;
        if i32::try_from(buf.len()).is_err() {
            return Err(format!("parameter ${}: too large to send", i + 1));
        }
        let bytes = buf.split().freeze();
        encoded.push(Encoded(match null {
            postgres::types::IsNull::No => Some(bytes),
            postgres::types::IsNull::Yes => None,
        }));
    }
    Ok(encoded)
}

#[cfg(test)]
#[path = "db_tests.rs"]
mod tests;
