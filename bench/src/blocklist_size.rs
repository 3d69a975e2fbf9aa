//! Bench scenario `blocklist-size` (issue 22, "How cost grows"): a validator's blocklist of
//! 100,000 / 1,000,000 / 5,000,000 / 10,000,000 random 7-byte card UIDs, each size in a fresh
//! child process (`--n N`: that size alone, in this process), held as
//! `purse::blocklist::Blocklist` (the compact `UidSet`) and, as the limit of the same run, as
//! a plain sorted `Vec<[u8; 7]>` (7 bytes a card, nothing to decode).
//!
//! Per size: `bytes` (the heap the structure holds, from its allocations' sizes),
//! `bytes_per_card`, `rss_delta_kib` (VmRSS after building minus before), `build_ms` (a
//! snapshot applied: keys, sort, pack), `contains_p50_ns`/`contains_p99_ns` (one lookup, half
//! of them blocked cards, timed in alternation with the limit's `binary_search`),
//! `delta_1000_us` (a delta of 500 blocks and 500 unblocks applied), and the same figures of
//! the sorted array under `vec_…`, with `bytes_ratio` and `p99_ratio` to it.
//! `budget_bytes` is the validator's 64 MiB; `fits_budget` says whether the largest size fits.
//!
//! `snapshot_apply` (one row per size): peak resident size and time of a validator applying a
//! snapshot of that size delivered in signed chunks, beside the same run's sorted array and
//! the single-message path (see [`chunks`]).

use crate::stats::{quantile, status_kib, time_alternating};
use crate::Figures;
use purse::blocklist::{Blocklist, ListKind, ListUpdate};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use std::hint::black_box;
use std::time::Instant;

mod chunks;

const BUDGET_BYTES: usize = 64 << 20;
const PROBES: u64 = 200_000;
const SIZES: [u64; 4] = [100_000, 1_000_000, 5_000_000, 10_000_000];

fn update(kind: ListKind, from: u64, to: u64, entries: Vec<([u8; 7], bool)>) -> ListUpdate {
    ListUpdate {
        kind,
        operator: "metro".into(),
        from_version: from,
        to_version: to,
        entries,
    }
}

fn random_uids(rng: &mut StdRng, n: usize) -> Vec<[u8; 7]> {
    (0..n)
        .map(|_| {
            let mut u = [0u8; 7];
            rng.fill_bytes(&mut u);
            u
        })
        .collect()
}

