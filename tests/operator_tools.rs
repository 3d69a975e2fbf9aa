//! The operator's standard tools against the daemons as they run: the Prometheus alerting rules
//! (`deploy/prometheus/alerts.yml`, checked and unit-tested by `promtool`) and the Grafana
//! dashboard (`deploy/grafana/tapgate.json`) name only metrics the daemons export; the gateway's
//! TIDES `fare_transactions.csv` export validates against the TIDES table schema with
//! Frictionless; `--log-format json` writes JSON lines whose card UIDs are masked.
//!
//! One world per test, every part a real process on loopback: `tapgate charging`, `tapgate
//! gateway` (embedded broker, HTTP API, forwarding to clearing) and a `tapgate validator` with its
//! metrics listener, tapping an emulated crowd. Needs `promtool` (Debian's prometheus) and
//! Frictionless in `target/tools/py` (or on PATH): `./test.sh setup` installs both.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{
    embedded_gateway_args, free_port, keys_and_fare_table, metro_validator_toml, mqtt_toml,
    wait_for_port, Kill,
};
use tapgate_testkit::http;
use tapgate_testkit::spawn_charging;
use tapgate_testkit::wait::wait_until;

const PASS: &str = "operator-tools";
const OPS: &str = "tg_ops_tools";
const GW: &str = "tg_gw_tools";
const DEVICE: u32 = 1001;
const CARDS: u32 = 30;
/// A second validator, run in the test with a clock it sets (a day of trips in a moment).
const SECOND: u32 = 1002;
const SECOND_PASSWORD: &str = "v2-secret";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tapgate(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tapgate"));
    c.current_dir(dir)
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("TAPGATE_MQTT_PASSWORD", "gw-secret")
        .env("TAPGATE_GATEWAY_TOKEN", GW)
        .env("VALIDATOR_MQTT_PASSWORD", "v-secret");
    c
}

/// The running daemons and where to scrape them.
struct World {
    dir: tempfile::TempDir,
    charging: String,
    gateway: String,
    mqtt_port: u16,
    validator_metrics: String,
    _guards: Vec<Kill>,
}

