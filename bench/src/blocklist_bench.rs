//! Bench scenario `blocklist`: a card blocked at the back office, relayed by the gateway as a
//! signed delta over MQTT (the embedded broker) to `n` simulated validators (default 1,000).
//! Each validator verifies and applies the delta and reports the version it holds in its
//! heartbeat; the gateway's propagation tracker measures how long until 50%, 99% and 100% of
//! the online validators held the block (`propagation_ms_p50`, `propagation_ms_p99`,
//! `propagation_ms_100`), counted from the gateway's publication. `block_to_all_ms` is the
//! whole path from the back office's API call to the last validator holding the block.
//!
//! The simulated validators run in child processes (this binary re-invoked with the hidden
//! scenario `blocklist-validators`, [`PER_CHILD`] connections each), so this process holds the
//! gateway, its embedded broker and the back office alone: its resident memory with `n`
//! validators connected (`rss_kib`, and `rss_per_validator_bytes` against the same process
//! before they connected) is the gateway's. Each validator subscribes to what a real one does
//! (its confirmations and ceiling grant, the blocklist, fares and action list), so the broker
//! holds two filters per validator as in the field.
//!
//! The limits, in the same run: `raw_fanout_ms_*`, one retained message of the same size
//! published to the same `n` connections by a plain client (no gateway, no heartbeats), each
//! received as the children stamp it; `delivered_ms_*`, the delta's arrival stamped the same
//! way (from the gateway's publication), and `ratio_p99` = delivered p99 / raw fan-out p99.
//! Tap ingestion: `taps_per_s` with the `n` validators connected beside `taps_per_s_alone`,
//! the same number of taps before any validator connected.
//!
//! `--broker mosquitto`: the same run against a throwaway Mosquitto (the shipped
//! `tapgate.conf` and ACL, the validators' listener and the gateway's loopback one on free
//! ports) started by this process, which raises its own open-file limit for it to inherit: the
//! gateway is one client of it, and each validator is one descriptor in Mosquitto's process
//! instead of one in the gateway's (the embedded broker's ACL front hands each connection to
//! rumqttd's router in process). `broker_rss_kib`, `broker_rss_per_validator_bytes` and
//! `broker_fds` are Mosquitto's; `gateway_fds` the descriptors this process holds with the
//! fleet connected. `validator_reconnects_connecting` / `_measured`: the validators'
//! reconnections while the fleet connected / after (a validator whose CONNACK or keep-alive
//! timed out). `load_1m_start` / `load_1m_end`: the machine's load average around the run.
//!
//! A child verifies each distinct signed list once and applies the result to each of its
//! validators: real validators verify on their own CPUs side by side, these share the two
//! cores with the gateway (the verification is in the validator's own figures).

use crate::Figures;
use charging::server::{build, serve_on, ServerConfig};
use gateway::daemon::{
    run, run_linked, start_embedded_broker_linked, BrokerUsers, GatewayConfig, GatewayStats,
    TapLink,
};
use gateway::propagation::Report;
use gateway::store::Store;
use purse::blocklist::{Blocklist, ListUpdate};
use purse::keys::{KeySet, Role as KeyRole};
use purse::rotation::SignedMessage;
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tapgate_http::auth::{Auth, Role, TokenEntry};

/// Validators simulated by one child process.
pub const PER_CHILD: u32 = 2_500;
/// The operator of the run (the gateway bench's, whose tap helpers it shares).
const OPERATOR: &str = "bench";
/// Taps published in each of the two tap runs (alone, then with the validators connected).
const TAPS: u64 = 16_000;
/// The first device id of the simulated validators.
const FIRST_VALIDATOR: u32 = 2_000;
/// How long a simulated validator waits for its CONNACK before it gives up and connects again
/// (rumqttc's default is 5 s). While a fleet of 10,000 connects at once a broker answers the
/// last CONNECTs after more than 5 s (each subscription to a filter the whole fleet shares is
/// a walk of that filter's subscribers in Mosquitto, O(N)); a validator that gave up and came
/// back had its abandoned CONNECT still queued, which took its new session over when the
/// broker reached it, and so on: a chain of reconnections that ran into the measured part, each
/// one O(N) again (docs/benchmarks.md, "Gateway: connected validators").
const CONNACK_WAIT_S: u64 = 30;
/// Where the raw fan-out goes (every validator subscribes to it as one more filter).
const RAW_TOPIC: &str = "tapgate/v1/raw/blocklist/fanout";

async fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while !done() {
        anyhow::ensure!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The wall clock in µs (the children stamp arrivals with it; one machine, one clock).
fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Raises this process's open-file limit to at least `want` (the soft limit, and the hard one
/// where this process may: root); the limit in force.
pub fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft >= want {
        return Ok(soft);
    }
    let hard_wanted = hard.max(want);
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, hard_wanted).is_err() {
        anyhow::ensure!(
            hard >= want,
            "{want} open files needed, the hard limit is {hard} (raise it, e.g. `ulimit -Hn {want}` as root)"
        );
        rlimit::setrlimit(rlimit::Resource::NOFILE, want, hard)?;
    }
    Ok(rlimit::Resource::NOFILE.get()?.0)
}

/// Which broker the fleet connects to (`--broker`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum BrokerKind {
    Embedded,
    Mosquitto,
}

pub fn run_scenario(n: Option<u64>, broker: &str) -> anyhow::Result<Figures> {
    let validators = n.unwrap_or(1_000) as u32;
    let kind = match broker {
        "embedded" => BrokerKind::Embedded,
        "mosquitto" => BrokerKind::Mosquitto,
        other => anyhow::bail!("--broker {other}: embedded or mosquitto"),
    };
    // One descriptor per validator: the front's accepted socket (embedded; the front reaches
    // rumqttd in process), or Mosquitto's, which inherits this limit.
    raise_nofile(u64::from(validators) + 1_024)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(scenario(validators, kind))
}

/// The 1-minute load average (`/proc/loadavg`; 0 elsewhere).
fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Open descriptors of process `pid` (`self` for this one; 0 where /proc is missing).
fn fds_of(pid: &str) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// The taps of the two tap runs: devices 1000… alone, devices 1100… with the fleet connected.
struct TapRuns {
    alone: Vec<Vec<Vec<u8>>>,
    connected: Vec<Vec<Vec<u8>>>,
}

fn tap_runs(keys: &KeySet, rng: &mut StdRng) -> anyhow::Result<TapRuns> {
    let per = TAPS / crate::gateway_bench::VALIDATORS as u64;
    Ok(TapRuns {
        alone: crate::gateway_bench::signed_taps_of(keys, rng, per, 1000, OPERATOR)?,
        connected: crate::gateway_bench::signed_taps_of(keys, rng, per, 1100, OPERATOR)?,
    })
}

/// The broker of a run, where its clients connect, and what its own process holds.
struct Broker {
    /// The validators' (and tap publishers') port.
    devices: u16,
    /// The gateway's (and the raw fan-out publisher's) port; `devices` for the embedded one.
    gateway: u16,
    /// The embedded broker's in-process link, taken by the gateway.
    link: Option<TapLink>,
    /// Mosquitto, killed when dropped.
    mosquitto: Option<tapgate_testkit::mosquitto::Mosquitto>,
}

impl Broker {
    /// Mosquitto's process id (`None`: the broker is in this process).
    fn pid(&self) -> Option<u32> {
        self.mosquitto.as_ref().map(|m| m.pid())
    }

    fn rss_kib(&self) -> u64 {
        self.pid()
            .map_or(0, |p| crate::stats::status_kib_of_pid(p, "VmRSS:"))
    }
}

/// What the fleet's connection measured.
struct Connected {
    connect_s: f64,
    rss_before: u64,
    rss_connected: u64,
    broker_rss_before: u64,
    broker_rss_connected: u64,
    gateway_fds: u64,
    broker_fds: u64,
    /// Validators' reconnections while the fleet connected.
    reconnects: u64,
}

