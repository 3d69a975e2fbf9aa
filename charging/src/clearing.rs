//! Clearing: tap batches from the gateway, booked exactly once.
//!
//! The gateway has already verified each tap's device MAC and removed duplicates by (device,
//! sequence). Clearing trusts none of that for money: every tap's card transaction MAC is
//! verified in the HSM, so no terminal can fabricate a debit (invariant 2), and every card
//! counter is booked once:
//!
//! - a batch id seen before gets its stored answer back (idempotent retries);
//! - a counter already booked with the same transaction MAC is a duplicate, counted and skipped;
//! - a counter already booked with *different* contents is a cloned card: an anomaly, and the
//!   card is blocked;
//! - a transaction MAC that does not verify is a forged tap: nothing is posted; a batch keeps
//!   per device a count of its forged and malformed taps and at most
//!   [`REJECTED_EXAMPLES_MAX`] of them as examples (anomalies), so a batch of forgeries grows
//!   the ledger by a bounded number of rows, not one per tap;
//! - a limited credit right after a back-office reversal is refused (an anomaly, the card is
//!   blocked): a limited credit may only undo a validator's own fare, never a reversal (the
//!   card refuses it too: a reversal does not arm LimitedCredit);
//! - a debit that takes the shadow purse below zero is an anomaly (the card was loaded outside
//!   the ledger, or a load is still pending);
//! - a pending load whose counter a cleared tap turns out to have used is voided;
//! - a genuine card the ledger has never seen (not registered, loaded or cleared) is learned
//!   from its first proved tap: issued with the balance it proved just before that tap, so a
//!   card that taps before its registration is not booked below zero ([`learn_card`]; a late
//!   registration then changes nothing).
//!
//! A debit posts `card:<UID>` → `operator:<id>` with reference `tap:<UID>:<TMC>`.

use crate::ledger::{
    card_account, Booking, Completion, FundingAction, IntentState, Ledger, LedgerError, LedgerWrite,
};
use purse::receipt::{TxClaim, TxKind};
use purse::sam::{Hsm, TmacVerified};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The batch wire format, shared with the gateway: [`purse::batch`].
pub use purse::batch::{ClearingBatch, ClearingTap};

pub use crate::ledger::Anomaly;

/// The answer to a batch (stored under its id).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOutcome {
    /// The batch id.
    pub batch_id: String,
    /// Taps booked now.
    pub cleared: u32,
    /// Taps whose counter was already booked with the same contents.
    pub duplicates: u32,
    /// Pending loads voided because a tap used their counter.
    pub loads_voided: u32,
    /// Cards blocked by this batch (clones).
    pub cards_blocked: u32,
    /// What was wrong.
    pub anomalies: Vec<Anomaly>,
    /// Pending loads (and reversals) completed because a tap proved them (the card's
    /// balance moved by exactly their change across their counter).
    pub loads_completed: u32,
    /// What to do with the funding of the loads voided or completed here (release, capture,
    /// refund): done by the caller once the batch is durable.
    #[serde(skip)]
    pub funding: Vec<FundingAction>,
    /// Taps refused before booking (`forged_tmac`, `malformed`), counted per device and kind;
    /// only the first [`REJECTED_EXAMPLES_MAX`] of them are listed in `anomalies`.
    #[serde(default)]
    pub rejected: Vec<RejectedCount>,
    /// Cards the ledger had never seen, learned from their first proved tap in this batch.
    #[serde(default)]
    pub cards_learned: u32,
}

/// How many taps of one device a batch refused for one reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedCount {
    /// The device (0: the devices beyond [`REJECTED_DEVICES_MAX`], together).
    pub device_id: u32,
    /// `forged_tmac` or `malformed`.
    pub kind: String,
    /// Taps refused.
    pub count: u32,
}

/// Most refused taps (forged, malformed) one batch lists as examples, in its answer and as
/// anomaly rows; the rest are only counted ([`BatchOutcome::rejected`]).
pub const REJECTED_EXAMPLES_MAX: usize = 16;
/// Most devices one batch counts refused taps for separately; the others are counted together
/// under device 0.
pub const REJECTED_DEVICES_MAX: usize = 64;

impl BatchOutcome {
    /// Counts a refused tap and keeps it as an example while there is room.
    fn refuse(&mut self, a: Anomaly) {
        let mut device_id = a.device_id;
        if !self.rejected.iter().any(|r| r.device_id == device_id)
            && self
                .rejected
                .iter()
                .map(|r| r.device_id)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                >= REJECTED_DEVICES_MAX
        {
            device_id = 0;
        }
        match self
            .rejected
            .iter_mut()
            .find(|r| r.device_id == device_id && r.kind == a.kind)
        {
            Some(r) => r.count = r.count.saturating_add(1),
            None => self.rejected.push(RejectedCount {
                device_id,
                kind: a.kind.clone(),
                count: 1,
            }),
        }
        let listed = self
            .anomalies
            .iter()
            .filter(|x| x.kind == "forged_tmac" || x.kind == "malformed")
            .count();
        if listed < REJECTED_EXAMPLES_MAX {
            self.anomalies.push(a);
        }
    }

