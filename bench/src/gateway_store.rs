//! Bench scenario `gateway-store`: the gateway store's ingest rate with N taps already stored
//! (issue 22, "how cost grows").
//!
//! One store (`gateway::store::Store`, its public API only) is filled up to each size of
//! `--stored` in turn (`0,1000000,10000000,…`), and at each size live batches are measured.
//!
//! - The workload: `DEVICES` validators, `CARDS` cards (random NXP-style UIDs), `TAPS_PER_DAY`
//!   taps a day in time order, each tap on a random device (its next sequence number) by a random
//!   card, so the keys that grow grow as in a city: per-device sequences, running aggregates
//!   (`card-day:` one per card and day, `hour:` one per hour), the outbox. (The store keys taps
//!   by arrival since issue 22's fix; before, by device ‖ sequence.)
//!   Records are real v3 accepted-debit records MAC'd under the device's key (KM_DEVICE derived
//!   as the gateway derives it); their transaction MAC is not a card's (the gateway does not
//!   check it, clearing would).
//! - The pre-fill goes through `Store::ingest_with_rings` in batches of `PREFILL_BATCH` taps
//!   (messages of up to 100 records of one device), each followed by `Store::forwarded_at` of
//!   the whole outbox at the taps' clock, as if clearing had answered at once: the stored layout
//!   is what the gateway writes, and what it trims (forwarded taps past their retention window)
//!   is trimmed (and the `card-day:` aggregates past their retention, 7 days after their day).
//!   `ingested` is the taps ingested so far, `stored` those the store still holds.
//! - At each size: `ROUNDS` rounds, each one raw batch then one live batch of `--batch` messages
//!   of one tap (the daemon's `ingest_batch_max_messages` is 4,096; at live rates a batch is
//!   what arrived during the previous fsync, a few hundred): the live batch is
//!   `Store::ingest_with_rings` with the device key rings derived per device and batch as the
//!   daemon does, then `Store::forwarded_at` of it (timed apart: `forwarded_us`). The raw batch,
//!   the limit of the same run, is the same puts into an empty LMDB environment opened through
//!   `tapgate-lmdb` with fsync, one commit: per tap its record under (device ‖ sequence) and the
//!   outbox entry, per distinct device a 120-byte state, per distinct aggregate key a 48-byte
//!   value (the store's puts before issue 22's fix, kept so that runs before and after it have
//!   the same limit; into an empty environment either layout is a few pages).
//! - The store adds taps to its aggregates as appended deltas folded in `forwarded_at` (all of
//!   them since 722c224; before, only the `card-day:` ones, the others updated in place in the
//!   live batch): `forwarded_ms` includes the fold of each round's batch.
//! - Then, at the largest size, a backlog trim ([`backlog_trims`]): the oldest 50,000 forwarded
//!   taps expired at once and trimmed in transactions of 10,000 (the store before) and of
//!   `TRIM_CHUNK` (1,000) while live batches go on: how long a live batch waits for the lock.

use crate::Figures;
use gateway::store::{Message, Store};
use purse::keys::{KeySet, Role};
use purse::tap::TAP_LEN;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

const DEVICES: u32 = 2_000;
const CARDS: u64 = 2_000_000;
const TAPS_PER_DAY: u64 = 2_000_000;
const PREFILL_BATCH: u64 = 200_000;
const ROUNDS: usize = 30;
const OPERATOR: &str = "bench";
const T0_MS: u64 = 1_790_000_000_000;

