//! The validator daemon: the reader loop (a thread: taps are synchronous and take
//! milliseconds), MQTT store-and-forward (rumqttc, QoS 1, persistent session, reconnect),
//! downlink (signed blocklists and fare tables, verified, applied atomically and journalled),
//! heartbeats with a last will, and Prometheus metrics.
//!
//! Topics (docs/mqtt.md): taps up on `tapgate/v1/<op>/taps/<device>` (one or more 80-byte v3
//! records per message), confirmations down on `…/devices/<device>/confirm`, heartbeats on
//! `…/devices/<device>/status` (retained; the last will marks the validator offline),
//! blocklists on `…/blocklist/{snapshot,delta}`, fare tables on `…/fares/table` (retained).

mod durable;
mod reader_thread;
mod uplink;

use crate::gate::{Gate, Step};
use crate::journal::{Journal, JournalError};
use crate::reader::Reader;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use purse::rotation::{Refusal, SignedMessage, SignerKeys, TrustedKeys};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
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
    /// The other nodes of a broker cluster, tried in turn after `host:port` when a connection
    /// fails.
    pub fallback: Vec<(String, u16)>,
    /// How long a connection attempt (TCP, TLS, CONNACK) may take before the next broker is
    /// tried (`[mqtt] connect_timeout_s`).
    pub connect_timeout: Duration,
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
            .field("fallback", &self.fallback)
            .field("connect_timeout", &self.connect_timeout)
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
    /// The back office's Ed25519 keys, versioned (`signing.pub`): downlink messages must
    /// verify under a non-retired one.
    pub signing_pub: TrustedKeys,
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
    /// The outbox's bound (`outbox_capacity_taps`), set by the daemon's caller.
    pub outbox_capacity: IntGauge,
    /// The blocklist version journalled (the heartbeat's: a version applied but not yet
    /// journalled is not reported, so the gateway never counts it as propagated here).
    pub blocklist_version: IntGauge,
    /// Blocklist journal writes that failed (disk full, I/O error) and were tried again.
    pub blocklist_journal_retries: IntCounter,
    pub fare_table_version: IntGauge,
    pub mqtt_connected: IntGauge,
    /// Confirmations refused (never acted on), by reason: `bad_mac`, `malformed`.
    pub confirmations_refused: IntCounterVec,
    /// Action-list pick-ups by outcome: `applied`, `already_on_card`, `not_applied`, `torn`.
    pub pickups: IntCounterVec,
    /// The action-list version held.
    pub action_list_version: IntGauge,
    /// What is left of the SAM's action-list ceiling, minor units.
    pub action_ceiling_minor: IntGauge,
    /// Signed downlink messages refused, by reason: `retired_signing_key`, `refused`.
    pub downlink_refused: IntCounterVec,
}