async fn scenario(validators: u32, kind: BrokerKind) -> anyhow::Result<Figures> {
    let load_start = load_1m();
    let mut rng = StdRng::seed_from_u64(21);
    let keys = KeySet::generate(&mut rng);
    let taps = tap_runs(&keys, &mut rng)?;
    let dir = tempfile::tempdir()?;
    let mut broker = match kind {
        BrokerKind::Embedded => start_broker(validators).await?,
        BrokerKind::Mosquitto => start_mosquitto(dir.path(), validators).await?,
    };
    let base = start_charging(dir.path(), &keys)?;
    let stats = start_gateway(dir.path(), &mut broker, &base, &keys).await?;
    let taps_alone = tap_rate(broker.devices, 1000, &taps.alone, &stats).await?;
    let (fleet, connected) = connect_fleet(validators, &broker, &stats, &keys).await?;
    // A pause before the measured part, to attach a profiler (`perf record -p`).
    if let Some(s) = std::env::var("TAPGATE_BENCH_PAUSE_S")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        tokio::time::sleep(Duration::from_secs(s)).await;
    }

    // The limit: one retained message of a delta's size to the same connections, no gateway.
    settle(broker.pid()).await;
    let raw = raw_fanout(broker.gateway, validators, &fleet).await?;

    // Block a card; measure until every validator holds the block.
    settle(broker.pid()).await;
    let t0 = Instant::now();
    block_card(&base).await?;
    wait(
        "every validator to hold the block",
        Duration::from_secs(120),
        || fleet.held_count() >= validators as usize,
    )
    .await?;
    let block_to_all_ms = t0.elapsed().as_millis() as u64;
    let report = propagation_report(&stats).await?;
    let delivered = fleet.delays_since(&fleet.held, report.published_at_ms * 1_000);
    let taps_connected = tap_rate(broker.devices, 1100, &taps.connected, &stats).await?;
    let children_cpu_s: f64 = fleet
        .children
        .iter()
        .map(|c| crate::stats::cpu_s_of_pid(c.id()))
        .sum();
    let mut figures = vec![
        (
            "broker",
            serde_json::Value::from(match kind {
                BrokerKind::Embedded => "embedded",
                BrokerKind::Mosquitto => "mosquitto",
            }),
        ),
        ("validators", validators.into()),
        ("validator_processes", (fleet.children.len() as u64).into()),
        ("propagation_ms_p50", report.ms_to_50.unwrap_or(0).into()),
        ("propagation_ms_p99", report.ms_to_99.unwrap_or(0).into()),
        ("propagation_ms_100", report.ms_to_100.unwrap_or(0).into()),
        ("block_to_all_ms", block_to_all_ms.into()),
        ("online_validators", report.online_validators.into()),
    ];
    figures.extend(fanout_figures(&delivered, &raw));
    figures.extend([
        ("taps_per_s", (taps_connected as u64).into()),
        ("taps_per_s_alone", (taps_alone as u64).into()),
        ("taps_ratio", ratio(taps_connected, taps_alone).into()),
        ("rss_kib", crate::stats::status_kib("VmRSS:").into()),
    ]);
    figures.extend(connected.figures(validators, broker.rss_kib()));
    figures.extend([
        (
            "validators_cpu_s",
            ((children_cpu_s * 10.0).round() / 10.0).into(),
        ),
        (
            "validator_reconnects_connecting",
            connected.reconnects.into(),
        ),
        (
            "validator_reconnects_measured",
            (fleet.reconnects.load(Ordering::Relaxed) - connected.reconnects).into(),
        ),
        ("load_1m_start", load_start.into()),
        ("load_1m_end", load_1m().into()),
    ]);
    Ok(figures)
}

/// `a / b` to two decimals (0 when `b` is 0).
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 100.0).round() / 100.0
    } else {
        0.0
    }
}

/// The delivered and raw fan-out percentiles (ms) and their p99 ratio.
fn fanout_figures(delivered: &[u64], raw: &[u64]) -> Figures {
    let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
    let (d99, r99) = (pct(delivered, 99), pct(raw, 99));
    vec![
        ("delivered_ms_p50", ms(pct(delivered, 50)).into()),
        ("delivered_ms_p99", ms(d99).into()),
        ("delivered_ms_100", ms(pct(delivered, 100)).into()),
        ("raw_fanout_ms_p50", ms(pct(raw, 50)).into()),
        ("raw_fanout_ms_p99", ms(r99).into()),
        ("raw_fanout_ms_100", ms(pct(raw, 100)).into()),
        ("ratio_p99", ratio(d99 as f64, r99 as f64).into()),
    ]
}

