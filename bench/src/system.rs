//! Bench scenario `system`: a load generator driving the running system. The real `tapgate
//! charging` (software HSM, LMDB ledger) and `tapgate gateway` (embedded broker, forwarding to
//! clearing) run as processes on loopback, exactly as an operator starts them; this process
//! plays the field: validators (one MQTT connection each, a password per device) publishing
//! real signed taps (debits on emulated cards by each validator's SAM), riders' phones relaying
//! online loads over HTTP, and an operator blocking a card through the API.
//!
//! Phases, each measured on its own:
//! 1. paced taps at a steady rate (a busy network's peak): latency from a validator's publish to
//!    the gateway's confirmation (the tap durable in the gateway's LMDB);
//! 2. the remaining taps as fast as the validators can publish: end-to-end taps/s (published →
//!    confirmed) and until the charging server has cleared every tap; CPU per tap of each
//!    daemon from /proc;
//! 3. online loads from 8 client threads: loads/s and latency;
//! 4. a card blocked through the charging API: the time until every validator holds the
//!    signed delta relayed by the gateway.
//!
//! At the end every tapped card's shadow purse at the charging server must equal the card's own
//! balance, and every counter it consumed must be booked (`lost` counts the ones that are not).
//!
//! Needs the `tapgate` binary built next to this one (`cargo build --release` builds both).

use crate::Figures;
use charging::reconcile::{card_conserved, CardTruth, ShadowView};
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::SeedableRng;
use rumqttc::QoS;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tapgate_sim::fleet::{Device, Fleet, FleetOptions};

const PASSPHRASE: &str = "bench-system";
const GW_TOKEN: &str = "tg_bench_gateway";
const OPS_TOKEN: &str = "tg_bench_operator";
const GW_MQTT_PASSWORD: &str = "bench-gw-mqtt";
const VALIDATORS: usize = 8;
const CARDS: usize = 1_000;
const FARE_MINOR: i32 = 125;
const START_MINOR: i32 = 100_000;
/// Phase 1: taps per second, and how many.
const PACED_RATE: u64 = 2_000;
const PACED_TAPS: u64 = 4_000;
const LOADS: u64 = 1_000;
const LOAD_CLIENTS: usize = 8;

/// Kills (and reaps) a daemon when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// The last lines of its log, for an error message.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tapgate_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("tapgate");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build the tapgate binary next to bench first (cargo build --release)",
        bin.display()
    );
    Ok(bin)
}

fn tapgate(bin: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.current_dir(dir)
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASSPHRASE)
        .env("TAPGATE_MQTT_PASSWORD", GW_MQTT_PASSWORD)
        .env("TAPGATE_GATEWAY_TOKEN", GW_TOKEN)
        .env("RUST_LOG", "warn");
    c
}

fn http(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, String)> {
    let req = agent
        .request(method, url)
        .set("Authorization", &format!("Bearer {token}"));
    let res = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match res {
        Ok(r) => Ok((r.status(), r.into_string()?)),
        Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string().unwrap_or_default())),
        Err(e) => Err(anyhow::anyhow!("{method} {url}: {e}")),
    }
}

