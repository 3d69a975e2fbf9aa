//! The ledger in LMDB (heed), opened through `tapgate-lmdb`: its databases, a group committer
//! (concurrent transactions share one fsync), and the implementation of [`LedgerRead`] and
//! [`LedgerWrite`] over LMDB transactions.

mod anomalies;
mod blocked;
mod cards;
mod intents;
mod owners;
mod payments;
mod postings;
mod registry;
#[cfg(test)]
mod tests;

use super::interface::{LedgerOnly, LedgerRead, LedgerWrite};
use super::records::*;
use super::LedgerError;
use heed::byteorder::BE;
use heed::types::{Bytes, SerdeJson, Str, I64, U64};
use heed::{Database, Env, RoTxn, RwTxn, WithoutTls};
use std::path::Path;
use tapgate_lmdb::EnvConfig;

/// The LMDB ledger's databases; the methods behind [`LedgerRead`] and [`LedgerWrite`] live in
/// this module's files, by concern.
#[derive(Clone)]
pub struct LedgerCore {
    env: Env<WithoutTls>,
    balances: Database<Str, I64<BE>>,
    postings: Database<U64<BE>, SerdeJson<Posting>>,
    intents: Database<Bytes, SerdeJson<LoadIntent>>,
    cards: Database<Bytes, SerdeJson<CardShadow>>,
    idem: Database<Str, SerdeJson<serde_json::Value>>,
    vouchers: Database<Str, SerdeJson<Voucher>>,
    blocks: Database<U64<BE>, SerdeJson<BlockChange>>,
    /// Every block change by card: UID (7) ‖ version (u64 BE) → nothing, so a card's latest
    /// change is the last key under its UID.
    blocks_by_card: Database<Bytes, Bytes>,
    /// Every anomaly raised (clearing, the gap sweep), numbered.
    anomalies: Database<U64<BE>, SerdeJson<Anomaly>>,
    /// Cards with counters booked above a gap → the gap's clock.
    gaps: Database<Bytes, SerdeJson<GapClock>>,
    /// Loaded per (funding source, instrument, UTC day), minor units: the per-instrument
    /// daily limit.
    funding_days: Database<Str, I64<BE>>,
    /// Funding instruments and the account each belongs to, by (source, instrument id).
    instruments: Database<Str, SerdeJson<Instrument>>,
    /// Merchants' payments by id.
    payments: Database<Str, SerdeJson<Payment>>,
    /// (merchant, order id) → payment id.
    payment_orders: Database<Str, Str>,
    /// Payment id → its notification to the merchant.
    notifications: Database<Str, SerdeJson<Notification>>,
    /// Undelivered notifications by when they are due: next attempt (unix ms, u64 BE) ‖ payment
    /// id → nothing. A delivery round reads only the due ones, in the order they fell due.
    notifications_due: Database<Bytes, Bytes>,
    /// Refunds not collected (`pending`) by when they were made: made (unix ms, u64 BE) ‖
    /// refund id → nothing. The expiry sweep reads only the old ones.
    refunds_uncollected: Database<Bytes, Bytes>,
    /// Merchants' refunds by id.
    refunds: Database<Str, SerdeJson<Refund>>,
    /// Cards by owner: owner ‖ 0x00 ‖ UID (7) → nothing (`owners.rs`).
    card_owners: Database<Bytes, Bytes>,
    /// The blocked cards: UID (7) → nothing (`blocked.rs`).
    blocked_cards: Database<Bytes, Bytes>,
}

fn instrument_key(source: &str, id: &str) -> String {
    format!("{source}\u{1f}{id}")
}

/// The key of a load intent: UID (7) ‖ TMC before (u32 BE) ‖ attempt (u16 BE), so one card's
/// intents sort by counter and keys only grow.
fn intent_key(uid: &[u8; 7], tmc_before: u32, attempt: u16) -> [u8; 13] {
    tapgate_lmdb::key::uid_counter_attempt(uid, tmc_before, attempt)
}

