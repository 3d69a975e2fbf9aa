//! Bench scenario `reconcile`: the time to reconcile N cards (default 1 000 000), each with an
//! issuance and a load booked, in an LMDB ledger on disk.
//!
//! The limit, in the same run: `raw_scan_ms`, the reads a reconciliation cannot do without —
//! every card's shadow (in pages of `RECONCILE_PAGE`, as reconciliation reads them) and every
//! account's balance, in one snapshot — timed right before it; `ratio` = reconcile / raw scan.
//! `rss_peak_kib` is the process's peak resident memory over the whole run (the ledger's pages
//! it touched included); `reconcile_rss_peak_kib` the peak during the reconciliation alone (the
//! peak reset right before it; 0 where it cannot be reset), and `rss_{anon,file}_{before,
//! after}_reconcile_kib` split the resident memory into the heap (anonymous) and the ledger's
//! mapped file pages. After it, for comparison, `all_cards_ms` and `all_cards_added_rss_kib`:
//! every shadow read into one `Vec` (what reconciliation held before it walked pages), its time
//! and the memory it added; `blocked_cards_us`, the read of the `blocked_cards` (one card in a
//! thousand, blocked after the population) from their index, as the signed blocklist and the
//! console read them instead of every card. The ledger lives in a temporary directory under `TAPGATE_BENCH_DIR`
//! (default `/tmp`).

use crate::stats::status_kib;
use crate::Figures;
use charging::ledger::Ledger;
use charging::reconcile::RECONCILE_PAGE;
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::TmacVerified;
use std::time::{Duration, Instant};

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
    let blocked = block_one_in_a_thousand(&ledger, n)?;
    let t_raw = Instant::now();
    let scanned = raw_scan(&ledger)?;
    let raw = t_raw.elapsed();
    anyhow::ensure!(
        scanned as u64 >= 2 * n,
        "the raw scan read {scanned} records"
    );
    // The peak so far (population, raw scan), then the peak of the reconciliation alone.
    let peak_before = status_kib("VmHWM:");
    let (anon_before, file_before) = (status_kib("RssAnon:"), status_kib("RssFile:"));
    let hwm_reset = reset_peak_rss();
    let t1 = Instant::now();
    let report = charging::reconcile::reconcile(&ledger)?;
    let elapsed = t1.elapsed();
    let reconcile_peak = status_kib("VmHWM:");
    let (anon_after, file_after) = (status_kib("RssAnon:"), status_kib("RssFile:"));
    anyhow::ensure!(
        report.cards == n && report.balanced == n,
        "{} of {} balanced",
        report.balanced,
        report.cards
    );
    let (all_cards, all_cards_kib) = all_cards_in_one_vec(&ledger, n)?;
    let t_blocked = Instant::now();
    let listed = ledger.read()?.blocked_cards()?.len() as u64;
    let blocked_read = t_blocked.elapsed();
    anyhow::ensure!(
        listed == blocked,
        "{listed} of {blocked} blocked cards listed"
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
        ("rss_peak_kib", peak_before.max(reconcile_peak).into()),
        (
            "reconcile_rss_peak_kib",
            if hwm_reset { reconcile_peak } else { 0 }.into(),
        ),
        ("rss_anon_before_reconcile_kib", anon_before.into()),
        ("rss_file_before_reconcile_kib", file_before.into()),
        ("rss_anon_after_reconcile_kib", anon_after.into()),
        ("rss_file_after_reconcile_kib", file_after.into()),
        ("all_cards_ms", (all_cards.as_millis() as u64).into()),
        ("all_cards_added_rss_kib", all_cards_kib.into()),
        ("blocked_cards", blocked.into()),
        ("blocked_cards_us", (blocked_read.as_micros() as u64).into()),
    ])
}

/// Blocks every thousandth card (as an operator would: `set_blocked`, one version each), for
/// the blocked cards' read beside `all_cards` (the signed blocklist's and the console's read,
/// from their index, against the read of every card it replaced). Returns how many.
fn block_one_in_a_thousand(ledger: &Ledger, n: u64) -> anyhow::Result<u64> {
    let uids: Vec<[u8; 7]> = (0..n)
        .step_by(1_000)
        .map(|j| {
            let mut uid = [0x04, 0, 0, 0, 0, 0, 0];
            uid[2..7].copy_from_slice(&j.to_be_bytes()[3..8]);
            uid
        })
        .collect();
    let count = uids.len() as u64;
    ledger.transact(move |t| {
        for uid in &uids {
            t.set_blocked(uid, true, "bench", 0)?;
        }
        Ok(())
    })?;
    Ok(count)
}

/// For comparison, after the reconciliation: every shadow read into one `Vec`, as
/// `all_cards` returns it (what the reconciliation held before it walked pages). Its time,
/// and what it added to the resident memory at its peak (the ledger's pages are resident
/// already: the heap the `Vec` took; 0 where the peak cannot be reset).
fn all_cards_in_one_vec(ledger: &Ledger, n: u64) -> anyhow::Result<(Duration, u64)> {
    let rss = status_kib("VmRSS:");
    let reset = reset_peak_rss();
    let t = Instant::now();
    let read = ledger.read()?.all_cards()?.len();
    let elapsed = t.elapsed();
    anyhow::ensure!(read as u64 == n, "all_cards read {read} cards");
    let added = if reset {
        status_kib("VmHWM:").saturating_sub(rss)
    } else {
        0
    };
    Ok((elapsed, added))
}

/// The reads a reconciliation cannot do without, in one snapshot: every card's shadow, a page
/// of [`RECONCILE_PAGE`] at a time as `reconcile` reads them, and every account's balance (one
/// `Vec`, as before). Returns the records read.
fn raw_scan(ledger: &Ledger) -> anyhow::Result<usize> {
    let r = ledger.read()?;
    let mut scanned = 0;
    charging::ledger::walk_card_pages(
        &mut scanned,
        RECONCILE_PAGE,
        |_, after, n| r.cards_after(after, n),
        |scanned, page| {
            *scanned += page.len();
            Ok::<_, charging::ledger::LedgerError>(())
        },
    )?;
    Ok(scanned + r.balances()?.len())
}

/// Resets this process's peak resident memory (`VmHWM`) to its current resident memory
/// (Linux: `5` into /proc/self/clear_refs). Whether it did.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
