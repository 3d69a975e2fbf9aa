//! The validator daemon: the reader loop (a thread: taps are synchronous and take
//! milliseconds), MQTT store-and-forward (rumqttc, QoS 1, persistent session, reconnect),
//! downlink (signed blocklists and fare tables, verified, applied atomically and journalled),
//! heartbeats with a last will, and Prometheus metrics.
//!
//! Topics (docs/mqtt.md): taps up on `tapgate/v1/<op>/taps/<device>` (one or more 79-byte
//! records per message), confirmations down on `…/devices/<device>/confirm`, heartbeats on
//! `…/devices/<device>/status` (retained; the last will marks the validator offline),
//! blocklists on `…/blocklist/{snapshot,delta}`, fare tables on `…/fares/table` (retained).

use crate::gate::{Answer, Gate, Settled, Step};
use crate::journal::{Journal, JournalError};
use crate::reader::Reader;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use purse::sam::Sam;
use purse::tap::TAP_LEN;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most taps in one MQTT message when the outbox drains a backlog.
pub const MAX_TAPS_PER_MESSAGE: usize = 64;
/// Most messages in flight per publishing round.
const MAX_MESSAGES_PER_ROUND: usize = 32;
/// When the oldest unconfirmed tap has waited this long, everything unconfirmed is sent again.
const RESEND_AFTER_MS: u64 = 30_000;

/// Daemon failures.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    #[error("reader loop: {0}")]
    Reader(String),
}

/// How to reach the broker. `Debug` never shows the password.
#[derive(Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM CA certificates: connect over TLS.
    pub tls_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<secret>"))
            .field("tls", &self.tls_ca_pem.is_some())
            .finish()
    }
}

/// Daemon settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub operator: String,
    /// The card scheme whose signed blocklist this validator holds, from that operator's
    /// topics (a hotel's box on a metro's cards: "metro"); usually `operator` itself.
    pub card_scheme: String,
    pub device_id: u32,
    pub heartbeat: Duration,
    /// The back office's Ed25519 key: downlink messages must verify under it.
    pub signing_pub: [u8; 32],
    pub mqtt: Option<MqttSettings>,
    /// At shutdown, how long to wait for the gateway to confirm what is journalled.
    pub drain_timeout: Duration,
    /// Fault injection: end the process (abort, as a power cut) at this step of this tap.
    pub crash_at: Option<(u64, Step)>,
}

/// Counters and the latency histogram (also what the summary reports).
pub struct Metrics {
    pub registry: Registry,
    pub taps: IntCounterVec,
    pub latency: Histogram,
    pub outbox_depth: IntGauge,
    pub outbox_full: IntGauge,
    pub blocklist_version: IntGauge,
    pub fare_table_version: IntGauge,
    pub mqtt_connected: IntGauge,
    /// Confirmations refused (never acted on), by reason: `bad_mac`, `malformed`.
    pub confirmations_refused: IntCounterVec,
}

