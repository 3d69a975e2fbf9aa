//! A synthetic city-sized rule set (TOML source), for benchmarks, memory figures and property
//! tests: metro lines and bus routes priced by distance with distance-combined transfers, a
//! regional rail network priced by an origin–destination zone table (with a peak table), caps.
//! Deterministic: the same sizes give the same source.

use std::fmt::Write as _;

/// Sizes of the synthetic city.
#[derive(Clone, Copy, Debug)]
pub struct CitySize {
    pub metro_lines: usize,
    pub stops_per_metro_line: usize,
    pub bus_routes: usize,
    pub stops_per_bus_route: usize,
    pub rail_lines: usize,
    pub stops_per_rail_line: usize,
    /// Zones of the rail network (the OD table has zones² entries, twice with the peak table).
    pub zones: usize,
}

impl CitySize {
    /// A large city: about 5,000 stops, 330 routes and some 800 leg rules.
    pub const CITY: CitySize = CitySize {
        metro_lines: 20,
        stops_per_metro_line: 30,
        bus_routes: 300,
        stops_per_bus_route: 14,
        rail_lines: 10,
        stops_per_rail_line: 20,
        zones: 20,
    };
    /// A small one for quick tests.
    pub const TOWN: CitySize = CitySize {
        metro_lines: 2,
        stops_per_metro_line: 6,
        bus_routes: 4,
        stops_per_bus_route: 5,
        rail_lines: 1,
        stops_per_rail_line: 4,
        zones: 3,
    };
}

/// Stop id of metro line `l`, stop `i`.
pub fn metro_stop(l: usize, i: usize) -> String {
    format!("M{l}-{i}")
}
/// Stop id of bus route `r`, stop `i` (bus stops at even indexes double as metro stops).
pub fn bus_stop(r: usize, i: usize) -> String {
    format!("B{r}-{i}")
}
/// Stop id of rail line `l`, stop `i`.
pub fn rail_stop(l: usize, i: usize) -> String {
    format!("R{l}-{i}")
}

/// The TOML source of a synthetic city.
pub fn city_source(s: CitySize) -> String {
    let mut o = String::with_capacity(1 << 20);
    o.push_str(HEADER);
    routes(&mut o, s);
    zones(&mut o, s);
    o.push_str(FARES);
    rail_fares(&mut o, s);
    metro_bus_transfers(&mut o);
    o.push_str(RAIL_TRANSFERS_AND_CAPS);
    o
}

/// The table, categories, timeframes, networks and base products.
const HEADER: &str = r#"[table]
name = "Synthetic city"
version = 1
currency = "KRW"
effective_from = "2020-01-01"
day_starts_at = "04:00"
max_transfers = 4

[categories]
adult = { default = true }
youth = { percent = 80 }
child = { percent = 50, surcharge_percent = 0 }
senior = { percent = 0 }
disabled = { percent = 0 }

[timeframes]
peak = [{ days = "mon-fri", from = "07:00", to = "09:30" }, { days = "mon-fri", from = "17:30", to = "19:30" }]
night = [{ from = "21:00", to = "05:00" }]

[networks.metro]
tap_out = { penalty = 2800 }
[networks.bus]
tap_out = { penalty = 1500 }
[networks.rail]
tap_out = { penalty = 6000 }

[products]
metro_base = { price = 1400, by_category = { youth = 900, child = 500 } }
bus_base = { price = 1500, by_category = { youth = 900, child = 550 } }

"#;

/// Metro and bus fares by distance.
const FARES: &str = r#"
[[fares]]
id = "metro"
network = "metro"
product = "metro_base"
distance = { base = "10km", bands = [{ upto = "50km", every = "5km", add = 100 }, { every = "8km", add = 100 }] }

[[fares]]
id = "bus"
network = "bus"
product = "bus_base"
distance = { base = "10km", bands = [{ upto = "50km", every = "5km", add = 100 }, { every = "8km", add = 100 }] }

"#;

/// Transfers between metro and bus: up to 4, within 30 minutes, 60 at night.
fn metro_bus_transfers(o: &mut String) {
    for (within, during) in [("30m", ""), ("60m", "during = \"night\"\n")] {
        let _ = write!(
            o,
            r#"[[transfers]]
from = ["metro", "bus"]
to = ["metro", "bus"]
within = "{within}"
measured = "last_alighting"
{during}max = 4
pricing = "distance_combined"

"#
        );
    }
}

