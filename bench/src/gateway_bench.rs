//! Bench scenario `gateway`: live taps, one signed record per MQTT message at QoS 1, from
//! several validator connections, end to end: published → verified, de-duplicated, durable in
//! LMDB → confirmed back to the validator. The same run measures the raw broker rate (the same
//! messages published and received at QoS 1, no processing) right before and right after the
//! live run (`broker_raw_before_per_s`, `broker_raw_after_per_s`); `broker_raw_per_s` is their
//! mean and `ratio_to_raw` the live rate over it, so one burst or stall of the machine during a
//! single raw pass no longer decides the ratio alone.
//! `--broker mosquitto` runs both against a Mosquitto started on a free port (default: the
//! embedded rumqttd); `--broker nats` against a three-node NATS cluster ([`nats`]).

use crate::stats;
use crate::Figures;
use gateway::daemon::{
    run, run_linked, start_embedded_broker_linked, BrokerUsers, GatewayConfig, GatewayStats,
    TapLink,
};
use gateway::store::Store;
use purse::card::{Card, Personalisation};
use purse::keys::{KeySet, Role};
use purse::sam::{Sam, SoftwareHsm, SoftwareSam};
use purse::tap::{TapMeta, TapRecord};
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod nats;

pub(crate) const VALIDATORS: usize = 8;

/// Mosquitto on `port` with passwords for `users`, no ACL, queues deep enough for the backlog.
fn start_mosquitto(
    dir: &std::path::Path,
    port: u16,
    users: &HashMap<String, String>,
) -> anyhow::Result<tapgate_testkit::mosquitto::Mosquitto> {
    let mut conf = tapgate_testkit::mosquitto::MosquittoConfig::on_port(port)
        .line("max_queued_messages 1000000")
        .line("max_inflight_messages 1000")
        .no_log();
    for (u, p) in users {
        conf = conf.user(u, p);
    }
    conf.try_start(dir).map_err(|e| anyhow::anyhow!(e))
}

fn rss_peak_kib() -> u64 {
    crate::stats::status_kib("VmHWM:")
}

fn cpu_s() -> f64 {
    crate::stats::cpu_s()
}

/// Publishes `records[vi]` from VALIDATORS clients at QoS 1 (client `vi` on
/// `ports[vi % ports.len()]`) and waits until `done` reports all.
pub(crate) async fn publish_all(
    ports: &[u16],
    credentials: &[(String, String)],
    records: &[Vec<Vec<u8>>],
    topic_for: impl Fn(usize) -> String,
    confirm_topic_for: Option<&(dyn Fn(usize) -> String + Sync)>,
    received: Arc<AtomicU64>,
    expect: u64,
) -> anyhow::Result<Duration> {
    let mut clients = Vec::new();
    // The event loops, ended when the run is over: a rumqttc event loop holds a sender of its
    // own request channel, so dropping the clients never ends it, and a loop left running
    // keeps its device's session — the next run's client of the same device would take it
    // over and the two would take it from each other, reconnecting, for ever.
    let mut loops = Vec::new();
    for (vi, (id, pw)) in credentials.iter().enumerate() {
        let mut o = MqttOptions::new(
            format!("bench-validator-{id}-{}", confirm_topic_for.is_some()),
            "127.0.0.1",
            ports[vi % ports.len()],
        );
        o.set_credentials(id, pw.clone())
            .set_inflight(1000)
            .set_max_packet_size(1 << 16, 1 << 16);
        let (c, mut ev) = AsyncClient::new(o, 20_000);
        let mut net = ev.network_options();
        net.set_tcp_nodelay(true); // as the validator daemon does
        ev.set_network_options(net);
        let subscribed = Arc::new(tokio::sync::Notify::new());
        let s2 = subscribed.clone();
        let rcv = received.clone();
        let counting = confirm_topic_for.is_some();
        loops.push(tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => s2.notify_one(),
                    Ok(Event::Incoming(Packet::Publish(p))) if counting => {
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                            let n = v["seqs"].as_array().map(Vec::len).unwrap_or(0) as u64;
                            rcv.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("bench MQTT client: {e}; reconnecting");
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                }
            }
        }));
        if let Some(ct) = confirm_topic_for {
            c.subscribe(ct(vi), QoS::AtLeastOnce).await?;
            tokio::time::timeout(Duration::from_secs(10), subscribed.notified()).await?;
        }
        clients.push(c);
    }
    let start = Instant::now();
    crate::mqtt::publish_lanes(
        clients
            .iter()
            .enumerate()
            .map(|(vi, c)| (c.clone(), topic_for(vi), records[vi].clone()))
            .collect(),
    )
    .await?;
    while received.load(Ordering::Relaxed) < expect {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "timed out: {} of {expect}",
            received.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = start.elapsed();
    for l in &loops {
        l.abort();
    }
    Ok(took)
}

