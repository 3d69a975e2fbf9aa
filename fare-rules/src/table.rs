//! The compiled fare table: what validators hold and what every quote runs against.
//!
//! Both authoring paths end here: the TOML source ([`crate::source`]) and a GTFS-Fares v2 feed
//! ([`crate::gtfs`]) compile into one [`Table`]. Its model follows GTFS-Fares v2 (leg rules over
//! networks, areas and timeframes pricing fare products per rider category and medium; leg join
//! rules; transfer rules between leg groups) with tapgate's extensions: distance-priced legs,
//! distance-combined transfers, transfer rules limited to a time of day, tap-out penalties, caps,
//! passes and non-transit services.
//!
//! Everything is referenced by index ([`Idx`], [`NONE`] for an empty field); [`Table::validate`]
//! checks every index once at load, so the evaluator can index without bounds surprises.

use serde::{Deserialize, Serialize};

/// An index into one of the table's vectors.
pub type Idx = u16;
/// The empty field: "not set" / "any".
pub const NONE: Idx = u16::MAX;
/// Most legs in one journey the evaluator considers.
pub const MAX_LEGS: usize = 8;
/// Most candidate prices for one leg (matching rules × applicable product rows).
pub const MAX_CANDIDATES: usize = 8;

/// A compiled fare table.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Table {
    pub meta: Meta,
    pub categories: Vec<Category>,
    pub media: Vec<Named>,
    /// The medium assumed when a rider's is not given (`None`: any medium, the lowest price).
    pub default_medium: Option<Idx>,
    pub networks: Vec<Network>,
    pub areas: Vec<Named>,
    pub stops: Vec<Stop>,
    pub routes: Vec<Route>,
    pub services: Vec<Service>,
    pub timeframes: Vec<TimeframeGroup>,
    pub products: Vec<Product>,
    pub leg_groups: Vec<Named>,
    pub leg_rules: Vec<LegRule>,
    pub join_rules: Vec<JoinRule>,
    pub transfer_rules: Vec<TransferRule>,
    pub caps: Vec<Cap>,
    pub passes: Vec<Pass>,
    pub charges: Vec<Charge>,
    pub coupons: Vec<Coupon>,
    /// Stop codes sorted ascending with their stop index (lookup by code on devices).
    pub stop_codes: Vec<(u32, Idx)>,
    /// Route codes sorted ascending with their route index.
    pub route_codes: Vec<(u32, Idx)>,
}

/// Table identity and journey-wide settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub name: String,
    /// Version, increasing; validators refuse an older one.
    pub version: u32,
    /// ISO 4217 code.
    pub currency: String,
    /// Minor-unit exponent of the currency (2 for USD, 0 for KRW).
    pub currency_exponent: u8,
    /// First day the table applies (days since 1970-01-01, local).
    pub effective_from_day: i32,
    /// Day after the last day it applies (exclusive), if bounded.
    pub effective_until_day: Option<i32>,
    /// Seconds after midnight when the service day starts (caps and day passes roll over here).
    pub day_start_s: u32,
    /// Most transfers in one journey (legs − 1), whatever the transfer rules say.
    pub max_transfers: u8,
    /// GTFS `rule_priority` semantics: when true an empty leg-rule field is a wildcard and only
    /// the highest-priority matches count; when false an empty field matches only values that no
    /// rule names explicitly.
    pub priority_mode: bool,
}

/// A named entity (medium, area, leg group).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Named {
    pub id: String,
    /// Whether some rule names it explicitly in its "from" column (areas: `from_area_id`; leg
    /// groups: `from_leg_group_id`), for GTFS "empty matches the rest" semantics.
    pub explicit: bool,
    /// The same for the "to" column (`to_area_id`, `to_leg_group_id`).
    pub explicit_to: bool,
}

/// A rider category.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Category {
    pub id: String,
    /// The category assumed when none is given.
    pub default: bool,
    /// Percentage of distance surcharges this category pays (100 = full).
    pub surcharge_percent: u16,
}

/// A route network (metro, bus, …).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Network {
    pub id: String,
    /// Some leg rule names this network explicitly.
    pub explicit: bool,
    /// Riders must tap out; a missing tap-out is charged this penalty at the next tap.
    pub tap_out: Option<TapOut>,
}

/// Tap-in/tap-out settings of a network.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TapOut {
    /// Total fare charged for a trip with no tap-out (what was paid at tap-in counts towards it).
    pub penalty_minor: u32,
    /// Longest trip; an open tap-in older than this is a missing tap-out.
    pub max_trip_s: u32,
}

/// A stop and the areas it belongs to.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stop {
    pub id: String,
    /// 24-bit code written on cards (a hash of the id, unique within the table).
    pub code: u32,
    /// Areas the stop is in, sorted.
    pub areas: Vec<Idx>,
}

/// A route: its network and, for distance fares, the distance along it of each stop it serves.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Route {
    pub id: String,
    /// 24-bit code written on cards.
    pub code: u32,
    pub network: Idx,
    /// (stop, metres from the route's origin), sorted by stop.
    pub chainage: Vec<(Idx, u32)>,
}

/// A service calendar (GTFS calendar.txt + calendar_dates.txt, or a TOML calendar).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Service {
    pub id: String,
    /// Weekdays it runs: bit 0 Monday … bit 6 Sunday.
    pub weekdays: u8,
    /// First and last day (days since 1970-01-01), inclusive; `None` for no bound.
    pub start_day: Option<i32>,
    pub end_day: Option<i32>,
    /// Days added and removed (sorted).
    pub added: Vec<i32>,
    pub removed: Vec<i32>,
}

