//! A back office that signs another operator's blocklists (a charging server left at the default
//! operator) would have every validator refuse every update, silently: the gateway relays none
//! of them and keeps its version where it was.

use charging::api::{Auth, Role, TokenEntry};
use gateway::daemon::{run, start_embedded_broker, GatewayConfig, GatewayStats};
use gateway::store::Store;
use purse::keys::{KeySet, Role as KeyRole};
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_operators_blocklist_is_not_relayed() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(15));
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let users = HashMap::from([("gateway".to_string(), "gw-secret".to_string())]);
    start_embedded_broker(format!("127.0.0.1:{mqtt_port}").parse().unwrap(), users);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The charging server signs for operator "default" (its config left unset).
    let mut cfg = charging::server::ServerConfig::from_toml(&format!(
        "data_dir = {:?}\nledger_map_size_bytes = 67108864",
        dir.path().join("charging").to_str().unwrap()
    ))
    .unwrap();
    cfg.tokens = vec![TokenEntry {
        name: "gw".into(),
        role: Role::Gateway,
        sha256: Auth::hash_token("tg_gw"),
    }];
    assert_eq!(cfg.operator, "default");
    let state = charging::server::build(&cfg, Box::new(SoftwareHsm::new(&keys).unwrap())).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let charging_base = format!("http://{}", listener.local_addr().unwrap());
    let st = state.clone();
    tokio::spawn(async move {
        charging::server::serve_on(listener, &cfg, st, std::future::pending()).await
    });
    let uid = [4, 9, 9, 9, 9, 9, 9];
    let ledger = state.loads.ledger().clone();
    tokio::task::spawn_blocking(move || {
        ledger
            .transact(move |l, t| l.set_blocked(t, &uid, true, "lost", 0))
            .unwrap()
    })
    .await
    .unwrap();

    // A listener on the metro blocklist topics, and the metro gateway.
    let mut opts = MqttOptions::new("listener", "127.0.0.1", mqtt_port);
    opts.set_credentials("gateway", "gw-secret");
    let (client, mut ev) = AsyncClient::new(opts, 100);
    client
        .subscribe("tapgate/v1/+/blocklist/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let heard = Arc::new(AtomicU64::new(0));
    let h2 = heard.clone();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    h2.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let stats = Arc::new(GatewayStats::default());
    tokio::spawn(run(
        GatewayConfig {
            broker: ("127.0.0.1".into(), mqtt_port),
            mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
            charging: Some((charging_base, "tg_gw".into())),
            operator: "metro".into(),
            ..GatewayConfig::default()
        },
        Store::open(&dir.path().join("gateway"), 64 << 20).unwrap(),
        keys.for_role(KeyRole::Gateway, 0).unwrap(),
        stats.clone(),
        std::future::pending(),
    ));
    let t0 = Instant::now();
    while !stats.subscribed.load(Ordering::Acquire) {
        assert!(t0.elapsed() < Duration::from_secs(10), "gateway");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The gateway polls the charging server every 100 ms: give it many rounds.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(heard.load(Ordering::Relaxed), 0, "nothing relayed");
    assert_eq!(stats.blocklist_version.load(Ordering::Relaxed), 0);
}