/// Registers a card with the back office (as personalised with `minor`).
fn register(agent: &ureq::Agent, base: &str, uid: &[u8; 7], minor: i32) -> anyhow::Result<()> {
    let (code, body) = http(
        agent,
        "POST",
        &format!("{base}/v1/cards"),
        OPS_TOKEN,
        Some(serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": minor})),
    )?;
    anyhow::ensure!(code == 201, "registering a card: {code} {body}");
    Ok(())
}

/// A counter from the gateway's Prometheus text.
fn gateway_metric(agent: &ureq::Agent, api: &str, name: &str) -> anyhow::Result<u64> {
    let (code, text) = http(agent, "GET", &format!("{api}/metrics"), OPS_TOKEN, None)?;
    anyhow::ensure!(code == 200, "gateway /metrics: {code} {text}");
    tapgate_testkit::metrics::sample(&text, name)
        .map(|v| v as u64)
        .ok_or_else(|| anyhow::anyhow!("gateway /metrics has no {name}"))
}

fn uid_of(i: usize) -> [u8; 7] {
    let mut uid = [0x04, 0x5b, 0, 0, 0, 0, 0x80];
    uid[2..6].copy_from_slice(&(i as u32).to_be_bytes());
    uid
}

fn ms(d_us: u64) -> f64 {
    (d_us as f64 / 100.0).round() / 10.0
}

pub fn run(n: Option<u64>) -> anyhow::Result<Figures> {
    let total = n.unwrap_or(40_000).max(PACED_TAPS + VALIDATORS as u64);
    let per = total.div_ceil(VALIDATORS as u64) as usize;
    let total = (per * VALIDATORS) as u64;
    let bin = tapgate_binary()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();

    // Set-up: keys, the charging server, the cards registered with it, the gateway, the taps.
    let keys = init_keys(&bin, dir)?;
    let hsm = SoftwareHsm::new(&keys)?;
    let (charging, base) = start_charging(&bin, dir)?;
    let mut cards = register_cards(&agent, &base, &hsm)?;
    let gateway = start_gateway(&bin, dir, &agent, &base)?;
    let records = signed_taps(&keys, &mut cards, per)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let fleet = connect_fleet(&rt, &gateway, &keys)?;

    // Drive and measure, phase by phase.
    let taps = drive_taps(&rt, &fleet, &records, total, &agent, &gateway, &charging)?;
    let loads = online_loads(&agent, &base, &hsm)?;
    let held = block_propagation(&agent, &base, &fleet, &gateway)?;
    let (out_of_balance, lost) = conservation(&agent, &base, &cards)?;
    fleet.disconnect();
    Ok(report(total, &taps, &loads, &held, lost, out_of_balance))
}

/// `tapgate keys init`, as an operator makes them; this process reads them to play the
/// validators' SAMs.
fn init_keys(bin: &Path, dir: &Path) -> anyhow::Result<KeySet> {
    let out = tapgate(bin, dir, &["keys", "init", "--out", "keys"]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "tapgate keys init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(KeySet::unseal(
        &std::fs::read(dir.join("keys").join("issuer.keys"))?,
        PASSPHRASE.as_bytes(),
    )?)
}

/// `tapgate charging` (software HSM, no rate limit) with its log in `charging.log`: the
/// daemon and its base URL.
fn start_charging(bin: &Path, dir: &Path) -> anyhow::Result<(Daemon, String)> {
    let sha = charging::api::Auth::hash_token;
    std::fs::write(
        dir.join("charging.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"charging\"\noperator = \"metro\"\nledger_map_size_bytes = 4294967296\n\n[limits]\nloads_per_minute_per_client = 0\n\n[[tokens]]\nname = \"gw\"\nrole = \"gateway\"\nsha256 = \"{}\"\n\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n\n[[tokens]]\nname = \"riders\"\nrole = \"cardholder\"\nsha256 = \"{}\"\n",
            sha(GW_TOKEN),
            sha(OPS_TOKEN),
            sha(crate::loads::TOKEN)
        ),
    )?;
    let charging_log = dir.join("charging.log");
    let mut child = tapgate(
        bin,
        dir,
        &["charging", "--config", "charging.toml", "--keys", "keys"],
    )
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&charging_log)?)
    .spawn()?;
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first)?;
    let charging = Daemon {
        child,
        log: charging_log,
    };
    let base = first
        .trim()
        .strip_prefix("charging listening on ")
        .ok_or_else(|| {
            anyhow::anyhow!(
                "tapgate charging did not start ({first:?}):\n{}",
                charging.tail()
            )
        })?
        .to_string();
    Ok((charging, base))
}

/// The tapped cards, registered with the back office.
fn register_cards(agent: &ureq::Agent, base: &str, hsm: &SoftwareHsm) -> anyhow::Result<Vec<Card>> {
    let mut cards: Vec<Card> = Vec::with_capacity(CARDS);
    for i in 0..CARDS {
        let uid = uid_of(i);
        let mut p = Personalisation::transit(uid, START_MINOR);
        p.upper_limit_minor = p.upper_limit_minor.max(START_MINOR * 2);
        register(agent, base, &uid, START_MINOR)?;
        cards.push(Card::personalise(&p, hsm.card_keys(&uid, 1)?));
    }
    Ok(cards)
}

