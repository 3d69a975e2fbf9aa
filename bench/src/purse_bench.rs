//! Bench scenarios `debit` and `load`: one complete card transaction, card and terminal sides
//! in one process (emulated card, software SAM/HSM), reporting per-transaction latency, and
//! beside it the limit measured in the same process, in alternation with it (20 rounds of
//! n/20 runs of each): `floor_ns`, the median of the same AES block operations, key expansions
//! and CMACs alone ([`crate::limits::DEBIT`], [`crate::limits::LOAD`]), and `ratio_to_floor` =
//! median / floor.

use crate::limits::{self, CryptoWork};
use crate::stats::{quantile, time_alternating};
use crate::Figures;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::{Sam, SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, LoadOutcome, Outcome};
use rand::rngs::StdRng;
use rand::SeedableRng;

struct Rig {
    hsm: SoftwareHsm,
    sam: SoftwareSam,
    card: Card,
    rng: StdRng,
    card_rng: StdRng,
}

fn rig(balance_minor: i32) -> Rig {
    let mut rng = StdRng::seed_from_u64(1);
    let keys = KeySet::generate(&mut rng);
    let hsm = SoftwareHsm::new(&keys).expect("hsm");
    let sam = SoftwareSam::validator(&keys, 1001).expect("sam");
    let uid = [0x04, 0x78, 0x2E, 0x21, 0x80, 0x1D, 0x80];
    let mut p = Personalisation::transit(uid, balance_minor);
    p.upper_limit_minor = i32::MAX;
    let card = Card::personalise(&p, hsm.card_keys(&uid, 1).expect("card keys"));
    Rig {
        hsm,
        sam,
        card,
        rng,
        card_rng: StdRng::seed_from_u64(2),
    }
}

fn figures(samples: &[u64], n: u64, work: &CryptoWork, floor: &[u64]) -> Figures {
    let median_ns = quantile(samples, 0.5);
    let mut f = vec![
        ("n", n.into()),
        ("median_ns", median_ns.into()),
        ("p99_ns", quantile(samples, 0.99).into()),
        ("min_ns", quantile(samples, 0.0).into()),
    ];
    f.extend(limits::crypto_floor_figures(work, floor, median_ns));
    f
}

/// One complete debit: select, key version, EV2 authentication, GetValue, TM file and trip
/// records under MAC, Debit (FULL), WriteRecord, CommitTransaction, commit-MAC and counter
/// checks, and the device MAC over the tap.
pub fn debit(n: Option<u64>) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(20_000);
    let mut r = rig(i32::MAX / 2);
    let mut seq = 0u64;
    // The limit, timed in alternation with the debits: the same AES and CMAC work alone.
    let (floor, samples) =
        time_alternating(n / 10, n, 20, limits::crypto_work(&limits::DEBIT), || {
            let mut reader = EmulatedReader {
                card: &mut r.card,
                rng: &mut r.card_rng,
            };
            let out = txn::debit(&mut reader, &mut r.sam, &mut r.rng, |_| Decision::Apply {
                amount_minor: 1,
                record: Some(vec![0x11; txn::RECORD_SIZE]),
            })
            .expect("debit");
            let Outcome::Committed { receipt, .. } = out else {
                panic!("debit refused")
            };
            seq += 1;
            let tap = purse::tap::TapRecord::accepted(
                &receipt,
                purse::tap::TapMeta {
                    device_id: 1001,
                    device_seq: seq,
                    ..Default::default()
                },
            );
            std::hint::black_box(tap.sign_with("metro", |b| r.sam.device_mac(b)));
        });
    Ok(figures(&samples, n, &limits::DEBIT, &floor))
}

/// One complete online load: the same dialogue with the credit key in the software HSM,
/// Credit in FULL mode, and the HSM's transaction-MAC verification.
pub fn load(n: Option<u64>) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(20_000);
    let mut r = rig(0);
    let (floor, samples) =
        time_alternating(n / 10, n, 20, limits::crypto_work(&limits::LOAD), || {
            let mut reader = EmulatedReader {
                card: &mut r.card,
                rng: &mut r.card_rng,
            };
            let out = txn::load_online(&mut reader, &mut r.hsm, &mut r.rng, |_| Decision::Apply {
                amount_minor: 1,
                record: None,
            })
            .expect("load");
            assert!(matches!(out, LoadOutcome::Loaded { .. }));
        });
    Ok(figures(&samples, n, &limits::LOAD, &floor))
}