impl Metrics {
    /// Registers the validator's metrics.
    pub fn new(device_id: u32) -> Self {
        let registry = Registry::new_custom(
            Some("tapgate_validator".into()),
            Some([("device".to_string(), device_id.to_string())].into()),
        )
        .expect("static registry prefix");
        // Each metric registered as it is made.
        fn registered<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("unique metric names");
            c
        }
        let gauge =
            |n: &str, h: &str| registered(&registry, IntGauge::new(n, h).expect("static metric"));
        let counters = |n: &str, h: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(n, h), labels).expect("static metric");
            registered(&registry, c)
        };
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
        let m = Self {
            taps: counters(
                "taps_total",
                "taps by outcome (accepted, refused, torn, repeat) and reason",
                &["outcome", "reason"],
            ),
            latency: registered(&registry, latency),
            downlink_refused: counters(
                "downlink_refused_total",
                "signed blocklists, action lists and fare tables refused: retired_signing_key (signed by a key version the operator retired), refused (forged, malformed, out of order, …)",
                &["reason"],
            ),
            confirmations_refused: counters(
                "confirmations_refused_total",
                "confirmations ignored because they did not verify under the device key (forged, altered, another device's) or were malformed; nothing was deleted on them",
                &["reason"],
            ),
            pickups: counters(
                "pickups_total",
                "action-list orders at a tap: applied, already_on_card (another validator did), not_applied (ceiling, blocklist, SAM, card), torn",
                &["outcome"],
            ),
            action_list_version: gauge("action_list_version", "action-list version held"),
            action_ceiling_minor: gauge(
                "action_ceiling_minor",
                "what is left of the SAM's action-list ceiling (minor units)",
            ),
            outbox_depth: gauge(
                "outbox_depth",
                "journalled taps the gateway has not confirmed",
            ),
            outbox_full: gauge("outbox_full", "1 when the outbox is at its bound (alarm)"),
            outbox_capacity: gauge(
                "outbox_capacity",
                "the outbox's bound in taps (outbox_capacity_taps)",
            ),
            blocklist_version: gauge("blocklist_version", "blocklist version held and journalled"),
            blocklist_journal_retries: registered(
                &registry,
                IntCounter::new(
                    "blocklist_journal_retries_total",
                    "blocklist journal writes that failed (disk full, I/O error) and were tried again",
                )
                .expect("static metric"),
            ),
            fare_table_version: gauge("fare_table_version", "fare table version in force"),
            mqtt_connected: gauge("mqtt_connected", "1 while connected to the broker"),
            registry: registry.clone(),
        };
        // Exported at 0 from the start, so the first refusal is an increase an alert sees.
        for reason in ["bad_mac", "malformed"] {
            m.confirmations_refused.with_label_values(&[reason]);
        }
        for outcome in ["applied", "already_on_card", "not_applied", "torn"] {
            m.pickups.with_label_values(&[outcome]);
        }
        for reason in ["retired_signing_key", "refused"] {
            m.downlink_refused.with_label_values(&[reason]);
        }
        m
    }

    /// Counts a refused downlink message under its reason.
    pub fn count_downlink_refused(&self, error: &str) {
        let reason = if error.contains(purse::rotation::RETIRED_KEY_TEXT) {
            "retired_signing_key"
        } else {
            "refused"
        };
        self.downlink_refused.with_label_values(&[reason]).inc();
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
    /// The chunks of a snapshot too large for one message (`…/blocklist/snapshot/+`, issue 22).
    pub blocklist_chunks: String,
    pub blocklist_delta: String,
    pub fares: String,
    /// The action list (orders to pick up at the next tap), under the card scheme's topics.
    pub actions_snapshot: String,
    pub actions_delta: String,
    /// This device's action-list ceiling grant (retained, MAC'd with its device key).
    pub ceiling: String,
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
            blocklist_chunks: format!("{s}/blocklist/snapshot/+"),
            blocklist_delta: format!("{s}/blocklist/delta"),
            fares: format!("{p}/fares/table"),
            actions_snapshot: format!("{s}/actions/snapshot"),
            actions_delta: format!("{s}/actions/delta"),
            ceiling: format!("{p}/devices/{device}/ceiling"),
        }
    }
}

const BL_SNAPSHOT: &str = "blocklist/0-snapshot";
/// A snapshot's chunks: `blocklist/0-chunk/<version:020>/<index:06>`.
const BL_CHUNKS: &str = "blocklist/0-chunk/";
const BL_DELTA: &str = "blocklist/1-delta/";
const FARE_TABLE: &str = "fares/table";

/// What a downlink message did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownlinkOutcome {
    /// Applied: the version now in force.
    Applied(u64),
    /// A genuine message for a version the gate already holds (or an older one), e.g. the
    /// retained snapshot again at a reconnect: nothing to do, nothing wrong.
    AlreadyHeld {
        /// The version in force.
        held: u64,
        /// The message's version.
        got: u64,
    },
    /// A chunk of a blocklist snapshot still being received (issue 22): kept (or, already
    /// in or of an older snapshot, ignored); the list in force is unchanged until the last.
    Pending {
        /// The snapshot's version.
        version: u64,
        /// Its chunks received so far.
        received: u32,
        /// Its chunks in all.
        count: u32,
    },
}

