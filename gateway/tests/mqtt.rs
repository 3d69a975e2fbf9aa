//! The gateway daemon end to end on the embedded broker: a validator publishes signed taps over
//! MQTT (QoS 1), the gateway stores them durably, confirms them, and forwards them to the real
//! charging server, which books each once. Duplicates and forgeries never reach clearing; a
//! client with a wrong password is refused by the broker.

use charging::api::{Auth, Role, TokenEntry};
use gateway::daemon::{run, start_embedded_broker, GatewayConfig, GatewayStats};
use gateway::store::Store;
use purse::card::{Card, Personalisation};
use purse::keys::{KeySet, Role as KeyRole};
use purse::sam::{Sam, SoftwareHsm, SoftwareSam};
use purse::tap::{TapMeta, TapRecord};
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taps_over_mqtt_are_stored_confirmed_and_cleared_once() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(5));
    let dir = tempfile::tempdir().unwrap();

    // The broker, with a password per client.
    let mqtt_port = free_port();
    let users = HashMap::from([
        ("gateway".to_string(), "gw-secret".to_string()),
        ("1001".to_string(), "dev-secret".to_string()),
        ("1002".to_string(), "dev2-secret".to_string()),
    ]);
    start_embedded_broker(format!("127.0.0.1:{mqtt_port}").parse().unwrap(), users);
    wait_for("the broker", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_ok()
    })
    .await;

    // The charging server.
    let mut cfg = charging::server::ServerConfig::from_toml(&format!(
        "data_dir = {:?}\nledger_map_size_bytes = 67108864",
        dir.path().join("charging").to_str().unwrap()
    ))
    .unwrap();
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
    let state = charging::server::build(&cfg, Box::new(SoftwareHsm::new(&keys).unwrap())).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let charging_base = format!("http://{}", listener.local_addr().unwrap());
    let charging_url = charging_base.clone();
    let st = state.clone();
    tokio::spawn(async move {
        charging::server::serve_on(listener, &cfg, st, std::future::pending()).await
    });
    let uid = [4, 3, 3, 3, 3, 3, 3];
    state.loads.register_card(&uid, 10_000, 0).unwrap();

    // The gateway.
    let store = Store::open(&dir.path().join("gateway"), 64 << 20).unwrap();
    let stats = Arc::new(GatewayStats::default());
    let gw_cfg = GatewayConfig {
        broker: ("127.0.0.1".into(), mqtt_port),
        mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
        charging: Some((charging_base, "tg_gw".into())),
        operator: "metro".into(),
        ..GatewayConfig::default()
    };
    let gw_keys = keys.for_role(KeyRole::Gateway, 0).unwrap();
    tokio::spawn(run(
        gw_cfg,
        store.clone(),
        gw_keys,
        stats.clone(),
        std::future::pending(),
    ));

    wait_for(
        "the gateway's subscription",
        Duration::from_secs(10),
        || stats.subscribed.load(Ordering::Acquire),
    )
    .await;

    // A validator: real debits, signed tap records, published at QoS 1.
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let mut card = Card::personalise(
        &Personalisation::transit(uid, 10_000),
        hsm.card_keys(&uid, 1).unwrap(),
    );
    let mut records = Vec::new();
    for i in 0..20u64 {
        let mut reader = EmulatedReader {
            card: &mut card,
            rng: StdRng::seed_from_u64(i),
        };
        let Outcome::Committed { receipt, .. } =
            txn::debit(&mut reader, &mut sam, &mut StdRng::seed_from_u64(9), |_| {
                Decision::Apply {
                    amount_minor: 150,
                    record: None,
                }
            })
            .unwrap()
        else {
            panic!()
        };
        let t = TapRecord::accepted(
            &receipt,
            TapMeta {
                device_id: 1001,
                device_seq: i + 1,
                ..Default::default()
            },
        );
        records.push(t.sign_with("metro", |b| sam.device_mac(b)).to_vec());
    }
    let mut opts = MqttOptions::new("dev-1001", "127.0.0.1", mqtt_port);
    opts.set_credentials("1001", "dev-secret")
        .set_clean_session(false);
    let (client, mut events) = AsyncClient::new(opts, 100);
    client
        .subscribe("tapgate/v1/metro/devices/1001/confirm", QoS::AtLeastOnce)
        .await
        .unwrap();
    let confirmed = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let c2 = confirmed.clone();
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let s2 = subscribed.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => s2.notify_one(),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    for s in v["seqs"].as_array().unwrap() {
                        c2.lock().unwrap().insert(s.as_u64().unwrap());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
        .await
        .expect("subscribed");
    for r in &records {
        client
            .publish(
                "tapgate/v1/metro/taps/1001",
                QoS::AtLeastOnce,
                false,
                r.clone(),
            )
            .await
            .unwrap();
    }
    // A redelivered tap and a forged one.
    client
        .publish(
            "tapgate/v1/metro/taps/1001",
            QoS::AtLeastOnce,
            false,
            records[3].clone(),
        )
        .await
        .unwrap();
    let mut forged = records[4].clone();
    forged[16] ^= 0x40;
    client
        .publish(
            "tapgate/v1/metro/taps/1001",
            QoS::AtLeastOnce,
            false,
            forged,
        )
        .await
        .unwrap();

    wait_for("all 20 confirmations", Duration::from_secs(20), || {
        confirmed.lock().unwrap().len() == 20
    })
    .await;
    let ledger = state.loads.ledger().clone();
    wait_for("clearing of all 20 taps", Duration::from_secs(20), || {
        let r = ledger.read().unwrap();
        ledger.balance(&r, "operator:metro").unwrap() == 20 * 150
    })
    .await;
    assert_eq!(stats.stored.load(Ordering::Relaxed), 20);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(stats.quarantined.load(Ordering::Relaxed), 1);
    assert!(store.quarantined(10).unwrap()[0]
        .reason
        .contains("device MAC"));
    wait_for("the outbox to drain", Duration::from_secs(10), || {
        store.outbox_len().unwrap() == 0
    })
    .await;
    assert_eq!(charging::reconcile::reconcile(&ledger).unwrap().balanced, 1);

    // The gateway's HTTP API (operator role): devices and gaps, aggregates, the TIDES export.
    let api_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", api_listener.local_addr().unwrap());
    let api_state = gateway::api::ApiState {
        store: store.clone(),
        keys: keys.for_role(KeyRole::Gateway, 0).unwrap(),
        stats: stats.clone(),
        auth: tapgate_http::auth::Auth::new(&[
            tapgate_http::auth::TokenEntry {
                name: "ops".into(),
                role: tapgate_http::auth::Role::Operator,
                sha256: tapgate_http::auth::Auth::hash_token("tg_ops"),
            },
            tapgate_http::auth::TokenEntry {
                name: "prometheus".into(),
                role: tapgate_http::auth::Role::Metrics,
                sha256: tapgate_http::auth::Auth::hash_token("tg_scrape"),
            },
        ])
        .unwrap(),
        currency: ("USD".into(), 2),
        metrics_public: false,
        operator: "metro".into(),
    };
    tokio::spawn(tapgate_http::serve::serve_router(
        "gateway-api",
        api_listener,
        None,
        gateway::api::router(api_state),
        std::future::pending(),
    ));
    let get = move |path: &str, token: Option<&str>| {
        let mut r = ureq::get(&format!("{api}{path}"));
        if let Some(t) = token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        match r.call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        }
    };
    let (code, body) = tokio::task::spawn_blocking({
        let get = get.clone();
        move || get("/v1/devices/1001", Some("tg_ops"))
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["taps"].as_u64(), v["highest_seq"].as_u64()),
        (Some(20), Some(20))
    );
    let (code, _) = tokio::task::spawn_blocking({
        let get = get.clone();
        move || get("/v1/devices/1001", None)
    })
    .await
    .unwrap();
    assert_eq!(code, 401);
    let (_, body) = tokio::task::spawn_blocking({
        let get = get.clone();
        move || get("/v1/aggregates?prefix=device:", Some("tg_ops"))
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["aggregates"][0]["key"], "device:1001");
    assert_eq!(v["aggregates"][0]["amount_minor"], 20 * 150);
    let (code, csv) = tokio::task::spawn_blocking({
        let get = get.clone();
        move || get("/v1/export/tides/fare_transactions.csv", Some("tg_ops"))
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        csv.starts_with(
            "transaction_id,service_date,event_timestamp,amount,currency_type,fare_action"
        ),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 21, "a header and 20 transactions");
    assert!(csv.contains("1001-1,1970-01-01,1970-01-01T00:00:00Z,1.50,USD,Enter,1001,0,1,Smart card or ticket,,04030303030303,98.50"), "{csv}");
    // /metrics is not public: no token is 401, a scraper's token may read it but nothing else.
    let (code, _) = tokio::task::spawn_blocking({
        let get = get.clone();
        move || get("/metrics", None)
    })
    .await
    .unwrap();
    assert_eq!(code, 401, "metrics without a token");
    let (code, _) = tokio::task::spawn_blocking({
        let get = get.clone();
        move || get("/v1/devices/1001", Some("tg_scrape"))
    })
    .await
    .unwrap();
    assert_eq!(code, 403, "a metrics token reads no device");
    let (code, metrics) = tokio::task::spawn_blocking({
        let get = get.clone();
        move || get("/metrics", Some("tg_scrape"))
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.contains("tapgate_gateway_taps_stored_total 20"),
        "{metrics}"
    );

    // A lost card blocked at the back office reaches a validator as a signed delta (and a
    // retained snapshot for late joiners) within a bounded time.
    let mut vopts = MqttOptions::new("dev-1001-downlink", "127.0.0.1", mqtt_port);
    vopts
        .set_credentials("1002", "dev2-secret")
        .set_max_packet_size(1 << 20, 16 << 20);
    let (vclient, mut vev) = AsyncClient::new(vopts, 100);
    vclient
        .subscribe("tapgate/v1/metro/blocklist/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let list = Arc::new(std::sync::Mutex::new(purse::blocklist::Blocklist::new(
        "metro",
    )));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (l2, r2, pk) = (list.clone(), refused.clone(), keys.verifying_key);
    let v_subscribed = Arc::new(tokio::sync::Notify::new());
    let vs2 = v_subscribed.clone();
    tokio::spawn(async move {
        loop {
            match vev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => vs2.notify_one(),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if l2.lock().unwrap().apply(&p.payload, &pk).is_err() {
                        r2.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), v_subscribed.notified())
        .await
        .expect("subscribed");
    let blocked_at = Instant::now();
    let block_uid = hex::encode_upper([4, 8, 8, 8, 8, 8, 8]);
    tokio::task::spawn_blocking(move || {
        ureq::post(&format!("{charging_url}/v1/cards/{block_uid}/block"))
            .set("Authorization", "Bearer tg_ops")
            .send_json(serde_json::json!({"reason": "stolen"}))
            .unwrap();
    })
    .await
    .unwrap();
    wait_for(
        "the block to reach the validator",
        Duration::from_secs(20),
        || list.lock().unwrap().is_blocked(&[4, 8, 8, 8, 8, 8, 8]),
    )
    .await;
    let propagation = blocked_at.elapsed();
    assert!(propagation < Duration::from_secs(20));
    assert_eq!(list.lock().unwrap().version(), 1);
    assert_eq!(stats.blocklist_version.load(Ordering::Relaxed), 1);

    // The validator reports the version it holds in its heartbeat; the gateway measures how
    // long until the online validators held the block.
    vclient
        .publish(
            "tapgate/v1/metro/devices/1002/status",
            QoS::AtLeastOnce,
            true,
            r#"{"device":1002,"online":true,"blocklist_version":1,"outbox_depth":0}"#,
        )
        .await
        .unwrap();
    wait_for(
        "the heartbeat to be counted",
        Duration::from_secs(10),
        || {
            stats
                .propagation
                .lock()
                .unwrap()
                .report(1)
                .is_some_and(|r| r.holding == 1)
        },
    )
    .await;
    let (code, v) = tokio::task::spawn_blocking({
        let get = get.clone();
        move || get("/v1/blocklist/propagation?version=1", Some("tg_ops"))
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{v}");
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["online_validators"], 1);
    assert!(v["ms_to_100"].as_u64().is_some(), "{v}");
    let (code, _) = tokio::task::spawn_blocking({
        let get = get.clone();
        move || get("/v1/blocklist/propagation?version=1", None)
    })
    .await
    .unwrap();
    assert_eq!(code, 401, "the propagation report needs an operator");

    // The broker refuses a wrong password.
    let mut bad = MqttOptions::new("intruder", "127.0.0.1", mqtt_port);
    bad.set_credentials("1001", "guess");
    let (_c, mut ev) = AsyncClient::new(bad, 10);
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return a.code != rumqttc::ConnectReturnCode::Success
                }
                Err(_) => return true,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(refused, "a wrong password must not connect");
}

fn test_tap(keys: &KeySet, device: u32, seq: u64) -> Vec<u8> {
    let r = purse::receipt::CommitReceipt::for_tests(
        [4, 5, 5, 5, 5, 5, seq as u8],
        seq as u32,
        [1; 8],
        purse::receipt::TxKind::Debit,
        100,
        1_000,
    );
    TapRecord::accepted(
        &r,
        TapMeta {
            device_id: device,
            device_seq: seq,
            ..Default::default()
        },
    )
    .sign("metro", &keys.device_key(device).unwrap())
    .to_vec()
}

/// `tapgate gateway` with the embedded broker takes taps over the in-process link (no TCP, no
/// in-flight cap): every tap stored once and confirmed to its validator, a forgery quarantined,
/// another operator's taps left alone, and a burst far beyond the gateway's queues taken whole
/// (the broker holds the rest in its log until the link asks again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_link_takes_every_tap_once_and_confirms_it() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(5));
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = free_port();
    let users = HashMap::from([
        ("gateway".to_string(), "gw-secret".to_string()),
        ("1001".to_string(), "dev-secret".to_string()),
        ("1002".to_string(), "dev2-secret".to_string()),
    ]);
    let (_, link) = gateway::daemon::start_embedded_broker_linked(
        format!("127.0.0.1:{mqtt_port}").parse().unwrap(),
        users,
        None,
        "metro",
    )
    .unwrap();
    wait_for("the broker", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_ok()
    })
    .await;
    let store = Store::open(&dir.path().join("gateway"), 64 << 20).unwrap();
    let stats = Arc::new(GatewayStats::default());
    let gw_cfg = GatewayConfig {
        broker: ("127.0.0.1".into(), mqtt_port),
        mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
        operator: "metro".into(),
        queue_max_messages: 2,
        ingest_batch_max_messages: 2,
        ..GatewayConfig::default()
    };
    let gw_keys = keys.for_role(KeyRole::Gateway, 0).unwrap();
    let gw = tokio::spawn(gateway::daemon::run_linked(
        gw_cfg,
        link,
        store.clone(),
        gw_keys,
        stats.clone(),
        std::future::pending(),
    ));
    wait_for(
        "the gateway's subscription",
        Duration::from_secs(10),
        || stats.subscribed.load(Ordering::Acquire),
    )
    .await;

    // rumqttd drops a connection when another connects with its client id: a device that
    // takes the ids the gateway's link could have must not stop ingestion (the link's id is
    // random, and the broker's front gives a device the id of its username whatever it asks).
    for id in ["tapgate-gateway-local", "tapgate-gateway-link"] {
        let mut o = MqttOptions::new(id, "127.0.0.1", mqtt_port);
        o.set_credentials("1002", "dev2-secret");
        let (_c, mut ev) = AsyncClient::new(o, 10);
        tokio::spawn(async move {
            for _ in 0..20 {
                if ev.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut opts = MqttOptions::new("dev-1001", "127.0.0.1", mqtt_port);
    opts.set_credentials("1001", "dev-secret")
        .set_inflight(500);
    let (client, mut events) = AsyncClient::new(opts, 5_000);
    let confirmed = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let (c2, subscribed) = (confirmed.clone(), Arc::new(tokio::sync::Notify::new()));
    let s2 = subscribed.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => s2.notify_one(),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    for s in v["seqs"].as_array().unwrap() {
                        c2.lock().unwrap().insert(s.as_u64().unwrap());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    client
        .subscribe("tapgate/v1/metro/devices/1001/confirm", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
        .await
        .unwrap();
    const N: u64 = 3_000;
    for seq in 1..=N {
        client
            .publish(
                "tapgate/v1/metro/taps/1001",
                QoS::AtLeastOnce,
                false,
                test_tap(&keys, 1001, seq),
            )
            .await
            .unwrap();
    }
    let mut forged = test_tap(&keys, 1001, N + 1);
    forged[20] ^= 1;
    for (topic, payload) in [
        ("tapgate/v1/metro/taps/1001", forged),
        ("tapgate/v1/other/taps/1001", test_tap(&keys, 1001, N + 2)),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    wait_for("every tap confirmed", Duration::from_secs(60), || {
        confirmed.lock().unwrap().len() as u64 == N
            && stats.quarantined.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.stored.load(Ordering::Relaxed), N);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0);
    assert_eq!(
        *confirmed.lock().unwrap(),
        (1..=N).collect::<BTreeSet<u64>>()
    );
    let dev = store.device(1001).unwrap().unwrap();
    assert_eq!((dev.highest_seq, dev.taps), (N, N));
    assert!(dev.gaps.is_empty(), "{:?}", dev.gaps);
    assert_eq!(store.taps(10_000).unwrap().len() as u64, N);
    assert!(!gw.is_finished(), "the gateway is still running");
}
