//! Bench scenario `clearing`: tap batches cleared per second by the charging core — every tap's
//! transaction MAC verified in the software HSM, counters booked, postings group-committed to
//! LMDB with fsync (or, with `--ledger postgres`, committed to a throwaway PostgreSQL cluster
//! on loopback). The taps are real: debits on emulated cards through validator SAMs.
//!
//! The limits, measured in the same run, batch by batch in alternation with the clearing:
//! `raw_tmac_per_s`, the same taps' transaction-MAC checks alone in the software HSM;
//! `raw_commit_per_s`, the same batches of LMDB puts alone with one fsynced commit per batch
//! ([`RawLedger`]); and `ratio`, the clearing rate over the slower of the two. On PostgreSQL,
//! `raw_commit_per_s` is the same rows written alone to the same database, one multi-row
//! statement per table and one commit per batch ([`RawPg`]), and the LMDB run of the same
//! invocation follows: `lmdb_taps_per_s`, `ratio_to_lmdb`.

use crate::loads::LedgerChoice;
use crate::Figures;
use charging::clearing::{clear_batch, ClearingBatch, ClearingTap};
use charging::ledger::Ledger;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::SeedableRng;
use std::sync::Mutex;
use std::time::Instant;

/// The taps of a run and what they need: the keys, the cards issued, the taps and their
/// receipts.
struct Taps {
    keys: KeySet,
    cards_issued: Vec<[u8; 7]>,
    taps: Vec<ClearingTap>,
    receipts: Vec<CommitReceipt>,
}

/// `n` taps (default 100,000) cleared in batches of 1,000 on `ledger`; on PostgreSQL, then the
/// same taps on LMDB, for the ratio.
pub fn run(n: Option<u64>, ledger: LedgerChoice) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(100_000);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let keys = KeySet::generate(&mut rng);
    let mut cards = cards(&SoftwareHsm::new(&keys)?, 1_000)?;
    let cards_issued: Vec<[u8; 7]> = cards.iter().map(|c| c.state().uid).collect();
    let (taps, receipts) = debits(&keys, &mut cards, &mut rng, n)?;
    let taps = Taps {
        keys,
        cards_issued,
        taps,
        receipts,
    };
    match ledger {
        LedgerChoice::Lmdb => run_lmdb(&taps).map(|(f, _)| f),
        LedgerChoice::Postgres => run_postgres(&taps),
    }
}