impl Connected {
    /// Memory and descriptors with the fleet connected; `broker_rss_end` is Mosquitto's at
    /// the end of the run (0 for the embedded broker, which is in `rss_kib`).
    fn figures(&self, validators: u32, broker_rss_end: u64) -> Figures {
        let per = |after: u64, before: u64| {
            after.saturating_sub(before) * 1024 / u64::from(validators.max(1))
        };
        vec![
            ("rss_before_validators_kib", self.rss_before.into()),
            (
                "rss_per_validator_bytes",
                per(self.rss_connected, self.rss_before).into(),
            ),
            ("broker_rss_kib", broker_rss_end.into()),
            (
                "broker_rss_before_validators_kib",
                self.broker_rss_before.into(),
            ),
            (
                "broker_rss_per_validator_bytes",
                per(self.broker_rss_connected, self.broker_rss_before).into(),
            ),
            ("gateway_fds", self.gateway_fds.into()),
            ("broker_fds", self.broker_fds.into()),
            ("connect_s", ((self.connect_s * 10.0).round() / 10.0).into()),
        ]
    }
}

/// Spawns the fleet and waits until every validator has subscribed and the gateway counts
/// it online; the error names the limit that stopped it.
async fn connect_fleet(
    validators: u32,
    broker: &Broker,
    stats: &GatewayStats,
    keys: &KeySet,
) -> anyhow::Result<(Fleet, Connected)> {
    let rss_before = crate::stats::status_kib("VmRSS:");
    let broker_rss_before = broker.rss_kib();
    let connecting = Instant::now();
    let fleet = Fleet::spawn(validators, broker.devices, keys.verifying_key)?;
    let limit = Duration::from_secs(300);
    let subscribed = wait("the validators to subscribe", limit, || {
        fleet.subscribed.load(Ordering::Relaxed) >= u64::from(validators)
    })
    .await;
    if let Err(e) = subscribed {
        let soft = rlimit::Resource::NOFILE.get().map_or(0, |l| l.0);
        anyhow::bail!(
            "{e}: {} of {validators} subscribed in {} s ({} descriptors held here, {} in the broker's process; open-file limit {soft})",
            fleet.subscribed.load(Ordering::Relaxed),
            limit.as_secs(),
            fds_of("self"),
            broker.pid().map_or(0, |p| fds_of(&p.to_string())),
        );
    }
    wait(
        "the gateway to see every validator online",
        Duration::from_secs(120),
        || stats.propagation.lock().map(|p| p.online()).unwrap_or(0) >= validators as usize,
    )
    .await?;
    let connected = Connected {
        connect_s: connecting.elapsed().as_secs_f64(),
        rss_before,
        rss_connected: crate::stats::status_kib("VmRSS:"),
        broker_rss_before,
        broker_rss_connected: broker.rss_kib(),
        gateway_fds: fds_of("self"),
        broker_fds: broker.pid().map_or(0, |p| fds_of(&p.to_string())),
        reconnects: fleet.reconnects.load(Ordering::Relaxed),
    };
    eprintln!(
        "blocklist: {validators} validators connected and subscribed in {:.1} s",
        connected.connect_s
    );
    Ok((fleet, connected))
}

/// Waits (30 s at most) until this process (gateway, back office, the embedded broker) and
/// Mosquitto's (`broker`) are quiet — under 10% of a core over a quarter of a second — so that
/// both fan-outs start from the same state, not while the broker still digests the fleet's
/// connections.
async fn settle(broker: Option<u32>) {
    let cpu = || crate::stats::cpu_s() + broker.map_or(0.0, crate::stats::cpu_s_of_pid);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let cpu0 = cpu();
        tokio::time::sleep(Duration::from_millis(250)).await;
        if cpu() - cpu0 < 0.025 {
            return;
        }
    }
}

