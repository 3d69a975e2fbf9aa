//! `blocklist-size`, part two (issue 22): a validator applying a snapshot of N cards that
//! arrives in signed chunks, measured in a fresh child process that is fed the signed messages
//! on its standard input (each preceded by its length, 4 bytes big-endian), so that its peak
//! resident size (`VmHWM`, reset between phases through `/proc/self/clear_refs`) holds the
//! validator's work alone — never the producer's copy of the list.
//!
//! Children (`TAPGATE_BENCH_BLOCKLIST_CHILD`):
//! - `chunks`: the validator's own apply path (the steps of
//!   `validator::daemon::apply_blocklist_chunk`: each chunk verified, packed into the snapshot
//!   being received by `take_chunk`, and journalled in a durable journal by its
//!   `BlocklistWrite`) for two snapshots: `first` into an empty validator, then `update` — the
//!   same list with 500 cards removed and 500 added — onto the list in force, whose unchanged
//!   blocks the new snapshot shares. Per phase also `switch_peak_rss_kib` (the peak read
//!   between the last chunk's switch and its journal write) and the resident size after, split
//!   into anonymous (`rss_anon_kib`) and file-backed (`rss_file_kib`) pages.
//! - `array`: the limit of the same run: the same chunks verified and their UIDs kept in a
//!   sorted `Vec<[u8; 7]>` of exactly the cards (7 bytes a card, nothing else).
//! - `single`: the single-message path (format 1, at most `MAX_ENTRIES` cards): the message
//!   verified, decoded and applied whole, as before chunks.
//!
//! Per size: each child's `peak_rss_kib` (the whole process: `within_budget` compares the
//! chunked peaks with the 64 MiB budget) and `…_above_base_kib` (the peak less the child's
//! resident size before the list: what applying costs), with `first_ratio_to_array` and
//! `update_ratio_to_array` = chunked / sorted array, both above base.

use crate::stats::status_kib;
use crate::Figures;
use ed25519_dalek::{Signer, SigningKey};
use fare_rules::record::TapKind;
use purse::blocklist::chunked::{cut, SnapshotChunk, CHUNK_ENTRIES};
use purse::blocklist::{Blocklist, ListKind, ListUpdate, MAX_ENTRIES};
use purse::keys::KeySet;
use purse::rotation::SignedMessage;
use purse::sam::SoftwareSam;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::io::{Read, Write};
use std::time::Instant;
use validator::daemon::{apply_downlink_outcome, take_chunk, Downlink, DownlinkOutcome};
use validator::gate::{Gate, Placement};
use validator::journal::Journal;

/// The environment variable that makes this bench a child (its value: the child's kind).
pub const CHILD_ENV: &str = "TAPGATE_BENCH_BLOCKLIST_CHILD";
const BUDGET_KIB: u64 = 64 << 10;
/// Cards the update changes (half removed, half added).
const UPDATE_CHANGES: usize = 1_000;

fn signer() -> SigningKey {
    SigningKey::from_bytes(&[22; 32])
}

/// Resets the peak resident size (`VmHWM`) to the current one.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The length-prefixed signed chunks of the snapshot of `uids` (sorted) at `version`.
fn framed_chunks(key: &SigningKey, version: u64, uids: &[[u8; 7]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(uids.len() * 7 + 4096);
    for c in cut("metro", version, uids, CHUNK_ENTRIES) {
        let b = c.sign_with(|m| key.sign(m).to_bytes());
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(&b);
    }
    out
}

/// Runs the child `kind` with `input` on its standard input; its figures.
fn child(kind: &str, input: &[u8]) -> anyhow::Result<serde_json::Value> {
    let mut c = std::process::Command::new(std::env::current_exe()?)
        .args(["blocklist-size", "--json"])
        .env(CHILD_ENV, kind)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = c.stdin.take().expect("piped");
    let written = stdin.write_all(input);
    drop(stdin);
    let out = c.wait_with_output()?;
    anyhow::ensure!(
        out.status.success() && written.is_ok(),
        "blocklist-size child {kind} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    Ok(serde_json::from_str(
        text.lines().last().unwrap_or_default(),
    )?)
}

/// The snapshot-apply figures of `uids` (random, any order) in three children.
pub fn row(rng: &mut StdRng, mut uids: Vec<[u8; 7]>) -> anyhow::Result<serde_json::Value> {
    let key = signer();
    uids.sort_unstable();
    uids.dedup();
    let n = uids.len();
    let mut input = framed_chunks(&key, 1, &uids);
    // The update: 500 cards unblocked, 500 blocked.
    let mut next: Vec<[u8; 7]> = uids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % (2 * n / UPDATE_CHANGES).max(1) != 1)
        .map(|(_, u)| *u)
        .collect();
    next.extend((0..UPDATE_CHANGES / 2).map(|_| rng.gen::<[u8; 7]>()));
    next.sort_unstable();
    next.dedup();
    let first_len = input.len();
    input.extend(framed_chunks(&key, 2, &next));
    let chunks = child("chunks", &input)?;
    let array = child("array", &input[..first_len])?;
    let single = if n <= MAX_ENTRIES {
        let u = ListUpdate {
            kind: ListKind::Snapshot,
            operator: "metro".into(),
            from_version: 0,
            to_version: 1,
            entries: uids.iter().map(|u| (*u, true)).collect(),
        };
        let b = u.sign_with(|m| key.sign(m).to_bytes());
        drop(u);
        let mut framed = (b.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&b);
        child("single", &framed)?
    } else {
        json!(null)
    };
    // Peaks above the process's own resident size before the list (the same binary in each
    // child): what applying the list costs.
    let above = |v: &serde_json::Value, base: &serde_json::Value| {
        let (p, b) = (v["peak_rss_kib"].as_u64(), base.as_u64());
        p.unwrap_or(0).saturating_sub(b.unwrap_or(0))
    };
    let first_peak = chunks["first"]["peak_rss_kib"].as_u64().unwrap_or(0);
    let update_peak = chunks["update"]["peak_rss_kib"].as_u64().unwrap_or(0);
    let first_above = above(&chunks["first"], &chunks["base_rss_kib"]);
    let update_above = above(&chunks["update"], &chunks["base_rss_kib"]);
    let array_above = above(&array, &array["base_rss_kib"]);
    let r = |a: u64, b: u64| (a as f64 / b.max(1) as f64 * 100.0).round() / 100.0;
    Ok(json!({
        "cards": n,
        "chunks": n.div_ceil(CHUNK_ENTRIES).max(1),
        "base_rss_kib": chunks["base_rss_kib"],
        "first": chunks["first"],
        "update": chunks["update"],
        "array": array,
        "single": single,
        "first_peak_above_base_kib": first_above,
        "update_peak_above_base_kib": update_above,
        "array_peak_above_base_kib": array_above,
        "first_ratio_to_array": r(first_above, array_above),
        "update_ratio_to_array": r(update_above, array_above),
        "budget_kib": BUDGET_KIB,
        "within_budget": first_peak.max(update_peak) <= BUDGET_KIB,
    }))
}

