//! The planners' source format (TOML) and its compiler into a [`Table`].
//!
//! The format is documented with complete examples in docs/fare-rules.md. Every error names the
//! file, the line and the field, and says what would be accepted; names that do not resolve get
//! the closest existing name as a suggestion.

use crate::table::*;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use toml::Spanned;

/// An error in a fare source file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    /// The TOML itself, or a value's form (toml's message carries line and column).
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    /// A value that is well-formed but wrong.
    #[error("{file} line {line}, field {field}: {message}")]
    Field {
        file: String,
        line: usize,
        field: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Value types with their own parsing (so toml reports line and column for a bad form).

/// An amount in minor units (whole numbers only; at most 16,777,215 so it fits a card record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Money(pub u32);

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let form = Form::new("an amount in whole minor units, e.g. 1250 for 12.50", |v| {
            Err(format!(
                "amount \"{v}\" must be a number of minor units without quotes, e.g. 1250"
            ))
        })
        .int(|v| {
            if (0..=0x00ff_ffff).contains(&v) {
                Ok(Money(v as u32))
            } else {
                Err(format!(
                    "amount {v} is out of range: 0 to 16777215 minor units"
                ))
            }
        })
        .float(|v| {
            Err(format!(
                "amount {v} is not whole minor units: money is never fractional here, \
                 write {} for {v}",
                (v * 100.0).round() as i64
            ))
        });
        d.deserialize_any(form)
    }
}

/// How a value type of the source reads, for serde: what it expects, what it makes of a
/// string, and its own answer to an integer, a float or a table where it has one (else serde's
/// "invalid type: …, expected …", as for any other form). The one visitor of these types.
struct Form<T> {
    expecting: &'static str,
    string: fn(&str) -> Result<T, String>,
    int: Option<fn(i64) -> Result<T, String>>,
    float: Option<fn(f64) -> Result<T, String>>,
    table: Option<&'static str>,
}

impl<T> Form<T> {
    fn new(expecting: &'static str, string: fn(&str) -> Result<T, String>) -> Self {
        Form {
            expecting,
            string,
            int: None,
            float: None,
            table: None,
        }
    }

    fn int(self, int: fn(i64) -> Result<T, String>) -> Self {
        Form {
            int: Some(int),
            ..self
        }
    }

    fn float(self, float: fn(f64) -> Result<T, String>) -> Self {
        Form {
            float: Some(float),
            ..self
        }
    }

    /// A table (how toml hands over a bare date) is refused with `why`.
    fn table(self, why: &'static str) -> Self {
        Form {
            table: Some(why),
            ..self
        }
    }
}

impl<'de, T> Visitor<'de> for Form<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.string)(v).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        match self.int {
            Some(int) => int(v).map_err(E::custom),
            None => Err(E::invalid_type(de::Unexpected::Signed(v), &self)),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        match self.float {
            Some(float) => float(v).map_err(E::custom),
            None => Err(E::invalid_type(de::Unexpected::Float(v), &self)),
        }
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _m: A) -> Result<T, A::Error> {
        match self.table {
            Some(why) => Err(de::Error::custom(why)),
            None => Err(de::Error::invalid_type(de::Unexpected::Map, &self)),
        }
    }
}

fn parse_duration_s(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("a duration may not be empty; write e.g. \"30m\"".into());
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any_unit = false;
    for ch in t.chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let mult = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            ' ' => continue,
            _ => {
                return Err(format!(
                    "duration \"{s}\": unknown unit '{ch}'; use s, m, h or d, e.g. \"90m\" or \"1h30m\""
                ))
            }
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration \"{s}\": a number must come before '{ch}'"))?;
        total += n * mult;
        num.clear();
        any_unit = true;
    }
    if !num.is_empty() {
        return Err(if any_unit {
            format!("duration \"{s}\": \"{num}\" at the end needs a unit, e.g. \"{num}m\"")
        } else {
            format!("duration \"{s}\" needs a unit, e.g. \"{num}m\"")
        });
    }
    u32::try_from(total).map_err(|_| format!("duration \"{s}\" is too long"))
}

/// A duration such as "90m", "2h", "1h30m", "30d".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub u32);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let form = Form::new("a duration with a unit, e.g. \"90m\"", |v| {
            parse_duration_s(v).map(Dur)
        })
        .int(|v| Err(format!("\"{v}\" needs a unit, e.g. \"{v}m\"")));
        d.deserialize_any(form)
    }
}

fn parse_distance_m(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("km") {
        (n.trim(), 1000u64)
    } else if let Some(n) = t.strip_suffix('m') {
        (n.trim(), 1)
    } else {
        return Err(format!(
            "distance \"{s}\" needs a unit, e.g. \"10km\" or \"500m\""
        ));
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let bad =
        || format!("distance \"{s}\" is not a number with a unit, e.g. \"10km\" or \"2.5km\"");
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || (mult == 1 && !frac.is_empty()) {
        return Err(bad());
    }
    if frac.len() > 3 {
        return Err(format!(
            "distance \"{s}\": at most metre precision (3 decimals of km)"
        ));
    }
    let i: u64 = int.parse().map_err(|_| bad())?;
    let mut f: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    for _ in frac.len()..3 {
        f *= 10;
    }
    let m = if mult == 1000 { i * 1000 + f } else { i };
    u32::try_from(m).map_err(|_| format!("distance \"{s}\" is too long"))
}

/// A distance such as "10km", "2.5km", "800m".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dist(pub u32);

impl<'de> Deserialize<'de> for Dist {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let form = Form::new("a distance with a unit, e.g. \"10km\"", |v| {
            parse_distance_m(v).map(Dist)
        })
        .int(|v| {
            Err(format!(
                "distance {v} needs a unit, e.g. \"{v}m\" or \"{v}km\""
            ))
        })
        .float(|v| Err(format!("distance {v} needs a unit, e.g. \"{v}km\"")));
        d.deserialize_any(form)
    }
}

fn parse_clock_s(s: &str) -> Result<u32, String> {
    let bad = || format!("time of day \"{s}\" must be HH:MM (00:00 to 24:00), e.g. \"07:30\"");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if m > 59 || h > 24 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

/// A time of day "HH:MM".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock(pub u32);

impl<'de> Deserialize<'de> for Clock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_clock_s(&s).map(Clock).map_err(de::Error::custom)
    }
}

/// Days since 1970-01-01 of a "YYYY-MM-DD" date.
pub fn parse_day(s: &str) -> Result<i32, String> {
    let d = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .map_err(|_| format!("date \"{s}\" must be YYYY-MM-DD, e.g. \"2026-12-01\""))?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    Ok((d - epoch).num_days() as i32)
}

/// A date "YYYY-MM-DD" (as a string).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Day(pub i32);

