//! The validator daemon as operators run it: offline with the process killed at every step of
//! a tap (value conserved, nothing recorded twice), and online against a gateway with its
//! embedded broker (every journalled tap confirmed and cleared from the outbox).

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use support::{
    embedded_gateway_args, free_port, keys_and_fare_table, metro_validator_toml, mqtt_toml,
    wait_for_port, Kill,
};
use validator::journal::Journal;

const PASS: &str = "validator-e2e";
const START_MINOR: i64 = 50_000;

fn tapgate(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .current_dir(dir)
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("VALIDATOR_MQTT_PASSWORD", "v-secret")
        .env("TAPGATE_MQTT_PASSWORD", "gw-secret")
        .output()
        .expect("run tapgate")
}

/// Runs `tapgate validator --config CONFIG --crowd-taps TAPS --json` to the end; returns its
/// summary (the last stdout line) and the whole stdout for messages.
fn run_validator(dir: &Path, config: &str, taps: &str) -> (serde_json::Value, String) {
    let o = tapgate(
        dir,
        &[
            "validator",
            "--config",
            config,
            "--crowd-taps",
            taps,
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    (summary(&out), out)
}

fn setup(dir: &Path, extra: &str, crowd_cards: u32) {
    keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");
    std::fs::write(
        dir.join("validator.toml"),
        format!(
            r#"{}heartbeat_s = 1
drain_timeout_s = 20
{extra}
[crowd]
cards = {crowd_cards}
balance_minor = {START_MINOR}
dir = "cards"
tear_per_mille = 100
"#,
            metro_validator_toml(1001, "Central", "entry", "journal")
        ),
    )
    .unwrap();
}

/// [`setup`] with the validator's broker on loopback `port`.
fn setup_online(dir: &Path, port: u16, crowd_cards: u32) {
    let broker = format!("mqtt://127.0.0.1:{port}");
    setup(
        dir,
        &mqtt_toml(&broker, "VALIDATOR_MQTT_PASSWORD"),
        crowd_cards,
    );
}

/// The validator's summary: the last line of its standard output.
fn summary(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no summary ({e}) in {out}"))
}

/// Σ (start − balance) over the card images: what the cards lost.
fn cards_lost(dir: &Path) -> i64 {
    let mut lost = 0;
    for e in std::fs::read_dir(dir.join("cards")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            lost += START_MINOR - v["main"]["balance_minor"].as_i64().unwrap();
        }
    }
    lost
}

/// Σ debits journalled, and the counters (uid, tmc) they consumed.
fn journalled(dir: &Path) -> (i64, Vec<(Vec<u8>, u32)>) {
    let j = Journal::open(&dir.join("journal"), 1_000_000, 1 << 30).unwrap();
    let mut sum = 0;
    let mut counters = Vec::new();
    for (_, w) in j.outbox_after(0, 1_000_000).unwrap() {
        // Unverified read of the fields (the gateway verifies the MAC): outcome, kind, uid, tmc, amount.
        if w[1] == 0 && w[2] == 1 {
            sum += i64::from(i32::from_be_bytes(w[15..19].try_into().unwrap()));
            counters.push((
                w[4..11].to_vec(),
                u32::from_be_bytes(w[11..15].try_into().unwrap()),
            ));
        }
    }
    // Debits still pending (a card torn and not seen since): the card's counter says whether
    // it applied them, exactly as its next tap here (or clearing) will settle them.
    for p in j.pendings().unwrap() {
        let img = dir
            .join("cards")
            .join(format!("{}.json", hex::encode(p.change.uid)));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(img).unwrap()).unwrap();
        if v["main"]["tmc"].as_u64().unwrap() > u64::from(p.change.tmc_before) {
            sum += i64::from(p.change.amount_minor);
            counters.push((p.change.uid.to_vec(), p.change.tmc_before + 1));
        }
    }
    (sum, counters)
}