/// Starts charging, the gateway and a validator (`validator_args` added to its command line,
/// `TAPGATE_LOG` set to `validator_log` when given; its standard error to `validator.log`), and
/// waits until the gateway stored `taps` taps.
fn world(validator_args: &[&str], validator_log: Option<&str>, taps: u64) -> World {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");
    let sha = charging::api::Auth::hash_token;
    std::fs::write(
        dir.join("charging.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"charging\"\noperator = \"metro\"\nledger_map_size_bytes = 67108864\n\n[[tokens]]\nname = \"gw\"\nrole = \"gateway\"\nsha256 = \"{}\"\n\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            sha(GW),
            sha(OPS)
        ),
    )
    .unwrap();
    let (charging_guard, charging) = spawn_charging(
        tapgate(
            dir,
            &["charging", "--config", "charging.toml", "--keys", "keys"],
        )
        .stderr(Stdio::null()),
    );
    for i in 0..CARDS {
        let uid = validator::reader::crowd_uid(i);
        let (code, body) = http::post(
            &format!("{charging}/v1/cards"),
            OPS,
            serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": 50_000}),
        );
        assert_eq!(code, 201, "{body}");
    }

    let (mqtt_port, api_port, metrics_port) = (free_port(), free_port(), free_port());
    std::fs::write(
        dir.join("users"),
        format!("{DEVICE} v-secret\n{SECOND} {SECOND_PASSWORD}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("gw-api.toml"),
        format!(
            "http_listen = \"127.0.0.1:{api_port}\"\nfare_tables = [\"metro.tgft\"]\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            sha(OPS)
        ),
    )
    .unwrap();
    let gateway_guard = Kill(
        tapgate(dir, &[])
            .args(embedded_gateway_args("users", mqtt_port))
            .args(["--charging", &charging, "--config", "gw-api.toml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tapgate gateway"),
    );
    wait_for_port(mqtt_port, "the gateway's broker");
    wait_for_port(api_port, "the gateway's API");
    let gateway = format!("http://127.0.0.1:{api_port}");

    std::fs::write(
        dir.join("validator.toml"),
        format!(
            "{}heartbeat_s = 1\n\n{}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[crowd]\ncards = {CARDS}\nbalance_minor = 50000\ndir = \"cards\"\ntaps = 1000000\n",
            metro_validator_toml(DEVICE, "Central", "entry", "journal"),
            mqtt_toml(
                &format!("mqtt://127.0.0.1:{mqtt_port}"),
                "VALIDATOR_MQTT_PASSWORD"
            ),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("validator.log")).unwrap();
    let mut validator = tapgate(dir, &["validator", "--config", "validator.toml"]);
    if let Some(filter) = validator_log {
        validator.env("TAPGATE_LOG", filter);
    }
    let validator_guard = Kill(
        validator
            .args(validator_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tapgate validator"),
    );
    wait_for_port(metrics_port, "the validator's metrics");
    wait_until(
        "the gateway stores the validator's taps and hears its heartbeat",
        Duration::from_secs(60),
        || {
            let m = scrape(&format!("{gateway}/metrics"), Some(OPS));
            tapgate_testkit::metrics::sample(&m, "tapgate_gateway_taps_stored_total")
                .is_some_and(|n| n >= taps as f64)
                && m.contains(&format!(
                    "tapgate_gateway_validator_last_heartbeat_timestamp_seconds{{device=\"{DEVICE}\"}}"
                ))
        },
    );
    World {
        dir: d,
        charging,
        gateway,
        mqtt_port,
        validator_metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
        _guards: vec![validator_guard, gateway_guard, charging_guard],
    }
}

/// `GET url` (with a bearer token when given): the body of a 200.
fn scrape(url: &str, token: Option<&str>) -> String {
    let (code, body) = match token {
        Some(t) => http::get_text(url, t),
        None => {
            let r = ureq::get(url).call().expect("scrape");
            (r.status(), r.into_string().unwrap())
        }
    };
    assert_eq!(code, 200, "{url}: {body}");
    body
}

/// The metric names a Prometheus text exposition names: its `# TYPE` families and its samples.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') || line.is_empty() => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(n) = name {
            names.insert(n.to_string());
        }
    }
    names
}

/// The `tapgate_…` metric names in a text (PromQL in YAML or JSON).
fn named(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tapgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The PromQL expressions of the dashboard's panels.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("a target's expr").to_string());
        }
    }
    exprs
}

#[test]
fn alert_rules_and_dashboard_name_only_metrics_the_daemons_export() {
    let rules_path = repo().join("deploy/prometheus/alerts.yml");
    let o = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_path)
        .output()
        .expect("promtool is not installed: apt-get install prometheus (./test.sh setup does)");
    assert!(
        o.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let o = Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo().join("deploy/prometheus/alerts.test.yml"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let w = world(&[], None, 20);
    let mut have = exported(&scrape(&format!("{}/metrics", w.gateway), Some(OPS)));
    have.extend(exported(&scrape(
        &format!("{}/metrics", w.charging),
        Some(OPS),
    )));
    have.extend(exported(&scrape(&w.validator_metrics, None)));
    for family in [
        "tapgate_gateway_validator_clock_skew_seconds",
        "tapgate_validator_outbox_capacity",
        "tapgate_charging_clearing_anomalies_total",
    ] {
        assert!(have.contains(family), "{family} not exported: {have:?}");
    }

    let rules = std::fs::read_to_string(&rules_path).unwrap();
    let in_rules = named(&rules);
    assert!(in_rules.len() >= 15, "{in_rules:?}");
    let missing: Vec<_> = in_rules.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "alerts.yml names metrics no daemon exports: {missing:?}"
    );

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/tapgate.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "tapgate");
    assert!(dashboard["schemaVersion"].as_u64().is_some());
    let exprs = dashboard_exprs(&dashboard);
    let in_dashboard = named(&exprs.join("\n"));
    for prefix in [
        "tapgate_validator_",
        "tapgate_gateway_",
        "tapgate_charging_",
    ] {
        assert!(
            in_dashboard.iter().any(|n| n.starts_with(prefix)),
            "the dashboard has no {prefix}* panel"
        );
    }
    let missing: Vec<_> = in_dashboard.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "the dashboard names metrics no daemon exports: {missing:?}"
    );
}