/// A named group of time spans.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TimeframeGroup {
    pub id: String,
    pub spans: Vec<Timeframe>,
}

/// Seconds after midnight `[start_s, end_s)` on the days of `service` (`NONE`: every day).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timeframe {
    pub start_s: u32,
    pub end_s: u32,
    pub service: Idx,
}

/// A fare product: its price per rider category and medium.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub prices: Vec<Price>,
}

/// One row of a product's price list.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Price {
    /// `NONE`: any category.
    pub category: Idx,
    /// `NONE`: any medium.
    pub medium: Idx,
    /// Negative only for a transfer discount (GTFS); leg fares are never negative.
    pub amount_minor: i32,
}

/// How a matched leg is priced.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Pricing {
    /// The product's price.
    Product,
    /// The product's price is the base fare for the first `base_m` metres; each further step of
    /// a band adds `add_minor` (a started step counts).
    Distance { base_m: u32, bands: Vec<Band> },
}

/// A distance band: up to `upto_m` metres of journey distance, every started `step_m` adds
/// `add_minor`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Band {
    pub upto_m: u32,
    pub step_m: u32,
    pub add_minor: u32,
}

/// A leg rule: which legs it matches and what they cost.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LegRule {
    /// Where it came from (`rules.toml:42`, `fare_leg_rules.txt:7`), for explain and errors.
    pub origin: String,
    pub leg_group: Idx,
    pub network: Idx,
    pub from_area: Idx,
    pub to_area: Idx,
    pub from_timeframe: Idx,
    pub to_timeframe: Idx,
    pub product: Idx,
    pub pricing: Pricing,
    pub priority: i32,
}

/// Consecutive legs on these networks (transferring at these stops) count as one leg.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JoinRule {
    pub from_network: Idx,
    pub to_network: Idx,
    /// Stop where the first leg ends (`NONE`: any).
    pub from_stop: Idx,
    /// Stop where the next leg starts (`NONE`: any).
    pub to_stop: Idx,
}

/// How a transfer is priced (GTFS `fare_transfer_type`, plus tapgate's distance combination).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum TransferKind {
    /// 0: from-leg fare plus transfer cost; the next leg is not charged.
    FromLegPlusTransfer,
    /// 1: from-leg fare plus transfer cost plus the next leg's fare.
    FromLegPlusTransferPlusToLeg,
    /// 2: the transfer cost is the fare of the whole sub-journey so far.
    TransferOnly,
    /// The sub-journey's total distance priced once, with the highest base fare of the legs.
    DistanceCombined,
}

/// From what to what a transfer's duration is measured (GTFS `duration_limit_type`); "current"
/// is the first leg of the transfer chain.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum DurationFrom {
    DepartureToArrival,
    DepartureToDeparture,
    ArrivalToDeparture,
    ArrivalToArrival,
    /// tapgate: from the previous leg's arrival (tap-out) to this leg's departure, whatever
    /// leg the chain began with (Seoul's "within 30 minutes of alighting").
    PreviousArrivalToDeparture,
}

/// A transfer rule between leg groups.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TransferRule {
    pub origin: String,
    /// `NONE`: GTFS empty (the leg groups no transfer rule names in this column).
    pub from_group: Idx,
    pub to_group: Idx,
    /// Most consecutive transfers this rule covers (`None`: unlimited / not set).
    pub transfer_count: Option<u16>,
    /// Transfer window in seconds (`None`: unlimited).
    pub duration_limit_s: Option<u32>,
    pub duration_from: DurationFrom,
    pub kind: TransferKind,
    /// The transfer's cost (`NONE`: free).
    pub product: Idx,
    /// Applies only when the transfer happens within this timeframe (a longer window at night).
    pub at_timeframe: Idx,
}

/// A cap period.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum CapPeriod {
    /// The service day.
    Day,
    /// Monday to Sunday (service days).
    Week,
    /// After this many paid trips in a service day, further trips are free.
    DayTrips(u8),
}

/// A fare cap on stored value.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Cap {
    pub id: String,
    pub period: CapPeriod,
    /// Most a rider pays in the period (unused for `DayTrips`).
    pub amount_minor: u32,
    /// `NONE`: every category.
    pub category: Idx,
}

/// A pass (ticket with validity): a rider holding one rides its networks free.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Pass {
    pub id: String,
    /// 16-bit code stored in the card's contract.
    pub code: u16,
    pub price_minor: u32,
    pub validity_s: u32,
    /// Networks it covers (empty: all).
    pub networks: Vec<Idx>,
    /// `NONE`: any category may hold it.
    pub category: Idx,
}

/// A non-transit charge (hotel pay-TV and the like).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Charge {
    pub id: String,
    pub code: u16,
    /// Price of one item (a film), if sold per item.
    pub per_item_minor: Option<u32>,
    /// Price of one started hour, if sold by time.
    pub per_hour_minor: Option<u32>,
    /// Most charged in one service day.
    pub day_cap_minor: Option<u32>,
}

/// A gift certificate or coupon.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Coupon {
    pub id: String,
    pub code: u16,
    /// Fixed value off, or
    pub value_minor: Option<u32>,
    /// a percentage off (1–100).
    pub percent: Option<u8>,
    /// Last day it may be used (days since 1970-01-01), if it expires.
    pub expires_day: Option<i32>,
    pub single_use: bool,
}

/// The 24-bit code of a stop or route id written on cards (FNV-1a folded to 24 bits); the
/// compiler refuses a table where two ids share a code.
pub fn code24(id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h >> 24) ^ (h & 0x00ff_ffff)
}

/// ISO 4217 minor-unit exponent of `currency` (2 when the code is not one we know otherwise).
pub fn currency_exponent(currency: &str) -> u8 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}
