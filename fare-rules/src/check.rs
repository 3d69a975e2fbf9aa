//! `tapgate fare check`: what a compiled table gets wrong or leaves open — contradictory and
//! overlapping rules, rules that can never apply, stop pairs no rule prices, things defined and
//! never used.

use crate::engine::Engine;
use crate::table::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The table must not be distributed.
    Error,
    /// Probably a mistake.
    Warning,
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// Where (`rules.toml:42 fare metro`, `fare_leg_rules.txt:7`) or what.
    pub origin: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        write!(f, "{l}: {}: {}", self.origin, self.message)
    }
}

/// Most example stop pairs named per uncovered network.
const MAX_EXAMPLES: usize = 3;

fn prices(t: &Table, p: Idx) -> Vec<(Idx, Idx, i32)> {
    let mut v: Vec<_> = t.products[p as usize]
        .prices
        .iter()
        .map(|x| (x.category, x.medium, x.amount_minor))
        .collect();
    v.sort_unstable();
    v
}

fn covers(a: &LegRule, b: &LegRule) -> bool {
    let f = |x: Idx, y: Idx| x == NONE || x == y;
    f(a.network, b.network)
        && f(a.from_area, b.from_area)
        && f(a.to_area, b.to_area)
        && f(a.from_timeframe, b.from_timeframe)
        && f(a.to_timeframe, b.to_timeframe)
}

/// Where a table's rules were written: the level of a finding follows what that format forbids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authored {
    /// tapgate's TOML source: a contradiction or a stop pair left unpriced is an error.
    Source,
    /// A GTFS feed: only what the reference forbids is an error (a `fare_leg_rules.txt` row
    /// repeating another's legs and product). Several products for the same legs (a single and
    /// a day pass) are allowed, and a feed need not price every stop pair: warnings.
    Gtfs,
}

/// Checks a table compiled from a TOML source; findings sorted errors first.
pub fn check(engine: &Engine) -> Vec<Finding> {
    check_as(engine, Authored::Source)
}

/// Checks a table by the rules of the format it was written in; findings sorted errors first.
pub fn check_as(engine: &Engine, authored: Authored) -> Vec<Finding> {
    let t = engine.table();
    let mut out = Vec::new();
    match authored {
        Authored::Source => same_keys(t, &mut out),
        Authored::Gtfs => same_legs_gtfs(t, &mut out),
    }
    unreachable(t, &mut out);
    let from = out.len();
    uncovered(engine, &mut out);
    if authored == Authored::Gtfs {
        for f in &mut out[from..] {
            f.level = Level::Warning;
        }
    }
    unserved_stops(t, &mut out);
    unused_timeframes(t, &mut out);
    unused_products(t, &mut out);
    weekly_caps(t, &mut out);
    out.sort_by(|a, b| a.level.cmp(&b.level).then_with(|| a.origin.cmp(&b.origin)));
    out
}

/// What a leg rule matches a leg by: network, areas and timeframes.
type LegKey = (Idx, Idx, Idx, Idx, Idx);

fn leg_key(r: &LegRule) -> LegKey {
    (
        r.network,
        r.from_area,
        r.to_area,
        r.from_timeframe,
        r.to_timeframe,
    )
}

