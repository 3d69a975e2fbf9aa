//! Reconciliation: for every card, the ledger's shadow purse (personalised value + loads −
//! debits) against the balance the card itself proved at its last booked counter
//! ([`reconcile`]); and the conservation check against the cards' true states
//! ([`conservation`]): every card's shadow purse equals the card, every counter a card consumed
//! is booked exactly once, no load is paid twice, and each operator's revenue is what its
//! validators collected. The demo, the system bench and the end-to-end tests all use it.

use crate::ledger::{card_account, CardShadow, IntentState, Ledger, LedgerError, LedgerRead};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// Why a card does not reconcile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Cause {
    /// Clearing saw one of the card's counters twice with different contents and blocked the
    /// card: the ledger may agree with one copy, but the card is not to be trusted (reported
    /// while the block stands).
    Clone {
        /// the first counter seen twice (`None`: its anomaly is no longer at hand)
        tmc: Option<u32>,
    },
    /// A load is authorised but not yet proved or voided (settles at the card's next contact).
    PendingLoad {
        /// counters the pending loads were recorded at
        at_tmc: Vec<u32>,
    },
    /// Counters between the booked ones are missing (taps not cleared yet, or lost).
    CounterGap {
        /// first missing counter
        from_tmc: u32,
        /// last missing counter
        to_tmc: u32,
    },
    /// The card reported counters the ledger has not booked yet.
    Uncleared {
        /// first unbooked counter
        from_tmc: u32,
        /// the card's last reported counter
        to_tmc: u32,
    },
    /// Everything is booked and the balances still differ.
    Mismatch,
}

/// One card that does not reconcile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// Card UID (hex).
    pub card_uid: String,
    /// The ledger's shadow balance.
    pub ledger_balance_minor: i64,
    /// The balance the card proved at its last booked counter.
    pub card_balance_minor: Option<i32>,
    /// The last booked counter.
    pub booked_through_tmc: u32,
    /// The cause.
    #[serde(flatten)]
    pub cause: Cause,
}

/// The whole report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Cards examined.
    pub cards: u64,
    /// Cards whose ledger and card agree.
    pub balanced: u64,
    /// Every difference, with its cause.
    pub differences: Vec<Difference>,
}

/// How many cards [`reconcile`] reads at a time.
pub const RECONCILE_PAGE: usize = 10_000;

/// Reconciles every card in the ledger: the cards in UID order, [`RECONCILE_PAGE`] at a time,
/// all in one snapshot (memory: a page of shadows, the clone anomalies' counters and the
/// report's differences, not every card at once).
pub fn reconcile(ledger: &Ledger) -> Result<Report, LedgerError> {
    reconcile_in_pages(ledger, RECONCILE_PAGE)
}

/// [`reconcile`] reading `page` cards at a time (at least one): the same report whatever the
/// page (tests use small pages to cross page boundaries).
pub fn reconcile_in_pages(ledger: &Ledger, page: usize) -> Result<Report, LedgerError> {
    let r = ledger.read()?;
    let clones = clone_counters(&*r)?;
    let mut report = Report::default();
    crate::ledger::walk_card_pages(
        &mut report,
        page,
        |_, after, n| r.cards_after(after, n),
        |report, cards| {
            for (uid, shadow) in cards {
                reconcile_card(&*r, &clones, uid, shadow, report)?;
            }
            Ok(())
        },
    )?;
    Ok(report)
}

/// One card against its account, counted into `report`.
fn reconcile_card(
    r: &dyn LedgerRead,
    clones: &BTreeMap<String, u32>,
    uid: &[u8; 7],
    shadow: &CardShadow,
    report: &mut Report,
) -> Result<(), LedgerError> {
    report.cards += 1;
    let ledger_balance = r.balance(&card_account(uid))?;
    let diff = |cause| Difference {
        card_uid: hex::encode_upper(uid),
        ledger_balance_minor: ledger_balance,
        card_balance_minor: shadow.booked_balance_minor,
        booked_through_tmc: shadow.booked_through_tmc,
        cause,
    };
    let clone = clones.get(&hex::encode_upper(uid)).copied();
    let blocked_as_clone = shadow
        .block_reason
        .as_deref()
        .is_some_and(|why| why == crate::ledger::CLONE_BLOCK_REASON);
    if shadow.blocked && (clone.is_some() || blocked_as_clone) {
        report.differences.push(diff(Cause::Clone { tmc: clone }));
        return Ok(());
    }
    let open = r.open_intents(uid)?;
    if !open.is_empty() {
        report.differences.push(diff(Cause::PendingLoad {
            at_tmc: open.iter().map(|i| i.tmc_before).collect(),
        }));
        return Ok(());
    }
    if let Some(&(first_above, _, _)) = shadow.booked_above.first() {
        report.differences.push(diff(Cause::CounterGap {
            from_tmc: shadow.booked_through_tmc.saturating_add(1),
            to_tmc: first_above - 1,
        }));
        return Ok(());
    }
    if shadow.last_tmc > shadow.booked_through_tmc {
        report.differences.push(diff(Cause::Uncleared {
            from_tmc: shadow.booked_through_tmc.saturating_add(1),
            to_tmc: shadow.last_tmc,
        }));
        return Ok(());
    }
    match shadow.booked_balance_minor {
        Some(b) if i64::from(b) == ledger_balance => report.balanced += 1,
        None if ledger_balance == 0 => report.balanced += 1,
        _ => report.differences.push(diff(Cause::Mismatch)),
    }
    Ok(())
}

