//! The MQTT side of the daemon: the connection options, the event loop (connection state,
//! confirmations, downlink), the publisher (outbox, resends, heartbeats) and the drain and
//! goodbye at shutdown.

use super::DownlinkOutcome;
use super::{
    apply_downlink_outcome, now_ms, Confirmations, DaemonError, Downlink, Metrics, MqttSettings,
    Settings, Shared, Topics, MAX_MESSAGES_PER_ROUND, MAX_TAPS_PER_MESSAGE, RESEND_AFTER_MS,
};
use crate::journal::Journal;
use purse::rotation::TrustedKeys;
use purse::sam::Sam;
use purse::tap::TAP_LEN;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the event loop and the publisher share: the client, where the outbox was published
/// up to (a reconnect resets it to 0: resend everything unconfirmed) and whether the broker
/// is connected.
#[derive(Clone)]
struct Link {
    client: AsyncClient,
    topics: Topics,
    cursor: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
    /// `host:port`, the username and whether a password is set, for the log.
    broker: Arc<str>,
    user: Arc<str>,
    has_password: bool,
}

/// How often the same connection failure is logged again while it lasts.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Connects to the broker, runs the event loop as a task and publishes until the reader is
/// done (or shutdown is set) and the outbox drained (or `drain_timeout` passed); then says
/// goodbye and disconnects.
pub(super) async fn run(
    settings: &Settings,
    m: &MqttSettings,
    topics: &Topics,
    shared: &Shared,
) -> Result<(), DaemonError> {
    let (client, eventloop, brokers) = connect(settings, m, topics);
    let link = Link {
        client,
        topics: topics.clone(),
        cursor: Arc::new(AtomicU64::new(0)),
        connected: Arc::new(AtomicBool::new(false)),
        broker: brokers[0].1.clone(),
        user: m.username.clone().unwrap_or_default().into(),
        has_password: m.password.is_some(),
    };
    let confirmations = confirmations(settings, shared)?;
    tokio::spawn(event_loop(
        eventloop,
        brokers,
        link.clone(),
        shared.clone(),
        confirmations,
        Arc::new(settings.signing_pub.clone()),
    ));
    publish_until_drained(settings, &link, shared).await?;
    goodbye(&link, settings.device_id).await;
    Ok(())
}

/// The client and its event loop: persistent session, last will (offline, retained),
/// credentials and TLS when configured, TCP_NODELAY; and the options for each broker it may
/// use (`host:port`, then the fallbacks) with its name for the log.
fn connect(
    settings: &Settings,
    m: &MqttSettings,
    topics: &Topics,
) -> (AsyncClient, EventLoop, Vec<(MqttOptions, Arc<str>)>) {
    let brokers: Vec<(MqttOptions, Arc<str>)> = std::iter::once((&m.host, m.port))
        .chain(m.fallback.iter().map(|(h, p)| (h, *p)))
        .map(|(host, port)| {
            (
                options(settings, m, topics, host, port),
                format!("{host}:{port}").into(),
            )
        })
        .collect();
    let (client, mut eventloop) = AsyncClient::new(brokers[0].0.clone(), 256);
    let net = network_options(eventloop.network_options(), m);
    eventloop.set_network_options(net);
    (client, eventloop, brokers)
}

/// The socket options of every connection: TCP_NODELAY (small messages both ways: without
/// it, Nagle's algorithm held a tap or a confirmation until the peer's delayed ACK, ≈ 40 ms
/// at p99) and `[mqtt] connect_timeout_s` for one attempt (TCP, TLS, CONNACK; rumqttc also
/// bounds each flush of a live connection by it).
fn network_options(mut net: rumqttc::NetworkOptions, m: &MqttSettings) -> rumqttc::NetworkOptions {
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(m.connect_timeout.as_secs().max(1));
    net
}

