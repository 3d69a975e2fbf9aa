//! The gateway's durable store (LMDB via heed) and its ingestion step.
//!
//! One call to [`Store::ingest`] takes a batch of MQTT messages and, in ONE write transaction
//! (group commit: one fsync for the whole batch):
//! - decodes every tap record strictly and verifies its device MAC (keys derived from KM_DEVICE);
//! - checks the topic's device against the record's;
//! - drops duplicates by (device, sequence) — QoS 1 redelivers — told by the device's state
//!   (its highest sequence and its open gaps, read once per device and batch), not by a lookup
//!   among the stored taps: a sequence at or below the highest and in no gap was stored. Past
//!   [`MAX_GAPS`] the oldest gap is dropped and the sequences up to it marked untracked: one
//!   arriving there is stored (again), never lost (clearing drops a duplicate);
//! - stores new taps by arrival, under their outbox id (one global key that only grows: appended
//!   with `MDB_APPEND`, full pages, one leaf per batch however many taps are stored), appends
//!   them to the forwarding outbox, and tracks sequence gaps per device;
//! - adds the taps to the running aggregates not in place but as deltas, one small entry per
//!   aggregate and batch under (the batch's id ‖ the aggregate's name), appended: the
//!   aggregates' keys are random (`card-day:` ones: one per card and day, a million new a day;
//!   a batch's devices, stops and routes spread over their tables), appends are not. The deltas
//!   are folded into the aggregates later, many batches in one sorted pass ([`deltas`],
//!   [`Store::fold_aggregates`], with every trim); [`Store::aggregates`] adds the deltas not
//!   folded yet, so the figures are exact at any time, and a crash loses none (they commit with
//!   their taps);
//! - keeps anything bad in a quarantine table with the reason: one entry per message (with the
//!   count of its refused records), bounded per device in entries and bytes (oldest dropped and
//!   counted, the device flagged), throttled for a flagged device, and not written at all once
//!   the map is [`StoreLimits::quarantine_stop_at_fill_percent`] full, so garbage can never take
//!   the room genuine taps need.
//!
//! Only after that commit does it return the confirmations to send: a tap is confirmed to its
//! validator only once it is durable here. A store too full to take a batch
//! ([`StoreLimits::ingest_refuse_at_fill_percent`], or LMDB's `MDB_MAP_FULL`) refuses the whole
//! batch with [`StoreError::Full`]: nothing of it is stored, acknowledged or confirmed (the
//! validators keep those taps and send them again), and trimming forwarded taps still has room.
//!
//! Once clearing has answered for a range of the outbox ([`Store::forwarded_at`]), its entries
//! move to the forwarded log (outbox id → when clearing answered). A forwarded tap
//! is kept [`StoreLimits::forwarded_retention_ms`] (7 days) after that answer (for the console
//! and the exports); then the tap and its log entry are trimmed
//! (at most [`TRIM_MAX_PER_CALL`] per call, oldest answer first, in transactions of at most
//! [`TRIM_CHUNK`] with the write lock released between two), after each forwarded batch and,
//! on a timer, by an idle gateway too ([`Store::trim_expired_at`]). While the map is
//! [`StoreLimits::quarantine_stop_at_fill_percent`] full, forwarded taps are trimmed at once,
//! window or not: room for new taps comes first. A late resend of a trimmed tap is still a
//! duplicate (the device's state tells it); one the state cannot tell (an untracked gap) is
//! stored and forwarded again, and clearing counts it as a duplicate (its card counter is
//! already booked with the same transaction MAC): work, never money. Taps not yet forwarded are
//! never trimmed. Taps and log entries are keyed alike, by arrival: a trim deletes
//! the leading pages of both.
//!
//! The `card-day:` aggregates (one per card and day) are kept day first in a table of their own
//! ([`card_days`]): a fold's leaves lie in the current day's part of it, and a finished day's
//! are not rewritten. They are kept [`StoreLimits::card_day_retention_days`] (7) days after
//! their day ends, then trimmed from the same call as the forwarded taps (the old days are the
//! table's leading keys: [`Store::trim_expired_card_days_at`]); the open day never is, nor a
//! day ahead of it (a validator's clock ahead, or the gateway's behind). Device
//! states are kept in a compact binary layout ([`devices`]): a live batch rewrites most of that
//! table's leaves.
//!
//! A store written before taps were keyed by arrival (device ‖ sequence) is migrated when
//! opened ([`migrate`]), and so is one holding its card-day deltas as one record per batch
//! ([`deltas`]), its device states as JSON ([`devices`]) or its card-days in `aggregates`
//! ([`card_days`]).

use heed::byteorder::BE;
use heed::types::{Bytes, SerdeJson, U64};
use heed::{Database, Env, PutFlags, RwTxn, WithoutTls};
use purse::crypto::AesKey;
use purse::rotation::{DeviceKeyRing, Refusal};
use purse::tap::{split_records, TapError, TapRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod card_days;
mod deltas;
mod devices;
mod migrate;

/// Store errors (storage only: bad input is quarantined, never an error).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// LMDB failed.
    #[error("gateway storage: {0}")]
    Storage(#[from] heed::Error),
    /// The store is too full to take this batch (nothing of it was written): the map holds
    /// `used_bytes` of `map_bytes`, at or above the refusal mark. Raise the map size, or let
    /// forwarding trim the outbox.
    #[error("gateway store is full: {used_bytes} of {map_bytes} bytes used; batch refused")]
    Full {
        /// bytes in use
        used_bytes: u64,
        /// the map size
        map_bytes: u64,
    },
    /// The store's environment could not be opened (directory, map size, LMDB).
    #[error("opening the gateway store: {0}")]
    Open(#[from] tapgate_lmdb::OpenError),
    /// The data directory could not be prepared.
    #[error("gateway data directory {path}: {source}")]
    Dir {
        /// path
        path: String,
        /// cause
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether this is a full store (the refusal mark, or LMDB's own `MDB_MAP_FULL`): an alarm,
    /// retried when room returns, never a reason to drop what was accepted.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            StoreError::Full { .. }
                | StoreError::Storage(heed::Error::Mdb(heed::MdbError::MapFull))
        )
    }
}

/// Bounds on what remote parties can make the store hold (gateway config names in brackets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Quarantine entries kept per device (`quarantine_max_per_device`); beyond it the oldest
    /// is dropped (counted) and the device flagged.
    pub quarantine_max_per_device: u64,
    /// Quarantine bytes kept per device (`quarantine_max_bytes_per_device`), likewise.
    pub quarantine_max_bytes_per_device: u64,
    /// Refused records examined per message (`quarantine_max_bad_records_per_message`): past
    /// it the rest of the message is not examined (nor stored, nor confirmed: its validator
    /// sends any genuine tap in it again).
    pub quarantine_max_bad_records_per_message: u64,
    /// A flagged device gets at most one quarantine entry per this many milliseconds
    /// (`quarantine_flagged_interval_ms`); its other bad messages are only counted.
    pub quarantine_flagged_interval_ms: u64,
    /// No quarantine entry is written while the map is this full (`quarantine_stop_at_fill_percent`):
    /// the rest is room for genuine taps.
    pub quarantine_stop_at_fill_percent: u64,
    /// A batch is refused ([`StoreError::Full`]) while the map is this full
    /// (`ingest_refuse_at_fill_percent`): the rest is room to trim forwarded taps.
    pub ingest_refuse_at_fill_percent: u64,
    /// A forwarded tap is kept this many milliseconds after clearing answered for it
    /// (`forwarded_retention_ms`; gateway clock), for the console and the exports; then
    /// trimmed (see the module docs). (Duplicates are told by the device states, not by it.)
    pub forwarded_retention_ms: u64,
    /// A `card-day:` aggregate is kept this many whole days after its day (UTC, by the
    /// validator's clock, as its name says) ends (`card_day_retention_days`; at least 1, the
    /// gateway clock tells the day), then trimmed ([`Store::trim_expired_card_days_at`]): the
    /// open day is never trimmed, and a trimmed day reads as trimmed, not as a partial figure.
    pub card_day_retention_days: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            quarantine_max_per_device: 1_000,
            quarantine_max_bytes_per_device: 1 << 20,
            quarantine_max_bad_records_per_message: 64,
            quarantine_flagged_interval_ms: 60_000,
            quarantine_stop_at_fill_percent: 50,
            ingest_refuse_at_fill_percent: 90,
            forwarded_retention_ms: 7 * 86_400_000,
            card_day_retention_days: 7,
        }
    }
}