/// The `p`-th percentile of sorted samples as the tracker counts it: the smallest value that
/// `p`% of them reach (0 when empty).
fn pct(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let need = (sorted.len() * p).div_ceil(100).max(1);
    sorted[need - 1]
}

/// Taps/s: devices `first`… publish `records` at QoS 1 and count the gateway's confirmations.
async fn tap_rate(
    port: u16,
    first: usize,
    records: &[Vec<Vec<u8>>],
    stats: &GatewayStats,
) -> anyhow::Result<f64> {
    let total: u64 = records.iter().map(|r| r.len() as u64).sum();
    let stored0 = stats.stored.load(Ordering::Relaxed);
    let received = Arc::new(AtomicU64::new(0));
    let ct = |vi: usize| format!("tapgate/v1/{OPERATOR}/devices/{}/confirm", first + vi);
    let took = crate::gateway_bench::publish_all(
        &[port],
        &crate::gateway_bench::credentials(first),
        records,
        |vi| format!("tapgate/v1/{OPERATOR}/taps/{}", first + vi),
        Some(&ct),
        received,
        total,
    )
    .await?;
    let stored = stats.stored.load(Ordering::Relaxed) - stored0;
    anyhow::ensure!(stored == total, "{stored} of {total} taps stored");
    Ok(total as f64 / took.as_secs_f64())
}

/// The embedded broker on a free port as `tapgate gateway` runs it (the gateway's taps over
/// the in-process link), with the passwords of the gateway, the tap publishers and the
/// validators.
async fn start_broker(validators: u32) -> anyhow::Result<Broker> {
    let port = tapgate_testkit::free_port();
    let mut users = HashMap::from([("gateway".to_string(), "gw-secret".to_string())]);
    for first in [1000, 1100] {
        users.extend(crate::gateway_bench::credentials(first));
    }
    for v in 0..validators {
        users.insert(format!("{}", FIRST_VALIDATOR + v), "v-secret".to_string());
    }
    let (_, link) = start_embedded_broker_linked(
        format!("127.0.0.1:{port}").parse()?,
        BrokerUsers::from(users),
        None,
        OPERATOR,
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    wait("the broker", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await?;
    Ok(Broker {
        devices: port,
        gateway: port,
        link: Some(link),
        mosquitto: None,
    })
}

/// A throwaway Mosquitto in `dir` with the shipped `tapgate.conf` and ACL (the validators'
/// listener and the gateway's loopback one on free ports), the gateway's and tap publishers'
/// passwords, then the validators' (one `mosquitto_passwd` hash of their shared password,
/// appended per device and loaded with SIGHUP: `mosquitto_passwd` rewrites the whole file for
/// each user). It inherits this process's open-file limit.
async fn start_mosquitto(dir: &std::path::Path, validators: u32) -> anyhow::Result<Broker> {
    let (devices, gateway) = (tapgate_testkit::free_port(), tapgate_testkit::free_port());
    let mut conf = tapgate_testkit::mosquitto::MosquittoConfig::shipped(devices, gateway).no_log();
    conf = conf.user("gateway", "gw-secret");
    for first in [1000, 1100] {
        for (u, p) in crate::gateway_bench::credentials(first) {
            conf = conf.user(&u, &p);
        }
    }
    let mdir = dir.join("mosquitto");
    std::fs::create_dir_all(&mdir)?;
    let mosquitto = conf.try_start(&mdir).map_err(|e| anyhow::anyhow!(e))?;
    let one = mdir.join("one.passwd");
    tapgate_testkit::mosquitto::write_passwd(&one, &[("v", "v-secret")])
        .map_err(|e| anyhow::anyhow!(e))?;
    let hash = std::fs::read_to_string(&one)?
        .trim()
        .strip_prefix("v:")
        .ok_or_else(|| anyhow::anyhow!("unexpected mosquitto_passwd output"))?
        .to_string();
    let mut passwd = std::fs::OpenOptions::new()
        .append(true)
        .open(mdir.join("passwd"))?;
    for v in 0..validators {
        writeln!(passwd, "{}:{hash}", FIRST_VALIDATOR + v)?;
    }
    passwd.sync_all()?;
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &mosquitto.pid().to_string()])
        .status()?;
    anyhow::ensure!(hup.success(), "kill -HUP mosquitto failed");
    let last = FIRST_VALIDATOR + validators.max(1) - 1;
    let mut accepted = false;
    let t = Instant::now();
    while !accepted {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "mosquitto did not take the validators' passwords in 10 s"
        );
        accepted = accepts(devices, &last.to_string(), "v-secret").await;
    }
    Ok(Broker {
        devices,
        gateway,
        link: None,
        mosquitto: Some(mosquitto),
    })
}

