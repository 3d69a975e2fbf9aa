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

use crate::store::{Message, Store};
use purse::keys::KeySet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod actions;
mod fares;
mod forwarder;
mod mqtt;
mod nats;
mod reach;
mod relay;
mod sender;
mod signed_list;

/// Daemon settings. `Debug` never shows the MQTT password or the clearing token.
#[derive(Clone)]
pub struct GatewayConfig {
    /// This gateway's id (batch ids, MQTT client id).
    pub gateway_id: String,
    /// The broker: host and port.
    pub broker: (String, u16),
    /// TLS to the broker (`mqtts://`): the PEM CA certificates its certificate must chain to
    /// (every broker of `broker` and `fallback_brokers` alike); `None` is plain MQTT.
    pub broker_tls_ca_pem: Option<Vec<u8>>,
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
    /// More brokers (host, port) for the MQTT connections, tried in turn after `broker` when a
    /// connection fails: the other nodes of a broker cluster.
    pub fallback_brokers: Vec<(String, u16)>,
    /// Take the taps from a NATS cluster's JetStream as one durable consumer shared by every
    /// gateway of the operator ([`NatsIngest`]) instead of an MQTT subscription; the MQTT
    /// connection (to the cluster's MQTT listeners) keeps heartbeats, confirmations and the
    /// downlink. The NATS user is the gateway's MQTT user.
    pub nats: Option<NatsIngest>,
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
            .field("fallback_brokers", &self.fallback_brokers)
            .field("nats", &self.nats)
            .finish_non_exhaustive()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            gateway_id: "gw1".into(),
            broker: ("127.0.0.1".into(), 18830),
            broker_tls_ca_pem: None,
            mqtt_credentials: None,
            ingest_batch_max_messages: 4096,
            forward_batch_max_taps: 1_000,
            charging: None,
            operator: "default".into(),
            queue_max_messages: 10_000,
            share_group: None,
            ingest_connections: 1,
            relay_blocklists: true,
            fallback_brokers: Vec::new(),
            nats: None,
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
    /// Batches clearing did not take (unreachable, refused); each is retried.
    pub forward_failures: AtomicU64,
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
    /// Blocklist versions from the charging server not relayed because every validator would
    /// refuse them (another operator's list, or a signature this gateway cannot verify).
    pub blocklists_refused: AtomicU64,
    /// Block propagation reports the charging server refused for good (a 4xx other than 401,
    /// 408 and 429), dropped rather than sent again.
    pub propagation_reports_dropped: AtomicU64,
    /// Which version each validator reports holding, and how fast each version spread.
    pub propagation: std::sync::Mutex<crate::propagation::Propagation>,
    /// What the embedded broker's ACL front refused (set when this process runs it).
    pub broker: std::sync::OnceLock<Arc<crate::broker::BrokerStats>>,
}