/// The quarantine's account of one device (by the device id of the topic it published on;
/// `u64::MAX` for topics that name none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineDevice {
    /// Entries kept now.
    pub entries: u64,
    /// Bytes kept now (entry sizes as counted against the bound).
    pub bytes: u64,
    /// Bad messages seen (kept, dropped since, or only counted).
    pub messages: u64,
    /// Refused records in them.
    pub records: u64,
    /// Entries dropped (oldest first) to stay within the bounds.
    pub dropped_entries: u64,
    /// Bad messages only counted, not kept (flagged device throttled, or the map too full).
    pub throttled_messages: u64,
    /// The device reached its bound: it is sending garbage (an operator should look).
    pub flagged: bool,
    /// When its last entry was written (unix ms).
    pub last_entry_ms: u64,
    /// When its last bad message arrived (unix ms).
    pub last_seen_ms: u64,
}

/// What the gateway knows about a device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Highest sequence number stored.
    pub highest_seq: u64,
    /// Taps stored.
    pub taps: u64,
    /// Missing sequence ranges (inclusive), oldest first, bounded by [`MAX_GAPS`].
    pub gaps: Vec<(u64, u64)>,
    /// Last time a tap arrived (unix ms, gateway clock).
    pub last_seen_ms: u64,
    /// The KM_DEVICE version its last stored tap verified under (none: not known yet); after a
    /// device-master rotation, the devices still on the old version (docs/key-rotation.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_key_version: Option<u8>,
}

/// Most open gap ranges kept per device (older ones are reported and dropped).
pub const MAX_GAPS: usize = 256;

impl DeviceState {
    /// Notes that sequence number `seq` arrived (the first time): a jump past `highest_seq + 1`
    /// opens a gap (at most [`MAX_GAPS`] are kept; the oldest dropped one is returned), a number
    /// below it closes or splits the gap holding it. Any state, including one read back corrupt
    /// from the store, and any `seq` (a device chooses it) leave gaps sorted, disjoint, inside
    /// `1..highest_seq` and at most `MAX_GAPS`; nothing overflows.
    pub fn record_seq(&mut self, seq: u64) -> Option<(u64, u64)> {
        if seq > self.highest_seq.saturating_add(1) {
            // seq ≥ highest + 2, so neither bound overflows.
            self.gaps.push((self.highest_seq + 1, seq - 1));
        } else if seq < self.highest_seq {
            let mut gaps = Vec::with_capacity(self.gaps.len() + 1);
            for (a, b) in self.gaps.drain(..) {
                if seq < a || seq > b {
                    gaps.push((a, b));
                } else {
                    if a < seq {
                        gaps.push((a, seq - 1));
                    }
                    if seq < b {
                        gaps.push((seq + 1, b));
                    }
                }
            }
            self.gaps = gaps;
        }
        self.highest_seq = self.highest_seq.max(seq);
        // A state read back corrupt: keep only well-formed gaps, in order, below the highest.
        let highest = self.highest_seq;
        let mut last_end: Option<u64> = None;
        self.gaps.retain(|&(a, b)| {
            let ok = a <= b && b < highest && last_end.is_none_or(|e| a > e);
            if ok {
                last_end = Some(b);
            }
            ok
        });
        let excess = self.gaps.len().saturating_sub(MAX_GAPS);
        self.gaps.drain(..excess).next_back()
    }
}

/// A running aggregate (per device, stop, route, card-day, product).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Accepted taps.
    pub taps: u64,
    /// Refused taps.
    pub refused: u64,
    /// Sum of amounts, minor units.
    pub amount_minor: i64,
}

/// A quarantined message (one entry per message, however many of its records were refused).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// When (unix ms).
    pub received_ms: u64,
    /// The MQTT topic.
    pub topic: String,
    /// Why (the first refused record's reason, with the count when there were several).
    pub reason: String,
    /// The first refused record, or the payload, hex (truncated to 1 KiB).
    pub payload_hex: String,
    /// Refused records in the message (0: the message as a whole was refused).
    #[serde(default)]
    pub records: u64,
    /// The message's payload size in bytes.
    #[serde(default)]
    pub payload_bytes: u64,
}

impl Quarantined {
    /// What the entry counts against its device's byte bound.
    fn size_bytes(&self) -> u64 {
        (self.topic.len() + self.reason.len() + self.payload_hex.len() + 96) as u64
    }
}

/// Most bytes of a refused message or record kept as a sample.
const QUARANTINE_SAMPLE_BYTES: usize = 1024;

/// One incoming MQTT message.
#[derive(Clone, Debug)]
pub struct Message {
    /// The topic it arrived on.
    pub topic: String,
    /// Its payload: one or more tap records (80-byte v3, or 79-byte v2 journalled before an
    /// upgrade; each told by its version byte, [`purse::tap::split_records`]).
    pub payload: Vec<u8>,
}

/// What one ingest round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// New taps stored.
    pub stored: u64,
    /// Duplicates dropped (already stored).
    pub duplicates: u64,
    /// Records (or whole messages) refused.
    pub quarantined: u64,
    /// Quarantine entries dropped, oldest first, to keep devices within their bounds.
    pub quarantine_dropped: u64,
    /// Bad messages only counted (flagged devices throttled, or the map too full).
    pub quarantine_throttled: u64,
    /// Devices flagged by this batch (reached their quarantine bound).
    pub flagged: Vec<u64>,
    /// Sequence numbers to confirm, per (operator, device): stored now or already stored.
    pub confirmations: BTreeMap<(String, u32), Vec<u64>>,
    /// The KM_DEVICE version each confirmed device's taps verified under (its confirmations
    /// are MAC'd with that version's key; 0 when the caller gave a single unversioned key).
    pub device_key_versions: BTreeMap<u32, u8>,
}

