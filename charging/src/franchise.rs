//! Franchise terminals: shops whose SAM may load cards offline up to a credit ceiling.
//!
//! - They report their loads later ([`report_loads`]); each is booked only if the HSM verifies
//!   the card's transaction MAC *with the franchise SAM's reader id* (the SAM commits it with
//!   CommitReaderID and the card binds it into the MAC, so a report proves the load was made
//!   under that franchise's SAM — not an online load, not another franchise's), and once per
//!   card counter whoever reports it: a counter already booked (by an online load, a cleared
//!   tap, another report) or held by an online load's intent is refused.
//!   Booked: `franchise:<id>` → `card:<UID>` (the franchise collected the cash and owes it).
//! - They get their ceiling replenished online ([`grant_ceiling`]): the grant is MAC'd with the
//!   terminal's device key, numbered, and sized so the franchise's exposure — value granted but
//!   not yet reported, plus value reported but not yet paid — never exceeds its limit.
//! - The operator records their payments ([`record_payment`]); settlement files list a business
//!   day's loads and payments per franchise (`tapgate charging settlement`).

use crate::ledger::{Booking, Ledger, LedgerError, LedgerRead, LedgerWrite};
use purse::receipt::{TxClaim, TxKind};
use purse::sam::{reader_id_of_device, CeilingGrant, Hsm};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// A configured franchise.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FranchiseConfig {
    /// Franchise id; also the name of its API token (role partner).
    pub name: String,
    /// Its terminal's device id (the SAM's device key MACs ceiling grants).
    pub device_id: u32,
    /// The most value it may hold unreported or unpaid, minor units.
    pub max_exposure_minor: i64,
}

/// One load a terminal reports.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedLoad {
    /// Card UID, 14 hex digits.
    pub card_uid: String,
    /// The counter the load consumed.
    pub tmc: u32,
    /// Amount, minor units.
    pub amount_minor: i32,
    /// The card's balance after the load.
    pub balance_after_minor: i32,
    /// The card's transaction MAC, 16 hex digits.
    pub tmv: String,
    /// The card's key version.
    pub key_version: u8,
}

/// What happened to a report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReportOutcome {
    /// Booked now.
    pub accepted: u32,
    /// Already booked (a repeated report).
    pub duplicates: u32,
    /// Refused, with the index in the report and the reason.
    pub rejected: Vec<(usize, String)>,
}

/// The franchise's running state (kept in the ledger's idempotency store).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FranchiseState {
    /// Sum of all ceiling grants.
    pub granted_total_minor: i64,
    /// Sum of all reported (and verified) loads.
    pub reported_total_minor: i64,
    /// The last grant's sequence number.
    pub last_grant_seq: u32,
}

/// Franchise errors.
#[derive(Debug, thiserror::Error)]
pub enum FranchiseError {
    /// Not a configured franchise.
    #[error("{0:?} is not a configured franchise")]
    Unknown(String),
    /// Malformed input.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Storage.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// HSM.
    #[error("HSM: {0}")]
    Hsm(String),
}

fn state_key(name: &str) -> String {
    format!("franchise-state:{name}")
}

impl FranchiseState {
    /// Franchise `name`'s state as `r` holds it (all zero before its first grant or report).
    fn read(r: &(impl LedgerRead + ?Sized), name: &str) -> Result<FranchiseState, LedgerError> {
        Ok(r.idempotent(&state_key(name))?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default())
    }

    /// Stores this as franchise `name`'s state.
    fn store(&self, t: &mut (impl LedgerWrite + ?Sized), name: &str) -> Result<(), LedgerError> {
        let value = serde_json::to_value(self).expect("state serialises");
        t.put_idempotent(&state_key(name), &value)
    }
}

/// The franchise's state.
pub fn state(ledger: &Ledger, name: &str) -> Result<FranchiseState, FranchiseError> {
    Ok(FranchiseState::read(&*ledger.read()?, name)?)
}

/// Value the franchise owes and has not paid (its account is negative by that much).
pub fn outstanding_minor(ledger: &Ledger, name: &str) -> Result<i64, FranchiseError> {
    let r = ledger.read()?;
    // A balance of i64::MIN has no negation: saturate (the ledger's checked postings keep
    // balances away from it anyway).
    Ok(r.balance(&format!("franchise:{name}"))?.saturating_neg())
}

fn overflow(what: &str) -> LedgerError {
    LedgerError::InvalidPosting(match what {
        "granted" => "the franchise's granted total would overflow",
        _ => "the franchise's reported total would overflow",
    })
}

