//! Bench scenario `validator`: taps through the gate, card and SAM emulated in process, the
//! LMDB journal committed with fsync on every tap (twice: the pending debit, then the tap).
//!
//! Each of `n` cards is presented once at a metro entry gate of the synthetic city
//! (`fare_rules::synth::CitySize::CITY`) with a blocklist of 1,000,000 cards loaded
//! (`--blocklist-cards N`: N cards; the scale table of docs/benchmarks.md). Figures:
//! `taps`, `p50_us`/`p99_us` (card in the field to answer, journal included), `taps_per_s`
//! (one reader), `cpu_us_per_tap` (process CPU time per tap, user + system: the work without
//! the disk waits, the emulated card's side and the two fsync system calls included),
//! `user_cpu_us_per_tap` (the same in user space: our code, card and SAM),
//! `card_side_us_per_tap` (time inside the emulated card: a real card spends it in its chip),
//! and
//! `rss_mib` (resident size with the blocklist and the table loaded), `blocklist_heap_bytes`
//! (what the list's structure holds, from its allocations).
//!
//! The limit, measured in the same run right before the taps: `raw_commit_p99_us`, the p99 of
//! the same two durable LMDB commits per tap alone on the same disk
//! ([`crate::limits::RawJournal`]), run in alternation with the taps (100 raw, 100 taps, …) so
//! both meet the same disk and the same load from other processes, and `p99_ratio` = tap p99 / raw p99 (also
//! `raw_commit_p50_us` and `p50_ratio`).
//!
//! Every tenth card has an order on the action list (docs/action-list.md): its tap first picks
//! the value up (a second card session under the card's credit key, its own journal commits),
//! then pays the fare. Those taps are reported apart: `pickup_taps`, `pickup_p50_us`,
//! `pickup_p99_us` (card in the field to answer, both transactions); `p50_us`/`p99_us` are the
//! other taps'.

use crate::stats::{cpu_user_sys_s, quantile, status_kib};
use crate::Figures;
use ed25519_dalek::{Signer, SigningKey};
use fare_rules::record::TapKind;
use fare_rules::synth::{city_source, metro_stop, CitySize};
use purse::actionlist::{ActionList, ActionUpdate, Entry, Order};
use purse::blocklist::{Blocklist, ListKind, ListUpdate};
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::rotation::SignedMessage;
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use purse::txn::EmulatedReader;
use purse::txn::{Transport, TransportError};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::Instant;
use validator::gate::{Answer, Gate, Pickup, Placement};
use validator::journal::Journal;

/// The emulated card's side, timed: what a real card does in its own chip.
struct Timed<'a, T: Transport> {
    inner: T,
    card_ns: &'a mut u64,
}

impl<T: Transport> Transport for Timed<'_, T> {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        self.inner.card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        let t = Instant::now();
        let r = self.inner.transmit(command);
        *self.card_ns += t.elapsed().as_nanos() as u64;
        r
    }
}

pub fn run(n: Option<u64>, blocklist_cards: Option<u64>) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(10_000);
    let list_cards = blocklist_cards.unwrap_or(1_000_000);
    let mut rng = StdRng::seed_from_u64(3);
    let keys = KeySet::generate(&mut rng);
    let hsm = SoftwareHsm::new(&keys)?;
    let signer = SigningKey::from_bytes(&[11; 32]);
    let engine = city_engine(&signer)?;
    let rss_before_kib = status_kib("VmRSS:");
    let blocklist = blocked(&signer, list_cards)?;
    let dir = tempfile::tempdir()?;
    let journal = Journal::open(dir.path(), 2 * n + 10, 1 << 30)?;
    let mut gate = Gate {
        sam: SoftwareSam::validator(&keys, 1001)?,
        engine: Some(engine),
        blocklist,
        placement: Placement {
            device_id: 1001,
            operator: "metro".into(),
            stop: metro_stop(3, 4),
            route: "M3".into(),
            kind: TapKind::In,
            utc_offset_s: 9 * 3600,
            sale: None,
        },
        rng: StdRng::seed_from_u64(4),
    };
    let rss_kib = status_kib("VmRSS:");
    let list = (list_cards, gate.blocklist.heap_bytes());
    let mut cards = Vec::with_capacity(n as usize);
    for i in 0..n {
        let b = (i as u32).to_be_bytes();
        let uid = [0x04, 0xBE, 0x0C, b[0], b[1], b[2], b[3]];
        cards.push(Card::personalise(
            &Personalisation::transit(uid, 100_000),
            hsm.card_keys(&uid, 1)?,
        ));
    }
    let actions = orders(&hsm, &signer, &cards)?;
    gate.sam.apply_action_grant(&hsm.action_grant(
        1001,
        1,
        i64::from(ORDER_MINOR) * n as i64,
    )?)?;
    let d = drive(&mut gate, &journal, &actions, &mut cards)?;
    anyhow::ensure!(
        d.accepted == n,
        "every tap should be accepted ({} of {n})",
        d.accepted
    );
    anyhow::ensure!(
        d.pickup_lat.len() == actions.len(),
        "every order should be picked up ({} of {})",
        d.pickup_lat.len(),
        actions.len()
    );
    Ok(report(n, &d, rss_kib, rss_before_kib, list))
}

