//! The cardholder pages and the operator console: served by the charging server on its own
//! listener, beside the API.
//!
//! Server-rendered HTML (minijinja templates, escaped by default) with a little JavaScript; the
//! templates, the style sheet and the script are compiled into the binary. A cardholder signs
//! in with a password (an Argon2id hash in the server's configuration, `[[pages.cardholders]]`),
//! and gets a session in an HttpOnly, SameSite=Strict cookie (Secure over TLS). Every form
//! carries the session's CSRF token (the sign-in form: a token in its own cookie) and a POST
//! without it is refused. Sign-in is rate-limited per account and per client address. A
//! cardholder sees only the cards registered to their account (the card's `owner`, which is
//! also their API caller name): another card answers 404, as an unknown one does.
//!
//! Pages: the cards, a card (balance, history of trips and loads from the ledger's postings,
//! the loads with their state), top up (an amount and an instrument the holder owns; the load
//! itself is made by `tapgate charge` at a reader with the top-up's idempotency key, or paid
//! now as an action-list order the card's next tap picks up: [`pickup`]), report lost or
//! stolen (a confirmation, then the block reaching the validators as the gateways report it:
//! [`reach`]), receipts (a load, a month of trips).
//!
//! Operators (`[[pages.operators]]`) sign in on the same form, with the same sessions, CSRF
//! tokens and limits; the session carries the role, and the console (`/console`, [`console`])
//! answers 403 to a cardholder's session as the cardholder pages do to an operator's.
//! docs/pages.md describes them.

mod card;
mod console;
mod fares;
mod pickup;
mod reach;
pub mod recent_taps;

pub use card::{money, parse_money, Entry, LoadView, TopUp};
pub use tapgate_http::pages::{
    check_phc, hash_password, verify_password, CardholderLogin, PageLogin, PageRole, PagesConfig,
};

use crate::api::AppState;
use crate::ledger::LedgerRead;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use std::sync::Arc;
use tapgate_http::pages::{blocking, session, HasSite, PageError, Site};

/// The pages' own state beside the API's.
#[derive(Clone)]
struct Pages {
    api: AppState,
    /// Sign-in, sessions, templates (shared with the gateway's console).
    site: Arc<Site>,
    currency: String,
}

/// A request to one of a card's routes (`/…/{uid}…`): the pages, the path's parameters (`T`:
/// the card number alone, or with the route's other parameter after it) and the request's
/// headers.
struct CardRequest<T = String>(Pages, T, HeaderMap);

impl<T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<Pages>
    for CardRequest<T>
{
    /// The path's own: the answer a handler taking `Path` gives.
    type Rejection = axum::extract::rejection::PathRejection;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        p: &Pages,
    ) -> Result<Self, Self::Rejection> {
        let Path(path) = Path::<T>::from_request_parts(parts, p).await?;
        Ok(CardRequest(p.clone(), path, parts.headers.clone()))
    }
}

impl HasSite for Pages {
    fn site(&self) -> &Site {
        &self.site
    }
}

/// The templates, compiled into the binary (beside the shared ones: `login.html`,
/// `message.html`, `console_chart.html`).
const TEMPLATES: [(&str, &str); 19] = [
    ("base.html", include_str!("templates/base.html")),
    ("home.html", include_str!("templates/home.html")),
    ("cards.html", include_str!("templates/cards.html")),
    ("card.html", include_str!("templates/card.html")),
    (
        "card_history.html",
        include_str!("templates/card_history.html"),
    ),
    ("topup.html", include_str!("templates/topup.html")),
    (
        "topup_state.html",
        include_str!("templates/topup_state.html"),
    ),
    ("report.html", include_str!("templates/report.html")),
    ("reach.html", include_str!("templates/reach.html")),
    (
        "receipt_load.html",
        include_str!("templates/receipt_load.html"),
    ),
    (
        "receipt_month.html",
        include_str!("templates/receipt_month.html"),
    ),
    ("console.html", include_str!("templates/console.html")),
    (
        "console_card.html",
        include_str!("templates/console_card.html"),
    ),
    (
        "console_card_body.html",
        include_str!("templates/console_card_body.html"),
    ),
    (
        "console_blocks.html",
        include_str!("templates/console_blocks.html"),
    ),
    (
        "console_anomalies.html",
        include_str!("templates/console_anomalies.html"),
    ),
    (
        "console_traffic.html",
        include_str!("templates/console_traffic.html"),
    ),
    (
        "console_settlement.html",
        include_str!("templates/console_settlement.html"),
    ),
    (
        "console_fares.html",
        include_str!("templates/console_fares.html"),
    ),
];
/// The environment with the shared templates and these.
#[cfg(test)]
fn environment() -> minijinja::Environment<'static> {
    tapgate_http::pages::environment(&TEMPLATES)
}

