//! What the daemons' pages share (the charging server's cardholder pages and console, the
//! gateway's console): the `[pages]` configuration and its Argon2id logins, sessions that carry
//! a role, CSRF tokens, the sign-in form with its rate limits, the template environment
//! (minijinja, escaped, strict about undefined names) with the shared templates and assets, the
//! security headers, SVG bar charts ([`chart`]) and forms with a file ([`form`]).
//!
//! A daemon builds a [`Site`] from its [`PagesConfig`], its own templates (at least
//! `base.html`, which extends the shared `page.html` with the daemon's links, and which the
//! shared `login.html` and `message.html` extend) and where each role
//! lands after signing in; its state implements [`HasSite`], and [`sign_in_routes`] gives the
//! `/login`, `/logout` and `/assets/*` routes. Its pages call [`Site::signed_in_as`] (a page)
//! and [`Site::posted_as`] (a form, with its CSRF token). docs/pages.md describes them.

pub mod chart;
pub mod form;
pub mod session;

pub use form::{multipart, Part};

pub use session::{
    check_phc, hash_password, random_token, same_token, verify_password, PageRole, Session,
};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use session::{Sessions, SignInLimiter, Throttled};
use std::collections::HashMap;
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

/// The `[pages]` table of a daemon's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PagesConfig {
    /// Serve the pages (default true; without logins nobody can sign in).
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
    pub fn logins(&self) -> impl Iterator<Item = (PageRole, &PageLogin)> {
        self.cardholders
            .iter()
            .map(|c| (PageRole::Cardholder, c))
            .chain(self.operators.iter().map(|c| (PageRole::Operator, c)))
    }

    /// Checks the logins: names unique (across cardholders and operators) and not another
    /// role's token, hashes Argon2id.
    pub fn check(&self, tokens: &[crate::auth::TokenEntry]) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (role, c) in self.logins() {
            let table = match role {
                PageRole::Cardholder => "[[pages.cardholders]]",
                PageRole::Operator => "[[pages.operators]]",
            };
            let api_role = match role {
                PageRole::Cardholder => crate::auth::Role::Cardholder,
                PageRole::Operator => crate::auth::Role::Operator,
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

/// The templates every site has: the page itself (`page.html`: the document, the header with
/// the account's links and *Sign out*, the footer — the site's own `base.html` extends it with
/// its links), the sign-in form and a message page (which extend the site's `base.html`), the
/// bar chart macro.
pub const SHARED_TEMPLATES: [(&str, &str); 4] = [
    ("page.html", include_str!("templates/page.html")),
    ("login.html", include_str!("templates/login.html")),
    ("message.html", include_str!("templates/message.html")),
    (
        "console_chart.html",
        include_str!("templates/console_chart.html"),
    ),
];
const STYLE_CSS: &str = include_str!("assets/style.css");
const APP_JS: &str = include_str!("assets/app.js");

/// The template environment: strict about undefined names, escaping `.html` templates, with
/// the shared templates and the site's own (`own` may replace a shared one by its name).
pub fn environment(own: &[(&'static str, &'static str)]) -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    for (name, src) in SHARED_TEMPLATES.iter().chain(own) {
        env.add_template(name, src)
            .unwrap_or_else(|e| panic!("template {name}: {e}"));
    }
    env
}

/// The clock a site reads (unix ms).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A page's failure, shown as a page.
#[derive(Debug)]
pub enum PageError {
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

/// Runs `f` (store or ledger reads) off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PageError> + Send + 'static,
) -> Result<T, PageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PageError::Internal(format!("worker failed: {e}")))?
}

/// One daemon's pages: who may sign in, the sessions, the sign-in limits, the templates.
pub struct Site {
    /// Account name → its role and password hash.
    logins: HashMap<String, (PageRole, String)>,
    sessions: Sessions,
    limiter: SignInLimiter,
    templates: minijinja::Environment<'static>,
    /// Cookies are Secure over TLS.
    tls: bool,
    clock: Clock,
    /// Where a role lands after signing in.
    landing: fn(PageRole) -> &'static str,
    /// The session's and the sign-in form's cookie names ([`Site::with_cookie_names`]).
    cookies: (&'static str, &'static str),
}