/// Whether the broker on `port` accepts `user`'s connection (5 s at most).
async fn accepts(port: u16, user: &str, password: &str) -> bool {
    let mut o = MqttOptions::new(format!("probe-{user}"), "127.0.0.1", port);
    o.set_credentials(user, password);
    let (client, mut ev) = AsyncClient::new(o, 4);
    let acked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    let _ = client.try_disconnect();
    if !acked {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    acked
}

/// The back office, serving on this runtime: its base URL.
fn start_charging(dir: &std::path::Path, keys: &KeySet) -> anyhow::Result<String> {
    let mut cfg = ServerConfig::from_toml(&format!(
        "data_dir = {:?}\nledger_map_size_bytes = 67108864",
        dir.join("charging").to_string_lossy()
    ))?;
    cfg.tokens = vec![
        TokenEntry {
            name: "gw".into(),
            role: Role::Gateway,
            sha256: Auth::hash_token("tg_gw"),
        },
        TokenEntry {
            name: "ops".into(),
            role: Role::Operator,
            sha256: Auth::hash_token("tg_ops"),
        },
    ];
    cfg.operator = OPERATOR.into();
    let state = build(&cfg, Box::new(SoftwareHsm::new(keys)?))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { serve_on(listener, &cfg, state, std::future::pending()).await });
    Ok(base)
}

/// The gateway, relaying the back office's blocklist: taking taps over the embedded broker's
/// link, or as Mosquitto's client on its loopback listener. Its statistics once it has
/// subscribed.
async fn start_gateway(
    dir: &std::path::Path,
    broker: &mut Broker,
    base: &str,
    keys: &KeySet,
) -> anyhow::Result<Arc<GatewayStats>> {
    let store = Store::open(&dir.join("gateway"), 1 << 30)?;
    let stats = Arc::new(GatewayStats::default());
    let cfg = GatewayConfig {
        broker: ("127.0.0.1".into(), broker.gateway),
        mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
        charging: Some((base.to_string(), "tg_gw".into())),
        operator: OPERATOR.into(),
        ..GatewayConfig::default()
    };
    let (keys, st) = (keys.for_role(KeyRole::Gateway, 0)?, stats.clone());
    match broker.link.take() {
        Some(link) => {
            tokio::spawn(async move {
                if let Err(e) = run_linked(cfg, link, store, keys, st, std::future::pending()).await
                {
                    eprintln!("gateway: {e}");
                }
            });
        }
        None => {
            tokio::spawn(run(cfg, store, keys, st, std::future::pending()));
        }
    }
    wait("the gateway", Duration::from_secs(10), || {
        stats.subscribed.load(Ordering::Acquire)
    })
    .await?;
    Ok(stats)
}

/// The simulated validators: child processes of [`PER_CHILD`] each, reporting on their
/// standard output (`C` connected again, `S` subscribed, `R <µs>` the raw fan-out's message arrived, `H <µs>` the
/// block held).
struct Fleet {
    children: Vec<std::process::Child>,
    subscribed: Arc<AtomicU64>,
    /// Connections after a validator's first (`C` lines): reconnections.
    reconnects: Arc<AtomicU64>,
    raw: Arc<Mutex<Vec<u64>>>,
    held: Arc<Mutex<Vec<u64>>>,
}