/// The pages' routes, to merge into the API's router. `tls`: the listener serves HTTPS
/// (cookies are then Secure).
pub fn router(
    api: AppState,
    cfg: &PagesConfig,
    tls: bool,
    currency: &str,
) -> Result<Router, String> {
    if !cfg.enabled {
        return Ok(Router::new());
    }
    let site = Site::new(cfg, &TEMPLATES, tls, api.clock.clone(), |role| match role {
        PageRole::Cardholder => "/cards",
        PageRole::Operator => "/console",
    })?;
    let pages = Pages {
        api,
        site: Arc::new(site),
        currency: currency.to_string(),
    };
    Ok(Router::new()
        .route("/", get(home))
        .route("/cards", get(cards))
        .route("/cards/{uid}", get(card_page))
        .route("/cards/{uid}/topup", get(topup_form).post(topup))
        .route("/cards/{uid}/topups/{id}", get(topup_state))
        .route("/cards/{uid}/report", get(report_form).post(report))
        .route("/cards/{uid}/receipts/load/{tmc}", get(receipt_load))
        .route("/cards/{uid}/receipts/month/{month}", get(receipt_month))
        .merge(console::routes())
        .merge(fares::routes())
        .merge(reach::routes())
        .merge(tapgate_http::pages::sign_in_routes())
        .layer(axum::middleware::map_response(
            tapgate_http::pages::security_headers,
        ))
        .with_state(pages))
}

impl From<crate::ledger::LedgerError> for PageError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        PageError::Internal(e.to_string())
    }
}

impl Pages {
    fn render(&self, name: &str, ctx: minijinja::Value) -> Response {
        self.site.render(name, ctx)
    }

    fn error(&self, e: PageError) -> Response {
        self.site.error(e)
    }

    fn now(&self) -> u64 {
        self.site.now()
    }

    /// The signed-in session, if any.
    fn session(&self, headers: &HeaderMap) -> Option<(String, session::Session)> {
        self.site.session(headers)
    }

    /// The signed-in cardholder's session.
    fn signed_in(&self, headers: &HeaderMap) -> Result<session::Session, PageError> {
        self.signed_in_as(headers, PageRole::Cardholder)
    }

    /// The signed-in session if it is `role`'s: to the sign-in page without one, 403 for
    /// another role's.
    fn signed_in_as(
        &self,
        headers: &HeaderMap,
        role: PageRole,
    ) -> Result<session::Session, PageError> {
        self.site.signed_in_as(headers, role)
    }

    /// The cardholder's session of a POST whose form carries its CSRF token.
    fn posted(&self, headers: &HeaderMap, csrf: &str) -> Result<session::Session, PageError> {
        self.posted_as(headers, csrf, PageRole::Cardholder)
    }

    /// `role`'s session of a POST whose form carries its CSRF token.
    fn posted_as(
        &self,
        headers: &HeaderMap,
        csrf: &str,
        role: PageRole,
    ) -> Result<session::Session, PageError> {
        self.site.posted_as(headers, csrf, role)
    }

    /// The holder's card `uid_hex`: refused as not found when it is not theirs.
    fn own_card(
        &self,
        r: &dyn LedgerRead,
        holder: &str,
        uid_hex: &str,
    ) -> Result<[u8; 7], PageError> {
        let not_found = || PageError::NotFound("You have no card with that number.".into());
        let uid: [u8; 7] = hex::decode(uid_hex)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(not_found)?;
        if !r.card_known(&uid)? {
            return Err(not_found());
        }
        if r.card(&uid)?.owner.as_deref() != Some(holder) {
            return Err(not_found());
        }
        Ok(uid)
    }

    fn money(&self, minor: i64) -> String {
        money(minor, &self.currency)
    }

