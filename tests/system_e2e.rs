//! The whole chain as operators run it, every part a real process on loopback: `tapgate
//! charging` (software HSM), `tapgate gateway` forwarding to it over HTTP, Mosquitto with the
//! shipped ACL, two `tapgate validator` daemons (a gate where riders tap in, one where they tap
//! out) sharing one crowd of emulated cards, and `tapgate charge` loading cards online.
//!
//! Faults on the way: the broker restarted while a validator is publishing; the gateway killed
//! (SIGKILL) and restarted while the other is — whose clock is a day ahead (libfaketime; the
//! gateway reports the skew); a forged blocklist snapshot (every card blocked, signed with the
//! wrong key) left retained for validators; every tap message replayed in reverse order; and a
//! forged tap. Then half the cards are reported lost through the API: the next validator run
//! refuses them once it holds the block and accepted none after. At the end, for every card, the charging server's shadow purse equals the card's
//! own balance (personalised + loads − the debits it really made): no tap lost, none counted
//! twice, the forgery booked nowhere. Needs `mosquitto`, `mosquitto_passwd` and `faketime`
//! (`./test.sh` installs them).

mod support;

use purse::rotation::SignedMessage;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use support::{
    card_balance, free_port, keys_and_fare_table, metro_validator_toml, mqtt_toml,
    wait_cards_conserved, Kill, METRO_GATEWAY,
};
use tapgate_testkit::mosquitto::{Mosquitto, MosquittoConfig};
use tapgate_testkit::spawn_charging;
use tapgate_testkit::wait::wait_until;

const PASS: &str = "system-e2e";
const START_MINOR: i64 = 20_000;
const CARDS: u32 = 200;
const GW_TOKEN: &str = "tg_gw_system";
const OPS_TOKEN: &str = "tg_ops_system";
const RIDER_TOKEN: &str = "tg_rider_system";

fn command(dir: &Path, args: &[&str]) -> Command {
    command_at(dir, args, None)
}

/// `tapgate` with its clock shifted by `clock_offset` (libfaketime's `faketime -f`, e.g. "+1d":
/// the wall clock only, so timers and timeouts run normally).
fn command_at(dir: &Path, args: &[&str], clock_offset: Option<&str>) -> Command {
    let mut c = match clock_offset {
        None => Command::new(env!("CARGO_BIN_EXE_tapgate")),
        Some(off) => {
            assert!(
                Command::new("faketime").arg("--version").output().is_ok(),
                "faketime is not installed: apt-get install faketime (./test.sh does)"
            );
            let mut c = Command::new("faketime");
            c.args(["-f", off, env!("CARGO_BIN_EXE_tapgate")])
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
            c
        }
    };
    c.current_dir(dir)
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("TAPGATE_MQTT_PASSWORD", "gw-secret")
        .env("TAPGATE_GATEWAY_TOKEN", GW_TOKEN)
        .env("TAPGATE_TOKEN", RIDER_TOKEN)
        .env("V1001_PASSWORD", "v1001-secret")
        .env("V1002_PASSWORD", "v1002-secret");
    c
}

fn tapgate(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("run tapgate")
}

/// Mosquitto with passwords and the shipped ACL on `port` (a restart in the same `dir`
/// rewrites the same files).
fn start_mosquitto(dir: &Path, port: u16) -> Mosquitto {
    MosquittoConfig::on_port(port)
        .user("gateway", "gw-secret")
        .user("1001", "v1001-secret")
        .user("1002", "v1002-secret")
        .shipped_acl()
        .start(dir)
}

