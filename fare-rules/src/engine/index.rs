//! Building an engine: the table validated index by index, and the lookups by id, by card
//! code and by time (services, timeframes, effective dates).

use super::*;

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
        index_by_id(&self.table.categories, id, |c| &c.id)
    }

    /// Medium index by id.
    pub fn medium(&self, id: &str) -> Option<Idx> {
        index_by_id(&self.table.media, id, |m| &m.id)
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
}

/// The index of the entry of `items` whose id (`id_of`) is `id`.
fn index_by_id<T>(items: &[T], id: &str, id_of: impl Fn(&T) -> &String) -> Option<Idx> {
    items.iter().position(|x| id_of(x) == id).map(|i| i as Idx)
}

fn lookup(codes: &[(u32, Idx)], code: u32) -> Option<Idx> {
    codes
        .binary_search_by_key(&code, |&(c, _)| c)
        .ok()
        .map(|i| codes[i].1)
}

/// Where in the table an index is, said only for an error.
type Place<'a> = &'a dyn Fn() -> String;

/// A required index: `i` must point into a list of `len`.
fn req(what: &'static str, i: Idx, len: usize, place: Place) -> Result<(), TableError> {
    if usize::from(i) >= len {
        Err(TableError::BadIndex {
            what,
            index: i,
            place: place(),
        })
    } else {
        Ok(())
    }
}

/// An optional index: [`NONE`], or one [`req`] accepts.
fn chk(what: &'static str, i: Idx, len: usize, place: Place) -> Result<(), TableError> {
    if i == NONE {
        Ok(())
    } else {
        req(what, i, len, place)
    }
}

fn validate(t: &Table) -> Result<(), TableError> {
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
            req("area", a, t.areas.len(), &|| format!("stop {}", s.id))?;
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
    validate_codes(t)
}

/// The card codes of stops and routes: one sorted, unique entry per stop and per route.
fn validate_codes(t: &Table) -> Result<(), TableError> {
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