    /// Runs `f` over a read of the ledger on a blocking thread (with the pages' state).
    async fn read<T, F>(&self, f: F) -> Result<T, PageError>
    where
        T: Send + 'static,
        F: FnOnce(&Pages, &dyn LedgerRead) -> Result<T, PageError> + Send + 'static,
    {
        let p = self.clone();
        blocking(move || {
            let l = p.api.loads.ledger();
            let r = l.read()?;
            f(&p, &*r)
        })
        .await
    }

    /// [`Pages::read`] of the holder's own card `uid_hex` (not theirs: not found, as
    /// [`Pages::own_card`]): `f` gets its UID and the holder.
    async fn read_own_card<T, F>(
        &self,
        s: &session::Session,
        uid_hex: String,
        f: F,
    ) -> Result<T, PageError>
    where
        T: Send + 'static,
        F: FnOnce(&Pages, &dyn LedgerRead, [u8; 7], &str) -> Result<T, PageError> + Send + 'static,
    {
        let holder = s.holder.clone();
        self.read(move |p, r| {
            let uid = p.own_card(r, &holder, &uid_hex)?;
            f(p, r, uid, &holder)
        })
        .await
    }

    /// The page a handler made, or its error's page.
    async fn answer(
        &self,
        page: impl std::future::Future<Output = Result<Response, PageError>>,
    ) -> Response {
        page.await.unwrap_or_else(|e| self.error(e))
    }
}

async fn home(State(p): State<Pages>, headers: HeaderMap) -> Response {
    let s = p.session(&headers).map(|(_, s)| s);
    let of = |role| {
        s.as_ref()
            .filter(|s| s.role == role)
            .map(|s| s.holder.clone())
    };
    p.render(
        "home.html",
        minijinja::context! {
            holder => of(PageRole::Cardholder), operator => of(PageRole::Operator),
            csrf => s.as_ref().map(|s| s.csrf.clone()),
        },
    )
}

async fn cards(State(p): State<Pages>, headers: HeaderMap) -> Response {
    p.answer(async {
        let s = p.signed_in(&headers)?;
        let holder = s.holder.clone();
        let list = p
            .read(move |p2, r| {
                // The holder's cards from the index by owner: the reads grow with the holder's
                // cards, not the ledger's (a reload costs what the holder owns).
                let mut out = Vec::new();
                for uid in r.cards_of_owner(&holder)? {
                    let shadow = r.card(&uid)?;
                    let balance = r.balance(&crate::ledger::card_account(&uid))?;
                    out.push(minijinja::context! {
                        uid => hex::encode_upper(uid),
                        balance => p2.money(balance),
                        blocked => shadow.blocked,
                        block_reason => shadow.block_reason,
                    });
                }
                Ok(out)
            })
            .await?;
        Ok::<_, PageError>(p.render(
            "cards.html",
            minijinja::context! { holder => s.holder, csrf => s.csrf, cards => list },
        ))
    })
    .await
}

#[derive(Deserialize)]
struct CardQuery {
    #[serde(default)]
    page: Option<usize>,
    #[serde(default)]
    blocklist_version: Option<u64>,
}

/// History lines per page.
const PAGE_LINES: usize = 20;

fn entry_ctx(p: &Pages, e: &Entry) -> minijinja::Value {
    minijinja::context! {
        when => card::when(e.time_ms),
        kind => e.kind,
        place => e.place,
        amount => p.money(e.amount_minor),
        credit => e.amount_minor > 0,
        tmc => e.tmc,
        stop => e.stop,
        marks => e.marks,
        month => card::month_of(e.time_ms),
    }
}

