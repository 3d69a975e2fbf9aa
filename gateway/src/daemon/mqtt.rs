//! The MQTT side of the daemon: one rumqttc event loop per connection (persistent session,
//! manual acks, reconnect with backoff, (re)subscribe on every connection), the validators'
//! heartbeats, and the in-process link to the embedded broker.

use super::{now_ms, GatewayConfig, GatewayStats, Source};
use crate::broker::TapLink;
use crate::store::Message;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;

/// The MQTT connections of a gateway: their clients (connection 0 first) and event loops.
pub(super) struct Connections {
    /// Each connection's client; the first also sends confirmations and blocklists.
    pub clients: Vec<AsyncClient>,
    /// Each connection's event-loop task.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Opens the gateway's MQTT connections: `cfg.ingest_connections` taking taps (one, taking no
/// taps, when they come over the embedded broker's link or from NATS JetStream), the first
/// also taking heartbeats. Each event loop puts the taps it receives on `tx`.
pub(super) fn connect(
    cfg: &GatewayConfig,
    linked: bool,
    stats: &Arc<GatewayStats>,
    tx: &Sender<(Source, Message)>,
    window: &Arc<super::sender::Window>,
) -> Connections {
    let connections = if linked {
        1
    } else {
        cfg.ingest_connections.max(1)
    };
    let group = cfg
        .share_group
        .clone()
        .or_else(|| (connections > 1).then(|| format!("tapgate-{}", cfg.gateway_id)));
    // Only this gateway's operator: every tap it takes is booked to that operator, so
    // another operator's taps are that operator's gateway's (one gateway, or group, per
    // operator).
    let op = &cfg.operator;
    let taps = match &group {
        Some(g) => format!("$share/{g}/tapgate/v1/{op}/taps/+"),
        None => format!("tapgate/v1/{op}/taps/+"),
    };
    let status = format!("tapgate/v1/{op}/devices/+/status");
    let mut out = Connections {
        clients: Vec::with_capacity(connections),
        tasks: Vec::with_capacity(connections),
    };
    for conn in 0..connections {
        let (client, eventloop, brokers) = client(cfg, conn);
        out.clients.push(client.clone());
        // Taps at QoS 1 (acknowledged once durable); heartbeats at QoS 0: a broker does not
        // queue those while the gateway is away (a queued one would arrive late with an old
        // clock), and nothing needs acknowledging out of turn (rumqttd takes acks only in
        // order).
        let mut topics = Vec::new();
        if !linked {
            topics.push((taps.clone(), QoS::AtLeastOnce));
        }
        if conn == 0 {
            topics.push((status.clone(), QoS::AtMostOnce));
        }
        let c = Connection {
            conn,
            main: conn == 0,
            client,
            stats: stats.clone(),
            tx: tx.clone(),
            topics,
            brokers,
            window: (conn == 0).then(|| window.clone()),
        };
        out.tasks.push(tokio::spawn(c.run(eventloop)));
    }
    out
}

/// Connection `conn`'s client and event loop, and its options for each broker it may use
/// (`cfg.broker` first, then `cfg.fallback_brokers`).
fn client(cfg: &GatewayConfig, conn: usize) -> (AsyncClient, EventLoop, Vec<MqttOptions>) {
    let id = if conn == 0 {
        format!("tapgate-gateway-{}", cfg.gateway_id)
    } else {
        format!("tapgate-gateway-{}-{conn}", cfg.gateway_id)
    };
    let brokers: Vec<MqttOptions> = std::iter::once(&cfg.broker)
        .chain(&cfg.fallback_brokers)
        .map(|(host, port)| {
            let mut o = MqttOptions::new(id.clone(), host.clone(), *port);
            o.set_clean_session(false)
                .set_manual_acks(true)
                .set_keep_alive(Duration::from_secs(30))
                .set_inflight(500)
                .set_max_packet_size(1 << 20, 16 << 20);
            if let Some((u, p)) = &cfg.mqtt_credentials {
                o.set_credentials(u.clone(), p.clone());
            }
            if let Some(ca) = &cfg.broker_tls_ca_pem {
                tapgate_http::serve::install_crypto_provider();
                o.set_transport(rumqttc::Transport::tls(ca.clone(), None, None));
            }
            o
        })
        .collect();
    // The request queue (acks, confirmations, subscriptions) drains only while the event
    // loop polls; ingestion never waits on it (see the sender tasks).
    let (client, mut eventloop) =
        AsyncClient::new(brokers[0].clone(), cfg.queue_max_messages.max(1_000));
    // Small messages both ways: without TCP_NODELAY, Nagle's algorithm held a tap or a
    // confirmation until the peer's delayed ACK (≈ 40 ms at p99).
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop, brokers)
}

/// One connection's event loop and what it needs.
struct Connection {
    conn: usize,
    /// The first connection: takes heartbeats and reports readiness.
    main: bool,
    client: AsyncClient,
    stats: Arc<GatewayStats>,
    tx: Sender<(Source, Message)>,
    topics: Vec<(String, QoS)>,
    /// The options for each broker, tried in turn when a connection fails.
    brokers: Vec<MqttOptions>,
    /// The first connection's: its PUBACKs (the confirmations publish on it).
    window: Option<Arc<super::sender::Window>>,
}

