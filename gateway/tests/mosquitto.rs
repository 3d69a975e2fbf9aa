//! The gateway against a real Mosquitto with tapgate's ACL (deploy/mosquitto/acl): clients must
//! authenticate, and a device can publish only under its own topic. Needs the `mosquitto` and
//! `mosquitto_passwd` binaries (`./test.sh` installs them when absent).

use gateway::daemon::{run, GatewayConfig, GatewayStats};
use gateway::store::Store;
use purse::keys::{KeySet, Role};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapgate_testkit::broker::spawn_gateway;
use tapgate_testkit::fixtures::signed_tap;
use tapgate_testkit::free_port;
use tapgate_testkit::mosquitto::{Mosquitto, MosquittoConfig};
use tapgate_testkit::mqtt::{self, ConfirmedDevice};
use tapgate_testkit::wait_until_async;

/// Mosquitto with the shipped ACL, the gateway's and two devices' passwords.
fn start_mosquitto(dir: &std::path::Path, port: u16) -> Mosquitto {
    MosquittoConfig::on_port(port)
        .user("gateway", "gw-secret")
        .user("1001", "d1-secret")
        .user("1002", "d2-secret")
        .shipped_acl()
        .start(dir)
}

fn tap(keys: &KeySet, device: u32, seq: u64) -> Vec<u8> {
    signed_tap(keys, "metro", device, seq)
}

/// Device 1001's taps `seqs`, published on its own topic at QoS 1.
async fn publish_taps(client: &AsyncClient, keys: &KeySet, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        client
            .publish(
                "tapgate/v1/metro/taps/1001",
                QoS::AtLeastOnce,
                false,
                tap(keys, 1001, seq),
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acl_keeps_each_device_to_its_own_topic() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = start_mosquitto(dir.path(), port);
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(9))
        .for_role(Role::Gateway, 0)
        .unwrap();
    let store = Store::open(&dir.path().join("gw"), 32 << 20).unwrap();
    let cfg = GatewayConfig {
        broker: ("127.0.0.1".into(), port),
        mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
        operator: "metro".into(),
        ..GatewayConfig::default()
    };
    let stats = spawn_gateway(cfg, &store, &keys);

    let mut opts = MqttOptions::new("device-1001", "127.0.0.1", port);
    opts.set_credentials("1001", "d1-secret");
    let device = ConfirmedDevice::connect(opts, 100, "tapgate/v1/metro/devices/1001/confirm").await;
    let client = &device.client;
    wait_until_async(
        "the gateway's subscription",
        Duration::from_secs(10),
        || stats.subscribed.load(std::sync::atomic::Ordering::Acquire),
    )
    .await;
    // Device 1001 tries another device's topic first: the broker drops it.
    client
        .publish(
            "tapgate/v1/metro/taps/1002",
            QoS::AtLeastOnce,
            false,
            tap(&keys, 1001, 99),
        )
        .await
        .unwrap();
    publish_taps(client, &keys, 1..=5).await;
    let start = Instant::now();
    while device.count() < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for confirmations"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.device(1001).unwrap().unwrap().taps, 5);
    assert!(store.device(1002).unwrap().is_none());
    assert!(
        store.quarantined(10).unwrap().is_empty(),
        "the ACL stopped the foreign-topic publish at the broker"
    );

    // A wrong password is refused.
    let mut bad = MqttOptions::new("intruder", "127.0.0.1", port);
    bad.set_credentials("1002", "guess");
    assert!(mqtt::refused(bad).await);
}

/// Two gateways in one shared-subscription group split the taps between them; together they
/// store and confirm every one exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_splits_taps_between_gateways() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = start_mosquitto(dir.path(), port);
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(9))
        .for_role(Role::Gateway, 0)
        .unwrap();
    let mut gws = Vec::new();
    for id in ["gw-a", "gw-b"] {
        let store = Store::open(&dir.path().join(id), 32 << 20).unwrap();
        let cfg = GatewayConfig {
            gateway_id: id.into(),
            broker: ("127.0.0.1".into(), port),
            mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
            share_group: Some("tapgate".into()),
            operator: "metro".into(),
            ..GatewayConfig::default()
        };
        gws.push(spawn_gateway(cfg, &store, &keys));
    }
    let start = Instant::now();
    while !gws
        .iter()
        .all(|s| s.subscribed.load(std::sync::atomic::Ordering::Acquire))
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the gateways did not subscribe"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut opts = MqttOptions::new("device-1001-shared", "127.0.0.1", port);
    opts.set_credentials("1001", "d1-secret");
    let (client, mut events) = AsyncClient::new(opts, 100);
    tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    publish_taps(&client, &keys, 1..=40).await;
    let stored = || -> Vec<u64> {
        gws.iter()
            .map(|s| s.stored.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    };
    let start = Instant::now();
    while stored().iter().sum::<u64>() < 40 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "stored only {:?}",
            stored()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = stored();
    assert_eq!(s.iter().sum::<u64>(), 40, "{s:?}");
    assert!(
        s.iter().all(|&n| n > 0),
        "both gateways took a share: {s:?}"
    );
}