/// Books a terminal's reported loads.
pub fn report_loads(
    ledger: &Ledger,
    hsm: &Mutex<Box<dyn Hsm + Send>>,
    franchise: &FranchiseConfig,
    loads: &[ReportedLoad],
    now_ms: u64,
) -> Result<ReportOutcome, FranchiseError> {
    let mut out = ReportOutcome::default();
    let mut verified = Vec::new();
    for (i, l) in loads.iter().enumerate() {
        let uid: Option<[u8; 7]> = hex::decode(&l.card_uid)
            .ok()
            .and_then(|v| v.try_into().ok());
        let tmv: Option<[u8; 8]> = hex::decode(&l.tmv).ok().and_then(|v| v.try_into().ok());
        let (Some(uid), Some(tmv)) = (uid, tmv) else {
            out.rejected
                .push((i, "card_uid must be 14 and tmv 16 hex digits".into()));
            continue;
        };
        if l.amount_minor <= 0 {
            out.rejected
                .push((i, "amount_minor must be positive".into()));
            continue;
        }
        let claim = TxClaim {
            uid,
            tmc: l.tmc,
            tmv,
            kind: TxKind::Credit,
            amount_minor: l.amount_minor,
            balance_after_minor: l.balance_after_minor,
            key_version: l.key_version,
            // Never from the report: the load must carry this franchise's own SAM's id.
            reader_id: Some(reader_id_of_device(franchise.device_id)),
        };
        match hsm.lock().expect("hsm lock").verify_claim(&claim) {
            Ok(proof) => verified.push((i, proof)),
            // The HSM failed, not the load: no verdict; the report fails and can be resent.
            Err(purse::sam::SamError::Hsm(e)) => return Err(FranchiseError::Hsm(e)),
            Err(e) => out.rejected.push((i, format!("transaction MAC: {e}"))),
        }
    }
    let name = franchise.name.clone();
    let (accepted, duplicates, refused) = ledger.transact(move |t| {
        let mut st = FranchiseState::read(t, &name)?;
        let (mut accepted, mut duplicates) = (0u32, 0u32);
        let mut refused = Vec::new();
        for (i, proof) in &verified {
            let c = &proof.receipt().to_claim();
            let marker = format!("franchise-load:{}:{}", hex::encode_upper(c.uid), c.tmc);
            if t.idempotent(&marker)?.is_some() {
                duplicates += 1;
                continue;
            }
            // A counter is booked once, whoever reports it.
            let shadow = t.card(&c.uid)?;
            let held_by_intent = match c.tmc.checked_sub(1) {
                Some(before) => t
                    .intent(&c.uid, before)?
                    .is_some_and(|i| i.state != crate::ledger::IntentState::Voided),
                None => false,
            };
            if c.tmc <= shadow.booked_through_tmc
                || shadow.booked_above.iter().any(|e| e.0 == c.tmc)
                || held_by_intent
            {
                refused.push((
                    *i,
                    "the card counter is already booked by another transaction".to_string(),
                ));
                continue;
            }
            let Some(reported) = st
                .reported_total_minor
                .checked_add(i64::from(c.amount_minor))
            else {
                return Err(overflow("reported"));
            };
            t.post_franchise_load(proof, &name, &marker, now_ms)?;
            t.put_idempotent(&marker, &serde_json::Value::String(name.clone()))?;
            let booking = t.book_proved(proof, now_ms)?;
            debug_assert_ne!(booking, Booking::Duplicate, "checked above");
            st.reported_total_minor = reported;
            accepted += 1;
        }
        st.store(t, &name)?;
        Ok((accepted, duplicates, refused))
    })?;
    out.accepted = accepted;
    out.duplicates = duplicates;
    out.rejected.extend(refused);
    out.rejected.sort_by_key(|r| r.0);
    Ok(out)
}

/// Grants up to `requested_minor` of new ceiling, within the franchise's exposure limit.
/// Returns `None` when nothing can be granted (exposure at its limit).
pub fn grant_ceiling(
    ledger: &Ledger,
    hsm: &Mutex<Box<dyn Hsm + Send>>,
    franchise: &FranchiseConfig,
    requested_minor: i64,
) -> Result<Option<CeilingGrant>, FranchiseError> {
    if requested_minor <= 0 {
        return Err(FranchiseError::BadRequest(
            "requested_minor must be positive".into(),
        ));
    }
    let outstanding = outstanding_minor(ledger, &franchise.name)?;
    let name = franchise.name.clone();
    let max = franchise.max_exposure_minor;
    // Decide and record the grant in one transaction, so two concurrent requests cannot both
    // use the same headroom or the same sequence number.
    let decided = ledger.transact(move |t| {
        let mut st = FranchiseState::read(t, &name)?;
        let unreported = st
            .granted_total_minor
            .saturating_sub(st.reported_total_minor);
        let headroom = max
            .saturating_sub(unreported.max(0))
            .saturating_sub(outstanding.max(0));
        let amount = requested_minor.min(headroom);
        if amount <= 0 {
            return Ok(None);
        }
        let (Some(seq), Some(granted)) = (
            st.last_grant_seq.checked_add(1),
            st.granted_total_minor.checked_add(amount),
        ) else {
            return Err(overflow("granted"));
        };
        st.last_grant_seq = seq;
        st.granted_total_minor = granted;
        st.store(t, &name)?;
        Ok(Some((st.last_grant_seq, amount)))
    })?;
    let Some((seq, amount)) = decided else {
        return Ok(None);
    };
    let grant = hsm
        .lock()
        .expect("hsm lock")
        .ceiling_grant(franchise.device_id, seq, amount)
        .map_err(|e| FranchiseError::Hsm(e.to_string()))?;
    Ok(Some(grant))
}

/// Records a franchise's payment of what it owes (by the operator).
pub fn record_payment(
    ledger: &Ledger,
    name: &str,
    amount_minor: i64,
    reference: &str,
    now_ms: u64,
) -> Result<(), FranchiseError> {
    if amount_minor <= 0 {
        return Err(FranchiseError::BadRequest(
            "amount_minor must be positive".into(),
        ));
    }
    let (name, reference) = (name.to_string(), reference.to_string());
    ledger.transact(move |t| {
        let marker = format!("franchise-payment:{name}:{reference}");
        if t.idempotent(&marker)?.is_some() {
            return Ok(());
        }
        // A payment settles what the franchise owes, no more: an overpayment (i64::MAX, say)
        // would turn into headroom for grants and, added twice, overflow the account.
        let owed = t.balance(&format!("franchise:{name}"))?.saturating_neg();
        if amount_minor > owed {
            return Err(LedgerError::InvalidPosting(
                "a payment above what the franchise owes",
            ));
        }
        t.post(
            now_ms,
            "bank:settlements",
            &format!("franchise:{name}"),
            amount_minor,
            &marker,
        )?;
        t.put_idempotent(&marker, &serde_json::Value::Bool(true))
    })?;
    Ok(())
}
