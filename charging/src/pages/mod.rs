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
//! itself is made by `tapgate charge` at a reader with the top-up's idempotency key), report
//! lost or stolen (a confirmation, then the block), receipts (a load, a month of trips).
//!
//! Operators (`[[pages.operators]]`) sign in on the same form, with the same sessions, CSRF
//! tokens and limits; the session carries the role, and the console (`/console`, [`console`])
//! answers 403 to a cardholder's session as the cardholder pages do to an operator's.
//! docs/pages.md describes them.

mod card;
mod console;
mod session;

pub use card::{money, parse_money, Entry, LoadView, TopUp};
pub use session::{check_phc, hash_password, verify_password, PageRole};

use crate::api::AppState;
use crate::ledger::LedgerRead;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use session::{Sessions, SignInLimiter, Throttled};
use std::sync::Arc;

/// A cardholder or an operator who may sign in to the pages.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageLogin {
    /// The account name: a cardholder's is the owner of their cards (their API caller name).
    pub name: String,
    /// The password's Argon2id hash, a PHC string (`tapgate charging page-login`).
    pub password_argon2: String,
}

/// A cardholder's login (`[[pages.cardholders]]`).
pub type CardholderLogin = PageLogin;

impl std::fmt::Debug for PageLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageLogin")
            .field("name", &self.name)
            .field("password_argon2", &"<hash>")
            .finish()
    }
}

/// The `[pages]` table of the charging server's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PagesConfig {
    /// Serve the pages (default true; without cardholders nobody can sign in).
    pub enabled: bool,
    /// Cardholders who may sign in.
    pub cardholders: Vec<PageLogin>,
    /// Operators who may sign in to the console.
    pub operators: Vec<PageLogin>,
    /// A session idle this long ends (default 30 minutes).
    pub session_idle_ms: u64,
    /// Failed sign-ins per account within `sign_in_window_ms` before it is refused (default 5).
    pub max_failures_per_account: u32,
    /// Sign-in attempts per client address within `sign_in_window_ms` (default 30).
    pub max_attempts_per_address: u32,
    /// The sign-in limits' window (default 15 minutes).
    pub sign_in_window_ms: u64,
}

impl Default for PagesConfig {
    fn default() -> Self {
        PagesConfig {
            enabled: true,
            cardholders: Vec::new(),
            operators: Vec::new(),
            session_idle_ms: 30 * 60_000,
            max_failures_per_account: 5,
            max_attempts_per_address: 30,
            sign_in_window_ms: 15 * 60_000,
        }
    }
}

impl PagesConfig {
    /// Every login with its role.
    fn logins(&self) -> impl Iterator<Item = (PageRole, &PageLogin)> {
        self.cardholders
            .iter()
            .map(|c| (PageRole::Cardholder, c))
            .chain(self.operators.iter().map(|c| (PageRole::Operator, c)))
    }

    /// Checks the logins: names unique (across cardholders and operators) and not another
    /// role's token, hashes Argon2id.
    pub fn check(&self, tokens: &[crate::api::TokenEntry]) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (role, c) in self.logins() {
            let table = match role {
                PageRole::Cardholder => "[[pages.cardholders]]",
                PageRole::Operator => "[[pages.operators]]",
            };
            let api_role = match role {
                PageRole::Cardholder => crate::api::Role::Cardholder,
                PageRole::Operator => crate::api::Role::Operator,
            };
            if c.name.is_empty() || c.name.len() > 128 {
                return Err(format!("{table}: a name of 1 to 128 characters"));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(format!(
                    "{table} {:?} is listed twice (a page login's name is one account, cardholder or operator)",
                    c.name
                ));
            }
            if let Some(t) = tokens
                .iter()
                .find(|t| t.name == c.name && t.role != api_role)
            {
                return Err(format!(
                    "{table} {:?} is the name of a {} token: a page login is a {}'s",
                    c.name,
                    t.role.name(),
                    role.name()
                ));
            }
            check_phc(&c.password_argon2).map_err(|e| {
                format!(
                    "{table} {:?}: password_argon2 must be an Argon2id PHC string ({e})",
                    c.name
                )
            })?;
        }
        if self.session_idle_ms == 0 || self.sign_in_window_ms == 0 {
            return Err("[pages] session_idle_ms and sign_in_window_ms must be > 0".into());
        }
        if self.max_failures_per_account == 0 || self.max_attempts_per_address == 0 {
            return Err(
                "[pages] max_failures_per_account and max_attempts_per_address must be > 0".into(),
            );
        }
        Ok(())
    }
}