/// Applies a downlink message (verified against `pubkey`; out-of-order or forged updates are
/// refused and change nothing) and journals it so a restart replays it. A version already held
/// is an error here (see [`apply_downlink_outcome`] to tell it from a refusal).
pub fn apply_downlink(
    gate: &mut Gate,
    journal: &Journal,
    pubkey: &(impl SignerKeys + ?Sized),
    topic_kind: Downlink,
    bytes: &[u8],
) -> Result<u64, String> {
    match apply_downlink_outcome(gate, journal, pubkey, topic_kind, bytes)? {
        DownlinkOutcome::Applied(v) => Ok(v),
        DownlinkOutcome::Pending {
            version,
            received,
            count,
        } => Err(format!(
            "blocklist snapshot {version}: {received} of {count} chunks received"
        )),
        DownlinkOutcome::AlreadyHeld { held, got } => Err(match topic_kind {
            Downlink::Blocklist => format!(
                "blocklist refused: {}",
                purse::blocklist::ListError::Stale { held, got }
            ),
            Downlink::FareTable => {
                format!("fare table version {got} refused: version {held} is in force")
            }
        }),
    }
}

/// [`apply_downlink`], telling a version already held apart from a refusal.
pub fn apply_downlink_outcome(
    gate: &mut Gate,
    journal: &Journal,
    pubkey: &(impl SignerKeys + ?Sized),
    topic_kind: Downlink,
    bytes: &[u8],
) -> Result<DownlinkOutcome, String> {
    let keys = pubkey.trusted();
    match topic_kind {
        // An empty message clears a retained topic (the gateway's, when a snapshot goes from
        // one message to chunks or has fewer chunks): nothing to apply.
        Downlink::Blocklist if bytes.is_empty() => {
            let held = gate.blocklist.version();
            Ok(DownlinkOutcome::AlreadyHeld { held, got: held })
        }
        Downlink::Blocklist if purse::blocklist::chunked::is_chunk(bytes) => {
            apply_blocklist_chunk(gate, journal, &keys, bytes)
        }
        Downlink::Blocklist => {
            // One signature check, even for a 1,000,000-entry snapshot (two while a list
            // signed by the previous key version is still accepted).
            let (u, _) = purse::blocklist::ListUpdate::verify_trusted(bytes, &keys)
                .map_err(|e| format!("blocklist refused: {e}"))?;
            let (outcome, write) = take_update(gate, &u)?;
            if let Some(w) = write {
                w.write(journal, bytes)?;
            }
            Ok(outcome)
        }
        Downlink::FareTable => {
            let header =
                fare_rules::signed::peek(bytes).map_err(|e| format!("fare table refused: {e}"))?;
            let current = gate.fare_version();
            if u64::from(header.version) <= u64::from(current) && gate.engine.is_some() {
                return Ok(DownlinkOutcome::AlreadyHeld {
                    held: u64::from(current),
                    got: u64::from(header.version),
                });
            }
            let (engine, _) =
                verify_fare_table(&keys, bytes).map_err(|e| format!("fare table refused: {e}"))?;
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
            Ok(DownlinkOutcome::Applied(u64::from(header.version)))
        }
    }
}

/// A chunk of a blocklist snapshot (issue 22): verified under the key ring (a retired version
/// refused), packed into the snapshot being received and journalled; with the last chunk the
/// snapshot is the list in force, and the journal keeps its chunks alone (the snapshot and
/// deltas before it dropped in the same transaction). A chunk that starts a snapshot drops
/// the chunks of any other half-received one (keeping those of the snapshot in force).
pub fn apply_blocklist_chunk(
    gate: &mut Gate,
    journal: &Journal,
    keys: &TrustedKeys,
    bytes: &[u8],
) -> Result<DownlinkOutcome, String> {
    let (c, _) = purse::blocklist::chunked::SnapshotChunk::verify_trusted(bytes, keys)
        .map_err(|e| format!("blocklist refused: {e}"))?;
    let (outcome, write) = take_chunk(gate, &c)?;
    if let Some(w) = write {
        w.write(journal, bytes)?;
    }
    Ok(outcome)
}

/// How a blocklist message is journalled once applied: decided with the gate, written after
/// it (by the daemon, once the gate is free again: a tap never waits on a chunk's commit).
#[derive(Debug)]
pub struct BlocklistWrite {
    key: String,
    /// Blobs under `drop_under` that start with none of `keep` are dropped in the same
    /// transaction (`None`: nothing dropped).
    drop_under: &'static str,
    keep: Option<Vec<String>>,
}

