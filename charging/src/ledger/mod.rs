//! The double-entry ledger, behind an interface.
//!
//! Every movement of value is a [`Posting`]: an amount from one account to another, with a
//! reference that traces it to a card counter (`load:<UID>:<TMC>`, `tap:<UID>:<TMC>`) or a
//! funding reference. Account balances are kept beside the postings in the same transaction,
//! so the sum of all balances is always zero and a card account's balance is its shadow purse
//! relative to issuance: personalised value + loads − debits.
//!
//! Load intents are keyed by (card UID, the card's TMC before the load): at most one intent per
//! card counter can exist, so a load can never be applied or paid twice.
//!
//! Account names: `card:<UID hex>`, `issuer:float` (value issued at personalisation),
//! `funding:<source>` (what a funding source owes us), `operator:<id>` (fare revenue),
//! `pts:<programme>:member:<id>` (a points member's points, in points; `<id>` is a validated
//! instrument id, so it never names `pts:<programme>:issued`, `…:redeemed` or `…:held:…`),
//! `franchise:<id>`. No account name is ever formatted from a request without validation:
//! funding instruments are looked up in the instrument registry ([`Instrument`]).
//!
//! ## The interface
//!
//! The services (load, clearing, franchise, partner, the API) reach the ledger only through
//! [`Ledger`]: [`Ledger::read`] gives a consistent snapshot ([`LedgerRead`]), and
//! [`Ledger::transact`] runs a closure in one write transaction ([`LedgerWrite`]) whose
//! operations are the ledger's own steps in the domain's words (post, book a counter, insert /
//! complete / void an intent, record an anomaly, block a card, sweep the gaps); everything the
//! closure does commits together, durably, before `transact` returns, or not at all. No storage
//! type crosses the interface. The records ([`Posting`], [`LoadIntent`], [`CardShadow`],
//! [`Anomaly`], …) are the ledger's own: the callers decide what goes in them.
//!
//! The first backend is LMDB ([`LmdbLedger`], `lmdb/`: the databases, a group committer that
//! shares one fsync between concurrent transactions, one file per concern), the default. The
//! second is PostgreSQL ([`PgLedger`], `postgres/`: versioned migrations in
//! `charging/migrations/`, `SERIALIZABLE` transactions on connection threads of their own,
//! retried on conflicts); [`Ledger::open_postgres`] opens it, and no service changes.
//!
//! A transaction's closure is `FnMut`: the database backend runs it again from the start when
//! the database aborts its transaction (a serialization failure, a deadlock), so a closure
//! must not consume what it captured (clone it instead) and must have no effect outside the
//! ledger that a second run would repeat.

mod interface;
mod lmdb;
pub mod postgres;
mod records;
mod rules;

pub use interface::propagation::{self as block_propagation, BlockReach};
pub use interface::{
    check_owner, walk_card_pages, CardPage, Completion, LedgerOnly, LedgerRead, LedgerWrite,
    Lookups, NewPosting, ReadsAhead, MAX_OWNER_BYTES,
};
pub use lmdb::{
    LedgerCore, LmdbLedger, LmdbRead, LmdbWrite, DEFAULT_MAP_SIZE_BYTES, GROUP_COMMIT_MAX_JOBS,
    GROUP_COMMIT_QUEUE_JOBS,
};
pub use postgres::{PgConfig, PgLedger};
pub use records::*;
use std::path::Path;