    /// One summary anomaly per (device, kind) whose refused taps were not all listed.
    fn refused_summaries(&self) -> Vec<Anomaly> {
        self.rejected
            .iter()
            .filter_map(|r| {
                let listed = self
                    .anomalies
                    .iter()
                    .filter(|a| a.kind == r.kind && a.device_id == r.device_id)
                    .count();
                let unlisted = (r.count as usize).saturating_sub(listed);
                (unlisted > 0).then(|| Anomaly {
                    kind: r.kind.clone(),
                    card_uid: String::new(),
                    tmc: 0,
                    device_id: r.device_id,
                    device_seq: 0,
                    detail: format!(
                        "{} {} taps in batch {} ({unlisted} not listed)",
                        r.count, r.kind, self.batch_id
                    ),
                })
            })
            .collect()
    }
}

/// Clearing errors (the batch is not booked; the gateway retries it).
#[derive(Debug, thiserror::Error)]
pub enum ClearingError {
    /// Malformed batch.
    #[error("bad batch: {0}")]
    BadRequest(String),
    /// Storage.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The HSM failed (no verdict on any tap); the batch can be resent.
    #[error("HSM: {0}")]
    Hsm(String),
    /// A batch id already answered, sent again with other taps.
    #[error("{0}")]
    Conflict(String),
}

/// The stored answer to a batch id, unless it was answered for other taps (then the same id
/// must not hide them: 409).
fn stored_answer(
    v: serde_json::Value,
    batch_id: &str,
    digest: &str,
) -> Result<Option<BatchOutcome>, ClearingError> {
    if let Some(d) = v.get("taps_sha256").and_then(|d| d.as_str()) {
        if d != digest {
            return Err(ClearingError::Conflict(format!(
                "batch {batch_id} was answered for other taps: a batch id names one set of taps (was the gateway's store reset? give it a new gateway id)"
            )));
        }
    }
    Ok(serde_json::from_value::<BatchOutcome>(v).ok())
}

/// Most taps in one batch.
pub const BATCH_MAX_TAPS: usize = 10_000;

/// Clearing's counters since the server started (`GET /metrics`): batches booked, taps booked
/// and found duplicate, cards blocked and learned, loads voided and completed, anomalies by
/// kind (refused taps all counted, not only the listed examples).
#[derive(Debug, Default)]
pub struct ClearingStats {
    batches: AtomicU64,
    taps_booked: AtomicU64,
    taps_duplicate: AtomicU64,
    cards_blocked: AtomicU64,
    cards_learned: AtomicU64,
    loads_voided: AtomicU64,
    loads_completed: AtomicU64,
    anomalies: Mutex<BTreeMap<String, u64>>,
}

/// The anomaly kinds a batch raises (each is shown, at 0 until it happens).
const ANOMALY_KINDS: [&str; 5] = [
    "clone",
    "forged_tmac",
    "limited_credit_after_reversal",
    "malformed",
    "negative_shadow",
];

impl ClearingStats {
    /// Counts a batch booked now (not a stored answer to a retry).
    fn count(&self, o: &BatchOutcome) {
        let add = |c: &AtomicU64, n: u32| c.fetch_add(u64::from(n), Ordering::Relaxed);
        add(&self.batches, 1);
        add(&self.taps_booked, o.cleared);
        add(&self.taps_duplicate, o.duplicates);
        add(&self.cards_blocked, o.cards_blocked);
        add(&self.cards_learned, o.cards_learned);
        add(&self.loads_voided, o.loads_voided);
        add(&self.loads_completed, o.loads_completed);
        let Ok(mut by_kind) = self.anomalies.lock() else {
            return;
        };
        for r in &o.rejected {
            *by_kind.entry(r.kind.clone()).or_default() += u64::from(r.count);
        }
        for a in &o.anomalies {
            if a.kind != "forged_tmac" && a.kind != "malformed" {
                *by_kind.entry(a.kind.clone()).or_default() += 1;
            }
        }
    }

    /// Taps refused and anomalies raised since the server started, by kind (every kind a
    /// batch raises is listed, at 0 until it happens).
    pub fn anomalies_by_kind(&self) -> BTreeMap<String, u64> {
        let mut by_kind = self.anomalies.lock().map(|m| m.clone()).unwrap_or_default();
        for k in ANOMALY_KINDS {
            by_kind.entry(k.to_string()).or_default();
        }
        by_kind
    }

