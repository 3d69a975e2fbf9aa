//! The gateway's metrics drawn from its state at each scrape (`GET /metrics`, beside the
//! counters in [`crate::api`]): the validators' heartbeats and clocks, the blocklist's
//! propagation, the devices' sequence gaps. Every family's `# TYPE` line is written even while
//! it has no sample, so a scrape names every metric the alerting rules in
//! `deploy/prometheus/alerts.yml` use.

use crate::propagation::Propagation;
use crate::store::DeviceState;
use std::fmt::Write;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// A gauge family with one sample per device (label `device`), in the order given.
fn per_device(
    out: &mut String,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (u32, String)>,
) {
    family(out, name, "gauge", help);
    for (id, v) in samples {
        let _ = writeln!(out, "{name}{{device=\"{id}\"}} {v}");
    }
}

/// Seconds with millisecond precision from unix (or relative) milliseconds.
fn seconds(ms: i64) -> String {
    let sign = if ms < 0 { "-" } else { "" };
    let abs = ms.unsigned_abs();
    format!("{sign}{}.{:03}", abs / 1000, abs % 1000)
}

/// Counters in Prometheus text: each `(name, counter)` as its `# TYPE` line and its value.
pub fn counters(counters: &[(&str, &std::sync::atomic::AtomicU64)]) -> String {
    let mut out = String::new();
    for (name, c) in counters {
        let v = c.load(std::sync::atomic::Ordering::Relaxed);
        let _ = write!(out, "# TYPE {name} counter\n{name} {v}\n");
    }
    out
}

/// The validators as their heartbeats describe them, and the latest blocklist's propagation.
pub fn validators(p: &Propagation) -> String {
    let mut out = String::new();
    let mut devices: Vec<(u32, bool, u64, Option<i64>)> = p.validators().collect();
    devices.sort_unstable_by_key(|d| d.0);

    family(
        &mut out,
        "tapgate_gateway_validators_online",
        "gauge",
        "validators whose last heartbeat said online",
    );
    let _ = writeln!(out, "tapgate_gateway_validators_online {}", p.online());
    per_device(
        &mut out,
        "tapgate_gateway_validator_online",
        "1 while the validator's last heartbeat said online (0 after its goodbye or last will)",
        devices.iter().map(|d| (d.0, u8::from(d.1).to_string())),
    );
    per_device(
        &mut out,
        "tapgate_gateway_validator_last_heartbeat_timestamp_seconds",
        "when the validator's last heartbeat arrived (unix seconds, gateway clock)",
        devices.iter().map(|d| (d.0, seconds(d.2 as i64))),
    );
    per_device(
        &mut out,
        "tapgate_gateway_validator_clock_skew_seconds",
        "validator clock minus gateway clock at its last heartbeat (positive: ahead)",
        devices.iter().filter_map(|d| Some((d.0, seconds(d.3?)))),
    );

    let latest = p.latest().and_then(|v| p.report(v));
    family(
        &mut out,
        "tapgate_gateway_blocklist_published_version",
        "gauge",
        "the latest blocklist version this gateway published to validators",
    );
    family(
        &mut out,
        "tapgate_gateway_blocklist_published_timestamp_seconds",
        "gauge",
        "when this gateway first published the latest blocklist version (unix seconds)",
    );
    family(
        &mut out,
        "tapgate_gateway_blocklist_validators_holding",
        "gauge",
        "online validators holding the latest published blocklist version or a later one",
    );
    if let Some(r) = latest {
        let _ = write!(
            out,
            "tapgate_gateway_blocklist_published_version {}\n\
             tapgate_gateway_blocklist_published_timestamp_seconds {}\n\
             tapgate_gateway_blocklist_validators_holding {}\n",
            r.version,
            seconds(r.published_at_ms as i64),
            r.holding
        );
    }
    out
}

