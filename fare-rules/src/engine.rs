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

use crate::record::{flags, TapKind, TripRecord, U24_MAX};
use crate::table::*;

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

/// An effective leg: input legs joined by the join rules.
#[derive(Clone, Copy, Default)]
pub(crate) struct EffLeg {
    pub(crate) first: u8,
    last: u8,
    network: Idx,
    from_stop: Idx,
    to_stop: Idx,
    departure_s: i64,
    arrival_s: i64,
    distance_m: u32,
}

/// A way to price one effective leg: a matching leg rule and its fare for the rider.
#[derive(Clone, Copy, Default)]
pub(crate) struct Cand {
    rule: Idx,
    group: Idx,
    product: Idx,
    base_minor: u32,
    fare_minor: u32,
}

/// Where the pricing stands after a leg.
#[derive(Clone, Copy)]
pub(crate) struct State {
    pub(crate) total: i64,
    before_chain: i64,
    chain_max_base: u32,
    chain_dist_m: u32,
    prev_cand: u8,
    prev_start: u8,
    transfer: Idx,
}

impl State {
    /// The first leg, a new fare.
    pub(crate) fn first(c: &Cand, e: &EffLeg) -> State {
        let f = i64::from(c.fare_minor);
        State {
            total: f,
            before_chain: 0,
            chain_max_base: c.base_minor,
            chain_dist_m: e.distance_m,
            prev_cand: u8::MAX,
            prev_start: u8::MAX,
            transfer: NONE,
        }
    }

    /// A later leg paid as a new fare after state `st` (candidate `c` of the leg before, in
    /// the chain begun at `s`).
    pub(crate) fn new_fare(st: &State, to: &Cand, e: &EffLeg, c: usize, s: usize) -> State {
        State {
            total: st.total + i64::from(to.fare_minor),
            before_chain: st.total,
            chain_max_base: to.base_minor,
            chain_dist_m: e.distance_m,
            prev_cand: c as u8,
            prev_start: s as u8,
            transfer: NONE,
        }
    }
}

type Dp = [[[State; MAX_LEGS]; MAX_CANDIDATES]; MAX_LEGS];

/// The cheapest final state of the programme, walked back into priced legs.
fn walk_back(
    dp: &Dp,
    cands: &[[Cand; MAX_CANDIDATES]; MAX_LEGS],
    ncand: &[usize; MAX_LEGS],
    eff: &[EffLeg],
) -> Priced {
    let ne = eff.len();
    let last = ne - 1;
    let mut best = (i64::MAX, 0usize, 0usize);
    for (c, row) in dp[last].iter().enumerate().take(ncand[last]) {
        for (s, st) in row.iter().enumerate().take(last + 1) {
            if st.total < best.0 {
                best = (st.total, c, s);
            }
        }
    }
    let mut out = Priced {
        total_minor: best.0.max(0) as u64,
        legs: [PricedLeg::default(); MAX_LEGS],
        n: ne as u8,
        last_may_transfer: false,
    };
    let (mut c, mut s) = (best.1, best.2);
    for j in (0..ne).rev() {
        let st = dp[j][c][s];
        let cand = cands[j][c];
        let prev_total = if j == 0 {
            0
        } else {
            dp[j - 1][st.prev_cand as usize][st.prev_start as usize].total
        };
        out.legs[j] = PricedLeg {
            first_leg: eff[j].first,
            last_leg: eff[j].last,
            rule: cand.rule,
            product: cand.product,
            fare_minor: cand.fare_minor,
            transfer: st.transfer,
            charged_minor: st.total - prev_total,
            distance_m: eff[j].distance_m,
        };
        if j > 0 {
            c = st.prev_cand as usize;
            s = st.prev_start as usize;
        }
    }
    out
}

const NO_STATE: State = State {
    total: i64::MAX,
    before_chain: 0,
    chain_max_base: 0,
    chain_dist_m: 0,
    prev_cand: u8::MAX,
    prev_start: u8::MAX,
    transfer: NONE,
};

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

impl Engine {
    /// Validates every index in `table` and builds the lookup indexes.
    pub fn new(table: Table) -> Result<Self, TableError> {
        validate(&table)?;
        let nn = table.networks.len();
        let mut rules_by_network = vec![NetRules::default(); nn + 1];
        for (i, r) in table.leg_rules.iter().enumerate() {
            let slot = if r.network == NONE {
                nn
            } else {
                r.network as usize
            };
            let nr = &mut rules_by_network[slot];
            if r.from_area == NONE {
                nr.any_from.push(i as Idx);
            } else {
                nr.by_from.push(((r.from_area, r.to_area), i as Idx));
            }
        }
        for nr in &mut rules_by_network {
            nr.by_from.sort_unstable();
        }
        let mut routes_by_network = vec![Vec::new(); nn];
        for (i, r) in table.routes.iter().enumerate() {
            if r.network != NONE {
                routes_by_network[r.network as usize].push(i as Idx);
            }
        }
        let default_category = table
            .categories
            .iter()
            .position(|c| c.default)
            .map_or(NONE, |i| i as Idx);
        Ok(Self {
            table,
            rules_by_network,
            routes_by_network,
            default_category,
        })
    }

    /// The table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Stop index by id.
    pub fn stop(&self, id: &str) -> Option<Idx> {
        self.stop_by_code(code24(id))
            .filter(|&i| self.table.stops[i as usize].id == id)
    }

    /// Route index by id.
    pub fn route(&self, id: &str) -> Option<Idx> {
        self.route_by_code(code24(id))
            .filter(|&i| self.table.routes[i as usize].id == id)
    }

    /// Stop index by card code.
    pub fn stop_by_code(&self, code: u32) -> Option<Idx> {
        lookup(&self.table.stop_codes, code)
    }