/// The gateway daemon and how to reach it.
struct Gateway {
    daemon: Daemon,
    /// `http://127.0.0.1:<port>` of its API.
    api: String,
    /// Its embedded broker's port.
    mqtt_port: u16,
    /// Validator `1000 + v`'s MQTT password at index `v`.
    passwords: Vec<String>,
}

/// `tapgate gateway` with its embedded broker, a password per validator, forwarding to
/// `base`; returned once its broker listens and it has subscribed.
fn start_gateway(
    bin: &Path,
    dir: &Path,
    agent: &ureq::Agent,
    base: &str,
) -> anyhow::Result<Gateway> {
    let mqtt_port = tapgate_testkit::free_port();
    let api_port = tapgate_testkit::free_port();
    let passwords: Vec<String> = (0..VALIDATORS).map(|v| format!("bench-v{v}")).collect();
    std::fs::write(
        dir.join("mqtt-users"),
        passwords
            .iter()
            .enumerate()
            .map(|(v, p)| format!("{} {p}\n", 1000 + v))
            .collect::<String>(),
    )?;
    std::fs::write(
        dir.join("gw-api.toml"),
        format!(
            "http_listen = \"127.0.0.1:{api_port}\"\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            charging::api::Auth::hash_token(OPS_TOKEN)
        ),
    )?;
    let gateway_log = dir.join("gateway.log");
    let embedded = format!("127.0.0.1:{mqtt_port}");
    let args = [
        "gateway",
        "--keys",
        "keys",
        "--data",
        "gw",
        "--embedded-listen",
        &embedded,
        "--mqtt-users",
        "mqtt-users",
        "--charging",
        base,
        "--operator",
        "metro",
        "--config",
        "gw-api.toml",
    ];
    let daemon = Daemon {
        child: tapgate(bin, dir, &args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&gateway_log)?)
            .spawn()?,
        log: gateway_log,
    };
    let api = format!("http://127.0.0.1:{api_port}");
    let waited = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_err()
        || gateway_metric(agent, &api, "tapgate_gateway_mqtt_subscribed").unwrap_or(0) != 1
    {
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(20),
            "tapgate gateway did not start:\n{}",
            daemon.tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Gateway {
        daemon,
        api,
        mqtt_port,
        passwords,
    })
}

/// The validators' taps: real debits on the cards (card i at validator i mod 8), each
/// signed by its validator's SAM; `per` a validator, one tap per message as a validator
/// publishes live.
fn signed_taps(keys: &KeySet, cards: &mut [Card], per: usize) -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut records: Vec<Vec<Vec<u8>>> = (0..VALIDATORS).map(|_| Vec::with_capacity(per)).collect();
    for (v, recs) in records.iter_mut().enumerate() {
        let mut sam = SoftwareSam::validator(keys, 1000 + v as u32)?;
        let mine: Vec<usize> = (v..CARDS).step_by(VALIDATORS).collect();
        let mut card_rng = rand::rngs::StdRng::seed_from_u64(v as u64);
        for seq in 1..=per as u64 {
            let card = &mut cards[mine[(seq as usize - 1) % mine.len()]];
            let mut reader = EmulatedReader {
                card,
                rng: &mut card_rng,
            };
            let Outcome::Committed { receipt, .. } =
                txn::debit(&mut reader, &mut sam, &mut rng, |_| Decision::Apply {
                    amount_minor: FARE_MINOR,
                    record: None,
                })?
            else {
                anyhow::bail!("a bench debit was refused")
            };
            card.remove_from_field();
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            let wire = tapgate_sim::taps::signed_accepted(
                &sam,
                &receipt,
                "metro",
                1000 + v as u32,
                seq,
                now_ms,
            );
            recs.push(wire.to_vec());
        }
    }
    Ok(records)
}