    /// The Prometheus text of the counters.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, c) in [
            ("batches", &self.batches),
            ("taps_booked", &self.taps_booked),
            ("taps_duplicate", &self.taps_duplicate),
            ("cards_blocked", &self.cards_blocked),
            ("cards_learned", &self.cards_learned),
            ("loads_voided", &self.loads_voided),
            ("loads_completed", &self.loads_completed),
        ] {
            let name = format!("tapgate_charging_clearing_{name}_total");
            out.push_str(&format!(
                "# TYPE {name} counter\n{name} {}\n",
                c.load(Ordering::Relaxed)
            ));
        }
        let name = "tapgate_charging_clearing_anomalies_total";
        out.push_str(&format!("# TYPE {name} counter\n"));
        for (kind, n) in self.anomalies_by_kind() {
            out.push_str(&format!("{name}{{kind=\"{kind}\"}} {n}\n"));
        }
        out
    }
}

/// [`clear_batch`], counted into `stats` when the batch is booked now (a retried batch's
/// stored answer is not counted again).
pub fn clear_batch_counted(
    ledger: &Ledger,
    hsm: &Mutex<Box<dyn Hsm + Send>>,
    batch: ClearingBatch,
    now_ms: u64,
    stats: &ClearingStats,
) -> Result<BatchOutcome, ClearingError> {
    let (outcome, fresh) = clear(ledger, hsm, batch, now_ms)?;
    if fresh {
        stats.count(&outcome);
    }
    Ok(outcome)
}

/// Clears one batch.
pub fn clear_batch(
    ledger: &Ledger,
    hsm: &Mutex<Box<dyn Hsm + Send>>,
    batch: ClearingBatch,
    now_ms: u64,
) -> Result<BatchOutcome, ClearingError> {
    clear(ledger, hsm, batch, now_ms).map(|(outcome, _)| outcome)
}

/// Clears one batch; whether it was booked now (`false`: the stored answer of a retry).
fn clear(
    ledger: &Ledger,
    hsm: &Mutex<Box<dyn Hsm + Send>>,
    batch: ClearingBatch,
    now_ms: u64,
) -> Result<(BatchOutcome, bool), ClearingError> {
    if batch.batch_id.is_empty() || batch.batch_id.len() > 256 {
        return Err(ClearingError::BadRequest(
            "batch_id must be 1 to 256 characters".into(),
        ));
    }
    if batch.taps.len() > BATCH_MAX_TAPS {
        return Err(ClearingError::BadRequest(format!(
            "{} taps: a batch holds at most {BATCH_MAX_TAPS}",
            batch.taps.len()
        )));
    }
    let key = format!("clearing-batch:{}", batch.batch_id);
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(&batch.taps).expect("taps serialise"),
        ))
    };
    {
        // A look for a retry's answer, not a decision (the write transaction looks again): one
        // statement on PostgreSQL, with no snapshot around it.
        let r = ledger.read_latest()?;
        if let Some(v) = r.idempotent(&key)? {
            if let Some(o) = stored_answer(v, &batch.batch_id, &digest)? {
                return Ok((o, false));
            }
        }
    }
    // Verify every transaction MAC first (HSM work outside the write transaction).
    let mut outcome = BatchOutcome {
        batch_id: batch.batch_id.clone(),
        ..Default::default()
    };
    let good = verify_taps(hsm, batch.taps, &mut outcome)?;
    let outcome_before = outcome;
    let stored_key = key.clone();
    let mut ahead = reads_ahead(&good);
    // The batch's own answer is read with the taps' keys (one statement on PostgreSQL).
    ahead.keys.push(stored_key.clone());
    // LMDB reads nothing ahead: no need to work out what to read.
    let ahead_learned = ledger.kind() == "postgres";
    let mut attempt = 0u32;
    let booked = ledger.transact(move |t| {
        // A transaction the database runs again starts from the outcome before booking, and
        // reads every marker (a marker taken as absent that was there fails the first attempt
        // on its unique key: never booked twice, and found the second time).
        attempt += 1;
        if attempt == 2 {
            let counted = std::mem::take(&mut ahead.counted_keys);
            ahead.keys.extend(counted.into_iter().map(|(_, _, k)| k));
        }
        let mut done = outcome_before.clone();
        t.prefetch(&ahead)?;
        if ahead_learned {
            t.prefetch(&learned_ahead(t, &good)?)?;
        }
        if let Some(v) = t.idempotent(&stored_key)? {
            match stored_answer(v, &done.batch_id, &digest) {
                Ok(Some(o)) => return Ok((o, false)), // a concurrent retry won
                Ok(None) => {}
                // Answered for other taps meanwhile: fail this attempt; the retry gets the 409.
                Err(e) => return Err(LedgerError::Commit(e.to_string())),
            }
        }
        for (tap, proof) in &good {
            book_tap(t, tap, proof, now_ms, &mut done)?;
        }
        for a in done.anomalies.iter().chain(&done.refused_summaries()) {
            t.record_anomaly(a)?;
        }
        let mut stored = serde_json::to_value(&done).expect("outcome serialises");
        stored["taps_sha256"] = digest.clone().into();
        t.put_idempotent(&stored_key, &stored)?;
        Ok((done, true))
    })?;
    Ok(booked)
}