impl Fleet {
    fn spawn(validators: u32, port: u16, pk: [u8; 32]) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe()?;
        let mut fleet = Fleet {
            children: Vec::new(),
            subscribed: Arc::new(AtomicU64::new(0)),
            reconnects: Arc::new(AtomicU64::new(0)),
            raw: Arc::default(),
            held: Arc::default(),
        };
        let mut first = 0;
        while first < validators {
            let count = PER_CHILD.min(validators - first);
            let mut child = std::process::Command::new(&exe)
                .args(["blocklist-validators", "--port", &port.to_string()])
                .args(["--first-device", &(FIRST_VALIDATOR + first).to_string()])
                .args(["--n", &count.to_string(), "--pk", &hex::encode(pk)])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            let out = child.stdout.take().expect("piped");
            let (subscribed, reconnects, raw, held) = (
                fleet.subscribed.clone(),
                fleet.reconnects.clone(),
                fleet.raw.clone(),
                fleet.held.clone(),
            );
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let stamp = || line[2..].trim().parse::<u64>().unwrap_or(0);
                    match line.as_bytes().first() {
                        Some(b'C') => {
                            reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(b'S') => {
                            subscribed.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(b'R') => raw.lock().expect("raw").push(stamp()),
                        Some(b'H') => held.lock().expect("held").push(stamp()),
                        _ => {}
                    }
                }
            });
            fleet.children.push(child);
            first += count;
        }
        Ok(fleet)
    }

    fn held_count(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// The stamps in `of`, less `since_us`, sorted.
    fn delays_since(&self, of: &Mutex<Vec<u64>>, since_us: u64) -> Vec<u64> {
        let mut d: Vec<u64> = of
            .lock()
            .map(|v| v.iter().map(|s| s.saturating_sub(since_us)).collect())
            .unwrap_or_default();
        d.sort_unstable();
        d
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The limit: a plain client (the gateway's credentials, no gateway behind it) publishes one
/// retained message of a delta's size at QoS 1 to the validators' raw filter; each arrival's
/// delay from the publication (µs), sorted.
async fn raw_fanout(port: u16, validators: u32, fleet: &Fleet) -> anyhow::Result<Vec<u64>> {
    let mut o = MqttOptions::new("bench-fanout", "127.0.0.1", port);
    o.set_credentials("gateway", "gw-secret");
    let (client, mut ev) = AsyncClient::new(o, 16);
    let connected = Arc::new(tokio::sync::Notify::new());
    let c2 = connected.clone();
    let task = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => c2.notify_one(),
                Ok(_) => {}
                Err(rumqttc::ConnectionError::RequestsDone) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), connected.notified()).await?;
    let t0 = unix_us();
    client
        .publish(RAW_TOPIC, QoS::AtLeastOnce, true, vec![0x5a; 200])
        .await?;
    wait(
        "every validator to receive the raw fan-out",
        Duration::from_secs(120),
        || fleet.raw.lock().map(|r| r.len()).unwrap_or(0) >= validators as usize,
    )
    .await?;
    let _ = client.disconnect().await;
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    Ok(fleet.delays_since(&fleet.raw, t0))
}

/// The operator blocks a card through the back office's API.
async fn block_card(base: &str) -> anyhow::Result<()> {
    let url = format!("{base}/v1/cards/04AABBCCDDEEFF/block");
    tokio::task::spawn_blocking(move || {
        ureq::post(&url)
            .set("Authorization", "Bearer tg_ops")
            .send_json(serde_json::json!({"reason": "stolen"}))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await?
    .map_err(|e| anyhow::anyhow!("blocking: {e}"))
}

/// The gateway's propagation report of the latest version, once it has counted every
/// validator's heartbeat.
async fn propagation_report(stats: &GatewayStats) -> anyhow::Result<Report> {
    wait(
        "the gateway to count every heartbeat",
        Duration::from_secs(60),
        || {
            stats
                .propagation
                .lock()
                .ok()
                .and_then(|p| p.latest().and_then(|v| p.report(v)))
                .is_some_and(|r| r.ms_to_100.is_some())
        },
    )
    .await?;
    let p = stats
        .propagation
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?;
    p.latest()
        .and_then(|v| p.report(v))
        .ok_or_else(|| anyhow::anyhow!("no report"))
}

/// The child side (hidden scenario `blocklist-validators`): validators `first`…`first + n - 1`
/// connected to the broker on `port`, until the parent ends this process.
pub fn run_validators(port: u16, first: u32, n: u32, pk_hex: &str) -> anyhow::Result<()> {
    let pk: [u8; 32] = hex::decode(pk_hex)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("--pk: 32 bytes in hex"))?;
    raise_nofile(u64::from(n) + 256)?;
    let (out, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut w = std::io::BufWriter::new(std::io::stdout().lock());
        while let Ok(l) = lines.recv() {
            let _ = writeln!(w, "{l}");
            while let Ok(l) = lines.try_recv() {
                let _ = writeln!(w, "{l}");
            }
            if w.flush().is_err() {
                break;
            }
        }
    });
    let verified: Verified = Arc::default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            for device in first..first + n {
                let sim = SimValidator {
                    device,
                    port,
                    pk,
                    out: out.clone(),
                    verified: verified.clone(),
                };
                tokio::spawn(sim.run());
            }
            std::future::pending::<()>().await
        });
    Ok(())
}

