//! Bench scenario `reconcile`: the time to reconcile N cards (default 1 000 000), each with an
//! issuance and a load booked, in an LMDB ledger on disk.

use crate::Figures;
use charging::ledger::Ledger;
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::TmacVerified;
use std::time::Instant;

pub fn run(n: Option<u64>) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let ledger = Ledger::open(dir.path(), 8 << 30)?;
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
    ])
}