/// What booking the verified taps reads per tap ([`book_tap`]), for [`LedgerWrite::prefetch`]:
/// the cards, the taps' markers (a marker exists only once the card's shadow has observed its
/// counter: `book_tap` writes it with `book_proved`, in the same transaction), and the intents
/// at the counter below each tap (two below a limited credit's). The learned-card answers
/// [`learn_card`] reads are [`learned_ahead`], once the cards are known.
fn reads_ahead(good: &[(ClearingTap, TmacVerified)]) -> crate::ledger::ReadsAhead {
    let (mut cards, mut counters, mut counted_keys) = (vec![], vec![], vec![]);
    for (_, proof) in good {
        let r = proof.receipt();
        let (uid, tmc) = (r.uid(), r.tmc());
        cards.push(uid);
        counted_keys.push((uid, tmc, tap_marker(&uid, tmc)));
        // The counter below (a pending load the tap voids) and, for a limited credit, the one
        // below that (`follows_reversal`).
        let below = 1 + u32::from(r.kind() == TxKind::LimitedCredit);
        counters.extend((1..=below).filter_map(|d| Some((uid, tmc.checked_sub(d)?))));
    }
    crate::ledger::ReadsAhead {
        cards,
        keys: vec![],
        counters,
        counted_keys,
    }
}

/// The learned-card answers [`learn_card`] will read, for [`LedgerWrite::prefetch`] after the
/// cards are read ahead: those of the taps whose card has no shadow or has reported the tap's
/// counter already (above it, a card's learned-card answer decides nothing: [`learn_card`]).
fn learned_ahead(
    t: &dyn LedgerWrite,
    good: &[(ClearingTap, TmacVerified)],
) -> Result<crate::ledger::ReadsAhead, LedgerError> {
    let mut keys = vec![];
    for (_, proof) in good {
        let (uid, tmc) = (proof.receipt().uid(), proof.receipt().tmc());
        if !above_last_counter(t, &uid, tmc)? {
            keys.push(crate::ledger::learned_card_key(&uid));
        }
    }
    Ok(crate::ledger::ReadsAhead {
        keys,
        ..Default::default()
    })
}

/// Whether the card has a shadow whose last reported counter is below `tmc`.
fn above_last_counter(t: &dyn LedgerWrite, uid: &[u8; 7], tmc: u32) -> Result<bool, LedgerError> {
    Ok(t.card_known(uid)? && t.card(uid)?.last_tmc < tmc)
}

/// The idempotency key that marks a card counter cleared (its answer: [`marker_answer`]).
fn tap_marker(uid: &[u8; 7], tmc: u32) -> String {
    format!("tap:{}:{tmc}", hex::encode_upper(uid))
}

/// What a tap's marker keeps: the tap's TMV as a string, or — when the gateway sent the stop,
/// route or fare flags — `{"tmv", "stop_id", "route_id", "fare_flags"}` (absent ones left out),
/// which the cardholder page reads back ([`TapDetail`]). The flags were checked on the way in.
fn marker_answer(tap: &ClearingTap) -> serde_json::Value {
    let tmv = tap.tmv.to_uppercase();
    if tap.stop_id.is_none() && tap.route_id.is_none() && tap.fare_flags.is_none() {
        return serde_json::Value::String(tmv);
    }
    let mut m = serde_json::Map::new();
    m.insert("tmv".into(), tmv.into());
    for (k, v) in [
        ("stop_id", tap.stop_id),
        ("route_id", tap.route_id),
        ("fare_flags", tap.fare_flags.map(u32::from)),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), v.into());
        }
    }
    serde_json::Value::Object(m)
}

/// The TMV a tap marker's answer holds (either form of [`marker_answer`]).
fn marker_tmv(answer: &serde_json::Value) -> Option<&str> {
    answer
        .as_str()
        .or_else(|| answer.get("tmv").and_then(|v| v.as_str()))
}

/// Where a cleared tap was and what the fare engine said of it, as its marker keeps them
/// (all `None` for a tap a gateway sent without them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapDetail {
    /// The validator's stop.
    pub stop_id: Option<u32>,
    /// The validator's route.
    pub route_id: Option<u32>,
    /// The fare engine's flags; `None` when not sent.
    pub flags: Option<purse::tap::TapFlags>,
}

/// The detail of the tap cleared at `uid`'s counter `tmc`; `None` when none was cleared there.
pub fn tap_detail(
    r: &dyn crate::ledger::LedgerRead,
    uid: &[u8; 7],
    tmc: u32,
) -> Result<Option<TapDetail>, LedgerError> {
    let Some(answer) = r.idempotent(&tap_marker(uid, tmc))? else {
        return Ok(None);
    };
    let num = |k: &str| {
        answer
            .get(k)
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok())
    };
    Ok(Some(TapDetail {
        stop_id: num("stop_id"),
        route_id: num("route_id"),
        flags: num("fare_flags")
            .and_then(|b| u8::try_from(b).ok())
            .and_then(|b| purse::tap::TapFlags::from_bits(b).ok()),
    }))
}

