//! The gateway's operator console (docs/pages.md) as operators run it: `tapgate gateway` with
//! its embedded broker, a `[[pages.operators]]` login in its API config and a charging server
//! to fetch blocklists from; a `tapgate validator` connected to it (an emulated crowd tapping a
//! few times a second, heartbeats every second). In Debian's chromium (headless, WebDriver) an
//! operator signs in and sees the validator on the devices page; the block propagation page
//! follows a card blocked at the back office to 100% of the validators without a reload; taps
//! per hour drawn as bars. Over plain HTTP: a page without a session goes to sign in, forms
//! without their CSRF token are refused. The screenshot goes to
//! target/test-output/pages/gateway_devices.png.

mod support;

use fantoccini::{Client, ClientBuilder, Locator};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{free_port, keys_and_fare_table, wait_for_port, Kill};
use tapgate_http::auth::Role;
use tapgate_testkit::fixtures::token;

const PASS: &str = "gateway-console";
const OP_PASSWORD: &str = "the duty officer's long passphrase";

/// Where this test's screenshots go (beside the charging pages').
fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("test-output").join("pages");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

/// The world: a charging server (operator metro) in this process, the gateway and a validator
/// as processes. Returns the console's base URL, the guards and the back office.
struct World {
    base: String,
    back_office: tapgate_testkit::charging::ChargingServer,
    _gateway: Kill,
    _validator: Kill,
    _dir: tempfile::TempDir,
}

