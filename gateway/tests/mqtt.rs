//! The gateway daemon on the embedded broker's in-process link: every tap stored once and
//! confirmed, a forgery quarantined, another operator's taps left alone, a burst beyond the
//! gateway's queues taken whole. (The end-to-end test with the charging server is the root
//! tests' gateway_mqtt.rs.)

use gateway::daemon::{GatewayConfig, GatewayStats};
use gateway::store::Store;
use purse::keys::{KeySet, Role as KeyRole};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tapgate_testkit::fixtures::signed_tap;
use tapgate_testkit::mqtt::ConfirmedDevice;
use tapgate_testkit::{free_port, wait_for_port_async, wait_until_async as wait_for};

fn test_tap(keys: &KeySet, device: u32, seq: u64) -> Vec<u8> {
    signed_tap(keys, "metro", device, seq)
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
    wait_for_port_async(mqtt_port, "the broker").await;
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
    let intruders_in = Arc::new(AtomicU64::new(0));
    for id in ["tapgate-gateway-local", "tapgate-gateway-link"] {
        let mut o = MqttOptions::new(id, "127.0.0.1", mqtt_port);
        o.set_credentials("1002", "dev2-secret");
        let (_c, mut ev) = AsyncClient::new(o, 10);
        let seen = intruders_in.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }
    wait_for(
        "both devices connected under the ids a gateway could use",
        Duration::from_secs(10),
        || intruders_in.load(Ordering::Relaxed) >= 2,
    )
    .await;
    let mut opts = MqttOptions::new("dev-1001", "127.0.0.1", mqtt_port);
    opts.set_credentials("1001", "dev-secret").set_inflight(500);
    let device =
        ConfirmedDevice::connect(opts, 5_000, "tapgate/v1/metro/devices/1001/confirm").await;
    let client = &device.client;
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
        device.count() as u64 == N && stats.quarantined.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.stored.load(Ordering::Relaxed), N);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0);
    assert_eq!(device.confirmed(), (1..=N).collect::<BTreeSet<u64>>());
    let dev = store.device(1001).unwrap().unwrap();
    assert_eq!((dev.highest_seq, dev.taps), (N, N));
    assert!(dev.gaps.is_empty(), "{:?}", dev.gaps);
    assert_eq!(store.taps(10_000).unwrap().len() as u64, N);
    assert!(!gw.is_finished(), "the gateway is still running");
}