/// The options for one broker.
fn options(
    settings: &Settings,
    m: &MqttSettings,
    topics: &Topics,
    host: &str,
    port: u16,
) -> MqttOptions {
    let mut opts = MqttOptions::new(format!("validator-{}", settings.device_id), host, port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(32 << 20, 32 << 20)
        .set_last_will(LastWill::new(
            topics.status.clone(),
            serde_json::json!({"device": settings.device_id, "online": false}).to_string(),
            QoS::AtLeastOnce,
            true,
        ));
    if let (Some(u), Some(p)) = (&m.username, &m.password) {
        opts.set_credentials(u.clone(), p.clone());
    }
    if let Some(ca) = &m.tls_ca_pem {
        tapgate_http::serve::install_crypto_provider();
        opts.set_transport(rumqttc::Transport::tls(ca.clone(), None, None));
    }
    opts
}

/// The confirmation checker, with a copy of the SAM's device key.
fn confirmations(settings: &Settings, shared: &Shared) -> Result<Arc<Confirmations>, DaemonError> {
    let g = shared
        .gate
        .lock()
        .map_err(|_| DaemonError::Reader("gate lock".into()))?;
    Ok(Arc::new(Confirmations {
        journal: shared.journal.clone(),
        metrics: shared.metrics.clone(),
        device_key: g.sam.device_key().clone(),
        operator: settings.operator.clone(),
        device_id: settings.device_id,
        log: Mutex::new((None, 0)),
    }))
}

/// Incoming: connection state, confirmations, downlink. Runs for the life of the process.
/// A failed connection moves on to the next of `brokers` (a cluster's other nodes), in turn.
async fn event_loop(
    mut eventloop: EventLoop,
    brokers: Vec<(MqttOptions, Arc<str>)>,
    mut link: Link,
    shared: Shared,
    confirmations: Arc<Confirmations>,
    pubkey: Arc<TrustedKeys>,
) {
    // The last failure logged and when: a broker that stays away or keeps refusing is logged
    // once a minute, not at every retry.
    let mut logged: Option<(String, Instant)> = None;
    let mut current = 0usize;
    // Refused subscriptions in a row (each pause before subscribing again doubles, to 32 s).
    let mut refused_subscriptions = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(broker = %link.broker, user = %link.user, "connected to the MQTT broker");
                logged = None;
                on_connected(&link, &shared)
            }
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                // A broker may refuse a subscription for a while (a NATS node whose JetStream
                // is moving leaderships after a node died): without confirmations the outbox
                // would never drain on this connection, so subscribe again after a pause.
                refused_subscriptions += 1;
                let pause = Duration::from_millis(500 << refused_subscriptions.min(6));
                tracing::warn!(broker = %link.broker, pause_ms = pause.as_millis() as u64, "the MQTT broker refused a subscription; subscribing again");
                let (client, topics) = (link.client.clone(), link.topics.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(pause).await;
                    subscribe_all(&client, &topics);
                });
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if refused_subscriptions > 0 {
                    // Confirmations published while refused went nowhere: resend everything
                    // unconfirmed now rather than when the oldest tap has waited too long.
                    tracing::info!(broker = %link.broker, "the MQTT broker took the subscriptions");
                    link.cursor.store(0, Ordering::Relaxed);
                    shared.wake.notify_one();
                }
                refused_subscriptions = 0
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == link.topics.confirm {
                    on_confirmation(&shared, confirmations.clone(), p).await;
                } else {
                    on_downlink(&link.topics, &shared, pubkey.clone(), p).await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if link.connected.swap(false, Ordering::Relaxed) {
                    tracing::warn!(broker = %link.broker, error = %e, "MQTT connection lost; reconnecting (taps stay journalled)");
                } else {
                    log_failure(&link, &e, &mut logged);
                }
                shared.metrics.mqtt_connected.set(0);
                if brokers.len() > 1 {
                    current = (current + 1) % brokers.len();
                    eventloop.mqtt_options = brokers[current].0.clone();
                    link.broker = brokers[current].1.clone();
                }
                tokio::time::sleep(reconnect_pause()).await;
            }
        }
    }
}

/// The pause before the next connection attempt: 250 to 750 ms, drawn anew each time, so a
/// fleet that lost its broker at once does not come back in one burst of CONNECTs (the mean
/// is the 500 ms a validator has always waited).
fn reconnect_pause() -> Duration {
    use rand::Rng;
    Duration::from_millis(rand::thread_rng().gen_range(250..=750))
}