fn counter_prefix(uid: &[u8; 7], tmc_before: u32) -> [u8; 11] {
    tapgate_lmdb::key::uid_counter(uid, tmc_before)
}

fn funding_day_key(key: FundingDay<'_>) -> String {
    format!("{}\u{1f}{}\u{1f}{}", key.source, key.instrument, key.day)
}

/// A unit of work for the group committer: runs inside a nested transaction of the shared
/// batch transaction and reports back once the batch is durable.
type Job = Box<dyn FnOnce(&mut dyn LedgerWrite) -> JobDone + Send>;

struct JobDone {
    ok: bool,
    deliver: Box<dyn FnOnce(Result<(), String>) + Send>,
}

/// Most jobs in one group commit.
pub const GROUP_COMMIT_MAX_JOBS: usize = 256;

/// Group commits made so far by this process's LMDB ledgers, and the jobs (transactions) they
/// held: the bench reads them ([`LmdbLedger::group_commits`]).
static GROUP_COMMITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static GROUP_COMMIT_JOBS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Most jobs waiting for the committer (back-pressure beyond it).
pub const GROUP_COMMIT_QUEUE_JOBS: usize = 4_096;

/// The LMDB ledger: its databases plus a group committer, so that concurrent transactions share one
/// fsync without giving up durability (each caller returns only after its batch committed).
#[derive(Clone)]
pub struct LmdbLedger {
    core: LedgerCore,
    jobs: std::sync::mpsc::SyncSender<Job>,
    committer: std::sync::Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::ops::Deref for LmdbLedger {
    type Target = LedgerCore;
    fn deref(&self) -> &LedgerCore {
        &self.core
    }
}

impl LmdbLedger {
    /// Opens (or creates) the ledger in `dir` with room for `map_size_bytes`, and starts its
    /// committer thread (it ends when the last `Ledger` clone is dropped).
    pub fn open(dir: &Path, map_size_bytes: usize) -> Result<LmdbLedger, LedgerError> {
        let core = LedgerCore::open(dir, map_size_bytes)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(GROUP_COMMIT_QUEUE_JOBS);
        let writer = core.clone();
        let handle = std::thread::Builder::new()
            .name("ledger-commit".into())
            .spawn(move || group_commit_loop(writer, rx))
            .map_err(|source| LedgerError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        Ok(LmdbLedger {
            core,
            jobs: tx,
            committer: std::sync::Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }

    /// Closes this handle; the last one to close waits for the committer to finish, so the
    /// environment can be opened again in the same process.
    pub fn close(self) {
        let LmdbLedger {
            core,
            jobs,
            committer,
        } = self;
        drop(jobs);
        drop(core);
        if let Ok(m) = std::sync::Arc::try_unwrap(committer) {
            if let Some(h) = m.into_inner().ok().flatten() {
                let _ = h.join();
            }
        }
    }

    /// Runs `f` in a write transaction that is committed together with other concurrent
    /// callers' (group commit), and returns once it is durable. If `f` fails, only its own
    /// writes are rolled back (it runs in a nested transaction). The calling thread waits.
    pub fn transact<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn LedgerWrite) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<T, LedgerError>>(1);
        self.submit(f, move |out| {
            let _ = tx.send(out);
        })?;
        rx.recv().map_err(|_| committer_stopped())?
    }

    /// [`LmdbLedger::transact`] for an async caller: the committer completes a oneshot once
    /// the batch holding `f` is durable, and the caller's task is woken then; no thread waits
    /// for the fsync but the committer. The transaction is handed to the committer when the
    /// future is first polled and commits whether or not the future is then dropped.
    pub async fn transact_async<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn LedgerWrite) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T, LedgerError>>();
        self.submit(f, move |out| {
            let _ = tx.send(out);
        })?;
        rx.await.map_err(|_| committer_stopped())?
    }

