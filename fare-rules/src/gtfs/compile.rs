//! Compiling a loaded [`Feed`] into a [`Table`]: every id resolved against the file that
//! defines it (an unknown id names the known ones and the closest).

use std::collections::{BTreeSet, HashMap};

use super::*;
use crate::table::{
    code24, currency_exponent, Category, DurationFrom, Idx, JoinRule, LegRule, Meta, Named,
    Network, Price, Pricing, Product, Route, Service, Stop, Table, Timeframe, TimeframeGroup,
    TransferKind, TransferRule, NONE,
};

/// Where an id stands in the feed: file, line and column.
#[derive(Clone, Copy)]
pub(super) struct At(
    pub(super) &'static str,
    pub(super) u64,
    pub(super) &'static str,
);

impl At {
    /// The feed's error for a value refused here.
    fn invalid(self, message: String) -> GtfsError {
        let At(file, line, field) = self;
        GtfsError::Invalid {
            file,
            line,
            field,
            message,
        }
    }
}

/// Ids of one kind, in order of definition, with their table index.
pub(super) struct Ids {
    pub(super) what: &'static str,
    pub(super) source: &'static str,
    pub(super) order: Vec<String>,
    pub(super) index: HashMap<String, Idx>,
}

impl Ids {
    pub(super) fn new(what: &'static str, source: &'static str) -> Ids {
        Ids {
            what,
            source,
            order: Vec::new(),
            index: HashMap::new(),
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<Idx> {
        self.index.get(id).copied()
    }

    /// Adds `id` if new; its index either way.
    pub(super) fn add(&mut self, id: &str, at: At) -> Result<Idx> {
        if let Some(i) = self.get(id) {
            return Ok(i);
        }
        let i = Idx::try_from(self.order.len())
            .ok()
            .filter(|&i| i != NONE)
            .ok_or_else(|| at.invalid(format!("too many {}s (at most {})", self.what, NONE)))?;
        self.order.push(id.to_string());
        self.index.insert(id.to_string(), i);
        Ok(i)
    }

    /// The ids `defined` in their own file (a duplicate refused), then those `named` in
    /// other files that were not defined (added as new); each as (id, file, line), all in
    /// column `field`.
    pub(super) fn defined_then_named<'a>(
        what: &'static str,
        source: &'static str,
        field: &'static str,
        defined: impl IntoIterator<Item = (&'a str, &'static str, u64)>,
        named: impl IntoIterator<Item = (&'a str, &'static str, u64)>,
    ) -> Result<Ids> {
        let mut ids = Ids::new(what, source);
        for (id, file, line) in defined {
            ids.add_new(id, At(file, line, field))?;
        }
        for (id, file, line) in named {
            ids.add(id, At(file, line, field))?;
        }
        Ok(ids)
    }

    /// Adds `id` if new, pushing `new_row()` to `rows` (the table's rows of this kind, one per
    /// id in order) the first time; its index either way.
    pub(super) fn add_row<T>(
        &mut self,
        id: &str,
        at: At,
        rows: &mut Vec<T>,
        new_row: impl FnOnce() -> T,
    ) -> Result<Idx> {
        let i = self.add(id, at)?;
        if usize::from(i) == rows.len() {
            rows.push(new_row());
        }
        Ok(i)
    }

    /// Adds `id`, refusing a duplicate.
    pub(super) fn add_new(&mut self, id: &str, at: At) -> Result<Idx> {
        if self.get(id).is_some() {
            return Err(at.invalid(format!("duplicate {} id \"{id}\"", self.what)));
        }
        self.add(id, at)
    }

    /// The index of `id`, [`NONE`] when empty; an unknown id is an error naming the known ones.
    pub(super) fn resolve(
        &self,
        id: &str,
        file: &'static str,
        line: u64,
        field: &'static str,
    ) -> Result<Idx> {
        if id.is_empty() {
            return Ok(NONE);
        }
        self.get(id).ok_or_else(|| GtfsError::Unknown {
            file,
            line,
            field,
            what: self.what,
            value: id.to_string(),
            hint: self.hint(id),
        })
    }

    pub(super) fn hint(&self, id: &str) -> String {
        const SHOWN: usize = 10;
        let mut hint = if self.order.is_empty() {
            format!("({} has none)", self.source)
        } else if self.order.len() <= SHOWN {
            format!("({} has: {})", self.source, self.order.join(", "))
        } else {
            format!(
                "({} has: {}, ... {} in all)",
                self.source,
                self.order[..SHOWN].join(", "),
                self.order.len()
            )
        };
        let closest = self
            .order
            .iter()
            .map(|known| (edit_distance(id, known), known))
            .min_by_key(|(d, _)| *d);
        if let Some((d, known)) = closest {
            if d <= id.chars().count().max(known.chars().count()) / 2 {
                hint.push_str(&format!("; did you mean \"{known}\"?"));
            }
        }
        hint
    }
}

/// Levenshtein distance, case-insensitive (ids longer than 100 characters are just "far").
fn edit_distance(a: &str, b: &str) -> usize {
    if a.len() > 100 || b.len() > 100 {
        return usize::MAX;
    }
    let a: Vec<char> = a.chars().flat_map(char::to_lowercase).collect();
    let b: Vec<char> = b.chars().flat_map(char::to_lowercase).collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Sorted (code, index) pairs; two ids with one code are an error naming both.
pub(super) fn codes(
    ids: &[(String, u64)],
    file: &'static str,
    field: &'static str,
    what: &str,
) -> Result<Vec<(u32, Idx)>> {
    let mut seen: HashMap<u32, &str> = HashMap::new();
    let mut out = Vec::with_capacity(ids.len());
    for (i, (id, line)) in ids.iter().enumerate() {
        let code = code24(id);
        if let Some(other) = seen.insert(code, id) {
            return Err(GtfsError::Invalid {
                file,
                line: *line,
                field,
                message: format!(
                    "{what} ids \"{other}\" and \"{id}\" share the 24-bit card code {code:#08x}; rename one"
                ),
            });
        }
        let i = Idx::try_from(i).unwrap_or(NONE);
        out.push((code, i));
    }
    out.sort_unstable();
    Ok(out)
}

/// Compiles a loaded feed into a fare table: one function per file group, each resolving the
/// ids of the groups before it.
pub fn compile(feed: &Feed) -> Result<Table> {
    let v1 = feed.fare_products.is_empty() && !feed.fare_attributes.is_empty();
    let mut table = Table {
        meta: meta(feed, v1)?,
        ..Table::default()
    };
    if v1 {
        return super::v1::compile_v1(feed, table);
    }
    let networks = networks(feed)?;
    let areas = areas(feed)?;
    let groups = location_groups(feed)?;
    let stops = stops(feed, &areas, &mut table)
        .map_err(|e| named_a_location_group(e, &groups, "a stop"))?;
    location_group_stops(feed, &groups, &stops)?;
    routes(feed, &networks, &mut table)?;
    let services = services(feed, &mut table)?;
    let timeframes = timeframes(feed, &services, &mut table)?;
    let categories = categories(feed, &mut table)?;
    let media = media(feed, &mut table)?;
    let products = products(feed, &categories, &media, &mut table)?;
    let leg_groups = leg_rules(feed, &networks, &areas, &timeframes, &products, &mut table)
        .map_err(|e| named_a_location_group(e, &groups, "an area"))?;
    join_rules(feed, &networks, &stops, &mut table)
        .map_err(|e| named_a_location_group(e, &groups, "a stop"))?;
    transfer_rules(feed, &leg_groups, &products, &mut table)?;
    Ok(table)
}

/// The table's name, currency (one for the whole feed, from the file that prices:
/// `fare_products.txt`, or `fare_attributes.txt` for Fares v1) and validity.
fn meta(feed: &Feed, v1: bool) -> Result<Meta> {
    let currency = if v1 {
        single_currency(
            feed.fare_attributes.iter().map(|a| (&a.currency, a.line)),
            FARE_ATTRIBUTES,
            ["currency_type", "fare_id"],
            "fares",
        )?
    } else {
        single_currency(
            feed.fare_products.iter().map(|p| (&p.currency, p.line)),
            FARE_PRODUCTS,
            ["currency", "fare_product_id"],
            "fare products",
        )?
    };
    Ok(feed_meta(feed, currency, !v1 && feed.has_rule_priority))
}

/// The one currency of a file's priced rows (`(currency, line)`): a row in another currency
/// than the first is an error at its `field` (a table has a single currency), and so is a file
/// without rows (at `id_field`: it has no `what`).
fn single_currency<'a>(
    rows: impl IntoIterator<Item = (&'a String, u64)>,
    file: &'static str,
    [field, id_field]: [&'static str; 2],
    what: &str,
) -> Result<String> {
    let mut rows = rows.into_iter();
    let (first, first_line) = rows.next().ok_or_else(|| GtfsError::Invalid {
        file,
        line: 1,
        field: id_field,
        message: format!("the file has no {what}"),
    })?;
    if let Some((other, line)) = rows.find(|(c, _)| *c != first) {
        return Err(GtfsError::Invalid {
            file,
            line,
            field,
            message: format!(
                "currency {other} differs from {first} on line {first_line}; a table has a single currency"
            ),
        });
    }
    Ok(first.clone())
}

/// The table's header from the feed: named after its first named agency, valid over
/// `feed_info.txt`'s dates (open-ended where it gives none), in `currency`.
fn feed_meta(feed: &Feed, currency: String, priority_mode: bool) -> Meta {
    Meta {
        name: feed
            .agencies
            .iter()
            .map(|a| a.agency_name.as_str())
            .find(|n| !n.is_empty())
            .unwrap_or("GTFS feed")
            .to_string(),
        version: 1,
        currency_exponent: currency_exponent(&currency),
        currency,
        effective_from_day: feed
            .feed_info
            .as_ref()
            .and_then(|f| f.feed_start_date)
            .unwrap_or(i32::MIN / 2),
        effective_until_day: feed
            .feed_info
            .as_ref()
            .and_then(|f| f.feed_end_date)
            .map(|d| d.saturating_add(1)),
        day_start_s: 0,
        max_transfers: 255,
        priority_mode,
    }
}

/// Networks from networks.txt, routes.txt and route_networks.txt.
fn networks(feed: &Feed) -> Result<Ids> {
    let defined = at(&feed.networks, NETWORKS, |n| (&n.network_id, n.line));
    let routes = feed.routes.as_deref().unwrap_or(&[]);
    let on_routes = at(routes, ROUTES, |r| (&r.network_id, r.line)).filter(|n| !n.0.is_empty());
    let listed = at(&feed.route_networks, ROUTE_NETWORKS, |rn| {
        (&rn.network_id, rn.line)
    });
    let (what, source) = ("network", "networks.txt/routes.txt");
    Ids::defined_then_named(what, source, "network_id", defined, on_routes.chain(listed))
}

/// Areas from areas.txt and stop_areas.txt.
fn areas(feed: &Feed) -> Result<Ids> {
    let defined = at(&feed.areas, AREAS, |a| (&a.area_id, a.line));
    let named = at(&feed.stop_areas, STOP_AREAS, |sa| (&sa.area_id, sa.line));
    Ids::defined_then_named("area", AREAS, "area_id", defined, named)
}

/// Each of `rows` (of `file`) as `(id, file, line)`, its id and line as `id_line` reads them.
fn at<'a, R>(
    rows: &'a [R],
    file: &'static str,
    id_line: fn(&R) -> (&String, u64),
) -> impl Iterator<Item = (&'a str, &'static str, u64)> + 'a {
    rows.iter().map(move |r| {
        let (id, line) = id_line(r);
        (id.as_str(), file, line)
    })
}

/// Location groups (location_groups.txt): groups of stops where a rider may request pickup or
/// drop off. The reference gives them no part in fares — `fare_leg_rules.txt` names areas
/// (areas.txt, stop_areas.txt), `stop_areas.txt` and `fare_leg_join_rules.txt` name stops — so
/// they are only checked: ids unique, and none equal to a `stop_id` (the reference wants ids
/// unique across `stops.stop_id` and `location_groups.location_group_id`).
fn location_groups(feed: &Feed) -> Result<Ids> {
    let mut groups = Ids::new("location group", LOCATION_GROUPS);
    for g in &feed.location_groups {
        groups.add_new(
            &g.location_group_id,
            At(LOCATION_GROUPS, g.line, "location_group_id"),
        )?;
    }
    if let Some(stops) = &feed.stops {
        for g in &feed.location_groups {
            if let Some(s) = stops.iter().find(|s| s.stop_id == g.location_group_id) {
                return Err(GtfsError::Invalid {
                    file: LOCATION_GROUPS,
                    line: g.line,
                    field: "location_group_id",
                    message: format!(
                        "\"{}\" is also a stop_id (stops.txt line {}); the reference wants ids unique across stops.stop_id and location_groups.location_group_id",
                        g.location_group_id, s.line
                    ),
                });
            }
        }
    }
    Ok(groups)
}

/// location_group_stops.txt: each row names a location group and a stop (checked against
/// stops.txt when the feed has one), once.
fn location_group_stops(feed: &Feed, groups: &Ids, stops: &Ids) -> Result<()> {
    if feed.stops.is_none() {
        // The stops are those the fare files name: none may be a location group.
        for g in &feed.location_groups {
            if stops.get(&g.location_group_id).is_some() {
                return Err(GtfsError::Invalid {
                    file: LOCATION_GROUPS,
                    line: g.line,
                    field: "location_group_id",
                    message: format!(
                        "\"{}\" is a location group, but stop_areas.txt or fare_leg_join_rules.txt names it as a stop; the reference wants ids unique across stops.stop_id and location_groups.location_group_id",
                        g.location_group_id
                    ),
                });
            }
        }
    }
    let f = LOCATION_GROUP_STOPS;
    let mut seen: HashMap<(&str, &str), u64> = HashMap::new();
    for r in &feed.location_group_stops {
        groups.resolve(&r.location_group_id, f, r.line, "location_group_id")?;
        if feed.stops.is_some() {
            stops.resolve(&r.stop_id, f, r.line, "stop_id")?;
        }
        if let Some(first) = seen.insert((&r.location_group_id, &r.stop_id), r.line) {
            return Err(GtfsError::Invalid {
                file: f,
                line: r.line,
                field: "stop_id",
                message: format!(
                    "stop \"{}\" is already in location group \"{}\" (line {first})",
                    r.stop_id, r.location_group_id
                ),
            });
        }
    }
    Ok(())
}

/// An unknown area or stop that is a location group: said so, with what the field names.
fn named_a_location_group(e: GtfsError, groups: &Ids, names: &'static str) -> GtfsError {
    match e {
        GtfsError::Unknown {
            file,
            line,
            field,
            value,
            ..
        } if groups.get(&value).is_some() => GtfsError::Invalid {
            file,
            line,
            field,
            message: format!(
                "\"{value}\" is a location group (location_groups.txt), but {field} names {names}; location groups only say where on-demand service picks up and drops off, and no fare file names them (group its stops in an area: areas.txt, stop_areas.txt)"
            ),
        },
        e => e,
    }
}

/// Stops (from stops.txt, else those stop_areas.txt and join rules name), each in its own
/// areas and its parent stations'.
fn stops(feed: &Feed, areas: &Ids, table: &mut Table) -> Result<Ids> {
    let mut stops = Ids::new("stop", STOPS);
    let mut stop_lines: Vec<(String, u64)> = Vec::new();
    let mut parents: Vec<Idx> = Vec::new();
    match &feed.stops {
        Some(rows) => {
            for s in rows {
                stops.add_new(&s.stop_id, At(STOPS, s.line, "stop_id"))?;
                stop_lines.push((s.stop_id.clone(), s.line));
            }
            for s in rows {
                parents.push(stops.resolve(&s.parent_station, STOPS, s.line, "parent_station")?);
            }
        }
        None => {
            let named = feed
                .stop_areas
                .iter()
                .map(|sa| (&sa.stop_id, STOP_AREAS, sa.line, "stop_id"))
                .chain(feed.fare_leg_join_rules.iter().flat_map(|j| {
                    [
                        (&j.from_stop_id, FARE_LEG_JOIN_RULES, j.line, "from_stop_id"),
                        (&j.to_stop_id, FARE_LEG_JOIN_RULES, j.line, "to_stop_id"),
                    ]
                }));
            for (id, file, line, field) in named {
                if !id.is_empty() && stops.get(id).is_none() {
                    stops.add(id, At(file, line, field))?;
                    stop_lines.push((id.clone(), line));
                    parents.push(NONE);
                }
            }
        }
    }
    let mut direct_areas: Vec<BTreeSet<Idx>> = vec![BTreeSet::new(); stops.order.len()];
    for sa in &feed.stop_areas {
        let stop = stops.resolve(&sa.stop_id, STOP_AREAS, sa.line, "stop_id")?;
        let area = areas.resolve(&sa.area_id, STOP_AREAS, sa.line, "area_id")?;
        if let Some(set) = direct_areas.get_mut(usize::from(stop)) {
            set.insert(area);
        }
    }
    for (i, (id, _)) in stop_lines.iter().enumerate() {
        // The stop's own areas and those of its parent station(s), guarding against cycles.
        let mut set = direct_areas.get(i).cloned().unwrap_or_default();
        let mut parent = parents.get(i).copied().unwrap_or(NONE);
        let mut hops = 0;
        while parent != NONE && hops < 8 {
            if let Some(p) = direct_areas.get(usize::from(parent)) {
                set.extend(p.iter().copied());
            }
            parent = parents.get(usize::from(parent)).copied().unwrap_or(NONE);
            hops += 1;
        }
        table.stops.push(Stop {
            id: id.clone(),
            code: code24(id),
            areas: set.into_iter().collect(),
        });
    }
    table.stop_codes = codes(&stop_lines, STOPS, "stop_id", "stop")?;
    Ok(stops)
}

/// Routes (from routes.txt, else route_networks.txt), each in one network.
fn routes(feed: &Feed, networks: &Ids, table: &mut Table) -> Result<()> {
    let mut routes = Ids::new("route", ROUTES);
    let mut route_lines: Vec<(String, u64)> = Vec::new();
    let mut route_network: Vec<(Idx, u64, &'static str)> = Vec::new();
    match &feed.routes {
        Some(rows) => {
            for r in rows {
                routes.add_new(&r.route_id, At(ROUTES, r.line, "route_id"))?;
                route_lines.push((r.route_id.clone(), r.line));
                let n = networks.resolve(&r.network_id, ROUTES, r.line, "network_id")?;
                route_network.push((n, r.line, ROUTES));
            }
        }
        None => {
            for rn in &feed.route_networks {
                if routes.get(&rn.route_id).is_none() {
                    routes.add(&rn.route_id, At(ROUTE_NETWORKS, rn.line, "route_id"))?;
                    route_lines.push((rn.route_id.clone(), rn.line));
                    route_network.push((NONE, rn.line, ROUTE_NETWORKS));
                }
            }
        }
    }
    for rn in &feed.route_networks {
        let r = routes.resolve(&rn.route_id, ROUTE_NETWORKS, rn.line, "route_id")?;
        let n = networks.resolve(&rn.network_id, ROUTE_NETWORKS, rn.line, "network_id")?;
        if let Some(slot) = route_network.get_mut(usize::from(r)) {
            if slot.0 != NONE && slot.0 != n {
                let other = networks
                    .order
                    .get(usize::from(slot.0))
                    .cloned()
                    .unwrap_or_default();
                return Err(GtfsError::Invalid {
                    file: ROUTE_NETWORKS,
                    line: rn.line,
                    field: "network_id",
                    message: format!(
                        "route \"{}\" is already in network \"{other}\" ({} line {}); a route has one network",
                        rn.route_id, slot.2, slot.1
                    ),
                });
            }
            *slot = (n, rn.line, ROUTE_NETWORKS);
        }
    }
    for (i, (id, _)) in route_lines.iter().enumerate() {
        table.routes.push(Route {
            id: id.clone(),
            code: code24(id),
            network: route_network.get(i).map_or(NONE, |n| n.0),
            chainage: Vec::new(),
        });
    }
    table.route_codes = codes(&route_lines, ROUTES, "route_id", "route")?;
    Ok(())
}

/// Services from calendar.txt and calendar_dates.txt.
fn services(feed: &Feed, table: &mut Table) -> Result<Ids> {
    let mut services = Ids::new("service", "calendar.txt/calendar_dates.txt");
    for c in &feed.calendar {
        services.add_new(&c.service_id, At(CALENDAR, c.line, "service_id"))?;
        table.services.push(Service {
            id: c.service_id.clone(),
            weekdays: c.weekdays,
            start_day: Some(c.start_day),
            end_day: Some(c.end_day),
            added: Vec::new(),
            removed: Vec::new(),
        });
    }
    for d in &feed.calendar_dates {
        let at = At(CALENDAR_DATES, d.line, "service_id");
        let i = services.add_row(&d.service_id, at, &mut table.services, || Service {
            id: d.service_id.clone(),
            ..Service::default()
        })?;
        if let Some(s) = table.services.get_mut(usize::from(i)) {
            let (list, other) = if d.exception_type == 1 {
                (&mut s.added, &s.removed)
            } else {
                (&mut s.removed, &s.added)
            };
            if other.contains(&d.day) {
                return Err(GtfsError::Invalid {
                    file: CALENDAR_DATES,
                    line: d.line,
                    field: "date",
                    message: format!(
                        "service \"{}\" both adds and removes this date",
                        d.service_id
                    ),
                });
            }
            list.push(d.day);
        }
    }
    for s in &mut table.services {
        s.added.sort_unstable();
        s.added.dedup();
        s.removed.sort_unstable();
        s.removed.dedup();
    }
    Ok(services)
}

/// Timeframe groups from timeframes.txt.
fn timeframes(feed: &Feed, services: &Ids, table: &mut Table) -> Result<Ids> {
    let mut timeframes = Ids::new("timeframe group", TIMEFRAMES);
    for t in &feed.timeframes {
        let at = At(TIMEFRAMES, t.line, "timeframe_group_id");
        let g = timeframes.add_row(&t.timeframe_group_id, at, &mut table.timeframes, || {
            TimeframeGroup {
                id: t.timeframe_group_id.clone(),
                spans: Vec::new(),
            }
        })?;
        let service = services.resolve(&t.service_id, TIMEFRAMES, t.line, "service_id")?;
        if let Some(group) = table.timeframes.get_mut(usize::from(g)) {
            group.spans.push(Timeframe {
                start_s: t.start_s,
                end_s: t.end_s,
                service,
            });
        }
    }
    Ok(timeframes)
}

/// Rider categories (one default at most).
fn categories(feed: &Feed, table: &mut Table) -> Result<Ids> {
    let mut categories = Ids::new("rider category", RIDER_CATEGORIES);
    let mut default_line: Option<u64> = None;
    for c in &feed.rider_categories {
        if c.is_default_fare_category {
            if let Some(first) = default_line {
                return Err(GtfsError::Invalid {
                    file: RIDER_CATEGORIES,
                    line: c.line,
                    field: "is_default_fare_category",
                    message: format!(
                        "a second default rider category (the first is on line {first})"
                    ),
                });
            }
            default_line = Some(c.line);
        }
        categories.add_new(
            &c.rider_category_id,
            At(RIDER_CATEGORIES, c.line, "rider_category_id"),
        )?;
        table.categories.push(Category {
            id: c.rider_category_id.clone(),
            default: c.is_default_fare_category,
            surcharge_percent: 100,
        });
    }
    Ok(categories)
}

/// Fare media.
fn media(feed: &Feed, table: &mut Table) -> Result<Ids> {
    let mut media = Ids::new("fare medium", FARE_MEDIA);
    for m in &feed.fare_media {
        media.add_new(&m.fare_media_id, At(FARE_MEDIA, m.line, "fare_media_id"))?;
        table.media.push(Named {
            id: m.fare_media_id.clone(),
            explicit: feed
                .fare_products
                .iter()
                .any(|p| p.fare_media_id == m.fare_media_id),
            explicit_to: false,
        });
    }
    Ok(media)
}

/// Fare products, one price per (product, rider category, medium).
fn products(feed: &Feed, categories: &Ids, media: &Ids, table: &mut Table) -> Result<Ids> {
    let mut products = Ids::new("fare product", FARE_PRODUCTS);
    let mut price_lines: HashMap<(Idx, Idx, Idx), u64> = HashMap::new();
    for p in &feed.fare_products {
        let at = At(FARE_PRODUCTS, p.line, "fare_product_id");
        let i = products.add_row(&p.fare_product_id, at, &mut table.products, || Product {
            id: p.fare_product_id.clone(),
            name: String::new(),
            prices: Vec::new(),
        })?;
        let category = categories.resolve(
            &p.rider_category_id,
            FARE_PRODUCTS,
            p.line,
            "rider_category_id",
        )?;
        let medium = media.resolve(&p.fare_media_id, FARE_PRODUCTS, p.line, "fare_media_id")?;
        if let Some(first) = price_lines.insert((i, category, medium), p.line) {
            return Err(GtfsError::Invalid {
                file: FARE_PRODUCTS,
                line: p.line,
                field: "fare_product_id",
                message: format!(
                    "product \"{}\" already has a price for this rider category and fare medium (line {first})",
                    p.fare_product_id
                ),
            });
        }
        if let Some(product) = table.products.get_mut(usize::from(i)) {
            if product.name.is_empty() {
                product.name.clone_from(&p.fare_product_name);
            }
            product.prices.push(Price {
                category,
                medium,
                amount_minor: p.amount_minor,
            });
        }
    }
    Ok(products)
}

/// Leg groups and leg rules; the networks and areas, marked explicit where a rule names them.
fn leg_rules(
    feed: &Feed,
    networks: &Ids,
    areas: &Ids,
    timeframes: &Ids,
    products: &Ids,
    table: &mut Table,
) -> Result<Ids> {
    let mut leg_groups = Ids::new("leg group", FARE_LEG_RULES);
    for r in &feed.fare_leg_rules {
        if !r.leg_group_id.is_empty() {
            leg_groups.add(&r.leg_group_id, At(FARE_LEG_RULES, r.line, "leg_group_id"))?;
        }
    }
    for id in &leg_groups.order {
        table.leg_groups.push(Named {
            id: id.clone(),
            // Per column: an empty from (to) group matches the groups no rule names as from (to).
            explicit: feed
                .fare_transfer_rules
                .iter()
                .any(|t| &t.from_leg_group_id == id),
            explicit_to: feed
                .fare_transfer_rules
                .iter()
                .any(|t| &t.to_leg_group_id == id),
        });
    }
    let mut network_explicit = vec![false; networks.order.len()];
    let mut area_explicit = vec![false; areas.order.len()];
    let mut area_explicit_to = vec![false; areas.order.len()];
    for r in &feed.fare_leg_rules {
        let f = FARE_LEG_RULES;
        let network = networks.resolve(&r.network_id, f, r.line, "network_id")?;
        let from_area = areas.resolve(&r.from_area_id, f, r.line, "from_area_id")?;
        let to_area = areas.resolve(&r.to_area_id, f, r.line, "to_area_id")?;
        let from_timeframe = timeframes.resolve(
            &r.from_timeframe_group_id,
            f,
            r.line,
            "from_timeframe_group_id",
        )?;
        let to_timeframe =
            timeframes.resolve(&r.to_timeframe_group_id, f, r.line, "to_timeframe_group_id")?;
        let product = products.resolve(&r.fare_product_id, f, r.line, "fare_product_id")?;
        mark(&mut network_explicit, network);
        mark(&mut area_explicit, from_area);
        mark(&mut area_explicit_to, to_area);
        table.leg_rules.push(LegRule {
            origin: format!("{f}:{}", r.line),
            leg_group: leg_groups.resolve(&r.leg_group_id, f, r.line, "leg_group_id")?,
            network,
            from_area,
            to_area,
            from_timeframe,
            to_timeframe,
            product,
            pricing: Pricing::Product,
            priority: r.rule_priority.unwrap_or(0),
        });
    }
    table.networks = networks
        .order
        .iter()
        .zip(&network_explicit)
        .map(|(id, &explicit)| Network {
            id: id.clone(),
            explicit,
            tap_out: None,
        })
        .collect();
    table.areas = areas
        .order
        .iter()
        .zip(area_explicit.iter().zip(&area_explicit_to))
        .map(|(id, (&explicit, &explicit_to))| Named {
            id: id.clone(),
            explicit,
            explicit_to,
        })
        .collect();
    Ok(leg_groups)
}

/// Leg join rules.
fn join_rules(feed: &Feed, networks: &Ids, stops: &Ids, table: &mut Table) -> Result<()> {
    for j in &feed.fare_leg_join_rules {
        let f = FARE_LEG_JOIN_RULES;
        table.join_rules.push(JoinRule {
            from_network: networks.resolve(&j.from_network_id, f, j.line, "from_network_id")?,
            to_network: networks.resolve(&j.to_network_id, f, j.line, "to_network_id")?,
            from_stop: stops.resolve(&j.from_stop_id, f, j.line, "from_stop_id")?,
            to_stop: stops.resolve(&j.to_stop_id, f, j.line, "to_stop_id")?,
        });
    }
    Ok(())
}

/// Transfer rules.
fn transfer_rules(feed: &Feed, leg_groups: &Ids, products: &Ids, table: &mut Table) -> Result<()> {
    for t in &feed.fare_transfer_rules {
        let f = FARE_TRANSFER_RULES;
        let transfer_count = match t.transfer_count {
            Some(n) if n >= 1 => Some(u16::try_from(n).map_err(|_| GtfsError::Invalid {
                file: f,
                line: t.line,
                field: "transfer_count",
                message: format!(
                    "{n} is more transfers than supported (at most {})",
                    u16::MAX
                ),
            })?),
            _ => None,
        };
        let duration_from = match t.duration_limit_type {
            Some(1) => DurationFrom::DepartureToDeparture,
            Some(2) => DurationFrom::ArrivalToDeparture,
            Some(3) => DurationFrom::ArrivalToArrival,
            _ => DurationFrom::DepartureToArrival,
        };
        let kind = match t.fare_transfer_type {
            0 => TransferKind::FromLegPlusTransfer,
            1 => TransferKind::FromLegPlusTransferPlusToLeg,
            _ => TransferKind::TransferOnly,
        };
        table.transfer_rules.push(TransferRule {
            origin: format!("{f}:{}", t.line),
            from_group: leg_groups.resolve(&t.from_leg_group_id, f, t.line, "from_leg_group_id")?,
            to_group: leg_groups.resolve(&t.to_leg_group_id, f, t.line, "to_leg_group_id")?,
            transfer_count,
            duration_limit_s: t.duration_limit,
            duration_from,
            kind,
            product: products.resolve(&t.fare_product_id, f, t.line, "fare_product_id")?,
            at_timeframe: NONE,
        });
    }
    Ok(())
}

fn mark(flags: &mut [bool], i: Idx) {
    if let Some(flag) = flags.get_mut(usize::from(i)) {
        *flag = true;
    }
}