async fn card_page(
    CardRequest(p, uid_hex, headers): CardRequest,
    Query(q): Query<CardQuery>,
) -> Response {
    p.answer(async {
        let s = p.signed_in(&headers)?;
        let page = q.page.unwrap_or(1).clamp(1, 1_000_000);
        let ctx = p.read_own_card(&s, uid_hex, move |p2, r, uid, holder| {
            let shadow = r.card(&uid)?;
            let balance = r.balance(&crate::ledger::card_account(&uid))?;
            let history = card::history(r, &uid)?;
            let pages = history.len().div_ceil(PAGE_LINES).max(1);
            let shown: Vec<minijinja::Value> = history
                .iter()
                .skip((page - 1) * PAGE_LINES)
                .take(PAGE_LINES)
                .map(|e| entry_ctx(p2, e))
                .collect();
            let loads = card::loads(r, &uid)?;
            let hex_uid = hex::encode_upper(uid);
            let topups: Vec<minijinja::Value> = card::topups(r, holder)?
                .into_iter()
                .filter(|t| t.card_uid == hex_uid)
                .take(10)
                .map(|t| {
                    let state = match t.order_id {
                        Some(id) => pickup::state(r, id)?.0,
                        None => t.state(holder, &loads).0,
                    };
                    Ok(minijinja::context! {
                        id => t.id, amount => p2.money(t.amount_minor), source => t.source,
                        instrument => t.instrument, when => card::when(t.created_ms), state => state,
                    })
                })
                .collect::<Result<_, PageError>>()?;
            let load_rows: Vec<minijinja::Value> = loads
                .iter()
                .take(20)
                .map(|l| {
                    minijinja::context! {
                        when => card::when(l.created_ms), amount => p2.money(l.amount_minor),
                        source => l.source, state => l.state, tmc => l.tmc_before + 1,
                    }
                })
                .collect();
            let mut free = card::free_taps(r, &uid, shadow.last_tmc)?;
            free.truncate(PAGE_LINES);
            let mut months: Vec<String> = history
                .iter()
                .filter(|e| e.kind == "trip")
                .map(|e| card::month_of(e.time_ms))
                .collect();
            months.dedup();
            let reach = match shadow.blocked {
                true => reach::card_figure(r, &uid, p2.now())?,
                false => None,
            };
            Ok(minijinja::context! {
                uid => hex_uid,
                reach => reach.map(minijinja::Value::from_serialize),
                balance => p2.money(balance),
                proved_balance => shadow.last_reported_balance_minor.map(|b| p2.money(i64::from(b))),
                last_tmc => shadow.last_tmc,
                blocked => shadow.blocked,
                block_reason => shadow.block_reason,
                history => shown,
                page => page,
                pages => pages,
                loads => load_rows,
                topups => topups,
                months => months,
                free_taps => free,
            })
        })
        .await?;
        Ok::<_, PageError>(p.render(
            "card.html",
            minijinja::context! {
                holder => s.holder, csrf => s.csrf, card => ctx,
                blocklist_version => q.blocklist_version,
            },
        ))
    })
    .await
}

/// The holder's instruments, as `source:instrument` choices.
fn instruments(r: &dyn LedgerRead, holder: &str) -> Result<Vec<(String, String)>, PageError> {
    Ok(r.instruments_of(holder)?
        .into_iter()
        .map(|i| (i.source, i.id))
        .collect())
}

async fn topup_form(CardRequest(p, uid_hex, headers): CardRequest) -> Response {
    topup_page(&p, &headers, uid_hex, StatusCode::OK, None, "")
        .await
        .unwrap_or_else(|e| p.error(e))
}

async fn topup_page(
    p: &Pages,
    headers: &HeaderMap,
    uid_hex: String,
    status: StatusCode,
    error: Option<String>,
    amount: &str,
) -> Result<Response, PageError> {
    let s = p.signed_in(headers)?;
    let (uid, choices, blocked) = p
        .read_own_card(&s, uid_hex, move |_, r, uid, holder| {
            Ok((uid, instruments(r, holder)?, r.card(&uid)?.blocked))
        })
        .await?;
    let choices: Vec<minijinja::Value> = choices
        .into_iter()
        .map(|(s, i)| minijinja::context! { value => format!("{s}:{i}"), source => s, instrument => i })
        .collect();
    let mut r = p.render(
        "topup.html",
        minijinja::context! {
            holder => s.holder, csrf => s.csrf, uid => hex::encode_upper(uid),
            instruments => choices, error => error, amount => amount, blocked => blocked,
            currency => p.currency, token => new_topup_token(),
        },
    );
    *r.status_mut() = status;
    Ok(r)
}

#[derive(Deserialize)]
struct TopUpForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    amount: String,
    #[serde(default)]
    funding: String,
    /// `pickup`: paid now, picked up at the card's next tap; otherwise at a reader.
    #[serde(default)]
    how: String,
    /// The form's top-up token ([`new_topup_token`]): the top-up's id.
    #[serde(default)]
    token: String,
}

/// A new top-up form's token. It becomes the top-up's id, and so its order's and its load's
/// idempotency key: the same form posted twice (a double click, a resubmission after an
/// error) is one top-up, one order, one record.
fn new_topup_token() -> String {
    session::random_token()[..32].to_string()
}

