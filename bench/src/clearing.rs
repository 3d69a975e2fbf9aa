//! Bench scenario `clearing`: tap batches cleared per second by the charging core — every tap's
//! transaction MAC verified in the software HSM, counters booked, postings group-committed to
//! LMDB with fsync. The taps are real: debits on emulated cards through validator SAMs.

use crate::Figures;
use charging::clearing::{clear_batch, ClearingBatch, ClearingTap};
use charging::ledger::Ledger;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::receipt::TxKind;
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::SeedableRng;
use std::sync::Mutex;
use std::time::Instant;

pub fn run(n: Option<u64>) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(100_000);
    let batch_taps = 1_000usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let keys = KeySet::generate(&mut rng);
    let hsm = SoftwareHsm::new(&keys)?;
    let mut sam = SoftwareSam::validator(&keys, 1001)?;
    let cards_n = 1_000u64;
    let mut cards: Vec<Card> = (0..cards_n)
        .map(|i| {
            let mut uid = [0x04, 0, 0, 0, 0, 0, 9];
            uid[1..5].copy_from_slice(&(i as u32).to_be_bytes());
            let mut p = Personalisation::transit(uid, i32::MAX / 2);
            p.upper_limit_minor = i32::MAX;
            Card::personalise(&p, hsm.card_keys(&uid, 1).expect("keys"))
        })
        .collect();
    let cards_issued: Vec<[u8; 7]> = cards.iter().map(|c| c.state().uid).collect();
    let mut taps = Vec::with_capacity(n as usize);
    let mut card_rng = rand::rngs::StdRng::seed_from_u64(2);
    for i in 0..n {
        let card = &mut cards[(i % cards_n) as usize];
        let mut reader = EmulatedReader {
            card,
            rng: &mut card_rng,
        };
        let Outcome::Committed { receipt, .. } =
            txn::debit(&mut reader, &mut sam, &mut rng, |_| Decision::Apply {
                amount_minor: 125,
                record: None,
            })?
        else {
            anyhow::bail!("debit refused")
        };
        taps.push(ClearingTap {
            device_id: 1001,
            device_seq: i + 1,
            card_uid: hex::encode_upper(receipt.uid()),
            tmc: receipt.tmc(),
            kind: if receipt.kind() == TxKind::Debit {
                "debit"
            } else {
                "record_only"
            }
            .into(),
            amount_minor: receipt.amount_minor(),
            balance_after_minor: receipt.balance_after_minor(),
            tmv: hex::encode_upper(receipt.tmv()),
            key_version: receipt.key_version(),
            operator: Some("metro".into()),
            device_time_ms: 0,
        });
    }
    let dir = tempfile::tempdir()?;
    let ledger = Ledger::open(dir.path(), 4 << 30)?;
    {
        // The cards were issued: their personalised value is in the ledger.
        let issued = cards_issued.clone();
        ledger.transact(move |t| {
            for c in &issued {
                t.post(
                    0,
                    "issuer:float",
                    &charging::ledger::card_account(c),
                    i64::from(i32::MAX / 2),
                    "issue",
                )?;
                t.put_card(
                    c,
                    &charging::ledger::CardShadow {
                        booked_balance_minor: Some(i32::MAX / 2),
                        ..Default::default()
                    },
                )?;
            }
            Ok(())
        })?;
    }
    let hsm: Mutex<Box<dyn Hsm + Send>> = Mutex::new(Box::new(SoftwareHsm::new(&keys)?));
    let started = Instant::now();
    let mut cleared = 0u64;
    for (b, chunk) in taps.chunks(batch_taps).enumerate() {
        let out = clear_batch(
            &ledger,
            &hsm,
            ClearingBatch {
                batch_id: format!("b{b}"),
                taps: chunk.to_vec(),
            },
            0,
        )?;
        anyhow::ensure!(
            out.anomalies.is_empty(),
            "{} anomalies, the first: {:?}",
            out.anomalies.len(),
            out.anomalies.first()
        );
        cleared += u64::from(out.cleared);
    }
    let wall = started.elapsed();
    Ok(vec![
        ("taps", cleared.into()),
        ("batch_taps", (batch_taps as u64).into()),
        (
            "taps_per_s",
            ((cleared as f64 / wall.as_secs_f64()) as u64).into(),
        ),
        (
            "batches_per_s",
            (((cleared as f64 / batch_taps as f64) / wall.as_secs_f64()) as u64).into(),
        ),
    ])
}