/// The pages' own state beside the API's.
#[derive(Clone)]
struct Pages {
    api: AppState,
    /// Account name → its role and password hash.
    logins: Arc<std::collections::HashMap<String, (PageRole, String)>>,
    sessions: Arc<Sessions>,
    limiter: Arc<SignInLimiter>,
    templates: Arc<minijinja::Environment<'static>>,
    /// Cookies are Secure over TLS.
    tls: bool,
    currency: String,
}

/// The templates, compiled into the binary.
const TEMPLATES: [(&str, &str); 19] = [
    ("base.html", include_str!("templates/base.html")),
    ("home.html", include_str!("templates/home.html")),
    ("login.html", include_str!("templates/login.html")),
    ("cards.html", include_str!("templates/cards.html")),
    ("card.html", include_str!("templates/card.html")),
    ("topup.html", include_str!("templates/topup.html")),
    (
        "topup_state.html",
        include_str!("templates/topup_state.html"),
    ),
    ("report.html", include_str!("templates/report.html")),
    (
        "receipt_load.html",
        include_str!("templates/receipt_load.html"),
    ),
    (
        "receipt_month.html",
        include_str!("templates/receipt_month.html"),
    ),
    ("message.html", include_str!("templates/message.html")),
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
        "console_chart.html",
        include_str!("templates/console_chart.html"),
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
];
const STYLE_CSS: &str = include_str!("assets/style.css");
const APP_JS: &str = include_str!("assets/app.js");

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    for (name, src) in TEMPLATES {
        env.add_template(name, src)
            .unwrap_or_else(|e| panic!("template {name}: {e}"));
    }
    env
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
    cfg.check(&[])?;
    let pages = Pages {
        api,
        logins: Arc::new(
            cfg.logins()
                .map(|(role, c)| (c.name.clone(), (role, c.password_argon2.clone())))
                .collect(),
        ),
        sessions: Arc::new(Sessions::new(cfg.session_idle_ms)),
        limiter: Arc::new(SignInLimiter::new(
            cfg.max_failures_per_account,
            cfg.max_attempts_per_address,
            cfg.sign_in_window_ms,
        )),
        templates: Arc::new(environment()),
        tls,
        currency: currency.to_string(),
    };
    Ok(Router::new()
        .route("/", get(home))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/cards", get(cards))
        .route("/cards/{uid}", get(card_page))
        .route("/cards/{uid}/topup", get(topup_form).post(topup))
        .route("/cards/{uid}/topups/{id}", get(topup_state))
        .route("/cards/{uid}/report", get(report_form).post(report))
        .route("/cards/{uid}/receipts/load/{tmc}", get(receipt_load))
        .route("/cards/{uid}/receipts/month/{month}", get(receipt_month))
        .merge(console::routes())
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css", STYLE_CSS) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .layer(axum::middleware::map_response(security_headers))
        .with_state(pages))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Every page: no framing, scripts and styles from this origin only, no MIME sniffing, no
