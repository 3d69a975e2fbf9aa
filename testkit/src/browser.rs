//! The pages' tests, written once (feature `browser`): Debian's chromium, headless, driven
//! through chromedriver (WebDriver, the `fantoccini` crate) at a phone's width, its screenshots
//! under `target/test-output/pages/`; and the same pages over plain HTTP — a client with no
//! cookie jar and no redirects, the sign-in form's cookie and CSRF token, a signed-in session.

use crate::net::{free_port, wait_for_port};
use crate::process::Kill;
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the pages' tests save their screenshots: `target/test-output/pages/` (created).
pub fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-output").join("pages");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

/// chromedriver on a free port and a headless chromium session through it; the driver is
/// killed when dropped.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    _driver: Kill,
}

impl Browser {
    /// A session at a phone's width (412 px), `height` px high.
    pub async fn start(height: u32) -> Browser {
        let driver_bin = ["chromedriver", "/usr/bin/chromedriver"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect(
                "chromedriver is not installed: ./test.sh setup installs chromium and chromium-driver",
            );
        let port = free_port();
        let driver = Kill(
            Command::new(driver_bin)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting chromedriver"),
        );
        wait_for_port(port, "chromedriver");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", format!("--window-size=412,{height}")]
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a chromium session through chromedriver");
        Browser {
            client,
            _driver: driver,
        }
    }

    /// Saves the page as `<output_dir>/<name>.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(output_dir().join(format!("{name}.png")), png).expect("saving screenshot");
    }

    /// Goes to `url`.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigating");
    }

    /// The text of the element `css` names. A page that reloads itself can replace the element
    /// between finding it and reading it, or be between two loads: a failed find or read is
    /// tried again for up to 10 s before it fails the test.
    pub async fn text(&self, css: &str) -> String {
        let mut last = String::new();
        for _ in 0..100 {
            match self.client.find(Locator::Css(css)).await {
                Ok(e) => match e.text().await {
                    Ok(t) => return t,
                    Err(err) => last = err.to_string(),
                },
                Err(err) => last = err.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{css}: {last}")
    }

    /// Waits (up to `secs`) until the element `css` says `want`, reloading the page each time
    /// when `reload`; its text.
    pub async fn wait_text(&self, css: &str, want: &str, secs: u64, reload: bool) -> String {
        let since = Instant::now();
        let mut seen = None;
        while since.elapsed() < Duration::from_secs(secs) {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if let Ok(t) = e.text().await {
                    if t.contains(want) {
                        return t;
                    }
                    seen = Some(t);
                }
            }
            if reload {
                self.client.refresh().await.expect("reloading");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("{css} says {seen:?}, not {want:?}, after {secs} s")
    }

    /// Signs in by keyboard at `base`/login (types the name, tabs to the password, presses
    /// Enter) and waits for the page the account lands on (a path ending in `landing`).
    pub async fn sign_in_to(&self, base: &str, name: &str, password: &str, landing: &str) {
        self.goto(&format!("{base}/login")).await;
        let field = self.client.find(Locator::Id("name")).await.unwrap();
        field.send_keys(name).await.unwrap();
        field.send_keys("\u{E004}").await.unwrap(); // Tab
        let pw = self.client.active_element().await.unwrap();
        assert_eq!(pw.attr("id").await.unwrap().as_deref(), Some("password"));
        pw.send_keys(password).await.unwrap();
        pw.send_keys("\u{E007}").await.unwrap(); // Enter
        self.wait_url(landing).await;
    }

    /// Waits (up to 5 s) until the page's path and query satisfy `ok`; `what` names it in the
    /// failure.
    async fn wait_for(&self, what: &str, ok: impl Fn(&str, Option<&str>) -> bool) {
        for _ in 0..100 {
            let url = self.client.current_url().await.unwrap();
            if ok(url.path(), url.query()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: at {}", self.client.current_url().await.unwrap());
    }

    /// Waits (up to 5 s) until the page's path ends with `ends_with`.
    pub async fn wait_url(&self, ends_with: &str) {
        let what = format!("the browser did not reach {ends_with}");
        self.wait_for(&what, |path, _| path.ends_with(ends_with))
            .await
    }

    /// Waits (up to 5 s) until the page's query contains `contains`.
    pub async fn wait_query(&self, contains: &str) {
        let what = format!("no {contains} in the query");
        self.wait_for(&what, |_, query| {
            query.is_some_and(|q| q.contains(contains))
        })
        .await
    }

    /// Clicks the element with id `id`.
    pub async fn click(&self, id: &str) {
        self.client
            .find(Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("#{id}: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// Clears the field `id` and types `text` into it.
    pub async fn retype(&self, id: &str, text: &str) {
        let f = self.client.find(Locator::Id(id)).await.unwrap();
        f.clear().await.unwrap();
        f.send_keys(text).await.unwrap();
    }

    /// Ends the session.
    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// A client with no cookie jar and no redirects.
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().redirects(0).build()
}

/// An answer's status and body, error statuses included (a transport error panics).
pub fn status(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

/// The value of a page's first `csrf` form field.
pub fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field");
    html[at + 19..].split('"').next().unwrap().to_string()
}

/// The `name=value` part of each Set-Cookie of `r`.
pub fn set_cookies(r: &ureq::Response) -> Vec<String> {
    r.all("set-cookie")
        .into_iter()
        .map(|c| c.split(';').next().unwrap().to_string())
        .collect()
}

/// The sign-in form's cookie (`name=value`; HttpOnly and SameSite=Strict) and its CSRF field.
pub fn sign_in_form(agent: &ureq::Agent, base: &str) -> (String, String) {
    let r = agent.get(&format!("{base}/login")).call().unwrap();
    let full: Vec<String> = r.all("set-cookie").into_iter().map(String::from).collect();
    let pre = full
        .iter()
        .find(|c| c.starts_with("tg_signin=") || c.starts_with("tg_gw_signin="))
        .expect("the sign-in cookie");
    assert!(
        pre.contains("HttpOnly") && pre.contains("SameSite=Strict"),
        "{pre}"
    );
    let html = r.into_string().unwrap();
    (pre.split(';').next().unwrap().to_string(), csrf_of(&html))
}

/// Signs in over HTTP: a client (no cookie jar, no redirects) and the session cookie
/// (`tg_session=…`, a gateway console's `tg_gw_session=…`).
pub fn signed_in_agent(base: &str, name: &str, password: &str) -> (ureq::Agent, String) {
    let agent = agent();
    let (pre, csrf) = sign_in_form(&agent, base);
    let r = agent
        .post(&format!("{base}/login"))
        .set("Cookie", &pre)
        .send_form(&[("name", name), ("password", password), ("csrf", &csrf)])
        .expect("signing in");
    assert_eq!(r.status(), 303);
    let cookie = set_cookies(&r)
        .into_iter()
        .find(|c| {
            // The charging server's session, or a gateway console's.
            let (name, value) = c.split_once('=').unwrap_or((c, ""));
            matches!(name, "tg_session" | "tg_gw_session") && !value.is_empty()
        })
        .expect("a session cookie");
    (agent, cookie)
}

/// GET `url` with the session `cookie`: the page (a non-2xx answer panics).
pub fn page(agent: &ureq::Agent, url: &str, cookie: &str) -> String {
    agent
        .get(url)
        .set("Cookie", cookie)
        .call()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .into_string()
        .unwrap()
}
