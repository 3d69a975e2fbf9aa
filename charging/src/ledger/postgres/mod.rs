//! The ledger in PostgreSQL: the same [`LedgerRead`] / [`LedgerWrite`] over SQL tables
//! (`charging/migrations/`), exactly-once enforced by the database.
//!
//! ## Threads
//!
//! Each pooled connection is the asynchronous `tokio-postgres` client on a single-threaded
//! runtime of its own (`client.rs`), so that statements that do not wait for one another go out
//! together. A caller leases a connection and drives it on its own thread
//! ([`Lease::run`]): a transaction's closure, a snapshot's reads and their round trips all run
//! where the caller is, with no hand-off to another thread and back. Driving a runtime
//! (`block_on`) is not allowed on a thread that is running a tokio task, so the wait goes
//! through [`crate::ledger::may_block`] (`block_in_place` on a worker of the server's
//! multi-threaded runtime: its other tasks move to another thread meanwhile; free inside another
//! `may_block`), or — on a current-thread runtime's thread (a test's) — to a scoped thread.
//! (Until 2026-12-07 each connection was owned by a thread of its own that ran the jobs sent to
//! it: two thread switches per transaction or read, and a profile of the loads bench found
//! 56 % of the charging process's samples in the kernel, half of them the scheduler:
//! docs/postgres.md.)
//!
//! ## Transactions
//!
//! A write transaction runs at `SERIALIZABLE` unless its closure asks for `READ COMMITTED`
//! ([`read_committed`]): every `SERIALIZABLE` closure behaves as if it ran alone, as it does
//! under LMDB's single writer, so the ledger's steps (read a shadow, decide, write it back) need
//! no explicit locks. A `READ COMMITTED` one (a load's intent and completion) follows the
//! locking rule instead (`docs/postgres.md`, "Locking rule"; `write.rs`): the rows it decides
//! on are read `FOR UPDATE`, the card's first, and any read outside the rule runs the closure
//! again at `SERIALIZABLE`. The isolation goes out with the transaction's `BEGIN`, sent with
//! its first statement. Unique keys back the rules up (one live intent per card counter, one
//! payment per merchant order, one posting sequence). A transaction the database aborts — a
//! serialization failure (SQLSTATE 40001), a deadlock (40P01), a unique key taken by a
//! concurrent transaction (23505) — is rolled back and the closure run again from the start
//! (hence `FnMut`), up to [`MAX_ATTEMPTS`] times with a growing, jittered pause. A connection
//! refused or lost before `COMMIT` is retried the same way on a new connection (for up to
//! [`PgConfig::connect_timeout`]); one lost *during* `COMMIT` is reported
//! ([`LedgerError::CommitUnknown`]), never retried blindly. A read snapshot is `REPEATABLE READ
//! READ ONLY`.
//!
//! Any database error inside a closure poisons its transaction: even if the closure ignores the
//! error and returns `Ok`, nothing commits and `transact` returns the error (or retries).

mod cards;
mod client;
mod db;
mod lookup;
mod read;
mod schema;
mod staged;
mod write;

pub use read::PgRead;
pub use schema::{known_version, migrate, schema_version, MIGRATIONS};
pub use write::PgWrite;

/// `f` as a transaction that runs at `READ COMMITTED` on PostgreSQL, under the locking rule
/// (`docs/postgres.md`, "Locking rule"): each row it reads to decide on is locked
/// (`SELECT … FOR UPDATE`), the card's row before anything else of the card; a claim is an
/// insert under a unique key; a day total is raised by one conditional update; a balance moves
/// by `balance + delta`; a card with no row is locked by a neutral row in its place (deleted
/// before `COMMIT` unless `f` wrote the card). A read the rule does not cover (a payment, a
/// refund, a balance summed over shards, …) aborts the attempt and runs `f` again at
/// `SERIALIZABLE`, so a closure that strays is slower, never wrong. On LMDB (one writer) the
/// choice changes nothing.
pub fn read_committed<T>(
    mut f: impl FnMut(&mut dyn LedgerWrite) -> Result<T, LedgerError> + Send + 'static,
) -> impl FnMut(&mut dyn LedgerWrite) -> Result<T, LedgerError> + Send + 'static {
    move |t| {
        write::choose(Isolation::ReadCommitted);
        f(t)
    }
}

/// The isolation level of a write transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isolation {
    /// As if alone (the default).
    Serializable,
    /// Each statement sees what committed before it; the locking rule keeps the steps right.
    ReadCommitted,
}

impl Isolation {
    fn begin(self) -> &'static str {
        match self {
            Isolation::Serializable => "BEGIN ISOLATION LEVEL SERIALIZABLE",
            Isolation::ReadCommitted => "BEGIN ISOLATION LEVEL READ COMMITTED",
        }
    }
}

