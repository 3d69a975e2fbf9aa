//! The console's fare tables: the published table, and a form to upload rules (a `.toml`
//! source or a zipped GTFS-Fares v2 feed, as a file or pasted) with an optional tap log. *Check*
//! shows `fare check`'s findings and `fare simulate`'s revenue impact against the published
//! table; *Check and publish* does the same and then [`crate::fares::publish`] — the operation
//! `tapgate fare publish` (`POST /v1/fares`) runs: signed in the HSM and kept as the published
//! table the gateways relay to validators. A table with an error publishes nothing.

use super::*;
use crate::fares::{self, FaresError, Outcome, Proposal, Published};
use tapgate_http::pages::Part;

/// The fare-table routes (merged into the pages' router).
pub(super) fn routes() -> Router<Pages> {
    Router::new().route(
        "/console/fares",
        get(fares_page)
            .post(fares_post)
            .layer(axum::extract::DefaultBodyLimit::max(
                2 * fares::MAX_UPLOAD_BYTES + 64 * 1024,
            )),
    )
}

fn published_ctx(t: &Published) -> minijinja::Value {
    minijinja::context! {
        version => t.version, name => t.name, source => t.source, by => t.by,
        when => card::when(t.published_ms), bytes => t.table_hex.len() / 2,
    }
}

/// The page: the published table, the form, and what the last upload gave (`result`).
async fn render(
    p: &Pages,
    s: &session::Session,
    result: minijinja::Value,
) -> Result<Response, PageError> {
    let current = p.read(|_, r| Ok(fares::published(r)?)).await?;
    Ok(super::console::console_page(
        p,
        s,
        "console_fares.html",
        minijinja::context! { current => current.as_ref().map(published_ctx), result => result },
    ))
}

async fn fares_page(State(p): State<Pages>, headers: HeaderMap) -> Response {
    p.answer(async {
        let s = p.signed_in_as(&headers, PageRole::Operator)?;
        render(&p, &s, minijinja::Value::UNDEFINED).await
    })
    .await
}

/// What the form sent.
struct Upload {
    name: String,
    rules: Vec<u8>,
    taps: Option<(String, String)>,
    /// Without a tap log: the back office's taps of the last `days` days, local times
    /// `utc_offset_minutes` from UTC.
    days: u64,
    utc_offset_minutes: i32,
    publish: bool,
}

/// Days of cleared taps the revenue impact replays by default.
const DEFAULT_DAYS: u64 = 7;

/// The rules (the file, else the pasted text), the tap log and the button pressed.
fn upload(parts: &[Part]) -> Result<Upload, PageError> {
    let field = |n: &str| parts.iter().find(|x| x.name == n && !x.bytes.is_empty());
    let (name, rules) = match (field("rules"), field("source")) {
        (Some(f), _) => (
            f.file_name.clone().unwrap_or_else(|| "rules.toml".into()),
            f.bytes.clone(),
        ),
        (None, Some(t)) => ("rules.toml".to_string(), t.bytes.clone()),
        (None, None) => {
            return Err(PageError::Bad(
                "Choose a rules file (.toml or a zipped GTFS feed) or paste the rules.".into(),
            ))
        }
    };
    let taps = field("taps").map(|t| {
        (
            t.file_name.clone().unwrap_or_else(|| "taps.csv".into()),
            String::from_utf8_lossy(&t.bytes).into_owned(),
        )
    });
    let number = |n: &str| field(n).map(|f| f.text().trim().to_string());
    let days = match number("days") {
        None => DEFAULT_DAYS,
        Some(d) => d
            .parse::<u64>()
            .ok()
            .filter(|d| (1..=recent_taps::MAX_DAYS).contains(d))
            .ok_or_else(|| {
                PageError::Bad(format!("Days of taps: 1 to {}.", recent_taps::MAX_DAYS))
            })?,
    };
    let utc_offset_minutes = match number("utc_offset_minutes") {
        None => 0,
        Some(m) => m
            .parse::<i32>()
            .ok()
            .filter(|m| m.unsigned_abs() <= 14 * 60)
            .ok_or_else(|| PageError::Bad("Local time: -840 to 840 minutes from UTC.".into()))?,
    };
    Ok(Upload {
        name,
        rules,
        taps,
        days,
        utc_offset_minutes,
        publish: field("action").is_some_and(|a| a.text() == "publish"),
    })
}

/// The simulation's figures, in the table's currency.
fn simulation_ctx(rep: &fare_rules::simulate::Report) -> minijinja::Value {
    let m = |v: i64| money(v, &rep.currency);
    let change = |v: i64| format!("{}{}", if v > 0 { "+" } else { "" }, m(v));
    let rows: Vec<minijinja::Value> = rep
        .by_rider_category
        .iter()
        .map(|(cat, i)| {
            minijinja::context! {
                category => cat, taps => i.taps, baseline => m(i.baseline_minor),
                new => m(i.new_minor), change => change(i.change_minor),
            }
        })
        .collect();
    minijinja::context! {
        taps => rep.taps, cards => rep.cards, baseline => m(rep.total.baseline_minor),
        new => m(rep.total.new_minor), change => change(rep.total.change_minor), rows => rows,
        unpriced => rep.unpriced_taps, unpriced_examples => rep.unpriced_examples,
    }
}