impl BlocklistWrite {
    /// Journals `bytes` (the message as received).
    pub fn write(&self, journal: &Journal, bytes: &[u8]) -> Result<(), String> {
        let r = match &self.keep {
            None => journal.put_blob(&self.key, bytes),
            Some(keep) => journal.put_blob_retaining(&self.key, bytes, self.drop_under, |k| {
                keep.iter().any(|p| k.starts_with(p.as_str()))
            }),
        };
        r.map_err(|e| format!("journalling the blocklist: {e}"))
    }
}

/// A verified chunk into the gate's blocklist: what it did and how to journal it (`None`: a
/// duplicate or a chunk of an older snapshot, nothing to keep).
pub fn take_chunk(
    gate: &mut Gate,
    c: &purse::blocklist::chunked::SnapshotChunk,
) -> Result<(DownlinkOutcome, Option<BlocklistWrite>), String> {
    use purse::blocklist::chunked::ChunkProgress;
    use purse::blocklist::ListError;
    let (held, base) = (gate.blocklist.version(), gate.blocklist.snapshot_version());
    let progress = match gate.blocklist.apply_chunk(c) {
        Ok(p) => p,
        Err(ListError::Stale { held, got }) => {
            return Ok((DownlinkOutcome::AlreadyHeld { held, got }, None))
        }
        Err(e) => return Err(format!("blocklist refused: {e}")),
    };
    let set = |v: u64| format!("{BL_CHUNKS}{v:020}/");
    let key = format!("{}{:06}", set(c.version), c.index);
    let write = match progress {
        ChunkProgress::Complete { version } => Some(BlocklistWrite {
            key,
            drop_under: "blocklist/",
            keep: Some(vec![set(version)]),
        }),
        ChunkProgress::Pending { started, .. } => Some(BlocklistWrite {
            key,
            drop_under: BL_CHUNKS,
            keep: started.then(|| vec![set(base), set(c.version)]),
        }),
        ChunkProgress::Duplicate { .. } | ChunkProgress::Superseded { .. } => None,
    };
    let outcome = match (progress, gate.blocklist.incoming()) {
        (ChunkProgress::Complete { version }, _) => DownlinkOutcome::Applied(version),
        (_, Some(a)) => DownlinkOutcome::Pending {
            version: a.version(),
            received: a.received(),
            count: a.count(),
        },
        (_, None) => DownlinkOutcome::AlreadyHeld {
            held,
            got: c.version,
        },
    };
    Ok((outcome, write))
}

/// A blocklist message for the daemon's shared gate (issue 22): the signature is verified and
/// the message decoded before the gate is taken, and the journal written after it is
/// released, so a tap waits only for the list's own change (a chunk's packing, or the switch
/// at the last chunk), never for a signature check over 458 KB or an LMDB commit. Downlink
/// messages are handled one at a time (the MQTT event loop awaits each), so the journal
/// writes keep their order. Also returns the blocklist version held after.
pub fn apply_blocklist_shared(
    gate: &Mutex<Gate>,
    journal: &Journal,
    keys: &TrustedKeys,
    bytes: &[u8],
) -> Result<(DownlinkOutcome, u64), String> {
    let (outcome, write, held) = take_blocklist_shared(gate, keys, bytes)?;
    if let Some(w) = write {
        w.write(journal, bytes)?;
    }
    Ok((outcome, held))
}

/// [`apply_blocklist_shared`] but the journal write: what the message did, how to journal it
/// and the blocklist version held after (the daemon journals it on its writer thread,
/// `durable`, retried until it commits).
pub fn take_blocklist_shared(
    gate: &Mutex<Gate>,
    keys: &TrustedKeys,
    bytes: &[u8],
) -> Result<(DownlinkOutcome, Option<BlocklistWrite>, u64), String> {
    let lock = || gate.lock().map_err(|_| "gate lock poisoned".to_string());
    if bytes.is_empty() {
        let held = lock()?.blocklist.version();
        return Ok((DownlinkOutcome::AlreadyHeld { held, got: held }, None, held));
    }
    if purse::blocklist::chunked::is_chunk(bytes) {
        let (c, _) = purse::blocklist::chunked::SnapshotChunk::verify_trusted(bytes, keys)
            .map_err(|e| format!("blocklist refused: {e}"))?;
        let mut g = lock()?;
        let (outcome, write) = take_chunk(&mut g, &c)?;
        Ok((outcome, write, g.blocklist.version()))
    } else {
        let (u, _) = purse::blocklist::ListUpdate::verify_trusted(bytes, keys)
            .map_err(|e| format!("blocklist refused: {e}"))?;
        let mut g = lock()?;
        let (outcome, write) = take_update(&mut g, &u)?;
        Ok((outcome, write, g.blocklist.version()))
    }
}

