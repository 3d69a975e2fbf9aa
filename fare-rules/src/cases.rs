//! Golden journeys planners keep beside their rules, run tap by tap through the same evaluator a
//! validator runs (with a simulated card holding the last [`HISTORY_RECORDS`] trip records), and
//! the text that explains each quote.
//!
//! ```toml
//! [[case]]
//! name = "metro then bus within 30 minutes: one distance"
//! rider = "adult"                       # optional: the table's default
//! taps = [
//!   { at = "2026-12-01T08:00", route = "M1", stop = "Central" },
//!   { at = "2026-12-01T08:20", route = "M1", stop = "University", kind = "out" },
//! ]
//! fares = [1400, 100]
//! total = 1500                          # optional
//! ```

use crate::engine::{CardView, Engine, HeldPass, Priced, Rider, Tap, TapQuote};
use crate::record::{TapKind, TripRecord};
use crate::source::{closest, SourceError};
use crate::table::{CapPeriod, TransferKind, NONE};
use serde::Deserialize;
use std::fmt::Write as _;
use toml::Spanned;

/// Trip records a simulated card keeps (the purse card's default cyclic file).
pub const HISTORY_RECORDS: usize = 7;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    #[serde(default)]
    case: Vec<Spanned<CaseSrc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseSrc {
    name: String,
    rider: Option<String>,
    medium: Option<String>,
    #[serde(default)]
    passes: Vec<PassSrc>,
    taps: Vec<TapSrc>,
    fares: Option<Vec<u32>>,
    total: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PassSrc {
    pass: String,
    from: String,
    until: Option<String>,
}

/// One tap of a case (also the tap-log format of `simulate`).
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TapSrc {
    /// Local time, "YYYY-MM-DDTHH:MM[:SS]".
    pub at: String,
    pub route: Option<String>,
    pub stop: Option<String>,
    /// "in", "out" or "entry" (default: "in" on a network with tap-out, else "entry").
    pub kind: Option<String>,
    /// A non-transit charge id (pay-TV) instead of a ride.
    pub charge: Option<String>,
    #[serde(default)]
    pub items: u32,
    #[serde(default)]
    pub minutes: u32,
    /// A coupon applied to this charge.
    pub coupon: Option<String>,
}

/// A case's outcome.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub line: usize,
    pub expected: Option<Vec<u32>>,
    pub expected_total: Option<u64>,
    /// Fare per tap, and the explanation of each.
    pub actual: Vec<u32>,
    pub explained: Vec<String>,
    /// A tap that could not be quoted.
    pub error: Option<String>,
}

impl CaseResult {
    /// Whether the case holds.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.expected.as_ref().is_none_or(|e| *e == self.actual)
            && self
                .expected_total
                .is_none_or(|t| t == self.actual.iter().map(|&f| u64::from(f)).sum::<u64>())
    }
}

/// Local seconds since 1970 of "YYYY-MM-DDTHH:MM[:SS]".
pub fn parse_local(s: &str) -> Result<i64, String> {
    let t = s.trim();
    chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M"))
        .map(|d| d.and_utc().timestamp())
        .map_err(|_| {
            format!("time \"{s}\" must be local YYYY-MM-DDTHH:MM[:SS], e.g. \"2026-12-01T08:05\"")
        })
}

/// Formats local seconds since 1970 as "YYYY-MM-DD HH:MM".
pub fn format_local(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.naive_utc().format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| t.to_string())
}

/// A simulated card: the state `quote_tap` reads and the records it writes.
#[derive(Clone, Debug, Default)]
pub struct SimCard {
    /// Newest first, at most [`HISTORY_RECORDS`].
    pub history: Vec<TripRecord>,
    pub passes: Vec<HeldPass>,
    pub used_coupons: Vec<u16>,
}

impl SimCard {
    /// Writes a record as a card would (through its 32-byte encoding).
    pub fn write(&mut self, r: &TripRecord) {
        let back = TripRecord::decode(&r.encode()).unwrap_or(*r);
        self.history.insert(0, back);
        self.history.truncate(HISTORY_RECORDS);
    }
}

