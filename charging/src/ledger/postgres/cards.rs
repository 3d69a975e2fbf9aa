//! A card shadow in its row of `cards` (`0003_card_counters.sql`): the counters clearing changes
//! at every tap — the last counter and balance the card reported, the counter and balance booked
//! through — in their own columns, the rest of the shadow (block state, owner, day totals,
//! counters booked above a gap, PIN) as a jsonb record. A batch whose taps change only the
//! counters updates them in place, one multi-row `UPDATE`, without rewriting a JSON document per
//! card; a card whose rest changed is written whole.
//!
//! [`split`] and [`from_row`] name every field of [`CardShadow`] (no `..`): a field added to
//! the shadow does not compile here until it is given a place (in [`Rest`] it needs no
//! migration).

use super::read::unbig;
use super::LedgerError;
use crate::ledger::records::{CardShadow, PaymentPin};
use serde::{Deserialize, Serialize};

/// The columns of a card's row, in the order every query selects them (a literal, for
/// `concat!`): the record, then the counters.
macro_rules! columns {
    () => {
        "c.record::text, c.last_tmc, c.last_reported_balance_minor, c.booked_through_tmc, \
         c.booked_balance_minor"
    };
}
pub(super) use columns;

/// The shadow less its counters, as the `record` column holds it (the same names and defaults
/// as [`CardShadow`]'s own serde form, so a whole record of schema 2 reads as one).
#[derive(Serialize, PartialEq)]
pub(super) struct Rest<'a> {
    blocked: &'a bool,
    block_reason: &'a Option<String>,
    load_day: &'a u64,
    load_day_minor: &'a i64,
    owner: &'a Option<String>,
    booked_above: &'a Vec<(u32, i32, i64)>,
    #[serde(skip_serializing_if = "no_pin")]
    payment_pin: &'a Option<PaymentPin>,
}

fn no_pin(p: &&Option<PaymentPin>) -> bool {
    p.is_none()
}

/// [`Rest`] read back.
#[derive(Deserialize)]
struct RestOwned {
    blocked: bool,
    block_reason: Option<String>,
    #[serde(default)]
    load_day: u64,
    #[serde(default)]
    load_day_minor: i64,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    booked_above: Vec<(u32, i32, i64)>,
    #[serde(default)]
    payment_pin: Option<PaymentPin>,
}

/// The counters' columns: `last_tmc`, `last_reported_balance_minor`, `booked_through_tmc`,
/// `booked_balance_minor`.
pub(super) type Counters = (i64, Option<i32>, i64, Option<i32>);

/// The shadow as its row holds it: the record's part and the counters.
pub(super) fn split(c: &CardShadow) -> (Rest<'_>, Counters) {
    let CardShadow {
        last_tmc,
        last_reported_balance_minor,
        blocked,
        block_reason,
        load_day,
        load_day_minor,
        owner,
        booked_through_tmc,
        booked_balance_minor,
        booked_above,
        payment_pin,
    } = c;
    (
        Rest {
            blocked,
            block_reason,
            load_day,
            load_day_minor,
            owner,
            booked_above,
            payment_pin,
        },
        (
            i64::from(*last_tmc),
            *last_reported_balance_minor,
            i64::from(*booked_through_tmc),
            *booked_balance_minor,
        ),
    )
}

/// Whether two shadows differ in their counters only (the record's part is the same).
pub(super) fn same_rest(a: &CardShadow, b: &CardShadow) -> bool {
    split(a).0 == split(b).0
}

/// The record's part as the text the statement sends (parsed once, by the database).
pub(super) fn rest_text(c: &CardShadow) -> Result<String, LedgerError> {
    serde_json::to_string(&split(c).0)
        .map_err(|e| LedgerError::Database(format!("a card record: {e}")))
}

fn tmc(v: i64) -> u32 {
    u32::try_from(unbig(v)).unwrap_or(u32::MAX)
}

/// The shadow from its row's [`columns!`], from column `at`.
pub(super) fn from_row(r: &postgres::Row, at: usize) -> Result<CardShadow, LedgerError> {
    let rest: RestOwned = serde_json::from_str(r.get::<_, &str>(at))
        .map_err(|e| LedgerError::Database(format!("a stored card record: {e}")))?;
    Ok(CardShadow {
        last_tmc: tmc(r.get(at + 1)),
        last_reported_balance_minor: r.get(at + 2),
        blocked: rest.blocked,
        block_reason: rest.block_reason,
        load_day: rest.load_day,
        load_day_minor: rest.load_day_minor,
        owner: rest.owner,
        booked_through_tmc: tmc(r.get(at + 3)),
        booked_balance_minor: r.get(at + 4),
        booked_above: rest.booked_above,
        payment_pin: rest.payment_pin,
    })
}

/// The counters of `cards` as the arrays of one multi-row statement.
#[derive(Default)]
pub(super) struct CounterArrays {
    pub last_tmc: Vec<i64>,
    pub last_reported: Vec<Option<i32>>,
    pub booked_through: Vec<i64>,
    pub booked_balance: Vec<Option<i32>>,
}

impl CounterArrays {
    pub fn push(&mut self, (lt, lr, bt, bb): Counters) {
        self.last_tmc.push(lt);
        self.last_reported.push(lr);
        self.booked_through.push(bt);
        self.booked_balance.push(bb);
    }
}