/// Mosquitto pushes a backlog to the gateway with many more unacknowledged messages than the
/// gateway's queues hold. Ingestion used to wait on the MQTT request queue to acknowledge,
/// while the MQTT loop (the only thing draining that queue) waited for room in the ingest
/// queue: the gateway stopped for good. Tiny queues make the old deadlock certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_the_queues_is_taken_whole() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = start_mosquitto(dir.path(), port);
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(9))
        .for_role(Role::Gateway, 0)
        .unwrap();
    // The device publishes its whole outbox first, into the gateway's persistent session.
    let cfg = GatewayConfig {
        broker: ("127.0.0.1".into(), port),
        mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
        operator: "metro".into(),
        queue_max_messages: 2,
        ingest_batch_max_messages: 2,
        ..GatewayConfig::default()
    };
    let store = Store::open(&dir.path().join("gw"), 32 << 20).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first_stats = Arc::new(GatewayStats::default());
    let first = tokio::spawn(run(
        cfg.clone(),
        store.clone(),
        keys.clone(),
        first_stats.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    // The first run makes the persistent session (its subscription acknowledged), then stops.
    wait_until_async(
        "the first run's subscription",
        Duration::from_secs(10),
        || {
            first_stats
                .subscribed
                .load(std::sync::atomic::Ordering::Acquire)
        },
    )
    .await;
    let _ = stop.send(());
    first.await.unwrap();
    let mut opts = MqttOptions::new("device-1001-backlog", "127.0.0.1", port);
    opts.set_credentials("1001", "d1-secret").set_inflight(200);
    let (client, mut events) = AsyncClient::new(opts, 2_000);
    let broker_took = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let took = broker_took.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    took.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    // Under Mosquitto's default max_queued_messages (1,000) for a client that is away.
    const N: u64 = 900;
    publish_taps(&client, &keys, 1..=N).await;
    // Every tap in the broker (acknowledged to the device) before the gateway comes back.
    wait_until_async(
        "the broker to take the backlog",
        Duration::from_secs(20),
        || broker_took.load(std::sync::atomic::Ordering::Relaxed) >= N,
    )
    .await;
    let stats = spawn_gateway(cfg, &store, &keys);
    let start = Instant::now();
    while stats.stored.load(std::sync::atomic::Ordering::Relaxed) < N {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the gateway stalled after {} of {N} taps",
            stats.stored.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.device(1001).unwrap().unwrap().highest_seq, N);
    assert_eq!(
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// The gateway reaches an external broker over TLS (`mqtts://`, `broker_tls_ca_pem`): a
/// Mosquitto whose only listener speaks TLS takes a device's taps, and the gateway stores
/// them. Without the CA the gateway never subscribes (nothing taken over plain MQTT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_takes_taps_from_a_tls_broker() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let port = free_port();
    let _broker = MosquittoConfig::on_port(port)
        .user("gateway", "gw-secret")
        .user("1001", "d1-secret")
        .shipped_acl()
        .line(&format!("certfile {}", cert_path.display()))
        .line(&format!("keyfile {}", key_path.display()))
        .start(dir.path());
    let ca = cert.cert.pem().into_bytes();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(12))
        .for_role(Role::Gateway, 0)
        .unwrap();
    let cfg = |id: &str, ca: Option<Vec<u8>>| GatewayConfig {
        gateway_id: id.into(),
        broker: ("localhost".into(), port),
        broker_tls_ca_pem: ca,
        mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
        operator: "metro".into(),
        ..GatewayConfig::default()
    };
    // Plain MQTT to the TLS listener: no session, so no subscription.
    let plain_store = Store::open(&dir.path().join("plain"), 32 << 20).unwrap();
    let plain = spawn_gateway(cfg("gw-plain", None), &plain_store, &keys);
    let store = Store::open(&dir.path().join("gw"), 32 << 20).unwrap();
    let stats =
        tapgate_testkit::broker::subscribed_gateway(cfg("gw-tls", Some(ca.clone())), &store, &keys)
            .await;
    assert!(!plain.subscribed.load(std::sync::atomic::Ordering::Acquire));
    let mut opts = MqttOptions::new("device-1001-tls", "localhost", port);
    opts.set_credentials("1001", "d1-secret");
    opts.set_transport(rumqttc::Transport::tls(ca, None, None));
    let (client, mut events) = AsyncClient::new(opts, 100);
    tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    publish_taps(&client, &keys, 1..=10).await;
    wait_until_async("10 taps stored over TLS", Duration::from_secs(20), || {
        stats.stored.load(std::sync::atomic::Ordering::Relaxed) == 10
    })
    .await;
    assert!(!plain.subscribed.load(std::sync::atomic::Ordering::Acquire));
    assert_eq!(plain.stored.load(std::sync::atomic::Ordering::Relaxed), 0);
}
