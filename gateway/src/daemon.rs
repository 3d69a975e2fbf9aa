//! The gateway daemon: MQTT in (rumqttc, QoS 1, persistent session, manual acks), durable
//! ingestion, confirmations out, forwarding to clearing over HTTP.
//!
//! Delivery is end to end, never trusted to the broker: an incoming publish is acknowledged to
//! the broker only after the ingest transaction that stored it committed, so a gateway killed
//! at any point gets the message again from its persistent session; the validator deletes a
//! tap from its outbox only when the gateway's confirmation arrives. With the embedded broker
//! the taps come over rumqttd's in-process link instead ([`run_linked`]; why that is as safe is
//! on [`start_embedded_broker_linked`]); the broker itself, and the ACL front that keeps each
//! device to its own topics, are in [`crate::broker`].
//!
//! Topics (docs/mqtt.md): taps arrive on `tapgate/v1/<operator>/taps/<device>`; confirmations
//! go to `tapgate/v1/<operator>/devices/<device>/confirm` as `{"seqs": [...], "mac": "…"}`,
//! MAC'd with the device's key (`purse::confirm`): a validator deletes taps only on one that
//! verifies, whatever the broker lets through.

use crate::forward::forward_once;
use crate::store::{Message, Store};
use purse::keys::KeySet;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Daemon settings. `Debug` never shows the MQTT password or the clearing token.
#[derive(Clone)]
pub struct GatewayConfig {
    /// This gateway's id (batch ids, MQTT client id).
    pub gateway_id: String,
    /// The broker: host and port.
    pub broker: (String, u16),
    /// MQTT username and password of the gateway.
    pub mqtt_credentials: Option<(String, String)>,
    /// Most messages in one ingest transaction (group commit).
    pub ingest_batch_max_messages: usize,
    /// Most taps in one clearing batch.
    pub forward_batch_max_taps: usize,
    /// The charging server's clearing endpoint base URL and gateway token; `None` keeps taps
    /// in the outbox.
    pub charging: Option<(String, String)>,
    /// The operator taps are booked to.
    pub operator: String,
    /// Bound of the queue between the MQTT loop and ingestion (back-pressure beyond it), and of
    /// each MQTT connection's request queue.
    pub queue_max_messages: usize,
    /// Subscribe to the taps as a shared subscription (`$share/<group>/…`): the broker splits
    /// the tap messages among the gateways of the group (Mosquitto ≥ 2 supports it for MQTT
    /// 3.1.1 clients). Each gateway then sees only its share of a device's sequence numbers, so
    /// its gap report is partial; heartbeats are not shared.
    pub share_group: Option<String>,
    /// MQTT connections taking taps (a shared subscription among them when more than one): a
    /// broker that caps unacknowledged messages per connection (rumqttd: 100) then delivers
    /// that many per connection while a batch becomes durable.
    pub ingest_connections: usize,
    /// Relay the charging server's signed blocklists to this operator's validators (default).
    /// Off for a gateway that only collects an operator's revenue while its validators take
    /// the card scheme's list from the scheme operator's topics (a hotel on a metro's cards).
    pub relay_blocklists: bool,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("gateway_id", &self.gateway_id)
            .field("broker", &self.broker)
            .field("mqtt_user", &self.mqtt_credentials.as_ref().map(|c| &c.0))
            .field("charging", &self.charging.as_ref().map(|c| &c.0))
            .field("operator", &self.operator)
            .field("share_group", &self.share_group)
            .field("ingest_connections", &self.ingest_connections)
            .field("relay_blocklists", &self.relay_blocklists)
            .finish_non_exhaustive()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            gateway_id: "gw1".into(),
            broker: ("127.0.0.1".into(), 18830),
            mqtt_credentials: None,
            ingest_batch_max_messages: 4096,
            forward_batch_max_taps: 1_000,
            charging: None,
            operator: "default".into(),
            queue_max_messages: 10_000,
            share_group: None,
            ingest_connections: 1,
            relay_blocklists: true,
        }
    }
}