/// Verifies every tap's transaction MAC in the HSM (outside the write transaction): the taps
/// that verified, with the HSM's proofs; the others are refused into `outcome` (malformed,
/// forged).
/// An HSM failure is no verdict: the whole batch fails and is resent.
fn verify_taps(
    hsm: &Mutex<Box<dyn Hsm + Send>>,
    taps: Vec<ClearingTap>,
    outcome: &mut BatchOutcome,
) -> Result<Vec<(ClearingTap, TmacVerified)>, ClearingError> {
    let mut good = Vec::with_capacity(taps.len());
    for tap in taps {
        let anomaly = |kind: &str, detail: String, tap: &ClearingTap| Anomaly {
            kind: kind.into(),
            card_uid: tap.card_uid.clone(),
            tmc: tap.tmc,
            device_id: tap.device_id,
            device_seq: tap.device_seq,
            detail,
        };
        let uid: Option<[u8; 7]> = hex::decode(&tap.card_uid)
            .ok()
            .and_then(|v| v.try_into().ok());
        let tmv: Option<[u8; 8]> = hex::decode(&tap.tmv).ok().and_then(|v| v.try_into().ok());
        let (Some(uid), Some(tmv), Some(kind)) =
            (uid, tmv, purse::batch::kind_from_name(&tap.kind))
        else {
            outcome.refuse(anomaly(
                "malformed",
                "card_uid, tmv or kind malformed".into(),
                &tap,
            ));
            continue;
        };
        if let Err(e) = tap.flags() {
            outcome.refuse(anomaly("malformed", format!("fare_flags: {e}"), &tap));
            continue;
        }
        if tap.amount_minor < 0 || (kind == TxKind::RecordOnly && tap.amount_minor != 0) {
            outcome.refuse(anomaly(
                "malformed",
                "amount does not fit the kind".into(),
                &tap,
            ));
            continue;
        }
        let claim = TxClaim {
            uid,
            tmc: tap.tmc,
            tmv,
            kind,
            amount_minor: tap.amount_minor,
            balance_after_minor: tap.balance_after_minor,
            key_version: tap.key_version,
            reader_id: None,
        };
        let proof = match hsm.lock().expect("hsm lock").verify_claim(&claim) {
            Ok(proof) => proof,
            // The HSM failed, not the tap: no verdict, the whole batch fails and is resent.
            Err(purse::sam::SamError::Hsm(e)) => return Err(ClearingError::Hsm(e)),
            Err(e) => {
                outcome.refuse(anomaly(
                    "forged_tmac",
                    format!("transaction MAC refused: {e}"),
                    &tap,
                ));
                continue;
            }
        };
        good.push((tap, proof));
    }
    Ok(good)
}