/// referrer; private pages are not cached.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// A page's failure, shown as a page.
enum PageError {
    /// Not signed in: to the sign-in page.
    SignIn,
    /// 403: a form without its CSRF token.
    Csrf,
    /// 403: a page of another role (a cardholder on the console, an operator on a card).
    Forbidden(String),
    /// 404 (also another holder's card).
    NotFound(String),
    /// 400 with what to fix.
    Bad(String),
    /// 500 (logged).
    Internal(String),
}

impl From<crate::ledger::LedgerError> for PageError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        PageError::Internal(e.to_string())
    }
}

impl Pages {
    fn render(&self, name: &str, ctx: minijinja::Value) -> Response {
        match self
            .templates
            .get_template(name)
            .and_then(|t| t.render(ctx))
        {
            Ok(html) => {
                ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
            }
            Err(e) => {
                tracing::error!(template = name, error = %e, "page template failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
            }
        }
    }

    fn message(&self, status: StatusCode, title: &str, text: &str) -> Response {
        let mut r = self.render(
            "message.html",
            minijinja::context! { title => title, text => text, holder => None::<String> },
        );
        *r.status_mut() = status;
        r
    }

    fn error(&self, e: PageError) -> Response {
        match e {
            PageError::SignIn => Redirect::to("/login").into_response(),
            PageError::Csrf => self.message(
                StatusCode::FORBIDDEN,
                "Form refused",
                "This form was not sent from this site's page, or it has expired. Go back, reload the page and try again.",
            ),
            PageError::Forbidden(what) => {
                self.message(StatusCode::FORBIDDEN, "Not for this account", &what)
            }
            PageError::NotFound(what) => {
                self.message(StatusCode::NOT_FOUND, "Not found", &what)
            }
            PageError::Bad(what) => self.message(StatusCode::BAD_REQUEST, "Please check", &what),
            PageError::Internal(d) => {
                tracing::error!(detail = %d, "page failed");
                self.message(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong",
                    "The back office could not answer. Please try again in a moment.",
                )
            }
        }
    }

    fn now(&self) -> u64 {
        (self.api.clock)()
    }

    /// The signed-in session, if any.
    fn session(&self, headers: &HeaderMap) -> Option<(String, session::Session)> {
        let id = session::cookie(headers, session::SESSION_COOKIE)?;
        let s = self.sessions.get(&id, self.now())?;
        Some((id, s))
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
        let s = self
            .session(headers)
            .map(|(_, s)| s)
            .ok_or(PageError::SignIn)?;
        if s.role != role {
            return Err(PageError::Forbidden(match role {
                PageRole::Cardholder => {
                    "These pages are a cardholder's: sign in as a cardholder to see cards.".into()
                }
                PageRole::Operator => {
                    "The console is an operator's: a cardholder's account cannot open it.".into()
                }
            }));
        }
        Ok(s)
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
        let s = self.signed_in_as(headers, role)?;
        if csrf.is_empty() || !session::same_token(&s.csrf, csrf) {
            return Err(PageError::Csrf);
        }
        Ok(s)
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
}

/// Runs `f` (ledger reads) off the async worker.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PageError> + Send + 'static,
) -> Result<T, PageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PageError::Internal(format!("worker failed: {e}")))?
}

/// The form field every POST carries.
#[derive(Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
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

/// The sign-in page; its form's CSRF token is also set in a cookie of its own.
async fn login_form(State(p): State<Pages>) -> Response {
    login_page(&p, StatusCode::OK, None, "")
}