/// The top-up id a form's token gives: the token (16 to 64 letters and digits); a form from
/// before tokens (none) gets a random one.
fn topup_id(token: &str) -> Result<String, PageError> {
    if token.is_empty() {
        return Ok(session::random_token()[..16].to_string());
    }
    if (16..=64).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Ok(token.to_string());
    }
    Err(PageError::Bad(
        "This form is out of date: open the top-up page again.".into(),
    ))
}

/// Makes the top-up `t` (its id from the form's token) for `holder`'s card `uid_hex`, or says
/// why not (shown on the form). Runs on a blocking thread.
///
/// A top-up paid now is two writes: the order (`LoadService::create_order`, its posting and
/// list change in the order's own ledger transaction, after the funding source authorised it
/// — a call outside any transaction) and then the holder's record of the top-up. They are not
/// one transaction, because the order's is the load service's, committed between the
/// authorisation and its capture; instead both are idempotent under the form's token, and
/// written in that order. A crash between them leaves the order (paid, on the action list,
/// picked up at the next tap or refunded at expiry: no value is lost) without its record
/// here; the same form posted again finds the order by its idempotency key, makes no second
/// one, and writes the record once ([`card::record_topup`] also retries a write whose outcome
/// the ledger could not tell).
fn make_topup(
    p: &Pages,
    holder: &str,
    uid_hex: &str,
    mut t: TopUp,
    funding: &str,
    pickup: bool,
) -> Result<Result<TopUp, String>, PageError> {
    let l = p.api.loads.ledger();
    let r = l.read()?;
    let uid = p.own_card(&*r, holder, uid_hex)?;
    t.card_uid = hex::encode_upper(uid);
    if let Some(done) = card::topups(&*r, holder)?
        .into_iter()
        .find(|x| x.id == t.id)
    {
        // Posted before: that top-up, if this is the same form.
        let same = (&done.card_uid, done.amount_minor, done.order_id.is_some())
            == (&t.card_uid, t.amount_minor, pickup)
            && format!("{}:{}", done.source, done.instrument) == funding;
        return Ok(match same {
            true => Ok(done),
            false => Err("This form was sent already: open the top-up page again.".into()),
        });
    }
    if r.card(&uid)?.blocked {
        return Ok(Err(
            "This card is blocked: it cannot be topped up.".to_string()
        ));
    }
    let Some((source, instrument)) = instruments(&*r, holder)?
        .into_iter()
        .find(|(s, i)| format!("{s}:{i}") == funding)
    else {
        return Ok(Err("Choose one of your funding instruments.".to_string()));
    };
    drop(r);
    (t.source, t.instrument) = (source, instrument);
    if pickup {
        match pickup::order_topup(p, holder, uid, &t)? {
            Ok(id) => t.order_id = Some(id),
            Err(why) => return Ok(Err(why)),
        }
    }
    card::record_topup(l, holder, &t)?;
    Ok(Ok(t))
}

async fn topup(
    CardRequest(p, uid_hex, headers): CardRequest,
    Form(f): Form<TopUpForm>,
) -> Response {
    p.answer(async {
        let s = p.posted(&headers, &f.csrf)?;
        let Some(amount) =
            parse_money(&f.amount, &p.currency).filter(|a| *a > 0 && *a <= i64::from(i32::MAX))
        else {
            return topup_page(
                &p,
                &headers,
                uid_hex,
                StatusCode::BAD_REQUEST,
                Some(format!(
                    "Enter an amount in {}, more than zero.",
                    p.currency
                )),
                &f.amount,
            )
            .await;
        };
        let id = topup_id(&f.token)?;
        let (p2, holder, uid_in) = (p.clone(), s.holder.clone(), uid_hex.clone());
        let (funding, pickup) = (f.funding.clone(), f.how == "pickup");
        let made = blocking(move || {
            let t = TopUp {
                id,
                card_uid: String::new(),
                amount_minor: amount,
                source: String::new(),
                instrument: String::new(),
                created_ms: p2.now(),
                order_id: None,
            };
            make_topup(&p2, &holder, &uid_in, t, &funding, pickup)
        })
        .await?;
        match made {
            Ok(t) => {
                Ok(Redirect::to(&format!("/cards/{}/topups/{}", t.card_uid, t.id)).into_response())
            }
            Err(why) => {
                topup_page(
                    &p,
                    &headers,
                    uid_hex,
                    StatusCode::BAD_REQUEST,
                    Some(why),
                    &f.amount,
                )
                .await
            }
        }
    })
    .await
}

