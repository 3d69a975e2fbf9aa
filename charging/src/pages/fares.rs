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
    publish: bool,
}

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
    Ok(Upload {
        name,
        rules,
        taps,
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
            let current = fares::published(&*p2.api.loads.ledger().read()?)?;
            let sim = u.taps.map(|(name, log)| match &current {
                Some(c) => fares::simulate(&prop, c, &name, &log),
                None => Err("No table is published yet: there is nothing to compare with.".into()),
            });
            let outcome = if u.publish {
                let now = p2.now();
                Some(
                    fares::publish(&p2.api.loads, &prop, &by, now)
                        .map_err(|e| PageError::Internal(e.to_string()))?,
                )
            } else {
                None
            };
            Ok(Ok(result_ctx(&prop, sim, outcome)))
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
