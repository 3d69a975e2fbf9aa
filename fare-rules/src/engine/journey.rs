//! The journey quote: leg matching (networks, areas, timeframes, priority), leg fares and
//! distance surcharges, join rules, and the transfer programme with its walk back.

use super::*;
use crate::record::U24_MAX;

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

/// The programme's table for a journey of up to `N` effective legs: `dp[j][c][s]`. Sized to
/// the journey (not to [`MAX_LEGS`]) because filling it is most of a short quote's cost.
type Dp<const N: usize> = [[[State; N]; MAX_CANDIDATES]; N];

/// The cheapest final state of the programme, walked back into priced legs.
fn walk_back<const N: usize>(
    dp: &Dp<N>,
    cands: &[[Cand; MAX_CANDIDATES]; N],
    ncand: &[usize; N],
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

impl Engine {
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
        // The tables sized to the journey: short journeys (the common case) fill a few
        // hundred bytes instead of the 16 KiB a `MAX_LEGS` table takes.
        match ne {
            1 => self.price_effective::<1>(rider, eff),
            2 => self.price_effective::<2>(rider, eff),
            3 => self.price_effective::<3>(rider, eff),
            4 => self.price_effective::<4>(rider, eff),
            _ => self.price_effective::<MAX_LEGS>(rider, eff),
        }
    }

    /// [`Engine::price_journey`] over effective legs, with tables for up to `N` of them
    /// (`eff.len() <= N`).
    fn price_effective<const N: usize>(
        &self,
        rider: Rider,
        eff: &[EffLeg],
    ) -> Result<Priced, QuoteError> {
        let ne = eff.len();
        debug_assert!(ne >= 1 && ne <= N);
        let mut cands = [[Cand::default(); MAX_CANDIDATES]; N];
        let mut ncand = [0usize; N];
        for (j, e) in eff.iter().enumerate() {
            ncand[j] = self.candidates(e, rider, e.first as usize, &mut cands[j])?;
        }

        // dp[j][c][s]: best state after effective leg j priced with candidate c, in a transfer
        // chain that began at effective leg s.
        let mut dp: Dp<N> = [[[NO_STATE; N]; MAX_CANDIDATES]; N];
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

    pub(super) fn check_leg(&self, l: &Leg, i: usize) -> Result<Idx, QuoteError> {
        let ns = self.table.stops.len();
        if l.route as usize >= self.table.routes.len() {
            return Err(QuoteError::UnknownRoute { leg: i });
        }
        if l.from_stop as usize >= ns || l.to_stop as usize >= ns {
            return Err(QuoteError::UnknownStop { leg: i });
        }
        Ok(self.table.routes[l.route as usize].network)
    }
}
