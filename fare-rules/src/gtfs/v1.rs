//! GTFS Fares v1 (`fare_attributes.txt`, `fare_rules.txt`) compiled into the same [`Table`] as
//! Fares v2, so the one engine prices both and the journey quote stays the lowest total.
//!
//! The mapping (the reference's semantics as tapgate applies them):
//! - each fare (`fare_id`) is a product with its one price and a leg group of its own;
//! - each route is a network of its own and each `zone_id` of `stops.txt` an area, neither
//!   marked explicit, so a rule that names no route (zone) matches every route (zone);
//! - each `fare_rules.txt` row is one way the fare applies: a ride matches it when its route is
//!   `route_id` (if given), it boards in zone `origin_id` and alights in `destination_id` (if
//!   given); the `contains_id` rows of one fare and route together are the set of zones a ride
//!   must pass through exactly, taken as its boarding and alighting zones (tapgate has no
//!   stop times), so a set of one zone or two zones; a fare with no rows applies to every ride;
//! - `transfers` (0, 1, 2, empty for unlimited) and `transfer_duration` (seconds from the first
//!   boarding) become a free transfer rule from the fare to itself: further rides the same fare
//!   matches are covered while the count and the duration allow; `transfers = 0` allows none.
//!
//! Where several fares match, the engine takes the combination with the lowest total.

use std::collections::BTreeMap;

use super::compile::{codes, At, Ids};
use super::*;
use crate::table::{
    DurationFrom, Idx, LegRule, Named, Network, Price, Pricing, Product, Route, Stop, Table,
    TransferKind, TransferRule, NONE,
};

/// Compiles a Fares v1 feed into `table` (which has its meta already).
pub(super) fn compile_v1(feed: &Feed, mut table: Table) -> Result<Table> {
    let zones = stops_and_zones(feed, &mut table)?;
    let routes = routes(feed, &mut table)?;
    let fares = fares(feed, &mut table)?;
    let mut rules: BTreeMap<Idx, Vec<&FareRuleRow>> = BTreeMap::new();
    for r in &feed.fare_rules {
        let fare = fares.resolve(&r.fare_id, FARE_RULES, r.line, "fare_id")?;
        rules.entry(fare).or_default().push(r);
    }
    for (fare, a) in feed.fare_attributes.iter().enumerate() {
        let fare = fare as Idx;
        let base = LegRule {
            origin: format!("{FARE_ATTRIBUTES}:{}", a.line),
            leg_group: fare,
            network: NONE,
            from_area: NONE,
            to_area: NONE,
            from_timeframe: NONE,
            to_timeframe: NONE,
            product: fare,
            pricing: Pricing::Product,
            priority: 0,
        };
        match rules.get(&fare) {
            None => table.leg_rules.push(base),
            Some(rows) => leg_rules(rows, &base, &routes, &zones, &mut table)?,
        }
        transfer_rule(a, fare, &mut table)?;
    }
    Ok(table)
}

/// Stops (from `stops.txt`, required by v1 zones) and their zones as areas.
fn stops_and_zones(feed: &Feed, table: &mut Table) -> Result<Ids> {
    let mut stops = Ids::new("stop", STOPS);
    let mut zones = Ids::new("zone", "stops.txt zone_id");
    let mut lines = Vec::new();
    for s in feed.stops.iter().flatten() {
        stops.add_new(&s.stop_id, At(STOPS, s.line, "stop_id"))?;
        let areas = if s.zone_id.is_empty() {
            vec![]
        } else {
            vec![zones.add(&s.zone_id, At(STOPS, s.line, "zone_id"))?]
        };
        table.stops.push(Stop {
            id: s.stop_id.clone(),
            code: crate::table::code24(&s.stop_id),
            areas,
        });
        lines.push((s.stop_id.clone(), s.line));
    }
    table.stop_codes = codes(&lines, STOPS, "stop_id", "stop")?;
    table.areas = zones
        .order
        .iter()
        .map(|id| Named {
            id: id.clone(),
            explicit: false,
            explicit_to: false,
        })
        .collect();
    Ok(zones)
}