/// The validators' MQTT clients, as the validator daemon connects (TCP_NODELAY).
fn connect_fleet(
    rt: &tokio::runtime::Runtime,
    gateway: &Gateway,
    keys: &KeySet,
) -> anyhow::Result<Fleet> {
    let devices = gateway
        .passwords
        .iter()
        .enumerate()
        .map(|(v, password)| Device {
            id: 1000 + v as u32,
            password: password.clone(),
            operator: "metro".into(),
        })
        .collect();
    Ok(Fleet::connect(
        rt.handle().clone(),
        &FleetOptions {
            host: "127.0.0.1".into(),
            port: gateway.mqtt_port,
            card_scheme: "metro".into(),
            verifying_key: keys.verifying_key,
            persistent_session: false,
            queue_capacity: 20_000,
            inflight: Some(1_000),
            max_packet_bytes: Some(1 << 20),
            tcp_nodelay: true,
        },
        devices,
    )?)
}

/// What phases 1 and 2 measured.
struct TapFigures {
    paced: u64,
    /// Phase 1's publish-to-confirmation latencies, sorted (µs).
    lat: Vec<u64>,
    /// Taps published at full speed.
    fast: f64,
    confirmed_s: f64,
    cleared_s: f64,
    gw_cpu: f64,
    ch_cpu: f64,
    duplicates: u64,
    quarantined: u64,
    gw_rss_kib: u64,
}

/// Phases 1 and 2: paced taps, then the rest at full speed until confirmed and cleared; the
/// daemons' CPU over both.
fn drive_taps(
    rt: &tokio::runtime::Runtime,
    fleet: &Fleet,
    records: &[Vec<Vec<u8>>],
    total: u64,
    agent: &ureq::Agent,
    gateway: &Gateway,
    charging: &Daemon,
) -> anyhow::Result<TapFigures> {
    let paced_rounds = (PACED_TAPS as usize).div_ceil(VALIDATORS);
    let paced = (paced_rounds * VALIDATORS) as u64;
    let gw_cpu0 = crate::stats::cpu_s_of_pid(gateway.daemon.pid());
    let ch_cpu0 = crate::stats::cpu_s_of_pid(charging.pid());
    rt.block_on(publish_paced(fleet, records, paced_rounds))?;
    wait_confirmed(fleet, &gateway.daemon, paced, "paced taps")?;
    let mut lat = fleet.latencies_us();
    lat.sort_unstable();

    let started = Instant::now();
    rt.block_on(publish_rest(fleet, records, paced_rounds))?;
    wait_confirmed(fleet, &gateway.daemon, total, "taps at full speed")?;
    let confirmed_s = started.elapsed().as_secs_f64();
    wait_cleared(agent, gateway, total)?;
    let cleared_s = started.elapsed().as_secs_f64();
    let metric = |name| gateway_metric(agent, &gateway.api, name);
    Ok(TapFigures {
        paced,
        lat,
        fast: (total - paced) as f64,
        confirmed_s,
        cleared_s,
        gw_cpu: crate::stats::cpu_s_of_pid(gateway.daemon.pid()) - gw_cpu0,
        ch_cpu: crate::stats::cpu_s_of_pid(charging.pid()) - ch_cpu0,
        duplicates: metric("tapgate_gateway_taps_duplicate_total")?,
        quarantined: metric("tapgate_gateway_taps_quarantined_total")?,
        gw_rss_kib: crate::stats::status_kib_of_pid(gateway.daemon.pid(), "VmHWM:"),
    })
}

/// Phase 1: the first `rounds` taps of each validator at `PACED_RATE`, round robin.
async fn publish_paced(
    fleet: &Fleet,
    records: &[Vec<Vec<u8>>],
    rounds: usize,
) -> anyhow::Result<()> {
    let tick = Duration::from_millis(5);
    let per_tick = (PACED_RATE * 5 / 1000).max(1) as usize;
    let mut next = tokio::time::Instant::now();
    let mut order = (0..rounds).flat_map(|r| (0..VALIDATORS).map(move |v| (v, r + 1)));
    loop {
        let mut sent = 0;
        for (v, seq) in order.by_ref() {
            fleet.note_sent(v, seq as u64);
            fleet
                .client(v)
                .publish(
                    fleet.tap_topic(v),
                    QoS::AtLeastOnce,
                    false,
                    records[v][seq - 1].clone(),
                )
                .await?;
            sent += 1;
            if sent == per_tick {
                break;
            }
        }
        if sent < per_tick {
            break;
        }
        next += tick;
        tokio::time::sleep_until(next).await;
    }
    Ok(())
}

