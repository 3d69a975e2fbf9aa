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

/// Times `n` runs each of `a` and `b` (after `warmup` runs of each), in alternation: `chunks`
/// rounds of `n / chunks` runs of `a` then of `b`, so that both meet the same machine (a limit
/// and the figure it bounds, on a machine whose speed drifts while others use it). Returns the
/// sorted per-run durations in ns of `a` and of `b`.
pub fn time_alternating(
    warmup: u64,
    n: u64,
    chunks: u64,
    mut a: impl FnMut(),
    mut b: impl FnMut(),
) -> (Vec<u64>, Vec<u64>) {
    for _ in 0..warmup {
        a();
        b();
    }
    let (mut sa, mut sb) = (
        Vec::with_capacity(n as usize),
        Vec::with_capacity(n as usize),
    );
    let chunks = chunks.clamp(1, n.max(1));
    for c in 0..chunks {
        let k = n / chunks + u64::from(c < n % chunks);
        for (f, s) in [(&mut a as &mut dyn FnMut(), &mut sa), (&mut b, &mut sb)] {
            for _ in 0..k {
                let t = Instant::now();
                f();
                s.push(t.elapsed().as_nanos() as u64);
            }
        }
    }
    sa.sort_unstable();
    sb.sort_unstable();
    (sa, sb)
}

/// The `q`-quantile (0.0..=1.0) of sorted samples.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// This process's CPU time (user + system), seconds, from /proc/self/stat (0 elsewhere).
pub fn cpu_s() -> f64 {
    let (u, s) = cpu_user_sys_s();
    u + s
}

/// This process's user and system CPU time, seconds.
pub fn cpu_user_sys_s() -> (f64, f64) {
    cpu_user_sys_s_of("/proc/self/stat")
}

/// The calling thread's CPU time (user + system), seconds, from /proc/thread-self/stat.
pub fn thread_cpu_s() -> f64 {
    let (u, s) = cpu_user_sys_s_of("/proc/thread-self/stat");
    u + s
}

/// Process `pid`'s CPU time (user + system), seconds (0 when it cannot be read).
pub fn process_cpu_s(pid: u32) -> f64 {
    let (u, s) = cpu_user_sys_s_of(&format!("/proc/{pid}/stat"));
    u + s
}

/// Process `pid`'s read calls so far (`syscr` in /proc/<pid>/io; 0 when it cannot be read).
pub fn process_read_calls(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("syscr:").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// User and system CPU time, seconds, from a Linux `stat` file (0 elsewhere).
fn cpu_user_sys_s_of(path: &str) -> (f64, f64) {
    tapgate_testkit::process::ProcStat::read(path).map_or((0.0, 0.0), |s| s.user_sys_s())
}

/// A memory figure of this process from /proc/self/status, KiB (`VmRSS`, `VmHWM`; 0 elsewhere).
pub fn status_kib(field: &str) -> u64 {
    status_kib_of("/proc/self/status", field)
}

fn status_kib_of(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Another process's CPU time (user + system), seconds, from /proc/PID/stat (0 elsewhere).
pub fn cpu_s_of_pid(pid: u32) -> f64 {
    let (u, s) = cpu_user_sys_s_of(&format!("/proc/{pid}/stat"));
    u + s
}

/// A memory figure of another process from /proc/PID/status, KiB (0 elsewhere).
pub fn status_kib_of_pid(pid: u32, field: &str) -> u64 {
    status_kib_of(&format!("/proc/{pid}/status"), field)
}