impl Site {
    /// A site for `cfg`'s logins (checked), with its own templates (`base.html` at least);
    /// `tls`: the listener serves HTTPS (cookies are then Secure); `landing`: the page a role
    /// goes to after signing in.
    pub fn new(
        cfg: &PagesConfig,
        templates: &[(&'static str, &'static str)],
        tls: bool,
        clock: Clock,
        landing: fn(PageRole) -> &'static str,
    ) -> Result<Site, String> {
        cfg.check(&[])?;
        Ok(Site {
            logins: cfg
                .logins()
                .map(|(role, c)| (c.name.clone(), (role, c.password_argon2.clone())))
                .collect(),
            sessions: Sessions::new(cfg.session_idle_ms),
            limiter: SignInLimiter::new(
                cfg.max_failures_per_account,
                cfg.max_attempts_per_address,
                cfg.sign_in_window_ms,
            ),
            templates: environment(templates),
            tls,
            clock,
            landing,
            cookies: (session::SESSION_COOKIE, session::PRE_COOKIE),
        })
    }

    /// The site's cookies named `session` and `signin` instead of `tg_session` and
    /// `tg_signin`: cookies are per host, not per port, so two daemons' pages on one host (the
    /// charging server's and a gateway's console, as in the demo) need their own names, or
    /// signing in to one replaces the other's session.
    pub fn with_cookie_names(mut self, session: &'static str, signin: &'static str) -> Self {
        self.cookies = (session, signin);
        self
    }

    /// The listener serves HTTPS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Now (unix ms).
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// The template environment.
    pub fn templates(&self) -> &minijinja::Environment<'static> {
        &self.templates
    }

    /// Template `name` rendered as an HTML page (a template error is logged and a 500).
    pub fn render(&self, name: &str, ctx: minijinja::Value) -> Response {
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

    /// A message page.
    pub fn message(&self, status: StatusCode, title: &str, text: &str) -> Response {
        let mut r = self.render(
            "message.html",
            minijinja::context! { title => title, text => text, holder => None::<String> },
        );
        *r.status_mut() = status;
        r
    }

    /// A failure as its page.
    pub fn error(&self, e: PageError) -> Response {
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
            PageError::NotFound(what) => self.message(StatusCode::NOT_FOUND, "Not found", &what),
            PageError::Bad(what) => self.message(StatusCode::BAD_REQUEST, "Please check", &what),
            PageError::Internal(d) => {
                tracing::error!(detail = %d, "page failed");
                self.message(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong",
                    "The server could not answer. Please try again in a moment.",
                )
            }
        }
    }

    /// The signed-in session (and its id), if any.
    pub fn session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = session::cookie(headers, self.cookies.0)?;
        let s = self.sessions.get(&id, self.now())?;
        Some((id, s))
    }

    /// The signed-in session if it is `role`'s: to the sign-in page without one, 403 for
    /// another role's.
    pub fn signed_in_as(&self, headers: &HeaderMap, role: PageRole) -> Result<Session, PageError> {
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

    /// `role`'s session of a POST whose form carries its CSRF token.
    pub fn posted_as(
        &self,
        headers: &HeaderMap,
        csrf: &str,
        role: PageRole,
    ) -> Result<Session, PageError> {
        let s = self.signed_in_as(headers, role)?;
        if csrf.is_empty() || !same_token(&s.csrf, csrf) {
            return Err(PageError::Csrf);
        }
        Ok(s)
    }

    /// The sign-in page; its form's CSRF token is also set in a cookie of its own.
    pub fn login_page(&self, status: StatusCode, error: Option<&str>, name: &str) -> Response {
        let token = random_token();
        let mut r = self.render(
            "login.html",
            minijinja::context! { csrf => token, error => error, name => name, holder => None::<String> },
        );
        *r.status_mut() = status;
        if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
            self.cookies.1,
            &token,
            self.tls,
            Some(3600),
        )) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
        r
    }
}