/// The Frictionless CLI: `target/tools/py/bin/frictionless` (./test.sh setup), else on PATH.
fn frictionless() -> PathBuf {
    let venv = repo().join("target/tools/py/bin/frictionless");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("frictionless")
    }
}

/// A day of metro trips on one card at device [`SECOND`]'s gate (the validator's own gate code
/// and fare engine, the clock set by the test): seven trips from 08:00, 90 minutes apart, so the
/// daily cap (80.00) reduces the later fares. Returns the journalled tap records (format v3,
/// signed by the device's SAM) with the capped flag each carries, and the first tap as format
/// v2 would have carried it.
fn a_capped_day_at_a_second_gate(dir: &Path) -> (Vec<(Vec<u8>, bool)>, Vec<u8>) {
    use fare_rules::record::TapKind;
    use validator::gate::Answer;
    let keys = purse::keys::KeySet::unseal(
        &std::fs::read(dir.join("keys/issuer.keys")).unwrap(),
        PASS.as_bytes(),
    )
    .unwrap();
    let hsm = purse::sam::SoftwareHsm::new(&keys).unwrap();
    let uid = [4, 0x10, 0x02, 0, 0, 0, 1];
    let mut card = purse::card::Card::personalise(
        &purse::card::Personalisation::transit(uid, 50_000),
        hsm.card_keys(&uid, 1).unwrap(),
    );
    let gate = |stop: &str, kind| {
        let sam = purse::sam::SoftwareSam::validator(&keys, SECOND).unwrap();
        support::gate::metro_gate(sam, SECOND, stop, kind, 9)
    };
    let mut gates = [
        gate("Central", TapKind::In),
        gate("University", TapKind::Out),
    ];
    let journal = validator::journal::Journal::open(&dir.join("second"), 100, 1 << 24).unwrap();
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(8);
    // 2026-12-01 08:00 in Metro City (UTC+9).
    const T0_MS: u64 = 1_796_079_600_000;
    for trip in 0..7u64 {
        for (g, at) in [(0, 0), (1, 20 * 60_000)] {
            let mut reader = purse::txn::EmulatedReader {
                card: &mut card,
                rng: &mut rng,
            };
            let out = gates[g]
                .tap(
                    &mut reader,
                    &journal,
                    T0_MS + trip * 90 * 60_000 + at,
                    &mut |_| {},
                )
                .unwrap();
            assert!(matches!(out.answer, Answer::Accepted { .. }), "{out:?}");
            card.remove_from_field();
        }
    }
    let sam = purse::sam::SoftwareSam::validator(&keys, SECOND).unwrap();
    let key = purse::sam::Sam::device_key(&sam).clone();
    let taps: Vec<(Vec<u8>, bool)> = journal
        .outbox_after(0, 100)
        .unwrap()
        .into_iter()
        .map(|(_, w)| {
            let t =
                purse::tap::TapRecord::decode_verified(&w, "metro", |_| Some(key.clone())).unwrap();
            let capped = t.flags().expect("the gate writes format v3").capped();
            (w, capped)
        })
        .collect();
    // Format v2: the first tap without its flags byte, MAC'd as a v2 validator did.
    let mut v2 = taps[0].0[..71].to_vec();
    v2[0] = 2;
    let mac = purse::sam::Sam::device_mac(&sam, &purse::tap::mac_input(&v2, "metro"));
    v2.extend_from_slice(&mac);
    (taps, v2)
}