impl Metrics {
    /// Registers the validator's metrics.
    pub fn new(device_id: u32) -> Self {
        let registry = Registry::new_custom(
            Some("tapgate_validator".into()),
            Some([("device".to_string(), device_id.to_string())].into()),
        )
        .expect("static registry prefix");
        let taps = IntCounterVec::new(
            Opts::new(
                "taps_total",
                "taps by outcome (accepted, refused, torn, repeat) and reason",
            ),
            &["outcome", "reason"],
        )
        .expect("static metric");
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "tap_seconds",
                "card in field to answer, journal commit included",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3,
            ]),
        )
        .expect("static metric");
        let gauge = |n: &str, h: &str| IntGauge::new(n, h).expect("static metric");
        let confirmations_refused = IntCounterVec::new(
            Opts::new(
                "confirmations_refused_total",
                "confirmations ignored because they did not verify under the device key (forged, altered, another device's) or were malformed; nothing was deleted on them",
            ),
            &["reason"],
        )
        .expect("static metric");
        let m = Self {
            confirmations_refused,
            taps,
            latency,
            outbox_depth: gauge(
                "outbox_depth",
                "journalled taps the gateway has not confirmed",
            ),
            outbox_full: gauge("outbox_full", "1 when the outbox is at its bound (alarm)"),
            blocklist_version: gauge("blocklist_version", "blocklist version held"),
            fare_table_version: gauge("fare_table_version", "fare table version in force"),
            mqtt_connected: gauge("mqtt_connected", "1 while connected to the broker"),
            registry,
        };
        for c in [
            Box::new(m.taps.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.latency.clone()),
            Box::new(m.outbox_depth.clone()),
            Box::new(m.outbox_full.clone()),
            Box::new(m.blocklist_version.clone()),
            Box::new(m.fare_table_version.clone()),
            Box::new(m.mqtt_connected.clone()),
            Box::new(m.confirmations_refused.clone()),
        ] {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub taps: u64,
    pub taps_accepted: u64,
    pub taps_refused: BTreeMap<String, u64>,
    pub taps_torn: u64,
    pub taps_repeat: u64,
    pub tears_settled: u64,
    pub fares_minor: i64,
    pub tap_latency_us_p50: u64,
    pub tap_latency_us_p99: u64,
    pub outbox_left: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Topic names of one validator.
#[derive(Clone, Debug)]
pub struct Topics {
    pub taps: String,
    pub confirm: String,
    pub status: String,
    pub blocklist_snapshot: String,
    pub blocklist_delta: String,
    pub fares: String,
}

impl Topics {
    pub fn new(operator: &str, device: u32) -> Self {
        Self::with_scheme(operator, operator, device)
    }

    /// Taps, status, confirmations and fares under `operator`; the blocklist under
    /// `card_scheme`'s topics.
    pub fn with_scheme(operator: &str, card_scheme: &str, device: u32) -> Self {
        let p = format!("tapgate/v1/{operator}");
        let s = format!("tapgate/v1/{card_scheme}");
        Self {
            taps: format!("{p}/taps/{device}"),
            confirm: format!("{p}/devices/{device}/confirm"),
            status: format!("{p}/devices/{device}/status"),
            blocklist_snapshot: format!("{s}/blocklist/snapshot"),
            blocklist_delta: format!("{s}/blocklist/delta"),
            fares: format!("{p}/fares/table"),
        }
    }
}

const BL_SNAPSHOT: &str = "blocklist/0-snapshot";
const BL_DELTA: &str = "blocklist/1-delta/";
const FARE_TABLE: &str = "fares/table";

/// Applies a downlink message (verified against `pubkey`; out-of-order or forged updates are
/// refused and change nothing) and journals it so a restart replays it.
pub fn apply_downlink(
    gate: &mut Gate,
    journal: &Journal,
    pubkey: &[u8; 32],
    topic_kind: Downlink,
    bytes: &[u8],
) -> Result<u64, String> {
    match topic_kind {
        Downlink::Blocklist => {
            // One signature check, even for a 1,000,000-entry snapshot.
            let u = purse::blocklist::ListUpdate::verify(bytes, pubkey)
                .map_err(|e| format!("blocklist refused: {e}"))?;
            let v = gate
                .blocklist
                .apply_verified(&u)
                .map_err(|e| format!("blocklist refused: {e}"))?;
            let r = if u.kind == purse::blocklist::ListKind::Snapshot {
                journal.replace_blobs("blocklist/", BL_SNAPSHOT, bytes)
            } else {
                journal.put_blob(&format!("{BL_DELTA}{v:020}"), bytes)
            };
            r.map_err(|e| format!("journalling the blocklist: {e}"))?;
            Ok(v)
        }
        Downlink::FareTable => {
            let header =
                fare_rules::signed::peek(bytes).map_err(|e| format!("fare table refused: {e}"))?;
            let current = gate.fare_version();
            if u64::from(header.version) <= u64::from(current) && gate.engine.is_some() {
                return Err(format!(
                    "fare table version {} refused: version {current} is in force",
                    header.version
                ));
            }
            let engine = fare_rules::signed::verify(bytes, pubkey)
                .map_err(|e| format!("fare table refused: {e}"))?;
            // A table that does not know this gate would refuse every tap: keep the old one.
            if let Err(why) = gate.placement.check(&engine) {
                return Err(format!(
                    "fare table version {} refused: {why} (this gate)",
                    header.version
                ));
            }
            journal
                .put_blob(FARE_TABLE, bytes)
                .map_err(|e| format!("journalling the fare table: {e}"))?;
            gate.engine = Some(engine);
            Ok(u64::from(header.version))
        }
    }
}

/// A downlink message kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downlink {
    Blocklist,
    FareTable,
}

