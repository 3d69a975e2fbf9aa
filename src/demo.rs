//! `tapgate demo`: a day of taps and loads, in one process, on the real parts built so far.
//!
//! - The charging server (axum, software HSM, LMDB ledger with group commit, sandbox card
//!   processor, a mileage programme, a partner mall selling vouchers) runs on a loopback port.
//! - Riders who run short top up online through `tapgate charge`'s relay over HTTP, funded by
//!   card, mileage or a voucher bought from the mall; some clients vanish mid-load.
//! - Validators are the validator crate's gates (`validator::gate::Gate`, what `tapgate
//!   validator` runs): a software SAM, the signed metro-city fare table, the blocklist from MQTT
//!   and an LMDB journal each, at rail gates (tap in/out), bus doors and the night bus. They
//!   quote fares from the cards' trip records (distance, transfers, caps, tap-out penalties),
//!   debit emulated cards offline, and publish signed tap records over MQTT to the embedded
//!   broker (rumqttd, a password per device), keeping them until the gateway confirms. About 2%
//!   of dialogues are torn (power lost after any NVM write, card pulled before any APDU, answer
//!   lost after it); the rider taps that gate again and its journal settles the debit from the
//!   card's counter. The gateway stores taps durably, forwards them to clearing, and is killed
//!   and restarted mid-day.
//! - A hotel's pay-TV box (a charge gate with the hotel's signed table) sells films and sports
//!   hours on the same cards over the hotel's topics to a second gateway (operator "hotel",
//!   relaying no blocklist: the box holds the card scheme's list from the metro's topics), so
//!   the revenue per operator is booked apart and checked against what each side collected.
//! - The day ends with the conservation check: every card's balance equals the ledger's shadow
//!   purse, reconciliation balances every card, no counter is lost or booked twice.

use anyhow::{ensure, Result};
use clap::Args;
use std::time::Instant;
use tapgate_sim::day::{self, DayConfig, Event};
use tapgate_sim::tally::DayReport;

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
    /// Random seed (a run with the same seed and sizes repeats, but for timings).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-mille of card dialogues torn at a random point.
    #[arg(long = "tear-per-mille", default_value_t = 20)]
    tear_per_mille: u32,
    /// Keep the charging data here (default: a temporary directory removed at the end).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// Runs the demo: the simulated day of `tapgate_sim`, its progress and summary printed.
pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let cfg = DayConfig {
        validators: args.validators,
        cards: args.cards,
        taps: args.taps,
        seed: args.seed,
        tear_per_mille: args.tear_per_mille,
        data: args.data.clone(),
    };
    let report = day::run(&cfg, &mut |event| print_event(&args, event))?;
    if std::env::var("TAPGATE_DEMO_DEBUG").is_ok() {
        for d in &report.conservation.reconcile.differences {
            eprintln!("difference: {d:?}");
        }
    }
    let summary = summary(&args, &report, started);
    if args.json {
        println!("{summary}");
    } else {
        print_summary(&report);
    }
    ensure!(
        report.value_conserved,
        "conservation check failed: {summary}"
    );
    Ok(())
}

/// The start line and a progress line per tenth of the day (not with `--json`).
fn print_event(args: &DemoArgs, event: Event<'_>) {
    if args.json {
        return;
    }
    match event {
        Event::Started { base } => println!(
            "tapgate demo: {} validators, {} cards, {} taps, seed {}; charging server on {base}",
            args.validators, args.cards, args.taps, args.seed
        ),
        Event::Progress(p) => println!(
            "[{:>3}%] taps accepted {:>6}  refused {:>5}  torn {:>4}  loads {:>5} (torn {:>3})  cleared {:>6}",
            p.percent, p.taps_accepted, p.taps_refused, p.taps_torn, p.loads_completed, p.loads_torn, p.cleared
        ),
    }
}