/// Resolves a tap of a case or log and quotes it against `card`; returns the quote (with the
/// coupon discount applied to a charge) and the tap it resolved to.
pub fn quote_src_tap(
    engine: &Engine,
    rider: Rider,
    card: &mut SimCard,
    tap: &TapSrc,
) -> Result<(TapQuote, Option<Tap>), String> {
    let t = engine.table();
    let time = parse_local(&tap.at)?;
    let time_s = u32::try_from(time).map_err(|_| format!("time {} is out of range", tap.at))?;
    if let Some(ch) = &tap.charge {
        let c = by_id(&t.charges, "charge", ch, |c| c.id.as_str())?;
        let cv = CardView {
            rider,
            history: &card.history,
            passes: &card.passes,
        };
        let mut q = engine
            .quote_charge(&cv, c.code, tap.items, tap.minutes, time_s)
            .map_err(|e| e.to_string())?;
        if let Some(cp) = &tap.coupon {
            let coupon = by_id(&t.coupons, "coupon", cp, |c| c.id.as_str())?;
            let used = card.used_coupons.contains(&coupon.code);
            let off = engine
                .coupon_discount(
                    coupon.code,
                    q.fare_minor,
                    time.div_euclid(86_400) as i32,
                    used,
                )
                .map_err(|e| format!("coupon \"{cp}\": {e}"))?;
            // The charge's own day total (journey-paid on charge records) counts what was paid.
            q.fare_minor -= off;
            q.record.fare_minor = q.fare_minor;
            q.record.journey_paid_minor = q.record.journey_paid_minor.saturating_sub(off);
            card.used_coupons.push(coupon.code);
        }
        card.write(&q.record);
        return Ok((q, None));
    }
    let route_id = tap
        .route
        .as_deref()
        .ok_or("a ride needs `route` (or `charge`)")?;
    let stop_id = tap.stop.as_deref().ok_or("a ride needs `stop`")?;
    let route = engine
        .route(route_id)
        .ok_or_else(|| unknown("route", route_id, t.routes.iter().map(|r| r.id.as_str())))?;
    let stop = engine
        .stop(stop_id)
        .ok_or_else(|| unknown("stop", stop_id, t.stops.iter().map(|s| s.id.as_str())))?;
    let net = t.routes[route as usize].network;
    let taps_out = net != NONE && t.networks[net as usize].tap_out.is_some();
    let kind = match tap.kind.as_deref() {
        None if taps_out => TapKind::In,
        None | Some("entry") => TapKind::Entry,
        Some("in") => TapKind::In,
        Some("out") => TapKind::Out,
        Some(k) => return Err(format!("tap kind \"{k}\" is not in, out or entry")),
    };
    let q_tap = Tap {
        kind,
        time_s,
        route,
        stop,
    };
    let cv = CardView {
        rider,
        history: &card.history,
        passes: &card.passes,
    };
    let q = engine.quote_tap(&cv, &q_tap).map_err(|e| e.to_string())?;
    if !q.repeat {
        card.write(&q.record);
    }
    Ok((q, Some(q_tap)))
}

/// The entry of `items` whose id (`id_of`) is `id`; another id is an error naming the closest.
fn by_id<'a, T>(
    items: &'a [T],
    kind: &str,
    id: &str,
    id_of: impl Fn(&T) -> &str,
) -> Result<&'a T, String> {
    items
        .iter()
        .find(|x| id_of(x) == id)
        .ok_or_else(|| unknown(kind, id, items.iter().map(&id_of)))
}

fn unknown<'a>(kind: &str, id: &str, names: impl IntoIterator<Item = &'a str>) -> String {
    match closest(id, names) {
        Some(c) => format!("unknown {kind} \"{id}\"; did you mean \"{c}\"?"),
        None => format!("unknown {kind} \"{id}\""),
    }
}

/// Resolves a rider category and medium by name.
pub fn rider_of(
    engine: &Engine,
    rider: Option<&str>,
    medium: Option<&str>,
) -> Result<Rider, String> {
    let t = engine.table();
    let category = match rider {
        None => NONE,
        Some(r) => engine.category(r).ok_or_else(|| {
            unknown(
                "rider category",
                r,
                t.categories.iter().map(|c| c.id.as_str()),
            )
        })?,
    };
    let medium = match medium {
        None => NONE,
        Some(m) => engine
            .medium(m)
            .ok_or_else(|| unknown("fare medium", m, t.media.iter().map(|c| c.id.as_str())))?,
    };
    Ok(Rider { category, medium })
}

