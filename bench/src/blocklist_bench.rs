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
//! A child verifies each distinct signed list once and applies the result to each of its
//! validators: real validators verify on their own CPUs side by side, these share the two
//! cores with the gateway (the verification is in the validator's own figures).

use crate::Figures;
use charging::server::{build, serve_on, ServerConfig};
use gateway::daemon::{
    run_linked, start_embedded_broker_linked, BrokerUsers, GatewayConfig, GatewayStats, TapLink,
};
use gateway::propagation::Report;
use gateway::store::Store;
use purse::blocklist::{Blocklist, ListUpdate};
use purse::keys::{KeySet, Role as KeyRole};
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

pub fn run_scenario(n: Option<u64>) -> anyhow::Result<Figures> {
    let validators = n.unwrap_or(1_000) as u32;
    // Each validator's connection is three descriptors here: the front's accepted socket,
    // its socket to rumqttd and rumqttd's end of that.
    raise_nofile(u64::from(validators) * 3 + 1_024)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(scenario(validators))
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

async fn scenario(validators: u32) -> anyhow::Result<Figures> {
    let mut rng = StdRng::seed_from_u64(21);
    let keys = KeySet::generate(&mut rng);
    let taps = tap_runs(&keys, &mut rng)?;
    let dir = tempfile::tempdir()?;
    let port = tapgate_testkit::free_port();
    let link = start_broker(port, validators).await?;
    let base = start_charging(dir.path(), &keys)?;
    let stats = start_gateway(dir.path(), port, link, &base, &keys).await?;
    let taps_alone = tap_rate(port, 1000, &taps.alone, &stats).await?;
    let rss_before = crate::stats::status_kib("VmRSS:");

    let connecting = Instant::now();
    let fleet = Fleet::spawn(validators, port, keys.verifying_key)?;
    wait(
        "the validators to subscribe",
        Duration::from_secs(300),
        || fleet.subscribed.load(Ordering::Relaxed) >= u64::from(validators),
    )
    .await?;
    wait(
        "the gateway to see every validator online",
        Duration::from_secs(120),
        || stats.propagation.lock().map(|p| p.online()).unwrap_or(0) >= validators as usize,
    )
    .await?;
    let connect_s = connecting.elapsed().as_secs_f64();
    let rss_connected = crate::stats::status_kib("VmRSS:");
    eprintln!("blocklist: {validators} validators connected and subscribed in {connect_s:.1} s");
    // A pause before the measured part, to attach a profiler (`perf record -p`).
    if let Some(s) = std::env::var("TAPGATE_BENCH_PAUSE_S")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        tokio::time::sleep(Duration::from_secs(s)).await;
    }

    // The limit: one retained message of a delta's size to the same connections, no gateway.
    settle().await;
    let raw = raw_fanout(port, validators, &fleet).await?;

    // Block a card; measure until every validator holds the block.
    settle().await;
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
    let published_us = report.published_at_ms * 1_000;
    let delivered = fleet.delays_since(&fleet.held, published_us);
    let taps_connected = tap_rate(port, 1100, &taps.connected, &stats).await?;
    let rss = crate::stats::status_kib("VmRSS:");
    let children_cpu_s: f64 = fleet
        .children
        .iter()
        .map(|c| crate::stats::cpu_s_of_pid(c.id()))
        .sum();
    let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            (a / b * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    let (d99, r99) = (pct(&delivered, 99), pct(&raw, 99));
    Ok(vec![
        ("validators", validators.into()),
        ("validator_processes", (fleet.children.len() as u64).into()),
        ("propagation_ms_p50", report.ms_to_50.unwrap_or(0).into()),
        ("propagation_ms_p99", report.ms_to_99.unwrap_or(0).into()),
        ("propagation_ms_100", report.ms_to_100.unwrap_or(0).into()),
        ("block_to_all_ms", block_to_all_ms.into()),
        ("online_validators", report.online_validators.into()),
        ("delivered_ms_p50", ms(pct(&delivered, 50)).into()),
        ("delivered_ms_p99", ms(d99).into()),
        ("delivered_ms_100", ms(pct(&delivered, 100)).into()),
        ("raw_fanout_ms_p50", ms(pct(&raw, 50)).into()),
        ("raw_fanout_ms_p99", ms(r99).into()),
        ("raw_fanout_ms_100", ms(pct(&raw, 100)).into()),
        ("ratio_p99", ratio(d99 as f64, r99 as f64).into()),
        ("taps_per_s", (taps_connected as u64).into()),
        ("taps_per_s_alone", (taps_alone as u64).into()),
        ("taps_ratio", ratio(taps_connected, taps_alone).into()),
        ("rss_kib", rss.into()),
        ("rss_before_validators_kib", rss_before.into()),
        (
            "rss_per_validator_bytes",
            (rss_connected.saturating_sub(rss_before) * 1024 / u64::from(validators.max(1))).into(),
        ),
        ("connect_s", ((connect_s * 10.0).round() / 10.0).into()),
        (
            "validators_cpu_s",
            ((children_cpu_s * 10.0).round() / 10.0).into(),
        ),
    ])
}

/// Waits (30 s at most) until this process (gateway, broker, back office) is quiet — under
/// 10% of a core over a quarter of a second — so that both fan-outs start from the same
/// state, not while the broker still digests the fleet's connections.
async fn settle() {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let cpu0 = crate::stats::cpu_s();
        tokio::time::sleep(Duration::from_millis(250)).await;
        if crate::stats::cpu_s() - cpu0 < 0.025 {
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

/// The embedded broker on `port` as `tapgate gateway` runs it (the gateway's taps over the
/// in-process link), with the passwords of the gateway, the tap publishers and the validators.
async fn start_broker(port: u16, validators: u32) -> anyhow::Result<TapLink> {
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
    Ok(link)
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

/// The gateway, taking taps over the broker's link and relaying the back office's blocklist:
/// its statistics once it has subscribed.
async fn start_gateway(
    dir: &std::path::Path,
    port: u16,
    link: TapLink,
    base: &str,
    keys: &KeySet,
) -> anyhow::Result<Arc<GatewayStats>> {
    let store = Store::open(&dir.join("gateway"), 1 << 30)?;
    let stats = Arc::new(GatewayStats::default());
    let cfg = GatewayConfig {
        broker: ("127.0.0.1".into(), port),
        mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
        charging: Some((base.to_string(), "tg_gw".into())),
        operator: OPERATOR.into(),
        ..GatewayConfig::default()
    };
    let (keys, st) = (keys.for_role(KeyRole::Gateway, 0)?, stats.clone());
    tokio::spawn(async move {
        if let Err(e) = run_linked(cfg, link, store, keys, st, std::future::pending()).await {
            eprintln!("gateway: {e}");
        }
    });
    wait("the gateway", Duration::from_secs(10), || {
        stats.subscribed.load(Ordering::Acquire)
    })
    .await?;
    Ok(stats)
}

/// The simulated validators: child processes of [`PER_CHILD`] each, reporting on their
/// standard output (`S` subscribed, `R <µs>` the raw fan-out's message arrived, `H <µs>` the
/// block held).
struct Fleet {
    children: Vec<std::process::Child>,
    subscribed: Arc<AtomicU64>,
    raw: Arc<Mutex<Vec<u64>>>,
    held: Arc<Mutex<Vec<u64>>>,
}

impl Fleet {
    fn spawn(validators: u32, port: u16, pk: [u8; 32]) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe()?;
        let mut fleet = Fleet {
            children: Vec::new(),
            subscribed: Arc::new(AtomicU64::new(0)),
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
            let (subscribed, raw, held) = (
                fleet.subscribed.clone(),
                fleet.raw.clone(),
                fleet.held.clone(),
            );
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let stamp = || line[2..].trim().parse::<u64>().unwrap_or(0);
                    match line.as_bytes().first() {
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
        let status = format!("tapgate/v1/{OPERATOR}/devices/{device}/status");
        let mut list = Blocklist::new(OPERATOR);
        let heartbeat = |version: u64| {
            serde_json::json!({"device": device, "online": true, "blocklist_version": version})
                .to_string()
        };
        let mut subscribed = false;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
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