/// A connection attempt that failed: a refused login says which setting to check; logged when
/// it changes and once a minute while it lasts.
fn log_failure(link: &Link, e: &rumqttc::ConnectionError, logged: &mut Option<(String, Instant)>) {
    use rumqttc::{ConnectReturnCode as Code, ConnectionError as E};
    let refused = match e {
        E::ConnectionRefused(Code::BadUserNamePassword | Code::NotAuthorized) => {
            Some(if link.has_password {
                "authentication refused: check [mqtt] password_env (or password_file) and the broker's password for this user"
            } else {
                "authentication refused: no password set: check [mqtt] password_env (default TAPGATE_MQTT_PASSWORD) or password_file"
            })
        }
        _ => None,
    };
    let what = refused.map_or_else(|| e.to_string(), str::to_string);
    let due = logged
        .as_ref()
        .is_none_or(|(w, t)| *w != what || t.elapsed() >= FAILURE_LOG_EVERY);
    if !due {
        return;
    }
    match refused {
        Some(why) => {
            tracing::error!(broker = %link.broker, user = %link.user, "the MQTT broker refused this validator: {why}; retrying (taps stay journalled)")
        }
        None => {
            tracing::warn!(broker = %link.broker, error = %e, "cannot connect to the MQTT broker; retrying (taps stay journalled)")
        }
    }
    *logged = Some((what, Instant::now()));
}

/// A (re)connection: resend everything not confirmed yet (the gateway drops duplicates) and
/// subscribe to confirmations and downlink.
fn on_connected(link: &Link, shared: &Shared) {
    link.connected.store(true, Ordering::Relaxed);
    shared.metrics.mqtt_connected.set(1);
    link.cursor.store(0, Ordering::Relaxed);
    subscribe_all(&link.client, &link.topics);
    shared.wake.notify_one();
}

/// Subscribes to confirmations and downlink (again: the broker replaces a subscription it
/// holds), in one SUBSCRIBE: its one SUBACK says whether the broker took them all.
fn subscribe_all(client: &AsyncClient, t: &Topics) {
    let filters = [
        &t.confirm,
        &t.blocklist_snapshot,
        &t.blocklist_chunks,
        &t.blocklist_delta,
        &t.fares,
        &t.actions_snapshot,
        &t.actions_delta,
        &t.ceiling,
    ]
    .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
    // Never await the request queue from the event loop itself: it only drains while this
    // loop polls.
    if let Err(e) = client.try_subscribe_many(filters) {
        tracing::warn!(error = %e, "subscribe failed");
    }
}

/// A confirmation: verified and applied off the event loop; the outbox gauges follow.
async fn on_confirmation(shared: &Shared, confirmations: Arc<Confirmations>, p: Publish) {
    let n = tokio::task::spawn_blocking(move || confirmations.apply(&p.payload)).await;
    if let Ok(Ok(_)) = n {
        let journal = &shared.journal;
        if let Ok(d) = journal.outbox_len() {
            shared.metrics.outbox_depth.set(d as i64);
            if d < journal.capacity_taps() {
                shared.metrics.outbox_full.set(0);
            }
        }
    }
}

/// A downlink message (ceiling grant, action list, fare table, blocklist): verified, applied
/// and journalled off the event loop (it waits for the gate, which a tap may hold).
async fn on_downlink(topics: &Topics, shared: &Shared, pubkey: Arc<TrustedKeys>, p: Publish) {
    let handle: fn(&Shared, &TrustedKeys, &[u8]) = if p.topic == topics.ceiling {
        on_ceiling
    } else if p.topic == topics.actions_snapshot || p.topic == topics.actions_delta {
        on_actions
    } else if p.topic == topics.fares {
        on_fare_table
    } else {
        on_blocklist
    };
    let shared = shared.clone();
    let _ = tokio::task::spawn_blocking(move || handle(&shared, &pubkey, &p.payload)).await;
}

/// This device's action-list ceiling grant (MAC'd with its device key: no signing keys).
fn on_ceiling(shared: &Shared, _: &TrustedKeys, payload: &[u8]) {
    let Ok(mut g) = shared.gate.lock() else {
        return;
    };
    match super::apply_action_grant(&mut g, &shared.journal, payload) {
        Ok(DownlinkOutcome::Applied(seq)) => {
            let ceiling = g.sam.ceiling_minor();
            shared.metrics.action_ceiling_minor.set(ceiling);
            tracing::info!(
                seq,
                ceiling_minor = g.sam.ceiling_minor(),
                "action ceiling granted"
            )
        }
        Ok(DownlinkOutcome::AlreadyHeld { .. } | DownlinkOutcome::Pending { .. }) => {}
        Err(e) => tracing::warn!("{e}"),
    }
}