/// Runs every case in `src` (named `file` in errors).
pub fn run_cases(engine: &Engine, file: &str, src: &str) -> Result<Vec<CaseResult>, SourceError> {
    let cf: CasesFile = toml::from_str(src).map_err(|e| SourceError::Syntax {
        file: file.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let line_of = |off: usize| src[..off.min(src.len())].matches('\n').count() + 1;
    let mut out = Vec::new();
    for c in &cf.case {
        let line = line_of(c.span().start);
        let v = c.get_ref();
        let field_err = |field: &str, message: String| SourceError::Field {
            file: file.to_string(),
            line,
            field: field.to_string(),
            message,
        };
        let rider = rider_of(engine, v.rider.as_deref(), v.medium.as_deref())
            .map_err(|m| field_err("rider", m))?;
        let mut card = SimCard::default();
        for p in &v.passes {
            let t = engine.table();
            let Some(def) = t.passes.iter().find(|x| x.id == p.pass) else {
                return Err(field_err(
                    "passes.pass",
                    unknown("pass", &p.pass, t.passes.iter().map(|x| x.id.as_str())),
                ));
            };
            let from = parse_local(&p.from).map_err(|m| field_err("passes.from", m))?;
            let until = match &p.until {
                Some(u) => parse_local(u).map_err(|m| field_err("passes.until", m))?,
                None => from + i64::from(def.validity_s),
            };
            card.passes.push(HeldPass {
                code: def.code,
                valid_from_s: from.clamp(0, i64::from(u32::MAX)) as u32,
                valid_until_s: until.clamp(0, i64::from(u32::MAX)) as u32,
            });
        }
        let mut r = CaseResult {
            name: v.name.clone(),
            line,
            expected: v.fares.clone(),
            expected_total: v.total,
            actual: vec![],
            explained: vec![],
            error: None,
        };
        for (i, tap) in v.taps.iter().enumerate() {
            match quote_src_tap(engine, rider, &mut card, tap) {
                Ok((q, t)) => {
                    r.actual.push(q.fare_minor);
                    r.explained.push(explain_tap(engine, tap, t.as_ref(), &q));
                }
                Err(e) => {
                    r.error = Some(format!("tap {} ({}): {e}", i + 1, tap.at));
                    break;
                }
            }
        }
        out.push(r);
    }
    Ok(out)
}

/// One line (or a few) saying how a tap's fare came about.
pub fn explain_tap(engine: &Engine, src: &TapSrc, tap: Option<&Tap>, q: &TapQuote) -> String {
    let t = engine.table();
    let mut s = String::new();
    match tap {
        None => {
            let _ = write!(
                s,
                "{} charge {}: {}",
                src.at,
                src.charge.as_deref().unwrap_or("?"),
                q.fare_minor
            );
            if q.before_caps_minor != q.fare_minor {
                let _ = write!(s, " (of {}", q.before_caps_minor);
                if q.cap != NONE {
                    let _ = write!(s, "; day cap of {}", t.charges[q.cap as usize].id);
                }
                if let Some(c) = &src.coupon {
                    let _ = write!(s, "; coupon {c}");
                }
                s.push(')');
            }
            return s;
        }
        Some(tap) => {
            let kind = match tap.kind {
                TapKind::In => "in",
                TapKind::Out => "out",
                TapKind::Entry => "entry",
                TapKind::Charge => "charge",
            };
            let _ = write!(
                s,
                "{} {kind:<5} {} at {}: {}",
                src.at,
                t.routes[tap.route as usize].id,
                t.stops[tap.stop as usize].id,
                q.fare_minor
            );
        }
    }
    if q.repeat {
        s.push_str(" — the same tap again: nothing charged");
        return s;
    }
    if q.pass != NONE {
        let _ = write!(s, " — pass {} covers it", t.passes[q.pass as usize].id);
        return s;
    }
    let mut notes = Vec::new();
    if q.penalty_minor > 0 {
        notes.push(format!(
            "includes {} for a missing tap-out",
            q.penalty_minor
        ));
    }
    if q.cap != NONE {
        let c = &t.caps[q.cap as usize];
        let what = match c.period {
            CapPeriod::Day => format!("daily cap {} of {}", c.id, c.amount_minor),
            CapPeriod::Week => format!("weekly cap {} of {}", c.id, c.amount_minor),
            CapPeriod::DayTrips(n) => format!("cap {}: free after {n} paid trips a day", c.id),
        };
        notes.push(format!(
            "{what} reduced {} to {}",
            q.before_caps_minor,
            q.fare_minor - q.penalty_minor
        ));
    }
    if !notes.is_empty() {
        let _ = write!(s, " ({})", notes.join("; "));
    }
    if let Some(p) = &q.journey {
        s.push_str(&explain_journey(engine, p, "\n    "));
    }
    s
}

/// The legs of a priced journey, one per line after `sep`.
pub fn explain_journey(engine: &Engine, p: &Priced, sep: &str) -> String {
    let t = engine.table();
    let mut s = String::new();
    for (i, l) in p.legs().iter().enumerate() {
        let r = &t.leg_rules[l.rule as usize];
        let _ = write!(
            s,
            "{sep}leg {}: rule {} → product {} fare {}",
            i + 1,
            r.origin,
            t.products[l.product as usize].id,
            l.fare_minor
        );
        if l.distance_m > 0 {
            let _ = write!(s, " ({} m)", l.distance_m);
        }
        if l.transfer != NONE {
            let tr = &t.transfer_rules[l.transfer as usize];
            let how = match tr.kind {
                TransferKind::FromLegPlusTransfer => "from-leg plus transfer cost",
                TransferKind::FromLegPlusTransferPlusToLeg => "from-leg plus cost plus this leg",
                TransferKind::TransferOnly => "transfer cost for the whole sub-journey",
                TransferKind::DistanceCombined => "journey distance priced once",
            };
            let _ = write!(s, "; transfer {} ({how})", tr.origin);
        }
        let _ = write!(s, "; adds {}", l.charged_minor);
    }
    let _ = write!(s, "{sep}journey total {}", p.total_minor);
    s
}
