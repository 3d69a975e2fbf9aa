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

use fantoccini::Locator;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{
    free_port, keys_and_fare_table, metro_rules, wait_for_port, Kill, NIGHTBUS_CONTRADICTION,
};
use tapgate_http::auth::Role;
use tapgate_testkit::browser::{agent, csrf_of, signed_in_agent, status, Browser};
use tapgate_testkit::fixtures::token;

const PASS: &str = "gateway-console";
const OP_PASSWORD: &str = "the duty officer's long passphrase";
const GW_TOKEN: &str = "tg_gw_console";
const RIDER_PASSWORD: &str = "the rider's own long passphrase";
/// The rider's card (registered to "rider" in the back office; not one of the crowd's).
const RIDER_CARD: &str = "04180000000018";

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
        cfg.tokens = vec![
            token("gw", Role::Gateway, GW_TOKEN),
            token("ops", Role::Operator, "tg_op_console"),
        ];
        // The same duty officer signs in to the back office's console (fare tables).
        cfg.pages.operators.push(tapgate_http::pages::PageLogin {
            name: "duty".into(),
            password_argon2: tapgate_http::pages::hash_password(OP_PASSWORD),
        });
        // A cardholder who reports their card lost (the block reaching the validator).
        cfg.pages.cardholders.push(tapgate_http::pages::PageLogin {
            name: "rider".into(),
            password_argon2: tapgate_http::pages::hash_password(RIDER_PASSWORD),
        });
    });
    let ledger = back_office.state.loads.ledger();
    let uid: [u8; 7] = hex::decode(RIDER_CARD).unwrap().try_into().unwrap();
    ledger
        .transact(move |t| {
            t.issue_card(&uid, 2_000, "issue:rider", 0)?;
            t.set_owner(&uid, "rider")
        })
        .unwrap();
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
            .args(["--charging-token", GW_TOKEN])
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
    let (a, cookie) = signed_in_agent(&w.base, "duty", OP_PASSWORD);
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

