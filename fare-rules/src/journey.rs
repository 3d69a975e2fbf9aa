//! Whole-journey quotes in JSON: what `tapgate fare quote` reads and prints.
//!
//! In: `{"rider_category_id": "...", "fare_media_id": "...", "legs": [{"route_id": "...",
//! "from_stop_id": "...", "to_stop_id": "...", "departure": "2025-03-04T08:05:00",
//! "arrival": "2025-03-04T08:30:00"}]}` — rider and medium optional (the table's default
//! category; any medium), times local to the feed's agency timezone.
//!
//! Out: `{"total_minor": 250, "currency": "USD", "legs": [...]}`, one entry per effective leg
//! (legs joined by join rules count as one).

use crate::cases::{format_local, parse_local};
use crate::engine::{Engine, Leg, QuoteError, Rider, MAX_LEGS_IN};
use crate::source::closest;
use crate::table::{Idx, NONE};
use serde::{Deserialize, Serialize};

/// A journey to quote.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Journey {
    #[serde(default)]
    pub rider_category_id: Option<String>,
    #[serde(default)]
    pub fare_media_id: Option<String>,
    pub legs: Vec<JourneyLeg>,
}

/// One leg as a trip planner gives it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JourneyLeg {
    pub route_id: String,
    pub from_stop_id: String,
    pub to_stop_id: String,
    pub departure: String,
    pub arrival: String,
}

/// The quote.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct QuoteOut {
    pub total_minor: i64,
    pub currency: String,
    pub legs: Vec<LegOut>,
}

/// One effective leg of a quote.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LegOut {
    /// Indexes (0-based) of the journey legs this effective leg covers.
    pub journey_legs: Vec<usize>,
    pub from_stop_id: String,
    pub to_stop_id: String,
    pub fare_product_id: String,
    pub leg_group_id: Option<String>,
    /// Where the matching leg rule is defined.
    pub leg_rule: String,
    /// The leg's own fare.
    pub fare_minor: u32,
    /// The transfer rule applied from the previous leg, if any.
    pub transfer_rule: Option<String>,
    /// What this leg added to the total.
    pub amount_minor: i64,
}

/// Why a journey could not be quoted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JourneyError {
    #[error("journey: {0}")]
    Input(String),
    #[error("leg {leg} ({desc}): {why}")]
    Leg {
        leg: usize,
        desc: String,
        why: String,
    },
}

/// Quotes `j` against `engine`: the lowest total the rules allow.
pub fn quote(engine: &Engine, j: &Journey) -> Result<QuoteOut, JourneyError> {
    let t = engine.table();
    let input = JourneyError::Input;
    if j.legs.is_empty() {
        return Err(input("`legs` is empty; give at least one leg".into()));
    }
    if j.legs.len() > MAX_LEGS_IN {
        return Err(input(format!(
            "{} legs; at most {MAX_LEGS_IN} are priced as one journey",
            j.legs.len()
        )));
    }
    let names = t.categories.iter().map(|c| c.id.as_str());
    let id = j.rider_category_id.as_deref();
    let category = optional_index("rider_category_id", id, |c| engine.category(c), names)?;
    let names = t.media.iter().map(|m| m.id.as_str());
    let id = j.fare_media_id.as_deref();
    let medium = optional_index("fare_media_id", id, |m| engine.medium(m), names)?;
    let mut legs = Vec::with_capacity(j.legs.len());
    for (i, l) in j.legs.iter().enumerate() {
        let n = i + 1;
        let leg_err = |why: String| JourneyError::Leg {
            leg: n,
            desc: describe_leg(l),
            why,
        };
        let route = engine.route(&l.route_id).ok_or_else(|| {
            leg_err(unknown(
                "route_id",
                &l.route_id,
                t.routes.iter().map(|x| x.id.as_str()),
            ))
        })?;
        let stop = |id: &str, field: &str| {
            engine
                .stop(id)
                .ok_or_else(|| leg_err(unknown(field, id, t.stops.iter().map(|x| x.id.as_str()))))
        };
        let from_stop = stop(&l.from_stop_id, "from_stop_id")?;
        let to_stop = stop(&l.to_stop_id, "to_stop_id")?;
        let departure_s =
            parse_local(&l.departure).map_err(|e| leg_err(format!("departure: {e}")))?;
        let arrival_s = parse_local(&l.arrival).map_err(|e| leg_err(format!("arrival: {e}")))?;
        if arrival_s < departure_s {
            return Err(leg_err("arrival is before departure".into()));
        }
        if let Some(prev) = legs.last().map(|p: &Leg| p.arrival_s) {
            if departure_s < prev {
                return Err(leg_err("departs before the previous leg arrives".into()));
            }
        }
        if !engine.in_effect(departure_s) {
            return Err(leg_err(format!(
                "the fare table is not in effect on {}",
                format_local(departure_s)
            )));
        }
        legs.push(Leg {
            route,
            from_stop,
            to_stop,
            departure_s,
            arrival_s,
        });
    }
    let rider = Rider { category, medium };
    let p = engine
        .price_journey(rider, &legs)
        .map_err(|e| explain_error(engine, j, &legs, rider, e))?;
    let mut out = QuoteOut {
        total_minor: p.total_minor as i64,
        currency: t.meta.currency.clone(),
        legs: Vec::new(),
    };
    for l in p.legs() {
        let r = &t.leg_rules[l.rule as usize];
        out.legs.push(LegOut {
            journey_legs: (usize::from(l.first_leg)..=usize::from(l.last_leg)).collect(),
            from_stop_id: j.legs[usize::from(l.first_leg)].from_stop_id.clone(),
            to_stop_id: j.legs[usize::from(l.last_leg)].to_stop_id.clone(),
            fare_product_id: t.products[l.product as usize].id.clone(),
            leg_group_id: (r.leg_group != NONE)
                .then(|| t.leg_groups[r.leg_group as usize].id.clone()),
            leg_rule: r.origin.clone(),
            fare_minor: l.fare_minor,
            transfer_rule: (l.transfer != NONE)
                .then(|| t.transfer_rules[l.transfer as usize].origin.clone()),
            amount_minor: l.charged_minor,
        });
    }
    Ok(out)
}

