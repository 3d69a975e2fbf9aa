//! Blocklist propagation: how long after the gateway published a version the online validators
//! held it, from the versions they report in their heartbeats
//! (`tapgate/v1/<op>/devices/<device>/status`).
//!
//! For each published version the tracker keeps, per validator, the delay until its first
//! heartbeat reporting that version or a later one. The report for a version gives the delay
//! until 50%, 99% and 100% of the validators online now held it (`None` while not reached).
//! Bounded: the last [`MAX_VERSIONS`] published versions and [`MAX_DEVICES`] validators.
//!
//! Heartbeats also carry the validator's clock: the tracker keeps each validator's offset from
//! the gateway's clock, so a validator whose clock is off (by a day, say: its taps are dated
//! wrong and its fares computed for the wrong time) is visible to operators.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Published versions remembered.
pub const MAX_VERSIONS: usize = 64;
/// Validators tracked.
pub const MAX_DEVICES: usize = 200_000;
/// A validator clock further than this from the gateway's is reported.
pub const CLOCK_SKEW_WARN_MS: i64 = 5 * 60_000;

#[derive(Clone, Copy, Debug, Default)]
struct DeviceState {
    version: u64,
    online: bool,
    last_seen_ms: u64,
    /// Validator clock − gateway clock at its last heartbeat (ms).
    clock_skew_ms: Option<i64>,
    /// The fare table version its last heartbeat reported.
    fare_table_version: Option<u64>,
    /// The taps its last heartbeat said were waiting in its outbox.
    outbox_depth: Option<u64>,
}

/// A validator as its heartbeats describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ValidatorStatus {
    /// The device id.
    pub device_id: u32,
    /// Its last heartbeat said online (false after its goodbye or last will).
    pub online: bool,
    /// When its last heartbeat arrived (unix ms, gateway clock).
    pub last_heartbeat_ms: u64,
    /// The highest blocklist version it reported while online.
    pub blocklist_version: u64,
    /// The fare table version it last reported.
    pub fare_table_version: Option<u64>,
    /// The taps waiting in its outbox at its last heartbeat.
    pub outbox_depth: Option<u64>,
    /// Its clock minus the gateway's at its last live heartbeat (ms; positive: ahead).
    pub clock_skew_ms: Option<i64>,
}

/// The tracker.
#[derive(Debug, Default)]
pub struct Propagation {
    published_ms: BTreeMap<u64, u64>,
    devices: HashMap<u32, DeviceState>,
    /// Per version: device → delay (ms) until it first held the version.
    reached: BTreeMap<u64, HashMap<u32, u64>>,
}

/// The propagation of one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The blocklist version.
    pub version: u64,
    /// When this gateway first published it (unix ms).
    pub published_at_ms: u64,
    /// Validators whose last heartbeat said online.
    pub online_validators: usize,
    /// Online validators holding this version or a later one.
    pub holding: usize,
    /// Delay until half of the online validators held it (`None`: not yet).
    pub ms_to_50: Option<u64>,
    /// Delay until 99% held it.
    pub ms_to_99: Option<u64>,
    /// Delay until all online validators held it.
    pub ms_to_100: Option<u64>,
}

impl Propagation {
    /// The gateway published `version` at `now_ms` (the first publication counts).
    pub fn published(&mut self, version: u64, now_ms: u64) {
        self.published_ms.entry(version).or_insert(now_ms);
        self.reached.entry(version).or_default();
        while self.published_ms.len() > MAX_VERSIONS {
            if let Some((&v, _)) = self.published_ms.iter().next() {
                self.published_ms.remove(&v);
                self.reached.remove(&v);
            }
        }
        // Validators already holding it (a late publication of a version they hold): delay 0.
        let holders: Vec<u32> = self
            .devices
            .iter()
            .filter(|(_, d)| d.version >= version)
            .map(|(&id, _)| id)
            .collect();
        if let Some(r) = self.reached.get_mut(&version) {
            for id in holders {
                r.entry(id).or_insert(0);
            }
        }
    }

    /// A heartbeat: `device` holds `version` and is (or is no longer) online.
    pub fn heartbeat(&mut self, device: u32, version: u64, online: bool, now_ms: u64) {
        if !self.devices.contains_key(&device) && self.devices.len() >= MAX_DEVICES {
            return;
        }
        let d = self.devices.entry(device).or_default();
        d.online = online;
        d.last_seen_ms = now_ms;
        if !online {
            return;
        }
        d.version = d.version.max(version);
        for (&v, &at) in self.published_ms.range(..=version) {
            if let Some(r) = self.reached.get_mut(&v) {
                r.entry(device).or_insert(now_ms.saturating_sub(at));
            }
        }
    }