    /// The group commits made so far by this process's LMDB ledgers and the transactions
    /// they held, (commits, transactions), counting durable commits only: the bench reads them
    /// (transactions per fsync).
    pub fn group_commits() -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (GROUP_COMMITS.load(Relaxed), GROUP_COMMIT_JOBS.load(Relaxed))
    }

    /// Hands `f` to the committer; `deliver` gets its outcome once its batch committed (or
    /// failed). A full queue waits for room ([`GROUP_COMMIT_QUEUE_JOBS`]: back-pressure).
    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn LedgerWrite) -> Result<T, LedgerError> + Send + 'static,
        deliver: impl FnOnce(Result<T, LedgerError>) + Send + 'static,
    ) -> Result<(), LedgerError> {
        let job: Job = Box::new(move |w| {
            let result = f(w);
            JobDone {
                ok: result.is_ok(),
                deliver: Box::new(move |committed| {
                    deliver(match (result, committed) {
                        (Ok(v), Ok(())) => Ok(v),
                        (Ok(_), Err(e)) => Err(LedgerError::Commit(e)),
                        (Err(e), _) => Err(e),
                    })
                }),
            }
        });
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(job)) => {
                super::may_block(|| self.jobs.send(job)).map_err(|_| committer_stopped())
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(committer_stopped()),
        }
    }
}

fn committer_stopped() -> LedgerError {
    LedgerError::Commit("the committer thread has stopped".into())
}

fn group_commit_loop(core: LedgerCore, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX_JOBS {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let mut dones = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), heed::Error> {
            let mut wtxn = core.env.write_txn()?;
            for job in batch.drain(..) {
                let mut nested = core.env.nested_write_txn(&mut wtxn)?;
                let done = job(&mut LmdbWrite {
                    core: &core,
                    txn: &mut nested,
                });
                if done.ok {
                    nested.commit()?;
                } else {
                    nested.abort();
                }
                dones.push(done);
            }
            wtxn.commit()
        })();
        let result = result.map_err(|e| e.to_string());
        if result.is_ok() {
            GROUP_COMMITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            GROUP_COMMIT_JOBS.fetch_add(dones.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        // Jobs that never ran (the batch failed to start) are told too.
        for job in batch {
            let done = JobDone {
                ok: false,
                deliver: Box::new(|_| {}),
            };
            drop(job);
            dones.push(done);
        }
        for d in dones {
            (d.deliver)(result.clone());
        }
    }
}

/// The ledger's databases, in the order [`LedgerCore::open`] destructures them.
const DATABASES: tapgate_lmdb::Databases<20> = [
    "balances",
    "postings",
    "load_intents",
    "cards",
    "idempotency",
    "vouchers",
    "block_changes",
    "anomalies",
    "counter_gaps",
    "funding_days",
    "instruments",
    "payments",
    "payment_orders",
    "notifications",
    "refunds",
    "notifications_due",
    "refunds_uncollected",
    "block_changes_by_card",
    "card_owners",
    "blocked_cards",
];

/// The ledger's map size when its config names none: 1 GiB (`ledger_map_size_bytes`).
pub const DEFAULT_MAP_SIZE_BYTES: usize = 1 << 30;