/// Routes (from `routes.txt`, else those `fare_rules.txt` names), each its own network.
fn routes(feed: &Feed, table: &mut Table) -> Result<Ids> {
    let mut routes = Ids::new("route", ROUTES);
    let mut lines = Vec::new();
    let named: Vec<(&String, &'static str, u64)> = match &feed.routes {
        Some(rows) => rows.iter().map(|r| (&r.route_id, ROUTES, r.line)).collect(),
        None => feed
            .fare_rules
            .iter()
            .filter(|r| !r.route_id.is_empty())
            .map(|r| (&r.route_id, FARE_RULES, r.line))
            .collect(),
    };
    for (id, file, line) in named {
        if file == ROUTES {
            routes.add_new(id, At(file, line, "route_id"))?;
        } else if routes.get(id).is_some() {
            continue;
        } else {
            routes.add(id, At(file, line, "route_id"))?;
        }
        let network = table.networks.len() as Idx;
        table.networks.push(Network {
            id: id.clone(),
            explicit: false,
            tap_out: None,
        });
        table.routes.push(Route {
            id: id.clone(),
            code: crate::table::code24(id),
            network,
            chainage: Vec::new(),
        });
        lines.push((id.clone(), line));
    }
    table.route_codes = codes(&lines, ROUTES, "route_id", "route")?;
    Ok(routes)
}

/// One product and one leg group per fare.
fn fares(feed: &Feed, table: &mut Table) -> Result<Ids> {
    let mut fares = Ids::new("fare", FARE_ATTRIBUTES);
    for a in &feed.fare_attributes {
        fares.add_new(&a.fare_id, At(FARE_ATTRIBUTES, a.line, "fare_id"))?;
        table.products.push(Product {
            id: a.fare_id.clone(),
            name: a.fare_id.clone(),
            prices: vec![Price {
                category: NONE,
                medium: NONE,
                amount_minor: a.amount_minor,
            }],
        });
        table.leg_groups.push(Named {
            id: a.fare_id.clone(),
            explicit: true,
            explicit_to: true,
        });
    }
    Ok(fares)
}

/// The leg rules of one fare's `fare_rules.txt` rows.
fn leg_rules(
    rows: &[&FareRuleRow],
    base: &LegRule,
    routes: &Ids,
    zones: &Ids,
    table: &mut Table,
) -> Result<()> {
    // contains_id rows: the zone set per route.
    let mut contains: BTreeMap<Idx, (Vec<Idx>, u64)> = BTreeMap::new();
    for r in rows {
        let f = FARE_RULES;
        let network = routes.resolve(&r.route_id, f, r.line, "route_id")?;
        let rule = LegRule {
            origin: format!("{f}:{}", r.line),
            network,
            ..base.clone()
        };
        if !r.contains_id.is_empty() {
            let z = zones.resolve(&r.contains_id, f, r.line, "contains_id")?;
            let entry = contains.entry(network).or_insert((Vec::new(), r.line));
            if !entry.0.contains(&z) {
                entry.0.push(z);
            }
            continue;
        }
        table.leg_rules.push(LegRule {
            from_area: zones.resolve(&r.origin_id, f, r.line, "origin_id")?,
            to_area: zones.resolve(&r.destination_id, f, r.line, "destination_id")?,
            ..rule
        });
    }
    for (network, (set, line)) in contains {
        let pairs = match set[..] {
            [z] => vec![(z, z)],
            [a, b] => vec![(a, b), (b, a)],
            _ => {
                return Err(GtfsError::Invalid {
                    file: FARE_RULES,
                    line,
                    field: "contains_id",
                    message: format!(
                        "fare \"{}\" must pass through {} zones; without stop times a ride is known by its boarding and alighting zones, so at most 2",
                        base_id(table, base), set.len()
                    ),
                })
            }
        };
        for (from_area, to_area) in pairs {
            table.leg_rules.push(LegRule {
                origin: format!("{FARE_RULES}:{line}"),
                network,
                from_area,
                to_area,
                ..base.clone()
            });
        }
    }
    Ok(())
}

fn base_id(table: &Table, base: &LegRule) -> String {
    table
        .leg_groups
        .get(usize::from(base.leg_group))
        .map_or_else(String::new, |g| g.id.clone())
}

/// The fare's free transfers to itself (none when `transfers` is 0).
fn transfer_rule(a: &FareAttributeRow, fare: Idx, table: &mut Table) -> Result<()> {
    if a.transfers == Some(0) {
        return Ok(());
    }
    table.transfer_rules.push(TransferRule {
        origin: format!("{FARE_ATTRIBUTES}:{}", a.line),
        from_group: fare,
        to_group: fare,
        transfer_count: a.transfers.map(u16::from),
        duration_limit_s: a.transfer_duration.filter(|&d| d > 0),
        duration_from: DurationFrom::DepartureToDeparture,
        kind: TransferKind::FromLegPlusTransfer,
        product: NONE,
        at_timeframe: NONE,
    });
    Ok(())
}
