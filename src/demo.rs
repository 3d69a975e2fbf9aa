//! `tapgate demo`: a day of taps and loads on emulated cards, in one process.
//!
//! Today it drives the purse core end to end — validators with software SAMs debiting cards,
//! the back office loading them online through the software HSM, random tears (power lost after
//! any NVM write, card pulled before any APDU, answer lost after it) settled from the card's
//! counter at its next contact — and ends with the conservation check. The broker, gateway and
//! charging daemons join it as their issues land.

use anyhow::{ensure, Result};
use clap::Args;
use purse::card::{Card, Personalisation, COMMIT_WRITES};
use purse::keys::{KeyKind, KeySet};
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use purse::txn::{
    self, settle, Decision, EmulatedReader, LoadOutcome, Outcome, PendingChange, Settlement,
    Transport, TransportError, TxError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::time::Instant;

/// `tapgate demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Number of validators.
    #[arg(long, default_value_t = 8)]
    validators: u32,
    /// Number of cards.
    #[arg(long, default_value_t = 200)]
    cards: u32,
    /// Number of taps.
    #[arg(long, default_value_t = 5_000)]
    taps: u32,
    /// Random seed (a run with the same seed and sizes repeats exactly, but for timings).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-mille of card dialogues torn at a random point.
    #[arg(long = "tear-per-mille", default_value_t = 20)]
    tear_per_mille: u32,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug)]
enum Tear {
    PullBefore(usize),
    LoseAnswer(usize),
    Power(u32),
}

struct DemoReader<'a> {
    inner: EmulatedReader<'a, &'a mut StdRng>,
    tear: Option<Tear>,
    sent: usize,
}

impl Transport for DemoReader<'_> {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        self.inner.card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.sent += 1;
        match self.tear {
            Some(Tear::PullBefore(n)) if self.sent >= n => {
                self.inner.card.remove_from_field();
                Err(TransportError::CardGone)
            }
            Some(Tear::LoseAnswer(n)) if self.sent >= n => {
                let _ = self.inner.transmit(command);
                self.inner.card.remove_from_field();
                Err(TransportError::CardGone)
            }
            _ => self.inner.transmit(command),
        }
    }
}

struct Holder {
    card: Card,
    initial_minor: i64,
    pending: Option<PendingChange>,
}

#[derive(Default)]
struct Tally {
    taps_accepted: u64,
    taps_refused_insufficient: u64,
    taps_torn: u64,
    loads_completed: u64,
    loads_torn: u64,
    settled_committed: u64,
    settled_not_committed: u64,
    loads_voided: u64,
    revenue_minor: i64,
    loaded_minor: i64,
    latencies_ns: Vec<u64>,
    receipts: Vec<CommitReceipt>,
}

fn pick_tear(rng: &mut StdRng, per_mille: u32) -> Option<Tear> {
    if rng.gen_range(0..1000) >= per_mille {
        return None;
    }
    Some(match rng.gen_range(0..3) {
        0 => Tear::PullBefore(rng.gen_range(1..=10)),
        1 => Tear::LoseAnswer(rng.gen_range(1..=10)),
        _ => Tear::Power(rng.gen_range(1..=COMMIT_WRITES)),
    })
}

fn settle_into(tally: &mut Tally, pending: &PendingChange, snap: &txn::CardSnapshot) -> Result<()> {
    match settle(pending, snap)? {
        Settlement::Committed(r) => {
            tally.settled_committed += 1;
            book(tally, r);
        }
        Settlement::NotCommitted => {
            tally.settled_not_committed += 1;
            if pending.kind == TxKind::Credit {
                tally.loads_voided += 1;
            }
        }
        Settlement::MovedOn => {
            anyhow::bail!("card moved on without being seen: cannot happen here")
        }
    }
    Ok(())
}

fn book(tally: &mut Tally, r: CommitReceipt) {
    match r.kind {
        TxKind::Debit => {
            tally.taps_accepted += 1;
            tally.revenue_minor += i64::from(r.amount_minor);
        }
        TxKind::Credit => {
            tally.loads_completed += 1;
            tally.loaded_minor += i64::from(r.amount_minor);
        }
        _ => {}
    }
    tally.receipts.push(r);
}

fn repower(h: &mut Holder, hsm: &SoftwareHsm) -> Result<()> {
    if h.card.is_torn() {
        let uid = h.card.state().uid;
        let nvm = h.card.nvm().clone();
        h.card = Card::power_on(nvm, hsm.card_keys(&uid, 1)?);
    }
    h.card.remove_from_field();
    Ok(())
}

fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    (sorted[i] as f64 / 100.0).round() / 10.0
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    ensure!(
        args.validators > 0 && args.cards > 0,
        "--validators and --cards must be > 0"
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut card_rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let keys = KeySet::generate(&mut rng);
    let mut hsm = SoftwareHsm::new(&keys)?;
    let mut sams: Vec<SoftwareSam> = (0..args.validators)
        .map(|i| SoftwareSam::validator(&keys, 1000 + i))
        .collect::<Result<_, _>>()?;
    let mut holders: Vec<Holder> = (0..args.cards)
        .map(|i| {
            let mut uid = [0x04, 0, 0, 0, 0, 0x1D, 0x80];
            uid[1..5].copy_from_slice(&i.to_be_bytes());
            let balance = rng.gen_range(0..3_000);
            let card = Card::personalise(
                &Personalisation::transit(uid, balance),
                hsm.card_keys(&uid, 1)?,
            );
            Ok(Holder {
                card,
                initial_minor: i64::from(balance),
                pending: None,
            })
        })
        .collect::<Result<_>>()?;
    if !args.json {
        println!(
            "tapgate demo: {} validators, {} cards, {} taps, seed {} (emulated cards, software SAMs and HSM)",
            args.validators, args.cards, args.taps, args.seed
        );
    }
    let mut t = Tally::default();
    let started = Instant::now();
    let step = (args.taps / 10).max(1);
    for tap in 0..args.taps {
        let ci = rng.gen_range(0..holders.len());
        let vi = rng.gen_range(0..sams.len());
        let fare = 125 + 25 * rng.gen_range(0..4);
        let tear = pick_tear(&mut rng, args.tear_per_mille);
        let h = &mut holders[ci];
        if let Some(Tear::Power(k)) = tear {
            h.card.tear_after_writes(Some(k));
        }
        let pending_before = h.pending.take();
        let mut new_pending = None;
        let mut settle_err = Ok(());
        let mut decided = false;
        let began = Instant::now();
        let result = {
            let mut reader = DemoReader {
                inner: EmulatedReader {
                    card: &mut h.card,
                    rng: &mut card_rng,
                },
                tear,
                sent: 0,
            };
            txn::debit(&mut reader, &mut sams[vi], &mut rng, |snap| {
                decided = true;
                if let Some(p) = &pending_before {
                    settle_err = settle_into(&mut t, p, snap);
                }
                let balance_after_settle = snap.balance_minor;
                if balance_after_settle < fare {
                    return Decision::Refuse;
                }
                new_pending = Some(PendingChange::new(snap, TxKind::Debit, fare));
                let mut record = vec![0u8; txn::RECORD_SIZE];
                record[..4].copy_from_slice(&(1000 + vi as u32).to_le_bytes());
                record[4..8].copy_from_slice(&fare.to_le_bytes());
                Decision::Apply {
                    amount_minor: fare,
                    record: Some(record),
                }
            })
        };
        let elapsed = began.elapsed().as_nanos() as u64;
        h.card.tear_after_writes(None);
        settle_err?;
        let mut needs_load = false;
        match result {
            Ok(Outcome::Committed { receipt, .. }) => {
                t.latencies_ns.push(elapsed);
                book(&mut t, receipt);
            }
            Ok(Outcome::Refused { .. }) => {
                t.taps_refused_insufficient += 1;
                needs_load = true;
            }
            Err(TxError::Transport(_)) => {
                t.taps_torn += 1;
                // A debit torn after the decision is settled at the card's next contact. A
                // dialogue torn before it never read the card, so an earlier pending change
                // stays pending.
                h.pending = if decided { new_pending } else { pending_before };
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("tap {tap}"))),
        }
        repower(h, &hsm)?;
        if needs_load {
            // The rider tops up online: the back office loads 2 000 through the HSM.
            let tear = pick_tear(&mut rng, args.tear_per_mille);
            if let Some(Tear::Power(k)) = tear {
                h.card.tear_after_writes(Some(k));
            }
            let mut pending = None;
            let result = {
                let mut reader = DemoReader {
                    inner: EmulatedReader {
                        card: &mut h.card,
                        rng: &mut card_rng,
                    },
                    tear,
                    sent: 0,
                };
                txn::load_online(&mut reader, &mut hsm, &mut rng, |snap| {
                    pending = Some(PendingChange::new(snap, TxKind::Credit, 2_000));
                    Decision::Apply {
                        amount_minor: 2_000,
                        record: None,
                    }
                })
            };
            h.card.tear_after_writes(None);
            match result {
                Ok(LoadOutcome::Loaded { proof, .. }) => book(&mut t, proof.receipt),
                Ok(LoadOutcome::Refused { .. }) => {}
                Err(TxError::Transport(_)) => {
                    t.loads_torn += 1;
                    h.pending = pending;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("load at tap {tap}"))),
            }
            repower(h, &hsm)?;
        }
        if !args.json && (tap + 1) % step == 0 {
            println!(
                "[{:>3}%] taps accepted {:>6}  refused {:>5}  torn {:>4}  loads {:>5}",
                (tap + 1) * 100 / args.taps,
                t.taps_accepted,
                t.taps_refused_insufficient,
                t.taps_torn + t.loads_torn,
                t.loads_completed
            );
        }
    }
    // End of day: every card with a pending change is read once more and settled.
    for h in holders.iter_mut() {
        if let Some(p) = h.pending.take() {
            let mut reader = EmulatedReader {
                card: &mut h.card,
                rng: &mut card_rng,
            };
            let (_, snap) = txn::open_session(&mut reader, &mut sams[0], KeyKind::Debit, &mut rng)?;
            settle_into(&mut t, &p, &snap)?;
            h.card.remove_from_field();
        }
    }
    let wall = started.elapsed();

    // Conservation: every card's balance equals its personalised value + loads − debits as
    // booked from receipts; every receipt's transaction MAC verifies in the HSM; every counter
    // value the card consumed is booked exactly once.
    let mut seen = HashSet::new();
    let mut duplicated = 0u64;
    let mut bad_tmac = 0u64;
    let mut per_card: std::collections::HashMap<[u8; 7], (i64, u64)> = Default::default();
    for r in &t.receipts {
        if !seen.insert((r.uid, r.tmc)) {
            duplicated += 1;
        }
        if hsm.verify_tmac(r).is_err() {
            bad_tmac += 1;
        }
        let e = per_card.entry(r.uid).or_default();
        e.0 += match r.kind {
            TxKind::Debit => -i64::from(r.amount_minor),
            TxKind::Credit | TxKind::LimitedCredit => i64::from(r.amount_minor),
            TxKind::RecordOnly => 0,
        };
        e.1 += 1;
    }
    let mut mismatched_cards = 0u64;
    let mut lost = 0u64;
    for h in &holders {
        let s = h.card.state();
        let (delta, count) = per_card.get(&s.uid).copied().unwrap_or((0, 0));
        if i64::from(s.balance_minor) != h.initial_minor + delta {
            mismatched_cards += 1;
        }
        lost += u64::from(s.tmc).saturating_sub(count);
    }
    let value_conserved = mismatched_cards == 0 && bad_tmac == 0 && duplicated == 0 && lost == 0;
    let mut lat = t.latencies_ns.clone();
    lat.sort_unstable();
    let p50 = percentile_us(&lat, 0.5);
    let p99 = percentile_us(&lat, 0.99);
    let summary = serde_json::json!({
        "validators": args.validators,
        "cards": args.cards,
        "seed": args.seed,
        "taps_accepted": t.taps_accepted,
        "taps_refused": t.taps_refused_insufficient,
        "taps_torn": t.taps_torn,
        "taps_lost": lost,
        "taps_duplicated": duplicated,
        "loads_completed": t.loads_completed,
        "loads_torn": t.loads_torn,
        "loads_voided": t.loads_voided,
        "loads_paid_twice": duplicated,
        "tears_settled_committed": t.settled_committed,
        "tears_settled_not_committed": t.settled_not_committed,
        "revenue_minor": t.revenue_minor,
        "loaded_minor": t.loaded_minor,
        "transaction_macs_refused": bad_tmac,
        "cards_out_of_balance": mismatched_cards,
        "value_conserved": value_conserved,
        "tap_latency_us_p50": p50,
        "tap_latency_us_p99": p99,
        "wall_ms": wall.as_millis() as u64,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("summary");
        println!("  taps accepted          {}", t.taps_accepted);
        println!(
            "  taps refused           {} (insufficient value, then loaded online)",
            t.taps_refused_insufficient
        );
        println!("  taps torn              {}", t.taps_torn);
        println!(
            "  loads completed        {} ({} minor units)",
            t.loads_completed, t.loaded_minor
        );
        println!("  loads torn             {}", t.loads_torn);
        println!(
            "  tears settled          {} committed, {} not committed",
            t.settled_committed, t.settled_not_committed
        );
        println!("  revenue                {} minor units", t.revenue_minor);
        println!("  tap latency            p50 {p50} µs, p99 {p99} µs (card + SAM in process)");
        println!(
            "  transaction MACs       {} verified, {} refused",
            t.receipts.len() as u64 - bad_tmac,
            bad_tmac
        );
        println!(
            "  counters               {lost} consumed but unbooked, {duplicated} booked twice"
        );
        println!(
            "  conservation           {}",
            if value_conserved {
                "held: every card's balance = personalised + loads − debits"
            } else {
                "FAILED"
            }
        );
    }
    ensure!(value_conserved, "conservation check failed");
    Ok(())
}
