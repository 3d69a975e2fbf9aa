//! The reader thread: waits for cards, runs each tap through the gate (taps are synchronous
//! and take milliseconds), counts what happened and wakes the publisher.

use super::{now_ms, Shared, Summary};
use crate::daemon::DaemonError;
use crate::gate::{Answer, Pickup, Settled, Step, TapOutcome};
use crate::reader::Reader;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

/// Starts the reader loop on its own thread; joining it gives the run's summary (without
/// `outbox_left`).
pub(super) fn spawn(
    shared: Shared,
    reader: Box<dyn Reader>,
    crash_at: Option<(u64, Step)>,
) -> Result<JoinHandle<Result<Summary, String>>, DaemonError> {
    std::thread::Builder::new()
        .name("reader".into())
        .spawn(move || reader_loop(&shared, reader, crash_at))
        .map_err(|e| DaemonError::Reader(e.to_string()))
}

/// Taps cards until the reader has no more or shutdown is set.
fn reader_loop(
    shared: &Shared,
    mut reader: Box<dyn Reader>,
    crash_at: Option<(u64, Step)>,
) -> Result<Summary, String> {
    let mut s = Summary::default();
    let mut lat = Vec::new();
    let mut failure = None;
    let device = shared.gate.lock().map_or(0, |g| g.placement.device_id);
    while !shared.shutdown.load(Ordering::Relaxed) {
        let Some(card) = reader.wait_card() else {
            failure = reader.failure();
            break;
        };
        let t0 = Instant::now();
        let n = s.taps + 1;
        let mut hook = |step: Step| {
            if crash_at == Some((n, step)) {
                eprintln!("fault injection: power cut at {step:?} of tap {n}");
                std::process::abort();
            }
        };
        let out = {
            let mut g = shared
                .gate
                .lock()
                .map_err(|_| "gate lock poisoned".to_string())?;
            let actions = shared
                .actions
                .lock()
                .map_err(|_| "action list lock poisoned".to_string())?;
            let out = g
                .tap_with_actions(card, &shared.journal, &actions, now_ms(), &mut hook)
                .map(|(pickup, out)| {
                    log_pickup(device, &pickup);
                    count_pickup(shared, &pickup);
                    out
                });
            shared
                .metrics
                .action_ceiling_minor
                .set(g.sam.ceiling_minor());
            out
        };
        reader.card_removed();
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "tap failed");
                shared
                    .metrics
                    .taps
                    .with_label_values(&["error", "gate"])
                    .inc();
                continue;
            }
        };
        let us = t0.elapsed().as_micros() as u64;
        shared.metrics.latency.observe(us as f64 / 1e6);
        lat.push(us);
        count(shared, &mut s, &out);
        log_tap(device, &out);
        shared.taps_done.store(s.taps, Ordering::Relaxed);
        if let Ok(d) = shared.journal.outbox_len() {
            shared.metrics.outbox_depth.set(d as i64);
        }
        shared.wake.notify_one();
    }
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    s.tap_latency_us_p50 = q(0.5);
    s.tap_latency_us_p99 = q(0.99);
    shared.reader_done.store(true, Ordering::Relaxed);
    shared.wake.notify_one();
    match failure {
        Some(e) => Err(e),
        None => Ok(s),
    }
}

/// One debug line per tap (`TAPGATE_LOG=validator=debug`): the device, the card (its UID
/// masked), the tap's sequence number when it was journalled, and the outcome.
fn count_pickup(shared: &Shared, p: &Pickup) {
    let outcome = match p {
        Pickup::Nothing | Pickup::Settling => return,
        Pickup::Applied { .. } => "applied",
        Pickup::AlreadyOnCard { .. } => "already_on_card",
        Pickup::NotApplied { .. } => "not_applied",
        Pickup::Torn { .. } => "torn",
    };
    shared.metrics.pickups.with_label_values(&[outcome]).inc();
}

/// An action-list pick-up that did something (nothing to pick up is not logged).
fn log_pickup(device: u32, p: &Pickup) {
    match p {
        Pickup::Nothing => {}
        Pickup::Applied {
            order_id,
            amount_minor,
            balance_minor,
            seq,
        } => tracing::info!(
            device,
            order_id,
            amount_minor,
            balance_minor,
            seq,
            "order picked up"
        ),
        other => tracing::info!(device, pickup = ?other, "order not picked up"),
    }
}

fn log_tap(device: u32, out: &TapOutcome) {
    let card = out
        .uid
        .map(|u| purse::tap::masked_uid(&u).to_string())
        .unwrap_or_default();
    match &out.answer {
        Answer::Accepted {
            fare_minor, seq, ..
        } => tracing::debug!(device, card, seq, fare_minor, outcome = "accepted", "tap"),
        Answer::Refused {
            reason,
            seq: Some(seq),
        } => tracing::debug!(
            device,
            card,
            seq,
            outcome = "refused",
            reason = reason.name(),
            "tap"
        ),
        Answer::Refused { reason, seq: None } => {
            tracing::debug!(
                device,
                card,
                outcome = "refused",
                reason = reason.name(),
                "tap"
            )
        }
        Answer::Torn => tracing::debug!(device, card, outcome = "torn", "tap"),
        Answer::Repeat => tracing::debug!(device, card, outcome = "repeat", "tap"),
    }
}

/// Counts one finished tap in the summary and the metrics; raises the alarm when a tap was
/// refused because the outbox is full.
fn count(shared: &Shared, s: &mut Summary, out: &TapOutcome) {
    let metrics = &shared.metrics;
    s.taps += 1;
    if !matches!(out.settled, Settled::None) {
        s.tears_settled += 1;
    }
    match &out.answer {
        Answer::Accepted { fare_minor, .. } => {
            s.taps_accepted += 1;
            s.fares_minor += i64::from(*fare_minor);
            metrics.taps.with_label_values(&["accepted", ""]).inc();
        }
        Answer::Refused { reason, seq } => {
            *s.taps_refused.entry(reason.name().to_string()).or_default() += 1;
            metrics
                .taps
                .with_label_values(&["refused", reason.name()])
                .inc();
            if seq.is_none() {
                metrics.outbox_full.set(1);
                tracing::error!(
                    capacity = shared.journal.capacity_taps(),
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
}
