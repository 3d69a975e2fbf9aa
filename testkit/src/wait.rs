//! Waiting on a condition with a deadline: what a test does instead of sleeping for a while
//! and hoping the event happened.

use std::time::{Duration, Instant};

/// How often a condition is looked at again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Waits until `done()` holds; panics naming `what` if it does not within `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until `f()` gives a value and returns it; panics naming `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// [`wait_until`] for async tests: sleeps on the runtime's timer between looks.
pub async fn wait_until_async(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
