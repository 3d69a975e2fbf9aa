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
//! - A rail ticket office (merchant `rail-tickets`) sells train tickets online every 50 taps:
//!   riders pay from their cards through the same relay as the top-ups (a rider short of value
//!   tops up first); some clients vanish mid-payment and pay again at the card's next contact,
//!   which settles the torn payment first; one ticket in five is refunded (wholly or keeping a
//!   fee) and the card that paid collects the refund online.
//! - The charging server serves the cardholder pages and the operator console (`console: URL`,
//!   `cardholder login: NAME PASSWORD` for one rider and `operator login: NAME PASSWORD`, new
//!   passwords each run) while the day runs; `--keep-serving` keeps them up after it until
//!   interrupted.
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
    /// After the day, keep the charging server and its pages up until interrupted (Ctrl-C).
    #[arg(long = "keep-serving")]
    keep_serving: bool,
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
    let (report, serving) = if args.keep_serving {
        let (report, serving) =
            day::run_and_keep_serving(&cfg, &mut |event| print_event(&args, event))?;
        (report, Some(serving))
    } else {
        (
            day::run(&cfg, &mut |event| print_event(&args, event))?,
            None,
        )
    };
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
    if let Some(serving) = serving {
        println!(
            "the day is over; the pages stay up at {}/ until interrupted (Ctrl-C)",
            serving.base()
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(tokio::signal::ctrl_c())?;
        drop(serving);
    }
    ensure!(
        report.value_conserved,
        "conservation check failed: {summary}"
    );
    Ok(())
}