    /// Route index by card code.
    pub fn route_by_code(&self, code: u32) -> Option<Idx> {
        lookup(&self.table.route_codes, code)
    }

    /// Rider category index by id.
    pub fn category(&self, id: &str) -> Option<Idx> {
        self.table
            .categories
            .iter()
            .position(|c| c.id == id)
            .map(|i| i as Idx)
    }

    /// Medium index by id.
    pub fn medium(&self, id: &str) -> Option<Idx> {
        self.table
            .media
            .iter()
            .position(|c| c.id == id)
            .map(|i| i as Idx)
    }

    /// The default rider category (`NONE` if the table has none).
    pub fn default_category(&self) -> Idx {
        self.default_category
    }

    /// Whether the table is in effect at local time `t`.
    pub fn in_effect(&self, t: i64) -> bool {
        let d = day_of(t);
        d >= self.table.meta.effective_from_day
            && self.table.meta.effective_until_day.is_none_or(|u| d < u)
    }

    fn service_runs(&self, service: Idx, day: i32) -> bool {
        if service == NONE {
            return true;
        }
        let s = &self.table.services[service as usize];
        if s.removed.binary_search(&day).is_ok() {
            return false;
        }
        if s.added.binary_search(&day).is_ok() {
            return true;
        }
        s.start_day.is_none_or(|a| day >= a)
            && s.end_day.is_none_or(|b| day <= b)
            && s.weekdays & (1 << weekday(day)) != 0
    }

    /// Whether local time `t` falls in timeframe group `g`.
    pub fn in_timeframe(&self, g: Idx, t: i64) -> bool {
        let (day, sec) = (day_of(t), sec_of(t));
        self.table.timeframes[g as usize]
            .spans
            .iter()
            .any(|s| sec >= s.start_s && sec < s.end_s && self.service_runs(s.service, day))
    }

    /// The lowest price of `product` for `rider`.
    /// The rider's price of `product`: the rows for the rider's own category and medium are
    /// preferred over rows for any category or medium; among equally specific rows (and for an
    /// unknown medium: among all media) the lowest.
    fn price_of(&self, product: Idx, rider: Rider) -> Option<i32> {
        let mut best: Option<((u8, u8), i32)> = None;
        for p in &self.table.products[product as usize].prices {
            let cat = if p.category == rider.category && p.category != NONE {
                2
            } else if p.category == NONE {
                1
            } else {
                continue;
            };
            let med = if rider.medium == NONE || p.medium == NONE {
                1
            } else if p.medium == rider.medium {
                2
            } else {
                continue;
            };
            let key = (cat, med);
            best = match best {
                Some((k, a)) if k > key || (k == key && a <= p.amount_minor) => Some((k, a)),
                _ => Some((key, p.amount_minor)),
            };
        }
        best.map(|(_, a)| a)
    }

    fn surcharge(&self, pricing: &Pricing, distance_m: u32, rider: Rider) -> u32 {
        let Pricing::Distance { base_m, bands } = pricing else {
            return 0;
        };
        let mut add: u64 = 0;
        let mut from = *base_m;
        for b in bands {
            if distance_m <= from {
                break;
            }
            let upto = b.upto_m.max(from);
            let covered = distance_m.min(upto) - from;
            if b.step_m > 0 {
                add = add.saturating_add(
                    u64::from(covered.div_ceil(b.step_m)).saturating_mul(u64::from(b.add_minor)),
                );
            }
            from = upto;
        }
        let pct = if rider.category == NONE {
            100
        } else {
            u64::from(self.table.categories[rider.category as usize].surcharge_percent)
        };
        (add.saturating_mul(pct) / 100).min(u64::from(U24_MAX)) as u32
    }

    fn pos(&self, route: Idx, stop: Idx) -> Option<u32> {
        let ch = &self.table.routes[route as usize].chainage;
        ch.binary_search_by_key(&stop, |&(st, _)| st)
            .ok()
            .map(|i| ch[i].1)
    }

    /// Distance of a leg: along its route; else along another route of the network serving
    /// both stops; else through one interchange between two routes of the network (the
    /// shortest). [`NO_DISTANCE`] when the network connects them in none of these ways.
    fn distance(&self, route: Idx, from: Idx, to: Idx) -> u32 {
        if from == to {
            return 0;
        }
        if let (Some(a), Some(b)) = (self.pos(route, from), self.pos(route, to)) {
            return a.abs_diff(b);
        }
        let net = self.table.routes[route as usize].network;
        let Some(routes) = self.routes_by_network.get(net as usize) else {
            return NO_DISTANCE;
        };
        let mut best = NO_DISTANCE;
        for &r in routes {
            if let (Some(a), Some(b)) = (self.pos(r, from), self.pos(r, to)) {
                best = best.min(a.abs_diff(b));
            }
        }
        if best != NO_DISTANCE {
            return best;
        }
        for &r1 in routes {
            let Some(a) = self.pos(r1, from) else {
                continue;
            };
            for &r2 in routes {
                let Some(b) = self.pos(r2, to) else { continue };
                for &(x, px) in &self.table.routes[r1 as usize].chainage {
                    if let Some(qx) = self.pos(r2, x) {
                        best = best.min(a.abs_diff(px).saturating_add(qx.abs_diff(b)));
                    }
                }
            }
        }
        best
    }

    /// `to`: the destination column (its own "named explicitly" set).
    fn area_ok(&self, rule_area: Idx, stop: Idx, to: bool) -> bool {
        let areas = &self.table.stops[stop as usize].areas;
        if rule_area != NONE {
            return areas.binary_search(&rule_area).is_ok();
        }
        self.table.meta.priority_mode
            || !areas.iter().any(|&a| {
                let n = &self.table.areas[a as usize];
                if to {
                    n.explicit_to
                } else {
                    n.explicit
                }
            })
    }

