//! What the day counts as it goes, and its report.

use crate::check::{Conservation, ShopBooks};
use purse::card::Card;
use purse::tap::RefusalReason;
use std::collections::BTreeMap;

/// The day's counters.
#[derive(Default, Debug)]
pub struct Tally {
    /// Taps refused because the card is blocklisted.
    pub taps_refused_blocked: u64,
    /// Taps accepted (settled tears that the card had committed included).
    pub taps_accepted: u64,
    /// Taps refused for any other reason.
    pub taps_refused: u64,
    /// Dialogues torn.
    pub taps_torn: u64,
    /// Repeated presentations the gate recognised.
    pub taps_repeat: u64,
    /// Accepted taps that continued a journey under a transfer rule (from the trip record the
    /// gate wrote on the card).
    pub taps_transfer: u64,
    /// Accepted taps lowered by a cap.
    pub taps_capped: u64,
    /// Accepted taps that carried a missing-tap-out penalty.
    pub taps_penalty: u64,
    /// Refusals by reason.
    pub refusals: BTreeMap<&'static str, u64>,
    /// Torn debits the card had committed, settled by its gate.
    pub debits_settled_committed: u64,
    /// Torn debits the card had not committed.
    pub debits_settled_not_committed: u64,
    /// Torn debits the card committed but its gate could no longer prove (kept unresolved).
    pub debits_unresolved: u64,
    /// Loads completed over HTTP.
    pub loads_completed: u64,
    /// Loads refused.
    pub loads_refused: u64,
    /// Loads whose client vanished.
    pub loads_torn: u64,
    /// Completed loads by funding source.
    pub loads_by_source: BTreeMap<String, u64>,
    /// What the validators collected, by the operator the taps are booked to.
    pub revenue_by_operator: BTreeMap<&'static str, i64>,
    /// Presentations at the hotel's pay-TV box.
    pub tv_sales: u64,
    /// Sales the box made.
    pub tv_accepted: u64,
    /// Each accepted tap's time at the gate (card and SAM in process).
    pub latencies_ns: Vec<u64>,
    /// Taps the gateways forwarded to clearing: the accepted ones, the refusals the gates
    /// reported and the free check-in taps.
    pub taps_cleared: u64,
    /// Of the accepted taps, those of torn cards presented once more at the day's end (after
    /// the last progress line).
    pub taps_accepted_at_day_end: u64,
    /// Of the refused taps, those at the day's end (after the last progress line).
    pub taps_refused_at_day_end: u64,
    /// Refusals the gates reported to the gateway (they go to clearing too, moving no money).
    pub refusals_reported: u64,
    /// Free check-in taps at the day's end (a card whose load was torn shows clearing its
    /// counter).
    pub check_in_taps: u64,
    /// Duplicates the gateways dropped.
    pub clearing_duplicates: u64,
    /// Taps the gateways quarantined.
    pub clearing_anomalies: u64,
    /// Loads completed by clearing from cleared taps.
    pub loads_completed_by_clearing: u64,
    /// Per validator, sorted: milliseconds until it held the lost card's block.
    pub block_propagation_ms: Vec<u64>,
    /// Whether a lost card was blocked during the day.
    pub lost_card_blocked: bool,
    /// Online payments and refunds, by merchant (its account name).
    pub payments_by_merchant: BTreeMap<String, MerchantTally>,
}

/// One merchant's online payments and refunds in the day, as the cardholders' clients saw them.
#[derive(Default, Debug, Clone)]
pub struct MerchantTally {
    /// The payments' currency (the card scheme's).
    pub currency: String,
    /// Its minor-unit exponent.
    pub exponent: u8,
    /// Payments the merchant made (one per order).
    pub payments_made: u64,
    /// Payments paid (torn ones settled as paid included).
    pub payments_completed: u64,
    /// What they paid, minor units.
    pub paid_minor: i64,
    /// Payments the rider paid after topping up online (the card held too little).
    pub payments_after_top_up: u64,
    /// Payments refused before any value moved, by reason (after the top-up, if any).
    pub payments_refused: BTreeMap<String, u64>,
    /// Payments whose client vanished mid-relay.
    pub payments_torn: u64,
    /// Of those, settled at the card's next contact as paid by the torn dialogue.
    pub payments_torn_paid_before: u64,
    /// Of those, settled as not paid by the card, then paid at that contact.
    pub payments_torn_paid_on_retry: u64,
    /// Of those, settled as not paid by the card, then refused at that contact (a card short
    /// of value tops up and pays it: [`MerchantTally::payments_after_top_up`]).
    pub payments_torn_refused_on_retry: u64,
    /// Refunds the merchant made.
    pub refunds: u64,
    /// Of those, of the whole payment.
    pub refunds_whole: u64,
    /// Of those, of part of it (a cancellation fee kept).
    pub refunds_partial: u64,
    /// What they refund, minor units.
    pub refunded_minor: i64,
    /// Refunds the cards that paid collected.
    pub refunds_collected: u64,
    /// What they collected, minor units.
    pub refunds_collected_minor: i64,
    /// Collections whose client vanished mid-relay.
    pub collections_torn: u64,
    /// Of those, settled at the card's next contact as credited by the torn dialogue.
    pub collections_torn_credited_before: u64,
    /// Of those, settled as not credited, then credited at that contact.
    pub collections_torn_credited_on_retry: u64,
}

