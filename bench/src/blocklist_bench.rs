//! Bench scenario `blocklist`: a card blocked at the back office, relayed by the gateway as a
//! signed delta over MQTT (the embedded broker) to `n` simulated validators (default 1,000).
//! Each validator verifies and applies the delta and reports the version it holds in its
//! heartbeat; the gateway's propagation tracker measures how long until 50%, 99% and 100% of
//! the online validators held the block (`propagation_ms_p50`, `propagation_ms_p99`,
//! `propagation_ms_100`), counted from the gateway's publication. `block_to_all_ms` is the
//! whole path from the back office's API call to the last validator holding the block.

use crate::Figures;
use charging::server::{build, serve_on, ServerConfig};
use gateway::daemon::{run, start_embedded_broker, GatewayConfig, GatewayStats};
use gateway::propagation::Report;
use gateway::store::Store;
use purse::blocklist::Blocklist;
use purse::keys::{KeySet, Role as KeyRole};
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapgate_http::auth::{Auth, Role, TokenEntry};

async fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while !done() {
        anyhow::ensure!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub fn run_scenario(n: Option<u64>) -> anyhow::Result<Figures> {
    let validators = n.unwrap_or(1_000) as u32;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(scenario(validators))
}

async fn scenario(validators: u32) -> anyhow::Result<Figures> {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(21));
    let dir = tempfile::tempdir()?;
    let port = tapgate_testkit::free_port();
    start_broker(port, validators).await?;
    let base = start_charging(dir.path(), &keys)?;
    let stats = start_gateway(dir.path(), port, &base, &keys).await?;
    let (all_hold, subscribed) = spawn_validators(validators, port, keys.verifying_key);
    wait(
        "the validators to subscribe",
        Duration::from_secs(60),
        || subscribed.load(Ordering::Relaxed) >= u64::from(validators),
    )
    .await?;
    wait(
        "the gateway to see every validator online",
        Duration::from_secs(60),
        || stats.propagation.lock().map(|p| p.online()).unwrap_or(0) >= validators as usize,
    )
    .await?;

    // Block a card; measure until every validator holds the block.
    let t0 = Instant::now();
    block_card(&base).await?;
    wait(
        "every validator to hold the block",
        Duration::from_secs(120),
        || all_hold.load(Ordering::Relaxed) >= u64::from(validators),
    )
    .await?;
    let block_to_all_ms = t0.elapsed().as_millis() as u64;
    let report = propagation_report(&stats).await?;
    Ok(vec![
        ("validators", validators.into()),
        ("propagation_ms_p50", report.ms_to_50.unwrap_or(0).into()),
        ("propagation_ms_p99", report.ms_to_99.unwrap_or(0).into()),
        ("propagation_ms_100", report.ms_to_100.unwrap_or(0).into()),
        ("block_to_all_ms", block_to_all_ms.into()),
        ("online_validators", report.online_validators.into()),
    ])
}

/// The embedded broker on `port`, with the gateway's and `validators` validators' passwords.
async fn start_broker(port: u16, validators: u32) -> anyhow::Result<()> {
    let mut users = HashMap::from([("gateway".to_string(), "gw-secret".to_string())]);
    for v in 0..validators {
        users.insert(format!("{}", 2000 + v), "v-secret".to_string());
    }
    start_embedded_broker(format!("127.0.0.1:{port}").parse()?, users);
    wait("the broker", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
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
    cfg.operator = "metro".into();
    let state = build(&cfg, Box::new(SoftwareHsm::new(keys)?))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { serve_on(listener, &cfg, state, std::future::pending()).await });
    Ok(base)
}

/// The gateway, relaying the back office's blocklist: its statistics once it has subscribed.
async fn start_gateway(
    dir: &std::path::Path,
    port: u16,
    base: &str,
    keys: &KeySet,
) -> anyhow::Result<Arc<GatewayStats>> {
    let store = Store::open(&dir.join("gateway"), 64 << 20)?;
    let stats = Arc::new(GatewayStats::default());
    tokio::spawn(run(
        GatewayConfig {
            broker: ("127.0.0.1".into(), port),
            mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
            charging: Some((base.to_string(), "tg_gw".into())),
            operator: "metro".into(),
            ..GatewayConfig::default()
        },
        store,
        keys.for_role(KeyRole::Gateway, 0)?,
        stats.clone(),
        std::future::pending(),
    ));
    wait("the gateway", Duration::from_secs(10), || {
        stats.subscribed.load(Ordering::Acquire)
    })
    .await?;
    Ok(stats)
}

/// The validators 2000…: each verifies and applies what arrives and reports the version it
/// holds. Counters of the validators holding a block, and of those subscribed.
fn spawn_validators(validators: u32, port: u16, pk: [u8; 32]) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
    let all_hold = Arc::new(AtomicU64::new(0));
    let subscribed = Arc::new(AtomicU64::new(0));
    for v in 0..validators {
        let (all_hold, subscribed) = (all_hold.clone(), subscribed.clone());
        tokio::spawn(validator(2000 + v, port, pk, all_hold, subscribed));
    }
    (all_hold, subscribed)
}

/// One simulated validator's MQTT loop: subscribe to the blocklist, heartbeat the version
/// held at subscription and right after each change (validators also send one on their
/// regular interval).
async fn validator(
    device: u32,
    port: u16,
    pk: [u8; 32],
    all_hold: Arc<AtomicU64>,
    subscribed: Arc<AtomicU64>,
) {
    let mut o = MqttOptions::new(format!("sim-{device}"), "127.0.0.1", port);
    o.set_credentials(device.to_string(), "v-secret")
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut ev) = AsyncClient::new(o, 16);
    let status = format!("tapgate/v1/metro/devices/{device}/status");
    let mut list = Blocklist::new("metro");
    let heartbeat = |version: u64| {
        serde_json::json!({"device": device, "online": true, "blocklist_version": version})
            .to_string()
    };
    loop {
        match ev.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client
                    .subscribe("tapgate/v1/metro/blocklist/#", QoS::AtLeastOnce)
                    .await;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subscribed.fetch_add(1, Ordering::Relaxed);
                let hb = heartbeat(list.version());
                let _ = client
                    .publish(status.clone(), QoS::AtLeastOnce, true, hb)
                    .await;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let before = list.version();
                if let Ok(v) = list.apply(&p.payload, &pk) {
                    if v > before {
                        if before == 0 {
                            all_hold.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = client
                            .publish(status.clone(), QoS::AtLeastOnce, true, heartbeat(v))
                            .await;
                    }
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
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
