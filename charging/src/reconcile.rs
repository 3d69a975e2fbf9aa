//! Reconciliation: for every card, the ledger's shadow purse (personalised value + loads −
//! debits) against the balance the card itself proved at its last booked counter.

use crate::ledger::{card_account, Ledger, LedgerError};
use serde::Serialize;

/// Why a card does not reconcile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Cause {
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

/// Reconciles every card in the ledger.
pub fn reconcile(ledger: &Ledger) -> Result<Report, LedgerError> {
    let r = ledger.read()?;
    let mut report = Report::default();
    for (uid, shadow) in r.all_cards()? {
        report.cards += 1;
        let ledger_balance = r.balance(&card_account(&uid))?;
        let diff = |cause| Difference {
            card_uid: hex::encode_upper(uid),
            ledger_balance_minor: ledger_balance,
            card_balance_minor: shadow.booked_balance_minor,
            booked_through_tmc: shadow.booked_through_tmc,
            cause,
        };
        let open = r.open_intents(&uid)?;
        if !open.is_empty() {
            report.differences.push(diff(Cause::PendingLoad {
                at_tmc: open.iter().map(|i| i.tmc_before).collect(),
            }));
            continue;
        }
        if let Some(&(first_above, _, _)) = shadow.booked_above.first() {
            report.differences.push(diff(Cause::CounterGap {
                from_tmc: shadow.booked_through_tmc.saturating_add(1),
                to_tmc: first_above - 1,
            }));
            continue;
        }
        if shadow.last_tmc > shadow.booked_through_tmc {
            report.differences.push(diff(Cause::Uncleared {
                from_tmc: shadow.booked_through_tmc.saturating_add(1),
                to_tmc: shadow.last_tmc,
            }));
            continue;
        }
        match shadow.booked_balance_minor {
            Some(b) if i64::from(b) == ledger_balance => report.balanced += 1,
            None if ledger_balance == 0 => report.balanced += 1,
            _ => report.differences.push(diff(Cause::Mismatch)),
        }
    }
    Ok(report)
}