/// One size: the compact list and its figures beside the limit's.
fn one_size(rng: &mut StdRng, n: usize) -> anyhow::Result<(Blocklist, serde_json::Value)> {
    let uids = random_uids(rng, n);
    let snap = update(
        ListKind::Snapshot,
        0,
        1,
        uids.iter().map(|u| (*u, true)).collect(),
    );
    let rss0 = status_kib("VmRSS:");
    let t = Instant::now();
    let mut list = Blocklist::new("metro");
    list.apply_verified(&snap)?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss_delta_kib = status_kib("VmRSS:").saturating_sub(rss0);
    drop(snap);

    let vrss0 = status_kib("VmRSS:");
    let t = Instant::now();
    let mut sorted = uids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let vec_build_ms = t.elapsed().as_secs_f64() * 1e3;
    let vec_rss_delta_kib = status_kib("VmRSS:").saturating_sub(vrss0);
    anyhow::ensure!(list.len() == sorted.len(), "the compact list lost cards");

    // Probes: even ones blocked cards, odd ones random (almost surely not blocked).
    let probes: Vec<[u8; 7]> = (0..PROBES as usize)
        .map(|i| {
            if i % 2 == 0 {
                uids[rng.gen_range(0..n)]
            } else {
                random_uids(rng, 1)[0]
            }
        })
        .collect();
    for p in &probes {
        anyhow::ensure!(list.is_blocked(p) == sorted.binary_search(p).is_ok());
    }
    let (mut i, mut j) = (0usize, 0usize);
    let (compact, limit) = time_alternating(
        1_000,
        PROBES,
        100,
        || {
            black_box(list.is_blocked(black_box(&probes[i % probes.len()])));
            i += 1;
        },
        || {
            black_box(
                sorted
                    .binary_search(black_box(&probes[j % probes.len()]))
                    .is_ok(),
            );
            j += 1;
        },
    );

    let changes: Vec<([u8; 7], bool)> = (0..1_000)
        .map(|k| {
            if k % 2 == 0 {
                (random_uids(rng, 1)[0], true)
            } else {
                (uids[k], false)
            }
        })
        .collect();
    let t = Instant::now();
    list.apply_verified(&update(ListKind::Delta, 1, 2, changes))?;
    let delta_1000_us = t.elapsed().as_secs_f64() * 1e6;

    let (bytes, vec_bytes) = (list.heap_bytes(), sorted.capacity() * 7);
    let (p99, vec_p99) = (quantile(&compact, 0.99), quantile(&limit, 0.99));
    Ok((
        list,
        json!({
            "cards": n,
            "bytes": bytes,
            "bytes_per_card": (bytes as f64 / n as f64 * 100.0).round() / 100.0,
            "rss_delta_kib": rss_delta_kib,
            "build_ms": build_ms.round(),
            "contains_p50_ns": quantile(&compact, 0.5),
            "contains_p99_ns": p99,
            "delta_1000_us": delta_1000_us.round(),
            "vec_bytes": vec_bytes,
            "vec_rss_delta_kib": vec_rss_delta_kib,
            "vec_build_ms": vec_build_ms.round(),
            "vec_contains_p50_ns": quantile(&limit, 0.5),
            "vec_contains_p99_ns": vec_p99,
            "bytes_ratio": (bytes as f64 / vec_bytes as f64 * 100.0).round() / 100.0,
            "p99_ratio": (p99 as f64 / vec_p99.max(1) as f64 * 100.0).round() / 100.0,
        }),
    ))
}

pub fn run(n: Option<u64>) -> anyhow::Result<Figures> {
    let child = std::env::var(chunks::CHILD_ENV).ok();
    match child.as_deref() {
        Some("size") => {}
        Some(kind) => return chunks::run_child(kind),
        None => {
            let mut figures = sizes(n)?;
            let apply = match n {
                Some(n) => vec![apply_row(n)?],
                None => SIZES
                    .iter()
                    .map(|n| apply_row(*n))
                    .collect::<anyhow::Result<Vec<_>>>()?,
            };
            figures.push(("snapshot_apply", apply.into()));
            return Ok(figures);
        }
    }
    sizes(n)
}

/// One `snapshot_apply` row: `n` random cards.
fn apply_row(n: u64) -> anyhow::Result<serde_json::Value> {
    let mut rng = StdRng::seed_from_u64(23 ^ n);
    let uids = random_uids(&mut rng, n.max(1_000) as usize);
    let row = chunks::row(&mut rng, uids)?;
    println!("{row}");
    Ok(row)
}

/// The size rows (each in a child, or `n` alone here) and the budget.
fn sizes(n: Option<u64>) -> anyhow::Result<Figures> {
    let rows = match n {
        Some(n) => {
            let mut rng = StdRng::seed_from_u64(22 ^ n);
            vec![one_size(&mut rng, n.max(1_000) as usize)?.1]
        }
        None => SIZES
            .iter()
            .map(|n| in_child(*n))
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    let largest = rows.last().and_then(|r| r["bytes"].as_u64()).unwrap_or(0);
    Ok(vec![
        ("sizes", rows.into()),
        ("budget_bytes", BUDGET_BYTES.into()),
        ("fits_budget", (largest <= BUDGET_BYTES as u64).into()),
    ])
}

/// Runs one size in a fresh process of this bench (`blocklist-size --n N --json`), so that
/// its resident-memory figures start from a heap no other size has used.
fn in_child(n: u64) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["blocklist-size", "--json", "--n", &n.to_string()])
        .env(chunks::CHILD_ENV, "size")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "blocklist-size --n {n} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last)?;
    let row = v["sizes"][0].clone();
    println!("{row}");
    Ok(row)
}