/// The TIDES export, once it has transaction `id`.
fn export_with(w: &World, id: &str) -> String {
    let url = format!("{}/v1/export/tides/fare_transactions.csv", w.gateway);
    let mut csv = String::new();
    wait_until(
        "the export has the second gate's taps",
        Duration::from_secs(30),
        || {
            let (code, body) = http::get_text(&url, OPS);
            assert_eq!(code, 200, "{body}");
            csv = body;
            csv.lines().any(|l| l.starts_with(&format!("{id},")))
        },
    );
    csv
}

/// Publishes `payload` on device [`SECOND`]'s taps topic, as that device, and waits for the ack.
fn publish_as_second(mqtt_port: u16, payload: Vec<u8>) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new("second-validator", "127.0.0.1", mqtt_port);
    opts.set_credentials(SECOND.to_string(), SECOND_PASSWORD);
    let (client, mut conn) = Client::new(opts, 10);
    client
        .publish(
            format!("tapgate/v1/metro/taps/{SECOND}"),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .unwrap();
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("publishing as device {SECOND}: {e}"),
        }
    }
}

#[test]
fn the_tides_export_validates_against_the_tides_schema() {
    let w = world(&[], None, 40);
    // A second gate's day of trips, some capped by the fare engine, published as that device
    // would (v3 records, and one v2 record such as a validator journalled before its upgrade).
    let (taps, v2) = a_capped_day_at_a_second_gate(w.dir.path());
    let wire: Vec<Vec<u8>> = taps.iter().map(|(t, _)| t.clone()).collect();
    publish_as_second(w.mqtt_port, [vec![v2], wire].concat().concat());
    let csv = export_with(&w, &format!("{SECOND}-{}", taps.len()));
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert!(rows.len() >= 20, "{csv}");
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let capped = header.iter().position(|h| *h == "fare_capped").unwrap();
    let cell = |r: &str| r.split(',').nth(capped).unwrap().to_string();
    // Each device's (sequence, fare_capped) in sequence order.
    let device_rows = |d: u32| {
        let mut v: Vec<(u64, String)> = rows
            .iter()
            .filter_map(|r| {
                let seq = r.split(',').next()?.strip_prefix(&format!("{d}-"))?;
                Some((seq.parse().unwrap(), cell(r)))
            })
            .collect();
        v.sort();
        v
    };
    // The running validator's taps: v3, so each says true or false (never empty).
    let first = device_rows(DEVICE);
    assert!(!first.is_empty(), "{csv}");
    for (seq, c) in &first {
        assert!(
            c == "true" || c == "false",
            "{DEVICE}-{seq}: fare_capped {c:?}"
        );
    }
    // The second gate's: what its fare engine said of each tap, some capped and some not.
    let expected: Vec<String> = taps.iter().map(|(_, c)| c.to_string()).collect();
    assert!(
        expected.contains(&"true".into()),
        "no capped tap: {expected:?}"
    );
    assert!(expected.contains(&"false".into()), "{expected:?}");
    let second = device_rows(SECOND);
    assert_eq!(second.len(), taps.len(), "{csv}");
    // The v2 record and the first v3 one are both device 1002's sequence 1: the gateway kept
    // the first it was given, the v2 one, whose flag is not known: written empty.
    assert_eq!(second[0], (1, String::new()), "{csv}");
    let got: Vec<String> = second[1..].iter().map(|(_, c)| c.clone()).collect();
    assert_eq!(got, expected[1..], "{csv}");

    let path = w.dir.path().join("fare_transactions.csv");
    std::fs::write(&path, &csv).unwrap();
    let schema = repo().join("deploy/tides/fare_transactions.schema.json");
    let run = |csv: &Path| {
        Command::new(frictionless())
            .args(["validate", "--trusted", "--schema"])
            .arg(&schema)
            .arg(csv)
            .output()
            .expect(
                "frictionless is not installed: ./test.sh setup installs it into target/tools/py",
            )
    };
    let o = run(&path);
    assert!(
        o.status.success(),
        "frictionless validate: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // The validation bites: a fare_capped that is not a boolean is refused.
    let mut broken = String::new();
    for (i, line) in csv.lines().enumerate() {
        let mut cells: Vec<&str> = line.split(',').collect();
        if i == 1 {
            cells[capped] = "maybe";
        }
        broken.push_str(&cells.join(","));
        broken.push('\n');
    }
    let bad = w.dir.path().join("broken.csv");
    std::fs::write(&bad, broken).unwrap();
    let o = run(&bad);
    assert!(
        !o.status.success(),
        "fare_capped \"maybe\" passed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// The complete lines of a log being written (a last line without its newline is left out),
/// each parsed as JSON.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

#[test]
fn json_logs_name_device_masked_card_and_sequence_and_never_a_whole_uid() {
    let w = world(&["--log-format", "json"], Some("warn,validator=debug"), 20);
    let log = std::fs::read_to_string(w.dir.path().join("validator.log")).unwrap();
    let lines = json_lines(&log);
    let taps: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "tap" && l["outcome"] == "accepted")
        .collect();
    assert!(taps.len() >= 20, "{log}");
    for t in &taps {
        assert_eq!(t["device"], DEVICE, "{t}");
        assert!(t["seq"].as_u64().is_some_and(|s| s > 0), "{t}");
        let card = t["card"].as_str().unwrap();
        assert!(
            card.starts_with('\u{2026}') && card.chars().count() == 5,
            "a card is its last 4 hex digits: {card:?}"
        );
        assert!(t["timestamp"].is_string() && t["level"] == "DEBUG", "{t}");
    }
    for i in 0..CARDS {
        let uid = validator::reader::crowd_uid(i);
        for whole in [hex::encode_upper(uid), hex::encode(uid)] {
            assert!(!log.contains(&whole), "card {whole} in the log");
        }
        assert!(
            !log.contains(&format!("{uid:?}")),
            "card {uid:?} in the log as bytes"
        );
    }
}

#[test]
fn json_logs_carry_the_request_id_of_each_http_request() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");
    std::fs::write(
        dir.join("charging.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"charging\"\noperator = \"metro\"\nledger_map_size_bytes = 67108864\n\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            charging::api::Auth::hash_token(OPS)
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("charging.log")).unwrap();
    let (_charging, base) = spawn_charging(
        tapgate(
            dir,
            &[
                "charging",
                "--config",
                "charging.toml",
                "--keys",
                "keys",
                "--log-format",
                "json",
            ],
        )
        .env("TAPGATE_LOG", "warn,tapgate_http=debug")
        .stderr(log),
    );
    let uid = validator::reader::crowd_uid(7);
    let r = ureq::post(&format!("{base}/v1/cards"))
        .set("Authorization", &format!("Bearer {OPS}"))
        .set("X-Request-Id", "ops-req-42")
        .send_json(
            serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": 100}),
        )
        .expect("register a card");
    assert_eq!(r.header("x-request-id"), Some("ops-req-42"));
    let r = ureq::get(&format!("{base}/metrics"))
        .set("Authorization", &format!("Bearer {OPS}"))
        .call()
        .unwrap();
    let made = r
        .header("x-request-id")
        .expect("an id made for the request")
        .to_string();
    assert_ne!(made, "ops-req-42");
    let path = dir.join("charging.log");
    let answered = |id: &str| {
        json_lines(&std::fs::read_to_string(&path).unwrap())
            .into_iter()
            .any(|l| l["span"]["request_id"] == id && l["message"] == "answered")
    };
    wait_until("both requests logged", Duration::from_secs(10), || {
        answered("ops-req-42") && answered(&made)
    });
    let log = std::fs::read_to_string(&path).unwrap();
    let lines = json_lines(&log);
    let line = lines
        .iter()
        .find(|l| l["span"]["request_id"] == "ops-req-42")
        .unwrap();
    assert_eq!(line["span"]["method"], "POST", "{line}");
    assert_eq!(line["span"]["path"], "/v1/cards", "{line}");
    assert_eq!(line["status"], 201, "{line}");
    assert!(!log.contains(&hex::encode_upper(uid)), "{log}");
}