/// The JSON summary (its fields are what tests/demo.rs and operators script against).
fn summary(args: &DemoArgs, report: &DayReport, started: Instant) -> serde_json::Value {
    let (t, c) = (&report.tally, &report.conservation);
    let propagation_ms = &t.block_propagation_ms;
    let mut summary = serde_json::json!({
        "validators": args.validators,
        "cards": args.cards,
        "seed": args.seed,
        "taps_accepted": t.taps_accepted,
        "taps_refused": t.taps_refused + t.taps_refused_blocked,
        "taps_refused_insufficient": t.taps_refused,
        "taps_refused_blocklisted": t.taps_refused_blocked,
        "taps_refused_by_reason": t.refusals,
        "taps_repeat": t.taps_repeat,
        "taps_transfer": t.taps_transfer,
        "taps_capped": t.taps_capped,
        "taps_penalty": t.taps_penalty,
        "fare_table_version": report.fare_table.version,
        "block_propagation_ms_p50": propagation_ms.get(propagation_ms.len() / 2).copied().unwrap_or(0),
        "block_propagation_ms_p99": propagation_ms.last().copied().unwrap_or(0),
        "lost_card_blocked": t.lost_card_blocked,
        "taps_torn": t.taps_torn,
        "taps_cleared": t.taps_cleared,
        "taps_lost": c.taps_lost,
        "taps_duplicated": c.taps_duplicated,
        "duplicates_dropped": t.clearing_duplicates,
        "gateway_restarts": report.gateway_restarts,
        "clearing_anomalies": t.clearing_anomalies,
        "loads_completed": t.loads_completed + t.loads_completed_by_clearing,
        "loads_refused": t.loads_refused,
        "loads_torn": t.loads_torn,
        "loads_voided": c.loads_voided,
        "loads_paid_twice": c.loads_paid_twice,
        "loads_by_source": t.loads_by_source,
        "debits_settled_committed": t.debits_settled_committed,
        "debits_settled_not_committed": t.debits_settled_not_committed,
        "debits_unresolved": t.debits_unresolved,
        "revenue_minor": t.revenue_minor,
        "cards_out_of_balance": c.cards_out_of_balance,
        "reconcile_differences": c.reconcile.differences.len(),
        "value_conserved": report.value_conserved,
        "tap_latency_us_p50": report.tap_latency_us_p50,
        "tap_latency_us_p99": report.tap_latency_us_p99,
        "wall_ms": started.elapsed().as_millis() as u64,
    });
    // (More fields than one json! call may hold.)
    summary["revenue_minor_by_operator"] = serde_json::json!(c.revenue_by_operator);
    summary["revenue_agrees"] = report.revenue_agrees.into();
    summary["tv_sales"] = t.tv_sales.into();
    summary["tv_sales_accepted"] = t.tv_accepted.into();
    summary
}

/// The summary in words.
fn print_summary(report: &DayReport) {
    let (t, c) = (&report.tally, &report.conservation);
    let table = &report.fare_table;
    let propagation_ms = &t.block_propagation_ms;
    let (p50, p99) = (report.tap_latency_us_p50, report.tap_latency_us_p99);
    let gateway_restarts = report.gateway_restarts;
    println!("summary");
    println!(
        "  taps accepted          {} ({} torn and settled later)",
        t.taps_accepted, t.debits_settled_committed
    );
    println!(
        "  fares                  {} (version {}): {} minor units collected; {} taps continued a journey (transfer), {} were capped, {} carried a missing-tap-out penalty",
        table.name, table.version, t.revenue_by_operator.get("metro").copied().unwrap_or(0), t.taps_transfer, t.taps_capped, t.taps_penalty
    );
    println!(
        "  taps refused           {} by reason {:?} (insufficient value: the rider tops up online)",
        t.taps_refused + t.taps_refused_blocked,
        t.refusals
    );
    println!(
        "  taps cleared           {} via MQTT, the gateway and clearing; gateway killed and restarted {gateway_restarts}x mid-day; {} duplicates dropped, {} quarantined",
        t.taps_cleared, t.clearing_duplicates, t.clearing_anomalies
    );
    println!(
        "  loads completed        {} over HTTP by source {:?}; {} completed from cleared taps",
        t.loads_completed, t.loads_by_source, t.loads_completed_by_clearing
    );
    println!(
        "  loads torn             {} (client vanished); {} voided in all, none paid twice: {}",
        t.loads_torn,
        c.loads_voided,
        c.loads_paid_twice == 0
    );
    println!(
        "  revenue                by operator as booked from cleared taps: {}; {} what the validators collected",
        c.revenue_by_operator
            .iter()
            .map(|(op, v)| format!("{op} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        if report.revenue_agrees { "equals" } else { "DIFFERS FROM" }
    );
    println!(
        "  hotel pay-TV           {} sales of {} presentations (films, sports hours under the TV-day cap), through the hotel's own gateway",
        t.tv_accepted, t.tv_sales
    );
    println!(
        "  lost card blocked      reached all {} validators in {} ms (p50 {} ms); {} taps refused as blocklisted",
        propagation_ms.len(),
        propagation_ms.last().copied().unwrap_or(0),
        propagation_ms.get(propagation_ms.len() / 2).copied().unwrap_or(0),
        t.taps_refused_blocked
    );
    println!("  tap latency            p50 {p50} µs, p99 {p99} µs (card + SAM in process)");
    println!(
        "  reconciliation         {} cards, {} balanced, {} differences",
        c.reconcile.cards,
        c.reconcile.balanced,
        c.reconcile.differences.len()
    );
    println!(
        "  conservation           {}",
        if report.value_conserved {
            "held: every card's balance = personalised + loads − debits = the ledger's shadow purse"
        } else {
            "FAILED"
        }
    );
}