/// A daemon's page state: it has a [`Site`].
pub trait HasSite: Clone + Send + Sync + 'static {
    /// The site.
    fn site(&self) -> &Site;
}

/// `/login` (GET the form, POST it), `/logout` (POST) and the shared assets
/// (`/assets/style.css`, `/assets/app.js`).
pub fn sign_in_routes<S: HasSite>() -> Router<S> {
    Router::new()
        .route("/login", get(login_form::<S>).post(login::<S>))
        .route("/logout", post(logout::<S>))
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css", STYLE_CSS) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
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
/// referrer; private pages are not cached. (`axum::middleware::map_response(security_headers)`)
pub async fn security_headers(mut r: Response) -> Response {
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

/// The form field every POST carries.
#[derive(Deserialize)]
pub struct CsrfOnly {
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: String,
}

async fn login_form<S: HasSite>(State(s): State<S>) -> Response {
    s.site().login_page(StatusCode::OK, None, "")
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

async fn login<S: HasSite>(
    State(st): State<S>,
    headers: HeaderMap,
    connect: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    Form(f): Form<LoginForm>,
) -> Response {
    let p = st.site();
    let pre = session::cookie(&headers, p.cookies.1).unwrap_or_default();
    if f.csrf.is_empty() || !same_token(&pre, &f.csrf) {
        return p.error(PageError::Csrf);
    }
    let name = f.name.trim().to_string();
    if name.is_empty() || name.len() > 128 || f.password.is_empty() || f.password.len() > 1024 {
        return p.login_page(
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
        return p.login_page(StatusCode::TOO_MANY_REQUESTS, Some(&msg), &name);
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
        return p.login_page(
            StatusCode::UNAUTHORIZED,
            Some("That account name and password do not match."),
            &name,
        );
    };
    p.limiter.succeeded(&name);
    // A new session id at every sign-in (no fixation), and the sign-in cookie dropped.
    let id = p.sessions.create(role, &name, now);
    let mut r = Redirect::to((p.landing)(role)).into_response();
    for c in [
        session::set_cookie(p.cookies.0, &id, p.tls, None),
        session::set_cookie(p.cookies.1, "", p.tls, Some(0)),
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

async fn logout<S: HasSite>(
    State(st): State<S>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    let p = st.site();
    let Some((id, s)) = p.session(&headers) else {
        return Redirect::to("/login").into_response();
    };
    if f.csrf.is_empty() || !same_token(&s.csrf, &f.csrf) {
        return p.error(PageError::Csrf);
    }
    p.sessions.end(&id);
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(p.cookies.0, "", p.tls, Some(0))) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Auth, Role, TokenEntry};

    #[test]
    fn the_shared_templates_compile() {
        let env = environment(&[("base.html", "{% block main %}{% endblock %}")]);
        for (name, _) in SHARED_TEMPLATES {
            assert!(env.get_template(name).is_ok(), "{name}");
        }
        let r = env
            .get_template("message.html")
            .unwrap()
            .render(minijinja::context! { title => "T", text => "<b>", holder => None::<String> })
            .unwrap();
        assert!(r.contains("&lt;b&gt;"), "escaped: {r}");
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
        let ops = TokenEntry {
            name: "ann".into(),
            role: Role::Operator,
            sha256: Auth::hash_token("x"),
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
        let token = |name: &str, role| TokenEntry {
            name: name.into(),
            role,
            sha256: Auth::hash_token("x"),
        };
        let mut cfg = PagesConfig::default();
        cfg.cardholders.push(login("ann"));
        cfg.operators.push(login("ops"));
        assert!(cfg.check(&[token("ops", Role::Operator)]).is_ok());
        assert!(cfg
            .check(&[token("ops", Role::Cardholder)])
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
