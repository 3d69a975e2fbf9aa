//! The day's end, as the ledger sees it: every card's balance equals the ledger's shadow purse,
//! reconciliation balances every card, every counter a card consumed is booked exactly once, no
//! load is paid twice, and each operator's revenue is what its validators collected.
//!
//! The check itself is the charging crate's reconciliation
//! ([`charging::reconcile::conservation`]); this module hands it the cards.

use crate::SimError;
use charging::ledger::Ledger;
use charging::reconcile::CardTruth;
use purse::card::Card;

/// The operators whose revenue the day books.
pub const OPERATORS: [&str; 2] = ["metro", "hotel"];

pub use charging::reconcile::Conservation;

/// Checks the ledger against `cards`.
pub fn conservation<'a>(
    ledger: &Ledger,
    cards: impl Iterator<Item = &'a Card>,
) -> Result<Conservation, SimError> {
    let truths = cards.map(|c| {
        let s = c.state();
        CardTruth {
            uid: s.uid,
            balance_minor: s.balance_minor,
            tmc: s.tmc,
        }
    });
    Ok(charging::reconcile::conservation(
        ledger, truths, &OPERATORS,
    )?)
}
