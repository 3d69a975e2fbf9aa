//! A NATS cluster as the broker (issue 17): three `nats-server` nodes on loopback, each with
//! JetStream and an MQTT listener, the users and per-device permissions written by the shipped
//! `deploy/nats/tapgate-nats-users.sh`; three `tapgate validator` daemons speaking MQTT 3.1.1,
//! each on a different node with the other two as fallbacks; two `tapgate gateway`s of one
//! operator taking the taps from JetStream as one durable consumer, each forwarding its share
//! to `tapgate charging`.
//!
//! Mid-stream the node validator 1002 is on is killed (SIGKILL) and, once the stream went on
//! without it, started again; gateway A is killed and restarted; then the node gateway B is on
//! (its NATS and MQTT connections) and validator 1003 are on is killed and stays down. Every validator must drain its outbox
//! (each tap confirmed by a gateway once durable in its store), the gateways together must
//! hold every tap, and for every card the charging server's shadow purse must equal the card's
//! own balance: no tap lost, none booked twice — whatever the cluster redelivered to the
//! other gateway after a node's death. Needs `nats-server` (`./test.sh` installs it).

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::{
    card_balance, keys_and_fare_table, metro_validator_toml, mqtt_toml, wait_cards_conserved, Kill,
};
use tapgate_testkit::nats::NatsCluster;
use tapgate_testkit::spawn_charging;
use tapgate_testkit::wait::wait_until;

const PASS: &str = "nats-cluster";
const START_MINOR: i64 = 50_000;
const CARDS: u32 = 400;
const TAPS: u32 = 400;
const GW_TOKEN: &str = "tg_gw_nats";
const OPS_TOKEN: &str = "tg_ops_nats";
const DEVICES: [u32; 3] = [1001, 1002, 1003];

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tapgate"));
    c.current_dir(dir)
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("TAPGATE_MQTT_PASSWORD", "gw-secret")
        .env("TAPGATE_GATEWAY_TOKEN", GW_TOKEN);
    for d in DEVICES {
        c.env(format!("V{d}_PASSWORD"), format!("v{d}-secret"));
    }
    c
}

fn sha(t: &str) -> String {
    charging::api::Auth::hash_token(t)
}

fn http(method: &str, url: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    tapgate_testkit::http::call(method, url, Some(OPS_TOKEN), None, body)
}

/// Node `first` of the cluster, then the others, as a comma-separated list of `scheme` URLs.
fn nodes_from(cluster: &NatsCluster, first: usize, nats: bool) -> Vec<String> {
    let n = cluster.nodes().len();
    (0..n)
        .map(|k| {
            let node = &cluster.nodes()[(first + k) % n];
            if nats {
                format!("nats://127.0.0.1:{}", node.client_port)
            } else {
                format!("mqtt://127.0.0.1:{}", node.mqtt_port)
            }
        })
        .collect()
}

