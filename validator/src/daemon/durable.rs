//! Blocklist messages journalled in the order they were applied, on a thread of their own,
//! each write tried again (with a bounded backoff) until it commits: a full disk or an I/O
//! error no longer leaves a list in force that a restart would not have. The heartbeat's
//! `blocklist_version` is set here, once the version is journalled, never before: the gateway
//! never counts a version as propagated to a validator that would lose it at a restart.
//!
//! The MQTT event loop is never held by a failing write (confirmations keep deleting taps,
//! which frees journal pages); while a write fails the list applied stays in force (taps are
//! checked against it) and the heartbeat keeps the last version journalled. With [`QUEUE`]
//! writes outstanding a further blocklist message is refused before it is applied (neither in
//! force nor journalled: the gate and a restart agree; the retained topics send it again),
//! never waited for: the event loop that would wait also carries the confirmations.

use super::{BlocklistWrite, DownlinkOutcome, Metrics, Shared};
use crate::journal::Journal;
use purse::rotation::TrustedKeys;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
#[cfg(test)]
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Journal writes outstanding (queued or being tried) at most: a blocklist message beyond is
/// refused unapplied rather than waited for (the wait would hold the MQTT event loop, and
/// with it the confirmations that free journal pages) or memory growing while the disk fails.
const QUEUE: usize = 32;

/// The pause after a failed write: `first`, doubled after each failure, at most `max`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The daemon's: 100 ms, doubling to 5 s.
    pub const DAEMON: Backoff = Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };
}

enum Job {
    /// A message's write; `applied`: the version in force once it commits (its last chunk,
    /// or a whole snapshot or delta), for the heartbeat.
    Write {
        write: BlocklistWrite,
        bytes: Vec<u8>,
        applied: Option<u64>,
        /// Its place among the [`QUEUE`] outstanding, given back once the job is done.
        _slot: Slot,
    },
    /// Answered once every write sent before it is done.
    #[cfg(test)]
    Flush(SyncSender<()>),
}