/// A verified single-message snapshot or delta into the gate's blocklist: what it did and how
/// to journal it (a snapshot replaces everything journalled; a delta is added).
fn take_update(
    gate: &mut Gate,
    u: &purse::blocklist::ListUpdate,
) -> Result<(DownlinkOutcome, Option<BlocklistWrite>), String> {
    let v = match gate.blocklist.apply_verified(u) {
        Ok(v) => v,
        Err(purse::blocklist::ListError::Stale { held, got }) => {
            return Ok((DownlinkOutcome::AlreadyHeld { held, got }, None))
        }
        Err(e) => return Err(format!("blocklist refused: {e}")),
    };
    let write = if u.kind == purse::blocklist::ListKind::Snapshot {
        BlocklistWrite {
            key: BL_SNAPSHOT.to_string(),
            drop_under: "blocklist/",
            keep: Some(Vec::new()),
        }
    } else {
        BlocklistWrite {
            key: format!("{BL_DELTA}{v:020}"),
            drop_under: "blocklist/",
            keep: None,
        }
    };
    Ok((DownlinkOutcome::Applied(v), Some(write)))
}

const AL_PREFIX: &str = "actions/";
const AL_SNAPSHOT: &str = "actions/0-snapshot";
const AL_DELTA: &str = "actions/1-delta/";

/// Applies a signed action-list message (verified against `pubkey`; forged, foreign or
/// out-of-order ones change nothing) and journals it so a restart replays it; applied orders
/// already expired at `now_ms` are forgotten from the journal.
pub fn apply_actions(
    list: &mut purse::actionlist::ActionList,
    journal: &Journal,
    pubkey: &(impl SignerKeys + ?Sized),
    bytes: &[u8],
    now_ms: u64,
) -> Result<DownlinkOutcome, String> {
    let (u, key) = purse::actionlist::ActionUpdate::verify_trusted(bytes, &pubkey.trusted())
        .map_err(|e| format!("action list refused: {e}"))?;
    let kind = u.kind;
    let mut next = list.clone();
    let v = match next.apply(bytes, &key) {
        Ok(v) => v,
        Err(purse::actionlist::ActionListError::Stale { held, got }) => {
            return Ok(DownlinkOutcome::AlreadyHeld { held, got })
        }
        Err(e) => return Err(format!("action list refused: {e}")),
    };
    let r = if kind == purse::blocklist::ListKind::Snapshot {
        journal.replace_blobs(AL_PREFIX, AL_SNAPSHOT, bytes)
    } else {
        journal.put_blob(&format!("{AL_DELTA}{v:020}"), bytes)
    };
    r.map_err(|e| format!("journalling the action list: {e}"))?;
    *list = next;
    if let Err(e) = journal.prune_applied(now_ms / 1000) {
        tracing::warn!(error = %e, "pruning expired applied orders failed");
    }
    Ok(DownlinkOutcome::Applied(v))
}

const CEILING_GRANT: &str = "ceiling/grant";

/// Applies this device's action-list ceiling grant (`purse::sam::ActionGrant`, MAC'd with the
/// device key, cumulative and numbered) to the gate's SAM and journals it; an older or equal
/// number is already held; a forged, altered or another device's grant changes nothing.
pub fn apply_action_grant(
    gate: &mut Gate,
    journal: &Journal,
    bytes: &[u8],
) -> Result<DownlinkOutcome, String> {
    let g = purse::sam::ActionGrant::decode(bytes)
        .ok_or_else(|| "action grant refused: malformed".to_string())?;
    let (held, _) = gate.sam.action_grant();
    if g.seq <= held && g.device_id == gate.placement.device_id {
        return Ok(DownlinkOutcome::AlreadyHeld {
            held: u64::from(held),
            got: u64::from(g.seq),
        });
    }
    gate.sam
        .apply_action_grant(&g)
        .map_err(|e| format!("action grant refused: {e}"))?;
    // A grant applied but not journalled is simply missing after a restart (less ceiling,
    // never more) until the retained grant arrives again.
    journal
        .put_blob(CEILING_GRANT, bytes)
        .map_err(|e| format!("journalling the action grant: {e}"))?;
    Ok(DownlinkOutcome::Applied(u64::from(g.seq)))
}

