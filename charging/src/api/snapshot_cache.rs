//! The signed blocklist snapshot of the latest version, kept (issue 22): a 10,000,000-card
//! list is 153 chunks of 458 KB, each signed by the HSM — about 70 MB read, cut and signed —
//! which `GET /v1/blocklist/signed/snapshot?chunked=1` did again at every request. The answer
//! is now built once per blocklist version and kept until a newer version is asked for.
//!
//! One version is kept (the newest built): the cache holds at most one answer. A request
//! first reads the latest version (one small ledger read); when the kept answer is of that
//! version (or newer: a request that started before a change), it is answered at once.
//! Otherwise it builds the new answer while holding the cache's lock, so requests that arrive
//! meanwhile wait for it and take its outcome, rather than sign the same chunks again: its
//! answer, or its error when it failed. A build failing slowly (an HSM or a ledger timing out)
//! thus fails every request that waited for it once, not once per waiting request in turn. A
//! request that arrives after a failed build has ended builds again.

use axum::body::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A signed snapshot answer: its version, the chunk count (`None`: the list in one message,
/// format 1) and the bytes as answered.
#[derive(Debug)]
pub struct SignedSnapshot {
    /// The blocklist version the snapshot lists.
    pub version: u64,
    /// Chunks in `bytes` (each preceded by its length), or `None` for one signed message.
    pub chunks: Option<usize>,
    /// The answer's body.
    pub bytes: Bytes,
}

/// The latest signed snapshot answer (see the module's header); `E` is a failed build's error.
#[derive(Debug)]
pub struct SnapshotCache<E = super::ApiError> {
    slot: Mutex<Slot<E>>,
    /// Builds ended, failed or not (counted under the lock; read before taking it, so that a
    /// request knows which builds ended after it arrived).
    ended: AtomicU64,
}

/// What the cache's lock guards.
#[derive(Debug)]
struct Slot<E> {
    /// The answer kept.
    kept: Option<Arc<SignedSnapshot>>,
    /// The last build, when it failed: its number (the builds ended once it had), the version
    /// it was asked for, and its error — for the requests that waited for it.
    failed: Option<(u64, u64, E)>,
}

impl<E> Default for SnapshotCache<E> {
    fn default() -> Self {
        SnapshotCache {
            slot: Mutex::new(Slot {
                kept: None,
                failed: None,
            }),
            ended: AtomicU64::new(0),
        }
    }
}

impl<E: Clone> SnapshotCache<E> {
    /// The answer for blocklist version `latest`: the kept one when it is at least that
    /// version, otherwise `build()`'s (which reads, cuts and signs the list, and may find a
    /// version newer than `latest`), then kept in place of the old. `build` runs at most once
    /// at a time; concurrent callers wait for it and take its outcome: its answer, or its error
    /// when it failed for a version at least `latest` (a caller that arrived after the failed
    /// build ended builds again). A failed build keeps nothing new.
    pub fn get_or_build(
        &self,
        latest: u64,
        build: impl FnOnce() -> Result<SignedSnapshot, E>,
    ) -> Result<Arc<SignedSnapshot>, E> {
        self.get_or_build_after(self.ended.load(Ordering::SeqCst), latest, build)
    }

    /// [`SnapshotCache::get_or_build`] for a request that arrived when `arrived` builds had
    /// ended.
    fn get_or_build_after(
        &self,
        arrived: u64,
        latest: u64,
        build: impl FnOnce() -> Result<SignedSnapshot, E>,
    ) -> Result<Arc<SignedSnapshot>, E> {
        // A panic while building leaves the slot as it was: the poison carries no broken state.
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.kept.as_ref().filter(|s| s.version >= latest) {
            return Ok(s.clone());
        }
        if let Some((_, _, e)) = slot
            .failed
            .as_ref()
            .filter(|(n, v, _)| *n > arrived && *v >= latest)
        {
            return Err(e.clone());
        }
        // The old answer goes before the new one is built: never both held.
        slot.kept = None;
        let built = build();
        let n = self.ended.fetch_add(1, Ordering::SeqCst) + 1;
        match built {
            Ok(b) => {
                let b = Arc::new(b);
                *slot = Slot {
                    kept: Some(b.clone()),
                    failed: None,
                };
                Ok(b)
            }
            Err(e) => {
                slot.failed = Some((n, latest, e.clone()));
                Err(e)
            }
        }
    }

    /// The version kept, if any.
    pub fn version(&self) -> Option<u64> {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.kept.as_ref().map(|s| s.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn answer(version: u64, builds: &AtomicUsize) -> Result<SignedSnapshot, String> {
        builds.fetch_add(1, Ordering::SeqCst);
        Ok(SignedSnapshot {
            version,
            chunks: Some(2),
            bytes: Bytes::from(format!("chunks of {version}")),
        })
    }

    #[test]
    fn one_build_per_version_and_a_new_version_replaces_the_old() {
        let cache = SnapshotCache::default();
        let builds = AtomicUsize::new(0);
        let a = cache.get_or_build(3, || answer(3, &builds)).unwrap();
        let b = cache.get_or_build(3, || answer(3, &builds)).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        // A request that read an older version takes the newer answer kept.
        let older = cache.get_or_build(2, || answer(2, &builds)).unwrap();
        assert_eq!((older.version, builds.load(Ordering::SeqCst)), (3, 1));
        let c = cache.get_or_build(4, || answer(4, &builds)).unwrap();
        assert_eq!((c.version, &c.bytes[..]), (4, &b"chunks of 4"[..]));
        assert_eq!(cache.version(), Some(4));
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn concurrent_requests_for_one_version_build_once() {
        let cache = SnapshotCache::default();
        let builds = AtomicUsize::new(0);
        let got: Vec<Arc<SignedSnapshot>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| cache.get_or_build(7, || answer(7, &builds)).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        assert!(got.iter().all(|g| Arc::ptr_eq(g, &got[0])));
    }

    #[test]
    fn a_failed_build_keeps_nothing_and_the_next_request_builds() {
        let cache = SnapshotCache::default();
        let builds = AtomicUsize::new(0);
        let e = cache.get_or_build(5, || Err::<SignedSnapshot, _>("hsm down".to_string()));
        assert_eq!(e.unwrap_err(), "hsm down");
        assert_eq!(cache.version(), None);
        let ok = cache.get_or_build(5, || answer(5, &builds)).unwrap();
        assert_eq!((ok.version, builds.load(Ordering::SeqCst)), (5, 1));
    }

    /// A build that fails (slowly: it ends only once every other request has arrived and
    /// queues behind it) is run once; the requests that waited for it take its error rather
    /// than build again in turn.
    #[test]
    fn requests_waiting_for_a_failing_build_take_its_error_and_do_not_build_again() {
        let cache = SnapshotCache::<String>::default();
        let builds = AtomicUsize::new(0);
        let waiters = 7;
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (arrived_tx, arrived_rx) = std::sync::mpsc::channel::<()>();
        let (cache, builds) = (&cache, &builds);
        let errors: Vec<String> = std::thread::scope(|s| {
            let first = s.spawn(move || {
                cache
                    .get_or_build(9, move || {
                        builds.fetch_add(1, Ordering::SeqCst);
                        started_tx.send(()).unwrap();
                        for _ in 0..waiters {
                            arrived_rx.recv().unwrap();
                        }
                        Err::<SignedSnapshot, _>("hsm timed out".to_string())
                    })
                    .unwrap_err()
            });
            // The first request holds the lock and is building.
            started_rx.recv().unwrap();
            let hs: Vec<_> = (0..waiters)
                .map(|_| {
                    let tx = arrived_tx.clone();
                    s.spawn(move || {
                        // As `get_or_build`: note the builds ended, then queue on the lock.
                        let arrived = cache.ended.load(Ordering::SeqCst);
                        tx.send(()).unwrap();
                        cache
                            .get_or_build_after(arrived, 9, || {
                                builds.fetch_add(1, Ordering::SeqCst);
                                Err("built again".to_string())
                            })
                            .unwrap_err()
                    })
                })
                .collect();
            let mut all = vec![first.join().unwrap()];
            all.extend(hs.into_iter().map(|h| h.join().unwrap()));
            all
        });
        assert_eq!(errors.len(), waiters + 1);
        assert_eq!(builds.load(Ordering::SeqCst), 1, "{errors:?}");
        assert!(errors.iter().all(|e| e == "hsm timed out"), "{errors:?}");
        assert_eq!(cache.version(), None);
        // A request after the failed build ended builds again.
        let ok = cache.get_or_build(9, || answer(9, builds)).unwrap();
        assert_eq!((ok.version, builds.load(Ordering::SeqCst)), (9, 2));
    }
}
