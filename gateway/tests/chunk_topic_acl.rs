//! A device cannot plant a blocklist snapshot chunk (issue 22): with a validator's MQTT
//! credentials, a retained publish on the gateway's chunk topic `…/blocklist/snapshot/<i>` is
//! refused by the embedded broker's ACL (the front closes the connection) and by Mosquitto with
//! the shipped ACL (it drops the message). Nothing reaches a validator subscribed to the
//! downlink, and nothing is retained for one that subscribes later.
//!
//! "Nothing reached" is shown without sleeping: after the attack the gateway publishes a marker
//! under the same filter; it must be the first message the subscriber gets.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::Duration;
use tapgate_testkit::free_port;
use tapgate_testkit::mosquitto::MosquittoConfig;
use tokio::sync::mpsc;

const CHUNK: &str = "tapgate/v1/metro/blocklist/snapshot/0";
const WAIT: Duration = Duration::from_secs(10);

/// What a client saw, in order.
#[derive(Debug)]
enum Seen {
    SubAck,
    PubAck,
    Publish(String, Vec<u8>),
    /// The broker closed the connection.
    Closed,
}

/// A connected client and what it saw.
struct Client {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(port: u16, id: &str, user: &str, password: &str) -> Client {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, password);
    let (client, mut ev) = AsyncClient::new(o, 16);
    let (tx, seen) = mpsc::unbounded_channel();
    let (up_tx, up) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut up_tx = Some(up_tx);
        loop {
            let s = match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(t) = up_tx.take() {
                        let _ = t.send(());
                    }
                    continue;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                Ok(Event::Incoming(Packet::PubAck(_))) => Seen::PubAck,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    Seen::Publish(p.topic.clone(), p.payload.to_vec())
                }
                Ok(_) => continue,
                Err(_) => {
                    let _ = tx.send(Seen::Closed);
                    return;
                }
            };
            let _ = tx.send(s);
        }
    });
    tokio::time::timeout(WAIT, up)
        .await
        .expect("connected")
        .expect("connected");
    Client { client, seen, task }
}

impl Client {
    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("an event")
            .unwrap_or(Seen::Closed)
    }

    /// Subscribes to `filter`, once the broker acknowledged it.
    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        assert!(matches!(self.next().await, Seen::SubAck), "{filter}");
    }

    /// Publishes at QoS 1 and waits until the broker acknowledged it or closed the
    /// connection: either way the broker is done with it. Whether it was acknowledged.
    async fn publish(&mut self, topic: &str, retain: bool, payload: &[u8]) -> bool {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .unwrap();
        loop {
            match self.next().await {
                Seen::PubAck => return true,
                Seen::Closed => return false,
                _ => {}
            }
        }
    }

    /// The first publish this client gets (at most [`WAIT`]).
    async fn first(&mut self) -> (String, Vec<u8>) {
        match self.next().await {
            Seen::Publish(t, p) => (t, p),
            other => panic!("a message expected, got {other:?}"),
        }
    }
}

/// The attack against a broker whose clients connect on `port`; `closes`: the broker closes
/// a connection that publishes where it may not (the embedded broker's front; Mosquitto
/// acknowledges and drops the message).
async fn a_device_cannot_plant_a_snapshot_chunk(port: u16, closes: bool) {
    let mut victim = connect(port, "validator-1001", "1001", "d1-secret").await;
    victim.subscribe("tapgate/v1/metro/blocklist/#").await;
    let mut gw = connect(port, "gateway-marker", "gateway", "gw-secret").await;

    let mut attacker = connect(port, "validator-1002", "1002", "d2-secret").await;
    let open = attacker.publish(CHUNK, true, b"forged chunk").await;
    assert_eq!(!open, closes, "the broker's answer to the forged chunk");
    // The broker is done with the forged chunk: the gateway's marker must come first.
    assert!(
        gw.publish("tapgate/v1/metro/blocklist/snapshot/1", false, b"marker")
            .await
    );
    assert_eq!(
        victim.first().await,
        (
            "tapgate/v1/metro/blocklist/snapshot/1".into(),
            b"marker".to_vec()
        ),
        "the forged chunk reached the validator"
    );

    // Nothing retained: a validator subscribing now gets the next live message first.
    let mut late = connect(port, "validator-1001-late", "1001", "d1-secret").await;
    late.subscribe("tapgate/v1/metro/blocklist/snapshot/+")
        .await;
    assert!(
        gw.publish("tapgate/v1/metro/blocklist/snapshot/2", false, b"late")
            .await
    );
    assert_eq!(
        late.first().await,
        (
            "tapgate/v1/metro/blocklist/snapshot/2".into(),
            b"late".to_vec()
        ),
        "a forged chunk was retained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_refuses_a_device_publishing_on_a_chunk_topic() {
    let port = tapgate_testkit::broker::embedded(&[
        ("gateway", "gw-secret"),
        ("1001", "d1-secret"),
        ("1002", "d2-secret"),
    ]);
    a_device_cannot_plant_a_snapshot_chunk(port, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_refuses_a_device_publishing_on_a_chunk_topic() {
    if tapgate_testkit::mosquitto::binary().is_none() {
        eprintln!("mosquitto is not installed: skipping (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = MosquittoConfig::on_port(port)
        .user("gateway", "gw-secret")
        .user("1001", "d1-secret")
        .user("1002", "d2-secret")
        .shipped_acl()
        .start(dir.path());
    a_device_cannot_plant_a_snapshot_chunk(port, false).await;
}
