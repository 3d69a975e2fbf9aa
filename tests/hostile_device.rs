//! A stolen device password (issue 14, items 2, 4 and 7): with device 1002's credentials an
//! attacker tries to read device 1001's taps, publish 1001's confirmations, plant a retained
//! blocklist or fare table, publish taps as 1001 or under another operator, and take 1001's or
//! the gateway's client id. Each attack runs against the real `tapgate gateway` with its
//! embedded broker (the ACL front closes the connection) and against Mosquitto with the shipped
//! configuration (which drops the message or refuses the subscription); in both, nothing reaches
//! anyone, and the legitimate flow goes on.
//!
//! "Nothing reached" is shown without sleeping: after the attack, a legitimate publisher sends a
//! marker the same subscriber reads; it must be the first thing that subscriber got.

mod support;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{free_port, wait_for_port, Kill, METRO_GATEWAY};
use tapgate_testkit::mosquitto::MosquittoConfig;

const PASS: &str = "hostile-device";
const WAIT: Duration = Duration::from_secs(10);
/// Devices 1001 and 1002 of the metro, 1003 of the hotel.
const DEVICES: &str = "1001 pw-1001 metro\n1002 pw-1002 metro\n1003 pw-1003 hotel\n";

/// What a test client saw, in order.
#[derive(Debug)]
enum Seen {
    SubAck(bool),
    PubAck,
    Publish(String, Vec<u8>),
    /// The broker closed the connection (or refused it).
    Closed,
}

struct Client {
    client: AsyncClient,
    seen: tokio::sync::mpsc::UnboundedReceiver<Seen>,
    _task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self._task.abort();
    }
}

/// Connects (no reconnection: a closed connection is reported once as `Seen::Closed`); `None`
/// if the broker refused the CONNECT.
async fn connect(port: u16, id: &str, user: &str, password: &str) -> Option<Client> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, password)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut ev) = AsyncClient::new(o, 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ack_tx = Some(ack_tx);
        loop {
            let s = match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    if let Some(t) = ack_tx.take() {
                        let _ = t.send(a.code == ConnectReturnCode::Success);
                    }
                    continue;
                }
                Ok(Event::Incoming(Packet::SubAck(a))) => Seen::SubAck(
                    a.return_codes
                        .iter()
                        .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)),
                ),
                Ok(Event::Incoming(Packet::PubAck(_))) => Seen::PubAck,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    Seen::Publish(p.topic, p.payload.to_vec())
                }
                Ok(_) => continue,
                Err(_) => {
                    if let Some(t) = ack_tx.take() {
                        let _ = t.send(false);
                    }
                    let _ = tx.send(Seen::Closed);
                    return;
                }
            };
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    let ok = tokio::time::timeout(WAIT, ack_rx).await.ok()?.ok()?;
    if !ok {
        task.abort();
        return None;
    }
    // Nothing but the CONNACK yet.
    assert!(rx.try_recv().is_err());
    Some(Client {
        client,
        seen: rx,
        _task: task,
    })
}