/// The synthetic city's fare table, compiled, signed by `signer` and verified as a
/// validator loads it.
fn city_engine(signer: &SigningKey) -> anyhow::Result<fare_rules::engine::Engine> {
    let table = fare_rules::source::compile("city.toml", &city_source(CitySize::CITY))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let signed_table = fare_rules::signed::encode(&table, |m| signer.sign(m).to_bytes())?;
    Ok(fare_rules::signed::verify(
        &signed_table,
        &signer.verifying_key().to_bytes(),
    )?)
}

/// The value of each order on the action list.
const ORDER_MINOR: i32 = 5_000;

/// An order for every tenth card, on a signed action list as a validator holds it.
fn orders(hsm: &SoftwareHsm, signer: &SigningKey, cards: &[Card]) -> anyhow::Result<ActionList> {
    let mut entries = Vec::new();
    for (i, c) in cards.iter().enumerate().filter(|(i, _)| i % 10 == 0) {
        let uid = c.state().uid;
        entries.push(Entry::Add(Order {
            order_id: i as u64 + 1,
            uid,
            amount_minor: ORDER_MINOR,
            expires_s: u64::MAX,
            key_version: 1,
            wrapped_key: hsm.wrap_order_key(&uid, 1)?,
        }));
    }
    let signed = ActionUpdate {
        kind: ListKind::Snapshot,
        operator: "metro".into(),
        from_version: 0,
        to_version: 1,
        entries,
    }
    .sign_with(|m| signer.sign(m).to_bytes());
    let mut list = ActionList::new("metro");
    list.apply(&signed, &signer.verifying_key().to_bytes())?;
    Ok(list)
}

/// A blocklist of `cards` random NXP-style UIDs (`04` then six random bytes, never the
/// tapped cards' `04 BE …`), signed by `signer`. Up to `MAX_ENTRIES` it comes as one signed
/// snapshot, verified and applied; a larger one (which no single message may carry) in signed
/// chunks of `CHUNK_ENTRIES`, each verified and applied (issue 22).
fn blocked(signer: &SigningKey, cards: u64) -> anyhow::Result<Blocklist> {
    let mut rng = StdRng::seed_from_u64(22);
    let entries: Vec<([u8; 7], bool)> = (0..cards)
        .map(|_| {
            let mut u = [0x04u8; 7];
            rand::RngCore::fill_bytes(&mut rng, &mut u[1..]);
            if u[1] == 0xBE {
                u[1] = 0xB1;
            }
            (u, true)
        })
        .collect();
    let snapshot = ListUpdate {
        kind: ListKind::Snapshot,
        operator: "metro".into(),
        from_version: 0,
        to_version: 1,
        entries,
    };
    let mut blocklist = Blocklist::new("metro");
    let pk = signer.verifying_key().to_bytes();
    if snapshot.entries.len() <= purse::blocklist::MAX_ENTRIES {
        let signed = snapshot.sign_with(|m| signer.sign(m).to_bytes());
        blocklist.apply(&signed, &pk)?;
    } else {
        let mut uids: Vec<[u8; 7]> = snapshot.entries.iter().map(|e| e.0).collect();
        drop(snapshot);
        uids.sort_unstable();
        uids.dedup();
        let per = purse::blocklist::chunked::CHUNK_ENTRIES;
        for c in purse::blocklist::chunked::cut("metro", 1, &uids, per) {
            let signed = c.sign_with(|m| signer.sign(m).to_bytes());
            let verified = purse::blocklist::chunked::SnapshotChunk::verify(&signed, &pk)?;
            blocklist.apply_chunk(&verified)?;
        }
    }
    Ok(blocklist)
}

/// What the taps and the raw commits beside them measured.
struct Driven {
    /// Each tap's latency (without a pick-up) and each raw commit pair's, sorted (µs).
    lat: Vec<u64>,
    /// The latency of each tap that picked an order up, sorted (µs).
    pickup_lat: Vec<u64>,
    raw: Vec<u64>,
    /// The taps' wall time and CPU (user, system), the raw commits' taken out (s).
    wall: f64,
    user: f64,
    sys: f64,
    /// Time inside the emulated cards (ns).
    card_ns: u64,
    accepted: u64,
}