impl LedgerCore {
    /// Opens (or creates) the ledger databases in `dir`.
    fn open(dir: &Path, map_size_bytes: usize) -> Result<LedgerCore, LedgerError> {
        let (env, dbs) = tapgate_lmdb::open(dir, DATABASES, &EnvConfig::durable(map_size_bytes))?;
        let [balances, postings, intents, cards, idem, vouchers, blocks, anomalies, gaps, funding_days, instruments, payments, payment_orders, notifications, refunds, notifications_due, refunds_uncollected, blocks_by_card, card_owners, blocked_cards] =
            dbs;
        let core = LedgerCore {
            env,
            balances: balances.remap_types(),
            postings: postings.remap_types(),
            intents: intents.remap_types(),
            cards: cards.remap_types(),
            idem: idem.remap_types(),
            vouchers: vouchers.remap_types(),
            blocks: blocks.remap_types(),
            blocks_by_card: blocks_by_card.remap_types(),
            anomalies: anomalies.remap_types(),
            gaps: gaps.remap_types(),
            funding_days: funding_days.remap_types(),
            instruments: instruments.remap_types(),
            payments: payments.remap_types(),
            payment_orders: payment_orders.remap_types(),
            notifications: notifications.remap_types(),
            notifications_due: notifications_due.remap_types(),
            refunds_uncollected: refunds_uncollected.remap_types(),
            refunds: refunds.remap_types(),
            card_owners: card_owners.remap_types(),
            blocked_cards: blocked_cards.remap_types(),
        };
        // A ledger from before the due index: its undelivered notifications are indexed once.
        let mut wtxn = core.env.write_txn()?;
        core.notifications_by_due().fill(&mut wtxn)?;
        core.refunds_by_creation().fill(&mut wtxn)?;
        core.index_block_changes(&mut wtxn)?;
        core.index_owners(&mut wtxn)?;
        core.index_blocked_cards(&mut wtxn)?;
        wtxn.commit()?;
        Ok(core)
    }
}

/// A read snapshot of the LMDB ledger.
pub struct LmdbRead<'a> {
    core: &'a LedgerCore,
    txn: RoTxn<'a, WithoutTls>,
}

impl LedgerCore {
    /// A read snapshot.
    pub fn read(&self) -> Result<LmdbRead<'_>, LedgerError> {
        Ok(LmdbRead {
            core: self,
            txn: self.env.read_txn()?,
        })
    }
}

/// A consistent view of the databases (a read snapshot, or a write transaction reading its
/// own writes): both implement [`LedgerRead`] through it.
mod view {
    use super::*;

    /// The core and the transaction a read goes through.
    pub trait View {
        /// The databases and the transaction.
        fn view(&self) -> (&LedgerCore, &RoTxn<'_, WithoutTls>);
    }

    impl View for LmdbRead<'_> {
        fn view(&self) -> (&LedgerCore, &RoTxn<'_, WithoutTls>) {
            (self.core, &self.txn)
        }
    }

    impl View for LmdbWrite<'_, '_> {
        fn view(&self) -> (&LedgerCore, &RoTxn<'_, WithoutTls>) {
            (self.core, self.txn)
        }
    }
}

impl<T: view::View> LedgerRead for T {
    fn balance(&self, account: &str) -> Result<i64, LedgerError> {
        let (core, txn) = self.view();
        core.balance(txn, account)
    }

    fn balances(&self) -> Result<Vec<(String, i64)>, LedgerError> {
        let (core, txn) = self.view();
        core.balances(txn)
    }

    fn postings_with_prefix(&self, prefix: &str) -> Result<Vec<Posting>, LedgerError> {
        let (core, txn) = self.view();
        core.postings_with_prefix(txn, prefix)
    }

    fn card(&self, uid: &[u8; 7]) -> Result<CardShadow, LedgerError> {
        let (core, txn) = self.view();
        core.card(txn, uid)
    }

    fn funding_day_total(&self, key: FundingDay<'_>) -> Result<i64, LedgerError> {
        let (core, txn) = self.view();
        core.funding_day_total(txn, key)
    }