/// Live counters.
#[derive(Default, Debug)]
pub struct GatewayStats {
    /// Taps stored.
    pub stored: AtomicU64,
    /// Duplicates dropped.
    pub duplicates: AtomicU64,
    /// Messages or records quarantined.
    pub quarantined: AtomicU64,
    /// Taps forwarded to clearing.
    pub forwarded: AtomicU64,
    /// Confirmations dropped because their queue was full (the validators resend those taps).
    pub confirmations_dropped: AtomicU64,
    /// Alarm: the store is full; batches are refused (not acknowledged, not confirmed) until
    /// room returns.
    pub store_full: std::sync::atomic::AtomicBool,
    /// Times the store became full.
    pub store_full_events: AtomicU64,
    /// Whether the tap subscription is in place (readiness).
    pub subscribed: std::sync::atomic::AtomicBool,
    /// The blocklist version last published to validators.
    pub blocklist_version: AtomicU64,
    /// Which version each validator reports holding, and how fast each version spread.
    pub propagation: std::sync::Mutex<crate::propagation::Propagation>,
    /// What the embedded broker's ACL front refused (set when this process runs it).
    pub broker: std::sync::OnceLock<Arc<crate::broker::BrokerStats>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub use crate::broker::{
    start_embedded_broker, start_embedded_broker_linked, start_embedded_broker_tls, BrokerStats,
    BrokerUsers, TapLink,
};

/// Where a message waiting for ingestion came from: an MQTT connection (acknowledged to the
/// broker once durable) or the in-process link (nothing to acknowledge).
enum Source {
    Mqtt(usize, rumqttc::Publish),
    Link,
}

/// Most sequence numbers in one confirmation message.
pub const CONFIRM_MAX_SEQS: usize = purse::confirm::CONFIRM_MAX_SEQS;

/// Runs the gateway until `shutdown` resolves.
pub async fn run(
    cfg: GatewayConfig,
    store: Store,
    keys: KeySet,
    stats: Arc<GatewayStats>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    if let Err(e) = run_inner(cfg, None, store, keys, stats, shutdown).await {
        tracing::error!(%e, "gateway stopped");
    }
}

/// [`run`] with the taps taken from the embedded broker over `link` (from
/// [`start_embedded_broker_linked`]) instead of MQTT connections; heartbeats, confirmations and
/// blocklists still go over one MQTT connection.
pub async fn run_linked(
    cfg: GatewayConfig,
    link: TapLink,
    store: Store,
    keys: KeySet,
    stats: Arc<GatewayStats>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    if link.operator != cfg.operator {
        return Err(format!(
            "the broker link takes operator {:?}'s taps; this gateway serves {:?}",
            link.operator, cfg.operator
        ));
    }
    run_inner(cfg, Some(link), store, keys, stats, shutdown).await
}

async fn run_inner(
    cfg: GatewayConfig,
    link: Option<TapLink>,
    store: Store,
    keys: KeySet,
    stats: Arc<GatewayStats>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let linked = link.is_some();
    let connections = if linked {
        1
    } else {
        cfg.ingest_connections.max(1)
    };
    let group = cfg
        .share_group
        .clone()
        .or_else(|| (connections > 1).then(|| format!("tapgate-{}", cfg.gateway_id)));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Source, Message)>(cfg.queue_max_messages);
    let mut clients = Vec::with_capacity(connections);
    let mut mqtt_tasks = Vec::with_capacity(connections);
    for conn in 0..connections {
        let id = if conn == 0 {
            format!("tapgate-gateway-{}", cfg.gateway_id)
        } else {
            format!("tapgate-gateway-{}-{conn}", cfg.gateway_id)
        };
        let mut opts = MqttOptions::new(id, cfg.broker.0.clone(), cfg.broker.1);
        opts.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(500)
            .set_max_packet_size(1 << 20, 16 << 20);
        if let Some((u, p)) = &cfg.mqtt_credentials {
            opts.set_credentials(u.clone(), p.clone());
        }
        // The request queue (acks, confirmations, subscriptions) drains only while the event
        // loop polls; ingestion never waits on it (see the sender task below).
        let (client, mut eventloop) = AsyncClient::new(opts, cfg.queue_max_messages.max(1_000));
        // Small messages both ways: without TCP_NODELAY, Nagle's algorithm held a tap or a
        // confirmation until the peer's delayed ACK (≈ 40 ms at p99).
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        clients.push(client.clone());
        // MQTT event loop: reconnects with backoff; (re)subscribes on every connection. The
        // first connection also takes the validators' heartbeats. Nothing here awaits the
        // request queue (it drains only while this loop polls).
        let sub_client = client;
        let sub_stats = stats.clone();
        let tx = tx.clone();
        // Only this gateway's operator: every tap it takes is booked to that operator, so
        // another operator's taps are that operator's gateway's (one gateway, or group, per
        // operator).
        let op = cfg.operator.clone();
        let taps = match &group {
            Some(g) => format!("$share/{g}/tapgate/v1/{op}/taps/+"),
            None => format!("tapgate/v1/{op}/taps/+"),
        };
        let status = format!("tapgate/v1/{op}/devices/+/status");
        let main = conn == 0;
        mqtt_tasks.push(tokio::spawn(async move {
            let mut backoff_ms = 100u64;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff_ms = 100;
                        // Taps at QoS 1 (acknowledged once durable); heartbeats at QoS 0: a
                        // broker does not queue those while the gateway is away (a queued one
                        // would arrive late with an old clock), and nothing needs acknowledging
                        // out of turn (rumqttd takes acks only in order).
                        let mut topics = Vec::new();
                        if !linked {
                            topics.push((taps.as_str(), QoS::AtLeastOnce));
                        }
                        if main {
                            topics.push((status.as_str(), QoS::AtMostOnce));
                        }
                        for (topic, qos) in topics {
                            if let Err(e) = sub_client.try_subscribe(topic, qos) {
                                tracing::warn!(%e, topic, "subscribe failed");
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if main {
                            sub_stats.subscribed.store(true, Ordering::Release);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // Heartbeats: the blocklist version each validator holds.
                        if let Some(device) = crate::propagation::status_device(&p.topic) {
                            match crate::propagation::parse_status(&p.payload) {
                                Some((version, online)) => {
                                    if let Ok(mut pr) = sub_stats.propagation.lock() {
                                        let now = now_ms();
                                        pr.heartbeat(device, version, online, now);
                                        // A retained status is the last one the device
                                        // sent, maybe long ago: its clock says nothing now.
                                        let clock = (!p.retain)
                                            .then(|| crate::propagation::parse_clock(&p.payload))
                                            .flatten();
                                        if let Some((skew_ms, true)) =
                                            clock.and_then(|c| pr.clock(device, c, now))
                                        {
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
                            // Subscribed at QoS 0; a QoS 1 status still queued from an older
                            // subscription of this persistent session is acknowledged.
                            if p.qos != QoS::AtMostOnce {
                                let _ = sub_client.try_ack(&p);
                            }
                            continue;
                        }
                        let m = Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                        };
                        // What the ack needs (packet id, QoS), without the payload.
                        let mut ack = rumqttc::Publish::new("", p.qos, Vec::<u8>::new());
                        ack.pkid = p.pkid;
                        if tx.send((Source::Mqtt(conn, ack), m)).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if main {
                            sub_stats.subscribed.store(false, Ordering::Release);
                        }
                        tracing::warn!(%e, backoff_ms, "MQTT connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                        backoff_ms = (backoff_ms * 2).min(5_000);
                    }
                }
            }
        }));
    }
    // The in-process link to the embedded broker (subscribed at QoS 0 before the listeners
    // opened): nothing in flight to acknowledge; when ingestion falls behind, the queue below
    // fills, this task stops taking, the broker stops forwarding at its buffer's limit
    // ("unschedule") and keeps the rest in its log until the task asks again ("wake"). If the
    // link closes the gateway stops with an error (a supervisor restarts it; the validators
    // resend what is unconfirmed): it never sits there taking nothing.
    let link_task = link.map(|TapLink { _tx, mut rx, .. }| {
        let tx = tx.clone();
        let link_stats = stats.clone();
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
            link_stats.subscribed.store(false, Ordering::Release);
            reason
        })
    });
    drop(tx);
    let client = clients[0].clone();

    // Forwarder: outbox → clearing, with backoff; idempotent batch ids.
    let fwd_store = store.clone();
    let fwd_keys = keys.clone();
    let fwd_cfg = cfg.clone();
    let fwd_stats = stats.clone();
    let forwarder = tokio::spawn(async move {
        let Some((base, token)) = fwd_cfg.charging.clone() else {
            return;
        };
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        let mut backoff_ms = 50u64;
        loop {
            let (s, k, c, a, b, t) = (
                fwd_store.clone(),
                fwd_keys.clone(),
                fwd_cfg.clone(),
                agent.clone(),
                base.clone(),
                token.clone(),
            );
            let result = tokio::task::spawn_blocking(move || {
                let mut sink = |batch: &serde_json::Value| -> Result<(), String> {
                    a.post(&format!("{b}/v1/clearing/batches"))
                        .set("Authorization", &format!("Bearer {t}"))
                        .send_json(batch.clone())
                        .map(|_| ())
                        .map_err(|e| match e {
                            // The server's reason (a refused operator, a malformed batch) in the
                            // log, not just the status code.
                            ureq::Error::Status(code, r) => {
                                format!(
                                    "clearing answered {code}: {}",
                                    r.into_string().unwrap_or_default()
                                )
                            }
                            other => other.to_string(),
                        })
                };
                forward_once(
                    &s,
                    &c.gateway_id,
                    &c.operator,
                    |d| k.device_key(d).ok(),
                    c.forward_batch_max_taps,
                    &mut sink,
                )
            })
            .await;
            match result {
                Ok(Ok(0)) => {
                    backoff_ms = 50;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Ok(n)) => {
                    backoff_ms = 50;
                    fwd_stats.forwarded.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    tracing::warn!(%e, backoff_ms, "forwarding to clearing failed; retrying the same batch");
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(5_000);
                }
                Err(e) => tracing::error!(%e, "forwarder task failed"),
            }
        }
    });

    // Blocklists: signed deltas and snapshots from the back office, relayed to validators (the
    // gateway cannot forge them: it has no signing key). Deltas at QoS 1; the snapshot retained,
    // refreshed at most every 10 s, for validators that are behind or new.
    let bl_client = client.clone();
    let bl_cfg = cfg.clone();
    let bl_stats = stats.clone();
    let bl_store = store.clone();
    let bl_pk = keys.verifying_key;
    if let Ok(v) = store.blocklist_version() {
        stats.blocklist_version.store(v, Ordering::Relaxed);
    }
    let blocklists = tokio::spawn(async move {
        let Some((base, token)) = bl_cfg.charging.clone() else {
            return;
        };
        if !bl_cfg.relay_blocklists {
            return;
        }
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        let mut last_snapshot = std::time::Instant::now() - Duration::from_secs(60);
        let mut snapshot_due = true;
        let mut refused_version = None;
        loop {
            let held = bl_stats.blocklist_version.load(Ordering::Relaxed);
            let (a, b, t) = (agent.clone(), base.clone(), token.clone());
            let fetched =
                tokio::task::spawn_blocking(move || -> Result<Option<(u64, Vec<u8>)>, String> {
                    let r = a
                        .get(&format!("{b}/v1/blocklist/signed/delta?after={held}"))
                        .set("Authorization", &format!("Bearer {t}"))
                        .call()
                        .map_err(|e| e.to_string())?;
                    if r.status() == 204 {
                        return Ok(None);
                    }
                    let v: u64 = r
                        .header("x-tapgate-blocklist-version")
                        .and_then(|v| v.parse().ok())
                        .ok_or("no version header")?;
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes)
                        .map_err(|e| e.to_string())?;
                    Ok(Some((v, bytes)))
                })
                .await;
            // A list every validator would refuse (another operator's, or not signed by the
            // back office this gateway knows) is a configuration error: say so, once per
            // version, and relay nothing.
            let fetched = match fetched {
                Ok(Ok(Some((v, delta)))) => {
                    match purse::blocklist::ListUpdate::verify(&delta, &bl_pk) {
                        Ok(u) if u.operator == bl_cfg.operator => Ok(Ok(Some((v, delta)))),
                        other => {
                            if refused_version != Some(v) {
                                refused_version = Some(v);
                                let why = match other {
                                    Ok(u) => format!(
                                        "it is operator {:?}'s list; this gateway serves {:?} (set operator in the charging server's config)",
                                        u.operator, bl_cfg.operator
                                    ),
                                    Err(e) => e.to_string(),
                                };
                                tracing::error!(version = v, "blocklist from the charging server not relayed: validators would refuse it: {why}");
                            }
                            Ok(Ok(None))
                        }
                    }
                }
                other => other,
            };
            match fetched {
                Ok(Ok(Some((v, delta)))) => {
                    let topic = format!("tapgate/v1/{}/blocklist/delta", bl_cfg.operator);
                    if bl_client
                        .publish(topic, QoS::AtLeastOnce, false, delta)
                        .await
                        .is_ok()
                    {
                        bl_stats.blocklist_version.store(v, Ordering::Relaxed);
                        if let Ok(mut pr) = bl_stats.propagation.lock() {
                            pr.published(v, now_ms());
                        }
                        let s = bl_store.clone();
                        let _ =
                            tokio::task::spawn_blocking(move || s.set_blocklist_version(v)).await;
                        snapshot_due = true;
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!(%e, "fetching blocklist changes failed"),
                Err(e) => tracing::error!(%e, "blocklist task failed"),
            }
            if snapshot_due && last_snapshot.elapsed() >= Duration::from_secs(10) {
                last_snapshot = std::time::Instant::now();
                let (a, b, t) = (agent.clone(), base.clone(), token.clone());
                let snap =
                    tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, String> {
                        let r = a
                            .get(&format!("{b}/v1/blocklist/signed/snapshot"))
                            .set("Authorization", &format!("Bearer {t}"))
                            .call()
                            .map_err(|e| e.to_string())?;
                        if r.status() == 204 {
                            return Ok(None);
                        }
                        let mut bytes = Vec::new();
                        std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes)
                            .map_err(|e| e.to_string())?;
                        Ok(Some(bytes))
                    })
                    .await;
                let snap = snap.map(|r| {
                    r.map(|o| {
                        o.filter(|b| {
                            purse::blocklist::ListUpdate::verify(b, &bl_pk)
                                .is_ok_and(|u| u.operator == bl_cfg.operator)
                        })
                    })
                });
                if let Ok(Ok(Some(bytes))) = snap {
                    let topic = format!("tapgate/v1/{}/blocklist/snapshot", bl_cfg.operator);
                    if bl_client
                        .publish(topic, QoS::AtLeastOnce, true, bytes)
                        .await
                        .is_ok()
                    {
                        snapshot_due = false;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Acknowledgements and confirmations leave from their own tasks: the MQTT request queue
    // drains only while the event loop polls, and the event loop waits while the ingest queue
    // is full, so ingestion must never wait on that request queue itself (it did, and a broker
    // pushing more unacknowledged messages than the two queues hold — Mosquitto does on a
    // backlog — stopped the gateway for good).
    // - Acks: one task per connection (a stuck connection holds up only its own), unbounded
    //   but bounded in fact by what the broker has in flight to that connection; never
    //   dropped (a dropped ack would hold the broker's in-flight slot until a reconnect).
    // - Confirmations: one bounded queue; when it is full a confirmation is dropped and counted
    //   — safe, the validator sends the tap again and gets it confirmed as a duplicate.
    let mut ack_txs = Vec::with_capacity(clients.len());
    let mut senders = Vec::with_capacity(clients.len() + 1);
    for c in &clients {
        let (atx, mut arx) = tokio::sync::mpsc::unbounded_channel::<rumqttc::Publish>();
        let c = c.clone();
        senders.push(tokio::spawn(async move {
            while let Some(p) = arx.recv().await {
                if let Err(e) = c.ack(&p).await {
                    tracing::warn!(%e, "ack failed; the broker will redeliver (a duplicate)");
                }
            }
        }));
        ack_txs.push(atx);
    }
    let (confirm_tx, mut confirm_rx) =
        tokio::sync::mpsc::channel::<(u32, String, String)>(cfg.queue_max_messages.max(1_000));
    let confirm_client = clients[0].clone();
    senders.push(tokio::spawn(async move {
        while let Some((device, topic, body)) = confirm_rx.recv().await {
            if let Err(e) = confirm_client
                .publish(topic, QoS::AtLeastOnce, false, body)
                .await
            {
                tracing::warn!(%e, device, "confirmation not sent; the validator will resend");
            }
        }
    }));

    // Ingest: batches of publishes, one durable transaction each, then acks and confirmations.
    let ingest = async {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < cfg.ingest_batch_max_messages {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let (sources, messages): (Vec<Source>, Vec<Message>) = batch.drain(..).unzip();
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let outcome = ingest_durably(&store, &keys, &stats, messages, now_ms).await;
            stats.stored.fetch_add(outcome.stored, Ordering::Relaxed);
            stats
                .duplicates
                .fetch_add(outcome.duplicates, Ordering::Relaxed);
            stats
                .quarantined
                .fetch_add(outcome.quarantined, Ordering::Relaxed);
            for source in sources {
                if let Source::Mqtt(conn, p) = source {
                    let _ = ack_txs[conn].send(p);
                }
            }
            for device in &outcome.flagged {
                tracing::warn!(
                    device,
                    "device flagged: its quarantine reached its bound (oldest entries dropped; further garbage throttled)"
                );
            }
            for ((op, device), seqs) in outcome.confirmations {
                let topic = format!("tapgate/v1/{op}/devices/{device}/confirm");
                // The device's key MACs each confirmation (no key: nothing to confirm with;
                // the tap could not have verified either).
                let Ok(device_key) = keys.device_key(device) else {
                    continue;
                };
                // A draining outbox can put hundreds of thousands of a device's taps in one
                // batch: confirmations go in messages of at most CONFIRM_MAX_SEQS (≈ 40 kB).
                for chunk in seqs.chunks(CONFIRM_MAX_SEQS) {
                    let Ok(body) = purse::confirm::encode_with_key(&op, device, chunk, &device_key)
                    else {
                        continue;
                    };
                    if confirm_tx.try_send((device, topic.clone(), body)).is_err() {
                        let n = stats.confirmations_dropped.fetch_add(1, Ordering::Relaxed);
                        if n.is_power_of_two() || n == 0 {
                            tracing::warn!(
                                device,
                                dropped = n + 1,
                                "confirmation queue full; confirmation dropped (the validator will resend)"
                            );
                        }
                    }
                }
            }
        }
    };
    let link_abort = link_task.as_ref().map(|t| t.abort_handle());
    let link_closed = async {
        match link_task {
            Some(t) => t
                .await
                .unwrap_or_else(|e| format!("the link task failed: {e}")),
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        _ = ingest => Ok(()),
        _ = shutdown => Ok(()),
        reason = link_closed => Err(reason),
    };
    for c in &clients {
        let _ = tokio::time::timeout(Duration::from_secs(1), c.disconnect()).await;
    }
    for t in mqtt_tasks {
        t.abort();
    }
    for t in senders {
        t.abort();
    }
    if let Some(a) = link_abort {
        a.abort();
    }
    forwarder.abort();
    blocklists.abort();
    result
}

/// One batch made durable. A failed transaction stored nothing, so it is tried again with the
/// same batch (nothing is acknowledged or confirmed until it is durable): a full store stalls
/// ingestion instead of dropping taps (with the embedded broker, messages beyond its log's size
/// are then dropped by the broker and sent again by their validators, which keep them until
/// confirmed). A full store raises the alarm ([`GatewayStats::store_full`], one log line per
/// episode) and is tried again with backoff (≤ 5 s) until room returns — the forwarder trims
/// the outbox, the API keeps serving, and garbage cannot be what fills it (quarantine stops
/// well before, [`crate::store::StoreLimits`]). A batch whose ingestion panics is taken one
/// message at a time, and a message that panics alone is dropped unconfirmed (its validator
/// keeps it) instead of stopping ingestion for everyone.
pub async fn ingest_durably(
    store: &Store,
    keys: &KeySet,
    stats: &GatewayStats,
    messages: Vec<Message>,
    now_ms: u64,
) -> crate::store::IngestOutcome {
    let once = |m: Arc<Vec<Message>>| {
        let (s, k) = (store.clone(), keys.clone());
        tokio::task::spawn_blocking(move || s.ingest(&m, |d| k.device_key(d).ok(), now_ms))
    };
    let durable = |m: Arc<Vec<Message>>| async move {
        let mut backoff_ms = 100u64;
        loop {
            match once(m.clone()).await {
                Ok(Ok(o)) => {
                    if stats.store_full.swap(false, Ordering::Relaxed) {
                        tracing::warn!("gateway store has room again; ingestion resumed");
                    }
                    return Some(o);
                }
                Ok(Err(e)) if e.is_full() => {
                    if !stats.store_full.swap(true, Ordering::Relaxed) {
                        stats.store_full_events.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            %e,
                            messages = m.len(),
                            "ALARM: gateway store full; taps are neither acknowledged nor confirmed (validators keep them and send them again) until room returns"
                        );
                    }
                }
                Ok(Err(e)) => tracing::error!(%e, "ingest failed; retrying the batch"),
                Err(e) => {
                    tracing::error!(%e, messages = m.len(), "ingestion panicked");
                    return None;
                }
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(5_000);
        }
    };
    let messages = Arc::new(messages);
    if let Some(o) = durable(messages.clone()).await {
        return o;
    }
    let mut total = crate::store::IngestOutcome::default();
    for m in messages.iter() {
        match durable(Arc::new(vec![m.clone()])).await {
            Some(o) => {
                total.stored += o.stored;
                total.duplicates += o.duplicates;
                total.quarantined += o.quarantined;
                total.quarantine_dropped += o.quarantine_dropped;
                total.quarantine_throttled += o.quarantine_throttled;
                total.flagged.extend(o.flagged);
                for (k, seqs) in o.confirmations {
                    total.confirmations.entry(k).or_default().extend(seqs);
                }
            }
            None => tracing::error!(
                topic = %m.topic,
                "a message made ingestion panic; dropped unconfirmed (its validator keeps it)"
            ),
        }
    }
    total
}