/// The scenario: `stored` sizes in increasing order, live batches of `batch` messages.
pub fn run(stored: &[u64], batch: usize) -> anyhow::Result<Figures> {
    let mut sizes = stored.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    let batch = batch.clamp(1, 4_096);
    let dir = tempfile::tempdir_in(std::env::var("TAPGATE_BENCH_DIR").unwrap_or("/tmp".into()))?;
    let max = sizes.last().copied().unwrap_or(0);
    // Map: room for the largest size at ≈ 400 bytes a tap, at least 4 GiB, in whole MiB (LMDB
    // takes a multiple of the page size only: 30,000,000 taps × 400 is not one).
    let map = (max.saturating_mul(400) as usize)
        .max(4 << 30)
        .next_multiple_of(1 << 20);
    let store = Store::open(&dir.path().join("gw"), map)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let keys = KeySet::generate(&mut rng).for_role(Role::Gateway, 0)?;
    let mut gen = Gen::new(&keys)?;
    let mut rows = Vec::new();
    let mut prefill_s = 0.0;
    for &size in &sizes {
        let t = Instant::now();
        gen = prefill(&store, &keys, gen, size)?;
        prefill_s += t.elapsed().as_secs_f64();
        let row = measure(&store, &keys, &mut gen, batch, dir.path())?;
        eprintln!("{size}: {row}");
        rows.push(row);
    }
    let backlog = backlog_trims(&store, &keys, &mut gen, batch)?;
    eprintln!("backlog trims: {backlog}");
    Ok(vec![
        ("devices", DEVICES.into()),
        ("cards", CARDS.into()),
        ("taps_per_day", TAPS_PER_DAY.into()),
        ("batch_messages", (batch as u64).into()),
        ("rounds", (ROUNDS as u64).into()),
        ("prefill_s", (prefill_s.round() as u64).into()),
        (
            "forwarded_retention_ms",
            store.limits().forwarded_retention_ms.into(),
        ),
        (
            "card_day_retention_days",
            store.limits().card_day_retention_days.into(),
        ),
        ("sizes", rows.into()),
        ("backlog_trim", backlog),
    ])
}

/// The tap generator: time order, random device and card; device keys derived once.
struct Gen {
    next: u64,
    seqs: Vec<u64>,
    keys: Vec<purse::crypto::AesKey>,
    rng: rand::rngs::StdRng,
}

