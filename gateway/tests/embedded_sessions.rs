//! The embedded broker's sessions, now that its ACL front hands each connection to rumqttd's
//! router over an in-process link (issue 22) instead of a loopback TCP connection: a device's
//! will is published (unretained) when its connection ends without DISCONNECT and not after a
//! DISCONNECT; a persistent session keeps its subscriptions across a reconnection; a second
//! connection with a device's credentials takes the first one's session; a client without a
//! keep-alive is refused.
//!
//! Ordering, not sleeping: the router takes each connection's packets in the order the front
//! hands them over, so "no will" is shown by the next device's will being the first message.

use rumqttc::{AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::time::Duration;
use tapgate_testkit::{free_port, wait_for_port_async};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);
const STATUS: &str = "tapgate/v1/metro/devices/+/status";

fn status(device: u32) -> String {
    format!("tapgate/v1/metro/devices/{device}/status")
}

async fn broker() -> u16 {
    let port = free_port();
    let mut users = HashMap::from([("gateway".to_string(), "gw".to_string())]);
    for d in 1001..=1004 {
        users.insert(d.to_string(), format!("pw{d}"));
    }
    gateway::daemon::start_embedded_broker(format!("127.0.0.1:{port}").parse().unwrap(), users);
    wait_for_port_async(port, "the broker").await;
    port
}

fn device_opts(port: u16, device: u32, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(format!("v{device}"), "127.0.0.1", port);
    o.set_credentials(device.to_string(), format!("pw{device}"))
        .set_clean_session(clean)
        .set_keep_alive(Duration::from_secs(15))
        .set_last_will(LastWill::new(
            status(device),
            format!("{device} offline"),
            QoS::AtLeastOnce,
            true,
        ));
    o
}

/// A client's event loop in a task, reporting what it received; `None` once the connection
/// ended.
struct Client {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Option<Packet>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    async fn connect(o: MqttOptions) -> Client {
        let (client, mut ev) = AsyncClient::new(o, 16);
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Some(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                }
            }
        });
        let mut c = Client { client, seen, task };
        match c.next().await {
            Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::Success),
            other => panic!("no CONNACK: {other:?}"),
        }
        c
    }

    async fn next(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("timed out waiting for the broker")
            .flatten()
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next().await {
                Some(Packet::SubAck(_)) => return,
                Some(_) => {}
                None => panic!("closed before SUBACK"),
            }
        }
    }

    /// The next PUBLISH: (topic, payload, retain).
    async fn publish_seen(&mut self) -> (String, String, bool) {
        loop {
            match self.next().await {
                Some(Packet::Publish(p)) => {
                    return (
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                        p.retain,
                    )
                }
                Some(_) => {}
                None => panic!("closed before a PUBLISH"),
            }
        }
    }

    /// Ends the connection without DISCONNECT (the socket is dropped).
    fn vanish(self) {
        self.task.abort();
    }
}

/// Device `device` connects with a will, sends DISCONNECT and reads until the broker closes.
async fn polite_goodbye(port: u16, device: u32) {
    use rumqttc::mqttbytes::v4::{Connect, LastWill as Will, Login, Packet as Frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut connect = Connect::new(format!("v{device}"));
    connect.login = Some(Login::new(device.to_string(), format!("pw{device}")));
    connect.last_will = Some(Will::new(
        status(device),
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let mut out = bytes::BytesMut::new();
    Frame::Connect(connect).write(&mut out, 1 << 20).unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&out).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK, accepted");
    s.write_all(&[0xe0, 0]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the front closes after DISCONNECT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_published_when_a_connection_ends_without_disconnect_only() {
    let port = broker().await;
    let mut watcher = Client::connect({
        let mut o = MqttOptions::new("watcher", "127.0.0.1", port);
        o.set_credentials("gateway", "gw");
        o
    })
    .await;
    watcher.subscribe(STATUS).await;

    // 1001 says goodbye: the front closes the socket only once it has handed the DISCONNECT
    // to the router, which drops the will.
    polite_goodbye(port, 1001).await;
    // 1002 vanishes: its will is published, unretained (a device's status is not retained).
    let gone = Client::connect(device_opts(port, 1002, true)).await;
    gone.vanish();
    assert_eq!(
        watcher.publish_seen().await,
        (status(1002), "1002 offline".to_string(), false),
        "the first will is 1002's: 1001 disconnected cleanly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_subscriptions_and_a_new_connection_takes_it_over() {
    let port = broker().await;
    let gw = Client::connect({
        let mut o = MqttOptions::new("gw", "127.0.0.1", port);
        o.set_credentials("gateway", "gw");
        o
    })
    .await;
    let confirm = "tapgate/v1/metro/devices/1003/confirm";
    let mut first = Client::connect(device_opts(port, 1003, false)).await;
    first.subscribe(confirm).await;
    // The same device again (a validator reconnecting before its old socket closed): the new
    // connection takes the session; the router drops the old one, and the front closes it.
    let mut second = Client::connect(device_opts(port, 1003, false)).await;
    loop {
        match first.next().await {
            None => break,
            Some(Packet::Publish(p)) => panic!("the old connection got {p:?}"),
            Some(_) => {}
        }
    }
    // The session's subscription came along, without subscribing again.
    gw.client
        .publish(confirm, QoS::AtLeastOnce, false, "ok-1")
        .await
        .unwrap();
    assert_eq!(
        second.publish_seen().await,
        (confirm.to_string(), "ok-1".to_string(), false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_keep_alive_is_refused() {
    let port = broker().await;
    let mut o = device_opts(port, 1001, true);
    o.set_keep_alive(Duration::ZERO);
    assert_ne!(
        tapgate_testkit::mqtt::connack(o).await,
        Some(ConnectReturnCode::Success)
    );
    let o = device_opts(port, 1001, true);
    assert_eq!(
        tapgate_testkit::mqtt::connack(o).await,
        Some(ConnectReturnCode::Success)
    );
}