use super::interface::LedgerWrite;
use super::LedgerError;
use client::PgClient;
pub(crate) use db::Db;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Shards of an account other than a card's: concurrent transactions on different connections
/// move different rows of `funding:card` or `operator:<id>` (see `0001_ledger.sql`).
pub const SHARDS: usize = 16;

/// Statements sent (each a round trip; `BEGIN`, `COMMIT` and `ROLLBACK` too) by this process's
/// ledgers: the bench reads it.
pub(crate) static ROUND_TRIPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sends a transaction's control statement (`BEGIN …`, `COMMIT`, `ROLLBACK`), counted as one
/// round trip as a [`Db`] statement is.
fn control(client: &mut PgClient, sql: &str) -> Result<(), postgres::Error> {
    ROUND_TRIPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    client.batch_execute(sql)
}

/// Most runs of one transaction's closure (serialization failures, deadlocks, lost connections).
pub const MAX_ATTEMPTS: u32 = 40;

/// How to reach the database. The password is never printed ([`std::fmt::Debug`] hides it).
#[derive(Clone)]
pub struct PgConfig {
    /// `postgres://user@host:port/db` (a password in the URL works but is discouraged: the
    /// config file names `password_file` or `password_env` instead).
    pub url: String,
    /// The password, read from the file or environment variable the config names.
    pub password: Option<zeroize::Zeroizing<String>>,
    /// Most connections.
    pub max_connections: usize,
    /// How long a transaction keeps trying to reach a database that refuses connections.
    pub connect_timeout: Duration,
    /// The CA certificates (PEM) that sign the database server's certificate: with them,
    /// every connection is TLS and the server's certificate is checked against them and the
    /// URL's host (a URL saying `sslmode=disable` is refused). Without them, plain TCP
    /// (loopback or a private network only; a URL saying `sslmode=require` is refused, and
    /// `prefer` never tries TLS half-way).
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// The URL with any password in it replaced (for messages).
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:<hidden>{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl PgConfig {
    /// A config for `url` with `password` and the defaults (16 connections, 10 s to connect).
    pub fn new(url: &str, password: Option<&str>) -> PgConfig {
        PgConfig {
            url: url.to_string(),
            password: password.map(|p| zeroize::Zeroizing::new(p.to_string())),
            max_connections: 16,
            connect_timeout: Duration::from_secs(10),
            ca_file: None,
        }
    }

    fn client_config(&self) -> Result<tokio_postgres::Config, LedgerError> {
        let mut c: tokio_postgres::Config = self.url.parse().map_err(|e| {
            LedgerError::Unavailable(format!("ledger url {}: {e}", redact_url(&self.url)))
        })?;
        if let Some(p) = &self.password {
            c.password(p.as_bytes());
        }
        c.application_name("tapgate-charging");
        c.connect_timeout(Duration::from_secs(5));
        match (&self.ca_file, c.get_ssl_mode()) {
            (Some(_), tokio_postgres::config::SslMode::Disable) => {
                return Err(LedgerError::Unavailable(
                    "the ledger url says sslmode=disable but a CA file is configured for TLS"
                        .into(),
                ))
            }
            (Some(_), _) => {
                c.ssl_mode(tokio_postgres::config::SslMode::Require);
            }
            (None, tokio_postgres::config::SslMode::Require) => {
                return Err(LedgerError::Unavailable(
                    "the ledger url asks for TLS (sslmode=require): name the CA that signs the database's certificate ([ledger] ca_file)"
                        .into(),
                ))
            }
            (None, _) => {
                // No TLS configured: never try it half-way (`prefer` would fall back silently).
                c.ssl_mode(tokio_postgres::config::SslMode::Disable);
            }
        }
        Ok(c)
    }

    /// The TLS connector for `ca_file`: the server's certificate must chain to these CAs and
    /// name the URL's host.
    fn tls(
        &self,
        ca_file: &std::path::Path,
    ) -> Result<tokio_postgres_rustls::MakeRustlsConnect, LedgerError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let bad = |e: String| {
            LedgerError::Unavailable(format!("ledger ca_file {}: {e}", ca_file.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| bad(e.to_string()))? {
            roots
                .add(cert.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    /// Connects once with the synchronous client (on the calling thread: only from threads
    /// without a tokio runtime, such as the `migrate` command's): the schema's checks and
    /// migrations.
    fn connect(&self) -> Result<postgres::Client, LedgerError> {
        let config = postgres::Config::from(self.client_config()?);
        let unavailable = |e: postgres::Error| {
            LedgerError::Unavailable(format!("{}: {e}", redact_url(&self.url)))
        };
        match &self.ca_file {
            Some(ca) => config.connect(self.tls(ca)?).map_err(unavailable),
            None => config.connect(postgres::NoTls).map_err(unavailable),
        }
    }

    /// Connects a pooled connection's client (on a thread where a runtime may be driven:
    /// [`Lease::run`]).
    fn connect_pipelined(&self) -> Result<PgClient, LedgerError> {
        let config = self.client_config()?;
        let connected = match &self.ca_file {
            Some(ca) => PgClient::connect(&config, self.tls(ca)?),
            None => PgClient::connect(&config, tokio_postgres::NoTls),
        };
        connected.map_err(|e| LedgerError::Unavailable(format!("{}: {e}", redact_url(&self.url))))
    }
}

/// A connection and its prepared statements, lent to one caller at a time.
pub(crate) struct Session {
    cfg: Arc<PgConfig>,
    /// The shard of the busy accounts this connection's transactions move ([`SHARDS`]).
    shard: i16,
    client: Option<PgClient>,
    statements: std::collections::HashMap<&'static str, postgres::Statement>,
}

impl Session {
    /// The connection, (re)connected if it is missing or closed.
    fn client(&mut self) -> Result<&mut PgClient, LedgerError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.clear();
            self.client = None;
            self.client = Some(self.cfg.connect_pipelined()?);
        }
        Ok(self.client.as_mut().expect("just connected"))
    }

    /// Forgets a connection that failed (the next job connects afresh).
    fn drop_client(&mut self) {
        self.client = None;
        self.statements.clear();
    }
}

/// A connection lent to one caller; back to the pool on drop. The caller's own thread drives
/// it ([`Lease::run`]): no hand-off to another thread and back for each transaction or read.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    session: std::cell::RefCell<Option<Session>>,
}

impl Lease {
    /// Runs `f` with the leased connection, on this thread where it may wait (see
    /// [`on_this_thread`]). A panic in `f` (a caller's closure) closes the connection (perhaps
    /// in the middle of a transaction) and resumes on the caller's thread.
    fn run<T: Send>(&self, f: impl FnOnce(&mut Session) -> T + Send) -> Result<T, LedgerError> {
        let mut held = self.session.borrow_mut();
        let s = held.as_mut().ok_or_else(stopped)?;
        let out =
            on_this_thread(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(s))));
        match out {
            Ok(v) => Ok(v),
            Err(panic) => {
                s.drop_client();
                std::panic::resume_unwind(panic)
            }
        }
    }
}

/// Runs `f`, which drives a connection's own single-threaded runtime (`block_on`), on the
/// calling thread wherever that is allowed: on a worker of a multi-threaded tokio runtime
/// through [`crate::ledger::may_block`] (`block_in_place`: the worker's other tasks move to
/// another thread, and the runtime counts this thread out while it waits), on a plain thread
/// or a blocking-pool thread as it is. A thread of a current-thread runtime (a test's) cannot
/// start another runtime: there `f` runs on a scoped thread of its own.
fn on_this_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
            std::thread::scope(|scope| match scope.spawn(f).join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            })
        }
        _ => crate::ledger::may_block(f),
    }
}

