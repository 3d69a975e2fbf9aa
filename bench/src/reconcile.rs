//! Bench scenario `reconcile`: the time to reconcile N cards (default 1 000 000), each with an
//! issuance and a load booked, in an LMDB ledger on disk.

use crate::Figures;
use charging::ledger::{card_account, CardShadow, Ledger};
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
                t.post(0, "issuer:float", &card_account(&uid), 1_000, "issue")?;
                t.post(0, "funding:card", &card_account(&uid), 500, "load")?;
                t.put_card(
                    &uid,
                    &CardShadow {
                        last_tmc: 1,
                        booked_through_tmc: 1,
                        booked_balance_minor: Some(1_500),
                        ..Default::default()
                    },
                )?;
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