/// The first counter of each card that clearing saw twice with different contents (the
/// `clone` anomalies), by card UID (hex).
fn clone_counters(r: &dyn LedgerRead) -> Result<BTreeMap<String, u32>, LedgerError> {
    let mut out = BTreeMap::new();
    let mut after = 0;
    loop {
        let (page, _) = r.anomalies(after, 10_000)?;
        let Some(&(last, _)) = page.last() else {
            return Ok(out);
        };
        for (_, a) in page {
            if a.kind == "clone" {
                let tmc = out.entry(a.card_uid).or_insert(a.tmc);
                *tmc = (*tmc).min(a.tmc);
            }
        }
        after = last;
    }
}

/// A card's true state, read from the card itself (not from the ledger).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardTruth {
    /// Card UID.
    pub uid: [u8; 7],
    /// The balance on the card, minor units.
    pub balance_minor: i32,
    /// The card's transaction counter: every counter up to it was consumed.
    pub tmc: u32,
}

/// What the ledger holds for one card, as far as conservation is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowView {
    /// The card's shadow purse (its account's balance), minor units.
    pub balance_minor: i64,
    /// The counter the ledger has booked through.
    pub booked_through_tmc: u32,
}

/// One card against the ledger: whether its shadow purse equals the card, and how many of the
/// counters it consumed are not booked. For a caller that sees the ledger over the API (the
/// system tests and bench read `GET /v1/cards/{uid}`); [`conservation`] applies it to every card.
pub fn card_conserved(card: &CardTruth, shadow: &ShadowView) -> (bool, u64) {
    (
        shadow.balance_minor == i64::from(card.balance_minor),
        u64::from(card.tmc.saturating_sub(shadow.booked_through_tmc)),
    )
}

/// What the ledger holds against the cards at the end of a day.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Conservation {
    /// Cards whose balance differs from the ledger's shadow purse.
    pub cards_out_of_balance: u64,
    /// Counters the cards consumed that the ledger has not booked.
    pub taps_lost: u64,
    /// Tap postings booked more than once.
    pub taps_duplicated: u64,
    /// Load postings booked more than once.
    pub loads_paid_twice: u64,
    /// Online payments (`payment:<id>` postings) booked more than once.
    pub payments_paid_twice: u64,
    /// Load intents voided.
    pub loads_voided: u64,
    /// Each operator's revenue as the ledger booked it from cleared taps.
    pub revenue_by_operator: BTreeMap<String, i64>,
    /// Reconciliation of every card.
    pub reconcile: Report,
}

impl Conservation {
    /// Whether each operator's booked revenue equals what its validators `collected` (an
    /// operator missing from `collected` collected nothing).
    pub fn revenue_agrees(&self, collected: &BTreeMap<&str, i64>) -> bool {
        self.revenue_by_operator
            .iter()
            .all(|(op, booked)| *booked == collected.get(op.as_str()).copied().unwrap_or(0))
            && collected
                .iter()
                .all(|(op, c)| *c == 0 || self.revenue_by_operator.contains_key(*op))
    }

    /// Whether value was conserved: revenue agrees, every card balances and reconciles, no
    /// counter is lost, nothing is booked twice.
    pub fn holds(&self, collected: &BTreeMap<&str, i64>) -> bool {
        self.revenue_agrees(collected)
            && self.cards_out_of_balance == 0
            && self.reconcile.differences.is_empty()
            && self.taps_lost == 0
            && self.loads_paid_twice == 0
            && self.payments_paid_twice == 0
            && self.taps_duplicated == 0
    }
}

/// Checks the ledger against the cards' true states `cards`, with the revenue of `operators`.
pub fn conservation(
    ledger: &Ledger,
    cards: impl IntoIterator<Item = CardTruth>,
    operators: &[&str],
) -> Result<Conservation, LedgerError> {
    let mut out = Conservation::default();
    {
        let r = ledger.read()?;
        for card in cards {
            let shadow = ShadowView {
                balance_minor: r.balance(&card_account(&card.uid))?,
                booked_through_tmc: r.card(&card.uid)?.booked_through_tmc,
            };
            let (balanced, lost) = card_conserved(&card, &shadow);
            out.cards_out_of_balance += u64::from(!balanced);
            out.taps_lost += lost;
        }
        out.taps_duplicated = booked_twice(&*r, "tap:")?;
        out.loads_paid_twice = booked_twice(&*r, "load:")?;
        out.payments_paid_twice = booked_twice(&*r, "payment:")?;
        out.loads_voided = r
            .all_intents()?
            .iter()
            .filter(|i| i.state == IntentState::Voided)
            .count() as u64;
        for op in operators {
            let revenue = r.balance(&format!("operator:{op}"))?;
            out.revenue_by_operator.insert(op.to_string(), revenue);
        }
    }
    out.reconcile = reconcile(ledger)?;
    Ok(out)
}

/// Postings whose reference (starting with `prefix`) was booked more than once.
fn booked_twice(r: &dyn LedgerRead, prefix: &str) -> Result<u64, LedgerError> {
    let mut seen = HashSet::new();
    Ok(r.postings_with_prefix(prefix)?
        .iter()
        .filter(|p| !seen.insert(p.reference.clone()))
        .count() as u64)
}