/// Phase 2: each validator's taps after the first `from`, as fast as it publishes.
async fn publish_rest(fleet: &Fleet, records: &[Vec<Vec<u8>>], from: usize) -> anyhow::Result<()> {
    crate::mqtt::publish_lanes(
        records
            .iter()
            .enumerate()
            .map(|(v, recs)| {
                (
                    fleet.client(v).clone(),
                    fleet.tap_topic(v),
                    recs[from..].to_vec(),
                )
            })
            .collect(),
    )
    .await
}

/// Waits (2 minutes at most) until the gateway has confirmed `n` taps.
fn wait_confirmed(fleet: &Fleet, gateway: &Daemon, n: u64, what: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while fleet.confirmed_total() < n {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "{what}: {} of {n} taps confirmed\n{}",
            fleet.confirmed_total(),
            gateway.tail()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Waits (5 minutes at most) until the gateway has forwarded all `total` taps to clearing
/// and its outbox is empty.
fn wait_cleared(agent: &ureq::Agent, gateway: &Gateway, total: u64) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let forwarded =
            gateway_metric(agent, &gateway.api, "tapgate_gateway_taps_forwarded_total")?;
        let outbox = gateway_metric(agent, &gateway.api, "tapgate_gateway_outbox_taps")?;
        if forwarded >= total && outbox == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "clearing: {forwarded} of {total} taps forwarded\n{}",
            gateway.daemon.tail()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What phase 3 measured.
struct LoadFigures {
    /// Latencies, sorted (µs).
    lat: Vec<u64>,
    secs: f64,
}

/// Phase 3: online loads, 8 client threads each relaying APDUs for its own cards.
fn online_loads(agent: &ureq::Agent, base: &str, hsm: &SoftwareHsm) -> anyhow::Result<LoadFigures> {
    let per_client = LOADS.div_ceil(LOAD_CLIENTS as u64) as usize;
    let mut load_cards: Vec<Vec<Card>> = Vec::new();
    for c in 0..LOAD_CLIENTS {
        let mut v = Vec::new();
        for i in 0..per_client {
            let uid = uid_of(1_000_000 + c * per_client + i);
            register(agent, base, &uid, 0)?;
            v.push(Card::personalise(
                &Personalisation::transit(uid, 0),
                hsm.card_keys(&uid, 1)?,
            ));
        }
        load_cards.push(v);
    }
    crate::loads::register_tokens(
        agent,
        base,
        (0..LOAD_CLIENTS).flat_map(|c| (0..per_client).map(move |i| format!("sys-{c}-{i}"))),
    )?;
    let load_lat = Arc::new(Mutex::new(Vec::new()));
    let loads_started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for (c, mine) in load_cards.iter_mut().enumerate() {
            let (base, lat) = (base.to_string(), load_lat.clone());
            handles.push(scope.spawn(move || -> anyhow::Result<()> {
                let agent = ureq::AgentBuilder::new().build();
                for (i, card) in mine.iter_mut().enumerate() {
                    let t = Instant::now();
                    crate::loads::relay(&agent, &base, card, &format!("sys-{c}-{i}"), 1_000)?;
                    lat.lock()
                        .expect("lat")
                        .push(t.elapsed().as_micros() as u64);
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a load client panicked"))??;
        }
        Ok(())
    })?;
    let secs = loads_started.elapsed().as_secs_f64();
    let mut lat = load_lat.lock().expect("lat").clone();
    lat.sort_unstable();
    Ok(LoadFigures { lat, secs })
}

/// Phase 4: a card blocked through the API reaches every validator; the delays (ms).
fn block_propagation(
    agent: &ureq::Agent,
    base: &str,
    fleet: &Fleet,
    gateway: &Gateway,
) -> anyhow::Result<Vec<u64>> {
    let lost_uid = uid_of(0);
    let blocked_at = Instant::now();
    let (code, body) = http(
        agent,
        "POST",
        &format!("{base}/v1/cards/{}/block", hex::encode_upper(lost_uid)),
        OPS_TOKEN,
        Some(serde_json::json!({"reason": "reported lost"})),
    )?;
    anyhow::ensure!(code == 200, "blocking a card: {code} {body}");
    fleet
        .wait_blocked(&lost_uid, blocked_at, Duration::from_secs(30))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", gateway.daemon.tail()))
}

/// Nothing lost, nothing doubled: every tapped card's shadow purse equals the card. Returns
/// (cards out of balance, counters not booked).
fn conservation(agent: &ureq::Agent, base: &str, cards: &[Card]) -> anyhow::Result<(u64, u64)> {
    let mut out_of_balance = 0u64;
    let mut lost = 0u64;
    for card in cards {
        let s = card.state();
        let (code, body) = http(
            agent,
            "GET",
            &format!("{base}/v1/cards/{}", hex::encode_upper(s.uid)),
            OPS_TOKEN,
            None,
        )?;
        anyhow::ensure!(code == 200, "reading a card: {code} {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let (balanced, unbooked) = card_conserved(
            &CardTruth {
                uid: s.uid,
                balance_minor: s.balance_minor,
                tmc: s.tmc,
            },
            &ShadowView {
                balance_minor: v["shadow_balance_minor"].as_i64().unwrap_or(i64::MIN),
                booked_through_tmc: v["booked_through_tmc"]
                    .as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(0),
            },
        );
        out_of_balance += u64::from(!balanced);
        lost += unbooked;
    }
    Ok((out_of_balance, lost))
}

/// The figures, in print order (names are a contract: docs/benchmarks.md).
fn report(
    total: u64,
    taps: &TapFigures,
    loads: &LoadFigures,
    held: &[u64],
    lost: u64,
    out_of_balance: u64,
) -> Figures {
    let q = crate::stats::quantile;
    let (lat, load_lat) = (&taps.lat, &loads.lat);
    let loads_done = load_lat.len() as u64;
    vec![
        ("validators", (VALIDATORS as u64).into()),
        ("cards", (CARDS as u64).into()),
        ("taps", total.into()),
        ("paced_taps", taps.paced.into()),
        ("paced_rate_per_s", PACED_RATE.into()),
        ("tap_latency_us_p50", q(lat, 0.5).into()),
        ("tap_latency_us_p99", q(lat, 0.99).into()),
        (
            "tap_latency_ms_max",
            ms(lat.last().copied().unwrap_or(0)).into(),
        ),
        ("taps_per_s", ((taps.fast / taps.confirmed_s) as u64).into()),
        (
            "cleared_per_s",
            ((taps.fast / taps.cleared_s) as u64).into(),
        ),
        (
            "gateway_cpu_us_per_tap",
            ((taps.gw_cpu * 1e6 / total as f64) as u64).into(),
        ),
        (
            "charging_cpu_us_per_tap",
            ((taps.ch_cpu * 1e6 / total as f64) as u64).into(),
        ),
        ("gateway_rss_peak_kib", taps.gw_rss_kib.into()),
        ("duplicated", taps.duplicates.into()),
        ("quarantined", taps.quarantined.into()),
        ("lost", lost.into()),
        ("cards_out_of_balance", out_of_balance.into()),
        ("loads", loads_done.into()),
        (
            "loads_per_s",
            ((loads_done as f64 / loads.secs) as u64).into(),
        ),
        ("load_ms_p50", ms(q(load_lat, 0.5)).into()),
        ("load_ms_p99", ms(q(load_lat, 0.99)).into()),
        ("block_propagation_ms_p50", q(held, 0.5).into()),
        ("block_propagation_ms_p99", q(held, 0.99).into()),
    ]
}