/// Ledger errors.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// LMDB failed (disk full, map full, I/O).
    #[error("ledger storage: {0}")]
    Storage(#[from] heed::Error),
    /// A proof offered to complete an intent is not that intent's change (another kind or
    /// amount): nothing is booked.
    #[error("card {uid} at counter {tmc}: the proof is not the pending change ({why})")]
    ProofNotIntent {
        /// card
        uid: String,
        /// counter before the change
        tmc: u32,
        /// what differs
        why: String,
    },
    /// An intent already exists for this card counter and is not settled.
    #[error("card {uid} already has a load pending at counter {tmc}")]
    IntentExists {
        /// card
        uid: String,
        /// counter
        tmc: u32,
    },
    /// A load cannot be marked as being reversed (none there, not completed, marked already).
    #[error("the load of card {uid} at counter {tmc} cannot be reversed: {why}")]
    NotReversible {
        /// card
        uid: String,
        /// the counter the load consumed
        tmc: u32,
        /// why
        why: &'static str,
    },
    /// No intent for this card counter.
    #[error("no load intent for card {uid} at counter {tmc}")]
    NoIntent {
        /// card
        uid: String,
        /// counter
        tmc: u32,
    },
    /// The payment cannot be paid now (unknown, expired, pending, paid).
    #[error("payment {id} cannot be paid: {why}")]
    PaymentNotOpen {
        /// payment id
        id: String,
        /// why
        why: String,
    },
    /// The refund cannot be made or collected (not paid, window passed, above what was paid,
    /// another card, already collected).
    #[error("refund refused: {0}")]
    RefundRefused(String),
    /// A plain posting named a card's account: value reaches or leaves a card only on a
    /// proof (a transaction MAC the HSM verified, a load's completion), or at its issuance.
    #[error("posting to or from {account} needs the card's proof")]
    CardAccount {
        /// the card account named
        account: String,
    },
    /// A posting would be invalid (non-positive amount, same account on both sides).
    #[error("invalid posting: {0}")]
    InvalidPosting(&'static str),
    /// A card's owner the ledger cannot index (a NUL byte, too long): nothing is changed.
    #[error("invalid card owner: {0}")]
    InvalidOwner(&'static str),
    /// The group commit failed (disk full, I/O): nothing of the batch is durable.
    #[error("ledger commit failed: {0}")]
    Commit(String),
    /// The ledger's environment could not be opened (directory, map size, LMDB).
    #[error("opening the ledger: {0}")]
    Open(#[from] tapgate_lmdb::OpenError),
    /// The ledger's database could not be reached (refused, lost, a bad URL), after the
    /// retries its transactions take: nothing of the transaction is durable.
    #[error("ledger database unavailable: {0}")]
    Unavailable(String),
    /// The connection to the ledger's database was lost while it committed: the transaction
    /// may or may not be durable (read it back before doing it again).
    #[error("ledger database lost during commit, outcome unknown: {0}")]
    CommitUnknown(String),
    /// The ledger's database refused a statement (not a conflict: those are retried).
    #[error("ledger database: {0}")]
    Database(String),
    /// The ledger database's schema is not the one this build knows.
    #[error("ledger schema: {0}")]
    Schema(String),
    /// The ledger directory could not be prepared, or its committer thread not started.
    #[error("ledger directory {path}: {source}")]
    Dir {
        /// path
        path: String,
        /// cause
        source: std::io::Error,
    },
}

/// Why clearing blocks a card it saw use one counter twice with different contents (a clone);
/// reconciliation reports a card blocked for exactly this reason as a clone (as the gap sweep
/// blocks and unblocks under [`GAP_BLOCK_REASON`]).
pub const CLONE_BLOCK_REASON: &str = "clone suspected: a counter seen twice";

/// A card clearing learned from its first proved tap (it was never registered, loaded or
/// cleared before): issued from `issuer:float` with the balance it proved just before
/// counter `tmc`, stored under [`learned_card_key`]. A change the card made at a counter below
/// `tmc` (a tap, a franchise load, an online load completed late) is inside that balance, so
/// the card side of its posting is `issuer:float`, never the card again
/// ([`LedgerRead::changed_before_learned`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LearnedCard {
    /// The counter of the tap the card was learned from.
    pub tmc: u32,
    /// The balance the card proved just before that tap, which it was issued with.
    pub balance_before_minor: i32,
}

/// The key a [`LearnedCard`] is stored under (`learned-card:<UID>`).
pub fn learned_card_key(uid: &[u8; 7]) -> String {
    format!("learned-card:{}", hex::encode_upper(uid))
}

/// The account name of a card's shadow purse.
pub fn card_account(uid: &[u8; 7]) -> String {
    format!("card:{}", hex::encode_upper(uid))
}

/// The key of a load intent: UID (7) ‖ TMC before (u32 BE) ‖ attempt (u16 BE), so one card's
/// intents sort by counter and keys only grow.
pub fn intent_key(uid: &[u8; 7], tmc_before: u32, attempt: u16) -> [u8; 13] {
    tapgate_lmdb::key::uid_counter_attempt(uid, tmc_before, attempt)
}

/// The ledger the services hold: a cheap clone of one opened backend.
#[derive(Clone)]
pub struct Ledger {
    backend: Backend,
}

/// The storage behind a [`Ledger`].
#[derive(Clone)]
enum Backend {
    /// LMDB, in the charging server's data directory (boxed: its databases' handles make it
    /// far larger than the PostgreSQL handle).
    Lmdb(Box<LmdbLedger>),
    /// PostgreSQL (`[ledger] kind = "postgres"`).
    Postgres(PgLedger),
}

impl Ledger {
    /// Opens (or creates) the LMDB ledger in `dir` with room for `map_size_bytes`, and starts
    /// its committer thread (it ends when the last `Ledger` clone is closed or dropped).
    pub fn open(dir: &Path, map_size_bytes: usize) -> Result<Ledger, LedgerError> {
        Ok(Ledger {
            backend: Backend::Lmdb(Box::new(LmdbLedger::open(dir, map_size_bytes)?)),
        })
    }

    /// Connects to the PostgreSQL ledger `cfg` names, refusing a database whose schema is not
    /// the one this build knows ([`LedgerError::Schema`]: `tapgate charging migrate` applies
    /// the migrations). Its connections live on threads of their own, so it may be opened and
    /// used from any thread, a tokio worker included.
    pub fn open_postgres(cfg: PgConfig) -> Result<Ledger, LedgerError> {
        // The schema check connects on a connection thread too.
        Ok(Ledger {
            backend: Backend::Postgres(PgLedger::open(cfg)?),
        })
    }

    /// Which backend holds the ledger: `lmdb` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::Lmdb(_) => "lmdb",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// A consistent read snapshot.
    pub fn read(&self) -> Result<Box<dyn LedgerRead + '_>, LedgerError> {
        match &self.backend {
            Backend::Lmdb(l) => Ok(Box::new(l.read()?)),
            Backend::Postgres(p) => Ok(Box::new(p.read()?)),
        }
    }

    /// Reads that each see the latest committed state, not one snapshot: on PostgreSQL each
    /// is one statement with no transaction around it (no `BEGIN` and `COMMIT` round trips);
    /// on LMDB a snapshot ([`Ledger::read`]) is as cheap. For a step whose reads need not agree
    /// with one another: what it decides from them is checked again in the write transaction
    /// that follows (a load's key, limits and intent, `load/decide.rs`).
    pub fn read_latest(&self) -> Result<Box<dyn LedgerRead + '_>, LedgerError> {
        match &self.backend {
            Backend::Lmdb(l) => Ok(Box::new(l.read()?)),
            Backend::Postgres(p) => Ok(Box::new(p.read_latest()?)),
        }
    }

    /// Runs `f` in one write transaction and returns once it is durable (committed together
    /// with concurrent callers' transactions). If `f` fails, only its own writes are rolled
    /// back. On PostgreSQL `f` may run more than once (a conflict rolls back its transaction
    /// and runs it again): only the run that commits counts.
    ///
    /// The wait (the group commit's fsync, the database's round trips) goes through
    /// [`may_block`]: on a tokio worker the runtime's other tasks move to another thread
    /// meanwhile, so a request handler may call this without handing all its work to a
    /// blocking thread.
    pub fn transact<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut dyn LedgerWrite) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        may_block(|| match &self.backend {
            Backend::Lmdb(l) => l.transact(f),
            Backend::Postgres(p) => p.transact(f),
        })
    }

    /// [`Ledger::transact`] for an async caller (a request handler on a tokio worker): the
    /// task waits for the commit without holding a thread. On LMDB the group committer
    /// completes a oneshot once the batch holding `f` is durable, so the worker runs the
    /// runtime's other tasks meanwhile with no hand-off to another thread (`block_in_place`
    /// wakes one per wait); on PostgreSQL it runs as [`Ledger::transact`] does (its round
    /// trips through [`may_block`]). `f` is handed over when the future is first polled and
    /// commits even if the future is dropped afterwards: a caller that must act on the outcome
    /// runs it in a task of its own.
    pub async fn transact_async<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut dyn LedgerWrite) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        match &self.backend {
            Backend::Lmdb(l) => l.transact_async(f).await,
            Backend::Postgres(p) => may_block(|| p.transact(f)),
        }
    }

    /// Closes this handle; the last one to close waits for the backend to finish, so the
    /// ledger can be opened again in the same process.
    pub fn close(self) {
        match self.backend {
            Backend::Lmdb(l) => l.close(),
            Backend::Postgres(p) => p.close(),
        }
    }
}