/// Every pair of leg rules (`a` before `b`) with the same `key`: `judge` says what `b` does
/// to `a`, if anything, and that is a finding at `b`.
fn same_key_pairs<K: Ord>(
    t: &Table,
    key: impl Fn(&LegRule) -> K,
    judge: impl Fn(&LegRule, &LegRule) -> Option<(Level, &'static str)>,
    out: &mut Vec<Finding>,
) {
    let mut by_key: BTreeMap<_, Vec<usize>> = BTreeMap::new();
    for (i, r) in t.leg_rules.iter().enumerate() {
        by_key.entry(key(r)).or_default().push(i);
    }
    for idxs in by_key.values().filter(|v| v.len() > 1) {
        for (k, &i) in idxs.iter().enumerate() {
            for &j in &idxs[k + 1..] {
                let (a, b) = (&t.leg_rules[i], &t.leg_rules[j]);
                if let Some((level, what)) = judge(a, b) {
                    out.push(Finding {
                        level,
                        origin: b.origin.clone(),
                        message: format!("{what} ({})", a.origin),
                    });
                }
            }
        }
    }
}

/// Same match keys: contradictory (same group, other prices), duplicate, or overlapping.
fn same_keys(t: &Table, out: &mut Vec<Finding>) {
    let key = |r: &LegRule| (leg_key(r), r.priority);
    same_key_pairs(
        t,
        key,
        |a, b| {
            let same_price = prices(t, a.product) == prices(t, b.product) && a.pricing == b.pricing;
            Some(match (a.leg_group == b.leg_group, same_price) {
            (true, false) => (
                Level::Error,
                "contradicts it: both match the same legs in the same fare group at other prices",
            ),
            (true, true) => (Level::Warning, "duplicates it"),
            (false, _) => (
                Level::Warning,
                "overlaps it: both match the same legs (the cheaper applies)",
            ),
        })
        },
        out,
    );
}

/// GTFS leg rules matching the same legs: the same product again repeats the row's primary key
/// (an error); another product is another fare the rider may buy (the cheapest applies).
fn same_legs_gtfs(t: &Table, out: &mut Vec<Finding>) {
    same_key_pairs(
        t,
        leg_key,
        |a, b| {
            if a.product == b.product {
                Some((
                Level::Error,
                "repeats it: the same legs and fare product (the primary key of fare_leg_rules.txt)",
            ))
            } else if a.priority != b.priority {
                None
            } else {
                Some((
                Level::Warning,
                "offers another product for the same legs (allowed; tapgate charges the cheapest)",
            ))
            }
        },
        out,
    );
}

/// Unreachable: a higher-priority rule matches every leg this one does.
fn unreachable(t: &Table, out: &mut Vec<Finding>) {
    if !t.meta.priority_mode {
        return;
    }
    for (j, b) in t.leg_rules.iter().enumerate() {
        if let Some(a) = t
            .leg_rules
            .iter()
            .enumerate()
            .find(|(i, a)| *i != j && a.priority > b.priority && covers(a, b))
            .map(|(_, a)| a)
        {
            out.push(Finding {
                level: Level::Warning,
                origin: b.origin.clone(),
                message: format!(
                    "can never apply: {} (priority {}) matches every leg it does",
                    a.origin, a.priority
                ),
            });
        }
    }
}

/// Stop pairs on each network that no rule prices (timeframes aside), by area signature.
fn uncovered(engine: &Engine, out: &mut Vec<Finding>) {
    let t = engine.table();
    let mut net_stops: BTreeMap<Idx, BTreeSet<Idx>> = BTreeMap::new();
    for r in &t.routes {
        let e = net_stops.entry(r.network).or_default();
        e.extend(r.chainage.iter().map(|&(s, _)| s));
    }
    // Routes without chainage list no stops; every stop is then a candidate.
    let all: BTreeSet<Idx> = (0..t.stops.len() as Idx).collect();
    for (&net, stops) in &net_stops {
        let stops = if stops.is_empty() { &all } else { stops };
        let mut sigs: BTreeMap<&[Idx], Vec<Idx>> = BTreeMap::new();
        for &s in stops {
            sigs.entry(t.stops[s as usize].areas.as_slice())
                .or_default()
                .push(s);
        }
        let mut uncovered = 0usize;
        let mut examples = Vec::new();
        for a in sigs.values() {
            for b in sigs.values() {
                let (x, y) = (a[0], b[0]);
                if !t
                    .leg_rules
                    .iter()
                    .any(|r| engine.matches_somewhen(r, net, x, y))
                {
                    uncovered += a.len() * b.len();
                    if examples.len() < MAX_EXAMPLES {
                        examples.push(format!(
                            "{} → {}",
                            t.stops[x as usize].id, t.stops[y as usize].id
                        ));
                    }
                }
            }
        }
        if uncovered > 0 {
            let name = if net == NONE {
                "routes without a network".to_string()
            } else {
                format!("network {}", t.networks[net as usize].id)
            };
            out.push(Finding {
                level: Level::Error,
                origin: name,
                message: format!(
                    "{uncovered} stop pair(s) no fare rule prices, e.g. {}",
                    examples.join(", ")
                ),
            });
        }
    }
}

/// Stops on no route (when routes list their stops).
fn unserved_stops(t: &Table, out: &mut Vec<Finding>) {
    let mut served = vec![false; t.stops.len()];
    for r in &t.routes {
        for &(s, _) in &r.chainage {
            served[s as usize] = true;
        }
    }
    if t.routes.iter().any(|r| !r.chainage.is_empty()) {
        let ids = t.stops.iter().map(|s| s.id.as_str());
        warn_unmarked(ids, &served, "stop", "is on no route", out);
    }
}

/// A warning at each `what` of `ids` that `marked` (one flag each, in order) does not mark.
fn warn_unmarked<'a>(
    ids: impl Iterator<Item = &'a str>,
    marked: &[bool],
    what: &str,
    message: &str,
    out: &mut Vec<Finding>,
) {
    for (id, _) in ids.zip(marked).filter(|(_, &m)| !m) {
        out.push(Finding {
            level: Level::Warning,
            origin: format!("{what} {id}"),
            message: message.into(),
        });
    }
}