async fn topup_state(
    CardRequest(p, (uid_hex, id), headers): CardRequest<(String, String)>,
) -> Response {
    p.answer(async {
        let s = p.signed_in(&headers)?;
        let (t, state, tmc, order) = p
            .read_own_card(&s, uid_hex, move |_, r, uid, holder| {
                let hex_uid = hex::encode_upper(uid);
                let t = card::topups(r, holder)?
                    .into_iter()
                    .find(|t| t.id == id && t.card_uid == hex_uid)
                    .ok_or_else(|| PageError::NotFound("No such top-up.".into()))?;
                let loads = card::loads(r, &uid)?;
                let (state, tmc) = t.state(holder, &loads);
                let order = t.order_id.map(|id| pickup::state(r, id)).transpose()?;
                Ok((t, state, tmc, order))
            })
            .await?;
        let (state, tmc, expires) = match order {
            Some((state, expires_ms)) => (state, None, Some(card::when(expires_ms))),
            None => (state, tmc, None),
        };
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1:8443");
        let server = format!("{}://{host}", if p.site.tls() { "https" } else { "http" });
        Ok::<_, PageError>(p.render(
            "topup_state.html",
            minijinja::context! {
                holder => s.holder, csrf => s.csrf, uid => t.card_uid,
                amount => p.money(t.amount_minor), amount_minor => t.amount_minor,
                source => t.source, instrument => t.instrument, when => card::when(t.created_ms),
                state => state, load_tmc => tmc.map(|t| t + 1), key => t.idempotency_key(),
                server => server, pickup => t.order_id.is_some(), expires => expires,
            },
        ))
    })
    .await
}

async fn report_form(CardRequest(p, uid_hex, headers): CardRequest) -> Response {
    p.answer(async {
        let s = p.signed_in(&headers)?;
        let (uid, blocked) = p.read_own_card(&s, uid_hex, move |_, r, uid, _| {
            Ok((uid, r.card(&uid)?.blocked))
        })
        .await?;
        Ok::<_, PageError>(p.render(
            "report.html",
            minijinja::context! { holder => s.holder, csrf => s.csrf, uid => hex::encode_upper(uid), blocked => blocked },
        ))
    })
    .await
}

#[derive(Deserialize)]
struct ReportForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

async fn report(
    CardRequest(p, uid_hex, headers): CardRequest,
    Form(f): Form<ReportForm>,
) -> Response {
    p.answer(async {
        let s = p.posted(&headers, &f.csrf)?;
        let reason = match f.reason.as_str() {
            "lost" | "stolen" => f.reason.clone(),
            _ => {
                return Err(PageError::Bad(
                    "Choose whether the card was lost or stolen.".into(),
                ))
            }
        };
        let (p2, holder) = (p.clone(), s.holder.clone());
        let (uid, version) = blocking(move || {
            let l = p2.api.loads.ledger();
            let uid = p2.own_card(&*l.read()?, &holder, &uid_hex)?;
            let now = p2.now();
            let version = l.transact(move |t| t.set_blocked(&uid, true, &reason, now))?;
            Ok((uid, version))
        })
        .await?;
        let mut to = format!("/cards/{}", hex::encode_upper(uid));
        if let Some(v) = version {
            to.push_str(&format!("?blocklist_version={v}"));
        }
        Ok(Redirect::to(&to).into_response())
    })
    .await
}

async fn receipt_load(
    CardRequest(p, (uid_hex, tmc), headers): CardRequest<(String, u32)>,
) -> Response {
    p.answer(async {
        let s = p.signed_in(&headers)?;
        let (uid, entry) = p
            .read_own_card(&s, uid_hex, move |_, r, uid, _| {
                let e = card::history(r, &uid)?
                    .into_iter()
                    .find(|e| e.kind == "load" && e.tmc == Some(tmc))
                    .ok_or_else(|| {
                        PageError::NotFound("No completed load at that counter.".into())
                    })?;
                Ok((uid, e))
            })
            .await?;
        Ok::<_, PageError>(p.render(
            "receipt_load.html",
            minijinja::context! {
                holder => s.holder, csrf => s.csrf, uid => hex::encode_upper(uid),
                load => entry_ctx(&p, &entry), operator => p.api.operator,
            },
        ))
    })
    .await
}