    fn anomalies(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, Anomaly)>, u64), LedgerError> {
        let (core, txn) = self.view();
        core.anomalies(txn, after, limit)
    }

    fn cards_after(
        &self,
        after: Option<[u8; 7]>,
        limit: usize,
    ) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        let (core, txn) = self.view();
        core.cards_after(txn, after, limit)
    }

    fn cards_of_owner(&self, owner: &str) -> Result<Vec<[u8; 7]>, LedgerError> {
        let (core, txn) = self.view();
        core.cards_of_owner(txn, owner)
    }

    fn blocked_cards(&self) -> Result<Vec<([u8; 7], CardShadow)>, LedgerError> {
        let (core, txn) = self.view();
        core.blocked_cards(txn)
    }

    fn card_count(&self) -> Result<u64, LedgerError> {
        let (core, txn) = self.view();
        Ok(core.cards.len(txn)?)
    }

    fn block_changes(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<BlockChange>, u64), LedgerError> {
        let (core, txn) = self.view();
        core.block_changes(txn, after, limit)
    }

    fn latest_block_change(&self, uid: &[u8; 7]) -> Result<Option<BlockChange>, LedgerError> {
        let (core, txn) = self.view();
        core.latest_block_change(txn, uid)
    }

    fn card_block_changes(
        &self,
        uid: &[u8; 7],
        limit: usize,
    ) -> Result<Vec<BlockChange>, LedgerError> {
        let (core, txn) = self.view();
        core.card_block_changes(txn, uid, limit)
    }

    fn card_anomalies(
        &self,
        uid: &[u8; 7],
        within: u64,
    ) -> Result<Vec<(u64, Anomaly)>, LedgerError> {
        let (core, txn) = self.view();
        core.card_anomalies(txn, uid, within)
    }

    fn voucher(&self, code: &str) -> Result<Option<Voucher>, LedgerError> {
        let (core, txn) = self.view();
        core.voucher(txn, code)
    }

    fn card_known(&self, uid: &[u8; 7]) -> Result<bool, LedgerError> {
        let (core, txn) = self.view();
        core.card_known(txn, uid)
    }

    fn intents_at(&self, uid: &[u8; 7], tmc_before: u32) -> Result<Vec<LoadIntent>, LedgerError> {
        let (core, txn) = self.view();
        core.intents_at(txn, uid, tmc_before)
    }

    fn open_intents(&self, uid: &[u8; 7]) -> Result<Vec<LoadIntent>, LedgerError> {
        let (core, txn) = self.view();
        core.open_intents(txn, uid)
    }

    fn all_intents(&self) -> Result<Vec<LoadIntent>, LedgerError> {
        let (core, txn) = self.view();
        core.all_intents(txn)
    }

    fn idempotent(&self, key: &str) -> Result<Option<serde_json::Value>, LedgerError> {
        let (core, txn) = self.view();
        core.idempotent(txn, key)
    }

    fn instrument(&self, source: &str, id: &str) -> Result<Option<Instrument>, LedgerError> {
        let (core, txn) = self.view();
        core.instrument(txn, source, id)
    }

    fn instruments_of(&self, owner: &str) -> Result<Vec<Instrument>, LedgerError> {
        let (core, txn) = self.view();
        core.instruments_of(txn, owner)
    }

    fn payment(&self, id: &str) -> Result<Option<Payment>, LedgerError> {
        let (core, txn) = self.view();
        core.payment(txn, id)
    }

    fn payment_for_order(
        &self,
        merchant: &str,
        order_id: &str,
    ) -> Result<Option<String>, LedgerError> {
        let (core, txn) = self.view();
        core.payment_for_order(txn, merchant, order_id)
    }

    fn refund(&self, id: &str) -> Result<Option<Refund>, LedgerError> {
        let (core, txn) = self.view();
        Ok(core.refunds.get(txn, id)?)
    }

    fn refunds_uncollected(
        &self,
        made_by_ms: u64,
        limit: usize,
    ) -> Result<Vec<Refund>, LedgerError> {
        let (core, txn) = self.view();
        core.refunds_by_creation().until(txn, made_by_ms, limit)
    }

    fn notification(&self, payment_id: &str) -> Result<Option<Notification>, LedgerError> {
        let (core, txn) = self.view();
        Ok(core.notifications.get(txn, payment_id)?)
    }

    fn notifications_due(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Notification>, LedgerError> {
        let (core, txn) = self.view();
        core.notifications_by_due().until(txn, now_ms, limit)
    }
}