/// Brings a restarted gate's SAM back to its action ceiling: the last grant journalled less
/// what the journal counts as spent.
pub fn restore_action_ceiling(gate: &mut Gate, journal: &Journal) -> Result<(), DaemonError> {
    let Some(b) = restorable(journal.blob(CEILING_GRANT))? else {
        return Ok(());
    };
    let Some(g) = purse::sam::ActionGrant::decode(&b) else {
        tracing::warn!("the journalled action grant is malformed; waiting for the next one");
        return Ok(());
    };
    if let Err(e) = gate
        .sam
        .restore_action_ceiling(&g, journal.ceiling_spent()?)
    {
        tracing::warn!(error = %e, "the journalled action grant does not apply; waiting for the next one");
    }
    Ok(())
}

/// The journalled action list (snapshot and deltas) of `card_scheme`, replayed.
/// (Journalled lists verified when they arrived: a key version retired since still restores
/// them, so a restart does not lose what the device held.)
pub fn restore_actions(
    card_scheme: &str,
    journal: &Journal,
    pubkey: &(impl SignerKeys + ?Sized),
) -> Result<purse::actionlist::ActionList, DaemonError> {
    let keys = pubkey.trusted().with_retired_accepted();
    let mut l = purse::actionlist::ActionList::new(card_scheme);
    journal.for_each_blob(AL_PREFIX, |_, b| {
        let Some(b) = readable(b) else { return };
        if let Ok((_, key)) = purse::actionlist::ActionUpdate::verify_trusted(b, &keys) {
            let _ = l.apply(b, &key);
        }
    })?;
    Ok(l)
}

/// A journalled blob to restore, or `None` when its file cannot be read: logged with its key
/// and skipped, so the validator still starts (issue 22). Skipping is safe for every kind
/// restored: the gate holds what a new validator holds until the broker sends the message
/// again (retained: the fare table, the blocklist and action-list snapshots, the device's
/// ceiling grant) — no fare table refuses taps; an older blocklist or action list is reported
/// in the heartbeat's versions, and an order is never applied twice (`applied` is kept
/// apart); a missing grant is less ceiling, never more.
fn readable(b: Result<&[u8], JournalError>) -> Option<&[u8]> {
    b.map_err(|e| skipped(&e)).ok()
}

/// Logs a journalled blob skipped at start (the error names its key and file).
fn skipped(e: &JournalError) {
    tracing::error!(error = %e, "a journalled blob cannot be read; skipped until the broker sends it again");
}

/// [`readable`] for one blob by key; a storage error still stops the start.
fn restorable(b: Result<Option<Vec<u8>>, JournalError>) -> Result<Option<Vec<u8>>, DaemonError> {
    match b {
        Err(e @ JournalError::BlobFile { .. }) => {
            skipped(&e);
            Ok(None)
        }
        b => Ok(b?),
    }
}

/// A fare table verified under one of `keys`.
fn verify_fare_table(
    keys: &TrustedKeys,
    bytes: &[u8],
) -> Result<(fare_rules::engine::Engine, [u8; 32]), Refusal<fare_rules::signed::SignedError>> {
    keys.verify_with(
        |k| fare_rules::signed::verify(bytes, k),
        |e| matches!(e, fare_rules::signed::SignedError::Signature),
    )
}

/// A downlink message kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downlink {
    Blocklist,
    FareTable,
}

