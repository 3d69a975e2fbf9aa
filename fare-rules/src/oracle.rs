//! A brute-force oracle for [`Engine::price_journey`], for property tests: the lowest total
//! of a journey of up to [`MAX_ORACLE_LEGS`] effective legs, found by trying every way of
//! splitting it into priced groups.
//!
//! A group is a run of consecutive effective legs: its first leg is a new fare, and every later
//! leg continues the group under a transfer rule that matches it (same steps, counts, windows
//! and costs as the engine's). The oracle enumerates every split of the journey into groups,
//! and for each group every leg rule candidate per leg and every matching transfer rule per
//! step; a group's price does not depend on what came before it, so a split costs the sum of
//! its groups' cheapest prices, and the journey the cheapest split. It shares the engine's
//! leg matching ([`Engine::candidates`]) and transfer step ([`Engine::transfer`]) but none of
//! its search (the dynamic programme and its pruning), which is what it checks.

use crate::engine::{Cand, EffLeg, Engine, Leg, QuoteError, Rider, State};
use crate::table::{MAX_CANDIDATES, MAX_LEGS};

/// Most effective legs the oracle prices (it is exponential in them).
pub const MAX_ORACLE_LEGS: usize = 6;

/// The lowest total of `legs` for `rider` by brute force; `Ok(None)` when the journey has
/// more than [`MAX_ORACLE_LEGS`] effective legs.
pub fn lowest_total(
    engine: &Engine,
    rider: Rider,
    legs: &[Leg],
) -> Result<Option<u64>, QuoteError> {
    let rider = engine.resolve(rider);
    let mut eff = [EffLeg::default(); MAX_LEGS];
    let ne = engine.effective_legs(legs, &mut eff)?;
    if ne > MAX_ORACLE_LEGS {
        return Ok(None);
    }
    let eff = &eff[..ne];
    let mut cands = [[Cand::default(); MAX_CANDIDATES]; MAX_LEGS];
    let mut ncand = [0usize; MAX_LEGS];
    for (j, e) in eff.iter().enumerate() {
        ncand[j] = engine.candidates(e, rider, e.first as usize, &mut cands[j])?;
    }
    let o = Oracle {
        engine,
        rider,
        eff,
        cands: &cands,
        ncand: &ncand,
    };
    // Bit i of `cuts` set: a new group starts at leg i + 1.
    let mut best: Option<i64> = None;
    for cuts in 0u32..(1 << (ne - 1)) {
        let mut total = 0i64;
        let mut start = 0usize;
        let mut feasible = true;
        for end in 0..ne {
            if end + 1 == ne || cuts & (1 << end) != 0 {
                match o.group(start, end) {
                    Some(p) => total += p,
                    None => {
                        feasible = false;
                        break;
                    }
                }
                start = end + 1;
            }
        }
        if feasible && best.is_none_or(|b| total < b) {
            best = Some(total);
        }
    }
    // One group per leg is always allowed, so some split is feasible.
    Ok(best.map(|b| b.max(0) as u64))
}

struct Oracle<'a> {
    engine: &'a Engine,
    rider: Rider,
    eff: &'a [EffLeg],
    cands: &'a [[Cand; MAX_CANDIDATES]; MAX_LEGS],
    ncand: &'a [usize; MAX_LEGS],
}

impl Oracle<'_> {
    /// The cheapest price of legs `s..=e` as one group (`None`: the rules allow no such group).
    fn group(&self, s: usize, e: usize) -> Option<i64> {
        (0..self.ncand[s])
            .filter_map(|c| {
                let st = State::first(&self.cands[s][c], &self.eff[s]);
                self.extend(s, e, s, c, &st)
            })
            .min()
    }

    /// The cheapest end of the group begun at `s`, now at leg `j` priced with candidate `c`.
    fn extend(&self, s: usize, e: usize, j: usize, c: usize, st: &State) -> Option<i64> {
        if j == e {
            return Some(st.total);
        }
        let from = &self.cands[j][c];
        let mut best = None;
        for c2 in 0..self.ncand[j + 1] {
            let to = &self.cands[j + 1][c2];
            for tr in &self.engine.table().transfer_rules {
                let Some(ns) =
                    self.engine
                        .transfer(st, from, to, self.eff, s, j + 1, tr, self.rider)
                else {
                    continue;
                };
                if let Some(t) = self.extend(s, e, j + 1, c2, &ns) {
                    best = Some(best.map_or(t, |b: i64| b.min(t)));
                }
            }
        }
        best
    }
}
