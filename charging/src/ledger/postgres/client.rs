//! One connection to the database ([`PgClient`]), driven by whichever thread leased it: the
//! asynchronous `tokio-postgres` client on a single-threaded runtime of its own, so that statements
//! that do not wait for one another's answers go out together — one round trip for a
//! transaction's `BEGIN` and its first statement, or for its last writes and its `COMMIT`
//! ([`PgClient::pipeline`]). The synchronous `postgres` client cannot send a statement before
//! the previous one's answer came back.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row, Statement};

/// A statement of a pipeline.
#[derive(Clone, Copy)]
pub(crate) enum Op<'a> {
    /// A statement without parameters or rows, by the simple protocol (`BEGIN …`, `COMMIT`).
    Control(&'static str),
    /// A prepared statement whose rows, if any, are not wanted: its row count.
    Execute(&'a Statement, &'a [&'a (dyn ToSql + Sync)]),
    /// A prepared statement's rows.
    Query(&'a Statement, &'a [&'a (dyn ToSql + Sync)]),
    /// A prepared statement's one row, if any (more is an error).
    QueryOpt(&'a Statement, &'a [&'a (dyn ToSql + Sync)]),
}

/// A statement's answer in a pipeline.
#[derive(Debug)]
pub(crate) enum Answer {
    /// A control statement ran.
    Done,
    /// The rows a statement changed.
    Count(u64),
    /// A query's rows.
    Rows(Vec<Row>),
    /// A query's one row, if any.
    Row(Option<Row>),
}

/// A connection and the single-threaded runtime that drives it (on the thread of the caller
/// that leased it, never one that is running a tokio task: `super::Lease::run`).
pub(crate) struct PgClient {
    client: tokio_postgres::Client,
    /// Always `Some` until the client drops.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for PgClient {
    /// The runtime (and with it the connection's task) is shut down without waiting: a pool
    /// may drop its connections on a tokio worker, where dropping a runtime would panic.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<Answer, Error>> + 'a>>;

impl PgClient {
    /// Connects with `config` over `tls` (on a thread that is running no tokio task); the error is
    /// the reason, for the caller's message.
    pub(crate) fn connect<T>(config: &tokio_postgres::Config, tls: T) -> Result<PgClient, String>
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + 'static + Send,
        T::TlsConnect: Send,
        T::Stream: Send,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the connection's runtime: {e}"))?;
        let (client, connection) = rt
            .block_on(config.connect(tls))
            .map_err(|e| e.to_string())?;
        // Driven whenever the thread waits for an answer (`block_on`); it ends with the
        // connection, or when this client (and its runtime) is dropped.
        rt.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%e, "a ledger connection ended");
            }
        });
        Ok(PgClient {
            client,
            rt: Some(rt),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the client")
    }

    /// Whether the connection is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Runs `sql` (statements without parameters) by the simple protocol.
    pub(crate) fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        self.rt().block_on(self.client.batch_execute(sql))
    }

    /// Prepares `sql`.
    pub(crate) fn prepare(&mut self, sql: &str) -> Result<Statement, Error> {
        self.rt().block_on(self.client.prepare(sql))
    }

    /// Sends `ops` without waiting for one answer before the next statement, in their order
    /// (the database runs them in that order), and returns their answers in the same order.
    /// A statement after one that failed inside a transaction fails too ("current transaction
    /// is aborted"), and a `COMMIT` after it rolls the transaction back.
    pub(crate) fn pipeline(&mut self, ops: &[Op<'_>]) -> Vec<Result<Answer, Error>> {
        let client = &self.client;
        let mut pending: Vec<Pending<'_>> =
            ops.iter()
                .map(|op| -> Pending<'_> {
                    match *op {
                        Op::Control(sql) => Box::pin(async move {
                            client.batch_execute(sql).await.map(|()| Answer::Done)
                        }),
                        Op::Execute(s, p) => {
                            Box::pin(async move { client.execute(s, p).await.map(Answer::Count) })
                        }
                        Op::Query(s, p) => {
                            Box::pin(async move { client.query(s, p).await.map(Answer::Rows) })
                        }
                        Op::QueryOpt(s, p) => {
                            Box::pin(async move { client.query_opt(s, p).await.map(Answer::Row) })
                        }
                    }
                })
                .collect();
        let mut answers: Vec<Option<Result<Answer, Error>>> = ops.iter().map(|_| None).collect();
        // Each statement is queued for the connection when its future is first polled: polling
        // them in order queues them in order, before the connection task writes any of them.
        self.rt().block_on(std::future::poll_fn(|cx| {
            let mut all = true;
            for (future, answer) in pending.iter_mut().zip(answers.iter_mut()) {
                if answer.is_some() {
                    continue;
                }
                match future.as_mut().poll(cx) {
                    Poll::Ready(a) => *answer = Some(a),
                    Poll::Pending => all = false,
                }
            }
            if all {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }));
        answers
            .into_iter()
            .map(|a| a.expect("every statement answered"))
            .collect()
    }
}