/// The cards were issued: their personalised value is in the ledger.
fn issue(ledger: &Ledger, cards: &[[u8; 7]]) -> anyhow::Result<()> {
    let issued = cards.to_vec();
    ledger.transact(move |t| {
        for c in &issued {
            t.issue_card(c, i32::MAX / 2, "issue", 0)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// On a throwaway PostgreSQL cluster (migrated as `tapgate charging migrate` migrates), then on
/// LMDB.
fn run_postgres(taps: &Taps) -> anyhow::Result<Figures> {
    let mut cluster = tapgate_testkit::postgres::Cluster::try_start()
        .map_err(|e| anyhow::anyhow!("--ledger postgres: {e}"))?;
    let url = cluster.create_database();
    let cfg = charging::ledger::PgConfig::new(&url, Some(cluster.password()));
    charging::ledger::postgres::migrate(&cfg)?;
    let ledger = Ledger::open_postgres(cfg)?;
    issue(&ledger, &taps.cards_issued)?;
    let retries_before = charging::ledger::PgLedger::retries();
    let raw = RawPg::open(&url, cluster.password(), &taps.cards_issued)?;
    let t = clear_beside_limits(taps, &ledger, Raw::Pg(Box::new(raw)), BATCH_TAPS)?;
    let retries = charging::ledger::PgLedger::retries() - retries_before;
    drop(ledger);
    drop(cluster);
    let (_, lmdb_taps_per_s) = run_lmdb(taps)?;
    let mut figures = headline(taps, &t);
    figures.insert(0, ("ledger", "postgres".into()));
    figures.push(("ledger_retries", retries.into()));
    figures.push(("lmdb_taps_per_s", (lmdb_taps_per_s as u64).into()));
    figures.push((
        "ratio_to_lmdb",
        crate::limits::ratio(t.cleared as f64 / t.clearing_s, lmdb_taps_per_s),
    ));
    Ok(figures)
}

/// Taps per batch.
const BATCH_TAPS: usize = 1_000;

/// The figures common to both ledgers.
fn headline(taps: &Taps, t: &Timings) -> Figures {
    let n = taps.taps.len() as f64;
    let raw_tmac_per_s = n / t.tmac_s;
    let raw_commit_per_s = n / t.commit_s;
    let taps_per_s = t.cleared as f64 / t.clearing_s;
    vec![
        ("taps", t.cleared.into()),
        ("batch_taps", (BATCH_TAPS as u64).into()),
        ("taps_per_s", (taps_per_s as u64).into()),
        (
            "batches_per_s",
            (((t.cleared as f64 / BATCH_TAPS as f64) / t.clearing_s) as u64).into(),
        ),
        ("raw_tmac_per_s", (raw_tmac_per_s as u64).into()),
        ("raw_commit_per_s", (raw_commit_per_s as u64).into()),
        (
            "ratio",
            crate::limits::ratio(taps_per_s, raw_tmac_per_s.min(raw_commit_per_s)),
        ),
    ]
}

/// On LMDB in a temporary directory: the figures, and the taps per second.
fn run_lmdb(taps: &Taps) -> anyhow::Result<(Figures, f64)> {
    let dir = tempfile::tempdir()?;
    let ledger = Ledger::open(dir.path(), 4 << 30)?;
    issue(&ledger, &taps.cards_issued)?;
    let size_before = ledger_file_bytes(dir.path())?;
    let raw = RawLedger::open(&taps.cards_issued)?;
    let t = clear_beside_limits(taps, &ledger, Raw::Lmdb(raw), BATCH_TAPS)?;
    // What the cleared taps added to the ledger's file (LMDB grows it page by page).
    let bytes_per_tap =
        ledger_file_bytes(dir.path())?.saturating_sub(size_before) as f64 / t.cleared.max(1) as f64;
    let mut figures = headline(taps, &t);
    figures.push((
        "ledger_bytes_per_tap",
        (bytes_per_tap.round() as u64).into(),
    ));
    figures.push((
        "ledger_mib_per_million_taps",
        ((bytes_per_tap * 1e6 / (1u64 << 20) as f64).round() as u64).into(),
    ));
    ledger.close();
    Ok((figures, t.cleared as f64 / t.clearing_s))
}

/// The size of the LMDB ledger's data file in `dir`.
fn ledger_file_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(dir.join("data.mdb"))?.len())
}

/// `count` transit cards with room for every debit, their keys from `hsm`.
fn cards(hsm: &SoftwareHsm, count: u64) -> anyhow::Result<Vec<Card>> {
    (0..count)
        .map(|i| {
            let mut uid = [0x04, 0, 0, 0, 0, 0, 9];
            uid[1..5].copy_from_slice(&(i as u32).to_be_bytes());
            let mut p = Personalisation::transit(uid, i32::MAX / 2);
            p.upper_limit_minor = i32::MAX;
            Ok(Card::personalise(&p, hsm.card_keys(&uid, 1)?))
        })
        .collect()
}

/// `n` real debits round the cards through validator 1001's SAM: the taps as a gateway
/// forwards them, and their receipts (for the transaction-MAC limit).
fn debits(
    keys: &KeySet,
    cards: &mut [Card],
    rng: &mut rand::rngs::StdRng,
    n: u64,
) -> anyhow::Result<(Vec<ClearingTap>, Vec<CommitReceipt>)> {
    let mut sam = SoftwareSam::validator(keys, 1001)?;
    let mut taps = Vec::with_capacity(n as usize);
    let mut receipts = Vec::with_capacity(n as usize);
    let mut card_rng = rand::rngs::StdRng::seed_from_u64(2);
    let cards_n = cards.len() as u64;
    for i in 0..n {
        let card = &mut cards[(i % cards_n) as usize];
        let mut reader = EmulatedReader {
            card,
            rng: &mut card_rng,
        };
        let Outcome::Committed { receipt, .. } =
            txn::debit(&mut reader, &mut sam, &mut *rng, |_| Decision::Apply {
                amount_minor: 125,
                record: None,
            })?
        else {
            anyhow::bail!("debit refused")
        };
        taps.push(ClearingTap {
            device_id: 1001,
            device_seq: i + 1,
            card_uid: hex::encode_upper(receipt.uid()),
            tmc: receipt.tmc(),
            kind: if receipt.kind() == TxKind::Debit {
                "debit"
            } else {
                "record_only"
            }
            .into(),
            amount_minor: receipt.amount_minor(),
            balance_after_minor: receipt.balance_after_minor(),
            tmv: hex::encode_upper(receipt.tmv()),
            key_version: receipt.key_version(),
            operator: Some("metro".into()),
            device_time_ms: 0,
            ..Default::default()
        });
        receipts.push(receipt);
    }
    Ok((taps, receipts))
}

/// The seconds spent on each, and the taps cleared.
struct Timings {
    tmac_s: f64,
    commit_s: f64,
    clearing_s: f64,
    cleared: u64,
}

/// The limits, batch by batch in alternation with the clearing (so that all three meet the
/// same disk and the same load from other processes): the batch's transaction-MAC checks
/// alone, then its LMDB puts alone, then the batch cleared.
fn clear_beside_limits(
    taps: &Taps,
    ledger: &Ledger,
    mut raw_ledger: Raw,
    batch_taps: usize,
) -> anyhow::Result<Timings> {
    let raw_hsm = SoftwareHsm::new(&taps.keys)?;
    let (mut tmac_s, mut commit_s, mut clearing_s) = (0.0f64, 0.0f64, 0.0f64);
    let hsm: Mutex<Box<dyn Hsm + Send>> = Mutex::new(Box::new(SoftwareHsm::new(&taps.keys)?));
    let mut cleared = 0u64;
    for (b, (chunk, receipts)) in taps
        .taps
        .chunks(batch_taps)
        .zip(taps.receipts.chunks(batch_taps))
        .enumerate()
    {
        let t = Instant::now();
        for r in receipts {
            std::hint::black_box(raw_hsm.verify_tmac(r)?);
        }
        tmac_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        raw_ledger.batch(b, chunk.len())?;
        commit_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let out = clear_batch(
            ledger,
            &hsm,
            ClearingBatch {
                batch_id: format!("b{b}"),
                taps: chunk.to_vec(),
            },
            0,
        )?;
        clearing_s += t.elapsed().as_secs_f64();
        anyhow::ensure!(
            out.anomalies.is_empty(),
            "{} anomalies, the first: {:?}",
            out.anomalies.len(),
            out.anomalies.first()
        );
        cleared += u64::from(out.cleared);
    }
    Ok(Timings {
        tmac_s,
        commit_s,
        clearing_s,
        cleared,
    })
}

/// The LMDB puts of clearing batches of taps, alone, with one fsynced commit per batch, in an
/// environment opened through `tapgate-lmdb` on the same disk as the ledger (a temporary
/// directory), its cards and accounts issued first. Per tap, as the ledger books a cleared debit
/// (charging/src/ledger: `post`, `put_idempotent`, `book_counter`): the posting (8-byte
/// sequence → its JSON), the card's and the operator's balances, the tap's idempotency marker
/// (`tap:<UID>:<TMC>` → the TMV), the card's shadow (UID → its JSON); per batch, the batch's
/// stored answer. The taps go round the cards as the scenario's do.
struct RawLedger {
    env: tapgate_lmdb::LmdbEnv,
    dbs: [tapgate_lmdb::RawDatabase; 4],
    cards: Vec<[u8; 7]>,
    answer: Vec<u8>,
    done: u64,
    _dir: tempfile::TempDir,
}

fn shadow_record(tmc: u32) -> charging::ledger::CardShadow {
    charging::ledger::CardShadow {
        last_tmc: tmc,
        last_reported_balance_minor: Some(i32::MAX / 2),
        booked_balance_minor: Some(i32::MAX / 2),
        booked_through_tmc: tmc,
        ..Default::default()
    }
}

fn shadow(tmc: u32) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&shadow_record(tmc))
}