/// One of the [`QUEUE`] places for an outstanding write, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The writer thread's handle.
pub(super) struct BlocklistJournal {
    tx: Mutex<Option<Sender<Job>>>,
    /// Writes outstanding (at most [`QUEUE`]: the channel itself never blocks a sender).
    outstanding: Arc<AtomicUsize>,
    /// Set at the end of a run: a write that fails is given up instead of tried again.
    closing: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl BlocklistJournal {
    /// Starts the writer thread over `journal`.
    pub(super) fn start(
        journal: Arc<Journal>,
        metrics: Arc<Metrics>,
        backoff: Backoff,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel();
        let closing = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            journal,
            metrics,
            closing: closing.clone(),
            backoff,
            given_up: false,
        };
        let thread = std::thread::Builder::new()
            .name("blocklist-journal".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            outstanding: Arc::new(AtomicUsize::new(0)),
            closing,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// A place for a write, taken before its message is applied; `None` with [`QUEUE`] writes
    /// outstanding.
    fn reserve(&self) -> Option<Slot> {
        self.outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < QUEUE).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.outstanding.clone()))
    }

    /// Queues a message's journal write (never waits).
    fn send(&self, job: Job) -> Result<(), String> {
        let tx = self.tx.lock().map_err(|_| "journal queue lock poisoned")?;
        let tx = tx.as_ref().ok_or("the run is over: not journalled")?;
        tx.send(job)
            .map_err(|_| "the journal writer has stopped".to_string())
    }

    /// Waits until every write queued so far is done (committed, or given up at the end).
    #[cfg(test)]
    pub(super) fn flush(&self) {
        let (done, wait) = sync_channel(1);
        if self.send(Job::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// At the end of a run: the writes queued are tried once more each (none again after a
    /// failure), then the thread ends.
    pub(super) fn finish(&self) {
        self.closing.store(true, Ordering::Relaxed);
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// A blocklist message for the daemon (off the event loop): verified and applied with the gate
/// ([`super::take_blocklist_shared`]), its journal write queued for the writer thread.
pub(super) fn apply_blocklist(
    shared: &Shared,
    keys: &TrustedKeys,
    bytes: &[u8],
) -> Result<DownlinkOutcome, String> {
    // The place is taken before the message is applied: one applied is always journalled.
    let slot = shared.blocklist_journal.reserve().ok_or_else(|| {
        format!("blocklist not applied: {QUEUE} journal writes outstanding (the journal is failing; the retained topics send it again)")
    })?;
    let (outcome, write, held) = super::take_blocklist_shared(&shared.gate, keys, bytes)?;
    if let Some(write) = write {
        let applied = matches!(outcome, DownlinkOutcome::Applied(_)).then_some(held);
        shared.blocklist_journal.send(Job::Write {
            write,
            bytes: bytes.to_vec(),
            applied,
            _slot: slot,
        })?;
    }
    Ok(outcome)
}

/// The writer thread's state.
struct Writer {
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    closing: Arc<AtomicBool>,
    backoff: Backoff,
    /// A write was given up at the end of the run: the later ones are not made (a last chunk
    /// committed after a lost one would drop the list in force from the journal).
    given_up: bool,
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        for job in rx {
            match job {
                #[cfg(test)]
                Job::Flush(done) => {
                    let _ = done.send(());
                }
                Job::Write { .. } if self.given_up => {}
                Job::Write {
                    write,
                    bytes,
                    applied,
                    ..
                } => {
                    if !self.write_until_committed(&write, &bytes) {
                        self.given_up = true;
                    } else if let Some(v) = applied {
                        let v = i64::try_from(v).unwrap_or(i64::MAX);
                        self.metrics.blocklist_version.set(v);
                    }
                }
            }
        }
    }

    /// Writes `bytes` until the write commits (true), each failure counted and the first of
    /// a run of them logged; false when given up at the end of the run.
    fn write_until_committed(&self, write: &BlocklistWrite, bytes: &[u8]) -> bool {
        let mut pause = self.backoff.first;
        let mut failures = 0u64;
        loop {
            let e = match write.write(&self.journal, bytes) {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(failures, "the blocklist is journalled after all");
                    }
                    return true;
                }
                Err(e) => e,
            };
            if self.closing.load(Ordering::Relaxed) {
                tracing::error!(error = %e, "the blocklist could not be journalled before the end of the run: the next start has the list journalled before (the broker's retained messages bring the newer one again)");
                return false;
            }
            failures += 1;
            self.metrics.blocklist_journal_retries.inc();
            if failures == 1 {
                tracing::warn!(error = %e, "{e}; trying again until it commits (the list is in force, the heartbeat keeps the version journalled before)");
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(self.backoff.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::restore_tests::{gate, uid};
    use super::super::{restore, uplink, Metrics, Shared};
    use super::*;
    use crate::journal::Journal;
    use ed25519_dalek::{Signer, SigningKey};
    use std::sync::atomic::AtomicU64;

    /// A daemon's shared state over `journal`, its blocklist writer retrying every 1 to 4 ms.
    fn shared(journal: &Arc<Journal>, metrics: &Arc<Metrics>) -> Shared {
        let writes = BlocklistJournal::start(
            journal.clone(),
            metrics.clone(),
            Backoff {
                first: Duration::from_millis(1),
                max: Duration::from_millis(4),
            },
        )
        .unwrap();
        Shared {
            gate: Arc::new(std::sync::Mutex::new(gate())),
            actions: Arc::new(std::sync::Mutex::new(purse::actionlist::ActionList::new(
                "metro",
            ))),
            journal: journal.clone(),
            blocklist_journal: Arc::new(writes),
            metrics: metrics.clone(),
            wake: Arc::new(tokio::sync::Notify::new()),
            shutdown: Arc::new(AtomicBool::new(false)),
            reader_done: Arc::new(AtomicBool::new(false)),
            taps_done: Arc::new(AtomicU64::new(0)),
        }
    }

    /// What both journal-fault tests start from: the back office's signing key and the
    /// validator's trust in it, a journal in a directory of its own, the daemon's metrics.
    struct Fixture {
        bo: SigningKey,
        pk: [u8; 32],
        keys: TrustedKeys,
        dir: tempfile::TempDir,
        journal: Arc<Journal>,
        metrics: Arc<Metrics>,
    }

    fn fixture() -> Fixture {
        let bo = SigningKey::from_bytes(&[1; 32]);
        let pk = bo.verifying_key().to_bytes();
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(dir.path(), 10, 1 << 26).unwrap());
        Fixture {
            bo,
            pk,
            keys: TrustedKeys::single(pk),
            dir,
            journal,
            metrics: Arc::new(Metrics::new(1001)),
        }
    }

    impl Fixture {
        /// Blocklist snapshot `version` of cards `uid(0..cards)`, cut into signed chunks of
        /// `per_chunk` cards.
        fn signed(&self, version: u64, cards: u32, per_chunk: usize) -> Vec<Vec<u8>> {
            let mut uids: Vec<[u8; 7]> = (0..cards).map(uid).collect();
            uids.sort_unstable();
            purse::blocklist::chunked::cut("metro", version, &uids, per_chunk)
                .iter()
                .map(|c| c.sign_with(|m| self.bo.sign(m).to_bytes()))
                .collect()
        }

        /// A restart: the writer finishes, the journal is closed and opened again, and a new
        /// gate restores its blocklist from it.
        fn restart(self, shared: Shared) -> crate::gate::Gate {
            shared.blocklist_journal.finish();
            drop(shared);
            let Fixture {
                pk, dir, journal, ..
            } = self;
            drop(journal);
            let journal = Journal::open(dir.path(), 10, 1 << 26).unwrap();
            let mut g = gate();
            restore(&mut g, &journal, &pk).unwrap();
            g
        }
    }

    /// The blocklist version the heartbeat reports now.
    fn heartbeat_version(metrics: &Metrics) -> u64 {
        let status = uplink::status(1001, metrics, 0);
        status["blocklist_version"].as_u64().expect("a version")
    }

    /// While every journal write fails, [`QUEUE`] chunks are applied and wait for their writes;
    /// the next is refused before it is applied (it used to wait for a place, holding the MQTT
    /// event loop and its confirmations); once the journal works again the writes commit, the
    /// refused chunk sent again completes the snapshot, and a restart has every card.
    #[test]
    fn a_full_write_queue_refuses_a_message_unapplied_and_never_waits() {
        let fx = fixture();
        let (keys, metrics) = (&fx.keys, fx.metrics.clone());
        let cards = QUEUE as u32 + 4;
        let chunks = fx.signed(1, cards, 1);
        let failing = Arc::new(AtomicBool::new(true));
        let f = failing.clone();
        fx.journal.inject_blob_fault(Box::new(move |_| {
            f.load(Ordering::SeqCst)
                .then(|| std::io::Error::other("no space left on device"))
        }));
        let shared = shared(&fx.journal, &metrics);
        let received = |s: &Shared| {
            let g = s.gate.lock().unwrap();
            g.blocklist.incoming().map(|a| a.received())
        };
        for c in &chunks[..QUEUE] {
            let out = apply_blocklist(&shared, keys, c).unwrap();
            assert!(matches!(out, DownlinkOutcome::Pending { .. }), "{out:?}");
        }
        let refused = apply_blocklist(&shared, keys, &chunks[QUEUE]);
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(received(&shared), Some(QUEUE as u32), "refused unapplied");

        // The journal works again: the writes commit, the refused chunk comes again.
        failing.store(false, Ordering::SeqCst);
        shared.blocklist_journal.flush();
        for c in &chunks[QUEUE..cards as usize - 1] {
            let out = apply_blocklist(&shared, keys, c).unwrap();
            assert!(matches!(out, DownlinkOutcome::Pending { .. }), "{out:?}");
        }
        assert_eq!(
            apply_blocklist(&shared, keys, &chunks[cards as usize - 1]),
            Ok(DownlinkOutcome::Applied(1))
        );
        shared.blocklist_journal.flush();
        assert_eq!(heartbeat_version(&metrics), 1);

        let g = fx.restart(shared);
        assert_eq!(g.blocklist.version(), 1);
        assert!((0..cards).all(|i| g.blocklist.is_blocked(&uid(i))));
    }

    /// Version 2's last chunk fails to journal three times (as a full disk would fail it):
    /// the list is in force at once, but the heartbeat says 1 until the write commits, then
    /// 2; the failures are counted; a restart has version 2.
    #[test]
    fn a_failed_journal_write_is_retried_and_reported_only_once_durable() {
        let fx = fixture();
        let (keys, metrics) = (&fx.keys, fx.metrics.clone());
        let (v1, v2) = (fx.signed(1, 10, 10), fx.signed(2, 20, 10));
        assert_eq!(v2.len(), 2);
        let shared = shared(&fx.journal, &metrics);
        assert_eq!(
            apply_blocklist(&shared, keys, &v1[0]),
            Ok(DownlinkOutcome::Applied(1))
        );
        shared.blocklist_journal.flush();
        assert_eq!(heartbeat_version(&metrics), 1);

        // Version 2's last chunk: its first three writes fail; each failure records what the
        // heartbeat said meanwhile.
        let last = v2[1].clone();
        let during: Arc<Mutex<Vec<u64>>> = Arc::default();
        let (seen, m) = (during.clone(), metrics.clone());
        fx.journal.inject_blob_fault(Box::new(move |key| {
            let mut seen = seen.lock().unwrap();
            if !key.ends_with("000001") || seen.len() == 3 {
                return None;
            }
            seen.push(heartbeat_version(&m));
            Some(std::io::Error::other("no space left on device"))
        }));
        let first = apply_blocklist(&shared, keys, &v2[0]).unwrap();
        assert!(
            matches!(first, DownlinkOutcome::Pending { .. }),
            "{first:?}"
        );
        assert_eq!(
            apply_blocklist(&shared, keys, &last),
            Ok(DownlinkOutcome::Applied(2))
        );
        assert_eq!(
            shared.gate.lock().unwrap().blocklist.version(),
            2,
            "in force at once"
        );
        shared.blocklist_journal.flush();
        assert_eq!(
            *during.lock().unwrap(),
            vec![1, 1, 1],
            "the old version while failing"
        );
        assert_eq!(metrics.blocklist_journal_retries.get(), 3);
        assert_eq!(
            heartbeat_version(&metrics),
            2,
            "the new one once journalled"
        );

        // A restart: the journal holds version 2.
        let g = fx.restart(shared);
        assert_eq!(g.blocklist.version(), 2);
        assert!(g.blocklist.is_blocked(&uid(15)));
    }
}