    /// A heartbeat's clock reading `clock_ms` from `device`, received at `now_ms`: records the
    /// offset and returns it with whether it newly went beyond [`CLOCK_SKEW_WARN_MS`] (to warn
    /// once, not at every heartbeat).
    pub fn clock(&mut self, device: u32, clock_ms: u64, now_ms: u64) -> Option<(i64, bool)> {
        let d = self.devices.get_mut(&device)?;
        let skew = clock_ms as i64 - now_ms as i64;
        let was_off = d
            .clock_skew_ms
            .is_some_and(|s| s.abs() > CLOCK_SKEW_WARN_MS);
        d.clock_skew_ms = Some(skew);
        Some((skew, !was_off && skew.abs() > CLOCK_SKEW_WARN_MS))
    }

    /// What a heartbeat says beside the blocklist version: the fare table version and the
    /// outbox's depth (kept when a heartbeat does not say, e.g. the goodbye).
    pub fn details(
        &mut self,
        device: u32,
        fare_table_version: Option<u64>,
        outbox_depth: Option<u64>,
    ) {
        if let Some(d) = self.devices.get_mut(&device) {
            d.fare_table_version = fare_table_version.or(d.fare_table_version);
            d.outbox_depth = outbox_depth.or(d.outbox_depth);
        }
    }

    /// Every validator heard from, by device id.
    pub fn statuses(&self) -> Vec<ValidatorStatus> {
        let mut out: Vec<ValidatorStatus> = self
            .devices
            .iter()
            .map(|(&id, d)| ValidatorStatus {
                device_id: id,
                online: d.online,
                last_heartbeat_ms: d.last_seen_ms,
                blocklist_version: d.version,
                fare_table_version: d.fare_table_version,
                outbox_depth: d.outbox_depth,
                clock_skew_ms: d.clock_skew_ms,
            })
            .collect();
        out.sort_unstable_by_key(|v| v.device_id);
        out
    }

    /// The validator's clock offset at its last heartbeat (ms; positive: ahead).
    pub fn clock_skew(&self, device: u32) -> Option<i64> {
        self.devices.get(&device).and_then(|d| d.clock_skew_ms)
    }

    /// Each validator's last heartbeat: (device, online, last heartbeat at (unix ms, gateway
    /// clock), clock offset (ms) if its heartbeats carry its clock).
    pub fn validators(&self) -> impl Iterator<Item = (u32, bool, u64, Option<i64>)> + '_ {
        self.devices
            .iter()
            .map(|(&id, d)| (id, d.online, d.last_seen_ms, d.clock_skew_ms))
    }

    /// Validators online now.
    pub fn online(&self) -> usize {
        self.devices.values().filter(|d| d.online).count()
    }

    /// The versions remembered, oldest first.
    pub fn versions(&self) -> Vec<u64> {
        self.published_ms.keys().copied().collect()
    }

    /// The latest published version.
    pub fn latest(&self) -> Option<u64> {
        self.published_ms.keys().next_back().copied()
    }

    /// The propagation of `version` (`None` if the gateway did not publish it, or forgot).
    pub fn report(&self, version: u64) -> Option<Report> {
        let published_at_ms = *self.published_ms.get(&version)?;
        let reached = self.reached.get(&version)?;
        let mut delays: Vec<u64> = self
            .devices
            .iter()
            .filter(|(_, d)| d.online)
            .filter_map(|(id, _)| reached.get(id).copied())
            .collect();
        delays.sort_unstable();
        let n = self.online();
        let to = |pct: usize| -> Option<u64> {
            if n == 0 {
                return None;
            }
            let need = (n * pct).div_ceil(100).max(1);
            delays.get(need - 1).copied()
        };
        Some(Report {
            version,
            published_at_ms,
            online_validators: n,
            holding: delays.len(),
            ms_to_50: to(50),
            ms_to_99: to(99),
            ms_to_100: to(100),
        })
    }
}

/// Parses a validator heartbeat payload: (blocklist version, online).
pub fn parse_status(payload: &[u8]) -> Option<(u64, bool)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let online = v.get("online")?.as_bool()?;
    let version = v
        .get("blocklist_version")
        .and_then(|x| x.as_u64())
        .unwrap_or(0);
    Some((version, online))
}