/// Transfers onto rail; a day and a week cap.
const RAIL_TRANSFERS_AND_CAPS: &str = r#"[[transfers]]
from = ["metro", "bus"]
to = "rail"
within = "30m"
measured = "last_alighting"
pricing = "from_leg_plus_cost_plus_to_leg"
cost = 0

[[caps]]
period = "day"
amount = 12000
categories = ["adult", "youth"]

[[caps]]
period = "week"
amount = 60000

"#;

/// Metro lines and bus routes with their stops' distances; rail lines (priced by zone).
fn routes(o: &mut String, s: CitySize) {
    let stop_list = |ids: Vec<String>, step_m: usize| {
        let names: Vec<String> = ids.iter().map(|i| format!("\"{i}\"")).collect();
        let at: Vec<String> = (0..ids.len())
            .map(|i| format!("\"{}m\"", i * step_m))
            .collect();
        (names.join(", "), at.join(", "))
    };
    for l in 0..s.metro_lines {
        let (names, at) = stop_list(
            (0..s.stops_per_metro_line)
                .map(|i| metro_stop(l, i))
                .collect(),
            1_700,
        );
        let _ = writeln!(
            o,
            "[[routes]]\nid = \"M{l}\"\nnetwork = \"metro\"\nstops = [{names}]\nat = [{at}]\n"
        );
    }
    for r in 0..s.bus_routes {
        // Every bus route starts at a metro stop so journeys can transfer.
        let mut ids: Vec<String> = (0..s.stops_per_bus_route).map(|i| bus_stop(r, i)).collect();
        if s.metro_lines > 0 {
            ids[0] = metro_stop(
                r % s.metro_lines,
                (r / s.metro_lines) % s.stops_per_metro_line,
            );
        }
        let (names, at) = stop_list(ids, 600);
        let _ = writeln!(
            o,
            "[[routes]]\nid = \"B{r}\"\nnetwork = \"bus\"\nstops = [{names}]\nat = [{at}]\n"
        );
    }
    for l in 0..s.rail_lines {
        let mut ids: Vec<String> = (0..s.stops_per_rail_line)
            .map(|i| rail_stop(l, i))
            .collect();
        if s.metro_lines > 0 {
            ids[0] = metro_stop(l % s.metro_lines, s.stops_per_metro_line - 1);
        }
        let names: Vec<String> = ids.iter().map(|i| format!("\"{i}\"")).collect();
        let _ = writeln!(
            o,
            "[[routes]]\nid = \"R{l}\"\nnetwork = \"rail\"\nstops = [{}]\n",
            names.join(", ")
        );
    }
}

/// Rail zones: stop i of a line is in zone i * zones / stops.
fn zones(o: &mut String, s: CitySize) {
    let _ = writeln!(o, "[areas]");
    for z in 0..s.zones {
        let mut members = Vec::new();
        for l in 0..s.rail_lines {
            for i in 0..s.stops_per_rail_line {
                if i * s.zones / s.stops_per_rail_line == z {
                    let id = if i == 0 && s.metro_lines > 0 {
                        metro_stop(l % s.metro_lines, s.stops_per_metro_line - 1)
                    } else {
                        rail_stop(l, i)
                    };
                    members.push(format!("\"{id}\""));
                }
            }
        }
        members.dedup();
        let _ = writeln!(o, "z{z} = [{}]", members.join(", "));
    }
}

/// The rail origin–destination tables: off-peak, and peak at a higher priority.
fn rail_fares(o: &mut String, s: CitySize) {
    for (id, extra, peak) in [("rail", 0u32, false), ("rail-peak", 300, true)] {
        let _ = writeln!(
            o,
            "[[fares]]\nid = \"{id}\"\ngroup = \"rail\"\nnetwork = \"rail\""
        );
        if peak {
            let _ = writeln!(o, "timeframe = \"peak\"\npriority = 1");
        }
        let _ = writeln!(o, "symmetric = false\nod = [");
        for a in 0..s.zones {
            for b in 0..s.zones {
                let price = 1800 + 250 * a.abs_diff(b) as u32 + extra;
                let _ = writeln!(o, "  [\"z{a}\", \"z{b}\", {price}],");
            }
        }
        let _ = writeln!(o, "]\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;

    #[test]
    fn the_synthetic_city_compiles_and_checks_clean() {
        let src = city_source(CitySize::TOWN);
        let t = crate::source::compile("city.toml", &src).unwrap_or_else(|e| panic!("{e}"));
        let e = Engine::new(t).unwrap();
        let f = crate::check::check(&e);
        assert!(
            f.iter().all(|x| x.level != crate::check::Level::Error),
            "{f:#?}"
        );
    }
}