/// The start line and a progress line per tenth of the day (not with `--json`).
fn print_event(args: &DemoArgs, event: Event<'_>) {
    // The pages' lines come in either mode (a script reads them before the JSON line).
    if let Event::Pages {
        console,
        name,
        password,
        operator,
        operator_password,
    } = event
    {
        println!("console: {console}");
        println!("cardholder login: {name} {password}");
        println!("operator login: {operator} {operator_password}");
        return;
    }
    if let Event::GatewayConsole { console } = event {
        println!("gateway console: {console}");
        return;
    }
    if args.json {
        return;
    }
    match event {
        Event::Started { base } => println!(
            "tapgate demo: {} metro validators and the hotel's pay-TV box, {} cards, {} taps, seed {}; charging server on {base}",
            args.validators, args.cards, args.taps, args.seed
        ),
        Event::Pages { .. } | Event::GatewayConsole { .. } => {}
        Event::Progress(p) => println!(
            "[{:>3}%] taps accepted {:>6}  refused {:>5}  interrupted {:>4}  top-ups {:>5} (interrupted {:>3})  metro taps at clearing {:>6}",
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
        // Load intents only: the payments' and refund collections' voided intents apart.
        "loads_voided": loads_voided(report),
        "loads_paid_twice": c.loads_paid_twice,
        "loads_by_source": t.loads_by_source,
        "debits_settled_committed": t.debits_settled_committed,
        "debits_settled_not_committed": t.debits_settled_not_committed,
        "debits_unresolved": t.debits_unresolved,
        "cards_out_of_balance": c.cards_out_of_balance,
        "reconcile_differences": c.reconcile.differences.len(),
        "value_conserved": report.value_conserved,
        "tap_latency_us_p50": report.tap_latency_us_p50,
        "tap_latency_us_p99": report.tap_latency_us_p99,
        "wall_ms": started.elapsed().as_millis() as u64,
    });
    // (More fields than one json! call may hold.)
    summary["revenue_minor_by_operator"] = serde_json::json!(c.revenue_by_operator);
    // Never one sum across currencies (the metro books KRW, the hotel USD).
    summary["revenue_minor_by_currency"] = serde_json::json!(report.revenue_by_currency());
    summary["currency_by_operator"] = report
        .currencies
        .iter()
        .map(|(op, (cur, exp))| {
            (
                op.to_string(),
                serde_json::json!({"currency": cur, "exponent": exp}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    summary["devices"] = (args.validators + 1).into();
    summary["taps_accepted_at_day_end"] = t.taps_accepted_at_day_end.into();
    summary["taps_refused_at_day_end"] = t.taps_refused_at_day_end.into();
    summary["refusals_reported"] = t.refusals_reported.into();
    summary["check_in_taps"] = t.check_in_taps.into();
    summary["revenue_agrees"] = report.revenue_agrees.into();
    summary["tv_sales"] = t.tv_sales.into();
    summary["tv_sales_accepted"] = t.tv_accepted.into();
    payments_summary(&mut summary, report);
    summary
}

/// The online payments' fields: per merchant, the day's totals and the ledger's agreement.
fn payments_summary(summary: &mut serde_json::Value, report: &DayReport) {
    let merchants = &report.tally.payments_by_merchant;
    let books = &report.shop_books;
    summary["payments_by_merchant"] = merchants
        .iter()
        .map(|(m, t)| {
            let v = serde_json::json!({
                "currency": t.currency,
                "exponent": t.exponent,
                "payments_made": t.payments_made,
                "payments_completed": t.payments_completed,
                "payments_after_top_up": t.payments_after_top_up,
                "paid_minor": t.paid_minor,
                "payments_refused": t.payments_refused.values().sum::<u64>(),
                "payments_refused_by_reason": t.payments_refused,
                "payments_torn": t.payments_torn,
                "payments_torn_paid_before": t.payments_torn_paid_before,
                "payments_torn_paid_on_retry": t.payments_torn_paid_on_retry,
                "payments_torn_refused_on_retry": t.payments_torn_refused_on_retry,
                "refunds": t.refunds,
                "refunds_whole": t.refunds_whole,
                "refunds_partial": t.refunds_partial,
                "refunded_minor": t.refunded_minor,
                "refunds_collected": t.refunds_collected,
                "refunds_collected_minor": t.refunds_collected_minor,
                "refund_collections_torn": t.collections_torn,
                "refund_collections_torn_credited_before": t.collections_torn_credited_before,
                "refund_collections_torn_credited_on_retry": t.collections_torn_credited_on_retry,
                "booked_minor": books.merchant_minor.get(m).copied().unwrap_or(0),
            });
            (m.clone(), v)
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    let sum = |f: fn(&tapgate_sim::tally::MerchantTally) -> u64| -> u64 {
        merchants.values().map(f).sum()
    };
    summary["payments_completed"] = sum(|t| t.payments_completed).into();
    summary["payments_torn"] = sum(|t| t.payments_torn).into();
    summary["payments_paid_twice"] = report.conservation.payments_paid_twice.into();
    summary["refunds_collected"] = sum(|t| t.refunds_collected).into();
    summary["refunds_credited_twice"] = books.refunds_credited_twice.into();
    summary["refunds_pending_minor"] = books.refunds_pending_minor.into();
    summary["payments_agree"] = report.payments_agree.into();
    summary["payment_intents_voided"] = books.payment_intents_voided.into();
    summary["refund_intents_voided"] = books.refund_intents_voided.into();
}

/// Load intents voided (the ledger's count holds the payments' and refunds' too).
fn loads_voided(report: &DayReport) -> u64 {
    let b = &report.shop_books;
    report
        .conservation
        .loads_voided
        .saturating_sub(b.payment_intents_voided + b.refund_intents_voided)
}

/// An operator's amount in its currency (`1,780,900 KRW`).
fn money(report: &DayReport, operator: &str, minor: i64) -> String {
    match report.currencies.get(operator) {
        Some((cur, exp)) => crate::money::amount(minor, *exp, cur),
        None => format!("{minor} minor units"),
    }
}

/// The summary in words, for an agency: what each line counts is in docs/operations.md
/// ("The demo's summary").
fn print_summary(report: &DayReport) {
    let (t, c) = (&report.tally, &report.conservation);
    let table = &report.fare_table;
    let propagation_ms = &t.block_propagation_ms;
    let ms = |us: f64| format!("{:.1} ms", us / 1000.0);
    let refused = t.taps_refused + t.taps_refused_blocked;
    let reasons = counted_reasons(&t.refusals);
    let metro_fares = t.revenue_by_operator.get("metro").copied().unwrap_or(0);
    println!("summary");
    println!(
        "  taps accepted          {} ({} at the metro's gates, {} sales at the hotel's pay-TV box)",
        t.taps_accepted,
        t.taps_accepted - t.tv_accepted,
        t.tv_accepted,
    );
    println!(
        "  day's end              after the last progress line, cards interrupted mid-tap were presented once more: {} accepted, {} refused (counted above)",
        t.taps_accepted_at_day_end, t.taps_refused_at_day_end
    );
    let before_paying = t.taps_torn.saturating_sub(
        t.debits_settled_committed + t.debits_settled_not_committed + t.debits_unresolved,
    );
    println!(
        "  interrupted taps       {} (card pulled or power lost mid-tap): {} had paid (booked when the card came back), {} had started paying and were rolled back by the card, {} stopped before paying{}",
        t.taps_torn,
        t.debits_settled_committed,
        t.debits_settled_not_committed,
        before_paying,
        if_any(t.debits_unresolved, |n| format!(
            ", {n} not yet known (settled by clearing)"
        ))
    );
    println!(
        "  fares                  {} (version {}): {} collected; {} taps continued a journey (transfer), {} were capped, {} carried a missing-tap-out penalty",
        table.name,
        table.version,
        money(report, "metro", metro_fares),
        t.taps_transfer,
        t.taps_capped,
        t.taps_penalty
    );
    println!(
        "  taps refused           {refused}: {reasons} (a rider short of value tops up online)"
    );
    println!(
        "  taps sent to clearing  {} = {} accepted + {} refusals (reported, no money moves) + {} free check-in taps (cards whose top-up was interrupted); through MQTT and the operators' gateways (the metro's killed and restarted {}x mid-day); {} duplicates dropped, {} set aside as suspect",
        t.taps_cleared,
        t.taps_accepted,
        t.refusals_reported,
        t.check_in_taps,
        report.gateway_restarts,
        t.clearing_duplicates,
        t.clearing_anomalies
    );
    println!(
        "  top-ups                {} completed online, by funding {}{}",
        t.loads_completed + t.loads_completed_by_clearing,
        t.loads_by_source
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        if_any(t.loads_completed_by_clearing, |n| format!(
            " ({n} confirmed later from the card's next taps)"
        ))
    );
    println!(
        "  interrupted top-ups    {} (the rider's phone or PC went away mid-top-up): {} cancelled and the payment released; {} charged twice",
        t.loads_torn,
        loads_voided(report),
        c.loads_paid_twice
    );
    println!(
        "  revenue                {}; {} what the validators collected",
        c.revenue_by_operator
            .iter()
            .map(|(op, v)| format!("{op} {}", money(report, op, *v)))
            .collect::<Vec<_>>()
            .join(", "),
        if report.revenue_agrees {
            "booked from cleared taps, equal to"
        } else {
            "booked from cleared taps, DIFFERENT FROM"
        }
    );
    println!(
        "  hotel pay-TV           {} sales of {} presentations (films, sports hours under the TV-day cap), through the hotel's own gateway",
        t.tv_accepted, t.tv_sales
    );
    print_payments(report);
    println!(
        "  lost card blocked      reached all {} devices ({} metro validators and the hotel's box) within {} ms (half of them within {} ms); {} taps refused as blocked",
        propagation_ms.len(),
        propagation_ms.len().saturating_sub(1),
        propagation_ms.last().copied().unwrap_or(0),
        propagation_ms.get(propagation_ms.len() / 2).copied().unwrap_or(0),
        t.taps_refused_blocked
    );
    println!(
        "  tap time at the gate   median {}, 99% within {} (card and security module in this process)",
        ms(report.tap_latency_us_p50),
        ms(report.tap_latency_us_p99)
    );
    println!(
        "  reconciliation         {} cards, {} balanced, {} differences",
        c.reconcile.cards,
        c.reconcile.balanced,
        c.reconcile.differences.len()
    );
    println!(
        "  value conserved        {}",
        if report.value_conserved {
            "yes: every card's balance = issued + top-ups + refunds − fares − online payments = what the back office's ledger says it holds; each merchant's account = paid − refunded"
        } else {
            "NO"
        }
    );
}

/// Refusals counted by reason, as a report line lists them: `3 insufficient value, 1 expired`.
fn counted_reasons<R: AsRef<str>>(counts: &std::collections::BTreeMap<R, u64>) -> String {
    counts
        .iter()
        .map(|(r, n)| format!("{n} {}", r.as_ref().replace('_', " ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A clause of a report line that is there only when its count is not zero.
fn if_any(count: u64, clause: impl FnOnce(u64) -> String) -> String {
    if count > 0 {
        clause(count)
    } else {
        String::new()
    }
}

/// The `online payments` and `refunds` lines: per merchant, in its currency.
fn print_payments(report: &DayReport) {
    let books = &report.shop_books;
    for (m, t) in &report.tally.payments_by_merchant {
        let money = |minor: i64| crate::money::amount(minor, t.exponent, &t.currency);
        let refused = counted_reasons(&t.payments_refused);
        println!(
            "  online payments        {m} (rail ticket office): {} tickets paid from cards through the relay, {}{}; {} interrupted mid-payment, settled at the card's next contact: {} had paid, {} paid then, {} refused then{}; {} paid twice",
            t.payments_completed,
            money(t.paid_minor),
            if refused.is_empty() {
                String::new()
            } else {
                format!(" ({} refused: {refused})", t.payments_refused.values().sum::<u64>())
            },
            t.payments_torn,
            t.payments_torn_paid_before,
            t.payments_torn_paid_on_retry,
            t.payments_torn_refused_on_retry,
            if_any(t.payments_after_top_up, |n| format!(
                "; {n} paid after the rider topped up (the card held too little)"
            )),
            report.conservation.payments_paid_twice,
        );
        println!(
            "  refunds                {m}: {} ({} whole, {} keeping a fee), {}; {} collected onto the cards that paid, {} ({} collections interrupted: {} had been credited, {} credited then); {} still to collect; the merchant's account {} = paid − refunded{}",
            t.refunds,
            t.refunds_whole,
            t.refunds_partial,
            money(t.refunded_minor),
            t.refunds_collected,
            money(t.refunds_collected_minor),
            t.collections_torn,
            t.collections_torn_credited_before,
            t.collections_torn_credited_on_retry,
            money(t.refunded_minor - t.refunds_collected_minor),
            money(books.merchant_minor.get(m).copied().unwrap_or(0)),
            if report.payments_agree { "" } else { " — DISAGREES" },
        );
    }
}