/// One table's B-tree ([`Store::table_stats`]).
#[derive(Clone, Debug, Serialize)]
pub struct TableStats {
    /// The table.
    pub name: &'static str,
    /// Entries.
    pub entries: u64,
    /// Levels of the B-tree.
    pub depth: u32,
    /// Branch pages.
    pub branch_pages: u64,
    /// Leaf pages.
    pub leaf_pages: u64,
}

/// The store.
#[derive(Clone)]
pub struct Store {
    env: Env<WithoutTls>,
    /// The layout before taps were keyed by arrival (device ‖ sequence → record): emptied by
    /// [`Store::open`]'s migration ([`migrate`]), kept only to read an old store.
    legacy_taps: Database<Bytes, Bytes>,
    /// Stored taps by arrival: outbox id → record (ids only grow: appended, full pages).
    arrivals: Database<U64<BE>, Bytes>,
    /// The aggregate deltas not folded yet: (batch's last outbox id ‖ aggregate name) → taps,
    /// refused, amount; appended, folded into `aggregates` in one sorted pass later
    /// ([`deltas`], [`Store::fold_aggregates`]).
    aggregate_deltas: Database<Bytes, Bytes>,
    /// The layout before: batch id → its JSON list of deltas (overflow pages past ≈ 50);
    /// emptied by [`Store::open`]'s migration, kept only to read an old store.
    legacy_card_day_records: Database<U64<BE>, SerdeJson<Vec<(String, Aggregate)>>>,
    /// Device states in a compact binary layout ([`devices`]; JSON before, migrated at open).
    devices: Database<U64<BE>, devices::DeviceCodec>,
    quarantine: Database<U64<BE>, SerdeJson<Quarantined>>,
    /// (device ‖ quarantine key) → (): each device's entries, oldest first.
    quarantine_index: Database<Bytes, heed::types::Unit>,
    quarantine_devices: Database<U64<BE>, SerdeJson<QuarantineDevice>>,
    /// Taps to forward: outbox id → nothing (the record is under the same id in `arrivals`).
    outbox: Database<U64<BE>, Bytes>,
    /// Forwarded taps: outbox id → when clearing answered (unix ms, big-endian; the last 8
    /// bytes of the value, also in the old layout's `tap key ‖ answer`).
    forwarded_log: Database<U64<BE>, Bytes>,
    meta: Database<heed::types::Str, U64<BE>>,
    /// The aggregates but the `card-day:` ones, by name.
    aggregates: Database<heed::types::Str, SerdeJson<Aggregate>>,
    /// The `card-day:` aggregates, day first: (day ‖ UID ‖ `:`) → taps, refused, amount
    /// ([`card_days`]; read back under their public names).
    card_days: Database<Bytes, Bytes>,
    /// Every table above, untyped, in the order [`Store::open`] names them: what the map's fill
    /// counts ([`Store::fill`]), so a table added to the list is counted without a second edit.
    tables: [tapgate_lmdb::RawDatabase; 13],
    limits: StoreLimits,
    /// Most forwarded taps trimmed in one transaction ([`TRIM_CHUNK`] unless set).
    trim_chunk: usize,
    /// Write transactions opened ([`Store::write_txn`]), by every clone of this store.
    write_txns: Arc<AtomicU64>,
}

/// What one `ingest` call accumulates across its messages.
struct Batch {
    out: IngestOutcome,
    dev_states: BTreeMap<u32, DevEntry>,
    /// The batch's aggregate deltas: appended, folded later.
    deltas: BTreeMap<String, Aggregate>,
    device_keys: BTreeMap<u32, Box<DeviceKeyRing>>,
    next_outbox: u64,
    /// Quarantine may still write (the map is below `quarantine_stop_at_fill_percent`).
    room: bool,
    now_ms: u64,
}

/// A device's state as a batch reads and updates it.
struct DevEntry {
    st: DeviceState,
    /// Sequences at or below it (and not in a gap) may or may not have been stored: the gaps
    /// that told were dropped ([`MAX_GAPS`]). One arriving is stored (again): clearing drops a
    /// duplicate, a tap is never lost. Kept in `meta` under `untracked_through:<device>`.
    untracked: u64,
    untracked_was: u64,
}

impl DevEntry {
    /// Whether `seq` was stored before, as far as the state can tell.
    fn seen(&self, seq: u64) -> bool {
        seq <= self.st.highest_seq
            && seq > self.untracked
            && !self.st.gaps.iter().any(|&(a, b)| a <= seq && seq <= b)
    }
}

/// `meta` key of a device's [`DevEntry::untracked`].
fn untracked_key(device: u32) -> String {
    format!("untracked_through:{device}")
}

/// Adds `d` to `a` (saturating).
fn add_aggregate(a: &mut Aggregate, d: &Aggregate) {
    a.taps = a.taps.saturating_add(d.taps);
    a.refused = a.refused.saturating_add(d.refused);
    a.amount_minor = a.amount_minor.saturating_add(d.amount_minor);
}

const CARD_DAY: &str = "card-day:";

/// One message's refused records, gathered into one quarantine entry.
#[derive(Default)]
struct Refused {
    records: u64,
    first_reason: Option<String>,
    sample: Vec<u8>,
    stopped: bool,
}

impl Refused {
    fn add(&mut self, reason: impl FnOnce() -> String, rec: &[u8]) {
        self.records += 1;
        if self.first_reason.is_none() {
            self.first_reason = Some(reason());
            self.sample = rec[..rec.len().min(QUARANTINE_SAMPLE_BYTES)].to_vec();
        }
    }

    fn reason(&self, total: usize) -> String {
        let first = self.first_reason.clone().unwrap_or_default();
        let mut r = if self.records <= 1 {
            first
        } else {
            format!(
                "{} of {total} records refused; first: {first}",
                self.records
            )
        };
        if self.stopped {
            r.push_str("; the rest of the message was not examined (nor confirmed)");
        }
        r
    }
}

/// Verifies one record under its device's key ring (one ring per device and batch: an outbox
/// draining repeats the device; boxed, as a moved key would leave an unwiped copy behind), the
/// newest accepted version first; the record and the KM_DEVICE version that verified it.
fn verify_record(
    rec: &[u8],
    op: &str,
    rings: &mut BTreeMap<u32, Box<DeviceKeyRing>>,
    device_key: &impl Fn(u32) -> DeviceKeyRing,
) -> Result<(TapRecord, u8), Refusal<TapError>> {
    // Parsed without a key first: the record names its device (or is refused as it stands).
    let mut named = None;
    let unkeyed = match TapRecord::decode_verified(rec, op, |d| {
        named = Some(d);
        None
    }) {
        Err(e) => e,
        Ok(_) => return Err(Refusal::Check(TapError::BadMac)),
    };
    let Some(d) = named else {
        return Err(Refusal::Check(unkeyed));
    };
    let ring = rings.entry(d).or_insert_with(|| Box::new(device_key(d)));
    ring.verify_with(
        |k| TapRecord::decode_verified(rec, op, |_| Some(k.clone())),
        |e| matches!(e, TapError::BadMac),
        unkeyed,
    )
}

