//! The embedded broker's TLS listener: a client that trusts the certificate connects and
//! authenticates; plain MQTT to the TLS port gets no session; the plain loopback listener
//! (the gateway's own) still works; the ACL front enforces the same rules over TLS.

use gateway::daemon::start_embedded_broker_tls;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Transport};
use std::collections::HashMap;
use std::time::Duration;
use tapgate_testkit::{free_port, wait_for_port_async};

async fn connack(mut opts: MqttOptions, tls_ca: Option<Vec<u8>>) -> Option<ConnectReturnCode> {
    if let Some(ca) = tls_ca {
        opts.set_transport(Transport::tls(ca, None, None));
    }
    tapgate_testkit::mqtt::connack(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_speaks_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let (plain, port) = (free_port(), free_port());
    start_embedded_broker_tls(
        format!("127.0.0.1:{plain}").parse().unwrap(),
        HashMap::from([("1001".to_string(), "secret".to_string())]),
        Some((
            format!("127.0.0.1:{port}").parse().unwrap(),
            cert_path.display().to_string(),
            key_path.display().to_string(),
        )),
    );
    wait_for_port_async(port, "the broker's TLS listener").await;
    let ca = cert.cert.pem().into_bytes();
    let opts = |id: &str, pass: &str| {
        let mut o = MqttOptions::new(id, "localhost", port);
        o.set_credentials("1001", pass);
        o
    };
    assert_eq!(
        connack(opts("tls-ok", "secret"), Some(ca.clone())).await,
        Some(ConnectReturnCode::Success)
    );
    // The right certificate but the wrong password: refused.
    assert_ne!(
        connack(opts("tls-bad-pass", "guess"), Some(ca.clone())).await,
        Some(ConnectReturnCode::Success)
    );
    // The TLS listener keeps a device to its topics as the plain one does: a subscription to
    // every device's taps closes the connection (no SUBACK).
    let mut o = opts("tls-spy", "secret");
    o.set_transport(Transport::tls(ca.clone(), None, None));
    let (c, mut ev) = AsyncClient::new(o, 10);
    c.subscribe("tapgate/v1/+/taps/+", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return "granted",
                Ok(_) => {}
                Err(_) => return "closed",
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(outcome, "closed");
    // Plain MQTT to the TLS port: no session.
    assert_eq!(connack(opts("plain", "secret"), None).await, None);
    let mut o = MqttOptions::new("loopback", "127.0.0.1", plain);
    o.set_credentials("1001", "secret");
    assert_eq!(connack(o, None).await, Some(ConnectReturnCode::Success));
}