impl Connection {
    /// The event loop: reconnects with backoff; (re)subscribes on every connection. Nothing
    /// here awaits the request queue (it drains only while this loop polls). Ends when
    /// ingestion stops.
    async fn run(self, mut eventloop: EventLoop) {
        let mut backoff_ms = 100u64;
        let mut broker = 0usize;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff_ms = 100;
                    if let Some(w) = &self.window {
                        w.reset();
                    }
                    self.subscribe();
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    if let Some(w) = &self.window {
                        w.acked();
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if self.main {
                        self.stats.subscribed.store(true, Ordering::Release);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(device) = crate::propagation::status_device(&p.topic) {
                        self.heartbeat(device, &p);
                        continue;
                    }
                    if !self.take(p).await {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if self.main {
                        self.stats.subscribed.store(false, Ordering::Release);
                    }
                    tracing::warn!(%e, backoff_ms, "MQTT connection lost; reconnecting");
                    if self.brokers.len() > 1 {
                        // The next node of the cluster; the session (its subscriptions and
                        // unacknowledged messages) lives in the cluster, not in the node.
                        broker = (broker + 1) % self.brokers.len();
                        eventloop.mqtt_options = self.brokers[broker].clone();
                        backoff_ms = backoff_ms.min(400);
                    }
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(5_000);
                }
            }
        }
    }

    fn subscribe(&self) {
        for (topic, qos) in &self.topics {
            if let Err(e) = self.client.try_subscribe(topic.as_str(), *qos) {
                tracing::warn!(%e, topic, "subscribe failed");
            }
        }
    }

    /// A heartbeat: the blocklist version the validator holds, and its clock.
    fn heartbeat(&self, device: u32, p: &rumqttc::Publish) {
        match crate::propagation::parse_status(&p.payload) {
            Some((version, online)) => {
                if let Ok(mut pr) = self.stats.propagation.lock() {
                    let now = now_ms();
                    pr.heartbeat(device, version, online, now);
                    let (fare, outbox) = crate::propagation::parse_details(&p.payload);
                    pr.details(device, fare, outbox);
                    // A retained status is the last one the device sent, maybe long ago: its
                    // clock says nothing now.
                    let clock = (!p.retain)
                        .then(|| crate::propagation::parse_clock(&p.payload))
                        .flatten();
                    if let Some((skew_ms, true)) = clock.and_then(|c| pr.clock(device, c, now)) {
                        tracing::warn!(
                            device,
                            skew_ms,
                            "validator clock is off: its taps are dated and its fares computed for the wrong time"
                        );
                    }
                }
            }
            None => tracing::warn!(device, "malformed heartbeat ignored"),
        }
        // Subscribed at QoS 0; a QoS 1 status still queued from an older subscription of this
        // persistent session is acknowledged.
        if p.qos != QoS::AtMostOnce {
            let _ = self.client.try_ack(p);
        }
    }

    /// A tap message handed to ingestion with what its ack needs; false once ingestion stopped.
    async fn take(&self, p: rumqttc::Publish) -> bool {
        let m = Message {
            topic: p.topic.clone(),
            payload: p.payload.to_vec(),
        };
        // What the ack needs (packet id, QoS), without the payload.
        let mut ack = rumqttc::Publish::new("", p.qos, Vec::<u8>::new());
        ack.pkid = p.pkid;
        self.tx
            .send((Source::Mqtt(self.conn, ack), m))
            .await
            .is_ok()
    }
}

/// The in-process link to the embedded broker (subscribed at QoS 0 before the listeners
/// opened): nothing in flight to acknowledge; when ingestion falls behind, the queue fills,
/// this task stops taking, the broker stops forwarding at its buffer's limit ("unschedule")
/// and keeps the rest in its log until the task asks again ("wake"). The task ends with the
/// reason the link closed (the gateway then stops with an error: a supervisor restarts it; the
/// validators resend what is unconfirmed): it never sits there taking nothing.
pub(super) fn spawn_link(
    link: TapLink,
    tx: Sender<(Source, Message)>,
    stats: Arc<GatewayStats>,
) -> JoinHandle<String> {
    let TapLink { _tx, mut rx, .. } = link;
    tokio::spawn(async move {
        let _keep_registered = _tx;
        let reason = loop {
            match rx.next().await {
                Ok(Some(rumqttd::Notification::Forward(f))) => {
                    let m = Message {
                        topic: String::from_utf8_lossy(&f.publish.topic).into_owned(),
                        payload: f.publish.payload.to_vec(),
                    };
                    if tx.send((Source::Link, m)).await.is_err() {
                        break "ingestion stopped".to_string();
                    }
                }
                Ok(Some(rumqttd::Notification::Unschedule)) => {
                    if let Err(e) = rx.wake().await {
                        break format!("the embedded broker's link closed: {e}");
                    }
                }
                Ok(Some(rumqttd::Notification::Disconnect(..))) => {
                    break "the embedded broker disconnected the gateway's link".to_string();
                }
                Ok(_) => {}
                Err(e) => break format!("the embedded broker's link closed: {e}"),
            }
        };
        stats.subscribed.store(false, Ordering::Release);
        reason
    })
}