    /// Whether rule `r` matches a leg on `network` from `from_stop` to `to_stop` at some time
    /// (timeframes ignored): what `fare check` uses to find uncovered stop pairs.
    pub fn matches_somewhen(
        &self,
        r: &LegRule,
        network: Idx,
        from_stop: Idx,
        to_stop: Idx,
    ) -> bool {
        let net_ok = if r.network != NONE {
            r.network == network
        } else {
            self.table.meta.priority_mode
                || network == NONE
                || !self.table.networks[network as usize].explicit
        };
        net_ok
            && self.area_ok(r.from_area, from_stop, false)
            && self.area_ok(r.to_area, to_stop, true)
    }

    fn rule_matches(&self, r: &LegRule, leg: &EffLeg) -> bool {
        let net_ok = if r.network != NONE {
            r.network == leg.network
        } else {
            self.table.meta.priority_mode
                || leg.network == NONE
                || !self.table.networks[leg.network as usize].explicit
        };
        net_ok
            && self.area_ok(r.from_area, leg.from_stop, false)
            && self.area_ok(r.to_area, leg.to_stop, true)
            && (r.from_timeframe == NONE || self.in_timeframe(r.from_timeframe, leg.departure_s))
            && (r.to_timeframe == NONE || self.in_timeframe(r.to_timeframe, leg.arrival_s))
    }

    /// Candidates for one effective leg: the matching rules (highest priority only in priority
    /// mode) that have a price for the rider, cheapest per leg group.
    pub(crate) fn candidates(
        &self,
        leg: &EffLeg,
        rider: Rider,
        legno: usize,
        out: &mut [Cand; MAX_CANDIDATES],
    ) -> Result<usize, QuoteError> {
        let mut n = 0usize;
        let mut best_prio = i32::MIN;
        let mut matched = false;
        let mut no_distance = false;
        let nn = self.table.networks.len();
        let slots = [
            (leg.network != NONE).then(|| &self.rules_by_network[leg.network as usize]),
            Some(&self.rules_by_network[nn]),
        ];
        let from_areas = &self.table.stops[leg.from_stop as usize].areas;
        let to_areas = &self.table.stops[leg.to_stop as usize].areas;
        // Rules with no origin area, then for each origin area those with no destination area
        // or one of the leg's: an origin–destination table costs a few binary searches.
        let rules = slots.into_iter().flatten().flat_map(|nr| {
            let range = move |key: (Idx, Idx)| {
                let lo = nr.by_from.partition_point(|&(k, _)| k < key);
                nr.by_from[lo..]
                    .iter()
                    .take_while(move |&&(k, _)| k == key)
                    .map(|&(_, r)| r)
            };
            nr.any_from
                .iter()
                .copied()
                .chain(from_areas.iter().flat_map(move |&a| {
                    range((a, NONE)).chain(to_areas.iter().flat_map(move |&b| range((a, b))))
                }))
        });
        for ri in rules {
            let r = &self.table.leg_rules[ri as usize];
            if !self.rule_matches(r, leg) {
                continue;
            }
            matched = true;
            if self.table.meta.priority_mode {
                if r.priority < best_prio {
                    continue;
                }
                if r.priority > best_prio {
                    best_prio = r.priority;
                    n = 0;
                }
            }
            // Leg fares are never negative (validated at load).
            let Some(base) = self.price_of(r.product, rider).map(|p| p.max(0) as u32) else {
                continue;
            };
            if leg.distance_m == NO_DISTANCE && matches!(r.pricing, Pricing::Distance { .. }) {
                no_distance = true;
                continue;
            }
            let fare = base.saturating_add(self.surcharge(&r.pricing, leg.distance_m, rider));
            let c = Cand {
                rule: ri,
                group: r.leg_group,
                product: r.product,
                base_minor: base,
                fare_minor: fare,
            };
            if let Some(slot) = out[..n].iter_mut().find(|x| x.group == c.group) {
                if c.fare_minor < slot.fare_minor {
                    *slot = c;
                }
            } else if n < MAX_CANDIDATES {
                out[n] = c;
                n += 1;
            } else if let Some(worst) = out.iter_mut().max_by_key(|x| x.fare_minor) {
                if c.fare_minor < worst.fare_minor {
                    *worst = c;
                }
            }
        }
        if n == 0 {
            return Err(if no_distance {
                QuoteError::NoDistance { leg: legno }
            } else if matched {
                QuoteError::NoPrice { leg: legno }
            } else {
                QuoteError::NoRule { leg: legno }
            });
        }
        Ok(n)
    }

    fn join_applies(&self, a: &Leg, an: Idx, b: &Leg, bn: Idx) -> bool {
        self.table.join_rules.iter().any(|j| {
            j.from_network == an
                && j.to_network == bn
                && (j.from_stop == NONE || j.from_stop == a.to_stop)
                && (j.to_stop == NONE || j.to_stop == b.from_stop)
        })
    }

    /// GTFS: an empty group matches the leg groups no transfer rule names in that column; a
    /// leg with no group matches no transfer rule.
    fn group_ok(&self, rule_group: Idx, g: Idx, to: bool) -> bool {
        if g == NONE {
            return false;
        }
        if rule_group != NONE {
            return rule_group == g;
        }
        let n = &self.table.leg_groups[g as usize];
        !(if to { n.explicit_to } else { n.explicit })
    }