impl RawLedger {
    fn open(cards: &[[u8; 7]]) -> anyhow::Result<Self> {
        use charging::ledger::card_account;
        let dir = tempfile::tempdir()?;
        let (env, dbs) = tapgate_lmdb::open(
            dir.path(),
            ["balances", "postings", "cards", "idempotency"],
            &tapgate_lmdb::EnvConfig::durable(4 << 30),
        )?;
        let [balances, _, cards_db, _] = &dbs;
        let mut w = env.write_txn()?;
        for c in cards {
            balances.put(&mut w, card_account(c).as_bytes(), &i64::MAX.to_be_bytes())?;
            cards_db.put(&mut w, c, &shadow(0)?)?;
        }
        w.commit()?;
        let answer = serde_json::to_vec(&serde_json::json!({
            "batch_id": "b0",
            "cleared": 1000,
            "duplicates": 0,
            "loads_voided": 0,
            "cards_blocked": 0,
            "anomalies": [],
            "loads_completed": 0,
            "rejected": [],
            "taps_sha256": "0".repeat(64),
        }))?;
        Ok(Self {
            env,
            dbs,
            cards: cards.to_vec(),
            answer,
            done: 0,
            _dir: dir,
        })
    }

    /// Batch `b` of `taps` taps, committed with fsync.
    fn batch(&mut self, b: usize, taps: usize) -> anyhow::Result<()> {
        use charging::ledger::{card_account, Posting};
        let [balances, postings, cards_db, idem] = &self.dbs;
        let mut w = self.env.write_txn()?;
        for _ in 0..taps {
            let n_cards = self.cards.len() as u64;
            let card = &self.cards[(self.done % n_cards) as usize];
            let tmc = (self.done / n_cards + 1) as u32;
            self.done += 1;
            let seq = self.done;
            let account = card_account(card);
            let posting = Posting {
                seq,
                time_ms: 0,
                from: account.clone(),
                to: "operator:metro".into(),
                amount_minor: 125,
                reference: format!("tap:{}:{tmc}", hex::encode_upper(card)),
            };
            postings.put(&mut w, &seq.to_be_bytes(), &serde_json::to_vec(&posting)?)?;
            balances.put(&mut w, account.as_bytes(), &(i64::MAX - 1).to_be_bytes())?;
            balances.put(&mut w, b"operator:metro", &(seq as i64).to_be_bytes())?;
            idem.put(
                &mut w,
                posting.reference.as_bytes(),
                &serde_json::to_vec(&"0123456789ABCDEF")?,
            )?;
            cards_db.put(&mut w, card, &shadow(tmc)?)?;
        }
        idem.put(
            &mut w,
            format!("clearing-batch:b{b}").as_bytes(),
            &self.answer,
        )?;
        w.commit()?;
        Ok(())
    }
}

