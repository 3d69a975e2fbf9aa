//! The day's end, as the ledger sees it: every card's balance equals the ledger's shadow purse,
//! reconciliation balances every card, every counter a card consumed is booked exactly once, no
//! load is paid twice, and each operator's revenue is what its validators collected; each
//! merchant's account holds what its customers paid less what it refunded, and no refund was
//! credited twice.
//!
//! The check itself is the charging crate's reconciliation
//! ([`charging::reconcile::conservation`]); this module hands it the cards.

use crate::SimError;
use charging::ledger::{IntentKind, IntentState, Ledger};
use charging::reconcile::CardTruth;
use purse::card::Card;
use std::collections::{BTreeMap, HashSet};

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

/// The ledger's side of the day's online payments.
#[derive(Clone, Debug, Default)]
pub struct ShopBooks {
    /// Each merchant's account (`merchant:<name>`): what it was paid less what it refunded.
    pub merchant_minor: BTreeMap<String, i64>,
    /// Refunds made and not yet collected by the card that paid (`refunds:pending`).
    pub refunds_pending_minor: i64,
    /// Refund credits (`refund:<id>` postings) booked more than once.
    pub refunds_credited_twice: u64,
    /// Payment intents voided (a torn payment the card never made), which
    /// [`Conservation::loads_voided`] counts with the loads'.
    pub payment_intents_voided: u64,
    /// Refund collections' intents voided, likewise.
    pub refund_intents_voided: u64,
}

/// Reads the books of `merchants` and of the refunds from the ledger.
pub fn shop_books(ledger: &Ledger, merchants: &[&str]) -> Result<ShopBooks, SimError> {
    let r = ledger.read()?;
    let mut books = ShopBooks {
        refunds_pending_minor: r.balance("refunds:pending")?,
        ..ShopBooks::default()
    };
    for m in merchants {
        books
            .merchant_minor
            .insert(m.to_string(), r.balance(&format!("merchant:{m}"))?);
    }
    let mut seen = HashSet::new();
    books.refunds_credited_twice = r
        .postings_with_prefix("refund:")?
        .iter()
        .filter(|p| !seen.insert(p.reference.clone()))
        .count() as u64;
    for i in r.all_intents()? {
        if i.state == IntentState::Voided {
            books.payment_intents_voided += u64::from(i.kind == IntentKind::Payment);
            books.refund_intents_voided += u64::from(i.kind == IntentKind::Refund);
        }
    }
    Ok(books)
}