impl Client {
    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("timed out waiting for the broker")
            .unwrap_or(Seen::Closed)
    }

    /// Subscribes and returns whether the broker granted it (`false`: refused or closed).
    async fn subscribe(&mut self, filter: &str) -> bool {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        match self.next().await {
            Seen::SubAck(granted) => granted,
            Seen::Closed => false,
            other => panic!("expected a SUBACK, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and returns whether the connection is still open afterwards
    /// (Mosquitto acknowledges and drops an unauthorised publish; the front closes).
    async fn publish(&mut self, topic: &str, retain: bool, payload: &[u8]) -> bool {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .unwrap();
        match self.next().await {
            Seen::PubAck => true,
            Seen::Closed => false,
            other => panic!("expected a PUBACK, got {other:?}"),
        }
    }

    /// The next message must be `marker` on `topic`: nothing arrived before it.
    async fn first_message_is(&mut self, topic: &str, marker: &[u8]) {
        match self.next().await {
            Seen::Publish(t, p) => assert_eq!(
                (t.as_str(), p.as_slice()),
                (topic, marker),
                "something reached the subscriber before the marker"
            ),
            other => panic!("expected the marker, got {other:?}"),
        }
    }
}

/// The broker under attack: the gateway's embedded one, or Mosquitto with the shipped files.
struct Broker {
    /// Where devices connect.
    device_port: u16,
    /// Where the gateway connects (the same port for the embedded broker).
    gateway_port: u16,
    /// The front closes a connection on a violation; Mosquitto drops the message.
    closes: bool,
    /// Whether devices are bound to their operator (embedded; Mosquitto with the generated ACL).
    binds_operator: bool,
    /// The gateway's HTTP API (operator token `tg_ops`), when a gateway runs.
    api_port: Option<u16>,
    _guard: Box<dyn std::any::Any + Send>,
    dir: tempfile::TempDir,
}

/// `tapgate keys init` and the gateway's API configuration (operator token `tg_ops`) in `dir`.
fn gateway_files(dir: &Path, api_port: u16) {
    let o = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .current_dir(dir)
        .args(["keys", "init", "--out", "keys"])
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(
        dir.join("gw-api.toml"),
        format!(
            "http_listen = \"127.0.0.1:{api_port}\"\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            charging::api::Auth::hash_token("tg_ops")
        ),
    )
    .unwrap();
}

/// `tapgate gateway` in `dir` with `args`, its log in gateway.log; once its API answers.
fn spawn_gateway(dir: &Path, api_port: u16, args: &[&str]) -> Kill {
    let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .current_dir(dir)
        .args(METRO_GATEWAY)
        .args(["--config", "gw-api.toml"])
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("TAPGATE_MQTT_PASSWORD", "gw-secret")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let guard = Kill(child);
    wait_for_port(api_port, "the gateway's API");
    guard
}

fn tapgate_gateway() -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let (port, api_port) = (free_port(), free_port());
    gateway_files(dir.path(), api_port);
    std::fs::write(dir.path().join("devices"), DEVICES).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let guard = spawn_gateway(
        dir.path(),
        api_port,
        &["--mqtt-users", "devices", "--embedded-listen", &listen],
    );
    wait_for_port(port, "the gateway's broker");
    Broker {
        device_port: port,
        gateway_port: port,
        closes: true,
        binds_operator: true,
        api_port: Some(api_port),
        _guard: Box::new(guard),
        dir,
    }
}

/// Mosquitto with deploy/mosquitto/tapgate.conf (its two listeners on free loopback ports) and
/// an ACL: the shipped `acl`, or the one `tapgate-acl.sh` generates from the devices file.
fn mosquitto(generated_acl: bool) -> Option<Broker> {
    if tapgate_testkit::mosquitto::binary().is_none() {
        eprintln!("mosquitto is not installed: skipping its half (.ci/run installs it)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (device_port, gateway_port) = (free_port(), free_port());
    let mut conf = MosquittoConfig::shipped(device_port, gateway_port).user("gateway", "gw-secret");
    for l in DEVICES.lines() {
        let mut f = l.split_whitespace();
        conf = conf.user(f.next().unwrap(), f.next().unwrap());
    }
    if generated_acl {
        std::fs::write(d.join("devices"), DEVICES).unwrap();
        let o = Command::new("sh")
            .arg(tapgate_testkit::mosquitto::deploy_dir().join("tapgate-acl.sh"))
            .arg(d.join("devices"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::write(d.join("acl"), &o.stdout).unwrap();
        conf = conf.acl(&d.join("acl"));
    }
    let guard = conf.start(d);
    let text = std::fs::read_to_string(guard.conf()).unwrap();
    assert!(text.contains("use_username_as_clientid true"), "{text}");
    Some(Broker {
        device_port,
        gateway_port,
        closes: false,
        binds_operator: generated_acl,
        api_port: None,
        _guard: Box::new(guard),
        dir,
    })
}

impl Broker {
    async fn device(&self, id: u32, client_id: &str) -> Client {
        connect(
            self.device_port,
            client_id,
            &id.to_string(),
            &format!("pw-{id}"),
        )
        .await
        .expect("a device connects with its own password")
    }

    async fn gateway(&self, client_id: &str) -> Client {
        connect(self.gateway_port, client_id, "gateway", "gw-secret")
            .await
            .expect("the gateway connects")
    }

    /// Publishes as the attacker (device 1002, connected anew) and asserts the broker did not
    /// take it: the front closes the connection; Mosquitto acknowledges and drops it.
    async fn attacker_publishes(&self, topic: &str, retain: bool) {
        let mut a = self.device(1002, "attacker").await;
        let open = a.publish(topic, retain, b"forged").await;
        if self.closes {
            assert!(
                !open,
                "the front must close a connection that publishes to {topic}"
            );
        }
    }

    /// The gateway's Prometheus metrics.
    fn metrics(&self) -> String {
        let port = self.api_port.expect("a gateway runs");
        let (code, text) =
            tapgate_testkit::http::get_text(&format!("http://127.0.0.1:{port}/metrics"), "tg_ops");
        assert_eq!(code, 200, "gateway /metrics: {text}");
        text
    }

    /// The gateway's log (the embedded broker's).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }
}

async fn a_device_cannot_read_another_devices_taps(b: &Broker) {
    let mut observer = b.gateway("observer").await;
    assert!(observer.subscribe("tapgate/v1/metro/taps/+").await);
    for filter in [
        "tapgate/v1/metro/taps/1001",
        "tapgate/v1/+/taps/+",
        "tapgate/v1/metro/#",
        "#",
    ] {
        let mut spy = b.device(1002, "spy").await;
        let granted = spy.subscribe(filter).await;
        if b.closes {
            assert!(!granted, "{filter} must be refused to a device");
        } else {
            assert!(spy.subscribe("tapgate/v1/metro/devices/1002/confirm").await);
        }
        // 1001 taps; the spy must get nothing (before its own marker, when still connected).
        let mut victim = b.device(1001, "validator-1001").await;
        assert!(
            victim
                .publish("tapgate/v1/metro/taps/1001", false, b"tap of 1001")
                .await
        );
        observer
            .first_message_is("tapgate/v1/metro/taps/1001", b"tap of 1001")
            .await;
        if !b.closes {
            let mut gw = b.gateway("marker").await;
            assert!(
                gw.publish("tapgate/v1/metro/devices/1002/confirm", false, b"marker")
                    .await
            );
            spy.first_message_is("tapgate/v1/metro/devices/1002/confirm", b"marker")
                .await;
        }
    }
}

async fn a_device_cannot_forge_confirmations_or_plant_a_downlink(b: &Broker) {
    let mut victim = b.device(1001, "validator-1001").await;
    for f in [
        "tapgate/v1/metro/devices/1001/confirm",
        "tapgate/v1/metro/blocklist/#",
        "tapgate/v1/metro/fares/#",
    ] {
        assert!(
            victim.subscribe(f).await,
            "{f}: a device reads its own downlink"
        );
    }
    b.attacker_publishes("tapgate/v1/metro/devices/1001/confirm", false)
        .await;
    b.attacker_publishes("tapgate/v1/metro/blocklist/snapshot", true)
        .await;
    b.attacker_publishes("tapgate/v1/metro/blocklist/delta", false)
        .await;
    b.attacker_publishes("tapgate/v1/metro/fares/table", true)
        .await;
    let mut gw = b.gateway("marker").await;
    assert!(
        gw.publish("tapgate/v1/metro/devices/1001/confirm", false, b"marker")
            .await
    );
    victim
        .first_message_is("tapgate/v1/metro/devices/1001/confirm", b"marker")
        .await;
    // Nothing was retained: a validator subscribing later gets only what the gateway retains.
    let mut late = b.device(1001, "validator-1001-late").await;
    assert!(late.subscribe("tapgate/v1/metro/blocklist/#").await);
    assert!(late.subscribe("tapgate/v1/metro/fares/#").await);
    assert!(
        gw.publish("tapgate/v1/metro/fares/table", false, b"marker")
            .await
    );
    late.first_message_is("tapgate/v1/metro/fares/table", b"marker")
        .await;
}

async fn a_device_cannot_publish_taps_as_another_device_or_operator(b: &Broker) {
    let mut observer = b.gateway("observer").await;
    assert!(observer.subscribe("tapgate/v1/+/taps/+").await);
    assert!(observer.subscribe("tapgate/v1/+/devices/+/status").await);
    b.attacker_publishes("tapgate/v1/metro/taps/1001", false)
        .await;
    b.attacker_publishes("tapgate/v1/metro/devices/1001/status", true)
        .await;
    if b.binds_operator {
        // 1002 is the metro's: not under the hotel's topics.
        b.attacker_publishes("tapgate/v1/hotel/taps/1002", false)
            .await;
        b.attacker_publishes("tapgate/v1/hotel/devices/1002/status", false)
            .await;
        // 1003 is the hotel's: not under the metro's.
        let mut hotel = b.device(1003, "validator-1003").await;
        let open = hotel
            .publish("tapgate/v1/metro/taps/1003", false, b"forged")
            .await;
        assert!(!b.closes || !open);
        let mut hotel = b.device(1003, "validator-1003").await;
        assert!(
            hotel
                .publish("tapgate/v1/hotel/taps/1003", false, b"hotel tap")
                .await
        );
        observer
            .first_message_is("tapgate/v1/hotel/taps/1003", b"hotel tap")
            .await;
    }
    // The legitimate flow: 1002's own tap arrives.
    let mut own = b.device(1002, "validator-1002").await;
    assert!(
        own.publish("tapgate/v1/metro/taps/1002", false, b"own tap")
            .await
    );
    observer
        .first_message_is("tapgate/v1/metro/taps/1002", b"own tap")
        .await;
}

async fn a_device_cannot_take_another_devices_or_the_gateways_client_id(b: &Broker) {
    let mut victim = b.device(1001, "validator-1001").await;
    assert!(
        victim
            .subscribe("tapgate/v1/metro/devices/1001/confirm")
            .await
    );
    // Not the daemon's own id (`tapgate-gateway-gw1`): the running gateway would take it back
    // from this client when it reconnects, and that is not the attack under test.
    let mut gateway = b.gateway("gateway-watch").await;
    assert!(
        gateway.subscribe("tapgate/v1/metro/taps/+").await,
        "the gateway's subscription was refused or its connection closed; gateway log:\n{}",
        b.log()
    );
    let mut attackers = Vec::new();
    for id in [
        "validator-1001",
        "gateway-watch",
        "tapgate-gateway-gw1",
        "1001",
        "gateway",
    ] {
        attackers.push(b.device(1002, id).await);
    }
    // Both are still connected: each gets a message on the connection it had.
    let mut marker = b.gateway("marker").await;
    assert!(
        marker
            .publish("tapgate/v1/metro/devices/1001/confirm", false, b"marker")
            .await
    );
    victim
        .first_message_is("tapgate/v1/metro/devices/1001/confirm", b"marker")
        .await;
    // The victim's connection is the one it had: its own tap goes through it to the gateway's.
    assert!(
        victim
            .publish("tapgate/v1/metro/taps/1001", false, b"still here")
            .await
    );
    gateway
        .first_message_is("tapgate/v1/metro/taps/1001", b"still here")
        .await;
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_stolen_device_password_cannot_read_another_devices_taps() {
    rt().block_on(async {
        let b = tapgate_gateway();
        a_device_cannot_read_another_devices_taps(&b).await;
        let m = b.metrics();
        assert!(
            m.contains("tapgate_gateway_mqtt_subscriptions_refused_total 4"),
            "{m}"
        );
        let log = b.log();
        assert!(log.contains("MQTT client outside its topics"), "{log}");
        assert_eq!(
            log.matches("MQTT client outside its topics").count(),
            1,
            "the device is logged once: {log}"
        );
        if let Some(m) = mosquitto(false) {
            a_device_cannot_read_another_devices_taps(&m).await;
        }
    });
}

#[test]
fn a_stolen_device_password_cannot_forge_confirmations_or_plant_a_downlink() {
    rt().block_on(async {
        let b = tapgate_gateway();
        a_device_cannot_forge_confirmations_or_plant_a_downlink(&b).await;
        let m = b.metrics();
        assert!(
            m.contains("tapgate_gateway_mqtt_publishes_refused_total 4"),
            "{m}"
        );
        if let Some(m) = mosquitto(false) {
            a_device_cannot_forge_confirmations_or_plant_a_downlink(&m).await;
        }
    });
}

#[test]
fn a_stolen_device_password_cannot_publish_taps_as_another_device_or_operator() {
    rt().block_on(async {
        let b = tapgate_gateway();
        a_device_cannot_publish_taps_as_another_device_or_operator(&b).await;
        if let Some(m) = mosquitto(false) {
            a_device_cannot_publish_taps_as_another_device_or_operator(&m).await;
        }
        if let Some(m) = mosquitto(true) {
            a_device_cannot_publish_taps_as_another_device_or_operator(&m).await;
        }
    });
}

#[test]
fn a_stolen_device_password_cannot_take_another_devices_or_the_gateways_client_id() {
    rt().block_on(async {
        let b = tapgate_gateway();
        a_device_cannot_take_another_devices_or_the_gateways_client_id(&b).await;
        if let Some(m) = mosquitto(false) {
            a_device_cannot_take_another_devices_or_the_gateways_client_id(&m).await;
        }
    });
}

/// Item 7 on Mosquitto with the shipped configuration: the gateway's several connections (two
/// ingest connections in a shared subscription) keep their own ids on the gateway's listener, a
/// device that asks for those ids on the validators' listener gets its username instead, and the
/// gateway takes a device's message without losing a connection.
#[test]
fn the_gateway_keeps_its_connections_on_mosquitto_with_the_shipped_config() {
    rt().block_on(async {
        let Some(m) = mosquitto(false) else { return };
        let api_port = free_port();
        gateway_files(m.dir.path(), api_port);
        let broker = format!("mqtt://127.0.0.1:{}", m.gateway_port);
        let _gw = spawn_gateway(
            m.dir.path(),
            api_port,
            &["--broker", &broker, "--ingest-connections", "2"],
        );
        let m = Broker {
            api_port: Some(api_port),
            ..m
        };
        let subscribed = || m.metrics().contains("tapgate_gateway_mqtt_subscribed 1");
        let t0 = std::time::Instant::now();
        while !subscribed() {
            assert!(t0.elapsed() < WAIT, "the gateway did not subscribe");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut takers = Vec::new();
        for id in ["tapgate-gateway-gw1", "tapgate-gateway-gw1-1"] {
            takers.push(m.device(1002, id).await);
        }
        // A message the gateway must take (not a tap: it goes to quarantine, counted).
        let mut dev = m.device(1001, "validator-1001").await;
        assert!(
            dev.publish("tapgate/v1/metro/taps/1001", false, b"not a tap")
                .await
        );
        let t0 = std::time::Instant::now();
        while !m
            .metrics()
            .contains("tapgate_gateway_taps_quarantined_total 1")
        {
            assert!(t0.elapsed() < WAIT, "the gateway did not take the message");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = m.log();
        assert!(!log.contains("MQTT connection lost"), "{log}");
    });
}