impl Gen {
    fn new(keys: &KeySet) -> anyhow::Result<Gen> {
        let dev_keys = (0..DEVICES)
            .map(|d| keys.device_key(device_id(d)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut g = Gen {
            next: 0,
            seqs: vec![0; DEVICES as usize],
            keys: dev_keys,
            rng: rand::rngs::StdRng::seed_from_u64(7),
        };
        // The hand-made record must be one the gateway takes.
        let (d, rec) = g.tap();
        let key = keys.device_key(d)?;
        purse::tap::TapRecord::decode_verified(&rec, OPERATOR, |_| Some(key))
            .map_err(|e| anyhow::anyhow!("the bench's tap record does not verify: {e}"))?;
        g.next = 0;
        g.seqs = vec![0; DEVICES as usize];
        g.rng = rand::rngs::StdRng::seed_from_u64(7);
        Ok(g)
    }

    /// The next tap: its device and its signed record.
    fn tap(&mut self) -> (u32, [u8; TAP_LEN]) {
        let i = self.next;
        self.next += 1;
        let d = self.rng.gen_range(0..DEVICES);
        self.seqs[d as usize] += 1;
        let seq = self.seqs[d as usize];
        let card = self.rng.gen_range(0..CARDS);
        let time = T0_MS + i * 86_400_000 / TAPS_PER_DAY;
        let dev = device_id(d);
        let mut b = [0u8; TAP_LEN];
        b[0] = purse::tap::TAP_VERSION;
        b[1] = 0; // accepted
        b[2] = 1; // debit
        b[3] = 1; // card key version
        b[4..11].copy_from_slice(&uid(card));
        b[11..15].copy_from_slice(&((i % 60_000) as u32 + 1).to_be_bytes());
        b[15..19].copy_from_slice(&125i32.to_be_bytes());
        b[19..23].copy_from_slice(&10_000i32.to_be_bytes());
        b[23..31].copy_from_slice(&splitmix(i).to_be_bytes());
        b[31..35].copy_from_slice(&dev.to_be_bytes());
        b[35..43].copy_from_slice(&seq.to_be_bytes());
        b[43..51].copy_from_slice(&time.to_be_bytes());
        b[51..55].copy_from_slice(&(d % 600).to_be_bytes());
        b[55..59].copy_from_slice(&(d % 80).to_be_bytes());
        b[59..63].copy_from_slice(&1u32.to_be_bytes());
        b[63..71].copy_from_slice(&1u64.to_be_bytes());
        let body = TAP_LEN - 8;
        let mac = purse::crypto::mac8(
            &self.keys[d as usize],
            &purse::tap::mac_input(&b[..body], OPERATOR),
        );
        b[body..].copy_from_slice(&mac);
        (dev, b)
    }

    /// The gateway clock for the taps generated so far (a little after the last one).
    fn now_ms(&self) -> u64 {
        T0_MS + self.next * 86_400_000 / TAPS_PER_DAY + 1_000
    }
}

fn device_id(d: u32) -> u32 {
    10_000 + d
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Card `c`'s UID: `04` and six pseudo-random bytes.
fn uid(c: u64) -> [u8; 7] {
    let r = splitmix(c ^ 0xC0FF_EE00).to_be_bytes();
    [4, r[0], r[1], r[2], r[3], r[4], r[5]]
}

fn topic(dev: u32) -> String {
    format!("tapgate/v1/{OPERATOR}/taps/{dev}")
}

/// Generates taps up to `upto` on another thread, in batches of [`PREFILL_BATCH`] grouped by
/// device into messages of up to 100 records, ingested and forwarded at once.
fn prefill(store: &Store, keys: &KeySet, gen: Gen, upto: u64) -> anyhow::Result<Gen> {
    if gen.next >= upto {
        return Ok(gen);
    }
    let (tx, rx) = mpsc::sync_channel::<(Vec<Message>, u64)>(2);
    let producer = std::thread::spawn(move || {
        let mut gen = gen;
        while gen.next < upto {
            let n = PREFILL_BATCH.min(upto - gen.next);
            let mut by_dev: BTreeMap<u32, Vec<Vec<u8>>> = BTreeMap::new();
            for _ in 0..n {
                let (d, rec) = gen.tap();
                let v = by_dev.entry(d).or_default();
                if v.last().is_none_or(|m| m.len() >= 100 * TAP_LEN) {
                    v.push(Vec::with_capacity(100 * TAP_LEN));
                }
                v.last_mut().expect("pushed").extend_from_slice(&rec);
            }
            let msgs = by_dev
                .into_iter()
                .flat_map(|(d, ps)| {
                    ps.into_iter().map(move |payload| Message {
                        topic: topic(d),
                        payload,
                    })
                })
                .collect();
            if tx.send((msgs, gen.now_ms())).is_err() {
                break;
            }
        }
        gen
    });
    for (msgs, now) in rx {
        let out =
            store.ingest_with_rings(&msgs, |d| keys.device_key_ring(d).unwrap_or_default(), now)?;
        anyhow::ensure!(out.quarantined == 0, "pre-fill taps refused: {out:?}");
        forward_all(store, now)?;
        // A pre-fill batch expires more taps than one call trims (TRIM_MAX_PER_CALL; the
        // gateway's 60 s timer takes the rest): trim them all, so the store holds the window.
        while store.trim_expired_at(now)? >= gateway::store::TRIM_MAX_PER_CALL as u64 {}
        // Likewise the card-days past their retention (a day's ≈ 1.26 M expire at midnight; a
        // gateway trims them after every forwarded batch, far more often than the pre-fill).
        while store.trim_expired_card_days_at(now)? >= gateway::store::TRIM_MAX_PER_CALL as u64 {}
    }
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("tap generator panicked"))
}

/// Marks the whole outbox forwarded (clearing answered) at `now_ms`, the taps' clock: the
/// store trims what is past its retention window.
fn forward_all(store: &Store, now_ms: u64) -> anyhow::Result<()> {
    if let Some((last, _)) = store.pending_forward(usize::MAX)?.last() {
        store.forwarded_at(*last, now_ms)?;
    }
    Ok(())
}

/// The raw limit's environment: the same tables' puts alone.
struct Raw {
    env: tapgate_lmdb::LmdbEnv,
    dbs: [tapgate_lmdb::RawDatabase; 4],
    _dir: tempfile::TempDir,
}

impl Raw {
    fn open(beside: &Path) -> anyhow::Result<Raw> {
        let dir = tempfile::tempdir_in(beside)?;
        let (env, dbs) = tapgate_lmdb::open(
            dir.path(),
            ["taps", "outbox", "devices", "aggregates"],
            &tapgate_lmdb::EnvConfig::durable(1 << 30),
        )?;
        Ok(Raw {
            env,
            dbs,
            _dir: dir,
        })
    }

    /// The batch's puts in one fsynced commit on emptied tables; the seconds they took.
    fn batch(&self, taps: &[(u32, [u8; TAP_LEN])]) -> anyhow::Result<f64> {
        let mut w = self.env.write_txn()?;
        for db in &self.dbs {
            db.clear(&mut w)?;
        }
        w.commit()?;
        let t = Instant::now();
        let mut w = self.env.write_txn()?;
        let [tdb, odb, ddb, adb] = &self.dbs;
        let mut devices = std::collections::BTreeSet::new();
        let mut aggs = std::collections::BTreeSet::new();
        for (i, (d, rec)) in taps.iter().enumerate() {
            let seq = u64::from_be_bytes(rec[35..43].try_into().expect("8"));
            let key = tapgate_lmdb::key::u32_u64(*d, seq);
            tdb.put(&mut w, &key, rec)?;
            odb.put(&mut w, &(i as u64 + 1).to_be_bytes(), &key)?;
            devices.insert(*d);
            for k in aggregate_keys(rec) {
                aggs.insert(k);
            }
        }
        for d in devices {
            ddb.put(&mut w, &d.to_be_bytes(), &[0x5A; 120])?;
        }
        for k in aggs {
            adb.put(&mut w, k.as_bytes(), &[0x5A; 48])?;
        }
        w.commit()?;
        Ok(t.elapsed().as_secs_f64())
    }
}

/// The six aggregate keys a tap updates (as the store names them).
fn aggregate_keys(rec: &[u8; TAP_LEN]) -> [String; 6] {
    let u = |r: std::ops::Range<usize>| u32::from_be_bytes(rec[r].try_into().expect("4"));
    let time = u64::from_be_bytes(rec[43..51].try_into().expect("8"));
    [
        format!("device:{}", u(31..35)),
        format!("stop:{}", u(51..55)),
        format!("route:{}", u(55..59)),
        format!(
            "card-day:{}:{}",
            hex::encode_upper(&rec[4..11]),
            time / 86_400_000
        ),
        "product:stored_value".to_string(),
        format!("hour:{}", gateway::store::hour_of(time)),
    ]
}

/// Bytes of the store's data file.
fn file_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("gw").join("data.mdb"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Taps trimmed by one backlog trim ([`gateway::store::TRIM_MAX_PER_CALL`]).
const BACKLOG: usize = gateway::store::TRIM_MAX_PER_CALL;

/// A backlog of expired forwarded taps trimmed while live batches keep coming (an idle gateway's
/// timer, or clearing back after a day): at the largest size, for transactions of 10,000 taps
/// (the store before) and of [`gateway::store::TRIM_CHUNK`] (now), one
/// `Store::trim_expired_at` of the oldest [`BACKLOG`] forwarded taps on another thread (its
/// clock 8 days past the taps') while this thread ingests live batches of `batch` messages
/// until it ends: the trim's rate, and the live batches' median and longest time (the longest
/// is the wait for LMDB's write lock a trim transaction holds).
fn backlog_trims(
    store: &Store,
    keys: &KeySet,
    gen: &mut Gen,
    batch: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut out = Vec::new();
    for chunk in [10_000, gateway::store::TRIM_CHUNK] {
        if store.forwarded_kept()? < BACKLOG as u64 {
            break;
        }
        let trimmer = store.clone().with_trim_chunk(chunk);
        let future = gen.now_ms() + 8 * 86_400_000;
        let t = Instant::now();
        let trim = std::thread::spawn(move || trimmer.trim_expired_at(future));
        let mut live_s = Vec::new();
        while !trim.is_finished() {
            let msgs: Vec<Message> = (0..batch)
                .map(|_| {
                    let (d, rec) = gen.tap();
                    Message {
                        topic: topic(d),
                        payload: rec.to_vec(),
                    }
                })
                .collect();
            let b = Instant::now();
            store.ingest_with_rings(
                &msgs,
                |d| keys.device_key_ring(d).unwrap_or_default(),
                gen.now_ms(),
            )?;
            live_s.push(b.elapsed().as_secs_f64());
        }
        let trimmed = trim
            .join()
            .map_err(|_| anyhow::anyhow!("trim thread panicked"))??;
        let trim_s = t.elapsed().as_secs_f64();
        live_s.sort_by(f64::total_cmp);
        let ms = |x: f64| (x * 1e4).round() / 10.0;
        out.push(serde_json::json!({
            "trim_chunk": chunk,
            "trimmed": trimmed,
            "trim_s": (trim_s * 100.0).round() / 100.0,
            "trimmed_per_s": (trimmed as f64 / trim_s) as u64,
            "live_batches": live_s.len(),
            "live_batch_ms_median": live_s.get(live_s.len() / 2).copied().map_or(0.0, ms),
            "live_batch_ms_max": live_s.last().copied().map_or(0.0, ms),
        }));
    }
    Ok(out.into())
}

/// `ROUNDS` rounds of one raw batch and one live batch at the store's present size.
fn measure(
    store: &Store,
    keys: &KeySet,
    gen: &mut Gen,
    batch: usize,
    dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let ingested = gen.next;
    let stored = store.forwarded_kept()? + store.outbox_len()?;
    let (used, _) = store.usage()?;
    let file = file_bytes(dir);
    let (tables, file_pages) = store.table_stats()?;
    let table_pages: u64 = tables.iter().map(|t| t.branch_pages + t.leaf_pages).sum();
    let raw = Raw::open(dir)?;
    let (mut live_s, mut raw_s, mut fwd_s) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let taps: Vec<(u32, [u8; TAP_LEN])> = (0..batch).map(|_| gen.tap()).collect();
        raw_s.push(raw.batch(&taps)?);
        let msgs: Vec<Message> = taps
            .iter()
            .map(|(d, rec)| Message {
                topic: topic(*d),
                payload: rec.to_vec(),
            })
            .collect();
        let t = Instant::now();
        let out = store.ingest_with_rings(
            &msgs,
            |d| keys.device_key_ring(d).unwrap_or_default(),
            gen.now_ms(),
        )?;
        live_s.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(out.stored == batch as u64, "live batch not stored: {out:?}");
        let t = Instant::now();
        forward_all(store, gen.now_ms())?;
        fwd_s.push(t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (live, rawm, fwd) = (med(&mut live_s), med(&mut raw_s), med(&mut fwd_s));
    let live_rate = batch as f64 / live;
    let raw_rate = batch as f64 / rawm;
    Ok(serde_json::json!({
        "ingested": ingested,
        "stored": stored,
        "store_bytes_used": used,
        "file_bytes": file,
        "bytes_per_tap": used.checked_div(stored).unwrap_or(0),
        "taps_per_s": live_rate as u64,
        "raw_per_s": raw_rate as u64,
        "ratio": crate::limits::ratio(live_rate, raw_rate),
        "batch_ms": (live * 1e4).round() / 10.0,
        "raw_batch_ms": (rawm * 1e4).round() / 10.0,
        "forwarded_ms": (fwd * 1e4).round() / 10.0,
        // Per table: entries, depth, pages (entries per leaf shows how full pages are); the
        // file's pages not in a table are LMDB's free list (pages freed by trims, reused).
        "tables": tables,
        "file_pages": file_pages,
        "free_pages_approx": file_pages.saturating_sub(table_pages),
    }))
}
