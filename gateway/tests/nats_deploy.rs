//! The shipped NATS files (`deploy/nats`): the node configuration with TLS on every listener is
//! one `nats-server` accepts, and the users `tapgate-nats-users.sh` writes keep each device to
//! its own topics on a running cluster, as the Mosquitto ACL does. Needs `nats-server`
//! (`./test.sh` installs it).

use rumqttc::{Client, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;
use tapgate_testkit::nats::{binary, deploy_dir, NatsCluster};

const DEVICES: &str = "1001 pw-1001 metro\n1002 pw-1002 metro\n";

fn users_conf(devices: &str, gateway_password: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("devices");
    std::fs::write(&f, devices).unwrap();
    Command::new("sh")
        .arg(deploy_dir().join("tapgate-nats-users.sh"))
        .arg(&f)
        .env("TAPGATE_GATEWAY_PASSWORD", gateway_password)
        .output()
        .unwrap()
}

#[test]
fn the_shipped_node_configuration_with_tls_is_valid() {
    let bin = binary().expect("nats-server is not installed: apt-get install nats-server");
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    for (name, pem) in [
        ("server.pem", cert.cert.pem()),
        ("server-key.pem", cert.key_pair.serialize_pem()),
        ("route.pem", cert.cert.pem()),
        ("route-key.pem", cert.key_pair.serialize_pem()),
        ("ca.pem", cert.cert.pem()),
    ] {
        std::fs::write(tls.join(name), pem).unwrap();
    }
    let users = users_conf(DEVICES, "gw-secret");
    assert!(users.status.success(), "{users:?}");
    std::fs::write(dir.path().join("tapgate-users.conf"), &users.stdout).unwrap();
    let shipped = std::fs::read_to_string(deploy_dir().join("tapgate-node.conf")).unwrap();
    assert!(shipped.contains("/etc/nats/tls/") && shipped.contains("/var/lib/nats/n1"));
    let conf = shipped
        .replace("/etc/nats/tls/", &format!("{}/", tls.display()))
        .replace(
            "/var/lib/nats/n1",
            &dir.path().join("store").display().to_string(),
        );
    let path = dir.path().join("tapgate-node.conf");
    std::fs::write(&path, conf).unwrap();
    let out = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .arg("-t")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_users_script_refuses_what_the_file_cannot_carry() {
    for devices in [
        "1001 pw\"x metro\n",
        "10.01 pw metro\n",
        "1001 pw metro extra\n",
        "gateway pw metro\n",
    ] {
        let out = users_conf(devices, "gw-secret");
        assert!(!out.status.success(), "{devices:?} was accepted");
    }
    assert!(!users_conf(DEVICES, "gw secret").status.success());
}

/// An MQTT client of the cluster's node on `port` as `user`: its client and the events it sees.
fn client(port: u16, id: &str, user: &str, password: &str) -> (Client, mpsc::Receiver<Packet>) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, password)
        .set_keep_alive(Duration::from_secs(15));
    let (c, mut conn) = Client::new(o, 100);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    (c, rx)
}

/// The next packet `pick` returns something for (30 s at most).
fn wait_for<T>(rx: &mpsc::Receiver<Packet>, what: &str, pick: impl Fn(&Packet) -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(p) => {
                if let Some(v) = pick(&p) {
                    return v;
                }
            }
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

#[test]
fn a_device_publishes_and_reads_only_its_own_topics_on_the_cluster() {
    let cluster =
        NatsCluster::start(3, DEVICES, ("gateway", "gw-secret")).unwrap_or_else(|e| panic!("{e}"));
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.mqtt_port).collect();
    let suback = |p: &Packet| match p {
        Packet::SubAck(s) => Some(s.return_codes.clone()),
        _ => None,
    };
    let (gw, gw_rx) = client(ports[0], "gw-watch", "gateway", "gw-secret");
    gw.subscribe("tapgate/v1/+/taps/+", QoS::AtLeastOnce)
        .unwrap();
    let codes = wait_for(&gw_rx, "the gateway's SUBACK", suback);
    assert!(
        matches!(codes[..], [SubscribeReasonCode::Success(_)]),
        "{codes:?}"
    );

    let (dev, dev_rx) = client(ports[1], "validator-1001", "1001", "pw-1001");
    // Reading another device's confirmations is refused; its own are not.
    dev.subscribe("tapgate/v1/metro/devices/1002/confirm", QoS::AtLeastOnce)
        .unwrap();
    let codes = wait_for(&dev_rx, "the device's first SUBACK", suback);
    assert_eq!(
        codes,
        vec![SubscribeReasonCode::Failure],
        "another device's confirmations"
    );
    dev.subscribe("tapgate/v1/metro/devices/1001/confirm", QoS::AtLeastOnce)
        .unwrap();
    let codes = wait_for(&dev_rx, "the device's second SUBACK", suback);
    assert!(
        matches!(codes[..], [SubscribeReasonCode::Success(_)]),
        "its own confirmations: {codes:?}"
    );

    // Another device's taps, another operator's, then its own: only its own arrive.
    for (topic, body) in [
        ("tapgate/v1/metro/taps/1002", "forged-device"),
        ("tapgate/v1/bus/taps/1001", "forged-operator"),
        ("tapgate/v1/metro/taps/1001", "own"),
    ] {
        dev.publish(topic, QoS::AtLeastOnce, false, body).unwrap();
    }
    let got = wait_for(&gw_rx, "the device's own tap", |p| match p {
        Packet::Publish(p) => Some((
            p.topic.clone(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        )),
        _ => None,
    });
    assert_eq!(
        got,
        ("tapgate/v1/metro/taps/1001".to_string(), "own".to_string()),
        "the first tap the gateway sees is the device's own"
    );
}