/// Runs `f`, which waits (a group commit's fsync, a database's or a remote system's answer):
/// on a worker of a multi-threaded tokio runtime through `block_in_place`, so the worker's
/// other tasks move to another thread while this one waits; anywhere else (a plain thread, a
/// blocking-pool thread, a current-thread runtime) it simply runs `f`. Inside another
/// `may_block` it costs nothing more (the worker's tasks have moved already).
pub fn may_block<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Runs `fut` to completion on this thread: the synchronous form of an async ledger caller
/// ([`Ledger::transact_async`]'s, the load service's). Polled here first; only if it has to
/// wait does the thread park until it is woken, through [`may_block`] (so on a tokio worker the
/// runtime's other tasks move meanwhile).
pub fn wait_for<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
        return v;
    }
    may_block(|| loop {
        std::thread::park();
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A request handler that waits for a group commit on the worker itself (no hand-off to
    /// a blocking thread) must not hold the runtime's other tasks up: with one worker, a
    /// transaction that can only finish once another task has run still finishes.
    #[test]
    fn a_commit_waited_for_on_a_worker_lets_other_tasks_run() {
        let dir = tempfile::tempdir().expect("dir");
        let ledger = Ledger::open(dir.path(), 1 << 24).expect("ledger");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (ran_tx, ran_rx) = std::sync::mpsc::channel::<()>();
        let waiting = ledger.clone();
        let outcome = rt.block_on(async move {
            let handler = tokio::spawn(async move {
                waiting.transact(move |_| Ok(ran_rx.recv_timeout(Duration::from_secs(5)).is_ok()))
            });
            // Give the handler the worker first, then ask for it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let other = tokio::spawn(async move {
                let _ = ran_tx.send(());
            });
            other.await.expect("other task");
            handler.await.expect("handler")
        });
        assert!(
            outcome.expect("committed"),
            "the other task ran while the handler waited"
        );
        ledger.close();
    }

    /// Outside a multi-threaded runtime (a plain thread, a current-thread runtime) the wait
    /// simply blocks, as it did before.
    #[test]
    fn may_block_runs_anywhere() {
        assert_eq!(may_block(|| 1), 1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(rt.block_on(async { may_block(|| 2) }), 2);
    }
}