/// The next length-prefixed message on standard input, into `buf` (`false` at the end).
fn next_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> anyhow::Result<bool> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    r.read_exact(buf)?;
    Ok(true)
}

/// The child of kind `kind` (see the module's header).
pub fn run_child(kind: &str) -> anyhow::Result<Figures> {
    let pk = signer().verifying_key().to_bytes();
    let mut input = std::io::BufReader::with_capacity(1 << 16, std::io::stdin().lock());
    let mut buf = Vec::new();
    if kind == "array" {
        let base = status_kib("VmRSS:");
        reset_peak();
        let t = Instant::now();
        let mut uids: Vec<[u8; 7]> = Vec::new();
        while next_frame(&mut input, &mut buf)? {
            let c = SnapshotChunk::verify(&buf, &pk)?;
            uids.reserve_exact((c.total as usize).saturating_sub(uids.len()));
            uids.extend(c.keys.iter().map(|k| purse::blocklist::compact::uid(*k)));
        }
        anyhow::ensure!(uids.windows(2).all(|w| w[0] < w[1]));
        return Ok(vec![
            ("base_rss_kib", base.into()),
            ("peak_rss_kib", status_kib("VmHWM:").into()),
            ("apply_ms", (t.elapsed().as_secs_f64() * 1e3).round().into()),
            ("bytes", (uids.capacity() * 7).into()),
        ]);
    }
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(22));
    let dir = tempfile::tempdir()?;
    let journal = Journal::open(dir.path(), 10, 1 << 30)?;
    let mut gate = Gate {
        sam: SoftwareSam::validator(&keys, 7)?,
        engine: None,
        blocklist: Blocklist::new("metro"),
        placement: Placement {
            device_id: 7,
            operator: "metro".into(),
            stop: "Central".into(),
            route: "M1".into(),
            kind: TapKind::In,
            utc_offset_s: 0,
            sale: None,
        },
        rng: StdRng::seed_from_u64(1),
    };
    let base = status_kib("VmRSS:");
    let mut phases = Vec::new();
    reset_peak();
    let mut t = Instant::now();
    let keys = purse::rotation::TrustedKeys::single(pk);
    while next_frame(&mut input, &mut buf)? {
        let (out, switch_peak) = if purse::blocklist::chunked::is_chunk(&buf) {
            apply_chunk_steps(&mut gate, &journal, &keys, &buf)?
        } else {
            // The single message (the `single` child), as the validator applies it.
            let out = apply_downlink_outcome(&mut gate, &journal, &pk, Downlink::Blocklist, &buf)
                .map_err(anyhow::Error::msg)?;
            (out, status_kib("VmHWM:"))
        };
        if let DownlinkOutcome::Applied(v) = out {
            phases.push(json!({
                "version": v,
                "apply_ms": (t.elapsed().as_secs_f64() * 1e3).round(),
                "peak_rss_kib": status_kib("VmHWM:"),
                "switch_peak_rss_kib": switch_peak,
                "rss_kib": status_kib("VmRSS:"),
                "rss_anon_kib": status_kib("RssAnon:"),
                "rss_file_kib": status_kib("RssFile:"),
                "list_bytes": gate.blocklist.heap_bytes(),
                "cards": gate.blocklist.len(),
            }));
            reset_peak();
            t = Instant::now();
        }
    }
    let mut phases = phases.into_iter();
    let (first, update) = (phases.next(), phases.next());
    Ok(vec![
        ("base_rss_kib", base.into()),
        ("first", first.unwrap_or_default()),
        ("update", update.unwrap_or_default()),
    ])
}

/// A chunk through the daemon's steps (`validator::daemon::apply_blocklist_chunk`): verified,
/// taken by the gate, journalled; with the peak read between the switch and the journal write.
fn apply_chunk_steps(
    gate: &mut Gate,
    journal: &Journal,
    keys: &purse::rotation::TrustedKeys,
    buf: &[u8],
) -> anyhow::Result<(DownlinkOutcome, u64)> {
    let (c, _) = SnapshotChunk::verify_trusted(buf, keys).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (out, write) = take_chunk(gate, &c).map_err(anyhow::Error::msg)?;
    drop(c);
    let switch_peak = status_kib("VmHWM:");
    if let Some(w) = write {
        w.write(journal, buf).map_err(anyhow::Error::msg)?;
    }
    Ok((out, switch_peak))
}
