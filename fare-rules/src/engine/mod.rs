//! The evaluator: prices journeys and taps against a compiled [`Table`].
//!
//! [`Engine::price_journey`] prices a whole journey (what `tapgate fare quote` and GTFS feeds
//! use): legs are joined by the join rules, each effective leg gets its candidate prices from the
//! leg rules that match it, and a small dynamic programme over (candidate, start of the transfer
//! chain) finds the lowest total the transfer rules allow. [`Engine::quote_tap`] is what a
//! validator runs at a tap: it rebuilds the current journey from the card's trip records,
//! charges the difference the new leg makes to the journey's price, then applies penalties,
//! passes and caps from the accumulators in the newest record.
//!
//! Nothing here allocates: journeys, candidates and DP states live in fixed arrays bounded by
//! [`MAX_LEGS`] and [`MAX_CANDIDATES`].

use crate::record::{TapKind, TripRecord};
use crate::table::*;

mod charge;
mod index;
mod journey;
mod tap;

pub(crate) use journey::{Cand, EffLeg, State};

/// A leg whose stops the network does not connect (no distance can be measured).
const NO_DISTANCE: u32 = u32::MAX;

/// Most legs a journey quote accepts (joined legs count once towards [`MAX_LEGS`]).
pub const MAX_LEGS_IN: usize = MAX_LEGS;

/// Why a table cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("fare table: {what} index {index} out of range in {place}")]
    BadIndex {
        what: &'static str,
        index: Idx,
        place: String,
    },
    #[error("fare table: {0}")]
    Invalid(String),
}

/// Why a quote failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum QuoteError {
    #[error("journey has no legs")]
    NoLegs,
    #[error("journey has more than {MAX_LEGS} legs")]
    TooManyLegs,
    #[error("leg {leg}: unknown route")]
    UnknownRoute { leg: usize },
    #[error("leg {leg}: unknown stop")]
    UnknownStop { leg: usize },
    #[error("leg {leg}: no fare rule matches it")]
    NoRule { leg: usize },
    #[error("leg {leg}: priced by distance, but no route of its network connects its stops")]
    NoDistance { leg: usize },
    #[error(
        "leg {leg}: the matching rules' products have no price for this rider category and medium"
    )]
    NoPrice { leg: usize },
    #[error("the fare table is not in effect at this time")]
    NotEffective,
    #[error("a tap-out on a network that has no tap-out")]
    TapOutNotUsed,
    #[error("unknown charge, pass or coupon code {0}")]
    UnknownCode(u16),
    #[error("coupon expired")]
    CouponExpired,
    #[error("coupon already used")]
    CouponUsed,
}

/// Who is riding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rider {
    /// Rider category (`NONE`: the table's default).
    pub category: Idx,
    /// Fare medium (`NONE`: any).
    pub medium: Idx,
}

/// One leg of a journey.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leg {
    pub route: Idx,
    pub from_stop: Idx,
    pub to_stop: Idx,
    /// Local seconds since 1970-01-01.
    pub departure_s: i64,
    pub arrival_s: i64,
}

/// How one effective leg was priced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PricedLeg {
    /// First and last input legs this effective leg covers (join rules).
    pub first_leg: u8,
    pub last_leg: u8,
    pub rule: Idx,
    pub product: Idx,
    /// The leg's own fare (product price plus distance surcharge).
    pub fare_minor: u32,
    /// The transfer rule applied from the previous leg (`NONE`: paid as a new fare).
    pub transfer: Idx,
    /// What this leg added to the journey's total (may be negative for a type-2 transfer).
    pub charged_minor: i64,
    pub distance_m: u32,
}

/// A priced journey.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priced {
    pub total_minor: u64,
    pub legs: [PricedLeg; MAX_LEGS],
    pub n: u8,
    /// A transfer rule lets the last effective leg continue a chain begun at an earlier leg
    /// (whether or not the lowest total uses it): a later leg may still make a chain across
    /// it cheaper, so a validator keeps the journey on the card.
    pub last_may_transfer: bool,
}

impl Priced {
    /// The effective legs.
    pub fn legs(&self) -> &[PricedLeg] {
        &self.legs[..self.n as usize]
    }
}

/// A tap at a validator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tap {
    pub kind: TapKind,
    /// Local seconds since 1970-01-01.
    pub time_s: u32,
    pub route: Idx,
    pub stop: Idx,
}

/// A pass the card holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldPass {
    pub code: u16,
    pub valid_from_s: u32,
    pub valid_until_s: u32,
}

/// What the validator knows about the card.
#[derive(Clone, Copy, Debug)]
pub struct CardView<'a> {
    pub rider: Rider,
    /// Trip records, newest first.
    pub history: &'a [TripRecord],
    pub passes: &'a [HeldPass],
}

/// The answer at a tap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TapQuote {
    /// What to debit.
    pub fare_minor: u32,
    /// The record to write.
    pub record: TripRecord,
    /// The fare the journey change would cost before caps (penalty excluded).
    pub before_caps_minor: u32,
    /// The missing-tap-out penalty included in `fare_minor`.
    pub penalty_minor: u32,
    /// The cap that limited the fare (`NONE`: none).
    pub cap: Idx,
    /// The pass that covered the tap (`NONE`: none).
    pub pass: Idx,
    /// The journey as priced with this tap (legs and transfers), when a journey was priced.
    pub journey: Option<Priced>,
    /// The same tap again within [`REPEAT_WINDOW_S`] (a passenger tapping twice): nothing is
    /// charged and nothing should be written; `record` is the card's newest record.
    pub repeat: bool,
}

/// A second identical tap within this many seconds is a repeat, not a new tap.
pub const REPEAT_WINDOW_S: u32 = 20;

/// A compiled table ready for quoting: validated and indexed.
#[derive(Clone, Debug)]
pub struct Engine {
    table: Table,
    /// Leg rules by network (index = network; last entry: rules with no network).
    rules_by_network: Vec<NetRules>,
    /// Routes by network (for distances across routes).
    routes_by_network: Vec<Vec<Idx>>,
    default_category: Idx,
}

/// One network's leg rules: those with no origin area, and the rest by origin area (sorted),
/// so an origin–destination table of hundreds of rules costs a binary search per leg.
#[derive(Clone, Debug, Default)]
struct NetRules {
    any_from: Vec<Idx>,
    /// ((from area, to area or `NONE`), rule), sorted.
    by_from: Vec<((Idx, Idx), Idx)>,
}

fn day_of(t: i64) -> i32 {
    t.div_euclid(86_400) as i32
}

fn sec_of(t: i64) -> u32 {
    t.rem_euclid(86_400) as u32
}

/// Monday = 0 (1970-01-01 was a Thursday).
fn weekday(day: i32) -> u32 {
    (day + 3).rem_euclid(7) as u32
}