impl GatewayStats {
    /// What each validator last reported by heartbeat (none when the tracker is poisoned).
    pub fn validator_statuses(&self) -> Vec<crate::propagation::ValidatorStatus> {
        self.propagation
            .lock()
            .map(|p| p.statuses())
            .unwrap_or_default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub use nats::{subject_to_topic, tap_consumer, tap_stream, NatsIngest};

pub use crate::broker::{
    start_embedded_broker, start_embedded_broker_linked, start_embedded_broker_tls, BrokerStats,
    BrokerUsers, TapLink,
};

/// Where a message waiting for ingestion came from: an MQTT connection (acknowledged to the
/// broker once durable), the in-process link (nothing to acknowledge) or a NATS cluster's
/// JetStream consumer (acknowledged once durable).
enum Source {
    Mqtt(usize, rumqttc::Publish),
    Link,
    Nats(Box<nats::Delivery>),
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

/// The daemon's tasks: the MQTT connections ([`mqtt`]; or the embedded broker's link), the
/// senders of acks and confirmations ([`sender`]), the forwarder to clearing ([`forwarder`])
/// and the blocklist relay ([`relay`]), around the ingest loop, until `shutdown` resolves, the
/// ingest queue closes or the link closes (an error).
async fn run_inner(
    cfg: GatewayConfig,
    link: Option<TapLink>,
    store: Store,
    keys: KeySet,
    stats: Arc<GatewayStats>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<(Source, Message)>(cfg.queue_max_messages);
    let taps_elsewhere = link.is_some() || cfg.nats.is_some();
    // The confirmations' publishes the broker has not acknowledged yet (connection 0's).
    let window = Arc::new(sender::Window::default());
    let mqtt::Connections {
        clients,
        tasks: mqtt_tasks,
    } = mqtt::connect(&cfg, taps_elsewhere, &stats, &tx, &window);
    let (nats_task, nats_acks) = match &cfg.nats {
        Some(n) if link.is_none() => {
            let (taps, acks, ack_tx) = nats::spawn(
                n.clone(),
                cfg.operator.clone(),
                cfg.mqtt_credentials.clone(),
                tx.clone(),
                stats.clone(),
            );
            (Some(taps), Some((acks, ack_tx)))
        }
        _ => (None, None),
    };
    let link_task = link
        .map(|l| mqtt::spawn_link(l, tx.clone(), stats.clone()))
        .or(nats_task);
    drop(tx);
    let forwarder = forwarder::spawn(cfg.clone(), store.clone(), keys.clone(), stats.clone());
    let blocklists = relay::spawn(
        clients[0].clone(),
        cfg.clone(),
        store.clone(),
        keys.trusted_signing_keys(),
        stats.clone(),
    );
    let action_lists = actions::spawn(
        clients[0].clone(),
        cfg.clone(),
        store.clone(),
        keys.trusted_signing_keys(),
    );
    let fare_tables = fares::spawn(
        clients[0].clone(),
        cfg.clone(),
        store.clone(),
        keys.trusted_signing_keys(),
    );
    let reach = reach::spawn(&cfg, stats.clone());
    let senders = sender::Senders::spawn(&clients, cfg.queue_max_messages, keys.clone(), window);
    let nats_ack = nats_acks.as_ref().map(|(_, a)| a.clone());
    let ingest = ingest_loop(rx, &cfg, &store, &keys, &stats, &senders, nats_ack);
    let link_abort = link_task.as_ref().map(|t| t.abort_handle());
    let link_closed = async {
        match link_task {
            Some(t) => t
                .await
                .unwrap_or_else(|e| format!("the tap task failed: {e}")),
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
    senders.abort();
    if let Some(a) = link_abort {
        a.abort();
    }
    if let Some((acks, _)) = nats_acks {
        acks.abort();
    }
    forwarder.abort();
    blocklists.abort();
    action_lists.abort();
    fare_tables.abort();
    reach.abort();
    result
}

/// Ingest: batches of publishes (at most `ingest_batch_max_messages`), one durable
/// transaction each, then acks and confirmations. Ends when every producer is gone.
async fn ingest_loop(
    mut rx: tokio::sync::mpsc::Receiver<(Source, Message)>,
    cfg: &GatewayConfig,
    store: &Store,
    keys: &KeySet,
    stats: &GatewayStats,
    senders: &sender::Senders,
    nats_acks: Option<tokio::sync::mpsc::UnboundedSender<Box<nats::Delivery>>>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < cfg.ingest_batch_max_messages {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (sources, messages): (Vec<Source>, Vec<Message>) = batch.drain(..).unzip();
        let outcome = ingest_durably(store, keys, stats, messages, now_ms()).await;
        stats.stored.fetch_add(outcome.stored, Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add(outcome.duplicates, Ordering::Relaxed);
        stats
            .quarantined
            .fetch_add(outcome.quarantined, Ordering::Relaxed);
        for source in sources {
            match source {
                Source::Mqtt(conn, p) => senders.ack(conn, p),
                Source::Nats(m) => {
                    if let Some(a) = &nats_acks {
                        let _ = a.send(m);
                    }
                }
                Source::Link => {}
            }
        }
        for device in &outcome.flagged {
            tracing::warn!(
                device,
                "device flagged: its quarantine reached its bound (oldest entries dropped; further garbage throttled)"
            );
        }
        senders.confirm(stats, outcome.confirmations, &outcome.device_key_versions);
    }
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
        tokio::task::spawn_blocking(move || {
            s.ingest_with_rings(&m, |d| k.device_key_ring(d).unwrap_or_default(), now_ms)
        })
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
                total.device_key_versions.extend(o.device_key_versions);
            }
            None => tracing::error!(
                topic = %m.topic,
                "a message made ingestion panic; dropped unconfirmed (its validator keeps it)"
            ),
        }
    }
    total
}