    /// Prices a whole journey: the lowest total the rules allow. Every effective leg either
    /// starts a new fare or continues the transfer chain it follows under a transfer rule that
    /// matches; a small dynamic programme over (leg, candidate, start of the chain) finds the
    /// cheapest way to split the journey into such chains ([`crate::oracle`] checks it by
    /// brute force).
    pub fn price_journey(&self, rider: Rider, legs: &[Leg]) -> Result<Priced, QuoteError> {
        let rider = self.resolve(rider);
        let mut eff = [EffLeg::default(); MAX_LEGS];
        let ne = self.effective_legs(legs, &mut eff)?;
        let eff = &eff[..ne];
        let mut cands = [[Cand::default(); MAX_CANDIDATES]; MAX_LEGS];
        let mut ncand = [0usize; MAX_LEGS];
        for (j, e) in eff.iter().enumerate() {
            ncand[j] = self.candidates(e, rider, e.first as usize, &mut cands[j])?;
        }

        // dp[j][c][s]: best state after effective leg j priced with candidate c, in a transfer
        // chain that began at effective leg s.
        let mut dp = [[[NO_STATE; MAX_LEGS]; MAX_CANDIDATES]; MAX_LEGS];
        for c in 0..ncand[0] {
            dp[0][c][0] = State::first(&cands[0][c], &eff[0]);
        }
        let mut last_may_transfer = false;
        for j in 1..ne {
            let (done, rest) = dp.split_at_mut(j);
            let (prev, cur) = (&done[j - 1], &mut rest[0]);
            for c2 in 0..ncand[j] {
                let to = &cands[j][c2];
                let mut best_new = NO_STATE;
                for c in 0..ncand[j - 1] {
                    let from = &cands[j - 1][c];
                    for (s, st) in prev[c].iter().enumerate().take(j) {
                        if st.total == i64::MAX {
                            continue;
                        }
                        for (ti, tr) in self.table.transfer_rules.iter().enumerate() {
                            let Some(mut ns) = self.transfer(st, from, to, eff, s, j, tr, rider)
                            else {
                                continue;
                            };
                            last_may_transfer |= j == ne - 1;
                            ns.prev_cand = c as u8;
                            ns.prev_start = s as u8;
                            ns.transfer = ti as Idx;
                            let slot = &mut cur[c2][s];
                            if ns.total < slot.total {
                                *slot = ns;
                            }
                        }
                        // A new fare: always a choice, even where a transfer rule matches (a
                        // rider may leave a transfer unused when a new fare costs less).
                        let t_new = st.total + i64::from(to.fare_minor);
                        if t_new < best_new.total {
                            best_new = State::new_fare(st, to, &eff[j], c, s);
                        }
                    }
                }
                let slot = &mut cur[c2][j];
                if best_new.total < slot.total {
                    *slot = best_new;
                }
            }
        }
        let mut out = walk_back(&dp, &cands, &ncand, eff);
        out.last_may_transfer = last_may_transfer;
        Ok(out)
    }

    /// The journey's effective legs (the join rules applied) into `out`; how many.
    pub(crate) fn effective_legs(
        &self,
        legs: &[Leg],
        out: &mut [EffLeg; MAX_LEGS],
    ) -> Result<usize, QuoteError> {
        if legs.is_empty() {
            return Err(QuoteError::NoLegs);
        }
        if legs.len() > MAX_LEGS {
            return Err(QuoteError::TooManyLegs);
        }
        let mut ne = 0usize;
        let mut prev_net = NONE;
        for (i, l) in legs.iter().enumerate() {
            let net = self.check_leg(l, i)?;
            let dist = self.distance(l.route, l.from_stop, l.to_stop);
            if i > 0 && self.join_applies(&legs[i - 1], prev_net, l, net) {
                let e = &mut out[ne - 1];
                e.last = i as u8;
                if e.network != net {
                    e.network = NONE;
                }
                e.to_stop = l.to_stop;
                e.arrival_s = l.arrival_s;
                e.distance_m = e.distance_m.saturating_add(dist);
            } else {
                out[ne] = EffLeg {
                    first: i as u8,
                    last: i as u8,
                    network: net,
                    from_stop: l.from_stop,
                    to_stop: l.to_stop,
                    departure_s: l.departure_s,
                    arrival_s: l.arrival_s,
                    distance_m: dist,
                };
                ne += 1;
            }
            prev_net = net;
        }
        Ok(ne)
    }