/// The raw writes a run's clearing is set beside.
enum Raw {
    Lmdb(RawLedger),
    Pg(Box<RawPg>),
}

impl Raw {
    fn batch(&mut self, b: usize, taps: usize) -> anyhow::Result<()> {
        match self {
            Raw::Lmdb(r) => r.batch(b, taps),
            Raw::Pg(r) => r.batch(b, taps),
        }
    }
}

/// The shadow's counters, in their own columns of `cards` on PostgreSQL.
const COUNTERS: [&str; 4] = [
    "last_tmc",
    "last_reported_balance_minor",
    "booked_through_tmc",
    "booked_balance_minor",
];

/// The rows clearing writes for a batch of taps, written alone to the same PostgreSQL database
/// (tables of the same shape, created beside the ledger's): per tap, the posting, the card's
/// balance and shadow's counters, the tap's idempotency marker; per batch, the operator's balance and the
/// batch's stored answer — one multi-row statement per table and one commit per batch, at
/// `SERIALIZABLE` as the ledger's transactions run. The taps go round the cards as the
/// scenario's do.
struct RawPg {
    client: postgres::Client,
    cards: Vec<[u8; 7]>,
    answer: serde_json::Value,
    done: u64,
}

impl RawPg {
    fn open(url: &str, password: &str, cards: &[[u8; 7]]) -> anyhow::Result<Self> {
        let mut cfg: postgres::Config = url.parse()?;
        cfg.password(password);
        let mut client = cfg.connect(postgres::NoTls)?;
        client.batch_execute(
            "CREATE TABLE raw_postings (LIKE postings INCLUDING ALL);
             CREATE TABLE raw_balances (LIKE balances INCLUDING ALL);
             CREATE TABLE raw_cards (LIKE cards INCLUDING ALL) WITH (fillfactor = 70);
             CREATE TABLE raw_idempotency (LIKE idempotency INCLUDING ALL);",
        )?;
        let uids: Vec<String> = cards.iter().map(hex::encode_upper).collect();
        let accounts: Vec<String> = cards.iter().map(charging::ledger::card_account).collect();
        // A card's row as the ledger's is (`0003_card_counters.sql`): the counters in their
        // columns, the rest of the shadow in the record.
        let mut rest = serde_json::to_value(shadow_record(0))?;
        if let Some(o) = rest.as_object_mut() {
            for counter in COUNTERS {
                o.remove(counter);
            }
        }
        client.execute(
            "INSERT INTO raw_cards (uid, record, last_tmc, booked_through_tmc) \
             SELECT u, $2, 0, 0 FROM unnest($1::text[]) u",
            &[&uids, &rest],
        )?;
        client.execute(
            "INSERT INTO raw_balances (account, shard, balance_minor) \
             SELECT a, 0, $2 FROM unnest($1::text[]) a",
            &[&accounts, &(i64::MAX / 2)],
        )?;
        Ok(Self {
            client,
            cards: cards.to_vec(),
            answer: serde_json::json!({"batch_id": "b0", "cleared": 1000, "anomalies": []}),
            done: 0,
        })
    }

