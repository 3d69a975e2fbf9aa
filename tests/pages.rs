//! The cardholder pages in a real browser: Debian's chromium, headless, driven over WebDriver
//! (chromedriver) against a charging server on a loopback port. Each browser test saves a
//! screenshot under target/test-output/pages/. `./test.sh` installs chromium and
//! chromium-driver when absent. Plain HTTP checks (CSRF, sign-in limits) need no browser.

use fantoccini::{Client, ClientBuilder, Locator};
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use tapgate_testkit::charging::{self as server, ChargingServer};
use tapgate_testkit::fixtures::token;
use tapgate_testkit::http::post;
use tapgate_testkit::net::free_port;
use tapgate_testkit::process::Kill;

const OPS: &str = "tg_pages_ops";
const ANN: &str = "tg_pages_ann";
const BOB: &str = "tg_pages_bob";
const ANN_PASSWORD: &str = "ann's long passphrase";
const BOB_PASSWORD: &str = "bob's long passphrase";
const ANN_CARD: &str = "04A1A1A1A1A1A1";
const BOB_CARD: &str = "04B2B2B2B2B2B2";

fn keys() -> KeySet {
    KeySet::generate(&mut StdRng::seed_from_u64(18))
}

/// A charging server with two cardholders (ann, bob) who may sign in to the pages, a card
/// each (5,000 and 7,000 KRW), and ann's card token at the processor.
fn world(keys: &KeySet) -> ChargingServer {
    let s = server::start(keys, |cfg| {
        cfg.tokens = vec![
            token("ops", charging::api::Role::Operator, OPS),
            token("ann", charging::api::Role::Cardholder, ANN),
            token("bob", charging::api::Role::Cardholder, BOB),
        ];
        for (name, pw) in [("ann", ANN_PASSWORD), ("bob", BOB_PASSWORD)] {
            cfg.pages
                .cardholders
                .push(charging::pages::CardholderLogin {
                    name: name.into(),
                    password_argon2: charging::pages::hash_password(pw),
                });
        }
    });
    for (uid, balance, owner) in [(ANN_CARD, 5_000, "ann"), (BOB_CARD, 7_000, "bob")] {
        let (code, body) = post(
            &format!("{}/v1/cards", s.base),
            OPS,
            serde_json::json!({"card_uid": uid, "personalised_minor": balance, "owner": owner}),
        );
        assert_eq!(code, 201, "{body}");
    }
    server::register_instrument(&s.base, ANN, "card", "tok_ann_visa");
    s
}

/// Where this test's screenshots go.
fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("test-output").join("pages");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

/// chromedriver on a free port, and a headless chromium session at a phone's width.
struct Browser {
    client: Client,
    _driver: Kill,
}

impl Browser {
    async fn start() -> Browser {
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
            .expect("chromedriver is not installed: ./test.sh setup installs chromium and chromium-driver");
        let port = free_port();
        let driver = Kill(
            Command::new(driver_bin)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting chromedriver"),
        );
        tapgate_testkit::net::wait_for_port(port, "chromedriver");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=412,1000"]
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

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(output_dir().join(format!("{name}.png")), png).expect("saving screenshot");
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .text()
            .await
            .expect("text")
    }