fn describe_leg(l: &JourneyLeg) -> String {
    format!(
        "route {}, {} → {}, {}",
        l.route_id, l.from_stop_id, l.to_stop_id, l.departure
    )
}

/// The index an optional `field` names ([`NONE`] without one); an id `index` does not know is
/// an input error naming the closest of `names`.
fn optional_index<'a>(
    field: &str,
    id: Option<&str>,
    index: impl Fn(&str) -> Option<Idx>,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Idx, JourneyError> {
    match id {
        None => Ok(NONE),
        Some(id) => index(id).ok_or_else(|| JourneyError::Input(unknown(field, id, names))),
    }
}

fn unknown<'a>(field: &str, id: &str, names: impl IntoIterator<Item = &'a str>) -> String {
    match closest(id, names) {
        Some(c) => format!("{field} \"{id}\" is not in the feed; did you mean \"{c}\"?"),
        None => format!("{field} \"{id}\" is not in the feed"),
    }
}

/// Says which leg no rule prices, and what it was matched on.
fn explain_error(
    engine: &Engine,
    j: &Journey,
    legs: &[Leg],
    rider: Rider,
    e: QuoteError,
) -> JourneyError {
    let t = engine.table();
    let (leg, why) = match e {
        QuoteError::NoRule { leg } | QuoteError::NoPrice { leg } => {
            let l = legs[leg];
            let net = t.routes[l.route as usize].network;
            let areas = |s: u16| {
                let a: Vec<&str> = t.stops[s as usize]
                    .areas
                    .iter()
                    .map(|&a| t.areas[a as usize].id.as_str())
                    .collect();
                if a.is_empty() {
                    "no area".to_string()
                } else {
                    format!("areas {}", a.join(", "))
                }
            };
            let on = format!(
                "network {}, from {} ({}), to {} ({}), departing {}",
                if net == NONE {
                    "(none)"
                } else {
                    t.networks[net as usize].id.as_str()
                },
                t.stops[l.from_stop as usize].id,
                areas(l.from_stop),
                t.stops[l.to_stop as usize].id,
                areas(l.to_stop),
                format_local(l.departure_s)
            );
            let why = if matches!(e, QuoteError::NoRule { .. }) {
                format!("no fare leg rule matches it ({on})")
            } else {
                let cat = if rider.category == NONE {
                    let c = engine.default_category();
                    if c == NONE {
                        "(none)".to_string()
                    } else {
                        t.categories[c as usize].id.clone()
                    }
                } else {
                    t.categories[rider.category as usize].id.clone()
                };
                let med = if rider.medium == NONE {
                    "any medium".to_string()
                } else {
                    format!("medium {}", t.media[rider.medium as usize].id)
                };
                format!("rules match it ({on}) but their products have no price for rider category {cat} with {med}")
            };
            (leg, why)
        }
        other => (0, other.to_string()),
    };
    JourneyError::Leg {
        leg: leg + 1,
        desc: j.legs.get(leg).map(describe_leg).unwrap_or_default(),
        why,
    }
}