pub fn run_scenario(
    n: Option<u64>,
    broker: &str,
    taps_per_message: usize,
) -> anyhow::Result<Figures> {
    let taps_per_message = taps_per_message.clamp(1, 1_000);
    if broker == "nats" {
        return nats::run(n, taps_per_message);
    }
    let dir = tempfile::tempdir()?;
    let Taps {
        keys,
        records,
        total,
        messages,
    } = taps(n, taps_per_message)?;
    let port = tapgate_testkit::free_port();
    // With the embedded broker the gateway takes taps over its in-process link, as
    // `tapgate gateway` does (TAPGATE_BENCH_INGEST_CONNECTIONS > 0 measures that many MQTT
    // connections to it instead).
    let ingest_connections: usize = std::env::var("TAPGATE_BENCH_INGEST_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (mosq, link) = start_broker(dir.path(), port, broker, ingest_connections)?;
    // A broker of its own process (Mosquitto): its CPU and its read calls (each a wake-up on
    // a socket: what its clients' packets cost it) per phase, beside this process's.
    let broker_cpu = || {
        mosq.as_ref().map_or(BrokerUse::default(), |m| BrokerUse {
            cpu_s: stats::process_cpu_s(m.pid()),
            reads: stats::process_read_calls(m.pid()) as f64,
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // 1. Raw broker rate: a subscriber counts the same messages at QoS 1, no processing.
    let raw_round = |round: usize| -> anyhow::Result<(f64, f64, BrokerUse)> {
        let (cpu0, broker0) = (cpu_s(), broker_cpu());
        let took = rt.block_on(raw_run(&[port], &records, messages, round))?;
        Ok((
            total as f64 / took.as_secs_f64(),
            cpu_s() - cpu0,
            broker_cpu() - broker0,
        ))
    };
    let (raw_before, raw_cpu_before, raw_broker_before) = raw_round(0)?;

    // 2. End to end through the gateway.
    let store = Store::open(&dir.path().join("gw"), 4 << 30)?;
    let stats = Arc::new(GatewayStats::default());
    let cfg = GatewayConfig {
        broker: ("127.0.0.1".into(), port),
        mqtt_credentials: Some(("gateway".into(), "gwpw".into())),
        ingest_connections: ingest_connections.max(1),
        operator: "bench".into(),
        ..GatewayConfig::default()
    };
    let gw_keys = keys.for_role(Role::Gateway, 0)?;
    let (cpu0, broker0) = (cpu_s(), broker_cpu());
    let (e2e, confirmed) = rt.block_on(async {
        spawn_gateway(cfg, link, store, gw_keys, stats.clone());
        end_to_end(&[port], &records, &stats, total).await
    })?;
    let (cpu, broker_cpu_live) = (cpu_s() - cpu0, broker_cpu() - broker0);
    // 3. The raw rate again, right after (the gateway idle: it takes no `raw` taps).
    let (raw_after, raw_cpu_after, raw_broker_after) = raw_round(1)?;
    let run = Run {
        broker,
        total,
        taps_per_message,
        e2e_rate: total as f64 / e2e.as_secs_f64(),
        raw_rates: (raw_before, raw_after),
        confirmed,
        cpu,
        raw_cpu: (raw_cpu_before + raw_cpu_after) / 2.0,
        broker_cpu: mosq.is_some().then_some((
            broker_cpu_live,
            (raw_broker_before + raw_broker_after).half(),
        )),
    };
    Ok(report(&run, &stats))
}

/// A run's taps: the key set, each validator's messages, how many taps and messages.
struct Taps {
    keys: KeySet,
    records: Vec<Vec<Vec<u8>>>,
    total: u64,
    messages: u64,
}

/// `n` taps (default 20 000) over the validators, `taps_per_message` in each message.
fn taps(n: Option<u64>, taps_per_message: usize) -> anyhow::Result<Taps> {
    let per = n.unwrap_or(20_000).div_ceil(VALIDATORS as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let keys = KeySet::generate(&mut rng);
    let records = signed_taps(&keys, &mut rng, per)?;
    // A validator back from an outage drains its outbox several taps per message.
    let records: Vec<Vec<Vec<u8>>> = records
        .into_iter()
        .map(|v| v.chunks(taps_per_message).map(|c| c.concat()).collect())
        .collect();
    let messages = records.iter().map(Vec::len).sum::<usize>() as u64;
    Ok(Taps {
        keys,
        records,
        total: per * VALIDATORS as u64,
        messages,
    })
}

/// Real taps, `per` a validator: debits on emulated cards, signed by each validator's SAM.
fn signed_taps(
    keys: &KeySet,
    rng: &mut rand::rngs::StdRng,
    per: u64,
) -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
    signed_taps_of(keys, rng, per, 1000, "bench")
}

/// [`signed_taps`] of devices `first`… (each on a card of its own) for `operator`.
pub(crate) fn signed_taps_of(
    keys: &KeySet,
    rng: &mut rand::rngs::StdRng,
    per: u64,
    first: u32,
    operator: &str,
) -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
    let hsm = SoftwareHsm::new(keys)?;
    let mut records = Vec::new();
    for vi in 0..VALIDATORS {
        let device = first + vi as u32;
        let mut sam = SoftwareSam::validator(keys, device)?;
        let uid = [
            4,
            vi as u8,
            9,
            9,
            9,
            9,
            9 ^ (first.saturating_sub(1000) / 100) as u8,
        ];
        let mut p = Personalisation::transit(uid, i32::MAX / 2);
        p.upper_limit_minor = i32::MAX;
        let mut card = Card::personalise(&p, hsm.card_keys(&uid, 1)?);
        let mut crng = rand::rngs::StdRng::seed_from_u64(vi as u64);
        let mut v = Vec::with_capacity(per as usize);
        for seq in 1..=per {
            let mut reader = EmulatedReader {
                card: &mut card,
                rng: &mut crng,
            };
            let Outcome::Committed { receipt, .. } =
                txn::debit(&mut reader, &mut sam, &mut *rng, |_| Decision::Apply {
                    amount_minor: 125,
                    record: None,
                })?
            else {
                anyhow::bail!("refused")
            };
            let t = TapRecord::accepted(
                &receipt,
                TapMeta {
                    device_id: device,
                    device_seq: seq,
                    ..Default::default()
                },
            );
            v.push(t.sign_with(operator, |b| sam.device_mac(b)).to_vec());
        }
        records.push(v);
    }
    Ok(records)
}

/// The broker on `port`, Mosquitto or the embedded one, waited for: Mosquitto's guard, or
/// the embedded broker's in-process link when the gateway takes taps over it.
fn start_broker(
    dir: &std::path::Path,
    port: u16,
    broker: &str,
    ingest_connections: usize,
) -> anyhow::Result<(
    Option<tapgate_testkit::mosquitto::Mosquitto>,
    Option<TapLink>,
)> {
    // Devices 1000… send the taps, devices 2000… the raw run's messages (as their own taps
    // under operator "raw", which the gateway does not take): both pass the embedded broker's
    // ACL front, as live taps do.
    let mut users: HashMap<String, String> = (0..VALIDATORS)
        .flat_map(|vi| [1000, 2000].map(|d| ((d + vi).to_string(), format!("pw{vi}"))))
        .collect();
    users.insert("gateway".into(), "gwpw".into());
    users.insert("raw".into(), "rawpw".into());
    let mut broker_users = BrokerUsers::from(users.clone());
    broker_users.add_gateway("raw", "rawpw");
    let started = match broker {
        "mosquitto" => (Some(start_mosquitto(dir, port, &users)?), None),
        _ => {
            let (_, link) = start_embedded_broker_linked(
                format!("127.0.0.1:{port}").parse()?,
                broker_users,
                None,
                "bench",
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            (None, (ingest_connections == 0).then_some(link))
        }
    };
    let waited = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(10),
            "broker did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(started)
}

/// The MQTT credentials of validators `first`, `first + 1`, ….
pub(crate) fn credentials(first: usize) -> Vec<(String, String)> {
    (0..VALIDATORS)
        .map(|vi| ((first + vi).to_string(), format!("pw{vi}")))
        .collect()
}

/// The raw run: a subscriber (on the first of `ports`) counts the messages at QoS 1 while
/// devices 2000… publish them; the time they took.
async fn raw_run(
    ports: &[u16],
    records: &[Vec<Vec<u8>>],
    messages: u64,
    round: usize,
) -> anyhow::Result<Duration> {
    raw_run_as(ports, ("raw", "rawpw"), records, messages, round).await
}

/// [`raw_run`] with the subscriber's credentials.
async fn raw_run_as(
    ports: &[u16],
    subscriber: (&str, &str),
    records: &[Vec<Vec<u8>>],
    messages: u64,
    round: usize,
) -> anyhow::Result<Duration> {
    let received = Arc::new(AtomicU64::new(0));
    // Each round its own subscriber id (a reused one would take the last round's session).
    let mut o = MqttOptions::new(format!("bench-raw-{round}"), "127.0.0.1", ports[0]);
    o.set_credentials(subscriber.0, subscriber.1)
        .set_inflight(1000)
        .set_max_packet_size(1 << 16, 1 << 16);
    let (sub, mut ev) = AsyncClient::new(o, 20_000);
    sub.subscribe("tapgate/v1/raw/taps/+", QoS::AtLeastOnce)
        .await?;
    let rcv = received.clone();
    let ready = Arc::new(tokio::sync::Notify::new());
    let r2 = ready.clone();
    let subscriber = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => r2.notify_one(),
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    rcv.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bench MQTT client: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready.notified()).await?;
    let took = publish_all(
        ports,
        &credentials(2000),
        records,
        |vi| format!("tapgate/v1/raw/taps/{}", 2000 + vi),
        None,
        received,
        messages,
    )
    .await;
    subscriber.abort();
    took
}

/// The gateway on the runtime: over the broker's in-process link when there is one, else
/// over MQTT connections.
fn spawn_gateway(
    cfg: GatewayConfig,
    link: Option<TapLink>,
    store: Store,
    gw_keys: KeySet,
    stats: Arc<GatewayStats>,
) {
    match link {
        Some(link) => tokio::spawn(async move {
            if let Err(e) =
                run_linked(cfg, link, store, gw_keys, stats, std::future::pending()).await
            {
                eprintln!("gateway: {e}");
            }
        }),
        None => tokio::spawn(run(cfg, store, gw_keys, stats, std::future::pending())),
    };
}

/// Once the gateway has subscribed, devices 1000… publish the taps and count the gateway's
/// confirmations; the time until all `total` were confirmed, and how many were.
async fn end_to_end(
    ports: &[u16],
    records: &[Vec<Vec<u8>>],
    stats: &GatewayStats,
    total: u64,
) -> anyhow::Result<(Duration, u64)> {
    let waited = Instant::now();
    while !stats.subscribed.load(Ordering::Acquire) {
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(10),
            "gateway did not subscribe"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let received = Arc::new(AtomicU64::new(0));
    let ct = |vi: usize| format!("tapgate/v1/bench/devices/{}/confirm", 1000 + vi);
    let took = publish_all(
        ports,
        &credentials(1000),
        records,
        |vi| format!("tapgate/v1/bench/taps/{}", 1000 + vi),
        Some(&ct),
        received.clone(),
        total,
    )
    .await?;
    Ok((took, received.load(Ordering::Relaxed)))
}

/// What a run measured.
struct Run<'a> {
    broker: &'a str,
    total: u64,
    taps_per_message: usize,
    e2e_rate: f64,
    /// The raw rate right before and right after the live run.
    raw_rates: (f64, f64),
    confirmed: u64,
    /// This process's CPU (s) over the end-to-end run and over a raw run (the two's mean).
    cpu: f64,
    raw_cpu: f64,
    /// A broker process's own use (Mosquitto) over the end-to-end run and over a raw run.
    broker_cpu: Option<(BrokerUse, BrokerUse)>,
}

/// What a broker process used: CPU (s) and read calls.
#[derive(Clone, Copy, Default)]
struct BrokerUse {
    cpu_s: f64,
    reads: f64,
}

impl std::ops::Sub for BrokerUse {
    type Output = BrokerUse;
    fn sub(self, o: BrokerUse) -> BrokerUse {
        BrokerUse {
            cpu_s: self.cpu_s - o.cpu_s,
            reads: self.reads - o.reads,
        }
    }
}

impl std::ops::Add for BrokerUse {
    type Output = BrokerUse;
    fn add(self, o: BrokerUse) -> BrokerUse {
        BrokerUse {
            cpu_s: self.cpu_s + o.cpu_s,
            reads: self.reads + o.reads,
        }
    }
}

impl BrokerUse {
    fn half(self) -> BrokerUse {
        BrokerUse {
            cpu_s: self.cpu_s / 2.0,
            reads: self.reads / 2.0,
        }
    }
}

/// The figures, in print order (names are a contract: docs/benchmarks.md).
fn report(r: &Run, stats: &GatewayStats) -> Figures {
    let total = r.total;
    let stored = stats.stored.load(Ordering::Relaxed);
    let raw_rate = (r.raw_rates.0 + r.raw_rates.1) / 2.0;
    let mut figures: Figures = vec![
        ("broker", r.broker.into()),
        ("taps", total.into()),
        ("validators", (VALIDATORS as u64).into()),
        ("taps_per_message", (r.taps_per_message as u64).into()),
        ("taps_per_s", (r.e2e_rate as u64).into()),
        ("broker_raw_per_s", (raw_rate as u64).into()),
        ("broker_raw_before_per_s", (r.raw_rates.0 as u64).into()),
        ("broker_raw_after_per_s", (r.raw_rates.1 as u64).into()),
        (
            "ratio_to_raw",
            ((r.e2e_rate / raw_rate * 100.0).round() / 100.0).into(),
        ),
        ("lost", total.saturating_sub(stored).into()),
        (
            "duplicated",
            stats.duplicates.load(Ordering::Relaxed).into(),
        ),
        ("confirmations", r.confirmed.into()),
        (
            "cpu_us_per_tap",
            ((r.cpu * 1e6 / total as f64) as u64).into(),
        ),
        // The same process's CPU for the raw run (publishers, subscriber and, when embedded,
        // the broker): what the gateway adds is the difference.
        (
            "raw_cpu_us_per_tap",
            ((r.raw_cpu * 1e6 / total as f64) as u64).into(),
        ),
        ("rss_peak_kib", rss_peak_kib().into()),
    ];
    // A broker of its own (Mosquitto, single-threaded): its CPU and read calls per tap, live
    // and raw; at one core's worth per tap rate it is the limit of both.
    if let Some((live, raw)) = r.broker_cpu {
        let per_tap = |x: f64| ((x / total as f64 * 100.0).round() / 100.0).into();
        figures.push(("broker_cpu_us_per_tap", per_tap(live.cpu_s * 1e6)));
        figures.push(("raw_broker_cpu_us_per_tap", per_tap(raw.cpu_s * 1e6)));
        figures.push(("broker_reads_per_tap", per_tap(live.reads)));
        figures.push(("raw_broker_reads_per_tap", per_tap(raw.reads)));
    }
    figures
}