fn stopped() -> LedgerError {
    LedgerError::Commit("a ledger connection was lost to a panic".into())
}

struct Pool {
    cfg: Arc<PgConfig>,
    /// Idle connections, and how many exist (idle or lent).
    idle: Mutex<(Vec<Session>, usize)>,
    freed: Condvar,
}

thread_local! {
    /// Leases the current thread holds (a snapshot kept open while it transacts, say).
    static HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Drop for Lease {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
        let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        match self.session.get_mut().take() {
            Some(s) => idle.0.push(s),
            // Lost to a panic: room for a new one.
            None => idle.1 = idle.1.saturating_sub(1),
        }
        self.pool.freed.notify_one();
    }
}

impl Pool {
    /// A connection: an idle one, a new one below the limit, or — for a thread that holds one
    /// already — a new one beyond it. A thread waits only while it holds none, and holders
    /// never wait, so a snapshot held across a transaction (which LMDB allows) cannot deadlock
    /// the pool however many threads do it at once. A new connection connects on its first use.
    fn lease(self: &Arc<Self>) -> Result<Lease, LedgerError> {
        let holder = HELD.with(|h| h.get()) > 0;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let session = loop {
            if let Some(s) = idle.0.pop() {
                break s;
            }
            if holder || idle.1 < self.cfg.max_connections.max(1) {
                idle.1 += 1;
                let n = idle.1;
                break Session {
                    cfg: self.cfg.clone(),
                    shard: i16::try_from(n % SHARDS).unwrap_or(0),
                    client: None,
                    statements: Default::default(),
                };
            }
            idle = self.freed.wait(idle).unwrap_or_else(|p| p.into_inner());
        };
        drop(idle);
        HELD.with(|h| h.set(h.get() + 1));
        Ok(Lease {
            pool: self.clone(),
            session: std::cell::RefCell::new(Some(session)),
        })
    }
}