    /// Batch `b` of `taps` taps, committed.
    fn batch(&mut self, b: usize, taps: usize) -> anyhow::Result<()> {
        let n_cards = self.cards.len() as u64;
        let (mut refs, mut accounts, mut uids, mut tmcs) = (vec![], vec![], vec![], vec![]);
        for _ in 0..taps {
            let card = &self.cards[(self.done % n_cards) as usize];
            let tmc = (self.done / n_cards + 1) as u32;
            self.done += 1;
            refs.push(format!("tap:{}:{tmc}", hex::encode_upper(card)));
            accounts.push(charging::ledger::card_account(card));
            uids.push(hex::encode_upper(card));
            tmcs.push(i64::from(tmc));
        }
        let mut w = self.client.transaction()?;
        w.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")?;
        w.execute(
            "INSERT INTO raw_postings (time_ms, from_account, to_account, amount_minor, reference) \
             SELECT 0, a, 'operator:metro', 125, r FROM unnest($1::text[], $2::text[]) AS t(a, r)",
            &[&accounts, &refs],
        )?;
        w.execute(
            "INSERT INTO raw_idempotency (key, answer) \
             SELECT r, to_jsonb('0123456789ABCDEF'::text) FROM unnest($1::text[]) r",
            &[&refs],
        )?;
        w.execute(
            "UPDATE raw_balances SET balance_minor = balance_minor - 125 \
             FROM unnest($1::text[]) a WHERE account = a AND shard = 0",
            &[&accounts],
        )?;
        w.execute(
            "UPDATE raw_cards SET last_tmc = t, last_reported_balance_minor = $3, \
             booked_through_tmc = t, booked_balance_minor = $3 \
             FROM unnest($1::text[], $2::bigint[]) AS c(u, t) WHERE uid = u",
            &[&uids, &tmcs, &(i32::MAX / 2)],
        )?;
        w.execute(
            "INSERT INTO raw_balances (account, shard, balance_minor) VALUES ('operator:metro', 0, $1) \
             ON CONFLICT (account, shard) DO UPDATE SET balance_minor = raw_balances.balance_minor + $1",
            &[&(125 * taps as i64)],
        )?;
        w.execute(
            "INSERT INTO raw_idempotency (key, answer) VALUES ($1, $2)",
            &[&format!("clearing-batch:b{b}"), &self.answer],
        )?;
        w.commit()?;
        Ok(())
    }
}