    /// Leg `j` priced with `to` continuing, under transfer rule `tr`, the chain that began at
    /// leg `s` and reached leg `j - 1` priced with `from` in state `st`: the new state (its
    /// back-pointers left for the caller), or `None` when the rule does not apply.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn transfer(
        &self,
        st: &State,
        from: &Cand,
        to: &Cand,
        eff: &[EffLeg],
        s: usize,
        j: usize,
        tr: &TransferRule,
        rider: Rider,
    ) -> Option<State> {
        let k = j - s;
        if k > usize::from(self.table.meta.max_transfers)
            || !self.group_ok(tr.from_group, from.group, false)
            || !self.group_ok(tr.to_group, to.group, true)
            || tr.transfer_count.is_some_and(|n| k > usize::from(n))
        {
            return None;
        }
        if let Some(limit) = tr.duration_limit_s {
            let (a, b) = match tr.duration_from {
                DurationFrom::DepartureToArrival => (eff[s].departure_s, eff[j].arrival_s),
                DurationFrom::DepartureToDeparture => (eff[s].departure_s, eff[j].departure_s),
                DurationFrom::ArrivalToDeparture => (eff[s].arrival_s, eff[j].departure_s),
                DurationFrom::ArrivalToArrival => (eff[s].arrival_s, eff[j].arrival_s),
                DurationFrom::PreviousArrivalToDeparture => {
                    (eff[j - 1].arrival_s, eff[j].departure_s)
                }
            };
            if b - a > i64::from(limit) || b < a {
                return None;
            }
        }
        if tr.at_timeframe != NONE && !self.in_timeframe(tr.at_timeframe, eff[j].departure_s) {
            return None;
        }
        let cost = if tr.product == NONE {
            0
        } else {
            i64::from(self.price_of(tr.product, rider)?)
        };
        let mut ns = State {
            chain_max_base: st.chain_max_base.max(to.base_minor),
            chain_dist_m: st.chain_dist_m.saturating_add(eff[j].distance_m),
            ..*st
        };
        match tr.kind {
            TransferKind::FromLegPlusTransfer => {
                ns.total = st.total + cost;
            }
            TransferKind::FromLegPlusTransferPlusToLeg => {
                ns.total = st.total + cost + i64::from(to.fare_minor);
            }
            TransferKind::TransferOnly => {
                // The cost is the fare of the whole sub-journey so far.
                ns.total = st.before_chain + cost;
            }
            TransferKind::DistanceCombined => {
                let r = &self.table.leg_rules[to.rule as usize];
                let combined = i64::from(ns.chain_max_base)
                    + i64::from(self.surcharge(&r.pricing, ns.chain_dist_m, rider))
                    + cost;
                ns.total = st.before_chain + combined;
            }
        }
        ns.total = ns.total.max(st.before_chain);
        Some(ns)
    }

    pub(crate) fn resolve(&self, rider: Rider) -> Rider {
        Rider {
            category: if rider.category == NONE {
                self.default_category
            } else {
                rider.category
            },
            medium: if rider.medium == NONE {
                self.table.default_medium.unwrap_or(NONE)
            } else {
                rider.medium
            },
        }
    }

    fn check_leg(&self, l: &Leg, i: usize) -> Result<Idx, QuoteError> {
        let ns = self.table.stops.len();
        if l.route as usize >= self.table.routes.len() {
            return Err(QuoteError::UnknownRoute { leg: i });
        }
        if l.from_stop as usize >= ns || l.to_stop as usize >= ns {
            return Err(QuoteError::UnknownStop { leg: i });
        }
        Ok(self.table.routes[l.route as usize].network)
    }

    fn service_day(&self, t: u32) -> i32 {
        day_of(i64::from(t) - i64::from(self.table.meta.day_start_s))
    }

    /// Quotes a tap at a validator from what the card holds.
    pub fn quote_tap(&self, card: &CardView<'_>, tap: &Tap) -> Result<TapQuote, QuoteError> {
        if !self.in_effect(i64::from(tap.time_s)) {
            return Err(QuoteError::NotEffective);
        }
        let rider = self.resolve(card.rider);
        let net = self.check_leg(
            &Leg {
                route: tap.route,
                from_stop: tap.stop,
                to_stop: tap.stop,
                ..Leg::default()
            },
            0,
        )?;
        let tap_out = self.tap_out_of(net);
        if tap.kind == TapKind::Out && tap_out.is_none() {
            return Err(QuoteError::TapOutNotUsed);
        }
        let newest = newest_record(card.history);
        let stop_code = self.table.stops[tap.stop as usize].code;
        let route_code = self.table.routes[tap.route as usize].code;
        // A validator clock behind the card's newest record: the tap is taken as happening
        // right after it, so journeys, windows and caps stay consistent.
        let time_s = if newest.is_empty() {
            tap.time_s
        } else {
            tap.time_s.max(newest.time_s)
        };
        let elapsed_s = time_s
            - if newest.is_empty() {
                time_s
            } else {
                newest.time_s
            };

        // The same tap again (a passenger tapping twice): nothing more.
        if !newest.is_empty()
            && newest.kind == Some(tap.kind)
            && newest.stop_code == stop_code
            && newest.route_code == route_code
            && tap.time_s >= newest.time_s
            && elapsed_s <= REPEAT_WINDOW_S
        {
            return Ok(TapQuote {
                fare_minor: 0,
                record: newest,
                before_caps_minor: 0,
                penalty_minor: 0,
                cap: NONE,
                pass: NONE,
                journey: None,
                repeat: true,
            });
        }

        let (day_paid, week_paid, day_trips) = self.accumulators(&newest, time_s);
        let mut record = TripRecord {
            kind: Some(tap.kind),
            flags: 0,
            transfers: 0,
            time_s,
            route_code,
            stop_code,
            entry_stop_code: stop_code,
            journey_offset_s: 0,
            fare_minor: 0,
            journey_paid_minor: 0,
            day_paid_minor: day_paid,
            week_paid_minor: week_paid,
            day_trips,
        };
        let quote = |fare_minor, record, penalty_minor, pass| TapQuote {
            fare_minor,
            record,
            before_caps_minor: fare_minor,
            penalty_minor,
            cap: NONE,
            pass,
            journey: None,
            repeat: false,
        };

        // The newest record's trip: a tap-in not closed yet, on a network that taps out.
        let newest_net = self
            .route_by_code(newest.route_code)
            .map_or(NONE, |r| self.table.routes[r as usize].network);
        let open_in = newest.kind == Some(TapKind::In) && self.tap_out_of(newest_net).is_some();
        let open_by_pass = open_in && newest.flags & flags::PASS != 0;

        // A pass covers the tap; a tap-out closes a trip a pass covered at entry.
        let covering = self.covering_pass(card.passes, rider, net, time_s);
        let closes_pass_trip = tap.kind == TapKind::Out
            && open_by_pass
            && newest_net == net
            && tap_out.is_some_and(|o| elapsed_s <= o.max_trip_s);
        if covering.is_some() || closes_pass_trip {
            record.flags |= flags::PASS;
            if tap.kind == TapKind::Out {
                record.entry_stop_code = newest.stop_code;
            }
            return Ok(quote(0, record, 0, covering.unwrap_or(NONE)));
        }

        // The current journey from the card's records (oldest first).
        let mut legs = [Leg::default(); MAX_LEGS];
        let mut nlegs = 0usize;
        let mut open = false; // the last leg is an open tap-in
        let mut journey_ok = !newest.is_empty()
            && newest.flags & flags::PASS == 0
            && newest.kind != Some(TapKind::Charge)
            && !(newest.kind == Some(TapKind::Out) && newest.flags & flags::PENALTY != 0)
            && time_s - newest.journey_start_s() <= u32::from(u16::MAX);
        if journey_ok {
            let start = newest.journey_start_s();
            let count = card
                .history
                .iter()
                .take_while(|r| !r.is_empty() && r.journey_start_s() == start)
                .count();
            for r in card.history[..count].iter().rev() {
                if r.flags & flags::PASS != 0 || r.kind == Some(TapKind::Charge) {
                    journey_ok = false;
                    break;
                }
                let (Some(route), Some(stop)) = (
                    self.route_by_code(r.route_code),
                    self.stop_by_code(r.stop_code),
                ) else {
                    journey_ok = false;
                    break;
                };
                let t = i64::from(r.time_s);
                match r.kind {
                    Some(TapKind::Out) if open && nlegs > 0 => {
                        let l = &mut legs[nlegs - 1];
                        l.to_stop = stop;
                        l.arrival_s = t;
                        open = false;
                    }
                    Some(kind) => {
                        let from = if kind == TapKind::Out {
                            self.stop_by_code(r.entry_stop_code).unwrap_or(stop)
                        } else {
                            stop
                        };
                        if nlegs == MAX_LEGS {
                            journey_ok = false;
                            break;
                        }
                        legs[nlegs] = Leg {
                            route,
                            from_stop: from,
                            to_stop: stop,
                            departure_s: t,
                            arrival_s: t,
                        };
                        nlegs += 1;
                        open = kind == TapKind::In;
                    }
                    None => {}
                }
            }
        }
        if !journey_ok {
            nlegs = 0;
            open = false;
        }

        let t = i64::from(time_s);
        let mut penalty = 0u32;
        let mut base: u32;
        let mut transfer = false;
        let mut priced = None;
        let mut continue_journey = false;
        let mut entry_stop_code = stop_code;

        if tap.kind == TapKind::Out {
            let in_time =
                open_in && newest_net == net && tap_out.is_some_and(|o| elapsed_s <= o.max_trip_s);
            if in_time && open && nlegs > 0 {
                let before = self.price_journey(rider, &legs[..nlegs])?;
                let open_leg = legs[nlegs - 1];
                entry_stop_code = self.table.stops[open_leg.from_stop as usize].code;
                legs[nlegs - 1].to_stop = tap.stop;
                legs[nlegs - 1].arrival_s = t;
                let after = self.price_journey(rider, &legs[..nlegs])?;
                base = after.total_minor.saturating_sub(before.total_minor) as u32;
                transfer = nlegs > 1;
                continue_journey = true;
                priced = Some(after);
            } else if open_in && newest_net == net {
                // Tapped out after the trip's time ran out: the penalty fare, less what the
                // tap-in paid; the journey ends here.
                penalty = tap_out
                    .map_or(0, |o| o.penalty_minor)
                    .saturating_sub(newest.fare_minor);
                entry_stop_code = newest.stop_code;
                base = 0;
                record.flags |= flags::PENALTY;
            } else {
                // A tap-out with no tap-in: the penalty fare, as a journey of its own.
                penalty = tap_out.map_or(0, |o| o.penalty_minor);
                base = 0;
                record.flags |= flags::PENALTY;
            }
        } else {
            if open_in && !open_by_pass {
                // The previous trip was never closed: its penalty, less what its tap-in paid.
                if let Some(o) = self.tap_out_of(newest_net) {
                    penalty = o.penalty_minor.saturating_sub(newest.fare_minor);
                    record.flags |= flags::PENALTY;
                }
                nlegs = 0;
            } else if open_in {
                nlegs = 0;
            }
            let leg = Leg {
                route: tap.route,
                from_stop: tap.stop,
                to_stop: tap.stop,
                departure_s: t,
                arrival_s: t,
            };
            let single = self.price_journey(rider, &[leg])?;
            base = single.total_minor as u32;
            priced = Some(single);
            if nlegs > 0 && nlegs < MAX_LEGS {
                if let Ok(before) = self.price_journey(rider, &legs[..nlegs]) {
                    legs[nlegs] = leg;
                    if let Ok(after) = self.price_journey(rider, &legs[..=nlegs]) {
                        let e = after.legs()[after.n as usize - 1];
                        let joined = e.transfer != NONE || usize::from(e.first_leg) < nlegs;
                        let diff = after.total_minor.saturating_sub(before.total_minor);
                        // The journey goes on when the leg joins it, and also when it is
                        // cheapest as a new fare but a transfer rule could still take it into
                        // a chain with the earlier legs: a later leg may make that chain the
                        // cheaper one, and charging the difference of the journey's price
                        // keeps the taps adding up to it.
                        if joined || after.last_may_transfer {
                            base = diff as u32;
                            transfer = joined;
                            continue_journey = true;
                            priced = Some(after);
                        }
                    }
                }
            }
        }

        // A leg priced as a new fare is a new trip, even inside a journey kept on the card.
        let new_trip = !continue_journey || (tap.kind != TapKind::Out && !transfer);
        // Caps.
        let before_caps = base;
        let mut cap_idx = NONE;
        for (i, cap) in self.table.caps.iter().enumerate() {
            if cap.category != NONE && cap.category != rider.category {
                continue;
            }
            let room = match cap.period {
                CapPeriod::Day => cap.amount_minor.saturating_sub(day_paid),
                CapPeriod::Week => cap.amount_minor.saturating_sub(week_paid),
                CapPeriod::DayTrips(n) => {
                    // Free after n paid trips, including the rest of a journey begun free.
                    if day_trips >= n && (new_trip || newest.journey_paid_minor == 0) {
                        0
                    } else {
                        u32::MAX
                    }
                }
            };
            if room < base {
                base = room;
                cap_idx = i as Idx;
            }
        }
        if cap_idx != NONE {
            record.flags |= flags::CAPPED;
        }
        let fare = base.saturating_add(penalty).min(U24_MAX);

        if continue_journey {
            record.flags |= if transfer { flags::TRANSFER } else { 0 };
            let start = newest.journey_start_s();
            record.journey_offset_s = (time_s - start) as u16;
            record.transfers = if tap.kind == TapKind::Out {
                newest.transfers
            } else {
                newest.transfers.saturating_add(1)
            };
            record.journey_paid_minor = newest.journey_paid_minor.saturating_add(fare);
            if new_trip {
                record.day_trips = day_trips.saturating_add(u8::from(base > 0));
            }
        } else {
            record.journey_paid_minor = fare;
            if tap.kind != TapKind::Out || penalty > 0 {
                record.day_trips = day_trips.saturating_add(u8::from(base > 0 || penalty > 0));
            }
        }
        record.entry_stop_code = entry_stop_code;
        record.fare_minor = fare;
        record.day_paid_minor = day_paid.saturating_add(fare).min(U24_MAX);
        record.week_paid_minor = week_paid.saturating_add(fare).min(U24_MAX);
        Ok(TapQuote {
            fare_minor: fare,
            record,
            before_caps_minor: before_caps,
            penalty_minor: penalty,
            cap: cap_idx,
            pass: NONE,
            journey: priced,
            repeat: false,
        })
    }

    /// Paid this service day, paid this week and paid trips today, from the newest record
    /// (a newest record in the future counts: a clock behind never resets a cap).
    fn accumulators(&self, newest: &TripRecord, time_s: u32) -> (u32, u32, u8) {
        if newest.is_empty() {
            return (0, 0, 0);
        }
        let today = self.service_day(time_s);
        let nd = self.service_day(newest.time_s);
        let (mut day_paid, mut week_paid, mut day_trips) = (0, 0, 0);
        if nd >= today {
            day_paid = newest.day_paid_minor;
            day_trips = newest.day_trips;
        }
        if (nd + 3).div_euclid(7) >= (today + 3).div_euclid(7) {
            week_paid = newest.week_paid_minor;
        }
        (day_paid, week_paid, day_trips)
    }

    fn tap_out_of(&self, net: Idx) -> Option<&TapOut> {
        if net == NONE {
            return None;
        }
        self.table.networks[net as usize].tap_out.as_ref()
    }

    fn covering_pass(&self, held: &[HeldPass], rider: Rider, net: Idx, t: u32) -> Option<Idx> {
        held.iter().find_map(|h| {
            if t < h.valid_from_s || t >= h.valid_until_s {
                return None;
            }
            let i = self.table.passes.iter().position(|p| p.code == h.code)?;
            let p = &self.table.passes[i];
            let net_ok = p.networks.is_empty() || p.networks.contains(&net);
            let cat_ok = p.category == NONE || p.category == rider.category;
            (net_ok && cat_ok).then_some(i as Idx)
        })
    }

    /// Quotes a non-transit charge (pay-TV): `items` items and `minutes` of viewing at local time
    /// `time_s`, with the service day's cap from the card's accumulators.
    pub fn quote_charge(
        &self,
        card: &CardView<'_>,
        code: u16,
        items: u32,
        minutes: u32,
        time_s: u32,
    ) -> Result<TapQuote, QuoteError> {
        let ci = self
            .table
            .charges
            .iter()
            .position(|c| c.code == code)
            .ok_or(QuoteError::UnknownCode(code))?;
        let c = &self.table.charges[ci];
        let newest = newest_record(card.history);
        let today = self.service_day(time_s);
        // What this charge has cost today: the running total in the newest record of the same
        // charge (records of charges keep it in the journey-paid field).
        let charge_paid = card
            .history
            .iter()
            .find(|r| r.kind == Some(TapKind::Charge) && r.route_code == u32::from(code))
            .filter(|r| self.service_day(r.time_s) >= today)
            .map_or(0, |r| r.journey_paid_minor);
        let mut amount = u64::from(c.per_item_minor.unwrap_or(0)) * u64::from(items)
            + u64::from(c.per_hour_minor.unwrap_or(0)) * u64::from(minutes.div_ceil(60));
        let before = amount.min(u64::from(U24_MAX)) as u32;
        let mut cap = NONE;
        if let Some(dc) = c.day_cap_minor {
            let room = u64::from(dc.saturating_sub(charge_paid));
            if room < amount {
                amount = room;
                cap = ci as Idx;
            }
        }
        let fare = amount.min(u64::from(U24_MAX)) as u32;
        let acc = self.accumulators(&newest, time_s);
        // A charge does not count towards transit caps: the record carries the transit
        // accumulators forward unchanged (and the charge's own day total in journey-paid).
        let record = TripRecord {
            kind: Some(TapKind::Charge),
            flags: if cap != NONE { flags::CAPPED } else { 0 },
            time_s: if newest.is_empty() {
                time_s
            } else {
                time_s.max(newest.time_s)
            },
            route_code: u32::from(code),
            fare_minor: fare,
            journey_paid_minor: charge_paid.saturating_add(fare).min(U24_MAX),
            day_paid_minor: acc.0,
            week_paid_minor: acc.1,
            day_trips: acc.2,
            ..TripRecord::default()
        };
        Ok(TapQuote {
            fare_minor: fare,
            record,
            before_caps_minor: before,
            penalty_minor: 0,
            cap,
            pass: NONE,
            journey: None,
            repeat: false,
        })
    }

    /// The discount a coupon gives on `amount_minor` on local day `day`.
    pub fn coupon_discount(
        &self,
        code: u16,
        amount_minor: u32,
        day: i32,
        already_used: bool,
    ) -> Result<u32, QuoteError> {
        let c = self
            .table
            .coupons
            .iter()
            .find(|c| c.code == code)
            .ok_or(QuoteError::UnknownCode(code))?;
        if c.expires_day.is_some_and(|e| day > e) {
            return Err(QuoteError::CouponExpired);
        }
        if c.single_use && already_used {
            return Err(QuoteError::CouponUsed);
        }
        let off = match (c.value_minor, c.percent) {
            (Some(v), _) => v,
            (None, Some(p)) => (u64::from(amount_minor) * u64::from(p) / 100) as u32,
            (None, None) => 0,
        };
        Ok(off.min(amount_minor))
    }
}