/// Whether a validator wrote a card image (made a tap) after `t`.
fn tapped_since(dir: &Path, t: SystemTime) -> bool {
    std::fs::read_dir(dir.join("cards"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .any(|m| m > t)
}

/// The tap records of `device` among the captured messages (their device MACs verified).
fn captured_taps(
    captured: &Captured,
    keys: &purse::keys::KeySet,
    device: u32,
) -> Vec<purse::tap::TapRecord> {
    captured
        .lock()
        .unwrap()
        .iter()
        .flat_map(|(_, m)| {
            m.chunks(purse::tap::TAP_LEN)
                .map(|c| c.to_vec())
                .collect::<Vec<_>>()
        })
        .filter_map(|w| {
            purse::tap::TapRecord::decode_verified(&w, "metro", |d| keys.device_key(d).ok()).ok()
        })
        .filter(|t| t.meta().device_id == device)
        .collect()
}

/// The issuer key set the test made (`keys/issuer.keys`).
fn issuer_keys(dir: &Path) -> purse::keys::KeySet {
    purse::keys::KeySet::unseal(
        &std::fs::read(dir.join("keys/issuer.keys")).unwrap(),
        PASS.as_bytes(),
    )
    .unwrap()
}

/// `tapgate charging`; returns the guard and its base URL.
fn start_charging(dir: &Path) -> (Kill, String) {
    spawn_charging(
        command(
            dir,
            &["charging", "--config", "charging.toml", "--keys", "keys"],
        )
        .stderr(Stdio::null()),
    )
}

fn start_gateway(dir: &Path, broker_port: u16, charging: &str) -> Kill {
    Kill(
        command(
            dir,
            &[
                &METRO_GATEWAY[..],
                &[
                    "--broker",
                    &format!("mqtt://127.0.0.1:{broker_port}"),
                    "--charging",
                    charging,
                    "--config",
                    "gw-api.toml",
                ],
            ]
            .concat(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tapgate gateway"),
    )
}

fn sha(t: &str) -> String {
    charging::api::Auth::hash_token(t)
}

fn http(
    method: &str,
    url: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    tapgate_testkit::http::call(method, url, Some(token), None, body)
}

fn validator_toml(dir: &Path, device: u32, stop: &str, kind: &str, port: u16) {
    std::fs::write(
        dir.join(format!("v{device}.toml")),
        format!(
            r#"{}heartbeat_s = 1
drain_timeout_s = 40
{}[crowd]
cards = {CARDS}
balance_minor = {START_MINOR}
dir = "cards"
tear_per_mille = 0
"#,
            metro_validator_toml(device, stop, kind, &format!("journal-{device}")),
            mqtt_toml(
                &format!("mqtt://127.0.0.1:{port}"),
                &format!("V{device}_PASSWORD")
            ),
        ),
    )
    .unwrap();
}

/// Runs a validator to the end of its crowd; returns its JSON summary.
fn finish(child: Child) -> serde_json::Value {
    finish_with_log(child).0
}

/// Runs a validator to the end of its crowd; returns its JSON summary and its log.
fn finish_with_log(child: Child) -> (serde_json::Value, String) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spawn_validator(
    dir: &Path,
    device: u32,
    taps: u32,
    seed: u32,
    clock_offset: Option<&str>,
) -> Child {
    command_at(
        dir,
        &[
            "validator",
            "--config",
            &format!("v{device}.toml"),
            "--crowd-taps",
            &taps.to_string(),
            "--crowd-seed",
            &seed.to_string(),
            "--json",
        ],
        clock_offset,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// Waits (20 s at most) until the retained blocklist snapshot verifies under the back office's
/// key and is at `version` or later.
fn wait_for_snapshot(port: u16, pk: &[u8; 32], version: u64) {
    let t0 = Instant::now();
    for attempt in 0.. {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no genuine snapshot at version {version}"
        );
        let mut opts = MqttOptions::new(format!("snapshot-probe-{attempt}"), "127.0.0.1", port);
        opts.set_credentials("gateway", "gw-secret");
        let (client, mut conn) = Client::new(opts, 10);
        let mut held = 0;
        for ev in conn
            .recv_timeout(Duration::from_secs(2))
            .into_iter()
            .chain(std::iter::from_fn(|| {
                conn.recv_timeout(Duration::from_millis(500)).ok()
            }))
        {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client
                        .try_subscribe("tapgate/v1/metro/blocklist/snapshot", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(u) = purse::blocklist::ListUpdate::verify(&p.payload, pk) {
                        held = u.to_version;
                    }
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = client.disconnect();
        if held >= version {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

type Captured = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Every tap message the broker delivers, as the gateway sees them (same user, own client
/// id), until `stop` is set.
fn capture(port: u16, stop: Arc<AtomicBool>) -> (Captured, std::thread::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut opts = MqttOptions::new("capture", "127.0.0.1", port);
    opts.set_credentials("gateway", "gw-secret");
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(opts, 100);
    let store = seen.clone();
    let handle = std::thread::spawn(move || {
        for ev in conn.iter() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe("tapgate/v1/metro/taps/+", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    store
                        .lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    (seen, handle)
}

/// Publishes `messages` as `device` (its own credentials, its own topic only).
fn publish_as(port: u16, device: &str, password: &str, messages: &[Vec<u8>]) {
    let mut opts = MqttOptions::new(format!("replay-{device}"), "127.0.0.1", port);
    opts.set_credentials(device, password);
    let (client, mut conn) = Client::new(opts, 1_000);
    let topic = format!("tapgate/v1/metro/taps/{device}");
    for m in messages {
        client
            .publish(&topic, QoS::AtLeastOnce, false, m.clone())
            .unwrap();
    }
    let mut acked = 0;
    let t0 = Instant::now();
    for ev in conn.iter() {
        if let Ok(Event::Incoming(Packet::PubAck(_))) = ev {
            acked += 1;
            if acked == messages.len() {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "replay not acknowledged"
        );
    }
}

#[test]
fn the_whole_chain_loses_nothing_through_restarts_replays_and_forgeries() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");

    let port = free_port();
    let mut broker = start_mosquitto(dir, port);
    std::fs::write(
        dir.join("charging.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"charging\"\noperator = \"metro\"\nledger_map_size_bytes = 67108864\n\n[limits]\nloads_per_minute_per_client = 0\n\n[[tokens]]\nname = \"gw\"\nrole = \"gateway\"\nsha256 = \"{}\"\n\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n\n[[tokens]]\nname = \"rider\"\nrole = \"cardholder\"\nsha256 = \"{}\"\n",
            sha(GW_TOKEN),
            sha(OPS_TOKEN),
            sha(RIDER_TOKEN)
        ),
    )
    .unwrap();
    let (_charging, base) = start_charging(dir);
    let uids: Vec<[u8; 7]> = (0..CARDS).map(validator::reader::crowd_uid).collect();
    for uid in &uids {
        let (code, body) = http(
            "POST",
            &format!("{base}/v1/cards"),
            OPS_TOKEN,
            Some(
                serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": START_MINOR}),
            ),
        );
        assert_eq!(code, 201, "{body}");
    }
    let api_port = free_port();
    std::fs::write(
        dir.join("gw-api.toml"),
        format!(
            "http_listen = \"127.0.0.1:{api_port}\"\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            sha(OPS_TOKEN)
        ),
    )
    .unwrap();
    let gw_api = format!("http://127.0.0.1:{api_port}");
    let mut gateway = start_gateway(dir, port, &base);
    let stop_capture = Arc::new(AtomicBool::new(false));
    let (captured, capture_thread) = capture(port, stop_capture.clone());
    validator_toml(dir, 1001, "Central", "in", port);
    validator_toml(dir, 1002, "Harbor", "out", port);

    // Riders tap in at Central; the broker goes down for a second mid-run and comes back.
    let v1 = spawn_validator(dir, 1001, 120, 1, None);
    wait_until(
        "validator 1001's first taps at the broker",
        Duration::from_secs(20),
        || {
            captured
                .lock()
                .unwrap()
                .iter()
                .any(|(t, _)| t.ends_with("/1001"))
        },
    );
    let down_at = SystemTime::now();
    drop(broker);
    // The broker stays down until the gate has made taps it cannot send (journalled, sent
    // when the broker is back).
    wait_until(
        "a tap at Central while the broker is down",
        Duration::from_secs(20),
        || tapped_since(dir, down_at),
    );
    broker = start_mosquitto(dir, port);
    let s1 = finish(v1);
    assert_eq!(
        s1["outbox_left"], 0,
        "every tap confirmed after the restart: {s1}"
    );
    assert!(s1["taps_accepted"].as_u64().unwrap() >= 60, "{s1}");

    // Two riders load their cards online from their PCs.
    let mut loaded = std::collections::HashMap::new();
    for (i, uid) in uids.iter().take(2).enumerate() {
        let image = format!("cards/{}.json", hex::encode(uid));
        if !dir.join(&image).exists() {
            continue; // this card has not been presented yet
        }
        let o = tapgate(
            dir,
            &[
                "charge",
                "--server",
                &base,
                "--amount",
                "2000",
                "--funding",
                "card:tok_visa",
                "--card",
                &image,
                "--keys",
                "keys",
                "--idempotency-key",
                &format!("load-{i}"),
            ],
        );
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        loaded.insert(*uid, 2_000i64);
    }

    // Torn loads: a card pulled at each of the commit's NVM writes in turn (one card each),
    // then loaded again; the server settles the torn load from the card's own record at that
    // next load — completed if the card committed it, voided (and the payment released) if
    // not. Each card gained exactly what its tear point implies, and nothing stays pending.
    let mut torn_seen = 0;
    let presented: Vec<[u8; 7]> = uids
        .iter()
        .filter(|u| card_balance(dir, u).is_some() && !loaded.contains_key(*u))
        .copied()
        .collect();
    for (k, uid) in (1..=purse::card::COMMIT_WRITES).zip(presented.iter()) {
        let image = format!("cards/{}.json", hex::encode(uid));
        let before = card_balance(dir, uid).unwrap();
        let load = |key: &str, tear: Option<u32>| {
            let mut args = vec![
                "charge".to_string(),
                "--server".into(),
                base.clone(),
                "--amount".into(),
                "2000".into(),
                "--funding".into(),
                "card:tok_visa".into(),
                "--card".into(),
                image.clone(),
                "--keys".into(),
                "keys".into(),
                "--idempotency-key".into(),
                key.into(),
            ];
            if let Some(k) = tear {
                args.push("--tear-after-writes".into());
                args.push(k.to_string());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tapgate(dir, &args)
        };
        let torn = load(&format!("torn-{k}"), Some(k));
        let said = String::from_utf8_lossy(&torn.stdout).to_string()
            + &String::from_utf8_lossy(&torn.stderr);
        assert!(
            !said.contains("load completed"),
            "a load torn after {k} writes cannot have been confirmed: {said}"
        );
        torn_seen += 1;
        let again = load(&format!("after-torn-{k}"), None);
        let said = String::from_utf8_lossy(&again.stdout).to_string()
            + &String::from_utf8_lossy(&again.stderr);
        assert!(
            again.status.success() && said.contains("load completed"),
            "the next load after a tear at write {k}: {said}"
        );
        let (code, v) = http(
            "GET",
            &format!("{base}/v1/cards/{}", hex::encode_upper(uid)),
            OPS_TOKEN,
            None,
        );
        assert_eq!(code, 200, "{v}");
        assert_eq!(
            v["pending_loads"], 0,
            "the torn load was settled at the next load: {v}"
        );
        // The commit's first write is its journal, the second the commit flag: torn after the
        // first, the card rolls the load back (voided); from the second on, it rolls it
        // forward (completed).
        let gained = card_balance(dir, uid).unwrap() - before;
        let expected = if k == 1 { 2_000 } else { 4_000 };
        assert_eq!(
            gained, expected,
            "tear at write {k}: the card gained {gained}"
        );
        *loaded.entry(*uid).or_insert(0) += gained;
    }
    assert_eq!(
        torn_seen,
        purse::card::COMMIT_WRITES,
        "a torn load at every write of the commit"
    );

    // A forged blocklist: every card blocked, version 1000, signed with a key that is not the
    // back office's, left retained where validators take their snapshot (as a compromised
    // gateway account could). Validators must refuse it and keep accepting riders.
    {
        use ed25519_dalek::Signer;
        let forger = ed25519_dalek::SigningKey::from_bytes(&[0x5A; 32]);
        let forged = purse::blocklist::ListUpdate {
            kind: purse::blocklist::ListKind::Snapshot,
            operator: "metro".into(),
            from_version: 0,
            to_version: 1_000,
            entries: uids.iter().map(|u| (*u, true)).collect(),
        }
        .sign_with(|b| forger.sign(b).to_bytes());
        let mut opts = MqttOptions::new("forger", "127.0.0.1", port);
        opts.set_credentials("gateway", "gw-secret");
        let (client, mut conn) = Client::new(opts, 10);
        client
            .publish(
                "tapgate/v1/metro/blocklist/snapshot",
                QoS::AtLeastOnce,
                true,
                forged,
            )
            .unwrap();
        for ev in conn.iter() {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = ev {
                break;
            }
        }
    }

    // Riders tap out at Harbor; the gateway is killed mid-run and restarted.
    // This gate's clock is a day ahead.
    // The gateway is killed once it has stored some of this gate's taps (so the kill lands
    // mid-run) and shows the gate a day ahead from its heartbeats (it also logs a warning).
    let v2 = spawn_validator(dir, 1002, 400, 2, Some("+1d"));
    let t0 = Instant::now();
    let dev = loop {
        let (code, dev) = http("GET", &format!("{gw_api}/v1/devices/1002"), OPS_TOKEN, None);
        if code == 200
            && dev["taps"].as_u64().unwrap_or(0) >= 20
            && dev.get("clock_skew_ms").is_some_and(|v| !v.is_null())
        {
            break dev;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the gateway saw neither taps nor the clock of device 1002: {code} {dev}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let skew = dev["clock_skew_ms"].as_i64().unwrap_or(0);
    assert!(
        (skew - 86_400_000).abs() < 120_000,
        "device 1002's clock shows a day ahead: {dev}"
    );
    let published_before = captured.lock().unwrap().len();
    drop(gateway);
    // The gateway stays down until the gate has published taps nobody takes in the meantime
    // (the broker keeps them in the gateway's persistent session).
    wait_until(
        "taps of Harbor published while the gateway is down",
        Duration::from_secs(20),
        || captured.lock().unwrap().len() > published_before,
    );
    gateway = start_gateway(dir, port, &base);
    let (s2, log2) = finish_with_log(v2);
    assert_eq!(
        s2["outbox_left"], 0,
        "every tap confirmed across the gateway restart: {s2}"
    );
    assert!(
        s2["taps_refused"].get("blocklisted").is_none() && s2["taps_accepted"].as_u64() > Some(50),
        "the forged blocklist was refused: {s2}"
    );
    assert!(
        log2.contains("blocklist signature does not verify"),
        "the validator saw the forgery and said why: {log2}"
    );
    // Every tap message again, newest first, from each device; and a forged one. First the
    // capture has each device's last tap (the highest sequence number the gateway stored).
    let keys = issuer_keys(dir);
    for device in [1001u32, 1002] {
        let (code, dev) = http(
            "GET",
            &format!("{gw_api}/v1/devices/{device}"),
            OPS_TOKEN,
            None,
        );
        assert_eq!(code, 200, "{dev}");
        let last = dev["highest_seq"].as_u64().unwrap();
        wait_until(
            &format!("the capture to see device {device}'s last tap ({last})"),
            Duration::from_secs(20),
            || {
                captured_taps(&captured, &keys, device)
                    .iter()
                    .any(|t| t.meta().device_seq == last)
            },
        );
    }
    let messages = captured.lock().unwrap().clone();
    assert!(!messages.is_empty(), "the capture saw the taps");
    for (device, pass) in [("1001", "v1001-secret"), ("1002", "v1002-secret")] {
        let mut own: Vec<Vec<u8>> = messages
            .iter()
            .filter(|(t, _)| t.ends_with(&format!("/{device}")))
            .map(|(_, m)| m.clone())
            .collect();
        own.reverse();
        if device == "1001" {
            let mut forged = own[0][..purse::tap::TAP_LEN].to_vec();
            forged[40] ^= 0x01; // an altered amount or balance: the device MAC no longer holds
            own.push(forged);
        }
        publish_as(port, device, pass, &own);
    }
    // The gateway has taken them all: every replayed tap counted as a duplicate, the forgery
    // quarantined with its reason.
    let replayed: u64 = messages
        .iter()
        .map(|(_, m)| (m.len() / purse::tap::TAP_LEN) as u64)
        .sum();
    let t0 = Instant::now();
    loop {
        let metrics = ureq::get(&format!("{gw_api}/metrics"))
            .set("Authorization", &format!("Bearer {OPS_TOKEN}"))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default();
        let counter = |name: &str| -> u64 {
            metrics
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let (dups, quarantined) = (
            counter("tapgate_gateway_taps_duplicate_total"),
            counter("tapgate_gateway_taps_quarantined_total"),
        );
        if dups >= replayed && quarantined >= 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "gateway took {dups} of {replayed} replays as duplicates, quarantined {quarantined}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, q) = http("GET", &format!("{gw_api}/v1/quarantine"), OPS_TOKEN, None);
    assert_eq!(code, 200, "{q}");
    assert!(
        q["quarantined"].to_string().to_lowercase().contains("mac"),
        "the forgery is quarantined for its MAC: {q}"
    );

    // Half the riders report their cards lost; then riders tap in at Central again (40 a
    // second). Every tap a validator accepted from a blocked card was made before it held the
    // block (the version it held is in each signed tap record), blocked cards are refused once
    // it does, and the gateway measures how long the block took to reach it.
    let blocked: Vec<[u8; 7]> = uids.iter().step_by(2).copied().collect();
    let mut version = 0;
    for uid in &blocked {
        let (code, v) = http(
            "POST",
            &format!("{base}/v1/cards/{}/block", hex::encode_upper(uid)),
            OPS_TOKEN,
            Some(serde_json::json!({"reason": "lost"})),
        );
        assert_eq!(code, 200, "{v}");
        version = v["blocklist_version"].as_u64().unwrap_or(version);
    }
    assert!(version > 0);
    let blocked_at = Instant::now();
    // The gateway relays the change and refreshes the retained snapshot a validator takes at
    // connect (it replaces the forged one): wait for it.
    let pk: [u8; 32] = hex::decode(
        std::fs::read_to_string(dir.join("keys/signing.pub"))
            .unwrap()
            .trim(),
    )
    .unwrap()
    .try_into()
    .unwrap();
    wait_for_snapshot(port, &pk, version);
    std::fs::write(
        dir.join("v1001.toml"),
        std::fs::read_to_string(dir.join("v1001.toml"))
            .unwrap()
            .replace(
                "tear_per_mille = 0",
                "tear_per_mille = 0\nrate_per_s = 40.0",
            ),
    )
    .unwrap();
    let seen_before = captured.lock().unwrap().len();
    let (s3, log3) = finish_with_log(spawn_validator(dir, 1001, 120, 3, None));
    assert_eq!(s3["outbox_left"], 0, "{s3}");
    let refused_blocked = s3["taps_refused"]["blocklisted"].as_u64().unwrap_or(0);
    assert!(
        refused_blocked > 0,
        "blocked cards were refused: {s3}\n{log3}"
    );
    let t0 = Instant::now();
    let run3 = loop {
        let all = captured.lock().unwrap().clone();
        let run3: Vec<purse::tap::TapRecord> = all[seen_before..]
            .iter()
            .flat_map(|(_, m)| {
                m.chunks(purse::tap::TAP_LEN)
                    .map(|c| c.to_vec())
                    .collect::<Vec<_>>()
            })
            .filter_map(|w| {
                purse::tap::TapRecord::decode_verified(&w, "metro", |d| keys.device_key(d).ok())
                    .ok()
            })
            .filter(|t| t.meta().device_id == 1001)
            .collect();
        let accepted = run3.iter().filter(|t| t.refusal().is_none()).count() as u64;
        if accepted >= s3["taps_accepted"].as_u64().unwrap() {
            break run3;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "capture incomplete");
        std::thread::sleep(Duration::from_millis(100));
    };
    for t in &run3 {
        if t.refusal().is_none() && blocked.contains(&t.uid()) {
            assert!(
                t.meta().blocklist_version < version,
                "a blocked card was accepted while the validator held version {} (block at {version})",
                t.meta().blocklist_version
            );
        }
    }
    // How long after the validator came up (its first tap) it held the block.
    let first = run3
        .iter()
        .map(|t| t.meta().device_time_ms)
        .min()
        .unwrap_or(0);
    let holding = run3
        .iter()
        .filter(|t| t.meta().blocklist_version >= version)
        .map(|t| t.meta().device_time_ms)
        .min();
    let Some(holding) = holding else {
        panic!("no tap of the run was made holding the block")
    };
    eprintln!(
        "{} cards blocked; validator 1001 held the block {} ms after its first tap (its run ended {} ms after the API calls)",
        blocked.len(),
        holding.saturating_sub(first),
        blocked_at.elapsed().as_millis()
    );

    // Every card's shadow purse at the charging server equals the card's own balance.
    wait_cards_conserved(dir, &base, OPS_TOKEN, &uids, Duration::from_secs(40));
    // Value moved: the cards lost exactly their debits, and the loads arrived.
    let spent: i64 = uids
        .iter()
        .filter_map(|u| {
            card_balance(dir, u).map(|b| START_MINOR + loaded.get(u).copied().unwrap_or(0) - b)
        })
        .sum();
    assert!(spent > 0, "riders paid fares");

    stop_capture.store(true, Ordering::Relaxed);
    drop(gateway);
    drop(broker);
    let _ = capture_thread.join();
}