/// Parses `tapgate/v1/<operator>/taps/<device>`.
pub fn parse_tap_topic(topic: &str) -> Option<(&str, u32)> {
    match topic_levels(topic)? {
        ["tapgate", "v1", op, "taps", dev] if !op.is_empty() => Some((op, dev.parse().ok()?)),
        _ => None,
    }
}

/// The `N` levels of an MQTT topic, if it has exactly `N` (for matching against a pattern).
pub(crate) fn topic_levels<const N: usize>(topic: &str) -> Option<[&str; N]> {
    let mut it = topic.split('/');
    let mut levels = [""; N];
    for level in &mut levels {
        *level = it.next()?;
    }
    it.next().is_none().then_some(levels)
}

/// The UTC hour of a time, `YYYY-MM-DDTHH` (the `hour:` aggregates' keys sort by time).
pub fn hour_of(ms: u64) -> String {
    tapgate_http::show::utc(
        ms,
        time::macros::format_description!("[year]-[month]-[day]T[hour]"),
    )
}

/// Adds one tap to the batch's aggregate deltas.
fn aggregate_into(aggs: &mut BTreeMap<String, Aggregate>, tap: &TapRecord) {
    // An action-list pick-up is value added, not a fare: counted under its own product only
    // (its stop and route fields hold the order id; a device's and a card's amounts stay fares).
    if purse::actionlist::order_of_tap(tap).is_some() {
        let a = aggs.entry("product:pickup".to_string()).or_default();
        a.taps = a.taps.saturating_add(1);
        a.amount_minor = a.amount_minor.saturating_add(i64::from(tap.amount_minor()));
        return;
    }
    let day = tap.meta().device_time_ms / 86_400_000;
    let product = match (tap.refusal(), tap.kind()) {
        (Some(r), _) => format!("refused:{}", r.name()),
        (None, purse::receipt::TxKind::RecordOnly) => "free".to_string(),
        (None, _) => "stored_value".to_string(),
    };
    for k in [
        format!("device:{}", tap.meta().device_id),
        format!("stop:{}", tap.meta().stop_id),
        format!("route:{}", tap.meta().route_id),
        format!("{CARD_DAY}{}:{day}", hex::encode_upper(tap.uid())),
        format!("product:{product}"),
        format!("hour:{}", hour_of(tap.meta().device_time_ms)),
    ] {
        let a = aggs.entry(k).or_default();
        if tap.refusal().is_some() {
            a.refused = a.refused.saturating_add(1);
        } else {
            a.taps = a.taps.saturating_add(1);
            // Saturating: a device's taps (MAC'd by the device, not yet by the card) cannot
            // wrap an operator's aggregate.
            a.amount_minor = a.amount_minor.saturating_add(i64::from(tap.amount_minor()));
        }
    }
}

fn quarantine_key(device: u64, seq: u64) -> [u8; 16] {
    tapgate_lmdb::key::u64_u64(device, seq)
}

/// The system clock in milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a forwarded-log entry (… ‖ forwarded at, ms, u64 big-endian) was forwarded at or
/// before `cutoff` (an entry without the time counts as expired).
fn forwarded_expired(v: &[u8], cutoff: u64) -> bool {
    match v.split_last_chunk::<8>() {
        Some((_, at)) => u64::from_be_bytes(*at) <= cutoff,
        None => true,
    }
}

/// Whether `used_bytes` of a `map_bytes` map reach `percent` of it (the store's fill marks).
fn past_percent(used_bytes: u64, map_bytes: u64, percent: u64) -> bool {
    used_bytes >= (map_bytes / 100).saturating_mul(percent)
}

/// Most forwarded taps trimmed by one [`Store::forwarded_at`] or [`Store::trim_expired_at`]
/// (a backlog goes over several).
pub const TRIM_MAX_PER_CALL: usize = 50_000;

/// Most outbox entries moved to the forwarded log in one transaction (their keys are
/// adjacent: a few pages).
pub const MOVE_CHUNK: usize = 10_000;

/// Most forwarded taps trimmed in one transaction: the lock is free between two, so ingestion
/// waits for at most one. Chosen when taps were keyed by device, then sequence, and a trim's
/// deletes hit a cold page each (bench `gateway-store`, backlog trim at 10 M ingested: live
/// batches of 256 taps during a 50,000-tap trim, median 139 → 79 ms, longest 163 → 114 ms, for
/// 10,000 → 1,000; the trim itself 79 k → 36 k taps/s); keyed by arrival, a trim deletes
/// leading pages.
pub const TRIM_CHUNK: usize = 1_000;

/// [`TRIM_CHUNK`] (and [`MOVE_CHUNK`]) while the map is past the quarantine mark: small enough
/// that a transaction's copied pages fit the room a store refusing batches still has.
pub const TRIM_CHUNK_PRESSED: usize = 256;

/// Most batches' aggregate deltas folded in one transaction ([`Store::fold_aggregates`]).
pub const FOLD_CHUNK: usize = 64;

/// The gateway store's map size when the command line names none: 4 GiB.
pub const DEFAULT_MAP_SIZE_BYTES: usize = 4 << 30;

impl Store {
    /// Opens (or creates) the store.
    pub fn open(dir: &Path, map_size_bytes: usize) -> Result<Store, StoreError> {
        let (env, dbs) = tapgate_lmdb::open(
            dir,
            [
                "taps",
                "devices",
                "quarantine",
                "quarantine_index",
                "quarantine_devices",
                "outbox",
                "meta",
                "aggregates",
                "forwarded",
                "arrivals",
                "card_day_pending",
                "aggregate_deltas",
                "card_days",
            ],
            &tapgate_lmdb::EnvConfig::durable(map_size_bytes),
        )?;
        let [taps, devices, quarantine, quarantine_index, quarantine_devices, outbox, meta, aggregates, forwarded_log, arrivals, card_day_pending, aggregate_deltas, card_days] =
            dbs;
        let store = Store {
            env,
            tables: dbs,
            legacy_taps: taps.remap_types(),
            arrivals: arrivals.remap_types(),
            aggregate_deltas: aggregate_deltas.remap_types(),
            legacy_card_day_records: card_day_pending.remap_types(),
            devices: devices.remap_types(),
            quarantine: quarantine.remap_types(),
            quarantine_index: quarantine_index.remap_types(),
            quarantine_devices: quarantine_devices.remap_types(),
            outbox: outbox.remap_types(),
            meta: meta.remap_types(),
            aggregates: aggregates.remap_types(),
            card_days: card_days.remap_types(),
            forwarded_log: forwarded_log.remap_types(),
            limits: StoreLimits::default(),
            trim_chunk: TRIM_CHUNK,
            write_txns: Arc::default(),
        };
        store.migrate_legacy_taps()?;
        store.migrate_card_day_records()?;
        store.migrate_device_states()?;
        store.migrate_card_days()?;
        Ok(store)
    }

