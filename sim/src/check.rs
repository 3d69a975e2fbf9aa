//! The day's end, as the ledger sees it: every card's balance equals the ledger's shadow purse,
//! reconciliation balances every card, every counter a card consumed is booked exactly once, no
//! load is paid twice, and each operator's revenue is what its validators collected.
//!
//! (The ledger-side check moves into the charging crate's reconciliation; this module then only
//! hands it the cards.)

use crate::SimError;
use charging::ledger::{IntentState, Ledger};
use purse::card::Card;
use std::collections::{BTreeMap, HashSet};

/// The operators whose revenue the day books.
pub const OPERATORS: [&str; 2] = ["metro", "hotel"];

/// What the ledger holds against the cards at the day's end.
pub struct Conservation {
    /// Cards whose balance differs from the ledger's shadow purse.
    pub cards_out_of_balance: u64,
    /// Counters the cards consumed that the ledger has not booked.
    pub taps_lost: u64,
    /// Tap postings booked more than once.
    pub taps_duplicated: u64,
    /// Load postings booked more than once.
    pub loads_paid_twice: u64,
    /// Load intents voided.
    pub loads_voided: u64,
    /// Each operator's revenue as the ledger booked it from cleared taps.
    pub revenue_by_operator: BTreeMap<&'static str, i64>,
    /// Reconciliation of every card.
    pub reconcile: charging::reconcile::Report,
}

impl Conservation {
    /// Whether each operator's booked revenue equals what its validators `collected`.
    pub fn revenue_agrees(&self, collected: &BTreeMap<&'static str, i64>) -> bool {
        OPERATORS.iter().all(|op| {
            self.revenue_by_operator.get(op).copied().unwrap_or(0)
                == collected.get(op).copied().unwrap_or(0)
        })
    }

    /// Whether value was conserved: revenue agrees, every card balances and reconciles, no
    /// counter is lost, nothing is booked twice.
    pub fn holds(&self, collected: &BTreeMap<&'static str, i64>) -> bool {
        self.revenue_agrees(collected)
            && self.cards_out_of_balance == 0
            && self.reconcile.differences.is_empty()
            && self.taps_lost == 0
            && self.loads_paid_twice == 0
            && self.taps_duplicated == 0
    }
}

/// Checks the ledger against `cards`.
pub fn conservation<'a>(
    ledger: &Ledger,
    cards: impl Iterator<Item = &'a Card>,
) -> Result<Conservation, SimError> {
    let mut out_of_balance = 0u64;
    let mut lost = 0u64;
    let r = ledger.read()?;
    for card in cards {
        let s = card.state();
        if r.balance(&charging::ledger::card_account(&s.uid))? != i64::from(s.balance_minor) {
            out_of_balance += 1;
        }
        let shadow = r.card(&s.uid)?;
        lost += u64::from(s.tmc.saturating_sub(shadow.booked_through_tmc));
    }
    let twice = |prefix: &str| -> Result<u64, SimError> {
        let mut seen = HashSet::new();
        let postings = r.postings_with_prefix(prefix)?;
        Ok(postings
            .iter()
            .filter(|p| !seen.insert(p.reference.clone()))
            .count() as u64)
    };
    let (taps_duplicated, loads_paid_twice) = (twice("tap:")?, twice("load:")?);
    let loads_voided = r
        .all_intents()?
        .iter()
        .filter(|i| i.state == IntentState::Voided)
        .count() as u64;
    let mut revenue_by_operator = BTreeMap::new();
    for op in OPERATORS {
        revenue_by_operator.insert(op, r.balance(&format!("operator:{op}"))?);
    }
    drop(r);
    Ok(Conservation {
        cards_out_of_balance: out_of_balance,
        taps_lost: lost,
        taps_duplicated,
        loads_paid_twice,
        loads_voided,
        revenue_by_operator,
        reconcile: charging::reconcile::reconcile(ledger)?,
    })
}