impl<'de> Deserialize<'de> for Day {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let form = Form::new("a date as a string, e.g. \"2026-12-01\"", |v| {
            parse_day(v).map(Day)
        })
        .table("write the date in quotes, e.g. \"2026-12-01\" (a bare TOML date is not used)");
        d.deserialize_any(form)
    }
}

fn parse_days(s: &str) -> Result<u8, String> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let idx = |n: &str| {
        NAMES.iter().position(|x| *x == n).ok_or_else(|| {
            format!("days \"{s}\": \"{n}\" is not a day; use mon … sun, a range \"mon-fri\", or daily/weekdays/weekends")
        })
    };
    let t = s.trim().to_ascii_lowercase();
    match t.as_str() {
        "daily" | "all" => return Ok(0x7f),
        "weekdays" => return Ok(0x1f),
        "weekends" => return Ok(0x60),
        _ => {}
    }
    let mut mask = 0u8;
    for part in t.split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (idx(a.trim())?, idx(b.trim())?);
            let mut i = a;
            loop {
                mask |= 1 << i;
                if i == b {
                    break;
                }
                i = (i + 1) % 7;
            }
        } else {
            mask |= 1 << idx(part)?;
        }
    }
    Ok(mask)
}

/// Days of the week: "mon-fri", "sat,sun", "daily", "weekdays", "weekends".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Days(pub u8);