    /// Opens a write transaction: LMDB's one writer lock, which ingest needs too (counted).
    fn write_txn(&self) -> Result<RwTxn<'_>, StoreError> {
        self.write_txns.fetch_add(1, Ordering::Relaxed);
        Ok(self.env.write_txn()?)
    }

    /// The write transactions this store has opened so far (each took the store's one writer
    /// lock, which ingest needs too): housekeeping with nothing to do opens none.
    pub fn write_transactions(&self) -> u64 {
        self.write_txns.load(Ordering::Relaxed)
    }

    /// The same store with other limits (the gateway config's).
    pub fn with_limits(mut self, limits: StoreLimits) -> Store {
        self.limits = limits;
        self
    }

    /// The same store trimming at most `n` (at least 1) forwarded taps per transaction instead
    /// of [`TRIM_CHUNK`] (the bench `gateway-store` compares sizes in one run).
    pub fn with_trim_chunk(mut self, n: usize) -> Store {
        self.trim_chunk = n.max(1);
        self
    }

    /// The gateway's data directory (the store's, canonical): where the blocklist relay spools
    /// a chunked snapshot (on disk, not in a tmpfs `/tmp`).
    pub fn dir(&self) -> &Path {
        self.env.path()
    }

    /// The limits in force.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// Bytes of the map in use as `t` sees it (pages of every table) and the map size.
    fn fill(&self, t: &heed::RoTxn<'_, WithoutTls>) -> Result<(u64, u64), StoreError> {
        let mut pages = 0u64;
        let mut page_size = 4096u64;
        for table in &self.tables {
            let st = table.stat(t)?;
            page_size = u64::from(st.page_size);
            pages += (st.branch_pages + st.leaf_pages + st.overflow_pages) as u64;
        }
        Ok((pages * page_size, self.env.info().map_size as u64))
    }

    /// Per table its entries, B-tree depth, branch and leaf pages; and the pages of the file in
    /// use (the high-water mark: the tables' pages, LMDB's free list and its two meta pages).
    /// For the bench `gateway-store`: which table grows how, and how much is free.
    pub fn table_stats(&self) -> Result<(Vec<TableStats>, u64), StoreError> {
        let r = self.env.read_txn()?;
        let st = |name, s: heed::DatabaseStat| TableStats {
            name,
            entries: s.entries as u64,
            depth: s.depth,
            branch_pages: s.branch_pages as u64,
            leaf_pages: s.leaf_pages as u64,
        };
        let tables = vec![
            st("taps", self.arrivals.stat(&r)?),
            st("outbox", self.outbox.stat(&r)?),
            st("forwarded", self.forwarded_log.stat(&r)?),
            st("aggregates", self.aggregates.stat(&r)?),
            st("card_days", self.card_days.stat(&r)?),
            st("devices", self.devices.stat(&r)?),
            st("aggregate_deltas", self.aggregate_deltas.stat(&r)?),
        ];
        Ok((tables, self.env.info().last_page_number as u64 + 1))
    }

    /// Bytes in use and the map size (for the operator: how close the store is to full).
    pub fn usage(&self) -> Result<(u64, u64), StoreError> {
        let r = self.env.read_txn()?;
        self.fill(&r)
    }

    /// Keeps one quarantine entry for a bad message from `device` (the topic's), within the
    /// device's bounds; `room` is false when the map is too full for quarantine.
    #[allow(clippy::too_many_arguments)]
    fn quarantine_put(
        &self,
        t: &mut RwTxn<'_>,
        out: &mut IngestOutcome,
        now_ms: u64,
        device: u64,
        m: &Message,
        reason: String,
        records: u64,
        sample: &[u8],
        room: bool,
    ) -> Result<(), StoreError> {
        let lim = self.limits;
        // With no room, a device without an account is counted in the catch-all one (device
        // ids in topics are the publisher's to choose; accounts must not grow without bound).
        let existing = self.quarantine_devices.get(t, &device)?;
        let device = if room || existing.is_some() {
            device
        } else {
            u64::MAX
        };
        let mut st = match existing {
            Some(st) => st,
            None => self.quarantine_devices.get(t, &device)?.unwrap_or_default(),
        };
        st.messages += 1;
        st.records += records;
        st.last_seen_ms = now_ms;
        let throttled = st.flagged
            && now_ms
                < st.last_entry_ms
                    .saturating_add(lim.quarantine_flagged_interval_ms);
        if !room || throttled {
            st.throttled_messages += 1;
            out.quarantine_throttled += 1;
            self.quarantine_devices.put(t, &device, &st)?;
            return Ok(());
        }
        let seq = self.quarantine.last(t)?.map(|(k, _)| k + 1).unwrap_or(1);
        let shown = &sample[..sample.len().min(QUARANTINE_SAMPLE_BYTES)];
        let entry = Quarantined {
            received_ms: now_ms,
            topic: m.topic.chars().take(256).collect(),
            reason,
            payload_hex: hex::encode(shown),
            records,
            payload_bytes: m.payload.len() as u64,
        };
        self.quarantine.put(t, &seq, &entry)?;
        self.quarantine_index
            .put(t, &quarantine_key(device, seq), &())?;
        st.entries += 1;
        st.bytes += entry.size_bytes();
        st.last_entry_ms = now_ms;
        // Oldest first out, until the device is within its bounds again.
        while st.entries > lim.quarantine_max_per_device.max(1)
            || (st.bytes > lim.quarantine_max_bytes_per_device && st.entries > 1)
        {
            let oldest = {
                let lo = quarantine_key(device, 0);
                let hi = quarantine_key(device, u64::MAX);
                let range = (
                    std::ops::Bound::Included(&lo[..]),
                    std::ops::Bound::Included(&hi[..]),
                );
                let mut it = self.quarantine_index.range(t, &range)?;
                match it.next() {
                    Some(e) => {
                        let k = e?.0;
                        u64::from_be_bytes(k[8..16].try_into().expect("16-byte key"))
                    }
                    None => break,
                }
            };
            let size = self
                .quarantine
                .get(t, &oldest)?
                .map_or(0, |q| q.size_bytes());
            self.quarantine.delete(t, &oldest)?;
            self.quarantine_index
                .delete(t, &quarantine_key(device, oldest))?;
            st.entries -= 1;
            st.bytes = st.bytes.saturating_sub(size);
            st.dropped_entries += 1;
            out.quarantine_dropped += 1;
            if !st.flagged {
                st.flagged = true;
                out.flagged.push(device);
            }
        }
        self.quarantine_devices.put(t, &device, &st)?;
        Ok(())
    }

    /// Ingests a batch of messages in one durable transaction; see the module docs.
    pub fn ingest(
        &self,
        messages: &[Message],
        device_key: impl Fn(u32) -> Option<AesKey>,
        now_ms: u64,
    ) -> Result<IngestOutcome, StoreError> {
        let ring = |d| {
            device_key(d)
                .map(|k| DeviceKeyRing::single(0, k))
                .unwrap_or_default()
        };
        self.ingest_with_rings(messages, ring, now_ms)
    }

    /// [`Store::ingest`] with each device's versioned keys (a KM_DEVICE rotation): a tap
    /// verifies under any accepted version; one MAC'd under a retired version is quarantined
    /// with its own reason (and not confirmed, so the device keeps it).
    pub fn ingest_with_rings(
        &self,
        messages: &[Message],
        device_key: impl Fn(u32) -> DeviceKeyRing,
        now_ms: u64,
    ) -> Result<IngestOutcome, StoreError> {
        let mut t = self.write_txn()?;
        let mut b = self.begin_batch(&t, now_ms)?;
        for m in messages {
            self.ingest_message(&mut t, &mut b, m, &device_key)?;
        }
        self.finish_batch(&mut t, &mut b)?;
        t.commit()?;
        Ok(b.out)
    }

    /// Refuses the batch when the map is past `ingest_refuse_at_fill_percent`; otherwise the
    /// batch's state: whether quarantine still has room, the next outbox id.
    fn begin_batch(&self, t: &RwTxn<'_>, now_ms: u64) -> Result<Batch, StoreError> {
        let (used_bytes, map_bytes) = self.fill(t)?;
        let past = |p: u64| past_percent(used_bytes, map_bytes, p);
        if past(self.limits.ingest_refuse_at_fill_percent) {
            return Err(StoreError::Full {
                used_bytes,
                map_bytes,
            });
        }
        // Continue after the outbox, or after what was forwarded: outbox ids never repeat (and
        // every id keying a stored tap or a pending record is below: they are appended).
        let next_outbox = [
            self.outbox.last(t)?.map(|e| e.0),
            self.meta.get(t, "forwarded_through")?,
            self.arrivals.last(t)?.map(|e| e.0),
            self.last_delta_batch(t)?,
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0)
            + 1;
        Ok(Batch {
            out: IngestOutcome::default(),
            dev_states: BTreeMap::new(),
            deltas: BTreeMap::new(),
            device_keys: BTreeMap::new(),
            next_outbox,
            room: !past(self.limits.quarantine_stop_at_fill_percent),
            now_ms,
        })
    }

    /// One message: its topic and length checked, each record stored or refused; the refused
    /// ones become one quarantine entry.
    fn ingest_message(
        &self,
        t: &mut RwTxn<'_>,
        b: &mut Batch,
        m: &Message,
        device_key: &impl Fn(u32) -> DeviceKeyRing,
    ) -> Result<(), StoreError> {
        let Some((op, topic_device)) = parse_tap_topic(&m.topic) else {
            let reason = "topic is not tapgate/v1/<operator>/taps/<device>".to_string();
            self.quarantine_put(
                t,
                &mut b.out,
                b.now_ms,
                u64::MAX,
                m,
                reason,
                0,
                &m.payload,
                b.room,
            )?;
            b.out.quarantined += 1;
            return Ok(());
        };
        let qdev = u64::from(topic_device);
        let records = match split_records(&m.payload) {
            Ok(r) if !r.is_empty() => Ok(r),
            Ok(_) => Err("an empty payload".to_string()),
            Err(e) => Err(e.to_string()),
        };
        let records = match records {
            Ok(r) => r,
            Err(why) => {
                let reason = format!(
                    "payload of {} bytes is not a sequence of tap records ({why})",
                    m.payload.len()
                );
                self.quarantine_put(
                    t, &mut b.out, b.now_ms, qdev, m, reason, 0, &m.payload, b.room,
                )?;
                b.out.quarantined += 1;
                return Ok(());
            }
        };
        let total = records.len();
        let mut refused = Refused::default();
        for rec in records {
            if refused.records >= self.limits.quarantine_max_bad_records_per_message {
                refused.stopped = true;
                break;
            }
            self.ingest_record(t, b, op, topic_device, rec, device_key, &mut refused)?;
        }
        if refused.records > 0 {
            let reason = refused.reason(total);
            self.quarantine_put(
                t,
                &mut b.out,
                b.now_ms,
                qdev,
                m,
                reason,
                refused.records,
                &refused.sample,
                b.room,
            )?;
            b.out.quarantined += refused.records;
        }
        Ok(())
    }

    /// One record: verified for the topic's operator and device, then stored once (a duplicate
    /// is confirmed again), or added to `refused`.
    #[allow(clippy::too_many_arguments)]
    fn ingest_record(
        &self,
        t: &mut RwTxn<'_>,
        b: &mut Batch,
        op: &str,
        topic_device: u32,
        rec: &[u8],
        device_key: &impl Fn(u32) -> DeviceKeyRing,
        refused: &mut Refused,
    ) -> Result<(), StoreError> {
        // The topic's operator: a record its device signed for another operator (a metro device
        // publishing on a hotel's topics) does not verify.
        let (tap, key_version) = match verify_record(rec, op, &mut b.device_keys, device_key) {
            Ok(v) => v,
            Err(e) => {
                refused.add(
                    || match e {
                        Refusal::Check(TapError::BadMac) => format!(
                            "device MAC does not verify for operator {op} (forged, altered, or another operator's device)"
                        ),
                        Refusal::RetiredKey(v) => format!(
                            "device MAC under retired device-key version {v}: re-provision the device (the tap stays in its outbox, unconfirmed)"
                        ),
                        Refusal::Check(other) => other.to_string(),
                    },
                    rec,
                );
                return Ok(());
            }
        };
        let device = tap.meta().device_id;
        if device != topic_device {
            refused.add(
                || format!("record of device {device} published on device {topic_device}'s topic"),
                rec,
            );
            return Ok(());
        }
        let seq = tap.meta().device_seq;
        b.out.device_key_versions.insert(device, key_version);
        let confirm = b
            .out
            .confirmations
            .entry((op.to_string(), device))
            .or_default();
        confirm.push(seq);
        // Device states and aggregates are accumulated for the whole batch and written once per
        // key at the end (an outbox draining repeats the same keys). A duplicate is told by the
        // device's state (highest sequence, gaps), read once per device and batch: no lookup
        // among the stored taps.
        let e = match b.dev_states.entry(device) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let untracked = self.meta.get(t, &untracked_key(device))?.unwrap_or(0);
                e.insert(DevEntry {
                    st: self.devices.get(t, &u64::from(device))?.unwrap_or_default(),
                    untracked,
                    untracked_was: untracked,
                })
            }
        };
        if e.seen(seq) {
            b.out.duplicates += 1;
            return Ok(());
        }
        // Keys that only grow: appended at the end of both B-trees, full pages.
        let id = b.next_outbox;
        self.arrivals
            .put_with_flags(t, PutFlags::APPEND, &id, rec)?;
        self.outbox.put_with_flags(t, PutFlags::APPEND, &id, &[])?;
        b.next_outbox += 1;
        let st = &mut e.st;
        if let Some(dropped) = st.record_seq(seq) {
            e.untracked = e.untracked.max(dropped.1);
            tracing::warn!(
                device,
                ?dropped,
                "gap list full; oldest gap no longer tracked (a tap in it is stored again)"
            );
        }
        st.taps = st.taps.saturating_add(1);
        st.last_seen_ms = b.now_ms;
        if key_version != 0 {
            st.device_key_version = Some(key_version);
        }
        aggregate_into(&mut b.deltas, &tap);
        b.out.stored += 1;
        Ok(())
    }

    /// Writes the batch's device states, once per device, and appends its aggregate deltas
    /// under its last outbox id (folded later, in one sorted pass for many batches:
    /// [`Store::fold_aggregates`]).
    fn finish_batch(&self, t: &mut RwTxn<'_>, b: &mut Batch) -> Result<(), StoreError> {
        for (device, e) in &b.dev_states {
            self.devices.put(t, &u64::from(*device), &e.st)?;
            if e.untracked != e.untracked_was {
                self.meta.put(t, &untracked_key(*device), &e.untracked)?;
            }
        }
        if !b.deltas.is_empty() {
            // Only stored taps add deltas: the batch took ids, the last is its own.
            self.append_deltas(t, b.next_outbox - 1, &b.deltas)?;
        }
        Ok(())
    }

    /// Adds deltas to the aggregates, in key order (`card-day:` ones to their day-first
    /// table, [`card_days`]).
    fn add_to_aggregates(
        &self,
        t: &mut RwTxn<'_>,
        deltas: BTreeMap<String, Aggregate>,
    ) -> Result<(), StoreError> {
        let mut by_day: BTreeMap<Vec<u8>, Aggregate> = BTreeMap::new();
        for (k, delta) in deltas {
            if let Some(key) = card_days::key_of(&k) {
                add_aggregate(by_day.entry(key).or_default(), &delta);
                continue;
            }
            let mut a = self.aggregates.get(t, &k)?.unwrap_or_default();
            add_aggregate(&mut a, &delta);
            self.aggregates.put(t, &k, &a)?;
        }
        self.add_to_card_days(t, by_day)
    }

    /// Aggregates whose key starts with `prefix` (`device:`, `stop:`, `route:`, `card-day:`,
    /// `product:`), at most `limit`, in key order; `card-day:` ones with the deltas not folded
    /// yet added (they are exact at any time), none of a day trimmed
    /// ([`Store::card_days_kept_from`]).
    pub fn aggregates(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Aggregate)>, StoreError> {
        Ok(self.aggregates_kept_from(prefix, limit)?.0)
    }

    /// [`Store::aggregates`], and the first day whose `card-day:` aggregates are kept as the
    /// same read saw it ([`Store::card_days_kept_from`]): a day before it was trimmed, not
    /// without taps.
    pub fn aggregates_kept_from(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<(Vec<(String, Aggregate)>, u64), StoreError> {
        let r = self.env.read_txn()?;
        // The first `limit` names stored, and whether that is all: at most one more read from
        // each table (`card-day:` ones from theirs, under their public names).
        let cap = limit.saturating_add(1);
        let kept_from = self.card_days_kept_from_in(&r)?;
        let mut out = self.stored_card_days(&r, prefix, cap, kept_from)?;
        // LMDB refuses an empty key to seek to: no prefix is every aggregate.
        let items: Box<dyn Iterator<Item = heed::Result<(&str, Aggregate)>>> = if prefix.is_empty()
        {
            Box::new(self.aggregates.iter(&r)?)
        } else {
            Box::new(self.aggregates.prefix_iter(&r, prefix)?)
        };
        for item in items.take(cap) {
            let (k, v) = item?;
            add_aggregate(out.entry(k.to_string()).or_default(), &v);
        }
        let complete = out.len() <= limit;
        while out.len() > limit {
            out.pop_last();
        }
        // Past the last key read (when the table had more), a pending key may sort after keys
        // not read: left out, as the limit would.
        let last = out.keys().next_back().cloned();
        self.pending_deltas(&r, |k, d| {
            let beyond = !complete && last.as_deref().is_some_and(|l| k > l);
            if k.starts_with(prefix) && !beyond && !card_days::trimmed(k, kept_from) {
                add_aggregate(out.entry(k.to_string()).or_default(), d);
            }
        })?;
        Ok((out.into_iter().take(limit).collect(), kept_from))
    }

    /// Every stored tap record (raw), in arrival order, at most `limit`.
    pub fn taps(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.arrivals.iter(&r)? {
            out.push(item?.1.to_vec());
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// All devices and their state.
    pub fn devices(&self) -> Result<Vec<(u32, DeviceState)>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.devices.iter(&r)? {
            let (k, v) = item?;
            out.push((k as u32, v));
        }
        Ok(out)
    }

    /// A device's state.
    pub fn device(&self, device: u32) -> Result<Option<DeviceState>, StoreError> {
        let r = self.env.read_txn()?;
        Ok(self.devices.get(&r, &u64::from(device))?)
    }

    /// Quarantined messages, oldest first (at most `limit`).
    pub fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.quarantine.iter(&r)? {
            out.push(item?.1);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Every device the quarantine has an account of (by topic device id; `u64::MAX`: topics
    /// naming none), at most `limit`.
    pub fn quarantine_devices(
        &self,
        limit: usize,
    ) -> Result<Vec<(u64, QuarantineDevice)>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.quarantine_devices.iter(&r)? {
            out.push(item?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Quarantine entries kept now (all devices).
    pub fn quarantine_len(&self) -> Result<u64, StoreError> {
        let r = self.env.read_txn()?;
        Ok(self.quarantine.len(&r)?)
    }

    /// The next outbox entries to forward: (outbox id, raw tap record), at most `limit`.
    pub fn pending_forward(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::with_capacity(limit.min(10_000));
        for item in self.outbox.iter(&r)? {
            let (id, _) = item?;
            if let Some(raw) = self.arrivals.get(&r, &id)? {
                out.push((id, raw.to_vec()));
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Marks everything up to `through` forwarded (clearing acknowledged it durably), at the
    /// system clock's time; see [`Store::forwarded_at`].
    pub fn forwarded(&self, through: u64) -> Result<u64, StoreError> {
        self.forwarded_at(through, unix_ms())
    }

    /// Marks everything up to `through` forwarded at `now_ms` (clearing acknowledged it
    /// durably): out of the outbox, into the forwarded log, in transactions of at most
    /// [`MOVE_CHUNK`] entries ([`TRIM_CHUNK_PRESSED`] while the map is past the quarantine mark,
    /// where a forwarded tap is trimmed at once and each transaction must fit the room left),
    /// each moving `forwarded_through` on with it; then [`Store::trim_expired_at`]. Returns how
    /// many taps were trimmed.
    pub fn forwarded_at(&self, through: u64, now_ms: u64) -> Result<u64, StoreError> {
        let mut trimmed = 0u64;
        loop {
            let mut t = self.write_txn()?;
            let pressed = self.pressed(&t)?;
            let chunk = if pressed {
                TRIM_CHUNK_PRESSED
            } else {
                MOVE_CHUNK
            };
            let mut done: Vec<u64> = Vec::new();
            for item in self.outbox.iter(&t)? {
                let (id, _) = item?;
                if id > through || done.len() >= chunk {
                    break;
                }
                done.push(id);
            }
            let last = done.len() < chunk;
            let upto = if last {
                through
            } else {
                done.last().copied().unwrap_or(through)
            };
            for id in done {
                self.outbox.delete(&mut t, &id)?;
                if pressed {
                    self.arrivals.delete(&mut t, &id)?;
                    trimmed += 1;
                } else {
                    self.forwarded_log.put(&mut t, &id, &now_ms.to_be_bytes())?;
                }
            }
            let prev = self.meta.get(&t, "forwarded_through")?.unwrap_or(0);
            self.meta
                .put(&mut t, "forwarded_through", &prev.max(upto))?;
            t.commit()?;
            if last {
                return Ok(trimmed + self.trim_expired_at(now_ms)?);
            }
        }
    }

    /// Trims the forwarded taps whose retention ended by `now_ms` (all forwarded taps while the
    /// map is past the quarantine mark), oldest answer first: at most [`TRIM_MAX_PER_CALL`], in
    /// transactions of at most [`TRIM_CHUNK`] ([`TRIM_CHUNK_PRESSED`] when pressed), the write
    /// lock released between two. Called after each forwarded batch and, so that an idle
    /// gateway trims too, on a timer. Then the card-days past their retention
    /// ([`Store::trim_expired_card_days_at`]) and the fold of the aggregate deltas. Returns how
    /// many forwarded taps were trimmed.
    pub fn trim_expired_at(&self, now_ms: u64) -> Result<u64, StoreError> {
        let trimmed = self.trim_expired_chunks(now_ms)?;
        // Then the card-days: the expired days first (the fold then drops their late deltas
        // rather than write them), then the fold (after the trims: on a full map, with the room
        // they made). Both are housekeeping: a map too full for them leaves the entries, exact
        // as they are, to a later call.
        match self.trim_expired_card_days_at(now_ms) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(n, "card-day aggregates past their retention trimmed"),
            Err(e) if e.is_full() => {
                tracing::warn!(%e, "card-day aggregates not trimmed: the store is full");
            }
            Err(e) => return Err(e),
        }
        if let Err(e) = self.fold_aggregates() {
            if !e.is_full() {
                return Err(e);
            }
            tracing::warn!(%e, "card-day aggregates not folded: the store is full");
        }
        Ok(trimmed)
    }

    /// [`Store::trim_expired_at`]'s trim.
    fn trim_expired_chunks(&self, now_ms: u64) -> Result<u64, StoreError> {
        // Most calls (after every forwarded batch) find nothing expired: told in a read
        // transaction, without the write lock ingest needs.
        if !self.forwarded_due(now_ms)? {
            return Ok(0);
        }
        let mut trimmed = 0u64;
        while trimmed < TRIM_MAX_PER_CALL as u64 {
            let mut t = self.write_txn()?;
            let pressed = self.pressed(&t)?;
            let chunk = if pressed {
                TRIM_CHUNK_PRESSED
            } else {
                self.trim_chunk
            };
            let n = self.trim_forwarded(&mut t, now_ms, pressed, chunk)?;
            if n == 0 {
                return Ok(trimmed);
            }
            t.commit()?;
            trimmed += n;
            if n < chunk as u64 {
                break;
            }
        }
        Ok(trimmed)
    }

    /// [`Store::trim_expired_at`] at the system clock's time.
    pub fn trim_expired(&self) -> Result<u64, StoreError> {
        self.trim_expired_at(unix_ms())
    }

    /// Whether the map is past `quarantine_stop_at_fill_percent`: room for new taps first.
    fn pressed(&self, t: &heed::RoTxn<'_, WithoutTls>) -> Result<bool, StoreError> {
        let (used_bytes, map_bytes) = self.fill(t)?;
        Ok(past_percent(
            used_bytes,
            map_bytes,
            self.limits.quarantine_stop_at_fill_percent,
        ))
    }

    /// Whether [`Store::trim_forwarded`] has anything to trim at `now_ms`: the oldest forwarded
    /// tap expired, or any kept while the map is past the quarantine mark.
    fn forwarded_due(&self, now_ms: u64) -> Result<bool, StoreError> {
        let r = self.env.read_txn()?;
        let Some((_, v)) = self.forwarded_log.first(&r)? else {
            return Ok(false);
        };
        let cutoff = now_ms.saturating_sub(self.limits.forwarded_retention_ms);
        Ok(forwarded_expired(v, cutoff) || self.pressed(&r)?)
    }

    /// Trims up to `max` forwarded taps whose clearing answer is older than the retention
    /// window (all of them when `pressed`), oldest answer first.
    fn trim_forwarded(
        &self,
        t: &mut RwTxn<'_>,
        now_ms: u64,
        pressed: bool,
        max: usize,
    ) -> Result<u64, StoreError> {
        let cutoff = now_ms.saturating_sub(self.limits.forwarded_retention_ms);
        let mut due = Vec::new();
        for item in self.forwarded_log.iter(t)? {
            let (id, v) = item?;
            if due.len() >= max {
                break;
            }
            if !pressed && !forwarded_expired(v, cutoff) {
                break;
            }
            due.push(id);
        }
        // Ids in order, oldest first: the leading pages of both tables.
        for id in &due {
            self.arrivals.delete(t, id)?;
            self.forwarded_log.delete(t, id)?;
        }
        Ok(due.len() as u64)
    }

    /// Forwarded taps still kept (within their retention window).
    pub fn forwarded_kept(&self) -> Result<u64, StoreError> {
        let r = self.env.read_txn()?;
        Ok(self.forwarded_log.len(&r)?)
    }

    /// The blocklist version last published to validators.
    pub fn blocklist_version(&self) -> Result<u64, StoreError> {
        self.meta_value("blocklist_version")
    }

    /// Records the blocklist version published.
    pub fn set_blocklist_version(&self, v: u64) -> Result<(), StoreError> {
        self.set_meta_value("blocklist_version", v)
    }

    /// The action-list version last relayed to validators.
    pub fn actions_version(&self) -> Result<u64, StoreError> {
        self.meta_value("actions_version")
    }

    /// Records the action-list version relayed.
    pub fn set_actions_version(&self, v: u64) -> Result<(), StoreError> {
        self.set_meta_value("actions_version", v)
    }

    /// A number kept under `key` in the meta database (0 before it is first set).
    fn meta_value(&self, key: &str) -> Result<u64, StoreError> {
        let r = self.env.read_txn()?;
        Ok(self.meta.get(&r, key)?.unwrap_or(0))
    }

    /// Keeps `v` under `key` in the meta database.
    fn set_meta_value(&self, key: &str, v: u64) -> Result<(), StoreError> {
        let mut t = self.write_txn()?;
        self.meta.put(&mut t, key, &v)?;
        t.commit()?;
        Ok(())
    }

    /// Taps waiting to be forwarded.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let r = self.env.read_txn()?;
        Ok(self.outbox.len(&r)?)
    }

    /// Taps in the forwarded log: clearing took them and their retention has not ended.
    pub fn forwarded_len(&self) -> Result<u64, StoreError> {
        let r = self.env.read_txn()?;
        Ok(self.forwarded_log.len(&r)?)
    }
}

#[cfg(test)]
mod tests {
    use super::Store;

    #[test]
    fn relayed_list_versions_are_kept_apart_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(
            (s.blocklist_version().unwrap(), s.actions_version().unwrap()),
            (0, 0)
        );
        s.set_blocklist_version(7).unwrap();
        s.set_actions_version(3).unwrap();
        s.set_actions_version(4).unwrap();
        drop(s);
        let s = Store::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(
            (s.blocklist_version().unwrap(), s.actions_version().unwrap()),
            (7, 4)
        );
    }
}