/// Books one verified tap inside the batch's transaction: a duplicate is counted, a counter
/// cleared with other contents or already booked by a load is a clone, a limited credit right
/// after a reversal blocks the card; otherwise the fare (or limited credit) is posted, the
/// counter booked once, a pending load at the counter below voided, loads across a gap
/// completed, and a negative shadow purse reported.
fn book_tap(
    t: &mut dyn LedgerWrite,
    tap: &ClearingTap,
    proof: &TmacVerified,
    now_ms: u64,
    done: &mut BatchOutcome,
) -> Result<(), LedgerError> {
    let c = &proof.receipt().to_claim();
    let marker = tap_marker(&c.uid, c.tmc);
    if let Some(prev) = t.idempotent(&marker)? {
        if marker_tmv(&prev) == Some(tap.tmv.to_uppercase().as_str()) {
            done.duplicates += 1;
        } else {
            clone_found(
                t,
                done,
                tap,
                c,
                "the card counter was already cleared with different contents",
                now_ms,
            )?;
        }
        return Ok(());
    }
    if c.kind == TxKind::LimitedCredit && follows_reversal(t, c)? {
        // The card refuses this (a reversal does not arm LimitedCredit): a card that
        // did it is not behaving as ours do. Nothing is booked; the card is blocked.
        done.anomalies.push(Anomaly {
            kind: "limited_credit_after_reversal".into(),
            card_uid: tap.card_uid.clone(),
            tmc: c.tmc,
            device_id: tap.device_id,
            device_seq: tap.device_seq,
            detail: "a limited credit right after a back-office reversal: a limited credit may only undo a fare".into(),
        });
        if t.set_blocked(&c.uid, true, "a limited credit undid a reversal", now_ms)?
            .is_some()
        {
            done.cards_blocked += 1;
        }
        return Ok(());
    }
    let op = tap.operator.as_deref().unwrap_or("default");
    if learn_card(t, c, now_ms, done)? == Learned::Before {
        // The card was learned from a later state: this change is inside the balance it was
        // issued with, so the operator's fare comes from the issuer's float.
        let op = format!("operator:{op}");
        let amount = i64::from(c.amount_minor);
        match c.kind {
            TxKind::Debit if amount > 0 => {
                t.post(now_ms, "issuer:float", &op, amount, &marker)?;
            }
            TxKind::LimitedCredit if amount > 0 => {
                t.post(now_ms, &op, "issuer:float", amount, &marker)?;
            }
            _ => {}
        }
    } else {
        t.post_cleared_tap(proof, op, &marker, now_ms)?;
    }
    // An action-list order a validator credited: completed here, once, from the proof.
    if let (TxKind::Credit, Some(order_id)) = (c.kind, purse::batch::pickup_order(&tap.kind)) {
        let booked = crate::load::complete_order_from_tap(
            t,
            proof,
            order_id,
            tap.device_id,
            tap.device_seq,
            now_ms,
        )?;
        if let crate::load::PickupBooked::Unmatched(a) = booked {
            done.anomalies.push(a);
        }
    }
    t.put_idempotent(&marker, &marker_answer(tap))?;
    if t.book_proved(proof, now_ms)? == Booking::Duplicate {
        // Booked by a load at the same counter: the load's own record already holds it.
        clone_found(
            t,
            done,
            tap,
            c,
            "a tap at a counter already booked by a load",
            now_ms,
        )?;
    }
    // A pending load (or reversal) recorded at tmc−1 did not happen: this tap used
    // its counter.
    if let Some(before) = c.tmc.checked_sub(1) {
        let open = t
            .intent(&c.uid, before)?
            .is_some_and(|i| i.state == IntentState::Authorised);
        if open {
            done.loads_voided += 1;
            if let Some(action) = t.void_intent(&c.uid, before, now_ms)? {
                done.funding.push(action);
            }
        }
    }
    complete_loads_across_gaps(t, proof, now_ms, done)?;
    cleared_one(done);
    if t.balance(&card_account(&c.uid))? < 0 {
        done.anomalies.push(Anomaly {
            kind: "negative_shadow".into(),
            card_uid: tap.card_uid.clone(),
            tmc: c.tmc,
            device_id: tap.device_id,
            device_seq: tap.device_seq,
            detail: "the shadow purse went below zero".into(),
        });
    }
    Ok(())
}

/// Where a tap stands against a card clearing learned from its taps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Learned {
    /// A card the ledger knew otherwise (registered, loaded), one that cannot be learned, or a
    /// tap above the card's last reported counter (after any state it was learned from).
    No,
    /// The tap is at or after the counter the card was learned at.
    AtOrAfter,
    /// The tap's change happened before the state the card was learned from.
    Before,
}

/// A genuine card (its tap's transaction MAC verified) that the ledger has never seen — not
/// registered, loaded or cleared — is learned from this first proved tap: issued
/// (`issuer:float` → `card:<UID>`) with the balance the card proved just before it, and the
/// counter recorded (`learned-card:<UID>`, [`crate::ledger::LearnedCard`]). Taps below that
/// counter arriving later changed the card before that state ([`Learned::Before`]), and so did
/// a franchise load or an online load below it reported later: their value moves against
/// `issuer:float`, never the card again (`LedgerWrite::post_franchise_load`,
/// `LedgerWrite::complete_intent`). A registration afterwards changes nothing, or is refused
/// if its personalised value contradicts what the card proved (`LoadService::register_card`).
fn learn_card(
    t: &mut dyn LedgerWrite,
    c: &TxClaim,
    now_ms: u64,
    done: &mut BatchOutcome,
) -> Result<Learned, LedgerError> {
    // A learned card's shadow has observed the counter it was learned at (the tap that taught
    // it is booked in the same transaction, and a shadow's last counter never falls): a tap
    // above the last counter is not before it, so its answer is not read.
    if above_last_counter(t, &c.uid, c.tmc)? {
        return Ok(Learned::No);
    }
    if let Some(learned) = t.learned_card(&c.uid)? {
        return Ok(if c.tmc < learned.tmc {
            Learned::Before
        } else {
            Learned::AtOrAfter
        });
    }
    if t.card_known(&c.uid)? {
        return Ok(Learned::No);
    }
    let change = match c.kind {
        TxKind::Debit => -i64::from(c.amount_minor),
        TxKind::LimitedCredit | TxKind::Credit => i64::from(c.amount_minor),
        TxKind::RecordOnly => 0,
    };
    let Ok(before) = i32::try_from(i64::from(c.balance_after_minor) - change) else {
        return Ok(Learned::No);
    };
    if before < 0 {
        return Ok(Learned::No);
    }
    let uid = hex::encode_upper(c.uid);
    t.issue_card(&c.uid, before, &format!("learned:{uid}:{}", c.tmc), now_ms)?;
    let learned = crate::ledger::LearnedCard {
        tmc: c.tmc,
        balance_before_minor: before,
    };
    t.put_idempotent(
        &crate::ledger::learned_card_key(&c.uid),
        &serde_json::to_value(learned).expect("a learned card serialises"),
    )?;
    done.cards_learned += 1;
    Ok(Learned::AtOrAfter)
}

