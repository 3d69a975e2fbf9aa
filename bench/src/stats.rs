//! Timing helpers shared by scenarios.

use std::time::Instant;

/// Time `n` runs of `f` (after `warmup` runs) and return the sorted per-run durations in ns.
pub fn time_each(warmup: u64, n: u64, mut f: impl FnMut()) -> Vec<u64> {
    for _ in 0..warmup {
        f();
    }
    let mut samples = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    samples
}

/// The `q`-quantile (0.0..=1.0) of sorted samples.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