/// Signed lists verified in this process, by their bytes (`None`: refused).
type Verified = Arc<Mutex<HashMap<Vec<u8>, Option<ListUpdate>>>>;

/// One simulated validator.
struct SimValidator {
    device: u32,
    port: u16,
    pk: [u8; 32],
    out: std::sync::mpsc::Sender<String>,
    verified: Verified,
}

impl SimValidator {
    /// What a validator subscribes to (its confirmations and ceiling grant, the blocklist,
    /// fares, action list), plus the raw fan-out's topic.
    fn filters(&self) -> Vec<SubscribeFilter> {
        let t = validator::daemon::Topics::new(OPERATOR, self.device);
        [
            t.confirm,
            t.blocklist_snapshot,
            t.blocklist_delta,
            t.fares,
            t.actions_snapshot,
            t.actions_delta,
            t.ceiling,
            RAW_TOPIC.to_string(),
        ]
        .into_iter()
        .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce))
        .collect()
    }

    /// The list update in `payload`, verified once in this process.
    fn verify(&self, payload: &[u8]) -> Option<ListUpdate> {
        let mut v = self.verified.lock().ok()?;
        v.entry(payload.to_vec())
            .or_insert_with(|| ListUpdate::verify(payload, &self.pk).ok())
            .clone()
    }

    /// The MQTT loop: subscribe, heartbeat the version held at subscription and right after
    /// each change (validators also send one on their regular interval).
    async fn run(self) {
        let device = self.device;
        let mut o = MqttOptions::new(format!("sim-{device}"), "127.0.0.1", self.port);
        o.set_credentials(device.to_string(), "v-secret")
            .set_keep_alive(Duration::from_secs(60))
            .set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut ev) = AsyncClient::new(o, 16);
        let mut net = ev.network_options();
        net.set_connection_timeout(CONNACK_WAIT_S);
        ev.set_network_options(net);
        let status = format!("tapgate/v1/{OPERATOR}/devices/{device}/status");
        let mut list = Blocklist::new(OPERATOR);
        let heartbeat = |version: u64| {
            serde_json::json!({"device": device, "online": true, "blocklist_version": version})
                .to_string()
        };
        let (mut subscribed, mut connected) = (false, false);
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if std::mem::replace(&mut connected, true) {
                        let _ = self.out.send("C".into());
                    }
                    let _ = client.try_subscribe_many(self.filters());
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if !std::mem::replace(&mut subscribed, true) {
                        let _ = self.out.send("S".into());
                    }
                    let _ = client.try_publish(
                        &status,
                        QoS::AtLeastOnce,
                        true,
                        heartbeat(list.version()),
                    );
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == RAW_TOPIC => {
                    let _ = self.out.send(format!("R {}", unix_us()));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let before = list.version();
                    let applied = self.verify(&p.payload).map(|u| list.apply_verified(&u));
                    if let Some(Ok(v)) = applied {
                        if v > before {
                            if before == 0 {
                                let _ = self.out.send(format!("H {}", unix_us()));
                            }
                            let _ =
                                client.try_publish(&status, QoS::AtLeastOnce, true, heartbeat(v));
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}