/// A pending load (or reversal) whose counter no tap has claimed, just below the first counter booked above a
/// gap: if the card's proved balances show exactly the load's amount arriving across that
/// counter (balance at x, plus the load, plus the next transaction's change, equals the balance
/// the card proved after it), the card applied the load: complete it and book its counter. Runs
/// after every booking, so it does not matter in which order taps arrive.
fn complete_loads_across_gaps(
    t: &mut dyn LedgerWrite,
    booked: &TmacVerified,
    now_ms: u64,
    done: &mut BatchOutcome,
) -> Result<(), LedgerError> {
    let uid = &booked.receipt().uid();
    loop {
        let shadow = t.card(uid)?;
        let x = shadow.booked_through_tmc;
        let (Some(bal_x), Some(&(next, bal_next, delta_next))) =
            (shadow.booked_balance_minor, shadow.booked_above.first())
        else {
            return Ok(());
        };
        if Some(next) != x.checked_add(2) {
            return Ok(());
        }
        let Some(intent) = t.intent(uid, x)? else {
            return Ok(());
        };
        // Only a load: a reversal is a Debit, which a validator's fare of the same amount at
        // the same counter matches balance for balance — the card's own record decides it
        // (`LoadService::settle_from_snapshot`).
        let after = i64::from(bal_x) + intent.delta_minor();
        if intent.state != IntentState::Authorised
            || intent.kind != crate::ledger::IntentKind::Load
            || after + delta_next != i64::from(bal_next)
        {
            return Ok(());
        }
        let Ok(after) = i32::try_from(after) else {
            return Ok(());
        };
        let proof = Completion::AcrossGap {
            booked,
            tmc_before: x,
            balance_after_minor: after,
        };
        if let Some(action) = t.complete_intent(proof, now_ms)? {
            done.loads_completed += 1;
            done.funding.push(action);
        }
    }
}

/// Whether the transaction just before this one (counter `tmc − 1`) was a back-office debit —
/// a reversal or an online payment, pending or completed (neither arms LimitedCredit).
fn follows_reversal(t: &dyn LedgerWrite, c: &TxClaim) -> Result<bool, LedgerError> {
    let Some(before) = c.tmc.checked_sub(2) else {
        return Ok(false);
    };
    Ok(t.intent(&c.uid, before)?.is_some_and(|i| {
        i.kind != crate::ledger::IntentKind::Load && i.state != IntentState::Voided
    }))
}

/// A counter seen twice with different contents: an anomaly, and the card is blocked.
#[allow(clippy::too_many_arguments)]
fn clone_found(
    t: &mut dyn LedgerWrite,
    done: &mut BatchOutcome,
    tap: &ClearingTap,
    c: &TxClaim,
    detail: &str,
    now_ms: u64,
) -> Result<(), LedgerError> {
    done.anomalies.push(Anomaly {
        kind: "clone".into(),
        card_uid: tap.card_uid.clone(),
        tmc: c.tmc,
        device_id: tap.device_id,
        device_seq: tap.device_seq,
        detail: detail.into(),
    });
    if t.set_blocked(&c.uid, true, crate::ledger::CLONE_BLOCK_REASON, now_ms)?
        .is_some()
    {
        done.cards_blocked += 1;
    }
    Ok(())
}