fn world() -> World {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");
    let keys = purse::keys::KeySet::unseal(
        &std::fs::read(dir.join("keys/issuer.keys")).unwrap(),
        PASS.as_bytes(),
    )
    .unwrap();
    let back_office = tapgate_testkit::charging::start(&keys, |cfg| {
        cfg.operator = "metro".into();
        cfg.tokens = vec![token("gw", Role::Gateway, "tg_gw_console")];
    });
    let (mqtt, api) = (free_port(), free_port());
    std::fs::write(dir.join("users"), "1001 v-secret\n").unwrap();
    std::fs::write(
        dir.join("gw-api.toml"),
        format!(
            "http_listen = \"127.0.0.1:{api}\"\n[[pages.operators]]\nname = \"duty\"\npassword_argon2 = \"{}\"\n",
            tapgate_http::pages::hash_password(OP_PASSWORD)
        ),
    )
    .unwrap();
    let gateway = Kill(
        Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .current_dir(dir)
            .args([
                "gateway",
                "--keys",
                "keys",
                "--data",
                "gw",
                "--mqtt-users",
                "users",
            ])
            .args(["--operator", "metro", "--embedded-listen"])
            .arg(format!("127.0.0.1:{mqtt}"))
            .args(["--config", "gw-api.toml", "--charging", &back_office.base])
            .args(["--charging-token", "tg_gw_console"])
            .env("TAPGATE_KEY_PASSPHRASE", PASS)
            .env("TAPGATE_MQTT_PASSWORD", "gw-secret")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(mqtt, "the gateway's broker");
    wait_for_port(api, "the gateway's API");
    std::fs::write(
        dir.join("validator.toml"),
        format!(
            r#"device_id = 1001
operator = "metro"
stop = "Central"
route = "M1"
kind = "entry"
utc_offset_minutes = 540
journal = "journal"
keys = "keys"
fare_table = "metro.tgft"
heartbeat_s = 1
[mqtt]
broker = "mqtt://127.0.0.1:{mqtt}"
password_env = "VALIDATOR_MQTT_PASSWORD"
[crowd]
cards = 50
balance_minor = 50000
dir = "cards"
rate_per_s = 4
"#
        ),
    )
    .unwrap();
    let validator = Kill(
        Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .current_dir(dir)
            .args(["validator", "--config", "validator.toml"])
            .env("TAPGATE_KEY_PASSPHRASE", PASS)
            .env("VALIDATOR_MQTT_PASSWORD", "v-secret")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    World {
        base: format!("http://127.0.0.1:{api}"),
        back_office,
        _gateway: gateway,
        _validator: validator,
        _dir: d,
    }
}

/// A client with no cookie jar and no redirects.
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().redirects(0).build()
}

fn status(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field");
    html[at + 19..].split('"').next().unwrap().to_string()
}

/// The sign-in form's cookie (`name=value`) and its CSRF field.
fn sign_in_form(agent: &ureq::Agent, base: &str) -> (String, String) {
    let r = agent.get(&format!("{base}/login")).call().unwrap();
    let pre = r
        .all("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("tg_signin="))
        .expect("the sign-in cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    (pre, csrf_of(&r.into_string().unwrap()))
}

/// Signs in over HTTP: the session cookie.
fn signed_in(agent: &ureq::Agent, base: &str) -> String {
    let (pre, csrf) = sign_in_form(agent, base);
    let r = agent
        .post(&format!("{base}/login"))
        .set("Cookie", &pre)
        .send_form(&[("name", "duty"), ("password", OP_PASSWORD), ("csrf", &csrf)])
        .expect("signing in");
    assert_eq!(r.status(), 303);
    assert_eq!(r.header("location"), Some("/console"));
    r.all("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("tg_session=") && !c.starts_with("tg_session=;"))
        .expect("a session cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn without_a_session_or_a_csrf_token_nothing_happens() {
    let w = world();
    let a = agent();
    for page in ["/console", "/console/propagation", "/console/traffic"] {
        let (code, _) = status(a.get(&format!("{}{page}", w.base)).call());
        assert_eq!(code, 303, "{page}");
        let r = a.get(&format!("{}{page}", w.base)).call().unwrap();
        assert_eq!(r.header("location"), Some("/login"), "{page}");
    }
    let (code, body) = status(
        a.get(&format!("{}/console/propagation.json", w.base))
            .call(),
    );
    assert_eq!(code, 401, "{body}");
    // The JSON API still wants its bearer token; the console's cookie is no token.
    let cookie = signed_in(&a, &w.base);
    let (code, _) = status(
        a.get(&format!("{}/v1/devices", w.base))
            .set("Cookie", &cookie)
            .call(),
    );
    assert_eq!(code, 401);
    // The sign-in form without its cookie's token: refused.
    let (code, body) = status(a.post(&format!("{}/login", w.base)).send_form(&[
        ("name", "duty"),
        ("password", OP_PASSWORD),
        ("csrf", "x"),
    ]));
    assert_eq!(code, 403);
    assert!(body.contains("Form refused"), "{body}");
    // Signing out without the session's token: refused, and the session still works.
    let (code, body) = status(
        a.post(&format!("{}/logout", w.base))
            .set("Cookie", &cookie)
            .send_form(&[("csrf", "not-the-token")]),
    );
    assert_eq!(code, 403, "{body}");
    let r = a
        .get(&format!("{}/console", w.base))
        .set("Cookie", &cookie)
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.into_string().unwrap();
    assert!(html.contains("id=\"operator\">duty<"), "{html}");
    // With it: signed out.
    let (code, _) = status(
        a.post(&format!("{}/logout", w.base))
            .set("Cookie", &cookie)
            .send_form(&[("csrf", &csrf_of(&html))]),
    );
    assert_eq!(code, 303);
    let (code, _) = status(
        a.get(&format!("{}/console", w.base))
            .set("Cookie", &cookie)
            .call(),
    );
    assert_eq!(code, 303, "the session ended");
    // Security headers on the pages.
    let r = a.get(&format!("{}/login", w.base)).call().unwrap();
    assert!(r
        .header("content-security-policy")
        .is_some_and(|c| c.contains("script-src 'self'")));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
}

/// chromedriver on a free port and a headless chromium session at a phone's width.
async fn browser() -> (Client, Kill) {
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
                     "--disable-dev-shm-usage", "--window-size=412,1400"]
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a chromium session through chromedriver");
    (client, driver)
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("text")
}

/// Waits (up to `secs`) until the element `css` of the page shown says `want`, reloading the
/// page each time when `reload`.
async fn wait_text(c: &Client, css: &str, want: &str, secs: u64, reload: bool) -> String {
    let since = Instant::now();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if t.contains(want) {
                    return t;
                }
                assert!(
                    since.elapsed() < Duration::from_secs(secs),
                    "{css} says {t:?}, not {want:?}"
                );
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(secs),
            "no {css} saying {want:?}"
        );
        if reload {
            c.refresh().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_the_validators_and_a_block_reach_them() {
    let w = world();
    let (c, _driver) = browser().await;

    // Signing in by keyboard lands on the devices page.
    c.goto(&format!("{}/console", w.base)).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/login"));
    let field = c.find(Locator::Id("name")).await.unwrap();
    field.send_keys("duty").await.unwrap();
    field.send_keys("\u{E004}").await.unwrap(); // Tab
    let pw = c.active_element().await.unwrap();
    assert_eq!(pw.attr("id").await.unwrap().as_deref(), Some("password"));
    pw.send_keys(OP_PASSWORD).await.unwrap();
    pw.send_keys("\u{E007}").await.unwrap(); // Enter
    for _ in 0..100 {
        if c.current_url().await.unwrap().path() == "/console" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.current_url().await.unwrap().path(), "/console");
    assert_eq!(text(&c, "#operator").await, "duty");

    // The validator, online, with its heartbeat's versions and outbox, and its taps.
    wait_text(&c, "#device-1001 td.state", "online", 30, true).await;
    let since = Instant::now();
    loop {
        let taps = text(&c, "#device-1001 td.taps").await;
        let n: u64 = taps
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if n > 0 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "no taps: {taps:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.refresh().await.unwrap();
    }
    for cell in [
        "heartbeat",
        "blocklist",
        "fare",
        "outbox",
        "skew",
        "last-tap",
    ] {
        let t = text(&c, &format!("#device-1001 td.{cell}")).await;
        assert!(!t.trim().is_empty() && !t.contains('—'), "{cell}: {t:?}");
    }
    assert!(text(&c, "#online-count").await.starts_with("1 of 1"));
    c.screenshot()
        .await
        .map(|png| std::fs::write(output_dir().join("gateway_devices.png"), png).unwrap())
        .unwrap();

    // Block propagation: nothing published yet, then a card blocked at the back office
    // reaches the validator; the page says so without being reloaded.
    let ledger = w.back_office.state.loads.ledger().clone();
    let uid = [4, 7, 7, 7, 7, 7, 7];
    tokio::task::spawn_blocking(move || {
        ledger
            .transact(move |t| t.set_blocked(&uid, true, "lost", 0).map(|_| ()))
            .unwrap()
    })
    .await
    .unwrap();
    c.goto(&format!("{}/console/propagation", w.base))
        .await
        .unwrap();
    // The gateway fetches the list at its next poll: reload until it has published it.
    wait_text(&c, "#propagation [data-field=version]", "1", 60, true).await;
    // From here the page is not reloaded: its script follows the validator's heartbeats.
    let held = wait_text(&c, "#to-100", "reached after", 30, false).await;
    assert!(held.starts_with("reached after"), "{held}");
    assert_eq!(
        text(&c, "[data-field=percent]").await,
        "100%",
        "the one validator online holds version 1"
    );
    wait_text(&c, "[data-field=v1001-holds]", "yes", 10, false).await;
    // The script is what keeps it current: the figure's time moves on without a reload.
    let as_of = text(&c, "[data-field=as_of]").await;
    let since = Instant::now();
    while text(&c, "[data-field=as_of]").await == as_of {
        assert!(
            since.elapsed() < Duration::from_secs(8),
            "the page did not update itself"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(text(&c, "[data-live-note]")
        .await
        .contains("Updating every 2 seconds"));
    assert_eq!(text(&c, "[data-field=v1001-version]").await, "1");
    c.screenshot()
        .await
        .map(|png| std::fs::write(output_dir().join("gateway_propagation.png"), png).unwrap())
        .unwrap();

    // Taps per hour, as bars.
    c.goto(&format!("{}/console/traffic", w.base))
        .await
        .unwrap();
    let chart = wait_text(&c, "#taps-per-hour", "metro", 10, true).await;
    assert!(chart.contains("Taps accepted per hour"), "{chart}");
    c.find(Locator::Css("#taps-per-hour svg rect"))
        .await
        .expect("a bar for the hour's taps");
    c.screenshot()
        .await
        .map(|png| std::fs::write(output_dir().join("gateway_traffic.png"), png).unwrap())
        .unwrap();
    let _ = c.close().await;
}