/// Each card presented once at the gate, in alternation with the limit: the journal's two
/// durable commits per tap alone, on the same disk (100 raw, 100 taps, …).
fn drive(
    gate: &mut Gate,
    journal: &Journal,
    actions: &ActionList,
    cards: &mut [Card],
) -> anyhow::Result<Driven> {
    let n = cards.len() as u64;
    let mut raw_journal = crate::limits::RawJournal::open()?;
    let mut raw = Vec::with_capacity(n as usize);
    // The raw commits' wall and CPU time, taken out of the taps' figures.
    let (mut raw_s, mut raw_user, mut raw_sys) = (0.0f64, 0.0f64, 0.0f64);
    let mut lat = Vec::with_capacity(n as usize);
    let mut pickup_lat = Vec::new();
    let mut card_rng = StdRng::seed_from_u64(5);
    let cpu0 = cpu_user_sys_s();
    let t0 = Instant::now();
    let now_ms = 1_796_079_600_000; // 2026-12-01 08:00 at UTC+9
    let mut accepted = 0u64;
    let mut card_ns = 0u64;
    for (i, card) in cards.iter_mut().enumerate() {
        let i = i as u64;
        if i.is_multiple_of(100) {
            let (t, c) = (Instant::now(), cpu_user_sys_s());
            for _ in 0..100.min(n - i) {
                raw.push(raw_journal.tap()?);
            }
            let c1 = cpu_user_sys_s();
            raw_s += t.elapsed().as_secs_f64();
            raw_user += c1.0 - c.0;
            raw_sys += c1.1 - c.1;
        }
        let t = Instant::now();
        let mut reader = Timed {
            inner: EmulatedReader {
                card,
                rng: &mut card_rng,
            },
            card_ns: &mut card_ns,
        };
        let (pickup, out) = gate
            .tap_with_actions(&mut reader, journal, actions, now_ms + i, &mut |_| {})
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let us = t.elapsed().as_micros() as u64;
        match pickup {
            Pickup::Applied { .. } => pickup_lat.push(us),
            _ => lat.push(us),
        }
        if matches!(out.answer, Answer::Accepted { .. }) {
            accepted += 1;
        }
    }
    let wall = t0.elapsed().as_secs_f64() - raw_s;
    let cpu1 = cpu_user_sys_s();
    lat.sort_unstable();
    pickup_lat.sort_unstable();
    raw.sort_unstable();
    Ok(Driven {
        lat,
        pickup_lat,
        raw,
        wall,
        user: cpu1.0 - cpu0.0 - raw_user,
        sys: cpu1.1 - cpu0.1 - raw_sys,
        card_ns,
        accepted,
    })
}

/// The figures, in print order (names are a contract: docs/benchmarks.md).
fn report(n: u64, d: &Driven, rss_kib: u64, rss_before_kib: u64, list: (u64, usize)) -> Figures {
    let (lat, raw) = (&d.lat, &d.raw);
    let ratio = |q: f64| crate::limits::ratio(quantile(lat, q) as f64, quantile(raw, q) as f64);
    vec![
        ("taps", n.into()),
        ("p50_us", quantile(lat, 0.5).into()),
        ("p99_us", quantile(lat, 0.99).into()),
        ("raw_commit_p50_us", quantile(raw, 0.5).into()),
        ("raw_commit_p99_us", quantile(raw, 0.99).into()),
        ("p50_ratio", ratio(0.5)),
        ("p99_ratio", ratio(0.99)),
        ("taps_per_s", ((n as f64 / d.wall).round() as u64).into()),
        (
            "cpu_us_per_tap",
            (((d.user + d.sys) * 1e6 / n as f64).round() as u64).into(),
        ),
        (
            "user_cpu_us_per_tap",
            ((d.user * 1e6 / n as f64).round() as u64).into(),
        ),
        (
            "card_side_us_per_tap",
            ((d.card_ns as f64 / 1e3 / n as f64).round() as u64).into(),
        ),
        ("pickup_taps", (d.pickup_lat.len() as u64).into()),
        ("pickup_p50_us", quantile(&d.pickup_lat, 0.5).into()),
        ("pickup_p99_us", quantile(&d.pickup_lat, 0.99).into()),
        ("rss_mib", (rss_kib / 1024).into()),
        (
            "blocklist_mib",
            (rss_kib.saturating_sub(rss_before_kib) / 1024).into(),
        ),
        ("blocklist_entries", list.0.into()),
        ("blocklist_heap_bytes", list.1.into()),
    ]
}