/// Replays the journalled downlink (blocklist snapshot and deltas, fare table) into `gate`.
/// Lists signed under a key version retired since they were journalled still restore.
pub fn restore(
    gate: &mut Gate,
    journal: &Journal,
    pubkey: &(impl SignerKeys + ?Sized),
) -> Result<(), DaemonError> {
    let keys = pubkey.trusted().with_retired_accepted();
    if let Some(t) = restorable(journal.blob(FARE_TABLE))? {
        if let Ok((e, _)) = verify_fare_table(&keys, &t) {
            if e.table().meta.version >= gate.fare_version() {
                gate.engine = Some(e);
            }
        }
    }
    // One blob at a time: a chunked snapshot is packed chunk by chunk as when it arrived (a
    // half-received one waits for its missing chunks, which the retained topics send again).
    // A blob whose file cannot be read is skipped (see [`readable`]).
    journal.for_each_blob("blocklist/", |_, b| {
        let Some(b) = readable(b) else { return };
        if purse::blocklist::chunked::is_chunk(b) {
            let c = purse::blocklist::chunked::SnapshotChunk::verify_trusted(b, &keys);
            if let Ok((c, _)) = c {
                let _ = gate.blocklist.apply_chunk(&c);
            }
        } else if let Ok((u, _)) = purse::blocklist::ListUpdate::verify_trusted(b, &keys) {
            let _ = gate.blocklist.apply_verified(&u);
        }
    })?;
    Ok(())
}

/// Runs the validator until the reader has no more cards or `shutdown` is set; then drains
/// the outbox (up to `drain_timeout`) and says goodbye.
pub async fn run(
    settings: Settings,
    gate: Gate,
    journal: Arc<Journal>,
    reader: Box<dyn Reader>,
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
) -> Result<Summary, DaemonError> {
    let topics = Topics::with_scheme(
        &settings.operator,
        &settings.card_scheme,
        settings.device_id,
    );
    let actions = restore_actions(&settings.card_scheme, &journal, &settings.signing_pub)?;
    let mut gate = gate;
    restore_action_ceiling(&mut gate, &journal)?;
    let blocklist_journal = durable::BlocklistJournal::start(
        journal.clone(),
        metrics.clone(),
        durable::Backoff::DAEMON,
    )
    .map_err(|e| DaemonError::Reader(e.to_string()))?;
    let shared = Shared {
        blocklist_journal: Arc::new(blocklist_journal),
        gate: Arc::new(Mutex::new(gate)),
        actions: Arc::new(Mutex::new(actions)),
        journal,
        metrics,
        wake: Arc::new(tokio::sync::Notify::new()),
        shutdown,
        reader_done: Arc::new(AtomicBool::new(false)),
        taps_done: Arc::new(AtomicU64::new(0)),
    };
    shared.show_versions()?;
    let loop_handle = reader_thread::spawn(shared.clone(), reader, settings.crash_at)?;
    if let Some(m) = &settings.mqtt {
        uplink::run(&settings, m, &topics, &shared).await?;
    }
    // What was applied is journalled before the run ends (a write still failing is given up).
    let writes = shared.blocklist_journal.clone();
    let _ = tokio::task::spawn_blocking(move || writes.finish()).await;
    let summary = tokio::task::spawn_blocking(move || loop_handle.join())
        .await
        .map_err(|e| DaemonError::Reader(e.to_string()))?
        .map_err(|_| DaemonError::Reader("the reader loop panicked".into()))?
        .map_err(DaemonError::Reader)?;
    Ok(Summary {
        outbox_left: shared.journal.outbox_len()?,
        ..summary
    })
}

/// What the reader thread and the MQTT tasks share.
#[derive(Clone)]
struct Shared {
    gate: Arc<Mutex<Gate>>,
    /// The action list (locked after the gate, never before it).
    actions: Arc<Mutex<purse::actionlist::ActionList>>,
    journal: Arc<Journal>,
    /// Blocklist messages applied, journalled in order on their own thread.
    blocklist_journal: Arc<durable::BlocklistJournal>,
    metrics: Arc<Metrics>,
    /// Wakes the publisher: a tap was journalled, the connection came up, the reader ended.
    wake: Arc<tokio::sync::Notify>,
    shutdown: Arc<AtomicBool>,
    /// Set by the reader thread when it ends: the publisher drains, then stops.
    reader_done: Arc<AtomicBool>,
    /// Taps so far (for the heartbeat, without waiting on the gate).
    taps_done: Arc<AtomicU64>,
}