/// Gateway `id` on node `node` (its NATS and MQTT connections there first), its API on
/// `api_port`.
fn start_gateway(
    dir: &Path,
    cluster: &NatsCluster,
    id: &str,
    node: usize,
    api_port: u16,
    charging: &str,
) -> Kill {
    std::fs::write(
        dir.join(format!("gw-{id}.toml")),
        format!(
            "http_listen = \"127.0.0.1:{api_port}\"\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            sha(OPS_TOKEN)
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("gw-{id}.log"))).unwrap();
    Kill(
        command(
            dir,
            &[
                "gateway",
                "--keys",
                "keys",
                "--data",
                &format!("gw-{id}"),
                "--gateway-id",
                id,
                "--broker",
                &nodes_from(cluster, node, false).join(","),
                "--nats",
                &nodes_from(cluster, node, true).join(","),
                "--charging",
                charging,
                "--operator",
                "metro",
                "--config",
                &format!("gw-{id}.toml"),
            ],
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tapgate gateway"),
    )
}

/// Validator `device` on node `node` (the others its fallbacks).
fn spawn_validator(dir: &Path, cluster: &NatsCluster, device: u32, node: usize) -> Child {
    let brokers = nodes_from(cluster, node, false);
    let fallback: Vec<String> = brokers[1..].iter().map(|b| format!("\"{b}\"")).collect();
    std::fs::write(
        dir.join(format!("v{device}.toml")),
        format!(
            r#"{}heartbeat_s = 1
drain_timeout_s = 60
{}fallback_brokers = [{}]
[crowd]
cards = {CARDS}
balance_minor = {START_MINOR}
taps = {TAPS}
rate_per_s = 8.0
seed = {device}
dir = "cards"
tear_per_mille = 0
"#,
            metro_validator_toml(device, "Central", "in", &format!("journal-{device}")),
            mqtt_toml(&brokers[0], &format!("V{device}_PASSWORD")),
            fallback.join(", ")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("v{device}.log"))).unwrap();
    command(
        dir,
        &[
            "validator",
            "--config",
            &format!("v{device}.toml"),
            "--json",
        ],
    )
    .env("RUST_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(log)
    .spawn()
    .unwrap()
}

/// Taps the two gateways hold of `device` (their sum; a tap both stored counts twice) and the
/// highest sequence either saw.
fn stored(apis: &[String], device: u32) -> (u64, u64) {
    let mut taps = 0;
    let mut highest = 0;
    for api in apis {
        let (code, v) = http("GET", &format!("{api}/v1/devices/{device}"), None);
        if code == 200 {
            taps += v["taps"].as_u64().unwrap_or(0);
            highest = highest.max(v["highest_seq"].as_u64().unwrap_or(0));
        }
    }
    (taps, highest)
}

#[test]
fn two_gateways_and_three_validators_lose_and_double_nothing_through_node_deaths() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");
    let devices: String = DEVICES
        .iter()
        .map(|d| format!("{d} v{d}-secret metro\n"))
        .collect();
    let mut cluster =
        NatsCluster::start(3, &devices, ("gateway", "gw-secret")).unwrap_or_else(|e| panic!("{e}"));

    std::fs::write(
        dir.join("charging.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"charging\"\noperator = \"metro\"\nledger_map_size_bytes = 67108864\n\n[[tokens]]\nname = \"gw\"\nrole = \"gateway\"\nsha256 = \"{}\"\n\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            sha(GW_TOKEN),
            sha(OPS_TOKEN),
        ),
    )
    .unwrap();
    let (_charging, base) = spawn_charging(
        command(
            dir,
            &["charging", "--config", "charging.toml", "--keys", "keys"],
        )
        .stderr(Stdio::null()),
    );
    let uids: Vec<[u8; 7]> = (0..CARDS).map(validator::reader::crowd_uid).collect();
    for uid in &uids {
        let (code, body) = http(
            "POST",
            &format!("{base}/v1/cards"),
            Some(
                serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": START_MINOR}),
            ),
        );
        assert_eq!(code, 201, "{body}");
    }

    // Gateway A on node 0, gateway B on node 2; validators 1001, 1002, 1003 on nodes 0, 1, 2.
    let apis: Vec<String> = (0..2)
        .map(|_| format!("http://127.0.0.1:{}", tapgate_testkit::free_port()))
        .collect();
    let port_of = |api: &str| api.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let mut gw_a = start_gateway(dir, &cluster, "a", 0, port_of(&apis[0]), &base);
    let _gw_b = start_gateway(dir, &cluster, "b", 2, port_of(&apis[1]), &base);
    for api in &apis {
        tapgate_testkit::wait_for_port(port_of(api), "the gateway's API");
    }
    let validators: Vec<Child> = DEVICES
        .iter()
        .enumerate()
        .map(|(i, &d)| spawn_validator(dir, &cluster, d, i))
        .collect();

    // Validator 1002's node dies mid-stream; the stream goes on; the node comes back. (A crowd
    // of TAPS at 8 a second lasts ≈ 50 s: each node's death falls in the middle.)
    let limit = Duration::from_secs(60);
    let more = |apis: &[String], device: u32, than: u64| {
        wait_until(
            &format!("validator {device}'s taps stored beyond sequence {than}"),
            limit,
            || stored(apis, device).1 >= than + 10,
        )
    };
    more(&apis, 1002, 20);
    cluster.kill(1);
    more(&apis, 1002, stored(&apis, 1002).1);
    cluster.restart(1).unwrap_or_else(|e| panic!("{e}"));

    // Gateway A dies (SIGKILL) mid-stream: what it took and had not acknowledged goes to
    // gateway B (or to A again once it is back) — some of it already stored by A.
    drop(gw_a);
    more(&apis[1..], 1001, stored(&apis[1..], 1001).1);
    gw_a = start_gateway(dir, &cluster, "a", 0, port_of(&apis[0]), &base);
    tapgate_testkit::wait_for_port(port_of(&apis[0]), "gateway A's API");

    // Then the node gateway B and validator 1003 are on dies, and stays down.
    more(&apis, 1003, stored(&apis, 1003).1);
    cluster.kill(2);
    more(&apis, 1003, stored(&apis, 1003).1);

    // Every validator drains its outbox: each of its taps confirmed once durable at a gateway.
    let mut made = std::collections::BTreeMap::new();
    for (d, v) in DEVICES.iter().zip(validators) {
        let out = v.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "validator {d}: {stdout}{}",
            std::fs::read_to_string(dir.join(format!("v{d}.log"))).unwrap_or_default()
        );
        let s: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(s["outbox_left"], 0, "validator {d} drained: {s}");
        assert_eq!(s["taps"], u64::from(TAPS), "validator {d}: {s}");
        // Every accepted or refused tap is a record with the next sequence number (a repeat
        // presentation is none).
        let refused: u64 = s["taps_refused"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        made.insert(*d, s["taps_accepted"].as_u64().unwrap() + refused);
    }
    for (d, n) in &made {
        let (taps, highest) = stored(&apis, *d);
        assert_eq!(highest, *n, "validator {d}'s last tap is stored");
        assert!(taps >= *n, "validator {d}: {taps} of {n} taps stored");
        eprintln!(
            "validator {d}: {n} taps, {} stored by both gateways",
            taps - n
        );
    }
    drop(gw_a);

    // Every card's shadow purse at the charging server equals the card's own balance.
    wait_cards_conserved(dir, &base, OPS_TOKEN, &uids, Duration::from_secs(60));
    let spent: i64 = uids
        .iter()
        .filter_map(|u| card_balance(dir, u).map(|b| START_MINOR - b))
        .sum();
    assert!(spent > 0, "riders paid fares");
}