/// Timeframes no leg or transfer rule uses.
fn unused_timeframes(t: &Table, out: &mut Vec<Finding>) {
    let mut used_tf = vec![false; t.timeframes.len()];
    for r in &t.leg_rules {
        for tf in [r.from_timeframe, r.to_timeframe] {
            if tf != NONE {
                used_tf[tf as usize] = true;
            }
        }
    }
    for r in &t.transfer_rules {
        if r.at_timeframe != NONE {
            used_tf[r.at_timeframe as usize] = true;
        }
    }
    let ids = t.timeframes.iter().map(|g| g.id.as_str());
    warn_unmarked(ids, &used_tf, "timeframe", "is used by no rule", out);
}

/// Products no rule uses, and products with no price.
fn unused_products(t: &Table, out: &mut Vec<Finding>) {
    let mut used_p = vec![false; t.products.len()];
    for r in &t.leg_rules {
        used_p[r.product as usize] = true;
    }
    for r in &t.transfer_rules {
        if r.product != NONE {
            used_p[r.product as usize] = true;
        }
    }
    let ids = t.products.iter().map(|p| p.id.as_str());
    warn_unmarked(ids, &used_p, "product", "is used by no rule", out);
    for p in &t.products {
        if p.prices.is_empty() {
            out.push(Finding {
                level: Level::Error,
                origin: format!("product {}", p.id),
                message: "has no price for any rider".into(),
            });
        }
    }
}

/// A weekly cap below a daily cap of the same riders.
fn weekly_caps(t: &Table, out: &mut Vec<Finding>) {
    for (i, c) in t.caps.iter().enumerate() {
        if c.period != CapPeriod::Week {
            continue;
        }
        if let Some(d) = t.caps.iter().find(|d| {
            d.period == CapPeriod::Day
                && d.category == c.category
                && d.amount_minor > c.amount_minor
        }) {
            out.push(Finding {
                level: Level::Warning,
                origin: format!("cap {} ({})", c.id, i + 1),
                message: format!(
                    "the weekly cap {} is below the daily cap {} of {}",
                    c.amount_minor, d.id, d.amount_minor
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::compile;

    fn findings(src: &str) -> Vec<Finding> {
        check(&Engine::new(compile("r.toml", src).unwrap()).unwrap())
    }

    const HEAD: &str = r#"
[table]
name = "t"
version = 1
currency = "USD"
effective_from = "2026-01-01"
[networks.bus]
[[routes]]
id = "B1"
network = "bus"
stops = ["a", "b", "c"]
at = ["0km", "1km", "2km"]
[areas]
z1 = ["a", "b"]
z2 = ["c"]
"#;

    /// A `[[fares]]` entry `id` on the bus network with `fields` (`key = value` lines).
    fn fare(id: &str, fields: &str) -> String {
        format!("[[fares]]\nid = \"{id}\"\nnetwork = \"bus\"\n{fields}\n")
    }

    #[test]
    fn the_metro_city_sample_is_clean() {
        let src = include_str!("../samples/metro-city/rules.toml");
        let f = findings(src);
        assert!(f.iter().all(|x| x.level != Level::Error), "{f:#?}");
    }

    #[test]
    fn uncovered_stop_pairs_are_reported() {
        let f = findings(&format!(
            "{HEAD}{}",
            fare("z", "od = [[\"z1\", \"z1\", 100]]")
        ));
        let e = f
            .iter()
            .find(|x| x.origin == "network bus")
            .expect("finding");
        assert_eq!(e.level, Level::Error);
        // a,b → c; c → a,b; c → c: 2 + 2 + 1 pairs.
        assert!(e.message.starts_with("5 stop pair(s)"), "{}", e.message);
    }

    #[test]
    fn contradictory_overlapping_and_unreachable_rules_are_reported() {
        let src = [
            fare("a", "group = \"g\"\nprice = 100"),
            fare("b", "group = \"g\"\nprice = 200"),
            fare("c", "price = 100"),
            fare("d", "from_zone = \"z1\"\nprice = 50\npriority = -1"),
        ]
        .concat();
        let f = findings(&format!("{HEAD}{src}"));
        let has = |lvl: Level, origin: &str, msg: &str| {
            f.iter()
                .any(|x| x.level == lvl && x.origin.contains(origin) && x.message.contains(msg))
        };
        assert!(has(Level::Error, "fare b", "contradicts"), "{f:#?}");
        assert!(has(Level::Warning, "fare c", "overlaps"), "{f:#?}");
        assert!(has(Level::Warning, "fare d", "can never apply"), "{f:#?}");
    }
}