/// What the upload gave: the findings, the simulation, what publishing did.
fn result_ctx(
    prop: &Proposal,
    sim: Option<Result<fare_rules::simulate::Report, String>>,
    outcome: Option<Outcome>,
) -> minijinja::Value {
    let findings: Vec<minijinja::Value> = prop
        .review
        .findings
        .iter()
        .map(|f| {
            minijinja::context! {
                error => f.level == fare_rules::check::Level::Error, origin => f.origin,
                message => f.message,
            }
        })
        .collect();
    let (published, refused) = match outcome {
        Some(Outcome::Published(t)) => (Some(published_ctx(&t)), None),
        Some(Outcome::Refused(why)) => (None, Some(why)),
        None => (None, None),
    };
    minijinja::context! {
        name => prop.name, table => prop.engine.table().meta.name,
        version => prop.engine.table().meta.version, summary => prop.review.summary,
        errors => prop.review.errors, findings => findings,
        simulation => sim.as_ref().map(|s| s.as_ref().ok().map(simulation_ctx)),
        simulation_error => sim.and_then(Result::err),
        published => published, refused => refused,
    }
}

/// The revenue impact against the published table: over the tap log given, else over the
/// back office's taps cleared in the last `days` days ([`recent_taps`]); and what it replayed.
fn simulation(
    p: &Pages,
    prop: &Proposal,
    u: &Upload,
) -> Result<(Option<Result<fare_rules::simulate::Report, String>>, String), PageError> {
    let l = p.api.loads.ledger();
    let r = l.read()?;
    let Some(current) = fares::published(&*r)? else {
        let none = "No table is published yet: there is nothing to compare with.";
        return Ok((Some(Err(none.into())), String::new()));
    };
    if let Some((name, log)) = &u.taps {
        let against = format!("the tap log {name}");
        return Ok((Some(fares::simulate(prop, &current, name, log)), against));
    }
    let recent = recent_taps::recent_tap_log(&*r, p.now(), u.days, u.utc_offset_minutes)?;
    let mut against = format!(
        "the {} taps the back office cleared in the last {} days ({} without a charge, timed as the tap before them; booking times, local at UTC{:+} minutes)",
        recent.taps, u.days, recent.free, u.utc_offset_minutes
    );
    if recent.without_stop > 0 {
        against.push_str(&format!(
            "; {} cleared without their stop left out",
            recent.without_stop
        ));
    }
    if recent.beyond_limit > 0 {
        against.push_str(&format!(
            "; the newest {} only ({} older left out)",
            recent_taps::MAX_TAPS,
            recent.beyond_limit
        ));
    }
    if recent.taps == 0 {
        let why = format!(
            "no tap cleared in the last {} days carries its stop: upload a tap log instead.",
            u.days
        );
        return Ok((Some(Err(why)), against));
    }
    let name = "the back office's recent taps";
    Ok((
        Some(fares::simulate(prop, &current, name, &recent.csv)),
        against,
    ))
}

/// `POST /console/fares` (multipart, the session's CSRF token): check, simulate, and publish
/// when asked and nothing is wrong.
async fn fares_post(
    State(p): State<Pages>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    p.answer(async {
        // An operator's session before the body is read; its CSRF token is in the body.
        p.signed_in_as(&headers, PageRole::Operator)?;
        let parts = tapgate_http::pages::multipart(&headers, &body)?;
        let csrf = parts
            .iter()
            .find(|x| x.name == "csrf")
            .map(Part::text)
            .unwrap_or_default();
        let s = p.posted_as(&headers, &csrf, PageRole::Operator)?;
        let u = upload(&parts)?;
        let (p2, by) = (p.clone(), s.holder.clone());
        let made = blocking(move || {
            let prop = match fares::propose(&u.name, &u.rules) {
                Ok(prop) => prop,
                Err(FaresError::Rules(why)) => return Ok(Err(why)),
                Err(e) => return Err(PageError::Internal(e.to_string())),
            };
            let (sim, against) = simulation(&p2, &prop, &u)?;
            let outcome = if u.publish {
                let now = p2.now();
                Some(
                    fares::publish(&p2.api.loads, &prop, &by, now)
                        .map_err(|e| PageError::Internal(e.to_string()))?,
                )
            } else {
                None
            };
            Ok(Ok(
                minijinja::context! { against => against, ..result_ctx(&prop, sim, outcome) },
            ))
        })
        .await?;
        let refused = made.is_err();
        let result = made.unwrap_or_else(|why| minijinja::context! { compile_error => why });
        let mut r = render(&p, &s, result).await?;
        if refused {
            *r.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
        }
        Ok(r)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str, text: &str) -> Part {
        Part {
            name: name.into(),
            file_name: None,
            bytes: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_local_time_offset_is_refused_outside_14_hours_even_at_i32_min() {
        let with = |m: &str| upload(&[part("source", "x"), part("utc_offset_minutes", m)]);
        assert_eq!(with("-840").unwrap().utc_offset_minutes, -840);
        assert_eq!(with("840").unwrap().utc_offset_minutes, 840);
        for bad in ["841", "-841", "-2147483648", "2147483647"] {
            assert!(matches!(with(bad), Err(PageError::Bad(_))), "{bad}");
        }
    }
}