/// An action-list snapshot or delta.
fn on_actions(shared: &Shared, pubkey: &TrustedKeys, payload: &[u8]) {
    let Ok(mut l) = shared.actions.lock() else {
        return;
    };
    match super::apply_actions(&mut l, &shared.journal, pubkey, payload, now_ms()) {
        Ok(DownlinkOutcome::Applied(v)) => {
            let held = i64::try_from(v).unwrap_or(i64::MAX);
            shared.metrics.action_list_version.set(held);
            tracing::info!(version = v, orders = l.len(), "action list applied")
        }
        Ok(DownlinkOutcome::AlreadyHeld { held, got }) => {
            tracing::debug!(held, got, "action list already held")
        }
        Ok(DownlinkOutcome::Pending { .. }) => {}
        Err(e) => {
            shared.metrics.count_downlink_refused(&e);
            tracing::warn!("{e}")
        }
    }
}

/// A blocklist message: verified before the gate is taken and journalled after it is released
/// ([`super::take_blocklist_shared`]), so taps never wait behind a chunk's signature check; the
/// journal write is the writer thread's (`durable`: retried until it commits, and only then
/// the version reported).
fn on_blocklist(shared: &Shared, pubkey: &TrustedKeys, payload: &[u8]) {
    let out = super::durable::apply_blocklist(shared, pubkey, payload);
    log_downlink(shared, Downlink::Blocklist, out);
}

/// A fare table: verified, applied and journalled with the gate held (a table is small).
fn on_fare_table(shared: &Shared, pubkey: &TrustedKeys, payload: &[u8]) {
    let Ok(mut g) = shared.gate.lock() else {
        return;
    };
    let kind = Downlink::FareTable;
    let out = apply_downlink_outcome(&mut g, &shared.journal, pubkey, kind, payload);
    if let Ok(DownlinkOutcome::Applied(_)) = out {
        shared
            .metrics
            .fare_table_version
            .set(i64::from(g.fare_version()));
    }
    drop(g);
    log_downlink(shared, kind, out);
}

/// Logs what a blocklist or fare-table message did (a refusal is also counted).
fn log_downlink(shared: &Shared, kind: Downlink, out: Result<DownlinkOutcome, String>) {
    match out {
        Ok(DownlinkOutcome::Applied(v)) => tracing::info!(?kind, version = v, "downlink applied"),
        Ok(DownlinkOutcome::AlreadyHeld { held, got }) => {
            tracing::debug!(?kind, held, got, "downlink already held");
        }
        Ok(DownlinkOutcome::Pending {
            version,
            received,
            count,
        }) => {
            tracing::debug!(version, received, count, "blocklist snapshot chunk kept");
        }
        Err(e) => {
            shared.metrics.count_downlink_refused(&e);
            tracing::warn!(?kind, "{e}")
        }
    }
}