/// One write transaction of the LMDB ledger (a nested transaction of the group commit).
pub struct LmdbWrite<'a, 't> {
    core: &'a LedgerCore,
    txn: &'a mut RwTxn<'t>,
}

impl super::interface::sealed::Sealed for LmdbWrite<'_, '_> {}

impl LedgerWrite for LmdbWrite<'_, '_> {
    fn append_posting(
        &mut self,
        _: LedgerOnly,
        entry: super::NewPosting<'_>,
    ) -> Result<Posting, LedgerError> {
        self.core.append_posting(self.txn, entry)
    }

    fn counter_gap(&self, uid: &[u8; 7]) -> Result<Option<GapClock>, LedgerError> {
        let (core, txn) = view::View::view(self);
        Ok(core.gaps.get(txn, uid)?)
    }

    fn unreported_gaps(&self) -> Result<Vec<([u8; 7], GapClock)>, LedgerError> {
        let (core, txn) = view::View::view(self);
        core.unreported_gaps(txn)
    }

    fn put_gap(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        clock: Option<&GapClock>,
    ) -> Result<(), LedgerError> {
        match clock {
            Some(c) => self.core.gaps.put(self.txn, uid, c)?,
            None => {
                self.core.gaps.delete(self.txn, uid)?;
            }
        }
        Ok(())
    }

    fn append_block_change(
        &mut self,
        _: LedgerOnly,
        change: BlockChange,
    ) -> Result<u64, LedgerError> {
        self.core.append_block_change(self.txn, change)
    }

    fn put_funding_day(
        &mut self,
        _: LedgerOnly,
        key: FundingDay<'_>,
        total_minor: i64,
    ) -> Result<(), LedgerError> {
        self.core.put_funding_day(self.txn, key, total_minor)
    }

    fn record_anomaly(&mut self, a: &crate::clearing::Anomaly) -> Result<u64, LedgerError> {
        self.core.record_anomaly(self.txn, a)
    }

    fn put_voucher(&mut self, v: &Voucher) -> Result<(), LedgerError> {
        self.core.put_voucher(self.txn, v)
    }

    fn put_payment(&mut self, _: LedgerOnly, payment: &Payment) -> Result<(), LedgerError> {
        self.core.put_payment(self.txn, payment)
    }

    fn put_refund(&mut self, _: LedgerOnly, refund: &Refund) -> Result<(), LedgerError> {
        self.core.refunds_by_creation().put(self.txn, refund)
    }

    fn put_notification(&mut self, n: &Notification) -> Result<(), LedgerError> {
        self.core.notifications_by_due().put(self.txn, n)
    }

    fn put_card(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        shadow: &CardShadow,
    ) -> Result<(), LedgerError> {
        self.core.put_card(self.txn, uid, shadow)
    }

    fn index_card(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        before: &CardShadow,
        after: &CardShadow,
    ) -> Result<(), LedgerError> {
        self.core.index_card(self.txn, uid, before, after)
    }

    fn put_intent(
        &mut self,
        _: LedgerOnly,
        uid: &[u8; 7],
        intent: &LoadIntent,
    ) -> Result<(), LedgerError> {
        self.core.put_intent(self.txn, uid, intent)
    }

    fn put_idempotent(&mut self, key: &str, value: &serde_json::Value) -> Result<(), LedgerError> {
        self.core.put_idempotent(self.txn, key, value)
    }

    fn put_instrument(&mut self, i: &Instrument) -> Result<(), LedgerError> {
        self.core.put_instrument(self.txn, i)
    }
}

/// The entries of a scan (`iter`, `prefix_iter`) that `keep` turns into `Some`, in order; a
/// read error ends it.
fn kept<K, V, T>(
    entries: impl Iterator<Item = heed::Result<(K, V)>>,
    mut keep: impl FnMut(K, V) -> Option<T>,
) -> Result<Vec<T>, LedgerError> {
    let mut out = Vec::new();
    for entry in entries {
        let (k, v) = entry?;
        out.extend(keep(k, v));
    }
    Ok(out)
}