/// Signs in to the gateway's console by keyboard (a console page without a session goes to
/// the sign-in form first) and lands on the devices page.
async fn sign_in(b: &Browser, w: &World) {
    b.goto(&format!("{}/console", w.base)).await;
    b.wait_url("/login").await;
    b.sign_in_to(&w.base, "duty", OP_PASSWORD, "/console").await;
    assert_eq!(b.text("#operator").await, "duty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_the_validators_and_a_block_reach_them() {
    let w = world();
    let b = Browser::start(1400).await;

    // Signing in by keyboard lands on the devices page.
    sign_in(&b, &w).await;

    // The validator, online, with its heartbeat's versions and outbox, and its taps.
    b.wait_text("#device-1001 td.state", "online", 30, true)
        .await;
    let since = Instant::now();
    loop {
        let taps = b.text("#device-1001 td.taps").await;
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
        b.client.refresh().await.unwrap();
    }
    for cell in [
        "heartbeat",
        "blocklist",
        "fare",
        "outbox",
        "skew",
        "last-tap",
    ] {
        let t = b.text(&format!("#device-1001 td.{cell}")).await;
        assert!(!t.trim().is_empty() && !t.contains('—'), "{cell}: {t:?}");
    }
    assert!(b.text("#online-count").await.starts_with("1 of 1"));
    b.screenshot("gateway_devices").await;

    // Block propagation: the duty officer blocks a card on the back office's console (signed
    // in there too: each daemon keeps its own session cookie on the one host); the card's page
    // there follows the block to the validator without a reload, as the gateway reports it.
    let bo = w.back_office.base.clone();
    b.sign_in_to(&bo, "duty", OP_PASSWORD, "/console").await;
    b.goto(&format!("{bo}/console/cards/04070707070707")).await;
    b.retype("block-reason", "lost").await;
    b.click("block").await;
    b.wait_query("blocklist_version=1").await;
    block_reached(&b).await;
    b.screenshot("console_block_reached_validators").await;
    b.goto(&format!("{}/console/propagation", w.base)).await;
    // The gateway fetches the list at its next poll: reload until it has published it.
    b.wait_text("#propagation [data-field=version]", "1", 60, true)
        .await;
    // From here the page is not reloaded: its script follows the validator's heartbeats.
    let held = b.wait_text("#to-100", "reached after", 30, false).await;
    assert!(held.starts_with("reached after"), "{held}");
    assert_eq!(
        b.text("[data-field=percent]").await,
        "100%",
        "the one validator online holds version 1"
    );
    b.wait_text("[data-field=v1001-holds]", "yes", 10, false)
        .await;
    // The script is what keeps it current: the figure's time moves on without a reload.
    let as_of = b.text("[data-field=as_of]").await;
    let since = Instant::now();
    while b.text("[data-field=as_of]").await == as_of {
        assert!(
            since.elapsed() < Duration::from_secs(8),
            "the page did not update itself"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(b
        .text("[data-live-note]")
        .await
        .contains("Updating every 2 seconds"));
    assert_eq!(b.text("[data-field=v1001-version]").await, "1");
    b.screenshot("gateway_propagation").await;

    // Taps per hour, as bars.
    b.goto(&format!("{}/console/traffic", w.base)).await;
    let chart = b.wait_text("#taps-per-hour", "metro", 10, true).await;
    assert!(chart.contains("Taps accepted per hour"), "{chart}");
    b.client
        .find(Locator::Css("#taps-per-hour svg rect"))
        .await
        .expect("a bar for the hour's taps");
    b.screenshot("gateway_traffic").await;
    b.close().await;
}

/// What the back office answers the gateway asking for the published fare table (200 with
/// the table, 204 when there is none).
fn published(base: &str) -> u16 {
    status(
        ureq::get(&format!("{base}/v1/fares/signed/snapshot"))
            .set("Authorization", &format!("Bearer {GW_TOKEN}"))
            .call(),
    )
    .0
}

/// Uploads `rules` (and the tap log `taps`, if any) on the back office's fare-table page and
/// presses `button` (`check` or `publish`).
async fn upload(
    b: &Browser,
    base: &str,
    rules: &std::path::Path,
    taps: Option<&std::path::Path>,
    button: &str,
) {
    b.goto(&format!("{base}/console/fares")).await;
    let pick = |id: &'static str, path: String| async move {
        b.client
            .find(Locator::Id(id))
            .await
            .unwrap()
            .send_keys(&path)
            .await
            .unwrap()
    };
    pick("rules", rules.display().to_string()).await;
    if let Some(t) = taps {
        pick("taps", t.display().to_string()).await;
    }
    b.click(button).await;
    b.wait_text("#check-summary", "fare check:", 20, false)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fare_table_with_an_error_is_not_published_and_a_good_one_reaches_the_validator() {
    let w = world();
    let files = tempfile::tempdir().unwrap();
    let base = w.back_office.base.clone();
    let b = Browser::start(1400).await;
    b.sign_in_to(&base, "duty", OP_PASSWORD, "/console").await;

    // A second night-bus fare for the same legs at another price: `fare check`'s error.
    let bad = metro_rules(files.path(), "bad.toml", 2, NIGHTBUS_CONTRADICTION);
    upload(&b, &base, &bad, None, "publish").await;
    let findings = b.text("#findings").await;
    assert!(
        findings.contains("error") && findings.contains("contradicts"),
        "{findings}"
    );
    assert!(b.text("#check-summary").await.contains("1 error(s)"));
    let state = b.text("#publish-state").await;
    assert!(state.contains("nothing was published"), "{state}");
    b.screenshot("console_fare_table_refused").await;
    assert_eq!(published(&base), 204, "nothing for the gateway to relay");
    b.goto(&format!("{base}/console/fares")).await;
    b.text("#published-version-none").await;

    // The metro's rules at version 2: signed and published; the gateway relays them and the
    // validator reports holding version 2.
    let good = metro_rules(files.path(), "metro-v2.toml", 2, "");
    let taps = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fare-rules/samples/metro-city/taps.csv");
    upload(&b, &base, &good, Some(&taps), "publish").await;
    assert!(b.text("#check-summary").await.contains("0 error(s)"));
    let state = b.text("#publish-state").await;
    assert!(state.contains("Published version 2"), "{state}");
    assert!(b
        .text("#simulation-error")
        .await
        .contains("nothing to compare with"));
    assert_eq!(b.text("#published-version").await, "2");
    assert_eq!(published(&base), 200);
    b.screenshot("console_fare_table_published").await;

    // A dearer metro (version 3), checked only: its revenue impact against version 2.
    let dear = metro_rules(files.path(), "metro-v3.toml", 3, "");
    let text = std::fs::read_to_string(&dear).unwrap();
    std::fs::write(&dear, text.replacen("price = 1400,", "price = 1550,", 1)).unwrap();
    upload(&b, &base, &dear, Some(&taps), "check").await;
    let sim = b.text("#simulation").await;
    assert!(sim.contains("taps") && sim.contains('+'), "{sim}");
    assert_eq!(
        b.text("#publish-state").await,
        "Checked: not published yet."
    );
    assert_eq!(b.text("#published-version").await, "2", "still version 2");
    b.screenshot("console_fare_table_impact").await;

    // Without a tap log the revenue impact is replayed over the taps the back office cleared
    // in the last 7 days: the validator's, at the stop and route clearing kept for each.
    upload(&b, &base, &dear, None, "check").await;
    let against = b.text("#simulation-against").await;
    assert!(
        against.contains("taps the back office cleared in the last 7 days"),
        "{against}"
    );
    let replayed: u64 = against
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(replayed > 0, "{against}");
    let sim = b.text("#simulation").await;
    assert!(
        sim.starts_with(&format!("{replayed} taps of ")) && sim.contains("published table"),
        "{sim}"
    );
    b.screenshot("console_fare_table_recent_taps").await;

    // The validator took version 2 (its heartbeat says so on the gateway's console).
    sign_in(&b, &w).await;
    b.wait_text("#device-1001 td.fare", "2", 60, true).await;
    b.screenshot("gateway_fare_table_version").await;

    b.close().await;
}

/// Waits, without reloading, until the card page open in `b` says the one validator holds the
/// block at the one gateway; the gateway's row of the reach table.
async fn block_reached(b: &Browser) -> String {
    let reached = b
        .wait_text(
            "#reach-summary",
            "1 of 1 validators online hold the block (100%)",
            60,
            false,
        )
        .await;
    assert!(reached.contains("at 1 gateway(s)"), "{reached}");
    let row = b.text("#reach-gateways tbody tr").await;
    assert!(row.contains("100%: reached after"), "{row}");
    row
}

/// The cardholder's side of a block (issue 18): signed in to the back office at a phone's
/// width, the rider reports their card lost; the card's page then follows the block to the
/// validator — the gateway reports each version's reach to the back office
/// (`POST /v1/blocklist/propagation`) — without being reloaded, until the one validator holds
/// it. The operator's card page in the back office's console shows the same figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cardholder_reports_a_card_lost_and_watches_the_block_reach_the_validators() {
    let w = world();
    let bo = w.back_office.base.clone();
    // The validator is online at the gateway before the card is reported.
    let b = Browser::start(900).await;
    sign_in(&b, &w).await;
    b.wait_text("#device-1001 td.state", "online", 30, true)
        .await;

    b.sign_in_to(&bo, "rider", RIDER_PASSWORD, "/cards").await;
    b.goto(&format!("{bo}/cards/{RIDER_CARD}/report")).await;
    b.click("reason-lost").await;
    b.click("confirm-block").await;
    b.wait_url(RIDER_CARD).await;
    let state = b.text("#block-state").await;
    assert!(state.contains("Blocked: lost"), "{state}");
    assert_eq!(b.text("#reach-version").await, "1");
    // From here the page is not reloaded: its script follows the gateway's reports.
    let row = block_reached(&b).await;
    assert!(row.starts_with("gw"), "the gateway's token name: {row}");
    assert!(row.contains("1 of 1 validators (100%)"), "{row}");
    assert!(b
        .text("[data-live-note]")
        .await
        .contains("Updating every 2 seconds"));
    b.screenshot("card_block_reached_validators").await;

    // The operator's card page in the back office's console shows the same figure.
    let (agent, cookie) = signed_in_agent(&bo, "duty", OP_PASSWORD);
    let figure: serde_json::Value = serde_json::from_str(&tapgate_testkit::browser::page(
        &agent,
        &format!("{bo}/console/cards/{RIDER_CARD}/block.json"),
        &cookie,
    ))
    .unwrap();
    assert_eq!(
        (figure["version"].as_u64(), figure["all"].as_bool()),
        (Some(1), Some(true))
    );
    let console = tapgate_testkit::browser::page(
        &agent,
        &format!("{bo}/console/cards/{RIDER_CARD}"),
        &cookie,
    );
    assert!(
        console.contains("1 of 1 validators online hold the block (100%)"),
        "{console}"
    );
    // The rider's figure is theirs only: the operator's session is refused on it, and an
    // unknown card's answers 404.
    assert_eq!(
        status(
            agent
                .get(&format!("{bo}/cards/{RIDER_CARD}/block.json"))
                .set("Cookie", &cookie)
                .call()
        )
        .0,
        403
    );
    assert_eq!(
        status(
            agent
                .get(&format!("{bo}/console/cards/04999999999999/block.json"))
                .set("Cookie", &cookie)
                .call()
        )
        .0,
        404
    );
    // Over the API: operators read the same figures; a gateway's report is its own token's.
    let api: serde_json::Value = agent
        .get(&format!("{bo}/v1/blocklist/propagation?version=1"))
        .set("Authorization", "Bearer tg_op_console")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(api["gateways"][0]["gateway"], "gw");
    assert_eq!(api["gateways"][0]["figure"]["holding"], 1);
    let bad = serde_json::json!({"figures": [{"version": 1, "published_at_ms": 0,
        "online_validators": 1, "holding": 2}]});
    assert_eq!(
        status(
            agent
                .post(&format!("{bo}/v1/blocklist/propagation"))
                .set("Authorization", &format!("Bearer {GW_TOKEN}"))
                .send_json(bad)
        )
        .0,
        400,
        "more holders than validators"
    );
    assert_eq!(
        status(
            agent
                .post(&format!("{bo}/v1/blocklist/propagation"))
                .set("Authorization", "Bearer tg_op_console")
                .send_json(serde_json::json!({"figures": []}))
        )
        .0,
        403,
        "an operator's token cannot report for a gateway"
    );
    // Both daemons on one host, one browser: the gateway console's session (its own cookie,
    // tg_gw_session) outlived signing in to the back office, and the rider is still signed in.
    b.goto(&format!("{}/console", w.base)).await;
    assert_eq!(b.text("#operator").await, "duty");
    b.goto(&format!("{bo}/cards")).await;
    assert_eq!(b.text("#holder").await, "rider");
    b.close().await;
}