fn login_page(p: &Pages, status: StatusCode, error: Option<&str>, name: &str) -> Response {
    let token = session::random_token();
    let mut r = p.render(
        "login.html",
        minijinja::context! { csrf => token, error => error, name => name, holder => None::<String> },
    );
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
        session::PRE_COOKIE,
        &token,
        p.tls,
        Some(3600),
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

/// The client's address as the listener saw it.
fn address(req_ext: Option<&axum::extract::ConnectInfo<std::net::SocketAddr>>) -> String {
    req_ext.map_or_else(|| "unknown".into(), |c| c.0.ip().to_string())
}

async fn login(
    State(p): State<Pages>,
    headers: HeaderMap,
    connect: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    Form(f): Form<LoginForm>,
) -> Response {
    let pre = session::cookie(&headers, session::PRE_COOKIE).unwrap_or_default();
    if f.csrf.is_empty() || !session::same_token(&pre, &f.csrf) {
        return p.error(PageError::Csrf);
    }
    let name = f.name.trim().to_string();
    if name.is_empty() || name.len() > 128 || f.password.is_empty() || f.password.len() > 1024 {
        return login_page(
            &p,
            StatusCode::BAD_REQUEST,
            Some("Enter your account name and password."),
            &name,
        );
    }
    let now = p.now();
    let addr = address(connect.as_ref().map(|c| &c.0));
    if let Err(t) = p.limiter.attempt(&name, &addr, now) {
        let (mins, why) = match t {
            Throttled::Account(s) => (s.div_ceil(60), "Too many failed sign-ins for this account."),
            Throttled::Address(s) => (
                s.div_ceil(60),
                "Too many sign-in attempts from your network address.",
            ),
        };
        let msg = format!(
            "{why} Try again in {mins} minute{}.",
            if mins == 1 { "" } else { "s" }
        );
        return login_page(&p, StatusCode::TOO_MANY_REQUESTS, Some(&msg), &name);
    }
    // An unknown account costs the same Argon2 work as a known one.
    let login = p.logins.get(&name).cloned();
    let password = zeroize::Zeroizing::new(f.password);
    let role = tokio::task::spawn_blocking(move || match login {
        Some((role, phc)) => verify_password(&phc, &password).then_some(role),
        None => {
            let _ = verify_password(dummy_hash(), &password);
            None
        }
    })
    .await
    .unwrap_or(None);
    let Some(role) = role else {
        p.limiter.failed(&name, now);
        return login_page(
            &p,
            StatusCode::UNAUTHORIZED,
            Some("That account name and password do not match."),
            &name,
        );
    };
    p.limiter.succeeded(&name);
    // A new session id at every sign-in (no fixation), and the sign-in cookie dropped.
    let id = p.sessions.create(role, &name, now);
    let mut r = Redirect::to(match role {
        PageRole::Cardholder => "/cards",
        PageRole::Operator => "/console",
    })
    .into_response();
    for c in [
        session::set_cookie(session::SESSION_COOKIE, &id, p.tls, None),
        session::set_cookie(session::PRE_COOKIE, "", p.tls, Some(0)),
    ] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

/// A hash to verify unknown accounts against (same cost as a real one).
fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("no such account"))
}

async fn logout(State(p): State<Pages>, headers: HeaderMap, Form(f): Form<CsrfOnly>) -> Response {
    let Some((id, s)) = p.session(&headers) else {
        return Redirect::to("/login").into_response();
    };
    if f.csrf.is_empty() || !session::same_token(&s.csrf, &f.csrf) {
        return p.error(PageError::Csrf);
    }
    p.sessions.end(&id);
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
        session::SESSION_COOKIE,
        "",
        p.tls,
        Some(0),
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

async fn cards(State(p): State<Pages>, headers: HeaderMap) -> Response {
    let result = async {
        let s = p.signed_in(&headers)?;
        let (p2, holder) = (p.clone(), s.holder.clone());
        let list = blocking(move || {
            let l = p2.api.loads.ledger();
            let r = l.read()?;
            let mut out = Vec::new();
            for (uid, shadow) in r.all_cards()? {
                if shadow.owner.as_deref() == Some(holder.as_str()) {
                    let balance = r.balance(&crate::ledger::card_account(&uid))?;
                    out.push(minijinja::context! {
                        uid => hex::encode_upper(uid),
                        balance => p2.money(balance),
                        blocked => shadow.blocked,
                        block_reason => shadow.block_reason,
                    });
                }
            }
            Ok(out)
        })
        .await?;
        Ok::<_, PageError>(p.render(
            "cards.html",
            minijinja::context! { holder => s.holder, csrf => s.csrf, cards => list },
        ))
    }
    .await;
    result.unwrap_or_else(|e| p.error(e))
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
        month => card::month_of(e.time_ms),
    }
}