#[test]
fn killed_at_every_step_nothing_lost_nothing_doubled() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    setup(dir, "", 400);
    let mut seed = 10;
    for step in ["read", "pending", "committed", "journalled"] {
        for n in ["1", "4"] {
            seed += 1;
            let crash = format!("{n}:{step}");
            let o = tapgate(
                dir,
                &[
                    "validator",
                    "--config",
                    "validator.toml",
                    "--crowd-taps",
                    "6",
                    "--crowd-seed",
                    &seed.to_string(),
                    "--crash-at",
                    &crash,
                ],
            );
            assert!(!o.status.success(), "{crash}: the process should have died");
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("fault injection"),
                "{crash}"
            );
        }
    }
    // Back up: every card the crashes touched comes back (a full pass over the crowd).
    let o = tapgate(
        dir,
        &[
            "validator",
            "--config",
            "validator.toml",
            "--crowd-taps",
            "1200",
            "--crowd-seed",
            "99",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (debits, mut counters) = journalled(dir);
    assert_eq!(
        cards_lost(dir),
        debits,
        "value conserved: what cards lost is what was journalled"
    );
    let n = counters.len();
    counters.sort();
    counters.dedup();
    assert_eq!(counters.len(), n, "no card counter journalled twice");
}

/// `tapgate gateway` with its embedded broker on `port` (device 1001's password "v-secret"),
/// once the broker accepts connections; killed when the guard drops.
fn start_gateway(dir: &Path, port: u16) -> Kill {
    start_gateway_with_api(dir, port, None)
}

/// The gateway, with its HTTP API on `api_port` (an operator token `tg_ops_v`) when given.
fn start_gateway_with_api(dir: &Path, port: u16, api_port: Option<u16>) -> Kill {
    std::fs::write(dir.join("users"), "1001 v-secret\n").unwrap();
    let mut api = Vec::new();
    if let Some(p) = api_port {
        std::fs::write(
            dir.join("gw-api.toml"),
            format!(
                "http_listen = \"127.0.0.1:{p}\"\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
                charging::api::Auth::hash_token("tg_ops_v")
            ),
        )
        .unwrap();
        api = vec!["--config".to_string(), "gw-api.toml".to_string()];
    }
    let gw = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .current_dir(dir)
        .args(embedded_gateway_args("users", port))
        .args(&api)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("TAPGATE_MQTT_PASSWORD", "gw-secret")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = Kill(gw);
    wait_for_port(port, "the gateway's broker");
    if let Some(p) = api_port {
        wait_for_port(p, "the gateway's API");
    }
    guard
}

#[test]
fn online_every_tap_is_confirmed_by_the_gateway() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let port = free_port();
    setup_online(dir, port, 300);
    let _gw = start_gateway(dir, port);
    let (v, out) = run_validator(dir, "validator.toml", "150");
    assert!(v["taps_accepted"].as_u64().unwrap() > 100, "{out}");
    assert_eq!(
        v["outbox_left"], 0,
        "the gateway confirmed every journalled tap: {out}"
    );
}

/// A broker that refuses the validator's subscriptions for a while (as a NATS node does while
/// JetStream moves leaderships): the validator subscribes again, and once the broker takes the
/// confirmation subscription every tap journalled meanwhile is confirmed and the outbox drains.
#[test]
fn a_refused_subscription_is_made_again_and_the_outbox_drains() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let port = free_port();
    let front = tapgate_testkit::refusing_front::RefusingFront::start(port);
    setup_online(dir, front.port(), 50);
    let _gw = start_gateway(dir, port);
    let out = dir.join("validator.out");
    let mut validator = Kill(
        Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .current_dir(dir)
            .args(["validator", "--config", "validator.toml"])
            .args(["--crowd-taps", "30", "--json"])
            .env("TAPGATE_KEY_PASSPHRASE", PASS)
            .env("VALIDATOR_MQTT_PASSWORD", "v-secret")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let confirm = "tapgate/v1/metro/devices/1001/confirm";
    tapgate_testkit::wait_until(
        "the validator subscribes again after a refusal",
        Duration::from_secs(30),
        || front.subscriptions(confirm).0 >= 2,
    );
    front.allow();
    let status = tapgate_testkit::wait::wait_for(
        "the validator drains its outbox and ends",
        Duration::from_secs(60),
        || validator.0.try_wait().unwrap(),
    );
    let out = std::fs::read_to_string(&out).unwrap();
    assert!(status.success(), "{out}");
    let v = summary(&out);
    assert!(v["taps_accepted"].as_u64().unwrap() > 10, "{out}");
    assert_eq!(
        front.subscriptions(confirm).1,
        1,
        "the confirmation subscription taken once refusals ended"
    );
    assert_eq!(
        v["outbox_left"], 0,
        "every tap journalled while refused confirmed: {out}"
    );
}