impl Shared {
    /// Sets the version and outbox gauges from the gate and the journal at start-up.
    fn show_versions(&self) -> Result<(), DaemonError> {
        {
            let g = self
                .gate
                .lock()
                .map_err(|_| DaemonError::Reader("gate lock".into()))?;
            self.metrics
                .blocklist_version
                .set(g.blocklist.version() as i64);
            self.metrics
                .fare_table_version
                .set(i64::from(g.fare_version()));
            self.metrics.action_ceiling_minor.set(g.sam.ceiling_minor());
        }
        if let Ok(l) = self.actions.lock() {
            self.metrics
                .action_list_version
                .set(i64::try_from(l.version()).unwrap_or(i64::MAX));
        }
        self.metrics
            .outbox_depth
            .set(self.journal.outbox_len()? as i64);
        self.metrics
            .outbox_capacity
            .set(i64::try_from(self.journal.capacity_taps()).unwrap_or(i64::MAX));
        Ok(())
    }
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
    use super::{Metrics, Topics};

    #[test]
    fn the_action_list_metrics_are_exported_from_the_start() {
        let text = Metrics::new(1001).render();
        for line in [
            "tapgate_validator_pickups_total{outcome=\"applied\",device=\"1001\"} 0",
            "tapgate_validator_pickups_total{outcome=\"torn\",device=\"1001\"} 0",
            "tapgate_validator_action_list_version{device=\"1001\"} 0",
            "tapgate_validator_action_ceiling_minor{device=\"1001\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        let t = Topics::new("metro", 1001);
        assert_eq!(t.actions_delta, "tapgate/v1/metro/actions/delta");
        assert_eq!(t.ceiling, "tapgate/v1/metro/devices/1001/ceiling");
    }

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

#[cfg(test)]
mod restore_tests {
    use super::{apply_downlink_outcome, restore, restore_actions, Downlink, DownlinkOutcome};
    use crate::gate::{Gate, Placement};
    use crate::journal::Journal;
    use ed25519_dalek::{Signer, SigningKey};
    use rand::SeedableRng;

    pub(super) fn gate() -> Gate {
        let keys = purse::keys::KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(2));
        Gate {
            sam: purse::sam::SoftwareSam::validator(&keys, 7).unwrap(),
            engine: None,
            blocklist: purse::blocklist::Blocklist::new("metro"),
            placement: Placement {
                device_id: 7,
                operator: "metro".into(),
                stop: "Central".into(),
                route: "M1".into(),
                kind: fare_rules::record::TapKind::In,
                utc_offset_s: 0,
                sale: None,
            },
            rng: rand::rngs::StdRng::seed_from_u64(1),
        }
    }

    pub(super) fn uid(i: u32) -> [u8; 7] {
        let mut u = [4, 0, 0, 0, 0, 0, 0];
        u[3..].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
        u
    }

    /// A journalled blob whose file is gone (issue 22) is skipped at start, not fatal: the
    /// rest restores, and the chunk sent again by the broker completes the snapshot.
    #[test]
    fn restore_skips_a_blob_whose_file_is_missing() {
        let bo = SigningKey::from_bytes(&[1; 32]);
        let pk = bo.verifying_key().to_bytes();
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path(), 10, 1 << 26).unwrap();
        let mut g = gate();
        // 30,000 cards in 3 chunks of 10,000: each chunk over 64 KiB, so a file.
        let mut uids: Vec<[u8; 7]> = (0..30_000).map(uid).collect();
        uids.sort_unstable();
        let chunks: Vec<Vec<u8>> = purse::blocklist::chunked::cut("metro", 9, &uids, 10_000)
            .iter()
            .map(|c| c.sign_with(|m| bo.sign(m).to_bytes()))
            .collect();
        for c in &chunks {
            apply_downlink_outcome(&mut g, &j, &pk, Downlink::Blocklist, c).unwrap();
        }
        assert_eq!(g.blocklist.version(), 9);
        let blobs = d.path().join("blobs");
        let mut files: Vec<_> = std::fs::read_dir(&blobs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 3);
        files.sort();
        std::fs::remove_file(&files[1]).unwrap();

        let mut g2 = gate();
        restore(&mut g2, &j, &pk).unwrap();
        restore_actions("metro", &j, &pk).unwrap();
        assert_eq!(g2.blocklist.version(), 0, "not in force without chunk 1");
        assert_eq!(g2.blocklist.incoming().map(|a| a.missing()), Some(vec![1]));
        let again = apply_downlink_outcome(&mut g2, &j, &pk, Downlink::Blocklist, &chunks[1]);
        assert_eq!(again, Ok(DownlinkOutcome::Applied(9)));
        assert_eq!(g2.blocklist, g.blocklist);
    }
}
