//! The gateway daemon end to end on the embedded broker with the real charging server (in
//! process): a validator publishes signed taps over MQTT (QoS 1), the gateway stores them
//! durably, confirms them, and forwards them to the charging server, which books each once.
//! Duplicates and forgeries never reach clearing; a blocked card reaches a validator as a
//! signed delta; a client with a wrong password is refused by the broker. (In the root tests:
//! the gateway crate does not depend on the charging server, even for tests.)

use gateway::daemon::GatewayConfig;
use gateway::store::Store;
use purse::keys::{KeySet, Role as KeyRole};
use purse::sam::{Sam, SoftwareHsm, SoftwareSam};
use purse::tap::{TapMeta, TapRecord};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapgate_http::auth::Role;
use tapgate_testkit::broker::subscribed_gateway;
use tapgate_testkit::fixtures::{debit, token, transit_card};
use tapgate_testkit::http;
use tapgate_testkit::mqtt::{self, ConfirmedDevice};
use tapgate_testkit::wait_until_async as wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taps_over_mqtt_are_stored_confirmed_and_cleared_once() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(5));
    let dir = tempfile::tempdir().unwrap();

    // The broker, with a password per client.
    let mqtt_port = tapgate_testkit::broker::embedded(&[
        ("gateway", "gw-secret"),
        ("1001", "dev-secret"),
        ("1002", "dev2-secret"),
    ]);

    // The charging server.
    let back_office = tapgate_testkit::charging::start(&keys, |cfg| {
        cfg.tokens = vec![
            token("gw", Role::Gateway, "tg_gw"),
            token("ops", Role::Operator, "tg_ops"),
        ];
        cfg.operator = "metro".into();
    });
    let state = back_office.state.clone();
    let charging_base = back_office.base.clone();
    let charging_url = charging_base.clone();
    let uid = [4, 3, 3, 3, 3, 3, 3];
    state.loads.register_card(&uid, 10_000, 0).unwrap();

    // The gateway.
    let store = Store::open(&dir.path().join("gateway"), 64 << 20).unwrap();
    let gw_cfg = GatewayConfig {
        broker: ("127.0.0.1".into(), mqtt_port),
        mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
        charging: Some((charging_base, "tg_gw".into())),
        operator: "metro".into(),
        ..GatewayConfig::default()
    };
    let gw_keys = keys.for_role(KeyRole::Gateway, 0).unwrap();
    let stats = subscribed_gateway(gw_cfg, &store, &gw_keys).await;

    // A validator: real debits, signed tap records, published at QoS 1.
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let mut card = transit_card(&hsm, uid, 10_000);
    let mut records = Vec::new();
    for i in 0..20u64 {
        let receipt = debit(&mut sam, &mut card, 150, i, 9);
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
    let device = ConfirmedDevice::connect(opts, 100, "tapgate/v1/metro/devices/1001/confirm").await;
    let client = &device.client;
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
        device.count() == 20
    })
    .await;
    let ledger = state.loads.ledger().clone();
    wait_for("clearing of all 20 taps", Duration::from_secs(20), || {
        let r = ledger.read().unwrap();
        r.balance("operator:metro").unwrap() == 20 * 150
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
            token("ops", Role::Operator, "tg_ops"),
            token("prometheus", Role::Metrics, "tg_scrape"),
        ])
        .unwrap(),
        currency: ("USD".into(), 2),
        places: Default::default(),
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
        http::call_text("GET", &format!("{api}{path}"), token, None, None)
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
    assert!(csv.contains("1001-1,1970-01-01,1970-01-01T00:00:00Z,1.50,USD,Enter,1001,0,1,Smart card or ticket,false,04030303030303,98.50"), "{csv}");
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
    let (code, body) = tokio::task::spawn_blocking(move || {
        http::post(
            &format!("{charging_url}/v1/cards/{block_uid}/block"),
            "tg_ops",
            serde_json::json!({"reason": "stolen"}),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "blocking a card: {body}");
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
    assert!(
        mqtt::refused(bad).await,
        "a wrong password must not connect"
    );
}