/// Replays the journalled downlink (blocklist snapshot and deltas, fare table) into `gate`.
pub fn restore(gate: &mut Gate, journal: &Journal, pubkey: &[u8; 32]) -> Result<(), DaemonError> {
    if let Some(t) = journal.blob(FARE_TABLE)? {
        if let Ok(e) = fare_rules::signed::verify(&t, pubkey) {
            if e.table().meta.version >= gate.fare_version() {
                gate.engine = Some(e);
            }
        }
    }
    for (_, b) in journal.blobs("blocklist/")? {
        let _ = gate.blocklist.apply(&b, pubkey);
    }
    Ok(())
}

/// Runs the validator until the reader has no more cards or `shutdown` is set; then drains
/// the outbox (up to `drain_timeout`) and says goodbye.
pub async fn run(
    settings: Settings,
    gate: Gate,
    journal: Arc<Journal>,
    mut reader: Box<dyn Reader>,
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
) -> Result<Summary, DaemonError> {
    let topics = Topics::with_scheme(
        &settings.operator,
        &settings.card_scheme,
        settings.device_id,
    );
    let gate = Arc::new(Mutex::new(gate));
    let wake = Arc::new(tokio::sync::Notify::new());
    let reader_done = Arc::new(AtomicBool::new(false));
    let taps_done = Arc::new(AtomicU64::new(0));

    {
        let g = gate
            .lock()
            .map_err(|_| DaemonError::Reader("gate lock".into()))?;
        metrics.blocklist_version.set(g.blocklist.version() as i64);
        metrics.fare_table_version.set(i64::from(g.fare_version()));
    }
    metrics.outbox_depth.set(journal.outbox_len()? as i64);

    // The reader loop.
    let loop_handle = {
        let (gate, journal, metrics, wake) =
            (gate.clone(), journal.clone(), metrics.clone(), wake.clone());
        let (shutdown, done, taps_done) =
            (shutdown.clone(), reader_done.clone(), taps_done.clone());
        let crash_at = settings.crash_at;
        std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || -> Result<Summary, String> {
                let mut s = Summary::default();
                let mut lat = Vec::new();
                while !shutdown.load(Ordering::Relaxed) {
                    let Some(card) = reader.wait_card() else { break };
                    let t0 = Instant::now();
                    let n = s.taps + 1;
                    let mut hook = |step: Step| {
                        if crash_at == Some((n, step)) {
                            eprintln!("fault injection: power cut at {step:?} of tap {n}");
                            std::process::abort();
                        }
                    };
                    let out = {
                        let mut g = gate.lock().map_err(|_| "gate lock poisoned".to_string())?;
                        g.tap(card, &journal, now_ms(), &mut hook)
                    };
                    reader.card_removed();
                    let out = match out {
                        Ok(o) => o,
                        Err(e) => {
                            tracing::error!(error = %e, "tap failed");
                            metrics.taps.with_label_values(&["error", "gate"]).inc();
                            continue;
                        }
                    };
                    let us = t0.elapsed().as_micros() as u64;
                    metrics.latency.observe(us as f64 / 1e6);
                    lat.push(us);
                    s.taps += 1;
                    if !matches!(out.settled, Settled::None) {
                        s.tears_settled += 1;
                    }
                    match out.answer {
                        Answer::Accepted { fare_minor, .. } => {
                            s.taps_accepted += 1;
                            s.fares_minor += i64::from(fare_minor);
                            metrics.taps.with_label_values(&["accepted", ""]).inc();
                        }
                        Answer::Refused { reason, seq } => {
                            *s.taps_refused.entry(reason.name().to_string()).or_default() += 1;
                            metrics.taps.with_label_values(&["refused", reason.name()]).inc();
                            if seq.is_none() {
                                metrics.outbox_full.set(1);
                                tracing::error!(
                                    capacity = journal.capacity_taps(),
                                    "ALARM: the outbox is full; taps are refused until the gateway confirms"
                                );
                            }
                        }
                        Answer::Torn => {
                            s.taps_torn += 1;
                            metrics.taps.with_label_values(&["torn", ""]).inc();
                        }
                        Answer::Repeat => {
                            s.taps_repeat += 1;
                            metrics.taps.with_label_values(&["repeat", ""]).inc();
                        }
                    }
                    taps_done.store(s.taps, Ordering::Relaxed);
                    if let Ok(d) = journal.outbox_len() {
                        metrics.outbox_depth.set(d as i64);
                    }
                    wake.notify_one();
                }
                lat.sort_unstable();
                let q = |p: f64| lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(0);
                s.tap_latency_us_p50 = q(0.5);
                s.tap_latency_us_p99 = q(0.99);
                done.store(true, Ordering::Relaxed);
                wake.notify_one();
                Ok(s)
            })
            .map_err(|e| DaemonError::Reader(e.to_string()))?
    };

    // MQTT.
    if let Some(m) = &settings.mqtt {
        let mut opts = MqttOptions::new(
            format!("validator-{}", settings.device_id),
            m.host.clone(),
            m.port,
        );
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
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        // Small messages both ways: without TCP_NODELAY, Nagle's algorithm held a tap or a
        // confirmation until the peer's delayed ACK (≈ 40 ms at p99).
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let cursor = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicBool::new(false));

        // Incoming: connection state, confirmations, downlink.
        let confirmations = {
            let g = gate
                .lock()
                .map_err(|_| DaemonError::Reader("gate lock".into()))?;
            Arc::new(Confirmations {
                journal: journal.clone(),
                metrics: metrics.clone(),
                device_key: g.sam.device_key().clone(),
                operator: settings.operator.clone(),
                device_id: settings.device_id,
                log: Mutex::new((None, 0)),
            })
        };
        {
            let (client, topics, journal, gate, metrics) = (
                client.clone(),
                topics.clone(),
                journal.clone(),
                gate.clone(),
                metrics.clone(),
            );
            let (cursor, connected, wake) = (cursor.clone(), connected.clone(), wake.clone());
            let pubkey = settings.signing_pub;
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connected.store(true, Ordering::Relaxed);
                            metrics.mqtt_connected.set(1);
                            // Resend everything not confirmed yet (the gateway drops duplicates).
                            cursor.store(0, Ordering::Relaxed);
                            for t in [
                                &topics.confirm,
                                &topics.blocklist_snapshot,
                                &topics.blocklist_delta,
                                &topics.fares,
                            ] {
                                // Never await the request queue from the event loop itself: it
                                // only drains while this loop polls.
                                if let Err(e) = client.try_subscribe(t.clone(), QoS::AtLeastOnce) {
                                    tracing::warn!(error = %e, topic = %t, "subscribe failed");
                                }
                            }
                            wake.notify_one();
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if p.topic == topics.confirm {
                                let c = confirmations.clone();
                                let n =
                                    tokio::task::spawn_blocking(move || c.apply(&p.payload)).await;
                                if let Ok(Ok(_)) = n {
                                    if let Ok(d) = journal.outbox_len() {
                                        metrics.outbox_depth.set(d as i64);
                                        if d < journal.capacity_taps() {
                                            metrics.outbox_full.set(0);
                                        }
                                    }
                                }
                            } else {
                                let kind = if p.topic == topics.fares {
                                    Downlink::FareTable
                                } else {
                                    Downlink::Blocklist
                                };
                                let (gate, journal, metrics) =
                                    (gate.clone(), journal.clone(), metrics.clone());
                                let payload = p.payload.to_vec();
                                let _ = tokio::task::spawn_blocking(move || {
                                    let Ok(mut g) = gate.lock() else { return };
                                    match apply_downlink(&mut g, &journal, &pubkey, kind, &payload)
                                    {
                                        Ok(v) => {
                                            tracing::info!(?kind, version = v, "downlink applied");
                                            metrics
                                                .blocklist_version
                                                .set(g.blocklist.version() as i64);
                                            metrics
                                                .fare_table_version
                                                .set(i64::from(g.fare_version()));
                                        }
                                        Err(e) => tracing::warn!(?kind, "{e}"),
                                    }
                                })
                                .await;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if connected.swap(false, Ordering::Relaxed) {
                                tracing::warn!(error = %e, "MQTT connection lost; reconnecting");
                            }
                            metrics.mqtt_connected.set(0);
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            });
        }

        // Publishing and heartbeats, until the reader is done; then drain.
        let mut heartbeat = tokio::time::interval(settings.heartbeat);
        let mut drain_deadline: Option<Instant> = None;
        // The versions come from the metrics, never from the gate (no waiting on a tap).
        let status = || {
            serde_json::json!({
                "device": settings.device_id,
                "online": true,
                "blocklist_version": metrics.blocklist_version.get(),
                "fare_table_version": metrics.fare_table_version.get(),
                "outbox_depth": metrics.outbox_depth.get(),
                "clock_ms": now_ms(),
                "taps": taps_done.load(Ordering::Relaxed),
            })
            .to_string()
        };
        // The first heartbeat goes out as soon as a connection is up, not a period later.
        let mut announced = false;
        let mut was_connected = false;
        // The oldest tap in the outbox, since when it waits, and how long it may wait before
        // everything unconfirmed is sent again: a tap whose confirmation was lost stays there
        // while newer ones are confirmed around it. The wait doubles while the same tap stays
        // oldest (up to 8×), so an overloaded gateway is not sent the whole outbox every 30 s.
        let mut head: Option<(u64, u64, u64)> = None;
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = heartbeat.tick() => {
                    // Only while connected (offline it would only fill the request queue).
                    if connected.load(Ordering::Relaxed) {
                        let _ = client.try_publish(topics.status.clone(), QoS::AtLeastOnce, true, status());
                        announced = true;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            let is_connected = connected.load(Ordering::Relaxed);
            if is_connected && !was_connected {
                announced = false; // a reconnect: say so now (the last will said offline)
            }
            was_connected = is_connected;
            if !announced && is_connected {
                let _ = client.try_publish(topics.status.clone(), QoS::AtLeastOnce, true, status());
                announced = true;
            }
            if connected.load(Ordering::Relaxed) {
                // The oldest unconfirmed tap has waited too long (its message or its
                // confirmation was lost, or nothing has been confirmed at all): send everything
                // unconfirmed again (the gateway confirms duplicates without storing them).
                let now = now_ms();
                let oldest = journal.outbox_after(0, 1)?.first().map(|(seq, _)| *seq);
                head = match (oldest, head) {
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
                publish_outbox(&client, &topics, &journal, &cursor).await?;
            }
            if reader_done.load(Ordering::Relaxed) || shutdown.load(Ordering::Relaxed) {
                let deadline =
                    *drain_deadline.get_or_insert_with(|| Instant::now() + settings.drain_timeout);
                if journal.outbox_len()? == 0 || Instant::now() >= deadline {
                    break;
                }
            }
        }
        let _ = client.try_publish(
            topics.status.clone(),
            QoS::AtLeastOnce,
            true,
            serde_json::json!({"device": settings.device_id, "online": false, "clock_ms": now_ms()})
                .to_string(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
    }

    let summary = tokio::task::spawn_blocking(move || loop_handle.join())
        .await
        .map_err(|e| DaemonError::Reader(e.to_string()))?
        .map_err(|_| DaemonError::Reader("the reader loop panicked".into()))?
        .map_err(DaemonError::Reader)?;
    Ok(Summary {
        outbox_left: journal.outbox_len()?,
        ..summary
    })
}

/// Least time between two log lines about refused confirmations (the metric counts each).
const REFUSED_CONFIRMATION_LOG_EVERY: Duration = Duration::from_secs(60);

/// The confirmation side of the journal: a confirmation deletes taps only once its MAC
/// verified under this device's key for this operator and exactly the sequence numbers it
/// names (`purse::confirm`); anything else is counted, logged at most once a minute, and
/// deletes nothing.
pub struct Confirmations {
    pub journal: Arc<Journal>,
    pub metrics: Arc<Metrics>,
    /// A copy of the SAM's device key (zeroized on drop, never logged): the reader thread
    /// holds the SAM while a card is in the field.
    pub device_key: purse::crypto::AesKey,
    pub operator: String,
    pub device_id: u32,
    /// When the last refusal was logged, and how many were not logged since.
    pub log: Mutex<(Option<Instant>, u64)>,
}

impl Confirmations {
    /// Verifies a confirmation message and deletes the taps it names; `Ok(None)` when it was
    /// refused (nothing deleted).
    pub fn apply(&self, payload: &[u8]) -> Result<Option<usize>, JournalError> {
        use purse::confirm::{ConfirmError, Confirmation};
        let verified = Confirmation::decode(payload)
            .and_then(|c| c.verify_with_key(&self.operator, self.device_id, &self.device_key));
        match verified {
            Ok(c) => Ok(Some(self.journal.confirm(&c)?)),
            Err(e) => {
                let reason = match e {
                    ConfirmError::BadMac => "bad_mac",
                    _ => "malformed",
                };
                self.metrics
                    .confirmations_refused
                    .with_label_values(&[reason])
                    .inc();
                if let Ok(mut l) = self.log.lock() {
                    let due =
                        l.0.is_none_or(|t| t.elapsed() >= REFUSED_CONFIRMATION_LOG_EVERY);
                    if due {
                        tracing::warn!(
                            device = self.device_id,
                            error = %e,
                            not_logged_since = l.1,
                            "confirmation refused; nothing deleted (the taps stay until a genuine one)"
                        );
                        *l = (Some(Instant::now()), 0);
                    } else {
                        l.1 += 1;
                    }
                }
                Ok(None)
            }
        }
    }
}

/// Publishes journalled taps after the cursor, several per message when there is a backlog.
async fn publish_outbox(
    client: &AsyncClient,
    topics: &Topics,
    journal: &Arc<Journal>,
    cursor: &Arc<AtomicU64>,
) -> Result<(), DaemonError> {
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
        if client
            .try_publish(topics.taps.clone(), QoS::AtLeastOnce, false, payload)
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

/// Serves `/metrics` (and `/healthz`) on `listener`.
pub async fn serve_metrics(
    listener: std::net::TcpListener,
    tls: Option<tapgate_http::serve::TlsFiles>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    use axum::routing::get;
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    tapgate_http::serve::serve_router(
        "validator metrics",
        listener,
        tls.as_ref(),
        router,
        shutdown,
    )
    .await
    .map_err(|e| DaemonError::Metrics(e.to_string()))
}

#[cfg(test)]
mod topic_tests {
    use super::Topics;

    #[test]
    fn a_box_on_another_schemes_cards_takes_that_schemes_blocklist() {
        let t = Topics::with_scheme("grand-hotel", "metro", 2001);
        assert_eq!(t.taps, "tapgate/v1/grand-hotel/taps/2001");
        assert_eq!(t.confirm, "tapgate/v1/grand-hotel/devices/2001/confirm");
        assert_eq!(t.status, "tapgate/v1/grand-hotel/devices/2001/status");
        assert_eq!(t.fares, "tapgate/v1/grand-hotel/fares/table");
        assert_eq!(t.blocklist_snapshot, "tapgate/v1/metro/blocklist/snapshot");
        assert_eq!(t.blocklist_delta, "tapgate/v1/metro/blocklist/delta");
        let own = Topics::new("metro", 1001);
        assert_eq!(
            own.blocklist_snapshot,
            "tapgate/v1/metro/blocklist/snapshot"
        );
        assert_eq!(own.taps, "tapgate/v1/metro/taps/1001");
    }
}