fn cleared_one(o: &mut BatchOutcome) {
    o.cleared += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use purse::apdu::ins;
    use purse::keys::{KeyKind, KeySet};
    use purse::sam::{SoftwareHsm, SoftwareSam};
    use rand::SeedableRng;
    use tapgate_testkit::fixtures::{clearing_tap, transit_card, value_tx};

    /// The test ledger: LMDB, or with `TAPGATE_TEST_LEDGER=postgres` a throwaway database
    /// (its guard kept as long as the ledger).
    fn ledger(dir: &std::path::Path) -> (Ledger, Option<tapgate_testkit::postgres::TestDb>) {
        if std::env::var("TAPGATE_TEST_LEDGER").is_ok_and(|v| v == "postgres") {
            let db = tapgate_testkit::postgres::TestDb::start();
            let cfg = crate::ledger::PgConfig::new(&db.url, Some(db.password()));
            crate::ledger::postgres::migrate(&cfg).expect("migrating");
            return (Ledger::open_postgres(cfg).expect("opening"), Some(db));
        }
        (Ledger::open(dir, 64 << 20).expect("opening"), None)
    }

    /// The keys of `seed` as a test needs them: a software HSM to issue cards with, the
    /// clearing's HSM and a validator's SAM (device 1001).
    fn keys(seed: u64) -> (SoftwareHsm, Mutex<Box<dyn Hsm + Send>>, SoftwareSam) {
        let keys = KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let hsm: Box<dyn Hsm + Send> = Box::new(SoftwareHsm::new(&keys).unwrap());
        (
            SoftwareHsm::new(&keys).unwrap(),
            Mutex::new(hsm),
            SoftwareSam::validator(&keys, 1001).unwrap(),
        )
    }

    /// A card learned at counter 3, then one batch with taps below its learned counter (their
    /// learned-card answer read) and above its last counter (not read): each side booked from
    /// the right account, once.
    #[test]
    fn taps_below_and_above_a_learned_cards_counter_in_one_batch_book_once() {
        let dir = tempfile::tempdir().unwrap();
        let (l, _pg) = ledger(dir.path());
        let (hsm_keys, hsm, mut sam) = keys(5);
        let uid = [0x04, 0xC0, 0x0D, 0, 0, 0, 9];
        let mut card = transit_card(&hsm_keys, uid, 5_000);
        let d: Vec<_> = [100, 200, 50, 400]
            .into_iter()
            .map(|a| value_tx(&mut sam, &mut card, KeyKind::Debit, ins::DEBIT, a).unwrap())
            .collect();
        let batch = |id: &str, taps: Vec<ClearingTap>| ClearingBatch {
            batch_id: id.into(),
            taps,
        };
        let out = clear_batch(&l, &hsm, batch("b1", vec![clearing_tap(&d[2], 3)]), 1).unwrap();
        assert_eq!((out.cleared, out.cards_learned), (1, 1), "{out:?}");
        let mixed = vec![
            clearing_tap(&d[0], 1),
            clearing_tap(&d[3], 4),
            clearing_tap(&d[1], 2),
        ];
        let out = clear_batch(&l, &hsm, batch("b2", mixed.clone()), 2).unwrap();
        assert_eq!((out.cleared, out.duplicates), (3, 0), "{out:?}");
        assert!(out.anomalies.is_empty(), "{out:?}");
        // The same batch again, and its taps under another id: nothing booked twice.
        assert_eq!(
            clear_batch(&l, &hsm, batch("b2", mixed.clone()), 3).unwrap(),
            out
        );
        let again = clear_batch(&l, &hsm, batch("b3", mixed), 4).unwrap();
        assert_eq!((again.cleared, again.duplicates), (0, 3), "{again:?}");
        let r = l.read().unwrap();
        assert_eq!(
            r.balance(&card_account(&uid)).unwrap(),
            i64::from(card.state().balance_minor)
        );
        assert_eq!(r.balance("operator:metro").unwrap(), 750);
        assert_eq!(r.balance("issuer:float").unwrap(), -5_000);
    }

    /// A batch of 40 cards (on PostgreSQL, enough to have its statements planned for their
    /// arrays: `staged.rs`, `CUSTOM_PLANS_FROM`), two taps each: booked once, its retry answered
    /// from the store, its taps under another id all duplicates; every card's account equals
    /// the card and the operator has every fare.
    #[test]
    fn a_batch_of_many_cards_books_each_tap_once() {
        let dir = tempfile::tempdir().unwrap();
        let (l, _pg) = ledger(dir.path());
        let (hsm_keys, hsm, mut sam) = keys(6);
        let mut cards: Vec<_> = (0..40u8)
            .map(|i| transit_card(&hsm_keys, [0x04, 0xBA, 0x7C, i, 0, 0, 9], 5_000))
            .collect();
        let (mut taps, mut last_tmc) = (vec![], vec![0; cards.len()]);
        for round in 0..2 {
            for (i, card) in cards.iter_mut().enumerate() {
                let amount = 100 + i32::from(u8::try_from(i).unwrap()) + round;
                let r = value_tx(&mut sam, card, KeyKind::Debit, ins::DEBIT, amount).unwrap();
                last_tmc[i] = r.tmc();
                taps.push(clearing_tap(&r, taps.len() as u64 + 1));
            }
        }
        let batch = |id: &str| ClearingBatch {
            batch_id: id.into(),
            taps: taps.clone(),
        };
        let out = clear_batch(&l, &hsm, batch("many"), 1).unwrap();
        assert_eq!((out.cleared, out.duplicates), (80, 0), "{out:?}");
        assert!(out.anomalies.is_empty(), "{out:?}");
        assert_eq!(clear_batch(&l, &hsm, batch("many"), 2).unwrap(), out);
        let again = clear_batch(&l, &hsm, batch("many-again"), 3).unwrap();
        assert_eq!((again.cleared, again.duplicates), (0, 80), "{again:?}");
        let r = l.read().unwrap();
        let mut fares = 0;
        for (card, tmc) in cards.iter().zip(last_tmc) {
            let uid = card.state().uid;
            let balance = i64::from(card.state().balance_minor);
            assert_eq!(r.balance(&card_account(&uid)).unwrap(), balance);
            assert_eq!(r.card(&uid).unwrap().booked_through_tmc, tmc);
            fares += 5_000 - balance;
        }
        assert_eq!(r.balance("operator:metro").unwrap(), fares);
        assert_eq!(r.balance("issuer:float").unwrap(), -5_000 * 40);
    }
}