impl Tally {
    /// Books a fare collected for `operator`.
    pub fn book(&mut self, operator: &'static str, amount_minor: i64) {
        *self.revenue_by_operator.entry(operator).or_default() += amount_minor;
    }

    /// Counts a refusal; whether the card was short of value (the rider then tops up).
    pub fn refused(&mut self, reason: RefusalReason) -> bool {
        *self.refusals.entry(reason.name()).or_default() += 1;
        match reason {
            RefusalReason::Blocklisted => {
                self.taps_refused_blocked += 1;
                false
            }
            RefusalReason::InsufficientValue => {
                self.taps_refused += 1;
                true
            }
            _ => {
                self.taps_refused += 1;
                false
            }
        }
    }

    /// Counts the transfer, cap and penalty flags of the trip record the gate just wrote.
    pub fn count_fare_flags(&mut self, card: &Card) {
        use fare_rules::record::{flags, TripRecord};
        if let Some(Ok(rec)) = card.state().records.last().map(TripRecord::decode) {
            self.taps_transfer += u64::from(rec.flags & flags::TRANSFER != 0);
            self.taps_capped += u64::from(rec.flags & flags::CAPPED != 0);
            self.taps_penalty += u64::from(rec.flags & flags::PENALTY != 0);
        }
    }
}

/// Another tenth of the day.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Percent of the day's taps done.
    pub percent: u32,
    /// Taps accepted so far.
    pub taps_accepted: u64,
    /// Taps refused so far (blocklisted included).
    pub taps_refused: u64,
    /// Dialogues torn so far.
    pub taps_torn: u64,
    /// Loads completed so far.
    pub loads_completed: u64,
    /// Loads torn so far.
    pub loads_torn: u64,
    /// Taps the metro's gateway forwarded to clearing so far.
    pub cleared: u64,
}

/// The day's report.
pub struct DayReport {
    /// The counters.
    pub tally: Tally,
    /// The metro's fare table.
    pub fare_table: fare_rules::table::Meta,
    /// Each operator's currency and its minor-unit exponent (from its fare table).
    pub currencies: BTreeMap<&'static str, (String, u8)>,
    /// How many times the metro's gateway was killed and restarted.
    pub gateway_restarts: u64,
    /// The ledger against the cards.
    pub conservation: Conservation,
    /// Whether each operator's booked revenue equals what its validators collected.
    pub revenue_agrees: bool,
    /// The ledger's side of the online payments and refunds.
    pub shop_books: ShopBooks,
    /// Whether each merchant's account holds what its customers paid less what it refunded,
    /// the refunds not yet collected are what `refunds:pending` holds, and no refund was
    /// credited twice.
    pub payments_agree: bool,
    /// Whether value was conserved (and clearing found no anomaly, and the payments agree).
    pub value_conserved: bool,
    /// Tap latency at the gate, µs, median.
    pub tap_latency_us_p50: f64,
    /// Tap latency at the gate, µs, 99th percentile.
    pub tap_latency_us_p99: f64,
}

impl DayReport {
    /// Revenue by currency (never summed across currencies): what the validators collected.
    pub fn revenue_by_currency(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for (op, minor) in &self.tally.revenue_by_operator {
            if let Some((cur, _)) = self.currencies.get(op) {
                *out.entry(cur.clone()).or_default() += *minor;
            }
        }
        out
    }

    /// The report of a day that counted `tally` and ended with `conservation`.
    pub fn new(
        tally: Tally,
        fare_table: fare_rules::table::Meta,
        currencies: BTreeMap<&'static str, (String, u8)>,
        gateway_restarts: u64,
        conservation: Conservation,
        shop_books: ShopBooks,
    ) -> DayReport {
        let revenue_agrees = conservation.revenue_agrees(&tally.revenue_by_operator);
        let payments_agree = payments_agree(&tally.payments_by_merchant, &shop_books);
        let value_conserved = conservation.holds(&tally.revenue_by_operator)
            && tally.clearing_anomalies == 0
            && payments_agree;
        let mut lat = tally.latencies_ns.clone();
        lat.sort_unstable();
        DayReport {
            tap_latency_us_p50: percentile_us(&lat, 0.5),
            tap_latency_us_p99: percentile_us(&lat, 0.99),
            tally,
            fare_table,
            currencies,
            gateway_restarts,
            conservation,
            revenue_agrees,
            shop_books,
            payments_agree,
            value_conserved,
        }
    }
}

/// Whether the ledger's `books` agree with what the merchants' customers paid and collected.
fn payments_agree(merchants: &BTreeMap<String, MerchantTally>, books: &ShopBooks) -> bool {
    let each = merchants.iter().all(|(m, t)| {
        books.merchant_minor.get(m).copied().unwrap_or(0) == t.paid_minor - t.refunded_minor
    });
    let waiting: i64 = merchants
        .values()
        .map(|t| t.refunded_minor - t.refunds_collected_minor)
        .sum();
    each && books.refunds_pending_minor == waiting && books.refunds_credited_twice == 0
}

fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    (sorted[i] as f64 / 100.0).round() / 10.0
}
