//! Bench scenario `reconcile`: the time to reconcile N cards (default 1 000 000), each with an
//! issuance and a load booked, in an LMDB ledger on disk.
//!
//! The limit, in the same run: `raw_scan_ms`, the reads a reconciliation cannot do without —
//! every card's shadow and every account's balance, read whole in one snapshot — timed right
//! before it; `ratio` = reconcile / raw scan. `rss_peak_kib` is the process's peak resident
//! memory (the ledger's pages it touched included). The ledger lives in a temporary directory
//! under `TAPGATE_BENCH_DIR` (default `/tmp`).

use crate::Figures;
use charging::ledger::Ledger;
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::TmacVerified;
use std::time::Instant;

pub fn run(n: Option<u64>) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(1_000_000);
    let dir = tempfile::tempdir_in(std::env::var("TAPGATE_BENCH_DIR").unwrap_or("/tmp".into()))?;
    // 2 KiB of map per card (a multiple of the page size), at least 2 GiB.
    let map = n.max(1_000_000).div_ceil(2) * 4096;
    let ledger = Ledger::open(dir.path(), map as usize)?;
    let t0 = Instant::now();
    let chunk = 50_000u64;
    let mut i = 0u64;
    while i < n {
        ledger.transact(move |t| {
            for j in i..(i + chunk).min(n) {
                let mut uid = [0x04, 0, 0, 0, 0, 0, 0];
                uid[2..7].copy_from_slice(&j.to_be_bytes()[3..8]);
                // Issued with 1 000, then a load of 500 at counter 1 that the HSM proved
                // (a franchise terminal's: posted and booked without an intent).
                t.issue_card(&uid, 1_000, "issue", 0)?;
                let load = TmacVerified::for_tests(CommitReceipt::for_tests(
                    uid,
                    1,
                    [0; 8],
                    TxKind::Credit,
                    500,
                    1_500,
                ));
                t.post_franchise_load(&load, "bench", "load", 0)?;
                t.book_proved(&load, 0)?;
            }
            Ok(())
        })?;
        i += chunk;
    }
    let populate = t0.elapsed();
    let t_raw = Instant::now();
    let scanned = {
        let r = ledger.read()?;
        r.all_cards()?.len() + r.balances()?.len()
    };
    let raw = t_raw.elapsed();
    anyhow::ensure!(
        scanned as u64 >= 2 * n,
        "the raw scan read {scanned} records"
    );
    let t1 = Instant::now();
    let report = charging::reconcile::reconcile(&ledger)?;
    let elapsed = t1.elapsed();
    anyhow::ensure!(
        report.cards == n && report.balanced == n,
        "{} of {} balanced",
        report.balanced,
        report.cards
    );
    Ok(vec![
        ("cards", n.into()),
        ("reconcile_ms", (elapsed.as_millis() as u64).into()),
        (
            "cards_per_s",
            ((n as f64 / elapsed.as_secs_f64()) as u64).into(),
        ),
        ("populate_ms", (populate.as_millis() as u64).into()),
        ("raw_scan_ms", (raw.as_millis() as u64).into()),
        (
            "ratio",
            ((elapsed.as_secs_f64() / raw.as_secs_f64().max(1e-9) * 100.0).round() / 100.0).into(),
        ),
        ("rss_peak_kib", crate::stats::status_kib("VmHWM:").into()),
    ])
}
