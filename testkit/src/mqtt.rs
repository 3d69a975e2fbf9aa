//! A validator's side of the gateway's confirmations, as the MQTT tests play it.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A device's MQTT session subscribed to its confirmation topic: it publishes taps with
/// [`ConfirmedDevice::client`] and collects the sequence numbers the gateway confirms.
pub struct ConfirmedDevice {
    /// The session's client (publish taps with it).
    pub client: AsyncClient,
    confirmed: Arc<Mutex<BTreeSet<u64>>>,
}

impl ConfirmedDevice {
    /// Connects with `opts` (request queue `cap`), subscribes to `confirm_topic` at QoS 1 and
    /// returns once the broker has granted it (10 s at most, else panics). The session's
    /// events are polled on the current runtime for as long as it runs; a connection error is
    /// retried after 50 ms.
    pub async fn connect(opts: MqttOptions, cap: usize, confirm_topic: &str) -> ConfirmedDevice {
        let (client, mut events) = AsyncClient::new(opts, cap);
        let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
        let subscribed = Arc::new(tokio::sync::Notify::new());
        let (c2, s2) = (confirmed.clone(), subscribed.clone());
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => s2.notify_one(),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v: serde_json::Value =
                            serde_json::from_slice(&p.payload).expect("a JSON confirmation");
                        let seqs = v["seqs"].as_array().expect("confirmation seqs");
                        let mut c = c2.lock().expect("confirmed");
                        c.extend(seqs.iter().map(|s| s.as_u64().expect("a seq")));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        client
            .subscribe(confirm_topic, QoS::AtLeastOnce)
            .await
            .expect("subscribing to the confirmations");
        tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
            .await
            .expect("subscribed to the confirmations");
        ConfirmedDevice { client, confirmed }
    }

    /// The sequence numbers confirmed so far.
    pub fn confirmed(&self) -> BTreeSet<u64> {
        self.confirmed.lock().expect("confirmed").clone()
    }

    /// How many sequence numbers were confirmed so far.
    pub fn count(&self) -> usize {
        self.confirmed.lock().expect("confirmed").len()
    }
}

/// What a broker answered a connection.
enum Answer {
    /// Its CONNACK, with this code.
    ConnAck(rumqttc::ConnectReturnCode),
    /// The connection failed (closed, refused, TLS) before a CONNACK.
    Failed,
    /// Nothing within 5 s.
    Silent,
}

async fn answer(opts: MqttOptions) -> Answer {
    let (_client, mut events) = AsyncClient::new(opts, 10);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => return Answer::ConnAck(a.code),
                Ok(_) => {}
                Err(_) => return Answer::Failed,
            }
        }
    })
    .await
    .unwrap_or(Answer::Silent)
}

/// The broker's CONNACK code for a connection with `opts` (its transport as set there), or
/// `None` when the connection failed first or nothing came within 5 s.
pub async fn connack(opts: MqttOptions) -> Option<rumqttc::ConnectReturnCode> {
    match answer(opts).await {
        Answer::ConnAck(code) => Some(code),
        Answer::Failed | Answer::Silent => None,
    }
}

/// Whether the broker refused a connection with `opts`: a CONNACK that is not a success, or
/// the connection closed. A broker that says nothing within 5 s did not refuse.
pub async fn refused(opts: MqttOptions) -> bool {
    match answer(opts).await {
        Answer::ConnAck(code) => code != rumqttc::ConnectReturnCode::Success,
        Answer::Failed => true,
        Answer::Silent => false,
    }
}
