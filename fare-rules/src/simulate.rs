//! `tapgate fare simulate`: replays a tap log under a new and a baseline table and reports the
//! revenue and per-rider-category impact of the change.
//!
//! The log is CSV with a header: `card,rider,at,route,stop,kind` (`rider` and `kind` may be
//! empty: the table's default category; in/out/entry by network), optionally `medium`. Each
//! card's taps are replayed in time order on a simulated card, exactly as validators would
//! quote them.

use crate::cases::{quote_src_tap, rider_of, SimCard, TapSrc};
use crate::engine::Engine;
use serde::Serialize;
use std::collections::BTreeMap;

/// Revenue under both tables for one slice of riders.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Impact {
    pub taps: u64,
    pub baseline_minor: i64,
    pub new_minor: i64,
    pub change_minor: i64,
}

/// The whole report.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub cards: u64,
    pub taps: u64,
    pub currency: String,
    pub total: Impact,
    pub by_rider_category: BTreeMap<String, Impact>,
    /// Taps one of the tables could not price (counted once), with the first few reasons.
    pub unpriced_taps: u64,
    pub unpriced_examples: Vec<String>,
}

struct Row {
    card: String,
    rider: Option<String>,
    medium: Option<String>,
    line: u64,
    tap: TapSrc,
    at_s: i64,
}

/// The same table in effect at every date: a replay prices past taps under next month's rules.
fn timeless(e: &Engine) -> Result<Engine, String> {
    let mut t = e.table().clone();
    t.meta.effective_from_day = i32::MIN;
    t.meta.effective_until_day = None;
    Engine::new(t).map_err(|err| err.to_string())
}

/// Replays `log` (CSV text, named `file` in errors); effective dates are ignored, so a tap log
/// of last month prices under next month's rules.
pub fn simulate(new: &Engine, baseline: &Engine, file: &str, log: &str) -> Result<Report, String> {
    let (new, baseline) = (&timeless(new)?, &timeless(baseline)?);
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(log.as_bytes());
    let headers = rdr.headers().map_err(|e| format!("{file}: {e}"))?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let need = |name: &str| {
        col(name).ok_or_else(|| {
            format!("{file} line 1: missing column `{name}` (need card,rider,at,route,stop,kind)")
        })
    };
    let (c_card, c_at, c_route, c_stop) =
        (need("card")?, need("at")?, need("route")?, need("stop")?);
    let (c_rider, c_kind, c_medium) = (col("rider"), col("kind"), col("medium"));
    let mut rows = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i as u64 + 2;
        let rec = rec.map_err(|e| format!("{file} line {line}: {e}"))?;
        let get = |c: Option<usize>| {
            c.and_then(|c| rec.get(c))
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let at = get(Some(c_at)).ok_or_else(|| format!("{file} line {line}, field at: empty"))?;
        let at_s = crate::cases::parse_local(&at)
            .map_err(|e| format!("{file} line {line}, field at: {e}"))?;
        rows.push(Row {
            card: get(Some(c_card))
                .ok_or_else(|| format!("{file} line {line}, field card: empty"))?,
            rider: get(c_rider),
            medium: get(c_medium),
            line,
            at_s,
            tap: TapSrc {
                at,
                route: get(Some(c_route)),
                stop: get(Some(c_stop)),
                kind: get(c_kind),
                charge: None,
                items: 0,
                minutes: 0,
                coupon: None,
            },
        });
    }
    rows.sort_by(|a, b| {
        a.card
            .cmp(&b.card)
            .then(a.at_s.cmp(&b.at_s))
            .then(a.line.cmp(&b.line))
    });

    let mut rep = Report {
        currency: new.table().meta.currency.clone(),
        ..Report::default()
    };
    let mut cards: (SimCard, SimCard) = Default::default();
    let mut current: Option<&str> = None;
    for row in &rows {
        if current != Some(row.card.as_str()) {
            current = Some(row.card.as_str());
            cards = Default::default();
            rep.cards += 1;
        }
        rep.taps += 1;
        let cat_name = row.rider.clone().unwrap_or_else(|| {
            let d = new.default_category();
            new.table()
                .categories
                .get(usize::from(d))
                .map_or("(default)".to_string(), |c| c.id.clone())
        });
        let quote = |e: &Engine, card: &mut SimCard| -> Result<u32, String> {
            let rider = rider_of(e, row.rider.as_deref(), row.medium.as_deref())?;
            quote_src_tap(e, rider, card, &row.tap).map(|(q, _)| q.fare_minor)
        };
        let b = quote(baseline, &mut cards.0);
        let n = quote(new, &mut cards.1);
        match (b, n) {
            (Ok(b), Ok(n)) => {
                for imp in [
                    &mut rep.total,
                    rep.by_rider_category.entry(cat_name).or_default(),
                ] {
                    imp.taps += 1;
                    imp.baseline_minor += i64::from(b);
                    imp.new_minor += i64::from(n);
                    imp.change_minor = imp.new_minor - imp.baseline_minor;
                }
            }
            (b, n) => {
                rep.unpriced_taps += 1;
                if rep.unpriced_examples.len() < 5 {
                    let why = [("baseline", b.err()), ("new", n.err())]
                        .into_iter()
                        .filter_map(|(w, e)| e.map(|e| format!("{w}: {e}")))
                        .collect::<Vec<_>>()
                        .join("; ");
                    rep.unpriced_examples.push(format!(
                        "{file} line {} (card {}): {why}",
                        row.line, row.card
                    ));
                }
            }
        }
    }
    Ok(rep)
}