/// The fare table version and outbox depth in a heartbeat payload, where it says.
pub fn parse_details(payload: &[u8]) -> (Option<u64>, Option<u64>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return (None, None);
    };
    let field = |k: &str| v.get(k).and_then(|x| x.as_u64());
    (field("fare_table_version"), field("outbox_depth"))
}

/// The validator's clock (unix ms) in a heartbeat payload, if it says.
pub fn parse_clock(payload: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get("clock_ms")?.as_u64()
}

/// The device id of a status topic `tapgate/v1/<op>/devices/<device>/status`.
pub fn status_device(topic: &str) -> Option<u32> {
    match crate::store::topic_levels(topic)? {
        ["tapgate", "v1", _, "devices", d, "status"] => d.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_online_validators() {
        let mut p = Propagation::default();
        for id in 1..=4 {
            p.heartbeat(id, 1, true, 0);
        }
        p.heartbeat(5, 1, false, 0); // offline: not counted
        p.published(2, 1_000);
        p.heartbeat(1, 2, true, 1_100);
        let r = p.report(2).unwrap();
        assert_eq!((r.online_validators, r.holding), (4, 1));
        assert_eq!((r.ms_to_50, r.ms_to_100), (None, None));
        p.heartbeat(2, 2, true, 1_300);
        p.heartbeat(3, 3, true, 1_700); // a later version counts for 2 as well
        let r = p.report(2).unwrap();
        assert_eq!(r.ms_to_50, Some(300));
        assert_eq!(r.ms_to_99, None);
        p.heartbeat(4, 2, true, 2_000);
        let r = p.report(2).unwrap();
        assert_eq!((r.ms_to_99, r.ms_to_100), (Some(1_000), Some(1_000)));
        // A validator that goes offline no longer counts.
        p.heartbeat(4, 2, false, 2_100);
        assert_eq!(p.report(2).unwrap().online_validators, 3);
        assert!(p.report(9).is_none());
    }

    #[test]
    fn topics_and_payloads() {
        assert_eq!(
            status_device("tapgate/v1/metro/devices/1001/status"),
            Some(1001)
        );
        assert_eq!(status_device("tapgate/v1/metro/taps/1001"), None);
        assert_eq!(
            parse_status(br#"{"online":true,"blocklist_version":7}"#),
            Some((7, true))
        );
        assert_eq!(
            parse_status(br#"{"device":1,"online":false}"#),
            Some((0, false))
        );
        assert_eq!(parse_status(b"garbage"), None);
        assert_eq!(
            parse_clock(br#"{"online":true,"clock_ms":1700000000000}"#),
            Some(1_700_000_000_000)
        );
        assert_eq!(parse_clock(br#"{"online":true}"#), None);
        // A clock a day ahead is reported once, then again only after it was right meanwhile.
        let mut p = Propagation::default();
        p.heartbeat(9, 0, true, 1_000);
        let day = 86_400_000;
        assert_eq!(p.clock(9, 1_000 + day, 1_000), Some((day as i64, true)));
        assert_eq!(p.clock(9, 2_000 + day, 2_000), Some((day as i64, false)));
        assert_eq!(p.clock_skew(9), Some(day as i64));
        assert_eq!(p.clock(9, 3_000, 3_050), Some((-50, false)));
        assert_eq!(p.clock(9, 4_000, 4_000 + day), Some((-(day as i64), true)));
        assert_eq!(p.clock(77, 0, 0), None, "unknown device");
    }

    #[test]
    fn a_heartbeat_s_details_are_kept_per_validator() {
        let mut p = Propagation::default();
        p.heartbeat(9, 4, true, 1_000);
        let payload = br#"{"device":9,"online":true,"blocklist_version":4,"fare_table_version":3,"outbox_depth":12,"clock_ms":5}"#;
        let (fare, outbox) = parse_details(payload);
        p.details(9, fare, outbox);
        p.heartbeat(9, 4, false, 2_000);
        p.details(9, None, None);
        let s = p.statuses();
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].online, s[0].last_heartbeat_ms, s[0].blocklist_version),
            (false, 2_000, 4)
        );
        assert_eq!(
            (s[0].fare_table_version, s[0].outbox_depth),
            (Some(3), Some(12))
        );
        assert_eq!(parse_details(b"not json"), (None, None));
    }
}