async fn card_page(
    State(p): State<Pages>,
    Path(uid_hex): Path<String>,
    Query(q): Query<CardQuery>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let s = p.signed_in(&headers)?;
        let (p2, holder) = (p.clone(), s.holder.clone());
        let page = q.page.unwrap_or(1).clamp(1, 1_000_000);
        let ctx = blocking(move || {
            let l = p2.api.loads.ledger();
            let r = l.read()?;
            let uid = p2.own_card(&*r, &holder, &uid_hex)?;
            let shadow = r.card(&uid)?;
            let balance = r.balance(&crate::ledger::card_account(&uid))?;
            let history = card::history(&*r, &uid)?;
            let pages = history.len().div_ceil(PAGE_LINES).max(1);
            let shown: Vec<minijinja::Value> = history
                .iter()
                .skip((page - 1) * PAGE_LINES)
                .take(PAGE_LINES)
                .map(|e| entry_ctx(&p2, e))
                .collect();
            let loads = card::loads(&*r, &uid)?;
            let hex_uid = hex::encode_upper(uid);
            let topups: Vec<minijinja::Value> = card::topups(&*r, &holder)?
                .into_iter()
                .filter(|t| t.card_uid == hex_uid)
                .take(10)
                .map(|t| {
                    let (state, _) = t.state(&holder, &loads);
                    minijinja::context! {
                        id => t.id, amount => p2.money(t.amount_minor), source => t.source,
                        instrument => t.instrument, when => card::when(t.created_ms), state => state,
                    }
                })
                .collect();
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
            let mut months: Vec<String> = history
                .iter()
                .filter(|e| e.kind == "trip")
                .map(|e| card::month_of(e.time_ms))
                .collect();
            months.dedup();
            Ok(minijinja::context! {
                uid => hex_uid,
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
    }
    .await;
    result.unwrap_or_else(|e| p.error(e))
}

/// The holder's instruments, as `source:instrument` choices.
fn instruments(r: &dyn LedgerRead, holder: &str) -> Result<Vec<(String, String)>, PageError> {
    Ok(r.instruments_of(holder)?
        .into_iter()
        .map(|i| (i.source, i.id))
        .collect())
}

async fn topup_form(
    State(p): State<Pages>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
) -> Response {
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
    let (p2, holder) = (p.clone(), s.holder.clone());
    let (uid, choices, blocked) = blocking(move || {
        let l = p2.api.loads.ledger();
        let r = l.read()?;
        let uid = p2.own_card(&*r, &holder, &uid_hex)?;
        Ok((uid, instruments(&*r, &holder)?, r.card(&uid)?.blocked))
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
            currency => p.currency,
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
}

async fn topup(
    State(p): State<Pages>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
    Form(f): Form<TopUpForm>,
) -> Response {
    let result = async {
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
        let (p2, holder, uid_in) = (p.clone(), s.holder.clone(), uid_hex.clone());
        let funding = f.funding.clone();
        let made = blocking(move || {
            let l = p2.api.loads.ledger();
            let r = l.read()?;
            let uid = p2.own_card(&*r, &holder, &uid_in)?;
            if r.card(&uid)?.blocked {
                return Ok(Err(
                    "This card is blocked: it cannot be topped up.".to_string()
                ));
            }
            let Some((source, instrument)) = instruments(&*r, &holder)?
                .into_iter()
                .find(|(s, i)| format!("{s}:{i}") == funding)
            else {
                return Ok(Err("Choose one of your funding instruments.".to_string()));
            };
            drop(r);
            let t = TopUp {
                id: session::random_token()[..16].to_string(),
                card_uid: hex::encode_upper(uid),
                amount_minor: amount,
                source,
                instrument,
                created_ms: p2.now(),
            };
            let (key, new) = (card::topups_key(&holder), t.clone());
            l.transact(move |w| {
                let mut list: Vec<TopUp> = w
                    .idempotent(&key)?
                    .and_then(|v| serde_json::from_value(v).ok())
                    .unwrap_or_default();
                list.insert(0, new.clone());
                list.truncate(card::MAX_TOPUPS_PER_HOLDER);
                w.put_idempotent(
                    &key,
                    &serde_json::to_value(&list).expect("top-ups serialise"),
                )
            })?;
            Ok(Ok(t))
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
    }
    .await;
    result.unwrap_or_else(|e| p.error(e))
}

async fn topup_state(
    State(p): State<Pages>,
    Path((uid_hex, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let s = p.signed_in(&headers)?;
        let (p2, holder) = (p.clone(), s.holder.clone());
        let (t, state, tmc) = blocking(move || {
            let l = p2.api.loads.ledger();
            let r = l.read()?;
            let uid = p2.own_card(&*r, &holder, &uid_hex)?;
            let hex_uid = hex::encode_upper(uid);
            let t = card::topups(&*r, &holder)?
                .into_iter()
                .find(|t| t.id == id && t.card_uid == hex_uid)
                .ok_or_else(|| PageError::NotFound("No such top-up.".into()))?;
            let loads = card::loads(&*r, &uid)?;
            let (state, tmc) = t.state(&holder, &loads);
            Ok((t, state, tmc))
        })
        .await?;
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1:8443");
        let server = format!("{}://{host}", if p.tls { "https" } else { "http" });
        Ok::<_, PageError>(p.render(
            "topup_state.html",
            minijinja::context! {
                holder => s.holder, csrf => s.csrf, uid => t.card_uid,
                amount => p.money(t.amount_minor), amount_minor => t.amount_minor,
                source => t.source, instrument => t.instrument, when => card::when(t.created_ms),
                state => state, load_tmc => tmc.map(|t| t + 1), key => t.idempotency_key(),
                server => server,
            },
        ))
    }
    .await;
    result.unwrap_or_else(|e| p.error(e))
}

async fn report_form(
    State(p): State<Pages>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let s = p.signed_in(&headers)?;
        let (p2, holder) = (p.clone(), s.holder.clone());
        let (uid, blocked) = blocking(move || {
            let l = p2.api.loads.ledger();
            let r = l.read()?;
            let uid = p2.own_card(&*r, &holder, &uid_hex)?;
            Ok((uid, r.card(&uid)?.blocked))
        })
        .await?;
        Ok::<_, PageError>(p.render(
            "report.html",
            minijinja::context! { holder => s.holder, csrf => s.csrf, uid => hex::encode_upper(uid), blocked => blocked },
        ))
    }
    .await;
    result.unwrap_or_else(|e| p.error(e))
}

#[derive(Deserialize)]
struct ReportForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

async fn report(
    State(p): State<Pages>,
    Path(uid_hex): Path<String>,
    headers: HeaderMap,
    Form(f): Form<ReportForm>,
) -> Response {
    let result = async {
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
    }
    .await;
    result.unwrap_or_else(|e| p.error(e))
}

async fn receipt_load(
    State(p): State<Pages>,
    Path((uid_hex, tmc)): Path<(String, u32)>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let s = p.signed_in(&headers)?;
        let (p2, holder) = (p.clone(), s.holder.clone());
        let (uid, entry) = blocking(move || {
            let l = p2.api.loads.ledger();
            let r = l.read()?;
            let uid = p2.own_card(&*r, &holder, &uid_hex)?;
            let e = card::history(&*r, &uid)?
                .into_iter()
                .find(|e| e.kind == "load" && e.tmc == Some(tmc))
                .ok_or_else(|| PageError::NotFound("No completed load at that counter.".into()))?;
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
    }
    .await;
    result.unwrap_or_else(|e| p.error(e))
}

async fn receipt_month(
    State(p): State<Pages>,
    Path((uid_hex, month)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let result = async {
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
        let (p2, holder, m) = (p.clone(), s.holder.clone(), month.clone());
        let (uid, trips) = blocking(move || {
            let l = p2.api.loads.ledger();
            let r = l.read()?;
            let uid = p2.own_card(&*r, &holder, &uid_hex)?;
            let mut trips: Vec<Entry> = card::history(&*r, &uid)?
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
    }
    .await;
    result.unwrap_or_else(|e| p.error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles() {
        let env = environment();
        for (name, _) in TEMPLATES {
            assert!(env.get_template(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn a_login_config_is_checked() {
        let mut cfg = PagesConfig::default();
        cfg.cardholders.push(CardholderLogin {
            name: "ann".into(),
            password_argon2: "plain".into(),
        });
        assert!(cfg.check(&[]).unwrap_err().contains("Argon2id"));
        cfg.cardholders[0].password_argon2 = hash_password("pw");
        assert!(cfg.check(&[]).is_ok());
        let ops = crate::api::TokenEntry {
            name: "ann".into(),
            role: crate::api::Role::Operator,
            sha256: crate::api::Auth::hash_token("x"),
        };
        assert!(cfg.check(&[ops]).unwrap_err().contains("operator token"));
        cfg.cardholders.push(cfg.cardholders[0].clone());
        assert!(cfg.check(&[]).unwrap_err().contains("twice"));
        assert!(!format!("{:?}", cfg.cardholders[0]).contains("argon2id"));
    }

    #[test]
    fn operator_logins_are_checked_beside_the_cardholders() {
        let login = |name: &str| PageLogin {
            name: name.into(),
            password_argon2: hash_password("pw"),
        };
        let token = |name: &str, role| crate::api::TokenEntry {
            name: name.into(),
            role,
            sha256: crate::api::Auth::hash_token("x"),
        };
        let mut cfg = PagesConfig::default();
        cfg.cardholders.push(login("ann"));
        cfg.operators.push(login("ops"));
        assert!(cfg
            .check(&[token("ops", crate::api::Role::Operator)])
            .is_ok());
        assert!(cfg
            .check(&[token("ops", crate::api::Role::Cardholder)])
            .unwrap_err()
            .contains("[[pages.operators]] \"ops\" is the name of a cardholder token"));
        cfg.operators.push(login("ann"));
        assert!(cfg.check(&[]).unwrap_err().contains("listed twice"));
        let parsed: PagesConfig = toml::from_str(&format!(
            "[[operators]]\nname = \"ops\"\npassword_argon2 = \"{}\"\n",
            hash_password("pw")
        ))
        .unwrap();
        assert_eq!(parsed.operators[0].name, "ops");
    }
}
#[cfg(test)]
mod render {
    /// Templates are strict about undefined names: a card page renders with every field.
    #[test]
    fn a_card_page_renders() {
        let env = super::environment();
        let card = minijinja::context! { uid => "04", balance => "5 KRW", proved_balance => None::<String>, last_tmc => 0, blocked => false, block_reason => None::<String>, history => vec![minijinja::context!{when => "w", kind => "issue", place => "float", amount => "5", credit => true, tmc => None::<u32>, month => "2026-01"}], page => 1usize, pages => 1usize, loads => Vec::<minijinja::Value>::new(), topups => Vec::<minijinja::Value>::new(), months => Vec::<String>::new() };
        let r = env.get_template("card.html").unwrap().render(minijinja::context!{ holder => "ann", csrf => "c", card => card, blocklist_version => None::<u64> });
        assert!(r.unwrap().contains("Page 1 of 1"));
    }
}