/// The card's newest trip record (an empty one when it has none).
fn newest_record(history: &[TripRecord]) -> TripRecord {
    history
        .iter()
        .find(|r| !r.is_empty())
        .copied()
        .unwrap_or_default()
}

fn lookup(codes: &[(u32, Idx)], code: u32) -> Option<Idx> {
    codes
        .binary_search_by_key(&code, |&(c, _)| c)
        .ok()
        .map(|i| codes[i].1)
}

fn validate(t: &Table) -> Result<(), TableError> {
    let chk = |what: &'static str, i: Idx, len: usize, place: &dyn Fn() -> String| {
        if i != NONE && usize::from(i) >= len {
            Err(TableError::BadIndex {
                what,
                index: i,
                place: place(),
            })
        } else {
            Ok(())
        }
    };
    let req = |what: &'static str, i: Idx, len: usize, place: &dyn Fn() -> String| {
        if usize::from(i) >= len {
            Err(TableError::BadIndex {
                what,
                index: i,
                place: place(),
            })
        } else {
            Ok(())
        }
    };
    let n = |v: usize| v;
    for len in [
        t.categories.len(),
        t.media.len(),
        t.networks.len(),
        t.areas.len(),
        t.stops.len(),
        t.routes.len(),
        t.services.len(),
        t.timeframes.len(),
        t.products.len(),
        t.leg_groups.len(),
        t.leg_rules.len(),
        t.transfer_rules.len(),
    ] {
        if len >= usize::from(NONE) {
            return Err(TableError::Invalid(
                "a list has more than 65534 entries".into(),
            ));
        }
    }
    for s in &t.stops {
        for &a in &s.areas {
            req("area", a, n(t.areas.len()), &|| format!("stop {}", s.id))?;
        }
        if !s.areas.windows(2).all(|w| w[0] < w[1]) {
            return Err(TableError::Invalid(format!(
                "stop {}: areas not sorted",
                s.id
            )));
        }
    }
    for r in &t.routes {
        chk("network", r.network, t.networks.len(), &|| {
            format!("route {}", r.id)
        })?;
        for &(s, _) in &r.chainage {
            req("stop", s, t.stops.len(), &|| format!("route {}", r.id))?;
        }
        if !r.chainage.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(TableError::Invalid(format!(
                "route {}: chainage not sorted",
                r.id
            )));
        }
    }
    for g in &t.timeframes {
        for s in &g.spans {
            chk("service", s.service, t.services.len(), &|| {
                format!("timeframe {}", g.id)
            })?;
        }
    }
    for p in &t.products {
        for pr in &p.prices {
            chk("category", pr.category, t.categories.len(), &|| {
                format!("product {}", p.id)
            })?;
            chk("medium", pr.medium, t.media.len(), &|| {
                format!("product {}", p.id)
            })?;
        }
    }
    for r in &t.leg_rules {
        let place = || r.origin.clone();
        chk("leg group", r.leg_group, t.leg_groups.len(), &place)?;
        chk("network", r.network, t.networks.len(), &place)?;
        chk("area", r.from_area, t.areas.len(), &place)?;
        chk("area", r.to_area, t.areas.len(), &place)?;
        chk("timeframe", r.from_timeframe, t.timeframes.len(), &place)?;
        chk("timeframe", r.to_timeframe, t.timeframes.len(), &place)?;
        req("product", r.product, t.products.len(), &place)?;
        if t.products[r.product as usize]
            .prices
            .iter()
            .any(|p| p.amount_minor < 0)
        {
            return Err(TableError::Invalid(format!(
                "{}: product {} has a negative price; only transfer products may (discounts)",
                r.origin, t.products[r.product as usize].id
            )));
        }
    }
    for j in &t.join_rules {
        let place = || "join rule".to_string();
        req("network", j.from_network, t.networks.len(), &place)?;
        req("network", j.to_network, t.networks.len(), &place)?;
        chk("stop", j.from_stop, t.stops.len(), &place)?;
        chk("stop", j.to_stop, t.stops.len(), &place)?;
    }
    for r in &t.transfer_rules {
        let place = || r.origin.clone();
        chk("leg group", r.from_group, t.leg_groups.len(), &place)?;
        chk("leg group", r.to_group, t.leg_groups.len(), &place)?;
        chk("product", r.product, t.products.len(), &place)?;
        chk("timeframe", r.at_timeframe, t.timeframes.len(), &place)?;
    }
    if let Some(m) = t.default_medium {
        req("medium", m, t.media.len(), &|| "default medium".to_string())?;
    }
    for c in &t.caps {
        chk("category", c.category, t.categories.len(), &|| {
            format!("cap {}", c.id)
        })?;
    }
    for p in &t.passes {
        chk("category", p.category, t.categories.len(), &|| {
            format!("pass {}", p.id)
        })?;
        for &nw in &p.networks {
            req("network", nw, t.networks.len(), &|| {
                format!("pass {}", p.id)
            })?;
        }
    }
    for (what, codes, len) in [
        ("stop", &t.stop_codes, t.stops.len()),
        ("route", &t.route_codes, t.routes.len()),
    ] {
        if codes.len() != len || !codes.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(TableError::Invalid(format!(
                "{what} codes are not one sorted unique entry per {what}"
            )));
        }
        for &(_, i) in codes.iter() {
            req(what, i, len, &|| format!("{what} codes"))?;
        }
    }
    Ok(())
}