/// Publishing and heartbeats, until the reader is done (or shutdown is set) and the outbox
/// is empty or `drain_timeout` has passed.
async fn publish_until_drained(
    settings: &Settings,
    link: &Link,
    shared: &Shared,
) -> Result<(), DaemonError> {
    let mut heartbeat = tokio::time::interval(settings.heartbeat);
    let mut drain_deadline: Option<Instant> = None;
    // The first heartbeat goes out as soon as a connection is up, not a period later.
    let mut announced = false;
    let mut was_connected = false;
    let mut resend = Resend::default();
    loop {
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = heartbeat.tick() => {
                // Only while connected (offline it would only fill the request queue).
                if link.connected.load(Ordering::Relaxed) {
                    announce(settings, link, shared);
                    announced = true;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let is_connected = link.connected.load(Ordering::Relaxed);
        if is_connected && !was_connected {
            announced = false; // a reconnect: say so now (the last will said offline)
        }
        was_connected = is_connected;
        if !announced && is_connected {
            announce(settings, link, shared);
            announced = true;
        }
        if link.connected.load(Ordering::Relaxed) {
            resend.check(&shared.journal, &link.cursor)?;
            publish_outbox(link, &shared.journal).await?;
        }
        if shared.reader_done.load(Ordering::Relaxed) || shared.shutdown.load(Ordering::Relaxed) {
            let deadline =
                *drain_deadline.get_or_insert_with(|| Instant::now() + settings.drain_timeout);
            if shared.journal.outbox_len()? == 0 || Instant::now() >= deadline {
                return Ok(());
            }
        }
    }
}

/// Publishes the heartbeat (retained).
fn announce(settings: &Settings, link: &Link, shared: &Shared) {
    let taps = shared.taps_done.load(Ordering::Relaxed);
    let status = status(settings.device_id, &shared.metrics, taps).to_string();
    let _ = link
        .client
        .try_publish(link.topics.status.clone(), QoS::AtLeastOnce, true, status);
}

/// The heartbeat's body. The versions come from the metrics, never from the gate (no waiting
/// on a tap); the blocklist's is the one journalled (`durable`).
pub(super) fn status(device_id: u32, metrics: &Metrics, taps: u64) -> serde_json::Value {
    serde_json::json!({
        "device": device_id,
        "online": true,
        "blocklist_version": metrics.blocklist_version.get(),
        "fare_table_version": metrics.fare_table_version.get(),
        "outbox_depth": metrics.outbox_depth.get(),
        "clock_ms": now_ms(),
        "taps": taps,
    })
}

/// The oldest tap in the outbox, since when it waits, and how long it may wait before
/// everything unconfirmed is sent again: a tap whose confirmation was lost stays there while
/// newer ones are confirmed around it. The wait doubles while the same tap stays oldest (up
/// to 8×), so an overloaded gateway is not sent the whole outbox every 30 s.
#[derive(Default)]
struct Resend {
    head: Option<(u64, u64, u64)>,
}

impl Resend {
    /// When the oldest unconfirmed tap has waited too long (its message or its confirmation
    /// was lost, or nothing has been confirmed at all), rewinds the cursor: everything
    /// unconfirmed is sent again (the gateway confirms duplicates without storing them).
    fn check(&mut self, journal: &Journal, cursor: &AtomicU64) -> Result<(), DaemonError> {
        let now = now_ms();
        let oldest = journal.outbox_after(0, 1)?.first().map(|(seq, _)| *seq);
        self.head = match (oldest, self.head) {
            (None, _) => None,
            (Some(seq), Some((h, since, wait))) if seq == h => {
                if now.saturating_sub(since) > wait {
                    cursor.store(0, Ordering::Relaxed);
                    Some((seq, now, (wait * 2).min(8 * RESEND_AFTER_MS)))
                } else {
                    Some((h, since, wait))
                }
            }
            (Some(seq), _) => Some((seq, now, RESEND_AFTER_MS)),
        };
        Ok(())
    }
}

/// Publishes journalled taps after the cursor, several per message when there is a backlog.
async fn publish_outbox(link: &Link, journal: &Journal) -> Result<(), DaemonError> {
    let cursor = &link.cursor;
    for _ in 0..MAX_MESSAGES_PER_ROUND {
        let after = cursor.load(Ordering::Relaxed);
        let batch = journal.outbox_after(after, MAX_TAPS_PER_MESSAGE)?;
        let Some(&(last, _)) = batch.last() else {
            break;
        };
        let mut payload = Vec::with_capacity(batch.len() * TAP_LEN);
        for (_, w) in &batch {
            payload.extend_from_slice(w);
        }
        if link
            .client
            .try_publish(link.topics.taps.clone(), QoS::AtLeastOnce, false, payload)
            .is_err()
        {
            break; // the client's queue is full: next round
        }
        // A reconnect may have reset the cursor meanwhile: that reset wins.
        if cursor
            .compare_exchange(after, last, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Says offline (retained), lets it go out, and disconnects.
async fn goodbye(link: &Link, device_id: u32) {
    let _ = link.client.try_publish(
        link.topics.status.clone(),
        QoS::AtLeastOnce,
        true,
        serde_json::json!({"device": device_id, "online": false, "clock_ms": now_ms()}).to_string(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), link.client.disconnect()).await;
}

#[cfg(test)]
mod tests {
    use super::{network_options, MqttSettings};
    use std::time::Duration;

    /// `[mqtt] connect_timeout_s` reaches the event loop (rumqttc's own default is 5 s).
    #[test]
    fn the_connect_timeout_is_the_connections() {
        for (timeout, secs) in [(Duration::from_secs(30), 30), (Duration::from_secs(7), 7)] {
            let m = MqttSettings {
                host: "n1".into(),
                port: 1883,
                fallback: vec![],
                connect_timeout: timeout,
                username: None,
                password: None,
                tls_ca_pem: None,
            };
            let net = network_options(rumqttc::NetworkOptions::new(), &m);
            assert_eq!(net.connection_timeout(), secs);
        }
    }
}