/// The devices' open sequence gaps: taps numbered but never received (yet).
pub fn gaps(devices: &[(u32, DeviceState)]) -> String {
    let missing = |d: &DeviceState| -> u64 {
        d.gaps
            .iter()
            .map(|&(a, b)| b.saturating_sub(a).saturating_add(1))
            .sum()
    };
    let mut out = String::new();
    let mut with_gaps: Vec<(u32, u64)> = devices
        .iter()
        .map(|(id, d)| (*id, missing(d)))
        .filter(|&(_, n)| n > 0)
        .collect();
    with_gaps.sort_unstable();
    family(
        &mut out,
        "tapgate_gateway_sequence_gap_taps",
        "gauge",
        "taps missing from the devices' sequences (numbered by a validator, not received)",
    );
    let total: u64 = with_gaps.iter().map(|&(_, n)| n).sum();
    let _ = writeln!(out, "tapgate_gateway_sequence_gap_taps {total}");
    family(
        &mut out,
        "tapgate_gateway_devices_with_gaps",
        "gauge",
        "devices with at least one open sequence gap",
    );
    let _ = writeln!(out, "tapgate_gateway_devices_with_gaps {}", with_gaps.len());
    per_device(
        &mut out,
        "tapgate_gateway_device_sequence_gap_taps",
        "taps missing from this device's sequence (only devices with a gap)",
        with_gaps.into_iter().map(|(id, n)| (id, n.to_string())),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validators_heartbeats_clocks_and_propagation() {
        let mut p = Propagation::default();
        // Before anything: the families are named, with no per-device sample.
        let empty = validators(&p);
        assert!(empty.contains("# TYPE tapgate_gateway_validator_clock_skew_seconds gauge"));
        assert!(empty.contains("tapgate_gateway_validators_online 0\n"));
        assert!(!empty.contains("tapgate_gateway_blocklist_validators_holding 0"));

        p.heartbeat(7, 1, true, 1_700_000_000_250);
        p.heartbeat(3, 2, false, 1_700_000_001_000);
        p.clock(7, 1_700_000_000_250 - 90_500, 1_700_000_000_250);
        p.published(2, 1_700_000_000_000);
        let text = validators(&p);
        assert!(
            text.contains("tapgate_gateway_validators_online 1\n"),
            "{text}"
        );
        assert!(text.contains("tapgate_gateway_validator_online{device=\"3\"} 0\n"));
        assert!(text.contains("tapgate_gateway_validator_online{device=\"7\"} 1\n"));
        assert!(text.contains(
            "tapgate_gateway_validator_last_heartbeat_timestamp_seconds{device=\"7\"} 1700000000.250\n"
        ));
        assert!(
            text.contains("tapgate_gateway_validator_clock_skew_seconds{device=\"7\"} -90.500\n")
        );
        assert!(!text.contains("tapgate_gateway_validator_clock_skew_seconds{device=\"3\"}"));
        assert!(text.contains("tapgate_gateway_blocklist_published_version 2\n"));
        assert!(
            text.contains("tapgate_gateway_blocklist_published_timestamp_seconds 1700000000.000\n")
        );
        // Device 7 holds version 1 only, device 3 is offline: nobody online holds version 2.
        assert!(
            text.contains("tapgate_gateway_blocklist_validators_holding 0\n"),
            "{text}"
        );
        p.heartbeat(7, 2, true, 1_700_000_002_000);
        assert!(validators(&p).contains("tapgate_gateway_blocklist_validators_holding 1\n"));
    }

    #[test]
    fn gaps_count_the_missing_taps_per_device_and_in_all() {
        let d = |gaps: Vec<(u64, u64)>| DeviceState {
            highest_seq: 100,
            taps: 10,
            gaps,
            last_seen_ms: 0,
            device_key_version: None,
        };
        let text = gaps(&[
            (9, d(vec![(3, 5), (10, 10)])),
            (2, d(vec![])),
            (4, d(vec![(1, 2)])),
        ]);
        assert!(
            text.contains("tapgate_gateway_sequence_gap_taps 6\n"),
            "{text}"
        );
        assert!(text.contains("tapgate_gateway_devices_with_gaps 2\n"));
        assert!(text.contains("tapgate_gateway_device_sequence_gap_taps{device=\"9\"} 4\n"));
        assert!(text.contains("tapgate_gateway_device_sequence_gap_taps{device=\"4\"} 2\n"));
        assert!(!text.contains("device=\"2\""));
        let none = gaps(&[]);
        assert!(none.contains("tapgate_gateway_sequence_gap_taps 0\n"));
        assert!(none.contains("# TYPE tapgate_gateway_device_sequence_gap_taps gauge"));
    }
}