/// The PostgreSQL ledger: a pool of connections (cheap to clone).
#[derive(Clone)]
pub struct PgLedger {
    pool: Arc<Pool>,
}

impl std::fmt::Debug for PgLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLedger")
            .field("cfg", &self.pool.cfg)
            .finish()
    }
}

impl PgLedger {
    /// Connects and checks that the database holds exactly the schema this build knows
    /// ([`MIGRATIONS`]): an empty database, or an older or newer schema, is refused with what
    /// to do ([`LedgerError::Schema`]). `tapgate charging migrate` applies the migrations.
    pub fn open(cfg: PgConfig) -> Result<PgLedger, LedgerError> {
        let l = PgLedger {
            pool: Arc::new(Pool {
                cfg: Arc::new(cfg),
                idle: Mutex::new((Vec::new(), 0)),
                freed: Condvar::new(),
            }),
        };
        let lease = l.pool.lease()?;
        // The schema read by the synchronous client (where a runtime may be started: see
        // `on_this_thread`); the pooled connection is made by its first use.
        lease.run(|s| schema::check(&mut s.cfg.connect()?))??;
        Ok(l)
    }

    /// A consistent read snapshot (`REPEATABLE READ READ ONLY`), holding one connection until
    /// it is dropped.
    pub fn read(&self) -> Result<PgRead, LedgerError> {
        PgRead::begin(self.pool.lease()?)
    }

    /// Runs `f` in one `SERIALIZABLE` transaction (`READ COMMITTED` if `f` asks:
    /// [`read_committed`]), on the calling thread, and returns once it committed; a
    /// transaction the database aborts (serialization failure, deadlock, a unique key taken
    /// concurrently, a connection lost before `COMMIT`) is rolled back and `f` run again. If `f`
    /// fails, nothing of it commits.
    pub fn transact<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut dyn LedgerWrite) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let lease = self.pool.lease()?;
        lease.run(move |s| write::run(s, f))?
    }

    /// The retries taken so far by this process's transactions (serialization failures,
    /// deadlocks, lost connections, `READ COMMITTED` attempts run again at `SERIALIZABLE`):
    /// tests and the bench read it.
    pub fn retries() -> u64 {
        write::RETRIES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The round trips to the database taken so far by this process's ledgers (every
    /// statement, `BEGIN` and `COMMIT` included): the bench reads it.
    pub fn round_trips() -> u64 {
        ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Ends this handle; the connections close when the last handle is gone.
    pub fn close(self) {}
}

/// The pause before attempt `attempt` (1-based) of a transaction: 1 ms doubling to 100 ms, with
/// jitter so that two conflicting transactions do not collide again in step.
fn backoff(attempt: u32) -> Duration {
    let base = 1u64 << attempt.min(7);
    let ms = base.min(100);
    let jitter = rand::random::<u64>() % (ms + 1);
    Duration::from_micros((ms * 1_000) / 2 + jitter * 500)
}

/// Whether a database error ends the transaction but not the attempt: the closure may run again.
fn retryable(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    match e.code() {
        Some(c) => {
            *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::UNIQUE_VIOLATION
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || c.code().starts_with("08")
        }
        None => e.is_closed() || lost(e),
    }
}

/// Whether the error is the connection's (the server went away, a socket error).
fn lost(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<std::io::Error>() {
            return true;
        }
        src = s.source();
    }
    e.code().is_some_and(|c| {
        c.code().starts_with("08")
            || *c == postgres::error::SqlState::ADMIN_SHUTDOWN
            || *c == postgres::error::SqlState::CANNOT_CONNECT_NOW
    })
}

/// A database error as the ledger reports it.
fn db_error(e: &postgres::Error) -> LedgerError {
    if lost(e) {
        LedgerError::Unavailable(e.to_string())
    } else if e.code() == Some(&postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
        LedgerError::InvalidPosting("a number would overflow")
    } else {
        LedgerError::Database(match e.as_db_error() {
            Some(d) => format!("{} ({})", d.message(), d.code().code()),
            None => e.to_string(),
        })
    }
}

/// When a deadline passed.
fn past(deadline: Instant) -> bool {
    Instant::now() >= deadline
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows() {
        let c = PgConfig::new("postgres://u:secret@h:1/db", Some("hunter2"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