impl<'de> Deserialize<'de> for Days {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_days(&s).map(Days).map_err(de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// The source schema.

type Name = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Src {
    table: SrcMeta,
    #[serde(default)]
    categories: BTreeMap<String, SrcCategory>,
    #[serde(default)]
    media: BTreeMap<String, SrcMedium>,
    #[serde(default)]
    timeframes: BTreeMap<String, Vec<Spanned<SrcSpan>>>,
    #[serde(default)]
    networks: BTreeMap<String, SrcNetwork>,
    #[serde(default)]
    routes: Vec<Spanned<SrcRoute>>,
    #[serde(default)]
    areas: BTreeMap<String, Vec<Name>>,
    #[serde(default)]
    products: BTreeMap<String, Spanned<SrcProduct>>,
    #[serde(default)]
    fares: Vec<Spanned<SrcFare>>,
    #[serde(default)]
    transfers: Vec<Spanned<SrcTransfer>>,
    #[serde(default)]
    joins: Vec<Spanned<SrcJoin>>,
    #[serde(default)]
    caps: Vec<Spanned<SrcCap>>,
    #[serde(default)]
    passes: Vec<Spanned<SrcPass>>,
    #[serde(default)]
    charges: Vec<Spanned<SrcCharge>>,
    #[serde(default)]
    coupons: Vec<Spanned<SrcCoupon>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcMeta {
    name: String,
    version: u32,
    currency: Spanned<String>,
    effective_from: Day,
    effective_until: Option<Day>,
    day_starts_at: Option<Clock>,
    max_transfers: Option<u8>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SrcCategory {
    #[serde(default)]
    default: bool,
    /// Percentage of the default price this category pays where a product gives no price.
    percent: Option<u16>,
    /// Percentage of distance surcharges (default: `percent`).
    surcharge_percent: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SrcMedium {
    #[allow(dead_code)] // documentation for planners; not needed on devices
    name: Option<String>,
    /// The medium assumed when a rider's is not known.
    #[serde(default)]
    default: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcSpan {
    days: Option<Days>,
    from: Option<Clock>,
    to: Option<Clock>,
    /// Calendar bounds (inclusive).
    start: Option<Day>,
    end: Option<Day>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SrcNetwork {
    tap_out: Option<SrcTapOut>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcTapOut {
    penalty: Money,
    max_trip: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcRoute {
    id: String,
    network: Name,
    stops: Vec<Name>,
    /// Distance of each stop along the route (same length as `stops`).
    at: Option<Vec<Dist>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcProduct {
    name: Option<String>,
    price: Option<Money>,
    /// Another product's price plus `add`.
    like: Option<Name>,
    add: Option<Money>,
    #[serde(default)]
    by_category: BTreeMap<String, Money>,
    #[serde(default)]
    by_medium: BTreeMap<String, Money>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcDistance {
    base: Dist,
    #[serde(default)]
    bands: Vec<SrcBand>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcBand {
    upto: Option<Dist>,
    every: Dist,
    add: Money,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcFare {
    id: String,
    network: Option<Name>,
    group: Option<String>,
    from_zone: Option<Name>,
    to_zone: Option<Name>,
    timeframe: Option<Name>,
    arrive_timeframe: Option<Name>,
    price: Option<Money>,
    product: Option<Name>,
    /// Origin–destination table: [from zone, to zone, price].
    od: Option<Vec<(Name, Name, Money)>>,
    /// Whether `od` entries price the reverse direction too (default true).
    symmetric: Option<bool>,
    distance: Option<SrcDistance>,
    #[serde(default)]
    priority: i32,
}

/// One name or a list of names.
struct Names(Vec<String>);

impl<'de> Deserialize<'de> for Names {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Names;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a name or a list of names, e.g. \"bus\" or [\"metro\", \"bus\"]")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Names, E> {
                Ok(Names(vec![v.to_string()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Names, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<String>()? {
                    v.push(x);
                }
                if v.is_empty() {
                    return Err(de::Error::custom("the list of names is empty"));
                }
                Ok(Names(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Names {
    /// Each name with the span of the whole field (for errors).
    fn list(field: &Spanned<Names>) -> Vec<Name> {
        field
            .get_ref()
            .0
            .iter()
            .map(|n| Spanned::new(field.span(), n.clone()))
            .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcTransfer {
    from: Spanned<Names>,
    to: Spanned<Names>,
    within: Option<Dur>,
    measured: Option<Spanned<String>>,
    max: Option<u16>,
    pricing: Option<Spanned<String>>,
    cost: Option<Money>,
    during: Option<Name>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcJoin {
    from_network: Name,
    to_network: Name,
    from_stop: Option<Name>,
    to_stop: Option<Name>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcCap {
    id: Option<String>,
    period: Spanned<String>,
    amount: Option<Money>,
    trips: Option<u8>,
    categories: Option<Vec<Name>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcPass {
    id: String,
    code: u16,
    price: Money,
    validity: Dur,
    #[serde(default)]
    networks: Vec<Name>,
    category: Option<Name>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcCharge {
    id: String,
    code: u16,
    per_item: Option<Money>,
    per_hour: Option<Money>,
    day_cap: Option<Money>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrcCoupon {
    id: String,
    code: u16,
    value: Option<Money>,
    percent: Option<u8>,
    expires: Option<Day>,
    #[serde(default)]
    single_use: bool,
}

// ---------------------------------------------------------------------------------------------
// The compiler.

/// The closest of `names` to `wanted` (edit distance), for "did you mean" suggestions.
pub fn closest<'a>(wanted: &str, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    fn lev(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1; b.len() + 1];
            for (j, cb) in b.iter().enumerate() {
                cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }
    names
        .into_iter()
        .map(|n| (lev(wanted, n), n))
        .filter(|(d, n)| *d <= (n.len().max(wanted.len()) / 2).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// Where a `[section]` header is in the source (0 if absent), for errors about a section.
fn section(src: &str, header: &str) -> usize {
    src.find(&format!("\n{header}"))
        .map(|i| i + 1)
        .or_else(|| src.starts_with(header).then_some(0))
        .unwrap_or(0)
}

struct Cx<'s> {
    file: &'s str,
    /// Byte offsets where each line after the first begins (line numbers by binary search).
    line_starts: Vec<usize>,
}

impl Cx<'_> {
    fn line(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= offset) + 1
    }
    fn err(&self, offset: usize, field: &str, message: String) -> SourceError {
        SourceError::Field {
            file: self.file.to_string(),
            line: self.line(offset),
            field: field.to_string(),
            message,
        }
    }
    /// Resolves `name` in `ids`, or an error with a suggestion.
    fn resolve(
        &self,
        name: &Name,
        field: &str,
        kind: &str,
        ids: &HashMap<String, Idx>,
    ) -> Result<Idx, SourceError> {
        if let Some(&i) = ids.get(name.get_ref()) {
            return Ok(i);
        }
        let hint = match closest(name.get_ref(), ids.keys().map(String::as_str)) {
            Some(c) => format!("; did you mean \"{c}\"?"),
            None if ids.is_empty() => format!("; no {kind} is defined"),
            None => String::new(),
        };
        Err(self.err(
            name.span().start,
            field,
            format!("unknown {kind} \"{}\"{hint}", name.get_ref()),
        ))
    }
}

fn index_of(names: &[String]) -> HashMap<String, Idx> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i as Idx))
        .collect()
}

/// Compiles TOML fare rules (`file` names the source in errors).
///
/// One function per source section, in the order the sections may refer to each other:
/// table, categories, media, timeframes, networks, routes, areas, joins, products, fares,
/// transfers, caps, passes, charges, coupons.
pub fn compile(file: &str, src: &str) -> Result<Table, SourceError> {
    let s: Src = toml::from_str(src).map_err(|e| SourceError::Syntax {
        file: file.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let mut c = Compiler {
        cx: Cx {
            file,
            line_starts: src
                .bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1)
                .collect(),
        },
        src,
        t: Table::default(),
        cats: Vec::new(),
        ids: Ids::default(),
        service_ids: HashMap::new(),
    };
    c.meta(&s.table)?;
    c.categories(&s.categories)?;
    c.media(&s.media)?;
    c.timeframes(&s.timeframes)?;
    c.networks(&s.networks);
    c.routes(&s.routes)?;
    c.areas(&s.areas);
    c.joins(&s.joins)?;
    c.products(&s.products)?;
    c.fares(&s.fares)?;
    c.transfers(&s.transfers)?;
    c.caps(&s.caps)?;
    let mut codes = HashMap::new();
    c.passes(&s.passes, &mut codes)?;
    c.charges(&s.charges, &mut codes)?;
    c.coupons(&s.coupons, &mut codes)?;
    let mut t = c.t;
    finish_codes(&mut t).map_err(|m| SourceError::Field {
        file: file.to_string(),
        line: 1,
        field: "stops".into(),
        message: m,
    })?;
    Ok(t)
}

/// The ids each section defines, by name, for the sections after it to resolve.
#[derive(Default)]
struct Ids {
    categories: HashMap<String, Idx>,
    media: HashMap<String, Idx>,
    timeframes: HashMap<String, Idx>,
    networks: HashMap<String, Idx>,
    /// Stops in order of first mention (routes, then areas).
    stops: HashMap<String, Idx>,
    areas: HashMap<String, Idx>,
    products: HashMap<String, Idx>,
    /// Fare groups (a fare's `group`, else its id).
    groups: HashMap<String, Idx>,
}

/// Codes of passes (kind 0), charges (1) and coupons (2), with the id that took each.
type Codes = HashMap<(u8, u16), String>;

/// The table being compiled, with what the sections compiled so far define.
struct Compiler<'s> {
    cx: Cx<'s>,
    src: &'s str,
    t: Table,
    /// Rider categories in table order with the percentage of the default price each pays.
    cats: Vec<(String, u16)>,
    ids: Ids,
    /// One service per distinct (days, start, end).
    service_ids: HashMap<(u8, Option<i32>, Option<i32>), Idx>,
}

impl Compiler<'_> {
    fn meta(&mut self, m: &SrcMeta) -> Result<(), SourceError> {
        let currency = m.currency.get_ref().clone();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(self.cx.err(
                m.currency.span().start,
                "table.currency",
                format!("\"{currency}\" is not an ISO 4217 code, e.g. \"KRW\" or \"USD\""),
            ));
        }
        self.t.meta = Meta {
            name: m.name.clone(),
            version: m.version,
            currency_exponent: currency_exponent(&currency),
            currency,
            effective_from_day: m.effective_from.0,
            effective_until_day: m.effective_until.map(|d| d.0),
            day_start_s: m.day_starts_at.map_or(0, |c| c.0),
            max_transfers: m.max_transfers.unwrap_or(4),
            priority_mode: true,
        };
        if let Some(u) = self.t.meta.effective_until_day {
            if u <= self.t.meta.effective_from_day {
                return Err(self.cx.err(
                    section(self.src, "[table]"),
                    "table.effective_until",
                    "the table must end after it begins".into(),
                ));
            }
        }
        Ok(())
    }

    fn categories(&mut self, src: &BTreeMap<String, SrcCategory>) -> Result<(), SourceError> {
        if src.is_empty() {
            self.t.categories.push(Category {
                id: "adult".into(),
                default: true,
                surcharge_percent: 100,
            });
            self.cats.push(("adult".into(), 100));
        }
        for (id, c) in src {
            let pct = c.percent.unwrap_or(100);
            self.t.categories.push(Category {
                id: id.clone(),
                default: c.default,
                surcharge_percent: c.surcharge_percent.unwrap_or(pct),
            });
            self.cats.push((id.clone(), pct));
        }
        let defaults = self.t.categories.iter().filter(|c| c.default).count();
        if defaults != 1 {
            return Err(self.cx.err(
                section(self.src, "[categories]"),
                "categories",
                format!(
                    "exactly one rider category needs `default = true` (found {defaults}); e.g. adult = {{ default = true }}"
                ),
            ));
        }
        self.ids.categories = index_of(&self.cats.iter().map(|c| c.0.clone()).collect::<Vec<_>>());
        Ok(())
    }

    fn media(&mut self, src: &BTreeMap<String, SrcMedium>) -> Result<(), SourceError> {
        let defaults: Vec<&String> = src.iter().filter(|m| m.1.default).map(|m| m.0).collect();
        if defaults.len() > 1 {
            return Err(self.cx.err(
                section(self.src, "[media]"),
                "media",
                format!(
                    "at most one medium may be the default (found {})",
                    defaults.len()
                ),
            ));
        }
        self.t.default_medium = src
            .keys()
            .position(|k| defaults.first() == Some(&k))
            .map(|i| i as Idx);
        for m in src.keys() {
            self.t.media.push(Named {
                id: m.clone(),
                explicit: true,
                explicit_to: true,
            });
        }
        self.ids.media = index_of(
            &self
                .t
                .media
                .iter()
                .map(|m| m.id.clone())
                .collect::<Vec<_>>(),
        );
        Ok(())
    }

    /// The service for `days` between `start` and `end` (NONE: every day, always).
    fn service(&mut self, days: u8, start: Option<i32>, end: Option<i32>) -> Idx {
        if days == 0x7f && start.is_none() && end.is_none() {
            return NONE;
        }
        let t = &mut self.t;
        *self
            .service_ids
            .entry((days, start, end))
            .or_insert_with(|| {
                t.services.push(Service {
                    id: format!("days{days:02x}"),
                    weekdays: days,
                    start_day: start,
                    end_day: end,
                    added: vec![],
                    removed: vec![],
                });
                (t.services.len() - 1) as Idx
            })
    }

    fn timeframes(
        &mut self,
        src: &BTreeMap<String, Vec<Spanned<SrcSpan>>>,
    ) -> Result<(), SourceError> {
        for (id, spans) in src {
            let mut g = TimeframeGroup {
                id: id.clone(),
                spans: vec![],
            };
            for sp in spans {
                self.span(id, sp, &mut g.spans)?;
            }
            self.t.timeframes.push(g);
        }
        self.ids.timeframes = index_of(
            &self
                .t
                .timeframes
                .iter()
                .map(|g| g.id.clone())
                .collect::<Vec<_>>(),
        );
        Ok(())
    }

    /// One span of timeframe `id`: one timeframe, or two when it crosses midnight.
    fn span(
        &mut self,
        id: &str,
        sp: &Spanned<SrcSpan>,
        out: &mut Vec<Timeframe>,
    ) -> Result<(), SourceError> {
        let v = sp.get_ref();
        let days = v.days.map_or(0x7f, |d| d.0);
        let (from, to) = (v.from.map_or(0, |c| c.0), v.to.map_or(86_400, |c| c.0));
        let (start, end) = (v.start.map(|d| d.0), v.end.map(|d| d.0));
        if let (Some(a), Some(b)) = (start, end) {
            if a > b {
                return Err(self.cx.err(
                    sp.span().start,
                    &format!("timeframes.{id}.end"),
                    "the span ends before it starts: `end` is before `start`".into(),
                ));
            }
        }
        if from == to {
            return Err(self.cx.err(
                sp.span().start,
                &format!("timeframes.{id}.to"),
                "the span is empty: `to` equals `from`".into(),
            ));
        }
        let service = self.service(days, start, end);
        if from < to {
            out.push(Timeframe {
                start_s: from,
                end_s: to,
                service,
            });
        } else {
            // Crosses midnight: the evening on `days`, the early hours on the next days.
            out.push(Timeframe {
                start_s: from,
                end_s: 86_400,
                service,
            });
            let next = ((days << 1) | (days >> 6)) & 0x7f;
            let service = self.service(next, start.map(|d| d + 1), end.map(|d| d + 1));
            out.push(Timeframe {
                start_s: 0,
                end_s: to,
                service,
            });
        }
        Ok(())
    }

    fn networks(&mut self, src: &BTreeMap<String, SrcNetwork>) {
        for (id, n) in src {
            self.t.networks.push(Network {
                id: id.clone(),
                explicit: true,
                tap_out: n.tap_out.as_ref().map(|o| TapOut {
                    penalty_minor: o.penalty.0,
                    max_trip_s: o.max_trip.map_or(4 * 3600, |d| d.0),
                }),
            });
        }
        self.ids.networks = index_of(
            &self
                .t
                .networks
                .iter()
                .map(|n| n.id.clone())
                .collect::<Vec<_>>(),
        );
    }

    /// The stop `id`, added on its first mention.
    fn add_stop(&mut self, id: &str) -> Idx {
        let t = &mut self.t;
        *self.ids.stops.entry(id.to_string()).or_insert_with(|| {
            t.stops.push(Stop {
                id: id.to_string(),
                code: code24(id),
                areas: vec![],
            });
            (t.stops.len() - 1) as Idx
        })
    }

    fn routes(&mut self, src: &[Spanned<SrcRoute>]) -> Result<(), SourceError> {
        let mut route_seen: HashMap<String, usize> = HashMap::new();
        for r in src {
            let v = r.get_ref();
            if let Some(prev) = route_seen.insert(v.id.clone(), self.cx.line(r.span().start)) {
                return Err(self.cx.err(
                    r.span().start,
                    "routes.id",
                    format!("route \"{}\" is already defined at line {prev}", v.id),
                ));
            }
            let network =
                self.cx
                    .resolve(&v.network, "routes.network", "network", &self.ids.networks)?;
            if let Some(at) = &v.at {
                if at.len() != v.stops.len() {
                    return Err(self.cx.err(
                        r.span().start,
                        "routes.at",
                        format!(
                            "route \"{}\" lists {} stops but {} distances; give one distance per stop",
                            v.id,
                            v.stops.len(),
                            at.len()
                        ),
                    ));
                }
            }
            let chainage = self.chainage(v)?;
            self.t.routes.push(Route {
                id: v.id.clone(),
                code: code24(&v.id),
                network,
                chainage,
            });
        }
        Ok(())
    }

    /// Every stop the route serves, at its distance along it (0 when no `at` is given), sorted.
    fn chainage(&mut self, v: &SrcRoute) -> Result<Vec<(Idx, u32)>, SourceError> {
        let mut chainage = Vec::new();
        for (i, st) in v.stops.iter().enumerate() {
            let si = self.add_stop(st.get_ref());
            if chainage.iter().any(|&(s, _)| s == si) {
                if v.at.is_some() {
                    return Err(self.cx.err(
                        st.span().start,
                        "routes.stops",
                        format!(
                            "stop \"{}\" appears twice on route \"{}\"",
                            st.get_ref(),
                            v.id
                        ),
                    ));
                }
                continue;
            }
            chainage.push((si, v.at.as_ref().map_or(0, |at| at[i].0)));
        }
        chainage.sort_unstable();
        Ok(chainage)
    }

    fn areas(&mut self, src: &BTreeMap<String, Vec<Name>>) {
        for (area, stops) in src {
            self.t.areas.push(Named {
                id: area.clone(),
                explicit: true,
                explicit_to: true,
            });
            let ai = (self.t.areas.len() - 1) as Idx;
            for st in stops {
                let si = self.add_stop(st.get_ref());
                let a = &mut self.t.stops[si as usize].areas;
                if !a.contains(&ai) {
                    a.push(ai);
                    a.sort_unstable();
                }
            }
        }
        self.ids.areas = index_of(
            &self
                .t
                .areas
                .iter()
                .map(|a| a.id.clone())
                .collect::<Vec<_>>(),
        );
    }

    fn joins(&mut self, src: &[Spanned<SrcJoin>]) -> Result<(), SourceError> {
        let (cx, ids) = (&self.cx, &self.ids);
        for j in src {
            let v = j.get_ref();
            let from_network = cx.resolve(
                &v.from_network,
                "joins.from_network",
                "network",
                &ids.networks,
            )?;
            let to_network =
                cx.resolve(&v.to_network, "joins.to_network", "network", &ids.networks)?;
            let from_stop = match &v.from_stop {
                Some(n) => cx.resolve(n, "joins.from_stop", "stop", &ids.stops)?,
                None => NONE,
            };
            let to_stop = match &v.to_stop {
                Some(n) => cx.resolve(n, "joins.to_stop", "stop", &ids.stops)?,
                None => NONE,
            };
            self.t.join_rules.push(JoinRule {
                from_network,
                to_network,
                from_stop,
                to_stop,
            });
        }
        Ok(())
    }

    /// Products (with `like` resolved in dependency order; a cycle is an error).
    fn products(&mut self, src: &BTreeMap<String, Spanned<SrcProduct>>) -> Result<(), SourceError> {
        let names: Vec<String> = src.keys().cloned().collect();
        self.ids.products = index_of(&names);
        let mut base_price: Vec<Option<u32>> = vec![None; names.len()];
        let mut prices = Prices {
            cx: &self.cx,
            names: &names,
            ids: &self.ids.products,
            prods: src,
            memo: &mut base_price,
            stack: Vec::new(),
        };
        for i in 0..names.len() {
            prices.stack.clear();
            prices.resolve(i)?;
        }
        for (i, name) in names.iter().enumerate() {
            let p = &src[name];
            let v = p.get_ref();
            let prices = self.product_rows(
                &format!("products.{name}"),
                p.span().start,
                base_price[i].unwrap_or(0),
                &v.by_category,
                &v.by_medium,
            )?;
            self.t.products.push(Product {
                id: name.clone(),
                name: v.name.clone().unwrap_or_else(|| name.clone()),
                prices,
            });
        }
        Ok(())
    }

    /// A product's prices: per category (its own, or `price` scaled by the category's
    /// percentage), and per medium.
    fn product_rows(
        &self,
        field: &str,
        offset: usize,
        price: u32,
        by_cat: &BTreeMap<String, Money>,
        by_med: &BTreeMap<String, Money>,
    ) -> Result<Vec<Price>, SourceError> {
        let (cx, cat_ids, media_ids) = (&self.cx, &self.ids.categories, &self.ids.media);
        for k in by_cat.keys() {
            if !cat_ids.contains_key(k) {
                let hint = closest(k, cat_ids.keys().map(String::as_str))
                    .map(|c| format!("; did you mean \"{c}\"?"))
                    .unwrap_or_default();
                return Err(cx.err(
                    offset,
                    field,
                    format!("unknown rider category \"{k}\"{hint}"),
                ));
            }
        }
        for k in by_med.keys() {
            if !media_ids.contains_key(k) {
                return Err(cx.err(
                    offset,
                    field,
                    format!("unknown fare medium \"{k}\"; define it under [media]"),
                ));
            }
        }
        let mut rows = Vec::new();
        for (ci, (cname, pct)) in self.cats.iter().enumerate() {
            let scale = |p: u32| (u64::from(p) * u64::from(*pct) / 100) as u32;
            let own = by_cat.get(cname).map(|m| m.0);
            rows.push(Price {
                category: ci as Idx,
                medium: NONE,
                amount_minor: own.unwrap_or_else(|| scale(price)) as i32,
            });
            for (mname, m) in by_med {
                rows.push(Price {
                    category: ci as Idx,
                    medium: media_ids[mname],
                    amount_minor: own.map_or_else(|| scale(m.0), |o| o.min(scale(m.0))) as i32,
                });
            }
        }
        Ok(rows)
    }

    /// A product defined where it is used (a fare's `price`, an `od` entry, a transfer's
    /// `cost`), priced per category by the categories' percentages.
    fn inline_product(&mut self, id: String, price: u32) -> Idx {
        let prices = self
            .cats
            .iter()
            .enumerate()
            .map(|(ci, (_, pct))| Price {
                category: ci as Idx,
                medium: NONE,
                amount_minor: (u64::from(price) * u64::from(*pct) / 100) as i32,
            })
            .collect();
        self.t.products.push(Product {
            id: id.clone(),
            name: id,
            prices,
        });
        (self.t.products.len() - 1) as Idx
    }

    /// Fare (leg) rules.
    fn fares(&mut self, src: &[Spanned<SrcFare>]) -> Result<(), SourceError> {
        let mut fare_ids: HashMap<String, usize> = HashMap::new();
        for f in src {
            let v = f.get_ref();
            let line = self.cx.line(f.span().start);
            if let Some(prev) = fare_ids.insert(v.id.clone(), line) {
                return Err(self.cx.err(
                    f.span().start,
                    "fares.id",
                    format!("fare rule \"{}\" is already defined at line {prev}", v.id),
                ));
            }
            self.fare(f, line)?;
        }
        Ok(())
    }

    /// The leg rule of one fare (one per zone pair of an `od` table).
    fn fare(&mut self, f: &Spanned<SrcFare>, line: usize) -> Result<(), SourceError> {
        let v = f.get_ref();
        let gname = v.group.clone().unwrap_or_else(|| v.id.clone());
        let t = &mut self.t;
        let leg_group = *self.ids.groups.entry(gname.clone()).or_insert_with(|| {
            t.leg_groups.push(Named {
                id: gname,
                explicit: false,
                explicit_to: false,
            });
            (t.leg_groups.len() - 1) as Idx
        });
        let (cx, ids) = (&self.cx, &self.ids);
        let opt = |n: &Option<Name>, field: &str, kind: &str, ids: &HashMap<String, Idx>| {
            n.as_ref()
                .map_or(Ok(NONE), |n| cx.resolve(n, field, kind, ids))
        };
        let network = opt(&v.network, "fares.network", "network", &ids.networks)?;
        let from_timeframe = opt(
            &v.timeframe,
            "fares.timeframe",
            "timeframe",
            &ids.timeframes,
        )?;
        let to_timeframe = opt(
            &v.arrive_timeframe,
            "fares.arrive_timeframe",
            "timeframe",
            &ids.timeframes,
        )?;
        let from_zone = opt(&v.from_zone, "fares.from_zone", "zone", &ids.areas)?;
        let to_zone = opt(&v.to_zone, "fares.to_zone", "zone", &ids.areas)?;
        let pricing = self.pricing(f)?;
        if v.symmetric.is_some() && v.od.is_none() {
            return Err(self.cx.err(
                f.span().start,
                "fares.symmetric",
                "`symmetric` applies to an `od` table; this fare has none".into(),
            ));
        }
        let sources = usize::from(v.price.is_some())
            + usize::from(v.product.is_some())
            + usize::from(v.od.is_some());
        if sources != 1 {
            return Err(self.cx.err(
                f.span().start,
                "fares",
                format!(
                    "fare rule \"{}\" needs exactly one of `price`, `product` or `od` (an origin–destination table)",
                    v.id
                ),
            ));
        }
        let rule = LegRule {
            origin: format!("{}:{line} fare {}", self.cx.file, v.id),
            leg_group,
            network,
            from_area: from_zone,
            to_area: to_zone,
            from_timeframe,
            to_timeframe,
            product: NONE,
            pricing,
            priority: v.priority,
        };
        if let Some(p) = v.price {
            let product = self.inline_product(format!("fare:{}", v.id), p.0);
            self.t.leg_rules.push(LegRule { product, ..rule });
        } else if let Some(pn) = &v.product {
            let product = self
                .cx
                .resolve(pn, "fares.product", "product", &self.ids.products)?;
            self.t.leg_rules.push(LegRule { product, ..rule });
        } else if let Some(od) = &v.od {
            self.od_table(f, od, &rule)?;
        }
        Ok(())
    }

    /// A fare's distance pricing (bands in increasing distance), or its product's price.
    fn pricing(&self, f: &Spanned<SrcFare>) -> Result<Pricing, SourceError> {
        let Some(d) = &f.get_ref().distance else {
            return Ok(Pricing::Product);
        };
        let mut bands = Vec::new();
        let mut prev = d.base.0;
        for (bi, b) in d.bands.iter().enumerate() {
            let upto = b.upto.map_or(u32::MAX, |u| u.0);
            if upto <= prev {
                return Err(self.cx.err(
                    f.span().start,
                    "fares.distance.bands.upto",
                    format!("band {} ends at {upto} m, not after where the previous one ends ({prev} m); list bands in increasing distance", bi + 1),
                ));
            }
            if b.every.0 == 0 {
                return Err(self.cx.err(
                    f.span().start,
                    "fares.distance.bands.every",
                    "a step of 0 m never ends; e.g. every = \"5km\"".into(),
                ));
            }
            if b.upto.is_none() && bi + 1 != d.bands.len() {
                return Err(self.cx.err(
                    f.span().start,
                    "fares.distance.bands.upto",
                    "only the last band may leave `upto` open".into(),
                ));
            }
            bands.push(Band {
                upto_m: upto,
                step_m: b.every.0,
                add_minor: b.add.0,
            });
            prev = upto;
        }
        Ok(Pricing::Distance {
            base_m: d.base.0,
            bands,
        })
    }

    /// An origin–destination table: one leg rule (and product) per zone pair, both directions
    /// unless `symmetric = false`; the same pair at two prices is an error.
    fn od_table(
        &mut self,
        f: &Spanned<SrcFare>,
        od: &[(Name, Name, Money)],
        rule: &LegRule,
    ) -> Result<(), SourceError> {
        let v = f.get_ref();
        if v.from_zone.is_some() || v.to_zone.is_some() {
            return Err(self.cx.err(
                f.span().start,
                "fares.od",
                "an `od` table gives its own zones; drop from_zone/to_zone".into(),
            ));
        }
        let mut seen: HashMap<(Idx, Idx), (u32, usize)> = HashMap::new();
        let symmetric = v.symmetric.unwrap_or(true);
        for (a, b, m) in od {
            let ai = self.cx.resolve(a, "fares.od", "zone", &self.ids.areas)?;
            let bi = self.cx.resolve(b, "fares.od", "zone", &self.ids.areas)?;
            let mut pairs = vec![(ai, bi)];
            if symmetric && ai != bi {
                pairs.push((bi, ai));
            }
            for (x, y) in pairs {
                let (xn, yn) = (
                    self.t.areas[x as usize].id.clone(),
                    self.t.areas[y as usize].id.clone(),
                );
                if let Some(&(prev, pline)) = seen.get(&(x, y)) {
                    if prev != m.0 {
                        return Err(self.cx.err(
                            a.span().start,
                            "fares.od",
                            format!(
                                "contradictory prices for {xn} → {yn}: {} here, {prev} at line {pline}",
                                m.0
                            ),
                        ));
                    }
                    continue;
                }
                seen.insert((x, y), (m.0, self.cx.line(a.span().start)));
                let product = self.inline_product(format!("fare:{}:{xn}-{yn}", v.id), m.0);
                self.t.leg_rules.push(LegRule {
                    from_area: x,
                    to_area: y,
                    product,
                    ..rule.clone()
                });
            }
        }
        Ok(())
    }

    fn transfers(&mut self, src: &[Spanned<SrcTransfer>]) -> Result<(), SourceError> {
        for (i, tr) in src.iter().enumerate() {
            self.transfer(tr, i + 1)?;
        }
        Ok(())
    }

    /// Transfer `tcount` (1-based): one rule per (from, to) group pair.
    fn transfer(&mut self, tr: &Spanned<SrcTransfer>, tcount: usize) -> Result<(), SourceError> {
        let v = tr.get_ref();
        let origin = format!(
            "{}:{} transfer {tcount}",
            self.cx.file,
            self.cx.line(tr.span().start)
        );
        let mut pairs = Vec::new();
        for f in Names::list(&v.from) {
            for to in Names::list(&v.to) {
                pairs.push((
                    self.group(&f, "transfers.from")?,
                    self.group(&to, "transfers.to")?,
                ));
            }
        }
        let duration_from = self.measured(v)?;
        let kind = self.transfer_kind(v)?;
        if kind == TransferKind::TransferOnly && v.cost.is_none() {
            return Err(self.cx.err(
                tr.span().start,
                "transfers.cost",
                "pricing = \"cost_only\" makes `cost` the fare of the whole sub-journey: give it (0 would make it free)".into(),
            ));
        }
        if v.max == Some(0) {
            return Err(self.cx.err(
                tr.span().start,
                "transfers.max",
                "max = 0 allows no transfer; remove the rule instead".into(),
            ));
        }
        let product = match v.cost {
            Some(c) if c.0 > 0 => self.inline_product(format!("transfer:{tcount}"), c.0),
            _ => NONE,
        };
        let at_timeframe = match &v.during {
            Some(n) => self
                .cx
                .resolve(n, "transfers.during", "timeframe", &self.ids.timeframes)?,
            None => NONE,
        };
        for (from_group, to_group) in pairs {
            self.t.transfer_rules.push(TransferRule {
                origin: origin.clone(),
                from_group,
                to_group,
                transfer_count: v.max,
                duration_limit_s: v.within.map(|d| d.0),
                duration_from,
                kind,
                product,
                at_timeframe,
            });
        }
        Ok(())
    }

    /// A fare group by name (`any`: every group).
    fn group(&self, n: &Name, field: &str) -> Result<Idx, SourceError> {
        if n.get_ref() == "any" {
            Ok(NONE)
        } else {
            self.cx.resolve(n, field, "fare group", &self.ids.groups)
        }
    }

    fn measured(&self, v: &SrcTransfer) -> Result<DurationFrom, SourceError> {
        Ok(match v.measured.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("first_boarding") => DurationFrom::DepartureToDeparture,
            Some("first_boarding_to_arrival") => DurationFrom::DepartureToArrival,
            Some("last_alighting") => DurationFrom::PreviousArrivalToDeparture,
            Some("first_alighting") => DurationFrom::ArrivalToDeparture,
            Some("first_alighting_to_arrival") => DurationFrom::ArrivalToArrival,
            Some(other) => {
                return Err(self.cx.err(
                    v.measured.as_ref().map_or(0, |m| m.span().start),
                    "transfers.measured",
                    format!("\"{other}\" is not a way to measure; use first_boarding (default), first_boarding_to_arrival, first_alighting, first_alighting_to_arrival or last_alighting"),
                ))
            }
        })
    }

    fn transfer_kind(&self, v: &SrcTransfer) -> Result<TransferKind, SourceError> {
        Ok(match v.pricing.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("free") | Some("from_leg_plus_cost") => TransferKind::FromLegPlusTransfer,
            Some("from_leg_plus_cost_plus_to_leg") => TransferKind::FromLegPlusTransferPlusToLeg,
            Some("cost_only") => TransferKind::TransferOnly,
            Some("distance_combined") => TransferKind::DistanceCombined,
            Some(other) => {
                return Err(self.cx.err(
                    v.pricing.as_ref().map_or(0, |m| m.span().start),
                    "transfers.pricing",
                    format!("\"{other}\" is not a transfer pricing; use free, from_leg_plus_cost, from_leg_plus_cost_plus_to_leg, cost_only or distance_combined"),
                ))
            }
        })
    }

    fn caps(&mut self, src: &[Spanned<SrcCap>]) -> Result<(), SourceError> {
        for (ci, c) in src.iter().enumerate() {
            let v = c.get_ref();
            let id = v.id.clone().unwrap_or_else(|| format!("cap{}", ci + 1));
            let period = match (v.period.get_ref().as_str(), v.trips, v.amount) {
                ("day", None, Some(_)) => CapPeriod::Day,
                ("week", None, Some(_)) => CapPeriod::Week,
                ("day", Some(n), None) if n > 0 => CapPeriod::DayTrips(n),
                (p @ ("day" | "week"), _, _) => {
                    return Err(self.cx.err(
                        c.span().start,
                        "caps",
                        format!("a {p} cap needs `amount` (a money cap) or, for a day, `trips` (free after that many paid trips), not both"),
                    ))
                }
                (other, _, _) => {
                    return Err(self.cx.err(
                        v.period.span().start,
                        "caps.period",
                        format!("\"{other}\" is not a cap period; use \"day\" or \"week\""),
                    ))
                }
            };
            let cats_of: Vec<Idx> = match &v.categories {
                None => vec![NONE],
                Some(list) if list.is_empty() => {
                    return Err(self.cx.err(
                        c.span().start,
                        "caps.categories",
                        "an empty list caps nobody; leave `categories` out to cap every rider"
                            .into(),
                    ))
                }
                Some(list) => list
                    .iter()
                    .map(|n| {
                        self.cx.resolve(
                            n,
                            "caps.categories",
                            "rider category",
                            &self.ids.categories,
                        )
                    })
                    .collect::<Result<_, _>>()?,
            };
            for category in cats_of {
                self.t.caps.push(Cap {
                    id: id.clone(),
                    period,
                    amount_minor: v.amount.map_or(0, |m| m.0),
                    category,
                });
            }
        }
        Ok(())
    }

    /// Claims `code` of `kind` for `id`; a code used twice is an error.
    fn code_ok(
        &self,
        codes: &mut Codes,
        kind: u8,
        code: u16,
        id: &str,
        off: usize,
    ) -> Result<(), SourceError> {
        if let Some(prev) = codes.insert((kind, code), id.to_string()) {
            return Err(self.cx.err(
                off,
                "code",
                format!("code {code} is already used by \"{prev}\""),
            ));
        }
        Ok(())
    }

    fn passes(&mut self, src: &[Spanned<SrcPass>], codes: &mut Codes) -> Result<(), SourceError> {
        for p in src {
            let v = p.get_ref();
            self.code_ok(codes, 0, v.code, &v.id, p.span().start)?;
            let networks = v
                .networks
                .iter()
                .map(|n| {
                    self.cx
                        .resolve(n, "passes.networks", "network", &self.ids.networks)
                })
                .collect::<Result<_, _>>()?;
            let category = match &v.category {
                Some(n) => {
                    self.cx
                        .resolve(n, "passes.category", "rider category", &self.ids.categories)?
                }
                None => NONE,
            };
            self.t.passes.push(Pass {
                id: v.id.clone(),
                code: v.code,
                price_minor: v.price.0,
                validity_s: v.validity.0,
                networks,
                category,
            });
        }
        Ok(())
    }

    fn charges(
        &mut self,
        src: &[Spanned<SrcCharge>],
        codes: &mut Codes,
    ) -> Result<(), SourceError> {
        for c in src {
            let v = c.get_ref();
            self.code_ok(codes, 1, v.code, &v.id, c.span().start)?;
            if v.per_item.is_none() && v.per_hour.is_none() {
                return Err(self.cx.err(
                    c.span().start,
                    "charges",
                    format!("charge \"{}\" needs `per_item` or `per_hour`", v.id),
                ));
            }
            self.t.charges.push(Charge {
                id: v.id.clone(),
                code: v.code,
                per_item_minor: v.per_item.map(|m| m.0),
                per_hour_minor: v.per_hour.map(|m| m.0),
                day_cap_minor: v.day_cap.map(|m| m.0),
            });
        }
        Ok(())
    }

    fn coupons(
        &mut self,
        src: &[Spanned<SrcCoupon>],
        codes: &mut Codes,
    ) -> Result<(), SourceError> {
        for c in src {
            let v = c.get_ref();
            self.code_ok(codes, 2, v.code, &v.id, c.span().start)?;
            match (v.value, v.percent) {
                (Some(_), None) => {}
                (None, Some(p)) if (1..=100).contains(&p) => {}
                (None, Some(p)) => {
                    return Err(self.cx.err(
                        c.span().start,
                        "coupons.percent",
                        format!("percent {p} must be 1 to 100"),
                    ))
                }
                _ => {
                    return Err(self.cx.err(
                        c.span().start,
                        "coupons",
                        format!(
                            "coupon \"{}\" needs exactly one of `value` or `percent`",
                            v.id
                        ),
                    ))
                }
            }
            self.t.coupons.push(Coupon {
                id: v.id.clone(),
                code: v.code,
                value_minor: v.value.map(|m| m.0),
                percent: v.percent,
                expires_day: v.expires.map(|d| d.0),
                single_use: v.single_use,
            });
        }
        Ok(())
    }
}

/// Base prices of products, `like` chains followed (with the chain kept to report a cycle).
struct Prices<'a, 's> {
    cx: &'a Cx<'s>,
    names: &'a [String],
    ids: &'a HashMap<String, Idx>,
    prods: &'a BTreeMap<String, Spanned<SrcProduct>>,
    memo: &'a mut Vec<Option<u32>>,
    stack: Vec<usize>,
}

impl Prices<'_, '_> {
    fn resolve(&mut self, i: usize) -> Result<u32, SourceError> {
        if let Some(p) = self.memo[i] {
            return Ok(p);
        }
        let (cx, names) = (self.cx, self.names);
        let p = &self.prods[&names[i]];
        if self.stack.contains(&i) {
            let cycle: Vec<&str> = self
                .stack
                .iter()
                .chain(std::iter::once(&i))
                .map(|&k| names[k].as_str())
                .collect();
            return Err(cx.err(
                p.span().start,
                &format!("products.{}.like", names[i]),
                format!(
                    "products refer to each other in a cycle: {}",
                    cycle.join(" → ")
                ),
            ));
        }
        let v = p.get_ref();
        let price = match (&v.price, &v.like) {
            (Some(m), None) => m.0,
            (None, Some(like)) => {
                let li = cx.resolve(
                    like,
                    &format!("products.{}.like", names[i]),
                    "product",
                    self.ids,
                )?;
                self.stack.push(i);
                let base = self.resolve(li as usize)?;
                self.stack.pop();
                base.saturating_add(v.add.map_or(0, |a| a.0))
            }
            _ => {
                return Err(cx.err(
                    p.span().start,
                    &format!("products.{}", names[i]),
                    "give either `price` or `like` (another product) with an optional `add`".into(),
                ))
            }
        };
        self.memo[i] = Some(price);
        Ok(price)
    }
}

/// Fills the sorted stop and route code indexes; two ids with one code are an error.
pub fn finish_codes(t: &mut Table) -> Result<(), String> {
    let sc = sorted_codes("stops", t.stops.iter().map(|s| (s.code, s.id.as_str())))?;
    let rc = sorted_codes("routes", t.routes.iter().map(|r| (r.code, r.id.as_str())))?;
    t.stop_codes = sc;
    t.route_codes = rc;
    Ok(())
}

/// `(code, index)` of each of `what` (its code and id, in table order), sorted by code; two ids
/// with one code are an error.
fn sorted_codes<'a>(
    what: &str,
    items: impl Iterator<Item = (u32, &'a str)>,
) -> Result<Vec<(u32, Idx)>, String> {
    let (mut codes, ids): (Vec<(u32, Idx)>, Vec<&str>) = items
        .enumerate()
        .map(|(i, (code, id))| ((code, i as Idx), id))
        .unzip();
    codes.sort_unstable();
    for w in codes.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(format!(
                "{what} \"{}\" and \"{}\" share card code {:06x}; rename one",
                ids[w[0].1 as usize], ids[w[1].1 as usize], w[0].0
            ));
        }
    }
    Ok(codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_sorted_and_a_shared_code_is_refused_naming_both_ids() {
        use crate::table::{Route, Stop};
        let stop = |id: &str, code| Stop {
            id: id.into(),
            code,
            ..Stop::default()
        };
        let route = |id: &str, code| Route {
            id: id.into(),
            code,
            ..Route::default()
        };
        let mut t = Table {
            stops: vec![stop("a", 9), stop("b", 3)],
            routes: vec![route("r", 7), route("s", 1)],
            ..Table::default()
        };
        finish_codes(&mut t).unwrap();
        assert_eq!(t.stop_codes, vec![(3, 1), (9, 0)]);
        assert_eq!(t.route_codes, vec![(1, 1), (7, 0)]);
        t.stops.push(stop("c", 9));
        assert_eq!(
            finish_codes(&mut t).unwrap_err(),
            "stops \"a\" and \"c\" share card code 000009; rename one"
        );
        t.stops.pop();
        t.routes.push(route("t", 1));
        assert_eq!(
            finish_codes(&mut t).unwrap_err(),
            "routes \"s\" and \"t\" share card code 000001; rename one"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("90m"), Ok(5400));
        assert_eq!(parse_duration_s("1h30m"), Ok(5400));
        assert_eq!(parse_duration_s("2d"), Ok(172_800));
        assert_eq!(
            parse_duration_s("90").unwrap_err(),
            "duration \"90\" needs a unit, e.g. \"90m\""
        );
        assert!(parse_duration_s("5x")
            .unwrap_err()
            .contains("unknown unit 'x'"));
    }

    #[test]
    fn distances() {
        assert_eq!(parse_distance_m("10km"), Ok(10_000));
        assert_eq!(parse_distance_m("2.5km"), Ok(2_500));
        assert_eq!(parse_distance_m("800m"), Ok(800));
        assert!(parse_distance_m("10").unwrap_err().contains("needs a unit"));
        assert!(parse_distance_m("1.2345km").is_err());
    }

    #[test]
    fn clocks_and_days() {
        assert_eq!(parse_clock_s("07:30"), Ok(27_000));
        assert_eq!(parse_clock_s("24:00"), Ok(86_400));
        assert!(parse_clock_s("7:30").is_err());
        assert!(parse_clock_s("24:01").is_err());
        assert_eq!(parse_days("mon-fri"), Ok(0x1f));
        assert_eq!(parse_days("sat,sun"), Ok(0x60));
        assert_eq!(parse_days("fri-mon"), Ok(0b111_0001));
        assert!(parse_days("funday")
            .unwrap_err()
            .contains("\"funday\" is not a day"));
        assert_eq!(parse_day("1970-01-02"), Ok(1));
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("metor", ["metro", "bus"]), Some("metro"));
        assert_eq!(closest("zzzzzz", ["metro", "bus"]), None);
    }
}