/// A validator offline for a long stretch keeps every tap; when the gateway is reachable again
/// — six hours later by the validator's clock (libfaketime) — its outbox drains, every tap
/// confirmed after it is durable at the gateway, each stored once.
#[test]
fn offline_then_back_the_outbox_drains() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let port = free_port();
    setup_online(dir, port, 300);
    // Nothing listens on the port: offline. The validator works and keeps everything.
    let (v, out) = run_validator(dir, "validator.toml", "80");
    let kept = v["outbox_left"].as_u64().unwrap();
    assert!(kept > 50, "taps kept while offline: {out}");
    assert_eq!(
        kept,
        v["taps_accepted"].as_u64().unwrap(),
        "every accepted tap kept: {out}"
    );

    // The gateway comes up; the validator starts again hours later with no new taps: it
    // drains.
    let api_port = free_port();
    let _gw = start_gateway_with_api(dir, port, Some(api_port));
    assert!(
        Command::new("faketime").arg("--version").output().is_ok(),
        "faketime is not installed: apt-get install faketime (.ci/run does)"
    );
    let o = Command::new("faketime")
        .args(["-f", "+6h", env!("CARGO_BIN_EXE_tapgate")])
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .current_dir(dir)
        .args([
            "validator",
            "--config",
            "validator.toml",
            "--crowd-taps",
            "0",
            "--json",
        ])
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("VALIDATOR_MQTT_PASSWORD", "v-secret")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let v = summary(&out);
    assert_eq!(v["outbox_left"], 0, "every kept tap confirmed: {out}");
    let (code, metrics) = tapgate_testkit::http::get_text(
        &format!("http://127.0.0.1:{api_port}/metrics"),
        "tg_ops_v",
    );
    assert_eq!(code, 200, "gateway /metrics: {metrics}");
    let metric = |name: &str| -> u64 {
        tapgate_testkit::metrics::sample(&metrics, name)
            .unwrap_or_else(|| panic!("no {name} in {metrics}")) as u64
    };
    assert_eq!(
        metric("tapgate_gateway_taps_stored_total"),
        kept,
        "{metrics}"
    );
    assert_eq!(
        metric("tapgate_gateway_taps_duplicate_total"),
        0,
        "{metrics}"
    );
}

/// A hotel pay-TV box: `kind = "charge"` with a [sale], the hotel's signed table; every guest's
/// presentation buys a film, journalled like a tap. A box without a [sale] is refused clearly.
#[test]
fn a_pay_tv_box_sells_films_from_the_hotel_table() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "hotel/rules.toml", "hotel.tgft");
    let config = |sale: &str| {
        format!(
            "device_id = 2001\noperator = \"grand-hotel\"\nkind = \"charge\"\nutc_offset_minutes = 540\njournal = \"journal\"\nkeys = \"keys\"\nfare_table = \"hotel.tgft\"\n{sale}\n[crowd]\ncards = 5\nbalance_minor = {START_MINOR}\ndir = \"cards\"\n"
        )
    };
    std::fs::write(dir.join("tv.toml"), config("")).unwrap();
    let o = tapgate(
        dir,
        &["validator", "--config", "tv.toml", "--crowd-taps", "1"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs a [sale]"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(
        dir.join("tv.toml"),
        config("[sale]\ncharge = \"movie\"\nitems = 1"),
    )
    .unwrap();
    let (v, out) = run_validator(dir, "tv.toml", "12");
    let accepted = v["taps_accepted"].as_i64().unwrap();
    assert_eq!(accepted, 12, "{out}");
    assert_eq!(v["fares_minor"].as_i64().unwrap(), accepted * 1299, "{out}");
    let (journalled_sum, counters) = journalled(dir);
    assert_eq!(cards_lost(dir), journalled_sum);
    assert_eq!(journalled_sum, 12 * 1299);
    assert_eq!(counters.len(), 12);
}