async fn receipt_month(
    CardRequest(p, (uid_hex, month), headers): CardRequest<(String, String)>,
) -> Response {
    p.answer(async {
        let s = p.signed_in(&headers)?;
        let valid = month.len() == 7
            && month.as_bytes()[4] == b'-'
            && month
                .chars()
                .enumerate()
                .all(|(i, c)| i == 4 || c.is_ascii_digit());
        if !valid {
            return Err(PageError::NotFound("A month is written YYYY-MM.".into()));
        }
        let m = month.clone();
        let (uid, trips) = p
            .read_own_card(&s, uid_hex, move |_, r, uid, _| {
                let mut trips: Vec<Entry> = card::history(r, &uid)?
                    .into_iter()
                    .filter(|e| e.kind == "trip" && card::month_of(e.time_ms) == m)
                    .collect();
                trips.reverse();
                Ok((uid, trips))
            })
            .await?;
        let total: i64 = trips.iter().map(|e| -e.amount_minor).sum();
        let rows: Vec<minijinja::Value> = trips.iter().map(|e| entry_ctx(&p, e)).collect();
        Ok::<_, PageError>(p.render(
            "receipt_month.html",
            minijinja::context! {
                holder => s.holder, csrf => s.csrf, uid => hex::encode_upper(uid), month => month,
                trips => rows, total => p.money(total), count => trips.len(),
            },
        ))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A top-up form's token is posted by the signed-in cardholder and becomes an id in the
    /// ledger and in a URL: only 16 to 64 letters and digits are taken; an empty one (a form
    /// from before tokens) gets a fresh id.
    #[test]
    fn a_top_up_token_is_taken_only_as_16_to_64_letters_and_digits() {
        let ok = "a1B2c3D4e5F6g7H8";
        assert_eq!(topup_id(ok).unwrap(), ok);
        assert_eq!(topup_id(&"x".repeat(64)).unwrap(), "x".repeat(64));
        let fresh = topup_id("").unwrap();
        assert_eq!(fresh.len(), 16);
        assert_ne!(fresh, topup_id("").unwrap(), "a fresh id each time");
        for bad in [
            "short",
            &"x".repeat(15),
            &"x".repeat(65),
            "../../cards/0000000000000000",
            "abcdefghijklmnop/",
            "abcdefghijklmnop\n",
            "abcdefghijklmnöp",
        ] {
            assert!(
                matches!(topup_id(bad), Err(PageError::Bad(_))),
                "{bad:?} taken"
            );
        }
    }

    #[test]
    fn every_template_compiles() {
        let env = environment();
        for (name, _) in tapgate_http::pages::SHARED_TEMPLATES {
            assert!(env.get_template(name).is_ok(), "{name}");
        }
        for (name, _) in TEMPLATES {
            assert!(env.get_template(name).is_ok(), "{name}");
        }
    }
}
#[cfg(test)]
mod render {
    /// Templates are strict about undefined names: a card page renders with every field.
    #[test]
    fn a_card_page_renders() {
        let env = super::environment();
        let card = minijinja::context! { uid => "04", balance => "5 KRW", proved_balance => None::<String>, last_tmc => 0, blocked => false, block_reason => None::<String>, history => vec![minijinja::context!{when => "w", kind => "issue", place => "float", amount => "5", credit => true, tmc => None::<u32>, stop => None::<String>, marks => Vec::<&str>::new(), month => "2026-01"}, minijinja::context!{when => "w", kind => "trip", place => "metro", amount => "-5", credit => false, tmc => Some(6u32), stop => Some("stop 12, route 3"), marks => vec!["capped"], month => "2026-01"}], page => 1usize, pages => 1usize, loads => Vec::<minijinja::Value>::new(), topups => Vec::<minijinja::Value>::new(), months => Vec::<String>::new(), free_taps => vec![minijinja::context!{tmc => 7u32, stop => Some("stop 9"), marks => vec!["transfer"]}] };
        let r = env.get_template("card.html").unwrap().render(minijinja::context!{ holder => "ann", csrf => "c", card => card, blocklist_version => None::<u64> });
        let html = r.unwrap();
        assert!(
            html.contains("Page 1 of 1")
                && html
                    .contains(r#"<li>counter 7 at stop 9 <span class="mark">transfer</span></li>"#)
                && html.contains(r#"metro, stop 12, route 3 <span class="mark">capped</span>"#)
                && !html.contains("not sent them"),
            "{html}"
        );
    }
}