    /// Signs in by keyboard: types the name, tabs to the password, presses Enter.
    async fn sign_in(&self, base: &str, name: &str, password: &str) {
        self.client.goto(&format!("{base}/login")).await.unwrap();
        let field = self.client.find(Locator::Id("name")).await.unwrap();
        field.send_keys(name).await.unwrap();
        field.send_keys("\u{E004}").await.unwrap(); // Tab
        let pw = self.client.active_element().await.unwrap();
        assert_eq!(pw.attr("id").await.unwrap().as_deref(), Some("password"));
        pw.send_keys(password).await.unwrap();
        pw.send_keys("\u{E007}").await.unwrap(); // Enter
        wait_url(&self.client, "/cards").await;
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

async fn wait_url(c: &Client, ends_with: &str) {
    for _ in 0..100 {
        if c.current_url().await.unwrap().path().ends_with(ends_with) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the browser did not reach {ends_with}: at {}",
        c.current_url().await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cardholder_signs_in_and_sees_their_cards_balance() {
    let keys = keys();
    let s = world(&keys);
    let b = Browser::start().await;
    b.sign_in(&s.base, "ann", ANN_PASSWORD).await;
    assert_eq!(b.text("#holder").await, "ann");
    let list = b.text("ul.cards").await;
    assert!(
        list.contains(ANN_CARD) && list.contains("5,000 KRW"),
        "{list}"
    );
    assert!(!list.contains(BOB_CARD), "only her own cards: {list}");
    b.client
        .find(Locator::Css("a.card-link"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_url(&b.client, ANN_CARD).await;
    assert_eq!(b.text("#balance").await, "5,000 KRW");
    let history = b.text("#history").await;
    assert!(
        history.contains("issue") && history.contains("5,000 KRW"),
        "{history}"
    );
    b.screenshot("card_balance").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_holders_card_is_refused() {
    let keys = keys();
    let s = world(&keys);
    let b = Browser::start().await;
    b.sign_in(&s.base, "ann", ANN_PASSWORD).await;
    for path in ["", "/topup", "/report", "/receipts/month/2026-01"] {
        b.client
            .goto(&format!("{}/cards/{BOB_CARD}{path}", s.base))
            .await
            .unwrap();
        let page = b.client.source().await.unwrap();
        assert!(
            page.contains("You have no card with that number") && !page.contains("7,000"),
            "{path}: {page}"
        );
    }
    b.screenshot("another_holders_card").await;
    b.close().await;
    // The same refusal over plain HTTP is a 404, as for a card that does not exist.
    let (agent, cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    for uid in [BOB_CARD, "04FFFFFFFFFFFF"] {
        let r = agent
            .get(&format!("{}/cards/{uid}", s.base))
            .set("Cookie", &cookie)
            .call();
        assert!(matches!(r, Err(ureq::Error::Status(404, _))), "{uid}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_is_pending_until_the_card_proves_the_load() {
    let keys = keys();
    let s = world(&keys);
    let b = Browser::start().await;
    b.sign_in(&s.base, "ann", ANN_PASSWORD).await;
    b.client
        .goto(&format!("{}/cards/{ANN_CARD}", s.base))
        .await
        .unwrap();
    b.client
        .find(Locator::Id("top-up"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_url(&b.client, "/topup").await;
    b.client
        .find(Locator::Id("amount"))
        .await
        .unwrap()
        .send_keys("3,000")
        .await
        .unwrap();
    b.client
        .find(Locator::Id("funding"))
        .await
        .unwrap()
        .select_by_value("card:tok_ann_visa")
        .await
        .unwrap();
    b.client
        .find(Locator::Id("ask-top-up"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    for _ in 0..100 {
        if b.client
            .current_url()
            .await
            .unwrap()
            .path()
            .contains("/topups/")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.text("#topup-state").await, "pending");
    let command = b.text("#charge-command").await;
    assert!(
        command.contains("--amount 3000") && command.contains("--funding card:tok_ann_visa"),
        "{command}"
    );
    b.screenshot("top_up_pending").await;
    let key = command
        .split_whitespace()
        .skip_while(|w| *w != "--idempotency-key")
        .nth(1)
        .expect("the command carries the top-up's idempotency key")
        .to_string();

    // The card at a reader: the load relayed with the top-up's key (what `tapgate charge`
    // does), in process.
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let uid: [u8; 7] = hex::decode(ANN_CARD).unwrap().try_into().unwrap();
    let mut card = tapgate_testkit::fixtures::transit_card(&hsm, uid, 5_000);
    let svc = s.state.loads.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (reply, _) = tokio::task::spawn_blocking(move || {
        let mut now = now;
        let first = svc
            .start(
                "ann",
                charging::load::LoadRequest {
                    uid,
                    amount_minor: 3_000,
                    funding_source: "card".into(),
                    instrument: "tok_ann_visa".into(),
                    idempotency_key: key,
                },
                now,
            )
            .expect("the load starts");
        server::relay_in_process(&svc, "ann", &mut card, first, &mut now, 5, None)
            .expect("the load runs")
    })
    .await
    .unwrap();
    assert!(
        matches!(reply, charging::load::Reply::Completed { .. }),
        "{reply:?}"
    );
    // The page refreshes itself: the top-up is completed, the balance 8,000.
    for _ in 0..100 {
        if b.text("#topup-state").await == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(b.text("#topup-state").await, "completed");
    b.client
        .goto(&format!("{}/cards/{ANN_CARD}", s.base))
        .await
        .unwrap();
    assert_eq!(b.text("#balance").await, "8,000 KRW");
    assert!(b.text("#loads").await.contains("completed"));
    b.screenshot("top_up_completed").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporting_a_card_lost_blocks_it_after_a_confirmation() {
    let keys = keys();
    let s = world(&keys);
    let b = Browser::start().await;
    b.sign_in(&s.base, "ann", ANN_PASSWORD).await;
    b.client
        .goto(&format!("{}/cards/{ANN_CARD}/report", s.base))
        .await
        .unwrap();
    b.screenshot("report_confirmation").await;
    b.client
        .find(Locator::Id("reason-lost"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.client
        .find(Locator::Id("confirm-block"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_url(&b.client, ANN_CARD).await;
    let state = b.text("#block-state").await;
    assert!(
        state.contains("Blocked: lost") && state.contains("version"),
        "{state}"
    );
    b.screenshot("card_blocked").await;
    b.close().await;
    let uid: [u8; 7] = hex::decode(ANN_CARD).unwrap().try_into().unwrap();
    let shadow = s.state.loads.ledger().read().unwrap().card(&uid).unwrap();
    assert!(shadow.blocked);
    assert_eq!(shadow.block_reason.as_deref(), Some("lost"));
}

/// A client with no cookie jar and no redirects: signs in over HTTP, returns the session cookie.
fn signed_in_agent(base: &str, name: &str, password: &str) -> (ureq::Agent, String) {
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let (pre, csrf) = sign_in_form(&agent, base);
    let r = agent
        .post(&format!("{base}/login"))
        .set("Cookie", &pre)
        .send_form(&[("name", name), ("password", password), ("csrf", &csrf)])
        .expect("signing in");
    assert_eq!(r.status(), 303);
    let cookie = set_cookies(&r)
        .into_iter()
        .find(|c| c.starts_with("tg_session=") && !c.starts_with("tg_session=;"))
        .expect("a session cookie");
    (agent, cookie)
}

fn set_cookies(r: &ureq::Response) -> Vec<String> {
    r.all("set-cookie")
        .into_iter()
        .map(|c| c.split(';').next().unwrap().to_string())
        .collect()
}

/// The sign-in form's cookie (`name=value`) and its CSRF field.
fn sign_in_form(agent: &ureq::Agent, base: &str) -> (String, String) {
    let r = agent.get(&format!("{base}/login")).call().unwrap();
    let full: Vec<String> = r.all("set-cookie").into_iter().map(String::from).collect();
    let pre = full
        .iter()
        .find(|c| c.starts_with("tg_signin="))
        .expect("the sign-in cookie");
    assert!(
        pre.contains("HttpOnly") && pre.contains("SameSite=Strict"),
        "{pre}"
    );
    let html = r.into_string().unwrap();
    (pre.split(';').next().unwrap().to_string(), csrf_of(&html))
}

fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field");
    html[at + 19..].split('"').next().unwrap().to_string()
}

fn status(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_form_posted_without_its_csrf_token_is_refused() {
    let keys = keys();
    let s = world(&keys);
    let (agent, cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    let page = agent
        .get(&format!("{}/cards/{ANN_CARD}/report", s.base))
        .set("Cookie", &cookie)
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let csrf = csrf_of(&page);
    let report = |fields: &[(&str, &str)]| {
        status(
            agent
                .post(&format!("{}/cards/{ANN_CARD}/report", s.base))
                .set("Cookie", &cookie)
                .send_form(fields),
        )
    };
    // Without the token, and with another one: refused, nothing blocked.
    let (code, body) = report(&[("reason", "lost")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("Form refused"), "{body}");
    assert_eq!(
        report(&[("reason", "lost"), ("csrf", &"0".repeat(64))]).0,
        403
    );
    let top_up = status(
        agent
            .post(&format!("{}/cards/{ANN_CARD}/topup", s.base))
            .set("Cookie", &cookie)
            .send_form(&[("amount", "1000"), ("funding", "card:tok_ann_visa")]),
    );
    assert_eq!(top_up.0, 403);
    let uid: [u8; 7] = hex::decode(ANN_CARD).unwrap().try_into().unwrap();
    assert!(
        !s.state
            .loads
            .ledger()
            .read()
            .unwrap()
            .card(&uid)
            .unwrap()
            .blocked
    );
    // With it: the card is blocked.
    assert_eq!(report(&[("reason", "lost"), ("csrf", &csrf)]).0, 303);
    assert!(
        s.state
            .loads
            .ledger()
            .read()
            .unwrap()
            .card(&uid)
            .unwrap()
            .blocked
    );
    // The sign-in form too: without its cookie's token, refused.
    let (code, _) = status(agent.post(&format!("{}/login", s.base)).send_form(&[
        ("name", "ann"),
        ("password", ANN_PASSWORD),
        ("csrf", "x"),
    ]));
    assert_eq!(code, 403);
    // Signed out, a private page sends the browser to sign in.
    let r = agent.get(&format!("{}/cards", s.base)).call().unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.header("location"), Some("/login"));
}

#[test]
fn sign_in_is_rate_limited_per_account_with_a_clear_message() {
    let keys = keys();
    let s = world(&keys);
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let attempt = |password: &str| {
        let (pre, csrf) = sign_in_form(&agent, &s.base);
        status(
            agent
                .post(&format!("{}/login", s.base))
                .set("Cookie", &pre)
                .send_form(&[("name", "bob"), ("password", password), ("csrf", &csrf)]),
        )
    };
    for _ in 0..5 {
        let (code, body) = attempt("wrong");
        assert_eq!(code, 401);
        assert!(body.contains("do not match"), "{body}");
    }
    // Locked now, even with the right password.
    let (code, body) = attempt(BOB_PASSWORD);
    assert_eq!(code, 429);
    assert!(
        body.contains("Too many failed sign-ins for this account. Try again in 15 minutes."),
        "{body}"
    );
    // Another account from the same address still signs in.
    let (_agent, cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    assert!(cookie.starts_with("tg_session="));
}

#[test]
fn the_demo_serves_the_pages_and_keeps_serving_until_interrupted() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args([
            "demo",
            "--taps",
            "200",
            "--cards",
            "10",
            "--validators",
            "2",
            "--keep-serving",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tapgate demo");
    let pid = child.id();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let _kill = Kill(child);
    let (mut console, mut login) = (None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(url) = line.strip_prefix("console: ") {
            console = Some(url.trim_end_matches('/').to_string());
        }
        if let Some(l) = line.strip_prefix("cardholder login: ") {
            let (name, pw) = l.split_once(' ').unwrap();
            login = Some((name.to_string(), pw.to_string()));
        }
        if line.starts_with("the day is over; the pages stay up at ") {
            break;
        }
    }
    let base = console.expect("a console: URL line");
    let (name, password) = login.expect("a cardholder login: NAME PASSWORD line");
    // After the day: the printed login signs in and sees its card.
    let (agent, cookie) = signed_in_agent(&base, &name, &password);
    let cards = agent
        .get(&format!("{base}/cards"))
        .set("Cookie", &cookie)
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(cards.contains("class=\"card-link\""), "{cards}");
    // Ctrl-C ends it.
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    tapgate_testkit::wait::wait_until("the demo to stop", Duration::from_secs(20), || {
        agent.get(&format!("{base}/healthz")).call().is_err()
    });
}

#[test]
fn charging_page_login_prints_a_config_entry_with_the_passwords_argon2id_hash() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["charging", "page-login", "--name", "rider-7"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a long passphrase\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let entry = String::from_utf8(out.stdout).unwrap();
    let cfg = charging::server::ServerConfig::from_toml(&format!("data_dir = \"/tmp/x\"\n{entry}"))
        .expect("the entry is configuration");
    let login = &cfg.pages.cardholders[0];
    assert_eq!(login.name, "rider-7");
    assert!(charging::pages::verify_password(
        &login.password_argon2,
        "a long passphrase"
    ));
    assert!(!entry.contains("a long passphrase"));
}
