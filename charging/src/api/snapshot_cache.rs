//! The signed blocklist snapshot of the latest version, kept (issue 22): a 10,000,000-card
//! list is 153 chunks of 458 KB, each signed by the HSM — about 70 MB read, cut and signed —
//! which `GET /v1/blocklist/signed/snapshot?chunked=1` did again at every request. The answer
//! is now built once per blocklist version and kept until a newer version is asked for.
//!
//! One version is kept (the newest built): the cache holds at most one answer. A request
//! first reads the latest version (one small ledger read); when the kept answer is of that
//! version (or newer: a request that started before a change), it is answered at once.
//! Otherwise it builds the new answer while holding the cache's lock, so requests that arrive
//! meanwhile wait for it and take it, rather than sign the same chunks again.

use axum::body::Bytes;
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

/// The latest signed snapshot answer (see the module's header).
#[derive(Debug, Default)]
pub struct SnapshotCache {
    slot: Mutex<Option<Arc<SignedSnapshot>>>,
}

impl SnapshotCache {
    /// The answer for blocklist version `latest`: the kept one when it is at least that
    /// version, otherwise `build()`'s (which reads, cuts and signs the list, and may find a
    /// version newer than `latest`), then kept in place of the old. `build` runs at most once
    /// at a time; concurrent callers wait for it and take its answer. A failed build keeps
    /// nothing new.
    pub fn get_or_build<E>(
        &self,
        latest: u64,
        build: impl FnOnce() -> Result<SignedSnapshot, E>,
    ) -> Result<Arc<SignedSnapshot>, E> {
        // A panic while building leaves the slot as it was: the poison carries no broken state.
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_ref().filter(|s| s.version >= latest) {
            return Ok(s.clone());
        }
        // The old answer goes before the new one is built: never both held.
        *slot = None;
        let built = Arc::new(build()?);
        *slot = Some(built.clone());
        Ok(built)
    }

    /// The version kept, if any.
    pub fn version(&self) -> Option<u64> {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|s| s.version)
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
}
